"""Progress on stderr for every long command: a tqdm bar on a terminal, plain lines in a log.

A tqdm bar redraws itself with carriage returns; redirected to a file (a job scheduler, ``2> log``)
that is thousands of ``\\r`` frames on one line. Without a terminal (and without
``VQA_ALIGN_PROGRESS`` set, which asks for the bar anyway) :func:`progress_bar` returns
:class:`ProgressLog`, which prints one ordinary line at the start, every PROGRESS_EVERY_SECONDS
and at the end. Training's epoch lines (vqa_align/train/progress.py) follow the same rule.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

# Without a terminal (a log file, a job scheduler) a plain progress line replaces the tqdm bar.
PROGRESS_EVERY_SECONDS = 30.0
PROGRESS_ENV = "VQA_ALIGN_PROGRESS"  # set: a tqdm bar even without a terminal


def progress_on_terminal() -> bool:
    """Whether progress is drawn as a tqdm bar (stderr is a terminal, or VQA_ALIGN_PROGRESS is set)."""
    return sys.stderr.isatty() or PROGRESS_ENV in os.environ


def clock(seconds: float) -> str:
    """``h:mm:ss``."""
    whole = int(round(seconds))
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def progress_bar(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "",
             unit: str = "it", enabled: bool = True) -> Any:
    """A progress display over ``iterable`` (or updated by hand): tqdm on a terminal, else
    :class:`ProgressLog`. Both offer iteration, ``update``, ``write``, ``set_description`` and ``close``."""
    if progress_on_terminal():
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True,
                    file=sys.stderr)
    return ProgressLog(iterable, total=total, desc=desc, unit=unit, enabled=enabled)


class ProgressLog:
    """Plain progress lines on stderr: ``desc: n/total unit | rate unit/s | ETA h:mm:ss``."""

    def __init__(self, iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", enabled: bool = True):
        self.iterable, self.desc, self.unit, self.enabled = iterable, desc, unit, enabled
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.n = total, 0
        self.start = time.perf_counter()
        self.last: float | None = None  # when the last line was printed (None: not yet)
        self.printed_n = -1

    def __iter__(self) -> Iterator[Any]:
        assert self.iterable is not None, "ProgressLog without an iterable: call update()"
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return self.total or 0

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if self.last is None or now - self.last >= PROGRESS_EVERY_SECONDS:
            self._line(now)

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def write(self, message: str, file: TextIO | None = None) -> None:
        print(message, file=file or sys.stderr, flush=True)

    def close(self) -> None:
        if self.n != self.printed_n and self.n:
            self._line(time.perf_counter())
        self.iterable = None

    def _line(self, now: float) -> None:
        self.last, self.printed_n = now, self.n
        if not self.enabled:
            return
        elapsed = max(now - self.start, 1e-9)
        rate = self.n / elapsed
        count = f"{self.n}/{self.total}" if self.total is not None else str(self.n)
        eta = f" | ETA {clock(max(self.total - self.n, 0) / rate)}" if self.total is not None and rate > 0 else ""
        prefix = f"{self.desc}: " if self.desc else ""
        print(f"{prefix}{count} {self.unit} | {rate:.1f} {self.unit}/s{eta}", file=sys.stderr, flush=True)

    def __enter__(self) -> "ProgressLog":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
