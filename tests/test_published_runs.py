"""A published model, one journey: import with its extractor, answer about a new photo, load the run
from any directory or from the Hugging Face Hub (stubbed: no network), and its model card.

The bottom-up detector runs with seeded random weights of the real shapes (the real ones cannot be
downloaded here) at a small input size, so that a CPU run takes seconds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import test_import as ti
from test_import import ANSWERS, EXPECTED_IDS, HEADS, files, imported_run, ref_forward  # noqa: F401 (fixtures)
from vqa_align.cli import main as cli_main
from vqa_align.errors import UserError
from vqa_align.extract.backbones.base import sha256_of_file

DETECTOR_PARAMS = {"min_size": "128", "max_size": "192", "proposals": "10"}  # small input: seconds on a CPU
QUESTION = "what color is the cat?"


@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory) -> Path:
    """A weights folder as `vqa-align extract --download --backbone bottom-up` fills it (random weights)."""
    from safetensors.torch import save_file

    from vqa_align.extract.backbones.bottom_up import BottomUpConfig
    from vqa_align.extract.backbones.bottom_up_random import random_state_dict

    folder = tmp_path_factory.mktemp("bottom_up_weights")
    state = random_state_dict(BottomUpConfig(), seed=0)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    (folder / "objects_vocab.txt").write_text("".join(f"thing{i}\n" for i in range(1600)))
    (folder / "attributes_vocab.txt").write_text("".join(f"colour{i}\n" for i in range(400)))
    return folder


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    from PIL import Image
    from skimage import data

    path = tmp_path_factory.mktemp("photos") / "cat.png"
    Image.fromarray(data.chelsea()).save(path)  # 451 x 300, never seen by the model
    return path


def _import(files, out: Path, *extra: str, sd=None, features: Path | None = None) -> int:  # noqa: F811
    ckpt = ti.write_checkpoint(files["root"] / f"{out.name}.pkl", sd if sd is not None else ti.mcan_state_dict(seed=3))
    args = ["import", "mcan-vqa", str(ckpt), "--questions", *map(str, files["questions"]),
            "--answers", str(files["answers"]), "--out", str(out), "--num-heads", str(HEADS), *extra]
    if features is not None:
        args += ["--features", str(features)]
    return cli_main(args)


def _extractor_args(detector_dir: Path) -> list[str]:
    params = {"weights": str(detector_dir), **DETECTOR_PARAMS}
    return ["--extractor", "bottom-up", *[a for k, v in params.items() for a in ("--extractor-param", f"{k}={v}")]]


# ----------------------------------------------------------------------------------------------
# 1. An imported MCAN answers about a new photo through the detector its run records
# ----------------------------------------------------------------------------------------------


def test_imported_model_answers_about_a_new_photo(files, detector_dir, photo, monkeypatch, capsys):  # noqa: F811
    from vqa_align.extract.backbones import build_backbone
    from vqa_align.serve.predictor import Predictor

    monkeypatch.setattr(ti, "FEAT", 2048)  # the detector's feature size
    sd = ti.mcan_state_dict(seed=7)
    run = files["root"] / "run_bu"
    assert _import(files, run, *_extractor_args(detector_dir), sd=sd) == 0
    # What the run records is what `extract --backbone bottom-up --param ...` records, defaults included.
    meta = json.loads((run / "checkpoints" / "last" / "meta.json").read_text())
    recorded = meta["extractor"]
    backbone = build_backbone("bottom-up", {"weights": str(detector_dir), **DETECTOR_PARAMS})
    assert recorded == json.loads(backbone.info.to_json())
    assert recorded["params"]["mode"] == "adaptive" and recorded["params"]["selection"] == "bottom-up"
    assert (recorded["params"]["min_boxes"], recorded["params"]["max_boxes"], recorded["params"]["conf_thresh"]) == (10, 100, 0.2)
    assert recorded["params"]["min_size"] == 128 and recorded["feature_dim"] == 2048
    assert recorded["weights_sha256"] == sha256_of_file(detector_dir / "model.safetensors")
    assert recorded["weights_source"] == str(detector_dir / "model.safetensors")

    capsys.readouterr()
    assert cli_main(["predict", "--checkpoint", str(run), "--image", str(photo), "--question", QUESTION]) == 0
    out = json.loads(capsys.readouterr().out)
    # The reference: the detector's regions of the photo, fed to the original Net's forward.
    from PIL import Image

    picture = Image.open(photo).convert("RGB")
    regions = backbone.extract([backbone.preprocessor()(picture)], [picture.size])[0]
    assert 10 <= len(regions.features) <= 100 and out["num_regions"] == len(regions.features)
    ids = torch.zeros(1, ti.MAX_TOKENS, dtype=torch.long)
    words = [EXPECTED_IDS[w] for w in ("what", "color", "is", "the", "cat")]
    ids[0, :len(words)] = torch.tensor(words)
    _, logits = ref_forward(sd, ids, torch.from_numpy(regions.features)[None])
    probs = logits[0].softmax(-1)
    assert out["answer"] == ANSWERS[int(probs.argmax())]
    assert out["top_k"][0]["probability"] == pytest.approx(float(probs.max()), abs=1e-4)
    assert out["image_size"] == [451, 300]
    # The app's path: the same Predictor, answering an upload, with the detector's region names.
    predictor = Predictor(run)
    assert predictor.uploads_enabled
    pred = predictor.answer(QUESTION, image=str(photo))
    assert pred.answer == out["answer"] and all(" thing" in label for label in pred.region_labels)
    from vqa_align_app.main import build_app

    build_app(predictor)  # the page builds for a run with no feature store: uploads only
    # The card says which extractor makes its features.
    card = (run / "README.md").read_text()
    assert "`bottom-up`" in card and "mode=adaptive" in card and recorded["weights_sha256"][:12] in card


def test_import_extractor_errors(files, tmp_path, detector_dir, capsys):  # noqa: F811
    def error(*args: str) -> str:
        capsys.readouterr()
        assert _import(files, tmp_path / "out", *args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and not (tmp_path / "out").exists()  # nothing written
        return err

    # No weights here: the message names the command that fetches them.
    assert "--extractor bottom-up: " in error("--extractor", "bottom-up", "--extractor-param", f"weights={tmp_path}")
    assert "--download --backbone bottom-up" in error("--extractor", "bottom-up", "--extractor-param", f"weights={tmp_path}")
    assert "--extractor-param needs --extractor" in error("--extractor-param", "mode=fixed")
    assert "unknown backbone 'detectron'" in error("--extractor", "detectron")
    assert "mode 'sometimes'" in error(*_extractor_args(detector_dir), "--extractor-param", "mode=sometimes")
    # A model that reads 12-d features was not trained on the detector's 2048-d ones.
    assert "gives 2048-d features but the checkpoint reads 12-d" in error(*_extractor_args(detector_dir))


def test_run_without_extractor_says_how_to_enable_uploads(imported_run):  # noqa: F811
    from vqa_align.serve.predictor import InputError, Predictor

    predictor = Predictor(imported_run["run"])
    assert not predictor.uploads_enabled and "--extractor bottom-up" in predictor.upload_error
    with pytest.raises(InputError, match="--extractor bottom-up"):
        predictor.answer(QUESTION, image=np.zeros((32, 32, 3), np.uint8))


def test_recorded_weights_elsewhere_fall_back_to_the_default_folder(imported_run, detector_dir, monkeypatch):  # noqa: F811
    """A run made on another machine (a Hub download) names weights that are not here: the default
    folder is used, and the sha256 still decides."""
    from vqa_align.extract.backbones import ExtractorInfo, missing_for, params_of
    from vqa_align.extract.backbones.bottom_up import BottomUp

    info = ExtractorInfo("bottom-up", {"mode": "adaptive"}, "0" * 64, 2048, "/elsewhere/model.safetensors")
    assert "weights" not in params_of(info, BottomUp)
    monkeypatch.setenv("VQA_ALIGN_CACHE", str(detector_dir.parent / "empty_cache"))
    missing = missing_for(info)
    assert missing is not None and "vqa-align extract --download --backbone bottom-up" in missing.fix
    here = ExtractorInfo("bottom-up", {}, "", 2048, str(detector_dir / "model.safetensors"))
    assert params_of(here, BottomUp)["weights"] == str(detector_dir / "model.safetensors")


# ----------------------------------------------------------------------------------------------
# 2. A run folder works from any directory
# ----------------------------------------------------------------------------------------------


def test_imported_run_works_from_another_directory(imported_run, tmp_path, monkeypatch, capsys):  # noqa: F811
    root, fx = imported_run["root"], imported_run["files"]
    monkeypatch.chdir(root)  # import with paths relative to here, as a user types them
    rel = [str(Path(q).relative_to(root)) for q in fx["questions"]]
    ckpt = ti.write_checkpoint(root / "rel.pkl", imported_run["sd"])
    assert cli_main(["import", "mcan-vqa", "rel.pkl", "--questions", *rel, "--answers", "answer_dict.json",
                     "--out", "rel_run", "--num-heads", str(HEADS), "--features", "features.h5",
                     "--val-annotations", "val_annotations.json", "--set", "data.num_workers=0"]) == 0
    config = yaml.safe_load((root / "rel_run" / "config.yaml").read_text())
    assert config["data"]["features"] == str(root / "features.h5")
    assert config["data"]["val_questions"] == [str(fx["questions"][1])]
    assert config["data"]["val_annotations"] == [str(root / "val_annotations.json")]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert cli_main(["predict", "--checkpoint", str(root / "rel_run"), "--image-id", "3", "--question", QUESTION]) == 0
    assert json.loads(capsys.readouterr().out)["image_id"] == 3
    assert cli_main(["eval", "--checkpoint", str(root / "rel_run"), "--split", "val", "--batch-size", "2"]) == 0
    assert "accuracy" in json.loads(capsys.readouterr().out)
    assert ckpt.is_file()


def test_make_paths_absolute_and_resume_of_an_older_relative_run(tmp_path, monkeypatch):
    from vqa_align.config import Config, DataConfig, make_paths_absolute, save_config
    from vqa_align.runs.run_folder import check_resume_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "init").mkdir()
    config = Config(data=DataConfig(dataset="vqa_v2", features="f.h5", cache_dir="~/c",
                                    train_questions=["q/train.json"]))
    config.train.init_from = "user/repo"  # a Hub id stays as it is
    old = tmp_path / "config.yaml"
    save_config(config, old)  # what a run wrote before paths were stored absolute
    make_paths_absolute(config)
    assert config.data.features == str(tmp_path / "f.h5") and config.data.train_questions == [str(tmp_path / "q/train.json")]
    assert config.data.cache_dir == str(Path("~/c").expanduser()) and config.train.init_from == "user/repo"
    check_resume_config(old, config.to_dict())  # same run: the relative paths meant this directory
    from vqa_align.experiments.grid import config_signature  # experiments reuse such runs too

    assert config_signature(yaml.safe_load(old.read_text())) == config_signature(config)
    assert config_signature(yaml.safe_load(old.read_text())) != config_signature(Config())
    config.train.init_from = "init"
    assert make_paths_absolute(config).train.init_from == str(tmp_path / "init")


# ----------------------------------------------------------------------------------------------
# 3. Loading a run from the Hugging Face Hub (snapshot_download stubbed)
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def fake_hub(imported_run, tmp_path, monkeypatch):  # noqa: F811
    """huggingface_hub.snapshot_download replaced: 'user/mcan' is a copy of the imported run."""
    import huggingface_hub

    snapshot = tmp_path / "hub" / "snapshot"
    shutil.copytree(imported_run["run"], snapshot)
    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        if repo_id == "user/mcan":
            return str(snapshot)
        if repo_id == "user/empty":
            (tmp_path / "hub" / "empty").mkdir(exist_ok=True)
            return str(tmp_path / "hub" / "empty")
        # what an offline machine gets for a repo it never downloaded
        raise huggingface_hub.errors.LocalEntryNotFoundError(
            "Cannot find an appropriate cached snapshot folder for the specified revision on the local disk and "
            "outgoing traffic has been disabled.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return dict(snapshot=snapshot, calls=calls, run=imported_run["run"])


def test_predictor_and_cli_load_a_hub_repo(fake_hub, capsys, monkeypatch):
    from vqa_align import Predictor

    predictor = Predictor.from_pretrained("user/mcan")
    assert predictor.path == fake_hub["snapshot"] / "checkpoints" / "last"
    repo, kwargs = fake_hub["calls"][-1]
    assert repo == "user/mcan" and any("trainer_state.pt" in p for p in kwargs["ignore_patterns"])
    local = Predictor.from_pretrained(fake_hub["run"])  # a local folder: no download
    assert len(fake_hub["calls"]) == 1
    assert predictor.answer(QUESTION, image_id=3).answer == local.answer(QUESTION, image_id=3).answer
    capsys.readouterr()
    assert cli_main(["predict", "--checkpoint", "user/mcan", "--image-id", "3", "--question", QUESTION]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"] == str(fake_hub["snapshot"] / "checkpoints" / "last")
    # eval of a download: scored, and the downloaded card (in the Hub cache) is left alone.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(fake_hub["snapshot"].parent))
    card = (fake_hub["snapshot"] / "README.md").read_text()
    assert cli_main(["eval", "--checkpoint", "user/mcan", "--split", "val", "--batch-size", "2"]) == 0
    assert "accuracy" in json.loads(capsys.readouterr().out)
    assert (fake_hub["snapshot"] / "README.md").read_text() == card
    assert not (fake_hub["snapshot"] / "eval").exists()


@pytest.mark.parametrize("name, message", [
    ("no such/run here", "not a Hugging Face Hub repo id"),
    ("user/missing", r"downloading it from the Hugging Face Hub failed \(LocalEntryNotFoundError: Cannot find"),
    ("user/empty", "is not a vqa-align run"),
])
def test_hub_ids_that_fail_are_one_line_errors(fake_hub, capsys, name, message):
    import re

    from vqa_align.runs.checkpoint import CheckpointError
    from vqa_align.serve.predictor import Predictor

    with pytest.raises(CheckpointError, match=message):
        Predictor.from_pretrained(name)
    assert cli_main(["predict", "--checkpoint", name, "--image-id", "3", "--question", QUESTION]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(message, err)


# ----------------------------------------------------------------------------------------------
# 4. The model card
# ----------------------------------------------------------------------------------------------


def test_model_card_of_an_import_is_refreshed_by_eval(imported_run, capsys):  # noqa: F811
    run = imported_run["run"]
    card = (run / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: vqa-align")
    assert "Imported from a **mcan-vqa** checkpoint" in card and "val is part of their training data" in card
    assert "Not evaluated yet" in card and 'Predictor.from_pretrained("run")' in card
    assert "vqa-align predict --checkpoint run --image-id 42" in card  # no extractor: store images only
    # docs/import.md's test-dev recipe: answers to every test question in the server's format.
    results = imported_run["root"] / "results_test2015.json"
    assert cli_main(["eval", "--checkpoint", str(run), "--split", "test", "--results-out", str(results)]) == 0
    test_ids = [q["question_id"] for q in json.loads(imported_run["files"]["questions"][2].read_text())["questions"]]
    answers = json.loads(results.read_text())
    assert sorted(r["question_id"] for r in answers) == sorted(test_ids) and all(r["answer"] in ANSWERS for r in answers)
    assert (run / "README.md").read_text() == card  # nothing scored: the card stays
    capsys.readouterr()
    assert cli_main(["eval", "--checkpoint", str(run), "--split", "val", "--batch-size", "2"]) == 0
    accuracy = json.loads(capsys.readouterr().out)["accuracy"]
    card = (run / "README.md").read_text()
    assert f"| last | val | 2 | {accuracy:.2f} |" in card and "Not evaluated yet" not in card
    entries = json.loads((run / "eval" / "evaluations.json").read_text())
    assert [(e["checkpoint"], e["split"], e["accuracy"]) for e in entries] == [("last", "val", accuracy)]
    # Evaluating again replaces the entry; a run with its card can be replaced with --overwrite.
    assert cli_main(["eval", "--checkpoint", str(run), "--split", "val", "--batch-size", "2"]) == 0
    assert len(json.loads((run / "eval" / "evaluations.json").read_text())) == 1
    # An evaluation under noise records its noisy accuracy at its noise level, the clean one at 0.
    capsys.readouterr()
    assert cli_main(["eval", "--checkpoint", str(run), "--split", "val", "--batch-size", "2", "--noise-std", "1"]) == 0
    noisy = json.loads(capsys.readouterr().out)["noisy"]["accuracy"]
    entries = json.loads((run / "eval" / "evaluations.json").read_text())
    assert sorted((e["noise_std"], e["accuracy"]) for e in entries) == [(0.0, accuracy), (1.0, noisy)]
    assert _import(imported_run["files"], run, "--overwrite") == 0
    assert "Not evaluated yet" in (run / "README.md").read_text()


def test_training_writes_the_model_card(easy_vqa_cache, tmp_path):
    from conftest import tiny_run_overrides
    from vqa_align.config import load_config
    from vqa_align.train.trainer import train_from_config

    config = load_config("configs/easy_vqa.yaml", tiny_run_overrides(easy_vqa_cache, **{"train.epochs": 1, "data.subset": 32, "data.eval_subset": 32}))
    trainer = train_from_config(config, tmp_path / "run")
    card = (tmp_path / "run" / "README.md").read_text()
    assert "Data set: **easy_vqa**" in card and "built-in region extractor" in card
    assert f"Best validation accuracy during training: {trainer.best_accuracy:.2f} %" in card
    assert 'image="photo.jpg"' in card
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert Path(saved["data"]["cache_dir"]).is_absolute()


def test_init_from_a_hub_repo_fine_tunes_its_weights(fake_hub, tmp_path, capsys):
    """train.init_from takes a Hub repo id as predict/eval/demo do (the download stubbed)."""
    from vqa_align.config import load_config
    from vqa_align.runs.checkpoint import load_checkpoint
    from vqa_align.train.trainer import Trainer

    config = load_config(fake_hub["run"] / "config.yaml",
                         ["model.alignment.method=ct", "train.init_from=user/mcan", "train.batch_size=2"])
    trainer = Trainer(config, tmp_path / "ft")
    assert "weights loaded" in capsys.readouterr().err
    assert [repo for repo, _ in fake_hub["calls"]] and all(repo == "user/mcan" for repo, _ in fake_hub["calls"])
    source = load_checkpoint(fake_hub["snapshot"])
    assert trainer.answers == source.answers
    weights = {k: v for k, v in trainer.model.state_dict().items() if k in source.model.state_dict()}
    assert weights and all(torch.equal(v, source.model.state_dict()[k]) for k, v in weights.items())
    config.train.init_from = "user/absent"
    with pytest.raises(UserError, match="user/absent.*Hugging Face Hub"):
        Trainer(config, tmp_path / "ft2")
