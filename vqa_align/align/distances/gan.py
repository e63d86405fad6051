"""GAN: adversarial matching of a head's queries and keys.

Discriminator D (highway, then Linear-LeakyReLU-Linear to one logit), shared by the heads of one
attention module, minimises BCE(D(k), 1) + BCE(D(q), 0) over valid positions; q and k both reach
it through a gradient-reversal layer, so the projections maximise it (the paper's Eq. 2). The
value rises towards 2·log 2 as queries and keys become indistinguishable.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vqa_align.align.distances.layers import Highway, masked_mean, mlp, reverse_gradient
from vqa_align.align.kernels.fused import fused_adversarial_loss

TRITON_KERNELS = "vqa_align.align.kernels.triton_gan"  # imported only when Triton is selected


def adversarial_loss(logits_q: Tensor, logits_k: Tensor, q_valid: Tensor, k_valid: Tensor) -> Tensor:
    """Discriminator loss BCE(D(k), 1) + BCE(D(q), 0), averaged over valid positions -> (B, H).

    Args:
        logits_q: D(q) (B, H, Nq); logits_k: D(k) (B, H, Nk).
    """
    loss_k = F.binary_cross_entropy_with_logits(logits_k, torch.ones_like(logits_k), reduction="none")
    loss_q = F.binary_cross_entropy_with_logits(logits_q, torch.zeros_like(logits_q), reduction="none")
    return masked_mean(loss_k, k_valid) + masked_mean(loss_q, q_valid)


def build_helpers(head_dim: int, config) -> dict[str, nn.Module]:
    """The discriminator of one attention module (``config``: its AlignmentConfig)."""
    return {
        "discriminator": nn.Sequential(
            Highway(head_dim), mlp(head_dim, config.helper_hidden, 1, nn.LeakyReLU(config.gan_leaky_slope))
        )
    }


def reference(aligner: nn.Module, queries: Tensor, keys: Tensor, q_valid: Tensor, k_valid: Tensor) -> Tensor:
    """The plain discriminator under autograd -> (B, H)."""
    sizes = [queries.shape[-2], keys.shape[-2]]  # split() backward is one cat, not zeros + copies
    logits = aligner.discriminator(reverse_gradient(torch.cat([queries, keys], dim=-2))).squeeze(-1)
    logits_q, logits_k = logits.split(sizes, dim=-1)
    return adversarial_loss(logits_q, logits_k, q_valid, k_valid)


def fused(aligner: nn.Module, queries: Tensor, keys: Tensor, q_valid: Tensor, k_valid: Tensor) -> Tensor:
    """The hand-fused forward/backward (:mod:`vqa_align.align.kernels.fused`) -> (B, H) fp32."""
    return fused_adversarial_loss(queries, keys, q_valid, k_valid, aligner.discriminator, aligner.helper_precision)


def triton(aligner: nn.Module, queries: Tensor, keys: Tensor, q_valid: Tensor, k_valid: Tensor) -> Tensor:
    """The Triton kernels (CUDA) -> (B, H) fp32."""
    return importlib.import_module(TRITON_KERNELS).triton_adversarial_loss(
        queries, keys, q_valid, k_valid, aligner.discriminator, aligner.helper_precision
    )


def triton_fits(queries: Tensor, keys: Tensor) -> bool:
    """The GAN's kernels work row by row: every shape fits."""
    return True
