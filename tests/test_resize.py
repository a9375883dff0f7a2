"""Resizing predictions and targets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from deepsup import TargetError
from deepsup._resize import downsample_target, reconcile


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 40), w=st.integers(1, 40), oh=st.integers(1, 40), ow=st.integers(1, 40))
def test_downsample_target_picks_the_pixels_of_nearest_interpolation(
    h: int, w: int, oh: int, ow: int
) -> None:
    oh, ow = min(oh, h), min(ow, w)
    t = torch.randint(0, 21, (2, h, w))
    t[:, ::3] = 255
    ref = F.interpolate(t[:, None].float(), size=(oh, ow), mode="nearest")[:, 0].long()
    out = downsample_target(t, (oh, ow))
    assert out.dtype == t.dtype
    assert torch.equal(out, ref)


def test_downsample_target_is_exact_for_large_integers() -> None:
    t = torch.full((1, 4, 4), 2**40 + 1, dtype=torch.int64)
    assert torch.equal(downsample_target(t, (2, 2)), torch.full((1, 2, 2), 2**40 + 1))


def test_soft_targets_keep_their_channels() -> None:
    t = torch.rand(2, 3, 8, 8)
    out = downsample_target(t, (4, 4))
    assert torch.equal(out, t[:, :, ::2, ::2])


@pytest.mark.parametrize("align_corners", [False, True], ids=["ac-false", "ac-true"])
def test_upsample_prediction_matches_interpolate(align_corners: bool) -> None:
    pred, target = torch.randn(2, 5, 4, 4), torch.zeros(2, 16, 16, dtype=torch.long)
    out, t = reconcile(pred, target, resize="prediction", align_corners=align_corners, tap="x")
    assert t is target
    ref = F.interpolate(pred, size=(16, 16), mode="bilinear", align_corners=align_corners)
    assert torch.equal(out, ref)


def test_3d_and_1d_predictions() -> None:
    p3, t3 = torch.randn(1, 2, 2, 2, 2), torch.zeros(1, 4, 4, 4, dtype=torch.long)
    out, _ = reconcile(p3, t3, resize="prediction", align_corners=False, tap="x")
    assert out.shape == (1, 2, 4, 4, 4)
    _, small = reconcile(
        torch.randn(1, 2, 5), torch.arange(10)[None], resize="target", align_corners=False, tap="x"
    )
    assert torch.equal(small, torch.tensor([[0, 2, 4, 6, 8]]))


def test_equal_sizes_and_vectors_pass_through() -> None:
    p, t = torch.randn(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long)
    assert reconcile(p, t, resize=None, align_corners=False, tap="x") == (p, t)
    v, c = torch.randn(2, 3), torch.tensor([0, 1])
    assert reconcile(v, c, resize=None, align_corners=False, tap="x") == (v, c)


def test_cannot_interpolate_four_spatial_dims() -> None:
    with pytest.raises(TargetError, match=r"cannot interpolate a prediction with 4 spatial dims"):
        reconcile(
            torch.randn(1, 1, 2, 2, 2, 2),
            torch.zeros(1, 4, 4, 4, 4),
            resize="prediction",
            align_corners=False,
            tap="x",
        )
