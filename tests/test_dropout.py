"""Counter-based dropout (vqa_align.model.dropout): the distribution of F.dropout, a mask the backward
pass reproduces without storing it, repeatable under torch.manual_seed; and the build cache of its
C++ kernel (vqa_align.model.native_dropout)."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from conftest import require_native_kernels

from vqa_align.model import native_dropout as nk
from vqa_align.model.dropout import Dropout, dropout


@pytest.fixture(autouse=True)
def _native():
    require_native_kernels()


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_and_scale(p):
    torch.manual_seed(0)
    x = torch.rand(1_000_000) + 0.5  # no zeros of its own
    y = dropout(x, p, training=True)
    kept = y != 0
    n = x.numel()
    rate = kept.double().mean().item()
    assert abs(rate - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5  # within 5 standard errors
    torch.testing.assert_close(y[kept], x[kept] / (1 - p), rtol=1e-6, atol=0)


def test_masks_of_neighbours_and_of_successive_calls_are_uncorrelated():
    torch.manual_seed(1)
    x = torch.ones(1_000_000)
    first = (dropout(x, 0.5, True) != 0).double()
    second = (dropout(x, 0.5, True) != 0).double()
    bound = 5 / x.numel() ** 0.5
    assert abs(torch.corrcoef(torch.stack([first[1:], first[:-1]]))[0, 1]) < bound  # element k vs k + 1
    assert abs(torch.corrcoef(torch.stack([first, second]))[0, 1]) < bound  # call 1 vs call 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_backward_applies_the_forward_mask(dtype):
    torch.manual_seed(2)
    x = (torch.rand(4, 33, 17, dtype=torch.float64) + 0.5).to(dtype).requires_grad_()
    y = dropout(x, 0.3, True)
    upstream = torch.randn_like(y)
    (grad,) = torch.autograd.grad(y, x, upstream)
    mask = (y != 0).to(dtype)
    assert 0.6 < mask.double().mean() < 0.8
    torch.testing.assert_close(grad, upstream * mask / 0.7, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=0)


def test_repeatable_under_manual_seed_and_independent_of_threads():
    x = torch.rand(300_000)
    threads = torch.get_num_threads()
    try:
        torch.manual_seed(3)
        torch.set_num_threads(1)
        one = dropout(x, 0.2, True)
        torch.manual_seed(3)
        torch.set_num_threads(2)
        two = dropout(x, 0.2, True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    assert not torch.equal(one, dropout(x, 0.2, True))  # the next call draws a new seed


def test_module_matches_nn_dropout_outside_training_and_at_the_edges(monkeypatch):
    x = torch.randn(5, 7).abs() + 0.1
    module = Dropout(0.4)
    assert isinstance(module, torch.nn.Dropout)  # MC-dropout code finds it by type
    assert torch.equal(module.eval()(x), x)
    assert torch.equal(dropout(x, 0.0, True), x)
    assert torch.equal(dropout(x, 1.0, True), torch.zeros_like(x))  # p = 1: F.dropout's zeros
    monkeypatch.setenv(nk.ENV_SWITCH, "0")  # off: exactly F.dropout
    torch.manual_seed(4)
    got = dropout(x, 0.4, True)
    torch.manual_seed(4)
    assert torch.equal(got, F.dropout(x, 0.4, True))


def test_non_contiguous_input_and_bad_p():
    torch.manual_seed(5)
    x = torch.rand(64, 40).t() + 0.5  # a transposed view
    y = dropout(x, 0.25, True)
    assert y.shape == x.shape
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / 0.75, rtol=1e-6, atol=0)
    with pytest.raises(RuntimeError, match="p must be in"):
        nk.counter_dropout(x, 1.5, 0)


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
    assert name.startswith("vqa_align_dropout_")


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
