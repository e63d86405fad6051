"""Figure builders: real Figures with the expected artists; PCA fitted on the union of q and k."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from vqa_align.serve.figures import (
    attention_map,
    figure_to_png,
    pca_project,
    plot_alignment_grid,
    plot_alignment_projection,
    plot_attention_matrix,
    plot_region_attention,
    question_attention_spans,
)


def _is_png(data: bytes) -> bool:
    return data[:8] == b"\x89PNG\r\n\x1a\n"


def test_region_attention_shades_and_outlines_top_boxes():
    image = np.full((40, 60, 3), 200, np.uint8)
    boxes = np.array([[0, 0, 60, 40], [10, 5, 30, 25], [35, 10, 55, 35]], np.float32)
    fig = plot_region_attention(image, boxes, np.array([0.1, 0.7, 0.2]), "glimpse", top=2)
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    ax = fig.axes[0]
    shaded = ax.images[0].get_array()
    assert shaded.shape == (40, 60, 3)
    assert shaded[15, 20, 0] > shaded[2, 2, 0]  # inside the most attended box: brighter
    outlines = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert len(outlines) == 2 and outlines[0].get_xy() == (10, 5)  # best box first
    assert "R2 0.70" in [t.get_text() for t in ax.texts]
    assert fig._suptitle.get_text() == "glimpse"
    assert _is_png(figure_to_png(fig))


def test_region_attention_without_picture_and_mismatch():
    boxes, weights = torch.tensor([[0.0, 0.0, 5.0, 5.0]]), torch.tensor([1.0])
    fig = plot_region_attention(None, boxes, weights, "t", image_size=(20, 10))
    assert fig.axes[0].images[0].get_array().shape == (10, 20, 3)
    with pytest.raises(ValueError, match="2 boxes but 1 weights"):
        plot_region_attention(None, np.zeros((2, 4)), np.ones(1), "t")


def test_attention_map_sums_overlapping_boxes():
    heat = attention_map(np.array([[0, 0, 4, 4], [2, 2, 4, 4]]), np.array([1.0, 1.0]), 4, 4)
    assert heat[3, 3] == 1.0 and heat[0, 0] == 0.5


def test_pca_is_fitted_on_the_union():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(7, 16))
    qp, kp = pca_project(points, points.copy())
    assert np.allclose(qp, kp)  # identical sets -> identical (overlapping) projections
    # Separate sets: keys shifted along one axis. A shared fit keeps the gap; separate fits would
    # centre each set on its own and hide it.
    shift = np.zeros(16)
    shift[3] = 50.0
    qp, kp = pca_project(points, points + shift)
    assert abs(qp[:, 0].mean() - kp[:, 0].mean()) > 40
    assert np.allclose(np.concatenate([qp, kp]).mean(0), 0, atol=1e-9)


def test_pca_degenerate_inputs():
    qp, kp = pca_project(np.ones((3, 4)), np.ones((2, 4)))  # zero variance
    assert qp.shape == (3, 2) and kp.shape == (2, 2) and np.allclose(qp, 0) and np.allclose(kp, 0)
    qp, kp = pca_project(np.zeros((1, 1)), np.ones((1, 1)))  # d = 1
    assert qp.shape == (1, 2) and np.allclose(qp[:, 1], 0)


def test_alignment_projection_figure():
    rng = np.random.default_rng(1)
    q, k = torch.from_numpy(rng.normal(size=(5, 8))), rng.normal(size=(9, 8))
    fig = plot_alignment_projection(q, k, "guided · layer 0 · head 1", ct=0.25, mmd2=0.0123,
                                    query_labels=[f"R{i}" for i in range(5)], key_labels=list("abcdefghi"))
    ax = fig.axes[0]
    assert len(ax.collections) == 2  # one scatter per set
    assert [c.get_offsets().shape[0] for c in ax.collections] == [5, 9]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["queries (5)", "keys (9)"]
    title = fig._suptitle.get_text()
    assert "CT=0.250" in title and "MMD²=0.012" in title
    assert len(ax.texts) == 14
    qp, kp = pca_project(q, k)
    assert np.allclose(ax.collections[0].get_offsets(), qp) and np.allclose(ax.collections[1].get_offsets(), kp)
    assert _is_png(figure_to_png(fig))


def test_alignment_grid_figure():
    values = np.arange(8, dtype=float).reshape(2, 4) / 10
    fig = plot_alignment_grid(values, ["L0", "L1"], "MMD²", highlight=(1, 2), colorbar_label="MMD²")
    ax, cbar = fig.axes
    assert np.allclose(ax.images[0].get_array(), values)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["L0", "L1"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["h0", "h1", "h2", "h3"]
    assert len(ax.texts) == 8 and ax.patches[0].get_xy() == (1.5, 0.5)
    with pytest.raises(ValueError, match="row labels"):
        plot_alignment_grid(values, ["L0"], "x")


def test_attention_matrix_figure():
    attn = torch.softmax(torch.randn(3, 5), -1)
    fig = plot_attention_matrix(attn, ["R1", "R2", "R3"], ["what", "is", "the", "red", "shape"], "attn")
    ax = fig.axes[0]
    assert ax.images[0].get_array().shape == (3, 5)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["what", "is", "the", "red", "shape"]
    with pytest.raises(ValueError, match="labels"):
        plot_attention_matrix(attn, ["R1"], ["a"], "x")
    many = plot_attention_matrix(np.full((100, 100), 0.01), [f"R{i}" for i in range(100)],
                                 [f"R{i}" for i in range(100)], "100 regions")
    assert len(many.axes[0].get_xticklabels()) <= 34


def test_question_attention_spans():
    spans = question_attention_spans(["what", "color"], np.array([0.2, 0.8]))
    assert spans == [("what", 0.25), (" ", None), ("color", 1.0)]
    assert question_attention_spans(["a"], [0.0]) == [("a", 0.0)]
    with pytest.raises(ValueError):
        question_attention_spans(["a", "b"], [1.0])
