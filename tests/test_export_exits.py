"""Exits for deployment (deepsup/_export.py): AllExits (one graph) and cut_at (the model up to
one exit, then its head), through torch.export and ONNX; clear errors where they cannot work."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
import torch
from conftest import ReuseModel, TupleModel
from torch import nn

from deepsup import DeepSupervision, Tap, heads
from deepsup.errors import EarlyExitError
from deepsup.exits import AllExits, cut_at


def resnet_sup() -> DeepSupervision:
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(num_classes=5)
    return DeepSupervision(model, ["layer1", "layer2"], head=heads.classification(5)).eval()


def assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert list(a) == list(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_all_exits_equal_sup_exits_and_export_as_one_graph() -> None:
    sup = resnet_sup()
    x = torch.randn(2, 3, 32, 32)
    every = AllExits(sup)
    assert_same(every(x), sup.exits(x))
    assert torch.equal(every(x)["output"], sup.model(x))
    program = torch.export.export(every, (x,))
    assert_same(program.module()(x), sup.exits(x))


def test_cut_at_is_the_model_up_to_the_tap_then_its_head() -> None:
    sup = resnet_sup()
    x = torch.randn(2, 3, 32, 32)
    cut = cut_at(sup, "layer1")
    torch.testing.assert_close(cut(x), sup.exits(x)["layer1"])
    called = {n.target for n in cut.graph_module.graph.nodes if n.op == "call_module"}
    assert "layer1" in called and not any(str(t).startswith(("layer2", "fc")) for t in called)
    program = torch.export.export(cut, (x,))
    torch.testing.assert_close(program.module()(x), sup.exits(x)["layer1"])


def test_selected_tuple_taps_and_first_or_last_calls() -> None:
    sup = DeepSupervision(TupleModel(), {"block": Tap(select=0)}, head=heads.tokens(3)).eval()
    x = torch.randn(2, 6, 5)
    assert_same(AllExits(sup)(x), sup.exits(x))
    torch.testing.assert_close(cut_at(sup, "block")(x), sup.exits(x)["block"])
    for calls in ("first", "last"):
        reuse = DeepSupervision(
            ReuseModel(), {"shared": Tap(calls=calls)}, head=heads.classification(2)
        ).eval()
        x = torch.randn(3, 4)
        assert_same(AllExits(reuse)(x), reuse.exits(x))
        torch.testing.assert_close(cut_at(reuse, "shared")(x), reuse.exits(x)["shared"])


@pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None,
    reason="onnx and onnxruntime are not installed",
)
def test_all_exits_through_onnx_runtime(tmp_path: Any) -> None:
    import onnxruntime

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    sup = DeepSupervision(model, ["1", "3"], head=heads.classification(3)).eval()
    x = torch.randn(2, 4)
    path = tmp_path / "exits.onnx"
    torch.onnx.export(AllExits(sup), (x,), str(path), dynamo=True)
    session = onnxruntime.InferenceSession(str(path))
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    want = sup.exits(x)
    assert len(got) == 3
    for value, key in zip(got, ["1", "3", "output"]):
        torch.testing.assert_close(torch.from_numpy(value), want[key], rtol=1e-5, atol=1e-5)


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if h.sum() > 0:  # control flow on a tensor value: not traceable
            h = -h
        return self.b(h)


class ThroughForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a.forward(x))


def test_what_cannot_be_cut_is_refused_with_the_reason() -> None:
    branchy = DeepSupervision(Branchy(), ["a"], head=heads.classification(2)).eval()
    with pytest.raises(EarlyExitError, match=r"torch\.fx cannot trace Branchy"):
        cut_at(branchy, "a")
    with pytest.raises(EarlyExitError, match=r"torch\.fx cannot trace Branchy"):
        AllExits(branchy)
    through = DeepSupervision(
        ThroughForward(), ["a"], head=heads.classification(2), example_input=torch.randn(2, 4)
    )
    with pytest.raises(EarlyExitError, match=r"tap 'a' is not called in the traced graph"):
        cut_at(through.eval(), "a")
    reuse = DeepSupervision(ReuseModel(), ["shared"], head=heads.classification(2)).eval()
    with pytest.raises(EarlyExitError, match="called 2 times per forward"):
        AllExits(reuse)
    sup = resnet_sup()
    with pytest.raises(EarlyExitError, match="'layer4' is not an exit"):
        cut_at(sup, "layer4")
    with pytest.raises(EarlyExitError, match="needs a DeepSupervision"):
        AllExits(sup.model)  # type: ignore[arg-type]
