"""The functional core: one tap's aux loss, and the rules it is made of, as pure functions.

:class:`~deepsup.DeepSupervision`, :meth:`~deepsup.DeepSupervision.exits`,
:class:`~deepsup.EarlyExit`, :mod:`deepsup.losses` and :mod:`deepsup.diagnostics` all call
these; none of them re-derives a rule. Use them directly for custom training loops
(``criterion=None`` returns the heads' predictions) or to inspect what a head is taught.

- :func:`aux_loss`: one tap's (weighted) aux loss from its prediction and the target;
- :func:`reconcile`: a prediction and a target of different spatial sizes made to match;
- :func:`upsample`, :func:`downsample`: the two directions (every target rule goes through
  :func:`downsample`);
- :func:`teacher_like`: the model's output as the teacher of a prediction;
- :func:`call_criterion`: a criterion called with classes where it wants them;
- :func:`causal_labels`: next-token labels (the causal shift, ignore label, padding);
- :func:`distillation_kl`, :func:`confidence`: along the class axis of the layout; a
  single-logit (binary) prediction is a Bernoulli variable, through the sigmoid.

Layouts: ``"NCHW"`` has the channels (classes) at dim 1, ``"NHWC"`` last (tokens
``(B, N, C)`` included). Targets are class indices ``(B, *S)`` or dense, in the prediction's
layout.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from deepsup import functional as DF
    >>> logits = torch.zeros(2, 6, 3)  # per-token predictions (B, N, K), classes last
    >>> labels = torch.tensor([[0, 1, 2, 0, 1, 2], [2, 2, 2, 2, 2, 255]])
    >>> loss = DF.aux_loss(logits, labels, nn.CrossEntropyLoss(ignore_index=255),
    ...                    layout="NHWC", ignore_index=255)
    >>> round(float(loss), 4)  # log(3): the cross-entropy over the 3 classes of each token
    1.0986
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from . import _targets
from ._checks import call_user
from ._layout import (
    LAYOUTS,
    Layout,
    channel_dim,
    channels_first,
    from_channels_first,
    spatial_size,
)
from .errors import ConfigError, ConfigTypeError, TargetError

__all__ = [
    "CONFIDENCES",
    "PREDICTION_MODES",
    "TARGET_MODES",
    "aux_loss",
    "call_criterion",
    "causal_labels",
    "confidence",
    "criterion_layout",
    "distillation_kl",
    "downsample",
    "expected_calibration_error",
    "first_tensor",
    "fit_temperature",
    "patience_streak",
    "predicted_class",
    "reconcile",
    "teacher_like",
    "upsample",
    "wants_teacher",
    "weighted",
]

Resize = Literal["prediction", "target"] | None
RESIZE_MODES = ("prediction", "target", None)
# interpolation= per resize direction; the first of each is the default
PREDICTION_MODES = ("linear", "nearest", "nearest-exact", "area", "bicubic")
TARGET_MODES = ("nearest", "nearest-exact", "soft", "max")
_LINEAR = {1: "linear", 2: "bilinear", 3: "trilinear"}


# --------------------------------------------------------------------------- selection


def _where(tap: str | None) -> str:
    return f"tap {tap!r}: " if tap is not None else ""


def first_tensor(output: Any) -> Any:
    """The tensor a tap (or a teacher) takes from a module's output by default: the output
    itself if a tensor, else the first element of a tuple, list, dict or dataclass.

    Example:
        >>> first_tensor((torch.ones(1), torch.zeros(1)))
        tensor([1.])
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output:
        return output[0]
    if isinstance(output, Mapping) and output:
        return next(iter(output.values()))
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        fields = dataclasses.fields(output)
        if fields:
            return getattr(output, fields[0].name)
    return None


# --------------------------------------------------------------------------- resizing


def upsample(
    prediction: torch.Tensor,
    size: tuple[int, ...],
    *,
    layout: Layout = "NCHW",
    interpolation: str = "linear",
    align_corners: bool = False,
    tap: str | None = None,
) -> torch.Tensor:
    """``F.interpolate`` of a prediction to the spatial ``size``, in its own layout.

    ``"linear"`` is bi- or trilinear by the number of spatial dims; ``align_corners`` applies
    to ``"linear"`` and ``"bicubic"``.

    Raises:
        TargetError: the mode cannot interpolate that many spatial dims.

    Example:
        >>> upsample(torch.zeros(1, 4, 4, 3), (8, 8), layout="NHWC").shape
        torch.Size([1, 8, 8, 3])
    """
    k = len(size)
    mode = _LINEAR.get(k, "") if interpolation == "linear" else interpolation
    if not mode or k > 3 or (mode == "bicubic" and k != 2):
        raise TargetError(
            f"{_where(tap)}cannot interpolate a prediction with {k} spatial dims "
            f"(shape {tuple(prediction.shape)}) with interpolation={interpolation!r}; use "
            "resize='target' or None" + ("" if k > 3 else ", or another interpolation")
        )
    ac = align_corners if mode.endswith(("linear", "bicubic")) else None
    x = channels_first(prediction, layout)
    return from_channels_first(F.interpolate(x, size=size, mode=mode, align_corners=ac), layout)


def downsample(
    target: torch.Tensor,
    size: tuple[int, ...],
    interpolation: str = "nearest",
    *,
    layout: Layout = "NCHW",
    num_classes: int | None = None,
    ignore_index: int | None = None,
    dtype: torch.dtype | None = None,
    tap: str | None = None,
) -> torch.Tensor:
    """A target downsampled to the spatial ``size``: the one entry point of every target rule.

    Args:
        target: class indices ``(B, *S)`` or a dense target in ``layout`` (``(B, C, *S)`` or
            ``(B, *S, C)``), with ``len(size)`` spatial dims, each at least ``size``.
        size: the spatial size to downsample to.
        interpolation: ``"nearest"`` (exact integer indexing; ignore-aware on class indices),
            ``"nearest-exact"`` (F.interpolate's float32 indices, as MONAI and nnU-Net v2),
            ``"soft"`` (class fractions per cell) or ``"max"`` (a cell is positive where any
            pixel is; on class indices, the cell's highest valid class).
        layout: where a dense target's channels are; a ``"soft"`` target of class indices
            comes out in it.
        num_classes: the class count, for ``"soft"`` and ``"max"`` on class indices (labels
            outside ``[0, num_classes)`` are ignore labels); without it, ``max + 1``.
        ignore_index: the ignore label: a cell is ignored only where all its pixels are. A
            label the target's dtype cannot hold ignores nothing.
        dtype: the dtype of a ``"soft"`` target (default float32).

    Returns:
        The target at ``size`` (the same object when already there).

    Raises:
        TargetError: the target does not fit ``size``; ConfigError: an unknown rule.

    Example:
        >>> t = torch.tensor([[0, 0, 2, 0, 1, 1, 1, 1]])
        >>> downsample(t, (2,)), downsample(t, (2,), "max")
        (tensor([[0, 1]]), tensor([[2, 1]]))
        >>> downsample(torch.tensor([[255, 3, 255, 4]]), (2,), ignore_index=255)
        tensor([[3, 4]])
    """
    size = tuple(int(s) for s in size)
    if interpolation not in TARGET_MODES:
        raise ConfigError(
            f"{_where(tap)}interpolation must be one of {TARGET_MODES} (got {interpolation!r})"
        )
    k = len(size)
    dense = target.dim() == k + 2
    spatial = spatial_size(target, layout) if dense else tuple(target.shape[1:])
    if target.dim() not in (k + 1, k + 2) or any(s > t for s, t in zip(size, spatial)):
        raise TargetError(
            f"{_where(tap)}target of shape {tuple(target.shape)} cannot be downsampled to "
            f"{size}: expected (B, *S) class indices or a dense target in layout {layout!r} "
            f"with {k} spatial dims, each at least as large as size"
        )
    if spatial == size:
        return target
    x = channels_first(target, layout) if dense else target
    if interpolation == "nearest":
        out = _targets.nearest(x, size) if dense else _targets.nearest_labels(x, size, ignore_index)
    elif interpolation == "nearest-exact":
        out = _targets.nearest_exact(x, size)
    else:
        if not _targets.pooled_dims_ok(size):
            raise TargetError(
                f"{_where(tap)}interpolation={interpolation!r} pools over 1 to 3 spatial dims, "
                f"not {k} (target shape {tuple(target.shape)}); use 'nearest' or "
                "'nearest-exact'"
            )
        if num_classes is None and interpolation == "soft" and not dense:
            raise ConfigError(
                f"{_where(tap)}interpolation='soft' on class indices needs num_classes= (got None)"
            )
        if num_classes is None:
            num_classes = x.shape[1] if dense else int(target.max()) + 1 if target.numel() else 1
        if interpolation == "soft":
            out = _targets.soft_target(
                x,
                size,
                num_classes=num_classes,
                dense=dense,
                dtype=dtype if dtype is not None and dtype.is_floating_point else torch.float32,
                ignore_index=ignore_index,
            )
        else:
            out = _targets.max_target(
                x, size, num_classes=num_classes, dense=dense, ignore_index=ignore_index
            )
    return from_channels_first(out, layout) if out.dim() == k + 2 else out


def _target_size(
    pred: torch.Tensor, target: torch.Tensor, layout: Layout, tap: str | None
) -> tuple[int, ...]:
    """The target's spatial size: class indices are (B, *S), dense targets as the prediction."""
    if target.dim() == pred.dim() - 1:
        return tuple(target.shape[1:])
    if target.dim() == pred.dim():
        return spatial_size(target, layout)
    where = "(B, C, *spatial)" if layout == "NCHW" else "(B, *spatial, C)"
    raise TargetError(
        f"{_where(tap)}target of shape {tuple(target.shape)} does not fit a prediction of shape "
        f"{tuple(pred.shape)} (layout {layout!r}); expected (B, *spatial) class indices or "
        f"{where} with {pred.dim() - 2} spatial dims. Pass the right target= (a dict "
        "{tap: target} gives one per tap), or Tap(layout=...) if the prediction's class axis "
        "is elsewhere"
    )


def reconcile(
    prediction: torch.Tensor,
    target: torch.Tensor,
    *,
    layout: Layout = "NCHW",
    resize: Resize = "prediction",
    interpolation: str | None = None,
    align_corners: bool = False,
    ignore_index: int | None = None,
    pyramid: dict[Any, torch.Tensor] | None = None,
    tap: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Make a prediction and a target match in spatial size, or check that they do.

    Args:
        prediction: ``(B, K)`` (returned as is) or dense in ``layout``.
        target: class indices ``(B, *S)`` or dense in ``layout``.
        resize: ``"prediction"`` upsamples the prediction (:func:`upsample`), ``"target"``
            downsamples the target (:func:`downsample`), ``None`` requires equal sizes.
        interpolation: the mode of that direction (None: ``"linear"`` / ``"nearest"``).
        pyramid: a per-forward cache of downsampled targets: taps whose predictions have the
            same spatial size (rule, layout and ignore label) share one.

    Raises:
        TargetError: the shapes do not fit, or differ with ``resize=None``.

    Example:
        >>> p, t = reconcile(torch.zeros(2, 3, 4, 4), torch.zeros(2, 8, 8, dtype=torch.long),
        ...                  resize="target")
        >>> p.shape, t.shape
        (torch.Size([2, 3, 4, 4]), torch.Size([2, 4, 4]))
    """
    if prediction.dim() <= 2:  # (B, K) or (B,): nothing spatial to reconcile
        return prediction, target
    size = _target_size(prediction, target, layout, tap)
    psize = spatial_size(prediction, layout)
    if size == psize:
        return prediction, target
    if resize == "prediction":
        mode = interpolation or PREDICTION_MODES[0]
        pred = upsample(
            prediction,
            size,
            layout=layout,
            interpolation=mode,
            align_corners=align_corners,
            tap=tap,
        )
        return pred, target
    if resize == "target":
        if any(p > t for p, t in zip(psize, size)):
            raise TargetError(
                f"{_where(tap)}resize='target' only downsamples, but the prediction "
                f"{tuple(prediction.shape)} is larger than the target {tuple(target.shape)}; "
                "use resize='prediction'"
            )
        mode = interpolation or TARGET_MODES[0]
        classes = prediction.shape[channel_dim(layout)]
        key: tuple[Any, ...] = (id(target), psize, mode, layout, ignore_index)
        if mode in ("soft", "max"):  # these read the class count; "soft" gives pred's dtype
            key += (classes, prediction.dtype)
        if pyramid is not None and key in pyramid:
            return prediction, pyramid[key]
        small = downsample(
            target,
            psize,
            mode,
            layout=layout,
            num_classes=classes,
            ignore_index=ignore_index,
            dtype=prediction.dtype,
            tap=tap,
        )
        if pyramid is not None:
            pyramid[key] = small
        return prediction, small
    raise TargetError(
        f"{_where(tap)}prediction of shape {tuple(prediction.shape)} and target of shape "
        f"{tuple(target.shape)} differ in spatial size and resize=None; pass "
        "resize='prediction' (upsample the prediction) or resize='target' (downsample the target)"
    )


# --------------------------------------------------------------------------- the teacher


def teacher_like(
    output: Any,
    prediction: Any,
    *,
    layout: Layout = "NCHW",
    align_corners: bool = False,
    tap: str | None = None,
) -> torch.Tensor:
    """The model's output as the teacher of ``prediction``: detached, resized to it.

    The tensor is picked as a tap's is (:func:`first_tensor`). A dense teacher whose spatial
    size differs from the prediction's is brought to it by the wrapper's rules: downsampled
    by nearest indexing when larger (as a dense target), interpolated (linear,
    ``align_corners``) when smaller (as a prediction).

    Raises:
        TargetError: ``output`` holds no tensor, or its batch, class count or number of dims
            differs from the prediction's.

    Example:
        >>> out = torch.randn(2, 4, 8, 8, requires_grad=True)
        >>> t = teacher_like({"out": out}, torch.zeros(2, 4, 4, 4))
        >>> t.shape, t.requires_grad
        (torch.Size([2, 4, 4, 4]), False)
    """
    teacher = first_tensor(output)
    if not isinstance(teacher, torch.Tensor):
        raise TargetError(
            f"{_where(tap)}its criterion wants the teacher, but the model's output of type "
            f"{type(output).__name__} holds no tensor as a tensor, or first element of a "
            "tuple/list/dict/dataclass; return the logits first, or use a criterion without "
            "wants_teacher"
        )
    teacher = teacher.detach()
    if not isinstance(prediction, torch.Tensor):
        return teacher
    c = channel_dim(layout)
    if (
        teacher.dim() != prediction.dim()
        or teacher.shape[0] != prediction.shape[0]
        or (prediction.dim() >= 2 and teacher.shape[c] != prediction.shape[c])
    ):
        raise TargetError(
            f"{_where(tap)}the teacher (the model's output) of shape {tuple(teacher.shape)} "
            f"does not fit the prediction of shape {tuple(prediction.shape)} (layout "
            f"{layout!r}: classes at dim {c}); both need the same batch, class count and "
            "number of dims. Give the tap a head with as many classes as the model"
        )
    if prediction.dim() <= 2:
        return teacher
    tsize, psize = spatial_size(teacher, layout), spatial_size(prediction, layout)
    if tsize == psize:
        return teacher
    if all(t >= p for t, p in zip(tsize, psize)):
        return downsample(teacher, psize, layout=layout, tap=tap)
    return upsample(teacher, psize, layout=layout, align_corners=align_corners, tap=tap)


def wants_teacher(criterion: Any) -> bool:
    """Whether ``criterion`` asks for the teacher (its ``wants_teacher`` attribute is True).

    Example:
        >>> wants_teacher(nn.CrossEntropyLoss()), wants_teacher(len)
        (False, False)
    """
    return getattr(criterion, "wants_teacher", False) is True


# --------------------------------------------------------------------------- the criterion

_CLASSES_FIRST_MODULES = (nn.CrossEntropyLoss, nn.NLLLoss)
_CLASSES_FIRST_FUNCTIONS = (F.cross_entropy, F.nll_loss)


def criterion_layout(criterion: Any) -> Layout | None:
    """The layout a criterion takes predictions in, or None: as the head gives them.

    A criterion declares it with a ``layout`` attribute. PyTorch's losses with a class axis
    (``nn.CrossEntropyLoss``, ``nn.NLLLoss``, ``F.cross_entropy``, ``F.nll_loss``, and
    partials of them) and MONAI's losses take classes at dim 1 (``"NCHW"``); elementwise
    losses (``nn.MSELoss``, ``nn.BCEWithLogitsLoss``, ...) work in any layout and other
    callables get the prediction as the head gave it.

    Example:
        >>> criterion_layout(nn.CrossEntropyLoss()), criterion_layout(nn.MSELoss())
        ('NCHW', None)
    """
    declared = getattr(criterion, "layout", None)
    if declared in LAYOUTS:
        return declared  # type: ignore[no-any-return]
    if isinstance(criterion, _CLASSES_FIRST_MODULES):
        return "NCHW"
    fn = criterion.func if isinstance(criterion, functools.partial) else criterion
    if any(fn is f for f in _CLASSES_FIRST_FUNCTIONS):
        return "NCHW"
    if type(criterion).__module__.startswith("monai.losses"):
        return "NCHW"
    return None


def _moved(t: Any, src: Layout, dst: Layout, dims: int) -> Any:
    if not isinstance(t, torch.Tensor) or t.dim() != dims or src == dst:
        return t
    return from_channels_first(channels_first(t, src), dst)


def _takes_layout(criterion: Any) -> bool:
    """Whether the criterion's signature takes ``layout=`` (a subclass that overrides
    ``forward`` without it keeps working)."""
    fn = type(criterion).forward if isinstance(criterion, nn.Module) else criterion
    try:
        return _signature_takes(fn, "layout")
    except TypeError:  # an unhashable callable: not cached
        return _signature_takes.__wrapped__(fn, "layout")


@functools.lru_cache(maxsize=256)
def _signature_takes(fn: Any, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind == p.VAR_KEYWORD for p in params)


def call_criterion(
    criterion: Callable[..., Any],
    prediction: Any,
    target: Any,
    *,
    layout: Layout = "NCHW",
    teacher: torch.Tensor | None = None,
    tap: str | None = None,
) -> torch.Tensor:
    """``criterion(prediction, target)``, with the classes where the criterion wants them.

    A dense prediction in ``layout`` is moved to :func:`criterion_layout`'s (with a dense
    target and the teacher); ``teacher=`` is passed when given (the teacher protocol), and
    ``layout=`` (the layout the criterion receives) to criteria with ``wants_layout = True``.
    A user's exception is re-raised as itself, with the tap and the shapes in a note.

    Raises:
        ConfigTypeError: the criterion did not return a tensor.

    Example:
        >>> pred, labels = torch.zeros(2, 5, 3), torch.zeros(2, 5, dtype=torch.long)
        >>> round(float(call_criterion(nn.CrossEntropyLoss(), pred, labels, layout="NHWC")), 4)
        1.0986
    """
    want = criterion_layout(criterion)
    given = layout
    if want is not None and isinstance(prediction, torch.Tensor) and prediction.dim() > 2:
        dims = prediction.dim()
        prediction = _moved(prediction, layout, want, dims)
        target = _moved(target, layout, want, dims)
        teacher = _moved(teacher, layout, want, dims)
        given = want
    kwargs: dict[str, Any] = {}
    if teacher is not None:
        kwargs["teacher"] = teacher
    if getattr(criterion, "wants_layout", False) is True and _takes_layout(criterion):
        kwargs["layout"] = given

    def note() -> str:
        def shape(t: Any) -> Any:
            return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__

        return (
            f"deepsup: raised in the criterion of tap {tap!r} (prediction {shape(prediction)}, "
            f"target {shape(target)})"
        )

    if tap is None:
        loss = criterion(prediction, target, **kwargs)
    else:
        loss = call_user(criterion, prediction, target, note=note, **kwargs)
    if not isinstance(loss, torch.Tensor):
        raise ConfigTypeError(
            f"{_where(tap)}the criterion returned {type(loss).__name__}, not a tensor"
        )
    return loss


def weighted(loss: torch.Tensor, weight: torch.Tensor | float) -> torch.Tensor:
    """``loss * weight`` exactly as ``loss * float(weight)`` computes it: in the loss's dtype,
    via float32 for half and bfloat16 (PyTorch's rule for Python scalars). A tensor weight
    (the wrapper's float64 buffer entry) is copied, so the schedule may advance before the
    backward.

    Example:
        >>> weighted(torch.tensor(2.0), torch.tensor(0.4, dtype=torch.float64))
        tensor(0.8000)
    """
    if not isinstance(weight, torch.Tensor):
        return loss * weight
    if loss.dtype in (torch.float16, torch.bfloat16):
        return (loss.float() * weight.float()).to(loss.dtype)
    return loss * weight.to(dtype=loss.dtype, copy=True)


def aux_loss(
    prediction: Any,
    target: Any,
    criterion: Callable[..., Any],
    *,
    layout: Layout = "NCHW",
    resize: Resize = "prediction",
    interpolation: str | None = None,
    align_corners: bool = False,
    ignore_index: int | None = None,
    teacher: Any = None,
    weight: torch.Tensor | float | None = None,
    pyramid: dict[Any, torch.Tensor] | None = None,
    tap: str | None = None,
) -> torch.Tensor:
    """One tap's aux loss: reconcile, teacher, criterion, ignore label, weight.

    1. a dense prediction and the target are reconciled (:func:`reconcile`);
    2. a criterion with ``wants_teacher = True`` gets ``teacher=`` (:func:`teacher_like` of
       ``teacher``, the model's output);
    3. the criterion runs with the classes where it wants them (:func:`call_criterion`);
    4. with class indices and an ``ignore_index``, a batch without any valid label gives 0
       (in the graph, no host sync) where a mean over nothing would be NaN;
    5. ``weight`` (if given) multiplies it exactly (:func:`weighted`).

    Args:
        prediction: the head's output, in ``layout`` (``(B, K)`` needs no layout).
        target: class indices ``(B, *S)``, or dense in ``layout``; anything else is handed
            to the criterion as is.
        criterion: ``criterion(prediction, target) -> loss``.
        layout: the prediction's layout.
        resize: see :func:`reconcile`.
        interpolation: see :func:`reconcile`.
        align_corners: see :func:`reconcile`.
        ignore_index: the target's ignore label (see :func:`reconcile`).
        teacher: the model's output, for criteria that want it.
        weight: the aux weight; None returns the unweighted loss.
        pyramid: see :func:`reconcile`.
        tap: the tap's name, for messages.

    Raises:
        TargetError: the target does not fit, or a teacher is wanted and not given.

    Example:
        >>> pred = torch.zeros(2, 3, 4, 4, requires_grad=True)
        >>> target = torch.full((2, 8, 8), 255)  # every pixel ignored
        >>> aux_loss(pred, target, nn.CrossEntropyLoss(ignore_index=255), resize="target",
        ...          ignore_index=255, weight=0.4)
        tensor(0., grad_fn=<MulBackward0>)
    """
    pred, tgt = prediction, target
    if isinstance(pred, torch.Tensor) and isinstance(tgt, torch.Tensor):
        pred, tgt = reconcile(
            pred,
            tgt,
            layout=layout,
            resize=resize,
            interpolation=interpolation,
            align_corners=align_corners,
            ignore_index=ignore_index,
            pyramid=pyramid,
            tap=tap,
        )
    taught = None
    if wants_teacher(criterion):
        if teacher is None:
            raise TargetError(
                f"{_where(tap)}its criterion wants the teacher (wants_teacher=True) but none "
                "was given; pass teacher= (the model's output)"
            )
        taught = teacher_like(teacher, pred, layout=layout, align_corners=align_corners, tap=tap)
    loss = call_criterion(criterion, pred, tgt, layout=layout, teacher=taught, tap=tap)
    labels = (
        isinstance(pred, torch.Tensor)
        and isinstance(tgt, torch.Tensor)
        and not tgt.is_floating_point()
        and tgt.dim() == pred.dim() - 1
    )
    ignore = _targets.ignore_label_for(tgt, ignore_index) if labels else None
    if ignore is not None:
        loss = torch.where((tgt != ignore).any(), loss, 0.0)
    return loss if weight is None else weighted(loss, weight)


# --------------------------------------------------------------------------- class axis


def _log_probabilities(x: torch.Tensor) -> torch.Tensor:
    """Log class probabilities of channels-first logits: log-softmax over dim 1, or
    ``(log p, log(1 - p))`` through the log-sigmoid for a single logit (a Bernoulli)."""
    if x.shape[1] == 1:
        return torch.cat([F.logsigmoid(x), F.logsigmoid(-x)], dim=1)
    return F.log_softmax(x, dim=1)


def distillation_kl(
    prediction: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
    *,
    layout: Layout = "NCHW",
) -> torch.Tensor:
    """``T^2 * KL(p_teacher || p_prediction)`` at temperature ``T``, over the class axis.

    Softmax over the classes (dim 1 for ``"NCHW"``, last for ``"NHWC"``), summed over them and
    averaged over the batch and any positions (per-pixel or per-token distillation); a
    single-logit prediction is a Bernoulli variable through the sigmoid. Float32 at least.

    Example:
        >>> p = torch.tensor([[1.0, 0.0]])
        >>> float(distillation_kl(p, p, 2.0))
        0.0
        >>> round(float(distillation_kl(torch.tensor([[0.0]]), torch.tensor([[3.0]]), 1.0)), 4)
        0.5023
    """
    dtype = torch.promote_types(prediction.dtype, torch.float32)
    log_p = _log_probabilities(channels_first(prediction.to(dtype), layout) / temperature)
    log_q = _log_probabilities(channels_first(teacher.to(dtype), layout) / temperature)
    kl = (log_q.exp() * (log_q - log_p)).sum(dim=1)
    return temperature**2 * kl.mean()


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    """(B,) or (B, *positions) -> (B,): dense predictions average over positions."""
    return values.flatten(1).mean(1) if values.dim() > 1 else values


def _at_least_float(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when float32 or float64 (no copy), else in float32."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _max_probability(prediction: torch.Tensor, layout: Layout) -> torch.Tensor:
    x = channels_first(_at_least_float(prediction), layout)
    if x.shape[1] == 1:  # max(p, 1 - p) = sigmoid(|z|), without building (p, 1 - p)
        return _per_sample(x[:, 0].abs().sigmoid())
    return _per_sample(x.softmax(1).amax(1))


def _margin(prediction: torch.Tensor, layout: Layout) -> torch.Tensor:
    x = channels_first(_at_least_float(prediction), layout)
    if x.shape[1] == 1:  # |p - (1 - p)| = tanh(|z| / 2)
        return _per_sample((x[:, 0].abs() / 2).tanh())
    top = x.softmax(1).topk(2, dim=1).values
    return _per_sample(top[:, 0] - top[:, 1])


def _entropy(prediction: torch.Tensor, layout: Layout) -> torch.Tensor:
    log_p = _log_probabilities(channels_first(_at_least_float(prediction), layout))
    h = -(log_p.exp() * log_p).sum(1)
    return _per_sample(1.0 - h / math.log(log_p.shape[1]))


CONFIDENCES: dict[str, Callable[[torch.Tensor, Layout], torch.Tensor]] = {
    "max_softmax": _max_probability,
    "margin": _margin,
    "entropy": _entropy,
}


def confidence(
    prediction: torch.Tensor, kind: str = "max_softmax", *, layout: Layout = "NCHW"
) -> torch.Tensor:
    """Per-sample confidence ``(B,)`` of logits; higher is surer.

    ``"max_softmax"``: the top class's probability; ``"margin"``: top-1 minus top-2
    probability; ``"entropy"``: ``1 - H(p) / log(K)`` (1 for a one-hot, 0 for uniform). The
    classes are at dim 1 (``"NCHW"``) or last (``"NHWC"``); dense predictions average over
    positions. A single logit ``(B, 1)`` is binary: ``p = sigmoid(z)`` against ``1 - p``.

    Example:
        >>> confidence(torch.tensor([[4.0, 0.0], [0.0, 0.0]]), "margin")
        tensor([0.9640, 0.0000])
        >>> confidence(torch.tensor([[0.0], [4.0]]))  # single logits: sigmoid
        tensor([0.5000, 0.9820])
    """
    if kind not in CONFIDENCES:
        raise ConfigError(
            f"confidence must be one of {sorted(CONFIDENCES)} or a callable prediction -> (B,) "
            f"(got {kind!r})"
        )
    return CONFIDENCES[kind](prediction, layout)


# --------------------------------------------------------------------------- exit rules


def predicted_class(prediction: torch.Tensor, *, layout: Layout = "NCHW") -> torch.Tensor:
    """The predicted class of logits: the argmax over the class axis, ``(B,)`` or
    ``(B, *positions)``; a single logit is binary (``z > 0``).

    Example:
        >>> predicted_class(torch.tensor([[0.1, 2.0, 0.3], [5.0, 0.0, 0.0]]))
        tensor([1, 0])
        >>> predicted_class(torch.tensor([[-1.0], [2.0]]))
        tensor([0, 1])
    """
    x = channels_first(prediction, layout)
    if x.dim() >= 2 and x.shape[1] == 1:
        return (x[:, 0] > 0).long()
    return x.argmax(1)


def patience_streak(
    streak: torch.Tensor | None, previous: torch.Tensor | None, current: torch.Tensor
) -> torch.Tensor:
    """How many consecutive exits up to this one agree, per sample (PABEE's patience rule).

    ``current`` holds this exit's predicted classes (``(B,)``, or ``(B, *positions)``: a
    sample agrees when every position does), ``previous`` the last exit's and ``streak`` the
    count there (``None`` at the first exit: the streak starts at 1). A sample whose class
    equals the previous exit's extends its streak by one, the others restart at 1. An early
    exit with ``patience=p`` leaves at the first exit where the streak reaches ``p`` (PABEE's
    patience ``t`` is ``p = t + 1``: ``t`` unchanged predictions after the first).

    Example:
        >>> s = patience_streak(None, None, torch.tensor([2, 0, 1]))
        >>> s = patience_streak(s, torch.tensor([2, 0, 1]), torch.tensor([2, 1, 1]))
        >>> s.tolist()
        [2, 1, 2]
    """
    if streak is None or previous is None:
        return torch.ones(current.shape[0], dtype=torch.long, device=current.device)
    same = (current == previous).flatten(1).all(1) if current.dim() > 1 else current == previous
    return torch.where(same, streak + 1, torch.ones_like(streak))


def expected_calibration_error(
    confidence: torch.Tensor, correct: torch.Tensor, *, bins: int = 15
) -> torch.Tensor:
    """Expected calibration error: ``sum_b |B_b| / N * |accuracy(B_b) - confidence(B_b)|``
    over ``bins`` equal-width confidence bins ``(k/bins, (k+1)/bins]`` (0 falls in the first).

    ``confidence`` is each sample's confidence in its predicted class (the max softmax),
    ``correct`` whether that prediction is right (bool or 0/1), both ``(N,)``. NaN confidences
    are left out.

    Example:
        >>> conf = torch.tensor([0.9, 0.9, 0.6, 0.6])
        >>> correct = torch.tensor([1, 1, 1, 0])
        >>> round(float(expected_calibration_error(conf, correct, bins=10)), 6)  # 0.4 / 4
        0.1
    """
    if not isinstance(bins, int) or isinstance(bins, bool) or bins < 1:
        raise ConfigError(f"bins must be an int >= 1 (got {bins!r})")
    if confidence.shape != correct.shape or confidence.dim() != 1:
        raise ConfigError(
            f"confidence and correct must be (N,) tensors of one shape (got "
            f"{tuple(confidence.shape)} and {tuple(correct.shape)})"
        )
    keep = ~confidence.isnan()
    conf = confidence[keep].double()
    hit = correct[keep].double()
    if conf.numel() == 0:
        return torch.tensor(0.0, dtype=torch.float64)
    index = (conf * bins).ceil().long().clamp(1, bins) - 1
    gap = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, hit - conf)
    return gap.abs().sum() / conf.numel()


def fit_temperature(
    prediction: torch.Tensor,
    target: torch.Tensor,
    *,
    layout: Layout = "NCHW",
    low: float = 0.05,
    high: float = 20.0,
    steps: int = 60,
) -> float:
    """The temperature ``T`` that minimises the cross-entropy of ``prediction / T`` on
    ``target`` (temperature scaling, Guo et al. 2017): a golden-section search over
    ``log T`` in ``[low, high]``. Scaling by ``T`` keeps the predicted class; it only makes
    the confidences honest, so that one threshold means the same at every exit.

    ``prediction``: logits ``(N, K)`` or dense, classes along ``layout``'s axis (a single
    logit: binary, through the sigmoid); ``target``: class indices.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> logits = 2 * torch.randn(4000, 3)
        >>> y = torch.multinomial(logits.softmax(1), 1)[:, 0]  # calibrated: y ~ softmax(logits)
        >>> round(fit_temperature(3 * logits, y), 1)  # 3x over-confident: T = 3
        3.0
    """
    x = channels_first(prediction.detach().double(), layout)
    if x.shape[1] == 1:
        x = torch.cat([torch.zeros_like(x), x], dim=1)  # sigmoid(z) = softmax((0, z))

    def nll(log_t: float) -> float:
        return float(F.cross_entropy(x / math.exp(log_t), target.long()))

    a, b = math.log(low), math.log(high)
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = nll(c), nll(d)
    for _ in range(steps):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = nll(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = nll(d)
    return math.exp((a + b) / 2)


# --------------------------------------------------------------------------- tokens


def causal_labels(
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The next-token labels of a causal LM: position ``t`` is taught token ``t + 1``.

    The shift of Hugging Face's ``ForCausalLMLoss``: ``labels`` padded with ``ignore_index``
    on the right and shifted left by one, so the last position has no label. Positions whose
    token is padding (``attention_mask == 0``) are ignored too.

    Args:
        labels: token ids ``(B, T)`` (``ignore_index`` where no loss is wanted).
        ignore_index: the label that is ignored.
        attention_mask: ``(B, T)``, 1 for real tokens and 0 for padding; None: no padding.

    Returns:
        ``(B, T)`` int64 labels, aligned with the logits ``(B, T, V)``.

    Raises:
        TargetError: ``labels`` is not an integer tensor with a sequence dim, or the mask's
            shape differs.

    Example:
        >>> causal_labels(torch.tensor([[5, 6, 7, 8]]), attention_mask=torch.tensor([[1, 1, 1, 0]]))
        tensor([[   6,    7, -100, -100]])
    """
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.dim() < 1:
        raise TargetError(
            "labels must be an integer tensor of token ids (B, T) (got "
            f"{_describe(labels)}); pass the input ids, or ids with {ignore_index} where no "
            "loss is wanted"
        )
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != labels.shape:
            raise TargetError(
                f"attention_mask must have the labels' shape {tuple(labels.shape)} (got "
                f"{_describe(attention_mask)}); pass the mask the model was given"
            )
        labels = labels.masked_fill(attention_mask == 0, ignore_index)
    padded = F.pad(labels, (0, 1), value=ignore_index)
    return padded[..., 1:].contiguous()


def _describe(t: Any) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__
