"""The one inference loop over a VQA loader: validation during training
(vqa_align/train/vqa_task.py) and checkpoint evaluation (vqa_align/evaluate/evaluator.py) both
run the model through :func:`forward_batches` and differ only in what they collect from it.

Imports model and data only, so that train may use it without evaluate depending on train.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from vqa_align.model.mcan import MODEL_INPUTS

Inputs = dict[str, torch.Tensor]


@dataclass
class Forward:
    """One batch through the model."""

    batch: dict[str, torch.Tensor]  # as the loader produced it (host tensors: ids, targets)
    inputs: Inputs  # the model's keyword arguments, on the device
    logits: torch.Tensor  # (B, A) float32 answer scores


def forward_batches(
    model: torch.nn.Module,
    loader: Iterable[dict[str, torch.Tensor]],
    device: torch.device | str,
    amp_dtype: torch.dtype | None = None,
    prepare: Callable[[dict[str, torch.Tensor], Inputs], Inputs] | None = None,
) -> Iterator[Forward]:
    """Every batch of ``loader`` through ``model`` in eval mode, without gradients, under autocast
    to ``amp_dtype`` (None: off). ``prepare(batch, inputs)`` sees each batch first: it may check
    it or change the inputs (feature noise). The model's mode is set before each forward, since
    a caller may switch dropout on between batches (MC dropout); restoring it is the caller's."""
    device = torch.device(device)
    for batch in loader:
        inputs = {k: batch[k].to(device, non_blocking=True) for k in MODEL_INPUTS}
        if prepare is not None:
            inputs = prepare(batch, inputs)
        model.eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(**inputs).logits.float()
        # Yielded outside the block: a yield inside it would leave the caller's code under autocast.
        yield Forward(batch, inputs, logits)
