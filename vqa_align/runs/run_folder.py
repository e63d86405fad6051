"""Run folders: what vqa-align may delete, replacing a run safely, and what may change on resume.

Every run folder vqa-align creates holds a marker file (:data:`RUN_MARKER`). ``--overwrite``
replaces only a folder that has the marker and holds nothing but what vqa-align writes there
(:data:`RUN_ENTRIES`); anything else is refused with a message, never deleted.

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
from pathlib import Path
from typing import Any

from vqa_align.errors import UserError

RUN_MARKER = ".vqa-align-run"
# What training, the experiment runner and `vqa-align eval --out RUN/eval` write into a run folder.
RUN_ENTRIES = frozenset({RUN_MARKER, "config.yaml", "checkpoints", "metrics.jsonl", "curves.png", "curves.tmp.png",
                         "tensorboard", "eval", "done.json"})
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


def check_replaceable(folder: Path, option: str = "--overwrite") -> None:
    """Refuse to replace a folder vqa-align did not create, or one holding other files."""
    if not (folder / RUN_MARKER).is_file():
        raise UserError(
            f"{option}: {folder} has no {RUN_MARKER} marker, so vqa-align did not create it (or an older "
            f"version did) and will not delete it; remove it yourself or choose another --out"
        )
    foreign = sorted(entry.name for entry in folder.iterdir() if entry.name not in RUN_ENTRIES)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise UserError(
            f"{option}: {folder} holds files vqa-align did not write ({shown}); move them out "
            f"or choose another --out: nothing was deleted"
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
    from vqa_align.config import ConfigError, config_from_dict
    from vqa_align.untrusted_files import MAX_CONFIG_BYTES, read_yaml

    try:
        saved = config_from_dict(read_yaml(run_config, MAX_CONFIG_BYTES, expect=dict) or {}).to_dict()
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
