"""The experiment runner: pure aggregation/table/findings pieces, and a tiny 2 x 1 grid end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import tiny_run_overrides
from vqa_align.experiments import vqa as experiment
from vqa_align.train import trainer as training
from vqa_align.cli import main as cli_main
from vqa_align.errors import UserError
from vqa_align.experiments import vqa_report
from vqa_align.experiments.grid import config_signature, parse_methods, parse_seeds
from vqa_align.experiments.stats import Metric, aggregate, clear_difference, mean_std
from vqa_align.experiments.vqa import experiment_command, seconds_per_step
from vqa_align.experiments.vqa_report import findings, flat_metrics, render_table, report_metrics

PRESET = "configs/easy_vqa.yaml"
ACC = Metric("accuracy", "accuracy", True)
ECE = Metric("ece", "ECE ↓", False)
PARAMS = Metric("parameters", "params (train)", None, kind="count")


# ----------------------------------------------------------------------------------------------
# Pure pieces
# ----------------------------------------------------------------------------------------------


def test_mean_std_is_the_sample_std_and_ignores_missing_values():
    assert mean_std([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 3}
    assert mean_std([5.0]) == {"mean": 5.0, "std": 0.0, "n": 1}
    assert mean_std([2.0, None, math.nan, 4.0])["n"] == 2
    empty = mean_std([])
    assert empty["n"] == 0 and math.isnan(empty["mean"])


def test_aggregate_groups_runs_by_method():
    runs = [{"method": "ct", "metrics": {"accuracy": 90.0, "ece": 2.0}},
            {"method": "ct", "metrics": {"accuracy": 92.0, "ece": 4.0}},
            {"method": "none", "metrics": {"accuracy": 80.0}}]
    agg = aggregate(runs)
    assert agg["ct"]["accuracy"] == {"mean": 91.0, "std": pytest.approx(math.sqrt(2)), "n": 2}
    assert agg["ct"]["ece"]["mean"] == 3.0 and set(agg["none"]) == {"accuracy"}


def _agg(**per_method):
    """{"ct": {"accuracy": (mean, std, n)}} -> aggregates."""
    return {m: {k: {"mean": v[0], "std": v[1], "n": v[2]} for k, v in ms.items()} for m, ms in per_method.items()}


def test_render_table_one_row_per_method_best_in_bold_and_counts():
    agg = _agg(none={"accuracy": (80.0, 1.0, 3), "ece": (5.0, 0.5, 3), "parameters": (1_234_567, 0, 3)},
               ct={"accuracy": (85.0, 2.0, 3), "ece": (7.0, 0.5, 3), "parameters": (1_300_000, 0, 3)})
    table = render_table(agg, [ACC, ECE, PARAMS], ["none", "ct"]).splitlines()
    assert table[0] == "| method | seeds | accuracy | ECE ↓ | params (train) |"
    assert len(table) == 2 + 2
    assert table[2] == "| `none` | 3 | 80.00 ± 1.00 | **5.00 ± 0.50** | 1.23M |"
    assert table[3] == "| `ct` | 3 | **85.00 ± 2.00** | 7.00 ± 0.50 | 1.30M |"
    single = render_table(_agg(ct={"accuracy": (85.0, 0.0, 1)}), [ACC, ECE], ["ct"]).splitlines()
    assert single[2] == "| `ct` | 1 | 85.00 | – |"  # one seed: no "± 0", no bold against nobody
    tie = render_table(_agg(none={"accuracy": (0.0, 0.0, 1)}, ct={"accuracy": (0.0, 0.0, 1)}), [ACC], ["none", "ct"])
    assert "**" not in tie
    assert findings(_agg(none={"accuracy": (0.0, 0.0, 1)}, ct={"accuracy": (0.0, 0.0, 1)}), [ACC],
                    ["none", "ct"])[0] == "**accuracy**: `none` and `ct` tie at 0.00."


def test_findings_follow_the_numbers():
    clear = _agg(none={"accuracy": (80.0, 1.0, 3), "ece": (5.0, 1.0, 3)},
                 ct={"accuracy": (85.0, 1.0, 3), "ece": (5.5, 1.0, 3)})
    lines = findings(clear, [ACC, ECE], ["none", "ct"])
    assert lines[0].startswith("**accuracy**: highest `ct`") and "exceeds both stds" in lines[0]
    assert lines[1].startswith("**ECE**: lowest `none`") and "within one std" in lines[1]
    assert len(lines) == 2  # the verdicts against `none` are the paired tests' (below), not the heuristic's
    flipped = _agg(none={"accuracy": (85.0, 1.0, 3)}, ct={"accuracy": (80.0, 1.0, 3)})
    assert findings(flipped, [ACC], ["none", "ct"])[0].startswith("**accuracy**: highest `none`")
    saturated = findings(_agg(none={"accuracy": (99.5, 0.1, 3)}, ct={"accuracy": (99.9, 0.1, 3)}), [ACC],
                         ["none", "ct"])
    assert saturated[0].startswith("Clean accuracy saturates")
    one_seed = findings(_agg(none={"accuracy": (80.0, 0.0, 1)}, ct={"accuracy": (85.0, 0.0, 1)}), [ACC],
                        ["none", "ct"])
    assert "one seed" in one_seed[0]
    assert clear_difference({"mean": 1, "std": 0, "n": 1}, {"mean": 2, "std": 0, "n": 1}) is None


def _runs(per_method: dict[str, dict[str, list[float]]]) -> list[dict]:
    """{"ct": {"accuracy": [per seed]}} -> results.json-like runs."""
    runs = []
    for method, metrics in per_method.items():
        for seed in range(len(next(iter(metrics.values())))):
            runs.append({"method": method, "seed": seed, "metrics": {k: v[seed] for k, v in metrics.items()}})
    return runs


def test_paired_tests_against_none_are_holm_adjusted_per_method():
    from scipy import stats

    from vqa_align.experiments.vqa_report import baseline_findings, paired_tests, render_tests

    none_acc, ct_acc = [80.0, 82.0, 81.0, 79.0], [82.0, 84.5, 83.0, 81.5]  # ct ahead by 2–2.5 in every seed
    none_ece, ct_ece = [5.0, 6.0, 4.0, 5.5], [5.5, 5.0, 4.5, 6.0]
    runs = _runs({"none": {"accuracy": none_acc, "ece": none_ece}, "ct": {"accuracy": ct_acc, "ece": ct_ece}})
    tests = paired_tests(runs, [ACC, ECE, PARAMS], ["none", "ct"])
    acc, ece = tests["ct"]["accuracy"], tests["ct"]["ece"]
    raw = sorted([stats.ttest_rel(ct_acc, none_acc).pvalue, stats.ttest_rel(ct_ece, none_ece).pvalue])
    assert acc["t_p"] == pytest.approx(raw[0]) and acc["t_p_holm"] == pytest.approx(2 * raw[0])  # m = 2
    assert ece["t_p_holm"] == pytest.approx(max(2 * raw[0], raw[1]))
    assert "parameters" not in tests["ct"]  # no direction: not tested, not in the family
    assert baseline_findings(tests, [ACC, ECE])[0] == (
        "`ct` vs `none` (paired t-test over 4 seeds, Holm-adjusted over its 2 tests, p < 0.05): better on accuracy; "
        "worse on nothing; no clear difference on the rest.")
    table = render_tests(tests, [ACC, ECE])
    assert table[0] == "`ct` − `none` (Holm family of 2):"
    assert table[4].startswith(f"| accuracy | 4 | +2.25 | {acc['t_p']:.3f} | {acc['t_p_holm']:.3f} |")
    assert table[4].endswith("| better |")
    # Only the confirmatory seeds 2, 3: another family, its own verdict.
    late = paired_tests(runs, [ACC, ECE], ["none", "ct"], seeds=[2, 3])
    assert late["ct"]["accuracy"]["n"] == 2 and "too few" in baseline_findings(late, [ACC, ECE])[0]


def test_report_tests_declared_seed_roles_apart(tmp_path):
    from pathlib import Path

    published = Path(__file__).resolve().parents[1] / "docs" / "results" / "easy_vqa" / "results.json"
    results = json.loads(published.read_text())
    results["seed_roles"] = {"exploratory": [0], "confirmatory": [1, 2]}
    (tmp_path / "results.json").write_text(json.dumps(results))
    report = vqa_report.render_report(vqa_report.restore_nan(results))
    assert "Seed roles (`seed_roles` in results.json): exploratory [0], confirmatory [1, 2]" in report
    headings = [line for line in report.splitlines() if line.startswith("### ")]
    assert headings == ["### all seeds 0, 1, 2", "### exploratory seeds 0", "### confirmatory seeds 1, 2"]
    with pytest.raises(UserError, match="both exploratory and confirmatory"):
        experiment.run_experiment_grid(PRESET, ["none"], [0, 1], [], tmp_path / "x", progress=False,
                                       seed_roles={"exploratory": [0, 1], "confirmatory": [1]})


def test_commands_parsing_and_helpers():
    command = experiment_command("configs/easy_vqa.yaml", ["none", "ct"], [0, 1],
                                 ["data.subset=3840", "train.decay_epochs=[6, 7]"], "reports/x y")
    assert command == ("vqa-align experiment --config configs/easy_vqa.yaml --methods none,ct --seeds 0,1 "
                       "--set data.subset=3840 --set 'train.decay_epochs=[6, 7]' --out 'reports/x y'")
    assert parse_methods("none, ct,ct") == ["none", "ct"] and parse_seeds("2,0") == [2, 0]
    for bad in ("", "kl", "ct,kl"):
        with pytest.raises(UserError):
            parse_methods(bad)
    with pytest.raises(UserError):
        parse_seeds("a")
    records = [{"kind": "train", "samples_per_s": r} for r in (10.0, 100.0, 64.0)] + [{"kind": "epoch"}]
    assert seconds_per_step(records, 64) == pytest.approx(1.0) and seconds_per_step([], 64) is None
    a = {"model": {"vocab_size": 10, "hidden_size": 8}, "train": {"device": "cuda", "lr": 1.0}, "data": {}}
    b = {"model": {"vocab_size": 0, "hidden_size": 8}, "train": {"device": "cpu", "lr": 1.0}, "data": {}}
    assert config_signature(a) == config_signature(b)
    result = {"accuracy": 90.0, "per_answer_type": {"yes/no": 95.0}, "noisy_accuracy": {"1": 50.0}, "ece": 3.0,
              "pavpu": None, "mmd2": {"sga_guided": 0.1}, "parameters": 100}
    assert flat_metrics(result) == {"accuracy": 90.0, "accuracy_yes/no": 95.0, "noisy_accuracy_1": 50.0, "ece": 3.0,
                                    "parameters": 100, "mmd2_sga_guided": 0.1, "noise_drop_1": 40.0}
    keys = [m.key for m in report_metrics(["other", "yes/no"], [1.0, 0.1], ["sa_question"])]
    assert keys[:5] == ["accuracy", "accuracy_yes/no", "accuracy_other", "noisy_accuracy_1", "noisy_accuracy_0.1"]


# ----------------------------------------------------------------------------------------------
# End to end on the tiny easy-VQA subset
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def one_thread():
    """One torch thread: on a shared 2-core machine, two spinning OpenMP threads per process made
    this test 6x slower (37 s instead of 6 s for the grid); the tiny model gains nothing from two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_experiment_writes_report_and_a_rerun_resumes(easy_vqa_cache, tmp_path, monkeypatch, capsys, one_thread):
    out = tmp_path / "report"
    # Dropout on: PAvPU needs MC-dropout samples that differ (a run without dropout gets no PAvPU).
    overrides = tiny_run_overrides(easy_vqa_cache, **{"train.epochs": 1, "model.num_heads": 2, "model.dropout": 0.1})
    monkeypatch.setattr(experiment, "MC_SAMPLES", 2)  # the paper's 20 passes are not needed to test plumbing
    monkeypatch.setattr(experiment, "MMD_QUESTIONS", 64)
    monkeypatch.setattr(experiment, "NOISE_STDS", (1.0,))  # one σ: each is a full pass over val
    argv = ["experiment", "--config", PRESET, "--methods", "none,ct", "--seeds", "0", "--out", str(out)]
    for o in overrides:
        argv += ["--set", o]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "[1/2] none_seed0: training" in printed and "[2/2] ct_seed0: evaluating" in printed

    report = (out / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| `")]
    assert [r.split("|")[1].strip() for r in rows] == ["`none`", "`ct`"]
    assert "vqa-align experiment --config configs/easy_vqa.yaml --methods none,ct --seeds 0" in report
    assert "## Findings" in report and "**accuracy**" in report
    results = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["seed"]) for r in results["runs"]] == [("none", 0), ("ct", 0)]
    for run in results["runs"]:
        m = run["metrics"]
        assert 0 <= m["accuracy"] <= 100 and 0 <= m["ece"] <= 100 and 0 <= m["pavpu"] <= 100
        assert {"noisy_accuracy_1", "noise_drop_1", "seconds_per_step", "parameters"} <= set(m)
        assert set(run["result"]["mmd2"]) == {"sa_question", "sa_image", "sga_guided"}
        assert run["result"]["mmd_questions"] == 64 and run["result"]["mc_samples"] == 2
    helpers = results["runs"][1]["metrics"]["parameters"] - results["runs"][1]["metrics"]["inference_parameters"]
    assert helpers > 0 and results["runs"][0]["metrics"]["parameters"] == results["runs"][0]["metrics"]["inference_parameters"]
    assert results["aggregates"]["ct"]["accuracy"]["n"] == 1
    assert results["config"]["train"]["epochs"] == 1 and "vqa-align train" in results["commands"]["ct_seed0"]["train"][0]
    for name in ("fig1_alignment.png", "mmd_per_layer.png", "curves.png", "reliability_none.png", "reliability_ct.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name

    # The report is drawn from results.json alone: no checkpoint is opened, and it comes out the same.
    drawn = {name: (out / name).read_bytes() for name in ("report.md", "fig1_alignment.png", "curves.png",
                                                          "mmd_per_layer.png")}
    for name in drawn:
        (out / name).unlink()

    def no_checkpoints(*args, **kwargs):
        raise AssertionError("the report loaded a checkpoint")

    real_example = experiment.alignment_example
    monkeypatch.setattr(experiment, "alignment_example", no_checkpoints)
    vqa_report.write_report(out)
    assert {name: (out / name).read_bytes() for name in drawn} == drawn
    monkeypatch.setattr(experiment, "alignment_example", real_example)

    # Rerun: nothing is trained again. Run "none" lost its done.json after training finished (only
    # evaluated again); run "ct" looks interrupted mid-training (resumed, not restarted).
    metrics_before = {p: p.read_bytes() for p in out.glob("runs/*/metrics.jsonl")}
    calls = []
    real_train = training.train_from_config

    def spy(config, run_dir, resume=False, overwrite=False):
        calls.append((run_dir.name, resume, overwrite))
        return real_train(config, run_dir, resume=resume, overwrite=overwrite)

    monkeypatch.setattr(training, "train_from_config", spy)
    (out / "runs/none_seed0/done.json").unlink()
    meta = out / "runs/ct_seed0/checkpoints/last/meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "epoch": 0}))
    (out / "runs/ct_seed0/done.json").unlink()
    again = experiment.run_experiment_grid(PRESET, ["none", "ct"], [0], overrides, out, (1.0,), 2, progress=False)
    assert calls == [("ct_seed0", True, False)]
    assert again["runs"][0]["metrics"]["accuracy"] == results["runs"][0]["metrics"]["accuracy"]

    calls.clear()
    experiment.run_experiment_grid(PRESET, ["none", "ct"], [0], overrides, out, (1.0,), 2, progress=False)
    assert calls == []  # both runs finished: read from done.json
    assert {p: p.read_bytes() for p in out.glob("runs/*/metrics.jsonl")} == metrics_before

    with pytest.raises(UserError, match="different config"):
        experiment.run_experiment_grid(PRESET, ["none"], [0], [*overrides, "train.lr=0.5"], out, progress=False)


@pytest.mark.parametrize("name", ["easy_vqa", "easy_vqa_minilm"])
def test_published_reports_regenerate_from_their_results_json(tmp_path, name):
    """docs/results/<name>/report.md is a pure function of the results.json next to it."""
    from pathlib import Path

    published = Path(__file__).resolve().parents[1] / "docs" / "results" / name
    (tmp_path / "results.json").write_text((published / "results.json").read_text())
    vqa_report.write_report(tmp_path)
    assert (tmp_path / "report.md").read_text() == (published / "report.md").read_text()


def test_confirmatory_seeds_option_declares_seed_roles(monkeypatch, tmp_path):
    """--confirmatory-seeds splits --seeds into two roles that reach results.json; bad sets are refused."""
    import vqa_align.experiments.vqa as vqa_experiment
    from vqa_align import cli
    from vqa_align.errors import UserError

    seen = {}
    monkeypatch.setattr(vqa_experiment, "run_experiment_grid",
                        lambda *a, **kw: seen.update(roles=kw["seed_roles"], command=kw["command"]))
    base = ["experiment", "--config", "configs/easy_vqa.yaml", "--seeds", "0,1,2,3", "--out", str(tmp_path / "r")]
    assert cli.main(base + ["--confirmatory-seeds", "2,3"]) == 0
    assert seen["roles"] == {"exploratory": [0, 1], "confirmatory": [2, 3]}
    assert "--confirmatory-seeds 2,3" in seen["command"]
    assert cli.main(base) == 0 and seen["roles"] is None
    with pytest.raises(UserError, match=r"--confirmatory-seeds.*\[7\].*not among the seeds"):
        vqa_experiment.run_experiment(cli.build_parser().parse_args(base + ["--confirmatory-seeds", "7"]))
