"""The same checks on CPU and on a CUDA GPU (the CUDA variants skip cleanly without one).

Eval passthrough bit for bit with no head run; a train step equals a hand-written aux branch
(with and without autocast, GradScaler for fp16); ``torch.compile`` of the eval wrapper.
``benchmarks/gpu_check.py`` runs these checks and a timing on a GPU machine in one go.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext

import pytest
import torch
import torchvision.models as tvm
from torch import nn

from deepsup import DeepSupervision, heads

NUM_CLASSES = 4
WEIGHT = 0.4
HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def _resnet18() -> nn.Module:
    torch.manual_seed(0)
    return tvm.resnet18(weights=None, num_classes=NUM_CLASSES)


def _hand_written(
    model: tvm.ResNet, head: nn.Module, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's ResNet forward with the aux branch coded in: (logits, aux logits)."""
    h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    feat = model.layer3(model.layer2(model.layer1(h)))
    out = model.fc(torch.flatten(model.avgpool(model.layer4(feat)), 1))
    return out, head(feat)


def _batch(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 32, 32, generator=g)
    y = torch.randint(0, NUM_CLASSES, (4,), generator=g)
    return x.to(device), y.to(device)


# CUDA only: the CPU case is tests/test_wrapper.py::test_eval_is_bit_identical_to_bare_model...
@pytest.mark.parametrize("device", [pytest.param("cuda", id="cuda", marks=requires_cuda)])
def test_eval_passthrough_bit_identical(device: str) -> None:
    model = _resnet18()
    bare = copy.deepcopy(model).to(device).eval()
    sup = DeepSupervision(model, {"layer3": WEIGHT}, head=heads.seg(NUM_CLASSES)).to(device).eval()
    calls: list[int] = []
    sup.heads["layer3"].register_forward_hook(lambda *_: calls.append(1))
    x, y = _batch(device)
    with torch.no_grad():
        assert torch.equal(sup(x, target=y), bare(x))
        assert torch.equal(sup(x), bare(x))
    assert calls == []  # no head ran


# (device, autocast dtype): fp16 with GradScaler is the CUDA recipe; CPU autocast uses bf16.
TRAIN_CASES = [
    pytest.param("cpu", None, id="cpu-fp32"),
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param("cuda", None, id="cuda-fp32", marks=requires_cuda),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=requires_cuda),
    pytest.param("cuda", torch.float16, id="cuda-fp16", marks=requires_cuda),
]


@pytest.mark.parametrize(("device", "dtype"), TRAIN_CASES)
def test_train_step_matches_hand_written(device: str, dtype: torch.dtype | None) -> None:
    model = _resnet18()
    head = heads.classification(NUM_CLASSES)(256)
    reference = copy.deepcopy(model).to(device)
    reference_head = copy.deepcopy(head).to(device)
    sup = DeepSupervision(model, {"layer3": WEIGHT}, head=head, criterion=nn.CrossEntropyLoss()).to(
        device
    )
    criterion = nn.CrossEntropyLoss()
    x, y = _batch(device)

    def autocast() -> torch.autocast | nullcontext[None]:
        return nullcontext() if dtype is None else torch.autocast(device, dtype=dtype)

    optimizers, scalers, losses = [], [], []
    for params in (sup.parameters(), [*reference.parameters(), *reference_head.parameters()]):
        optimizers.append(torch.optim.SGD(params, lr=0.1))
        scalers.append(torch.amp.GradScaler(device, enabled=dtype == torch.float16))

    with autocast():
        output, aux = sup(x, target=y)
        loss = criterion(output, y) + sum(aux.values())
    with autocast():
        out_ref, aux_ref = _hand_written(reference, reference_head, x)
        loss_ref = criterion(out_ref, y) + WEIGHT * criterion(aux_ref, y)
    for scaler, optimizer, value in zip(scalers, optimizers, (loss, loss_ref), strict=True):
        losses.append(value.detach())
        scaler.scale(value).backward()
        scaler.step(optimizer)
        scaler.update()

    assert loss.dtype == loss_ref.dtype == torch.float32
    assert aux["layer3"].dtype == torch.float32
    assert torch.isfinite(loss)
    tol = {} if dtype is None else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(losses[0], losses[1], **tol)
    for (name, p), p_ref in zip(sup.model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, p_ref, **tol, msg=name)
    for p, p_ref in zip(sup.heads["layer3"].parameters(), reference_head.parameters(), strict=True):
        torch.testing.assert_close(p, p_ref, **tol)


@requires_cuda
def test_compile_eval_cuda() -> None:
    model = _resnet18()
    bare = copy.deepcopy(model).cuda().eval()
    sup = DeepSupervision(model, {"layer3": WEIGHT}, head=heads.seg(NUM_CLASSES)).cuda().eval()
    compiled = torch.compile(sup)
    x, y = _batch("cuda")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), bare(x))
        torch.testing.assert_close(compiled(x, target=y), bare(x))
