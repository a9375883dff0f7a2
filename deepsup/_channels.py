"""Where a tensor's channels are (its layout), and inferring a tapped output's channel count.

Layouts are explicit, never guessed from the number of dims: ``"NCHW"`` has the channels (or
classes) at dim 1, ``(B, C, *spatial)`` for any number of spatial dims (Conv1d's (B, C, L)
included); ``"NHWC"`` has them last, ``(B, *spatial, C)``, which includes token sequences
(B, N, C). A tap's layout comes from ``Tap(layout=...)``, else from its head's declaration (a
``layout`` attribute of the head module or factory, or the ``layout=`` keyword of a
``functools.partial``), else ``"NCHW"``, PyTorch's convention.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import nn

from ._errors import ChannelInferenceError, ConfigError

Layout = Literal["NCHW", "NHWC"]
LAYOUTS = ("NCHW", "NHWC")

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
_CONVS = (nn.modules.conv._ConvNd,)


def check_layout(layout: object, what: str = "layout") -> Layout:
    """``layout`` must be ``"NCHW"`` (channels at dim 1) or ``"NHWC"`` (channels last)."""
    if layout not in LAYOUTS:
        raise ConfigError(
            f"{what} must be 'NCHW' or 'NHWC' (got {layout!r}): 'NCHW' for channels at dim 1, "
            "(B, C, *spatial); 'NHWC' for channels last, (B, *spatial, C), tokens (B, N, C) "
            "included"
        )
    return layout  # type: ignore[return-value]


def _declared(obj: Any, attr: str) -> Layout | None:
    if isinstance(obj, functools.partial):
        value = obj.keywords.get(attr)
        if value is None and attr == "layout":
            return _declared(obj.func, attr)
        return value if value in LAYOUTS else None
    value = getattr(obj, attr, None)
    return value if value in LAYOUTS else None


def head_layouts(head: Any) -> tuple[Layout | None, Layout | None]:
    """The (input, prediction) layouts a head module or factory declares, or None.

    A head declares its input layout with a ``layout`` attribute and, when its prediction has
    another one, an ``output_layout`` attribute (the built-in heads do both); a
    ``functools.partial`` declares them with its keywords.
    """
    if isinstance(head, type):
        return None, None
    return _declared(head, "layout"), _declared(head, "output_layout")


def channel_dim(layout: Layout) -> int:
    """The channel (class) axis of a tensor of this layout.

    Example:
        >>> channel_dim("NCHW"), channel_dim("NHWC")
        (1, -1)
    """
    return -1 if layout == "NHWC" else 1


def _feature_info_entries(info: Any) -> list[dict[str, Any]]:
    """timm's ``feature_info``: a ``FeatureInfo`` (``.info``) or a list of dicts."""
    entries = getattr(info, "info", info)
    if not isinstance(entries, (list, tuple)):
        return []
    return [e for e in entries if isinstance(e, dict) and "module" in e and "num_chs" in e]


def from_feature_info(model: nn.Module, name: str) -> int | None:
    """Channels from timm's ``feature_info`` on the model or on any module above the tap."""
    parts = name.split(".")
    for i in range(len(parts)):
        owner = model.get_submodule(".".join(parts[:i])) if i else model
        entries = _feature_info_entries(getattr(owner, "feature_info", None))
        rest = ".".join(parts[i:])
        for e in entries:
            if e["module"] in (rest, rest.replace(".", "_")):
                return int(e["num_chs"])
    return None


def _out_channels(m: nn.Module) -> int | None:
    if isinstance(m, _CONVS):
        return int(m.out_channels)
    if isinstance(m, nn.modules.batchnorm._NormBase):
        return int(m.num_features)
    if isinstance(m, nn.GroupNorm):
        return int(m.num_channels)
    if isinstance(m, nn.LayerNorm):
        return int(m.normalized_shape[-1])
    if isinstance(m, nn.Linear):
        return int(m.out_features)
    return None


def from_last_layer(module: nn.Module) -> int | None:
    """Channels of the last conv/norm/linear registered in the tapped module (a heuristic)."""
    found = None
    for m in module.modules():
        c = _out_channels(m)
        if c is not None:
            found = c
    return found


def infer_channels(
    model: nn.Module,
    name: str,
    module: nn.Module,
    *,
    layout: Layout,
    given: int | None,
    shape: torch.Size | None,
    dry_run: bool,
) -> int:
    """A tap's channel count, in order: ``given``; the dry run's shape at ``layout``'s channel
    axis; timm's ``feature_info``; the tapped module's last conv/norm/linear.

    Raises:
        ChannelInferenceError: none of them gives a count.
    """
    if given is not None:
        return given
    if shape is not None and len(shape) > 1:
        return int(shape[channel_dim(layout)])
    channels = from_feature_info(model, name)
    if channels is None:
        channels = from_last_layer(module)
    if channels is None:
        ran = " (it did not run in the dry run)" if dry_run else ""
        raise ChannelInferenceError(
            f"cannot infer the channels of tap {name!r} ({type(module).__name__}){ran}; pass "
            "example_input= to DeepSupervision for a dry run, or Tap(in_channels=...)"
        )
    return channels


def check_channels(
    name: str, feat: torch.Tensor, expected: Mapping[str, int], layout: Layout
) -> None:
    """Raise if a captured feature does not have the channels its head was built for."""
    want = expected.get(name)
    if want is None or feat.dim() < 2:
        return
    got = feat.shape[channel_dim(layout)]
    if got != want:
        raise ChannelInferenceError(
            f"tap {name!r}: its head was built for {want} channels but the captured output has "
            f"shape {tuple(feat.shape)} (layout {layout!r}: channels at dim "
            f"{channel_dim(layout)}); pass example_input= (a batch) for an exact dry run, "
            "Tap(in_channels=...), or Tap(layout='NHWC') for channels-last features or tokens"
        )
