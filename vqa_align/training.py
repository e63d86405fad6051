"""The training engine: MCAN's recipe, alignment loss, checkpoints, resume, DDP, the quickstart.

Loss. BCE-with-logits on the soft targets, summed over answers. ``train.loss_reduction``:
``sum`` also sums over the batch (MCAN's choice; Adam is invariant to the loss scale, so MCAN's
learning rates carry over unchanged) and ``mean`` averages over the batch. The alignment term
λ·D is a per-sample mean, so with ``sum`` it is multiplied by the batch size: λ keeps the meaning
"weight relative to the per-sample task loss" whatever the reduction.

Learning rate (MCAN): base × k/(W+1) in warm-up epoch k = 1..W, then base, multiplied by
``decay_factor`` at every epoch listed in ``decay_epochs`` (0-based epoch index >= listed value).

Resume. The batch order of an epoch is a pure function of (seed, epoch); a checkpoint stores the
epoch, the number of batches already consumed, the epoch's running loss sums, the optimizer state,
the RNG states (as tensors: the file loads with ``weights_only=True``) and the length of
``metrics.jsonl`` at save time, so a resumed run continues exactly where the stopped one was: same
weights, same ``best``, same log lines (the ones the stopped run wrote after its checkpoint are
cut). ``best`` is saved before ``last``, each with the updated best accuracy.

Replacing a run (``--overwrite``) and what may change on ``--resume``: vqa_align/run_folder.py.
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
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from vqa_align import run_folder
from vqa_align.checkpoint import (TRAINER_STATE_FILE, WEIGHTS_FILE, CheckpointError, load_trainer_state,
                                  read_weights, recover_checkpoint, resolve_checkpoint, save_checkpoint)
from vqa_align.config import Config, load_config, save_config
from vqa_align.errors import DataFormatError, UserError
from vqa_align.host_memory import keep_freed_memory
from vqa_align.model import MCAN, MODEL_INPUTS

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
# The trainer
# ----------------------------------------------------------------------------------------------


class Trainer:
    """Owns the model, optimizer, data and run folder of one training run."""

    def __init__(self, config: Config, run_dir: str | Path, resume: bool = False, dist_info: DistInfo | None = None,
                 replaces: str | Path | None = None):
        """``replaces``: the run folder this run will replace once its first checkpoint is written
        (``run_dir`` is then the staged sibling it trains in; vqa_align/run_folder.py)."""
        from vqa_align.data import build_data

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

        tokenizer = answers = warm = None
        if tcfg.init_from:  # vqa_align/warm_start.py: the source's architecture, tokenizer and answers
            from vqa_align.warm_start import prepare_warm_start

            warm = prepare_warm_start(config, self.run_dir if resume else None)
            tokenizer, answers = warm.tokenizer, warm.answers
        elif config.model.question_encoder == "minilm":
            from vqa_align.question_encoders import load_minilm_tokenizer

            tokenizer = load_minilm_tokenizer()  # WordPiece ids, [PAD] = 0
        bundle = build_data(config.data, ["train", "val"], tokenizer=tokenizer, answers=answers)
        self.tokenizer, self.answers = bundle.tokenizer, bundle.answers
        self.extractor = bundle.store.extractor  # what made the features; every checkpoint records it
        self.train_set, self.val_set = bundle.datasets["train"], bundle.datasets.get("val")
        self._resident: dict[int, Any] = {}  # id(dataset) -> ResidentSplit (data.resident)
        self._scores: dict[int, Any] = {}  # id(dataset) -> vqa_data.OfficialScores
        if len(self.train_set) == 0:
            raise UserError("the training split has no questions")
        config.model.vocab_size = len(self.tokenizer)
        config.model.num_answers = len(self.answers)
        feature_dim = bundle.feature_dim
        self.answer_types = {
            r.question_id: r.answer_type or "unknown" for ds in bundle.datasets.values() for r in ds.records
        }
        if config.model.feature_dim != feature_dim:
            raise UserError(
                f"model.feature_dim is {config.model.feature_dim} but the feature store has D={feature_dim}; "
                f"set --set model.feature_dim={feature_dim}"
            )

        self.model = MCAN(config.model)
        if warm is not None and not resume:
            from vqa_align.warm_start import apply_warm_start

            apply_warm_start(self.model, warm)
        elif config.model.glove_path and not resume:
            self._init_glove(config.model.glove_path)
        self.model.to(self.device)
        self.ddp_model: torch.nn.Module = self.model
        if self.dist.world_size > 1:
            # Parameters frozen for the first epochs (MiniLM) get no gradient then.
            freezes = config.model.question_encoder == "minilm" and config.model.minilm_freeze_epochs > 0
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=freezes,
            )
        if tcfg.cuda_graphs and (self.device.type != "cuda" or self.dist.world_size > 1):
            raise UserError("train.cuda_graphs needs one CUDA device (train.device: cuda, no torchrun with several processes)")
        if tcfg.cuda_graphs and config.model.question_encoder != "lstm":
            # The Hugging Face encoder has data-dependent checks (host syncs) that capture forbids.
            raise UserError("train.cuda_graphs supports model.question_encoder: lstm only")
        # The fused Adam kernel (CPU and CUDA): on the 2-core CPU it updates MCAN-small's 57.6 M
        # parameters in 71 ms instead of 239 ms (foreach). For CUDA graphs also capturable, with the
        # learning rate a device tensor that _set_lr updates in place (a float would be frozen in).
        adam_options = {"fused": True, "capturable": tcfg.cuda_graphs}
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=torch.tensor(tcfg.lr, device=self.device) if tcfg.cuda_graphs else tcfg.lr,
            betas=tuple(tcfg.betas), eps=tcfg.eps, weight_decay=tcfg.weight_decay, **adam_options,
        )
        self._graphed = None  # GraphedTrainStep, built at the first training step (train.cuda_graphs)
        self.epoch = 0  # epoch in progress (0-based)
        self.batches_done = 0  # batches of that epoch already consumed
        self.global_step = 0  # optimizer steps
        self.best_accuracy = -1.0
        self.history: list[dict[str, Any]] = []
        self._epoch_sums: tuple[torch.Tensor, int] = (torch.zeros(3, dtype=torch.float64), 0)
        self._resumed_sums: tuple[torch.Tensor, int] | None = None  # the epoch's loss sums at the checkpoint
        self._recent_images: dict[int, torch.Tensor] = {}  # batch number -> image ids, since the last check
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

    def _init_glove(self, path: str) -> None:
        """Initialise the word embedding from a local GloVe-format file (words not in it stay random)."""
        from vqa_align.model import load_glove_embeddings

        embedding = getattr(self.model.question_encoder, "embedding", None)
        if embedding is None:
            raise UserError("model.glove_path needs model.question_encoder: lstm (it has a word embedding)")
        try:
            found = load_glove_embeddings(path, self.tokenizer.get_vocab(), embedding)
        except ValueError as err:
            raise UserError(str(err)) from None
        vocab = len(self.tokenizer)
        print(f"GloVe: {found} of {vocab} vocabulary words initialised from {path}", file=sys.stderr)

    # -- data ------------------------------------------------------------------------------

    def _loader(self, dataset: Any, shuffle: bool, epoch: int, skip: int, batch_size: int) -> Any:
        from vqa_align.data import RegionBucketBatchSampler, VQALoader, collate_for_workers

        dcfg = self.config.data
        sampler = RegionBucketBatchSampler(
            dataset.region_counts,
            batch_size=batch_size,
            shuffle=shuffle,
            seed=self.config.train.seed,
            drop_last=False,
            num_replicas=self.dist.world_size if shuffle else 1,
            rank=self.dist.rank if shuffle else 0,
            bucket=dcfg.bucket_by_regions,
        )
        sampler.set_epoch(epoch)
        if dcfg.resident:
            from vqa_align.resident import ResidentLoader, ResidentSplit

            if id(dataset) not in self._resident:  # loaded once per split, kept for the run
                self._resident[id(dataset)] = ResidentSplit(dataset, self.device)
            return ResidentLoader(self._resident[id(dataset)], SkipFirstBatches(sampler, skip))
        workers = dcfg.num_workers
        if workers > 0:
            dataset.store.close()  # every worker opens its own HDF5 handle after fork
        return VQALoader(  # float16 features from the workers, float32 in the main process
            dataset,
            batch_sampler=SkipFirstBatches(sampler, skip),
            collate_fn=collate_for_workers,
            num_workers=workers,
            pin_memory=dcfg.pin_memory and self.device.type == "cuda",
            persistent_workers=False,
            # Its own generator: a DataLoader iterator otherwise draws its worker base seed from the
            # global RNG, one extra draw whenever a resumed run restarts an epoch mid-way.
            generator=torch.Generator().manual_seed(self.config.train.seed * LOADER_SEED_STRIDE + epoch),
        )

    def _inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: batch[k].to(self.device, non_blocking=True) for k in MODEL_INPUTS}

    # -- one epoch -------------------------------------------------------------------------

    def _set_lr(self) -> float:
        t = self.config.train
        lr = learning_rate(self.epoch, t.lr, t.warmup_epochs, t.decay_epochs, t.decay_factor)
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
        set_frozen = getattr(self.model.question_encoder, "set_frozen", None)
        if set_frozen is not None:
            set_frozen(self.epoch < self.config.model.minilm_freeze_epochs)
            self._graphed = None  # captured graphs would keep the previous epoch's frozen set
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
        # checkpoints and the epoch end: no host sync per step (on a GPU each one stalls the
        # launch queue). The first non-finite step is remembered, so the error still names it.
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
        self.optimizer.zero_grad(set_to_none=True)
        for batch in bar:
            inputs = self._inputs(batch)
            targets = batch["targets"].to(self.device, non_blocking=True)
            batch_size = targets.shape[0]
            graphed = tcfg.cuda_graphs
            if graphed:  # forward, backward and optimizer step in one replay (vqa_align/cuda_graphs.py)
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
            self._recent_images[self.batches_done + 1] = batch["image_ids"]  # to name them if it was bad
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
            per_sample = 1.0 / batch_size if tcfg.loss_reduction == "sum" else 1.0
            sums += torch.stack([loss.detach() * per_sample, task.detach() * per_sample, align.detach()]).double() * batch_size
            samples += batch_size
            self._epoch_sums = (sums, samples)
            window_samples += batch_size
            if progress is not None:
                progress.step(batch_size)
            if self.global_step % tcfg.log_every_steps == 0 and self.batches_done % accum == 0:
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
            every = tcfg.checkpoint_every_steps
            if every and self.global_step and self.global_step % every == 0 and self.batches_done % accum == 0:
                self._raise_if_non_finite()
                self.save("last")
            if tcfg.max_steps is not None and self.global_step >= tcfg.max_steps:
                break
        self._raise_if_non_finite()
        if self.batches_done % accum:
            self._optimizer_step(full_window / accum_samples)
        loss_sum, task_sum, align_sum = sums.tolist()
        n = max(samples, 1)
        return {"train_loss": loss_sum / n, "train_task_loss": task_sum / n, "train_alignment_loss": align_sum / n,
                "lr": lr}

    def _graphed_step(self, inputs: dict[str, torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One training step through :class:`~vqa_align.cuda_graphs.GraphedTrainStep` -> (loss, task, align)."""
        from vqa_align.cuda_graphs import GraphedTrainStep, pad_to_static

        if self._graphed is None:
            self._graphed = GraphedTrainStep(self._whole_step, lambda: self.optimizer.zero_grad(set_to_none=True))
        dcfg = self.config.data
        return self._graphed(pad_to_static(inputs, dcfg.max_question_tokens, dcfg.max_regions), targets)

    def _losses(
        self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], targets: torch.Tensor, autocast_cache: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, task loss, alignment loss) of one batch: L = L_task + λ·scale·L_align, where scale is
        the batch size for the summed task loss, so that λ keeps its per-sample meaning."""
        tcfg = self.config.train
        amp = self.amp_dtype
        with torch.autocast(self.device.type, dtype=amp, enabled=amp is not None, cache_enabled=autocast_cache):
            out = model(**inputs)
        task = task_loss(out.logits, targets, tcfg.loss_reduction)
        align = out.alignment_loss.float()
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
        names the batch's images, those among them whose stored features are not finite, and what
        is kept."""
        step, batch, value = self._first_bad.tolist()
        if step < 0:
            self._recent_images.clear()  # all good up to here
            return
        ids = self._recent_images.get(int(batch))
        images = ids.tolist() if ids is not None else []
        shown = ", ".join(map(str, images[:8])) + (f" and {len(images) - 8} more" if len(images) > 8 else "")
        bad = _non_finite_images(self.train_set, images)
        cause = (f"; features of image {bad[0]} in {self.train_set.store.path} are not finite (Inf or NaN)"
                 if bad else "")
        raise TrainingError(
            f"non-finite loss {value} at epoch {self.epoch + 1}, step {int(step)} (batch {int(batch)}, "
            f"images {shown}){cause}; {self._what_is_kept()}"
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

    @torch.no_grad()
    def evaluate(self, dataset: Any = None, batch_size: int | None = None) -> dict[str, float]:
        """Official VQA accuracy of the top-1 answers (overall and per answer type; the scores of
        ``vqa_data.OfficialScores``, not the soft targets) and the validation loss."""
        dataset = dataset if dataset is not None else self.val_set
        if dataset is None or len(dataset) == 0 or not dataset.has_targets:
            return {}
        self.model.eval()
        loader = self._loader(dataset, False, 0, 0, batch_size or max(self.config.train.batch_size, 256))
        total, loss_sum, n = 0.0, 0.0, 0
        per_type: dict[str, list[float]] = {}
        answer_types = self.answer_types
        scores = self._official_scores(dataset)
        for batch in loader:
            _check_finite_features(batch, dataset)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                logits = self.model(**self._inputs(batch)).logits.float()
            targets = batch["targets"].to(self.device)
            qids = batch["question_ids"].tolist()
            acc = scores(qids, logits.argmax(-1).tolist())
            loss_sum += task_loss(logits, targets, "sum").item()
            total += sum(acc)
            n += len(acc)
            for qid, a in zip(qids, acc):
                per_type.setdefault(answer_types.get(qid, "unknown"), []).append(a)
        self.model.train()
        result = {"val_accuracy": 100.0 * total / max(n, 1), "val_loss": loss_sum / max(n, 1)}
        for kind, values in sorted(per_type.items()):
            result[f"val_accuracy/{kind}"] = 100.0 * sum(values) / len(values)
        return result

    def _official_scores(self, dataset: Any) -> Any:
        """The split's official score table, built once per split (string rules, CPU)."""
        from vqa_align.vqa_data import OfficialScores

        if id(dataset) not in self._scores:
            self._scores[id(dataset)] = OfficialScores(dataset.records, self.answers)
        return self._scores[id(dataset)]

    # -- the loop --------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        tcfg = self.config.train
        while self.epoch < tcfg.epochs:
            start = time.perf_counter()
            train_stats = self.train_epoch()
            stopped_early = tcfg.max_steps is not None and self.global_step >= tcfg.max_steps
            epoch_done = not stopped_early or self.batches_done >= self._batches_per_epoch()
            record = {"kind": "epoch", "epoch": self.epoch + 1, "step": self.global_step,
                      "epoch_seconds": time.perf_counter() - start, **train_stats}
            if epoch_done:
                self.epoch += 1
                self.batches_done = 0
            if epoch_done and (self.epoch % tcfg.eval_every_epochs == 0 or self.epoch == tcfg.epochs):
                record.update(self.evaluate())
            self._log(record)
            self.history.append(record)
            if self.dist.is_main:
                # best first, then last, both with the updated best accuracy: a kill between the
                # two resumes from the previous last, which reaches the same accuracy again.
                accuracy = record.get("val_accuracy")
                if accuracy is not None and accuracy > self.best_accuracy:
                    self.best_accuracy = accuracy
                    self.save("best")
                self.save("last")
                _plot_curves(self.run_dir / METRICS_FILE, self.run_dir / CURVES_FILE)
            if stopped_early:
                break
        if self.replaces is not None and self.dist.is_main:  # finished without any checkpoint
            self._swap_in()
        if self._tensorboard is not None:
            self._tensorboard.close()
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
            "epoch_loss_sums": sums.detach().cpu().clone(),  # (3,) loss, task, alignment summed over samples
            "epoch_samples": samples,
            "metrics_bytes": metrics.stat().st_size if metrics.is_file() else 0,
        }
        meta = {"epoch": self.epoch, "global_step": self.global_step, "best_val_accuracy": self.best_accuracy,
                "last": self.history[-1] if self.history else None,
                "extractor": json.loads(self.extractor.to_json()) if self.extractor is not None else None}
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
        from vqa_align.checkpoint import checkpoint_extractor

        recorded = checkpoint_extractor(ckpt)
        if recorded is not None and (self.extractor is None or recorded.key() != self.extractor.key()):
            now = self.extractor.describe() if self.extractor is not None else "an unrecorded extractor"
            raise UserError(f"--resume: {ckpt} was trained on features of {recorded.describe()}, "
                            f"but the store now comes from {now}")
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


def _plot_curves(metrics_file: Path, out: Path) -> None:
    """Training loss, alignment loss and validation accuracy against steps, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics_file.is_file():
        return
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    train = [r for r in records if r["kind"] == "train"]
    epochs = [r for r in records if r["kind"] == "epoch" and "val_accuracy" in r]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    axes[0].plot([r["step"] for r in train], [r["task_loss"] for r in train])
    axes[0].set(title="task loss (per sample)", xlabel="step")
    axes[1].plot([r["step"] for r in train], [r["alignment_loss"] for r in train], color="tab:orange")
    axes[1].set(title="alignment loss", xlabel="step")
    axes[2].plot([r["step"] for r in epochs], [r["val_accuracy"] for r in epochs], marker="o", color="tab:green")
    axes[2].set(title="val accuracy (%)", xlabel="step")
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


def train_from_config(config: Config, out: Path, resume: bool = False, overwrite: bool = False) -> Trainer:
    """Train into ``out``. With ``overwrite`` an existing run is replaced only once the new run has
    its first checkpoint (until then, and if anything fails before, the old run is untouched)."""
    out = Path(out)
    dist_info = init_distributed(config.train.device)
    staged = prepare_run_dir(out, resume, overwrite, config) if dist_info.is_main else None
    if dist_info.world_size > 1:
        dist.barrier()
    try:
        trainer = Trainer(config, staged or out, resume=resume, dist_info=dist_info, replaces=out if staged else None)
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


def quickstart_config_path() -> Path:
    """The easy-VQA preset of the source checkout (``configs/easy_vqa.yaml``)."""
    path = Path(__file__).resolve().parent.parent / "configs" / "easy_vqa.yaml"
    if not path.is_file():
        raise UserError(f"quickstart preset not found at {path}; run from a source checkout (pip install -e .)")
    return path


def run_quickstart(args: argparse.Namespace) -> int:
    """Prepare easy-VQA if needed, train the default aligned model, evaluate it, say what next."""
    from vqa_align.evaluation import evaluate_checkpoint

    config = load_config(quickstart_config_path(), args.overrides)
    from vqa_align.inference import default_checkpoint_path  # where `vqa-align demo` looks

    out = Path(args.out) if args.out else default_checkpoint_path()
    if (out / "checkpoints" / "last").is_dir() and not args.overwrite:
        raise UserError(
            f"{out} already holds a quickstart run; open it with `vqa-align demo`, "
            "or train it again with `vqa-align quickstart --overwrite`"
        )
    start = time.perf_counter()
    train_from_config(config, out, resume=False, overwrite=args.overwrite)
    minutes = (time.perf_counter() - start) / 60
    metrics = evaluate_checkpoint(resolve_checkpoint(out), split="val")
    print(json.dumps({"run": str(out), "minutes": round(minutes, 2), **metrics}, indent=2))
    print(f"\ncheckpoint: {resolve_checkpoint(out)}")
    print("open the app:  vqa-align demo")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m vqa_align.train`` / ``torchrun -m vqa_align.train``: the ``train`` subcommand."""
    from vqa_align.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])

