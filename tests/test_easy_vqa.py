"""easy-VQA preparation: VQA-v2-format JSON + feature store in the cache, once."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vqa_align.config import DataConfig
from vqa_align.data.loaders import build_data, make_loader
from vqa_align.extract.regions import REGION_FEATURE_DIM
from vqa_align.extract.feature_store import FeatureStore
from vqa_align.data.vqa_v2 import load_split
from vqa_align.data.easy_vqa import (
    TEST_IMAGE_ID_OFFSET,
    cache_root,
    easy_vqa_image_path,
    load_image,
    prepare_easy_vqa,
    prepared_files,
)

LIMIT = 12


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_easy_vqa(tmp_path_factory.mktemp("c"), limit=LIMIT, progress=False)


def test_layout_and_schema(prepared):
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["feature_dim"] == REGION_FEATURE_DIM and manifest["limit"] == LIMIT
    files = prepared_files(prepared)
    assert files["test"] == files["val"]  # val and test: the official easy-VQA test set
    train = load_split([files["train"]["questions"]], [files["train"]["annotations"]])
    val = load_split([files["val"]["questions"]], [files["val"]["annotations"]])
    assert {r.image_id for r in train} == set(range(LIMIT))
    assert {r.image_id for r in val} == set(range(TEST_IMAGE_ID_OFFSET, TEST_IMAGE_ID_OFFSET + LIMIT))
    for r in train[:50]:
        assert r.answers == (r.multiple_choice_answer,) * 10
        assert r.answer_type == ("yes/no" if r.multiple_choice_answer in ("yes", "no") else "other")
        assert r.question_id // 1000 == r.image_id and len(r.question_type.split()) == 2
    store = FeatureStore(prepared / "features.h5")
    assert len(store) == 2 * LIMIT and store.feature_dim == REGION_FEATURE_DIM
    assert (store.region_counts == 6).all()  # one shape + whole image + 2 x 2 grid


def test_foreground_box_is_tight(prepared):
    store = FeatureStore(prepared / "features.h5")
    for image_id in list(range(LIMIT)) + [TEST_IMAGE_ID_OFFSET + 3]:
        _, boxes, (w, h) = store.get(image_id)
        x1, y1, x2, y2 = np.round(boxes[0] * [w, h, w, h]).astype(int)
        rgb = load_image(image_id).astype(np.float32)
        border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
        dist = np.linalg.norm(rgb - np.median(border, 0), axis=-1)
        outside = np.ones(dist.shape, bool)
        outside[y1:y2, x1:x2] = False
        assert dist[outside].max() < 60  # nothing of the shape outside its box ...
        for edge in (dist[y1, x1:x2], dist[y2 - 1, x1:x2], dist[y1:y2, x1], dist[y1:y2, x2 - 1]):
            assert edge.max() > 60  # ... and every side of the box touches the shape


def test_prepared_once(prepared):
    stamp = (prepared / "manifest.json").stat().st_mtime_ns
    assert prepare_easy_vqa(prepared.parent, limit=LIMIT) == prepared
    assert (prepared / "manifest.json").stat().st_mtime_ns == stamp
    again = prepare_easy_vqa(prepared.parent, overwrite=True, limit=LIMIT, progress=False)
    assert (again / "manifest.json").stat().st_mtime_ns != stamp


def test_image_paths():
    assert easy_vqa_image_path(3).name == "3.png" and easy_vqa_image_path(3).parent.parent.name == "train"
    assert easy_vqa_image_path(TEST_IMAGE_ID_OFFSET + 3).parent.parent.name == "test"
    assert load_image(0).shape == (64, 64, 3)
    with pytest.raises(Exception, match="does not exist"):
        easy_vqa_image_path(TEST_IMAGE_ID_OFFSET + 5000)


def test_cache_root(monkeypatch, tmp_path):
    assert cache_root(tmp_path) == tmp_path
    monkeypatch.setenv("VQA_ALIGN_CACHE", str(tmp_path / "env"))
    assert cache_root(None) == tmp_path / "env"


def test_same_code_path_as_vqa_v2(prepared):
    files = prepared_files(prepared)
    cfg = DataConfig(dataset="easy_vqa", features=str(prepared / "features.h5"),
                     train_questions=[str(files["train"]["questions"])], train_annotations=[str(files["train"]["annotations"])],
                     val_questions=[str(files["val"]["questions"])], val_annotations=[str(files["val"]["annotations"])],
                     answer_min_count=1)
    data = build_data(cfg, ["train", "val"])
    batch = next(iter(make_loader(data.datasets["val"], 16, False, 0, 0, True, False)))
    assert batch["features"].shape == (16, 6, REGION_FEATURE_DIM)
    assert (batch["targets"].sum(1) == 1).all()


@pytest.mark.slow
def test_full_preparation(tmp_path):
    folder = prepare_easy_vqa(tmp_path, progress=False)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["splits"] == {"train": {"questions": 38575, "images": 4000}, "val": {"questions": 9673, "images": 1000}}
    data = build_data(DataConfig(cache_dir=str(tmp_path)), ["train", "val", "test"])
    assert len(data.answers) == 13 and len(data.datasets["test"]) == 9673
