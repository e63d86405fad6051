"""The project's C++ CPU kernels: their loader, and the elementwise glue of the fused aligners
(one-pass C++ kernels on the CPU, PyTorch versions elsewhere). The same extension also holds the
cache-blocked CT and GAN aligners (``csrc/aligner_blocks.cpp``, see :func:`helper_blocks`) and the
counter-based dropout of :mod:`vqa_align.model.dropout` (``csrc/dropout.cpp``).

Between the helper networks' matmuls, the fused CT and GAN aligners
(:mod:`vqa_align.align.kernels.fused`) do elementwise work on B·H·(Nq + Nk) rows: bias adds and
activations, the highway layer's mix, the L2 normalisation of the helper outputs, their backward
passes and the bias-gradient column sums; and, for CT, on the (B, H, Nq, Nk) transport matrices.
PyTorch does each of these as several passes, each with a freshly allocated output; on a 2-core
CPU those passes cost more than the matmuls. ``csrc/alignment_glue.cpp`` does each step in one
pass, in place where it can, with the bias adds and column sums folded in. On CPUs with AMX,
``csrc/aligner_blocks.cpp`` goes further: it runs every layer of a block of rows (and CT's
transport of one sample and head) in the cache, so the intermediates never reach memory.

The kernels are compiled on first use with :func:`torch.utils.cpp_extension.load` (1-2 minutes once, said
on stderr, then cached in ``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``) for the
host CPU (``-march=native``). The cache entry is named by a hash of the sources' content, the flags,
the CPU's flags and the toolchain (:func:`extension_name`), so checkouts with the same sources share
one build and different ones never collide. Where that is impossible (no C++
compiler) the PyTorch versions below run instead, with one warning; they compute the same
functions and are what the tests compare the kernels against. ``VQA_ALIGN_NATIVE_KERNELS=0`` turns
the kernels off.

Both implementations have the same signatures; every function may overwrite its first argument
(it is consumed). Rows are contiguous 2-D ``(rows, width)`` tensors of one dtype; column sums and
norms come back in the accumulation dtype (fp32 for bf16/fp32 inputs, fp64 for fp64).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import sys
import sysconfig
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = (CSRC / "alignment_glue.cpp", CSRC / "aligner_blocks.cpp", CSRC / "dropout.cpp")  # one extension, ops vqa_align_glue
ENV_SWITCH = "VQA_ALIGN_NATIVE_KERNELS"
NORM_EPS = 1e-12  # F.normalize's default: x / max(|x|, eps)
# OpenMP: ATen's parallel_for is header-inlined. -fno-trapping-math lets GCC vectorise the floor in
# the kernels' exp (results unchanged; FP exceptions are not used). On x86, loops use 512-bit
# vectors where the CPU has them (GCC prefers 256-bit by default; these loops gain from the wider).
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-trapping-math"] + (
    ["-mprefer-vector-width=512"] if platform.machine().lower() in ("x86_64", "amd64") else []
)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums, norms and the aligners' distances: at least fp32."""
    return torch.promote_types(dtype, torch.float32)


@functools.cache
def cpu_flags() -> tuple[str, ...]:
    """The host CPU's feature flags (``/proc/cpuinfo``), empty where unknown."""
    try:
        with open("/proc/cpuinfo") as handle:
            return next((tuple(line.split(":", 1)[1].split()) for line in handle if line.startswith("flags")), ())
    except OSError:
        return ()


# ----------------------------------------------------------------------------------------------
# PyTorch versions (any device; the reference for the C++ kernels)
# ----------------------------------------------------------------------------------------------


def linear_activation(x: Tensor, weight: Tensor, bias: Tensor, slope: float) -> Tensor:
    """leaky_relu(x Wᵀ + b, slope) for rows x (R, in): slope 0 is a ReLU."""
    y = torch.addmm(bias, x, weight.t())
    return y.relu_() if slope == 0.0 else F.leaky_relu_(y, slope)


def linear_normalize(x: Tensor, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """y = x Wᵀ + b -> (y / max(|y|, eps) row-wise, the clamped norms (R,) in the accumulation dtype)."""
    y = torch.addmm(bias, x, weight.t())
    norms = torch.linalg.vector_norm(y, dim=-1, dtype=accumulation_dtype(y.dtype)).clamp_min_(NORM_EPS)
    return y.mul_(norms.reciprocal()[:, None]), norms


def normalize_backward(grad: Tensor, unit: Tensor, norms: Tensor) -> tuple[Tensor, Tensor]:
    """Backward of the normalisation in :func:`linear_normalize`: (grad - u (u·grad)) / |y| where
    |y| > eps, else grad / eps -> (dL/dy (R, w), its column sums (w,): the bias gradient)."""
    along = torch.linalg.vecdot(unit, grad, dim=-1).to(norms.dtype).masked_fill_(norms <= NORM_EPS, 0.0)  # (R,)
    grad = grad.addcmul_(unit, along[:, None], value=-1.0).mul_(norms.reciprocal()[:, None])
    return grad, grad.sum(0, dtype=norms.dtype)


def leaky_relu_backward(grad: Tensor, activated: Tensor, slope: float) -> tuple[Tensor, Tensor]:
    """grad ⊙ (1 where activated > 0 else slope), for ``activated`` the (leaky) ReLU's output.

    -> (dL/d pre-activation (R, w), its column sums (w,): the bias gradient of that layer).
    """
    grad = torch.ops.aten.leaky_relu_backward(grad, activated, slope, True)
    return grad, grad.sum(0, dtype=accumulation_dtype(grad.dtype))


def highway_forward(rows: Tensor, gate_w: Tensor, gate_b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """y = t ⊙ relu(W_h x + b_h) + (1 - t) ⊙ x, t = σ(W_t x + b_t), x = rows (R, d).

    ``gate_w`` (2d, d) / ``gate_b`` (2d,) = [W_h; W_t] as in :class:`~vqa_align.align.aligner.Highway`.
    -> (y, W_h x + b_h, t), what :func:`highway_backward` needs. The two halves are separate
    matmuls so that every (R, d) tensor is contiguous (elementwise work on column slices of one
    (R, 2d) output is 2-4x slower on the CPU).
    """
    d = rows.shape[-1]
    transform = torch.addmm(gate_b[:d], rows, gate_w[:d].t())  # (R, d)
    gate = torch.addmm(gate_b[d:], rows, gate_w[d:].t()).sigmoid_()  # (R, d)
    return torch.addcmul(rows, gate, torch.relu(transform).sub_(rows)), transform, gate


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
    acc = accumulation_dtype(grad_out.dtype)
    return direct, grad_transform, grad_gate, torch.cat([grad_transform.sum(0, dtype=acc), grad_gate.sum(0, dtype=acc)])


def _mask_factor(valid: Tensor) -> Tensor | None:
    """valid (B, N) -> a (B, N) 0/1 factor, or None on the CPU when nothing is padded.

    On accelerators the check itself would be a host sync, so the factor is always applied there.
    """
    if valid.device.type == "cpu" and bool(valid.all()):
        return None
    return valid


def transport_forward(
    logits: Tensor, cost_dots: Tensor, q_valid: Tensor, k_valid: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The elementwise part of the CT forward pass, on (B, H, Nq, Nk) matrices.

    ``logits`` = S = f(q)·f(k), ``cost_dots`` = g(q)·g(k). -> (E = exp(S) with padded pairs zeroed,
    C = 1 - cost_dots, the row sums (B, H, Nq) and column sums (B, H, Nk) of E, and those of
    E ⊙ C), sums in the accumulation dtype. S lies in [-1, 1] (unit vectors): exp needs no
    max-subtraction.
    """
    e = logits.exp_()
    q_factor, k_factor = _mask_factor(q_valid), _mask_factor(k_valid)
    if q_factor is not None:
        e.mul_(q_factor[:, None, :, None])
    if k_factor is not None:
        e.mul_(k_factor[:, None, None, :])
    cost = cost_dots.neg_().add_(1.0)
    acc = accumulation_dtype(e.dtype)
    e_cost = e * cost
    return e, cost, e.sum(-1, dtype=acc), e.sum(-2, dtype=acc), e_cost.sum(-1, dtype=acc), e_cost.sum(-2, dtype=acc)


def transport_backward(
    e: Tensor, cost: Tensor, alpha: Tensor, beta: Tensor, a: Tensor, b: Tensor
) -> tuple[Tensor, Tensor]:
    """The elementwise part of the CT backward pass -> (P, dS), (B, H, Nq, Nk) each:
    P_ij = E_ij (α_i + β_j) and dS_ij = P_ij C_ij - E_ij (a_i + b_j); α, a (B, H, Nq), β, b (B, H, Nk)."""
    dt = e.dtype  # the small vectors are cast before broadcasting to (B, H, Nq, Nk)
    plan = e * (alpha.to(dt)[..., :, None] + beta.to(dt)[..., None, :])
    centre = a.to(dt)[..., :, None] + b.to(dt)[..., None, :]
    return plan, (plan * cost).addcmul_(e, centre, value=-1.0)


TORCH_GLUE = SimpleNamespace(
    name="torch",
    linear_activation=linear_activation,
    linear_normalize=linear_normalize,
    normalize_backward=normalize_backward,
    leaky_relu_backward=leaky_relu_backward,
    highway_forward=highway_forward,
    highway_backward=highway_backward,
    transport_forward=transport_forward,
    transport_backward=transport_backward,
)


# ----------------------------------------------------------------------------------------------
# C++ kernels (CPU): the matmuls without bias here, the bias added inside the kernels' passes
# ----------------------------------------------------------------------------------------------


def _native_linear_activation(x: Tensor, weight: Tensor, bias: Tensor, slope: float) -> Tensor:
    y = torch.mm(x, weight.t())
    torch.ops.vqa_align_glue.bias_leaky_relu_(y, bias, float(slope))
    return y


def _native_linear_normalize(x: Tensor, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    y = torch.mm(x, weight.t())
    return y, torch.ops.vqa_align_glue.normalize_rows_(y, bias)


def _native_normalize_backward(grad: Tensor, unit: Tensor, norms: Tensor) -> tuple[Tensor, Tensor]:
    return grad, torch.ops.vqa_align_glue.normalize_backward_(grad, unit, norms)


def _native_leaky_relu_backward(grad: Tensor, activated: Tensor, slope: float) -> tuple[Tensor, Tensor]:
    return grad, torch.ops.vqa_align_glue.leaky_relu_backward_(grad, activated, float(slope))


def _native_highway_forward(rows: Tensor, gate_w: Tensor, gate_b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    d = rows.shape[-1]
    transform, gate = torch.mm(rows, gate_w[:d].t()), torch.mm(rows, gate_w[d:].t())  # biases: in the kernel
    return torch.ops.vqa_align_glue.highway_forward_(transform, gate_b[:d], gate, gate_b[d:], rows), transform, gate


def _native_highway_backward(
    grad_out: Tensor, gate: Tensor, transform: Tensor, rows: Tensor, input_sign: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    grad_transform, grad_gate, sums = torch.ops.vqa_align_glue.highway_backward_(
        grad_out, gate, transform, rows, float(input_sign)
    )
    return grad_out, grad_transform, grad_gate, sums


def _native_transport_forward(
    logits: Tensor, cost_dots: Tensor, q_valid: Tensor, k_valid: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    sums = torch.ops.vqa_align_glue.transport_forward_(logits, cost_dots, q_valid, k_valid)
    return (logits, cost_dots, *sums)  # now E and C


NATIVE_GLUE = SimpleNamespace(
    name="native",
    linear_activation=_native_linear_activation,
    linear_normalize=_native_linear_normalize,
    normalize_backward=_native_normalize_backward,
    leaky_relu_backward=_native_leaky_relu_backward,
    highway_forward=_native_highway_forward,
    highway_backward=_native_highway_backward,
    transport_forward=_native_transport_forward,
    transport_backward=lambda *args: torch.ops.vqa_align_glue.transport_backward(*args),
)


def enabled_by_environment() -> bool:
    value = os.environ.get(ENV_SWITCH, "1").strip().lower()
    if value not in ("0", "1", "false", "true", "off", "on", ""):
        raise ValueError(f"{ENV_SWITCH} must be 0 or 1, got {value!r}")
    return value not in ("0", "false", "off")


def extension_name(sources: dict[str, bytes], cflags: list[str], host: tuple[str, ...] = ()) -> str:
    """``vqa_align_glue_<hash>``: the hash covers what the build depends on (the sources' names and
    content, the compiler flags, the host CPU's flags for -march=native, the compiler, torch and
    Python), not where the checkout lies: two checkouts with the same sources share one build,
    different sources or flags never overwrite each other's."""
    digest = hashlib.sha256()
    for file_name in sorted(sources):
        digest.update(file_name.encode() + b"\0" + hashlib.sha256(sources[file_name]).digest())
    toolchain = [os.environ.get("CXX", "c++"), torch.__version__, platform.python_version()]
    for part in (cflags, host, toolchain):
        digest.update(b"\0".join(str(x).encode() for x in part) + b"\1")
    return f"vqa_align_glue_{digest.hexdigest()[:16]}"


def stage_sources(sources: dict[str, bytes], folder: Path) -> list[Path]:
    """Write the sources into ``folder`` (once; atomically) and return their paths there.

    torch compiles with ninja, whose build file names each source by its absolute path: compiling
    from the checkout would give each checkout its own build file, and each would rebuild the
    other's kernels. Compiled from this folder inside the (content-keyed) build directory, every
    checkout with the same sources issues the very same build.
    """
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for file_name, content in sorted(sources.items()):
        path = folder / file_name
        if not path.is_file() or path.read_bytes() != content:
            tmp = folder / f".{file_name}.{os.getpid()}.tmp"
            tmp.write_bytes(content)
            os.replace(tmp, path)  # another process may read it while we write: never half a file
        paths.append(path)
    return paths


def _build_directory(cpp_extension, name: str) -> Path:
    """torch's build directory for ``name`` ($TORCH_EXTENSIONS_DIR/name, else its default root)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        try:
            return Path(cpp_extension._get_build_directory(name, verbose=False))
        except AttributeError:  # a torch without the private helper: its documented default root
            root = cpp_extension.get_default_build_root()
    return Path(root) / name


def build_and_load(cpp_extension, name: str, sources: dict[str, bytes], echo=None) -> None:
    """Compile (where no build exists) and load the extension, saying so when it compiles."""
    echo = echo or (lambda text: print(text, file=sys.stderr, flush=True))
    build_dir = _build_directory(cpp_extension, name)
    library = build_dir / f"{name}{sysconfig.get_config_var('SHLIB_SUFFIX') or '.so'}"
    compiling = not library.exists()
    if compiling:
        echo(f"vqa_align: compiling the C++ CPU kernels in {build_dir} (first use only, 1-2 minutes)...")
    start = time.perf_counter()
    paths = stage_sources(sources, build_dir / "sources")
    cpp_extension.load(
        name=name, sources=[str(p) for p in paths], extra_cflags=_CFLAGS, extra_ldflags=["-fopenmp"],
        build_directory=str(build_dir), is_python_module=False,
    )
    if compiling:
        echo(f"vqa_align: C++ CPU kernels built in {time.perf_counter() - start:.0f} s (cached for later runs)")


@functools.cache
def load_native() -> bool:
    """Compile (first time) and load the C++ kernels; False, with one warning, where that fails."""
    sources = {path.name: path.read_bytes() for path in SOURCES}
    name = extension_name(sources, _CFLAGS, cpu_flags())
    try:
        cpp_extension = _import_cpp_extension()
        if shutil.which("ninja") is None:  # the `ninja` wheel (a dependency) lives next to this Python
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        build_and_load(cpp_extension, name, sources)
    except Exception as error:  # noqa: BLE001 - no compiler, no ninja, a broken toolchain: fall back
        detail = " ".join(str(error).split())[-400:]  # the compiler's own message comes last
        warnings.warn(
            f"vqa_align: could not build the C++ CPU kernels (aligner glue, dropout): {type(error).__name__}: "
            f"...{detail}; using the PyTorch versions instead (slower on the CPU). "
            f"Set {ENV_SWITCH}=0 to skip the attempt.",
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


def native_enabled() -> bool:
    """Whether the C++ CPU kernels run: not turned off by the environment, and built."""
    return enabled_by_environment() and load_native()


HELPER_BLOCKS_SWITCH = "VQA_ALIGN_HELPER_BLOCKS"


def helper_blocks(device: torch.device, dtype: torch.dtype, widths: tuple[int, ...]) -> bool:
    """Whether the CT and GAN aligners run as the cache-blocked C++ kernels (``csrc/aligner_blocks.cpp``):
    CPU, bf16 helpers, kernels built and on, every helper width (head dim, hidden and output widths)
    a multiple of 32, and a CPU with AMX and AVX-512-BF16. ``VQA_ALIGN_HELPER_BLOCKS=0`` turns these
    kernels alone off (the layer-by-layer path with the glue kernels then runs)."""
    if device.type != "cpu" or dtype != torch.bfloat16 or not native_enabled():
        return False
    if os.environ.get(HELPER_BLOCKS_SWITCH, "1").strip().lower() in ("0", "false", "off"):
        return False
    return _helper_blocks_supported(tuple(widths))


@functools.cache
def _helper_blocks_supported(widths: tuple[int, ...]) -> bool:
    return bool(torch.ops.vqa_align_glue.helper_blocks_supported(list(widths)))


def glue_for(device: torch.device) -> SimpleNamespace:
    """The glue implementation for tensors on ``device``: the C++ kernels on the CPU when they
    are enabled and build, else the PyTorch versions."""
    if device.type == "cpu" and native_enabled():
        return NATIVE_GLUE
    return TORCH_GLUE
