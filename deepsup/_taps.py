"""``Tap`` (per-tap settings) and the resolution of tap names and patterns to modules."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass
from typing import Any, Literal, TypeAlias

from torch import nn

from ._errors import TapNotFoundError
from ._resize import Resize
from .schedules import Schedule

__all__ = ["INHERIT", "Calls", "Selector", "Tap", "TapsArg", "resolve_taps"]

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


@dataclass(frozen=True)
class Tap:
    """Settings of one tap; any field left alone takes the wrapper's setting.

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
        interpolation: how the prediction is upsampled or the target downsampled (see
            :class:`DeepSupervision`); ``None`` takes the wrapper's.
        in_channels: the tapped feature's channel count, when it cannot be inferred.
        calls: what to do when the module runs more than once in one forward: ``"error"``,
            or use the ``"first"``, the ``"last"`` or ``"all"`` calls (the mean of their losses).
        clone: capture a copy, for outputs that the model later changes in place.
        detach: train the head on detached features: its loss does not reach the model.

    Example:
        >>> from deepsup import Tap, schedules
        >>> Tap(0.3, calls="last").weight
        0.3
        >>> Tap(schedules.Cutoff(0.4, at=1000)).weight
        Cutoff(value=0.4, at=1000)
    """

    weight: float | Schedule = 0.4
    _: KW_ONLY
    head: Callable[[int], nn.Module] | nn.Module | None = None
    criterion: Callable[..., Any] | None = INHERIT
    select: Selector | None = None
    resize: Resize = INHERIT
    align_corners: bool | None = None
    interpolation: str | None = None
    in_channels: int | None = None
    calls: Calls | None = None
    clone: bool | None = None
    detach: bool = False

    def __post_init__(self) -> None:
        if self.calls is not None and self.calls not in CALLS:
            raise ValueError(
                f"calls must be one of 'error', 'first', 'last', 'all' (got {self.calls!r})"
            )
        if self.in_channels is not None and (
            isinstance(self.in_channels, bool)
            or not isinstance(self.in_channels, int)
            or self.in_channels <= 0
        ):
            raise ValueError(f"in_channels must be a positive int (got {self.in_channels!r})")


TapsArg: TypeAlias = str | Sequence[str] | Mapping[str, float | Schedule | Tap]

_GLOB = re.compile(r"[*?\[]")


def _glob_to_regex(pattern: str) -> re.Pattern[str]:
    """``*`` matches within one name component, ``**`` across dots, ``?`` one character."""
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
            j = pattern.find("]", i)
            if j == -1:
                out.append(re.escape(c))
            else:
                out.append(pattern[i : j + 1])
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
            raise TypeError(f"taps must be module names (got {bad[0]!r} in {list(taps)!r})")
        return {t: Tap() for t in taps}
    raise TypeError(
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
        raise ValueError("taps is empty; name at least one module (see `deepsup.list_taps(model)`)")
    named = dict(model.named_modules(remove_duplicate=False))
    named.pop("", None)
    names = list(named)
    order = {n: i for i, n in enumerate(names)}
    found: dict[str, tuple[nn.Module, Tap, str]] = {}
    for pattern, setting in spec.items():
        if not isinstance(pattern, str):
            raise TypeError(f"tap names must be str (got {pattern!r})")
        tap = setting if isinstance(setting, Tap) else Tap(setting)
        if pattern == "":
            raise ValueError(
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
                raise ValueError(
                    f"tap {name!r} is matched by both {found[name][2]!r} and {pattern!r}; "
                    "give each module one entry"
                )
            found[name] = (named[name], tap, pattern)
    seen: dict[int, str] = {}
    for name, (module, _, _) in found.items():
        other = seen.setdefault(id(module), name)
        if other != name:
            raise ValueError(f"taps {other!r} and {name!r} are the same module object; tap it once")
    ordered = sorted(found, key=order.__getitem__)
    return {n: (found[n][0], found[n][1]) for n in ordered}
