"""The bottom-up-attention detector: box arithmetic on hand-worked inputs, weights, a real photo."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from vqa_align.errors import DataFormatError, InputFileNotFoundError, UserError
from vqa_align.extract.backbones import bottom_up_boxes as B
from vqa_align.extract.backbones.bottom_up import (
    BottomUpConfig,
    BottomUpDetector,
    batch_images,
    detect,
    load_vocabulary,
    postprocess,
    preprocess,
)
from vqa_align.extract.backbones.bottom_up_random import random_state_dict
from vqa_align.extract.backbones.bottom_up_weights import Vocabulary, load_weights_file

# ------------------------------------------------------------------------------------------------
# Resize rule and mapping back


@pytest.mark.parametrize(
    "hw, sizes, expected",
    [
        ((480, 640), (800, 1333), (800, 1067)),  # 800/480 = 5/3: width 1066.67 -> 1067
        ((640, 480), (800, 1333), (1067, 800)),  # portrait: the same with sides swapped
        ((1000, 3000), (800, 1333), (444, 1333)),  # 800 x 2400 passes 1333: shrink by 1333/2400
        ((4, 5), (2, 100), (2, 3)),  # 2.5 rounds half up
        ((800, 1200), (800, 1333), (800, 1200)),  # already at size
    ],
)
def test_resized_shape(hw, sizes, expected):
    assert B.resized_shape(*hw, *sizes) == expected


def test_to_original_scales_x_and_y_separately():
    boxes = torch.tensor([[10.0, 10.0, 20.0, 20.0]])
    # original 100 x 200 (h x w) shown at 50 x 80: y by 2, x by 2.5
    out = B.to_original(boxes, original_hw=(100, 200), resized_hw=(50, 80))
    assert torch.allclose(out, torch.tensor([[25.0, 20.0, 50.0, 40.0]]))


def test_preprocess_is_bgr_minus_mean_at_the_resized_size():
    cfg = BottomUpConfig(min_size=2, max_size=100)
    red = np.zeros((4, 6, 3), np.uint8)
    red[..., 0] = 255
    p = preprocess(red, cfg)
    assert p.resized_hw == (2, 3) and p.original_hw == (4, 6) and p.pixels.shape == (3, 2, 3)
    mean_b, mean_g, mean_r = cfg.pixel_mean_bgr
    assert torch.allclose(p.pixels[0], torch.full((2, 3), -mean_b))  # channel 0 is blue
    assert torch.allclose(p.pixels[1], torch.full((2, 3), -mean_g))
    assert torch.allclose(p.pixels[2], torch.full((2, 3), 255 - mean_r))  # channel 2 is red


def test_preprocess_rejects_non_rgb():
    with pytest.raises(DataFormatError, match="uint8 RGB"):
        preprocess(np.zeros((4, 4), np.uint8), BottomUpConfig())


def test_batch_images_pads_bottom_right_with_zeros():
    cfg = BottomUpConfig(min_size=2, max_size=100)
    a = preprocess(np.full((2, 2, 3), 200, np.uint8), cfg)  # 2 x 2
    b = preprocess(np.full((2, 4, 3), 200, np.uint8), cfg)  # 2 x 4
    batch = batch_images([a, b])
    assert batch.shape == (2, 3, 2, 4)
    assert torch.equal(batch[0, :, :, :2], a.pixels) and (batch[0, :, :, 2:] == 0).all()
    assert torch.equal(batch[1], b.pixels)


# ------------------------------------------------------------------------------------------------
# Anchors and box decoding


def test_cell_anchors_have_area_size_squared_and_ratio_h_over_w():
    cells = B.cell_anchors((2, 4), (1.0, 4.0))
    expected = torch.tensor(
        [
            [-1.0, -1.0, 1.0, 1.0],  # size 2, ratio 1
            [-0.5, -2.0, 0.5, 2.0],  # size 2, ratio 4: w = 1, h = 4
            [-2.0, -2.0, 2.0, 2.0],  # size 4, ratio 1
            [-1.0, -4.0, 1.0, 4.0],  # size 4, ratio 4: w = 2, h = 8
        ]
    )
    assert torch.allclose(cells, expected)


def test_grid_anchors_order_is_row_column_anchor():
    cells = torch.tensor([[-1.0, -1.0, 1.0, 1.0], [-2.0, -2.0, 2.0, 2.0]])
    anchors = B.grid_anchors(cells, height=2, width=3, stride=16)
    assert anchors.shape == (2 * 3 * 2, 4)
    # row y = 1, column x = 2, anchor 1 -> index (1 * 3 + 2) * 2 + 1 = 11, centred on (32, 16)
    assert torch.equal(anchors[11], torch.tensor([30.0, 14.0, 34.0, 18.0]))
    assert torch.equal(anchors[0], torch.tensor([-1.0, -1.0, 1.0, 1.0]))


def test_apply_deltas_moves_centre_and_scales_size():
    box = torch.tensor([[0.0, 0.0, 10.0, 20.0]])  # centre (5, 10), 10 x 20
    # dx = 0.1 -> centre x + 1; dy = -0.2 -> centre y - 4; dw = log 2 -> width 20; dh = 0
    deltas = torch.tensor([[0.1, -0.2, math.log(2.0), 0.0]])
    assert torch.allclose(B.apply_deltas(deltas, box, (1.0, 1.0, 1.0, 1.0)), torch.tensor([[-4.0, -4.0, 16.0, 16.0]]))
    # the same move with the RoI head's weights (10, 10, 5, 5), for two classes at once
    weighted = torch.tensor([[1.0, -2.0, 5 * math.log(2.0), 0.0, 0.0, 0.0, 0.0, 0.0]])
    out = B.apply_deltas(weighted, box, (10.0, 10.0, 5.0, 5.0))
    assert torch.allclose(out, torch.tensor([[-4.0, -4.0, 16.0, 16.0, 0.0, 0.0, 10.0, 20.0]]))


def test_apply_deltas_clamps_growth():
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    out = B.apply_deltas(torch.tensor([[0.0, 0.0, 10.0, 0.0]]), box, (1.0, 1.0, 1.0, 1.0))
    # dw = 10 is clamped to log(1000/16): width 10 * 62.5 = 625 around centre 5
    assert torch.allclose(out, torch.tensor([[-307.5, 0.0, 317.5, 10.0]]))


def test_clip_boxes():
    out = B.clip_boxes_to_image(torch.tensor([[-5.0, 3.0, 120.0, 50.0]]), (40, 100))  # torchvision's, as the selection calls it
    assert torch.equal(out, torch.tensor([[0.0, 3.0, 100.0, 40.0]]))


# ------------------------------------------------------------------------------------------------
# Proposal selection


def _proposals():
    boxes = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],  # A, logit 5
            [0.0, 0.0, 10.0, 11.0],  # B, logit 4: IoU with A = 100/110 = 0.91 -> suppressed
            [20.0, 20.0, 30.0, 30.0],  # C, logit 3
            [-10.0, 5.0, 60.0, 5.0],  # D, logit 2: zero height -> dropped as empty
            [40.0, 0.0, 60.0, 10.0],  # E, logit 1: clipped to x2 = 50
        ]
    )
    # shuffled so the function has to sort by logit
    perm = torch.tensor([3, 0, 4, 2, 1])
    return boxes[perm], torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])[perm]


def test_select_proposals_topk_clip_empty_nms():
    boxes, logits = _proposals()
    kept, scores = B.select_proposals(boxes, logits, height=40, width=50, pre_nms_topk=5, post_nms_topk=10, nms_thresh=0.7)
    assert torch.equal(kept, torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0], [40.0, 0.0, 50.0, 10.0]]))
    assert torch.equal(scores, torch.tensor([5.0, 3.0, 1.0]))
    # post-NMS top-k keeps the best two
    kept, _ = B.select_proposals(boxes, logits, 40, 50, pre_nms_topk=5, post_nms_topk=2, nms_thresh=0.7)
    assert torch.equal(kept, torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]]))
    # pre-NMS top-k = 2 looks at A and B only; B falls to NMS
    kept, _ = B.select_proposals(boxes, logits, 40, 50, pre_nms_topk=2, post_nms_topk=10, nms_thresh=0.7)
    assert torch.equal(kept, torch.tensor([[0.0, 0.0, 10.0, 10.0]]))
    # a looser NMS threshold (0.95) keeps B
    kept, _ = B.select_proposals(boxes, logits, 40, 50, pre_nms_topk=2, post_nms_topk=10, nms_thresh=0.95)
    assert len(kept) == 2


# ------------------------------------------------------------------------------------------------
# Final boxes: the bottom-up (TSV) rule


def test_per_class_nms_confidence_by_hand():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 11.0], [20.0, 20.0, 30.0, 30.0]])
    scores = torch.tensor([[0.5, 0.3], [0.6, 0.2], [0.1, 0.05]])
    # class 0 keeps box 1 (0.6) and suppresses box 0; class 1 keeps box 0 (0.3), suppresses box 1.
    # box 0: only class 1 counts -> 0.3; box 1: 0.6; box 2: kept everywhere -> 0.1
    # (overlap of boxes 0 and 1 with Caffe's +1 sides: 121 / 132). Against the literal
    # transcription of cpu_nms on random boxes: tests/test_bottom_up_tsv.py.
    conf = B.per_class_nms_confidence(boxes, scores, 0.3)
    assert torch.allclose(conf, torch.tensor([0.3, 0.6, 0.1]))


def test_per_class_nms_confidence_batched_with_padding():
    gen = torch.Generator().manual_seed(3)
    singles, boxes_list, scores_list = [], [], []
    for count in (12, 7):
        xy = torch.rand(count, 2, generator=gen) * 50
        boxes = torch.cat([xy, xy + torch.rand(count, 2, generator=gen) * 30 + 1], dim=1)
        scores = torch.rand(count, 9, generator=gen)
        singles.append(B.per_class_nms_confidence(boxes, scores, 0.3))
        boxes_list.append(torch.cat([boxes, torch.zeros(12 - count, 4)]))
        scores_list.append(torch.cat([scores, torch.full((12 - count, 9), -1.0)]))
    batched = B.per_class_nms_confidence(torch.stack(boxes_list), torch.stack(scores_list), 0.3, [12, 7])
    assert torch.equal(batched[0], singles[0]) and torch.equal(batched[1, :7], singles[1])


def test_keep_by_confidence_threshold_min_max():
    conf = torch.tensor([0.5, 0.1, 0.3, 0.25, 0.05])
    assert B.keep_by_confidence(conf, 0.2, 1, 100).tolist() == [0, 2, 3]  # three reach 0.2: proposal order
    assert B.keep_by_confidence(conf, 0.2, 4, 100).tolist() == [0, 2, 3, 1]  # at least four: most confident first
    assert B.keep_by_confidence(conf, 0.2, 1, 2).tolist() == [0, 2]  # at most two
    assert B.keep_by_confidence(conf, 0.2, 10, 100).tolist() == [0, 2, 3, 1, 4]  # all there are
    assert B.keep_by_confidence(torch.tensor([0.1, 0.25, 0.3]), 0.2, 1, 100).tolist() == [1, 2]  # not [2, 1]


def test_select_bottom_up_keeps_proposals_with_their_best_class():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 11.0], [20.0, 20.0, 30.0, 30.0]])
    probs = torch.tensor([[0.5, 0.3], [0.6, 0.2], [0.1, 0.05]])
    sel = B.select_bottom_up(boxes, probs, nms_thresh=0.3, conf_thresh=0.25, min_boxes=1, max_boxes=10)
    # confidences 0.3, 0.6, 0.1 -> boxes 0 and 1 pass 0.25 (listed in proposal order, as the TSV
    # does when the count is within the bounds); objects are the argmax classes
    assert sel.index.tolist() == [0, 1]
    assert torch.equal(sel.boxes, boxes[[0, 1]])
    assert sel.object_ids.tolist() == [0, 0]
    assert torch.allclose(sel.object_scores, torch.tensor([0.5, 0.6]))


# ------------------------------------------------------------------------------------------------
# Final boxes: the Hugging Face demo's rule


def test_select_hf_demo_tries_thresholds_until_min_boxes():
    proposals_boxes = torch.tensor(
        [
            # class 0 box, class 1 box (per proposal)
            [0.0, 0.0, 10.0, 10.0, 50.0, 50.0, 60.0, 60.0],
            [0.0, 0.0, 10.0, 6.0, 0.0, 0.0, 1.0, 1.0],  # best class 0: IoU 0.6 with proposal 0's
            [0.0, 0.0, 1.0, 1.0, 20.0, 20.0, 40.0, 45.0],  # best class 1, clipped to y2 = 40
        ]
    )
    probs = torch.tensor([[0.7, 0.1], [0.5, 0.2], [0.1, 0.3]])
    # at NMS 0.5 proposal 1 goes (2 boxes < 3); at 0.7 all three stay
    sel = B.select_hf_demo(proposals_boxes, probs, height=40, width=100, nms_threshs=(0.5, 0.7), min_boxes=3, max_boxes=3)
    assert sel.index.tolist() == [0, 1, 2]
    assert sel.object_ids.tolist() == [0, 0, 1]
    assert torch.equal(sel.boxes[2], torch.tensor([20.0, 20.0, 40.0, 40.0]))
    # with min_boxes 2 the first threshold is enough
    sel = B.select_hf_demo(proposals_boxes, probs, 40, 100, (0.5, 0.7), min_boxes=2, max_boxes=3)
    assert sel.index.tolist() == [0, 2]
    # max_boxes caps the count
    sel = B.select_hf_demo(proposals_boxes, probs, 40, 100, (0.7,), min_boxes=1, max_boxes=1)
    assert sel.index.tolist() == [0]


# ------------------------------------------------------------------------------------------------
# Weights: the published names and shapes, strict and tensors-only loading


def _expected_shapes() -> dict[str, tuple[int, ...]]:
    """The checkpoint's names and shapes, written out from the architecture independently."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv_norm(prefix: str, cout: int, cin: int, k: int) -> None:
        shapes[f"{prefix}.weight"] = (cout, cin, k, k)
        for stat in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.norm.{stat}"] = (cout,)
        shapes[f"{prefix}.norm.num_batches_tracked"] = ()

    conv_norm("backbone.stem.conv1", 64, 3, 7)
    stages = [("backbone.res2", 3, 64, 64, 256), ("backbone.res3", 4, 256, 128, 512), ("backbone.res4", 23, 512, 256, 1024), ("roi_heads.res5", 3, 1024, 512, 2048)]
    for name, blocks, cin, mid, cout in stages:
        for i in range(blocks):
            c = cin if i == 0 else cout
            if i == 0:
                conv_norm(f"{name}.{i}.shortcut", cout, c, 1)
            conv_norm(f"{name}.{i}.conv1", mid, c, 1)
            conv_norm(f"{name}.{i}.conv2", mid, mid, 3)
            conv_norm(f"{name}.{i}.conv3", cout, mid, 1)
    rpn = "proposal_generator"
    shapes[f"{rpn}.anchor_generator.cell_anchors.0"] = (12, 4)
    shapes.update({f"{rpn}.rpn_head.conv.weight": (512, 1024, 3, 3), f"{rpn}.rpn_head.conv.bias": (512,)})
    shapes.update({f"{rpn}.rpn_head.objectness_logits.weight": (12, 512, 1, 1), f"{rpn}.rpn_head.objectness_logits.bias": (12,)})
    shapes.update({f"{rpn}.rpn_head.anchor_deltas.weight": (48, 512, 1, 1), f"{rpn}.rpn_head.anchor_deltas.bias": (48,)})
    bp = "roi_heads.box_predictor"
    shapes.update({f"{bp}.cls_score.weight": (1601, 2048), f"{bp}.cls_score.bias": (1601,)})
    shapes.update({f"{bp}.bbox_pred.weight": (6400, 2048), f"{bp}.bbox_pred.bias": (6400,)})
    shapes[f"{bp}.cls_embedding.weight"] = (1601, 256)
    shapes.update({f"{bp}.fc_attr.weight": (512, 2304), f"{bp}.fc_attr.bias": (512,)})
    shapes.update({f"{bp}.attr_score.weight": (401, 512), f"{bp}.attr_score.bias": (401,)})
    return shapes


@pytest.fixture(scope="module")
def small_config() -> BottomUpConfig:
    # A small image and few proposals keep a CPU run to seconds; the architecture is the real one.
    return BottomUpConfig(min_size=160, max_size=224, post_nms_topk=12)


@pytest.fixture(scope="module")
def random_weights(small_config) -> dict[str, torch.Tensor]:
    return random_state_dict(small_config, seed=0)


@pytest.fixture(scope="module")
def detector(small_config, random_weights) -> BottomUpDetector:
    return BottomUpDetector.from_state_dict(random_weights, small_config)


def test_state_dict_has_the_published_names_and_shapes(random_weights):
    expected = _expected_shapes()
    assert {k: tuple(v.shape) for k, v in random_weights.items()} == expected
    # the anchors the checkpoint carries: sizes 64..512 x ratios 0.5, 1, 2 (size-major)
    anchors = random_weights["proposal_generator.anchor_generator.cell_anchors.0"]
    assert torch.allclose(anchors[4], torch.tensor([-64.0, -64.0, 64.0, 64.0]))  # size 128, ratio 1


def test_strict_load_names_the_problem(small_config, random_weights, detector):
    model = detector  # every failed load below leaves it untouched (checked before loading)
    missing = dict(random_weights)
    del missing["backbone.res4.22.conv3.norm.running_var"]
    with pytest.raises(DataFormatError, match=r"missing 1: backbone\.res4\.22\.conv3\.norm\.running_var"):
        model.load_weights(missing, source="w.bin")
    extra = dict(random_weights, **{"roi_heads.box_predictor.extra": torch.zeros(1)})
    with pytest.raises(DataFormatError, match=r"unexpected 1: roi_heads\.box_predictor\.extra"):
        model.load_weights(extra)
    # batch-norm counters are optional (checkpoints saved before PyTorch tracked them lack them)
    no_counters = {k: v for k, v in random_weights.items() if not k.endswith("num_batches_tracked")}
    model.load_weights(no_counters)
    wrong = dict(random_weights)
    wrong["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(81, 2048)
    with pytest.raises(DataFormatError, match=r"shape of roi_heads\.box_predictor\.cls_score\.weight: \(81, 2048\)"):
        model.load_weights(wrong)


class _NotATensor:
    pass


def test_weights_file_tensors_only(tmp_path, random_weights):
    small = {k: v for k, v in list(random_weights.items())[:4]}
    good = tmp_path / "w.bin"
    torch.save(small, good)
    assert load_weights_file(good).keys() == small.keys()
    from safetensors.torch import save_file

    st = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in small.items()}, str(st))
    loaded = load_weights_file(st)
    assert all(torch.equal(loaded[k], small[k]) for k in small)
    evil = tmp_path / "evil.bin"
    with open(evil, "wb") as f:
        pickle.dump({"x": _NotATensor()}, f)
    with pytest.raises(DataFormatError, match="weights_only"):
        load_weights_file(evil)
    with pytest.raises(InputFileNotFoundError, match="not found"):
        load_weights_file(tmp_path / "absent.bin")


def test_vocabulary_files(tmp_path):
    cfg = BottomUpConfig(num_classes=3, num_attributes=2)
    objs = tmp_path / "objects_vocab.txt"
    objs.write_text("Umbrella\nman,person\ntree\n")
    attrs = tmp_path / "attributes_vocab.txt"
    attrs.write_text("red\nwooden\n")
    vocab = load_vocabulary(objs, attrs, cfg)
    assert vocab.objects == ["umbrella", "man", "tree"] and vocab.attributes == ["red", "wooden"]
    with pytest.raises(DataFormatError, match="has 2 names, the detector has 3"):
        load_vocabulary(attrs, attrs, cfg)


# ------------------------------------------------------------------------------------------------
# A real photo through the whole detector (random weights)


def test_detects_10_to_100_boxes_of_2048_d_on_a_photo(detector, small_config, monkeypatch):
    from skimage import data

    image = data.astronaut()  # 512 x 512 RGB
    vocab_objects = [f"o{i}" for i in range(1600)]
    vocab_attrs = [f"a{i}" for i in range(400)]
    adaptive = detect(detector, [image], vocab=Vocabulary(vocab_objects, vocab_attrs))[0]
    n = len(adaptive.boxes)
    assert 10 <= n <= 100
    assert adaptive.features.shape == (n, 2048) and adaptive.features.dtype == np.float32
    assert np.isfinite(adaptive.features).all() and np.abs(adaptive.features).sum() > 0
    assert adaptive.image_size == (512, 512)
    b = adaptive.boxes
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= 512).all() and (b[:, 3] <= 512).all()
    assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
    assert ((adaptive.object_ids >= 0) & (adaptive.object_ids < 1600)).all()
    assert ((adaptive.attribute_ids >= 0) & (adaptive.attribute_ids < 400)).all()
    assert adaptive.object_names == [f"o{i}" for i in adaptive.object_ids]
    assert adaptive.labels()[0] == f"a{adaptive.attribute_ids[0]} o{adaptive.object_ids[0]}"

    # Features belong to their boxes, and the fixed-count flavour on the same network outputs:
    # re-run the network once (res5 in chunks of 5 boxes this time), select with both rules'
    # settings, compare.
    import vqa_align.extract.backbones.bottom_up as bottom_up

    monkeypatch.setattr(bottom_up, "RES5_CHUNK", 5)
    p = preprocess(image, small_config)
    with torch.no_grad():
        raw = detector(batch_images([p]), [p.resized_hw], [p.scale])[0]
    again = postprocess(raw, p, small_config)
    assert np.allclose(again.features, adaptive.features, atol=1e-4) and np.allclose(again.boxes, adaptive.boxes, atol=1e-3)
    match = torch.cdist(torch.from_numpy(adaptive.boxes) * p.scale, raw.proposals).argmin(dim=1)
    assert torch.allclose(raw.features[match], torch.from_numpy(adaptive.features), atol=1e-4)
    fixed = postprocess(raw, p, BottomUpConfig.fixed(12, min_size=160, max_size=224, post_nms_topk=12))
    assert fixed.features.shape == (12, 2048) and fixed.boxes.shape == (12, 4)
    # Batched per-class NMS (as detect() runs it for several images) = one image at a time.
    from vqa_align.extract.backbones.bottom_up import RawOutputs, batch_confidence

    short = RawOutputs(*(t[:7] for t in (raw.proposals, raw.features, raw.class_logits, raw.attr_logits, raw.box_deltas)))
    confs = batch_confidence([raw, short], small_config.nms_thresh)
    for r, c in zip((raw, short), confs):
        single = B.per_class_nms_confidence(r.proposals, r.class_logits.softmax(-1)[:, :-1], small_config.nms_thresh)
        assert torch.equal(c, single)


# ------------------------------------------------------------------------------------------------
# The registry's ``bottom-up`` backbone


def test_backbone_from_a_weights_folder(tmp_path, random_weights):
    from PIL import Image
    from safetensors.torch import save_file
    from skimage import data

    from vqa_align.extract.backbones import build_backbone, make_params

    params = {"weights": str(tmp_path), "min_size": "160", "max_size": "224", "proposals": "12", "mode": "fixed", "boxes": "11"}
    from vqa_align.extract.backbones import backbone_class

    missing = backbone_class("bottom-up").missing(make_params("bottom-up", params))
    assert missing is not None and "--download --backbone bottom-up" in missing.fix
    save_file({k: v.contiguous() for k, v in random_weights.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "objects_vocab.txt").write_text("".join(f"thing{i}\n" for i in range(1600)))
    (tmp_path / "attributes_vocab.txt").write_text("".join(f"colour{i},hue\n" for i in range(400)))
    backbone = build_backbone("bottom-up", params)
    # Through the real pipeline (decoding, store), the picture downscaled while decoding: the boxes
    # must still come back in the original file's pixels.
    from vqa_align.extract.pipeline import ExtractOptions, extract_images, list_images
    from vqa_align.extract.feature_store import FeatureStore

    pics = tmp_path / "pics"
    pics.mkdir()
    Image.fromarray(data.chelsea()).save(pics / "cat.png")  # 451 x 300 (w x h)
    opts = ExtractOptions(batch_size=1, num_workers=0, progress=False, max_side=226)
    extract_images(list_images([pics]), backbone, tmp_path / "f.h5", opts)
    store = FeatureStore(tmp_path / "f.h5")
    feats, boxes = store.read_row(0)
    assert feats.shape == (11, 2048) and boxes.shape == (11, 4) and tuple(store.image_sizes[0]) == (451, 300)
    assert boxes[:, 2].max() <= 451 and boxes[:, 3].max() <= 300 and boxes[:, 2].max() > 226  # not the 226 px copy
    labels = store.read_labels(0)
    assert len(labels) == 11 and all(l.startswith("colour") and " thing" in l for l in labels)
    assert store.extractor.name == "bottom-up" and store.extractor.feature_dim == 2048
    info = backbone.info
    assert info.name == "bottom-up" and info.feature_dim == 2048 and len(info.weights_sha256) == 64
    assert "weights" not in info.params and info.params["mode"] == "fixed"
    with pytest.raises(UserError, match="mode 'sometimes'"):
        make_params("bottom-up", dict(params, mode="sometimes")).config()
