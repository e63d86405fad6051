"""Pieces the distances share: gradient reversal, the highway layer and small MLPs of the helper
networks, and the masked mean over valid positions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return -grad


def reverse_gradient(x: Tensor) -> Tensor:
    """Identity in the forward pass; negates the gradient in the backward pass."""
    return _GradientReversal.apply(x)


def call_with_reversed_parameters(module: nn.Module, x: Tensor) -> Tensor:
    """Run ``module(x)`` so that ``module`` ascends the loss: its parameters' gradients are negated.

    Used for the CT critic, which maximises the transport cost while the gradient that flows
    *through* the critic into the queries and keys keeps its sign. Done per call (not with
    persistent tensor hooks) so that copies, DDP wrappers and reloaded modules behave the same.
    """
    reversed_params = {name: reverse_gradient(p) for name, p in module.named_parameters()}
    return torch.func.functional_call(module, reversed_params, (x,))


def masked_mean(values: Tensor, valid: Tensor) -> Tensor:
    """Mean of ``values`` (B, H, N) over the valid positions ``valid`` (B, N) -> (B, H)."""
    weights = valid[:, None, :].to(values.dtype)
    return (values * weights).sum(-1) / weights.sum(-1).clamp_min(1.0)


class Highway(nn.Module):
    """y = t ⊙ ReLU(W_h x) + (1 - t) ⊙ x with t = σ(W_t x); both gates from one fused matmul."""

    def __init__(self, dim: int):
        super().__init__()
        self.gates = nn.Linear(dim, 2 * dim)

    def forward(self, x: Tensor) -> Tensor:
        transform, carry_logit = self.gates(x).chunk(2, dim=-1)
        t = torch.sigmoid(carry_logit)
        return t * F.relu(transform) + (1.0 - t) * x


def mlp(d_in: int, hidden: int, d_out: int, activation: nn.Module) -> nn.Sequential:
    """Linear-activation-Linear."""
    return nn.Sequential(nn.Linear(d_in, hidden), activation, nn.Linear(hidden, d_out))
