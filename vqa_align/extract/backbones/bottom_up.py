"""The bottom-up-attention detector (Anderson et al., CVPR 2018) in plain PyTorch.

The Visual Genome Faster R-CNN whose region features most published VQA v2 models read:
ResNet-101 C4 with a Caffe-style stem, an RPN on the stride-16 res4 map, RoI max pooling 14 x 14,
res5 (stride 1, dilation 2) and a mean pool -> one 2048-d feature per box, per-class box regression
over 1,600 object classes and an attribute head over 400 attributes. Only torchvision's ``nms`` and
``roi_pool`` are used beyond PyTorch.

Weights: the public conversion ``unc-nlp/frcnn-vg-finetuned`` (the one the Hugging Face LXMERT demo
loads), read as tensors only (``bottom_up_weights.py``: files, vocabularies, download) and loaded
strictly under its own parameter names. Every setting below and where it comes from:
docs/extract.md ("bottom-up").

Use::

    detector = BottomUpDetector.from_file("pytorch_model.bin")      # bottom_up_weights.download_bottom_up() fetches it
    vocab = load_vocabulary("objects_vocab.txt", "attributes_vocab.txt")
    dets = detect(detector, [rgb_uint8_array], vocab=vocab)[0]      # Detections of one image

``BACKBONE`` (class ``BottomUp``, end of file) is the same detector as the ``bottom-up`` backbone of
``vqa-align extract``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_pool

from vqa_align.errors import DataFormatError, UserError
from vqa_align.extract.backbones import bottom_up_boxes as B
from vqa_align.extract.backbones import bottom_up_tsv as T
from vqa_align.extract.backbones.base import Backbone, ExtractorInfo, ImageRegions, Missing, sha256_of_file
from vqa_align.extract.backbones.bottom_up_config import HF_MAX_SIZE, HF_MIN_SIZE, BottomUpConfig
from vqa_align.extract.backbones.bottom_up_net import FEATURE_DIM, ProposalGenerator, ResNetTrunk, RoIHeads
from vqa_align.extract.backbones.bottom_up_weights import (
    ATTRIBUTES_VOCAB,
    OBJECTS_VOCAB,
    Vocabulary,
    default_weights_dir,
    download_bottom_up,
    load_weights_file,
    matching_state_dict,
    read_vocabulary,
    weights_file,
)

RES4_STRIDE = 16  # stem /4, res3 /2, res4 /2
RES5_CHUNK = 1024  # boxes per res5 call: ~0.8 GB of bf16 activations per 14 x 14 x 2048 output


# ---------------------------------------------------------------------------------------------
# Preprocessing


@dataclass
class Prepared:
    """One preprocessed image: the network input and the sizes needed to map boxes back."""

    pixels: torch.Tensor  # (3, h, w) float32, BGR, mean subtracted
    resized_hw: tuple[int, int]
    original_hw: tuple[int, int]
    scale: float | None = None  # the TSV rule's one scale factor (None: x and y by their own)


def preprocess(rgb: np.ndarray, config: BottomUpConfig) -> Prepared:
    """uint8 RGB (H, W, 3) -> the detector's input: resized (bilinear, no antialias), BGR, minus mean.

    ``selection=bottom-up``: as the TSV code, mean first, then OpenCV's resize by one scale
    (``bottom_up_tsv.tsv_preprocess``); ``hf-demo``: as the HF demo, resize, then the mean.
    """
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise DataFormatError(f"bottom-up detector: expected a uint8 RGB array (H, W, 3), got {rgb.dtype} {rgb.shape}")
    height, width = rgb.shape[:2]
    if config.selection == "bottom-up":
        pixels, size, scale = T.tsv_preprocess(rgb, config.min_size, config.max_size, config.pixel_mean_bgr)
        return Prepared(pixels=pixels, resized_hw=size, original_hw=(height, width), scale=scale)
    new_h, new_w = B.resized_shape(height, width, config.min_size, config.max_size)
    bgr = torch.from_numpy(np.ascontiguousarray(rgb[:, :, ::-1])).permute(2, 0, 1).float()  # (3, H, W)
    resized = F.interpolate(bgr[None], size=(new_h, new_w), mode="bilinear", align_corners=False)[0]
    mean = torch.tensor(config.pixel_mean_bgr, dtype=torch.float32).view(3, 1, 1)
    return Prepared(pixels=resized - mean, resized_hw=(new_h, new_w), original_hw=(height, width))


def batch_images(prepared: Sequence[Prepared]) -> torch.Tensor:
    """Stack images of different sizes into (B, 3, H_max, W_max), zero-padded at the bottom/right."""
    h = max(p.resized_hw[0] for p in prepared)
    w = max(p.resized_hw[1] for p in prepared)
    out = torch.zeros(len(prepared), 3, h, w)
    for i, p in enumerate(prepared):
        out[i, :, : p.resized_hw[0], : p.resized_hw[1]] = p.pixels
    return out



@dataclass
class RawOutputs:
    """Network outputs of one image, before the final box selection (resized-image pixels)."""

    proposals: torch.Tensor  # (R, 4)
    features: torch.Tensor  # (R, 2048) mean-pooled res5
    class_logits: torch.Tensor  # (R, C+1)
    attr_logits: torch.Tensor  # (R, A+1)
    box_deltas: torch.Tensor  # (R, 4C)


class BottomUpDetector(nn.Module):
    """The detector: images -> per-image proposals, box features and head outputs."""

    def __init__(self, config: BottomUpConfig | None = None):
        super().__init__()
        self.config = (config or BottomUpConfig()).validate()
        self.backbone = ResNetTrunk(self.config.bn_eps)
        self.proposal_generator = ProposalGenerator(self.config)
        self.roi_heads = RoIHeads(self.config)
        self.eval()
        self.requires_grad_(False)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], config: BottomUpConfig | None = None, source: str = "state dict") -> "BottomUpDetector":
        """Build and load strictly, skipping the random initialisation the weights replace anyway."""
        with torch.device("meta"):
            model = cls(config)
        model.to_empty(device="cpu")
        model.load_weights(state, source=source)
        return model

    @classmethod
    def from_file(cls, path: str | os.PathLike, config: BottomUpConfig | None = None) -> "BottomUpDetector":
        return cls.from_state_dict(load_weights_file(path), config, source=str(path))

    def load_weights(self, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Strict load under the checkpoint's own names (checks: :func:`matching_state_dict`)."""
        self.load_state_dict(matching_state_dict(self.state_dict(), state, source), strict=True)

    def forward(
        self, images: torch.Tensor, sizes: Sequence[tuple[int, int]], scales: Sequence[float | None] | None = None
    ) -> list[RawOutputs]:
        """(B, 3, H, W) padded batch, each image's (h, w) -> one :class:`RawOutputs` per image.

        ``scales``: each image's resize factor (:attr:`Prepared.scale`), which the TSV rule's
        proposal size filter needs (None: 1).
        """
        cfg = self.config
        if cfg.selection == "bottom-up":
            # One picture at a time through the trunk and the RPN, as Caffe ran them: in a padded
            # batch the maps near a smaller picture's right and bottom edges would differ. res5
            # (~88% of the work) still runs on each picture's 300 boxes at once.
            scales = scales or [None] * len(sizes)
            maps = [self.backbone(images[i : i + 1, :, :h, :w]) for i, (h, w) in enumerate(sizes)]  # (1, 1024, ., .)
            proposals = [self._tsv_proposals(*self.proposal_generator.rpn_head(m), hw, s) for m, hw, s in zip(maps, sizes, scales)]
            pooled = [(m.float(), torch.cat([p.new_zeros(len(p), 1), p], dim=1)) for m, p in zip(maps, proposals)]
        else:
            feats = self.backbone(images)  # (B, 1024, h16, w16)
            proposals = self._hf_proposals(*self.proposal_generator.rpn_head(feats), sizes)
            rois = torch.cat([torch.cat([p.new_full((len(p), 1), i), p], dim=1) for i, p in enumerate(proposals)])  # (R, 5)
            pooled = [(feats.float(), rois)]
        # Pool in float32 (box coordinates up to ~1333 px lose whole pixels in bf16), res5 in chunks
        # of boxes so a large batch does not hold every box's 14 x 14 x 2048 map at once.
        box_feats = torch.cat(
            [
                self.roi_heads.res5(roi_pool(fmap, chunk, cfg.pool_size, 1.0 / RES4_STRIDE)).mean(dim=(2, 3))
                for fmap, boxes in pooled
                for chunk in boxes.split(RES5_CHUNK)
            ]
        )  # (R, 2048)
        cls, attr, box_deltas = self.roi_heads.box_predictor(box_feats)
        out, start = [], 0
        for p in proposals:
            sl = slice(start, start + len(p))
            out.append(RawOutputs(p, box_feats[sl].float(), cls[sl].float(), attr[sl].float(), box_deltas[sl].float()))
            start += len(p)
        return out

    def _hf_proposals(self, logits: torch.Tensor, deltas: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        """The HF demo's proposals: Detectron2's top-k, clip, NMS (``B.select_proposals``)."""
        cfg = self.config
        n, a, fh, fw = logits.shape
        anchors = B.grid_anchors(self.proposal_generator.anchor_generator.cells, fh, fw, RES4_STRIDE)  # (fh*fw*A, 4)
        logits = logits.permute(0, 2, 3, 1).reshape(n, -1).float()  # (B, fh*fw*A)
        deltas = deltas.reshape(n, a, 4, fh, fw).permute(0, 3, 4, 1, 2).reshape(n, -1, 4).float()  # (B, fh*fw*A, 4)
        proposals = []
        for i, (h, w) in enumerate(sizes):
            boxes = B.apply_deltas(deltas[i], anchors, (1.0, 1.0, 1.0, 1.0))
            boxes, _ = B.select_proposals(boxes, logits[i], h, w, cfg.pre_nms_topk, cfg.post_nms_topk, cfg.rpn_nms_thresh, cfg.rpn_min_size)
            proposals.append(boxes)
        return proposals

    def _tsv_proposals(self, logits: torch.Tensor, deltas: torch.Tensor, size: tuple[int, int], scale: float | None) -> torch.Tensor:
        """One image's RoIs by Caffe's proposal layer (``bottom_up_tsv.tsv_proposals``), in float32
        NumPy as there; ``logits`` (1, A, h, w), ``deltas`` (1, 4A, h, w) of the image alone."""
        cfg = self.config
        mh, mw = logits.shape[-2:]
        anchors = B.grid_anchors(self.proposal_generator.anchor_generator.cells, mh, mw, RES4_STRIDE)
        moves, scores = T.rpn_outputs(logits[0], deltas[0])
        rois = T.tsv_proposals(anchors.cpu().numpy(), moves, scores, size, 1.0 if scale is None else scale,
                               cfg.pre_nms_topk, cfg.post_nms_topk, cfg.rpn_nms_thresh, cfg.rpn_min_size)
        return torch.from_numpy(rois).to(logits.device)


def load_vocabulary(objects: str | os.PathLike, attributes: str | os.PathLike, config: BottomUpConfig | None = None) -> Vocabulary:
    """The object and attribute names, checked against the detector's class counts."""
    cfg = config or BottomUpConfig()
    return Vocabulary(read_vocabulary(objects, cfg.num_classes, "object"),
                      read_vocabulary(attributes, cfg.num_attributes, "attribute"))


# ---------------------------------------------------------------------------------------------
# Detections


@dataclass
class Detections:
    """Boxes of one image; boxes are x1, y1, x2, y2 in pixels of the original image."""

    features: np.ndarray  # (n, 2048) float32
    boxes: np.ndarray  # (n, 4) float32
    object_ids: np.ndarray  # (n,) int64
    object_scores: np.ndarray  # (n,) float32
    attribute_ids: np.ndarray  # (n,) int64
    attribute_scores: np.ndarray  # (n,) float32
    image_size: tuple[int, int]  # (width, height)
    object_names: list[str] | None = None
    attribute_names: list[str] | None = None

    def labels(self) -> list[str]:
        """'red umbrella'-style labels (attribute + object) when the vocabulary is known."""
        if self.object_names is None or self.attribute_names is None:
            return [f"obj{o}" for o in self.object_ids]
        return [f"{a} {o}" for a, o in zip(self.attribute_names, self.object_names)]


def postprocess(
    raw: RawOutputs,
    prepared: Prepared,
    config: BottomUpConfig,
    vocab: Vocabulary | None = None,
    confidence: torch.Tensor | None = None,
) -> Detections:
    """Final box selection for one image and mapping back to the original image.

    ``confidence``: the per-class-NMS confidences of the proposals when already computed for the
    batch (:func:`batch_confidence`).
    """
    h, w = prepared.resized_hw
    class_probs = raw.class_logits.softmax(dim=-1)[:, :-1]  # (R, C) background (last) dropped
    # Attribute probabilities: softmax over the attributes without the "no attribute" column.
    attr_probs, attr_ids = raw.attr_logits[:, :-1].softmax(dim=-1).max(dim=-1)  # (R,)
    if config.selection == "bottom-up":
        sel = B.select_bottom_up(
            original_boxes(raw, prepared), class_probs, config.nms_thresh, config.conf_thresh, config.min_boxes,
            config.max_boxes, confidence,
        )
        boxes = sel.boxes
    else:
        class_boxes = B.apply_deltas(raw.box_deltas, raw.proposals, config.bbox_reg_weights)  # (R, 4C)
        sel = B.select_hf_demo(class_boxes, class_probs, h, w, config.hf_nms_threshs, config.min_boxes, config.max_boxes)
        boxes = B.to_original(sel.boxes, prepared.original_hw, prepared.resized_hw)
    obj = sel.object_ids.cpu().numpy().astype(np.int64)
    att = attr_ids[sel.index].cpu().numpy().astype(np.int64)
    return Detections(
        features=raw.features[sel.index].cpu().numpy().astype(np.float32),
        boxes=boxes.cpu().numpy().astype(np.float32),
        object_ids=obj,
        object_scores=sel.object_scores.cpu().numpy().astype(np.float32),
        attribute_ids=att,
        attribute_scores=attr_probs[sel.index].cpu().numpy().astype(np.float32),
        image_size=(prepared.original_hw[1], prepared.original_hw[0]),
        object_names=[vocab.objects[i] for i in obj] if vocab else None,
        attribute_names=[vocab.attributes[i] for i in att] if vocab else None,
    )


def original_boxes(raw: RawOutputs, prepared: Prepared) -> torch.Tensor:
    """The proposals in original-image pixels: ``rois / im_scale`` in float32 as the TSV code
    divides them, or x and y by their own factors when there is no one scale."""
    if prepared.scale is None:
        return B.to_original(raw.proposals, prepared.original_hw, prepared.resized_hw)
    return torch.from_numpy(T.to_original(raw.proposals.float().cpu().numpy(), prepared.scale)).to(raw.proposals.device)


def batch_confidence(raws: Sequence[RawOutputs], nms_thresh: float, prepared: Sequence[Prepared] | None = None) -> list[torch.Tensor]:
    """Per-class-NMS confidences of every image's proposals in one batched pass (padded to the longest).

    ``prepared``: the images' sizes, to measure overlaps in original-image pixels as the TSV rule
    does (without: in the pixels of the proposals).
    """
    longest = max(len(r.proposals) for r in raws)
    boxes = raws[0].proposals.new_zeros(len(raws), longest, 4)
    probs = raws[0].class_logits.new_full((len(raws), longest, raws[0].class_logits.shape[1] - 1), -1.0)
    for i, r in enumerate(raws):
        boxes[i, : len(r.proposals)] = r.proposals if prepared is None else original_boxes(r, prepared[i])
        probs[i, : len(r.proposals)] = r.class_logits.softmax(dim=-1)[:, :-1]
    conf = B.per_class_nms_confidence(boxes, probs, nms_thresh, [len(r.proposals) for r in raws])  # (N, longest)
    return [conf[i, : len(r.proposals)] for i, r in enumerate(raws)]


@torch.no_grad()
def detect(
    detector: BottomUpDetector,
    images: Sequence[np.ndarray],
    vocab: Vocabulary | None = None,
    config: BottomUpConfig | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> list[Detections]:
    """Detections of a batch of uint8 RGB images, run as one padded batch on the detector's device.

    ``config`` overrides the detector's selection settings (the architecture is the detector's).
    ``autocast_dtype`` (e.g. torch.bfloat16 on a GPU) runs the convolutions in that precision; box
    arithmetic and selection stay float32.
    """
    cfg = (config or detector.config).validate()
    return _detect_prepared(detector, [preprocess(im, cfg) for im in images], cfg, vocab, autocast_dtype)


# ---------------------------------------------------------------------------------------------
# The ``bottom-up`` backbone of ``vqa-align extract``

@dataclass
class Params:
    # A weights file (.bin / .safetensors) or a folder holding one plus the two vocabulary files;
    # default: the folder `vqa-align extract --download --backbone bottom-up` fills.
    weights: str | None = None
    mode: str = "adaptive"  # "adaptive": conf >= conf_thresh, min_boxes..max_boxes; "fixed": `boxes` boxes
    boxes: int = 36  # fixed mode: boxes per image (the 36-box TSV flavour)
    min_boxes: int = 10
    max_boxes: int = 100
    conf_thresh: float = 0.2
    min_size: int | None = None  # shortest side after resizing (None: 600 for bottom-up, 800 for hf-demo)
    max_size: int | None = None  # longest side at most (None: 1000 for bottom-up, 1333 for hf-demo)
    proposals: int = 300  # RPN proposals kept after NMS (boxes are chosen among them)
    selection: str = "bottom-up"  # or "hf-demo" (the Hugging Face LXMERT demo's rule)

    def __post_init__(self) -> None:
        # Record the sizes used (stores compare parameters), and give the parser their type.
        tsv = self.selection == "bottom-up"
        self.min_size = self.min_size if self.min_size is not None else (T.TSV_MIN_SIZE if tsv else HF_MIN_SIZE)
        self.max_size = self.max_size if self.max_size is not None else (T.TSV_MAX_SIZE if tsv else HF_MAX_SIZE)

    def config(self) -> BottomUpConfig:
        if self.mode not in ("adaptive", "fixed"):
            raise UserError(f"backbone bottom-up: mode {self.mode!r} is not 'adaptive' or 'fixed'")
        lo, hi = (self.boxes, self.boxes) if self.mode == "fixed" else (self.min_boxes, self.max_boxes)
        return BottomUpConfig(
            min_size=self.min_size, max_size=self.max_size, post_nms_topk=self.proposals,
            selection=self.selection,  # type: ignore[arg-type]
            conf_thresh=self.conf_thresh, min_boxes=lo, max_boxes=hi,
        ).validate()


class Preprocess:
    """PIL RGB image -> :class:`Prepared` (picklable, no weights; runs in DataLoader workers)."""

    def __init__(self, config: BottomUpConfig):
        self.config = config

    def __call__(self, image) -> Prepared:  # PIL.Image.Image
        return preprocess(np.asarray(image.convert("RGB"), dtype=np.uint8), self.config)


@torch.no_grad()
def _detect_prepared(
    detector: BottomUpDetector,
    prepared: Sequence[Prepared],
    cfg: BottomUpConfig,
    vocab: Vocabulary | None,
    autocast_dtype: torch.dtype | None,
) -> list[Detections]:
    device = next(detector.parameters()).device
    batch = batch_images(prepared).to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        raws = detector(batch, [p.resized_hw for p in prepared], [p.scale for p in prepared])
    confs: list[torch.Tensor | None] = [None] * len(raws)
    if cfg.selection == "bottom-up" and len(raws) > 1:
        confs = list(batch_confidence(raws, cfg.nms_thresh, prepared))
    return [postprocess(r, p, cfg, vocab, c) for r, p, c in zip(raws, prepared, confs)]


class BottomUp(Backbone):
    name = "bottom-up"
    Params = Params
    summary = "bottom-up-attention VG Faster R-CNN: 10-100 (or 36) boxes, 2048-d + object/attribute labels"
    source_param = "weights"

    def __init__(self, params: Params, device: torch.device | str = "cpu") -> None:
        super().__init__(params, device)
        self.config = params.config()
        path = weights_file(params.weights)
        self.detector = BottomUpDetector.from_file(path, self.config).to(self.device)
        self._sha = sha256_of_file(path)
        self._source = str(path)
        folder = path.parent
        self.vocab = None
        if (folder / OBJECTS_VOCAB).is_file() and (folder / ATTRIBUTES_VOCAB).is_file():
            self.vocab = load_vocabulary(folder / OBJECTS_VOCAB, folder / ATTRIBUTES_VOCAB, self.config)

    @classmethod
    def missing(cls, params: Params) -> Missing | None:
        path = weights_file(params.weights)
        if not path.is_file():
            fix = "vqa-align extract --download --backbone bottom-up"
            if params.weights:
                fix += f" --weights-dir {params.weights}"
            return Missing(f"the bottom-up weights {path} are not on this machine", fix)
        return None

    @classmethod
    def download(cls, params: Params, dest: Path | None) -> Path | None:  # pragma: no cover - internet
        folder = Path(dest) if dest else (Path(params.weights) if params.weights else default_weights_dir())
        download_bottom_up(folder)
        return folder

    def preprocessor(self):
        return Preprocess(self.config)

    def extract(self, inputs: list[Prepared], sizes: list[tuple[int, int]]) -> list[ImageRegions]:
        # Boxes go back to the sizes given (the original files), even if the pictures were
        # downscaled before preprocessing: only the aspect ratio must agree.
        # The TSV rule's one scale holds only for the size it was computed for.
        prepared = [Prepared(p.pixels, p.resized_hw, (h, w), p.scale if p.original_hw == (h, w) else None)
                    for p, (w, h) in zip(inputs, sizes)]
        dets = _detect_prepared(self.detector, prepared, self.config, self.vocab, self.autocast_dtype())
        return [ImageRegions(d.features, d.boxes, d.labels() if self.vocab else None) for d in dets]

    @property
    def info(self) -> ExtractorInfo:
        params = {k: v for k, v in self.params.__dict__.items() if k != "weights"}
        return ExtractorInfo(self.name, params, self._sha, FEATURE_DIM, self._source)


BACKBONE = BottomUp
