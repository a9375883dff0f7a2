"""``Tap`` (the user's per-tap settings), their one resolution into ``TapSettings``, and every
check of what the wrapper and a tap take."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, fields
from typing import Any, Literal, NoReturn, TypeAlias

from torch import nn

from . import heads as _heads
from ._checks import check_choice, check_int
from ._layout import Layout, check_layout
from .errors import ConfigError, ConfigTypeError
from .functional import PREDICTION_MODES, RESIZE_MODES, TARGET_MODES, Resize
from .schedules import Schedule, as_schedule

__all__ = [
    "INHERIT",
    "OUTPUT",
    "Calls",
    "Selector",
    "Tap",
    "TapSettings",
    "TapsArg",
    "TapsView",
    "check_calls",
    "check_criterion",
    "check_head",
    "check_interpolation",
    "check_resize",
    "check_target_key",
    "settle",
]

OUTPUT = "output"  # the key of the model's output among the exits: no tap may take it
Calls = Literal["error", "first", "last", "all"]
CALLS = ("error", "first", "last", "all")
Selector: TypeAlias = int | str | Callable[[Any], Any]
INTERPOLATIONS = frozenset(PREDICTION_MODES + TARGET_MODES)


class _Inherit:
    """Marks a :class:`Tap` field that takes the wrapper's setting."""

    _instance: _Inherit | None = None

    def __new__(cls) -> _Inherit:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "INHERIT"

    def __reduce__(self) -> str:
        return "INHERIT"


INHERIT: Any = _Inherit()

# Fields where None (the pre-INHERIT spelling) also means "the wrapper's setting"; for
# criterion, resize and ignore_index None is a value of its own.
_NONE_INHERITS = ("head", "align_corners", "interpolation", "calls", "clone", "layout")


# ------------------------------------------------------------------------------ checks


def check_calls(calls: object) -> Calls:
    """``calls`` must be one of ``"error"``, ``"first"``, ``"last"``, ``"all"``."""
    return check_choice("calls", calls, CALLS)  # type: ignore[no-any-return]


def check_resize(resize: object) -> Resize:
    """``resize`` must be ``"prediction"``, ``"target"`` or None."""
    if resize not in RESIZE_MODES:
        raise ConfigError(
            f"resize must be 'prediction' (upsample the prediction to the target), 'target' "
            f"(downsample the target to the prediction) or None (got {resize!r})"
        )
    return resize  # type: ignore[return-value]


def check_interpolation(resize: Resize, interpolation: object, where: str = "") -> str | None:
    """The interpolation a tap uses: ``interpolation``, or the default of ``resize`` for None.

    Example:
        >>> check_interpolation("prediction", None), check_interpolation("target", "soft")
        ('linear', 'soft')
    """
    if resize is None:
        if interpolation is not None:
            raise ConfigError(
                f"{where}interpolation={interpolation!r} has no effect with resize=None "
                "(predictions and targets must then have equal sizes); pass "
                "resize='prediction' or 'target'"
            )
        return None
    modes = PREDICTION_MODES if resize == "prediction" else TARGET_MODES
    if interpolation is None:
        return modes[0]
    if interpolation not in modes:
        other = "target" if resize == "prediction" else "prediction"
        elsewhere = TARGET_MODES if resize == "prediction" else PREDICTION_MODES
        hint = (
            f" ({interpolation!r} is a mode of resize={other!r})"
            if interpolation in elsewhere
            else ""
        )
        raise ConfigError(
            f"{where}interpolation={interpolation!r} is not a mode of resize={resize!r}{hint}; "
            f"choose one of {modes}"
        )
    return str(interpolation)


def check_ignore_index(value: object) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"ignore_index must be an int label or None (got {value!r})")
    return value


def check_criterion(criterion: object, where: str) -> None:
    """A criterion is a callable instance (not a class), or None."""
    if isinstance(criterion, type):
        raise ConfigTypeError(
            f"{where}criterion={criterion.__name__} is a class; pass an instance, e.g. "
            f"criterion={criterion.__name__}()"
        )
    if criterion is not None and not callable(criterion):
        raise ConfigTypeError(
            f"{where}criterion must be callable as criterion(prediction, target) or None "
            f"(got {type(criterion).__name__})"
        )


_MAKERS = {_heads.seg: "seg", _heads.classification: "classification", _heads.tokens: "tokens"}


def check_head(head: Any, where: str) -> None:
    """A head is a ready module, or a callable that can be called with one positional
    argument (the channel count): a factory, a function, or a class whose constructor takes
    the channel count. Refuse, naming the missing parameters, what cannot."""
    if head is None or isinstance(head, nn.Module):
        return
    if head in _MAKERS:
        name = _MAKERS[head]
        raise ConfigTypeError(
            f"{where}head=heads.{name} was passed uncalled; call it with the head's settings: "
            f"head=heads.{name}(num_classes=...)"
        )
    if not callable(head):
        raise ConfigTypeError(
            f"{where}head must be a factory in_channels -> nn.Module or an nn.Module "
            f"(got {type(head).__name__})"
        )
    try:
        signature = inspect.signature(head)
    except (TypeError, ValueError):  # a builtin without a signature: called as is
        return
    try:
        signature.bind(1)
    except TypeError:
        label = getattr(head, "__name__", type(head).__name__)
        params = list(signature.parameters.values())
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        var = any(p.kind == p.VAR_POSITIONAL for p in params)
        if not positional and not var:
            raise ConfigTypeError(
                f"{where}head={label} takes no positional argument, so it cannot be called "
                f"with the channel count as {label}(in_channels); head= takes a callable "
                "in_channels -> nn.Module or a ready module"
            ) from None
        missing = [
            p.name for p in params[1:] if p.default is p.empty and p.kind not in (
                p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]  # fmt: skip
        listed = ", ".join(repr(m) for m in missing)
        example = ", ".join(f"{m}=..." for m in missing)
        what = f"parameters {listed} need" if len(missing) > 1 else f"parameter {listed} needs"
        raise ConfigTypeError(
            f"{where}head={label} cannot be called as {label}(in_channels): its {what} a "
            f"value; pass functools.partial({label}, {example}), a deepsup.heads factory (e.g. "
            "heads.seg(num_classes=...)) or a ready module"
        ) from None


def check_target_key(model: nn.Module, key: str) -> str:
    """``target_key`` must be a keyword that the model's own forward does not take."""
    if not isinstance(key, str) or not key.isidentifier():
        raise ConfigError(f"target_key must be a keyword name (got {key!r})")
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # no signature to read (a builtin): nothing can clash
        return key
    p = params.get(key)
    if p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
        raise ConfigError(
            f"{type(model).__name__}.forward takes its own {key}= parameter, which the wrapper "
            f"would take for the aux losses (the model would never see it); pass another name "
            f'for the wrapper\'s, e.g. DeepSupervision(..., target_key="aux_target"), and call '
            f"sup(x, {key}=..., aux_target=y)"
        )
    return key


# ------------------------------------------------------------------------------ Tap


@dataclass(frozen=True)
class Tap:
    """Settings of one tap; any field left at ``INHERIT`` takes the wrapper's setting.

    Args:
        weight: the aux loss weight, a float or a :mod:`deepsup.schedules` schedule.
        head: a head factory (``in_channels -> nn.Module``: a function, a
            :mod:`deepsup.heads` factory, or a class whose constructor takes the channel
            count) or a ready module. A ready module matched by several taps (a glob
            pattern) is deep-copied per tap.
        criterion: ``criterion(prediction, target) -> loss``; ``None`` returns the head's
            prediction instead of a loss.
        select: which tensor of a tuple/list/dict/dataclass output feeds the head: an index, a
            key or attribute name, or a callable ``output -> Tensor``. By default a tensor output
            is used as is, and a tuple/list/dict/dataclass gives its first element.
        resize: ``"prediction"``, ``"target"`` or ``None`` (see :class:`DeepSupervision`).
        align_corners: for ``resize="prediction"``.
        interpolation: how the prediction is upsampled or the target downsampled (see
            :class:`DeepSupervision`); by default (or ``None``) the wrapper's.
        in_channels: the tapped feature's channel count, when it cannot be inferred.
        calls: what to do when the module runs more than once in one forward: ``"error"``,
            or use the ``"first"``, the ``"last"`` or ``"all"`` calls (the mean of their losses).
            :meth:`DeepSupervision.exits` and :class:`~deepsup.EarlyExit` follow the same rule.
        clone: capture a copy, for outputs that the model later changes in place (or a head
            that changes its input in place).
        detach: train the head on detached features: its loss does not reach the model.
        layout: where the tapped feature's channels are: ``"NCHW"`` (dim 1, (B, C, *spatial),
            Conv1d's (B, C, L) included) or ``"NHWC"`` (last: (B, *spatial, C), tokens (B, N, C)
            included). By default inferred from the tapped module (its layers, timm's
            ``feature_info``, the dry run's shape); pass it where that stays ambiguous. A head
            that does not declare its prediction's layout is taken to keep this one (a
            per-token ``nn.Linear`` on tokens gives (B, N, K) predictions).
        ignore_index: the target's ignore label, for ``resize="target"`` (an ignore-aware
            downsampling) and for batches without a valid label (a finite loss). By default the
            criterion's ``ignore_index`` attribute (``nn.CrossEntropyLoss``, and
            :class:`~deepsup.losses.SelfDistillation`'s inner criterion), else None.

    Example:
        >>> from deepsup import Tap, schedules
        >>> Tap(0.3, calls="last").weight
        0.3
        >>> Tap(schedules.Cutoff(0.4, at=1000)).weight
        Cutoff(value=0.4, at=1000)
    """

    weight: float | Schedule = 0.4
    _: KW_ONLY
    head: Callable[[int], nn.Module] | nn.Module | None = INHERIT
    criterion: Callable[..., Any] | None = INHERIT
    select: Selector | None = None
    resize: Resize = INHERIT
    align_corners: bool = INHERIT
    interpolation: str | None = INHERIT
    in_channels: int | None = None
    calls: Calls = INHERIT
    clone: bool = INHERIT
    detach: bool = False
    layout: Layout = INHERIT
    ignore_index: int | None = INHERIT

    def __post_init__(self) -> None:
        for name in _NONE_INHERITS:
            if getattr(self, name) is None:
                object.__setattr__(self, name, INHERIT)
        as_schedule(self.weight)
        if self.calls is not INHERIT:
            check_calls(self.calls)
        if self.in_channels is not None:
            check_int("in_channels", self.in_channels)
        if self.resize is not INHERIT:
            check_resize(self.resize)
            if self.interpolation is not INHERIT:
                check_interpolation(self.resize, self.interpolation)
        elif self.interpolation is not INHERIT and self.interpolation not in INTERPOLATIONS:
            check_interpolation("prediction", self.interpolation)  # raises, naming the modes
        if self.layout is not INHERIT:
            check_layout(self.layout)
        if self.ignore_index is not INHERIT:
            check_ignore_index(self.ignore_index)
        if self.criterion is not INHERIT:
            check_criterion(self.criterion, "Tap(...): ")


@dataclass(frozen=True)
class TapSettings:
    """A tap's resolved settings: every field concrete, checked once (private to deepsup).

    ``layout`` and ``pred_layout`` are the tap's declaration until the heads are built, then
    the resolved layouts (None: undecided, for outputs where it never matters).
    """

    weight: Schedule
    criterion: Callable[..., Any] | None
    select: Selector | None
    resize: Resize
    align_corners: bool
    interpolation: str | None  # None: resize=None
    in_channels: int | None
    calls: Calls
    clone: bool
    detach: bool
    layout: Layout | None  # of the tapped feature
    pred_layout: Layout | None  # of the head's prediction
    ignore_index: int | None

    def as_tap(self, head: nn.Module) -> Tap:
        """The public view: a :class:`Tap` with every field resolved, ``head`` the built head."""
        values = {f.name: getattr(self, f.name) for f in fields(Tap) if hasattr(self, f.name)}
        tap = Tap(**values, head=head)
        # resolved: None is resize=None's "no interpolation" / an undecided layout
        object.__setattr__(tap, "interpolation", self.interpolation)
        object.__setattr__(tap, "layout", self.layout)
        return tap


def _criterion_ignore_index(criterion: Any) -> int | None:
    found = getattr(criterion, "ignore_index", None)
    return found if isinstance(found, int) and not isinstance(found, bool) else None


def settle(
    name: str,
    tap: Tap | float | Schedule | None,
    *,
    head: Any,
    criterion: Callable[..., Any] | None,
    resize: Resize,
    align_corners: bool,
    calls: Calls,
    clone: bool,
    interpolation: str | None = None,
) -> tuple[TapSettings, Any]:
    """Resolve a :class:`Tap` (or a bare weight) against the wrapper's checked settings, once.

    Returns the settings and the tap's head spec (a factory or a module, or None).
    """
    if not isinstance(tap, Tap):
        tap = Tap() if tap is None else Tap(tap)

    def pick(value: Any, default: Any) -> Any:
        return default if value is INHERIT else value

    where = f"tap {name!r}: "
    head_spec = pick(tap.head, head)
    check_head(head_spec, where)
    crit = pick(tap.criterion, criterion)
    ignore = tap.ignore_index
    if ignore is INHERIT:
        ignore = _criterion_ignore_index(crit)
    tap_resize = pick(tap.resize, resize)
    if tap.interpolation is not INHERIT:
        interp = check_interpolation(tap_resize, tap.interpolation, where)
    else:  # the wrapper's, if it fits this tap's resize; else the resize's default
        inherited = interpolation if tap_resize is not None else None
        interp = check_interpolation(
            tap_resize,
            inherited,
            f"{where}(inheriting DeepSupervision(interpolation={interpolation!r}) with "
            f"Tap(resize={tap_resize!r})) ",
        )
    own = _criterion_ignore_index(crit)
    if interp == "soft" and own is not None and own != -100:
        raise ConfigError(
            f"{where}interpolation='soft' gives the criterion probability targets, which "
            f"{type(crit).__name__}(ignore_index={own}) refuses (PyTorch: 'ignore_index is not "
            "supported for floating point target'); use nn.CrossEntropyLoss() and "
            f"Tap(ignore_index={own}): 'soft' leaves the ignore label out of each cell"
        )
    settings = TapSettings(
        weight=as_schedule(tap.weight),
        criterion=crit,
        select=tap.select,
        resize=tap_resize,
        interpolation=interp,
        align_corners=bool(pick(tap.align_corners, align_corners)),
        in_channels=tap.in_channels,
        calls=pick(tap.calls, calls),
        clone=bool(pick(tap.clone, clone)),
        detach=bool(tap.detach),
        layout=pick(tap.layout, None),
        pred_layout=None,
        ignore_index=ignore,
    )
    return settings, head_spec


class TapsView(Mapping[str, Tap]):
    """``sup.taps``: a read-only ``{tap name: Tap}`` of the resolved settings.

    Taps are fixed at construction (their hooks are registered once); build a new wrapper to
    change them.
    """

    def __init__(self, taps: Mapping[str, Tap]) -> None:
        self._taps = dict(taps)

    def __getitem__(self, name: str) -> Tap:
        return self._taps[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._taps)

    def __len__(self) -> int:
        return len(self._taps)

    def __repr__(self) -> str:
        return repr(self._taps)

    def _read_only(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise ConfigTypeError(
            "sup.taps is read-only: taps and their settings are fixed at construction (their "
            "hooks are registered once); build a new DeepSupervision(model, taps=...) to change "
            "them (sup.unwrap() first releases the model's hooks)"
        )

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _read_only


TapsArg: TypeAlias = str | Sequence[str] | Mapping[str, float | Schedule | Tap]
