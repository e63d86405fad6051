"""Report folders: where ``vqa-align experiment`` and ``vqa-align sentiment experiment|report`` write.

A report command writes only into a folder that is new, empty, or already a report folder of
vqa-align (it holds :data:`REPORT_MARKER`), and never over a file it did not write there: the
marker lists every file vqa-align wrote into the folder, and a file of another name in the way of
one about to be written is refused, never overwritten. Files vqa-align only reads there (the
sentiment report's hand-written ``notes.md``) and any other file of the user stay untouched.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vqa_align.errors import UserError

REPORT_MARKER = ".vqa-align-report"
MARKER_FILES_KEY = "files"  # the marker's list of the paths (relative, POSIX) vqa-align wrote


def _read_marker(folder: Path) -> dict[str, Any]:
    marker = folder / REPORT_MARKER
    try:
        data = json.loads(marker.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{marker}: not a vqa-align report marker ({err}); move the folder away or choose "
                        "another --out") from None
    if not isinstance(data, dict) or not isinstance(data.get(MARKER_FILES_KEY), list):
        raise UserError(f"{marker}: not a vqa-align report marker (no list {MARKER_FILES_KEY!r}); move the folder "
                        "away or choose another --out")
    return data


def _write_marker(folder: Path, data: dict[str, Any]) -> None:
    marker = folder / REPORT_MARKER
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, marker)


def open_report_folder(out: Path, writes: Iterable[str], option: str = "--out") -> None:
    """Make ``out`` a report folder (new or empty) or check that it is one, and claim ``writes``
    (paths relative to ``out``) for writing: refuse, before anything is written, one that exists
    and that vqa-align did not write there. Records the claimed paths in the marker."""
    if out.exists() and (not out.is_dir() or out.is_symlink()):
        raise UserError(f"{option} {out} is not a folder; choose a new or empty folder for the report")
    ours = out.is_dir() and (out / REPORT_MARKER).is_file()
    if out.is_dir() and not ours and any(out.iterdir()):
        raise UserError(f"{option} {out} is not empty and is not a vqa-align report folder (no {REPORT_MARKER}); "
                        "choose a new or empty folder: nothing was written")
    data = _read_marker(out) if ours else {"created_by": "vqa-align", "purpose": "report folder",
                                            MARKER_FILES_KEY: []}
    written = set(data[MARKER_FILES_KEY])
    claimed = sorted(set(writes))
    for name in claimed:
        path = out / name
        if name not in written and (path.exists() or path.is_symlink()):
            raise UserError(f"{option} {out}: {path} exists and vqa-align did not write it; move it away or choose "
                            "another folder: nothing was overwritten")
    out.mkdir(parents=True, exist_ok=True)
    data[MARKER_FILES_KEY] = sorted(written | set(claimed))
    _write_marker(out, data)
