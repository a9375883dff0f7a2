"""``Tap`` (the user's per-tap settings), their resolution, and tap names and patterns."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, fields
from typing import Any, Literal, NoReturn, TypeAlias

from torch import nn

from ._channels import Layout, check_layout, head_layouts
from ._errors import ConfigError, ConfigTypeError, TapNotFoundError, check_int
from ._resize import Resize, check_resize
from .schedules import Schedule, as_schedule

__all__ = [
    "INHERIT",
    "Calls",
    "Selector",
    "Tap",
    "TapSettings",
    "TapsArg",
    "TapsView",
    "resolve_taps",
    "settle",
]

Calls = Literal["error", "first", "last", "all"]
CALLS = ("error", "first", "last", "all")
Selector: TypeAlias = int | str | Callable[[Any], Any]


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
_NONE_INHERITS = ("head", "align_corners", "calls", "clone", "layout")


def check_calls(calls: object) -> Calls:
    if calls not in CALLS:
        raise ConfigError(f"calls must be one of 'error', 'first', 'last', 'all' (got {calls!r})")
    return calls  # type: ignore[return-value]


def check_ignore_index(value: object) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"ignore_index must be an int label or None (got {value!r})")
    return value


def check_criterion(criterion: object, where: str) -> None:
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


@dataclass(frozen=True)
class Tap:
    """Settings of one tap; any field left at ``INHERIT`` takes the wrapper's setting.

    Args:
        weight: the aux loss weight, a float or a :mod:`deepsup.schedules` schedule.
        head: a head factory (``in_channels -> nn.Module``) or a ready module. A ready module
            matched by several taps (a glob pattern) is deep-copied per tap.
        criterion: ``criterion(prediction, target) -> loss``; ``None`` returns the head's
            prediction instead of a loss.
        select: which tensor of a tuple/list/dict/dataclass output feeds the head: an index, a
            key or attribute name, or a callable ``output -> Tensor``. By default a tensor output
            is used as is, and a tuple/list/dict/dataclass gives its first element.
        resize: ``"prediction"``, ``"target"`` or ``None`` (see :class:`DeepSupervision`).
        align_corners: for ``resize="prediction"``.
        in_channels: the tapped feature's channel count, when it cannot be inferred.
        calls: what to do when the module runs more than once in one forward: ``"error"``,
            or use the ``"first"``, the ``"last"`` or ``"all"`` calls (the mean of their losses).
        clone: capture a copy, for outputs that the model later changes in place (or a head
            that changes its input in place).
        detach: train the head on detached features: its loss does not reach the model.
        layout: where the tapped feature's channels are: ``"NCHW"`` (dim 1, (B, C, *spatial),
            Conv1d's (B, C, L) included) or ``"NHWC"`` (last: (B, *spatial, C), tokens (B, N, C)
            included). By default the head's declaration (the built-in heads declare theirs),
            else ``"NCHW"``. A head that does not declare its prediction's layout is taken to
            keep this one (a per-token ``nn.Linear`` on tokens gives (B, N, K) predictions).
        ignore_index: the target's ignore label, for ``resize="target"`` (an ignore-aware
            downsampling) and for batches without a valid label (a finite loss). By default the
            criterion's ``ignore_index`` attribute (``nn.CrossEntropyLoss``), else None.

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
        if self.layout is not INHERIT:
            check_layout(self.layout)
        if self.ignore_index is not INHERIT:
            check_ignore_index(self.ignore_index)
        if self.criterion is not INHERIT:
            check_criterion(self.criterion, "Tap(...): ")


@dataclass(frozen=True)
class TapSettings:
    """A tap's resolved settings: every field concrete, checked once (private to deepsup)."""

    weight: Schedule
    criterion: Callable[..., Any] | None
    select: Selector | None
    resize: Resize
    align_corners: bool
    in_channels: int | None
    calls: Calls
    clone: bool
    detach: bool
    layout: Layout  # of the tapped feature
    pred_layout: Layout  # of the head's prediction
    ignore_index: int | None

    def as_tap(self, head: nn.Module) -> Tap:
        """The public view: a :class:`Tap` with every field resolved, ``head`` the built head."""
        values = {f.name: getattr(self, f.name) for f in fields(Tap) if hasattr(self, f.name)}
        return Tap(**values, head=head)


def settle(
    tap: Tap,
    *,
    head: Any,
    criterion: Callable[..., Any] | None,
    resize: Resize,
    align_corners: bool,
    calls: Calls,
    clone: bool,
) -> tuple[TapSettings, Any]:
    """Resolve a :class:`Tap` against the wrapper's (already checked) settings, once.

    Returns the settings and the tap's head spec (a factory or a module, or None).
    """

    def pick(value: Any, default: Any) -> Any:
        return default if value is INHERIT else value

    head_spec = pick(tap.head, head)
    crit = pick(tap.criterion, criterion)
    in_layout, out_layout = head_layouts(head_spec)
    layout: Layout = pick(tap.layout, in_layout or "NCHW")
    ignore = tap.ignore_index
    if ignore is INHERIT:
        found = getattr(crit, "ignore_index", None)
        ignore = found if isinstance(found, int) and not isinstance(found, bool) else None
    settings = TapSettings(
        weight=as_schedule(tap.weight),
        criterion=crit,
        select=tap.select,
        resize=pick(tap.resize, resize),
        align_corners=bool(pick(tap.align_corners, align_corners)),
        in_channels=tap.in_channels,
        calls=pick(tap.calls, calls),
        clone=bool(pick(tap.clone, clone)),
        detach=bool(tap.detach),
        layout=layout,
        pred_layout=out_layout or layout,
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

_GLOB = re.compile(r"[*?\[]")


def _bracket(body: str) -> str:
    """A ``[...]`` class as fnmatch reads it: ``!`` first negates, a first ``^`` is literal."""
    body = body.replace("\\", "\\\\")
    if body.startswith("!"):
        return "[^" + body[1:] + "]"
    if body.startswith("^"):
        return "[\\" + body + "]"
    return "[" + body + "]"


def _glob_to_regex(pattern: str) -> re.Pattern[str]:
    """``*`` matches within one name component, ``**`` across dots, ``?`` one character,
    ``[seq]`` / ``[!seq]`` one character in / not in ``seq`` (as :mod:`fnmatch`)."""
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append(r"[^.]*")
        elif c == "?":
            out.append(r"[^.]")
        elif c == "[":
            # as fnmatch: a ']' right after '[' or '[!' is part of the set
            j = i + 1
            if j < len(pattern) and pattern[j] == "!":
                j += 1
            if j < len(pattern) and pattern[j] == "]":
                j += 1
            j = pattern.find("]", j)
            if j == -1:
                out.append(re.escape(c))
            else:
                out.append(_bracket(pattern[i + 1 : j]))
                i = j + 1
                continue
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


def _not_found(pattern: str, model: nn.Module, names: Sequence[str]) -> TapNotFoundError:
    close = difflib.get_close_matches(pattern, names, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    what = "pattern" if _GLOB.search(pattern) else "tap"
    return TapNotFoundError(
        f"{what} {pattern!r} matches no submodule of {type(model).__name__}.{hint} "
        "`deepsup.list_taps(model)` lists the names."
    )


def _as_mapping(taps: TapsArg) -> dict[str, float | Schedule | Tap]:
    if isinstance(taps, str):
        return {taps: Tap()}
    if isinstance(taps, Mapping):
        return dict(taps)
    if isinstance(taps, Sequence):
        bad = [t for t in taps if not isinstance(t, str)]
        if bad:
            raise ConfigTypeError(f"taps must be module names (got {bad[0]!r} in {list(taps)!r})")
        return {t: Tap() for t in taps}
    raise ConfigTypeError(
        "taps must be a module name, a list of names, or a dict of name -> weight or Tap "
        f"(got {type(taps).__name__})"
    )


def resolve_taps(model: nn.Module, taps: TapsArg) -> dict[str, tuple[nn.Module, Tap]]:
    """Map each tap name or glob pattern to the modules it names, in the model's module order.

    Example:
        >>> from torch import nn
        >>> m = nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.ReLU(), nn.Linear(3, 1)))
        >>> list(resolve_taps(m, {"1.*": 0.5}))
        ['1.0', '1.1']
    """
    spec = _as_mapping(taps)
    if not spec:
        raise ConfigError(
            "taps is empty; name at least one module (see `deepsup.list_taps(model)`)"
        )
    named = dict(model.named_modules(remove_duplicate=False))
    named.pop("", None)
    names = list(named)
    order = {n: i for i, n in enumerate(names)}
    found: dict[str, tuple[nn.Module, Tap, str]] = {}
    for pattern, setting in spec.items():
        if not isinstance(pattern, str):
            raise ConfigTypeError(f"tap names must be str (got {pattern!r})")
        tap = setting if isinstance(setting, Tap) else Tap(setting)
        if pattern == "":
            raise ConfigError(
                "tap '' is the model itself; tap a submodule (hooking the root breaks "
                "torch.compile graphs and captures nothing the model's output does not give)"
            )
        if _GLOB.search(pattern):
            rx = _glob_to_regex(pattern)
            matched = [n for n in names if rx.match(n)]
        else:
            matched = [pattern] if pattern in named else []
        if not matched:
            raise _not_found(pattern, model, names)
        for name in matched:
            if name in found:
                raise ConfigError(
                    f"tap {name!r} is matched by both {found[name][2]!r} and {pattern!r}; "
                    "give each module one entry"
                )
            found[name] = (named[name], tap, pattern)
    seen: dict[int, str] = {}
    for name, (module, _, _) in found.items():
        other = seen.setdefault(id(module), name)
        if other != name:
            raise ConfigError(
                f"taps {other!r} and {name!r} are the same module object; tap it once"
            )
    ordered = sorted(found, key=order.__getitem__)
    return {n: (found[n][0], found[n][1]) for n in ordered}
