"""keep_freed_memory: glibc's malloc keeps freed blocks, so a repeated step stops page-faulting them in."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# A "step" that allocates and frees blocks above glibc's default 32 MiB mmap ceiling, like the
# aligners' buffers; prints the minor page faults of the third repetition.
STEP_FAULTS = textwrap.dedent(
    """
    import resource, sys, torch
    from vqa_align.train.host_memory import keep_freed_memory
    if sys.argv[1] == "keep":
        assert keep_freed_memory() is True
    def step():
        blocks = [torch.ones(9_000_000 + 100_000 * i) for i in range(4)]  # 36-37 MB each
        return sum(float(b[-1]) for b in blocks)
    step(); step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", STEP_FAULTS, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_kept_memory_is_reused_without_page_faults():
    default, kept = _faults("default"), _faults("keep")
    # Default glibc maps and faults all ~147 MB in again every step (~36,000 faults here).
    assert default > 20_000, default
    assert kept < default / 3, (kept, default)
