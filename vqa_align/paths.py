"""Where vqa-align keeps what it prepares, downloads and trains by default (one cache folder), and
the guard that keeps every output off the inputs it is made from."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from stat import S_ISDIR

from vqa_align.errors import UserError

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


def _stat(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)  # symlinks followed
    except OSError:
        return None


def check_output_paths(written: Sequence[str | Path], inputs: Iterable[str | Path | None],
                       option: str = "--out") -> None:
    """Refuse, before anything is written, to write where the command reads.

    ``written``: the output first, then every other path the command writes or replaces beside it
    (``OUT.tmp``, ``OUT.ids.json``, a parts folder ...). ``inputs``: the files and folders it reads
    (None skipped). Refused, naming both: a written path that is an input (the same path once
    symlinks are resolved, or the same file: a hard link, a symlink), one inside an input folder,
    or a written folder holding an input. The one guard of every writer of vqa-align.
    """
    targets = []
    for path in map(Path, written):
        stat = _stat(path.expanduser())
        targets.append((path, path.expanduser().resolve(), (stat.st_dev, stat.st_ino) if stat else None))
    main = targets[0][0] if targets else None
    for item in inputs:
        if item is None:
            continue
        source = Path(item).expanduser()
        real, stat = source.resolve(), _stat(source)
        identity, is_folder = ((stat.st_dev, stat.st_ino), S_ISDIR(stat.st_mode)) if stat else (None, False)
        for shown, target, target_identity in targets:
            if target == real or (identity is not None and identity == target_identity):
                problem = "is the input"
            elif is_folder and target.is_relative_to(real):
                problem = "lies inside the input folder"
            elif real.is_relative_to(target):
                problem = "contains the input"
            else:
                continue
            what = f"{option} {shown}" if shown == main else f"{option} {main}: the file it writes beside it, {shown},"
            raise UserError(f"{what} {problem} {source}; writing there would destroy what is read: choose "
                            "another output path (nothing was written)")
