"""``python -m vqa_align.train`` and ``torchrun --nproc_per_node=N -m vqa_align.train``: same as ``vqa-align train``."""

import sys

from vqa_align.training import main

if __name__ == "__main__":
    sys.exit(main())
