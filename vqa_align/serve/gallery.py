"""The gallery: pictures of stored images, their thumbnails, and example questions about them.

An image loader maps a store image id to its picture, (H, W, 3) uint8, or None when the data
set's pictures are not at hand (the app then draws the region boxes on grey).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageDraw

from vqa_align.config import Config
from vqa_align.errors import UserError
from vqa_align.extract.images import BadImage, decode_image
from vqa_align.extract.pipeline import IDS_SUFFIX, list_images
from vqa_align.serve.images import MAX_UPLOAD_SIDE
from vqa_align.untrusted_files import MAX_DATASET_JSON_BYTES, read_json

ImageLoader = Callable[[int], "np.ndarray | None"]
THUMBNAIL_BACKGROUND = (210, 210, 210)  # grey: a store image without a picture
THUMBNAIL_BOXES = (60, 60, 160)


@dataclass
class Example:
    """An example of the gallery: an image of the store with a question asked about it."""

    image_id: int
    question: str = ""
    answer: str | None = None


# ----------------------------------------------------------------------------------------------
# Image loaders
# ----------------------------------------------------------------------------------------------


def ids_json_loader(store_path: str | Path) -> ImageLoader | None:
    """Pictures of a store written by ``vqa-align extract`` (its ``<store>.ids.json``), or None."""
    path = Path(store_path)
    ids_file = path.with_name(path.name + IDS_SUFFIX)
    if not ids_file.is_file():
        return None
    try:
        mapping = {int(k): Path(v) for k, v in read_json(ids_file, MAX_DATASET_JSON_BYTES, expect=dict).items()}
    except (UserError, ValueError, TypeError):  # damaged: the app then shows no pictures, not an error
        return None
    return _files_loader(mapping)


def folder_image_loader(folder: str | Path) -> ImageLoader:
    """Pictures of a store from the folder they were extracted from (``--images DIR``).

    Ids are computed from the file names exactly as ``vqa-align extract`` computes them.
    """
    return _files_loader(dict(list_images([folder])))


def _files_loader(mapping: dict[int, Path]) -> ImageLoader:
    def load(image_id: int) -> np.ndarray | None:
        path = mapping.get(int(image_id))
        if path is None:
            return None
        try:
            picture, _ = decode_image(path, MAX_UPLOAD_SIDE)
        except BadImage:
            return None
        return np.asarray(picture)

    return load


def default_image_loader(config: Config) -> ImageLoader:
    """Picture of a store image id: the easy-VQA PNG; None for data sets whose pictures we lack."""
    if config.data.dataset != "easy_vqa":
        return lambda image_id: None

    def load(image_id: int) -> np.ndarray | None:
        from vqa_align.data.easy_vqa import load_image

        try:
            return load_image(image_id)
        except (UserError, OSError):
            return None

    return load


# ----------------------------------------------------------------------------------------------
# Thumbnails and examples
# ----------------------------------------------------------------------------------------------


def thumbnail(picture: np.ndarray | None, boxes: np.ndarray, image_size: tuple[int, int],
              size: int = 128) -> np.ndarray:
    """(size, size', 3) uint8 gallery thumbnail: the picture, or without one its normalised boxes
    (N, 4) drawn on grey in the proportions of ``image_size`` (width, height)."""
    if picture is not None:
        im = Image.fromarray(picture)
        scale = size / max(im.size)
        # Nearest neighbour for upscaling keeps easy-VQA's 64 px shapes crisp.
        resample = Image.NEAREST if scale > 1 else Image.BILINEAR
        return np.asarray(im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), resample))
    w, h = image_size
    scale = size / max(w, h)
    tw, th = max(1, round(w * scale)), max(1, round(h * scale))
    im = Image.new("RGB", (tw, th), THUMBNAIL_BACKGROUND)
    draw = ImageDraw.Draw(im)
    for x1, y1, x2, y2 in boxes * np.array([tw, th, tw, th]):
        draw.rectangle((x1, y1, x2, y2), outline=THUMBNAIL_BOXES)
    return np.asarray(im)


def question_files(config: Config, store: Any, split: str = "val") -> list[Path]:
    """The ``split`` ("val": where the gallery's questions come from, or "train") questions of a
    checkpoint's data config."""
    data = config.data
    listed = data.val_questions if split == "val" else data.train_questions
    if listed:
        return [Path(p).expanduser() for p in listed]
    if data.dataset == "easy_vqa" and store is not None:
        from vqa_align.data.easy_vqa import prepared_files

        return [prepared_files(store.path.parent)[split]["questions"]]
    return []


def question_image_ids(files: list[Path]) -> set[int]:
    """Image ids asked about in VQA-format question files (unreadable files are skipped)."""
    ids: set[int] = set()
    for path in files:
        try:
            questions = read_json(path, MAX_DATASET_JSON_BYTES, expect=dict).get("questions", [])
        except (UserError, OSError, AttributeError):
            continue
        ids.update(q["image_id"] for q in questions if isinstance(q, dict) and isinstance(q.get("image_id"), int))
    return ids


def find_examples(store: Any, files: list[Path], n: int) -> list[Example]:
    """Up to ``n`` images of ``store`` with the first question asked about each in ``files``;
    plain store images when the files hold too few (or none can be read)."""
    if store is None:
        return []
    examples: dict[int, Example] = {}
    for path in files:
        try:
            questions = read_json(path, MAX_DATASET_JSON_BYTES, expect=dict).get("questions", [])
        except (OSError, UserError):
            continue
        for q in questions:
            image_id = q.get("image_id") if isinstance(q, dict) else None
            if isinstance(image_id, int) and image_id not in examples and image_id in store:
                examples[image_id] = Example(image_id, str(q.get("question", "")))
                if len(examples) >= n:
                    return list(examples.values())
    for image_id in store.image_ids[:n]:  # no questions file: plain store images
        examples.setdefault(int(image_id), Example(int(image_id)))
        if len(examples) >= n:
            break
    return list(examples.values())
