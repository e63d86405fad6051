"""data.resident: batches gathered from device-resident tensors equal the DataLoader's batches."""

from __future__ import annotations

import json

import numpy as np
import torch
from conftest import tiny_run_overrides

from vqa_align.config import load_config
from vqa_align.data.loaders import build_data, collate_batch
from vqa_align.data.resident import ResidentSplit
from vqa_align.train.trainer import train_from_config

PRESET = "configs/easy_vqa.yaml"


def test_resident_batches_equal_collated_batches(easy_vqa_cache):
    cfg = load_config(PRESET, tiny_run_overrides(easy_vqa_cache, **{"data.subset": 400, "data.max_regions": 5}))
    bundle = build_data(cfg.data, ["train", "val"])
    for dataset in bundle.datasets.values():
        resident = ResidentSplit(dataset, "cpu")
        rng = np.random.default_rng(0)
        for size in (1, 7, 32):
            indices = rng.choice(len(dataset), size=size, replace=False)
            want = collate_batch([dataset[int(i)] for i in indices])
            got = resident.batch(indices)
            assert got.keys() == want.keys()
            for key in want:
                assert got[key].dtype == want[key].dtype, key
                assert torch.equal(got[key], want[key]), key
        # Some images have more regions than max_regions: truncation must match the loader's.
        assert (dataset.store.region_counts[dataset.store_rows] > 5).any()


def test_resident_training_equals_loader_training(easy_vqa_cache, tmp_path):
    """Same sampler, same batches: the resident run's losses equal the DataLoader run's."""
    runs = {}
    for resident in (False, True):
        overrides = tiny_run_overrides(easy_vqa_cache, **{"train.epochs": 2, "data.resident": resident})
        run = tmp_path / f"resident_{resident}"
        train_from_config(load_config(PRESET, overrides), run)
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        steps = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
        epochs = [(r["train_loss"], r["val_accuracy"]) for r in records if r.get("kind") == "epoch"]
        runs[resident] = (steps, epochs)
    (steps_r, epochs_r), (steps_l, epochs_l) = runs[True], runs[False]
    assert len(epochs_r) == 2 and len(steps_r) > 2 and [s for s, _ in steps_r] == [s for s, _ in steps_l]
    np.testing.assert_allclose([v for _, v in steps_r], [v for _, v in steps_l], rtol=1e-5)
    np.testing.assert_allclose(np.array(epochs_r), np.array(epochs_l), rtol=1e-5)
