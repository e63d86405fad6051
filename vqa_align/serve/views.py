"""A :class:`Prediction` and a (module kind, layer, head) selection -> what the app draws.

Pure: reads the prediction only (no model), so the app re-draws a new selection without asking
the model again; the figures themselves are built by :mod:`vqa_align.serve.figures`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vqa_align.serve import figures as vis
from vqa_align.serve.prediction import KIND_LABELS, METRICS, ModuleResult, Prediction
from vqa_align.serve.reading import near_uniform


@dataclass
class Views:
    """Everything the app draws for one prediction and one (kind, layer, head) selection."""

    region: Any  # Figure: the image shaded by region attention
    words: list[tuple[str, float | None]]  # question words shaded (gr.HighlightedText)
    projection: Any  # Figure: queries and keys of the head in one shared PCA
    grid: Any  # Figure: layers x heads of the metric
    matrix: Any  # Figure: the head's attention matrix
    caption: str = ""  # the selection, its CT and MMD² with a scale to read them, near-uniform warnings
    selection: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)  # the selected head's "ct" and "mmd2"


SHADINGS = ("glimpse", "guided")


def region_and_word_weights(
    pred: Prediction, shading: str = "glimpse", layer: int = -1, head: int = 0, focus: str | int | None = None
) -> tuple[np.ndarray, np.ndarray, str]:
    """Region weights (N,), word weights (T,) and a title for the shading of the picture and the words.

    ``glimpse``: the AttFlat pooling weights (what the classifier finally read).
    ``guided``:  the guided attention A (N regions x T words) of one layer and head. Words are
    shaded by the attention they receive (mean over regions, A.mean(0)); regions by how much they
    attend to the ``focus`` word (a column of A), or, without a focus, to the words the model
    pooled (A @ question glimpse).
    """
    if shading == "glimpse":
        return pred.image_glimpse, pred.question_glimpse, "AttFlat glimpse"
    if shading != "guided":
        raise ValueError(f"shading must be one of {SHADINGS}, got {shading!r}")
    layer = _clamp(layer, pred.num_layers)
    head = _clamp(head, pred.num_heads)
    attn = pred.module("sga_guided", layer).attention[head]  # (N, T)
    words = attn.mean(axis=0)
    index = _focus_index(pred.tokens, focus)
    if index is None:
        regions = attn @ pred.question_glimpse
        title = f"guided attn · layer {layer} · head {head} · all words"
    else:
        regions = attn[:, index]
        title = f"guided attn · layer {layer} · head {head} · on “{pred.tokens[index]}”"
    return regions, words, title


def _focus_index(tokens: list[str], focus: str | int | None) -> int | None:
    if focus is None or focus == "" or isinstance(focus, bool):
        return None
    if isinstance(focus, int):
        return focus if 0 <= focus < len(tokens) else None
    if ":" in focus:  # "2: shape" as the app lists the words
        head, _, _ = focus.partition(":")
        if head.strip().isdigit() and int(head) < len(tokens):
            return int(head)
    return tokens.index(focus) if focus in tokens else None


def _clamp(index: int, size: int) -> int:
    index = int(index)
    if index < 0:
        index += size
    return min(max(index, 0), size - 1)


def render_views(
    pred: Prediction,
    kind: str = "sga_guided",
    layer: int = -1,
    head: int = 0,
    *,
    metric: str = "mmd2",
    shading: str = "glimpse",
    focus: str | int | None = None,
) -> Views:
    """All figures of one prediction for one selection (negative layer counts from the last)."""
    if kind not in KIND_LABELS:
        raise ValueError(f"kind must be one of {list(KIND_LABELS)}, got {kind!r}")
    if not any(m.kind == kind for m in pred.modules):
        kind = pred.modules[0].kind  # e.g. a checkpoint without some module kind
    layer = _clamp(layer, pred.num_layers)
    head = _clamp(head, pred.num_heads)
    module = pred.module(kind, layer)
    label = KIND_LABELS[kind]

    regions, words, shade_title = region_and_word_weights(pred, shading, layer, head, focus)
    display = pred.image
    if display is not None:
        h, w = display.shape[:2]
        boxes = pred.boxes * np.array([w, h, w, h], np.float32)
    else:
        boxes = pred.boxes_px
    # Near-uniform weights carry no "where": no top boxes outlined, and the title says so.
    flat_regions, region_entropy = near_uniform(regions)
    if flat_regions:
        shade_title += f"\nnear-uniform ({region_entropy:.2f} of max entropy): no region singled out"
    region = vis.plot_region_attention(
        display, boxes, regions, f"answer “{pred.answer}”\n{shade_title}", image_size=pred.image_size,
        labels=pred.region_labels, top=0 if flat_regions else 3,
    )
    tokens = [t + ("?" if o else "") for t, o in zip(pred.tokens, pred.oov)]
    spans = vis.question_attention_spans(tokens, words)
    where = f"layer {layer} · head {head}"
    projection = vis.plot_alignment_projection(
        module.queries[head], module.keys[head], f"{label}\n{where}",
        ct=float(module.ct[head]), mmd2=float(module.mmd2[head]),
        query_labels=module.query_labels, key_labels=module.key_labels,
    )
    grid_values = pred.metric_grid(kind, metric)
    grid = vis.plot_alignment_grid(
        grid_values, [f"L{i}" for i in range(len(grid_values))], f"{METRICS[metric]} per layer × head\n{label}",
        highlight=(layer, head), colorbar_label=METRICS[metric],
    )
    flat_attention, attention_entropy = near_uniform(module.attention[head])
    matrix = vis.plot_attention_matrix(
        module.attention[head], module.query_labels, module.key_labels,
        f"attention · {where}\n{label}" + ("\nnear-uniform: no key singled out" if flat_attention else ""),
    )
    caption = head_caption(module, head, f"{label}, {where}")
    if flat_attention:
        caption += (f"\n\n⚠️ This head's attention is near-uniform (mean row entropy {attention_entropy:.2f} of "
                    "the maximum): the head does not single out a key; the matrix's colours show small differences.")
    if flat_regions:
        caption += (f"\n\n⚠️ The shading of the picture ({shade_title.splitlines()[0]}) is near-uniform "
                    f"({region_entropy:.2f} of the maximum entropy): no region is singled out.")
    return Views(region, spans, projection, grid, matrix, caption,
                 dict(kind=kind, layer=layer, head=head, metric=metric, shading=shading),
                 dict(ct=float(module.ct[head]), mmd2=float(module.mmd2[head])))


def head_caption(module: ModuleResult, head: int, where: str) -> str:
    """One line: the head's MMD² and CT, what lower means, and the scale to read them against."""
    text = (f"**{where}**: MMD² = {module.mmd2[head]:.3f}, CT = {module.ct[head]:.3f} "
            f"(mean over heads: MMD² {module.mmd2.mean():.3f}). Lower = queries and keys closer.")
    if module.mmd2_resplit is not None and module.ct_resplit is not None:
        text += (f" No gap at all — this head's queries and keys pooled and re-split at random — gives "
                 f"MMD² ≈ {module.mmd2_resplit[head]:.3f}, CT ≈ {module.ct_resplit[head]:.3f}.")
    return text
