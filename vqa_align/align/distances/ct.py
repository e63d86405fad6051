"""CT: bidirectional conditional transport between a head's queries and keys (the paper's best).

Navigator f (Linear-ReLU-Linear) and critic g (highway, then Linear-ReLU-Linear), both
L2-normalised and shared by the heads of one attention module. The Q/K projections and the
navigator minimise CT; the critic maximises it (its parameters' gradients are negated, the
gradient flowing through it into q and k keeps its sign). See ``shared/ALIGNMENT.md``.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vqa_align.align.distances.layers import Highway, call_with_reversed_parameters, masked_mean, mlp
from vqa_align.align.kernels.fused import fused_conditional_transport

TRITON_KERNELS = "vqa_align.align.kernels.triton_ct"  # imported only when Triton is selected


def conditional_transport(
    nav_q: Tensor,
    nav_k: Tensor,
    crit_q: Tensor,
    crit_k: Tensor,
    q_valid: Tensor,
    k_valid: Tensor,
    rho: float = 0.5,
) -> Tensor:
    """Bidirectional conditional transport between queries and keys, per sample and head.

    Args:
        nav_q, nav_k: navigator outputs f(q) (B, H, Nq, r), f(k) (B, H, Nk, r), L2-normalised.
        crit_q, crit_k: critic outputs g(q) (B, H, Nq, r'), g(k) (B, H, Nk, r'), L2-normalised.
        q_valid, k_valid: (B, Nq), (B, Nk) bool masks of real positions.
        rho: weight of the forward (query -> key) direction.

    Returns:
        (B, H): ρ·(1/n)Σ_i Σ_j π(k_j|q_i) c_ij + (1-ρ)·(1/m)Σ_j Σ_i π(q_i|k_j) c_ij with
        π(k_j|q_i) = softmax_j(f(q_i)·f(k_j)), π(q_i|k_j) = softmax_i(f(q_i)·f(k_j)),
        c_ij = 1 - g(q_i)·g(k_j).

    Because the plans are softmaxes and the cost is affine in a dot product,
    Σ_j π(k_j|q_i) c_ij = 1 - g(q_i)·Σ_j π(k_j|q_i) g(k_j): the inner sum is attention with
    query f(q), key f(k), value g(k) and unit scale. The (Nq, Nk) cost matrix is never formed and
    both directions run in the fused attention kernel.
    """
    key_mask = k_valid[:, None, None, :]  # (B, 1, 1, Nk)
    query_mask = q_valid[:, None, None, :]  # (B, 1, 1, Nq)
    forward_target = F.scaled_dot_product_attention(nav_q, nav_k, crit_k, attn_mask=key_mask, scale=1.0)
    backward_target = F.scaled_dot_product_attention(nav_k, nav_q, crit_q, attn_mask=query_mask, scale=1.0)
    forward_cost = 1.0 - (crit_q * forward_target).sum(-1)  # (B, H, Nq)
    backward_cost = 1.0 - (crit_k * backward_target).sum(-1)  # (B, H, Nk)
    return rho * masked_mean(forward_cost, q_valid) + (1.0 - rho) * masked_mean(backward_cost, k_valid)


def identity_conditional_transport(
    queries: Tensor, keys: Tensor, q_valid: Tensor, k_valid: Tensor, rho: float = 0.5
) -> Tensor:
    """Parameter-free CT (navigator = critic = L2 normalisation) -> (B, H).

    A diagnostic that is comparable across models, including those trained without a CT critic.
    """
    q_unit = F.normalize(queries.float(), dim=-1)
    k_unit = F.normalize(keys.float(), dim=-1)
    return conditional_transport(q_unit, k_unit, q_unit, k_unit, q_valid, k_valid, rho)


def build_helpers(head_dim: int, config) -> dict[str, nn.Module]:
    """Navigator and critic of one attention module (``config``: its AlignmentConfig)."""
    return {
        "navigator": mlp(head_dim, config.helper_hidden, config.helper_out, nn.ReLU()),
        "critic": nn.Sequential(Highway(head_dim), mlp(head_dim, config.helper_hidden, config.helper_out, nn.ReLU())),
    }


def reference(aligner: nn.Module, queries: Tensor, keys: Tensor, q_valid: Tensor, k_valid: Tensor) -> Tensor:
    """The plain modules under autograd -> (B, H)."""
    sizes = [queries.shape[-2], keys.shape[-2]]  # split() backward is one cat, not zeros + copies
    # Queries and keys go through each helper in ONE call (concatenated along positions).
    both = torch.cat([queries, keys], dim=-2)  # (B, H, Nq + Nk, d)
    nav = F.normalize(aligner.navigator(both), dim=-1)
    crit = F.normalize(call_with_reversed_parameters(aligner.critic, both), dim=-1)
    (nav_q, nav_k), (crit_q, crit_k) = nav.split(sizes, dim=-2), crit.split(sizes, dim=-2)
    return conditional_transport(nav_q, nav_k, crit_q, crit_k, q_valid, k_valid, aligner.rho)


def fused(aligner: nn.Module, queries: Tensor, keys: Tensor, q_valid: Tensor, k_valid: Tensor) -> Tensor:
    """The hand-fused forward/backward (:mod:`vqa_align.align.kernels.fused`) -> (B, H) fp32."""
    return fused_conditional_transport(
        queries, keys, q_valid, k_valid, aligner.navigator, aligner.critic, aligner.rho, aligner.helper_precision
    )


def triton(aligner: nn.Module, queries: Tensor, keys: Tensor, q_valid: Tensor, k_valid: Tensor) -> Tensor:
    """The Triton kernels (CUDA) -> (B, H) fp32."""
    return importlib.import_module(TRITON_KERNELS).triton_conditional_transport(
        queries, keys, q_valid, k_valid, aligner.navigator, aligner.critic, aligner.rho, aligner.helper_precision
    )


def triton_fits(queries: Tensor, keys: Tensor) -> bool:
    """Whether one (sample, head)'s transport tile fits on-chip for the Triton kernels."""
    return importlib.import_module(TRITON_KERNELS).transport_fits(queries, keys)
