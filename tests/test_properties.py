"""Properties over randomly built nested models, random taps and input shapes (hypothesis)."""

from __future__ import annotations

import copy

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from deepsup import DeepSupervision, heads

ACTS = [nn.LeakyReLU, nn.Tanh, nn.GELU, nn.Identity]  # no dead units: gradients are non-zero


@st.composite
def nested_models(draw: st.DrawFn) -> tuple[nn.Module, int]:
    """A chain of Linear/activation layers, some grouped into nested Sequentials."""
    width = draw(st.integers(2, 6))
    d_in = width

    def block(depth: int) -> nn.Module:
        nonlocal width
        if depth < 2 and draw(st.booleans()):
            return nn.Sequential(*[block(depth + 1) for _ in range(draw(st.integers(1, 3)))])
        out = draw(st.integers(2, 6))
        layer = nn.Sequential(nn.Linear(width, out), draw(st.sampled_from(ACTS))())
        width = out
        return layer

    blocks = [block(0) for _ in range(draw(st.integers(2, 5)))]
    model = nn.Sequential(*blocks, nn.Linear(width, 3))
    return model, d_in


def _param_modules(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if n and any(True for _ in m.parameters())]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), spec=nested_models(), batch=st.integers(1, 4))
def test_eval_equals_bare_and_unwrap_leaves_no_hook(
    data: st.DataObject, spec: tuple[nn.Module, int], batch: int
) -> None:
    model, d_in = spec
    names = [n for n in _param_modules(model) if n != str(len(model) - 1)]
    taps = data.draw(st.lists(st.sampled_from(names), min_size=1, unique=True))
    bare = copy.deepcopy(model).eval()
    sup = DeepSupervision(
        model, taps, head=heads.classification(3), criterion=nn.CrossEntropyLoss()
    ).eval()
    x = torch.randn(batch, d_in)
    assert torch.equal(sup(x), bare(x))
    assert torch.equal(sup(x, target=torch.zeros(batch, dtype=torch.long)), bare(x))
    sup.unwrap()
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    assert hooks == 0
    assert torch.equal(model(x), bare(x))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), spec=nested_models(), batch=st.integers(2, 4))
def test_each_aux_loss_reaches_the_tap_and_nothing_after_it(
    data: st.DataObject, spec: tuple[nn.Module, int], batch: int
) -> None:
    model, d_in = spec
    names = [n for n in _param_modules(model) if n != str(len(model) - 1)]
    taps = data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True))
    # nested taps (a block and a layer inside it) are fine; each loss is checked on its own
    sup = DeepSupervision(
        model, taps, head=heads.classification(3), criterion=nn.CrossEntropyLoss()
    ).train()
    x = torch.randn(batch, d_in)
    y = torch.randint(0, 3, (batch,))
    order = [n for n, _ in model.named_modules() if n]
    for name in taps:
        sup.zero_grad(set_to_none=True)
        _, aux = sup(x, target=y)
        aux[name].backward()
        tapped = model.get_submodule(name)
        grads = [p.grad for p in tapped.parameters()]
        assert all(g is not None for g in grads), name
        # gradient reaches the tapped module (almost surely non-zero for random weights)
        assert any(torch.count_nonzero(g) > 0 for g in grads if g is not None), name
        for other in order[order.index(name) + 1 :]:
            if other.startswith(name + "."):
                continue  # inside the tapped module
            for p in model.get_submodule(other).parameters(recurse=False):
                assert p.grad is None, (name, other)
        for head_name, head in sup.heads.items():
            if head_name != name:
                assert all(p.grad is None for p in head.parameters())
