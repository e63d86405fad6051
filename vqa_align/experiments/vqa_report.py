"""The VQA experiment's report: results.json -> report.md and figures, nothing else.

Pure: everything drawn or written here comes from ``results.json`` (which the experiment runner,
:mod:`vqa_align.experiments.vqa`, measures and writes: per-run numbers, aggregates, the points of
Fig. 1 in their PCA plane, the training curves). No checkpoint is loaded and torch is not needed,
so a report can be rewritten from its results.json alone.

Layout of the report folder::

    report.md                   one table (mean ± std over seeds), findings, setup, figures
    results.json                every number per run, the aggregates, the commands, the config
    fig1_alignment.png          queries and keys of one head in a shared 2-D PCA, two methods
    mmd_per_layer.png           per-layer MMD² per method and module type
    reliability_<method>.png    reliability diagram of the method's first seed (copied by the runner)
    curves.png                  validation accuracy and task loss against steps, per method
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from vqa_align.align.distances import DISTANCES
from vqa_align.config import ALIGNMENT_MODULES
from vqa_align.experiments.results import restore_nan
from vqa_align.experiments.stats import (
    MIN_PAIRS, SIGNIFICANCE, Metric, Stat, clear_difference, compare_to_baseline, family_size, family_text,
    seed_set_title, seed_sets, tests_table, verdict,
)
from vqa_align.untrusted_files import MAX_META_BYTES, read_json

RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
FIG1_FILE, MMD_FILE, CURVES_FILE = "fig1_alignment.png", "mmd_per_layer.png", "curves.png"
BASELINE = "none"
KIND_LABELS = {"sa_question": "SA-q", "sa_image": "SA-img", "sga_guided": "SGA"}
ANSWER_TYPE_ORDER = ("yes/no", "number", "other")
Aggregates = dict[str, dict[str, Stat]]  # {method: {metric key: mean_std}}


# ----------------------------------------------------------------------------------------------
# Columns, table, findings
# ----------------------------------------------------------------------------------------------


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


def format_stat(stat: Stat | None, metric: Metric) -> str:
    if stat is None or not stat["n"]:
        return "–"
    if metric.kind == "count":
        return format_count(stat["mean"])
    mean = f"{stat['mean']:.{metric.digits}f}"
    return mean if stat["n"] < 2 else f"{mean} ± {stat['std']:.{metric.digits}f}"


def best_method(aggregates: Aggregates, metric: Metric,
                methods: Sequence[str]) -> list[str]:
    """Methods ranked best first on ``metric`` (methods without a value are left out)."""
    present = [m for m in methods if aggregates.get(m, {}).get(metric.key, {}).get("n")]
    return sorted(present, key=lambda m: aggregates[m][metric.key]["mean"], reverse=bool(metric.higher_is_better))


def render_table(aggregates: Aggregates, metrics: Sequence[Metric],
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


def _stat_text(stat: Stat, digits: int) -> str:
    return f"{stat['mean']:.{digits}f}" + (f" ± {stat['std']:.{digits}f}" if stat["n"] > 1 else "")


def findings(aggregates: Aggregates, metrics: Sequence[Metric],
             methods: Sequence[str]) -> list[str]:
    """Bullet points generated from the numbers: the best method per metric and whether its lead
    over the runner-up exceeds both stds (a heuristic; the verdicts against the baseline are
    :func:`baseline_findings`'). Nothing here is written by hand."""
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
    return lines

# ----------------------------------------------------------------------------------------------
# Paired tests against the baseline (Holm-adjusted per method and seed set)
# ----------------------------------------------------------------------------------------------

Tests = dict[str, dict[str, dict[str, Any]]]  # {method: {metric key: paired test with Holm p}}


def paired_tests(runs: Sequence[dict[str, Any]], metrics: Sequence[Metric], methods: Sequence[str],
                 seeds: Sequence[int] | None = None, baseline: str = BASELINE) -> Tests:
    """Per aligned method, a paired test against ``baseline`` for every ranked metric over the
    seeds both have (only ``seeds`` when given); one Holm family per method."""
    by_method: dict[str, dict[int, dict[str, float]]] = {}
    for run in runs:
        by_method.setdefault(run["method"], {})[run["seed"]] = run["metrics"]
    keys = [m.key for m in metrics if m.higher_is_better is not None]
    return {method: compare_to_baseline(by_method[method], by_method[baseline], keys, seeds)
            for method in methods if method != baseline and method in by_method and baseline in by_method}


def baseline_findings(tests: Tests, metrics: Sequence[Metric], baseline: str = BASELINE) -> list[str]:
    """Per aligned method: the metrics on which it is better / worse than the baseline by the
    Holm-adjusted paired t-test, or that there are too few pairs to test."""
    lines = []
    for method, by_key in tests.items():
        n = max((t["n"] for t in by_key.values()), default=0)
        if n < MIN_PAIRS:
            lines.append(f"`{method}` vs `{baseline}`: {_plural(n, 'seed pair')}, too few for a test "
                         f"(at least {MIN_PAIRS}); the differences in the table are not tested.")
            continue
        words: dict[str, list[str]] = {"better": [], "worse": []}
        for metric in metrics:
            word = verdict(by_key.get(metric.key, {}), metric.higher_is_better)
            if word in words:
                words[word].append(metric.label.replace(" ↓", ""))
        lines.append(f"`{method}` vs `{baseline}` (paired t-test over {n} seeds, Holm-adjusted over its {family_size(by_key)} "
                     f"tests, p < {SIGNIFICANCE}): better on {', '.join(words['better']) or 'nothing'}; "
                     f"worse on {', '.join(words['worse']) or 'nothing'}; no clear difference on the rest.")
    return lines


def render_tests(tests: Tests, metrics: Sequence[Metric], baseline: str = BASELINE) -> list[str]:
    """One table per aligned method: Δ (method − baseline), raw and Holm-adjusted p, verdict."""
    lines: list[str] = []
    for method, by_key in tests.items():
        if family_size(by_key):  # no p-value at all (too few pairs): the finding above says so
            lines += [f"`{method}` − `{baseline}` (Holm family of {family_size(by_key)}):", "",
                      *tests_table(by_key, metrics), ""]
    return lines


def _tests_section(results: dict[str, Any], metrics: Sequence[Metric]) -> list[str]:
    """Paired tests against the baseline, per seed set (all; exploratory and confirmatory when the
    experiment declares them in ``seed_roles``)."""
    methods, runs = results["methods"], results["runs"]
    if BASELINE not in methods or len(methods) < 2:
        return []
    roles = results.get("seed_roles")
    lines = ["## Paired tests against `none`", "",
             f"Per aligned method and metric, the seeds both have are paired: Δ = mean difference (method − "
             f"`{BASELINE}`), two-sided paired t-test and Wilcoxon signed-rank p. " + family_text(BASELINE), ""]
    if roles:
        lines += [f"Seed roles (`seed_roles` in results.json): exploratory {roles.get('exploratory')}, confirmatory "
                  f"{roles.get('confirmatory')}" + (f" — {roles['note']}" if roles.get("note") else "") +
                  ". The confirmatory seeds are the test; the pooled seeds reuse the ones that suggested an effect.", ""]
    for name, seeds in seed_sets(results["seeds"], roles):
        tests = paired_tests(runs, metrics, methods, seeds)
        if roles:
            lines += [f"### {seed_set_title(name, seeds)}", ""]
        lines += [*[f"- {line}" for line in baseline_findings(tests, metrics)], "", *render_tests(tests, metrics)]
    return lines


# ----------------------------------------------------------------------------------------------
# Figures (object-oriented matplotlib: no pyplot state, Agg canvas)
# ----------------------------------------------------------------------------------------------

COLORS = {name: distance.colour for name, distance in DISTANCES.items()}  # one per method, from the registry


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")


def plot_fig1(examples: dict[str, dict[str, Any]], seed: int, head: int, path: Path) -> None:
    """The paper's Fig. 1: per method, queries and keys of one head, as measured by the runner in
    one 2-D PCA fitted on both sets (``queries``: (n, 2) and ``keys``: (m, 2) points)."""
    import numpy as np
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(examples), 4.3))
    axes = fig.subplots(1, len(examples), squeeze=False)[0]
    for ax, (method, ex) in zip(axes, examples.items()):
        qp, kp = np.asarray(ex["queries"], dtype=float), np.asarray(ex["keys"], dtype=float)
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
    fig.suptitle(f"{first['module']} ({first['kind']}), head {head}, seed {seed}\n"
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


def plot_curves(curves: Sequence[dict[str, Any]], methods: Sequence[str], path: Path) -> None:
    """Validation accuracy and task loss against optimizer steps; one colour per method, one line
    per seed. ``curves``: per run ``{"method", "val_steps", "val_accuracy", "train_steps", "task_loss"}``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6))
    acc_ax, loss_ax = fig.subplots(1, 2)
    for method in methods:
        labelled = False
        for run in (c for c in curves if c["method"] == method):
            label = None if labelled else method
            labelled = True
            color = COLORS.get(method)
            acc_ax.plot(run["val_steps"], run["val_accuracy"], marker="o", ms=3, color=color, alpha=0.8, label=label)
            loss_ax.plot(run["train_steps"], run["task_loss"], color=color, alpha=0.6, linewidth=0.8, label=label)
    acc_ax.set(title="validation accuracy (%)", xlabel="step")
    loss_ax.set(title="training task loss (per sample)", xlabel="step", yscale="log")
    acc_ax.legend(fontsize=8)
    loss_ax.legend(fontsize=8)
    _save(fig, path)


# ----------------------------------------------------------------------------------------------
# report.md
# ----------------------------------------------------------------------------------------------


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _results_section(results: dict[str, Any]) -> list[str]:
    """Title, what was run, the table and how to read it."""
    methods, settings, runs = results["methods"], results["settings"], results["runs"]
    metrics = [Metric(**m) for m in results["metrics"]]
    questions = sorted({r["result"]["questions"] for r in runs})
    mmd_q = sorted({r["result"]["mmd_questions"] for r in runs})
    return [
        f"# Experiment `{results['config']['name']}`: alignment methods {', '.join(f'`{x}`' for x in methods)}",
        "",
        f"{_plural(len(runs), 'run')} ({_plural(len(methods), 'method')} × {_plural(len(results['seeds']), 'seed')}), each trained from scratch and "
        f"evaluated on the `{settings['split']}` split ({', '.join(map(str, questions))} questions) with its "
        f"`checkpoints/{settings['checkpoint']}` (the final model, not the one selected on this split).",
        "",
        "## Results",
        "",
        render_table(results["aggregates"], metrics, methods),
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
        "standard deviations — a heuristic, not a significance test; the verdicts against `none` are the "
        "Holm-adjusted paired tests of the next section.",
        "",
        *[f"- {line}" for line in findings(results["aggregates"], metrics + drop_metrics(settings["noise_stds"]),
                                           methods)],
        "",
        *_tests_section(results, metrics + drop_metrics(settings["noise_stds"])),
    ]


def _setup_section(results: dict[str, Any]) -> list[str]:
    """The command, config, model, schedule and machine."""
    config, machine, runs = results["config"], results["machine"], results["runs"]
    t, m = config["train"], config["model"]
    return [
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
    ]


def _figures_section(results: dict[str, Any]) -> list[str]:
    return [
        "## Figures",
        "",
        "Fig. 1 of the paper for this data: the queries and keys of one head in one shared 2-D PCA, "
        "same question, module, layer and head for both models.",
        "",
        f"![queries and keys]({FIG1_FILE})",
        "",
        "MMD² per layer (mean ± std over seeds):",
        "",
        f"![MMD per layer]({MMD_FILE})",
        "",
        "Training curves:",
        "",
        f"![curves]({CURVES_FILE})",
        "",
        "Reliability diagrams (first seed): "
        + " ".join(f"[`{x}`](reliability_{x}.png)" for x in results["methods"]
                   if f"reliability_{x}.png" in results["figures"]),
        "",
    ]


def render_report(results: dict[str, Any]) -> str:
    """report.md from results.json's content (a pure function of it; statistics with NaN, as
    :func:`~vqa_align.experiments.results.restore_nan` gives them)."""
    return "\n".join(_results_section(results) + _setup_section(results) + _figures_section(results))


def write_report(out: Path) -> None:
    """Draw the figures and write report.md from ``out/results.json`` (only from it).

    The figures need the data the runner measured into results.json (``figure_data``); a
    results.json written before it was recorded there gets report.md only."""
    results = restore_nan(read_json(out / RESULTS_FILE, MAX_META_BYTES, expect=dict))
    figure_data = results.get("figure_data")
    if figure_data is not None:
        fig1 = results["settings"]["fig1"]
        plot_fig1(figure_data["fig1"], fig1["seed"], fig1["head"], out / FIG1_FILE)
        plot_mmd_per_layer(results["runs"], results["methods"], out / MMD_FILE)
        plot_curves(figure_data["curves"], results["methods"], out / CURVES_FILE)
    (out / REPORT_FILE).write_text(render_report(results))
