"""The wheel holds the package (typed) and imports outside the source tree."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import deepsup

ROOT = Path(__file__).resolve().parents[1]


def test_public_names_are_exported_and_sorted() -> None:
    assert deepsup.__all__ == sorted(deepsup.__all__)
    for name in deepsup.__all__:
        assert hasattr(deepsup, name), name


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel that the documented `python -m build` makes (here without build isolation,
    which would fetch hatchling into a temporary environment: same backend, same wheel)."""
    dist = tmp_path_factory.mktemp("dist")
    build = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (found,) = dist.glob("deepsup-*.whl")
    return found


@pytest.mark.slow
def test_wheel_builds_installs_and_imports(wheel: Path, tmp_path: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "deepsup/py.typed" in names
    assert "deepsup/models/pspnet.py" in names
    assert not any(n.startswith(("tests/", "examples/", "docs/")) for n in names)
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), wheel],
        check=True,
        timeout=300,
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = (
        "import deepsup, deepsup.models; from deepsup import DeepSupervision, heads; "
        "print(deepsup.__file__, deepsup.__version__)"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(str(target)), run.stdout


def _packages_without_deepsup(view: Path) -> Path:
    """This interpreter's site-packages (torch, torchvision, tqdm, ...) as a folder of links,
    deepsup's own files left out, so that a new venv can use them without deepsup."""
    site = Path(sysconfig.get_paths()["purelib"])
    view.mkdir()
    for entry in site.iterdir():
        if "deepsup" not in entry.name.lower():
            (view / entry.name).symlink_to(entry)
    return view


@pytest.mark.slow
def test_the_wheel_in_a_new_venv_runs_the_minimal_example(wheel: Path, tmp_path: Path) -> None:
    """The documented `pip install dist/deepsup-*.whl[examples]` into a new venv, then
    examples/minimal.py run against that install, away from the source tree.

    The venv is new (no system site-packages, no deepsup) but reads torch and the other
    dependencies from this interpreter's site-packages through a `.pth` file, instead of
    installing a second 5.5 GB CUDA torch; pip runs with `--no-index`, so it must find every
    requirement of the wheel, extras included, satisfied there or fail (nothing is fetched).
    """
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # away from the tree
    away = {"cwd": tmp_path, "env": env, "capture_output": True, "text": True, "timeout": 300}

    def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([python, *args], check=False, **away)

    purelib = run("-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout
    view = _packages_without_deepsup(tmp_path / "dependencies")
    (Path(purelib.strip()) / "dependencies.pth").write_text(f"{view}\n")
    bare = run("-c", "import torch; import deepsup")
    assert "No module named 'deepsup'" in bare.stderr  # torch found, deepsup not yet

    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index"]
    install = subprocess.run([*pip, f"{wheel}[examples]"], check=False, **away)
    assert install.returncode == 0, install.stdout + install.stderr
    installed = run("-c", "import deepsup; print(deepsup.__file__)").stdout.strip()
    assert Path(installed).is_relative_to(purelib.strip()), installed

    shutil.copy(ROOT / "examples" / "minimal.py", tmp_path / "minimal.py")
    example = run("minimal.py", "--steps", "3")
    assert example.returncode == 0, example.stdout + example.stderr
    assert re.search(r"^accuracy on 256 new images: [\d.]+%$", example.stdout, re.M), example.stdout
