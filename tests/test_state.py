"""Checkpoint helpers and optimizer parameter groups."""

from __future__ import annotations

import pytest
import torch
from conftest import TinyCNN
from torch import nn

from deepsup import DeepSupervision, heads, model_state_dict, param_groups


def _sup(model: nn.Module) -> DeepSupervision:
    return DeepSupervision(model, "stage2", head=heads.seg(3), criterion=nn.CrossEntropyLoss())


def test_model_state_dict_loads_into_the_plain_model(tiny_cnn: TinyCNN) -> None:
    sup = _sup(tiny_cnn)
    plain = TinyCNN()
    plain.load_state_dict(model_state_dict(sup.state_dict()))
    x = torch.randn(1, 3, 8, 8)
    assert torch.equal(plain.eval()(x), tiny_cnn.eval()(x))


def test_model_state_dict_strips_ddp_and_compile_prefixes(tiny_cnn: TinyCNN) -> None:
    state = {f"module._orig_mod.{k}": v for k, v in _sup(tiny_cnn).state_dict().items()}
    assert set(model_state_dict(state)) == set(tiny_cnn.state_dict())


def test_param_groups_split_model_and_heads(tiny_cnn: TinyCNN) -> None:
    sup = _sup(tiny_cnn)
    groups = param_groups(sup, lr=0.01, head_lr_mult=10, new_modules=["cls"], momentum=0.9)
    model_ids = {id(p) for p in groups[0]["params"]}
    fast_ids = {id(p) for p in groups[1]["params"]}
    assert not model_ids & fast_ids
    assert model_ids | fast_ids == {id(p) for p in sup.parameters()}
    assert {id(p) for p in tiny_cnn.cls.parameters()} <= fast_ids
    assert {id(p) for p in sup.heads.parameters()} <= fast_ids
    assert groups[0]["lr"] == 0.01 and groups[1]["lr"] == pytest.approx(0.1)
    assert groups[1]["momentum"] == 0.9
    torch.optim.SGD(groups, lr=0.01)


def test_param_groups_errors(tiny_cnn: TinyCNN) -> None:
    with pytest.raises(ValueError, match=r"new_modules entry 'ppm' is not a submodule of TinyCNN"):
        param_groups(_sup(tiny_cnn), lr=0.1, new_modules=["ppm"])
    with pytest.raises(
        TypeError, match=r"sup must be a DeepSupervision or an nn\.Module \(got str\)"
    ):
        param_groups("tiny_cnn", lr=0.1)  # type: ignore[arg-type]


def test_tap_criteria_modules_move_with_the_wrapper(tiny_cnn: TinyCNN) -> None:
    from deepsup import Tap

    weighted = nn.CrossEntropyLoss(weight=torch.ones(3))
    sup = DeepSupervision(tiny_cnn, {"stage2": Tap(criterion=weighted)}, head=heads.seg(3))
    assert "criteria.stage2.weight" in sup.state_dict()
    sup.double()
    assert weighted.weight.dtype == torch.float64
