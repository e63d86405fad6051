"""Fine-tune and evaluate one sentence classifier: the VQA trainer's conventions on sentences.

Shared with VQA training: the typed config (``train:`` is :class:`vqa_align.config.TrainConfig`,
``model.alignment:`` is :class:`vqa_align.config.AlignmentConfig`, loaded with the same strict
YAML/``--set`` machinery), seeding and device choice (:mod:`vqa_align.training`), the loss
``L = L_task + λ·L_align`` with a per-sample mean task loss (``loss_reduction: mean``), checkpoint
folders (:func:`vqa_align.checkpoint.save_checkpoint`: ``checkpoints/best``), the run folder's
``config.yaml`` and ``metrics.jsonl`` (records ``kind: train | eval | test``), and
:mod:`vqa_align.calibration` for ECE, MC-dropout PAvPU and the noise probe.

Schedule: AdamW at ``train.lr`` after a linear warm-up of ``run.warmup_steps``; the dev split is
scored every ``run.eval_every_steps`` steps; training stops after ``train.max_steps`` steps, after
``train.epochs`` epochs, or when dev accuracy has not improved for ``run.patience`` checks; the
weights of the best dev check (``checkpoints/best``) are the ones evaluated.

Batches: dynamic padding; training batches are drawn "sortish" (shuffle, sort chunks of
``run.sort_chunk_batches`` batches by length, cut, shuffle the batches), so a batch holds
sentences of similar length and the padding the CPU computes on stays small.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vqa_align.config import (
    ConfigError, TrainConfig, _fix_yaml_floats, apply_overrides, from_dict, save_config,
)
from vqa_align.errors import UserError
from vqa_align.sentiment.model import LABELS, SentenceClassifier, SentenceModelConfig

METRICS_FILE = "metrics.jsonl"  # the name vqa_align.training uses
RESULT_FILE = "result.json"


@dataclass
class SentimentDataConfig:
    cache_dir: str | None = None  # prepared data: <cache>/sentiment (vqa-align prep sentiment)
    train_subset: int | None = None  # only N training sentences, a fixed random subset (tests)
    eval_subset: int | None = None  # only N sentences of each test split, a fixed random subset (CPU budget, tests)
    dev_subset: int | None = None  # only N dev sentences, a fixed random subset


@dataclass
class SentimentRunConfig:
    """What the sentence runner adds to ``train:``: dev checks, early stopping, evaluation."""

    warmup_steps: int = 20
    eval_every_steps: int = 50
    patience: int = 3  # dev checks without improvement before stopping
    sort_chunk_batches: int = 16
    eval_batch_size: int = 128
    test_splits: list[str] = field(default_factory=lambda: ["movie_test", "amazon", "tweets", "nyt"])
    calibration_bins: int = 15  # as in the paper
    mc_samples: int = 10  # MC-dropout passes for PAvPU (paper: 20)
    mc_max_sentences: int | None = None  # PAvPU on the first N (seeded-shuffled) sentences of a split
    pavpu_p: float = 0.05
    noise_std: float = 0.05  # N(0, s²) on word embeddings (MiniLM's entries have std ≈ 0.056)
    mmd_sentences: int = 128  # movie-test sentences whose key–query MMD² is measured per layer

    def validate(self) -> None:
        for key in ("eval_every_steps", "patience", "sort_chunk_batches", "eval_batch_size", "calibration_bins",
                    "mmd_sentences"):
            if getattr(self, key) < 1:
                raise ConfigError(f"run.{key} must be >= 1, got {getattr(self, key)}")
        if self.mc_samples == 1 or self.mc_samples < 0:
            raise ConfigError(f"run.mc_samples must be 0 (no PAvPU) or >= 2, got {self.mc_samples}")
        if self.noise_std < 0:
            raise ConfigError(f"run.noise_std must be >= 0, got {self.noise_std}")


@dataclass
class SentimentConfig:
    model: SentenceModelConfig = field(default_factory=SentenceModelConfig)
    data: SentimentDataConfig = field(default_factory=SentimentDataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=2, batch_size=32, lr=5e-5, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.01, warmup_epochs=0,
        decay_epochs=[], loss_reduction="mean", log_every_steps=10))
    run: SentimentRunConfig = field(default_factory=SentimentRunConfig)
    name: str = "sentiment"

    def validate(self) -> "SentimentConfig":
        self.model.validate()
        self.train.validate()
        self.run.validate()
        if self.train.loss_reduction != "mean":
            raise ConfigError("train.loss_reduction must be 'mean' for sentence classification")
        return self

    def to_dict(self) -> dict[str, Any]:
        import dataclasses

        return dataclasses.asdict(self)


def load_sentiment_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> SentimentConfig:
    """A YAML preset (or the defaults) plus ``--set`` overrides; unknown keys are errors."""
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    data = apply_overrides(data, list(overrides))
    try:
        config = from_dict(SentimentConfig, _fix_yaml_floats(data))
        # from_dict builds TrainConfig from the keys given only: keep our defaults for the rest.
        if "train" in data:
            base = SentimentConfig().train.__dict__ | {k: getattr(config.train, k) for k in data["train"]}
            config.train = TrainConfig(**base)
        return config.validate()
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}" if path is not None else str(err)) from None


# ----------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------


@dataclass
class Encoded:
    """One split, tokenized: ids without padding, labels, and the sentence ids."""

    ids: list[list[int]]  # [CLS] ... [SEP], truncated to model.max_tokens
    labels: np.ndarray  # (N,) int64
    names: list[str]  # "<domain>/<id>"


def encode(sentences: Sequence[Any], tokenizer: Any, max_tokens: int) -> Encoded:
    out = tokenizer([s.text for s in sentences], truncation=True, max_length=max_tokens)["input_ids"]
    return Encoded(out, np.array([s.label for s in sentences], dtype=np.int64), [f"{s.domain}/{s.id}" for s in sentences])


def collate(ids: Sequence[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest in the batch -> (input_ids (B, T), attention_mask (B, T))."""
    longest = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), longest), dtype=torch.long)
    for row, x in enumerate(ids):
        input_ids[row, : len(x)] = torch.tensor(x)
        mask[row, : len(x)] = 1
    return input_ids, mask


def sortish_batches(lengths: np.ndarray, batch_size: int, chunk_batches: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Every index exactly once, in batches of similar length, in random order."""
    order = rng.permutation(len(lengths))
    chunk = batch_size * chunk_batches
    batches = []
    for start in range(0, len(order), chunk):
        part = order[start : start + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def eval_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Sorted by length (least padding); predictions are put back in the original order."""
    order = np.argsort(lengths, kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------


def classification_metrics(probs: np.ndarray, labels: np.ndarray, bins: int) -> dict[str, float]:
    """Accuracy (%), ECE (%) of the top-1 class, NLL of the true class. probs: (N, C)."""
    from vqa_align.calibration import expected_calibration_error

    predicted = probs.argmax(1)
    correct = (predicted == labels).astype(np.float64)
    nll = -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0)).mean()
    return {
        "accuracy": float(100.0 * correct.mean()),
        "ece": 100.0 * float(expected_calibration_error(probs.max(1), correct, bins)),
        "nll": float(nll),
    }


# ----------------------------------------------------------------------------------------------
# The runner
# ----------------------------------------------------------------------------------------------


def _subset(items: Sequence[Any], n: int | None) -> list[Any]:
    """The first ``n`` items of a fixed (seed 0) shuffle: the files are ordered by label, so a plain
    prefix would hold one class only."""
    if n is None or n >= len(items):
        return list(items)
    return [items[i] for i in sorted(np.random.default_rng(0).permutation(len(items))[:n])]


class SentimentRunner:
    """Owns the model, optimizer, data and run folder of one sentence-classification run."""

    def __init__(self, config: SentimentConfig, run_dir: str | Path, sentences: dict[str, list[Any]] | None = None):
        from vqa_align.question_encoders import load_minilm_tokenizer
        from vqa_align.training import resolve_device, seed_everything

        self.config = config
        self.run_dir = Path(run_dir)
        self.device = resolve_device(config.train.device)
        seed_everything(config.train.seed)
        if sentences is None:
            from vqa_align_prep.easy_vqa import cache_root
            from vqa_align_prep.sentiment import FOLDER, load_sentences

            sentences = load_sentences(cache_root(config.data.cache_dir) / FOLDER)
        self.tokenizer = load_minilm_tokenizer()
        max_tokens = config.model.max_tokens
        train = _subset(sentences["movie_train"], config.data.train_subset)
        if not train:
            raise UserError("the movie_train split has no sentences")
        self.train_set = encode(train, self.tokenizer, max_tokens)
        self.splits = {"movie_dev": sentences["movie_dev"], **{name: sentences[name] for name in config.run.test_splits}}
        self.encoded = {
            name: encode(_subset(s, config.data.dev_subset if name == "movie_dev" else config.data.eval_subset),
                         self.tokenizer, max_tokens)
            for name, s in self.splits.items()
        }
        self.model = SentenceClassifier(config.model).to(self.device)
        if config.model.freeze_word_embeddings:
            # Half of MiniLM's parameters; updating them costs time and buys little with ~8k sentences.
            self.model.encoder.embeddings.word_embeddings.weight.requires_grad_(False)
        t = config.train
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=t.lr, betas=tuple(t.betas), eps=t.eps,
                                           weight_decay=t.weight_decay)
        self.rng = np.random.default_rng(t.seed)
        self.global_step = 0
        self.best_accuracy = -1.0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.step_seconds: list[float] = []
        self.step_cpu_seconds: list[float] = []
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, self.run_dir / "config.yaml")  # type: ignore[arg-type]

    # -- training ----------------------------------------------------------------------------

    def _lr(self) -> float:
        warm = self.config.run.warmup_steps
        scale = min(1.0, (self.global_step + 1) / (warm + 1)) if warm > 0 else 1.0
        return self.config.train.lr * scale

    def train_step(self, index: np.ndarray) -> dict[str, float]:
        """One optimizer step on the sentences ``index`` of the training split: L = CE + λ·L_align."""
        start, cpu_start = time.perf_counter(), time.process_time()
        self.model.train()
        input_ids, mask = collate([self.train_set.ids[i] for i in index])
        labels = torch.from_numpy(self.train_set.labels[index]).to(self.device)
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr()
        logits = self.model(input_ids.to(self.device), mask.to(self.device))  # (B, 2)
        task = F.cross_entropy(logits.float(), labels)
        align = self.model.alignment.loss()
        loss = task + self.config.model.alignment.weight * align
        if not torch.isfinite(loss):
            raise UserError(f"non-finite loss {loss.item()} at step {self.global_step}; the best checkpoint is kept")
        loss.backward()
        if self.config.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.train.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        seconds = time.perf_counter() - start
        cpu_seconds = time.process_time() - cpu_start  # summed over threads; less sensitive to other jobs
        self.step_seconds.append(seconds)
        self.step_cpu_seconds.append(cpu_seconds)
        return {"loss": loss.item(), "task_loss": task.item(), "alignment_loss": align.item(), "step_seconds": seconds,
                "step_cpu_seconds": cpu_seconds,
                "tokens": int(mask.sum())}

    def fit(self) -> dict[str, Any]:
        t, r = self.config.train, self.config.run
        checks_without_gain = 0
        lengths = np.array([len(x) for x in self.train_set.ids])
        stop = False
        for epoch in range(t.epochs):
            for index in sortish_batches(lengths, t.batch_size, r.sort_chunk_batches, self.rng):
                stats = self.train_step(index)
                if self.global_step % t.log_every_steps == 0:
                    self._log({"kind": "train", "epoch": epoch, "step": self.global_step, "lr": self._lr(), **stats})
                last = t.max_steps is not None and self.global_step >= t.max_steps
                if self.global_step % r.eval_every_steps == 0 or last:
                    if self._dev_check(epoch):
                        checks_without_gain = 0
                    else:
                        checks_without_gain += 1
                    stop = last or checks_without_gain >= r.patience
                if stop:
                    break
            if stop:
                break
        if self.global_step % r.eval_every_steps != 0 and not stop:
            self._dev_check(t.epochs - 1)  # the tail of the last epoch
        assert self.best_state is not None
        self.model.load_state_dict(self.best_state)
        return {"steps": self.global_step, "best_dev_accuracy": self.best_accuracy}

    def _dev_check(self, epoch: int) -> bool:
        probs = self.predict(self.encoded["movie_dev"])
        metrics = classification_metrics(probs, self.encoded["movie_dev"].labels, self.config.run.calibration_bins)
        improved = bool(metrics["accuracy"] > self.best_accuracy)
        self._log({"kind": "eval", "epoch": epoch, "step": self.global_step, **{f"dev_{k}": v for k, v in metrics.items()},
                   "improved": improved})
        if improved:
            self.best_accuracy = metrics["accuracy"]
            self.best_step = self.global_step
            self.best_state = copy.deepcopy(self.model.state_dict())
            self.save("best")
        return improved

    # -- evaluation --------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, data: Encoded, noise_std: float = 0.0, dropout: bool = False, seed: int = 0) -> np.ndarray:
        """(N, C) class probabilities; ``dropout`` keeps dropout on (one MC sample; no alignment terms)."""
        self.model.train(dropout)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        self.model.word_noise_std, self.model.noise_generator = noise_std, generator
        out = np.zeros((len(data.ids), len(LABELS)))
        lengths = np.array([len(x) for x in data.ids])
        try:
            with self.model.alignment.options(compute=False):
                for index in eval_batches(lengths, self.config.run.eval_batch_size):
                    input_ids, mask = collate([data.ids[i] for i in index])
                    logits = self.model(input_ids.to(self.device), mask.to(self.device))
                    out[index] = logits.float().softmax(-1).cpu().numpy()
        finally:
            self.model.word_noise_std, self.model.noise_generator = 0.0, None
            self.model.eval()
        return out

    def evaluate_split(self, name: str) -> dict[str, Any]:
        """Accuracy, ECE, NLL; accuracy under word-embedding noise; MC-dropout PAvPU."""
        from vqa_align.calibration import pavpu

        r = self.config.run
        data = self.encoded[name]
        start = time.perf_counter()
        probs = self.predict(data)
        result: dict[str, Any] = {"n": len(data.ids), **classification_metrics(probs, data.labels, r.calibration_bins)}
        if r.noise_std > 0:
            noisy = self.predict(data, noise_std=r.noise_std, seed=self.config.train.seed)
            result["noisy_accuracy"] = classification_metrics(noisy, data.labels, r.calibration_bins)["accuracy"]
        if r.mc_samples >= 2:
            keep = np.random.default_rng(0).permutation(len(data.ids))[: r.mc_max_sentences]
            subset = Encoded([data.ids[i] for i in keep], data.labels[keep], [data.names[i] for i in keep])
            mc = np.stack([self.predict(subset, dropout=True, seed=1000 + s) for s in range(r.mc_samples)])  # (S, N, C)
            correct = (mc.mean(0).argmax(1) == subset.labels).astype(np.float64)
            stats = pavpu(mc, correct, p_threshold=r.pavpu_p)
            result.update({"pavpu": 100.0 * stats["pavpu"], "pavpu_n": stats["n"],
                           "mc_accuracy": float(100.0 * correct.mean())})
        result["eval_seconds"] = time.perf_counter() - start
        return result

    @torch.no_grad()
    def alignment_statistics(self) -> dict[str, Any]:
        """Key–query MMD² per layer (mean over sentences and heads) on the first movie-test sentences."""
        data = self.encoded["movie_test"] if "movie_test" in self.encoded else self.encoded["movie_dev"]
        ids = data.ids[: self.config.run.mmd_sentences]
        self.model.eval()
        per_layer: list[list[float]] = []
        for start in range(0, len(ids), self.config.run.eval_batch_size):
            input_ids, mask = collate(ids[start : start + self.config.run.eval_batch_size])
            with self.model.alignment.recording():
                self.model(input_ids.to(self.device), mask.to(self.device))
            diagnostics = self.model.alignment.diagnostics()
            per_layer.append([float(d.mmd2.sum()) for d in diagnostics])  # summed over sentences and heads
        heads = diagnostics[0].mmd2.shape[1]
        totals = np.sum(per_layer, axis=0) / len(ids)  # per layer: summed over heads, mean over sentences
        return {"mmd2_per_layer": (totals / heads).tolist(), "mmd2_sum_heads_layers": float(totals.sum()),
                "mmd_sentences": len(ids)}

    def evaluate(self) -> dict[str, Any]:
        result: dict[str, Any] = {"splits": {}}
        for name in self.config.run.test_splits:
            result["splits"][name] = self.evaluate_split(name)
            self._log({"kind": "test", "step": self.global_step, "split": name, **result["splits"][name]})
        result["alignment"] = self.alignment_statistics()
        return result

    # -- persistence -------------------------------------------------------------------------

    def save(self, name: str) -> Path:
        from vqa_align.checkpoint import save_checkpoint

        meta = {"global_step": self.global_step, "best_dev_accuracy": self.best_accuracy}
        return save_checkpoint(self.run_dir / "checkpoints" / name, self.model, self.config, LABELS,  # type: ignore[arg-type]
                               self.tokenizer, None, meta)

    def _log(self, record: dict[str, Any]) -> None:
        record = {"time": time.time(), **record}
        with open(self.run_dir / METRICS_FILE, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def run_one(config: SentimentConfig, run_dir: Path, sentences: dict[str, list[Any]] | None = None) -> dict[str, Any]:
    """Train (early-stopped on dev) and evaluate one run; writes ``result.json`` and returns it."""
    wall = time.perf_counter()
    runner = SentimentRunner(config, run_dir, sentences)
    fit = runner.fit()
    evaluation = runner.evaluate()
    steps = np.array(runner.step_seconds)
    result = {
        "method": config.model.alignment.method,
        "seed": config.train.seed,
        **fit,
        "best_step": getattr(runner, "best_step", None),
        # The first steps include one-off work (kernel builds, allocator warm-up): the median is robust.
        "step_seconds_median": float(np.median(steps)) if len(steps) else math.nan,
        "step_seconds_mean": float(steps.mean()) if len(steps) else math.nan,
        "step_cpu_seconds_median": float(np.median(runner.step_cpu_seconds)) if len(steps) else math.nan,
        "threads": torch.get_num_threads(),
        "wall_seconds": time.perf_counter() - wall,
        **evaluation,
    }
    (Path(run_dir) / RESULT_FILE).write_text(json.dumps(result, indent=2))
    return result
