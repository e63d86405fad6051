"""One aligner alone on the CPU: forward + backward at MCAN-small shapes, each implementation.

    .venv/bin/python benchmarks/aligner.py --methods ct,gan --batch-size 64 --repeats 7 --json

Shapes per module kind (MCAN-small: 8 heads of 64, 14 question tokens, 100 regions):
``sa_image`` (100 queries, 100 keys), ``sga_guided`` (100 region queries, 14 token keys),
``sa_question`` (14, 14). Implementations (``model.alignment.kernels``; the dispatch table is
vqa_align/align/distances/__init__.py), timed interleaved, one call each per round, the median over
rounds reported:

- ``fused``: the hand-fused forward/backward in PyTorch ops (vqa_align/align/kernels/fused.py);
- ``reference``: the helper ``nn.Module``\ s under autograd (fp32 whatever ``--precision`` says).

``per_step_s`` is what one MCAN-small training step spends in them: six layers of each kind.
``median_cpu_ms`` is the process's CPU time (all threads) per call: on a CPU shared with other
jobs it is less inflated by waiting than the wall time. The
trainer's allocator setting (vqa_align/train/host_memory.py) is applied, as in training.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from vqa_align.align.aligner import HeadAligner  # noqa: E402
from vqa_align.align.kernels.common import compute_dtype  # noqa: E402
from vqa_align.config import AlignmentConfig  # noqa: E402
from vqa_align.train.host_memory import keep_freed_memory  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info  # noqa: E402

HEADS, HEAD_DIM, TOKENS, REGIONS, LAYERS = 8, 64, 14, 100, 6
SHAPES = {"sa_image": (REGIONS, REGIONS), "sga_guided": (REGIONS, TOKENS), "sa_question": (TOKENS, TOKENS)}


def time_call(aligner: HeadAligner, queries: torch.Tensor, keys: torch.Tensor, valid_q, valid_k) -> tuple[float, float]:
    """-> (wall seconds, CPU seconds of this process, all threads) of one forward + backward."""
    start, cpu_start = time.perf_counter(), time.process_time()
    aligner(queries, keys, valid_q, valid_k).sum().backward()
    return time.perf_counter() - start, time.process_time() - cpu_start


def aligner_dtype(precision: str) -> torch.dtype:
    """The dtype the fused helpers run in on this CPU for ``helper_precision``."""
    return compute_dtype(precision, torch.empty(0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="ct,gan")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--precision", default="auto", help="model.alignment.helper_precision")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    keep_freed_memory()
    results = []
    for method in args.methods.split(","):
        config = AlignmentConfig(method=method, helper_precision=args.precision)
        aligners = {"fused": HeadAligner(HEAD_DIM, config)}
        aligners["reference"] = HeadAligner(HEAD_DIM, config)
        aligners["reference"].load_state_dict(aligners["fused"].state_dict())
        aligners["reference"].kernels = "reference"
        implementations = list(aligners)
        for kind, (n_q, n_k) in SHAPES.items():
            gen = torch.Generator().manual_seed(0)
            queries = torch.randn(args.batch_size, HEADS, n_q, HEAD_DIM, generator=gen, requires_grad=True)
            keys = torch.randn(args.batch_size, HEADS, n_k, HEAD_DIM, generator=gen, requires_grad=True)
            valid_q = torch.ones(args.batch_size, n_q, dtype=torch.bool)
            valid_k = torch.ones(args.batch_size, n_k, dtype=torch.bool)
            times: dict[str, list[tuple[float, float]]] = {g: [] for g in implementations}
            for round_ in range(args.warmup + args.repeats):
                for kernels in implementations:
                    elapsed = time_call(aligners[kernels], queries, keys, valid_q, valid_k)
                    if round_ >= args.warmup:
                        times[kernels].append(elapsed)
            for kernels in implementations:
                wall, cpu = (statistics.median(t[i] for t in times[kernels]) for i in (0, 1))
                results.append(
                    {"method": method, "module": kind, "kernels": kernels, "median_ms": 1e3 * wall, "median_cpu_ms": 1e3 * cpu}
                )
    totals = {}
    for row in results:
        key = (row["method"], row["kernels"])
        totals[key] = totals.get(key, 0.0) + LAYERS * row["median_ms"] / 1e3
    report = {
        "benchmark": "aligner",
        "date": time.strftime("%Y-%m-%d"),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "torch": torch.__version__,
        "machine": machine_info(),
        "helper_dtype": str(aligner_dtype(args.precision)),
        "results": results,
        "per_step_s": [{"method": m, "kernels": g, "seconds": round(s, 4)} for (m, g), s in totals.items()],
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for method in args.methods.split(","):
            implementations = list(dict.fromkeys(r["kernels"] for r in results if r["method"] == method))
            print(f"{'method':6s} {'module':12s} " + " ".join(f"{g + ' ms':>10s}" for g in implementations))
            for kind in SHAPES:
                cells = [next(r["median_ms"] for r in results if (r["method"], r["module"], r["kernels"]) == (method, kind, g)) for g in implementations]
                print(f"{method:6s} {kind:12s} " + " ".join(f"{c:10.1f}" for c in cells))
            print(f"{method:6s} {'per step (s)':12s} " + " ".join(f"{totals[(method, g)]:10.3f}" for g in implementations))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
