"""Measuring and choosing early exits: cost tables, the threshold search, the default metric.

Private helpers of :mod:`deepsup.exits` (which re-exports the public names); nothing here runs
a model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ._errors import ConfigError, ConfigTypeError, call_user

__all__ = ["ExitCosts", "ExitRow", "ExitTable", "search_thresholds", "top1"]

OUTPUT = "output"

# Internal per-call settings besides float thresholds, used to measure each exit's cost.
_STOP = "stop"  # stop at this tap without running its head
_NEVER = "never"  # run the head, never exit
_ALWAYS = "always"  # run the head, always exit


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    """(B,) or (B, *spatial) -> (B,): dense predictions average over positions."""
    return values.flatten(1).mean(1) if values.dim() > 1 else values


@dataclass(frozen=True)
class ExitRow:
    """One exit of an :class:`ExitTable`: its threshold and what the samples leaving there got.

    ``flops`` and ``time_s`` are per sample for a sample that leaves at this exit (the model up
    to the tap plus the heads evaluated on the way); ``accuracy`` is over the samples that
    leave here (NaN if none does).

    Example:
        >>> ExitRow("layer2", 0.8, share=0.5, accuracy=0.99, flops=4e6, time_s=1e-3).share
        0.5
    """

    exit: str
    threshold: float
    share: float
    accuracy: float
    flops: float
    time_s: float


@dataclass(frozen=True)
class ExitTable:
    """What :meth:`EarlyExit.calibrate` and :meth:`EarlyExit.evaluate` measured.

    Attributes:
        rows: one :class:`ExitRow` per exit in execution order, the model's output last.
        accuracy: the early-exit accuracy over all samples.
        flops: mean FLOPs per sample with early exit.
        time_s: mean wall time per sample with early exit.
        full_accuracy: the model's output alone (no exit).
        full_flops: FLOPs per sample of the model alone.
        full_time_s: wall time per sample of the model alone.
        samples: the number of samples.
        thresholds: the thresholds it was measured at.

    Example:
        >>> row = ExitRow("layer2", 0.8, share=1.0, accuracy=0.9, flops=4e6, time_s=1e-3)
        >>> t = ExitTable([row], 0.9, 4e6, 1e-3, 0.95, 6e6, 2e-3, samples=10)
        >>> print(str(t).splitlines()[2])
        | layer2 | 0.8 | 100.0% | 90.00% | 4.000 | 1.000 |
    """

    rows: list[ExitRow]
    accuracy: float
    flops: float
    time_s: float
    full_accuracy: float
    full_flops: float
    full_time_s: float
    samples: int
    thresholds: dict[str, float] = field(default_factory=dict)

    def to_rows(self) -> list[dict[str, Any]]:
        """The rows as dicts (for csv/json), then a ``"total"`` row and a ``"full model"`` row."""
        rows = [dict(r.__dict__) for r in self.rows]
        rows.append(
            {"exit": "total", "threshold": math.nan, "share": 1.0, "accuracy": self.accuracy,
             "flops": self.flops, "time_s": self.time_s}
        )  # fmt: skip
        rows.append(
            {"exit": "full model", "threshold": math.nan, "share": 1.0,
             "accuracy": self.full_accuracy, "flops": self.full_flops,
             "time_s": self.full_time_s}
        )  # fmt: skip
        return rows

    def __str__(self) -> str:
        lines = [
            "| exit | threshold | share | accuracy | MFLOPs/sample | ms/sample |",
            "|---|---|---|---|---|---|",
        ]
        for r in self.to_rows():
            thr = "" if math.isnan(r["threshold"]) else f"{r['threshold']:.4g}"
            acc = "-" if math.isnan(r["accuracy"]) else f"{100 * r['accuracy']:.2f}%"
            lines.append(
                f"| {r['exit']} | {thr} | {100 * r['share']:.1f}% | {acc} | "
                f"{r['flops'] / 1e6:.3f} | {1e3 * r['time_s']:.3f} |"
            )
        return "\n".join(lines)


def top1(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample accuracy ``(B,)``: argmax over dim 1 equals the target.

    Dense predictions ``(B, K, *spatial)`` give each sample's pixel accuracy, the prediction
    upsampled (nearest) to the target's size if they differ.

    Example:
        >>> top1(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1]))
        tensor([1., 0.])
    """
    if prediction.dim() > 2 and prediction.shape[2:] != target.shape[1:]:
        prediction = F.interpolate(prediction.float(), size=tuple(target.shape[1:]))
    return _per_sample((prediction.argmax(1) == target).float())


def _split(batch: Any) -> tuple[tuple[Any, ...], dict[str, Any], Any]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ConfigTypeError(
            f"the loader must yield (input, target) pairs (got {type(batch).__name__}"
            f"{f' of length {len(batch)}' if isinstance(batch, (tuple, list)) else ''})"
        )
    x, y = batch
    if isinstance(x, Mapping):
        return (), dict(x), y
    if isinstance(x, tuple):
        return x, {}, y
    return (x,), {}, y


def _first_sample(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x[:1]
    if isinstance(x, Mapping):
        return {k: _first_sample(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_first_sample(v) for v in x)
    return x


def score_of(metric: Any, pred: Any, target: Any, name: str) -> torch.Tensor:
    """``metric(pred, target)``, checked; a user's exception gets the exit in a note."""
    note = f"deepsup: raised in the metric of exit {name!r}"
    return _check_score(call_user(metric, pred, target, note=lambda: note), pred, name)


def _check_score(score: Any, pred: Any, name: str) -> torch.Tensor:
    if not isinstance(score, torch.Tensor) or score.dim() != 1:
        got = tuple(score.shape) if isinstance(score, torch.Tensor) else type(score).__name__
        raise ConfigError(
            f"exit {name!r}: metric(prediction, target) must return one score per sample, a "
            f"1-d tensor (got {got})"
        )
    return score


@dataclass(frozen=True)
class ExitCosts:
    """Measured FLOPs: ``prefix`` up to each tap (no head), each ``head``, the ``full`` model.

    ``order`` is the taps' execution order. :meth:`EarlyExit.costs` measures them.

    Example:
        >>> c = ExitCosts(["a", "b"], prefix={"a": 10, "b": 40}, head={"a": 2, "b": 3}, full=90)
        >>> c.path_flops("b", {"a": 0.9, "b": 0.9})  # up to b, a's head, b's head
        45
    """

    order: list[str]
    prefix: dict[str, int]
    head: dict[str, int]
    full: int

    def path(self, exit_name: str, thresholds: Mapping[str, float]) -> dict[str, Any]:
        """Per-call settings that leave at ``exit_name`` running the heads that ``thresholds``
        turn on before it."""
        stop = len(self.order) if exit_name == OUTPUT else self.order.index(exit_name)
        path: dict[str, Any] = {
            e: _NEVER for e in self.order[:stop] if thresholds.get(e, math.inf) < math.inf
        }
        if exit_name != OUTPUT:
            path[exit_name] = _ALWAYS
        return path

    def path_flops(self, exit_name: str, thresholds: Mapping[str, float]) -> int:
        """FLOPs of leaving at ``exit_name``: the model up to it and the heads run on the way."""
        path = self.path(exit_name, thresholds)
        heads = sum(self.head[e] for e in path)
        base = self.full if exit_name == OUTPUT else self.prefix[exit_name]
        return base + heads


def _simulate(conf: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Index of the exit each sample takes (``len(thresholds)``: the output)."""
    fired = conf >= thresholds[:, None]
    fired = torch.cat([fired, torch.ones_like(fired[:1])])
    return fired.float().argmax(0)


def search_thresholds(
    conf: torch.Tensor,
    score: torch.Tensor,
    costs: ExitCosts,
    *,
    max_drop: float,
    grid: int = 64,
    passes: int = 10,
) -> dict[str, float]:
    """Coordinate descent for per-exit thresholds: least mean FLOPs within ``max_drop``.

    ``conf`` is ``(exits, N)`` in execution order, ``score`` ``(exits + 1, N)`` with the
    model's output last. Candidates per exit: ``grid`` quantiles of its confidences and
    ``inf`` (off). Starting from all exits off (the model alone, always feasible), each pass
    sets each exit in turn to its cheapest feasible candidate (ties: the higher threshold),
    until a pass changes nothing.

    Example:
        >>> conf = torch.tensor([[0.9, 0.2, 0.8, 0.1]], dtype=torch.float64)  # 1 exit
        >>> score = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
        >>> costs = ExitCosts(["a"], prefix={"a": 10}, head={"a": 1}, full=100)
        >>> search_thresholds(conf, score, costs, max_drop=0.0)
        {'a': 0.8}
    """
    k, _ = conf.shape
    floor = float(score[-1].mean()) - max_drop - 1e-9
    qs = torch.linspace(0, 1, grid, dtype=torch.float64)
    candidates = [
        [*sorted(set(torch.quantile(conf[i].double(), qs).tolist())), math.inf] for i in range(k)
    ]
    prefix = torch.tensor([float(costs.prefix[e]) for e in costs.order] + [float(costs.full)])
    head = torch.tensor([float(costs.head[e]) for e in costs.order] + [0.0])

    def evaluate(t: list[float]) -> tuple[float, float]:
        thr = torch.tensor(t, dtype=torch.float64)
        exits = _simulate(conf.double(), thr)
        acc = float(score.gather(0, exits[None]).mean())
        on = torch.tensor([x < math.inf for x in t] + [False])
        # heads run on the way: every enabled exit before the one taken, and that one
        before = torch.cumsum(head * on, 0) - head * on
        cost = prefix[exits] + before[exits] + head[exits]
        return acc, float(cost.mean())

    current = [math.inf] * k
    best_cost = evaluate(current)[1]
    for _ in range(passes):
        changed = False
        for i in range(k):
            choice = current[i]
            for c in sorted(candidates[i], reverse=True):
                trial = [*current[:i], c, *current[i + 1 :]]
                acc, cost = evaluate(trial)
                if acc >= floor and cost < best_cost - 1e-9:
                    choice, best_cost = c, cost
            if choice != current[i]:
                current[i] = choice
                changed = True
        if not changed:
            break
    return dict(zip(costs.order, current))
