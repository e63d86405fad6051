"""MCAN training step on one CUDA GPU: bf16 autocast, fused attention, alignment overheads.

    python benchmarks/gpu.py --out-json $OUT/gpu.json          # on the GPU machine (~3-5 min)
    .venv/bin/python benchmarks/gpu.py --smoke                  # CPU, tiny shapes: checks the script

Self-contained: imports vqa_align from this checkout (no install needed). For each region layout
(fixed100, adaptive bucketed), batch size and alignment method it times full training steps
(forward, BCE(sum) + λ·alignment, backward, fused Adam) with the inputs already in GPU memory (as a
GPU-resident feature store would give them), and reports samples/s, ms/step, the overhead of each
alignment method over ``none`` and the peak GPU memory. It also measures the card's bf16 matmul
rate for reference and, if time allows, a torch.compile variant of ``none``. Results are written
to --out-json (default $OUT/gpu.json when $OUT is set) after every measurement, so a run cut short
still leaves what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402
from vqa_align.train.cuda_graphs import WARMUP_STEPS, GraphedTrainStep  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(common.REPO_ROOT / "configs" / "mcan_small.yaml"))
    p.add_argument("--batch-sizes", default="64,256,512")
    p.add_argument("--regions", default="fixed100,adaptive")
    p.add_argument("--methods", default="none,ct,gan,ot")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument(
        "--kernels", default="auto",
        help="comma list of model.alignment.kernels values to time ct and gan with (auto, triton, fused, reference); "
        "with more than one, rows are labelled method[kernels]",
    )  # fmt: skip
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--distinct-batches", type=int, default=6, help="batches kept on the GPU and cycled")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"], help="torch.compile variant of none")
    p.add_argument(
        "--graphs", default="", help="comma list of methods to also time as one CUDA graph per batch shape (CUDA only)"
    )
    p.add_argument("--budget-s", type=float, default=330.0, help="skip remaining work after this many seconds")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--out-json", default=None)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on whatever device (CPU ok): checks the script")
    return p.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(device: torch.device, n: int = 8192, reps: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


class GraphedSteps:
    """The benchmark trainer's step as CUDA graphs through the trainer's own mechanism,
    :class:`vqa_align.train.cuda_graphs.GraphedTrainStep` (what ``train.cuda_graphs`` uses): the first
    steps eager, then one graph per distinct batch shape, all in one shared memory pool."""

    def __init__(self, trainer: common.Trainer, batches: list[dict]):
        def whole_step(inputs: dict, targets: torch.Tensor):
            loss = trainer.loss({**inputs, "targets": targets}, autocast_cache=False)
            loss.backward()
            trainer.optimizer.step()
            loss = loss.detach()
            return loss, loss, loss

        self.graphed = GraphedTrainStep(whole_step, lambda: trainer.optimizer.zero_grad(set_to_none=True))
        for batch in batches[:WARMUP_STEPS] + batches:  # eager warm-up, then capture every shape
            self.step(batch)

    @property
    def graphs(self) -> dict:
        return self.graphed.graphs

    def step(self, batch: dict) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "targets"}
        return self.graphed(inputs, batch["targets"])[0]


def step_flops(cfg, batch: dict) -> float:
    """Approximate matmul FLOPs of one training step (forward ×3) for the model, excluding alignment."""
    b, t = batch["tokens"].shape
    n = batch["features"].shape[1]
    d, f, layers = cfg.hidden_size, cfg.ffn_size, cfg.num_layers
    lin = 0.0
    lin += b * n * cfg.feature_dim * d  # region projection
    lin += b * t * 4 * (cfg.word_embed_dim + d) * d  # LSTM
    sa = lambda rows, keys: rows * (4 * d * d + 2 * d * f) + 2 * rows * keys * d  # noqa: E731
    lin += layers * sa(b * t, t)  # encoder SA
    lin += layers * (sa(b * n, n) + b * n * 2 * d * d + b * t * 2 * d * d + 2 * b * n * t * d)  # decoder SA + GA
    lin += 2 * (b * t + b * n) * d * cfg.flat_mlp_size + 2 * b * d * cfg.flat_size + b * cfg.flat_size * cfg.num_answers
    return 2 * lin * 3


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out_path = args.out_json or (str(Path(os.environ["OUT"]) / "gpu.json") if os.environ.get("OUT") else None)
    overrides = list(args.overrides)
    batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    kernels = args.kernels.split(",")

    def variants(names: list[str]) -> list[tuple[str, str, list[str]]]:
        """(label, method, extra overrides): ct and gan once per --kernels value."""
        out = []
        for method in names:
            for kern in kernels if method in ("ct", "gan") else [None]:
                label = method if kern is None or len(kernels) == 1 else f"{method}[{kern}]"
                out.append((label, method, [f"model.alignment.kernels={kern}"] if kern else []))
        return out

    methods = args.methods.split(",")
    layouts = args.regions.split(",")
    steps, warmup = args.steps, args.warmup
    if args.smoke:
        overrides += [
            "model.hidden_size=64", "model.num_heads=4", "model.ffn_size=128", "model.num_layers=2",
            "model.flat_mlp_size=64", "model.flat_size=96", "model.feature_dim=32", "model.word_embed_dim=16",
        ]
        batch_sizes, steps, warmup = [8, 16], 2, 1
        if device.type == "cpu" and args.precision == "bf16":
            # oneDNN has no bf16 LSTM on CPUs without native bf16 (e.g. AMD EPYC without
            # avx512_bf16): the smoke run checks the script, so it runs in fp32 there.
            from vqa_align.align.kernels.common import native_bf16_matmul

            if not native_bf16_matmul(device):
                args.precision = "fp32"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = False  # shapes vary with adaptive batches
    report: dict = {
        "benchmark": "gpu_train_step",
        "date": common.now(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)",
        "torch": torch.__version__,
        "precision": args.precision,
        "config": args.config,
        "overrides": overrides,
        "kernels": kernels,
        "results": [],
    }
    if device.type == "cuda":
        from vqa_align.align.distances import import_failure

        report["triton_importable"] = import_failure("vqa_align.align.kernels.triton_ct") is None
        report["triton_import_error"] = import_failure("vqa_align.align.kernels.triton_ct")

    def save() -> None:
        if out_path:
            Path(out_path).parent.mkdir(parents=True, exist_ok=True)
            Path(out_path).write_text(json.dumps(report, indent=2) + "\n")

    if device.type == "cuda" and not args.smoke:
        report["bf16_matmul_tflops"] = matmul_tflops(device)
        print(f"device {report['device']}: bf16 8192^3 matmul {report['bf16_matmul_tflops']:.0f} TFLOP/s", flush=True)
    save()

    def out_of_time() -> bool:
        return time.perf_counter() - started > args.budget_s

    def measure(trainer, batches: list[dict]) -> dict:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for i in range(max(warmup, len(batches))):  # every distinct shape once (cuBLAS/cuDNN plans)
            trainer.step(batches[i % len(batches)])
        sync(device)
        start = time.perf_counter()
        samples = 0
        for i in range(steps):
            batch = batches[i % len(batches)]
            trainer.step(batch)
            samples += batch["tokens"].shape[0]
        sync(device)
        elapsed = time.perf_counter() - start
        # Graph replays allocate nothing (their memory is the pool reserved at capture), so the
        # allocator's reserved peak is the comparable number for them; allocated for eager steps.
        if device.type != "cuda":
            peak = float("nan")
        elif isinstance(trainer, GraphedSteps):
            peak = torch.cuda.max_memory_reserved(device) / 2**30
        else:
            peak = torch.cuda.max_memory_allocated(device) / 2**30
        return {"ms_per_step": 1000 * elapsed / steps, "samples_per_s": samples / elapsed, "peak_gpu_mem_gib": peak}

    print(f"{'regions':9} {'batch':>5} {'method':8} {'ms/step':>8} {'samples/s':>10} {'vs none':>8} {'TFLOP/s':>8} {'peak GiB':>8}", flush=True)
    for layout in layouts:
        for batch_size in batch_sizes:
            if out_of_time():
                print(f"(time budget reached: skipping {layout} batch {batch_size})", flush=True)
                continue
            feature_dim = common.model_config(args.config, "none", overrides).feature_dim
            cpu_batches = common.make_batches(layout, batch_size, args.distinct_batches if not args.smoke else 2, feature_dim)
            stats = common.batch_stats(cpu_batches)
            batches = [common.to_device(b, device) for b in cpu_batches]
            base = None
            for label, method, extra in variants(methods):
                if out_of_time():
                    break
                cfg = common.model_config(args.config, method, overrides + extra)
                try:
                    trainer = common.Trainer.build(cfg, device, args.precision)
                    row = {"regions": layout, "batch_size": batch_size, "method": label, **stats, **measure(trainer, batches)}
                except Exception as err:  # noqa: BLE001 - report and keep the other rows
                    report.setdefault("errors", []).append(f"{layout} {batch_size} {label}: {type(err).__name__}: {err}"[:2000])
                    print(f"{label} failed: {report['errors'][-1][:300]}", flush=True)
                    save()
                    continue
                flops = sum(step_flops(cfg, b) for b in batches[:steps]) / min(steps, len(batches))
                row["model_tflops_per_s"] = flops / (row["ms_per_step"] / 1000) / 1e12
                if method == "none":
                    base = row["ms_per_step"]
                row["ratio_vs_none"] = row["ms_per_step"] / base if base else None
                report["results"].append(row)
                save()
                ratio = f"{row['ratio_vs_none']:.3f}" if row["ratio_vs_none"] else "-"
                print(
                    f"{layout:9} {batch_size:5d} {label:8} {row['ms_per_step']:8.1f} {row['samples_per_s']:10.0f} "
                    f"{ratio:>8} {row['model_tflops_per_s']:8.1f} {row['peak_gpu_mem_gib']:8.2f}",
                    flush=True,
                )
                del trainer
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            for label, method, extra in variants([m for m in args.graphs.split(",") if m]) if device.type == "cuda" else []:
                if out_of_time():
                    break
                try:
                    cfg = common.model_config(args.config, method, overrides + extra)
                    trainer = common.Trainer.build(cfg, device, args.precision, capturable=True)
                    torch.cuda.reset_peak_memory_stats(device)
                    t0 = time.perf_counter()
                    graphed = GraphedSteps(trainer, batches)
                    warmup_capture_s = time.perf_counter() - t0
                    row = {"regions": layout, "batch_size": batch_size, "method": f"{label}+graphs", **stats}
                    row.update(measure(graphed, batches), warmup_and_capture_s=warmup_capture_s, graphs=len(graphed.graphs))
                    row["ratio_vs_none"] = row["ms_per_step"] / base if base else None
                    report["results"].append(row)
                    print(
                        f"{layout:9} {batch_size:5d} {label + '+graphs':8} {row['ms_per_step']:8.1f} "
                        f"{row['samples_per_s']:10.0f} (warm-up + capture {warmup_capture_s:.1f} s, {len(graphed.graphs)} graphs) "
                        f"{row['peak_gpu_mem_gib']:8.2f}",
                        flush=True,
                    )
                    del graphed, trainer
                except Exception as err:  # noqa: BLE001 - report and keep the eager results
                    report.setdefault("graph_errors", []).append(f"{layout} {batch_size} {label}: {type(err).__name__}: {err}"[:2000])
                    print(f"CUDA graphs failed for {label}: {report['graph_errors'][-1][:300]}", flush=True)
                save()
                torch.cuda.empty_cache()
            del batches

    want_compile = args.compile == "on" or (args.compile == "auto" and device.type == "cuda" and not args.smoke)
    if want_compile and not out_of_time():
        # One variant only: none, largest batch, fixed100 (static shapes). Compile time is reported.
        try:
            batch_size = max(batch_sizes)
            cfg = common.model_config(args.config, "none", overrides)
            trainer = common.Trainer.build(cfg, device, args.precision)
            trainer.model = torch.compile(trainer.model)
            batches = [common.to_device(b, device) for b in common.make_batches("fixed100", batch_size, 2, cfg.feature_dim)]
            t0 = time.perf_counter()
            trainer.step(batches[0])
            sync(device)
            compile_s = time.perf_counter() - t0
            row = {"regions": "fixed100", "batch_size": batch_size, "method": "none+compile", "compile_s": compile_s}
            row.update(measure(trainer, batches))
            report["results"].append(row)
            print(f"fixed100  {batch_size:5d} none+compile {row['ms_per_step']:8.1f} {row['samples_per_s']:10.0f} (compile {compile_s:.0f} s) {row['peak_gpu_mem_gib']:.2f} GiB", flush=True)
        except Exception as err:  # noqa: BLE001 - report and keep the eager results
            report["compile_error"] = f"{type(err).__name__}: {err}"[:2000]
            print(f"torch.compile failed: {report['compile_error'][:300]}", flush=True)
        save()
    report["total_s"] = time.perf_counter() - started
    save()
    print(f"total {report['total_s']:.0f} s" + (f"; JSON: {out_path}" if out_path else ""), flush=True)
    return report


if __name__ == "__main__":
    main()
