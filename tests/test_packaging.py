"""The wheel holds the package (typed) and imports outside the source tree."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import deepsup

ROOT = Path(__file__).resolve().parents[1]


def test_public_names_are_exported_and_sorted() -> None:
    assert deepsup.__all__ == sorted(deepsup.__all__)
    for name in deepsup.__all__:
        assert hasattr(deepsup, name), name


@pytest.mark.slow
def test_wheel_builds_installs_and_imports(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = dist.glob("deepsup-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "deepsup/py.typed" in names
    assert "deepsup/models/pspnet.py" in names
    assert not any(n.startswith("tests/") for n in names)
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
