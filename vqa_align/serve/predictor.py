"""Answering one question about one image, with everything the app shows about how it was answered.

:class:`Predictor` loads a checkpoint once and answers requests::

    predictor = Predictor(default_checkpoint_path())
    pred = predictor.answer("what shape is in the image?", image_id=100_003)
    pred.answer, pred.top_k          # "circle", [("circle", 0.97), ...]
    views = render_views(pred, kind="sga_guided", layer=1, head=0)   # matplotlib figures

The image is either an image id of the feature store the checkpoint was trained with, or an
uploaded picture whose regions the built-in extractor (:mod:`vqa_align.extract.regions`) computes. Uploads
are refused (with the reason) for models trained on features the app cannot compute, e.g. the
bottom-up-attention detector's.

Bad input raises :class:`InputError` (a ValueError) whose message is meant for the user; input that
can be repaired is repaired and reported in ``Prediction.notes`` (long questions are truncated,
unknown words are listed, huge images are downscaled, grayscale / transparent images converted).

Probabilities are a softmax over the answer vocabulary (the model is trained with per-answer
sigmoids; the softmax turns its scores into one distribution, so the top-k sum to at most 1).
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from vqa_align.runs.checkpoint import CheckpointError, LoadedCheckpoint, load_checkpoint
from vqa_align.config import Config
from vqa_align.errors import UserError
from vqa_align.model.finite import check_output
from vqa_align.paths import default_checkpoint_path

# Module kinds, in the order the app lists them, with the names the app shows.
KIND_LABELS = {
    "sga_guided": "guided attention (regions → words)",
    "sa_image": "image self-attention (regions → regions)",
    "sa_question": "question self-attention (words → words)",
}
METRICS = {"mmd2": "MMD²", "ct": "CT"}
MAX_QUESTION_CHARS = 5000  # longer text is cut before tokenising (the model reads 14 words anyway)
MAX_UPLOAD_SIDE = 1024  # uploads are downscaled to this longest side (regions use 256 px anyway)
DISPLAY_SIDE = 512  # longest side of the picture kept for drawing


class InputError(ValueError):
    """A request the predictor cannot answer; the message is written for the person asking."""


def features_path(config: Config) -> Path | None:
    """The feature store of a checkpoint's data config (without preparing anything).

    An explicit ``data.features`` wins; easy-VQA otherwise lives in the prepared cache.
    """
    data = config.data
    if data.features:
        return Path(data.features).expanduser()
    if data.dataset == "easy_vqa":
        from vqa_align.data.easy_vqa import FEATURES, FOLDER, backbone_features_file
        from vqa_align.paths import cache_root

        name = backbone_features_file(data.easy_vqa_backbone) if data.easy_vqa_backbone else FEATURES
        return cache_root(data.cache_dir) / FOLDER / name
    return None


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------


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


@dataclass
class Example:
    """An example of the gallery: an image of the store with a question asked about it."""

    image_id: int
    question: str = ""
    answer: str | None = None


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------


def _downscale(image: Any, max_side: int) -> Any:
    """PIL image -> a copy whose longest side is at most ``max_side`` (the same object if smaller)."""
    from PIL import Image

    if max(image.size) <= max_side:
        return image
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.BILINEAR, reducing_gap=2.0)


def load_upload(image: Any, max_side: int = MAX_UPLOAD_SIDE) -> tuple[np.ndarray, list[str]]:
    """Any uploaded picture -> (uint8 (H, W, 3), notes). Raises InputError for what is not an image.

    Accepts a file path, bytes, a PIL image or a uint8 / float array (H, W), (H, W, 1|3|4).
    Images larger than ``max_side`` are downscaled; grayscale and palette images are converted
    to RGB, transparency is composited over white (each with a note).
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    from vqa_align.extract.regions import to_rgb_array

    notes: list[str] = []
    name = "the upload"
    if isinstance(image, (str, Path)):
        path = Path(image)
        name = path.name
        if not path.is_file():
            raise InputError(f"image file not found: {path}")
        source: Any = path
    elif isinstance(image, (bytes, bytearray)):
        source = io.BytesIO(image)
    elif isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            if not np.issubdtype(arr.dtype, np.number) or arr.size == 0:
                raise InputError(f"image array must be numeric, got dtype {arr.dtype}")
            arr = np.nan_to_num(arr.astype(np.float64))
            arr = arr * 255.0 if arr.max(initial=0.0) <= 1.0 else arr  # floats in [0, 1] or [0, 255]
            arr = np.clip(arr, 0, 255).astype(np.uint8)
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[..., 0]
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)) or min(arr.shape[:2]) < 1:
            raise InputError(f"image array must have shape (H, W), (H, W, 3) or (H, W, 4), got {arr.shape}")
        image = Image.fromarray(arr)
        source = None
    elif isinstance(image, Image.Image):
        source = None
    else:
        raise InputError(f"cannot read an image from a {type(image).__name__}")

    if source is not None:
        try:
            with warnings.catch_warnings():
                # 90-180 megapixels: PIL warns; we downscale right away, so that is fine.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                opened = Image.open(source)
                opened.draft("RGB", (max_side, max_side))  # JPEG: decode at reduced size (fast)
                opened.load()
                opened = ImageOps.exif_transpose(opened)  # phone photos: as the camera was held
        except Image.DecompressionBombError as err:
            raise InputError(f"{name} is too large to open safely ({err}); please upload a smaller image") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            if isinstance(err, UnidentifiedImageError) or "cannot identify" in str(err):
                raise InputError(f"{name} is not an image file (expected PNG, JPEG, WebP, BMP, GIF ...)") from None
            raise InputError(f"{name} could not be decoded as an image ({err})") from None
        image = opened

    width, height = image.size
    if width < 1 or height < 1:
        raise InputError(f"{name} is empty ({width} x {height} pixels)")
    mode = image.mode
    if mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16/32-bit grayscale: stretch to 8 bits first
        arr = np.asarray(image, dtype=np.float64)
        span = arr.max() - arr.min()
        image = Image.fromarray(((arr - arr.min()) / (span if span > 0 else 1.0) * 255).astype(np.uint8))
    if max(width, height) > max_side:
        if mode not in ("RGB", "RGBA", "L", "LA"):  # resize needs a plain mode (P, I;16, CMYK ...)
            image = image.convert("RGBA" if "A" in mode or "transparency" in image.info else "RGB")
        image = _downscale(image, max_side)
        notes.append(f"The image ({width} x {height} px) was downscaled to {image.width} x {image.height} px.")
    if mode in ("L", "LA", "1", "I", "I;16", "I;16B", "I;16L", "F"):
        notes.append("The grayscale image was converted to RGB.")
    if mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        notes.append("Transparent parts of the image were filled with white.")
    try:
        rgb = to_rgb_array(image)
    except ValueError as err:
        raise InputError(f"{name}: {err}") from None
    return rgb, notes


def display_copy(rgb: np.ndarray, max_side: int = DISPLAY_SIDE) -> np.ndarray:
    """A downscaled copy for drawing (figures are ~300 px wide; drawing 1000s of px is wasted time)."""
    from PIL import Image

    h, w = rgb.shape[:2]
    if max(h, w) <= max_side:
        return rgb
    return np.asarray(_downscale(Image.fromarray(rgb), max_side))


def ids_json_loader(store_path: str | Path) -> Callable[[int], np.ndarray | None] | None:
    """Pictures of a store written by ``vqa-align extract`` (its ``<store>.ids.json``), or None."""
    from vqa_align.extract.pipeline import IDS_SUFFIX

    path = Path(store_path)
    ids_file = path.with_name(path.name + IDS_SUFFIX)
    if not ids_file.is_file():
        return None
    try:
        mapping = {int(k): Path(v) for k, v in json.loads(ids_file.read_text()).items()}
    except (ValueError, AttributeError):
        return None
    return _files_loader(mapping)


def folder_image_loader(folder: str | Path) -> Callable[[int], np.ndarray | None]:
    """Pictures of a store from the folder they were extracted from (``--images DIR``).

    Ids are computed from the file names exactly as ``vqa-align extract`` computes them.
    """
    from vqa_align.extract.pipeline import list_images

    return _files_loader(dict(list_images([folder])))


def _files_loader(mapping: dict[int, Path]) -> Callable[[int], np.ndarray | None]:
    from vqa_align.extract.pipeline import BadImage, decode_image

    def load(image_id: int) -> np.ndarray | None:
        path = mapping.get(int(image_id))
        if path is None:
            return None
        try:
            picture, _ = decode_image(path, MAX_UPLOAD_SIDE)
        except BadImage:
            return None
        return np.asarray(picture)

    return load


def _default_image_loader(config: Config) -> Callable[[int], np.ndarray | None]:
    """Picture of a store image id: the easy-VQA PNG; None for data sets whose pictures we lack."""
    if config.data.dataset != "easy_vqa":
        return lambda image_id: None

    def load(image_id: int) -> np.ndarray | None:
        from vqa_align.data.easy_vqa import load_image

        try:
            return load_image(image_id)
        except (UserError, OSError):
            return None

    return load


# ----------------------------------------------------------------------------------------------
# The predictor
# ----------------------------------------------------------------------------------------------


class Predictor:
    """A checkpoint loaded once, answering (question, image) requests.

    Args:
        checkpoint: run folder, checkpoint folder, or an already loaded checkpoint.
        feature_store: the HDF5 region-feature store (default: the one of the checkpoint's data config).
        image_loader: image id -> (H, W, 3) uint8 picture or None (default: easy-VQA's PNGs).
    """

    def __init__(
        self,
        checkpoint: str | Path | LoadedCheckpoint,
        *,
        feature_store: str | Path | None = None,
        image_loader: Callable[[int], np.ndarray | None] | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        loaded = checkpoint if isinstance(checkpoint, LoadedCheckpoint) else load_checkpoint(checkpoint, device)
        self.checkpoint = loaded
        self.path = loaded.path
        self.config = loaded.config
        self.model = loaded.model.eval()
        self.answers = list(loaded.answers)
        self.tokenizer = loaded.tokenizer
        if self.tokenizer is None:
            raise CheckpointError(f"{self.path}: the checkpoint has no tokenizer")
        self.device = torch.device(device)
        # A plain dict lookup per word: ~100x faster than calling the HF tokenizer for one question.
        self.vocab: dict[str, int] = dict(self.tokenizer.get_vocab())
        from vqa_align.data.vqa_v2 import UNK_ID

        unk = getattr(self.tokenizer, "unk_token_id", None)
        self.unk_id = int(unk) if unk is not None else UNK_ID
        self.max_tokens = self.config.data.max_question_tokens
        self.max_regions = self.config.data.max_regions
        self.feature_dim = self.config.model.feature_dim
        self.image_loader = image_loader or _default_image_loader(self.config)
        self.store, self.store_error = self._open_store(feature_store)
        # what made the training features: the checkpoint's record, else the store's (older checkpoints)
        from vqa_align.runs.checkpoint import checkpoint_extractor

        self.extractor = checkpoint_extractor(self.path) or (self.store.extractor if self.store is not None else None)
        self._backbone: Any = None  # built on the first upload
        self._store_labels: list[str] | None = None
        self._upload_labels: list[str] | None = None
        if image_loader is None and self.store is not None:
            self.image_loader = ids_json_loader(self.store.path) or self.image_loader
        self.upload_error = self._upload_error()
        self._examples: list[Example] | None = None

    # --- set-up -----------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """Short display name: run folder / checkpoint folder."""
        parts = self.path.parts
        return "/".join(parts[-3:]) if len(parts) >= 3 and parts[-2] == "checkpoints" else self.path.name

    @property
    def num_layers(self) -> int:
        return self.config.model.num_layers

    @property
    def num_heads(self) -> int:
        return self.config.model.num_heads

    @property
    def uploads_enabled(self) -> bool:
        return self.upload_error is None

    def _open_store(self, override: str | Path | None) -> tuple[Any, str | None]:
        from vqa_align.data.feature_store import DataFormatError, FeatureStore

        path = Path(override).expanduser() if override else features_path(self.config)
        if path is None:
            return None, "the checkpoint's data config names no feature store (data.features)"
        if not path.is_file():
            hint = " (run `vqa-align prep easy-vqa`)" if self.config.data.dataset == "easy_vqa" else ""
            return None, f"the feature store {path} does not exist{hint}"
        try:
            store = FeatureStore(path)
        except (DataFormatError, OSError) as err:
            return None, f"the feature store cannot be read: {err}"
        if store.feature_dim != self.feature_dim:
            return None, (
                f"the feature store {path} has {store.feature_dim}-d features but the model expects "
                f"{self.feature_dim}-d ones"
            )
        return store, None

    def _upload_error(self) -> str | None:
        """Why uploads are impossible with this model (None when they are possible)."""
        from vqa_align.extract.regions import REGION_FEATURE_DIM

        if self.extractor is not None:  # features of a `vqa-align extract` backbone
            from vqa_align.extract.backbones import missing_for

            missing = missing_for(self.extractor)
            if missing is None:
                return None
            return (f"Uploads need the extractor this model was trained on, {self.extractor.describe()}: "
                    f"{missing.what}. Run `{missing.fix}` and restart the app.")
        source = self.store.source if self.store is not None else ""
        builtin = "vqa_align.extract.regions" in source or (self.store is None and self.config.data.dataset == "easy_vqa")
        if self.feature_dim == REGION_FEATURE_DIM and builtin:
            return None
        what = f"“{source}”" if source else f"{self.feature_dim}-d features of an external detector"
        return (
            f"Uploads are disabled for this model: it was trained on {what}, which the app cannot "
            "compute for a new picture (only models trained on the built-in region extractor, e.g. "
            "the easy-VQA quickstart, can answer about uploaded images). Pick an image of the data set instead."
        )

    # --- inputs -----------------------------------------------------------------------------
    def encode_question(self, question: Any) -> tuple[list[str], list[int], list[bool], list[str]]:
        """Question text -> (words, token ids, out-of-vocabulary flags, notes)."""
        from vqa_align.data.vqa_v2 import tokenize_question

        if question is None or not isinstance(question, str):
            raise InputError("Please type a question.")
        text = question.strip()
        if not text:
            raise InputError("Please type a question.")
        notes: list[str] = []
        words = tokenize_question(text[:MAX_QUESTION_CHARS])
        if not words:
            raise InputError(f"The question {text[:80]!r} has no words (only punctuation?).")
        total = len(tokenize_question(text)) if len(text) > MAX_QUESTION_CHARS else len(words)
        if total > self.max_tokens:
            words = words[: self.max_tokens]
            notes.append(f"The question has {total} words; the model reads only the first {self.max_tokens}: "
                         f"“{' '.join(words)}”.")
        if self.config.model.question_encoder == "minilm":
            # WordPiece: a word may become several pieces; the labels are the pieces.
            # Same call as the data pipeline (vqa_data.encode_questions): raw text in.
            ids = self.tokenizer(text[:MAX_QUESTION_CHARS], add_special_tokens=False)["input_ids"][: self.max_tokens]
            words = self.tokenizer.convert_ids_to_tokens(ids)
            oov = [i == self.unk_id for i in ids]
        else:
            ids = [self.vocab.get(w, self.unk_id) for w in words]
            oov = [w not in self.vocab for w in words]
        unknown = list(dict.fromkeys(w for w, o in zip(words, oov) if o))
        if unknown:
            notes.append(
                "Words the model never saw in training (read as unknown): "
                + ", ".join(f"“{w}”" for w in unknown) + "."
            )
            if all(oov):
                notes.append("No word of the question is known to the model; the answer is a guess.")
        return words, ids, oov, notes

    def _store_regions(self, image_id: Any) -> tuple[int, np.ndarray, np.ndarray, tuple[int, int], np.ndarray | None]:
        """(id, features (N, D), normalised boxes (N, 4), (w, h), picture or None) of a store image."""
        if self.store is None:
            raise InputError(f"Images of the data set are unavailable: {self.store_error}.")
        try:
            image_id = int(image_id)
        except (TypeError, ValueError):
            raise InputError(f"image id must be an integer, got {image_id!r}") from None
        if image_id not in self.store:
            raise InputError(f"Image id {image_id} is not in the feature store {self.store.path}.")
        feats, boxes, size = self.store.get(image_id, self.max_regions)
        self._store_labels = self.store.read_labels(self.store.row(image_id), self.max_regions)
        picture = self.image_loader(image_id)
        return image_id, feats, boxes, size, picture

    def _upload_regions(self, image: Any) -> tuple[np.ndarray, np.ndarray, tuple[int, int], np.ndarray, list[str]]:
        """(features (N, D), normalised boxes (N, 4), (w, h), picture, notes) of an uploaded image."""
        if self.upload_error is not None:
            raise InputError(self.upload_error)
        from vqa_align.extract.regions import extract_regions
        from vqa_align.data.feature_store import normalise_boxes

        rgb, notes = load_upload(image)
        if self.extractor is not None:
            return (*self._backbone_regions(rgb), notes)
        regions = extract_regions(rgb)
        width, height = regions.image_size
        feats, boxes = regions.features[: self.max_regions], regions.boxes[: self.max_regions]
        return feats, normalise_boxes(boxes, width, height), (width, height), rgb, notes

    def _backbone_regions(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[int, int], np.ndarray]:
        """Regions of a picture from the checkpoint's recorded extractor (built once, checked by sha256)."""
        from PIL import Image

        from vqa_align.extract.backbones import backbone_for
        from vqa_align.data.feature_store import normalise_boxes

        if self._backbone is None:
            try:
                self._backbone = backbone_for(self.extractor, self.device)
            except UserError as err:
                raise InputError(str(err)) from None
        height, width = rgb.shape[:2]
        picture = Image.fromarray(rgb)
        regions = self._backbone.extract([self._backbone.preprocessor()(picture)], [(width, height)])[0]
        k = self.max_regions
        self._upload_labels = regions.labels[:k] if regions.labels is not None else None
        feats = regions.features[:k].astype(np.float32)
        return feats, normalise_boxes(regions.boxes[:k], width, height), (width, height), rgb

    # --- answering --------------------------------------------------------------------------
    @torch.no_grad()
    def answer(self, question: str, image_id: int | None = None, image: Any = None, top_k: int = 5) -> Prediction:
        """Answer ``question`` about a store image (``image_id``) or an uploaded picture (``image``)."""
        start = time.perf_counter()
        if (image_id is None) == (image is None):
            raise InputError("Choose an image of the data set or upload one (exactly one of the two).")
        words, ids, oov, notes = self.encode_question(question)
        self._store_labels = self._upload_labels = None  # readable region names, when the extractor gives them
        if image_id is not None:
            image_id, feats, boxes, size, picture = self._store_regions(image_id)
        else:
            feats, boxes, size, picture, image_notes = self._upload_regions(image)
            notes += image_notes
        if len(feats) == 0:
            raise InputError("The image has no regions to look at.")
        num_regions, num_words = len(feats), len(words)
        inputs = dict(
            tokens=torch.tensor([ids], dtype=torch.long, device=self.device),
            question_lengths=torch.tensor([num_words], device=self.device),
            features=torch.from_numpy(np.ascontiguousarray(feats, np.float32))[None].to(self.device),
            boxes=torch.from_numpy(np.ascontiguousarray(boxes, np.float32))[None].to(self.device),
            region_counts=torch.tensor([num_regions], device=self.device),
        )
        output, diagnostics = self.model.diagnose(**inputs)
        # A damaged store or checkpoint would answer with probability NaN: name the cause instead.
        check_output(output.logits, self.model, inputs["features"], inputs["region_counts"],
                     ["upload" if image_id is None else image_id], self.path,
                     self.store.path if image_id is not None and self.store is not None else None)
        probs = output.logits[0].float().softmax(-1)
        k = max(1, min(int(top_k), len(self.answers)))
        top_p, top_i = probs.topk(k)
        top = [(self.answers[i], float(p)) for p, i in zip(top_p.tolist(), top_i.tolist())]

        names = self._store_labels if image_id is not None else self._upload_labels
        region_labels = [f"R{i + 1} {names[i]}" if names and names[i] else f"R{i + 1}" for i in range(num_regions)]
        labels = {"words": words, "regions": region_labels}
        modules = [self._module_result(d, labels) for d in diagnostics]
        width, height = size
        scale = np.array([width, height, width, height], np.float32)
        return Prediction(
            question=question.strip(),
            answer=top[0][0],
            top_k=top,
            tokens=words,
            oov=oov,
            notes=notes,
            image_id=image_id,
            image=display_copy(picture) if picture is not None else None,
            image_size=(int(width), int(height)),
            boxes_px=boxes * scale,
            boxes=np.asarray(boxes, np.float32),
            region_labels=region_labels,
            question_glimpse=output.question_glimpse[0, :num_words].float().cpu().numpy(),
            image_glimpse=output.image_glimpse[0, :num_regions].float().cpu().numpy(),
            modules=modules,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            checkpoint=str(self.path),
            elapsed_ms=(time.perf_counter() - start) * 1e3,
        )

    @staticmethod
    def _module_result(diag: Any, labels: dict[str, list[str]]) -> ModuleResult:
        det = diag.details
        n, m = int(det.q_valid[0].sum()), int(det.k_valid[0].sum())
        # Queries come from the image stream in the decoder (x = regions), keys of the guided
        # attention from the question (y = words).
        query_side = "words" if diag.kind == "sa_question" else "regions"
        key_side = "regions" if diag.kind == "sa_image" else "words"

        def arr(t: torch.Tensor) -> np.ndarray:
            return t.float().cpu().numpy()

        return ModuleResult(
            name=diag.name,
            kind=diag.kind,
            layer=diag.layer,
            ct=arr(diag.ct[0]),
            mmd2=arr(diag.mmd2[0]),
            learned=arr(diag.learned_distance[0]) if diag.learned_distance is not None else None,
            attention=arr(det.attention[0, :, :n, :m]),
            queries=arr(det.queries[0, :, :n]),
            keys=arr(det.keys[0, :, :m]),
            query_labels=labels[query_side][:n],
            key_labels=labels[key_side][:m],
        )

    # --- examples for the gallery -------------------------------------------------------------
    def load_image(self, image_id: int) -> np.ndarray | None:
        """The picture of a store image (None when the data set's pictures are not available)."""
        return self.image_loader(int(image_id))

    def thumbnail(self, image_id: int, size: int = 128) -> np.ndarray:
        """(size, size', 3) uint8 gallery thumbnail; without a picture, the region boxes on grey."""
        from PIL import Image, ImageDraw

        picture = self.load_image(image_id)
        if picture is not None:
            im = Image.fromarray(picture)
            scale = size / max(im.size)
            # Nearest neighbour for upscaling keeps easy-VQA's 64 px shapes crisp.
            resample = Image.NEAREST if scale > 1 else Image.BILINEAR
            return np.asarray(im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), resample))
        boxes, (w, h) = np.zeros((0, 4), np.float32), (1, 1)
        if self.store is not None:
            _, boxes, (w, h) = self.store.get(int(image_id), self.max_regions)
        scale = size / max(w, h)
        tw, th = max(1, round(w * scale)), max(1, round(h * scale))
        im = Image.new("RGB", (tw, th), (210, 210, 210))
        draw = ImageDraw.Draw(im)
        for x1, y1, x2, y2 in boxes * np.array([tw, th, tw, th]):
            draw.rectangle((x1, y1, x2, y2), outline=(60, 60, 160))
        return np.asarray(im)

    def examples(self, n: int = 12) -> list[Example]:
        """Up to ``n`` store images with a question each (from the validation questions when found)."""
        if self._examples is None:
            self._examples = self._find_examples(48)
        return self._examples[:n]

    def _question_files(self) -> list[Path]:
        data = self.config.data
        if data.val_questions:
            return [Path(p).expanduser() for p in data.val_questions]
        if data.dataset == "easy_vqa" and self.store is not None:
            from vqa_align.data.easy_vqa import prepared_files

            return [prepared_files(self.store.path.parent)["val"]["questions"]]
        return []

    def _find_examples(self, n: int) -> list[Example]:
        if self.store is None:
            return []
        examples: dict[int, Example] = {}
        for path in self._question_files():
            try:
                questions = json.loads(path.read_text()).get("questions", [])
            except (OSError, ValueError, AttributeError):
                continue
            for q in questions:
                image_id = q.get("image_id") if isinstance(q, dict) else None
                if isinstance(image_id, int) and image_id not in examples and image_id in self.store:
                    examples[image_id] = Example(image_id, str(q.get("question", "")))
                    if len(examples) >= n:
                        return list(examples.values())
        for image_id in self.store.image_ids[:n]:  # no questions file: plain store images
            examples.setdefault(int(image_id), Example(int(image_id)))
            if len(examples) >= n:
                break
        return list(examples.values())


# ----------------------------------------------------------------------------------------------
# Prediction -> figures (what the app shows; tested without a browser)
# ----------------------------------------------------------------------------------------------


@dataclass
class Views:
    """Everything the app draws for one prediction and one (kind, layer, head) selection."""

    region: Any  # Figure: the image shaded by region attention
    words: list[tuple[str, float | None]]  # question words shaded (gr.HighlightedText)
    projection: Any  # Figure: queries and keys of the head in one shared PCA
    grid: Any  # Figure: layers x heads of the metric
    matrix: Any  # Figure: the head's attention matrix
    caption: str = ""  # one line describing the selection
    selection: dict[str, Any] = field(default_factory=dict)


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
    from vqa_align.serve import figures as vis

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
    region = vis.plot_region_attention(
        display, boxes, regions, f"answer “{pred.answer}”\n{shade_title}", image_size=pred.image_size,
        labels=pred.region_labels,
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
    matrix = vis.plot_attention_matrix(
        module.attention[head], module.query_labels, module.key_labels, f"attention · {where}\n{label}"
    )
    caption = (
        f"{label}, {where}: CT = {module.ct[head]:.3f}, MMD² = {module.mmd2[head]:.4f}"
        f" (mean over heads {module.mmd2.mean():.4f})"
    )
    return Views(region, spans, projection, grid, matrix, caption,
                 dict(kind=kind, layer=layer, head=head, metric=metric, shading=shading))


# ----------------------------------------------------------------------------------------------
# CLI: vqa-align predict
# ----------------------------------------------------------------------------------------------


def configure_threads(predictor: Predictor) -> int:
    """Use one torch thread for small models (the easy-VQA quickstart); returns the thread count.

    Why: a request of a small model is ~100 tiny ops; with several threads each op pays an OpenMP
    barrier, and on a busy 2-core machine a descheduled thread stalls every barrier (measured 10-50x
    slower). Parallelism comes from serving two requests at once instead. Large models (VQA v2,
    100 regions) keep torch's default.
    """
    if predictor.config.model.hidden_size <= 256:
        torch.set_num_threads(1)
    return torch.get_num_threads()


def freeze_startup_objects() -> None:
    """Exclude everything allocated so far (torch, the model, Gradio) from garbage collection.

    Why: figures are reference cycles, so requests leave garbage that only the collector frees;
    every few requests a full collection runs, and without this it rescans the ~1M start-up
    objects, adding ~250 ms of CPU to that request (p90 of a request: 420 -> 230 ms CPU).
    """
    gc.collect()
    gc.freeze()


def load_predictor(checkpoint: str | Path | None, images: str | Path | None = None) -> Predictor:
    """Predictor of ``checkpoint`` (default: the quickstart's); errors become one-line UserErrors.

    ``images``: the folder the store's pictures were extracted from (``vqa-align extract``), shown
    in the gallery.
    """
    path = Path(checkpoint).expanduser() if checkpoint else default_checkpoint_path()
    if checkpoint is None and not path.exists():
        raise UserError(f"no checkpoint given and no quickstart run at {path}; run `vqa-align quickstart` first")
    loader = None
    if images is not None:
        if not Path(images).expanduser().is_dir():
            raise UserError(f"--images {images}: not a folder")
        loader = folder_image_loader(Path(images).expanduser())
    try:
        return Predictor(path, image_loader=loader)
    except CheckpointError as err:
        raise UserError(str(err)) from None


def run_predict(args: argparse.Namespace) -> int:
    """``vqa-align predict``: print the answer, top-k and notes as JSON."""
    predictor = load_predictor(getattr(args, "checkpoint", None))
    configure_threads(predictor)
    try:
        pred = predictor.answer(
            args.question,
            image_id=getattr(args, "image_id", None),
            image=getattr(args, "image", None),
            top_k=getattr(args, "top_k", 5),
        )
    except InputError as err:
        raise UserError(str(err)) from None
    result = pred.to_dict()
    result["elapsed_ms"] = round(pred.elapsed_ms, 1)
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


__all__ = [
    "Example", "InputError", "KIND_LABELS", "METRICS", "ModuleResult", "Prediction", "Predictor", "Views",
    "configure_threads", "default_checkpoint_path", "features_path", "freeze_startup_objects", "load_predictor",
    "load_upload",
    "region_and_word_weights", "render_views", "run_predict",
]

