"""vqa-align: MCAN co-attention VQA with alignment attention (Zhang et al., NeurIPS 2021).

The public Python API (documented in docs/api.md). These names stay importable from here when
files move inside the package; everything else is internal::

    from vqa_align import Predictor
    p = Predictor.load()                    # the quickstart's run; or Predictor.load("runs/my_run")
    print(p.answer("what shape is it?", image="photo.png").answer)   # or image_id=0 (the store's)

Imports are lazy (PEP 562), so ``import vqa_align`` and ``vqa-align --help`` stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    # configuration
    "Config": "vqa_align.config",
    "ModelConfig": "vqa_align.config",
    "AlignmentConfig": "vqa_align.config",
    "load_config": "vqa_align.config",
    # the model and alignment attention
    "MCAN": "vqa_align.model.mcan",
    "MultiHeadAttention": "vqa_align.align.attention",
    "HeadAligner": "vqa_align.align.aligner",
    "convert_to_alignment": "vqa_align.align.conversion",
    # data
    "FeatureStore": "vqa_align.extract.feature_store",
    # runs: training, checkpoints, evaluation, prediction
    "train_from_config": "vqa_align.train.trainer",
    "load_checkpoint": "vqa_align.runs.checkpoint",
    "evaluate_checkpoint": "vqa_align.evaluate.evaluator",
    "Predictor": "vqa_align.serve.predictor",
    "Prediction": "vqa_align.serve.prediction",
    # errors worth catching
    "UserError": "vqa_align.errors",
    "InputError": "vqa_align.serve.prediction",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'vqa_align' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, eagerly
    from vqa_align.align.aligner import HeadAligner
    from vqa_align.align.attention import MultiHeadAttention
    from vqa_align.align.conversion import convert_to_alignment
    from vqa_align.config import AlignmentConfig, Config, ModelConfig, load_config
    from vqa_align.extract.feature_store import FeatureStore
    from vqa_align.errors import UserError
    from vqa_align.evaluate.evaluator import evaluate_checkpoint
    from vqa_align.model.mcan import MCAN
    from vqa_align.runs.checkpoint import load_checkpoint
    from vqa_align.serve.prediction import InputError, Prediction
    from vqa_align.serve.predictor import Predictor
    from vqa_align.train.trainer import train_from_config
