"""``list_taps``: which modules can be tapped, what they output, and which are stage boundaries;
``build_model``: a model from a command-line spec."""

from __future__ import annotations

import importlib
import os
import re
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._capture import dry_run
from .errors import ConfigError, ConfigTypeError
from .functional import first_tensor

__all__ = ["TapInfo", "build_model", "format_taps", "list_taps"]

_STAGE = re.compile(
    r"(^|\.)(layer\d+|stages?\.\d+|stages?_\d+|blocks\.\d+|features\.\d+|levels?\.\d+"
    r"|encoder\.layers?\.\d+|layers\.\d+|res\d+|denseblock\d+)\Z"
)


@dataclass(frozen=True)
class TapInfo:
    """One tappable module, as :func:`list_taps` reports it.

    Attributes:
        name: the name to pass in ``taps=``.
        type: the module's class name.
        output: the output's type, e.g. ``Tensor`` or ``tuple``; empty without an input.
        shape: the selected tensor's shape, or None.
        calls: how many times the module ran in the example forward (None without an input).
        suggested: a stage boundary (timm's ``feature_info``, or a name such as ``layer3``,
            ``stages.2``, ``features.7``), the usual place for an aux head.
    """

    name: str
    type: str
    output: str = ""
    shape: tuple[int, ...] | None = None
    calls: int | None = None
    suggested: bool = False


class _Recorder:
    """A hook that counts calls and notes the first output (a small object, not a closure)."""

    def __init__(self, name: str, seen: dict[str, list[Any]]) -> None:
        self.name, self.seen = name, seen

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        self.seen.setdefault(self.name, []).append(output)


class _recording:  # noqa: N801 - used like a contextmanager function
    """Hooks that record every module's outputs while the ``with`` block runs."""

    def __init__(self, named: dict[str, nn.Module]) -> None:
        self.named = named
        self.seen: dict[str, list[Any]] = {}
        self.handles: list[Any] = []

    def __enter__(self) -> dict[str, list[Any]]:
        self.handles = [
            m.register_forward_hook(_Recorder(n, self.seen)) for n, m in self.named.items()
        ]
        return self.seen

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()


def _stages(model: nn.Module) -> set[str]:
    """The modules timm's ``feature_info`` (a ``FeatureInfo`` or a list of dicts) names."""
    found = set()
    for prefix, m in model.named_modules():
        info = getattr(m, "feature_info", None)
        entries = getattr(info, "info", info)
        if not isinstance(entries, (list, tuple)):
            continue
        for e in entries:
            if isinstance(e, dict) and "module" in e:
                found.add(f"{prefix}.{e['module']}" if prefix else str(e["module"]))
    return found


def list_taps(model: nn.Module, example_input: Any = None) -> list[TapInfo]:
    """List the modules of ``model`` that can be tapped.

    With ``example_input`` (a tensor, a tuple of arguments or a dict of keyword arguments) the
    model runs once in eval mode without gradient, and each entry tells its output's type and
    shape and how often the module ran; modules that did not run are listed with ``calls=0``.
    Tap a module that runs exactly once (or use ``Tap(calls=...)``).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
        >>> for t in list_taps(model, torch.randn(1, 3, 8, 8)):
        ...     print(t.name, t.type, t.shape, t.calls)
        0 Conv2d (1, 8, 6, 6) 1
        1 ReLU (1, 8, 6, 6) 1
    """
    named = dict(model.named_modules())
    named.pop("", None)
    stages = _stages(model)
    seen: dict[str, list[Any]] = {}
    if example_input is not None:
        seen = dry_run(model, example_input, _recording(named))
    out = []
    for name, module in named.items():
        outputs = seen.get(name, [])
        first = outputs[0] if outputs else None
        tensor = first_tensor(first) if outputs else None
        out.append(
            TapInfo(
                name=name,
                type=type(module).__name__,
                output=type(first).__name__ if outputs else "",
                shape=tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else None,
                calls=None if example_input is None else len(outputs),
                suggested=name in stages or bool(_STAGE.search(name)),
            )
        )
    return out


def format_taps(infos: list[TapInfo]) -> str:
    """A plain-text table of :func:`list_taps`' result; ``*`` marks suggested taps.

    Example:
        >>> print(format_taps([TapInfo("layer3", "Sequential", "Tensor", (1, 256, 8, 8), 1, True)]))
           name    type        output  shape           calls
        *  layer3  Sequential  Tensor  (1, 256, 8, 8)  1
    """
    rows = [("", "name", "type", "output", "shape", "calls")]
    for t in infos:
        rows.append(
            (
                "*" if t.suggested else "",
                t.name,
                t.type,
                t.output,
                "" if t.shape is None else str(t.shape),
                "" if t.calls is None else str(t.calls),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def build_model(spec: str, num_classes: int | None = None) -> nn.Module:
    """Build ``timm:NAME``, ``torchvision:NAME`` or ``package.module:callable`` (called with no
    arguments), with random weights (nothing is downloaded); timm and torchvision models get
    ``num_classes`` outputs when it is given.

    Example:
        >>> build_model("torch.nn:Identity")
        Identity()
    """
    source, sep, name = spec.partition(":")
    if not sep or not name:
        raise ConfigError(
            f"model {spec!r} must be 'timm:NAME', 'torchvision:NAME' or 'package.module:callable'"
        )
    extra: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    if source == "timm":
        import timm

        model = timm.create_model(name, pretrained=False, **extra)
    elif source == "torchvision":
        import torchvision

        model = torchvision.models.get_model(name, weights=None, **extra)
    else:
        # as `python -m deepsup` does: a module in the current folder is found (the `deepsup`
        # console script's sys.path starts at its own bin folder instead)
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())
        model = getattr(importlib.import_module(source), name)()
    if not isinstance(model, nn.Module):
        raise ConfigTypeError(f"{spec!r} built a {type(model).__name__}, not an nn.Module")
    return model
