"""Pictures -> RGB: the one place that opens image files and converts any PIL mode to RGB.

Used by the extraction pipeline (files -> backbone inputs), the built-in region extractor (any
image -> uint8 array) and the app's uploads (:mod:`vqa_align.serve.images`, which adds the
messages for the person uploading).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, ImageFile, ImageOps

DEFAULT_MAX_SIDE = 2048  # decoded pictures are downscaled to this longest side (no backbone needs more)
# The largest picture opened, in pixels (width x height), checked from the file's header before
# anything is decoded. 50 Mpx takes every phone photo (48-50 Mpx sensors: 8000 x 6000, 8160 x 6120)
# and most camera photos; decoding one costs at most 50 M x 4 bytes = 200 MB (RGBA) plus its RGB
# copy, so two uploads at once stay well under a gigabyte. A few hundred kilobytes of PNG can
# declare 13,000 x 13,000 pixels (2 GB decoded); PIL itself only warns from 89 Mpx and refuses from
# 179 Mpx, so the limit is ours (docs/extract.md, docs/app.md).
MAX_IMAGE_PIXELS = 50_000_000
EXIF_ORIENTATION = 0x0112  # EXIF tag: how the camera was held
ROTATING_ORIENTATIONS = (5, 6, 7, 8)  # orientations that swap width and height
WIDE_GRAYSCALE_MODES = ("I;16", "I;16B", "I;16L", "I", "F")  # 16/32-bit integer and float grayscale
TRANSPARENT_MODES = ("RGBA", "LA", "PA")
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error (skipped), never half a picture


class BadImage(Exception):
    """A file that cannot be used as a picture; the message says why (one line)."""


class ImageTooLarge(ValueError):
    """A picture with more than MAX_IMAGE_PIXELS pixels; refused before it is decoded."""


def check_pixels(width: int, height: int) -> None:
    """Raise ImageTooLarge when a ``width`` x ``height`` picture has more than MAX_IMAGE_PIXELS pixels."""
    limit = MAX_IMAGE_PIXELS
    if width * height > limit:
        raise ImageTooLarge(f"{width} x {height} pixels ({width * height / 1e6:.0f} Mpx) is more than the limit of "
                            f"{limit / 1e6:g} Mpx; downscale it first")


def to_8bit_gray(image: Image.Image) -> Image.Image:
    """16/32-bit or float grayscale -> 8-bit "L", stretched over the picture's own value range.

    Why stretch: PIL's own convert clips such values at 255, which turns most 16-bit pictures white.
    """
    arr = np.asarray(image, dtype=np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    arr = (arr - lo) / (hi - lo if hi > lo else 1.0) * 255.0
    return Image.fromarray(arr.round().astype(np.uint8), "L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: 16-bit/float scaled to 8 bits by their range, alpha over white, CMYK converted.

    Alpha goes over white because transparent backgrounds (PNG logos, shapes) are meant as blank.
    """
    if image.mode in WIDE_GRAYSCALE_MODES:
        image = to_8bit_gray(image)
    if image.mode in TRANSPARENT_MODES or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image.convert("RGB")


def to_rgb_array(image: np.ndarray | Image.Image) -> np.ndarray:
    """Any PIL image or uint8 array (H, W), (H, W, 1|3|4) -> uint8 (H, W, 3) (see :func:`to_rgb`)."""
    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            raise ValueError(f"image array must be uint8, got {arr.dtype}")
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
            raise ValueError(f"image array must have shape (H, W), (H, W, 3) or (H, W, 4), got {arr.shape}")
        image = Image.fromarray(arr)
    rgb = np.asarray(to_rgb(image), dtype=np.uint8)
    if rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ValueError(f"image is empty: shape {rgb.shape}")
    return rgb


def downscale(image: Image.Image, max_side: int) -> Image.Image:
    """A copy whose longest side is at most ``max_side`` (the same object when it already is)."""
    if max(image.size) <= max_side:
        return image
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.BILINEAR, reducing_gap=2.0)


def open_oriented(source: str | Path | IO[bytes], max_side: int) -> tuple[Image.Image, tuple[int, int]]:
    """(decoded picture in its own mode, upright; (width, height) of the full-size original, upright).

    The one function that opens image files. Pictures above MAX_IMAGE_PIXELS raise ImageTooLarge
    before decoding (``Image.open`` reads only the header). JPEGs are decoded at a reduced scale no
    smaller than ``max_side`` (much faster); the size is read before that, so boxes can be reported
    in the original's pixels. Raises PIL's errors otherwise.
    """
    with warnings.catch_warnings():
        # PIL warns from 89 Mpx: such pictures are refused just below, with our limit's message.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            opened = Image.open(source)
        except Image.DecompressionBombError as err:  # above 179 Mpx PIL refuses in open() already
            raise ImageTooLarge(f"more than the limit of {MAX_IMAGE_PIXELS / 1e6:g} Mpx ({err})") from None
        with opened as im:
            w0, h0 = im.size  # the header's size, before draft() shrinks the decoded size of JPEGs
            check_pixels(w0, h0)
            orientation = im.getexif().get(EXIF_ORIENTATION, 1)
            im.draft("RGB", (max_side, max_side))
            oriented = ImageOps.exif_transpose(im)  # phone photos: as the camera was held
            oriented.load()
    full = (h0, w0) if orientation in ROTATING_ORIENTATIONS else (w0, h0)
    return oriented, full


def decode_image(path: str | Path, max_side: int = DEFAULT_MAX_SIDE) -> tuple[Image.Image, tuple[int, int]]:
    """(RGB picture, (width, height) of the original after EXIF rotation); raises BadImage.

    The picture is at most ``max_side`` on its longest side; boxes are reported in the original
    size, so a store of a downscaled picture looks the same as one of the full picture.
    """
    try:
        oriented, full = open_oriented(Path(path), max_side)
        image = to_rgb(oriented)
    except FileNotFoundError:
        raise BadImage("file not found") from None
    except ImageTooLarge as err:
        raise BadImage(str(err)) from None
    except (OSError, ValueError, SyntaxError) as err:  # PIL: UnidentifiedImageError, truncated data ...
        raise BadImage(_first_line(err)) from None
    if image.width < 1 or image.height < 1:
        raise BadImage("empty picture")
    return downscale(image, max_side), full


def _first_line(err: Any) -> str:
    msg = str(err).splitlines()[0] if str(err) else type(err).__name__
    return "not an image file" if "cannot identify image file" in msg else msg
