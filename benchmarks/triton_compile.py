"""Compile the Triton CT/GAN kernels for an NVIDIA GPU without one, and report their registers and spills.

    python benchmarks/triton_compile.py                      # sm_90 (H100/H200), MCAN-small widths
    python benchmarks/triton_compile.py --arch 80 --out-json /tmp/triton_compile.json

Each kernel of vqa_align/align/kernels/triton_ct.py and triton_gan.py is compiled (Triton -> PTX) with the launch shapes the
module uses for MCAN-small (head dim 64, helpers 64/32; transport tiles of image self-attention,
128 x 128, and guided attention, 128 x 16) in bf16 and fp32, and the PTX is assembled by the
ptxas shipped with Triton (`ptxas -v`). What it shows: that every kernel compiles for the GPU,
and how many registers it uses and how many bytes it spills per thread, which is how the block
sizes and warp counts were chosen (spills go through the L1 cache: slower, still correct). It
does not run anything: no timing. Needs Triton with its NVIDIA backend; not TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402, F401 - puts the repository on sys.path
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from vqa_align.align.kernels import triton_common as tk  # noqa: E402
from vqa_align.align.kernels import triton_ct, triton_gan  # noqa: E402

WEIGHTS = {"nav_w1", "nav_b1", "nav_w2", "nav_b2", "gate_w", "gate_b", "crit_w1", "crit_b1", "crit_w2", "crit_b2",
           "w1", "b1", "w2", "b2"}  # fmt: skip
FLOATS = {"rho", "slope"}


def signature(kernel, io: str, constexprs: dict) -> dict:
    """Triton's signature of ``kernel``: q/k (and their gradients) in ``io``, masks uint8, weights
    and scratch fp32, scalars i32 / fp32, constexprs as given."""
    types = {"q_ptr": f"*{io}", "k_ptr": f"*{io}", "grad_q_ptr": f"*{io}", "grad_k_ptr": f"*{io}",
             "q_valid_ptr": "*u8", "k_valid_ptr": "*u8"}  # fmt: skip
    out = {}
    for name in kernel.arg_names:
        if name in constexprs:
            out[name] = "constexpr"
        elif name.endswith("_ptr") or name in WEIGHTS:
            out[name] = types.get(name, "*fp32")
        else:
            out[name] = "fp32" if name in FLOATS else "i32"
    return out


def launches(io: str) -> list[tuple[str, str, dict, int]]:
    """(kernel, what, constexprs, num_warps) as triton_kernels launches them at MCAN-small widths."""
    dot = tl.bfloat16 if io == "bf16" else tl.float32
    rows = dict(BLOCK_D=64, DOT=dot)
    ct = dict(rows, BLOCK_HN=64, BLOCK_HC=64, BLOCK_OUT=32)
    out = [("_ct_helpers_forward_kernel", "CT helpers", dict(ct, BLOCK_R=tk.BLOCK_ROWS_FORWARD), tk.NUM_WARPS)]
    for nq, nk in ((100, 100), (100, 14)):
        tile = dict(BLOCK_Q=tk._block(nq), BLOCK_K=tk._block(nk), BLOCK_OUT=32, DOT=dot)
        for name in ("_ct_transport_forward_kernel", "_ct_transport_backward_kernel"):
            out.append((name, f"{nq} x {nk}", tile, triton_ct.transport_warps(nq, nk)))
    for critic in (False, True):
        out.append(("_ct_helpers_backward_kernel", "critic" if critic else "navigator",
                    dict(ct, BLOCK_R=tk.BLOCK_ROWS_BACKWARD, CRITIC=critic), tk.NUM_WARPS_BACKWARD))  # fmt: skip
    gan = dict(rows, BLOCK_H=64)
    out.append(("_gan_forward_kernel", "GAN", dict(gan, BLOCK_R=tk.BLOCK_ROWS_FORWARD), tk.NUM_WARPS))
    out.append(("_gan_loss_kernel", "GAN", dict(BLOCK_N=triton_gan.MEAN_BLOCK), tk.NUM_WARPS))
    out.append(("_gan_backward_kernel", "GAN", dict(gan, BLOCK_R=tk.BLOCK_ROWS_BACKWARD), tk.NUM_WARPS_BACKWARD))
    return out


def ptxas_info(ptx: str, arch: int) -> dict:
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        result = subprocess.run([str(ptxas), "-v", "--gpu-name", gpu, str(src), "-o", str(Path(tmp) / "k.cubin")],
                                capture_output=True, text=True, check=True)  # fmt: skip
    info: dict = {}
    for line in result.stderr.splitlines():
        words = line.replace(",", " ").split()
        for i, word in enumerate(words):
            if word == "registers" and words[i - 2] == "Used":
                info["registers"] = int(words[i - 1])
            if word == "spill" and words[i + 1] == "stores":
                info["spill_store_bytes"] = int(words[i - 2])
            if word == "spill" and words[i + 1] == "loads":
                info["spill_load_bytes"] = int(words[i - 2])
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200, 80: A100)")
    p.add_argument("--io", default="bf16,fp32", help="dtypes of q/k to compile for")
    p.add_argument("--out-json", default=None)
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        p.error("unset TRITON_INTERPRET: this compiles for the GPU")
    target = GPUTarget("cuda", args.arch, 32)
    rows = []
    for io in args.io.split(","):
        for name, what, constexprs, warps in launches(io):
            kernel = getattr(triton_ct if name.startswith("_ct") else triton_gan, name)
            source = triton.compiler.ASTSource(fn=kernel, signature=signature(kernel, io, constexprs), constexprs=constexprs)
            compiled = triton.compile(source, target=target, options={"num_warps": warps})
            row = {"kernel": name, "what": what, "io": io, "num_warps": warps, **ptxas_info(compiled.asm["ptx"], args.arch)}
            rows.append(row)
            print(f"{name:32} {what:10} {io:5} warps {warps:2}: {row.get('registers')} registers, "
                  f"spills {row.get('spill_store_bytes')} B stored / {row.get('spill_load_bytes')} B loaded", flush=True)
    if args.out_json:
        Path(args.out_json).write_text(json.dumps({"arch": args.arch, "triton": triton.__version__, "kernels": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
