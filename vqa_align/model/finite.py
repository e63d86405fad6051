"""Non-finite numbers at inference: say where they come from instead of answering with NaN.

A model's output is NaN/Inf only when its input features or its weights are (a damaged feature
store, a run that diverged). Checking the output costs one reduction per batch; only when it fails
are the features and the weights scanned, to name the image or the weight tensor in the error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from vqa_align.errors import UserError

MAX_NAMED = 5  # images / tensors named in one message


class NonFiniteError(UserError, ValueError):
    """The model's output is NaN or Inf; the message names the images or weights responsible."""


def nonfinite_weights(model: torch.nn.Module) -> list[str]:
    """Names of the floating-point parameters and buffers that hold a NaN or an Inf."""
    return [name for name, t in model.state_dict().items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def nonfinite_samples(features: torch.Tensor, region_counts: torch.Tensor) -> list[int]:
    """Indices of the samples whose real regions (not the padding) hold a NaN or an Inf.

    features (B, N, D), region_counts (B,).
    """
    regions = torch.arange(features.shape[1], device=features.device)[None, :]  # (1, N)
    real = regions < region_counts[:, None]  # (B, N)
    bad = ~torch.isfinite(features).all(-1) & real  # (B, N)
    return bad.any(-1).nonzero().flatten().tolist()


def check_output(
    logits: torch.Tensor,
    model: torch.nn.Module,
    features: torch.Tensor,
    region_counts: torch.Tensor,
    image_ids: Sequence[int],
    checkpoint: str | Path,
    store: str | Path | None = None,
    boxes: torch.Tensor | None = None,
    noise_std: float = 0.0,
) -> None:
    """Raise :class:`NonFiniteError` when ``logits`` (B, A) hold a NaN or an Inf, naming the cause.

    ``features`` (B, N, D) and ``boxes`` (B, N, 4) as read from the store (before any noise);
    ``image_ids[b]`` names sample b's image; ``store`` the feature store it was read from;
    ``noise_std``: the feature noise the model was run under (0: none).
    """
    if bool(torch.isfinite(logits).all()):
        return
    for what, values in (("features", features), ("boxes", boxes)):
        bad_samples = nonfinite_samples(values, region_counts) if values is not None else []
        if bad_samples:
            ids = sorted({int(image_ids[b]) for b in bad_samples})
            source = f" in the feature store {Path(store).name}" if store is not None else ""
            raise NonFiniteError(
                f"the region {what} of image(s) {', '.join(map(str, ids[:MAX_NAMED]))}"
                f"{' ...' if len(ids) > MAX_NAMED else ''}{source} contain NaN or Inf values; "
                "the store is damaged: rebuild it with `vqa-align prep`"
            )
    names = nonfinite_weights(model)
    if names:
        raise NonFiniteError(
            f"{Path(checkpoint) / 'model.safetensors'}: {len(names)} weight tensor(s) contain NaN or Inf values "
            f"({', '.join(names[:MAX_NAMED])}{' ...' if len(names) > MAX_NAMED else ''}); the checkpoint is "
            "damaged or its training diverged: use another checkpoint (e.g. the run's best)"
        )
    shown = ", ".join(map(str, list(image_ids)[:MAX_NAMED]))
    if noise_std > 0:
        raise NonFiniteError(
            f"the model's output is NaN or Inf for image(s) {shown} under feature noise of std {noise_std:g}, although "
            f"the stored features and the weights of {checkpoint} are finite: the noise overflowed the model's "
            f"arithmetic; use a smaller --noise-std"
        )
    raise NonFiniteError(
        f"the model's output is NaN or Inf for image(s) {shown} although "
        f"its inputs and the weights of {checkpoint} are finite (an overflow: try train.precision fp32)"
    )
