"""The thread governor: /proc parsing, the target rule, hysteresis, and a real busy machine."""

from __future__ import annotations

import multiprocessing
import os
import sys
import time

import pytest
import torch

from vqa_align import cpu_threads
from vqa_align.cpu_threads import ThreadGovernor, others_share_of_our_cpus, target_threads

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")


@pytest.fixture
def team_of_two():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_reads_procs_running(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  1 2 3\nctxt 99\nprocs_running 7\nprocs_blocked 1\n")
    assert cpu_threads.runnable_threads_system(stat) == 7
    stat.write_text("cpu 1 2 3\n")
    assert cpu_threads.runnable_threads_system(stat) is None
    assert cpu_threads.runnable_threads_system(tmp_path / "absent") is None


def test_counts_own_runnable_threads_with_odd_names(tmp_path):
    for tid, comm, state in [(1, "python", "R"), (2, "a (b) c", "S"), (3, "x)y", "R"), (4, "omp", "S")]:
        (tmp_path / str(tid)).mkdir()
        (tmp_path / str(tid) / "stat").write_text(f"{tid} ({comm}) {state} 1 2 3\n")
    assert cpu_threads.runnable_threads_own(tmp_path) == 2


def test_cgroup_quota_caps_usable_cpus(tmp_path):
    cpu_max = tmp_path / "cpu.max"
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpu_max.write_text("max 100000\n")
    assert cpu_threads.usable_cpus(cpu_max) == affinity
    cpu_max.write_text("50000 100000\n")  # half a core: still one thread
    assert cpu_threads.usable_cpus(cpu_max) == 1.0
    assert cpu_threads.usable_cpus(tmp_path / "absent") == affinity


@pytest.mark.parametrize(
    "others, cpus, max_threads, expected",
    [(0.0, 2, 2, 2), (0.4, 2, 2, 2), (0.6, 2, 2, 1), (1.0, 2, 2, 1), (3.0, 2, 2, 1),
     (1.0, 8, 8, 7), (2.6, 8, 4, 4), (6.0, 8, 8, 2), (0.0, 8, 4, 4)],
)
def test_target_leaves_the_others_their_cores(others, cpus, max_threads, expected):
    assert target_threads(others, cpus, max_threads) == expected


def test_others_are_spread_over_the_machine_for_a_pinned_process():
    assert others_share_of_our_cpus(10, 2, 2.0, 2) == 8  # all cores ours: every other thread competes
    assert others_share_of_our_cpus(34, 2, 2.0, 64) == pytest.approx(1.0)  # 2 of 64 cores: 1/32 of them
    assert others_share_of_our_cpus(1, 3, 2.0, 2) == 0  # only our own threads run


def test_governor_changes_the_team_only_after_the_load_holds(monkeypatch, team_of_two):
    load = {"system": 1}
    monkeypatch.setattr(cpu_threads, "runnable_threads_system", lambda *a: load["system"])
    monkeypatch.setattr(cpu_threads, "runnable_threads_own", lambda *a: 1)
    monkeypatch.setattr(cpu_threads, "usable_cpus", lambda *a: 2.0)
    governor = ThreadGovernor()
    assert governor.active and governor.max_threads == 2
    assert [governor.update() for _ in range(3)] == [2, 2, 2]  # quiet
    load["system"] = 2  # one busy process beside us
    # the smoothed load passes 0.5 after 3 samples, then the target must hold 3 samples
    teams = [governor.update() for _ in range(8)]
    assert teams[:3] == [2, 2, 2] and teams[-1] == 1 and torch.get_num_threads() == 1
    load["system"] = 1  # quiet again: the full team comes back
    teams = [governor.update() for _ in range(12)]
    assert teams[0] == 1 and teams[-1] == 2 and torch.get_num_threads() == 2
    load["system"] = 3  # a one-sample blip does not change anything
    governor.update()
    load["system"] = 1
    assert [governor.update() for _ in range(5)] == [2] * 5


def test_governor_respects_a_one_thread_setting_and_restores(monkeypatch, team_of_two):
    torch.set_num_threads(1)
    assert not ThreadGovernor().active  # the user asked for one thread: nothing to adapt
    torch.set_num_threads(2)
    monkeypatch.setattr(cpu_threads, "runnable_threads_system", lambda *a: None)
    assert not ThreadGovernor().active  # no /proc: never changes anything
    governor = ThreadGovernor(max_threads=2)
    governor.active = True
    torch.set_num_threads(1)
    governor.restore()
    assert torch.get_num_threads() == 2


def _spin(stop_at: float) -> None:
    while time.monotonic() < stop_at:
        pass


@linux_only
def test_governor_shrinks_the_team_beside_real_busy_processes(team_of_two):
    """Busy loops on every core we may use: the governor must see them through /proc."""
    if cpu_threads.runnable_threads_system() is None:
        pytest.skip("no procs_running in /proc/stat here")
    governor = ThreadGovernor(max_threads=2)
    cores = len(os.sched_getaffinity(0))
    context = multiprocessing.get_context("spawn")
    loops = [context.Process(target=_spin, args=(time.monotonic() + 20.0,), daemon=True) for _ in range(cores)]
    for loop in loops:
        loop.start()
    try:
        time.sleep(1.0)  # spawned interpreters start and spin
        for _ in range(40):
            if governor.update() == 1:
                break
            time.sleep(0.02)
        assert torch.get_num_threads() == 1, f"others seen: {governor.smoothed_others}"
    finally:
        for loop in loops:
            loop.terminate()
            loop.join()


def test_trainer_consults_the_governor_after_every_optimizer_step(monkeypatch, tmp_path, easy_vqa_cache):
    """train.adapt_threads (the default) builds a governor on the CPU, updates it once per
    optimizer step and gives the process its team back at the end."""
    from conftest import tiny_run_overrides

    from vqa_align.config import load_config
    from vqa_align.train import trainer as trainer_module

    calls = {"update": 0, "restore": 0}

    class CountingGovernor:
        def update(self):
            calls["update"] += 1
            return torch.get_num_threads()

        def restore(self):
            calls["restore"] += 1

    monkeypatch.setattr(trainer_module, "ThreadGovernor", CountingGovernor)
    config = load_config("configs/easy_vqa.yaml", tiny_run_overrides(easy_vqa_cache, **{"train.adapt_threads": True,
                                                                       "train.epochs": 1, "train.max_steps": 3}))
    trainer = trainer_module.Trainer(config, tmp_path / "run")
    trainer.fit()
    assert calls == {"update": 3, "restore": 1}
    off = load_config("configs/easy_vqa.yaml", tiny_run_overrides(easy_vqa_cache, **{"train.epochs": 1, "train.max_steps": 1}))
    assert trainer_module.Trainer(off, tmp_path / "run2").threads is None


def test_an_experiment_reuses_runs_recorded_before_adapt_threads_existed():
    """Runs finished before train.adapt_threads (their recorded config lacks it) keep matching."""
    from vqa_align.config import load_config
    from vqa_align.experiments.grid import config_signature

    config = load_config("configs/easy_vqa.yaml")
    recorded = config.to_dict()
    del recorded["train"]["adapt_threads"]
    assert config_signature(recorded) == config_signature(config)
