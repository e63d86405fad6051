"""Typed configuration: dataclasses loaded from YAML, with strict keys and types.

Every run is described by one :class:`Config` (model, alignment, data, training). YAML files in
``configs/`` hold presets; ``--set section.key=value`` overrides single fields. Unknown keys and
wrong types are errors that name the offending key, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

ALIGNMENT_METHODS = ("none", "ct", "gan", "ot")
HELPER_PRECISIONS = ("auto", "fp32", "bf16")
ALIGNMENT_MODULES = ("sa_question", "sa_image", "sga_guided")


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names it."""


@dataclass
class AlignmentConfig:
    """Alignment attention (Zhang et al. 2021): which distance, how strong, where."""

    method: Literal["none", "ct", "gan", "ot"] = "ct"
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
    ct_rho: float = 0.5  # weight of the forward (query -> key) transport direction
    gan_leaky_slope: float = 0.2
    ot_epsilon: float = 0.01  # entropic regularisation on a cost scaled to [0, 2]
    ot_iterations: int = 50
    ot_cost: Literal["sqeuclidean", "cosine"] = "sqeuclidean"

    def validate(self) -> None:
        if self.method not in ALIGNMENT_METHODS:
            raise ConfigError(f"model.alignment.method: {self.method!r} is not one of {ALIGNMENT_METHODS}")
        for name in self.modules:
            if name not in ALIGNMENT_MODULES:
                raise ConfigError(f"model.alignment.modules: {name!r} is not one of {ALIGNMENT_MODULES}")
        if self.helper_precision not in HELPER_PRECISIONS:
            raise ConfigError(
                f"model.alignment.helper_precision: {self.helper_precision!r} is not one of {HELPER_PRECISIONS}"
            )
        if self.weight < 0:
            raise ConfigError(f"model.alignment.weight must be >= 0, got {self.weight}")
        if self.gan_leaky_slope < 0:
            raise ConfigError(f"model.alignment.gan_leaky_slope must be >= 0, got {self.gan_leaky_slope}")
        if not 0.0 <= self.ct_rho <= 1.0:
            raise ConfigError(f"model.alignment.ct_rho must lie in [0, 1], got {self.ct_rho}")
        if self.ot_epsilon <= 0 or self.ot_iterations < 1:
            raise ConfigError("model.alignment.ot_epsilon must be > 0 and ot_iterations >= 1")


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

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_heads ({self.num_heads})"
            )
        for key in ("hidden_size", "num_heads", "ffn_size", "num_layers", "flat_size", "feature_dim"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.{key} must be >= 1, got {getattr(self, key)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must lie in [0, 1), got {self.dropout}")
        self.alignment.validate()


@dataclass
class DataConfig:
    """Where questions, answers and region features come from, and how batches are formed."""

    dataset: Literal["easy_vqa", "vqa_v2"] = "easy_vqa"
    cache_dir: str | None = None  # prepared data; default: $VQA_ALIGN_CACHE or ~/.cache/vqa_align
    features: str | None = None  # HDF5 region-feature store (see README, "Feature store")
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
    # batches there (vqa_align/resident.py): no loader workers, no per-step feature copies.
    resident: bool = False
    skip_missing: bool = False  # drop questions whose image lacks features, with a counted warning

    def validate(self) -> None:
        if self.max_question_tokens < 1 or self.max_regions < 1:
            raise ConfigError("data.max_question_tokens and data.max_regions must be >= 1")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")


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
    # Capture each training step as a CUDA graph per batch shape (vqa_align/cuda_graphs.py): one
    # CUDA device, no DDP, grad_accumulation 1.
    cuda_graphs: bool = False
    # CPU: let glibc keep freed memory for the next step instead of returning it to the kernel and
    # page-faulting it back (vqa_align/host_memory.py; measured -5 % on an MCAN-small CT step).
    keep_freed_memory: bool = True

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.grad_accumulation < 1:
            raise ConfigError("train.epochs, train.batch_size and train.grad_accumulation must be >= 1")
        if self.cuda_graphs and self.grad_accumulation != 1:
            raise ConfigError("train.cuda_graphs needs train.grad_accumulation: 1 (a graph holds one whole step)")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if len(self.betas) != 2:
            raise ConfigError(f"train.betas must have two values, got {self.betas}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    name: str = "run"

    def validate(self) -> "Config":
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
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
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
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {text!r}: value is not valid YAML ({err})") from None
    # YAML 1.1 reads "1e-4" as a string; accept it as the number the user meant.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in ".e") else value
        except ValueError:
            pass
    return key.strip().split("."), value


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
    """PyYAML (YAML 1.1) parses ``1e-4`` as a string; turn such strings back into floats."""
    if isinstance(data, dict):
        return {k: _fix_yaml_floats(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_fix_yaml_floats(v) for v in data]
    if isinstance(data, str):
        try:
            if any(c in data.lower() for c in "e.") and data.strip().lstrip("+-")[:1].isdigit():
                return float(data)
        except ValueError:
            return data
    return data


def config_from_dict(data: dict[str, Any]) -> Config:
    return from_dict(Config, _fix_yaml_floats(data)).validate()


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML preset (or the defaults) and apply ``--set`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    data = apply_overrides(data, overrides or [])
    try:
        return config_from_dict(data)
    except ConfigError as err:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{err}") from None


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
