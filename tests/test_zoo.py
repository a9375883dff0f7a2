"""The model zoo: real torchvision, timm and Hugging Face architectures through the same checks.

For each model and tap: the head's input channels are inferred at construction without
``example_input`` and equal the real channel count; the eval wrapper returns what the bare
model returns, bit for bit (also with ``target=``); a training forward gives finite aux losses;
and the aux loss alone sends gradient to the model's first layer and none past the tap.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torchvision.models as tvm
from torch import nn

import deepsup
from deepsup import DeepSupervision, Tap, heads

timm = pytest.importorskip("timm")

pytestmark = pytest.mark.slow

NUM_CLASSES = 5


@dataclass(frozen=True)
class ZooCase:
    """One architecture: how to build it, where to tap it, and which parameters to check."""

    build: Callable[[], nn.Module]
    tap: str
    head: Callable[[int], nn.Module]
    first: str  # a parameter of the model's first layer: must get aux gradient
    after: tuple[str, ...]  # module names that run after the tap: must get none
    layout: str = "NCHW"  # where the channels are in the tapped output (tokens: last)
    dense: bool = False  # dense (B, H, W) target for a seg head, else class labels (B,)
    select: int | None = None
    inputs: str = "image"  # "image" (B, 3, 64, 64) or "text" (token ids)
    tap_settings: dict[str, Any] = field(default_factory=dict)


def _vision_cases() -> dict[str, ZooCase]:
    cls = heads.classification(NUM_CLASSES)
    return {
        "resnet50": ZooCase(
            lambda: tvm.resnet50(weights=None),
            "layer3",
            heads.seg(NUM_CLASSES),
            first="conv1.weight",
            after=("layer4", "fc"),
            dense=True,
        ),
        "densenet121": ZooCase(
            lambda: tvm.densenet121(weights=None),
            "features.transition2",
            cls,
            first="features.conv0.weight",
            after=("features.denseblock3", "features.transition3", "features.denseblock4"),
        ),
        "mobilenet_v3_small": ZooCase(
            lambda: tvm.mobilenet_v3_small(weights=None),
            "features.6",
            cls,
            first="features.0.0.weight",
            after=(*(f"features.{i}" for i in range(7, 13)), "classifier"),
        ),
        "efficientnet_b0": ZooCase(
            lambda: tvm.efficientnet_b0(weights=None),
            "features.5",
            cls,
            first="features.0.0.weight",
            after=("features.6", "features.7", "features.8", "classifier"),
        ),
        "regnet_y_400mf": ZooCase(
            lambda: tvm.regnet_y_400mf(weights=None),
            "trunk_output.block3",
            cls,
            first="stem.0.weight",
            after=("trunk_output.block4", "fc"),
        ),
        "timm_convnext_atto": ZooCase(
            lambda: timm.create_model("convnext_atto", pretrained=False, num_classes=10),
            "stages.2",
            heads.seg(NUM_CLASSES),
            first="stem.0.weight",
            after=("stages.3", "head"),
            dense=True,
        ),
        "timm_vit_tiny": ZooCase(
            lambda: timm.create_model(
                "vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=10
            ),
            "blocks.5",
            heads.tokens(NUM_CLASSES, pool="cls"),
            first="patch_embed.proj.weight",
            after=(*(f"blocks.{i}" for i in range(6, 12)), "norm", "head"),
            layout="tokens",
        ),
        "timm_swin_tiny": ZooCase(
            lambda: timm.create_model(
                "swin_tiny_patch4_window7_224",
                pretrained=False,
                img_size=64,
                window_size=4,
                num_classes=10,
            ),
            "layers.2",
            heads.seg(NUM_CLASSES, layout="NHWC"),
            first="patch_embed.proj.weight",
            after=("layers.3", "norm", "head"),
            layout="NHWC",
            dense=True,
        ),
    }


def _bert() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=16,
    )
    return transformers.BertModel(config)


CASES: dict[str, ZooCase] = {
    **_vision_cases(),
    # BertAttention returns a tuple (hidden states, attention weights): select=0 picks the tensor.
    "hf_bert_tiny": ZooCase(
        _bert,
        "encoder.layer.0.attention",
        heads.tokens(NUM_CLASSES),
        first="embeddings.word_embeddings.weight",
        after=(
            "encoder.layer.0.intermediate",
            "encoder.layer.0.output",
            "encoder.layer.1",
            "encoder.layer.2",
            "pooler",
        ),
        layout="tokens",
        select=0,
        inputs="text",
    ),
}


def _inputs(case: ZooCase) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if case.inputs == "text":
        ids = torch.randint(0, 100, (2, 8))
        return (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return (torch.randn(2, 3, 64, 64),), {}


def _target(case: ZooCase) -> torch.Tensor:
    if case.dense:
        return torch.randint(0, NUM_CLASSES, (2, 64, 64))
    return torch.randint(0, NUM_CLASSES, (2,))


def _channels(case: ZooCase, output: Any) -> int:
    tensor = output if case.select is None and not isinstance(output, tuple) else output[0]
    return int(tensor.shape[1] if case.layout == "NCHW" else tensor.shape[-1])


def assert_same(actual: Any, expected: Any) -> None:
    """Same type and, tensor for tensor, equal bit for bit (ModelOutput, tuples, dicts too)."""
    assert type(actual) is type(expected)
    if isinstance(expected, torch.Tensor):
        assert torch.equal(actual, expected)
    elif isinstance(expected, Mapping):
        assert list(actual.keys()) == list(expected.keys())
        for key in expected:
            assert_same(actual[key], expected[key])
    elif isinstance(expected, (tuple, list)):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            assert_same(a, e)
    else:
        assert actual == expected


@pytest.mark.parametrize("name", list(CASES), ids=list(CASES))
def test_zoo(name: str) -> None:
    case = CASES[name]
    torch.manual_seed(0)
    model = case.build()
    reference = copy.deepcopy(model)  # the bare model, untouched by deepsup
    args, kwargs = _inputs(case)
    target = _target(case)

    # The real channel count, from a forward of the bare copy.
    recorded: list[Any] = []
    handle = reference.get_submodule(case.tap).register_forward_hook(
        lambda _m, _i, out: recorded.append(out)
    )
    reference.eval()
    with torch.no_grad():
        expected = reference(*args, **kwargs)
    handle.remove()
    assert len(recorded) == 1

    tap = Tap(0.4, select=case.select, **case.tap_settings)
    sup = DeepSupervision(
        model, {case.tap: tap}, head=case.head, criterion=nn.CrossEntropyLoss()
    )  # no example_input: channels come from feature_info or the tapped module's layers
    assert sup._in_channels[case.tap] == _channels(case, recorded[0])

    # Eval: the bare model's output, bit for bit, with or without target=.
    sup.eval()
    with torch.no_grad():
        assert_same(sup(*args, **kwargs), expected)
        assert_same(sup(*args, target=target, **kwargs), expected)

    # Training: finite aux losses; the aux loss alone reaches the first layer and nothing after.
    sup.train()
    sup.zero_grad(set_to_none=True)
    output, aux = sup(*args, target=target, **kwargs)
    assert type(output) is type(expected)
    assert list(aux) == [case.tap]
    loss = aux[case.tap]
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    assert torch.isfinite(aux.raw[case.tap])
    torch.testing.assert_close(loss, 0.4 * aux.raw[case.tap])
    sum(aux.values()).backward()

    first = sup.model.get_parameter(case.first).grad
    assert first is not None
    assert first.abs().sum() > 0
    for module_name in case.after:
        for pname, param in sup.model.get_submodule(module_name).named_parameters():
            grad = param.grad
            assert grad is None or not grad.any(), f"{module_name}.{pname} got aux gradient"
    head_grads = [p.grad for p in sup.heads[case.tap].parameters()]
    assert all(g is not None for g in head_grads)


def test_densenet_block_needs_example_input() -> None:
    """A DenseNet block concatenates its layers' outputs: its last conv (the growth rate, 32)
    is not its output's width (1024). The heuristic is wrong there; the first training forward
    says so clearly, and ``example_input=`` gives the exact count."""
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, NUM_CLASSES, (2,))
    model = tvm.densenet121(weights=None)
    guessed = DeepSupervision(
        model,
        {"features.denseblock3": 0.4},
        head=heads.classification(NUM_CLASSES),
        criterion=nn.CrossEntropyLoss(),
    )
    assert guessed._in_channels["features.denseblock3"] == 32
    with pytest.raises(deepsup.errors.ChannelInferenceError, match="built for 32 channels"):
        guessed(x, target=y)

    exact = DeepSupervision(
        guessed.unwrap(),
        {"features.denseblock3": 0.4},
        head=heads.classification(NUM_CLASSES),
        criterion=nn.CrossEntropyLoss(),
        example_input=x[:1],
    )
    assert exact._in_channels["features.denseblock3"] == 1024
    _, aux = exact(x, target=y)
    assert torch.isfinite(aux["features.denseblock3"])
