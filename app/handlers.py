"""What the app does on each event: answer, re-draw, pick an image, upload, load a comparison model.

Every handler catches every error and returns it as the page's message (never a traceback), so
the app keeps serving the next request. The outputs of each handler are listed in the order
:func:`vqa_align_app.main.wire_events` connects them.
"""

from __future__ import annotations

import logging
import re
import threading
import weakref
from pathlib import Path
from typing import Any

import gradio as gr

from vqa_align.errors import UserError
from vqa_align.runs.checkpoint import WEIGHTS_FILE, CheckpointError, resolve_checkpoint
from vqa_align.serve.gallery import Example
from vqa_align.serve.images import load_upload
from vqa_align.serve.prediction import InputError, Prediction
from vqa_align.serve.predictor import Predictor, whole_number
from vqa_align.serve.views import render_views

log = logging.getLogger("vqa_align_app")

ALL_WORDS = "all words (glimpse-weighted)"
# Errors written for the person using the app; other ValueErrors are shown too but also logged,
# anything else is a bug: logged with its traceback on the server, summarised in the page.
EXPECTED_ERRORS = (InputError, CheckpointError, UserError, FileNotFoundError)
# An absolute path (POSIX, or ~/...) in a message; the page gets its last part only.
_SERVER_PATH = re.compile(r"(?<![\w:/.~])(?:~|/)(?:[^\s/'\"“”,;:()\[\]]*/)+([^\s/'\"“”,;:()\[\]]+)")


def public_text(text: str) -> str:
    """``text`` without the server's absolute paths (``/home/u/.cache/.../features.h5`` -> ``features.h5``)."""
    return _SERVER_PATH.sub(lambda m: m.group(1), text)


def error_text(err: BaseException) -> str:
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


def _label_value(pred: Prediction | None) -> dict[str, float] | None:
    return {answer: prob for answer, prob in pred.top_k} if pred is not None else None


def focus_choices(pred: Prediction | None) -> list[str]:
    """The words the guided-attention shading can focus on ("2: shape"), after "all words"."""
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


class AppHandlers:
    """The event handlers of one app: its model, comparison models and gallery examples."""

    def __init__(self, predictor: Predictor, compare_predictor: Predictor | None, examples: list[Example]) -> None:
        self.predictor = predictor
        self.compare_pinned = compare_predictor is not None
        self.cache = CompareModels(compare_predictor)
        self.examples = examples
        self.example_questions = {ex.question for ex in examples}

    def views(self, pred: Prediction | None, cmp: Prediction | None, kind: str, layer: int, head: int, metric: str,
              shading: str, focus: str) -> list[Any]:
        """The 6 main views, then the comparison's 3 (None where there is no prediction)."""
        focus_arg = None if focus in (None, "", ALL_WORDS) else focus
        if pred is None:
            return [None] * 9
        layer, head = whole_number(layer, "layer"), whole_number(head, "head")
        main = render_views(pred, kind, layer, head, metric=metric, shading=shading, focus=focus_arg)
        out: list[Any] = [main.region, main.words, main.projection, main.grid, main.matrix, main.caption]
        if cmp is not None:
            other = render_views(cmp, kind, layer, head, metric=metric, shading=shading, focus=focus_arg)
            out += [other.region, other.projection, other.grid]
            if other.selection == main.selection:  # the same head: its values go into the caption's first line
                first, sep, rest = out[5].partition("\n\n")
                out[5] = (f"{first} Comparison model, same head: MMD² = {other.metrics['mmd2']:.3f}, "
                          f"CT = {other.metrics['ct']:.3f}.{sep}{rest}")
        else:
            out += [None, None, None]
        return out

    @staticmethod
    def failed(text: str) -> list[Any]:
        """Outputs of /answer after an error: the message, everything else cleared."""
        # message, 2 states, label, focus, 6 main views, compare column, compare label, 3 compare views,
        # the tab's comparison model
        return [text, None, None, None, gr.Dropdown(choices=focus_choices(None), value=ALL_WORDS),
                *[None] * 6, gr.skip(), None, *[None] * 3, gr.skip()]

    # Defaults of None make the inputs optional for API clients (gradio_client, HTTP).
    def on_answer(self, question: str, image_id: float | None = None, upload: str | None = None,
                  compare: str | None = None, kind: str = "sga_guided", layer: int | None = None, head: int = 0,
                  metric: str = "mmd2", shading: str = "glimpse", focus: str | None = None,
                  tab_compare: Any = None) -> list[Any]:
        layer = self.predictor.num_layers - 1 if layer is None else layer
        try:
            pred = self._answer(self.predictor, question, image_id, upload)
        except Exception as err:  # noqa: BLE001 - every error becomes a message
            return self.failed(error_text(err))
        messages = [_notes_text(pred)]
        cmp = None
        if compare and compare.strip():
            try:
                tab_compare = self.cache.get(compare, tab_compare)
                other = tab_compare[1]
                cmp = self._answer(other, question, image_id, upload)
                messages.append(_notes_text(cmp, f"comparison ({other.name})") if cmp.notes != pred.notes else "")
            except Exception as err:  # noqa: BLE001
                messages.append(f"Comparison model: {error_text(err)}")
        # A new question has new words: keep the focus only if it names one of them.
        focus = focus if focus in focus_choices(pred) else ALL_WORDS
        try:
            drawn = self.views(pred, cmp, kind, layer, head, metric, shading, focus)
        except Exception as err:  # noqa: BLE001
            return self.failed(error_text(err))
        message = "\n\n".join(m for m in messages if m) or f"Answered in {pred.elapsed_ms:.0f} ms."
        return [message, pred, cmp, _label_value(pred), gr.Dropdown(choices=focus_choices(pred), value=focus),
                *drawn[:6], gr.Column(visible=cmp is not None or self.compare_pinned),
                _label_value(cmp), *drawn[6:], tab_compare]

    @staticmethod
    def _answer(model: Predictor, question: str, image_id: float | None, upload: str | None) -> Prediction:
        """The uploaded picture wins over the selected image id."""
        if upload:
            return model.answer(question, image=upload)
        if image_id is not None:
            return model.answer(question, image_id=image_id)  # checked there: 1.5 or 1e30 is refused, not read as 1
        raise InputError("Choose an image from the gallery (or upload one), then ask.")

    def on_view(self, pred: Prediction | None, cmp: Prediction | None, kind: str, layer: int, head: int,
                metric: str, shading: str, focus: str) -> list[Any]:
        try:
            return [gr.skip()] + self.views(pred, cmp, kind, layer, head, metric, shading, focus)
        except Exception as err:  # noqa: BLE001
            return [error_text(err)] + [gr.skip()] * 9

    def on_select(self, evt: gr.SelectData, question: str) -> tuple[Any, ...]:
        """(image id, upload cleared, preview, question, message) of a gallery click."""
        ex = self.examples[evt.index]
        picture = self.predictor.load_image(ex.image_id)
        preview = picture if picture is not None else self.predictor.thumbnail(ex.image_id)
        # Keep a question the person typed; replace an empty one or another example's question.
        typed = (question or "").strip() and question not in self.example_questions
        new_question = question if typed or not ex.question else ex.question
        return ex.image_id, None, preview, new_question, ""

    def on_upload(self, upload: str | None) -> tuple[Any, ...]:
        """(image id cleared, preview, message) of an upload."""
        if not upload:
            return gr.skip(), None, ""
        try:
            if not self.predictor.uploads_enabled:
                raise InputError(self.predictor.upload_error)
            rgb, notes = load_upload(upload)
        except Exception as err:  # noqa: BLE001
            return None, None, error_text(err)
        return None, rgb, "\n".join(f"ℹ️ {n}" for n in notes)

    def on_load_compare(self, path: str | None = None, tab_compare: Any = None) -> tuple[Any, ...]:
        """(message, comparison column, the tab's comparison model)."""
        if not path or not path.strip():
            return "Comparison off.", gr.Column(visible=False), None  # the tab lets go of its model
        try:
            tab_compare = self.cache.get(path, tab_compare)
        except Exception as err:  # noqa: BLE001
            return error_text(err), gr.skip(), gr.skip()
        other = tab_compare[1]
        m = other.config.model
        return (f"✅ Loaded **{public_text(other.name)}**: {m.alignment.method} alignment, {m.num_layers} layers × "
                f"{m.num_heads} heads. Press *Answer* to compare."), gr.Column(visible=True), tab_compare
