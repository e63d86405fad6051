"""The generic TrainConfig options the sentence runner brought, on the VQA task: step warm-up on
top of the epoch schedule, AdamW, evaluation every N steps, early stopping after ``patience``
evaluations without a gain (and a resumed finished run trains no further)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_run_overrides

from vqa_align.config import load_config
from vqa_align.train.trainer import train_from_config
from vqa_align.train.vqa_task import VQATask

PRESET = "configs/easy_vqa.yaml"


def test_vqa_with_step_warmup_adamw_step_evaluations_and_patience(easy_vqa_cache, tmp_path, monkeypatch):
    # 96 questions in batches of 32: 3 steps an epoch; 4 epochs would be 12 steps.
    overrides = tiny_run_overrides(easy_vqa_cache, **{
        "train.epochs": 4, "train.warmup_epochs": 1, "train.decay_epochs": "[]", "train.warmup_steps": 4,
        "train.optimizer": "adamw", "train.eval_every_steps": 2, "train.patience": 2, "train.device": "cpu"})
    scripted = iter([10.0, 20.0, 15.0, 12.0, 90.0, 90.0])
    monkeypatch.setattr(VQATask, "evaluate", lambda self, dataset=None, batch_size=None: {"val_accuracy": next(scripted)})
    config = load_config(PRESET, overrides)
    trainer = train_from_config(config, tmp_path / "run")
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    # checks at 2 (gain), 4 (gain), 6 and 8 (none): patience 2 is spent at step 8
    assert [(r["step"], r["improved"]) for r in records if r["kind"] == "eval"] == [
        (2, True), (4, True), (6, False), (8, False)]
    train = {r["step"]: r["lr"] for r in records if r["kind"] == "train"}
    assert sorted(train) == list(range(1, 9))
    base = config.train.lr
    for step, lr in train.items():  # epoch 0 (steps 1-3) at 1/2 of the base rate, times min(1, step / 5)
        assert lr == pytest.approx(base * (0.5 if step <= 3 else 1.0) * min(1.0, step / 5)), step
    assert not any("val_accuracy" in r for r in records if r["kind"] == "epoch")  # no epoch-end evaluations
    best = json.loads((tmp_path / "run/checkpoints/best/meta.json").read_text())
    assert (best["global_step"], best["best_val_accuracy"], trainer.best_step) == (4, 20.0, 4)

    again = train_from_config(load_config(PRESET, overrides), tmp_path / "run", resume=True)
    assert again.global_step == 8  # finished by early stopping: a resume trains no further
