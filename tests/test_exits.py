"""deepsup.exits: sup.exits(), EarlyExit (stops the forward, equals the model), calibration."""

from __future__ import annotations

import copy
import math
import pickle
import threading
from typing import Any

import pytest
import torch
from conftest import ReuseModel, TinyCNN
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from deepsup import DeepSupervision, EarlyExit, Tap, _calibration, heads
from deepsup._calibration import _simulate
from deepsup.errors import EarlyExitError, UsageError
from deepsup.exits import ExitCosts, confidence, search_thresholds, top1


class Net(nn.Module):
    """A small classifier: stem -> stage1 -> stage2 -> pool -> fc."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.stage1 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stage2(self.stage1(self.stem(x))).mean((2, 3)))


TAPS = ["stem", "stage1"]


def make(threshold: Any = 0.9, **kw: Any) -> tuple[Net, DeepSupervision, EarlyExit]:
    model = Net()
    sup = DeepSupervision(
        model, TAPS, head=heads.classification(4), criterion=nn.CrossEntropyLoss()
    )
    kw.setdefault("example_input", torch.randn(2, 3, 16, 16))  # counts each tap's calls once
    early = EarlyExit(sup, threshold, **kw).eval()
    return model, sup, early


def capture(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tapped modules' outputs, captured by hand with temporary hooks."""
    feats: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: feats.__setitem__(n, o))
        for n in names
    ]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return feats


def module_calls(model: nn.Module) -> tuple[list[str], list[Any]]:
    """Record the name of every module of ``model`` as it is called."""
    calls: list[str] = []
    handles = [
        m.register_forward_pre_hook(lambda mod, args, n=n: calls.append(n))
        for n, m in model.named_modules()
        if n
    ]
    return calls, handles


# sup.exits() ------------------------------------------------------------------------------


def test_exits_equal_the_heads_run_by_hand_on_the_captured_features() -> None:
    model, sup, _ = make()
    sup.eval()
    x = torch.randn(3, 3, 16, 16)
    got = sup.exits(x)
    assert list(got) == [*TAPS, "output"]
    feats = capture(model, TAPS, x)
    with torch.no_grad():
        for name in TAPS:
            assert torch.equal(got[name], sup.heads[name](feats[name]))
        assert torch.equal(got["output"], model(x))
    assert not any(v.requires_grad for v in got.values())  # eval: under no_grad


def test_exits_in_training_carry_gradient_to_the_model() -> None:
    model, sup, _ = make()
    sup.train()
    x = torch.randn(2, 3, 16, 16)
    got = sup.exits(x)
    feats = capture(model, TAPS, x)
    torch.testing.assert_close(got["stem"], sup.heads["stem"](feats["stem"]), rtol=0, atol=0)
    got["stage1"].sum().backward()
    assert model.stem[0].weight.grad is not None and model.stem[0].weight.grad.abs().sum() > 0
    assert model.fc.weight.grad is None  # the output was not in the loss


def test_exits_leave_the_eval_passthrough_and_capture_state_unchanged() -> None:
    model, sup, _ = make()
    sup.eval()
    x = torch.randn(2, 3, 16, 16)
    sup.exits(x)
    assert sup._capture.records() is None
    assert torch.equal(sup(x), model(x))


def test_exits_on_dense_predictions_and_calls_all() -> None:
    model = TinyCNN()
    sup = DeepSupervision(model, ["stage1"], head=heads.seg(3), criterion=None).eval()
    out = sup.exits(torch.randn(2, 3, 16, 16))
    assert out["stage1"].shape == (2, 3, 8, 8) and out["output"].shape == (2, 3, 16, 16)
    reuse = DeepSupervision(
        ReuseModel(), {"shared": Tap(calls="all")}, head=heads.classification(2)
    ).eval()
    preds = reuse.exits(torch.randn(2, 4))["shared"]
    assert isinstance(preds, list) and len(preds) == 2


def test_exits_after_unwrap_raise() -> None:
    _, sup, early = make()
    early.remove()
    sup.unwrap()
    with pytest.raises(RuntimeError, match="unwrapped"):
        sup.exits(torch.randn(1, 3, 16, 16))


def test_a_tap_named_output_is_refused() -> None:
    model = nn.Sequential()
    model.add_module("output", nn.Linear(4, 4))
    sup = DeepSupervision(model, "output", head=heads.classification(2))
    with pytest.raises(EarlyExitError, match="'output'"):
        sup.exits(torch.randn(1, 4))


# EarlyExit: the forward -------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [math.inf, 1.01, {"stem": 2.0}], ids=["inf", "1.01", "dict"])
def test_no_exit_returns_the_models_output_bit_for_bit(threshold: Any) -> None:
    model, _, early = make(threshold)
    x = torch.randn(4, 3, 16, 16)
    pred, name = early(x)
    assert name == "output"
    assert torch.equal(pred, model(x))


def test_an_exit_stops_the_forward_later_modules_never_run() -> None:
    model, sup, early = make({"stem": 0.0})
    x = torch.randn(2, 3, 16, 16)
    calls, handles = module_calls(model)
    try:
        model(x)
        full = list(calls)
        calls.clear()
        pred, name = early(x)
    finally:
        for h in handles:
            h.remove()
    assert name == "stem"
    assert calls == ["stem", "stem.0", "stem.1"]
    assert full[: len(calls)] == calls and "stage1" in full and "fc" in full
    feats = capture(model, ["stem"], x)
    with torch.no_grad():
        assert torch.equal(pred, sup.heads["stem"](feats["stem"]))


def test_the_first_confident_tap_in_execution_order_wins() -> None:
    model, sup, early = make({"stage1": 0.0, "stem": math.inf})
    x = torch.randn(2, 3, 16, 16)
    calls, handles = module_calls(model)
    try:
        pred, name = early(x)
    finally:
        for h in handles:
            h.remove()
    assert name == "stage1" and "stage2" not in calls and "fc" not in calls
    early.thresholds = 0.0  # both confident: the earlier one
    assert early(x)[1] == "stem"


def test_every_sample_of_the_batch_must_be_confident() -> None:
    values = {"conf": torch.tensor([1.0, 0.2])}
    model, _, early = make({"stem": 0.5}, confidence=lambda p: values["conf"])
    x = torch.randn(2, 3, 16, 16)
    pred, name = early(x)
    assert name == "output" and torch.equal(pred, model(x))
    values["conf"] = torch.tensor([1.0, 0.6])
    assert early(x)[1] == "stem"


def test_no_state_is_left_behind_and_the_model_runs_normally_after() -> None:
    model, sup, early = make(0.0)
    x = torch.randn(2, 3, 16, 16)
    assert early(x)[1] == "stem"
    assert early._state.current() is None
    assert torch.equal(model(x), Net.forward(model, x))
    with pytest.raises(RuntimeError):
        early(torch.randn(2, 5, 16, 16))  # wrong channels: fails inside the model
    assert early._state.current() is None
    sup.train()
    out, aux = sup(x, target=torch.tensor([0, 1]))  # training through the wrapper still works
    assert set(aux) == set(TAPS) and out.shape == (2, 4)


def test_a_models_own_except_exception_does_not_swallow_the_exit() -> None:
    class Guarded(Net):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            try:
                h = self.stem(x)
            except Exception:  # a model that guards a block
                h = torch.zeros(1)
            return self.fc(self.stage2(self.stage1(h)).mean((2, 3)))

    model = Guarded()
    sup = DeepSupervision(model, TAPS, head=heads.classification(4))
    early = EarlyExit(sup, {"stem": 0.0}).eval()
    assert early(torch.randn(1, 3, 16, 16))[1] == "stem"


def test_threads_do_not_see_each_others_exits() -> None:
    model, _, early = make({"stem": 0.0})
    x = torch.randn(1, 3, 16, 16)
    results: list[Any] = []

    def worker() -> None:
        results.append(early(x)[1])
        results.append(torch.equal(model(x), Net.forward(model, x)))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("stem") == 4 and results.count(True) == 4


def test_remove_restores_the_models_hooks_and_the_deepcopy_is_independent() -> None:
    model, sup, early = make(0.0)
    before = {n: len(m._forward_hooks) for n, m in model.named_modules()}
    twin = copy.deepcopy(early)
    assert twin(torch.randn(1, 3, 16, 16))[1] == "stem"
    assert pickle.loads(pickle.dumps(early))(torch.randn(1, 3, 16, 16))[1] == "stem"
    early.remove()
    early.remove()  # twice is safe
    after = {n: len(m._forward_hooks) for n, m in model.named_modules()}
    assert after == {n: c - (n in TAPS) for n, c in before.items()}
    assert twin(torch.randn(1, 3, 16, 16))[1] == "stem"  # the copy keeps its own hooks
    with pytest.raises(EarlyExitError, match="removed"):
        early(torch.randn(1, 3, 16, 16))


def test_training_mode_is_refused() -> None:
    _, sup, early = make()
    early.train()
    with pytest.raises(EarlyExitError, match="eval mode only"):
        early(torch.randn(1, 3, 16, 16))
    early.eval()
    sup.heads["stem"].train()
    with pytest.raises(EarlyExitError, match="head 'stem'"):
        early(torch.randn(1, 3, 16, 16))


def test_wrapped_wrappers_and_calls_all_are_refused() -> None:
    _, sup, _ = make()

    class FakeDDP(nn.Module):  # what DDP and DataParallel look like: the wrapper in .module
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    with pytest.raises(EarlyExitError, match=r"not a DDP or torch\.compile wrapper"):
        EarlyExit(FakeDDP(sup))  # type: ignore[arg-type]
    with pytest.raises(EarlyExitError, match="needs a DeepSupervision"):
        EarlyExit(Net())  # type: ignore[arg-type]
    reuse = DeepSupervision(
        ReuseModel(), {"shared": Tap(calls="all")}, head=heads.classification(2)
    )
    with pytest.raises(EarlyExitError, match="calls='all'"):
        EarlyExit(reuse)


@pytest.mark.slow
def test_torch_compile_is_refused_with_a_clear_error() -> None:
    _, sup, early = make()
    with pytest.raises(EarlyExitError, match=r"torch\.compile"):
        EarlyExit(torch.compile(sup))  # type: ignore[arg-type]
    compiled = torch.compile(early)
    with pytest.raises(EarlyExitError, match=r"torch\.compile"):
        compiled(torch.randn(1, 3, 16, 16))


@pytest.mark.slow
def test_its_idle_hooks_do_not_break_a_compiled_training_forward() -> None:
    _, sup, _ = make()
    sup.train()
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([0, 1])
    explained = torch._dynamo.explain(sup)(x, target=y)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)


def test_script_is_refused() -> None:
    _, _, early = make()
    with pytest.raises(EarlyExitError, match=r"torch\.jit\.script"):
        torch.jit.script(early)


@pytest.mark.parametrize(
    ("threshold", "error", "match"),
    [
        ({"nope": 0.5}, ValueError, "not exits"),
        ("high", TypeError, "must be a float"),
        (math.nan, ValueError, "NaN"),
    ],
    ids=["unknown-tap", "type", "nan"],
)
def test_bad_thresholds(threshold: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        make(threshold)


def test_bad_confidences() -> None:
    with pytest.raises(ValueError, match="confidence must be one of"):
        make(confidence="softmax")
    _, _, early = make(confidence=lambda p: p.max(1).values[:1])
    with pytest.raises(EarlyExitError, match=r"one value per sample, shape \(2,\)"):
        early(torch.randn(2, 3, 16, 16))


def test_user_errors_in_exit_heads_and_confidences_keep_their_type_with_a_note() -> None:
    class BoomError(Exception):
        pass

    def conf(pred: torch.Tensor) -> torch.Tensor:
        raise BoomError("conf")

    _, _, early = make(confidence=conf)
    with pytest.raises(BoomError, match="conf") as info:
        early(torch.randn(2, 3, 16, 16))
    assert any("confidence of exit 'stem'" in n for n in getattr(info.value, "__notes__", []))

    def boom(module: nn.Module, args: Any) -> None:
        raise BoomError("h")

    _, sup, early = make({"stage1": 0.9})
    sup.heads["stage1"].register_forward_pre_hook(boom)
    with pytest.raises(BoomError, match="h") as info:
        early(torch.randn(2, 3, 16, 16))
    assert any("head of tap 'stage1'" in n for n in getattr(info.value, "__notes__", []))


def test_exits_refuse_an_unwrapped_wrapper_and_inference_mode_training() -> None:
    _, sup, _ = make(threshold=math.inf)
    x = torch.randn(1, 3, 16, 16)
    with torch.inference_mode():  # inference tensors have no version counter for the taps
        with pytest.raises(UsageError, match=r"exits\(\) under torch\.inference_mode"):
            sup.eval().exits(x)
        with pytest.raises(UsageError, match=r"a training forward under torch\.inference_mode"):
            sup.train().exits(x)
    assert set(sup.eval().exits(x)) == {*TAPS, "output"}  # the wrapper is still usable
    _, _, early = make(0.0)  # EarlyExit itself runs under inference_mode
    with torch.inference_mode():
        pred, name = early(x)
    assert name == "stem"
    torch.testing.assert_close(pred, early(x)[0], rtol=0, atol=0)
    sup.unwrap()
    with pytest.raises(UsageError, match="unwrapped"):
        sup.eval().exits(torch.randn(1, 3, 16, 16))


# confidence -------------------------------------------------------------------------------


def test_confidences_equal_their_formulas() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    p = logits.softmax(1)
    torch.testing.assert_close(confidence(logits), p.max(1).values)
    top = p.sort(1, descending=True).values
    torch.testing.assert_close(confidence(logits, "margin"), top[:, 0] - top[:, 1])
    h = -(p * p.log()).sum(1)
    torch.testing.assert_close(confidence(logits, "entropy"), 1 - h / math.log(3))
    dense = torch.randn(2, 3, 4, 5)
    torch.testing.assert_close(confidence(dense), dense.softmax(1).max(1).values.mean((1, 2)))


# calibration ------------------------------------------------------------------------------


def test_costs_are_flops_by_hand_and_paths_add_up() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 3))
    sup = DeepSupervision(model, ["0", "2"], head=heads.classification(3))
    early = EarlyExit(sup).eval()
    c = early.costs(torch.randn(1, 4))
    assert c.order == ["0", "2"]
    assert c.prefix == {"0": 2 * 4 * 8, "2": 2 * 4 * 8 + 2 * 8 * 64}
    assert c.head == {"0": 2 * 8 * 3, "2": 2 * 64 * 3}
    assert c.full == 2 * (4 * 8 + 8 * 64 + 64 * 3)
    x = (torch.randn(1, 4),)
    for thresholds in ({"0": 0.5, "2": 0.5}, {"0": math.inf, "2": 0.5}):
        for e in ["0", "2", "output"]:
            measured = _calibration._flops(early, (x, {}), c.path(e, thresholds))
            assert measured == c.path_flops(e, thresholds)


def costs3() -> ExitCosts:
    return ExitCosts(["a", "b"], {"a": 10, "b": 40}, {"a": 2, "b": 2}, 100)


def cost_of(conf: torch.Tensor, thr: list[float], costs: ExitCosts) -> float:
    exits = _simulate(conf, torch.tensor(thr, dtype=conf.dtype))
    on = [t < math.inf for t in thr]
    total = 0.0
    for i in exits.tolist():
        heads_run = sum(costs.head[e] for j, e in enumerate(costs.order) if on[j] and j < i)
        if i == len(costs.order):
            total += costs.full + heads_run
        else:
            total += costs.prefix[costs.order[i]] + costs.head[costs.order[i]] + heads_run
    return total / conf.shape[1]


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(4, 40),
    drop=st.sampled_from([0.0, 0.02, 0.1, 0.5]),
    seed=st.integers(0, 10_000),
)
def test_search_is_feasible_and_no_dearer_than_the_model(n: int, drop: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    conf = torch.rand(2, n, generator=g)
    score = (torch.rand(3, n, generator=g) < torch.tensor([[0.6], [0.8], [0.9]])).float()
    costs = costs3()
    thr = search_thresholds(conf, score, costs, max_drop=drop, grid=16)
    t = [thr["a"], thr["b"]]
    exits = _simulate(conf.double(), torch.tensor(t, dtype=torch.float64))
    acc = float(score.gather(0, exits[None]).mean())
    assert acc >= float(score[-1].mean()) - drop - 1e-9
    assert cost_of(conf.double(), t, costs) <= costs.full + 1e-9


def test_search_with_one_exit_is_the_brute_force_optimum() -> None:
    g = torch.Generator().manual_seed(3)
    conf = torch.rand(1, 50, generator=g)
    score = torch.stack([(conf[0] > 0.3).float(), torch.ones(50)])  # confident -> correct
    costs = ExitCosts(["a"], {"a": 10}, {"a": 1}, 100)
    thr = search_thresholds(conf, score, costs, max_drop=0.0, grid=200)
    assert thr["a"] > 0.3  # only the samples it gets right may leave
    best = min(
        (cost_of(conf, [c], costs), c)
        for c in [*conf[0].tolist(), math.inf]
        if float(score.gather(0, _simulate(conf, torch.tensor([c]))[None]).mean()) >= 1.0
    )
    assert cost_of(conf, [thr["a"]], costs) == pytest.approx(best[0])


def test_calibrate_then_evaluate_measure_the_same_early_exit() -> None:
    model = nn.Sequential(
        nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 3)
    )
    sup = DeepSupervision(model, ["0", "2"], head=heads.classification(3))
    early = EarlyExit(sup).eval()
    x = torch.randn(60, 6)
    y = model(x).argmax(1)  # the model is right on every sample: exits are judged against it
    y[:10] = (y[:10] + 1) % 3  # ... but for ten
    data = [(x[i : i + 1], y[i : i + 1]) for i in range(60)]
    table = early.calibrate(data, max_drop=0.05, timing_runs=2)
    assert table.full_accuracy == pytest.approx(50 / 60)
    assert table.accuracy >= table.full_accuracy - 0.05 - 1e-9
    assert early.thresholds == table.thresholds
    assert sum(r.share for r in table.rows) == pytest.approx(1.0)
    measured = early.evaluate(data)
    assert measured.accuracy == pytest.approx(table.accuracy)
    assert [r.share for r in measured.rows] == pytest.approx([r.share for r in table.rows])
    assert [r.flops for r in measured.rows] == [r.flops for r in table.rows]
    assert measured.flops == pytest.approx(table.flops)
    assert [r["exit"] for r in table.to_rows()] == ["0", "2", "output", "total", "full model"]
    text = str(table)
    assert text.startswith("| exit | threshold |") and "full model" in text


def test_calibrate_rejects_bad_input() -> None:
    _, _, early = make()
    with pytest.raises(ValueError, match="max_drop"):
        early.calibrate([], max_drop=-1)
    with pytest.raises(ValueError, match="no batch"):
        early.calibrate([])
    with pytest.raises(TypeError, match=r"\(input, target\) pairs"):
        early.calibrate([torch.randn(1, 3, 16, 16)])
    batch = (torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="one score per sample"):
        early.calibrate([batch], metric=lambda p, t: (p.argmax(1) == t).float().mean())


def test_top1_for_classes_and_dense_maps() -> None:
    assert top1(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([1, 1])).tolist() == [1, 0]
    pred = torch.zeros(1, 2, 2, 2)
    pred[:, 1] = 1.0  # class 1 everywhere, at half the target's resolution
    target = torch.tensor([[[1, 1, 0, 0]] * 4])
    assert top1(pred, target).tolist() == [0.5]
