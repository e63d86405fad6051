"""Nothing the user had is deleted or overwritten (issue 27, third pass).

One class per test: a run folder holding a foreign file at any depth is never replaced; an output
that is (or lies inside) an input is refused; report commands write only into their own folders and
never over a file they did not write; training never writes into a folder that is not a run, and a
run stopped before its first checkpoint is simply started again. Each test checks that the user's
file is still there with its bytes unchanged and that the one-line error names its path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import tiny_run_overrides
from vqa_align.cli import main
from vqa_align.config import DataConfig, load_config, save_config
from vqa_align.errors import UserError
from vqa_align.runs.report_folder import REPORT_MARKER
from vqa_align.runs.run_folder import RUN_MARKER, check_replaceable, mark_run_folder

PRESET = "configs/easy_vqa.yaml"
PRECIOUS = b"the user's own bytes\n"


def _user_file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(PRECIOUS)
    return path


def _refused(argv: list[str], capsys, *named: Path) -> str:
    """Run the CLI: it must fail with one line naming every path in ``named``."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for path in named:
        assert str(path) in err, (path, err)
    return err


def _fake_run(folder: Path) -> Path:
    """A run folder with every kind of file vqa-align writes there (no real weights needed)."""
    folder.mkdir()
    mark_run_folder(folder)
    for name in ("config.yaml", "metrics.jsonl", "curves.png", "done.json", "result.json", "README.md",
                 "eval/metrics.json", "eval/reliability.png", "tensorboard/events.out.tfevents.1.host.1.0"):
        _user_file(folder / name)
    for ckpt in ("best", "last", "last.tmp"):
        for name in ("model.safetensors", "config.yaml", "answers.json", "trainer_state.pt", "meta.json",
                     ".complete", "tokenizer/tokenizer.json", "tokenizer/vocab.txt"):
            _user_file(folder / "checkpoints" / ckpt / name)
    return folder


# ----------------------------------------------------------------------------------------------
# 1. --overwrite looks at every file of the run folder, at any depth
# ----------------------------------------------------------------------------------------------


def test_a_run_folder_of_only_vqa_align_files_is_replaceable(tmp_path):
    check_replaceable(_fake_run(tmp_path / "run"))  # no error: every file is one vqa-align writes


@pytest.mark.parametrize("foreign, named", [
    ("eval/notes.txt", "eval/notes.txt"), ("checkpoints/notes.txt", "checkpoints/notes.txt"),
    ("checkpoints/last/notes.txt", "checkpoints/last/notes.txt"), ("tensorboard/thesis.tex", "tensorboard/thesis.tex"),
    ("checkpoints/last/tokenizer/extra/vocab.txt", "checkpoints/last/tokenizer/extra"),  # a folder of its own
    ("checkpoints/mine/config.yaml", "checkpoints/mine"),
])
@pytest.mark.parametrize("command", ["train", "import"])
def test_overwrite_refuses_a_run_holding_a_foreign_file_at_any_depth(tmp_path, capsys, foreign, named, command):
    run = _fake_run(tmp_path / "run")
    user = _user_file(run / foreign)
    if command == "train":
        argv = ["train", "--config", PRESET, "--out", str(run), "--overwrite"]
    else:
        argv = ["import", "mcan-vqa", str(tmp_path / "ckpt.pkl"), "--questions", str(tmp_path / "q.json"),
                "--answers", str(tmp_path / "a.json"), "--out", str(run), "--overwrite"]
    err = _refused(argv, capsys, run)
    assert f"first: {named})" in err
    assert user.read_bytes() == PRECIOUS and (run / "config.yaml").read_bytes() == PRECIOUS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no staged copy either


def test_overwrite_refuses_a_symlink_inside_a_run(tmp_path, capsys):
    run = _fake_run(tmp_path / "run")
    user = _user_file(tmp_path / "elsewhere" / "data.bin")
    os.symlink(user.parent, run / "eval" / "linked")
    err = _refused(["train", "--config", PRESET, "--out", str(run), "--overwrite"], capsys, run)
    assert "first: eval/linked" in err and user.read_bytes() == PRECIOUS


# ----------------------------------------------------------------------------------------------
# 2. An output that is, or lies inside, an input is refused
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["same path", "symlink", "hard link", "sidecar"])
def test_prep_tsv_refuses_to_write_over_its_input(tmp_path, capsys, how):
    tsv = _user_file(tmp_path / "feats.tsv")
    out = {"same path": tsv, "symlink": tmp_path / "link.h5", "hard link": tmp_path / "hard.h5",
           "sidecar": tmp_path / "x.h5"}[how]
    if how == "symlink":
        out.symlink_to(tsv)
    elif how == "hard link":
        os.link(tsv, out)
    elif how == "sidecar":  # the store is written as OUT.tmp first
        tsv = _user_file(tmp_path / "x.h5.tmp")
    _refused(["prep", "tsv", str(tsv), "--out", str(out), "--overwrite"], capsys, tsv)
    assert tsv.read_bytes() == PRECIOUS


def test_prep_h5_and_npz_refuse_outputs_on_their_inputs(tmp_path, capsys):
    src, ids = _user_file(tmp_path / "in.h5"), _user_file(tmp_path / "ids.json")
    _refused(["prep", "h5", str(src), "--out", str(src), "--overwrite"], capsys, src)
    _refused(["prep", "h5", str(src), "--ids-json", str(ids), "--out", str(ids), "--overwrite"], capsys, ids)
    folder = tmp_path / "npz"
    npz = _user_file(folder / "x.npz")
    err = _refused(["prep", "npz", str(folder), "--out", str(npz), "--overwrite"], capsys, folder)
    assert "inside the input folder" in err
    _refused(["prep", "npz", str(folder), "--out", str(folder / "new.h5")], capsys, folder)
    assert (src.read_bytes(), ids.read_bytes(), npz.read_bytes()) == (PRECIOUS,) * 3
    assert sorted(p.name for p in folder.iterdir()) == ["x.npz"]


def test_extract_refuses_an_output_that_is_a_picture_or_its_ids_file(tmp_path, capsys):
    from PIL import Image

    picture = tmp_path / "a.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(picture)
    before = picture.read_bytes()
    argv = ["extract", str(picture), "--backbone", "efficientnet-lite0", "--overwrite", "--out"]
    _refused(argv + [str(picture)], capsys, picture)
    # The ids file written beside the store (OUT.ids.json) would replace a listed picture too.
    _refused(["extract", str(tmp_path), "--backbone", "efficientnet-lite0", "--out", str(tmp_path / "f.h5")],
             capsys, tmp_path)
    assert picture.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def test_prep_sentiment_refuses_an_sdist_it_would_overwrite(tmp_path, capsys):
    sdist = _user_file(tmp_path / "cache" / "sentiment" / "sentences.jsonl")
    _refused(["prep", "sentiment", "--sdist", str(sdist), "--cache-dir", str(tmp_path / "cache"), "--overwrite"],
             capsys, sdist)
    assert sdist.read_bytes() == PRECIOUS


def test_eval_outputs_may_not_be_its_data_or_checkpoint(tmp_path):
    from vqa_align.evaluate.evaluator import check_eval_outputs

    questions, store = _user_file(tmp_path / "val_q.json"), _user_file(tmp_path / "f.h5")
    ckpt = tmp_path / "run" / "checkpoints" / "last"
    answers = _user_file(ckpt / "answers.json")
    data = DataConfig(dataset="vqa_v2", features=str(store), val_questions=[str(questions)])
    for results_out, out_dir, named in [(questions, None, questions), (store, None, store),
                                        (answers, None, answers), (None, ckpt, ckpt)]:
        with pytest.raises(UserError, match="would destroy") as caught:
            check_eval_outputs(ckpt, data, results_out, out_dir)
        assert str(named) in str(caught.value)
    check_eval_outputs(ckpt, data, tmp_path / "results.json", tmp_path / "run" / "eval")  # elsewhere: fine
    assert (questions.read_bytes(), store.read_bytes(), answers.read_bytes()) == (PRECIOUS,) * 3


def test_train_refuses_to_replace_the_run_it_starts_from(tmp_path, capsys):
    run = _fake_run(tmp_path / "run")
    before = (run / "checkpoints/last/model.safetensors").read_bytes()
    _refused(["train", "--config", PRESET, "--init-from", str(run / "checkpoints/last"), "--out", str(run),
              "--overwrite"], capsys, run / "checkpoints/last")
    assert (run / "checkpoints/last/model.safetensors").read_bytes() == before


def test_import_refuses_an_out_that_is_its_checkpoint(tmp_path, capsys):
    ckpt = _user_file(tmp_path / "ckpt.pkl")
    _refused(["import", "mcan-vqa", str(ckpt), "--questions", str(tmp_path / "q.json"), "--answers",
              str(tmp_path / "a.json"), "--out", str(ckpt), "--overwrite"], capsys, ckpt)
    assert ckpt.read_bytes() == PRECIOUS


# ----------------------------------------------------------------------------------------------
# 3. Report commands write only into their own folders, never over a file they did not write
# ----------------------------------------------------------------------------------------------


def _report_commands(out: Path) -> list[list[str]]:
    return [["experiment", "--config", PRESET, "--methods", "none", "--seeds", "0", "--out", str(out)],
            ["sentiment", "experiment", "--config", "configs/sentiment_minilm.yaml", "--methods", "none",
             "--seeds", "0", "--out", str(out), "--runs-dir", str(out.parent / "runs")],
            ["sentiment", "report", "--out", str(out)]]


@pytest.mark.parametrize("index", [0, 1, 2], ids=["experiment", "sentiment experiment", "sentiment report"])
def test_report_commands_refuse_a_folder_that_is_not_theirs(tmp_path, capsys, index):
    out = tmp_path / "mine"
    files = [_user_file(out / name) for name in ("report.md", "README.md", "results.json")]
    _refused(_report_commands(out)[index], capsys, out)
    assert [f.read_bytes() for f in files] == [PRECIOUS] * 3
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "report.md", "results.json"]


@pytest.mark.parametrize("index", [0, 1, 2], ids=["experiment", "sentiment experiment", "sentiment report"])
def test_report_commands_never_overwrite_a_file_they_did_not_write(tmp_path, capsys, index):
    out = tmp_path / "report"
    out.mkdir()
    (out / REPORT_MARKER).write_text(json.dumps({"created_by": "vqa-align", "files": ["notes.txt"]}))
    user = _user_file(out / ("report.md" if index == 0 else "README.md"))
    marker = (out / REPORT_MARKER).read_bytes()
    _refused(_report_commands(out)[index], capsys, user)
    assert user.read_bytes() == PRECIOUS and (out / REPORT_MARKER).read_bytes() == marker


def test_a_report_folder_is_created_marked_and_reused(tmp_path, capsys):
    out = tmp_path / "new"
    assert main(["sentiment", "report", "--out", str(out)]) == 0
    written = json.loads((out / REPORT_MARKER).read_text())["files"]
    assert {"README.md", "results.json"} <= set(written) and (out / "README.md").is_file()
    notes = _user_file(out / "notes.md")  # read by the report, never written
    assert main(["sentiment", "report", "--out", str(out)]) == 0  # its own folder: rewritten
    assert notes.read_bytes() == PRECIOUS and PRECIOUS.decode().strip() in (out / "README.md").read_text()


# ----------------------------------------------------------------------------------------------
# 4. Training never writes into a folder that is not a run; a run without a checkpoint restarts
# ----------------------------------------------------------------------------------------------


def test_train_refuses_a_non_empty_folder_that_is_not_a_run_before_writing(tmp_path, capsys):
    folder = tmp_path / "photos"
    user = _user_file(folder / "holiday.jpg")
    for flags in ([], ["--resume"]):
        _refused(["train", "--config", PRESET, "--out", str(folder), *flags], capsys, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["holiday.jpg"] and user.read_bytes() == PRECIOUS


def test_a_marked_folder_with_a_user_file_and_no_run_is_refused_too(tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    mark_run_folder(folder)
    user = _user_file(folder / "notes.txt")
    _refused(["train", "--config", PRESET, "--out", str(folder)], capsys, folder)
    assert user.read_bytes() == PRECIOUS and not (folder / "config.yaml").exists()


@pytest.mark.parametrize("flag", ["", "--resume"])
def test_a_run_killed_before_its_first_checkpoint_is_started_again(easy_vqa_cache, tmp_path, capsys, flag):
    """A plain rerun and --resume both start it from the beginning and say so."""
    from vqa_align.train.trainer import train_from_config

    run = tmp_path / "run"
    quick = {"train.epochs": 1, "train.device": "cpu", "data.subset": 32, "data.eval_subset": 32}  # one step
    config = load_config(PRESET, tiny_run_overrides(easy_vqa_cache, **quick))
    run.mkdir()
    mark_run_folder(run)  # what a kill in the first epoch leaves: marker, config, a few log lines
    save_config(config, run / "config.yaml")
    (run / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "stale": True}) + "\n")
    train_from_config(config, run, resume=flag == "--resume")
    err = capsys.readouterr().err
    assert "stopped before its first checkpoint; starting it again from the beginning" in err
    assert (run / RUN_MARKER).is_file() and (run / "checkpoints/last/model.safetensors").is_file()
    assert "stale" not in (run / "metrics.jsonl").read_text()  # the stopped attempt's lines are gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
