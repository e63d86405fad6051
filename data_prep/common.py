"""Shared converter plumbing: records in, feature store out, bad records as errors or counted skips.

Each converter (``tsv``, ``npz``, ``h5``) is a generator of :class:`ImageRecord` (one image) or
:class:`BadRecord` (a record that could not be parsed). :func:`convert` streams them into a
:class:`~vqa_align.extract.feature_store.FeatureStoreWriter` with a progress bar: a bad record (or one the writer
rejects: NaN/inf, wrong feature dimension, duplicate id) is an error naming the file and record,
or with ``skip_missing`` a counted warning.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vqa_align.extract.feature_store import DataFormatError, FeatureStoreWriter, StoreRecordError, store_files
from vqa_align.paths import check_output_paths
from vqa_align.progress import progress_bar

log = logging.getLogger("vqa_align_prep")
MAX_LOGGED_SKIPS = 10  # individual warnings before only the count is kept


@dataclass
class ImageRecord:
    """One image: features (n, D), boxes (n, 4) x1, y1, x2, y2 in pixels, size (w, h)."""

    image_id: int
    features: np.ndarray
    boxes: np.ndarray
    image_size: tuple[int, int]
    where: str  # "file: line 3", "file.npz", "file.h5: row 7" -- for messages


@dataclass
class BadRecord:
    where: str
    problem: str


@dataclass
class ConvertStats:
    out: Path
    images: int
    boxes: int
    skipped: int


def convert(
    records: Iterable[ImageRecord | BadRecord],
    out: str | Path,
    *,
    source: str,
    inputs: Iterable[str | Path | None] = (),
    dtype: str = "float16",
    overwrite: bool = False,
    skip_missing: bool = False,
    total: int | None = None,
    desc: str = "converting",
    progress: bool = True,
) -> ConvertStats:
    """Write ``records`` to the store ``out`` (via ``<out>.tmp``, renamed on success); ``inputs``: the
    files and folders the records are read from (an ``out`` that is one, or inside one, is refused)."""
    check_output_paths(store_files(out), inputs)
    skipped = boxes = 0

    def skip(message: str) -> None:
        nonlocal skipped
        if not skip_missing:
            raise DataFormatError(f"{message} (use --skip-missing to skip bad records with a warning)")
        skipped += 1
        if skipped <= MAX_LOGGED_SKIPS:
            log.warning("skipped: %s", message)

    with FeatureStoreWriter(out, dtype=dtype, source=source, overwrite=overwrite) as writer:
        for rec in progress_bar(records, total=total, desc=desc, unit="img", enabled=progress):
            if isinstance(rec, BadRecord):
                skip(f"{rec.where}: {rec.problem}")
                continue
            try:
                writer.add(rec.image_id, rec.features, rec.boxes, rec.image_size, record=rec.where)
            except StoreRecordError as err:
                skip(str(err))
                continue
            boxes += len(rec.features)
        images = len(writer)
    if skipped:
        log.warning("%s: skipped %d bad record(s)", out, skipped)
    return ConvertStats(Path(out), images, boxes, skipped)


def report(stats: ConvertStats) -> int:
    """CLI summary line; exit status 0."""
    extra = f", skipped {stats.skipped} bad record(s)" if stats.skipped else ""
    print(f"wrote {stats.out}: {stats.images} images, {stats.boxes} boxes{extra}")
    return 0


def common_kwargs(args: argparse.Namespace) -> dict[str, object]:
    """The writer options every converter takes from the CLI."""
    return {"dtype": args.dtype, "overwrite": args.overwrite, "skip_missing": args.skip_missing}


def scalar(value: np.ndarray, name: str) -> int:
    """A 0-d or one-element array as int (npz fields such as image_h are stored that way)."""
    arr = np.asarray(value)
    if arr.size != 1:
        raise ValueError(f"{name} must be a single number, got shape {arr.shape}")
    return int(arr.reshape(()))
