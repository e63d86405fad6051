"""The feature-TSV rule of bottom-up attention, in the arithmetic of the code that made the TSVs.

The region features most published VQA v2 models read (BUTD, MCAN, OpenVQA) were written by
``tools/generate_tsv.py`` of peteanderson80/bottom-up-attention (Caffe, ``USE_GPU_NMS: False``).
Everything here that decides which boxes are kept, and where they are, follows that code step by
step (docs/extract.md, "The bottom-up (TSV) rule", cites file and line for each):

1. :func:`tsv_preprocess` — ``_get_image_blob`` (lib/fast_rcnn/test.py): mean subtracted *before*
   resizing, in float64 then stored float32; one scale ``600 / shortest side`` unless
   ``round(scale * longest) > 1000``; OpenCV ``cv2.resize(fx=fy=scale, INTER_LINEAR)``
   (:func:`cv2_resize_linear`, a transcription: OpenCV is not needed).
2. :func:`tsv_proposals` — ``ProposalLayer.forward`` (lib/rpn/proposal_layer.py): decode, clip to
   ``[0, w - 1]``, drop boxes narrower or lower than ``16 * scale`` (``+1`` widths), sort by the
   foreground probability, the best 6000, :func:`caffe_nms` at 0.7, the best 300.
3. :func:`caffe_nms` — ``cpu_nms`` (lib/nms/cpu_nms.pyx): ``+1`` widths, float32 overlap, suppress
   at overlap ``>=`` the threshold.
4. Final boxes (``get_detections_from_im``): per-class NMS at 0.3 on the proposals in original-image
   pixels (``bottom_up_boxes.per_class_nms_confidence``), then :func:`tsv_keep`.

Sorting goes through NumPy's ``argsort`` exactly as the original calls it, so equal scores are
ordered as NumPy orders them there.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

TSV_MIN_SIZE, TSV_MAX_SIZE = 600, 1000  # cfg.TEST.SCALES, cfg.TEST.MAX_SIZE (lib/fast_rcnn/config.py)
TSV_RPN_MIN_SIZE = 16  # cfg.TEST.RPN_MIN_SIZE: proposal sides in original-image pixels
AREA_FAST_FACTOR = 2  # OpenCV resizes by exactly 1/2 with its INTER_AREA code, even for INTER_LINEAR


# ---------------------------------------------------------------------------------------------
# Preprocessing (_get_image_blob)


def tsv_scale(height: int, width: int, min_size: int, max_size: int) -> tuple[float, tuple[int, int]]:
    """(scale, (new_height, new_width)) as ``_get_image_blob`` and ``cv2.resize`` compute them.

    The scale is one number for both axes; the longest side is tested with NumPy's ``round``
    (half to even), and OpenCV rounds the new sides the same way (``cvRound``).
    """
    scale = float(min_size) / float(min(height, width))
    if round(scale * max(height, width)) > max_size:
        scale = float(max_size) / float(max(height, width))
    return scale, (round(height * scale), round(width * scale))


def _linear_taps(out_size: int, in_size: int, scale: float, clamp_weights: bool):
    """Source indices and weights of OpenCV's INTER_LINEAR along one axis (output pixel -> 2 taps).

    OpenCV maps with ``1 / fx`` (not in/out), computes ``(d + 0.5) / fx - 0.5`` in double and stores
    it as float. Along x a tap outside the image sets the weight to (1, 0); along y the rows are only
    clipped and the weights kept (OpenCV's ``resizeGeneric_`` does exactly this).
    """
    pos = ((np.arange(out_size, dtype=np.float64) + 0.5) * (1.0 / scale) - 0.5).astype(np.float32)
    first = np.floor(pos).astype(np.int64)
    frac = pos - first.astype(np.float32)  # float32, as OpenCV's `fx -= sx`
    if clamp_weights:
        low, high = first < 0, first >= in_size - 1
        frac[low | high] = 0
        first[low] = 0
        first[high] = in_size - 1
    i0 = np.clip(first, 0, in_size - 1)
    i1 = np.clip(first + 1, 0, in_size - 1)
    w0 = np.float32(1) - frac
    return torch.from_numpy(i0), torch.from_numpy(i1), torch.from_numpy(w0), torch.from_numpy(frac)


def cv2_resize_linear(image: torch.Tensor, out_hw: tuple[int, int], scale: float) -> torch.Tensor:
    """``cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)`` on float32.

    ``image`` (C, H, W) float32 -> (C, h, w): a horizontal pass then a vertical pass, each
    ``a * w0 + b * w1`` in float32 (OpenCV's order; builds that fuse it into an FMA differ in the
    last bit). An exact halving takes OpenCV's INTER_AREA path: the mean of 2 x 2 pixels.
    """
    height, width = image.shape[-2:]
    out_h, out_w = out_hw
    if abs(1.0 / scale - AREA_FAST_FACTOR) < sys.float_info.epsilon:  # OpenCV's `is_area_fast` test
        blocks = image[:, : 2 * out_h, : 2 * out_w]
        a, b = blocks[:, 0::2, 0::2], blocks[:, 0::2, 1::2]
        c, d = blocks[:, 1::2, 0::2], blocks[:, 1::2, 1::2]
        return (((a + b) + c) + d) * np.float32(0.25)
    x0, x1, wx0, wx1 = _linear_taps(out_w, width, scale, clamp_weights=True)
    y0, y1, wy0, wy1 = _linear_taps(out_h, height, scale, clamp_weights=False)
    rows = image[:, :, x0] * wx0 + image[:, :, x1] * wx1  # (C, H, w)
    return rows[:, y0, :] * wy0[:, None] + rows[:, y1, :] * wy1[:, None]  # (C, h, w)


def tsv_preprocess(
    rgb: np.ndarray, min_size: int, max_size: int, mean_bgr: tuple[float, float, float]
) -> tuple[torch.Tensor, tuple[int, int], float]:
    """uint8 RGB (H, W, 3) -> ((3, h, w) float32 BGR network input, (h, w), scale).

    As ``_get_image_blob``: ``im.astype(float32) -= PIXEL_MEANS`` subtracts the float64 means in
    float64 and stores float32; the resize comes after.
    """
    bgr = rgb[:, :, ::-1].astype(np.float64) - np.asarray(mean_bgr, dtype=np.float64)  # (H, W, 3)
    pixels = torch.from_numpy(np.ascontiguousarray(bgr.astype(np.float32).transpose(2, 0, 1)))
    scale, out_hw = tsv_scale(rgb.shape[0], rgb.shape[1], min_size, max_size)
    return cv2_resize_linear(pixels, out_hw, scale), out_hw, scale


# ---------------------------------------------------------------------------------------------
# Proposals (ProposalLayer.forward) and the Caffe NMS (cpu_nms)


def foreground_prob(logits: np.ndarray) -> np.ndarray:
    """Caffe's two-way softmax (background, foreground) in float32 for one objectness logit.

    The conversion keeps one logit per anchor (foreground minus background); with (0, logit) the
    softmax is what Caffe sorted proposals by, saturating to 1.0 (and tying) as it did there.
    """
    logits = logits.astype(np.float32)
    top = np.maximum(np.float32(0), logits)
    e_bg, e_fg = np.exp(-top), np.exp(logits - top)
    return e_fg / (e_bg + e_fg)


def caffe_nms(boxes: np.ndarray, scores: np.ndarray, thresh: float, max_keep: int | None = None) -> np.ndarray:
    """Indices kept by ``cpu_nms`` (best first): (n, 4) float32 boxes, (n,) float32 scores.

    Widths and heights are ``x2 - x1 + 1``, the overlap is float32 and a box is suppressed when its
    overlap with a kept one is ``>= thresh`` (compared in double, as the Cython code compares a
    float with a Python float). ``max_keep`` stops early: the first ``max_keep`` are the same.
    """
    boxes = boxes.astype(np.float32, copy=False)
    x1, y1, x2, y2 = (boxes[:, k] for k in range(4))
    one, zero = np.float32(1), np.float32(0)
    areas = (x2 - x1 + one) * (y2 - y1 + one)
    order = scores.astype(np.float32, copy=False).argsort()[::-1]
    suppressed = np.zeros(len(boxes), dtype=bool)
    keep: list[int] = []
    for i in order:
        if suppressed[i]:
            continue
        keep.append(int(i))
        if max_keep is not None and len(keep) >= max_keep:
            break
        w = np.maximum(zero, np.minimum(x2[i], x2) - np.maximum(x1[i], x1) + one)
        h = np.maximum(zero, np.minimum(y2[i], y2) - np.maximum(y1[i], y1) + one)
        inter = w * h
        overlap = inter / (areas[i] + areas - inter)  # (n,) float32
        suppressed |= overlap.astype(np.float64) >= thresh
    return np.asarray(keep, dtype=np.int64)


def decode_proposals(anchors: np.ndarray, deltas: np.ndarray) -> np.ndarray:
    """``bbox_transform_inv`` in float32, without a clamp on dw, dh (the test-time code has none).

    Widths are ``x2 - x1`` of the anchors as the weights file stores them (the conversion's
    convention: a Caffe anchor ``x1..x2`` inclusive is ``x1, x2 + 1`` there, which gives Caffe's
    ``x2 - x1 + 1``).
    """
    anchors = anchors.astype(np.float32)
    deltas = deltas.astype(np.float32)
    widths = anchors[:, 2] - anchors[:, 0]
    heights = anchors[:, 3] - anchors[:, 1]
    ctr_x = anchors[:, 0] + np.float32(0.5) * widths
    ctr_y = anchors[:, 1] + np.float32(0.5) * heights
    pred_ctr_x = deltas[:, 0] * widths + ctr_x
    pred_ctr_y = deltas[:, 1] * heights + ctr_y
    pred_w = np.exp(deltas[:, 2]) * widths
    pred_h = np.exp(deltas[:, 3]) * heights
    half = np.float32(0.5)
    return np.stack([pred_ctr_x - half * pred_w, pred_ctr_y - half * pred_h,
                     pred_ctr_x + half * pred_w, pred_ctr_y + half * pred_h], axis=1)


def rpn_outputs(logits: torch.Tensor, deltas: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(A, h, w) logits, (4A, h, w) deltas of one image -> (h*w*A, 4) deltas, (h*w*A,) logits, float32
    NumPy, rows in (row, column, anchor) order as the proposal layer transposes them."""
    a, h, w = logits.shape
    moves = deltas.reshape(a, 4, h, w).permute(2, 3, 0, 1).reshape(-1, 4)
    return moves.float().cpu().numpy(), logits.permute(1, 2, 0).reshape(-1).float().cpu().numpy()


def tsv_proposals(
    anchors: np.ndarray,
    deltas: np.ndarray,
    logits: np.ndarray,
    image_hw: tuple[int, int],
    scale: float,
    pre_nms_topk: int,
    post_nms_topk: int,
    nms_thresh: float,
    min_size: float,
) -> np.ndarray:
    """RoIs of one image (k, 4) float32, resized-image pixels, in the order Caffe's layer emits them.

    ``anchors``, ``deltas`` (P, 4) and ``logits`` (P,) in (row, column, anchor) order.
    """
    height, width = image_hw
    boxes = decode_proposals(anchors, deltas)
    boxes[:, 0::2] = np.maximum(np.minimum(boxes[:, 0::2], np.float32(width - 1)), np.float32(0))
    boxes[:, 1::2] = np.maximum(np.minimum(boxes[:, 1::2], np.float32(height - 1)), np.float32(0))
    smallest = np.float32(min_size) * np.float32(scale)  # min_size * im_info[2], im_info is float32
    ws = boxes[:, 2] - boxes[:, 0] + np.float32(1)
    hs = boxes[:, 3] - boxes[:, 1] + np.float32(1)
    big = np.where((ws >= smallest) & (hs >= smallest))[0]
    boxes, scores = boxes[big], foreground_prob(logits)[big]
    order = scores.ravel().argsort()[::-1][:pre_nms_topk]
    boxes, scores = boxes[order], scores[order]
    keep = caffe_nms(boxes, scores, nms_thresh, max_keep=post_nms_topk)
    return boxes[keep]


# ---------------------------------------------------------------------------------------------
# Final boxes (get_detections_from_im)


def to_original(rois: np.ndarray, scale: float) -> np.ndarray:
    """``rois / im_scales[0]``: float32 RoIs divided by the float32 scale (NumPy 1.x casting)."""
    return rois.astype(np.float32) / np.float32(scale)


def class_orders(class_scores: np.ndarray) -> np.ndarray:
    """(R, C) scores -> (C, R) per-class NMS order, ``scores.argsort()[::-1]`` as ``cpu_nms`` sorts."""
    columns = np.ascontiguousarray(class_scores.astype(np.float32).T)
    return np.ascontiguousarray(np.argsort(columns, axis=1)[:, ::-1])


def tsv_keep(max_conf: np.ndarray, conf_thresh: float, min_boxes: int, max_boxes: int) -> np.ndarray:
    """Indices of the kept boxes: all with confidence ``>= conf_thresh`` in proposal order; if fewer
    than ``min_boxes`` or more than ``max_boxes`` pass, the most confident ``min_boxes`` /
    ``max_boxes`` instead, most confident first (``np.argsort(max_conf)[::-1]``, float64)."""
    max_conf = np.asarray(max_conf, dtype=np.float64)
    keep = np.where(max_conf >= conf_thresh)[0]
    if len(keep) < min_boxes:
        keep = np.argsort(max_conf)[::-1][:min_boxes]
    elif len(keep) > max_boxes:
        keep = np.argsort(max_conf)[::-1][:max_boxes]
    return np.ascontiguousarray(keep, dtype=np.int64)
