"""Mixed precision (autocast, GradScaler) and channels_last memory format.

Heads run inside the caller's autocast (low-precision convs and linears), and the aux losses come
out in float32 like the main cross-entropy: the weight is a float32 buffer and autocast runs the
losses in float32. A channels_last model and input keep the eval passthrough bit-identical.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torchvision.models as tvm
from conftest import ConvNet
from torch import nn

from deepsup import DeepSupervision, heads

NUM_CLASSES = 3
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _convnet() -> tuple[nn.Module, dict[str, float], Callable[[int], nn.Module], bool]:
    return ConvNet(NUM_CLASSES), {"stage1": 0.4}, heads.seg(NUM_CLASSES), True


def _resnet18() -> tuple[nn.Module, dict[str, float], Callable[[int], nn.Module], bool]:
    model = tvm.resnet18(weights=None, num_classes=NUM_CLASSES)
    return model, {"layer2": 0.4, "layer3": 0.3}, heads.classification(NUM_CLASSES), False


MODELS = {"convnet": _convnet, "resnet18": _resnet18}


def _batch(dense: bool, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(2, 3, 32, 32, device=device)
    shape = (2, 32, 32) if dense else (2,)
    return x, torch.randint(0, NUM_CLASSES, shape, device=device)


def _wrap(name: str) -> tuple[DeepSupervision, bool]:
    model, taps, head, dense = MODELS[name]()
    sup = DeepSupervision(model, taps, head=head, criterion=nn.CrossEntropyLoss())
    return sup, dense


@pytest.mark.parametrize("name", list(MODELS), ids=list(MODELS))
def test_autocast_bf16_cpu_losses_are_float32(name: str) -> None:
    sup, dense = _wrap(name)
    x, y = _batch(dense)
    criterion = nn.CrossEntropyLoss()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output, aux = sup(x, target=y)
        main = criterion(output, y)
    assert output.dtype == torch.bfloat16  # the model really ran in low precision
    assert main.dtype == torch.float32
    for tap, loss in aux.items():
        assert loss.dtype == main.dtype, tap
        assert aux.raw[tap].dtype == torch.float32, tap
        assert torch.isfinite(loss), tap
    (main + sum(aux.values())).backward()
    for pname, param in sup.named_parameters():
        assert param.grad is not None, pname
        assert torch.isfinite(param.grad).all(), pname
    for tap in aux:
        assert any(p.grad.any() for p in sup.heads[tap].parameters()), tap  # type: ignore[union-attr]


@pytest.mark.parametrize("name", list(MODELS), ids=list(MODELS))
def test_heads_run_inside_the_callers_autocast(name: str) -> None:
    model, taps, head, _ = MODELS[name]()
    sup = DeepSupervision(model, taps, head=head, criterion=None)
    x, _ = _batch(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, preds = sup(x)
    assert {tap: p.dtype for tap, p in preds.items()} == dict.fromkeys(taps, torch.bfloat16)
    _, preds = sup(x)  # and in float32 outside it
    assert {tap: p.dtype for tap, p in preds.items()} == dict.fromkeys(taps, torch.float32)


@pytest.mark.parametrize("name", list(MODELS), ids=list(MODELS))
def test_channels_last(name: str) -> None:
    model, taps, head, dense = MODELS[name]()
    model = model.to(memory_format=torch.channels_last)
    reference = copy.deepcopy(model)
    sup = DeepSupervision(model, taps, head=head, criterion=nn.CrossEntropyLoss())
    sup.to(memory_format=torch.channels_last)
    x, y = _batch(dense)
    x = x.contiguous(memory_format=torch.channels_last)

    sup.eval()
    reference.eval()
    with torch.no_grad():
        assert torch.equal(sup(x, target=y), reference(x))

    sup.train()
    output, aux = sup(x, target=y)
    assert output.shape == reference(x).shape
    assert set(aux) == set(taps)
    assert all(torch.isfinite(v) for v in aux.values())
    sum(aux.values()).backward()
    first = next(p for p in sup.model.parameters() if p.dim() == 4)
    assert first.grad is not None
    assert first.grad.any()


@pytest.mark.parametrize("name", list(MODELS), ids=list(MODELS))
def test_channels_last_matches_contiguous(name: str) -> None:
    """Same weights and seed: channels_last changes the layout, not the aux losses."""
    contiguous, dense = _wrap(name)
    last = copy.deepcopy(contiguous).to(memory_format=torch.channels_last)
    x, y = _batch(dense)
    torch.manual_seed(1)
    _, aux = contiguous(x, target=y)
    torch.manual_seed(1)
    _, aux_last = last(x.contiguous(memory_format=torch.channels_last), target=y)
    torch.testing.assert_close(dict(aux_last), dict(aux), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(MODELS), ids=list(MODELS))
def test_autocast_bf16_with_channels_last(name: str) -> None:
    sup, dense = _wrap(name)
    sup.to(memory_format=torch.channels_last)
    x, y = _batch(dense)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, aux = sup(x.contiguous(memory_format=torch.channels_last), target=y)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in aux.values())
    sum(aux.values()).backward()


# CUDA ---------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", list(MODELS), ids=list(MODELS))
def test_cuda_autocast_train_step(name: str, dtype: torch.dtype) -> None:
    sup, dense = _wrap(name)
    sup.cuda()
    x, y = _batch(dense, device="cuda")
    optimizer = torch.optim.SGD(sup.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    criterion = nn.CrossEntropyLoss()
    with torch.autocast("cuda", dtype=dtype):
        output, aux = sup(x, target=y)
        main = criterion(output, y)
    assert output.dtype == dtype
    assert main.dtype == torch.float32
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in aux.values())
    scaler.scale(main + sum(aux.values())).backward()
    scaler.step(optimizer)
    scaler.update()
    for pname, param in sup.named_parameters():
        assert param.grad is not None, pname
        assert torch.isfinite(param.grad).all(), pname


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_autocast_eval_passthrough(dtype: torch.dtype) -> None:
    model, taps, head, _ = _resnet18()
    reference = copy.deepcopy(model).cuda().eval()
    sup = DeepSupervision(model, taps, head=head, criterion=nn.CrossEntropyLoss()).cuda().eval()
    x = torch.randn(2, 3, 32, 32, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        assert torch.equal(sup(x), reference(x))
