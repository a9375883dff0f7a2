"""Weight schedules: values at chosen points, validation, resume."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import MLP
from torch import nn

from deepsup import DeepSupervision, heads, schedules


@pytest.mark.parametrize(
    ("schedule", "points"),
    [
        (schedules.Constant(0.4), {0: 0.4, 7: 0.4, 10**6: 0.4}),
        (schedules.LinearDecay(0.4, total=10), {0: 0.4, 5: 0.2, 10: 0.0, 11: 0.0}),
        (schedules.LinearDecay(1.0, total=4, end=0.2), {0: 1.0, 2: 0.6, 4: 0.2, 9: 0.2}),
        (schedules.CosineDecay(1.0, total=10), {0: 1.0, 5: 0.5, 10: 0.0, 20: 0.0}),
        (
            schedules.CosineDecay(0.4, total=8, end=0.1),
            {2: 0.1 + 0.3 * 0.5 * (1 + math.cos(math.pi / 4))},
        ),
        (schedules.Cutoff(0.4, at=3), {0: 0.4, 2: 0.4, 3: 0.0, 100: 0.0}),
    ],
    ids=["constant", "linear", "linear-end", "cosine", "cosine-end", "cutoff"],
)
def test_values_at_chosen_points(schedule: schedules.Schedule, points: dict[int, float]) -> None:
    for step, value in points.items():
        assert schedule(step) == pytest.approx(value, abs=1e-12), step


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: schedules.Constant(-1), r"value must be a finite number >= 0 \(got -1\.0\)"),
        (lambda: schedules.LinearDecay(1.0, total=0), r"total must be a positive int .*\(got 0\)"),
        (lambda: schedules.CosineDecay(float("nan"), 3), r"start must be a finite number"),
        (lambda: schedules.Cutoff(0.4, at=-1), r"at must be an int >= 0 \(got -1\)"),
    ],
    ids=["negative", "zero-total", "nan", "negative-at"],
)
def test_invalid_schedules(build: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()  # type: ignore[operator]


def test_schedule_equality_and_repr() -> None:
    assert schedules.Cutoff(0.4, at=3) == schedules.Cutoff(0.4, at=3)
    assert schedules.Cutoff(0.4, at=3) != schedules.Cutoff(0.4, at=4)
    assert schedules.LinearDecay(0.4, 10) != schedules.CosineDecay(0.4, 10)  # same fields
    assert len({schedules.LinearDecay(0.4, 10), schedules.LinearDecay(0.4, 10)}) == 1
    assert repr(schedules.LinearDecay(0.4, 10)) == "LinearDecay(start=0.4, total=10, end=0.0)"


def _wrapper(model: nn.Module) -> DeepSupervision:
    return DeepSupervision(
        model,
        {"fc1": schedules.LinearDecay(1.0, total=10), "fc2": schedules.Cutoff(0.5, at=4)},
        head=heads.classification(4),
        criterion=nn.CrossEntropyLoss(),
    )


def test_wrapper_weights_follow_progress_and_scale_losses() -> None:
    sup = _wrapper(MLP())
    x, y = torch.randn(3, 6), torch.tensor([0, 1, 2])
    for step in range(6):
        assert sup.progress == step
        assert sup.weights == pytest.approx({"fc1": 1 - step / 10, "fc2": 0.5 if step < 4 else 0})
        _, aux = sup(x, target=y)
        for name, w in sup.weights.items():
            torch.testing.assert_close(aux[name], aux.raw[name] * w)
        sup.step()


def test_resumed_wrapper_continues_with_the_right_weight() -> None:
    sup = _wrapper(MLP())
    sup.step(7)
    state = sup.state_dict()
    assert int(state["_extra_state"]) == 7
    resumed = _wrapper(MLP())
    resumed.load_state_dict(state)
    assert resumed.progress == 7
    assert resumed.weights == pytest.approx({"fc1": 0.3, "fc2": 0.0})
    # right after loading, before any step(): the losses carry the restored weights
    x, y = torch.randn(3, 6), torch.tensor([0, 1, 2])
    _, aux = resumed(x, target=y)
    torch.testing.assert_close(aux["fc1"], 0.3 * aux.raw["fc1"])
    assert aux.raw["fc2"] > 0 and aux["fc2"] == 0  # Cutoff(0.5, at=4) is off at 7
    resumed.step()
    assert resumed.weights["fc1"] == pytest.approx(0.2)
    _, aux = resumed(x, target=y)
    torch.testing.assert_close(aux["fc1"], 0.2 * aux.raw["fc1"])


@pytest.mark.parametrize("weight", [True, "0.4", None], ids=["bool", "str", "none"])
def test_a_weight_must_be_a_number_or_a_schedule(weight: object) -> None:
    with pytest.raises(TypeError, match=r"weight must be a float or a deepsup\.schedules\."):
        schedules.as_schedule(weight)  # type: ignore[arg-type]


def test_progress_setter_validates() -> None:
    sup = _wrapper(MLP())
    sup.progress = 10
    assert sup.weights["fc1"] == 0.0
    with pytest.raises(ValueError, match=r"progress must be an int >= 0 \(got -1\)"):
        sup.progress = -1
