"""Every fast path against the plain path it replaces, on random inputs (values and gradients).

- CT and GAN: the hand-fused forward/backward of ``vqa_align.align.kernels.fused`` (the default
  ``HeadAligner`` path) vs. the helper modules called separately on q and k under autograd, with
  explicit (Nq, Nk) plan and cost matrices; in fp64 to rounding, in bf16 helper precision to bf16
  accuracy; the plain module path (``kernels="reference"``) against the same reference.
- CT transport directions as fused attention (the unfused path) vs. the explicit matrices.
- OT: the stabilised exp-domain Sinkhorn (absorption, vector-matrix products, tolerance check)
  vs. the plain log-domain Sinkhorn; exact zeros on padding; small ε without under/overflow.
- Attention: the fused scaled_dot_product_attention path vs. the explicit-weights path.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import random_masks as _masks
from torch.nn.attention import SDPBackend, sdpa_kernel

from vqa_align.align.aligner import HeadAligner
from vqa_align.align.distances.ct import conditional_transport
from vqa_align.align.distances.gan import adversarial_loss
from vqa_align.align.distances.layers import call_with_reversed_parameters, reverse_gradient
from vqa_align.align.distances.ot import cosine_cost, sinkhorn_plan
from vqa_align.config import AlignmentConfig
from vqa_align.align.attention import MultiHeadAttention


def plain_ct(aligner, q, k, qv, kv):
    """Separate helper calls and explicit (Nq, Nk) plans/costs, straight from the formula."""
    fq, fk = F.normalize(aligner.navigator(q), dim=-1), F.normalize(aligner.navigator(k), dim=-1)
    gq = F.normalize(call_with_reversed_parameters(aligner.critic, q), dim=-1)
    gk = F.normalize(call_with_reversed_parameters(aligner.critic, k), dim=-1)
    s = fq @ fk.transpose(-1, -2)
    c = 1.0 - gq @ gk.transpose(-1, -2)
    pair = qv[:, None, :, None] & kv[:, None, None, :]
    fwd = s.masked_fill(~pair, float("-inf")).softmax(-1).nan_to_num(0.0)
    bwd = s.masked_fill(~pair, float("-inf")).softmax(-2).nan_to_num(0.0)
    n = qv.sum(-1)[:, None].to(q.dtype)
    m = kv.sum(-1)[:, None].to(q.dtype)
    rho = aligner.rho
    return rho * (fwd * c).sum((-1, -2)) / n + (1 - rho) * (bwd * c).sum((-1, -2)) / m


def plain_gan(aligner, q, k, qv, kv):
    lq = aligner.discriminator(reverse_gradient(q)).squeeze(-1)
    lk = aligner.discriminator(reverse_gradient(k)).squeeze(-1)
    return adversarial_loss(lq, lk, qv, kv)


def log_domain_sinkhorn(cost, qv, kv, epsilon, iterations):
    """The plain log-domain Sinkhorn (logsumexp over the full matrix every half-iteration)."""
    cost = cost.double()
    n, m = qv.sum(-1).double(), kv.sum(-1).double()
    log_a = torch.where(qv, -torch.log(n)[:, None], torch.tensor(-1e9, dtype=torch.float64))[:, None]
    log_b = torch.where(kv, -torch.log(m)[:, None], torch.tensor(-1e9, dtype=torch.float64))[:, None]
    pair = qv[:, None, :, None] & kv[:, None, None, :]
    log_k = torch.where(pair, -cost / epsilon, torch.tensor(-1e9, dtype=torch.float64))
    u, v = torch.zeros_like(cost[..., 0]), torch.zeros_like(cost[..., 0, :])
    for _ in range(iterations):
        u = log_a - torch.logsumexp(log_k + v[..., None, :], -1)
        v = log_b - torch.logsumexp(log_k + u[..., :, None], -2)
    return torch.exp(log_k + u[..., :, None] + v[..., None, :]) * pair


def _aligner_case(method: str, seed: int, precision: str = "fp32", fused: bool = True):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    d, heads, nq, nk = 16, 3, 7, 5
    config = AlignmentConfig(method=method, helper_hidden=24, helper_out=12, helper_precision=precision,
                             kernels="fused" if fused else "reference")
    aligner = HeadAligner(d, config).double()
    qv, kv = _masks(4, nq, nk, gen)
    q = torch.randn(4, heads, nq, d, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(4, heads, nk, d, generator=gen, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(4, heads, generator=gen, dtype=torch.float64)  # a non-uniform dLoss/dD
    params = [q, k] + list(aligner.parameters())
    got = aligner(q, k, qv, kv)
    got_grads = torch.autograd.grad((got * upstream).sum(), params)
    ref = (plain_ct if method == "ct" else plain_gan)(aligner, q, k, qv, kv)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), params)
    return got, got_grads, ref, ref_grads


@pytest.mark.parametrize("method", ["ct", "gan"])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("fused", [True, False])
def test_aligner_matches_separate_helper_calls_and_explicit_matrices(method, seed, fused):
    got, got_grads, ref, ref_grads = _aligner_case(method, seed, fused=fused)
    assert got.dtype == torch.float64
    assert torch.allclose(got, ref, atol=1e-10)
    for a, b in zip(got_grads, ref_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-9)


@pytest.mark.parametrize("method", ["ct", "gan"])
def test_bf16_helper_precision_stays_close_to_the_exact_values_and_gradients(method):
    got, got_grads, ref, ref_grads = _aligner_case(method, 2, precision="bf16")
    assert got.dtype == torch.float32  # the distance itself is accumulated in fp32
    assert (got.double() - ref).abs().max() <= 0.02 * ref.abs().max()
    # bf16 keeps ~3 significant digits: gradients agree in direction and size, not to rounding
    # (a wrong sign or a missing term gives a cosine far below 0.99).
    for a, b in zip(got_grads, ref_grads, strict=True):
        assert F.cosine_similarity(a.double().flatten(), b.flatten(), dim=0) > 0.99
    for a, b in zip(got_grads[:2], ref_grads[:2], strict=True):  # dD/dq, dD/dk
        assert (a.double() - b).abs().max() <= 0.15 * b.abs().max()


def test_helper_precision_resolution(monkeypatch):
    from vqa_align.align.kernels import common as alignment_kernels

    q32 = torch.zeros(1, 1, 1, 4)
    assert alignment_kernels.compute_dtype("fp32", q32) == torch.float32
    assert alignment_kernels.compute_dtype("fp32", q32.double()) == torch.float64
    assert alignment_kernels.compute_dtype("bf16", q32) == torch.bfloat16
    monkeypatch.setattr(alignment_kernels, "_cpu_has_bf16", lambda: True)
    assert alignment_kernels.compute_dtype("auto", q32) == torch.bfloat16
    assert alignment_kernels.compute_dtype("auto", q32.double()) == torch.float64  # fp64 asks for precision
    monkeypatch.setattr(alignment_kernels, "_cpu_has_bf16", lambda: False)
    assert alignment_kernels.compute_dtype("auto", q32) == torch.float32
    with pytest.raises(ValueError, match="helper_precision"):
        alignment_kernels.compute_dtype("fp8", q32)


def test_fused_ct_matches_explicit_matrices_float32():
    gen = torch.Generator().manual_seed(3)
    qv, kv = _masks(3, 9, 6, gen)
    fq, fk, gq, gk = (F.normalize(torch.randn(3, 2, n, 8, generator=gen), dim=-1) for n in (9, 6, 9, 6))
    got = conditional_transport(fq, fk, gq, gk, qv, kv, 0.7)
    s = fq @ fk.transpose(-1, -2)
    c = 1 - gq @ gk.transpose(-1, -2)
    pair = qv[:, None, :, None] & kv[:, None, None, :]
    fwd = s.masked_fill(~pair, float("-inf")).softmax(-1).nan_to_num(0.0)
    bwd = s.masked_fill(~pair, float("-inf")).softmax(-2).nan_to_num(0.0)
    want = 0.7 * (fwd * c).sum((-1, -2)) / qv.sum(-1)[:, None] + 0.3 * (bwd * c).sum((-1, -2)) / kv.sum(-1)[:, None]
    assert torch.allclose(got, want, atol=1e-5)


# Tolerances: fp32 (fast) vs fp64 (reference) iterates drift apart where Sinkhorn is far from
# converged (ε = 0.01 after 50 iterations); the transport cost, which is what the loss uses, stays close.
@pytest.mark.parametrize("epsilon,iterations,plan_tol,cost_tol", [(0.1, 100, 1e-6, 1e-6), (0.05, 300, 2e-5, 1e-5), (0.01, 50, 1e-2, 1e-3)])
def test_stabilised_sinkhorn_matches_log_domain(epsilon, iterations, plan_tol, cost_tol):
    gen = torch.Generator().manual_seed(7)
    qv, kv = _masks(3, 12, 9, gen)
    q = torch.randn(3, 2, 12, 6, generator=gen)
    k = torch.randn(3, 2, 9, 6, generator=gen) + 0.2
    cost = cosine_cost(q, k)
    # No early stop and no over-relaxation: the same iterates as the reference.
    fast, _ = sinkhorn_plan(cost, qv, kv, epsilon, iterations, tolerance=0.0, overrelaxation=1.0, epsilon_start=None)
    ref = log_domain_sinkhorn(cost, qv, kv, epsilon, iterations)
    assert fast.dtype == torch.float32
    assert (fast.double() - ref).abs().max() < plan_tol
    assert ((fast.double() - ref) * cost.double()).sum((-1, -2)).abs().max() < cost_tol
    pair = qv[:, None, :, None] & kv[:, None, None, :]
    assert fast[~pair.expand_as(fast)].abs().max() == 0


def test_sinkhorn_early_stop_is_converged_and_small_epsilon_is_finite():
    gen = torch.Generator().manual_seed(8)
    qv, kv = _masks(2, 10, 10, gen)
    cost = torch.rand(2, 3, 10, 10, generator=gen) * 2
    plan, error = sinkhorn_plan(cost, qv, kv, epsilon=0.1, iterations=5000, tolerance=1e-6, check_every=10)
    assert error.shape == (2, 3) and error.max() <= 1e-6
    n, m = qv.sum(-1, keepdim=True).float(), kv.sum(-1, keepdim=True).float()
    assert (plan.sum(-1) - (qv / n)[:, None]).abs().sum(-1).max() <= 1e-6 + 1e-7
    assert (plan.sum(-2) - (kv / m)[:, None]).abs().sum(-1).max() <= 1e-5
    tiny_eps, _ = sinkhorn_plan(cost, qv, kv, epsilon=1e-3, iterations=200)  # exp(-2/ε) underflows without absorption
    assert torch.isfinite(tiny_eps).all() and torch.allclose(tiny_eps.sum((-1, -2)), torch.ones(2, 3), atol=1e-3)


@pytest.mark.parametrize("cross", [False, True])
def test_sdpa_path_matches_explicit_attention_with_gradients(cross):
    torch.manual_seed(0)
    mha = MultiHeadAttention(32, 4, dropout=0.0).double()
    x = torch.randn(3, 7, 32, dtype=torch.float64, requires_grad=True)
    y = torch.randn(3, 5, 32, dtype=torch.float64, requires_grad=True) if cross else x
    xv = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] + [0] * 6], dtype=torch.bool)
    yv = torch.tensor([[1] * 5, [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool) if cross else xv
    fast, _, _ = mha(x, y, xv, yv)
    slow, _, _ = mha(x, y, xv, yv, need_details=True)
    inputs = [x, y] if cross else [x]
    g_fast = torch.autograd.grad((fast * xv[..., None]).sum(), inputs)
    g_slow = torch.autograd.grad((slow * xv[..., None]).sum(), inputs)
    assert torch.allclose(fast[xv], slow[xv], atol=1e-10)
    for a, b in zip(g_fast, g_slow, strict=True):
        assert torch.allclose(a, b, atol=1e-9)


@pytest.mark.parametrize("method", ["ct", "gan"])
def test_fused_aligners_refuse_second_order_gradients_and_the_plain_ones_give_them(method):
    """Under create_graph=True (a gradient penalty) the fused backward would return gradients with no
    graph of their own: it raises, naming the remedy. The plain modules (kernels = "reference"; CT's SDPA on
    its math backend) give a second-order gradient, checked by finite differences of the first-order
    one along a direction."""
    torch.manual_seed(0)
    aligner = HeadAligner(8, AlignmentConfig(method=method, helper_hidden=16, helper_out=8)).double()
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 2, 5, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 4, 8, generator=gen, dtype=torch.float64)
    qv, kv = _masks(2, 5, 4, gen)
    with pytest.raises(RuntimeError, match=r"no second-order gradient.*\.kernels = \"reference\""):
        torch.autograd.grad(aligner(q, k, qv, kv).sum(), q, create_graph=True)
    torch.autograd.grad(aligner(q, k, qv, kv).sum(), q)  # first order: fine

    aligner.kernels = "reference"

    def penalty(x):  # |dD/dq|², the gradient penalty's term
        (grad,) = torch.autograd.grad(aligner(x, k, qv, kv).sum(), x, create_graph=True)
        return grad.pow(2).sum()

    with sdpa_kernel(SDPBackend.MATH):  # the fused SDPA kernels have no double backward
        (second,) = torch.autograd.grad(penalty(q), q)
        direction = torch.randn(q.shape, generator=gen, dtype=torch.float64)
        h = 1e-5
        with torch.no_grad():
            plus, minus = (q + h * direction).requires_grad_(), (q - h * direction).requires_grad_()
        numeric = (penalty(plus) - penalty(minus)).item() / (2 * h)
    # GAN: q reaches the discriminator through a gradient reversal, which flips every gradient that
    # flows back through it to q, the penalty's too.
    sign = -1.0 if method == "gan" else 1.0
    assert (second * direction).sum().item() == pytest.approx(sign * numeric, rel=1e-4, abs=1e-9)
