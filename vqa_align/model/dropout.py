"""Dropout that does not store its mask: counter-based on the CPU, PyTorch's elsewhere.

PyTorch's CPU dropout draws a float mask element by element, keeps it for the backward pass
(4 bytes per element: 52 MB for one MCAN-small FFN activation at batch 64 × 100 regions) and
multiplies by it twice. In an MCAN-small training step on 2 cores that is ≈ 1 s of ≈ 5 s
(`aten::bernoulli_` alone; BENCHMARKS.md, session 3). Here element k of a call is kept when the
k-th output of SplitMix64 started at a per-call seed is at least p·2^24 (``csrc/dropout.cpp``, built
by :mod:`vqa_align.model.native_dropout`): the mask is a function of (seed, k), so the backward pass
recomputes it instead of reading it, and both passes are one vectorised loop.

The seed of each call is drawn from PyTorch's default generator, so ``torch.manual_seed`` (and the
trainer's saved RNG state) makes runs repeatable as before; the masks themselves differ from
``torch.nn.functional.dropout``'s, with the same distribution (each element kept independently with
probability 1 - p, scaled by 1 / (1 - p)). Elsewhere — CUDA, no C++ toolchain,
``VQA_ALIGN_NATIVE_KERNELS=0``, p = 1 — :func:`torch.nn.functional.dropout` runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vqa_align.model.native_dropout import counter_dropout, counter_dropout_available

_SEED_BOUND = 2**62
_NATIVE_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


class _CounterDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, p: float, seed: int) -> Tensor:  # type: ignore[override]
        ctx.p, ctx.seed = p, seed
        return counter_dropout(x, p, seed)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        # The same op with the same seed: the same elements are zeroed and the rest scaled.
        return counter_dropout(grad, ctx.p, ctx.seed), None, None


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """``F.dropout(x, p, training)`` with the counter-based kernel where it applies (see module doc)."""
    if not training or p == 0.0:
        return x
    if p < 1.0 and x.device.type == "cpu" and x.dtype in _NATIVE_DTYPES and counter_dropout_available():
        seed = int(torch.randint(_SEED_BOUND, (1,)).item())
        return _CounterDropout.apply(x, p, seed)
    return F.dropout(x, p, True)


class Dropout(nn.Dropout):
    """:class:`torch.nn.Dropout` (same arguments, state and ``isinstance``) through :func:`dropout`."""

    def forward(self, x: Tensor) -> Tensor:
        if self.inplace:  # the counter kernel writes a new tensor; keep the documented semantics
            return F.dropout(x, self.p, self.training, inplace=True)
        return dropout(x, self.p, self.training)
