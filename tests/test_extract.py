"""vqa-align extract: backbones, the image pipeline, resume, sharding, stores with labels."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vqa_align.errors import UserError
from vqa_align.extract.pipeline import (
    HASH_ID_BASE, HASH_ID_BITS, BadImage, ExtractOptions, decode_image, extract_images, extract_parts,
    image_id_for, list_images, merge_parts, parts_dir,
)
from vqa_align.extract.backbones import (
    Backbone, ExtractorInfo, ImageRegions, backbone_for, build_backbone, grid_boxes, missing_for,
)
from vqa_align.extract.feature_store import FeatureStore

skimage_data = pytest.importorskip("skimage.data")


# --- a tiny backbone: fast, deterministic, variable region counts and labels ---------------------


class MeanColour:
    """PIL RGB -> (3, 8, 8) float tensor of the picture at 8 x 8 (picklable for workers)."""

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(image.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1) / 255.0


class ToyBackbone(Backbone):
    """Regions = 1 + (id-dependent) 0..2 boxes; feature = mean colour of the 8 x 8 picture + k."""

    name = "toy"
    Params = dict

    def __init__(self, fail_after: int | None = None) -> None:
        super().__init__({}, "cpu")
        self.calls = 0
        self.images_seen = 0
        self.fail_after = fail_after

    def preprocessor(self):
        return MeanColour()

    def extract(self, inputs, sizes):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt
        out = []
        for x, (w, h) in zip(inputs, sizes):
            self.images_seen += 1
            mean = x.mean(dim=(1, 2)).numpy()  # (3,)
            k = 1 + int(mean.sum() * 100) % 3  # 1..3 regions, varying per picture
            feats = np.stack([np.concatenate([mean, [j]]) for j in range(k)]).astype(np.float32)  # (k, 4)
            boxes = np.tile(np.array([0, 0, w, h], np.float32), (k, 1))
            out.append(ImageRegions(feats, boxes, [f"thing {j}" for j in range(k)]))
        return out

    @property
    def info(self):
        return ExtractorInfo("toy", {"v": 1}, "0" * 64, 4)


def _write_pictures(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        arr = rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)
        p = folder / f"pic_{i:02d}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


def _store_dump(path: Path) -> tuple:
    s = FeatureStore(path)
    rows = [(int(i), *map(np.asarray, s.read_row(r)), tuple(s.image_sizes[r]), s.read_labels(r))
            for r, i in enumerate(s.image_ids)]
    s.close()
    return rows


def _assert_same_store(a: Path, b: Path) -> None:
    x, y = _store_dump(a), _store_dump(b)
    assert [r[0] for r in x] == [r[0] for r in y]  # same ids in the same order
    for r, q in zip(x, y):
        np.testing.assert_array_equal(r[1], q[1])  # features
        np.testing.assert_array_equal(r[2], q[2])  # boxes
        assert r[3:] == q[3:]  # size, labels


# --- ids and inputs ----------------------------------------------------------------------------


def test_image_ids_coco_and_stable_hash():
    assert image_id_for("COCO_val2014_000000000042.jpg") == 42
    assert image_id_for("000000123456.jpg") == 123456
    assert image_id_for("7.png") == 7
    digest = hashlib.sha1(b"holiday/beach.jpg").digest()
    expected = HASH_ID_BASE + (int.from_bytes(digest[:8], "big") >> (64 - HASH_ID_BITS))
    assert image_id_for("holiday/beach.jpg") == expected
    assert image_id_for("holiday/beach.jpg") != image_id_for("work/beach.jpg")
    assert expected < 2**53  # exact in JSON readers that use doubles


def test_list_images_folders_globs_text_and_errors(tmp_path):
    paths = _write_pictures(tmp_path / "a", 3)
    (tmp_path / "a" / "notes.md").write_text("not a picture")  # ignored: not an image name
    lst = tmp_path / "list.txt"
    lst.write_text("# my pictures\na/pic_00.png\n\n")
    assert [p for _, p in list_images([tmp_path / "a"])] == paths
    assert [p for _, p in list_images([str(tmp_path / "a" / "*_01.png")])] == [paths[1]]
    assert [p for _, p in list_images([lst])] == [tmp_path / "a" / "pic_00.png"]
    with pytest.raises(UserError, match="no input images"):
        list_images([])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty: folder contains no image files"):
        list_images([tmp_path / "empty"])
    with pytest.raises(UserError, match="nothing_here"):
        list_images([tmp_path / "nothing_here"])


# --- decoding odd pictures ----------------------------------------------------------------------


def test_decode_converts_modes_orientation_and_size(tmp_path):
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[..., 0] = 255  # red, fully transparent on the left half
    rgba[:, 6:, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    img, size = decode_image(tmp_path / "rgba.png")
    arr = np.asarray(img)
    assert img.mode == "RGB" and size == (12, 10)
    assert tuple(arr[0, 0]) == (255, 255, 255) and tuple(arr[0, 11]) == (255, 0, 0)  # alpha over white

    g16 = (np.arange(20 * 10, dtype=np.uint16).reshape(10, 20) * 300)  # values beyond 8 bits
    Image.fromarray(g16).save(tmp_path / "g16.png")
    img, _ = decode_image(tmp_path / "g16.png")
    arr = np.asarray(img)
    assert arr[0, 0, 0] == 0 and arr[-1, -1, 0] == 255 and (arr[..., 0] == arr[..., 2]).all()

    Image.new("CMYK", (8, 6), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # CMYK red
    img, size = decode_image(tmp_path / "cmyk.jpg")
    r, g, b = np.asarray(img).reshape(-1, 3).mean(axis=0)
    assert size == (8, 6) and r > 200 and g < 60 and b < 60

    # EXIF orientation 6: stored 40 x 20, shown rotated by 90 degrees -> 20 x 40
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 20), (0, 128, 0)).save(tmp_path / "rot.jpg", exif=exif)
    img, size = decode_image(tmp_path / "rot.jpg")
    assert size == (20, 40) and img.size == (20, 40)

    # huge: downscaled for the model, original size kept for the boxes
    Image.new("RGB", (3000, 1000), (9, 9, 9)).save(tmp_path / "big.png")
    img, size = decode_image(tmp_path / "big.png", max_side=600)
    assert size == (3000, 1000) and img.size == (600, 200)


def test_decode_rejects_bad_files(tmp_path):
    (tmp_path / "text.jpg").write_text("hello")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(BadImage, match="not an image"):
        decode_image(tmp_path / "text.jpg")
    with pytest.raises(BadImage, match="truncated"):
        decode_image(tmp_path / "cut.jpg")
    with pytest.raises(BadImage, match="not found"):
        decode_image(tmp_path / "gone.jpg")


# --- the run: skipping, labels, variable counts, resume, ranks -----------------------------------


def test_extract_skips_bad_files_and_stores_labels(tmp_path, capsys):
    paths = _write_pictures(tmp_path / "in", 5)
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    items = list_images([tmp_path / "in"])
    out = tmp_path / "f.h5"
    res = extract_images(items, ToyBackbone(), out, ExtractOptions(batch_size=2, num_workers=1, part_size=2, progress=True))
    assert res.images == 5 and [Path(p).name for p, _ in res.skipped] == ["broken.png"]
    err = capsys.readouterr().err
    assert err.count("skipped") == 1
    # stderr is no terminal here (a log): plain progress lines, no tqdm frames joined by \r
    assert "\r" not in err and err.splitlines()[-1].startswith("extract toy: 6/6 img | "), err
    store = FeatureStore(out)
    assert store.extractor == ExtractorInfo("toy", {"v": 1}, "0" * 64, 4)
    assert store.has_region_labels
    counts = store.region_counts
    assert counts.min() >= 1 and counts.max() <= 3 and len(set(counts.tolist())) > 1  # variable per image
    ids = json.loads((tmp_path / "f.h5.ids.json").read_text())
    for r, image_id in enumerate(store.image_ids):
        path = Path(ids[str(image_id)])
        ref = ToyBackbone().extract([MeanColour()(Image.open(path).convert("RGB"))], [Image.open(path).size])[0]
        feats, boxes = store.read_row(r)
        np.testing.assert_allclose(feats, ref.features, atol=1e-3)  # float16 storage
        assert store.read_labels(r) == ref.labels
        assert tuple(store.image_sizes[r]) == Image.open(path).size
    assert sorted(Path(p) for p in ids.values()) == paths
    assert not parts_dir(out).exists()


def test_extract_resumes_without_redoing_finished_parts(tmp_path):
    _write_pictures(tmp_path / "in", 7)
    items = list_images([tmp_path / "in"])
    opts = ExtractOptions(batch_size=2, num_workers=0, part_size=2, progress=False)
    ref = tmp_path / "ref.h5"
    extract_images(items, ToyBackbone(), ref, opts)

    out = tmp_path / "out.h5"
    with pytest.raises(KeyboardInterrupt):
        extract_images(items, ToyBackbone(fail_after=2), out, opts)  # parts 0 and 1 finish, then a "kill"
    assert not out.exists() and len(list(parts_dir(out).glob("part-*.json"))) == 2
    again = ToyBackbone()
    res = extract_images(items, again, out, opts)
    assert res.parts_reused == 2 and again.images_seen == 3  # only the 3 images of parts 2 and 3
    _assert_same_store(out, ref)
    with pytest.raises(UserError, match="exists"):
        extract_images(items, ToyBackbone(), out, opts)


def test_two_ranks_write_one_merged_store(tmp_path):
    """torchrun simulated in one process: each rank does its parts, rank 0 merges."""
    _write_pictures(tmp_path / "in", 5)
    items = list_images([tmp_path / "in"])
    opts = ExtractOptions(batch_size=2, num_workers=0, part_size=2, progress=False)
    extract_images(items, ToyBackbone(), tmp_path / "one.h5", opts)
    out = tmp_path / "two.h5"
    r0, r1 = ToyBackbone(), ToyBackbone()
    extract_parts(items, r0, out, opts, rank=0, world_size=2)  # parts 0, 2
    extract_parts(items, r1, out, opts, rank=1, world_size=2)  # part 1
    assert (r0.images_seen, r1.images_seen) == (3, 2)
    merge_parts(items, out, opts)
    _assert_same_store(out, tmp_path / "one.h5")


def test_resume_refuses_parts_of_another_extractor(tmp_path):
    _write_pictures(tmp_path / "in", 3)
    items = list_images([tmp_path / "in"])
    opts = ExtractOptions(batch_size=1, num_workers=0, part_size=1, progress=False)
    with pytest.raises(KeyboardInterrupt):
        extract_images(items, ToyBackbone(fail_after=1), tmp_path / "o.h5", opts)

    class Other(ToyBackbone):
        @property
        def info(self):
            return ExtractorInfo("toy", {"v": 2}, "0" * 64, 4)

    with pytest.raises(UserError, match="unfinished parts come from toy"):
        extract_images(items, Other(), tmp_path / "o.h5", opts)


# --- real backbones -----------------------------------------------------------------------------


def test_grid_boxes_by_hand():
    boxes = grid_boxes(100, 50, rows=2, cols=4)
    assert boxes.shape == (8, 4)
    np.testing.assert_allclose(boxes[0], [0, 0, 25, 25])
    np.testing.assert_allclose(boxes[5], [25, 25, 50, 50])  # row 1, column 1
    np.testing.assert_allclose(boxes[7], [75, 25, 100, 50])


def _pooled(regions: ImageRegions) -> np.ndarray:
    v = regions.features.mean(axis=0)
    return v / np.linalg.norm(v)


def test_efficientnet_lite0_knows_a_cat_from_a_coffee_cup():
    backbone = build_backbone("efficientnet-lite0")
    pre = backbone.preprocessor()
    cat = Image.fromarray(skimage_data.chelsea())  # 451 x 300
    cat_crop = cat.crop((60, 20, 360, 290)).resize((240, 216))  # another view of the same cat
    coffee = Image.fromarray(skimage_data.coffee())
    regs = backbone.extract([pre(im) for im in (cat, cat_crop, coffee)], [cat.size, cat_crop.size, coffee.size])
    assert regs[0].features.shape == (49, 1280) and np.isfinite(regs[0].features).all()
    np.testing.assert_allclose(regs[0].boxes[-1], [451 * 6 / 7, 300 * 6 / 7, 451, 300], rtol=1e-5)
    a, b, c = map(_pooled, regs)
    assert a @ b > a @ c + 0.1, (a @ b, a @ c)  # garbage weights or scaling would not separate them
    info = backbone.info
    assert info.name == "efficientnet-lite0" and info.feature_dim == 1280 and len(info.weights_sha256) == 64
    assert missing_for(info) is None


def test_efficientnet_input_scaling_is_tflite():
    from vqa_align.extract.backbones import build_backbone

    x = build_backbone("efficientnet-lite0").preprocessor()(Image.new("RGB", (5, 5), (0, 127, 255)))
    assert x.shape == (3, 224, 224)
    np.testing.assert_allclose(x[:, 0, 0].numpy(), [-127 / 128, 0.0, 1.0])


def test_clip_grid_from_a_local_folder_matches_the_model(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=64, patch_size=16)
    CLIPVisionModel(cfg).save_pretrained(tmp_path / "clip")
    backbone = build_backbone("clip", {"model": str(tmp_path / "clip")})
    pics = [Image.fromarray(skimage_data.astronaut()), Image.fromarray(skimage_data.coffee())]
    xs = [backbone.preprocessor()(p) for p in pics]
    regs = backbone.extract(xs, [p.size for p in pics])
    ref = CLIPVisionModel.from_pretrained(tmp_path / "clip").eval()
    with torch.no_grad():
        tokens = ref(pixel_values=torch.stack(xs)).last_hidden_state[:, 1:]  # (2, 16, 32)
    assert regs[1].features.shape == (16, 32)
    np.testing.assert_allclose(regs[1].features, tokens[1].numpy(), atol=1e-5)
    np.testing.assert_allclose(regs[0].boxes[1], [128, 0, 256, 128])  # 512 x 512 astronaut, 4 x 4 cells
    assert "model" not in backbone.info.params  # where the weights are is a source, not an identity
    assert backbone_for(backbone.info).info == backbone.info  # rebuilt from the record alone
    missing = missing_for(ExtractorInfo("clip", {}, "x", 32, weights_source="someone/not-downloaded-clip"))
    assert missing is not None and "not on this machine" in missing.what
    assert missing.fix == "vqa-align extract --download --backbone clip --param model=someone/not-downloaded-clip"


def test_torchvision_c5_grid_and_pooling_match_the_trunk():
    params = {"arch": "resnet18", "weights": "none", "image_size": 128}
    grid = build_backbone("torchvision", params)
    pooled = build_backbone("torchvision", {**params, "pool": 2})
    pic = Image.fromarray(skimage_data.chelsea())
    x = grid.preprocessor()(pic)
    full = grid.extract([x], [pic.size])[0]
    assert full.features.shape == (16, 512)  # 128 / 32 = 4 x 4 cells of resnet18's 512 channels
    half = pooled.extract([x], [pic.size])[0]
    cells = full.features.reshape(4, 4, 512)
    np.testing.assert_allclose(half.features[1], cells[0:2, 2:4].mean(axis=(0, 1)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(half.boxes[3], [451 / 2, 150, 451, 300])
    assert grid.info.weights_sha256 == pooled.info.weights_sha256  # same seed, same random init
    missing = missing_for(ExtractorInfo("torchvision", {"arch": "resnet50"}, "x", 2048, weights_source="IMAGENET1K_V2"))
    assert missing is None or "--download --backbone torchvision" in missing.fix


def test_unknown_backbone_and_parameters_are_one_line_errors():
    with pytest.raises(UserError, match="unknown backbone 'nope'"):
        build_backbone("nope")
    with pytest.raises(UserError, match="unknown parameter 'colour'"):
        build_backbone("efficientnet-lite0", {"colour": "red"})
    with pytest.raises(UserError, match="is not a int"):
        build_backbone("torchvision", {"image_size": "big", "weights": "none"})


def test_cli_errors_are_one_line_and_list_names_every_backbone(tmp_path, capsys):
    from vqa_align.cli import main as cli_main

    (tmp_path / "empty").mkdir()
    assert cli_main(["extract", str(tmp_path / "empty"), "--backbone", "efficientnet-lite0", "--out", str(tmp_path / "o.h5")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "contains no image files" in err
    assert cli_main(["extract", "--backbone", "efficientnet-lite0", str(tmp_path)]) == 2
    assert "--out is required" in capsys.readouterr().err
    _write_pictures(tmp_path / "in", 1)
    assert cli_main(["extract", str(tmp_path / "in"), "--backbone", "efficientnet-lite0", "--out", "o.h5",
                     "--device", "tpu:x"]) == 2
    assert "--device 'tpu:x': not a device" in capsys.readouterr().err
    assert cli_main(["extract", str(tmp_path / "in"), "--backbone", "nope", "--out", str(tmp_path / "o.h5")]) == 2
    assert "unknown backbone 'nope'" in capsys.readouterr().err
    assert cli_main(["extract", "--list"]) == 0
    listed = capsys.readouterr().out
    for name in ("efficientnet-lite0", "clip", "torchvision", "bottom-up"):
        assert name in listed


def test_store_labels_arriving_late_backfill_earlier_rows(tmp_path, monkeypatch):
    from vqa_align.extract import feature_store as store_module
    from vqa_align.extract.feature_store import FeatureStoreWriter

    monkeypatch.setattr(store_module, "WRITE_BUFFER_ROWS", 2)  # flush between images
    box = np.array([[0, 0, 1, 1]], np.float32)
    with FeatureStoreWriter(tmp_path / "s.h5") as w:
        w.add(1, np.ones((3, 2)), np.repeat(box, 3, 0), (4, 4))  # written before any label exists
        w.add(2, np.ones((2, 2)), np.repeat(box, 2, 0), (4, 4), labels=["dog", "red ball"])
        w.add(3, np.ones((1, 2)), box, (4, 4))
    s = FeatureStore(tmp_path / "s.h5")
    assert [s.read_labels(r) for r in range(3)] == [["", "", ""], ["dog", "red ball"], [""]]
    assert s.read_labels(1, max_regions=1) == ["dog"]
    assert s.extractor is None  # converted stores record none
    with pytest.raises(Exception, match="2 labels for 1 regions"):
        with FeatureStoreWriter(tmp_path / "t.h5") as w:
            w.add(1, np.ones((1, 2)), box, (4, 4), labels=["a", "b"])
