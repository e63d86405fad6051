"""easy-VQA (the ``easy-vqa`` PyPI package) -> feature store + VQA-v2-format JSON, once, in the cache.

The package ships 64 x 64 PNGs (4,000 train, 1,000 test; one coloured shape each) and questions
as ``[question, answer, image_id]`` lists. Preparing writes to ``<cache>/easy_vqa/``::

    features.h5              region features of all 5,000 images (vqa_align.extract.regions extractor)
    train_questions.json     VQA v2 schema: {"questions": [{image_id, question, question_id}]}
    train_annotations.json   VQA v2 schema: {"annotations": [{..., answers: 10 x the one answer}]}
    val_questions.json       the official easy-VQA *test* set (easy-VQA has no separate val set)
    val_annotations.json
    manifest.json            written last: the marker that the folder is complete

Splits: ``train`` = the official train set; ``val`` and ``test`` both = the official test set.
Image ids: train images keep their id; test image ``k`` becomes ``TEST_IMAGE_ID_OFFSET + k``
(the two sets both count from 0). Question ids follow VQA: ``image_id * 1000 + k``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from vqa_align.data.vqa_v2 import question_type
from vqa_align.errors import DataFormatError, UserError
from vqa_align.extract.images import BadImage, decode_image
from vqa_align.extract.regions import REGION_FEATURE_DIM, extract_regions
from vqa_align.extract.feature_store import FeatureStoreWriter
from vqa_align.paths import cache_root
from vqa_align.progress import progress_bar
from vqa_align.untrusted_files import MAX_DATASET_JSON_BYTES, MAX_META_BYTES, read_json

PREP_VERSION = 1
TEST_IMAGE_ID_OFFSET = 100_000  # easy-VQA test image k -> image id 100000 + k
QUESTIONS_PER_IMAGE_ID = 1000  # question_id = image_id * 1000 + k (as in VQA v2)
FOLDER = "easy_vqa"
MANIFEST = "manifest.json"
FEATURES = "features.h5"
# prepared split name -> easy-VQA package folder
SOURCE_SPLITS = {"train": "train", "val": "test"}
SPLIT_ALIASES = {"train": "train", "val": "val", "test": "val"}  # test = val = official test set
YES_NO = ("yes", "no")


def _package_data() -> Path:
    try:
        import easy_vqa
    except ImportError:
        raise UserError("the easy-vqa package is not installed: pip install easy-vqa") from None
    return Path(easy_vqa.__file__).parent / "data"


def easy_vqa_image_path(image_id: int) -> Path:
    """Path of the original PNG of a prepared easy-VQA image id (train k -> k, test k -> 100000 + k)."""
    image_id = int(image_id)
    split, k = ("test", image_id - TEST_IMAGE_ID_OFFSET) if image_id >= TEST_IMAGE_ID_OFFSET else ("train", image_id)
    path = _package_data() / split / "images" / f"{k}.png"
    if k < 0 or not path.is_file():
        raise UserError(f"easy-VQA image id {image_id} does not exist (looked for {path})")
    return path


def _image_id(split: str, k: int) -> int:
    return k + (TEST_IMAGE_ID_OFFSET if split == "test" else 0)


def _split_json(source_split: str, prepared: str, limit: int | None) -> tuple[dict[str, Any], dict[str, Any], list[int]]:
    """VQA-v2-format (questions, annotations) of one split and the image ids it uses."""
    path = _package_data() / source_split / "questions.json"
    raw = read_json(path, MAX_DATASET_JSON_BYTES, expect=list)
    questions, annotations, per_image = [], [], {}
    for i, item in enumerate(raw):
        if not (isinstance(item, list) and len(item) == 3):
            raise UserError(f"{path}: record {i}: expected [question, answer, image_id], got {item!r}")
        text, answer, k = item
        if limit is not None and k >= limit:
            continue
        image_id = _image_id(source_split, int(k))
        n = per_image.get(image_id, 0)
        per_image[image_id] = n + 1
        qid = image_id * QUESTIONS_PER_IMAGE_ID + n
        questions.append({"image_id": image_id, "question": text, "question_id": qid})
        annotations.append({
            "question_id": qid,
            "image_id": image_id,
            "question_type": question_type(text),
            "answer_type": "yes/no" if answer in YES_NO else "other",
            "multiple_choice_answer": answer,
            # every human answer is the single easy-VQA answer: 10 matches -> soft target 1.0
            "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": j + 1} for j in range(10)],
        })
    info = {"description": "easy-VQA in the VQA v2 format", "source_split": source_split}
    q = {"info": info, "task_type": "Open-Ended", "data_type": "easy_vqa", "data_subtype": prepared,
         "license": {}, "questions": questions}
    a = {"info": info, "data_type": "easy_vqa", "data_subtype": prepared, "license": {}, "annotations": annotations}
    return q, a, sorted(per_image)


def _manifest_ok(folder: Path, limit: int | None) -> bool:
    path = folder / MANIFEST
    if not path.is_file():
        return False
    try:
        manifest = read_json(path, MAX_META_BYTES, expect=dict)
    except UserError:  # damaged: prepare again
        return False
    return manifest.get("version") == PREP_VERSION and manifest.get("limit") == limit


def prepared_files(folder: Path) -> dict[str, dict[str, Path]]:
    """split -> {"questions", "annotations"} paths of a prepared folder (test aliases val)."""
    return {
        split: {"questions": folder / f"{src}_questions.json", "annotations": folder / f"{src}_annotations.json"}
        for split, src in SPLIT_ALIASES.items()
    }


def prepare_easy_vqa(
    cache_dir: str | Path | None = None,
    overwrite: bool = False,
    *,
    limit: int | None = None,
    progress: bool = True,
) -> Path:
    """Prepare easy-VQA under ``<cache>/easy_vqa`` (once) and return that folder.

    ``limit`` keeps only images with package id < limit in each split (for tests). A folder with
    a complete manifest for the same ``limit`` is reused unless ``overwrite``.
    """
    folder = cache_root(cache_dir) / FOLDER
    if not overwrite and _manifest_ok(folder, limit):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f"{FOLDER}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        all_images: list[tuple[int, Path]] = []
        counts: dict[str, dict[str, int]] = {}
        for prepared, source in SOURCE_SPLITS.items():
            q, a, used_ids = _split_json(source, prepared, limit)
            (tmp / f"{prepared}_questions.json").write_text(json.dumps(q))
            (tmp / f"{prepared}_annotations.json").write_text(json.dumps(a))
            # every image of the package, also those without questions (there are none today)
            image_dir = _package_data() / source / "images"
            ks = sorted(int(p.stem) for p in image_dir.glob("*.png"))
            if limit is not None:
                ks = [k for k in ks if k < limit]
            missing = sorted(set(used_ids) - {_image_id(source, k) for k in ks})
            if missing:
                raise UserError(f"{image_dir}: questions refer to images without a PNG: {missing[:5]}")
            all_images += [(_image_id(source, k), image_dir / f"{k}.png") for k in ks]
            counts[prepared] = {"questions": len(q["questions"]), "images": len(ks)}
        with FeatureStoreWriter(tmp / FEATURES, source="easy_vqa regions (vqa_align.extract.regions)") as writer:
            for image_id, png in progress_bar(all_images, desc="easy-VQA regions", unit="img", enabled=progress):
                regions = extract_regions(_decode(png))
                writer.add(image_id, regions.features, regions.boxes, regions.image_size, record=str(png))
        manifest = {
            "version": PREP_VERSION, "limit": limit, "feature_dim": REGION_FEATURE_DIM,
            "test_image_id_offset": TEST_IMAGE_ID_OFFSET, "splits": counts,
            "aliases": {"test": "val (the official easy-VQA test set)"},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))  # last: marks completion
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def easy_vqa_images(limit: int | None = None) -> list[tuple[int, Path]]:
    """(prepared image id, PNG path) of every easy-VQA picture (package id < limit in each split)."""
    items: list[tuple[int, Path]] = []
    for source in SOURCE_SPLITS.values():
        image_dir = _package_data() / source / "images"
        ks = sorted(int(p.stem) for p in image_dir.glob("*.png"))
        items += [(_image_id(source, k), image_dir / f"{k}.png") for k in ks if limit is None or k < limit]
    return items


def backbone_features_file(backbone: str) -> str:
    """File name of the easy-VQA store made with a ``vqa-align extract`` backbone."""
    return f"features-{backbone}.h5"


def prepare_easy_vqa_backbone(
    backbone: str,
    cache_dir: str | Path | None = None,
    *,
    limit: int | None = None,
    params: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    batch_size: int = 16,  # CPU: larger batches spill the activations out of the caches (2x slower at 64)
    num_workers: int = 1,
) -> Path:
    """Features of the easy-VQA pictures from ``backbone`` (default parameters), once, in the cache.

    The store sits beside the built-in one (``<cache>/easy_vqa/features-<backbone>.h5``) and uses
    the same image ids, so the prepared questions work with either; a run selects it with
    ``data.easy_vqa_backbone``. An interrupted extraction resumes (``vqa-align extract`` parts).
    """
    from vqa_align.extract.pipeline import ExtractOptions, extract_images
    from vqa_align.extract.backbones import build_backbone

    folder = prepare_easy_vqa(cache_dir, limit=limit, progress=progress)
    out = folder / backbone_features_file(backbone)
    if out.is_file() and not overwrite:
        return out
    model = build_backbone(backbone, params, "cuda" if torch_cuda() else "cpu")
    options = ExtractOptions(batch_size=batch_size, num_workers=num_workers, progress=progress)
    extract_images(easy_vqa_images(limit), model, out, options, overwrite=overwrite)
    return out


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def load_image(image_id: int) -> np.ndarray:
    """The original easy-VQA picture (H, W, 3) uint8 of a prepared image id."""
    return np.asarray(_decode(easy_vqa_image_path(image_id)))


def _decode(png: Path) -> Any:
    """An easy-VQA picture as RGB, opened like every other picture (vqa_align/extract/images.py)."""
    try:
        return decode_image(png)[0]
    except BadImage as err:
        raise DataFormatError(f"{png}: {err}") from None


def run_prep(args: argparse.Namespace) -> int:
    backbone = getattr(args, "backbone", None)
    folder = prepare_easy_vqa(args.cache_dir, overwrite=args.overwrite and not backbone)
    manifest = read_json(folder / MANIFEST, MAX_META_BYTES, expect=dict)
    print(f"easy-VQA prepared in {folder}: {json.dumps(manifest['splits'])}")
    if backbone:
        out = prepare_easy_vqa_backbone(backbone, args.cache_dir, overwrite=args.overwrite)
        print(f"easy-VQA features of {backbone}: {out} (train with --set data.easy_vqa_backbone={backbone})")
    return 0
