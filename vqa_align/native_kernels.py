"""The elementwise glue of the fused aligners: one-pass C++ kernels on the CPU, PyTorch elsewhere.

Between the helper networks' matmuls, the fused CT and GAN aligners
(:mod:`vqa_align.alignment_kernels`) do elementwise work on B·H·(Nq + Nk) rows: the highway
layer's mix, the L2 normalisation of the helper outputs and their backward passes, the (leaky)
ReLU backward and the bias-gradient column sums. PyTorch does each of these as several passes,
each with a freshly allocated output; on a 2-core CPU those passes (and the page faults of the
fresh memory) cost more than the matmuls. ``csrc/alignment_glue.cpp`` does each step in one
pass, in place where it can, with the column sums folded in.

The kernels are compiled on first use with :func:`torch.utils.cpp_extension.load` (≈ 25 s once,
then cached in ``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``) for the host CPU
(``-march=native``). Where that is impossible (no C++ compiler) the PyTorch versions below run
instead, with one warning; they compute the same functions and are what the tests compare the
kernels against. ``VQA_ALIGN_NATIVE_KERNELS=0`` turns the kernels off.

Both implementations have the same signatures; every function may overwrite its first argument
(it is consumed). Rows are contiguous 2-D ``(rows, width)`` tensors of one dtype; column sums and
norms come back in the accumulation dtype (fp32 for bf16/fp32 inputs, fp64 for fp64).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "alignment_glue.cpp"
ENV_SWITCH = "VQA_ALIGN_NATIVE_KERNELS"
NORM_EPS = 1e-12  # F.normalize's default: x / max(|x|, eps)
_CFLAGS = ["-O3", "-march=native", "-fopenmp"]  # OpenMP: ATen's parallel_for is header-inlined


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


# ----------------------------------------------------------------------------------------------
# PyTorch versions (any device; the reference for the C++ kernels)
# ----------------------------------------------------------------------------------------------


def normalize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """x (R, w) -> (x / max(|x|, eps) row-wise, the clamped norms (R,) in the accumulation dtype)."""
    norms = torch.linalg.vector_norm(x, dim=-1, dtype=_accumulation_dtype(x.dtype)).clamp_min_(NORM_EPS)
    return x.mul_(norms.reciprocal()[:, None]), norms


def normalize_backward(grad: Tensor, unit: Tensor, norms: Tensor) -> tuple[Tensor, Tensor]:
    """Backward of :func:`normalize_rows`: (grad - u (u·grad)) / |x| where |x| > eps, else grad / eps.

    -> (dL/dx (R, w), its column sums (w,): the bias gradient of the layer that made x).
    """
    along = torch.linalg.vecdot(unit, grad, dim=-1).to(norms.dtype).masked_fill_(norms <= NORM_EPS, 0.0)  # (R,)
    grad = grad.addcmul_(unit, along[:, None], value=-1.0).mul_(norms.reciprocal()[:, None])
    return grad, grad.sum(0, dtype=norms.dtype)


def leaky_relu_backward(grad: Tensor, activated: Tensor, slope: float) -> tuple[Tensor, Tensor]:
    """grad ⊙ (1 where activated > 0 else slope), for ``activated`` the (leaky) ReLU's output.

    -> (dL/d pre-activation (R, w), its column sums (w,): the bias gradient of that layer).
    """
    grad = torch.ops.aten.leaky_relu_backward(grad, activated, slope, True)
    return grad, grad.sum(0, dtype=_accumulation_dtype(grad.dtype))


def highway_forward(transform: Tensor, gate: Tensor, rows: Tensor) -> Tensor:
    """y = x + t ⊙ (relu(transform) - x) for x = rows (R, d), t = gate (already σ'd)."""
    return torch.addcmul(rows, gate, torch.relu(transform).sub_(rows))


def highway_backward(
    grad_out: Tensor, gate: Tensor, transform: Tensor, rows: Tensor, input_sign: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward of :func:`highway_forward` up to the highway's matmuls, with g = dL/dy:

    -> (input_sign · g ⊙ (1 - t)   the direct path to x (-1: a gradient reversal on x),
        g ⊙ t ⊙ [transform > 0]    dL/dtransform,
        g ⊙ (relu(transform) - x) ⊙ t ⊙ (1 - t)   dL/d(gate pre-activation),
        the column sums of the last two, concatenated (2d,)).
    """
    if input_sign not in (1.0, -1.0):
        raise ValueError(f"input_sign must be +1 or -1, got {input_sign}")
    grad_activated = grad_out * gate
    grad_transform = torch.ops.aten.threshold_backward(grad_activated, transform, 0.0)
    grad_gate = torch.ops.aten.sigmoid_backward(grad_out * torch.relu(transform).sub_(rows), gate)
    direct = grad_out.sub_(grad_activated) if input_sign == 1.0 else grad_activated.sub_(grad_out)
    acc = _accumulation_dtype(grad_out.dtype)
    return direct, grad_transform, grad_gate, torch.cat([grad_transform.sum(0, dtype=acc), grad_gate.sum(0, dtype=acc)])


TORCH_GLUE = SimpleNamespace(
    name="torch",
    normalize_rows=normalize_rows,
    normalize_backward=normalize_backward,
    leaky_relu_backward=leaky_relu_backward,
    highway_forward=highway_forward,
    highway_backward=highway_backward,
)


# ----------------------------------------------------------------------------------------------
# C++ kernels (CPU)
# ----------------------------------------------------------------------------------------------


def _native_normalize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    norms = torch.ops.vqa_align_glue.normalize_rows_(x)
    return x, norms


def _native_normalize_backward(grad: Tensor, unit: Tensor, norms: Tensor) -> tuple[Tensor, Tensor]:
    sums = torch.ops.vqa_align_glue.normalize_backward_(grad, unit, norms)
    return grad, sums


def _native_leaky_relu_backward(grad: Tensor, activated: Tensor, slope: float) -> tuple[Tensor, Tensor]:
    sums = torch.ops.vqa_align_glue.leaky_relu_backward_(grad, activated, float(slope))
    return grad, sums


def _native_highway_backward(
    grad_out: Tensor, gate: Tensor, transform: Tensor, rows: Tensor, input_sign: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    grad_transform, grad_gate, sums = torch.ops.vqa_align_glue.highway_backward_(
        grad_out, gate, transform, rows, float(input_sign)
    )
    return grad_out, grad_transform, grad_gate, sums


NATIVE_GLUE = SimpleNamespace(
    name="native",
    normalize_rows=_native_normalize_rows,
    normalize_backward=_native_normalize_backward,
    leaky_relu_backward=_native_leaky_relu_backward,
    highway_forward=lambda transform, gate, rows: torch.ops.vqa_align_glue.highway_forward(transform, gate, rows),
    highway_backward=_native_highway_backward,
)


def enabled_by_environment() -> bool:
    value = os.environ.get(ENV_SWITCH, "1").strip().lower()
    if value not in ("0", "1", "false", "true", "off", "on", ""):
        raise ValueError(f"{ENV_SWITCH} must be 0 or 1, got {value!r}")
    return value not in ("0", "false", "off")


@functools.cache
def load_native() -> bool:
    """Compile (first time) and load the C++ kernels; False, with one warning, where that fails."""
    source = SOURCE.read_bytes()
    # The build is specific to this source, its flags and the host CPU (-march=native).
    tag = hashlib.sha256(source + " ".join(_CFLAGS).encode() + _cpu_signature().encode()).hexdigest()[:12]
    name = f"vqa_align_glue_{tag}"
    try:
        cpp_extension = _import_cpp_extension()
        if shutil.which("ninja") is None:  # the `ninja` wheel (a dependency) lives next to this Python
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        log.info("loading the aligner glue kernels %s (the first use compiles them, ~25 s)", name)
        cpp_extension.load(
            name=name, sources=[str(SOURCE)], extra_cflags=_CFLAGS, extra_ldflags=["-fopenmp"], is_python_module=False
        )
    except Exception as error:  # noqa: BLE001 - no compiler, no ninja, a broken toolchain: fall back
        warnings.warn(
            f"vqa_align: could not build the C++ aligner kernels ({type(error).__name__}: {str(error)[:300]}); "
            f"using the PyTorch versions (same results, slower on the CPU). Set {ENV_SWITCH}=0 to skip the attempt.",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True


def _import_cpp_extension():
    # Its import warns that no CUDA toolkit is installed; these kernels are CPU-only, so that is noise.
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return "unknown"


def glue_for(device: torch.device) -> SimpleNamespace:
    """The glue implementation for tensors on ``device``: the C++ kernels on the CPU when they
    are enabled and build, else the PyTorch versions."""
    if device.type == "cpu" and enabled_by_environment() and load_native():
        return NATIVE_GLUE
    return TORCH_GLUE
