"""Resizing predictions and targets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from deepsup._targets import nearest as downsample_target
from deepsup.errors import TargetError
from deepsup.functional import reconcile


def _floor_indices(size_in: int, size_out: int) -> list[int]:
    """The promised rule, in Python integers: output index i takes source index i * in // out."""
    return [i * size_in // size_out for i in range(size_out)]


def _torch_nearest_indices(size_in: int, size_out: int) -> list[int]:
    """The source index that ``F.interpolate(mode="nearest")`` picks for each output index."""
    src = torch.arange(size_in, dtype=torch.float32)[None, None]  # a float32 label map
    return F.interpolate(src, size=(size_out,), mode="nearest")[0, 0].long().tolist()


# Hypothesis: deterministic under CI=true (tests/conftest.py), a wider search locally.
@settings(deadline=None)
@given(h=st.integers(1, 64), w=st.integers(1, 64), oh=st.integers(1, 64), ow=st.integers(1, 64))
def test_downsample_target_indexes_with_exact_integer_floor(
    h: int, w: int, oh: int, ow: int
) -> None:
    oh, ow = min(oh, h), min(ow, w)
    t = torch.randint(0, 21, (2, h, w))
    t[:, ::3] = 255
    ref = t[:, _floor_indices(h, oh)][:, :, _floor_indices(w, ow)]
    out = downsample_target(t, (oh, ow))
    assert out.dtype == t.dtype
    assert torch.equal(out, ref)


@settings(deadline=None)
@given(size_in=st.integers(1, 64), size_out=st.integers(1, 64))
def test_downsample_target_differs_from_torch_nearest_only_on_exact_quotients(
    size_in: int, size_out: int
) -> None:
    """torch computes i * (in / out) in floating point and can round an exact quotient down."""
    size_out = min(size_out, size_in)
    ours = downsample_target(torch.arange(size_in)[None], (size_out,))[0].tolist()
    theirs = _torch_nearest_indices(size_in, size_out)
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert a == b or (a == b + 1 and i * size_in % size_out == 0), (i, a, b)


# The sizes with in <= 64 where F.interpolate(mode="nearest") picks another row (found by
# enumerating every pair); the docstring of downsample_target names the first ones.
DISAGREEING = [(26, 22), (39, 33), (52, 22), (52, 44), (54, 38), (56, 46), (58, 54), (60, 58)]
DISAGREEING += [(62, 14), (62, 28), (62, 56)]


@pytest.mark.parametrize(("size_in", "size_out"), DISAGREEING, ids=lambda v: str(v))
def test_sizes_where_torch_nearest_rounds_down(size_in: int, size_out: int) -> None:
    ours = downsample_target(torch.arange(size_in)[None], (size_out,))[0].tolist()
    assert ours == _floor_indices(size_in, size_out)
    theirs = _torch_nearest_indices(size_in, size_out)
    differ = [i for i in range(size_out) if ours[i] != theirs[i]]
    assert differ, "torch now agrees: update downsample_target's docstring"
    assert all(ours[i] == theirs[i] + 1 == i * size_in // size_out for i in differ)


def test_known_disagreement_26_to_22_and_39_to_33() -> None:
    t = torch.arange(26)[None]
    assert downsample_target(t, (22,))[0, 11] == 13  # 11 * 26 / 22 = 13 exactly
    assert F.interpolate(t[:, None].float(), size=(22,), mode="nearest")[0, 0, 11] == 12
    t2 = torch.arange(39 * 39).reshape(1, 39, 39)
    out = downsample_target(t2, (33, 33))
    rows = _floor_indices(39, 33)
    assert torch.equal(out, t2[:, rows][:, :, rows])
    assert rows[11] == 13 and rows[22] == 26  # 11 * 39 / 33 = 13, 22 * 39 / 33 = 26


@pytest.mark.parametrize(("size_in", "size_out"), [(64, 32), (60, 20), (9, 3), (7, 7), (5, 1)])
def test_integer_ratios_pick_the_pixels_of_torch_nearest(size_in: int, size_out: int) -> None:
    t = torch.randint(0, 21, (2, size_in, size_in))
    ref = F.interpolate(t[:, None].float(), size=(size_out, size_out), mode="nearest")
    assert torch.equal(downsample_target(t, (size_out, size_out)), ref[:, 0].long())


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


def test_dense_3d_targets_keep_their_channels() -> None:
    pred, soft = torch.randn(1, 2, 2, 3, 4), torch.rand(1, 2, 4, 6, 8)
    out, t = reconcile(pred, soft, resize="prediction", align_corners=False, tap="x")
    assert t is soft
    torch.testing.assert_close(out, F.interpolate(pred, size=(4, 6, 8), mode="trilinear"))
    p2, small = reconcile(pred, soft, resize="target", align_corners=False, tap="x")
    assert p2 is pred
    assert torch.equal(small, soft[:, :, ::2, ::2, ::2])


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
