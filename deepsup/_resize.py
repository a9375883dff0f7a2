"""Reconciling a head's prediction with the target's spatial size."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F

from ._channels import Layout
from ._errors import ConfigError, TargetError
from ._target_modes import downsample_target_as

Resize = Literal["prediction", "target"] | None
RESIZE_MODES = ("prediction", "target", None)
_INTERP = {1: "linear", 2: "bilinear", 3: "trilinear"}
# interpolation= per resize direction; the first of each is the default
PREDICTION_MODES = ("linear", "nearest", "nearest-exact", "area", "bicubic")
TARGET_MODES = ("nearest", "nearest-exact", "soft", "max")
INTERPOLATIONS = frozenset(PREDICTION_MODES + TARGET_MODES)
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
        raise ConfigError(
            f"resize must be 'prediction' (upsample the prediction to the target), 'target' "
            f"(downsample the target to the prediction) or None (got {resize!r})"
        )
    return resize  # type: ignore[return-value]


def _spatial(t: torch.Tensor, layout: Layout) -> tuple[int, ...]:
    """The spatial size of a (B, C, *S) or (B, *S, C) tensor."""
    return tuple(t.shape[2:]) if layout == "NCHW" else tuple(t.shape[1:-1])


def _target_spatial(
    pred: torch.Tensor, target: torch.Tensor, layout: Layout, tap: str
) -> tuple[int, ...]:
    """The target's spatial size: class maps are (B, *S), dense targets as the prediction."""
    k = pred.dim() - 2
    if target.dim() == pred.dim() - 1:
        return tuple(target.shape[1:])
    if target.dim() == pred.dim():
        return _spatial(target, layout)
    where = "(B, C, *spatial)" if layout == "NCHW" else "(B, *spatial, C)"
    raise TargetError(
        f"tap {tap!r}: target of shape {tuple(target.shape)} does not fit a prediction of shape "
        f"{tuple(pred.shape)} (layout {layout!r}); expected (B, *spatial) class indices or "
        f"{where} with {k} spatial dims. Pass the right target= (a dict {{tap: target}} gives "
        "one per tap), or Tap(layout=...) if the prediction's class axis is elsewhere"
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


def _cell_ids(
    size_in: tuple[int, ...], size_out: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    """For each input pixel (raster order), the flat index of the output cell that holds it.

    Output cell ``i`` along a dim covers the inputs ``[floor(i*in/out), floor((i+1)*in/out))``:
    it starts at the pixel that nearest picks, and the cells tile the input exactly.
    """
    ids = torch.zeros((), dtype=torch.long, device=device)
    for n_in, n_out in zip(size_in, size_out):
        j = torch.arange(n_in, device=device)
        # the cell of input j is the largest i with floor(i * in / out) <= j,
        # that is ceil((j + 1) * out / in) - 1, in integers
        cell = torch.div((j + 1) * n_out + n_in - 1, n_in, rounding_mode="floor") - 1
        ids = ids.unsqueeze(-1) * n_out + cell
    return ids.reshape(-1)


def downsample_labels(
    target: torch.Tensor, size: tuple[int, ...], ignore_index: int | None
) -> torch.Tensor:
    """Ignore-aware nearest downsampling of a class map (B, *S) to ``size``.

    Each output pixel takes the label that nearest indexing picks (``floor(i * in / out)`` per
    dim, exact for any integer dtype); where that label is ``ignore_index``, it takes the first
    valid label, in raster order, of its cell (the input pixels ``[floor(i*in/out),
    floor((i+1)*in/out))`` per dim). A cell is ``ignore_index`` only if all its pixels are, so
    a downsampled target never loses every valid pixel that the full-size one had.

    Example:
        >>> t = torch.tensor([[[1, 255, 2, 255], [3, 255, 4, 255]]])  # every other column ignored
        >>> downsample_target(t, (1, 2))
        tensor([[[1, 2]]])
        >>> t = torch.tensor([[[255, 1, 255, 2], [255, 3, 255, 4]]])
        >>> downsample_target(t, (1, 2)), downsample_labels(t, (1, 2), ignore_index=255)
        (tensor([[[255, 255]]]), tensor([[[1, 2]]]))
    """
    picked = downsample_target(target, size)
    if ignore_index is None or target.is_floating_point():
        return picked
    B = target.shape[0]
    spatial = tuple(target.shape[1:])
    n_in = math.prod(spatial)
    flat = target.reshape(B, n_in)
    big = n_in  # "no valid pixel"
    pos = torch.arange(n_in, device=target.device).expand(B, n_in)
    key = torch.where(flat != ignore_index, pos, big)
    cells = _cell_ids(spatial, size, target.device).expand(B, n_in)
    first = torch.full((B, math.prod(size)), big, dtype=torch.long, device=target.device)
    first = first.scatter_reduce(1, cells, key, reduce="amin")
    fallback = flat.gather(1, first.clamp(max=n_in - 1))
    fallback = torch.where(first < big, fallback, ignore_index).reshape(picked.shape)
    return torch.where(picked == ignore_index, fallback, picked)


def reconcile(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    resize: Resize,
    align_corners: bool,
    tap: str,
    layout: Layout = "NCHW",
    ignore_index: int | None = None,
    interpolation: str | None = None,
    pyramid: dict[Any, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize ``pred`` or ``target`` so their spatial sizes match, or check that they do.

    ``layout`` is the prediction's: ``"NCHW"`` (B, K, *S) or ``"NHWC"`` (B, *S, K).
    ``interpolation`` is one of :func:`check_interpolation`'s (``None``: the default of
    ``resize``). ``pyramid`` is a per-forward cache of downsampled targets: taps whose
    predictions have the same spatial size (and the same rule, layout and ignore label)
    share one downsampled target.
    """
    if pred.dim() <= 2:  # (B, K) or (B,): nothing spatial to reconcile
        return pred, target
    size = _target_spatial(pred, target, layout, tap)
    psize = _spatial(pred, layout)
    if size == psize:
        return pred, target
    if resize == "prediction":
        mode = interpolation or PREDICTION_MODES[0]
        if layout == "NHWC":
            pred = pred.movedim(-1, 1)
        pred = upsample_prediction(pred, size, mode, align_corners, tap)
        if layout == "NHWC":
            pred = pred.movedim(1, -1)
        return pred, target
    if resize == "target":
        if any(p > t for p, t in zip(psize, size)):
            raise TargetError(
                f"tap {tap!r}: resize='target' only downsamples, but the prediction "
                f"{tuple(pred.shape)} is larger than the target {tuple(target.shape)}; "
                "use resize='prediction'"
            )
        mode = interpolation or TARGET_MODES[0]
        key: tuple[Any, ...] = (id(target), psize, mode, layout, ignore_index)
        if mode in ("soft", "max"):  # these read the class count; "soft" gives pred's dtype
            key += (_channels_of(pred, layout), pred.dtype)
        if pyramid is not None and key in pyramid:
            return pred, pyramid[key]
        small = _downsample(target, pred, psize, mode, layout, ignore_index, tap)
        if pyramid is not None:
            pyramid[key] = small
        return pred, small
    raise TargetError(
        f"tap {tap!r}: prediction of shape {tuple(pred.shape)} and target of shape "
        f"{tuple(target.shape)} differ in spatial size and resize=None; pass "
        "resize='prediction' (upsample the prediction) or resize='target' (downsample the target)"
    )


def _channels_of(pred: torch.Tensor, layout: Layout) -> int:
    return pred.shape[1] if layout == "NCHW" else pred.shape[-1]


def _downsample(
    target: torch.Tensor,
    pred: torch.Tensor,
    size: tuple[int, ...],
    mode: str,
    layout: Layout,
    ignore_index: int | None,
    tap: str,
) -> torch.Tensor:
    """``target`` downsampled to the spatial ``size`` of ``pred`` with the rule ``mode``.

    Class maps (B, *S) under ``"nearest"`` are downsampled ignore-aware
    (:func:`downsample_labels`); dense targets follow the prediction's ``layout``, and a
    ``"soft"`` target of a class map comes out in it.
    """
    dense = target.dim() == pred.dim()
    if mode == "nearest" and not dense:
        return downsample_labels(target, size, ignore_index)
    nhwc = layout == "NHWC"
    if dense and nhwc:
        target = target.movedim(-1, 1)
    if mode == "nearest":
        out = downsample_target(target, size)
    else:
        out = downsample_target_as(
            target,
            size,
            mode,
            num_classes=_channels_of(pred, layout),
            dense=dense,
            dtype=pred.dtype,
            tap=tap,
            ignore_index=ignore_index,
        )
    if nhwc and out.dim() == pred.dim():  # dense in, or a soft target of a class map
        out = out.movedim(1, -1)
    return out
