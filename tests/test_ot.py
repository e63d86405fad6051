"""OT alignment: Sinkhorn convergence, its gradient and the two costs, against a slow float64 reference.

The reference is the plain log-domain Sinkhorn in float64 iterated until the row marginals are
exact to 1e-13 (thousands of iterations where needed). The clustered problems (queries and keys
around a few centres, as trained heads' are) are where a fixed 50 iterations at ε = 0.01 stop far
from the solution; each test also checks that such a truncated run would fail it.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import random_masks

from vqa_align.align.aligner import HeadAligner
from vqa_align.align.distances import ot as alignment
from vqa_align.align.distances.ot import cosine_cost, optimal_transport, ot_cost_matrix, sinkhorn_plan
from vqa_align.config import AlignmentConfig, ConfigError

EPSILON = 0.01


def converged_plan(cost: torch.Tensor, epsilon: float, tol: float = 1e-11, max_iter: int = 500_000) -> torch.Tensor:
    """The entropic OT plans between uniform marginals for costs (..., Nq, Nk), all positions valid:
    plain log-domain Sinkhorn in float64 until every row-marginal L1 error is < ``tol``.
    Warm-started from the potentials at ε = 1, 1/2, 1/4, … (the fixed point at ``epsilon`` is
    unique, so the start only saves iterations: plain Sinkhorn at ε = 0.01 can need millions on
    clustered problems)."""
    cost = cost.double()
    n, m = cost.shape[-2:]
    log_a, log_b = -math.log(n), -math.log(m)
    f, g = torch.zeros_like(cost[..., :, 0]), torch.zeros_like(cost[..., 0, :])
    stages = [2.0**-k for k in range(int(math.log2(1 / epsilon)) + 1) if 2.0**-k > epsilon] + [epsilon]
    for eps in stages:
        for step in range(max_iter):
            f = -eps * torch.logsumexp((g[..., None, :] - cost) / eps + log_b, -1)
            g = -eps * torch.logsumexp((f[..., :, None] - cost) / eps + log_a, -2)
            plan = torch.exp((f[..., :, None] + g[..., None, :] - cost) / eps + log_a + log_b)
            if step % 10 == 0 and (plan.sum(-1) - 1 / n).abs().sum(-1).max() < (tol if eps == epsilon else 1e-6):
                break
        else:
            raise AssertionError(f"the reference did not converge at ε = {eps}")
    return plan


def regularised_ot_value(cost: torch.Tensor, epsilon: float) -> torch.Tensor:
    """min_π <π, C> + ε KL(π | a ⊗ b) over the couplings of uniform a, b, for costs (..., Nq, Nk)
    (float64): its gradient with respect to C is the optimal plan (envelope theorem)."""
    plan = converged_plan(cost, epsilon)
    product = 1.0 / (cost.shape[-1] * cost.shape[-2])
    return (plan * cost.double()).sum((-1, -2)) + epsilon * (plan * (plan / product).log()).sum((-1, -2))


def clustered(nq: int, nk: int, d: int, centres: int, spread: float, gen: torch.Generator):
    """Queries (nq, d) and keys (nk, d) drawn around the same few random centres."""
    c = torch.randn(centres, d, generator=gen)
    q = c[torch.randint(centres, (nq,), generator=gen)] + spread * torch.randn(nq, d, generator=gen)
    k = c[torch.randint(centres, (nk,), generator=gen)] + spread * torch.randn(nk, d, generator=gen)
    return q, k


def ot_aligner(**overrides) -> HeadAligner:
    return HeadAligner(8, AlignmentConfig(method="ot", **overrides))


@pytest.mark.parametrize("seed", range(4))
def test_default_ot_is_converged_on_clustered_points(seed):
    """5 queries and 7 keys around 3 centres (the review's case): the default settings give the
    converged distance; 50 plain iterations do not (for at least some of these draws)."""
    gen = torch.Generator().manual_seed(seed)
    q, k = clustered(5, 7, 8, 3, 0.1, gen)
    q, k = q[None, None], k[None, None]  # (1, 1, N, d)
    qv, kv = torch.ones(1, 5, dtype=torch.bool), torch.ones(1, 7, dtype=torch.bool)
    cost = cosine_cost(q, k)
    want = float((converged_plan(cost[0, 0], EPSILON) * cost[0, 0].double()).sum())
    got = ot_aligner()(q, k, qv, kv).item()
    assert got == pytest.approx(want, abs=5e-4)  # ot_tolerance 1e-3 (L1 marginal error): ~1e-4 here
    truncated, _ = sinkhorn_plan(cost, qv, kv, EPSILON, 50, tolerance=0.0, overrelaxation=1.0, epsilon_start=None)
    truncated_distance = float((truncated * cost).sum())
    if seed == 2:  # this draw: 0.057 after 50 iterations against 0.218 converged
        assert abs(truncated_distance - want) > 0.1


def test_batched_padded_clustered_problems_each_converge():
    """A batch of clustered problems with 4 heads and padding: every (sample, head) matches its own
    converged reference on its valid positions."""
    gen = torch.Generator().manual_seed(11)
    batch, heads, nq, nk, d = 3, 4, 12, 9, 16
    q_valid, k_valid = random_masks(batch, nq, nk, gen)
    pairs = [clustered(nq, nk, d, 3, 0.2, gen) for _ in range(batch * heads)]
    q = torch.stack([p[0] for p in pairs]).view(batch, heads, nq, d)
    k = torch.stack([p[1] for p in pairs]).view(batch, heads, nk, d)
    got = ot_aligner()(q, k, q_valid, k_valid)  # (B, H)
    cost = cosine_cost(q, k)
    for b in range(batch):
        n, m = int(q_valid[b].sum()), int(k_valid[b].sum())
        c = cost[b, :, :n, :m]  # (H, n, m): this sample's valid block, every head
        want = (converged_plan(c, EPSILON, tol=1e-8) * c.double()).sum((-1, -2))
        assert torch.allclose(got[b].double(), want, atol=2e-4, rtol=0), b


@pytest.mark.parametrize("kind", ["clustered", "random"])
def test_ot_gradient_is_that_of_the_converged_regularised_value(kind):
    """dD/dq and dD/dk (autograd through the detached-plan loss, fp32) against central finite
    differences of the float64 regularised OT value; 50 plain iterations miss it."""
    gen = torch.Generator().manual_seed(3)
    q, k = clustered(5, 7, 6, 3, 0.1, gen) if kind == "clustered" else (torch.randn(6, 6, generator=gen), torch.randn(8, 6, generator=gen))
    qv, kv = torch.ones(1, q.shape[0], dtype=torch.bool), torch.ones(1, k.shape[0], dtype=torch.bool)
    q32, k32 = q[None, None].clone().requires_grad_(), k[None, None].clone().requires_grad_()
    ot_aligner()(q32, k32, qv, kv).sum().backward()

    # Central differences, every coordinate of q and k, all perturbed problems solved as one batch.
    q64, k64, h = q.double(), k.double(), 1e-5
    numeric = []
    for x in (q64, k64):
        steps = h * torch.eye(x.numel(), dtype=torch.float64).view(-1, *x.shape)  # (P, N, d)
        other = k64 if x is q64 else q64
        values = []
        for sign in (1.0, -1.0):
            moved, fixed = x + sign * steps, other.expand(steps.shape[0], *other.shape)
            values.append(regularised_ot_value(cosine_cost(*((moved, fixed) if x is q64 else (fixed, moved))), EPSILON))
        numeric.append(((values[0] - values[1]) / (2 * h)).view_as(x))
    for got, want in zip((q32.grad[0, 0], k32.grad[0, 0]), numeric, strict=True):
        assert (got.double() - want).norm() <= 2e-3 * want.norm()

    # The old fixed 50 plain iterations, same inputs: its gradient is off by far more.
    cost = cosine_cost(q[None, None].double(), k[None, None].double())
    truncated, _ = sinkhorn_plan(cost, qv, kv, EPSILON, 50, tolerance=0.0, overrelaxation=1.0, epsilon_start=None)
    q_old = q[None, None].double().requires_grad_()
    (truncated * cosine_cost(q_old, k[None, None].double())).sum().backward()
    assert (q_old.grad[0, 0] - numeric[0]).norm() > 0.02 * numeric[0].norm()


def test_sinkhorn_stops_at_the_tolerance_and_reports_the_error():
    gen = torch.Generator().manual_seed(5)
    q_valid, k_valid = random_masks(2, 30, 20, gen)
    cost = cosine_cost(torch.randn(2, 4, 30, 16, generator=gen), torch.randn(2, 4, 20, 16, generator=gen))
    for tolerance in (1e-3, 1e-6):
        plan, error = sinkhorn_plan(cost, q_valid, k_valid, EPSILON, 5000, tolerance)
        a = (q_valid / q_valid.sum(-1, keepdim=True))[:, None]
        measured = (plan.sum(-1) - a).abs().sum(-1)  # (B, H)
        assert torch.allclose(error, measured, atol=1e-7)
        assert measured.max() <= tolerance
    _, error = sinkhorn_plan(cost, q_valid, k_valid, EPSILON, 3, 1e-6)  # capped: not converged
    assert error.max() > 1e-3


def test_unconverged_ot_warns_once(monkeypatch):
    monkeypatch.setattr(alignment, "_warned_unconverged", False)
    gen = torch.Generator().manual_seed(2)
    q, k = clustered(5, 7, 8, 3, 0.1, gen)
    valid_q, valid_k = torch.ones(1, 5, dtype=torch.bool), torch.ones(1, 7, dtype=torch.bool)
    aligner = ot_aligner(ot_iterations=3)
    with pytest.warns(RuntimeWarning, match="ot_iterations=3"):
        aligner(q[None, None], k[None, None], valid_q, valid_k)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        aligner(q[None, None], k[None, None], valid_q, valid_k)  # once per process


def test_the_two_costs():
    """sqeuclidean is |q̂ - k̂|² (checked against cdist), twice 1 - cos; both give the same plan, so
    the sqeuclidean distance is exactly twice the cosine one; the aligner reads ot_cost."""
    gen = torch.Generator().manual_seed(9)
    q, k = torch.randn(2, 3, 6, 5, generator=gen), torch.randn(2, 3, 4, 5, generator=gen)
    sq = ot_cost_matrix(q, k, "sqeuclidean")
    assert torch.allclose(sq, torch.cdist(F.normalize(q, dim=-1), F.normalize(k, dim=-1)).pow(2), atol=1e-5)
    assert torch.allclose(ot_cost_matrix(q, k, "cosine"), 1 - F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).mT)
    q_valid, k_valid = random_masks(2, 6, 4, gen)
    cos_d = ot_aligner(ot_cost="cosine")(q, k, q_valid, k_valid)
    sq_d = ot_aligner(ot_cost="sqeuclidean")(q, k, q_valid, k_valid)
    assert torch.allclose(sq_d, 2 * cos_d, rtol=1e-5)
    assert torch.allclose(sq_d, optimal_transport(q, k, q_valid, k_valid, cost="sqeuclidean"))
    with pytest.raises(ValueError, match="manhattan"):
        ot_cost_matrix(q, k, "manhattan")


@pytest.mark.parametrize(
    "field,value,message",
    [("ot_cost", "manhattan", "ot_cost"), ("ot_tolerance", -1.0, "ot_tolerance"), ("ot_iterations", 0, "ot_iterations")],
)
def test_bad_ot_settings_are_named(field, value, message):
    with pytest.raises(ConfigError, match=message):
        AlignmentConfig(method="ot", **{field: value}).validate()
