"""Shared pieces of the training-step benchmarks (CPU: train_step.py, CUDA: gpu.py).

Synthetic inputs that follow the batch contract of ``vqa_align.model.mcan.MCAN``:
tokens (B, T) long with 0 = padding, question_lengths (B,), features (B, N, D), boxes (B, N, 4)
normalised x1 y1 x2 y2, region_counts (B,). One training step is what the trainer does:
forward, loss = BCE-with-logits(sum) + λ·B·alignment_loss (the trainer's ``task_loss`` and scale),
backward, Adam step.

Region layouts:
- ``fixed100``: every image padded to 100 regions (what the public MCAN code does).
- ``adaptive``: region counts drawn like adaptive bottom-up-attention features (10..100 per image,
  mean ≈ 32); batches are formed by sorting a pool by region count (bucketing, as the data layer's
  ``RegionBucketBatchSampler`` does when it exists) so each batch pads only to its own maximum.
"""

from __future__ import annotations

import math
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from vqa_align.config import ModelConfig, load_config  # noqa: E402
from vqa_align.train.host_memory import keep_freed_memory  # noqa: E402
from vqa_align.model.mcan import MCAN  # noqa: E402
from vqa_align.train.vqa_task import task_loss  # noqa: E402

VOCAB_SIZE = 20_000
NUM_ANSWERS = 3_129
MAX_TOKENS = 14
MAX_REGIONS = 100
MIN_REGIONS = 10
ADAPTIVE_MEAN = 32.0


def model_config(config_path: str | None, method: str, overrides: list[str] | None = None) -> ModelConfig:
    """The preset's model section with the given alignment method and the VQA v2 vocabulary sizes."""
    cfg = load_config(config_path, list(overrides or []) + [f"model.alignment.method={method}"]).model
    cfg.vocab_size, cfg.num_answers = VOCAB_SIZE, NUM_ANSWERS
    return cfg


def adaptive_region_counts(n: int, gen: torch.Generator) -> torch.Tensor:
    """Region counts like the adaptive bottom-up features: 10..100 per image, mean ≈ 32.

    10 + an exponential tail (mean 22), clipped at 100: the adaptive detector keeps every box above
    a confidence threshold, so most images have few regions and a thin tail has many.
    """
    u = torch.rand(n, generator=gen, dtype=torch.float64).clamp_min(1e-12)
    counts = MIN_REGIONS + (-(ADAPTIVE_MEAN - MIN_REGIONS) * torch.log(u)).round()
    return counts.clamp(MIN_REGIONS, MAX_REGIONS).long()


def bucketed_batches(counts: torch.Tensor, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Index batches of images with similar region counts (the data layer's sampler if present)."""
    try:  # the engine's real batching, once the data layer provides it
        from vqa_align.data.loaders import RegionBucketBatchSampler  # type: ignore

        sampler = RegionBucketBatchSampler(counts.tolist(), batch_size=batch_size, shuffle=True, seed=0)
        batches = [torch.as_tensor(list(b)) for b in sampler]
        if batches and all(len(b) > 0 for b in batches):
            return batches
    except Exception:  # noqa: BLE001 - absent or a different signature: use the equivalent below
        pass
    order = torch.argsort(counts + torch.rand(len(counts), generator=gen) * 0.5)  # stable-ish, random ties
    batches = [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    perm = torch.randperm(len(batches), generator=gen)
    return [batches[i] for i in perm.tolist()]


def make_batch(counts: torch.Tensor, feature_dim: int, gen: torch.Generator, pad_to: int | None = None) -> dict:
    """A synthetic batch for the given per-image region counts, padded to max(counts) (or pad_to)."""
    batch = len(counts)
    n = int(pad_to or counts.max())
    lengths = torch.randint(4, MAX_TOKENS + 1, (batch,), generator=gen)  # VQA questions: ~4..14 words
    tokens = torch.randint(1, VOCAB_SIZE, (batch, MAX_TOKENS), generator=gen)
    tokens[torch.arange(MAX_TOKENS)[None] >= lengths[:, None]] = 0
    features = torch.rand(batch, n, feature_dim, generator=gen)  # ReLU-like, non-negative
    xy = torch.rand(batch, n, 2, generator=gen) * 0.6
    boxes = torch.cat([xy, xy + 0.05 + torch.rand(batch, n, 2, generator=gen) * 0.35], -1).clamp(max=1.0)
    pad = torch.arange(n)[None] >= counts[:, None]
    features[pad] = 0.0
    boxes[pad] = 0.0
    # Soft VQA targets: a few answers with scores in {0.3, 0.6, 0.9, 1}.
    targets = torch.zeros(batch, NUM_ANSWERS)
    idx = torch.randint(0, NUM_ANSWERS, (batch, 3), generator=gen)
    targets.scatter_(1, idx, torch.tensor([1.0, 0.6, 0.3]).expand(batch, 3))
    return dict(
        tokens=tokens,
        question_lengths=lengths,
        features=features,
        boxes=boxes,
        region_counts=counts.clone(),
        targets=targets,
    )


def make_batches(regions: str, batch_size: int, num_batches: int, feature_dim: int, seed: int = 0) -> list[dict]:
    """``num_batches`` synthetic batches for the layout ``fixed100`` or ``adaptive``."""
    gen = torch.Generator().manual_seed(seed)
    if regions == "fixed100":
        return [
            make_batch(torch.full((batch_size,), MAX_REGIONS, dtype=torch.long), feature_dim, gen)
            for _ in range(num_batches)
        ]
    if regions != "adaptive":
        raise ValueError(f"unknown region layout {regions!r}")
    # A pool large enough that sorting by count gives realistic buckets (the data layer sorts
    # within pools of ~100 batches), then an even spread of those buckets over the timed batches.
    pool_batches = max(100, num_batches)
    counts = adaptive_region_counts(pool_batches * batch_size, gen)
    index_batches = bucketed_batches(counts, batch_size, gen)
    # Take batches spread over the whole range of bucket sizes so a few timed steps are representative.
    index_batches.sort(key=lambda b: int(counts[b].max()))
    picks = [index_batches[int((i + 0.5) * len(index_batches) / num_batches)] for i in range(num_batches)]
    order = torch.randperm(num_batches, generator=gen).tolist()
    return [make_batch(counts[picks[i]], feature_dim, gen) for i in order]


def batch_stats(batches: list[dict]) -> dict:
    real = sum(int(b["region_counts"].sum()) for b in batches)
    padded = sum(b["features"].shape[0] * b["features"].shape[1] for b in batches)
    return {
        "mean_regions_per_image": real / sum(len(b["region_counts"]) for b in batches),
        "mean_padded_regions_per_batch": statistics.mean(b["features"].shape[1] for b in batches),
        "padding_fraction": 1.0 - real / padded,
    }


@dataclass
class Trainer:
    """One model + Adam + the trainer's loss, for timing full training steps."""

    model: MCAN
    optimizer: torch.optim.Optimizer
    weight: float
    autocast_dtype: torch.dtype | None
    device: torch.device

    @classmethod
    def build(
        cls,
        cfg: ModelConfig,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        seed: int = 0,
        fused_adam: bool | None = None,
        capturable: bool = False,
    ):
        torch.manual_seed(seed)
        device = torch.device(device)
        if device.type == "cpu":
            keep_freed_memory()  # as the trainer does (train.keep_freed_memory, the default)
        model = MCAN(cfg).to(device).train()
        kwargs = {"fused": True if fused_adam is None else fused_adam}  # as the trainer (CPU and CUDA)
        if device.type == "cuda":
            kwargs["capturable"] = capturable  # CUDA graphs: step count and lr stay on the device
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9, **kwargs)
        dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]
        return cls(model, optimizer, cfg.alignment.weight, dtype, device)

    def loss(self, batch: dict, autocast_cache: bool = True) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "targets"}
        if self.autocast_dtype is not None:
            # CUDA graph capture needs the autocast weight cache off (cached casts would be stale).
            with torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=autocast_cache):
                out = self.model(**inputs)
        else:
            out = self.model(**inputs)
        targets = batch["targets"]
        # As the trainer: summed task loss, so the alignment term is scaled by the batch size.
        return task_loss(out.logits, targets, "sum") + self.weight * targets.shape[0] * out.alignment_loss.float()

    def step(self, batch: dict) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(batch)
        loss.backward()
        self.optimizer.step()
        return loss.detach()


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mib() -> float:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def machine_info() -> dict:
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as handle:
            text = handle.read()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        flags = next((l for l in text.splitlines() if l.startswith("flags")), "")
        info["avx512_bf16"] = "avx512_bf16" in flags
        info["amx_bf16"] = "amx_bf16" in flags
    except OSError:
        pass
    return info


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")
