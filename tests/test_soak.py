"""Soak: many training steps keep memory flat and free every step's features; threads agree.

Tensor memory is measured as the bytes of all tensors the garbage collector can see (storages
counted once), so the check runs on the CPU as well as on CUDA.
"""

from __future__ import annotations

import copy
import gc
import threading
import warnings
import weakref
from typing import Any

import pytest
import torch
from torch import nn

from deepsup import DeepSupervision, Tap, heads


class Net(nn.Module):
    """Three stages of a small CNN and a classifier; no BatchNorm (threads share no state)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stage1 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU())
        self.cls = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cls(self.stage2(self.stage1(torch.relu(self.stem(x)))))
        return nn.functional.interpolate(y, size=x.shape[-2:], mode="bilinear")


TAPS = {"stem": 0.2, "stage1": Tap(0.3, resize="target"), "stage2": 0.4}


def tensor_bytes() -> int:
    gc.collect()
    seen: set[int] = set()
    total = 0
    with warnings.catch_warnings():  # isinstance() on deprecated torch objects warns
        warnings.simplefilter("ignore")
        objects = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    for obj in objects:
        if isinstance(obj, nn.Parameter):
            continue
        try:  # fake or functional tensors (left by compiled tests in this process) have no data
            storage = obj.untyped_storage()
            ptr, size = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):
            continue
        if ptr not in seen:
            seen.add(ptr)
            total += size
    return total


class KeepRef:
    """A forward hook (besides deepsup's) that keeps a weak reference to each output."""

    def __init__(self) -> None:
        self.refs: list[weakref.ref[torch.Tensor]] = []

    def __call__(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        self.refs.append(weakref.ref(output))


@pytest.mark.slow
def test_a_thousand_steps_keep_memory_flat_and_free_every_steps_features() -> None:
    torch.manual_seed(0)
    model = Net()
    keep = KeepRef()
    model.stage1.register_forward_hook(keep)
    sup = DeepSupervision(
        model, TAPS, head=heads.seg(4, hidden=8), criterion=nn.CrossEntropyLoss(ignore_index=255)
    )
    opt = torch.optim.SGD(sup.parameters(), lr=1e-3, momentum=0.9)
    x, y = torch.randn(2, 3, 16, 16), torch.randint(0, 4, (2, 16, 16))
    y[:, ::3] = 255

    def step() -> None:
        out, aux = sup(x, target=y)
        loss = nn.functional.cross_entropy(out, y, ignore_index=255) + sum(aux.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sup.step()

    for _ in range(50):  # warm-up: optimizer state, allocator caches
        step()
    base = tensor_bytes()
    for i in range(1000):
        step()
        if i % 250 == 249:
            grown = tensor_bytes() - base
            assert grown <= 64 * 1024, f"tensor memory grew by {grown} bytes after {i + 1} steps"
    gc.collect()
    alive = [r for r in keep.refs if r() is not None]
    assert len(keep.refs) == 1050 and not alive, f"{len(alive)} steps' features still alive"
    assert sup._capture.records() is None
    assert sup.progress == 1050


@pytest.mark.slow
def test_concurrent_training_forwards_from_eight_threads_equal_serial() -> None:
    torch.manual_seed(0)
    sup = DeepSupervision(Net(), TAPS, head=heads.seg(4, hidden=8, dropout=0.0),
                          criterion=nn.CrossEntropyLoss())  # fmt: skip
    sup.heads.eval()  # BatchNorm of the heads in eval: no shared statistics change between calls
    inputs = [
        torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(8)
    ]
    targets = [torch.randint(0, 4, (2, 16, 16), generator=torch.Generator().manual_seed(i))
               for i in range(8)]  # fmt: skip
    serial = [sup(x, target=y) for x, y in zip(inputs, targets)]

    results: dict[int, Any] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def work(i: int) -> None:
        try:
            barrier.wait()
            for _ in range(5):
                results[i] = sup(inputs[i], target=targets[i])
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, (out, aux) in enumerate(serial):
        got_out, got_aux = results[i]
        torch.testing.assert_close(got_out, out, rtol=0, atol=0)
        assert list(got_aux) == list(aux)
        for name in aux:
            torch.testing.assert_close(got_aux[name], aux[name], rtol=0, atol=0)
            torch.testing.assert_close(got_aux.raw[name], aux.raw[name], rtol=0, atol=0)
    assert sup._capture.records() is None
    assert copy.deepcopy(sup)._capture.records() is None
