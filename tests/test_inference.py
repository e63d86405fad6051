"""Predictor: answers, diagnostics restricted to valid positions, figures, and every bad input."""

from __future__ import annotations

import json
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image, ImageFile

from vqa_align.runs.checkpoint import CheckpointError, save_checkpoint
from vqa_align.config import AlignmentConfig, Config, DataConfig, ModelConfig
from vqa_align.paths import default_checkpoint_path
from vqa_align.serve.images import load_upload
from vqa_align.serve.predict_cli import run_predict
from vqa_align.serve.prediction import InputError
from vqa_align.serve.predictor import Predictor
from vqa_align.serve.views import region_and_word_weights, render_views
from vqa_align.errors import UserError
from vqa_align.extract.regions import REGION_FEATURE_DIM, extract_regions
from vqa_align.extract.feature_store import FeatureStoreWriter
from vqa_align.data.vqa_v2 import build_tokenizer

QUESTIONS = [
    "what shape is in the image?",
    "what color is the shape?",
    "is there a red circle?",
    "does the image contain a blue rectangle?",
    "is there not a green triangle in the image?",
]
ANSWERS = ["circle", "rectangle", "triangle", "red", "blue", "green", "yes", "no"]
IMAGE_IDS = [0, 1, 2, 3]


def _shape_image(seed: int) -> np.ndarray:
    """A 64 x 64 white picture with one coloured square or disc (like easy-VQA)."""
    rng = np.random.default_rng(seed)
    img = np.full((64, 64, 3), 255, np.uint8)
    colour = rng.integers(0, 200, 3).astype(np.uint8)
    x, y = (int(v) for v in rng.integers(14, 40, 2))
    r = 10
    if seed % 2:
        img[y - r:y + r, x - r:x + r] = colour
    else:
        yy, xx = np.mgrid[:64, :64]
        img[(yy - y) ** 2 + (xx - x) ** 2 < r * r] = colour
    return img


def build_tiny_checkpoint(root: Path, *, feature_dim: int = REGION_FEATURE_DIM, source: str | None = None,
                          method: str = "ct", seed: int = 0, dataset: str = "easy_vqa") -> Path:
    """A random tiny MCAN checkpoint + a 4-image feature store + val questions under ``root``.

    The store is written with the built-in region extractor (so uploads are allowed) unless
    ``feature_dim`` / ``source`` say otherwise (a stand-in for detector features).
    """
    root.mkdir(parents=True, exist_ok=True)
    images = {i: _shape_image(i) for i in IMAGE_IDS}
    store_path = root / "features.h5"
    builtin = feature_dim == REGION_FEATURE_DIM and source is None
    with FeatureStoreWriter(store_path, source=source or "easy_vqa regions (vqa_align.extract.regions)") as writer:
        for image_id, img in images.items():
            regions = extract_regions(img)
            feats = regions.features if builtin else np.random.default_rng(image_id).normal(size=(5, feature_dim))
            boxes = regions.boxes if builtin else np.tile([[0, 0, 32, 32]], (5, 1)).astype(np.float32)
            writer.add(image_id, feats, boxes, regions.image_size)
    questions = [{"image_id": i, "question": QUESTIONS[i % len(QUESTIONS)], "question_id": i * 1000} for i in IMAGE_IDS]
    (root / "val_questions.json").write_text(json.dumps({"questions": questions}))
    tokenizer = build_tokenizer(QUESTIONS, max_tokens=14)
    torch.manual_seed(seed)
    model_cfg = ModelConfig(
        hidden_size=32, num_heads=4, ffn_size=64, num_layers=2, flat_mlp_size=32, flat_size=48, dropout=0.0,
        feature_dim=feature_dim, word_embed_dim=16, vocab_size=len(tokenizer.get_vocab()), num_answers=len(ANSWERS),
        alignment=AlignmentConfig(method=method, helper_hidden=16, helper_out=8),
    )
    config = Config(model=model_cfg, data=DataConfig(dataset=dataset, features=str(store_path), max_regions=24),
                    name="tiny")
    config.validate()
    from vqa_align.model.mcan import MCAN

    model = MCAN(model_cfg)
    return save_checkpoint(root / "run" / "checkpoints" / "best", model, config, ANSWERS, tokenizer,
                           meta={"epoch": 0})


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread, as the app runs requests: tiny ops on 2 threads spin on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint) -> Predictor:
    # A picture loader for the synthetic store (easy-VQA's PNGs are not these images).
    return Predictor(tiny_checkpoint.parent.parent, image_loader=lambda i: _shape_image(i) if i in IMAGE_IDS else None)


# ----------------------------------------------------------------------------------------------
# Answers and diagnostics
# ----------------------------------------------------------------------------------------------


def test_answer_from_store_image(predictor):
    pred = predictor.answer("What shape is in the image?", image_id=2, top_k=5)
    assert pred.answer == pred.top_k[0][0] and pred.answer in ANSWERS
    probs = [p for _, p in pred.top_k]
    assert len(pred.top_k) == 5 and probs == sorted(probs, reverse=True)
    assert 0.0 < sum(probs) <= 1.0 + 1e-6
    assert pred.tokens == ["what", "shape", "is", "in", "the", "image"] and not any(pred.oov)
    assert pred.notes == []
    n = len(pred.boxes)
    assert 1 <= n <= 24 and pred.boxes_px.shape == (n, 4) and pred.image_glimpse.shape == (n,)
    assert np.all((pred.boxes >= 0) & (pred.boxes <= 1))
    assert np.allclose(pred.boxes_px / np.array(pred.image_size * 2), pred.boxes, atol=1e-5)
    assert pred.question_glimpse.shape == (6,) and np.isclose(pred.question_glimpse.sum(), 1, atol=1e-5)
    # 2 layers x (question SA, image SA, guided) modules, each restricted to valid positions
    assert len(pred.modules) == 6 and {m.kind for m in pred.modules} == {"sa_question", "sa_image", "sga_guided"}
    guided = pred.module("sga_guided", 1)
    assert guided.attention.shape == (4, n, 6) and guided.queries.shape == (4, n, 8) and guided.keys.shape == (4, 6, 8)
    assert np.allclose(guided.attention.sum(-1), 1, atol=1e-5)
    assert guided.query_labels == pred.region_labels and guided.key_labels == pred.tokens
    assert guided.ct.shape == (4,) and guided.mmd2.shape == (4,) and guided.learned is not None
    assert pred.metric_grid("sa_question").shape == (2, 4) and pred.metric_grid("sa_image", "ct").shape == (2, 4)
    json.dumps(pred.to_dict(diagnostics=True))  # JSON-ready


def test_answer_is_deterministic_and_matches_a_plain_forward(predictor):
    a = predictor.answer("is there a red circle", image_id=1)
    b = predictor.answer("is there a red circle", image_id=1)
    assert a.top_k == b.top_k


def test_upload_gives_same_answer_as_store_image(predictor):
    from_store = predictor.answer("what color is the shape", image_id=3)
    uploaded = predictor.answer("what color is the shape", image=_shape_image(3))
    assert uploaded.image_id is None and uploaded.image is not None
    assert [a for a, _ in uploaded.top_k] == [a for a, _ in from_store.top_k]
    assert np.allclose([p for _, p in uploaded.top_k], [p for _, p in from_store.top_k], atol=1e-3)


def test_examples_come_from_val_questions(predictor):
    examples = predictor.examples(3)
    assert [e.image_id for e in examples] == [0, 1, 2]
    assert examples[0].question == QUESTIONS[0]
    assert predictor.load_image(0).shape == (64, 64, 3)


def test_default_checkpoint_path_follows_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("VQA_ALIGN_CACHE", str(tmp_path))
    assert default_checkpoint_path() == tmp_path / "runs" / "quickstart"


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("question", ["", "   ", None, "?!."])
def test_empty_question(predictor, question):
    with pytest.raises(InputError, match="question"):
        predictor.answer(question, image_id=0)


def test_long_question_is_truncated_with_a_note(predictor):
    pred = predictor.answer(" ".join(["what shape is in the image"] * 100), image_id=0)
    assert len(pred.tokens) == 14
    assert any("600 words" in n and "first 14" in n for n in pred.notes)


def test_unknown_words_are_listed(predictor):
    pred = predictor.answer("what zebra is in the xylophone", image_id=0)
    assert pred.oov == [False, True, False, False, False, True]
    assert any("“zebra”" in n and "“xylophone”" in n for n in pred.notes)
    assert pred.answer in ANSWERS


@pytest.mark.parametrize("question", [
    "What's the man-made   zebra/colour?", "is there a red circle", "IS THERE (A) BLUE-RECTANGLE?!",
    " ".join(["what shape is in the image"] * 5), "xylophone zebra",
])
def test_question_ids_are_the_vocabulary_words_of_the_question(predictor, question):
    """The tokenizer gives each MCAN word its vocabulary id ([UNK] when unknown), truncated as in training."""
    from vqa_align.data.vqa_v2 import UNK_ID, tokenize_question

    vocab = predictor.tokenizer.get_vocab()
    words = tokenize_question(question)[:14]
    encoded = predictor.encode_question(question)
    assert encoded.words == words
    assert encoded.ids == [vocab.get(w, UNK_ID) for w in words]
    assert encoded.oov == [w not in vocab for w in words]


def test_image_choice_errors(predictor):
    with pytest.raises(InputError, match="exactly one"):
        predictor.answer("what shape", image_id=None, image=None)
    with pytest.raises(InputError, match="exactly one"):
        predictor.answer("what shape", image_id=0, image=_shape_image(0))
    with pytest.raises(InputError, match="not in the feature store"):
        predictor.answer("what shape", image_id=12345)
    for bad in ("abc", 1.5, float("nan"), True, 1e30, "1.5"):
        with pytest.raises(InputError, match="image id") as err:  # 1.5 was answered about image 1
            predictor.answer("what shape", image_id=bad)
        assert repr(bad) in str(err.value) or "out of range" in str(err.value)
    whole = [predictor.answer("what shape", image_id=given).image_id for given in (1, 1.0, np.int64(1), " 1 ")]
    assert whole == [1, 1, 1, 1]


def test_non_image_file(predictor, tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not a picture")
    with pytest.raises(InputError, match="not an image file"):
        predictor.answer("what shape", image=str(path))
    with pytest.raises(InputError, match="not found"):
        predictor.answer("what shape", image=str(tmp_path / "missing.png"))
    with pytest.raises(InputError, match="cannot read an image"):
        predictor.answer("what shape", image=object())


def _declared_png(path: Path, width: int, height: int) -> Path:
    """A complete 1-bit black PNG of ``width`` x ``height``: a few kilobytes for hundreds of megapixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    pixels = zlib.compressobj(9)
    body = b"".join(pixels.compress(row) for _ in range(height)) + pixels.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


def test_huge_image_is_downscaled(predictor, tmp_path):
    # 12 megapixels, under the limit: opened without a warning, downscaled before anything else.
    path = tmp_path / "big.png"
    Image.new("L", (6_000, 2_000), 255).save(path, compress_level=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rgb, notes = load_upload(path)
    assert max(rgb.shape[:2]) == 1024 and any("downscaled" in n for n in notes)


@pytest.mark.parametrize("side", [13_000, 20_000])  # PIL itself: a warning at 169 Mpx, an error at 400 Mpx
def test_pictures_above_the_pixel_limit_are_refused_before_decoding(predictor, tmp_path, monkeypatch, side):
    path = _declared_png(tmp_path / "bomb.png", side, side)
    assert path.stat().st_size < 600_000  # the upload is small; decoding it would take side^2 bytes and more
    def no_decoding(self, *args):
        raise AssertionError("decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning either
        with pytest.raises(InputError, match=r"bomb.png: .*more than the limit of 50 Mpx") as err:
            predictor.answer("what shape", image=str(path))
        with pytest.raises(InputError, match="more than the limit of 50 Mpx"):
            load_upload(path.read_bytes())
    assert "\n" not in str(err.value)
    if side == 13_000:
        assert "13000 x 13000 pixels (169 Mpx)" in str(err.value)


def test_the_pixel_limit_holds_for_every_way_in(predictor, tmp_path, monkeypatch):
    from vqa_align.extract import images

    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 63 * 64)  # a 64 x 64 picture is just too large
    picture = _shape_image(1)
    Image.fromarray(picture).save(tmp_path / "p.png")
    for given in (picture, Image.fromarray(picture), str(tmp_path / "p.png")):
        with pytest.raises(InputError, match=r"64 x 64 pixels \(0 Mpx\) is more than the limit of 0.004032 Mpx"):
            load_upload(given)
    with pytest.raises(images.BadImage, match="more than the limit"):
        images.decode_image(tmp_path / "p.png")
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 64 * 64)  # exactly at the limit: accepted
    assert load_upload(picture)[0].shape == (64, 64, 3)


def test_grayscale_and_rgba_are_converted(predictor):
    gray = Image.fromarray(_shape_image(1)).convert("L")
    pred = predictor.answer("what shape", image=gray)
    assert any("grayscale" in n for n in pred.notes) and pred.image.shape[-1] == 3
    rgba = np.concatenate([_shape_image(1), np.full((64, 64, 1), 128, np.uint8)], axis=-1)
    pred = predictor.answer("what shape", image=rgba)
    assert any("Transparent" in n for n in pred.notes)
    pred = predictor.answer("what shape", image=_shape_image(1).astype(np.float32) / 255.0)  # float array
    assert pred.answer in ANSWERS
    deep = Image.fromarray((np.asarray(gray, np.uint16) * 257).astype(np.uint16))  # 16-bit grayscale
    rgb, notes = load_upload(deep)
    assert rgb.dtype == np.uint8 and rgb.max() > 200 and rgb.min() < rgb.max() and any("grayscale" in n for n in notes)


def test_uploads_disabled_for_detector_features(tmp_path):
    ckpt = build_tiny_checkpoint(tmp_path / "det", feature_dim=24, source="bottom-up-attention tsv",
                                  dataset="vqa_v2")
    pred = Predictor(ckpt)
    assert not pred.uploads_enabled and "Uploads are disabled" in pred.upload_error
    with pytest.raises(InputError, match="Uploads are disabled.*bottom-up-attention"):
        pred.answer("what shape", image=_shape_image(0))
    assert pred.answer("what shape", image_id=0).image is None  # no picture: drawn on a canvas
    views = render_views(pred.answer("what shape", image_id=0))
    assert isinstance(views.region, Figure)
    assert pred.thumbnail(0, size=96).shape == (96, 96, 3)  # boxes drawn on grey


def test_corrupt_checkpoint(tmp_path, tiny_checkpoint):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint, bad)
    (bad / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read weights"):
        Predictor(bad)


def test_run_predict_prints_json(tiny_checkpoint, capsys, tmp_path):
    import argparse

    args = argparse.Namespace(checkpoint=str(tiny_checkpoint), image_id=1, image=None, question="what shape?", top_k=3)
    assert run_predict(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["answer"] == out["top_k"][0]["answer"] and len(out["top_k"]) == 3 and out["notes"] == []
    args.question = ""
    with pytest.raises(UserError, match="question"):
        run_predict(args)
    with pytest.raises(UserError, match="quickstart"):
        run_predict(argparse.Namespace(checkpoint=None, image_id=1, image=None, question="x", top_k=3))


# ----------------------------------------------------------------------------------------------
# Views
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sga_guided", "sa_image", "sa_question"])
def test_render_views(predictor, kind):
    pred = predictor.answer("is there a red circle", image_id=1)
    views = render_views(pred, kind=kind, layer=-1, head=3, metric="ct", shading="guided", focus="2: a")
    for fig in (views.region, views.projection, views.grid, views.matrix):
        assert isinstance(fig, Figure) and fig.axes
    assert views.selection == dict(kind=kind, layer=1, head=3, metric="ct", shading="guided")
    assert [t for t, w in views.words if w is not None] == pred.tokens
    module = pred.module(kind, 1)
    assert views.matrix.axes[0].images[0].get_array().shape == module.attention[3].shape


def test_region_and_word_weights(predictor):
    pred = predictor.answer("is there a red circle", image_id=1)
    regions, words, _ = region_and_word_weights(pred, "glimpse")
    assert np.array_equal(regions, pred.image_glimpse) and np.array_equal(words, pred.question_glimpse)
    attn = pred.module("sga_guided", 0).attention[1]
    regions, words, title = region_and_word_weights(pred, "guided", 0, 1, focus="red")
    assert np.allclose(regions, attn[:, 3]) and np.allclose(words, attn.mean(0)) and "red" in title
    regions, _, _ = region_and_word_weights(pred, "guided", 0, 1)
    assert np.allclose(regions, attn @ pred.question_glimpse)
