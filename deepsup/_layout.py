"""Where a tensor's channels are (its layout), resolved once per tap from the model itself.

Two layouts: ``"NCHW"`` has the channels (or classes) at dim 1, ``(B, C, *spatial)`` for any
number of spatial dims (Conv1d's ``(B, C, L)`` and Conv3d's included); ``"NHWC"`` has them
last, ``(B, *spatial, C)``, which includes token sequences ``(B, N, C)``. A ``(B, C)`` tensor
is both.

:func:`resolve` decides a tap's layout and channel count from, strongest first:

1. a declaration: ``Tap(layout=...)``, or a head that takes only one layout;
2. the dry run's shape (``example_input=``), cross-checked with the channel counts that the
   tapped module's layers give (below) and timm's ``feature_info``;
3. timm: a model's ``output_fmt`` (``"NHWC"`` for Swin) for its ``feature_info`` stages;
4. the tapped module's own layers: Conv / BatchNorm / GroupNorm / InstanceNorm / pooling and
   norms named ``...2d`` (timm's ``LayerNorm2d``) have the channels at dim 1; Linear /
   LayerNorm / RMSNorm / Embedding (and Hugging Face's ``Conv1D``) have them last. When all of
   the module's layers agree, that is its layout. A module without such layers
   (an activation, dropout, ``Identity``) takes the layer registered before it;
5. timm's convention for ``feature_info`` stages without ``output_fmt``: ``"NCHW"`` (ConvNeXt
   stages, whose blocks mix Conv and channels-last Linear layers, but return NCHW).

What stays undecided is ``None``; the wrapper then asks for ``Tap(layout=...)`` or
``example_input=`` where the layout matters (a ``(B, C)`` output never needs one).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from .errors import ConfigError

__all__ = [
    "LAYOUTS",
    "Layout",
    "Resolved",
    "channel_dim",
    "channels_first",
    "check_layout",
    "declared_layouts",
    "from_channels_first",
    "resolve",
    "spatial_size",
]

Layout = Literal["NCHW", "NHWC"]
LAYOUTS: tuple[Layout, ...] = ("NCHW", "NHWC")


def check_layout(layout: object, what: str = "layout") -> Layout:
    """``layout`` must be ``"NCHW"`` (channels at dim 1) or ``"NHWC"`` (channels last).

    Example:
        >>> check_layout("NHWC")
        'NHWC'
    """
    if layout not in LAYOUTS:
        raise ConfigError(
            f"{what} must be 'NCHW' or 'NHWC' (got {layout!r}): 'NCHW' for channels at dim 1, "
            "(B, C, *spatial); 'NHWC' for channels last, (B, *spatial, C), tokens (B, N, C) "
            "included"
        )
    return layout


def channel_dim(layout: Layout) -> int:
    """The channel (class) axis of a tensor of this layout.

    Example:
        >>> channel_dim("NCHW"), channel_dim("NHWC")
        (1, -1)
    """
    return -1 if layout == "NHWC" else 1


def spatial_size(t: torch.Tensor, layout: Layout) -> tuple[int, ...]:
    """The spatial size of a ``(B, C, *S)`` or ``(B, *S, C)`` tensor (``()`` for ``(B, C)``).

    Example:
        >>> spatial_size(torch.zeros(2, 5, 7, 3), "NHWC")
        (5, 7)
    """
    return tuple(t.shape[2:]) if layout == "NCHW" else tuple(t.shape[1:-1])


def channels_first(t: torch.Tensor, layout: Layout) -> torch.Tensor:
    """``t`` with its channels at dim 1 (a view; ``t`` itself when already there).

    Example:
        >>> channels_first(torch.zeros(2, 5, 3), "NHWC").shape
        torch.Size([2, 3, 5])
    """
    return t.movedim(-1, 1) if layout == "NHWC" and t.dim() > 2 else t


def from_channels_first(t: torch.Tensor, layout: Layout) -> torch.Tensor:
    """The inverse of :func:`channels_first`.

    Example:
        >>> from_channels_first(torch.zeros(2, 3, 5), "NHWC").shape
        torch.Size([2, 5, 3])
    """
    return t.movedim(1, -1) if layout == "NHWC" and t.dim() > 2 else t


# --------------------------------------------------------------------------------- heads


def _declared(obj: Any, attr: str) -> Layout | None:
    if isinstance(obj, functools.partial):
        value = obj.keywords.get(attr)
        if value is None and attr == "layout":
            return _declared(obj.func, attr)
        return value if value in LAYOUTS else None
    if isinstance(obj, type):  # a class: its instances' attribute, not known before building
        return None
    value = getattr(obj, attr, None)
    return value if value in LAYOUTS else None


def declared_layouts(head: Any) -> tuple[Layout | None, Layout | None]:
    """The (input, prediction) layouts a head module or factory declares, or None.

    A head that takes only one layout says so with a ``layout`` attribute, and the layout of
    its prediction with ``output_layout`` (a ``functools.partial`` with its keywords). The
    built-in factories leave ``layout`` at None: they take either, and are built for the tap's.

    Example:
        >>> from deepsup import heads
        >>> declared_layouts(heads.tokens(3)), declared_layouts(heads.seg(3))
        (('NHWC', 'NCHW'), (None, 'NCHW'))
    """
    return _declared(head, "layout"), _declared(head, "output_layout")


# ------------------------------------------------------------------- evidence from the model


class _Hint(NamedTuple):
    layout: Layout | None  # None: the layers disagree
    channels: int | None  # of the last layer
    counts: frozenset[int]  # every layer's channel count


def _layer(m: nn.Module) -> tuple[Layout, int | None] | None:
    """The layout and channel count a layer's output has, for the layers whose type says so."""
    name = type(m).__name__
    if isinstance(m, nn.modules.conv._ConvNd):
        return "NCHW", int(m.out_channels)
    if isinstance(m, nn.modules.batchnorm._NormBase):  # BatchNorm, InstanceNorm
        return "NCHW", int(m.num_features)
    if isinstance(m, nn.GroupNorm):
        return "NCHW", int(m.num_channels)
    weight = getattr(m, "weight", None)
    width = int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() == 1 else None
    if "Norm" in name and name.endswith(("1d", "2d", "3d")):  # timm's LayerNorm2d, RmsNorm2d
        return "NCHW", width
    if isinstance(m, nn.LayerNorm):
        return "NHWC", int(m.normalized_shape[-1])
    if isinstance(m, (nn.Linear, nn.Bilinear)):
        return "NHWC", int(m.out_features)
    if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
        return "NHWC", int(m.embedding_dim)
    if name == "Conv1D" and isinstance(getattr(m, "nf", None), int):  # Hugging Face GPT-2
        return "NHWC", int(m.nf)  # type: ignore[arg-type]
    if name.endswith(("RMSNorm", "LayerNorm", "RmsNorm")) and width is not None:
        return "NHWC", width  # torch's RMSNorm, Llama's, T5's: a weight over the last dim
    if isinstance(
        m,
        (
            nn.modules.pooling._MaxPoolNd,
            nn.modules.pooling._AvgPoolNd,
            nn.modules.pooling._AdaptiveAvgPoolNd,
            nn.modules.pooling._AdaptiveMaxPoolNd,
        ),
    ):
        return "NCHW", None
    return None


def _hint(layers: Sequence[tuple[Layout, int | None]]) -> _Hint | None:
    if not layers:
        return None
    layouts = {lay for lay, _ in layers}
    counts = frozenset(c for _, c in layers if c is not None)
    last = next((c for _, c in reversed(layers) if c is not None), None)
    return _Hint(layers[-1][0] if len(layouts) == 1 else None, last, counts)


def _passes_through(m: nn.Module) -> bool:
    """Modules that keep their input's layout and channels: activations, dropout, Identity."""
    return type(m).__module__ == "torch.nn.modules.activation" or isinstance(
        m, (nn.modules.dropout._DropoutNd, nn.Identity)
    )


class _Evidence(NamedTuple):
    hint: _Hint | None  # what the layers say about the output (None: nothing usable)
    previous: _Hint | None  # the layer before a module without layers of its own
    counts: frozenset[int]  # channel counts to look for in a dry-run shape
    timm_fmt: Layout | None  # timm's output_fmt, for a feature_info stage
    timm_stage: bool  # a timm feature_info stage
    timm_count: int | None


def _evidence(model: nn.Module, name: str, module: nn.Module) -> _Evidence:
    """What the tapped module's layers, the layer before it and timm say."""
    own = _hint([found for m in module.modules() if (found := _layer(m)) is not None])
    previous = None
    if own is None:  # no layers of its own: the last layer registered before it
        before = None
        for other_name, other in model.named_modules():
            if other_name == name:
                break
            before = _layer(other) or before
        previous = _hint([before]) if before is not None else None
    hint = own or (previous if _passes_through(module) else None)
    seen = own or previous
    counts = set(seen.counts) if seen is not None else set()
    stage, fmt, count = _timm(model, name)
    if count is not None:
        counts.add(count)
    return _Evidence(hint, previous, frozenset(counts), fmt, stage, count)


def _timm(model: nn.Module, name: str) -> tuple[bool, Layout | None, int | None]:
    """(a timm ``feature_info`` entry names the tap, the model's ``output_fmt``, its count)."""
    parts = name.split(".")
    for i in range(len(parts)):
        owner = model.get_submodule(".".join(parts[:i])) if i else model
        info = getattr(owner, "feature_info", None)
        entries = getattr(info, "info", info)
        if not isinstance(entries, (list, tuple)):
            continue
        rest = ".".join(parts[i:])
        for e in entries:
            if isinstance(e, dict) and e.get("module") in (rest, rest.replace(".", "_")):
                raw = getattr(owner, "output_fmt", None)
                fmt = str(getattr(raw, "value", raw)) if raw is not None else None
                count = e.get("num_chs")
                layout = check_layout(fmt) if fmt in LAYOUTS else None
                return True, layout, int(count) if isinstance(count, int) else None
    return False, None, None


class Resolved(NamedTuple):
    """A tap's resolved layout and channel count (either None where undecided)."""

    layout: Layout | None
    channels: int | None


def resolve(
    model: nn.Module,
    name: str,
    module: nn.Module,
    *,
    shape: Sequence[int] | None = None,
    declared: Layout | None = None,
    head_declared: Layout | None = None,
) -> Resolved:
    """Where the channels of tap ``name``'s output are, and how many (see the module docs).

    Args:
        model: the model; ``name`` and ``module`` the tapped submodule.
        shape: the tapped output's shape in a dry run, if there was one.
        declared: ``Tap(layout=...)``, taken as given.
        head_declared: the only layout the tap's head takes; taken as given unless the dry
            run's shape clearly says otherwise (then a :class:`ConfigError`).

    Raises:
        ConfigError: the dry run's shape fits both layouts, and nothing else decides; or it
            contradicts the head's declaration.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 4), nn.ReLU())
        >>> resolve(model, "1", model[1])
        Resolved(layout='NHWC', channels=4)
        >>> resolve(model, "2", model[2], shape=(2, 5, 4))  # a ReLU: the Linear before it
        Resolved(layout='NHWC', channels=4)
    """
    if shape is not None and len(shape) <= 2:  # (B, C): both layouts; (B,): no channels
        return Resolved("NCHW", int(shape[1]) if len(shape) == 2 else None)
    ev = _evidence(model, name, module)
    if declared is not None:  # taken as given: an ambiguous shape is what it settles
        inferred: Layout | None = declared
    elif shape is not None:
        inferred = _from_shape(name, tuple(shape), ev, settled=head_declared)
    else:
        inferred = _without_shape(ev)
    layout = declared or head_declared or inferred
    if (
        declared is None
        and head_declared is not None
        and shape is not None
        and inferred is not None
        and inferred != head_declared
        and (shape[1] in ev.counts) != (shape[-1] in ev.counts)
    ):
        raise ConfigError(
            f"tap {name!r}: its head takes {head_declared!r} input, but the tapped output of "
            f"shape {tuple(shape)} has its {sorted(ev.counts)} channels at dim "
            f"{channel_dim(inferred)} ({inferred!r}); use a head for {inferred!r} features, or "
            f"pass Tap(layout={head_declared!r}) if the head is right"
        )
    if shape is not None and layout is not None:
        return Resolved(layout, int(shape[channel_dim(layout)]))
    if ev.timm_count is not None:
        return Resolved(layout, ev.timm_count)
    return Resolved(layout, ev.hint.channels if ev.hint is not None else None)


def _without_shape(ev: _Evidence) -> Layout | None:
    if ev.timm_fmt is not None:
        return ev.timm_fmt
    if ev.hint is not None and ev.hint.layout is not None:
        return ev.hint.layout
    return "NCHW" if ev.timm_stage else None  # timm's format of feature maps (ConvNeXt)


def _from_shape(
    name: str, shape: tuple[int, ...], ev: _Evidence, *, settled: Layout | None = None
) -> Layout | None:
    """The layout a dry-run shape of 3+ dims supports, given what the layers say.

    ``settled`` (a head's declared layout) decides a shape that fits both layouts.
    """
    first, last = shape[1] in ev.counts, shape[-1] in ev.counts
    if first != last:
        return "NCHW" if first else "NHWC"
    default = _without_shape(ev)
    if default is None and not first and ev.previous is not None:
        default = ev.previous.layout  # a module of its own (a concat): the layout flowing in
    if default is None and first and last:
        if settled is not None:
            return settled
        raise ConfigError(
            f"tap {name!r}: its output of shape {shape} has the layers' channel count "
            f"{sorted(ev.counts)} both at dim 1 and last, so where its channels are stays "
            "ambiguous; pass Tap(layout='NCHW') (channels at dim 1) or Tap(layout='NHWC') "
            "(channels last, tokens included)"
        )
    return default
