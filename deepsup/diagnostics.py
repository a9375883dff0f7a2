"""What deep supervision does to a model: exact per-layer gradients of each loss, and where to tap.

- :func:`gradient_flow`: one training forward of a :class:`~deepsup.DeepSupervision` wrapper and,
  for the main loss and each tap's weighted aux loss separately, the exact gradient (autograd) on
  the parameters of every module, in execution order, with the cosine between each aux gradient
  and the main one (negative: the losses pull the layer in opposite directions).
- :func:`list_taps` (also ``deepsup.list_taps``) and :func:`format_taps`: the tappable modules
  and their outputs.
- :func:`suggest_taps`: candidate taps at the model's stage boundaries, ranked by how far the
  main-loss gradient has decayed there (Wang et al., "Training Deeper Convolutional Networks with
  Deep Supervision", 2015: branch where the gradient vanishes).

Both leave the model as they found it: parameters' ``.grad``, buffers (BatchNorm running
statistics; a buffer the forward reassigns gets its own tensor back), every module's train/eval
mode and the RNG states (PyTorch's, CUDA's, Python's and NumPy's) are restored.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ._capture import as_call
from ._discovery import TapInfo as TapInfo
from ._discovery import format_taps as format_taps
from ._discovery import list_taps
from ._split import Slot, attach
from .errors import DiagnosticsError
from .wrapper import DeepSupervision

__all__ = [
    "DiagnosticsError",
    "GradientFlow",
    "GradientMonitor",
    "TapInfo",
    "TapSuggestion",
    "format_taps",
    "gradient_flow",
    "list_taps",
    "suggest_taps",
]


# --------------------------------------------------------------------------- side effects


@contextmanager
def _preserved(module: nn.Module) -> Iterator[None]:
    """Restore ``.grad``, buffers, train/eval modes and the RNG states of ``module`` on exit.

    Buffers are restored by owner and name: the same tensor object, with its values, also
    where the forward reassigned the attribute (``self.n = self.n + 1``)."""
    modes = [(m, m.training) for m in module.modules()]
    grads = [(p, p.grad, None if p.grad is None else p.grad.detach().clone())
             for p in module.parameters()]  # fmt: skip
    buffers = [
        (m, name, b, None if b is None else b.detach().clone())
        for m in module.modules()
        for name, b in m._buffers.items()
    ]
    cpu_rng = torch.get_rng_state()
    cuda = torch.cuda.is_initialized()  # type: ignore[no-untyped-call]
    cuda_rng = torch.cuda.get_rng_state_all() if cuda else None
    py_rng = random.getstate()
    np_rng = np.random.get_state()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        with torch.no_grad():
            for p, g, saved_grad in grads:  # the same tensor objects, with their values
                p.grad = g
                if g is not None and saved_grad is not None:
                    g.copy_(saved_grad)
            for m, name, b, saved in buffers:
                m._buffers[name] = b
                if b is not None and saved is not None:
                    b.copy_(saved)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        random.setstate(py_rng)
        np.random.set_state(np_rng)


class _Order:
    """Forward pre-hook: notes the first start of each parameter-owning module (an object, not a
    closure, as every deepsup hook)."""

    def __init__(self, name: str, order: list[str]) -> None:
        self.name, self.order = name, order

    def __call__(self, module: nn.Module, args: Any) -> None:
        if self.name not in self.order:
            self.order.append(self.name)


class _End:
    """Forward hook: notes how many parameter-owning modules had started when a module ended."""

    def __init__(self, name: str, order: list[str], ends: dict[str, int]) -> None:
        self.name, self.order, self.ends = name, order, ends

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        self.ends.setdefault(self.name, len(self.order) - 1)


def _owners(model: nn.Module) -> dict[str, nn.Module]:
    """Modules that own trainable parameters themselves (not through children)."""
    return {
        name: m
        for name, m in model.named_modules()
        if any(p.requires_grad for p in m.parameters(recurse=False))
    }


@contextmanager
def _recording(
    model: nn.Module, ends_of: Sequence[str] = ()
) -> Iterator[tuple[list[str], dict[str, int]]]:
    order: list[str] = []
    ends: dict[str, int] = {}
    handles = [
        m.register_forward_pre_hook(_Order(name, order)) for name, m in _owners(model).items()
    ]
    handles += [
        model.get_submodule(name).register_forward_hook(_End(name, order, ends)) for name in ends_of
    ]
    try:
        yield order, ends
    finally:
        for h in handles:
            h.remove()


def _gradients(loss: torch.Tensor, params: Sequence[nn.Parameter]) -> list[torch.Tensor | None]:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise DiagnosticsError(
            f"a loss must be a scalar tensor (got {type(loss).__name__}"
            f"{'' if not isinstance(loss, torch.Tensor) else f' of shape {tuple(loss.shape)}'}); "
            "use a criterion that reduces to a scalar (reduction='mean' or 'sum')"
        )
    if not loss.requires_grad:
        return [None] * len(params)
    grads = torch.autograd.grad(loss, list(params), retain_graph=True, allow_unused=True)
    return list(grads)


def _flat(grads: Sequence[torch.Tensor | None], params: Sequence[nn.Parameter]) -> torch.Tensor:
    parts = [
        (torch.zeros_like(p) if g is None else g).detach().double().flatten()
        for g, p in zip(grads, params, strict=True)
    ]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 or nb == 0.0:
        return math.nan
    return float(a @ b) / (na * nb)


# --------------------------------------------------------------------------- gradient flow


@dataclass
class GradientFlow:
    """Per-module gradient norms of the main loss and of each aux loss, in execution order.

    Attributes:
        rows: one dict per module that owns trainable parameters, in the order the modules first
            ran: ``module`` (dotted name in the model), ``depth`` (execution index), ``params``
            (parameter count), ``main`` (L2 norm of the main loss's gradient on the module's own
            parameters), ``aux`` (``{tap: norm}`` of each weighted aux loss's gradient),
            ``cosine`` (``{tap: cosine between main and aux gradient}``, NaN where either is
            zero) and ``total`` (norm of the summed gradient, main + all aux: what the optimizer
            gets).
        taps: the tap names, in the wrapper's order.
        tap_depths: ``{tap: depth}`` of the last parameter-owning module that had started when the
            tapped module returned (where the tap sits on the depth axis).
        losses: the main loss's and the weighted aux losses' values, ``{"main": v, tap: v}``.
    """

    rows: list[dict[str, Any]]
    taps: list[str]
    tap_depths: dict[str, int] = field(default_factory=dict)
    losses: dict[str, float] = field(default_factory=dict)

    def to_rows(self) -> list[dict[str, Any]]:
        """The rows, as a list of new dicts (safe to modify).

        Example:
            >>> report = GradientFlow([{"module": "0", "depth": 0, "params": 3, "main": 1.0,
            ...     "aux": {}, "cosine": {}, "total": 1.0}], taps=[])
            >>> report.to_rows()[0]["main"]
            1.0
        """
        return [{**r, "aux": dict(r["aux"]), "cosine": dict(r["cosine"])} for r in self.rows]

    def __str__(self) -> str:
        header = ["depth", "module", "params", "main"]
        header += [f"aux[{t}]" for t in self.taps] + [f"cos[{t}]" for t in self.taps]
        header += ["total"]
        table = [header]
        for r in self.rows:
            cells = [str(r["depth"]), r["module"] or "(root)", str(r["params"]), f"{r['main']:.3e}"]
            cells += [f"{r['aux'][t]:.3e}" for t in self.taps]
            cells += ["-" if math.isnan(r["cosine"][t]) else f"{r['cosine'][t]:+.3f}"
                      for t in self.taps]  # fmt: skip
            cells.append(f"{r['total']:.3e}")
            table.append(cells)
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        lines = [
            "  ".join(
                c.ljust(w) if i == 1 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
            for row in table
        ]
        lines.insert(1, "-" * len(lines[0]))
        losses = ", ".join(f"{k} {v:.4f}" for k, v in self.losses.items())
        taps = ", ".join(f"{t} after depth {d}" for t, d in self.tap_depths.items())
        lines.append(f"losses: {losses}" + (f"; taps: {taps}" if taps else ""))
        return "\n".join(lines)

    def plot(self, path: str | Path | None = None, *, title: str | None = None) -> Any:
        """Gradient norm against depth (log scale), one line per loss; cosines below.

        Args:
            path: where to save the figure (any format matplotlib writes); None: only return it.
            title: the figure's title.

        Returns:
            The ``matplotlib.figure.Figure``.

        Raises:
            DiagnosticsError: matplotlib is not installed (``pip install matplotlib``).
        """
        try:
            import matplotlib

            if path is not None:
                matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as err:
            raise DiagnosticsError(
                "GradientFlow.plot needs matplotlib, which is not installed; "
                "`pip install matplotlib`, or use str(report) / report.to_rows()"
            ) from err
        depth = [r["depth"] for r in self.rows]
        fig, (top, bottom) = plt.subplots(
            2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [2, 1]}
        )

        def positive(values: list[float]) -> list[float]:
            return [v if v > 0 else math.nan for v in values]

        top.plot(depth, positive([r["main"] for r in self.rows]), "o-", ms=3, label="main loss")
        colours = {tap: f"C{i + 1}" for i, tap in enumerate(self.taps)}  # C0: the main loss
        for tap in self.taps:
            values = positive([r["aux"][tap] for r in self.rows])
            top.plot(depth, values, ".--", ms=3, color=colours[tap], label=f"aux loss at {tap}")
        if self.taps:
            top.plot(
                depth,
                positive([r["total"] for r in self.rows]),
                "-",
                color="black",
                alpha=0.5,
                lw=2,
                label="total (main + aux)",
            )
        top.set(yscale="log", ylabel="gradient L2 norm")
        for ax in (top, bottom):
            for d in self.tap_depths.values():
                ax.axvline(d, color="grey", ls=":", lw=1)
            ax.grid(alpha=0.3)
        for tap, d in self.tap_depths.items():
            top.annotate(
                tap,
                (d, 1),
                xycoords=("data", "axes fraction"),
                rotation=90,
                va="top",
                ha="right",
                fontsize=7,
                color="grey",
            )
        top.legend(fontsize=8)
        for tap in self.taps:
            cosines = [r["cosine"][tap] for r in self.rows]
            bottom.plot(depth, cosines, ".-", ms=3, color=colours[tap], label=tap)
        bottom.axhline(0, color="black", lw=0.8)
        bottom.set(
            ylim=(-1.05, 1.05),
            xlabel="depth (execution order of modules with parameters)",
            ylabel="cosine(main, aux)",
        )
        if title:
            top.set_title(title)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=90)
            plt.close(fig)
        return fig


def gradient_flow(
    sup: DeepSupervision,
    *args: Any,
    target: Any,
    criterion: Callable[..., torch.Tensor],
    **kwargs: Any,
) -> GradientFlow:
    """Exact per-module gradients of the main loss and of each tap's weighted aux loss.

    Runs one training forward ``sup(*args, target=target, **kwargs)``, takes the main loss
    ``criterion(output, target)`` and the wrapper's weighted aux losses, and for each of them
    separately computes the gradient with autograd on the parameters of every module of
    ``sup.model`` that owns trainable parameters. Nothing changes: ``.grad``, buffers (BatchNorm
    running statistics), train/eval modes and the RNG state are restored afterwards, and the
    weight schedules do not advance.

    Args:
        sup: the wrapper, built with a ``criterion`` (its training forward returns losses).
        *args: the model's positional inputs.
        target: the target of the main loss and of the taps (as in a training forward).
        criterion: the main loss, ``criterion(output, target) -> scalar``.
        **kwargs: the model's keyword inputs.

    Returns:
        A :class:`GradientFlow`: ``str()`` a table, ``to_rows()`` the numbers, ``plot()`` a chart.

    Raises:
        DiagnosticsError: ``sup`` is not a DeepSupervision, returns predictions instead of
            losses (``criterion=None``), or a loss is not a scalar.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from deepsup import DeepSupervision, heads
        >>> from deepsup.diagnostics import gradient_flow
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> sup = DeepSupervision(model, {"0": 0.4}, head=heads.classification(3),
        ...                       criterion=nn.CrossEntropyLoss())
        >>> x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
        >>> report = gradient_flow(sup, x, target=y, criterion=nn.CrossEntropyLoss())
        >>> [(r["module"], r["depth"]) for r in report.to_rows()]
        [('0', 0), ('2', 1)]
        >>> report.rows[1]["aux"]["0"]  # the aux loss does not reach the layer after its tap
        0.0
    """
    if not isinstance(sup, DeepSupervision):
        raise DiagnosticsError(
            f"gradient_flow needs a DeepSupervision wrapper (got {type(sup).__name__}); wrap the "
            "model first, e.g. DeepSupervision(model, taps, head=..., criterion=...)"
        )
    for tap, spec in sup.taps.items():
        if spec.criterion is None:
            raise DiagnosticsError(
                f"tap {tap!r} has no criterion, so it returns a prediction, not a loss; build the "
                "wrapper with a criterion (criterion=None returns the heads' predictions)"
            )
    model = sup.model
    with _preserved(sup):
        sup.train()
        with _recording(model, ends_of=list(sup.taps)) as (order, ends):
            output, aux = sup(*args, **{sup._target_key: target}, **kwargs)
        losses = {"main": criterion(output, target)}
        for tap, value in aux.items():
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                raise DiagnosticsError(
                    f"tap {tap!r} returned a {type(value).__name__}, not a loss; build the "
                    "wrapper with a criterion (criterion=None returns the heads' predictions)"
                )
            losses[tap] = value
        owners = _owners(model)
        names = [n for n in order if n in owners]
        per_module = [[p for p in owners[n].parameters(recurse=False) if p.requires_grad]
                      for n in names]  # fmt: skip
        params = [p for ps in per_module for p in ps]
        if not params:
            raise DiagnosticsError(
                f"{type(model).__name__} has no trainable parameter that ran in the forward "
                "(all frozen?), so there is no gradient to measure; unfreeze the layers to "
                "study (requires_grad_(True)) or measure the heads' training directly"
            )
        flats = {k: _flat(_gradients(v, params), params) for k, v in losses.items()}
        loss_values = {k: float(v.detach()) for k, v in losses.items()}
        del output, aux, losses
    total = sum(flats.values(), torch.zeros_like(flats["main"]))
    rows = []
    start = 0
    taps = list(sup.taps)
    for depth, (name, ps) in enumerate(zip(names, per_module, strict=True)):
        size = sum(p.numel() for p in ps)
        part = {k: f[start : start + size] for k, f in flats.items()}
        rows.append(
            {
                "module": name,
                "depth": depth,
                "params": size,
                "main": float(part["main"].norm()),
                "aux": {t: float(part[t].norm()) for t in taps},
                "cosine": {t: _cosine(part["main"], part[t]) for t in taps},
                "total": float(total[start : start + size].norm()),
            }
        )
        start += size
    return GradientFlow(rows, taps, {t: ends[t] for t in taps if t in ends}, loss_values)


# --------------------------------------------------------------------------- suggest taps


@dataclass(frozen=True)
class TapSuggestion:
    """A candidate tap from :func:`suggest_taps`.

    Attributes:
        name: the module name, accepted by ``DeepSupervision(taps=...)`` as is.
        reason: why it is suggested, in words.
        attenuation: the main-loss gradient's RMS on the last parameters before the tap,
            divided by its RMS on the model's last parameters (1: no decay; 1e-3: decayed
            1000-fold).
        depth: where the tap sits among the modules that own parameters (execution order).
        shape: the tapped output's shape.
    """

    name: str
    reason: str
    attenuation: float
    depth: int
    shape: tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.name}: {self.reason}"


def _boundaries(
    model: nn.Module, example_input: Any
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...] | None, bool]]:
    """Modules whose output shape differs from their next sibling's (or that ``list_taps``
    marks as a stage): ``{name: (shape, next sibling's shape, marked)}``. Single tensor outputs
    of modules that ran once only."""
    infos = {t.name: t for t in list_taps(model, example_input)}
    usable = {n: t for n, t in infos.items() if t.calls == 1 and t.output == "Tensor" and t.shape}
    found: dict[str, tuple[tuple[int, ...], tuple[int, ...] | None, bool]] = {}
    for parent_name, parent in model.named_modules():
        if parent is not model and not isinstance(parent, (nn.Sequential, nn.ModuleList)):
            continue  # inside a block the definition order need not be the execution order
        children = [f"{parent_name}.{c}" if parent_name else c for c, _ in parent.named_children()]
        ran = [c for c in children if c in usable]
        for here, after in zip(ran, [*ran[1:], None], strict=False):
            shape = usable[here].shape
            assert shape is not None  # filtered above
            nxt = usable[after].shape if after is not None else None
            if usable[here].suggested or (nxt is not None and nxt != shape):
                found[here] = (shape, nxt, usable[here].suggested)
    return found


def suggest_taps(
    model: nn.Module,
    example_input: Any,
    *,
    target: Any,
    criterion: Callable[..., torch.Tensor],
    k: int = 3,
) -> list[TapSuggestion]:
    """Rank candidate taps: stage boundaries where the main loss's gradient has decayed most.

    Candidates are the modules at stage boundaries: where the output's spatial size or width
    changes from one module to the next, and the stages that :func:`deepsup.list_taps` marks
    (timm's ``feature_info``, names such as ``layer3``). Modules in the first fifth or the last
    tenth of the network (counted in modules with parameters) are left out: a head there sees
    too little of the network, or duplicates the output. Each candidate is scored by the exact
    main-loss gradient (one training forward, autograd, no side effects) on the last parameters
    before it, as RMS relative to the model's last parameters; following Wang et al. (2015), the
    most decayed come first, kept at least ``n / (k + 1)`` modules apart (``n``: modules with
    parameters) so that the picks spread over the depth.

    Args:
        model: the bare model (not wrapped).
        example_input: a batch (a tensor, a tuple of positional arguments or a dict of keyword
            arguments), in training layout: BatchNorm needs more than one sample.
        target: the target for ``criterion``.
        criterion: the main loss, ``criterion(model(example_input), target) -> scalar``.
        k: how many to return at most.

    Returns:
        Up to ``k`` :class:`TapSuggestion`, best first; their names go into ``DeepSupervision``.

    Raises:
        DiagnosticsError: ``k`` < 1, or the model has no candidate boundary.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from deepsup.diagnostics import suggest_taps
        >>> _ = torch.manual_seed(0)
        >>> layers = [nn.Conv2d(1, 8, 3, padding=1), nn.Tanh()]
        >>> for _ in range(3):
        ...     layers += [nn.Conv2d(8, 8, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2)]
        >>> model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(8, 10))
        >>> x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
        >>> [s.name for s in suggest_taps(model, x, target=y, criterion=nn.CrossEntropyLoss(), k=2)]
        ['3', '6']
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise DiagnosticsError(f"k must be an int >= 1 (got {k!r})")
    if isinstance(model, DeepSupervision):
        model = model.model
    candidates = _boundaries(model, example_input)
    args, kwargs = as_call(example_input)
    with _preserved(model):
        model.train()
        with _recording(model, ends_of=list(candidates)) as (order, ends):
            output = model(*args, **kwargs)
        owners = _owners(model)
        names = [n for n in order if n in owners]
        params = [[p for p in owners[n].parameters(recurse=False) if p.requires_grad]
                  for n in names]  # fmt: skip
        flat = [p for ps in params for p in ps]
        grads = _gradients(criterion(output, target), flat)
        del output
    rms: list[float] = []
    i = 0
    for ps in params:
        g = _flat(grads[i : i + len(ps)], ps)
        rms.append(float(g.norm()) / math.sqrt(max(g.numel(), 1)))
        i += len(ps)
    if not names:
        raise DiagnosticsError(f"{type(model).__name__} has no trainable parameters to measure")
    top = rms[-1] if rms[-1] > 0 else max(rms)
    n = len(names)
    low, high = math.floor(0.2 * n), math.ceil(0.9 * n) - 1
    scored = []
    for name, (shape, nxt, marked) in candidates.items():
        depth = ends.get(name, -1)
        if not low <= depth < high:
            continue
        attenuation = rms[depth] / top if top > 0 else math.nan
        scored.append((attenuation, -depth, name, shape, nxt, marked))
    if not scored:
        raise DiagnosticsError(
            f"found no stage boundary between the first fifth and the last tenth of "
            f"{type(model).__name__} ({n} modules with parameters); pick taps by hand with "
            "deepsup.list_taps(model, example_input)"
        )
    scored.sort(key=lambda s: (math.isnan(s[0]), s[0], s[1]))
    gap = max(1, n // (k + 1))  # spread the picks over the depth
    picked: list[TapSuggestion] = []
    for attenuation, neg_depth, name, shape, nxt, marked in scored:
        depth = -neg_depth
        if any(abs(depth - s.depth) < gap for s in picked):
            continue
        why = "stage boundary" if marked else "output shape changes"
        change = (
            f"{_fmt(shape)} -> {_fmt(nxt)}" if nxt is not None and nxt != shape else _fmt(shape)
        )
        decay = (
            f"main-loss gradient RMS here is {attenuation:.2g}x the last layer's"
            if not math.isnan(attenuation)
            else "no main-loss gradient reached the last layer"
        )
        reason = f"{why} ({change}) at depth {depth}/{n - 1}; {decay}"
        picked.append(TapSuggestion(name, reason, attenuation, depth, shape))
        if len(picked) == k:
            break
    return picked


def _fmt(shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape[1:]) if len(shape) > 1 else str(tuple(shape))


# --------------------------------------------------------------------------- during training


class _Record:
    """``on_total`` of the split: notes |aux|, |rest| and their cosine at the head's input."""

    def __init__(self, taps: dict[str, dict[str, float]]) -> None:
        self.taps = taps

    def __call__(self, slot: Slot, total: torch.Tensor) -> None:
        assert slot.aux is not None
        aux, rest = slot.aux.flatten(), (total - slot.aux).flatten()
        self.taps[slot.tap] = {
            "aux": float(aux.norm()),
            "rest": float(rest.norm()),
            "cosine": _cosine(aux, rest),
        }


class GradientMonitor:
    """A cheap per-step record of the gradients during training, from the ordinary backward.

    At each tap's head input it splits the gradient into the part the tap's aux loss sends
    (``aux``) and the rest (``rest``: the main loss and the deeper taps' aux losses; with one
    tap, the main loss's exactly), with their norms and cosine; :meth:`record`, called after
    ``backward()``, adds the losses and the gradient norm of every parameter-owning module
    (from ``.grad``) and appends the row to :attr:`rows`. No second backward: the per-loss split
    is known at the taps only; :func:`gradient_flow` gives it at every layer (one backward per
    loss), e.g. every few hundred steps.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from deepsup import DeepSupervision, heads
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> sup = DeepSupervision(model, {"1": 0.5}, head=heads.classification(3),
        ...                       criterion=nn.CrossEntropyLoss())
        >>> monitor = GradientMonitor(sup)
        >>> y = torch.tensor([0, 1, 2, 0])
        >>> out, aux = sup(torch.randn(4, 4), target=y)
        >>> main = nn.functional.cross_entropy(out, y)
        >>> (main + sum(aux.values())).backward()
        >>> row = monitor.record(main, aux)
        >>> sorted(row), sorted(row["taps"]["1"])
        (['layers', 'losses', 'step', 'taps'], ['aux', 'cosine', 'rest'])
        >>> monitor.remove()
    """

    def __init__(self, sup: DeepSupervision) -> None:
        self.sup = sup
        self.rows: list[dict[str, Any]] = []
        self._taps: dict[str, dict[str, float]] = {}
        self._handles = attach(sup.heads, _Record(self._taps))

    def record(self, main: torch.Tensor, aux: Any = None) -> dict[str, Any]:
        """The row of this step (after ``backward()``): losses, the split at each tap, and the
        gradient norm of every module of the model that owns parameters."""
        losses = {"main": float(main.detach())}
        for name, value in dict(aux or {}).items():
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                losses[name] = float(value.detach())
        layers = {}
        for name, module in _owners(self.sup.model).items():
            grads = [p.grad.flatten() for p in module.parameters(recurse=False)
                     if p.grad is not None]  # fmt: skip
            if grads:
                layers[name] = float(torch.cat(grads).norm())
        row = {"step": len(self.rows), "losses": losses, "taps": dict(self._taps),
               "layers": layers}  # fmt: skip
        self._taps.clear()
        self.rows.append(row)
        return row

    def remove(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []
