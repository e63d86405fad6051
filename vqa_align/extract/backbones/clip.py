"""``clip``: CLIP image-encoder grid features (the ViT's patch tokens) through ``transformers``.

CLIP-ViL (Shen et al., ICLR 2022) feeds CLIP grid features to MCAN and reports higher VQA v2
accuracy than with bottom-up region features. Here every patch token of the vision tower's last
layer is one region; its box is the patch's cell of the original picture. The class token is left
out (it is a summary, not a place).

Weights: ``--param model=`` a Hugging Face hub id (default ``openai/clip-vit-base-patch32``; fetch
once with ``vqa-align extract --download --backbone clip``) or a local folder written by
``save_pretrained`` (``config.json`` + weights). Nothing is downloaded while extracting.

Input: the picture resized to ``image_size`` x ``image_size`` (bicubic; aspect ratio not kept, so
the grid covers the whole picture) and normalised with CLIP's mean / std.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image

from vqa_align.errors import UserError
from vqa_align.untrusted_files import MAX_META_BYTES, check_file_size
from vqa_align.extract.backbones.base import (
    Backbone, ExtractorInfo, ImageRegions, Missing, ResizeNormalize, grid_regions, sha256_of_state_dict,
)

DEFAULT_MODEL = "openai/clip-vit-base-patch32"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's published pixel statistics
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class Params:
    model: str = DEFAULT_MODEL  # hub id or local folder (save_pretrained layout)
    image_size: int = 0  # 0: the model's own resolution; otherwise position embeddings are interpolated


def _is_local(model: str) -> bool:
    return Path(model).expanduser().is_dir() or model.startswith((".", "/", "~"))


def _check_local_folder(folder: Path) -> None:
    """Refuse a save_pretrained folder whose weights are pickles only, or whose config is oversized."""
    check_file_size(folder / "config.json", MAX_META_BYTES, error=UserError)
    if not any(folder.glob("*.safetensors")):
        pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
        held = f" (it holds {', '.join(pickles[:3])}: pickles, which could run code when loaded)" if pickles else ""
        raise UserError(f"clip: {folder} has no .safetensors weights{held}; vqa-align reads CLIP weights as "
                        "safetensors only: re-save them with save_pretrained(..., safe_serialization=True)")


class ClipGrid(Backbone):
    name = "clip"
    Params = Params
    summary = "CLIP vision tower patch tokens as a grid (transformers; hub id or local folder)"
    source_param = "model"

    def __init__(self, params: Params, device: torch.device | str = "cpu") -> None:
        super().__init__(params, device)
        from transformers import CLIPVisionModel

        where = str(Path(params.model).expanduser()) if _is_local(params.model) else params.model
        if _is_local(params.model):
            _check_local_folder(Path(where))
        try:
            # safetensors only: a pickled pytorch_model.bin could run code when loaded
            model = CLIPVisionModel.from_pretrained(where, local_files_only=True, use_safetensors=True)
        except Exception as err:  # noqa: BLE001 - transformers/safetensors raise many types for a damaged folder
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise UserError(f"clip: cannot load {params.model} ({first[:300]})") from None
        self.model = model.eval().to(self.device)
        cfg = model.config
        self.image_size = params.image_size or cfg.image_size
        if self.image_size % cfg.patch_size:
            raise UserError(f"clip: image_size {self.image_size} is not a multiple of the patch size {cfg.patch_size}")
        self.grid = self.image_size // cfg.patch_size
        self.feature_dim = cfg.hidden_size
        self._sha = sha256_of_state_dict(model.state_dict())

    @classmethod
    def missing(cls, params: Params) -> Missing | None:
        fix = f"vqa-align extract --download --backbone clip --param model={params.model}"
        if _is_local(params.model):
            folder = Path(params.model).expanduser()
            if not (folder / "config.json").is_file():
                return Missing(f"the CLIP folder {folder} has no config.json", fix + " --weights-dir " + str(folder))
            return None
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return Missing("huggingface_hub is not installed", "pip install huggingface_hub")
        if not isinstance(try_to_load_from_cache(params.model, "config.json"), str):
            return Missing(f"the CLIP weights {params.model} are not on this machine", fix)
        return None

    @classmethod
    def download(cls, params: Params, dest: Path | None) -> Path | None:
        from huggingface_hub import snapshot_download

        patterns = ["config.json", "*.safetensors", "preprocessor_config.json"]
        path = snapshot_download(params.model, allow_patterns=patterns, local_dir=str(dest) if dest else None)
        return Path(path)

    def preprocessor(self) -> Callable[[Any], Any]:
        return ResizeNormalize(self.image_size, CLIP_MEAN, CLIP_STD, Image.BICUBIC)

    @torch.inference_mode()
    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, hidden, S/patch, S/patch): last-layer patch tokens laid out as a map."""
        dtype = self.autocast_dtype()
        interpolate = self.image_size != self.model.config.image_size
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            out = self.model(pixel_values=x.to(self.device), interpolate_pos_encoding=interpolate)
        tokens = out.last_hidden_state[:, 1:]  # (B, g*g, hidden): drop the class token
        b, n, d = tokens.shape
        return tokens.transpose(1, 2).reshape(b, d, self.grid, self.grid)

    def extract(self, inputs: list[torch.Tensor], sizes: list[tuple[int, int]]) -> list[ImageRegions]:
        return grid_regions(self.feature_map(torch.stack(inputs)), sizes)

    @property
    def info(self) -> ExtractorInfo:
        params = {"image_size": self.image_size}  # the model (hub id / folder) is the weights' source
        return ExtractorInfo(self.name, params, self._sha, self.feature_dim, self.params.model)


BACKBONE = ClipGrid
