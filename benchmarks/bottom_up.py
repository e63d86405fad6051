"""Speed of the bottom-up-attention detector (``vqa-align extract --backbone bottom-up``): images/s.

Runs the whole per-image path of extraction (preprocessing, backbone, RPN and proposal selection,
RoI pooling + res5 per box, heads, box selection) on COCO-sized pictures (skimage photos resized to
640 x 480 and 480 x 640, so the detector sees 800 x 1067 as on COCO), then times the two heavy
stages alone for a breakdown. Without ``--weights`` the weights are random (same architecture and
cost; with random weights every image gets ``min_boxes`` boxes, which does not change the cost:
res5 runs on all proposals either way).

CPU (what this machine measures)::

    python benchmarks/bottom_up.py --device cpu --threads 2 --batch-size 1 --batches 2

GPU (prepared for a one-H100/H200 session; goal >= 100 images/s in bf16, not measured yet)::

    python benchmarks/bottom_up.py --device cuda --precision bf16 --batch-size 32 --batches 8 --warmup 2 \
        --json benchmarks/results/bottom_up_gpu.json

COCO train+val (123k images) at 100 images/s is about 20 minutes.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from vqa_align.extract.backbones.bottom_up import (  # noqa: E402
    BottomUpConfig,
    BottomUpDetector,
    _detect_prepared,
    batch_images,
    preprocess,
)
from vqa_align.extract.backbones.bottom_up_random import random_state_dict
from vqa_align.extract.backbones.bottom_up_weights import load_weights_file  # noqa: E402

COCO_SIZES = ((640, 480), (480, 640))  # (w, h): the two usual COCO shapes
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")


def coco_like_images(count: int) -> list[np.ndarray]:
    from skimage import data

    out = []
    for i in range(count):
        photo = Image.fromarray(getattr(data, PHOTOS[i % len(PHOTOS)])()).convert("RGB")
        out.append(np.asarray(photo.resize(COCO_SIZES[i % 2], Image.BILINEAR)))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast for the convolutions")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--batches", type=int, default=2, help="timed batches")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--min-size", type=int, default=800)
    p.add_argument("--max-size", type=int, default=1333)
    p.add_argument("--proposals", type=int, default=300)
    p.add_argument("--mode", choices=["adaptive", "fixed"], default="adaptive")
    p.add_argument("--weights", help="the real weights file (default: random weights of the same shapes)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    lo, hi = (36, 36) if args.mode == "fixed" else (10, 100)
    cfg = BottomUpConfig(min_size=args.min_size, max_size=args.max_size, post_nms_topk=args.proposals, min_boxes=lo, max_boxes=hi)
    state = load_weights_file(args.weights) if args.weights else random_state_dict(cfg)
    detector = BottomUpDetector.from_state_dict(state, cfg).to(device)
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    images = coco_like_images(args.batch_size * (args.batches + args.warmup))

    # End to end, batch by batch (preprocessing included, as extraction's main process sees it
    # when the DataLoader workers cannot keep up; they normally hide it).
    times, boxes = [], []
    for b in range(args.warmup + args.batches):
        chunk = images[b * args.batch_size : (b + 1) * args.batch_size]
        sync(device)
        start = time.perf_counter()
        prepared = [preprocess(im, cfg) for im in chunk]
        dets = _detect_prepared(detector, prepared, cfg, None, dtype)
        sync(device)
        if b >= args.warmup:
            times.append(time.perf_counter() - start)
            boxes += [len(d.boxes) for d in dets]
    per_batch = statistics.median(times)

    # Breakdown: the backbone (stem..res4) and res5 on the proposals, timed alone.
    prepared = [preprocess(im, cfg) for im in images[: args.batch_size]]
    batch = batch_images(prepared).to(device)
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        sync(device)
        t0 = time.perf_counter()
        feats = detector.backbone(batch)
        sync(device)
        t_backbone = time.perf_counter() - t0
        pooled = torch.randn(args.batch_size * args.proposals, 1024, cfg.pool_size, cfg.pool_size, device=device)
        sync(device)
        t0 = time.perf_counter()
        detector.roi_heads.res5(pooled).mean(dim=(2, 3))
        sync(device)
        t_res5 = time.perf_counter() - t0

    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "precision": args.precision,
        "batch_size": args.batch_size,
        "input_hw": list(prepared[0].resized_hw),
        "proposals": args.proposals,
        "weights": "given" if args.weights else "random",
        "images_per_s": args.batch_size / per_batch,
        "seconds_per_batch": times,
        "backbone_s_per_image": t_backbone / args.batch_size,
        "res5_s_per_image": t_res5 / args.batch_size,
        "boxes_per_image": boxes,
    }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
