"""Every config field rejects out-of-range values when the config is parsed, naming key and value.

The table below has, for every leaf field of every config dataclass, at least one bad value (or a
reason why any value of the right type is fine); test_every_field_is_covered fails when a field is
added without one.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing

import pytest

from vqa_align.config import (
    AlignmentConfig,
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    TrainConfig,
    load_config,
)
from vqa_align.errors import UserError

# key -> bad values (as typed after --set KEY=), each must be refused with a message naming the key.
BAD = {
    "name": ["a/b", "..", "''", "'run name'", "3"],
    "model.hidden_size": ["0", "-8", "1.5", "abc"],
    "model.num_heads": ["0", "-1", "3"],  # 3 does not divide 512
    "model.ffn_size": ["0"],
    "model.num_layers": ["0", "-2"],
    "model.flat_mlp_size": ["0"],
    "model.flat_size": ["0"],
    "model.flat_glimpses": ["0"],
    "model.fusion": ["product", "1"],
    "model.classifier_hidden": ["-1"],
    "model.dropout": ["-0.1", "1", "1.5", ".nan", ".inf"],
    "model.feature_dim": ["0"],
    "model.use_box_embedding": ["2", "maybe"],
    "model.question_encoder": ["gru"],
    "model.pack_questions": ["sometimes", "true"],
    "model.word_embed_dim": ["0"],
    "model.glove_path": ["''", "3"],
    "model.minilm_freeze_epochs": ["-1"],
    "model.vocab_size": ["-5"],
    "model.num_answers": ["-1"],
    "model.layer_norm": ["layer", "null"],
    "model.alignment.method": ["wasserstein", "null"],
    "model.alignment.weight": ["-0.01", ".nan", ".inf"],
    "model.alignment.modules": ["[ct]", "[sa_image, sa_image]", "sa_image"],
    "model.alignment.helper_hidden": ["0"],
    "model.alignment.helper_out": ["0", "-3"],
    "model.alignment.helper_precision": ["fp16"],
    "model.alignment.kernels": ["cuda", "Triton", "null"],
    "model.alignment.ct_rho": ["-0.5", "1.01", ".nan"],
    "model.alignment.gan_leaky_slope": ["-0.2", "1", ".nan"],
    "model.alignment.ot_epsilon": ["0", "-1", ".inf"],
    "model.alignment.ot_iterations": ["0"],
    "model.alignment.ot_tolerance": ["-1e-3", ".nan"],
    "model.alignment.ot_cost": ["l1"],
    "data.dataset": ["coco"],
    "data.cache_dir": ["''", "[a]"],
    "data.features": ["' '", "1"],
    "data.val_features": ["''", "[a.h5]"],
    "data.easy_vqa_backbone": ["resnet", "''"],
    "data.train_questions": ["q.json", "[1]"],
    "data.train_annotations": ["[a.json, b.json]"],  # two annotation files for no question file
    "data.val_questions": ["{a: 1}"],
    "data.val_annotations": ["[a.json]"],
    "data.test_questions": ["[null]"],
    "data.answer_min_count": ["0", "-1"],
    "data.max_question_tokens": ["0"],
    "data.max_regions": ["0"],
    "data.subset": ["0", "-10"],
    "data.eval_subset": ["0"],
    "data.easy_vqa_limit": ["0"],
    "data.num_workers": ["-1"],
    "data.bucket_by_regions": ["yes please"],
    "data.pin_memory": ["1"],
    "data.resident": ["0"],
    "data.skip_missing": ["'true'"],
    "train.epochs": ["0", "-1", "2.5"],
    "train.batch_size": ["0"],
    "train.lr": ["0", "-1e-4", ".nan", ".inf", "nan"],
    "train.betas": ["[0.9]", "[0.9, 1.0]", "[-0.1, 0.9]", "[0.9, .nan]"],
    "train.eps": ["0", "-1e-9"],
    "train.weight_decay": ["-0.1", ".nan"],
    "train.warmup_epochs": ["-1"],
    "train.decay_epochs": ["[-1]", "10"],
    "train.decay_factor": ["0", "-0.2", "1.5"],
    "train.grad_accumulation": ["0"],
    "train.grad_clip": ["0", "-1", ".inf"],
    "train.loss_reduction": ["max"],
    "train.seed": ["-1", "4294967296"],
    "train.precision": ["fp16"],
    "train.device": ["foo", "gpu", "cuda:x", "''"],
    "train.eval_every_epochs": ["0", "-1"],
    "train.log_every_steps": ["0", "-5"],
    "train.checkpoint_every_steps": ["-1"],
    "train.max_steps": ["-1"],
    "train.init_from": ["''", "3"],
    "train.cuda_graphs": ["2"],
    "train.keep_freed_memory": ["'no'"],
    "train.adapt_threads": ["2", "'auto'"],
    "train.optimizer": ["sgd", "Adam", "null"],
    "train.warmup_steps": ["-1", "2.5"],
    "train.eval_every_steps": ["-1", "true"],
    "train.patience": ["-1", "1.5"],
}

# Values at the edge of each range that must still be accepted.
GOOD = [
    "model.dropout=0", "model.classifier_hidden=0", "model.alignment.weight=0", "model.alignment.ct_rho=1",
    "model.alignment.ct_rho=0", "model.alignment.gan_leaky_slope=0", "model.alignment.modules=[]",
    "data.num_workers=0", "data.subset=1", "data.subset=null", "train.max_steps=0", "train.warmup_epochs=0",
    "train.decay_epochs=[]", "train.decay_factor=1", "train.grad_clip=null", "train.seed=4294967295",
    "train.device=cpu", "train.device=auto", "train.betas=[0, 0.999]", "name=run-1.a_b",
    "data.train_questions=[q.json]",  # no annotations: a split without answers
]


def _leaf_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += _leaf_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def test_every_field_is_covered():
    assert sorted(_leaf_keys(Config)) == sorted(BAD)


@pytest.mark.parametrize("key,value", [(k, v) for k, values in BAD.items() for v in values])
def test_bad_value_is_refused_naming_key_and_value(key, value):
    with pytest.raises(ConfigError) as info:
        load_config("configs/easy_vqa.yaml", [f"{key}={value}"])
    message = str(info.value)
    assert "\n" not in message
    assert key.rsplit(".", 1)[-1] in message, message
    if key != "model.num_heads":  # the divisibility message names both fields instead
        assert key in message, message


@pytest.mark.parametrize("override", GOOD)
def test_edge_values_are_accepted(override):
    load_config("configs/easy_vqa.yaml", [override])


def test_presets_load():
    for name in ("easy_vqa", "mcan_small", "mcan_large"):
        load_config(f"configs/{name}.yaml")


def test_configs_built_in_code_are_checked_too():
    for section, bad in ((TrainConfig, dict(lr=math.nan)), (TrainConfig, dict(device="gpu")),
                         (TrainConfig, dict(loss_reduction="max")), (ModelConfig, dict(dropout=math.inf)),
                         (DataConfig, dict(num_workers="2")), (AlignmentConfig, dict(method="wasserstein"))):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            section(**bad).validate()
    Config().validate()


def test_config_errors_are_user_errors():
    # `except UserError` (the public API's error to catch) covers bad configs too; ValueError as before.
    with pytest.raises(UserError, match="train.lr"):
        load_config(None, ["train.lr=-1"])
    assert issubclass(ConfigError, ValueError)


def test_device_that_this_machine_lacks(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"train.device 'cuda': this machine has no CUDA GPU"):
        load_config(None, ["train.device=cuda"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    load_config(None, ["train.device=cuda:0"])
    with pytest.raises(ConfigError, match=r"'cuda:1': this machine has 1 CUDA device"):
        load_config(None, ["train.device=cuda:1"])


def test_config_file_that_is_not_yaml_text(tmp_path):
    binary = tmp_path / "model.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match=r"model.bin: not UTF-8 text"):
        load_config(binary)
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: not valid YAML") as info:
        load_config(broken)
    assert "\n" not in str(info.value)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(listing)
    mixed = tmp_path / "mixed.yaml"
    mixed.write_text("1: a\nfoo: b\n")  # keys of two types: still one message
    with pytest.raises(ConfigError, match="unknown config key.*1, foo"):
        load_config(mixed)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path)  # a folder


@pytest.mark.parametrize("text, value", [("1e-4", 1e-4), ("5E-3", 5e-3), (".5e-3", 5e-4), ("+2.5e-4", 2.5e-4)])
def test_yaml_11_float_strings_read_alike_from_a_file_and_from_set(tmp_path, text, value):
    # PyYAML leaves "1e-4" a string (YAML 1.1 wants "1.0e-4"): one rule turns it into the number,
    # whether it comes from a config file or from --set.
    path = tmp_path / "lr.yaml"
    path.write_text(f"train:\n  lr: {text}\n  betas: [{text}, 0.98]\n")
    from_file = load_config(path).train
    from_set = load_config(None, [f"train.lr={text}", f"train.betas=[{text}, 0.98]"]).train
    assert from_file.lr == from_set.lr == value and from_file.betas == from_set.betas == [value, 0.98]
    assert load_config(None, ["name=v1.e"]).name == "v1.e"  # not a number: stays a string


@pytest.mark.parametrize("override,message", [
    ("=3", "dotted key"), ("train..lr=1", "dotted key"), ("train.lr", "expected KEY=VALUE"),
    ("train.lr=[1", "not valid YAML"), ("train=5", "train: expected a mapping"),
    ("model.alignment=none", "model.alignment: expected a mapping"), ("a.b=1", "unknown config key(s) a"),
])
def test_malformed_overrides(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        load_config(None, [override])
    assert "\n" not in str(info.value)
