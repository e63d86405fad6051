"""One training step: the loss, the eager step with gradient accumulation, the CUDA-graph step,
the epoch's running loss sums, and the deferred finiteness check.

Loss. L = L_task + λ·scale·L_align, where scale is the batch size when the task loss is summed
over the batch (``train.loss_reduction: sum``), so that λ keeps the meaning "weight relative to
the per-sample task loss" whatever the reduction (the alignment loss is a per-sample mean).

Accumulation. With ``train.grad_accumulation`` A, a window of A batches steps with the gradient
of one batch of the samples it holds (mean reduction: their mean; sum: batch_size x their mean,
as a full window): each backward is weighted for a full window of A x batch_size samples, and a
window that holds another number (the epoch's last, or one with a short batch) is rescaled at
its step.

Finiteness. Running sums stay on the device and the finiteness check is deferred to log steps,
evaluations, checkpoints and the epoch end: no host sync per step (on a GPU each one stalls the
launch queue). The first non-finite step is remembered, so the error still names it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from vqa_align.config import Config
from vqa_align.train.task import TrainingError, TrainingTask

Tensor = torch.Tensor
Inputs = dict[str, Tensor]
Losses = tuple[Tensor, Tensor, Tensor]  # loss, task loss, alignment loss


@dataclass
class Objective:
    """(loss, task loss, alignment loss) of one batch through a model."""

    task: TrainingTask
    reduction: str  # train.loss_reduction
    alignment_weight: float  # λ
    device: torch.device
    amp_dtype: torch.dtype | None

    def __call__(self, model: torch.nn.Module, inputs: Inputs, targets: Tensor, autocast_cache: bool = True) -> Losses:
        amp = self.amp_dtype
        with torch.autocast(self.device.type, dtype=amp, enabled=amp is not None, cache_enabled=autocast_cache):
            out = model(**inputs)
        task, align = self.task.losses(out, targets, self.reduction)
        align_scale = targets.shape[0] if self.reduction == "sum" else 1.0
        return task + self.alignment_weight * align_scale * align, task, align


class TrainStep(Protocol):
    """A training step variant: eager (:class:`EagerStep`) or CUDA-graphed (:class:`GraphedStep`)."""

    def begin_epoch(self, trained_set_changed: bool) -> None:
        """Before an epoch's first batch; ``trained_set_changed``: the task froze or unfroze parameters."""

    def __call__(self, inputs: Inputs, targets: Tensor, window_end: bool) -> Losses:
        """Forward and backward of one batch; the optimizer steps when ``window_end``."""

    def end_epoch(self) -> bool:
        """After the epoch's last batch: step on a partial accumulation window; True if it stepped."""


class EagerStep:
    """Forward, backward (through DDP when there are several processes) and, at the end of each
    accumulation window, gradient rescaling, clipping and the optimizer update."""

    def __init__(self, objective: Objective, model: torch.nn.Module, ddp_model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, config: Config):
        tcfg = config.train
        self.objective, self.model, self.ddp_model, self.optimizer = objective, model, ddp_model, optimizer
        self.batch_size, self.accum, self.grad_clip = tcfg.batch_size, tcfg.grad_accumulation, tcfg.grad_clip
        self.mean_reduction = tcfg.loss_reduction == "mean"
        self.window_samples = 0  # samples in the accumulation window so far

    def begin_epoch(self, trained_set_changed: bool) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.window_samples = 0

    def __call__(self, inputs: Inputs, targets: Tensor, window_end: bool) -> Losses:
        loss, task, align = self.objective(self.ddp_model, inputs, targets)
        batch_size = targets.shape[0]
        # mean reduction: a batch's loss is a mean, so it counts by its size.
        size_weight = batch_size / self.batch_size if self.accum > 1 and self.mean_reduction else 1.0
        (loss * (size_weight / self.accum)).backward()
        self.window_samples += batch_size
        if window_end:
            self._optimizer_step()
        return loss, task, align

    def end_epoch(self) -> bool:
        if not self.window_samples:
            return False
        self._optimizer_step()
        return True

    def _optimizer_step(self) -> None:
        grad_scale = self.accum * self.batch_size / self.window_samples if self.accum > 1 else 1.0
        self.window_samples = 0
        if grad_scale != 1.0:  # the window held other than accumulation x batch_size samples
            torch._foreach_mul_([p.grad for p in self.model.parameters() if p.grad is not None], grad_scale)
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class GraphedStep:
    """``train.cuda_graphs``: forward, backward, clipping and the optimizer update in one replay of
    a captured graph per input shape (vqa_align/train/cuda_graphs.py); one optimizer step per batch
    (the config requires grad_accumulation 1)."""

    def __init__(self, objective: Objective, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 config: Config):
        self.objective, self.model, self.optimizer = objective, model, optimizer
        self.grad_clip = config.train.grad_clip
        self.graphs = None  # GraphedTrainStep, built at the first step (again when the trained set changes)

    def begin_epoch(self, trained_set_changed: bool) -> None:
        if trained_set_changed:
            self.graphs = None
        self.optimizer.zero_grad(set_to_none=True)

    def __call__(self, inputs: Inputs, targets: Tensor, window_end: bool) -> Losses:
        from vqa_align.train.cuda_graphs import GraphedTrainStep

        if self.graphs is None:
            self.graphs = GraphedTrainStep(self._whole_step, lambda: self.optimizer.zero_grad(set_to_none=True))
        return self.graphs(self.objective.task.static_inputs(inputs), targets)

    def end_epoch(self) -> bool:
        return False

    def _whole_step(self, inputs: Inputs, targets: Tensor) -> Losses:
        """Forward, loss, backward, clipping and the optimizer update, with no host sync (capturable)."""
        # The autocast weight cache must be off while capturing (cached casts would go stale).
        loss, task, align = self.objective(self.model, inputs, targets, autocast_cache=False)
        loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip, foreach=True)
        self.optimizer.step()
        return loss.detach(), task.detach(), align.detach()


@dataclass
class EpochLosses:
    """The epoch's running loss sums, kept on the device (no host sync per step)."""

    sums: Tensor  # (3,) float64: loss, task loss, alignment loss, per sample, summed over the samples
    samples: int = 0

    @classmethod
    def zeros(cls, device: torch.device | str = "cpu") -> EpochLosses:
        return cls(torch.zeros(3, dtype=torch.float64, device=device))

    def add(self, loss: Tensor, task: Tensor, align: Tensor, batch_size: int, per_sample: float) -> None:
        """One batch; ``per_sample`` turns a batch-summed task loss into a per-sample one."""
        self.sums += torch.stack([loss.detach() * per_sample, task.detach() * per_sample, align.detach()]).double() * batch_size
        self.samples += batch_size

    def means(self) -> dict[str, float]:
        loss_sum, task_sum, align_sum = self.sums.tolist()
        n = max(self.samples, 1)
        return {"train_loss": loss_sum / n, "train_task_loss": task_sum / n, "train_alignment_loss": align_sum / n}


class FinitenessWatch:
    """Remembers, on the device, the first step since the last check whose loss was not finite."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.first_bad = torch.full((3,), -1.0, dtype=torch.float64, device=self.device)  # step, batch, loss
        self.recent_ids: dict[int, Tensor] = {}  # batch number -> sample ids, since the last check

    def record(self, loss: Tensor, step: int, batch: int, ids: Tensor) -> None:
        """Step ``step``'s batch ``batch`` (both 1-based) had ``loss``; ``ids`` name its samples."""
        here = torch.stack([  # filled on the device: no host-to-device copy
            torch.full((), float(step), dtype=torch.float64, device=self.device),
            torch.full((), float(batch), dtype=torch.float64, device=self.device),
            loss.detach().double(),
        ])
        is_first_bad = ~torch.isfinite(loss.detach()) & (self.first_bad[0] < 0)
        self.first_bad = torch.where(is_first_bad, here, self.first_bad)
        self.recent_ids[batch] = ids  # to name them if it was bad

    def check(self, epoch: int, describe: Callable[[list[int]], tuple[str, str]], kept: Callable[[], str]) -> None:
        """Stop (one host sync) if a recorded step had a non-finite loss; the error names the
        batch's samples and a cause (``describe``) and what is kept (``kept``). 0-based ``epoch``."""
        step, batch, value = self.first_bad.tolist()
        if step < 0:
            self.recent_ids.clear()  # all good up to here
            return
        ids = self.recent_ids.get(int(batch))
        what, cause = describe(ids.tolist() if ids is not None else [])
        raise TrainingError(
            f"non-finite loss {value} at epoch {epoch + 1}, step {int(step)} (batch {int(batch)}, {what}){cause}; {kept()}"
        )
