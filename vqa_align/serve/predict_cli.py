"""``vqa-align predict``: answer one question about one image and print the result as JSON."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from vqa_align.errors import UserError
from vqa_align.serve.prediction import InputError
from vqa_align.serve.startup import configure_threads, load_predictor


def run_predict(args: argparse.Namespace) -> int:
    """``vqa-align predict``: print the answer, top-k and notes as JSON (``--questions``: write
    the answers to a whole questions file in the official results format)."""
    if getattr(args, "questions", None):
        return _run_questions_file(args)
    if not getattr(args, "question", None):
        raise UserError("--question is required with --image-id or --image")
    predictor = load_predictor(getattr(args, "checkpoint", None))
    configure_threads(predictor)
    try:
        pred = predictor.answer(
            args.question,
            image_id=getattr(args, "image_id", None),
            image=getattr(args, "image", None),
            top_k=getattr(args, "top_k", 5),
        )
    except InputError as err:
        raise UserError(str(err)) from None
    result = pred.to_dict()
    result["elapsed_ms"] = round(pred.elapsed_ms, 1)
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


def _run_questions_file(args: argparse.Namespace) -> int:
    """``vqa-align predict --questions FILE --out results.json``: the checkpoint evaluation's loop
    over the file's questions; the results file is what ``vqa-align score`` reads."""
    from vqa_align.evaluate.evaluator import answer_questions_file
    from vqa_align.paths import default_checkpoint_path

    if getattr(args, "question", None):
        raise UserError("--question goes with --image-id or --image; --questions answers every question of a file")
    if not getattr(args, "out", None):
        raise UserError("--questions needs --out, the results JSON to write")
    out = Path(args.out).expanduser()
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it")
    checkpoint = args.checkpoint or default_checkpoint_path()
    results = answer_questions_file(checkpoint, args.questions, batch_size=args.batch_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(results, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, out)  # a half-written results file never replaces a finished one
    print(json.dumps({"questions": len(results), "results_file": str(out)}, indent=2))
    return 0
