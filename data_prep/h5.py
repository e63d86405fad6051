"""Fixed-box HDF5 files (``image_features`` (N_img, K, D), ``image_bb`` (N_img, K, 4)) -> feature store.

The image id of each row comes from ``--ids-json`` (a JSON object ``{"image_id": row}``, e.g.
the ``*_imgid2idx`` mapping of bottom-up-attention-vqa converted from pickle to JSON; pickles are
never read) or from an ``image_ids`` (N_img,) dataset in the file. Only mapped rows are converted.
Image sizes come from ``image_w``/``image_h`` (N_img,) or ``image_sizes`` (N_img, 2) datasets, or
are recovered from ``spatial_features`` (N_img, K, >= 4; boxes divided by the image size).

    vqa-align prep h5 trainval36.hdf5 --ids-json trainval36_imgid2idx.json --out features.h5
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from vqa_align.extract.feature_store import DataFormatError
from vqa_align_prep.common import ImageRecord, common_kwargs, convert, report
from vqa_align.untrusted_files import MAX_DATASET_JSON_BYTES, read_json

READ_BLOCK = 64  # images read per HDF5 call (64 x 36 x 2048 float32 = 19 MB)


def load_row_ids(path: Path, f: h5py.File, ids_json: str | Path | None) -> list[tuple[int, int]]:
    """(image_id, row) pairs sorted by row, validated against the number of rows."""
    n_img = f["image_features"].shape[0]
    if ids_json is not None:
        jpath = Path(ids_json)
        if not jpath.is_file():
            raise FileNotFoundError(f"ids JSON not found: {jpath}")
        mapping = read_json(jpath, MAX_DATASET_JSON_BYTES, expect=dict)
        pairs = []
        for key, row in mapping.items():
            try:
                image_id = int(key)
            except ValueError:
                raise DataFormatError(f"{jpath}: key {key!r} is not an integer image id") from None
            if not isinstance(row, int) or isinstance(row, bool) or not 0 <= row < n_img:
                raise DataFormatError(f"{jpath}: image {key}: row {row!r} is not in [0, {n_img})")
            pairs.append((image_id, row))
    elif "image_ids" in f:
        ids = f["image_ids"][()]
        if ids.shape != (n_img,) or not np.issubdtype(ids.dtype, np.integer):
            raise DataFormatError(f"{path}: image_ids must be integers of shape ({n_img},), got {ids.dtype} {ids.shape}")
        pairs = [(int(i), r) for r, i in enumerate(ids)]
    else:
        raise DataFormatError(f"{path}: no image_ids dataset; give --ids-json with {{\"image_id\": row}}")
    rows = [r for _, r in pairs]
    if len(set(rows)) != len(rows):
        raise DataFormatError(f"{ids_json or path}: several image ids map to the same row")
    return sorted(pairs, key=lambda p: p[1])


def image_sizes(path: Path, f: h5py.File, lo: int, hi: int, bb: np.ndarray) -> np.ndarray:
    """(hi - lo, 2) int (w, h) of rows lo:hi."""
    if "image_w" in f and "image_h" in f:
        return np.stack([f["image_w"][lo:hi], f["image_h"][lo:hi]], 1).astype(np.int64)
    if "image_sizes" in f:
        return f["image_sizes"][lo:hi].astype(np.int64)
    if "spatial_features" in f:
        sf = f["spatial_features"][lo:hi, :, :4].astype(np.float64)  # (b, K, 4) boxes / (w, h, w, h)
        # recover from the box reaching furthest right / down (best relative precision)
        k = np.arange(len(bb))
        ix, iy = bb[:, :, 2].argmax(1), bb[:, :, 3].argmax(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            w = bb[k, ix, 2] / sf[k, ix, 2]
            h = bb[k, iy, 3] / sf[k, iy, 3]
        return np.stack([np.round(w), np.round(h)], 1).astype(np.int64)  # non-finite -> writer error
    raise DataFormatError(
        f"{path}: no image sizes: needs image_w/image_h, image_sizes or spatial_features datasets"
    )


def _blocks(pairs: list[tuple[int, int]]) -> Iterator[list[tuple[int, int]]]:
    """Runs of (id, row) pairs (sorted by row) whose rows span < READ_BLOCK: one read each."""
    block: list[tuple[int, int]] = []
    for pair in pairs:
        if block and pair[1] - block[0][1] >= READ_BLOCK:
            yield block
            block = []
        block.append(pair)
    if block:
        yield block


def read_h5(path: str | Path, ids_json: str | Path | None = None) -> Iterator[ImageRecord]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"HDF5 file not found: {path}")
    try:
        handle = h5py.File(path, "r")
    except OSError as err:  # h5py's message does not name the file
        raise DataFormatError(f"{path}: not a readable HDF5 file ({err})") from None
    with handle as f:
        for name in ("image_features", "image_bb"):
            if name not in f:
                raise DataFormatError(f"{path}: missing dataset {name!r} (have {sorted(f.keys())})")
        feats_ds, bb_ds = f["image_features"], f["image_bb"]
        if feats_ds.ndim != 3 or bb_ds.shape != feats_ds.shape[:2] + (4,):
            raise DataFormatError(
                f"{path}: image_features {feats_ds.shape} and image_bb {bb_ds.shape} must be (N, K, D) and (N, K, 4)"
            )
        pairs = load_row_ids(path, f, ids_json)
        for block in _blocks(pairs):
            lo, hi = block[0][1], block[-1][1] + 1  # rows are sorted: one contiguous read
            feats, bb = feats_ds[lo:hi], bb_ds[lo:hi]
            sizes = image_sizes(path, f, lo, hi, bb)
            for image_id, row in block:
                r = row - lo
                w, h = sizes[r]
                yield ImageRecord(image_id, feats[r], bb[r], (int(w), int(h)), f"{path}: row {row}")


def count_rows(path: str | Path, ids_json: str | Path | None) -> int | None:
    if ids_json is not None:
        try:
            return len(read_json(ids_json, MAX_DATASET_JSON_BYTES))
        except (OSError, DataFormatError):
            return None
    try:
        with h5py.File(path, "r") as f:
            return int(f["image_features"].shape[0])
    except (OSError, KeyError):
        return None


def run_prep(args: argparse.Namespace) -> int:
    stats = convert(read_h5(args.input, args.ids_json), args.out, inputs=[args.input, args.ids_json],
                    source="fixed-box HDF5", total=count_rows(args.input, args.ids_json), desc="HDF5",
                    **common_kwargs(args))
    return report(stats)
