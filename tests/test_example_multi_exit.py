"""examples/multi_exit_digits.py: the data split, the three variants, and a tiny end-to-end run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from deepsup.losses import SelfDistillation

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import multi_exit_digits as ex  # noqa: E402


def test_the_split_is_fixed_disjoint_and_stratified() -> None:
    a, b = ex.load_digits_split(), ex.load_digits_split()
    sizes = {k: len(v[1]) for k, v in a.items()}
    assert sizes == {"train": 1078, "val": 359, "test": 360}
    for k in a:
        assert torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1])
    assert a["train"][0].shape[1:] == (1, 16, 16)
    rows = {k: {tuple(x.flatten().tolist()) for x in v[0]} for k, v in a.items()}
    assert not rows["train"] & rows["test"] and not rows["val"] & rows["test"]
    for split in a.values():  # every class in every split, in roughly equal shares
        counts = torch.bincount(split[1], minlength=10)
        assert counts.min() >= 0.08 * len(split[1])


def test_the_variants_differ_only_in_how_the_heads_learn() -> None:
    plain, ds, sd = (ex.build(v, seed=0, width=8) for v in ex.VARIANTS)
    assert all(t.detach for t in plain.taps.values())
    assert not any(t.detach for t in ds.taps.values())
    assert isinstance(sd.criterion, SelfDistillation)
    assert list(plain.taps) == list(ds.taps) == list(sd.taps) == list(ex.EXITS)
    for a, b in zip(plain.model.parameters(), sd.model.parameters()):
        assert torch.equal(a, b)  # same seed, same initial model
    x = torch.randn(2, 1, 16, 16)
    assert plain.eval()(x).shape == (2, 10)


@pytest.mark.slow
def test_a_tiny_run_writes_its_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ex.main(
        ["--epochs", "1", "--seeds", "0", "--width", "8", "--max-drops", "0", "0.5",
         "--eval-limit", "40", "--out", str(tmp_path)]
    )  # fmt: skip
    results = json.loads((tmp_path / "results.json").read_text())
    runs = results["runs"]
    assert [r["variant"] for r in runs] == list(ex.VARIANTS)
    for r in runs:
        assert set(r["exits"]) == {*ex.EXITS, "output"}
        assert all(0.0 <= a <= 1.0 for a in r["exits"].values())
        lax, strict = r["curve"][1], r["curve"][0]
        assert lax["flops"] <= strict["flops"] <= strict["full_flops"] * 1.01
        shares = [row["share"] for row in strict["rows"][:3]]
        assert sum(shares) == pytest.approx(1.0)
    for name in ("summary.md", "exits.png", "curve.png"):
        assert (tmp_path / name).stat().st_size > 0
    out = capsys.readouterr().out
    assert "Test accuracy per exit" in out and "Early exit on test" in out
    first = out.splitlines()[1]  # after the split sizes, before any training
    assert first.startswith("expected: about 10 s for 3 runs of 1 epochs on 1 thread(s)")
    assert first.endswith("--epochs 1 --seeds 0 for a smoke run")
