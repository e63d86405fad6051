"""Every reader of a file in vqa-align, fed hostile variants of its file: truncated, empty, of the
wrong type, oversized (sparse files just over the real byte limit: cheap to make) and a YAML alias
bomb. Each must answer with one line naming the file (a UserError, or an InputError in the app),
never a traceback, a hang or unbounded memory.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import stat
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from test_inference import _one_thread, build_tiny_checkpoint  # noqa: F401
from vqa_align import untrusted_files
from vqa_align.cli import main
from vqa_align.config import ConfigError, load_config
from vqa_align.errors import UserError
from vqa_align.untrusted_files import MAX_CONFIG_BYTES, MAX_DATASET_JSON_BYTES, MAX_META_BYTES, MAX_VOCAB_BYTES

ALIAS_LEVELS = 9  # 9 nested levels of 9 aliases: 9**9 = 387 million leaves from ~300 bytes
BOMB_SECONDS = 2.0


def alias_bomb() -> str:
    lines, previous = ["l0: &l0 [x, x, x, x, x, x, x, x, x]"], "l0"
    for level in range(1, ALIAS_LEVELS):
        lines.append(f"l{level}: &l{level} [" + ", ".join([f"*{previous}"] * 9) + "]")
        previous = f"l{level}"
    return "\n".join(lines) + "\n"


class Evil:
    """A pickle that would run code when unpickled."""

    def __reduce__(self):
        return (os.system, ("echo hostile pickle ran",))


# --- damage to one file ---------------------------------------------------------------------------


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: max(1, len(data) // 2)])


def empty(path: Path) -> None:
    path.write_bytes(b"")


def oversize(limit: int):
    def damage(path: Path) -> None:
        os.truncate(path, limit + 1)  # sparse: no disk space used, but stat says limit + 1 bytes
    return damage


def write(text: str | bytes):
    def damage(path: Path) -> None:
        path.write_bytes(text.encode() if isinstance(text, str) else text)
    return damage


def pickle_with_code(path: Path) -> None:
    path.write_bytes(pickle.dumps({"weight": Evil()}))


def check_one_line(err: BaseException, *names: str) -> str:
    text = str(err)
    assert isinstance(err, (UserError, ValueError)), f"{type(err).__name__}: {text}"
    assert "\n" not in text and "Traceback" not in text, text
    assert any(name in text for name in names), f"no {names} in: {text}"
    return text


# --- checkpoint files -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("hostile"))


CHECKPOINT_CASES = {
    "config.yaml": [("truncated", write("model:\n  hidden_size: [32\n")), ("empty", empty),
                    ("wrong type", write("- a\n- b\n")), ("oversized", oversize(MAX_CONFIG_BYTES)),
                    ("binary", write(bytes(range(256)))), ("huge int", write("model:\n  hidden_size: 1" + "0" * 30)),
                    ("alias bomb", write(alias_bomb()))],
    "meta.json": [("truncated", truncate), ("empty", empty), ("wrong type", write("[1, 2]")),
                  ("oversized", oversize(MAX_META_BYTES)), ("extractor of wrong type", write('{"extractor": [1]}')),
                  ("extractor too wide", write('{"extractor": {"name": "x", "feature_dim": 1e400}}'))],
    "answers.json": [("truncated", truncate), ("empty", empty), ("wrong type", write('{"a": 1}')),
                     ("not strings", write("[1, 2, 3]")), ("oversized", oversize(MAX_VOCAB_BYTES))],
    "tokenizer/tokenizer.json": [("truncated", truncate), ("empty", empty), ("wrong type", write("[]")),
                                 ("oversized", oversize(MAX_VOCAB_BYTES))],
    "model.safetensors": [("truncated", truncate), ("empty", empty), ("wrong type", pickle_with_code)],
}


@pytest.mark.parametrize("name,variant,damage", [(n, v, d) for n, cases in CHECKPOINT_CASES.items() for v, d in cases])
def test_damaged_checkpoint_file_is_one_line_naming_it(ckpt, tmp_path, name, variant, damage):
    from vqa_align.runs.checkpoint import checkpoint_extractor, load_checkpoint

    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    damage(copy / name)
    started = time.monotonic()
    with pytest.raises((UserError, ValueError)) as info:
        load_checkpoint(copy)
        checkpoint_extractor(copy)  # meta.json's extractor is read here (the app, eval)
    assert time.monotonic() - started < BOMB_SECONDS * 5
    check_one_line(info.value, Path(name).name)


def test_alias_bomb_in_a_run_folder_config_returns_within_two_seconds(ckpt, tmp_path):
    """The bug: eval / predict / demo / the app's comparison loader spun forever on this file."""
    from vqa_align.runs.checkpoint import load_checkpoint

    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    (copy / "config.yaml").write_text(alias_bomb())
    outcome: list[BaseException | None] = []

    def load() -> None:
        try:
            load_checkpoint(copy)
            outcome.append(None)
        except BaseException as err:  # noqa: BLE001 - recorded for the assertion
            outcome.append(err)

    worker = threading.Thread(target=load, daemon=True)  # a hang must not block the test run
    worker.start()
    worker.join(BOMB_SECONDS)
    assert outcome, f"still loading after {BOMB_SECONDS} s: the alias bomb was expanded"
    assert "alias" in check_one_line(outcome[0], "config.yaml")


def test_trainer_state_variants(ckpt, tmp_path):
    from vqa_align.runs.checkpoint import load_trainer_state

    path = tmp_path / "trainer_state.pt"
    torch.save({"step": torch.tensor(3)}, path)
    for damage in (truncate, empty, pickle_with_code, write("[1, 2]")):
        torch.save({"step": torch.tensor(3)}, path)
        damage(path)
        with pytest.raises(UserError) as info:
            load_trainer_state(path)
        check_one_line(info.value, path.name)


def test_full_disk_during_a_checkpoint_save_keeps_the_checkpoints_on_disk(ckpt, tmp_path, monkeypatch):
    from vqa_align.runs import checkpoint
    from vqa_align.runs.checkpoint import load_checkpoint, save_checkpoint

    loaded = load_checkpoint(ckpt)
    last = tmp_path / "checkpoints" / "last"
    shutil.copytree(ckpt, last)
    before = {p.name: p.read_bytes() for p in last.iterdir() if p.is_file()}

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with pytest.raises(UserError) as info:
        save_checkpoint(last, loaded.model, loaded.config, loaded.answers, loaded.tokenizer, meta={"epoch": 1})
    text = check_one_line(info.value, str(last))
    assert "No space left on device" in text and "intact" in text
    assert {p.name: p.read_bytes() for p in last.iterdir() if p.is_file()} == before
    assert not last.with_name("last.tmp").exists()  # the partial write was removed
    load_checkpoint(last)  # and the checkpoint still loads


# --- configs and --set ----------------------------------------------------------------------------


@pytest.mark.parametrize("variant,damage", [
    ("truncated", write("train:\n  lr: [0.1\n")), ("wrong type", write("[1, 2]")), ("oversized", oversize(MAX_CONFIG_BYTES)),
    ("binary", write(bytes(range(256)))), ("alias bomb", write(alias_bomb())), ("nested", write("[" * 100_000)),
    ("huge batch size", write("train:\n  batch_size: " + "9" * 30)), ("huge width", write("model:\n  hidden_size: 99999999")),
    ("huge float", write("train:\n  lr: 1" + "0" * 400)), ("too many digits", write("train:\n  epochs: " + "1" * 5000)),
])
def test_hostile_config_file(tmp_path, variant, damage):
    path = tmp_path / "config.yaml"
    path.write_text("name: x\n")
    damage(path)
    started = time.monotonic()
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert time.monotonic() - started < BOMB_SECONDS
    check_one_line(info.value, "config.yaml")


def test_alias_bomb_in_set_is_refused():
    with pytest.raises(ConfigError, match="alias") as info:
        load_config(None, ["train.betas=" + "[&a [1, 1], *a]"])
    check_one_line(info.value, "--set")


def test_presets_still_load():
    from importlib import resources

    presets = sorted(Path(str(resources.files("vqa_align_configs"))).glob("*.yaml"))
    assert presets
    for preset in presets:
        if "sentiment" not in preset.name:
            load_config(preset)


# --- VQA questions / annotations / results --------------------------------------------------------

QUESTION = {"image_id": 1, "question": "what?", "question_id": 10}
ANNOTATION = {"image_id": 1, "question_id": 10, "answer_type": "other", "question_type": "what",
              "multiple_choice_answer": "a", "answers": [{"answer": "a"}] * 10}
VQA_FILES = {
    "questions": ({"questions": [QUESTION]}, "load_questions"),
    "annotations": ({"annotations": [ANNOTATION]}, "load_annotations"),
    "results": ([{"question_id": 10, "answer": "a"}], "load_results"),
}


@pytest.mark.parametrize("kind", list(VQA_FILES))
@pytest.mark.parametrize("variant,damage", [
    ("truncated", truncate), ("empty", empty), ("wrong type", write('"a string"')), ("nested", write("[" * 100_000)),
    ("oversized", oversize(MAX_DATASET_JSON_BYTES)), ("not utf-8", write(b"\xff\xfe\x00{")),
])
def test_hostile_vqa_json(tmp_path, kind, variant, damage):
    from vqa_align.metrics import vqa_accuracy

    good, reader = VQA_FILES[kind]
    path = tmp_path / f"{kind}.json"
    path.write_text(json.dumps(good))
    getattr(vqa_accuracy, reader)(path)  # the good file reads
    damage(path)
    with pytest.raises(UserError) as info:
        getattr(vqa_accuracy, reader)(path)
    check_one_line(info.value, path.name)


@pytest.mark.parametrize("field", ["question_id", "image_id"])
def test_ids_beyond_64_bits_are_refused_naming_the_record(tmp_path, field):
    from vqa_align.metrics.vqa_accuracy import load_questions

    path = tmp_path / "questions.json"
    path.write_text(json.dumps({"questions": [dict(QUESTION, **{field: 10**20})]}))
    with pytest.raises(UserError, match=f"{field}.*64 bits") as info:
        load_questions(path)
    check_one_line(info.value, path.name)


# --- feature stores and the converters' inputs ----------------------------------------------------


def _store(path: Path, dim: int = 6) -> Path:
    from vqa_align.extract.feature_store import FeatureStoreWriter

    with FeatureStoreWriter(path) as writer:
        writer.add(1, np.ones((3, dim), np.float32), np.tile([[0, 0, 4, 4]], (3, 1)).astype(np.float32), (8, 8))
    return path


def _set_attr(name: str, value):
    def damage(path: Path) -> None:
        with h5py.File(path, "r+") as f:
            f.attrs[name] = value
    return damage


@pytest.mark.parametrize("variant,damage", [
    ("truncated", truncate), ("empty", empty), ("wrong type", write('{"features": []}')),
    ("declared width differs", _set_attr("feature_dim", 7)), ("width of wrong type", _set_attr("feature_dim", "six")),
    ("version of wrong type", _set_attr("format_version", "1")),
    ("extractor of wrong type", _set_attr("extractor", '{"name": 3}')),
])
def test_hostile_feature_store(tmp_path, variant, damage):
    from vqa_align.extract.feature_store import FeatureStore

    path = _store(tmp_path / "features.h5")
    FeatureStore(path)
    damage(path)
    with pytest.raises(UserError) as info:
        FeatureStore(path)
    check_one_line(info.value, path.name)


def assert_one_error_line(code: int, err: str) -> None:
    """Exit 2, no traceback, one error line (after a progress bar's carriage-return updates, if any)."""
    lines = [line for line in err.splitlines() if line.strip() and "\r" not in line]
    errors = [line for line in lines if line.startswith("vqa-align")]
    assert code == 2 and "Traceback" not in err and len(errors) == 1, err


def _run(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def _tsv_line(image_id: object = 1) -> str:
    import base64

    boxes = base64.b64encode(np.tile([0, 0, 4, 4], 2).astype(np.float32).tobytes()).decode()
    feats = base64.b64encode(np.ones((2, 6), np.float32).tobytes()).decode()
    return f"{image_id}\t8\t8\t2\t{boxes}\t{feats}\n"


@pytest.mark.parametrize("variant,content", [
    ("truncated", _tsv_line()[:40]), ("empty", ""), ("wrong type", "\x00\x01binary\x02" * 20),
    ("oversized field", _tsv_line().replace("\t", "").replace("\n", "") * 4), ("id beyond 64 bits", _tsv_line(10**20)),
    ("size beyond int32", _tsv_line().replace("\t8\t8\t", "\t99999999999\t8\t")),
])
def test_hostile_tsv(tmp_path, capsys, monkeypatch, variant, content):
    from vqa_align_prep import tsv

    monkeypatch.setattr(tsv, "MAX_FIELD_BYTES", 200)  # smaller than the joined line, larger than a field
    path = tmp_path / "in.tsv"
    path.write_text(content)
    code, err = _run(["prep", "tsv", str(path), "--out", str(tmp_path / "out.h5")], capsys)
    assert_one_error_line(code, err)
    assert "in.tsv" in err or "out.h5" in err, err


def _npz(path: Path) -> None:
    np.savez(path, x=np.ones((6, 2), np.float32), bbox=np.tile([0, 0, 4, 4], (2, 1)).astype(np.float32),
             image_w=8, image_h=8, num_bbox=2)


@pytest.mark.parametrize("variant,damage", [
    ("truncated", truncate), ("empty", empty), ("wrong type", write("not a zip")), ("pickle", pickle_with_code),
])
def test_hostile_npz(tmp_path, capsys, variant, damage):
    folder = tmp_path / "npz"
    folder.mkdir()
    path = folder / "1.npz"
    _npz(path)
    damage(path)
    code, err = _run(["prep", "npz", str(folder), "--out", str(tmp_path / "out.h5")], capsys)
    assert_one_error_line(code, err)
    assert "1.npz" in err or "out.h5" in err, err


@pytest.mark.parametrize("variant,damage", [
    ("truncated", truncate), ("empty", empty), ("wrong type", write('{"image_features": 1}')),
])
def test_hostile_h5_input(tmp_path, capsys, variant, damage):
    path = tmp_path / "in.h5"
    with h5py.File(path, "w") as f:
        f["image_features"] = np.ones((1, 2, 6), np.float32)
        f["image_bb"] = np.tile([0, 0, 4, 4], (1, 2, 1)).astype(np.float32)
    damage(path)
    code, err = _run(["prep", "h5", str(path), "--out", str(tmp_path / "out.h5")], capsys)
    assert_one_error_line(code, err)
    assert "in.h5" in err, err


@pytest.mark.parametrize("variant,damage", [
    ("oversized", oversize(MAX_DATASET_JSON_BYTES)), ("empty", empty), ("wrong type", write("[1, 2]")),
])
def test_hostile_ids_json_of_h5_input(tmp_path, capsys, variant, damage):
    path = tmp_path / "in.h5"
    with h5py.File(path, "w") as f:
        f["image_features"] = np.ones((1, 2, 6), np.float32)
        f["image_bb"] = np.tile([0, 0, 4, 4], (1, 2, 1)).astype(np.float32)
    ids = tmp_path / "ids.json"
    ids.write_text('{"1": 0}')
    damage(ids)
    code, err = _run(["prep", "h5", str(path), "--ids-json", str(ids), "--out", str(tmp_path / "out.h5")], capsys)
    assert_one_error_line(code, err)
    assert "ids.json" in err, err


# --- pictures -------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant,damage", [("truncated", truncate), ("empty", empty), ("wrong type", write("{}"))])
def test_hostile_upload(tmp_path, variant, damage):
    from PIL import Image

    from vqa_align.serve.images import load_upload

    path = tmp_path / "photo.png"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(path)
    damage(path)
    with pytest.raises(ValueError) as info:  # InputError: shown in the app as a message
        load_upload(str(path))
    check_one_line(info.value, "photo.png", "image")


# --- weights of backbones and importers -----------------------------------------------------------


@pytest.mark.parametrize("variant,damage", [
    ("truncated", truncate), ("empty", empty), ("pickle", pickle_with_code), ("wrong type", write("[]")),
])
def test_hostile_weight_files(tmp_path, variant, damage):
    from vqa_align.extract.backbones import build_backbone
    from vqa_align.extract.backbones.bottom_up_weights import load_weights_file
    from vqa_align.importers.mcan import read_state_dict

    readers = {
        "efficientnet.pt": lambda p: build_backbone("efficientnet-lite0", {"weights": str(p)}),
        "bottom_up.pt": load_weights_file,
        "bottom_up.safetensors": load_weights_file,
        "mcan.pkl": read_state_dict,
    }
    for name, read in readers.items():
        path = tmp_path / name
        if name.endswith(".safetensors"):
            save_file({"w": torch.ones(4)}, str(path))
        else:
            torch.save({"w": torch.ones(4)}, path)
        damage(path)
        with pytest.raises(UserError) as info:
            read(path)
        check_one_line(info.value, name)


def _clip_folder(folder: Path) -> Path:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=16)
    CLIPVisionModel(config).save_pretrained(str(folder), safe_serialization=True)
    return folder


def test_hostile_clip_weights(tmp_path):
    from vqa_align.extract.backbones import build_backbone

    folder = _clip_folder(tmp_path / "clip")
    build_backbone("clip", {"model": str(folder)})  # the good folder loads
    weights = folder / "model.safetensors"
    cases = {
        "truncated": lambda: truncate(weights),
        "empty": lambda: empty(weights),
        "pickle instead": lambda: (weights.unlink(), pickle_with_code(folder / "pytorch_model.bin")),
        "config of wrong type": lambda: (folder / "config.json").write_text("[1]"),
        "config oversized": lambda: oversize(MAX_META_BYTES)(folder / "config.json"),
    }
    for variant, damage in cases.items():
        shutil.rmtree(folder)
        _clip_folder(folder)
        damage()
        with pytest.raises(UserError) as info:
            build_backbone("clip", {"model": str(folder)})
        text = check_one_line(info.value, "clip")
        if variant == "pickle instead":
            assert "pytorch_model.bin" in text and "safetensors" in text


# --- numbers from the app -------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 1e30, 3.5, 10**20, "x", None, True])
def test_app_numbers_beyond_their_type_are_input_errors(value):
    from vqa_align.serve.predictor import whole_number
    from vqa_align.serve.prediction import InputError

    with pytest.raises(InputError, match="image id"):
        whole_number(value, "image id")


def test_app_whole_numbers_pass():
    from vqa_align.serve.predictor import whole_number

    assert whole_number(5.0, "x") == 5 and whole_number(np.int64(7), "x") == 7 and whole_number(-1, "x") == -1


# --- the bounded reader itself --------------------------------------------------------------------


def test_reader_refuses_a_file_that_grows_past_the_limit_after_stat(tmp_path, monkeypatch):
    path = tmp_path / "meta.json"
    path.write_text('{"a": 1}')
    real_stat = Path.stat
    small = os.stat_result((stat.S_IFREG | 0o644,) + (0,) * 5 + (1,) + (0,) * 3)  # a 1-byte file at stat time
    monkeypatch.setattr(Path, "stat", lambda self, **kw: small if self == path else real_stat(self, **kw))
    with pytest.raises(UserError, match="limit"):
        untrusted_files.read_json(path, 4)


def test_real_limits_leave_room_for_vqa_v2():
    # VQA v2 train annotations (~330 MB) and questions (~60 MB) must read; a config of a few KB too.
    assert MAX_DATASET_JSON_BYTES > 3 * 330 * 10**6 and MAX_CONFIG_BYTES > 100 * 3_000
