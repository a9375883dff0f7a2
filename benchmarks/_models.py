"""The model pairs the benchmarks compare: a hand-written aux branch vs DeepSupervision.

Each pair holds the same weights on both sides and the same aux head computation, so the two
train steps compute the same losses (checked by the benchmarks) and differ only in how the
aux branch is attached.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from deepsup import DeepSupervision

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Pair:
    name: str
    reference: nn.Module  # aux branch coded into the model
    sup: DeepSupervision  # the same model without aux branch, wrapped
    reference_loss: Loss  # total training loss of the reference (main + weight * aux)
    sup_loss: Loss  # the same through the wrapper

    @property
    def bare(self) -> nn.Module:
        return self.sup.model


def deeplab(num_classes: int = 21) -> Pair:
    """torchvision ``deeplabv3_resnet50(aux_loss=True)`` vs the aux-free one, wrapped.

    The wrapper taps ``backbone.layer3`` with a deep copy of the reference's ``FCNHead``
    (conv3x3 1024->256, BN, ReLU, Dropout(0.1), conv1x1), upsampling its logits bilinearly with
    ``align_corners=False`` as torchvision does; weight 0.5 as in torchvision's reference
    training script.
    """
    from torchvision.models.segmentation import deeplabv3_resnet50

    torch.manual_seed(0)
    kw = {"weights": None, "weights_backbone": None, "num_classes": num_classes}
    reference = deeplabv3_resnet50(aux_loss=True, **kw)
    bare = deeplabv3_resnet50(aux_loss=False, **kw)
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith("aux_classifier.")}
    bare.load_state_dict(state, strict=True)
    criterion = nn.CrossEntropyLoss(ignore_index=255)
    sup = DeepSupervision(
        bare,
        {"backbone.layer3": 0.5},
        head=copy.deepcopy(reference.aux_classifier),
        criterion=criterion,
        resize="prediction",
        align_corners=False,
    )

    def reference_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = reference(x)
        return criterion(out["out"], y) + 0.5 * criterion(out["aux"], y)

    def sup_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out, aux = sup(x, target=y)
        return criterion(out["out"], y) + sum(aux.values())

    return Pair("deeplabv3_resnet50", reference, sup, reference_loss, sup_loss)


def pspnet(num_classes: int = 21) -> Pair:
    """The seed's PSPNet (aux coded in, ``tests/_seed_pspnet.py``) vs ``deepsup.models.PSPNet``.

    Weights are copied by ``state_dict``; the wrapper's head is a deep copy of the seed's
    ``aux`` module, its logits upsampled with ``align_corners=True``; weight 0.4. The seed
    also computes ``argmax`` of the logits in its training forward (its first return value),
    which the wrapped model does not.
    """
    from _common import load_seed_pspnet

    from deepsup.models import PSPNet

    torch.manual_seed(0)
    criterion = nn.CrossEntropyLoss(ignore_index=255)
    reference = load_seed_pspnet().SeedPSPNet(layers=50, classes=num_classes, criterion=criterion)
    bare = PSPNet(num_classes=num_classes, backbone="resnet50")
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith("aux.")}
    bare.load_state_dict(state, strict=True)
    sup = DeepSupervision(
        bare,
        {bare.aux_tap: 0.4},
        head=copy.deepcopy(reference.aux),
        criterion=criterion,
        resize="prediction",
        align_corners=True,
    )

    def reference_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _, main_loss, aux_loss = reference(x, y)
        return main_loss + 0.4 * aux_loss

    def sup_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out, aux = sup(x, target=y)
        return criterion(out, y) + sum(aux.values())

    return Pair("PSPNet resnet50", reference, sup, reference_loss, sup_loss)


PAIRS: dict[str, Callable[[], Pair]] = {"deeplab": deeplab, "pspnet": pspnet}


def batch(
    size: int, *, batch_size: int = 2, num_classes: int = 21
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random image batch and labels with a band of ignore pixels (255)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch_size, 3, size, size, generator=g)
    y = torch.randint(0, num_classes, (batch_size, size, size), generator=g)
    y[:, :, : max(1, size // 16)] = 255
    return x, y
