"""Importers of models trained by other code bases into vqa-align run folders.

``mcan``: MCAN checkpoints of mcan-vqa and OpenVQA (``vqa-align import mcan-vqa|openvqa``).
"""

from vqa_align.importers.mcan import (
    FLAVOURS,
    ImportedModel,
    ImportFailure,
    convert_checkpoint,
    import_checkpoint,
    read_answer_dict,
    read_state_dict,
    run_import,
)

__all__ = [
    "FLAVOURS", "ImportFailure", "ImportedModel", "convert_checkpoint", "import_checkpoint", "read_answer_dict",
    "read_state_dict", "run_import",
]
