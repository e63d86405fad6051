"""Starting a training run from another run's weights (``train.init_from`` / ``--init-from``).

The new run keeps the source's architecture, tokenizer and answer vocabulary (its token ids and
classifier rows mean nothing under other ones) and its weights; alignment helpers the source
lacks (or has in another shape) start freshly initialised. Everything else the
new config says (alignment method and weight, dropout, data, schedule) is its own. Aligners only
act on the loss: in eval mode the new model's logits equal the source's before the first step.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from vqa_align.runs.checkpoint import ANSWERS_FILE, WEIGHTS_FILE, CheckpointError, load_config_of, load_tokenizer, resolve_checkpoint
from vqa_align.config import Config
from vqa_align.runs.hub import locate_run
from vqa_align.untrusted_files import MAX_VOCAB_BYTES, read_json

# ModelConfig fields that decide the parameters' shapes and meaning: taken from the source run.
ARCHITECTURE_FIELDS = (
    "hidden_size", "num_heads", "ffn_size", "num_layers", "flat_mlp_size", "flat_size", "flat_glimpses",
    "fusion", "classifier_hidden", "feature_dim", "use_box_embedding", "question_encoder", "word_embed_dim",
    "layer_norm", "vocab_size", "num_answers",
)
ALIGNER_MARK = ".aligner."  # parameters of alignment helpers (HeadAligner) contain this in their name


@dataclass
class WarmStart:
    path: Path  # the resolved checkpoint folder
    source: Config
    tokenizer: Any
    answers: list[str]
    state: dict[str, torch.Tensor]


def load_warm_start(path: str | Path) -> WarmStart:
    """Read the source checkpoint (a run or checkpoint folder, or a Hugging Face Hub repo id
    ``user/repo`` holding one, downloaded once) without building a model."""
    ckpt = resolve_checkpoint(locate_run(path))
    source = load_config_of(ckpt)
    try:
        answers = read_json(ckpt / ANSWERS_FILE, MAX_VOCAB_BYTES, expect=list, error=CheckpointError)
    except (FileNotFoundError, CheckpointError) as err:
        raise CheckpointError(f"--init-from {err}") from None
    if not all(isinstance(a, str) for a in answers):
        raise CheckpointError(f"--init-from {ckpt / ANSWERS_FILE}: expected a JSON list of answer strings")
    try:
        state = load_file(str(ckpt / WEIGHTS_FILE))
    except Exception as err:  # safetensors has its own error types for corrupt files
        raise CheckpointError(f"--init-from {ckpt / WEIGHTS_FILE}: cannot read weights ({err})") from None
    return WarmStart(ckpt, source, load_tokenizer(ckpt), list(answers), state)


def adopt_architecture(config: Config, source: Config) -> list[str]:
    """Copy the source's architecture into ``config.model``; returns "field: ours -> source's" for each change."""
    changes = []
    for name in ARCHITECTURE_FIELDS:
        ours, theirs = getattr(config.model, name), getattr(source.model, name)
        if ours != theirs:
            changes.append(f"{name}: {ours!r} -> {theirs!r}")
            setattr(config.model, name, theirs)
    return changes


def load_initial_weights(model: torch.nn.Module, warm: WarmStart) -> tuple[list[str], list[str]]:
    """Load the source weights; returns (fresh aligner parameters, source aligner parameters dropped).

    Any other missing or extra parameter, or a shape mismatch, is an error.
    """
    own = model.state_dict()
    # Helpers of another width (e.g. other model.alignment.helper_hidden) start fresh like absent ones.
    resized = [k for k, v in warm.state.items() if ALIGNER_MARK in k and k in own and own[k].shape != v.shape]
    state = {k: v for k, v in warm.state.items() if k not in resized}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise CheckpointError(f"--init-from {warm.path}: weights do not fit the model: {str(err).splitlines()[-1].strip()}") from None
    bad_missing = [k for k in missing if ALIGNER_MARK not in k]
    bad_extra = [k for k in unexpected if ALIGNER_MARK not in k]
    if bad_missing or bad_extra:
        raise CheckpointError(
            f"--init-from {warm.path}: weights do not fit the model: missing {bad_missing[:3]}, unexpected {bad_extra[:3]}"
        )
    return list(missing), list(unexpected) + resized


def adopt_init_architecture(config: Config) -> list[str]:
    """Apply ``config.train.init_from``'s architecture to ``config`` from its config alone (no weights read).

    For callers that compare configs before training (the experiment runner's reuse check), so
    that theirs equals the one the trainer will save.
    """
    source = resolve_checkpoint(locate_run(config.train.init_from))  # type: ignore[arg-type]
    return adopt_architecture(config, load_config_of(source))


def prepare_warm_start(config: Config, resume_dir: str | Path | None = None) -> WarmStart:
    """Load ``config.train.init_from`` and adopt its architecture into ``config`` (notes on stderr).

    When resuming (``resume_dir``: the run folder), the run's own last checkpoint, which holds the
    same tokenizer and answers, is read instead, so the source may have moved since.
    """
    last = Path(resume_dir) / "checkpoints" / "last" if resume_dir is not None else None
    warm = load_warm_start(last if last is not None and last.is_dir() else config.train.init_from)  # type: ignore[arg-type]
    changes = adopt_architecture(config, warm.source)
    if changes:
        print(f"--init-from {warm.path}: model fields taken from it: {'; '.join(changes)}", file=sys.stderr)
    return warm


def apply_warm_start(model: torch.nn.Module, warm: WarmStart) -> None:
    """Load the weights into the freshly built model and say what started fresh."""
    fresh, dropped = load_initial_weights(model, warm)
    modules = sorted({k.split(ALIGNER_MARK)[0] for k in fresh})
    note = f"--init-from {warm.path}: weights loaded"
    if modules:
        note += f"; alignment helpers of {len(modules)} attention module(s) start fresh"
    if dropped:
        note += f"; {len(dropped)} alignment-helper tensor(s) of the source are not used"
    print(note, file=sys.stderr)
