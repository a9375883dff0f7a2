"""Reconciling a head's prediction with the target's spatial size."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from ._channels import Layout
from ._errors import ConfigError, TargetError

Resize = Literal["prediction", "target"] | None
RESIZE_MODES = ("prediction", "target", None)
_INTERP = {1: "linear", 2: "bilinear", 3: "trilinear"}


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize ``pred`` or ``target`` so their spatial sizes match, or check that they do.

    ``layout`` is the prediction's: ``"NCHW"`` (B, K, *S) or ``"NHWC"`` (B, *S, K).
    """
    if pred.dim() <= 2:  # (B, K) or (B,): nothing spatial to reconcile
        return pred, target
    size = _target_spatial(pred, target, layout, tap)
    psize = _spatial(pred, layout)
    if size == psize:
        return pred, target
    if resize == "prediction":
        mode = _INTERP.get(len(size))
        if mode is None:
            raise TargetError(
                f"tap {tap!r}: cannot interpolate a prediction with {len(size)} spatial dims "
                f"(shape {tuple(pred.shape)}); use resize='target' or None"
            )
        if layout == "NHWC":
            pred = pred.movedim(-1, 1)
        pred = F.interpolate(pred, size=size, mode=mode, align_corners=align_corners)
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
        if target.dim() == pred.dim() - 1:  # a class map: ignore-aware
            return pred, downsample_labels(target, psize, ignore_index)
        if layout == "NHWC":
            return pred, downsample_target(target.movedim(-1, 1), psize).movedim(1, -1)
        return pred, downsample_target(target, psize)
    raise TargetError(
        f"tap {tap!r}: prediction of shape {tuple(pred.shape)} and target of shape "
        f"{tuple(target.shape)} differ in spatial size and resize=None; pass "
        "resize='prediction' (upsample the prediction) or resize='target' (downsample the target)"
    )
