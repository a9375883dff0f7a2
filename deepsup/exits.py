"""Multi-exit inference through the heads deep supervision trained: all exits, and early exit.

:meth:`DeepSupervision.exits` (or :func:`all_exits`) runs the model once and every head on its
tap. :class:`EarlyExit` stops the model's forward at the first tap whose head is confident
enough; :meth:`EarlyExit.calibrate` picks the thresholds on held-out data from measured compute
(``torch.utils.flop_counter.FlopCounterMode``) and wall time (the measurement lives in
``deepsup/_calibration.py``).

How early exit stops a forward it does not own: :class:`EarlyExit` registers one forward hook
per tap, once, at construction. Outside an :class:`EarlyExit` call the hooks return at once.
Inside one, a hook runs the tap's head on the call that the tap's ``calls`` rule picks (the
first, the last, or the only one), under ``torch.no_grad`` in eval mode (the one place deepsup
runs a head inside a hook, since the decision has to be taken before the next module runs), and,
when every sample is confident, raises a private exception that unwinds the model's forward and
is caught by :meth:`EarlyExit.forward`. The exception derives from ``BaseException``, so a
model's own ``except Exception`` does not swallow it; the per-call state lives in a thread-local
slot reset in ``finally``. With ``per_sample=True`` (``deepsup/_routing.py``) the hook lets the
confident rows leave and returns the tap's output for the other rows (the one place a deepsup
hook returns a value), so the rest of the forward runs on them only.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NoReturn

import torch
from torch import nn

from . import _calibration, _routing
from ._build import need_layout, run_head
from ._calibration import (
    _ALWAYS,
    _NEVER,
    _STOP,
    ExitCosts,
    ExitRow,
    ExitTable,
    search_thresholds,
    top1,
)
from ._capture import as_call, dry_run, pick_calls, select_tensor
from ._checks import call_user, check_int, check_number
from ._config import OUTPUT
from ._export import AllExits, cut_at
from ._routing import LEAVE_EVEN, Routing
from .errors import CaptureError, ConfigError, ConfigTypeError, EarlyExitError
from .functional import CONFIDENCES, confidence, patience_streak, predicted_class
from .wrapper import DeepSupervision

__all__ = [
    "CONFIDENCES",
    "AllExits",
    "EarlyExit",
    "ExitCosts",
    "ExitRow",
    "ExitTable",
    "all_exits",
    "confidence",
    "cut_at",
    "search_thresholds",
    "top1",
]

Confidence = Callable[[torch.Tensor], torch.Tensor]


def all_exits(sup: DeepSupervision, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """``sup.exits(*args, **kwargs)``: every exit in one forward (see
    :meth:`DeepSupervision.exits`).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from deepsup import DeepSupervision, heads
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> sup = DeepSupervision(model, "0", head=heads.classification(3)).eval()
        >>> sorted(all_exits(sup, torch.randn(2, 4)))
        ['0', 'output']
    """
    return sup.exits(*args, **kwargs)


# ----------------------------------------------------------------------------- the hooks


class _Exited(BaseException):
    """Raised by an exit hook to unwind the model's forward; caught by EarlyExit."""

    def __init__(self, name: str, prediction: Any) -> None:
        super().__init__(name)
        self.name = name
        self.prediction = prediction


class _Call:
    """One EarlyExit call: per-tap thresholds, the calls per forward, what ran so far."""

    def __init__(
        self,
        thresholds: Mapping[str, float | str],
        counts: Mapping[str, int],
        routing: Routing | None,
    ) -> None:
        self.thresholds = thresholds
        self.counts = counts
        self.routing = routing
        self.seen: dict[str, int] = {}
        self.visited: list[str] = []
        self.streak: torch.Tensor | None = None  # patience: consecutive agreeing exits per row
        self.last: torch.Tensor | None = None  # patience: the last exit's classes per row


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
    def call(
        self,
        thresholds: Mapping[str, float | str],
        counts: Mapping[str, int],
        routing: Routing | None = None,
    ) -> Iterator[_Call]:
        if self.current() is not None:
            raise EarlyExitError(
                "EarlyExit was re-entered on the same thread (called inside its own forward); "
                "call the model instead"
            )
        call = _Call(thresholds, counts, routing)
        self._local.call = call
        try:
            yield call
        finally:
            self._local.call = None


class _ExitHook:
    """The forward hook of one exit: runs the head on the call its ``calls`` rule picks, and
    stops the forward when it is confident."""

    def __init__(self, early: EarlyExit, name: str) -> None:
        self.state = early._state
        self.name = name
        self.early = early

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        call = self.state.current()
        if call is None:
            return None
        threshold = call.thresholds.get(self.name, math.inf)
        if threshold == math.inf:
            return None
        n = call.seen[self.name] = call.seen.get(self.name, 0) + 1
        rule = self.early.sup._settings[self.name].calls
        if rule == "error" and n > 1:
            pick_calls(self.name, rule, n, "eval forward")  # raises, as exits() would
        if (rule == "first" and n > 1) or (rule == "last" and n != call.counts.get(self.name)):
            return None
        call.visited.append(self.name)
        if call.routing is not None:
            return self._route(call, call.routing, output, threshold)
        if threshold == _STOP:
            raise _Exited(self.name, None)
        pred = self.early._predict(self.name, output)
        if threshold == _ALWAYS:
            raise _Exited(self.name, pred)
        if isinstance(threshold, float) and bool(self._leave(call, pred, threshold).all()):
            raise _Exited(self.name, pred)  # the one host synchronisation of this tap
        return None

    def _leave(self, call: _Call, pred: Any, threshold: float) -> torch.Tensor:
        """The rows that leave here: confident enough, or (``patience=p``) the p-th exit in a
        row to predict the same class."""
        patience = self.early.patience
        if patience is None:
            return self.early._confidence(self.name, pred) >= threshold
        layout = need_layout(
            self.name, self.early.sup._settings[self.name].pred_layout, pred, "prediction"
        )
        cls = predicted_class(pred, layout=layout)
        call.streak = patience_streak(call.streak, call.last, cls)
        call.last = cls
        return call.streak >= patience

    def _route(self, call: _Call, routing: Routing, output: Any, threshold: float | str) -> Any:
        """Per-sample exit: the confident rows leave here, the tap returns the others."""
        rows = routing.rows_of(self.name, output)
        if threshold == LEAVE_EVEN:  # the construction check
            leave = torch.arange(rows, device=output.device) % 2 == 0
            pred = None
        else:
            pred = self.early._predict(self.name, output)
            leave = self._leave(call, pred, float(threshold))
        out = routing.step(self.name, output, leave, pred)
        if out is None:
            raise _Exited(self.name, None)
        if out is output:
            return None
        if call.streak is not None and call.last is not None:  # patience: the rows that stay
            call.streak, call.last = call.streak[routing.kept], call.last[routing.kept]
        return out

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


# ----------------------------------------------------------------------------- EarlyExit


class EarlyExit(nn.Module):
    """Early-exit inference: stop the model's forward at the first confident head.

    The forward runs the model (under ``torch.no_grad``) and, at the first tap in execution
    order whose head's confidence reaches its threshold **for every sample of the batch**,
    stops the rest of the model's forward (no later module runs) and returns
    ``(prediction, tap)``; when no exit fires it returns ``(model(x), "output")``, equal bit
    for bit to the model's own output. With batch size 1 this is per-sample early exit. An
    exit's prediction is its head's output as is (a dense head's logits at the tap's size).

    A tap that runs several times per forward exits on the call its ``Tap(calls=...)`` picks,
    as :meth:`DeepSupervision.exits` does: ``"first"``, ``"last"`` (the number of calls is
    counted once, in a dry run on ``example_input`` or the first input), and ``"error"``
    refuses a tap that runs more than once.

    The thresholds are in ``state_dict`` (``_extra_state``), with the wrapper's. The module
    starts in eval mode (and puts ``sup`` in it).

    Args:
        sup: the trained :class:`~deepsup.DeepSupervision` (not wrapped in DDP or
            ``torch.compile``); its heads are the exits.
        threshold: one threshold for every exit, or ``{tap: threshold}`` (taps left out never
            exit, and their heads do not run). ``math.inf`` disables an exit.
        confidence: ``"max_softmax"``, ``"margin"``, ``"entropy"`` (see
            :func:`deepsup.functional.confidence`: along the class axis of each exit's layout;
            sigmoid for single-logit heads) or a callable ``prediction -> (B,)`` tensor, higher
            meaning surer. A NaN confidence never exits.
        example_input: an input for the dry run that counts each tap's calls per forward
            (otherwise the first input is counted, once).
        per_sample: exit per row inside a batch. At each exit the confident rows leave and
            the rest of the model runs on the remaining rows only (the tap's hook returns
            their rows); the forward returns ``(predictions, exits)``, one prediction row and
            one exit name per input row, in the input's order, equal to running each sample
            alone. Needs ``example_input`` (at least 2 rows): at construction a dry run checks
            that the rows that continue past each exit give the outputs they give in the full
            batch, and that every exit predicts what the model outputs per row.

    Raises:
        EarlyExitError: the forward runs in training mode, under ``torch.compile``, or with a
            ``sup`` wrapped in DDP or compiled; a tap with ``calls="all"``; with
            ``per_sample=True``, a model that cannot continue on fewer rows after a tap (a
            U-Net's skip connections, an attention mask, rows mixed across the batch), naming
            why.
        CaptureError: a tap with ``calls="error"`` runs more than once per forward.

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
        >>> early = EarlyExit(sup, threshold=0.0)
        >>> pred, name = early(torch.randn(1, 4))
        >>> name, tuple(pred.shape)
        ('0', (1, 3))
        >>> early.thresholds = {"0": float("inf")}
        >>> x = torch.randn(2, 4)
        >>> pred, name = early(x)
        >>> name, torch.equal(pred, model(x))
        ('output', True)

        Per-sample exits inside a batch:

        >>> rows = EarlyExit(sup, threshold={"0": 0.4}, per_sample=True, example_input=x)
        >>> preds, names = rows(torch.randn(5, 4))
        >>> tuple(preds.shape), len(names), set(names) <= {"0", "output"}
        ((5, 3), 5, True)
    """

    def __init__(
        self,
        sup: DeepSupervision,
        threshold: float | Mapping[str, float] = 0.9,
        *,
        confidence: str | Confidence = "max_softmax",
        example_input: Any = None,
        per_sample: bool = False,
        patience: int | None = None,
    ) -> None:
        super().__init__()
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
        if OUTPUT in sup.taps:
            raise EarlyExitError(
                f"a tap is named {OUTPUT!r}, the key EarlyExit keeps for the model's output; "
                "tap another module (a parent or child of it)"
            )
        multi = [n for n, s in sup._settings.items() if s.calls == "all"]
        if multi:
            raise EarlyExitError(
                f"taps {multi} use calls='all' (several predictions per forward), which cannot "
                "be one exit; use calls='first' or 'last' for them"
            )
        if not callable(confidence) and confidence not in CONFIDENCES:
            raise ConfigError(
                f"confidence must be one of {sorted(CONFIDENCES)} or a callable prediction -> "
                f"(B,) (got {confidence!r})"
            )
        self.sup = sup
        self._confidence_kind = confidence
        self.confidence_name = confidence if isinstance(confidence, str) else "callable"
        self.exits = list(sup.taps)
        self._thresholds = _as_thresholds(threshold, self.exits)
        self._temperatures = dict.fromkeys(self.exits, 1.0)
        self.patience = None if patience is None else check_int("patience", patience)
        self._state = _ExitState()
        self._heads = [sup.heads[n] for n in self.exits]  # plain list: not registered twice
        self._counts: dict[str, int] | None = None
        self._handles = [
            sup.model.get_submodule(name).register_forward_hook(_ExitHook(self, name))
            for name in self.exits
        ]
        self.per_sample = bool(per_sample)
        self.eval()
        if per_sample:
            if example_input is None:
                raise ConfigError(
                    "per_sample=True needs example_input=, a batch of at least 2 rows, to check "
                    "at construction that rows can leave at each exit; pass one"
                )
            self._check_rows(*as_call(example_input))
        elif example_input is not None:
            self._count(example_input, None)

    # thresholds and state ---------------------------------------------------------------------

    @property
    def thresholds(self) -> dict[str, float]:
        """``{tap: threshold}`` (``inf``: that exit is off). Settable with a float or a dict."""
        return dict(self._thresholds)

    @thresholds.setter
    def thresholds(self, value: float | Mapping[str, float]) -> None:
        self._thresholds = _as_thresholds(value, self.exits)

    @property
    def temperatures(self) -> dict[str, float]:
        """``{tap: T}``: each exit's logits are divided by ``T`` before its confidence is
        taken (1: unchanged; the predictions returned are the heads' own). Set by
        ``calibrate(temperature=True)``; settable with a float or a dict."""
        return dict(self._temperatures)

    @temperatures.setter
    def temperatures(self, value: float | Mapping[str, float]) -> None:
        given = value if isinstance(value, Mapping) else dict.fromkeys(self.exits, value)
        unknown = sorted(set(given) - set(self.exits))
        if unknown:
            raise ConfigError(
                f"temperatures name taps {unknown} that are not exits; the exits are {self.exits}"
            )
        out = dict(self._temperatures)
        for e, t in given.items():
            out[e] = check_number(f"the temperature of exit {e!r}", t, low=0, low_open=True)
        self._temperatures = out

    def get_extra_state(self) -> torch.Tensor:
        """The thresholds (``inf``: off) and the temperatures, in exit order, as a ``(2,
        exits)`` float64 tensor."""
        return torch.tensor(
            [
                [self._thresholds[e] for e in self.exits],
                [self._temperatures[e] for e in self.exits],
            ],
            dtype=torch.float64,
        )

    def set_extra_state(self, state: Any) -> None:
        """Restore what :meth:`get_extra_state` saved (a ``(exits,)`` tensor of thresholds
        alone, from before temperatures, is read too)."""
        k = len(self.exits)
        if not isinstance(state, torch.Tensor) or state.shape not in ((k,), (2, k)):
            raise ConfigError(
                f"an EarlyExit checkpoint's _extra_state must hold {k} thresholds and {k} "
                f"temperatures, one per exit {self.exits}, shape (2, {k}) (got {state!r})"
            )
        rows = state.reshape(-1, k).tolist()
        self.thresholds = dict(zip(self.exits, rows[0]))
        self.temperatures = dict(zip(self.exits, rows[1] if len(rows) > 1 else [1.0] * k))

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

    # one exit ---------------------------------------------------------------------------------

    def _predict(self, name: str, output: Any) -> Any:
        s = self.sup._settings[name]
        feat = select_tensor(output, s.select, name)
        return run_head(
            name, s, self.sup.heads[name], feat.clone() if s.clone else feat, self.sup._in_channels
        )

    def _confidence(self, name: str, pred: torch.Tensor) -> torch.Tensor:
        """The per-sample confidence of exit ``name``'s prediction, checked (a NaN never
        exits: ``NaN >= t`` is False)."""
        kind = self._confidence_kind
        t = self._temperatures[name]
        if t != 1.0:
            pred = pred / t
        if callable(kind):
            conf = call_user(
                kind, pred, note=lambda: f"deepsup: raised in the confidence of exit {name!r}"
            )
        else:
            layout = need_layout(name, self.sup._settings[name].pred_layout, pred, "prediction")
            conf = confidence(pred, kind, layout=layout)
        if not isinstance(conf, torch.Tensor) or conf.shape != pred.shape[:1]:
            got = tuple(conf.shape) if isinstance(conf, torch.Tensor) else type(conf).__name__
            raise EarlyExitError(
                f"tap {name!r}: the confidence function returned {got} for a prediction of "
                f"shape {tuple(pred.shape)}; it must return one value per sample, shape "
                f"({pred.shape[0]},)"
            )
        return conf

    # the forward ------------------------------------------------------------------------------

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

    def _count(self, args: Any, kwargs: Mapping[str, Any] | None) -> dict[str, int]:
        """Each tap's calls per eval forward, counted once in a dry run (the wrapper's own,
        if it had one); a tap with ``calls="error"`` that runs more than once is refused."""
        if self._counts is None:
            seen = self.sup._calls_seen
            if not all(n in seen for n in self.exits):
                records = dry_run(self.sup.model, args, self.sup._capture.window(), kwargs)
                seen = {n: len(records.get(n, [])) for n in self.exits}
            for n in self.exits:
                if seen[n]:
                    pick_calls(n, self.sup._settings[n].calls, seen[n], "eval forward")
            self._counts = dict(seen)
        return self._counts

    def _check_rows(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        """per_sample=True: rows may leave at every exit (``_routing.check_rows``)."""
        self._count(args, kwargs)
        with torch.no_grad():
            predictions = self.sup.exits(*args, **kwargs)
        full = predictions.pop(OUTPUT)
        order = self._run(args, kwargs, dict.fromkeys(self.exits, _NEVER))[2]
        ordered = {e: predictions[e] for e in order}

        def run(thresholds: Mapping[str, Any]) -> tuple[Any, Routing]:
            routing = Routing()
            return self._run(args, kwargs, thresholds, routing)[0], routing

        _routing.check_rows(run, full, ordered)

    def _run(
        self,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        thresholds: Mapping[str, Any],
        routing: Routing | None = None,
    ) -> tuple[Any, str, list[str]]:
        """The stopped forward: ``(prediction, exit, taps visited)``; with ``routing``, the
        model's output for the rows that reached it (``None`` if none did)."""
        self._check_usable()
        counts = self._count(args, kwargs)
        with torch.no_grad(), self._state.call(thresholds, counts, routing) as call:
            try:
                output = self.sup.model(*args, **kwargs)
            except _Exited as stop:
                return stop.prediction, stop.name, call.visited
        for n, k in call.seen.items():
            if self.sup._settings[n].calls == "last" and k != counts[n]:
                raise CaptureError(
                    f"tap {n!r} ran {k} times in this forward but {counts[n]} times in the "
                    "counting dry run; calls='last' needs the same number of calls per forward "
                    "(use calls='first')"
                )
        return output, OUTPUT, call.visited

    def forward(self, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        """``(prediction, exit name)``; ``(model(*args, **kwargs), "output")`` if none fires.
        With ``per_sample=True``: ``(predictions, exits)``, one row and one exit name per
        input row, in the input's order."""
        if not self.per_sample:
            prediction, name, _ = self._run(args, kwargs, self._thresholds)
            return prediction, name
        routing = Routing()
        output = self._run(args, kwargs, self._thresholds, routing)[0]
        return routing.assemble(output)

    # measurement (deepsup/_calibration.py) ----------------------------------------------------

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
            >>> c = early.costs(torch.randn(1, 4))
            >>> c.order, c.prefix, c.head, c.full
            (['0'], {'0': 64}, {'0': 48}, 112)
        """
        return _calibration.measure_costs(self, args, kwargs)

    def calibrate(
        self,
        loader: Iterable[Any],
        max_drop: float | None = None,
        *,
        budget: float | None = None,
        temperature: bool = False,
        metric: Callable[[Any, Any], torch.Tensor] | None = None,
        grid: int = 64,
        timing_runs: int = 20,
    ) -> ExitTable:
        """Pick the thresholds that minimise measured compute within ``max_drop`` accuracy
        (or, with ``budget``, maximise accuracy within a compute budget).

        Runs every head on every sample of ``loader`` (held-out data, ``(input, target)``
        batches) once, then searches per-exit thresholds (coordinate descent over ``grid``
        quantiles of each exit's confidences, NaNs left out, and "off") for the lowest mean
        FLOPs per sample such that the early-exit accuracy is at least the model's accuracy
        minus ``max_drop`` (absolute: 0.01 is one point), and sets :attr:`thresholds` to them.
        The search simulates per-sample exit (batch size 1 at inference). FLOPs are measured
        with ``FlopCounterMode`` on the first sample (the model's cost must not depend on the
        input's content); wall time per exit is the median of ``timing_runs`` forwards of that
        sample along the same path.

        Args:
            loader: an iterable of ``(input, target)``; ``input`` a tensor, a tuple of
                arguments or a dict of keyword arguments.
            max_drop: the accuracy the early exit may lose against the model's output
                (default 0.01).
            budget: instead of ``max_drop``, a compute budget: the thresholds with the best
                accuracy at a mean FLOPs per sample of at most ``budget`` times the model's
                (``0 < budget <= 1``).
            temperature: first fit each exit's temperature on ``loader`` (the cross-entropy of
                ``logits / T``, :func:`deepsup.functional.fit_temperature`), set
                :attr:`temperatures`, and search the thresholds on the scaled confidences;
                the table gives each exit's ``T`` and its expected calibration error before
                and after.
            metric: ``metric(prediction, target) -> (B,)`` per-sample score in [0, 1]
                (default :func:`top1`, along each exit's class axis).
            grid: candidate thresholds per exit (at least 1).
            timing_runs: forwards timed per exit (at least 1).

        Returns:
            An :class:`ExitTable` measured on ``loader``.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> from deepsup import DeepSupervision, EarlyExit, heads
            >>> _ = torch.manual_seed(0)
            >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 512), nn.ReLU(),
            ...                       nn.Linear(512, 3))
            >>> early = EarlyExit(DeepSupervision(model, "0", head=heads.classification(3)))
            >>> data = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(2)]
            >>> table = early.calibrate(data, max_drop=1.0, timing_runs=1)
            >>> table.thresholds["0"] < float("inf"), table.rows[0].share
            (True, 1.0)
        """
        return _calibration.calibrate(
            self,
            loader,
            max_drop,
            budget=budget,
            temperature=temperature,
            metric=metric,
            grid=grid,
            timing_runs=timing_runs,
        )

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
            ...                   threshold=0.0)
            >>> data = [(torch.randn(1, 4), torch.tensor([0])) for _ in range(3)]
            >>> early.evaluate(data).rows[0].share
            1.0
        """
        return _calibration.evaluate(self, loader, metric=metric)

    def extra_repr(self) -> str:
        extra = f", patience={self.patience}" if self.patience is not None else ""
        if self.per_sample:
            extra += ", per_sample=True"
        return f"thresholds={self._thresholds}, confidence={self.confidence_name!r}{extra}"

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
