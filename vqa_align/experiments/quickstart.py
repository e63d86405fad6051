"""``vqa-align quickstart``: prepare easy-VQA, train the default aligned model, evaluate it."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from vqa_align.config import load_config, preset_path
from vqa_align.errors import UserError
from vqa_align.evaluate.evaluator import evaluate_checkpoint
from vqa_align.runs.checkpoint import resolve_checkpoint
from vqa_align.paths import default_checkpoint_path  # where `vqa-align demo` looks
from vqa_align.train.trainer import train_from_config

QUICKSTART_PRESET = "easy_vqa.yaml"


def run_quickstart(args: argparse.Namespace) -> int:
    """Prepare easy-VQA if needed, train the default aligned model, evaluate it, say what next."""
    config = load_config(preset_path(QUICKSTART_PRESET), args.overrides)
    out = Path(args.out) if args.out else default_checkpoint_path()
    if (out / "checkpoints" / "last").is_dir() and not args.overwrite:
        raise UserError(
            f"{out} already holds a quickstart run; open it with `vqa-align demo`, "
            "or train it again with `vqa-align quickstart --overwrite`"
        )
    start = time.perf_counter()
    train_from_config(config, out, resume=False, overwrite=args.overwrite)
    minutes = (time.perf_counter() - start) / 60
    metrics = evaluate_checkpoint(resolve_checkpoint(out), split="val")
    print(json.dumps({"run": str(out), "minutes": round(minutes, 2), **metrics}, indent=2))
    print(f"\ncheckpoint: {resolve_checkpoint(out)}")
    print("open the app:  vqa-align demo")
    return 0
