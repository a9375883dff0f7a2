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

from ._checks import check_int
from .errors import ConfigError, ConfigTypeError

__all__ = ["Constant", "CosineDecay", "Cutoff", "LinearDecay", "Schedule", "as_schedule"]


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
