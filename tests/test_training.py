"""The training engine: schedule, resume == uninterrupted, failure handling, eval, CLI errors, DDP."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_run_overrides
from vqa_align.train import trainer as training
from vqa_align.train import vqa_task
from vqa_align.cli import main as cli_main
from vqa_align.config import ConfigError, load_config
from vqa_align.evaluate.evaluator import evaluate_checkpoint
from vqa_align.train.schedule import learning_rate
from vqa_align.train.task import TrainingError
from vqa_align.train.trainer import train_from_config

PRESET = "configs/easy_vqa.yaml"


def _config(cache, **extra):
    return load_config(PRESET, tiny_run_overrides(cache, **extra))


def test_mcan_learning_rate_schedule():
    lrs = [learning_rate(e, 1e-4, 3, [10, 12], 0.2) for e in range(13)]
    want = [0.25e-4, 0.5e-4, 0.75e-4] + [1e-4] * 7 + [0.2e-4] * 2 + [0.04e-4]
    assert lrs == pytest.approx(want)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(easy_vqa_cache, tmp_path, capsys):
    train_from_config(_config(easy_vqa_cache), tmp_path / "full")
    # The console shows each epoch's validation accuracy (not only metrics.jsonl), the best marked.
    records = [json.loads(l) for l in (tmp_path / "full/metrics.jsonl").read_text().splitlines()]
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("epoch ") and "val_accuracy" in l]
    assert len(lines) == 2
    for line, record in zip(lines, [r for r in records if r["kind"] == "epoch"]):
        assert line.startswith(f"epoch {record['epoch']}/2 | train_loss {record['train_loss']:.4f} | "
                               f"val_accuracy {record['val_accuracy']:.2f}")
    assert lines[0].split(" | ")[2].endswith("(best)")  # the first evaluation is always the best so far
    train_from_config(_config(easy_vqa_cache, **{"train.epochs": 1}), tmp_path / "split")
    train_from_config(_config(easy_vqa_cache), tmp_path / "split", resume=True)
    full = load_file(str(tmp_path / "full/checkpoints/last/model.safetensors"))
    split = load_file(str(tmp_path / "split/checkpoints/last/model.safetensors"))
    assert full.keys() == split.keys()
    for key in full:
        assert torch.allclose(full[key], split[key], atol=1e-6), key
    epochs = [json.loads(l) for l in (tmp_path / "split/metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in epochs if r["kind"] == "epoch"] == [1, 2]
    assert (tmp_path / "full/curves.png").stat().st_size > 0
    assert (tmp_path / "full/config.yaml").is_file()


def test_training_logs_task_and_alignment_loss(easy_vqa_cache, tmp_path):
    trainer = train_from_config(_config(easy_vqa_cache, **{"train.epochs": 1}), tmp_path / "run")
    records = [json.loads(l) for l in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "train"]
    assert steps and all(r["alignment_loss"] > 0 and r["task_loss"] > 0 for r in steps)
    assert "val_accuracy" in records[-1] and 0 <= records[-1]["val_accuracy"] <= 100
    assert trainer.global_step == 3  # 96 questions / batch 32


@pytest.mark.parametrize("log_every", [1, 100])  # 100: the check is deferred to the epoch end
def test_non_finite_loss_stops_with_step_and_keeps_last_checkpoint(easy_vqa_cache, tmp_path, monkeypatch, log_every):
    real = vqa_task.task_loss
    calls = {"n": 0}

    def poisoned(logits, targets, reduction):
        calls["n"] += 1
        loss = real(logits, targets, reduction)
        return loss * float("nan") if calls["n"] > 4 else loss  # 3 training batches + 1 eval batch

    monkeypatch.setattr(vqa_task, "task_loss", poisoned)
    with pytest.raises(TrainingError, match=r"non-finite loss .* epoch 2, step 4"):
        train_from_config(_config(easy_vqa_cache, **{"train.log_every_steps": log_every}), tmp_path / "run")
    meta = json.loads((tmp_path / "run/checkpoints/last/meta.json").read_text())
    assert meta["epoch"] == 1 and meta["global_step"] == 3


def test_existing_run_is_refused_without_resume_or_overwrite(easy_vqa_cache, tmp_path, capsys):
    args = ["train", "--config", PRESET, "--out", str(tmp_path / "run")]
    for o in tiny_run_overrides(easy_vqa_cache, **{"train.epochs": 1}):
        args += ["--set", o]
    assert cli_main(args) == 0
    capsys.readouterr()
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "already holds a run" in err and "--resume" in err and len(err.splitlines()) == 1
    assert cli_main(args + ["--overwrite"]) == 0


@pytest.mark.parametrize(
    "override, message",
    [("train.lrr=1", "unknown config key(s) train.lrr"), ("train.epochs=two", "train.epochs: expected an integer"),
     ("model.alignment.method=kl", "model.alignment.method"),
     ("model.alignment.helper_precision=fp16", "model.alignment.helper_precision")],
)
def test_bad_config_values_name_the_key(override, message, capsys):
    assert cli_main(["train", "--config", PRESET, "--set", override]) == 2
    assert message in capsys.readouterr().err
    with pytest.raises(ConfigError):
        load_config(PRESET, [override])


def test_evaluation_official_accuracy_calibration_pavpu_noise(easy_vqa_cache, tmp_path):
    # Dropout on: PAvPU needs MC-dropout samples that differ (evaluate_checkpoint refuses it otherwise).
    train_from_config(_config(easy_vqa_cache, **{"train.epochs": 1, "model.dropout": 0.1}), tmp_path / "run")
    results = tmp_path / "results.json"
    metrics = evaluate_checkpoint(tmp_path / "run", "val", mc_samples=3, results_out=results, out_dir=tmp_path / "eval")
    assert 0 <= metrics["accuracy"] <= 100 and set(metrics["perAnswerType"]) <= {"yes/no", "other", "number"}
    assert 0 <= metrics["ece"] <= 100 and 0 <= metrics["pavpu"] <= 100
    # Training-time validation scores the same model with the same official rules (from a table
    # instead of the answer strings): the same accuracy, up to the two-decimal rounding and a
    # near-tie argmax that batching could flip on one question.
    val = [json.loads(l) for l in (tmp_path / "run/metrics.jsonl").read_text().splitlines()][-1]
    assert val["val_accuracy"] == pytest.approx(metrics["accuracy"], abs=0.01 + 100 / metrics["questions"])
    submitted = json.loads(results.read_text())
    assert len(submitted) == metrics["questions"] and set(submitted[0]) == {"question_id", "answer"}
    assert (tmp_path / "eval/reliability.png").read_bytes()[:4] == b"\x89PNG"
    # Noise adds a second, noisy pass next to the clean numbers; the submission holds the clean answers.
    noisy = evaluate_checkpoint(tmp_path / "run", "val", noise_std=50.0, results_out=tmp_path / "noisy_run.json")
    assert noisy["noise_std"] == 50.0 and noisy["accuracy"] == metrics["accuracy"] and noisy["ece"] == metrics["ece"]
    assert json.loads((tmp_path / "noisy_run.json").read_text()) == submitted
    assert 0 <= noisy["noisy"]["accuracy"] <= 100 and noisy["noisy"]["ece"] != metrics["ece"]
    assert noisy["noisy"]["accuracy_drop"] == pytest.approx(metrics["accuracy"] - noisy["noisy"]["accuracy"])
    # Several noise levels at once (the experiment's path): the same noisy numbers, no clean pass.
    from vqa_align.evaluate.evaluator import evaluate_under_noise

    levels = evaluate_under_noise(tmp_path / "run", "val", [50.0, 0.5])
    assert {k: v for k, v in noisy["noisy"].items() if k != "accuracy_drop"} == levels[50.0]
    assert set(levels) == {50.0, 0.5} and 0 <= levels[0.5]["accuracy"] <= 100


def test_eval_command_prints_clean_and_noisy_numbers_and_progress(easy_vqa_cache, tmp_path, capsys, monkeypatch):
    from vqa_align import progress

    monkeypatch.setattr(progress, "PROGRESS_EVERY_SECONDS", 0.0)
    monkeypatch.delenv(progress.PROGRESS_SWITCH, raising=False)
    train_from_config(_config(easy_vqa_cache, **{"train.epochs": 1}), tmp_path / "run")
    capsys.readouterr()
    args = ["eval", "--checkpoint", str(tmp_path / "run"), "--noise-std", "50", "--batch-size", "16",
            "--out", str(tmp_path / "eval")]
    assert cli_main(args) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    assert printed == {k: v for k, v in json.loads((tmp_path / "eval/metrics.json").read_text()).items()
                       if k != "perQuestionType"}
    assert {"accuracy", "ece", "perAnswerType"} <= set(printed) and set(printed["noisy"]) == {
        "accuracy", "ece", "perAnswerType", "accuracy_drop"}
    batches = -(-printed["questions"] // 16)
    for desc in ("eval val", "eval val noise 50"):
        lines = [l for l in captured.err.splitlines() if l.startswith(f"{desc} batch ")]
        assert len(lines) == batches and lines[-1].startswith(f"{desc} batch {batches}/{batches} |"), captured.err
        assert "questions/s" in lines[-1]
    assert f"accuracy {printed['accuracy']:.2f} clean, {printed['noisy']['accuracy']:.2f} under" in captured.err


def test_checkpoint_that_does_not_match_its_config_is_refused(easy_vqa_cache, tmp_path, capsys):
    train_from_config(_config(easy_vqa_cache, **{"train.epochs": 1}), tmp_path / "run")
    ckpt = tmp_path / "run/checkpoints/last"
    text = (ckpt / "config.yaml").read_text().replace("hidden_size: 32", "hidden_size: 64")
    (ckpt / "config.yaml").write_text(text)
    assert cli_main(["eval", "--checkpoint", str(ckpt)]) == 2
    assert "does not match its config" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, cache: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    config = load_config(PRESET, tiny_run_overrides(cache, **{"train.epochs": 1, "train.device": "cpu"}))
    trainer = train_from_config(config, __import__("pathlib").Path(out) / "run")
    torch.save({k: v.clone() for k, v in trainer.model.state_dict().items()}, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_ddp_two_cpu_processes_keep_identical_weights(easy_vqa_cache, tmp_path):
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), str(easy_vqa_cache), str(tmp_path)), nprocs=2)
    zero, one = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for key in zero:
        assert torch.equal(zero[key], one[key]), key
    assert (tmp_path / "run/checkpoints/last/model.safetensors").is_file()


def test_quickstart_path_on_a_small_subset(easy_vqa_cache, tmp_path, capsys):
    args = ["quickstart", "--out", str(tmp_path / "qs")]
    for o in tiny_run_overrides(easy_vqa_cache, **{"train.epochs": 1}):
        args += ["--set", o]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[: out.index("\n}\n") + 2])
    assert 0 <= summary["accuracy"] <= 100 and summary["questions"] > 0
    assert f"vqa-align demo --checkpoint {tmp_path / 'qs'}" in out and str(tmp_path / "qs" / "checkpoints" / "last") in out
    # A second quickstart names the commands that go on from there, and the --resume it names runs
    # as written (with the run's own --set values; on a finished run it only evaluates again).
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    resume = re.search(r"`(vqa-align quickstart [^`]*--resume)`", err)
    assert "already holds a quickstart run" in err and "--overwrite" in err and resume, err
    assert cli_main(shlex.split(resume.group(1))[1:]) == 0
    again = capsys.readouterr().out
    assert json.loads(again[: again.index("\n}\n") + 2])["accuracy"] == summary["accuracy"]
    # A run stopped before its first checkpoint has nothing to resume: a rerun starts it again.
    shutil.rmtree(tmp_path / "qs" / "checkpoints")
    assert cli_main(args) == 0
    assert (tmp_path / "qs" / "checkpoints" / "last" / "model.safetensors").is_file()


def test_glove_initialisation_from_a_local_file(easy_vqa_cache, tmp_path, capsys):
    glove = tmp_path / "glove.txt"
    glove.write_text("what " + " ".join(["0.5"] * 16) + "\nzzz " + " ".join(["1"] * 16) + "\n")
    config = _config(easy_vqa_cache, **{"train.epochs": 1, "train.max_steps": 0, "model.glove_path": str(glove)})
    trainer = training.Trainer(config, tmp_path / "run")
    row = trainer.model.question_encoder.embedding.weight[trainer.tokenizer.get_vocab()["what"]]
    assert torch.allclose(row, torch.full((16,), 0.5))
    assert "GloVe: 1 of" in capsys.readouterr().err
    glove.write_text("what 0.1 0.2\n")
    args = ["train", "--config", PRESET, "--out", str(tmp_path / "bad")]
    for o in tiny_run_overrides(easy_vqa_cache, **{"model.glove_path": str(glove)}):
        args += ["--set", o]
    assert cli_main(args) == 2
    assert "glove.txt:1: vector for 'what' has 2 values, expected 16" in capsys.readouterr().err
    glove.write_text("what " + " ".join(["nan"] * 16) + "\n")
    assert cli_main(args) == 2
    assert "glove.txt:1: vector for 'what' has a NaN or infinite value" in capsys.readouterr().err
    glove.write_text("zzz " + "1" * 10_000_000 + "\n")  # one 10 MB line: refused without reading it all
    assert cli_main(args) == 2
    assert "glove.txt:1: line longer than" in capsys.readouterr().err


def test_max_steps_zero_trains_no_step_but_writes_the_checkpoint(easy_vqa_cache, tmp_path):
    config = _config(easy_vqa_cache, **{"train.epochs": 2, "train.max_steps": 0})
    trainer = training.Trainer(config, tmp_path / "run")
    initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()
    assert trainer.global_step == 0 and trainer.history == []
    saved = load_file(str(tmp_path / "run/checkpoints/last/model.safetensors"))
    assert all(torch.equal(saved[k], initial[k]) for k in initial)  # the weights are the untrained ones
    assert json.loads((tmp_path / "run/checkpoints/last/meta.json").read_text())["global_step"] == 0
