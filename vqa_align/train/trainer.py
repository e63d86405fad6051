"""The training engine: MCAN's recipe, alignment loss, checkpoints, resume, DDP, the quickstart.

Tasks. :class:`Trainer` is generic; what a task is (data, model, loss, evaluation, which metric
picks ``best``) sits behind :class:`TrainingTask`: :class:`VQATask` here, and the sentence
classifier of vqa_align/sentiment/runner.py, so both get one loop, one checkpoint format and one
resume machinery.

Loss. BCE-with-logits on the soft targets, summed over answers. ``train.loss_reduction``:
``sum`` also sums over the batch (MCAN's choice; Adam is invariant to the loss scale, so MCAN's
learning rates carry over unchanged) and ``mean`` averages over the batch. The alignment term
λ·D is a per-sample mean, so with ``sum`` it is multiplied by the batch size: λ keeps the meaning
"weight relative to the per-sample task loss" whatever the reduction.

Learning rate (MCAN): base × k/(W+1) in warm-up epoch k = 1..W, then base, multiplied by
``decay_factor`` at every epoch listed in ``decay_epochs`` (0-based epoch index >= listed value);
``train.warmup_steps`` multiplies it by a linear warm-up over the first optimizer steps.
``train.optimizer``: fused Adam (MCAN) or AdamW (sentence fine-tuning).

Evaluation and ``best``. At epoch ends (``train.eval_every_epochs``), or with
``train.eval_every_steps`` after every N steps and after the last one; each gain of the task's
selection metric writes ``checkpoints/best``, and ``train.patience`` evaluations in a row without
one stop the run.

Resume. The batch order of an epoch is a pure function of (seed, epoch); a checkpoint stores the
epoch, the number of batches already consumed, the epoch's running loss sums, the optimizer state,
the RNG states (as tensors: the file loads with ``weights_only=True``) and the length of
``metrics.jsonl`` at save time, so a resumed run continues exactly where the stopped one was: same
weights, same ``best``, same log lines (the ones the stopped run wrote after its checkpoint are
cut). ``best`` is saved before ``last``, each with the updated best accuracy.

Replacing a run (``--overwrite``) and what may change on ``--resume``: vqa_align/runs/run_folder.py.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from vqa_align.runs import run_folder
from vqa_align.runs.checkpoint import (TRAINER_STATE_FILE, WEIGHTS_FILE, CheckpointError, load_trainer_state,
                                  read_weights, recover_checkpoint, resolve_checkpoint, save_checkpoint)
from vqa_align.config import Config, load_config, save_config
from vqa_align.errors import DataFormatError, UserError
from vqa_align.train.host_memory import keep_freed_memory
from vqa_align.model.mcan import MCAN, MODEL_INPUTS

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
# Without a terminal (a log file, a job scheduler) a plain progress line replaces the tqdm bar.
PROGRESS_EVERY_SECONDS = 30.0
LOADER_SEED_STRIDE = 1_000_003  # loader generator seed = seed * stride + epoch (distinct per (seed, epoch))


class TrainingError(UserError, RuntimeError):
    """Training cannot continue (e.g. a non-finite loss); the last good checkpoint is kept."""


# ----------------------------------------------------------------------------------------------
# Small pure pieces
# ----------------------------------------------------------------------------------------------


def learning_rate(epoch: int, base_lr: float, warmup_epochs: int, decay_epochs: list[int], decay_factor: float) -> float:
    """MCAN's schedule for 0-based ``epoch``."""
    if epoch < warmup_epochs:
        return base_lr * (epoch + 1) / (warmup_epochs + 1)
    return base_lr * decay_factor ** sum(epoch >= d for d in decay_epochs)


def warmup_factor(step: int, warmup_steps: int) -> float:
    """``train.warmup_steps``: optimizer step ``step`` (1-based) runs at min(1, step / (W + 1)) of the rate."""
    return min(1.0, step / (warmup_steps + 1)) if warmup_steps > 0 else 1.0


def task_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
    """BCE-with-logits on soft targets, summed over answers; summed or averaged over the batch."""
    per_sample = F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none").sum(-1)  # (B,)
    return per_sample.sum() if reduction == "sum" else per_sample.mean()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """All RNG states as tensors and plain numbers (loadable with ``torch.load(weights_only=True)``)."""
    version, words, gauss = random.getstate()  # Mersenne Twister: 624 words + position, all < 2**32
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "words": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["words"].tolist()), py["gauss"]))
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


class SkipFirstBatches:
    """Wrap a batch sampler so that the first ``skip`` batches of the epoch are not produced."""

    def __init__(self, batch_sampler: Any, skip: int = 0):
        self.batch_sampler = batch_sampler
        self.skip = skip

    def __iter__(self) -> Iterator[list[int]]:
        for index, batch in enumerate(self.batch_sampler):
            if index >= self.skip:
                yield batch

    def __len__(self) -> int:
        return max(0, len(self.batch_sampler) - self.skip)


# ----------------------------------------------------------------------------------------------
# Distributed helpers (torchrun sets WORLD_SIZE / RANK / LOCAL_RANK)
# ----------------------------------------------------------------------------------------------


@dataclass
class DistInfo:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(world, int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")))
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(info.local_rank)
    return info


# ----------------------------------------------------------------------------------------------
# The task interface: what differs between VQA and sentence classification
# ----------------------------------------------------------------------------------------------


@dataclass
class TaskData:
    """What a task builds for the Trainer. ``labels`` (the answers, or the classes) and
    ``tokenizer`` go into every checkpoint; ``train_set`` / ``val_set`` are whatever the task's own
    ``loader`` and ``evaluate`` take."""

    model: torch.nn.Module  # on the CPU; the Trainer moves it to the device
    labels: list[str]
    tokenizer: Any
    train_set: Any
    val_set: Any = None
    # DDP: some parameters may get no gradient in a step (e.g. a frozen encoder's first epochs).
    unused_parameters: bool = False
    # Why train.cuda_graphs cannot capture this task's step (None: it can).
    graphs_refused: str | None = None


class TrainingTask(Protocol):
    """The task-specific half of a training run; :class:`Trainer` owns the generic half (epoch
    loop, learning rate, optimizer step, gradient accumulation, finiteness checks without host
    syncs, evaluation schedule, early stopping, ``best`` / ``last`` checkpoints with exact resume,
    run-folder staging, ``metrics.jsonl``, tensorboard, progress lines).

    Implementations: :class:`VQATask` (below) and :class:`vqa_align.sentiment.runner.SentenceTask`.
    A batch is a dict of tensors. The order of an epoch's batches must be a pure function of
    (seed, epoch), and nothing but the model's forward may draw from the global RNGs between
    steps: that is what makes a resumed run continue exactly.
    """

    # Key of evaluate()'s result whose maximum picks checkpoints/best and that train.patience watches.
    selection_metric: str

    def build(self, trainer: "Trainer", resume: bool) -> TaskData:
        """Data, vocabularies and model; called once, right after seeding (the model's random
        initialisation draws from the seeded RNGs)."""
        ...

    def loader(self, dataset: Any, shuffle: bool, epoch: int, skip: int, batch_size: int) -> Any:
        """A sized iterable of the batches of ``dataset`` (shuffled: epoch ``epoch``'s order),
        without the first ``skip``."""
        ...

    def inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model's forward keyword arguments, on the trainer's device."""
        ...

    def targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ...

    def losses(self, output: Any, targets: torch.Tensor, reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(task loss, alignment loss) of a forward's ``output``; the task loss summed or averaged
        over the batch as ``reduction`` says, the alignment loss a per-sample mean."""
        ...

    def batch_ids(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Ids of the batch's samples (images, sentences): a non-finite loss names them."""
        ...

    def describe_batch(self, ids: list[int]) -> tuple[str, str]:
        """(what the batch holds, e.g. "images 3, 5"; a found cause, e.g. "; features of image 5
        ... are not finite", or "")."""
        ...

    def start_epoch(self, epoch: int) -> bool:
        """Before each epoch; True when the set of trained parameters changed (CUDA graphs are
        captured again)."""
        ...

    def evaluate(self, dataset: Any = None, batch_size: int | None = None) -> dict[str, float]:
        """Metrics on ``dataset`` (default: the validation data); {} when there is nothing to score."""
        ...

    def checkpoint_meta(self) -> dict[str, Any]:
        """Task entries of every checkpoint's meta.json (e.g. the feature extractor)."""
        ...

    def check_resume(self, checkpoint: Path) -> None:
        """Refuse to resume ``checkpoint`` when the task's data changed in a way the config does not show."""
        ...

    def static_inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``inputs`` padded to fixed shapes (CUDA graphs; only asked when graphs_refused is None)."""
        ...


class VQATask:
    """VQA: questions and region features -> scores of the answer vocabulary (MCAN), trained with
    BCE on soft targets, evaluated (and ``best`` picked) with the official accuracy on val."""

    selection_metric = "val_accuracy"

    def __init__(self, config: Config):
        self.config = config
        self.extractor: Any = None  # what made the features; every checkpoint records it
        self._resident: dict[int, Any] = {}  # id(dataset) -> ResidentSplit (data.resident)
        self._scores: dict[int, Any] = {}  # id(dataset) -> vqa_data.OfficialScores

    def build(self, trainer: "Trainer", resume: bool) -> TaskData:
        from vqa_align.data.loaders import build_data

        config, tcfg = self.config, self.config.train
        self.trainer = trainer
        tokenizer = answers = warm = None
        if tcfg.init_from:  # vqa_align/train/warm_start.py: the source's architecture, tokenizer and answers
            from vqa_align.train.warm_start import prepare_warm_start

            warm = prepare_warm_start(config, trainer.run_dir if resume else None)
            tokenizer, answers = warm.tokenizer, warm.answers
        elif config.model.question_encoder == "minilm":
            from vqa_align.model.question_encoders import load_minilm_tokenizer

            tokenizer = load_minilm_tokenizer()  # WordPiece ids, [PAD] = 0
        bundle = build_data(config.data, ["train", "val"], tokenizer=tokenizer, answers=answers)
        self.tokenizer = bundle.tokenizer
        self.extractor = bundle.store.extractor
        train_set, val_set = bundle.datasets["train"], bundle.datasets.get("val")
        if len(train_set) == 0:
            raise UserError("the training split has no questions")
        config.model.vocab_size = len(bundle.tokenizer)
        config.model.num_answers = len(bundle.answers)
        feature_dim = bundle.feature_dim
        self.answer_types = {
            r.question_id: r.answer_type or "unknown" for ds in bundle.datasets.values() for r in ds.records
        }
        if config.model.feature_dim != feature_dim:
            raise UserError(
                f"model.feature_dim is {config.model.feature_dim} but the feature store has D={feature_dim}; "
                f"set --set model.feature_dim={feature_dim}"
            )

        model = MCAN(config.model)
        if warm is not None and not resume:
            from vqa_align.train.warm_start import apply_warm_start

            apply_warm_start(model, warm)
        elif config.model.glove_path and not resume:
            self._init_glove(model, config.model.glove_path)
        self.model = model
        # Parameters frozen for the first epochs (MiniLM) get no gradient then.
        freezes = config.model.question_encoder == "minilm" and config.model.minilm_freeze_epochs > 0
        # The Hugging Face encoder has data-dependent checks (host syncs) that capture forbids.
        refused = None if config.model.question_encoder == "lstm" else "train.cuda_graphs supports model.question_encoder: lstm only"
        return TaskData(model, bundle.answers, bundle.tokenizer, train_set, val_set, freezes, refused)

    def _init_glove(self, model: MCAN, path: str) -> None:
        """Initialise the word embedding from a local GloVe-format file (words not in it stay random)."""
        from vqa_align.model.mcan import load_glove_embeddings

        embedding = getattr(model.question_encoder, "embedding", None)
        if embedding is None:
            raise UserError("model.glove_path needs model.question_encoder: lstm (it has a word embedding)")
        try:
            found = load_glove_embeddings(path, self.tokenizer.get_vocab(), embedding)
        except ValueError as err:
            raise UserError(str(err)) from None
        vocab = len(self.tokenizer)
        print(f"GloVe: {found} of {vocab} vocabulary words initialised from {path}", file=sys.stderr)

    def loader(self, dataset: Any, shuffle: bool, epoch: int, skip: int, batch_size: int) -> Any:
        from vqa_align.data.loaders import RegionBucketBatchSampler, VQALoader, collate_for_workers

        trainer, dcfg = self.trainer, self.config.data
        sampler = RegionBucketBatchSampler(
            dataset.region_counts,
            batch_size=batch_size,
            shuffle=shuffle,
            seed=self.config.train.seed,
            drop_last=False,
            num_replicas=trainer.dist.world_size if shuffle else 1,
            rank=trainer.dist.rank if shuffle else 0,
            bucket=dcfg.bucket_by_regions,
        )
        sampler.set_epoch(epoch)
        if dcfg.resident:
            from vqa_align.data.resident import ResidentLoader, ResidentSplit

            if id(dataset) not in self._resident:  # loaded once per split, kept for the run
                self._resident[id(dataset)] = ResidentSplit(dataset, trainer.device)
            return ResidentLoader(self._resident[id(dataset)], SkipFirstBatches(sampler, skip))
        workers = dcfg.num_workers
        if workers > 0:
            dataset.store.close()  # every worker opens its own HDF5 handle after fork
        return VQALoader(  # float16 features from the workers, float32 in the main process
            dataset,
            batch_sampler=SkipFirstBatches(sampler, skip),
            collate_fn=collate_for_workers,
            num_workers=workers,
            pin_memory=dcfg.pin_memory and trainer.device.type == "cuda",
            persistent_workers=False,
            # Its own generator: a DataLoader iterator otherwise draws its worker base seed from the
            # global RNG, one extra draw whenever a resumed run restarts an epoch mid-way.
            generator=torch.Generator().manual_seed(self.config.train.seed * LOADER_SEED_STRIDE + epoch),
        )

    def inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: batch[k].to(self.trainer.device, non_blocking=True) for k in MODEL_INPUTS}

    def targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["targets"].to(self.trainer.device, non_blocking=True)

    def losses(self, output: Any, targets: torch.Tensor, reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
        return task_loss(output.logits, targets, reduction), output.alignment_loss.float()

    def batch_ids(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["image_ids"]

    def describe_batch(self, ids: list[int]) -> tuple[str, str]:
        shown = ", ".join(map(str, ids[:8])) + (f" and {len(ids) - 8} more" if len(ids) > 8 else "")
        train_set = self.trainer.train_set
        bad = _non_finite_images(train_set, ids)
        cause = f"; features of image {bad[0]} in {train_set.store.path} are not finite (Inf or NaN)" if bad else ""
        return f"images {shown}", cause

    def start_epoch(self, epoch: int) -> bool:
        set_frozen = getattr(self.model.question_encoder, "set_frozen", None)
        if set_frozen is None:
            return False
        set_frozen(epoch < self.config.model.minilm_freeze_epochs)
        return True  # captured graphs would keep the previous epoch's frozen set

    @torch.no_grad()
    def evaluate(self, dataset: Any = None, batch_size: int | None = None) -> dict[str, float]:
        """Official VQA accuracy of the top-1 answers (overall and per answer type; the scores of
        ``vqa_data.OfficialScores``, not the soft targets) and the validation loss."""
        trainer = self.trainer
        dataset = dataset if dataset is not None else trainer.val_set
        if dataset is None or len(dataset) == 0 or not dataset.has_targets:
            return {}
        model, device, amp = self.model, trainer.device, trainer.amp_dtype
        model.eval()
        loader = trainer._loader(dataset, False, 0, 0, batch_size or max(self.config.train.batch_size, 256))
        total, loss_sum, n = 0.0, 0.0, 0
        per_type: dict[str, list[float]] = {}
        answer_types = self.answer_types
        scores = self._official_scores(dataset)
        for batch in loader:
            _check_finite_features(batch, dataset)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                logits = model(**self.inputs(batch)).logits.float()
            targets = batch["targets"].to(device)
            qids = batch["question_ids"].tolist()
            acc = scores(qids, logits.argmax(-1).tolist())
            loss_sum += task_loss(logits, targets, "sum").item()
            total += sum(acc)
            n += len(acc)
            for qid, a in zip(qids, acc):
                per_type.setdefault(answer_types.get(qid, "unknown"), []).append(a)
        model.train()
        result = {"val_accuracy": 100.0 * total / max(n, 1), "val_loss": loss_sum / max(n, 1)}
        for kind, values in sorted(per_type.items()):
            result[f"val_accuracy/{kind}"] = 100.0 * sum(values) / len(values)
        return result

    def _official_scores(self, dataset: Any) -> Any:
        """The split's official score table, built once per split (string rules, CPU)."""
        from vqa_align.data.vqa_v2 import OfficialScores

        if id(dataset) not in self._scores:
            self._scores[id(dataset)] = OfficialScores(dataset.records, self.trainer.answers)
        return self._scores[id(dataset)]

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"extractor": json.loads(self.extractor.to_json()) if self.extractor is not None else None}

    def check_resume(self, checkpoint: Path) -> None:
        from vqa_align.runs.checkpoint import checkpoint_extractor

        recorded = checkpoint_extractor(checkpoint)
        if recorded is not None and (self.extractor is None or recorded.key() != self.extractor.key()):
            now = self.extractor.describe() if self.extractor is not None else "an unrecorded extractor"
            raise UserError(f"--resume: {checkpoint} was trained on features of {recorded.describe()}, "
                            f"but the store now comes from {now}")

    def static_inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from vqa_align.train.cuda_graphs import pad_to_static

        dcfg = self.config.data
        return pad_to_static(inputs, dcfg.max_question_tokens, dcfg.max_regions)


def build_optimizer(parameters: Any, tcfg: Any, device: torch.device) -> torch.optim.Optimizer:
    """``train.optimizer``: fused Adam (MCAN) or torch's default AdamW (sentence fine-tuning)."""
    # For CUDA graphs capturable, with the learning rate a device tensor that _set_lr updates in
    # place (a float would be frozen into the graph).
    lr = torch.tensor(tcfg.lr, device=device) if tcfg.cuda_graphs else tcfg.lr
    options = {"lr": lr, "betas": tuple(tcfg.betas), "eps": tcfg.eps, "weight_decay": tcfg.weight_decay}
    if tcfg.optimizer == "adamw":
        return torch.optim.AdamW(parameters, capturable=tcfg.cuda_graphs, **options)
    # The fused Adam kernel (CPU and CUDA): on the 2-core CPU it updates MCAN-small's 57.6 M
    # parameters in 71 ms instead of 239 ms (foreach).
    return torch.optim.Adam(parameters, fused=True, capturable=tcfg.cuda_graphs, **options)


# ----------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------


class Trainer:
    """Owns the model, optimizer, data and run folder of one training run; the task (VQA by
    default) says what the data, model, loss and evaluation are."""

    def __init__(self, config: Config, run_dir: str | Path, resume: bool = False, dist_info: DistInfo | None = None,
                 replaces: str | Path | None = None, task: TrainingTask | None = None):
        """``replaces``: the run folder this run will replace once its first checkpoint is written
        (``run_dir`` is then the staged sibling it trains in; vqa_align/runs/run_folder.py).
        ``task``: default :class:`VQATask` of ``config``."""
        self.config = config
        self.run_dir = Path(run_dir)
        self.replaces = Path(replaces) if replaces is not None else None
        self.dist = dist_info or DistInfo()
        tcfg = config.train
        self.device = resolve_device(tcfg.device)
        if self.dist.world_size > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.amp_dtype = autocast_dtype(tcfg.precision, self.device)
        if tcfg.keep_freed_memory and self.device.type == "cpu":
            keep_freed_memory()
        seed_everything(tcfg.seed)

        self.task: TrainingTask = task if task is not None else VQATask(config)
        built = self.task.build(self, resume)
        self.model, self.answers, self.tokenizer = built.model, built.labels, built.tokenizer
        self.train_set, self.val_set = built.train_set, built.val_set
        self.model.to(self.device)
        self.ddp_model: torch.nn.Module = self.model
        if self.dist.world_size > 1:
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=built.unused_parameters,
            )
        if tcfg.cuda_graphs and (self.device.type != "cuda" or self.dist.world_size > 1):
            raise UserError("train.cuda_graphs needs one CUDA device (train.device: cuda, no torchrun with several processes)")
        if tcfg.cuda_graphs and built.graphs_refused:
            raise UserError(built.graphs_refused)
        self.optimizer = build_optimizer(self.model.parameters(), tcfg, self.device)
        self._graphed = None  # GraphedTrainStep, built at the first training step (train.cuda_graphs)
        self.epoch = 0  # epoch in progress (0-based)
        self.batches_done = 0  # batches of that epoch already consumed
        self.global_step = 0  # optimizer steps
        self.best_accuracy = -1.0  # best value of the task's selection metric so far
        self.best_step: int | None = None  # the step of that evaluation
        self.checks_without_gain = 0  # evaluations since the last gain (train.patience)
        self.history: list[dict[str, Any]] = []
        # Wall and CPU (summed over threads) seconds of each optimizer step of this process.
        self.step_seconds: list[float] = []
        self.step_cpu_seconds: list[float] = []
        self._epoch_sums: tuple[torch.Tensor, int] = (torch.zeros(3, dtype=torch.float64), 0)
        self._resumed_sums: tuple[torch.Tensor, int] | None = None  # the epoch's loss sums at the checkpoint
        self._recent_images: dict[int, torch.Tensor] = {}  # batch number -> sample ids, since the last check
        if resume:
            self._load_trainer_state()
        self._tensorboard = None
        if self.dist.is_main:
            created = not self.run_dir.exists()
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if created or not resume:
                run_folder.mark_run_folder(self.run_dir)
            save_config(config, self.run_dir / "config.yaml")
            # A resumed run rewrites the steps after its checkpoint: drop the stopped run's events there.
            self._tensorboard = _maybe_tensorboard(self.run_dir / "tensorboard",
                                                   self.global_step + 1 if resume else None)

    @property
    def extractor(self) -> Any:
        """What made the features (VQA; None for other tasks)."""
        return getattr(self.task, "extractor", None)

    # -- data ------------------------------------------------------------------------------

    def _loader(self, dataset: Any, shuffle: bool, epoch: int, skip: int, batch_size: int) -> Any:
        return self.task.loader(dataset, shuffle, epoch, skip, batch_size)

    def _inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.task.inputs(batch)

    # -- one epoch -------------------------------------------------------------------------

    def _set_lr(self) -> float:
        """The epoch schedule (warm-up epochs, decays), times the step warm-up of the next step."""
        t = self.config.train
        lr = learning_rate(self.epoch, t.lr, t.warmup_epochs, t.decay_epochs, t.decay_factor)
        if t.warmup_steps:
            lr *= warmup_factor(self.global_step + 1, t.warmup_steps)
        for group in self.optimizer.param_groups:
            if not t.cuda_graphs:
                group["lr"] = lr  # also replaces a tensor lr resumed from a CUDA-graph run
            elif isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)  # in place: captured graphs read this tensor
            else:
                group["lr"] = torch.tensor(lr, device=self.device)
        return lr

    def train_epoch(self) -> dict[str, float]:
        from tqdm import tqdm

        tcfg = self.config.train
        lr = self._set_lr()
        if self.task.start_epoch(self.epoch):
            self._graphed = None
        loader = self._loader(self.train_set, True, self.epoch, self.batches_done, tcfg.batch_size)
        self.ddp_model.train()
        use_bar = self.dist.is_main and (sys.stderr.isatty() or "VQA_ALIGN_PROGRESS" in os.environ)
        epoch_batches = len(loader) + self.batches_done
        bar = tqdm(
            loader,
            total=epoch_batches,
            initial=self.batches_done,
            desc=f"epoch {self.epoch + 1}/{tcfg.epochs}",
            disable=not use_bar,
            dynamic_ncols=True,
        )
        progress = ProgressLines(self, epoch_batches) if self.dist.is_main and not use_bar else None
        # Running sums stay on the device and the finiteness check is deferred to log steps,
        # evaluations, checkpoints and the epoch end: no host sync per step (on a GPU each one
        # stalls the launch queue). The first non-finite step is remembered, so the error still names it.
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss, task, alignment
        samples = 0
        if self._resumed_sums is not None:  # the batches before the checkpoint count in the epoch's mean
            sums, samples = self._resumed_sums[0].to(self.device), self._resumed_sums[1]
            self._resumed_sums = None
        self._epoch_sums = (sums, samples)
        self._recent_images = {}
        self._first_bad = torch.full((3,), -1.0, dtype=torch.float64, device=self.device)  # step, batch, loss
        window_start, window_samples = time.perf_counter(), 0
        accum = tcfg.grad_accumulation
        # With accumulation, a window steps with the gradient of one batch of the samples it holds
        # (mean reduction: their mean; sum: batch_size x their mean, as a full window): each backward
        # is weighted for a full window of accum x batch_size samples, and a window that holds
        # another number (the epoch's last, or one with a short batch) is rescaled at its step.
        full_window, accum_samples = accum * tcfg.batch_size, 0
        step_start = (time.perf_counter(), time.process_time())
        self.optimizer.zero_grad(set_to_none=True)
        for batch in bar:
            if self.batches_done % accum == 0:  # a window (an optimizer step) begins
                step_start = (time.perf_counter(), time.process_time())
                if tcfg.warmup_steps:
                    lr = self._set_lr()
            inputs = self._inputs(batch)
            targets = self.task.targets(batch)
            batch_size = targets.shape[0]
            graphed = tcfg.cuda_graphs
            if graphed:  # forward, backward and optimizer step in one replay (vqa_align/train/cuda_graphs.py)
                loss, task, align = self._graphed_step(inputs, targets)
            else:
                loss, task, align = self._losses(self.ddp_model, inputs, targets)
            here = torch.stack([  # filled on the device: no host-to-device copy
                torch.full((), float(self.global_step + 1), dtype=torch.float64, device=self.device),
                torch.full((), float(self.batches_done + 1), dtype=torch.float64, device=self.device),
                loss.detach().double(),
            ])
            is_first_bad = ~torch.isfinite(loss.detach()) & (self._first_bad[0] < 0)
            self._first_bad = torch.where(is_first_bad, here, self._first_bad)
            self._recent_images[self.batches_done + 1] = self.task.batch_ids(batch)  # to name them if it was bad
            self.batches_done += 1
            if graphed:
                self.global_step += 1
            else:
                # mean reduction: a batch's loss is a mean, so it counts by its size.
                size_weight = batch_size / tcfg.batch_size if accum > 1 and tcfg.loss_reduction == "mean" else 1.0
                (loss * (size_weight / accum)).backward()
                accum_samples += batch_size
                if self.batches_done % accum == 0:
                    self._optimizer_step(full_window / accum_samples if accum > 1 else 1.0)
                    accum_samples = 0
            stepped = self.batches_done % accum == 0
            if stepped:
                self.step_seconds.append(time.perf_counter() - step_start[0])
                self.step_cpu_seconds.append(time.process_time() - step_start[1])
            per_sample = 1.0 / batch_size if tcfg.loss_reduction == "sum" else 1.0
            sums += torch.stack([loss.detach() * per_sample, task.detach() * per_sample, align.detach()]).double() * batch_size
            samples += batch_size
            self._epoch_sums = (sums, samples)
            window_samples += batch_size
            if progress is not None:
                progress.step(batch_size)
            if self.global_step % tcfg.log_every_steps == 0 and stepped:
                self._raise_if_non_finite()
                elapsed = time.perf_counter() - window_start
                record = {
                    "kind": "train",
                    "epoch": self.epoch + 1,
                    "step": self.global_step,
                    "loss": loss.item() * per_sample,
                    "task_loss": task.item() * per_sample,
                    "alignment_loss": align.item(),
                    "lr": lr,
                    "samples_per_s": window_samples / max(elapsed, 1e-9),
                }
                self._log(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", align=f"{record['alignment_loss']:.3f}", lr=f"{lr:.1e}",
                                sps=f"{record['samples_per_s']:.0f}")
                window_start, window_samples = time.perf_counter(), 0
            reached_max = tcfg.max_steps is not None and self.global_step >= tcfg.max_steps
            if stepped and tcfg.eval_every_steps and (self.global_step % tcfg.eval_every_steps == 0 or reached_max):
                self._raise_if_non_finite()
                self._evaluate_mid_epoch()
            every = tcfg.checkpoint_every_steps
            if every and self.global_step and self.global_step % every == 0 and stepped:
                self._raise_if_non_finite()
                self.save("last")
            if reached_max or self._patience_spent():
                break
        self._raise_if_non_finite()
        if self.batches_done % accum:
            self._optimizer_step(full_window / accum_samples)
        loss_sum, task_sum, align_sum = sums.tolist()
        n = max(samples, 1)
        return {"train_loss": loss_sum / n, "train_task_loss": task_sum / n, "train_alignment_loss": align_sum / n,
                "lr": lr}

    def _graphed_step(self, inputs: dict[str, torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One training step through :class:`~vqa_align.train.cuda_graphs.GraphedTrainStep` -> (loss, task, align)."""
        from vqa_align.train.cuda_graphs import GraphedTrainStep

        if self._graphed is None:
            self._graphed = GraphedTrainStep(self._whole_step, lambda: self.optimizer.zero_grad(set_to_none=True))
        return self._graphed(self.task.static_inputs(inputs), targets)

    def _losses(
        self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], targets: torch.Tensor, autocast_cache: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, task loss, alignment loss) of one batch: L = L_task + λ·scale·L_align, where scale is
        the batch size for the summed task loss, so that λ keeps its per-sample meaning."""
        tcfg = self.config.train
        amp = self.amp_dtype
        with torch.autocast(self.device.type, dtype=amp, enabled=amp is not None, cache_enabled=autocast_cache):
            out = model(**inputs)
        task, align = self.task.losses(out, targets, tcfg.loss_reduction)
        align_scale = targets.shape[0] if tcfg.loss_reduction == "sum" else 1.0
        return task + self.config.model.alignment.weight * align_scale * align, task, align

    def _whole_step(self, inputs: dict[str, torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Forward, loss, backward, clipping and the optimizer update, with no host sync (capturable)."""
        tcfg = self.config.train
        # The autocast weight cache must be off while capturing (cached casts would go stale).
        loss, task, align = self._losses(self.model, inputs, targets, autocast_cache=False)
        loss.backward()
        if tcfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), tcfg.grad_clip, foreach=True)
        self.optimizer.step()
        return loss.detach(), task.detach(), align.detach()

    def _raise_if_non_finite(self) -> None:
        """Stop (one host sync) if any step since the epoch began had a non-finite loss; the error
        names the batch's samples, a cause the task finds among them, and what is kept."""
        step, batch, value = self._first_bad.tolist()
        if step < 0:
            self._recent_images.clear()  # all good up to here
            return
        ids = self._recent_images.get(int(batch))
        what, cause = self.task.describe_batch(ids.tolist() if ids is not None else [])
        raise TrainingError(
            f"non-finite loss {value} at epoch {self.epoch + 1}, step {int(step)} (batch {int(batch)}, "
            f"{what}){cause}; {self._what_is_kept()}"
        )

    def _what_is_kept(self) -> str:
        if self.replaces is not None:
            return f"nothing was replaced: the previous run in {self.replaces} is kept"
        last = self.run_dir / "checkpoints" / "last"
        if (last / WEIGHTS_FILE).is_file():
            return f"the last good checkpoint {last} is kept"
        return "no checkpoint had been written yet"

    def _optimizer_step(self, grad_scale: float = 1.0) -> None:
        if grad_scale != 1.0:  # the window held other than accumulation x batch_size samples
            torch._foreach_mul_([p.grad for p in self.model.parameters() if p.grad is not None], grad_scale)
        clip = self.config.train.grad_clip
        if clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1

    def evaluate(self, dataset: Any = None, batch_size: int | None = None) -> dict[str, float]:
        """The task's metrics on ``dataset`` (default: the validation data)."""
        return self.task.evaluate(dataset, batch_size)

    # -- evaluations, best, early stopping ------------------------------------------------

    def _note_score(self, score: float | None) -> bool:
        """Count one evaluation of the selection metric: True when it beats the best so far."""
        if score is None:
            return False
        improved = score > self.best_accuracy
        if improved:
            self.best_accuracy, self.best_step, self.checks_without_gain = score, self.global_step, 0
        else:
            self.checks_without_gain += 1
        return improved

    def _patience_spent(self) -> bool:
        patience = self.config.train.patience
        return bool(patience) and self.checks_without_gain >= patience

    def _evaluate_mid_epoch(self) -> None:
        """An evaluation after a step (train.eval_every_steps): logged as kind "eval"; a gain
        writes checkpoints/best at once (its weights are those of this step)."""
        metrics = self.evaluate()
        improved = self._note_score(metrics.get(self.task.selection_metric))
        self._log({"kind": "eval", "epoch": self.epoch + 1, "step": self.global_step, **metrics, "improved": improved})
        if improved and self.dist.is_main:
            self.save("best")
        self.ddp_model.train()

    # -- the loop --------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        tcfg = self.config.train
        while self.epoch < tcfg.epochs and not self._patience_spent():  # spent: a resumed finished run
            start = time.perf_counter()
            train_stats = self.train_epoch()
            stopped_early = (tcfg.max_steps is not None and self.global_step >= tcfg.max_steps) or self._patience_spent()
            epoch_done = not stopped_early or self.batches_done >= self._batches_per_epoch()
            record = {"kind": "epoch", "epoch": self.epoch + 1, "step": self.global_step,
                      "epoch_seconds": time.perf_counter() - start, **train_stats}
            if epoch_done:
                self.epoch += 1
                self.batches_done = 0
            if tcfg.eval_every_steps:
                # Evaluations follow steps; the last step of a run that was not stopped is evaluated too.
                if epoch_done and self.epoch == tcfg.epochs and not stopped_early and self.global_step % tcfg.eval_every_steps:
                    self._evaluate_mid_epoch()
            elif epoch_done and (self.epoch % tcfg.eval_every_epochs == 0 or self.epoch == tcfg.epochs):
                record.update(self.evaluate())
            self._log(record)
            self.history.append(record)
            # best first, then last, both with the updated best accuracy: a kill between the
            # two resumes from the previous last, which reaches the same accuracy again.
            improved = self._note_score(record.get(self.task.selection_metric))
            if self.dist.is_main:
                if improved:
                    self.save("best")
                self.save("last")
                _plot_curves(self.run_dir / METRICS_FILE, self.run_dir / CURVES_FILE, self.task.selection_metric)
            if stopped_early:
                break
        if self.replaces is not None and self.dist.is_main:  # finished without any checkpoint
            self._swap_in()
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        return self.history[-1] if self.history else {}

    def _batches_per_epoch(self) -> int:
        return len(self._loader(self.train_set, True, self.epoch, 0, self.config.train.batch_size))

    # -- persistence -----------------------------------------------------------------------

    def save(self, name: str) -> Path:
        metrics = self.run_dir / METRICS_FILE
        sums, samples = self._epoch_sums
        if self.batches_done == 0:  # at an epoch boundary the next epoch starts from zero
            sums, samples = torch.zeros(3, dtype=torch.float64), 0
        state = {
            "optimizer": self.optimizer.state_dict(),
            "schedule": {"epoch": self.epoch, "lr": self.optimizer.param_groups[0]["lr"]},
            "rng": rng_state(),
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "global_step": self.global_step,
            "best_accuracy": self.best_accuracy,
            "best_step": self.best_step,
            "checks_without_gain": self.checks_without_gain,
            "epoch_loss_sums": sums.detach().cpu().clone(),  # (3,) loss, task, alignment summed over samples
            "epoch_samples": samples,
            "metrics_bytes": metrics.stat().st_size if metrics.is_file() else 0,
        }
        meta = {"epoch": self.epoch, "global_step": self.global_step, "best_val_accuracy": self.best_accuracy,
                "last": self.history[-1] if self.history else None, **self.task.checkpoint_meta()}
        save_checkpoint(self.run_dir / "checkpoints" / name, self.model, self.config, self.answers,
                        self.tokenizer, state, meta)
        if self.replaces is not None and name == "last":
            self._swap_in()
        return self.run_dir / "checkpoints" / name

    def _swap_in(self) -> None:
        """The first checkpoint exists: the staged run takes the place of the run it replaces."""
        out, staged = self.replaces, self.run_dir
        run_folder.commit_staged_run(staged, out)
        self.run_dir, self.replaces = out, None
        if self._tensorboard is not None:  # its open event file moved with the folder; new ones go there too
            self._tensorboard.close()
            self._tensorboard = _maybe_tensorboard(out / "tensorboard")

    def _load_trainer_state(self) -> None:
        ckpt = recover_checkpoint(self.run_dir / "checkpoints" / "last")
        if ckpt is None or not (ckpt / TRAINER_STATE_FILE).is_file():
            raise UserError(f"--resume: no checkpoint to resume in {self.run_dir / 'checkpoints' / 'last'}")
        self.task.check_resume(ckpt)
        weights, _ = read_weights(ckpt / WEIGHTS_FILE, self.device)
        try:
            self.model.load_state_dict(weights)
        except RuntimeError as err:  # shapes: the run's config was edited, or weights of another run
            first = str(err).strip().splitlines()
            detail = next((line.strip() for line in first if "size mismatch" in line or "Missing" in line
                           or "Unexpected" in line), first[0] if first else "")
            raise CheckpointError(f"--resume: {ckpt / WEIGHTS_FILE} does not match the run's config ({detail})") from None
        # On the CPU: RNG states must be CPU tensors; the optimizer moves its state to the parameters.
        state = load_trainer_state(ckpt / TRAINER_STATE_FILE, "cpu")
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.epoch, self.batches_done = int(state["epoch"]), int(state["batches_done"])
            self.global_step, self.best_accuracy = int(state["global_step"]), float(state["best_accuracy"])
            # Absent from checkpoints written before evaluations by steps and early stopping existed.
            best_step = state.get("best_step")
            self.best_step = int(best_step) if best_step is not None else None
            self.checks_without_gain = int(state.get("checks_without_gain", 0))
            set_rng_state(state["rng"])
            sums, samples = state["epoch_loss_sums"], int(state["epoch_samples"])
            metrics_bytes = int(state["metrics_bytes"])
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise CheckpointError(
                f"--resume: {ckpt / TRAINER_STATE_FILE} is not a trainer state of this vqa-align version "
                f"({type(err).__name__}: {err})"
            ) from None
        if self.batches_done:
            self._resumed_sums = (sums.to(torch.float64), samples)
        if self.dist.is_main:
            self.history = _truncate_metrics(self.run_dir / METRICS_FILE, metrics_bytes)

    def _log(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        record = {"time": time.time(), **record}
        with open(self.run_dir / METRICS_FILE, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._tensorboard is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("time", "step", "epoch"):
                    self._tensorboard.add_scalar(f"{record['kind']}/{key}", value, record["step"])


def _maybe_tensorboard(folder: Path, purge_step: int | None = None) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional
        return None
    return SummaryWriter(str(folder), purge_step=purge_step)


def _truncate_metrics(path: Path, size: int) -> list[dict[str, Any]]:
    """Cut ``metrics.jsonl`` back to its length at the checkpoint (the stopped run may have logged
    steps after it, which the resumed run logs again); returns its epoch records (the history)."""
    if not path.is_file():
        return []
    if path.stat().st_size > size:
        with open(path, "r+b") as handle:
            handle.truncate(size)
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill mid-write (not before a checkpoint: ignored)
    return [r for r in records if isinstance(r, dict) and r.get("kind") == "epoch"]


def _non_finite_images(dataset: Any, image_ids: list[int]) -> list[int]:
    """Those of ``image_ids`` whose stored features contain Inf or NaN (read again from the store)."""
    bad = []
    store = dataset.store
    for image_id in dict.fromkeys(image_ids):
        try:
            features, _ = store.read_row(store.row(image_id), dataset.max_regions)
        except (KeyError, OSError):
            continue
        if not np.isfinite(np.asarray(features, dtype=np.float32)).all():
            bad.append(image_id)
    return bad


def _check_finite_features(batch: dict[str, torch.Tensor], dataset: Any) -> None:
    """Inf/NaN features would turn the validation loss into NaN and the run into a silent failure."""
    features = batch["features"]  # (B, N, D)
    finite = torch.isfinite(features).flatten(1).all(1)  # (B,)
    if not bool(finite.all()):
        image_id = int(batch["image_ids"][int((~finite).nonzero()[0, 0])])
        raise DataFormatError(
            f"{dataset.store.path}: features of image {image_id} are not finite (Inf or NaN); "
            f"fix or re-extract that image's features"
        )


class ProgressLines:
    """Plain progress lines on stderr for logs without a terminal (every PROGRESS_EVERY_SECONDS):
    epoch, step, samples/s and the ETA of the run's remaining training batches."""

    def __init__(self, trainer: "Trainer", epoch_batches: int):
        tcfg = trainer.config.train
        self.trainer = trainer
        self.epoch_batches = epoch_batches
        total = tcfg.epochs * epoch_batches
        if tcfg.max_steps is not None:
            total = min(total, tcfg.max_steps * tcfg.grad_accumulation)
        self.total = total
        self.start = self.last = time.perf_counter()
        self.batches = self.samples = 0
        self.first = True

    def step(self, batch_size: int) -> None:
        self.batches += 1
        self.samples += batch_size
        now = time.perf_counter()
        if not self.first and now - self.last < PROGRESS_EVERY_SECONDS:
            return
        self.first, self.last = False, now
        t = self.trainer
        elapsed = max(now - self.start, 1e-9)
        done = t.epoch * self.epoch_batches + t.batches_done
        eta = (self.total - done) * elapsed / self.batches
        print(
            f"epoch {t.epoch + 1}/{t.config.train.epochs} batch {t.batches_done}/{self.epoch_batches} "
            f"step {t.global_step} | {self.samples / elapsed:.1f} samples/s | ETA {_clock(max(eta, 0.0))}",
            file=sys.stderr, flush=True,
        )


def _clock(seconds: float) -> str:
    whole = int(round(seconds))
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def _plot_curves(metrics_file: Path, out: Path, metric: str = "val_accuracy") -> None:
    """Training loss, alignment loss and the selection metric (validation accuracy) against steps, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics_file.is_file():
        return
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    train = [r for r in records if r["kind"] == "train"]
    epochs = [r for r in records if r["kind"] in ("epoch", "eval") and metric in r]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    axes[0].plot([r["step"] for r in train], [r["task_loss"] for r in train])
    axes[0].set(title="task loss (per sample)", xlabel="step")
    axes[1].plot([r["step"] for r in train], [r["alignment_loss"] for r in train], color="tab:orange")
    axes[1].set(title="alignment loss", xlabel="step")
    axes[2].plot([r["step"] for r in epochs], [r[metric] for r in epochs], marker="o", color="tab:green")
    axes[2].set(title=f"{metric.replace('_', ' ')} (%)", xlabel="step")
    fig.tight_layout()
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, out)


# ----------------------------------------------------------------------------------------------
# Command-line entry points
# ----------------------------------------------------------------------------------------------


def prepare_run_dir(out: Path, resume: bool, overwrite: bool, config: Config | None = None) -> Path | None:
    """Refuse to mix runs: an existing run folder needs --resume or --overwrite. Deletes nothing:
    returns the staged folder a replacing run trains in (None: train in ``out``)."""
    run_folder.recover_run_swap(out)
    if resume:
        if recover_checkpoint(out / "checkpoints" / "last") is None:
            raise UserError(f"--resume: {out} holds no run to resume (no checkpoints/last)")
        if config is not None:
            run_folder.check_resume_config(out / "config.yaml", config.to_dict())
        return None
    if not run_folder.holds_run(out):
        return None
    if not overwrite:
        raise UserError(f"{out} already holds a run; pass --resume to continue it or --overwrite to replace it")
    run_folder.check_replaceable(out)
    return run_folder.begin_staged_run(out)


def train_from_config(config: Config, out: Path, resume: bool = False, overwrite: bool = False,
                      task: TrainingTask | None = None) -> Trainer:
    """Train into ``out``. With ``overwrite`` an existing run is replaced only once the new run has
    its first checkpoint (until then, and if anything fails before, the old run is untouched).
    ``task``: default VQA (its config changes on ``resume`` are checked against the run's)."""
    out = Path(out)
    dist_info = init_distributed(config.train.device)
    checked = config if task is None else None
    staged = prepare_run_dir(out, resume, overwrite, checked) if dist_info.is_main else None
    if dist_info.world_size > 1:
        dist.barrier()
    try:
        trainer = Trainer(config, staged or out, resume=resume, dist_info=dist_info, replaces=out if staged else None,
                          task=task)
        trainer.fit()
    except BaseException:
        if staged is not None and staged.exists() and out.exists():  # not swapped in: the old run stays
            run_folder.abandon_staged_run(staged, out)
        raise
    return trainer


def run_train(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else None
    if args.resume and out is not None and (out / "config.yaml").is_file() and not args.config:
        config = load_config(out / "config.yaml", args.overrides)
    else:
        config = load_config(args.config, args.overrides)
    if getattr(args, "init_from", None):
        config.train.init_from = str(args.init_from)
    out = out or Path("runs") / config.name
    trainer = train_from_config(config, out, args.resume, args.overwrite)
    if trainer.dist.is_main:
        last = trainer.history[-1] if trainer.history else {}
        print(json.dumps({"run": str(out), "epoch": trainer.epoch, "step": trainer.global_step,
                          **{k: v for k, v in last.items() if k.startswith("val_")}}, indent=2))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
