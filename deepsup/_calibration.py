"""Measuring and choosing early exits: costs, calibration and evaluation of an
:class:`~deepsup.EarlyExit`, the threshold search, the result tables, the default metric.

The measurement half of :mod:`deepsup.exits` (which re-exports the public names and keeps the
mechanics: hooks, the stopped forward).
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ._capture import as_call
from ._checks import call_user, check_int, check_number
from ._config import OUTPUT
from ._layout import Layout, channels_first, spatial_size
from .errors import ConfigError, ConfigTypeError, EarlyExitError
from .functional import (
    _per_sample,
    confidence,
    expected_calibration_error,
    fit_temperature,
    upsample,
)

if TYPE_CHECKING:
    from .exits import EarlyExit

__all__ = [
    "ExitCosts",
    "ExitRow",
    "ExitTable",
    "calibrate",
    "evaluate",
    "measure_costs",
    "search_thresholds",
    "top1",
]

# Internal per-call settings besides float thresholds, used to measure each exit's cost.
_STOP = "stop"  # stop at this tap without running its head
_NEVER = "never"  # run the head, never exit
_ALWAYS = "always"  # run the head, always exit


@dataclass(frozen=True)
class ExitRow:
    """One exit of an :class:`ExitTable`: its threshold and what the samples leaving there got.

    ``flops`` and ``time_s`` are per sample for a sample that leaves at this exit (the model up
    to the tap plus the heads evaluated on the way); ``accuracy`` is over the samples that
    leave here (NaN if none does). With ``calibrate(temperature=True)``: the exit's fitted
    ``temperature`` and its expected calibration error on the calibration data before
    (``T = 1``) and after.

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
    temperature: float = 1.0
    ece_before: float = math.nan
    ece: float = math.nan


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
            {
                "exit": "total",
                "threshold": math.nan,
                "share": 1.0,
                "accuracy": self.accuracy,
                "flops": self.flops,
                "time_s": self.time_s,
            }
        )
        rows.append(
            {
                "exit": "full model",
                "threshold": math.nan,
                "share": 1.0,
                "accuracy": self.full_accuracy,
                "flops": self.full_flops,
                "time_s": self.full_time_s,
            }
        )
        return rows

    def __str__(self) -> str:
        ece = any(not math.isnan(r.ece) for r in self.rows)
        lines = [
            "| exit | threshold | share | accuracy | MFLOPs/sample | ms/sample |"
            + (" temperature | ECE before / after |" if ece else ""),
            "|---|---|---|---|---|---|" + ("---|---|" if ece else ""),
        ]
        for r in self.to_rows():
            thr = "" if math.isnan(r["threshold"]) else f"{r['threshold']:.4g}"
            acc = "-" if math.isnan(r["accuracy"]) else f"{100 * r['accuracy']:.2f}%"
            line = (
                f"| {r['exit']} | {thr} | {100 * r['share']:.1f}% | {acc} | "
                f"{r['flops'] / 1e6:.3f} | {1e3 * r['time_s']:.3f} |"
            )
            if ece:
                cal = r.get("ece", math.nan)
                line += (
                    "  |  |"
                    if math.isnan(cal)
                    else f" {r['temperature']:.3g} | {100 * r['ece_before']:.2f}% / "
                    f"{100 * cal:.2f}% |"
                )
            lines.append(line)
        return "\n".join(lines)


def top1(
    prediction: torch.Tensor, target: torch.Tensor, *, layout: Layout = "NCHW"
) -> torch.Tensor:
    """Per-sample accuracy ``(B,)``: the argmax over the class axis equals the target.

    Dense predictions give each sample's pixel (or token) accuracy, the prediction upsampled
    (nearest) to the target's size if they differ. A single logit is binary: ``z > 0``.

    Example:
        >>> top1(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1]))
        tensor([1., 0.])
        >>> top1(torch.tensor([[[0.1, 0.9], [0.8, 0.2]]]), torch.tensor([[1, 1]]), layout="NHWC")
        tensor([0.5000])
    """
    size = tuple(target.shape[1:])
    if prediction.dim() > 2 and spatial_size(prediction, layout) != size:
        prediction = upsample(prediction.float(), size, layout=layout, interpolation="nearest")
    x = channels_first(prediction, layout)
    guess = (x[:, 0] > 0).long() if x.dim() >= 2 and x.shape[1] == 1 else x.argmax(1)
    return _per_sample((guess == target).float())


def _split(batch: Any) -> tuple[tuple[Any, ...], dict[str, Any], Any]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ConfigTypeError(
            f"the loader must yield (input, target) pairs (got {type(batch).__name__}"
            f"{f' of length {len(batch)}' if isinstance(batch, (tuple, list)) else ''})"
        )
    x, y = batch
    args, kwargs = as_call(x)
    return args, kwargs, y


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
    max_drop: float | None = None,
    budget: float | None = None,
    grid: int = 64,
    passes: int = 10,
) -> dict[str, float]:
    """Coordinate descent for per-exit thresholds: least mean FLOPs within ``max_drop``, or
    (``budget``) the best accuracy within ``budget`` times the model's FLOPs per sample.

    ``conf`` is ``(exits, N)`` in execution order, ``score`` ``(exits + 1, N)`` with the
    model's output last. Candidates per exit: ``grid`` quantiles of its confidences and
    ``inf`` (off). ``max_drop``: starting from all exits off (the model alone, always
    feasible), each pass sets each exit in turn to its cheapest feasible candidate (ties: the
    higher threshold), until a pass changes nothing. ``budget``: starting from every sample
    leaving at the first exit (threshold ``-inf``, the cheapest path; a budget below it is
    refused), each pass sets each exit in turn to its most accurate candidate within the
    budget (ties: the cheaper), until a pass changes nothing.

    Example:
        >>> conf = torch.tensor([[0.9, 0.2, 0.8, 0.1]], dtype=torch.float64)  # 1 exit
        >>> score = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
        >>> costs = ExitCosts(["a"], prefix={"a": 10}, head={"a": 1}, full=100)
        >>> search_thresholds(conf, score, costs, max_drop=0.0)
        {'a': 0.8}
    """
    k, _ = conf.shape
    if (max_drop is None) == (budget is None):
        raise ConfigError(
            f"pass one of max_drop= and budget= (got max_drop={max_drop!r}, budget={budget!r})"
        )
    qs = torch.linspace(0, 1, grid, dtype=torch.float64)
    candidates = []
    for i in range(k):  # a NaN confidence never exits; it is no candidate either
        finite = conf[i].double()
        finite = finite[~finite.isnan()]
        found = torch.quantile(finite, qs).tolist() if finite.numel() else []
        candidates.append([*sorted(set(found)), math.inf])
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

    if budget is not None:
        limit = budget * costs.full
        return dict(zip(costs.order, _within_budget(evaluate, candidates, limit, passes)))
    floor = float(score[-1].mean()) - (max_drop or 0.0) - 1e-9
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


def _within_budget(
    evaluate: Callable[[list[float]], tuple[float, float]],
    candidates: list[list[float]],
    limit: float,
    passes: int,
) -> list[float]:
    """The budget search of :func:`search_thresholds`: most accurate within ``limit`` FLOPs."""
    k = len(candidates)
    current = [-math.inf] + [math.inf] * (k - 1)  # every sample leaves at the first exit
    best_acc, best_cost = evaluate(current)
    if best_cost > limit + 1e-9:
        raise ConfigError(
            f"budget allows {limit:.4g} FLOPs per sample, but the cheapest early exit (every "
            f"sample at the first exit) costs {best_cost:.4g}; raise the budget"
        )
    for _ in range(passes):
        changed = False
        for i in range(k):
            choice = current[i]
            for c in [-math.inf, *candidates[i]]:
                acc, cost = evaluate([*current[:i], c, *current[i + 1 :]])
                gain = acc > best_acc + 1e-12
                cheaper = acc >= best_acc - 1e-12 and cost < best_cost - 1e-9
                if cost <= limit + 1e-9 and (gain or cheaper):
                    choice, best_acc, best_cost = c, acc, cost
            if choice != current[i]:
                current[i] = choice
                changed = True
        if not changed:
            break
    return current


# ----------------------------------------------------------------------- measuring an EarlyExit


def _flops(
    early: EarlyExit, call: tuple[tuple[Any, ...], dict[str, Any]], thr: Mapping[str, Any]
) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        early._run(*call, thr)
    return int(counter.get_total_flops())


def _seconds(
    early: EarlyExit,
    call: tuple[tuple[Any, ...], dict[str, Any]],
    thr: Mapping[str, Any],
    runs: int,
) -> float:
    early._run(*call, thr)  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        early._run(*call, thr)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_costs(early: EarlyExit, args: tuple[Any, ...], kwargs: dict[str, Any]) -> ExitCosts:
    """:meth:`EarlyExit.costs`: the forward stopped at each tap with and without its head, and
    the model alone, under ``FlopCounterMode``."""
    call = (args, kwargs)
    order = early._run(args, kwargs, dict.fromkeys(early.exits, _NEVER))[2]
    missing = [e for e in early.exits if e not in order]
    if missing:
        raise EarlyExitError(
            f"exits {missing} did not run in an eval forward, so they cannot be exits; "
            "leave them out of the thresholds or tap modules that run in eval"
        )
    prefix = {e: _flops(early, call, {e: _STOP}) for e in order}
    head = {e: _flops(early, call, {e: _ALWAYS}) - prefix[e] for e in order}
    return ExitCosts(order, prefix, head, _flops(early, call, {}))


def _metrics(
    early: EarlyExit, metric: Callable[[Any, Any], torch.Tensor] | None
) -> dict[str, Callable[[Any, Any], torch.Tensor]]:
    """The metric of each exit: the user's, or :func:`top1` along the exit's class axis."""
    if metric is not None:
        return dict.fromkeys([*early.exits, OUTPUT], metric)
    layouts = {e: early.sup._settings[e].pred_layout or "NCHW" for e in early.exits}
    out: dict[str, Callable[[Any, Any], torch.Tensor]] = {
        e: functools.partial(top1, layout=lay) for e, lay in layouts.items()
    }
    out[OUTPUT] = top1
    return out


def _goal(
    max_drop: float | None, budget: float | None, patience: int | None
) -> tuple[float | None, float | None]:
    """The search's one goal, checked: ``(max_drop, None)`` (default 0.01) or
    ``(None, budget)``."""
    if patience is not None:
        raise ConfigError(
            f"calibrate searches confidence thresholds, which an EarlyExit with patience="
            f"{patience} does not use; measure it with evaluate(), or calibrate an EarlyExit "
            "without patience"
        )
    if max_drop is not None and budget is not None:
        raise ConfigError(
            f"pass max_drop= (least compute within an accuracy drop) or budget= (best accuracy "
            f"within a compute budget), not both (got max_drop={max_drop!r}, budget={budget!r})"
        )
    if budget is not None:
        return None, check_number("budget", budget, low=0, high=1, low_open=True)
    return check_number("max_drop", 0.01 if max_drop is None else max_drop, low=0), None


def _temperatures(
    early: EarlyExit, preds: Mapping[str, list[Any]], targets: list[Any], correct: Any
) -> dict[str, tuple[float, float, float]]:
    """Fit each exit's temperature on the calibration data and set it; ``{exit: (T, ECE at
    T = 1, ECE at T)}`` (ECE of the max softmax against ``correct[exit]``, per sample)."""
    out = {}
    for e in early.exits:
        layout = early.sup._settings[e].pred_layout or "NCHW"
        logits = torch.cat([p.detach() for p in preds[e]])
        target = torch.cat([torch.as_tensor(t) for t in targets])
        t = fit_temperature(logits, target, layout=layout)
        before = expected_calibration_error(confidence(logits, layout=layout), correct[e])
        after = expected_calibration_error(confidence(logits / t, layout=layout), correct[e])
        out[e] = (t, float(before), float(after))
    early.temperatures = {e: v[0] for e, v in out.items()}
    return out


def calibrate(
    early: EarlyExit,
    loader: Iterable[Any],
    max_drop: float | None,
    *,
    budget: float | None,
    temperature: bool,
    metric: Callable[[Any, Any], torch.Tensor] | None,
    grid: int,
    timing_runs: int,
) -> ExitTable:
    """:meth:`EarlyExit.calibrate`: every head on every sample once, the temperatures, the
    threshold search, the table of the chosen thresholds."""
    drop, share = _goal(max_drop, budget, early.patience)
    check_int("grid", grid)
    check_int("timing_runs", timing_runs)
    metrics = _metrics(early, metric)
    early._check_usable()
    preds: dict[str, list[Any]] = {e: [] for e in early.exits}
    targets: list[Any] = []
    scores: dict[str, list[torch.Tensor]] = {e: [] for e in [*early.exits, OUTPUT]}
    first: tuple[tuple[Any, ...], dict[str, Any]] | None = None
    for batch in loader:
        args, kwargs, target = _split(batch)
        if first is None:
            first = (_first_sample(args), _first_sample(kwargs))
        out = early.sup.exits(*args, **kwargs)
        for e in early.exits:
            preds[e].append(out[e])
        targets.append(target)
        for e in scores:
            scores[e].append(score_of(metrics[e], out[e], target, e).float())
    if first is None:
        raise ConfigError("the loader gave no batch; calibrate on held-out data")
    correct = {e: torch.cat(scores[e]) for e in early.exits}
    calibration = _temperatures(early, preds, targets, correct) if temperature else {}
    confs = {e: torch.cat([early._confidence(e, p).double() for p in preds[e]]) for e in preds}
    costs = measure_costs(early, *first)
    conf = torch.stack([confs[e] for e in costs.order])
    score = torch.stack([torch.cat(scores[e]) for e in [*costs.order, OUTPUT]])
    thresholds = search_thresholds(conf, score, costs, max_drop=drop, budget=share, grid=grid)
    early.thresholds = {e: thresholds.get(e, math.inf) for e in early.exits}
    exits = _simulate(conf, torch.tensor([thresholds[e] for e in costs.order]))
    names = [*costs.order, OUTPUT]
    n = exits.numel()
    rows = []
    for i, e in enumerate(names):
        mask = exits == i
        k = int(mask.sum())
        path = costs.path(e, early.thresholds)
        t, before, after = calibration.get(e, (1.0, math.nan, math.nan))
        rows.append(
            ExitRow(
                exit=e,
                threshold=early.thresholds.get(e, math.nan),
                share=k / n,
                accuracy=float(score[i][mask].mean()) if k else math.nan,
                flops=float(_flops(early, first, path)),
                time_s=_seconds(early, first, path, timing_runs),
                temperature=t,
                ece_before=before,
                ece=after,
            )
        )
    picked = score.gather(0, exits[None])[0]
    return ExitTable(
        rows=rows,
        accuracy=float(picked.mean()),
        flops=sum(r.flops * r.share for r in rows),
        time_s=sum(r.time_s * r.share for r in rows),
        full_accuracy=float(score[-1].mean()),
        full_flops=float(costs.full),
        full_time_s=_seconds(early, first, {}, timing_runs),
        samples=n,
        thresholds=early.thresholds,
    )


def evaluate(
    early: EarlyExit,
    loader: Iterable[Any],
    *,
    metric: Callable[[Any, Any], torch.Tensor] | None,
) -> ExitTable:
    """:meth:`EarlyExit.evaluate`: each batch through the early exit and through the model
    alone, interleaved and timed."""
    metrics = _metrics(early, metric)
    early._check_usable()
    first = None
    exits: list[str] = []
    early_scores: list[torch.Tensor] = []
    full_scores: list[torch.Tensor] = []
    early_times: list[float] = []
    full_times: list[float] = []
    for batch in loader:
        args, kwargs, target = _split(batch)
        if first is None:
            first = (_first_sample(args), _first_sample(kwargs))
        t0 = time.perf_counter()
        pred, name = early(*args, **kwargs)
        t1 = time.perf_counter()
        with torch.no_grad():
            out = early.sup.model(*args, **kwargs)
        t2 = time.perf_counter()
        early_scores.append(score_of(metrics[name], pred, target, name).float())
        full_scores.append(score_of(metrics[OUTPUT], out, target, OUTPUT).float())
        n = early_scores[-1].numel()
        exits += [name] * n
        early_times += [(t1 - t0) / n] * n
        full_times += [(t2 - t1) / n] * n
    if first is None:
        raise ConfigError("the loader gave no batch")
    costs = measure_costs(early, *first)
    scored = torch.cat(early_scores)
    names = [*costs.order, OUTPUT]
    index = torch.tensor([names.index(e) for e in exits])
    thresholds = early.thresholds
    rows = []
    for i, e in enumerate(names):
        mask = index == i
        k = int(mask.sum())
        rows.append(
            ExitRow(
                exit=e,
                threshold=thresholds.get(e, math.nan),
                share=k / len(exits),
                accuracy=float(scored[mask].mean()) if k else math.nan,
                flops=float(costs.path_flops(e, thresholds)),
                time_s=statistics.fmean(t for t, m in zip(early_times, mask) if m)
                if k
                else math.nan,
            )
        )
    return ExitTable(
        rows=rows,
        accuracy=float(scored.mean()),
        flops=sum(r.flops * r.share for r in rows),
        time_s=statistics.fmean(early_times),
        full_accuracy=float(torch.cat(full_scores).mean()),
        full_flops=float(costs.full),
        full_time_s=statistics.fmean(full_times),
        samples=len(exits),
        thresholds=thresholds,
    )
