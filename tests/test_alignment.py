"""The alignment distances against slow, obvious references, and the paper's gradient directions."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import random_masks as _masks
from vqa_align.align.aligner import HeadAligner, gaussian_mmd2
from vqa_align.align.distances.ct import conditional_transport
from vqa_align.align.distances.gan import adversarial_loss
from vqa_align.align.distances.layers import reverse_gradient
from vqa_align.align.distances.ot import optimal_transport, sinkhorn_plan
from vqa_align.config import AlignmentConfig




def _unit(*shape, gen):
    return F.normalize(torch.randn(*shape, generator=gen, dtype=torch.float64), dim=-1)


def reference_ct(fq, fk, gq, gk, q_valid, k_valid, rho):
    """CT written from the formula with explicit loops over samples, heads and positions."""
    batch, heads = fq.shape[:2]
    out = torch.zeros(batch, heads, dtype=torch.float64)
    for b, h in itertools.product(range(batch), range(heads)):
        qi = [i for i in range(fq.shape[2]) if q_valid[b, i]]
        kj = [j for j in range(fk.shape[2]) if k_valid[b, j]]
        s = {(i, j): float(fq[b, h, i] @ fk[b, h, j]) for i in qi for j in kj}
        c = {(i, j): 1.0 - float(gq[b, h, i] @ gk[b, h, j]) for i in qi for j in kj}
        forward = 0.0
        for i in qi:
            z = sum(math.exp(s[i, j]) for j in kj)
            forward += sum(math.exp(s[i, j]) / z * c[i, j] for j in kj)
        backward = 0.0
        for j in kj:
            z = sum(math.exp(s[i, j]) for i in qi)
            backward += sum(math.exp(s[i, j]) / z * c[i, j] for i in qi)
        out[b, h] = rho * forward / len(qi) + (1 - rho) * backward / len(kj)
    return out


@pytest.mark.parametrize("rho", [0.5, 0.8])
def test_ct_matches_loop_reference(rho):
    gen = torch.Generator().manual_seed(1)
    batch, heads, nq, nk, r = 3, 2, 5, 4, 6
    q_valid, k_valid = _masks(batch, nq, nk, gen)
    fq, fk, gq, gk = (_unit(batch, heads, n, r, gen=gen) for n in (nq, nk, nq, nk))
    got = conditional_transport(fq, fk, gq, gk, q_valid, k_valid, rho)
    assert torch.allclose(got, reference_ct(fq, fk, gq, gk, q_valid, k_valid, rho), atol=1e-5)


def reference_mmd2(x, y):
    """Biased MMD² with the median heuristic, from the formula (one sample, one head)."""
    z = torch.cat([x, y])
    d2 = torch.cdist(z, z).pow(2)
    off = d2[~torch.eye(len(z), dtype=torch.bool)]
    sigma2 = off.median()  # lower median, as torch.nanmedian
    k = torch.exp(-d2 / (2 * sigma2))
    n = len(x)
    return k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()


def test_mmd_matches_reference_and_ignores_padding():
    gen = torch.Generator().manual_seed(2)
    batch, heads, nq, nk, d = 3, 2, 6, 5, 4
    q_valid, k_valid = _masks(batch, nq, nk, gen)
    x = torch.randn(batch, heads, nq, d, generator=gen, dtype=torch.float64)
    y = torch.randn(batch, heads, nk, d, generator=gen, dtype=torch.float64) + 0.5
    got = gaussian_mmd2(x, y, q_valid, k_valid)
    for b, h in itertools.product(range(batch), range(heads)):
        want = reference_mmd2(x[b, h][q_valid[b]].float(), y[b, h][k_valid[b]].float())
        assert abs(got[b, h].item() - want.item()) < 1e-5


def test_mmd_of_a_set_with_itself_is_zero():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 7, 5, generator=gen)
    valid = torch.ones(2, 7, dtype=torch.bool)
    assert gaussian_mmd2(x, x, valid, valid).abs().max() < 1e-6


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_distances_grow_when_sets_are_shifted_apart(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 8, 6, generator=gen)
    valid = torch.ones(2, 8, dtype=torch.bool)
    shifted = x + 3.0 * torch.randn(1, 1, 1, 6, generator=gen).sign()
    same_mmd, far_mmd = gaussian_mmd2(x, x, valid, valid), gaussian_mmd2(x, shifted, valid, valid)
    assert (same_mmd <= far_mmd + 1e-7).all()
    same_ot = optimal_transport(x, x, valid, valid, epsilon=0.01)
    far_ot = optimal_transport(x, shifted, valid, valid, epsilon=0.01)
    assert (same_ot <= far_ot + 1e-6).all()
    ux, us = F.normalize(x, dim=-1), F.normalize(shifted, dim=-1)
    same_ct = conditional_transport(ux, ux, ux, ux, valid, valid)
    far_ct = conditional_transport(ux, us, ux, us, valid, valid)
    assert (same_ct <= far_ct + 1e-6).all()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_sinkhorn_matches_exact_assignment(seed):
    gen = torch.Generator().manual_seed(seed)
    n = 5
    q = torch.randn(1, 1, n, 3, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 1, n, 3, generator=gen, dtype=torch.float64)
    valid = torch.ones(1, n, dtype=torch.bool)
    cost = 1 - F.normalize(q, dim=-1)[0, 0] @ F.normalize(k, dim=-1)[0, 0].T
    exact = min(sum(cost[i, p[i]].item() for i in range(n)) for p in itertools.permutations(range(n))) / n
    got = optimal_transport(q, k, valid, valid, epsilon=0.002, iterations=2000).item()
    assert abs(got - exact) < 5e-3


def test_sinkhorn_plan_has_uniform_marginals_and_no_mass_on_padding():
    gen = torch.Generator().manual_seed(4)
    q_valid, k_valid = _masks(3, 6, 4, gen)
    cost = torch.rand(3, 2, 6, 4, generator=gen) * 2
    plan, _ = sinkhorn_plan(cost, q_valid, k_valid, epsilon=0.05, iterations=300, tolerance=1e-6)
    n = q_valid.sum(-1, keepdim=True).float()
    m = k_valid.sum(-1, keepdim=True).float()
    assert torch.allclose(plan.sum(-1), (q_valid / n)[:, None].expand(-1, 2, -1), atol=1e-4)
    assert torch.allclose(plan.sum(-2), (k_valid / m)[:, None].expand(-1, 2, -1), atol=1e-4)
    assert plan[~(q_valid[:, None, :, None] & k_valid[:, None, None, :]).expand_as(plan)].abs().max() == 0


@pytest.mark.parametrize("method", ["ct", "gan", "ot"])
def test_padding_never_enters_the_distributions(method):
    torch.manual_seed(0)
    aligner = HeadAligner(8, AlignmentConfig(method=method, helper_hidden=16, helper_out=8, ot_iterations=30))
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 3, 5, 8, generator=gen)
    k = torch.randn(2, 3, 4, 8, generator=gen)
    q_valid = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    k_valid = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    base = aligner(q, k, q_valid, k_valid)
    q2, k2 = q.clone(), k.clone()
    q2[0, :, 3:] = 100.0
    k2[0, :, 2:] = -50.0
    assert torch.allclose(aligner(q2, k2, q_valid, k_valid), base, atol=1e-5)
    trimmed = aligner(q[:1, :, :3], k[:1, :, :2], q_valid[:1, :3], k_valid[:1, :2])
    assert torch.allclose(trimmed, base[:1], atol=1e-5)


def test_gradient_reversal_negates_gradient():
    x = torch.randn(4, requires_grad=True)
    (reverse_gradient(x) * torch.arange(4.0)).sum().backward()
    assert torch.equal(x.grad, -torch.arange(4.0))


def _step(params, loss_fn, lr):
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is not None:
                p -= lr * g


def _separated_queries_and_keys():
    """q (4, 2, 6, 8) and keys shifted by +1 (4, 2, 5, 8), both leaf tensors; no padding."""
    q = torch.randn(4, 2, 6, 8, requires_grad=True)
    k = (torch.randn(4, 2, 5, 8) + 1.0).requires_grad_(True)
    return q, k, torch.ones(4, 6, dtype=torch.bool), torch.ones(4, 5, dtype=torch.bool)


def test_ct_signs_critic_ascends_projections_and_navigator_descend():
    torch.manual_seed(0)
    aligner = HeadAligner(8, AlignmentConfig(method="ct", helper_hidden=16, helper_out=8))
    q, k, qv, kv = _separated_queries_and_keys()

    def ct():
        return aligner(q, k, qv, kv).mean()

    before = ct().item()
    _step(list(aligner.critic.parameters()), ct, lr=0.05)  # gradient *descent* on the total loss
    after_critic = ct().item()
    assert after_critic > before, "the critic must maximise CT"
    _step([q, k] + list(aligner.navigator.parameters()), ct, lr=0.05)
    assert ct().item() < after_critic, "projections and navigator must minimise CT"


def test_gan_signs_discriminator_descends_projections_ascend():
    torch.manual_seed(0)
    aligner = HeadAligner(8, AlignmentConfig(method="gan", helper_hidden=16))
    q, k, qv, kv = _separated_queries_and_keys()

    def loss():
        return aligner(q, k, qv, kv).mean()

    before = loss().item()
    _step(list(aligner.discriminator.parameters()), loss, lr=0.05)
    after_d = loss().item()
    assert after_d < before, "the discriminator must minimise its loss"
    grads = torch.autograd.grad(loss(), [q, k])
    assert all(g.abs().sum() > 0 for g in grads), "both queries and keys are aligned (none detached)"
    _step([q, k], loss, lr=0.05)
    assert loss().item() > after_d, "queries and keys must maximise the discriminator loss"


def test_adversarial_loss_matches_formula():
    lq = torch.tensor([[[0.3, -1.0, 5.0]]])
    lk = torch.tensor([[[2.0, 0.1]]])
    qv = torch.tensor([[True, True, False]])
    kv = torch.tensor([[True, True]])
    want = (-math.log(torch.sigmoid(torch.tensor(2.0))) - math.log(torch.sigmoid(torch.tensor(0.1)))) / 2 + (
        -math.log(1 - torch.sigmoid(torch.tensor(0.3))) - math.log(1 - torch.sigmoid(torch.tensor(-1.0)))
    ) / 2
    assert abs(adversarial_loss(lq, lk, qv, kv).item() - want) < 1e-5


def test_ot_gradient_reaches_queries_and_keys():
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(2, 2, 5, 4, generator=gen, requires_grad=True)
    k = torch.randn(2, 2, 3, 4, generator=gen, requires_grad=True)
    v = torch.ones(2, 5, dtype=torch.bool), torch.ones(2, 3, dtype=torch.bool)
    optimal_transport(q, k, *v).sum().backward()
    assert q.grad.abs().sum() > 0 and k.grad.abs().sum() > 0


def test_every_registered_distance_has_what_its_row_promises():
    """The registry is the one list of distances: the configuration accepts exactly its names, and
    every row's module holds the helpers' builder, the reference and each implementation it names."""
    from vqa_align.align.distances import DISTANCES, distance_module
    from vqa_align.config import ALIGNMENT_METHODS

    assert ALIGNMENT_METHODS == tuple(DISTANCES)
    for name, row in DISTANCES.items():
        assert row.name == name and row.colour.startswith("#")
        if row.module is None:
            continue
        module = distance_module(name)
        for function in ("build_helpers", "reference", *row.kernels):
            assert callable(getattr(module, function)), (name, function)
        if "triton" in row.kernels:
            assert callable(module.triton_fits) and module.TRITON_KERNELS.startswith("vqa_align.align.kernels.")
