"""Test-time settings of the bottom-up-attention detector (``bottom_up.BottomUpDetector``), apart
so that the network's layers (bottom_up_net.py) and the detector read them without importing each
other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vqa_align.errors import UserError
from vqa_align.extract.backbones import bottom_up_tsv as T

HF_MIN_SIZE, HF_MAX_SIZE = 800, 1333  # the HF demo's INPUT.MIN_SIZE_TEST, MAX_SIZE_TEST


@dataclass
class BottomUpConfig:
    """Test-time settings; the defaults are those of the published model (docs/extract.md)."""

    # Preprocessing: shortest side -> min_size, longest <= max_size; BGR, mean-subtracted, std 1.
    # None: the selection's own (bottom-up: the TSV's 600 / 1000; hf-demo: 800 / 1333).
    min_size: int | None = None
    max_size: int | None = None
    pixel_mean_bgr: tuple[float, float, float] = (102.9801, 115.9465, 122.7717)
    # Architecture (fixed by the weights).
    num_classes: int = 1600
    num_attributes: int = 400
    anchor_sizes: tuple[float, ...] = (64, 128, 256, 512)
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_hidden: int = 512
    pool_size: int = 14
    bbox_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    bn_eps: float = 1e-5
    # RPN at test time.
    pre_nms_topk: int = 6000
    post_nms_topk: int = 300
    rpn_nms_thresh: float = 0.7
    rpn_min_size: float | None = None  # None: bottom-up 16 px (original image, +1 sides), hf-demo 0
    # Final boxes: "bottom-up" = the feature TSVs' rule (adaptive: 0.2, 10..100; fixed: 36..36);
    # "hf-demo" = the Hugging Face LXMERT demo's rule (used to compare against it).
    selection: Literal["bottom-up", "hf-demo"] = "bottom-up"
    conf_thresh: float = 0.2
    nms_thresh: float = 0.3  # per-class NMS of the "bottom-up" rule
    hf_nms_threshs: tuple[float, ...] = (0.5, 0.6, 0.7)  # tried in turn by the "hf-demo" rule
    min_boxes: int = 10
    max_boxes: int = 100

    def __post_init__(self) -> None:
        tsv = self.selection == "bottom-up"
        if self.min_size is None:
            self.min_size = T.TSV_MIN_SIZE if tsv else HF_MIN_SIZE
        if self.max_size is None:
            self.max_size = T.TSV_MAX_SIZE if tsv else HF_MAX_SIZE
        if self.rpn_min_size is None:
            self.rpn_min_size = float(T.TSV_RPN_MIN_SIZE if tsv else 0)

    def validate(self) -> "BottomUpConfig":
        if self.selection not in ("bottom-up", "hf-demo"):
            raise UserError(f"bottom-up selection: {self.selection!r} is not 'bottom-up' or 'hf-demo'")
        if not 1 <= self.min_boxes <= self.max_boxes:
            raise UserError(f"bottom-up boxes: need 1 <= min_boxes <= max_boxes, got {self.min_boxes}, {self.max_boxes}")
        if not 0 < self.min_size <= self.max_size:
            raise UserError(f"bottom-up image size: need 0 < min_size <= max_size, got {self.min_size}, {self.max_size}")
        return self

    @classmethod
    def fixed(cls, count: int = 36, **kw) -> "BottomUpConfig":
        """The fixed-count flavour (e.g. the 36-box TSVs)."""
        return cls(min_boxes=count, max_boxes=count, **kw).validate()
