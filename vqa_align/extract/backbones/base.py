"""The backbone interface of ``vqa-align extract``: what every image feature extractor provides.

A backbone turns decoded RGB pictures into *regions*: for each image a (K, D) float32 feature
matrix, K boxes in pixels of the original image and, optionally, K readable labels. K may differ
from image to image (a detector keeps 10-100 boxes) or be fixed (a 7 x 7 grid gives K = 49, each
cell's box is its receptive-field cell in the original image).

The work is split in two so that decoding and resizing run in DataLoader worker processes:

* :meth:`Backbone.preprocessor` returns a small picklable callable (no weights) that maps one
  RGB ``PIL.Image`` to whatever the model consumes (usually a (3, H, W) float tensor). It runs in
  the workers.
* :meth:`Backbone.extract` runs in the main process on the backbone's device: it takes the list
  of preprocessed items of one batch and the original (width, height) of each image and returns
  one :class:`ImageRegions` per image. Items are passed as a list, not stacked, so backbones whose
  inputs differ in size (a detector resizing to a shorter side of 600 px) batch them as they like;
  an item may be any picklable object (e.g. a tuple ``(tensor, scale)``).

Sizes: ``sizes[i]`` is the *original* (width, height) of picture i after EXIF rotation. The
picture the preprocessor received may be smaller (pictures above ``--max-side`` are downscaled
while decoding, keeping the aspect ratio), so boxes must be mapped to ``sizes[i]`` from the
model's input size, never from the decoded picture's.

Everything a store must record about the extractor is :class:`ExtractorInfo` (name, parameters,
sha256 of the weights, feature dimension); it is written into the store's ``extractor`` attribute
and copied into every checkpoint trained on that store.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import torch

from vqa_align.errors import DataFormatError, UserError
from vqa_align.untrusted_files import MAX_WIDTH, parse_json

HASH_BLOCK = 1 << 20  # bytes read at a time when hashing weight files
MAX_FEATURE_DIM = MAX_WIDTH  # the widest feature vector a store or checkpoint may declare (= model.feature_dim's bound)


@dataclass
class ImageRegions:
    """Regions of one image. ``labels`` (K readable strings, e.g. "red umbrella") is optional."""

    features: np.ndarray  # (K, D) float32
    boxes: np.ndarray  # (K, 4) float32, x1, y1, x2, y2 in pixels of the original image
    labels: list[str] | None = None  # K strings, or None when the backbone names nothing

    def __post_init__(self) -> None:
        k = len(self.features)
        if self.boxes.shape != (k, 4):
            raise ValueError(f"boxes must have shape ({k}, 4), got {self.boxes.shape}")
        if self.labels is not None and len(self.labels) != k:
            raise ValueError(f"labels must have {k} entries, got {len(self.labels)}")


@dataclass(frozen=True)
class ExtractorInfo:
    """What produced a store's features: compared before training, shown in the app."""

    name: str  # registry name, e.g. "efficientnet-lite0"
    params: dict[str, Any] = field(default_factory=dict)  # the backbone's parameters (JSON-able)
    weights_sha256: str = ""  # "" for weight-free extractors; "random" for random init (tests)
    feature_dim: int = 0
    # where the weights were loaded from (hub name or local path): shown, not compared, since the
    # same weights may sit in different folders on different machines
    weights_source: str = ""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "extractor record") -> "ExtractorInfo":
        """Parse what :meth:`to_json` wrote; a record of wrong types is a one-line error naming ``source``."""
        data = parse_json(text, source, expect=dict)
        name, params, feature_dim = data.get("name"), data.get("params", {}), data.get("feature_dim", 0)
        if not isinstance(name, str) or not isinstance(params, dict):
            raise DataFormatError(f"{source}: not an extractor record (needs a string 'name' and an object 'params')")
        if isinstance(feature_dim, bool) or not isinstance(feature_dim, int) or not 0 <= feature_dim <= MAX_FEATURE_DIM:
            raise DataFormatError(f"{source}: extractor feature_dim must be an integer in [0, {MAX_FEATURE_DIM}], "
                                  f"got {feature_dim!r:.40}")
        return cls(name=name, params=params, weights_sha256=str(data.get("weights_sha256", "")),
                   feature_dim=feature_dim, weights_source=str(data.get("weights_source", "")))

    def key(self) -> tuple[str, str, str]:
        """What must agree for two stores to be usable together (name, parameters, weights)."""
        return self.name, json.dumps(self.params, sort_keys=True), self.weights_sha256

    def describe(self) -> str:
        """One line for messages: ``efficientnet-lite0 (image_size=224; weights 5793442…)``."""
        params = ", ".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        sha = self.weights_sha256[:12] or "none"
        return f"{self.name} ({params or 'default parameters'}; weights sha256 {sha})"


@dataclass(frozen=True)
class Missing:
    """Why a backbone cannot run on this machine, and the one command that fixes it."""

    what: str  # e.g. "the CLIP weights folder /models/clip-vit-b32 does not exist"
    fix: str  # e.g. "vqa-align extract --download clip --param model=openai/clip-vit-base-patch32"

    def message(self) -> str:
        return f"{self.what}. Fix: {self.fix}"


class ResizeNormalize:
    """PIL RGB image -> (3, S, S) float32 for a grid backbone: resized to S x S, pixels divided by
    ``divisor``, then ``(x - mean) / std`` per channel (a scalar mean/std applies to all three).

    Picklable and weight-free: it runs in the DataLoader workers (``Backbone.preprocessor``).
    """

    def __init__(self, size: int, mean: float | tuple[float, ...], std: float | tuple[float, ...],
                 resample: int, divisor: float = 255.0) -> None:
        self.size, self.resample, self.divisor = size, resample, divisor
        self.mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)  # (3 or 1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)

    def __call__(self, image: Any) -> torch.Tensor:
        resized = image.resize((self.size, self.size), self.resample)
        x = torch.from_numpy(np.array(resized, dtype=np.float32)).permute(2, 0, 1) / self.divisor  # (3, S, S)
        return (x - self.mean) / self.std


def sha256_of_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def sha256_of_state_dict(state: dict[str, torch.Tensor]) -> str:
    """Content hash of weights given as tensors (names, shapes, dtypes and bytes, in name order)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous().reshape(-1)  # 1-d: a byte view needs a dimension
        h.update(f"{name}:{tuple(state[name].shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def parse_params(param_cls: type, items: dict[str, Any], backbone: str) -> Any:
    """Fill the backbone's parameter dataclass from ``--param key=value`` strings, typed by its fields."""
    fields = {f.name: f for f in dataclasses.fields(param_cls)}
    values: dict[str, Any] = {}
    for key, raw in items.items():
        if key not in fields:
            raise UserError(f"backbone {backbone}: unknown parameter {key!r} (known: {sorted(fields)})")
        default = getattr(param_cls(), key)
        values[key] = _convert(raw, default, f"backbone {backbone}: parameter {key}")
    return param_cls(**values)


def _convert(raw: Any, default: Any, where: str) -> Any:
    if not isinstance(raw, str) or isinstance(default, str):
        return raw
    if raw.lower() in ("none", "null", ""):
        return None
    try:
        if isinstance(default, bool):
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1", "yes")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError:
        raise UserError(f"{where}: {raw!r} is not a {type(default).__name__}") from None
    return raw


class Backbone(ABC):
    """One feature extractor. Subclasses set ``name``, ``Params`` and implement the abstract methods.

    Construction loads the weights onto ``device`` (no download, ever: :meth:`download` is the only
    method that may touch the network, and only when the user asks for it).
    """

    name: ClassVar[str]
    Params: ClassVar[type]  # a dataclass of JSON-able parameters with defaults
    #: one line for ``vqa-align extract --list`` and docs
    summary: ClassVar[str] = ""
    #: the parameter that says *where* the weights are (a path, a hub id): recorded as
    #: ``ExtractorInfo.weights_source`` rather than in ``params``, since the sha256 identifies them
    source_param: ClassVar[str | None] = None

    def __init__(self, params: Any, device: torch.device | str = "cpu") -> None:
        self.params = params
        self.device = torch.device(device)

    # --- what runs where ---------------------------------------------------------------------
    @abstractmethod
    def preprocessor(self) -> Callable[[Any], Any]:
        """A picklable ``PIL.Image (RGB) -> model input`` callable, run in DataLoader workers."""

    @abstractmethod
    def extract(self, inputs: list[Any], sizes: list[tuple[int, int]]) -> list[ImageRegions]:
        """Regions of a batch: ``inputs`` from :meth:`preprocessor`, ``sizes`` the original (w, h)."""

    @property
    @abstractmethod
    def info(self) -> ExtractorInfo:
        """Name, parameters, weights hash and feature dimension (written into the store)."""

    # --- availability and weights ------------------------------------------------------------
    @classmethod
    def missing(cls, params: Any) -> Missing | None:
        """What prevents building this backbone here (weights, packages), or None when it can run.

        Must be cheap and must not download: the app calls it for every checkpoint it shows.
        """
        return None

    @classmethod
    def download(cls, params: Any, dest: Path | None) -> Path | None:
        """Fetch the weights (needs internet) so that later runs work offline; returns their location.

        The hook of ``vqa-align extract --download NAME``. Backbones whose weights come with a
        Python package need nothing and keep this default.
        """
        print(f"{cls.name}: nothing to download (its weights come with an installed package)")
        return None

    def autocast_dtype(self) -> torch.dtype | None:
        """Mixed precision used on CUDA (None: run in fp32). bf16 is safe for conv/ViT features."""
        return torch.bfloat16 if self.device.type == "cuda" else None


def grid_boxes(width: int, height: int, rows: int, cols: int) -> np.ndarray:
    """Boxes (rows * cols, 4) float32 of a rows x cols grid over a (width, height) image, row-major.

    Grid features are laid out so that cell (r, c) of the model's map covers this box of the
    *original* picture (the resize to the model's input maps the whole image onto the whole map).
    """
    xs = np.linspace(0.0, width, cols + 1, dtype=np.float64)
    ys = np.linspace(0.0, height, rows + 1, dtype=np.float64)
    x1, y1 = np.meshgrid(xs[:-1], ys[:-1])  # (rows, cols)
    x2, y2 = np.meshgrid(xs[1:], ys[1:])
    return np.stack([x1, y1, x2, y2], axis=-1).reshape(-1, 4).astype(np.float32)


def grid_regions(fmap: torch.Tensor, sizes: list[tuple[int, int]]) -> list[ImageRegions]:
    """A batch of feature maps (B, D, h, w) -> per image (h * w, D) features with their cell boxes."""
    b, d, h, w = fmap.shape
    feats = fmap.float().permute(0, 2, 3, 1).reshape(b, h * w, d).cpu().numpy()  # (B, h*w, D) row-major cells
    return [ImageRegions(features=feats[i], boxes=grid_boxes(sizes[i][0], sizes[i][1], h, w)) for i in range(b)]
