"""The app's page, one builder per panel; each creates its components in the enclosing Blocks.

The builders only lay out components (no events); :func:`vqa_align_app.main.wire_events` connects
them to the handlers.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from vqa_align.serve.gallery import Example
from vqa_align.serve.prediction import KIND_LABELS, METRICS
from vqa_align.serve.predictor import Predictor

from vqa_align_app.handlers import ALL_WORDS

GALLERY_COLUMNS = 3  # wide enough thumbnails for a question of ~30 characters on two lines
GALLERY_HEIGHT = 330  # px: two rows of examples visible, the rest by scrolling
SHADING_CHOICES = [("AttFlat glimpse", "glimpse"), ("guided attention of the selected layer & head", "guided")]


def plot(label: str, elem_id: str) -> gr.Plot:
    """A matplotlib plot sent as PNG (lossless, faster to encode than the default WebP); the
    figure carries its own title, so the component's label is hidden."""
    return gr.Plot(label=label, format="png", show_label=False, elem_id=elem_id)


@dataclass
class InputPanel:
    """Left column: which image, which question, and the comparison checkpoint."""

    gallery: gr.Gallery
    image_id: gr.Number
    preview: gr.Image
    upload: gr.File
    question: gr.Textbox
    ask: gr.Button
    compare: gr.Textbox
    load_compare: gr.Button


@dataclass
class AnswerPanel:
    """Right column: the answer, where the model looked, the question words and their shading."""

    answer: gr.Label
    region: gr.Plot
    words: gr.HighlightedText
    shading: gr.Radio
    focus: gr.Dropdown


@dataclass
class AlignmentPanel:
    """The (module, layer, head, metric) selection and the figures of the selected head."""

    kind: gr.Dropdown
    layer: gr.Radio
    head: gr.Radio
    metric: gr.Radio
    caption: gr.Markdown
    projection: gr.Plot
    grid: gr.Plot
    matrix: gr.Plot


@dataclass
class ComparePanel:
    """The comparison model's answer and figures (hidden while there is none)."""

    column: gr.Column
    answer: gr.Label
    region: gr.Plot
    projection: gr.Plot
    grid: gr.Plot


def header(predictor: Predictor) -> gr.Markdown:
    cfg = predictor.config.model
    return gr.Markdown(
        f"## VQA-Align — where every head looked, and how well its keys and queries align\n"
        f"Model **{predictor.name}** · MCAN {cfg.num_layers} layers × {cfg.num_heads} heads · alignment "
        f"**{cfg.alignment.method}** · {len(predictor.answers)} answers"
    )


def input_column(predictor: Predictor, examples: list[Example], compare_default: str,
                 compare_open: bool) -> InputPanel:
    # Captions are the example's question alone (the id shows in the box below once clicked); CSS wraps them.
    gallery_items = [(predictor.thumbnail(ex.image_id), ex.question or f"#{ex.image_id}") for ex in examples]
    first = examples[0] if examples else None
    with gr.Column(scale=2, min_width=320):
        gallery = gr.Gallery(value=gallery_items, label="Examples from the data set (click one)", columns=GALLERY_COLUMNS,
                             allow_preview=False, object_fit="contain", buttons=[], height=GALLERY_HEIGHT,
                             elem_id="gallery")
        with gr.Row():
            image_id = gr.Number(label="Image id (from the gallery)", precision=0,
                                 value=first.image_id if first else None, elem_id="image-id", min_width=100)
            preview = gr.Image(value=predictor.thumbnail(first.image_id) if first else None,
                               label="Selected image", interactive=False, height=140, type="numpy",
                               buttons=[], elem_id="preview", min_width=140)
        upload = gr.File(label="…or upload an image", type="filepath", interactive=predictor.uploads_enabled,
                         height=120, elem_id="upload")
        if not predictor.uploads_enabled:
            gr.Markdown(f"{predictor.upload_error}", elem_classes="vqa-small-note")
        question = gr.Textbox(label="Question", value=first.question if first else "", lines=1, max_lines=3,
                              placeholder="e.g. what shape is in the image?", elem_id="question")
        ask = gr.Button("Answer", variant="primary", elem_id="ask")
        with gr.Accordion("Compare with a second checkpoint", open=compare_open):
            compare = gr.Textbox(label="Checkpoint or run folder", value=compare_default,
                                 placeholder="runs/easy_vqa_none", elem_id="compare")
            load_compare = gr.Button("Load", size="sm")
    return InputPanel(gallery, image_id, preview, upload, question, ask, compare, load_compare)


def answer_column() -> AnswerPanel:
    with gr.Column(scale=3, min_width=420):
        answer = gr.Label(label="Answer (top 5)", num_top_classes=5, elem_id="answer")
        with gr.Row():
            region = plot("Where the model looked", "region")
            with gr.Column():
                words = gr.HighlightedText(label="Question words, shaded by attention", show_legend=False,
                                           show_inline_category=False, elem_id="words")
                shading = gr.Radio(SHADING_CHOICES, value="glimpse", label="Shade regions and words by")
                focus = gr.Dropdown([ALL_WORDS], value=ALL_WORDS, label="Guided attention on word")
    return AnswerPanel(answer, region, words, shading, focus)


def alignment_section(num_layers: int, num_heads: int) -> AlignmentPanel:
    with gr.Column(elem_id="alignment"):
        gr.Markdown("### Alignment of keys and queries, per layer and head")
        with gr.Row():
            kind = gr.Dropdown([(v, k) for k, v in KIND_LABELS.items()], value="sga_guided",
                               label="Attention module", elem_id="kind")
            layer = gr.Radio([(f"layer {i}", i) for i in range(num_layers)], value=num_layers - 1,
                             label="Layer", elem_id="layer")
            head = gr.Radio([(f"head {j}", j) for j in range(num_heads)], value=0, label="Head", elem_id="head")
            metric = gr.Radio([(v, k) for k, v in METRICS.items()], value="mmd2", label="Heatmap metric")
        caption = gr.Markdown("", elem_id="caption")
        with gr.Row():
            projection = plot("Queries and keys (one shared PCA)", "projection")
            grid = plot("Layers × heads", "grid")
            matrix = plot("Attention matrix", "matrix")
    return AlignmentPanel(kind, layer, head, metric, caption, projection, grid, matrix)


def compare_section(visible: bool) -> ComparePanel:
    with gr.Column(visible=visible) as column:
        gr.Markdown("### Comparison model (same question, image and selection)")
        with gr.Row():
            answer = gr.Label(label="Comparison: answer (top 5)", num_top_classes=5, elem_id="cmp-answer")
            region = plot("Comparison: where it looked", "cmp-region")
            projection = plot("Comparison: queries and keys", "cmp-projection")
            grid = plot("Comparison: layers × heads", "cmp-grid")
    return ComparePanel(column, answer, region, projection, grid)


def legend() -> gr.Markdown:
    return gr.Markdown(
        "CT: parameter-free conditional transport cost between the head's queries and keys; MMD²: squared "
        "maximum mean discrepancy (Gaussian kernel). Lower = better aligned. The projection is one PCA "
        "fitted on queries and keys together, so distances between the two sets are real.",
        elem_classes="vqa-small-note",
    )
