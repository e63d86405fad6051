"""Where vqa-align keeps what it prepares, downloads and trains by default: one cache folder."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "VQA_ALIGN_CACHE"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cache folder: ``cache_dir``, else ``$VQA_ALIGN_CACHE``, else ``~/.cache/vqa_align``."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vqa_align"


def default_checkpoint_path() -> Path:
    """The quickstart's run folder, where ``vqa-align demo`` and ``predict`` look by default:
    ``<cache>/runs/quickstart``."""
    return cache_root() / "runs" / "quickstart"
