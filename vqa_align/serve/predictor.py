"""Answering one question about one image, with what every attention head did on the way.

:class:`Predictor` loads a checkpoint once and answers requests::

    predictor = Predictor.load()     # the quickstart's run; Predictor.load("runs/x") or Predictor("runs/x")
    pred = predictor.answer("what shape is in the image?", image_id=100_003)   # or image="photo.png"
    pred.answer, pred.top_k          # "circle", [("circle", 0.97), ...]
    views = render_views(pred, kind="sga_guided", layer=1, head=0)   # vqa_align.serve.views

The image is either an image id of the feature store the checkpoint was trained with, or an
uploaded picture whose regions the built-in extractor (:mod:`vqa_align.extract.regions`) or the
checkpoint's recorded backbone computes (an imported MCAN records the bottom-up detector with
``vqa-align import ... --extractor bottom-up``). Uploads are refused (with the reason) for models
whose run records no extractor that can compute their features.

Bad input raises :class:`~vqa_align.serve.prediction.InputError` (a ValueError) whose message is
meant for the user; input that can be repaired is repaired and reported in ``Prediction.notes``
(long questions are truncated, unknown words are listed, huge images are downscaled, grayscale /
transparent images converted).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vqa_align.extract.feature_store import FeatureStore, normalise_boxes
from vqa_align.data.loaders import feature_store_path
from vqa_align.data.vqa_v2 import UNK_ID, QuestionRecord, encode_questions, tokenize_question
from vqa_align.errors import DataFormatError, UserError
from vqa_align.extract.regions import REGION_FEATURE_DIM, extract_regions
from vqa_align.model.finite import check_output
from vqa_align.paths import default_checkpoint_path
from vqa_align.runs.checkpoint import CheckpointError, LoadedCheckpoint, checkpoint_extractor, load_checkpoint
from vqa_align.runs.hub import locate_run
from vqa_align.serve import gallery
from vqa_align.serve.gallery import Example, ImageLoader
from vqa_align.serve.images import display_copy, load_upload
from vqa_align.serve.novelty import NOVELTY_QUANTILE, FeatureStats, novelty, store_stats
from vqa_align.serve.prediction import InputError, ModuleResult, Prediction
from vqa_align.serve.reading import resplit_baseline
from vqa_align.untrusted_files import MAX_INT

MAX_QUESTION_CHARS = 5000  # longer text is cut before tokenising (the model reads 14 words anyway)
GALLERY_POOL = 48  # examples looked up once; the app shows the first 12


def whole_number(value: Any, what: str) -> int:
    """``value`` as an int: ints, whole floats (the app's number field gives 1.0) and digit strings,
    within int64 (store ids are int64). 1.5 is refused, never read as 1; so are NaN, inf, booleans
    and None, each with an InputError naming ``what`` and the value."""
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise InputError(f"{what} must be a whole number, got {value!r:.40}") from None
    if isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
        value = int(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{what} must be a whole number, got {value!r:.40}")
    if not -MAX_INT - 1 <= int(value) <= MAX_INT:
        raise InputError(f"{what} {value} is out of range (at most 64-bit integers)")
    return int(value)


def as_image_id(value: Any) -> int:
    return whole_number(value, "image id")


@dataclass
class EncodedQuestion:
    """A question as the model reads it: T words (or WordPiece pieces) and their token ids."""

    words: list[str]  # (T,) labels of the tokens
    ids: list[int]  # (T,)
    oov: list[bool]  # (T,) outside the tokenizer's vocabulary (read as [UNK])
    notes: list[str]  # truncation and unknown words, for the person asking


@dataclass
class ImageRegions:
    """The N regions the model reads for one image."""

    features: np.ndarray  # (N, D) float32
    boxes: np.ndarray  # (N, 4) x1, y1, x2, y2 normalised to [0, 1]
    size: tuple[int, int]  # (width, height) of the image the boxes refer to
    picture: np.ndarray | None  # (H, W, 3) uint8; None when a store image has no picture at hand
    labels: list[str] | None = None  # readable region names, when the extractor gives them
    notes: list[str] = field(default_factory=list)  # repairs of an upload



class Predictor:
    """A checkpoint loaded once, answering (question, image) requests.

    Requests may run in parallel threads: ``answer`` keeps its per-request state in locals.

    Args:
        checkpoint: run folder, checkpoint folder, a Hugging Face Hub repo id ``user/repo`` holding a
            run folder (:mod:`vqa_align.runs.hub`), or an already loaded checkpoint.
        feature_store: the HDF5 region-feature store (default: the one of the checkpoint's data config).
        image_loader: image id -> (H, W, 3) uint8 picture or None (default: the pictures listed
            beside a ``vqa-align extract`` store, else easy-VQA's PNGs).
    """

    def __init__(
        self,
        checkpoint: str | Path | LoadedCheckpoint,
        *,
        feature_store: str | Path | None = None,
        image_loader: ImageLoader | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        if not isinstance(checkpoint, LoadedCheckpoint):  # a local folder, or a Hub repo id (downloaded)
            checkpoint = load_checkpoint(locate_run(checkpoint), device)
        loaded = checkpoint
        self.checkpoint = loaded
        self.path = loaded.path
        self.config = loaded.config
        self.model = loaded.model.eval()
        self.answers = list(loaded.answers)
        self.tokenizer = loaded.tokenizer
        if self.tokenizer is None:
            raise CheckpointError(f"{self.path}: the checkpoint has no tokenizer")
        self.device = torch.device(device)
        unk = getattr(self.tokenizer, "unk_token_id", None)
        self.unk_id = int(unk) if unk is not None else UNK_ID
        self.max_tokens = self.config.data.max_question_tokens
        self.max_regions = self.config.data.max_regions
        self.feature_dim = self.config.model.feature_dim
        self.store, self.store_error = self._open_store(feature_store)
        # what made the training features: the checkpoint's record, else the store's (older checkpoints)
        self.extractor = checkpoint_extractor(self.path) or (self.store.extractor if self.store is not None else None)
        self._backbone: Any = None  # built on the first upload
        if image_loader is None and self.store is not None:
            image_loader = gallery.ids_json_loader(self.store.path)
        self.image_loader = image_loader or gallery.default_image_loader(self.config)
        self.upload_error = self._upload_error()
        self._examples: list[Example] | None = None
        self._novelty: FeatureStats | None = None  # statistics of the training pictures, on the first upload

    @classmethod
    def load(cls, checkpoint: str | Path | None = None, **options: Any) -> Predictor:
        """The predictor of ``checkpoint``: a run or checkpoint folder, or a Hugging Face Hub repo id
        ``user/repo`` holding one; without one, of the quickstart's run (``vqa-align quickstart``),
        as ``vqa-align predict`` and ``demo`` do. ``options``: those of the constructor
        (``device``, ``feature_store``, ``image_loader``)."""
        if checkpoint is None:
            checkpoint = default_checkpoint_path()
            if not checkpoint.exists():
                raise UserError(f"no checkpoint given and no quickstart run at {checkpoint}; "
                                "run `vqa-align quickstart` first")
        return cls(checkpoint, **options)  # the constructor locates a Hub id

    @classmethod
    def from_pretrained(cls, name: str | Path, **options: Any) -> Predictor:
        """:meth:`load` under the Hugging Face name: ``Predictor.from_pretrained("user/repo")``."""
        return cls.load(name, **options)

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

    def _open_store(self, override: str | Path | None) -> tuple[FeatureStore | None, str | None]:
        """(store, None), or (None, why the data set's images are unavailable)."""
        path = Path(override).expanduser() if override else feature_store_path(self.config.data)
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
        what = f"“{source}”" if source else f"{self.feature_dim}-d features"
        return (
            f"Uploads are disabled for this model: it was trained on {what} and its run records no extractor "
            "that could compute them for a new picture. Models trained on `vqa-align extract` features or "
            "the built-in regions answer about photos; an imported mcan-vqa / OpenVQA model does when it is "
            "imported with `--extractor bottom-up`. Pick an image of the data set instead."
        )

    # --- inputs -----------------------------------------------------------------------------
    def encode_question(self, question: Any) -> EncodedQuestion:
        """Question text -> the tokens the model reads, through the checkpoint's tokenizer.

        The ids come from :func:`~vqa_align.data.vqa_v2.encode_questions`, the call that encoded
        the training questions; the word labels and the word count of the truncation note from
        MCAN's normalisation (:func:`~vqa_align.data.vqa_v2.tokenize_question`), which the
        word-level tokenizer applies too.
        """
        if question is None or not isinstance(question, str) or not question.strip():
            raise InputError("Please type a question.")
        text = question.strip()
        words = tokenize_question(text[:MAX_QUESTION_CHARS])
        if not words:
            raise InputError(f"The question {text[:80]!r} has no words (only punctuation?).")
        notes: list[str] = []
        total = len(tokenize_question(text)) if len(text) > MAX_QUESTION_CHARS else len(words)
        if total > self.max_tokens:
            words = words[: self.max_tokens]
            notes.append(f"The question has {total} words; the model reads only the first {self.max_tokens}: "
                         f"“{' '.join(words)}”.")
        record = QuestionRecord(question_id=0, image_id=0, question=text[:MAX_QUESTION_CHARS], source="the question")
        try:
            ids = encode_questions(self.tokenizer, [record], self.max_tokens)[0].tolist()
        except DataFormatError:  # the tokenizer finds no token in it
            raise InputError(f"The question {text[:80]!r} has no words (only punctuation?).") from None
        if self.config.model.question_encoder == "minilm" or len(ids) != len(words):
            # WordPiece: a word may become several pieces; the labels are the pieces. (A word-level
            # tokenizer disagrees with MCAN's words only on odd whitespace: its tokens are the truth.)
            words = self.tokenizer.convert_ids_to_tokens(ids)
        oov = [i == self.unk_id for i in ids]
        unknown = list(dict.fromkeys(w for w, o in zip(words, oov) if o))
        if unknown:
            notes.append(
                "Words the model never saw in training (read as unknown): "
                + ", ".join(f"“{w}”" for w in unknown) + "."
            )
            if all(oov):
                notes.append("No word of the question is known to the model; the answer is a guess.")
        return EncodedQuestion(words, ids, oov, notes)

    def _store_regions(self, image_id: Any) -> tuple[int, ImageRegions]:
        """(image id as int, its regions) of a store image."""
        if self.store is None:
            raise InputError(f"Images of the data set are unavailable: {self.store_error}.")
        image_id = as_image_id(image_id)
        if image_id not in self.store:
            raise InputError(f"Image id {image_id} is not in the feature store {self.store.path}.")
        feats, boxes, size = self.store.get(image_id, self.max_regions)
        labels = self.store.read_labels(self.store.row(image_id), self.max_regions)
        return image_id, ImageRegions(feats, boxes, size, self.image_loader(image_id), labels)

    def _upload_regions(self, image: Any) -> ImageRegions:
        """Regions of an uploaded picture, from the extractor the model was trained on."""
        if self.upload_error is not None:
            raise InputError(self.upload_error)
        rgb, notes = load_upload(image)
        if self.extractor is not None:
            regions = self._backbone_regions(rgb)
            regions.notes = notes
            return regions
        found = extract_regions(rgb)
        width, height = found.image_size
        feats, boxes = found.features[: self.max_regions], found.boxes[: self.max_regions]
        return ImageRegions(feats, normalise_boxes(boxes, width, height), (width, height), rgb, notes=notes)

    def novelty_stats(self) -> FeatureStats | None:
        """Statistics of the training pictures' features (:mod:`~vqa_align.serve.novelty`), computed once;
        None without a feature store. Pictures of the training questions, else all of the store's."""
        if self._novelty is None and self.store is not None:
            train_ids = gallery.question_image_ids(gallery.question_files(self.config, self.store, "train"))
            self._novelty = store_stats(self.store, train_ids or None, self.max_regions)
        return self._novelty

    def _novelty_note(self, features: np.ndarray) -> tuple[float | None, list[str]]:
        """(novelty of an upload's region features, a warning when it is beyond the training pictures')."""
        stats = self.novelty_stats()
        if stats is None:
            return None, []
        score = novelty(stats, features)
        if score <= stats.threshold:
            return score, []
        return score, [f"**This picture is unlike the pictures the model was trained on** (feature novelty "
                       f"{score:.1f}; {NOVELTY_QUANTILE:.0%} of the training pictures score at most "
                       f"{stats.threshold:.1f}): the answer is probably meaningless."]

    def _backbone_regions(self, rgb: np.ndarray) -> ImageRegions:
        """Regions of a picture from the checkpoint's recorded extractor (built once, checked by sha256)."""
        from PIL import Image

        from vqa_align.extract.backbones import backbone_for

        if self._backbone is None:
            try:
                self._backbone = backbone_for(self.extractor, self.device)
            except UserError as err:
                raise InputError(str(err)) from None
        height, width = rgb.shape[:2]
        picture = Image.fromarray(rgb)
        found = self._backbone.extract([self._backbone.preprocessor()(picture)], [(width, height)])[0]
        k = self.max_regions
        labels = found.labels[:k] if found.labels is not None else None
        feats = found.features[:k].astype(np.float32)
        return ImageRegions(feats, normalise_boxes(found.boxes[:k], width, height), (width, height), rgb, labels)

    # --- answering --------------------------------------------------------------------------
    @torch.no_grad()
    def answer(self, question: str, image_id: int | None = None, image: Any = None, top_k: int = 5) -> Prediction:
        """Answer ``question`` about a store image (``image_id``) or an uploaded picture (``image``)."""
        start = time.perf_counter()
        if (image_id is None) == (image is None):
            raise InputError("Choose an image of the data set or upload one (exactly one of the two).")
        encoded = self.encode_question(question)
        if image_id is not None:
            image_id, regions = self._store_regions(image_id)
        else:
            regions = self._upload_regions(image)
        if len(regions.features) == 0:
            raise InputError("The image has no regions to look at.")
        score, warning = self._novelty_note(regions.features) if image_id is None else (None, [])
        output, diagnostics = self._run_model(encoded, regions, image_id)
        probs = output.logits[0].float().softmax(-1)
        k = max(1, min(int(top_k), len(self.answers)))
        top_p, top_i = probs.topk(k)
        top = [(self.answers[i], float(p)) for p, i in zip(top_p.tolist(), top_i.tolist())]
        num_regions, num_words = len(regions.features), len(encoded.words)
        names = regions.labels
        region_labels = [f"R{i + 1} {names[i]}" if names and names[i] else f"R{i + 1}" for i in range(num_regions)]
        labels = {"words": encoded.words, "regions": region_labels}
        width, height = regions.size
        return Prediction(
            question=question.strip(),
            answer=top[0][0],
            top_k=top,
            tokens=encoded.words,
            oov=encoded.oov,
            notes=encoded.notes + regions.notes + warning,
            image_id=image_id,
            image=display_copy(regions.picture) if regions.picture is not None else None,
            image_size=(int(width), int(height)),
            boxes_px=regions.boxes * np.array([width, height, width, height], np.float32),
            boxes=np.asarray(regions.boxes, np.float32),
            region_labels=region_labels,
            question_glimpse=output.question_glimpse[0, :num_words].float().cpu().numpy(),
            image_glimpse=output.image_glimpse[0, :num_regions].float().cpu().numpy(),
            modules=[_module_result(d, labels) for d in diagnostics],
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            checkpoint=str(self.path),
            elapsed_ms=(time.perf_counter() - start) * 1e3,
            novelty=score,
        )

    def _run_model(self, encoded: EncodedQuestion, regions: ImageRegions, image_id: int | None) -> tuple[Any, Any]:
        """(model output, per-module diagnostics) of one request, as a batch of one."""
        inputs = dict(
            tokens=torch.tensor([encoded.ids], dtype=torch.long, device=self.device),  # (1, T)
            question_lengths=torch.tensor([len(encoded.ids)], device=self.device),
            features=torch.from_numpy(np.ascontiguousarray(regions.features, np.float32))[None].to(self.device),
            boxes=torch.from_numpy(np.ascontiguousarray(regions.boxes, np.float32))[None].to(self.device),
            region_counts=torch.tensor([len(regions.features)], device=self.device),
        )
        output, diagnostics = self.model.diagnose(**inputs)
        # A damaged store or checkpoint would answer with probability NaN: name the cause instead.
        check_output(output.logits, self.model, inputs["features"], inputs["region_counts"],
                     ["upload" if image_id is None else image_id], self.path,
                     self.store.path if image_id is not None and self.store is not None else None,
                     boxes=inputs["boxes"])
        return output, diagnostics

    # --- examples for the gallery -------------------------------------------------------------
    def load_image(self, image_id: int) -> np.ndarray | None:
        """The picture of a store image (None when the data set's pictures are not available)."""
        return self.image_loader(as_image_id(image_id))

    def thumbnail(self, image_id: int, size: int = 128) -> np.ndarray:
        """(size, size', 3) uint8 gallery thumbnail; without a picture, the region boxes on grey."""
        picture = self.load_image(image_id)
        boxes, image_size = np.zeros((0, 4), np.float32), (1, 1)
        if picture is None and self.store is not None:
            _, boxes, image_size = self.store.get(as_image_id(image_id), self.max_regions)
        return gallery.thumbnail(picture, boxes, image_size, size)

    def examples(self, n: int = 12) -> list[Example]:
        """Up to ``n`` store images with a question each (from the validation questions when found)."""
        if self._examples is None:
            files = gallery.question_files(self.config, self.store)
            self._examples = gallery.find_examples(self.store, files, GALLERY_POOL)
        return self._examples[:n]


def _module_result(diag: Any, labels: dict[str, list[str]]) -> ModuleResult:
    """One module's diagnostics of a batch of one, cut to its n valid queries and m valid keys."""
    det = diag.details
    n, m = int(det.q_valid[0].sum()), int(det.k_valid[0].sum())
    # Queries come from the image stream in the decoder (x = regions), keys of the guided
    # attention from the question (y = words).
    query_side = "words" if diag.kind == "sa_question" else "regions"
    key_side = "regions" if diag.kind == "sa_image" else "words"

    def arr(t: torch.Tensor) -> np.ndarray:
        return t.float().cpu().numpy()

    queries, keys = det.queries[0, :, :n], det.keys[0, :, :m]  # (H, n, d), (H, m, d)
    baseline = resplit_baseline(queries, keys)

    return ModuleResult(
        name=diag.name,
        kind=diag.kind,
        layer=diag.layer,
        ct=arr(diag.ct[0]),
        mmd2=arr(diag.mmd2[0]),
        learned=arr(diag.learned_distance[0]) if diag.learned_distance is not None else None,
        attention=arr(det.attention[0, :, :n, :m]),  # (H, n, m)
        queries=arr(queries),  # (H, n, d)
        keys=arr(keys),  # (H, m, d)
        query_labels=labels[query_side][:n],
        key_labels=labels[key_side][:m],
        ct_resplit=baseline.ct,
        mmd2_resplit=baseline.mmd2,
    )


__all__ = ["EncodedQuestion", "ImageRegions", "InputError", "Prediction", "Predictor"]
