"""Shared fixtures: tiny model configs and random batches that follow the batch contract."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from vqa_align.config import AlignmentConfig, ModelConfig

# Keep the suite on the two CI cores.
torch.set_num_threads(min(2, torch.get_num_threads()))

# The suite never reads or writes the user's home or caches, whatever the shell exports
# (VQA_ALIGN_CACHE included): these point into a session folder, set before any test module (or
# the libraries it imports, which read some of them once) is loaded. Data the tests need are
# prepared there (``easy_vqa_cache``), never taken from the user's cache.
ISOLATED_DIRS = ("HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "HF_HOME", "TORCH_HOME",
                 "MPLCONFIGDIR", "TRITON_CACHE_DIR", "VQA_ALIGN_CACHE")
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # nothing is downloaded at run time
_session_home: Path | None = None


def pytest_configure(config):
    global _session_home
    _session_home = Path(tempfile.mkdtemp(prefix="vqa-align-tests-"))
    for name in ISOLATED_DIRS:
        folder = _session_home / name.lower()
        folder.mkdir()
        os.environ[name] = str(folder)
    os.environ.update(OFFLINE)


def pytest_unconfigure(config):
    if _session_home is not None:
        shutil.rmtree(_session_home, ignore_errors=True)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test starts with its own empty vqa-align cache (the default runs and data folders)."""
    monkeypatch.setenv("VQA_ALIGN_CACHE", str(tmp_path_factory.mktemp("cache")))


def tiny_model_config(method: str = "ct", **overrides) -> ModelConfig:
    cfg = ModelConfig(
        hidden_size=32,
        num_heads=4,
        ffn_size=64,
        num_layers=2,
        flat_mlp_size=32,
        flat_size=48,
        dropout=0.0,
        feature_dim=12,
        word_embed_dim=16,
        vocab_size=30,
        num_answers=7,
        alignment=AlignmentConfig(method=method, helper_hidden=16, helper_out=8, ot_iterations=20),
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def random_masks(batch: int, nq: int, nk: int, gen: torch.Generator):
    """Valid-position masks (B, Nq), (B, Nk) with random lengths >= 1; sample 0 is unpadded."""
    q_len = torch.randint(1, nq + 1, (batch,), generator=gen)
    k_len = torch.randint(1, nk + 1, (batch,), generator=gen)
    q_len[0], k_len[0] = nq, nk
    return torch.arange(nq)[None] < q_len[:, None], torch.arange(nk)[None] < k_len[:, None]


def random_batch(batch: int = 4, max_tokens: int = 6, max_regions: int = 9, feature_dim: int = 12, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_tokens + 1, (batch,), generator=gen)
    lengths[0] = max_tokens
    counts = torch.randint(1, max_regions + 1, (batch,), generator=gen)
    counts[0] = max_regions
    tokens = torch.randint(2, 30, (batch, max_tokens), generator=gen)
    tokens[torch.arange(max_tokens)[None] >= lengths[:, None]] = 0
    features = torch.randn(batch, max_regions, feature_dim, generator=gen)
    xy = torch.rand(batch, max_regions, 2, generator=gen) * 0.5
    boxes = torch.cat([xy, xy + 0.1 + torch.rand(batch, max_regions, 2, generator=gen) * 0.4], -1)
    pad = torch.arange(max_regions)[None] >= counts[:, None]
    features[pad] = 0.0
    boxes[pad] = 0.0
    return dict(tokens=tokens, question_lengths=lengths, features=features, boxes=boxes, region_counts=counts)


EASY_VQA_TEST_LIMIT = 60  # images per split: enough for a few batches, prepared in seconds


@pytest.fixture(scope="session")
def easy_vqa_cache(tmp_path_factory):
    """A small easy-VQA preparation shared by the tests of the whole session."""
    from vqa_align.data.easy_vqa import prepare_easy_vqa

    cache = tmp_path_factory.mktemp("easy_vqa_cache")
    prepare_easy_vqa(cache, limit=EASY_VQA_TEST_LIMIT, progress=False)
    return cache


def tiny_run_overrides(cache, **extra) -> list[str]:
    """--set overrides turning configs/easy_vqa.yaml into a seconds-long run on the small cache."""
    values = {
        "data.cache_dir": str(cache),
        "data.easy_vqa_limit": EASY_VQA_TEST_LIMIT,
        "data.num_workers": 0,
        "data.subset": 96,
        "model.hidden_size": 32,
        "model.num_heads": 4,
        "model.ffn_size": 64,
        "model.num_layers": 1,
        "model.flat_mlp_size": 32,
        "model.flat_size": 32,
        "model.word_embed_dim": 16,
        "model.alignment.helper_hidden": 8,
        "model.alignment.helper_out": 8,
        "train.epochs": 2,
        "train.batch_size": 32,
        "train.warmup_epochs": 1,
        "train.decay_epochs": [1],
        "train.log_every_steps": 1,
        # A fixed thread team: runs compared bit for bit must not depend on what else the machine
        # runs (the governor itself: tests/test_cpu_threads.py).
        "train.adapt_threads": False,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]
