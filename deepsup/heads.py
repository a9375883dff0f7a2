"""Auxiliary heads, and factories that build them from a tapped feature's channel count.

``DeepSupervision(head=...)`` takes a *factory*: a callable ``in_channels -> nn.Module``. The
functions here return such factories (small, picklable objects with a readable ``repr``); the
classes are the heads themselves, usable directly.

Layouts: ``DeepSupervision`` resolves where the channels of each tapped output are (``"NCHW"``:
dim 1; ``"NHWC"``: last, tokens (B, N, C) included) from the model, and builds every head for
it. A head that takes only one layout declares it with a ``layout`` attribute, and the layout of
its prediction with ``output_layout``; the factories here leave ``layout`` at None and are built
for the tap's layout (any factory with a ``layout=`` keyword is). A custom head may declare
them too.

Example:
    >>> import torch
    >>> from deepsup import heads
    >>> make = heads.seg(num_classes=21)
    >>> head = make(1024)
    >>> head(torch.randn(2, 1024, 8, 8)).shape
    torch.Size([2, 21, 8, 8])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from ._checks import check_int
from ._layout import Layout, check_layout
from .errors import ConfigError, ConfigTypeError

__all__ = [
    "ClassificationHead",
    "HeadFactory",
    "Reuse",
    "SegHead",
    "TokenHead",
    "classification",
    "reuse",
    "seg",
    "tokens",
]

HeadFactory = Callable[[int], nn.Module]


def _check_pool(pool: str) -> str:
    if pool not in ("mean", "cls"):
        raise ConfigError(f"pool must be 'mean' or 'cls' (got {pool!r})")
    return pool


class SegHead(nn.Module):
    """The PSPNet/FCN auxiliary head: conv3x3 -> BN -> ReLU -> Dropout2d -> conv1x1.

    Args:
        in_channels: channels of the tapped feature map.
        num_classes: output channels (classes).
        hidden: width of the 3x3 conv; ``in_channels // 4`` by default (PSPNet: 1024 -> 256).
        dropout: Dropout2d probability (PSPNet: 0.1).
        layout: ``"NHWC"`` for channels-last feature maps (Swin, ConvNeXt stages in timm);
            they are permuted to NCHW first.

    Shape:
        - Input: (B, in_channels, H, W), or (B, H, W, in_channels) with ``layout="NHWC"``.
        - Output: (B, num_classes, H, W).

    Example:
        >>> import torch
        >>> head = SegHead(64, num_classes=3)
        >>> head(torch.randn(2, 64, 5, 5)).shape
        torch.Size([2, 3, 5, 5])
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        hidden: int | None = None,
        dropout: float = 0.1,
        layout: Layout = "NCHW",
    ) -> None:
        super().__init__()
        check_int("in_channels", in_channels)
        check_int("num_classes", num_classes)
        hidden = max(in_channels // 4, 1) if hidden is None else check_int("hidden", hidden)
        self.layout = check_layout(layout)
        self.output_layout: Layout = "NCHW"
        self.conv = nn.Conv2d(in_channels, hidden, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(hidden)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout2d(dropout)
        self.cls = nn.Conv2d(hidden, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "NHWC":
            x = x.permute(0, 3, 1, 2)
        out: torch.Tensor = self.cls(self.dropout(self.relu(self.bn(self.conv(x)))))
        return out


class ClassificationHead(nn.Module):
    """Global average pooling and a linear classifier.

    Args:
        in_channels: channels of the tapped feature.
        num_classes: number of classes.
        dropout: dropout before the linear layer.
        layout: ``"NHWC"`` for channels-last feature maps.

    Shape:
        - Input: (B, C, *spatial) (any number of spatial dims, or none), or (B, *spatial, C)
          with ``layout="NHWC"``.
        - Output: (B, num_classes).

    Example:
        >>> import torch
        >>> ClassificationHead(16, num_classes=10)(torch.randn(4, 16, 7, 7)).shape
        torch.Size([4, 10])
    """

    def __init__(
        self, in_channels: int, num_classes: int, *, dropout: float = 0.0, layout: Layout = "NCHW"
    ) -> None:
        super().__init__()
        check_int("in_channels", in_channels)
        check_int("num_classes", num_classes)
        self.layout = check_layout(layout)
        self.output_layout: Layout = "NCHW"  # (B, num_classes): classes at dim 1
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() > 2:
            dims = (
                tuple(range(1, x.dim() - 1)) if self.layout == "NHWC" else tuple(range(2, x.dim()))
            )
            x = x.mean(dim=dims)
        out: torch.Tensor = self.fc(self.dropout(x))
        return out


class TokenHead(nn.Module):
    """A classifier for token sequences (B, N, C), as transformer blocks return them.

    Args:
        in_channels: the embedding width C.
        num_classes: number of classes.
        pool: ``"mean"`` averages the tokens, ``"cls"`` takes the first (class) token.

    Shape:
        - Input: (B, N, C).
        - Output: (B, num_classes).

    Example:
        >>> import torch
        >>> TokenHead(32, num_classes=5, pool="cls")(torch.randn(2, 10, 32)).shape
        torch.Size([2, 5])
    """

    def __init__(
        self, in_channels: int, num_classes: int, *, pool: Literal["mean", "cls"] = "mean"
    ) -> None:
        super().__init__()
        check_int("in_channels", in_channels)
        check_int("num_classes", num_classes)
        self.pool = _check_pool(pool)
        self.layout: Layout = "NHWC"  # tokens (B, N, C): channels last
        self.output_layout: Layout = "NCHW"  # (B, num_classes)
        self.norm = nn.LayerNorm(in_channels)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3:
            raise ConfigError(
                f"TokenHead expects tokens of shape (B, N, C) (got {tuple(x.shape)}); "
                "use heads.seg or heads.classification for feature maps"
            )
        x = self.norm(x)
        x = x[:, 0] if self.pool == "cls" else x.mean(dim=1)
        out: torch.Tensor = self.fc(x)
        return out


class _Factory:
    """A picklable ``in_channels -> nn.Module`` with a constructor-like repr.

    ``layout`` is None when the head takes either layout; ``DeepSupervision`` then passes the
    tap's resolved one as ``layout=``.
    """

    def __init__(
        self, name: str, cls: type[nn.Module], io: tuple[Layout | None, Layout], **kwargs: Any
    ) -> None:
        self.name = name
        self.cls = cls
        # the head's input and prediction layouts, public: DeepSupervision reads them
        self.layout, self.output_layout = io
        self.kwargs = kwargs

    def __call__(self, in_channels: int, *, layout: Layout | None = None) -> nn.Module:
        kwargs = dict(self.kwargs)
        if layout is not None and self.layout is None and "layout" in kwargs:
            kwargs["layout"] = check_layout(layout)
        elif kwargs.get("layout", "") is None:
            kwargs["layout"] = "NCHW"
        return self.cls(in_channels, **kwargs)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items() if v is not None)
        return f"heads.{self.name}({args})"


def seg(
    num_classes: int,
    *,
    hidden: int | None = None,
    dropout: float = 0.1,
    layout: Layout | None = None,
) -> HeadFactory:
    """A factory of :class:`SegHead` (the PSPNet/FCN auxiliary head).

    ``layout`` None: built for the tap's layout (channels-last feature maps of Swin and
    ConvNeXt blocks are permuted first).

    Example:
        >>> seg(21)
        heads.seg(num_classes=21, dropout=0.1)
        >>> seg(21)(1024).conv.out_channels
        256
    """
    check_int("num_classes", num_classes)
    if layout is not None:
        check_layout(layout)
    return _Factory(
        "seg",
        SegHead,
        (layout, "NCHW"),
        num_classes=num_classes,
        hidden=hidden,
        dropout=dropout,
        layout=layout,
    )


def classification(
    num_classes: int, *, dropout: float = 0.0, layout: Layout | None = None
) -> HeadFactory:
    """A factory of :class:`ClassificationHead` (global pool + linear).

    ``layout`` None: built for the tap's layout (tokens and channels-last maps pool over
    their positions).

    Example:
        >>> classification(10)(512).fc
        Linear(in_features=512, out_features=10, bias=True)
    """
    check_int("num_classes", num_classes)
    if layout is not None:
        check_layout(layout)
    return _Factory(
        "classification",
        ClassificationHead,
        (layout, "NCHW"),
        num_classes=num_classes,
        dropout=dropout,
        layout=layout,
    )


def tokens(num_classes: int, *, pool: Literal["mean", "cls"] = "mean") -> HeadFactory:
    """A factory of :class:`TokenHead` (LayerNorm, token pooling, linear) for (B, N, C) outputs.

    Example:
        >>> tokens(10, pool="cls")(192).pool
        'cls'
    """
    check_int("num_classes", num_classes)
    _check_pool(pool)
    return _Factory("tokens", TokenHead, ("NHWC", "NCHW"), num_classes=num_classes, pool=pool)


class Reuse(nn.Module):
    """One head that runs modules of the model itself, in order; made by :func:`reuse`.

    The modules are held in a plain tuple, not registered as submodules: their parameters
    belong to the model only, so they appear once in ``sup.parameters()`` and once in
    ``sup.state_dict()`` (under ``model.``), and :meth:`DeepSupervision.unwrap` leaves them
    where they were. ``DeepSupervision`` never copies a ``Reuse`` head: every tap that uses it
    runs the same modules, and their gradients from every exit add up in the same parameters.

    Args:
        modules: modules of the wrapped model, run one after the other.
        layout: the layout of the tapped features they take; ``"NHWC"`` (channels last) fits
            tokens ``(B, T, C)``. The prediction keeps it (logits ``(B, T, V)``).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> norm, unembed = nn.LayerNorm(8), nn.Linear(8, 5)
        >>> head = Reuse(norm, unembed)
        >>> head(torch.randn(2, 3, 8)).shape, len(list(head.parameters()))
        (torch.Size([2, 3, 5]), 0)
    """

    def __init__(self, *modules: nn.Module, layout: Layout = "NHWC") -> None:
        super().__init__()
        if not modules:
            raise ConfigError(
                "heads.reuse() needs at least one module of the model, e.g. "
                "heads.reuse(model.model.norm, model.lm_head)"
            )
        for i, m in enumerate(modules):
            if not isinstance(m, nn.Module):
                raise ConfigTypeError(
                    f"heads.reuse: argument {i} must be an nn.Module of the model (got "
                    f"{type(m).__name__}); pass the modules themselves, e.g. model.lm_head"
                )
        self.layout = check_layout(layout)
        self.output_layout: Layout = self.layout
        # a tuple is not registered by nn.Module.__setattr__: the parameters stay the model's
        self.reused: tuple[nn.Module, ...] = tuple(modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: Any = x
        for m in self.reused:
            out = m(out)
        return out  # type: ignore[no-any-return]

    def extra_repr(self) -> str:
        return ", ".join(type(m).__name__ for m in self.reused)


def reuse(*modules: nn.Module, layout: Layout = "NHWC") -> Reuse:
    """One head, shared by every tap, that runs the model's own ``modules`` in order.

    The LayerSkip early-exit head of a causal LM: every layer's hidden state through the
    model's own final norm and unembedding (``heads.reuse(model.model.norm, model.lm_head)``
    for a Hugging Face Llama, ``heads.reuse(model.transformer.ln_f, model.lm_head)`` for
    GPT-2). Never copied: the parameters appear once and collect the gradient of every exit.
    The modules must belong to the wrapped model (``DeepSupervision`` checks it). For an
    untied head per exit, pass a ready module instead (``nn.Sequential(copy.deepcopy(norm),
    copy.deepcopy(lm_head))``): a ready module shared by several taps is copied per tap.

    Example:
        >>> from torch import nn
        >>> from deepsup import DeepSupervision
        >>> model = nn.Sequential(
        ...     nn.Linear(4, 4), nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 3)
        ... )
        >>> head = reuse(model[2], model[3])
        >>> sup = DeepSupervision(model, ["0", "1"], head=head)
        >>> sup.heads["0"] is sup.heads["1"] is head, len(list(sup.parameters()))
        (True, 8)
    """
    return Reuse(*modules, layout=layout)
