#!/usr/bin/env bash
# Issue 19's GPU measurement in one run (one H100/H200, ~8-10 min): writes $OUT/issue19.json.
#
#   OUT=/some/dir bash benchmarks/gpu_issue19.sh        # on the GPU machine, from the repo root
#   SMOKE=1 OUT=/tmp/x bash benchmarks/gpu_issue19.sh   # CPU, tiny shapes: checks the script
#
# 1. benchmarks/gpu.py: MCAN-small, bf16, adaptive regions, batch 512 and 1024, none/ct/gan/ot,
#    eager and as CUDA graphs (train.cuda_graphs' mechanism), ms/step, ratio to none, peak memory
#    -> $OUT/gpu_steps.json (written after every measurement: a run cut short keeps what it measured).
# 2. `vqa-align train` on the easy-VQA store (the first run prepares it, ~15 s), the preset's seed,
#    none and ct, eager -> final validation accuracy and samples/s (the issue's accuracy goal:
#    the same validation accuracy as the CPU/earlier path, ±0.2) -> $OUT/train_<method>.jsonl.
# 3. A summary of both -> $OUT/issue19.json.
set -u
export PYTHONUNBUFFERED=1
OUT_DIR=${OUT:-/tmp/issue19}
mkdir -p "$OUT_DIR"
export VQA_ALIGN_CACHE=${VQA_ALIGN_CACHE:-/tmp/issue19_cache}
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())" \
  || python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

if [ "${SMOKE:-0}" = 1 ]; then
  timeout 600 python3 benchmarks/gpu.py --smoke --out-json "$OUT_DIR/gpu_steps.json"
  TRAIN_SET="--set train.device=cpu --set data.subset=64 --set data.eval_subset=64 --set train.epochs=1 --set data.easy_vqa_limit=200"
else
  timeout 480 python3 benchmarks/gpu.py --batch-sizes 512,1024 --regions adaptive --methods none,ct,gan,ot \
    --graphs none,ct,gan,ot --compile off --budget-s 420 --out-json "$OUT_DIR/gpu_steps.json"
  TRAIN_SET="--set train.device=cuda"
fi

for method in none ct; do
  run=/tmp/issue19_train_$method
  timeout 240 python3 -m vqa_align.cli train --config configs/easy_vqa.yaml --out "$run" --overwrite $TRAIN_SET \
    --set model.alignment.method=$method > "$OUT_DIR/train_$method.log" 2>&1 \
    || { echo "train $method FAILED"; tail -5 "$OUT_DIR/train_$method.log"; continue; }
  cp "$run/metrics.jsonl" "$OUT_DIR/train_$method.jsonl"
done

python3 - "$OUT_DIR" <<'PY'
import json, pathlib, statistics, sys
out = pathlib.Path(sys.argv[1])
summary = {"gpu_steps": None, "train": {}}
steps = out / "gpu_steps.json"
if steps.is_file():
    summary["gpu_steps"] = json.loads(steps.read_text())
for path in sorted(out.glob("train_*.jsonl")):
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    epochs = [r for r in rows if r.get("kind") == "epoch"]
    sps = [r["samples_per_s"] for r in rows if r.get("kind") == "train" and "samples_per_s" in r]
    summary["train"][path.stem.removeprefix("train_")] = {
        "val_accuracy_per_epoch": [r.get("val_accuracy") for r in epochs],
        "epoch_seconds": [r.get("epoch_seconds") for r in epochs],
        "median_samples_per_s_after_2_windows": statistics.median(sps[2:]) if len(sps) > 2 else None,
    }
(out / "issue19.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary["train"], indent=2))
PY
