"""``vqa-align prep qa``: questions and answers about your own pictures -> VQA v2 question files.

Input, one question per line:

* CSV (``.csv``; ``.tsv`` tab-separated) with a header row naming the columns
  ``image,question,answer`` and optionally ``split``, in any order;
* JSON Lines (``.jsonl``): one object per line with those keys.

``image`` is the picture's path relative to the folder given to ``vqa-align extract`` (or any
unique tail of the path ``extract`` recorded, e.g. just the file name); it is looked up in the
store's ``<store>.ids.json``, written by ``extract``. ``split`` is ``train``, ``val`` or empty; rows
without one are split by picture (``--val-fraction`` of the pictures, seeded by ``--seed``), so that
no picture has questions on both sides.

Output (default: beside the store, named after it; ``data/photos.h5`` ->
``data/photos_{train,val}_{questions,annotations}.json``): VQA v2 files written by
``vqa_align.data.vqa_v2.vqa_json``. Each question gets ``question_id`` = its line number in the
input file, its picture's image id, and its one answer as the 10 human answers (soft target 1.0).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath

import numpy as np

from vqa_align.data.vqa_v2 import QuestionRecord, question_type, tokenize_question, vqa_json
from vqa_align.errors import DataFormatError, InputFileNotFoundError, UserError
from vqa_align.extract.feature_store import IDS_SUFFIX
from vqa_align.metrics.vqa_accuracy import normalize_answer

REQUIRED_COLUMNS = ("image", "question", "answer")
COLUMNS = REQUIRED_COLUMNS + ("split",)
SPLITS = ("train", "val")
KINDS = ("questions", "annotations")
DEFAULT_VAL_FRACTION = 0.2  # of the pictures, for rows without a split
DEFAULT_SEED = 0
HUMAN_ANSWERS = 10  # VQA v2 has 10 human answers per question; ours are 10 copies of the one answer
YES_NO = ("yes", "no")
DELIMITERS = {".csv": ",", ".tsv": "\t"}
JSONL_SUFFIXES = (".jsonl", ".ndjson")


@dataclass(frozen=True)
class QARow:
    """One line of the input: ``where`` is ``file: line N`` for messages."""

    line: int
    where: str
    image: str
    question: str
    answer: str
    split: str | None  # None: chosen by the seeded split


# ----------------------------------------------------------------------------------------------
# Reading the file
# ----------------------------------------------------------------------------------------------


def _row(path: Path, line: int, fields: dict[str, object]) -> QARow:
    """A checked row; every problem is one error naming the file and line."""
    where = f"{path}: line {line}"
    values = {}
    for key in COLUMNS:
        value = fields.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key == "answer":
            value = str(value)  # JSON numbers as answers ("answer": 2)
        if value is not None and not isinstance(value, str):
            raise DataFormatError(f"{where}: {key} must be text, got {value!r}")
        values[key] = " ".join((value or "").split())
    for key in REQUIRED_COLUMNS:
        if not values[key]:
            raise DataFormatError(f"{where}: empty {key}")
    if not tokenize_question(values["question"]):
        raise DataFormatError(f"{where}: question {values['question']!r} has no words")
    if not normalize_answer(values["answer"]):
        raise DataFormatError(f"{where}: answer {values['answer']!r} is empty once articles and punctuation are dropped")
    split = values["split"].lower() or None
    if split is not None and split not in SPLITS:
        raise DataFormatError(f"{where}: unknown split {values['split']!r} (expected {', '.join(SPLITS)} or empty)")
    return QARow(line, where, values["image"], values["question"], values["answer"], split)


def _check_columns(path: Path, names: list[str], line: int) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    unknown = [c for c in names if c not in COLUMNS]
    if missing or unknown:
        got = ", ".join(repr(n) for n in names) or "nothing"
        raise DataFormatError(f"{path}: line {line}: expected the columns {','.join(REQUIRED_COLUMNS)}[,split], "
                              f"got {got}" + (f" (missing {', '.join(missing)})" if missing else "")
                              + (f" (unknown {', '.join(unknown)})" if unknown else ""))


def _csv_rows(path: Path, text: str) -> list[QARow]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=DELIMITERS[path.suffix.lower()])
    header = next(reader, None)
    if header is None:
        raise DataFormatError(f"{path}: the file is empty")
    names = [h.strip().lower() for h in header]
    _check_columns(path, names, 1)
    rows = []
    for fields in reader:
        line = reader.line_num
        if not any(f.strip() for f in fields):
            continue  # blank line
        if len(fields) != len(names):
            raise DataFormatError(f"{path}: line {line}: {len(fields)} field(s), but the header names {len(names)} "
                                  "(quote a field that contains the delimiter)")
        rows.append(_row(path, line, dict(zip(names, fields))))
    return rows


def _jsonl_rows(path: Path, text: str) -> list[QARow]:
    rows = []
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            item = json.loads(raw)
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{path}: line {line}: not JSON ({err.msg})") from None
        if not isinstance(item, dict):
            raise DataFormatError(f"{path}: line {line}: expected an object with {', '.join(REQUIRED_COLUMNS)}")
        _check_columns(path, list(item), line)
        rows.append(_row(path, line, item))
    return rows


def read_qa_file(path: str | Path) -> list[QARow]:
    """The checked rows of a CSV / TSV / JSONL questions-and-answers file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in DELIMITERS and suffix not in JSONL_SUFFIXES:
        raise UserError(f"{path}: unknown format {suffix or '(no suffix)'!r}; "
                        f"give a {', '.join(list(DELIMITERS) + list(JSONL_SUFFIXES))} file")
    if not path.is_file():
        raise InputFileNotFoundError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a spreadsheet's byte-order mark is not a column name
    except UnicodeDecodeError as err:
        raise DataFormatError(f"{path}: not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    rows = _jsonl_rows(path, text) if suffix in JSONL_SUFFIXES else _csv_rows(path, text)
    if not rows:
        raise DataFormatError(f"{path}: no questions")
    return rows


# ----------------------------------------------------------------------------------------------
# Pictures of the store
# ----------------------------------------------------------------------------------------------


def _tails(path: str) -> list[str]:
    """Every tail of a path: ``a/b/c.jpg`` -> ``a/b/c.jpg``, ``b/c.jpg``, ``c.jpg``."""
    parts = PurePath(path).parts
    return ["/".join(parts[i:]) for i in range(len(parts))]


class StorePictures:
    """The pictures of a store written by ``vqa-align extract``, found by any unique tail of their path."""

    def __init__(self, store: str | Path) -> None:
        self.store = Path(store)
        self.ids_file = self.store.with_name(self.store.name + IDS_SUFFIX)
        if not self.ids_file.is_file():
            raise InputFileNotFoundError(
                f"{self.ids_file}: no such file; `vqa-align extract PICTURES --out {self.store}` writes it "
                "beside the store it makes")
        try:
            ids = json.loads(self.ids_file.read_text(encoding="utf-8"))
            self.files = {int(k): str(v) for k, v in ids.items()}
        except (json.JSONDecodeError, AttributeError, ValueError, UnicodeDecodeError) as err:
            raise DataFormatError(f"{self.ids_file}: not an image id -> file JSON object ({err})") from None
        self._by_tail: dict[str, list[int]] = {}
        for image_id, file in self.files.items():
            for tail in _tails(file.replace("\\", "/")):
                self._by_tail.setdefault(tail, []).append(image_id)

    def image_id(self, name: str, where: str) -> int:
        """The id of the picture ``name`` names, or an error naming ``where`` and the store."""
        key = PurePosixPath(name.replace("\\", "/")).as_posix()
        found = self._by_tail.get(key, [])
        if not found:
            raise DataFormatError(f"{where}: image {name!r} is not in {self.store} (not among the "
                                  f"{len(self.files)} pictures of {self.ids_file}; was it extracted, or skipped as unreadable?)")
        if len(found) > 1:
            paths = ", ".join(sorted(self.files[i] for i in found)[:3])
            raise DataFormatError(f"{where}: image {name!r} matches {len(found)} pictures ({paths}); "
                                  "give more of its path")
        return found[0]


# ----------------------------------------------------------------------------------------------
# Splits and records
# ----------------------------------------------------------------------------------------------


def split_pictures(image_ids: list[int], val_fraction: float, seed: int, where: str) -> dict[int, str]:
    """Image id -> split for the pictures of rows without one: ``val_fraction`` of them (at least
    one, at most all but one) to ``val``, the rest to ``train``, by a permutation seeded with ``seed``."""
    unique = sorted(set(image_ids))
    if not unique:
        return {}
    if len(unique) < 2:
        raise DataFormatError(f"{where}: the rows without a split name only one picture; a train/val split needs "
                              "two (or give every row a split)")
    n_val = min(max(1, round(val_fraction * len(unique))), len(unique) - 1)
    order = np.random.default_rng(seed).permutation(len(unique))
    val = {unique[i] for i in order[:n_val]}
    return {i: "val" if i in val else "train" for i in unique}


def answer_type(answer: str) -> str:
    """VQA's answer type of one answer: ``yes/no``, ``number`` (digits once normalised) or ``other``."""
    normal = normalize_answer(answer)
    if normal in YES_NO:
        return "yes/no"
    return "number" if normal.isdigit() else "other"


def qa_records(rows: list[QARow], pictures: StorePictures, source: str, val_fraction: float,
               seed: int) -> dict[str, list[QuestionRecord]]:
    """The rows as VQA records per split (every picture checked against the store)."""
    ids = [pictures.image_id(r.image, r.where) for r in rows]
    chosen = split_pictures([i for i, r in zip(ids, rows) if r.split is None], val_fraction, seed, source)
    out: dict[str, list[QuestionRecord]] = {s: [] for s in SPLITS}
    for r, image_id in zip(rows, ids):
        out[r.split or chosen[image_id]].append(QuestionRecord(
            question_id=r.line, image_id=image_id, question=r.question, source=source,
            answers=(r.answer,) * HUMAN_ANSWERS, multiple_choice_answer=r.answer,
            answer_type=answer_type(r.answer), question_type=question_type(r.question.lower()),
        ))
    for split, records in out.items():
        if not records:
            raise DataFormatError(f"{source}: no {split} questions; training needs both splits "
                                  "(give some rows that split, or leave split empty for a seeded split)")
    return out


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def output_paths(store: str | Path, out_dir: str | Path | None = None) -> dict[str, dict[str, Path]]:
    """split -> {"questions", "annotations"} files: ``<out_dir>/<store stem>_<split>_<kind>.json``
    (``out_dir`` default: the store's folder)."""
    store = Path(store)
    folder = Path(out_dir) if out_dir is not None else store.parent
    return {s: {k: folder / f"{store.stem}_{s}_{k}.json" for k in KINDS} for s in SPLITS}


def prepare_qa(
    qa_file: str | Path,
    store: str | Path,
    out_dir: str | Path | None = None,
    *,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = DEFAULT_SEED,
    overwrite: bool = False,
) -> dict[str, dict[str, object]]:
    """Check ``qa_file`` against the pictures of ``store`` and write the VQA v2 files of both splits.

    Nothing is written when a row is bad or, without ``overwrite``, when an output file exists.
    Returns split -> {"questions": n, "pictures": n, "files": {kind: path}}.
    """
    if not (isinstance(val_fraction, (int, float)) and math.isfinite(val_fraction) and 0 < val_fraction < 1):
        raise UserError(f"--val-fraction must be a number in (0, 1), got {val_fraction!r}")
    paths = output_paths(store, out_dir)
    if not overwrite:
        existing = [str(p) for files in paths.values() for p in files.values() if p.exists()]
        if existing:
            raise UserError(f"{existing[0]} exists; pass --overwrite to replace it")
    rows = read_qa_file(qa_file)
    records = qa_records(rows, StorePictures(store), str(qa_file), val_fraction, seed)
    summary: dict[str, dict[str, object]] = {}
    for split, recs in records.items():
        for kind, content in zip(KINDS, vqa_json(recs)):
            path = paths[split][kind]
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(content, ensure_ascii=False), encoding="utf-8")
            os.replace(tmp, path)  # a reader never sees half a file
        summary[split] = {"questions": len(recs), "pictures": len({r.image_id for r in recs}),
                          "files": {k: str(p) for k, p in paths[split].items()}}
    return summary


def run_prep(args: argparse.Namespace) -> int:
    """``vqa-align prep qa``: write the files and say what is in them."""
    summary = prepare_qa(args.input, args.store, args.out_dir, val_fraction=args.val_fraction, seed=args.seed,
                         overwrite=args.overwrite)
    for split, info in summary.items():
        files = info["files"]
        print(f"{split}: {info['questions']} question(s) about {info['pictures']} picture(s) -> "
              f"{files['questions']}, {files['annotations']}")
    return 0
