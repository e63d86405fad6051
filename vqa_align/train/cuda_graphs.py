"""Whole training steps as CUDA graphs (``train.cuda_graphs: true``).

On a GPU the MCAN step is bound by the host launching thousands of small kernels, and the fused
alignment helpers add more (BENCHMARKS.md). Capturing the whole step -- forward under autocast,
loss, backward, gradient clipping and the fused Adam update -- as one CUDA graph per batch shape
and replaying it removes that cost (MCAN-small, batch 512 on an H200: `none` 30.0 -> 26.7 ms,
`ct` 78.9 -> 54.2 ms per step in ``benchmarks/gpu.py``).

Shapes must be static per graph, so batches are padded to a few shapes first
(:func:`pad_to_static`): questions to ``data.max_question_tokens`` and region counts up to a
multiple of :data:`REGION_BUCKET`. Padded positions are masked everywhere in the model (attention,
pooling, alignment), so the step computes the same loss and gradients as on the unpadded batch
(tested on the CPU). Each new shape (also the last, smaller batch of an epoch) is captured once
and replayed from then on; after 32 graphs, further new shapes run eagerly.

Requirements (checked by the trainer): one CUDA device, no DDP, ``train.grad_accumulation: 1``;
the optimizer must be capturable with a tensor learning rate (the trainer builds it so).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

# Region counts are padded up to a multiple of this: 100 regions give at most 13 graphs, and a
# batch carries at most 7 padded regions more than it needs.
REGION_BUCKET = 8

# Eager steps (on a side stream) before the first capture: cuBLAS/cuDNN handles, workspaces and the
# optimizer state must exist before capture. They are ordinary training steps.
WARMUP_STEPS = 3

StepOutputs = tuple[Tensor, Tensor, Tensor]  # loss, task loss, alignment loss


def pad_to_static(inputs: dict[str, Tensor], max_tokens: int, max_regions: int) -> dict[str, Tensor]:
    """Pad ``tokens`` to ``max_tokens`` and ``features`` / ``boxes`` to a multiple of
    :data:`REGION_BUCKET` regions (at most ``max_regions``), with zeros (= padding)."""
    tokens, features, boxes = inputs["tokens"], inputs["features"], inputs["boxes"]
    n = features.shape[1]
    target_n = min(-(-n // REGION_BUCKET) * REGION_BUCKET, max(max_regions, n))  # round up, never truncate
    padded = dict(inputs)
    padded["tokens"] = F.pad(tokens, (0, max(max_tokens - tokens.shape[1], 0)))
    padded["features"] = F.pad(features, (0, 0, 0, target_n - n))
    padded["boxes"] = F.pad(boxes, (0, 0, 0, target_n - n))
    return padded


class GraphedTrainStep:
    """Runs ``step_fn(inputs, targets) -> (loss, task, align)`` (forward + backward + optimizer
    update) as one CUDA graph per distinct input shape; eager for the first :data:`WARMUP_STEPS`
    steps and for new shapes once ``max_graphs`` graphs exist. All graphs share one memory pool (each replay is
    self-contained: its inputs are copied into its static buffers first and nothing it allocates
    is read after the next replay, except the returned losses, which callers read before that).
    """

    def __init__(self, step_fn: Callable[[dict[str, Tensor], Tensor], StepOutputs], zero_grad: Callable[[], None],
                 max_graphs: int = 32) -> None:
        self.step_fn = step_fn
        self.zero_grad = zero_grad
        self.max_graphs = max_graphs
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, dict[str, Tensor], Tensor, StepOutputs]] = {}
        self.eager_steps = 0
        self.replays = 0

    @staticmethod
    def _key(inputs: dict[str, Tensor], targets: Tensor) -> tuple:
        return tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(inputs.items())) + (tuple(targets.shape),)

    def _eager(self, inputs: dict[str, Tensor], targets: Tensor) -> StepOutputs:
        self.zero_grad()
        self.eager_steps += 1
        if self.eager_steps > WARMUP_STEPS:
            return self.step_fn(inputs, targets)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the default stream, as capture requires
            out = self.step_fn(inputs, targets)
        torch.cuda.current_stream().wait_stream(side)
        return out

    def __call__(self, inputs: dict[str, Tensor], targets: Tensor) -> StepOutputs:
        key = self._key(inputs, targets)
        entry = self.graphs.get(key)
        if entry is None:
            if self.eager_steps < WARMUP_STEPS or len(self.graphs) >= self.max_graphs:
                return self._eager(inputs, targets)
            static_inputs = {k: v.clone() for k, v in inputs.items()}
            static_targets = targets.clone()
            graph = torch.cuda.CUDAGraph()
            self.zero_grad()  # gradients are allocated inside the graph and overwritten by each replay
            # thread_local: the DataLoader's pin-memory thread may call CUDA during a capture.
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                outputs = self.step_fn(static_inputs, static_targets)
            entry = self.graphs[key] = (graph, static_inputs, static_targets, outputs)
        graph, static_inputs, static_targets, outputs = entry
        for name, value in inputs.items():
            static_inputs[name].copy_(value, non_blocking=True)
        static_targets.copy_(targets, non_blocking=True)
        graph.replay()
        self.replays += 1
        return outputs
