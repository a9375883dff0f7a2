"""Exits for deployment: every exit of the eval model as one graph, or the model cut at one exit.

Both are built generically with ``torch.fx``: the model is traced with the tapped modules kept
as leaves, so each tap is one node whose value is the tap's output. :class:`AllExits` makes the
graph also return those values and runs each head on its own; :func:`cut_at` keeps the graph up
to one tap and puts its head after it. Neither has hooks, so both go through ``torch.export``,
ONNX and TorchScript like any module. A model ``torch.fx`` cannot trace (control flow on tensor
values, a tap called through ``.forward()``) gets an :class:`~deepsup.errors.EarlyExitError`
naming why.
"""

from __future__ import annotations

from typing import Any

from torch import fx, nn

from ._capture import select_tensor
from ._config import OUTPUT
from .errors import EarlyExitError
from .wrapper import DeepSupervision

__all__ = ["AllExits", "cut_at"]


class _TapTracer(fx.Tracer):
    """``torch.fx``'s tracer with the tapped modules as leaves (one node per call)."""

    def __init__(self, taps: set[str]) -> None:
        super().__init__()
        self.taps = taps

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.taps or super().is_leaf_module(
            m, module_qualified_name
        )


def _trace(sup: DeepSupervision, taps: list[str]) -> tuple[fx.GraphModule, dict[str, fx.Node]]:
    """The model as a graph with ``taps`` as leaves, and the node of each tap's picked call."""
    model = sup.model
    try:
        graph = _TapTracer(set(taps)).trace(model)
    except Exception as err:
        raise EarlyExitError(
            f"torch.fx cannot trace {type(model).__name__} ({type(err).__name__}: {err}), so "
            "its exits cannot be cut out generically; use sup.exits() or EarlyExit in eager "
            "mode, or write the cut model by hand"
        ) from err
    nodes: dict[str, fx.Node] = {}
    for name in taps:
        calls = [n for n in graph.nodes if n.op == "call_module" and n.target == name]
        rule = sup._settings[name].calls
        if not calls:
            raise EarlyExitError(
                f"tap {name!r} is not called in the traced graph of {type(model).__name__} (it "
                "runs through .forward() or is skipped in eval), so it cannot be an exit of an "
                "exported graph"
            )
        if len(calls) > 1 and rule not in ("first", "last"):
            raise EarlyExitError(
                f"tap {name!r} is called {len(calls)} times per forward with calls={rule!r}; "
                "pass Tap(calls='first') or Tap(calls='last') to pick the exit's call"
            )
        nodes[name] = calls[-1] if rule == "last" else calls[0]
    return fx.GraphModule(model, graph), nodes


def _check(sup: Any) -> DeepSupervision:
    if not isinstance(sup, DeepSupervision):
        raise EarlyExitError(
            f"exporting exits needs a DeepSupervision (got {type(sup).__name__}); pass the "
            "wrapper, not a DDP or torch.compile wrapper of it"
        )
    sup._check_usable()
    return sup


class AllExits(nn.Module):
    """Every exit of the eval model and its output from one forward, without hooks: a module
    that ``torch.export``, ONNX and TorchScript take as one graph.

    The forward returns ``{tap: prediction, ..., "output": model output}``, equal to
    ``sup.exits(x)`` in eval mode. The model is traced with ``torch.fx`` (taps as leaves); the
    heads and the model's modules are shared with ``sup``, not copied.

    Raises:
        EarlyExitError: ``torch.fx`` cannot trace the model, a tap is not in the traced graph,
            or a tap runs several times without ``calls="first"`` / ``"last"``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from deepsup import DeepSupervision, heads
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> sup = DeepSupervision(model, "0", head=heads.classification(3)).eval()
        >>> x = torch.randn(2, 4)
        >>> out = AllExits(sup)(x)
        >>> sorted(out), torch.equal(out["output"], model(x))
        (['0', 'output'], True)
        >>> program = torch.export.export(AllExits(sup), (x,))
        >>> torch.allclose(program.module()(x)["0"], sup.exits(x)["0"])
        True
    """

    def __init__(self, sup: DeepSupervision) -> None:
        super().__init__()
        sup = _check(sup)
        self.exits = list(sup.taps)
        gm, nodes = _trace(sup, self.exits)
        graph = gm.graph
        out = next(n for n in graph.nodes if n.op == "output")
        with graph.inserting_before(out):
            values = graph.call_function(tuple, ([out.args[0], *(nodes[e] for e in self.exits)],))
        out.args = (values,)
        graph.lint()
        gm.recompile()
        self.graph_module = gm
        self.heads = nn.ModuleDict({str(i): sup.heads[e] for i, e in enumerate(self.exits)})
        self._select = [sup._settings[e].select for e in self.exits]
        self.eval()

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        output, *feats = self.graph_module(*args, **kwargs)
        preds: dict[str, Any] = {}
        for i, (name, feat) in enumerate(zip(self.exits, feats)):
            preds[name] = self.heads[str(i)](select_tensor(feat, self._select[i], name))
        preds[OUTPUT] = output
        return preds


class _Cut(nn.Module):
    """The model up to one tap (a graph), then the tap's head."""

    def __init__(self, graph_module: fx.GraphModule, head: nn.Module, name: str, select: Any):
        super().__init__()
        self.graph_module = graph_module
        self.head = head
        self.tap = name
        self._select = select
        self.eval()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.head(select_tensor(self.graph_module(*args, **kwargs), self._select, self.tap))


def cut_at(sup: DeepSupervision, tap: str) -> nn.Module:
    """The model cut at exit ``tap``: the model's graph up to the tap, then the tap's head; the
    layers after the tap are not in it. Its output equals ``sup.exits(x)[tap]``; it exports
    (``torch.export``, ONNX) like any module. Built with ``torch.fx`` (the tapped module a
    leaf, the graph's output moved to it, the rest removed as dead code).

    Raises:
        EarlyExitError: ``tap`` is not an exit, ``torch.fx`` cannot trace the model, or the
            model's output depends on something after the tap only (nothing to cut).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from deepsup import DeepSupervision, heads
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> sup = DeepSupervision(model, "0", head=heads.classification(3)).eval()
        >>> cut = cut_at(sup, "0")
        >>> x = torch.randn(2, 4)
        >>> torch.equal(cut(x), sup.exits(x)["0"])
        True
        >>> [n.target for n in cut.graph_module.graph.nodes if n.op == "call_module"]
        ['0']
    """
    sup = _check(sup)
    if tap not in sup.taps:
        raise EarlyExitError(f"{tap!r} is not an exit; the exits are {list(sup.taps)}")
    gm, nodes = _trace(sup, [tap])
    graph = gm.graph
    out = next(n for n in graph.nodes if n.op == "output")
    out.args = (nodes[tap],)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return _Cut(gm, sup.heads[tap], tap, sup._settings[tap].select)
