"""Fingerprints of the data a run trains on, so that ``--resume`` refuses data that changed.

The config names the files, but a file can change under the same name: new questions or
annotations give a new answer vocabulary (another order of the classifier's outputs), a
re-extracted store other features. Every checkpoint's ``meta.json`` records (key ``data``) the
SHA-256 of each questions / annotations file of the train and val splits, the fingerprint of each
feature store (:meth:`~vqa_align.extract.feature_store.FeatureStore.fingerprint`) and those of the
answer and token vocabularies; a resume computes them again and names the first that differs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vqa_align.extract.backbones.base import sha256_of_file
from vqa_align.extract.feature_store import FeatureStore

FINGERPRINTED_SPLITS = ("train", "val")  # val picks `best` and stops early: it shapes the run too


def data_fingerprints(files: dict[str, dict[str, list[Path]]], stores: list[FeatureStore],
                      vocabularies: dict[str, str]) -> dict[str, Any]:
    """{"files": {path: sha256}, "stores": {path: fingerprint}, "vocabularies": {...}} of a run's data.

    ``files``: split -> {"questions": [...], "annotations": [...]} (as :func:`resolve_files` gives);
    ``vocabularies``: the answer / token fingerprints (vqa_align.runs.checkpoint.vocabulary_fingerprints).
    """
    paths = [path for split in FINGERPRINTED_SPLITS for kind in ("questions", "annotations")
             for path in files.get(split, {}).get(kind, [])]
    return {
        "files": {str(path): sha256_of_file(path) for path in dict.fromkeys(paths)},
        "stores": {str(store.path): store.fingerprint() for store in {str(s.path): s for s in stores}.values()},
        "vocabularies": dict(vocabularies),
    }


def data_change(recorded: dict[str, Any], now: dict[str, Any]) -> str | None:
    """What differs between the fingerprints a run recorded and those of the data now (None: nothing).

    The files and stores come first: a changed file is the cause, a new vocabulary its consequence.
    """
    for group, what in (("files", "file"), ("stores", "feature store")):
        before, after = recorded.get(group, {}), now.get(group, {})
        for path, digest in before.items():
            if path not in after:
                return f"the run was trained on the {what} {path}, which the data now do not include"
            if after[path] != digest:
                return f"the {what} {path} changed since the run was trained on it"
        for path in after:
            if path not in before:
                return f"the {what} {path} was not part of the data the run was trained on"
    before, after = recorded.get("vocabularies", {}), now.get("vocabularies", {})
    for key, unit, size in (("answers_sha256", "answers", "num_answers"), ("vocab_sha256", "tokens", "vocab_size")):
        if key in before and key in after and before[key] != after[key]:
            return (f"the {unit} built from the data now ({after.get(size, '?')}) differ from the "
                    f"{before.get(size, '?')} {unit} the run was trained with")
    return None
