"""Fine-tune and evaluate one sentence classifier: the VQA trainer, with a sentence task.

Training is :class:`vqa_align.train.trainer.Trainer` itself: :class:`SentenceTask` is its
:class:`~vqa_align.train.task.TrainingTask` for sentences (data, model, cross-entropy, the dev check),
so the loop, the optimizer step, gradient accumulation, finiteness checks, ``metrics.jsonl``,
tensorboard, progress lines, ``checkpoints/best`` + ``last`` and exact kill-and-resume are the ones
VQA runs use. Shared too: the typed config (``train:`` is :class:`vqa_align.config.TrainConfig`,
``model.alignment:`` is :class:`vqa_align.config.AlignmentConfig`, the strict YAML/``--set``
machinery), the loss ``L = L_task + λ·L_align`` with a per-sample mean task loss
(``loss_reduction: mean``) and :mod:`vqa_align.metrics.calibration` for ECE, MC-dropout PAvPU and the
noise probe.

Schedule (TrainConfig options, generic): AdamW (``train.optimizer: adamw``) at ``train.lr`` after
a linear warm-up of ``train.warmup_steps``; the dev split is scored every ``train.eval_every_steps``
steps and after the last one; training stops after ``train.max_steps`` steps, after
``train.epochs`` epochs, or when dev accuracy has not improved for ``train.patience`` checks. The
weights of the best dev check (``checkpoints/best``) are then evaluated and ``result.json`` written.
The three options were ``run.warmup_steps`` / ``run.eval_every_steps`` / ``run.patience`` before;
those names are still read (configs and commands of earlier reports).

Batches: dynamic padding; training batches are drawn "sortish" (shuffle, sort chunks of
``run.sort_chunk_batches`` batches by length, cut, shuffle the batches) from
``numpy.random.default_rng(train.seed)``, drawn epoch after epoch, so a batch holds sentences of
similar length and the padding the CPU computes on stays small.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vqa_align.config import (
    ConfigError, TrainConfig, _fix_yaml_floats, apply_overrides, from_dict,
)
from vqa_align.errors import UserError
from vqa_align.sentiment.model import LABELS, SentenceClassifier, SentenceModelConfig
from vqa_align.untrusted_files import MAX_CONFIG_BYTES, read_yaml

if TYPE_CHECKING:
    from vqa_align.train.task import TaskContext, TaskData

RESULT_FILE = "result.json"
MMD_SAMPLE_SEED = 0  # the same MMD² sentences for every run (paired comparisons need that)
# TrainConfig options that were sentence-runner options (run.*) before the runner became the Trainer.
MOVED_TO_TRAIN = ("warmup_steps", "eval_every_steps", "patience")


@dataclass
class SentimentDataConfig:
    cache_dir: str | None = None  # prepared data: <cache>/sentiment (vqa-align prep sentiment)
    train_subset: int | None = None  # only N training sentences, a fixed random subset (tests)
    eval_subset: int | None = None  # only N sentences of each test split, a fixed random subset (CPU budget, tests)
    dev_subset: int | None = None  # only N dev sentences, a fixed random subset


@dataclass
class SentimentRunConfig:
    """What the sentence runner adds to ``train:``: batching and the evaluation after training."""

    sort_chunk_batches: int = 16
    eval_batch_size: int = 128
    test_splits: list[str] = field(default_factory=lambda: ["movie_test", "amazon", "tweets", "nyt"])
    calibration_bins: int = 15  # as in the paper
    mc_samples: int = 10  # MC-dropout passes for PAvPU (paper: 20)
    mc_max_sentences: int | None = None  # PAvPU on the first N (seeded-shuffled) sentences of a split
    pavpu_p: float = 0.05
    noise_std: float = 0.05  # N(0, s²) on word embeddings (MiniLM's entries have std ≈ 0.056)
    mmd_sentences: int = 128  # movie-test sentences (a seeded stratified sample) whose key–query MMD² is measured
    # Seed roles of an experiment (report only, not part of a run's config signature): seeds run to
    # look for effects, and seeds run afterwards to confirm them; the report tests each set apart.
    exploratory_seeds: list[int] = field(default_factory=list)
    confirmatory_seeds: list[int] = field(default_factory=list)

    def validate(self) -> None:
        for key in ("sort_chunk_batches", "eval_batch_size", "calibration_bins", "mmd_sentences"):
            if getattr(self, key) < 1:
                raise ConfigError(f"run.{key} must be >= 1, got {getattr(self, key)}")
        if self.mc_samples == 1 or self.mc_samples < 0:
            raise ConfigError(f"run.mc_samples must be 0 (no PAvPU) or >= 2, got {self.mc_samples}")
        if self.noise_std < 0:
            raise ConfigError(f"run.noise_std must be >= 0, got {self.noise_std}")
        both = sorted(set(self.exploratory_seeds) & set(self.confirmatory_seeds))
        if both:
            raise ConfigError(f"run.exploratory_seeds and run.confirmatory_seeds share seeds {both}: a seed that "
                              "suggested an effect cannot confirm it")


@dataclass
class SentimentConfig:
    model: SentenceModelConfig = field(default_factory=SentenceModelConfig)
    data: SentimentDataConfig = field(default_factory=SentimentDataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=2, batch_size=32, lr=5e-5, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.01, warmup_epochs=0,
        decay_epochs=[], loss_reduction="mean", log_every_steps=10, optimizer="adamw", warmup_steps=20,
        eval_every_steps=50, patience=3))
    run: SentimentRunConfig = field(default_factory=SentimentRunConfig)
    name: str = "sentiment"

    def validate(self) -> "SentimentConfig":
        self.model.validate()
        self.train.validate()
        self.run.validate()
        if self.train.loss_reduction != "mean":
            raise ConfigError("train.loss_reduction must be 'mean' for sentence classification")
        if self.train.cuda_graphs:
            raise ConfigError("train.cuda_graphs is not supported for sentence classification")
        return self

    def to_dict(self) -> dict[str, Any]:
        import dataclasses

        return dataclasses.asdict(self)


def load_sentiment_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> SentimentConfig:
    """A YAML preset (or the defaults) plus ``--set`` overrides; unknown keys are errors. The old
    names ``run.warmup_steps`` / ``run.eval_every_steps`` / ``run.patience`` (configs and commands
    recorded in earlier reports) are read as their ``train.`` options."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        data = read_yaml(path, MAX_CONFIG_BYTES, expect=dict, error=ConfigError) or {}
    data = _renamed(data, path)
    data = apply_overrides(data, [_renamed_override(text) for text in overrides])
    try:
        config = from_dict(SentimentConfig, _fix_yaml_floats(data))
        # from_dict builds TrainConfig from the keys given only: keep our defaults for the rest.
        if "train" in data:
            base = SentimentConfig().train.__dict__ | {k: getattr(config.train, k) for k in data["train"]}
            config.train = TrainConfig(**base)
        return config.validate()
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}" if path is not None else str(err)) from None


def _renamed(data: dict[str, Any], path: Path | None) -> dict[str, Any]:
    """A config mapping with the old ``run.<key>`` of MOVED_TO_TRAIN moved to ``train.<key>``."""
    run, train = data.get("run"), data.get("train") or {}
    if not isinstance(run, dict) or not isinstance(train, dict) or not any(key in run for key in MOVED_TO_TRAIN):
        return data  # nothing to move (a section that is not a mapping is reported by from_dict)
    data = {**data, "run": dict(run), "train": dict(train)}
    for key in MOVED_TO_TRAIN:
        if key in data["run"]:
            value = data["run"].pop(key)
            if key in data["train"] and data["train"][key] != value:
                raise ConfigError(f"{path or 'config'}: run.{key} ({value!r}) is the old name of train.{key} "
                                  f"({data['train'][key]!r}); give train.{key} only")
            data["train"][key] = value
    return data


def _renamed_override(text: str) -> str:
    """``run.patience=2`` -> ``train.patience=2`` (the old names of MOVED_TO_TRAIN)."""
    key = text.split("=", 1)[0].strip()
    if key in {f"run.{k}" for k in MOVED_TO_TRAIN}:
        return "train." + text.strip()[len("run."):]
    return text


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
    from vqa_align.metrics.calibration import expected_calibration_error

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


def mmd_sample(labels: np.ndarray, n: int, seed: int = MMD_SAMPLE_SEED) -> np.ndarray:
    """Indices (sorted) of a seeded sample of about ``n`` items, stratified by label: each class in
    proportion to its share (``data.stratified_split``; rounding may move the total by one)."""
    from vqa_align.sentiment.data import stratified_split

    if n >= len(labels):
        return np.arange(len(labels))
    part = stratified_split(labels, (n / len(labels), 1.0 - n / len(labels)), seed)
    return np.flatnonzero(part == 0)


class SentenceBatches:
    """The batches of one pass over a split: ``batches[i]`` holds sentence indices; each comes out
    collated as the model's inputs, the labels and the indices (which name a bad batch)."""

    def __init__(self, data: Encoded, batches: list[np.ndarray]):
        self.data, self.batches = data, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for index in self.batches:
            input_ids, mask = collate([self.data.ids[i] for i in index])
            yield {"input_ids": input_ids, "attention_mask": mask,
                   "targets": torch.from_numpy(self.data.labels[index]), "ids": torch.from_numpy(index)}


class SentenceTask:
    """Sentence classification as a :class:`vqa_align.train.task.TrainingTask`: MiniLM (or a tiny
    BERT) converted to alignment attention, cross-entropy on the movie-train split, dev accuracy
    picks ``best``; after training, the test-split evaluation of :func:`run_one`."""

    selection_metric = "dev_accuracy"

    def __init__(self, config: SentimentConfig, sentences: dict[str, list[Any]] | None = None):
        self.config = config
        self.sentences = sentences

    def build(self, context: TaskContext, resume: bool) -> TaskData:
        from vqa_align.model.question_encoders import load_minilm_tokenizer
        from vqa_align.train.task import TaskData

        config = self.config
        if context.dist.world_size > 1:
            raise UserError("sentence runs train in one process (no torchrun with several processes)")
        self.device = context.device
        sentences = self.sentences
        if sentences is None:
            from vqa_align.paths import cache_root
            from vqa_align.sentiment.data import FOLDER, load_sentences

            sentences = load_sentences(cache_root(config.data.cache_dir) / FOLDER)
        self.tokenizer = load_minilm_tokenizer()
        max_tokens = config.model.max_tokens
        train = _subset(sentences["movie_train"], config.data.train_subset)
        if not train:
            raise UserError("the movie_train split has no sentences")
        self.train_set = encode(train, self.tokenizer, max_tokens)
        self.train_lengths = np.array([len(x) for x in self.train_set.ids])
        splits = {"movie_dev": sentences["movie_dev"], **{name: sentences[name] for name in config.run.test_splits}}
        self.encoded = {
            name: encode(_subset(s, config.data.dev_subset if name == "movie_dev" else config.data.eval_subset),
                         self.tokenizer, max_tokens)
            for name, s in splits.items()
        }
        self.model = SentenceClassifier(config.model)  # random parts drawn from the RNGs the Trainer seeded
        if config.model.freeze_word_embeddings:
            # Half of MiniLM's parameters; updating them costs time and buys little with ~8k sentences.
            self.model.encoder.embeddings.word_embeddings.weight.requires_grad_(False)
        return TaskData(self.model, list(LABELS), self.tokenizer, self.train_set, self.encoded["movie_dev"],
                        graphs_refused="train.cuda_graphs is not supported for sentence classification")

    # -- training (the TrainingTask interface) ------------------------------------------------

    def loader(self, dataset: Encoded, shuffle: bool, epoch: int, skip: int, batch_size: int) -> SentenceBatches:
        if shuffle:
            # One generator drawn epoch after epoch (as the runner always did); epoch e's order is
            # replayed from the seed, so it is a pure function of (seed, e), as resume needs.
            lengths, chunk = self.train_lengths, self.config.run.sort_chunk_batches
            rng = np.random.default_rng(self.config.train.seed)
            for _ in range(epoch):
                sortish_batches(lengths, batch_size, chunk, rng)
            batches = sortish_batches(lengths, batch_size, chunk, rng)
        else:
            batches = eval_batches(np.array([len(x) for x in dataset.ids]), batch_size)
        return SentenceBatches(dataset, batches[skip:])

    def inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: batch[k].to(self.device) for k in ("input_ids", "attention_mask")}

    def targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["targets"].to(self.device)

    def losses(self, output: torch.Tensor, targets: torch.Tensor, reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy of the logits ``output`` (B, 2); the alignment terms of that forward."""
        return F.cross_entropy(output.float(), targets, reduction=reduction), self.model.alignment.loss()

    def batch_ids(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["ids"]

    def describe_batch(self, ids: list[int]) -> tuple[str, str]:
        names = [self.train_set.names[i] for i in ids]
        shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        return f"sentences {shown}", ""

    def start_epoch(self, epoch: int) -> bool:
        return False

    def evaluate(self, dataset: Encoded | None = None, batch_size: int | None = None) -> dict[str, float]:
        """The dev check: accuracy, ECE, NLL on the dev split (``dev_accuracy`` picks ``best``)."""
        data = dataset if dataset is not None else self.encoded["movie_dev"]
        probs = self.predict(data)
        metrics = classification_metrics(probs, data.labels, self.config.run.calibration_bins)
        return {f"dev_{k}": v for k, v in metrics.items()}

    def checkpoint_meta(self, best_score: float, best_step: int | None) -> dict[str, Any]:
        return {"best_dev_accuracy": best_score, "best_step": best_step}

    def check_resume(self, checkpoint: Path) -> None:
        return None  # the sentences are fixed by the prep's checked split digest

    def static_inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise UserError("train.cuda_graphs is not supported for sentence classification")

    # -- evaluation ---------------------------------------------------------------------------

    def load_best(self, run_dir: Path) -> None:
        """The weights of the best dev check (``checkpoints/best``) into the model."""
        from vqa_align.runs.checkpoint import WEIGHTS_FILE, read_weights

        weights, _ = read_weights(Path(run_dir) / "checkpoints" / "best" / WEIGHTS_FILE, self.device)
        self.model.load_state_dict(weights)

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
        from vqa_align.metrics.calibration import pavpu

        r = self.config.run
        data = self.encoded[name]
        start = time.perf_counter()
        probs = self.predict(data)
        result: dict[str, Any] = {"n": len(data.ids), **classification_metrics(probs, data.labels, r.calibration_bins)}
        if r.noise_std > 0:
            noisy = self.predict(data, noise_std=r.noise_std, seed=self.config.train.seed)
            result["noisy_accuracy"] = classification_metrics(noisy, data.labels, r.calibration_bins)["accuracy"]
        if r.mc_samples >= 2:
            # Dropout masks come from the global torch RNG, as they did: its state after training.
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
        """Key–query MMD² per layer (mean over sentences and heads) on a seeded stratified sample of
        ``run.mmd_sentences`` movie-test sentences (the split file is ordered by label: a prefix
        would be nearly one class)."""
        data = self.encoded["movie_test"] if "movie_test" in self.encoded else self.encoded["movie_dev"]
        keep = mmd_sample(data.labels, self.config.run.mmd_sentences)
        ids = [data.ids[i] for i in keep]
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
        positive = int(data.labels[keep].sum())
        return {"mmd2_per_layer": (totals / heads).tolist(), "mmd2_sum_heads_layers": float(totals.sum()),
                "mmd_sentences": len(ids),
                "mmd_sample": {"kind": "stratified", "seed": MMD_SAMPLE_SEED, "negative": len(ids) - positive,
                               "positive": positive}}

    def evaluate_tests(self, log: Callable[[dict[str, Any]], None], step: int) -> dict[str, Any]:
        """Every test split and the alignment statistics; each split's metrics go to ``log`` as
        kind "test" of step ``step``."""
        result: dict[str, Any] = {"splits": {}}
        for name in self.config.run.test_splits:
            result["splits"][name] = self.evaluate_split(name)
            log({"kind": "test", "step": step, "split": name, **result["splits"][name]})
        result["alignment"] = self.alignment_statistics()
        return result


def run_one(config: SentimentConfig, run_dir: Path, sentences: dict[str, list[Any]] | None = None,
            resume: bool = False) -> dict[str, Any]:
    """Train (early-stopped on dev) with the Trainer, evaluate the best dev check's weights; writes
    ``result.json`` and returns it. ``resume``: continue a stopped run in ``run_dir`` exactly (the
    step times then cover the resumed part only)."""
    from vqa_align.train.trainer import train_from_config

    wall = time.perf_counter()
    task = SentenceTask(config, sentences)
    trainer = train_from_config(config, Path(run_dir), resume=resume, task=task)  # type: ignore[arg-type]
    if trainer.best_step is None:
        raise UserError(f"{run_dir}: no dev check was made (no training step), so there are no best weights")
    task.load_best(trainer.run_dir)
    evaluation = task.evaluate_tests(trainer.log, trainer.global_step)
    steps = np.array(trainer.step_seconds)
    result = {
        "method": config.model.alignment.method,
        "seed": config.train.seed,
        "steps": trainer.global_step,
        "best_dev_accuracy": trainer.best_accuracy,
        "best_step": trainer.best_step,
        # The first steps include one-off work (kernel builds, allocator warm-up): the median is robust.
        "step_seconds_median": float(np.median(steps)) if len(steps) else math.nan,
        "step_seconds_mean": float(steps.mean()) if len(steps) else math.nan,
        "step_cpu_seconds_median": float(np.median(trainer.step_cpu_seconds)) if len(steps) else math.nan,
        "threads": torch.get_num_threads(),
        "wall_seconds": time.perf_counter() - wall,
        **evaluation,
    }
    (Path(run_dir) / RESULT_FILE).write_text(json.dumps(result, indent=2))
    return result
