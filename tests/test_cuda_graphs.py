"""train.cuda_graphs: what can be checked without a GPU (the padding to static shapes, the checks).

The graphs themselves are exercised on a GPU by benchmarks/gpu_trainer.sh (BENCHMARKS.md).
"""

from __future__ import annotations

import pytest
import torch
from conftest import random_batch, tiny_model_config, tiny_run_overrides

from vqa_align.cli import main as cli_main
from vqa_align.config import ConfigError, load_config
from vqa_align.train.cuda_graphs import REGION_BUCKET, pad_to_static
from vqa_align.model.mcan import MCAN


@pytest.mark.parametrize("method", ["none", "ct", "gan"])
def test_padding_to_static_shapes_keeps_loss_and_gradients(method):
    torch.manual_seed(0)
    model = MCAN(tiny_model_config(method)).double().train()
    batch = random_batch(batch=5, max_tokens=6, max_regions=9)
    batch["features"], batch["boxes"] = batch["features"].double(), batch["boxes"].double()
    padded = pad_to_static(batch, max_tokens=11, max_regions=30)
    assert padded["tokens"].shape == (5, 11)
    assert padded["features"].shape[1] == REGION_BUCKET * 2 and padded["boxes"].shape[1] == REGION_BUCKET * 2
    assert torch.equal(padded["region_counts"], batch["region_counts"])

    def loss_and_grads(inputs):
        model.zero_grad(set_to_none=True)
        out = model(**inputs)
        loss = out.logits.square().sum() + out.alignment_loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    loss, grads = loss_and_grads(batch)
    loss_padded, grads_padded = loss_and_grads(padded)
    torch.testing.assert_close(loss_padded, loss, rtol=1e-10, atol=1e-10)
    assert len(grads) == len(grads_padded)
    for a, b in zip(grads_padded, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_region_padding_never_exceeds_max_regions_unless_the_batch_does():
    batch = random_batch(batch=2, max_tokens=3, max_regions=9)
    assert pad_to_static(batch, 3, max_regions=10)["features"].shape[1] == 10  # 16 capped at 10
    assert pad_to_static(batch, 3, max_regions=5)["features"].shape[1] == 9  # never truncates


def test_cuda_graphs_config_checks(easy_vqa_cache, capsys):
    with pytest.raises(ConfigError, match="grad_accumulation"):
        load_config("configs/easy_vqa.yaml", ["train.cuda_graphs=true", "train.grad_accumulation=2"])
    args = ["train", "--config", "configs/easy_vqa.yaml", "--out", str(easy_vqa_cache / "graphs_run")]
    for o in tiny_run_overrides(easy_vqa_cache, **{"train.cuda_graphs": True, "train.device": "cpu"}):
        args += ["--set", o]
    assert cli_main(args) == 2
    assert "train.cuda_graphs needs one CUDA device" in capsys.readouterr().err
