"""Weights that change over training.

A tap's weight is a float or a :class:`Schedule`: a function of the training progress, an integer
that the training loop advances with :meth:`deepsup.DeepSupervision.step` (once per iteration or
once per epoch, as the user chooses) and that is saved in the wrapper's ``state_dict``.

Example:
    >>> from deepsup import schedules
    >>> s = schedules.LinearDecay(0.4, total=100)
    >>> [round(s(t), 3) for t in (0, 50, 100, 200)]
    [0.4, 0.2, 0.0, 0.0]
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence

from ._checks import check_choice, check_int
from .errors import ConfigError, ConfigTypeError

__all__ = [
    "DEPTH_SCALES",
    "Constant",
    "CosineDecay",
    "Cutoff",
    "Gradual",
    "LinearDecay",
    "Rotational",
    "Schedule",
    "as_schedule",
    "depth_weights",
    "gradual",
    "rotational",
]


def _check_nonneg(what: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{what} must be a finite number >= 0 (got {value!r})")
    return value


class Schedule(ABC):
    """A weight as a function of the progress counter (an int >= 0).

    Subclasses implement :meth:`__call__`; they must be pure functions of ``step`` so that a
    resumed run continues with the right weight.
    """

    @abstractmethod
    def __call__(self, step: int) -> float:
        """The weight at progress ``step``."""

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(vars(self).items()))))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class Constant(Schedule):
    """The same weight at every step.

    Example:
        >>> Constant(0.4)(10_000)
        0.4
    """

    def __init__(self, value: float) -> None:
        self.value = _check_nonneg("value", value)

    def __call__(self, step: int) -> float:
        return self.value


class _Decay(Schedule):
    """A decay from ``start`` at step 0 to ``end`` at step ``total``, then ``end``."""

    def __init__(self, start: float, total: int, end: float = 0.0) -> None:
        self.start = _check_nonneg("start", start)
        self.total = check_int("total", total)
        self.end = _check_nonneg("end", end)

    def _fraction(self, step: int) -> float:
        """How far along the decay ``step`` is, in [0, 1]."""
        return min(max(step, 0), self.total) / self.total


class LinearDecay(_Decay):
    """From ``start`` at step 0 linearly to ``end`` at step ``total``, then ``end``.

    DSN's companion objectives fade out this way.

    Example:
        >>> LinearDecay(1.0, total=4)(1)
        0.75
    """

    def __call__(self, step: int) -> float:
        return self.start + (self.end - self.start) * self._fraction(step)


class CosineDecay(_Decay):
    """From ``start`` at step 0 along a half cosine to ``end`` at step ``total``, then ``end``.

    Example:
        >>> CosineDecay(1.0, total=10)(5)
        0.5
    """

    def __call__(self, step: int) -> float:
        t = self._fraction(step)
        value = self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * t))
        return round(value, 12)


class Cutoff(Schedule):
    """``value`` before step ``at``, 0 from step ``at`` on (the aux loss is switched off).

    The head still runs and its loss is multiplied by 0, which keeps
    ``DistributedDataParallel`` happy (see the docs on DDP).

    Example:
        >>> s = Cutoff(0.4, at=3)
        >>> [s(t) for t in range(5)]
        [0.4, 0.4, 0.4, 0.0, 0.0]
    """

    def __init__(self, value: float, at: int) -> None:
        self.value = _check_nonneg("value", value)
        self.at = check_int("at", at, minimum=0)

    def __call__(self, step: int) -> float:
        return self.value if step < self.at else 0.0


def as_schedule(weight: float | Schedule) -> Schedule:
    """Turn a float weight into a :class:`Constant`; pass schedules through.

    Example:
        >>> as_schedule(0.4)
        Constant(value=0.4)
    """
    if isinstance(weight, Schedule):
        return weight
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise ConfigTypeError(
            f"weight must be a float or a deepsup.schedules.Schedule (got {type(weight).__name__})"
        )
    return Constant(weight)


# ------------------------------------------------------------- early exits of a layer stack

# LayerSkip's and torchtune's depth-scale rules: the relative weight of the exit at depth l
# (1-based: the first layer's output is depth 1)
_RULES: dict[str, Callable[[int], float]] = {
    "one": lambda depth: 1.0,
    "l": lambda depth: float(depth),
    "sum_l": lambda depth: depth * (depth + 1) / 2,
    "inv_l": lambda depth: 1.0 / depth,
    "sqrt_l": lambda depth: math.sqrt(depth),
    "inv_sqrt_l": lambda depth: 1.0 / math.sqrt(depth),
}
DEPTH_SCALES = tuple(_RULES)


def _check_taps(taps: Sequence[str]) -> list[str]:
    if isinstance(taps, str) or not taps or not all(isinstance(t, str) for t in taps):
        raise ConfigTypeError(
            f"taps must be a non-empty list of tap names, shallowest first (got {taps!r}); "
            "e.g. [f'model.layers.{i}' for i in range(7)]"
        )
    return list(taps)


def depth_weights(
    taps: Sequence[str], rule: str = "sum_l", *, scale: float = 1.0, layers: int | None = None
) -> dict[str, float]:
    """Each exit's weight by its depth: LayerSkip's (and torchtune's) six depth-scale rules.

    ``taps`` are the exits in depth order, the ``i``-th at depth ``i + 1`` (the outputs of
    the first ``len(taps)`` layers); the model's own output is depth ``layers`` (default
    ``len(taps) + 1``) with weight 1, the main loss. The exit at depth ``l`` gets
    ``scale * r(l) / r(layers)`` with ``r`` one of ``"one"`` (1), ``"l"`` (l), ``"sum_l"``
    (1 + ... + l), ``"inv_l"`` (1/l), ``"sqrt_l"`` and ``"inv_sqrt_l"``. ``main + sum(aux)``
    is then torchtune's ``early_exit_loss`` over all layers (with ``e_scale=scale``) times the
    constant ``Z / r(layers)`` (``Z`` its normaliser): the same gradient direction, the main
    loss at weight 1 as everywhere in deepsup.

    Raises:
        ConfigError: an unknown rule, or ``layers`` not deeper than the taps.

    Example:
        >>> depth_weights(["layers.0", "layers.1", "layers.2"], "l")
        {'layers.0': 0.25, 'layers.1': 0.5, 'layers.2': 0.75}
    """
    names = _check_taps(taps)
    check_choice("rule", rule, DEPTH_SCALES)
    scale = _check_nonneg("scale", scale)
    last = len(names) + 1 if layers is None else check_int("layers", layers)
    if last <= len(names):
        raise ConfigError(
            f"layers must be deeper than the {len(names)} taps (got {layers}); pass the "
            "model's number of layers, the output being the last"
        )
    r = _RULES[rule]
    return {name: scale * r(i + 1) / r(last) for i, name in enumerate(names)}


def _weights(taps: list[str], weight: float | Mapping[str, float]) -> list[float]:
    if isinstance(weight, Mapping):
        missing = [t for t in taps if t not in weight]
        if missing:
            raise ConfigError(
                f"weight is a mapping without the taps {missing}; give every tap a weight "
                "(e.g. depth_weights(taps))"
            )
        return [_check_nonneg(f"weight[{t!r}]", weight[t]) for t in taps]
    return [_check_nonneg("weight", weight)] * len(taps)


class Rotational(Schedule):
    """LayerSkip's rotational curriculum, for one exit: on for one step in ``count``.

    The exit ``index`` of ``count`` has ``value`` at progress ``step`` where
    ``(step // every) % count == index``, else 0: one exit per step, cycling from the
    shallowest. Build one per tap with :func:`rotational`.

    Example:
        >>> [Rotational(1, 3)(t) for t in range(6)]
        [0.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    """

    def __init__(self, index: int, count: int, value: float = 1.0, *, every: int = 1) -> None:
        self.index = check_int("index", index, minimum=0)
        self.count = check_int("count", count)
        if self.index >= self.count:
            raise ConfigError(f"index must be below count={count} (got {index})")
        self.value = _check_nonneg("value", value)
        self.every = check_int("every", every)

    def __call__(self, step: int) -> float:
        return self.value if (step // self.every) % self.count == self.index else 0.0


class Gradual(Schedule):
    """LayerSkip's gradual curriculum, for one exit: off until its turn, then ``value``.

    Exits are enabled from the deepest down: the output of layer ``index`` (0-based) of a
    stack of ``count`` layers turns on at progress ``fraction * total * (count - index) /
    count``, torchtune's rule, so deeper exits come first and every exit is on from
    ``fraction * total``. Build one per tap with :func:`gradual`.

    Example:
        >>> s = Gradual(0, 4, total=100)  # the shallowest exit of 4 layers: on at 50
        >>> s(49), s(50)
        (0.0, 1.0)
    """

    def __init__(
        self, index: int, count: int, value: float = 1.0, *, total: int, fraction: float = 0.5
    ) -> None:
        self.index = check_int("index", index, minimum=0)
        self.count = check_int("count", count)
        if self.index >= self.count:
            raise ConfigError(f"index must be below count={count} (got {index})")
        self.value = _check_nonneg("value", value)
        self.total = check_int("total", total)
        self.fraction = _check_nonneg("fraction", fraction)

    def __call__(self, step: int) -> float:
        on = step / self.total >= self.fraction * (self.count - self.index) / self.count
        return self.value if on else 0.0


def rotational(
    taps: Sequence[str], weight: float | Mapping[str, float] = 1.0, *, every: int = 1
) -> dict[str, Schedule]:
    """``taps=`` for LayerSkip's rotational curriculum: one exit per step, cycling.

    ``weight`` is the weight of an exit when it is on: a float or ``{tap: weight}``
    (:func:`depth_weights`). A tap off in a step runs no head when its head owns no
    parameters (:func:`deepsup.heads.reuse`): the vocabulary projection is not paid for.

    Example:
        >>> taps = rotational(["l.0", "l.1"])
        >>> [[s(t) for s in taps.values()] for t in range(3)]
        [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]
    """
    names = _check_taps(taps)
    values = _weights(names, weight)
    return {
        t: Rotational(i, len(names), w, every=every) for i, (t, w) in enumerate(zip(names, values))
    }


def gradual(
    taps: Sequence[str],
    weight: float | Mapping[str, float] = 1.0,
    *,
    total: int,
    fraction: float = 0.5,
    layers: int | None = None,
) -> dict[str, Schedule]:
    """``taps=`` for LayerSkip's gradual curriculum: exits enabled from the deepest down.

    ``taps`` in depth order are the outputs of the first layers of a stack of ``layers``
    (default ``len(taps) + 1``: the model's output is the last); every exit is on from
    progress ``fraction * total``.

    Example:
        >>> taps = gradual(["l.0", "l.1", "l.2"], total=8)
        >>> [[s(t) for s in taps.values()] for t in (0, 2, 3, 4)]
        [[0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    """
    names = _check_taps(taps)
    values = _weights(names, weight)
    count = len(names) + 1 if layers is None else check_int("layers", layers)
    if count <= len(names):
        raise ConfigError(f"layers must be deeper than the {len(names)} taps (got {layers})")
    return {
        t: Gradual(i, count, w, total=total, fraction=fraction)
        for i, (t, w) in enumerate(zip(names, values))
    }
