"""Methods x seeds of sentence classification -> a report (markdown + JSON + figures).

``vqa-align sentiment experiment --config configs/sentiment_minilm.yaml --methods none,ct,gan
--seeds 0-4 --out docs/results/sentiment`` runs, seed by seed, every method (so an interrupted grid
still holds complete pairs), writes each finished run's result to ``<out>/runs/<method>_seed<k>.json``
at once, and rewrites the report after every run. Checkpoints and JSONL logs go to ``--runs-dir``
(default ``<cache>/runs/sentiment``), not into the report folder. Rerunning the command continues
the grid by the policy of :mod:`vqa_align.experiments.grid`: finished runs are kept, a run stopped
after a checkpoint is resumed, anything made with another config is refused, never deleted. (The
sentence runner evaluates only right after training, so a run killed between its last training
step and its result is trained again from scratch.) ``vqa-align sentiment report --out DIR``
rewrites the report from whatever runs exist, reading only the files in DIR.

Statistics (:mod:`vqa_align.experiments.stats`): mean ± sample std over seeds; for each aligned
method against ``none`` the seeds both have are paired: mean difference, paired t-test and
Wilcoxon signed-rank p-values (two-sided), each Holm-adjusted over the family of all metrics of that
method over one seed set; verdicts come from the adjusted t-test p. With 5 pairs the smallest
Wilcoxon p is 0.0625. Seed roles (``run.exploratory_seeds`` / ``run.confirmatory_seeds``, or
``seed_roles`` in results.json): each set is tested on its own as well as all seeds pooled.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from vqa_align.errors import UserError
from vqa_align.experiments.grid import (
    Cell, Log, config_signature, check_same_config, finished_result, grid_cells, machine_info, parse_methods,
    parse_seeds, run_grid as run_cells, unfinished_run_state,
)
from vqa_align.experiments.stats import (
    MIN_PAIRS, Metric, check_seed_roles, compare_to_baseline, family_size, family_text, format_p, mean_std,
    seed_set_title, seed_sets, tests_table, verdict,
)
from vqa_align.runs.report_folder import open_report_folder
from vqa_align.untrusted_files import MAX_META_BYTES, read_json

RUNS_FOLDER = "runs"
REPORT_JSON = "results.json"
REPORT_MD = "README.md"
NOTES_MD = "notes.md"  # hand-written reading of the results, included in the report when present
MMD_FIGURE, DOMAINS_FIGURE = "mmd_per_layer.png", "accuracy_ece_by_domain.png"
REPORT_FILES = (REPORT_JSON, REPORT_MD, MMD_FIGURE, DOMAINS_FIGURE)  # written by write_report (and runs/<cell>.json)
CROSS = ("amazon", "tweets", "nyt")


def metrics_for(splits: Sequence[str]) -> list[Metric]:
    out: list[Metric] = []
    for split in splits:
        out += [
            Metric(f"splits/{split}/accuracy", f"{split} accuracy (%)", True),
            Metric(f"splits/{split}/ece", f"{split} ECE (%)", False),
            Metric(f"splits/{split}/pavpu", f"{split} PAvPU (%)", True),
            Metric(f"splits/{split}/noisy_accuracy", f"{split} accuracy, noisy embeddings (%)", True),
        ]
    out += [
        Metric("cross_domain_accuracy", "cross-domain accuracy, mean of 3 (%)", True),
        Metric("cross_domain_ece", "cross-domain ECE, mean of 3 (%)", False),
        Metric("alignment/mmd2_sum_heads_layers", "key–query MMD², summed over heads and layers", False, 3),
        Metric("best_dev_accuracy", "dev accuracy at the chosen step (%)", True),
        Metric("best_step", "chosen step (early stopping)", True, 0),
        Metric("step_seconds_median", "training step, median wall (s)", False, 3),
        Metric("step_cpu_seconds_median", "training step, median CPU time over threads (s)", False, 3),
    ]
    return out


def lookup(result: dict[str, Any], key: str) -> float | None:
    node: Any = result
    for part in key.split("/"):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return float(node) if isinstance(node, (int, float)) and not isinstance(node, bool) else None


def with_derived(result: dict[str, Any]) -> dict[str, Any]:
    """Adds the mean accuracy and ECE over the cross-domain splits present."""
    splits = result.get("splits", {})
    present = [s for s in CROSS if s in splits]
    if present:
        result = dict(result)
        result["cross_domain_accuracy"] = float(np.mean([splits[s]["accuracy"] for s in present]))
        result["cross_domain_ece"] = float(np.mean([splits[s]["ece"] for s in present]))
    return result


def load_runs(out: Path) -> list[dict[str, Any]]:
    runs = []
    for path in sorted((out / RUNS_FOLDER).glob("*.json")):
        try:
            runs.append(with_derived(read_json(path, MAX_META_BYTES, expect=dict)))
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: not a run result ({err})") from None
    return runs


def summarize(runs: list[dict[str, Any]], methods: Sequence[str], metrics: Sequence[Metric],
              seed_roles: dict[str, list[int]] | None = None) -> dict[str, Any]:
    """Aggregates per method, paired tests per aligned method (Holm-adjusted per method and seed
    set: ``paired_tests`` over all seeds, ``paired_tests_by_seed_set`` per role when roles are
    given), mean MMD² per layer, seeds per method."""
    by_method = {m: sorted((r for r in runs if r["method"] == m), key=lambda r: r["seed"]) for m in methods}
    aggregates = {m: {x.key: mean_std(lookup(r, x.key) for r in rs) for x in metrics} for m, rs in by_method.items()}
    keys = [x.key for x in metrics]
    values = {m: {r["seed"]: {k: lookup(r, k) for k in keys} for r in rs} for m, rs in by_method.items()}
    all_seeds = sorted({r["seed"] for r in runs})
    by_set: dict[str, dict[str, Any]] = {}
    for name, seeds in seed_sets(all_seeds, seed_roles):
        by_set[name] = {"seeds": seeds, "tests": {
            method: compare_to_baseline(values[method], values.get("none", {}), keys, seeds)
            for method in methods if method != "none"}}
    layers: dict[str, list[float]] = {}
    for method, rs in by_method.items():
        per = [r["alignment"]["mmd2_per_layer"] for r in rs if "alignment" in r]
        if per:
            layers[method] = np.mean(per, axis=0).tolist()
    summary = {"aggregates": aggregates, "paired_tests": by_set["all"]["tests"], "mmd2_per_layer_mean": layers,
               "seeds": {m: [r["seed"] for r in rs] for m, rs in by_method.items()}}
    if seed_roles:
        summary["seed_roles"] = seed_roles
        summary["paired_tests_by_seed_set"] = by_set
    return summary


def mmd_selection(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Which movie-test sentences the runs measured MMD² on: ``sampled`` runs record their seeded
    stratified sample (size, seed, class balance); ``file_order`` runs (made before the sample)
    took the first ``mmd_sentences`` sentences of the split file, which is ordered by label."""
    out: dict[str, Any] = {"sampled": [], "file_order": []}
    for run in runs:
        alignment = run.get("alignment")
        if not alignment:
            continue
        sample = alignment.get("mmd_sample")
        entry = {"run": f"{run['method']}_seed{run['seed']}", "n": alignment.get("mmd_sentences"), **(sample or {})}
        out["sampled" if sample else "file_order"].append(entry)
    return out


def mmd_selection_text(selection: dict[str, Any], eval_subset: int | None) -> str:
    """Which sentences MMD² was measured on (from :func:`mmd_selection`); ``eval_subset``: the
    runs' ``data.eval_subset`` (their movie-test sentences were that fixed random subset)."""
    sampled, file_order = selection.get("sampled", []), selection.get("file_order", [])
    parts = []
    if sampled:
        kinds = sorted({(e["n"], e["seed"], e["negative"], e["positive"]) for e in sampled})
        parts.append("a seeded stratified sample of the evaluated movie-test sentences (" + "; ".join(
            f"{n} sentences, seed {seed}: {neg} negative / {pos} positive" for n, seed, neg, pos in kinds)
            + f"), in {len(sampled)} run(s)")
    if file_order:
        sizes = sorted({e["n"] for e in file_order})
        pool = f"of the fixed random {eval_subset}-sentence movie-test subset" if eval_subset else "movie-test sentences"
        parts.append(f"the first {', '.join(map(str, sizes))} {pool} in file order — not a sample: the split file is "
                     f"ordered by label and the class balance of those sentences is not recorded in the runs — in "
                     f"{len(file_order)} run(s)")
    if sampled and file_order:
        parts.append("the two selections are not comparable, so MMD² differences across them mean little")
    return "; ".join(parts) if parts else "no MMD² measured"


def _fmt(stat: dict[str, Any], digits: int) -> str:
    if not stat or stat.get("n", 0) == 0 or not math.isfinite(stat["mean"]):
        return "–"
    if stat["n"] == 1:
        return f"{stat['mean']:.{digits}f} (1 run)"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def plot_figures(summary: dict[str, Any], runs: list[dict[str, Any]], methods: Sequence[str], splits: Sequence[str],
                 out: Path) -> list[str]:
    from matplotlib.figure import Figure

    written = []
    layers = summary["mmd2_per_layer_mean"]
    if layers:
        fig = Figure(figsize=(5, 3.4))
        ax = fig.subplots()
        for method in methods:
            if method in layers:
                ax.plot(range(1, len(layers[method]) + 1), layers[method], marker="o", label=method)
        ax.set(xlabel="layer", ylabel="key–query MMD² (mean over heads)", title="MiniLM self-attention, movie test")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / MMD_FIGURE, dpi=100)
        written.append(MMD_FIGURE)
    fig = Figure(figsize=(8, 3.4))
    axes = fig.subplots(1, 2)
    width = 0.8 / max(len(methods), 1)
    for i, method in enumerate(methods):
        agg = summary["aggregates"].get(method, {})
        for ax, name in zip(axes, ("accuracy", "ece")):
            means = [agg.get(f"splits/{s}/{name}", {}).get("mean", math.nan) for s in splits]
            stds = [agg.get(f"splits/{s}/{name}", {}).get("std", math.nan) for s in splits]
            ax.bar(np.arange(len(splits)) + i * width, means, width, yerr=stds, label=method, capsize=2)
    for ax, name in zip(axes, ("accuracy (%)", "ECE (%)")):
        ax.set_xticks(np.arange(len(splits)) + width * (len(methods) - 1) / 2, list(splits))
        ax.set_ylabel(name)
    axes[0].set_ylim(50, 100)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / DOMAINS_FIGURE, dpi=100)
    written.append(DOMAINS_FIGURE)
    return written


def _schedule(config: dict[str, Any], key: str) -> Any:
    """A schedule option: ``train.<key>``, or ``run.<key>`` in reports written before it moved there."""
    return config["train"].get(key, config.get("run", {}).get(key))


def _threads(results: dict[str, Any], machine: dict[str, Any]) -> str:
    """The runs' torch threads ("1", "1 or 2"); reports written before this was recorded: the report process's."""
    threads = results.get("run_threads")
    return " or ".join(map(str, threads)) if threads else str(machine.get("torch_threads"))


OPTIMIZER_NAMES = {"adam": "Adam", "adamw": "AdamW"}  # train.optimizer -> how the report names it


def render(results: dict[str, Any], metrics: Sequence[Metric], notes: str | None) -> str:
    methods, summary = results["methods"], results["summary"]
    lines = ["# Alignment attention on real sentences: MiniLM, binary sentiment, four domains", ""]
    lines += ["Made by (design: [docs/sentiment.md](../../sentiment.md)):", "", "```bash", results["command"], "```", ""]
    m = results["machine"]
    lines += [f"Machine: {m.get('processor')}, {m.get('cpu_count')} CPU cores shared with other jobs "
              f"(load average {m.get('load_average_1m', math.nan):.1f} when the report was written), torch threads "
              f"{_threads(results, m)}, torch {m.get('torch')}, no GPU. Times are noisy for that reason.", ""]
    seeds = summary["seeds"]
    lines += ["Runs finished: " + ", ".join(f"{k}: seeds {v}" for k, v in seeds.items()) + ".", ""]
    if results.get("data"):
        d = results["data"]
        lines += [f"Data: `{d['source']}` — sentences per domain {d['sentences_per_domain']}; rated exactly 0 "
                  f"and dropped: {d['zero_rated_dropped']}; split sha256 `{d['split_sha256']}`; sentences per split "
                  f"(negative/positive): " + ", ".join(f"{k} {v['negative']}/{v['positive']}" for k, v in d["splits"].items()) + ".", ""]
    if results.get("config"):
        c = results["config"]
        lines += [f"Schedule: batch {c['train']['batch_size']}, {OPTIMIZER_NAMES[c['train'].get('optimizer', 'adamw')]} "
                  f"lr {c['train']['lr']}, warm-up "
                  f"{_schedule(c, 'warmup_steps')} steps, "
                  + (f"at most {c['train']['max_steps']} steps / " if c['train'].get('max_steps') is not None else "")
                  + f"{c['train']['epochs']} epoch(s), dev check every {_schedule(c, 'eval_every_steps')} steps, patience {_schedule(c, 'patience')}; "
                  f"max {c['model']['max_tokens']} tokens; λ = {c['model']['alignment']['weight']}; "
                  f"MC dropout {c['run']['mc_samples']} samples"
                  + (f" on {c['run']['mc_max_sentences']} sentences per split" if c['run'].get('mc_max_sentences') else "")
                  + f"; noise N(0, {c['run']['noise_std']}²) on word embeddings.", ""]
    if results.get("mmd_selection") is not None:
        eval_subset = (results.get("config") or {}).get("data", {}).get("eval_subset")
        lines += ["Key–query MMD² measured on " + mmd_selection_text(results["mmd_selection"], eval_subset) + ".", ""]
    if results.get("config"):
        c = results["config"]
        subsets = [f"each test split is a fixed random subset of {c['data']['eval_subset']} sentences"
                   if c["data"].get("eval_subset") else "",
                   f"dev checks use {c['data']['dev_subset']} dev sentences" if c["data"].get("dev_subset") else ""]
        subsets = [x for x in subsets if x]
        if subsets:
            lines += ["Evaluated on subsets (CPU budget): " + "; ".join(subsets) + " (a fixed seed-0 shuffle, "
                      "the same sentences for every run).", ""]
    lines += _claims(summary, methods, metrics)
    if notes:
        lines += [notes.strip(), ""]
    lines += ["## Mean ± std over seeds", "", "| metric | " + " | ".join(methods) + " |",
              "|---|" + "---|" * len(methods)]
    for metric in metrics:
        row = [_fmt(summary["aggregates"].get(method, {}).get(metric.key, {}), metric.digits) for method in methods]
        lines.append(f"| {metric.label} | " + " | ".join(row) + " |")
    lines += _paired_section(summary, methods, metrics)
    layers = summary["mmd2_per_layer_mean"]
    if layers:
        lines += ["## Key–query MMD² per layer (mean over heads, sentences, seeds)", "",
                  "| method | " + " | ".join(f"layer {i + 1}" for i in range(len(next(iter(layers.values()))))) + " |",
                  "|---|" + "---|" * len(next(iter(layers.values())))]
        for method, values in layers.items():
            lines.append(f"| {method} | " + " | ".join(f"{v:.4f}" for v in values) + " |")
    lines += [""] + [f"![{f}]({f})" for f in results.get("figures", [])] + [""]
    return "\n".join(lines)


# The paper's claims (Zhang et al. 2021, §4 on GLUE/SQuAD/cross-domain tasks), as metrics of this report.
CLAIMS = [
    ("higher in-domain accuracy", "splits/movie_test/accuracy"),
    ("lower in-domain ECE (better calibration)", "splits/movie_test/ece"),
    ("higher in-domain PAvPU", "splits/movie_test/pavpu"),
    ("higher cross-domain accuracy", "cross_domain_accuracy"),
    ("lower cross-domain ECE", "cross_domain_ece"),
    ("more robust to noise (in-domain accuracy, noisy embeddings)", "splits/movie_test/noisy_accuracy"),
    ("lower key–query MMD²", "alignment/mmd2_sum_heads_layers"),
]


def _paired_section(summary: dict[str, Any], methods: Sequence[str], metrics: Sequence[Metric]) -> list[str]:
    """Per seed set and aligned method, the paired tests against none (raw and Holm p, verdicts)."""
    lines = ["", "## Paired across seeds, aligned − none", "",
             "Two-sided paired t-test and Wilcoxon signed-rank p over the seeds both methods have. "
             + family_text("none"), ""]
    aligned = [m for m in methods if m != "none"]
    sets = _seed_set_tests(summary)
    for name, part in sets:
        if len(sets) > 1:
            lines += [f"### {seed_set_title(name, part['seeds'])}", ""]
        for method in aligned:
            tests = part["tests"].get(method, {})
            if not family_size(tests):
                pairs = max((t.get("n", 0) for t in tests.values()), default=0)
                lines += [f"`{method}` − `none`: {pairs} pair(s), no test possible.", ""]
                continue
            lines += [f"`{method}` − `none` (Holm family of {family_size(tests)}):", "", *tests_table(tests, metrics), ""]
    return lines


def _seed_set_tests(summary: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(seed set name, {"seeds", "tests"}) in report order: all seeds, then the declared roles."""
    by_set = summary.get("paired_tests_by_seed_set")
    if by_set:
        return list(by_set.items())
    seeds = sorted({s for ss in summary["seeds"].values() for s in ss})
    return [("all", {"seeds": seeds, "tests": summary["paired_tests"]})]


def _claim_cell(test: dict[str, Any], metric: Metric) -> str:
    n = test.get("n", 0)
    if n == 0:
        return "no runs"
    delta = f"Δ {test['mean_diff']:+.{metric.digits}f}"
    if n < MIN_PAIRS:
        return f"n = {n}: {delta}, too few pairs for a test"
    return (f"{verdict(test, metric.higher_is_better)} ({delta}, p {format_p(test['t_p'])}, "
            f"Holm {format_p(test.get('t_p_holm'))}, n = {n})")


def _claims(summary: dict[str, Any], methods: Sequence[str], metrics: Sequence[Metric]) -> list[str]:
    """One row per claim: the paired verdict of each aligned method against none, per seed set."""
    aligned = [m for m in methods if m != "none"]
    by_key = {m.key: m for m in metrics}
    sets = _seed_set_tests(summary)
    columns = [(method, name, part) for method in aligned for name, part in sets]
    title = (lambda method, name, part: method if len(sets) == 1
             else f"{method}, {seed_set_title(name, part['seeds'])}")
    lines = ["## Did the paper's claims replicate here?", "",
             "Verdict per aligned method: paired t-test over the seeds both methods have, Holm-adjusted over the "
             "family of all metrics of that method and seed set (the tables below), `better` / `worse` when the "
             "adjusted p < 0.05, else `no clear difference`; p = raw t-test p, Holm = adjusted; n = number of "
             "pairs.", ""]
    if summary.get("seed_roles"):
        roles = summary["seed_roles"]
        lines += [f"Seed roles: exploratory {roles.get('exploratory')}, confirmatory {roles.get('confirmatory')}"
                  + (f" ({roles['note']})" if roles.get("note") else "") + ". The confirmatory seeds are the test "
                  "of what the exploratory ones suggested; the pooled seeds reuse the ones that suggested it.", ""]
    lines += ["| claim | " + " | ".join(title(*c) for c in columns) + " |", "|---|" + "---|" * len(columns)]
    for text, key in CLAIMS:
        if key not in by_key:
            continue
        cells = [_claim_cell(part["tests"].get(method, {}).get(key, {}), by_key[key]) for method, _, part in columns]
        lines.append(f"| {text} | " + " | ".join(cells) + " |")
    return lines + [""]


def seed_roles_of(config: dict[str, Any] | None) -> dict[str, list[int]] | None:
    """The seed roles a config declares (``run.exploratory_seeds`` / ``run.confirmatory_seeds``), or None."""
    run = (config or {}).get("run", {})
    roles = {role: list(run.get(f"{role}_seeds") or []) for role in ("exploratory", "confirmatory")}
    return roles if any(roles.values()) else None


def write_report(out: Path, methods: Sequence[str], command: str, data: dict[str, Any] | None,
                 config: dict[str, Any] | None, machine: dict[str, Any] | None = None,
                 seed_roles: dict[str, Any] | None = None) -> dict[str, Any]:
    """results.json, README.md and the figures from the run results in ``out/runs`` (only from
    files: no model, no torch). ``machine``: where the runs ran, as the grid measured it (None:
    the one recorded in the previous results.json, so a rewritten report states the same).
    ``seed_roles``: {"exploratory", "confirmatory"[, "note"]} (None: those the config declares)."""
    runs = load_runs(out)
    if machine is None:
        previous = read_json(out / REPORT_JSON, MAX_META_BYTES, expect=dict) if (out / REPORT_JSON).is_file() else {}
        machine = previous.get("machine", {})
    seed_roles = seed_roles or seed_roles_of(config)
    check_seed_roles(seed_roles, f"{out / REPORT_JSON}: seed_roles")  # a seed not run yet is left out of its set
    splits = config["run"]["test_splits"] if config else ["movie_test", *CROSS]
    metrics = metrics_for(splits)
    summary = summarize(runs, methods, metrics, seed_roles)
    results = {"command": command, "machine": machine, "methods": list(methods), "data": data, "config": config,
               **({"seed_roles": seed_roles} if seed_roles else {}), "mmd_selection": mmd_selection(runs),
               # the runs' own torch threads (the report may be written by a process with another count)
               "run_threads": sorted({r["threads"] for r in runs if r.get("threads") is not None}),
               "summary": summary, "written": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    results["figures"] = plot_figures(summary, runs, methods, splits, out) if runs else []
    (out / REPORT_JSON).write_text(json.dumps(results, indent=2, default=float))
    notes = (out / NOTES_MD).read_text() if (out / NOTES_MD).is_file() else None
    (out / REPORT_MD).write_text(render(results, metrics, notes))
    return results


def _restart(run_dir: Path) -> None:
    """Clear an unfinished run folder so it can be trained again; only one that vqa-align made and
    that holds nothing else (a finished run has its result.json and is never cleared)."""
    from vqa_align.runs.run_folder import check_replaceable, holds_run

    if holds_run(run_dir):
        check_replaceable(run_dir, option="sentiment experiment")
        shutil.rmtree(run_dir)


def run_cell(cell: Cell, log: Log, config: Any, out: Path, runs_dir: Path,
             sentences: dict[str, list[Any]]) -> bool:
    """Train (or resume, or reuse) and evaluate one grid cell into ``out/runs/<name>.json``;
    False when it was finished before (nothing new for the report)."""
    from vqa_align.sentiment.runner import RESULT_FILE, run_one

    signature = config_signature(config)
    target, run_dir = out / RUNS_FOLDER / f"{cell.name}.json", runs_dir / cell.name
    if finished_result(target, signature, target) is not None:
        log(f"{cell.name}: done before, kept")
        return False
    if (run_dir / RESULT_FILE).is_file():  # finished in --runs-dir; its result never reached --out
        check_same_config(run_dir, signature, "--runs-dir")
        log(f"{cell.name}: finished earlier in {run_dir}, kept")
        result = read_json(run_dir / RESULT_FILE, MAX_META_BYTES, expect=dict)
    elif unfinished_run_state(run_dir, signature, config.train.epochs, config.train.max_steps,
                              "--runs-dir") == "partial":
        log(f"{cell.name}: resuming training from {run_dir / 'checkpoints/last'}")
        result = run_one(config, run_dir, sentences, resume=True)
    else:  # no checkpoint, or trained but not evaluated: the sentence runner trains again
        _restart(run_dir)
        log(f"{cell.name}: training in {run_dir}")
        result = run_one(config, run_dir, sentences)
    target.write_text(json.dumps({**result, "config": signature}, indent=2))
    log(f"{cell.name}: movie test {result['splits'].get('movie_test', {}).get('accuracy', math.nan):.2f}% "
        f"in {result['wall_seconds']:.0f} s")
    return True


def run_grid(config_path: str, methods: Sequence[str], seeds: Sequence[int], overrides: Sequence[str], out: Path,
             runs_dir: Path, command: str, progress: bool = True) -> dict[str, Any]:
    """Every (method, seed), seed by seed; the report is rewritten after each newly finished run."""
    from vqa_align.paths import cache_root
    from vqa_align.sentiment.data import FOLDER, MANIFEST, load_sentences
    from vqa_align.sentiment.runner import load_sentiment_config

    base = load_sentiment_config(config_path, overrides)  # fails early on a bad config
    check_seed_roles(seed_roles_of(base.to_dict()), "run.exploratory_seeds / run.confirmatory_seeds", seeds)
    cells = grid_cells(methods, seeds, seed_major=True)
    open_report_folder(out, [*REPORT_FILES, *(f"{RUNS_FOLDER}/{cell.name}.json" for cell in cells)])
    folder = cache_root(base.data.cache_dir) / FOLDER
    sentences = load_sentences(folder)
    data = read_json(folder / MANIFEST, MAX_META_BYTES, expect=dict)
    (out / RUNS_FOLDER).mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}

    def run_and_report(cell: Cell, log: Log) -> None:
        nonlocal results
        config = load_sentiment_config(config_path, [*overrides, f"model.alignment.method={cell.method}",
                                                     f"train.seed={cell.seed}"])
        if run_cell(cell, log, config, out, runs_dir, sentences):
            results = write_report(out, methods, command, data, base.to_dict(), machine_info())

    run_cells(cells, run_and_report, progress)
    return results or write_report(out, methods, command, data, base.to_dict(), machine_info())


def run_experiment(args: argparse.Namespace) -> int:
    from vqa_align.paths import cache_root

    methods = parse_methods(args.methods)
    seeds = parse_seeds(args.seeds)
    out = Path(args.out)
    runs_dir = Path(args.runs_dir) if args.runs_dir else cache_root(None) / "runs" / "sentiment"
    command = "vqa-align " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["sentiment"] else \
        f"vqa-align sentiment experiment --config {args.config} --methods {args.methods} --seeds {args.seeds} --out {args.out}"
    run_grid(args.config, methods, seeds, args.overrides, out, runs_dir, command)
    print(f"[sentiment] report: {out / REPORT_MD}")
    return 0


def run_report(args: argparse.Namespace) -> int:
    out = Path(args.out)
    open_report_folder(out, REPORT_FILES)
    previous = read_json(out / REPORT_JSON, MAX_META_BYTES, expect=dict) if (out / REPORT_JSON).is_file() else {}
    methods = parse_methods(args.methods) if args.methods else previous.get("methods", ["none", "ct", "gan"])
    write_report(out, methods, previous.get("command", "(unknown)"), previous.get("data"), previous.get("config"),
                 seed_roles=previous.get("seed_roles"))
    print(f"[sentiment] report: {out / REPORT_MD}")
    return 0
