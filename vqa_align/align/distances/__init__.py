"""The alignment distances: a registry with one row per distance, and the one dispatch table that
picks the implementation each (distance, ``model.alignment.kernels``) pair runs.

======  ==============================  ===========================  ========
name    module                          implementations              colour
======  ==============================  ===========================  ========
``none``  (nothing: plain MCAN)          -                            grey
``ct``    ``distances/ct.py``            reference, fused, triton     blue
``gan``   ``distances/gan.py``           reference, fused, triton     red
``ot``    ``distances/ot.py``            reference                    green
======  ==============================  ===========================  ========

How to add a distance
---------------------
1. Write ``vqa_align/align/distances/<name>.py`` with its plain math and

       def build_helpers(head_dim, config) -> dict[str, nn.Module]   # its helper networks, by attribute name
       def reference(aligner, queries, keys, q_valid, k_valid) -> Tensor   # (B, H), plain PyTorch + autograd

   and, where it has them, ``fused`` (same signature; pure PyTorch ops, any device) and ``triton``
   (same signature; CUDA) with ``triton_fits(queries, keys) -> bool`` and ``TRITON_KERNELS`` (the
   module of its Triton kernels, imported only when they are selected). ``aligner`` is the
   :class:`~vqa_align.align.aligner.HeadAligner`: its helpers and settings (``rho``,
   ``helper_precision``, ``ot_*``) are read from it.
2. Add one row to :data:`DISTANCES`. ``model.alignment.method`` accepts it from then on and the
   reports draw it in its colour.

This module imports nothing from the project and no torch at import time: the configuration
(:mod:`vqa_align.config`) validates ``method`` against it.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from dataclasses import dataclass
from typing import Any, Callable

from vqa_align.errors import UserError


@dataclass(frozen=True)
class Distance:
    name: str
    colour: str  # in the reports' figures (matplotlib colour)
    module: str | None = None  # its math, helpers and implementations; None: nothing to compute
    kernels: tuple[str, ...] = ()  # implementations besides "reference": "fused", "triton"


DISTANCES: dict[str, Distance] = {
    "none": Distance("none", "#7f7f7f"),
    "ct": Distance("ct", "#1f77b4", "vqa_align.align.distances.ct", ("fused", "triton")),
    "gan": Distance("gan", "#d62728", "vqa_align.align.distances.gan", ("fused", "triton")),
    "ot": Distance("ot", "#2ca02c", "vqa_align.align.distances.ot"),
}

def distance_module(name: str) -> Any:
    """The module of distance ``name`` (imported on first use); ValueError for an unknown or empty one."""
    row = DISTANCES.get(name)
    if row is None or row.module is None:
        raise ValueError(f"alignment method {name!r} has nothing to compute; choose one of "
                         f"{[n for n, r in DISTANCES.items() if r.module]}")
    return importlib.import_module(row.module)


def implementation(name: str, kernels: str, queries: Any, keys: Any) -> Callable:
    """The dispatch table: which function of distance ``name`` runs for ``kernels`` on these inputs.

    ``kernels`` (``model.alignment.kernels``): "reference" = the plain modules under autograd;
    "fused" = the hand-fused autograd functions (PyTorch ops, any device); "triton" = Triton on
    CUDA (an error if it is missing there); "auto" = "triton" where it can run, else "fused".

    Only devices, dtypes and shapes are read (no host sync): the choice is the same inside a CUDA
    graph. Triton runs on CUDA only, for fp32/bf16/fp16 inputs (an fp64 model asks for fp64
    arithmetic, which the kernels do not do), and where the distance's ``triton_fits`` says the
    shapes fit; elsewhere "triton" and "auto" fall back to "fused", and distances without fused
    kernels run their reference.
    """
    row = DISTANCES[name]
    module = distance_module(name)
    if "triton" in row.kernels and _triton_runs(kernels, queries, module.TRITON_KERNELS):
        if module.triton_fits(queries, keys):
            return module.triton
    if kernels != "reference" and "fused" in row.kernels:
        return module.fused
    return module.reference


def _triton_runs(kernels: str, queries: Any, triton_module: str) -> bool:
    """Whether ``kernels`` asks for Triton and it can run for ``queries``: CUDA, not fp64, importable."""
    import torch  # the inputs are tensors, so torch is loaded; not imported at module level (see above)

    if kernels not in ("auto", "triton") or queries.device.type != "cuda" or queries.dtype == torch.float64:
        return False
    why = import_failure(triton_module)
    if why is None:
        return True
    if kernels == "triton":
        raise UserError(
            f"model.alignment.kernels is 'triton' but Triton cannot be used ({why}); install triton or set "
            "model.alignment.kernels to auto or fused"
        )
    warnings.warn(f"Triton cannot be used ({why}): the aligners run on the fused PyTorch path", RuntimeWarning,
                  stacklevel=4)
    return False


@functools.cache
def import_failure(module: str) -> str | None:
    """Import ``module`` once; None when it imports, else why not (ImportError, or a Triton that
    fails to initialise)."""
    try:
        importlib.import_module(module)
    except Exception as err:  # noqa: BLE001
        return f"{type(err).__name__}: {err}"
    return None
