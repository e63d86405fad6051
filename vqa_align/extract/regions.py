"""A weight-free region extractor for any RGB image (easy-VQA, and images uploaded in the app).

Proposals (in this order):
  1. connected components of the *foreground*: pixels whose RGB distance from the background
     colour (the median of the image border) exceeds ``FOREGROUND_THRESHOLD``; components smaller
     than ``min_area_fraction`` of the image are dropped; at most ``max_components``, largest first;
  2. the whole image;
  3. a 2 x 2 grid.

Descriptor of each region (``torchvision.ops.roi_align`` over a 7-channel map of the image), laid
out as ``REGION_FEATURE_DIM`` = 203 float32 values::

    [  0:147]  R, G, B in [0, 1], each 7 x 7 (channel-major, row-major inside a channel)
    [147:196]  foreground mask, 7 x 7        -> the silhouette: tells circle / rectangle / triangle
    [196:199]  mean R, G, B of the region
    [199:202]  mean R, G, B of the foreground inside the region (0 when it has no foreground)
    [202]      foreground fraction of the region

The first 196 values let a model read shape and colour of an object directly; the last 7 are
cheap summaries. Everything is deterministic (fixed sampling ratio, no randomness).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.ops import roi_align

from vqa_align.extract.images import to_rgb_array

POOL_SIZE = 7  # roi_align output is POOL_SIZE x POOL_SIZE per channel (as in Faster R-CNN heads)
MAP_CHANNELS = 4  # R, G, B, foreground mask: the channels pooled into the descriptor
REGION_FEATURE_DIM = MAP_CHANNELS * POOL_SIZE * POOL_SIZE + 3 + 3 + 1  # = 203
FOREGROUND_THRESHOLD = 60.0  # Euclidean RGB distance (0..255 scale) from the background colour
DEFAULT_MAX_SIDE = 256  # larger images are downscaled first (regions stay coarse anyway)
DEFAULT_MIN_AREA_FRACTION = 0.002  # 8 px of a 64 x 64 image: drops antialiasing specks
DEFAULT_MAX_COMPONENTS = 16
GRID = 2  # GRID x GRID fixed cells
SAMPLING_RATIO = 2  # fixed roi_align sampling points per bin: deterministic and fast
_CONVERGENCE_CHECK = 8  # label-propagation steps between convergence checks


@dataclass
class Regions:
    """Regions of one image; boxes are x1, y1, x2, y2 in pixels of the *original* image."""

    features: np.ndarray  # (K, REGION_FEATURE_DIM) float32
    boxes: np.ndarray  # (K, 4) float32
    image_size: tuple[int, int]  # (width, height) of the original image
    num_foreground: int  # the first num_foreground regions are foreground components


def foreground_mask(rgb: np.ndarray, threshold: float = FOREGROUND_THRESHOLD) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) bool: colour distance from the border median above ``threshold``."""
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]]).astype(np.float32)  # (2W+2H, 3)
    background = np.median(border, axis=0)  # robust: a shape touching the border is a minority
    dist = np.linalg.norm(rgb.astype(np.float32) - background, axis=-1)
    return dist > threshold


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a bool (H, W) mask -> (labels (H, W) int64 0 = background, count).

    Label propagation: every foreground pixel starts with a unique label and repeatedly takes the
    maximum over its 3 x 3 neighbourhood (max-pool) until nothing changes; vectorised in torch.
    """
    h, w = mask.shape
    m = torch.from_numpy(mask).view(1, 1, h, w)
    labels = torch.arange(1, h * w + 1, dtype=torch.float64).view(1, 1, h, w) * m  # float for max_pool
    while True:
        prev = labels
        for _ in range(_CONVERGENCE_CHECK):
            labels = F.max_pool2d(labels, 3, stride=1, padding=1) * m
        if torch.equal(labels, prev):
            break
    raw = labels.view(h, w).long().numpy()
    ids = np.unique(raw[mask])  # surviving label of each component, sorted
    dense = np.zeros((h, w), np.int64)
    dense[mask] = np.searchsorted(ids, raw[mask]) + 1  # relabel to 1..count
    return dense, len(ids)


def component_boxes(
    labels: np.ndarray, count: int, min_area: int, max_components: int
) -> np.ndarray:
    """Tight pixel-edge boxes (K, 4) float32 of components with area >= min_area, largest first."""
    if count == 0:
        return np.zeros((0, 4), np.float32)
    h, w = labels.shape
    ys, xs = np.nonzero(labels)
    lab = labels[ys, xs] - 1  # (P,) in [0, count)
    area = np.bincount(lab, minlength=count)
    x1 = np.full(count, w, np.int64)
    y1 = np.full(count, h, np.int64)
    x2 = np.zeros(count, np.int64)
    y2 = np.zeros(count, np.int64)
    np.minimum.at(x1, lab, xs)
    np.minimum.at(y1, lab, ys)
    np.maximum.at(x2, lab, xs + 1)  # +1: pixel x covers [x, x + 1)
    np.maximum.at(y2, lab, ys + 1)
    keep = np.flatnonzero(area >= min_area)
    keep = keep[np.lexsort((keep, -area[keep]))][:max_components]  # area desc, then label: deterministic
    return np.stack([x1[keep], y1[keep], x2[keep], y2[keep]], axis=1).astype(np.float32)


def fixed_boxes(width: int, height: int, grid: int = GRID) -> np.ndarray:
    """The whole image followed by a grid x grid tiling, (1 + grid^2, 4) float32 pixel boxes."""
    xs = np.linspace(0, width, grid + 1)
    ys = np.linspace(0, height, grid + 1)
    cells = [[xs[i], ys[j], xs[i + 1], ys[j + 1]] for j in range(grid) for i in range(grid)]
    return np.array([[0, 0, width, height], *cells], dtype=np.float32)


def describe_regions(rgb: np.ndarray, mask: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """roi_align descriptors (K, REGION_FEATURE_DIM) of pixel boxes (K, 4) over image (H, W, 3) + mask (H, W)."""
    img = torch.from_numpy(np.ascontiguousarray(rgb).copy()).permute(2, 0, 1).float() / 255.0  # (3, H, W)
    m = torch.from_numpy(mask).float().unsqueeze(0)  # (1, H, W)
    fmap = torch.cat([img, m, img * m], dim=0).unsqueeze(0)  # (1, 7, H, W): RGB, mask, RGB*mask
    rois = torch.cat([torch.zeros(len(boxes), 1), torch.from_numpy(boxes)], dim=1)  # (K, 5) batch idx
    pooled = roi_align(fmap, rois, (POOL_SIZE, POOL_SIZE), spatial_scale=1.0,
                       sampling_ratio=SAMPLING_RATIO, aligned=True)  # (K, 7, P, P)
    k = pooled.shape[0]
    grid = pooled[:, :MAP_CHANNELS].reshape(k, -1)  # (K, 196)
    mean_rgb = pooled[:, :3].mean(dim=(2, 3))  # (K, 3)
    fg_frac = pooled[:, 3].mean(dim=(1, 2))  # (K,)
    fg_sum = pooled[:, 3].sum(dim=(1, 2)).clamp_min(1e-6)
    fg_rgb = pooled[:, 4:7].sum(dim=(2, 3)) / fg_sum[:, None]  # (K, 3); 0 when no foreground
    feats = torch.cat([grid, mean_rgb, fg_rgb, fg_frac[:, None]], dim=1)
    return feats.numpy().astype(np.float32)


def extract_regions(
    image: np.ndarray | Image.Image,
    *,
    max_side: int = DEFAULT_MAX_SIDE,
    min_area_fraction: float = DEFAULT_MIN_AREA_FRACTION,
    max_components: int = DEFAULT_MAX_COMPONENTS,
    threshold: float = FOREGROUND_THRESHOLD,
) -> Regions:
    """Regions of one image: foreground components, the whole image, a 2 x 2 grid (see module doc)."""
    rgb = to_rgb_array(image)
    height, width = rgb.shape[:2]
    scale = 1.0
    if max(width, height) > max_side:  # work on a downscaled copy; report boxes in original pixels
        scale = max_side / max(width, height)
        small = (max(1, round(width * scale)), max(1, round(height * scale)))
        rgb = np.asarray(Image.fromarray(rgb).resize(small, Image.BILINEAR), dtype=np.uint8)
    h, w = rgb.shape[:2]
    mask = foreground_mask(rgb, threshold)
    labels, count = connected_components(mask)
    min_area = max(1, int(round(min_area_fraction * h * w)))
    fg_boxes = component_boxes(labels, count, min_area, max_components)
    boxes = np.concatenate([fg_boxes, fixed_boxes(w, h)], axis=0)  # (K, 4) in working pixels
    feats = describe_regions(rgb, mask, boxes)
    sx, sy = width / w, height / h
    boxes_orig = (boxes * np.array([sx, sy, sx, sy], np.float32)).astype(np.float32)
    return Regions(features=feats, boxes=boxes_orig, image_size=(width, height), num_foreground=len(fg_boxes))
