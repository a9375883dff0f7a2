"""Checkpoint and optimizer helpers: the model part of a state_dict, parameter groups."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, ConfigError, ConfigTypeError
from .wrapper import DeepSupervision

__all__ = ["model_state_dict", "param_groups"]

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


def model_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The wrapped model's part of a ``DeepSupervision`` state_dict, ready for the plain model.

    Drops the heads and the wrapper's own state and strips the ``model.`` prefix (and a leading
    ``module.`` of ``DistributedDataParallel`` or ``_orig_mod.`` of ``torch.compile``), so a
    checkpoint trained with deep supervision loads into the unwrapped model in one call.

    Example:
        >>> from torch import nn
        >>> from deepsup import DeepSupervision, heads, model_state_dict
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        >>> sup = DeepSupervision(model, "0", head=heads.classification(2))
        >>> plain = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        >>> plain.load_state_dict(model_state_dict(sup.state_dict()))
        <All keys matched successfully>
    """
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        k = key
        changed = True
        while changed:
            changed = False
            for p in _WRAPPER_PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p) :], True
        if k.startswith("model."):
            out[k[len("model.") :]] = value
    if not out and state_dict:
        raise CheckpointError(
            f"no 'model.' keys in this state_dict (first keys: {list(state_dict)[:3]}); is it "
            "a DeepSupervision state_dict? A plain model's state_dict loads as it is"
        )
    return out


def _unwrap_container(sup: nn.Module) -> nn.Module:
    while True:
        inner = getattr(sup, "module", None) or getattr(sup, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return sup
        sup = inner


def param_groups(
    sup: nn.Module,
    lr: float,
    *,
    head_lr_mult: float = 10.0,
    new_modules: Sequence[str] = (),
    **group_options: Any,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups: the model at ``lr``, the heads (and new layers) at a multiple.

    semseg's PSPNet and torchvision's reference scripts train newly initialised layers at 10x
    the backbone's learning rate. A bare model (no wrapper: the baseline of a comparison)
    gets the same two groups, its ``new_modules`` in ``"heads"``.

    Args:
        sup: a :class:`~deepsup.DeepSupervision` (or one inside DDP / ``torch.compile``), or
            a bare model.
        lr: the learning rate of the model's pretrained part.
        head_lr_mult: the multiple for the heads and ``new_modules``.
        new_modules: names of the model's own submodules that also get the multiple (e.g. a
            PSPNet's pyramid pooling and classifier).
        group_options: other options (``momentum``, ``weight_decay``) copied into each group.

    Returns:
        Two groups, ``name`` "model" and "heads", each with ``params``, ``lr`` and
        ``initial_lr_mult`` (so a scheduler can keep the ratio).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from deepsup import DeepSupervision, heads, param_groups
        >>> sup = DeepSupervision(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), "0",
        ...                       head=heads.classification(2))
        >>> opt = torch.optim.SGD(param_groups(sup, lr=0.01, momentum=0.9), lr=0.01)
        >>> [(g["name"], g["lr"], len(g["params"])) for g in opt.param_groups]
        [('model', 0.01, 4), ('heads', 0.1, 2)]
    """
    if not isinstance(sup, nn.Module):
        raise ConfigTypeError(
            f"sup must be a DeepSupervision or an nn.Module (got {type(sup).__name__})"
        )
    inner = _unwrap_container(sup)
    model = inner.model if isinstance(inner, DeepSupervision) else inner
    fast: list[nn.Parameter] = []
    for name in new_modules:
        try:
            fast.extend(model.get_submodule(name).parameters())
        except AttributeError as err:
            raise ConfigError(
                f"new_modules entry {name!r} is not a submodule of "
                f"{type(model).__name__}; use names of model.named_modules()"
            ) from err
    fast_ids = {id(p) for p in fast}
    own = _own_parameters(inner) if isinstance(inner, DeepSupervision) else ()
    for p in own:
        if id(p) not in fast_ids:
            fast.append(p)
            fast_ids.add(id(p))
    slow = [p for p in model.parameters() if id(p) not in fast_ids]
    return [
        {"params": slow, "lr": lr, "name": "model", "initial_lr_mult": 1.0, **group_options},
        {
            "params": fast,
            "lr": lr * head_lr_mult,
            "name": "heads",
            "initial_lr_mult": head_lr_mult,
            **group_options,
        },
    ]


def _own_parameters(sup: DeepSupervision) -> Iterable[torch.nn.Parameter]:
    """Parameters of the wrapper that are not the model's: heads, criteria."""
    model_ids = {id(p) for p in sup.model.parameters()}
    return (p for p in sup.parameters() if id(p) not in model_ids)
