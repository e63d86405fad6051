"""Issue 19 on a GPU: the Triton CT/GAN kernels against the plain modules, then one aligner alone.

    python benchmarks/triton_check.py --out-json $OUT/triton_check.json     # CUDA (~1 min with compiles)
    TRITON_INTERPRET=1 python benchmarks/triton_check.py --smoke            # CPU interpreter: checks the script

1. Correctness, per method (ct, gan) at MCAN shapes (64-d heads, helpers 64/32; image self-attention
   100 x 100 and guided attention 100 regions x 14 tokens, padded samples): values and gradients
   (q, k, every helper weight) of vqa_align.align.kernels.triton_ct/_gan against the plain modules in fp64 on the
   same device, with helper_precision fp32 (max error relative to the largest entry, 1e-4) and bf16
   (cosine of each gradient with the exact one: > 0.999 as in the CPU tests, or no more than 0.005
   below the fused PyTorch path's in bf16 on the same inputs). In the interpreter (--smoke on the
   CPU) bf16 casts round to nearest even as on the GPU (tests/triton_interpreter.py).
2. CUDA graphs: forward + backward of each Triton aligner captured for a batch shape that never ran
   eagerly (as train.cuda_graphs captures new shapes; a kernel binary loaded during capture would
   fail) and replayed; the replay must give the eager gradients bit for bit.
3. Time and peak memory of one aligner alone (forward + backward, bf16, batch 512, 8 heads, the
   sa_image shape), Triton vs the fused PyTorch path. Not a training step: benchmarks/gpu.py is.
Writes everything to --out-json and exits 1 if a check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common  # noqa: E402, F401 - puts the repository on sys.path
from tests.triton_interpreter import gpu_rounding_in_interpreter  # noqa: E402 - test-only
from vqa_align.align.aligner import HeadAligner  # noqa: E402
from vqa_align.align.distances.gan import adversarial_loss  # noqa: E402
from vqa_align.align.distances.layers import call_with_reversed_parameters, reverse_gradient  # noqa: E402
from vqa_align.align.kernels import triton_common, triton_ct, triton_gan  # noqa: E402
from vqa_align.align.kernels.fused import fused_adversarial_loss, fused_conditional_transport  # noqa: E402
from vqa_align.config import AlignmentConfig  # noqa: E402

FP32_REL_TOL = 1e-4  # fp32 kernels vs fp64 reference, relative to the largest entry
BF16_COSINE = 0.999  # bf16 q/k and helpers: ~3 digits; a sign or term error gives far less
BF16_COSINE_SLACK = 0.005  # ... or within this of the fused path's cosine in bf16 (same rounding)
BF16_VALUE_REL_TOL = 0.01  # bf16 distance vs exact, relative to the largest (or twice the fused path's error)


def plain(aligner: HeadAligner, q, k, qv, kv):
    """The plain modules under autograd, straight from ALIGNMENT.md (explicit matrices)."""
    if aligner.method == "gan":
        disc = aligner.discriminator
        return adversarial_loss(disc(reverse_gradient(q)).squeeze(-1), disc(reverse_gradient(k)).squeeze(-1), qv, kv)
    unit = lambda x: F.normalize(x, dim=-1)  # noqa: E731
    fq, fk = unit(aligner.navigator(q)), unit(aligner.navigator(k))
    gq, gk = (unit(call_with_reversed_parameters(aligner.critic, x)) for x in (q, k))
    s, c = fq @ fk.transpose(-1, -2), 1.0 - gq @ gk.transpose(-1, -2)
    pair = qv[:, None, :, None] & kv[:, None, None, :]
    fwd = s.masked_fill(~pair, float("-inf")).softmax(-1).nan_to_num(0.0)
    bwd = s.masked_fill(~pair, float("-inf")).softmax(-2).nan_to_num(0.0)
    n, m = qv.sum(-1)[:, None].to(q.dtype), kv.sum(-1)[:, None].to(q.dtype)
    return aligner.rho * (fwd * c).sum((-1, -2)) / n + (1 - aligner.rho) * (bwd * c).sum((-1, -2)) / m


def triton_call(aligner: HeadAligner, q, k, qv, kv, precision: str):
    if aligner.method == "ct":
        return triton_ct.triton_conditional_transport(q, k, qv, kv, aligner.navigator, aligner.critic, aligner.rho, precision)
    return triton_gan.triton_adversarial_loss(q, k, qv, kv, aligner.discriminator, precision)


def fused_call(aligner: HeadAligner, q, k, qv, kv, precision: str):
    if aligner.method == "ct":
        return fused_conditional_transport(q, k, qv, kv, aligner.navigator, aligner.critic, aligner.rho, precision)
    return fused_adversarial_loss(q, k, qv, kv, aligner.discriminator, precision)


def masks(batch: int, nq: int, nk: int, device, gen):
    q_len = torch.randint(1, nq + 1, (batch,), generator=gen)
    k_len = torch.randint(1, nk + 1, (batch,), generator=gen)
    q_len[0], k_len[0] = nq, nk
    return (torch.arange(nq)[None] < q_len[:, None]).to(device), (torch.arange(nk)[None] < k_len[:, None]).to(device)


def case(method: str, batch: int, heads: int, nq: int, nk: int, d: int, hidden: int, out: int, device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    aligner = HeadAligner(d, AlignmentConfig(method=method, helper_hidden=hidden, helper_out=out)).to(device)
    qv, kv = masks(batch, nq, nk, device, gen)
    # (B, N, H, d) projections seen as (B, H, N, d), like the attention's q and k.
    q = torch.randn(batch, nq, heads, d, generator=gen).to(device).transpose(1, 2)
    k = (torch.randn(batch, nk, heads, d, generator=gen) + 0.2).to(device).transpose(1, 2)
    upstream = torch.randn(batch, heads, generator=gen).to(device)
    return aligner, q, k, qv, kv, upstream


def correctness(method: str, shape: dict, device) -> dict:
    aligner, q, k, qv, kv, upstream = case(method, device=device, **shape)
    exact = HeadAligner(shape["d"], AlignmentConfig(method=method, helper_hidden=shape["hidden"], helper_out=shape["out"]))
    exact.load_state_dict(aligner.state_dict())
    exact = exact.to(device).double()
    q64, k64 = q.double().requires_grad_(), k.double().requires_grad_()
    ref = plain(exact, q64, k64, qv, kv)
    ref_grads = torch.autograd.grad((ref * upstream.double()).sum(), [q64, k64, *exact.parameters()])
    names = ["q", "k", *(n for n, _ in aligner.named_parameters())]
    row: dict = {"method": method, **shape}

    def against_exact(call, precision: str, dtype: torch.dtype):
        qx, kx = q.to(dtype).requires_grad_(), k.to(dtype).requires_grad_()
        got = call(aligner, qx, kx, qv, kv, precision)
        grads = torch.autograd.grad((got * upstream).sum(), [qx, kx, *aligner.parameters()])
        value_err = ((got.double() - ref).abs().max() / ref.abs().max()).item()
        rel = {n: ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for n, a, b in zip(names, grads, ref_grads)}
        cos = {n: F.cosine_similarity(a.double().flatten(), b.flatten(), dim=0).item() for n, a, b in zip(names, grads, ref_grads)}
        return {"value_rel_err": value_err, "grad_rel_err": rel, "grad_cosine": cos}

    row["fp32"] = against_exact(triton_call, "fp32", torch.float32)
    row["fp32"]["ok"] = row["fp32"]["value_rel_err"] <= FP32_REL_TOL and max(row["fp32"]["grad_rel_err"].values()) <= FP32_REL_TOL
    # bf16: as close to the exact gradients as the fused path in bf16 (a kink of a LeakyReLU that
    # bf16 moves can cost both a few percent on small inputs), or closer than BF16_COSINE.
    row["bf16"], fused = against_exact(triton_call, "bf16", torch.bfloat16), against_exact(fused_call, "bf16", torch.bfloat16)
    row["bf16"]["fused_grad_cosine"] = fused["grad_cosine"]
    row["bf16"]["ok"] = row["bf16"]["value_rel_err"] <= max(BF16_VALUE_REL_TOL, 2 * fused["value_rel_err"]) and all(
        cos >= min(BF16_COSINE, fused["grad_cosine"][n] - BF16_COSINE_SLACK) for n, cos in row["bf16"]["grad_cosine"].items())
    row["ok"] = row["fp32"]["ok"] and row["bf16"]["ok"]
    return row


def graph_replay(method: str, shape: dict, device) -> dict:
    """Capture forward + backward of the Triton aligner in a CUDA graph for a batch shape never run
    before (as train.cuda_graphs does for each new shape, after eager steps of another shape); the
    replay must equal an eager run of that shape, bit for bit."""

    def step(nq: int, nk: int):
        aligner, q, k, qv, kv, upstream = case(method, device=device, **{**shape, "nq": nq, "nk": nk})
        q, k = q.bfloat16().requires_grad_(), k.bfloat16().requires_grad_()
        params = [q, k, *aligner.parameters()]
        return lambda: torch.autograd.grad((triton_call(aligner, q, k, qv, kv, "auto") * upstream).sum(), params)

    warm, new = step(shape["nq"], shape["nk"]), step(40, 40)  # 40 x 40: tiles and sizes the warm-up did not use
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            warm()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            captured = new()
    except Exception as err:  # noqa: BLE001 - the check's result
        return {"method": method, "error": f"{type(err).__name__}: {err}"[:1000], "ok": False}
    graph.replay()
    torch.cuda.synchronize()
    eager = new()
    same = all(torch.equal(a, b) for a, b in zip(eager, captured))
    return {"method": method, "new_shape_captured": True, "replay_equals_eager": bool(same), "ok": bool(same)}


def timing(method: str, device, batch: int, precision: str, reps: int) -> dict:
    """One aligner alone at the sa_image shape: forward + backward, ms and peak memory."""
    row: dict = {"method": method, "batch": batch, "shape": "sa_image 100x100 (adaptive-like padding)"}
    for name, call in (("fused", fused_call), ("triton", triton_call)):
        aligner, q, k, qv, kv, upstream = case(method, batch, 8, 100, 100, 64, 64, 32, device)
        q, k = q.bfloat16().requires_grad_(), k.bfloat16().requires_grad_()
        params = [q, k, *aligner.parameters()]
        for _ in range(3):
            torch.autograd.grad((call(aligner, q, k, qv, kv, precision) * upstream).sum(), params)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        for _ in range(reps):
            torch.autograd.grad((call(aligner, q, k, qv, kv, precision) * upstream).sum(), params)
        if device.type == "cuda":
            torch.cuda.synchronize()
        row[f"{name}_ms"] = 1000 * (time.perf_counter() - start) / reps
        row[f"{name}_extra_peak_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30 if device.type == "cuda" else None
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-json", default=None)
    p.add_argument("--smoke", action="store_true", help="tiny shapes; on the CPU needs TRITON_INTERPRET=1")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report: dict = {"benchmark": "triton_check", "date": common.now(), "torch": torch.__version__, "device": (
        torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"),
        "correctness": [], "graphs": [], "timing": []}  # fmt: skip
    if args.smoke:
        shapes = [dict(batch=2, heads=2, nq=7, nk=5, d=16, hidden=24, out=12)]
    else:
        shapes = [dict(batch=16, heads=8, nq=100, nk=100, d=64, hidden=64, out=32),  # sa_image
                  dict(batch=16, heads=8, nq=100, nk=14, d=64, hidden=64, out=32)]  # sga_guided
    ok = True

    def save():
        if args.out_json:
            Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out_json).write_text(json.dumps(report, indent=2) + "\n")

    # The interpreter truncates fp32 -> bf16 casts; the GPU rounds to nearest even: round like it.
    rounding = gpu_rounding_in_interpreter if triton_common.INTERPRETED else contextlib.nullcontext
    for method in ("ct", "gan"):
        for shape in shapes:
            with rounding():
                row = correctness(method, shape, device)
            report["correctness"].append(row)
            ok &= row["ok"]
            print(f"{method} {shape['nq']}x{shape['nk']}: fp32 value {row['fp32']['value_rel_err']:.1e}, worst grad "
                  f"{max(row['fp32']['grad_rel_err'].values()):.1e}; bf16 worst cosine {min(row['bf16']['grad_cosine'].values()):.5f}"
                  f" (fused {min(row['bf16']['fused_grad_cosine'].values()):.5f})"
                  f" -> {'ok' if row['ok'] else 'FAILED'}", flush=True)
            save()
        if device.type == "cuda":
            row = graph_replay(method, shapes[-1], device)
            report["graphs"].append(row)
            ok &= row["ok"]
            print(f"{method} CUDA graph of a new shape: {row}", flush=True)
            row = timing(method, device, 2 if args.smoke else 512, "auto", 2 if args.smoke else 20)
            report["timing"].append(row)
            print(f"{method} aligner alone, batch {row['batch']}: fused {row['fused_ms']:.2f} ms, triton {row['triton_ms']:.2f} ms; "
                  f"extra peak {row['fused_extra_peak_gib']:.2f} vs {row['triton_extra_peak_gib']:.2f} GiB", flush=True)
            save()
    report["ok"] = bool(ok)
    save()
    print("all checks passed" if ok else "SOME CHECKS FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
