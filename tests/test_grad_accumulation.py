"""Gradient accumulation: every window, full or not, steps with the gradient of one batch of its samples."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_run_overrides

from vqa_align.config import load_config
from vqa_align.train.trainer import Trainer

PRESET = "configs/easy_vqa.yaml"
BATCH, ACCUM = 8, 3


def _split(batch: dict, sizes: list[int]) -> list[dict]:
    """One collated batch -> consecutive sub-batches of the given sizes (every entry is batch-first)."""
    out, start = [], 0
    for size in sizes:
        out.append({key: value[start : start + size] for key, value in batch.items()})
        start += size
    return out


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_each_window_steps_with_the_gradient_of_one_big_batch(easy_vqa_cache, tmp_path, monkeypatch, reduction):
    """Batches of 8, 8, 8 | 8, 4 with accumulation 3: a full window, then the epoch's partial window
    of 12 samples. The gradient at each step is compared with that of ONE batch of the window's
    samples (mean reduction: that batch's gradient; sum: batch_size/12 times it, the scale of a full
    window). Before the fix the partial window stepped with (∇L_8 + ∇L_4)/3 of the batch means
    (mean) or half the full-window scale (sum)."""
    overrides = tiny_run_overrides(easy_vqa_cache, **{
        "train.batch_size": BATCH, "train.grad_accumulation": ACCUM, "train.loss_reduction": reduction,
        "model.alignment.helper_precision": "fp32", "train.epochs": 1,
    })  # fmt: skip
    trainer = Trainer(load_config(PRESET, overrides), tmp_path / "run")
    big = next(iter(trainer._loader(trainer.train_set, False, 0, 0, 36)))
    batches = _split(big, [8, 8, 8, 8, 4])
    monkeypatch.setattr(trainer, "_loader", lambda *args, **kwargs: batches)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    stepped: list[list[torch.Tensor]] = []

    def record_step(*args, **kwargs):  # record the gradients, leave the weights as they are
        stepped.append([torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params])

    monkeypatch.setattr(trainer.optimizer, "step", record_step)
    trainer.train_epoch()
    assert len(stepped) == 2 and all(torch.equal(p, s) for p, s in zip(params, start, strict=True))

    for window, samples in ((stepped[0], big_slice(big, 0, 24)), (stepped[1], big_slice(big, 24, 36))):
        trainer.optimizer.zero_grad(set_to_none=True)
        inputs, targets = trainer.task.inputs(samples), samples["targets"]
        loss, _, _ = trainer.objective(trainer.ddp_model, inputs, targets)
        scale = BATCH / targets.shape[0] if reduction == "sum" else 1.0
        (loss * scale).backward()
        for got, p in zip(window, params, strict=True):
            want = torch.zeros_like(p) if p.grad is None else p.grad
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def big_slice(batch: dict, start: int, stop: int) -> dict:
    return {key: value[start:stop] for key, value in batch.items()}
