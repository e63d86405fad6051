"""`vqa-align extract` throughput (images/s) per backbone, and main-process RSS over a long run.

Pictures: synthetic 640 x 480 JPEGs (smooth colour fields with a few shapes, ~30 kB each) written
to a temporary folder, deleted afterwards. Every run goes through the real pipeline
(``vqa_align.extract.pipeline.extract_images``: list, DataLoader decoding workers, backbone, resumable
parts, merged store).

    python benchmarks/extract.py                                # images/s of every backbone, 64 pictures
    python benchmarks/extract.py --rss 3000                     # + RSS over 3,000 pictures (efficientnet-lite0)
    python benchmarks/extract.py --backbones "" --rss 3000 --rss-backbone resnet18-64   # the pipeline's RSS, cheaply
    python benchmarks/extract.py --json out.json

Backbones: ``efficientnet-lite0`` (its real weights), ``torchvision`` resnet50 at 448 px and
``clip`` ViT-B/32 at 224 px with *random* weights (same compute as the real ones; nothing is
downloaded). ``bottom-up`` (the detector at its real settings, random weights) only when asked,
``--backbones bottom-up``: on a CPU it takes tens of seconds per picture (its own benchmark with a
stage breakdown: ``benchmarks/bottom_up.py``).
On a CUDA machine the same runs use the GPU (``--device cuda``; bf16 autocast).
RSS is sampled every 0.2 s from /proc/self/status (VmRSS of the main process; the decoding
workers are separate processes of constant size).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from vqa_align.extract.pipeline import ExtractOptions, extract_images, list_images  # noqa: E402
from vqa_align.experiments.vqa import machine_info  # noqa: E402
from vqa_align.extract.backbones import build_backbone  # noqa: E402

PICTURE_SIZE = (640, 480)


def write_pictures(folder: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    w, h = PICTURE_SIZE
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(n):
        a = rng.uniform(0, 255, (3, 3))  # a smooth colour field: JPEG-sized like a photo, not like noise
        field = np.stack([a[c, 0] + (a[c, 1] - a[c, 0]) * xx / w + (a[c, 2] - a[c, 0]) * yy / h for c in range(3)], -1)
        im = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(im)
        for _ in range(3):
            x, y, r = rng.integers(40, w - 40), rng.integers(40, h - 40), rng.integers(10, 40)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        im.save(folder / f"pic_{i:06d}.jpg", quality=85)


def vm_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class RssSampler(threading.Thread):
    def __init__(self, period: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.period, self.samples, self._done = period, [], threading.Event()

    def run(self) -> None:
        t0 = time.perf_counter()
        while not self._done.is_set():
            self.samples.append((time.perf_counter() - t0, vm_rss_mib()))
            time.sleep(self.period)

    def stop(self) -> list[tuple[float, float]]:
        self._done.set()
        self.join()
        return self.samples


# label -> (registry name, parameters)
BACKBONES = {
    "efficientnet-lite0": ("efficientnet-lite0", {}),
    "torchvision": ("torchvision", {"arch": "resnet50", "weights": "none", "image_size": 448}),
    "clip": ("clip", {}),  # model= a random ViT-B/32 folder, filled in at run time
    # cheap stand-in for long memory runs: the pipeline (decode, parts, merge) is what grows or not
    "resnet18-64": ("torchvision", {"arch": "resnet18", "weights": "none", "image_size": 64}),
    "bottom-up": ("bottom-up", {}),  # weights= a random-weight folder, filled in at run time
}


def clip_folder(tmp: Path) -> Path:
    """A random-weight CLIP ViT-B/32 vision tower saved like a downloaded one (same compute)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    folder = tmp / "clip-vit-b32-random"
    CLIPVisionModel(CLIPVisionConfig(image_size=224, patch_size=32)).save_pretrained(folder)
    return folder


def bottom_up_folder(tmp: Path) -> Path:
    """Random weights of the bottom-up detector's shapes saved like a downloaded folder (same compute)."""
    from safetensors.torch import save_file

    from vqa_align.extract.backbones.bottom_up_random import random_state_dict

    folder = tmp / "bottom-up-random"
    folder.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in random_state_dict().items()}, str(folder / "model.safetensors"))
    return folder


def run_one(label: str, params: dict, folder: Path, out: Path, options: ExtractOptions, device: str) -> dict:
    name = BACKBONES[label][0]
    backbone = build_backbone(name, params, device)
    items = list_images([folder])
    sampler = RssSampler()
    sampler.start()
    t0 = time.perf_counter()
    result = extract_images(items, backbone, out, options, overwrite=True)
    seconds = time.perf_counter() - t0
    samples = sampler.stop()
    rss = [r for _, r in samples]
    tenth = max(1, len(rss) // 10)
    return {
        "backbone": label, "params": {k: v for k, v in params.items() if k != "model"}, "images": result.images,
        "regions_per_image": result.regions / max(result.images, 1), "seconds": round(seconds, 2),
        "images_per_s": round(result.images / seconds, 2), "batch_size": options.batch_size,
        "workers": options.num_workers, "device": device, "threads": torch.get_num_threads(),
        "rss_mib_first_10pct_max": round(max(rss[:tenth]), 1) if rss else None,
        "rss_mib_last_10pct_max": round(max(rss[-tenth:]), 1) if rss else None,
        "rss_mib_peak": round(max(rss), 1) if rss else None,
        "rss_mib_samples": [(round(t, 1), round(r, 1)) for t, r in samples[:: max(1, len(samples) // 50)]],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="efficientnet-lite0,torchvision,clip")
    parser.add_argument("--images", type=int, default=64, help="pictures per throughput run")
    parser.add_argument("--rss", type=int, default=0, help="also a long run over this many pictures")
    parser.add_argument("--rss-backbone", default="efficientnet-lite0", choices=sorted(BACKBONES))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    options = ExtractOptions(batch_size=args.batch_size, num_workers=args.workers, progress=False)
    results = []
    with tempfile.TemporaryDirectory(prefix="vqa_extract_bench_") as tmp:
        tmp_path = Path(tmp)
        pics = tmp_path / "pics"
        pics.mkdir()
        write_pictures(pics, max(args.images, args.rss))
        few = tmp_path / "few"
        few.mkdir()
        for p in sorted(pics.iterdir())[: args.images]:
            os.link(p, few / p.name)
        for name in args.backbones.split(",") if args.backbones else []:
            params = dict(BACKBONES[name][1])
            if name == "clip":
                params["model"] = str(clip_folder(tmp_path))
            if name == "bottom-up":
                params["weights"] = str(bottom_up_folder(tmp_path))
            r = run_one(name, params, few, tmp_path / f"{name}.h5", options, args.device)
            results.append(r)
            print(f"{name:20s} {r['images_per_s']:7.2f} images/s  ({r['images']} pictures, batch {r['batch_size']}, "
                  f"{r['workers']} workers, {r['threads']} threads, {args.device}); RSS peak {r['rss_mib_peak']} MiB",
                  flush=True)
        if args.rss:
            r = run_one(args.rss_backbone, dict(BACKBONES[args.rss_backbone][1]), pics, tmp_path / "long.h5", options,
                        args.device)
            r["kind"] = "rss"
            results.append(r)
            print(f"RSS over {r['images']} pictures ({args.rss_backbone}): first 10% max {r['rss_mib_first_10pct_max']} MiB, last 10% max "
                  f"{r['rss_mib_last_10pct_max']} MiB, peak {r['rss_mib_peak']} MiB ({r['images_per_s']} images/s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "cpu": machine_info()["processor"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
