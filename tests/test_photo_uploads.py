"""Models trained on `vqa-align extract` features: recorded extractors, uploads, pictures, labels."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vqa_align.runs.checkpoint import checkpoint_extractor, save_checkpoint
from vqa_align.config import AlignmentConfig, Config, DataConfig, ModelConfig
from vqa_align.data.loaders import check_same_extractor
from vqa_align.errors import UserError
from vqa_align.extract.pipeline import ExtractOptions, extract_images, list_images
from vqa_align.extract.backbones import ExtractorInfo, build_backbone
from vqa_align.serve.gallery import folder_image_loader
from vqa_align.serve.prediction import InputError
from vqa_align.serve.predictor import Predictor
from vqa_align.serve.startup import load_predictor
from vqa_align.model.mcan import MCAN
from vqa_align.extract.feature_store import FeatureStore, FeatureStoreWriter
from vqa_align.data.vqa_v2 import build_tokenizer

skimage_data = pytest.importorskip("skimage.data")

ANSWERS = ["cat", "cup", "yes", "no"]
QUESTIONS = ["what is in the picture?", "is there a cat?"]
# random resnet18 at 64 px: a 2 x 2 grid of 512-d cells, built in a fraction of a second
TV_PARAMS = {"arch": "resnet18", "weights": "none", "image_size": 64}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for name in ("chelsea", "coffee", "astronaut"):
        Image.fromarray(getattr(skimage_data, name)()).save(folder / f"{name}.png")
    return folder


def _checkpoint(root: Path, store: Path, extractor: ExtractorInfo | None, feature_dim: int) -> Path:
    tokenizer = build_tokenizer(QUESTIONS, max_tokens=8)
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, num_heads=4, ffn_size=64, num_layers=1, flat_mlp_size=32, flat_size=32,
                      dropout=0.0, feature_dim=feature_dim, word_embed_dim=16, vocab_size=len(tokenizer.get_vocab()),
                      num_answers=len(ANSWERS), alignment=AlignmentConfig(method="ct", helper_hidden=8, helper_out=8))
    config = Config(model=cfg, data=DataConfig(dataset="vqa_v2", features=str(store), max_regions=100), name="photo")
    meta = {"extractor": json.loads(extractor.to_json()) if extractor else None}
    return save_checkpoint(root / "run" / "checkpoints" / "last", MCAN(cfg), config, ANSWERS, tokenizer, meta=meta)


@pytest.fixture(scope="module")
def photo_run(photos, tmp_path_factory):
    root = tmp_path_factory.mktemp("photo_run")
    backbone = build_backbone("torchvision", TV_PARAMS)
    store = root / "photos.h5"
    extract_images(list_images([photos]), backbone, store, ExtractOptions(batch_size=2, num_workers=0, progress=False))
    return _checkpoint(root, store, backbone.info, 512), store


def test_checkpoint_records_its_extractor_and_uploads_match_the_store(photo_run, photos):
    ckpt, store_path = photo_run
    info = checkpoint_extractor(ckpt)
    assert info is not None and info.name == "torchvision" and info == FeatureStore(store_path).extractor
    pred = Predictor(ckpt)
    assert pred.uploads_enabled
    store = FeatureStore(store_path)
    ids = json.loads(store_path.with_name(store_path.name + ".ids.json").read_text())
    cat_id = next(int(i) for i, p in ids.items() if p.endswith("chelsea.png"))
    from_store = pred.answer("is there a cat?", image_id=cat_id)
    from_upload = pred.answer("is there a cat?", image=str(photos / "chelsea.png"))
    # the same picture through the store (float16) and through the upload path (float32)
    assert from_upload.answer == from_store.answer
    np.testing.assert_allclose(from_upload.image_glimpse, from_store.image_glimpse, atol=2e-2)
    np.testing.assert_allclose(from_upload.boxes, from_store.boxes, atol=1e-6)
    assert from_upload.boxes.shape == (4, 4)  # 2 x 2 grid cells, drawn like regions
    # the store's pictures come from its ids JSON (written by extract) without --images
    assert from_store.image is not None and from_store.image.shape[2] == 3


def test_images_folder_shows_the_real_pictures(photo_run, photos, tmp_path):
    ckpt, store_path = photo_run
    moved = tmp_path / "store.h5"  # a store without its ids JSON: only --images can find the pictures
    moved.write_bytes(store_path.read_bytes())
    store = FeatureStore(moved)
    plain = Predictor(ckpt, feature_store=moved)
    assert plain.load_image(int(store.image_ids[0])) is None
    shown = Predictor(ckpt, feature_store=moved, image_loader=folder_image_loader(photos))
    for image_id in store.image_ids:
        picture = shown.load_image(int(image_id))
        w, h = store.image_sizes[store.row(int(image_id))]
        assert picture is not None and picture.shape[:2] == (h, w)
    with pytest.raises(UserError, match="not a folder"):
        load_predictor(ckpt, images=tmp_path / "nope")


def test_uploads_say_what_is_missing_and_the_command(photo_run, tmp_path):
    _, store = photo_run
    clip = ExtractorInfo("clip", {"image_size": 224}, "f" * 64, 512, weights_source="someone/clip-not-here")
    pred = Predictor(_checkpoint(tmp_path / "clip", store, clip, 512))
    assert not pred.uploads_enabled
    assert "vqa-align extract --download --backbone clip --param model=someone/clip-not-here" in pred.upload_error
    with pytest.raises(InputError, match="not on this machine"):
        pred.answer("is there a cat?", image=np.zeros((8, 8, 3), np.uint8))


def test_uploads_refuse_other_weights(photo_run, tmp_path):
    _, store = photo_run
    other = build_backbone("torchvision", {**TV_PARAMS, "seed": 1}).info  # other random weights
    forged = ExtractorInfo(other.name, {**other.params, "seed": 0}, other.weights_sha256, 512, "none")
    pred = Predictor(_checkpoint(tmp_path / "forged", store, forged, 512))
    assert pred.uploads_enabled  # it can run here; but its weights are not the recorded ones
    with pytest.raises(InputError, match="install the same weights"):
        pred.answer("is there a cat?", image=np.zeros((40, 40, 3), np.uint8))


def test_region_labels_are_shown(tmp_path):
    store = tmp_path / "labelled.h5"
    info = ExtractorInfo("bottom-up", {}, "a" * 64, 8)
    with FeatureStoreWriter(store, extractor=info) as w:
        w.add(1, np.ones((3, 8)), np.array([[0, 0, 5, 5], [1, 1, 9, 9], [2, 2, 4, 4]], np.float32), (10, 10),
              labels=["red umbrella", "", "man"])
        w.add(2, np.ones((1, 8)), np.array([[0, 0, 5, 5]], np.float32), (10, 10))  # an image without labels
    pred = Predictor(_checkpoint(tmp_path / "lab", store, info, 8))
    assert pred.answer("is there a cat?", image_id=1).region_labels == ["R1 red umbrella", "R2", "R3 man"]
    assert pred.answer("is there a cat?", image_id=2).region_labels == ["R1"]


def test_train_and_val_stores_of_different_extractors_are_refused(tmp_path):
    def store(name: str, info: ExtractorInfo | None) -> FeatureStore:
        with FeatureStoreWriter(tmp_path / name, extractor=info) as w:
            w.add(1, np.ones((2, 4)), np.zeros((2, 4), np.float32) + [0, 0, 1, 1], (4, 4))
        return FeatureStore(tmp_path / name)

    a = store("a.h5", ExtractorInfo("efficientnet-lite0", {}, "1" * 64, 4))
    b = store("b.h5", ExtractorInfo("clip", {"image_size": 224}, "2" * 64, 4))
    c = store("c.h5", ExtractorInfo("efficientnet-lite0", {}, "1" * 64, 4, weights_source="/elsewhere.pth"))
    check_same_extractor(a, c)  # same weights found in another place: fine
    with pytest.raises(UserError, match=r"a\.h5 comes from efficientnet-lite0 .*b\.h5 comes from clip"):
        check_same_extractor(a, b)
    with pytest.raises(UserError, match="unrecorded extractor"):
        check_same_extractor(a, store("d.h5", None))


def test_train_and_val_stores_of_different_widths_are_refused(tmp_path):
    from vqa_align.data.loaders import build_data

    for name, dim in (("a.h5", 4), ("b.h5", 6)):
        with FeatureStoreWriter(tmp_path / name) as w:
            w.add(1, np.ones((2, dim)), np.zeros((2, 4), np.float32) + [0, 0, 1, 1], (4, 4))
    cfg = DataConfig(features=str(tmp_path / "a.h5"), val_features=str(tmp_path / "b.h5"))
    with pytest.raises(UserError, match=r"a\.h5 has 4-d features but .*b\.h5 has 6-d ones"):
        build_data(cfg, ["train", "val"])


# --- training on extracted easy-VQA pictures ------------------------------------------------------


def _easy_vqa_photo_config(cache: Path, store: Path, **extra):
    from conftest import tiny_run_overrides

    from vqa_align.config import load_config
    from vqa_align.data.easy_vqa import FOLDER

    folder = cache / FOLDER
    values = {"data.features": str(store), "data.train_questions": [str(folder / "train_questions.json")],
              "data.train_annotations": [str(folder / "train_annotations.json")],
              "data.val_questions": [str(folder / "val_questions.json")],
              "data.val_annotations": [str(folder / "val_annotations.json")],
              "model.feature_dim": 512, "train.epochs": 1, "train.max_steps": 2, **extra}
    return load_config("configs/easy_vqa.yaml", tiny_run_overrides(cache, **values))


def test_training_records_the_extractor_and_refuses_mixed_stores(easy_vqa_cache, tmp_path):
    from conftest import EASY_VQA_TEST_LIMIT

    from vqa_align.train.trainer import train_from_config
    from vqa_align.data.easy_vqa import easy_vqa_images

    items = easy_vqa_images(EASY_VQA_TEST_LIMIT)
    opts = ExtractOptions(batch_size=32, num_workers=0, progress=False)
    store = tmp_path / "easy.h5"
    backbone = build_backbone("torchvision", {**TV_PARAMS, "image_size": 32})  # 1 x 1 grid: one region
    extract_images(items, backbone, store, opts)
    trainer = train_from_config(_easy_vqa_photo_config(easy_vqa_cache, store), tmp_path / "run")
    assert checkpoint_extractor(tmp_path / "run") == backbone.info == trainer.extractor

    other = tmp_path / "other.h5"  # the same pictures through other random weights
    extract_images(items, build_backbone("torchvision", {**TV_PARAMS, "image_size": 32, "seed": 3}), other, opts)
    with pytest.raises(UserError, match=r"easy\.h5 comes from torchvision .*other\.h5 comes from torchvision"):
        train_from_config(_easy_vqa_photo_config(easy_vqa_cache, store, **{"data.val_features": str(other)}),
                          tmp_path / "mixed")
    # same path, features re-extracted with other weights (a new file renamed into place, as extract does;
    # rewriting the open file in place would let HDF5 serve the old attributes from its open handle)
    os.replace(other, store)
    with pytest.raises(UserError, match="--resume: .* was trained on features of torchvision"):
        train_from_config(_easy_vqa_photo_config(easy_vqa_cache, store), tmp_path / "run", resume=True)


@pytest.mark.slow
def test_easy_vqa_backbone_preset_end_to_end(easy_vqa_cache, tmp_path):
    """configs/easy_vqa_photos.yaml on the small cache: extract, train 2 steps, answer about a photo."""
    from conftest import EASY_VQA_TEST_LIMIT, tiny_run_overrides

    from vqa_align.config import load_config
    from vqa_align.train.trainer import train_from_config

    overrides = tiny_run_overrides(easy_vqa_cache, **{"train.max_steps": 2, "train.epochs": 1,
                                                      "data.easy_vqa_limit": EASY_VQA_TEST_LIMIT})
    config = load_config("configs/easy_vqa_photos.yaml", overrides)
    train_from_config(config, tmp_path / "run")
    pred = Predictor(tmp_path / "run")
    assert pred.uploads_enabled and pred.extractor.name == "efficientnet-lite0"
    out = pred.answer("what color is the shape?", image=skimage_data.chelsea())
    assert out.boxes.shape == (49, 4) and out.answer in pred.answers
