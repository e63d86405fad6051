"""A folder of per-image ``.npz`` files (MCAN / OpenVQA) -> feature store.

Each file holds ``x`` (D, N) float32 -- features stored *transposed* --, ``bbox`` (N, 4) pixels,
``image_h``, ``image_w``, ``num_bbox``; the image id is the last number in the file name, e.g.
``COCO_train2014_000000123456.jpg.npz`` -> 123456. Files are never unpickled.

    vqa-align prep npz coco_extract/train2014 coco_extract/val2014 --out features.h5
"""

from __future__ import annotations

import argparse
import re
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from vqa_align_prep.common import BadRecord, ImageRecord, common_kwargs, convert, report, scalar

KEYS = ("x", "bbox", "image_h", "image_w", "num_bbox")
_ID_RE = re.compile(r"(\d+)(?:\.[A-Za-z]+)?\.npz$")


def image_id_from_name(name: str) -> int:
    """``COCO_train2014_000000123456.jpg.npz`` -> 123456; ``123.npz`` -> 123."""
    m = _ID_RE.search(name)
    if m is None:
        raise ValueError(f"cannot parse an image id from the file name {name!r} (expected e.g. COCO_train2014_000000123456.jpg.npz)")
    return int(m.group(1))


def list_npz(inputs: Sequence[str | Path]) -> list[Path]:
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(item.glob("*.npz"))
            if not found:
                raise FileNotFoundError(f"no .npz files in {item}")
            files += found
        elif item.is_file() and item.name.endswith(".npz"):
            files.append(item)
        else:
            raise FileNotFoundError(f"not a folder of .npz files: {item}")
    return files


def parse_npz(path: Path) -> tuple[int, np.ndarray, np.ndarray, tuple[int, int]]:
    image_id = image_id_from_name(path.name)
    if not zipfile.is_zipfile(path):  # np.load would take it for a pickle and say so
        raise ValueError("not a readable .npz file (not a zip archive; truncated download?)")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in KEYS if k not in z.files]
            if missing:
                raise ValueError(f"missing array(s) {missing} (has {sorted(z.files)})")
            x, bbox = z["x"], z["bbox"]
            h, w, n = scalar(z["image_h"], "image_h"), scalar(z["image_w"], "image_w"), scalar(z["num_bbox"], "num_bbox")
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise ValueError(f"not a readable .npz file ({err})") from None
    if bbox.ndim != 2 or bbox.shape != (n, 4):
        raise ValueError(f"bbox has shape {bbox.shape}, expected (num_bbox={n}, 4)")
    if x.ndim != 2 or x.shape[1] != n:
        hint = " -- x must be stored (D, N), as MCAN does" if x.ndim == 2 and x.shape[0] == n else ""
        raise ValueError(f"x has shape {x.shape}, expected (D, num_bbox={n}){hint}")
    return image_id, np.ascontiguousarray(x.T), bbox, (w, h)  # (D, N) -> (N, D)


def read_npz(files: Sequence[Path]) -> Iterator[ImageRecord | BadRecord]:
    for path in files:
        try:
            image_id, feats, boxes, size = parse_npz(path)
        except ValueError as err:  # includes numpy's refusal of pickled object arrays
            yield BadRecord(str(path), str(err))
            continue
        yield ImageRecord(image_id, feats, boxes, size, str(path))


def run_prep(args: argparse.Namespace) -> int:
    files = list_npz(args.inputs)
    stats = convert(read_npz(files), args.out, inputs=args.inputs, source="MCAN/OpenVQA npz", total=len(files),
                    desc="npz", **common_kwargs(args))
    return report(stats)
