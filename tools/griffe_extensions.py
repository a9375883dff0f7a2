"""Griffe extension for the API reference: deepsup's docstring conventions, rendered as Markdown.

- deepsup's docstrings use Google style with an `Example:` section (STYLE.md). Griffe's Google
  parser knows only the plural, `Examples:`, and renders `Example:` as a plain admonition whose
  `>>>` lines Markdown turns into nested quotes. The section is renamed before parsing, so the
  examples render as highlighted Python sessions.
- Sphinx roles (``:class:`Tap` ``, ``:mod:`~deepsup.heads` ``) become cross-references for
  `deepsup.` names and names exported by `deepsup`, inline code otherwise, instead of showing
  as literal text.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

import deepsup

_EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)
_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|obj|data|exc):`(~?)([\w.]+)`")


def _role(match: re.Match[str]) -> str:
    short, target = match.group(1) == "~", match.group(2)
    shown = target.rsplit(".", 1)[-1] if short else target
    if target in deepsup.__all__:
        target = f"deepsup.{target}"  # `Tap` written inside deepsup
    if target.startswith("deepsup."):
        return f"[`{shown}`][{target}]"
    return f"`{shown}`"


def rewrite(docstring: str) -> str:
    """The docstring with `Example:` sections and Sphinx roles rewritten (see the module)."""
    return _ROLE.sub(_role, _EXAMPLE.sub(r"\1Examples:", docstring))


class DeepsupDocstrings(griffe.Extension):
    """Rewrite every docstring as it is loaded, before griffe parses it."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Rewrite the docstring of each object as it is created."""
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
