"""deepsup.balance: each remedy equals its formula on a hand-built case; the bound holds."""

from __future__ import annotations

import doctest
import math

import pytest
import torch
from torch import nn

from deepsup import DeepSupervision, Tap, heads
from deepsup.balance import GradientBound, UncertaintyWeighting, project_conflicts
from deepsup.errors import ConfigError, UsageError


def test_docstring_examples() -> None:
    import deepsup.balance as balance

    assert doctest.testmod(balance).failed == 0


def _net(weight: float, seed: int = 0) -> tuple[DeepSupervision, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    sup = DeepSupervision(
        model, {"1": weight}, head=heads.classification(3), criterion=nn.CrossEntropyLoss()
    )
    return sup, torch.randn(16, 5), torch.randint(0, 3, (16,))


def _split_at_feature(sup: DeepSupervision, x: torch.Tensor, y: torch.Tensor):
    """The main and aux gradients at the tapped feature, by two separate autograd calls."""
    feats = {}
    h = sup.model[1].register_forward_hook(lambda m, a, o: feats.setdefault("f", o))
    out, aux = sup(x, target=y)
    h.remove()
    main = nn.functional.cross_entropy(out, y)
    g_main = torch.autograd.grad(main, feats["f"], retain_graph=True)[0]
    g_aux = torch.autograd.grad(aux["1"], feats["f"], retain_graph=True)[0]
    return g_main, g_aux


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.5, 100.0])
def test_gradient_bound_equals_formula_and_holds(ratio: float) -> None:
    sup, x, y = _net(weight=20.0)  # a large aux loss: its gradient dominates
    g_main, g_aux = _split_at_feature(sup, x, y)
    scale = min(1.0, ratio * float(g_main.norm()) / float(g_aux.norm()))
    # reference: the first layer's gradient from J^T (g_main + s g_aux), by hand through autograd
    first = sup.model[0]
    sup.zero_grad()
    out = first(x)
    f = torch.tanh(out)
    ref = torch.autograd.grad(f, first.weight, grad_outputs=g_main + scale * g_aux)[0]
    bound = GradientBound(sup, ratio)
    sup.zero_grad()
    out, aux = sup(x, target=y)
    (nn.functional.cross_entropy(out, y) + sum(aux.values())).backward()
    assert bound.scales()["1"][0] == pytest.approx(scale, rel=1e-6)
    torch.testing.assert_close(first.weight.grad, ref, rtol=1e-5, atol=1e-7)
    # the bound holds: |s g_aux| <= ratio |g_main| at the feature
    assert scale * float(g_aux.norm()) <= ratio * float(g_main.norm()) * (1 + 1e-6) + 1e-12
    bound.remove()


def test_gradient_bound_leaves_small_aux_and_the_heads_alone() -> None:
    sup, x, y = _net(weight=0.01)
    out, aux = sup(x, target=y)
    (nn.functional.cross_entropy(out, y) + sum(aux.values())).backward()
    plain = [p.grad.clone() for p in sup.parameters()]
    bound = GradientBound(sup, 1.0)
    sup.zero_grad()
    out, aux = sup(x, target=y)
    (nn.functional.cross_entropy(out, y) + sum(aux.values())).backward()
    assert bound.scales() == {"1": [1.0]}
    for p, g in zip(sup.parameters(), plain):
        torch.testing.assert_close(p.grad, g)
    sup.eval()  # eval and no-grad forwards are untouched
    with torch.no_grad():
        torch.testing.assert_close(sup(x), sup.model(x))
    assert bound.scales() == {}


def test_gradient_bound_refuses_clone_and_bad_ratio() -> None:
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    sup = DeepSupervision(model, {"1": Tap(clone=True)}, head=heads.classification(3),
                          criterion=nn.CrossEntropyLoss())  # fmt: skip
    with pytest.raises(ConfigError, match="clone=True"):
        GradientBound(sup)
    with pytest.raises(ConfigError, match="max_ratio"):
        GradientBound(_net(1.0)[0], -1.0)


def test_uncertainty_weighting_formula_and_gradient() -> None:
    uw = UncertaintyWeighting(["main", "a"], initial={"a": 0.25})
    with torch.no_grad():
        uw.log_vars[0] = 0.3
    la, lm = torch.tensor(2.0), torch.tensor(0.7)
    total = uw({"main": lm, "a": la})
    s0, s1 = 0.3, -math.log(0.25)
    assert float(total.detach()) == pytest.approx(
        math.exp(-s0) * 0.7 + s0 + math.exp(-s1) * 2.0 + s1
    )
    total.backward()
    # d/ds (exp(-s) L + s) = 1 - exp(-s) L
    expected = [1 - math.exp(-s0) * 0.7, 1 - math.exp(-s1) * 2.0]
    torch.testing.assert_close(uw.log_vars.grad, torch.tensor(expected))
    assert uw.weights()["a"] == pytest.approx(0.25)
    with pytest.raises(UsageError, match=r"no loss for \['a'\]"):
        uw({"main": lm})
    with pytest.raises(ConfigError, match="distinct loss names"):
        UncertaintyWeighting(["main", "main"])
    with pytest.raises(ConfigError, match="initial"):
        UncertaintyWeighting(["main"], initial={"main": 0.0})


def test_project_conflicts_equals_pcgrad_formula() -> None:
    sup, x, y = _net(weight=3.0, seed=1)
    shared = list(sup.model.parameters())
    out, aux = sup(x, target=y)
    main = nn.functional.cross_entropy(out, y)
    flat = lambda loss: torch.cat([  # noqa: E731
        (torch.zeros_like(p) if g is None else g).flatten()
        for p, g in zip(shared, torch.autograd.grad(loss, shared, retain_graph=True,
                                                     allow_unused=True))])  # fmt: skip
    g, gi = flat(main), flat(aux["1"])
    expected = gi - (gi @ g) / (g @ g) * g if gi @ g < 0 else gi
    head_ref = torch.autograd.grad(aux["1"], list(sup.heads.parameters()), retain_graph=True)
    cos = project_conflicts(main, aux, shared, list(sup.heads.parameters()))
    assert cos["1"] == pytest.approx(float(gi @ g / (gi.norm() * g.norm())), rel=1e-5)
    got = torch.cat([p.grad.flatten() for p in shared])
    torch.testing.assert_close(got, g + expected, rtol=1e-5, atol=1e-7)
    for p, r in zip(sup.heads.parameters(), head_ref):
        torch.testing.assert_close(p.grad, r)


def test_project_conflicts_removes_only_the_conflicting_part() -> None:
    w = nn.Parameter(torch.tensor([1.0, 2.0]))
    # main gradient (1, 0); aux a: (-2, 3) conflicts -> (0, 3); aux b: (1, 1) agrees, kept
    cos = project_conflicts(w[0], {"a": -2 * w[0] + 3 * w[1], "b": w[0] + w[1]}, [w])
    assert w.grad.tolist() == [2.0, 4.0]
    assert cos["a"] == pytest.approx(-2 / math.sqrt(13)) and cos["b"] == pytest.approx(2**-0.5)
    with pytest.raises(UsageError, match="no shared parameter"):
        project_conflicts(w[0], {}, [])


def test_gradient_monitor_equals_autograd_and_changes_nothing() -> None:
    from deepsup.diagnostics import GradientMonitor

    sup, x, y = _net(weight=2.0, seed=3)
    g_main, g_aux = _split_at_feature(sup, x, y)
    sup.zero_grad()
    out, aux = sup(x, target=y)
    main = nn.functional.cross_entropy(out, y)
    (main + sum(aux.values())).backward()
    plain = [p.grad.clone() for p in sup.parameters()]
    monitor = GradientMonitor(sup)
    sup.zero_grad()
    out, aux = sup(x, target=y)
    main = nn.functional.cross_entropy(out, y)
    (main + sum(aux.values())).backward()
    row = monitor.record(main, aux)
    split = row["taps"]["1"]
    assert split["aux"] == pytest.approx(float(g_aux.norm()), rel=1e-5)
    assert split["rest"] == pytest.approx(float(g_main.norm()), rel=1e-5)
    cos = float(g_aux.flatten() @ g_main.flatten() / (g_aux.norm() * g_main.norm()))
    assert split["cosine"] == pytest.approx(cos, rel=1e-4, abs=1e-6)
    assert row["losses"]["main"] == pytest.approx(float(main.detach())) and set(row["losses"]) == {
        "main",
        "1",
    }
    first = sup.model[0]
    norm = torch.cat([first.weight.grad.flatten(), first.bias.grad.flatten()]).norm()
    assert row["layers"]["0"] == pytest.approx(float(norm))
    for p, g in zip(sup.parameters(), plain):  # the monitor only reads
        torch.testing.assert_close(p.grad, g)
    monitor.remove()
