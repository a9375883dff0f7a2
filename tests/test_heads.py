"""Built-in heads and their factories."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from deepsup import heads


def test_seg_head_is_the_pspnet_aux_head() -> None:
    head = heads.seg(21)(1024)
    layers = [type(m) for m in head.children()]
    assert layers == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Dropout2d, nn.Conv2d]
    assert head.conv.kernel_size == (3, 3) and head.conv.bias is None
    assert (head.conv.in_channels, head.conv.out_channels) == (1024, 256)
    assert head.dropout.p == 0.1
    assert (head.cls.in_channels, head.cls.out_channels, head.cls.kernel_size) == (256, 21, (1, 1))
    assert heads.seg(5, hidden=32, dropout=0.3)(64).conv.out_channels == 32


def test_seg_head_nhwc_equals_nchw() -> None:
    nchw = heads.SegHead(8, 3, dropout=0.0).eval()
    nhwc = heads.SegHead(8, 3, dropout=0.0, layout="NHWC").eval()
    nhwc.load_state_dict(nchw.state_dict())
    x = torch.randn(2, 8, 5, 6)
    torch.testing.assert_close(nhwc(x.permute(0, 2, 3, 1)), nchw(x))


@pytest.mark.parametrize(
    ("shape", "layout"),
    [((2, 16), "NCHW"), ((2, 16, 7), "NCHW"), ((2, 16, 4, 4), "NCHW"), ((2, 4, 4, 16), "NHWC")],
    ids=["vector", "1d", "2d", "nhwc"],
)
def test_classification_head_pools_any_layout(shape: tuple[int, ...], layout: str) -> None:
    head = heads.classification(5, layout=layout)(16)  # type: ignore[arg-type]
    x = torch.randn(*shape)
    out = head(x)
    assert out.shape == (2, 5)
    # global *average* pooling over every spatial dim, then the linear layer
    channels_last = x if layout == "NHWC" else x.movedim(1, -1)
    pooled = channels_last.reshape(2, -1, 16).mean(1)
    torch.testing.assert_close(out, pooled @ head.fc.weight.T + head.fc.bias)


def test_token_head_pooling() -> None:
    head = heads.TokenHead(8, 3, pool="cls")
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(head(x), head.fc(head.norm(x)[:, 0]))
    mean = heads.TokenHead(8, 3)
    torch.testing.assert_close(mean(x), mean.fc(mean.norm(x).mean(1)))
    with pytest.raises(ValueError, match=r"TokenHead expects tokens of shape \(B, N, C\)"):
        head(torch.randn(2, 8, 3, 3))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: heads.seg(0), r"num_classes must be a positive int \(got 0\)"),
        (lambda: heads.SegHead(8, 3, layout="CHW"), r"layout must be 'NCHW' or 'NHWC'"),
        (lambda: heads.tokens(3, pool="max"), r"pool must be 'mean' or 'cls' \(got 'max'\)"),
        (lambda: heads.classification(2)(True), r"in_channels must be a positive int"),
    ],
    ids=["classes", "layout", "pool", "bool-channels"],
)
def test_invalid_head_arguments(build: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()  # type: ignore[operator]


def test_factories_pickle_and_repr() -> None:
    f = heads.tokens(10, pool="cls")
    assert repr(f) == "heads.tokens(num_classes=10, pool='cls')"
    g = pickle.loads(pickle.dumps(f))
    assert g(32).fc.out_features == 10
