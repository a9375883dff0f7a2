"""deepsup.losses: SelfDistillation against its formula, and the teacher protocol in the wrapper."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import TinyCNN
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from deepsup import DeepSupervision, Tap, heads
from deepsup._targets import nearest as downsample_target
from deepsup.errors import TargetError
from deepsup.losses import SelfDistillation, TeacherCriterion, distillation_kl, teacher_for


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 16)
        self.mid = nn.Linear(16, 16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.mid(torch.relu(self.body(x)))))


def by_hand(
    pred: torch.Tensor, target: torch.Tensor, teacher: torch.Tensor, temp: float, a: float
) -> torch.Tensor:
    """The issue's formula, written out: classes on dim 1, mean over batch (and positions)."""
    ce = F.cross_entropy(pred, target)
    p = torch.exp(pred / temp) / torch.exp(pred / temp).sum(1, keepdim=True)
    q = torch.exp(teacher / temp) / torch.exp(teacher / temp).sum(1, keepdim=True)
    kl = (q * (torch.log(q) - torch.log(p))).sum(1)
    return (1 - a) * ce + a * temp**2 * kl.mean()


@pytest.mark.parametrize(("temp", "alpha"), [(3.0, 0.5), (1.0, 0.0), (4.0, 1.0), (2.0, 0.3)])
def test_the_loss_equals_its_formula(temp: float, alpha: float) -> None:
    pred = torch.randn(5, 4, dtype=torch.float64)
    teacher = torch.randn(5, 4, dtype=torch.float64)
    target = torch.randint(0, 4, (5,))
    loss = SelfDistillation(nn.CrossEntropyLoss(), temp, alpha)(pred, target, teacher=teacher)
    torch.testing.assert_close(loss, by_hand(pred, target, teacher, temp, alpha))


def test_dense_predictions_distil_per_pixel() -> None:
    pred = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    teacher = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    target = torch.randint(0, 3, (2, 4, 5))
    loss = SelfDistillation(nn.CrossEntropyLoss(), 2.0, 0.5)(pred, target, teacher=teacher)
    torch.testing.assert_close(loss, by_hand(pred, target, teacher, 2.0, 0.5))
    per_pixel = by_hand(
        pred[:, :, 1:2, 3:4], target[:, 1:2, 3:4], teacher[:, :, 1:2, 3:4], 2.0, 1.0
    )
    one = SelfDistillation(nn.CrossEntropyLoss(), 2.0, 1.0)
    sub = (pred[:, :, 1:2, 3:4], target[:, 1:2, 3:4])
    torch.testing.assert_close(one(*sub, teacher=teacher[:, :, 1:2, 3:4]), per_pixel)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(2, 7), st.floats(0.5, 8.0), st.integers(0, 10_000))
def test_the_kl_term_is_nonnegative_and_zero_for_equal_logits(
    b: int, k: int, temp: float, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    pred, teacher = torch.randn(2, b, k, generator=g, dtype=torch.float64)
    assert float(distillation_kl(pred, teacher, temp)) >= -1e-12
    assert float(distillation_kl(pred, pred, temp)) == pytest.approx(0.0, abs=1e-12)


def test_through_the_wrapper_the_aux_loss_uses_the_models_output_as_teacher() -> None:
    model = Net().double()
    sd = SelfDistillation(nn.CrossEntropyLoss(), 3.0, 0.5)
    sup = DeepSupervision(model, {"mid": 1.0}, head=heads.classification(4), criterion=sd).double()
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 4, (8,))
    out, aux = sup(x, target=y)
    h = torch.relu(model.mid(torch.relu(model.body(x))))
    pred = sup.heads["mid"](model.mid(torch.relu(model.body(x))))
    assert torch.equal(out, model.fc(h))
    torch.testing.assert_close(aux["mid"], by_hand(pred, y, out.detach(), 3.0, 0.5))


def test_no_aux_gradient_reaches_the_final_head_through_the_teacher() -> None:
    model = Net()
    sd = SelfDistillation(nn.CrossEntropyLoss(), 3.0, 1.0)  # the distillation term alone
    sup = DeepSupervision(model, {"mid": 1.0}, head=heads.classification(4), criterion=sd)
    out, aux = sup(torch.randn(8, 6), target=torch.randint(0, 4, (8,)))
    sum(aux.values()).backward()
    assert model.fc.weight.grad is None and model.fc.bias.grad is None  # the teacher's head
    assert model.body.weight.grad is not None and model.body.weight.grad.abs().sum() > 0
    head_grad = [p.grad for p in sup.heads["mid"].parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in head_grad)


def test_user_criteria_opt_in_by_attribute_and_get_the_detached_teacher() -> None:
    seen: dict[str, Any] = {}

    def with_teacher(pred: torch.Tensor, target: torch.Tensor, *, teacher: torch.Tensor):
        seen["teacher"] = teacher
        return F.mse_loss(pred, teacher)

    with_teacher.wants_teacher = True  # type: ignore[attr-defined]
    calls: list[int] = []

    def plain(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return F.cross_entropy(pred, target)

    model = Net()
    sup = DeepSupervision(
        model,
        {"body": Tap(0.5, criterion=with_teacher), "mid": 0.5},
        head=heads.classification(4),
        criterion=plain,
    )
    out, aux = sup(torch.randn(3, 6), target=torch.tensor([0, 1, 2]))
    assert torch.equal(seen["teacher"], out.detach()) and not seen["teacher"].requires_grad
    assert calls == [1]  # the plain criterion is called with two arguments, as before
    assert isinstance(SelfDistillation(plain), TeacherCriterion)


class DictOut(nn.Module):
    """A segmentation model returning ``{"out": logits}`` (torchvision style)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TinyCNN(3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.net(x)}


@pytest.mark.parametrize("resize", ["prediction", "target"])
def test_dense_teachers_are_resized_like_the_target(resize: str) -> None:
    seen: dict[str, Any] = {}

    class Spy(SelfDistillation):
        def forward(self, prediction: Any, target: Any, *, teacher: Any = None) -> torch.Tensor:
            seen.update(pred=prediction, target=target, teacher=teacher)
            return super().forward(prediction, target, teacher=teacher)

    model = DictOut()
    sup = DeepSupervision(
        model,
        {"net.stage1": 0.4},
        head=heads.seg(3),
        criterion=Spy(nn.CrossEntropyLoss()),
        resize=resize,  # type: ignore[arg-type]
    )
    x, y = torch.randn(2, 3, 16, 16), torch.randint(0, 3, (2, 16, 16))
    out, aux = sup(x, target=y)
    if resize == "prediction":  # prediction upsampled to 16x16: the teacher is used as is
        assert seen["pred"].shape[-2:] == (16, 16)
        assert torch.equal(seen["teacher"], out["out"].detach())
    else:  # target downsampled to 8x8 by nearest indexing: the teacher likewise
        assert seen["pred"].shape[-2:] == (8, 8)
        assert torch.equal(seen["target"], downsample_target(y, (8, 8)))
        assert torch.equal(seen["teacher"], downsample_target(out["out"].detach(), (8, 8)))


def test_a_teacher_smaller_than_the_prediction_is_interpolated() -> None:
    teacher = torch.randn(1, 2, 4, 4)
    got = teacher_for(teacher, torch.zeros(1, 2, 8, 8), align_corners=True)
    torch.testing.assert_close(
        got, F.interpolate(teacher, size=(8, 8), mode="bilinear", align_corners=True)
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"temperature": 0.0}, ValueError, "temperature must be > 0"),
        ({"alpha": 1.5}, ValueError, r"alpha must be in \[0, 1\]"),
        ({"criterion": 3}, TypeError, "criterion must be a callable"),
    ],
    ids=["temperature", "alpha", "criterion"],
)
def test_bad_arguments(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    args = {"criterion": nn.CrossEntropyLoss(), **kwargs}
    with pytest.raises(error, match=match):
        SelfDistillation(**args)


def test_without_a_teacher() -> None:
    pred, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    assert torch.equal(
        SelfDistillation(nn.CrossEntropyLoss(), alpha=0.0)(pred, y), F.cross_entropy(pred, y)
    )
    with pytest.raises(TargetError, match="needs teacher="):
        SelfDistillation(nn.CrossEntropyLoss())(pred, y)


def test_teachers_that_cannot_work_are_named() -> None:
    with pytest.raises(TargetError, match="holds no tensor"):
        teacher_for("logits", torch.zeros(2, 3), tap="mid")
    with pytest.raises(TargetError, match="does not fit the prediction"):
        teacher_for(torch.zeros(2, 5, 4, 4), torch.zeros(2, 3, 4, 4), tap="mid")


def test_a_channels_last_teacher_is_resized_in_the_predictions_layout() -> None:
    teacher = torch.randn(2, 8, 6, 3)  # (B, H, W, C), larger than the prediction
    got = teacher_for(teacher, torch.zeros(2, 4, 3, 3), layout="NHWC", tap="mid")
    want = downsample_target(teacher.movedim(-1, 1), (4, 3)).movedim(1, -1)
    assert torch.equal(got, want)
    small = torch.randn(1, 2, 2, 5)  # smaller: interpolated over the spatial dims only
    got = teacher_for(small, torch.zeros(1, 4, 4, 5), layout="NHWC", align_corners=True)
    want = F.interpolate(small.movedim(-1, 1), size=(4, 4), mode="bilinear", align_corners=True)
    torch.testing.assert_close(got, want.movedim(1, -1))
    with pytest.raises(TargetError, match="layout 'NHWC'"):
        teacher_for(torch.zeros(2, 4, 4, 6), torch.zeros(2, 4, 4, 5), layout="NHWC", tap="mid")


def test_a_teacher_criterions_own_error_is_reraised_with_the_tap_named() -> None:
    class BoomError(Exception):
        pass

    def crit(prediction: Any, target: Any, *, teacher: torch.Tensor) -> torch.Tensor:
        raise BoomError("mine")

    crit.wants_teacher = True  # type: ignore[attr-defined]
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    sup = DeepSupervision(model, {"0": 0.5}, head=heads.classification(3), criterion=crit)
    with pytest.raises(BoomError, match="mine") as info:
        sup(torch.randn(2, 4), target=torch.tensor([0, 1]))
    assert any("criterion of tap '0'" in n for n in getattr(info.value, "__notes__", []))
