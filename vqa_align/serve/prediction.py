"""What a request to the predictor gives back: a :class:`Prediction`, or an :class:`InputError`.

Plain data (numpy arrays, lists, strings): the app, the CLI and :mod:`vqa_align.serve.views` read
it without touching the model. Probabilities are a softmax over the answer vocabulary (the model is
trained with per-answer sigmoids; the softmax turns its scores into one distribution, so the top-k
sum to at most 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# Module kinds, in the order the app lists them, with the names the app shows.
KIND_LABELS = {
    "sga_guided": "guided attention (regions → words)",
    "sa_image": "image self-attention (regions → regions)",
    "sa_question": "question self-attention (words → words)",
}
METRICS = {"mmd2": "MMD²", "ct": "CT"}


class InputError(ValueError):
    """A request the predictor cannot answer; the message is written for the person asking."""


@dataclass
class ModuleResult:
    """One attention module of one request, restricted to valid positions (H heads, n queries, m keys)."""

    name: str  # "decoder.1.guided_attention"
    kind: str  # "sa_question" | "sa_image" | "sga_guided"
    layer: int
    ct: np.ndarray  # (H,) parameter-free conditional transport between queries and keys
    mmd2: np.ndarray  # (H,) Gaussian-kernel MMD²
    learned: np.ndarray | None  # (H,) the module's own training distance, if it has an aligner
    attention: np.ndarray  # (H, n, m)
    queries: np.ndarray  # (H, n, d)
    keys: np.ndarray  # (H, m, d)
    query_labels: list[str]
    key_labels: list[str]
    # (H,) mean CT / MMD² of the pooled queries and keys re-split at random (serve.reading): the value of
    # "no gap between queries and keys" for this head, the scale to read ct and mmd2 against
    ct_resplit: np.ndarray | None = None
    mmd2_resplit: np.ndarray | None = None


@dataclass
class Prediction:
    """The answer to one request and everything needed to draw how it came about."""

    question: str
    answer: str
    top_k: list[tuple[str, float]]  # (answer, probability), best first
    tokens: list[str]  # the words the model read (after truncation)
    oov: list[bool]  # per token: outside the tokenizer's vocabulary (read as [UNK])
    notes: list[str]  # repairs and warnings, for the person asking
    image_id: int | None
    image: np.ndarray | None  # (h, w, 3) uint8 display copy (downscaled), None when no picture exists
    image_size: tuple[int, int]  # (width, height) of the image the boxes refer to
    boxes_px: np.ndarray  # (N, 4) x1, y1, x2, y2 in pixels of image_size
    boxes: np.ndarray  # (N, 4) normalised to [0, 1]
    region_labels: list[str]  # "R1".."RN"
    question_glimpse: np.ndarray  # (T,) AttFlat weights over the words
    image_glimpse: np.ndarray  # (N,) AttFlat weights over the regions
    modules: list[ModuleResult]
    num_layers: int
    num_heads: int
    checkpoint: str = ""
    elapsed_ms: float = 0.0
    # an upload's distance from the training pictures' features (serve.novelty), None for store images
    novelty: float | None = None

    def module(self, kind: str, layer: int) -> ModuleResult:
        for m in self.modules:
            if m.kind == kind and m.layer == layer:
                return m
        raise KeyError(f"no {kind} module in layer {layer}")

    def metric_grid(self, kind: str, metric: str = "mmd2") -> np.ndarray:
        """(L, H) values of ``metric`` ("mmd2" or "ct") of the modules of one kind, by layer."""
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {list(METRICS)}, got {metric!r}")
        rows = sorted((m for m in self.modules if m.kind == kind), key=lambda m: m.layer)
        if not rows:
            raise KeyError(f"no {kind} modules")
        return np.stack([getattr(m, metric) for m in rows])

    def to_dict(self, diagnostics: bool = False) -> dict[str, Any]:
        """JSON-ready summary (what ``vqa-align predict`` prints)."""
        out: dict[str, Any] = {
            "question": self.question,
            "answer": self.answer,
            "top_k": [{"answer": a, "probability": round(p, 6)} for a, p in self.top_k],
            "tokens": self.tokens,
            "oov_words": [t for t, o in zip(self.tokens, self.oov) if o],
            "notes": self.notes,
            "image_id": self.image_id,
            "image_size": list(self.image_size),
            "num_regions": int(len(self.boxes)),
            "checkpoint": self.checkpoint,
            "mean_mmd2": {k: float(self.metric_grid(k).mean()) for k in KIND_LABELS
                          if any(m.kind == k for m in self.modules)},
        }
        if diagnostics:
            out["modules"] = [
                {"name": m.name, "kind": m.kind, "layer": m.layer, "ct": m.ct.tolist(), "mmd2": m.mmd2.tolist()}
                for m in self.modules
            ]
            out["boxes"] = self.boxes.tolist()
            out["image_glimpse"] = self.image_glimpse.tolist()
            out["question_glimpse"] = self.question_glimpse.tolist()
        return out

