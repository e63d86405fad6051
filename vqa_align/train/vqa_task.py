"""VQA as a :class:`~vqa_align.train.task.TrainingTask`: MCAN's recipe.

Questions and region features -> scores of the answer vocabulary (MCAN), trained with BCE on the
soft targets, evaluated (and ``best`` picked) with the official accuracy on val.

Loss. BCE-with-logits on the soft targets, summed over answers. ``train.loss_reduction``:
``sum`` also sums over the batch (MCAN's choice; Adam is invariant to the loss scale, so MCAN's
learning rates carry over unchanged) and ``mean`` averages over the batch. (The trainer scales
the alignment term to match: vqa_align/train/step.py.)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from vqa_align.config import Config
from vqa_align.errors import DataFormatError, UserError
from vqa_align.evaluate.loop import forward_batches
from vqa_align.model.mcan import MCAN, MODEL_INPUTS
from vqa_align.train.task import TaskContext, TaskData

LOADER_SEED_STRIDE = 1_000_003  # loader generator seed = seed * stride + epoch (distinct per (seed, epoch))


def task_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
    """BCE-with-logits on soft targets, summed over answers; summed or averaged over the batch."""
    per_sample = F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none").sum(-1)  # (B,)
    return per_sample.sum() if reduction == "sum" else per_sample.mean()


class SkipFirstBatches:
    """Wrap a batch sampler so that the first ``skip`` batches of the epoch are not produced."""

    def __init__(self, batch_sampler: Any, skip: int = 0):
        self.batch_sampler = batch_sampler
        self.skip = skip

    def __iter__(self) -> Iterator[list[int]]:
        for index, batch in enumerate(self.batch_sampler):
            if index >= self.skip:
                yield batch

    def __len__(self) -> int:
        return max(0, len(self.batch_sampler) - self.skip)


class VQATask:
    """VQA: questions and region features -> scores of the answer vocabulary (MCAN), trained with
    BCE on soft targets, evaluated (and ``best`` picked) with the official accuracy on val."""

    selection_metric = "val_accuracy"

    def __init__(self, config: Config):
        self.config = config
        self.extractor: Any = None  # what made the features; every checkpoint records it
        self._resident: dict[int, Any] = {}  # id(dataset) -> ResidentSplit (data.resident)
        self._scores: dict[int, Any] = {}  # id(dataset) -> vqa_data.OfficialScores

    def build(self, context: TaskContext, resume: bool) -> TaskData:
        from vqa_align.data.loaders import build_data

        config, tcfg = self.config, self.config.train
        self.context = context
        tokenizer = answers = warm = None
        if tcfg.init_from:  # vqa_align/train/warm_start.py: the source's architecture, tokenizer and answers
            from vqa_align.train.warm_start import prepare_warm_start

            warm = prepare_warm_start(config, context.run_dir if resume else None)
            tokenizer, answers = warm.tokenizer, warm.answers
        elif config.model.question_encoder == "minilm":
            from vqa_align.model.question_encoders import load_minilm_tokenizer

            tokenizer = load_minilm_tokenizer()  # WordPiece ids, [PAD] = 0
        bundle = build_data(config.data, ["train", "val"], tokenizer=tokenizer, answers=answers)
        self.tokenizer, self.answers = bundle.tokenizer, bundle.answers
        self.extractor = bundle.store.extractor
        self.train_set, self.val_set = bundle.datasets["train"], bundle.datasets.get("val")
        if len(self.train_set) == 0:
            raise UserError("the training split has no questions")
        # Before the first step, naming the image: NaN/Inf boxes (16 bytes a region: cheap to read)
        # would surface as a non-finite loss, or be clipped into a wrong box; Inf/NaN validation
        # features only at the first evaluation, after a whole epoch. (Training features: the
        # finiteness check of the steps names the image; reading them all here would cost an epoch.)
        self.train_set.store.check_finite(self.train_set.store_rows, self.train_set.max_regions, ("boxes",))
        if self.val_set is not None and len(self.val_set):
            self.val_set.store.check_finite(self.val_set.store_rows, self.val_set.max_regions)
        self.data_fingerprints = _fingerprints(bundle, self.val_set)
        config.model.vocab_size = len(bundle.tokenizer)
        config.model.num_answers = len(bundle.answers)
        feature_dim = bundle.feature_dim
        self.answer_types = {
            r.question_id: r.answer_type or "unknown" for ds in bundle.datasets.values() for r in ds.records
        }
        if config.model.feature_dim != feature_dim:
            raise UserError(
                f"model.feature_dim is {config.model.feature_dim} but the feature store has D={feature_dim}; "
                f"set --set model.feature_dim={feature_dim}"
            )

        model = MCAN(config.model)
        if warm is not None and not resume:
            from vqa_align.train.warm_start import apply_warm_start

            apply_warm_start(model, warm)
        elif config.model.glove_path and not resume:
            self._init_glove(model, config.model.glove_path)
        self.model = model
        # Parameters frozen for the first epochs (MiniLM) get no gradient then.
        freezes = config.model.question_encoder == "minilm" and config.model.minilm_freeze_epochs > 0
        # The Hugging Face encoder has data-dependent checks (host syncs) that capture forbids.
        refused = None if config.model.question_encoder == "lstm" else "train.cuda_graphs supports model.question_encoder: lstm only"
        return TaskData(model, bundle.answers, bundle.tokenizer, self.train_set, self.val_set, freezes, refused)

    def _init_glove(self, model: MCAN, path: str) -> None:
        """Initialise the word embedding from a local GloVe-format file (words not in it stay random)."""
        from vqa_align.model.mcan import load_glove_embeddings

        embedding = getattr(model.question_encoder, "embedding", None)
        if embedding is None:
            raise UserError("model.glove_path needs model.question_encoder: lstm (it has a word embedding)")
        try:
            found = load_glove_embeddings(path, self.tokenizer.get_vocab(), embedding)
        except ValueError as err:
            raise UserError(str(err)) from None
        vocab = len(self.tokenizer)
        print(f"GloVe: {found} of {vocab} vocabulary words initialised from {path}", file=sys.stderr)

    def loader(self, dataset: Any, shuffle: bool, epoch: int, skip: int, batch_size: int) -> Any:
        from vqa_align.data.loaders import RegionBucketBatchSampler, VQALoader, collate_for_workers

        dcfg, device, dist = self.config.data, self.context.device, self.context.dist
        sampler = RegionBucketBatchSampler(
            dataset.region_counts,
            batch_size=batch_size,
            shuffle=shuffle,
            seed=self.config.train.seed,
            drop_last=False,
            num_replicas=dist.world_size if shuffle else 1,
            rank=dist.rank if shuffle else 0,
            bucket=dcfg.bucket_by_regions,
        )
        sampler.set_epoch(epoch)
        if dcfg.resident:
            from vqa_align.data.resident import ResidentLoader, ResidentSplit

            if id(dataset) not in self._resident:  # loaded once per split, kept for the run
                self._resident[id(dataset)] = ResidentSplit(dataset, device)
            return ResidentLoader(self._resident[id(dataset)], SkipFirstBatches(sampler, skip))
        workers = dcfg.num_workers
        if workers > 0:
            dataset.store.close()  # every worker opens its own HDF5 handle after fork
        return VQALoader(  # float16 features from the workers, float32 in the main process
            dataset,
            batch_sampler=SkipFirstBatches(sampler, skip),
            collate_fn=collate_for_workers,
            num_workers=workers,
            pin_memory=dcfg.pin_memory and device.type == "cuda",
            persistent_workers=False,
            # Its own generator: a DataLoader iterator otherwise draws its worker base seed from the
            # global RNG, one extra draw whenever a resumed run restarts an epoch mid-way.
            generator=torch.Generator().manual_seed(self.config.train.seed * LOADER_SEED_STRIDE + epoch),
        )

    def inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: batch[k].to(self.context.device, non_blocking=True) for k in MODEL_INPUTS}

    def targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["targets"].to(self.context.device, non_blocking=True)

    def losses(self, output: Any, targets: torch.Tensor, reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
        return task_loss(output.logits, targets, reduction), output.alignment_loss.float()

    def batch_ids(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["image_ids"]

    def describe_batch(self, ids: list[int]) -> tuple[str, str]:
        shown = ", ".join(map(str, ids[:8])) + (f" and {len(ids) - 8} more" if len(ids) > 8 else "")
        bad = _non_finite_image(self.train_set, ids)
        cause = f"; {bad[1]} of image {bad[0]} in {self.train_set.store.path} are not finite (Inf or NaN)" if bad else ""
        return f"images {shown}", cause

    def start_epoch(self, epoch: int) -> bool:
        set_frozen = getattr(self.model.question_encoder, "set_frozen", None)
        if set_frozen is None:
            return False
        set_frozen(epoch < self.config.model.minilm_freeze_epochs)
        return True  # captured graphs would keep the previous epoch's frozen set

    @torch.no_grad()
    def evaluate(self, dataset: Any = None, batch_size: int | None = None) -> dict[str, float]:
        """Official VQA accuracy of the top-1 answers (overall and per answer type; the scores of
        ``vqa_data.OfficialScores``, not the soft targets) and the validation loss."""
        dataset = dataset if dataset is not None else self.val_set
        if dataset is None or len(dataset) == 0 or not dataset.has_targets:
            return {}
        loader = self.loader(dataset, False, 0, 0, batch_size or max(self.config.train.batch_size, 256))
        total, loss_sum, n = 0.0, 0.0, 0
        per_type: dict[str, list[float]] = {}
        scores = self._official_scores(dataset)

        def check(batch: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            _check_finite_features(batch, dataset)
            return inputs

        for forward in forward_batches(self.model, loader, self.context.device, self.context.amp_dtype, check):
            logits, qids = forward.logits, forward.batch["question_ids"].tolist()
            acc = scores(qids, logits.argmax(-1).tolist())
            loss_sum += task_loss(logits, forward.batch["targets"].to(self.context.device), "sum").item()
            total += sum(acc)
            n += len(acc)
            for qid, a in zip(qids, acc):
                per_type.setdefault(self.answer_types.get(qid, "unknown"), []).append(a)
        self.model.train()
        result = {"val_accuracy": 100.0 * total / max(n, 1), "val_loss": loss_sum / max(n, 1)}
        for kind, values in sorted(per_type.items()):
            result[f"val_accuracy/{kind}"] = 100.0 * sum(values) / len(values)
        return result

    def _official_scores(self, dataset: Any) -> Any:
        """The split's official score table, built once per split (string rules, CPU)."""
        from vqa_align.data.vqa_v2 import OfficialScores

        if id(dataset) not in self._scores:
            self._scores[id(dataset)] = OfficialScores(dataset.records, self.answers)
        return self._scores[id(dataset)]

    def checkpoint_meta(self, best_score: float, best_step: int | None) -> dict[str, Any]:
        return {"extractor": json.loads(self.extractor.to_json()) if self.extractor is not None else None,
                "data": self.data_fingerprints}

    def check_resume(self, checkpoint: Path) -> None:
        from vqa_align.runs.checkpoint import checkpoint_extractor

        recorded = checkpoint_extractor(checkpoint)
        if recorded is not None and (self.extractor is None or recorded.key() != self.extractor.key()):
            now = self.extractor.describe() if self.extractor is not None else "an unrecorded extractor"
            raise UserError(f"--resume: {checkpoint} was trained on features of {recorded.describe()}, "
                            f"but the store now comes from {now}")
        from vqa_align.data.fingerprint import data_change

        try:
            recorded_data = json.loads((checkpoint / "meta.json").read_text()).get("data")
        except (OSError, ValueError, AttributeError):
            recorded_data = None  # unreadable meta.json: load_trainer_state and the weights name the damage
        change = data_change(recorded_data, self.data_fingerprints) if isinstance(recorded_data, dict) else None
        if change:
            raise UserError(f"--resume: {change}; {checkpoint} was trained on the old data and its weights (the "
                            f"order of its answer outputs, its features) do not fit the new: restore the old data "
                            f"or start a new run (another --out, or --overwrite)")

    def static_inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from vqa_align.train.cuda_graphs import pad_to_static

        dcfg = self.config.data
        return pad_to_static(inputs, dcfg.max_question_tokens, dcfg.max_regions)


def _fingerprints(bundle: Any, val_set: Any) -> dict[str, Any]:
    """The data fingerprints every checkpoint records (vqa_align/data/fingerprint.py)."""
    from vqa_align.data.fingerprint import data_fingerprints
    from vqa_align.runs.checkpoint import vocabulary_fingerprints

    stores = [bundle.store] + ([val_set.store] if val_set is not None else [])
    return data_fingerprints(bundle.files, stores, vocabulary_fingerprints(bundle.answers, bundle.tokenizer))


def _non_finite_image(dataset: Any, image_ids: list[int]) -> tuple[int, str] | None:
    """(image id, "features" or "boxes") of the first of ``image_ids`` whose stored regions hold Inf
    or NaN (read again from the store), or None."""
    store = dataset.store
    rows = store.rows(list(dict.fromkeys(image_ids)))
    try:
        return store.first_non_finite(rows[rows >= 0], dataset.max_regions)
    except OSError:
        return None


def _check_finite_features(batch: dict[str, torch.Tensor], dataset: Any) -> None:
    """Inf/NaN features would turn the validation loss into NaN and the run into a silent failure."""
    features = batch["features"]  # (B, N, D)
    finite = torch.isfinite(features).flatten(1).all(1)  # (B,)
    if not bool(finite.all()):
        image_id = int(batch["image_ids"][int((~finite).nonzero()[0, 0])])
        raise DataFormatError(
            f"{dataset.store.path}: features of image {image_id} are not finite (Inf or NaN); "
            f"fix or re-extract that image's features"
        )
