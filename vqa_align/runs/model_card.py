"""The model card ``README.md`` of a run folder: what the model is, what it was trained on, which
extractor makes its image features, how well it did, and how to load it.

One writer for every run: training writes it with each ``last`` checkpoint, ``vqa-align import``
when the run is made, and ``vqa-align eval`` refreshes it with the scores it measured (kept in
``RUN/eval/evaluations.json``, which the card is rendered from). It is rendered from the run's
files only (``config.yaml``, ``checkpoints/{last,best}/meta.json``, ``eval/evaluations.json``),
so writing it again always gives the same card for the same run. The front matter (``---``) is
what the Hugging Face Hub reads when the folder is uploaded as a model repository.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any

import yaml

CARD_FILE = "README.md"
EVAL_DIR = "eval"
EVALUATIONS_FILE = "evaluations.json"  # in RUN/eval/: one entry per (checkpoint, split, noise)
IMPORTED_TRAINING_DATA = {  # what the released models of each code base were trained on
    "mcan-vqa": "VQA v2 train + val + Visual Genome questions (the released checkpoints): val is part of "
                "their training data, so a val score flatters them; score them on test-dev (EvalAI)",
    "openvqa": "the splits of its TRAIN_SPLIT setting (train+val+vg for the released models): a val score of "
               "a model trained on val flatters it; score it on test-dev (EvalAI)",
}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _atomic_write(path: Path, text: str) -> None:
    """Write beside and rename: never a half card, and a symlink in its place is replaced, not followed."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Scores measured by `vqa-align eval`
# ----------------------------------------------------------------------------------------------


def record_evaluation(run: Path, checkpoint: Path, metrics: dict[str, Any]) -> None:
    """Keep the headline numbers of one evaluation in ``RUN/eval/evaluations.json`` (newest per
    checkpoint, split and feature noise) and write the card again."""
    if "accuracy" not in metrics:
        return  # a split without answers (test): nothing to show
    path = run / EVAL_DIR / EVALUATIONS_FILE
    entries = _read_json(path)
    entries = [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []
    # The top level holds the clean numbers; an evaluation with --noise-std adds its "noisy" block.
    measured = [(0.0, metrics)]
    if isinstance(metrics.get("noisy"), dict):
        measured.append((metrics.get("noise_std", 0.0), metrics["noisy"]))
    same = ("checkpoint", "split", "noise_std")
    for noise_std, numbers in measured:
        entry = {
            "checkpoint": checkpoint.name, "split": metrics.get("split"), "noise_std": noise_std,
            "questions": metrics.get("questions"), "accuracy": numbers["accuracy"],
            "per_answer_type": numbers.get("perAnswerType", {}), "date": datetime.date.today().isoformat(),
        }
        entries = [e for e in entries if any(e.get(k) != entry[k] for k in same)] + [entry]
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, json.dumps(entries, indent=2))
    write_model_card(run)


# ----------------------------------------------------------------------------------------------
# The card
# ----------------------------------------------------------------------------------------------


def _model_line(model: dict[str, Any]) -> str:
    align = (model.get("alignment") or {}).get("method", "none")
    aligned = "no alignment" if align == "none" else f"alignment attention ({align.upper()})"
    return (f"MCAN, {model.get('num_layers')} encoder-decoder layers, hidden size {model.get('hidden_size')}, "
            f"{model.get('num_heads')} heads, {model.get('question_encoder', 'lstm')} question encoder, "
            f"{model.get('num_answers')} answers, {aligned}")


def _data_lines(data: dict[str, Any], imported: dict[str, Any] | None) -> list[str]:
    lines = []
    if imported:
        fmt = imported.get("format", "?")
        epoch = f", epoch {imported['epoch']}" if "epoch" in imported else ""
        lines.append(f"- Imported from a **{fmt}** checkpoint (`{Path(str(imported.get('checkpoint', '?'))).name}`, "
                     f"sha256 `{str(imported.get('sha256', ''))[:12]}…`{epoch}), not trained by vqa-align.")
        lines.append(f"- Training data of the original: {IMPORTED_TRAINING_DATA.get(fmt, 'see its code base')}.")
        files = [Path(str(p)).name for p in imported.get("question_files", [])]
        lines.append(f"- Vocabulary rebuilt from: {', '.join(f'`{f}`' for f in files)}.")
        return lines
    dataset = data.get("dataset", "?")
    lines.append(f"- Data set: **{dataset}**.")
    for split in ("train", "val"):
        files = [Path(str(p)).name for p in data.get(f"{split}_questions") or []]
        if files:
            lines.append(f"- {split} questions: {', '.join(f'`{f}`' for f in files)}.")
    if data.get("subset"):
        lines.append(f"- Only the first {data['subset']} training questions were used.")
    return lines


def _extractor_lines(extractor: dict[str, Any] | None, data: dict[str, Any]) -> list[str]:
    if extractor:
        params = ", ".join(f"{k}={v}" for k, v in sorted((extractor.get("params") or {}).items()))
        sha = str(extractor.get("weights_sha256", ""))
        return [
            f"- `{extractor.get('name')}` ({params or 'default parameters'}), {extractor.get('feature_dim')}-d "
            f"features{f', weights sha256 `{sha[:12]}…`' if sha else ''}.",
            "- A new photo goes through this extractor (`vqa-align predict --image`, the app's upload); "
            f"weights: `vqa-align extract --download --backbone {extractor.get('name')}`.",
        ]
    if data.get("dataset") == "easy_vqa" and not data.get("easy_vqa_backbone"):
        return ["- vqa-align's built-in region extractor (`vqa_align/extract/regions.py`, no weights): "
                "it answers about new pictures."]
    return ["- Features from a store that records no extractor (converted public features): the model answers "
            "about the store's images only. For bottom-up-attention features import it with "
            "`--extractor bottom-up`."]


def _accuracy_lines(meta: dict[str, Any], best: dict[str, Any], evaluations: list[dict[str, Any]],
                    name: str) -> list[str]:
    lines = []
    shown = [e for e in evaluations if not e.get("noise_std")]
    if shown:
        lines += ["| checkpoint | split | questions | VQA accuracy (%) | per answer type |", "|---|---|---|---|---|"]
        for e in shown:
            types = ", ".join(f"{k} {v:.2f}" for k, v in sorted((e.get("per_answer_type") or {}).items()))
            lines.append(f"| {e.get('checkpoint')} | {e.get('split')} | {e.get('questions')} | "
                         f"{float(e['accuracy']):.2f} | {types} |")
        lines += ["", "Measured with `vqa-align eval` (official VQA metric) on the dates in `eval/evaluations.json`."]
    score = best.get("best_val_accuracy", meta.get("best_val_accuracy"))
    if isinstance(score, (int, float)) and score >= 0:
        lines.append(f"- Best validation accuracy during training: {score:.2f} % (epoch {best.get('epoch', '?')}).")
    if not lines and meta.get("imported_from"):
        lines.append(f"- Not evaluated yet. `vqa-align eval --checkpoint {name} --split val` fills this in; for a "
                     f"model trained on val, `vqa-align eval --checkpoint {name} --split test --results-out "
                     "results.json` gives the answers to upload to EvalAI (test-dev).")
    elif not lines:
        lines.append(f"- Not evaluated yet: `vqa-align eval --checkpoint {name} --split val` fills this in.")
    return lines


def render_model_card(run: Path, name: str | None = None) -> str:
    """The card's Markdown for run folder ``run`` (from its files only); ``name``: the folder's final
    name when ``run`` is still a staged sibling (``NAME.new``, ``NAME.importing``)."""
    folder = name or run.name
    config = _read_yaml(run / "config.yaml")
    model, data = config.get("model") or {}, config.get("data") or {}
    meta = _read_json(run / "checkpoints" / "last" / "meta.json") or {}
    best = _read_json(run / "checkpoints" / "best" / "meta.json") or {}
    evaluations = _read_json(run / EVAL_DIR / EVALUATIONS_FILE)
    evaluations = [e for e in evaluations if isinstance(e, dict) and "accuracy" in e] if isinstance(evaluations, list) else []
    imported = meta.get("imported_from") if isinstance(meta.get("imported_from"), dict) else None
    extractor = meta.get("extractor") if isinstance(meta.get("extractor"), dict) else None
    title = config.get("name", folder)
    tags = ["vqa-align", "visual-question-answering", "mcan"]
    if (model.get("alignment") or {}).get("method", "none") != "none":
        tags.append("alignment-attention")
    example_image = "photo.jpg" if (extractor or data.get("dataset") == "easy_vqa") else None
    ask = f'image="{example_image}"' if example_image else "image_id=42"
    cli_image = f"--image {example_image}" if example_image else "--image-id 42"
    parts = [
        "---", yaml.safe_dump({"library_name": "vqa-align", "tags": tags, "pipeline_tag": "visual-question-answering"},
                              sort_keys=False).strip(), "---", "",
        f"# {title}", "", _model_line(model) + ".", "",
        "## What it was trained on", "", *_data_lines(data, imported), "",
        "## Image features", "", *_extractor_lines(extractor, data), "",
        "## Accuracy", "", *_accuracy_lines(meta, best, evaluations, folder), "",
        "## How to use it", "",
        "This folder is a vqa-align run; load it from here or, once uploaded "
        "(`huggingface-cli upload USER/REPO RUN_FOLDER`), by its Hub id:", "",
        "```python", "from vqa_align import Predictor",
        f'predictor = Predictor.from_pretrained("{folder}")  # this folder, or "USER/REPO"',
        f'print(predictor.answer("what is in the picture?", {ask}).answer)', "```", "",
        "```bash",
        f'vqa-align predict --checkpoint {folder} {cli_image} --question "what is in the picture?"',
        f"vqa-align eval    --checkpoint {folder} --split val",
        f"vqa-align demo    --checkpoint {folder}", "```", "",
        "_Written by vqa-align from the run's config.yaml, checkpoint metadata and evaluations; "
        "it is rewritten when the run trains or is evaluated._", "",
    ]
    return "\n".join(parts)


def write_model_card(run: str | Path, name: str | None = None) -> Path:
    """Write (or refresh) ``RUN/README.md``; returns its path (``name``: see :func:`render_model_card`)."""
    run = Path(run)
    path = run / CARD_FILE
    _atomic_write(path, render_model_card(run, name))
    return path
