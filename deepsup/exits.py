"""Multi-exit inference through the heads deep supervision trained: all exits, and early exit.

:func:`all_exits` (``sup.exits(x)``) runs the model once and every head on its tap.
:class:`EarlyExit` stops the model's forward at the first tap whose head is confident enough,
and :meth:`EarlyExit.calibrate` picks the thresholds on held-out data from measured compute
(``torch.utils.flop_counter.FlopCounterMode``) and wall time.

How early exit stops a forward it does not own: :class:`EarlyExit` registers one forward hook
per tap, once, at construction. Outside an :class:`EarlyExit` call the hooks return at once.
Inside one, a hook runs the tap's head on the captured output (under ``torch.no_grad``, in eval
mode: the one place deepsup runs a head inside a hook, since the decision has to be taken
before the next module runs) and, when every sample is confident, raises a private exception
that unwinds the model's forward and is caught by :meth:`EarlyExit.forward`. The exception
derives from ``BaseException``, so a model's own ``except Exception`` does not swallow it; the
per-call state lives in a thread-local slot reset in ``finally``.
"""

from __future__ import annotations

import functools
import math
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, NoReturn

import torch
from torch import nn

from ._calibration import (
    _ALWAYS,
    _NEVER,
    _STOP,
    OUTPUT,
    _first_sample,
    _per_sample,
    _simulate,
    _split,
    score_of,
)
from ._calibration import ExitCosts as ExitCosts
from ._calibration import ExitRow as ExitRow
from ._calibration import ExitTable as ExitTable
from ._calibration import search_thresholds as search_thresholds
from ._calibration import top1 as top1
from ._capture import select_tensor
from ._errors import ConfigError, ConfigTypeError, EarlyExitError, UsageError, call_user

if TYPE_CHECKING:
    from .wrapper import DeepSupervision

__all__ = [
    "CONFIDENCES",
    "EarlyExit",
    "ExitCosts",
    "ExitRow",
    "ExitTable",
    "all_exits",
    "confidence",
    "search_thresholds",
    "top1",
]

Confidence = Callable[[torch.Tensor], torch.Tensor]


# all exits --------------------------------------------------------------------------------


def _check_names(sup: DeepSupervision) -> None:
    if OUTPUT in sup.taps:
        raise EarlyExitError(
            f"a tap is named {OUTPUT!r}, the key exits() keeps for the model's output; tap "
            "another module (a parent or child of it)"
        )


def all_exits(sup: DeepSupervision, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Run the model once and every head on its tap: ``{tap: prediction, ..., "output": out}``.

    In eval mode everything runs under ``torch.no_grad()``; in training mode with autograd as
    the caller has it (BatchNorm statistics update, dropout is on, as in a training forward).
    A tap with ``calls="all"`` gives a list of predictions. ``sup.exits(...)`` calls this.

    Raises:
        CaptureError: a tap did not run, or ran several times with ``calls="error"``.
        UsageError: the wrapper was unwrapped, or the call runs under
            ``torch.inference_mode()`` (use ``torch.no_grad()``).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from deepsup import DeepSupervision, heads
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> sup = DeepSupervision(model, "0", head=heads.classification(3)).eval()
        >>> out = sup.exits(torch.randn(2, 4))
        >>> {k: tuple(v.shape) for k, v in out.items()}
        {'0': (2, 3), 'output': (2, 3)}
    """
    from .wrapper import run_head

    if not sup.training and torch.is_inference_mode_enabled():
        raise UsageError(
            "sup.exits() under torch.inference_mode(): the tap hooks check their captures' "
            "version counters, which inference tensors lack. Use torch.no_grad() (eval-mode "
            "exits() already runs under it), or EarlyExit for inference"
        )
    sup._check_usable()
    _check_names(sup)
    with torch.no_grad() if not sup.training else nullcontext():
        output, captured = sup._captured_forward(args, kwargs)
        result: dict[str, Any] = {}
        for name, s in sup._settings.items():
            head = sup.heads[name]
            preds = [run_head(name, s, head, f, sup._in_channels) for f in captured[name]]
            result[name] = preds if s.calls == "all" else preds[0]
    result[OUTPUT] = output
    return result


# confidence -------------------------------------------------------------------------------


def _max_softmax(pred: torch.Tensor) -> torch.Tensor:
    return _per_sample(pred.float().softmax(1).amax(1))


def _margin(pred: torch.Tensor) -> torch.Tensor:
    top = pred.float().softmax(1).topk(2, dim=1).values
    return _per_sample(top[:, 0] - top[:, 1])


def _entropy(pred: torch.Tensor) -> torch.Tensor:
    log_p = pred.float().log_softmax(1)
    h = -(log_p.exp() * log_p).sum(1)
    return _per_sample(1.0 - h / math.log(pred.shape[1]))


CONFIDENCES: dict[str, Confidence] = {
    "max_softmax": _max_softmax,
    "margin": _margin,
    "entropy": _entropy,
}


def confidence(prediction: torch.Tensor, kind: str | Confidence = "max_softmax") -> torch.Tensor:
    """Per-sample confidence ``(B,)`` of logits with classes on dim 1; higher is surer.

    ``"max_softmax"``: the top class's probability; ``"margin"``: top-1 minus top-2
    probability; ``"entropy"``: ``1 - H(p) / log(K)`` (1 for a one-hot, 0 for uniform). Dense
    predictions ``(B, K, *spatial)`` average over positions. A callable is used as is.

    Example:
        >>> logits = torch.tensor([[4.0, 0.0], [0.0, 0.0]])
        >>> confidence(logits, "margin")
        tensor([0.9640, 0.0000])
    """
    return _confidence_of(_confidence_fn(kind), prediction, "?")


def _confidence_fn(kind: str | Confidence) -> Confidence:
    if callable(kind):
        return kind
    if kind not in CONFIDENCES:
        raise ConfigError(
            f"confidence must be one of {sorted(CONFIDENCES)} or a callable prediction -> (B,) "
            f"(got {kind!r})"
        )
    return CONFIDENCES[kind]


def _confidence_of(fn: Confidence, pred: torch.Tensor, tap: str) -> torch.Tensor:
    """``fn(pred)``, checked; a user's exception is re-raised with the tap in a note."""
    conf = call_user(fn, pred, note=lambda: f"deepsup: raised in the confidence of exit {tap!r}")
    return _check_confidence(conf, pred, tap)


def _check_confidence(conf: Any, pred: torch.Tensor, tap: str) -> torch.Tensor:
    if not isinstance(conf, torch.Tensor) or conf.shape != pred.shape[:1]:
        got = tuple(conf.shape) if isinstance(conf, torch.Tensor) else type(conf).__name__
        raise EarlyExitError(
            f"tap {tap!r}: the confidence function returned {got} for a prediction of shape "
            f"{tuple(pred.shape)}; it must return one value per sample, shape "
            f"({pred.shape[0]},)"
        )
    return conf


# early exit -------------------------------------------------------------------------------


class _Exited(BaseException):
    """Raised by an exit hook to unwind the model's forward; caught by EarlyExit."""

    def __init__(self, name: str, prediction: Any) -> None:
        super().__init__(name)
        self.name = name
        self.prediction = prediction


class _Call:
    """The settings of one EarlyExit call: per-tap thresholds, and the taps visited."""

    def __init__(self, thresholds: Mapping[str, float | str]) -> None:
        self.thresholds = thresholds
        self.visited: list[str] = []


class _ExitState:
    """Per-thread slot for the running EarlyExit call; empty outside one."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._local.call = None  # set up front, as Capture does, for torch.compile's guards

    def __getstate__(self) -> dict[str, Any]:
        return {}  # the per-call slot never travels with a copy

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]

    def current(self) -> _Call | None:
        return getattr(self._local, "call", None)

    @contextmanager
    def call(self, thresholds: Mapping[str, float | str]) -> Iterator[_Call]:
        if self.current() is not None:
            raise EarlyExitError(
                "EarlyExit was re-entered on the same thread (called inside its own forward); "
                "call the model instead"
            )
        call = _Call(thresholds)
        self._local.call = call
        try:
            yield call
        finally:
            self._local.call = None


class _ExitHook:
    """The forward hook of one exit: runs the head and stops the forward when it is confident."""

    def __init__(
        self,
        state: _ExitState,
        name: str,
        select: Any,
        clone: bool,
        run: Callable[[torch.Tensor], Any],
        confidence: Confidence,
    ) -> None:
        self.state = state
        self.name = name
        self.select = select
        self.clone = clone
        self.run = run  # the head, with the wrapper's checks (wrapper.run_head)
        self.confidence = confidence

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        call = self.state.current()
        if call is None:
            return None
        threshold = call.thresholds.get(self.name, math.inf)
        if threshold == math.inf:
            return None
        call.visited.append(self.name)
        if threshold == _STOP:
            raise _Exited(self.name, None)
        feat = select_tensor(output, self.select, self.name)
        pred = self.run(feat.clone() if self.clone else feat)
        if threshold == _ALWAYS:
            raise _Exited(self.name, pred)
        conf = _confidence_of(self.confidence, pred, self.name)
        if isinstance(threshold, float) and bool((conf >= threshold).all()):
            raise _Exited(self.name, pred)
        return None

    def __repr__(self) -> str:
        return f"deepsup.ExitHook({self.name!r})"


def _as_thresholds(threshold: float | Mapping[str, float], taps: Iterable[str]) -> dict[str, float]:
    taps = list(taps)
    if isinstance(threshold, Mapping):
        unknown = sorted(set(threshold) - set(taps))
        if unknown:
            raise ConfigError(
                f"threshold names taps {unknown} that are not exits; the exits are {taps}"
            )
        out = {t: float(threshold.get(t, math.inf)) for t in taps}
    elif isinstance(threshold, (int, float)) and not isinstance(threshold, bool):
        out = dict.fromkeys(taps, float(threshold))
    else:
        raise ConfigTypeError(
            f"threshold must be a float or a dict {{tap: float}} (got {type(threshold).__name__})"
        )
    bad = {t: v for t, v in out.items() if math.isnan(v)}
    if bad:
        raise ConfigError(f"thresholds must not be NaN (got {bad})")
    return out


class EarlyExit(nn.Module):
    """Early-exit inference: stop the model's forward at the first confident head.

    The forward runs the model (under ``torch.no_grad``) and, at the first tap in execution
    order whose head's confidence reaches its threshold **for every sample of the batch**,
    stops the rest of the model's forward (no later module runs) and returns
    ``(prediction, tap)``; when no exit fires it returns ``(model(x), "output")``, equal bit
    for bit to the model's own output. With batch size 1 this is per-sample early exit. An
    exit's prediction is its head's output as is (a dense head's logits at the tap's size).

    Args:
        sup: the trained :class:`~deepsup.DeepSupervision` (not wrapped in DDP or
            ``torch.compile``); its heads are the exits.
        threshold: one threshold for every exit, or ``{tap: threshold}`` (taps left out never
            exit, and their heads do not run). ``math.inf`` disables an exit.
        confidence: ``"max_softmax"``, ``"margin"``, ``"entropy"`` (see :func:`confidence`) or
            a callable ``prediction -> (B,)`` tensor, higher meaning surer.

    Raises:
        EarlyExitError: the forward runs in training mode, under ``torch.compile``, or with a
            ``sup`` wrapped in DDP or compiled; a tap with ``calls="all"``.

    What cannot work: training (a stopped forward has no loss for the rest of the model, and
    DDP would wait for gradients that never come), ``torch.compile`` (a graph cannot stop
    half-way on a data-dependent condition without breaking into eager code, which is what
    this is) and ``torch.jit`` (Python hooks). In eval mode the forward does not synchronise
    anything, so each process of a distributed job may run its own ``EarlyExit`` on the
    unwrapped ``DeepSupervision``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from deepsup import DeepSupervision, EarlyExit, heads
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> sup = DeepSupervision(model, "0", head=heads.classification(3))
        >>> early = EarlyExit(sup, threshold=0.0).eval()
        >>> pred, name = early(torch.randn(1, 4))
        >>> name, tuple(pred.shape)
        ('0', (1, 3))
        >>> early.thresholds = {"0": float("inf")}
        >>> x = torch.randn(2, 4)
        >>> pred, name = early(x)
        >>> name, torch.equal(pred, model(x))
        ('output', True)
    """

    def __init__(
        self,
        sup: DeepSupervision,
        threshold: float | Mapping[str, float] = 0.9,
        *,
        confidence: str | Confidence = "max_softmax",
    ) -> None:
        super().__init__()
        from .wrapper import DeepSupervision, run_head

        if not isinstance(sup, DeepSupervision):
            inner = getattr(sup, "module", None) or getattr(sup, "_orig_mod", None)
            hint = (
                " Pass the DeepSupervision itself, not a DDP or torch.compile wrapper of it."
                if isinstance(inner, DeepSupervision)
                else ""
            )
            raise EarlyExitError(
                f"EarlyExit needs a DeepSupervision (got {type(sup).__name__}).{hint}"
            )
        sup._check_usable()
        _check_names(sup)
        multi = [n for n, s in sup._settings.items() if s.calls == "all"]
        if multi:
            raise EarlyExitError(
                f"taps {multi} use calls='all' (several predictions per forward), which cannot "
                "be one exit; use calls='first' or 'last' for them"
            )
        self.sup = sup
        self._confidence = _confidence_fn(confidence)
        self.confidence_name = confidence if isinstance(confidence, str) else "callable"
        self.exits = list(sup.taps)
        self._thresholds = _as_thresholds(threshold, self.exits)
        self._state = _ExitState()
        self._heads = [sup.heads[n] for n in self.exits]  # plain list: not registered twice
        self._handles = []
        for name, s in sup._settings.items():
            run = functools.partial(
                run_head, name, s, sup.heads[name], in_channels=sup._in_channels
            )
            hook = _ExitHook(self._state, name, s.select, s.clone, run, self._confidence)
            module = sup.model.get_submodule(name)
            self._handles.append(module.register_forward_hook(hook))

    @property
    def thresholds(self) -> dict[str, float]:
        """``{tap: threshold}`` (``inf``: that exit is off). Settable with a float or a dict."""
        return dict(self._thresholds)

    @thresholds.setter
    def thresholds(self, value: float | Mapping[str, float]) -> None:
        self._thresholds = _as_thresholds(value, self.exits)

    def remove(self) -> None:
        """Remove this EarlyExit's hooks from the model (safe to call twice).

        Example:
            >>> from torch import nn
            >>> from deepsup import DeepSupervision, EarlyExit, heads
            >>> model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
            >>> early = EarlyExit(DeepSupervision(model, "0", head=heads.classification(2)))
            >>> len(model[0]._forward_hooks)
            2
            >>> early.remove(); len(model[0]._forward_hooks)
            1
        """
        for h in self._handles:
            h.remove()
        self._handles = []

    def _check_usable(self) -> None:
        if torch.compiler.is_compiling() or _under_dynamo():
            raise EarlyExitError(
                "EarlyExit cannot run under torch.compile: stopping a forward half-way on a "
                "data-dependent condition is eager-only. Compile the model for the full "
                "forward, or run EarlyExit without torch.compile"
            )
        if not self._handles:
            raise EarlyExitError("this EarlyExit was removed; build a new one")
        if self.training or self.sup.model.training or any(h.training for h in self._heads):
            training = [
                n for n, m in [("EarlyExit", self), ("the model", self.sup.model)] if m.training
            ]
            training += [f"head {n!r}" for n in self.exits if self.sup.heads[n].training]
            raise EarlyExitError(
                f"EarlyExit runs in eval mode only ({', '.join(training)} in training mode): a "
                "stopped forward gives no loss to the rest of the model. Call early.eval() "
                "(or train through the DeepSupervision wrapper)"
            )

    def _run(
        self, args: tuple[Any, ...], kwargs: Mapping[str, Any], thresholds: Mapping[str, Any]
    ) -> tuple[Any, str, list[str]]:
        self._check_usable()
        with torch.no_grad(), self._state.call(thresholds) as call:
            try:
                output = self.sup.model(*args, **kwargs)
            except _Exited as stop:
                return stop.prediction, stop.name, call.visited
        return output, OUTPUT, call.visited

    def forward(self, *args: Any, **kwargs: Any) -> tuple[Any, str]:
        """``(prediction, exit name)``; ``(model(*args, **kwargs), "output")`` if none fires."""
        prediction, name, _ = self._run(args, kwargs, self._thresholds)
        return prediction, name

    # calibration ---------------------------------------------------------------------------

    def _flops(self, call: tuple[tuple[Any, ...], dict[str, Any]], thr: Mapping[str, Any]) -> int:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            self._run(*call, thr)
        return int(counter.get_total_flops())

    def _seconds(
        self, call: tuple[tuple[Any, ...], dict[str, Any]], thr: Mapping[str, Any], runs: int
    ) -> float:
        self._run(*call, thr)  # warm-up
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            self._run(*call, thr)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def costs(self, *args: Any, **kwargs: Any) -> ExitCosts:
        """FLOPs of each part of an early-exit forward on this input, measured.

        Runs the forward stopped at each tap with and without its head, and the model alone,
        under ``torch.utils.flop_counter.FlopCounterMode``. FLOPs of matmuls and convolutions
        (what ``FlopCounterMode`` counts), for the whole input: pass one sample for per-sample
        figures.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> from deepsup import DeepSupervision, EarlyExit, heads
            >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
            >>> early = EarlyExit(DeepSupervision(model, "0", head=heads.classification(3)))
            >>> c = early.eval().costs(torch.randn(1, 4))
            >>> c.order, c.prefix, c.head, c.full
            (['0'], {'0': 64}, {'0': 48}, 112)
        """
        call = (args, kwargs)
        order = self._run(args, kwargs, dict.fromkeys(self.exits, _NEVER))[2]
        missing = [e for e in self.exits if e not in order]
        if missing:
            raise EarlyExitError(
                f"exits {missing} did not run in an eval forward, so they cannot be exits; "
                "leave them out of the thresholds or tap modules that run in eval"
            )
        prefix = {e: self._flops(call, {e: _STOP}) for e in order}
        head = {e: self._flops(call, {e: _ALWAYS}) - prefix[e] for e in order}
        return ExitCosts(order, prefix, head, self._flops(call, {}))

    def calibrate(
        self,
        loader: Iterable[Any],
        max_drop: float = 0.01,
        *,
        metric: Callable[[Any, Any], torch.Tensor] | None = None,
        grid: int = 64,
        timing_runs: int = 20,
    ) -> ExitTable:
        """Pick the thresholds that minimise measured compute within ``max_drop`` accuracy.

        Runs every head on every sample of ``loader`` (held-out data, ``(input, target)``
        batches) once, then searches per-exit thresholds (coordinate descent over ``grid``
        quantiles of each exit's confidences, and "off") for the lowest mean FLOPs per sample
        such that the early-exit accuracy is at least the model's accuracy minus ``max_drop``
        (absolute: 0.01 is one point), and sets :attr:`thresholds` to them. The search
        simulates per-sample exit (batch size 1 at inference). FLOPs are measured with
        ``FlopCounterMode`` on the first sample (the model's cost must not depend on the
        input's content); wall time per exit is the median of ``timing_runs`` forwards of that
        sample along the same path.

        Args:
            loader: an iterable of ``(input, target)``; ``input`` a tensor, a tuple of
                arguments or a dict of keyword arguments.
            max_drop: the accuracy the early exit may lose against the model's output.
            metric: ``metric(prediction, target) -> (B,)`` per-sample score in [0, 1]
                (default :func:`top1`).
            grid: candidate thresholds per exit.
            timing_runs: forwards timed per exit.

        Returns:
            An :class:`ExitTable` measured on ``loader``.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> from deepsup import DeepSupervision, EarlyExit, heads
            >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
            <torch._C.Generator object at ...>
            >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 512), nn.ReLU(),
            ...                       nn.Linear(512, 3))
            >>> early = EarlyExit(DeepSupervision(model, "0", head=heads.classification(3)))
            >>> data = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(2)]
            >>> table = early.eval().calibrate(data, max_drop=1.0, timing_runs=1)
            >>> table.thresholds["0"] < float("inf"), table.rows[0].share
            (True, 1.0)
        """
        if not max_drop >= 0:
            raise ConfigError(f"max_drop must be >= 0 (got {max_drop!r})")
        metric = metric or top1
        self._check_usable()
        confs: dict[str, list[torch.Tensor]] = {e: [] for e in self.exits}
        scores: dict[str, list[torch.Tensor]] = {e: [] for e in [*self.exits, OUTPUT]}
        first: tuple[tuple[Any, ...], dict[str, Any]] | None = None
        for batch in loader:
            args, kwargs, target = _split(batch)
            if first is None:
                first = (_first_sample(args), _first_sample(kwargs))
            preds = all_exits(self.sup, *args, **kwargs)
            for e in self.exits:
                confs[e].append(_confidence_of(self._confidence, preds[e], e).float())
            for e in scores:
                scores[e].append(score_of(metric, preds[e], target, e).float())
        if first is None:
            raise ConfigError("the loader gave no batch; calibrate on held-out data")
        costs = self.costs(*first[0], **first[1])
        conf = torch.stack([torch.cat(confs[e]) for e in costs.order])
        score = torch.stack([torch.cat(scores[e]) for e in [*costs.order, OUTPUT]])
        thresholds = search_thresholds(conf, score, costs, max_drop=max_drop, grid=grid)
        self._thresholds = {e: thresholds.get(e, math.inf) for e in self.exits}
        exits = _simulate(conf, torch.tensor([thresholds[e] for e in costs.order]))
        return self._table(first, costs, exits, score, timing_runs)

    def evaluate(
        self,
        loader: Iterable[Any],
        *,
        metric: Callable[[Any, Any], torch.Tensor] | None = None,
    ) -> ExitTable:
        """Run the early exit on ``loader`` at the current thresholds and measure it.

        Each batch runs twice, interleaved: through the early exit and through the model
        alone, both timed (wall clock), so ``time_s`` and ``full_time_s`` are paired. FLOPs
        per exit are measured as in :meth:`calibrate`. Use batches of one sample for
        per-sample early exit.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> from deepsup import DeepSupervision, EarlyExit, heads
            >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
            >>> early = EarlyExit(DeepSupervision(model, "0", head=heads.classification(3)),
            ...                   threshold=0.0).eval()
            >>> data = [(torch.randn(1, 4), torch.tensor([0])) for _ in range(3)]
            >>> early.evaluate(data).rows[0].share
            1.0
        """
        metric = metric or top1
        self._check_usable()
        first = None
        exits: list[str] = []
        early_scores: list[torch.Tensor] = []
        full_scores: list[torch.Tensor] = []
        early_times: list[float] = []
        full_times: list[float] = []
        sizes: list[int] = []
        for batch in loader:
            args, kwargs, target = _split(batch)
            if first is None:
                first = (_first_sample(args), _first_sample(kwargs))
            t0 = time.perf_counter()
            pred, name = self(*args, **kwargs)
            t1 = time.perf_counter()
            with torch.no_grad():
                out = self.sup.model(*args, **kwargs)
            t2 = time.perf_counter()
            early_scores.append(score_of(metric, pred, target, name).float())
            full_scores.append(score_of(metric, out, target, OUTPUT).float())
            n = early_scores[-1].numel()
            sizes.append(n)
            exits += [name] * n
            early_times += [(t1 - t0) / n] * n
            full_times += [(t2 - t1) / n] * n
        if first is None:
            raise ConfigError("the loader gave no batch")
        costs = self.costs(*first[0], **first[1])
        early = torch.cat(early_scores)
        names = [*costs.order, OUTPUT]
        index = torch.tensor([names.index(e) for e in exits])
        rows = []
        for i, e in enumerate(names):
            mask = index == i
            k = int(mask.sum())
            rows.append(
                ExitRow(
                    exit=e,
                    threshold=self._thresholds.get(e, math.nan),
                    share=k / len(exits),
                    accuracy=float(early[mask].mean()) if k else math.nan,
                    flops=float(costs.path_flops(e, self._thresholds)),
                    time_s=statistics.fmean(t for t, m in zip(early_times, mask) if m)
                    if k
                    else math.nan,
                )
            )
        flops = sum(r.flops * r.share for r in rows)
        return ExitTable(
            rows=rows,
            accuracy=float(early.mean()),
            flops=flops,
            time_s=statistics.fmean(early_times),
            full_accuracy=float(torch.cat(full_scores).mean()),
            full_flops=float(costs.full),
            full_time_s=statistics.fmean(full_times),
            samples=len(exits),
            thresholds=self.thresholds,
        )

    def _table(
        self,
        call: tuple[tuple[Any, ...], dict[str, Any]],
        costs: ExitCosts,
        exits: torch.Tensor,
        score: torch.Tensor,
        timing_runs: int,
    ) -> ExitTable:
        names = [*costs.order, OUTPUT]
        n = exits.numel()
        rows = []
        for i, e in enumerate(names):
            mask = exits == i
            k = int(mask.sum())
            path = costs.path(e, self._thresholds)
            rows.append(
                ExitRow(
                    exit=e,
                    threshold=self._thresholds.get(e, math.nan),
                    share=k / n,
                    accuracy=float(score[i][mask].mean()) if k else math.nan,
                    flops=float(self._flops(call, path)),
                    time_s=self._seconds(call, path, timing_runs),
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
            full_time_s=self._seconds(call, {}, timing_runs),
            samples=n,
            thresholds=self.thresholds,
        )

    def extra_repr(self) -> str:
        return f"thresholds={self._thresholds}, confidence={self.confidence_name!r}"

    def __prepare_scriptable__(self) -> NoReturn:
        raise EarlyExitError(
            "torch.jit.script cannot compile EarlyExit (it stops the forward from Python "
            "hooks); script sup.unwrap() for the full model"
        )


def _under_dynamo() -> bool:
    """Whether this call runs below a ``torch.compile``'d function (even in its eager parts).

    Dynamo runs the frames it could not trace eagerly, with its frame callback still set.
    """
    return _eval_frame_callback is not None and _eval_frame_callback() is not None


try:
    from torch._C._dynamo.eval_frame import get_eval_frame_callback as _eval_frame_callback
except ImportError:  # pragma: no cover - other torch builds
    _eval_frame_callback = None  # type: ignore[assignment]
