"""Counter-based dropout (vqa_align.model.dropout): the distribution of F.dropout, a mask the backward
pass reproduces without storing it, repeatable under torch.manual_seed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import require_native_kernels

from vqa_align.align.kernels import native as native_kernels
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
    monkeypatch.setenv(native_kernels.ENV_SWITCH, "0")  # off: exactly F.dropout
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
        torch.ops.vqa_align_glue.counter_dropout(x, 1.5, 0)
