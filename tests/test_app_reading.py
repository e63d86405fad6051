"""Reading aids of the app: near-uniform attention, the re-split scale of CT / MMD², the novelty
warning of uploads, and plots that stay readable (labels that do not overlap, cell values that fit)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from test_inference import _shape_image, build_tiny_checkpoint  # noqa: F401
from vqa_align.serve import figures
from vqa_align.serve.novelty import NOVELTY_QUANTILE, fit_stats, novelty
from vqa_align.serve.predictor import Predictor
from vqa_align.serve.reading import NEAR_UNIFORM_ENTROPY, near_uniform, normalised_entropy, resplit_baseline
from vqa_align.serve.views import render_views


def test_near_uniform_threshold():
    rng = np.random.default_rng(0)
    flat = 1 / 49 + rng.uniform(-0.004, 0.004, 49)  # "0.02 on each of 49 grid cells"
    assert near_uniform(flat)[0] and near_uniform(flat)[1] > NEAR_UNIFORM_ENTROPY
    peaked = np.array([0.5, 0.1, 0.1, 0.1, 0.1, 0.1])  # half the weight on one of 6 regions
    assert not near_uniform(peaked)[0] and near_uniform(peaked)[1] < NEAR_UNIFORM_ENTROPY
    assert normalised_entropy(np.ones(7)) == pytest.approx(1.0)
    assert normalised_entropy(np.eye(3)).tolist() == [0.0, 0.0, 0.0]  # rows: one key each
    assert normalised_entropy([1.0]) == 0.0 and normalised_entropy([0.0, 0.0]) == 0.0
    # Rows: the mean over rows decides.
    assert near_uniform(np.full((5, 8), 1 / 8))[0] and not near_uniform(np.eye(8)[:5])[0]


def test_resplit_baseline_is_the_scale_of_no_gap():
    """Keys from the queries' distribution: CT / MMD² near the baseline; shifted keys: far above it."""
    from vqa_align.align.aligner import gaussian_mmd2
    from vqa_align.align.distances.ct import identity_conditional_transport

    torch.manual_seed(0)
    q = torch.randn(2, 20, 8)  # (H, n, d)
    same, shifted = torch.randn(2, 15, 8), torch.randn(2, 15, 8) + 3.0
    ones = lambda k: torch.ones(1, k, dtype=torch.bool)  # noqa: E731

    def values(keys):
        return (gaussian_mmd2(q[None], keys[None], ones(20), ones(15))[0],
                identity_conditional_transport(q[None], keys[None], ones(20), ones(15))[0])

    base = resplit_baseline(q, same)
    mmd2, ct = values(same)
    # one draw of the same distribution lies within the re-splits' spread, well below twice their mean
    assert (mmd2.numpy() < 2 * base.mmd2).all() and (np.abs(ct.numpy() / base.ct - 1) < 0.3).all()
    base_far = resplit_baseline(q, shifted)
    mmd2_far, ct_far = values(shifted)
    assert (mmd2_far.numpy() > 3 * base_far.mmd2).all() and (ct_far.numpy() > 1.2 * base_far.ct).all()
    again = resplit_baseline(q, shifted)
    assert np.array_equal(again.mmd2, base_far.mmd2)  # seeded: the same request shows the same scale


def test_novelty_flags_out_of_distribution_features():
    rng = np.random.default_rng(0)
    centre, spread = rng.uniform(0.6, 0.9, 32), rng.uniform(0.02, 0.1, 32)

    def picture(n_regions=6, shift=0.0):  # (N, D) region features of one picture
        return centre + shift + spread * rng.normal(size=(n_regions, 32)) * np.sqrt(n_regions)

    stats = fit_stats(np.stack([picture().mean(0) for _ in range(500)]))
    held_out = [novelty(stats, picture()) for _ in range(400)]
    assert np.mean(np.array(held_out) <= stats.threshold) >= 0.95  # in distribution: rarely flagged
    assert novelty(stats, picture(shift=-0.4)) > 3 * stats.threshold  # a dark photo: flagged
    far = np.full(32, 0.2)
    assert novelty(stats, far[None]) > stats.threshold
    with pytest.raises(ValueError, match="pooled features"):
        fit_stats(np.zeros((1, 4)))


def test_upload_unlike_the_training_pictures_is_warned(tmp_path):
    predictor = Predictor(build_tiny_checkpoint(tmp_path / "m"))
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)  # nothing like a flat shape on white
    pred = predictor.answer("what shape is in the image?", image=noise)
    stats = predictor.novelty_stats()
    assert stats is not None and stats.images == 4
    assert pred.novelty > stats.threshold
    assert any("unlike the pictures the model was trained on" in n for n in pred.notes)
    assert f"{NOVELTY_QUANTILE:.0%}" in pred.notes[-1]
    own = predictor.answer("what shape is in the image?", image=_shape_image(2))  # a training picture
    assert own.novelty < pred.novelty / 3
    assert predictor.answer("what shape?", image_id=1).novelty is None  # store images are not scored


def test_views_caption_reads_the_values_and_marks_uniform_attention(tmp_path):
    predictor = Predictor(build_tiny_checkpoint(tmp_path / "m"))
    pred = predictor.answer("what shape is in the image?", image_id=1)
    module = pred.module("sga_guided", 1)
    assert module.ct_resplit.shape == module.ct.shape == (pred.num_heads,)
    views = render_views(pred, "sga_guided", 1, 0)
    assert "Lower = queries and keys closer" in views.caption and "re-split at random" in views.caption
    assert f"{module.mmd2_resplit[0]:.3f}" in views.caption
    module.attention[0] = 1.0 / module.attention.shape[-1]  # exactly uniform rows
    pred.image_glimpse[:] = 1.0 / len(pred.image_glimpse)
    flat = render_views(pred, "sga_guided", 1, 0)
    assert "near-uniform" in flat.caption and "does not single out" in flat.caption
    assert "near-uniform" in flat.matrix._suptitle.get_text()
    assert not flat.region.axes[0].patches  # no "top" boxes outlined when nothing stands out


def test_point_labels_of_a_cluster_do_not_overlap():
    cluster = np.array([[100.0, 100.0], [101.0, 103.0], [99.0, 106.0], [102.0, 98.0], [300.0, 100.0]])
    groups = figures.label_groups(cluster, ["R1", "R2", "R3", "R4", "R5"])
    assert groups == [(0, "R1, R2 +2"), (4, "R5")]
    apart = np.array([[0.0, 0.0], [0.0, 200.0]])
    assert figures.label_groups(apart, ["a", "b"]) == [(0, "a"), (1, "b")]


def test_projection_labels_only_small_sets():
    rng = np.random.default_rng(0)
    few = figures.plot_alignment_projection(rng.normal(size=(6, 4)), rng.normal(size=(5, 4)), "t",
                                            query_labels=[f"R{i}" for i in range(6)], key_labels=list("abcde"))
    assert few.axes[0].texts
    many = figures.plot_alignment_projection(rng.normal(size=(49, 4)), rng.normal(size=(49, 4)), "t",
                                             query_labels=[f"R{i}" for i in range(49)],
                                             key_labels=[f"R{i}" for i in range(49)])
    assert not many.axes[0].texts  # 49 grid cells: no labels, and the legend says so
    assert "unlabelled" in " ".join(t.get_text() for t in many.axes[0].get_legend().get_texts())


def test_heatmap_values_only_where_they_fit():
    small = figures.plot_alignment_grid(np.random.rand(2, 4), ["L0", "L1"], "t")
    assert len(small.axes[0].texts) == 8
    assert all(t.get_fontsize() >= figures.FONT_TEXT for t in small.axes[0].texts)
    big = figures.plot_alignment_grid(np.random.rand(12, 16), [f"L{i}" for i in range(12)], "t")
    assert not big.axes[0].texts
    assert tuple(small.get_size_inches()) == tuple(big.get_size_inches()) == figures.PANEL_SIZE
