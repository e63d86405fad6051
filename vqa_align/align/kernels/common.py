"""What the fused (:mod:`.fused`) and the Triton (:mod:`.triton_ct`, :mod:`.triton_gan`) aligners
share: the helpers' compute dtype, the calls that hand ``HeadAligner``'s helper parameters to an
autograd function in one flat order, and the refusal of second-order gradients."""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn


def refuse_double_backward(method: str) -> None:
    """The hand-written backward passes are not differentiable themselves (their kernels record no
    graph): under ``create_graph=True`` (autograd runs backward with grad mode on) they would return
    gradients that silently lack their own gradient, so they refuse."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"the fused {method} aligner has no second-order gradient (backward with create_graph=True, e.g. a "
            "gradient penalty); run the plain aligners instead, which support it with the same values and "
            "gradients: set `.kernels = \"reference\"` on every vqa_align.align.aligner.HeadAligner of the model "
            "(or model.alignment.kernels: reference)"
            + (" and run under torch.nn.attention.sdpa_kernel(SDPBackend.MATH) (the fused attention kernels that the "
               "plain CT uses have no second-order gradient either)" if method == "CT" else "")
        )


def native_bf16_matmul(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively (faster than fp32) on ``device``: CUDA, or a CPU with
    avx512_bf16 / AMX (oneDNN uses them); elsewhere bf16 would be emulated and slower."""
    if device.type == "cuda":
        return _cuda_has_bf16(device.index if device.index is not None else torch.cuda.current_device())
    if device.type != "cpu":
        return False
    return _cpu_has_bf16()


@functools.cache
def _cuda_has_bf16(index: int) -> bool:  # cached: no device query inside a captured CUDA graph
    return torch.cuda.get_device_capability(index) >= (8, 0)


@functools.cache
def _cpu_has_bf16() -> bool:
    """The host CPU's flags (``/proc/cpuinfo``) name AMX-BF16 or AVX512-BF16; False where unknown."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next((line.split(":", 1)[1].split() for line in handle if line.startswith("flags")), [])
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def compute_dtype(precision: str, queries: Tensor) -> torch.dtype:
    """The dtype the fused helpers run in for ``AlignmentConfig.helper_precision``.

    ``fp32``: at least fp32; ``bf16``: bf16; ``auto``: bf16 where it is native
    (:func:`native_bf16_matmul`) and the inputs are not fp64 (an fp64 model asks for precision),
    else the inputs' dtype (at least fp32).
    """
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and queries.dtype != torch.float64 and native_bf16_matmul(queries.device):
        return torch.bfloat16
    if precision in ("fp32", "auto"):
        return torch.promote_types(queries.dtype, torch.float32)
    raise ValueError(f"alignment.helper_precision must be auto, fp32 or bf16, got {precision!r}")


def apply_conditional_transport(
    function: type[torch.autograd.Function], queries: Tensor, keys: Tensor, q_valid: Tensor, k_valid: Tensor,
    navigator: nn.Sequential, critic: nn.Sequential, rho: float, precision: str,
) -> Tensor:  # fmt: skip
    """Run a fused CT autograd ``function`` (the fused one, or the Triton one) on ``HeadAligner``'s
    helpers: their parameters in the flat order both take, autocast off (they pick their dtype)."""
    nav_first, nav_second = navigator[0], navigator[2]
    highway, (crit_first, _, crit_second) = critic[0], critic[1]
    dtype = compute_dtype(precision, queries)
    with torch.autocast(queries.device.type, enabled=False):
        return function.apply(
            queries, keys, q_valid, k_valid, rho, dtype, nav_first.weight, nav_first.bias, nav_second.weight,
            nav_second.bias, highway.gates.weight, highway.gates.bias, crit_first.weight, crit_first.bias,
            crit_second.weight, crit_second.bias,
        )  # fmt: skip


def apply_adversarial(
    function: type[torch.autograd.Function], queries: Tensor, keys: Tensor, q_valid: Tensor, k_valid: Tensor,
    discriminator: nn.Sequential, precision: str,
) -> Tensor:  # fmt: skip
    """Run a fused GAN autograd ``function`` (the fused one, or the Triton one) on ``HeadAligner``'s
    discriminator: its slope and parameters in the order both take, autocast off."""
    highway, (first, activation, second) = discriminator[0], discriminator[1]
    dtype = compute_dtype(precision, queries)
    with torch.autocast(queries.device.type, enabled=False):
        return function.apply(
            queries, keys, q_valid, k_valid, activation.negative_slope, dtype, highway.gates.weight,
            highway.gates.bias, first.weight, first.bias, second.weight, second.bias,
        )  # fmt: skip
