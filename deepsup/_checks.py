"""The value checks every module shares, and how a user's exception is re-raised.

One place for ``'x' must be T (got v)``: integers, finite numbers, choices. Checks of what a
:class:`~deepsup.Tap` or the wrapper takes live in ``_config.py``, built from these.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from .errors import ConfigError, DeepSupError

T = TypeVar("T")

__all__ = ["add_note", "call_user", "check_choice", "check_int", "check_number"]


def add_note(err: BaseException, note: str) -> None:
    """``err.add_note(note)``, also on Python 3.10 (where tracebacks do not show notes)."""
    if hasattr(err, "add_note"):
        err.add_note(note)
    else:  # pragma: no cover - Python 3.10
        notes = list(getattr(err, "__notes__", []))
        notes.append(note)
        err.__notes__ = notes  # type: ignore[attr-defined]


def call_user(fn: Callable[..., T], *args: Any, note: Callable[[], str], **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``; a user's own exception is re-raised as itself, with ``note()``."""
    try:
        return fn(*args, **kwargs)
    except DeepSupError:
        raise
    except Exception as err:
        add_note(err, note())
        raise


def check_int(what: str, value: object, *, minimum: int = 1) -> int:
    """The one integer check: ``value`` must be an int (not a bool) ``>= minimum``.

    Example:
        >>> check_int("in_channels", 3)
        3
        >>> check_int("in_channels", 0)
        Traceback (most recent call last):
        ...
        deepsup.errors.ConfigError: in_channels must be a positive int (got 0)
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ConfigError(f"{what} must be {kind} (got {value!r})")
    return int(value)


def is_number(value: object) -> bool:
    """A real number that is not a bool: Python's and NumPy's ints and floats."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_number(
    what: str,
    value: object,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
    finite: bool = True,
) -> float:
    """``value`` as a float: a real number (NumPy's included, bools refused) in the range.

    Example:
        >>> check_number("alpha", 0.5, low=0, high=1)
        0.5
        >>> check_number("temperature", float("inf"), low=0, low_open=True)
        Traceback (most recent call last):
        ...
        deepsup.errors.ConfigError: temperature must be a finite number > 0 (got inf)
    """
    ok = is_number(value)
    v = float(value) if ok else math.nan  # type: ignore[arg-type]
    ok = ok and not math.isnan(v) and (math.isfinite(v) or not finite)
    ok = ok and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        bounds = []
        if low > -math.inf:
            bounds.append(f"{'>' if low_open else '>='} {low:g}")
        if high < math.inf:
            bounds.append(f"{'<' if high_open else '<='} {high:g}")
        kind = "a finite number" if finite else "a number"
        raise ConfigError(
            f"{what} must be {kind}{' ' + ' and '.join(bounds) if bounds else ''} (got {value!r})"
        )
    return v


def check_choice(what: str, value: object, choices: Iterable[object], hint: str = "") -> Any:
    """``value`` must be one of ``choices``.

    Example:
        >>> check_choice("pool", "max", ("mean", "cls"))
        Traceback (most recent call last):
        ...
        deepsup.errors.ConfigError: pool must be one of 'mean', 'cls' (got 'max')
    """
    options = tuple(choices)
    if value not in options:
        listed = ", ".join(repr(c) for c in options)
        raise ConfigError(f"{what} must be one of {listed} (got {value!r}){hint}")
    return value
