"""Figure builders for the app and reports: pure functions of arrays -> ``matplotlib.figure.Figure``.

Every builder creates its own :class:`~matplotlib.figure.Figure` with the Agg canvas (no pyplot,
no global figure registry, no GUI backend, nothing downloaded), so builders are thread-safe and
the caller owns the figure. Figures are small (``DPI`` = 80) because the app draws five of them
per request within a 300 ms budget on two CPU cores.

Shapes (numpy arrays or tensors are both accepted):

    image        (H, W, 3) uint8, or None (no picture: a grey canvas of ``image_size``)
    boxes_px     (N, 4)    x1, y1, x2, y2 in pixels of ``image``
    weights      (N,)      non-negative attention weights of the N regions
    queries      (n, d)    keys (m, d): one head's projected queries and keys
    values       (L, H)    a per-layer, per-head scalar (MMD², CT)
    attn         (n, m)    attention of n queries over m keys (rows sum to 1)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

DPI = 80
QUERY_COLOR = "#1f77b4"
KEY_COLOR = "#d62728"
CMAP = "viridis"
MAX_POINT_LABELS = 40  # label every point of the projection only when there are few of them
MAX_CELL_TEXT = 96  # write the value into every heatmap cell only for small grids
MAX_TICKS = 32  # tick labels per axis of the attention matrix


def _np(x: Any) -> np.ndarray:
    """Tensor or array-like -> float64 numpy array (detached, on CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def new_figure(width: float, height: float) -> Figure:
    """A Figure with its own Agg canvas (inches at ``DPI``); not registered with pyplot."""
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _fmt(value: float | None) -> str:
    if value is None or not np.isfinite(value):
        return "n/a"
    return f"{value:.3g}" if abs(value) < 1e-2 else f"{value:.3f}"


# ----------------------------------------------------------------------------------------------
# Region attention
# ----------------------------------------------------------------------------------------------


def attention_map(boxes_px: np.ndarray, weights: np.ndarray, width: int, height: int) -> np.ndarray:
    """Sum of box indicators weighted by attention -> (height, width) map scaled to [0, 1].

    Why a summed map rather than one translucent patch per box: region proposals overlap (the
    whole-image box, a grid, objects), and stacked patches hide which pixels got the most weight.
    """
    heat = np.zeros((height, width), np.float64)
    for (x1, y1, x2, y2), w in zip(boxes_px, weights):
        c1, r1 = int(np.floor(max(x1, 0))), int(np.floor(max(y1, 0)))
        c2, r2 = int(np.ceil(min(x2, width))), int(np.ceil(min(y2, height)))
        if c2 > c1 and r2 > r1:
            heat[r1:r2, c1:c2] += w
    peak = heat.max()
    return heat / peak if peak > 0 else heat


def plot_region_attention(
    image: np.ndarray | None,
    boxes_px: np.ndarray,
    weights: np.ndarray,
    title: str,
    *,
    image_size: tuple[int, int] | None = None,
    labels: Sequence[str] | None = None,
    top: int = 3,
) -> Figure:
    """The image dimmed where attention is low, plus outlines of the ``top`` most attended boxes.

    Args:
        image: (H, W, 3) uint8, or None to draw on a grey canvas of ``image_size`` (w, h)
            (models trained on detector features whose pictures are not at hand).
        boxes_px: (N, 4) pixel boxes in ``image`` coordinates; weights: (N,) >= 0.
        labels: N region names for the outlined boxes (default "R1".."RN").
    """
    boxes = _np(boxes_px).reshape(-1, 4)
    w = np.clip(_np(weights).reshape(-1), 0.0, None)
    if len(w) != len(boxes):
        raise ValueError(f"{len(boxes)} boxes but {len(w)} weights")
    if image is None:
        width, height = image_size or (100, 100)
        rgb = np.full((int(height), int(width), 3), 200, np.uint8)
    else:
        rgb = np.asarray(image)
        if rgb.ndim == 2:
            rgb = np.repeat(rgb[..., None], 3, axis=-1)
        height, width = rgb.shape[:2]
    heat = attention_map(boxes, w, width, height)
    # Keep a quarter of the brightness where nothing attends, so the picture stays readable.
    shaded = (rgb.astype(np.float32) * (0.25 + 0.75 * heat[..., None])).astype(np.uint8)

    aspect = height / max(width, 1)
    fig = new_figure(3.6, max(2.0, min(3.6 * aspect, 5.0)) + 0.4)
    ax = fig.add_axes((0.02, 0.02, 0.96, 0.82))
    ax.imshow(shaded, interpolation="nearest")
    total = w.sum()
    share = w / total if total > 0 else w
    names = list(labels) if labels is not None else [f"R{i + 1}" for i in range(len(boxes))]
    for rank, i in enumerate(np.argsort(-w, kind="stable")[: max(top, 0)]):
        x1, y1, x2, y2 = boxes[i]
        color = ("#ffdd00", "#ff8800", "#ff3300")[min(rank, 2)]
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=2.0 - 0.4 * rank))
        # Label above the box when there is room (small object boxes stay visible), else inside.
        above = y1 >= 0.1 * height
        ax.text(x1 + 1, y1 - 1 if above else y1 + 1, f"{names[i]} {share[i]:.2f}", color="black", fontsize=7,
                va="bottom" if above else "top", bbox=dict(facecolor=color, alpha=0.8, pad=1, linewidth=0))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_axis_off()
    fig.suptitle(title, fontsize=9)
    return fig


# ----------------------------------------------------------------------------------------------
# Query / key alignment
# ----------------------------------------------------------------------------------------------


def pca_project(queries: Any, keys: Any, dims: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Project queries (n, d) and keys (m, d) with ONE PCA fitted on their union -> (n, dims), (m, dims).

    Why one shared PCA: two separate fits would each centre their own set, and the plot would
    show every head as perfectly "aligned". Directions are made deterministic (largest loading
    positive); a degenerate union (rank < dims) is padded with zero coordinates.
    """
    q = _np(queries).reshape(len(queries), -1)
    k = _np(keys).reshape(len(keys), -1)
    union = np.concatenate([q, k], axis=0)  # (n + m, d)
    centred = union - union.mean(axis=0, keepdims=True)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)  # vt: (r, d)
    comps = vt[:dims]
    comps = comps * np.sign(comps[np.arange(len(comps)), np.abs(comps).argmax(axis=1)])[:, None]
    proj = centred @ comps.T  # (n + m, <= dims)
    # Components with (numerically) zero variance carry rounding noise only.
    tiny = s[: len(comps)] <= 1e-9 * max(float(s[0]) if len(s) else 0.0, 1e-30)
    proj[:, tiny] = 0.0
    if proj.shape[1] < dims:
        proj = np.pad(proj, ((0, 0), (0, dims - proj.shape[1])))
    return proj[: len(q)], proj[len(q):]


def plot_alignment_projection(
    queries: Any,
    keys: Any,
    title: str,
    *,
    ct: float | None = None,
    mmd2: float | None = None,
    query_labels: Sequence[str] | None = None,
    key_labels: Sequence[str] | None = None,
) -> Figure:
    """Queries (n, d) and keys (m, d) of one head in one shared 2-D PCA; CT and MMD² in the title."""
    qp, kp = pca_project(queries, keys)
    fig = new_figure(3.8, 3.6)
    ax = fig.add_axes((0.12, 0.12, 0.84, 0.68))
    ax.scatter(qp[:, 0], qp[:, 1], marker="o", s=36, c=QUERY_COLOR, alpha=0.8, label=f"queries ({len(qp)})")
    ax.scatter(kp[:, 0], kp[:, 1], marker="^", s=44, facecolors="none", edgecolors=KEY_COLOR, linewidths=1.4,
               label=f"keys ({len(kp)})")
    if len(qp) + len(kp) <= MAX_POINT_LABELS:
        for points, names, color in ((qp, query_labels, QUERY_COLOR), (kp, key_labels, KEY_COLOR)):
            for (x, y), name in zip(points, names or []):
                ax.annotate(name, (x, y), fontsize=6, color=color, xytext=(2, 2), textcoords="offset points")
    # PCA coordinates have no units worth reading; no tick labels saves a third of the drawing time.
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("PC 1 (shared by queries and keys)", fontsize=7)
    ax.set_ylabel("PC 2", fontsize=7)
    ax.legend(fontsize=7, loc="best", framealpha=0.7)
    metrics = []
    if ct is not None:
        metrics.append(f"CT={_fmt(ct)}")
    if mmd2 is not None:
        metrics.append(f"MMD²={_fmt(mmd2)}")
    fig.suptitle(title + ("\n" + "   ".join(metrics) if metrics else ""), fontsize=9)
    return fig


def plot_alignment_grid(
    values: Any,
    row_labels: Sequence[str],
    title: str,
    *,
    col_labels: Sequence[str] | None = None,
    highlight: tuple[int, int] | None = None,
    colorbar_label: str = "",
) -> Figure:
    """Heatmap of values (L, H): rows = layers, columns = heads; ``highlight`` outlines one cell."""
    grid = _np(values)
    if grid.ndim != 2:
        raise ValueError(f"values must be (layers, heads), got shape {grid.shape}")
    rows, cols = grid.shape
    if len(row_labels) != rows:
        raise ValueError(f"{rows} rows but {len(row_labels)} row labels")
    col_labels = list(col_labels) if col_labels is not None else [f"h{j}" for j in range(cols)]
    # Margins in inches (title above, tick labels + axis label below) so small grids stay legible.
    top, bottom, cell = 0.55, 0.45, 0.38
    height = min(top + bottom + cell * rows, 5.0)
    fig = new_figure(min(1.6 + 0.42 * cols, 6.0), height)
    ax = fig.add_axes((0.18, bottom / height, 0.62, 1 - (top + bottom) / height))
    finite = grid[np.isfinite(grid)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    image = ax.imshow(grid, cmap=CMAP, aspect="auto", vmin=vmin, vmax=vmax if vmax > vmin else vmin + 1e-12)
    ax.set_xticks(range(cols), col_labels, fontsize=6)
    ax.set_yticks(range(rows), list(row_labels), fontsize=6)
    ax.set_xlabel("head", fontsize=7)
    if rows * cols <= MAX_CELL_TEXT:
        middle = (vmin + vmax) / 2
        for (i, j), v in np.ndenumerate(grid):
            ax.text(j, i, _fmt(v), ha="center", va="center", fontsize=5.5,
                    color="black" if v > middle else "white")
    if highlight is not None:
        i, j = highlight
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="#ff3300", linewidth=2))
    cax = fig.add_axes((0.83, bottom / height, 0.03, 1 - (top + bottom) / height))
    bar = fig.colorbar(image, cax=cax, ticks=MaxNLocator(4))
    bar.ax.tick_params(labelsize=6)
    if colorbar_label:
        bar.set_label(colorbar_label, fontsize=7)
    fig.suptitle(title, fontsize=9)
    return fig


def _tick_positions(count: int) -> list[int]:
    step = max(1, -(-count // MAX_TICKS))
    return list(range(0, count, step))


def plot_attention_matrix(attn: Any, query_labels: Sequence[str], key_labels: Sequence[str], title: str) -> Figure:
    """Attention weights (n queries, m keys) as a heatmap with token / region tick labels."""
    matrix = _np(attn)
    if matrix.ndim != 2:
        raise ValueError(f"attention must be (queries, keys), got shape {matrix.shape}")
    n, m = matrix.shape
    if len(query_labels) != n or len(key_labels) != m:
        raise ValueError(f"attention is {n} x {m} but got {len(query_labels)} x {len(key_labels)} labels")
    fig = new_figure(min(1.8 + 0.26 * m, 6.0), min(1.5 + 0.22 * n, 6.0))
    ax = fig.add_axes((0.2, 0.08, 0.62, 0.66))
    image = ax.imshow(matrix, cmap=CMAP, aspect="auto", vmin=0.0, vmax=max(float(matrix.max(initial=0.0)), 1e-12))
    # Every label up to MAX_TICKS per axis; beyond that every k-th (100 detector regions).
    xs, ys = _tick_positions(m), _tick_positions(n)
    ax.set_xticks(xs, [key_labels[i] for i in xs], fontsize=6, rotation=60, ha="left")
    ax.set_yticks(ys, [query_labels[i] for i in ys], fontsize=6)
    ax.xaxis.tick_top()
    ax.set_xlabel("keys", fontsize=7)
    ax.set_ylabel("queries", fontsize=7)
    cax = fig.add_axes((0.85, 0.08, 0.03, 0.66))
    bar = fig.colorbar(image, cax=cax, ticks=MaxNLocator(4))
    bar.ax.tick_params(labelsize=6)
    fig.suptitle(title, fontsize=9)
    return fig


# ----------------------------------------------------------------------------------------------
# Question words
# ----------------------------------------------------------------------------------------------


def question_attention_spans(tokens: Sequence[str], weights: Any) -> list[tuple[str, float | None]]:
    """(token, weight / max weight in [0, 1]) per token, joined by (" ", None) separators.

    The format of ``gr.HighlightedText``: numeric labels are drawn as a colour scale, None as
    plain text (the separators keep words apart without highlighting the spaces).
    """
    w = np.clip(_np(weights).reshape(-1), 0.0, None)
    if len(w) != len(tokens):
        raise ValueError(f"{len(tokens)} tokens but {len(w)} weights")
    peak = float(w.max(initial=0.0))
    scaled = w / peak if peak > 0 else w
    spans: list[tuple[str, float | None]] = []
    for i, (token, value) in enumerate(zip(tokens, scaled)):
        if i:
            spans.append((" ", None))
        spans.append((str(token), round(float(value), 4)))
    return spans


def figure_to_png(fig: Figure) -> bytes:
    """Render a figure to PNG bytes (what the app sends; used by the latency benchmark)."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
