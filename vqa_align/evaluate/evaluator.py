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
from typing import Any

import numpy as np
import torch

from vqa_align.metrics.calibration import calibration_table, noise_features, pavpu, reliability_diagram
from vqa_align.runs.checkpoint import load_checkpoint
from vqa_align.errors import UserError
from vqa_align.evaluate.loop import forward_batches
from vqa_align.model.finite import check_output
from vqa_align.progress import Progress
from vqa_align.metrics.vqa_accuracy import evaluate as official_evaluate
from vqa_align.metrics.vqa_accuracy import question_accuracy

ECE_BINS = 15
PAVPU_P_THRESHOLD = 0.05  # the paper's p


def _official_inputs(records: list[Any], results: list[dict[str, Any]]) -> tuple[dict, dict]:
    """Questions/annotations JSON (official schema) restricted to the evaluated questions."""
    questions = {"questions": [{"image_id": r.image_id, "question": r.question, "question_id": r.question_id}
                               for r in records]}
    annotations = {"annotations": [{
        "question_id": r.question_id, "image_id": r.image_id, "question_type": r.question_type or "",
        "answer_type": r.answer_type, "multiple_choice_answer": r.multiple_choice_answer,
        "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(r.answers)],
    } for r in records]}
    return questions, annotations


def check_eval_options(batch_size: int, noise_std: float, mc_samples: int) -> None:
    """The options of ``vqa-align eval`` (also checked when the function is called from Python)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"--batch-size must be an integer >= 1, got {batch_size!r}")
    if not isinstance(noise_std, (int, float)) or not math.isfinite(noise_std) or noise_std < 0:
        raise UserError(f"--noise-std must be a finite number >= 0, got {noise_std!r}")
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
    ckpt = load_checkpoint(checkpoint, device=device)
    if mc_samples > 0 and max(dropout_rates(ckpt.model), default=0.0) == 0.0:
        # Refused rather than reported: every sample would be the same prediction, so the t-test
        # never finds an answer certain and PAvPU would only be the error rate under another name.
        raise UserError(
            f"--mc-samples {mc_samples}: the model in {ckpt.path} has no dropout (model.dropout: "
            f"{ckpt.config.model.dropout}), so all MC-dropout samples are identical and PAvPU is meaningless; "
            "leave --mc-samples out for this model"
        )
    bundle = build_data(ckpt.config.data, [split], tokenizer=ckpt.tokenizer, answers=ckpt.answers)
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
            noisy = _answer(ckpt, dataset, batch_size, device, noise_std, 0, seed, f"eval {split} noise {noise_std:g}")
            scores = _scores(dataset.records, noisy, 0, split, None)
            drop = round(metrics["accuracy"] - scores["accuracy"], 2)  # the accuracies have 2 decimals
            metrics["noisy"] = {"accuracy": scores["accuracy"], "perAnswerType": scores["perAnswerType"],
                                "ece": scores["ece"], "accuracy_drop": drop}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


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
        check_output(logits, model, inputs["features"], inputs["region_counts"], forward.batch["image_ids"].tolist(),
                     ckpt.path, ckpt.config.data.features)
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
    questions, annotations = _official_inputs(records, results)
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
        reliability_diagram(confidences, correct, ECE_BINS, path=out / "reliability.png",
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
