"""Bottom-up-attention TSV files -> feature store.

Format (Anderson et al.'s ``generate_tsv.py``): one image per line, six tab-separated fields
``image_id, image_w, image_h, num_boxes, boxes, features`` where ``boxes`` is the base64 of a
float32 (num_boxes, 4) array (x1, y1, x2, y2 in pixels) and ``features`` the base64 of a float32
(num_boxes, D) array. Fields are far longer than Python's default csv field limit.

    vqa-align prep tsv trainval_36/*.tsv --out features.h5
"""

from __future__ import annotations

import argparse
import base64
import binascii
import csv
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from vqa_align_prep.common import BadRecord, ImageRecord, common_kwargs, convert, report

FIELDNAMES = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")
BOX_COORDS = 4
# One field is a whole feature matrix in base64: ~400 kB for 36 x 2048, ~1.1 MB for 100 x 2048; a
# longer one (a file without tabs or newlines) is a bad record, not a line read whole into memory.
MAX_FIELD_BYTES = 64 * 1024 * 1024


def _decode(text: str, name: str) -> np.ndarray:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"field {name!r} is not valid base64 ({err})") from None
    if len(raw) % 4:
        raise ValueError(f"field {name!r} decodes to {len(raw)} bytes, not a whole number of float32")
    return np.frombuffer(raw, dtype=np.float32)


def parse_line(fields: Sequence[str]) -> tuple[int, np.ndarray, np.ndarray, tuple[int, int]]:
    """(image_id, features (n, D), boxes (n, 4), (w, h)) of one TSV row; ValueError says what is wrong."""
    if len(fields) != len(FIELDNAMES):
        raise ValueError(
            f"expected {len(FIELDNAMES)} tab-separated fields ({', '.join(FIELDNAMES)}), got {len(fields)}"
            + (" (truncated line?)" if len(fields) < len(FIELDNAMES) else "")
        )
    try:
        image_id, w, h, n = (int(v) for v in fields[:4])
    except ValueError:
        raise ValueError(f"image_id, image_w, image_h, num_boxes must be integers, got {list(fields[:4])}") from None
    if n < 1:
        raise ValueError(f"num_boxes must be >= 1, got {n}")
    boxes = _decode(fields[4], "boxes")
    if boxes.size != n * BOX_COORDS:
        raise ValueError(f"boxes hold {boxes.size} values, expected num_boxes x 4 = {n * BOX_COORDS} (truncated line?)")
    feats = _decode(fields[5], "features")
    if feats.size == 0 or feats.size % n:
        raise ValueError(f"features hold {feats.size} values, not a multiple of num_boxes = {n} (truncated line?)")
    return image_id, feats.reshape(n, -1), boxes.reshape(n, BOX_COORDS), (w, h)


def read_tsv(paths: Sequence[str | Path]) -> Iterator[ImageRecord | BadRecord]:
    """Stream the records of TSV files, in order."""
    csv.field_size_limit(MAX_FIELD_BYTES)
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"TSV file not found: {path}")
        with open(path, newline="", encoding="ascii", errors="replace") as f:
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            while True:
                try:
                    fields = next(reader)
                except StopIteration:
                    break
                except csv.Error as err:
                    yield BadRecord(f"{path}: line {reader.line_num}", f"unreadable TSV ({err})")
                    continue
                where = f"{path}: line {reader.line_num}"
                if not fields:
                    continue  # blank line
                try:
                    image_id, feats, boxes, size = parse_line(fields)
                except ValueError as err:
                    yield BadRecord(where, str(err))
                    continue
                yield ImageRecord(image_id, feats, boxes, size, where)


def run_prep(args: argparse.Namespace) -> int:
    stats = convert(read_tsv(args.inputs), args.out, inputs=args.inputs, source="bottom-up-attention TSV",
                    desc="TSV", **common_kwargs(args))
    return report(stats)
