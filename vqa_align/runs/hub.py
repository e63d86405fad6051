"""Where a run comes from: a local folder, or a Hugging Face Hub repository holding a run folder.

``--checkpoint`` of ``predict`` / ``eval`` / ``demo`` and :meth:`Predictor.from_pretrained` take
either. A name that is a local folder (or file) is used as it is; otherwise a name of the form
``user/repo`` is fetched once with ``huggingface_hub.snapshot_download`` into the Hub cache (only
when the user names it: nothing else in vqa-align downloads) and the snapshot folder is used. The
training state (``trainer_state.pt``, the optimizer's moments) is not fetched: it is only needed to
resume training, and it is as large as the weights twice over.
"""

from __future__ import annotations

import re
from pathlib import Path

from vqa_align.runs.checkpoint import CheckpointError

# user/repo: the Hub's namespaced repo ids (letters, digits, '-', '_', '.'; no '--' or '..').
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
# Files of a run folder that inference, evaluation and fine-tuning never read.
NOT_FETCHED = ("*trainer_state.pt", "tensorboard/*", "*.tmp/*", "*.old/*")


def is_repo_id(name: str) -> bool:
    """True for ``user/repo`` names the Hub accepts (``runs/x`` is one too: the caller looks locally first)."""
    return bool(REPO_ID.match(name)) and ".." not in name and "--" not in name and not name.endswith(".git")


def download_run(repo_id: str) -> Path:
    """The local snapshot folder of Hub repo ``repo_id`` (fetched into the Hub cache if needed).

    Kept in one function so that tests replace it (no network in the test suite).
    """
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, ignore_patterns=list(NOT_FETCHED)))


def locate_run(name: str | Path) -> Path:
    """A local run or checkpoint folder for ``name``: a local path, else a Hub repo id (downloaded).

    Raises a CheckpointError that says what ``name`` was taken for and why it failed.
    """
    path = Path(name).expanduser()
    if path.exists():
        return path
    text = str(name).strip()
    if not is_repo_id(text):
        raise CheckpointError(f"checkpoint not found: {name} (no such folder here, and not a Hugging Face Hub "
                              "repo id of the form user/repo)")
    try:
        folder = download_run(text)
    except Exception as err:  # noqa: BLE001 - huggingface_hub raises HTTP, offline, auth and validation errors
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"checkpoint {name}: no such folder here, and downloading it from the Hugging Face Hub "
                              f"failed ({type(err).__name__}: {first})") from None
    if not (folder / "checkpoints").is_dir() and not (folder / "model.safetensors").is_file():
        raise CheckpointError(f"Hugging Face Hub repo {text} (downloaded to {folder}) is not a vqa-align run: "
                              "it has no checkpoints/ folder and no model.safetensors")
    return folder


def in_hub_cache(path: Path) -> bool:
    """True when ``path`` lies in the Hub cache (a downloaded snapshot: never written to)."""
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return False
    try:
        path.resolve().relative_to(Path(constants.HF_HUB_CACHE).resolve())
    except ValueError:
        return False
    return True
