"""The target downsampling rules, each a pure function on channels-first targets.

A target is class indices ``(B, *S)`` or dense ``(B, C, *S)``, of any dtype, with 1 to 3
spatial dims (``"nearest"`` and ``"nearest-exact"``: any number). Only
:func:`deepsup.functional.downsample` calls these (it handles layouts and dispatches on the rule).

- ``"nearest"``: output index ``i`` takes source index ``floor(i * in / out)``, in exact
  integer arithmetic; on class indices with an ignore label, a pick that is the ignore label
  falls back to the first valid label of its cell.
- ``"nearest-exact"``: ``F.interpolate(mode="nearest-exact")``'s float32 indices.
- ``"soft"``: the fraction of each class per cell; ``"max"``: a cell is positive where any of
  its pixels is. Cells are those of adaptive pooling.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "ignore_label_for",
    "max_target",
    "nearest",
    "nearest_exact",
    "nearest_exact_indices",
    "nearest_indices",
    "nearest_labels",
    "soft_target",
]

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


def ignore_label_for(target: torch.Tensor, ignore_index: int | None) -> int | None:
    """``ignore_index``, or None where no value of ``target``'s dtype can equal it (255 in an
    int8 target, -100 in a uint8 one): then no pixel is ignored.

    Example:
        >>> ignore_label_for(torch.zeros(2, dtype=torch.int8), 255) is None
        True
    """
    if ignore_index is None or target.is_floating_point() or target.dtype == torch.bool:
        return ignore_index if target.is_floating_point() else None
    info = torch.iinfo(target.dtype)
    return ignore_index if info.min <= ignore_index <= info.max else None


def nearest_indices(size_in: int, size_out: int, device: torch.device) -> torch.Tensor:
    """The source index of each output index ``i``: ``floor(i * in / out)``, in integers.

    Example:
        >>> nearest_indices(26, 22, torch.device("cpu"))[11]  # torch's float32 rule gives 12
        tensor(13)
    """
    return torch.div(
        torch.arange(size_out, device=device) * size_in, size_out, rounding_mode="floor"
    )


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


def _index(
    target: torch.Tensor,
    size: tuple[int, ...],
    rule: Callable[[int, int, torch.device], torch.Tensor],
) -> torch.Tensor:
    out = target
    for i, s in enumerate(size):
        dim = target.dim() - len(size) + i
        if out.shape[dim] != s:
            out = out.index_select(dim, rule(out.shape[dim], s, out.device))
    return out


def nearest(target: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Nearest-neighbour downsampling of the last ``len(size)`` dims by exact indexing.

    Example:
        >>> nearest(torch.arange(16).reshape(1, 4, 4), (2, 2))
        tensor([[[ 0,  2],
                 [ 8, 10]]])
    """
    return _index(target, size, nearest_indices)


def nearest_exact(target: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """``"nearest-exact"`` downsampling by indexing (values copied, never rounded).

    Example:
        >>> nearest_exact(torch.arange(10)[None], (3,))
        tensor([[1, 5, 8]])
    """
    return _index(target, size, nearest_exact_indices)


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


def nearest_labels(
    target: torch.Tensor, size: tuple[int, ...], ignore_index: int | None
) -> torch.Tensor:
    """Ignore-aware nearest downsampling of class indices ``(B, *S)``.

    Each output pixel takes the label that nearest indexing picks; where that label is
    ``ignore_index``, it takes the first valid label, in raster order, of its cell (the input
    pixels ``[floor(i*in/out), floor((i+1)*in/out))`` per dim). A cell is ``ignore_index`` only
    if all its pixels are, so a downsampled target never loses every valid pixel that the
    full-size one had. An ignore label the dtype cannot hold ignores nothing.

    Example:
        >>> t = torch.tensor([[[255, 1, 255, 2], [255, 3, 255, 4]]])
        >>> nearest(t, (1, 2)), nearest_labels(t, (1, 2), ignore_index=255)
        (tensor([[[255, 255]]]), tensor([[[1, 2]]]))
    """
    picked = nearest(target, size)
    ignore_index = ignore_label_for(target, ignore_index)
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


def _pool(
    fn: dict[int, Callable[..., torch.Tensor]], x: torch.Tensor, size: tuple[int, ...]
) -> torch.Tensor:
    out = fn[len(size)](x, size)
    return out[0] if isinstance(out, tuple) else out


def _valid(target: torch.Tensor, num_classes: int, ignore_index: int | None) -> torch.Tensor:
    valid = (target >= 0) & (target < num_classes)
    ignore_index = ignore_label_for(target, ignore_index)
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
    """The fraction of each class in each cell: a ``(B, C, *size)`` soft target.

    Class indices outside ``[0, num_classes)`` (ignore labels: 255, -100), and
    ``ignore_index``, are left out: the fractions are over the cell's valid pixels and sum to
    1 there; a cell with no valid pixel is all zeros (it adds 0 to a cross-entropy with
    probability targets). A dense target is averaged per channel.

    Example:
        >>> soft_target(torch.tensor([[0, 0, 1, 255]]), (2,), num_classes=2, dense=False)
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

    Dense targets (binary or multi-label masks) are max-pooled per channel. Class indices
    take the cell's highest valid class, so a lesion labelled above the organ around it
    survives downsampling; ignore labels (outside ``[0, num_classes)``, and ``ignore_index``)
    only where the whole cell is ignored. Values pass through float32: exact up to 2**24.

    Example:
        >>> max_target(torch.tensor([[0, 2, 1, 1, 255, 255]]), (3,), num_classes=3, dense=False)
        tensor([[  2,   1, 255]])
    """
    x = target.float()
    if dense:
        return _pool(_MAX, x, size).to(target.dtype)
    valid = _valid(target, num_classes, ignore_index)
    best = _pool(_MAX, torch.where(valid, x, -1.0).unsqueeze(1), size)[:, 0]
    whole = _pool(_MAX, x.unsqueeze(1), size)[:, 0]
    return torch.where(best >= 0, best, whole).to(target.dtype)


def pooled_dims_ok(size: tuple[int, ...]) -> bool:
    """Whether ``"soft"`` and ``"max"`` can pool over this many spatial dims."""
    return len(size) in _AVG
