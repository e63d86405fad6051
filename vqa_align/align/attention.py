"""Multi-head attention whose heads may carry an alignment regulariser, and token packing.

The attention module of MCAN (and of any model :func:`~vqa_align.align.conversion.convert_to_alignment`
handles natively): projections, scaled dot-product attention, and the hook where a
:class:`~vqa_align.align.aligner.HeadAligner` measures the distance between each head's queries and
keys (Zhang et al. 2021).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vqa_align.align.aligner import AttentionDetails, HeadAligner


def valid_mask(lengths: Tensor, max_len: int) -> Tensor:
    """(B,) lengths -> (B, max_len) bool, True at positions < length."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


@dataclass(frozen=True)
class TokenPacking:
    """The real positions of a padded (B, N) batch, so that per-token ops skip the padding.

    ``rows`` (R,) holds the flat indices b·N + n of the real positions, in order. ``pack`` gathers
    them from a (B, N, ...) tensor into (R, ...); ``unpack`` scatters (R, ...) back to (B, N, ...)
    with zeros at the padded positions. Both are differentiable.
    """

    rows: Tensor  # (R,) int64
    batch: int
    length: int

    @classmethod
    def from_mask(cls, valid: Tensor) -> TokenPacking:
        """(B, N) bool -> the packing of its True positions (reads the mask on the host)."""
        batch, length = valid.shape
        return cls(valid.flatten().nonzero().squeeze(1), batch, length)

    def pack(self, x: Tensor) -> Tensor:
        return x.flatten(0, 1).index_select(0, self.rows)  # (B, N, ...) -> (R, ...)

    def unpack(self, x: Tensor) -> Tensor:
        padded = x.new_zeros((self.batch * self.length, *x.shape[1:]))
        return padded.index_copy(0, self.rows, x).view(self.batch, self.length, *x.shape[1:])  # (B, N, ...)


class MultiHeadAttention(nn.Module):
    """Multi-head attention with an optional alignment regulariser on its queries and keys.

    Projections are stored as one fused ``in_proj`` (3·D, D) like ``nn.MultiheadAttention``: one
    matmul for self-attention, two (Q, then fused K/V) for guided attention.

    ``forward(x, y, x_valid, y_valid)`` attends from the queries ``x`` (B, Nq, D) to the keys and
    values ``y`` (B, Nk, D). It returns ``(output (B, Nq, D), alignment (B, H) or None,
    details or None)``. Alignment is computed when the module has an aligner and
    ``compute_alignment`` is true; details (projected q/k and attention weights) when
    ``need_details``. Without details the fused ``scaled_dot_product_attention`` kernel is used.
    With a :class:`TokenPacking` the projections skip padded tokens: y (and x, in self-attention)
    come packed as (R, D), and a self-attention's output is packed too.
    """

    def __init__(self, hidden_size: int, num_heads: int, dropout: float, aligner: HeadAligner | None = None):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.dropout = dropout
        self.in_proj = nn.Linear(hidden_size, 3 * hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)
        self.aligner = aligner

    def _split_heads(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, d)

    def project(self, x: Tensor, y: Tensor, packing: TokenPacking | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Queries from x, keys and values from y -> three (B, H, N, d) tensors.

        With ``packing``, y (and x, in self-attention) is the packed real tokens (R, D): the
        projection runs on them and is scattered back to (B, N, ·), zeros at padded tokens.
        """
        if x is y:
            qkv = self.in_proj(x)
            if packing is not None:
                qkv = packing.unpack(qkv)  # (R, 3D) -> (B, N, 3D)
            q, k, v = qkv.chunk(3, dim=-1)
        else:
            dim = x.shape[-1]
            q = F.linear(x, self.in_proj.weight[:dim], self.in_proj.bias[:dim])
            kv = F.linear(y, self.in_proj.weight[dim:], self.in_proj.bias[dim:])
            if packing is not None:
                kv = packing.unpack(kv)  # (R, 2D) -> (B, Nk, 2D)
            k, v = kv.chunk(2, dim=-1)
        return self._split_heads(q), self._split_heads(k), self._split_heads(v)

    def forward(
        self,
        x: Tensor,
        y: Tensor,
        x_valid: Tensor,
        y_valid: Tensor,
        compute_alignment: bool = False,
        need_details: bool = False,
        packing: TokenPacking | None = None,
    ) -> tuple[Tensor, Tensor | None, AttentionDetails | None]:
        q, k, v = self.project(x, y, packing)  # (B, H, Nq, d), (B, H, Nk, d), (B, H, Nk, d)
        key_mask = y_valid[:, None, None, :]  # (B, 1, 1, Nk)
        dropout_p = self.dropout if self.training else 0.0
        details = None
        if need_details:
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)  # (B, H, Nq, Nk)
            weights = scores.masked_fill(~key_mask, float("-inf")).softmax(-1)
            context = F.dropout(weights, dropout_p, self.training) @ v
            details = AttentionDetails(q.detach(), k.detach(), weights.detach(), x_valid, y_valid)
        else:
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=dropout_p)
        batch, _, length, _ = context.shape
        context = context.transpose(1, 2).reshape(batch, length, -1)  # (B, Nq, D)
        if packing is not None and x is y:
            context = packing.pack(context)  # (R, D): the output projection skips padded queries
        output = self.out_proj(context)
        alignment = None
        if compute_alignment and self.aligner is not None:
            alignment = self.aligner(q, k, x_valid, y_valid)  # (B, H)
        return output, alignment, details
