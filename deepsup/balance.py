"""Aux losses that cannot wreck training: three ways to keep them from overpowering the main loss.

- :class:`GradientBound`: each tap's aux gradient, where it enters the shared network (the head's
  input), scaled to at most ``max_ratio`` times the gradient the rest of the training loss sends
  there. One ordinary backward: the split is read by a hook on the head's input.
- :class:`UncertaintyWeighting`: Kendall, Gal and Cipolla (2018), learned log-variances ``s_i``
  and the total ``sum_i exp(-s_i) L_i + s_i``.
- :func:`project_conflicts`: PCGrad-style (Yu et al. 2020): on the shared parameters, an aux
  gradient that conflicts with the main loss's (negative dot product) loses its component along
  it. One backward per loss over the shared parameters.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ._checks import check_number
from ._split import Slot, attach
from .errors import ConfigError, UsageError
from .wrapper import DeepSupervision

__all__ = ["GradientBound", "UncertaintyWeighting", "project_conflicts"]


# --------------------------------------------------------------------------- gradient bound


class _Bound:
    """``on_total`` of the split: ``rest + s aux`` with ``s = min(1, max_ratio |rest| / |aux|)``,
    the scale noted per tap."""

    def __init__(self, max_ratio: float, scales: dict[str, list[float]]) -> None:
        self.max_ratio, self.scales = max_ratio, scales

    def __call__(self, slot: Slot, total: torch.Tensor) -> torch.Tensor | None:
        assert slot.aux is not None
        aux = slot.aux
        rest = total - aux
        a, r = float(aux.norm()), float(rest.norm())
        scale = 1.0 if a <= self.max_ratio * r or a == 0.0 else self.max_ratio * r / a
        self.scales.setdefault(slot.tap, []).append(scale)
        return None if scale == 1.0 else rest + scale * aux


class GradientBound:
    """Bound each aux loss's gradient where it enters the shared network.

    For every tap, the gradient that reaches the tapped feature ``f`` in the ordinary backward is
    ``rest + aux``: ``aux`` from that tap's head (its weighted aux loss), ``rest`` from everything
    above (the main loss and the deeper taps' aux losses). The bound replaces it by
    ``rest + s * aux`` with ``s = min(1, max_ratio * |rest| / |aux|)``, so the aux part is at most
    ``max_ratio`` times the rest, and every parameter below the tap gets ``J^T (rest + s aux)``.
    With one tap, ``rest`` is the main loss's gradient exactly. The head itself trains on its
    unscaled loss. Cost: one ordinary backward plus a norm per tap (no second backward); the
    bound holds at the feature, not exactly at each parameter below it (``J^T`` is not an
    isometry), which :func:`project_conflicts`-style per-parameter gradients would need.

    Args:
        sup: the wrapper; hooks go on its heads (remove them with :meth:`remove`).
        max_ratio: ``c``, at least 0 (0: the aux losses train their heads only).

    Raises:
        ConfigError: ``max_ratio`` is negative or not finite, or a tap has ``Tap(clone=True)``
            (its head gets a copy, where the split cannot be read).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from deepsup import DeepSupervision, heads
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> sup = DeepSupervision(model, {"1": 5.0}, head=heads.classification(3),
        ...                       criterion=nn.CrossEntropyLoss())
        >>> bound = GradientBound(sup, max_ratio=0.5)
        >>> out, aux = sup(torch.randn(6, 4), target=torch.tensor([0, 1, 2, 0, 1, 2]))
        >>> (nn.functional.cross_entropy(out, torch.tensor([0, 1, 2, 0, 1, 2]))
        ...  + sum(aux.values())).backward()
        >>> 0.0 < bound.scales()["1"][0] <= 1.0
        True
        >>> bound.remove()
    """

    def __init__(self, sup: DeepSupervision, max_ratio: float = 1.0) -> None:
        self.max_ratio = check_number("max_ratio", max_ratio, low=0.0)
        for name, tap in sup.taps.items():
            if tap.clone:
                raise ConfigError(
                    f"GradientBound: tap {name!r} has clone=True, so its head gets a copy of the "
                    "feature and the split of the gradient cannot be read there; drop clone=True "
                    "(use a head that does not change its input in place)"
                )
        self._scales: dict[str, list[float]] = {}
        self._handles = attach(sup.heads, _Bound(self.max_ratio, self._scales))

    def scales(self) -> dict[str, list[float]]:
        """Per tap, the scale ``s`` of each head call since the last call (then forgotten)."""
        out = {name: list(values) for name, values in self._scales.items()}
        self._scales.clear()
        return out

    def remove(self) -> None:
        """Remove the hooks: the wrapper trains as without the bound."""
        for h in self._handles:
            h.remove()
        self._handles = []


# --------------------------------------------------------------------------- uncertainty


class UncertaintyWeighting(nn.Module):
    """Learned loss weights (Kendall, Gal and Cipolla, CVPR 2018): for each loss ``L_i`` a
    log-variance ``s_i``, and the total ``sum_i exp(-s_i) L_i + s_i``.

    This is the common variant of the paper's ``L / (2 sigma^2) + log sigma`` for every loss
    (``s = log sigma^2``, the factor 1/2 dropped). Minimising over ``s_i`` gives
    ``exp(-s_i) = 1 / L_i``: a loss that stays large is weighted down. Give the module's
    parameters to the optimizer.

    Args:
        names: the losses, e.g. ``["main", *sup.taps]``.
        initial: a starting weight ``exp(-s_i)`` per name (default 1), e.g. the taps' weights.

    Example:
        >>> import torch
        >>> uw = UncertaintyWeighting(["main", "aux"], initial={"aux": 0.5})
        >>> total = uw({"main": torch.tensor(2.0), "aux": torch.tensor(1.0)})
        >>> round(float(total.detach()), 4)  # 2 + 0.5 * 1 + 0 + ln 2
        3.1931
    """

    def __init__(self, names: Sequence[str], initial: Mapping[str, float] | None = None) -> None:
        super().__init__()
        names = list(names)
        initial = dict(initial or {})
        unknown = sorted(set(initial) - set(names))
        if not names or len(set(names)) != len(names) or unknown:
            raise ConfigError(
                f"UncertaintyWeighting needs distinct loss names, and initial weights for those "
                f"only (got names {names}, initial for unknown {unknown}); pass e.g. "
                "['main', *sup.taps]"
            )
        for name, w in initial.items():
            check_number(f"UncertaintyWeighting initial[{name!r}]", w, low=0.0, low_open=True)
        self.names = names
        start = [-math.log(initial.get(n, 1.0)) for n in names]
        self.log_vars = nn.Parameter(torch.tensor(start, dtype=torch.float32))

    def weights(self) -> dict[str, float]:
        """The current weights ``exp(-s_i)``."""
        return dict(zip(self.names, torch.exp(-self.log_vars.detach()).tolist()))

    def forward(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``sum_i exp(-s_i) L_i + s_i`` over every name (each must be in ``losses``)."""
        missing = [n for n in self.names if n not in losses]
        if missing:
            raise UsageError(
                f"UncertaintyWeighting: no loss for {missing} (got {sorted(losses)}); pass "
                "every name it was built with"
            )
        terms = [torch.exp(-s) * losses[n] + s for n, s in zip(self.names, self.log_vars)]
        return torch.stack(terms).sum()


# --------------------------------------------------------------------------- projection


def project_conflicts(
    main: torch.Tensor,
    aux: Mapping[str, torch.Tensor],
    shared: Sequence[nn.Parameter],
    others: Sequence[nn.Parameter] = (),
) -> dict[str, float]:
    """Backward of ``main + sum(aux)`` with conflicting aux gradients projected (PCGrad-style).

    On the ``shared`` parameters (flattened together) each aux gradient ``g_i`` whose dot product
    with the main loss's ``g`` is negative becomes ``g_i - (g_i . g / |g|^2) g`` (the main loss
    is never changed); ``.grad`` of ``shared`` gets ``g + sum_i g_i``. The ``others`` (the
    heads) get their ordinary gradient. Cost: one backward per loss over the shared parameters
    and one for the others (``retain_graph``), against one for the plain sum.

    Args:
        main: the main loss, a scalar.
        aux: the weighted aux losses (``sup(x, target=y)[1]``).
        shared: the parameters every loss reaches (the model's: ``sup.model.parameters()``).
        others: the rest that should train (``sup.heads.parameters()``).

    Returns:
        Per aux loss, the cosine of its gradient with the main's before the projection.

    Example:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.tensor([1.0, 0.0]))
        >>> cos = project_conflicts(w[0], {"a": -w[0] + w[1]}, [w])
        >>> round(cos["a"], 4), w.grad.tolist()  # (-1, 1) loses its part along (1, 0)
        (-0.7071, [1.0, 1.0])
    """
    shared = [p for p in shared if p.requires_grad]
    if not shared:
        raise UsageError(
            "project_conflicts: no shared parameter requires grad; pass the model's parameters"
        )

    def flat(loss: torch.Tensor) -> torch.Tensor:
        grads = torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True)
        return torch.cat(
            [(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(shared, grads)]
        )

    g = flat(main)
    total = g.clone()
    cosines: dict[str, float] = {}
    norm2 = float(g.dot(g))
    for name, loss in aux.items():
        gi = flat(loss)
        dot = float(gi.dot(g))
        denom = math.sqrt(norm2 * float(gi.dot(gi)))
        cosines[name] = dot / denom if denom > 0 else 0.0
        if dot < 0 and norm2 > 0:
            gi = gi - (dot / norm2) * g
        total += gi
    others = [p for p in others if p.requires_grad]
    if others:
        (main + sum(aux.values())).backward(inputs=others)  # type: ignore[no-untyped-call]
    offset = 0
    with torch.no_grad():
        for p in shared:
            piece = total[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
            if p.grad is None:
                p.grad = piece.clone()
            else:
                p.grad += piece
    return cosines
