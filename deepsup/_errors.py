"""The exception tree, and the small checks that raise from it.

Every error deepsup raises on purpose subclasses :class:`DeepSupError` *and* the builtin that
fits it, so ``except ValueError`` keeps working for callers that do not know deepsup::

    DeepSupError
    ├── ConfigError             (ValueError)    an argument or Tap setting has a bad value: the
    │   │                                       root or an alias tapped twice, overlapping
    │   │                                       globs, calls=, resize=, layout=, a weight or a
    │   │                                       schedule's value, a missing head, a clash of
    │   │                                       target= with the model's own keyword,
    │   │                                       interpolation=, a scale_weights rule
    │   ├── TapNotFoundError    (ValueError)    a tap name matches no submodule
    │   └── ChannelInferenceError (ValueError)  a head's input channels cannot be inferred
    ├── ConfigTypeError         (TypeError)     an argument of the wrong kind: a class where an
    │                                           instance is expected, an uncalled head factory
    ├── TargetError             (ValueError)    target= missing, or of the wrong shape
    ├── TapOutputError          (TypeError)     the tapped output holds no usable tensor
    ├── CaptureError            (RuntimeError)  a tap ran 0 or N times, was changed in
    │                                           place, or was captured without gradient
    ├── HeadError               (RuntimeError)  a head changed its input in place, or returned
    │                                           something other than a module / tensor
    ├── UsageError              (RuntimeError)  training after unwrap(), a re-entered forward,
    │                                           a training forward under inference_mode
    ├── EarlyExitError          (RuntimeError)  exits() or EarlyExit where they cannot work
    │                                           (training, torch.compile, a wrapped wrapper)
    ├── CheckpointError         (KeyError)      a state_dict that is not a wrapper's
    ├── MissingDependencyError  (ImportError)   an optional package is not installed
    ├── WeightsError            (ValueError)    deepsup.models: a weights file that does not fit
    │   └── WeightsNotFoundError (FileNotFoundError) ... or does not exist
    └── DeepSupScriptError      (RuntimeError)  torch.jit.script of the wrapper (script unwrap())

A user's own exception raised inside a head, a criterion or a ``select=`` callable is re-raised
unchanged (same type, same object), with the tap named in a note (``add_note``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = [
    "CaptureError",
    "ChannelInferenceError",
    "CheckpointError",
    "ConfigError",
    "ConfigTypeError",
    "DeepSupError",
    "DeepSupScriptError",
    "DeepSupWarning",
    "EarlyExitError",
    "HeadError",
    "MissingDependencyError",
    "TapNotFoundError",
    "TapOutputError",
    "TargetError",
    "UsageError",
]


class DeepSupError(Exception):
    """Base class of every error deepsup raises on purpose.

    Example:
        >>> issubclass(TapNotFoundError, DeepSupError) and issubclass(TapNotFoundError, ValueError)
        True
    """


class ConfigError(DeepSupError, ValueError):
    """An argument of the wrapper, a :class:`~deepsup.Tap` or a schedule has a bad value."""


class ConfigTypeError(DeepSupError, TypeError):
    """An argument is of the wrong kind (e.g. a class where an instance is expected)."""


class TapNotFoundError(ConfigError):
    """A tap name or pattern matches no submodule of the model."""


class ChannelInferenceError(ConfigError):
    """The channel count of a tapped output could not be inferred to build its head."""


class TargetError(DeepSupError, ValueError):
    """``target=`` is missing in a training forward, or does not fit a tap's prediction."""


class TapOutputError(DeepSupError, TypeError):
    """A tapped module's output holds no tensor deepsup can feed to a head."""


class CaptureError(DeepSupError, RuntimeError):
    """A tap was not captured exactly once, intact and with gradient, in a training forward."""


class HeadError(DeepSupError, RuntimeError):
    """A head changed its input in place, or did not give what deepsup needs."""


class UsageError(DeepSupError, RuntimeError):
    """The wrapper cannot train in this state (unwrapped, re-entered, under inference_mode)."""


class EarlyExitError(DeepSupError, RuntimeError):
    """``exits()`` or :class:`~deepsup.EarlyExit` used where they cannot work (e.g. compile)."""


class CheckpointError(DeepSupError, KeyError):
    """A state_dict is not what the call expects (e.g. not a wrapper's)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class MissingDependencyError(DeepSupError, ImportError):
    """An optional dependency is not installed; the message says what to install."""


class DeepSupScriptError(DeepSupError, RuntimeError):
    """``torch.jit.script`` was asked to compile the wrapper; script ``unwrap()``'s result."""


class DeepSupWarning(UserWarning):
    """Warnings deepsup emits: an option that has no effect in this set-up."""


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
        deepsup._errors.ConfigError: in_channels must be a positive int (got 0)
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ConfigError(f"{what} must be {kind} (got {value!r})")
    return value
