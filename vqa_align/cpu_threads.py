"""How many torch threads a CPU job should use while other processes share the machine.

Why this exists: torch's CPU kernels run in OpenMP teams of ``torch.get_num_threads()`` threads
(one per core) that meet at a barrier after every op, and GNU OpenMP spins at that barrier. When
another process takes one of the cores, one team member is descheduled for a whole scheduler
slice while the others spin, so every one of the ~1,000 ops of an MCAN step waits a slice: beside
one busy loop a 2-thread step on 2 cores ran at 31 % of its quiet speed, with 1 thread at 54 %
(BENCHMARKS.md, "contention"). A team no larger than the cores nobody else wants never waits for
a descheduled member.

:class:`ThreadGovernor` samples, between steps, how many threads of *other* processes are
runnable (``procs_running`` of /proc/stat minus this process's own runnable threads), smooths it,
and sets ``torch.set_num_threads`` to the cores left over (at least 1, at most the count the job
started with). Reading two small /proc files costs ~50 µs, against 10-1,000 ms per step. Where
/proc is missing (macOS, Windows) it never changes anything.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

PROC_STAT = Path("/proc/stat")
OWN_TASKS = Path("/proc/self/task")
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")

# Exponential smoothing of the sampled load: a sample is one instant, so a short-lived process
# (a shell command, a compiler) would flip the team size; ~10 samples make a decision.
SMOOTHING = 0.2
# Hysteresis: the team changes only after the smoothed target has differed from it this many
# samples in a row (each change costs a team rebuild and makes step timings jump).
CHANGE_AFTER_SAMPLES = 3


def runnable_threads_system(proc_stat: Path = PROC_STAT) -> int | None:
    """Threads the kernel reports as runnable right now, machine-wide (None: not readable)."""
    try:
        for line in proc_stat.read_text().splitlines():
            if line.startswith("procs_running "):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def runnable_threads_own(tasks: Path = OWN_TASKS) -> int:
    """This process's threads in state R (running or waiting for a core)."""
    count = 0
    try:
        entries = list(tasks.iterdir())
    except OSError:
        return 1  # at least the thread asking
    for entry in entries:
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # the thread ended meanwhile
        # "pid (comm) S ...": the state follows the last ')' (comm may contain spaces and parentheses)
        state = stat[stat.rfind(")") + 2 : stat.rfind(")") + 3]
        count += state == "R"
    return max(count, 1)


def usable_cpus(cgroup_cpu_max: Path = CGROUP_CPU_MAX) -> float:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota if set."""
    cpus = float(len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else float(os.cpu_count() or 1)
    try:
        quota, period = cgroup_cpu_max.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(int(quota) / int(period), 1.0))
    except (OSError, ValueError):
        pass
    return cpus


def others_share_of_our_cpus(system_runnable: int, own_runnable: int, our_cpus: float, online_cpus: int) -> float:
    """Runnable threads of other processes that compete for our cores.

    procs_running counts the whole machine; when this process may use only some of its cores
    (a pinned container on a large host) the others are assumed spread evenly over all of them.
    """
    others = max(system_runnable - own_runnable, 0)
    return others * min(our_cpus / max(online_cpus, 1), 1.0)


def target_threads(others: float, our_cpus: float, max_threads: int) -> int:
    """Team size that leaves the others their cores: the cores left over, rounded, in [1, max]."""
    free = our_cpus - others
    return int(min(max(math.floor(free + 0.5), 1), max_threads))


@dataclass
class ThreadGovernor:
    """Adapts ``torch.set_num_threads`` to the load of other processes; call :meth:`update` once
    per training step. ``max_threads``: the team size when the machine is quiet (default: torch's
    current setting, so OMP_NUM_THREADS or an earlier set_num_threads is respected)."""

    max_threads: int = 0
    smoothed_others: float | None = None
    pending: int = 0  # samples in a row whose target differed from the current team size
    active: bool = True

    def __post_init__(self) -> None:
        self.max_threads = self.max_threads or torch.get_num_threads()
        self.our_cpus = min(usable_cpus(), float(self.max_threads)) if self.max_threads > 1 else 1.0
        self.online_cpus = os.cpu_count() or 1
        # Nothing to adapt with one thread, and nothing to read without /proc.
        self.active = self.max_threads > 1 and runnable_threads_system() is not None

    def update(self) -> int:
        """Sample the load once; change the team size if the target held for a few samples.
        Returns the team size in use."""
        current = torch.get_num_threads()
        if not self.active:
            return current
        system = runnable_threads_system()
        if system is None:
            return current
        others = others_share_of_our_cpus(system, runnable_threads_own(), self.our_cpus, self.online_cpus)
        self.smoothed_others = (others if self.smoothed_others is None
                                else (1 - SMOOTHING) * self.smoothed_others + SMOOTHING * others)
        target = target_threads(self.smoothed_others, self.our_cpus, self.max_threads)
        self.pending = self.pending + 1 if target != current else 0
        if self.pending >= CHANGE_AFTER_SAMPLES:
            torch.set_num_threads(target)
            self.pending = 0
            return target
        return current

    def restore(self) -> None:
        """Give the process back the team size it started with."""
        if self.active:
            torch.set_num_threads(self.max_threads)
