"""DeepSupervision: eval passthrough, training losses and gradients, copies, threads."""

from __future__ import annotations

import copy
import dataclasses
import io
import re
import threading

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from conftest import TinyCNN, bare_copy
from torch import nn

from deepsup import DeepSupervision, Tap, heads, schedules
from deepsup._names import resolve_taps
from deepsup.errors import TapNotFoundError
from deepsup.wrapper import AuxLosses


def _count_head_calls(sup: DeepSupervision) -> list[int]:
    calls = [0]

    def pre_hook(module: nn.Module, args: object) -> None:
        calls[0] += 1

    for h in sup.heads.values():
        h.register_forward_pre_hook(pre_hook)
    return calls


# eval passthrough -----------------------------------------------------------------------------


EVAL_MODELS = {
    "torchvision-resnet18": (lambda: torchvision.models.resnet18(num_classes=7), "layer3"),
    "torchvision-mobilenet_v3_small": (
        lambda: torchvision.models.mobilenet_v3_small(num_classes=7),
        "features.6",
    ),
    "timm-resnet18": (lambda: timm.create_model("resnet18", num_classes=7), "layer3"),
    "tiny-cnn": (TinyCNN, "stage1"),
}


@pytest.mark.parametrize("name", list(EVAL_MODELS), ids=list(EVAL_MODELS))
@pytest.mark.parametrize("with_target", [False, True], ids=["no-target", "target"])
def test_eval_is_bit_identical_to_bare_model_and_runs_no_head(name: str, with_target: bool) -> None:
    build, tap = EVAL_MODELS[name]
    model = build().eval()
    bare = bare_copy(model)
    sup = DeepSupervision(
        model, {tap: 0.4}, head=heads.seg(7), criterion=nn.CrossEntropyLoss(), clone=True
    ).eval()
    calls = _count_head_calls(sup)
    x = torch.randn(2, 3, 64, 64)
    kwargs = {"target": torch.zeros(2, dtype=torch.long)} if with_target else {}
    out = sup(x, **kwargs)
    ref = bare(x)
    assert type(out) is type(ref)
    assert torch.equal(out, ref)
    assert calls[0] == 0
    assert sup._capture.records() is None


class DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.fc(x), "aux": x}


class TupleOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h = self.fc(x)
        return h, [h.relu(), x]


@pytest.mark.parametrize("build", [DictOut, TupleOut], ids=["dict", "tuple-with-list"])
def test_eval_returns_the_models_own_object_types(build: type[nn.Module]) -> None:
    model = build()
    bare = bare_copy(model)
    sup = DeepSupervision(model, "fc", head=heads.classification(2)).eval()
    x = torch.randn(2, 3)
    out, ref = sup(x), bare(x)  # the reference is an unhooked copy, not the wrapped model
    _assert_same_objects(out, ref)


def _assert_same_objects(out: object, ref: object) -> None:
    """The same container types, keys and nesting, and bit-identical tensors."""
    assert type(out) is type(ref)
    if isinstance(ref, dict):
        assert isinstance(out, dict) and list(out) == list(ref)
        for k in ref:
            _assert_same_objects(out[k], ref[k])
    elif isinstance(ref, (tuple, list)):
        assert isinstance(out, (tuple, list)) and len(out) == len(ref)
        for a, b in zip(out, ref):
            _assert_same_objects(a, b)
    else:
        assert isinstance(out, torch.Tensor) and isinstance(ref, torch.Tensor)
        assert torch.equal(out, ref)


def test_eval_output_keeps_autograd_and_gradients_equal_a_bare_copy(tiny_cnn: TinyCNN) -> None:
    bare = bare_copy(tiny_cnn).eval()
    sup = DeepSupervision(tiny_cnn, "stage1", head=heads.seg(3), clone=True).eval()
    x = torch.randn(2, 3, 16, 16)
    out = sup(x)
    assert out.requires_grad and out.grad_fn is not None  # eval is not run under no_grad
    out.square().mean().backward()
    bare(x).square().mean().backward()
    for (n, p), (_, q) in zip(tiny_cnn.named_parameters(), bare.named_parameters(), strict=True):
        assert p.grad is not None, n
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=n)
    assert all(p.grad is None for p in sup.heads.parameters())  # no head ran


# training forward: losses and gradients --------------------------------------------------------


def test_training_aux_loss_equals_hand_computation(tiny_cnn: TinyCNN) -> None:
    sup = DeepSupervision(
        tiny_cnn,
        {"stage1": 0.4, "stage2": Tap(0.25, align_corners=True)},
        head=heads.seg(3, dropout=0.0),
        criterion=nn.CrossEntropyLoss(ignore_index=255),
        clone=True,
    ).train()
    x = torch.randn(2, 3, 16, 16)
    y = torch.randint(0, 3, (2, 16, 16))
    y[:, 0] = 255
    feats: dict[str, torch.Tensor] = {}
    tiny_cnn.stage1.register_forward_hook(lambda m, a, o: feats.__setitem__("stage1", o.clone()))
    tiny_cnn.stage2.register_forward_hook(lambda m, a, o: feats.__setitem__("stage2", o.clone()))
    out, aux = sup(x, target=y)
    assert isinstance(aux, AuxLosses)
    assert list(aux) == ["stage1", "stage2"]
    # the heads' BN runs in training mode on the same batch, so a functional replay matches
    for name, weight, ac in (("stage1", 0.4, False), ("stage2", 0.25, True)):
        pred = sup.heads[name](feats[name])
        pred = F.interpolate(pred, size=(16, 16), mode="bilinear", align_corners=ac)
        raw = F.cross_entropy(pred, y, ignore_index=255)
        torch.testing.assert_close(aux.raw[name], raw)
        torch.testing.assert_close(aux[name], weight * raw)
        assert aux[name].dtype == torch.float32


class HandWrittenAux(nn.Module):
    """The pattern deepsup replaces: the aux branch coded into the model."""

    def __init__(self, model: TinyCNN, head: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.aux = head

    def forward(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m = self.model
        size = x.shape[-2:]
        f1 = m.stage1(m.stem(x))
        aux_pred = self.aux(f1.clone())
        y_main = m.cls(m.stage2(m.act1(f1)))
        main = F.interpolate(y_main, size=size, mode="bilinear", align_corners=False)
        aux_pred = F.interpolate(aux_pred, size=size, mode="bilinear", align_corners=True)
        main_loss = F.cross_entropy(main, y, ignore_index=255)
        aux_loss = F.cross_entropy(aux_pred, y, ignore_index=255)
        return main, main_loss, aux_loss


def test_gradients_equal_a_hand_written_aux_branch() -> None:
    model = TinyCNN().double()
    sup = DeepSupervision(
        model,
        {"stage1": 0.4},
        head=heads.seg(3, dropout=0.0),
        criterion=nn.CrossEntropyLoss(ignore_index=255),
        resize="prediction",
        align_corners=True,
        clone=True,
    ).double()
    ref = HandWrittenAux(copy.deepcopy(model), copy.deepcopy(sup.heads["stage1"])).double()
    x = torch.randn(2, 3, 20, 20, dtype=torch.float64)
    y = torch.randint(0, 3, (2, 20, 20))
    y[:, :, :3] = 255

    out, aux = sup(x, target=y)
    main_loss = F.cross_entropy(out, y, ignore_index=255)
    (main_loss + sum(aux.values())).backward()

    ref_out, ref_main, ref_aux = ref(x, y)
    (ref_main + 0.4 * ref_aux).backward()

    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(aux["stage1"], 0.4 * ref_aux)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.model.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)
    for (n, p), (_, q) in zip(sup.heads["stage1"].named_parameters(), ref.aux.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)


def test_criterion_none_returns_predictions(tiny_cnn: TinyCNN) -> None:
    sup = DeepSupervision(
        tiny_cnn, ["stage1", "stage2"], head=heads.seg(5, dropout=0.0), clone=True
    )
    feats: dict[str, torch.Tensor] = {}
    for name in ("stage1", "stage2"):
        tiny_cnn.get_submodule(name).register_forward_hook(
            lambda m, a, o, name=name: feats.__setitem__(name, o.clone())
        )
    out, preds = sup(torch.randn(2, 3, 16, 16))
    assert list(preds) == ["stage1", "stage2"]
    assert preds["stage1"].shape == (2, 5, 8, 8)  # at the feature's size: no resize, no loss
    assert preds["stage2"].shape == (2, 5, 4, 4)
    for name in preds:
        # the heads' BN runs in training mode on the same batch, so a replay matches
        torch.testing.assert_close(preds[name], sup.heads[name](feats[name]))
        assert preds[name].grad_fn is not None  # predictions keep their graph
    assert sup.weights == {"stage1": 0.4, "stage2": 0.4}  # a bare name gets weight 0.4


def test_tap_resize_overrides_the_wrappers(tiny_cnn: TinyCNN) -> None:
    """A per-tap ``Tap(resize=...)`` wins over the wrapper's ``resize=``, in both directions."""
    ce = nn.CrossEntropyLoss(ignore_index=255)
    sup = DeepSupervision(
        tiny_cnn,
        {"stage1": Tap(1.0, resize="target"), "stage2": Tap(1.0, resize="prediction")},
        head=heads.seg(3, dropout=0.0),
        criterion=ce,
        resize=None,  # would refuse both taps' 16x16 target
        clone=True,
    )
    feats: dict[str, torch.Tensor] = {}
    for name in ("stage1", "stage2"):
        tiny_cnn.get_submodule(name).register_forward_hook(
            lambda m, a, o, name=name: feats.__setitem__(name, o.clone())
        )
    y = torch.randint(0, 3, (2, 16, 16))
    y[:, 1::4] = 255
    _, aux = sup(torch.randn(2, 3, 16, 16), target=y)
    pred1 = sup.heads["stage1"](feats["stage1"])  # 8x8: the target is downsampled by 2
    torch.testing.assert_close(aux.raw["stage1"], ce(pred1, y[:, ::2, ::2]))
    pred2 = sup.heads["stage2"](feats["stage2"])  # 4x4: the prediction is upsampled to 16x16
    up = F.interpolate(pred2, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(aux.raw["stage2"], ce(up, y))


def test_raw_losses_are_detached_and_weighted_losses_are_not(mlp: nn.Module) -> None:
    sup = DeepSupervision(
        mlp,
        {"fc1": 0.5, "fc2": 0.25},
        head=heads.classification(4),
        criterion=nn.CrossEntropyLoss(),
    )
    _, aux = sup(torch.randn(3, 6), target=torch.tensor([0, 1, 2]))
    for name, weight in (("fc1", 0.5), ("fc2", 0.25)):
        assert not aux.raw[name].requires_grad and aux.raw[name].grad_fn is None, name
        assert aux[name].requires_grad, name
        torch.testing.assert_close(aux[name], weight * aux.raw[name])


def test_target_dict_gives_one_target_per_tap(tiny_cnn: TinyCNN) -> None:
    sup = DeepSupervision(
        tiny_cnn,
        ["stage1", "stage2"],
        head=heads.seg(3),
        criterion=nn.CrossEntropyLoss(),
        resize=None,
        clone=True,
    )
    t = {"stage1": torch.randint(0, 3, (2, 8, 8)), "stage2": torch.randint(0, 3, (2, 4, 4))}
    _, aux = sup(torch.randn(2, 3, 16, 16), target=t)
    assert set(aux) == {"stage1", "stage2"}


def test_per_tap_head_and_criterion(mlp: nn.Module) -> None:
    mse = nn.MSELoss()
    sup = DeepSupervision(
        mlp,
        {
            "fc1": Tap(1.0, head=nn.Linear(12, 4), criterion=mse),
            "fc2": Tap(0.5, head=heads.classification(4)),
        },
        criterion=nn.CrossEntropyLoss(),
    )
    x = torch.randn(3, 6)
    y = torch.tensor([0, 1, 3])
    feats: dict[str, torch.Tensor] = {}
    mlp.fc1.register_forward_hook(lambda m, a, o: feats.__setitem__("fc1", o))
    _, aux = sup(x, target={"fc1": torch.zeros(3, 4), "fc2": y})
    torch.testing.assert_close(aux["fc1"], mse(sup.heads["fc1"](feats["fc1"]), torch.zeros(3, 4)))
    assert sup.heads["fc2"].fc.in_features == 8


def test_glob_taps_match_direct_children_only() -> None:
    model = nn.Sequential(
        nn.Sequential(nn.Linear(4, 4), nn.ReLU()),
        nn.Sequential(nn.Linear(4, 4), nn.ReLU()),
        nn.Linear(4, 2),
    )
    sup = DeepSupervision(model, {"*.0": 0.1}, head=heads.classification(2))
    assert list(sup.taps) == ["0.0", "1.0"]
    deep = DeepSupervision(bare_copy(model), {"**": 0.1}, head=nn.Identity())
    assert len(deep.taps) == 7


def test_taps_follow_the_models_module_order(tiny_cnn: TinyCNN) -> None:
    sup = DeepSupervision(
        tiny_cnn,
        {"stage2": 0.1, "stem": 0.2, "stage1.*": 0.3},
        head=heads.seg(3),
        criterion=nn.CrossEntropyLoss(),
        clone=True,
    )
    order = ["stem", "stage1.0", "stage1.1", "stage2"]
    assert list(sup.taps) == list(sup.heads) == order
    assert sup.weights == {"stem": 0.2, "stage1.0": 0.3, "stage1.1": 0.3, "stage2": 0.1}
    _, aux = sup(torch.randn(2, 3, 16, 16), target=torch.randint(0, 3, (2, 16, 16)))
    assert list(aux) == order
    for name, weight in sup.weights.items():
        torch.testing.assert_close(aux[name], weight * aux.raw[name])


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("*.0", ["0.0"]),  # * stays within one name component, and matches the whole name
        ("0.*", ["0.0", "0.1"]),
        ("**.1", ["0.0.1", "0.1"]),  # ** crosses dots
        ("0.?", ["0.0", "0.1"]),
        ("0?0", []),  # ? is one character of a component, never a dot
        ("0.[1]", ["0.1"]),
    ],
)
def test_glob_rules_on_a_deeper_model(pattern: str, expected: list[str]) -> None:
    model = nn.Sequential(
        nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Linear(4, 4)), nn.Linear(4, 2)
    )
    if not expected:
        with pytest.raises(TapNotFoundError, match=re.escape(f"pattern {pattern!r} matches no")):
            resolve_taps(model, {pattern: 0.1})
    else:
        assert list(resolve_taps(model, {pattern: 0.1})) == expected


def test_weight_zero_still_runs_the_head_and_gives_zero(mlp: nn.Module) -> None:
    sup = DeepSupervision(
        mlp,
        {"fc2": schedules.Cutoff(0.4, at=1)},
        head=heads.classification(4),
        criterion=nn.CrossEntropyLoss(),
    )
    sup.step()
    _, aux = sup(torch.randn(3, 6), target=torch.tensor([0, 1, 2]))
    assert aux["fc2"].item() == 0.0
    assert aux.raw["fc2"].item() > 0
    aux["fc2"].backward()
    grads = [p.grad for p in sup.heads["fc2"].parameters()]
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in grads)


@pytest.mark.parametrize(
    ("calls", "expected_input"),
    [("first", "first"), ("last", "second")],
    ids=["first", "last"],
)
def test_reused_module_first_or_last(
    reuse_model: nn.Module, calls: str, expected_input: str
) -> None:
    seen: list[torch.Tensor] = []
    reuse_model.shared.register_forward_hook(lambda m, a, o: seen.append(o))
    sup = DeepSupervision(reuse_model, {"shared": Tap(calls=calls)}, head=nn.Identity())  # type: ignore[arg-type]
    _, preds = sup(torch.randn(2, 4))
    idx = 0 if expected_input == "first" else 1
    assert torch.equal(preds["shared"], seen[idx])


def test_reused_module_all_averages_losses(reuse_model: nn.Module) -> None:
    seen: list[torch.Tensor] = []
    reuse_model.shared.register_forward_hook(lambda m, a, o: seen.append(o))
    mse = nn.MSELoss()
    sup = DeepSupervision(
        reuse_model, {"shared": Tap(1.0, calls="all")}, head=nn.Identity(), criterion=mse
    )
    t = torch.randn(2, 8)
    _, aux = sup(torch.randn(2, 4), target=t)
    torch.testing.assert_close(aux["shared"], (mse(seen[0], t) + mse(seen[1], t)) / 2)


def test_tuple_output_default_and_select(tuple_model: nn.Module) -> None:
    sup = DeepSupervision(tuple_model, "block", head=nn.Identity())
    x = torch.randn(2, 7, 5)
    _, preds = sup(x)
    h = tuple_model.block.fc(tuple_model.embed(x))
    torch.testing.assert_close(preds["block"], h)
    sup2 = DeepSupervision(bare_copy(tuple_model), {"block": Tap(select=1)}, head=nn.Identity())
    _, preds2 = sup2(x)
    torch.testing.assert_close(preds2["block"], h.softmax(-1))


@dataclasses.dataclass
class _Out:
    first: torch.Tensor
    second: torch.Tensor


class _Multi(nn.Module):
    """Returns the same two tensors (h, 2h) packed as ``kind``."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> object:
        h = self.fc(x)
        pair = (h, 2 * h)
        if self.kind == "list":
            return list(pair)
        if self.kind == "dict":
            return {"first": pair[0], "second": pair[1]}
        if self.kind == "dataclass":
            return _Out(*pair)
        return pair


@pytest.mark.parametrize(
    ("kind", "select", "factor"),
    [
        ("tuple", None, 1),
        ("tuple", -1, 2),
        ("list", None, 1),
        ("list", 1, 2),
        ("dict", None, 1),
        ("dict", "second", 2),
        ("dataclass", None, 1),
        ("dataclass", "second", 2),
        ("tuple", lambda out: out[1], 2),
    ],
    ids=["tuple", "tuple-neg", "list", "list-1", "dict", "dict-key", "dc", "dc-attr", "callable"],
)
def test_select_picks_the_tensor_of_any_output(kind: str, select: object, factor: int) -> None:
    model = nn.Sequential(_Multi(kind))
    outer = nn.Sequential(model, nn.Identity())
    sup = DeepSupervision(outer, {"0.0": Tap(select=select)}, head=nn.Identity())  # type: ignore[arg-type]
    x = torch.randn(2, 4)
    _, preds = sup(x)
    torch.testing.assert_close(preds["0.0"], factor * model[0].fc(x))


def test_token_channels_come_from_the_last_dim_in_the_dry_run(tuple_model: nn.Module) -> None:
    x = torch.randn(2, 7, 5)  # 7 tokens of width 5 -> (2, 7, 8) after embed, a tuple from block
    sup = DeepSupervision(
        tuple_model,
        "block",
        head=heads.tokens(3),
        criterion=nn.CrossEntropyLoss(),
        example_input=x,
    )
    assert sup.heads["block"].fc.in_features == 8  # C of (B, N, C), not N
    _, aux = sup(x, target=torch.tensor([0, 2]))
    assert aux.raw["block"] > 0


def test_the_dry_run_builds_no_graph_and_keeps_gradients_clean() -> None:
    seen: list[bool] = []

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(torch.is_grad_enabled())
            return self.fc(x)

    model = nn.Sequential(Probe(), nn.Linear(5, 2))
    DeepSupervision(model, "0", head=heads.classification(2), example_input=torch.randn(1, 3))
    assert seen == [False]  # the dry run ran once, without autograd


def test_clone_true_gives_the_pre_inplace_features() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True))
    seen: list[torch.Tensor] = []
    model[1].register_forward_hook(lambda m, a, o: seen.append(o.clone()))
    sup = DeepSupervision(model, {"1": Tap(clone=True)}, head=nn.Identity())
    _, preds = sup(torch.randn(2, 3, 8, 8))
    assert torch.equal(preds["1"], seen[0])
    assert (preds["1"] < 0).any()


def test_detach_trains_the_head_only(mlp: nn.Module) -> None:
    sup = DeepSupervision(
        mlp,
        {"fc2": Tap(1.0, detach=True)},
        head=heads.classification(4),
        criterion=nn.CrossEntropyLoss(),
    )
    _, aux = sup(torch.randn(3, 6), target=torch.tensor([0, 1, 2]))
    aux["fc2"].backward()
    assert all(p.grad is None for p in mlp.parameters())
    assert all(p.grad is not None for p in sup.heads["fc2"].parameters())


def test_parameters_are_complete_before_the_first_forward(tiny_cnn: TinyCNN) -> None:
    sup = DeepSupervision(tiny_cnn, "stage2", head=heads.seg(3))
    n_model = sum(1 for _ in tiny_cnn.parameters())
    n_head = sum(1 for _ in sup.heads["stage2"].parameters())
    assert n_head == 5
    assert sum(1 for _ in sup.parameters()) == n_model + n_head
    assert not any(isinstance(p, nn.parameter.UninitializedParameter) for p in sup.parameters())


def test_example_input_infers_channels_by_dry_run_and_keeps_modes() -> None:
    class NoLayers(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x, x], dim=1)

    model = nn.Sequential(nn.Conv2d(3, 5, 1), nn.BatchNorm2d(5), NoLayers(), nn.Conv2d(10, 2, 1))
    model[1].eval()  # a frozen BN must stay frozen after the dry run
    stats = model[1].running_mean.clone()
    sup = DeepSupervision(model, "2", head=heads.seg(2), example_input=torch.randn(1, 3, 4, 4))
    assert sup.heads["2"].conv.in_channels == 10
    assert model.training and not model[1].training
    assert torch.equal(model[1].running_mean, stats)


class _CatBlock(nn.Module):
    """Its last conv has 4 output channels, its output 8: the last-layer guess is wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return torch.cat([y, y.relu()], dim=1)


class _FeatureInfoNet(nn.Module):
    """timm-style ``feature_info`` that names the tapped block, at the root or on ``backbone``."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.backbone = nn.Sequential(_CatBlock(), nn.Conv2d(8, 3, 1))
        entries = {
            "root": [{"module": "backbone.0", "num_chs": 8, "reduction": 1}],
            "root-underscore": [{"module": "backbone_0", "num_chs": 8, "reduction": 1}],
            "submodule": [{"module": "0", "num_chs": 8, "reduction": 1}],
        }[where]
        if where == "submodule":
            self.backbone.feature_info = entries  # type: ignore[assignment]
        else:
            self.feature_info = entries

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.backbone(x)
        return out


@pytest.mark.parametrize("where", ["root", "root-underscore", "submodule"])
def test_channels_come_from_feature_info_before_the_last_layer(where: str) -> None:
    model = _FeatureInfoNet(where)
    sup = DeepSupervision(
        model, "backbone.0", head=heads.seg(3, dropout=0.0), criterion=nn.CrossEntropyLoss()
    )
    assert sup.heads["backbone.0"].conv.in_channels == 8  # feature_info's 8, not the conv's 4
    x, y = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 8, 8))
    _, aux = sup(x, target=y)
    feat = model.backbone[0](x)
    torch.testing.assert_close(
        aux.raw["backbone.0"], F.cross_entropy(sup.heads["backbone.0"](feat), y)
    )


def test_channels_from_the_last_layer_of_the_tapped_module() -> None:
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 6, 1), nn.GroupNorm(2, 6), nn.Conv2d(6, 5, 1), nn.ReLU()),
        nn.Conv2d(5, 2, 1),
    )
    sup = DeepSupervision(model, "0", head=heads.seg(2))
    assert sup.heads["0"].conv.in_channels == 5  # the last conv, not the first (6)
    gn = nn.Sequential(nn.Sequential(nn.Conv2d(3, 6, 1), nn.GroupNorm(2, 6)), nn.Conv2d(6, 2, 1))
    assert DeepSupervision(gn, "0", head=heads.seg(2)).heads["0"].conv.in_channels == 6


def test_a_shared_ready_head_is_copied_per_tap(mlp: nn.Module) -> None:
    head = nn.Linear(12, 4)
    sup = DeepSupervision(mlp, {"fc1": 1.0, "act": 1.0}, head=head, criterion=nn.CrossEntropyLoss())
    a, b = sup.heads["fc1"], sup.heads["act"]
    assert a is not b and a is not head and b is not head
    assert torch.equal(a.weight, head.weight) and a.weight is not head.weight
    single = DeepSupervision(bare_copy(mlp), {"fc1": 1.0}, head=head)
    assert single.heads["fc1"] is head  # one tap: the module itself


# unwrap, state, copies -----------------------------------------------------------------------


def test_unwrap_removes_every_hook_and_keeps_parameters(tiny_cnn: TinyCNN) -> None:
    params = list(tiny_cnn.parameters())
    sup = DeepSupervision(tiny_cnn, ["stem", "stage1", "stage2"], head=heads.seg(3), clone=True)
    assert all(len(m._forward_hooks) == 1 for m in (tiny_cnn.stem, tiny_cnn.stage1))
    model = sup.unwrap()
    assert model is tiny_cnn and sup.model is tiny_cnn
    assert all(len(m._forward_hooks) == 0 for m in tiny_cnn.modules())
    assert all(p is q for p, q in zip(params, model.parameters()))
    sup.unwrap()  # twice is fine


def test_state_dict_round_trip_restores_heads_and_progress(tiny_cnn: TinyCNN) -> None:
    kwargs = {
        "taps": {"stage1": schedules.LinearDecay(0.4, total=10)},
        "head": heads.seg(3),
        "criterion": nn.CrossEntropyLoss(),
        "clone": True,
    }
    sup = DeepSupervision(tiny_cnn, **kwargs)  # type: ignore[arg-type]
    sup.step(5)
    buf = io.BytesIO()
    torch.save(sup.state_dict(), buf)
    buf.seek(0)
    other = DeepSupervision(TinyCNN(), **kwargs)  # type: ignore[arg-type]
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert other.progress == 5
    assert other.weights == pytest.approx({"stage1": 0.2})
    for (k, v), (k2, v2) in zip(sup.state_dict().items(), other.state_dict().items()):
        assert k == k2
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, v2), k
    x, y = torch.randn(2, 3, 16, 16), torch.randint(0, 3, (2, 16, 16))
    sup.eval(), other.eval()
    assert torch.equal(sup(x), other(x))
    sup.train(), other.train()
    torch.manual_seed(1)
    _, a = sup(x, target=y)
    torch.manual_seed(1)
    _, b = other(x, target=y)
    torch.testing.assert_close(a["stage1"], b["stage1"])


def test_deepcopy_hooks_feed_the_copy(tiny_cnn: TinyCNN) -> None:
    sup = DeepSupervision(tiny_cnn, "stage2", head=heads.seg(3), criterion=None)
    twin = copy.deepcopy(sup)
    hook = next(iter(twin.model.stage2._forward_hooks.values()))
    assert hook.capture is twin._capture and hook.capture is not sup._capture
    with torch.no_grad():
        for p in twin.heads["stage2"].parameters():
            p.add_(1.0)
    x = torch.randn(2, 3, 16, 16)
    _, p1 = sup(x)
    _, p2 = twin(x)
    assert not torch.allclose(p1["stage2"], p2["stage2"])
    assert sup._capture.records() is None and twin._capture.records() is None


def test_torch_save_of_the_module_round_trips(tiny_cnn: TinyCNN) -> None:
    sup = DeepSupervision(tiny_cnn, "stage2", head=heads.seg(3), criterion=nn.CrossEntropyLoss())
    sup.step(3)
    buf = io.BytesIO()
    torch.save(sup, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded.progress == 3
    hook = next(iter(loaded.model.stage2._forward_hooks.values()))
    assert hook.capture is loaded._capture
    x, y = torch.randn(2, 3, 16, 16), torch.randint(0, 3, (2, 16, 16))
    loaded.eval(), sup.eval()
    assert torch.equal(loaded(x), sup(x))
    loaded.train()
    _, aux = loaded(x, target=y)
    assert torch.isfinite(aux["stage2"])


def test_ema_averaged_model_copies_cleanly(tiny_cnn: TinyCNN) -> None:
    sup = DeepSupervision(
        tiny_cnn, "stage2", head=heads.seg(3, dropout=0.0), criterion=nn.CrossEntropyLoss()
    )
    x, y = torch.randn(2, 3, 16, 16), torch.randint(0, 3, (2, 16, 16))
    ema = torch.optim.swa_utils.AveragedModel(sup)
    ema.update_parameters(sup)
    copy_ = ema.module
    hook = next(iter(copy_.model.stage2._forward_hooks.values()))
    assert hook.capture is copy_._capture and hook.capture is not sup._capture
    _, aux = sup(x, target=y)
    _, aux_ema = ema(x, target=y)  # the same weights and batch: the same losses
    torch.testing.assert_close(aux_ema["stage2"], aux["stage2"])
    torch.testing.assert_close(aux_ema.raw["stage2"], aux.raw["stage2"])
    # the heads are averaged with the model: after a change of +1, an average of 2 moves +0.5
    before = [p.detach().clone() for p in copy_.heads.parameters()]
    with torch.no_grad():
        for p in sup.heads.parameters():
            p.add_(1.0)
    ema.update_parameters(sup)
    for p, b in zip(copy_.heads.parameters(), before, strict=True):
        torch.testing.assert_close(p, b + 0.5)
    ema.eval(), sup.eval()
    assert torch.equal(ema(x), copy_.model(x))


# threads and exceptions ----------------------------------------------------------------------


def test_two_threads_see_only_their_own_features(mlp: nn.Module) -> None:
    sup = DeepSupervision(mlp, {"fc2": 1.0}, head=nn.Identity(), criterion=None)
    inputs = [torch.randn(3, 6), torch.randn(3, 6) + 5]
    expected = [mlp.fc2(mlp.act(mlp.fc1(x))) for x in inputs]
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def slow_act(module: nn.Module, args: object, out: torch.Tensor) -> None:
        barrier.wait(timeout=5)  # both threads are inside their forward at once

    handle = mlp.act.register_forward_hook(slow_act)

    def work(i: int) -> None:
        try:
            for _ in range(20):
                _, preds = sup(inputs[i])
                torch.testing.assert_close(preds["fc2"], expected[i])
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    handle.remove()
    assert not errors, errors


def test_exception_mid_forward_leaves_no_state(mlp: nn.Module) -> None:
    sup = DeepSupervision(mlp, "fc1", head=heads.classification(4), criterion=nn.CrossEntropyLoss())

    def boom(module: nn.Module, args: object, out: torch.Tensor) -> None:
        raise RuntimeError("boom")

    handle = mlp.fc2.register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        sup(torch.randn(3, 6), target=torch.tensor([0, 1, 2]))
    assert sup._capture.records() is None
    handle.remove()
    _, aux = sup(torch.randn(3, 6), target=torch.tensor([0, 1, 2]))
    assert torch.isfinite(aux["fc1"])


def test_nothing_is_kept_after_a_step(mlp: nn.Module) -> None:
    sup = DeepSupervision(mlp, "fc1", head=heads.classification(4), criterion=nn.CrossEntropyLoss())
    _, aux = sup(torch.randn(3, 6), target=torch.tensor([0, 1, 2]))
    assert sup._capture.records() is None
    tensors = [v for v in vars(sup).values() if isinstance(v, torch.Tensor)]
    assert tensors == []


def test_repr_names_taps_and_weights(mlp: nn.Module) -> None:
    sup = DeepSupervision(mlp, {"fc1": 0.3}, head=heads.classification(4))
    assert "taps={'fc1': Constant(value=0.3)}, progress=0" in repr(sup)
