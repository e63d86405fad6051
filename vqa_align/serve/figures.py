"""Figure builders for the app and reports: pure functions of arrays -> ``matplotlib.figure.Figure``.

Every builder creates its own :class:`~matplotlib.figure.Figure` with the Agg canvas (no pyplot,
no global figure registry, no GUI backend, nothing downloaded), so builders are thread-safe and
the caller owns the figure. Figures are drawn at ``DPI`` = 80 (the app draws five of them per
request within a 300 ms budget on two CPU cores) and sized in inches to the app's cards, so that
one PNG pixel is one screen pixel at the default window size; fonts are set for that scale
(``FONT_*`` in points: 10 pt is 11 px at 80 dpi).

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
FONT_TITLE = 11  # points; 10 pt = 11 px at DPI 80
FONT_LABEL = 10  # axis labels, legend
FONT_TICK = 9  # tick labels
FONT_TEXT = 9  # text drawn in the plot: point labels, box labels, heatmap values
PANEL_SIZE = (4.8, 4.3)  # inches (384 x 344 px): the three alignment figures fill one card size alike
REGION_WIDTH = 4.4  # inches: the "where the model looked" figure
MAX_POINT_LABELS = 16  # a set of more points (e.g. 49 grid cells) is drawn unlabelled; its legend says so
LABEL_OFFSET = 5  # px between a point and its label
TICK_SPACING = 1.3  # tick labels are at least this many font heights apart
CELL_TEXT_CHARS = 5  # "0.806": a heatmap value is written only into cells wide enough for it


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


def _points_px(points: float) -> float:
    return points * DPI / 72.0


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
    title_in = 0.45 * (title.count("\n") + 1)  # inches of title lines
    fig_h = max(2.0, min(REGION_WIDTH * aspect, 5.0)) + title_in
    fig = new_figure(REGION_WIDTH, fig_h)
    ax = fig.add_axes((0.02, 0.02, 0.96, 1 - title_in / fig_h - 0.02))
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
        ax.text(x1 + 1, y1 - 1 if above else y1 + 1, f"{names[i]} {share[i]:.2f}", color="black", fontsize=FONT_TEXT,
                va="bottom" if above else "top", bbox=dict(facecolor=color, alpha=0.8, pad=1, linewidth=0))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_axis_off()
    fig.suptitle(title, fontsize=FONT_TITLE)
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


def label_groups(points_px: np.ndarray, names: Sequence[str], side: int = 1,
                 font_px: float = FONT_TEXT * DPI / 72.0) -> list[tuple[int, str]]:
    """(index of the anchor point, text) of labels that do not overlap: a point whose label box
    would overlap an earlier label's box joins that label ("R2, R3 +4") instead of getting its own.

    ``points_px`` (P, 2) in pixels (y up, as matplotlib's display coordinates); labels are drawn
    ``LABEL_OFFSET`` px to the right (``side`` = 1) or left (-1) of their point.
    """
    pts = _np(points_px).reshape(-1, 2)
    char_w, line_h = 0.6 * font_px, 1.25 * font_px

    def box(i: int, text: str) -> tuple[float, float, float, float]:
        x, y = pts[i]
        width = char_w * len(text)
        left = x + LABEL_OFFSET if side > 0 else x - LABEL_OFFSET - width
        return left, y, left + width, y + line_h

    groups: list[tuple[int, list[str]]] = []
    for i, name in enumerate(names[: len(pts)]):
        mine = box(i, str(name))
        for anchor, members in groups:
            other = box(anchor, _group_text(members))
            if mine[0] < other[2] and other[0] < mine[2] and mine[1] < other[3] and other[1] < mine[3]:
                members.append(str(name))
                break
        else:
            groups.append((i, [str(name)]))
    return [(anchor, _group_text(members)) for anchor, members in groups]


def _group_text(members: list[str]) -> str:
    return ", ".join(members[:2]) + (f" +{len(members) - 2}" if len(members) > 2 else "")


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
    """Queries (n, d) and keys (m, d) of one head in one shared 2-D PCA; CT and MMD² in the title.

    Points are labelled per set while it has at most ``MAX_POINT_LABELS`` points, points whose
    labels would overlap sharing one (:func:`label_groups`); query labels sit left of their point,
    key labels right.
    """
    qp, kp = pca_project(queries, keys)
    fig = new_figure(*PANEL_SIZE)
    ax = fig.add_axes((0.08, 0.1, 0.88, 0.68))
    sets = []
    for points, names, noun in ((qp, query_labels, "queries"), (kp, key_labels, "keys")):
        labelled = bool(names) and len(points) <= MAX_POINT_LABELS
        sets.append((labelled, f"{noun} ({len(points)}{'' if labelled or not names else ', unlabelled'})"))
    ax.scatter(qp[:, 0], qp[:, 1], marker="o", s=44, c=QUERY_COLOR, alpha=0.8, label=sets[0][1])
    ax.scatter(kp[:, 0], kp[:, 1], marker="^", s=54, facecolors="none", edgecolors=KEY_COLOR, linewidths=1.5,
               label=sets[1][1])
    ax.margins(0.18)  # room for the labels of points on the edge
    ax.autoscale_view()  # final limits now, so that data -> pixel positions of the labels are right
    for (labelled, _), points, names, color, side in ((sets[0], qp, query_labels, QUERY_COLOR, -1),
                                                      (sets[1], kp, key_labels, KEY_COLOR, 1)):
        if not labelled:
            continue
        for i, text in label_groups(ax.transData.transform(points), names or [], side):
            ax.annotate(text, tuple(points[i]), fontsize=FONT_TEXT, color=color, va="bottom",
                        xytext=(LABEL_OFFSET * side, 0), textcoords="offset pixels",
                        ha="left" if side > 0 else "right")
    # PCA coordinates have no units worth reading; no tick labels saves a third of the drawing time.
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("PC 1 (one PCA of queries and keys together)", fontsize=FONT_LABEL)
    ax.set_ylabel("PC 2", fontsize=FONT_LABEL)
    ax.legend(fontsize=FONT_LABEL, loc="best", framealpha=0.7)
    metrics = []
    if ct is not None:
        metrics.append(f"CT={_fmt(ct)}")
    if mmd2 is not None:
        metrics.append(f"MMD²={_fmt(mmd2)}")
    fig.suptitle(title + ("\n" + "   ".join(metrics) if metrics else ""), fontsize=FONT_TITLE)
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
    """Heatmap of values (L, H): rows = layers, columns = heads; ``highlight`` outlines one cell.

    The figure has the size of the other alignment panels (the cells stretch to fill it); values
    are written into the cells when they are wide and tall enough for ``FONT_TEXT``.
    """
    grid = _np(values)
    if grid.ndim != 2:
        raise ValueError(f"values must be (layers, heads), got shape {grid.shape}")
    rows, cols = grid.shape
    if len(row_labels) != rows:
        raise ValueError(f"{rows} rows but {len(row_labels)} row labels")
    col_labels = list(col_labels) if col_labels is not None else [f"h{j}" for j in range(cols)]
    width, height = PANEL_SIZE
    box = (0.12, 0.12, 0.68, 0.66)  # axes (left, bottom, width, height) in figure fractions
    fig = new_figure(width, height)
    ax = fig.add_axes(box)
    finite = grid[np.isfinite(grid)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    image = ax.imshow(grid, cmap=CMAP, aspect="auto", vmin=vmin, vmax=vmax if vmax > vmin else vmin + 1e-12)
    ax.set_xticks(range(cols), col_labels, fontsize=FONT_TICK)
    ax.set_yticks(range(rows), list(row_labels), fontsize=FONT_TICK)
    ax.set_xlabel("head", fontsize=FONT_LABEL)
    ax.set_ylabel("layer", fontsize=FONT_LABEL)
    cell_w, cell_h = box[2] * width * DPI / cols, box[3] * height * DPI / rows
    text_px = _points_px(FONT_TEXT)
    if cell_w >= CELL_TEXT_CHARS * 0.62 * text_px and cell_h >= 1.4 * text_px:
        middle = (vmin + vmax) / 2
        for (i, j), v in np.ndenumerate(grid):
            ax.text(j, i, _fmt(v), ha="center", va="center", fontsize=FONT_TEXT,
                    color="black" if v > middle else "white")
    if highlight is not None:
        i, j = highlight
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="#ff3300", linewidth=3))
    cax = fig.add_axes((box[0] + box[2] + 0.03, box[1], 0.035, box[3]))
    bar = fig.colorbar(image, cax=cax, ticks=MaxNLocator(4))
    bar.ax.tick_params(labelsize=FONT_TICK)
    if colorbar_label:
        bar.set_label(colorbar_label, fontsize=FONT_LABEL)
    fig.suptitle(title, fontsize=FONT_TITLE)
    return fig


def _tick_positions(count: int, length_px: float) -> list[int]:
    """Every k-th of ``count`` ticks along ``length_px`` pixels, k the smallest that keeps labels apart."""
    fit = max(1, int(length_px // (TICK_SPACING * _points_px(FONT_TICK))))
    step = max(1, -(-count // fit))
    return list(range(0, count, step))


def plot_attention_matrix(attn: Any, query_labels: Sequence[str], key_labels: Sequence[str], title: str) -> Figure:
    """Attention weights (n queries, m keys) as a heatmap with token / region tick labels."""
    matrix = _np(attn)
    if matrix.ndim != 2:
        raise ValueError(f"attention must be (queries, keys), got shape {matrix.shape}")
    n, m = matrix.shape
    if len(query_labels) != n or len(key_labels) != m:
        raise ValueError(f"attention is {n} x {m} but got {len(query_labels)} x {len(key_labels)} labels")
    width, height = PANEL_SIZE
    box = (0.2, 0.06, 0.6, 0.58)  # room above the axes for the title and the rotated key labels
    fig = new_figure(width, height)
    ax = fig.add_axes(box)
    image = ax.imshow(matrix, cmap=CMAP, aspect="auto", vmin=0.0, vmax=max(float(matrix.max(initial=0.0)), 1e-12))
    # Every label while they fit; beyond that every k-th (49 grid cells, 100 detector regions).
    xs, ys = _tick_positions(m, box[2] * width * DPI), _tick_positions(n, box[3] * height * DPI)
    ax.set_xticks(xs, [key_labels[i] for i in xs], fontsize=FONT_TICK, rotation=60, ha="left")
    ax.set_yticks(ys, [query_labels[i] for i in ys], fontsize=FONT_TICK)
    ax.xaxis.tick_top()
    ax.set_xlabel("keys", fontsize=FONT_LABEL)
    ax.set_ylabel("queries", fontsize=FONT_LABEL)
    cax = fig.add_axes((box[0] + box[2] + 0.04, box[1], 0.035, box[3]))
    bar = fig.colorbar(image, cax=cax, ticks=MaxNLocator(4))
    bar.ax.tick_params(labelsize=FONT_TICK)
    fig.suptitle(title, fontsize=FONT_TITLE)
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
