"""Progress on stderr for every long command: a tqdm bar on a terminal, plain lines in a log.

A tqdm bar redraws itself with carriage returns; redirected to a file (a job scheduler, ``2> log``)
that is thousands of ``\\r`` frames on one line. Without a terminal (and without
``VQA_ALIGN_PROGRESS`` set, which asks for the bar anyway) progress is :class:`ProgressLines`:
one ordinary line at the first step, then one every PROGRESS_EVERY_SECONDS.

Two front ends share that rule and that printer: :class:`Progress` for loops that know where they
are (training's epochs and steps, evaluation's batches: vqa_align/train/progress.py,
vqa_align/evaluate/evaluator.py) and :func:`progress_bar`, tqdm's interface, for the rest
(``prep``, ``extract``, easy-VQA preparation, experiment grids).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

PROGRESS_EVERY_SECONDS = 30.0
PROGRESS_SWITCH = "VQA_ALIGN_PROGRESS"  # set: the tqdm bar even without a terminal


def progress_on_terminal() -> bool:
    """Whether progress is drawn as a tqdm bar (stderr is a terminal, or VQA_ALIGN_PROGRESS is set)."""
    return sys.stderr.isatty() or PROGRESS_SWITCH in os.environ


def clock(seconds: float) -> str:
    """``h:mm:ss``."""
    whole = int(round(seconds))
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


class ProgressLines:
    """Plain progress lines on stderr, each ``<where> | <rate> <unit>/s | ETA h:mm:ss``: one at the
    first step, then one every PROGRESS_EVERY_SECONDS. ``done`` counts towards ``total``; the ETA
    comes from the pace of the steps seen here (a resumed run's earlier ones do not count)."""

    def __init__(self, total: int | None, unit: str = "samples", enabled: bool = True):
        self.total, self.unit, self.enabled = total, unit, enabled
        self.start = self.last = time.perf_counter()
        self.items = 0
        self.done_at_start: int | None = None
        self.printed_done: int | None = None

    def step(self, items: int, done: int, where: str, force: bool = False) -> None:
        """``items`` more finished (the rate counts them); ``done`` of ``total`` are."""
        self.items += items
        if self.done_at_start is None:
            self.done_at_start = done - 1  # this step is the first one seen here
            force = True
        now = time.perf_counter()
        if not force and now - self.last < PROGRESS_EVERY_SECONDS:  # read here: tests patch it
            return
        self.last, self.printed_done = now, done
        if not self.enabled:
            return
        elapsed = max(now - self.start, 1e-9)
        pace = max(done - self.done_at_start, 1) / elapsed  # steps per second
        eta = f" | ETA {clock(max(self.total - done, 0) / pace)}" if self.total is not None else ""
        print(f"{where} | {self.items / elapsed:.1f} {self.unit}/s{eta}", file=sys.stderr, flush=True)


class Progress:
    """The batches of ``iterable`` with progress: a tqdm bar (:func:`progress_on_terminal`) or
    :class:`ProgressLines`; nothing at all when not ``enabled`` (the other DDP processes)."""

    def __init__(self, iterable: Iterable[Any], total: int, desc: str, initial: int = 0, enabled: bool = True,
                 lines_total: int | None = None, unit: str = "samples"):
        """``total``/``initial``: the bar's batches; ``lines_total``: the batches the lines' ETA
        counts to (default ``total``)."""
        from tqdm import tqdm

        use_bar = enabled and progress_on_terminal()
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
    """tqdm's interface over :class:`ProgressLines`: ``desc: n/total unit | rate unit/s | ETA``,
    and a last line at the end."""

    def __init__(self, iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", enabled: bool = True):
        self.iterable, self.desc, self.unit = iterable, desc, unit
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.n = total, 0
        self.lines = ProgressLines(total, unit, enabled)

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

    def _where(self) -> str:
        count = f"{self.n}/{self.total}" if self.total is not None else str(self.n)
        return f"{self.desc}: {count} {self.unit}" if self.desc else f"{count} {self.unit}"

    def update(self, n: int = 1) -> None:
        self.n += n
        self.lines.step(n, self.n, self._where())

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def write(self, message: str, file: TextIO | None = None) -> None:
        print(message, file=file or sys.stderr, flush=True)

    def close(self) -> None:
        if self.n and self.lines.printed_done != self.n:
            self.lines.step(0, self.n, self._where(), force=True)
        self.iterable = None

    def __enter__(self) -> ProgressLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
