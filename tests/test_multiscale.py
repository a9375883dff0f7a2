"""deepsup.multiscale: scale weights as the peers give them, and the public target downsampling."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from deepsup import DeepSupervision
from deepsup.errors import ConfigError, TargetError
from deepsup.functional import reconcile
from deepsup.multiscale import RULES, downsample, scale_weights

NAMES = ["up4", "up3", "up2", "up1", "up0", "deep1", "deep2"]


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_rules_follow_their_formulas(n: int) -> None:
    names = NAMES[:n]
    assert scale_weights(names, "halving") == (
        1.0,
        {t: 0.5 ** (i + 1) for i, t in enumerate(names)},
    )
    assert scale_weights(names, "monai-exp") == (
        1.0,
        {t: max(0.5 ** (i + 1), 0.0625) for i, t in enumerate(names)},
    )
    assert scale_weights(names, "monai-two") == (1.0, dict.fromkeys(names, 0.5))
    assert scale_weights(names, "same") == (1.0, dict.fromkeys(names, 1.0))
    main, taps = scale_weights(names, "nnunet")
    raw = [0.5**i for i in range(n + 1)]
    raw[-1] = 0.0
    assert [main, *taps.values()] == pytest.approx([w / sum(raw) for w in raw], rel=1e-15)
    assert main + sum(taps.values()) == pytest.approx(1.0, rel=1e-15)
    assert taps[names[-1]] == 0.0


def test_monai_exp_floors_at_one_sixteenth() -> None:
    _, taps = scale_weights(NAMES, "monai-exp")
    assert list(taps.values())[3:] == [0.0625] * 4
    _, halving = scale_weights(NAMES, "halving")
    assert list(halving.values())[4] == 0.03125


@pytest.mark.parametrize(
    ("taps", "rule", "match"),
    [
        (["a"], "exp", r"rule must be one of .*'nnunet'.* \(got 'exp'\)"),
        ([], "halving", r"taps must be a non-empty list of tap names, finest first \(got \[\]\)"),
        ("up1", "halving", r"taps must be a non-empty list .* \(got 'up1'\)"),
        (["a", "b", "a"], "same", r"taps lists \['a'\] more than once"),
    ],
    ids=["rule", "empty", "string", "twice"],
)
def test_bad_arguments_are_config_errors(taps: Any, rule: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        scale_weights(taps, rule)


def test_rules_are_listed() -> None:
    assert RULES == ("halving", "monai-exp", "monai-two", "same", "nnunet")


class _Decoder(nn.Module):
    """A toy decoder: stages at 1/4, 1/2 and full resolution."""

    def __init__(self) -> None:
        super().__init__()
        self.up2 = nn.Conv2d(1, 4, 3, stride=4, padding=1)
        self.up1 = nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.out = nn.ConvTranspose2d(4, 3, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.out(self.up1(self.up2(x)))
        return out


def test_nnunet_weights_train_with_a_zero_weight_that_is_ddp_safe() -> None:
    """The coarsest tap's weight is 0: its head runs and gets a zero gradient, never None."""
    main, weights = scale_weights(["up1", "up2"], "nnunet")
    model = _Decoder()
    sup = DeepSupervision(model, weights, head=nn.Conv2d(4, 3, 1), criterion=F.cross_entropy,
                          resize="target", interpolation="nearest-exact")  # fmt: skip
    x, y = torch.randn(2, 1, 16, 16), torch.randint(0, 3, (2, 16, 16))
    out, aux = sup(x, target=y)
    loss = main * F.cross_entropy(out, y) + sum(aux.values())
    loss.backward()
    assert float(aux["up2"].detach()) == 0.0 and float(aux.raw["up2"]) > 0
    assert all(p.grad is not None and not p.grad.any() for p in sup.heads["up2"].parameters())
    assert all(p.grad is not None and p.grad.any() for p in sup.heads["up1"].parameters())
    # the total is nnU-Net's: weights sum to 1 over the main output and the taps
    feats = model.up1(model.up2(x))
    ref = main * F.cross_entropy(out, y) + weights["up1"] * F.cross_entropy(
        sup.heads["up1"](feats), downsample(y, (8, 8), "nearest-exact")
    )
    torch.testing.assert_close(loss, ref)


@settings(max_examples=25, deadline=None)
@given(
    mode=st.sampled_from(["nearest", "nearest-exact", "soft", "max"]),
    edge=st.integers(2, 12),
    factor=st.integers(1, 4),
    dims=st.integers(1, 3),
    dense=st.booleans(),
)
def test_downsample_is_what_the_wrapper_feeds_the_criterion(
    mode: str, edge: int, factor: int, dims: int, dense: bool
) -> None:
    size = tuple([max(edge // factor, 1)] * dims)
    labels = torch.randint(0, 3, (2, *(edge,) * dims))
    target = F.one_hot(labels, 3).movedim(-1, 1).float() if dense else labels
    pred = torch.randn(2, 3, *size)
    _, inside = reconcile(
        pred, target, resize="target", align_corners=False, tap="x", interpolation=mode
    )
    assert torch.equal(downsample(target, size, mode, num_classes=3), inside)


def test_downsample_errors() -> None:
    t = torch.zeros(2, 8, 8, dtype=torch.long)
    with pytest.raises(ConfigError, match=r"interpolation must be one of .* \(got 'area'\)"):
        downsample(t, (4, 4), "area")
    with pytest.raises(ConfigError, match=r"'soft' on class indices needs num_classes="):
        downsample(t, (4, 4), "soft")
    with pytest.raises(TargetError, match=r"target of shape \(2, 8, 8\) cannot be downsampled"):
        downsample(t, (16, 4), "max")
    with pytest.raises(TargetError, match=r"with 3 spatial dims"):
        downsample(t, (4, 4, 4))
