#!/usr/bin/env bash
# End-to-end trainer throughput on a GPU at MCAN-small widths on the prepared easy-VQA store (run
# `vqa-align quickstart` or prepare easy-VQA into $VQA_ALIGN_CACHE first). Each entry of CONFIGS is
# method:resident:cuda_graphs (default: DataLoader vs data.resident for none and ct); BATCH sets the
# batch size (default 1024). Prints the median samples/s of 10-step windows per run and copies each
# run's metrics.jsonl to ${OUT:-/tmp}. Results: BENCHMARKS.md ("the trainer itself").
set -u
export PYTHONUNBUFFERED=1
OUT_DIR=${OUT:-/tmp}
CONFIGS=${CONFIGS:-"none:false:false none:true:false ct:false:false ct:true:false"}
COMMON="--set train.device=cuda --set train.epochs=3 --set train.batch_size=${BATCH:-1024} --set train.log_every_steps=10 \
 --set data.eval_subset=2000 --set model.hidden_size=512 --set model.num_heads=8 --set model.ffn_size=2048 \
 --set model.num_layers=6 --set model.flat_mlp_size=512 --set model.flat_size=1024 --set model.word_embed_dim=300 \
 --set model.alignment.helper_hidden=64 --set model.alignment.helper_out=32 --set train.lr=1e-4"
for entry in $CONFIGS; do
  IFS=: read -r method res graphs <<< "$entry"
  workers=6; [ "$res" = true ] && workers=0
  run=/tmp/vqa_align_trainer_${method}_${res}_${graphs}
  timeout 300 python3 -m vqa_align.cli train --config configs/easy_vqa.yaml --out "$run" --overwrite \
    $COMMON --set model.alignment.method=$method --set data.resident=$res --set data.num_workers=$workers \
    --set train.cuda_graphs=$graphs > "$run.log" 2>&1 || { echo "FAILED $entry"; tail -5 "$run.log"; continue; }
  python3 - "$run/metrics.jsonl" "$method" "$res" "$workers" "$graphs" <<'PY'
import json, statistics, sys
path, method, res, workers, graphs = sys.argv[1:]
rows = [json.loads(line) for line in open(path)]
sps = [r["samples_per_s"] for r in rows if r.get("kind") == "train"]
epochs = [(r["epoch"], round(r["epoch_seconds"], 2), round(r.get("val_accuracy", 0), 2)) for r in rows if r.get("kind") == "epoch"]
median = round(statistics.median(sps[2:])) if len(sps) > 2 else None
print(f"{method} resident={res} workers={workers} cuda_graphs={graphs} windows {[round(s) for s in sps]} median after 2: {median} epochs (n, s, val acc): {epochs}")
PY
  cp "$run/metrics.jsonl" "$OUT_DIR/metrics_${method}_${res}_${graphs}.jsonl"
done
