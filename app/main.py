"""The Gradio app (``vqa-align demo``): the page, its events, and serving it.

Everything the app computes lives in the library: :class:`vqa_align.serve.predictor.Predictor` answers,
:func:`vqa_align.serve.views.render_views` turns a prediction and a (module, layer, head) selection
into figures drawn by :mod:`vqa_align.serve.figures`. The panels are built in
:mod:`vqa_align_app.layout`; the handlers (:mod:`vqa_align_app.handlers`) catch every error and show
it in the message area (never a traceback), so the app keeps serving the next request.

Events (also the HTTP / ``gradio_client`` API):
    /answer   (question, image_id, upload, compare, kind, layer, head, metric, shading, focus)
    /view     the same selection, re-drawn from the last prediction of the session (no model call)
    /load_compare (checkpoint path) -> status message
Every input but the question is optional for API clients (defaults: the page's initial values).
"""

from __future__ import annotations

import argparse
import errno
import socket
from dataclasses import dataclass
from typing import Any

import gradio as gr

from vqa_align.errors import UserError
from vqa_align.paths import default_checkpoint_path
from vqa_align.serve.gallery import Example
from vqa_align.serve.predictor import Predictor
from vqa_align.serve.startup import configure_threads, freeze_startup_objects, load_predictor

from vqa_align_app import layout
from vqa_align_app.handlers import AppHandlers

CONCURRENCY = 2  # two CPU cores: one request per core (each runs single-threaded)
MAX_FILE_SIZE = "50mb"  # uploads above this are refused by Gradio before they reach the model
COMPARE_TTL_S = 3600  # a tab's comparison model is let go after this long without a change

CSS = """
#message {min-height: 1.5em}
#message p {margin: 0}
.vqa-small-note {font-size: 0.85em; opacity: 0.8}
#gallery .caption-label {white-space: normal; max-width: 100%; left: 0; font-size: 0.8em; line-height: 1.2;
  text-align: center; opacity: 0.92}
"""


def build_app(
    predictor: Predictor,
    compare_predictor: Predictor | None = None,
    examples: list[Example] | None = None,
) -> gr.Blocks:
    """The app's Blocks for an already loaded ``predictor`` (and optional comparison model)."""
    examples = predictor.examples(12) if examples is None else list(examples)
    handlers = AppHandlers(predictor, compare_predictor, examples)
    compare_default = str(compare_predictor.path) if compare_predictor is not None else ""
    with gr.Blocks(title="VQA-Align", analytics_enabled=False) as demo:
        layout.header(predictor)
        message = gr.Markdown("", elem_id="message")
        session = Session(
            message=message,
            pred=gr.State(None),
            cmp=gr.State(None),
            # (key, Predictor) of this tab's comparison model; dropped after an idle hour (then reloaded).
            tab_compare=gr.State(None, time_to_live=COMPARE_TTL_S),
        )
        with gr.Row(equal_height=False):
            inputs = layout.input_column(predictor, examples, compare_default, compare_predictor is not None)
            answer = layout.answer_column()
        alignment = layout.alignment_section(predictor.num_layers, predictor.num_heads)
        compare = layout.compare_section(compare_predictor is not None)
        layout.legend()
        wire_events(demo, handlers, session, inputs, answer, alignment, compare)
    demo.compare_models = handlers.cache  # for tests and monitoring: how many comparison models are held
    return demo


@dataclass
class Session:
    """Per-tab state: the message area, the last predictions (main, comparison) and the comparison model."""

    message: gr.Markdown
    pred: gr.State
    cmp: gr.State
    tab_compare: gr.State


def wire_events(demo: gr.Blocks, handlers: AppHandlers, session: Session, inputs: layout.InputPanel,
                answer: layout.AnswerPanel, alignment: layout.AlignmentPanel, compare: layout.ComparePanel) -> None:
    """Connect the page to the handlers; the named events are the app's HTTP / gradio_client API."""
    selection = [alignment.kind, alignment.layer, alignment.head, alignment.metric, answer.shading, answer.focus]
    view_outputs = [answer.region, answer.words, alignment.projection, alignment.grid, alignment.matrix,
                    alignment.caption, compare.region, compare.projection, compare.grid]
    answer_outputs = [session.message, session.pred, session.cmp, answer.answer, answer.focus, *view_outputs[:6],
                      compare.column, compare.answer, *view_outputs[6:], session.tab_compare]
    answer_inputs = [inputs.question, inputs.image_id, inputs.upload, inputs.compare, *selection, session.tab_compare]
    for trigger in (inputs.ask.click, inputs.question.submit):
        trigger(handlers.on_answer, answer_inputs, answer_outputs,
                api_name="answer" if trigger == inputs.ask.click else False, trigger_mode="always_last")
    # The page opens answered: the prefilled question about the first example, by the Answer handler.
    demo.load(handlers.on_answer, answer_inputs, answer_outputs, api_name=False)
    for control in selection:
        event = control.select if isinstance(control, gr.Radio) else control.input
        event(handlers.on_view, [session.pred, session.cmp, *selection], [session.message, *view_outputs],
              api_name="view" if control is alignment.kind else False, trigger_mode="always_last")
    # Not queued: picking an image must land before a quick click on "Answer" reads the image id.
    inputs.gallery.select(handlers.on_select, [inputs.question],
                          [inputs.image_id, inputs.upload, inputs.preview, inputs.question, session.message],
                          api_name=False, queue=False, show_progress="hidden")
    inputs.upload.upload(handlers.on_upload, [inputs.upload], [inputs.image_id, inputs.preview, session.message],
                         api_name=False)
    inputs.load_compare.click(handlers.on_load_compare, [inputs.compare, session.tab_compare],
                              [session.message, compare.column, session.tab_compare], api_name="load_compare")


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
