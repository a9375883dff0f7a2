"""The features under ordinary misuse: exits, calibration, self-distillation, diagnostics, targets.

Each test is one case of the consolidation issue's list (silently wrong, crashes, unclear
messages, friction), checked against a hand computation or the exact error.
"""

from __future__ import annotations

import copy
import math
import re
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ReuseModel, Tokens
from torch import nn

from deepsup import DeepSupervision, EarlyExit, Tap, heads, param_groups, schedules
from deepsup.diagnostics import gradient_flow
from deepsup.errors import (
    CaptureError,
    ConfigError,
    DiagnosticsError,
    TargetError,
)
from deepsup.functional import confidence, distillation_kl
from deepsup.losses import SelfDistillation

CE = nn.CrossEntropyLoss()


class HeadCalls(nn.Module):
    """A linear head that counts its calls and keeps its inputs."""

    def __init__(self, c: int, k: int) -> None:
        super().__init__()
        self.fc = nn.Linear(c, k)
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        return self.fc(x)


# ------------------------------------------------------------------ EarlyExit follows calls=


@pytest.mark.parametrize("calls", ["first", "last"])
def test_early_exit_uses_the_call_its_calls_rule_picks(calls: str) -> None:
    torch.manual_seed(0)
    model = ReuseModel().eval()
    head = HeadCalls(8, 2)
    sup = DeepSupervision(model, {"shared": Tap(head=head, calls=calls)}, criterion=None)
    early = EarlyExit(sup, threshold=0.0)
    x = torch.randn(3, 4)
    head.inputs.clear()
    pred, name = early(x)
    first = model.shared(model.inp(x))
    second = model.shared(torch.relu(first))
    want = first if calls == "first" else second
    assert name == "shared" and len(head.inputs) == 1  # one head run, on the picked call
    assert torch.equal(head.inputs[0], want)
    with torch.no_grad():
        assert torch.equal(pred, head.fc(want))
        assert torch.equal(sup.exits(x)["shared"], pred)  # exits() picks the same call


def test_early_exit_refuses_a_tap_that_runs_twice_with_calls_error_as_exits_does() -> None:
    sup = DeepSupervision(ReuseModel(), "shared", head=heads.classification(2))
    early = EarlyExit(sup, threshold=0.0)
    x = torch.randn(3, 4)
    with pytest.raises(CaptureError, match=r"tap 'shared' ran 2 times"):
        sup.exits(x)
    with pytest.raises(CaptureError, match=r"tap 'shared' ran 2 times"):
        early(x)


def test_early_exit_counts_calls_on_example_input_at_construction() -> None:
    sup = DeepSupervision(ReuseModel(), {"shared": Tap(calls="error")},
                          head=heads.classification(2))  # fmt: skip
    with pytest.raises(CaptureError, match=r"ran 2 times"):
        EarlyExit(sup, example_input=torch.randn(1, 4))


def test_early_exit_starts_in_eval_mode() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    sup = DeepSupervision(model, "0", head=heads.classification(3))
    assert sup.training
    early = EarlyExit(sup, threshold=0.0)
    assert not early.training and not sup.training
    assert early(torch.randn(2, 4))[1] == "0"


# ------------------------------------------------------------------ calibration


class Digits(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 16)
        self.b = nn.Sequential(nn.ReLU(), nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def _calibration_data(nan: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g)
    if nan:
        x[17, 2] = math.nan
    y = torch.randint(0, 3, (200,), generator=g)
    return [(x[i : i + 20], y[i : i + 20]) for i in range(0, 200, 20)]


def _early(seed: int = 0) -> EarlyExit:
    torch.manual_seed(seed)
    sup = DeepSupervision(Digits(), "a", head=heads.classification(3))
    return EarlyExit(sup)


def test_one_nan_input_does_not_turn_every_threshold_off() -> None:
    early = _early()
    table = early.calibrate(_calibration_data(nan=True), max_drop=1.0, timing_runs=1)
    assert math.isfinite(early.thresholds["a"]) and table.rows[0].share > 0.9
    # the NaN sample never exits: its confidence is NaN, and NaN >= t is False
    bad = _calibration_data(nan=True)[0][0][17:18]
    assert early(bad)[1] == "output"


def test_calibrated_thresholds_are_saved_in_the_state_dict() -> None:
    early = _early()
    early.calibrate(_calibration_data(nan=False), max_drop=0.05, timing_runs=1)
    fresh = EarlyExit(copy.deepcopy(early.sup), threshold=0.123)
    fresh.load_state_dict(early.state_dict())
    assert fresh.thresholds == early.thresholds
    assert "_extra_state" in early.state_dict()
    with pytest.raises(ConfigError, match=r"must hold 1 thresholds"):
        fresh.set_extra_state(torch.zeros(3))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"timing_runs": 0}, r"timing_runs must be a positive int \(got 0\)"),
        ({"grid": -1}, r"grid must be a positive int \(got -1\)"),
        ({"max_drop": -0.1}, r"max_drop must be a finite number >= 0 \(got -0\.1\)"),
    ],
    ids=["timing-runs-0", "grid-negative", "max-drop-negative"],
)
def test_calibrate_refuses_bad_arguments_before_running(kwargs: dict[str, Any], match: str) -> None:
    early = _early()
    with pytest.raises(ConfigError, match=match):
        early.calibrate(_calibration_data(nan=False), **kwargs)


# ------------------------------------------------------------------ single-logit heads


def test_single_logit_confidences_are_those_of_the_sigmoid() -> None:
    z = torch.tensor([[0.0], [2.0], [-3.0]])
    p = torch.sigmoid(z)[:, 0]
    top = torch.maximum(p, 1 - p)
    torch.testing.assert_close(confidence(z, "max_softmax"), top)
    torch.testing.assert_close(confidence(z, "margin"), (2 * p - 1).abs())
    h = -(p * p.log() + (1 - p) * (1 - p).log())
    torch.testing.assert_close(confidence(z, "entropy"), 1 - h / math.log(2))


def test_a_single_logit_exit_is_not_always_confident() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    head = nn.Linear(8, 1)
    nn.init.zeros_(head.weight), nn.init.zeros_(head.bias)  # logit 0: p = 0.5
    sup = DeepSupervision(model, {"1": Tap(head=head)}, criterion=None)
    early = EarlyExit(sup, threshold=0.9)
    x = torch.randn(2, 4)
    pred, name = early(x)
    assert name == "output" and torch.equal(pred, model(x))


def test_self_distillation_of_a_single_logit_is_a_bernoulli_kl() -> None:
    p, q = torch.tensor([[0.5], [-1.0]]), torch.tensor([[2.0], [0.3]])
    T = 2.0
    ps, qs = torch.sigmoid(p / T), torch.sigmoid(q / T)
    kl = qs * (qs / ps).log() + (1 - qs) * ((1 - qs) / (1 - ps)).log()
    torch.testing.assert_close(distillation_kl(p, q, T), T**2 * kl.mean())
    assert float(distillation_kl(p, q, T)) > 0.01  # not 0, whatever the teacher


# ------------------------------------------------------------------ self-distillation


def test_self_distillation_refuses_an_infinite_temperature() -> None:
    with pytest.raises(ConfigError, match=r"temperature must be > 0 and finite \(got inf\)"):
        SelfDistillation(CE, temperature=math.inf)


def _kl_last(pred: torch.Tensor, teacher: torch.Tensor, temp: float) -> torch.Tensor:
    """By hand: the KL over the last (class) axis, mean over every other position."""
    log_p = F.log_softmax(pred / temp, dim=-1)
    log_q = F.log_softmax(teacher / temp, dim=-1)
    return temp**2 * (log_q.exp() * (log_q - log_p)).sum(-1).mean()


def test_self_distillation_of_per_token_predictions_is_over_the_classes() -> None:
    torch.manual_seed(0)
    model, head = Tokens(), nn.Linear(8, 3)
    criterion = SelfDistillation(CE, temperature=2.0, alpha=1.0)
    sup = DeepSupervision(model, {"embed": Tap(1.0, head=head)}, criterion=criterion)
    x, y = torch.randn(2, 6, 5), torch.randint(0, 3, (2, 6))
    out, aux = sup(x, target=y)
    pred = head(model.embed(x))
    torch.testing.assert_close(aux["embed"], _kl_last(pred, out.detach(), 2.0))


class ChannelsLast(nn.Module):
    """A segmentation model whose stage and output are channels-last maps (B, H, W, C)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(3, 8)
        self.cls = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls(torch.relu(self.stem(x)))


def test_self_distillation_of_channels_last_maps_is_over_the_classes() -> None:
    torch.manual_seed(0)
    model, head = ChannelsLast(), nn.Linear(8, 4)
    criterion = SelfDistillation(CE, temperature=3.0, alpha=0.5)
    sup = DeepSupervision(model, {"stem": Tap(1.0, head=head)}, criterion=criterion)
    x, y = torch.randn(2, 5, 5, 3), torch.randint(0, 4, (2, 5, 5))
    out, aux = sup(x, target=y)
    pred = head(model.stem(x))
    hard = CE(pred.permute(0, 3, 1, 2), y)
    want = 0.5 * hard + 0.5 * _kl_last(pred, out.detach(), 3.0)
    torch.testing.assert_close(aux["stem"], want)


def test_self_distillation_uses_the_inner_criterions_ignore_label() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    inner = nn.CrossEntropyLoss(ignore_index=255)
    sup = DeepSupervision(model, {"0": Tap(1.0)}, head=heads.seg(4, dropout=0.0),
                          criterion=SelfDistillation(inner, alpha=0.0))  # fmt: skip
    assert sup.taps["0"].ignore_index == 255
    x = torch.randn(2, 3, 6, 6)
    _, aux = sup(x, target=torch.full((2, 6, 6), 255))  # every pixel ignored
    assert float(aux["0"].detach()) == 0.0  # not NaN


def test_self_distillation_downsamples_targets_ignore_aware_like_its_inner_criterion() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(),
                          nn.Upsample(scale_factor=2), nn.Conv2d(4, 3, 1))  # fmt: skip
    inner = nn.CrossEntropyLoss(ignore_index=255)
    y = torch.full((2, 8, 8), 255)
    y[:, 1::2, 1::2] = torch.randint(0, 3, (2, 4, 4))  # nearest picks only ignored pixels
    kw: dict[str, Any] = {"head": heads.seg(3, dropout=0.0), "resize": "target"}
    alone = DeepSupervision(copy.deepcopy(model), {"0": 1.0}, criterion=inner, **kw)
    sd = DeepSupervision(copy.deepcopy(model), {"0": 1.0},
                         criterion=SelfDistillation(inner, alpha=0.0), **kw)  # fmt: skip
    sd.heads["0"].load_state_dict(alone.heads["0"].state_dict())
    x = torch.randn(2, 3, 8, 8)
    _, a = alone(x, target=y)
    _, b = sd(x, target=y)
    assert torch.isfinite(a["0"]) and float(a["0"]) > 0
    torch.testing.assert_close(b["0"], a["0"])


def test_a_per_sample_head_with_other_classes_than_the_teacher_is_named() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 5))
    sup = DeepSupervision(model, "0", head=heads.classification(3),
                          criterion=SelfDistillation(CE))  # fmt: skip
    with pytest.raises(
        TargetError,
        match=r"teacher .* shape \(2, 5\) does not fit the prediction "
        r"of shape \(2, 3\).*class count",
    ):
        sup(torch.randn(2, 4), target=torch.tensor([0, 1]))


# ------------------------------------------------------------------ gradient_flow restores


class Counting(nn.Module):
    """Its forward reassigns a buffer, and draws from NumPy's RNG."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)
        self.register_buffer("n", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.n = self.n + 1
        np.random.rand()
        return self.fc2(torch.tanh(self.fc1(x)))


def test_gradient_flow_restores_reassigned_buffers_and_numpys_rng() -> None:
    model = Counting()
    sup = DeepSupervision(model, "fc1", head=heads.classification(3), criterion=CE)
    buffer = model.n
    np.random.seed(3)
    state = np.random.get_state()
    gradient_flow(sup, torch.randn(5, 4), target=torch.tensor([0, 1, 2, 0, 1]), criterion=CE)
    assert model.n is buffer and float(model.n) == 0.0
    after = np.random.get_state()
    assert after[0] == state[0] and np.array_equal(after[1], state[1]) and after[2:] == state[2:]


def test_gradient_flow_on_a_frozen_model_says_there_is_nothing_to_measure() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).requires_grad_(False)
    sup = DeepSupervision(model, "0", head=heads.classification(3), criterion=CE)
    with pytest.raises(DiagnosticsError, match=r"no trainable parameter .*all frozen"):
        gradient_flow(sup, torch.randn(5, 4), target=torch.tensor([0, 1, 2, 0, 1]), criterion=CE)


# ------------------------------------------------------------------ targets and labels


def test_an_int8_target_with_an_ignore_label_it_cannot_hold_downsamples() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(),
                          nn.Upsample(scale_factor=2), nn.Conv2d(4, 3, 1))  # fmt: skip

    def criterion(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(pred, target.long())

    sup = DeepSupervision(model, {"0": Tap(1.0, ignore_index=255)},
                          head=heads.seg(3, dropout=0.0), criterion=criterion,
                          resize="target")  # fmt: skip
    x, y = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 8, 8), dtype=torch.int8)
    _, aux = sup(x, target=y)
    with torch.no_grad():  # the head in training mode, on the same batch
        pred = sup.heads["0"](model[0](x))
    torch.testing.assert_close(aux["0"], criterion(pred, y[:, ::2, ::2]))


def test_exits_ignore_target_as_eval_does() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    sup = DeepSupervision(model, "0", head=heads.classification(3)).eval()
    x = torch.randn(2, 4)
    with_target = sup.exits(x, target=torch.tensor([0, 1]))
    plain = sup.exits(x)
    assert all(torch.equal(with_target[k], plain[k]) for k in plain)


def test_an_inherited_interpolation_that_does_not_fit_names_the_tap_and_the_inheritance() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Conv2d(4, 3, 1))
    with pytest.raises(
        ConfigError,
        match=r"tap '0': \(inheriting DeepSupervision\(interpolation='bicubic'\) with "
        r"Tap\(resize='target'\)\) interpolation='bicubic' is not a mode of resize='target'",
    ):
        DeepSupervision(model, {"0": Tap(resize="target")}, head=heads.seg(3),
                        interpolation="bicubic")  # fmt: skip


def test_soft_targets_with_a_criterion_ignore_index_say_to_use_tap_ignore_index() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Conv2d(4, 3, 1))
    with pytest.raises(
        ConfigError,
        match=r"tap '0': interpolation='soft' .*"
        r"CrossEntropyLoss\(ignore_index=255\).*Tap\(ignore_index=255\)",
    ):
        DeepSupervision(model, "0", head=heads.seg(3), resize="target", interpolation="soft",
                        criterion=nn.CrossEntropyLoss(ignore_index=255))  # fmt: skip
    fixed = DeepSupervision(model, {"0": Tap(ignore_index=255)}, head=heads.seg(3),
                            resize="target", interpolation="soft", criterion=CE)  # fmt: skip
    y = torch.randint(0, 3, (2, 8, 8))
    y[0] = 255
    _, aux = fixed(torch.randn(2, 3, 8, 8), target=y)
    assert torch.isfinite(aux["0"])


class Float32Schedule(schedules.Schedule):
    def __call__(self, step: int) -> float:
        return np.float32(0.4)  # type: ignore[return-value]


def test_a_schedule_may_return_a_numpy_float() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    sup = DeepSupervision(model, {"0": Float32Schedule()}, head=heads.classification(3),
                          criterion=CE)  # fmt: skip
    assert sup.weights == {"0": float(np.float32(0.4))}
    x, y = torch.randn(2, 4), torch.tensor([0, 1])
    _, aux = sup(x, target=y)
    torch.testing.assert_close(aux["0"], float(np.float32(0.4)) * aux.raw["0"])


# ------------------------------------------------------------------ the plain baseline


def test_no_taps_is_the_plain_model() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    sup = DeepSupervision(model, {}, head=heads.classification(3), criterion=CE)
    x, y = torch.randn(2, 4), torch.tensor([0, 1])
    out, aux = sup(x, target=y)
    assert aux == {} and torch.equal(out, model(x))
    assert sum(aux.values()) == 0
    assert sorted(sup.state_dict()) == sorted(
        ["_extra_state", *(f"model.{k}" for k in model.state_dict())]
    )
    sup.eval()
    assert torch.equal(sup(x, target=y), model(x))


def test_param_groups_of_a_bare_model() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    groups = param_groups(model, lr=0.01, new_modules=["2"], momentum=0.9)
    assert [g["name"] for g in groups] == ["model", "heads"]
    assert groups[0]["params"] == list(model[0].parameters()) and groups[0]["lr"] == 0.01
    assert groups[1]["params"] == list(model[2].parameters()) and groups[1]["lr"] == 0.1
    assert groups[1]["momentum"] == 0.9


# ------------------------------------------------------------------ the command line


def test_diagnose_with_an_input_the_model_cannot_take_is_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from deepsup.__main__ import main

    assert main(["diagnose", "torchvision:resnet18", "--input", "2,3", "--classes", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deepsup diagnose: error: torchvision:resnet18 does not run on an "
                          "input of shape 2,3")  # fmt: skip
    assert len(err.strip().splitlines()) == 1


def raising_builder() -> nn.Module:
    raise RuntimeError("no weights here")


def test_diagnose_with_a_builder_that_raises_is_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from deepsup.__main__ import main

    argv = ["diagnose", "tests.test_misuse:raising_builder", "--input", "2,4", "--classes", "3"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"deepsup diagnose: error: cannot build model "
                        r"'tests\.test_misuse:raising_builder': RuntimeError: no weights here\n",
                        err)  # fmt: skip


def test_diagnose_checks_the_plot_folder_before_the_run(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from deepsup.__main__ import main

    # the builder raises if called: the folder must be checked before the model is built
    argv = ["diagnose", "tests.test_misuse:raising_builder", "--input", "2,4", "--classes", "3",
            "--plot", "/missing/dir/x.png"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--plot /missing/dir/x.png: the folder /missing/dir does not exist" in err
