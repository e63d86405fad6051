"""Checkpoints: self-contained folders written atomically.

A checkpoint folder holds everything needed to answer questions with the model::

    model.safetensors     weights
    config.yaml           the resolved run config (model.vocab_size / num_answers filled in)
    answers.json          the answer vocabulary, index -> answer string
    tokenizer/            the question tokenizer (Hugging Face ``save_pretrained`` format)
    trainer_state.pt      optimizer, scheduler, RNG states, data position (training only); tensors
                          and plain containers only, read with ``torch.load(weights_only=True)``
    meta.json             epoch, global step, metrics at save time
    .complete             written last: the folder is whole

A run folder (``runs/NAME``) holds ``checkpoints/last`` and ``checkpoints/best``; functions that take
a checkpoint accept either the run folder (meaning its ``last``) or a checkpoint folder. Writes go to a temporary sibling
folder that is renamed into place, so a kill at any moment leaves the previous checkpoint intact.
The swap is two renames (``last`` -> ``last.old``, ``last.tmp`` -> ``last``); a kill between them
leaves no ``last``, and :func:`recover_checkpoint` puts the complete one back on the next start.

The weights file records fingerprints of the answer list and the tokenizer vocabulary it was
trained with, so weights of one run paired with another run's vocabulary are refused on loading.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vqa_align.config import Config, ConfigError, config_from_dict, save_config
from vqa_align.errors import UserError
from vqa_align.untrusted_files import MAX_CONFIG_BYTES, MAX_META_BYTES, MAX_VOCAB_BYTES, check_file_size, read_json, read_yaml

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
ANSWERS_FILE = "answers.json"
TOKENIZER_DIR = "tokenizer"
TRAINER_STATE_FILE = "trainer_state.pt"
META_FILE = "meta.json"
COMPLETE_FILE = ".complete"  # written last into a checkpoint folder: every other file is whole


class CheckpointError(UserError, ValueError):
    """A checkpoint is missing, incomplete, corrupt or does not match its config."""


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def recover_checkpoint(final: str | Path) -> Path | None:
    """``final`` if it exists; else put back the complete checkpoint a kill left mid-swap.

    A kill between the two renames of :func:`_replace_dir` leaves ``NAME.old`` (the previous
    checkpoint) and ``NAME.tmp`` (the new one, complete if it holds :data:`COMPLETE_FILE`) but no
    ``NAME``. The new one wins when complete, else the previous one. Where the folder cannot be
    renamed (read-only), the complete one is returned where it lies. None when there is nothing.
    """
    final = Path(final)
    if final.is_dir():
        return final
    tmp, old = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")
    if (tmp / COMPLETE_FILE).is_file() and (tmp / WEIGHTS_FILE).is_file():
        found, which = tmp, "the new checkpoint, written completely"
    elif (old / WEIGHTS_FILE).is_file() and (old / CONFIG_FILE).is_file():
        found, which = old, "the previous checkpoint (the new one was incomplete)"
    else:
        return None
    try:
        os.replace(found, final)
    except OSError as err:
        _say(f"note: {final} is missing (a run was stopped while swapping checkpoints); using {found}, "
             f"{which}, in place because it cannot be renamed ({err.strerror})")
        return found
    _say(f"note: {final} was missing (a run was stopped while swapping checkpoints); "
         f"recovered it from {found.name}, {which}")
    return final


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint folder or a run folder (-> its ``checkpoints/last``, else ``best``).

    ``last`` comes first: ``best`` is chosen on the validation split, so scoring it on that same
    split would flatter the model (easy-VQA's val split is its test set). A ``last`` that a kill
    left mid-swap is recovered first; falling back to ``best`` is said on stderr, never silent.
    """
    path = Path(path)
    if (path / WEIGHTS_FILE).is_file():
        return path
    if not path.exists() and path.name and recover_checkpoint(path) is not None:  # .../checkpoints/last
        return resolve_checkpoint(recover_checkpoint(path))
    last = recover_checkpoint(path / "checkpoints" / "last")
    if last is not None and (last / WEIGHTS_FILE).is_file():
        return last
    best = recover_checkpoint(path / "checkpoints" / "best")
    if best is not None and (best / WEIGHTS_FILE).is_file():
        _say(f"note: {path} has no checkpoints/last; using checkpoints/best (selected on the validation split)")
        return best
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
    """Write a checkpoint folder atomically; returns its path.

    A write that fails (a full disk, a quota) removes the partial ``NAME.tmp`` and raises a
    CheckpointError saying that the checkpoints already on disk are intact: nothing of them is
    touched before the new folder is complete.
    """
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        _write_checkpoint_files(tmp, model, config, answers, tokenizer, trainer_state, meta)
    except (OSError, RuntimeError, SafetensorError) as err:  # torch.save reports a failed write as RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)  # give the space back
        reason = getattr(err, "strerror", None) or (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{final}: cannot save the checkpoint ({reason}); the checkpoints already on disk "
                              f"are intact (the previous {final.name}, if any, is unchanged)") from None
    _replace_dir(tmp, final)
    return final


def _write_checkpoint_files(tmp: Path, model: torch.nn.Module, config: Config, answers: list[str], tokenizer: Any,
                            trainer_state: dict[str, Any] | None, meta: dict[str, Any] | None) -> None:
    """Every file of a checkpoint into the folder ``tmp``, synced, then its completion marker."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_weights(state, tmp / WEIGHTS_FILE, vocabulary_fingerprints(answers, tokenizer))
    save_config(config, tmp / CONFIG_FILE)
    (tmp / ANSWERS_FILE).write_text(json.dumps(answers))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
    if trainer_state is not None:
        save_trainer_state(trainer_state, tmp / TRAINER_STATE_FILE)
    (tmp / META_FILE).write_text(json.dumps(meta or {}, indent=2))
    _sync_files(tmp)  # the data reach the disk before the marker and the rename say "complete"
    (tmp / COMPLETE_FILE).write_text("")


SAFETENSORS_LENGTH = struct.Struct("<Q")  # a safetensors file starts with its JSON header's byte length


def save_weights(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """A safetensors file whose bytes depend only on ``state`` and ``metadata``, so that two runs
    that trained the same weights can be compared by hash. The library orders the tensors stably
    (by dtype, then name) but writes the metadata map in a hash order that differs from call to
    call; the header is rewritten with sorted metadata keys (same JSON, same length)."""
    save_file(state, str(path), metadata=metadata)
    with open(path, "r+b") as handle:
        (length,) = SAFETENSORS_LENGTH.unpack(handle.read(SAFETENSORS_LENGTH.size))
        header = json.loads(handle.read(length))
        ordered = {"__metadata__": dict(sorted(header.pop("__metadata__", {}).items())), **header}
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > length:  # never seen: the library writes the same compact JSON
            raise CheckpointError(f"{path}: cannot order the safetensors header (it would grow)")
        handle.seek(SAFETENSORS_LENGTH.size)
        handle.write(text + b" " * (length - len(text)))  # the format pads its header with spaces


def _sync_files(folder: Path) -> None:
    for file in folder.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())


# ----------------------------------------------------------------------------------------------
# Trainer state: tensors and plain containers only, so that loading it never runs code
# ----------------------------------------------------------------------------------------------

# What torch.load(weights_only=True) accepts: tensors, str/int/float/bool/None, lists, tuples, dicts.
_PLAIN = (str, int, float, bool, type(None))


def _check_plain(value: Any, where: str) -> None:
    """Raise TypeError naming the first entry that weights_only loading would refuse."""
    if isinstance(value, (torch.Tensor, *_PLAIN)):
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, _PLAIN):
                raise TypeError(f"{where}: key {key!r} is a {type(key).__name__}")
            _check_plain(item, f"{where}.{key}")
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
        return
    raise TypeError(f"{where} is a {type(value).__name__}, not a tensor or plain container")


def save_trainer_state(state: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` after checking that :func:`load_trainer_state` will be able to read it back."""
    _check_plain(state, "trainer_state")
    torch.save(state, path)


def load_trainer_state(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a trainer state with ``weights_only=True``: a file holding anything but tensors and
    plain containers (a pickle that could run code) is refused, never unpickled."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (this checkpoint cannot be resumed)")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refused: it holds {_refused_item(str(err))}, not only tensors and plain containers, and "
            f"loading that could run code (written by another program or an older vqa-align?)"
        ) from None
    except Exception as err:  # truncated or not a torch file: zipfile / EOF / RuntimeError
        raise CheckpointError(f"{path}: cannot be read ({type(err).__name__}: {err}); the file is damaged or truncated") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a vqa-align trainer state (a {type(state).__name__}, expected a dict)")
    return state


def _refused_item(message: str) -> str:
    """What ``torch.load(weights_only=True)`` refused, from its error (which otherwise advises
    loading with weights_only=False, which is exactly what must not be done with an unknown file)."""
    found = re.search(r"GLOBAL ([\w.]+)", message)
    if found:
        return f"the Python global {found.group(1)}"
    found = re.search(r"WeightsUnpickler error: ([^\n]*?)(?:\.\s|\.?$)", message, re.MULTILINE)
    if found:
        return f"a pickled object it cannot read safely ({found.group(1).strip()})"
    return "a pickled Python object"


# ----------------------------------------------------------------------------------------------
# Vocabulary fingerprints: the weights know which answers and tokens they were trained with
# ----------------------------------------------------------------------------------------------


def _digest(items: list[str]) -> str:
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()


def vocabulary_fingerprints(answers: list[str], tokenizer: Any) -> dict[str, str]:
    """safetensors metadata (str -> str): sizes and SHA-256 of the answer list and token vocabulary."""
    meta = {"num_answers": str(len(answers)), "answers_sha256": _digest(list(answers))}
    if tokenizer is not None:
        vocab = tokenizer.get_vocab()
        meta.update(vocab_size=str(len(vocab)), vocab_sha256=_digest(sorted(vocab, key=vocab.__getitem__)))
    return meta


def check_vocabularies(ckpt: Path, weights_meta: dict[str, str] | None, answers: list[str], tokenizer: Any) -> None:
    """Refuse weights paired with another run's answers or tokenizer, naming both sizes."""
    if not weights_meta:
        return  # written before fingerprints existed: the shape checks still apply
    here = vocabulary_fingerprints(answers, tokenizer)
    pairs = [("num_answers", "answers_sha256", f"{ANSWERS_FILE}", "answers"),
             ("vocab_size", "vocab_sha256", f"{TOKENIZER_DIR}/", "tokens")]
    for size_key, hash_key, where, unit in pairs:
        if hash_key in weights_meta and hash_key in here and weights_meta[hash_key] != here[hash_key]:
            raise CheckpointError(
                f"{ckpt / WEIGHTS_FILE} was trained with a vocabulary of {weights_meta.get(size_key, '?')} {unit} "
                f"but {ckpt / where} has a different one of {here[size_key]} {unit}: the weights and the "
                f"vocabulary come from different runs"
            )


@dataclass
class LoadedCheckpoint:
    path: Path
    config: Config
    model: torch.nn.Module
    answers: list[str]
    tokenizer: Any
    meta: dict[str, Any]


def checkpoint_extractor(path: str | Path) -> Any:
    """The ExtractorInfo a checkpoint's training features came from (its meta.json), or None.

    None for checkpoints trained on converted public features or before extractors were recorded.
    """
    from vqa_align.extract.backbones.base import ExtractorInfo

    meta_path = resolve_checkpoint(path) / META_FILE
    if not meta_path.is_file():
        return None
    raw = read_json(meta_path, MAX_META_BYTES, expect=dict, error=CheckpointError).get("extractor")
    return ExtractorInfo.from_json(json.dumps(raw), f"{meta_path}: 'extractor'") if raw else None


def load_config_of(path: str | Path) -> Config:
    ckpt = resolve_checkpoint(path)
    if not (ckpt / CONFIG_FILE).is_file():
        raise CheckpointError(f"{ckpt}: missing {CONFIG_FILE}")
    data = read_yaml(ckpt / CONFIG_FILE, MAX_CONFIG_BYTES, expect=dict, error=CheckpointError)
    if not data:  # a checkpoint's config is the whole resolved config, never empty
        raise CheckpointError(f"{ckpt / CONFIG_FILE}: empty; a checkpoint's config holds the whole resolved config")
    try:
        return config_from_dict(data)
    except ConfigError as err:
        raise CheckpointError(f"{ckpt / CONFIG_FILE}: {' '.join(str(err).split())}") from None


def load_tokenizer(path: str | Path) -> Any:
    """The question tokenizer saved in checkpoint folder ``path``."""
    from vqa_align.data.vqa_v2 import load_tokenizer as load_saved_tokenizer

    directory = Path(path) / TOKENIZER_DIR
    if not directory.is_dir():
        raise CheckpointError(f"{path}: missing {TOKENIZER_DIR}/")
    for file in directory.iterdir():  # transformers parses these itself: bound their size first
        check_file_size(file, MAX_VOCAB_BYTES, error=CheckpointError)
    try:
        return load_saved_tokenizer(directory)
    except Exception as err:  # transformers/tokenizers raise assorted types for a damaged tokenizer.json
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{directory}: cannot load the tokenizer ({first})") from None


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Load model (eval mode), config, answers and tokenizer; errors name the file and problem."""
    from vqa_align.model.mcan import MCAN

    ckpt = resolve_checkpoint(path)
    config = load_config_of(ckpt)
    try:
        answers = read_json(ckpt / ANSWERS_FILE, MAX_VOCAB_BYTES, expect=list, error=CheckpointError)
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt / ANSWERS_FILE}: missing") from None
    if not all(isinstance(a, str) for a in answers):
        raise CheckpointError(f"{ckpt / ANSWERS_FILE}: expected a JSON list of answer strings")
    if len(answers) != config.model.num_answers:
        raise CheckpointError(
            f"{ckpt}: {ANSWERS_FILE} has {len(answers)} answers but config says model.num_answers={config.model.num_answers}"
        )
    state, weights_meta = read_weights(ckpt / WEIGHTS_FILE, device)
    tokenizer = load_tokenizer(ckpt)
    check_vocabularies(ckpt, weights_meta, answers, tokenizer)
    check_weight_sizes(ckpt, state, len(answers), len(tokenizer))
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
        meta = read_json(ckpt / META_FILE, MAX_META_BYTES, expect=dict, error=CheckpointError)
    return LoadedCheckpoint(ckpt, config, model, answers, tokenizer, meta)


def read_weights(path: Path, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, safetensors metadata) of a weights file; a damaged file is a one-line error."""
    from safetensors import safe_open

    try:
        state = load_file(str(path), device=str(device))
        with safe_open(str(path), "pt") as handle:
            meta = handle.metadata() or {}
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except Exception as err:  # safetensors raises its own error types for truncated/corrupt files
        raise CheckpointError(f"{path}: cannot read weights ({err}); the file is damaged or truncated") from None
    return state, meta


# Rows of these tensors are one per answer / one per token of the vocabulary.
ANSWER_ROWS_SUFFIX = "weight"
VOCAB_ROWS_KEY = "question_encoder.embedding.weight"  # the LSTM encoder's word embedding


def check_weight_sizes(ckpt: Path, state: dict[str, torch.Tensor], num_answers: int, vocab_size: int) -> None:
    """The classifier's output rows must equal the answers, the word embedding's rows the tokens."""
    classifier = sorted((k for k in state if k.startswith("classifier.") and k.endswith(ANSWER_ROWS_SUFFIX)),
                        key=lambda k: [int(p) if p.isdigit() else -1 for p in k.split(".")])
    if classifier and state[classifier[-1]].shape[0] != num_answers:
        raise CheckpointError(
            f"{ckpt / WEIGHTS_FILE} has {state[classifier[-1]].shape[0]} answer outputs but {ckpt / ANSWERS_FILE} "
            f"has {num_answers} answers: the weights and the vocabulary come from different runs"
        )
    if VOCAB_ROWS_KEY in state and state[VOCAB_ROWS_KEY].shape[0] != vocab_size:
        raise CheckpointError(
            f"{ckpt / WEIGHTS_FILE} has a {state[VOCAB_ROWS_KEY].shape[0]}-token word embedding but "
            f"{ckpt / TOKENIZER_DIR}/ has {vocab_size} tokens: the weights and the vocabulary come from different runs"
        )
