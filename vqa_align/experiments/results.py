"""Result files of an experiment: JSON without NaN (null instead), written atomically.

JSON has no NaN, so a missing statistic is stored as null and read back as NaN by
:func:`restore_nan`; the report code then only ever sees numbers.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def json_safe(value: Any) -> Any:
    """NaN/inf -> None (JSON has no NaN), recursively; tuples become lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def restore_nan(value: Any) -> Any:
    """Statistics ``{"mean", "std", "n"}`` stored with None (JSON) -> NaN, recursively."""
    if isinstance(value, dict):
        if set(value) == {"mean", "std", "n"}:
            return {k: (math.nan if v is None else v) for k, v in value.items()}
        return {k: restore_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [restore_nan(v) for v in value]
    return value


def json_tmp_name(name: str) -> str:
    """The temporary file :func:`write_json` writes ``name`` through."""
    return name + ".tmp"


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` (NaN as null) through a temporary file: a reader, or a run killed halfway,
    never sees half a file (done.json is the "finished" marker of a run)."""
    tmp = path.with_name(json_tmp_name(path.name))
    tmp.write_text(json.dumps(json_safe(data), indent=2))
    os.replace(tmp, path)
