"""Training-step speed when other processes share the CPU: quiet, then beside N busy loops.

    .venv/bin/python benchmarks/contention.py --config configs/easy_vqa.yaml --alignment ct \
        --batch-size 64 --busy 0,1,3 --variants fixed,passive,governor --json

For each count of busy loops (pure-Python ``while True`` processes, each wanting one core) and
each variant, a fresh worker process builds the model and times training steps on the synthetic
batches of benchmarks/common.py (the trainer's step: forward, loss, backward, Adam). A fresh
process per measurement, because OpenMP reads its environment once, at start.

Variants:
- ``fixed``: torch's default team (one thread per core), what vqa-align did before the
  ThreadGovernor;
- ``passive``: the same with ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep at barriers, no spinning);
- ``governor``: :class:`vqa_align.cpu_threads.ThreadGovernor` updated after every step, as the
  trainer does (``train.adapt_threads``, the default).

Reported per (variant, busy): median seconds per step over the timed steps, and the fraction of
the *fixed, quiet* speed it keeps (the issue's yardstick: ≥ 50 % beside one busy process, ≥ 25 %
beside three, quiet speed within 5 %).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
VARIANT_ENV = {"fixed": {}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"}, "governor": {}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/easy_vqa.yaml")
    p.add_argument("--alignment", default="ct")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--regions", default="fixed100", help="fixed100 or adaptive (benchmarks/common.py)")
    p.add_argument("--busy", default="0,1,3", help="comma list of busy-loop counts")
    p.add_argument("--variants", default="fixed,passive,governor", help=f"comma list of {','.join(VARIANT_ENV)}")
    p.add_argument("--steps", type=int, default=12, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps (the governor settles in 3)")
    p.add_argument("--rounds", type=int, default=1, help="repeat the whole grid, alternating")
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _busy_loop() -> None:
    while True:
        pass


def _worker(args) -> None:
    """One measurement in this process: print {"seconds": [...], "threads": [...]} as JSON."""
    sys.path.insert(0, str(BENCHMARKS))
    import common  # noqa: PLC0415 - torch only in the worker, after the environment is set

    from vqa_align.cpu_threads import ThreadGovernor  # noqa: PLC0415

    cfg = common.model_config(args.config, args.alignment)
    trainer = common.Trainer.build(cfg)
    batches = common.make_batches(args.regions, args.batch_size, args.warmup + args.steps, cfg.feature_dim)
    governor = ThreadGovernor() if args.worker == "governor" else None
    seconds, threads = [], []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        trainer.step(batch)
        elapsed = time.perf_counter() - start
        team = governor.update() if governor is not None else common.torch.get_num_threads()
        if i >= args.warmup:
            seconds.append(elapsed)
            threads.append(team)
    print(json.dumps({"seconds": seconds, "threads": threads}))


def measure(args, variant: str, busy: int) -> dict:
    context = multiprocessing.get_context("spawn")
    loops = [context.Process(target=_busy_loop, daemon=True) for _ in range(busy)]
    for loop in loops:
        loop.start()
    try:
        time.sleep(0.5)  # let the loops take their cores
        argv = [sys.executable, __file__, "--worker", variant, "--config", args.config, "--alignment",
                args.alignment, "--batch-size", str(args.batch_size), "--regions", args.regions,
                "--steps", str(args.steps), "--warmup", str(args.warmup)]
        done = subprocess.run(argv, env={**os.environ, **VARIANT_ENV[variant]}, capture_output=True, text=True,
                              check=False)
        if done.returncode != 0:
            raise RuntimeError(f"worker {variant}/busy={busy} failed:\n{done.stderr[-2000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        for loop in loops:
            loop.terminate()
            loop.join()
    return {"variant": variant, "busy": busy, "median_s": statistics.median(result["seconds"]),
            "threads": statistics.median(result["threads"]), "seconds": result["seconds"]}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        _worker(args)
        return {}
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANT_ENV]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {list(VARIANT_ENV)}")
    busy_counts = [int(b) for b in args.busy.split(",")]
    rows = []
    for round_index in range(args.rounds):
        for busy in busy_counts:
            order = variants if round_index % 2 == 0 else variants[::-1]
            rows += [dict(measure(args, v, busy), round=round_index) for v in order]
    quiet = {v: statistics.median(r["median_s"] for r in rows if r["variant"] == v and r["busy"] == 0)
             for v in variants if 0 in busy_counts}
    reference = quiet.get("fixed") or next(iter(quiet.values()), None)
    summary = []
    for v in variants:
        for busy in busy_counts:
            s = statistics.median(r["median_s"] for r in rows if r["variant"] == v and r["busy"] == busy)
            threads = statistics.median(r["threads"] for r in rows if r["variant"] == v and r["busy"] == busy)
            summary.append({"variant": v, "busy": busy, "median_s": s, "threads": threads,
                            "share_of_quiet_fixed": reference / s if reference else None})
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown") if Path("/proc/cpuinfo").exists() else "unknown"
    doc = {"args": {k: v for k, v in vars(args).items() if k != "worker"}, "cpu": cpu, "cores": os.cpu_count(),
           "summary": summary, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=1))
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        print(f"{'variant':10} {'busy':>4} {'s/step':>8} {'threads':>7} {'of quiet':>8}   ({cpu}, {os.cpu_count()} cores)")
        for row in summary:
            share = f"{100 * row['share_of_quiet_fixed']:.0f} %" if row["share_of_quiet_fixed"] else "-"
            print(f"{row['variant']:10} {row['busy']:>4} {row['median_s']:>8.3f} {row['threads']:>7.1f} {share:>8}")
    return doc


if __name__ == "__main__":
    main()
