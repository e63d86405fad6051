"""An uploaded picture -> uint8 RGB array, with a note for every repair and a message for every refusal.

Opening and RGB conversion are :mod:`vqa_align.extract.images`' (shared with the extraction
pipeline and the region extractor); this module adds what the person uploading needs to read:
huge images are downscaled, grayscale / transparent ones converted (each with a note), and what is
not a picture raises :class:`InputError` naming the problem.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from vqa_align.extract.images import (
    TRANSPARENT_MODES,
    WIDE_GRAYSCALE_MODES,
    ImageTooLarge,
    check_pixels,
    downscale,
    open_oriented,
    to_8bit_gray,
    to_rgb_array,
)
from vqa_align.serve.prediction import InputError

MAX_UPLOAD_SIDE = 1024  # uploads are downscaled to this longest side (regions use 256 px anyway)
DISPLAY_SIDE = 512  # longest side of the picture kept for drawing
GRAYSCALE_MODES = ("L", "LA", "1", *WIDE_GRAYSCALE_MODES)
RESIZABLE_MODES = ("RGB", "RGBA", "L", "LA")  # PIL cannot resize P, I;16, CMYK ... directly
UPLOAD = "the upload"  # how messages name a picture that has no file name


def load_upload(image: Any, max_side: int = MAX_UPLOAD_SIDE) -> tuple[np.ndarray, list[str]]:
    """Any uploaded picture -> (uint8 (H, W, 3), notes). Raises InputError for what is not an image.

    Accepts a file path, bytes, a PIL image or a uint8 / float array (H, W), (H, W, 1|3|4).
    Images larger than ``max_side`` are downscaled; grayscale and palette images are converted
    to RGB, transparency is composited over white (each with a note).
    """
    picture, name = _open_upload(image, max_side)
    width, height = picture.size
    if width < 1 or height < 1:
        raise InputError(f"{name} is empty ({width} x {height} pixels)")
    mode = picture.mode  # the notes describe the picture as uploaded
    if mode in WIDE_GRAYSCALE_MODES:  # stretched to 8 bits before resizing, which would clip it
        picture = to_8bit_gray(picture)
    notes: list[str] = []
    if max(width, height) > max_side:
        if mode not in RESIZABLE_MODES:
            picture = picture.convert("RGBA" if "A" in mode or "transparency" in picture.info else "RGB")
        picture = downscale(picture, max_side)
        notes.append(f"The image ({width} x {height} px) was downscaled to {picture.width} x {picture.height} px.")
    if mode in GRAYSCALE_MODES:
        notes.append("The grayscale image was converted to RGB.")
    if mode in TRANSPARENT_MODES or "transparency" in picture.info:
        notes.append("Transparent parts of the image were filled with white.")
    try:
        rgb = to_rgb_array(picture)
    except ValueError as err:
        raise InputError(f"{name}: {err}") from None
    return rgb, notes


def _open_upload(image: Any, max_side: int) -> tuple[Image.Image, str]:
    """(PIL picture in its own mode, the name messages use for it)."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise InputError(f"image file not found: {path}")
        return _decode(path, path.name, max_side), path.name
    if isinstance(image, (bytes, bytearray)):
        return _decode(io.BytesIO(image), UPLOAD, max_side), UPLOAD
    if isinstance(image, np.ndarray):
        _check_pixels(image.shape[1] if image.ndim > 1 else 1, image.shape[0], UPLOAD)
        return Image.fromarray(_uint8_array(image)), UPLOAD
    if isinstance(image, Image.Image):
        _check_pixels(*image.size, UPLOAD)
        return image, UPLOAD
    raise InputError(f"cannot read an image from a {type(image).__name__}")


def _decode(source: Path | io.BytesIO, name: str, max_side: int) -> Image.Image:
    """An encoded picture (file or bytes), upright; PIL's errors become messages for the person uploading."""
    try:
        picture, _ = open_oriented(source, max_side)
    except ImageTooLarge as err:
        raise InputError(f"{name}: {err}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        if isinstance(err, UnidentifiedImageError) or "cannot identify" in str(err):
            raise InputError(f"{name} is not an image file (expected PNG, JPEG, WebP, BMP, GIF ...)") from None
        raise InputError(f"{name} could not be decoded as an image ({err})") from None
    return picture


def _check_pixels(width: int, height: int, name: str) -> None:
    """The pixel limit of every picture (extract/images.py) for pictures given decoded."""
    try:
        check_pixels(width, height)
    except ImageTooLarge as err:
        raise InputError(f"{name}: {err}") from None


def _uint8_array(arr: np.ndarray) -> np.ndarray:
    """A numeric array (H, W), (H, W, 1|3|4) -> uint8 (H, W) or (H, W, 3|4); floats in [0, 1] or [0, 255]."""
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.number) or arr.size == 0:
            raise InputError(f"image array must be numeric, got dtype {arr.dtype}")
        arr = np.nan_to_num(arr.astype(np.float64))
        arr = arr * 255.0 if arr.max(initial=0.0) <= 1.0 else arr
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)) or min(arr.shape[:2]) < 1:
        raise InputError(f"image array must have shape (H, W), (H, W, 3) or (H, W, 4), got {arr.shape}")
    return arr


def display_copy(rgb: np.ndarray, max_side: int = DISPLAY_SIDE) -> np.ndarray:
    """A downscaled copy for drawing (figures are ~300 px wide; drawing 1000s of px is wasted time)."""
    h, w = rgb.shape[:2]
    if max(h, w) <= max_side:
        return rgb
    return np.asarray(downscale(Image.fromarray(rgb), max_side))
