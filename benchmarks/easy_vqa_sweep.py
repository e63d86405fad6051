"""Run several easy-VQA trainings side by side and tabulate validation accuracy per epoch.

Used to choose the `configs/easy_vqa.yaml` preset (see BENCHMARKS.md). Each variant is a list of
`--set` overrides on top of the preset; all run as parallel processes (give each a share of the
cores with --threads), e.g. on a many-core or GPU machine:

    python benchmarks/easy_vqa_sweep.py --out /tmp/sweep --threads 2 --device cuda \
        --variant base= --variant lr5e-4=train.lr=5e-4 --variant l3=model.num_layers=3

Prints a JSON table {variant: {epoch: val_accuracy}} and writes it to OUT/sweep.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, rest = text.partition("=")
    overrides = [o for o in rest.split(",") if o] if rest else []
    return name, overrides


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "easy_vqa.yaml"))
    parser.add_argument("--variant", action="append", required=True,
                        help="NAME=key=value,key=value (comma-separated --set overrides)")
    parser.add_argument("--set", dest="common", action="append", default=[], help="overrides for every variant")
    parser.add_argument("--out", required=True)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--timeout", type=float, default=540.0, help="seconds before unfinished runs are stopped")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    procs = {}
    start = time.time()
    for text in args.variant:
        name, overrides = parse_variant(text)
        cmd = [sys.executable, "-m", "vqa_align.cli", "train", "--config", args.config, "--out", str(out / name),
               "--overwrite", "--set", f"train.device={args.device}"]
        for o in args.common + overrides:
            cmd += ["--set", o]
        log = open(out / f"{name}.log", "w")
        procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO), log)
    while any(p.poll() is None for p, _ in procs.values()) and time.time() - start < args.timeout:
        time.sleep(2)
    table: dict[str, dict[str, object]] = {}
    for name, (proc, log) in procs.items():
        if proc.poll() is None:
            proc.kill()
        log.close()
        metrics = out / name / "metrics.jsonl"
        epochs = []
        if metrics.is_file():
            epochs = [json.loads(l) for l in metrics.read_text().splitlines() if '"kind": "epoch"' in l]
        table[name] = {
            "returncode": proc.returncode,
            "val_accuracy": {r["epoch"]: round(r.get("val_accuracy", float("nan")), 2) for r in epochs},
            "yes_no": {r["epoch"]: round(r.get("val_accuracy/yes/no", float("nan")), 2) for r in epochs},
            "epoch_seconds": [round(r["epoch_seconds"], 1) for r in epochs],
        }
        if proc.returncode not in (0, None):
            table[name]["log_tail"] = (out / f"{name}.log").read_text()[-1500:]
    (out / "sweep.json").write_text(json.dumps(table, indent=1))
    print(json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
