"""Reconciling a head's prediction with the target's spatial size."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F

from ._errors import ConfigError, TargetError
from ._target_modes import downsample_target_as

Resize = Literal["prediction", "target"] | None
RESIZE_MODES = ("prediction", "target", None)
_INTERP = {1: "linear", 2: "bilinear", 3: "trilinear"}
# interpolation= per resize direction; the first of each is the default
PREDICTION_MODES = ("linear", "nearest", "nearest-exact", "area", "bicubic")
TARGET_MODES = ("nearest", "nearest-exact", "soft", "max")
_ALIGNABLE = ("linear", "bicubic")


def check_interpolation(resize: Resize, interpolation: object) -> str | None:
    """The interpolation a tap uses: ``interpolation``, or the default of ``resize`` for None.

    Example:
        >>> check_interpolation("prediction", None), check_interpolation("target", "soft")
        ('linear', 'soft')
    """
    if resize is None:
        if interpolation is not None:
            raise ConfigError(
                f"interpolation={interpolation!r} has no effect with resize=None (predictions "
                "and targets must then have equal sizes); pass resize='prediction' or 'target'"
            )
        return None
    modes = PREDICTION_MODES if resize == "prediction" else TARGET_MODES
    if interpolation is None:
        return modes[0]
    if interpolation not in modes:
        other = TARGET_MODES if resize == "prediction" else PREDICTION_MODES
        hint = (
            f" ({interpolation!r} is a mode of resize="
            f"{'target' if resize == 'prediction' else 'prediction'!r})"
            if interpolation in other
            else ""
        )
        raise ConfigError(
            f"interpolation={interpolation!r} is not a mode of resize={resize!r}{hint}; "
            f"choose one of {modes}"
        )
    return str(interpolation)


def check_resize(resize: object) -> Resize:
    if resize not in RESIZE_MODES:
        raise ValueError(
            f"resize must be 'prediction' (upsample the prediction to the target), 'target' "
            f"(downsample the target to the prediction) or None (got {resize!r})"
        )
    return resize  # type: ignore[return-value]


def _target_spatial(pred: torch.Tensor, target: torch.Tensor, tap: str) -> tuple[int, ...]:
    """The target's spatial size: class maps are (B, *S), dense targets (B, C, *S)."""
    k = pred.dim() - 2
    if target.dim() == pred.dim() - 1:
        return tuple(target.shape[1:])
    if target.dim() == pred.dim():
        return tuple(target.shape[2:])
    raise TargetError(
        f"tap {tap!r}: target of shape {tuple(target.shape)} does not fit a prediction of shape "
        f"{tuple(pred.shape)}; expected (B, *spatial) class indices or (B, C, *spatial) with "
        f"{k} spatial dims. Pass the right target= (a dict {{tap: target}} gives one per tap)"
    )


def nearest_indices(size_in: int, size_out: int, device: torch.device) -> torch.Tensor:
    """``F.interpolate(mode='nearest')``'s source indices: floor(i * in / out)."""
    return torch.div(
        torch.arange(size_out, device=device) * size_in, size_out, rounding_mode="floor"
    )


def downsample_target(target: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Nearest-neighbour downsampling by indexing: exact for any dtype, ignore labels kept.

    Picks the same pixels as ``F.interpolate(..., mode="nearest")`` without a float round trip.

    Example:
        >>> t = torch.arange(16).reshape(1, 4, 4)
        >>> downsample_target(t, (2, 2))
        tensor([[[ 0,  2],
                 [ 8, 10]]])
    """
    k = len(size)
    out = target
    for i, s in enumerate(size):
        dim = target.dim() - k + i
        if out.shape[dim] != s:
            out = out.index_select(dim, nearest_indices(out.shape[dim], s, out.device))
    return out


def upsample_prediction(
    pred: torch.Tensor, size: tuple[int, ...], mode: str, align_corners: bool, tap: str
) -> torch.Tensor:
    """``F.interpolate`` of a (B, C, *S) prediction; ``"linear"`` is bi/trilinear by dims."""
    k = len(size)
    if mode == "linear":
        mode = _INTERP.get(k, "")
    if not mode or k > 3 or (mode == "bicubic" and k != 2):
        raise TargetError(
            f"tap {tap!r}: cannot interpolate a prediction with {k} spatial dims "
            f"(shape {tuple(pred.shape)}) with interpolation={mode or 'linear'!r}; use "
            "resize='target' or None" + ("" if k > 3 else ", or another interpolation")
        )
    ac = align_corners if mode.endswith(_ALIGNABLE) else None
    return F.interpolate(pred, size=size, mode=mode, align_corners=ac)


def reconcile(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    resize: Resize,
    align_corners: bool,
    tap: str,
    interpolation: str | None = None,
    pyramid: dict[Any, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize ``pred`` or ``target`` so their spatial sizes match, or check that they do.

    ``interpolation`` is one of :func:`check_interpolation`'s (``None``: the default of
    ``resize``). ``pyramid`` is a per-forward cache of downsampled targets: taps whose
    predictions have the same spatial size share one downsampled target.
    """
    if pred.dim() <= 2:  # (B, C) or (B,): nothing spatial to reconcile
        return pred, target
    size = _target_spatial(pred, target, tap)
    psize = tuple(pred.shape[2:])
    if size == psize:
        return pred, target
    if resize == "prediction":
        mode = interpolation or PREDICTION_MODES[0]
        return upsample_prediction(pred, size, mode, align_corners, tap), target
    if resize == "target":
        if any(p > t for p, t in zip(psize, size)):
            raise TargetError(
                f"tap {tap!r}: resize='target' only downsamples, but the prediction "
                f"{tuple(pred.shape)} is larger than the target {tuple(target.shape)}; "
                "use resize='prediction'"
            )
        mode = interpolation or TARGET_MODES[0]
        if mode == "nearest" and pyramid is None:
            return pred, downsample_target(target, psize)
        key: tuple[Any, ...] = (id(target), psize, mode)
        if mode in ("soft", "max"):  # these read the class count; "soft" gives pred's dtype
            key += (pred.shape[1], pred.dtype)
        if pyramid is not None and key in pyramid:
            return pred, pyramid[key]
        small = (
            downsample_target(target, psize)
            if mode == "nearest"
            else downsample_target_as(
                target,
                psize,
                mode,
                num_classes=pred.shape[1],
                dense=target.dim() == pred.dim(),
                dtype=pred.dtype,
                tap=tap,
            )
        )
        if pyramid is not None:
            pyramid[key] = small
        return pred, small
    raise TargetError(
        f"tap {tap!r}: prediction of shape {tuple(pred.shape)} and target of shape "
        f"{tuple(target.shape)} differ in spatial size and resize=None; pass "
        "resize='prediction' (upsample the prediction) or resize='target' (downsample the target)"
    )
