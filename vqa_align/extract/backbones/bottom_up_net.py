"""The layers of the bottom-up-attention detector (``bottom_up.BottomUpDetector`` assembles them).

Module and attribute names follow the checkpoint's parameter names exactly
(backbone.stem.conv1.norm.weight, proposal_generator.rpn_head.conv.weight, ...).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from vqa_align.extract.backbones import bottom_up_boxes as B

if TYPE_CHECKING:
    from vqa_align.extract.backbones.bottom_up_config import BottomUpConfig

FEATURE_DIM = 2048
RES4_CHANNELS = 1024  # what the RPN and the RoI pooling read
RESNET101_RES4_BLOCKS = (3, 4, 23)  # res2, res3, res4; res5 (3 blocks) runs per box in the RoI head

class ConvNorm(nn.Conv2d):
    """A bias-free convolution followed by batch norm (inference statistics), as one named unit."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1, eps: float = 1e-5):
        super().__init__(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, bias=False)
        self.norm = nn.BatchNorm2d(cout, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(super().forward(x))


class Bottleneck(nn.Module):
    """ResNet bottleneck, MSRA style: the stride sits on the first 1x1 conv (the Caffe model's layout)."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int, dilation: int = 1, eps: float = 1e-5):
        super().__init__()
        self.shortcut = ConvNorm(cin, cout, 1, stride=stride, eps=eps) if cin != cout else None
        self.conv1 = ConvNorm(cin, mid, 1, stride=stride, eps=eps)
        self.conv2 = ConvNorm(mid, mid, 3, padding=dilation, dilation=dilation, eps=eps)
        self.conv3 = ConvNorm(mid, cout, 1, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.conv1(x))
        out = F.relu(self.conv2(out))
        out = self.conv3(out)
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


def _stage(blocks: int, cin: int, mid: int, cout: int, stride: int, dilation: int = 1, eps: float = 1e-5) -> nn.Sequential:
    layers = [Bottleneck(cin, mid, cout, stride, dilation, eps)]
    layers += [Bottleneck(cout, mid, cout, 1, dilation, eps) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class Stem(nn.Module):
    def __init__(self, eps: float):
        super().__init__()
        self.conv1 = ConvNorm(3, 64, 7, stride=2, padding=3, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Caffe's max pool: no padding, output size rounded up (ceil_mode).
        return F.max_pool2d(F.relu(self.conv1(x)), kernel_size=3, stride=2, padding=0, ceil_mode=True)


class ResNetTrunk(nn.Module):
    """Stem + res2..res4 of ResNet-101: (B, 3, H, W) -> (B, 1024, ~H/16, ~W/16)."""

    def __init__(self, eps: float):
        super().__init__()
        self.stem = Stem(eps)
        n2, n3, n4 = RESNET101_RES4_BLOCKS
        self.res2 = _stage(n2, 64, 64, 256, 1, eps=eps)
        self.res3 = _stage(n3, 256, 128, 512, 2, eps=eps)
        self.res4 = _stage(n4, 512, 256, 1024, 2, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res4(self.res3(self.res2(self.stem(x))))


class _CellAnchors(nn.Module):
    """Holds the checkpoint's anchor tensor under the name ``cell_anchors.0``."""

    def __init__(self, anchors: torch.Tensor):
        super().__init__()
        self.register_buffer("0", anchors)


class AnchorGenerator(nn.Module):
    def __init__(self, config: BottomUpConfig):
        super().__init__()
        self.cell_anchors = _CellAnchors(B.cell_anchors(config.anchor_sizes, config.anchor_ratios))

    @property
    def cells(self) -> torch.Tensor:
        return getattr(self.cell_anchors, "0")  # (A, 4)


class RPNHead(nn.Module):
    def __init__(self, cin: int, hidden: int, num_anchors: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, hidden, 3, padding=1)
        self.objectness_logits = nn.Conv2d(hidden, num_anchors, 1)
        self.anchor_deltas = nn.Conv2d(hidden, num_anchors * 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = F.relu(self.conv(x))
        return self.objectness_logits(t), self.anchor_deltas(t)  # (B, A, h, w), (B, 4A, h, w)


class ProposalGenerator(nn.Module):
    def __init__(self, config: BottomUpConfig):
        super().__init__()
        self.anchor_generator = AnchorGenerator(config)
        num_anchors = len(config.anchor_sizes) * len(config.anchor_ratios)
        self.rpn_head = RPNHead(RES4_CHANNELS, config.rpn_hidden, num_anchors)


class BoxPredictor(nn.Module):
    """Class scores, per-class box deltas and attribute scores from one 2048-d box feature."""

    def __init__(self, dim: int, num_classes: int, num_attributes: int):
        super().__init__()
        self.cls_score = nn.Linear(dim, num_classes + 1)  # + background (the last column)
        self.bbox_pred = nn.Linear(dim, num_classes * 4)
        # The attribute head sees the feature and an embedding of the predicted class.
        self.cls_embedding = nn.Embedding(num_classes + 1, dim // 8)
        self.fc_attr = nn.Linear(dim + dim // 8, dim // 4)
        self.attr_score = nn.Linear(dim // 4, num_attributes + 1)  # + "no attribute" (the last column)

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scores = self.cls_score(feats)  # (R, C+1)
        deltas = self.bbox_pred(feats)  # (R, 4C)
        # The class fed to the attribute head is the argmax over all C+1 scores, background included.
        emb = self.cls_embedding(scores.argmax(dim=-1))  # (R, dim/8)
        attr = self.attr_score(F.relu(self.fc_attr(torch.cat([feats, emb], dim=-1))))  # (R, A+1)
        return scores, attr, deltas


class RoIHeads(nn.Module):
    def __init__(self, config: BottomUpConfig):
        super().__init__()
        # res5 per box: stride 1 and dilation 2 (the model keeps the 14 x 14 pooled grid).
        self.res5 = _stage(3, RES4_CHANNELS, 512, FEATURE_DIM, 1, dilation=2, eps=config.bn_eps)
        self.box_predictor = BoxPredictor(FEATURE_DIM, config.num_classes, config.num_attributes)
