"""Bounded readers for files that come from outside: configs, checkpoint metadata, vocabularies, VQA JSON.

A run folder, a checkpoint or a data file may come from a stranger, so each read here is bounded
twice: by size in bytes (checked with ``stat`` and again while reading, so a FIFO or a growing file
cannot exceed it) and by expansion (YAML aliases are refused: nine nested levels of ``[*a, *a, ...]``
expand to billions of nodes from a few hundred bytes). A file that breaks a bound, is not UTF-8,
does not parse, nests too deeply or holds the wrong top-level type is refused with one line naming
the file (a :class:`~vqa_align.errors.UserError`); a missing file raises
:class:`~vqa_align.errors.InputFileNotFoundError`. Bottom layer: imports only errors.py, PyYAML
and the standard library.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

from vqa_align.errors import DataFormatError, InputFileNotFoundError, UserError

MiB = 1024 * 1024

# Sizes: each limit is far above the largest real file of its kind and far below what would
# exhaust memory once parsed (Python objects take ~10x the JSON's bytes).
MAX_CONFIG_BYTES = 1 * MiB  # a full resolved config.yaml is ~3 KB; presets are smaller
MAX_META_BYTES = 16 * MiB  # meta.json / manifests / results.json of a run: a few KB of numbers
# answers.json (VQA v2: 3,129 answers, ~50 KB) and tokenizer files (VQA v2 word-level ~0.5 MB,
# MiniLM's WordPiece tokenizer.json ~0.7 MB, the largest multilingual ones ~20 MB)
MAX_VOCAB_BYTES = 64 * MiB
# VQA questions / annotations / results JSON: the largest official file, VQA v2 train
# annotations, is ~330 MB (train questions ~60 MB, a test-set results file ~25 MB)
MAX_DATASET_JSON_BYTES = 1024 * MiB

# Value ranges of numbers read from files and options (config fields, CLI options, app inputs), so
# that a value no machine could run is refused where it is read, naming it, not by an OverflowError
# or a failed allocation deep in numpy or torch.
MAX_INT = 2**63 - 1  # integers end up in an int64 / C long (ids, counts, steps)
MAX_WIDTH = 1 << 16  # layer widths, feature_dim, tokens and regions per item: real models use 64-4096
MAX_LAYERS = 1024  # num_layers, flat_glimpses (MCAN: 6 and 1)
MAX_VOCAB = 1 << 21  # vocab_size / num_answers: the largest real tokenizers have ~250k tokens
MAX_BATCH_SIZE = 1 << 20  # far beyond any device's memory for one step
MAX_WORKERS = 256  # data loader processes: more than any machine's cores
MAX_ITERATIONS = 1 << 20  # ot_iterations (default 2,000)


def _too_big(path: Path, size: int | str, max_bytes: int, error: type[UserError]) -> UserError:
    return error(f"{path}: refused: {size} bytes, more than the {max_bytes:,}-byte limit for this kind of file")


def read_bytes(path: str | os.PathLike, max_bytes: int, error: type[UserError] = DataFormatError) -> bytes:
    """The bytes of ``path``, refusing a file larger than ``max_bytes`` before reading it."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise error(f"{path}: not a regular file")
        if size > max_bytes:
            raise _too_big(path, size, max_bytes, error)
        with path.open("rb") as handle:
            data = handle.read(max_bytes + 1)  # the file may have grown since stat
    except FileNotFoundError:
        raise InputFileNotFoundError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise error(f"{path}: not a regular file") from None
    except OSError as err:
        raise error(f"{path}: cannot be read ({err.strerror or err})") from None
    if len(data) > max_bytes:
        raise _too_big(path, f"more than {max_bytes}", max_bytes, error)
    return data


def read_text(path: str | os.PathLike, max_bytes: int, error: type[UserError] = DataFormatError) -> str:
    """UTF-8 text of ``path`` (a leading BOM dropped), bounded like :func:`read_bytes`."""
    data = read_bytes(path, max_bytes, error)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise error(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def _type_name(expect: type | tuple[type, ...], language: str) -> str:
    names = {dict: "a JSON object" if language == "JSON" else "a mapping", list: "a list"}
    kinds = expect if isinstance(expect, tuple) else (expect,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _check_type(value: Any, expect: type | tuple[type, ...] | None, name: str, error: type[UserError],
                language: str) -> Any:
    if expect is not None and not isinstance(value, expect):
        raise error(f"{name}: expected {_type_name(expect, language)} at the top level, got {type(value).__name__}")
    return value


def parse_json(text: str, name: str, expect: type | tuple[type, ...] | None = None,
               error: type[UserError] = DataFormatError) -> Any:
    """Parse JSON ``text`` (from ``name``, for messages), refusing bad syntax and deep nesting."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise error(f"{name}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    except RecursionError:
        raise error(f"{name}: refused: JSON nested too deeply") from None
    except ValueError as err:  # e.g. an integer of more digits than Python converts
        raise error(f"{name}: not valid JSON ({' '.join(str(err).split())[:200]})") from None
    return _check_type(value, expect, name, error, "JSON")


def read_json(path: str | os.PathLike, max_bytes: int, expect: type | tuple[type, ...] | None = None,
              error: type[UserError] = DataFormatError) -> Any:
    """JSON of ``path``: at most ``max_bytes``, UTF-8, of top-level type ``expect`` (None: any)."""
    return parse_json(read_text(path, max_bytes, error), str(path), expect, error)


MAX_YAML_DEPTH = 100  # nesting of [ / { in a YAML file: configs nest 3 levels
_BRACKETS = re.compile(r"[\[\]{}]")


class _AliasRefused(yaml.YAMLError):
    pass


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases: ``*name`` shares a node, and a few nested levels of
    shared lists expand to billions of nodes in anything that walks the result (the config's
    float fix-up, type checks, ``==``). No preset and no config vqa-align writes uses them."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.events.AliasEvent):
            event = self.peek_event()
            raise _AliasRefused(f"refused: a YAML alias (*{event.anchor}, line {event.start_mark.line + 1}); "
                                "aliases are not accepted here, write the value out")
        return super().compose_node(parent, index)


def _flow_depth(text: str) -> int:
    """Deepest nesting of ``[`` / ``{`` in ``text`` (brackets inside strings counted too: an upper bound)."""
    depth = deepest = 0
    for match in _BRACKETS.finditer(text):
        depth = depth + 1 if match.group() in "[{" else max(0, depth - 1)
        deepest = max(deepest, depth)
    return deepest


def parse_yaml(text: str, name: str, expect: type | tuple[type, ...] | None = None,
               error: type[UserError] = DataFormatError) -> Any:
    """Parse YAML ``text`` (from ``name``) with the safe loader, refusing aliases and deep nesting;
    an empty document is None."""
    if _flow_depth(text) > MAX_YAML_DEPTH:  # PyYAML's scanner is quadratic in the depth of [[[...
        raise error(f"{name}: refused: YAML nested more than {MAX_YAML_DEPTH} levels deep")
    try:
        value = yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except _AliasRefused as err:
        raise error(f"{name}: {err}") from None
    except yaml.YAMLError as err:
        raise error(f"{name}: not valid YAML ({' '.join(str(err).split())})") from None
    except RecursionError:
        raise error(f"{name}: refused: YAML nested too deeply") from None
    except ValueError as err:  # a value the constructor cannot convert, e.g. an integer of 5,000 digits
        raise error(f"{name}: not valid YAML ({' '.join(str(err).split())[:200]})") from None
    return _check_type(value, expect, name, error, "YAML") if value is not None else None


def read_yaml(path: str | os.PathLike, max_bytes: int = MAX_CONFIG_BYTES, expect: type | tuple[type, ...] | None = dict,
              error: type[UserError] = DataFormatError) -> Any:
    """YAML of ``path``: at most ``max_bytes``, UTF-8, no aliases; an empty file is None."""
    return parse_yaml(read_text(path, max_bytes, error), str(path), expect, error)


def check_file_size(path: str | os.PathLike, max_bytes: int, error: type[UserError] = DataFormatError) -> None:
    """Refuse ``path`` larger than ``max_bytes`` (for files a library parses itself, e.g. a tokenizer
    folder's JSON read by ``transformers``); a missing file is left to that reader."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError:
        return
    if size > max_bytes:
        raise _too_big(path, size, max_bytes, error)
