"""PSPNet (Zhao et al., CVPR 2017) without an aux head of its own, ready for deep supervision.

The reference implementation (hszhao/semseg ``model/pspnet.py``) codes its auxiliary head into
the model: a second return value in training, a changed forward signature. This one is a plain
segmentation model, ``forward(x) -> logits`` in train and eval alike; the aux head is added from
outside with :class:`deepsup.DeepSupervision` on the tap :attr:`PSPNet.aux_tap`
(``"backbone.layer3"`` for the ResNet backbones).

Example:
    >>> import torch
    >>> from deepsup.models import PSPNet
    >>> model = PSPNet(num_classes=3, backbone="resnet18")
    >>> model(torch.randn(2, 3, 33, 33)).shape
    torch.Size([2, 3, 33, 33])
    >>> model.aux_tap, model.aux_channels
    ('backbone.layer3', 256)
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from deepsup._checks import check_int
from deepsup.errors import (
    ConfigError,
    ConfigTypeError,
    MissingDependencyError,
    WeightsError,
    WeightsNotFoundError,
)

__all__ = ["PPM", "DilatedResNet", "PSPNet", "WeightsError", "WeightsNotFoundError"]

_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
_TIMM_PREFIX = "timm:"


class PPM(nn.Module):
    """The pyramid pooling module of PSPNet.

    Each bin ``b`` average-pools the input to ``b x b`` cells, reduces the channels with
    conv1x1 (no bias) -> BN -> ReLU, and is upsampled bilinearly back to the input size; the
    results are concatenated with the input.

    Args:
        in_channels: channels of the input feature map.
        bins: output sizes of the adaptive average pools.
        reduction_channels: channels of each pooled branch; ``in_channels // len(bins)`` by
            default (PSPNet: 2048 -> 512 per branch).
        align_corners: passed to the bilinear upsampling (the reference uses True).

    Attributes:
        out_channels: ``in_channels + len(bins) * reduction_channels``.

    Shape:
        - Input: (B, in_channels, H, W).
        - Output: (B, out_channels, H, W).

    Example:
        >>> import torch
        >>> ppm = PPM(64)
        >>> ppm.out_channels
        128
        >>> ppm(torch.randn(2, 64, 9, 9)).shape
        torch.Size([2, 128, 9, 9])
    """

    def __init__(
        self,
        in_channels: int,
        bins: Sequence[int] = (1, 2, 3, 6),
        *,
        reduction_channels: int | None = None,
        align_corners: bool = True,
    ) -> None:
        super().__init__()
        check_int("in_channels", in_channels)
        bins = tuple(bins)
        if not bins:
            raise ConfigError(f"bins must be a non-empty sequence of positive ints (got {bins!r})")
        for b in bins:
            check_int("each bin", b)
        if reduction_channels is None:
            reduction_channels = max(in_channels // len(bins), 1)
        check_int("reduction_channels", reduction_channels)
        self.bins = bins
        self.align_corners = bool(align_corners)
        self.out_channels = in_channels + len(bins) * reduction_channels
        # `features` and the Sequential indices follow the reference, so its PPM keys load here.
        self.features = nn.ModuleList(
            nn.Sequential(
                nn.AdaptiveAvgPool2d(b),
                nn.Conv2d(in_channels, reduction_channels, kernel_size=1, bias=False),
                nn.BatchNorm2d(reduction_channels),
                nn.ReLU(inplace=True),
            )
            for b in bins
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        out = [x]
        for branch in self.features:
            y = branch(x)
            out.append(F.interpolate(y, size, mode="bilinear", align_corners=self.align_corners))
        return torch.cat(out, dim=1)

    def extra_repr(self) -> str:
        return f"bins={self.bins}, align_corners={self.align_corners}"


class DilatedResNet(nn.Module):
    """A torchvision ResNet trunk at output stride 8 (``layer3`` and ``layer4`` dilated).

    The submodules keep torchvision's names (``conv1``, ``bn1``, ``relu``, ``maxpool``,
    ``layer1`` ... ``layer4``), so a torchvision ResNet ``state_dict`` without ``fc.*`` loads into
    it. The pooling and ``fc`` classifier are dropped.

    ``resnet50``/``101``/``152`` use torchvision's ``replace_stride_with_dilation=[False, True,
    True]``. torchvision's ``BasicBlock`` (``resnet18``/``34``) refuses dilation, so those are
    converted after construction with the same rule (the rule timm uses too): stride 1 everywhere
    in ``layer3``/``layer4``; the 3x3 conv that carried the stride keeps the previous rate (1 in
    ``layer3``, 2 in ``layer4``) and every later 3x3 conv of the stage runs at the new rate (2,
    then 4).

    Args:
        arch: one of ``"resnet18"``, ``"resnet34"``, ``"resnet50"``, ``"resnet101"``,
            ``"resnet152"``.

    Attributes:
        out_channels: channels of ``layer4`` (512 or 2048).
        layer3_channels: channels of ``layer3`` (256 or 1024).

    Shape:
        - Input: (B, 3, H, W).
        - Output: (B, out_channels, ceil(H / 8), ceil(W / 8)) (for the usual sizes; stride-2
          convs and the max pool each give ``floor((n - 1) / 2) + 1``).

    Example:
        >>> import torch
        >>> DilatedResNet("resnet18")(torch.randn(1, 3, 64, 64)).shape
        torch.Size([1, 512, 8, 8])
    """

    def __init__(self, arch: str = "resnet50") -> None:
        super().__init__()
        if arch not in _RESNETS:
            raise ConfigError(
                f"arch must be one of {', '.join(map(repr, _RESNETS))} (got {arch!r}); "
                "use PSPNet(backbone='timm:NAME') for other backbones"
            )
        try:
            import torchvision.models as tvm
        except ImportError as e:  # pragma: no cover - torchvision is a test dependency
            raise MissingDependencyError(
                "the ResNet backbones of deepsup.models need torchvision: "
                "pip install 'deepsup[vision]'"
            ) from e
        builder = getattr(tvm, arch)
        bottleneck = arch not in ("resnet18", "resnet34")
        if bottleneck:
            resnet = builder(weights=None, replace_stride_with_dilation=[False, True, True])
        else:
            resnet = builder(weights=None)
            _dilate_basic_stage(resnet.layer3, dilation=2, previous=1)
            _dilate_basic_stage(resnet.layer4, dilation=4, previous=2)
        self.arch = arch
        self.conv1 = resnet.conv1
        self.bn1 = resnet.bn1
        self.relu = resnet.relu
        self.maxpool = resnet.maxpool
        self.layer1 = resnet.layer1
        self.layer2 = resnet.layer2
        self.layer3 = resnet.layer3
        self.layer4 = resnet.layer4
        expansion = 4 if bottleneck else 1
        self.layer3_channels = 256 * expansion
        self.out_channels = 512 * expansion

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.layer4(self.layer3(x))  # type: ignore[no-any-return]

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}"


def _dilate_basic_stage(stage: nn.Module, *, dilation: int, previous: int) -> None:
    """Turn a stride-2 stage of torchvision ``BasicBlock``\\s into a dilated stride-1 stage."""
    for i, block in enumerate(stage.children()):
        for name in ("conv1", "conv2"):
            conv = getattr(block, name)
            rate = previous if (i == 0 and name == "conv1") else dilation
            conv.stride = (1, 1)
            conv.dilation = (rate, rate)
            conv.padding = (rate, rate)
        downsample = getattr(block, "downsample", None)
        if downsample is not None:
            downsample[0].stride = (1, 1)
        if hasattr(block, "stride"):
            setattr(block, "stride", 1)  # noqa: B010 - nn.Module's __setattr__ is typed for modules


class PSPNet(nn.Module):
    """PSPNet: a dilated backbone (output stride 8), pyramid pooling and a classifier.

    Unlike the reference, the model has no auxiliary head and no train-only branch:
    ``forward(x)`` returns the logits at the input size in train and eval mode alike. Add the aux
    loss with :class:`deepsup.DeepSupervision` on :attr:`aux_tap` (``"backbone.layer3"`` with
    1024 channels on ``resnet50``/``resnet101``, 256 on ``resnet18``/``resnet34``). Any input size
    works; the reference's ``8k + 1`` sizes (473, 713) are not required.

    The new modules (trained at 10x the backbone's learning rate by the reference) are named in
    :attr:`new_modules`, for :func:`deepsup.param_groups`.

    Args:
        num_classes: output classes (21 on Pascal VOC).
        backbone: ``"resnet18"``, ``"resnet34"``, ``"resnet50"``, ``"resnet101"`` or
            ``"resnet152"`` (torchvision, see :class:`DilatedResNet`), or ``"timm:NAME"`` for any
            timm model that supports ``features_only=True`` and ``output_stride=8`` (built with
            ``pretrained=False``; its last feature map feeds the pyramid pooling, and
            :attr:`aux_tap` names the module of the one before it, e.g.
            ``"backbone.layer3"`` for timm ResNets, ``"backbone.stages_2"`` for ConvNeXt).
        bins: pyramid pooling bins; each branch has ``in_channels // len(bins)`` channels.
        dropout: Dropout2d probability in the classifier.
        align_corners: for the bilinear upsampling in the pyramid pooling and of the logits; the
            reference uses True.
        weights: path to an ImageNet ``state_dict`` for the backbone, read with
            ``torch.load(path, map_location="cpu", weights_only=True)``. For the torchvision
            backbones a torchvision ResNet ``state_dict`` (``fc.*`` is dropped, every other key
            must match); for ``"timm:NAME"`` a timm ``state_dict`` of that model, loaded by timm's
            own pretrained-weights code (classifier dropped). Nothing is ever downloaded.

    Attributes:
        backbone: the feature extractor (:class:`DilatedResNet`, or timm's features model).
        ppm: the pyramid pooling module (:class:`PPM`).
        cls: conv3x3 (no bias) -> BN -> ReLU -> Dropout2d -> conv1x1 classifier.
        aux_tap: the module name to tap for the aux loss.
        aux_channels: channels of that module's output.
        new_modules: names of the randomly initialised submodules, ``("ppm", "cls")``.

    Raises:
        ValueError: an unknown backbone or an invalid argument.
        FileNotFoundError: ``weights`` names no file.
        WeightsError: the ``weights`` file cannot be read, or its keys do not fit the backbone
            (the message names the path and the missing and unexpected keys).

    Shape:
        - Input: (B, 3, H, W).
        - Output: (B, num_classes, H, W) logits.

    Example:
        >>> import torch
        >>> from deepsup.models import PSPNet
        >>> model = PSPNet(num_classes=5, backbone="resnet18").eval()
        >>> model(torch.randn(1, 3, 50, 70)).shape
        torch.Size([1, 5, 50, 70])
        >>> model.aux_tap, model.aux_channels, PSPNet.new_modules
        ('backbone.layer3', 256, ('ppm', 'cls'))
    """

    new_modules: ClassVar[tuple[str, ...]] = ("ppm", "cls")

    def __init__(
        self,
        num_classes: int = 21,
        backbone: str = "resnet50",
        *,
        bins: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
        align_corners: bool = True,
        weights: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        check_int("num_classes", num_classes)
        if not isinstance(backbone, str):
            raise ConfigTypeError(f"backbone must be str (got {backbone!r})")
        if not 0.0 <= dropout <= 1.0:
            raise ConfigError(f"dropout must be a probability in [0, 1] (got {dropout!r})")
        self.num_classes = num_classes
        self.backbone_name = backbone
        self.align_corners = bool(align_corners)
        self.backbone: nn.Module
        if backbone.startswith(_TIMM_PREFIX):
            self._timm = True
            self.backbone, self.aux_tap, self.aux_channels, channels = _build_timm(
                backbone[len(_TIMM_PREFIX) :], weights
            )
        else:
            self._timm = False
            resnet = DilatedResNet(backbone)
            if weights is not None:
                _load_resnet_weights(resnet, weights)
            self.backbone = resnet
            self.aux_tap = "backbone.layer3"
            self.aux_channels = resnet.layer3_channels
            channels = resnet.out_channels
        self.ppm = PPM(channels, bins, align_corners=self.align_corners)
        # Indices as in the reference's `cls` Sequential, so its classifier keys load here.
        self.cls = nn.Sequential(
            nn.Conv2d(self.ppm.out_channels, 512, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(512),
            nn.ReLU(inplace=True),
            nn.Dropout2d(p=dropout),
            nn.Conv2d(512, num_classes, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        features = self.backbone(x)
        if self._timm:
            features = features[-1]
        logits = self.cls(self.ppm(features))
        return F.interpolate(logits, size, mode="bilinear", align_corners=self.align_corners)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, backbone={self.backbone_name!r}, "
            f"align_corners={self.align_corners}"
        )


def _read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a ``state_dict`` file safely, with errors that name the path."""
    shown = os.fspath(path)
    if not os.path.isfile(shown):
        raise WeightsNotFoundError(f"weights file {shown!r} does not exist")
    try:
        obj = torch.load(shown, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(
            f"weights file {shown!r} could not be read with torch.load(weights_only=True) "
            f"({type(e).__name__}); expected a state_dict written by "
            "torch.save(model.state_dict(), path), not a pickled model"
        ) from e
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        got = type(obj).__name__
        if isinstance(obj, Mapping):
            got += f" with keys {_list_keys([str(k) for k in obj])}"
        raise WeightsError(
            f"weights file {shown!r} does not hold a state_dict (got a {got}); expected a "
            "mapping of parameter names to tensors, as torch.save(model.state_dict(), path) "
            "writes. Save the state_dict alone (e.g. checkpoint['state_dict']) and pass that file"
        )
    return dict(obj)


def _list_keys(keys: Sequence[str], limit: int = 8) -> str:
    if not keys:
        return "none"
    shown = ", ".join(map(repr, keys[:limit]))
    more = f", ... ({len(keys)} in all)" if len(keys) > limit else ""
    return f"[{shown}{more}]"


def _load_resnet_weights(resnet: DilatedResNet, path: str | os.PathLike[str]) -> None:
    state = _read_state_dict(path)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = resnet.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        raise WeightsError(
            f"weights file {os.fspath(path)!r} does not fit the {resnet.arch} backbone: "
            f"missing keys {_list_keys(missing)}; unexpected keys {_list_keys(unexpected)}; "
            f"shape mismatches {_list_keys(mismatched)}. Expected a torchvision "
            f"{resnet.arch} state_dict (keys like 'conv1.weight', 'layer1.0.conv1.weight'; "
            "'fc.*' is ignored)"
        )
    resnet.load_state_dict(state, strict=True)


def _build_timm(
    name: str, weights: str | os.PathLike[str] | None
) -> tuple[nn.Module, str, int, int]:
    """Build a timm features model at output stride 8; return it, its tap, and channels."""
    try:
        import timm
    except ImportError as e:  # pragma: no cover - timm is a test dependency
        raise MissingDependencyError(
            f"backbone 'timm:{name}' needs timm: pip install 'deepsup[vision]'"
        ) from e
    if not name or not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3) if name else []
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ConfigError(
            f"backbone 'timm:{name}' names no timm model; expected 'timm:NAME' with NAME in "
            f"timm.list_models().{hint}"
        )
    kwargs: dict[str, Any] = {
        "features_only": True,
        "output_stride": 8,
        "out_indices": (-2, -1),
        "pretrained": False,
    }
    try:
        model: Any = timm.create_model(name, **kwargs)
    except Exception as e:
        raise ConfigError(
            f"backbone 'timm:{name}' could not be built with features_only=True and "
            f"output_stride=8 ({type(e).__name__}: {e}); pick a CNN that supports both"
        ) from e
    if weights is not None:
        # timm's own pretrained-weights code (filters, classifier removal, features wrapping)
        # reads the state_dict from the config overlay: nothing is downloaded.
        state = _read_state_dict(weights)
        overlay = {"state_dict": dict(state)}
        try:
            model = timm.create_model(
                name, **(kwargs | {"pretrained": True}), pretrained_cfg_overlay=overlay
            )
        except Exception as e:
            raise WeightsError(
                f"weights file {os.fspath(weights)!r} does not fit the timm model {name!r} "
                f"({type(e).__name__}: {str(e).strip()}); expected a state_dict of "
                f"timm.create_model({name!r})"
            ) from e
        # timm loads features models non-strictly (its classifier is gone): check that every
        # tensor of the backbone came from the file. Features wrappers flatten the first name
        # ("stages.2" -> "stages_2").
        missing = []
        for key in model.state_dict():
            head, _, rest = key.partition(".")
            flat = head.replace("_", ".") + "." + rest
            if key not in state and flat not in state:
                missing.append(key)
        if missing:
            raise WeightsError(
                f"weights file {os.fspath(weights)!r} does not fit the timm model {name!r}: "
                f"missing keys {_list_keys(missing)}. Expected a state_dict of "
                f"timm.create_model({name!r})"
            )
    info = model.feature_info
    module_name = info.module_name()[-2]
    channels = info.channels()
    names = dict(model.named_modules())
    for candidate in (module_name, module_name.replace(".", "_")):
        if candidate in names:
            tap = "backbone." + candidate
            break
    else:  # pragma: no cover - depends on timm's feature wrappers
        raise ConfigError(
            f"backbone 'timm:{name}': the feature module {module_name!r} is not a submodule of "
            "the features model; use deepsup.list_taps(model) to pick a tap"
        )
    return model, tap, int(channels[-2]), int(channels[-1])
