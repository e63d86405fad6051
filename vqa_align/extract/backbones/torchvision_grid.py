"""``torchvision``: ResNet / ResNeXt C5 grid features (the last residual stage), optionally pooled.

The grid-features line of work (Jiang et al., "In Defense of Grid Features for VQA", CVPR 2020)
showed that C5 grids of a detection-pretrained ResNeXt match bottom-up regions on VQA v2; with
ImageNet weights from torchvision this backbone gives the same kind of features with nothing but
torchvision. Each C5 cell (stride 32) is one region, its box the cell's share of the picture.
``pool`` averages the map to pool x pool cells first (e.g. 8 -> 64 regions at any image size).

Weights: ``--param weights=`` a torchvision weight enum name (``DEFAULT``, ``IMAGENET1K_V2`` ...;
fetch once with ``vqa-align extract --download --backbone torchvision``), a ``.pth`` state dict
(read with ``weights_only=True``), or ``none`` (random; tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from PIL import Image

from vqa_align.errors import UserError
from vqa_align.extract.backbones.base import (
    Backbone, ExtractorInfo, ImageRegions, Missing, ResizeNormalize, grid_regions, sha256_of_file,
    sha256_of_state_dict,
)

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
         "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
C5_STRIDE = 32
RANDOM = "none"


@dataclass
class Params:
    arch: str = "resnet50"
    weights: str = "DEFAULT"  # enum name, path to a .pth state dict, or "none" (random init)
    image_size: int = 448  # square input side; C5 is image_size / 32 cells a side (14 x 14)
    pool: int = 0  # > 0: adaptive average pooling of C5 to pool x pool cells
    seed: int = 0  # only for weights=none: the random init is reproducible


def _enum(arch: str, weights: str) -> Any:
    from torchvision.models import get_model_weights

    enum = get_model_weights(arch)
    try:
        return enum[weights]
    except KeyError:
        raise UserError(f"torchvision: {arch} has no weights {weights!r} "
                        f"(choose {['DEFAULT', *enum.__members__]}, a .pth file or none)") from None


def _is_path(weights: str) -> bool:
    return weights.endswith((".pth", ".pt")) or "/" in weights


def _cache_file(weights_enum: Any) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights_enum.url).name


class TorchvisionGrid(Backbone):
    name = "torchvision"
    Params = Params
    summary = "torchvision ResNet / ResNeXt C5 grid (weight enums; optional pooling), 2048-d"
    source_param = "weights"

    def __init__(self, params: Params, device: torch.device | str = "cpu") -> None:
        super().__init__(params, device)
        from torchvision.models import get_model

        if params.arch not in ARCHS:
            raise UserError(f"torchvision: arch {params.arch!r} is not one of {ARCHS}")
        if params.image_size < C5_STRIDE or params.pool < 0:
            raise UserError(f"torchvision: image_size must be >= {C5_STRIDE} and pool >= 0")
        torch.manual_seed(params.seed)
        model = get_model(params.arch, weights=None)
        if params.weights.lower() == RANDOM:
            self._sha = "random:" + sha256_of_state_dict(model.state_dict())
        else:
            path = Path(params.weights).expanduser() if _is_path(params.weights) else _cache_file(_enum(params.arch, params.weights))
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                model.load_state_dict(state, strict=True)
            except Exception as err:
                raise UserError(f"torchvision: {path}: not {params.arch} weights ({str(err).splitlines()[0]})") from None
            self._sha = sha256_of_file(path)
        model.fc = torch.nn.Identity()  # the classifier is not used
        self.trunk = torch.nn.Sequential(*(getattr(model, n) for n in
                                           ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")))
        self.trunk.eval().to(self.device, memory_format=torch.channels_last)  # faster convs (oneDNN, cuDNN)
        self.feature_dim = _c5_channels(model)

    @classmethod
    def missing(cls, params: Params) -> Missing | None:
        if params.weights.lower() == RANDOM:
            return None
        if _is_path(params.weights):
            if not Path(params.weights).expanduser().is_file():
                return Missing(f"the weights file {params.weights} does not exist",
                               f"vqa-align extract --download --backbone torchvision --param arch={params.arch}")
            return None
        try:
            cached = _cache_file(_enum(params.arch, params.weights))
        except UserError as err:
            return Missing(str(err), "use a weight name torchvision knows")
        if not cached.is_file():
            return Missing(f"the torchvision weights {params.arch}.{params.weights} are not on this machine ({cached})",
                           f"vqa-align extract --download --backbone torchvision --param arch={params.arch} "
                           f"--param weights={params.weights}")
        return None

    @classmethod
    def download(cls, params: Params, dest: Path | None) -> Path | None:
        weights = _enum(params.arch, params.weights)
        weights.get_state_dict(progress=True)  # torch.hub cache, where missing() looks
        return _cache_file(weights)

    def preprocessor(self) -> Callable[[Any], Any]:
        return ResizeNormalize(self.params.image_size, IMAGENET_MEAN, IMAGENET_STD, Image.BILINEAR)

    @torch.inference_mode()
    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> C5 (B, C, S/32, S/32), or (B, C, pool, pool) when pooled."""
        dtype = self.autocast_dtype()
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            c5 = self.trunk(x.to(self.device).contiguous(memory_format=torch.channels_last))
        if self.params.pool:
            c5 = F.adaptive_avg_pool2d(c5.float(), self.params.pool)
        return c5

    def extract(self, inputs: list[torch.Tensor], sizes: list[tuple[int, int]]) -> list[ImageRegions]:
        return grid_regions(self.feature_map(torch.stack(inputs)), sizes)

    @property
    def info(self) -> ExtractorInfo:
        p = self.params
        params: dict[str, Any] = {"arch": p.arch, "image_size": p.image_size, "pool": p.pool}
        if p.weights.lower() == RANDOM:
            params["seed"] = p.seed
        return ExtractorInfo(self.name, params, self._sha, self.feature_dim, p.weights)


def _c5_channels(model: torch.nn.Module) -> int:
    """Output channels of layer4 (2048 for bottleneck ResNets, 512 for resnet18/34)."""
    last = model.layer4[-1]
    conv = getattr(last, "conv3", None) or last.conv2
    return int(conv.out_channels)


BACKBONE = TorchvisionGrid
