"""The three-line Python usage that docs/api.md and README.md show runs exactly as written, on a
tiny run standing in for the quickstart's (in this test's own cache), with each kind of picture."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_inference import ANSWERS, _shape_image, build_tiny_checkpoint

from vqa_align import Predictor, UserError

ROOT = Path(__file__).resolve().parents[1]
API_DOC = ROOT / "docs" / "api.md"
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
INLINE_CALL = re.compile(r"`(p\.answer\([^`]*\))`")  # the other calls the page shows, e.g. with image_id=
SNIPPET_LINES = 3


def first_python_block(path: Path) -> str:
    found = PYTHON_BLOCK.search(path.read_text(encoding="utf-8"))
    assert found, f"{path.relative_to(ROOT)}: no ```python block"
    return found.group(1)


def test_readme_and_api_page_show_the_same_three_lines():
    snippet = first_python_block(API_DOC)
    assert len(snippet.strip().splitlines()) == SNIPPET_LINES, snippet
    assert first_python_block(ROOT / "README.md") == snippet


@pytest.fixture
def quickstart_run(tmp_path, monkeypatch) -> Path:
    """A tiny run where the quickstart's would be (``<VQA_ALIGN_CACHE>/runs/quickstart``)."""
    build_tiny_checkpoint(tmp_path / "tiny")
    run = tmp_path / "cache" / "runs" / "quickstart"
    shutil.copytree(tmp_path / "tiny" / "run", run)
    monkeypatch.setenv("VQA_ALIGN_CACHE", str(tmp_path / "cache"))
    return run


def test_the_documented_snippet_runs_as_written(quickstart_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Image.fromarray(_shape_image(1)).save("photo.png")  # the picture the snippet names
    exec(compile(first_python_block(API_DOC), str(API_DOC), "exec"), {})
    printed = capsys.readouterr().out.strip()

    p = Predictor.load(quickstart_run)
    from_path = p.answer("what shape is it?", image="photo.png")
    assert printed == from_path.answer and printed in ANSWERS
    # A PIL image and an array of the same picture are answered alike.
    for picture in (Image.open("photo.png"), np.asarray(Image.open("photo.png"))):
        other = p.answer("what shape is it?", image=picture)
        assert [a for a, _ in other.top_k] == [a for a, _ in from_path.top_k]
        assert [q for _, q in other.top_k] == pytest.approx([q for _, q in from_path.top_k], abs=1e-6)
    # The page's other calls (an image of the store by id) run as written too.
    calls = INLINE_CALL.findall(API_DOC.read_text(encoding="utf-8"))
    assert any("image_id=" in c for c in calls), calls
    for call in calls:
        prediction = eval(call, {"p": p})
        assert prediction.answer in ANSWERS and prediction.image_id is not None, call


def test_load_without_a_quickstart_run_names_the_command():
    with pytest.raises(UserError, match="run `vqa-align quickstart` first"):
        Predictor.load()
