"""Target downsampling rules beyond nearest: ``"nearest-exact"``, ``"soft"`` and ``"max"``.

A target is class indices (B, *S) or dense (B, C, *S), of any dtype, with 1 to 3 spatial dims.
``"nearest-exact"`` picks pixels by indexing (values are copied, never rounded); ``"soft"`` and
``"max"`` pool over cells, the cells of adaptive pooling (for an integer ratio ``r``: the
non-overlapping ``r`` x ... x ``r`` blocks; otherwise cell ``i`` spans
``floor(i * in / out)`` to ``ceil((i + 1) * in / out)``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ._errors import ConfigError, TargetError

__all__ = ["downsample_target_as", "max_target", "nearest_exact_indices", "soft_target"]

_AVG: dict[int, Callable[..., torch.Tensor]] = {
    1: F.adaptive_avg_pool1d,
    2: F.adaptive_avg_pool2d,
    3: F.adaptive_avg_pool3d,
}
_MAX: dict[int, Callable[..., torch.Tensor]] = {
    1: F.adaptive_max_pool1d,
    2: F.adaptive_max_pool2d,
    3: F.adaptive_max_pool3d,
}


def nearest_exact_indices(size_in: int, size_out: int, device: torch.device) -> torch.Tensor:
    """``F.interpolate(mode="nearest-exact")``'s source indices for float32 inputs.

    ``min(floor((i + 0.5) * s), in - 1)`` with ``s = in / out``, computed in float32 as
    PyTorch's CPU kernel does for float32 (and uint8) tensors, which is what MONAI's
    ``DeepSupervisionLoss`` and nnU-Net v2's ``DownsampleSegForDSTransform`` (``seg.float()``)
    run. Indexing with them copies the values, so any dtype keeps them exactly.

    Example:
        >>> nearest_exact_indices(10, 3, torch.device("cpu"))
        tensor([1, 5, 8])
    """
    scale = torch.tensor(size_in, dtype=torch.float32) / torch.tensor(size_out, dtype=torch.float32)
    pos = (torch.arange(size_out, dtype=torch.float32) + 0.5) * scale
    return pos.floor().long().clamp_(max=size_in - 1).to(device)


def _index_select_spatial(
    target: torch.Tensor, size: tuple[int, ...], rule: Callable[..., torch.Tensor]
) -> torch.Tensor:
    out = target
    for i, s in enumerate(size):
        dim = target.dim() - len(size) + i
        if out.shape[dim] != s:
            out = out.index_select(dim, rule(out.shape[dim], s, out.device))
    return out


def _pool(
    fn: dict[int, Callable[..., torch.Tensor]], x: torch.Tensor, size: tuple[int, ...]
) -> torch.Tensor:
    out = fn[len(size)](x, size)
    return out[0] if isinstance(out, tuple) else out


def _valid(target: torch.Tensor, num_classes: int, ignore_index: int | None) -> torch.Tensor:
    valid = (target >= 0) & (target < num_classes)
    return valid if ignore_index is None else valid & (target != ignore_index)


def soft_target(
    target: torch.Tensor,
    size: tuple[int, ...],
    *,
    num_classes: int,
    dense: bool,
    dtype: torch.dtype = torch.float32,
    ignore_index: int | None = None,
) -> torch.Tensor:
    """The fraction of each class in each cell: a (B, C, *size) soft target.

    Class indices outside ``[0, num_classes)`` (ignore labels: 255, -100), and
    ``ignore_index``, are left out: the
    fractions are over the cell's valid pixels and sum to 1 there; a cell with no valid pixel is
    all zeros (it adds 0 to a cross-entropy with probability targets). A dense target
    (B, C, *S) is averaged per channel (masks and probabilities stay masks and probabilities).

    Example:
        >>> t = torch.tensor([[0, 0, 1, 255]])
        >>> soft_target(t, (2,), num_classes=2, dense=False)
        tensor([[[1., 0.],
                 [0., 1.]]])
    """
    if dense:
        x = target if target.is_floating_point() else target.to(dtype)
        return _pool(_AVG, x, size)
    valid = _valid(target, num_classes, ignore_index)
    onehot = F.one_hot(torch.where(valid, target, 0).long(), num_classes).to(dtype)
    onehot = onehot.mul_(valid.unsqueeze(-1).to(dtype)).movedim(-1, 1)
    share = _pool(_AVG, onehot, size)
    count = _pool(_AVG, valid.unsqueeze(1).to(dtype), size)
    return torch.where(count > 0, share / count.clamp_min(torch.finfo(dtype).tiny), 0.0)


def max_target(
    target: torch.Tensor,
    size: tuple[int, ...],
    *,
    num_classes: int,
    dense: bool,
    ignore_index: int | None = None,
) -> torch.Tensor:
    """A cell is positive where any of its pixels is; same dtype as ``target``.

    Dense targets (binary or multi-label masks, B, C, *S) are max-pooled per channel. Class
    indices (B, *S) take the cell's highest valid class, so a lesion labelled above the organ
    around it survives downsampling; ignore labels (outside ``[0, num_classes)``, and
    ``ignore_index``) only where the
    whole cell is ignored. Values pass through float32: exact up to 2**24.

    Example:
        >>> t = torch.tensor([[0, 2, 1, 1, 255, 255]])
        >>> max_target(t, (3,), num_classes=3, dense=False)
        tensor([[  2,   1, 255]])
    """
    x = target.float()
    if dense:
        return _pool(_MAX, x, size).to(target.dtype)
    valid = _valid(target, num_classes, ignore_index)
    best = _pool(_MAX, torch.where(valid, x, -1.0).unsqueeze(1), size)[:, 0]
    whole = _pool(_MAX, x.unsqueeze(1), size)[:, 0]
    return torch.where(best >= 0, best, whole).to(target.dtype)


def downsample_target_as(
    target: torch.Tensor,
    size: tuple[int, ...],
    mode: str,
    *,
    num_classes: int,
    dense: bool,
    dtype: torch.dtype,
    tap: str,
    ignore_index: int | None = None,
) -> torch.Tensor:
    """Downsample ``target`` to the spatial ``size`` with ``mode`` (not ``"nearest"``).

    Example:
        >>> t = torch.tensor([[0, 0, 0, 3]])
        >>> downsample_target_as(t, (2,), "max", num_classes=4, dense=False,
        ...                      dtype=torch.float32, tap="x")
        tensor([[0, 3]])
    """
    if mode == "nearest-exact":
        return _index_select_spatial(target, size, nearest_exact_indices)
    if len(size) not in _AVG:
        raise TargetError(
            f"tap {tap!r}: interpolation={mode!r} pools over 1 to 3 spatial dims, not "
            f"{len(size)} (target shape {tuple(target.shape)}); use 'nearest' or 'nearest-exact'"
        )
    if mode == "soft":
        soft_dtype = dtype if dtype.is_floating_point else torch.float32
        return soft_target(
            target,
            size,
            num_classes=num_classes,
            dense=dense,
            dtype=soft_dtype,
            ignore_index=ignore_index,
        )
    if mode == "max":
        return max_target(
            target, size, num_classes=num_classes, dense=dense, ignore_index=ignore_index
        )
    raise ConfigError(
        f"tap {tap!r}: unknown target interpolation {mode!r}; use 'nearest', "
        "'nearest-exact', 'soft' or 'max'"
    )
