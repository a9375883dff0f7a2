"""The core's rules against direct computations: the shared target cache, the teacher's layout,
the target rules next to an ignore label, thresholds equal to a confidence, the calibration's
cost accounting (each found missing by a mutation of tools/mutate.py)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import ReuseModel
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from deepsup import DeepSupervision, EarlyExit, Tap, heads, multiscale
from deepsup import functional as DF
from deepsup.exits import ExitCosts, search_thresholds, top1
from deepsup.losses import SelfDistillation

# --------------------------------------------------------------- the shared target cache


def _fresh(target: torch.Tensor, pred: torch.Tensor, layout: Any, **kw: Any) -> torch.Tensor:
    """The target reconcile gives ``pred`` without a cache."""
    return DF.reconcile(pred, target, layout=layout, resize="target", **kw)[1]


@pytest.mark.parametrize(
    ("first", "second"),
    [
        # the same prediction size, another ignore label
        (
            {"pred": torch.zeros(1, 3, 2, 2), "ignore_index": 255},
            {"pred": torch.zeros(1, 3, 2, 2), "ignore_index": None},
        ),
        # the same spatial size, the other layout ("soft" gives the prediction's layout)
        (
            {"pred": torch.zeros(1, 3, 2, 2), "interpolation": "soft"},
            {"pred": torch.zeros(1, 2, 2, 3), "interpolation": "soft", "layout": "NHWC"},
        ),
        # another class count ("soft" and "max" read it)
        (
            {"pred": torch.zeros(1, 3, 2, 2), "interpolation": "soft"},
            {"pred": torch.zeros(1, 4, 2, 2), "interpolation": "soft"},
        ),
        (
            {"pred": torch.zeros(1, 3, 2, 2), "interpolation": "max"},
            {"pred": torch.zeros(1, 2, 2, 2), "interpolation": "max"},
        ),
        # another dtype ("soft" gives the prediction's)
        (
            {"pred": torch.zeros(1, 3, 2, 2), "interpolation": "soft"},
            {"pred": torch.zeros(1, 3, 2, 2, dtype=torch.float64), "interpolation": "soft"},
        ),
    ],
)
def test_the_target_cache_is_keyed_by_every_setting_that_changes_the_target(
    first: dict[str, Any], second: dict[str, Any]
) -> None:
    target = torch.tensor([[[255, 1, 255, 2], [255, 2, 255, 2], [0, 0, 1, 1], [2, 0, 1, 1]]])
    pyramid: dict[Any, torch.Tensor] = {}
    for taps in (first, second):
        kw = dict(taps)
        pred = kw.pop("pred")
        layout = kw.pop("layout", "NCHW")
        cached = DF.reconcile(pred, target, layout=layout, resize="target", pyramid=pyramid, **kw)[
            1
        ]
        fresh = _fresh(target, pred, layout, **kw)
        assert cached.dtype == fresh.dtype and torch.equal(cached, fresh)
    assert len(pyramid) == 2


def test_two_taps_of_one_size_share_the_cached_target() -> None:
    target = torch.randint(0, 3, (2, 8, 8))
    pyramid: dict[Any, torch.Tensor] = {}
    a = DF.reconcile(torch.zeros(2, 3, 4, 4), target, resize="target", pyramid=pyramid)[1]
    b = DF.reconcile(torch.ones(2, 3, 4, 4), target, resize="target", pyramid=pyramid)[1]
    assert a is b and len(pyramid) == 1
    assert torch.equal(a, target[:, ::2, ::2])


# --------------------------------------------------------------------------- the teacher


def test_a_larger_channels_last_teacher_is_downsampled_by_nearest_indexing() -> None:
    out = torch.randn(2, 8, 8, 3)  # (B, H, W, K)
    t = DF.teacher_like(out, torch.zeros(2, 4, 4, 3), layout="NHWC")
    assert torch.equal(t, out[:, ::2, ::2, :])
    t = DF.teacher_like(out.movedim(-1, 1), torch.zeros(2, 3, 4, 4))
    assert torch.equal(t, out.movedim(-1, 1)[:, :, ::2, ::2])


def test_a_smaller_channels_last_teacher_is_interpolated_per_class() -> None:
    out = torch.randn(2, 2, 2, 3)
    t = DF.teacher_like(out, torch.zeros(2, 4, 4, 3), layout="NHWC", align_corners=True)
    want = F.interpolate(out.movedim(-1, 1), size=(4, 4), mode="bilinear", align_corners=True)
    torch.testing.assert_close(t, want.movedim(1, -1), rtol=0, atol=0)


def test_self_distillation_takes_the_classes_where_the_layout_says() -> None:
    torch.manual_seed(0)
    pred, teacher = torch.randn(2, 5, 4), torch.randn(2, 5, 4)  # tokens (B, N, K)
    target = torch.randint(0, 4, (2, 5))
    loss = SelfDistillation(nn.CrossEntropyLoss(), temperature=2.0, alpha=0.25)
    got = loss(pred, target, teacher=teacher, layout="NHWC")
    p, q = pred.movedim(-1, 1), teacher.movedim(-1, 1)
    hard = F.cross_entropy(p, target)
    kl = F.kl_div(
        F.log_softmax(p / 2, 1), F.log_softmax(q / 2, 1), log_target=True, reduction="none"
    )
    soft = 4 * kl.sum(1).mean()
    torch.testing.assert_close(got, 0.75 * hard + 0.25 * soft)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_distillation_kl_is_t_squared_times_kl_teacher_to_student(temperature: float) -> None:
    torch.manual_seed(1)
    p, q = torch.randn(3, 5), torch.randn(3, 5)
    got = DF.distillation_kl(p, q, temperature)
    log_p, log_q = F.log_softmax(p / temperature, 1), F.log_softmax(q / temperature, 1)
    want = temperature**2 * (log_q.exp() * (log_q - log_p)).sum(1).mean()
    torch.testing.assert_close(got, want)


# --------------------------------------------------- target rules next to an ignore label


def test_max_keeps_class_0_beside_ignored_pixels() -> None:
    t = torch.tensor([[0, 255, 255, 255, 1, 0]])
    got = DF.downsample(t, (3,), "max", num_classes=3, ignore_index=255)
    assert torch.equal(got, torch.tensor([[0, 255, 1]]))


def test_an_ignore_label_inside_the_class_range_is_left_out_of_max_and_soft() -> None:
    # ignore_index=2 is also a class index < num_classes: it must still be ignored
    t = torch.tensor([[1, 2, 2, 2, 0, 0]])
    got = DF.downsample(t, (3,), "max", num_classes=3, ignore_index=2)
    assert torch.equal(got, torch.tensor([[1, 2, 0]]))
    soft = DF.downsample(t, (3,), "soft", num_classes=3, ignore_index=2)
    want = torch.tensor([[[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    assert torch.equal(soft, want)


def test_labels_at_num_classes_are_ignore_labels_for_max() -> None:
    t = torch.tensor([[1, 3, 3, 3]])
    got = DF.downsample(t, (2,), "max", num_classes=3)
    assert torch.equal(got, torch.tensor([[1, 3]]))


def test_soft_gives_zeros_for_a_cell_without_valid_pixels() -> None:
    t = torch.tensor([[255, 255, 1, 0]])
    got = DF.downsample(t, (2,), "soft", num_classes=2, ignore_index=255)
    assert torch.equal(got, torch.tensor([[[0.0, 0.5], [0.0, 0.5]]]))


def _nearest_labels_by_hand(t: torch.Tensor, size: tuple[int, int], ignore: int) -> torch.Tensor:
    """The ignore-aware nearest rule, pixel by pixel: pick floor(i * in / out); where that is
    the ignore label, the first valid label of the cell in raster order."""
    B, H, W = t.shape
    h, w = size
    out = torch.empty(B, h, w, dtype=t.dtype)
    for b in range(B):
        for i in range(h):
            for j in range(w):
                r0, r1 = i * H // h, (i + 1) * H // h
                c0, c1 = j * W // w, (j + 1) * W // w
                value = int(t[b, r0, c0])
                if value == ignore:
                    cell = [int(v) for v in t[b, r0:r1, c0:c1].flatten() if int(v) != ignore]
                    value = cell[0] if cell else ignore
                out[b, i, j] = value
    return out


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 7),
    cols=st.integers(1, 7),
    h=st.integers(1, 7),
    w=st.integers(1, 7),
    seed=st.integers(0, 2**16),
)
def test_ignore_aware_nearest_equals_the_rule_by_hand(
    rows: int, cols: int, h: int, w: int, seed: int
) -> None:
    h, w = min(h, rows), min(w, cols)
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 3, (2, rows, cols), generator=g)
    t[torch.rand(2, rows, cols, generator=g) < 0.5] = 255
    got = DF.downsample(t, (h, w), ignore_index=255)
    assert torch.equal(got, _nearest_labels_by_hand(t, (h, w), 255))


# ------------------------------------------------------------------- the class axis


def test_soft_targets_for_channels_last_predictions_have_their_class_count() -> None:
    target = torch.randint(0, 3, (2, 8, 8))
    pred = torch.zeros(2, 4, 4, 3)  # (B, H, W, K), K != H
    _, small = DF.reconcile(pred, target, layout="NHWC", resize="target", interpolation="soft")
    want = DF.downsample(target, (4, 4), "soft", num_classes=3, layout="NHWC")
    assert small.shape == (2, 4, 4, 3) and torch.equal(small, want)


def test_a_dense_channels_last_target_is_downsampled_over_its_positions() -> None:
    t = torch.randn(2, 4, 6, 3)
    got = DF.downsample(t, (2, 3), layout="NHWC")
    assert torch.equal(got, t[:, ::2, ::2, :])


def test_a_dense_target_moves_with_the_prediction_to_the_criterions_layout() -> None:
    torch.manual_seed(2)
    pred, probs = torch.randn(2, 5, 3), torch.rand(2, 5, 3).softmax(-1)
    got = DF.call_criterion(nn.CrossEntropyLoss(), pred, probs, layout="NHWC")
    torch.testing.assert_close(got, F.cross_entropy(pred.movedim(-1, 1), probs.movedim(-1, 1)))


def test_a_layout_aware_criterion_is_told_the_layout_it_receives() -> None:
    class Recorder:
        layout = "NCHW"  # it wants classes at dim 1
        wants_layout = True

        def __init__(self) -> None:
            self.seen: Any = None

        def __call__(self, pred: torch.Tensor, target: Any, *, layout: str) -> torch.Tensor:
            self.seen = (tuple(pred.shape), layout)
            return pred.sum()

    crit = Recorder()
    DF.call_criterion(crit, torch.zeros(2, 5, 3), torch.zeros(2, 5), layout="NHWC")
    assert crit.seen == ((2, 3, 5), "NCHW")


def test_weighted_half_and_bfloat16_losses_round_as_a_python_scalar_weight() -> None:
    for dtype in (torch.float16, torch.bfloat16):
        loss = torch.tensor(3.0, dtype=dtype)
        got = DF.weighted(loss, torch.tensor(0.4, dtype=torch.float64))
        assert got.dtype == dtype and torch.equal(got, loss * 0.4)


@pytest.mark.parametrize("kind", ["max_softmax", "margin", "entropy"])
def test_a_single_negative_logit_is_as_confident_as_its_positive(kind: str) -> None:
    z = torch.tensor([[-3.0], [3.0], [0.5]])
    conf = DF.confidence(z, kind)
    torch.testing.assert_close(conf[0], conf[1])
    two = torch.cat([torch.zeros_like(z), -z], dim=1)  # softmax([0, -z]) = (sigmoid z, ...)
    torch.testing.assert_close(conf, DF.confidence(two, kind))


def test_entropy_confidence_is_0_for_uniform_and_1_for_one_hot() -> None:
    conf = DF.confidence(torch.tensor([[0.0, 0.0, 0.0, 0.0], [1e4, 0.0, 0.0, 0.0]]), "entropy")
    torch.testing.assert_close(conf, torch.tensor([0.0, 1.0]))


# --------------------------------------------------------------- exits and calibration


def test_an_exit_fires_at_a_threshold_equal_to_its_confidence() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    sup = DeepSupervision(model, "0", head=heads.classification(3))
    early = EarlyExit(sup, threshold=math.inf)
    x = torch.randn(1, 4)
    with torch.no_grad():
        conf = float(DF.confidence(sup.heads["0"](model[0](x))))
    early.thresholds = {"0": conf}
    assert early(x)[1] == "0"
    early.thresholds = {"0": conf + 1e-6}
    assert early(x)[1] == "output"


def test_the_search_lets_samples_exit_at_a_confidence_equal_to_the_threshold() -> None:
    conf = torch.full((1, 4), 0.5, dtype=torch.float64)  # every candidate is 0.5 or off
    score = torch.ones(2, 4)
    costs = ExitCosts(["a"], prefix={"a": 10}, head={"a": 1}, full=100)
    assert search_thresholds(conf, score, costs, max_drop=0.0) == {"a": 0.5}


def test_the_search_counts_an_exits_head_once() -> None:
    # exiting at a costs 10 + 15 = 25 < 30 (the model alone): worth it
    conf = torch.full((1, 4), 0.9, dtype=torch.float64)
    score = torch.ones(2, 4)
    costs = ExitCosts(["a"], prefix={"a": 10}, head={"a": 15}, full=30)
    assert search_thresholds(conf, score, costs, max_drop=0.0) == {"a": 0.9}


def test_the_search_does_not_charge_the_heads_of_exits_that_are_off() -> None:
    # exiting at a costs 25 + 10 = 35 > 30: not worth it, whatever b's (off) head would cost
    conf = torch.tensor([[0.9] * 4, [0.1] * 4], dtype=torch.float64)
    score = torch.stack([torch.ones(4), torch.zeros(4), torch.ones(4)])
    costs = ExitCosts(["a", "b"], prefix={"a": 25, "b": 28}, head={"a": 10, "b": 100}, full=30)
    assert search_thresholds(conf, score, costs, max_drop=0.0) == {"a": math.inf, "b": math.inf}


def test_a_path_runs_the_heads_of_the_exits_that_are_on_and_no_other() -> None:
    costs = ExitCosts(
        ["a", "b", "c"], prefix={"a": 1, "b": 2, "c": 3}, head={"a": 10, "b": 20, "c": 30}, full=100
    )
    thresholds = {"a": math.inf, "b": 0.5, "c": 0.5}
    assert costs.path("c", thresholds) == {"b": "never", "c": "always"}
    assert costs.path_flops("c", thresholds) == 3 + 20 + 30
    assert costs.path_flops("output", thresholds) == 100 + 20 + 30
    assert costs.path_flops("output", {"a": math.inf}) == 100


def test_evaluate_scores_per_token_exits_along_their_class_axis() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))  # (B, N, 5) -> (B, N, 3)
    head = nn.Linear(8, 3)  # per-token logits (B, N, 3): classes last
    early = EarlyExit(DeepSupervision(model, "0", head=head), threshold=0.0)
    data = [(torch.randn(1, 4, 5), torch.randint(0, 3, (1, 4))) for _ in range(3)]
    table = early.evaluate(data)
    with torch.no_grad():
        hits = [(head(model[0](x)).argmax(-1) == y).float().mean() for x, y in data]
    assert table.rows[0].share == 1.0
    assert table.accuracy == pytest.approx(float(torch.stack(hits).mean()))


def test_multiscale_downsample_is_ignore_aware() -> None:
    t = torch.tensor([[255, 3, 255, 4]])
    assert torch.equal(multiscale.downsample(t, (2,), ignore_index=255), torch.tensor([[3, 4]]))
    assert torch.equal(multiscale.downsample(t, (2,)), torch.tensor([[255, 255]]))


def test_the_dry_run_leaves_batchnorm_statistics_untouched() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    model.train()
    sup = DeepSupervision(
        model, "2", head=heads.seg(2), example_input=torch.randn(2, 3, 8, 8) * 5 + 3
    )
    bn = sup.model[1]
    assert torch.equal(bn.running_mean, torch.zeros(4))
    assert torch.equal(bn.running_var, torch.ones(4))
    assert int(bn.num_batches_tracked) == 0 and model.training and bn.training


def test_a_head_that_changes_the_layout_is_scored_in_its_output_layout() -> None:
    torch.manual_seed(5)
    # channels-last maps (B, H, W, C); heads.seg takes them and gives (B, K, H, W)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 4))
    sup = DeepSupervision(
        model, {"1": 0.5}, head=heads.seg(4, dropout=0.0), criterion=nn.CrossEntropyLoss()
    )
    x, y = torch.randn(2, 6, 5, 3), torch.randint(0, 4, (2, 6, 5))
    _, aux = sup(x, target=y)
    head = sup.heads["1"]
    pred = head(torch.relu(model[0](x)))
    assert pred.shape == (2, 4, 6, 5)
    torch.testing.assert_close(aux["1"], 0.5 * F.cross_entropy(pred, y))


def test_calls_first_exits_never_run_the_head_on_a_later_call() -> None:
    torch.manual_seed(6)
    sup = DeepSupervision(
        ReuseModel(), {"shared": Tap(calls="first")}, head=heads.classification(2)
    )
    seen: list[int] = []

    def sure_on_the_second_call(pred: torch.Tensor) -> torch.Tensor:
        seen.append(len(seen))
        return torch.full((pred.shape[0],), float(len(seen) > 1))

    early = EarlyExit(sup, threshold=0.5, confidence=sure_on_the_second_call)
    x = torch.randn(2, 4)
    pred, name = early(x)
    assert name == "output" and seen == [0] and torch.equal(pred, sup.model(x))


def test_tap_layout_is_taken_as_given_over_the_heads_declaration() -> None:
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    # heads.tokens declares NHWC input; the tap's own declaration decides
    sup = DeepSupervision(model, {"0": Tap(layout="NCHW")}, head=heads.tokens(3))
    assert sup.taps["0"].layout == "NCHW"
    sup = DeepSupervision(model, {"0": Tap()}, head=heads.tokens(3))
    assert sup.taps["0"].layout == "NHWC"


def test_max_drop_is_absolute_accuracy_points() -> None:
    conf = torch.full((1, 4), 0.9, dtype=torch.float64)
    score = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])  # exit 0.25, model 0.5
    costs = ExitCosts(["a"], prefix={"a": 10}, head={"a": 1}, full=100)
    assert search_thresholds(conf, score, costs, max_drop=0.25) == {"a": 0.9}
    assert search_thresholds(conf, score, costs, max_drop=0.24) == {"a": math.inf}


class _ChannelsLastStage(nn.Module):
    """A timm-like model: its stage has Conv layers but returns NHWC maps (output_fmt)."""

    output_fmt = "NHWC"

    def __init__(self) -> None:
        super().__init__()
        self.stage = nn.Sequential(nn.Conv2d(3, 8, 1), _ToChannelsLast())
        self.feature_info = [{"module": "stage", "num_chs": 8}]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage(x).mean((1, 2))


class _ToChannelsLast(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


def test_output_fmt_decides_the_layout_of_a_feature_info_stage() -> None:
    sup = DeepSupervision(_ChannelsLastStage(), "stage", head=heads.seg(2))
    assert sup.taps["stage"].layout == "NHWC"
    assert sup.heads["stage"].conv.in_channels == 8


def test_top1_of_a_single_logit_is_its_sign() -> None:
    got = top1(torch.tensor([[2.0], [-1.0], [0.5]]), torch.tensor([1, 0, 0]))
    assert torch.equal(got, torch.tensor([1.0, 1.0, 0.0]))


def test_a_tap_with_resize_none_does_not_inherit_the_wrappers_interpolation() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    taps = {"0": Tap(resize=None), "1": 0.4}
    sup = DeepSupervision(model, taps, head=heads.seg(2), resize="target", interpolation="max")
    assert sup.taps["0"].interpolation is None and sup.taps["1"].interpolation == "max"


def test_calibrate_measures_flops_per_sample_on_one_sample() -> None:
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    early = EarlyExit(DeepSupervision(model, "0", head=heads.classification(3)))
    data = [(torch.randn(4, 4), torch.randint(0, 3, (4,)))]
    table = early.calibrate(data, max_drop=1.0, timing_runs=1)
    assert table.full_flops == early.costs(data[0][0][:1]).full == 2 * (4 * 8 + 8 * 3)
