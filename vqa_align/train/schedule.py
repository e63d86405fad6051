"""The optimizer and its learning rate: MCAN's epoch schedule times an optional step warm-up.

Learning rate (MCAN): base × k/(W+1) in warm-up epoch k = 1..W, then base, multiplied by
``decay_factor`` at every epoch listed in ``decay_epochs`` (0-based epoch index >= listed value);
``train.warmup_steps`` multiplies it by a linear warm-up over the first optimizer steps.
``train.optimizer``: fused Adam (MCAN) or AdamW (sentence fine-tuning).
"""

from __future__ import annotations

from typing import Any

import torch

from vqa_align.config import TrainConfig


def learning_rate(epoch: int, base_lr: float, warmup_epochs: int, decay_epochs: list[int], decay_factor: float) -> float:
    """MCAN's schedule for 0-based ``epoch``."""
    if epoch < warmup_epochs:
        return base_lr * (epoch + 1) / (warmup_epochs + 1)
    return base_lr * decay_factor ** sum(epoch >= d for d in decay_epochs)


def warmup_factor(step: int, warmup_steps: int) -> float:
    """``train.warmup_steps``: optimizer step ``step`` (1-based) runs at min(1, step / (W + 1)) of the rate."""
    return min(1.0, step / (warmup_steps + 1)) if warmup_steps > 0 else 1.0


def build_optimizer(parameters: Any, tcfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """``train.optimizer``: fused Adam (MCAN) or torch's default AdamW (sentence fine-tuning)."""
    # For CUDA graphs capturable, with the learning rate a device tensor that set_learning_rate
    # updates in place (a float would be frozen into the graph).
    lr = torch.tensor(tcfg.lr, device=device) if tcfg.cuda_graphs else tcfg.lr
    options = {"lr": lr, "betas": tuple(tcfg.betas), "eps": tcfg.eps, "weight_decay": tcfg.weight_decay}
    if tcfg.optimizer == "adamw":
        return torch.optim.AdamW(parameters, capturable=tcfg.cuda_graphs, **options)
    # The fused Adam kernel (CPU and CUDA): on the 2-core CPU it updates MCAN-small's 57.6 M
    # parameters in 71 ms instead of 239 ms (foreach).
    return torch.optim.Adam(parameters, fused=True, capturable=tcfg.cuda_graphs, **options)


def set_learning_rate(optimizer: torch.optim.Optimizer, tcfg: TrainConfig, epoch: int, global_step: int,
                      device: torch.device) -> float:
    """The epoch schedule (warm-up epochs, decays), times the step warm-up of the next step
    (``global_step + 1``), written into ``optimizer``; returns it."""
    lr = learning_rate(epoch, tcfg.lr, tcfg.warmup_epochs, tcfg.decay_epochs, tcfg.decay_factor)
    if tcfg.warmup_steps:
        lr *= warmup_factor(global_step + 1, tcfg.warmup_steps)
    for group in optimizer.param_groups:
        if not tcfg.cuda_graphs:
            group["lr"] = lr  # also replaces a tensor lr resumed from a CUDA-graph run
        elif isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)  # in place: captured graphs read this tensor
        else:
            group["lr"] = torch.tensor(lr, device=device)
    return lr
