"""Weights and progress: each tap's weight at a progress, checked; the float64 weight buffer."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ._checks import is_number
from ._config import TapSettings
from .errors import ConfigError

__all__ = ["weight_tensor", "weight_values"]


def weight_values(settings: Mapping[str, TapSettings], progress: int) -> list[float]:
    """Every tap's weight at ``progress``, in tap order, each a finite number >= 0 (NumPy's
    floats included).

    Raises:
        ConfigError: a schedule gives something else; the message names the tap, the schedule,
            the value and the progress.
    """
    values = []
    for name, s in settings.items():
        w = s.weight(progress)
        if not is_number(w) or not math.isfinite(float(w)) or float(w) < 0:
            raise ConfigError(
                f"tap {name!r}: the schedule {s.weight!r} gave the weight {w!r} at progress "
                f"{progress}; a weight must be a finite number >= 0. Fix the schedule's "
                "__call__ (deepsup.schedules.Schedule)"
            )
        values.append(float(w))
    return values


def weight_tensor(
    settings: Mapping[str, TapSettings], progress: int, device: torch.device | None = None
) -> torch.Tensor:
    """The weights as a float64 tensor: every float weight is exact in it (see
    :func:`deepsup.functional.weighted`)."""
    return torch.tensor(weight_values(settings, progress), dtype=torch.float64, device=device)
