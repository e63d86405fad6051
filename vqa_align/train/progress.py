"""What a run reports: ``metrics.jsonl`` (and the same scalars to tensorboard), ``curves.png``, and
progress on stderr (vqa_align/progress.py) and one console line per epoch with its validation numbers.

``metrics.jsonl`` holds one JSON record a line, each with ``time``, ``kind`` ("train": a log
step; "eval": an evaluation after a step; "epoch": an epoch's end; "test": a task's evaluation
after training) and ``step``. A resumed run cuts it back to its length at the checkpoint.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from vqa_align.progress import Progress
from vqa_align.untrusted_files import MAX_DATASET_JSON_BYTES, read_text

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"


def open_tensorboard(folder: Path, purge_step: int | None = None) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional
        return None
    return SummaryWriter(str(folder), purge_step=purge_step)


class MetricsLog:
    """``metrics.jsonl`` and tensorboard of the run folder ``run_dir`` (main process only)."""

    def __init__(self, run_dir: Path, tensorboard_purge_step: int | None):
        self.run_dir = run_dir
        # A resumed run rewrites the steps after its checkpoint: drop the stopped run's events there.
        self.tensorboard = open_tensorboard(run_dir / "tensorboard", tensorboard_purge_step)

    @property
    def path(self) -> Path:
        return self.run_dir / METRICS_FILE

    def write(self, record: dict[str, Any]) -> None:
        record = {"time": time.time(), **record}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("time", "step", "epoch"):
                    self.tensorboard.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    def moved_to(self, run_dir: Path) -> None:
        """The run folder was renamed (a staged run swapped in)."""
        self.run_dir = run_dir
        if self.tensorboard is not None:  # its open event file moved with the folder; new ones go there too
            self.tensorboard.close()
            self.tensorboard = open_tensorboard(run_dir / "tensorboard")

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None

    def plot(self, metric: str) -> None:
        plot_curves(self.path, self.run_dir / CURVES_FILE, metric)


def truncate_metrics(path: Path, size: int) -> list[dict[str, Any]]:
    """Cut ``metrics.jsonl`` back to its length at the checkpoint (the stopped run may have logged
    steps after it, which the resumed run logs again); returns its epoch records (the history)."""
    if not path.is_file():
        return []
    if path.stat().st_size > size:
        with open(path, "r+b") as handle:
            handle.truncate(size)
    return [r for r in read_metrics(path) if r.get("kind") == "epoch"]


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (none where it is missing). A line cut by a kill
    mid-write is not a record and is skipped, as is anything that is not a JSON object."""
    if not path.is_file():
        return []
    records = []
    for line in read_text(path, MAX_DATASET_JSON_BYTES).splitlines():
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError, ValueError):
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


class EpochProgress:
    """An epoch's batches with progress on stderr (vqa_align/progress.py: a tqdm bar on a
    terminal, else plain lines with the ETA of the run's remaining training batches); nothing
    off the main process."""

    def __init__(self, loader: Any, done: int, epoch: int, epochs: int, max_batches: int | None, is_main: bool):
        """``done``: batches of the epoch already trained (a resume); ``max_batches``: the run's cap
        (train.max_steps x accumulation), if any."""
        self.epoch_batches, self.epochs = len(loader) + done, epochs
        run_batches = epochs * self.epoch_batches if max_batches is None else min(epochs * self.epoch_batches, max_batches)
        self.progress = Progress(loader, self.epoch_batches, f"epoch {epoch + 1}/{epochs}", initial=done,
                                 enabled=is_main, lines_total=run_batches)

    def __iter__(self) -> Any:
        return iter(self.progress)

    def step(self, batch_size: int, epoch: int, batches_done: int, global_step: int) -> None:
        self.progress.step(batch_size, epoch * self.epoch_batches + batches_done,
                           f"epoch {epoch + 1}/{self.epochs} batch {batches_done}/{self.epoch_batches} step {global_step}")

    def show(self, record: dict[str, Any]) -> None:
        """A logged training record's numbers next to the bar."""
        self.progress.show(loss=f"{record['loss']:.3f}", align=f"{record['alignment_loss']:.3f}",
                           lr=f"{record['lr']:.1e}", sps=f"{record['samples_per_s']:.0f}")


def epoch_line(record: dict[str, Any], epochs: int, metric: str, improved: bool) -> str:
    """The console line of an epoch (kind "epoch") or of an evaluation after a step ("eval"): the
    training loss and the evaluation's numbers (those named like ``metric``, e.g. ``val_*``),
    ``metric`` first, marked when it is the best so far."""
    head = f"epoch {record['epoch']}/{epochs}" if record["kind"] == "epoch" else f"step {record['step']}"
    parts = [head] + ([f"train_loss {record['train_loss']:.4f}"] if "train_loss" in record else [])
    prefix = metric.split("_")[0] + "_"  # val_ (VQA), dev_ (sentences)
    scores = sorted((k for k, v in record.items() if k.startswith(prefix) and isinstance(v, float)), key=lambda k: k != metric)
    for key in scores:
        value = f"{record[key]:.2f}" if "accuracy" in key else f"{record[key]:.4g}"
        parts.append(f"{key} {value}" + (" (best)" if key == metric and improved else ""))
    if "epoch_seconds" in record:
        parts.append(f"{record['epoch_seconds']:.1f} s")
    return " | ".join(parts)


def plot_curves(metrics_file: Path, out: Path, metric: str = "val_accuracy") -> None:
    """Training loss, alignment loss and the selection metric (validation accuracy) against steps, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics_file.is_file():
        return
    records = read_metrics(metrics_file)
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
