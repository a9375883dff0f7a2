"""deepsup.models.PSPNet: shapes, stride, weights, and parity with the seed's aux-coded PSPNet."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import deepsup
from deepsup import DeepSupervision, heads
from deepsup.models import PPM, PSPNet, WeightsError


def _load_seed() -> ModuleType:
    path = Path(__file__).with_name("_seed_pspnet.py")
    spec = importlib.util.spec_from_file_location("_seed_pspnet", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _layer_output_shapes(model: PSPNet, x: torch.Tensor) -> dict[str, torch.Size]:
    shapes: dict[str, torch.Size] = {}
    handles = [
        model.backbone.get_submodule(name).register_forward_hook(
            lambda _m, _i, out, name=name: shapes.__setitem__(name, out.shape)
        )
        for name in ("layer3", "layer4")
    ]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return shapes


@pytest.fixture(scope="module")
def resnet18_pspnet() -> PSPNet:
    torch.manual_seed(0)
    return PSPNet(num_classes=4, backbone="resnet18")


# shapes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size", [(65, 65), (64, 64), (50, 70), (33, 17), (9, 9)], ids=lambda s: f"{s[0]}x{s[1]}"
)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_output_is_logits_at_input_size(
    resnet18_pspnet: PSPNet, size: tuple[int, int], mode: str
) -> None:
    model = resnet18_pspnet.train(mode == "train")
    out = model(torch.randn(2, 3, *size))
    assert type(out) is torch.Tensor
    assert out.shape == (2, 4, *size)


def test_train_and_eval_return_the_same_type(resnet18_pspnet: PSPNet) -> None:
    x = torch.randn(2, 3, 41, 41)
    train_out = resnet18_pspnet.train()(x)
    eval_out = resnet18_pspnet.eval()(x)
    assert type(train_out) is type(eval_out) is torch.Tensor  # no (out, aux) tuple in training
    assert train_out.shape == eval_out.shape == (2, 4, 41, 41)
    assert train_out.dtype == eval_out.dtype
    # the two calls really ran in different modes (batch vs running BN statistics)
    assert not torch.allclose(train_out, eval_out)


@pytest.mark.parametrize(
    ("backbone", "layer3", "layer4"),
    [("resnet18", 256, 512), ("resnet34", 256, 512), ("resnet50", 1024, 2048)],
    ids=["resnet18", "resnet34", "resnet50"],
)
def test_layer3_channels_and_output_stride_8(backbone: str, layer3: int, layer4: int) -> None:
    model = PSPNet(num_classes=3, backbone=backbone).eval()
    assert model.aux_tap == "backbone.layer3"
    assert model.aux_channels == layer3
    with torch.no_grad():
        shapes = _layer_output_shapes(model, torch.randn(1, 3, 64, 64))
        odd = _layer_output_shapes(model, torch.randn(1, 3, 65, 49))
    assert shapes["layer3"] == (1, layer3, 8, 8)
    assert shapes["layer4"] == (1, layer4, 8, 8)
    assert odd["layer4"] == (1, layer4, 9, 7)
    assert model.ppm.out_channels == 2 * layer4


def test_resnet50_dilation_follows_the_a_trous_rule() -> None:
    """layer3/layer4 at stride 1; each 3x3 conv dilated 2 (layer3) or 4 (layer4), the first
    block's keeping the previous stage's rate; 1x1 convs undilated (DeepLab/PSPNet, OS 8)."""
    backbone = PSPNet(num_classes=3, backbone="resnet50").backbone
    got = {
        name: (m.stride, m.dilation, m.padding)
        for name, m in backbone.named_modules()
        if isinstance(m, nn.Conv2d) and name.startswith(("layer3", "layer4"))
    }
    expected = {}
    for stage, blocks, rate, previous in (("layer3", 6, 2, 1), ("layer4", 3, 4, 2)):
        for i in range(blocks):
            r = previous if i == 0 else rate
            expected[f"{stage}.{i}.conv1"] = ((1, 1), (1, 1), (0, 0))
            expected[f"{stage}.{i}.conv2"] = ((1, 1), (r, r), (r, r))
            expected[f"{stage}.{i}.conv3"] = ((1, 1), (1, 1), (0, 0))
        expected[f"{stage}.0.downsample.0"] = ((1, 1), (1, 1), (0, 0))
    assert got == expected
    strides = {
        name: m.stride
        for name, m in backbone.named_modules()
        if isinstance(m, nn.Conv2d) and name.startswith("layer2")
    }
    assert strides["layer2.0.conv2"] == strides["layer2.0.downsample.0"] == (2, 2)


def test_resnet18_dilation_follows_the_a_trous_rule() -> None:
    backbone = PSPNet(num_classes=3, backbone="resnet18").backbone
    got = {
        name: (m.stride, m.dilation, m.padding)
        for name, m in backbone.named_modules()
        if isinstance(m, nn.Conv2d) and name.startswith(("layer3", "layer4"))
    }
    assert got == {
        "layer3.0.conv1": ((1, 1), (1, 1), (1, 1)),
        "layer3.0.conv2": ((1, 1), (2, 2), (2, 2)),
        "layer3.0.downsample.0": ((1, 1), (1, 1), (0, 0)),
        "layer3.1.conv1": ((1, 1), (2, 2), (2, 2)),
        "layer3.1.conv2": ((1, 1), (2, 2), (2, 2)),
        "layer4.0.conv1": ((1, 1), (2, 2), (2, 2)),
        "layer4.0.conv2": ((1, 1), (4, 4), (4, 4)),
        "layer4.0.downsample.0": ((1, 1), (1, 1), (0, 0)),
        "layer4.1.conv1": ((1, 1), (4, 4), (4, 4)),
        "layer4.1.conv2": ((1, 1), (4, 4), (4, 4)),
    }


def test_structure_and_new_modules() -> None:
    model = PSPNet(num_classes=7, backbone="resnet18", bins=(1, 2, 3, 6), dropout=0.25)
    children = [n for n, _ in model.backbone.named_children()]
    assert children == [
        "conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"
    ]  # fmt: skip
    assert PSPNet.new_modules == ("ppm", "cls")
    assert all(isinstance(getattr(model, n), nn.Module) for n in PSPNet.new_modules)
    assert isinstance(model.ppm, PPM)
    assert [type(branch[0]).__name__ for branch in model.ppm.features] == ["AdaptiveAvgPool2d"] * 4
    assert [branch[0].output_size for branch in model.ppm.features] == [1, 2, 3, 6]
    assert [branch[1].out_channels for branch in model.ppm.features] == [128] * 4
    assert [type(m).__name__ for m in model.cls] == [
        "Conv2d", "BatchNorm2d", "ReLU", "Dropout2d", "Conv2d"
    ]  # fmt: skip
    assert (model.cls[0].in_channels, model.cls[0].out_channels, model.cls[0].bias) == (
        1024,
        512,
        None,
    )
    assert model.cls[3].p == 0.25
    assert model.cls[4].out_channels == 7
    assert not any(name.startswith("aux") for name, _ in model.named_modules())


def test_new_modules_feed_param_groups() -> None:
    model = PSPNet(num_classes=3, backbone="resnet18")
    sup = DeepSupervision(model, taps={model.aux_tap: 0.4}, head=heads.seg(3))
    groups = deepsup.param_groups(sup, lr=0.01, head_lr_mult=10.0, new_modules=PSPNet.new_modules)
    by_name = {g["name"]: g for g in groups}
    fast = {id(p) for p in by_name["heads"]["params"]}
    slow = {id(p) for p in by_name["model"]["params"]}
    assert by_name["heads"]["lr"] == pytest.approx(0.1)
    assert {id(p) for p in model.ppm.parameters()} <= fast
    assert {id(p) for p in model.cls.parameters()} <= fast
    assert {id(p) for p in model.backbone.parameters()} == slow


# align_corners -----------------------------------------------------------------------------


@pytest.mark.parametrize("align_corners", [True, False], ids=["align_corners", "half_pixel"])
def test_align_corners_is_honoured(align_corners: bool) -> None:
    torch.manual_seed(0)
    model = PSPNet(num_classes=3, backbone="resnet18", align_corners=align_corners).eval()
    assert model.ppm.align_corners is align_corners
    x = torch.randn(1, 3, 37, 45)
    with torch.no_grad():
        feat = model.backbone(x)
        pooled = [feat] + [
            F.interpolate(b(feat), feat.shape[-2:], mode="bilinear", align_corners=align_corners)
            for b in model.ppm.features
        ]
        logits = model.cls(torch.cat(pooled, 1))
        expected = F.interpolate(logits, (37, 45), mode="bilinear", align_corners=align_corners)
        torch.testing.assert_close(model(x), expected)

        other = PSPNet(num_classes=3, backbone="resnet18", align_corners=not align_corners).eval()
        other.load_state_dict(model.state_dict())
        assert not torch.allclose(other(x), expected)


def test_align_corners_defaults_to_the_reference() -> None:
    model = PSPNet(num_classes=3, backbone="resnet18")
    assert model.align_corners is True
    assert model.ppm.align_corners is True


# weights -----------------------------------------------------------------------------------


def test_weights_load_from_a_torchvision_state_dict(tmp_path: Path) -> None:
    torch.manual_seed(1)
    reference = torchvision.models.resnet18(weights=None)
    with torch.no_grad():  # non-default values everywhere, BN statistics included
        for t in reference.state_dict().values():
            if t.is_floating_point():
                t.uniform_(0.5, 1.5)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)

    model = PSPNet(num_classes=3, backbone="resnet18", weights=path)
    expected = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    got = model.backbone.state_dict()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)
    # str paths work too, and the new modules are untouched by the file
    fresh = PSPNet(num_classes=3, backbone="resnet18", weights=str(path))
    torch.testing.assert_close(fresh.backbone.conv1.weight, reference.conv1.weight)


def test_weights_of_another_resnet_are_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    with pytest.raises(WeightsError, match=r"resnet34\.pth.*resnet18 backbone: missing keys none; "
                       r"unexpected keys \['layer1\.2\.conv1\.weight'"):  # fmt: skip
        PSPNet(num_classes=3, backbone="resnet18", weights=path)
    with pytest.raises(ValueError, match=r"missing keys \['layer1\.2\.conv1\.weight'"):
        PSPNet(num_classes=3, backbone="resnet34", weights=_resnet18_file(tmp_path))


def test_weights_with_a_stray_key_or_shape_are_a_clear_error(tmp_path: Path) -> None:
    state = torchvision.models.resnet18(weights=None).state_dict()
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "extra.pth")
    with pytest.raises(WeightsError, match=r"extra\.pth.*unexpected keys \['extra\.weight'\]"):
        PSPNet(num_classes=3, backbone="resnet18", weights=tmp_path / "extra.pth")
    del state["extra.weight"]
    state["conv1.weight"] = torch.zeros(64, 1, 7, 7)
    torch.save(state, tmp_path / "gray.pth")
    with pytest.raises(WeightsError, match=r"shape mismatches \['conv1\.weight \(64, 1, 7, 7\)"):
        PSPNet(num_classes=3, backbone="resnet18", weights=tmp_path / "gray.pth")


def test_weights_that_are_no_state_dict_are_a_clear_error(tmp_path: Path) -> None:
    checkpoint = {"state_dict": torchvision.models.resnet18(weights=None).state_dict(), "epoch": 3}
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    with pytest.raises(WeightsError, match=r"checkpoint\.pth.*does not hold a state_dict.*'epoch'"):
        PSPNet(num_classes=3, backbone="resnet18", weights=tmp_path / "checkpoint.pth")
    torch.save(torchvision.models.resnet18(weights=None), tmp_path / "pickled.pth")
    with pytest.raises(WeightsError, match=r"pickled\.pth.*weights_only=True.*not a pickled model"):
        PSPNet(num_classes=3, backbone="resnet18", weights=tmp_path / "pickled.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(WeightsError, match=r"text\.pth.*could not be read"):
        PSPNet(num_classes=3, backbone="resnet18", weights=tmp_path / "text.pth")
    with pytest.raises(FileNotFoundError, match=r"weights file '.*missing\.pth' does not exist"):
        PSPNet(num_classes=3, backbone="resnet18", weights=tmp_path / "missing.pth")


def test_weights_error_is_a_deepsup_value_error() -> None:
    assert issubclass(WeightsError, deepsup.DeepSupError)
    assert issubclass(WeightsError, ValueError)


def _resnet18_file(tmp_path: Path) -> Path:
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


# arguments ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"backbone": "resnet200"}, r"arch must be one of .* \(got 'resnet200'\)"),
        ({"backbone": "timm:resnt18"}, r"'timm:resnt18' names no timm model.*Did you mean"),
        ({"backbone": "timm:"}, r"'timm:' names no timm model"),
        ({"num_classes": 0}, r"num_classes must be a positive int \(got 0\)"),
        ({"bins": ()}, r"bins must be a non-empty sequence"),
        ({"bins": (1, 0)}, r"each bin must be a positive int \(got 0\)"),
        ({"dropout": 1.5}, r"dropout must be a probability in \[0, 1\] \(got 1.5\)"),
    ],
    ids=["resnet200", "timm-typo", "timm-empty", "classes", "no-bins", "zero-bin", "dropout"],
)
def test_bad_arguments_are_clear_errors(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"num_classes": 3, "backbone": "resnet18"} | kwargs
    with pytest.raises(ValueError, match=match):
        PSPNet(**args)  # type: ignore[arg-type]


# timm --------------------------------------------------------------------------------------


def test_timm_backbone() -> None:
    model = PSPNet(num_classes=3, backbone="timm:resnet18")
    assert model.aux_tap == "backbone.layer3"
    assert model.aux_channels == 256
    assert model.get_submodule(model.aux_tap) is model.backbone.layer3
    x = torch.randn(2, 3, 50, 70)
    for mode in (True, False):
        assert model.train(mode)(x).shape == (2, 3, 50, 70)
    shapes = _layer_output_shapes(model.eval(), torch.randn(1, 3, 64, 64))
    assert shapes == {"layer3": (1, 256, 8, 8), "layer4": (1, 512, 8, 8)}


def test_timm_backbone_tap_names_a_real_module() -> None:
    model = PSPNet(num_classes=3, backbone="timm:convnext_atto")
    assert model.aux_tap == "backbone.stages_2"
    assert model.aux_channels == 160
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3, 32, 32)


def test_timm_backbone_weights_load_from_a_file(tmp_path: Path) -> None:
    import timm

    torch.manual_seed(2)
    reference = timm.create_model("resnet18", pretrained=False)
    torch.save(reference.state_dict(), tmp_path / "timm_resnet18.pth")
    model = PSPNet(num_classes=3, backbone="timm:resnet18", weights=tmp_path / "timm_resnet18.pth")
    got = model.backbone.state_dict()
    for key, value in reference.state_dict().items():
        if not key.startswith("fc."):
            torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)
    with pytest.raises(WeightsError, match=r"timm_resnet18\.pth.*does not fit the timm model"):
        PSPNet(num_classes=3, backbone="timm:resnet34", weights=tmp_path / "timm_resnet18.pth")


def test_timm_backbone_without_output_stride_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"could not be built with features_only=True and "):
        PSPNet(num_classes=3, backbone="timm:vit_tiny_patch16_224")


# parity with the seed ----------------------------------------------------------------------

_HEAD_KEYS = {"0.": "conv.", "1.": "bn.", "4.": "cls."}


@pytest.mark.parametrize(
    ("dtype", "size"),
    [(torch.float64, 33), (torch.float32, 65)],
    ids=["float64-33x33", "float32-65x65"],
)
def test_deepsupervision_reproduces_the_seeds_aux_coded_pspnet(
    dtype: torch.dtype, size: int
) -> None:
    seed_module = _load_seed()
    torch.manual_seed(0)
    num_classes = 5
    model = PSPNet(num_classes=num_classes, backbone="resnet18", dropout=0.0)
    seed = seed_module.SeedPSPNet(layers=18, classes=num_classes, dropout=0.0)
    with torch.no_grad():  # non-trivial BN affine parameters everywhere, so a mix-up would show
        for m in seed.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    seed_state = seed.state_dict()
    model.load_state_dict({k: v for k, v in seed_state.items() if not k.startswith("aux.")})

    sup = DeepSupervision(
        model,
        taps={"backbone.layer3": 0.4},
        head=heads.seg(num_classes, hidden=256, dropout=0.0),  # the seed's aux: 256 wide
        criterion=nn.CrossEntropyLoss(ignore_index=255),
        resize="prediction",
        align_corners=True,
    )
    head = sup.heads["backbone.layer3"]
    head_to_seed = {}
    for key in head.state_dict():
        seed_key = next(
            "aux." + s + key[len(h) :] for s, h in _HEAD_KEYS.items() if key.startswith(h)
        )
        head_to_seed[key] = seed_key
    head.load_state_dict({k: seed_state[v] for k, v in head_to_seed.items()})
    sup.to(dtype)
    seed.to(dtype)

    x = torch.randn(2, 3, size, size, dtype=dtype)
    y = torch.randint(0, num_classes, (2, size, size))
    y[:, :5] = 255
    y[1, 10:20, 15:] = 255
    assert (y == 255).any(dim=(1, 2)).all()

    sup.train()
    seed.train()
    output, aux = sup(x, target=y)
    main_loss = nn.CrossEntropyLoss(ignore_index=255)(output, y)
    (main_loss + sum(aux.values())).backward()

    seed_pred, seed_main, seed_aux = seed(x, y)
    (seed_main + 0.4 * seed_aux).backward()

    # float64: bit for bit (the weight is applied exactly as the seed's `0.4 * aux`)
    tol = {"rtol": 0.0, "atol": 0.0} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    assert torch.equal(output.argmax(1), seed_pred)
    torch.testing.assert_close(main_loss, seed_main, **tol)
    assert list(aux) == ["backbone.layer3"]
    torch.testing.assert_close(aux.raw["backbone.layer3"], seed_aux, **tol)
    torch.testing.assert_close(aux["backbone.layer3"], 0.4 * seed_aux, **tol)

    seed_params = dict(seed.named_parameters())
    model_params = dict(model.named_parameters())
    assert model_params.keys() == {k for k in seed_params if not k.startswith("aux.")}
    for name, p in model_params.items():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, seed_params[name].grad, **tol, msg=name)
    head_params = dict(head.named_parameters())
    assert len(head_params) == len([k for k in seed_params if k.startswith("aux.")]) == 5
    for name, p in head_params.items():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, seed_params[head_to_seed[name]].grad, **tol, msg=name)

    # at test time the wrapper is the plain model, which is the seed's eval forward
    sup.eval()
    seed.eval()
    with torch.no_grad():
        torch.testing.assert_close(sup(x), seed(x), **tol)
        assert torch.equal(sup(x), model(x))

    # the aux loss reaches the backbone below the tap: without it, layer3's gradient changes
    layer3_grad = model.backbone.layer3[0].conv1.weight.grad.clone()
    sup.train()
    model.zero_grad()
    sup.heads.zero_grad()
    main_only = nn.CrossEntropyLoss(ignore_index=255)(sup(x, target=y)[0], y)
    main_only.backward()
    assert not torch.allclose(model.backbone.layer3[0].conv1.weight.grad, layer3_grad)
