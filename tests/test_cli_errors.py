"""Every command answers bad input with one line on stderr naming the option, file or value (exit 2).

BAD_OPTIONS has, for every option of every command that takes a value, bad values (or the reason
any value is accepted by the parser and checked later); test_every_option_is_covered fails when an
option is added without one. The other tests break real inputs (weights, feature stores, checkpoint
files) and check the message.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from test_inference import _one_thread, build_tiny_checkpoint  # noqa: F401
from vqa_align.cli import build_parser, main

# (command, option) -> bad values; each must be refused by the parser, naming the option.
BAD_OPTIONS = {
    ("eval", "--batch-size"): ["0", "-1", "x", "2.5", "2000000", "99999999999999999999"],
    ("eval", "--noise-std"): ["-0.1", "nan", "inf", "x"],
    ("eval", "--mc-samples"): ["-1", "1", "x"],
    ("eval", "--split"): [""],
    ("predict", "--top-k"): ["0", "-3", "x", "99999999999999999999"],
    ("predict", "--image-id"): ["-1", "x", "99999999999999999999", "9" * 400],
    ("predict", "--question"): ["", "   "],
    ("predict", "--batch-size"): ["0", "x"],
    ("prep qa", "--val-fraction"): ["0", "1", "-0.2", "nan", "x"],
    ("prep qa", "--seed"): ["-1", "x"],
    ("demo", "--port"): ["0", "99999", "-1", "x"],
    ("demo", "--host"): [""],
    ("prep tsv", "--dtype"): ["float64"],
    ("prep npz", "--dtype"): ["int8"],
    ("prep h5", "--dtype"): ["bfloat16"],
    ("import", "format"): ["caffe"],
    ("import", "--num-heads"): ["0", "-8", "x", "100000"],
    ("extract", "--batch-size"): ["0", "x", "99999999999999999999"],
    ("extract", "--workers"): ["-1", "x", "100000"],
    ("extract", "--part-size"): ["0", "99999999999999999999"],
    ("extract", "--max-side"): ["0", "2.5", "99999999999999999999"],
    ("extract", "--dtype"): ["float64"],
}
# Options whose values the parser cannot judge: the command checks them (tests below or in the
# command's own test file) — files and folders, --set (test_config.py), --methods/--seeds
# (test_experiment.py and below).
CHECKED_LATER = {
    "--config", "--set", "--out", "--checkpoint", "--compare", "--image", "--results-out", "--cache-dir",
    "--ids-json", "--questions", "--annotations", "--results", "--methods", "--seeds", "inputs", "input",
    "--init-from", "checkpoint", "--answers", "--features", "--val-annotations",
    # extract: pictures, backbone names and parameters, devices (tests/test_extract.py)
    "images", "--images", "--backbone", "--param", "--device", "--weights-dir",
    "--store", "--out-dir",  # prep qa: tests/test_own_photos.py
    "--confirmatory-seeds",  # experiment: tests/test_experiment.py
    "--sdist", "--runs-dir",  # prep sentiment / sentiment experiment: tests/test_sentiment.py
    "--extractor", "--extractor-param",  # import: tests/test_published_runs.py
}
REQUIRED_ARGS = {
    "eval": ["--checkpoint", "ckpt"],
    "predict": ["--checkpoint", "ckpt", "--image-id", "1", "--question", "what"],
    "demo": [],
    "prep tsv": ["in.tsv", "--out", "x.h5"],
    "prep npz": ["folder", "--out", "x.h5"],
    "prep h5": ["in.h5", "--out", "x.h5"],
    "prep qa": ["qa.csv", "--store", "x.h5"],
    "extract": ["x.jpg", "--backbone", "efficientnet-lite0", "--out", "x.h5"],
    "import": ["mcan-vqa", "ckpt.pkl", "--questions", "q.json", "--answers", "a.json", "--out", "run"],
}


def _commands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[f"{prefix}{name}"] = sub
                found.update(_commands(sub, f"{prefix}{name} "))
    return found


def _run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    return code, capsys.readouterr().err


def test_every_option_is_covered():
    for command, parser in _commands(build_parser()).items():
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._StoreTrueAction, argparse._SubParsersAction)):
                continue
            name = max(action.option_strings, key=len) if action.option_strings else action.dest
            assert (command, name) in BAD_OPTIONS or name in CHECKED_LATER, f"{command} {name} has no bad-value case"


@pytest.mark.parametrize("command,option,value",
                         [(c, o, v) for (c, o), values in BAD_OPTIONS.items() for v in values])
def test_bad_option_is_one_line(command, option, value, capsys):
    words = command.split()
    argv = list(REQUIRED_ARGS[command])
    if not option.startswith("--"):  # a positional argument: the first of the required ones
        argv[0] = value
    else:
        if option in argv:  # replace the required default
            i = argv.index(option)
            del argv[i:i + 2]
        argv.append(f"{option}={value}")
    code, err = _run(words + argv, capsys)
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"argument {option}" in err and f"vqa-align {command}: error:" in err, err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny checkpoints (with and without dropout) whose config names val questions and answers."""
    import yaml

    root = tmp_path_factory.mktemp("cli")
    made = {}
    for name, dropout in (("plain", 0.0), ("dropout", 0.3)):
        ckpt = build_tiny_checkpoint(root / name)
        questions = json.loads((root / name / "val_questions.json").read_text())["questions"]
        annotations = [{"question_id": q["question_id"], "image_id": q["image_id"], "question_type": "what",
                        "answer_type": "other", "multiple_choice_answer": "circle",
                        "answers": [{"answer": "circle", "answer_confidence": "yes", "answer_id": i + 1}
                                    for i in range(10)]} for q in questions]
        (root / name / "val_annotations.json").write_text(json.dumps({"annotations": annotations}))
        config = yaml.safe_load((ckpt / "config.yaml").read_text())
        config["data"]["val_questions"] = [str(root / name / "val_questions.json")]
        config["data"]["val_annotations"] = [str(root / name / "val_annotations.json")]
        config["model"]["dropout"] = dropout
        (ckpt / "config.yaml").write_text(yaml.safe_dump(config))
        made[name] = ckpt
    return made


def _copy(ckpt: Path, tmp_path: Path) -> Path:
    """A copy of the checkpoint (its store and question files stay shared, read-only)."""
    dest = tmp_path / "ckpt"
    shutil.copytree(ckpt, dest)
    return dest


def _predict(ckpt, capsys, image_id=1):
    return _run(["predict", "--checkpoint", str(ckpt), "--image-id", str(image_id), "--question",
                 "what shape is in the image?"], capsys)


def test_predict_and_eval_work(tiny, capsys):
    code, _ = _predict(tiny["plain"], capsys)
    assert code == 0
    code, _ = _run(["eval", "--checkpoint", str(tiny["dropout"]), "--mc-samples", "3"], capsys)
    assert code == 0  # a model with dropout: PAvPU is reported


def test_predict_with_nan_weights_names_the_tensor(tiny, tmp_path, capsys):
    ckpt = _copy(tiny["plain"], tmp_path)
    state = load_file(str(ckpt / "model.safetensors"))
    state["classifier.bias"][3] = float("nan")
    save_file(state, str(ckpt / "model.safetensors"))
    for argv in (["predict", "--checkpoint", str(ckpt), "--image-id", "1", "--question", "what shape?"],
                 ["eval", "--checkpoint", str(ckpt)]):
        code, err = _run(argv, capsys)
        assert code == 2 and err.count("\n") == 1, err
        assert "model.safetensors" in err and "classifier.bias" in err and "NaN or Inf" in err, err


def test_inf_features_name_the_image(tiny, tmp_path, capsys):
    import yaml

    ckpt = _copy(tiny["plain"], tmp_path)
    store = tmp_path / "features.h5"
    config = yaml.safe_load((ckpt / "config.yaml").read_text())
    shutil.copy(config["data"]["features"], store)
    with h5py.File(store, "r+") as f:
        row = int(np.flatnonzero(f["image_ids"][()] == 2)[0])
        start = int(f["offsets"][row])
        features = f["features"][start]
        features[5] = np.inf
        f["features"][start] = features
    config["data"]["features"] = str(store)
    (ckpt / "config.yaml").write_text(yaml.safe_dump(config))
    code, _ = _predict(ckpt, capsys, image_id=1)
    assert code == 0  # other images still answer
    code, err = _predict(ckpt, capsys, image_id=2)
    assert code == 2 and "image(s) 2 in the feature store features.h5" in err and "NaN or Inf" in err, err
    code, err = _run(["eval", "--checkpoint", str(ckpt)], capsys)
    assert code == 2 and "image(s) 2 in the feature store features.h5" in err, err


def test_mc_samples_without_dropout_is_refused(tiny, capsys):
    code, err = _run(["eval", "--checkpoint", str(tiny["plain"]), "--mc-samples", "5"], capsys)
    assert code == 2 and "no dropout" in err and "PAvPU is meaningless" in err, err


@pytest.mark.parametrize("damage", ["meta", "tokenizer", "tokenizer-empty", "answers", "config"])
def test_corrupt_checkpoint_files_name_the_file(tiny, tmp_path, capsys, damage):
    ckpt = _copy(tiny["plain"], tmp_path)
    file = {"meta": "meta.json", "tokenizer": "tokenizer/tokenizer.json", "tokenizer-empty": "tokenizer/tokenizer.json",
            "answers": "answers.json", "config": "config.yaml"}[damage]
    (ckpt / file).write_bytes(b"{}" if damage == "tokenizer-empty" else b"\x00\xff{not json")
    code, err = _predict(ckpt, capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{ckpt / file}" in err, err
    code, err = _run(["demo", "--checkpoint", str(tiny["plain"]), "--compare", str(ckpt), "--port", "1"], capsys)
    assert code == 2 and f"{ckpt / file}" in err, err  # refused before the server starts


def test_bad_seeds_are_refused_before_any_run(capsys, tmp_path):
    code, err = _run(["experiment", "--config", "configs/easy_vqa.yaml", "--seeds", "0,-1", "--out", str(tmp_path)],
                     capsys)
    assert code == 2 and "--seeds '0,-1': seeds must lie in [0, 4294967295], got -1" in err, err


def test_not_an_hdf5_file(tmp_path, capsys):
    bogus = tmp_path / "bogus.h5"
    bogus.write_text("hello")
    code, err = _run(["prep", "h5", str(bogus), "--out", str(tmp_path / "out.h5")], capsys)
    assert code == 2 and f"{bogus}: not a readable HDF5 file" in err, err


def test_os_errors_are_one_line_and_bugs_keep_their_traceback(monkeypatch, capsys):
    import vqa_align.metrics.vqa_accuracy as vqa_eval

    def full_disk(args):
        raise OSError(28, "No space left on device", "/data/results.json")

    monkeypatch.setattr(vqa_eval, "run_score", full_disk)
    code, err = _run(["score", "--questions", "q", "--annotations", "a", "--results", "r"], capsys)
    assert code == 2 and err == "vqa-align score: error: /data/results.json: No space left on device\n"

    def bug(args):
        raise TypeError("unsupported operand")

    monkeypatch.setattr(vqa_eval, "run_score", bug)
    with pytest.raises(TypeError):  # a bug in vqa-align: not disguised as the user's error
        main(["score", "--questions", "q", "--annotations", "a", "--results", "r"])
    monkeypatch.setattr(vqa_eval, "run_score", full_disk)
    monkeypatch.setenv("VQA_ALIGN_DEBUG", "1")
    with pytest.raises(OSError):
        main(["score", "--questions", "q", "--annotations", "a", "--results", "r"])


def test_evaluate_checkpoint_checks_its_arguments_from_python(tiny):
    from vqa_align.errors import UserError
    from vqa_align.evaluate.evaluator import evaluate_checkpoint

    for bad in (dict(batch_size=0), dict(noise_std=float("nan")), dict(mc_samples=1), dict(noise_std=-1.0),
                dict(noise_std=1e308), dict(noise_std=True)):
        with pytest.raises(UserError, match=next(iter(bad)).replace("_", "-")):
            evaluate_checkpoint(tiny["plain"], **bad)


def test_huge_noise_is_refused_and_never_blamed_on_the_store(tiny, capsys):
    code, err = _run(["eval", "--checkpoint", str(tiny["plain"]), "--noise-std", "1e308"], capsys)
    assert code == 2 and "--noise-std must be a number from 0 to 1000, got 1e+308" in err and "damaged" not in err, err
    # Should the noise still overflow the model: the message names the noise, not the store.
    from vqa_align.model.finite import NonFiniteError, check_output
    from vqa_align.runs.checkpoint import load_checkpoint

    model = load_checkpoint(tiny["plain"]).model
    logits, features, counts = torch.full((1, 3), float("nan")), torch.ones(1, 2, 4), torch.tensor([2])
    with pytest.raises(NonFiniteError, match="under feature noise of std 500.*use a smaller --noise-std"):
        check_output(logits, model, features, counts, [7], tiny["plain"], "s.h5", noise_std=500.0)
    boxes = torch.zeros(1, 2, 4)
    boxes[0, 1, 2] = float("nan")
    with pytest.raises(NonFiniteError, match=r"the region boxes of image\(s\) 7 in the feature store s.h5"):
        check_output(logits, model, features, counts, [7], tiny["plain"], "s.h5", boxes=boxes, noise_std=500.0)


def test_dropout_rates_see_layers_and_attention():
    from vqa_align.config import ModelConfig
    from vqa_align.evaluate.evaluator import dropout_rates
    from vqa_align.model.mcan import MCAN

    small = dict(hidden_size=16, num_heads=2, ffn_size=16, num_layers=1, flat_mlp_size=8, flat_size=16,
                 feature_dim=8, word_embed_dim=8, vocab_size=10, num_answers=3)
    assert max(dropout_rates(MCAN(ModelConfig(dropout=0.0, **small)))) == 0.0
    model = MCAN(ModelConfig(dropout=0.2, **small))
    layers = sum(isinstance(m, torch.nn.Dropout) for m in model.modules())
    rates = dropout_rates(model)
    assert max(rates) == 0.2 and rates.count(0.2) > layers  # the layers and the attention modules' own rate


def test_experiment_asks_no_pavpu_of_a_model_without_dropout():
    from vqa_align.config import Config
    from vqa_align.experiments.vqa import pavpu_samples, run_commands

    config = Config()
    config.model.dropout = 0.0
    assert pavpu_samples(config, 20) == 0
    config.model.dropout = 0.1
    assert pavpu_samples(config, 20) == 20
    assert "--mc-samples" not in run_commands("c.yaml", [], "ct", 0, "runs/x", [1.0], 0)["eval"][0]
    assert "--mc-samples 20" in run_commands("c.yaml", [], "ct", 0, "runs/x", [1.0], 20)["eval"][0]
