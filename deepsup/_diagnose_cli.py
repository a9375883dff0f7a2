"""``python -m deepsup diagnose MODEL``: gradient flow with aux heads, and suggested taps.

The model is built as ``deepsup list`` builds it (random weights, nothing downloaded), with
``--classes`` outputs where the source takes ``num_classes`` (timm, torchvision). The input is
random, the target random labels: per-image for an output (B, classes), per-pixel for (B, classes,
H, W). Without ``--taps`` the taps are those :func:`deepsup.diagnostics.suggest_taps` ranks first.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch
from torch import nn

from . import heads
from ._discovery import build_model
from .diagnostics import gradient_flow, suggest_taps
from .errors import DeepSupError, DiagnosticsError
from .wrapper import DeepSupervision


def add_parser(sub: Any, shape: Any) -> None:
    """Add the ``diagnose`` subcommand to ``sub``; ``shape`` parses ``--input``."""
    p = sub.add_parser(
        "diagnose",
        help="gradient flow with aux heads, and suggested taps",
        description="Per-layer gradient of the main loss and of each aux loss (exact, one "
        "training step on random data), and the taps deepsup suggests.",
    )
    p.add_argument("model", help="timm:NAME, torchvision:NAME or package.module:callable")
    p.add_argument(
        "--input",
        type=shape,
        required=True,
        help="input shape with a batch of 2 or more, e.g. 2,3,224,224",
    )
    p.add_argument("--classes", type=int, required=True, help="number of classes of the output")
    p.add_argument("--taps", nargs="+", help="modules to tap (default: the suggested ones)")
    p.add_argument("--weight", type=float, default=0.4, help="weight of each aux loss")
    p.add_argument("--k", type=int, default=3, help="how many taps to suggest")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, input and target")
    p.add_argument("--plot", help="write the gradient-flow chart to this file (needs matplotlib)")


def run(args: argparse.Namespace) -> int:
    """Run ``diagnose``; prints the suggestions and the gradient-flow table. Returns the exit
    status: 0, or 2 after a one-line error for a bad model, input shape, plot path or tap."""
    try:
        return _run(args)
    except Exception as err:  # one line, no traceback: what failed and why
        first = str(err).splitlines()[0] if str(err) else ""
        kind = "" if isinstance(err, DeepSupError) else f"{type(err).__name__}: "
        print(f"deepsup diagnose: error: {kind}{first}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.classes < 1:
        raise DiagnosticsError(f"--classes must be >= 1 (got {args.classes})")
    if args.input[0] < 2:
        raise DiagnosticsError(
            f"--input {','.join(map(str, args.input))} has a batch of {args.input[0]}; use 2 or "
            "more (a training step: BatchNorm needs several samples)"
        )
    if args.plot:
        folder = os.path.dirname(os.path.abspath(args.plot))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise DiagnosticsError(
                f"--plot {args.plot}: the folder {folder} does not exist or is not writable; "
                "create it first, or pass another path"
            )
    torch.manual_seed(args.seed)
    try:
        model = build_model(args.model, args.classes)
    except Exception as err:
        raise DiagnosticsError(
            f"cannot build model {args.model!r}: {type(err).__name__}: {err}".splitlines()[0]
        ) from err
    x = torch.randn(*args.input)
    try:
        with torch.no_grad():
            out = model.eval()(x)
    except Exception as err:
        raise DiagnosticsError(
            f"{args.model} does not run on an input of shape "
            f"{','.join(map(str, args.input))}: {type(err).__name__}: {err}".splitlines()[0]
        ) from err
    if not isinstance(out, torch.Tensor) or out.dim() not in (2, 4) or out.shape[1] != args.classes:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise DiagnosticsError(
            f"{args.model} returns {got}; diagnose needs logits (B, {args.classes}) or "
            f"(B, {args.classes}, H, W). Check --classes"
        )
    dense = out.dim() == 4
    target = torch.randint(0, args.classes, (out.shape[0], *out.shape[2:]))
    criterion = nn.CrossEntropyLoss()
    suggestions = suggest_taps(model, x, target=target, criterion=criterion, k=args.k)
    print("suggested taps (most decayed main-loss gradient first):")
    for s in suggestions:
        print(f"  {s}")
    taps = args.taps or [s.name for s in suggestions]
    head = heads.seg(args.classes) if dense else heads.classification(args.classes)
    sup = DeepSupervision(
        model, dict.fromkeys(taps, args.weight), head=head, criterion=criterion, example_input=x
    )
    report = gradient_flow(sup, x, target=target, criterion=criterion)
    print(f"\ngradient flow with aux weight {args.weight:g} on {', '.join(taps)}:")
    print(report)
    if args.plot:
        report.plot(args.plot, title=f"{args.model}: gradient flow")
        print(f"\nchart written to {args.plot}")
    return 0
