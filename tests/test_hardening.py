"""Issue 8: nothing silently wrong, every misuse a clear deepsup error, exact in every dtype.

One test (or one parametrized case) per numbered item and per confusing case of the issue; each
fails on the code before the issue and passes now.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import io
import pickle
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import MLP, TinyCNN, Tokens, TupleModel
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import deepsup
import deepsup.models
from deepsup import DeepSupError, DeepSupervision, Tap, heads, schedules
from deepsup.errors import ConfigError, ConfigTypeError, DeepSupWarning, HeadError, UsageError
from deepsup.wrapper import AuxLosses

CE = nn.CrossEntropyLoss()
IGNORE = 255


# ------------------------------------------------------------------ 1. weights are exact


class TwoConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(3, 6, 3, padding=1)
        self.cls = nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls(torch.relu(self.body(x)))


def test_float64_weight_is_exact_and_gradients_bitwise_equal_a_hand_written_branch() -> None:
    torch.manual_seed(0)
    model = TwoConv().double()
    head = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).double()
    ref_model, ref_head = copy.deepcopy(model), copy.deepcopy(head)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 4, (2, 8, 8))

    sup = DeepSupervision(model, {"body": 0.4}, head=head, criterion=CE)
    out, aux = sup(x, target=y)
    assert torch.equal(aux["body"], 0.4 * aux.raw["body"])
    (CE(out, y) + sum(aux.values())).backward()

    feat = ref_model.body(x)
    ref_out = ref_model.cls(torch.relu(feat))
    (CE(ref_out, y) + 0.4 * CE(ref_head(feat), y)).backward()

    got = [p.grad for p in (*model.parameters(), *head.parameters())]
    want = [p.grad for p in (*ref_model.parameters(), *ref_head.parameters())]
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("weight", [0.4, 1e-8, 0.3], ids=str)
def test_weight_is_applied_as_weight_times_loss_in_the_loss_dtype(
    dtype: torch.dtype, weight: float
) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    values = [0.37 * k for k in range(1, 40)]  # losses that expose a rounded weight
    current = {"loss": 0.0}

    def criterion(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (pred * 0).sum() + torch.tensor(current["loss"], dtype=pred.dtype)

    sup = DeepSupervision(
        model, {"0": weight}, head=heads.classification(2), criterion=criterion
    ).to(dtype)
    assert sup.weights == {"0": weight}
    x, y = torch.randn(3, 4, dtype=dtype), torch.zeros(3, dtype=torch.long)
    nonzero = 0
    for value in values:
        current["loss"] = value
        _, aux = sup(x, target=y)
        expected = weight * torch.tensor(value, dtype=dtype)  # PyTorch's rule for a float
        assert aux["0"].dtype == dtype
        assert torch.equal(aux["0"], expected), value
        nonzero += int(aux["0"] != 0)
    assert nonzero > 0  # a float16 weight buffer holds 0 for 1e-8


# ------------------------------------------------------------------ 2. step before backward


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_step_between_forward_and_backward_uses_the_forward_weight(
    mlp: MLP, dtype: torch.dtype
) -> None:
    # float64: converting the float64 weight buffer to the loss's dtype is a no-op view unless
    # the wrapper copies it, and step() would then rewrite a tensor saved for backward
    mlp = mlp.to(dtype)
    x, y = torch.randn(4, 6, dtype=dtype), torch.tensor([0, 1, 2, 3])
    ref = copy.deepcopy(mlp)
    sup = DeepSupervision(
        mlp,
        {"fc2": schedules.LinearDecay(1.0, total=2)},
        head=nn.Linear(8, 4, dtype=dtype),
        criterion=CE,
    )
    ref_sup = DeepSupervision(
        ref,
        {"fc2": schedules.LinearDecay(1.0, total=2)},
        head=nn.Linear(8, 4, dtype=dtype),
        criterion=CE,
    )
    ref_sup.heads["fc2"].load_state_dict(sup.heads["fc2"].state_dict())
    _, aux = sup(x, target=y)
    sup.step()  # rewrote the weight buffer in place before: "modified by an inplace operation"
    aux["fc2"].backward()
    _, ref_aux = ref_sup(x, target=y)
    ref_aux["fc2"].backward()
    assert sup.weights == {"fc2": 0.5}
    for p, q in zip(sup.parameters(), ref_sup.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)


# ------------------------------------------------------------------ 3. schedules are checked


class Broken(schedules.Schedule):
    def __init__(self, bad: float, at: int) -> None:
        self.bad, self.at = bad, at

    def __call__(self, step: int) -> float:
        return self.bad if step >= self.at else 0.4


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")], ids=str)
def test_a_schedule_value_that_is_not_a_weight_is_a_clear_error(mlp: MLP, bad: float) -> None:
    sup = DeepSupervision(mlp, {"fc1": Broken(bad, at=1)}, head=heads.classification(4))
    with pytest.raises(
        ConfigError,
        match=rf"tap 'fc1': the schedule Broken\(bad={bad}, at=1\) gave the weight {bad} at "
        r"progress 1; a weight must be a finite number >= 0",
    ):
        sup.step()
    assert sup.progress == 0 and sup.weights == {"fc1": 0.4}  # still usable
    with pytest.raises(ConfigError, match=r"the schedule Broken.* at progress 0"):
        DeepSupervision(mlp, {"fc2": Broken(bad, at=0)}, head=heads.classification(4))


# ------------------------------------------------------------------ 4. ignore-aware downsampling


class Halves(nn.Module):
    """(B, 3, H, W) -> a stride-2 feature map (tapped as 'down') -> logits at full size."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, 4, 2, stride=2)
        self.cls = nn.Conv2d(4, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.cls(self.down(x)), size=x.shape[-2:], mode="nearest")


def test_resize_target_never_turns_valid_cells_into_ignore() -> None:
    torch.manual_seed(0)
    y = torch.randint(0, 3, (2, 8, 8))
    y[:, :, 0::2] = IGNORE  # every other column ignored: nearest at stride 2 picks only these
    crit = nn.CrossEntropyLoss(ignore_index=IGNORE)
    sup = DeepSupervision(Halves(), {"down": 0.0}, head=nn.Conv2d(4, 3, 1), criterion=crit,
                          resize="target")  # fmt: skip
    x = torch.randn(2, 3, 8, 8)
    out, aux = sup(x, target=y)
    assert torch.isfinite(crit(out, y))
    assert torch.isfinite(aux.raw["down"]) and torch.isfinite(aux["down"])  # NaN even at weight 0
    # the rule: nearest's pick, else the first valid pixel of its 2x2 cell (here: column 1)
    pred = sup.heads["down"](sup.model.down(x))
    torch.testing.assert_close(aux.raw["down"], crit(pred, y[:, 0::2, 1::2]))


def test_a_target_without_any_valid_label_gives_a_finite_loss_and_gradient() -> None:
    crit = nn.CrossEntropyLoss(ignore_index=IGNORE)
    sup = DeepSupervision(Halves(), {"down": 0.4}, head=nn.Conv2d(4, 3, 1), criterion=crit,
                          resize="target")  # fmt: skip
    y = torch.full((2, 8, 8), IGNORE)
    _, aux = sup(torch.randn(2, 3, 8, 8), target=y)
    assert aux["down"].item() == 0.0
    aux["down"].backward()
    grads = [p.grad for p in sup.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_ignore_index_from_the_tap_overrides_the_criterion() -> None:
    t = torch.tensor([[[7, 1, 7, 2], [7, 3, 7, 4]]])
    pred = torch.zeros(1, 9, 1, 2)
    _, down = deepsup.functional.reconcile(pred, t, resize="target", align_corners=False, tap="t",
                                        ignore_index=7)  # fmt: skip
    assert down.tolist() == [[[1, 2]]]
    sup = DeepSupervision(Halves(), {"down": Tap(ignore_index=None)}, head=nn.Conv2d(4, 3, 1),
                          criterion=nn.CrossEntropyLoss(ignore_index=IGNORE))  # fmt: skip
    assert sup.taps["down"].ignore_index is None
    assert DeepSupervision(Halves(), "down", head=nn.Conv2d(4, 3, 1),
                           criterion=nn.CrossEntropyLoss(ignore_index=IGNORE)
                           ).taps["down"].ignore_index == IGNORE  # fmt: skip


# ------------------------------------------------------------------ 5. the model's own target=


class TakesTarget(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 3)
        self.seen: list[object] = []

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        self.seen.append(target)
        return self.fc2(self.fc1(x))


class TakesKeywordOnlyTarget(TakesTarget):
    def forward(self, x: torch.Tensor, *, target: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x, target)


def test_a_keyword_only_target_parameter_is_a_clash_too() -> None:
    with pytest.raises(ConfigError, match=r"forward takes its own target= parameter.*aux_target"):
        DeepSupervision(TakesKeywordOnlyTarget(), "fc1", head=heads.classification(3), criterion=CE)


def test_a_models_own_target_keyword_is_never_swallowed() -> None:
    with pytest.raises(
        ConfigError,
        match=r"TakesTarget\.forward takes its own target= parameter.*"
        r'target_key="aux_target"',
    ):
        DeepSupervision(TakesTarget(), "fc1", head=heads.classification(3), criterion=CE)
    model = TakesTarget()
    sup = DeepSupervision(
        model, "fc1", head=heads.classification(3), criterion=CE, target_key="aux_target"
    )
    own, labels = torch.ones(2), torch.tensor([0, 2])
    _, aux = sup(torch.randn(2, 4), target=own, aux_target=labels)
    assert model.seen[-1] is own
    assert set(aux) == {"fc1"}
    sup.eval()
    sup(torch.randn(2, 4), target=own, aux_target=labels)  # eval: aux_target ignored
    assert model.seen[-1] is own


# ------------------------------------------------------------------ 6. a head cannot change output


def test_a_head_that_changes_its_input_in_place_cannot_change_the_output() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3))
    bare = copy.deepcopy(model)
    x = torch.randn(5, 4)
    head = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(3, 3))
    sup = DeepSupervision(model, {"1": Tap(head=head)}, criterion=None)
    with pytest.raises(
        HeadError, match=r"tap '1': its head changed its input in place.*Tap\(clone=True\)"
    ):
        sup(x)
    fixed = DeepSupervision(
        bare_model := copy.deepcopy(bare), {"1": Tap(head=copy.deepcopy(head), clone=True)}
    )
    out, _ = fixed(x)
    assert torch.equal(out, bare(x)) and (out < 0).any()
    assert bare_model is fixed.model


# ------------------------------------------------------------------ 7. per-token predictions


def token_ce(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(pred.flatten(0, 1), target.flatten())


@pytest.mark.parametrize("resize", ["prediction", "target", None])
def test_per_token_predictions_are_not_resized_along_the_class_axis(resize: str | None) -> None:
    model = Tokens()
    head = nn.Linear(8, 3)
    sup = DeepSupervision(model, {"embed": Tap(1.0, head=head, layout="NHWC")},
                          criterion=token_ce, resize=resize)  # fmt: skip
    x, y = torch.randn(2, 6, 5), torch.randint(0, 3, (2, 6))  # N = 6 tokens, K = 3 classes
    _, aux = sup(x, target=y)
    torch.testing.assert_close(aux["embed"], token_ce(head(model.embed(x)), y))


def test_a_head_declares_its_layout() -> None:
    class PerToken(nn.Linear):
        layout = "NHWC"

    model = Tokens()
    sup = DeepSupervision(model, "embed", head=PerToken(8, 3), criterion=token_ce)
    assert sup.taps["embed"].layout == "NHWC"
    x, y = torch.randn(2, 6, 5), torch.randint(0, 3, (2, 6))
    _, aux = sup(x, target=y)
    torch.testing.assert_close(aux["embed"], 0.4 * token_ce(sup.heads["embed"](model.embed(x)), y))


# ------------------------------------------------------------------ 8. Conv1d, partial factories


def test_conv1d_features_are_channels_first() -> None:
    model = nn.Sequential(nn.Conv1d(3, 12, 3), nn.ReLU(), nn.Conv1d(12, 5, 1))
    for example in (None, torch.randn(2, 3, 40)):
        sup = DeepSupervision(model, "0", head=heads.classification(5), criterion=CE,
                              example_input=example)  # fmt: skip
        assert sup.heads["0"].fc.in_features == 12
        _, aux = sup(torch.randn(2, 3, 40), target=torch.tensor([0, 4]))
        assert torch.isfinite(aux["0"])
        sup.unwrap()


class ToNHWC(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


def test_a_partial_head_factory_declares_its_layout() -> None:
    model = nn.Sequential(nn.Conv2d(3, 6, 1), ToNHWC(), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(1, 3, 10, 10))  # materialise the lazy layer
    factory = functools.partial(heads.SegHead, num_classes=3, layout="NHWC")
    sup = DeepSupervision(model, "1", head=factory, criterion=CE,
                          example_input=torch.randn(2, 3, 10, 10))  # fmt: skip
    assert sup.heads["1"].conv.in_channels == 6  # not H = 10
    _, aux = sup(torch.randn(2, 3, 10, 10), target=torch.randint(0, 3, (2, 10, 10)))
    assert torch.isfinite(aux["1"])


def test_builtin_factories_declare_layouts_publicly() -> None:
    assert heads.seg(3, layout="NHWC").layout == "NHWC"  # type: ignore[attr-defined]
    assert heads.tokens(3).layout == "NHWC"  # type: ignore[attr-defined]
    assert heads.classification(3).output_layout == "NCHW"  # type: ignore[attr-defined]


# ------------------------------------------------------------------ 9. glob negation


class Stages(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer1 = nn.Linear(2, 2)
        self.layer2 = nn.Linear(2, 2)
        self.layer3 = nn.Linear(2, 2)


@pytest.mark.parametrize(
    ("pattern", "names"),
    [
        ("layer[!1]", ["layer2", "layer3"]),
        ("layer[1]", ["layer1"]),
        ("layer[!12]", ["layer3"]),
        ("layer[1-2]", ["layer1", "layer2"]),
    ],
)
def test_glob_classes_follow_fnmatch(pattern: str, names: list[str]) -> None:
    assert list(deepsup._names.resolve_taps(Stages(), pattern)) == names


# ------------------------------------------------------------------ confusing cases


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"head": heads.seg}, r"head=heads\.seg was passed uncalled; .*heads\.seg\(num_classes="),
        (
            {"head": heads.SegHead},
            r"head=SegHead cannot be called as SegHead\(in_channels\): its parameter 'num_classes' "
            r"needs a value; pass functools\.partial\(SegHead, num_classes=\.\.\.\)",
        ),
        (
            {"head": heads.classification(4), "criterion": nn.CrossEntropyLoss},
            r"criterion=CrossEntropyLoss is a class; pass an instance, "
            r"e\.g\. criterion=CrossEntropyLoss\(\)",
        ),
        (
            {"taps": {"fc1": Tap(head=heads.tokens)}},
            r"tap 'fc1': head=heads\.tokens was passed uncalled",
        ),
    ],
    ids=["uncalled-maker", "head-class", "criterion-class", "tap-uncalled-maker"],
)
def test_classes_and_uncalled_factories_are_refused_at_construction(
    mlp: MLP, kwargs: dict[str, object], match: str
) -> None:
    kwargs = {"taps": "fc1", **kwargs}
    with pytest.raises(ConfigTypeError, match=match):
        DeepSupervision(mlp, **kwargs)  # type: ignore[arg-type]


def test_training_forward_under_inference_mode(mlp: MLP) -> None:
    sup = DeepSupervision(mlp, "fc1", head=heads.classification(4), criterion=CE)
    with (
        torch.inference_mode(),
        pytest.raises(
            UsageError, match=r"a training forward under torch\.inference_mode\(\).*sup\.eval\(\)"
        ),
    ):
        sup(torch.randn(2, 6), target=torch.tensor([0, 1]))
    sup.eval()
    with torch.inference_mode():
        assert sup(torch.randn(2, 6)).shape == (2, 4)


def test_a_select_callable_that_raises_is_reraised_with_the_tap_named(
    tuple_model: TupleModel,
) -> None:
    class MineError(Exception):
        pass

    def select(output: object) -> torch.Tensor:
        raise MineError("no such field")

    sup = DeepSupervision(tuple_model, {"block": Tap(select=select)}, head=nn.Identity())
    with pytest.raises(MineError, match=r"(?s)no such field.*select= callable of tap 'block'"):
        sup(torch.randn(2, 3, 5))
    assert sup._capture.records() is None


def test_example_input_without_a_batch_dimension() -> None:
    # a model that rejects it: the model's own error, with a note that says why
    with pytest.raises(
        ValueError, match=r"(?s)expected 4D input.*example_input must be a batch.*unsqueeze\(0\)"
    ):
        DeepSupervision(TinyCNN(), "stage1", head=heads.seg(3),
                        example_input=torch.randn(3, 16, 16))  # fmt: skip
    # a model that accepts it (conv2d runs unbatched): caught, not 16 channels
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 2, 1))
    with pytest.raises(ConfigError, match=r"example_input of shape \(3, 16, 16\) looks unbatched"):
        DeepSupervision(model, "0", head=heads.seg(2), example_input=torch.randn(3, 16, 16))


def test_sup_taps_is_read_only(mlp: MLP) -> None:
    sup = DeepSupervision(mlp, ["fc1", "fc2"], head=heads.classification(4))
    for change in (
        lambda: sup.taps.__setitem__("fc1", Tap(0.1)),
        lambda: sup.taps.__delitem__("fc1"),
        lambda: sup.taps.update({"out": Tap()}),  # type: ignore[attr-defined]
    ):
        with pytest.raises(ConfigTypeError, match=r"sup\.taps is read-only.*new DeepSupervision"):
            change()
    assert list(sup.taps) == ["fc1", "fc2"] and sup.taps["fc1"].weight == schedules.Constant(0.4)
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign"):
        sup.taps["fc1"].weight = 0.1  # type: ignore[misc]


def test_aux_losses_rebuild_as_type_of_pairs_and_have_one_meaning(mlp: MLP) -> None:
    sup = DeepSupervision(mlp, ["fc1", "fc2"], head=heads.classification(4), criterion=CE)
    _, aux = sup(torch.randn(3, 6), target=torch.tensor([0, 1, 2]))
    rebuilt = type(aux)((k, v) for k, v in aux.items())  # nn.DataParallel's gather does this
    assert isinstance(rebuilt, AuxLosses) and dict(rebuilt) == dict(aux) and rebuilt.raw == {}
    assert all(not v.requires_grad for v in aux.raw.values())
    copied = pickle.loads(pickle.dumps(AuxLosses({"a": 1.0}, raw={"a": 2.0})))
    assert copied.raw == {"a": 2.0}
    preds = DeepSupervision(copy.deepcopy(mlp), "fc1", head=heads.classification(4))
    _, out = preds(torch.randn(3, 6))
    assert type(out) is dict and out["fc1"].requires_grad  # predictions: a plain dict


def test_an_in_place_head_on_a_middle_tap_names_the_tap_at_forward(mlp: MLP) -> None:
    # fc1's output feeds act (Tanh saves its output, not its input) ... and fc2 after it saves
    # its input: an in-place head on 'act' breaks fc2's backward far from here
    head = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(12, 4))
    sup = DeepSupervision(mlp, {"act": Tap(head=head)}, criterion=CE)
    with pytest.raises(HeadError, match=r"tap 'act': its head changed its input in place"):
        sup(torch.randn(2, 6), target=torch.tensor([0, 1]))


def test_user_exceptions_from_heads_and_criteria_are_reraised_unchanged(mlp: MLP) -> None:
    class OopsError(Exception):
        pass

    class BadHead(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise OopsError("head")

    def bad_criterion(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise OopsError("criterion")

    sup = DeepSupervision(mlp, {"fc1": Tap(head=BadHead())}, criterion=CE)
    with pytest.raises(OopsError, match=r"(?s)head.*in the head of tap 'fc1'") as info:
        sup(torch.randn(2, 6), target=torch.tensor([0, 1]))
    assert type(info.value) is OopsError
    sup2 = DeepSupervision(copy.deepcopy(mlp), "fc1", head=heads.classification(4),
                           criterion=bad_criterion)  # fmt: skip
    with pytest.raises(OopsError, match=r"(?s)criterion.*in the criterion of tap 'fc1'"):
        sup2(torch.randn(2, 6), target=torch.tensor([0, 1]))


# ------------------------------------------------------------------ the error promise


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(2, 2)
        self.b = self.a


def _reenter(mlp: MLP) -> None:
    sup = DeepSupervision(mlp, "fc1", head=heads.classification(4), criterion=None)

    class Hook:
        def __call__(self, module: nn.Module, args: object, output: object) -> None:
            sup(torch.randn(1, 6))

    mlp.fc2.register_forward_hook(Hook())
    sup(torch.randn(1, 6))


def _after_unwrap(mlp: MLP) -> None:
    sup = DeepSupervision(mlp, "fc1", head=heads.classification(4))
    sup.unwrap()
    sup(torch.randn(1, 6))


@pytest.mark.parametrize(
    ("call", "builtin", "match"),
    [
        (lambda m: DeepSupervision(m, "", head=nn.Identity()), ValueError, r"tap '' is the model"),
        (lambda m: DeepSupervision(Twice(), ["a", "b"], head=nn.Identity()), ValueError,
         r"taps 'a' and 'b' are the same module object"),
        (lambda m: DeepSupervision(m, {"fc1": 0.4, "fc*": 0.2}, head=nn.Identity()), ValueError,
         r"matched by both"),
        (lambda m: DeepSupervision(m, {"fc1": "0.4"}, head=nn.Identity()), TypeError,
         r"weight must be a float"),
        (lambda m: DeepSupervision(m, {"fc1": -1.0}, head=nn.Identity()), ValueError,
         r"value must be a finite number >= 0"),
        (lambda m: DeepSupervision(m, "fc1", head=nn.Identity(), calls="every"), ValueError,
         r"calls must be one of"),
        (lambda m: DeepSupervision(m, "fc1", head=nn.Identity(), resize="up"), ValueError,
         r"resize must be"),
        (lambda m: DeepSupervision(m, "fc1", head=lambda c: 3), TypeError,
         r"the head factory returned int, not an nn\.Module"),
        (lambda m: DeepSupervision(m, "fc1"), ValueError, r"tap 'fc1' has no head"),
        (lambda m: DeepSupervision(m, {"fc1": Tap(layout="CHW")}, head=nn.Identity()),
         ValueError, r"layout must be 'NCHW' or 'NHWC' \(got 'CHW'\)"),
        (lambda m: DeepSupervision(m, {"fc1": Tap(in_channels=0)}, head=nn.Identity()),
         ValueError, r"in_channels must be a positive int \(got 0\)"),
        (lambda m: DeepSupervision("m", "fc1"), TypeError, r"model must be an nn\.Module"),
        (lambda m: setattr(DeepSupervision(m, "fc1", head=nn.Identity()), "progress", -1),
         ValueError, r"progress must be an int >= 0 \(got -1\)"),
        (_after_unwrap, RuntimeError, r"was unwrapped"),
        (_reenter, RuntimeError, r"re-entered"),
        (lambda m: deepsup.model_state_dict(m.state_dict()), KeyError, r"no 'model\.' keys"),
        (lambda m: deepsup.param_groups("m", lr=0.1), TypeError, r"sup must be a DeepSupervision"),
        (lambda m: heads.tokens(2, pool="max"), ValueError, r"pool must be 'mean' or 'cls'"),
        (lambda m: schedules.LinearDecay(1.0, total=0), ValueError, r"total must be a positive"),
        (lambda m: deepsup.models.PSPNet(3, "resnet18", dropout=2.0), ValueError,
         r"dropout must be a probability"),
    ],
    ids=[
        "root", "alias", "overlap", "weight-type", "weight-value", "calls", "resize",
        "factory-result", "no-head", "layout", "in-channels", "model-type", "progress",
        "unwrapped", "reentry", "state-dict", "param-groups", "pool", "total", "pspnet",
    ],
)  # fmt: skip
def test_every_deliberate_error_is_a_deepsup_error_and_a_builtin(
    mlp: MLP, call: object, builtin: type[Exception], match: str
) -> None:
    with pytest.raises(DeepSupError, match=match) as info:
        call(mlp)  # type: ignore[operator]
    assert isinstance(info.value, builtin)


def test_deepsup_warning_where_an_option_has_no_effect(mlp: MLP) -> None:
    with pytest.warns(DeepSupWarning, match=r"Tap\(in_channels=8\) has no effect"):
        DeepSupervision(mlp, {"fc1": Tap(in_channels=8)}, head=nn.Identity())
    sup = DeepSupervision(mlp, "fc2", head=nn.Identity())
    with pytest.warns(DeepSupWarning, match=r"target= has no effect: no tap has a criterion"):
        sup(torch.randn(2, 6), target=torch.tensor([0, 1]))


# ------------------------------------------------------------------ also: pickling, CLI


def test_a_wrapper_with_a_lambda_head_factory_pickles(mlp: MLP) -> None:
    def make(c: int) -> nn.Module:  # a closure: not picklable
        return nn.Linear(c, 4)

    sup = DeepSupervision(mlp, {"fc1": 0.4, "fc2": Tap(head=lambda c: nn.Linear(c, 4))},
                          head=make, criterion=CE)  # fmt: skip
    buf = io.BytesIO()
    torch.save(sup, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    x, y = torch.randn(2, 6), torch.tensor([0, 1])
    _, a = sup(x, target=y)
    _, b = back(x, target=y)
    assert {k: v.item() for k, v in a.items()} == {k: v.item() for k, v in b.items()}


def test_cli_bad_model_and_input_are_one_line_errors(capsys: pytest.CaptureFixture[str]) -> None:
    from deepsup.__main__ import main

    assert main(["list", "no_such_module_xyz:build"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert re.search(r"deepsup: error: cannot build model 'no_such_module_xyz:build'", err)
    assert main(["list", "torch.nn:Identity", "--input", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not run on an input of shape -1" in err
    with pytest.raises(SystemExit) as info:
        main(["list", "torch.nn:Identity", "--input", "1,x"])
    assert info.value.code == 2


def test_cli_loads_a_module_from_the_current_folder_like_python_m(tmp_path: Path) -> None:
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "mymodels.py").write_text(
        "from torch import nn\n\ndef build():\n    return nn.Sequential(nn.Linear(2, 3))\n"
    )
    (tmp_path / "bin").mkdir()
    script = tmp_path / "bin" / "deepsup"  # what the console-script launcher does
    script.write_text(
        textwrap.dedent(
            """
            import sys
            from deepsup.__main__ import main
            sys.exit(main())
            """
        )
    )
    env = {"PYTHONPATH": str(Path(deepsup.__file__).parents[1]), "PATH": "/usr/bin:/bin"}
    run = subprocess.run(
        [sys.executable, str(script), "list", "mymodels:build"],
        cwd=tmp_path / "work", capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "Linear" in run.stdout


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 3),
    st.tuples(st.integers(1, 9), st.integers(1, 9)),
    st.data(),
)
def test_ignore_aware_downsampling_properties(
    batch: int, size_in: tuple[int, int], data: st.DataObject
) -> None:
    size_out = tuple(data.draw(st.integers(1, n)) for n in size_in)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    labels = torch.tensor([0, 1, 2, IGNORE])[torch.randint(0, 4, (batch, *size_in), generator=g)]
    out = deepsup._targets.nearest_labels(labels, size_out, IGNORE)
    nearest = deepsup._targets.nearest(labels, size_out)
    assert out.shape == nearest.shape and out.dtype == labels.dtype
    kept = nearest != IGNORE
    assert torch.equal(out[kept], nearest[kept])  # nearest's pick wherever it is valid
    rows = [int(i * size_in[0] // size_out[0]) for i in range(size_out[0] + 1)]
    cols = [int(j * size_in[1] // size_out[1]) for j in range(size_out[1] + 1)]
    rows[-1], cols[-1] = size_in
    for i in range(size_out[0]):
        for j in range(size_out[1]):
            cell = labels[:, rows[i] : rows[i + 1], cols[j] : cols[j + 1]].reshape(batch, -1)
            for b in range(batch):
                valid = cell[b][cell[b] != IGNORE]
                if len(valid) == 0:
                    assert out[b, i, j] == IGNORE
                else:
                    assert out[b, i, j] in valid.tolist()  # a label of its own cell
