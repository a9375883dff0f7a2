"""torch.compile of the wrapper: graph breaks, equality with eager, and recompilation.

Compile the wrapper (``torch.compile(sup)``), not the inner model. Most tests use the "eager" and
"aot_eager" backends (Dynamo's tracing and, for aot_eager, AOTAutograd, without Inductor's code
generation, which takes ~40 s cold on 2 CPU cores); one slow test runs the default Inductor.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deepsup
from deepsup import DeepSupervision, heads, schedules

torchvision = pytest.importorskip("torchvision")


class CountingBackend:
    """A torch.compile backend that counts the graphs it is asked to compile."""

    def __init__(self) -> None:
        self.compiles = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Any) -> Callable[..., Any]:
        self.compiles += 1
        return gm.forward


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class TinySeg(nn.Module):
    """Conv-BN-ReLU stem, a strided stage and a classifier; logits upsampled to the input."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = nn.Sequential(
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU()
        )
        self.cls = nn.Conv2d(16, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.cls(self.layer1(self.stem(x)))
        return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)


def tiny_sup(weight: Any = 0.4) -> DeepSupervision:
    torch.manual_seed(0)
    return DeepSupervision(
        TinySeg(),
        {"stem": weight, "layer1": 0.3},
        head=heads.seg(num_classes=4, dropout=0.0),  # no dropout: eager and compiled RNG differ
        criterion=nn.CrossEntropyLoss(),
    )


def resnet_sup() -> DeepSupervision:
    torch.manual_seed(0)
    return DeepSupervision(
        torchvision.models.resnet18(num_classes=10),
        {"layer2": 0.3, "layer3": 0.4},
        head=heads.classification(10),
        criterion=nn.CrossEntropyLoss(),
    )


def seg_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 16, 16, generator=g), torch.randint(0, 4, (2, 16, 16), generator=g)


def cls_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 32, 32, generator=g), torch.randint(0, 10, (2,), generator=g)


MODELS = [(tiny_sup, seg_batch), (resnet_sup, cls_batch)]
MODEL_IDS = ["tiny_cnn", "resnet18"]


@pytest.mark.parametrize(("make", "data"), MODELS, ids=MODEL_IDS)
def test_eval_adds_no_graph_break_and_no_op(make: Any, data: Any) -> None:
    sup = make().eval()
    x, _ = data()
    with torch.no_grad():
        wrapped = torch._dynamo.explain(sup)(x)
        torch._dynamo.reset()
        bare = torch._dynamo.explain(sup.model)(x)
    assert wrapped.graph_break_count == 0
    assert (wrapped.graph_count, wrapped.graph_break_count) == (
        bare.graph_count,
        bare.graph_break_count,
    )
    # the same operations: no head, no capture in the eval graph
    assert sum(map(len, wrapped.ops_per_graph)) == sum(map(len, bare.ops_per_graph))


@pytest.mark.parametrize(("make", "data"), MODELS, ids=MODEL_IDS)
def test_train_forward_is_one_graph(make: Any, data: Any) -> None:
    sup = make().train()
    x, y = data()
    explained = torch._dynamo.explain(sup)(x, target=y)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)


def _grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    ("make", "data", "backend"),
    [
        (tiny_sup, seg_batch, "eager"),
        (tiny_sup, seg_batch, "aot_eager"),
        pytest.param(resnet_sup, cls_batch, "aot_eager", marks=pytest.mark.slow),
    ],
    ids=["tiny_cnn-eager", "tiny_cnn-aot_eager", "resnet18-aot_eager"],
)
def test_train_matches_eager(make: Any, data: Any, backend: str) -> None:
    ref = make().train()
    sup = copy.deepcopy(ref)
    x, y = data()

    ref_out, ref_aux = ref(x, target=y)
    (F.cross_entropy(ref_out, y) + sum(ref_aux.values())).backward()

    compiled = torch.compile(sup, backend=backend)
    out, aux = compiled(x, target=y)
    (F.cross_entropy(out, y) + sum(aux.values())).backward()

    torch.testing.assert_close(out, ref_out)
    assert list(aux) == list(ref_aux)
    torch.testing.assert_close(dict(aux), dict(ref_aux))
    torch.testing.assert_close(aux.raw, ref_aux.raw)
    ref_grads, grads = _grads(ref), _grads(sup)
    assert set(grads) == set(ref_grads)
    assert any(n.startswith("heads.") for n in grads)
    torch.testing.assert_close(grads, ref_grads, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_eval_matches_eager(backend: str) -> None:
    sup = tiny_sup().eval()
    x, _ = seg_batch()
    with torch.no_grad():
        out = torch.compile(sup, backend=backend)(x)
        torch.testing.assert_close(out, sup.model(x))


@pytest.mark.slow
def test_eval_matches_eager_with_inductor() -> None:
    sup = tiny_sup().eval()
    x, _ = seg_batch()
    with torch.no_grad():
        out = torch.compile(sup)(x)  # the default backend, Inductor
        torch.testing.assert_close(out, sup.model(x), rtol=1e-4, atol=1e-5)


def _train(compiled: nn.Module, sup: DeepSupervision) -> None:
    sup.train()
    compiled(*seg_batch()[:1], target=seg_batch()[1])


def _eval(compiled: nn.Module, sup: DeepSupervision) -> None:
    sup.eval()
    with torch.no_grad():
        compiled(seg_batch()[0])


def test_toggling_train_eval_does_not_recompile() -> None:
    backend = CountingBackend()
    sup = tiny_sup()
    compiled = torch.compile(sup, backend=backend)
    for _ in range(2):  # warm up both modes (see test_one_compile_per_mode)
        _train(compiled, sup)
        _eval(compiled, sup)
    warm = backend.compiles
    assert warm <= 3
    for _ in range(3):
        _train(compiled, sup)
        _eval(compiled, sup)
    assert backend.compiles == warm


def test_one_compile_per_mode() -> None:
    backend = CountingBackend()
    sup = tiny_sup()
    compiled = torch.compile(sup, backend=backend)
    counts = []
    for step in (_train, _train, _eval, _eval, _train, _eval):
        step(compiled, sup)
        counts.append(backend.compiles)
    assert counts == [1, 1, 2, 2, 2, 2]  # what the bare model gives


@pytest.mark.parametrize(
    "schedule",
    [schedules.Cutoff(0.4, at=2), schedules.LinearDecay(0.4, total=4)],
    ids=["cutoff", "linear_decay"],
)
def test_schedule_step_does_not_recompile(schedule: schedules.Schedule) -> None:
    backend = CountingBackend()
    sup = tiny_sup(schedule)
    compiled = torch.compile(sup, backend=backend)
    x, y = seg_batch()
    sup.train()
    compiled(x, target=y)
    compiled(x, target=y)
    warm = backend.compiles
    seen = []
    for _ in range(5):
        _, aux = compiled(x, target=y)
        weight = sup.weights["stem"]
        seen.append(weight)
        torch.testing.assert_close(aux["stem"], aux.raw["stem"] * weight)
        sup.step()
    assert backend.compiles == warm
    assert seen == [schedule(t) for t in range(5)]
    assert seen[-1] == 0.0


def test_model_state_dict_strips_the_orig_mod_prefix_of_a_compiled_wrapper() -> None:
    sup = tiny_sup()
    compiled = torch.compile(sup, backend="eager")
    x, y = seg_batch()
    compiled(x, target=y)
    state = compiled.state_dict()
    assert all(k.startswith("_orig_mod.") for k in state)  # what torch.compile saves
    stripped = deepsup.model_state_dict(state)
    assert not any("_orig_mod" in k or k.startswith(("model.", "heads.")) for k in stripped)
    assert list(stripped) == list(sup.model.state_dict())
    plain = TinySeg()
    plain.load_state_dict(stripped)  # strict: every key of the plain model, no other
    for k, v in sup.model.state_dict().items():
        assert torch.equal(plain.state_dict()[k], v), k
    sup.eval(), plain.eval()
    assert torch.equal(plain(x), sup(x))


def test_in_place_module_compile_keeps_keys_and_caches() -> None:
    backend = CountingBackend()
    sup = tiny_sup(schedules.Cutoff(0.4, at=3))
    keys = list(sup.state_dict())
    sup.compile(backend=backend)  # nn.Module.compile: the same object, compiled in place
    x, y = seg_batch()
    for _ in range(2):
        sup(x, target=y)
    warm = backend.compiles
    assert warm >= 1
    for _ in range(4):
        _, aux = sup(x, target=y)
        sup.step()
    assert float(aux["stem"]) == 0.0
    sup.eval()
    with torch.no_grad():
        torch.testing.assert_close(sup(x), sup.model(x))
    assert backend.compiles == warm + 1
    assert list(sup.state_dict()) == keys
