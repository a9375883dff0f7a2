"""examples/minimal.py: short, runs as a script, prints main and aux losses; the README shows it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "minimal.py"
sys.path.insert(0, str(SCRIPT.parent))

import minimal  # noqa: E402

LINE = re.compile(r"^step +(\d+)  main (\S+)  aux layer2 (\S+)  aux layer3 (\S+)$", re.M)


def test_it_fits_on_one_screen() -> None:
    # 59 lines before the thread default and the start-up line (issue 20) took three more
    assert len(SCRIPT.read_text().splitlines()) < 63


def test_the_label_is_the_quadrant_with_the_bright_square() -> None:
    torch.manual_seed(1)
    images, labels = minimal.make_batch(64)
    assert images.shape == (64, 3, 32, 32) and labels.shape == (64,)
    quadrants = images.mean(dim=1).unflatten(1, (2, 16)).unflatten(3, (2, 16))  # B, r, h, c, w
    brightest = quadrants.mean(dim=(2, 4)).flatten(1).argmax(dim=1)  # index 2 * row + col
    assert torch.equal(brightest, labels)
    assert set(labels.tolist()) == {0, 1, 2, 3}


def test_the_script_prints_main_and_aux_losses_and_an_accuracy() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--steps", "3"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=300,
    )
    assert result.stdout.startswith("3 steps, 1 thread(s): ~8 s for 30 on a free core; or --steps")
    rows = LINE.findall(result.stdout)
    assert [int(r[0]) for r in rows] == [0, 2]  # every 10th step and the last
    for _, *losses in rows:
        assert all(0.0 < float(v) < 10.0 for v in losses)  # cross-entropies of 4 classes
    # at step 0 nothing is trained yet: every loss is near ln(4) = 1.386 (random heads)
    assert all(abs(float(v) - 1.386) < 0.6 for v in rows[0][1:])
    accuracy = re.search(r"^accuracy on 256 new images: ([\d.]+)%$", result.stdout, re.M)
    assert accuracy is not None and 0.0 <= float(accuracy.group(1)) <= 100.0


def _code(line: str) -> str:
    return re.sub(r"\s+#.*$", "", line).strip()


def test_the_readme_code_is_the_examples_core() -> None:
    """Each line of the README's first python block is in minimal.py, in the same order (the
    stand-in batch, made by `make_batch` in the example, excepted)."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", readme, re.S)
    assert block is not None
    wanted = [_code(x) for x in block.group(1).splitlines() if _code(x)]
    wanted = [x for x in wanted if not x.startswith("images, labels = torch.")]
    lines = iter(_code(x) for x in SCRIPT.read_text().splitlines())
    missing = [x for x in wanted if not any(x == y for y in lines)]
    assert not missing, f"README.md's code is not examples/minimal.py's core: {missing}"
    assert len(wanted) >= 15
