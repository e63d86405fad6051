"""``python -m vqa_align.train`` and ``torchrun --nproc_per_node=N -m vqa_align.train``: same as
``vqa-align train``. An entry point (like the ``vqa-align`` script), so it may call the command line."""

import sys

from vqa_align.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
