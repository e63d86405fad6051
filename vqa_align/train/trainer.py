"""The training loop: one generic :class:`Trainer` for every task (vqa_align/train/task.py), MCAN's
VQA recipe by default (vqa_align/train/vqa_task.py). The pieces it puts together, one file each:
the optimizer and learning rate (schedule.py), the eager and CUDA-graph steps with accumulation
and the finiteness check (step.py), ``best`` and early stopping (stopping.py), checkpoints and
exact resume (checkpointing.py), ``metrics.jsonl`` / tensorboard / progress (progress.py), DDP
and devices (distributed.py).

Evaluation and ``best``. At epoch ends (``train.eval_every_epochs``), or with
``train.eval_every_steps`` after every N steps and after the last one; each gain of the task's
selection metric writes ``checkpoints/best``, and ``train.patience`` evaluations in a row without
one stop the run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from vqa_align.config import Config, load_config, make_paths_absolute, save_config
from vqa_align.cpu_threads import ThreadGovernor
from vqa_align.errors import UserError
from vqa_align.paths import check_output_paths
from vqa_align.runs import run_folder
from vqa_align.runs.checkpoint import save_checkpoint
from vqa_align.runs.model_card import write_model_card
from vqa_align.train.checkpointing import Position, prepare_run_dir, resume_from, trainer_state, what_is_kept
from vqa_align.train.distributed import DistInfo, autocast_dtype, init_distributed, resolve_device
from vqa_align.train.host_memory import keep_freed_memory
from vqa_align.train.progress import METRICS_FILE, EpochProgress, MetricsLog, epoch_line, truncate_metrics
from vqa_align.train.rng import seed_everything
from vqa_align.train.schedule import build_optimizer, set_learning_rate
from vqa_align.train.step import EagerStep, EpochLosses, FinitenessWatch, GraphedStep, Objective, TrainStep
from vqa_align.train.stopping import EarlyStopping
from vqa_align.train.task import TaskContext, TrainingTask
from vqa_align.train.vqa_task import VQATask

class Trainer:
    """Owns the model, optimizer, data and run folder of one training run; the task (VQA by
    default) says what the data, model, loss and evaluation are."""

    def __init__(self, config: Config, run_dir: str | Path, resume: bool = False, dist_info: DistInfo | None = None,
                 replaces: str | Path | None = None, task: TrainingTask | None = None):
        """``replaces``: the run folder this run will replace once its first checkpoint is written
        (``run_dir`` is then the staged sibling it trains in; vqa_align/runs/run_folder.py).
        ``task``: default :class:`VQATask` of ``config``."""
        tcfg = config.train
        self.config, self.run_dir = config, Path(run_dir)
        self.replaces = Path(replaces) if replaces is not None else None
        self.dist = dist_info or DistInfo()
        self.device = resolve_device(tcfg.device, self.dist)
        self.amp_dtype = autocast_dtype(tcfg.precision, self.device)
        if tcfg.keep_freed_memory and self.device.type == "cpu":
            keep_freed_memory()
        # Sized once per run, before any step: the team the machine gives when quiet.
        self.threads = ThreadGovernor() if tcfg.adapt_threads and self.device.type == "cpu" else None
        seed_everything(tcfg.seed)

        self.task: TrainingTask = task if task is not None else VQATask(config)
        built = self.task.build(TaskContext(self.device, self.amp_dtype, self.dist, self.run_dir), resume)
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
        self.objective = Objective(self.task, tcfg.loss_reduction, config.model.alignment.weight, self.device,
                                   self.amp_dtype)
        self.step: TrainStep = (GraphedStep(self.objective, self.model, self.optimizer, config) if tcfg.cuda_graphs
                                else EagerStep(self.objective, self.model, self.ddp_model, self.optimizer, config))
        self.epoch = 0  # epoch in progress (0-based)
        self.batches_done = 0  # batches of that epoch already consumed
        self.global_step = 0  # optimizer steps
        self.stopping = EarlyStopping(tcfg.patience)
        self.history: list[dict[str, Any]] = []  # the "epoch" records
        # Wall and CPU (summed over threads) seconds of each optimizer step of this process.
        self.step_seconds: list[float] = []
        self.step_cpu_seconds: list[float] = []
        self.epoch_losses = EpochLosses.zeros()
        self._resumed_losses: EpochLosses | None = None  # the epoch's loss sums at the checkpoint
        self.finite = FinitenessWatch(self.device)
        if resume:
            self._resume()
        self.metrics: MetricsLog | None = self._open_run_folder(resume) if self.dist.is_main else None

    def _resume(self) -> None:
        resumed = resume_from(self.run_dir, self.task, self.model, self.optimizer, self.stopping, self.device)
        self.epoch, self.batches_done, self.global_step = (resumed.position.epoch, resumed.position.batches_done,
                                                           resumed.position.global_step)
        self._resumed_losses = resumed.epoch_losses
        if self.dist.is_main:
            self.history = truncate_metrics(self.run_dir / METRICS_FILE, resumed.metrics_bytes)

    def _open_run_folder(self, resume: bool) -> MetricsLog:
        created = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if created or not resume:
            run_folder.mark_run_folder(self.run_dir)
        save_config(self.config, self.run_dir / "config.yaml")
        return MetricsLog(self.run_dir, self.global_step + 1 if resume else None)

    @property
    def best_accuracy(self) -> float:
        """The best value of the task's selection metric so far."""
        return self.stopping.best_score

    @property
    def best_step(self) -> int | None:
        return self.stopping.best_step

    @property
    def extractor(self) -> Any:
        """What made the features (VQA; None for other tasks)."""
        return getattr(self.task, "extractor", None)

    def _loader(self, dataset: Any, shuffle: bool, epoch: int, skip: int, batch_size: int) -> Any:
        return self.task.loader(dataset, shuffle, epoch, skip, batch_size)

    def _set_lr(self) -> float:
        return set_learning_rate(self.optimizer, self.config.train, self.epoch, self.global_step, self.device)

    # -- the loop --------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        tcfg = self.config.train
        while self.epoch < tcfg.epochs and not self.stopping.spent:  # spent: a resumed finished run
            start = time.perf_counter()
            if self._reached_max_steps():  # train.max_steps: 0, or a resumed run already there: no step
                if self.dist.is_main:
                    self.save("last")  # the run's model, vocabularies and config, as train.max_steps 0 promises
                break
            train_stats = self.train_epoch()
            stopped_early = self._reached_max_steps() or self.stopping.spent
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
            self.log(record)
            self.history.append(record)
            # best first, then last, both with the updated best accuracy: a kill between the
            # two resumes from the previous last, which reaches the same accuracy again.
            improved = self.stopping.note(record.get(self.task.selection_metric), self.global_step)
            if self.dist.is_main:
                self._say(epoch_line(record, tcfg.epochs, self.task.selection_metric, improved))
                if improved:
                    self.save("best")
                self.save("last")
                self.metrics.plot(self.task.selection_metric)
            if stopped_early:
                break
        if self.replaces is not None and self.dist.is_main:  # finished without any checkpoint
            self._swap_in()
        if self.metrics is not None:
            self.metrics.close()
        if self.threads is not None:  # a notebook's later work gets its full team back
            self.threads.restore()
        return self.history[-1] if self.history else {}

    def train_epoch(self) -> dict[str, float]:
        tcfg, accum = self.config.train, self.config.train.grad_accumulation
        lr = self._set_lr()
        self.step.begin_epoch(self.task.start_epoch(self.epoch))
        loader = self._loader(self.train_set, True, self.epoch, self.batches_done, tcfg.batch_size)
        self.ddp_model.train()
        max_batches = tcfg.max_steps * accum if tcfg.max_steps is not None else None
        progress = EpochProgress(loader, self.batches_done, self.epoch, tcfg.epochs, max_batches, self.dist.is_main)
        resumed, self._resumed_losses = self._resumed_losses, None  # the batches before the checkpoint count
        self.epoch_losses = (EpochLosses(resumed.sums.to(self.device), resumed.samples) if resumed is not None
                             else EpochLosses.zeros(self.device))
        self.finite.reset()
        window = {"start": time.perf_counter(), "samples": 0}  # since the last logged step
        step_start = (time.perf_counter(), time.process_time())
        for batch in progress:
            if self.batches_done % accum == 0:  # a window (an optimizer step) begins
                step_start = (time.perf_counter(), time.process_time())
                if tcfg.warmup_steps:
                    lr = self._set_lr()
            inputs, targets = self.task.inputs(batch), self.task.targets(batch)
            stepped = (self.batches_done + 1) % accum == 0  # the optimizer steps after this batch
            loss, task, align = self.step(inputs, targets, stepped)
            self.finite.record(loss, self.global_step + 1, self.batches_done + 1, self.task.batch_ids(batch))
            self.batches_done += 1
            if stepped:
                self.global_step += 1
                self.step_seconds.append(time.perf_counter() - step_start[0])
                self.step_cpu_seconds.append(time.process_time() - step_start[1])
                if self.threads is not None:
                    self.threads.update()
            batch_size = targets.shape[0]
            per_sample = 1.0 / batch_size if tcfg.loss_reduction == "sum" else 1.0
            self.epoch_losses.add(loss, task, align, batch_size, per_sample)
            window["samples"] += batch_size
            progress.step(batch_size, self.epoch, self.batches_done, self.global_step)
            if stepped:
                self._after_step(loss, task, align, per_sample, lr, window, progress)
            if self._reached_max_steps() or self.stopping.spent:
                break
        self._check_finite()
        if self.step.end_epoch():  # a partial accumulation window
            self.global_step += 1
        return {**self.epoch_losses.means(), "lr": lr}

    def _after_step(self, loss: torch.Tensor, task: torch.Tensor, align: torch.Tensor, per_sample: float, lr: float,
                    window: dict[str, float], progress: EpochProgress) -> None:
        """What follows an optimizer step: the log line, an evaluation, a checkpoint (each on its
        schedule, each after the finiteness check). ``per_sample`` turns the batch's losses into
        per-sample ones."""
        tcfg = self.config.train
        if self.global_step % tcfg.log_every_steps == 0:
            self._check_finite()
            elapsed = time.perf_counter() - window["start"]
            record = {"kind": "train", "epoch": self.epoch + 1, "step": self.global_step, "loss": loss.item() * per_sample,
                      "task_loss": task.item() * per_sample, "alignment_loss": align.item(), "lr": lr,
                      "samples_per_s": window["samples"] / max(elapsed, 1e-9)}
            self.log(record)
            progress.show(record)
            window.update(start=time.perf_counter(), samples=0)
        if tcfg.eval_every_steps and (self.global_step % tcfg.eval_every_steps == 0 or self._reached_max_steps()):
            self._check_finite()
            self._evaluate_mid_epoch()
        every = tcfg.checkpoint_every_steps
        if every and self.global_step and self.global_step % every == 0:
            self._check_finite()
            self.save("last")

    def _reached_max_steps(self) -> bool:
        max_steps = self.config.train.max_steps
        return max_steps is not None and self.global_step >= max_steps

    def _check_finite(self) -> None:
        self.finite.check(self.epoch, self.task.describe_batch, lambda: what_is_kept(self.run_dir, self.replaces))

    def _batches_per_epoch(self) -> int:
        return len(self._loader(self.train_set, True, self.epoch, 0, self.config.train.batch_size))

    # -- evaluations -----------------------------------------------------------------------

    def evaluate(self, dataset: Any = None, batch_size: int | None = None) -> dict[str, float]:
        """The task's metrics on ``dataset`` (default: the validation data)."""
        return self.task.evaluate(dataset, batch_size)

    def _evaluate_mid_epoch(self) -> None:
        """An evaluation after a step (train.eval_every_steps): logged as kind "eval"; a gain
        writes checkpoints/best at once (its weights are those of this step)."""
        metrics = self.evaluate()
        improved = self.stopping.note(metrics.get(self.task.selection_metric), self.global_step)
        record = {"kind": "eval", "epoch": self.epoch + 1, "step": self.global_step, **metrics, "improved": improved}
        self.log(record)
        if self.dist.is_main:
            self._say(epoch_line(record, self.config.train.epochs, self.task.selection_metric, improved))
        if improved and self.dist.is_main:
            self.save("best")
        self.ddp_model.train()

    # -- records and checkpoints -----------------------------------------------------------

    def log(self, record: dict[str, Any]) -> None:
        """One record into metrics.jsonl and tensorboard (main process only)."""
        if self.metrics is not None:
            self.metrics.write(record)

    @staticmethod
    def _say(line: str) -> None:
        """A console line on stderr (stdout keeps each command's JSON summary)."""
        print(line, file=sys.stderr, flush=True)

    def save(self, name: str) -> Path:
        metrics = self.run_dir / METRICS_FILE
        at = Position(self.epoch, self.batches_done, self.global_step)
        state = trainer_state(self.optimizer, at, self.stopping, self.epoch_losses,
                              metrics.stat().st_size if metrics.is_file() else 0)
        meta = {"epoch": self.epoch, "global_step": self.global_step, "best_val_accuracy": self.best_accuracy,
                "last": self.history[-1] if self.history else None,
                **self.task.checkpoint_meta(self.best_accuracy, self.best_step)}
        save_checkpoint(self.run_dir / "checkpoints" / name, self.model, self.config, self.answers,
                        self.tokenizer, state, meta)
        if name == "last" and isinstance(self.config, Config):  # a VQA run: its model card, up to date
            write_model_card(self.run_dir, name=(self.replaces or self.run_dir).name)
        if self.replaces is not None and name == "last":
            self._swap_in()
        return self.run_dir / "checkpoints" / name

    def _swap_in(self) -> None:
        """The first checkpoint exists: the staged run takes the place of the run it replaces."""
        out, staged = self.replaces, self.run_dir
        run_folder.commit_staged_run(staged, out)
        self.run_dir, self.replaces = out, None
        if self.metrics is not None:
            self.metrics.moved_to(out)


# ----------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------


def train_from_config(config: Config, out: Path, resume: bool = False, overwrite: bool = False,
                      task: TrainingTask | None = None) -> Trainer:
    """Train into ``out``. With ``overwrite`` an existing run is replaced only once the new run has
    its first checkpoint (until then, and if anything fails before, the old run is untouched).
    ``task``: default VQA (its config changes on ``resume`` are checked against the run's)."""
    out = Path(out)
    if isinstance(config, Config):  # (the sentence task has its own config type)
        make_paths_absolute(config)  # the run's config.yaml then works from any directory
    dist_info = init_distributed(config.train.device)
    checked = config if task is None else None
    if config.train.init_from and not resume:  # replacing the run it starts from would delete its weights
        check_output_paths([out], [config.train.init_from], option="--out")
    staged = prepare_run_dir(out, resume, overwrite, checked) if dist_info.is_main else None
    if dist_info.world_size > 1:
        dist.barrier()
    # A run stopped before its first checkpoint is started again (see prepare_run_dir), not resumed.
    resume = resume and staged is None and (out / "checkpoints" / "last").is_dir()
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
    """``vqa-align train``."""
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
