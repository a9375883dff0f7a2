"""One layout rule: where a tap's channels are, resolved once from the model, drives every consumer.

Head factories that are classes, channel inference on tokens, per-token losses, and the layout of
real blocks (timm ViT, Swin, ConvNeXt; Hugging Face BERT, GPT-2, Llama; a Conv1d audio net; a 3D
conv net), with and without ``example_input``, all through generic heads.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deepsup import DeepSupervision, Tap, heads
from deepsup.errors import ChannelInferenceError, ConfigError, ConfigTypeError

CE = nn.CrossEntropyLoss()


def captured(model: nn.Module, name: str, *args: Any, **kwargs: Any) -> Any:
    """The output of ``model.name`` in one eval forward, by a temporary hook."""
    out: list[Any] = []
    handle = model.get_submodule(name).register_forward_hook(lambda m, a, o: out.append(o))
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        handle.remove()
    return out[0]


# ------------------------------------------------------------------ head= takes any factory


class MyHead(nn.Module):
    """A head whose constructor takes the channel count: a factory in_channels -> nn.Module."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean((2, 3)))


def test_a_class_whose_constructor_takes_the_channel_count_is_a_factory() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 3, 1))
    sup = DeepSupervision(model, "0", head=MyHead, criterion=CE)
    assert isinstance(sup.heads["0"], MyHead) and sup.heads["0"].fc.in_features == 8
    x, y = torch.randn(2, 3, 9, 9), torch.tensor([0, 2])
    _, aux = sup(x, target=y)
    feat = model[0](x)
    torch.testing.assert_close(aux["0"], 0.4 * CE(sup.heads["0"](feat), y))


class TwoMore(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int) -> None:
        super().__init__()


class NoPositional(nn.Module):
    def __init__(self, *, num_classes: int = 3) -> None:
        super().__init__()


@pytest.mark.parametrize(
    ("head", "match"),
    [
        (
            heads.SegHead,
            r"head=SegHead cannot be called as SegHead\(in_channels\): its parameter "
            r"'num_classes' needs a value; pass functools\.partial\(SegHead, "
            r"num_classes=\.\.\.\)",
        ),
        (
            TwoMore,
            r"head=TwoMore cannot be called as TwoMore\(in_channels\): its parameters "
            r"'num_classes', 'width' need a value",
        ),
        (NoPositional, r"head=NoPositional takes no positional argument"),
        (lambda: nn.Identity(), r"head=<lambda> takes no positional argument"),
    ],
    ids=["seghead", "two-missing", "keyword-only", "no-argument-lambda"],
)
def test_callables_that_cannot_take_the_channel_count_are_refused_naming_why(
    head: Any, match: str
) -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    with pytest.raises(ConfigTypeError, match=match):
        DeepSupervision(model, "0", head=head)
    with pytest.raises(ConfigTypeError, match=r"tap '0': " + match):
        DeepSupervision(model, {"0": Tap(head=head)})


def test_a_partial_of_a_builtin_head_class_is_built_for_the_taps_layout() -> None:
    model = nn.Sequential(nn.Linear(5, 16), nn.Linear(16, 3))
    factory = functools.partial(heads.ClassificationHead, num_classes=3)
    sup = DeepSupervision(model, "0", head=factory)
    head = sup.heads["0"]
    assert isinstance(head, heads.ClassificationHead) and head.layout == "NHWC"
    assert head.fc.in_features == 16


# ------------------------------------------------------------------ tokens (B, N, C)


class TokenNet(nn.Module):
    """(B, N) ids -> embed (B, N, 16) -> proj (B, N, 16) -> per-token logits (B, N, 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 16)
        self.proj = nn.Linear(16, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.proj(self.embed(ids))))


@pytest.mark.parametrize("resize", ["prediction", "target", None])
@pytest.mark.parametrize("example", [False, True], ids=["no-example", "example"])
def test_a_ready_linear_head_on_tokens_gives_the_per_token_cross_entropy(
    resize: Any, example: bool
) -> None:
    torch.manual_seed(0)
    model, head = TokenNet(), nn.Linear(16, 3)
    ids, y = torch.randint(0, 10, (2, 7)), torch.randint(0, 3, (2, 7))
    sup = DeepSupervision(model, {"proj": Tap(1.0, head=head)}, criterion=CE, resize=resize,
                          example_input=ids if example else None)  # fmt: skip
    assert sup.taps["proj"].layout == "NHWC"
    _, aux = sup(ids, target=y)
    logits = head(model.proj(model.embed(ids)))
    torch.testing.assert_close(aux["proj"], F.cross_entropy(logits.reshape(-1, 3), y.reshape(-1)))


@pytest.mark.parametrize("example", [False, True], ids=["no-example", "example"])
def test_a_classification_head_on_tokens_pools_the_tokens_of_the_embedding_width(
    example: bool,
) -> None:
    torch.manual_seed(0)
    model = TokenNet()
    ids, y = torch.randint(0, 10, (2, 17)), torch.tensor([0, 2])
    sup = DeepSupervision(model, "proj", head=heads.classification(3), criterion=CE,
                          example_input=ids if example else None)  # fmt: skip
    head = sup.heads["proj"]
    assert head.fc.in_features == 16  # not 17, the token count
    _, aux = sup(ids, target=y)
    feat = model.proj(model.embed(ids))
    torch.testing.assert_close(aux["proj"], 0.4 * CE(head.fc(feat.mean(1)), y))


# ------------------------------------------------------------------ real blocks


@dataclass(frozen=True)
class Block:
    """A real block: how to build the model and an input, where to tap, what the tap outputs."""

    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple[tuple[Any, ...], dict[str, Any]]]
    tap: str
    layout: str
    channels: int
    target: Callable[[Any], torch.Tensor]  # from the tapped tensor: labels for the head
    head: Callable[[], Any]
    ambiguous_without_example: bool = False


def _timm(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    timm = pytest.importorskip("timm")
    return lambda: timm.create_model(name, pretrained=False, num_classes=10, **kwargs)


def _image() -> tuple[tuple[Any, ...], dict[str, Any]]:
    return (torch.randn(2, 3, 64, 64),), {}


def _hf(kind: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        transformers = pytest.importorskip("transformers")
        small = {"vocab_size": 50, "num_hidden_layers": 2, "num_attention_heads": 4}
        if kind == "bert":
            return transformers.BertModel(
                transformers.BertConfig(
                    hidden_size=32, intermediate_size=64, max_position_embeddings=16, **small
                )
            )
        if kind == "gpt2":
            return transformers.GPT2LMHeadModel(
                transformers.GPT2Config(
                    vocab_size=50,
                    n_positions=16,
                    n_embd=32,
                    n_layer=2,
                    n_head=4,
                    bos_token_id=0,
                    eos_token_id=0,
                )
            )
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_key_value_heads=2,
            max_position_embeddings=32, **small))  # fmt: skip

    return build


def _ids() -> tuple[tuple[Any, ...], dict[str, Any]]:
    ids = torch.randint(0, 50, (2, 7))
    return (), {"input_ids": ids}


class AudioNet(nn.Module):
    """Conv1d over (B, 1, L) waveforms, as keyword spotting nets are built."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv1d(1, 12, 9, stride=4), nn.BatchNorm1d(12), nn.ReLU())
        self.block = nn.Sequential(nn.Conv1d(12, 24, 5, stride=2), nn.ReLU())
        self.fc = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(self.stem(x)).mean(-1))


class Volume(nn.Module):
    """A small 3D conv net over (B, 1, D, H, W)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Conv3d(1, 6, 3, padding=1), nn.InstanceNorm3d(6), nn.ReLU())
        self.down = nn.Sequential(nn.Conv3d(6, 10, 3, stride=2, padding=1), nn.ReLU())
        self.out = nn.Conv3d(10, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.out(self.down(self.enc(x))), size=x.shape[2:])


def _labels(t: Any) -> torch.Tensor:
    return torch.randint(0, 5, (t.shape[0],))


def _tokens_labels(t: Any) -> torch.Tensor:
    return torch.randint(0, 5, t.shape[:2])


BLOCKS: dict[str, Block] = {
    "timm-vit-block": Block(_timm("vit_tiny_patch16_224", img_size=64), _image, "blocks.5",
                            "NHWC", 192, _labels, lambda: heads.classification(5)),
    "timm-swin-stage": Block(_timm("swin_tiny_patch4_window7_224", img_size=64, window_size=4),
                             _image, "layers.2", "NHWC", 384, _labels,
                             lambda: heads.classification(5)),
    # conv_mlp=False: the blocks' MLPs are channels-last Linear layers between permutes
    "timm-convnext-stage": Block(_timm("convnext_atto", conv_mlp=False), _image, "stages.2",
                                 "NCHW", 160, _labels, lambda: heads.classification(5)),
    "timm-convnext-block": Block(_timm("convnext_atto", conv_mlp=False), _image,
                                 "stages.2.blocks.0", "NCHW", 160, _labels,
                                 lambda: heads.classification(5), ambiguous_without_example=True),
    "hf-bert-layer": Block(_hf("bert"), _ids, "encoder.layer.1", "NHWC", 32, _labels,
                           lambda: heads.classification(5)),
    "hf-gpt2-block": Block(_hf("gpt2"), _ids, "transformer.h.0", "NHWC", 32, _tokens_labels,
                           lambda: nn.Linear(32, 5)),
    "hf-gpt2-attention-tuple": Block(_hf("gpt2"), _ids, "transformer.h.1.attn", "NHWC", 32,
                                     _labels, lambda: heads.classification(5)),
    "hf-llama-layer": Block(_hf("llama"), _ids, "model.layers.0", "NHWC", 32, _tokens_labels,
                            lambda: nn.Linear(32, 5)),
    "hf-llama-attention-tuple": Block(_hf("llama"), _ids, "model.layers.1.self_attn", "NHWC",
                                      32, _labels, lambda: heads.classification(5)),
    "conv1d-audio": Block(AudioNet, lambda: ((torch.randn(2, 1, 400),), {}), "block", "NCHW",
                          24, _labels, lambda: heads.classification(5)),
    "conv3d-volume": Block(Volume, lambda: ((torch.randn(2, 1, 8, 8, 8),), {}), "down", "NCHW",
                           10, _labels, lambda: heads.classification(5)),
}  # fmt: skip


def _tensor(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


@pytest.mark.slow
@pytest.mark.parametrize("example", [False, True], ids=["no-example", "example"])
@pytest.mark.parametrize("name", list(BLOCKS))
def test_real_blocks_resolve_their_layout_and_train_with_generic_heads(
    name: str, example: bool
) -> None:
    case = BLOCKS[name]
    torch.manual_seed(0)
    model = case.build()
    args, kwargs = case.inputs()
    feat = _tensor(captured(model.eval(), case.tap, *args, **kwargs))
    assert feat.shape[1 if case.layout == "NCHW" else -1] == case.channels
    example_input = (args if args else kwargs) if example else None
    if args and example:
        example_input = args[0]
    build = functools.partial(DeepSupervision, model, {case.tap: 0.4}, head=case.head(),
                              criterion=CE, example_input=example_input)  # fmt: skip
    if case.ambiguous_without_example and not example:
        with pytest.raises(ConfigError, match=r"ambiguous.*example_input=.*Tap\(layout="):
            build()
        return
    sup = build()
    assert sup.taps[case.tap].layout == case.layout
    if isinstance(case.head(), nn.Module):
        assert sup.heads[case.tap].in_features == case.channels  # type: ignore[union-attr]
    else:
        assert sup.heads[case.tap].fc.in_features == case.channels
    expected = model.eval()(*args, **kwargs)
    sup.eval()
    with torch.no_grad():
        got = sup(*args, **kwargs)
    first = got if isinstance(got, torch.Tensor) else got[0]
    assert torch.equal(first, expected if isinstance(expected, torch.Tensor) else expected[0])
    sup.train()
    y = case.target(feat)
    torch.manual_seed(1)  # the same dropout and drop-path draws in both training forwards
    _, aux = sup(*args, target=y, **kwargs)
    head = sup.heads[case.tap]
    torch.manual_seed(1)
    with torch.no_grad():
        live = _tensor(captured(model.train(), case.tap, *args, **kwargs))
    assert torch.isfinite(aux[case.tap])
    if y.dim() == 1:
        pred = head(live)
        torch.testing.assert_close(aux[case.tap], 0.4 * CE(pred, y), rtol=1e-4, atol=1e-5)


def test_resolve_on_hand_built_evidence() -> None:
    """The rule's order: declared, dry-run shape against the layers' counts, layers, timm."""
    from deepsup._layout import resolve

    to_nhwc = nn.Sequential(nn.Conv2d(3, 6, 1), Permute())
    assert resolve(to_nhwc, "1", to_nhwc[1], shape=(2, 10, 10, 6)).layout == "NHWC"
    assert resolve(to_nhwc, "1", to_nhwc[1]).layout is None  # no layers, not a pass-through
    relu = nn.Sequential(nn.Conv2d(3, 6, 1), nn.ReLU())
    assert resolve(relu, "1", relu[1]) == (("NCHW", 6))
    # a dry-run shape that fits both ends with the layers' count stays with the layers' layout
    lin = nn.Sequential(nn.Linear(4, 6))
    assert resolve(lin, "0", lin[0], shape=(2, 6, 6)) == ("NHWC", 6)
    with pytest.raises(ConfigError, match=r"tap '1'.*head takes 'NCHW' input.*'NHWC'"):
        resolve(to_nhwc, "1", to_nhwc[1], shape=(2, 10, 10, 6), head_declared="NCHW")


class Permute(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


def test_an_undecided_layout_is_asked_for_where_it_matters() -> None:
    model = nn.Sequential(nn.Conv2d(3, 6, 1), Permute(), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(1, 3, 4, 4))
    sup = DeepSupervision(model, {"1": Tap(head=nn.Identity())}, criterion=CE)
    with pytest.raises(ConfigError, match=r"tap '1'.*pass Tap\(layout='NCHW'\).*example_input="):
        sup(torch.randn(2, 3, 4, 4), target=torch.randint(0, 6, (2, 4, 4)))
    fixed = DeepSupervision(model, {"1": Tap(head=nn.Identity(), layout="NHWC")}, criterion=CE)
    x, y = torch.randn(2, 3, 4, 4), torch.randint(0, 6, (2, 4, 4))
    _, aux = fixed(x, target=y)
    feat = model[1](model[0](x))
    torch.testing.assert_close(aux["1"], 0.4 * CE(feat.permute(0, 3, 1, 2), y))


def test_channel_inference_error_still_names_what_to_pass() -> None:
    class Cat(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x, x], 1)

    model = nn.Sequential(nn.Conv2d(3, 4, 1), Cat())
    with pytest.raises(ChannelInferenceError, match=r"tap '1' \(Cat\); pass example_input="):
        DeepSupervision(model, "1", head=heads.classification(2))
    sup = DeepSupervision(model, "1", head=heads.classification(2),
                          example_input=torch.randn(2, 3, 5, 5))  # fmt: skip
    assert sup.heads["1"].fc.in_features == 8 and sup.taps["1"].layout == "NCHW"


class _Mixed(nn.Module):
    """Conv and Linear layers of 8 channels each: its layers say nothing about the layout."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.lin = nn.Conv2d(3, 8, 1), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_a_declared_layout_settles_a_shape_with_the_channel_count_at_both_ends() -> None:
    from deepsup._layout import Resolved, resolve

    model = nn.Sequential(_Mixed())
    shape = (2, 8, 5, 8)
    with pytest.raises(ConfigError, match="ambiguous"):
        resolve(model, "0", model[0], shape=shape)
    assert resolve(model, "0", model[0], shape=shape, declared="NHWC") == Resolved("NHWC", 8)
    assert resolve(model, "0", model[0], shape=shape, head_declared="NCHW") == Resolved("NCHW", 8)
    x = torch.randn(2, 3, 5, 8)
    sup = DeepSupervision(model, {"0": Tap(0.4, layout="NCHW")}, head=heads.classification(3),
                          example_input=x)  # fmt: skip
    assert sup.taps["0"].layout == "NCHW"
    with pytest.raises(ConfigError, match=r"ambiguous.*Tap\(layout="):
        DeepSupervision(model, {"0": 0.4}, head=heads.classification(3), example_input=x)
