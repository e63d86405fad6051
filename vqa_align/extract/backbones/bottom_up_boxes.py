"""Box arithmetic and box selection of the bottom-up-attention detector, as pure functions.

Everything here works on plain tensors (boxes are ``x1, y1, x2, y2`` in pixels, float32) so it is
tested on constructed inputs; ``bottom_up.py`` holds the network that produces them.

Pipeline of one image (where each function sits):

1. :func:`resized_shape` — the test-time resize rule of the HF demo (shortest side to ``min_size``,
   longest at most ``max_size``; the TSV rule's is ``bottom_up_tsv.tsv_scale``).
2. :func:`cell_anchors`, :func:`grid_anchors` — RPN anchors over the stride-16 res4 map.
3. :func:`apply_deltas` — anchors + RPN deltas -> proposals; proposals + class deltas -> boxes.
4. :func:`select_proposals` — top-k by objectness, clip, drop empty boxes, NMS, keep the best k
   (the HF demo's order; the TSV rule's proposal layer is ``bottom_up_tsv.tsv_proposals``).
5. Final boxes, two rules:
   - :func:`select_bottom_up` — the rule of bottom-up attention's feature TSVs (``generate_tsv.py``):
     per-class Caffe NMS (:func:`caffe_overlaps`) over the proposals in original-image pixels, a
     box's confidence is its best surviving class score, keep those >= a threshold (proposal
     order), at least ``min_boxes`` and at most ``max_boxes`` (10-100 adaptive; 36-36 fixed).
   - :func:`select_hf_demo` — the rule of the Hugging Face LXMERT demo: class-agnostic NMS over
     each proposal's best-class regressed box, trying NMS thresholds in turn until at least
     ``min_boxes`` survive, at most ``max_boxes`` kept.
6. :func:`to_original` — boxes of the resized image back to the original image's pixels, x and y
   each by its own factor (HF demo; the TSV divides by its one scale: ``bottom_up_tsv.to_original``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import clip_boxes_to_image, nms

from vqa_align.extract.backbones.bottom_up_tsv import class_orders, tsv_keep

# Deltas dw, dh are clamped so that exp() cannot blow up: no box grows more than 1000/16 times
# (a 16-pixel anchor to a 1000-pixel box), the Detectron/bottom-up-attention convention.
SCALE_CLAMP = math.log(1000.0 / 16)
WORD_BITS = 64  # boxes per int64 word of a suppression bit mask


def resized_shape(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """(new_height, new_width): shortest side -> ``min_size`` unless the longest would pass ``max_size``.

    Sides are rounded half up (``int(x + 0.5)``), as Detectron's ResizeShortestEdge does.
    """
    scale = min_size / min(height, width)
    new_h, new_w = height * scale, width * scale
    if max(new_h, new_w) > max_size:
        shrink = max_size / max(new_h, new_w)
        new_h, new_w = new_h * shrink, new_w * shrink
    return int(new_h + 0.5), int(new_w + 0.5)


def cell_anchors(sizes: tuple[float, ...], aspect_ratios: tuple[float, ...]) -> torch.Tensor:
    """(len(sizes) * len(aspect_ratios), 4) anchors centred on 0, size-major order.

    An anchor of size s and ratio r (= h / w) has area s^2: w = sqrt(s^2 / r), h = r * w.
    """
    rows = []
    for size in sizes:
        for ratio in aspect_ratios:
            w = math.sqrt(size * size / ratio)
            h = ratio * w
            rows.append([-w / 2, -h / 2, w / 2, h / 2])
    return torch.tensor(rows, dtype=torch.float32)


def grid_anchors(cells: torch.Tensor, height: int, width: int, stride: int, offset: float = 0.0) -> torch.Tensor:
    """(height * width * A, 4) anchors of a feature map: cell anchors shifted to every map position.

    Order: row y, then column x, then anchor a — the order of the RPN outputs after
    ``(A, H, W) -> (H, W, A)``.
    """
    device = cells.device
    xs = torch.arange(width, device=device, dtype=torch.float32) * stride + offset * stride  # (W,)
    ys = torch.arange(height, device=device, dtype=torch.float32) * stride + offset * stride  # (H,)
    shift_y, shift_x = torch.meshgrid(ys, xs, indexing="ij")  # (H, W) each
    shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=-1).reshape(-1, 1, 4)  # (H*W, 1, 4)
    return (shifts + cells.to(torch.float32).reshape(1, -1, 4)).reshape(-1, 4)


def apply_deltas(deltas: torch.Tensor, boxes: torch.Tensor, weights: tuple[float, float, float, float]) -> torch.Tensor:
    """Faster R-CNN box decoding: (N, 4k) deltas (dx, dy, dw, dh per class) on (N, 4) boxes -> (N, 4k).

    Centre moves by dx * width / wx; size scales by exp(dw / ww) (dw clamped to ``SCALE_CLAMP``).
    Widths are x2 - x1 (no +1: the Detectron2 convention of this conversion).
    """
    boxes = boxes.to(deltas.dtype)
    widths = boxes[:, 2] - boxes[:, 0]  # (N,)
    heights = boxes[:, 3] - boxes[:, 1]
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx = deltas[:, 0::4] / wx  # (N, k)
    dy = deltas[:, 1::4] / wy
    dw = (deltas[:, 2::4] / ww).clamp(max=SCALE_CLAMP)
    dh = (deltas[:, 3::4] / wh).clamp(max=SCALE_CLAMP)
    pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
    pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
    pred_w = torch.exp(dw) * widths[:, None]
    pred_h = torch.exp(dh) * heights[:, None]
    out = torch.stack(
        (pred_ctr_x - 0.5 * pred_w, pred_ctr_y - 0.5 * pred_h, pred_ctr_x + 0.5 * pred_w, pred_ctr_y + 0.5 * pred_h),
        dim=-1,
    )  # (N, k, 4)
    return out.reshape(deltas.shape)


def select_proposals(
    proposals: torch.Tensor,
    logits: torch.Tensor,
    height: int,
    width: int,
    pre_nms_topk: int,
    post_nms_topk: int,
    nms_thresh: float,
    min_size: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RPN proposals of one image: (P, 4) boxes, (P,) objectness logits -> (k, 4), (k,), best first.

    The ``pre_nms_topk`` highest logits are kept, clipped to the image, boxes with a side <=
    ``min_size`` dropped, NMS at ``nms_thresh``, and the best ``post_nms_topk`` kept.
    """
    order = torch.sort(logits, descending=True).indices[:pre_nms_topk]  # (k0,)
    boxes = clip_boxes_to_image(proposals[order], (height, width))
    scores = logits[order]
    nonempty = ((boxes[:, 2] - boxes[:, 0]) > min_size) & ((boxes[:, 3] - boxes[:, 1]) > min_size)
    boxes, scores = boxes[nonempty], scores[nonempty]
    keep = nms(boxes, scores, nms_thresh)[:post_nms_topk]  # indices, best first
    return boxes[keep], scores[keep]


def caffe_overlaps(boxes: torch.Tensor) -> torch.Tensor:
    """(N, R, 4) float32 boxes -> (N, R, R) float32 overlaps of Caffe's ``cpu_nms``.

    Widths and heights are ``x2 - x1 + 1``; every step is one float32 operation in the order of
    the Cython code, so the values equal its own bit for bit (and the matrix is symmetric).
    """
    x1, y1, x2, y2 = boxes.float().unbind(-1)  # (N, R) each
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    w = (torch.minimum(x2[:, :, None], x2[:, None, :]) - torch.maximum(x1[:, :, None], x1[:, None, :]) + 1).clamp(min=0)
    h = (torch.minimum(y2[:, :, None], y2[:, None, :]) - torch.maximum(y1[:, :, None], y1[:, None, :]) + 1).clamp(min=0)
    inter = w * h  # (N, R, R)
    return inter / (areas[:, :, None] + areas[:, None, :] - inter)


def per_class_nms_confidence(
    boxes: torch.Tensor, class_scores: torch.Tensor, iou_thresh: float, lengths: list[int] | None = None
) -> torch.Tensor:
    """(R,) best score of each box over the classes for which the box survives per-class NMS.

    ``boxes`` (R, 4) are shared by all classes (the proposals, in original-image pixels),
    ``class_scores`` (R, C). Per class, Caffe's ``cpu_nms``: boxes in ``scores.argsort()[::-1]``
    order (NumPy's, ties included), a box is kept unless a kept box overlaps it by ``>=
    iou_thresh`` (:func:`caffe_overlaps`, compared in double); confidence[r] = max over classes
    where r is kept of class_scores[r, c], and 0 if none (``max_conf`` of generate_tsv.py). All
    classes run at once: one greedy step per rank, vectorised over classes (a box suppressed after
    it was kept stays kept, as in the sequential loop, which only looks at later boxes).
    A leading batch dimension is allowed, (N, R, 4) and (N, R, C) -> (N, R), with ``lengths`` the
    real box count of each image (padding at the end of every class order decides nothing).
    Slow obvious version (the Cython loop, one class at a time): tests/test_bottom_up_tsv.py.
    """
    if boxes.dim() == 2:
        return per_class_nms_confidence(boxes[None], class_scores[None], iou_thresh)[0]
    num_images, num_boxes, num_classes = class_scores.shape
    if num_boxes == 0:
        return class_scores.new_zeros(num_images, 0)
    lengths = lengths or [num_boxes] * num_images
    overlaps = caffe_overlaps(boxes).double() >= iou_thresh  # (N, R, R)
    scores_np = class_scores.float().cpu().numpy()
    orders = np.empty((num_images, num_classes, num_boxes), dtype=np.int64)
    for i, n in enumerate(lengths):  # sort each image's own boxes, as the original sorts them
        orders[i, :, :n] = class_orders(scores_np[i, :n])
        orders[i, :, n:] = np.arange(n, num_boxes)
    order = torch.from_numpy(orders).to(boxes.device)  # (N, C, R)
    # Suppression sets as bit masks (64 boxes per int64 word): each greedy step touches C words
    # per image instead of C x R flags, which is what makes 300 steps x 1,600 classes cheap.
    words = -(-num_boxes // WORD_BITS)
    packed = pack_bits(overlaps).reshape(num_images * num_boxes, words)  # (N*R, words)
    suppressed = torch.zeros(num_images, num_classes, words, dtype=torch.long, device=boxes.device)
    kept = torch.zeros(num_images, num_classes, num_boxes, dtype=torch.bool, device=boxes.device)
    row_of_image = (torch.arange(num_images, device=boxes.device) * num_boxes)[:, None]  # (N, 1)
    for rank in range(num_boxes):
        candidate = order[:, :, rank]  # (N, C) the box each class looks at now
        word = suppressed.gather(2, (candidate // WORD_BITS)[..., None])[..., 0]  # (N, C)
        keep_now = ((word >> (candidate % WORD_BITS)) & 1) == 0
        kept.scatter_(2, candidate[..., None], keep_now[..., None])
        rows = packed.index_select(0, (candidate + row_of_image).reshape(-1)).view(num_images, num_classes, words)
        suppressed |= torch.where(keep_now[..., None], rows, torch.zeros_like(rows))
    confidence = torch.where(kept.transpose(1, 2), class_scores, torch.zeros_like(class_scores))  # (N, R, C)
    return confidence.max(dim=2).values.clamp(min=0)


def pack_bits(flags: torch.Tensor) -> torch.Tensor:
    """(..., R) bool -> (..., ceil(R / 64)) int64 whose bit b of word w is flags[..., 64 w + b]."""
    words = -(-flags.shape[-1] // WORD_BITS)
    padded = flags.new_zeros(*flags.shape[:-1], words * WORD_BITS)
    padded[..., : flags.shape[-1]] = flags
    padded = padded.view(*flags.shape[:-1], words, WORD_BITS).long()
    out = torch.zeros(*flags.shape[:-1], words, dtype=torch.long, device=flags.device)
    for bit in range(WORD_BITS):
        out |= padded[..., bit] << bit
    return out


def keep_by_confidence(confidence: torch.Tensor, threshold: float, min_boxes: int, max_boxes: int) -> torch.Tensor:
    """Indices of the boxes kept by generate_tsv.py's rule (:func:`bottom_up_tsv.tsv_keep`): those
    with confidence >= threshold in proposal order, or, when fewer than ``min_boxes`` / more than
    ``max_boxes`` pass, that many of the most confident, most confident first.
    """
    keep = tsv_keep(confidence.double().cpu().numpy(), threshold, min_boxes, max_boxes)
    return torch.from_numpy(keep).to(confidence.device)


@dataclass
class Selection:
    """The boxes kept for one image (in the pixels of the boxes given); indices point into the proposals."""

    index: torch.Tensor  # (n,) long: which proposals (and so which pooled features) are kept
    boxes: torch.Tensor  # (n, 4)
    object_ids: torch.Tensor  # (n,) long, 0..num_classes-1 (background excluded)
    object_scores: torch.Tensor  # (n,)


def select_bottom_up(
    proposals: torch.Tensor,
    class_probs: torch.Tensor,
    nms_thresh: float,
    conf_thresh: float,
    min_boxes: int,
    max_boxes: int,
    confidence: torch.Tensor | None = None,
) -> Selection:
    """The feature-TSV rule of bottom-up attention on one image.

    ``proposals`` (R, 4) are the boxes whose features were pooled, in original-image pixels (where
    the TSV code measures overlaps: ``rois / im_scale``); ``class_probs`` (R, C) the object-class
    softmax without the background column. Boxes returned are the proposals themselves (the TSVs
    store the RoIs, whose features they are), in the order generate_tsv.py writes them. Object = the best class of the box; its score
    is that class's probability. ``confidence`` (R,) may be given when computed for a whole batch.
    """
    if confidence is None:
        confidence = per_class_nms_confidence(proposals, class_probs, nms_thresh)  # (R,)
    index = keep_by_confidence(confidence, conf_thresh, min_boxes, max_boxes)
    scores, ids = class_probs[index].max(dim=1)
    return Selection(index=index, boxes=proposals[index], object_ids=ids, object_scores=scores)


def select_hf_demo(
    class_boxes: torch.Tensor,
    class_probs: torch.Tensor,
    height: int,
    width: int,
    nms_threshs: tuple[float, ...],
    min_boxes: int,
    max_boxes: int,
) -> Selection:
    """The rule of the Hugging Face LXMERT demo on one image.

    ``class_boxes`` (R, 4C) regressed boxes per class, ``class_probs`` (R, C) without background.
    Each proposal keeps only its best class and that class's box (clipped to the image); NMS over
    these boxes regardless of class at each threshold in turn until at least ``min_boxes`` survive;
    at most ``max_boxes`` are kept. If no threshold gives ``min_boxes``, the last one's boxes are
    kept (fewer than ``min_boxes``).
    """
    num_classes = class_probs.shape[1]
    boxes = clip_boxes_to_image(class_boxes.reshape(-1, num_classes, 4), (height, width))  # (R, C, 4)
    scores, ids = class_probs.max(dim=1)  # (R,)
    best_boxes = boxes[torch.arange(boxes.shape[0], device=boxes.device), ids]  # (R, 4)
    keep = best_boxes.new_zeros(0, dtype=torch.long)
    for thresh in nms_threshs:
        keep = nms(best_boxes, scores, thresh)[:max_boxes]
        if keep.numel() >= min_boxes:
            break
    return Selection(index=keep, boxes=best_boxes[keep], object_ids=ids[keep], object_scores=scores[keep])


def to_original(boxes: torch.Tensor, original_hw: tuple[int, int], resized_hw: tuple[int, int]) -> torch.Tensor:
    """(n, 4) boxes in the resized image's pixels -> the original image's pixels (x by W/w, y by H/h)."""
    scale_y = original_hw[0] / resized_hw[0]
    scale_x = original_hw[1] / resized_hw[1]
    scale = boxes.new_tensor([scale_x, scale_y, scale_x, scale_y])
    return boxes * scale
