"""Test-only support for running the Triton aligner kernels in Triton's CPU interpreter
(tests/test_triton_kernels.py and the --smoke runs of benchmarks/triton_check.py and
benchmarks/aligner_precision.py): the interpreter's fp32 -> bf16 cast, made to round like the GPU."""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import torch


@contextlib.contextmanager
def gpu_rounding_in_interpreter():
    """Within this context Triton's CPU interpreter rounds fp32 -> bf16 casts to nearest even, as
    the GPU does (``cvt.rn.bf16.f32``); as shipped (3.8.0) it truncates, which shrinks every rounded
    unit vector and biases CT's cost 1 - g(q)·g(k) upwards by up to bf16's step near 1. Only that
    cast changes."""
    import triton.language as tl
    from triton.runtime import interpreter

    from vqa_align.align.kernels import triton_common

    if not triton_common.INTERPRETED:
        raise RuntimeError(
            "gpu_rounding_in_interpreter: these kernels were compiled, not interpreted (set TRITON_INTERPRET=1 "
            "before triton is imported)"
        )
    builder = interpreter.InterpreterBuilder
    truncating_cast = builder.cast_impl

    @functools.wraps(truncating_cast)
    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16)  # to nearest even
            return interpreter.TensorHandle(rounded.view(torch.uint16).numpy().reshape(src.data.shape), dst_type.scalar)
        return truncating_cast(self, src, dst_type)

    builder.cast_impl = cast_impl
    try:
        yield
    finally:
        builder.cast_impl = truncating_cast
