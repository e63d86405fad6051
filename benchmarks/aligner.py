"""One fused aligner alone on the CPU: forward + backward at MCAN-small shapes, three implementations.

    .venv/bin/python benchmarks/aligner.py --methods ct,gan --batch-size 64 --repeats 7 --json

Shapes per module kind (MCAN-small: 8 heads of 64, 14 question tokens, 100 regions):
``sa_image`` (100 queries, 100 keys), ``sga_guided`` (100 region queries, 14 token keys),
``sa_question`` (14, 14). Implementations (see vqa_align/native_kernels.py), timed interleaved, one
call each per round, the median over rounds reported:

- ``native``: the cache-blocked AMX kernels (csrc/aligner_blocks.cpp) where the CPU has them; for
  CT forward and backward at once, one sample at a time (``ct_train``);
- ``two_pass`` (CT): the same kernels, forward then backward (``VQA_ALIGN_CT_ONE_PASS=0``);
- ``layers``: layer by layer, the matmuls in ATen and the one-pass C++ glue between them
  (``VQA_ALIGN_HELPER_BLOCKS=0``);
- ``torch``: layer by layer with PyTorch ops only (``VQA_ALIGN_NATIVE_KERNELS=0``).

``per_step_s`` is what one MCAN-small training step spends in them: six layers of each kind. The
trainer's allocator setting (vqa_align/host_memory.py) is applied, as in training.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from vqa_align import native_kernels  # noqa: E402
from vqa_align.alignment import HeadAligner  # noqa: E402
from vqa_align.config import AlignmentConfig  # noqa: E402
from vqa_align.host_memory import keep_freed_memory  # noqa: E402

HEADS, HEAD_DIM, TOKENS, REGIONS, LAYERS = 8, 64, 14, 100, 6
SHAPES = {"sa_image": (REGIONS, REGIONS), "sga_guided": (REGIONS, TOKENS), "sa_question": (TOKENS, TOKENS)}


def time_call(aligner: HeadAligner, queries: torch.Tensor, keys: torch.Tensor, valid_q, valid_k, glue: str) -> float:
    os.environ[native_kernels.ENV_SWITCH] = "0" if glue == "torch" else "1"
    os.environ[native_kernels.HELPER_BLOCKS_SWITCH] = "1" if glue in ("native", "two_pass") else "0"
    os.environ[native_kernels.CT_ONE_PASS_SWITCH] = "0" if glue == "two_pass" else "1"
    start = time.perf_counter()
    aligner(queries, keys, valid_q, valid_k).sum().backward()
    return time.perf_counter() - start


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
        glues = ["native", "layers", "torch"] if native_kernels.load_native() else ["torch"]
        if method == "ct" and native_kernels.load_native():
            glues.insert(1, "two_pass")
        aligner = HeadAligner(HEAD_DIM, AlignmentConfig(method=method, helper_precision=args.precision))
        for kind, (n_q, n_k) in SHAPES.items():
            gen = torch.Generator().manual_seed(0)
            queries = torch.randn(args.batch_size, HEADS, n_q, HEAD_DIM, generator=gen, requires_grad=True)
            keys = torch.randn(args.batch_size, HEADS, n_k, HEAD_DIM, generator=gen, requires_grad=True)
            valid_q = torch.ones(args.batch_size, n_q, dtype=torch.bool)
            valid_k = torch.ones(args.batch_size, n_k, dtype=torch.bool)
            times: dict[str, list[float]] = {g: [] for g in glues}
            for round_ in range(args.warmup + args.repeats):
                for glue in glues:
                    elapsed = time_call(aligner, queries, keys, valid_q, valid_k, glue)
                    if round_ >= args.warmup:
                        times[glue].append(elapsed)
            for glue in glues:
                median = statistics.median(times[glue])
                results.append({"method": method, "module": kind, "glue": glue, "median_ms": 1e3 * median})
    os.environ.pop(native_kernels.ENV_SWITCH, None)
    os.environ.pop(native_kernels.HELPER_BLOCKS_SWITCH, None)
    os.environ.pop(native_kernels.CT_ONE_PASS_SWITCH, None)
    totals = {}
    for row in results:
        key = (row["method"], row["glue"])
        totals[key] = totals.get(key, 0.0) + LAYERS * row["median_ms"] / 1e3
    report = {
        "benchmark": "aligner",
        "date": time.strftime("%Y-%m-%d"),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "torch": torch.__version__,
        "results": results,
        "per_step_s": [{"method": m, "glue": g, "seconds": round(s, 4)} for (m, g), s in totals.items()],
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for method in args.methods.split(","):
            glues = list(dict.fromkeys(r["glue"] for r in results if r["method"] == method))
            print(f"{'method':6s} {'module':12s} " + " ".join(f"{g + ' ms':>10s}" for g in glues))
            for kind in SHAPES:
                cells = [next(r["median_ms"] for r in results if (r["method"], r["module"], r["glue"]) == (method, kind, g)) for g in glues]
                print(f"{method:6s} {kind:12s} " + " ".join(f"{c:10.1f}" for c in cells))
            print(f"{method:6s} {'per step (s)':12s} " + " ".join(f"{totals[(method, g)]:10.3f}" for g in glues))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
