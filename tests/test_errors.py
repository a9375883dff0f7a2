"""Every misuse named in API.md raises a clear DeepSupError naming the tap and the fix."""

from __future__ import annotations

import pytest
import torch
from conftest import MLP, ReuseModel, TinyCNN
from torch import nn

import deepsup
from deepsup import DeepSupError, DeepSupervision, Tap, heads
from deepsup.errors import (
    CaptureError,
    ChannelInferenceError,
    DeepSupScriptError,
    TapNotFoundError,
    TapOutputError,
    TargetError,
)

CE = nn.CrossEntropyLoss()


@pytest.mark.parametrize(
    ("error", "builtin"),
    [
        (TapNotFoundError, ValueError),
        (ChannelInferenceError, ValueError),
        (TargetError, ValueError),
        (TapOutputError, TypeError),
        (CaptureError, RuntimeError),
        (DeepSupScriptError, RuntimeError),
    ],
    ids=lambda e: e.__name__,
)
def test_errors_subclass_the_base_and_a_builtin(error: type, builtin: type) -> None:
    assert issubclass(error, DeepSupError)
    assert issubclass(error, builtin)


def test_unknown_tap_names_close_matches(tiny_cnn: TinyCNN) -> None:
    with pytest.raises(
        TapNotFoundError,
        match=r"tap 'stage3' matches no submodule of TinyCNN\. "
        r"Did you mean 'stage2', 'stage1', 'stage2\.1'\? .*deepsup\.list_taps\(model\)",
    ):
        DeepSupervision(tiny_cnn, "stage3", head=heads.seg(3))


def test_unknown_pattern(tiny_cnn: TinyCNN) -> None:
    with pytest.raises(TapNotFoundError, match=r"pattern 'blocks\.\*' matches no submodule"):
        DeepSupervision(tiny_cnn, "blocks.*", head=heads.seg(3))


def test_root_tap(tiny_cnn: TinyCNN) -> None:
    with pytest.raises(ValueError, match="tap '' is the model itself"):
        DeepSupervision(tiny_cnn, "", head=heads.seg(3))


def test_overlapping_patterns(tiny_cnn: TinyCNN) -> None:
    with pytest.raises(ValueError, match="tap 'stage1' is matched by both 'stage1' and 'stage\\*'"):
        DeepSupervision(tiny_cnn, {"stage1": 0.4, "stage*": 0.2}, head=heads.seg(3))


def test_one_module_under_two_names() -> None:
    class Aliased(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(4, 4)
            self.alias = self.body  # the same module object, registered twice
            self.out = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.body(x))

    with pytest.raises(
        ValueError, match=r"taps 'body' and 'alias' are the same module object; tap it once"
    ):
        DeepSupervision(Aliased(), ["body", "alias"], head=heads.classification(2))
    sup = DeepSupervision(Aliased(), ["alias"], head=heads.classification(2))  # one name is fine
    assert list(sup.taps) == ["alias"]


def test_wrapping_a_wrapper(mlp: nn.Module) -> None:
    sup = DeepSupervision(mlp, "fc1", head=heads.classification(2))
    with pytest.raises(TypeError, match=r"model is already a DeepSupervision; add the taps"):
        DeepSupervision(sup, "model.fc2", head=heads.classification(2))


def test_the_wrapper_called_inside_its_own_forward(mlp: nn.Module) -> None:
    holder: list[DeepSupervision] = []

    class CallsBack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            holder[0](x)  # re-enters the wrapper's training forward
            return self.fc(x)

    model = nn.Sequential(CallsBack(), nn.Linear(6, 2))
    holder.append(DeepSupervision(model, {"1": 1.0}, head=nn.Identity()))
    with pytest.raises(RuntimeError, match=r"training forward was re-entered on the same thread"):
        holder[0](torch.randn(2, 6))
    assert holder[0]._capture.records() is None


def test_tap_never_ran(train_only_model: nn.Module) -> None:
    model = train_only_model
    sup = DeepSupervision(model, "extra", head=heads.classification(2), criterion=CE)
    sup(torch.randn(2, 4), target=torch.tensor([0, 1]))  # runs in training: fine

    class Skips(MLP):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.fc2.forward(self.fc1(x)))  # .forward() bypasses hooks

    sup2 = DeepSupervision(Skips(), "fc2", head=heads.classification(4), criterion=CE)
    with pytest.raises(
        CaptureError,
        match=r"tap 'fc2' did not run in this training forward.*"
        r"`\.forward\(\)`",
    ):
        sup2(torch.randn(2, 6), target=torch.tensor([0, 1]))


def test_tap_ran_twice(reuse_model: ReuseModel) -> None:
    sup = DeepSupervision(reuse_model, "shared", head=heads.classification(2), criterion=CE)
    with pytest.raises(
        CaptureError,
        match=r"tap 'shared' ran 2 times in one forward.*"
        r"Tap\(calls='first'\)",
    ):
        sup(torch.randn(2, 4), target=torch.tensor([0, 1]))
    assert sup._capture.records() is None


def test_unsupported_output_type() -> None:
    class Weird(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> object:
            return {"shape": x.shape}

    model = nn.Sequential(nn.Linear(3, 3))
    model.add_module("weird", Weird())
    wrapped = nn.Sequential()
    wrapped.add_module("inner", model)
    sup = DeepSupervision(model, {"weird": Tap(in_channels=3)}, head=heads.classification(2))
    with pytest.raises(
        TapOutputError,
        match=r"tap 'weird': the default rule found no tensor in "
        r"an output of type dict.*Tap\(select=\.\.\.\)",
    ):
        sup(torch.randn(2, 3))


def test_select_that_finds_nothing(tuple_model: nn.Module) -> None:
    sup = DeepSupervision(tuple_model, {"block": Tap(select=5)}, head=nn.Identity())
    with pytest.raises(
        TapOutputError, match=r"select=5 found no tensor in an output of type tuple"
    ):
        sup(torch.randn(2, 3, 5))


def test_missing_target(tiny_cnn: TinyCNN) -> None:
    sup = DeepSupervision(tiny_cnn, "stage2", head=heads.seg(3), criterion=CE)
    with pytest.raises(
        TargetError,
        match=r"a training forward needs target=.*criterion=None.*"
        r"sup\.eval\(\)",
    ):
        sup(torch.randn(2, 3, 16, 16))


def test_target_dict_missing_a_tap(tiny_cnn: TinyCNN) -> None:
    sup = DeepSupervision(
        tiny_cnn, ["stage1", "stage2"], head=heads.seg(3), criterion=CE, clone=True
    )
    with pytest.raises(TargetError, match=r"without an entry for tap 'stage2'"):
        sup(torch.randn(2, 3, 16, 16), target={"stage1": torch.zeros(2, 16, 16, dtype=torch.long)})


def test_shape_mismatch_without_resize(tiny_cnn: TinyCNN) -> None:
    sup = DeepSupervision(tiny_cnn, "stage2", head=heads.seg(3), criterion=CE, resize=None)
    with pytest.raises(
        TargetError,
        match=r"tap 'stage2': prediction of shape \(2, 3, 4, 4\) and "
        r"target of shape \(2, 16, 16\) differ in spatial size and resize=None",
    ):
        sup(torch.randn(2, 3, 16, 16), target=torch.zeros(2, 16, 16, dtype=torch.long))


def test_target_of_wrong_rank(tiny_cnn: TinyCNN) -> None:
    sup = DeepSupervision(tiny_cnn, "stage2", head=heads.seg(3), criterion=CE)
    with pytest.raises(TargetError, match=r"tap 'stage2': target of shape \(2,\) does not fit"):
        sup(torch.randn(2, 3, 16, 16), target=torch.zeros(2, dtype=torch.long))


def test_target_resize_refuses_to_upsample(tiny_cnn: TinyCNN) -> None:
    sup = DeepSupervision(
        tiny_cnn, "stage1", head=heads.seg(3), criterion=CE, resize="target", clone=True
    )
    with pytest.raises(TargetError, match=r"resize='target' only downsamples"):
        sup(torch.randn(2, 3, 16, 16), target=torch.zeros(2, 4, 4, dtype=torch.long))


def test_inplace_change_after_capture() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True))
    sup = DeepSupervision(model, "1", head=nn.Identity())
    with pytest.raises(
        CaptureError,
        match=r"tap '1': its output was changed in place.*"
        r"Tap\(clone=True\)",
    ):
        sup(torch.randn(2, 3, 8, 8))
    assert sup._capture.records() is None


class Doubled(nn.Module):
    """No layers of its own, and its output is not its input: nothing tells its channels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x], dim=1)


def test_channels_cannot_be_inferred() -> None:
    model = nn.Sequential(nn.Linear(3, 3), Doubled(), nn.Linear(6, 2))
    with pytest.raises(
        ChannelInferenceError,
        match=r"cannot infer the channels of tap '1' "
        r"\(Doubled\); pass example_input=.*Tap\(in_channels=\.\.\.\)",
    ):
        DeepSupervision(model, "1", head=heads.classification(2))


def test_inferred_channels_contradicted_at_run_time() -> None:
    model = nn.Sequential(nn.Linear(3, 5), nn.Identity(), nn.Linear(5, 2))
    sup = DeepSupervision(
        model, {"1": Tap(in_channels=4)}, head=heads.classification(2), criterion=CE
    )
    with pytest.raises(
        ChannelInferenceError,
        match=r"tap '1': its head was built for 4 channels "
        r"but the captured output has shape \(2, 5\)",
    ):
        sup(torch.randn(2, 3), target=torch.tensor([0, 1]))


def test_head_failure_names_tap_shape_and_dtype(mlp: nn.Module) -> None:
    sup = DeepSupervision(mlp, {"fc2": 1.0}, head=nn.Linear(7, 2), criterion=CE)
    with pytest.raises(
        RuntimeError,
        match=r"(?s)shapes cannot be multiplied.*\ndeepsup: raised in the head of tap 'fc2' "
        r"\(input shape \(2, 8\), dtype torch\.float32\)",
    ):
        sup(torch.randn(2, 6), target=torch.tensor([0, 1]))


def test_criterion_failure_names_tap_and_shapes(mlp: nn.Module) -> None:
    sup = DeepSupervision(mlp, {"fc2": 1.0}, head=heads.classification(3), criterion=CE)
    with pytest.raises(
        IndexError,
        match=r"(?s)out of bounds.*\ndeepsup: raised in the criterion of tap 'fc2' "
        r"\(prediction \(2, 3\), target \(2,\)\)",
    ):
        sup(torch.randn(2, 6), target=torch.tensor([0, 7]))


def test_no_head(mlp: nn.Module) -> None:
    with pytest.raises(ValueError, match=r"tap 'fc1' has no head; pass head="):
        DeepSupervision(mlp, "fc1")


def test_bad_arguments(mlp: nn.Module) -> None:
    with pytest.raises(ValueError, match=r"resize must be 'prediction'.*\(got 'bilinear'\)"):
        DeepSupervision(mlp, "fc1", head=heads.classification(2), resize="bilinear")  # type: ignore[arg-type]
    with pytest.raises(
        ValueError,
        match=r"calls must be one of 'error', 'first', 'last', 'all' "
        r"\(got 'every'\)",
    ):
        Tap(calls="every")  # type: ignore[arg-type]
    for bad in (0, -3, True, 2.0):
        with pytest.raises(ValueError, match=rf"in_channels must be a positive int \(got {bad}\)"):
            Tap(in_channels=bad)  # type: ignore[arg-type]
    with pytest.raises(
        TypeError,
        match=r"weight must be a float or a deepsup\.schedules\."
        r"Schedule \(got str\)",
    ):
        DeepSupervision(mlp, {"fc1": "0.4"}, head=heads.classification(2))  # type: ignore[dict-item]
    with pytest.raises(TypeError, match=r"model must be an nn\.Module \(got str\)"):
        DeepSupervision("resnet", "fc1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"taps must be module names \(got 3"):
        DeepSupervision(mlp, ["fc1", 3], head=heads.classification(2))  # type: ignore[list-item]


def test_training_after_unwrap(mlp: nn.Module) -> None:
    sup = DeepSupervision(mlp, "fc1", head=heads.classification(2))
    sup.unwrap()
    with pytest.raises(RuntimeError, match="was unwrapped"):
        sup(torch.randn(2, 6))
    sup.eval()
    assert torch.equal(sup(torch.ones(1, 6)), mlp(torch.ones(1, 6)))


def test_model_state_dict_of_a_plain_state_dict(mlp: nn.Module) -> None:
    with pytest.raises(KeyError, match=r"no 'model\.' keys in this state_dict"):
        deepsup.model_state_dict(mlp.state_dict())
