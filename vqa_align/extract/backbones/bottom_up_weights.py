"""Files of the bottom-up-attention detector: its weights, its two vocabularies, where they live and
how ``vqa-align extract --download --backbone bottom-up`` fetches them.

Weights: the public conversion ``unc-nlp/frcnn-vg-finetuned`` (the one the Hugging Face LXMERT demo
loads), read as tensors only (safetensors, or ``torch.load(weights_only=True)``); ``bottom_up.py``
loads them strictly under their own parameter names. Only :func:`download_bottom_up` touches the
network.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vqa_align.errors import DataFormatError, InputFileNotFoundError
from vqa_align.paths import cache_root
from vqa_align.untrusted_files import MAX_VOCAB_BYTES, read_text

HUB_REPO = "unc-nlp/frcnn-vg-finetuned"
HUB_WEIGHTS = "pytorch_model.bin"
WEIGHT_FILES = ("model.safetensors", HUB_WEIGHTS)  # looked for, in this order, in a weights folder
WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors")  # a path with another ending is a folder
OBJECTS_VOCAB, ATTRIBUTES_VOCAB = "objects_vocab.txt", "attributes_vocab.txt"
# The vocabularies of bottom-up attention's 1600-400-20 Visual Genome split, as published with the
# detectron2 port whose weights this conversion is (only fetched by download_bottom_up()).
_VOCAB_BASE = "https://raw.githubusercontent.com/airsplay/py-bottom-up-attention/master/demo/data/genome/1600-400-20/"
VOCAB_URLS = {OBJECTS_VOCAB: _VOCAB_BASE + OBJECTS_VOCAB, ATTRIBUTES_VOCAB: _VOCAB_BASE + ATTRIBUTES_VOCAB}


def default_weights_dir() -> Path:
    """Where ``--download bottom-up`` puts the weights and vocabularies unless told otherwise."""
    return cache_root() / "weights" / "bottom-up"


def weights_file(weights: str | None) -> Path:
    """The weights file named by the backbone's ``weights`` parameter: a file, or the first of
    :data:`WEIGHT_FILES` in a folder (default :func:`default_weights_dir`); it may not exist yet."""
    where = Path(weights).expanduser() if weights else default_weights_dir()
    if where.is_dir() or where.suffix not in WEIGHT_SUFFIXES:
        for name in WEIGHT_FILES:
            if (where / name).is_file():
                return where / name
        return where / HUB_WEIGHTS  # absent: the backbone's missing() reports it
    return where


def load_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors or PyTorch file, never executing pickled code."""
    path = Path(path)
    if not path.is_file():
        raise InputFileNotFoundError(f"{path}: bottom-up weights file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - any parse failure is the file's fault
            raise DataFormatError(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataFormatError(f"{path}: refused or unreadable as tensors only (weights_only=True): {first}") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataFormatError(f"{path}: expected a dict of tensors (a state dict)")
    return dict(state)


def matching_state_dict(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """``state`` checked against the detector's own state dict (names and shapes), ready for a
    strict load; a mismatch is one DataFormatError line naming the keys.

    Batch-norm ``num_batches_tracked`` counters may be absent (older checkpoints; PyTorch's own
    loader fills them in the same way): they are training bookkeeping, unused at inference.
    """
    state = dict(state)
    for key in own:
        if key.endswith(".num_batches_tracked") and key not in state:
            state[key] = torch.zeros((), dtype=torch.long)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shape = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or bad_shape):
        return state

    def show(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")

    parts = []
    if missing:
        parts.append(f"missing {len(missing)}: {show(missing)}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)}: {show(unexpected)}")
    if bad_shape:
        k = bad_shape[0]
        parts.append(f"shape of {k}: {tuple(state[k].shape)} != {tuple(own[k].shape)} ({len(bad_shape)} such)")
    raise DataFormatError(f"{source}: not the bottom-up-attention detector's weights: " + "; ".join(parts))


@dataclass
class Vocabulary:
    objects: list[str] = field(default_factory=list)  # index = object class id
    attributes: list[str] = field(default_factory=list)  # index = attribute id


def read_vocabulary(path: str | os.PathLike, expected: int, what: str) -> list[str]:
    """The ``expected`` names of a vocabulary file, one per line (``what``: "object" or "attribute")."""
    path = Path(path)
    if not path.is_file():
        raise InputFileNotFoundError(f"{path}: {what} vocabulary not found")
    # A line may list synonyms separated by commas; the first is the name.
    names = [line.split(",")[0].strip().lower() for line in read_text(path, MAX_VOCAB_BYTES).splitlines() if line.strip()]
    if len(names) != expected:
        raise DataFormatError(f"{path}: {what} vocabulary has {len(names)} names, the detector has {expected}")
    return names


def download_bottom_up(dest: str | os.PathLike) -> dict[str, Path]:  # pragma: no cover - needs internet
    """Fetch the weights (Hugging Face hub) and the vocabularies into ``dest``; returns their paths.

    Only for machines with internet (``vqa-align extract --download bottom-up``); nothing else here
    downloads.
    """
    import urllib.request

    from huggingface_hub import hf_hub_download

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    paths = {"weights": Path(hf_hub_download(HUB_REPO, HUB_WEIGHTS, local_dir=dest))}
    for name, url in VOCAB_URLS.items():
        target = dest / name
        if not target.exists():
            urllib.request.urlretrieve(url, target)
        paths[name.split("_")[0]] = target
    return paths
