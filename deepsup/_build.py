"""Building the heads: one layout per tap, resolved once, channels inferred, the head made; and
running a head on a capture with the checks every caller shares."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ._capture import as_call
from ._checks import call_user
from ._config import TapSettings
from ._layout import Layout, channel_dim, declared_layouts, resolve
from .errors import (
    ChannelInferenceError,
    ConfigError,
    ConfigTypeError,
    DeepSupWarning,
    HeadError,
)
from .heads import Reuse

__all__ = ["Built", "HeadDict", "build_heads", "check_batch", "need_layout", "run_head"]


def _escape(name: str) -> str:
    return name.replace(".", "/")


class HeadDict(nn.ModuleDict):
    """The heads, keyed by tap name (``sup.heads["backbone.layer3"]``).

    Module keys cannot hold dots, so they are stored with ``/`` for ``.``; state_dict keys read
    ``heads.backbone/layer3.conv.weight``.

    Example:
        >>> from torch import nn
        >>> h = HeadDict({"a.b": nn.Linear(1, 1)})
        >>> list(h), "a.b" in h
        (['a.b'], True)
    """

    def __init__(self, heads: Mapping[str, nn.Module] | None = None) -> None:
        super().__init__({_escape(k): v for k, v in (heads or {}).items()})

    def __getitem__(self, key: str) -> nn.Module:
        return super().__getitem__(_escape(key))

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and super().__contains__(_escape(key))

    def __iter__(self) -> Iterator[str]:
        return (k.replace("/", ".") for k in super().__iter__())

    def keys(self) -> list[str]:  # type: ignore[override]
        return list(iter(self))

    def items(self) -> list[tuple[str, nn.Module]]:  # type: ignore[override]
        return [(k, self[k]) for k in self]


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


@dataclasses.dataclass
class Built:
    """What :func:`build_heads` gives: the heads, the settings with their resolved layouts,
    and the channel count of each head built from one (checked on every capture)."""

    heads: dict[str, nn.Module]
    settings: dict[str, TapSettings]
    channels: dict[str, int]


def _takes_layout(factory: Any) -> bool:
    try:
        return "layout" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False


def build_heads(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    settings: Mapping[str, TapSettings],
    specs: Mapping[str, Any],
    shapes: Mapping[str, torch.Size],
) -> Built:
    """Resolve each tap's layout (:func:`deepsup._layout.resolve`, with the dry run's
    ``shapes`` where there was one) and build its head: a factory is called with the channel
    count (and ``layout=`` when it takes either layout), a ready module used as is (deep-copied
    when several taps share it)."""
    uses: dict[int, int] = {}
    for name, spec in specs.items():
        if isinstance(spec, nn.Module):
            uses[id(spec)] = uses.get(id(spec), 0) + 1
        if isinstance(spec, Reuse):
            check_reused(model, name, spec)
    out = Built({}, {}, {})
    for name, spec in specs.items():
        s = settings[name]
        if spec is None:
            raise ConfigError(
                f"tap {name!r} has no head; pass head= (e.g. deepsup.heads.seg(num_classes)) "
                "or Tap(head=...)"
            )
        head_in, head_out = declared_layouts(spec)
        layout, channels = resolve(
            model,
            name,
            modules[name],
            shape=shapes.get(name),
            declared=s.layout,
            head_declared=head_in,
        )
        if isinstance(spec, nn.Module):
            if s.in_channels is not None:
                warnings.warn(
                    f"tap {name!r}: Tap(in_channels={s.in_channels}) has no effect with a "
                    "ready head module (it is used as given)",
                    DeepSupWarning,
                    stacklevel=4,
                )
            # a Reuse head runs the model's own modules: shared by every tap, never copied
            copied = uses[id(spec)] > 1 and not isinstance(spec, Reuse)
            head = copy.deepcopy(spec) if copied else spec
        else:
            count = s.in_channels if s.in_channels is not None else channels
            if count is None:
                raise ChannelInferenceError(_no_channels(name, modules[name], layout, shapes))
            out.channels[name] = count
            adapt = head_in is None and _takes_layout(spec)
            if adapt and layout is None:
                raise ConfigError(
                    f"tap {name!r}: where the channels of its output are is ambiguous: the "
                    f"layers of {type(modules[name]).__name__} mix channels-first ones (Conv, "
                    "BatchNorm) and channels-last ones (Linear, LayerNorm), and there was no "
                    "dry run; pass example_input= (a batch) for one, or Tap(layout='NCHW') / "
                    "Tap(layout='NHWC')"
                )
            head = spec(count, layout=layout) if adapt else spec(count)
            if not isinstance(head, nn.Module):
                hint = (
                    " (a factory of factories: was a head maker passed uncalled?)"
                    if callable(head)
                    else ""
                )
                raise ConfigTypeError(
                    f"tap {name!r}: the head factory returned {type(head).__name__}, not an "
                    f"nn.Module{hint}; head= takes a callable in_channels -> nn.Module such as "
                    "deepsup.heads.seg(num_classes)"
                )
        _, built_out = declared_layouts(head)
        pred_layout = built_out or head_out or layout
        out.heads[name] = head
        out.settings[name] = dataclasses.replace(s, layout=layout, pred_layout=pred_layout)
    return out


def check_reused(model: nn.Module, name: str, head: Reuse) -> None:
    """Every module a :class:`~deepsup.heads.Reuse` head runs must be part of ``model``:
    else its parameters would be in no ``parameters()`` at all, and never trained."""
    own = {id(m) for m in model.modules()}
    for m in head.reused:
        if id(m) not in own:
            raise ConfigError(
                f"tap {name!r}: heads.reuse() got a {type(m).__name__} that is not a module of "
                f"the wrapped {type(model).__name__}, so its parameters would be in no "
                "optimizer; pass modules of the model itself (e.g. model.lm_head), or a ready "
                "module (nn.Sequential(...)) for an untied head of its own"
            )


def _no_channels(
    name: str, module: nn.Module, layout: Layout | None, shapes: Mapping[str, torch.Size]
) -> str:
    if name in shapes:
        return (
            f"cannot infer the channels of tap {name!r} ({type(module).__name__}): its output "
            f"in the dry run has shape {tuple(shapes[name])}, and neither its layers nor the "
            "layers before it say where the channels are; pass Tap(layout='NCHW') or "
            "Tap(layout='NHWC'), or Tap(in_channels=...)"
        )
    ran = " (it did not run in the dry run)" if shapes else ""
    return (
        f"cannot infer the channels of tap {name!r} ({type(module).__name__}){ran}; pass "
        "example_input= to DeepSupervision for a dry run, or Tap(in_channels=...)"
        + ("" if layout is not None else " and Tap(layout=...)")
    )


def need_layout(name: str, layout: Layout | None, t: torch.Tensor, what: str) -> Layout:
    """``layout``, or ``"NCHW"`` for a tensor without positions; raise where it matters and
    was not decided."""
    if layout is not None:
        return layout
    if t.dim() <= 2:
        return "NCHW"
    raise ConfigError(
        f"tap {name!r}: where the channels of its {what} of shape {tuple(t.shape)} are could "
        "not be inferred (the tapped module's layers do not say, and there was no dry run); "
        "pass Tap(layout='NCHW') (channels at dim 1) or Tap(layout='NHWC') (channels last, "
        "tokens included), or example_input= for a dry run"
    )


def _check_channels(name: str, feat: torch.Tensor, want: int, layout: Layout | None) -> None:
    if feat.dim() < 2 or layout is None:
        return
    got = feat.shape[channel_dim(layout)]
    if got != want:
        raise ChannelInferenceError(
            f"tap {name!r}: its head was built for {want} channels but the captured output has "
            f"shape {tuple(feat.shape)} (layout {layout!r}: channels at dim "
            f"{channel_dim(layout)}); pass example_input= (a batch) for an exact dry run, "
            "Tap(in_channels=...), or Tap(layout=...) if the channels are elsewhere"
        )


def run_head(
    name: str, s: TapSettings, head: nn.Module, feat: torch.Tensor, channels: Mapping[str, int]
) -> Any:
    """The head of tap ``name`` on ``feat``, checked (channels, in-place change of its input);
    a user's exception is re-raised with the tap in a note. Shared by the training forward,
    ``exits()`` and :class:`~deepsup.EarlyExit`."""
    want = channels.get(name)
    if want is not None:
        _check_channels(name, feat, want, s.layout)
    # a head that changes its input in place would change the model's output (a tap on the
    # last module) or a tensor autograd saved (backward fails far from here): checked below
    # (inference tensors have no version counter: EarlyExit under inference_mode)
    skip = s.clone or torch.compiler.is_compiling() or feat.is_inference()
    version = -1 if skip else feat._version
    pred = call_user(
        head,
        feat,
        note=lambda: (
            f"deepsup: raised in the head of tap {name!r} (input shape "
            f"{tuple(feat.shape)}, dtype {feat.dtype})"
        ),
    )
    if version >= 0 and feat._version != version:
        raise HeadError(
            f"tap {name!r}: its head changed its input in place (an in-place op such as "
            "ReLU(inplace=True) at the head's start), which would change the model's output "
            "or a tensor autograd saved for backward. Pass Tap(clone=True) to give the head "
            "a copy, or use a head that does not modify its input"
        )
    return pred
