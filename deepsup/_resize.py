"""Reconciling a head's prediction with the target's spatial size."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from ._errors import TargetError

Resize = Literal["prediction", "target"] | None
RESIZE_MODES = ("prediction", "target", None)
_INTERP = {1: "linear", 2: "bilinear", 3: "trilinear"}


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
    """The source index of each output index ``i``: ``floor(i * in / out)``, in integers."""
    return torch.div(
        torch.arange(size_out, device=device) * size_in, size_out, rounding_mode="floor"
    )


def downsample_target(target: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Nearest-neighbour downsampling by indexing: exact for any dtype, ignore labels kept.

    Along each resized dim, output index ``i`` takes source index ``floor(i * in / out)``,
    computed in exact integer arithmetic; the values are copied, never converted to float.

    This is the rule of ``F.interpolate(..., mode="nearest")``, but torch computes the index in
    float32 (``floor(i * (in / out))``; on the CPU, float64 inputs excepted), which rounds an
    exact integer quotient down by one for some sizes: 26 -> 22 (``i = 11``: 13 here, 12 in
    torch), 39 -> 33, 52 -> 44, 62 -> 56, ... (11 pairs with ``in <= 64``). There the two pick
    a different row; everywhere else they agree. deepsup keeps the exact rule.

    Example:
        >>> t = torch.arange(16).reshape(1, 4, 4)
        >>> downsample_target(t, (2, 2))
        tensor([[[ 0,  2],
                 [ 8, 10]]])
        >>> downsample_target(torch.arange(26)[None], (22,))[0, 11]  # floor(11 * 26 / 22) = 13
        tensor(13)
    """
    k = len(size)
    out = target
    for i, s in enumerate(size):
        dim = target.dim() - k + i
        if out.shape[dim] != s:
            out = out.index_select(dim, nearest_indices(out.shape[dim], s, out.device))
    return out


def reconcile(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    resize: Resize,
    align_corners: bool,
    tap: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize ``pred`` or ``target`` so their spatial sizes match, or check that they do."""
    if pred.dim() <= 2:  # (B, C) or (B,): nothing spatial to reconcile
        return pred, target
    size = _target_spatial(pred, target, tap)
    psize = tuple(pred.shape[2:])
    if size == psize:
        return pred, target
    if resize == "prediction":
        mode = _INTERP.get(len(size))
        if mode is None:
            raise TargetError(
                f"tap {tap!r}: cannot interpolate a prediction with {len(size)} spatial dims "
                f"(shape {tuple(pred.shape)}); use resize='target' or None"
            )
        pred = F.interpolate(pred, size=size, mode=mode, align_corners=align_corners)
        return pred, target
    if resize == "target":
        if any(p > t for p, t in zip(psize, size)):
            raise TargetError(
                f"tap {tap!r}: resize='target' only downsamples, but the prediction "
                f"{tuple(pred.shape)} is larger than the target {tuple(target.shape)}; "
                "use resize='prediction'"
            )
        return pred, downsample_target(target, psize)
    raise TargetError(
        f"tap {tap!r}: prediction of shape {tuple(pred.shape)} and target of shape "
        f"{tuple(target.shape)} differ in spatial size and resize=None; pass "
        "resize='prediction' (upsample the prediction) or resize='target' (downsample the target)"
    )
