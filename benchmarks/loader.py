"""Training DataLoader throughput (samples/s) and peak RSS on a synthetic feature store.

MCAN-small shapes: 2048-d bottom-up-attention-like features, 10-100 regions per image (mean ~32,
and a fixed-100 variant), 3,129 answers, batch 64, 2 workers, one question per image, ~20k
images written to a temporary folder (deleted afterwards).

    python benchmarks/loader.py                 # both variants, human-readable
    python benchmarks/loader.py --json          # one JSON object

Peak RSS: the main process's (``ru_maxrss``, the store is written in a child process so that it
does not count) and the largest worker's (``RUSAGE_CHILDREN`` once the workers have exited).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from vqa_align.data.loaders import VQADataset, make_loader
from vqa_align.extract.feature_store import FeatureStore, FeatureStoreWriter
from vqa_align.data.vqa_v2 import QuestionRecord, build_tokenizer

FEATURE_DIM = 2048
NUM_ANSWERS = 3129
MIN_REGIONS, MAX_REGIONS = 10, 100
MEAN_EXTRA_REGIONS = 22  # 10 + Exp(22), clipped at 100 -> mean ~32 (like the 10-100 adaptive files)
RANDOM_ROWS = 4096  # distinct random feature rows, sliced per image (generating 2 GB of noise is slow)
WORDS = "what is the color of man woman dog cat table shirt holding left right many how".split()


def region_counts(n: int, fixed: int | None, rng: np.random.Generator) -> np.ndarray:
    if fixed is not None:
        return np.full(n, fixed, np.int64)
    extra = rng.exponential(MEAN_EXTRA_REGIONS, n)
    return np.clip(MIN_REGIONS + np.round(extra), MIN_REGIONS, MAX_REGIONS).astype(np.int64)


def write_store(path: Path, counts: np.ndarray, seed: int) -> None:
    rng = np.random.default_rng(seed)
    pool = rng.random((RANDOM_ROWS + MAX_REGIONS, FEATURE_DIM), dtype=np.float32).astype(np.float16)
    with FeatureStoreWriter(path, source="synthetic benchmark", overwrite=True) as w:
        for i, n in enumerate(counts):
            start = int(rng.integers(0, RANDOM_ROWS))
            xy = rng.random((n, 2), dtype=np.float32) * 300
            boxes = np.concatenate([xy, xy + 1 + rng.random((n, 2), dtype=np.float32) * 300], 1)
            w.add(i, pool[start:start + n], boxes, (640, 480))


def synthetic_records(n: int, rng: np.random.Generator) -> list[QuestionRecord]:
    answers = [f"answer{k}" for k in range(NUM_ANSWERS)]
    recs = []
    for i in range(n):
        q = " ".join(rng.choice(WORDS, int(rng.integers(4, 15)))) + "?"
        ans = tuple(answers[int(k)] for k in rng.integers(0, NUM_ANSWERS, 10))
        recs.append(QuestionRecord(i, i, q, "synthetic", ans, ans[0], "other", "what is"))
    return recs


def _cpu_seconds(loader) -> float:
    """user + system CPU seconds of this process and the loader's live workers (from /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    pids = [os.getpid()] + [w.pid for w in getattr(loader._iterator, "_workers", [])]
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def run(images: int, fixed: int | None, batch_size: int, workers: int, seed: int, folder: Path) -> dict:
    rng = np.random.default_rng(seed)
    counts = region_counts(images, fixed, rng)
    path = folder / f"store_{fixed or 'var'}.h5"
    t0 = time.perf_counter()
    proc = mp.get_context("fork").Process(target=write_store, args=(path, counts, seed))
    proc.start()
    proc.join()
    if proc.exitcode:
        raise RuntimeError("writing the synthetic store failed")
    write_s = time.perf_counter() - t0
    store = FeatureStore(path)
    records = synthetic_records(images, rng)
    tok = build_tokenizer((r.question for r in records), 14)
    answers = [f"answer{k}" for k in range(NUM_ANSWERS)]
    ds = VQADataset(records, store, tok, max_tokens=14, max_regions=MAX_REGIONS, answers=answers)
    loader = make_loader(ds, batch_size, shuffle=True, seed=seed, num_workers=workers, bucket=True,
                         pin_memory=False)
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    cpu0 = _cpu_seconds(loader)
    load0 = os.getloadavg()[0]
    t0, n = time.perf_counter(), 0
    padded = 0
    for batch in it:
        n += len(batch["question_ids"])
        padded += batch["features"].shape[1] * len(batch["question_ids"])
    elapsed = time.perf_counter() - t0
    cpu = _cpu_seconds(loader) - cpu0
    del it, loader  # persistent workers exit here, so RUSAGE_CHILDREN sees them
    main_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    worker_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {
        "variant": f"fixed {fixed}" if fixed else "10-100 regions",
        "images": images, "mean_regions": float(counts.mean()),
        "store_gb": path.stat().st_size / 1e9, "write_s": round(write_s, 1),
        "samples": n, "seconds": round(elapsed, 2), "samples_per_s": round(n / elapsed, 1),
        # CPU time of main + workers per sample: independent of other load on the machine
        "cpu_us_per_sample": round(cpu / n * 1e6, 1),
        "cpu_bound_samples_per_s_on_2_cores": round(2 * n / cpu, 1),
        "load_average_before": round(load0, 2),
        "padding_fraction": round(1 - counts.sum() / max(padded, 1) * n / images, 3) if not fixed else 0.0,
        "peak_rss_main_mb": round(main_rss, 1), "peak_rss_worker_mb": round(worker_rss, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=20_000)
    p.add_argument("--fixed-images", type=int, default=None, help="images of the fixed-100 variant (default: --images)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default="var,fixed", help="comma list of var, fixed")
    p.add_argument("--tmp", default=None, help="folder for the temporary stores")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for v in args.variants.split(","):
            fixed = MAX_REGIONS if v == "fixed" else None
            n = (args.fixed_images or args.images) if fixed else args.images
            results.append(run(n, fixed, args.batch_size, args.workers, args.seed, Path(tmp)))
            (Path(tmp) / f"store_{fixed or 'var'}.h5").unlink()
    out = {"batch_size": args.batch_size, "workers": args.workers, "feature_dim": FEATURE_DIM, "results": results}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for r in results:
            print(f"{r['variant']:>15}: {r['samples_per_s']:8.1f} samples/s ({r['cpu_us_per_sample']:.0f} CPU-us/sample, "
                  f"load {r['load_average_before']})  peak RSS main {r['peak_rss_main_mb']:.0f} MB, "
                  f"worker {r['peak_rss_worker_mb']:.0f} MB  ({r['images']} images, mean {r['mean_regions']:.1f} regions, "
                  f"store {r['store_gb']:.2f} GB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
