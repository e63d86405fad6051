"""Typed configuration: dataclasses loaded from YAML, with strict keys and types.

Every run is described by one :class:`Config` (model, alignment, data, training). YAML files in
``configs/`` hold presets; ``--set section.key=value`` overrides single fields. Unknown keys and
wrong types are errors that name the offending key, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from vqa_align.align.distances import DISTANCES
from vqa_align.errors import UserError
from vqa_align.untrusted_files import (
    MAX_BATCH_SIZE, MAX_CONFIG_BYTES, MAX_INT, MAX_ITERATIONS, MAX_LAYERS, MAX_VOCAB, MAX_WIDTH, MAX_WORKERS, parse_yaml,
    read_yaml,
)

ALIGNMENT_METHODS = tuple(DISTANCES)  # the distance registry (vqa_align/align/distances/__init__.py)
ALIGNMENT_MODULES = ("sa_question", "sa_image", "sga_guided")


class ConfigError(UserError, ValueError):
    """A configuration value or key is invalid; the message names it. A UserError (one line, no
    traceback) like every error of the input, and a ValueError as before."""


MAX_SEED = 2**32 - 1  # numpy's seeds are 32-bit
DEVICE_PATTERN = re.compile(r"(cpu|cuda|mps)(:\d+)?")
NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]+")


def _require(ok: bool, key: str, value: Any, rule: str) -> None:
    """Raise ConfigError ``key: must be <rule>, got <value>`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key} must be {rule}, got {value!r}")


def _at_least(section: Any, where: str, low: int, *keys: str) -> None:
    """Each of ``keys`` (None allowed: unset) is >= ``low``."""
    for key in keys:
        value = getattr(section, key)
        _require(value is None or value >= low, f"{where}.{key}", value, f">= {low}")


def _at_most(section: Any, where: str, high: int, *keys: str) -> None:
    """Each of ``keys`` (None allowed: unset) is <= ``high``."""
    for key in keys:
        value = getattr(section, key)
        _require(value is None or value <= high, f"{where}.{key}", value, f"<= {high}")


def _check_fields(section: Any, where: str) -> None:
    """Types, choices and finiteness of every field, also for configs built in code (not from YAML)."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        if not dataclasses.is_dataclass(hints[f.name]):
            _check_value(getattr(section, f.name), hints[f.name], f"{where}.{f.name}" if where else f.name)


@dataclass
class AlignmentConfig:
    """Alignment attention (Zhang et al. 2021): which distance, how strong, where."""

    method: str = "ct"  # one of ALIGNMENT_METHODS
    weight: float = 0.01  # λ in L = L_task + λ·L_align (the paper uses 0.01 throughout)
    modules: list[str] = field(default_factory=lambda: list(ALIGNMENT_MODULES))
    # Helper widths: 64/32 (was 256/128) cuts the CT helpers' cost ~6x for head_dim 64 (see
    # BENCHMARKS.md); the helpers are per-head maps of a 64-d vector, so 256 hidden units buy nothing.
    helper_hidden: int = 64  # hidden width of navigator / critic / discriminator MLPs
    helper_out: int = 32  # r: output width of the CT navigator and critic
    # dtype of the fused CT/GAN helpers (matmuls and their elementwise work): "fp32"; "bf16";
    # "auto" = bf16 where bf16 matmuls are native (CUDA, CPUs with AMX / avx512_bf16) unless the
    # model runs in fp64, else fp32. bf16 helpers changed neither accuracy nor key-query MMD on
    # easy-VQA (docs/results/helper_precision.md) and make CT/GAN ~1.5x cheaper on the CPU.
    helper_precision: Literal["auto", "fp32", "bf16"] = "auto"
    # Which implementation runs CT and GAN (same values and gradients, tested against each other;
    # the dispatch table is vqa_align/align/distances/__init__.py): "auto" = the Triton kernels
    # (vqa_align/align/kernels/triton_*.py) on CUDA when Triton imports, else "fused"; "triton" =
    # Triton on CUDA or an error if it is missing (elsewhere "fused"); "fused" = the hand-fused
    # autograd functions (PyTorch ops, any device); "reference" = the plain helper modules under
    # autograd (slowest; has second-order gradients).
    # Default "fused": the Triton kernels are opt-in until they have been checked and timed on a
    # real GPU (benchmarks/gpu_issue19.sh; so far only Triton's CPU interpreter and sm_90 compiles).
    kernels: Literal["auto", "triton", "fused", "reference"] = "fused"
    ct_rho: float = 0.5  # weight of the forward (query -> key) transport direction
    gan_leaky_slope: float = 0.2
    ot_epsilon: float = 0.01  # entropic regularisation on a cost scaled to [0, 2]
    # Sinkhorn runs until the L1 error of the row marginals (total mass 1) is <= ot_tolerance in
    # every (sample, head), at most ot_iterations iterations (alignment.sinkhorn_plan).
    ot_iterations: int = 2000
    ot_tolerance: float = 1e-3
    # "cosine": C = 1 - cos in [0, 2]; "sqeuclidean": C = |q/|q| - k/|k||² = 2 (1 - cos) in [0, 4]
    # (the same plan, ε applies to the cost scaled to [0, 2]; twice the distance).
    ot_cost: Literal["cosine", "sqeuclidean"] = "cosine"

    def validate(self, where: str = "model.alignment") -> None:
        _check_fields(self, where)
        _require(self.method in ALIGNMENT_METHODS, f"{where}.method", self.method, f"one of {list(ALIGNMENT_METHODS)}")
        for i, name in enumerate(self.modules):
            _require(name in ALIGNMENT_MODULES, f"{where}.modules[{i}]", name, f"one of {list(ALIGNMENT_MODULES)}")
        _require(len(set(self.modules)) == len(self.modules), f"{where}.modules", self.modules, "no repeats")
        _at_least(self, where, 0, "weight", "gan_leaky_slope", "ot_tolerance")
        _require(self.gan_leaky_slope < 1, f"{where}.gan_leaky_slope", self.gan_leaky_slope, "< 1")
        _at_least(self, where, 1, "helper_hidden", "helper_out", "ot_iterations")
        _at_most(self, where, MAX_WIDTH, "helper_hidden", "helper_out")
        _at_most(self, where, MAX_ITERATIONS, "ot_iterations")
        _require(0.0 <= self.ct_rho <= 1.0, f"{where}.ct_rho", self.ct_rho, "in [0, 1]")
        _require(self.ot_epsilon > 0, f"{where}.ot_epsilon", self.ot_epsilon, "> 0")


@dataclass
class ModelConfig:
    """MCAN encoder-decoder (Yu et al. 2019). Defaults are MCAN-small."""

    hidden_size: int = 512
    num_heads: int = 8
    ffn_size: int = 2048
    num_layers: int = 6
    flat_mlp_size: int = 512
    flat_size: int = 1024  # width of the fused vector after AttFlat
    flat_glimpses: int = 1
    fusion: Literal["sum", "sum_product"] = "sum"  # sum: MCAN; sum_product: q + v + q ⊙ v
    classifier_hidden: int = 0  # 0: MCAN's linear classifier; > 0: Linear-ReLU-Dropout-Linear head
    dropout: float = 0.1
    feature_dim: int = 2048  # D of the region features (2048 for bottom-up-attention)
    use_box_embedding: bool = True
    question_encoder: Literal["lstm", "minilm"] = "lstm"
    # Per-token ops on the question (the encoder's projections, FFN and LayerNorm, the decoder's
    # key/value projections) run on the real tokens only. "auto": on the CPU; on CUDA the padded
    # form is kept (packing has data-dependent shapes, which CUDA graphs cannot capture and which
    # sync the host).
    pack_questions: Literal["auto", "always", "never"] = "auto"
    word_embed_dim: int = 300
    # "torch": nn.LayerNorm. "mcan": the LayerNorm of the mcan-vqa / OpenVQA code,
    # w·(x − mean)/(std + 1e-6) + b with the unbiased std, for models imported from them
    # (vqa_align/importers), whose outputs drift under the other formula.
    layer_norm: Literal["torch", "mcan"] = "torch"
    glove_path: str | None = None  # optional GloVe-format text file for embedding initialisation
    minilm_freeze_epochs: int = 0
    vocab_size: int = 0  # filled from the tokenizer when the model is built for a data set
    num_answers: int = 0  # filled from the answer vocabulary
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)

    def validate(self, where: str = "model") -> None:
        _check_fields(self, where)
        _at_least(self, where, 1, "hidden_size", "num_heads", "ffn_size", "num_layers", "flat_mlp_size", "flat_size",
                  "flat_glimpses", "feature_dim", "word_embed_dim")
        _at_least(self, where, 0, "classifier_hidden", "minilm_freeze_epochs", "vocab_size", "num_answers")
        _at_most(self, where, MAX_WIDTH, "hidden_size", "num_heads", "ffn_size", "flat_mlp_size", "flat_size",
                 "feature_dim", "word_embed_dim", "classifier_hidden")
        _at_most(self, where, MAX_LAYERS, "num_layers", "flat_glimpses")
        _at_most(self, where, MAX_VOCAB, "vocab_size", "num_answers")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"{where}.hidden_size ({self.hidden_size}) must be divisible by {where}.num_heads ({self.num_heads})"
            )
        _require(0.0 <= self.dropout < 1.0, f"{where}.dropout", self.dropout, "in [0, 1)")
        _require(self.glove_path is None or self.glove_path.strip() != "", f"{where}.glove_path", self.glove_path,
                 "a file path or null")
        self.alignment.validate(f"{where}.alignment")


@dataclass
class DataConfig:
    """Where questions, answers and region features come from, and how batches are formed."""

    dataset: Literal["easy_vqa", "vqa_v2"] = "easy_vqa"
    cache_dir: str | None = None  # prepared data; default: $VQA_ALIGN_CACHE or ~/.cache/vqa_align
    features: str | None = None  # HDF5 region-feature store (see README, "Feature store")
    # store of the val/test splits when it is another file; it must come from the same extractor
    val_features: str | None = None
    # easy-VQA: features of its pictures from this `vqa-align extract` backbone (e.g.
    # "efficientnet-lite0"), extracted once into the cache; None: the built-in regions
    easy_vqa_backbone: str | None = None
    train_questions: list[str] = field(default_factory=list)
    train_annotations: list[str] = field(default_factory=list)
    val_questions: list[str] = field(default_factory=list)
    val_annotations: list[str] = field(default_factory=list)
    test_questions: list[str] = field(default_factory=list)
    answer_min_count: int = 9  # keep answers seen more than 8 times (3,129 on VQA v2 train+val)
    max_question_tokens: int = 14
    max_regions: int = 100
    subset: int | None = None  # use only the first N training questions (smoke tests, ablations)
    eval_subset: int | None = None  # use only the first N questions of val/test (quick experiments)
    easy_vqa_limit: int | None = None  # prepare only easy-VQA images with id < N per split (tests)
    num_workers: int = 2
    bucket_by_regions: bool = True  # batch images of similar region counts to cut padding
    pin_memory: bool = True
    # Hold each split's features, boxes and questions in the training device's memory and form
    # batches there (vqa_align/data/resident.py): no loader workers, no per-step feature copies.
    resident: bool = False
    skip_missing: bool = False  # drop questions whose image lacks features, with a counted warning

    def validate(self, where: str = "data") -> None:
        _check_fields(self, where)
        _at_least(self, where, 1, "answer_min_count", "max_question_tokens", "max_regions", "subset", "eval_subset",
                  "easy_vqa_limit")
        _at_least(self, where, 0, "num_workers")
        _at_most(self, where, MAX_WIDTH, "max_question_tokens", "max_regions")
        _at_most(self, where, MAX_WORKERS, "num_workers")
        for key in ("cache_dir", "features", "val_features"):
            value = getattr(self, key)
            _require(value is None or value.strip() != "", f"{where}.{key}", value, "a path or null")
        if self.easy_vqa_backbone is not None:
            from vqa_align.extract.backbones import BACKBONES  # the registry: names only, no backbone is imported

            _require(self.easy_vqa_backbone in BACKBONES, f"{where}.easy_vqa_backbone", self.easy_vqa_backbone,
                     f"one of {sorted(BACKBONES)} or null")
        for split in ("train", "val"):
            questions, annotations = getattr(self, f"{split}_questions"), getattr(self, f"{split}_annotations")
            if annotations and len(annotations) != len(questions):
                raise ConfigError(
                    f"{where}.{split}_annotations has {len(annotations)} file(s) but {where}.{split}_questions has "
                    f"{len(questions)}: give one annotations file per questions file"
                )


@dataclass
class TrainConfig:
    """MCAN's recipe: Adam(0.9, 0.98, 1e-9), warm-up 1/4..3/4, decay x0.2 after epochs 10 and 12."""

    epochs: int = 13
    batch_size: int = 64
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-9
    weight_decay: float = 0.0
    warmup_epochs: int = 3
    decay_epochs: list[int] = field(default_factory=lambda: [10, 12])
    decay_factor: float = 0.2
    grad_accumulation: int = 1
    grad_clip: float | None = None
    loss_reduction: Literal["sum", "mean"] = "sum"
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    device: str = "auto"
    eval_every_epochs: int = 1
    log_every_steps: int = 50
    checkpoint_every_steps: int = 0  # 0: checkpoint at the end of every epoch only
    max_steps: int | None = None  # stop early (tests, benchmarks)
    # Start from the weights of this run or checkpoint folder (e.g. an imported mcan-vqa model):
    # its architecture, tokenizer and answers are kept; alignment helpers it lacks start fresh.
    init_from: str | None = None
    # Capture each training step as a CUDA graph per batch shape (vqa_align/train/cuda_graphs.py): one
    # CUDA device, no DDP, grad_accumulation 1.
    cuda_graphs: bool = False
    # CPU: let glibc keep freed memory for the next step instead of returning it to the kernel and
    # page-faulting it back (vqa_align/train/host_memory.py; measured -5 % on an MCAN-small CT step).
    keep_freed_memory: bool = True
    # CPU: shrink torch's thread team to the cores other processes leave free, sampled after every
    # step (vqa_align/cpu_threads.py). Beside one busy process a full team ran at 31 % of its quiet
    # speed (BENCHMARKS.md, contention). A team-size change may alter the last bits of float sums,
    # so set false (and fix OMP_NUM_THREADS) for bit-identical reruns on a shared machine.
    adapt_threads: bool = True
    # "adam": fused Adam, weight decay added to the gradient (MCAN). "adamw": torch.optim.AdamW with
    # decoupled weight decay (BERT-style fine-tuning, the sentence runs), in torch's default
    # (non-fused) implementation: the sentence results so far came from it, and the fused kernel
    # rounds differently.
    optimizer: Literal["adam", "adamw"] = "adam"
    # Linear warm-up over optimizer steps: step k (1-based) runs at lr x min(1, k / (warmup_steps + 1)),
    # on top of the epoch schedule (0: off).
    warmup_steps: int = 0
    # Evaluate every N optimizer steps and after the last one instead of at epoch ends (0: at epoch
    # ends, every eval_every_epochs epochs).
    eval_every_steps: int = 0
    # Stop after this many evaluations in a row without a gain of the task's selection metric (the
    # one that picks checkpoints/best; 0: never stop early).
    patience: int = 0

    def validate(self, where: str = "train") -> None:
        _check_fields(self, where)
        _at_least(self, where, 1, "epochs", "batch_size", "grad_accumulation", "eval_every_epochs", "log_every_steps")
        _at_most(self, where, MAX_BATCH_SIZE, "batch_size", "grad_accumulation")
        # max_steps 0: set the run up (model, vocabularies, checkpoint) without a training step.
        _at_least(self, where, 0, "warmup_epochs", "checkpoint_every_steps", "weight_decay", "max_steps",
                  "warmup_steps", "eval_every_steps", "patience")
        _require(self.init_from is None or self.init_from.strip() != "", f"{where}.init_from", self.init_from,
                 "a run or checkpoint folder, or null")
        for key in ("lr", "eps", "grad_clip"):
            value = getattr(self, key)
            _require(value is None or value > 0, f"{where}.{key}", value, "> 0")
        _require(len(self.betas) == 2, f"{where}.betas", self.betas, "two values [beta1, beta2]")
        for i, beta in enumerate(self.betas):
            _require(0.0 <= beta < 1.0, f"{where}.betas[{i}]", beta, "in [0, 1)")
        for i, epoch in enumerate(self.decay_epochs):
            _require(epoch >= 0, f"{where}.decay_epochs[{i}]", epoch, ">= 0 (a 0-based epoch index)")
        _require(0.0 < self.decay_factor <= 1.0, f"{where}.decay_factor", self.decay_factor, "in (0, 1]")
        _require(0 <= self.seed <= MAX_SEED, f"{where}.seed", self.seed, f"in [0, {MAX_SEED}]")
        _require(self.device == "auto" or DEVICE_PATTERN.fullmatch(self.device) is not None, f"{where}.device",
                 self.device, "auto, cpu, cuda, cuda:N or mps")
        if self.cuda_graphs and self.grad_accumulation != 1:
            raise ConfigError(f"{where}.cuda_graphs needs {where}.grad_accumulation: 1 (a graph holds one whole step)")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    name: str = "run"

    def validate(self) -> "Config":
        _check_fields(self, "")
        # The name is the default run folder (runs/<name>) and part of experiment folders' names.
        _require(NAME_PATTERN.fullmatch(self.name) is not None and self.name not in (".", ".."), "name", self.name,
                 "letters, digits, '.', '_' or '-' (it names the run folder)")
        self.model.validate()
        self.data.validate()
        self.train.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Loading: dicts -> dataclasses with strict keys and type checks
# --------------------------------------------------------------------------------------------


def _check_value(value: Any, annotation: Any, where: str) -> Any:
    """Return ``value`` converted to ``annotation`` or raise ConfigError naming ``where``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        inner = args[0] if args else Any
        return [_check_value(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return from_dict(annotation, value, where)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r:.60}")
        if abs(value) > MAX_INT:
            raise ConfigError(f"{where}: a {value.bit_length()}-bit integer is too large (|x| <= {MAX_INT})")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r:.60}")
        try:
            number = float(value)  # an int too large for a float raises OverflowError
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{where}: expected a finite number, got {value if isinstance(value, float) else 'a huge integer'}")
        return number
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names, key=str)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + str(k) for k in unknown)}; "
            f"valid keys{' of ' + where if where else ''}: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        kwargs[key] = _check_value(value, hints[key], path)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value`` (value in YAML syntax) into (path, value)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. train.lr=1e-4")
    key, raw = text.split("=", 1)
    if not all(part.strip() for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. train.lr=1e-4")
    value = parse_yaml(raw, f"--set {text!r:.80}: value", error=ConfigError) if raw.strip() else None
    return [part.strip() for part in key.split(".")], _fix_yaml_floats(value)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return data


def _fix_yaml_floats(data: Any) -> Any:
    """PyYAML (YAML 1.1) reads ``1e-4`` and ``.5e3`` as strings (it wants ``1.0e-4``, ``.5e+3``); turn
    strings that Python reads as a number with a point or an exponent back into floats, in nested
    dicts and lists too. Files and ``--set`` values go through this one rule."""
    if isinstance(data, dict):
        return {k: _fix_yaml_floats(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_fix_yaml_floats(v) for v in data]
    if isinstance(data, str) and any(c in data.lower() for c in "e."):
        try:
            return float(data)
        except ValueError:
            return data
    return data


def config_from_dict(data: dict[str, Any]) -> Config:
    return from_dict(Config, _fix_yaml_floats(data)).validate()


PRESETS_PACKAGE = "vqa_align_configs"  # configs/*.yaml, shipped as package data (pyproject.toml)


def preset_path(name: str) -> Path:
    """A preset shipped with vqa-align, by name (``easy_vqa``, ``easy_vqa.yaml`` or
    ``configs/easy_vqa.yaml``): found in the installed package, so it works from any folder."""
    from importlib import resources

    stem = Path(name).name
    stem = stem if stem.endswith(".yaml") else stem + ".yaml"
    folder = resources.files(PRESETS_PACKAGE)
    path = Path(str(folder.joinpath(stem)))
    if not path.is_file():
        shipped = sorted(p.name for p in Path(str(folder)).glob("*.yaml"))
        raise ConfigError(f"no preset {name!r}; shipped presets: {', '.join(shipped)}")
    return path


def _resolve_config_path(path: Path) -> Path:
    """A file that exists as given, else a shipped preset named like ``configs/NAME.yaml``."""
    if path.is_file() or path.is_absolute() or path.parent not in (Path("."), Path("configs")):
        return path
    try:
        return preset_path(path.name)
    except ConfigError:
        return path


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML file or shipped preset (or the defaults) and apply ``--set`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = _resolve_config_path(Path(path))
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        data = read_yaml(path, MAX_CONFIG_BYTES, expect=dict, error=ConfigError) or {}
    data = apply_overrides(data, overrides or [])
    try:
        config = config_from_dict(data)
    except ConfigError as err:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{err}") from None
    check_device_available(config.train.device)
    return config


def check_device_available(device: str) -> None:
    """Refuse a ``train.device`` this machine does not have (configs are checked when a run is set up,
    not when a checkpoint trained elsewhere is loaded for inference)."""
    match = DEVICE_PATTERN.fullmatch(device)
    if match is None:
        return  # "auto" (syntax was checked by TrainConfig.validate)
    import torch

    kind, index = match.group(1), int(match.group(2)[1:]) if match.group(2) else 0
    if kind == "cuda" and (not torch.cuda.is_available() or index >= torch.cuda.device_count()):
        have = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else "no CUDA GPU"
        raise ConfigError(f"train.device {device!r}: this machine has {have}; use --set train.device=auto or cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"train.device {device!r}: MPS is not available here; use --set train.device=auto or cpu")


# Fields that name files or folders. A run stores them absolute, so that its folder works from
# any working directory (`vqa-align predict --checkpoint /abs/run ...` run elsewhere).
PATH_FIELDS = ("data.cache_dir", "data.features", "data.val_features", "data.train_questions",
               "data.train_annotations", "data.val_questions", "data.val_annotations", "data.test_questions",
               "model.glove_path")


def _absolute(value: Any, base: Path) -> Any:
    """A path string (or a list of them) made absolute against ``base``; anything else unchanged."""
    if isinstance(value, list):
        return [_absolute(v, base) for v in value]
    if isinstance(value, str):
        return str((base / Path(value).expanduser()).resolve(strict=False))
    return value


def _absolute_init_from(value: Any, base: Path) -> Any:
    """``train.init_from``: also a Hugging Face Hub repo id, so only an existing local folder changes."""
    if isinstance(value, str) and value and (base / Path(value).expanduser()).exists():
        return _absolute(value, base)
    return value


def make_paths_absolute(config: Config, base: str | Path | None = None) -> Config:
    """Turn the relative paths of :data:`PATH_FIELDS` (and a local ``train.init_from``) into
    absolute ones against ``base`` (default: the working directory), in place; returns ``config``."""
    root = Path(base) if base is not None else Path.cwd()
    for dotted in PATH_FIELDS:
        section_name, key = dotted.split(".")
        section = getattr(config, section_name)
        setattr(section, key, _absolute(getattr(section, key), root))
    config.train.init_from = _absolute_init_from(config.train.init_from, root)
    return config


def paths_made_absolute(data: dict[str, Any], base: str | Path | None = None) -> dict[str, Any]:
    """The same for a config as a plain dict (a copy), e.g. to compare a saved config with a new one;
    sections or keys it lacks are left alone (it may be another task's config)."""
    root = Path(base) if base is not None else Path.cwd()
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for dotted in PATH_FIELDS:
        section_name, key = dotted.split(".")
        if isinstance(out.get(section_name), dict) and key in out[section_name]:
            out[section_name][key] = _absolute(out[section_name][key], root)
    if isinstance(out.get("train"), dict) and "init_from" in out["train"]:
        out["train"]["init_from"] = _absolute_init_from(out["train"]["init_from"], root)
    return out


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
