"""The task interface: what differs between VQA and sentence classification.

:class:`~vqa_align.train.trainer.Trainer` is generic; what a task is (data, model, loss,
evaluation, which metric picks ``best``) sits behind :class:`TrainingTask`:
:class:`~vqa_align.train.vqa_task.VQATask` and the sentence classifier of
vqa_align/sentiment/runner.py, so both get one loop, one checkpoint format and one resume
machinery. A task never holds the trainer: what it needs of the run is the :class:`TaskContext`
given to ``build``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from vqa_align.errors import UserError
from vqa_align.train.distributed import DistInfo


class TrainingError(UserError, RuntimeError):
    """Training cannot continue (e.g. a non-finite loss); the last good checkpoint is kept."""


@dataclass(frozen=True)
class TaskContext:
    """What the trainer tells a task about the run it is built for."""

    device: torch.device  # where inputs, targets and the model go
    amp_dtype: torch.dtype | None  # autocast precision of forwards (None: off)
    dist: DistInfo  # the processes; training batches are split among them
    run_dir: Path  # the run folder (a resumed run's warm start reads what it recorded there)


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
    """The task-specific half of a training run; the Trainer owns the generic half (epoch loop,
    learning rate, optimizer step, gradient accumulation, finiteness checks without host syncs,
    evaluation schedule, early stopping, ``best`` / ``last`` checkpoints with exact resume,
    run-folder staging, ``metrics.jsonl``, tensorboard, progress lines).

    A batch is a dict of tensors. The order of an epoch's batches must be a pure function of
    (seed, epoch), and nothing but the model's forward may draw from the global RNGs between
    steps: that is what makes a resumed run continue exactly.
    """

    # Key of evaluate()'s result whose maximum picks checkpoints/best and that train.patience watches.
    selection_metric: str

    def build(self, context: TaskContext, resume: bool) -> TaskData:
        """Data, vocabularies and model; called once, right after seeding (the model's random
        initialisation draws from the seeded RNGs)."""
        ...

    def loader(self, dataset: Any, shuffle: bool, epoch: int, skip: int, batch_size: int) -> Any:
        """A sized iterable of the batches of ``dataset`` (shuffled: epoch ``epoch``'s order),
        without the first ``skip``."""
        ...

    def inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model's forward keyword arguments, on the context's device."""
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

    def checkpoint_meta(self, best_score: float, best_step: int | None) -> dict[str, Any]:
        """Task entries of every checkpoint's meta.json (e.g. the feature extractor), given the
        best selection-metric value so far and the step it was reached at."""
        ...

    def check_resume(self, checkpoint: Path) -> None:
        """Refuse to resume ``checkpoint`` when the task's data changed in a way the config does not show."""
        ...

    def static_inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``inputs`` padded to fixed shapes (CUDA graphs; only asked when graphs_refused is None)."""
        ...
