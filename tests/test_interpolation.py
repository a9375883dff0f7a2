"""interpolation=: prediction upsampling modes and target downsampling rules, 1D to 3D."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from deepsup import DeepSupervision, Tap
from deepsup._config import check_interpolation
from deepsup._targets import max_target, nearest_exact_indices, soft_target
from deepsup.errors import ConfigError, TargetError
from deepsup.functional import reconcile

# prediction side ----------------------------------------------------------------------------

PRED_CASES = [
    ("linear", 1, "linear"),
    ("linear", 2, "bilinear"),
    ("linear", 3, "trilinear"),
    ("nearest", 2, "nearest"),
    ("nearest", 3, "nearest"),
    ("nearest-exact", 3, "nearest-exact"),
    ("area", 2, "area"),
    ("area", 1, "area"),
    ("bicubic", 2, "bicubic"),
]


@pytest.mark.parametrize(("mode", "dims", "torch_mode"), PRED_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("align_corners", [False, True], ids=["ac-false", "ac-true"])
def test_prediction_modes_are_f_interpolate(
    mode: str, dims: int, torch_mode: str, align_corners: bool
) -> None:
    pred = torch.randn(2, 3, *(4,) * dims)
    target = torch.zeros(2, *(9,) * dims, dtype=torch.long)
    out, t = reconcile(
        pred,
        target,
        resize="prediction",
        align_corners=align_corners,
        tap="x",
        interpolation=mode,
    )
    ac = align_corners if torch_mode in ("linear", "bilinear", "trilinear", "bicubic") else None
    ref = F.interpolate(pred, size=(9,) * dims, mode=torch_mode, align_corners=ac)
    assert t is target
    assert torch.equal(out, ref)


def test_bicubic_needs_two_spatial_dims() -> None:
    with pytest.raises(TargetError, match=r"3 spatial dims .* interpolation='bicubic'"):
        reconcile(
            torch.randn(1, 2, 2, 2, 2),
            torch.zeros(1, 4, 4, 4),
            resize="prediction",
            align_corners=False,
            tap="x",
            interpolation="bicubic",
        )


# target side: nearest-exact -------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(size_in=st.integers(1, 300), data=st.data())
def test_nearest_exact_indices_are_f_interpolates_on_float32(size_in: int, data: Any) -> None:
    size_out = data.draw(st.integers(1, size_in))
    x = torch.arange(size_in, dtype=torch.float32)[None, None]
    ref = F.interpolate(x, size=size_out, mode="nearest-exact")[0, 0].long()
    assert torch.equal(nearest_exact_indices(size_in, size_out, torch.device("cpu")), ref)


@pytest.mark.parametrize(
    ("shape", "size"),
    [((2, 17), (6,)), ((2, 16, 13), (8, 5)), ((1, 10, 12, 9), (3, 6, 4))],
    ids=["1d", "2d", "3d"],
)
@pytest.mark.parametrize("dense", [False, True], ids=["indices", "dense"])
def test_nearest_exact_target_equals_f_interpolate_on_float_label_maps(
    shape: tuple[int, ...], size: tuple[int, ...], dense: bool
) -> None:
    """The rule of MONAI's DeepSupervisionLoss and nnU-Net v2 (F.interpolate on float maps)."""
    labels = torch.randint(0, 5, shape)
    labels[..., ::3] = 255
    target = labels[:, None].float() if dense else labels
    pred = torch.randn(shape[0], 5, *size)
    _, small = reconcile(
        pred, target, resize="target", align_corners=False, tap="x", interpolation="nearest-exact"
    )
    ref = F.interpolate(labels[:, None].float(), size=size, mode="nearest-exact")
    assert torch.equal(small, ref if dense else ref[:, 0].long())
    assert small.dtype == target.dtype


def test_nearest_exact_copies_values_of_any_dtype() -> None:
    big = torch.full((1, 4, 4), 2**40 + 1, dtype=torch.int64)
    _, small = reconcile(
        torch.randn(1, 3, 2, 2), big, resize="target", align_corners=False, tap="x",
        interpolation="nearest-exact",
    )  # fmt: skip
    assert torch.equal(small, torch.full((1, 2, 2), 2**40 + 1))


def test_nearest_and_nearest_exact_pick_different_pixels() -> None:
    t = torch.arange(8)[None]
    pred = torch.randn(1, 2, 4)
    picks = {
        mode: reconcile(pred, t, resize="target", align_corners=False, tap="x", interpolation=mode)[
            1
        ].tolist()
        for mode in ("nearest", "nearest-exact")
    }
    assert picks == {"nearest": [[0, 2, 4, 6]], "nearest-exact": [[1, 3, 5, 7]]}


# target side: soft and max --------------------------------------------------------------------


def _blocks(t: torch.Tensor, f: int) -> torch.Tensor:
    """(B, *S) -> (B, *S/f, f**k): the pixels of each f x ... x f cell, for the references."""
    k = t.dim() - 1
    shape = [t.shape[0]]
    for s in t.shape[1:]:
        shape += [s // f, f]
    x = t.reshape(shape)
    order = [0, *range(1, 2 * k, 2), *range(2, 2 * k + 1, 2)]
    return x.permute(order).reshape(*x.shape[0:1], *(s // f for s in t.shape[1:]), -1)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_soft_target_is_the_class_fraction_of_each_cell(dims: int) -> None:
    f, C = 2, 4
    labels = torch.randint(0, C, (2, *(8,) * dims))
    labels[labels == 3] = 255  # ignore
    out = soft_target(labels, (8 // f,) * dims, num_classes=C, dense=False)
    cells = _blocks(labels, f)
    valid = (cells < C).sum(-1)
    for c in range(C):
        share = (cells == c).sum(-1) / valid.clamp_min(1)
        torch.testing.assert_close(out[:, c], share.float(), rtol=1e-6, atol=1e-7)
    assert out.shape == (2, C, *(8 // f,) * dims)
    sums = out.sum(1)
    torch.testing.assert_close(sums[valid > 0], torch.ones_like(sums[valid > 0]))
    assert torch.equal(sums[valid == 0], torch.zeros_like(sums[valid == 0]))


def test_soft_target_of_an_all_ignored_cell_is_zero_and_loss_is_finite() -> None:
    labels = torch.tensor([[[255, 255, 1, 0], [255, 255, 1, 1]]])
    out = soft_target(labels, (1, 2), num_classes=2, dense=False)
    assert out[0, :, 0, 0].tolist() == [0.0, 0.0]
    assert out[0, :, 0, 1].tolist() == [0.25, 0.75]
    loss = F.cross_entropy(torch.randn(1, 2, 1, 2, requires_grad=True), out)
    assert torch.isfinite(loss)


def test_soft_dense_target_is_the_cell_mean_in_the_predictions_dtype() -> None:
    probs = torch.rand(2, 3, 6, 6).softmax(1)
    pred = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    _, small = reconcile(
        pred, probs.double(), resize="target", align_corners=False, tap="x", interpolation="soft"
    )
    assert small.dtype == torch.float64
    torch.testing.assert_close(small, F.avg_pool2d(probs.double(), 2))
    _, from_ints = reconcile(
        pred, torch.zeros(2, 6, 6, dtype=torch.long), resize="target", align_corners=False,
        tap="x", interpolation="soft",
    )  # fmt: skip
    assert from_ints.dtype == torch.float64
    assert torch.equal(from_ints[:, 0], torch.ones(2, 3, 3, dtype=torch.float64))


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.float32], ids=str)
def test_max_of_dense_masks_marks_any_positive_pixel(dims: int, dtype: torch.dtype) -> None:
    masks = torch.rand(2, 2, *(8,) * dims) > 0.97  # sparse multi-label masks
    out = max_target(masks.to(dtype), (2,) * dims, num_classes=2, dense=True)
    ref = torch.stack([_blocks(masks[:, c], 4).any(-1) for c in range(2)], 1)
    assert out.dtype == dtype
    assert torch.equal(out.bool(), ref)


def test_max_of_class_indices_keeps_the_highest_valid_class() -> None:
    labels = torch.tensor([[0, 0, 2, 0, 1, 255, 255, 255, -100, -100]])
    out = max_target(labels, (5,), num_classes=3, dense=False)
    assert out.tolist() == [[0, 2, 1, 255, -100]]
    assert out.dtype == labels.dtype


@pytest.mark.parametrize("mode", ["soft", "max"])
def test_one_voxel_lesion_survives_to_a_quarter_scale(mode: str) -> None:
    labels = torch.zeros(1, 16, 16, 16, dtype=torch.long)
    labels[0, 5, 9, 14] = 2
    _, near = reconcile(torch.randn(1, 3, 4, 4, 4), labels, resize="target",
                        align_corners=False, tap="x")  # fmt: skip
    _, small = reconcile(
        torch.randn(1, 3, 4, 4, 4), labels, resize="target", align_corners=False, tap="x",
        interpolation=mode,
    )  # fmt: skip
    assert not (near == 2).any()
    lesion = small[0, 2] if mode == "soft" else small[0] == 2
    assert lesion[1, 2, 3] > 0 and int((lesion > 0).sum()) == 1
    if mode == "soft":
        assert float(small[0, 2, 1, 2, 3]) == pytest.approx(1 / 64)


def test_non_integer_ratio_cells_cover_every_pixel() -> None:
    labels = torch.zeros(1, 10, dtype=torch.long)
    for i in range(10):
        labels[0, i] = 1
        assert (max_target(labels, (3,), num_classes=2, dense=False) == 1).any()
        assert soft_target(labels, (3,), num_classes=2, dense=False)[0, 1].sum() > 0
        labels[0, i] = 0


def test_pooling_rules_need_three_or_fewer_spatial_dims() -> None:
    with pytest.raises(TargetError, match=r"interpolation='max' pools over 1 to 3 spatial dims"):
        reconcile(
            torch.randn(1, 2, 2, 2, 2, 2), torch.zeros(1, 4, 4, 4, 4, dtype=torch.long),
            resize="target", align_corners=False, tap="x", interpolation="max",
        )  # fmt: skip


# settings -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("resize", "interpolation", "expected"),
    [("prediction", None, "linear"), ("target", None, "nearest"), (None, None, None),
     ("prediction", "area", "area"), ("target", "max", "max")],
)  # fmt: skip
def test_interpolation_defaults_by_resize(resize: Any, interpolation: Any, expected: Any) -> None:
    assert check_interpolation(resize, interpolation) == expected


@pytest.mark.parametrize(
    ("resize", "interpolation", "match"),
    [
        ("prediction", "soft", r"'soft' is not a mode of resize='prediction' \('soft' is a mode "
         r"of resize='target'\)"),
        ("target", "bicubic", r"'bicubic' is not a mode of resize='target'"),
        ("target", "cubic", r"interpolation='cubic' is not a mode .* choose one of"),
        (None, "nearest", r"interpolation='nearest' has no effect with resize=None"),
    ],
    ids=["soft-on-prediction", "bicubic-on-target", "unknown", "resize-none"],
)  # fmt: skip
def test_bad_interpolation_is_a_config_error(resize: Any, interpolation: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        check_interpolation(resize, interpolation)
    with pytest.raises(ValueError, match=match):  # ConfigError is a ValueError too
        DeepSupervision(
            nn.Sequential(nn.Conv2d(1, 2, 1)), "0", head=nn.Conv2d(2, 2, 1), resize=resize,
            interpolation=interpolation,
        )  # fmt: skip


class _TwoScales(nn.Module):
    """Features at 1/2 (``a``, ``b``) and 1/4 (``c``) of an 8x8 input, and a full-size output."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.c = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.out = nn.Conv2d(1, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.c(self.b(self.a(x)))
        return self.out(x)


def test_tap_interpolation_overrides_the_wrappers_and_losses_match_by_hand() -> None:
    torch.manual_seed(0)
    model = _TwoScales()
    taps = {
        "a": Tap(0.5, interpolation="soft"),
        "b": Tap(0.5, resize="prediction", interpolation="nearest"),
        "c": 0.25,
    }
    sup = DeepSupervision(model, taps, head=nn.Conv2d(4, 3, 1), criterion=F.cross_entropy,
                          resize="target", interpolation="max")  # fmt: skip
    assert {n: t.interpolation for n, t in sup.taps.items()} == {
        "a": "soft", "b": "nearest", "c": "max",
    }  # fmt: skip
    x, y = torch.randn(2, 1, 8, 8), torch.randint(0, 3, (2, 8, 8))
    _, aux = sup(x, target=y)
    fa = model.a(x)
    fb = model.b(fa)
    fc = model.c(fb)
    heads = sup.heads
    soft = soft_target(y, (4, 4), num_classes=3, dense=False)
    most = max_target(y, (2, 2), num_classes=3, dense=False)
    ref = {
        "a": 0.5 * F.cross_entropy(heads["a"](fa), soft),
        "b": 0.5 * F.cross_entropy(F.interpolate(heads["b"](fb), size=(8, 8)), y),
        "c": 0.25 * F.cross_entropy(heads["c"](fc), most),
    }
    for name, value in ref.items():
        torch.testing.assert_close(aux[name], value)


def test_taps_at_the_same_scale_share_one_downsampled_target() -> None:
    seen: list[tuple[str, torch.Tensor]] = []

    def criterion(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        seen.append((str(tuple(pred.shape[2:])), target))
        return F.cross_entropy(pred, target)

    for mode in ("nearest", "nearest-exact", "max", "soft"):
        seen.clear()
        sup = DeepSupervision(_TwoScales(), ["a", "b", "c"], head=nn.Conv2d(4, 3, 1),
                              criterion=criterion, resize="target", interpolation=mode)  # fmt: skip
        y = torch.randint(0, 3, (2, 8, 8))
        sup(torch.randn(2, 1, 8, 8), target=y)
        (sa, ta), (sb, tb), (sc, tc) = seen
        assert sa == sb != sc
        assert ta is tb, mode  # a and b share the 4x4 target
        assert tc is not ta and tc.shape[-1] == 2
        seen.clear()
        sup(torch.randn(2, 1, 8, 8), target=y)
        assert seen[0][1] is not ta  # nothing survives into the next forward


def test_dict_targets_and_every_mode_train_end_to_end() -> None:
    model = _TwoScales()
    for mode, pair in itertools.product(("nearest", "nearest-exact", "soft", "max"), [False, True]):
        sup = DeepSupervision(
            model,
            ["a", "c"],
            head=nn.Conv2d(4, 3, 1),
            criterion=F.cross_entropy,
            resize="target",
            interpolation=mode,
        )
        y = torch.randint(0, 3, (2, 8, 8))
        target: Any = {"a": y, "c": y.clone()} if pair else y
        _, aux = sup(torch.randn(2, 1, 8, 8), target=target)
        total = sum(aux.values())
        total.backward()
        assert all(p.grad is not None for p in sup.heads.parameters())
        assert torch.isfinite(total)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["nearest-exact", "soft", "max"])
def test_target_modes_compile_in_one_graph(mode: str) -> None:
    sup = DeepSupervision(
        _TwoScales(),
        ["a", "b", "c"],
        head=nn.Conv2d(4, 3, 1),
        criterion=F.cross_entropy,
        resize="target",
        interpolation=mode,
    )
    x, y = torch.randn(2, 1, 8, 8), torch.randint(0, 3, (2, 8, 8))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(sup)(x, target=y)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    compiled = torch.compile(sup, backend="eager")
    _, aux = compiled(x, target=y)
    _, ref = sup(x, target=y)
    for name in ref:
        torch.testing.assert_close(aux[name], ref[name])


# with explicit layouts and ignore labels ----------------------------------------------------


class _ToNHWC(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.movedim(1, -1)


@pytest.mark.parametrize("mode", ["nearest", "nearest-exact", "soft", "max"])
@pytest.mark.parametrize("dense", [False, True], ids=["labels", "dense"])
def test_nhwc_predictions_get_their_targets_in_their_layout(mode: str, dense: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), _ToNHWC(), nn.Flatten())
    seen: list[torch.Tensor] = []

    def criterion(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        seen.append(target)
        t = target.movedim(-1, 1) if target.dim() == pred.dim() else target
        return F.cross_entropy(pred.movedim(-1, 1), t.float() if dense else t)

    sup = DeepSupervision(model, {"1": Tap(1.0, layout="NHWC")}, head=nn.Linear(4, 3),
                          criterion=criterion, resize="target", interpolation=mode)  # fmt: skip
    y = torch.randint(0, 3, (2, 8, 8))
    target = F.one_hot(y, 3) if dense else y  # dense: (B, H, W, K), the prediction's layout
    x = torch.randn(2, 1, 8, 8)
    _, aux = sup(x, target=target)
    pred = sup.heads["1"](model[1](model[0](x)))
    assert pred.shape == (2, 4, 4, 3)
    if mode == "nearest":
        small = target[:, ::2, ::2]
    elif mode == "nearest-exact":
        small = target[:, 1::2, 1::2]
    elif mode == "soft":
        small = soft_target(
            target.movedim(-1, 1) if dense else target, (4, 4), num_classes=3, dense=dense
        ).movedim(1, -1)
    else:
        small = max_target(
            target.movedim(-1, 1) if dense else target, (4, 4), num_classes=3, dense=dense
        )
        small = small.movedim(1, -1) if dense else small
    torch.testing.assert_close(seen[0], small)
    torch.testing.assert_close(aux["1"], criterion(pred, small))


def test_the_pyramid_keeps_taps_with_other_ignore_labels_apart() -> None:
    seen: dict[str, torch.Tensor] = {}

    def recorder(name: str) -> Any:
        def criterion(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            seen[name] = target
            return F.cross_entropy(pred, target, ignore_index=255)

        return criterion

    # a and b have the same scale and rule; only their ignore labels differ
    taps = {
        "a": Tap(0.5, criterion=recorder("a"), ignore_index=255),
        "b": Tap(0.5, criterion=recorder("b"), ignore_index=None),
    }
    sup = DeepSupervision(_TwoScales(), taps, head=nn.Conv2d(4, 3, 1), resize="target")
    y = torch.randint(0, 3, (2, 8, 8))
    y[..., ::2] = 255  # every other column ignored: plain nearest picks only ignored pixels
    sup(torch.randn(2, 1, 8, 8), target=y)
    assert (seen["b"] == 255).all()
    torch.testing.assert_close(seen["a"], y[:, ::2, 1::2])  # ignore-aware: each cell's valid


def test_tap_interpolation_is_checked_at_construction() -> None:
    assert Tap(interpolation=None) == Tap()  # None is "inherit", as for the other fields
    with pytest.raises(ConfigError, match="'bogus'"):
        Tap(interpolation="bogus")
    with pytest.raises(ConfigError, match="resize='target'"):
        Tap(resize="prediction", interpolation="soft")
    with pytest.raises(ConfigError, match="no effect with resize=None"):
        Tap(resize=None, interpolation="nearest")
