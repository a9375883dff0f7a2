"""examples/unet_deep_supervision.py: data, model, loss and a tiny end-to-end run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import unet_deep_supervision as ex  # noqa: E402


def test_volumes_hold_a_large_organ_and_small_lesions() -> None:
    image, labels, lesions = ex.make_set(3, 32, seed=0)
    assert image.shape == (3, 1, 32, 32, 32) and labels.shape == lesions.shape == (3, 32, 32, 32)
    for i in range(3):
        organ = int((labels[i] == 1).sum())
        assert organ > 1000  # radii 7 to 11 voxels
        ids = lesions[i].unique()
        ids = ids[ids > 0]
        assert 5 <= len(ids) <= 10
        for k in ids.tolist():
            where = (lesions[i] == k).nonzero()
            width = int((where.max(0).values - where.min(0).values).max()) + 1
            assert 1 <= width <= 5  # a few voxels wide
            assert bool((labels[i][lesions[i] == k] == 2).all())
    # lesions are brighter than the organ, the organ than the background
    means = [float(image[:, 0][labels == c].mean()) for c in range(3)]
    assert means[0] < means[1] < means[2]


def test_unet_shapes_and_decoder_taps() -> None:
    net = ex.UNet3D(width=4)
    feats = {}
    for name in ex.TAPS:
        getattr(net, name).register_forward_hook(lambda m, i, o, n=name: feats.setdefault(n, o))
    out = net(torch.randn(1, 1, 16, 16, 16))
    assert out.shape == (1, 3, 16, 16, 16)
    assert feats["dec2"].shape[2:] == (8, 8, 8) and feats["dec3"].shape[2:] == (4, 4, 4)


def test_dice_ce_on_indices_equals_its_one_hot_soft_form() -> None:
    logits = torch.randn(2, 3, 4, 4, 4)
    y = torch.randint(0, 3, (2, 4, 4, 4))
    onehot = F.one_hot(y, 3).movedim(-1, 1).float()
    torch.testing.assert_close(ex.DiceCE()(logits, y), ex.DiceCE()(logits, onehot))
    perfect = onehot * 40 - 20
    assert float(ex.DiceCE()(perfect, y)) < 1e-6


def test_metrics() -> None:
    labels = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    labels[0, 0, 0, :2] = 2
    lesions = (labels == 2).long()
    assert ex.dice(labels, labels, 2) == 1.0
    assert ex.lesion_detection(labels, lesions) == 1.0
    assert ex.lesion_detection(torch.zeros_like(labels), lesions) == 0.0


@pytest.mark.slow
def test_tiny_run_writes_results_and_figures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--steps", "2", "--train", "2", "--val", "1", "--test", "1", "--size", "16",
            "--width", "2", "--eval-every", "1", "--out", str(tmp_path)]  # fmt: skip
    result = ex.main(args)
    threads, expected = capsys.readouterr().out.splitlines()[:2]  # before any training
    assert threads.startswith("torch threads: ") and threads.endswith(")")
    assert expected.startswith("expected: about 0 s for 4 runs of 2 steps")
    assert expected.endswith("--steps 25 for a quick run")
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["test"]) == set(ex.VARIANTS)
    for row in saved["test"].values():
        assert all(0.0 <= v <= 1.0 for k in ("dice_organ", "dice_lesion") for v in row[k])
    # soft and max keep every lesion in the coarse targets; nearest loses some at 1/4
    survival = result["target_survival"]
    assert survival["soft"] == survival["max"] == {"1/2": 1.0, "1/4": 1.0}
    assert survival["nearest"]["1/4"] < 1.0
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert (tmp_path / "overlay.png").stat().st_size > 1000
    assert np.isfinite(saved["seconds"])
    # the same run split in two processes, a variant each, then combined
    parts = []
    for v in ("no DS", "DS soft"):
        parts.append(tmp_path / v.replace(" ", "_"))
        ex.main([*args[:-1], str(parts[-1]), "--variants", v])
    combined = ex.main(["--combine", *map(str, parts), "--out", str(tmp_path / "all")])
    assert list(combined["test"]) == ["no DS", "DS soft"]
    for v in ("no DS", "DS soft"):
        assert combined["test"][v]["dice_lesion"] == saved["test"][v]["dice_lesion"]
    assert (tmp_path / "all" / "overlay.png").stat().st_size > 1000
