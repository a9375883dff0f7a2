"""Inferring a tapped output's channel count without running the model."""

from __future__ import annotations

from typing import Any

from torch import nn

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
_CONVS = (nn.modules.conv._ConvNd,)


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


def channel_dim(ndim: int, layout: str) -> int:
    """Where the channels are: tokens (B, N, C) and NHWC maps last, NCHW maps dim 1."""
    if ndim == 3 or layout == "NHWC":
        return -1
    return 1
