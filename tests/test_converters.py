"""Converters on fixtures written in exactly the real formats: TSV, npz folder, fixed-box HDF5."""

from __future__ import annotations

import base64
import json

import h5py
import numpy as np
import pytest

from vqa_align.cli import main
from vqa_align.extract.feature_store import DataFormatError, FeatureStore
from vqa_align_prep.common import convert
from vqa_align_prep.h5 import read_h5
from vqa_align_prep.npz import image_id_from_name, list_npz, read_npz
from vqa_align_prep.tsv import read_tsv

D = 16


def _image(seed: int, k: int | None = None, dim: int = D):
    rng = np.random.default_rng(seed)
    k = k or int(rng.integers(2, 9))
    xy = rng.random((k, 2), dtype=np.float32) * 100
    boxes = np.concatenate([xy, xy + 1 + rng.random((k, 2), dtype=np.float32) * 100], 1)
    return rng.random((k, dim), dtype=np.float32) * 5, boxes, (640 + seed, 480)


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, np.float32).tobytes()).decode("ascii")


def _tsv_line(image_id, feats, boxes, size):
    return "\t".join([str(image_id), str(size[0]), str(size[1]), str(len(feats)), _b64(boxes), _b64(feats)])


def write_tsv(path, images):
    path.write_text("".join(_tsv_line(i, *img) + "\n" for i, img in images.items()))
    return path


def _check_store(path, images):
    store = FeatureStore(path)
    assert sorted(store.image_ids.tolist()) == sorted(images)
    assert store.feature_dim == D
    for image_id, (feats, boxes, (w, h)) in images.items():
        f, b, size = store.get(image_id)
        np.testing.assert_array_equal(f, feats)  # float32 store: exact
        np.testing.assert_allclose(b, np.clip(boxes / [w, h, w, h], 0, 1), rtol=1e-6)
        assert size == (w, h)


# --- TSV ------------------------------------------------------------------------------------


def test_tsv_round_trip_cli(tmp_path, capsys):
    images = {10 + i: _image(i) for i in range(4)}
    a = write_tsv(tmp_path / "a.tsv", dict(list(images.items())[:2]))
    b = write_tsv(tmp_path / "b.tsv", dict(list(images.items())[2:]))
    out = tmp_path / "out.h5"
    assert main(["prep", "tsv", str(a), str(b), "--out", str(out), "--dtype", "float32"]) == 0
    captured = capsys.readouterr()
    assert "4 images" in captured.out
    # stderr is no terminal here (a log): plain progress lines, no tqdm frames joined by \r
    assert "\r" not in captured.err and any(line.endswith("| ETA 0:00:00") or " img | " in line
                                            for line in captured.err.splitlines()), captured.err
    _check_store(out, images)
    # refuses to overwrite unless asked
    assert main(["prep", "tsv", str(a), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["prep", "tsv", str(a), "--out", str(out), "--overwrite"]) == 0
    assert len(FeatureStore(out)) == 2


def test_tsv_field_larger_than_csv_default(tmp_path):
    images = {1: _image(1, k=100, dim=2048)}  # features field ~1.1 MB > csv's 128 kB default
    path = write_tsv(tmp_path / "big.tsv", images)
    convert(read_tsv([path]), tmp_path / "o.h5", source="t", dtype="float32", progress=False)
    np.testing.assert_array_equal(FeatureStore(tmp_path / "o.h5").get(1)[0], images[1][0])


def _bad_tsv_lines():
    f, b, s = _image(3)
    good = _tsv_line(3, f, b, s)
    cut = good[: len(good) - 37]
    return {
        "truncated line": (cut, r"line 2: .*(base64|truncated)"),
        "missing fields": ("\t".join(good.split("\t")[:4]), r"line 2: expected 6 tab-separated fields"),
        "wrong boxes length": ("\t".join([*good.split("\t")[:4], _b64(b[:, :3]), _b64(f)]), r"line 2: boxes hold"),
        "features not a multiple": ("\t".join([*good.split("\t")[:5], _b64(f.ravel()[:-1])]), r"line 2: features hold"),
        "bad base64": ("\t".join([*good.split("\t")[:4], "@@@@", _b64(f)]), r"line 2: field 'boxes' is not valid base64"),
        "nan": (_tsv_line(3, f * np.nan, b, s), r"line 2 \(image_id 3\): features contain NaN"),
        "dim mismatch": (_tsv_line(3, *_image(3, dim=D + 1)), r"line 2 \(image_id 3\): feature dimension 17 differs"),
        "duplicate id": (_tsv_line(1, f, b, s), r"line 2 \(image_id 1\): duplicate image id"),
        "not integer id": ("x" + good, r"line 2: image_id, image_w"),
    }


@pytest.mark.parametrize("case", list(_bad_tsv_lines()))
def test_tsv_bad_input(tmp_path, case):
    line, pattern = _bad_tsv_lines()[case]
    first = _tsv_line(1, *_image(1))
    last = _tsv_line(4, *_image(4))
    path = tmp_path / "bad.tsv"
    path.write_text(first + "\n" + line + "\n" + last + "\n")
    out = tmp_path / "o.h5"
    with pytest.raises(DataFormatError, match=pattern) as err:
        convert(read_tsv([path]), out, source="t", progress=False)
    assert str(path) in str(err.value) and "--skip-missing" in str(err.value)
    assert not out.exists() and not (tmp_path / "o.h5.tmp").exists()
    stats = convert(read_tsv([path]), out, source="t", skip_missing=True, progress=False)
    assert (stats.images, stats.skipped) == (2, 1)
    assert sorted(FeatureStore(out).image_ids.tolist()) == [1, 4]


def test_tsv_skip_missing_cli(tmp_path, capsys):
    path = tmp_path / "bad.tsv"
    path.write_text(_tsv_line(1, *_image(1)) + "\n" + _tsv_line(2, *_image(2))[:-50] + "\n")
    out = tmp_path / "o.h5"
    assert main(["prep", "tsv", str(path), "--out", str(out)]) == 2
    assert f"{path}: line 2" in capsys.readouterr().err
    assert main(["prep", "tsv", str(path), "--out", str(out), "--skip-missing"]) == 0
    assert "skipped 1 bad record" in capsys.readouterr().out


# --- npz ------------------------------------------------------------------------------------


def write_npz(folder, images, prefix="COCO_train2014_", transpose=True):
    folder.mkdir(exist_ok=True)
    for image_id, (feats, boxes, (w, h)) in images.items():
        np.savez(folder / f"{prefix}{image_id:012d}.jpg.npz", x=feats.T if transpose else feats, bbox=boxes,
                 image_h=np.int64(h), image_w=np.int64(w), num_bbox=np.int64(len(feats)))
    return folder


def test_image_id_from_name():
    assert image_id_from_name("COCO_train2014_000000123456.jpg.npz") == 123456
    assert image_id_from_name("COCO_val2014_000000000042.npz") == 42
    assert image_id_from_name("77.npz") == 77
    with pytest.raises(ValueError, match="cannot parse an image id"):
        image_id_from_name("cat.npz")


def test_npz_round_trip_cli(tmp_path):
    images = {123456 + i: _image(i) for i in range(3)}
    more = {9: _image(9)}
    a = write_npz(tmp_path / "train", images)
    b = write_npz(tmp_path / "val", more, prefix="COCO_val2014_")
    out = tmp_path / "o.h5"
    assert main(["prep", "npz", str(a), str(b), "--out", str(out), "--dtype", "float32"]) == 0
    _check_store(out, {**images, **more})


def test_npz_bad_inputs(tmp_path):
    folder = write_npz(tmp_path / "f", {1: _image(1)})
    write_npz(folder, {2: _image(2)}, transpose=False)  # (N, D): the classic mistake
    np.savez(folder / "COCO_x_000000000003.jpg.npz", x=np.array([{"a": 1}], dtype=object), bbox=np.zeros((1, 4)),
             image_h=1, image_w=1, num_bbox=1)  # pickled object array: must not be unpickled
    np.savez(folder / "COCO_x_000000000004.jpg.npz", x=np.zeros((D, 2)), bbox=np.zeros((2, 4)))
    (folder / "COCO_x_000000000005.jpg.npz").write_bytes(b"not a zip")
    files = list_npz([folder])
    with pytest.raises(DataFormatError, match=r"000000000002\.jpg\.npz: x has shape \(\d+, 16\), expected \(D, num_bbox"):
        convert(read_npz(files), tmp_path / "o.h5", source="t", progress=False)
    messages = {}
    for rec in read_npz(files):
        if hasattr(rec, "problem"):
            messages[rec.where.rsplit("_", 1)[-1]] = rec.problem
    assert "stored (D, N)" in messages["000000000002.jpg.npz"]
    assert "pickle" in messages["000000000003.jpg.npz"].lower()
    assert "missing array(s) ['image_h', 'image_w', 'num_bbox']" in messages["000000000004.jpg.npz"]
    assert "not a readable .npz" in messages["000000000005.jpg.npz"]
    stats = convert(read_npz(files), tmp_path / "o.h5", source="t", skip_missing=True, progress=False)
    assert (stats.images, stats.skipped) == (1, 4)
    with pytest.raises(FileNotFoundError):
        list_npz([tmp_path / "nothing"])


# --- fixed-box HDF5 --------------------------------------------------------------------------


def write_fixed_h5(path, images, *, with_ids=True, sizes="wh"):
    ids = list(images)
    feats = np.stack([images[i][0] for i in ids])
    bb = np.stack([images[i][1] for i in ids])
    wh = np.array([images[i][2] for i in ids], np.float64)
    with h5py.File(path, "w") as f:
        f["image_features"] = feats
        f["image_bb"] = bb
        if with_ids:
            f["image_ids"] = np.array(ids, np.int64)
        if sizes == "wh":
            f["image_w"], f["image_h"] = wh[:, 0], wh[:, 1]
        elif sizes == "spatial":
            scale = np.repeat(wh, 2, axis=1)[:, None, [0, 2, 1, 3]]  # (N, 1, 4): w, h, w, h
            f["spatial_features"] = np.concatenate([bb / scale, np.zeros(bb.shape[:2] + (2,))], 2).astype(np.float32)
    return path


def test_h5_round_trip_image_ids(tmp_path):
    images = {5 + i: _image(i, k=6) for i in range(5)}
    src = write_fixed_h5(tmp_path / "in.h5", images)
    assert main(["prep", "h5", str(src), "--out", str(tmp_path / "o.h5"), "--dtype", "float32"]) == 0
    _check_store(tmp_path / "o.h5", images)


def test_h5_ids_json_and_spatial_sizes(tmp_path):
    images = {100 + i: _image(i, k=6) for i in range(4)}
    src = write_fixed_h5(tmp_path / "in.h5", images, with_ids=False, sizes="spatial")
    mapping = {str(i): row for row, i in enumerate(images)}
    del mapping["101"]  # only mapped rows are converted
    (tmp_path / "ids.json").write_text(json.dumps(mapping))
    out = tmp_path / "o.h5"
    assert main(["prep", "h5", str(src), "--ids-json", str(tmp_path / "ids.json"), "--out", str(out), "--dtype", "float32"]) == 0
    _check_store(out, {k: v for k, v in images.items() if k != 101})


def test_h5_bad_inputs(tmp_path):
    images = {1: _image(1, k=4), 2: _image(2, k=4)}
    no_ids = write_fixed_h5(tmp_path / "a.h5", images, with_ids=False)
    with pytest.raises(DataFormatError, match=r"a\.h5: no image_ids dataset; give --ids-json"):
        list(read_h5(no_ids))
    (tmp_path / "ids.json").write_text(json.dumps({"1": 0, "2": 7}))
    with pytest.raises(DataFormatError, match=r"ids\.json: image 2: row 7 is not in \[0, 2\)"):
        list(read_h5(no_ids, tmp_path / "ids.json"))
    no_sizes = write_fixed_h5(tmp_path / "b.h5", images, sizes=None)
    with pytest.raises(DataFormatError, match=r"b\.h5: no image sizes"):
        list(read_h5(no_sizes))
    images[2] = (images[2][0] * np.nan, images[2][1], images[2][2])
    nan = write_fixed_h5(tmp_path / "c.h5", images)
    with pytest.raises(DataFormatError, match=r"c\.h5: row 1 \(image_id 2\): features contain NaN"):
        convert(read_h5(nan), tmp_path / "o.h5", source="t", progress=False)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["image_features"] = np.zeros((2, 3, D))
    with pytest.raises(DataFormatError, match="missing dataset 'image_bb'"):
        list(read_h5(tmp_path / "d.h5"))


def test_progress_log_prints_plain_lines_at_start_interval_and_end(monkeypatch, capsys):
    from vqa_align import progress

    monkeypatch.delenv(progress.PROGRESS_SWITCH, raising=False)
    assert isinstance(progress.progress_bar(range(3)), progress.ProgressLog)  # stderr is captured: no terminal
    assert list(progress.progress_bar(range(5), desc="convert", unit="img")) == list(range(5))
    lines = capsys.readouterr().err.splitlines()
    # the first item at once, then nothing until PROGRESS_EVERY_SECONDS has passed, then the end
    assert [line.split(" | ")[0] for line in lines] == ["convert: 1/5 img", "convert: 5/5 img"], lines
    monkeypatch.setattr(progress, "PROGRESS_EVERY_SECONDS", 0.0)
    bar = progress.progress_bar(total=2, unit="img", desc="x")
    bar.update(1)
    bar.update(1)
    bar.close()
    assert [line.split(" | ")[0] for line in capsys.readouterr().err.splitlines()] == ["x: 1/2 img", "x: 2/2 img"]
    assert list(progress.progress_bar(range(2), enabled=False)) == [0, 1] and capsys.readouterr().err == ""
