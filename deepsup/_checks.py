"""Construction-time checks of the wrapper's arguments that would otherwise fail confusingly."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from . import heads as _heads
from ._capture import as_call
from ._errors import ConfigError, ConfigTypeError

__all__ = ["check_batch", "check_head", "check_target_key"]


_MAKERS = {_heads.seg: "seg", _heads.classification: "classification", _heads.tokens: "tokens"}


def check_head(head: Any, where: str) -> None:
    """Refuse, at construction, the head specs that would fail confusingly later."""
    if head is None or isinstance(head, nn.Module):
        return
    if head in _MAKERS:
        name = _MAKERS[head]
        raise ConfigTypeError(
            f"{where}head=heads.{name} was passed uncalled; call it with the head's settings: "
            f"head=heads.{name}(num_classes=...)"
        )
    if isinstance(head, type):
        raise ConfigTypeError(
            f"{where}head={head.__name__} is a class; pass a factory in_channels -> nn.Module "
            f"(e.g. functools.partial({head.__name__}, num_classes=...) or deepsup.heads.seg(...)) "
            "or a ready module"
        )
    if not callable(head):
        raise ConfigTypeError(
            f"{where}head must be a factory in_channels -> nn.Module or an nn.Module "
            f"(got {type(head).__name__})"
        )


def check_target_key(model: nn.Module, key: str) -> str:
    if not isinstance(key, str) or not key.isidentifier():
        raise ConfigError(f"target_key must be a keyword name (got {key!r})")
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # no signature to read (a builtin): nothing can clash
        return key
    p = params.get(key)
    if p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
        raise ConfigError(
            f"{type(model).__name__}.forward takes its own {key}= parameter, which the wrapper "
            f"would take for the aux losses (the model would never see it); pass another name "
            f'for the wrapper\'s, e.g. DeepSupervision(..., target_key="aux_target"), and call '
            f"sup(x, {key}=..., aux_target=y)"
        )
    return key


def check_batch(example_input: Any, shapes: Mapping[str, torch.Size]) -> None:
    """A dry run on an input without its batch dim gives captures without one: say so."""
    args, _ = as_call(example_input)
    x = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if x is None or x.dim() < 2 or not shapes:
        return
    if all(len(s) < 1 or s[0] != x.shape[0] for s in shapes.values()):
        raise ConfigError(
            f"example_input of shape {tuple(x.shape)} looks unbatched: no tap's output in the "
            f"dry run has its first dim ({x.shape[0]}) as batch size (captured "
            f"{ {n: tuple(s) for n, s in shapes.items()} }); pass a batch, e.g. x.unsqueeze(0) "
            "for one sample"
        )
