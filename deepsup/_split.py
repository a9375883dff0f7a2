"""The gradient split at a head's input: what the head's aux loss sends there, and the rest.

A forward pre-hook on a head feeds it ``_Split(x)``, an identity whose backward notes the
gradient coming from the head alone; a tensor hook on ``x`` gets the total gradient there
(``rest + aux``) once every consumer has sent its part, and may replace it. One ordinary
backward: shared by :class:`deepsup.balance.GradientBound` (which scales the aux part) and
:class:`deepsup.diagnostics.GradientMonitor` (which records it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


class Slot:
    """One head call: the aux gradient at the head's input, once the backward has reached it."""

    def __init__(self, tap: str) -> None:
        self.tap = tap
        self.aux: torch.Tensor | None = None


OnTotal = Callable[[Slot, torch.Tensor], "torch.Tensor | None"]


class _Split(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, slot: Slot) -> torch.Tensor:
        ctx.slot = slot
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        ctx.slot.aux = grad
        return grad, None


class _Total:
    """Tensor hook on the head's input: ``on_total(slot, total)`` once the aux part is known."""

    def __init__(self, slot: Slot, on_total: OnTotal) -> None:
        self.slot, self.on_total = slot, on_total

    def __call__(self, total: torch.Tensor) -> torch.Tensor | None:
        return None if self.slot.aux is None else self.on_total(self.slot, total)


class _Attach:
    """Forward pre-hook on a head (deepsup's own module, not the user's model)."""

    def __init__(self, tap: str, on_total: OnTotal) -> None:
        self.tap, self.on_total = tap, on_total

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or not x.requires_grad or not torch.is_grad_enabled():
            return None
        slot = Slot(self.tap)
        x.register_hook(_Total(slot, self.on_total))  # type: ignore[no-untyped-call]
        return (_Split.apply(x, slot), *args[1:])


def attach(heads: nn.ModuleDict, on_total: OnTotal) -> list[RemovableHandle]:
    """Split the gradient at every head's input; ``on_total(slot, total)`` may return a
    replacement for the total gradient there (``None``: keep it)."""
    return [head.register_forward_pre_hook(_Attach(name, on_total)) for name, head in heads.items()]
