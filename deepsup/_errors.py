"""The exception tree.

Every error deepsup raises on purpose subclasses :class:`DeepSupError` *and* the builtin that
fits it, so ``except ValueError`` keeps working for callers that do not know deepsup::

    DeepSupError
    ├── TapNotFoundError        (ValueError)    a tap name matches no submodule
    ├── ChannelInferenceError   (ValueError)    a head's input channels cannot be inferred
    ├── TargetError             (ValueError)    target= missing, or of the wrong shape
    ├── TapOutputError          (TypeError)     the tapped output holds no usable tensor
    ├── CaptureError            (RuntimeError)  a tap ran 0 or N times, was changed in
    │                                           place, or was captured without gradient
    ├── DeepSupScriptError      (RuntimeError)  torch.jit.script of the wrapper (script unwrap())
    └── EarlyExitError          (RuntimeError)  exits or EarlyExit where they cannot work
                                                (training, torch.compile, a wrapped wrapper)
"""

from __future__ import annotations

__all__ = [
    "CaptureError",
    "ChannelInferenceError",
    "DeepSupError",
    "DeepSupScriptError",
    "DeepSupWarning",
    "EarlyExitError",
    "TapNotFoundError",
    "TapOutputError",
    "TargetError",
]


class DeepSupError(Exception):
    """Base class of every error deepsup raises on purpose.

    Example:
        >>> issubclass(TapNotFoundError, DeepSupError) and issubclass(TapNotFoundError, ValueError)
        True
    """


class TapNotFoundError(DeepSupError, ValueError):
    """A tap name or pattern matches no submodule of the model."""


class ChannelInferenceError(DeepSupError, ValueError):
    """The channel count of a tapped output could not be inferred to build its head."""


class TargetError(DeepSupError, ValueError):
    """``target=`` is missing in a training forward, or does not fit a tap's prediction."""


class TapOutputError(DeepSupError, TypeError):
    """A tapped module's output holds no tensor deepsup can feed to a head."""


class CaptureError(DeepSupError, RuntimeError):
    """A tap was not captured exactly once, intact and with gradient, in a training forward."""


class DeepSupScriptError(DeepSupError, RuntimeError):
    """``torch.jit.script`` was asked to compile the wrapper; script ``unwrap()``'s result."""


class DeepSupWarning(UserWarning):
    """Warnings deepsup emits (an option with no effect, a risky but legal set-up)."""


class EarlyExitError(DeepSupError, RuntimeError):
    """Exits or :class:`~deepsup.EarlyExit` used where they cannot work (training, compile)."""
