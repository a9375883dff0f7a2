"""Ready-made models without aux heads of their own, for use with :class:`deepsup.DeepSupervision`.

Example:
    >>> from deepsup.models import PSPNet
    >>> PSPNet(num_classes=3, backbone="resnet18").aux_tap
    'backbone.layer3'
"""

from __future__ import annotations

from .pspnet import PPM as PPM
from .pspnet import PSPNet as PSPNet
from .pspnet import WeightsError as WeightsError

__all__ = ["PPM", "PSPNet", "WeightsError"]
