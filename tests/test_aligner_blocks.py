"""The cache-blocked CT and GAN kernels (csrc/aligner_blocks.cpp: AMX matmuls, one block of rows or
one (sample, head) at a time) against exact references.

- Helpers: forward units and every backward gradient against fp64 autograd of the same networks in
  which the kernel's bf16 rounding points (the matmul inputs x, weights, hidden activations, the
  highway output) are modelled with straight-through rounding. The kernel then agrees to bf16
  rounding of its gradients (< 1 %); a wrong term or a wrong transpose gives errors of order 1.
- Transport: the row and column sums of E and E ⊙ C, and the four plan/gradient products, against
  explicit (Nq, Nk) matrices, with padded queries and keys, Nq ≠ Nk, and Nk below one vector.
- GAN discriminator: logits and every gradient against the same kind of rounding-aware reference,
  with the gradient reversal on the rows.
- The whole CT and GAN aligners with the kernels against the plain helper calls (and, for CT,
  explicit matrices) in fp64, and against the layer-by-layer bf16 path; q and k as the attention's
  transposed views, read in place, with gradients in their layout.
- Thread-count independence, and errors that name the bad argument.

Skipped where the kernels do not run (no AMX / AVX-512-BF16, or no compiler).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import random_masks, require_native_kernels
from test_fused_paths import plain_ct, plain_gan

from vqa_align.align.kernels import native as nk
from vqa_align.align.aligner import HeadAligner
from vqa_align.config import AlignmentConfig

WIDTHS = (64, 64, 96, 32)  # d, navigator hidden, critic hidden, out: multiples of 32, hidden widths differ


@pytest.fixture(autouse=True)
def _kernels():
    require_native_kernels()
    if not nk.helper_blocks(torch.device("cpu"), torch.bfloat16, WIDTHS):
        pytest.skip("the cache-blocked CT kernels need AMX and AVX-512-BF16")


def _round(t: torch.Tensor) -> torch.Tensor:
    """t rounded to bf16 in the forward pass, identity in the backward pass."""
    return t + (t.to(torch.bfloat16).to(t.dtype) - t).detach()


def _highway_reference(x: torch.Tensor, gate_w: torch.Tensor, gate_b: torch.Tensor) -> torch.Tensor:
    """The highway (gate_w = [W_transform; W_gate]) on rounded rows x, its output rounded to bf16."""
    d = x.shape[-1]
    transform = F.linear(x, gate_w[:d], gate_b[:d])
    gate = torch.sigmoid(F.linear(x, gate_w[d:], gate_b[d:]))
    return _round(x + gate * (F.relu(transform) - x))


def _helpers_reference(rows: torch.Tensor, w: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Navigator and critic units of (R, d) rows, with the kernel's bf16 rounding points."""
    x = _round(rows)
    nav_hidden = _round(F.relu(F.linear(x, w[0], w[1])))
    nav = F.normalize(F.linear(nav_hidden, w[2], w[3]), dim=-1)
    highway = _highway_reference(x, w[4], w[5])
    crit_hidden = _round(F.relu(F.linear(highway, w[6], w[7])))
    crit = F.normalize(F.linear(crit_hidden, w[8], w[9]), dim=-1)
    return nav, crit


def _weights(gen: torch.Generator) -> list[torch.Tensor]:
    d, hn, hc, r = WIDTHS
    out = []
    for n_out, n_in in ((hn, d), (r, hn), (2 * d, d), (hc, d), (r, hc)):
        weight = torch.randn(n_out, n_in, generator=gen) / n_in**0.5
        out += [weight.to(torch.bfloat16).float(), 0.1 * torch.randn(n_out, generator=gen)]  # bf16-exact weights
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_helpers_match_a_reference_with_the_same_rounding(dtype):
    gen = torch.Generator().manual_seed(0)
    d = WIDTHS[0]
    # 3·2·37 = 222 query rows (a partial last block), 126 key rows.
    queries = torch.randn(3, 2, 37, d, generator=gen).to(dtype)
    keys = torch.randn(3, 2, 21, d, generator=gen).to(dtype)
    w = _weights(gen)
    nav, nav_norm, crit, crit_norm = torch.ops.vqa_align_glue.ct_helpers_forward(queries, keys, w)

    rows = torch.cat([queries.reshape(-1, d), keys.reshape(-1, d)]).double().requires_grad_()
    w64 = [t.double().requires_grad_() for t in w]
    ref_nav, ref_crit = _helpers_reference(rows, w64)
    assert (nav.double() - ref_nav).abs().max() < 1e-2  # unit vectors, rounded to bf16
    assert (crit.double() - ref_crit).abs().max() < 1e-2
    assert nav_norm.dtype == torch.float32 and nav_norm.shape == (rows.shape[0],)

    grad_nav = torch.randn(nav.shape, generator=gen).to(torch.bfloat16)
    grad_crit = torch.randn(crit.shape, generator=gen).to(torch.bfloat16)
    # crit_sign -1: the kernel back-propagates -grad_crit into the critic (the cost is 1 - g·g).
    ((ref_nav * grad_nav.double()).sum() - (ref_crit * grad_crit.double()).sum()).backward()
    grad_q, grad_k, *grad_w = torch.ops.vqa_align_glue.ct_helpers_backward(
        queries, keys, w, grad_nav, grad_crit, -1.0, nav, nav_norm, crit, crit_norm
    )
    assert grad_q.dtype == dtype and grad_q.shape == queries.shape and grad_k.shape == keys.shape
    ref_rows = rows.grad
    n_q = queries.numel() // d
    assert _rel(grad_q.reshape(-1, d), ref_rows[:n_q]) < 0.01
    assert _rel(grad_k.reshape(-1, d), ref_rows[n_q:]) < 0.01
    for got, param in zip(grad_w, w64, strict=True):
        assert got.shape == param.shape and got.dtype == torch.float32
        assert _rel(got, param.grad) < 0.01


def _units(gen, rows, width):
    return F.normalize(torch.randn(rows, width, generator=gen), dim=-1).to(torch.bfloat16)


@pytest.mark.parametrize("nq,nk", [(37, 21), (100, 14), (14, 14), (5, 40)])
def test_transport_matches_explicit_matrices(nq, nk):
    gen = torch.Generator().manual_seed(nq * 100 + nk)
    batch, heads, r = 3, 2, WIDTHS[3]
    n_q = batch * heads * nq
    nav = _units(gen, n_q + batch * heads * nk, r)
    crit = _units(gen, n_q + batch * heads * nk, r)
    q_valid, k_valid = random_masks(batch, nq, nk, gen)
    fq, fk = nav[:n_q].double().view(batch, heads, nq, r), nav[n_q:].double().view(batch, heads, nk, r)
    gq, gk = crit[:n_q].double().view(batch, heads, nq, r), crit[n_q:].double().view(batch, heads, nk, r)
    pair = (q_valid[:, None, :, None] & k_valid[:, None, None, :]).double()
    e = (fq @ fk.transpose(-1, -2)).exp() * pair
    cost = 1.0 - gq @ gk.transpose(-1, -2)

    sums = torch.ops.vqa_align_glue.ct_transport_forward(nav, crit, q_valid, k_valid, heads)
    expected = (e.sum(-1), e.sum(-2), (e * cost).sum(-1), (e * cost).sum(-2))
    for got, ref in zip(sums, expected, strict=True):
        assert got.dtype == torch.float32 and got.shape == ref.shape
        assert (got.double() - ref).abs().max() <= 1e-5 * ref.abs().max()

    alpha, a = (torch.randn(batch, heads, nq, generator=gen) for _ in range(2))
    beta, b = (torch.randn(batch, heads, nk, generator=gen) for _ in range(2))
    plan = e * (alpha[..., None] + beta[..., None, :]).double()
    grad_s = plan * cost - e * (a[..., None] + b[..., None, :]).double()
    ref_nav = torch.cat([(grad_s @ fk).reshape(-1, r), (grad_s.transpose(-1, -2) @ fq).reshape(-1, r)])
    ref_crit = torch.cat([(plan @ gk).reshape(-1, r), (plan.transpose(-1, -2) @ gq).reshape(-1, r)])
    grad_nav, grad_crit = torch.ops.vqa_align_glue.ct_transport_backward(
        nav, crit, q_valid, k_valid, heads, alpha, beta, a, b
    )
    assert grad_nav.dtype == torch.bfloat16 and grad_nav.shape == nav.shape
    assert _rel(grad_nav, ref_nav) < 0.01
    assert _rel(grad_crit, ref_crit) < 0.01


def _aligner_grads(aligner, q, k, q_valid, k_valid, upstream):
    params = [q, k, *aligner.parameters()]
    distance = aligner(q, k, q_valid, k_valid)
    return distance, torch.autograd.grad((distance * upstream).sum(), params)


def _aligner_against_references(monkeypatch, config: AlignmentConfig, d: int, seed: int, uniform: bool = False):
    """The aligner with the kernels, with the layer-by-layer path (same bf16 helpers) and the plain
    fp64 reference -> (distance, grads) of each, for q, k and every helper parameter. ``uniform``:
    dLoss/dD the same for every (sample, head), as in training."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    aligner = HeadAligner(d, config)
    q_valid, k_valid = random_masks(4, 37, 21, gen)
    q = torch.randn(4, 3, 37, d, generator=gen, requires_grad=True)
    k = torch.randn(4, 3, 21, d, generator=gen, requires_grad=True)
    upstream = torch.full((4, 3), 0.3) if uniform else torch.randn(4, 3, generator=gen)

    got = _aligner_grads(aligner, q, k, q_valid, k_valid, upstream)
    monkeypatch.setenv(nk.HELPER_BLOCKS_SWITCH, "0")
    layers = _aligner_grads(aligner, q, k, q_valid, k_valid, upstream)
    monkeypatch.delenv(nk.HELPER_BLOCKS_SWITCH)

    exact = HeadAligner(d, config).double()
    exact.load_state_dict(aligner.state_dict())
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    plain = plain_ct if config.method == "ct" else plain_gan
    ref = plain(exact, q64, k64, q_valid, k_valid)
    ref_grads = torch.autograd.grad((ref * upstream.double()).sum(), [q64, k64, *exact.parameters()])
    return got, layers, (ref, ref_grads)


@pytest.mark.parametrize("uniform", [False, True])
def test_aligner_with_the_kernels_matches_the_exact_distance_and_the_layer_path(monkeypatch, uniform):
    d, hidden, _, r = WIDTHS  # HeadAligner gives the navigator and the critic one hidden width
    config = AlignmentConfig(method="ct", helper_hidden=hidden, helper_out=r, helper_precision="bf16")
    (got, got_grads), (layers, layer_grads), (ref, ref_grads) = _aligner_against_references(
        monkeypatch, config, d, 3, uniform
    )
    assert got.dtype == torch.float32
    assert (got.double() - ref).abs().max() <= 0.02 * ref.abs().max()
    assert (got - layers).abs().max() <= 0.02 * layers.abs().max()
    for a, b, c in zip(got_grads, ref_grads, layer_grads, strict=True):
        assert a.shape == b.shape and a.dtype == c.dtype
        assert F.cosine_similarity(a.double().flatten(), b.flatten(), dim=0) > 0.99
        assert F.cosine_similarity(a.double().flatten(), c.double().flatten(), dim=0) > 0.99


@pytest.mark.parametrize("method", ["ct", "gan"])
@pytest.mark.parametrize("fused_projection", [False, True])
def test_transposed_views_are_read_in_place_and_get_gradients_in_their_layout(method, fused_projection):
    """The attention hands the aligner q and k as (B, N, H, d) -> (B, H, N, d) transposed views, of
    their own projections or (self-attention) of column chunks of the fused QKV projection."""
    gen = torch.Generator().manual_seed(4)
    d, hidden, _, r = WIDTHS
    config = AlignmentConfig(method=method, helper_hidden=hidden, helper_out=r, helper_precision="bf16")
    aligner = HeadAligner(d, config)
    q_valid, k_valid = random_masks(3, 40, 9, gen)
    width = 3 * 2 * d if fused_projection else 2 * d
    q_flat = torch.randn(3, 40, width, generator=gen, requires_grad=True)
    k_flat = torch.randn(3, 9, width, generator=gen, requires_grad=True)
    views = [t[..., : 2 * d].view(3, -1, 2, d).transpose(1, 2) for t in (q_flat, k_flat)]  # (B, H, N, d)
    copies = [v.detach().contiguous().requires_grad_() for v in views]
    grads: dict[int, torch.Tensor] = {}
    for index, v in enumerate(views):
        v.register_hook(lambda g, index=index: grads.__setitem__(index, g))  # as the aligner returns it
    aligner(*views, q_valid, k_valid).sum().backward()
    aligner(*copies, q_valid, k_valid).sum().backward()
    for view, grad, copy in zip(views, (grads[0], grads[1]), copies, strict=True):
        assert not view.is_contiguous()
        assert not grad.is_contiguous() and grad.transpose(1, 2).is_contiguous()  # (B, N, H, d) in memory
        if not fused_projection:
            assert grad.stride() == view.stride()  # no re-layout of the gradient
        assert torch.equal(grad, copy.grad)


GAN_WIDTHS = (64, 96)  # d, discriminator hidden


def _discriminator_weights(gen: torch.Generator) -> list[torch.Tensor]:
    d, hidden = GAN_WIDTHS
    out = []
    for n_out, n_in in ((2 * d, d), (hidden, d), (1, hidden)):
        weight = torch.randn(n_out, n_in, generator=gen) / n_in**0.5
        out += [weight.to(torch.bfloat16).float(), 0.1 * torch.randn(n_out, generator=gen)]
    return out


def _discriminator_reference(rows: torch.Tensor, w: list[torch.Tensor], slope: float) -> torch.Tensor:
    """Logits of (R, d) rows with the kernel's bf16 rounding points (x, the highway output)."""
    x = _round(rows)
    highway = _highway_reference(x, w[0], w[1])
    hidden = F.leaky_relu(F.linear(highway, w[2], w[3]), slope)
    return F.linear(hidden, w[4], w[5]).squeeze(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_discriminator_matches_a_reference_with_the_same_rounding(dtype):
    gen = torch.Generator().manual_seed(1)
    d, slope = GAN_WIDTHS[0], 0.2
    queries = torch.randn(3, 2, 37, d, generator=gen).to(dtype)
    keys = torch.randn(3, 2, 21, d, generator=gen).to(dtype)
    w = _discriminator_weights(gen)
    logits = torch.ops.vqa_align_glue.gan_discriminator_forward(queries, keys, w, slope)
    rows = torch.cat([queries.reshape(-1, d), keys.reshape(-1, d)]).double().requires_grad_()
    w64 = [t.double().requires_grad_() for t in w]
    ref = _discriminator_reference(rows, w64, slope)
    assert logits.dtype == torch.float32 and logits.shape == ref.shape
    assert (logits.double() - ref).abs().max() <= 1e-3 * max(1.0, ref.abs().max().item())

    grad_logits = torch.randn(ref.shape, generator=gen)
    (-(ref * grad_logits.double()).sum()).backward()  # input_sign -1 below reverses the row gradients
    grad_q, grad_k, *grad_w = torch.ops.vqa_align_glue.gan_discriminator_backward(
        queries, keys, w, slope, grad_logits, -1.0
    )
    n_q = queries.numel() // d
    assert grad_q.dtype == dtype and grad_q.shape == queries.shape and grad_k.shape == keys.shape
    assert _rel(grad_q.reshape(-1, d), rows.grad[:n_q]) < 0.01
    assert _rel(grad_k.reshape(-1, d), rows.grad[n_q:]) < 0.01
    for got, param in zip(grad_w, w64, strict=True):  # not reversed: the discriminator descends its loss
        assert got.shape == param.shape and got.dtype == torch.float32
        assert _rel(got, -param.grad) < 0.01


def test_gan_aligner_with_the_kernels_matches_the_exact_loss_and_the_layer_path(monkeypatch):
    d, hidden = GAN_WIDTHS
    config = AlignmentConfig(method="gan", helper_hidden=hidden, helper_precision="bf16")
    (got, got_grads), (layers, layer_grads), (ref, ref_grads) = _aligner_against_references(monkeypatch, config, d, 6)
    assert (got.double() - ref).abs().max() <= 0.01 * ref.abs().max()
    assert (got - layers).abs().max() <= 0.01 * layers.abs().max()
    # The kernel keeps the logit gradients and the hidden activations in fp32 where the layer path
    # rounds them to bf16, so it is the closer of the two to the exact gradients (the layer path's
    # bias gradients can fall to a cosine of ~0.92 here): compare with the exact ones only.
    for a, b, c in zip(got_grads, ref_grads, layer_grads, strict=True):
        assert a.shape == b.shape == c.shape and a.dtype == c.dtype
        assert F.cosine_similarity(a.double().flatten(), b.flatten(), dim=0) > 0.999


def test_results_do_not_depend_on_the_thread_count():
    gen = torch.Generator().manual_seed(5)
    d = WIDTHS[0]
    queries, keys = torch.randn(4, 4, 50, d, generator=gen), torch.randn(4, 4, 30, d, generator=gen)
    w, w_gan = _weights(gen), _discriminator_weights(gen)
    q_valid, k_valid = random_masks(4, 50, 30, gen)
    threads = torch.get_num_threads()
    results = []
    for n in (1, 2):
        torch.set_num_threads(n)
        try:
            nav, nav_norm, crit, crit_norm = torch.ops.vqa_align_glue.ct_helpers_forward(queries, keys, w)
            sums = torch.ops.vqa_align_glue.ct_transport_forward(nav, crit, q_valid, k_valid, 4)
            coefficients = [s.contiguous() for s in sums]  # any (B, H, N) fp32 vectors will do
            transport_grads = torch.ops.vqa_align_glue.ct_transport_backward(
                nav, crit, q_valid, k_valid, 4, *coefficients
            )
            grads = torch.ops.vqa_align_glue.ct_helpers_backward(
                queries, keys, w, *transport_grads, -1.0, nav, nav_norm, crit, crit_norm
            )
            logits = torch.ops.vqa_align_glue.gan_discriminator_forward(queries, keys, w_gan, 0.2)
            gan_grads = torch.ops.vqa_align_glue.gan_discriminator_backward(queries, keys, w_gan, 0.2, logits, -1.0)
        finally:
            torch.set_num_threads(threads)
        results.append((nav, crit, *sums, *transport_grads, *grads, logits, *gan_grads))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_unsupported_widths_fall_back_and_bad_arguments_are_named():
    assert not nk.helper_blocks(torch.device("cpu"), torch.bfloat16, (64, 64, 64, 16))  # 16: not a multiple of 32
    assert not nk.helper_blocks(torch.device("cpu"), torch.float32, WIDTHS)  # fp32 helpers: the layer path
    assert not nk.helper_blocks(torch.device("cpu"), torch.bfloat16, (64, 48))
    gen = torch.Generator().manual_seed(0)
    w = _weights(gen)
    queries = torch.randn(2, 2, 5, WIDTHS[0], generator=gen)
    with pytest.raises(RuntimeError, match="keys"):
        torch.ops.vqa_align_glue.ct_helpers_forward(queries, torch.randn(2, 2, 5, 48), w)
    with pytest.raises(RuntimeError, match="inconsistent helper shapes"):
        torch.ops.vqa_align_glue.ct_helpers_forward(queries, queries, [w[2], w[3], *w[2:]])
    nav = _units(gen, 2 * 2 * 10, WIDTHS[3])
    valid = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="crit"):
        torch.ops.vqa_align_glue.ct_transport_forward(nav, nav[:-1], valid, valid, 2)
    with pytest.raises(RuntimeError, match="q_valid"):
        torch.ops.vqa_align_glue.ct_transport_forward(nav, nav, valid.float(), valid, 2)
    with pytest.raises(RuntimeError, match="k_valid"):
        torch.ops.vqa_align_glue.ct_transport_forward(nav, nav, valid, valid[:1], 2)
    w_gan = _discriminator_weights(gen)
    with pytest.raises(RuntimeError, match="inconsistent shapes"):
        torch.ops.vqa_align_glue.gan_discriminator_forward(queries, queries, [*w_gan[:4], w_gan[2], w_gan[5]], 0.2)
    with pytest.raises(RuntimeError, match="grad_logits"):
        torch.ops.vqa_align_glue.gan_discriminator_backward(queries, queries, w_gan, 0.2, torch.zeros(3), -1.0)
