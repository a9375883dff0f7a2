"""Early-exit rules: patience (PABEE), a compute budget, temperature scaling and the ECE, each
against a hand computation; thresholds and temperatures in the state_dict."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from deepsup import DeepSupervision, EarlyExit, heads
from deepsup.errors import ConfigError
from deepsup.exits import ExitCosts, search_thresholds
from deepsup.functional import (
    confidence,
    expected_calibration_error,
    fit_temperature,
    patience_streak,
    predicted_class,
)


def make(seed: int = 0) -> DeepSupervision:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(6, 16),
        nn.Tanh(),
        nn.Linear(16, 16),
        nn.Tanh(),
        nn.Linear(16, 16),
        nn.Tanh(),
        nn.Linear(16, 3),
    ).double()
    return DeepSupervision(model, ["1", "3", "5"], head=heads.classification(3)).double().eval()


def batches(seed: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` random (input, label) batches of 32 for ``make()``'s model."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 32, 6, generator=gen, dtype=torch.float64)
    return [(x[i], torch.randint(0, 3, (32,), generator=gen)) for i in range(n)]


# the ECE ------------------------------------------------------------------------------------


def ece_by_hand(conf: list[float], correct: list[int], bins: int) -> float:
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        members = [i for i, c in enumerate(conf) if (lo < c <= hi) or (b == 0 and c == 0.0)]
        if members:
            acc = sum(correct[i] for i in members) / len(members)
            mean = sum(conf[i] for i in members) / len(members)
            total += len(members) / len(conf) * abs(acc - mean)
    return total


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(0, 1)), min_size=1, max_size=40),
    bins=st.integers(1, 20),
)
def test_ece_equals_the_binned_sum_by_hand(data: list[tuple[float, int]], bins: int) -> None:
    conf = [c for c, _ in data]
    correct = [k for _, k in data]
    got = expected_calibration_error(
        torch.tensor(conf, dtype=torch.float64), torch.tensor(correct), bins=bins
    )
    assert float(got) == pytest.approx(ece_by_hand(conf, correct, bins), abs=1e-9)


def test_ece_leaves_nan_out_and_checks_its_arguments() -> None:
    conf = torch.tensor([0.9, float("nan"), 0.3])
    correct = torch.tensor([1.0, 0.0, 0.0])
    assert float(expected_calibration_error(conf, correct, bins=10)) == pytest.approx(0.2)
    with pytest.raises(ConfigError, match="bins must be an int >= 1"):
        expected_calibration_error(conf, correct, bins=0)
    with pytest.raises(ConfigError, match="tensors of one shape"):
        expected_calibration_error(conf, correct[:2])


# temperature scaling ------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [0.3, 1.0, 4.0])
def test_fit_temperature_is_the_minimum_of_the_nll_on_a_fine_grid(scale: float) -> None:
    gen = torch.Generator().manual_seed(1)
    logits = 2 * torch.randn(500, 4, generator=gen, dtype=torch.float64)
    y = torch.multinomial(logits.softmax(1), 1, generator=gen)[:, 0]
    t = fit_temperature(scale * logits, y)
    grid = torch.exp(torch.linspace(math.log(0.05), math.log(20), 4001, dtype=torch.float64))
    nll = torch.stack([nn.functional.cross_entropy(scale * logits / g, y) for g in grid])
    best = float(grid[nll.argmin()])
    assert t == pytest.approx(best, rel=5e-3)


def test_fit_temperature_for_a_single_logit_is_the_sigmoids() -> None:
    gen = torch.Generator().manual_seed(2)
    z = 3 * torch.randn(800, 1, generator=gen, dtype=torch.float64)
    y = torch.bernoulli(z[:, 0].sigmoid(), generator=gen).long()
    t = fit_temperature(5 * z, y)
    grid = torch.linspace(2, 10, 801, dtype=torch.float64)
    nll = torch.stack(
        [nn.functional.binary_cross_entropy_with_logits(5 * z[:, 0] / g, y.double()) for g in grid]
    )
    assert t == pytest.approx(float(grid[nll.argmin()]), abs=0.02)


def test_calibrate_fits_each_exits_temperature_and_reports_the_ece() -> None:
    sup = make(3)
    data = batches(3, 4)
    early = EarlyExit(sup, 0.9)
    table = early.calibrate(data, max_drop=0.5, temperature=True, timing_runs=1)
    x = torch.cat([d[0] for d in data])
    y = torch.cat([d[1] for d in data])
    preds = sup.exits(x)
    for row in table.rows[:-1]:
        t = fit_temperature(preds[row.exit], y)
        assert early.temperatures[row.exit] == pytest.approx(t) == pytest.approx(row.temperature)
        correct = (preds[row.exit].argmax(1) == y).float()
        before = expected_calibration_error(confidence(preds[row.exit]), correct)
        after = expected_calibration_error(confidence(preds[row.exit] / t), correct)
        assert row.ece_before == pytest.approx(float(before))
        assert row.ece == pytest.approx(float(after))
    assert "ECE before / after" in str(table)
    # the forward takes each exit's confidence of logits / T
    early.thresholds = {"1": 0.6}
    x1 = x[:1]
    conf = confidence(sup.exits(x1)["1"] / early.temperatures["1"])
    assert early(x1)[1] == ("1" if float(conf) >= 0.6 else "output")


def test_the_confidence_is_taken_of_the_logits_divided_by_the_temperature() -> None:
    sup = make(9)
    seen: list[torch.Tensor] = []

    def conf(pred: torch.Tensor) -> torch.Tensor:
        seen.append(pred)
        return torch.zeros(pred.shape[0], dtype=pred.dtype)

    early = EarlyExit(sup, {"1": 0.5}, confidence=conf)
    early.temperatures = {"1": 4.0}
    x = torch.randn(3, 6, dtype=torch.float64)
    assert early(x)[1] == "output"
    torch.testing.assert_close(seen[0], sup.exits(x)["1"] / 4.0)


def test_thresholds_and_temperatures_round_trip_through_the_state_dict() -> None:
    sup = make(4)
    early = EarlyExit(sup, {"1": 0.7, "3": 0.8})
    early.temperatures = {"3": 2.5}
    fresh = EarlyExit(copy.deepcopy(sup), 0.1)
    fresh.load_state_dict(early.state_dict())
    assert fresh.thresholds == early.thresholds
    assert fresh.temperatures == {"1": 1.0, "3": 2.5, "5": 1.0}
    old = torch.tensor([0.5, 0.6, math.inf], dtype=torch.float64)  # thresholds only
    fresh.set_extra_state(old)
    assert fresh.thresholds == {"1": 0.5, "3": 0.6, "5": math.inf}
    assert fresh.temperatures == {"1": 1.0, "3": 1.0, "5": 1.0}
    with pytest.raises(ConfigError, match=r"temperature of exit '1' must be a finite number > 0"):
        early.temperatures = {"1": 0.0}
    with pytest.raises(ConfigError, match="not exits"):
        early.temperatures = {"nope": 2.0}


# patience -----------------------------------------------------------------------------------


def test_patience_streak_by_hand() -> None:
    a, b = torch.tensor([0, 1, 2]), torch.tensor([0, 2, 2])
    s1 = patience_streak(None, None, a)
    s2 = patience_streak(s1, a, b)
    s3 = patience_streak(s2, b, b)
    assert s1.tolist() == [1, 1, 1] and s2.tolist() == [2, 1, 2] and s3.tolist() == [3, 2, 3]
    assert patience_streak(s3, b, a).tolist() == [4, 1, 4]  # a disagreement restarts at 1
    dense = torch.tensor([[[0, 1]], [[1, 1]]])
    prev = torch.tensor([[[0, 1]], [[1, 0]]])
    assert patience_streak(torch.ones(2, dtype=torch.long), prev, dense).tolist() == [2, 1]
    assert predicted_class(torch.tensor([[0.0, 1.0, 0.5]])).tolist() == [1]


def patience_by_hand(sup: DeepSupervision, x: torch.Tensor, p: int) -> list[str]:
    preds = sup.exits(x)
    order = ["1", "3", "5"]
    out = []
    for r in range(x.shape[0]):
        classes = [int(preds[e][r].argmax()) for e in order]
        exit_name = "output"
        for i in range(len(order)):
            if i + 1 >= p and len(set(classes[i + 1 - p : i + 1])) == 1:
                exit_name = order[i]
                break
        out.append(exit_name)
    return out


@pytest.mark.parametrize("p", [1, 2, 3])
def test_patience_exits_where_p_consecutive_exits_agree(p: int) -> None:
    sup = make(5)
    x = torch.randn(40, 6, dtype=torch.float64)
    expected = patience_by_hand(sup, x, p)
    routed = EarlyExit(sup, 0.5, patience=p, per_sample=True, example_input=x[:4])
    preds, names = routed(x)
    assert names == expected
    exits = sup.exits(x)
    for r, name in enumerate(names):
        torch.testing.assert_close(preds[r], exits[name][r])
    alone = EarlyExit(sup, 0.5, patience=p)
    assert [alone(x[r : r + 1])[1] for r in range(8)] == expected[:8]
    assert "patience" in repr(routed)


def test_patience_refuses_calibrate_and_bad_values() -> None:
    sup = make(6)
    with pytest.raises(ConfigError, match="patience must be a positive int"):
        EarlyExit(sup, patience=0)
    early = EarlyExit(sup, patience=2)
    data = [(torch.randn(4, 6, dtype=torch.float64), torch.randint(0, 3, (4,)))]
    with pytest.raises(ConfigError, match="does not use; measure it with evaluate"):
        early.calibrate(data)


# the compute budget -------------------------------------------------------------------------


def simulate(
    conf: torch.Tensor, score: torch.Tensor, costs: ExitCosts, thr: list[float]
) -> tuple[float, float]:
    """Accuracy and mean FLOPs of thresholds ``thr``, one sample at a time (by hand)."""
    accs, flops = [], []
    for n in range(conf.shape[1]):
        ran = 0
        for i, e in enumerate(costs.order):
            if thr[i] < math.inf:
                ran += costs.head[e]
                if conf[i, n] >= thr[i]:
                    accs.append(float(score[i, n]))
                    flops.append(costs.prefix[e] + ran)
                    break
        else:
            accs.append(float(score[-1, n]))
            flops.append(costs.full + ran)
    return sum(accs) / len(accs), sum(flops) / len(flops)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), budget=st.floats(0.25, 1.0))
def test_budget_search_with_one_exit_is_the_brute_force_optimum(seed: int, budget: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    conf = torch.rand(1, 30, generator=gen, dtype=torch.float64)
    score = (torch.rand(2, 30, generator=gen) < torch.tensor([[0.6], [0.9]])).float()
    costs = ExitCosts(["a"], prefix={"a": 20}, head={"a": 2}, full=100)
    found = search_thresholds(conf, score, costs, budget=budget, grid=200)
    acc, flops = simulate(conf, score, costs, [found["a"]])
    assert flops <= budget * 100 + 1e-9
    best = max(
        simulate(conf, score, costs, [t])[0]
        for t in [-math.inf, *conf[0].tolist(), math.inf]
        if simulate(conf, score, costs, [t])[1] <= budget * 100 + 1e-9
    )
    assert acc == pytest.approx(best)


def test_budget_search_with_two_exits_is_within_budget_and_no_worse_than_a_grid() -> None:
    gen = torch.Generator().manual_seed(7)
    conf = torch.rand(2, 40, generator=gen, dtype=torch.float64)
    score = (torch.rand(3, 40, generator=gen) < torch.tensor([[0.5], [0.7], [0.9]])).float()
    costs = ExitCosts(["a", "b"], prefix={"a": 20, "b": 50}, head={"a": 2, "b": 2}, full=100)
    found = search_thresholds(conf, score, costs, budget=0.5, grid=40)
    acc, flops = simulate(conf, score, costs, [found["a"], found["b"]])
    assert flops <= 50 + 1e-9
    cands = [-math.inf, 0.25, 0.5, 0.75, math.inf]
    feasible = [simulate(conf, score, costs, list(t)) for t in itertools.product(cands, cands)]
    assert acc >= max(a for a, f in feasible if f <= 50 + 1e-9) - 1e-9


def test_calibrate_with_a_budget_and_its_refusals() -> None:
    sup = make(8)
    data = batches(8, 3)
    early = EarlyExit(sup)
    table = early.calibrate(data, budget=0.7, timing_runs=1)
    assert table.flops <= 0.7 * table.full_flops + 1e-6
    with pytest.raises(ConfigError, match="not both"):
        early.calibrate(data, max_drop=0.01, budget=0.5)
    with pytest.raises(ConfigError, match=r"budget must be a finite number > 0 and <= 1"):
        early.calibrate(data, budget=0.0)
    with pytest.raises(ConfigError, match="cheapest early exit"):
        early.calibrate(data, budget=0.01)
    with pytest.raises(ConfigError, match="pass one of max_drop= and budget="):
        search_thresholds(
            torch.zeros(1, 2), torch.zeros(2, 2), ExitCosts(["a"], {"a": 1}, {"a": 1}, 2)
        )
