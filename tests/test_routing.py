"""Per-sample early exit inside a batch (deepsup/_routing.py through EarlyExit(per_sample=True))."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import TupleModel
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from deepsup import DeepSupervision, EarlyExit, Tap, heads
from deepsup._routing import split_rows
from deepsup.errors import ConfigError, EarlyExitError


class Net(nn.Module):
    """conv -> BN -> stage1 -> stage2 -> pool -> fc: a small ResNet-like classifier."""

    def __init__(self, k: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.stage1 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(32, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stage2(self.stage1(self.stem(x))).mean((2, 3)))


def make(seed: int = 0, dtype: torch.dtype = torch.float64) -> DeepSupervision:
    torch.manual_seed(seed)
    model = Net().to(dtype)
    for m in model.modules():  # non-trivial eval statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    sup = DeepSupervision(model, ["stem", "stage1"], head=heads.classification(4))
    return sup.to(dtype).eval()


def example(n: int = 4, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, dtype=dtype)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    batch=st.integers(1, 9),
    t_stem=st.floats(0.2, 1.0),
    t_stage1=st.floats(0.2, 1.0),
)
def test_routing_equals_running_each_sample_alone(
    seed: int, batch: int, t_stem: float, t_stage1: float
) -> None:
    sup = make(seed)
    thresholds = {"stem": t_stem, "stage1": t_stage1}
    x = example(batch)
    routed = EarlyExit(sup, thresholds, per_sample=True, example_input=example())
    alone = EarlyExit(sup, thresholds)
    preds, names = routed(x)
    assert preds.shape == (batch, 4) and len(names) == batch
    for i in range(batch):
        pred, name = alone(x[i : i + 1])
        assert names[i] == name
        torch.testing.assert_close(preds[i], pred[0])


class AddCol(nn.Module):
    """Adds ``value`` to column 1: the features carry the row id (column 0) and the exit."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tensor([0.0, self.value, 0.0, 0.0])


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = AddCol(0.0)
        self.b = AddCol(1.0)
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.b(self.a(x)))


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(2, 40), seed=st.integers(0, 10_000), threshold=st.floats(0.0, 1.0))
def test_random_confidences_route_each_row_to_its_first_confident_exit(
    batch: int, seed: int, threshold: float
) -> None:
    """A drawn confidence per row and exit: each row leaves at the first exit where it passes,
    its prediction is its own, and the rows that reach the output get the model's output."""
    gen = torch.Generator().manual_seed(seed)
    table = torch.rand(2, batch, generator=gen)  # confidence of row r at exit e

    def conf(pred: torch.Tensor) -> torch.Tensor:
        return table[pred[:, 1].long(), pred[:, 0].long()]

    x = torch.zeros(batch, 4)
    x[:, 0] = torch.arange(batch)
    x[:, 2:] = torch.randn(batch, 2, generator=gen)
    model = Chain()
    sup = DeepSupervision(model, ["a", "b"], head=nn.Identity(), example_input=x).eval()
    early = EarlyExit(sup, threshold, per_sample=True, example_input=x, confidence=conf)
    preds, names = early(x)
    first = table[0] >= threshold
    second = ~first & (table[1] >= threshold)
    assert names == ["a" if f else "b" if s else "output" for f, s in zip(first, second)]
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(preds[first], x[first])
    torch.testing.assert_close(preds[second], x[second] + torch.tensor([0.0, 1.0, 0.0, 0.0]))
    rest = ~first & ~second
    torch.testing.assert_close(preds[rest], out[rest])


def test_rows_that_reach_the_output_equal_the_model_and_later_modules_see_fewer_rows() -> None:
    sup = make(2)
    x = example(6)
    seen: list[int] = []
    sup.model.stage2.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    early = EarlyExit(sup, {"stem": float("inf"), "stage1": 0.0}, per_sample=True, example_input=x)
    seen.clear()
    preds, names = early(x)
    assert names == ["stage1"] * 6 and seen == []  # every row left: stage2 never ran
    early.thresholds = float("inf")
    preds, names = early(x)
    assert names == ["output"] * 6 and seen == [6]
    assert torch.equal(preds, sup.model(x))


def test_mixed_exits_run_the_rest_of_the_model_on_the_remaining_rows() -> None:
    sup = make(3)
    x = example(8)
    seen: list[int] = []
    sup.model.stage2.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    conf = sup.exits(x)["stage1"].softmax(1).amax(1)
    t = float(conf.median())
    early = EarlyExit(sup, {"stage1": t}, per_sample=True, example_input=x)
    seen.clear()
    preds, names = early(x)
    left = int((conf >= t).sum())
    assert names == ["stage1" if c >= t else "output" for c in conf]
    assert seen == [8 - left]
    out = sup.model(x)
    stay = conf < t
    torch.testing.assert_close(preds[stay], out[stay])
    torch.testing.assert_close(preds[~stay], sup.exits(x)["stage1"][~stay])


def test_nan_rows_never_exit_and_channels_last_and_float32_work() -> None:
    sup = make(4, torch.float32)
    x = example(5, torch.float32).to(memory_format=torch.channels_last)
    x[2] = float("nan")
    early = EarlyExit(sup, 0.0, per_sample=True, example_input=example(4, torch.float32))
    preds, names = early(x)
    assert names[2] == "output" and all(n == "stem" for i, n in enumerate(names) if i != 2)
    assert preds[2].isnan().all()


def test_split_rows_keeps_the_order_of_both_halves() -> None:
    mask = torch.tensor([False, True, True, False, True])
    keep, leaving, n = split_rows(mask)
    assert keep.tolist() == [0, 3] and leaving.tolist() == [1, 2, 4] and n == 3


# refused models ---------------------------------------------------------------------------


class Skip(nn.Module):
    """A U-Net-like skip: the input's batch is used again after the tapped encoder."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(4, 4)
        self.dec = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(self.enc(x) + x)


class Masked(nn.Module):
    """An attention-style mask passed as an input, applied after the tap."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.out(self.enc(x) * mask)


class Mixing(nn.Module):
    """Rows mixed across the batch after the tap (a batch mean)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.enc(x)
        return self.out(h - h.mean(0, keepdim=True))


def head3() -> Any:
    return heads.classification(3)


@pytest.mark.parametrize(
    ("model", "example_input", "match"),
    [
        (Skip(), torch.randn(4, 4), r"fails when rows leave at tap 'enc'.*skip connections"),
        (
            Masked(),
            {"x": torch.randn(4, 4), "mask": torch.ones(4, 4)},
            r"fails when rows leave at tap 'enc'.*attention mask",
        ),
        (Mixing(), torch.randn(4, 4), r"do not give the outputs they give in the full batch"),
    ],
    ids=["unet-skip", "attention-mask", "batch-mixing"],
)
def test_models_that_carry_the_batch_past_a_tap_are_refused_with_the_reason(
    model: nn.Module, example_input: Any, match: str
) -> None:
    sup = DeepSupervision(model, ["enc"], head=head3()).eval()
    with pytest.raises(EarlyExitError, match=match):
        EarlyExit(sup, per_sample=True, example_input=example_input)
    early = EarlyExit(sup, 0.0, example_input=example_input)  # whole-batch exits stay available
    args = example_input if isinstance(example_input, dict) else {"x": example_input}
    assert early(**args)[1] == "enc"


def test_other_refusals() -> None:
    sup = make()
    with pytest.raises(ConfigError, match="per_sample=True needs example_input"):
        EarlyExit(sup, per_sample=True)
    with pytest.raises(EarlyExitError, match="at least 2 rows"):
        EarlyExit(sup, per_sample=True, example_input=example(1))
    tup = DeepSupervision(TupleModel(), {"block": Tap(select=0)}, head=heads.tokens(3)).eval()
    with pytest.raises(EarlyExitError, match=r"tap 'block' returned tuple.*one tensor"):
        EarlyExit(tup, per_sample=True, example_input=torch.randn(2, 6, 5))
    dense = DeepSupervision(Net(), ["stem"], head=heads.seg(4)).eval()
    with pytest.raises(EarlyExitError, match="exit 'stem' predicts"):
        EarlyExit(dense, per_sample=True, example_input=torch.randn(2, 3, 8, 8))


# overhead: one host synchronisation per tested tap, nothing at taps that cannot exit --------


class CountSyncs(TorchDispatchMode):
    """Counts the host synchronisations (``aten._local_scalar_dense``: ``bool()``, ``int()``,
    ``item()`` of a tensor) and the ops dispatched."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs = 0
        self.ops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops += 1
        if func is torch.ops.aten._local_scalar_dense.default:
            self.syncs += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("per_sample", [False, True], ids=["whole-batch", "per-sample"])
@pytest.mark.parametrize("leave", ["none", "some", "all"])
def test_at_most_one_host_sync_per_tested_tap(per_sample: bool, leave: str) -> None:
    sup = make(5)
    x = example(8)
    conf = sup.exits(x)["stage1"].softmax(1).amax(1)
    t = {"none": 2.0, "some": float(conf.median()), "all": 0.0}[leave]
    kw: dict[str, Any] = {"per_sample": True, "example_input": x} if per_sample else {}
    early = EarlyExit(sup, {"stem": 2.0, "stage1": t}, **kw)
    with CountSyncs() as counter:
        early(x)
    assert counter.syncs <= 2  # two tested taps


def test_taps_that_cannot_exit_run_no_head_and_no_op() -> None:
    sup = make(6)
    x = example(4)
    calls: list[str] = []
    sup.heads["stem"].register_forward_hook(lambda m, a, o: calls.append("stem"))
    early = EarlyExit(sup, {"stem": float("inf"), "stage1": 2.0}, per_sample=True, example_input=x)
    calls.clear()
    with CountSyncs() as with_hooks:
        early(x)
    early.thresholds = float("inf")
    with CountSyncs() as none:
        early(x)
    with CountSyncs() as bare, torch.no_grad():
        sup.model(x)
    assert calls == [] and none.ops == bare.ops and none.syncs == 0
    assert with_hooks.syncs == 1
