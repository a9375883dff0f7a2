"""Parity with the peers' deep supervision: MONAI's DynUNet + DeepSupervisionLoss, nnU-Net v2.

MONAI (a dev dependency) is run as is: an unmodified ``DynUNet(deep_supervision=False)`` wrapped by
deepsup on its decoder upsample blocks, with copies of the super heads of a
``deep_supervision=True`` twin (same weights), must give the twin's loss and every gradient.

The rules of MONAI 1.6.1 that these tests pin down (``monai/networks/nets/dynunet.py``,
``monai/losses/ds_loss.py``):

- super head ``i`` (``deep_supervision_heads[i]``, a 1x1 ``UnetOutBlock``) reads the output of
  the skip layer at depth ``i + 1``, whose upsample block is ``upsamples[len(upsamples) - 2 - i]``;
- in training the twin returns ``torch.stack([out, *interpolate(head_i, out.shape[2:])], 1)``:
  ``F.interpolate``'s default mode, ``"nearest"``;
- ``DeepSupervisionLoss(weight_mode="exp")`` weights level ``l`` by ``max(0.5 ** l, 0.0625)``,
  casts each prediction to float32, sums from a float32 zero in level order, and downsamples
  the target of a smaller prediction with ``F.interpolate(target, mode="nearest-exact")``.

nnU-Net v2 is not installed here (it pulls many dependencies); its rules are restated below from
nnunetv2 2.8.1 and batchgeneratorsv2 0.3.6 (``pip download --no-deps nnunetv2
batchgeneratorsv2``), with the source quoted.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deepsup import DeepSupervision, Tap
from deepsup.multiscale import scale_weights

monai = pytest.importorskip("monai", reason="MONAI is a dev dependency (pip install deepsup[dev])")
from monai.losses import DeepSupervisionLoss, DiceCELoss  # noqa: E402
from monai.networks.nets import DynUNet  # noqa: E402

# (spatial dims, input edge, filters): tiny, so that both run in CI in a second or two
CASES = [
    pytest.param(2, 16, [4, 8, 16, 32], id="2d"),
    pytest.param(3, 16, [2, 4, 8, 16], id="3d"),
]


def _twins(dims: int, filters: list[int], supr: int) -> tuple[nn.Module, nn.Module]:
    """A DynUNet with MONAI's deep supervision, and a plain one with the same weights."""
    kwargs: dict[str, Any] = {
        "spatial_dims": dims,
        "in_channels": 1,
        "out_channels": 3,
        "kernel_size": [3] * len(filters),
        "strides": [1] + [2] * (len(filters) - 1),
        "upsample_kernel_size": [2] * (len(filters) - 1),
        "filters": filters,
    }
    torch.manual_seed(0)
    twin = DynUNet(**kwargs, deep_supervision=True, deep_supr_num=supr)
    plain = DynUNet(**kwargs, deep_supervision=False)
    missing, unexpected = plain.load_state_dict(twin.state_dict(), strict=False)
    assert missing == []
    assert all("super_head" in k or k.startswith("deep_supervision_heads") for k in unexpected)
    return twin.train(), plain.train()


def _wrap(
    twin: nn.Module, plain: nn.Module, criterion: Callable[..., Any], **kwargs: Any
) -> tuple[DeepSupervision, float, list[str]]:
    """deepsup on the plain DynUNet's decoder blocks with copies of the twin's super heads.

    Returns the wrapper, the main loss weight and the tap names in the super heads' order.
    """
    n_up = len(plain.upsamples)
    names = [f"upsamples.{n_up - 2 - i}" for i in range(len(twin.deep_supervision_heads))]
    main, weights = scale_weights(names, "monai-exp")
    taps = {
        name: Tap(weights[name], head=copy.deepcopy(twin.deep_supervision_heads[i]))
        for i, name in enumerate(names)
    }
    return DeepSupervision(plain, taps, criterion=criterion, **kwargs), main, names


def _data(dims: int, edge: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, *(edge,) * dims, generator=g)
    y = torch.randint(0, 3, (2, 1, *(edge,) * dims), generator=g).float()  # MONAI's float labels
    return x, y


def _grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in module.named_parameters() if p.grad is not None}


def _compare_grads(twin: nn.Module, sup: DeepSupervision, names: list[str]) -> float:
    """Every gradient of the twin against deepsup's; returns the largest absolute difference."""
    ref, got = _grads(twin), _grads(sup.model)
    for i, name in enumerate(names):
        for n, g in _grads(sup.heads[name]).items():
            got[f"deep_supervision_heads.{i}.{n}"] = g
    assert set(got) == set(ref)
    worst = 0.0
    for n, g in ref.items():
        torch.testing.assert_close(got[n], g, rtol=1e-5, atol=1e-6, msg=n)
        worst = max(worst, float((got[n] - g).abs().max()))
    return worst


def _dice_ce() -> DiceCELoss:
    return DiceCELoss(to_onehot_y=True, softmax=True)


@pytest.mark.parametrize(("dims", "edge", "filters"), CASES)
def test_dynunet_deep_supervision_equals_deepsup(dims: int, edge: int, filters: list[int]) -> None:
    """MONAI's stacked output + DeepSupervisionLoss("exp") == deepsup with nearest upsampling."""
    twin, plain = _twins(dims, filters, supr=2)
    sup, main, names = _wrap(twin, plain, _dice_ce(), resize="prediction", interpolation="nearest")
    x, y = _data(dims, edge)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI's own deprecation warnings
        stacked = twin(x)
        ref = DeepSupervisionLoss(_dice_ce(), weight_mode="exp")(list(torch.unbind(stacked, 1)), y)
        out, aux = sup(x, target=y)
        loss = main * _dice_ce()(out.float(), y) + sum(aux.values())
    torch.testing.assert_close(out, stacked[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    ref.backward()
    loss.backward()
    _compare_grads(twin, sup, names)


@pytest.mark.parametrize(("dims", "edge", "filters"), CASES)
def test_deep_supervision_loss_target_downsampling_equals_deepsup(
    dims: int, edge: int, filters: list[int]
) -> None:
    """DeepSupervisionLoss on the heads' own-size outputs (the target resized "nearest-exact")."""
    twin, plain = _twins(dims, filters, supr=2)
    sup, main, names = _wrap(
        twin, plain, _dice_ce(), resize="target", interpolation="nearest-exact"
    )
    x, y = _data(dims, edge)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out_ref = twin(x)[:, 0]
        preds = [out_ref, *twin.heads]  # the super heads' outputs at their own scales
        assert [p.shape[2] for p in preds] == [edge, edge // 2, edge // 4]
        ref = DeepSupervisionLoss(_dice_ce(), weight_mode="exp")(preds, y)
        out, aux = sup(x, target=y)
        loss = main * _dice_ce()(out.float(), y) + sum(aux.values())
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    ref.backward()
    loss.backward()
    _compare_grads(twin, sup, names)


def test_monai_weight_modes_equal_scale_weights() -> None:
    names = [f"t{i}" for i in range(7)]
    for mode, rule in [("exp", "monai-exp"), ("two", "monai-two"), ("same", "same")]:
        main, taps = scale_weights(names, rule)  # type: ignore[arg-type]
        assert [main, *taps.values()] == DeepSupervisionLoss(nn.L1Loss(), mode).get_weights(8)


# nnU-Net v2, restated ---------------------------------------------------------------------


def nnunet_weights(num_outputs: int) -> list[float]:
    """nnunetv2/training/nnUNetTrainer/nnUNetTrainer.py, ``_build_loss`` (2.8.1), single process::

    weights = np.array([1 / (2 ** i) for i in range(len(deep_supervision_scales))])
    weights[-1] = 0   # (1e-6 under DDP without torch.compile: "DDP crashes ... unused parameters")
    weights = weights / weights.sum()
    """
    weights = [1 / (2**i) for i in range(num_outputs)]
    weights[-1] = 0
    total = sum(weights)
    return [w / total for w in weights]


def nnunet_deep_supervision_loss(loss: Callable[..., Any], weights: list[float]) -> Any:
    """nnunetv2/training/loss/deep_supervision.py, ``DeepSupervisionWrapper.forward``::

    return sum([weights[i] * self.loss(*inputs) for i, inputs in enumerate(zip(*args))
                if weights[i] != 0.0])
    """

    def forward(outputs: list[torch.Tensor], targets: list[torch.Tensor]) -> Any:
        args = (outputs, targets)
        return sum(
            [weights[i] * loss(*inputs) for i, inputs in enumerate(zip(*args)) if weights[i] != 0.0]
        )

    return forward


def nnunet_downsample_seg(seg: torch.Tensor, ds_scales: list[float]) -> list[torch.Tensor]:
    """batchgeneratorsv2/transforms/utils/deep_supervision_downsampling.py,
    ``DownsampleSegForDSTransform._apply_to_segmentation`` on one sample (C, *S)::

    new_shape = [round(i * j) for i, j in zip(segmentation.shape[1:], s)]
    results.append(interpolate(seg_float, new_shape, mode='nearest-exact')[0].to(dtype))
    """
    out = []
    for s in ds_scales:
        if s == 1:
            out.append(seg)
        else:
            shape = [round(i * s) for i in seg.shape[1:]]
            out.append(
                F.interpolate(seg[None].float(), shape, mode="nearest-exact")[0].to(seg.dtype)
            )
    return out


def _ce(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """nnU-Net's RobustCrossEntropyLoss: targets (B, 1, *S), the channel squeezed."""
    return F.cross_entropy(pred, target[:, 0].long())


@pytest.mark.parametrize(("dims", "edge", "filters"), CASES)
def test_nnunet_rules_equal_deepsup(dims: int, edge: int, filters: list[int]) -> None:
    """nnU-Net's weights, target pyramid and wrapper == deepsup's "nnunet" + nearest-exact."""
    twin, plain = _twins(dims, filters, supr=2)
    n_up = len(plain.upsamples)
    names = [f"upsamples.{n_up - 2 - i}" for i in range(2)]
    main, weights = scale_weights(names, "nnunet")
    assert [main, *weights.values()] == pytest.approx(nnunet_weights(3), abs=0, rel=1e-15)
    taps = {n: Tap(weights[n], head=copy.deepcopy(twin.deep_supervision_heads[i]))
            for i, n in enumerate(names)}  # fmt: skip
    sup = DeepSupervision(
        plain, taps, criterion=_ce, resize="target", interpolation="nearest-exact"
    )
    x = torch.randn(2, 1, *(edge,) * dims, generator=torch.Generator().manual_seed(2))
    seg = torch.randint(0, 3, (2, 1, *(edge,) * dims), dtype=torch.uint8)  # nnU-Net keeps uint8

    out, aux = sup(x, target=seg)
    loss = main * _ce(out, seg) + sum(aux.values())
    loss.backward()
    grads = {n: g.clone() for n, g in _grads(sup).items()}
    sup.zero_grad()

    # the reference: the same heads' predictions, nnU-Net's targets and wrapper
    sup_preds = DeepSupervision(plain, {n: Tap(head=sup.heads[n]) for n in names})
    out2, preds = sup_preds(x)
    per_sample = [nnunet_downsample_seg(s, [1, 0.5, 0.25]) for s in seg]
    targets = [torch.stack(t) for t in zip(*per_sample)]  # the data loader's collation
    outputs = [out2, *(preds[n] for n in names)]  # finest first, as nnU-Net orders them
    ref = nnunet_deep_supervision_loss(_ce, nnunet_weights(3))(outputs, targets)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-7)
    for n, g in _grads(sup).items():
        torch.testing.assert_close(g, grads[n], rtol=1e-5, atol=1e-7, msg=n)
    # nnU-Net skips the weight-0 loss: the coarsest head gets no gradient (DDP's "unused
    # parameters" crash); deepsup multiplies it by 0: a zero gradient, DDP-safe
    coarse = [
        f"heads.{names[-1].replace('.', '/')}.{n}"
        for n, _ in sup.heads[names[-1]].named_parameters()
    ]
    assert all(n not in _grads(sup) for n in coarse)
    assert all(not grads[n].any() for n in coarse)
