"""Seconds per MCAN training step (forward, backward, Adam) on the CPU, alignment methods side by side.

    .venv/bin/python benchmarks/train_step.py --config configs/mcan_small.yaml \
        --alignment none,ct,gan,ot --batch-size 64 --regions fixed100 --steps 5 --json

Variants (alignment methods × precisions) are built once and timed interleaved, one step each per
round (A B C A B C …), so that load from other processes hits every variant alike; the median
over rounds is reported. ``--regions adaptive`` uses region counts like the adaptive bottom-up
features with batches bucketed by region count (see benchmarks/common.py); every variant sees the
same batch sequence, and samples/s is total samples / total time over the timed rounds.

``--isolate`` gives each variant its own worker process (same interleaving: one step per variant
per round, one process running at a time). Models trained in one process share its heap, and the
allocation pattern of one disturbs the other's reuse of freed memory (page faults in some steps);
a user trains one model per process, which this measures.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/mcan_small.yaml")
    p.add_argument("--alignment", default="none,ct,gan,ot", help="comma list of none,ct,gan,ot")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--regions", default="fixed100", help="fixed100, adaptive, or both comma-separated")
    p.add_argument("--precision", default="fp32", help="fp32, bf16 (CPU autocast), or a comma list")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[], help="config override KEY=VALUE")
    p.add_argument("--isolate", action="store_true", help="one worker process per variant (see above)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    p.add_argument("--out", default=None, help="also write the JSON here")
    return p.parse_args(argv)


class _Variant:
    """One (method, precision) trainer and the layout's batches; ``step(i)`` -> (seconds, CPU
    seconds, loss) of a training step on batch i."""

    def __init__(self, args, method: str, precision: str, layout: str, batches: list[dict] | None = None):
        if args.threads:
            torch.set_num_threads(args.threads)
        cfg = common.model_config(args.config, method, args.overrides)
        self.trainer = common.Trainer.build(cfg, "cpu", precision)
        self.batches = batches or common.make_batches(layout, args.batch_size, args.warmup + args.steps, cfg.feature_dim)

    def step(self, index: int) -> tuple[float, float, float]:
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = self.trainer.step(self.batches[index])
        return time.perf_counter() - start, time.process_time() - cpu_start, float(loss)


def _variant_worker(connection, args, method: str, precision: str, layout: str) -> None:
    variant = _Variant(args, method, precision, layout)
    connection.send("ready")
    while (index := connection.recv()) is not None:
        connection.send(variant.step(index))
    connection.send(common.peak_rss_mib())


class _IsolatedVariant:
    """A _Variant in its own process; steps run one at a time, on request."""

    def __init__(self, context, args, method: str, precision: str, layout: str):
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_variant_worker, args=(child, args, method, precision, layout))
        self.process.start()
        if self.connection.recv() != "ready":
            raise RuntimeError(f"worker for {method}/{precision} failed to start")

    def step(self, index: int) -> tuple[float, float, float]:
        self.connection.send(index)
        return self.connection.recv()

    def close(self) -> float:
        self.connection.send(None)
        peak = self.connection.recv()
        self.process.join()
        return peak


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.alignment.split(",") if m.strip()]
    layouts = [r.strip() for r in args.regions.split(",") if r.strip()]
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    context = multiprocessing.get_context("spawn")  # no fork of a process with OpenMP threads
    results, worker_peaks = [], []
    for layout in layouts:
        feature_dim = common.model_config(args.config, methods[0], args.overrides).feature_dim
        batches = common.make_batches(layout, args.batch_size, args.warmup + args.steps, feature_dim)
        variants = {}
        for method in methods:
            for precision in precisions:
                key = (method, precision)
                variants[key] = (  # a worker process makes the same (seeded) batches itself
                    _IsolatedVariant(context, args, method, precision, layout)
                    if args.isolate
                    else _Variant(args, method, precision, layout, batches)
                )
        times = {key: [] for key in variants}
        cpu_times = {key: [] for key in variants}
        losses = {key: [] for key in variants}
        for i in range(len(batches)):
            for key, variant in variants.items():
                elapsed, cpu_elapsed, loss = variant.step(i)
                if i >= args.warmup:
                    times[key].append(elapsed)
                    cpu_times[key].append(cpu_elapsed)
                    losses[key].append(loss)
        if args.isolate:
            worker_peaks += [variant.close() for variant in variants.values()]
        timed = batches[args.warmup :]
        samples = sum(len(b["region_counts"]) for b in timed)
        stats = common.batch_stats(timed)
        base = {p: common.median(times[("none", p)]) for p in precisions if ("none", p) in times}
        cpu_base = {p: common.median(cpu_times[("none", p)]) for p in precisions if ("none", p) in times}
        for (method, precision), values in times.items():
            med = common.median(values)
            row = {
                "method": method,
                "precision": precision,
                "regions": layout,
                "batch_size": args.batch_size,
                "steps": len(values),
                "median_s_per_step": med,
                "min_s_per_step": min(values),
                "all_s_per_step": values,
                "samples_per_s": samples / sum(values),
                "median_step_samples_per_s": args.batch_size / med,
                "ratio_vs_none": med / base[precision] if precision in base else None,
                # CPU seconds of this process (all threads) per step: robust when other processes
                # share the cores, which inflates wall time but not the work done.
                "median_cpu_s_per_step": common.median(cpu_times[(method, precision)]),
                "all_cpu_s_per_step": cpu_times[(method, precision)],
                "cpu_ratio_vs_none": (
                    common.median(cpu_times[(method, precision)]) / cpu_base[precision] if precision in cpu_base else None
                ),
                "last_loss": losses[(method, precision)][-1],
                **stats,
            }
            results.append(row)
    report = {
        "benchmark": "train_step",
        "date": common.now(),
        "config": args.config,
        "overrides": args.overrides,
        "machine": common.machine_info(),
        "isolated_processes": args.isolate,
        # With --isolate: the largest worker's (one model); else this process's (all models).
        "peak_rss_mib": max(worker_peaks) if worker_peaks else common.peak_rss_mib(),
        "results": results,
    }
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.json:
        print(text)
    else:
        print(f"{'regions':9} {'method':6} {'prec':5} {'s/step':>8} {'min':>7} {'samples/s':>10} {'vs none':>8} {'cpu s':>7} {'cpu vs none':>11} {'pad%':>5}")
        for r in results:
            ratio = f"{r['ratio_vs_none']:.3f}" if r["ratio_vs_none"] is not None else "-"
            print(
                f"{r['regions']:9} {r['method']:6} {r['precision']:5} {r['median_s_per_step']:8.3f} "
                f"{r['min_s_per_step']:7.3f} {r['samples_per_s']:10.1f} {ratio:>8} {r['median_cpu_s_per_step']:7.2f} "
                f"{(r['cpu_ratio_vs_none'] or float('nan')):11.3f} {100 * r['padding_fraction']:5.1f}"
            )
        print(f"peak RSS {report['peak_rss_mib']:.0f} MiB; {report['machine']}")
    return report


if __name__ == "__main__":
    main()
