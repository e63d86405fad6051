"""Evaluating a checkpoint: official VQA accuracy, calibration, PAvPU, robustness to feature noise.

Probabilities are the softmax over the answer logits (the model is trained with per-answer BCE;
the softmax turns its scores into one distribution over answers, which confidence, top-k and the
MC-dropout test need). Accuracy is the official VQA metric on the predicted answer strings.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from vqa_align.metrics.calibration import calibration_table, noise_features, pavpu, reliability_diagram
from vqa_align.runs.checkpoint import load_checkpoint
from vqa_align.runs.hub import locate_run
from vqa_align.data.vqa_v2 import load_split, vqa_json
from vqa_align.errors import UserError
from vqa_align.paths import check_output_paths
from vqa_align.evaluate.loop import forward_batches
from vqa_align.model.finite import check_output
from vqa_align.progress import Progress
from vqa_align.metrics.vqa_accuracy import evaluate as official_evaluate
from vqa_align.metrics.vqa_accuracy import question_accuracy

ECE_BINS = 15
PAVPU_P_THRESHOLD = 0.05  # the paper's p
METRICS_FILE, RELIABILITY_FILE = "metrics.json", "reliability.png"  # what --out DIR receives


# Region features of every extractor here are O(1)-O(10): noise of sigma 1000 already drowns them a
# hundredfold (answers at chance), so larger values measure nothing, and from about 1e17 the model's
# float32 sums overflow into Inf (an error about the noise, not about the data).
MAX_NOISE_STD = 1000.0


def check_eval_options(batch_size: int, noise_std: float, mc_samples: int) -> None:
    """The options of ``vqa-align eval`` (also checked when the function is called from Python)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"--batch-size must be an integer >= 1, got {batch_size!r}")
    if (isinstance(noise_std, bool) or not isinstance(noise_std, (int, float)) or not math.isfinite(noise_std)
            or not 0 <= noise_std <= MAX_NOISE_STD):
        raise UserError(f"--noise-std must be a number from 0 to {MAX_NOISE_STD:g}, got {noise_std!r}")
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 0 or mc_samples == 1:
        raise UserError(f"--mc-samples must be 0 (off) or >= 2 (a t-test needs two samples), got {mc_samples!r}")


def dropout_rates(model: torch.nn.Module) -> list[float]:
    """The dropout probabilities in ``model``: dropout layers and attention-weight dropout."""
    rates = [float(m.p) for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    # Attention modules apply dropout to their weights functionally (a float attribute, no layer).
    rates += [float(m.dropout) for m in model.modules()
              if isinstance(getattr(m, "dropout", None), float) and not isinstance(m, torch.nn.Dropout)]
    return rates


@dataclass
class Answers:
    """What checkpoint evaluation collects from the model over a split."""

    results: list[dict[str, Any]] = field(default_factory=list)  # {"question_id", "answer"}, the official format
    confidences: list[float] = field(default_factory=list)  # top-1 softmax probability per question
    pavpu_counts: dict[str, float] = field(default_factory=lambda: dict.fromkeys(("n_ac", "n_au", "n_ic", "n_iu", "n"), 0.0))


@torch.no_grad()
def evaluate_checkpoint(
    checkpoint: str | Path,
    split: str = "val",
    noise_std: float = 0.0,
    mc_samples: int = 0,
    results_out: str | Path | None = None,
    out_dir: str | Path | None = None,
    batch_size: int = 256,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Answer every question of ``split`` and score the answers (when the split has annotations).

    Returns a dict with ``accuracy`` (official overall, %), ``perAnswerType``, ``ece`` (%, 15 bins,
    top-1 confidence), and with ``mc_samples > 0`` ``pavpu`` (%) from MC-dropout samples, all of
    the clean features. With ``noise_std > 0`` (and annotations) a second pass under N(0, s²)
    feature noise adds ``noisy``: its ``accuracy``, ``perAnswerType``, ``ece`` and ``accuracy_drop``
    (clean minus noisy). ``results_out`` receives the clean answers.
    """
    from vqa_align.data.loaders import build_data

    check_eval_options(batch_size=batch_size, noise_std=noise_std, mc_samples=mc_samples)
    ckpt = load_checkpoint(locate_run(checkpoint), device=device)  # a local folder or a Hub repo id
    if mc_samples > 0 and max(dropout_rates(ckpt.model), default=0.0) == 0.0:
        # Refused rather than reported: every sample would be the same prediction, so the t-test
        # never finds an answer certain and PAvPU would only be the error rate under another name.
        raise UserError(
            f"--mc-samples {mc_samples}: the model in {ckpt.path} has no dropout (model.dropout: "
            f"{ckpt.config.model.dropout}), so all MC-dropout samples are identical and PAvPU is meaningless; "
            "leave --mc-samples out for this model"
        )
    bundle = build_data(ckpt.config.data, [split], tokenizer=ckpt.tokenizer, answers=ckpt.answers)
    check_eval_outputs(ckpt.path, ckpt.config.data, results_out, out_dir)
    dataset = bundle.datasets[split]
    answers = _answer(ckpt, dataset, batch_size, device, 0.0, mc_samples if dataset.has_targets else 0, seed,
                      f"eval {split}")
    metrics: dict[str, Any] = {"split": split, "questions": len(answers.results), "noise_std": noise_std}
    if results_out is not None:
        Path(results_out).parent.mkdir(parents=True, exist_ok=True)
        Path(results_out).write_text(json.dumps(answers.results))
        metrics["results_file"] = str(results_out)
    if dataset.has_targets and answers.results:
        metrics.update(_scores(dataset.records, answers, mc_samples, split, out_dir))
        if noise_std > 0:  # without annotations a noisy pass would have nothing to be compared with
            noisy = _noisy_scores(ckpt, dataset, split, noise_std, batch_size, device, seed)
            drop = round(metrics["accuracy"] - noisy["accuracy"], 2)  # the accuracies have 2 decimals
            metrics["noisy"] = {**noisy, "accuracy_drop": drop}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    _refresh_model_card(ckpt.path, metrics)
    return metrics


def _noisy_scores(ckpt: Any, dataset: Any, split: str, noise_std: float, batch_size: int, device: str,
                  seed: int) -> dict[str, Any]:
    """Accuracy, per-type accuracy and ECE of one pass under N(0, noise_std²) feature noise (its own
    generator, seeded by ``seed``: the same numbers whatever ran before)."""
    answers = _answer(ckpt, dataset, batch_size, device, noise_std, 0, seed, f"eval {split} noise {noise_std:g}")
    scores = _scores(dataset.records, answers, 0, split, None)
    return {"accuracy": scores["accuracy"], "perAnswerType": scores["perAnswerType"], "ece": scores["ece"]}


@torch.no_grad()
def evaluate_under_noise(checkpoint: str | Path, split: str, noise_stds: Sequence[float], batch_size: int = 256,
                         device: str = "cpu", seed: int = 0) -> dict[float, dict[str, Any]]:
    """The ``noisy`` numbers of :func:`evaluate_checkpoint` for several noise levels, the checkpoint
    and split loaded once and no clean pass (the experiment has its clean one)."""
    from vqa_align.data.loaders import build_data

    for noise_std in noise_stds:
        check_eval_options(batch_size=batch_size, noise_std=noise_std, mc_samples=0)
    ckpt = load_checkpoint(locate_run(checkpoint), device=device)
    dataset = build_data(ckpt.config.data, [split], tokenizer=ckpt.tokenizer, answers=ckpt.answers).datasets[split]
    if not dataset.has_targets:
        raise UserError(f"the {split!r} split has no annotations: nothing to score under noise")
    return {s: _noisy_scores(ckpt, dataset, split, s, batch_size, device, seed) for s in noise_stds}


def _refresh_model_card(checkpoint: Path, metrics: dict[str, Any]) -> None:
    """Put the score into the model card of the run ``checkpoint`` belongs to: only a run folder
    vqa-align made (its marker), never a download in the Hugging Face cache; a run that cannot be
    written (read-only) keeps its card, with a note."""
    import sys

    from vqa_align.runs.hub import in_hub_cache
    from vqa_align.runs.model_card import record_evaluation
    from vqa_align.runs.run_folder import RUN_MARKER

    run = checkpoint.parent.parent
    if checkpoint.parent.name != "checkpoints" or not (run / RUN_MARKER).is_file() or in_hub_cache(run):
        return
    try:
        record_evaluation(run, checkpoint, metrics)
    except OSError as err:
        print(f"note: the model card of {run} was not updated ({err.strerror or err})", file=sys.stderr)


def check_eval_outputs(checkpoint: Path, data: Any, results_out: str | Path | None, out_dir: str | Path | None) -> None:
    """Refuse outputs that are (or lie inside) the checkpoint or a data file the evaluation reads."""
    from vqa_align.data.loaders import resolve_files

    store, files = resolve_files(data)
    read = [path for split in files.values() for group in split.values() for path in group]
    inputs = [checkpoint, store, data.val_features, *read]
    if results_out is not None:
        check_output_paths([results_out], inputs, option="--results-out")
    if out_dir is not None:
        check_output_paths([Path(out_dir) / METRICS_FILE, Path(out_dir) / RELIABILITY_FILE], inputs)


@torch.no_grad()
def answer_questions_file(checkpoint: str | Path, questions: str | Path, batch_size: int = 256,
                          device: str = "cpu") -> list[dict[str, Any]]:
    """The checkpoint's top-1 answer to every question of a VQA questions file, in the official
    results format (``[{"question_id": int, "answer": str}]``, the file's order), about the
    pictures of the run's feature store (``data.features``)."""
    from vqa_align.data.loaders import VQADataset, feature_store_path
    from vqa_align.extract.feature_store import FeatureStore

    check_eval_options(batch_size=batch_size, noise_std=0.0, mc_samples=0)
    ckpt = load_checkpoint(locate_run(checkpoint), device=device)  # a local folder or a Hub repo id
    records = load_split([questions])
    if not records:
        raise UserError(f"{questions}: the file has no questions")
    store_path = feature_store_path(ckpt.config.data)
    if store_path is None:
        raise UserError(f"{ckpt.path}: the run's config names no feature store (data.features)")
    store = FeatureStore(store_path)
    rows = store.rows(np.fromiter((r.image_id for r in records), np.int64, len(records)))  # (Q,) -1: absent
    if (rows < 0).any():
        first = records[int(np.flatnonzero(rows < 0)[0])]
        raise UserError(f"{questions}: question_id {first.question_id} is about image_id {first.image_id}, which is "
                        f"not in the run's feature store {store_path} ({int((rows < 0).sum())} question(s) affected)")
    data = ckpt.config.data
    dataset = VQADataset(records, store, ckpt.tokenizer, max_tokens=data.max_question_tokens,
                         max_regions=data.max_regions, name=str(questions))
    order = {r.question_id: k for k, r in enumerate(records)}
    results = _answer(ckpt, dataset, batch_size, device, noise_std=0.0, mc_samples=0, seed=0,
                      desc=f"predict {Path(questions).name}").results
    return sorted(results, key=lambda r: order[r["question_id"]])  # the loader batches by region count


def _answer(ckpt: Any, dataset: Any, batch_size: int, device: str, noise_std: float, mc_samples: int,
            seed: int, desc: str) -> Answers:
    """The top-1 answers of every question of ``dataset`` (with ``noise_std``: under feature noise)
    and, with ``mc_samples``, the PAvPU counts of that many MC-dropout samples per question; its
    progress on stderr, the lines opened by ``desc``."""
    from vqa_align.data.loaders import make_loader

    model, answers = ckpt.model, ckpt.answers
    loader = make_loader(dataset, batch_size, shuffle=False, seed=0, num_workers=0, bucket=True, pin_memory=False)
    by_id = {r.question_id: r for r in dataset.records}
    generator = torch.Generator(device=device).manual_seed(seed)  # noise is drawn on the model's device

    def add_noise(batch: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if noise_std > 0:
            inputs["features"] = noise_features(inputs["features"], inputs["region_counts"], noise_std, generator)
        return inputs

    out = Answers()
    batches = Progress(loader, len(loader), desc, unit="questions")
    for done, forward in enumerate(forward_batches(model, batches, device, prepare=add_noise), 1):
        inputs, logits = forward.inputs, forward.logits
        # The features as stored (before the noise): NaN there is the store's fault, not the noise's.
        check_output(logits, model, forward.batch["features"], forward.batch["region_counts"],
                     forward.batch["image_ids"].tolist(), ckpt.path, ckpt.config.data.features,
                     boxes=forward.batch["boxes"], noise_std=noise_std)
        confidence, top = logits.softmax(-1).max(-1)  # (B,) of the probabilities (B, A)
        ids = forward.batch["question_ids"].tolist()
        out.results += [{"question_id": q, "answer": answers[i]} for q, i in zip(ids, top.tolist())]
        out.confidences += confidence.tolist()
        if mc_samples > 0:
            # MC dropout: dropout on, alignment off (it does not change the prediction).
            model.train()
            samples = torch.stack([model(**inputs, compute_alignment=False).logits.float().softmax(-1)
                                   for _ in range(mc_samples)])  # (S, B, A)
            model.eval()
            mean_top = samples.mean(0).argmax(-1).tolist()
            accuracy_of_mean = np.array([question_accuracy(answers[i], by_id[q].answers) for q, i in zip(ids, mean_top)])
            counts = pavpu(samples.cpu().numpy(), accuracy_of_mean, PAVPU_P_THRESHOLD)
            for key in out.pavpu_counts:
                out.pavpu_counts[key] += counts[key]
        batches.step(len(ids), done, f"{desc} batch {done}/{len(loader)}")
    batches.close()
    return out


def _scores(records: list[Any], answers: Answers, mc_samples: int, split: str,
            out_dir: str | Path | None) -> dict[str, Any]:
    """Official accuracy, ECE and (MC dropout) PAvPU of ``answers``; with ``out_dir`` the
    reliability diagram there and the per-question-type accuracies."""
    results, confidences = answers.results, np.array(answers.confidences)
    by_id = {r.question_id: r for r in records}
    questions, annotations = vqa_json(records)
    scores = official_evaluate(questions, annotations, results)
    correct = np.array([question_accuracy(r["answer"], by_id[r["question_id"]].answers) for r in results])
    table = calibration_table(confidences, correct, ECE_BINS)
    metrics = {"accuracy": scores["overall"], "perAnswerType": scores["perAnswerType"], "ece": 100.0 * table.ece}
    if mc_samples > 0:
        counts = answers.pavpu_counts
        metrics.update(pavpu=100.0 * (counts["n_ac"] + counts["n_iu"]) / max(counts["n"], 1.0), mc_samples=mc_samples)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        reliability_diagram(confidences, correct, ECE_BINS, path=out / RELIABILITY_FILE,
                            title=f"{split}: ECE {100 * table.ece:.2f}%")
        metrics["perQuestionType"] = scores["perQuestionType"]
    return metrics


def run_eval(args: argparse.Namespace) -> int:
    metrics = evaluate_checkpoint(
        args.checkpoint,
        split=args.split,
        noise_std=args.noise_std,
        mc_samples=args.mc_samples,
        results_out=args.results_out,
        out_dir=args.out,
        batch_size=args.batch_size,
    )
    print(json.dumps({k: v for k, v in metrics.items() if k != "perQuestionType"}, indent=2))
    if "noisy" in metrics:
        noisy = metrics["noisy"]
        print(f"accuracy {metrics['accuracy']:.2f} clean, {noisy['accuracy']:.2f} under N(0, {args.noise_std:g}²) "
              f"feature noise (drop {noisy['accuracy_drop']:.2f})", file=sys.stderr)
    return 0
