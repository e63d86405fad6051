"""The Gradio app (``vqa-align demo``): layout and wiring only.

Everything the app computes lives in the library: :class:`vqa_align.serve.predictor.Predictor` answers,
:func:`vqa_align.serve.predictor.render_views` turns a prediction and a (module, layer, head) selection
into figures drawn by :mod:`vqa_align.serve.figures`. Handlers here catch every error and show it
in the message area (never a traceback), so the app keeps serving the next request.

Events (also the HTTP / ``gradio_client`` API):
    /answer   (question, image_id, upload, compare, kind, layer, head, metric, shading, focus)
    /view     the same selection, re-drawn from the last prediction of the session (no model call)
    /load_compare (checkpoint path) -> status message
Every input but the question is optional for API clients (defaults: the page's initial values).
"""

from __future__ import annotations

import argparse
import errno
import logging
import re
import socket
import threading
import weakref
from pathlib import Path
from typing import Any

import gradio as gr

from vqa_align.runs.checkpoint import WEIGHTS_FILE, CheckpointError, resolve_checkpoint
from vqa_align.errors import UserError
from vqa_align.serve.predictor import (
    KIND_LABELS,
    METRICS,
    Example,
    InputError,
    Prediction,
    Predictor,
    configure_threads,
    default_checkpoint_path,
    freeze_startup_objects,
    load_predictor,
    load_upload,
    render_views,
)

log = logging.getLogger("vqa_align_app")

ALL_WORDS = "all words (glimpse-weighted)"
SHADING_CHOICES = [("AttFlat glimpse", "glimpse"), ("guided attention of the selected layer & head", "guided")]
CONCURRENCY = 2  # two CPU cores: one request per core (each runs single-threaded)
# Errors written for the person using the app; other ValueErrors are shown too but also logged,
# anything else is a bug: logged with its traceback on the server, summarised in the page.
EXPECTED_ERRORS = (InputError, CheckpointError, UserError, FileNotFoundError)
MAX_FILE_SIZE = "50mb"
COMPARE_TTL_S = 3600  # a tab's comparison model is let go after this long without a change  # uploads above this are refused by Gradio before they reach the model

CSS = """
#message {min-height: 1.5em}
#message p {margin: 0}
.vqa-small-note {font-size: 0.85em; opacity: 0.8}
"""


def _error_text(err: BaseException) -> str:
    """The message shown in the page (server paths cut to their file names; the log keeps them)."""
    if isinstance(err, EXPECTED_ERRORS):
        return f"⚠️ **{public_text(str(err))}**"
    if isinstance(err, ValueError):
        log.warning("request failed: %s", err, exc_info=err)
        return f"⚠️ **{public_text(str(err))}**"
    log.error("unexpected error while serving a request", exc_info=err)
    return (f"⚠️ **Internal error ({type(err).__name__}: {public_text(str(err))}).** The app is still running; "
            "see the server log.")


def _notes_text(pred: Prediction, label: str = "") -> str:
    prefix = f"{label}: " if label else ""
    return "\n".join(f"ℹ️ {prefix}{note}" for note in pred.notes)


def plot(label: str, elem_id: str) -> gr.Plot:
    """A matplotlib plot sent as PNG (lossless, faster to encode than the default WebP); the
    figure carries its own title, so the component's label is hidden."""
    return gr.Plot(label=label, format="png", show_label=False, elem_id=elem_id)


def _label_value(pred: Prediction | None) -> dict[str, float] | None:
    return {answer: prob for answer, prob in pred.top_k} if pred is not None else None


def _focus_choices(pred: Prediction | None) -> list[str]:
    tokens = pred.tokens if pred is not None else []
    return [ALL_WORDS] + [f"{i}: {t}" for i, t in enumerate(tokens)]


class CompareModels:
    """Comparison checkpoints: each browser tab holds its own (in a ``gr.State``); tabs naming the
    same checkpoint share one copy through a weak map, so a model is freed once no tab holds it.

    Paths are resolved (``~``, ``.``, ``..``, symlinks, a run folder -> its checkpoint), so every
    spelling of one checkpoint is one model; the key includes the weights' modification time, so a
    checkpoint rewritten by training is loaded afresh. The ``--compare`` model of the command line is
    pinned for the life of the app.
    """

    def __init__(self, pinned: Predictor | None = None) -> None:
        self._lock = threading.Lock()
        self._shared: weakref.WeakValueDictionary[tuple[Path, int], Predictor] = weakref.WeakValueDictionary()
        self.pinned = pinned
        if pinned is not None:
            self._shared[self.key(pinned.path)] = pinned

    @staticmethod
    def key(path: str | Path) -> tuple[Path, int]:
        folder = resolve_checkpoint(Path(str(path).strip()).expanduser()).resolve()
        return folder, (folder / WEIGHTS_FILE).stat().st_mtime_ns

    def get(self, path: str, current: tuple[tuple[Path, int], Predictor] | None = None
            ) -> tuple[tuple[Path, int], Predictor]:
        """(key, model) of ``path``: the tab's ``current`` one when it is that checkpoint."""
        key = self.key(path)
        if current is not None and current[0] == key:
            return current
        with self._lock:  # two tabs asking for the same new checkpoint load it once
            model = self._shared.get(key)
            if model is None:
                model = Predictor(key[0])
                self._shared[key] = model
        return key, model

    def __len__(self) -> int:
        """Comparison models in memory (pinned or held by some tab)."""
        return len(self._shared)


# An absolute path (POSIX, or ~/...) in a message; the page gets its last part only.
_SERVER_PATH = re.compile(r"(?<![\w:/.~])(?:~|/)(?:[^\s/'\"“”,;:()\[\]]*/)+([^\s/'\"“”,;:()\[\]]+)")


def public_text(text: str) -> str:
    """``text`` without the server's absolute paths (``/home/u/.cache/.../features.h5`` -> ``features.h5``)."""
    return _SERVER_PATH.sub(lambda m: m.group(1), text)


def build_app(
    predictor: Predictor,
    compare_predictor: Predictor | None = None,
    examples: list[Example] | None = None,
) -> gr.Blocks:
    """The app's Blocks for an already loaded ``predictor`` (and optional comparison model)."""
    examples = predictor.examples(12) if examples is None else list(examples)
    cache = CompareModels(compare_predictor)
    compare_default = str(compare_predictor.path) if compare_predictor is not None else ""
    cfg = predictor.config.model
    example_questions = {ex.question for ex in examples}
    gallery_items = []
    for ex in examples:
        caption = f"#{ex.image_id}" + (f": {ex.question}" if ex.question else "")
        gallery_items.append((predictor.thumbnail(ex.image_id), caption))

    # --- handlers -------------------------------------------------------------------------------
    def views(pred: Prediction | None, cmp: Prediction | None, kind: str, layer: int, head: int, metric: str,
              shading: str, focus: str) -> list[Any]:
        focus_arg = None if focus in (None, "", ALL_WORDS) else focus
        if pred is None:
            return [None] * 9
        main = render_views(pred, kind, int(layer), int(head), metric=metric, shading=shading, focus=focus_arg)
        out: list[Any] = [main.region, main.words, main.projection, main.grid, main.matrix, main.caption]
        if cmp is not None:
            other = render_views(cmp, kind, int(layer), int(head), metric=metric, shading=shading, focus=focus_arg)
            out += [other.region, other.projection, other.grid]
        else:
            out += [None, None, None]
        return out

    def failed(text: str) -> list[Any]:
        """Outputs of /answer after an error: the message, everything else cleared."""
        # message, 2 states, label, focus, 6 main views, compare column, compare label, 3 compare views,
        # the tab's comparison model
        return [text, None, None, None, gr.Dropdown(choices=_focus_choices(None), value=ALL_WORDS),
                *[None] * 6, gr.skip(), None, *[None] * 3, gr.skip()]

    # Defaults of None make the inputs optional for API clients (gradio_client, HTTP).
    def on_answer(question: str, image_id: float | None = None, upload: str | None = None, compare: str | None = None,
                  kind: str = "sga_guided", layer: int | None = None, head: int = 0, metric: str = "mmd2",
                  shading: str = "glimpse", focus: str | None = None, tab_compare: Any = None) -> list[Any]:
        layer = cfg.num_layers - 1 if layer is None else layer
        try:
            if upload:
                pred = predictor.answer(question, image=upload)
            elif image_id is not None:
                pred = predictor.answer(question, image_id=int(image_id))
            else:
                raise InputError("Choose an image from the gallery (or upload one), then ask.")
        except Exception as err:  # noqa: BLE001 - every error becomes a message
            return failed(_error_text(err))
        messages = [_notes_text(pred)]
        cmp = None
        if compare and compare.strip():
            try:
                tab_compare = cache.get(compare, tab_compare)
                other = tab_compare[1]
                cmp = other.answer(question, image=upload) if upload else other.answer(question, image_id=int(image_id))
                messages.append(_notes_text(cmp, f"comparison ({other.name})") if cmp.notes != pred.notes else "")
            except Exception as err:  # noqa: BLE001
                messages.append(f"Comparison model: {_error_text(err)}")
        # A new question has new words: keep the focus only if it names one of them.
        focus = focus if focus in _focus_choices(pred) else ALL_WORDS
        try:
            drawn = views(pred, cmp, kind, layer, head, metric, shading, focus)
        except Exception as err:  # noqa: BLE001
            return failed(_error_text(err))
        message = "\n\n".join(m for m in messages if m) or f"Answered in {pred.elapsed_ms:.0f} ms."
        return [message, pred, cmp, _label_value(pred), gr.Dropdown(choices=_focus_choices(pred), value=focus),
                *drawn[:6], gr.Column(visible=cmp is not None or compare_predictor is not None),
                _label_value(cmp), *drawn[6:], tab_compare]

    def on_view(pred: Prediction | None, cmp: Prediction | None, kind: str, layer: int, head: int, metric: str,
                shading: str, focus: str) -> list[Any]:
        try:
            return [gr.skip()] + views(pred, cmp, kind, layer, head, metric, shading, focus)
        except Exception as err:  # noqa: BLE001
            return [_error_text(err)] + [gr.skip()] * 9

    def on_select(evt: gr.SelectData, question: str) -> tuple[Any, ...]:
        ex = examples[evt.index]
        picture = predictor.load_image(ex.image_id)
        preview = picture if picture is not None else predictor.thumbnail(ex.image_id)
        # Keep a question the person typed; replace an empty one or another example's question.
        typed = (question or "").strip() and question not in example_questions
        new_question = question if typed or not ex.question else ex.question
        return ex.image_id, None, preview, new_question, ""

    def on_upload(upload: str | None) -> tuple[Any, ...]:
        if not upload:
            return gr.skip(), None, ""
        try:
            if not predictor.uploads_enabled:
                raise InputError(predictor.upload_error)
            rgb, notes = load_upload(upload)
        except Exception as err:  # noqa: BLE001
            return None, None, _error_text(err)
        return None, rgb, "\n".join(f"ℹ️ {n}" for n in notes)

    def on_load_compare(path: str | None = None, tab_compare: Any = None) -> tuple[Any, ...]:
        if not path or not path.strip():
            return "Comparison off.", gr.Column(visible=False), None  # the tab lets go of its model
        try:
            tab_compare = cache.get(path, tab_compare)
        except Exception as err:  # noqa: BLE001
            return _error_text(err), gr.skip(), gr.skip()
        other = tab_compare[1]
        m = other.config.model
        return (f"✅ Loaded **{public_text(other.name)}**: {m.alignment.method} alignment, {m.num_layers} layers × "
                f"{m.num_heads} heads. Press *Answer* to compare."), gr.Column(visible=True), tab_compare

    # --- layout ---------------------------------------------------------------------------------
    with gr.Blocks(title="VQA-Align", analytics_enabled=False) as demo:
        gr.Markdown(
            f"## VQA-Align — where every head looked, and how well its keys and queries align\n"
            f"Model **{predictor.name}** · MCAN {cfg.num_layers} layers × {cfg.num_heads} heads · alignment "
            f"**{cfg.alignment.method}** · {len(predictor.answers)} answers"
        )
        message = gr.Markdown("", elem_id="message")
        pred_state = gr.State(None)
        cmp_state = gr.State(None)
        # (key, Predictor) of this tab's comparison model; dropped after an idle hour (then reloaded).
        tab_compare = gr.State(None, time_to_live=COMPARE_TTL_S)
        first = examples[0] if examples else None
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=320):
                gallery = gr.Gallery(value=gallery_items, label="Examples from the data set (click one)", columns=4,
                                     allow_preview=False, object_fit="contain", buttons=[], height=270,
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
                with gr.Accordion("Compare with a second checkpoint", open=compare_predictor is not None):
                    compare = gr.Textbox(label="Checkpoint or run folder", value=compare_default,
                                         placeholder="runs/easy_vqa_none", elem_id="compare")
                    load_compare = gr.Button("Load", size="sm")
            with gr.Column(scale=3, min_width=420):
                answer = gr.Label(label="Answer (top 5)", num_top_classes=5, elem_id="answer")
                with gr.Row():
                    region = plot("Where the model looked", "region")
                    with gr.Column():
                        words = gr.HighlightedText(label="Question words, shaded by attention", show_legend=False,
                                                   show_inline_category=False, elem_id="words")
                        shading = gr.Radio(SHADING_CHOICES, value="glimpse", label="Shade regions and words by")
                        focus = gr.Dropdown([ALL_WORDS], value=ALL_WORDS, label="Guided attention on word")
        with gr.Column(elem_id="alignment"):
            gr.Markdown("### Alignment of keys and queries, per layer and head")
            with gr.Row():
                kind = gr.Dropdown([(v, k) for k, v in KIND_LABELS.items()], value="sga_guided",
                                   label="Attention module", elem_id="kind")
                layer = gr.Radio([(f"layer {i}", i) for i in range(cfg.num_layers)], value=cfg.num_layers - 1,
                                 label="Layer", elem_id="layer")
                head = gr.Radio([(f"head {j}", j) for j in range(cfg.num_heads)], value=0, label="Head", elem_id="head")
                metric = gr.Radio([(v, k) for k, v in METRICS.items()], value="mmd2", label="Heatmap metric")
            caption = gr.Markdown("", elem_id="caption")
            with gr.Row():
                projection = plot("Queries and keys (one shared PCA)", "projection")
                grid = plot("Layers × heads", "grid")
                matrix = plot("Attention matrix", "matrix")
        with gr.Column(visible=compare_predictor is not None) as compare_col:
            gr.Markdown("### Comparison model (same question, image and selection)")
            with gr.Row():
                cmp_answer = gr.Label(label="Comparison: answer (top 5)", num_top_classes=5, elem_id="cmp-answer")
                cmp_region = plot("Comparison: where it looked", "cmp-region")
                cmp_projection = plot("Comparison: queries and keys", "cmp-projection")
                cmp_grid = plot("Comparison: layers × heads", "cmp-grid")
        gr.Markdown(
            "CT: parameter-free conditional transport cost between the head's queries and keys; MMD²: squared "
            "maximum mean discrepancy (Gaussian kernel). Lower = better aligned. The projection is one PCA "
            "fitted on queries and keys together, so distances between the two sets are real.",
            elem_classes="vqa-small-note",
        )

        selection = [kind, layer, head, metric, shading, focus]
        view_outputs = [region, words, projection, grid, matrix, caption, cmp_region, cmp_projection, cmp_grid]
        answer_outputs = [message, pred_state, cmp_state, answer, focus, region, words, projection, grid, matrix,
                          caption, compare_col, cmp_answer, cmp_region, cmp_projection, cmp_grid, tab_compare]
        for trigger in (ask.click, question.submit):
            trigger(on_answer, [question, image_id, upload, compare, *selection, tab_compare], answer_outputs,
                    api_name="answer" if trigger == ask.click else False, trigger_mode="always_last")
        for control in selection:
            event = control.select if isinstance(control, gr.Radio) else control.input
            event(on_view, [pred_state, cmp_state, *selection], [message, *view_outputs],
                  api_name="view" if control is kind else False, trigger_mode="always_last")
        # Not queued: picking an image must land before a quick click on "Answer" reads the image id.
        gallery.select(on_select, [question], [image_id, upload, preview, question, message], api_name=False,
                       queue=False, show_progress="hidden")
        upload.upload(on_upload, [upload], [image_id, preview, message], api_name=False)
        load_compare.click(on_load_compare, [compare, tab_compare], [message, compare_col, tab_compare],
                           api_name="load_compare")
    demo.compare_models = cache  # for tests and monitoring: how many comparison models are held
    return demo


def launch_kwargs(host: str = "127.0.0.1", port: int | None = 7860) -> dict[str, Any]:
    """launch() arguments: local only, no share link, no SSR (needs node), errors as messages."""
    return dict(server_name=host, server_port=port, share=False, show_error=False, ssr_mode=False,
                max_file_size=MAX_FILE_SIZE, css=CSS, theme=gr.themes.Default(), quiet=True)


def check_listen_address(host: str, port: int) -> None:
    """Refuse, before loading any model, a host this machine cannot listen on or a port in use."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        raise UserError(f"--host {host!r}: not an address of this machine ({err})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        try:
            probe.bind(address)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise UserError(f"--port {port}: already in use on {host}; pick another port") from None
            raise UserError(f"--host {host!r} --port {port}: cannot listen there ({err.strerror or err})") from None


def run_demo(args: argparse.Namespace) -> int:
    """``vqa-align demo``: load the checkpoint(s) once and serve the app until interrupted."""
    check_listen_address(getattr(args, "host", "127.0.0.1"), getattr(args, "port", 7860))
    checkpoint = getattr(args, "checkpoint", None)
    if checkpoint is None and not default_checkpoint_path().exists():
        raise UserError(
            f"no checkpoint given and none at {default_checkpoint_path()}: run `vqa-align quickstart` first"
        )
    predictor = load_predictor(checkpoint, getattr(args, "images", None))
    compare = load_predictor(args.compare) if getattr(args, "compare", None) else None
    # Small models: one thread per request, two requests in parallel (see configure_threads).
    configure_threads(predictor)
    demo = build_app(predictor, compare)
    demo.queue(default_concurrency_limit=CONCURRENCY)
    freeze_startup_objects()  # keeps full garbage collections from stalling requests
    host, port = getattr(args, "host", "127.0.0.1"), getattr(args, "port", 7860)
    print(f"VQA-Align demo: http://{host}:{port}  (model {predictor.path}; Ctrl+C to stop)", flush=True)
    demo.launch(**launch_kwargs(host, port))
    return 0


__all__ = ["build_app", "launch_kwargs", "run_demo"]
