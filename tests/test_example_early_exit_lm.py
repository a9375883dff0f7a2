"""examples/early_exit_lm.py: the corpus split is fixed and disjoint; --quick runs end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tree_env

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "early_exit_lm.py"
sys.path.insert(0, str(SCRIPT.parent))

pytest.importorskip("transformers")
import early_exit_lm  # noqa: E402


def test_the_split_is_by_file_fixed_and_disjoint() -> None:
    a, b = early_exit_lm.corpus_files(), early_exit_lm.corpus_files()
    assert a == b
    names = [set(v) for v in a.values()]
    assert all(x.isdisjoint(y) for i, x in enumerate(names) for y in names[i + 1 :])
    assert len(a["train"]) > 5 * len(a["val"]) > 0 and a["test"]


@pytest.mark.slow
def test_quick_run_prints_the_tables_and_identical_outputs(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=tree_env(),
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Validation loss per exit" in result.stdout
    rows = [r for r in result.stdout.splitlines() if r.startswith(("plain |", "ee |"))]
    spec = [r for r in rows if "model.layers" in r]
    assert len(spec) == 4 and all(r.endswith("| yes") for r in spec)
    assert (tmp_path / "exit_losses.png").is_file()
