"""The ``bottom-up`` (TSV) rule against a slow, literal transcription of the code that made the TSVs.

The reference below follows peteanderson80/bottom-up-attention line by line — ``_get_image_blob``
and ``get_detections_from_im``'s use of ``im_detect`` (lib/fast_rcnn/test.py, tools/generate_tsv.py),
``ProposalLayer.forward`` and ``generate_anchors`` (lib/rpn/), ``bbox_transform_inv`` / ``clip_boxes``
(lib/fast_rcnn/bbox_transform.py), ``cpu_nms`` (lib/nms/cpu_nms.pyx) and OpenCV's INTER_LINEAR —
written out again here, independently of ``bottom_up_tsv.py``, in NumPy loops. vqa-align's detector
runs on seeded weights whose anchors are Caffe's (``generate_anchors``, stored as the conversion
stores boxes: ``x2 + 1``), and its boxes must be the reference's exactly: same values, same order.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from vqa_align.extract.backbones import bottom_up_boxes as B
from vqa_align.extract.backbones import bottom_up_tsv as T
from vqa_align.extract.backbones.bottom_up import (
    BottomUpConfig,
    BottomUpDetector,
    batch_images,
    detect,
    postprocess,
    preprocess,
)
from vqa_align.extract.backbones.bottom_up_random import random_state_dict

PIXEL_MEANS = np.array([[[102.9801, 115.9465, 122.7717]]])  # cfg.PIXEL_MEANS, BGR


# ------------------------------------------------------------------------------------------------
# The reference: a literal transcription


def ref_cv2_resize(src: np.ndarray, fx: float) -> np.ndarray:
    """cv2.resize(src, None, None, fx=fx, fy=fx, interpolation=INTER_LINEAR) for float32 (H, W, C)."""
    height, width = src.shape[:2]
    out_w, out_h = round(width * fx), round(height * fx)  # cvRound: half to even, like Python's round
    inv = 1.0 / fx  # OpenCV keeps scale_x = 1 / inv_scale_x when the size comes from fx
    taps = []  # per output column: (sx, sx + 1, weights)
    for dx in range(out_w):
        f = np.float32((dx + 0.5) * inv - 0.5)
        sx = int(np.floor(f))
        f = np.float32(f - np.float32(sx))
        if sx < 0:  # columns: OpenCV clamps the weight too
            f, sx = np.float32(0), 0
        if sx >= width - 1:
            f, sx = np.float32(0), width - 1
        taps.append((sx, min(sx + 1, width - 1), np.float32(1) - f, f))
    a, b, wa, wb = (np.array(col) for col in zip(*taps))
    horiz = src[:, a] * wa[None, :, None].astype(np.float32) + src[:, b] * wb[None, :, None].astype(np.float32)
    out = np.empty((out_h, out_w, src.shape[2]), np.float32)
    for dy in range(out_h):
        f = np.float32((dy + 0.5) * inv - 0.5)
        sy = int(np.floor(f))
        f = np.float32(f - np.float32(sy))
        r0, r1 = (horiz[min(max(sy + k, 0), height - 1)] for k in (0, 1))  # rows: clipped, weights kept
        out[dy] = r0 * (np.float32(1) - f) + r1 * f
    return out


def ref_image_blob(rgb: np.ndarray, target: int = 600, max_size: int = 1000) -> tuple[np.ndarray, float]:
    """_get_image_blob on the BGR picture cv2.imread gives: (h, w, 3) float32 blob and the scale."""
    im = rgb[:, :, ::-1]
    im_orig = im.astype(np.float32, copy=True)
    im_orig -= PIXEL_MEANS
    im_size_min, im_size_max = np.min(im_orig.shape[0:2]), np.max(im_orig.shape[0:2])
    im_scale = float(target) / float(im_size_min)
    if np.round(im_scale * im_size_max) > max_size:
        im_scale = float(max_size) / float(im_size_max)
    return ref_cv2_resize(im_orig, im_scale), im_scale


def ref_generate_anchors(base_size=16, ratios=(0.5, 1, 2), scales=(4, 8, 16, 32)) -> np.ndarray:
    """generate_anchors of the prototxt's proposal layer (scales 4..32): (12, 4), inclusive corners."""

    def whctrs(a):
        w, h = a[2] - a[0] + 1, a[3] - a[1] + 1
        return w, h, a[0] + 0.5 * (w - 1), a[1] + 0.5 * (h - 1)

    def mk(ws, hs, cx, cy):
        return np.stack([cx - 0.5 * (ws - 1), cy - 0.5 * (hs - 1), cx + 0.5 * (ws - 1), cy + 0.5 * (hs - 1)], axis=1)

    w, h, cx, cy = whctrs(np.array([1, 1, base_size, base_size]) - 1)
    ws = np.round(np.sqrt(w * h / np.array(ratios)))
    hs = np.round(ws * np.array(ratios))
    out = []
    for ratio_anchor in mk(ws, hs, cx, cy):
        w, h, cx, cy = whctrs(ratio_anchor)
        out.append(mk(w * np.array(scales), h * np.array(scales), cx, cy))
    return np.vstack(out)


def ref_cpu_nms(dets: np.ndarray, thresh: float) -> list[int]:
    """cpu_nms: +1 sides, float32 overlap, suppressed at overlap >= thresh (a double)."""
    x1, y1, x2, y2, scores = (dets[:, k] for k in range(5))
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep = []
    while order.size > 0:
        i, rest = order[0], order[1:]
        keep.append(int(i))
        w = np.maximum(np.float32(0.0), np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + np.float32(1))
        h = np.maximum(np.float32(0.0), np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + np.float32(1))
        inter = w * h
        ovr = inter / (areas[i] + areas[rest] - inter)
        order = rest[~(ovr.astype(np.float64) >= thresh)]  # Cython compares float with a Python float
    return keep


def ref_proposal_layer(cls_prob: np.ndarray, bbox_deltas: np.ndarray, im_info: np.ndarray) -> np.ndarray:
    """ProposalLayer.forward at TEST: (1, A, H, W) fg probabilities, (1, 4A, H, W) deltas -> rois."""
    anchors0 = ref_generate_anchors()
    height, width = cls_prob.shape[-2:]
    shift_x, shift_y = np.meshgrid(np.arange(0, width) * 16, np.arange(0, height) * 16)
    shifts = np.vstack((shift_x.ravel(), shift_y.ravel(), shift_x.ravel(), shift_y.ravel())).transpose()
    anchors = (anchors0.reshape((1, 12, 4)) + shifts.reshape((1, -1, 4)).transpose((1, 0, 2))).reshape((-1, 4))
    deltas = bbox_deltas.transpose((0, 2, 3, 1)).reshape((-1, 4))
    scores = cls_prob.transpose((0, 2, 3, 1)).reshape((-1, 1))
    # bbox_transform_inv
    boxes = anchors.astype(deltas.dtype, copy=False)
    widths = boxes[:, 2] - boxes[:, 0] + 1.0
    heights = boxes[:, 3] - boxes[:, 1] + 1.0
    ctr_x, ctr_y = boxes[:, 0] + 0.5 * widths, boxes[:, 1] + 0.5 * heights
    pred_ctr_x = deltas[:, 0::4] * widths[:, None] + ctr_x[:, None]
    pred_ctr_y = deltas[:, 1::4] * heights[:, None] + ctr_y[:, None]
    pred_w, pred_h = np.exp(deltas[:, 2::4]) * widths[:, None], np.exp(deltas[:, 3::4]) * heights[:, None]
    proposals = np.zeros(deltas.shape, dtype=deltas.dtype)
    proposals[:, 0::4], proposals[:, 1::4] = pred_ctr_x - 0.5 * pred_w, pred_ctr_y - 0.5 * pred_h
    proposals[:, 2::4], proposals[:, 3::4] = pred_ctr_x + 0.5 * pred_w, pred_ctr_y + 0.5 * pred_h
    # clip_boxes(proposals, im_info[:2])
    for k, side in ((0, 1), (1, 0), (2, 1), (3, 0)):
        proposals[:, k::4] = np.maximum(np.minimum(proposals[:, k::4], im_info[side] - 1), 0)
    # _filter_boxes(proposals, RPN_MIN_SIZE * im_info[2])
    min_size = 16 * im_info[2]
    ws, hs = proposals[:, 2] - proposals[:, 0] + 1, proposals[:, 3] - proposals[:, 1] + 1
    keep = np.where((ws >= min_size) & (hs >= min_size))[0]
    proposals, scores = proposals[keep, :], scores[keep]
    order = scores.ravel().argsort()[::-1][:6000]
    proposals, scores = proposals[order, :], scores[order]
    keep = ref_cpu_nms(np.hstack((proposals, scores)), 0.7)[:300]
    return proposals[keep, :].astype(np.float32, copy=False)


def ref_max_conf(rois: np.ndarray, cls_prob: np.ndarray, im_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """get_detections_from_im up to ``max_conf``: (max_conf, cls_boxes); ``cls_prob`` (R, 1601),
    background in column 0."""
    # rois / im_scales[0]: NumPy 1.x (Python 2, when the TSVs were made) divides float32 by a float64
    # scalar in float32; NumPy 2 would give float64, hence the explicit float32 scalar.
    cls_boxes = rois / np.float32(im_scale)
    max_conf = np.zeros((rois.shape[0]))
    for cls_ind in range(1, cls_prob.shape[1]):
        cls_scores = cls_prob[:, cls_ind]
        dets = np.hstack((cls_boxes, cls_scores[:, np.newaxis])).astype(np.float32)
        keep = np.array(ref_cpu_nms(dets, 0.3))
        max_conf[keep] = np.where(cls_scores[keep] > max_conf[keep], cls_scores[keep], max_conf[keep])
    return max_conf, cls_boxes


def ref_keep(max_conf: np.ndarray, conf_thresh=0.2, min_boxes=10, max_boxes=100) -> np.ndarray:
    """The rest of get_detections_from_im: which boxes, in which order."""
    keep_boxes = np.where(max_conf >= conf_thresh)[0]
    if len(keep_boxes) < min_boxes:
        keep_boxes = np.argsort(max_conf)[::-1][:min_boxes]
    elif len(keep_boxes) > max_boxes:
        keep_boxes = np.argsort(max_conf)[::-1][:max_boxes]
    return keep_boxes


# ------------------------------------------------------------------------------------------------
# Fixtures: seeded weights with Caffe's anchors; a cheap stand-in for the trunk and res5


def _photos():
    from skimage import data

    return {"astronaut": data.astronaut(), "chelsea": data.chelsea(), "coffee": data.coffee()}


@pytest.fixture(scope="module")
def photos():
    return _photos()


# The rule does not depend on the number of classes; 200 instead of 1,600 keeps the reference's
# one-NMS-per-class loop short (the slow test runs the real head).
FAST = BottomUpConfig(num_classes=200)


def caffe_weights(config: BottomUpConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    state = random_state_dict(config, seed=seed)
    anchors = torch.from_numpy(ref_generate_anchors()).float()
    anchors[:, 2:] += 1  # the conversion's convention: x2 exclusive (widths x2 - x1)
    state["proposal_generator.anchor_generator.cell_anchors.0"] = anchors
    # Peakier class scores than the random init gives, so that boxes pass 0.2 and classes compete.
    state["roi_heads.box_predictor.cls_score.weight"] *= 400
    return state


def res4_size(height: int, width: int) -> tuple[int, int]:
    """The trunk's res4 map size: conv1 7x7/2 pad 3, max pool 3x3/2 (ceil), two stride-2 1x1 convs."""

    def one(n: int) -> int:
        n = (n + 2 * 3 - 7) // 2 + 1
        n = -(-(n - 3) // 2) + 1
        n = (n - 1) // 2 + 1  # res3
        return (n - 1) // 2 + 1  # res4

    return one(height), one(width)


class _FixedMap(nn.Module):
    """Stands in for the trunk: the same seeded res4 map, cut to the batch's map size (cheap)."""

    def __init__(self, seed: int):
        super().__init__()
        self.map = torch.randn(1, 1024, 80, 80, generator=torch.Generator().manual_seed(seed))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        fh, fw = res4_size(*images.shape[-2:])
        return self.map[:, :, :fh, :fw].expand(len(images), -1, -1, -1).contiguous()


class _Widen(nn.Module):
    """Stands in for res5 (1024 -> 2048 channels) without its cost."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x.square()], dim=1)


@pytest.fixture(scope="module")
def fast_detector() -> BottomUpDetector:
    detector = BottomUpDetector.from_state_dict(caffe_weights(FAST), FAST)
    detector.backbone = _FixedMap(seed=1)
    detector.roi_heads.res5 = _Widen()
    return detector


def _run(detector: BottomUpDetector, image: np.ndarray, cfg: BottomUpConfig):
    """vqa-align's detector on one picture, with the RPN head's raw outputs recorded."""
    seen = {}
    hook = detector.proposal_generator.rpn_head.register_forward_hook(lambda m, i, o: seen.update(out=o))
    try:
        p = preprocess(image, cfg)
        with torch.no_grad():
            raw = detector(batch_images([p]), [p.resized_hw], [p.scale])[0]
    finally:
        hook.remove()
    logits, deltas = (t.float().numpy() for t in seen["out"])
    return p, raw, logits, deltas


def _reference_rois(p, logits: np.ndarray, deltas: np.ndarray) -> np.ndarray:
    # Caffe's two-way softmax over (background, foreground); the conversion keeps fg - bg as one logit.
    two = np.stack([np.zeros_like(logits), logits], axis=1)  # (1, 2, A, H, W)
    e = np.exp(two - two.max(axis=1, keepdims=True))
    fg = (e / e.sum(axis=1, keepdims=True))[:, 1]
    im_info = np.array([[p.resized_hw[0], p.resized_hw[1], p.scale]], dtype=np.float32)[0]
    return ref_proposal_layer(fg, deltas, im_info)


def _caffe_cls_prob(raw) -> np.ndarray:
    probs = raw.class_logits.softmax(dim=-1).numpy()  # the network's softmax (background last)
    return np.concatenate([probs[:, -1:], probs[:, :-1]], axis=1)  # Caffe's layout: background first


# ------------------------------------------------------------------------------------------------
# Preprocessing


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee"])
def test_preprocess_is_get_image_blob(photos, name):
    image = photos[name]
    blob, scale = ref_image_blob(image)
    p = preprocess(image, BottomUpConfig())
    assert p.scale == scale and p.resized_hw == blob.shape[:2]
    assert torch.equal(p.pixels, torch.from_numpy(blob.transpose(2, 0, 1).copy()))  # bit for bit


def test_scale_rule_rounds_the_longest_side_half_to_even():
    # 600 / 400 * 667 = 1000.5: np.round gives 1000 (half to even), so the scale stays 1.5.
    scale, hw = T.tsv_scale(400, 667, 600, 1000)
    assert scale == 1.5 and hw == (600, 1000)
    scale, hw = T.tsv_scale(400, 668, 600, 1000)  # 1002 > 1000: the longest side decides
    assert scale == 1000 / 668 and hw == (599, 1000)


def test_cv2_resize_transcription_on_small_arrays():
    gen = np.random.default_rng(0)
    for shape, fx in [((5, 7, 3), 1.7), ((9, 4, 3), 0.55), ((6, 6, 1), 1 / 3)]:
        src = gen.normal(size=shape).astype(np.float32) * 100
        out = T.cv2_resize_linear(torch.from_numpy(src.transpose(2, 0, 1).copy()), (round(shape[0] * fx), round(shape[1] * fx)), fx)
        assert torch.equal(out, torch.from_numpy(ref_cv2_resize(src, fx).transpose(2, 0, 1).copy()))
    # an exact halving takes OpenCV's INTER_AREA path: the mean of each 2 x 2 block
    src = torch.arange(16, dtype=torch.float32).reshape(1, 4, 4)
    assert torch.equal(T.cv2_resize_linear(src, (2, 2), 0.5), torch.tensor([[[2.5, 4.5], [10.5, 12.5]]]))


def test_cv2_resize_matches_opencv_when_installed(photos):
    cv2 = pytest.importorskip("cv2")
    im = photos["chelsea"][:, :, ::-1].astype(np.float32) - PIXEL_MEANS.astype(np.float32)
    for fx in (600 / 300, 600 / 451, 1.37):
        want = cv2.resize(im, None, None, fx=fx, fy=fx, interpolation=cv2.INTER_LINEAR)
        got = T.cv2_resize_linear(torch.from_numpy(im.transpose(2, 0, 1).copy()), want.shape[:2], fx)
        assert np.abs(got.numpy().transpose(1, 2, 0) - want).max() <= 1e-3  # an FMA build differs in the last bit


def test_res4_size_is_the_trunks():
    with torch.device("meta"):
        detector = BottomUpDetector(BottomUpConfig())
        for h, w in [(600, 800), (600, 901), (599, 1000), (37, 41)]:
            assert tuple(detector.backbone(torch.empty(1, 3, h, w)).shape[-2:]) == res4_size(h, w)


# ------------------------------------------------------------------------------------------------
# Proposals, per-class NMS, keep rule: the detector (cheap trunk) against the reference


@pytest.mark.parametrize("name", ["astronaut", "chelsea"])
def test_proposals_equal_the_reference(fast_detector, photos, name):
    p, raw, logits, deltas = _run(fast_detector, photos[name], FAST)
    rois = _reference_rois(p, logits, deltas)
    assert len(rois) == 300 and np.array_equal(raw.proposals.numpy(), rois)  # same boxes, same order


def test_boxes_equal_the_reference(fast_detector, photos):
    p, raw, logits, deltas = _run(fast_detector, photos["chelsea"], FAST)
    rois = _reference_rois(p, logits, deltas)
    max_conf, cls_boxes = ref_max_conf(rois, _caffe_cls_prob(raw), p.scale)
    # All three branches of the keep rule: few pass (the best 10), some pass (proposal order),
    # too many pass (the best 100); and the fixed 36.
    passing = np.sort(max_conf)[::-1]
    assert passing[0] > 0.2 and passing[150] > 0  # seeded outputs where the rule has work to do
    for thresh, lo, hi in ((1.01, 10, 100), (float(passing[40]), 10, 100), (0.0, 10, 100), (0.2, 36, 36)):
        det = postprocess(raw, p, BottomUpConfig(num_classes=200, conf_thresh=thresh, min_boxes=lo, max_boxes=hi))
        keep = ref_keep(max_conf, thresh, lo, hi)
        assert lo <= len(keep) <= hi
        assert np.array_equal(det.boxes, cls_boxes[keep])  # same values, same order
        assert np.array_equal(det.features, raw.features.numpy()[keep])
    assert np.all(np.diff(ref_keep(max_conf, float(passing[40]))) > 0)  # proposal order, not by confidence


def test_a_batch_selects_as_one_picture_at_a_time(fast_detector, photos):
    # Different sizes: the astronaut (600 x 600) is zero-padded to the cat's 600 x 902 in the batch.
    together = detect(fast_detector, [photos["astronaut"], photos["chelsea"]])[0]
    alone = detect(fast_detector, [photos["astronaut"]])[0]
    assert np.array_equal(together.boxes, alone.boxes) and np.array_equal(together.features, alone.features)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_class_nms_confidence_is_max_conf(seed):
    gen = np.random.default_rng(seed)
    xy = gen.uniform(0, 80, size=(60, 2))
    boxes = np.concatenate([xy, xy + gen.uniform(1, 40, size=(60, 2))], axis=1).astype(np.float32)
    probs = gen.dirichlet(np.ones(26), size=60).astype(np.float32)
    probs[:5, :4] = np.float32(0.02)  # ties: NumPy's argsort orders them, in both
    ref = np.zeros(60)
    for c in range(1, 26):
        keep = np.array(ref_cpu_nms(np.hstack((boxes, probs[:, c : c + 1])), 0.3))
        ref[keep] = np.where(probs[keep, c] > ref[keep], probs[keep, c], ref[keep])
    conf = B.per_class_nms_confidence(torch.from_numpy(boxes), torch.from_numpy(probs[:, 1:]), 0.3)
    assert np.array_equal(conf.double().numpy(), ref)


def test_overlap_at_the_threshold_suppresses():
    # +1 sides: 10 x 10 and the 10 x 5 inside it overlap by exactly 0.5 (without +1: 9 x 4 / 9 x 9 = 0.44)
    boxes = torch.tensor([[10.0, 10.0, 19.0, 19.0], [10.0, 10.0, 19.0, 14.0]])
    assert B.caffe_overlaps(boxes[None])[0, 0, 1].item() == 0.5
    scores = torch.tensor([[0.9], [0.8]])
    assert B.per_class_nms_confidence(boxes, scores, 0.5).tolist() == pytest.approx([0.9, 0.0])  # >= suppresses
    assert B.per_class_nms_confidence(boxes, scores, 0.50001).tolist() == pytest.approx([0.9, 0.8])
    assert T.caffe_nms(boxes.numpy(), scores[:, 0].numpy(), 0.5).tolist() == [0]
    assert ref_cpu_nms(np.hstack([boxes.numpy(), scores.numpy()]), 0.5) == [0]


# ------------------------------------------------------------------------------------------------
# The whole detector, ResNet-101 and res5 included (seeded weights): slow on a CPU


@pytest.mark.slow
def test_whole_detector_equals_the_reference_on_a_photo(photos):
    detector = BottomUpDetector.from_state_dict(caffe_weights(BottomUpConfig(), seed=3), BottomUpConfig())
    p, raw, logits, deltas = _run(detector, photos["chelsea"], BottomUpConfig())
    rois = _reference_rois(p, logits, deltas)
    assert np.array_equal(raw.proposals.numpy(), rois)
    max_conf, cls_boxes = ref_max_conf(rois, _caffe_cls_prob(raw), p.scale)
    keep = ref_keep(max_conf)
    det = postprocess(raw, p, BottomUpConfig())
    assert np.array_equal(det.boxes, cls_boxes[keep]) and np.array_equal(det.features, raw.features.numpy()[keep])
