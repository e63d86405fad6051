"""Progress of a long loop on stderr, shared by training (vqa_align/train/progress.py) and
evaluation (vqa_align/evaluate/evaluator.py): a tqdm bar on a terminal, and without one (a log
file, a job scheduler) a plain line at the first batch and then every PROGRESS_EVERY_SECONDS.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

PROGRESS_EVERY_SECONDS = 30.0
PROGRESS_SWITCH = "VQA_ALIGN_PROGRESS"  # set: the tqdm bar even without a terminal


def wants_bar() -> bool:
    """A tqdm bar (a terminal, or VQA_ALIGN_PROGRESS set) rather than plain lines."""
    return sys.stderr.isatty() or PROGRESS_SWITCH in os.environ


def clock(seconds: float) -> str:
    """``h:mm:ss``."""
    whole = int(round(seconds))
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


class ProgressLines:
    """Plain progress lines on stderr: one at the first batch, then one every
    PROGRESS_EVERY_SECONDS, each ``<where> | <rate> <unit>/s | ETA h:mm:ss``. The ETA of the
    ``total`` batches comes from the pace of the batches seen here (a resumed run's earlier ones
    do not count)."""

    def __init__(self, total: int, unit: str = "samples"):
        self.total, self.unit = total, unit
        self.start = self.last = time.perf_counter()
        self.batches = self.items = 0
        self.first = True

    def step(self, items: int, done: int, where: str) -> None:
        """A batch of ``items`` finished; ``done`` of the ``total`` batches are."""
        self.batches += 1
        self.items += items
        now = time.perf_counter()
        if not self.first and now - self.last < PROGRESS_EVERY_SECONDS:  # read here: tests patch it
            return
        self.first, self.last = False, now
        elapsed = max(now - self.start, 1e-9)
        eta = (self.total - done) * elapsed / self.batches
        print(f"{where} | {self.items / elapsed:.1f} {self.unit}/s | ETA {clock(max(eta, 0.0))}",
              file=sys.stderr, flush=True)


class Progress:
    """The batches of ``iterable`` with progress: a tqdm bar (:func:`wants_bar`) or
    :class:`ProgressLines`; nothing at all when not ``enabled`` (the other DDP processes)."""

    def __init__(self, iterable: Iterable[Any], total: int, desc: str, initial: int = 0, enabled: bool = True,
                 lines_total: int | None = None, unit: str = "samples"):
        """``total``/``initial``: the bar's batches; ``lines_total``: the batches the lines' ETA
        counts to (default ``total``)."""
        from tqdm import tqdm

        use_bar = enabled and wants_bar()
        self.bar = tqdm(iterable, total=total, initial=initial, desc=desc, disable=not use_bar, dynamic_ncols=True)
        self.lines = ProgressLines(total if lines_total is None else lines_total, unit) if enabled and not use_bar else None

    def __iter__(self) -> Iterator[Any]:
        return iter(self.bar)

    def step(self, items: int, done: int, where: str) -> None:
        """A batch of ``items`` finished, ``done`` in all; ``where`` opens the plain line."""
        if self.lines is not None:
            self.lines.step(items, done, where)

    def show(self, **numbers: str) -> None:
        """Numbers next to the bar."""
        self.bar.set_postfix(**numbers)

    def close(self) -> None:
        self.bar.close()
