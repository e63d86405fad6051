"""The C++ counter-based dropout of :mod:`vqa_align.model.dropout`: its build and its on/off switch.

``csrc/dropout.cpp`` is compiled on first use with :func:`torch.utils.cpp_extension.load` (1-2
minutes once, said on stderr, then cached in ``$TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``) for the host CPU (``-march=native``). The cache entry is named by a
hash of the sources' content, the flags, the CPU's flags and the toolchain (:func:`extension_name`),
so checkouts with the same sources share one build and different ones never collide. Where that is
impossible (no C++ compiler) :func:`torch.nn.functional.dropout` runs instead, with one warning.
``VQA_ALIGN_NATIVE_KERNELS=0`` turns the kernel off.

Everything that uses the kernel asks :func:`counter_dropout_available` (the one place to turn it
off for good) and then calls :func:`counter_dropout`.
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

import torch
from torch import Tensor

CSRC = Path(__file__).parent / "csrc"
SOURCES = (CSRC / "dropout.cpp",)  # one extension, ops vqa_align_dropout
ENV_SWITCH = "VQA_ALIGN_NATIVE_KERNELS"
# OpenMP: ATen's parallel_for is header-inlined. -fno-trapping-math lets GCC vectorise the floor in
# the kernel (results unchanged; FP exceptions are not used). On x86, loops use 512-bit vectors
# where the CPU has them (GCC prefers 256-bit by default; these loops gain from the wider).
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-trapping-math"] + (
    ["-mprefer-vector-width=512"] if platform.machine().lower() in ("x86_64", "amd64") else []
)


@functools.cache
def cpu_flags() -> tuple[str, ...]:
    """The host CPU's feature flags (``/proc/cpuinfo``), empty where unknown: part of the build's
    cache key, since -march=native compiles for them."""
    try:
        with open("/proc/cpuinfo") as handle:
            return next((tuple(line.split(":", 1)[1].split()) for line in handle if line.startswith("flags")), ())
    except OSError:
        return ()


def enabled_by_environment() -> bool:
    value = os.environ.get(ENV_SWITCH, "1").strip().lower()
    if value not in ("0", "1", "false", "true", "off", "on", ""):
        raise ValueError(f"{ENV_SWITCH} must be 0 or 1, got {value!r}")
    return value not in ("0", "false", "off")


def extension_name(sources: dict[str, bytes], cflags: list[str], host: tuple[str, ...] = ()) -> str:
    """``vqa_align_dropout_<hash>``: the hash covers what the build depends on (the sources' names and
    content, the compiler flags, the host CPU's flags for -march=native, the compiler, torch and
    Python), not where the checkout lies: two checkouts with the same sources share one build,
    different sources or flags never overwrite each other's."""
    digest = hashlib.sha256()
    for file_name in sorted(sources):
        digest.update(file_name.encode() + b"\0" + hashlib.sha256(sources[file_name]).digest())
    toolchain = [os.environ.get("CXX", "c++"), torch.__version__, platform.python_version()]
    for part in (cflags, host, toolchain):
        digest.update(b"\0".join(str(x).encode() for x in part) + b"\1")
    return f"vqa_align_dropout_{digest.hexdigest()[:16]}"


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
            f"vqa_align: could not build the C++ CPU kernel (counter-based dropout): {type(error).__name__}: "
            f"...{detail}; using torch's dropout instead (slower on the CPU). "
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





def counter_dropout_available() -> bool:
    """Whether the C++ counter-based dropout runs: not turned off by the environment, and built."""
    return enabled_by_environment() and load_native()


def counter_dropout(x: Tensor, p: float, seed: int) -> Tensor:
    """x with each element zeroed with probability p (decided by (seed, its index)), the rest scaled
    by 1 / (1 - p); only call where :func:`counter_dropout_available`."""
    return torch.ops.vqa_align_dropout.counter_dropout(x, p, seed)
