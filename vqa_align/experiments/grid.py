"""The methods × seeds grid shared by ``vqa-align experiment`` and ``vqa-align sentiment experiment``.

One policy for what a rerun does with each cell's run, whichever experiment it belongs to:

- finished (its result file exists) and made with the same config: read, never redone;
  made with another config: refused (use another output folder), never mixed or deleted;
- interrupted after a checkpoint (``checkpoints/last``): resumed, but only when the run folder's
  ``config.yaml`` matches the config asked for (else refused, as above);
- interrupted before its first checkpoint: started again (nothing of it was kept).

"The same config" ignores run-environment fields (:data:`ENVIRONMENT_KEYS`): the device, data
loader workers, the cache folder, the sizes the trainer fills in from the data and the seed roles
the report groups seeds by.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from vqa_align.config import ALIGNMENT_METHODS, MAX_SEED, paths_made_absolute
from vqa_align.errors import UserError
from vqa_align.untrusted_files import MAX_CONFIG_BYTES, MAX_META_BYTES, read_json, read_yaml

# Run-environment fields that may differ between an interrupted run and its resumption.
ENVIRONMENT_KEYS = (("model", "vocab_size"), ("model", "num_answers"), ("train", "device"),
                    ("train", "adapt_threads"),  # the thread team follows the machine's load, as device does
                    ("data", "num_workers"), ("data", "pin_memory"), ("data", "cache_dir"),
                    # the experiment's seed roles: how the report groups seeds, nothing a run computes
                    ("run", "exploratory_seeds"), ("run", "confirmatory_seeds"))

Log = Callable[[str], None]
TrainingState = Literal["new", "partial", "complete"]
T = TypeVar("T")


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in methods if m not in ALIGNMENT_METHODS]
    if not methods or bad:
        raise UserError(f"--methods {text!r}: expected a comma-separated subset of {','.join(ALIGNMENT_METHODS)}")
    return list(dict.fromkeys(methods))  # drop repeats, keep the user's order


def parse_seeds(text: str, option: str = "--seeds") -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"{option} {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not seeds:
        raise UserError(f"{option} {text!r}: give at least one seed")
    bad = [s for s in seeds if not 0 <= s <= MAX_SEED]
    if bad:
        raise UserError(f"{option} {text!r}: seeds must lie in [0, {MAX_SEED}], got {bad[0]}")
    return list(dict.fromkeys(seeds))


def run_name(method: str, seed: int) -> str:
    return f"{method}_seed{seed}"


@dataclass(frozen=True)
class Cell:
    """One (method, seed) of the grid."""

    method: str
    seed: int

    @property
    def name(self) -> str:
        return run_name(self.method, self.seed)


def grid_cells(methods: Sequence[str], seeds: Sequence[int], seed_major: bool = False) -> list[Cell]:
    """Every (method, seed); ``seed_major``: all methods of a seed before the next seed (an
    interrupted grid then holds complete pairs for paired tests)."""
    if seed_major:
        return [Cell(m, s) for s in seeds for m in methods]
    return [Cell(m, s) for m in methods for s in seeds]


def run_grid(cells: Sequence[Cell], run_cell: Callable[[Cell, Log], T], progress: bool = True) -> list[T]:
    """``run_cell(cell, log)`` for every cell in order, under one progress bar (stderr); ``log``
    prints ``[i/n] message`` (stdout) above the bar."""
    from vqa_align.progress import progress_bar

    results: list[T] = []
    bar = progress_bar(cells, desc="experiment", unit="run", enabled=progress)
    for index, cell in enumerate(bar, 1):
        bar.set_description(f"run {index}/{len(cells)}: {cell.name}")

        def log(message: str, prefix: str = f"[{index}/{len(cells)}]") -> None:
            if progress:
                bar.write(f"{prefix} {message}", file=sys.stdout)

        results.append(run_cell(cell, log))
    bar.close()
    return results


# ----------------------------------------------------------------------------------------------
# The resume policy
# ----------------------------------------------------------------------------------------------


def config_signature(config: Any) -> dict[str, Any]:
    """The config (an object with ``to_dict()`` or a dict) without run-environment fields: what
    must match for a run to be reused or resumed."""
    data = json.loads(json.dumps(config if isinstance(config, dict) else config.to_dict()))
    # Paths as the trainer stores them (absolute): a run's config.yaml and a config naming the same
    # files relative to the working directory are the same config.
    data = paths_made_absolute(data)
    for section, key in ENVIRONMENT_KEYS:
        data.get(section, {}).pop(key, None)
    return data


def _different_config(where: Path, option: str) -> UserError:
    return UserError(f"{where} was made with a different config; use another {option} or delete it")


def finished_result(path: Path, signature: dict[str, Any], where: Path, option: str = "--out") -> dict[str, Any] | None:
    """The result file of a finished run (None: not finished). One made with another config is
    refused (naming ``where`` and the ``option`` that picks another place); one that recorded no
    config (written before configs were recorded with the results) is kept."""
    if not path.is_file():
        return None
    data = read_json(path, MAX_META_BYTES, expect=dict)
    if data.get("config") is not None and config_signature(data["config"]) != signature:
        raise _different_config(where, option)
    return data


def check_same_config(run_dir: Path, signature: dict[str, Any], option: str = "--out") -> None:
    """Refuse to continue a run folder whose ``config.yaml`` differs from ``signature``."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    if config_signature(read_yaml(saved, MAX_CONFIG_BYTES) or {}) != signature:
        raise _different_config(run_dir, option)


def training_state(run_dir: Path, epochs: int, max_steps: int | None) -> TrainingState:
    """"new" (nothing to resume), "partial" (resume from checkpoints/last) or "complete"."""
    meta_file = run_dir / "checkpoints" / "last" / "meta.json"
    if not meta_file.is_file():
        return "new"
    meta = read_json(meta_file, MAX_META_BYTES, expect=dict)
    if meta.get("epoch", 0) >= epochs or (max_steps is not None and meta.get("global_step", 0) >= max_steps):
        return "complete"
    return "partial"


def unfinished_run_state(run_dir: Path, signature: dict[str, Any], epochs: int, max_steps: int | None,
                         option: str = "--out") -> TrainingState:
    """How far the training of a run without a result got; a checkpointed run made with another
    config is refused (resuming it would mix two configs in one run)."""
    state = training_state(run_dir, epochs, max_steps)
    if state != "new":
        check_same_config(run_dir, signature, option)
    return state


# ----------------------------------------------------------------------------------------------
# The machine the grid ran on (recorded with the results; the report only reads it)
# ----------------------------------------------------------------------------------------------


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": _cpu_model() or platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        info["load_average_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    return info
