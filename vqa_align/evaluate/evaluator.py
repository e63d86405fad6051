"""Evaluating a checkpoint: official VQA accuracy, calibration, PAvPU, robustness to feature noise.

Probabilities are the softmax over the answer logits (the model is trained with per-answer BCE;
the softmax turns its scores into one distribution over answers, which confidence, top-k and the
MC-dropout test need). Accuracy is the official VQA metric on the predicted answer strings.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vqa_align.metrics.calibration import calibration_table, noise_features, pavpu, reliability_diagram
from vqa_align.runs.checkpoint import load_checkpoint
from vqa_align.errors import UserError
from vqa_align.model.finite import check_output
from vqa_align.model.mcan import MODEL_INPUTS
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
    top-1 confidence), and with ``mc_samples > 0`` ``pavpu`` (%) from MC-dropout samples.
    """
    from vqa_align.data.loaders import build_data, make_loader

    check_eval_options(batch_size=batch_size, noise_std=noise_std, mc_samples=mc_samples)
    ckpt = load_checkpoint(checkpoint, device=device)
    model, answers = ckpt.model, ckpt.answers
    if mc_samples > 0 and max(dropout_rates(model), default=0.0) == 0.0:
        # Refused rather than reported: every sample would be the same prediction, so the t-test
        # never finds an answer certain and PAvPU would only be the error rate under another name.
        raise UserError(
            f"--mc-samples {mc_samples}: the model in {ckpt.path} has no dropout (model.dropout: "
            f"{ckpt.config.model.dropout}), so all MC-dropout samples are identical and PAvPU is meaningless; "
            "leave --mc-samples out for this model"
        )
    bundle = build_data(ckpt.config.data, [split], tokenizer=ckpt.tokenizer, answers=answers)
    dataset = bundle.datasets[split]
    loader = make_loader(dataset, batch_size, shuffle=False, seed=0, num_workers=0, bucket=True, pin_memory=False)
    by_id = {r.question_id: r for r in dataset.records}
    generator = torch.Generator(device=device).manual_seed(seed)  # noise is drawn on the model's device

    results: list[dict[str, Any]] = []
    confidences: list[float] = []
    pavpu_counts = {"n_ac": 0.0, "n_au": 0.0, "n_ic": 0.0, "n_iu": 0.0, "n": 0.0}
    for batch in loader:
        inputs = {k: batch[k].to(device) for k in MODEL_INPUTS}
        if noise_std > 0:
            inputs["features"] = noise_features(inputs["features"], inputs["region_counts"], noise_std, generator)
        model.eval()
        logits = model(**inputs).logits
        check_output(logits, model, inputs["features"], inputs["region_counts"], batch["image_ids"].tolist(),
                     ckpt.path, ckpt.config.data.features)
        probs = logits.float().softmax(-1)  # (B, A)
        confidence, top = probs.max(-1)
        predicted = [answers[i] for i in top.tolist()]
        ids = batch["question_ids"].tolist()
        results += [{"question_id": q, "answer": a} for q, a in zip(ids, predicted)]
        confidences += confidence.tolist()
        if mc_samples > 0 and dataset.has_targets:
            # MC dropout: dropout on, alignment off (it does not change the prediction).
            model.train()
            samples = torch.stack([model(**inputs, compute_alignment=False).logits.float().softmax(-1)
                                   for _ in range(mc_samples)])  # (S, B, A)
            model.eval()
            mean_top = samples.mean(0).argmax(-1).tolist()
            accuracy_of_mean = np.array([question_accuracy(answers[i], by_id[q].answers) for q, i in zip(ids, mean_top)])
            counts = pavpu(samples.cpu().numpy(), accuracy_of_mean, PAVPU_P_THRESHOLD)
            for key in pavpu_counts:
                pavpu_counts[key] += counts[key]

    metrics: dict[str, Any] = {"split": split, "questions": len(results), "noise_std": noise_std}
    if results_out is not None:
        Path(results_out).parent.mkdir(parents=True, exist_ok=True)
        Path(results_out).write_text(json.dumps(results))
        metrics["results_file"] = str(results_out)
    if dataset.has_targets and results:
        questions, annotations = _official_inputs(dataset.records, results)
        scores = official_evaluate(questions, annotations, results)
        correct = np.array([question_accuracy(r["answer"], by_id[r["question_id"]].answers) for r in results])
        table = calibration_table(np.array(confidences), correct, ECE_BINS)
        metrics.update(accuracy=scores["overall"], perAnswerType=scores["perAnswerType"], ece=100.0 * table.ece)
        if mc_samples > 0:
            n = max(pavpu_counts["n"], 1.0)
            metrics.update(pavpu=100.0 * (pavpu_counts["n_ac"] + pavpu_counts["n_iu"]) / n, mc_samples=mc_samples)
        if out_dir is not None:
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            reliability_diagram(np.array(confidences), correct, ECE_BINS, path=out / "reliability.png",
                                title=f"{split}: ECE {100 * table.ece:.2f}%")
            metrics["perQuestionType"] = scores["perQuestionType"]
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
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
    return 0
