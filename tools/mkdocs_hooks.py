"""MkDocs hook: writes the API reference from what deepsup exports, so no public name is missed.

`docs/api.md` holds the marker ``<!-- deepsup-api -->``; at build time it is replaced by one
mkdocstrings directive (``::: deepsup.Name``) per name of ``deepsup.__all__``, grouped by the
module that defines it, then one section per public submodule (``deepsup.heads``,
``deepsup.schedules``, ``deepsup.models``, and any new one) with its names that are not exported
at the top level. A name added to ``__all__`` or a new public submodule appears without editing
the page; `GROUPS` only gives known groups a title and an order.

`python tools/mkdocs_hooks.py` prints the generated Markdown.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import re
import types
from typing import Any

from torch import nn

MARKER = "<!-- deepsup-api -->"

# Defining module -> (section title, names shown first). Modules not listed get the first clause of
# their docstring as the title and come after these, before the errors.
GROUPS: dict[str, tuple[str, tuple[str, ...]]] = {
    "deepsup.wrapper": ("The wrapper", ("DeepSupervision",)),
    "deepsup._names": ("Taps", ()),
    "deepsup._discovery": ("Finding taps", ("list_taps", "format_taps")),
    "deepsup._state": ("Checkpoints and optimizers", ()),
}
LAST = ("deepsup.errors", "deepsup._version")
TITLES_LAST = {"deepsup.errors": "Errors and warnings", "deepsup._version": "Version"}
# Public-looking modules whose names are all documented at the top level.
NOT_SUBMODULES = {"__main__"}


def _title_from_docstring(module: types.ModuleType) -> str:
    doc = inspect.getdoc(module) or module.__name__
    return re.split(r"[.:;]\s", doc.splitlines()[0] + " ")[0].replace("``", "`")


def _defining_module(package: types.ModuleType, name: str) -> str:
    obj = getattr(package, name)
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    module = getattr(obj, "__module__", None)
    if isinstance(module, str) and module.startswith(package.__name__):
        return module
    # Plain values (`__version__`) have no __module__: find the private module that holds them.
    for info in pkgutil.iter_modules(package.__path__):
        sub = importlib.import_module(f"{package.__name__}.{info.name}")
        if getattr(sub, name, object()) is obj:
            return sub.__name__
    return package.__name__


def _source_line(obj: Any) -> int:
    try:
        return inspect.getsourcelines(obj)[1]
    except (TypeError, OSError):
        return 10**9


def public_submodules(package: types.ModuleType) -> list[types.ModuleType]:
    """The submodules a user imports: those in ``__all__``, then the other non-underscore ones."""
    exported = [n for n in package.__all__ if isinstance(getattr(package, n), types.ModuleType)]
    others = sorted(
        info.name
        for info in pkgutil.iter_modules(package.__path__)
        if not info.name.startswith("_")
        and info.name not in NOT_SUBMODULES
        and info.name not in exported
    )
    return [importlib.import_module(f"{package.__name__}.{n}") for n in exported + others]


def top_level_groups(package: types.ModuleType) -> list[tuple[str, list[str]]]:
    """``[(title, [name, ...]), ...]`` for the package's ``__all__``, modules left out."""
    by_module: dict[str, list[str]] = {}
    for name in package.__all__:
        if isinstance(getattr(package, name), types.ModuleType):
            continue
        by_module.setdefault(_defining_module(package, name), []).append(name)
    order = [m for m in GROUPS if m in by_module]
    order += sorted(m for m in by_module if m not in GROUPS and m not in LAST)
    order += [m for m in LAST if m in by_module]
    groups = []
    for module in order:
        first = GROUPS.get(module, ("", ()))[1]
        names = sorted(
            by_module[module],
            key=lambda n: (
                first.index(n) if n in first else len(first),
                _source_line(getattr(package, n)),
                n,
            ),
        )
        if module in GROUPS:
            title = GROUPS[module][0]
        elif module in TITLES_LAST:
            title = TITLES_LAST[module]
        else:
            title = _title_from_docstring(importlib.import_module(module))
        groups.append((title, names))
    return groups


def torch_protocol_methods(obj: Any) -> list[str]:
    """Public methods a class overrides from ``torch.nn.Module`` (``forward``,
    ``get_extra_state``, ...): torch's protocol, documented by torch; the class docstring says
    what calling the module does. The API page leaves them out."""
    if not inspect.isclass(obj) or not issubclass(obj, nn.Module):
        return []
    return sorted(n for n in vars(obj) if not n.startswith("_") and hasattr(nn.Module, n))


def _filters(objects: list[Any]) -> str:
    """mkdocstrings' ``filters`` option: private names and torch's protocol methods left out."""
    hidden = sorted({n for obj in objects for n in torch_protocol_methods(obj)})
    return json.dumps(["!^_", *(f"!^{n}$" for n in hidden)])


def api_markdown(package_name: str = "deepsup") -> str:
    """The Markdown of the API reference: headings and mkdocstrings directives."""
    package = importlib.import_module(package_name)
    top = {id(getattr(package, n)) for n in package.__all__}
    lines: list[str] = []
    for title, names in top_level_groups(package):
        lines += [f"## {title}", ""]
        for name in names:
            lines.append(f"::: {package_name}.{name}")
            if torch_protocol_methods(getattr(package, name)):
                lines += ["    options:", f"      filters: {_filters([getattr(package, name)])}"]
            lines.append("")
    for sub in public_submodules(package):
        listed = getattr(sub, "__all__", None)
        own = [n for n in listed or [] if id(getattr(sub, n)) not in top]
        shown_above = [n for n in listed or [] if n not in own]
        if listed is not None and not own and id(sub) not in top:
            continue  # an implementation module (deepsup.wrapper): its names are above
        members = "[" + ", ".join(own) + "]" if own else "false"
        if listed is None:
            members = "true"  # no __all__: mkdocstrings shows its public names
        lines += [
            f"::: {sub.__name__}",
            "    options:",
            "      heading_level: 2",
            "      show_symbol_type_heading: false",
            f"      members: {members}",
            f"      filters: {_filters([getattr(sub, n) for n in own])}",
            "",
        ]
        if shown_above:
            links = ", ".join(f"[`{n}`][{package_name}.{n}]" for n in shown_above)
            lines += [f"Also exported as `{package_name}.NAME` and documented above: {links}.", ""]
    return "\n".join(lines)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """MkDocs event: fill the API page's marker."""
    if MARKER in markdown:
        return markdown.replace(MARKER, api_markdown())
    return markdown


# Hover titles name objects by their defining path: a cross-reference gets
# title="deepsup.TapInfo dataclass (deepsup._discovery.TapInfo)", a type alias of a signature
# title="deepsup._taps.TapsArg". Private modules are not for users (STYLE.md): the titles keep
# the public path, or the bare name where there is none.
_TITLE = re.compile(r'title="([^"]*)"')
_PRIVATE_IN_PARENS = re.compile(r"\s*\((?:\w+\.)*_[A-Za-z]\w*\.[\w.]+\)")
_PRIVATE_PATH = re.compile(r"\b(?:\w+\.)+_[A-Za-z]\w*\.((?:\w+\.)*\w+)")


def _public_title(match: re.Match[str]) -> str:
    title = _PRIVATE_PATH.sub(r"\1", _PRIVATE_IN_PARENS.sub("", match.group(1)))
    return f'title="{" ".join(title.split())}"'


def on_post_page(output: str, page: Any, config: Any) -> str:
    """MkDocs event: no private module paths in the pages' hover titles."""
    return _TITLE.sub(_public_title, output)
