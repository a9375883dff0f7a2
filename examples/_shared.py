"""What the examples share: the handwritten digits and their fixed splits, statistics over seeds,
and CPU threads that do not oversubscribe a shared machine.

The examples import it as a sibling module (``from _shared import ...``), as they import
``voc_data``: ``python examples/NAME.py`` works from any folder, and a test or a benchmark puts
``examples/`` on ``sys.path`` first. (Not ``_common``: ``benchmarks/_common.py`` has that name,
and the benchmarks import the examples.)
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "Paired",
    "about",
    "epochs_to",
    "format_mean_std",
    "format_paired",
    "free_cpus",
    "load_average",
    "mean_std",
    "paired_stats",
    "paired_table",
    "parse_seeds",
    "permutation_split",
    "set_threads",
    "stratified_split",
    "upscaled_digits",
    "usable_cpus",
]


# --------------------------------------------------------------------------- digits


def upscaled_digits(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 handwritten digits (8x8 scans that ship with it: no download).

    Args:
        size: the side the images are upscaled to (bilinear, ``align_corners=False``).

    Returns:
        The images, ``(1797, 1, size, size)`` float32 in [0, 1], and the labels, ``(1797,)``
        int64 in [0, 9], in scikit-learn's order.

    Example:
        >>> x, y = upscaled_digits(12)
        >>> x.shape, y.shape, x.dtype, y.dtype
        (torch.Size([1797, 1, 12, 12]), torch.Size([1797]), torch.float32, torch.int64)
        >>> 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        True
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x, torch.tensor(digits.target, dtype=torch.long)


def permutation_split(
    n: int, test_size: int, *, seed: int = 1234
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and test indices of ``range(n)``: one fixed random permutation, its first
    ``test_size`` entries the test set (``deep_plain_net.py``'s split).

    Returns:
        ``(train, test)``, int64 index tensors, in the permutation's order.

    Example:
        >>> train, test = permutation_split(10, 3)
        >>> len(train), len(test), sorted(train.tolist() + test.tolist()) == list(range(10))
        (7, 3, True)
        >>> torch.equal(test, permutation_split(10, 3)[1])  # fixed by the seed
        True
    """
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[test_size:], order[:test_size]


def stratified_split(labels: torch.Tensor, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Train, val and test indices, 60/20/20, each with the classes in the shares of ``labels``
    (``multi_exit_digits.py``'s split): scikit-learn's ``train_test_split`` holds out 40%, then
    halves it.

    Returns:
        ``{"train": indices, "val": indices, "test": indices}``, int64 arrays.

    Example:
        >>> labels = torch.arange(10).repeat(10)  # ten of each class
        >>> split = stratified_split(labels)
        >>> {name: len(indices) for name, indices in split.items()}
        {'train': 60, 'val': 20, 'test': 20}
        >>> torch.bincount(labels[split["test"]]).tolist()  # two of each class
        [2, 2, 2, 2, 2, 2, 2, 2, 2, 2]
    """
    from sklearn.model_selection import train_test_split

    y = labels.numpy()
    index = np.arange(len(y))
    train, rest = train_test_split(index, test_size=0.4, stratify=y, random_state=seed)
    val, test = train_test_split(rest, test_size=0.5, stratify=y[rest], random_state=seed)
    return {"train": train, "val": val, "test": test}


# --------------------------------------------------------------------------- statistics


def mean_std(values: Sequence[float], *, single_std: float = 0.0) -> tuple[float, float]:
    """The mean and the sample standard deviation (``n - 1``) of ``values``, e.g. one per seed.

    Args:
        values: at least one number.
        single_std: the standard deviation given for a single value, where none can be measured
            (``math.nan`` says so).

    Raises:
        ValueError: ``values`` is empty.

    Example:
        >>> mean_std([90.0, 92.0])
        (91.0, 1.4142135623730951)
        >>> mean_std([90.0]), mean_std([90.0], single_std=math.nan)
        ((90.0, 0.0), (90.0, nan))
    """
    if not values:
        raise ValueError("mean_std needs at least one value (got none)")
    spread = statistics.stdev(values) if len(values) > 1 else single_std
    return statistics.mean(values), spread


def format_mean_std(
    values: Sequence[float], digits: int = 2, *, single_std: float | None = 0.0
) -> str:
    """``"mean ± std"`` (:func:`mean_std`) with ``digits`` decimals; ``"-"`` for no values.

    Args:
        values: the numbers.
        digits: decimals of both numbers.
        single_std: the standard deviation shown for a single value (``math.nan``: ``"nan"``),
            or ``None`` to show a single value alone, without ``±``.

    Example:
        >>> format_mean_std([90.0, 92.0])
        '91.00 ± 1.41'
        >>> format_mean_std([0.5], 3, single_std=None), format_mean_std([0.5], single_std=math.nan)
        ('0.500', '0.50 ± nan')
        >>> format_mean_std([])
        '-'
    """
    if not values:
        return "-"
    if len(values) == 1 and single_std is None:
        return f"{values[0]:.{digits}f}"
    mean, std = mean_std(values, single_std=math.nan if single_std is None else single_std)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def epochs_to(curve: Sequence[float], level: float) -> int | None:
    """The first epoch (1-based) at which ``curve`` (one value per epoch) reaches ``level``.

    Returns:
        The epoch, or None when the curve never reaches ``level``.

    Example:
        >>> epochs_to([0.5, 0.85, 0.93, 0.91], 0.9)
        3
        >>> curve = [10.0, 28.0, 30.0]
        >>> epochs_to(curve, 0.9 * curve[-1])  # 90% of the final value
        2
        >>> print(epochs_to([0.5, 0.6], 0.9))
        None
    """
    return next((i + 1 for i, v in enumerate(curve) if v >= level), None)


# --------------------------------------------------------------------------- paired statistics


@dataclass(frozen=True)
class Paired:
    """A variant against a baseline over the same seeds (:func:`paired_stats`).

    Attributes:
        n: the seeds (pairs).
        mean: the mean of the per-seed differences, variant - baseline.
        low, high: its 95% t-interval (``mean -+ t_{0.975, n-1} sd / sqrt(n)``); nan for n < 2.
        t: the paired t statistic, ``mean / (sd / sqrt(n))`` (scipy's ``ttest_rel``); nan for
            n < 2, +-inf when every difference is the same non-zero number.
        p: its two-sided p-value, n - 1 degrees of freedom.
        wins: seeds where the variant is above the baseline (``losses``: below).
        collapsed: runs of the variant below ``collapse_below`` (0 when none was given).
        baseline_collapsed: runs of the baseline below it.
    """

    n: int
    mean: float
    low: float
    high: float
    t: float
    p: float
    wins: int
    losses: int
    collapsed: int
    baseline_collapsed: int


def paired_stats(
    variant: Sequence[float], baseline: Sequence[float], *, collapse_below: float | None = None
) -> Paired:
    """The paired difference of ``variant`` and ``baseline``, one value each per seed, in the
    same seed order: mean, 95% t-interval, paired t and its p-value, wins and collapsed runs.

    Args:
        variant: one result per seed (e.g. the final test accuracy).
        baseline: the baseline's result on the same seeds.
        collapse_below: a run whose result is below it has collapsed (e.g. twice chance).

    Raises:
        ValueError: the two have different lengths, or none.

    Example:
        >>> s = paired_stats([92.0, 90.0, 95.0], [90.0, 89.0, 91.0], collapse_below=20.0)
        >>> s.mean, round(s.low, 2), round(s.high, 2), round(s.t, 3), s.wins, s.collapsed
        (2.3333333333333335, -1.46, 6.13, 2.646, 3, 0)
        >>> print(format_paired(s))
        +2.33 [-1.46, +6.13], t = 2.65 (p 0.118), wins 3/3
    """
    from scipy import stats

    if len(variant) != len(baseline) or not variant:
        raise ValueError(
            f"paired_stats needs one value per seed for both, in the same order (got "
            f"{len(variant)} and {len(baseline)}); pass the variant's and the baseline's results "
            "on the same seeds"
        )
    diffs = [float(a) - float(b) for a, b in zip(variant, baseline)]
    n = len(diffs)
    mean = statistics.fmean(diffs)
    low = high = t = p = math.nan
    if n > 1:
        sd = statistics.stdev(diffs)
        half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
        low, high = mean - half, mean + half
        if sd > 0:
            t = mean / (sd / math.sqrt(n))
            p = float(2 * stats.t.sf(abs(t), n - 1))
        elif mean != 0:
            t, p = math.copysign(math.inf, mean), 0.0
    below = (lambda v: v < collapse_below) if collapse_below is not None else (lambda v: False)
    return Paired(
        n=n,
        mean=mean,
        low=low,
        high=high,
        t=t,
        p=p,
        wins=sum(d > 0 for d in diffs),
        losses=sum(d < 0 for d in diffs),
        collapsed=sum(below(v) for v in variant),
        baseline_collapsed=sum(below(v) for v in baseline),
    )


def format_paired(s: Paired, digits: int = 2) -> str:
    """One line: ``"+mean [low, high], t = T (p P), wins W/N"``, and the collapsed runs when any.

    Example:
        >>> print(format_paired(paired_stats([10.0, 95.0], [90.0, 91.0], collapse_below=20.0)))
        -38.00 [-571.66, +495.66], t = -0.90 (p 0.532), wins 1/2, collapsed 1 (baseline 0)
    """
    text = (
        f"{s.mean:+.{digits}f} [{s.low:+.{digits}f}, {s.high:+.{digits}f}], "
        f"t = {s.t:.2f} (p {s.p:.3g}), wins {s.wins}/{s.n}"
    )
    if s.collapsed or s.baseline_collapsed:
        text += f", collapsed {s.collapsed} (baseline {s.baseline_collapsed})"
    return text


def paired_table(
    seeds: Sequence[int],
    results: Mapping[str, Sequence[float]],
    baseline: str,
    *,
    digits: int = 2,
    collapse_below: float | None = None,
) -> str:
    """A Markdown table: one row per seed with every variant's result and its difference to the
    baseline on that seed, then one row per variant with the paired statistics.

    Args:
        seeds: the seeds, in the order of the results.
        results: per variant, one result per seed (the baseline among them).
        baseline: the variant every other one is compared with.
        digits: decimals.
        collapse_below: a result below it counts as a collapsed run (marked ``*``).

    Example:
        >>> print(paired_table([0, 1], {"plain": [90.0, 10.0], "ds": [92.0, 91.0]}, "plain",
        ...                    collapse_below=20.0))
        | seed | plain | ds |
        |---:|---:|---:|
        | 0 | 90.00 | 92.00 (+2.00) |
        | 1 | 10.00* | 91.00 (+81.00) |
        <BLANKLINE>
        | variant - plain | mean [95% CI] | paired t (p) | wins | collapsed runs |
        |---|---:|---:|---:|---:|
        | ds | +41.50 [-460.40, +543.40] | 1.05 (p 0.484) | 2/2 | 0 (plain 1) |
    """
    if baseline not in results:
        raise ValueError(
            f"paired_table: the baseline {baseline!r} is not among the results "
            f"({sorted(results)}); pass one of them"
        )

    def cell(v: float) -> str:
        star = "*" if collapse_below is not None and v < collapse_below else ""
        return f"{v:.{digits}f}{star}"

    names = list(results)
    lines = ["| seed | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    base = results[baseline]
    for i, seed in enumerate(seeds):
        cells = [
            cell(results[v][i])
            + ("" if v == baseline else f" ({results[v][i] - base[i]:+.{digits}f})")
            for v in names
        ]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"| variant - {baseline} | mean [95% CI] | paired t (p) | wins | collapsed runs |",
        "|---|---:|---:|---:|---:|",
    ]
    for v in names:
        if v == baseline:
            continue
        s = paired_stats(results[v], base, collapse_below=collapse_below)
        lines.append(
            f"| {v} | {s.mean:+.{digits}f} [{s.low:+.{digits}f}, {s.high:+.{digits}f}] "
            f"| {s.t:.2f} (p {s.p:.3g}) | {s.wins}/{s.n} | "
            + (
                "- |"
                if collapse_below is None
                else f"{s.collapsed} ({baseline} {s.baseline_collapsed}) |"
            )
        )
    return "\n".join(lines)


def parse_seeds(tokens: Sequence[str | int]) -> list[int]:
    """``--seeds`` as the examples take it: integers and inclusive ranges ``A-B``, in order.

    Raises:
        ValueError: a token is neither, or a range runs backwards.

    Example:
        >>> parse_seeds(["0", "100-103", 7])
        [0, 100, 101, 102, 103, 7]
    """
    seeds: list[int] = []
    for token in tokens:
        text = str(token).strip()
        first, dash, last = text.partition("-")
        try:
            if dash and first:
                low, high = int(first), int(last)
                if high < low:
                    raise ValueError
                seeds += range(low, high + 1)
            else:
                seeds.append(int(text))
        except ValueError:
            raise ValueError(
                f"--seeds takes integers and ranges A-B with A <= B (got {text!r}); "
                "e.g. --seeds 0 1 2 or --seeds 100-109"
            ) from None
    return seeds


# --------------------------------------------------------------------------- CPU threads

# More torch threads than free cores make every parallel op wait for a thread that is not
# running: on the project's shared 2-core machine at load average 2, examples/minimal.py took
# 23 s with two threads and 8 s with one. The examples call set_threads once at start;
# --threads N (or OMP_NUM_THREADS) overrides the default.


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def load_average() -> float | None:
    """The 1-minute load average; None where the OS has none (Windows)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def free_cpus() -> int:
    """The usable CPUs less the 1-minute load average (rounded), at least 1.

    The load average counts the processes running or waiting to run, so ``cpus - load`` is
    what other work leaves free. Without a load average every usable CPU counts as free.
    """
    cpus = usable_cpus()
    return max(1, min(cpus, round(cpus - (load_average() or 0.0))))


def set_threads(threads: int | None) -> str:
    """Set torch's threads and return one line saying how many and why.

    ``threads`` is ``--threads``; ``None`` keeps ``OMP_NUM_THREADS`` where it is set (torch
    read it at import), else takes :func:`free_cpus`, shared among the processes that
    ``torchrun`` started on this machine (``LOCAL_WORLD_SIZE``).
    """
    if threads is not None:
        reason = "--threads"
    elif os.environ.get("OMP_NUM_THREADS"):
        threads = torch.get_num_threads()
        reason = "OMP_NUM_THREADS"
    else:
        free = free_cpus()
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        threads = max(1, free // local)
        load = load_average()
        shown = "unknown" if load is None else f"{load:.1f}"
        reason = f"{free} of {usable_cpus()} CPUs free at load average {shown}"
        if local > 1:
            reason += f", shared by {local} processes"
        reason += "; --threads N to change"
    torch.set_num_threads(threads)
    return f"torch threads: {threads} ({reason})"


def about(seconds: float) -> str:
    """A run time as the start-up lines give it: seconds below 90 s, else minutes."""
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"
