"""Run folders and checkpoints of a training run: staging a replacing run, ``best`` / ``last``
with everything an exact resume needs, and reading them back.

Resume. The batch order of an epoch is a pure function of (seed, epoch); a checkpoint stores the
epoch, the number of batches already consumed, the epoch's running loss sums, the optimizer state,
the RNG states (as tensors: the file loads with ``weights_only=True``) and the length of
``metrics.jsonl`` at save time, so a resumed run continues exactly where the stopped one was: same
weights, same ``best``, same log lines (the ones the stopped run wrote after its checkpoint are
cut). ``best`` is saved before ``last``, each with the updated best accuracy.

Replacing a run (``--overwrite``) and what may change on ``--resume``: vqa_align/runs/run_folder.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vqa_align.config import Config
from vqa_align.errors import UserError
from vqa_align.runs import run_folder
from vqa_align.runs.checkpoint import (TRAINER_STATE_FILE, WEIGHTS_FILE, CheckpointError, load_trainer_state,
                                       read_weights, recover_checkpoint)
from vqa_align.train.rng import rng_state, set_rng_state
from vqa_align.train.step import EpochLosses
from vqa_align.train.stopping import EarlyStopping
from vqa_align.train.task import TrainingTask


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
        if recover_checkpoint(out / "checkpoints" / "last") is None:  # stopped before its first checkpoint
            raise UserError(f"{out} already holds a run that has no checkpoint to resume; pass --overwrite to replace it")
        raise UserError(f"{out} already holds a run; pass --resume to continue it or --overwrite to replace it")
    run_folder.check_replaceable(out)
    return run_folder.begin_staged_run(out)


def what_is_kept(run_dir: Path, replaces: Path | None) -> str:
    """What a failed run leaves: the run it would have replaced, or its last checkpoint."""
    if replaces is not None:
        return f"nothing was replaced: the previous run in {replaces} is kept"
    last = run_dir / "checkpoints" / "last"
    if (last / WEIGHTS_FILE).is_file():
        return f"the last good checkpoint {last} is kept"
    return "no checkpoint had been written yet"


@dataclass
class Position:
    """Where a run is: the epoch in progress (0-based), the batches of it already consumed, and
    the optimizer steps so far."""

    epoch: int = 0
    batches_done: int = 0
    global_step: int = 0


def trainer_state(optimizer: torch.optim.Optimizer, at: Position, stopping: EarlyStopping, losses: EpochLosses,
                  metrics_bytes: int) -> dict[str, Any]:
    """The trainer state file's contents (tensors and plain values only)."""
    if at.batches_done == 0:  # at an epoch boundary the next epoch starts from zero
        losses = EpochLosses.zeros()
    return {
        "optimizer": optimizer.state_dict(),
        "schedule": {"epoch": at.epoch, "lr": optimizer.param_groups[0]["lr"]},
        "rng": rng_state(),
        "epoch": at.epoch,
        "batches_done": at.batches_done,
        "global_step": at.global_step,
        "best_accuracy": stopping.best_score,
        "best_step": stopping.best_step,
        "checks_without_gain": stopping.checks_without_gain,
        "epoch_loss_sums": losses.sums.detach().cpu().clone(),  # (3,) loss, task, alignment summed over samples
        "epoch_samples": losses.samples,
        "metrics_bytes": metrics_bytes,
    }


@dataclass
class Resumed:
    """What :func:`resume_from` read besides the weights, optimizer and RNG states it restored."""

    position: Position
    epoch_losses: EpochLosses | None  # the epoch's loss sums at the checkpoint (None: at an epoch boundary)
    metrics_bytes: int  # the length of metrics.jsonl when the checkpoint was written


def resume_from(run_dir: Path, task: TrainingTask, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                stopping: EarlyStopping, device: torch.device) -> Resumed:
    """Restore the run's ``checkpoints/last`` into ``model``, ``optimizer``, ``stopping`` and the RNGs."""
    ckpt = recover_checkpoint(run_dir / "checkpoints" / "last")
    if ckpt is None or not (ckpt / TRAINER_STATE_FILE).is_file():
        raise UserError(f"--resume: no checkpoint to resume in {run_dir / 'checkpoints' / 'last'}")
    task.check_resume(ckpt)
    weights, _ = read_weights(ckpt / WEIGHTS_FILE, device)
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:  # shapes: the run's config was edited, or weights of another run
        first = str(err).strip().splitlines()
        detail = next((line.strip() for line in first if "size mismatch" in line or "Missing" in line
                       or "Unexpected" in line), first[0] if first else "")
        raise CheckpointError(f"--resume: {ckpt / WEIGHTS_FILE} does not match the run's config ({detail})") from None
    # On the CPU: RNG states must be CPU tensors; the optimizer moves its state to the parameters.
    state = load_trainer_state(ckpt / TRAINER_STATE_FILE, "cpu")
    try:
        optimizer.load_state_dict(state["optimizer"])
        at = Position(int(state["epoch"]), int(state["batches_done"]), int(state["global_step"]))
        stopping.best_score = float(state["best_accuracy"])
        # Absent from checkpoints written before evaluations by steps and early stopping existed.
        best_step = state.get("best_step")
        stopping.best_step = int(best_step) if best_step is not None else None
        stopping.checks_without_gain = int(state.get("checks_without_gain", 0))
        set_rng_state(state["rng"])
        sums, samples = state["epoch_loss_sums"], int(state["epoch_samples"])
        metrics_bytes = int(state["metrics_bytes"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"--resume: {ckpt / TRAINER_STATE_FILE} is not a trainer state of this vqa-align version "
            f"({type(err).__name__}: {err})"
        ) from None
    losses = EpochLosses(sums.to(torch.float64), samples) if at.batches_done else None
    return Resumed(at, losses, metrics_bytes)
