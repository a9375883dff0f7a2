"""``python -m deepsup list MODEL``: print the tappable modules of a model.

``python -m deepsup diagnose MODEL --input SHAPE --classes N``: the gradient flow with aux heads
and the suggested taps (see ``deepsup/_diagnose_cli.py``).

MODEL is ``timm:NAME``, ``torchvision:NAME`` or ``package.module:callable`` (called with no
arguments). No weights are downloaded: models are built with random weights.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from ._diagnose_cli import add_parser as add_diagnose_parser
from ._diagnose_cli import run as run_diagnose
from ._discovery import build_model, format_taps, list_taps

__all__ = ["build_model", "main"]


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--input must be comma-separated ints such as 1,3,224,224 (got {text!r})"
        ) from None
    return shape


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="deepsup", description="List the modules of a model that deepsup can tap."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", help="list tappable modules")
    ls.add_argument("model", help="timm:NAME, torchvision:NAME or package.module:callable")
    ls.add_argument(
        "--input",
        type=_shape,
        default=None,
        help="an input shape such as 1,3,224,224: run once to show output shapes and calls",
    )
    ls.add_argument("--suggested", action="store_true", help="only the suggested stage boundaries")
    add_diagnose_parser(sub, _shape)
    args = parser.parse_args(argv)
    if args.command == "diagnose":
        return run_diagnose(args)
    try:
        model = build_model(args.model)
    except Exception as err:  # a bad spec: one line, exit 2, no traceback
        return _fail(f"cannot build model {args.model!r}: {type(err).__name__}: {err}")
    try:
        example = torch.randn(*args.input) if args.input else None
        infos = list_taps(model, example)
    except Exception as err:
        shape = ",".join(map(str, args.input or ()))
        return _fail(
            f"{args.model} does not run on an input of shape {shape}: "
            f"{type(err).__name__}: {err}".splitlines()[0]
        )
    if args.suggested:
        infos = [t for t in infos if t.suggested]
    print(format_taps(infos))
    print(f"\n{len(infos)} modules; * marks suggested taps (stage boundaries)")
    return 0


def _fail(message: str) -> int:
    """Report a user error on one line (as argparse does) and return exit status 2."""
    print(f"deepsup: error: {message.splitlines()[0] if message else ''}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
