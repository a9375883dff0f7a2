"""The exceptions and the warning deepsup raises on purpose.

Every error subclasses :class:`DeepSupError` *and* the builtin that fits it, so
``except ValueError`` keeps working for callers that do not know deepsup::

    DeepSupError
    ├── ConfigError             (ValueError)    an argument or Tap setting has a bad value: the
    │   │                                       root or an alias tapped twice, overlapping
    │   │                                       globs, calls=, resize=, layout=, a weight or a
    │   │                                       schedule's value, a missing head, a clash of
    │   │                                       target= with the model's own keyword,
    │   │                                       interpolation=, a scale_weights rule, a layout
    │   │                                       that stays ambiguous
    │   ├── TapNotFoundError    (ValueError)    a tap name matches no submodule
    │   └── ChannelInferenceError (ValueError)  a head's input channels cannot be inferred
    ├── ConfigTypeError         (TypeError)     an argument of the wrong kind: a class that
    │                                           cannot be called with the channel count, an
    │                                           uncalled head factory, a criterion class
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
    ├── DiagnosticsError        (ValueError)    a diagnostic cannot run on this model / input
    ├── CheckpointError         (KeyError)      a state_dict that is not a wrapper's
    ├── MissingDependencyError  (ImportError)   an optional package is not installed
    ├── WeightsError            (ValueError)    deepsup.models: a weights file that does not fit
    │   └── WeightsNotFoundError (FileNotFoundError) ... or does not exist
    └── DeepSupScriptError      (RuntimeError)  torch.jit.script of the wrapper (script unwrap())

A user's own exception raised inside a head, a criterion or a ``select=`` callable is re-raised
unchanged (same type, same object), with the tap named in a note (``add_note``).

Example:
    >>> from deepsup.errors import ConfigError, DeepSupError
    >>> issubclass(ConfigError, DeepSupError) and issubclass(ConfigError, ValueError)
    True
"""

from __future__ import annotations

__all__ = [
    "CaptureError",
    "ChannelInferenceError",
    "CheckpointError",
    "ConfigError",
    "ConfigTypeError",
    "DeepSupError",
    "DeepSupScriptError",
    "DeepSupWarning",
    "DiagnosticsError",
    "EarlyExitError",
    "HeadError",
    "MissingDependencyError",
    "TapNotFoundError",
    "TapOutputError",
    "TargetError",
    "UsageError",
    "WeightsError",
    "WeightsNotFoundError",
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


class DiagnosticsError(DeepSupError, ValueError):
    """A diagnostic cannot run on this model or with these arguments (or matplotlib is missing
    for :meth:`~deepsup.diagnostics.GradientFlow.plot`)."""


class CheckpointError(DeepSupError, KeyError):
    """A state_dict is not what the call expects (e.g. not a wrapper's)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class MissingDependencyError(DeepSupError, ImportError):
    """An optional dependency is not installed; the message says what to install."""


class WeightsError(DeepSupError, ValueError):
    """A weights file could not be read, or does not fit the backbone (``deepsup.models``)."""


class WeightsNotFoundError(WeightsError, FileNotFoundError):
    """The weights file does not exist."""


class DeepSupScriptError(DeepSupError, RuntimeError):
    """``torch.jit.script`` was asked to compile the wrapper; script ``unwrap()``'s result."""


class DeepSupWarning(UserWarning):
    """Warnings deepsup emits: an option that has no effect in this set-up."""
