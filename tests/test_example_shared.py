"""examples/_shared.py: the digits and their splits, mean ± std, epochs to a level."""

from __future__ import annotations

import doctest
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import _shared  # noqa: E402
import deep_plain_net  # noqa: E402
import multi_exit_digits  # noqa: E402


def test_docstring_examples() -> None:
    result = doctest.testmod(_shared)
    assert result.attempted >= 15 and result.failed == 0


# --------------------------------------------------------------------------- statistics


def test_mean_std_is_the_sample_std() -> None:
    mean, std = _shared.mean_std([1.0, 2.0, 3.0, 4.0])
    # squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5, over n - 1 = 3
    assert mean == 2.5
    assert std == pytest.approx(math.sqrt(5 / 3), rel=1e-15)
    assert _shared.mean_std([7.0]) == (7.0, 0.0)
    mean, std = _shared.mean_std([7.0], single_std=math.nan)
    assert mean == 7.0 and math.isnan(std)
    with pytest.raises(ValueError, match=r"mean_std needs at least one value \(got none\)"):
        _shared.mean_std([])


@pytest.mark.parametrize(
    ("values", "kwargs", "text"),
    [
        ([1.0, 2.0, 3.0, 4.0], {}, "2.50 ± 1.29"),
        ([1.0, 2.0, 3.0, 4.0], {"digits": 3}, "2.500 ± 1.291"),
        ([0.25, 0.75], {"digits": 3, "single_std": None}, "0.500 ± 0.354"),  # sqrt(1/8)
        ([7.0], {}, "7.00 ± 0.00"),
        ([7.0], {"single_std": math.nan}, "7.00 ± nan"),
        ([0.1234], {"digits": 3, "single_std": None}, "0.123"),
        ([3, 3], {}, "3.00 ± 0.00"),  # ints (epochs)
        ([], {}, "-"),
    ],
    ids=["four", "digits", "two-none", "one", "one-nan", "one-alone", "ints", "empty"],
)
def test_format_mean_std(values: list[float], kwargs: dict, text: str) -> None:
    assert _shared.format_mean_std(values, **kwargs) == text


@pytest.mark.parametrize(
    ("curve", "level", "epoch"),
    [
        ([10.0, 20.0, 30.0], 27.0, 3),
        ([10.0, 28.0, 30.0], 27.0, 2),
        ([31.0, 29.0, 30.0], 27.0, 1),
        ([0.5, 0.9, 0.95], 0.9, 2),  # reaching is enough
        ([0.5, 0.6], 0.9, None),
        ([], 0.9, None),
    ],
    ids=["last", "second", "first", "equal", "never", "empty"],
)
def test_epochs_to(curve: list[float], level: float, epoch: int | None) -> None:
    assert _shared.epochs_to(curve, level) == epoch


def test_epochs_to_ninety_percent_of_the_final_value() -> None:
    """The sweep's column: the first epoch at 90% of the run's final mIoU."""
    for curve, epoch in (([10.0, 20.0, 30.0], 3), ([10.0, 28.0, 30.0], 2), ([31.0, 29.0, 30.0], 1)):
        assert _shared.epochs_to(curve, 0.9 * curve[-1]) == epoch


# --------------------------------------------------------------------------- digits


def test_upscaled_digits_are_scikit_learns() -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = _shared.upscaled_digits(8)  # 8 -> 8: bilinear without align_corners is the identity
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    torch.testing.assert_close(x[:, 0], torch.tensor(digits.images / 16.0, dtype=torch.float32))
    assert y.tolist() == digits.target.tolist()
    big, _ = _shared.upscaled_digits(16)
    assert big.shape == (1797, 1, 16, 16)
    assert float(big.min()) >= 0.0 and float(big.max()) <= 1.0  # bilinear: no overshoot


def test_permutation_split() -> None:
    train, test = _shared.permutation_split(20, 5)
    order = torch.randperm(20, generator=torch.Generator().manual_seed(1234))
    assert test.tolist() == order[:5].tolist() and train.tolist() == order[5:].tolist()
    assert sorted(train.tolist() + test.tolist()) == list(range(20))
    other, _ = _shared.permutation_split(20, 5, seed=0)
    assert other.tolist() != train.tolist()


def test_stratified_split_of_the_digits() -> None:
    _, y = _shared.upscaled_digits(8)
    split = _shared.stratified_split(y)
    assert {k: len(v) for k, v in split.items()} == {"train": 1078, "val": 359, "test": 360}
    every = np.concatenate(list(split.values()))
    assert sorted(every.tolist()) == list(range(1797))  # disjoint, and nothing left out
    shares = torch.bincount(y, minlength=10).double() / len(y)
    for indices in split.values():
        part = torch.bincount(y[indices], minlength=10).double() / len(indices)
        assert (part - shares).abs().max() < 0.01
    again = _shared.stratified_split(y)
    assert all(np.array_equal(split[k], again[k]) for k in split)
    assert not np.array_equal(split["test"], _shared.stratified_split(y, seed=1)["test"])


# --------------------------------------------------------------------------- the examples' data


def _reference_digits(size: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """The examples' loading code before it moved into _shared (kept here as the reference)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x, torch.tensor(digits.target, dtype=torch.long), digits.target


@pytest.mark.parametrize(("size", "test_size"), [(16, 497), (12, 300), (8, 200)])
def test_deep_plain_net_data_is_unchanged_bit_for_bit(size: int, test_size: int) -> None:
    x, y, _ = _reference_digits(size)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
    test, train = order[:test_size], order[test_size:]
    mu, sd = x[train].mean(), x[train].std()
    x = (x - mu) / sd
    expected = (x[train], y[train], x[test], y[test])
    for got, want in zip(deep_plain_net.load_digits(size, test_size), expected, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.parametrize(("size", "seed"), [(16, 0), (12, 3)])
def test_multi_exit_data_is_unchanged_bit_for_bit(size: int, seed: int) -> None:
    from sklearn.model_selection import train_test_split

    x, y, target = _reference_digits(size)
    x = (x - 0.3) / 0.35
    idx = np.arange(len(y))
    train, rest = train_test_split(idx, test_size=0.4, stratify=target, random_state=seed)
    val, test = train_test_split(rest, test_size=0.5, stratify=target[rest], random_state=seed)
    got = multi_exit_digits.load_digits_split(size, seed)
    assert list(got) == ["train", "val", "test"]
    for name, index in (("train", train), ("val", val), ("test", test)):
        assert torch.equal(got[name][0], x[index]) and torch.equal(got[name][1], y[index])


# --------------------------------------------------------------------------- paired statistics


@pytest.mark.parametrize("seed", range(5))
def test_paired_stats_equals_scipy_ttest_rel(seed: int) -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(seed)
    n = 3 + seed * 2
    baseline = list(rng.normal(80, 10, n))
    variant = [b + d for b, d in zip(baseline, rng.normal(1.5, 4, n))]
    s = _shared.paired_stats(variant, baseline)
    reference = stats.ttest_rel(variant, baseline)
    interval = reference.confidence_interval(0.95)
    diffs = np.subtract(variant, baseline)
    assert s.n == n and s.mean == pytest.approx(diffs.mean(), rel=1e-12)
    assert s.t == pytest.approx(reference.statistic, rel=1e-10)
    assert s.p == pytest.approx(reference.pvalue, rel=1e-8)
    assert (s.low, s.high) == pytest.approx((interval.low, interval.high), rel=1e-10)
    assert s.wins == int((diffs > 0).sum()) and s.losses == int((diffs < 0).sum())


def test_paired_stats_by_hand_and_edge_cases() -> None:
    # differences 2, 1, 4: mean 7/3, sd sqrt(7/3), t = mean / (sd / sqrt(3))
    s = _shared.paired_stats([92.0, 90.0, 95.0], [90.0, 89.0, 91.0], collapse_below=91.0)
    assert s.mean == pytest.approx(7 / 3)
    assert s.t == pytest.approx((7 / 3) / (math.sqrt(7 / 3) / math.sqrt(3)))
    half = 4.302652729911275 * math.sqrt(7 / 3) / math.sqrt(3)  # t_{0.975, 2}
    assert (s.low, s.high) == pytest.approx((7 / 3 - half, 7 / 3 + half))
    assert (s.collapsed, s.baseline_collapsed) == (1, 2)  # 90 < 91; 90, 89 < 91
    same = _shared.paired_stats([2.0, 3.0], [1.0, 2.0])  # every difference +1
    assert same.t == math.inf and same.p == 0.0 and same.low == same.high == 1.0
    one = _shared.paired_stats([2.0], [1.0])
    assert one.mean == 1.0 and math.isnan(one.t) and math.isnan(one.low)
    with pytest.raises(ValueError, match=r"one value per seed for both.*got 2 and 1"):
        _shared.paired_stats([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match=r"got 0 and 0"):
        _shared.paired_stats([], [])


def test_paired_table_rows_and_stats() -> None:
    text = _shared.paired_table(
        [7, 8, 9],
        {"plain": [50.0, 60.0, 10.0], "ds": [55.0, 50.0, 12.0]},
        "plain",
        collapse_below=20.0,
    )
    lines = text.splitlines()
    assert lines[2:5] == ["| 7 | 50.00 | 55.00 (+5.00) |", "| 8 | 60.00 | 50.00 (-10.00) |",
                          "| 9 | 10.00* | 12.00* (+2.00) |"]  # fmt: skip
    s = _shared.paired_stats([55.0, 50.0, 12.0], [50.0, 60.0, 10.0], collapse_below=20.0)
    assert lines[-1].startswith(f"| ds | {s.mean:+.2f} [{s.low:+.2f}, {s.high:+.2f}]")
    assert lines[-1].endswith("| 2/3 | 1 (plain 1) |")
    with pytest.raises(ValueError, match="baseline 'none' is not among the results"):
        _shared.paired_table([0], {"a": [1.0]}, "none")


def test_parse_seeds() -> None:
    assert _shared.parse_seeds(["100-102", "5", 3]) == [100, 101, 102, 5, 3]
    for bad in ("5-3", "x", "1-"):
        with pytest.raises(ValueError, match=r"--seeds takes integers and ranges A-B"):
            _shared.parse_seeds([bad])


def test_examples_take_a_seed_range() -> None:
    args = deep_plain_net.parse_args(["--seeds", "100-102", "7"])
    assert args.seeds == [100, 101, 102, 7]
    with pytest.raises(SystemExit):
        deep_plain_net.parse_args(["--seeds", "9-3"])


def test_deep_plain_net_paired_report_pairs_by_seed() -> None:
    runs = [{"variant": v, "seed": s, "final_acc": a}
            for v, s, a in [("plain", 3, 0.5), ("ds", 3, 0.6), ("plain", 4, 0.9),
                            ("ds", 4, 0.15), ("plain", 5, 0.7)]]  # fmt: skip
    text = deep_plain_net.paired_report(runs)  # seed 5 has no ds run: left out
    s = _shared.paired_stats([60.0, 15.0], [50.0, 90.0], collapse_below=20.0)
    assert "| 5 |" not in text and "| 4 | 90.00 | 15.00* (-75.00) |" in text
    assert text.splitlines()[-1].startswith(f"| ds | {s.mean:+.2f} [{s.low:+.2f}, {s.high:+.2f}]")
    assert text.splitlines()[-1].endswith("| 1/2 | 1 (plain 0) |")
