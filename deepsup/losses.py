"""Aux criteria that use the model's own output: :class:`SelfDistillation`; the teacher protocol.

**The teacher protocol.** A criterion that sets the attribute ``wants_teacher = True`` is called
by :class:`~deepsup.DeepSupervision` as ``criterion(prediction, target, teacher=teacher)``,
where ``teacher`` is the model's output of the same training forward:

- **detached**: no gradient flows from an aux loss into the model's final head through it;
- **one tensor**: a tensor output as is, else the first element of a tuple, list, dict or
  dataclass (the rule taps use; torchvision's ``{"out": ...}`` gives ``"out"``);
- **resized like the target**: a dense teacher, in the layout of the tap's prediction
  (``(B, C, *spatial)``, or ``(B, *spatial, C)`` for a ``"NHWC"`` prediction), whose spatial
  size differs from the (already reconciled) prediction's is brought to it by the wrapper's own
  rules (``reconcile``): downsampled by nearest-neighbour indexing when larger (as
  ``resize="target"`` does to a dense target), interpolated (linear by dims, the tap's
  ``align_corners``, as ``resize="prediction"`` does to a prediction) when smaller.

Any callable can take part, a plain function included::

    def my_loss(prediction, target, *, teacher):
        ...
    my_loss.wants_teacher = True

Criteria without the attribute are called as ``criterion(prediction, target)``, as before.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from ._capture import _default_select
from ._channels import Layout
from ._errors import ConfigError, ConfigTypeError, TargetError
from ._resize import _spatial, reconcile

__all__ = [
    "SelfDistillation",
    "TeacherCriterion",
    "distillation_kl",
    "teacher_for",
    "wants_teacher",
]


@runtime_checkable
class TeacherCriterion(Protocol):
    """A criterion that receives the teacher: ``wants_teacher = True`` and a ``teacher=`` keyword.

    Example:
        >>> from deepsup.losses import SelfDistillation, TeacherCriterion
        >>> isinstance(SelfDistillation(torch.nn.CrossEntropyLoss()), TeacherCriterion)
        True
    """

    wants_teacher: bool

    def __call__(self, prediction: Any, target: Any, *, teacher: torch.Tensor) -> torch.Tensor:
        """The loss of ``prediction`` against ``target`` and ``teacher``."""
        ...


def wants_teacher(criterion: Any) -> bool:
    """Whether ``criterion`` asks for the teacher (its ``wants_teacher`` attribute is True).

    Example:
        >>> wants_teacher(SelfDistillation(torch.nn.CrossEntropyLoss())), wants_teacher(len)
        (True, False)
    """
    return getattr(criterion, "wants_teacher", False) is True


def teacher_for(
    output: Any,
    prediction: Any,
    *,
    align_corners: bool = False,
    tap: str = "?",
    layout: Layout = "NCHW",
) -> torch.Tensor:
    """The teacher handed to a criterion: ``output``'s tensor, detached, resized to ``prediction``.

    Args:
        output: the model's output (a tensor, or a tuple/list/dict/dataclass whose first element
            is the tensor).
        prediction: the head's prediction, after it was reconciled with the target.
        align_corners: for a teacher smaller than the prediction (interpolated).
        tap: the tap's name, for error messages.
        layout: the prediction's layout (``"NCHW"`` or ``"NHWC"``); the teacher is read in it.

    Raises:
        TargetError: ``output`` holds no tensor, or its shape cannot be matched to the
            prediction's.

    Example:
        >>> out = torch.randn(2, 4, 8, 8, requires_grad=True)
        >>> t = teacher_for({"out": out}, torch.zeros(2, 4, 4, 4))
        >>> t.shape, t.requires_grad
        (torch.Size([2, 4, 4, 4]), False)
    """
    teacher = _default_select(output)
    if not isinstance(teacher, torch.Tensor):
        raise TargetError(
            f"tap {tap!r}: its criterion wants the teacher, but the model's output of type "
            f"{type(output).__name__} holds no tensor as a tensor, or first element of a "
            "tuple/list/dict/dataclass; return the logits first, or use a criterion without "
            "wants_teacher"
        )
    teacher = teacher.detach()
    if not isinstance(prediction, torch.Tensor) or prediction.dim() <= 2:
        return teacher
    cdim = 1 if layout == "NCHW" else -1
    if (
        teacher.dim() != prediction.dim()
        or teacher.shape[0] != prediction.shape[0]
        or teacher.shape[cdim] != prediction.shape[cdim]
    ):
        raise TargetError(
            f"tap {tap!r}: the teacher (the model's output) of shape {tuple(teacher.shape)} "
            f"does not fit the prediction of shape {tuple(prediction.shape)} (layout "
            f"{layout!r}); both need the same batch and class dims. Give the tap a head with as "
            "many classes as the model"
        )
    # the wrapper's reconcile rules: a larger teacher is downsampled as a dense target is
    # (resize="target"), a smaller one interpolated as a prediction is (resize="prediction")
    if all(t >= p for t, p in zip(_spatial(teacher, layout), _spatial(prediction, layout))):
        _, teacher = reconcile(
            prediction,
            teacher,
            resize="target",
            align_corners=align_corners,
            tap=tap,
            layout=layout,
        )
    else:
        teacher, _ = reconcile(
            teacher,
            prediction,
            resize="prediction",
            align_corners=align_corners,
            tap=tap,
            layout=layout,
        )
    return teacher


def distillation_kl(
    prediction: torch.Tensor, teacher: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(prediction / T))``, classes on dim 1.

    Summed over classes, averaged over the batch and any spatial positions (per-pixel
    distillation for dense predictions); computed in float32 at least.

    Example:
        >>> p = torch.tensor([[1.0, 0.0]])
        >>> float(distillation_kl(p, p, 2.0))
        0.0
    """
    dtype = torch.promote_types(prediction.dtype, torch.float32)
    log_p = F.log_softmax(prediction.to(dtype) / temperature, dim=1)
    log_q = F.log_softmax(teacher.to(dtype) / temperature, dim=1)
    kl = (log_q.exp() * (log_q - log_p)).sum(dim=1)
    return temperature**2 * kl.mean()


class SelfDistillation(nn.Module):
    """Self-distillation (BYOT): the model's own output teaches every aux head.

    The aux loss is ``(1 - alpha) * criterion(prediction, target) + alpha * T^2 *
    KL(softmax(teacher / T) || softmax(prediction / T))`` (batch mean; per pixel for dense
    predictions), the teacher being the model's output of the same forward, detached, so no
    gradient of the aux losses reaches the model's final head through it. It follows the
    teacher protocol of this module: :class:`~deepsup.DeepSupervision` hands it the teacher.

    Args:
        criterion: the hard-label loss, ``criterion(prediction, target)``.
        temperature: the softmax temperature ``T`` (> 0).
        alpha: the share of the distillation term, in [0, 1].

    Raises:
        ConfigError: ``temperature`` <= 0 or ``alpha`` outside [0, 1].
        ConfigTypeError: ``criterion`` is not callable.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from deepsup import DeepSupervision, heads
        >>> from deepsup.losses import SelfDistillation
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> sup = DeepSupervision(model, {"0": 0.5}, head=heads.classification(3),
        ...                       criterion=SelfDistillation(nn.CrossEntropyLoss()))
        >>> out, aux = sup(torch.randn(5, 4), target=torch.tensor([0, 1, 2, 0, 1]))
        >>> list(aux)
        ['0']
    """

    wants_teacher = True

    def __init__(
        self,
        criterion: nn.Module | Any,
        temperature: float = 3.0,
        alpha: float = 0.5,
    ) -> None:
        super().__init__()
        if not callable(criterion):
            raise ConfigTypeError(
                f"criterion must be a callable (prediction, target) -> loss "
                f"(got {type(criterion).__name__})"
            )
        if not temperature > 0:
            raise ConfigError(f"temperature must be > 0 (got {temperature!r})")
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1] (got {alpha!r})")
        self.criterion = criterion
        self.temperature = float(temperature)
        self.alpha = float(alpha)

    def forward(
        self, prediction: torch.Tensor, target: Any, *, teacher: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The aux loss; see the class docs.

        Without ``teacher=`` (code that does not know the protocol) it returns
        ``criterion(prediction, target)`` when ``alpha`` is 0 and raises otherwise.
        """
        hard = self.criterion(prediction, target)
        if teacher is None:
            if self.alpha == 0.0:
                return hard  # type: ignore[no-any-return]
            raise TargetError(
                "SelfDistillation needs teacher= (the model's output) for alpha="
                f"{self.alpha}; DeepSupervision passes it to criteria with wants_teacher=True. "
                "Call it as criterion(prediction, target, teacher=output.detach())"
            )
        soft = distillation_kl(prediction, teacher.detach(), self.temperature)
        return (1.0 - self.alpha) * hard + self.alpha * soft  # type: ignore[no-any-return]

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}"
