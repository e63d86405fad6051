#!/usr/bin/env bash
# Issue 19's GPU measurement in one run (one H100/H200, < 10 min): writes $OUT/issue19.json.
#
#   OUT=/some/dir bash benchmarks/gpu_issue19.sh        # on the GPU machine, from the repo root
#   SMOKE=1 OUT=/tmp/x bash benchmarks/gpu_issue19.sh   # CPU, tiny shapes: checks the script
#   TRAIN=1 ...                                         # also the easy-VQA preset, fused vs Triton (+ ~8 min)
#
# 1. benchmarks/triton_check.py (1-3 min, most of it compiling on a fresh machine): the Triton CT/GAN kernels against the plain modules in
#    fp64 on the GPU (values, gradients of q, k and every weight; fp32 and bf16), a CUDA-graph
#    replay of each, and one aligner alone (Triton vs the fused PyTorch path) -> triton_check.json.
# 2. benchmarks/gpu.py (<= 6.5 min): MCAN-small, bf16, adaptive regions, batch 1024 then 512;
#    none, ot, and ct/gan once per model.alignment.kernels value (fused = the PyTorch path the issue
#    measured, triton = vqa_align/align/kernels/triton_ct.py, triton_gan.py); eager and as CUDA graphs (train.cuda_graphs'
#    mechanism); ms/step, peak memory -> gpu_steps.json (written after every measurement).
# 3. A summary -> issue19.json: per batch and mode, each variant's step and peak memory over
#    `none`'s (eager over eager none, graphs over none+graphs) and the issue's goals
#    (CT <= 1.15x, GAN <= 1.10x, CT peak memory <= 1.2x).
set -u
export PYTHONUNBUFFERED=1
OUT_DIR=${OUT:-/tmp/issue19}
mkdir -p "$OUT_DIR"
export VQA_ALIGN_CACHE=${VQA_ALIGN_CACHE:-/tmp/issue19_cache}
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())" \
  || python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), '(no triton)')"

if [ "${SMOKE:-0}" = 1 ]; then
  # The CPU runs the Triton kernels in Triton's interpreter.
  TRITON_INTERPRET=1 timeout 300 python3 benchmarks/triton_check.py --smoke --out-json "$OUT_DIR/triton_check.json"
  timeout 600 python3 benchmarks/gpu.py --smoke --kernels fused,triton --out-json "$OUT_DIR/gpu_steps.json"
  TRAIN_SET="--set train.device=cpu --set data.subset=64 --set data.eval_subset=64 --set train.epochs=1 --set data.easy_vqa_limit=200"
else
  timeout 200 python3 benchmarks/triton_check.py --out-json "$OUT_DIR/triton_check.json" || echo "triton_check FAILED or timed out"
  timeout 380 python3 benchmarks/gpu.py --batch-sizes 1024,512 --regions adaptive --methods none,ct,gan,ot \
    --kernels fused,triton --graphs none,ct,gan --compile off --steps 10 --warmup 3 --budget-s 330 \
    --out-json "$OUT_DIR/gpu_steps.json"
  TRAIN_SET="--set train.device=cuda"
fi

if [ "${TRAIN:-0}" = 1 ]; then
  # The issue's accuracy goal: the easy-VQA preset (AA-CT, same seed) through the current fused path
  # and through the Triton kernels must reach the same validation accuracy (within 0.2).
  runs=$(mktemp -d)  # a fresh folder: vqa-align train does not write into folders it did not create
  for kernels in fused triton; do
    run=$runs/ct_$kernels
    timeout 240 python3 -m vqa_align.cli train --config configs/easy_vqa.yaml --out "$run" $TRAIN_SET \
      --set model.alignment.method=ct --set model.alignment.kernels=$kernels > "$OUT_DIR/train_ct_$kernels.log" 2>&1 \
      || { echo "train ct[$kernels] FAILED"; tail -5 "$OUT_DIR/train_ct_$kernels.log"; continue; }
    cp "$run/metrics.jsonl" "$OUT_DIR/train_ct_$kernels.jsonl"
  done
fi

python3 - "$OUT_DIR" <<'PY'
import json, pathlib, statistics, sys
out = pathlib.Path(sys.argv[1])
summary = {"triton_check": None, "gpu_steps": None, "vs_none": [], "goals": {}, "train": {}}
for key, name in (("triton_check", "triton_check.json"), ("gpu_steps", "gpu_steps.json")):
    if (out / name).is_file():
        summary[key] = json.loads((out / name).read_text())
rows = (summary["gpu_steps"] or {}).get("results", [])
for layout, batch in sorted({(r["regions"], r["batch_size"]) for r in rows}):
    for graphs in (False, True):
        mode = [r for r in rows if (r["regions"], r["batch_size"]) == (layout, batch) and r["method"].endswith("+graphs") == graphs]
        base = next((r for r in mode if r["method"].removesuffix("+graphs") == "none"), None)
        for r in mode:
            if base is None or r is base:
                continue
            summary["vs_none"].append({
                "regions": layout, "batch_size": batch, "mode": "graphs" if graphs else "eager", "variant": r["method"].removesuffix("+graphs"),
                "ms_per_step": r["ms_per_step"], "step_ratio": r["ms_per_step"] / base["ms_per_step"],
                "peak_gib": r["peak_gpu_mem_gib"], "peak_ratio": r["peak_gpu_mem_gib"] / base["peak_gpu_mem_gib"],
            })
for v in summary["vs_none"]:
    goal = {"ct": 1.15, "gan": 1.10}.get(v["variant"].split("[")[0])
    if goal:
        met = v["step_ratio"] <= goal and (v["variant"].startswith("gan") or v["peak_ratio"] <= 1.2)
        summary["goals"][f"{v['variant']} {v['regions']} b{v['batch_size']} {v['mode']}"] = {
            "step_ratio": round(v["step_ratio"], 3), "peak_ratio": round(v["peak_ratio"], 3), "met": met}
for path in sorted(out.glob("train_*.jsonl")):
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    epochs = [r for r in lines if r.get("kind") == "epoch"]
    sps = [r["samples_per_s"] for r in lines if r.get("kind") == "train" and "samples_per_s" in r]
    summary["train"][path.stem.removeprefix("train_")] = {
        "val_accuracy_per_epoch": [r.get("val_accuracy") for r in epochs],
        "median_samples_per_s_after_2_windows": statistics.median(sps[2:]) if len(sps) > 2 else None,
    }
train = summary["train"]
if all(train.get(f"ct_{k}", {}).get("val_accuracy_per_epoch") for k in ("fused", "triton")):
    fused, triton = (train[f"ct_{k}"]["val_accuracy_per_epoch"][-1] for k in ("fused", "triton"))
    summary["goals"]["easy-VQA val accuracy, triton vs fused (within 0.2)"] = {
        "fused": fused, "triton": triton, "met": abs(triton - fused) <= 0.2}
(out / "issue19.json").write_text(json.dumps(summary, indent=2) + "\n")
print("triton_check ok:", (summary["triton_check"] or {}).get("ok"))
for v in summary["vs_none"]:
    print(f"{v['regions']:9} b{v['batch_size']:5d} {v['mode']:6} {v['variant']:12} {v['ms_per_step']:8.1f} ms  x{v['step_ratio']:.3f}  "
          f"peak {v['peak_gib']:.2f} GiB x{v['peak_ratio']:.3f}")
print(json.dumps(summary["goals"], indent=1))
PY
