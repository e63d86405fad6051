"""The HDF5 region-feature store: one layout for every source of region features.

Layout of a store file (``format_version`` 1)::

    features     (total_boxes, D)  float16 (default) or float32   all regions of all images, flat
    boxes        (total_boxes, 4)  float32   x1, y1, x2, y2 in pixels of the original image
    image_ids    (N,)              int64     image id of store row i
    offsets      (N + 1,)          int64     regions of row i are features[offsets[i]:offsets[i+1]]
    image_sizes  (N, 2)            int32     (width, height) in pixels
    region_labels (total_boxes,)   str       optional: a readable label per region ("" = none),
                                             written by detectors that name their boxes
    attrs: feature_dim (int), source (str), format_version (int),
           extractor (str, optional): JSON of vqa_align.extract.backbones.ExtractorInfo — name,
           parameters and sha256 of the weights that produced the features

Why flat + offsets: images have different region counts (10-100 for bottom-up attention);
a flat array with offsets stores them without padding and reads one image with a single
contiguous slice. ``features`` is chunked by ~100 rows (one image's worth) and uncompressed, so
a random read touches one or two chunks and no decompression.

The reader keeps only the index arrays (ids, offsets, sizes: ~20 bytes per image) in memory and
opens the HDF5 file lazily, once per process, so that each DataLoader worker gets its own handle
after ``fork`` (HDF5 handles must not be shared across processes).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

# DataFormatError is re-exported: the converters and their tests import it from here.
from vqa_align.errors import DataFormatError, UserError

FORMAT_VERSION = 1
IDS_SUFFIX = ".ids.json"  # `vqa-align extract` writes <store>.ids.json beside a store: image id -> picture file
CHUNK_ROWS = 100  # rows per HDF5 chunk: about one image of bottom-up features (10-100 boxes)
WRITE_BUFFER_ROWS = 8192  # rows buffered in memory before one resize + write
INDEX_NAMES = ("image_ids", "offsets", "image_sizes")
FINGERPRINT_ROWS = 64  # images whose features and boxes enter FeatureStore.fingerprint (spread evenly)
SCAN_BLOCK_BYTES = 64 * 2**20  # features read per block by FeatureStore.first_non_finite (bounds its memory)
FEATURE_DTYPES = {"float16": np.float16, "float32": np.float32}
TMP_SUFFIX = ".tmp"  # a store is written as OUT.tmp and renamed to OUT when complete


class StoreRecordError(DataFormatError):
    """One record cannot be written (NaN, wrong dimension, duplicate id ...); the store is unchanged."""


def store_files(path: str | Path) -> list[Path]:
    """The paths a :class:`FeatureStoreWriter` of ``path`` writes: the store, then its temporary file
    (for :func:`vqa_align.paths.check_output_paths`)."""
    path = Path(path)
    return [path, path.with_name(path.name + TMP_SUFFIX)]
INT64, INT32 = np.iinfo(np.int64), np.iinfo(np.int32)  # types of the stored image_ids and image_sizes


def _where(path: Path | str, record: str | None, image_id: int) -> str:
    """Location for messages: the caller's ``record`` (e.g. "in.tsv: line 3") or the output file."""
    return f"{record or path} (image_id {image_id})"


class FeatureStoreWriter:
    """Streaming writer: ``add`` images one by one; ``close`` writes the index and renames.

    The data go to ``<out>.tmp`` first and are renamed to ``<out>`` only when ``close`` succeeds,
    so an interrupted conversion never leaves a file that looks complete. Use as a context manager:
    on an exception the temporary file is deleted.

    Every ``add`` is validated *before* anything is written, so a caller may catch
    :class:`StoreRecordError`, count the record as skipped and go on.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        feature_dim: int | None = None,
        dtype: str = "float16",
        source: str = "",
        overwrite: bool = False,
        extractor: Any = None,
    ) -> None:
        if dtype not in FEATURE_DTYPES:
            raise UserError(f"feature dtype must be one of {list(FEATURE_DTYPES)}, got {dtype!r}")
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise FileExistsError(f"{self.path} exists; pass --overwrite (overwrite=True) to replace it")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_path = store_files(self.path)[1]
        self.dtype = FEATURE_DTYPES[dtype]
        self.source = source
        self.extractor = extractor  # ExtractorInfo or None (converters of public formats)
        self.feature_dim = feature_dim
        self._file: h5py.File | None = h5py.File(self.tmp_path, "w")
        self._features: h5py.Dataset | None = None
        self._boxes: h5py.Dataset | None = None
        self._ids: list[int] = []
        self._seen: set[int] = set()
        self._sizes: list[tuple[int, int]] = []
        self._offsets: list[int] = [0]
        self._buf_feats: list[np.ndarray] = []
        self._buf_boxes: list[np.ndarray] = []
        self._buf_labels: list[str] = []
        self._labels: h5py.Dataset | None = None  # created at the first image that has labels
        self._buf_rows = 0
        self._written_rows = 0

    # ---------------------------------------------------------------------------------------
    def _create(self, dim: int) -> None:
        assert self._file is not None
        chunk = (CHUNK_ROWS, dim)
        self._features = self._file.create_dataset(
            "features", shape=(0, dim), maxshape=(None, dim), dtype=self.dtype, chunks=chunk
        )
        self._boxes = self._file.create_dataset(
            "boxes", shape=(0, 4), maxshape=(None, 4), dtype=np.float32, chunks=(CHUNK_ROWS * 64, 4)
        )

    def _create_labels(self) -> None:
        """The ``region_labels`` dataset, with "" for the rows already written (they had none)."""
        assert self._file is not None
        self._labels = self._file.create_dataset(
            "region_labels", shape=(self._written_rows,), maxshape=(None,),
            dtype=h5py.string_dtype("utf-8"), chunks=(CHUNK_ROWS * 64,))
        if self._written_rows:
            self._labels[:] = np.array([""] * self._written_rows, dtype=object)

    def validate(
        self, image_id: int, features: np.ndarray, boxes: np.ndarray, image_size: tuple[int, int], record: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Check one image; return (features in the store dtype, boxes float32) or raise StoreRecordError."""
        where = _where(self.path, record, image_id)
        image_id = int(image_id)
        if not INT64.min <= image_id <= INT64.max:  # the store's image_ids are int64
            raise StoreRecordError(f"{where}: image id {image_id} does not fit in 64 bits")
        if image_id in self._seen:
            raise StoreRecordError(f"{where}: duplicate image id {image_id}")
        features = np.asarray(features)
        boxes = np.asarray(boxes)
        if features.ndim != 2 or features.shape[0] == 0:
            raise StoreRecordError(f"{where}: features must have shape (num_boxes >= 1, D), got {features.shape}")
        n, dim = features.shape
        expected_dim = self.feature_dim if self.feature_dim is not None else dim
        if dim != expected_dim:
            raise StoreRecordError(
                f"{where}: feature dimension {dim} differs from {expected_dim} (of the earlier images)"
            )
        if boxes.shape != (n, 4):
            raise StoreRecordError(f"{where}: boxes must have shape ({n}, 4) to match the features, got {boxes.shape}")
        w, h = (int(v) for v in image_size)
        if w <= 0 or h <= 0 or max(w, h) > INT32.max:  # image_sizes are int32
            raise StoreRecordError(f"{where}: image size must be positive and at most {INT32.max}, got (w={w}, h={h})")
        if not np.isfinite(features).all():
            raise StoreRecordError(f"{where}: features contain NaN or inf")
        if not np.isfinite(boxes).all():
            raise StoreRecordError(f"{where}: boxes contain NaN or inf")
        with np.errstate(over="ignore"):  # overflow is checked just below, with a better message
            stored = features.astype(self.dtype, copy=False)
        if not np.isfinite(stored).all():  # float16 overflows above 65504
            raise StoreRecordError(f"{where}: feature values exceed the {np.dtype(self.dtype).name} range; use --dtype float32")
        return stored, boxes.astype(np.float32, copy=False)

    def add(
        self,
        image_id: int,
        features: np.ndarray,
        boxes: np.ndarray,
        image_size: tuple[int, int],
        record: str | None = None,
        labels: list[str] | None = None,
    ) -> None:
        """Append one image: features (n, D), boxes (n, 4) in pixels, image_size (w, h).

        ``record`` names the input in error messages (e.g. ``"feats.tsv: line 17"``); without it
        messages name the output file. ``labels`` (n strings) names the regions; images without
        labels get "" in a store where some image has them.
        """
        if self._file is None:
            raise RuntimeError("FeatureStoreWriter is closed")
        stored, boxes32 = self.validate(image_id, features, boxes, image_size, record)
        if labels is not None and len(labels) != stored.shape[0]:
            raise StoreRecordError(f"{_where(self.path, record, image_id)}: {len(labels)} labels for "
                                   f"{stored.shape[0]} regions")
        if self._features is None:
            self.feature_dim = stored.shape[1]
            self._create(stored.shape[1])
        image_id = int(image_id)
        self._seen.add(image_id)
        self._ids.append(image_id)
        self._sizes.append((int(image_size[0]), int(image_size[1])))
        self._offsets.append(self._offsets[-1] + stored.shape[0])
        self._buf_feats.append(stored)
        self._buf_boxes.append(boxes32)
        if labels is not None and self._labels is None:
            self._create_labels()
        self._buf_labels += [str(x) for x in labels] if labels is not None else [""] * stored.shape[0]
        self._buf_rows += stored.shape[0]
        if self._buf_rows >= WRITE_BUFFER_ROWS:
            self._flush()

    def _flush(self) -> None:
        if not self._buf_rows:
            return
        assert self._features is not None and self._boxes is not None
        start, stop = self._written_rows, self._written_rows + self._buf_rows
        self._features.resize(stop, axis=0)
        self._boxes.resize(stop, axis=0)
        self._features[start:stop] = np.concatenate(self._buf_feats)
        self._boxes[start:stop] = np.concatenate(self._buf_boxes)
        if self._labels is not None:
            self._labels.resize(stop, axis=0)
            self._labels[start:stop] = np.array(self._buf_labels, dtype=object)
        self._written_rows = stop
        self._buf_feats, self._buf_boxes, self._buf_labels, self._buf_rows = [], [], [], 0

    def __len__(self) -> int:
        return len(self._ids)

    def close(self) -> Path:
        """Write the index, close and rename ``<out>.tmp`` to ``<out>``. Returns the output path."""
        if self._file is None:
            return self.path
        if not self._ids:
            self.abort()
            raise DataFormatError(f"{self.path}: no image was written (all inputs empty or skipped)")
        self._flush()
        f = self._file
        f.create_dataset("image_ids", data=np.asarray(self._ids, dtype=np.int64))
        f.create_dataset("offsets", data=np.asarray(self._offsets, dtype=np.int64))
        f.create_dataset("image_sizes", data=np.asarray(self._sizes, dtype=np.int32).reshape(-1, 2))
        f.attrs["feature_dim"] = int(self.feature_dim or 0)
        f.attrs["source"] = self.source
        f.attrs["format_version"] = FORMAT_VERSION
        if self.extractor is not None:
            f.attrs["extractor"] = self.extractor.to_json()
        f.close()
        self._file = None
        os.replace(self.tmp_path, self.path)
        return self.path

    def abort(self) -> None:
        """Close and delete the temporary file (the output is left untouched)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> "FeatureStoreWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class FeatureStore:
    """Random-access reader of a store file; safe to use from forked DataLoader workers.

    Only ``image_ids`` (N,), ``offsets`` (N+1,) and ``image_sizes`` (N, 2) are held in memory;
    features and boxes are read per image from a handle opened on first access in each process.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"feature store not found: {self.path}")
        try:
            with h5py.File(self.path, "r") as f:
                missing = [k for k in ("features", "boxes", *INDEX_NAMES) if k not in f]
                if missing:
                    raise DataFormatError(f"{self.path}: not a feature store (missing datasets {missing})")
                shapes = {name: f[name].shape for name in f if isinstance(f[name], h5py.Dataset)}
                _check_shapes(self.path, shapes, f["features"].dtype)
                self.image_ids: np.ndarray = f["image_ids"][()].astype(np.int64)  # (N,)
                self.offsets: np.ndarray = f["offsets"][()].astype(np.int64)  # (N+1,)
                self.image_sizes: np.ndarray = f["image_sizes"][()].astype(np.int64)  # (N, 2) w, h
                self.format_version = _int_attr(self.path, f, "format_version", 0)
                self.feature_dim = _int_attr(self.path, f, "feature_dim", shapes["features"][1])
                self.source = str(f.attrs.get("source", ""))
                self.feature_dtype = f["features"].dtype
                self.has_region_labels = "region_labels" in f
                extractor = f.attrs.get("extractor")
        except OSError as err:
            raise DataFormatError(f"{self.path}: cannot be read as HDF5 ({err})") from None
        except (TypeError, ValueError) as err:  # attributes of the wrong type, index arrays that are not numbers
            raise DataFormatError(f"{self.path}: not a valid feature store ({err})") from None
        self.extractor = _extractor_info(self.path, extractor)
        if self.format_version != FORMAT_VERSION:
            raise DataFormatError(f"{self.path}: format_version {self.format_version}, expected {FORMAT_VERSION}")
        _check_feature_dim(self.path, self.feature_dim, shapes["features"][1])
        _check_index(self.path, self.image_ids, self.offsets, self.image_sizes, shapes["features"][0])
        self.image_sizes = self.image_sizes.astype(np.int32)
        # id -> row by binary search over the sorted ids (no Python dict: compact and fork-friendly)
        self._order = np.argsort(self.image_ids, kind="stable")
        self._sorted_ids = self.image_ids[self._order]
        self._handle: h5py.File | None = None
        self._dsets: tuple[h5py.Dataset, h5py.Dataset] | None = None
        self._pid: int | None = None

    # --- index ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def region_counts(self) -> np.ndarray:
        """(N,) int64: regions per store row."""
        return np.diff(self.offsets)

    def rows(self, image_ids: np.ndarray | list[int]) -> np.ndarray:
        """Store rows of ``image_ids`` (vectorised); -1 where an id is absent."""
        ids = np.asarray(image_ids, dtype=np.int64)
        pos = np.searchsorted(self._sorted_ids, ids).clip(max=max(len(self._sorted_ids) - 1, 0))
        found = self._sorted_ids[pos] == ids if len(self._sorted_ids) else np.zeros(ids.shape, bool)
        return np.where(found, self._order[pos], -1)

    def __contains__(self, image_id: int) -> bool:
        return bool(self.rows([image_id])[0] >= 0)

    def row(self, image_id: int) -> int:
        r = int(self.rows([image_id])[0])
        if r < 0:
            raise KeyError(f"{self.path}: image id {image_id} has no features in this store")
        return r

    # --- data -------------------------------------------------------------------------------
    def _datasets(self) -> tuple[h5py.Dataset, h5py.Dataset]:
        """(features, boxes) datasets of this process's handle (opened lazily, re-opened after fork).

        The Dataset objects are cached: looking them up by name costs more than a small read.
        """
        pid = os.getpid()
        if self._handle is None or self._pid != pid:  # an inherited handle must not be used
            self._handle = h5py.File(self.path, "r")
            self._pid = pid
            self._dsets = (self._handle["features"], self._handle["boxes"])
        return self._dsets

    def read_row(self, row: int, max_regions: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Raw (features (n, D) in the stored dtype, boxes (n, 4) pixels) of store row ``row``.

        The first ``max_regions`` regions are kept (bottom-up files are sorted by confidence).
        """
        start, stop = int(self.offsets[row]), int(self.offsets[row + 1])
        if max_regions is not None:
            stop = min(stop, start + max_regions)
        features, boxes = self._datasets()
        return features[start:stop], boxes[start:stop]

    def first_non_finite(self, rows: np.ndarray | list[int], max_regions: int | None = None,
                         arrays: tuple[str, ...] = ("features", "boxes")) -> tuple[int, str] | None:
        """(image id, "features" or "boxes") of the first of ``rows`` whose kept regions hold a NaN
        or an Inf in ``arrays``; None when all are finite. Reads runs of consecutive rows in blocks
        of SCAN_BLOCK_BYTES, so a scan of a whole split is one sequential pass over its part of the
        file (boxes alone: 16 bytes a region)."""
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        if not len(rows):
            return None
        starts = self.offsets[rows]
        stops = self.offsets[rows + 1] if max_regions is None else np.minimum(self.offsets[rows + 1], starts + max_regions)
        features, boxes = self._datasets()
        scanned = [(name, data) for name, data in (("features", features), ("boxes", boxes)) if name in arrays]
        block = max(1, SCAN_BLOCK_BYTES // (self.feature_dim * self.feature_dtype.itemsize))
        run_begins = np.flatnonzero(np.r_[True, starts[1:] != stops[:-1]])  # rows where a contiguous run starts
        run_ends = np.r_[run_begins[1:], len(rows)]
        for first, last in zip(run_begins, run_ends):
            for start in range(int(starts[first]), int(stops[last - 1]), block):
                stop = min(start + block, int(stops[last - 1]))
                for name, data in scanned:
                    bad = np.flatnonzero(~np.isfinite(data[start:stop]).all(1))
                    if len(bad):
                        row = int(np.searchsorted(self.offsets, start + int(bad[0]), side="right") - 1)
                        return int(self.image_ids[row]), name
        return None

    def fingerprint(self) -> str:
        """SHA-256 of what identifies the store's content: its index (ids, offsets, sizes), shape,
        dtype, source and extractor record, and the features and boxes of FINGERPRINT_ROWS images
        spread over it. Not every value: hashing a 20 GB store at each start would take minutes;
        a re-extraction or another conversion changes the sampled rows or the index."""
        h = hashlib.sha256()
        for array in (self.image_ids, self.offsets, self.image_sizes):
            h.update(np.ascontiguousarray(array, dtype=np.int64).tobytes())
        extractor = self.extractor.to_json() if self.extractor is not None else ""
        h.update(f"{self.feature_dim}:{self.feature_dtype.str}:{self.source}:{extractor}".encode())
        for row in np.unique(np.linspace(0, len(self) - 1, min(FINGERPRINT_ROWS, len(self))).astype(np.int64)):
            features, boxes = self.read_row(int(row))
            h.update(np.ascontiguousarray(features).tobytes() + np.ascontiguousarray(boxes).tobytes())
        return h.hexdigest()

    def check_finite(self, rows: np.ndarray | list[int], max_regions: int | None = None,
                     arrays: tuple[str, ...] = ("features", "boxes")) -> None:
        """Raise DataFormatError naming the image and the array when any of ``rows`` holds NaN or Inf."""
        found = self.first_non_finite(rows, max_regions, arrays)
        if found is not None:
            image_id, what = found
            raise DataFormatError(f"{self.path}: {what} of image {image_id} are not finite (Inf or NaN); "
                                  f"fix or re-extract that image's features")

    def read_labels(self, row: int, max_regions: int | None = None) -> list[str] | None:
        """Region labels of store row ``row`` (same slice as :meth:`read_row`), None if the store has none."""
        if not self.has_region_labels:
            return None
        start, stop = int(self.offsets[row]), int(self.offsets[row + 1])
        if max_regions is not None:
            stop = min(stop, start + max_regions)
        self._datasets()
        assert self._handle is not None
        raw = self._handle["region_labels"][start:stop]
        return [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in raw]

    def get(
        self, image_id: int, max_regions: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        """(features (n, D) float32, boxes (n, 4) float32 normalised to [0, 1], (w, h))."""
        row = self.row(image_id)
        feats, boxes = self.read_row(row, max_regions)
        w, h = (int(v) for v in self.image_sizes[row])
        return feats.astype(np.float32), normalise_boxes(boxes, w, h), (w, h)

    __getitem__ = get

    def close(self) -> None:
        if self._handle is not None and self._pid == os.getpid():
            self._handle.close()
        self._handle = None
        self._dsets = None

    def __getstate__(self) -> dict[str, Any]:
        # Picklable for spawn-started workers: the handle stays behind and is re-opened lazily.
        state = self.__dict__.copy()
        state["_handle"], state["_pid"], state["_dsets"] = None, None, None
        return state

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _int_attr(path: Path, f: h5py.File, name: str, default: int) -> int:
    """Integer attribute ``name`` of the store (``default`` when absent); other types are refused."""
    value = f.attrs.get(name, default)
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value[()]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise DataFormatError(f"{path}: attribute {name!r} must be an integer, got {value!r:.40}")
    return int(value)


def _check_feature_dim(path: Path, feature_dim: int, columns: int) -> None:
    """The declared feature_dim is a sane width and the one of the features dataset."""
    from vqa_align.extract.backbones.base import MAX_FEATURE_DIM

    if not 1 <= feature_dim <= MAX_FEATURE_DIM or feature_dim != columns:
        raise DataFormatError(f"{path}: declares feature_dim {feature_dim} but its features have {columns} "
                              f"columns; the store is damaged or was written by another program")


def _check_shapes(path: Path, shapes: dict[str, tuple[int, ...]], feature_dtype: np.dtype) -> None:
    """The datasets' shapes agree with each other: (R, D) features, (R, 4) boxes, (N,) ids,
    (N + 1,) offsets, (N, 2) sizes, (R,) labels. Read before any index array is loaded."""
    features, ids = shapes["features"], shapes["image_ids"]
    if len(features) != 2 or not np.issubdtype(feature_dtype, np.floating):
        raise DataFormatError(f"{path}: features must be a 2-D float array (regions, D), got shape {features} "
                              f"of {feature_dtype}")
    if len(ids) != 1:
        raise DataFormatError(f"{path}: image_ids must be 1-D, got shape {ids}")
    regions, n = features[0], ids[0]
    expected = {"boxes": (regions, 4), "offsets": (n + 1,), "image_sizes": (n, 2)}
    if "region_labels" in shapes:
        expected["region_labels"] = (regions,)
    for name, shape in expected.items():
        if shapes[name] != shape:
            raise DataFormatError(f"{path}: {name} has shape {shapes[name]}, expected {shape} "
                                  f"(for {n} images and {regions} regions)")


def _check_index(path: Path, ids: np.ndarray, offsets: np.ndarray, sizes: np.ndarray, regions: int) -> None:
    """Every image id once, offsets that cut the flat arrays into non-empty slices that cover
    them exactly, positive image sizes: otherwise one image would silently get another's regions."""
    order = np.argsort(ids, kind="stable")
    repeated = np.flatnonzero(ids[order][1:] == ids[order][:-1])
    if len(repeated):
        raise DataFormatError(f"{path}: duplicate image id {int(ids[order][repeated[0]])} in the store's index "
                              f"(image_ids); the store is damaged: rebuild it")
    if len(offsets) and (offsets[0] != 0 or offsets[-1] != regions):
        raise DataFormatError(f"{path}: offsets run from {int(offsets[0])} to {int(offsets[-1])} but must run "
                              f"from 0 to {regions} (the number of regions); the store is damaged: rebuild it")
    empty = np.flatnonzero(np.diff(offsets) < 1)
    if len(empty):
        row = int(empty[0])
        raise DataFormatError(f"{path}: offsets of image id {int(ids[row])} (row {row}) give it "
                              f"{int(offsets[row + 1] - offsets[row])} regions; every image needs at least one "
                              f"and offsets must increase; the store is damaged: rebuild it")
    bad_size = np.flatnonzero((sizes <= 0).any(1))
    if len(bad_size):
        row = int(bad_size[0])
        raise DataFormatError(f"{path}: image id {int(ids[row])} has size {tuple(int(v) for v in sizes[row])}; "
                              "image sizes must be positive")


def _extractor_info(path: Path, raw: Any) -> Any:
    """The store's ``extractor`` attribute as an ExtractorInfo, or None for converted public features."""
    if raw is None:
        return None
    from vqa_align.extract.backbones.base import ExtractorInfo

    try:
        return ExtractorInfo.from_json(raw.decode() if isinstance(raw, bytes) else str(raw), f"{path}: attribute 'extractor'")
    except UnicodeDecodeError as err:
        raise DataFormatError(f"{path}: attribute 'extractor' is not valid extractor JSON ({err})") from None


def normalise_boxes(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Pixel boxes (n, 4) x1, y1, x2, y2 -> float32 in [0, 1] (clipped: detectors overshoot by a pixel)."""
    scale = np.array([width, height, width, height], dtype=np.float32)
    return np.clip(boxes.astype(np.float32) / scale, 0.0, 1.0)
