"""The HDF5 region-feature store: round trip, validation, atomic writes, per-process handles."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle

import h5py
import numpy as np
import pytest

from vqa_align.extract.feature_store import (
    FORMAT_VERSION,
    DataFormatError,
    FeatureStore,
    FeatureStoreWriter,
    StoreRecordError,
    normalise_boxes,
)

D = 8


def _images(n: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = int(rng.integers(1, 12))
        xy = rng.random((k, 2), dtype=np.float32) * 50
        boxes = np.concatenate([xy, xy + 1 + rng.random((k, 2), dtype=np.float32) * 40], 1)
        out.append((1000 + 7 * i, rng.standard_normal((k, D)).astype(np.float32), boxes, (100 + i, 80 + i)))
    return out


def _write(path, images, **kw):
    with FeatureStoreWriter(path, **kw) as w:
        for image_id, f, b, size in images:
            w.add(image_id, f, b, size)
    return path


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip(tmp_path, dtype):
    images = _images()
    path = _write(tmp_path / "s.h5", images, dtype=dtype, source="unit test")
    assert not (tmp_path / "s.h5.tmp").exists()
    store = FeatureStore(path)
    assert len(store) == len(images) and store.feature_dim == D and store.source == "unit test"
    with h5py.File(path) as f:
        assert f["features"].dtype == np.dtype(dtype)
        assert f["boxes"].dtype == np.float32 and f["offsets"].shape == (len(images) + 1,)
        assert f["image_sizes"].dtype == np.int32 and f.attrs["format_version"] == FORMAT_VERSION
    tol = 1e-2 if dtype == "float16" else 0
    for image_id, feats, boxes, (w, h) in images:
        got_f, got_b, size = store.get(image_id)
        assert got_f.dtype == np.float32 and got_b.dtype == np.float32
        np.testing.assert_allclose(got_f, feats, atol=tol, rtol=tol)
        np.testing.assert_allclose(got_b, np.clip(boxes / [w, h, w, h], 0, 1), rtol=1e-6)
        assert size == (w, h) and got_b.min() >= 0 and got_b.max() <= 1
    assert list(store.region_counts) == [len(f) for _, f, _, _ in images]
    assert image_id in store and 5 not in store
    assert list(store.rows([images[2][0], 5])) == [2, -1]
    with pytest.raises(KeyError, match="image id 5"):
        store.get(5)


def test_max_regions_keeps_first(tmp_path):
    images = [(1, np.arange(10 * D, dtype=np.float32).reshape(10, D), np.tile([0, 0, 5, 5], (10, 1)).astype(np.float32), (10, 10))]
    store = FeatureStore(_write(tmp_path / "s.h5", images, dtype="float32"))
    feats, boxes, _ = store.get(1, max_regions=3)
    np.testing.assert_array_equal(feats, images[0][1][:3])
    assert boxes.shape == (3, 4)


def test_refuses_overwrite(tmp_path):
    path = _write(tmp_path / "s.h5", _images())
    with pytest.raises(FileExistsError, match="overwrite"):
        FeatureStoreWriter(path)
    _write(path, _images(2, seed=1), overwrite=True)
    assert len(FeatureStore(path)) == 2


def _one(k=3, dim=D):
    return np.ones((k, dim), np.float32), np.tile(np.array([0, 0, 4, 4], np.float32), (k, 1))


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda f, b: (f * np.nan, b), "NaN or inf"),
        (lambda f, b: (f * np.inf, b), "NaN or inf"),
        (lambda f, b: (f * 1e6, b), "float16 range"),
        (lambda f, b: (f[:, :5], b), "feature dimension 5 differs from 8"),
        (lambda f, b: (f, b[:2]), "boxes must have shape"),
        (lambda f, b: (f[:0], b[:0]), "num_boxes >= 1"),
    ],
)
def test_bad_records_name_image(tmp_path, bad, match):
    with FeatureStoreWriter(tmp_path / "s.h5") as w:
        w.add(1, *_one(), (10, 10))
        f, b = bad(*_one())
        with pytest.raises(StoreRecordError, match=match) as err:
            w.add(42, f, b, (10, 10), record="in.tsv: line 2")
        assert "in.tsv: line 2 (image_id 42)" in str(err.value)
        w.add(2, *_one(), (10, 10))  # the writer is unchanged by a rejected record
    assert list(FeatureStore(tmp_path / "s.h5").image_ids) == [1, 2]


def test_duplicate_id(tmp_path):
    with FeatureStoreWriter(tmp_path / "s.h5") as w:
        w.add(1, *_one(), (10, 10))
        with pytest.raises(StoreRecordError, match="duplicate image id 1"):
            w.add(1, *_one(), (10, 10))


def test_failure_leaves_no_output(tmp_path):
    path = tmp_path / "s.h5"
    with pytest.raises(RuntimeError):
        with FeatureStoreWriter(path) as w:
            w.add(1, *_one(), (10, 10))
            raise RuntimeError("interrupted")
    assert not path.exists() and not (tmp_path / "s.h5.tmp").exists()
    with pytest.raises(DataFormatError, match="no image"):
        FeatureStoreWriter(path).close()


def test_not_a_store(tmp_path):
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f["foo"] = np.zeros(3)
    with pytest.raises(DataFormatError, match="not a feature store"):
        FeatureStore(tmp_path / "x.h5")
    with pytest.raises(FileNotFoundError):
        FeatureStore(tmp_path / "missing.h5")


def _child_read(store, image_id, queue):
    feats, _, _ = store.get(image_id)
    queue.put((os.getpid(), store._pid, feats.sum().item()))


def test_handle_reopened_after_fork(tmp_path):
    images = _images()
    store = FeatureStore(_write(tmp_path / "s.h5", images, dtype="float32"))
    expected = store.get(images[1][0])[0].sum().item()  # parent opens its handle first
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_read, args=(store, images[1][0], queue))
    proc.start()
    child_pid, handle_pid, total = queue.get(timeout=30)
    proc.join(timeout=30)
    assert child_pid == handle_pid != os.getpid()
    assert total == pytest.approx(expected)
    assert store._pid == os.getpid()  # the parent's handle is untouched


def test_pickle_drops_handle(tmp_path):
    images = _images()
    store = FeatureStore(_write(tmp_path / "s.h5", images))
    store.get(images[0][0])
    clone = pickle.loads(pickle.dumps(store))
    assert clone._handle is None
    np.testing.assert_array_equal(clone.get(images[0][0])[0], store.get(images[0][0])[0])


def test_normalise_boxes_clips():
    b = normalise_boxes(np.array([[-1, 0, 11, 5]], np.float32), 10, 5)
    np.testing.assert_array_equal(b, [[0, 0, 1, 1]])


# --- a damaged index is refused on opening, naming what is wrong (never one image's regions for another's)


def _replace(f, name, data):
    del f[name]
    f[name] = data


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda f: f["image_ids"].__setitem__(1, f["image_ids"][0]), "duplicate image id 1000 in the store's index"),
        (lambda f: f["offsets"].__setitem__(-1, f["offsets"][-1] + 5), r"offsets run from 0 to \d+ but must run"),
        (lambda f: f["offsets"].__setitem__(2, f["offsets"][1]), r"offsets of image id 1007 \(row 1\) give it 0 regions"),
        (lambda f: f["offsets"].__setitem__(2, f["offsets"][3] + 1), r"offsets of image id 1014 \(row 2\) give it -"),
        (lambda f: _replace(f, "image_sizes", np.ones((4, 2), np.int32)), r"image_sizes has shape \(4, 2\), expected \(5, 2\)"),
        (lambda f: _replace(f, "boxes", f["boxes"][:-1]), r"boxes has shape \(\d+, 4\), expected"),
        (lambda f: f.attrs.__setitem__("feature_dim", D + 1), f"declares feature_dim {D + 1} but its features have {D} columns"),
        (lambda f: f["image_sizes"].__setitem__(3, [0, 5]), r"image id 1021 has size \(0, 5\)"),
    ],
    ids=["duplicate-id", "offsets-past-end", "empty-image", "offsets-decrease", "sizes-count", "boxes-count",
         "feature-dim", "zero-size"],
)
def test_damaged_index_is_refused_naming_the_problem(tmp_path, damage, match):
    path = _write(tmp_path / "s.h5", _images())
    with h5py.File(path, "r+") as f:
        damage(f)
    with pytest.raises(DataFormatError, match=match) as err:
        FeatureStore(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["features", "boxes"])
def test_first_non_finite_names_the_image_and_the_array(tmp_path, name):
    images = _images(n=6)
    path = _write(tmp_path / "s.h5", images, dtype="float32")
    store = FeatureStore(path)
    assert store.first_non_finite(range(len(store))) is None
    bad_row = int(np.flatnonzero(store.region_counts >= 2)[-1])
    last_region = int(store.offsets[bad_row + 1]) - 1  # the image's last region
    store.close()
    with h5py.File(path, "r+") as f:
        values = f[name][last_region]
        values[1] = np.nan
        f[name][last_region] = values
    store = FeatureStore(path)
    assert store.first_non_finite(range(len(store))) == (images[bad_row][0], name)
    assert store.first_non_finite([r for r in range(len(store)) if r != bad_row]) is None  # only the rows asked
    assert store.first_non_finite([bad_row], max_regions=int(store.region_counts[bad_row]) - 1) is None
    with pytest.raises(DataFormatError, match=f"{name} of image {images[bad_row][0]} are not finite"):
        store.check_finite([bad_row])


def test_fingerprint_follows_the_content(tmp_path):
    images = _images()
    a = FeatureStore(_write(tmp_path / "a.h5", images))
    assert a.fingerprint() == FeatureStore(_write(tmp_path / "b.h5", images)).fingerprint()  # same content
    with h5py.File(tmp_path / "b.h5", "r+") as f:
        f["features"][0] = f["features"][0] + 1  # row 0 is always sampled
    assert FeatureStore(tmp_path / "b.h5").fingerprint() != a.fingerprint()
    other_ids = [(i + 1, *rest) for i, *rest in images]
    assert FeatureStore(_write(tmp_path / "c.h5", other_ids)).fingerprint() != a.fingerprint()
