"""What the package offers: the wheel's contents, an install of it alone (no checkout) that runs the
CLI and finds the shipped presets, and the public API that docs/api.md lists.

The wheel is built offline (``pip wheel --no-build-isolation``, setuptools from this environment)
from a copy of the files git would ship, so the checkout gets no build/ folder and parallel runs
share nothing. The install goes into a fresh venv whose only link to this environment is a
``.pth`` line naming its site-packages: a plain path line adds the folder to ``sys.path`` but runs
none of the ``.pth`` files inside it, so the editable install's path finder cannot leak in, and
``vqa_align`` can only come from the wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Source folder -> the top-level package it ships as (pyproject.toml's package-dir).
PACKAGE_DIRS = {"vqa_align": "vqa_align", "data_prep": "vqa_align_prep", "app": "vqa_align_app",
                "configs": "vqa_align_configs"}
SHIPPED_SUFFIXES = (".py", ".yaml", ".typed")  # code, presets, the typing marker


def _shipped_files() -> list[Path]:
    """Files git tracks or would track (not ignored) that still exist, relative to the checkout."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs the git checkout (the wheel is built from the files git ships)")
    listing = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "-co", "--exclude-standard"],
                             capture_output=True, check=True).stdout.decode()
    return sorted(Path(name) for name in listing.split("\0") if name and (REPO / name).is_file())


@pytest.fixture(scope="module")
def shipped() -> list[Path]:
    return _shipped_files()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory, shipped) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    for rel in shipped:
        (source / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, source / rel)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "--quiet", "--wheel-dir", str(work / "dist"), str(source)], check=True, cwd=work)
    (built,) = (work / "dist").glob("vqa_align-*.whl")
    return built


def test_wheel_holds_every_package_preset_and_kernel_source(wheel, shipped):
    names = set(zipfile.ZipFile(wheel).namelist())
    subpackages = [rel.parent for rel in shipped if rel.parts[0] == "vqa_align" and rel.name == "__init__.py"]
    assert len(subpackages) > 10  # vqa_align and its subpackages: align, model, data, extract ...
    assert [p for p in subpackages if f"{p.as_posix()}/__init__.py" not in names] == []
    presets = [rel for rel in shipped if rel.parts[0] == "configs" and rel.suffix == ".yaml"]
    assert "vqa_align_configs/easy_vqa.yaml" in names and len(presets) >= 6
    expected = {PACKAGE_DIRS[rel.parts[0]] + "/" + Path(*rel.parts[1:]).as_posix()
                for rel in shipped if rel.parts[0] in PACKAGE_DIRS and rel.name.endswith(SHIPPED_SUFFIXES)}
    assert sorted(expected - names) == []  # every module, preset and py.typed ships
    assert {"vqa_align_prep/__init__.py", "vqa_align_app/__init__.py", "vqa_align/py.typed"} <= names
    assert not any(n.startswith(("tests/", "benchmarks/", "docs/")) for n in names)


@pytest.fixture(scope="module")
def installed(tmp_path_factory, wheel) -> Path:
    """A fresh venv holding only the wheel; the dependencies come from this environment's site-packages."""
    venv = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    # pip of this environment installs into the venv (--python); the .pth line comes after, so pip
    # does not see this environment's editable vqa-align and the wheel's files land in the venv.
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    "--quiet", str(wheel)], check=True)
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "_test_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return venv


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


WHERE_FROM = """
import importlib.util, json, sys
import vqa_align
from vqa_align.config import load_config, preset_path
print(json.dumps({
    "vqa_align": vqa_align.__file__,
    "vqa_align_app": importlib.util.find_spec("vqa_align_app").origin,
    "vqa_align_prep": importlib.util.find_spec("vqa_align_prep").origin,
    "preset": str(preset_path("easy_vqa")),
    "preset_by_path": load_config("configs/easy_vqa.yaml").name,
    "finders": [type(f).__module__ for f in sys.meta_path],
}))
"""


def test_installed_wheel_runs_from_any_folder_and_finds_its_presets(installed, tmp_path):
    elsewhere = tmp_path / "elsewhere"  # no configs/ folder, no checkout on the path
    elsewhere.mkdir()
    for command in ("quickstart", "sentiment"):
        done = _run([str(installed / "bin" / "vqa-align"), command, "--help"], elsewhere)
        assert done.returncode == 0, done.stderr
        assert f"usage: vqa-align {command}" in done.stdout
    done = _run([str(installed / "bin" / "python"), "-c", WHERE_FROM], elsewhere)
    assert done.returncode == 0, done.stderr
    where = json.loads(done.stdout)
    for key in ("vqa_align", "vqa_align_app", "vqa_align_prep", "preset"):
        assert Path(where[key]).is_relative_to(installed), (key, where[key])
    assert where["preset"].endswith("vqa_align_configs/easy_vqa.yaml")
    assert where["preset_by_path"] == "easy_vqa"  # configs/NAME.yaml falls back to the shipped preset
    assert not any("editable" in module for module in where["finders"]), where["finders"]


def test_api_doc_lists_exactly_the_public_names():
    # docs/api.md promises: the names it lists are vqa_align's public API, the rest is internal.
    import re

    import vqa_align

    documented = set(re.findall(r"^\| `([A-Za-z_]+)", (REPO / "docs" / "api.md").read_text(), re.MULTILINE))
    assert documented == set(vqa_align.__all__)
    for name in vqa_align.__all__:  # and each one imports
        assert getattr(vqa_align, name) is not None
