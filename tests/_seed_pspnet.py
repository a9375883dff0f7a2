"""The seed's PSPNet, hand-written in the style of hszhao/semseg ``model/pspnet.py``.

The aux head is coded into the model: a training forward takes the labels and returns
``(prediction, main_loss, aux_loss)``; the caller adds ``main_loss + 0.4 * aux_loss``. This is
the computation ``deepsup.DeepSupervision`` around :class:`deepsup.models.PSPNet` must reproduce.

Two deliberate departures from semseg, so that weights copy by ``state_dict``:

- the backbone is torchvision's ResNet (single-conv stem) under ``backbone.<torchvision name>``
  instead of semseg's deep-stem ``layer0`` ... ``layer4``;
- the dilation loop follows the a-trous rule of torchvision/timm (the 3x3 conv that carried the
  stride keeps the previous rate) where semseg dilates every ``conv2`` of ``layer3``/``layer4``.

Everything else (PPM, ``cls``, ``aux``, the ``8k + 1`` size rule, the upsampling with
``align_corners=True``, the criterion) is written here independently of deepsup.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
import torchvision.models as models
from torch import nn


class PPM(nn.Module):
    def __init__(self, in_dim: int, reduction_dim: int, bins: tuple[int, ...]) -> None:
        super().__init__()
        features = []
        for b in bins:
            features.append(
                nn.Sequential(
                    nn.AdaptiveAvgPool2d(b),
                    nn.Conv2d(in_dim, reduction_dim, kernel_size=1, bias=False),
                    nn.BatchNorm2d(reduction_dim),
                    nn.ReLU(inplace=True),
                )
            )
        self.features = nn.ModuleList(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_size = x.size()
        out = [x]
        for f in self.features:
            out.append(F.interpolate(f(x), x_size[2:], mode="bilinear", align_corners=True))
        return torch.cat(out, 1)


def _dilate(layer: nn.Module, first_strided: str, dilation: int, previous: int) -> None:
    for n, m in layer.named_modules():
        if n == first_strided:
            m.dilation, m.padding, m.stride = (previous, previous), (previous, previous), (1, 1)
        elif isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
            m.dilation, m.padding, m.stride = (dilation, dilation), (dilation, dilation), (1, 1)
        elif "downsample.0" in n:
            m.stride = (1, 1)


class SeedPSPNet(nn.Module):
    def __init__(
        self,
        layers: int = 50,
        bins: tuple[int, ...] = (1, 2, 3, 6),
        dropout: float = 0.1,
        classes: int = 2,
        zoom_factor: int = 8,
        criterion: nn.Module | None = None,
    ) -> None:
        super().__init__()
        assert layers in [18, 34, 50, 101]
        assert 2048 % len(bins) == 0
        assert classes > 1
        assert zoom_factor in [1, 2, 4, 8]
        self.zoom_factor = zoom_factor
        self.criterion = criterion or nn.CrossEntropyLoss(ignore_index=255)

        builder = {
            18: models.resnet18,
            34: models.resnet34,
            50: models.resnet50,
            101: models.resnet101,
        }[layers]
        resnet = builder(weights=None)
        self.backbone = nn.Sequential(
            OrderedDict(
                conv1=resnet.conv1,
                bn1=resnet.bn1,
                relu=resnet.relu,
                maxpool=resnet.maxpool,
                layer1=resnet.layer1,
                layer2=resnet.layer2,
                layer3=resnet.layer3,
                layer4=resnet.layer4,
            )
        )
        first_strided = "0.conv1" if layers < 50 else "0.conv2"
        _dilate(self.backbone.layer3, first_strided, dilation=2, previous=1)
        _dilate(self.backbone.layer4, first_strided, dilation=4, previous=2)

        fea_dim = 512 if layers < 50 else 2048
        self.ppm = PPM(fea_dim, int(fea_dim / len(bins)), bins)
        fea_dim *= 2
        self.cls = nn.Sequential(
            nn.Conv2d(fea_dim, 512, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(512),
            nn.ReLU(inplace=True),
            nn.Dropout2d(p=dropout),
            nn.Conv2d(512, classes, kernel_size=1),
        )
        aux_dim = 256 if layers < 50 else 1024
        self.aux = nn.Sequential(
            nn.Conv2d(aux_dim, 256, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(256),
            nn.ReLU(inplace=True),
            nn.Dropout2d(p=dropout),
            nn.Conv2d(256, classes, kernel_size=1),
        )

    def forward(
        self, x: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x_size = x.size()
        assert (x_size[2] - 1) % 8 == 0
        assert (x_size[3] - 1) % 8 == 0
        h = int((x_size[2] - 1) / 8 * self.zoom_factor + 1)
        w = int((x_size[3] - 1) / 8 * self.zoom_factor + 1)

        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        x = b.layer1(x)
        x = b.layer2(x)
        x_tmp = b.layer3(x)
        x = b.layer4(x_tmp)
        x = self.ppm(x)
        x = self.cls(x)
        if self.zoom_factor != 1:
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=True)

        if self.training:
            assert y is not None
            aux = self.aux(x_tmp)
            if self.zoom_factor != 1:
                aux = F.interpolate(aux, size=(h, w), mode="bilinear", align_corners=True)
            main_loss = self.criterion(x, y)
            aux_loss = self.criterion(aux, y)
            return x.max(1)[1], main_loss, aux_loss
        return x
