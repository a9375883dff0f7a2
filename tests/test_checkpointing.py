"""Activation checkpointing inside the wrapped model.

Non-reentrant checkpointing (``use_reentrant=False``) re-runs the checkpointed forward during
backward; those re-runs happen after the wrapper's capture window closed, so they capture
nothing, and the gradients equal an un-checkpointed run. Reentrant checkpointing
(``use_reentrant=True``) runs its first forward without autograd: a tap inside it would give an
aux loss that cannot reach the model, which deepsup refuses (``CaptureError``) unless the tap is
``detach=True``. A tap on the module that calls ``checkpoint`` (outside it) works either way.
"""

from __future__ import annotations

import copy
from typing import Literal

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

import deepsup
from deepsup import DeepSupervision, Tap, heads

NUM_CLASSES = 3
Mode = Literal["none", "non-reentrant", "reentrant"]


class Stage(nn.Module):
    """Runs its inner ``block`` directly or through ``torch.utils.checkpoint``."""

    def __init__(self, c_in: int, c_out: int, mode: Mode) -> None:
        super().__init__()
        self.mode = mode
        self.block = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.BatchNorm2d(c_out), nn.GELU()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "none":
            return self.block(x)
        out: torch.Tensor = checkpoint(self.block, x, use_reentrant=self.mode == "reentrant")
        return out


class Net(nn.Module):
    def __init__(self, mode: Mode = "none") -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.stage1 = Stage(8, 16, mode)
        self.stage2 = Stage(16, 32, "none")
        self.cls = nn.Conv2d(32, NUM_CLASSES, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cls(self.stage2(self.stage1(self.stem(x))))
        return nn.functional.interpolate(y, size=x.shape[-2:], mode="bilinear")


def _pair(mode: Mode) -> tuple[Net, Net]:
    """An un-checkpointed model and a checkpointed one with the same weights."""
    plain = Net("none")
    checkpointed = copy.deepcopy(plain)
    checkpointed.stage1.mode = mode
    return plain, checkpointed


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(2, 3, 16, 16), torch.randint(0, NUM_CLASSES, (2, 16, 16))


def _step(sup: DeepSupervision, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Main + aux loss backward from a fixed RNG state; the gradients by parameter name."""
    sup.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    output, aux = sup(x, target=y)
    (nn.functional.cross_entropy(output, y) + sum(aux.values())).backward()
    return {n: p.grad for n, p in sup.named_parameters() if p.grad is not None}


TAPS = ["stage1", "stage1.block", "stage1.block.1"]


@pytest.mark.parametrize("tap", TAPS, ids=TAPS)
def test_non_reentrant_gradients_equal_the_plain_run(tap: str) -> None:
    plain, checkpointed = _pair("non-reentrant")
    x, y = _batch()
    head = heads.seg(NUM_CLASSES)
    sup_plain = DeepSupervision(plain, {tap: 0.4}, head=head, criterion=nn.CrossEntropyLoss())
    sup_ckpt = DeepSupervision(checkpointed, {tap: 0.4}, head=head, criterion=nn.CrossEntropyLoss())
    sup_ckpt.heads.load_state_dict(sup_plain.heads.state_dict())

    expected = _step(sup_plain, x, y)
    got = _step(sup_ckpt, x, y)
    assert set(got) == set(expected) == {n for n, _ in sup_plain.named_parameters()}
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("tap", TAPS, ids=TAPS)
def test_non_reentrant_recomputation_captures_nothing(tap: str) -> None:
    _, model = _pair("non-reentrant")
    sup = DeepSupervision(model, {tap: 0.4}, head=heads.seg(NUM_CLASSES), criterion=None)
    windows: list[bool] = []  # per call of the tapped module: was a capture window open?
    model.get_submodule(tap).register_forward_hook(
        lambda *_: windows.append(sup._capture.records() is not None)
    )
    x, _ = _batch()
    with set_checkpoint_early_stop(False):  # recompute the whole block, its hooks included
        output, preds = sup(x)
        (output.sum() + preds[tap].sum()).backward()
    recomputed = tap != "stage1"  # the block inside the checkpoint runs again in backward
    assert windows == ([True, False] if recomputed else [True])

    # The aux loss alone reaches the stem through the checkpointed block.
    sup.zero_grad(set_to_none=True)
    _, preds = sup(x)
    preds[tap].square().mean().backward()
    assert model.stem[0].weight.grad is not None
    assert model.stem[0].weight.grad.any()


@pytest.mark.parametrize("tap", ["stage1.block", "stage1.block.1"], ids=["block", "block.1"])
def test_reentrant_tap_inside_raises(tap: str) -> None:
    _, model = _pair("reentrant")
    sup = DeepSupervision(
        model, {tap: 0.4}, head=heads.seg(NUM_CLASSES), criterion=nn.CrossEntropyLoss()
    )
    x, y = _batch()
    with pytest.raises(
        deepsup.errors.CaptureError, match=r"captured while autograd was off.*use_reentrant=False"
    ):
        sup(x, target=y)
    assert sup._capture.records() is None  # the failed call left no capture window open


def test_reentrant_tap_outside_works() -> None:
    plain, checkpointed = _pair("reentrant")
    x, y = _batch()
    head = heads.seg(NUM_CLASSES)
    sup_plain = DeepSupervision(plain, {"stage1": 0.4}, head=head, criterion=nn.CrossEntropyLoss())
    sup_ckpt = DeepSupervision(
        checkpointed, {"stage1": 0.4}, head=head, criterion=nn.CrossEntropyLoss()
    )
    sup_ckpt.heads.load_state_dict(sup_plain.heads.state_dict())
    torch.testing.assert_close(_step(sup_ckpt, x, y), _step(sup_plain, x, y))

    # The aux loss alone reaches the stem.
    sup_ckpt.zero_grad(set_to_none=True)
    _, aux = sup_ckpt(x, target=y)
    sum(aux.values()).backward()
    assert checkpointed.stem[0].weight.grad is not None
    assert checkpointed.stem[0].weight.grad.any()


@pytest.mark.parametrize("tap", ["stage1.block", "stage1.block.1"], ids=["block", "block.1"])
def test_reentrant_tap_inside_with_detach_trains_the_head_only(tap: str) -> None:
    _, model = _pair("reentrant")
    sup = DeepSupervision(
        model,
        {tap: Tap(0.4, detach=True)},
        head=heads.seg(NUM_CLASSES),
        criterion=nn.CrossEntropyLoss(),
    )
    x, y = _batch()
    _, aux = sup(x, target=y)
    assert torch.isfinite(aux[tap])
    sum(aux.values()).backward()
    for name, param in sup.heads[tap].named_parameters():
        assert param.grad is not None, name
        assert param.grad.any(), name
    for name, param in sup.model.named_parameters():
        assert param.grad is None or not param.grad.any(), name
