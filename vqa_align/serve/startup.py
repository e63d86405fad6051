"""Starting a process that serves a predictor (``vqa-align predict``, ``vqa-align demo``)."""

from __future__ import annotations

import gc
from pathlib import Path

import torch

from vqa_align.errors import UserError
from vqa_align.runs.checkpoint import CheckpointError
from vqa_align.serve.gallery import folder_image_loader
from vqa_align.serve.predictor import Predictor


def load_predictor(checkpoint: str | Path | None, images: str | Path | None = None) -> Predictor:
    """Predictor of ``checkpoint`` (default: the quickstart's); errors become one-line UserErrors.

    ``images``: the folder the store's pictures were extracted from (``vqa-align extract``), shown
    in the gallery.
    """
    loader = None
    if images is not None:
        if not Path(images).expanduser().is_dir():
            raise UserError(f"--images {images}: not a folder")
        loader = folder_image_loader(Path(images).expanduser())
    try:
        return Predictor.load(checkpoint or None, image_loader=loader)
    except CheckpointError as err:
        raise UserError(str(err)) from None


def configure_threads(predictor: Predictor) -> int:
    """Use one torch thread for small models (the easy-VQA quickstart); returns the thread count.

    Why: a request of a small model is ~100 tiny ops; with several threads each op pays an OpenMP
    barrier, and on a busy 2-core machine a descheduled thread stalls every barrier (measured 10-50x
    slower). Parallelism comes from serving two requests at once instead. Large models (VQA v2,
    100 regions) keep torch's default.
    """
    if predictor.config.model.hidden_size <= 256:
        torch.set_num_threads(1)
    return torch.get_num_threads()


def freeze_startup_objects() -> None:
    """Exclude everything allocated so far (torch, the model, Gradio) from garbage collection.

    Why: figures are reference cycles, so requests leave garbage that only the collector frees;
    every few requests a full collection runs, and without this it rescans the ~1M start-up
    objects, adding ~250 ms of CPU to that request (p90 of a request: 420 -> 230 ms CPU).
    """
    gc.collect()
    gc.freeze()
