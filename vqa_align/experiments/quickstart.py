"""``vqa-align quickstart``: prepare easy-VQA, train the default aligned model, evaluate it."""

from __future__ import annotations

import argparse
import json
import shlex
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
    """Prepare easy-VQA if needed, train the default aligned model (or continue a stopped one,
    ``--resume``), evaluate it, say what next."""
    out = Path(args.out) if args.out else default_checkpoint_path()
    # --resume continues with the run's own config (its --set values), as `vqa-align train --resume` does.
    saved = out / "config.yaml"
    config = load_config(saved if args.resume and saved.is_file() else preset_path(QUICKSTART_PRESET), args.overrides)
    demo = "vqa-align demo" + (f" --checkpoint {shlex.quote(args.out)}" if args.out else "")
    if (out / "checkpoints" / "last").is_dir() and not (args.overwrite or args.resume):
        again = "vqa-align quickstart" + (f" --out {shlex.quote(args.out)}" if args.out else "")
        raise UserError(
            f"{out} already holds a quickstart run; open it with `{demo}`, continue it if it was stopped "
            f"with `{again} --resume`, or train it again with `{again} --overwrite`"
        )
    start = time.perf_counter()
    train_from_config(config, out, resume=args.resume, overwrite=args.overwrite)
    minutes = (time.perf_counter() - start) / 60
    metrics = evaluate_checkpoint(resolve_checkpoint(out), split="val")
    print(json.dumps({"run": str(out), "minutes": round(minutes, 2), **metrics}, indent=2))
    print(f"\ncheckpoint: {resolve_checkpoint(out)}")
    print(f"open the app:  {demo}")
    return 0
