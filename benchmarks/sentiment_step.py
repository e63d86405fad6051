"""Training-step time of the MiniLM sentence classifier with none / ct / gan alignment, interleaved.

Same real movie-train batches (batch 32, the experiment's preset) for every method; methods take
turns step by step so that a change of machine load hits all of them alike. Prints and writes JSON.

    python benchmarks/sentiment_step.py --steps 12 --out docs/results/sentiment/step_time.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    from vqa_align.experiments.grid import machine_info
    from vqa_align.sentiment.runner import SentenceBatches, SentenceTask, load_sentiment_config
    from vqa_align.train.trainer import Trainer

    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/sentiment_minilm.yaml")
    parser.add_argument("--methods", default="none,ct,gan")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out")
    args = parser.parse_args()
    methods = args.methods.split(",")
    scratch = Path(tempfile.mkdtemp(prefix="sentiment_step_"))  # the trainers' run folders, removed at the end
    trainers = {}
    for method in methods:
        config = load_sentiment_config(args.config, [f"model.alignment.method={method}", "data.eval_subset=8",
                                                     "data.dev_subset=8"])
        trainers[method] = Trainer(config, scratch / method, task=SentenceTask(config))  # type: ignore[arg-type]
    train_set = trainers[methods[0]].train_set
    lengths = np.array([len(x) for x in train_set.ids])
    rng = np.random.default_rng(0)
    batches = [rng.choice(len(lengths), 32, replace=False) for _ in range(args.steps + 2)]
    wall = {m: [] for m in methods}
    cpu = {m: [] for m in methods}
    for i, index in enumerate(batches):
        batch = next(iter(SentenceBatches(train_set, [index])))
        for method in methods:
            trainer = trainers[method]
            start, start_cpu = time.perf_counter(), time.process_time()
            trainer.step(trainer.task.inputs(batch), trainer.task.targets(batch), True)  # one optimizer step
            if i >= 2:  # the first steps warm the allocator
                wall[method].append(time.perf_counter() - start)
                cpu[method].append(time.process_time() - start_cpu)
    shutil.rmtree(scratch, ignore_errors=True)
    result = {"machine": machine_info(), "threads": torch.get_num_threads(), "steps": args.steps,
              "median_wall_seconds": {m: float(np.median(v)) for m, v in wall.items()},
              "median_cpu_seconds": {m: float(np.median(v)) for m, v in cpu.items()}}
    base = result["median_wall_seconds"].get("none")
    if base:
        result["wall_ratio_to_none"] = {m: v / base for m, v in result["median_wall_seconds"].items()}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
