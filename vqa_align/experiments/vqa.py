"""The VQA experiment: train every (method, seed), evaluate each run, measure what the report shows.

    vqa-align experiment --config configs/easy_vqa.yaml --methods none,gan,ct,ot --seeds 0,1,2 \
        --out reports/easy_vqa

Three steps, each reading only what the previous one wrote:

1. the grid (:mod:`vqa_align.experiments.grid`): per (method, seed) ``runs/<method>_seed<seed>/``,
   a training run (config.yaml, metrics.jsonl, checkpoints/), its evaluation (eval/metrics.json,
   eval/reliability.png) and ``done.json`` (every number of the run);
2. measurement (:func:`collect_results`): the runs' numbers, their aggregates and what the
   figures need (Fig. 1's query and key points from two checkpoints, the training curves) ->
   ``results.json``; the reliability diagrams copied next to it;
3. the report (:mod:`vqa_align.experiments.vqa_report`): results.json -> report.md and figures.

Resuming follows the grid's one policy. ``done.json`` is written last, after the evaluation: a run
that has it is read, never redone (unless the evaluation settings changed: then it is evaluated
again, not retrained). A run whose ``checkpoints/last`` exists continues from it (``resume=True``);
a run whose training finished but whose evaluation did not is only evaluated. A rerun with a
different config into the same ``--out`` is refused rather than mixed.

What is evaluated: ``checkpoints/last`` (the final model; ``best`` was selected on the same
validation split and would flatter every method) on the ``val`` split.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import shutil
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vqa_align.config import ALIGNMENT_MODULES, Config, load_config
from vqa_align.errors import UserError
from vqa_align.experiments.grid import (
    Cell, Log, config_signature, finished_result, grid_cells, machine_info, parse_methods, parse_seeds, run_grid,
    run_name, unfinished_run_state,
)
from vqa_align.experiments.results import json_safe, json_tmp_name, write_json
from vqa_align.experiments.stats import aggregate, check_seed_roles
from vqa_align.experiments.vqa_report import (
    CURVES_FILE, FIG1_FILE, MMD_FILE, REPORT_FILE, RESULTS_FILE, flat_metrics, report_metrics, write_report,
)
from vqa_align.runs.report_folder import open_report_folder
from vqa_align.untrusted_files import MAX_META_BYTES, read_json

EVAL_SPLIT = "val"
EVAL_CHECKPOINT = "last"
DONE_FILE = "done.json"
NOISE_STDS = (1.0, 0.1)  # the paper's σ = 1, and a smaller one that does not wipe out the signal
MC_SAMPLES = 20  # the paper's MC-dropout samples for PAvPU
MMD_QUESTIONS = 512  # validation questions over which MMD² is averaged (MMD is O(N²) per head)
MMD_BATCH = 64
FIG1_KIND, FIG1_HEAD = "sga_guided", 0  # cross-modal: the paper's motivating case; last layer


# ----------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------


def experiment_command(config: str, methods: Sequence[str], seeds: Sequence[int], overrides: Sequence[str],
                       out: str, confirmatory: Sequence[int] = ()) -> str:
    """The ``vqa-align experiment`` command line that reproduces an experiment (shell-quoted)."""
    parts = ["vqa-align", "experiment", "--config", config, "--methods", ",".join(methods),
             "--seeds", ",".join(str(s) for s in seeds)]
    if confirmatory:
        parts += ["--confirmatory-seeds", ",".join(str(s) for s in confirmatory)]
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


def seconds_per_step(records: Sequence[dict[str, Any]], samples_per_step: int) -> float | None:
    """Median seconds per optimizer step from the ``train`` records of metrics.jsonl.

    Each record's ``samples_per_s`` covers the window since the previous record, so the median
    over windows ignores the first window's start-up cost."""
    rates = [r["samples_per_s"] for r in records if r.get("kind") == "train" and r.get("samples_per_s")]
    if not rates:
        return None
    return samples_per_step / statistics.median(rates)


# ----------------------------------------------------------------------------------------------
# One run: train (or resume, or skip), evaluate
# ----------------------------------------------------------------------------------------------


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
    from vqa_align.evaluate.evaluator import evaluate_checkpoint, evaluate_under_noise
    from vqa_align.train.progress import METRICS_FILE, read_metrics
    from vqa_align.train.rng import seed_everything

    checkpoint = run_dir / "checkpoints" / EVAL_CHECKPOINT
    mc_samples = pavpu_samples(config, mc_samples)
    seed_everything(seed)  # MC dropout draws from the global RNG
    clean = evaluate_checkpoint(checkpoint, EVAL_SPLIT, mc_samples=mc_samples, out_dir=run_dir / "eval", seed=seed)
    if "accuracy" not in clean:
        raise UserError(f"the {EVAL_SPLIT!r} split has no annotations: nothing to score")
    noisy = {f"{s:g}": scores["accuracy"]
             for s, scores in evaluate_under_noise(checkpoint, EVAL_SPLIT, noise_stds, seed=seed).items()}
    records = read_metrics(run_dir / METRICS_FILE)
    epochs = [r for r in records if r.get("kind") == "epoch"]
    meta = read_json(checkpoint / "meta.json", MAX_META_BYTES, expect=dict)
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
            noise_stds: Sequence[float], mc_samples: int, log: Log = print) -> dict[str, Any]:
    """Train (or resume, or reuse) and evaluate one grid cell; returns the done.json content."""
    from vqa_align.train.trainer import train_from_config

    config = load_config(config_path, run_overrides(overrides, method, seed))
    if config.train.init_from:  # the architecture the trainer takes from that run, for the reuse checks
        from vqa_align.train.warm_start import adopt_init_architecture

        adopt_init_architecture(config)
    name, done, signature = run_name(method, seed), run_dir / DONE_FILE, config_signature(config)
    evaluation = {"noise_stds": [float(s) for s in noise_stds], "mc_samples": mc_samples, "mmd_questions": MMD_QUESTIONS}
    data = finished_result(done, signature, run_dir)
    if data is not None:
        if data.get("evaluation") == evaluation:
            log(f"{name}: finished earlier, reusing {done}")
            return {**data, "run_dir": str(run_dir)}  # where it is now (the report folder may have moved)
        log(f"{name}: evaluated with other settings earlier, evaluating again")
    state = unfinished_run_state(run_dir, signature, config.train.epochs, config.train.max_steps)
    if state == "partial":
        log(f"{name}: resuming training from {run_dir / 'checkpoints/last'}")
        train_from_config(config, run_dir, resume=True)
    elif state == "new":
        log(f"{name}: training")
        # A folder without a checkpoint is an attempt killed in its first epoch: start it over.
        train_from_config(config, run_dir, overwrite=True)
    else:
        log(f"{name}: training finished earlier, evaluating")
    log(f"{name}: evaluating")
    result = evaluate_run(run_dir, config, seed, noise_stds, mc_samples, MMD_QUESTIONS)
    data = {"method": method, "seed": seed, "run_dir": str(run_dir), "config": signature,
            "evaluation": evaluation, "finished": datetime.datetime.now().isoformat(timespec="seconds"), "result": result}
    write_json(done, data)
    return read_json(done, MAX_META_BYTES, expect=dict)


# ----------------------------------------------------------------------------------------------
# Measurement: what the report needs, from the runs and two checkpoints -> results.json
# ----------------------------------------------------------------------------------------------


def alignment_example(checkpoint: Path, kind: str = FIG1_KIND, head: int = FIG1_HEAD) -> dict[str, Any]:
    """Queries and keys of ``head`` of the last-layer ``kind`` module for the first validation
    question (valid positions only), projected with ONE PCA fitted on both sets: ``queries``
    (n, 2) and ``keys`` (m, 2) as lists, ready for results.json and Fig. 1."""
    from vqa_align.model.mcan import MODEL_INPUTS
    from vqa_align.runs.checkpoint import load_checkpoint
    from vqa_align.serve.figures import pca_project

    ckpt = load_checkpoint(checkpoint)
    dataset, loader = _validation_loader(ckpt, 1)
    batch = next(iter(loader))
    _, diagnostics = ckpt.model.diagnose(**{k: batch[k] for k in MODEL_INPUTS})
    candidates = [d for d in diagnostics if d.kind == kind] or diagnostics
    diag = max(candidates, key=lambda d: d.layer)
    det = diag.details
    n_words = int(batch["question_lengths"][0])
    words = ckpt.tokenizer.convert_ids_to_tokens(batch["tokens"][0, :n_words].tolist())
    queries, keys = pca_project(det.queries[0, head][det.q_valid[0]].numpy(), det.keys[0, head][det.k_valid[0]].numpy())
    # Keys come from the question in SA-q and SGA; queries only in SA-q. Regions stay unlabelled.
    return {
        "query_labels": words if diag.kind == "sa_question" else None,
        "key_labels": words if diag.kind in ("sa_question", "sga_guided") else None,
        "queries": queries.tolist(),
        "keys": keys.tolist(),
        "mmd2": diag.mmd2[0, head].item(),
        "ct": diag.ct[0, head].item(),
        "module": diag.name,
        "kind": diag.kind,
        "layer": diag.layer,
        "question": dataset.records[0].question,
    }


def curve_series(run: dict[str, Any]) -> dict[str, Any]:
    """Validation accuracy per epoch and task loss per logged step of one run, from metrics.jsonl."""
    from vqa_align.train.progress import METRICS_FILE, read_metrics

    records = read_metrics(Path(run["run_dir"]) / METRICS_FILE)
    epochs = [r for r in records if r.get("kind") == "epoch" and "val_accuracy" in r]
    train = [r for r in records if r.get("kind") == "train"]
    return {"method": run["method"], "seed": run["seed"],
            "val_steps": [r["step"] for r in epochs], "val_accuracy": [r["val_accuracy"] for r in epochs],
            "train_steps": [r["step"] for r in train], "task_loss": [r["task_loss"] for r in train]}


def copy_reliability_figures(runs: Sequence[dict[str, Any]], methods: Sequence[str], out: Path) -> list[str]:
    """Each method's first run's reliability diagram (drawn by its evaluation) -> ``out``."""
    copied = []
    for method in methods:
        first = next((r for r in runs if r["method"] == method), None)
        source = Path(first["run_dir"]) / "eval" / "reliability.png" if first else None
        if source is not None and source.is_file():
            shutil.copyfile(source, out / reliability_figure(method))
            copied.append(reliability_figure(method))
    return copied


def reliability_figure(method: str) -> str:
    return f"reliability_{method}.png"


def report_files(methods: Sequence[str]) -> list[str]:
    """Every file the experiment writes into its --out folder (its runs/ hold run folders)."""
    return [RESULTS_FILE, json_tmp_name(RESULTS_FILE), REPORT_FILE, FIG1_FILE, MMD_FILE, CURVES_FILE,
            *map(reliability_figure, methods)]


def collect_results(out: Path, config_path: str | Path, methods: Sequence[str], seeds: Sequence[int],
                    overrides: Sequence[str], runs: Sequence[dict[str, Any]], command: str,
                    noise_stds: Sequence[float], mc_samples: int, out_label: str,
                    seed_roles: dict[str, list[int]] | None = None) -> dict[str, Any]:
    """Every number and figure point the report shows -> ``out/results.json`` (returned as written).
    ``seed_roles``: {"exploratory": [...], "confirmatory": [...]}, declared before the runs; the
    report then tests each set on its own (None: no roles, only all seeds)."""
    from vqa_align.evaluate.evaluator import ECE_BINS, PAVPU_P_THRESHOLD

    flat = [{"method": r["method"], "seed": r["seed"], "metrics": flat_metrics(r["result"])} for r in runs]
    answer_types = {t for r in runs for t in r["result"]["per_answer_type"]}
    kinds = [k for k in ALIGNMENT_MODULES if any(k in r["result"]["mmd2"] for r in runs)]
    fig1_methods = [m for m in ("none", "ct") if m in methods]
    if len(fig1_methods) < 2:
        fig1_methods = list(methods[:2])
    seed = seeds[0]
    examples = {m: alignment_example(Path(r["run_dir"]) / "checkpoints" / EVAL_CHECKPOINT)
                for m in fig1_methods for r in runs if r["method"] == m and r["seed"] == seed}
    figures = [FIG1_FILE, MMD_FILE, CURVES_FILE, *copy_reliability_figures(runs, methods, out)]
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
        **({"seed_roles": seed_roles} if seed_roles else {}),
        "settings": {"split": EVAL_SPLIT, "checkpoint": EVAL_CHECKPOINT, "noise_stds": list(noise_stds),
                     "mc_samples": mc_samples, "pavpu_p": PAVPU_P_THRESHOLD, "ece_bins": ECE_BINS,
                     "mmd_questions": MMD_QUESTIONS, "fig1": {"methods": fig1_methods, "seed": seed,
                     "module": next(iter(examples.values()))["module"], "head": FIG1_HEAD}},
        "machine": machine_info(),
        "written": datetime.datetime.now().isoformat(timespec="seconds"),
        "metrics": [vars(m) for m in report_metrics(answer_types, noise_stds, kinds)],
        "runs": [{**r, "metrics": f["metrics"]} for r, f in zip(runs, flat)],
        "aggregates": aggregate(flat),
        "figures": figures,
        "figure_data": {"fig1": examples, "curves": [curve_series(r) for r in runs]},
    }
    results = json_safe(results)
    write_json(out / RESULTS_FILE, results)
    return results


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
    seed_roles: dict[str, list[int]] | None = None,
) -> dict[str, Any]:
    """Train and evaluate every (method, seed) into ``out_dir/runs``, measure, write the report.

    Finished runs are reused, interrupted ones resumed. ``seed_roles``: which seeds are exploratory
    and which confirmatory (recorded in results.json; the report tests each set separately).
    Returns the content of results.json."""
    methods, seeds = list(methods), list(seeds)
    check_seed_roles(seed_roles, "seed_roles", seeds)
    for override in overrides:
        if override.split("=", 1)[0].strip() in ("model.alignment.method", "train.seed"):
            raise UserError(f"--set {override}: the experiment sets this per run; use --methods / --seeds")
    load_config(config_path, list(overrides))  # fail on a bad config before any training
    out = Path(out_dir)
    open_report_folder(out, report_files(methods))  # a new or empty folder, or this command's own
    (out / "runs").mkdir(parents=True, exist_ok=True)
    command = command or experiment_command(str(config_path), methods, seeds, overrides, str(out_dir))

    def run_cell(cell: Cell, log: Log) -> dict[str, Any]:
        return run_one(config_path, cell.method, cell.seed, overrides, out / "runs" / cell.name, noise_stds,
                       mc_samples, log)

    runs = run_grid(grid_cells(methods, seeds), run_cell, progress)
    results = collect_results(out, config_path, methods, seeds, overrides, runs, command, noise_stds, mc_samples,
                              str(out_dir), seed_roles)
    write_report(out)
    if progress:
        print(f"report: {out / REPORT_FILE}")
    return results


def run_experiment(args: argparse.Namespace) -> int:
    """``vqa-align experiment``."""
    methods, seeds = parse_methods(args.methods), parse_seeds(args.seeds)
    confirmatory = parse_seeds(args.confirmatory_seeds, "--confirmatory-seeds") if getattr(args, "confirmatory_seeds", None) else []
    roles = ({"exploratory": [s for s in seeds if s not in confirmatory], "confirmatory": confirmatory}
             if confirmatory else None)
    check_seed_roles(roles, "--confirmatory-seeds", seeds)
    command = experiment_command(args.config, methods, seeds, args.overrides, args.out, confirmatory)
    # Module constants read at call time (not as defaults) so tests can shrink them.
    run_experiment_grid(args.config, methods, seeds, args.overrides, args.out, NOISE_STDS, MC_SAMPLES,
                        command=command, seed_roles=roles)
    return 0
