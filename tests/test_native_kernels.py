"""The C++ glue kernels of the fused aligners against their PyTorch versions (vqa_align.align.kernels.native).

The PyTorch versions are themselves checked against plain autograd through the fused aligners in
test_fused_paths.py (which runs both glues); here each kernel is compared with its PyTorch twin on
random rows, including the edge cases the formulas single out: zero rows (clamped norms),
activations at exactly zero, both gradient-reversal signs, a leaky slope.
"""

from __future__ import annotations

import re

import pytest
import torch
from conftest import require_native_kernels

from vqa_align.align.kernels import native as nk


@pytest.fixture(autouse=True)
def _native():
    require_native_kernels()

# Exact in fp64/fp32 up to summation order; in bf16 the kernels keep intermediates in fp32 where
# PyTorch rounds each step to bf16, so they differ by a few bf16 ulps.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 0.05}
DTYPES = list(TOLERANCE)


def _rows(gen, rows, width, dtype, low=None):
    x = torch.randn(rows, width, generator=gen, dtype=torch.float64)
    return (x.abs() if low == 0 else x).to(dtype)


def _close(a, b, dtype, scale=1.0):
    assert a.dtype == b.dtype and a.shape == b.shape
    err = (a.double() - b.double()).abs().max().item()
    assert err <= TOLERANCE[dtype] * max(1.0, scale), err


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_normalize_and_backward(dtype):
    gen = torch.Generator().manual_seed(0)
    x, weight, bias = _rows(gen, 1000, 24, dtype), _rows(gen, 32, 24, dtype), _rows(gen, 1, 32, dtype)[0]
    x[7] = 0.0
    bias_zero = torch.zeros_like(bias)
    for b in (bias, bias_zero):  # zero bias + zero row: |y| = 0 < eps, the clamped branch
        want_unit, want_norms = nk.TORCH_GLUE.linear_normalize(x, weight, b)
        got_unit, got_norms = nk.NATIVE_GLUE.linear_normalize(x, weight, b)
        _close(got_unit, want_unit, dtype)
        assert got_norms.dtype == want_norms.dtype == torch.promote_types(dtype, torch.float32)
        torch.testing.assert_close(got_norms, want_norms, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=0)
    assert got_norms[7] == nk.NORM_EPS

    grad = _rows(gen, 1000, 32, dtype)
    grad[7] = 0.0  # grad / eps would be ~1e12: keep the sums comparable
    want_grad, want_sums = nk.TORCH_GLUE.normalize_backward(grad.clone(), want_unit, want_norms)
    got_grad, got_sums = nk.NATIVE_GLUE.normalize_backward(grad.clone(), want_unit, want_norms)
    _close(got_grad, want_grad, dtype, scale=want_grad.abs().max().item())
    _close(got_sums, want_sums, dtype, scale=want_grad.abs().sum(0).max().item())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("slope", [0.0, 0.2])
def test_linear_activation_and_its_backward(dtype, slope):
    gen = torch.Generator().manual_seed(1)
    x, weight, bias = _rows(gen, 777, 48, dtype), _rows(gen, 64, 48, dtype), _rows(gen, 1, 64, dtype)[0]
    want = nk.TORCH_GLUE.linear_activation(x, weight, bias, slope)
    _close(nk.NATIVE_GLUE.linear_activation(x, weight, bias, slope), want, dtype, scale=want.abs().max().item())

    activated = _rows(gen, 777, 64, dtype)
    activated[:, :5] = 0.0  # exactly at the kink: the gradient takes the slope side, as PyTorch's
    grad = _rows(gen, 777, 64, dtype)
    want, want_sums = nk.TORCH_GLUE.leaky_relu_backward(grad.clone(), activated, slope)
    got, got_sums = nk.NATIVE_GLUE.leaky_relu_backward(grad.clone(), activated, slope)
    _close(got, want, dtype)
    _close(got_sums, want_sums, dtype, scale=grad.abs().sum(0).max().item())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("input_sign", [1.0, -1.0])
def test_highway_forward_and_backward(dtype, input_sign):
    gen = torch.Generator().manual_seed(2)
    rows, grad = _rows(gen, 600, 64, dtype), _rows(gen, 600, 64, dtype)
    gate_w, gate_b = _rows(gen, 128, 64, dtype) / 8, _rows(gen, 1, 128, dtype)[0]
    want = nk.TORCH_GLUE.highway_forward(rows, gate_w, gate_b)
    got = nk.NATIVE_GLUE.highway_forward(rows, gate_w, gate_b)
    for a, b in zip(got, want, strict=True):  # y, transform (biased), gate
        _close(a, b, dtype, 8)
    _, transform, gate = want
    want = nk.TORCH_GLUE.highway_backward(grad.clone(), gate, transform, rows, input_sign)
    got = nk.NATIVE_GLUE.highway_backward(grad.clone(), gate, transform, rows, input_sign)
    for a, b in zip(got[:3], want[:3], strict=True):
        _close(a, b, dtype, 4)
    _close(got[3], want[3], dtype, scale=100 * grad.abs().sum(0).max().item())


@pytest.mark.parametrize("dtype", DTYPES)
def test_transport_forward_and_backward(dtype):
    gen = torch.Generator().manual_seed(4)
    batch, heads, n_q, n_k = 5, 3, 9, 6
    q_valid = torch.rand(batch, n_q, generator=gen) < 0.8
    k_valid = torch.rand(batch, n_k, generator=gen) < 0.8
    q_valid[0], k_valid[0] = True, True
    q_valid[1, :] = False  # a sample with no valid query: all-zero rows and sums
    e = torch.rand(batch, heads, n_q, n_k, generator=gen, dtype=torch.float64).mul_(2).sub_(1).to(dtype)  # S
    dots = torch.rand(batch, heads, n_q, n_k, generator=gen, dtype=torch.float64).mul_(2).sub_(1).to(dtype)
    want = nk.TORCH_GLUE.transport_forward(e.clone(), dots.clone(), q_valid, k_valid)
    got = nk.NATIVE_GLUE.transport_forward(e.clone(), dots.clone(), q_valid, k_valid)
    for a, b in zip(got, want, strict=True):  # E, C, then the four sums (B, H, ·)
        _close(a, b, dtype, scale=n_q)
    assert got[2][1].abs().max() == 0 and got[0][1].abs().max() == 0

    acc = torch.promote_types(dtype, torch.float32)
    alpha, a = (torch.randn(batch, heads, n_q, generator=gen, dtype=torch.float64).to(acc) for _ in range(2))
    beta, b = (torch.randn(batch, heads, n_k, generator=gen, dtype=torch.float64).to(acc) for _ in range(2))
    e_masked, cost = want[:2]
    want = nk.TORCH_GLUE.transport_backward(e_masked, cost, alpha, beta, a, b)
    got = nk.NATIVE_GLUE.transport_backward(e_masked, cost, alpha, beta, a, b)
    for x, y in zip(got, want, strict=True):  # plan, dS
        _close(x, y, dtype, scale=8)


def test_column_sums_do_not_depend_on_the_thread_count():
    gen = torch.Generator().manual_seed(3)
    grad, activated = _rows(gen, 5000, 64, torch.float32), _rows(gen, 5000, 64, torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = nk.NATIVE_GLUE.leaky_relu_backward(grad.clone(), activated, 0.0)[1]
        torch.set_num_threads(2)
        two = nk.NATIVE_GLUE.leaky_relu_backward(grad.clone(), activated, 0.0)[1]
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_bad_arguments_name_the_argument():
    x = torch.randn(10, 8)
    ops = torch.ops.vqa_align_glue
    with pytest.raises(RuntimeError, match="x must be a contiguous 2-D tensor"):
        ops.normalize_rows_(x.t(), torch.zeros(10))
    with pytest.raises(RuntimeError, match="bias has shape"):
        ops.bias_leaky_relu_(x, torch.zeros(3), 0.0)
    with pytest.raises(RuntimeError, match="activated has shape"):
        nk.NATIVE_GLUE.leaky_relu_backward(x.clone(), torch.randn(10, 4), 0.0)
    with pytest.raises(RuntimeError, match="gate has dtype"):
        ops.highway_forward_(x.clone(), torch.zeros(8), x.double(), torch.zeros(8), x)
    with pytest.raises(RuntimeError, match="input_sign must be"):
        nk.NATIVE_GLUE.highway_backward(x.clone(), x, x, x, 0.5)
    e = torch.rand(2, 1, 3, 4)
    with pytest.raises(RuntimeError, match="q_valid / k_valid must be bool"):
        ops.transport_forward_(e, e.clone(), torch.ones(2, 3), torch.ones(2, 4))
    with pytest.raises(RuntimeError, match="alpha must be a contiguous"):
        ops.transport_backward(e, e, torch.ones(2, 1, 4), torch.ones(2, 1, 4), torch.ones(2, 1, 3), torch.ones(2, 1, 4))


def test_glue_selection(monkeypatch):
    assert nk.glue_for(torch.device("cpu")) is nk.NATIVE_GLUE
    assert nk.glue_for(torch.device("cuda")) is nk.TORCH_GLUE  # CPU kernels only
    monkeypatch.setenv(nk.ENV_SWITCH, "0")
    assert nk.glue_for(torch.device("cpu")) is nk.TORCH_GLUE
    monkeypatch.setenv(nk.ENV_SWITCH, "maybe")
    with pytest.raises(ValueError, match=nk.ENV_SWITCH):
        nk.glue_for(torch.device("cpu"))


# ---- the build cache: keyed by content and flags, not by the checkout's location ---------------


class _FakeCppExtension:
    """Records what load() was asked to compile and 'builds' the library file like torch does."""

    def __init__(self):
        self.calls = []

    def load(self, name, sources, build_directory, **kwargs):
        import sysconfig
        from pathlib import Path

        self.calls.append((name, list(sources), build_directory, kwargs["extra_cflags"]))
        suffix = sysconfig.get_config_var("SHLIB_SUFFIX") or ".so"
        (Path(build_directory) / f"{name}{suffix}").write_bytes(b"built")


def test_extension_name_keys_sources_and_flags_not_paths():
    sources = {"a.cpp": b"int f() { return 1; }", "b.cpp": b"int g();"}
    name = nk.extension_name(sources, ["-O3"], ("avx2",))
    assert name == nk.extension_name(dict(reversed(list(sources.items()))), ["-O3"], ("avx2",))
    assert name != nk.extension_name({**sources, "a.cpp": b"int f() { return 2; }"}, ["-O3"], ("avx2",))
    assert name != nk.extension_name({"c.cpp": sources["a.cpp"], "b.cpp": sources["b.cpp"]}, ["-O3"], ("avx2",))
    assert name != nk.extension_name(sources, ["-O2"], ("avx2",))
    assert name != nk.extension_name(sources, ["-O3"], ("avx512f",))
    assert name.startswith("vqa_align_glue_")


def test_two_checkouts_share_one_build_and_the_compile_is_announced(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    fake, said = _FakeCppExtension(), []
    checkouts = []
    for where in ("one", "two"):  # the same sources read from two checkouts
        folder = tmp_path / where / "csrc"
        folder.mkdir(parents=True)
        for path in nk.SOURCES:
            (folder / path.name).write_bytes(path.read_bytes())
        checkouts.append({p.name: p.read_bytes() for p in sorted(folder.iterdir())})
    names = [nk.extension_name(src, nk._CFLAGS, nk.cpu_flags()) for src in checkouts]
    assert names[0] == names[1]
    for sources in checkouts:
        nk.build_and_load(fake, names[0], sources, echo=said.append)
    # Identical compile commands (same staged source paths, same build folder): ninja has nothing to redo.
    assert fake.calls[0] == fake.calls[1]
    assert all(str(tmp_path / "ext") in p and "/one/" not in p for p in fake.calls[0][1])
    assert len(said) == 2  # only the first, which compiled, spoke
    assert "compiling the C++ CPU kernels" in said[0] and "first use only" in said[0]
    assert re.match(r"vqa_align: C\+\+ CPU kernels built in \d+ s ", said[1])


def test_changed_sources_get_their_own_build(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    fake = _FakeCppExtension()
    old = {"a.cpp": b"// one"}
    new = {"a.cpp": b"// two"}
    for sources in (old, new):
        nk.build_and_load(fake, nk.extension_name(sources, nk._CFLAGS), sources, echo=lambda _: None)
    (_, [old_src], old_dir, _), (_, [new_src], new_dir, _) = fake.calls
    assert old_dir != new_dir
    from pathlib import Path

    assert Path(old_src).read_bytes() == b"// one" and Path(new_src).read_bytes() == b"// two"


def test_the_real_build_compiles_the_staged_sources():
    from torch.utils import cpp_extension

    sources = {path.name: path.read_bytes() for path in nk.SOURCES}
    build = nk._build_directory(cpp_extension, nk.extension_name(sources, nk._CFLAGS, nk.cpu_flags()))
    assert sorted(p.name for p in (build / "sources").iterdir()) == sorted(sources)
    assert str(build / "sources") in (build / "build.ninja").read_text()
    assert not any(str(p.parent) in (build / "build.ninja").read_text() for p in nk.SOURCES)
