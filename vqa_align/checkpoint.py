"""Checkpoints: self-contained folders written atomically.

A checkpoint folder holds everything needed to answer questions with the model::

    model.safetensors     weights
    config.yaml           the resolved run config (model.vocab_size / num_answers filled in)
    answers.json          the answer vocabulary, index -> answer string
    tokenizer/            the question tokenizer (Hugging Face ``save_pretrained`` format)
    trainer_state.pt      optimizer, scheduler, RNG states, data position (training only)
    meta.json             epoch, global step, metrics at save time

A run folder (``runs/NAME``) holds ``checkpoints/last`` and ``checkpoints/best``; functions that take
a checkpoint accept either the run folder (meaning its ``last``) or a checkpoint folder. Writes go to a temporary sibling
folder that is renamed into place, so a kill at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vqa_align.config import Config, ConfigError, config_from_dict, save_config
from vqa_align.errors import UserError

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
ANSWERS_FILE = "answers.json"
TOKENIZER_DIR = "tokenizer"
TRAINER_STATE_FILE = "trainer_state.pt"
META_FILE = "meta.json"


class CheckpointError(UserError, ValueError):
    """A checkpoint is missing, incomplete, corrupt or does not match its config."""


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint folder or a run folder (-> its ``checkpoints/last``, else ``best``).

    ``last`` comes first: ``best`` is chosen on the validation split, so scoring it on that same
    split would flatter the model (easy-VQA's val split is its test set).
    """
    path = Path(path)
    if (path / WEIGHTS_FILE).is_file():
        return path
    for candidate in (path / "checkpoints" / "last", path / "checkpoints" / "best"):
        if (candidate / WEIGHTS_FILE).is_file():
            return candidate
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    raise CheckpointError(f"{path}: not a checkpoint (no {WEIGHTS_FILE}) nor a run folder with checkpoints/")


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final``, replacing an existing folder with at most a moment of overlap."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def save_checkpoint(
    directory: str | Path,
    model: torch.nn.Module,
    config: Config,
    answers: list[str],
    tokenizer: Any,
    trainer_state: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder atomically; returns its path."""
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / WEIGHTS_FILE))
    save_config(config, tmp / CONFIG_FILE)
    (tmp / ANSWERS_FILE).write_text(json.dumps(answers))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
    if trainer_state is not None:
        torch.save(trainer_state, tmp / TRAINER_STATE_FILE)
    (tmp / META_FILE).write_text(json.dumps(meta or {}, indent=2))
    _replace_dir(tmp, final)
    return final


@dataclass
class LoadedCheckpoint:
    path: Path
    config: Config
    model: torch.nn.Module
    answers: list[str]
    tokenizer: Any
    meta: dict[str, Any]


def load_config_of(path: str | Path) -> Config:
    ckpt = resolve_checkpoint(path)
    import yaml

    try:
        data = yaml.safe_load((ckpt / CONFIG_FILE).read_text())
        return config_from_dict(data)
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt}: missing {CONFIG_FILE}") from None
    except (yaml.YAMLError, ConfigError) as err:
        raise CheckpointError(f"{ckpt / CONFIG_FILE}: {err}") from None


def load_tokenizer(path: str | Path) -> Any:
    """The question tokenizer saved in checkpoint folder ``path``."""
    from vqa_align.vqa_data import load_tokenizer as load_saved_tokenizer

    directory = Path(path) / TOKENIZER_DIR
    if not directory.is_dir():
        raise CheckpointError(f"{path}: missing {TOKENIZER_DIR}/")
    return load_saved_tokenizer(directory)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Load model (eval mode), config, answers and tokenizer; errors name the file and problem."""
    from vqa_align.model import MCAN

    ckpt = resolve_checkpoint(path)
    config = load_config_of(ckpt)
    try:
        answers = json.loads((ckpt / ANSWERS_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{ckpt / ANSWERS_FILE}: {err}") from None
    if len(answers) != config.model.num_answers:
        raise CheckpointError(
            f"{ckpt}: {ANSWERS_FILE} has {len(answers)} answers but config says model.num_answers={config.model.num_answers}"
        )
    try:
        state = load_file(str(ckpt / WEIGHTS_FILE), device=str(device))
    except Exception as err:  # safetensors raises its own error types for truncated/corrupt files
        raise CheckpointError(f"{ckpt / WEIGHTS_FILE}: cannot read weights ({err})") from None
    model = MCAN(config.model)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise CheckpointError(f"{ckpt / WEIGHTS_FILE} does not match its config: {err}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt / WEIGHTS_FILE} does not match its config: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    model.to(device).eval()
    meta = {}
    if (ckpt / META_FILE).is_file():
        meta = json.loads((ckpt / META_FILE).read_text())
    return LoadedCheckpoint(ckpt, config, model, answers, load_tokenizer(ckpt), meta)
