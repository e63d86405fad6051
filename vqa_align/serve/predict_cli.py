"""``vqa-align predict``: answer one question about one image and print the result as JSON."""

from __future__ import annotations

import argparse
import json

from vqa_align.errors import UserError
from vqa_align.serve.prediction import InputError
from vqa_align.serve.startup import configure_threads, load_predictor


def run_predict(args: argparse.Namespace) -> int:
    """``vqa-align predict``: print the answer, top-k and notes as JSON."""
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
