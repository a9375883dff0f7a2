"""The evidence examples: aux_weight_sweep.py, deep_plain_net.py, and the hard synthetic VOC set."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import aux_weight_sweep  # noqa: E402
import deep_plain_net  # noqa: E402
import voc_data  # noqa: E402

TINY_VOC = [
    "--synthetic", "hard", "--synthetic-train", "4", "--synthetic-val", "2",
    "--backbone", "resnet18", "--crop-size", "33", "--batch-size", "2", "--steps-per-epoch", "1",
    "--epochs", "2", "--workers", "0", "--overlays", "0", "--device", "cpu",
]  # fmt: skip


# --------------------------------------------------------------------------- hard synthetic set


def test_hard_synthetic_set_uses_the_confusable_classes(tmp_path: Path) -> None:
    root = voc_data.generate_synthetic_voc(
        tmp_path / "hard", num_train=12, num_val=2, seed=3, difficulty="hard"
    )
    labels = sorted((root / "VOCdevkit" / "VOC2012" / "SegmentationClass").glob("*.png"))
    values: set[int] = set()
    fractions = []
    for path in labels:
        label = np.array(Image.open(path))
        values |= set(np.unique(label).tolist())
        fractions.append(float(((label != 0) & (label != 255)).mean()))
    assert values <= {0, 255, *voc_data.HARD_CLASSES}
    assert len(values - {0, 255}) >= 5
    # pairs that share colour and shape, told apart only by texture
    looks = [(c, s) for c, s, _ in voc_data.HARD_CLASSES.values()]
    assert all(looks.count(look) == 2 for look in looks)
    assert json.loads((root / "synthetic.json").read_text())["difficulty"] == "hard"
    assert np.mean(fractions) < 0.5  # small objects: mostly background


def test_hard_and_easy_sets_differ_and_are_deterministic(tmp_path: Path) -> None:
    def first_image(root: Path) -> bytes:
        return next((root / "VOCdevkit/VOC2012/JPEGImages").glob("*.jpg")).read_bytes()

    kwargs = {"num_train": 2, "num_val": 1, "seed": 1}
    a = voc_data.generate_synthetic_voc(tmp_path / "a", **kwargs, difficulty="hard")
    b = voc_data.generate_synthetic_voc(tmp_path / "b", **kwargs, difficulty="hard")
    c = voc_data.generate_synthetic_voc(tmp_path / "c", **kwargs)
    assert first_image(a) == first_image(b) != first_image(c)
    assert "difficulty" not in json.loads((c / "synthetic.json").read_text())


def test_unknown_difficulty_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"difficulty 'medium' is not one of \('easy', 'hard'\)"):
        voc_data.generate_synthetic_voc(tmp_path, difficulty="medium")


# --------------------------------------------------------------------------- sweep


def test_summary_pairs_each_seed_with_its_own_run_without_aux() -> None:
    rows = [
        {"weight": 0.0, "seed": 0, "final_miou": 10.0, "epoch_90": 4},
        {"weight": 0.0, "seed": 1, "final_miou": 20.0, "epoch_90": 2},
        {"weight": 0.4, "seed": 0, "final_miou": 13.0, "epoch_90": 3},
        {"weight": 0.4, "seed": 1, "final_miou": 21.0, "epoch_90": 3},
    ]
    lines = aux_weight_sweep.summarize(rows).splitlines()
    assert lines[2] == "| 0 | 2 | 15.00 ± 7.07 | - | 3.00 ± 1.41 | 35.82 |"
    # gains 3 and 1: mean 2, sample std sqrt(2)
    assert lines[3] == "| 0.4 | 2 | 17.00 ± 5.66 | 2.00 ± 1.41 | 3.00 ± 0.00 | 37.23 |"


@pytest.mark.parametrize("flag", ["--aux-weight", "--seed", "--out", "--resume"])
def test_sweep_owns_the_per_run_flags(flag: str) -> None:
    with pytest.raises(SystemExit):
        aux_weight_sweep.parse_args(["--", flag, "1"])


@pytest.mark.slow
def test_sweep_runs_resumes_and_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "sweep"
    argv = ["--weights", "0", "0.5", "--seeds", "0", "--jobs", "2", "--out", str(out)]
    text = aux_weight_sweep.main([*argv, "--", *TINY_VOC])
    second = capsys.readouterr().out.splitlines()[1]
    assert second.startswith("expected: 2 runs / 2 at once x one pspnet_voc.py run each")

    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["weight"], r["seed"]) for r in rows) == [("0.0", "0"), ("0.5", "0")]
    for r in rows:  # each row is the run's own last val mIoU
        run = out / f"w{float(r['weight']):g}-s{r['seed']}"
        with open(run / "metrics.csv") as f:
            history = list(csv.DictReader(f))
        assert float(r["final_miou"]) == pytest.approx(float(history[-1]["val_miou_pct"]))
        assert len(r["curve"].split()) == int(r["epochs"]) == 2
        config = json.loads((run / "results.json").read_text())["config"]
        assert config["aux_weight"] == float(r["weight"]) and config["seed"] == int(r["seed"])
        assert config["synthetic"] == "hard"
    assert "| 0.5 | 1 |" in text and "PSPNet paper" in text
    assert (out / "sweep.md").read_text() == text
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"

    logs = {p: p.read_text() for p in out.glob("*/log.txt")}
    aux_weight_sweep.main([*argv, "--", *TINY_VOC])  # everything finished: nothing reruns
    assert {p: p.read_text() for p in out.glob("*/log.txt")} == logs


# --------------------------------------------------------------------------- deep plain net


def test_plain_net_has_no_shortcut_or_normalisation() -> None:
    net = deep_plain_net.PlainNet(depth=9, width=4, activation="tanh", init_gain=1.0)
    kinds = {type(m).__name__ for m in net.modules()}
    assert kinds == {"PlainNet", "Sequential", "Conv2d", "Tanh", "MaxPool2d", "Linear"}
    assert sum(isinstance(m, torch.nn.Conv2d) for m in net.modules()) == 9
    conv = net.blocks[3][0]
    assert torch.count_nonzero(conv.bias) == 0
    assert conv.weight.std().item() == pytest.approx(1 / 6, rel=0.15)  # gain / sqrt(4 * 9)


def test_digits_split_is_fixed_and_disjoint() -> None:
    a = deep_plain_net.load_digits(12, 300)
    b = deep_plain_net.load_digits(12, 300)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    x_train, y_train, x_test, y_test = a
    assert x_train.shape == (1497, 1, 12, 12) and x_test.shape == (300, 1, 12, 12)
    assert set(y_test.tolist()) == set(range(10))


@pytest.mark.slow
def test_deep_plain_net_runs_all_variants(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--depth", "6", "--width", "4", "--epochs", "2", "--seeds", "0", "1",
            "--test-size", "200", "--size", "8", "--out", str(tmp_path)]  # fmt: skip
    result = deep_plain_net.main(argv)
    second = capsys.readouterr().out.splitlines()[1]  # after the set-up line, before training
    assert second.startswith("expected: about 3 s for 6 runs of 2 epochs on 1 thread(s)")
    assert second.endswith("--epochs 2 --seeds 0 for a quick run")
    runs = result["runs"]
    assert [(r["variant"], r["seed"]) for r in runs] == [
        (v, s) for s in (0, 1) for v in ("plain", "ds", "ds-decay")
    ]
    for r in runs:
        assert len(r["test_acc"]) == len(r["train_loss"]) == 2
        assert r["final_acc"] == r["test_acc"][-1] and 0 <= r["final_acc"] <= 1
    assert "| plain | 2 |" in result["table"] and "| ds-decay | 2 |" in result["table"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["table"] == result["table"]
    flow = (tmp_path / "gradient_flow.txt").read_text()
    assert "aux[blocks.1]" in flow and "aux[blocks.3]" in flow
    for name in ("curves.png", "gradient_flow.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_deep_plain_net_variants_start_from_the_same_network() -> None:
    args = deep_plain_net.parse_args(["--depth", "6", "--width", "4"])
    torch.manual_seed(0)
    a = deep_plain_net.PlainNet(6, 4)
    sup = deep_plain_net.wrap(a, "ds", args, total_steps=1)
    torch.manual_seed(0)
    b = deep_plain_net.PlainNet(6, 4)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert sorted(sup.taps) == ["blocks.1", "blocks.3", "blocks.4"]  # depth / 4, / 2, 3 / 4
