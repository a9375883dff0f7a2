"""Weights for multi-scale deep supervision (U-Net decoders), as nnU-Net and MONAI give them.

A U-Net trained with deep supervision puts a loss on the main output and on every decoder stage
below it; the peers weight the stages by their scale. :func:`scale_weights` turns the ordered list
of decoder taps into those weights, so that ``main * criterion(output, y) + sum(aux.values())``
is the peer's total loss term for term:

========== ========= ===================================== =====================================
rule       main      tap ``l`` (l = 1 finest ... n)        equals
========== ========= ===================================== =====================================
halving    1         ``0.5 ** l``                          the classic deep-supervision halving
monai-exp  1         ``max(0.5 ** l, 0.0625)``             MONAI ``DeepSupervisionLoss("exp")``
monai-two  1         ``0.5``                               MONAI ``DeepSupervisionLoss("two")``
same       1         ``1``                                 MONAI ``DeepSupervisionLoss("same")``
nnunet     ``1 / s`` ``0.5 ** l / s``, the coarsest ``0``  nnU-Net v2 (``nnUNetTrainer``), with
                                                           ``s = sum(0.5 ** l, l < n)``
========== ========= ===================================== =====================================

nnU-Net's coarsest output gets weight 0. nnU-Net then skips that loss, which leaves the head
without a gradient and crashes ``DistributedDataParallel`` (its trainer works around it with
``1e-6``); deepsup multiplies the loss by 0 instead, so its head gets a zero gradient and DDP
needs no workaround.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch

from . import functional
from .errors import ConfigError

__all__ = ["RULES", "Rule", "ScaleWeights", "downsample", "scale_weights"]

Rule = Literal["halving", "monai-exp", "monai-two", "same", "nnunet"]
RULES: tuple[str, ...] = ("halving", "monai-exp", "monai-two", "same", "nnunet")


class ScaleWeights(NamedTuple):
    """The main output's weight and ``{tap: weight}``; unpacks as ``main, taps = ...``."""

    main: float
    taps: dict[str, float]


def _level(rule: str, level: int) -> float:
    if rule in ("halving", "nnunet"):
        return 0.5**level
    if rule == "monai-exp":
        return max(0.5**level, 0.0625)
    if rule == "monai-two":
        return 1.0 if level == 0 else 0.5
    return 1.0


def scale_weights(taps: Sequence[str], rule: Rule = "halving") -> ScaleWeights:
    """Weights of the decoder taps of a U-Net, by scale, following a peer's rule.

    Args:
        taps: the tapped decoder stages, from the finest (the stage just below the main output,
            scale 1/2) to the coarsest.
        rule: ``"halving"``, ``"monai-exp"``, ``"monai-two"``, ``"same"`` or ``"nnunet"`` (see
            the module's table).

    Returns:
        ``(main, {tap: weight})``: pass the dict as ``taps=`` and multiply the main loss by
        ``main`` (1 for every rule but ``"nnunet"``, whose weights sum to 1).

    Raises:
        ConfigError: an unknown rule, no taps, or a tap listed twice.

    Example:
        >>> main, weights = scale_weights(["up3", "up2", "up1"], "nnunet")
        >>> round(main, 4), {k: round(v, 4) for k, v in weights.items()}
        (0.5714, {'up3': 0.2857, 'up2': 0.1429, 'up1': 0.0})
        >>> scale_weights(["up3", "up2"], "monai-exp").taps
        {'up3': 0.5, 'up2': 0.25}
    """
    if rule not in RULES:
        raise ConfigError(f"rule must be one of {RULES} (got {rule!r})")
    if isinstance(taps, str) or not isinstance(taps, Sequence) or not taps:
        raise ConfigError(
            f"taps must be a non-empty list of tap names, finest first (got {taps!r})"
        )
    names = list(taps)
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"taps lists {twice} more than once (got {names!r}); list each once")
    levels = [_level(rule, level) for level in range(len(names) + 1)]
    if rule == "nnunet":
        levels[-1] = 0.0
        total = sum(levels)
        levels = [w / total for w in levels]
    return ScaleWeights(levels[0], dict(zip(names, levels[1:])))


def downsample(
    target: torch.Tensor,
    size: Sequence[int],
    interpolation: str = "nearest",
    *,
    num_classes: int | None = None,
    ignore_index: int | None = None,
) -> torch.Tensor:
    """Downsample a target as ``DeepSupervision(resize="target", interpolation=...)`` does:
    :func:`deepsup.functional.downsample` with channels-first dense targets.

    For custom losses (``criterion=None``) and for inspecting what a coarse head is taught.

    Args:
        target: class indices (B, *S) or a dense target (B, C, *S), ``len(size)`` spatial dims.
        size: the spatial size to downsample to (each no larger than the target's).
        interpolation: ``"nearest"``, ``"nearest-exact"``, ``"soft"`` or ``"max"``.
        num_classes: the class count, needed by ``"soft"`` on class indices; with ``"max"`` on
            class indices, labels outside ``[0, num_classes)`` are ignore labels (without it,
            every label >= 0 is a class).
        ignore_index: the ignore label, as ``Tap(ignore_index=...)``: ``"nearest"`` on class
            indices is then ignore-aware (a cell is ignored only if all its pixels are), and
            ``"soft"`` and ``"max"`` leave it out of their cells.

    Returns:
        The target at ``size``: ``"soft"`` gives (B, C, *size) float class fractions, the other
        rules keep the layout and dtype. A target already at ``size`` is returned as is, as the
        wrapper passes it to the criterion.

    Example:
        >>> t = torch.tensor([[0, 0, 2, 0, 1, 1, 1, 1]])
        >>> downsample(t, (2,), "soft", num_classes=3)
        tensor([[[0.7500, 0.0000],
                 [0.0000, 1.0000],
                 [0.2500, 0.0000]]])
    """
    return functional.downsample(
        target,
        tuple(int(s) for s in size),
        interpolation,
        num_classes=num_classes,
        ignore_index=ignore_index,
    )
