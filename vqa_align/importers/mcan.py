"""MCAN checkpoints of mcan-vqa and OpenVQA -> vqa-align run folders.

What the two code bases store and how it maps (facts read from MILVLG/mcan-vqa and
MILVLG/openvqa; none of their code is used here):

* the file is ``torch.save({'state_dict', 'optimizer', 'lr_base'[, 'epoch']})``; under
  DataParallel mcan-vqa's parameter names start with ``module.``. It is read with
  ``torch.load(weights_only=True)``: tensors and plain containers only, never pickled code.
* the network is MCAN as in :mod:`vqa_align.model.mcan` with four differences, all handled here:
  separate ``linear_q/k/v`` (fused into ``in_proj``), the LayerNorm ``a_2·(x−mean)/(std+eps)+b_2``
  with the unbiased std (``model.layer_norm: mcan``), no box features (``use_box_embedding: false``)
  and sigmoid scores (vqa-align keeps logits; the sigmoid of them is the original's output).
* question ids: PAD 0, UNK 1 (OpenVQA: CLS 2), then every word in order of first appearance over
  the train, val, test and VG question files, with MCAN's tokenisation (lower-case, delete
  ``.,'!?"()*#:;``, split on ``-``, ``/`` and whitespace). The vocabulary is rebuilt from the
  user's files and checked against the checkpoint's embedding size.
* answers: ``answer_dict.json`` = ``[answer -> index, index -> answer]``; its order is the
  classifier's order.
* architecture: every size is read from the tensors' shapes except the number of heads (8 in both
  code bases' MCAN-small and MCAN-large), which is an option.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vqa_align.config import Config, ConfigError, apply_overrides, config_from_dict, make_paths_absolute, save_config
from vqa_align.errors import UserError
from vqa_align.extract.backbones.base import sha256_of_file
from vqa_align.data.vqa_v2 import PAD_TOKEN, UNK_TOKEN, tokenize_question, word_level_tokenizer
from vqa_align.paths import check_output_paths
from vqa_align.runs.run_folder import check_replaceable, mark_run_folder
from vqa_align.untrusted_files import MAX_DATASET_JSON_BYTES, MAX_META_BYTES, read_json

MAX_TOKENS = 14  # MAX_TOKEN of both code bases: questions are cut after 14 words
MAX_REGIONS = 100  # IMG_FEAT_PAD_SIZE: at most 100 regions per image
DEFAULT_NUM_HEADS = 8  # MULTI_HEAD of MCAN-small and MCAN-large in both code bases
DATA_PARALLEL_PREFIX = "module."
QUESTION_FILE_ROLES = ("train", "val", "test", "vg")
# Siblings of --out: the import is built in OUT.importing, the folder it replaces waits in OUT.replaced.
IMPORTING_SUFFIX, REPLACED_SUFFIX = ".importing", ".replaced"


class ImportFailure(UserError, ValueError):
    """A checkpoint or one of its companion files cannot be imported; the message says why."""


@dataclass(frozen=True)
class Flavour:
    """What differs between the code bases: special tokens and the image projection's name."""

    name: str
    special_tokens: tuple[str, ...]  # ids 0, 1, ... before the words
    image_proj: str  # parameter prefix of the region-feature projection
    unsupported: dict[str, str]  # parameter prefix -> why it cannot be imported


FLAVOURS = {
    "mcan-vqa": Flavour("mcan-vqa", (PAD_TOKEN, UNK_TOKEN), "img_feat_linear", {}),
    "openvqa": Flavour(
        "openvqa", (PAD_TOKEN, UNK_TOKEN, "[CLS]"), "adapter.frcn_linear",
        {
            "adapter.bbox_linear": (
                "the model was trained with USE_BBOX_FEAT (a box embedding of x1, y1, x2, y2 and the box "
                "area concatenated to the features); vqa-align's box embedding cannot reproduce the area "
                "term, so such a model cannot be imported exactly"
            ),
            "adapter.grid_linear": "the model uses grid features (USE_AUX_FEAT), which vqa-align does not read",
        },
    ),
}


# ----------------------------------------------------------------------------------------------
# Reading the checkpoint without executing pickled code
# ----------------------------------------------------------------------------------------------


def read_state_dict(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(parameters without a DataParallel prefix, other plain entries such as lr_base / epoch) of a checkpoint.

    Accepts the training checkpoint ``{'state_dict': ..., ...}`` or a bare state dict. A file that
    holds anything but tensors and plain containers is refused, never unpickled.
    """
    path = Path(path)
    if not path.is_file():
        raise ImportFailure(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        # The restricted unpickler names the Python object it refused ("Unsupported global: GLOBAL x.y").
        if re.search(r"GLOBAL|Unsupported (global|class)", text):
            found = re.search(r"GLOBAL ([\w.]+)", text)
            what = f" (it needs {found.group(1)})" if found else ""
            raise ImportFailure(
                f"{path}: refused: the file stores Python objects that loading would have to execute{what}; "
                "vqa-align reads only tensors and plain containers (torch.load weights_only=True). "
                "Re-save it as torch.save({'state_dict': model.state_dict()}, FILE) from the code that made it"
            ) from None
        detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
        raise ImportFailure(
            f"{path}: not a readable PyTorch checkpoint ({detail.group(1).strip() if detail else text.splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ImportFailure(f"{path}: not a readable PyTorch checkpoint ({first})") from None
    if not isinstance(obj, dict):
        raise ImportFailure(f"{path}: expected a dict (a state dict or {{'state_dict': ...}}), got {type(obj).__name__}")
    if "state_dict" in obj:
        state, extra = obj["state_dict"], {k: v for k, v in obj.items() if k in ("lr_base", "epoch")}
    else:
        state, extra = obj, {}
    if not isinstance(state, dict) or not state:
        raise ImportFailure(f"{path}: 'state_dict' is empty or not a dict")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise ImportFailure(f"{path}: 'state_dict' entry {bad[0]!r} is not a named tensor")
    if all(k.startswith(DATA_PARALLEL_PREFIX) for k in state):  # saved from nn.DataParallel
        state = {k[len(DATA_PARALLEL_PREFIX):]: v for k, v in state.items()}
    extra = {k: v.item() if isinstance(v, Tensor) and v.numel() == 1 else v for k, v in extra.items()}
    return state, {k: v for k, v in extra.items() if isinstance(v, (int, float))}


# ----------------------------------------------------------------------------------------------
# Architecture and parameter names
# ----------------------------------------------------------------------------------------------


def _require(state: dict[str, Tensor], key: str, source: Path, flavour: Flavour) -> Tensor:
    if key not in state:
        raise ImportFailure(
            f"{source}: not an MCAN checkpoint of {flavour.name}: it has no parameter {key!r} "
            f"(first names: {', '.join(list(state)[:4])})"
        )
    return state[key]


def _layer_count(state: dict[str, Tensor], prefix: str) -> int:
    indices = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    if indices != set(range(len(indices))):
        raise ImportFailure(f"layers {sorted(indices)} under {prefix!r} are not numbered 0..n-1")
    return len(indices)


def infer_model_fields(state: dict[str, Tensor], flavour: Flavour, source: Path, num_heads: int) -> dict[str, Any]:
    """ModelConfig fields of the checkpoint, read from its tensor shapes."""
    for prefix, why in flavour.unsupported.items():
        if any(k.startswith(prefix + ".") for k in state):
            raise ImportFailure(f"{source}: cannot import: {why} (parameter {prefix}.weight)")
    vocab_size, embed_dim = _require(state, "embedding.weight", source, flavour).shape
    hidden = _require(state, "lstm.weight_hh_l0", source, flavour).shape[1]
    feature_dim = _require(state, f"{flavour.image_proj}.weight", source, flavour).shape[1]
    layers = _layer_count(state, "backbone.enc_list.")
    if layers == 0 or _layer_count(state, "backbone.dec_list.") != layers:
        raise ImportFailure(f"{source}: encoder and decoder must have the same number (>= 1) of layers")
    if hidden % num_heads:
        raise ImportFailure(f"{source}: hidden size {hidden} is not divisible by --num-heads {num_heads}")
    glimpses, flat_mlp = _require(state, "attflat_lang.mlp.linear.weight", source, flavour).shape
    return dict(
        hidden_size=int(hidden),
        num_heads=int(num_heads),
        ffn_size=int(_require(state, "backbone.enc_list.0.ffn.mlp.fc.linear.weight", source, flavour).shape[0]),
        num_layers=layers,
        flat_mlp_size=int(flat_mlp),
        flat_glimpses=int(glimpses),
        flat_size=int(_require(state, "attflat_lang.linear_merge.weight", source, flavour).shape[0]),
        fusion="sum",
        classifier_hidden=0,
        feature_dim=int(feature_dim),
        use_box_embedding=False,
        question_encoder="lstm",
        word_embed_dim=int(embed_dim),
        layer_norm="mcan",
        vocab_size=int(vocab_size),
        num_answers=int(_require(state, "proj.weight", source, flavour).shape[0]),
    )


def _linear(src: str, dst: str) -> list[tuple[str, str]]:
    return [(f"{src}.weight", f"{dst}.weight"), (f"{src}.bias", f"{dst}.bias")]


def _norm(src: str, dst: str) -> list[tuple[str, str]]:
    return [(f"{src}.a_2", f"{dst}.weight"), (f"{src}.b_2", f"{dst}.bias")]


Fused = tuple[tuple[str, str, str], str]  # (q, k, v) source names -> one vqa-align name


def _attention(src: str, dst: str) -> tuple[list[tuple[str, str]], list[Fused]]:
    """(one-to-one names, (q, k, v) names fused into in_proj) of one attention module."""
    fused: list[Fused] = [
        ((f"{src}.linear_q.{kind}", f"{src}.linear_k.{kind}", f"{src}.linear_v.{kind}"), f"{dst}.in_proj.{kind}")
        for kind in ("weight", "bias")  # in_proj = [Wq; Wk; Wv], as nn.MultiheadAttention
    ]
    return _linear(f"{src}.linear_merge", f"{dst}.out_proj"), fused


def _feed_forward(src: str, dst: str) -> list[tuple[str, str]]:
    # MLP(FC(Linear, ReLU, Dropout), Linear) -> Sequential(Linear, ReLU, Dropout, Linear): indices 0 and 3.
    return _linear(f"{src}.mlp.fc.linear", f"{dst}.0") + _linear(f"{src}.mlp.linear", f"{dst}.3")


def parameter_map(flavour: Flavour, num_layers: int) -> tuple[list[tuple[str, str]], list[Fused]]:
    """(source -> vqa-align names, (q, k, v) source names -> fused vqa-align name) for the whole model."""
    one: list[tuple[str, str]] = [("embedding.weight", "question_encoder.embedding.weight")]
    one += [(f"lstm.{p}_l0", f"question_encoder.lstm.{p}_l0") for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    one += _linear(flavour.image_proj, "region_encoder.feature_proj")
    fused: list[Fused] = []
    for i in range(num_layers):
        src, dst = f"backbone.enc_list.{i}", f"encoder.{i}"
        o, f = _attention(f"{src}.mhatt", f"{dst}.self_attention")
        one += o + _feed_forward(f"{src}.ffn", f"{dst}.ffn") + _norm(f"{src}.norm1", f"{dst}.norm1") + _norm(f"{src}.norm2", f"{dst}.norm2")
        fused += f
        src, dst = f"backbone.dec_list.{i}", f"decoder.{i}"
        for mh, name in (("mhatt1", "self_attention"), ("mhatt2", "guided_attention")):
            o, f = _attention(f"{src}.{mh}", f"{dst}.{name}")
            one += o
            fused += f
        one += _feed_forward(f"{src}.ffn", f"{dst}.ffn")
        one += [pair for k in (1, 2, 3) for pair in _norm(f"{src}.norm{k}", f"{dst}.norm{k}")]
    for src, dst in (("attflat_lang", "question_flat"), ("attflat_img", "image_flat")):
        one += _linear(f"{src}.mlp.fc.linear", f"{dst}.mlp.0") + _linear(f"{src}.mlp.linear", f"{dst}.mlp.3")
        one += _linear(f"{src}.linear_merge", f"{dst}.merge")
    one += _norm("proj_norm", "fusion_norm") + _linear("proj", "classifier")
    return one, fused


def convert_state_dict(state: dict[str, Tensor], flavour: Flavour, num_layers: int, source: Path) -> dict[str, Tensor]:
    """The checkpoint's parameters under vqa-align's names; every parameter must be used exactly once."""
    one, fused = parameter_map(flavour, num_layers)
    needed = [s for s, _ in one] + [s for names, _ in fused for s in names]
    missing = [k for k in needed if k not in state]
    if missing:
        raise ImportFailure(
            f"{source}: not a complete {flavour.name} MCAN checkpoint: {len(missing)} parameter(s) missing, "
            f"e.g. {', '.join(missing[:3])}"
        )
    unused = sorted(set(state) - set(needed))
    if unused:
        raise ImportFailure(
            f"{source}: {len(unused)} parameter(s) have no counterpart in vqa-align's MCAN, e.g. "
            f"{', '.join(unused[:3])} (a different model or an MCAN variant this importer does not know)"
        )
    out = {dst: state[src] for src, dst in one}
    for names, dst in fused:
        out[dst] = torch.cat([state[n] for n in names], dim=0)  # (3·D, D) or (3·D,)
    return {k: v.detach().float().contiguous() for k, v in out.items()}


# ----------------------------------------------------------------------------------------------
# Vocabulary and answers
# ----------------------------------------------------------------------------------------------


def _read_json(path: Path, what: str) -> Any:
    """A user's JSON file, or an ImportFailure naming it (``what``: e.g. "questions file")."""
    if not path.is_file():
        raise ImportFailure(f"{what} not found: {path}")
    return read_json(path, MAX_DATASET_JSON_BYTES, error=ImportFailure)


def _question_texts(path: Path) -> list[str]:
    """The ``question`` strings of a VQA-format questions file, in file order."""
    data = _read_json(path, "questions file")
    questions = data.get("questions") if isinstance(data, dict) else None
    if not isinstance(questions, list):
        raise ImportFailure(f"{path}: not a VQA questions file (no 'questions' list)")
    texts = []
    for i, q in enumerate(questions):
        if not isinstance(q, dict) or not isinstance(q.get("question"), str):
            raise ImportFailure(f"{path}: question record {i} has no string 'question'")
        texts.append(q["question"])
    return texts


def rebuild_vocabulary(question_files: list[Path], specials: tuple[str, ...]) -> tuple[dict[str, int], list[int]]:
    """(word -> id, number of new words each file adds) in the order of first appearance."""
    vocab = {token: i for i, token in enumerate(specials)}
    added = []
    for path in question_files:
        before = len(vocab)
        for text in _question_texts(path):
            for word in tokenize_question(text):
                if word not in vocab:
                    vocab[word] = len(vocab)
        added.append(len(vocab) - before)
    return vocab, added


def check_vocabulary(vocab_size: int, embedding_rows: int, question_files: list[Path], added: list[int],
                     specials: tuple[str, ...], flavour: Flavour, source: Path) -> None:
    """Raise an ImportFailure naming the files when the rebuilt vocabulary cannot be the checkpoint's."""
    if vocab_size == embedding_rows:
        return
    parts = ", ".join(f"{role} {path.name}: {n:,}" for role, path, n in zip(QUESTION_FILE_ROLES, question_files, added))
    diff = embedding_rows - vocab_size
    hint = ""
    if len(question_files) < len(QUESTION_FILE_ROLES) and diff > 0:
        hint = f"; no VG questions file was given, and {flavour.name} always counts it"
    raise ImportFailure(
        f"{source}: the word embedding has {embedding_rows:,} rows but the question files give {vocab_size:,} "
        f"tokens ({len(specials)} special + new words per file: {parts}), {abs(diff):,} "
        f"{'fewer' if diff > 0 else 'more'} than the checkpoint{hint}. Give the train, val, test [and VG] "
        "question files the model was trained with, in that order"
    )


def read_answer_dict(path: str | Path) -> list[str]:
    """Answers in classifier order from ``answer_dict.json`` = [answer -> index, index -> answer]."""
    path = Path(path)
    data = _read_json(path, "answer dictionary")
    if not (isinstance(data, list) and len(data) == 2 and all(isinstance(d, dict) for d in data)):
        raise ImportFailure(f"{path}: expected [answer_to_index, index_to_answer] (mcan-vqa's answer_dict.json)")
    to_index, to_answer = data
    answers = []
    for i in range(len(to_answer)):
        answer = to_answer.get(str(i))
        if not isinstance(answer, str):
            raise ImportFailure(f"{path}: index_to_answer has no answer for index {i} (expected keys '0'..'{len(to_answer) - 1}')")
        if to_index.get(answer) != i:
            raise ImportFailure(f"{path}: answer {answer!r} has index {i} in index_to_answer but {to_index.get(answer)!r} in answer_to_index")
        answers.append(answer)
    if len(to_index) != len(answers):
        raise ImportFailure(f"{path}: answer_to_index has {len(to_index)} answers, index_to_answer {len(answers)}")
    return answers


# ----------------------------------------------------------------------------------------------
# The import
# ----------------------------------------------------------------------------------------------


@dataclass
class ImportedModel:
    config: Config
    state: dict[str, Tensor]  # vqa-align parameter names
    answers: list[str]
    vocab: dict[str, int]
    meta: dict[str, Any]


def convert_checkpoint(
    flavour_name: str,
    checkpoint: str | Path,
    question_files: list[str | Path],
    answer_dict: str | Path,
    *,
    num_heads: int = DEFAULT_NUM_HEADS,
    data_overrides: list[str] | None = None,
) -> ImportedModel:
    """Read and check everything; nothing is written."""
    flavour = FLAVOURS[flavour_name]
    source = Path(checkpoint)
    files = [Path(p) for p in question_files]
    if not 3 <= len(files) <= 4:
        raise ImportFailure(f"--questions needs the train, val and test question files, and optionally VG; got {len(files)}")
    state, extra = read_state_dict(source)
    fields = infer_model_fields(state, flavour, source, num_heads)
    vocab, added = rebuild_vocabulary(files, flavour.special_tokens)
    check_vocabulary(len(vocab), fields["vocab_size"], files, added, flavour.special_tokens, flavour, source)
    answers = read_answer_dict(answer_dict)
    if len(answers) != fields["num_answers"]:
        raise ImportFailure(
            f"{answer_dict}: {len(answers):,} answers but the checkpoint's classifier ({source}) has "
            f"{fields['num_answers']:,} outputs; use the answer_dict.json the model was trained with"
        )
    converted = convert_state_dict(state, flavour, fields["num_layers"], source)

    data: dict[str, Any] = {
        "name": f"{flavour.name}_import",
        "model": {**fields, "dropout": 0.1, "alignment": {"method": "none"}},
        "data": {
            "dataset": "vqa_v2",
            # VG questions only shaped the vocabulary (meta.json); training on them needs their
            # annotations too, which the user adds with data.train_questions/train_annotations.
            "train_questions": [str(files[0])],
            "val_questions": [str(files[1])],
            "test_questions": [str(files[2])],
            "max_question_tokens": MAX_TOKENS,
            "max_regions": MAX_REGIONS,
        },
    }
    for text in data_overrides or []:
        if not text.split("=", 1)[0].strip().startswith("data."):
            raise ImportFailure(f"--set {text!r}: only data.* can be set on import (the model comes from the checkpoint)")
    try:
        # absolute paths: the run folder works from any directory
        config = make_paths_absolute(config_from_dict(apply_overrides(data, data_overrides or [])))
    except ConfigError as err:
        raise ImportFailure(str(err)) from None
    meta = {
        "imported_from": {
            "format": flavour.name,
            "checkpoint": str(source.resolve()),
            "sha256": sha256_of_file(source),
            **extra,  # lr_base, epoch
            "question_files": [str(p.resolve()) for p in files],
            "new_words_per_file": added,
            "answer_dict": str(Path(answer_dict).resolve()),
            "vocab_size": len(vocab),
            "num_answers": len(answers),
        },
        "epoch": int(extra.get("epoch", 0)),
        "global_step": 0,
    }
    return ImportedModel(config, converted, answers, vocab, meta)


def build_model(imported: ImportedModel) -> torch.nn.Module:
    """vqa-align's MCAN holding the imported weights (eval mode); shape mismatches are errors."""
    from vqa_align.model.mcan import MCAN

    model = MCAN(imported.config.model)
    try:
        model.load_state_dict(imported.state, strict=True)
    except RuntimeError as err:
        raise ImportFailure(f"the converted weights do not fit vqa-align's MCAN: {str(err).splitlines()[-1].strip()}") from None
    return model.eval()


def extractor_record(name: str, params: dict[str, Any] | None, feature_dim: int) -> dict[str, Any]:
    """The ``extractor`` entry of meta.json for a model trained on features of backbone ``name``.

    The backbone is built here exactly as ``vqa-align extract --backbone NAME --param ...`` builds it
    (same defaults, e.g. bottom-up's adaptive 10-100 boxes at 600 / 1000 px), and its own record is
    kept: name, parameters, the sha256 of its weights and where they are. ``predict --image`` and the
    app rebuild it from that record for a new photo and refuse other weights.
    """
    from vqa_align.extract.backbones import build_backbone

    try:
        backbone = build_backbone(name, params)
    except UserError as err:
        raise ImportFailure(f"--extractor {name}: {err} (the weights are hashed into the run, so that "
                            "answering about a photo uses the same ones; import without --extractor to "
                            "skip this)") from None
    info = backbone.info
    del backbone  # the detector's weights are not needed any more
    if info.feature_dim != feature_dim:
        raise ImportFailure(f"--extractor {name}: it gives {info.feature_dim}-d features but the checkpoint reads "
                            f"{feature_dim}-d ones; the model was not trained on this extractor's features")
    return json.loads(info.to_json())


def import_checkpoint(
    flavour_name: str,
    checkpoint: str | Path,
    question_files: list[str | Path],
    answer_dict: str | Path,
    out: str | Path,
    *,
    num_heads: int = DEFAULT_NUM_HEADS,
    data_overrides: list[str] | None = None,
    overwrite: bool = False,
    extractor: str | None = None,
    extractor_params: dict[str, Any] | None = None,
) -> Path:
    """Write a run folder ``out`` (config.yaml, checkpoints/last, README.md) holding the imported model.

    ``extractor``: the ``vqa-align extract`` backbone the model's features came from (``bottom-up``
    for the released mcan-vqa / OpenVQA models), with ``extractor_params`` as its ``--param``s;
    recorded so that the model can answer about new photos. The folder is built beside ``out`` and
    moved into place at the end, so a failed import leaves whatever ``out`` held untouched; an
    existing ``out`` needs ``overwrite``.
    """
    from vqa_align.runs.checkpoint import save_checkpoint
    from vqa_align.runs.model_card import write_model_card

    out = Path(out)
    check_output_paths([out, out.with_name(out.name + IMPORTING_SUFFIX), out.with_name(out.name + REPLACED_SUFFIX)],
                       [checkpoint, *question_files, answer_dict])
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise ImportFailure(f"{out} exists and is not empty; pass --overwrite to replace it")
        check_replaceable(out)  # only a run folder vqa-align wrote, holding only its files
    if extractor is None and extractor_params:
        raise ImportFailure("--extractor-param needs --extractor (the backbone they belong to)")
    imported = convert_checkpoint(flavour_name, checkpoint, question_files, answer_dict,
                                  num_heads=num_heads, data_overrides=data_overrides)
    if extractor is not None:
        imported.meta["extractor"] = extractor_record(extractor, extractor_params, imported.config.model.feature_dim)
    model = build_model(imported)
    tokenizer = word_level_tokenizer(imported.vocab, imported.config.data.max_question_tokens)
    if len(tokenizer) != imported.config.model.vocab_size:  # HF would add tokens it does not know
        raise ImportFailure(f"tokenizer has {len(tokenizer)} entries, the embedding {imported.config.model.vocab_size}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + IMPORTING_SUFFIX)
    if tmp.exists():
        check_replaceable(tmp, option="cleanup")  # a leftover of an interrupted import
        shutil.rmtree(tmp)
    tmp.mkdir()
    mark_run_folder(tmp)
    try:
        save_config(imported.config, tmp / "config.yaml")
        save_checkpoint(tmp / "checkpoints" / "last", model, imported.config, imported.answers, tokenizer,
                        meta=imported.meta)
        write_model_card(tmp, name=out.name)
        if out.exists():
            old = out.with_name(out.name + REPLACED_SUFFIX)
            if old.exists():
                check_replaceable(old, option="cleanup")
                shutil.rmtree(old)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def run_import(args: Any) -> int:
    """``vqa-align import mcan-vqa|openvqa CKPT --questions ... --answers ... --out RUN``."""
    data_overrides = list(getattr(args, "overrides", []) or [])
    if getattr(args, "features", None):
        data_overrides.append(f"data.features={json.dumps(str(args.features))}")
    if getattr(args, "val_annotations", None):
        data_overrides.append(f"data.val_annotations={json.dumps([str(args.val_annotations)])}")
    from vqa_align.extract.pipeline import parse_param_items

    out = import_checkpoint(
        args.format, args.checkpoint, args.questions, args.answers, args.out,
        num_heads=args.num_heads, data_overrides=data_overrides, overwrite=args.overwrite,
        extractor=getattr(args, "extractor", None),
        extractor_params=parse_param_items(getattr(args, "extractor_param", None) or []),
    )
    meta = read_json(out / "checkpoints" / "last" / "meta.json", MAX_META_BYTES, expect=dict)["imported_from"]
    from vqa_align.runs.checkpoint import load_config_of

    model = load_config_of(out).model
    print(json.dumps({
        "run": str(out), "format": meta["format"], "layers": model.num_layers, "hidden_size": model.hidden_size,
        "heads": model.num_heads, "vocab_size": meta["vocab_size"], "answers": meta["num_answers"],
        "extractor": getattr(args, "extractor", None),
    }, indent=2))
    return 0
