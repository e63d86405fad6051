"""The weight-free region extractor: tight foreground boxes, any image mode/size, deterministic."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from vqa_align.extract.regions import POOL_SIZE, REGION_FEATURE_DIM, connected_components, extract_regions

BG, RED = (245, 238, 230), (220, 20, 20)


def _canvas(size=(64, 64)):
    return Image.new("RGB", size, BG)


def test_rectangle_box_is_tight():
    im = _canvas()
    ImageDraw.Draw(im).rectangle([10, 20, 29, 44], fill=RED)  # pixels 10..29 x 20..44 inclusive
    r = extract_regions(im)
    assert r.features.shape == (6, REGION_FEATURE_DIM) and r.features.dtype == np.float32
    assert r.num_foreground == 1
    np.testing.assert_array_equal(r.boxes[0], [10, 20, 30, 45])  # pixel-edge coordinates
    np.testing.assert_array_equal(r.boxes[1], [0, 0, 64, 64])  # whole image, then the 2 x 2 grid
    np.testing.assert_array_equal(r.boxes[2:], [[0, 0, 32, 32], [32, 0, 64, 32], [0, 32, 32, 64], [32, 32, 64, 64]])
    fg_rgb = r.features[0, 4 * POOL_SIZE**2 + 3: 4 * POOL_SIZE**2 + 6]
    np.testing.assert_allclose(fg_rgb, np.array(RED) / 255, atol=1e-5)
    assert r.features[0, -1] == pytest.approx(1.0)  # the box is all foreground


def test_silhouette_tells_shapes_apart():
    circle, square = _canvas(), _canvas()
    ImageDraw.Draw(circle).ellipse([16, 16, 47, 47], fill=RED)
    ImageDraw.Draw(square).rectangle([16, 16, 47, 47], fill=RED)
    a, b = extract_regions(circle), extract_regions(square)
    np.testing.assert_array_equal(a.boxes[0], b.boxes[0])  # same box ...
    mask = slice(3 * POOL_SIZE**2, 4 * POOL_SIZE**2)
    assert a.features[0, mask][0] < 0.5 < b.features[0, mask][0]  # ... but the corner is empty for the circle


def test_two_components_and_small_specks_dropped():
    im = _canvas()
    d = ImageDraw.Draw(im)
    d.rectangle([2, 2, 20, 20], fill=RED)
    d.rectangle([40, 40, 50, 60], fill=(0, 0, 200))
    d.point([(60, 2)], fill=(0, 0, 0))  # one pixel: below the minimum area
    r = extract_regions(im)
    assert r.num_foreground == 2
    np.testing.assert_array_equal(r.boxes[:2], [[2, 2, 21, 21], [40, 40, 51, 61]])  # largest first


def test_connected_components_8_connectivity():
    m = np.zeros((5, 5), bool)
    m[0, 0] = m[1, 1] = m[4, 4] = True
    labels, count = connected_components(m)
    assert count == 2 and labels[0, 0] == labels[1, 1] != labels[4, 4]


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_other_modes(mode):
    im = _canvas()
    ImageDraw.Draw(im).rectangle([5, 5, 30, 30], fill=(20, 20, 20))
    converted = im.convert(mode, palette=Image.Palette.ADAPTIVE) if mode == "P" else im.convert(mode)
    r = extract_regions(converted)
    assert r.num_foreground == 1 and r.features.shape[1] == REGION_FEATURE_DIM
    np.testing.assert_array_equal(r.boxes[0], [5, 5, 31, 31])
    gray = np.asarray(im.convert("L"))
    np.testing.assert_array_equal(extract_regions(gray).boxes, r.boxes)


def test_huge_image_downscaled_boxes_in_original_pixels():
    im = _canvas((2000, 1000))
    ImageDraw.Draw(im).rectangle([400, 200, 999, 599], fill=RED)
    r = extract_regions(im, max_side=256)
    assert r.image_size == (2000, 1000)
    np.testing.assert_allclose(r.boxes[0], [400, 200, 1000, 600], atol=2000 / 256 * 1.01)
    np.testing.assert_array_equal(r.boxes[1], [0, 0, 2000, 1000])


def test_deterministic_and_plain_background():
    im = _canvas()
    ImageDraw.Draw(im).polygon([(32, 5), (5, 58), (58, 58)], fill=(0, 128, 128))
    a, b = extract_regions(im), extract_regions(np.asarray(im))
    np.testing.assert_array_equal(a.features, b.features)
    np.testing.assert_array_equal(a.boxes, b.boxes)
    blank = extract_regions(_canvas())
    assert blank.num_foreground == 0 and len(blank.boxes) == 5


def test_bad_arrays():
    with pytest.raises(ValueError, match="uint8"):
        extract_regions(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        extract_regions(np.zeros((8, 8, 5), np.uint8))
