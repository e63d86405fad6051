"""Run folders: what vqa-align may delete, replacing a run safely, and what may change on resume.

Every run folder vqa-align creates holds a marker file (:data:`RUN_MARKER`). ``--overwrite``
replaces only a folder that has the marker and whose every file and folder, at any depth, is one
that vqa-align writes there (:data:`RUN_FILES`); anything else is refused with a message naming
the first foreign path, never deleted.

Replacing is done without a moment where neither run exists in full: the new run trains in a
sibling folder ``NAME.new`` and is swapped in only once it has its first checkpoint; until then the
old run is untouched, so a bad data path or a crash in the first epoch costs nothing. The swap is
two renames (``NAME`` -> ``NAME.old``, ``NAME.new`` -> ``NAME``); a kill between them is repaired by
:func:`recover_run_swap` on the next start.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from vqa_align.errors import UserError

RUN_MARKER = ".vqa-align-run"
# Checkpoint folders (runs/checkpoint.py): best and last, and the siblings of their atomic swap.
_CHECKPOINTS = ("best", "last", "best.tmp", "last.tmp", "best.old", "last.old")
_CHECKPOINT_FILES = ("model.safetensors", "config.yaml", "answers.json", "trainer_state.pt", "meta.json", ".complete")
_TOKENIZER_FILES = ("*.json", "*.txt", "*.model")  # Hugging Face save_pretrained (word-level, WordPiece, SentencePiece)
# Every file vqa-align writes into a run folder, as path components (fnmatch patterns, one per
# level): training (config, metrics, curves, tensorboard, checkpoints), `vqa-align eval --out
# RUN/eval`, the experiment's done.json (via a .tmp), the sentence runner's result.json, import,
# and the model card README.md. A folder is ours when it is a prefix of one of these.
RUN_FILES: tuple[tuple[str, ...], ...] = (
    (RUN_MARKER,), ("config.yaml",), ("metrics.jsonl",), ("curves.png",), ("curves.tmp.png",),
    ("done.json",), ("done.json.tmp",), ("result.json",), ("README.md",), ("README.md.tmp",),
    ("tensorboard", "events.out.tfevents.*"),
    ("eval", "metrics.json"), ("eval", "reliability.png"), ("eval", "evaluations.json"),
    ("eval", "evaluations.json.tmp"),
    *(("checkpoints", c, f) for c in _CHECKPOINTS for f in _CHECKPOINT_FILES),
    *(("checkpoints", c, "tokenizer", f) for c in _CHECKPOINTS for f in _TOKENIZER_FILES),
)
STAGED_SUFFIX = ".new"  # the replacement run while it trains
OLD_SUFFIX = ".old"  # the replaced run during the swap

# Keys of the config that may differ on --resume: they change neither the model nor the data nor
# the trajectory of the weights (only how long, how often to log/save/evaluate, where, how loaded).
RESUME_SAFE_KEYS = (
    "name", "train.epochs", "train.max_steps", "train.log_every_steps", "train.checkpoint_every_steps",
    "train.eval_every_epochs", "train.device", "train.keep_freed_memory",
    "data.num_workers", "data.pin_memory", "data.resident",
)
# Filled in from the data by the trainer; compared through the data keys that determine them.
RESUME_DERIVED_KEYS = ("model.vocab_size", "model.num_answers")


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def mark_run_folder(folder: Path) -> None:
    """Record that vqa-align created ``folder`` (so that ``--overwrite`` may replace it later)."""
    marker = folder / RUN_MARKER
    if not marker.exists():
        marker.write_text(json.dumps({"created_by": "vqa-align", "purpose": "training run folder"}) + "\n")


def holds_run(folder: Path) -> bool:
    return folder.is_dir() and any((folder / name).exists() for name in ("config.yaml", "checkpoints", "metrics.jsonl"))


def is_empty_or_absent(folder: Path) -> bool:
    return not folder.exists() or (folder.is_dir() and not any(folder.iterdir()))


def check_trainable_into(out: Path) -> None:
    """Refuse, before anything is written, a run folder ``out`` that is a file or a non-empty folder
    vqa-align did not create (training would write its marker and files among the user's)."""
    if is_empty_or_absent(out) or (out / RUN_MARKER).is_file():
        return
    what = "a file" if not out.is_dir() else f"not empty and has no {RUN_MARKER} marker (vqa-align did not create it)"
    raise UserError(f"--out {out} is {what}; train into a new or empty folder, or into a vqa-align run folder")


def _is_run_path(parts: tuple[str, ...], is_dir: bool) -> bool:
    """Whether the relative path ``parts`` is a file (or, ``is_dir``, a folder) vqa-align writes."""
    for pattern in RUN_FILES:
        if len(parts) > len(pattern) or (len(parts) == len(pattern)) == is_dir:
            continue  # a folder must be a proper prefix of a pattern, a file all of it
        if all(fnmatchcase(part, glob) for part, glob in zip(parts, pattern)):
            return True
    return False


def first_foreign_path(folder: Path) -> Path | None:
    """The first path inside ``folder`` (any depth, sorted) that vqa-align does not write into a run
    folder: a file or folder outside :data:`RUN_FILES`, or any symbolic link. None: all ours."""
    for root, dirs, files in os.walk(folder):
        base = Path(root).relative_to(folder).parts
        dirs.sort()
        for name in sorted(dirs + files):
            path = Path(root) / name
            if path.is_symlink() or not _is_run_path((*base, name), name in dirs):
                return path
    return None


def check_replaceable(folder: Path, option: str = "--overwrite") -> None:
    """Refuse to replace a folder vqa-align did not create, or one holding any other file."""
    if not (folder / RUN_MARKER).is_file():
        raise UserError(
            f"{option}: {folder} has no {RUN_MARKER} marker, so vqa-align did not create it (or an older "
            f"version did) and will not delete it; remove it yourself or choose another --out"
        )
    foreign = first_foreign_path(folder)
    if foreign is not None:
        raise UserError(
            f"{option}: {folder} holds files vqa-align did not write (first: {foreign.relative_to(folder)}); "
            f"move them out or choose another --out: nothing was deleted"
        )


def staged_path(out: Path) -> Path:
    return out.with_name(out.name + STAGED_SUFFIX)


def _remove_ours(folder: Path) -> None:
    """Delete a folder vqa-align created (marker checked again just before)."""
    if folder.exists():
        check_replaceable(folder, option="cleanup")
        shutil.rmtree(folder)


def begin_staged_run(out: Path) -> Path:
    """The sibling folder a replacement run of ``out`` trains in (a leftover one is cleared)."""
    staged = staged_path(out)
    if staged.exists():
        _remove_ours(staged)
    return staged


def commit_staged_run(staged: Path, out: Path) -> None:
    """Swap the staged run in place of ``out``; the old run is deleted only after the swap."""
    old = out.with_name(out.name + OLD_SUFFIX)
    _remove_ours(old)
    check_replaceable(out)  # nothing may have appeared in it since the start
    os.replace(out, old)
    os.replace(staged, out)
    shutil.rmtree(old)
    _say(f"replaced the previous run in {out} (its first checkpoint is written)")


def abandon_staged_run(staged: Path, out: Path) -> None:
    """Training failed before the swap: delete the staged run, keep the old one."""
    if staged.exists() and (staged / RUN_MARKER).is_file():
        shutil.rmtree(staged, ignore_errors=True)
    _say(f"the previous run in {out} was kept (the new one failed before its first checkpoint)")


def recover_run_swap(out: Path) -> None:
    """Repair a kill between the two renames of :func:`commit_staged_run` (``out`` missing)."""
    staged, old = staged_path(out), out.with_name(out.name + OLD_SUFFIX)
    if out.exists() or not (staged / RUN_MARKER).is_file() or not (old / RUN_MARKER).is_file():
        return
    os.replace(staged, out)
    shutil.rmtree(old)
    _say(f"note: {out} was missing (a run was stopped while replacing it); moved the new run into place")


# ----------------------------------------------------------------------------------------------
# What may change on --resume
# ----------------------------------------------------------------------------------------------


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resume_config_changes(saved: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(refused, allowed) descriptions ``key: old -> new`` of the keys that differ."""
    before, after = flatten(saved), flatten(new)
    refused, allowed = [], []
    for key in sorted(set(before) | set(after)):
        if key in RESUME_DERIVED_KEYS or before.get(key) == after.get(key):
            continue
        change = f"{key}: {before.get(key)!r} -> {after.get(key)!r}"
        (allowed if key in RESUME_SAFE_KEYS else refused).append(change)
    return refused, allowed


def check_resume_config(run_config: Path, new: dict[str, Any]) -> None:
    """Refuse a resume whose config changes the model, the data or the training recipe."""
    from vqa_align.config import ConfigError, config_from_dict, make_paths_absolute
    from vqa_align.untrusted_files import MAX_CONFIG_BYTES, read_yaml

    try:
        # Runs written before paths were stored absolute: their relative paths meant the working directory.
        saved = make_paths_absolute(config_from_dict(read_yaml(run_config, MAX_CONFIG_BYTES, expect=dict) or {})).to_dict()
    except FileNotFoundError:
        raise UserError(f"--resume: {run_config} is missing") from None
    except (UserError, ConfigError) as err:
        raise UserError(f"--resume: {run_config}: {err}") from None
    refused, allowed = resume_config_changes(saved, new)
    if refused:
        raise UserError(
            f"--resume: the config differs from the run's {run_config} in {'; '.join(refused)}; these change the "
            f"model, the data or the training and cannot change on resume (allowed: {', '.join(RESUME_SAFE_KEYS)}); "
            f"start a new run with another --out or --overwrite"
        )
    for change in allowed:
        _say(f"resume: {change} (safe to change on resume)")
