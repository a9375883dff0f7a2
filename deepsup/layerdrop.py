"""Layer dropout (LayerSkip, stochastic depth) on an unmodified model, through forward hooks.

In training, each listed layer is skipped for a random part of the batch: those rows get the
layer's input back as its output (the residual stream passes through), the others its output.
The skip probability rises with depth. The layer still computes for the whole batch (a forward
hook runs after the module; skipping the compute would need the layer wrapped, which changes the
model's module tree), so it changes what is trained, not the step's cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ._checks import check_number
from .errors import ConfigError, TapOutputError

__all__ = ["LayerDropout"]


class _DropHook:
    """Replace a layer's output by its input for the rows a Bernoulli(p) draw skips."""

    def __init__(self, name: str, p: float) -> None:
        self.name = name
        self.p = p

    def __call__(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
        if not module.training or self.p == 0.0:
            return None
        x = args[0] if args else kwargs.get("hidden_states")
        out = output[0] if isinstance(output, tuple) else output
        if not isinstance(x, torch.Tensor) or not isinstance(out, torch.Tensor):
            raise TapOutputError(
                f"LayerDropout: layer {self.name!r} takes or returns no tensor as its first "
                "argument / output; list decoder layers whose input and output are the hidden "
                "states (B, T, C)"
            )
        if x.shape != out.shape:
            raise TapOutputError(
                f"LayerDropout: layer {self.name!r} maps {tuple(x.shape)} to {tuple(out.shape)}; "
                "only a layer whose output has its input's shape can be skipped"
            )
        keep = torch.rand(x.shape[0], device=x.device) >= self.p
        mixed = torch.where(keep.view(-1, *([1] * (x.dim() - 1))), out, x)
        return (mixed, *output[1:]) if isinstance(output, tuple) else mixed


class LayerDropout:
    """Skip layers at random in training, more often the deeper they are (LayerSkip).

    Layer ``i`` of ``n`` (in the order given) is skipped per sample with probability
    ``p_max * i / (n - 1)`` (``rule="linear"``: the first never, the last at ``p_max``) or
    ``p_max * (2 ** (i / (n - 1)) - 1)`` (``rule="exp"``, LayerSkip's). Eval mode is untouched.
    The skipped layers still compute (see the module docs): the cost of a step does not fall.
    Unlike deepsup's tap hooks, these hooks return a value (the mixed output). Create it
    *before* the :class:`~deepsup.DeepSupervision` wrapper, so that its hooks run first and a
    tap on a dropped layer sees the output the model goes on with (hooks run in the order they
    were registered); HF's ``output_hidden_states`` records the layer's computed output, not
    the mixed one.

    Args:
        model: the model whose layers to drop.
        layers: module names, shallowest first (e.g. ``[f"model.layers.{i}" for i in range(8)]``).
        p_max: the skip probability of the deepest layer, in [0, 1].
        rule: ``"linear"`` or ``"exp"``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        >>> drop = LayerDropout(model, ["0", "1"], p_max=1.0)
        >>> drop.p
        {'0': 0.0, '1': 1.0}
        >>> x = torch.randn(3, 4)
        >>> torch.equal(model(x), model[0](x))  # the last layer always skipped
        True
        >>> drop.remove()
    """

    def __init__(
        self, model: nn.Module, layers: Sequence[str], *, p_max: float, rule: str = "linear"
    ) -> None:
        p_max = check_number("p_max", p_max, low=0.0, high=1.0)
        if rule not in ("linear", "exp"):
            raise ConfigError(f"rule must be 'linear' or 'exp' (got {rule!r})")
        if isinstance(layers, str) or not layers:
            raise ConfigError(f"layers must be a non-empty list of module names (got {layers!r})")
        n = len(layers)
        self.p: dict[str, float] = {}
        self._handles: list[RemovableHandle] = []
        for i, name in enumerate(layers):
            depth = i / (n - 1) if n > 1 else 1.0
            p = p_max * depth if rule == "linear" else p_max * (2**depth - 1)
            self.p[name] = p
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ConfigError(
                    f"layer {name!r} is not a submodule of {type(model).__name__}; "
                    "`deepsup.list_taps(model)` lists the names"
                ) from None
            self._handles.append(module.register_forward_hook(_DropHook(name, p), with_kwargs=True))

    def remove(self) -> None:
        """Remove the hooks; the model is as it was."""
        for h in self._handles:
            h.remove()
        self._handles = []
