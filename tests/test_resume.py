"""Run folders survive kills, resumes continue everything exactly, and --overwrite loses nothing.

One uninterrupted tiny run (2 epochs of 3 steps, a checkpoint every 2 steps) is the reference;
a run killed twice (after a log line past its last checkpoint, then between the two renames of a
checkpoint swap) and resumed each time must end with the same weights (bitwise), the same ``best``
and the same ``metrics.jsonl`` (times aside).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_run_overrides
from vqa_align.runs import checkpoint
from vqa_align import progress
from vqa_align.train import rng, vqa_task
from vqa_align.train import trainer as training
from vqa_align.runs.checkpoint import CheckpointError, load_checkpoint, load_trainer_state, resolve_checkpoint
from vqa_align.cli import main as cli_main
from vqa_align.config import load_config
from vqa_align.errors import DataFormatError, UserError
from vqa_align.runs.run_folder import RUN_MARKER
from vqa_align.train.task import TrainingError
from vqa_align.train.trainer import train_from_config

PRESET = "configs/easy_vqa.yaml"
# On the CPU wherever the suite runs: CUDA backward passes (atomics) are not bitwise repeatable.
RUN = {"train.epochs": 2, "train.checkpoint_every_steps": 2, "model.dropout": 0.1, "train.device": "cpu"}
TIMING_KEYS = ("time", "epoch_seconds", "samples_per_s")


def _config(cache, **extra):
    return load_config(PRESET, tiny_run_overrides(cache, **{**RUN, **extra}))


def _cli_args(command, out, cache, *extra_sets, **extra):
    args = [command, "--out", str(out)] + (["--config", PRESET] if command == "train" else [])
    for o in tiny_run_overrides(cache, **{**RUN, **extra}):
        args += ["--set", o]
    for o in extra_sets:
        args += ["--set", o]
    return args


def _records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in lines]


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "model.safetensors"))


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


@pytest.fixture(scope="module")
def reference(easy_vqa_cache, tmp_path_factory) -> Path:
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train_from_config(_config(easy_vqa_cache), out)
    return out


def _copy_run(reference: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    return run


# ----------------------------------------------------------------------------------------------
# Items 3, 4, 5: killed and resumed == uninterrupted
# ----------------------------------------------------------------------------------------------


def test_killed_twice_and_resumed_equals_the_uninterrupted_run(easy_vqa_cache, reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_log, real_replace = training.Trainer.log, checkpoint._replace_dir

    def log_then_die(self, record):  # kill 1: step 3 is logged, the last checkpoint is step 2 (mid-epoch)
        real_log(self, record)
        if record["kind"] == "train" and record["step"] == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(training.Trainer, "log", log_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_from_config(_config(easy_vqa_cache), out)
    assert [r["step"] for r in _records(out) if r["kind"] == "train"][-1] == 3
    monkeypatch.setattr(training.Trainer, "log", real_log)

    def die_mid_swap(tmp, final):  # kill 2: between the renames of the end-of-epoch-1 `last`
        meta = json.loads((tmp / "meta.json").read_text())
        if final.name == "last" and meta["epoch"] == 1 and meta["global_step"] == 3:
            final.rename(final.with_name("last.old"))
            raise KeyboardInterrupt
        real_replace(tmp, final)

    monkeypatch.setattr(checkpoint, "_replace_dir", die_mid_swap)
    with pytest.raises(KeyboardInterrupt):
        train_from_config(_config(easy_vqa_cache), out, resume=True)
    ckpts = out / "checkpoints"
    assert not (ckpts / "last").exists() and (ckpts / "last.old").is_dir() and (ckpts / "last.tmp").is_dir()
    # Item 4: the state being swapped in already carries the best accuracy of epoch 1's evaluation.
    state = load_trainer_state(ckpts / "last.tmp" / "trainer_state.pt")
    accuracies = [r["val_accuracy"] for r in _records(out) if "val_accuracy" in r]
    assert state["best_accuracy"] == max(accuracies) and len(accuracies) == 1
    monkeypatch.setattr(checkpoint, "_replace_dir", real_replace)

    capsys.readouterr()
    train_from_config(_config(easy_vqa_cache), out, resume=True)
    assert "recovered it from last.tmp" in capsys.readouterr().err
    assert not (ckpts / "last.old").exists() and not (ckpts / "last.tmp").exists()

    _assert_same_weights(out / "checkpoints/last", reference / "checkpoints/last")
    _assert_same_weights(out / "checkpoints/best", reference / "checkpoints/best")
    best_meta, reference_meta = (json.loads((run / "checkpoints/best/meta.json").read_text()) for run in (out, reference))
    assert best_meta["epoch"] == reference_meta["epoch"]
    assert best_meta["best_val_accuracy"] == reference_meta["best_val_accuracy"]
    # Item 5: no repeated steps, and epoch 1's train_loss averages all its batches.
    assert _records(out) == _records(reference)
    steps = [r["step"] for r in _records(out) if r["kind"] == "train"]
    assert steps == sorted(set(steps)) == list(range(1, 7))


# ----------------------------------------------------------------------------------------------
# Item 1: no code execution from a run folder; damaged checkpoints are one-line errors
# ----------------------------------------------------------------------------------------------


class _Payload:
    ran = False

    def __reduce__(self):
        return (_mark_ran, ())


def _mark_ran():
    _Payload.ran = True
    return {}


def test_trainer_state_holds_only_tensors_and_plain_values(reference):
    state = torch.load(reference / "checkpoints/last/trainer_state.pt", weights_only=True)
    assert isinstance(state["rng"]["python"]["words"], torch.Tensor)
    assert state["rng"]["numpy"]["keys"].shape == (624,)
    with pytest.raises(TypeError, match=r"trainer_state.x is a ndarray"):
        checkpoint.save_trainer_state({"x": np.zeros(2)}, "unused.pt")


def test_rng_state_round_trips_through_tensors():
    state = rng.rng_state()
    expected = (np.random.rand(), torch.rand(1).item(), __import__("random").random())
    for _ in range(3):
        np.random.rand(), torch.rand(1), __import__("random").random()
    rng.set_rng_state(state)
    assert (np.random.rand(), torch.rand(1).item(), __import__("random").random()) == expected


@pytest.mark.parametrize("damage, message", [
    ("pickle", "trainer_state.pt: refused: it holds the Python global test_resume._mark_ran, not only tensors"),
    ("truncate_state", "trainer_state.pt: cannot be read"),
    ("truncate_weights", "model.safetensors: cannot read weights"),
    ("hidden_size", "does not match the run's config"),
])
def test_resume_from_a_damaged_or_crafted_run_is_a_one_line_error(easy_vqa_cache, reference, tmp_path, capsys,
                                                                   damage, message):
    run = _copy_run(reference, tmp_path)
    last = run / "checkpoints/last"
    if damage == "pickle":
        torch.save({"optimizer": _Payload()}, last / "trainer_state.pt")
    elif damage.startswith("truncate"):
        file = last / ("trainer_state.pt" if damage == "truncate_state" else "model.safetensors")
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    else:  # the run's own config edited: resume reads it (no --config given)
        text = (run / "config.yaml").read_text().replace("hidden_size: 32", "hidden_size: 64")
        (run / "config.yaml").write_text(text)
    assert cli_main(["train", "--out", str(run), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert "weights_only" not in err  # never PyTorch's advice to load an unknown pickle
    assert not _Payload.ran


# ----------------------------------------------------------------------------------------------
# Item 6: what may change on --resume
# ----------------------------------------------------------------------------------------------


def test_resume_refuses_changes_to_the_model_or_data_and_names_them(easy_vqa_cache, reference, tmp_path, capsys):
    run = _copy_run(reference, tmp_path)
    before = (run / "config.yaml").read_text()
    args = _cli_args("train", run, easy_vqa_cache, "model.hidden_size=64", "data.subset=64") + ["--resume"]
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "data.subset: 96 -> 64" in err and "model.hidden_size: 32 -> 64" in err and len(err.splitlines()) == 1
    assert (run / "config.yaml").read_text() == before  # not rewritten
    # Safe keys are accepted, and said.
    training.prepare_run_dir(run, resume=True, overwrite=False,
                             config=_config(easy_vqa_cache, **{"train.epochs": 5, "data.num_workers": 1}))
    err = capsys.readouterr().err
    assert "train.epochs: 2 -> 5 (safe to change on resume)" in err and "data.num_workers: 0 -> 1" in err


# ----------------------------------------------------------------------------------------------
# Item 2: --overwrite checks first, swaps at the first checkpoint, deletes only its own folders
# ----------------------------------------------------------------------------------------------


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_with_a_bad_data_path_keeps_the_old_run(easy_vqa_cache, reference, tmp_path, capsys):
    run = _copy_run(reference, tmp_path)
    before = _snapshot(run)
    args = _cli_args("train", run, easy_vqa_cache, f"data.features={tmp_path / 'typo.h5'}",
                     f"data.train_questions=[{tmp_path / 'q.json'}]") + ["--overwrite"]
    assert cli_main(args) == 2
    assert "typo.h5" in capsys.readouterr().err
    assert _snapshot(run) == before and not (tmp_path / "run.new").exists()


def test_overwrite_failing_in_the_first_epoch_keeps_the_old_run(easy_vqa_cache, reference, tmp_path, monkeypatch):
    run = _copy_run(reference, tmp_path)
    before = _snapshot(run)
    real = vqa_task.task_loss
    monkeypatch.setattr(vqa_task, "task_loss", lambda *a: real(*a) * float("nan"))
    with pytest.raises(TrainingError, match=r"images .*nothing was replaced: the previous run in .* is kept"):
        train_from_config(_config(easy_vqa_cache, **{"train.epochs": 1}), run, overwrite=True)
    assert _snapshot(run) == before and not (tmp_path / "run.new").exists()


def test_overwrite_replaces_a_marked_run_and_prints_progress_without_a_tty(easy_vqa_cache, reference, tmp_path,
                                                                           monkeypatch, capsys):
    run = _copy_run(reference, tmp_path)
    monkeypatch.setattr(progress, "PROGRESS_EVERY_SECONDS", 0.0)
    train_from_config(_config(easy_vqa_cache, **{"train.epochs": 1}), run, overwrite=True)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "samples/s" in line]
    assert len(lines) == 3 and lines[-1].startswith("epoch 1/1 batch 3/3 step 3") and "ETA 0:00:00" in lines[-1]
    assert "replaced the previous run" in err
    assert (run / RUN_MARKER).is_file() and json.loads((run / "checkpoints/last/meta.json").read_text())["epoch"] == 1
    assert [r["epoch"] for r in _records(run) if r["kind"] == "epoch"] == [1]  # the old run's lines are gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize("command", ["train", "quickstart"])
def test_overwrite_refuses_folders_vqa_align_did_not_create(easy_vqa_cache, reference, tmp_path, capsys, command):
    foreign = tmp_path / "mine"
    (foreign / "checkpoints/last").mkdir(parents=True)
    (foreign / "config.yaml").write_text("my: own\n")
    (foreign / "thesis.tex").write_text("precious")
    marked = _copy_run(reference, tmp_path)
    (marked / "notes").mkdir()
    (marked / "notes/todo.txt").write_text("precious")
    for folder, message in [(foreign, f"no {RUN_MARKER} marker"),
                            (marked, "holds files vqa-align did not write (first: notes)")]:
        before = _snapshot(folder)
        assert cli_main(_cli_args(command, folder, easy_vqa_cache) + ["--overwrite"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert _snapshot(folder) == before


# ----------------------------------------------------------------------------------------------
# Item 3 for readers: a run folder cut mid-swap, or without `last`
# ----------------------------------------------------------------------------------------------


def test_readers_recover_a_cut_swap_and_say_when_they_use_best(reference, tmp_path, capsys):
    run = _copy_run(reference, tmp_path)
    ckpts = run / "checkpoints"
    shutil.copytree(ckpts / "last", ckpts / "last.tmp")
    (ckpts / "last.tmp/.complete").unlink()  # an incomplete new checkpoint: the previous one wins
    (ckpts / "last").rename(ckpts / "last.old")
    assert resolve_checkpoint(run) == ckpts / "last"
    assert "recovered it from last.old" in capsys.readouterr().err
    shutil.rmtree(ckpts / "last")
    assert resolve_checkpoint(run) == ckpts / "best"
    assert "has no checkpoints/last; using checkpoints/best" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Named errors: vocabularies that do not belong to the weights, non-finite features
# ----------------------------------------------------------------------------------------------


def test_weights_with_another_runs_vocabulary_are_refused(reference, tmp_path):
    run = _copy_run(reference, tmp_path)
    ckpt = run / "checkpoints/last"
    answers = json.loads((ckpt / "answers.json").read_text())
    (ckpt / "answers.json").write_text(json.dumps(answers[::-1]))  # same size, other order
    with pytest.raises(CheckpointError, match=rf"vocabulary of {len(answers)} answers .* different one of {len(answers)}"):
        load_checkpoint(ckpt)
    # One more answer, config to match: the classifier's rows disagree (no fingerprint needed).
    (ckpt / "answers.json").write_text(json.dumps(answers + ["extra"]))
    text = (ckpt / "config.yaml").read_text().replace(f"num_answers: {len(answers)}", f"num_answers: {len(answers) + 1}")
    (ckpt / "config.yaml").write_text(text)
    with pytest.raises(CheckpointError, match=rf"has {len(answers)} answer outputs but .* has {len(answers) + 1} answers"):
        checkpoint.check_weight_sizes(ckpt, _weights(ckpt), len(answers) + 1, 10**6)


def _poisoned_cache(cache: Path, tmp_path: Path, split: str, name: str = "features",
                    value: float = np.inf) -> tuple[Path, int]:
    """A copy of the prepared cache with ``value`` in ``name`` (features or boxes) for the first image of ``split``."""
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    questions = json.loads((copy / "easy_vqa" / f"{split}_questions.json").read_text())["questions"]
    image_id = questions[0]["image_id"]
    with h5py.File(copy / "easy_vqa/features.h5", "r+") as f:
        row = int(np.nonzero(f["image_ids"][:] == image_id)[0][0])
        start = int(f["offsets"][row])
        f[name][start] = value
    return copy, image_id


def test_inf_features_in_the_validation_store_name_the_file_and_image(easy_vqa_cache, tmp_path):
    cache, image_id = _poisoned_cache(easy_vqa_cache, tmp_path, "val")
    with pytest.raises(DataFormatError, match=rf"features.h5: features of image {image_id} are not finite"):
        train_from_config(_config(cache, **{"train.epochs": 1}), tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # found before training, not after an epoch


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_boxes_in_the_training_store_are_named_before_training(easy_vqa_cache, tmp_path, value):
    cache, image_id = _poisoned_cache(easy_vqa_cache, tmp_path, "train", "boxes", value)
    with pytest.raises(DataFormatError, match=rf"features.h5: boxes of image {image_id} are not finite"):
        train_from_config(_config(cache, **{"train.epochs": 1}), tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_resume_onto_changed_data_is_refused_naming_the_file(easy_vqa_cache, tmp_path, capsys):
    cache = tmp_path / "cache"
    shutil.copytree(easy_vqa_cache, cache)
    run = tmp_path / "run"
    train_from_config(_config(cache, **{"train.epochs": 1, "train.max_steps": 1}), run)
    meta = json.loads((run / "checkpoints/last/meta.json").read_text())
    resume = _cli_args("train", run, cache, "train.epochs=1", "train.max_steps=1") + ["--resume"]
    for changed in ["train_annotations.json", "val_questions.json", "features.h5"]:
        file = cache / "easy_vqa" / changed
        assert str(file) in {**meta["data"]["files"], **meta["data"]["stores"]}
        original = file.read_bytes()
        if changed == "features.h5":
            with h5py.File(file, "r+") as f:
                f["features"][0] = f["features"][0] + 1
        else:  # another answer (a new vocabulary order) or another question: same name, other content
            data = json.loads(original)
            key, field = ("annotations", "multiple_choice_answer") if "annotations" in changed else ("questions", "question")
            data[key][0][field] = data[key][0][field] + " changed"
            file.write_text(json.dumps(data))
        capsys.readouterr()
        assert cli_main(resume) == 2
        err = capsys.readouterr().err.strip()
        assert f"{file} changed since the run was trained on it" in err and len(err.splitlines()) == 1, err
        file.write_bytes(original)
    assert cli_main(resume) == 0  # the same data again: the run resumes


def test_inf_features_in_the_training_store_name_the_image_and_what_is_kept(easy_vqa_cache, tmp_path):
    cache, image_id = _poisoned_cache(easy_vqa_cache, tmp_path, "train")
    with pytest.raises(TrainingError) as caught:
        train_from_config(_config(cache, **{"train.epochs": 1}), tmp_path / "run")
    message = str(caught.value)
    assert f"features of image {image_id} in " in message and "images " in message
    assert "no checkpoint had been written yet" in message and "is kept" not in message
    assert isinstance(caught.value, UserError)


def test_a_kill_between_the_renames_of_an_overwrite_is_repaired(tmp_path, capsys):
    from vqa_align.runs.run_folder import mark_run_folder, recover_run_swap

    out, old, new = tmp_path / "run", tmp_path / "run.old", tmp_path / "run.new"
    for folder, text in ((old, "old"), (new, "new")):
        (folder / "checkpoints").mkdir(parents=True)
        (folder / "config.yaml").write_text(text)
        mark_run_folder(folder)
    recover_run_swap(out)
    assert (out / "config.yaml").read_text() == "new" and not old.exists() and not new.exists()
    assert "moved the new run into place" in capsys.readouterr().err


def test_data_change_names_files_before_vocabularies():
    from vqa_align.data.fingerprint import data_change

    before = {"files": {"q.json": "1"}, "stores": {"s.h5": "2"},
              "vocabularies": {"answers_sha256": "a", "num_answers": "3"}}
    assert data_change(before, before) is None
    vocab = {**before, "vocabularies": {"answers_sha256": "b", "num_answers": "4"}}
    assert data_change(before, vocab) == "the answers built from the data now (4) differ from the 3 answers the run was trained with"
    both = {**vocab, "files": {"q.json": "9"}}
    assert data_change(before, both) == "the file q.json changed since the run was trained on it"
    assert "which the data now do not include" in data_change(before, {**before, "stores": {}})


def test_refused_trainer_state_names_what_was_refused(tmp_path):
    torch.save({"optimizer": np.zeros(3)}, tmp_path / "trainer_state.pt")  # numpy arrays are pickled globals
    with pytest.raises(CheckpointError) as caught:
        load_trainer_state(tmp_path / "trainer_state.pt")
    message = str(caught.value)
    assert f"{tmp_path / 'trainer_state.pt'}: refused: it holds the Python global numpy." in message
    assert "\n" not in message and "weights_only" not in message
    other = "Weights only load failed. ...\n\tWeightsUnpickler error: Unsupported operand 149\n\nCheck the docs."
    assert checkpoint._refused_item(other) == "a pickled object it cannot read safely (Unsupported operand 149)"


def test_weights_files_are_byte_identical_for_the_same_weights(reference, tmp_path):
    from safetensors import safe_open

    state = _weights(reference / "checkpoints/last")
    metadata = {f"key_{c}": c * 3 for c in "qwertyuiopasdfgh"}  # hash order would shuffle 16 keys
    files = []
    for index in range(4):
        checkpoint.save_weights(state, tmp_path / f"{index}.safetensors", metadata)
        files.append((tmp_path / f"{index}.safetensors").read_bytes())
    assert all(f == files[0] for f in files)
    length = int.from_bytes(files[0][:8], "little")
    assert list(json.loads(files[0][8 : 8 + length])["__metadata__"]) == sorted(metadata)
    with safe_open(str(tmp_path / "0.safetensors"), "pt") as handle:  # still a valid file
        assert handle.metadata() == metadata
    loaded = load_file(str(tmp_path / "0.safetensors"))
    assert all(torch.equal(loaded[k], state[k]) for k in state)
