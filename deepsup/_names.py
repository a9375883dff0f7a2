"""Tap names and glob patterns: which submodules ``taps=`` names, in the model's order."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from .errors import ConfigError, ConfigTypeError, TapNotFoundError

__all__ = ["as_mapping", "resolve_taps"]

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


def as_mapping(taps: Any) -> dict[str, Any]:
    """``taps=`` as a dict of name or pattern -> setting (None for a bare name)."""
    if isinstance(taps, str):
        return {taps: None}
    if isinstance(taps, Mapping):
        return dict(taps)
    if isinstance(taps, Sequence):
        bad = [t for t in taps if not isinstance(t, str)]
        if bad:
            raise ConfigTypeError(f"taps must be module names (got {bad[0]!r} in {list(taps)!r})")
        return dict.fromkeys(taps)
    raise ConfigTypeError(
        "taps must be a module name, a list of names, or a dict of name -> weight or Tap "
        f"(got {type(taps).__name__})"
    )


def resolve_taps(model: nn.Module, taps: Any) -> dict[str, tuple[nn.Module, Any]]:
    """Map each tap name or glob pattern to the modules it names, in the model's module order.

    ``taps`` is a name, a list of names or a mapping of names or patterns to their settings
    (passed through; None for a bare name); an empty one names no module (the plain baseline).

    Example:
        >>> from torch import nn
        >>> m = nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.ReLU(), nn.Linear(3, 1)))
        >>> list(resolve_taps(m, {"1.*": 0.5}))
        ['1.0', '1.1']
    """
    named = dict(model.named_modules(remove_duplicate=False))
    named.pop("", None)
    names = list(named)
    order = {n: i for i, n in enumerate(names)}
    found: dict[str, tuple[nn.Module, Any, str]] = {}
    for pattern, setting in as_mapping(taps).items():
        if not isinstance(pattern, str):
            raise ConfigTypeError(f"tap names must be str (got {pattern!r})")
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
            found[name] = (named[name], setting, pattern)
    seen: dict[int, str] = {}
    for name, (module, _, _) in found.items():
        other = seen.setdefault(id(module), name)
        if other != name:
            raise ConfigError(
                f"taps {other!r} and {name!r} are the same module object; tap it once"
            )
    ordered = sorted(found, key=order.__getitem__)
    return {n: (found[n][0], found[n][1]) for n in ordered}
