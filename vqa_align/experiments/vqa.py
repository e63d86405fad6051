"""Experiments: train every (method, seed), evaluate each run, write one report.

    vqa-align experiment --config configs/easy_vqa.yaml --methods none,gan,ct,ot --seeds 0,1,2 \
        --out reports/easy_vqa

Layout of ``--out``::

    runs/<method>_seed<seed>/   a training run (config.yaml, metrics.jsonl, checkpoints/), its
                                evaluation (eval/metrics.json, eval/reliability.png) and done.json
    report.md                   one table (mean ± std over seeds), findings, setup, figures
    results.json                every number per run, the aggregates, the commands, the config
    fig1_alignment.png          queries and keys of one head in a shared 2-D PCA, two methods
    mmd_per_layer.png           per-layer MMD² per method and module type
    reliability_<method>.png    reliability diagram of the method's first seed
    curves.png                  validation accuracy and task loss against steps, per method

Resuming. ``done.json`` is written last, after the evaluation: a run that has it is read, never
redone (unless the evaluation settings changed: then it is evaluated again, not retrained). A run
whose ``checkpoints/last`` exists continues from it (``resume=True``); a run whose training
finished but whose evaluation did not is only evaluated. Every run folder remembers its config; a
rerun with a different config into the same ``--out`` is refused rather than mixed.

What is evaluated: ``checkpoints/last`` (the final model; ``best`` was selected on the same
validation split and would flatter every method) on the ``val`` split. The pure pieces
(:func:`mean_std`, :func:`aggregate`, :func:`render_table`, :func:`findings`, ...) take and return
plain dicts so they can be tested without training anything.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vqa_align.config import ALIGNMENT_METHODS, ALIGNMENT_MODULES, MAX_SEED, Config, load_config
from vqa_align.errors import UserError

EVAL_SPLIT = "val"
EVAL_CHECKPOINT = "last"
DONE_FILE = "done.json"
NOISE_STDS = (1.0, 0.1)  # the paper's σ = 1, and a smaller one that does not wipe out the signal
MC_SAMPLES = 20  # the paper's MC-dropout samples for PAvPU
MMD_QUESTIONS = 512  # validation questions over which MMD² is averaged (MMD is O(N²) per head)
MMD_BATCH = 64
FIG1_KIND, FIG1_HEAD = "sga_guided", 0  # cross-modal: the paper's motivating case; last layer
BASELINE = "none"
KIND_LABELS = {"sa_question": "SA-q", "sa_image": "SA-img", "sga_guided": "SGA"}
ANSWER_TYPE_ORDER = ("yes/no", "number", "other")
# Run-environment fields that may differ between an interrupted run and its resumption.
ENVIRONMENT_KEYS = (("model", "vocab_size"), ("model", "num_answers"), ("train", "device"),
                    ("data", "num_workers"), ("data", "pin_memory"), ("data", "cache_dir"))


# ----------------------------------------------------------------------------------------------
# Pure pieces: parsing, commands, aggregation, table, findings
# ----------------------------------------------------------------------------------------------


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in methods if m not in ALIGNMENT_METHODS]
    if not methods or bad:
        raise UserError(f"--methods {text!r}: expected a comma-separated subset of {','.join(ALIGNMENT_METHODS)}")
    return list(dict.fromkeys(methods))  # drop repeats, keep the user's order


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not seeds:
        raise UserError(f"--seeds {text!r}: give at least one seed")
    bad = [s for s in seeds if not 0 <= s <= MAX_SEED]
    if bad:
        raise UserError(f"--seeds {text!r}: seeds must lie in [0, {MAX_SEED}], got {bad[0]}")
    return list(dict.fromkeys(seeds))


def experiment_command(config: str, methods: Sequence[str], seeds: Sequence[int], overrides: Sequence[str],
                       out: str) -> str:
    """The ``vqa-align experiment`` command line that reproduces an experiment (shell-quoted)."""
    parts = ["vqa-align", "experiment", "--config", config, "--methods", ",".join(methods),
             "--seeds", ",".join(str(s) for s in seeds)]
    for override in overrides:
        parts += ["--set", override]
    return shlex.join(parts + ["--out", out])


def run_overrides(overrides: Sequence[str], method: str, seed: int) -> list[str]:
    """User overrides plus the two the grid varies (last, so they win)."""
    return [*overrides, f"model.alignment.method={method}", f"train.seed={seed}"]


def pavpu_samples(config: Config, mc_samples: int) -> int:
    """MC-dropout samples for a run: none for a model without dropout (``vqa-align eval`` refuses
    PAvPU there: every sample is the same prediction); its report cell stays empty."""
    return mc_samples if config.model.dropout > 0 else 0


def run_commands(config: str, overrides: Sequence[str], method: str, seed: int, run_dir: str,
                 noise_stds: Sequence[float], mc_samples: int) -> dict[str, list[str]]:
    """Equivalent single-run commands (train, then eval) of one grid cell."""
    sets = [a for o in run_overrides(overrides, method, seed) for a in ("--set", o)]
    ckpt = f"{run_dir}/checkpoints/{EVAL_CHECKPOINT}"
    mc = ["--mc-samples", str(mc_samples)] if mc_samples > 0 else []
    evals = [shlex.join(["vqa-align", "eval", "--checkpoint", ckpt, "--split", EVAL_SPLIT, *mc,
                         "--out", f"{run_dir}/eval"])]
    evals += [shlex.join(["vqa-align", "eval", "--checkpoint", ckpt, "--split", EVAL_SPLIT, "--noise-std", f"{s:g}"])
              for s in noise_stds]
    return {"train": [shlex.join(["vqa-align", "train", "--config", config, *sets, "--out", run_dir])],
            "eval": evals}


def mean_std(values: Iterable[float | None]) -> dict[str, float | int]:
    """Mean and sample standard deviation (ddof = 1; 0 for one value) of the finite values."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    std = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return {"mean": statistics.fmean(finite), "std": std, "n": len(finite)}


def aggregate(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, float | int]]]:
    """{method: {metric: mean_std}} from runs ``{"method": str, "metrics": {metric: float}}``."""
    by_method: dict[str, list[dict[str, float]]] = {}
    for run in runs:
        by_method.setdefault(run["method"], []).append(run["metrics"])
    out: dict[str, dict[str, dict[str, float | int]]] = {}
    for method, metrics in by_method.items():
        keys = list(dict.fromkeys(k for m in metrics for k in m))
        out[method] = {k: mean_std(m.get(k) for m in metrics) for k in keys}
    return out


@dataclass(frozen=True)
class Metric:
    """One column of the report: its key in the flat metrics, header, direction and format."""

    key: str
    label: str
    higher_is_better: bool | None  # None: no "best" (e.g. parameter counts)
    digits: int = 2
    kind: str = "number"  # "number" | "count" (parameters: 1.23M)


def flat_metrics(result: dict[str, Any]) -> dict[str, float]:
    """One run's evaluation result (as in done.json) -> {metric key: number} for aggregation."""
    out = {"accuracy": result["accuracy"]}
    out.update({f"accuracy_{t}": v for t, v in result.get("per_answer_type", {}).items()})
    out.update({f"noisy_accuracy_{s}": v for s, v in result.get("noisy_accuracy", {}).items()})
    # Robustness as the accuracy lost to noise: a model that is simply better also scores higher
    # under noise, so the drop is what the paper's robustness claim is about.
    out.update({f"noise_drop_{s}": result["accuracy"] - v for s, v in result.get("noisy_accuracy", {}).items()})
    for key in ("ece", "pavpu", "seconds_per_step", "train_minutes", "parameters", "inference_parameters"):
        if result.get(key) is not None:
            out[key] = result[key]
    out.update({f"mmd2_{k}": v for k, v in result.get("mmd2", {}).items()})
    out.update({f"ct_{k}": v for k, v in result.get("ct", {}).items()})
    return out


def report_metrics(answer_types: Iterable[str], noise_stds: Sequence[float], kinds: Iterable[str]) -> list[Metric]:
    """The columns of the report table, in order."""
    types = sorted(set(answer_types), key=lambda t: (ANSWER_TYPE_ORDER.index(t) if t in ANSWER_TYPE_ORDER else 9, t))
    cols = [Metric("accuracy", "accuracy", True)]
    cols += [Metric(f"accuracy_{t}", f"acc {t}", True) for t in types]
    cols += [Metric(f"noisy_accuracy_{s:g}", f"acc σ={s:g}", True) for s in noise_stds]
    cols += [Metric("ece", "ECE ↓", False), Metric("pavpu", "PAvPU", True)]
    cols += [Metric(f"mmd2_{k}", f"MMD² {KIND_LABELS.get(k, k)} ↓", False, 4) for k in kinds]
    cols += [Metric("seconds_per_step", "s/step", False, 3),
             Metric("parameters", "params (train)", None, kind="count"),
             Metric("inference_parameters", "params (infer)", None, kind="count")]
    return cols


def drop_metrics(noise_stds: Sequence[float]) -> list[Metric]:
    """Accuracy lost to noise (clean − noisy, points): in results.json and the findings, not the table."""
    return [Metric(f"noise_drop_{s:g}", f"accuracy drop under σ={s:g} noise ↓", False) for s in noise_stds]


def format_count(n: float) -> str:
    if not math.isfinite(n):
        return "–"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def format_stat(stat: dict[str, float | int] | None, metric: Metric) -> str:
    if stat is None or not stat["n"]:
        return "–"
    if metric.kind == "count":
        return format_count(stat["mean"])
    mean = f"{stat['mean']:.{metric.digits}f}"
    return mean if stat["n"] < 2 else f"{mean} ± {stat['std']:.{metric.digits}f}"


def best_method(aggregates: dict[str, dict[str, dict[str, float | int]]], metric: Metric,
                methods: Sequence[str]) -> list[str]:
    """Methods ranked best first on ``metric`` (methods without a value are left out)."""
    present = [m for m in methods if aggregates.get(m, {}).get(metric.key, {}).get("n")]
    return sorted(present, key=lambda m: aggregates[m][metric.key]["mean"], reverse=bool(metric.higher_is_better))


def render_table(aggregates: dict[str, dict[str, dict[str, float | int]]], metrics: Sequence[Metric],
                 methods: Sequence[str]) -> str:
    """Markdown table: one row per method, one column per metric, the best mean in bold."""
    best = {}
    for metric in metrics:
        ranked = best_method(aggregates, metric, methods) if metric.higher_is_better is not None else []
        if len(ranked) > 1 and aggregates[ranked[0]][metric.key]["mean"] != aggregates[ranked[1]][metric.key]["mean"]:
            best[metric.key] = ranked[0]  # no bold for a tie
    lines = ["| method | seeds | " + " | ".join(m.label for m in metrics) + " |",
             "|---|---:|" + "---:|" * len(metrics)]
    for method in methods:
        stats = aggregates.get(method, {})
        seeds = max((s["n"] for s in stats.values()), default=0)
        cells = []
        for metric in metrics:
            text = format_stat(stats.get(metric.key), metric)
            cells.append(f"**{text}**" if best.get(metric.key) == method else text)
        lines.append(f"| `{method}` | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _stat_text(stat: dict[str, float | int], digits: int) -> str:
    return f"{stat['mean']:.{digits}f}" + (f" ± {stat['std']:.{digits}f}" if stat["n"] > 1 else "")


def clear_difference(a: dict[str, float | int], b: dict[str, float | int]) -> bool | None:
    """Does |mean_a − mean_b| exceed the larger of the two stds? None when a std is unknown (n < 2).

    A heuristic, stated as such in the report: with three seeds no test has much power."""
    if a["n"] < 2 or b["n"] < 2:
        return None
    return abs(a["mean"] - b["mean"]) > max(a["std"], b["std"])


def findings(aggregates: dict[str, dict[str, dict[str, float | int]]], metrics: Sequence[Metric],
             methods: Sequence[str], baseline: str = BASELINE) -> list[str]:
    """Bullet points generated from the numbers: the best method per metric and whether its lead
    over the runner-up is clear, and per aligned method its clear wins and losses against the
    baseline. Nothing here is written by hand."""
    lines: list[str] = []
    ranked_metrics = [m for m in metrics if m.higher_is_better is not None]
    acc = [aggregates[m]["accuracy"]["mean"] for m in methods if aggregates.get(m, {}).get("accuracy", {}).get("n")]
    if acc and min(acc) >= 99.0:
        lines.append(f"Clean accuracy saturates: every method reaches ≥ 99% ({min(acc):.2f}–{max(acc):.2f}), so it "
                     "cannot separate the methods; look at the noisy-feature, calibration and MMD² columns.")
    for metric in ranked_metrics:
        ranked = best_method(aggregates, metric, methods)
        if len(ranked) < 2:
            continue
        first, second = (aggregates[m][metric.key] for m in ranked[:2])
        name = metric.label.replace(" ↓", "")
        word = "highest" if metric.higher_is_better else "lowest"
        text = (f"**{name}**: {word} `{ranked[0]}` {_stat_text(first, metric.digits)}, "
                f"next `{ranked[1]}` {_stat_text(second, metric.digits)}")
        clear = clear_difference(first, second)
        if first["mean"] == second["mean"]:
            text = f"**{name}**: `{ranked[0]}` and `{ranked[1]}` tie at {_stat_text(first, metric.digits)}."
        elif clear is None:
            text += " (one seed: no spread to compare the gap with)."
        elif clear:
            text += f"; the gap {abs(first['mean'] - second['mean']):.{metric.digits}f} exceeds both stds."
        else:
            tied = [m for m in ranked[1:] if clear_difference(first, aggregates[m][metric.key]) is False]
            text += (f"; the gap {abs(first['mean'] - second['mean']):.{metric.digits}f} is within one std "
                     f"(indistinguishable from {', '.join(f'`{m}`' for m in tied)} with these seeds).")
        lines.append(text)
    if baseline in methods and aggregates.get(baseline):
        for method in methods:
            if method == baseline or method not in aggregates:
                continue
            wins, losses, ties = [], [], []
            for metric in ranked_metrics:
                a, b = aggregates[method].get(metric.key), aggregates[baseline].get(metric.key)
                if not a or not b or not a["n"] or not b["n"]:
                    continue
                better = (a["mean"] > b["mean"]) == bool(metric.higher_is_better)
                name = metric.label.replace(" ↓", "")
                if a["mean"] == b["mean"] or clear_difference(a, b) is False:
                    ties.append(name)
                else:  # a clear gap, or one seed (no spread to judge by: reported as such)
                    (wins if better else losses).append(name)
            one_seed = any(s["n"] < 2 for s in aggregates[method].values())
            kind = "better/worse (one seed, no spread)" if one_seed else "clearly better/worse (gap > std)"
            lines.append(f"`{method}` vs `{baseline}`, {kind}: better on {', '.join(wins) or 'nothing'}; "
                         f"worse on {', '.join(losses) or 'nothing'}"
                         + (f"; {'tied' if one_seed else 'within one std'} on {', '.join(ties)}." if ties else "."))
    return lines


def seconds_per_step(records: Sequence[dict[str, Any]], samples_per_step: int) -> float | None:
    """Median seconds per optimizer step from the ``train`` records of metrics.jsonl.

    Each record's ``samples_per_s`` covers the window since the previous record, so the median
    over windows ignores the first window's start-up cost."""
    rates = [r["samples_per_s"] for r in records if r.get("kind") == "train" and r.get("samples_per_s")]
    if not rates:
        return None
    return samples_per_step / statistics.median(rates)


def _json_safe(value: Any) -> Any:
    """NaN/inf -> None (JSON has no NaN), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def config_signature(config: Config | dict[str, Any]) -> dict[str, Any]:
    """The config without run-environment fields: what must match for a run to be reused."""
    data = json.loads(json.dumps(config.to_dict() if isinstance(config, Config) else config))
    for section, key in ENVIRONMENT_KEYS:
        data.get(section, {}).pop(key, None)
    return data


# ----------------------------------------------------------------------------------------------
# One run: train (or resume, or skip), evaluate
# ----------------------------------------------------------------------------------------------


def run_name(method: str, seed: int) -> str:
    return f"{method}_seed{seed}"


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_json_safe(data), indent=2))
    os.replace(tmp, path)  # atomic: done.json is the "finished" marker


def _check_same_config(run_dir: Path, config: Config) -> None:
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    import yaml

    if config_signature(yaml.safe_load(saved.read_text())) != config_signature(config):
        raise UserError(f"{run_dir} was made with a different config; use another --out or delete that folder")


def training_state(run_dir: Path, config: Config) -> str:
    """"new" (nothing to resume), "partial" (resume from checkpoints/last) or "complete"."""
    meta_file = run_dir / "checkpoints" / "last" / "meta.json"
    if not meta_file.is_file():
        return "new"
    meta = json.loads(meta_file.read_text())
    max_steps = config.train.max_steps
    if meta.get("epoch", 0) >= config.train.epochs or (max_steps is not None and meta.get("global_step", 0) >= max_steps):
        return "complete"
    return "partial"


def parameter_counts(model: Any) -> tuple[int, int]:
    """(trainable parameters incl. the alignment helper networks, parameters used at inference)."""
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    helpers = sum(p.numel() for n, p in model.named_parameters() if ".aligner." in f".{n}" and p.requires_grad)
    return total, total - helpers


def _validation_loader(ckpt: Any, batch_size: int) -> tuple[Any, Any]:
    """Validation questions in file order (no bucketing: the same questions for every model)."""
    from vqa_align.data.loaders import build_data, make_loader

    bundle = build_data(ckpt.config.data, [EVAL_SPLIT], tokenizer=ckpt.tokenizer, answers=ckpt.answers)
    dataset = bundle.datasets[EVAL_SPLIT]
    loader = make_loader(dataset, batch_size, shuffle=False, seed=0, num_workers=0, bucket=False, pin_memory=False)
    return dataset, loader


def alignment_statistics(checkpoint: Path, max_questions: int = MMD_QUESTIONS) -> dict[str, Any]:
    """MMD² and parameter-free CT between the keys and queries of every attention module, mean over
    heads and the first ``max_questions`` validation questions: per module type (mean over
    layers) and per layer."""
    from vqa_align.runs.checkpoint import load_checkpoint
    from vqa_align.model.mcan import MODEL_INPUTS

    ckpt = load_checkpoint(checkpoint)
    _, loader = _validation_loader(ckpt, min(MMD_BATCH, max_questions))
    sums: dict[tuple[str, int], list[float]] = {}  # (kind, layer) -> [Σ mmd2, Σ ct, n]
    seen = 0
    for batch in loader:
        if seen >= max_questions:
            break
        take = min(max_questions - seen, len(batch["question_ids"]))
        inputs = {k: batch[k][:take] for k in MODEL_INPUTS}
        _, diagnostics = ckpt.model.diagnose(**inputs)
        for diag in diagnostics:
            acc = sums.setdefault((diag.kind, diag.layer), [0.0, 0.0, 0])
            acc[0] += diag.mmd2.mean(-1).sum().item()  # mean over heads, sum over samples
            acc[1] += diag.ct.mean(-1).sum().item()
            acc[2] += take
        seen += take
    per_layer: dict[str, dict[str, list[float]]] = {"mmd2": {}, "ct": {}}
    for (kind, layer), (mmd, ct, n) in sorted(sums.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        per_layer["mmd2"].setdefault(kind, []).append(mmd / n)
        per_layer["ct"].setdefault(kind, []).append(ct / n)
    kinds = [k for k in ALIGNMENT_MODULES if k in per_layer["mmd2"]]
    model = ckpt.model
    total, inference = parameter_counts(model)
    return {
        "mmd2": {k: statistics.fmean(per_layer["mmd2"][k]) for k in kinds},
        "ct": {k: statistics.fmean(per_layer["ct"][k]) for k in kinds},
        "mmd2_per_layer": {k: per_layer["mmd2"][k] for k in kinds},
        "ct_per_layer": {k: per_layer["ct"][k] for k in kinds},
        "mmd_questions": seen,
        "parameters": total,
        "inference_parameters": inference,
    }


def evaluate_run(run_dir: Path, config: Config, seed: int, noise_stds: Sequence[float], mc_samples: int,
                 mmd_questions: int = MMD_QUESTIONS) -> dict[str, Any]:
    """Every number of one trained run (the content of its done.json ``result``)."""
    from vqa_align.evaluate.evaluator import evaluate_checkpoint
    from vqa_align.train.trainer import METRICS_FILE, seed_everything

    checkpoint = run_dir / "checkpoints" / EVAL_CHECKPOINT
    mc_samples = pavpu_samples(config, mc_samples)
    seed_everything(seed)  # MC dropout draws from the global RNG
    clean = evaluate_checkpoint(checkpoint, EVAL_SPLIT, mc_samples=mc_samples, out_dir=run_dir / "eval", seed=seed)
    if "accuracy" not in clean:
        raise UserError(f"the {EVAL_SPLIT!r} split has no annotations: nothing to score")
    noisy = {f"{s:g}": evaluate_checkpoint(checkpoint, EVAL_SPLIT, noise_std=s, seed=seed)["accuracy"]
             for s in noise_stds}
    records = _read_jsonl(run_dir / METRICS_FILE)
    epochs = [r for r in records if r.get("kind") == "epoch"]
    meta = json.loads((checkpoint / "meta.json").read_text())
    train_seconds = sum(r.get("epoch_seconds", 0.0) for r in epochs)
    per_step = seconds_per_step(records, config.train.batch_size * config.train.grad_accumulation)
    if per_step is None and meta.get("global_step"):  # no step records (log_every_steps > steps):
        per_step = train_seconds / meta["global_step"]  # epoch time, validation passes included
    return {
        "accuracy": clean["accuracy"],
        "per_answer_type": clean["perAnswerType"],
        "ece": clean["ece"],
        "pavpu": clean.get("pavpu"),
        "noisy_accuracy": noisy,
        "questions": clean["questions"],
        "mc_samples": mc_samples,
        "seconds_per_step": per_step,
        "train_minutes": train_seconds / 60,
        "steps": meta.get("global_step"),
        "epochs": meta.get("epoch"),
        "final_val_accuracy_during_training": next((r["val_accuracy"] for r in reversed(epochs)
                                                    if "val_accuracy" in r), None),
        **alignment_statistics(checkpoint, mmd_questions),
    }


def run_one(config_path: str | Path, method: str, seed: int, overrides: Sequence[str], run_dir: Path,
            noise_stds: Sequence[float], mc_samples: int, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train (or resume, or reuse) and evaluate one grid cell; returns the done.json content."""
    from vqa_align.train.trainer import train_from_config

    config = load_config(config_path, run_overrides(overrides, method, seed))
    if config.train.init_from:  # the architecture the trainer takes from that run, for the reuse checks
        from vqa_align.train.warm_start import adopt_init_architecture

        adopt_init_architecture(config)
    done = run_dir / DONE_FILE
    evaluation = {"noise_stds": [float(s) for s in noise_stds], "mc_samples": mc_samples, "mmd_questions": MMD_QUESTIONS}
    if done.is_file():
        data = json.loads(done.read_text())
        if data.get("config") != config_signature(config):
            raise UserError(f"{run_dir} was made with a different config; use another --out or delete that folder")
        if data.get("evaluation") == evaluation:
            log(f"{run_name(method, seed)}: finished earlier, reusing {done}")
            return {**data, "run_dir": str(run_dir)}  # where it is now (the report folder may have moved)
        log(f"{run_name(method, seed)}: evaluated with other settings earlier, evaluating again")
    state = training_state(run_dir, config)
    if state != "new":
        _check_same_config(run_dir, config)
    if state == "partial":
        log(f"{run_name(method, seed)}: resuming training from {run_dir / 'checkpoints/last'}")
        train_from_config(config, run_dir, resume=True)
    elif state == "new":
        log(f"{run_name(method, seed)}: training")
        # A folder without a checkpoint is an attempt killed in its first epoch: start it over.
        train_from_config(config, run_dir, overwrite=True)
    else:
        log(f"{run_name(method, seed)}: training finished earlier, evaluating")
    log(f"{run_name(method, seed)}: evaluating")
    result = evaluate_run(run_dir, config, seed, noise_stds, mc_samples, MMD_QUESTIONS)
    data = {"method": method, "seed": seed, "run_dir": str(run_dir), "config": config_signature(config),
            "evaluation": evaluation, "finished": datetime.datetime.now().isoformat(timespec="seconds"), "result": result}
    _write_json(done, data)
    return json.loads(done.read_text())


# ----------------------------------------------------------------------------------------------
# Figures (object-oriented matplotlib: no pyplot state, Agg canvas)
# ----------------------------------------------------------------------------------------------

COLORS = {"none": "#7f7f7f", "ct": "#1f77b4", "gan": "#d62728", "ot": "#2ca02c"}


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")


def alignment_example(checkpoint: Path, kind: str = FIG1_KIND, head: int = FIG1_HEAD) -> dict[str, Any]:
    """Queries and keys of ``head`` of the last-layer ``kind`` module for the first validation
    question (valid positions only)."""
    from vqa_align.runs.checkpoint import load_checkpoint
    from vqa_align.model.mcan import MODEL_INPUTS

    ckpt = load_checkpoint(checkpoint)
    dataset, loader = _validation_loader(ckpt, 1)
    batch = next(iter(loader))
    _, diagnostics = ckpt.model.diagnose(**{k: batch[k] for k in MODEL_INPUTS})
    candidates = [d for d in diagnostics if d.kind == kind] or diagnostics
    diag = max(candidates, key=lambda d: d.layer)
    det = diag.details
    n_words = int(batch["question_lengths"][0])
    words = ckpt.tokenizer.convert_ids_to_tokens(batch["tokens"][0, :n_words].tolist())
    # Keys come from the question in SA-q and SGA; queries only in SA-q. Regions stay unlabelled.
    return {
        "query_labels": words if diag.kind == "sa_question" else None,
        "key_labels": words if diag.kind in ("sa_question", "sga_guided") else None,
        "queries": det.queries[0, head][det.q_valid[0]].numpy(),
        "keys": det.keys[0, head][det.k_valid[0]].numpy(),
        "mmd2": diag.mmd2[0, head].item(),
        "ct": diag.ct[0, head].item(),
        "module": diag.name,
        "kind": diag.kind,
        "layer": diag.layer,
        "question": dataset.records[0].question,
    }


def plot_fig1(examples: dict[str, dict[str, Any]], seed: int, path: Path) -> None:
    """The paper's Fig. 1: per method, queries and keys of one head in one shared 2-D PCA."""
    from matplotlib.figure import Figure

    from vqa_align.serve.figures import pca_project

    fig = Figure(figsize=(4.2 * len(examples), 4.3))
    axes = fig.subplots(1, len(examples), squeeze=False)[0]
    for ax, (method, ex) in zip(axes, examples.items()):
        qp, kp = pca_project(ex["queries"], ex["keys"])  # one PCA fitted on the union of both sets
        ax.scatter(qp[:, 0], qp[:, 1], marker="o", s=36, c="#1f77b4", alpha=0.8, label=f"queries ({len(qp)})")
        ax.scatter(kp[:, 0], kp[:, 1], marker="^", s=44, facecolors="none", edgecolors="#d62728", linewidths=1.4,
                   label=f"keys ({len(kp)})")
        for points, labels, color in ((qp, ex.get("query_labels"), "#1f77b4"), (kp, ex.get("key_labels"), "#d62728")):
            for (x, y), label in zip(points, labels or []):
                ax.annotate(label, (x, y), fontsize=7, color=color, xytext=(3, 3), textcoords="offset points")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("PC 1 (shared)")
        ax.set_ylabel("PC 2")
        ax.set_title(f"{method}: MMD² = {ex['mmd2']:.3f}, CT = {ex['ct']:.3f}", fontsize=10)
        ax.legend(fontsize=8, loc="best")
    first = next(iter(examples.values()))
    fig.suptitle(f"{first['module']} ({first['kind']}), head {FIG1_HEAD}, seed {seed}\n"
                 f"val question: \"{first['question']}\"", fontsize=10)
    _save(fig, path)


def plot_mmd_per_layer(runs: Sequence[dict[str, Any]], methods: Sequence[str], path: Path) -> None:
    """Bars: MMD² per layer (mean ± std over seeds), one panel per module type, one bar per method."""
    import numpy as np
    from matplotlib.figure import Figure

    kinds = [k for k in ALIGNMENT_MODULES if any(k in r["result"]["mmd2_per_layer"] for r in runs)]
    fig = Figure(figsize=(4.2 * max(len(kinds), 1), 3.6))
    axes = fig.subplots(1, max(len(kinds), 1), squeeze=False)[0]
    width = 0.8 / max(len(methods), 1)
    for ax, kind in zip(axes, kinds):
        for i, method in enumerate(methods):
            layers = np.array([r["result"]["mmd2_per_layer"][kind] for r in runs
                               if r["method"] == method and kind in r["result"]["mmd2_per_layer"]])
            if not len(layers):
                continue
            x = np.arange(layers.shape[1]) + (i - (len(methods) - 1) / 2) * width
            std = layers.std(0, ddof=1) if len(layers) > 1 else None
            ax.bar(x, layers.mean(0), width, yerr=std, capsize=2, label=method,
                   color=COLORS.get(method), edgecolor="black", linewidth=0.5)
        ax.set_title(f"{kind}", fontsize=10)
        ax.set_xlabel("layer")
        ax.set_xticks(range(max(len(r["result"]["mmd2_per_layer"].get(kind, [])) for r in runs)))
    axes[0].set_ylabel("MMD² (mean over heads, questions)")
    axes[-1].legend(fontsize=8, loc="lower right")
    _save(fig, path)


def plot_curves(runs: Sequence[dict[str, Any]], methods: Sequence[str], path: Path) -> None:
    """Validation accuracy and task loss against optimizer steps; one colour per method, one line per seed."""
    from matplotlib.figure import Figure

    from vqa_align.train.trainer import METRICS_FILE

    fig = Figure(figsize=(10, 3.6))
    acc_ax, loss_ax = fig.subplots(1, 2)
    for method in methods:
        labelled = False
        for run in (r for r in runs if r["method"] == method):
            records = _read_jsonl(Path(run["run_dir"]) / METRICS_FILE)
            epochs = [r for r in records if r.get("kind") == "epoch" and "val_accuracy" in r]
            train = [r for r in records if r.get("kind") == "train"]
            label = None if labelled else method
            labelled = True
            color = COLORS.get(method)
            acc_ax.plot([r["step"] for r in epochs], [r["val_accuracy"] for r in epochs], marker="o", ms=3,
                        color=color, alpha=0.8, label=label)
            loss_ax.plot([r["step"] for r in train], [r["task_loss"] for r in train], color=color, alpha=0.6,
                         linewidth=0.8, label=label)
    acc_ax.set(title="validation accuracy (%)", xlabel="step")
    loss_ax.set(title="training task loss (per sample)", xlabel="step", yscale="log")
    acc_ax.legend(fontsize=8)
    loss_ax.legend(fontsize=8)
    _save(fig, path)


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": _cpu_model() or platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        info["load_average_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    return info


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def render_report(results: dict[str, Any]) -> str:
    """report.md from results.json's content (a pure function of it)."""
    methods = results["methods"]
    settings = results["settings"]
    runs = results["runs"]
    metrics = [Metric(**m) for m in results["metrics"]]
    agg = results["aggregates"]
    config = results["config"]
    machine = results["machine"]
    questions = sorted({r["result"]["questions"] for r in runs})
    mmd_q = sorted({r["result"]["mmd_questions"] for r in runs})
    t = config["train"]
    m = config["model"]
    lines = [
        f"# Experiment `{config['name']}`: alignment methods {', '.join(f'`{x}`' for x in methods)}",
        "",
        f"{_plural(len(runs), 'run')} ({_plural(len(methods), 'method')} × {_plural(len(results['seeds']), 'seed')}), each trained from scratch and "
        f"evaluated on the `{settings['split']}` split ({', '.join(map(str, questions))} questions) with its "
        f"`checkpoints/{settings['checkpoint']}` (the final model, not the one selected on this split).",
        "",
        "## Results",
        "",
        render_table(agg, metrics, methods),
        "",
        f"Mean ± sample std over seeds; the best mean per column in bold. Accuracy: official VQA accuracy (%), "
        f"overall and per answer type. acc σ=s: accuracy with N(0, s²) noise added to every valid region "
        f"feature (σ = 1 as in the paper). ECE (%): expected calibration error of the top-1 softmax "
        f"confidence, {settings['ece_bins']} equal-width bins. PAvPU (%): patch accuracy vs patch uncertainty with "
        f"{settings['mc_samples']} MC-dropout samples, an answer counts as certain when the t-test between "
        f"the top-2 answers gives p < {settings['pavpu_p']}. MMD² ↓: squared MMD between each head's query "
        f"and key sets (Gaussian kernel, median-heuristic bandwidth), mean over heads, layers and the first "
        f"{', '.join(map(str, mmd_q))} validation questions, per module type (SA-q: question self-attention, "
        f"SA-img: image self-attention, SGA: image-guided-by-question attention). s/step: median wall-clock "
        f"seconds per optimizer step during training. params: trainable parameters in training (with "
        f"the alignment helper networks) and at inference (without them). Definitions: `docs/experiments.md`.",
        "",
        "## Findings",
        "",
        "Generated from the numbers above. A gap is called clear when it exceeds the larger of the two "
        "standard deviations — a heuristic, not a significance test.",
        "",
        *[f"- {line}" for line in findings(agg, metrics + drop_metrics(settings["noise_stds"]), methods)],
        "",
        "## Setup",
        "",
        "Command:",
        "",
        "```bash",
        results["command"],
        "```",
        "",
        f"- config: `{results['config_path']}`"
        + (f" with {', '.join(f'`{o}`' for o in results['overrides'])}" if results["overrides"] else "")
        + "; varied per run: `model.alignment.method`, `train.seed`. The resolved config is in `results.json`.",
        f"- model: MCAN, hidden {m['hidden_size']}, {_plural(m['num_heads'], 'head')}, {_plural(m['num_layers'], 'layer')}, "
        f"λ = {m['alignment']['weight']}, aligned modules {', '.join(m['alignment']['modules'])}",
        f"- training: {_plural(t['epochs'], 'epoch')}, batch {t['batch_size']}, lr {t['lr']}"
        + (f", max_steps {t['max_steps']}" if t.get("max_steps") else "")
        + (f", training subset {config['data']['subset']} questions" if config["data"].get("subset") else "")
        + f"; {statistics.fmean(r['result']['train_minutes'] for r in runs):.1f} min per run on average",
        f"- machine: {machine['platform']}, {machine['processor']}, {machine['cpu_count']} CPUs "
        f"({machine['torch_threads']} torch threads), GPU: {machine['cuda'] or 'none'}; Python {machine['python']}, "
        f"torch {machine['torch']}. Timings are wall-clock and depend on what else the machine ran.",
        f"- runs: `runs/<method>_seed<seed>/` (each with `done.json`); report written {results['written']}.",
        "",
        "## Figures",
        "",
        "Fig. 1 of the paper for this data: the queries and keys of one head in one shared 2-D PCA, "
        "same question, module, layer and head for both models.",
        "",
        "![queries and keys](fig1_alignment.png)",
        "",
        "MMD² per layer (mean ± std over seeds):",
        "",
        "![MMD per layer](mmd_per_layer.png)",
        "",
        "Training curves:",
        "",
        "![curves](curves.png)",
        "",
        "Reliability diagrams (first seed): "
        + " ".join(f"[`{x}`](reliability_{x}.png)" for x in methods if f"reliability_{x}.png" in results["figures"]),
        "",
    ]
    return "\n".join(lines)


def write_report(out: Path, config_path: str | Path, methods: Sequence[str], seeds: Sequence[int],
                 overrides: Sequence[str], runs: Sequence[dict[str, Any]], command: str, noise_stds: Sequence[float],
                 mc_samples: int, out_label: str) -> dict[str, Any]:
    """Aggregate, draw the figures, write results.json and report.md; returns results.json's content."""
    from vqa_align.evaluate.evaluator import ECE_BINS, PAVPU_P_THRESHOLD

    flat = [{"method": r["method"], "seed": r["seed"], "metrics": flat_metrics(r["result"])} for r in runs]
    answer_types = {t for r in runs for t in r["result"]["per_answer_type"]}
    kinds = [k for k in ALIGNMENT_MODULES if any(k in r["result"]["mmd2"] for r in runs)]
    metrics = report_metrics(answer_types, noise_stds, kinds)

    figures: list[str] = []
    fig1_methods = [m for m in ("none", "ct") if m in methods]
    if len(fig1_methods) < 2:
        fig1_methods = list(methods[:2])
    seed = seeds[0]
    examples = {m: alignment_example(Path(r["run_dir"]) / "checkpoints" / EVAL_CHECKPOINT)
                for m in fig1_methods for r in runs if r["method"] == m and r["seed"] == seed}
    plot_fig1(examples, seed, out / "fig1_alignment.png")
    plot_mmd_per_layer(runs, methods, out / "mmd_per_layer.png")
    plot_curves(runs, methods, out / "curves.png")
    figures += ["fig1_alignment.png", "mmd_per_layer.png", "curves.png"]
    for method in methods:
        first = next((r for r in runs if r["method"] == method), None)
        source = Path(first["run_dir"]) / "eval" / "reliability.png" if first else None
        if source is not None and source.is_file():
            shutil.copyfile(source, out / f"reliability_{method}.png")
            figures.append(f"reliability_{method}.png")

    base = load_config(config_path, list(overrides))
    results = {
        "command": command,
        "commands": {run_name(r["method"], r["seed"]): run_commands(
            str(config_path), overrides, r["method"], r["seed"], f"{out_label}/runs/{run_name(r['method'], r['seed'])}",
            noise_stds, pavpu_samples(base, mc_samples)) for r in runs},
        "config_path": str(config_path),
        "overrides": list(overrides),
        "config": base.to_dict(),
        "methods": list(methods),
        "seeds": list(seeds),
        "settings": {"split": EVAL_SPLIT, "checkpoint": EVAL_CHECKPOINT, "noise_stds": list(noise_stds),
                     "mc_samples": mc_samples, "pavpu_p": PAVPU_P_THRESHOLD, "ece_bins": ECE_BINS,
                     "mmd_questions": MMD_QUESTIONS, "fig1": {"methods": fig1_methods, "seed": seed,
                     "module": next(iter(examples.values()))["module"], "head": FIG1_HEAD}},
        "machine": machine_info(),
        "written": datetime.datetime.now().isoformat(timespec="seconds"),
        "metrics": [vars(m) for m in metrics],
        "runs": [{**r, "metrics": f["metrics"]} for r, f in zip(runs, flat)],
        "aggregates": aggregate(flat),
        "figures": figures,
    }
    results = _json_safe(results)
    # The report is rendered from the JSON round trip, so report.md never shows a number results.json lacks.
    _write_json(out / "results.json", results)
    (out / "report.md").write_text(render_report(_restore_nan(results)))
    return results


def _restore_nan(value: Any) -> Any:
    """Aggregates stored as None (JSON) -> NaN, so the table code sees numbers."""
    if isinstance(value, dict):
        if set(value) == {"mean", "std", "n"}:
            return {k: (math.nan if v is None else v) for k, v in value.items()}
        return {k: _restore_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_restore_nan(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------


def run_experiment_grid(
    config_path: str | Path,
    methods: Sequence[str],
    seeds: Sequence[int],
    overrides: Sequence[str] = (),
    out_dir: str | Path = "reports/experiment",
    noise_stds: Sequence[float] = NOISE_STDS,
    mc_samples: int = MC_SAMPLES,
    *,
    command: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train and evaluate every (method, seed) into ``out_dir/runs`` and write the report.

    Finished runs are reused, interrupted ones resumed. Returns the content of results.json."""
    from tqdm import tqdm

    methods, seeds = list(methods), list(seeds)
    for override in overrides:
        if override.split("=", 1)[0].strip() in ("model.alignment.method", "train.seed"):
            raise UserError(f"--set {override}: the experiment sets this per run; use --methods / --seeds")
    load_config(config_path, list(overrides))  # fail on a bad config before any training
    out = Path(out_dir)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    command = command or experiment_command(str(config_path), methods, seeds, overrides, str(out_dir))
    grid = [(m, s) for m in methods for s in seeds]
    runs: list[dict[str, Any]] = []
    bar = tqdm(grid, desc="experiment", unit="run", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for index, (method, seed) in enumerate(bar, 1):
        bar.set_description(f"run {index}/{len(grid)}: {run_name(method, seed)}")

        def log(message: str, prefix: str = f"[{index}/{len(grid)}]") -> None:
            if progress:
                tqdm.write(f"{prefix} {message}", file=sys.stdout)

        runs.append(run_one(config_path, method, seed, overrides, out / "runs" / run_name(method, seed),
                            noise_stds, mc_samples, log))
    bar.close()
    results = write_report(out, config_path, methods, seeds, overrides, runs, command, noise_stds, mc_samples,
                           str(out_dir))
    if progress:
        print(f"report: {out / 'report.md'}")
    return results


def run_experiment(args: argparse.Namespace) -> int:
    """``vqa-align experiment``."""
    methods, seeds = parse_methods(args.methods), parse_seeds(args.seeds)
    command = experiment_command(args.config, methods, seeds, args.overrides, args.out)
    # Module constants read at call time (not as defaults) so tests can shrink them.
    run_experiment_grid(args.config, methods, seeds, args.overrides, args.out, NOISE_STDS, MC_SAMPLES,
                        command=command)
    return 0
