"""Aux criteria that use the model's own output: :class:`SelfDistillation`; the teacher protocol.

**The teacher protocol.** A criterion that sets the attribute ``wants_teacher = True`` is called
by :class:`~deepsup.DeepSupervision` as ``criterion(prediction, target, teacher=teacher)``,
where ``teacher`` is the model's output of the same training forward
(:func:`deepsup.functional.teacher_like`):

- **detached**: no gradient flows from an aux loss into the model's final head through it;
- **one tensor**: a tensor output as is, else the first element of a tuple, list, dict or
  dataclass (the rule taps use; torchvision's ``{"out": ...}`` gives ``"out"``);
- **resized like the target**: a dense teacher, in the layout of the tap's prediction, whose
  spatial size differs from the (already reconciled) prediction's is brought to it by the
  wrapper's own rules: downsampled by nearest-neighbour indexing when larger (as
  ``resize="target"`` does to a dense target), interpolated (linear by dims, the tap's
  ``align_corners``, as ``resize="prediction"`` does to a prediction) when smaller.

A criterion that also sets ``wants_layout = True`` gets ``layout=``: where the classes of the
prediction (and of a dense target and the teacher) it receives are (``"NCHW"``: dim 1;
``"NHWC"``: last, per-token predictions included). Any callable can take part, a plain function
included::

    def my_loss(prediction, target, *, teacher):
        ...
    my_loss.wants_teacher = True

Criteria without the attribute are called as ``criterion(prediction, target)``, as before.
"""

from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import is_number
from ._layout import Layout, check_layout
from .errors import ConfigError, ConfigTypeError, TargetError
from .functional import (
    call_criterion,
    causal_labels,
    distillation_kl,
    teacher_like,
    wants_teacher,
)

__all__ = [
    "NextToken",
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


def teacher_for(
    output: Any,
    prediction: Any,
    *,
    align_corners: bool = False,
    tap: str = "?",
    layout: Layout = "NCHW",
) -> torch.Tensor:
    """The teacher handed to a criterion: :func:`deepsup.functional.teacher_like`.

    Example:
        >>> out = torch.randn(2, 4, 8, 8, requires_grad=True)
        >>> teacher_for({"out": out}, torch.zeros(2, 4, 4, 4)).shape
        torch.Size([2, 4, 4, 4])
    """
    return teacher_like(output, prediction, layout=layout, align_corners=align_corners, tap=tap)


class SelfDistillation(nn.Module):
    """Self-distillation (BYOT): the model's own output teaches every aux head.

    The aux loss is ``(1 - alpha) * criterion(prediction, target) + alpha * T^2 *
    KL(p_teacher || p_prediction)`` at temperature ``T``, over the class axis of the tap's
    prediction (:func:`deepsup.functional.distillation_kl`: softmax over the classes wherever
    they are, a Bernoulli through the sigmoid for single-logit heads; batch mean, per pixel or
    per token for dense predictions), the teacher being the model's output of the same
    forward, detached, so no gradient of the aux losses reaches the model's final head through
    it. It follows the teacher protocol of this module: :class:`~deepsup.DeepSupervision` hands
    it the teacher and the layout. Its ``ignore_index`` is the inner criterion's, so the tap
    downsamples targets ignore-aware and a batch without a valid label gives 0.

    Args:
        criterion: the hard-label loss, ``criterion(prediction, target)``.
        temperature: the softmax temperature ``T`` (finite, > 0).
        alpha: the share of the distillation term, in [0, 1].

    Raises:
        ConfigError: ``temperature`` not a finite number > 0, or ``alpha`` outside [0, 1].
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
    wants_layout = True

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
        if not is_number(temperature) or not 0 < float(temperature) < math.inf:
            raise ConfigError(f"temperature must be > 0 and finite (got {temperature!r})")
        if not is_number(alpha) or not 0.0 <= float(alpha) <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1] (got {alpha!r})")
        self.criterion = criterion
        self.temperature = float(temperature)
        self.alpha = float(alpha)

    @property
    def ignore_index(self) -> int | None:
        """The inner criterion's ``ignore_index`` (None if it has none)."""
        found = getattr(self.criterion, "ignore_index", None)
        return found if isinstance(found, int) and not isinstance(found, bool) else None

    def forward(
        self,
        prediction: torch.Tensor,
        target: Any,
        *,
        teacher: torch.Tensor | None = None,
        layout: Layout = "NCHW",
    ) -> torch.Tensor:
        """The aux loss; see the class docs. ``layout``: where the classes of ``prediction``
        (and of ``teacher``) are.

        Without ``teacher=`` (code that does not know the protocol) it returns
        ``criterion(prediction, target)`` when ``alpha`` is 0 and raises otherwise.
        """
        check_layout(layout)
        hard = call_criterion(self.criterion, prediction, target, layout=layout)
        if teacher is None:
            if self.alpha == 0.0:
                return hard
            raise TargetError(
                "SelfDistillation needs teacher= (the model's output) for alpha="
                f"{self.alpha}; DeepSupervision passes it to criteria with wants_teacher=True. "
                "Call it as criterion(prediction, target, teacher=output.detach())"
            )
        soft = distillation_kl(prediction, teacher.detach(), self.temperature, layout=layout)
        return (1.0 - self.alpha) * hard + self.alpha * soft

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}"


class NextToken(nn.Module):
    """Next-token prediction: the causal LM loss, per exit, on ``(B, T, V)`` logits.

    The cross-entropy of position ``t``'s logits with token ``t + 1``
    (:func:`deepsup.functional.causal_labels`), averaged over the labels that are not
    ``ignore_index``: the same operations as Hugging Face's ``ForCausalLMLoss`` (logits
    upcast to float32, the labels padded and shifted, ``F.cross_entropy`` with mean
    reduction), so each exit's loss equals the one the model's own ``labels=`` loss would give
    on that exit's logits, to the bit. One difference: a batch with no label left gives 0, where
    a mean over nothing is NaN. With padding, pass labels with ``ignore_index`` at the padded
    positions (``labels.masked_fill(attention_mask == 0, -100)``, as HF's collators do).

    Use it as ``DeepSupervision(criterion=NextToken())`` with ``target=input_ids`` and a
    :func:`deepsup.heads.reuse` head (the model's final norm and ``lm_head``).

    Args:
        ignore_index: the label that is not predicted (HF's -100).

    Shape:
        - prediction: logits ``(B, T, V)`` (classes last).
        - target: token ids ``(B, T)``, not shifted.
        - output: a scalar.

    Example:
        >>> import torch
        >>> logits = torch.zeros(1, 4, 10)
        >>> loss = NextToken()(logits, torch.tensor([[1, 2, 3, -100]]))
        >>> round(float(loss), 4)  # log(10): two labelled positions, uniform logits
        2.3026
    """

    layout: Layout = "NHWC"  # classes last: call_criterion hands (B, T, V) as is

    def __init__(self, ignore_index: int = -100) -> None:
        super().__init__()
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise ConfigTypeError(f"ignore_index must be an int (got {ignore_index!r})")
        self.ignore_index = ignore_index

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if prediction.dim() != 3 or target.shape != prediction.shape[:2]:
            raise TargetError(
                f"NextToken takes logits (B, T, V) and token ids (B, T) (got prediction "
                f"{tuple(prediction.shape)}, target {tuple(target.shape)}); tap decoder "
                "layers that return (B, T, C) and use a head that gives logits per token, "
                "such as heads.reuse(model.model.norm, model.lm_head)"
            )
        labels = causal_labels(target, ignore_index=self.ignore_index).reshape(-1)
        logits = prediction.float().reshape(-1, prediction.shape[-1])
        loss = F.cross_entropy(logits, labels, ignore_index=self.ignore_index)
        return torch.where((labels != self.ignore_index).any(), loss, 0.0)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}"
