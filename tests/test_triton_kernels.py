"""The Triton CT and GAN kernels (vqa_align/align/kernels/triton_*.py) against the plain modules, on the CPU.

The kernels run in Triton's interpreter (TRITON_INTERPRET=1, numpy underneath): the same kernel
code as on a GPU, with two differences stated here so that nobody reads more into these tests:
the interpreter executes tl.dot with bf16 operands wrongly, so there the operands are rounded to
bf16 and multiplied as fp32 (triton_common._operands; the same products), and nothing about GPU
speed, register pressure or compilation is tested. The interpreter's fp32 -> bf16 cast truncates,
where the GPU's rounds to nearest even (cvt.rn.bf16.f32, checked below): truncation shrinks every
unit vector, which biases CT's cost 1 - g(q)·g(k) upwards by about bf16's step near 1 (2^-8) and
hides in loose tolerances; the fixture tk makes the interpreter round like the GPU, so that the
bf16 tests check the numbers a GPU would give. Values and gradients (q, k and every helper
weight) are compared with the plain helper modules under autograd in fp64 (test_fused_paths'
references: separate helper calls, explicit (Nq, Nk) matrices, the critic behind
call_with_reversed_parameters, the discriminator behind reverse_gradient), with padding, Nq != Nk,
strided (attention-layout) inputs, widths that are not powers of two, and more row blocks than
programs (the persistent backward loops). One more test compiles every kernel for sm_90 (PTX and
ptxas, no GPU needed). Skipped if Triton is not installed.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import random_masks
from test_fused_paths import plain_ct, plain_gan
from triton_interpreter import gpu_rounding_in_interpreter

from vqa_align.align import distances
from vqa_align.align.aligner import HeadAligner
from vqa_align.align.distances import ct as ct_distance
from vqa_align.align.distances import gan as gan_distance
from vqa_align.align.distances.ct import conditional_transport
from vqa_align.align.distances.gan import adversarial_loss
from vqa_align.config import AlignmentConfig
from vqa_align.errors import UserError

if importlib.util.find_spec("triton") is None:
    pytest.skip("Triton is not installed: the Triton kernels cannot be tested", allow_module_level=True)

# triton.jit reads TRITON_INTERPRET when a function is defined (Triton's own library functions
# included, at `import triton`), so it must be set before triton is first imported in this process:
# here, at collection, unless something imported triton earlier (then the tests run in a child
# process, test_in_a_fresh_process). The interpreter reads it again while running: it stays set
# during this module's tests (fixture tk) and is restored afterwards.
INTERPRETER_ON = "triton" not in sys.modules
TRITON_MODULES = ("common", "ct", "gan")  # vqa_align.align.kernels.triton_<name>, common first
_saved_env = os.environ.get("TRITON_INTERPRET")
if INTERPRETER_ON:
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        triton_kernels = {name: importlib.import_module(f"vqa_align.align.kernels.triton_{name}") for name in TRITON_MODULES}
        if not triton_kernels["common"].INTERPRETED:  # imported before, without the interpreter
            triton_kernels = {name: importlib.reload(module) for name, module in triton_kernels.items()}
    finally:
        os.environ.pop("TRITON_INTERPRET") if _saved_env is None else os.environ.update(TRITON_INTERPRET=_saved_env)


@pytest.fixture
def tk(monkeypatch):
    """The Triton kernel modules (tk.common, tk.ct, tk.gan) with their kernels defined for the
    interpreter, which rounds bf16 like the GPU."""
    if not INTERPRETER_ON:
        pytest.skip("triton was imported before this module (not interpreted): test_in_a_fresh_process runs these")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_kernels["common"].INTERPRETED
    with gpu_rounding_in_interpreter():
        yield SimpleNamespace(**triton_kernels)


# Tests that compile for the GPU in a child process without the interpreter (not interpreter tests).
COMPILER_TESTS = ("test_every_kernel_compiles_for_an_h100_class_gpu", "test_the_gpu_rounds_bf16_to_nearest_even")


def test_in_a_fresh_process():
    """Where triton was imported before this module, run this file again in a child process."""
    if INTERPRETER_ON:
        return  # the tests below run here
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__)),
         "-k", " and ".join(f"not {name}" for name in COMPILER_TESTS)],  # those run here (no interpreter needed)
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


# (batch, heads, Nq, Nk, head_dim, helper_hidden, helper_out, strided inputs)
CASES = {
    "padded": (3, 2, 7, 5, 16, 24, 12, False),
    # d < 16 and odd widths (zero-padded blocks), Nk > 16 (a 32-wide key tile), 5 row blocks of 32
    # over 3 programs in backward, q and k as transposed views of (B, N, H, d) like the attention's.
    "strided": (2, 3, 4, 19, 8, 20, 9, True),
    # GAN only (CT's transport tile holds <= 128 positions): the masked means in 3 chunks of 64.
    "long": (2, 1, 140, 6, 8, 16, 8, False),
}


def _inputs(case: str, seed: int, method: str, precision: str = "fp32"):
    batch, heads, nq, nk, d, hidden, out, strided = CASES[case]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    config = AlignmentConfig(method=method, helper_hidden=hidden, helper_out=out, helper_precision=precision)
    aligner = HeadAligner(d, config).double()
    q_valid, k_valid = random_masks(batch, nq, nk, gen)
    if strided:
        q = torch.randn(batch, nq, heads, d, generator=gen, dtype=torch.float64).transpose(1, 2)
        k = torch.randn(batch, nk, heads, d, generator=gen, dtype=torch.float64).transpose(1, 2)
    else:
        q = torch.randn(batch, heads, nq, d, generator=gen, dtype=torch.float64)
        k = torch.randn(batch, heads, nk, d, generator=gen, dtype=torch.float64) + 0.3
    upstream = torch.randn(batch, heads, generator=gen, dtype=torch.float64)  # a non-uniform dLoss/dD
    return aligner, q, k, q_valid, k_valid, upstream


def _triton(tk, aligner, q, k, q_valid, k_valid, method, precision):
    if method == "ct":
        return tk.ct.triton_conditional_transport(q, k, q_valid, k_valid, aligner.navigator, aligner.critic, aligner.rho,
                                                  precision)
    return tk.gan.triton_adversarial_loss(q, k, q_valid, k_valid, aligner.discriminator, precision)


def _run_both(tk, case, seed, method, precision="fp32", input_dtype=torch.float32):
    """-> Triton's value and gradients (q, k, every weight) and the fp64 reference's."""
    aligner, q, k, qv, kv, upstream = _inputs(case, seed, method, precision)
    q64, k64 = q.clone().requires_grad_(), k.clone().requires_grad_()
    ref = (plain_ct if method == "ct" else plain_gan)(aligner, q64, k64, qv, kv)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), [q64, k64, *aligner.parameters()])

    fast = aligner.float()  # parameters as a model keeps them (fp32)
    qx = q.to(input_dtype).requires_grad_()  # keeps the strides of the transposed views
    kx = k.to(input_dtype).requires_grad_()
    got = _triton(tk, fast, qx, kx, qv, kv, method, precision)
    got_grads = torch.autograd.grad((got * upstream.float()).sum(), [qx, kx, *fast.parameters()])
    return got, got_grads, ref, ref_grads, [name for name, _ in fast.named_parameters()]


@pytest.mark.parametrize(
    "method,case,seed",
    [(m, c, s) for m in ("ct", "gan") for c, s in (("padded", 0), ("padded", 1), ("strided", 2))] + [("gan", "long", 3)],
)
def test_fp32_values_and_gradients_match_the_plain_modules(tk, method, case, seed):
    got, got_grads, ref, ref_grads, names = _run_both(tk, case, seed, method)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    for name, a, b in zip(["q", "k", *names], got_grads, ref_grads, strict=True):
        assert a.shape == b.shape, name
        scale = b.abs().max().item()
        assert scale > 0, name  # every gradient is exercised
        assert (a.double() - b).abs().max().item() <= 1e-5 * scale + 1e-8, name


@pytest.mark.parametrize("method", ["ct", "gan"])
def test_bf16_helpers_and_bf16_inputs_stay_close_to_the_exact_values(tk, method):
    """helper_precision bf16 with the bf16 q/k of an autocast model: the distance is fp32, the
    q/k gradients come back bf16; bf16 keeps ~3 digits, so direction and size are compared
    (a wrong sign or a missing term gives a cosine far below 0.99)."""
    got, got_grads, ref, ref_grads, names = _run_both(tk, "padded", 3, method, "bf16", torch.bfloat16)
    assert got.dtype == torch.float32
    assert got_grads[0].dtype == got_grads[1].dtype == torch.bfloat16
    # Measured with the GPU's rounding: value 3e-3 (CT) / 1e-4 (GAN) of the largest, cosines >= 0.9998,
    # q/k gradients 1.5 % / 0.4 %. Truncating casts gave GAN's worst cosine 0.994 and q/k 3.9 %.
    assert (got.double() - ref).abs().max() <= 0.01 * ref.abs().max()
    for name, a, b in zip(["q", "k", *names], got_grads, ref_grads, strict=True):
        assert F.cosine_similarity(a.double().flatten(), b.flatten(), dim=0) > 0.999, name
    for a, b in zip(got_grads[:2], ref_grads[:2], strict=True):
        assert (a.double() - b).abs().max() <= 0.05 * b.abs().max()


@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_ct_stays_unbiased_when_keys_and_queries_are_aligned(tk, seed):
    """Queries and keys of each (sample, head) clustered around one centre: the costs
    1 - g(q)·g(k) are near 0, where alignment training drives the heads and where bf16 resolves
    only steps of 2^-8 near g·g = 1. Errors of rounding to nearest cancel in the plan's sums; a
    rounding bias shows as an offset. Measured (exact distances <= 4e-4): errors 7e-4 with the
    GPU's rounding, 7e-3 with the interpreter's truncating cast; the fused PyTorch path in bf16 on
    the CPU, 6e-4 and 2.1e-3."""
    aligner, q, k, q_valid, k_valid, _ = _inputs("padded", seed, "ct", "bf16")
    centre = torch.randn(*q.shape[:2], 1, q.shape[-1], dtype=q.dtype)  # (B, H, 1, d)
    q, k = centre + 0.02 * torch.randn_like(q), centre + 0.02 * torch.randn_like(k)
    exact = plain_ct(aligner, q, k, q_valid, k_valid)
    got = _triton(tk, aligner.float(), q.bfloat16(), k.bfloat16(), q_valid, k_valid, "ct", "bf16")
    assert exact.max() < 0.02  # every (sample, head) almost aligned
    assert (got.double() - exact).abs().max() <= 3e-3


def test_the_interpreter_rounds_bf16_like_the_gpu(tk):
    """The fixture's cast rounds to nearest even bit for bit as torch does, ties and carries into
    the exponent included; without it the interpreter truncates (if a Triton release fixes that,
    this fails: drop tests/triton_interpreter.py)."""
    import triton
    import triton.language as tl

    @triton.jit
    def cast_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(y_ptr + i, tl.load(x_ptr + i, mask=i < n).to(tl.bfloat16), mask=i < n)

    ulp = 2.0**-7  # bf16's spacing in [1, 2)
    ties = [1 + ulp / 2, 1 + 3 * ulp / 2, -(1 + ulp / 2)]  # -> 1, 1 + 2 ulp, -1 (to even)
    carries = [2 - ulp / 4, np.nextafter(np.float32(2.0), np.float32(0))]  # round up into the exponent: 2
    x = torch.cat([torch.tensor(ties + carries), torch.randn(123, generator=torch.Generator().manual_seed(0))]).float()

    def interpreted(values):
        out = torch.empty(values.shape, dtype=torch.bfloat16)
        cast_kernel[(1,)](values, out, values.numel(), BLOCK=triton.next_power_of_2(values.numel()))
        return out

    assert torch.equal(interpreted(x).view(torch.int16), x.to(torch.bfloat16).view(torch.int16))
    builder = importlib.import_module("triton.runtime.interpreter").InterpreterBuilder
    rounding_cast = builder.cast_impl
    builder.cast_impl = rounding_cast.__wrapped__  # the interpreter as shipped
    try:
        truncated = interpreted(x)
    finally:
        builder.cast_impl = rounding_cast
    assert torch.equal(truncated.view(torch.int16), (x.view(torch.int32) >> 16).to(torch.int16))


def test_the_gpu_rounds_bf16_to_nearest_even(tmp_path):
    """What the fixture's cast stands for: Triton compiles fp32 -> bf16 for sm_90 as cvt.rn (PTX)."""
    ptxas = Path(importlib.util.find_spec("triton").origin).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.is_file():
        pytest.skip("this Triton has no NVIDIA backend")
    script = """
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
@triton.jit
def cast(x_ptr, y_ptr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(y_ptr + i, tl.load(x_ptr + i).to(tl.bfloat16))
source = triton.compiler.ASTSource(fn=cast, signature={"x_ptr": "*fp32", "y_ptr": "*bf16", "BLOCK": "constexpr"},
                                   constexprs={"BLOCK": 128})
print(triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"])
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton_cache")
    (tmp_path / "cast.py").write_text(script)  # triton.jit reads the kernel's source file
    result = subprocess.run(
        [sys.executable, str(tmp_path / "cast.py")], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    conversions = [line.split()[0] for line in result.stdout.splitlines() if line.strip().startswith("cvt")]
    assert conversions == ["cvt.rn.bf16.f32"], conversions


def test_gradient_directions_are_the_papers(tk):
    """Against the UNreversed losses (no hooks, no reversal layer): CT's navigator and q/k descend
    (same gradient), its critic ascends (negated); GAN's discriminator descends (same), q and k
    ascend (negated)."""
    for method in ("ct", "gan"):
        aligner, q, k, qv, kv, upstream = _inputs("padded", 4, method)
        q64, k64 = q.clone().requires_grad_(), k.clone().requires_grad_()
        if method == "ct":
            unit = lambda net, x: F.normalize(net(x), dim=-1)  # noqa: E731
            nav, crit = aligner.navigator, aligner.critic
            plain = conditional_transport(unit(nav, q64), unit(nav, k64), unit(crit, q64), unit(crit, k64), qv, kv, aligner.rho)
            ascending = [name.startswith("critic") for name, _ in aligner.named_parameters()]
        else:
            disc = aligner.discriminator
            plain = adversarial_loss(disc(q64).squeeze(-1), disc(k64).squeeze(-1), qv, kv)
            ascending = [False for _ in aligner.parameters()]
        plain_grads = torch.autograd.grad((plain * upstream).sum(), [q64, k64, *aligner.parameters()])
        fast = aligner.float()
        qx, kx = q.float().requires_grad_(), k.float().requires_grad_()
        got = _triton(tk, fast, qx, kx, qv, kv, method, "fp32")
        got_grads = torch.autograd.grad((got * upstream.float()).sum(), [qx, kx, *fast.parameters()])
        signs = [-1.0 if method == "gan" else 1.0] * 2 + [-1.0 if up else 1.0 for up in ascending]
        assert signs.count(-1.0) >= 2  # something is reversed in both methods
        for sign, a, b in zip(signs, got_grads, plain_grads, strict=True):
            assert (a.double() - sign * b).abs().max() <= 1e-5 * b.abs().max() + 1e-8


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # σ of the 1e3 padding: 0 or 1
@pytest.mark.parametrize("method", ["ct", "gan"])
def test_padded_positions_neither_count_nor_receive_gradient(tk, method):
    aligner, q, k, qv, kv, _ = _inputs("padded", 5, method)
    assert not qv.all() and not kv.all()
    aligner = aligner.float()
    q, k = q.float().requires_grad_(), k.float().requires_grad_()
    got = _triton(tk, aligner, q, k, qv, kv, method, "fp32")
    grad_q, grad_k = torch.autograd.grad(got.sum(), [q, k], retain_graph=True)  # an expanded (stride 0) upstream
    dense = torch.autograd.grad((got * torch.ones_like(got)).sum(), [q, k])
    assert torch.equal(grad_q, dense[0]) and torch.equal(grad_k, dense[1])
    noisy_q = torch.where(qv[:, None, :, None], q.detach(), torch.full_like(q, 1e3))
    noisy_k = torch.where(kv[:, None, :, None], k.detach(), torch.randn_like(k) * 50)
    torch.testing.assert_close(_triton(tk, aligner, noisy_q, noisy_k, qv, kv, method, "fp32"), got.detach())
    assert grad_q[~qv[:, None, :].expand(grad_q.shape[:3])].abs().max() == 0
    assert grad_k[~kv[:, None, :].expand(grad_k.shape[:3])].abs().max() == 0
    assert grad_q[qv[:, None, :].expand(grad_q.shape[:3])].abs().max() > 0


@pytest.mark.parametrize("method", ["ct", "gan"])
def test_second_order_gradients_are_refused(tk, method):
    aligner, q, k, qv, kv, _ = _inputs("padded", 6, method)
    aligner = aligner.float()
    q = q.float().requires_grad_()
    with pytest.raises(RuntimeError, match="no second-order gradient"):
        torch.autograd.grad(_triton(tk, aligner, q, k.float(), qv, kv, method, "fp32").sum(), q, create_graph=True)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ct", "gan"])
def test_mcan_shapes_match_the_fused_path(tk, method):
    """MCAN-small's widths (d 64, helpers 64/32) and its guided attention (100 regions, 14 tokens)."""
    torch.manual_seed(7)
    gen = torch.Generator().manual_seed(7)
    aligner = HeadAligner(64, AlignmentConfig(method=method, helper_precision="fp32"))
    qv, kv = random_masks(2, 100, 14, gen)
    q = torch.randn(2, 100, 4, 64, generator=gen).transpose(1, 2).requires_grad_()
    k = torch.randn(2, 14, 4, 64, generator=gen).transpose(1, 2).requires_grad_()
    params = [q, k, *aligner.parameters()]
    got = _triton(tk, aligner, q, k, qv, kv, method, "fp32")
    got_grads = torch.autograd.grad(got.sum(), params)
    want = aligner(q, k, qv, kv)  # the fused path (CPU)
    want_grads = torch.autograd.grad(want.sum(), params)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(got_grads, want_grads, strict=True):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max() + 1e-8


def _stand_in(device: str, dtype=torch.bfloat16, nq: int = 100, nk: int = 14):
    """What the dispatch table reads of q and k (device, dtype, shape), without a GPU."""
    return (SimpleNamespace(device=torch.device(device), dtype=dtype, shape=(4, 8, nq, 64)),
            SimpleNamespace(device=torch.device(device), dtype=dtype, shape=(4, 8, nk, 64)))  # fmt: skip


def test_dispatch_picks_triton_on_cuda_only_when_asked_and_possible(tk, monkeypatch):
    pick = distances.implementation
    ct, gan = ct_distance, gan_distance
    monkeypatch.setattr(distances, "import_failure", lambda module: None)
    assert pick("ct", "auto", *_stand_in("cuda")) is ct.triton
    assert pick("gan", "triton", *_stand_in("cuda", torch.float32)) is gan.triton
    assert pick("ct", "auto", *_stand_in("cpu")) is ct.fused  # the CPU keeps its kernels
    assert pick("ct", "triton", *_stand_in("cpu")) is ct.fused
    assert pick("ct", "fused", *_stand_in("cuda")) is ct.fused
    assert pick("ct", "reference", *_stand_in("cuda")) is ct.reference
    assert pick("ct", "auto", *_stand_in("cuda", torch.float64)) is ct.fused  # fp64 asks for fp64
    # CT's transport tile holds at most MAX_TRANSPORT_POSITIONS positions; GAN has no such tile.
    assert pick("ct", "auto", *_stand_in("cuda", nq=tk.ct.MAX_TRANSPORT_POSITIONS + 1)) is ct.fused
    assert pick("gan", "auto", *_stand_in("cuda", nq=tk.ct.MAX_TRANSPORT_POSITIONS + 1)) is gan.triton
    assert pick("ot", "auto", *_stand_in("cuda")).__name__ == "reference"  # OT has no kernels of its own

    monkeypatch.setattr(distances, "import_failure", lambda module: "ImportError: no triton")
    with pytest.warns(RuntimeWarning, match="Triton cannot be used"):
        assert pick("ct", "auto", *_stand_in("cuda")) is ct.fused
    with pytest.raises(UserError, match=r"model.alignment.kernels is 'triton'.*no triton"):
        pick("ct", "triton", *_stand_in("cuda"))


def test_reference_setting_runs_the_plain_modules():
    for kernels, runs in (("reference", "reference"), ("fused", "fused"), ("auto", "fused"), ("triton", "fused")):
        aligner = HeadAligner(8, AlignmentConfig(method="ct", helper_hidden=16, helper_out=8, kernels=kernels))
        assert aligner.kernels == kernels
        assert distances.implementation("ct", aligner.kernels, *_stand_in("cpu")) is getattr(ct_distance, runs)


def test_every_kernel_compiles_for_an_h100_class_gpu(tmp_path):
    """Triton -> PTX -> ptxas for sm_90 of every kernel at its MCAN-small launch shape, without a
    GPU (benchmarks/triton_compile.py): catches what the interpreter does not check (constexpr
    rules, dot shapes, types the compiler refuses)."""
    ptxas = Path(importlib.util.find_spec("triton").origin).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.is_file():
        pytest.skip("this Triton has no NVIDIA backend (ptxas)")
    repo = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton_cache")  # ~10 s on 2 cores; nothing left in ~/.triton
    out = tmp_path / "compile.json"
    result = subprocess.run(
        [sys.executable, str(repo / "benchmarks" / "triton_compile.py"), "--io", "bf16", "--out-json", str(out)],
        env=env, capture_output=True, text=True, timeout=900, cwd=repo,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads(out.read_text())["kernels"]
    assert len(rows) == 10 and all(row["registers"] > 0 for row in rows)


def test_cuda_graph_preparation_covers_every_transport_tile(tk, monkeypatch):
    """A kernel's first launch cannot happen inside a CUDA-graph capture, and a new batch shape may
    need a new transport tile: prepare_transport_variants launches every tile _block() can give up
    to MAX_TRANSPORT_POSITIONS before any capture, and refuses to start inside one."""
    tiles = {tk.common._block(n) for n in range(1, tk.ct.MAX_TRANSPORT_POSITIONS + 1)}
    assert tiles == set(tk.ct.TRANSPORT_BLOCKS)
    tk.ct.prepare_transport_variants(torch.device("cpu"), 8, None)  # nothing to load on the CPU
    assert not tk.ct._prepared_transport
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="inside a CUDA-graph capture.*kernels: fused"):
        tk.ct.prepare_transport_variants(torch.device("cuda"), 8, None)
