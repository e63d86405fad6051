"""Random weights for the bottom-up-attention detector, with the published names and shapes.

For tests and benchmarks without the real weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from vqa_align.extract.backbones import bottom_up_boxes as B

if TYPE_CHECKING:
    from vqa_align.extract.backbones.bottom_up_config import BottomUpConfig

RANDOM_BRANCH_SCALE = 0.2  # batch-norm scale of each residual branch's last conv (random weights)
RANDOM_HEAD_STD = 0.01  # std of the RPN and box-predictor weights (random weights)
RANDOM_PIXEL_STD = 60.0  # roughly the std of mean-subtracted 0-255 pixels


def random_state_dict(config: BottomUpConfig | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with the published names and shapes and random values that keep activations sane.

    For tests and benchmarks without the real weights: convolutions ~ He-normal, batch-norm scale
    small on the last conv of a residual branch (so 30+ blocks do not blow up), running stats 0 / 1,
    small head weights.
    """
    from vqa_align.extract.backbones.bottom_up import BottomUpConfig, BottomUpDetector  # the model defines the names

    cfg = config or BottomUpConfig()
    with torch.device("meta"):  # names and shapes only: no memory, no initialisation cost
        model = BottomUpDetector(cfg)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, value in model.state_dict().items():
        if name.endswith("cell_anchors.0"):
            state[name] = B.cell_anchors(cfg.anchor_sizes, cfg.anchor_ratios)
        elif name.endswith("num_batches_tracked"):
            state[name] = torch.zeros((), dtype=torch.long)
        elif name.endswith("running_mean"):
            state[name] = torch.zeros(value.shape)
        elif name.endswith("running_var"):
            state[name] = torch.ones(value.shape)
        elif ".norm." in name and name.endswith("weight"):
            scale = RANDOM_BRANCH_SCALE if ".conv3.norm" in name else 1.0
            state[name] = torch.full(value.shape, scale)
        elif ".norm." in name and name.endswith("bias"):
            state[name] = 0.1 * torch.randn(value.shape, generator=gen)
        elif value.ndim >= 2 and (name.startswith("proposal_generator") or "box_predictor" in name):
            # Heads: small weights (as detectors are initialised) keep boxes near their anchors.
            state[name] = torch.randn(value.shape, generator=gen) * RANDOM_HEAD_STD
        elif value.ndim >= 2:
            fan_in = value[0].numel()
            std = (2.0 / fan_in) ** 0.5
            if name == "backbone.stem.conv1.weight":
                std /= RANDOM_PIXEL_STD  # the input is raw 0-255 pixels minus the mean
            state[name] = torch.randn(value.shape, generator=gen) * std
        else:
            state[name] = 0.1 * torch.randn(value.shape, generator=gen)
    return state
