"""Datasets, batches and loaders: questions + region features -> the batch contract.

The batch contract (what :func:`collate_batch` returns; the model and trainer rely on it)::

    "question_ids":     LongTensor (B,)
    "image_ids":        LongTensor (B,)
    "tokens":           LongTensor (B, T)     T = longest question in the batch, pad id 0
    "question_lengths": LongTensor (B,)       >= 1
    "features":         FloatTensor (B, N, D) N = largest region count in the batch, zero padding
    "boxes":            FloatTensor (B, N, 4) normalised x1, y1, x2, y2 in [0, 1], zero padding
    "region_counts":    LongTensor (B,)
    "targets":          FloatTensor (B, A)    soft scores; only when the split has annotations

Targets are MCAN's soft scores over the answer vocabulary (``vqa_data.answer_targets``): every
human answer normalised (``vqa_eval.normalize_answer``) so that all spellings of an answer vote for
one class. They are for the loss only; accuracy follows the official rules, which normalise only
when the humans disagree (``vqa_data.OfficialScores`` in training, ``vqa_eval`` for answer files).

Memory: a dataset holds its questions as flat numpy arrays and the store's small index; region
features are read per sample from the HDF5 store (one handle per worker process), so peak memory
does not grow with the size of the store.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from vqa_align.config import DataConfig
from vqa_align.errors import UserError
from vqa_align.extract.feature_store import FeatureStore, normalise_boxes
from vqa_align.data.vqa_v2 import (
    PAD_ID,
    QuestionRecord,
    answer_targets,
    build_answer_vocab,
    build_tokenizer,
    encode_questions,
    filter_missing_images,
    load_split,
)

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
POOL_BATCHES = 100  # bucketing pool = 100 batches: sorted inside, so batches stay random across pools


class VQADataset(Dataset):
    """Map-style dataset: question ``i`` -> dict of numpy arrays for one question.

    ``__getitem__`` returns ``question_id``, ``image_id`` (ints), ``tokens`` (L,) int64,
    ``features`` (n, D) in the store's dtype (converted to float32 in :func:`collate_batch`, which
    saves a copy), ``boxes`` (n, 4) float32 normalised, and ``targets`` (A,) float32 when annotated.
    """

    def __init__(
        self,
        records: list[QuestionRecord],
        store: FeatureStore,
        tokenizer: Any,
        *,
        max_tokens: int,
        max_regions: int,
        answers: Sequence[str] | None = None,
        skip_missing: bool = False,
        name: str = "",
    ) -> None:
        records, self.num_skipped = filter_missing_images(
            records, lambda ids: store.rows(ids) >= 0, skip_missing, str(store.path)
        )
        if self.num_skipped:
            log.warning("%s: skipped %d question(s) whose image has no features in %s",
                        name or "dataset", self.num_skipped, store.path)
        self.name = name
        self.records = records
        self.store = store
        self.max_regions = max_regions
        n = len(records)
        self.question_ids = np.fromiter((r.question_id for r in records), np.int64, n)  # (Q,)
        self.image_ids = np.fromiter((r.image_id for r in records), np.int64, n)  # (Q,)
        self.store_rows = store.rows(self.image_ids)  # (Q,) all >= 0 after the filter
        self.region_counts = np.minimum(store.region_counts[self.store_rows], max_regions)  # (Q,)
        self.token_ids, self.token_offsets = encode_questions(tokenizer, records, max_tokens)
        self.num_answers = len(answers) if answers is not None else 0
        self.has_targets = answers is not None and n > 0 and all(r.answers is not None for r in records)
        if self.has_targets:
            self.target_idx, self.target_scores, self.target_offsets = answer_targets(records, answers)

    def __len__(self) -> int:
        return len(self.question_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = int(self.store_rows[i])
        feats, boxes = self.store.read_row(row, self.max_regions)
        w, h = self.store.image_sizes[row]
        item: dict[str, Any] = {
            "question_id": int(self.question_ids[i]),
            "image_id": int(self.image_ids[i]),
            "tokens": self.token_ids[self.token_offsets[i]:self.token_offsets[i + 1]].astype(np.int64),
            "features": feats,
            "boxes": normalise_boxes(boxes, w, h),
        }
        if self.has_targets:
            a, b = self.target_offsets[i], self.target_offsets[i + 1]
            targets = np.zeros(self.num_answers, np.float32)
            targets[self.target_idx[a:b]] = self.target_scores[a:b]
            item["targets"] = targets
        return item


def torch_dtype(numpy_dtype: Any) -> torch.dtype:
    """The torch dtype of a numpy dtype (e.g. the store's float16)."""
    return torch.from_numpy(np.empty(0, dtype=numpy_dtype)).dtype


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Uninitialised tensor; inside a DataLoader worker it lives in shared memory directly, so
    handing the batch to the main process needs no extra copy (what default_collate does)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    numel = math.prod(shape)
    storage = torch.UntypedStorage._new_shared(numel * torch.empty(0, dtype=dtype).element_size())
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def collate_batch(samples: list[dict[str, Any]], *, keep_store_dtype: bool = False) -> dict[str, torch.Tensor]:
    """Pad a list of :class:`VQADataset` items into the batch contract (see module docstring).

    ``keep_store_dtype`` (used by :func:`make_loader` through :func:`collate_for_workers`): inside a
    DataLoader worker, ``features`` keep the store's dtype (float16 by default) in shared memory,
    which halves the shared-memory pages the worker must fault in -- the dominant cost on small
    machines; :class:`VQALoader` converts them to float32 in the main process
    (:func:`finalize_batch`). With the default, features are always float32.
    """
    b = len(samples)
    q_len = np.fromiter((len(s["tokens"]) for s in samples), np.int64, b)
    counts = np.fromiter((len(s["features"]) for s in samples), np.int64, b)
    t, n = int(q_len.max()), int(counts.max())
    src_dtype = samples[0]["features"].dtype
    d = samples[0]["features"].shape[1]
    in_worker = get_worker_info() is not None
    fp16_transport = keep_store_dtype and in_worker
    feat_dtype = torch_dtype(src_dtype) if fp16_transport else torch.float32
    tokens = np.full((b, t), PAD_ID, dtype=np.int64)
    boxes = np.zeros((b, n, 4), dtype=np.float32)
    features = _empty((b, n, d), feat_dtype)
    same_dtype = features.dtype == torch_dtype(src_dtype)
    feats_np = features.numpy()
    for i, s in enumerate(samples):
        k = counts[i]
        tokens[i, : q_len[i]] = s["tokens"]
        if same_dtype:
            feats_np[i, :k] = s["features"]  # plain memcpy
        else:
            features[i, :k].copy_(torch.from_numpy(s["features"]))  # torch casts fp16 -> fp32 fast
        feats_np[i, k:] = 0
        boxes[i, :k] = s["boxes"]
    batch = {
        "question_ids": torch.from_numpy(np.fromiter((s["question_id"] for s in samples), np.int64, b)),
        "image_ids": torch.from_numpy(np.fromiter((s["image_id"] for s in samples), np.int64, b)),
        "tokens": torch.from_numpy(tokens),
        "question_lengths": torch.from_numpy(q_len),
        "features": features,
        "boxes": torch.from_numpy(boxes),
        "region_counts": torch.from_numpy(counts),
    }
    if "targets" in samples[0]:
        batch["targets"] = torch.from_numpy(np.stack([s["targets"] for s in samples]))
    return batch


def collate_for_workers(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """:func:`collate_batch` that ships store-dtype features from workers; pair with :class:`VQALoader`."""
    return collate_batch(samples, keep_store_dtype=True)


def finalize_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Features to float32 (workers ship the store's float16); keeps pinned memory pinned."""
    f = batch["features"]
    if f.dtype != torch.float32:
        out = torch.empty(f.shape, dtype=torch.float32, pin_memory=f.is_pinned())
        batch["features"] = out.copy_(f)
    return batch


class VQALoader(DataLoader):
    """A DataLoader whose batches follow the contract exactly (see :func:`finalize_batch`).

    Use it with ``collate_fn=collate_for_workers`` for the fast path (float16 from the workers).
    """

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:  # type: ignore[override]
        for batch in super().__iter__():
            yield finalize_batch(batch)


class RegionBucketBatchSampler(Sampler[list[int]]):
    """Batches of samples with similar region counts, deterministic given (seed, epoch), sharded.

    Per epoch: shuffle all indices (if ``shuffle``), cut them into pools of ``pool_batches``
    batches, sort each pool by region count (``bucket``), cut into batches, shuffle the batch
    order (if ``shuffle``). Rank ``r`` of ``num_replicas`` takes batches ``r, r + R, ...``; without
    ``drop_last`` the list is padded by repeating batches from its start so that every rank gets
    the same number of batches (DDP needs equal step counts; evaluation de-duplicates by
    question id), with ``drop_last`` the final partial batch and the remainder are dropped.
    """

    def __init__(
        self,
        region_counts: np.ndarray | Sequence[int],
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
        *,
        bucket: bool = True,
        pool_batches: int = POOL_BATCHES,
    ) -> None:
        if batch_size < 1 or num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"invalid batch_size={batch_size}, num_replicas={num_replicas}, rank={rank}")
        self.region_counts = np.asarray(region_counts, dtype=np.int64)
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.num_replicas, self.rank, self.bucket, self.pool_batches = num_replicas, rank, bucket, pool_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _num_batches_total(self) -> int:
        n, bs = len(self.region_counts), self.batch_size
        return n // bs if self.drop_last else math.ceil(n / bs)

    def all_batches(self) -> list[np.ndarray]:
        """Every batch of this epoch, before sharding."""
        n, bs = len(self.region_counts), self.batch_size
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        if self.bucket:
            pool = bs * self.pool_batches
            order = np.concatenate([
                chunk[np.argsort(self.region_counts[chunk], kind="stable")]
                for chunk in np.split(order, range(pool, n, pool))
            ]) if n else order
        batches = [order[i:i + bs] for i in range(0, n, bs)][: self._num_batches_total()]
        if self.shuffle:
            batches = [batches[j] for j in rng.permutation(len(batches))]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.all_batches()
        total = len(self) * self.num_replicas
        if total > len(batches) and batches:  # pad so every rank gets len(self) batches
            batches = batches + [batches[j % len(batches)] for j in range(total - len(batches))]
        for b in batches[self.rank:total:self.num_replicas]:
            yield b.tolist()

    def __len__(self) -> int:
        nb = self._num_batches_total()
        return nb // self.num_replicas if self.drop_last else math.ceil(nb / self.num_replicas)


def make_loader(
    dataset: VQADataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int,
    bucket: bool,
    pin_memory: bool,
    num_replicas: int = 1,
    rank: int = 0,
    drop_last: bool = False,
) -> VQALoader:
    """DataLoader over ``dataset`` with the bucket sampler and :func:`collate_batch`.

    Call ``loader.batch_sampler.set_epoch(epoch)`` at the start of every epoch.
    """
    sampler = RegionBucketBatchSampler(
        dataset.region_counts, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last,
        num_replicas=num_replicas, rank=rank, bucket=bucket,
    )
    if num_workers > 0:
        dataset.store.close()  # workers open their own handles; none is inherited across fork
    return VQALoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_for_workers,
        num_workers=num_workers,
        pin_memory=pin_memory and torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )


# --------------------------------------------------------------------------------------------
# Building the data of a run from its DataConfig
# --------------------------------------------------------------------------------------------


@dataclass
class DataBundle:
    """Everything a run needs from the data: vocabularies, datasets per split, the store."""

    tokenizer: Any  # transformers.PreTrainedTokenizerFast
    answers: list[str]
    datasets: dict[str, VQADataset]
    store: FeatureStore
    feature_dim: int
    files: dict[str, dict[str, list[Path]]] = field(default_factory=dict)  # split -> questions/annotations


def feature_store_path(cfg: DataConfig) -> Path | None:
    """The feature store a data config reads, without preparing anything (None: it names none).

    An explicit ``features`` wins; easy-VQA otherwise lives in the prepared cache
    (``<cache>/easy_vqa/features.h5``, or the store of ``easy_vqa_backbone`` beside it).
    """
    if cfg.features:
        return Path(cfg.features).expanduser()
    if cfg.dataset == "easy_vqa":
        from vqa_align.data.easy_vqa import FEATURES, FOLDER, backbone_features_file
        from vqa_align.paths import cache_root

        name = backbone_features_file(cfg.easy_vqa_backbone) if cfg.easy_vqa_backbone else FEATURES
        return cache_root(cfg.cache_dir) / FOLDER / name
    return None


def resolve_files(cfg: DataConfig) -> tuple[Path, dict[str, dict[str, list[Path]]]]:
    """(feature store path, split -> {"questions": [...], "annotations": [...]}) of a config.

    easy-VQA without explicit paths: the prepared cache (prepared now if missing); ``val`` and
    ``test`` are both the official easy-VQA test set.
    """
    explicit = cfg.features is not None or cfg.train_questions or cfg.val_questions or cfg.test_questions
    if cfg.dataset == "easy_vqa" and not explicit:
        from vqa_align.data.easy_vqa import FEATURES, prepare_easy_vqa, prepared_files

        folder = prepare_easy_vqa(cfg.cache_dir, limit=cfg.easy_vqa_limit)
        files = {s: {"questions": [p["questions"]], "annotations": [p["annotations"]]}
                 for s, p in prepared_files(folder).items()}
        if cfg.easy_vqa_backbone:
            from vqa_align.data.easy_vqa import prepare_easy_vqa_backbone

            return prepare_easy_vqa_backbone(cfg.easy_vqa_backbone, cfg.cache_dir, limit=cfg.easy_vqa_limit), files
        return folder / FEATURES, files
    if cfg.features is None:
        raise UserError("data.features is not set: give the HDF5 feature store (see `vqa-align prep`)")
    files = {
        "train": {"questions": [Path(p) for p in cfg.train_questions],
                  "annotations": [Path(p) for p in cfg.train_annotations]},
        "val": {"questions": [Path(p) for p in cfg.val_questions],
                "annotations": [Path(p) for p in cfg.val_annotations]},
        "test": {"questions": [Path(p) for p in cfg.test_questions], "annotations": []},
    }
    return Path(cfg.features).expanduser(), files


def check_same_extractor(a: FeatureStore, b: FeatureStore) -> None:
    """Refuse two stores whose features come from different extractors (a model trained on one
    would be evaluated on features it has never seen); stores without a record are not compared."""
    if a.extractor is None and b.extractor is None:
        return
    if a.extractor is None or b.extractor is None or a.extractor.key() != b.extractor.key():
        def name(s: FeatureStore) -> str:
            return s.extractor.describe() if s.extractor is not None else f"an unrecorded extractor ({s.source or 'converted'})"

        raise UserError(f"the train store {a.path} comes from {name(a)} but {b.path} comes from {name(b)}; "
                        "extract both with the same backbone and parameters")


def build_data(
    cfg: DataConfig,
    splits: list[str],
    *,
    tokenizer: Any | None = None,
    answers: list[str] | None = None,
) -> DataBundle:
    """Datasets of ``splits`` plus the question tokenizer and answer vocabulary.

    ``tokenizer`` / ``answers`` (e.g. from a checkpoint) are reused when given; otherwise both are
    built from the training split (questions: every word; answers: ``answer_min_count``).
    ``cfg.subset`` keeps the first N training questions, ``cfg.eval_subset`` the first N of the others.
    """
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise UserError(f"unknown split(s) {unknown}; valid: {list(SPLITS)}")
    store_path, files = resolve_files(cfg)
    store = FeatureStore(store_path)
    eval_store = store
    if cfg.val_features and Path(cfg.val_features).expanduser() != store_path:
        eval_store = FeatureStore(Path(cfg.val_features).expanduser())
        check_same_extractor(store, eval_store)
        if eval_store.feature_dim != store.feature_dim:
            raise UserError(f"the train store {store.path} has {store.feature_dim}-d features but {eval_store.path} "
                            f"has {eval_store.feature_dim}-d ones; a model reads one width")

    def records_of(split: str) -> list[QuestionRecord]:
        qs, ans = files[split]["questions"], files[split]["annotations"]
        if not qs:
            raise UserError(f"data.{split}_questions is empty: no questions file for split {split!r}")
        recs = load_split(qs, ans or None)
        if split == "train" and cfg.subset is not None:
            return recs[: cfg.subset]
        if split != "train" and cfg.eval_subset is not None:
            return recs[: cfg.eval_subset]
        return recs

    loaded: dict[str, list[QuestionRecord]] = {}
    if tokenizer is None or answers is None:
        loaded["train"] = records_of("train")
        if tokenizer is None:
            tokenizer = build_tokenizer((r.question for r in loaded["train"]), cfg.max_question_tokens)
        if answers is None:
            answers = build_answer_vocab(loaded["train"], cfg.answer_min_count)
    datasets = {}
    for split in splits:
        recs = loaded.get(split) or records_of(split)
        datasets[split] = VQADataset(
            recs, store if split == "train" else eval_store, tokenizer, max_tokens=cfg.max_question_tokens, max_regions=cfg.max_regions,
            answers=answers, skip_missing=cfg.skip_missing, name=split,
        )
    return DataBundle(tokenizer=tokenizer, answers=list(answers), datasets=datasets, store=store,
                      feature_dim=store.feature_dim, files=files)
