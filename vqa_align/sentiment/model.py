"""A BERT-family sentence classifier converted to alignment attention.

``SentenceClassifier`` = encoder (pretrained all-MiniLM-L6-v2, or a small random BERT for tests)
-> mean over the valid token states (the pooling all-MiniLM-L6-v2 was trained with) -> dropout ->
Linear to the classes. Every self-attention module of the encoder is converted with
:func:`vqa_align.align.conversion.convert_to_alignment`, so the alignment terms, their helper networks
and the per-head diagnostics come from exactly the code the VQA model uses.

Robustness probe: ``word_noise_std`` adds N(0, std²) to the word-embedding vectors of the valid
positions (before position/type embeddings and LayerNorm), through
:func:`vqa_align.metrics.calibration.noise_features`, the function that perturbs VQA region features.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from vqa_align.config import AlignmentConfig, ConfigError
from vqa_align.align.conversion import AlignmentHandle, convert_to_alignment

TEXT_KIND = "sa_text"  # diagnostics kind of the encoder's self-attention heads
LABELS = ["negative", "positive"]


@dataclass
class TinyBertConfig:
    """A small random BERT (tests, smoke runs): no weights to load."""

    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 64
    vocab_size: int = 30522  # the MiniLM WordPiece vocabulary, so the same tokenizer works


@dataclass
class SentenceModelConfig:
    encoder: Literal["minilm", "tiny"] = "minilm"
    dropout: float = 0.1  # classifier dropout; the encoder keeps its own (0.1 in MiniLM)
    max_tokens: int = 64  # WordPiece tokens per sentence, [CLS] and [SEP] included
    freeze_word_embeddings: bool = False  # keep the pretrained word-embedding matrix fixed
    tiny: TinyBertConfig = field(default_factory=TinyBertConfig)
    alignment: AlignmentConfig = field(default_factory=lambda: AlignmentConfig(method="none"))

    def validate(self) -> None:
        if self.encoder not in ("minilm", "tiny"):
            raise ConfigError(f"model.encoder: {self.encoder!r} is not one of ['minilm', 'tiny']")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must lie in [0, 1), got {self.dropout}")
        if self.max_tokens < 3:
            raise ConfigError(f"model.max_tokens must be >= 3 ([CLS], a word piece, [SEP]), got {self.max_tokens}")
        self.alignment.validate()


def build_encoder(config: SentenceModelConfig) -> nn.Module:
    """A Hugging Face ``BertModel`` without pooler: the pretrained MiniLM (offline) or a tiny random one."""
    from transformers import BertConfig, BertModel

    if config.encoder == "minilm":
        from transformers.utils import logging as hf_logging

        from vqa_align.model.question_encoders import minilm_path

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # "pooler weights not used" is expected: we drop the pooler
        try:
            return BertModel.from_pretrained(str(minilm_path()), local_files_only=True, add_pooling_layer=False,
                                             attn_implementation="sdpa")
        finally:
            hf_logging.set_verbosity(verbosity)
    t = config.tiny
    bert_config = BertConfig(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads, intermediate_size=t.intermediate_size, max_position_embeddings=512,
    )
    return BertModel(bert_config, add_pooling_layer=False)


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """(B, T, D) states, (B, T) 0/1 mask -> (B, D) mean over the valid positions."""
    weights = mask.to(hidden.dtype)[..., None]  # (B, T, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class SentenceClassifier(nn.Module):
    """``forward(input_ids (B, T), attention_mask (B, T)) -> logits (B, classes)``.

    ``attention_mask`` is 1 on [CLS], the word pieces and [SEP], 0 on right padding.
    ``self.alignment`` is the conversion handle: ``alignment.loss()`` after a training-mode forward.
    """

    def __init__(self, config: SentenceModelConfig, num_classes: int = len(LABELS)):
        super().__init__()
        self.config = config
        self.encoder = build_encoder(config)
        width = self.encoder.config.hidden_size
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(width, num_classes)
        # A plain attribute: the aligners it attaches are submodules of self.encoder.
        self.alignment: AlignmentHandle = convert_to_alignment(self.encoder, config.alignment, kind=TEXT_KIND)
        self.word_noise_std = 0.0
        self.noise_generator: torch.Generator | None = None
        self._lengths: Tensor | None = None
        self.encoder.embeddings.word_embeddings.register_forward_hook(self._add_word_noise)

    def _add_word_noise(self, module: nn.Module, args: Any, output: Tensor) -> Tensor | None:
        if self.word_noise_std == 0.0 or self._lengths is None:
            return None
        from vqa_align.metrics.calibration import noise_features

        # Valid positions are the first `length` ones (right padding), as noise_features expects.
        return noise_features(output, self._lengths, self.word_noise_std, self.noise_generator)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        self._lengths = attention_mask.sum(1)  # (B,)
        try:
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, D)
        finally:
            self._lengths = None
        return self.classifier(self.dropout(mean_pool(hidden, attention_mask)))  # (B, classes)
