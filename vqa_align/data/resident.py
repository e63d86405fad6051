"""Device-resident data: a split's features, boxes, questions and targets held in device memory.

With ``data.resident: true`` the trainer loads every image the split uses once (the first
``max_regions`` regions, in the store's dtype, float16 by default) and every question into the
training device's memory, and forms each batch there by index arithmetic: no DataLoader workers,
no per-step host-to-device copy of features. VQA v2 train + val with adaptive 10-100 boxes in
float16 is about 16 GB, which fits next to MCAN on one H100/H200; on a GPU the input pipeline then
never waits. On the CPU the same mode simply holds the split in RAM.

Batches follow the batch contract of :mod:`vqa_align.data.loaders` exactly (same keys, dtypes, padding;
``question_ids`` / ``image_ids`` stay on the CPU) and equal what :func:`~vqa_align.data.loaders.collate_batch`
builds from the same question indices (tested). The batch sampler is the same
:class:`~vqa_align.data.loaders.RegionBucketBatchSampler`, so bucketing, sharding and resumption behave alike.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from vqa_align.data.loaders import VQADataset, torch_dtype
from vqa_align.extract.feature_store import normalise_boxes
from vqa_align.data.vqa_v2 import PAD_ID

log = logging.getLogger(__name__)

# Images read per host-to-device copy while loading (bounds the host staging memory).
_LOAD_IMAGES_PER_COPY = 4096


class ResidentSplit:
    """All data of one :class:`~vqa_align.data.loaders.VQADataset` on ``device``; ``batch(indices)`` -> batch dict.

    Device tensors (R = kept regions of the images the split uses, Q = questions):
    ``features`` (R, D) store dtype, ``boxes`` (R, 4) float32 normalised, ``image_start`` (I,) first
    region of each used image, ``question_image`` (Q,) its image, ``tokens`` (Q, T_max),
    ``target_index`` / ``target_score`` (Q, K) sparse soft targets (score 0 pads).
    """

    def __init__(self, dataset: VQADataset, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.dataset = dataset
        store = dataset.store
        used_rows, question_image = np.unique(dataset.store_rows, return_inverse=True)  # (I,), (Q,)
        kept = np.minimum(store.region_counts[used_rows], dataset.max_regions)  # (I,)
        image_start = np.concatenate([[0], np.cumsum(kept)[:-1]]).astype(np.int64)
        total = int(kept.sum())
        self.features = torch.empty(total, store.feature_dim, dtype=torch_dtype(store.feature_dtype), device=self.device)
        self.boxes = torch.empty(total, 4, dtype=torch.float32, device=self.device)
        for first in range(0, len(used_rows), _LOAD_IMAGES_PER_COPY):
            rows = used_rows[first : first + _LOAD_IMAGES_PER_COPY]
            feats, boxes = [], []
            for row in rows:
                f, b = store.read_row(int(row), dataset.max_regions)
                feats.append(f)
                boxes.append(normalise_boxes(b, *store.image_sizes[row]))  # as VQADataset
            start = int(image_start[first])
            stop = start + sum(len(f) for f in feats)
            self.features[start:stop] = torch.from_numpy(np.concatenate(feats))
            self.boxes[start:stop] = torch.from_numpy(np.concatenate(boxes))
        self.image_start = torch.from_numpy(image_start).to(self.device)  # (I,)
        self.question_image = torch.from_numpy(question_image.astype(np.int64)).to(self.device)  # (Q,)

        self.lengths = np.diff(dataset.token_offsets).astype(np.int64)  # (Q,) on the host: shapes need no sync
        tokens = np.full((len(dataset), max(int(self.lengths.max(initial=1)), 1)), PAD_ID, dtype=np.int64)
        tokens[_ragged_rows(self.lengths), _ragged_cols(self.lengths)] = dataset.token_ids
        self.tokens = torch.from_numpy(tokens).to(self.device)  # (Q, T_max)
        self.lengths_device = torch.from_numpy(self.lengths).to(self.device)

        self.num_answers = dataset.num_answers if dataset.has_targets else 0
        if dataset.has_targets:
            per_question = np.diff(dataset.target_offsets).astype(np.int64)  # (Q,)
            width = max(int(per_question.max(initial=1)), 1)
            index = np.zeros((len(dataset), width), np.int64)
            score = np.zeros((len(dataset), width), np.float32)  # score 0 adds nothing to answer 0
            rows, cols = _ragged_rows(per_question), _ragged_cols(per_question)
            index[rows, cols] = dataset.target_idx
            score[rows, cols] = dataset.target_scores
            self.target_index = torch.from_numpy(index).to(self.device)
            self.target_score = torch.from_numpy(score).to(self.device)
        gib = (self.features.numel() * self.features.element_size() + self.boxes.numel() * 4) / 2**30
        log.info("%s: %d images, %d regions, %d questions resident on %s (%.2f GiB of features and boxes)",
                 dataset.name or "dataset", len(used_rows), total, len(dataset), self.device, gib)

    def batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        """The batch of questions ``indices`` (padded to its own longest question and region count)."""
        idx = np.asarray(indices, dtype=np.int64)
        counts = self.dataset.region_counts[idx].astype(np.int64)  # (B,) host: the padded size needs no sync
        lengths = self.lengths[idx]
        n, t = int(counts.max()), int(lengths.max())
        idx_d = torch.from_numpy(idx).to(self.device, non_blocking=True)
        counts_d = torch.from_numpy(counts).to(self.device, non_blocking=True)
        start = self.image_start[self.question_image[idx_d]]  # (B,)
        position = torch.arange(n, device=self.device)
        valid = position[None, :] < counts_d[:, None]  # (B, N)
        region = torch.where(valid, start[:, None] + position, 0)  # (B, N): padding reads region 0, then zeroed
        features = self.features[region].float().masked_fill_(~valid[..., None], 0.0)  # (B, N, D)
        boxes = self.boxes[region].masked_fill_(~valid[..., None], 0.0)  # (B, N, 4)
        batch = {
            "question_ids": torch.from_numpy(self.dataset.question_ids[idx]),
            "image_ids": torch.from_numpy(self.dataset.image_ids[idx]),
            "tokens": self.tokens[idx_d, :t],
            "question_lengths": self.lengths_device[idx_d],
            "features": features,
            "boxes": boxes,
            "region_counts": counts_d,
        }
        if self.num_answers:
            targets = torch.zeros(len(idx), self.num_answers, device=self.device)
            batch["targets"] = targets.scatter_add_(1, self.target_index[idx_d], self.target_score[idx_d])
        return batch


class ResidentLoader:
    """Iterates a batch sampler over a :class:`ResidentSplit` (the DataLoader of the resident mode)."""

    def __init__(self, split: ResidentSplit, batch_sampler: Any) -> None:
        self.split = split
        self.batch_sampler = batch_sampler

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for indices in self.batch_sampler:
            yield self.split.batch(indices)


def _ragged_rows(lengths: np.ndarray) -> np.ndarray:
    """Row index of every element of a ragged array with these row lengths."""
    return np.repeat(np.arange(len(lengths)), lengths)


def _ragged_cols(lengths: np.ndarray) -> np.ndarray:
    """Column index of every element of a ragged array with these row lengths."""
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return np.arange(int(lengths.sum())) - np.repeat(starts, lengths)

