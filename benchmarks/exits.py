"""Exits: ``sup.exits(x)`` vs a plain forward, and early exit at calibrated thresholds vs the model.

Part 1: torchvision resnet18 (10 classes) with classification heads on ``layer1``..``layer3``;
``sup.exits(x)`` (the model and every head, one forward) against ``model(x)``, eval, no_grad.

Part 2: the small ResNet of ``examples/multi_exit_digits.py`` trained with deep supervision on
the digits (a few epochs, in this run), thresholds calibrated on val at ``max_drop=0.01``, then
the test set one sample at a time through ``EarlyExit`` and through the model alone,
interleaved: wall time per sample, FLOPs per sample (``FlopCounterMode``) and accuracy.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from _common import (
    ROOT,
    Stats,
    Target,
    emit,
    fmt_bytes,
    fmt_time,
    interleave,
    machine,
    paired,
    parser,
    peak_memory,
    pick,
    setup,
    table,
    tree_equal,
)
from torch import nn

from deepsup import DeepSupervision, EarlyExit, heads


def exits_overhead(*, rounds: int, warmup: int, batch_size: int, size: int) -> list[object]:
    from torchvision.models import resnet18

    torch.manual_seed(0)
    sup = DeepSupervision(
        resnet18(num_classes=10),
        ["layer1", "layer2", "layer3"],
        head=heads.classification(10),
        criterion=nn.CrossEntropyLoss(),
    ).eval()
    model = sup.model
    x = torch.randn(batch_size, 3, size, size)

    def run(fn: Callable[[torch.Tensor], Any]) -> Callable[[], None]:
        def call() -> None:
            with torch.no_grad():
                fn(x)

        return call

    with torch.no_grad():
        same = tree_equal(sup.exits(x)["output"], model(x))
    variants = {"forward": run(model), "exits": run(sup.exits)}
    times = interleave(variants, rounds=rounds, warmup=warmup)
    peaks = {k: peak_memory(v) for k, v in variants.items()}
    ratio = paired(times, "forward", "exits")
    return [
        "resnet18, heads on layer1-3",
        "x".join(map(str, x.shape)),
        fmt_time(Stats.of(times["forward"])),
        fmt_time(Stats.of(times["exits"])),
        f"**{ratio.fmt(digits=3)}**",
        fmt_bytes(peaks["forward"]),
        fmt_bytes(peaks["exits"]),
        "yes" if same else "**no**",
    ]


def early_exit(*, rounds: int, warmup: int, epochs: int, samples: int) -> tuple[str, list[Target]]:
    sys.path.insert(0, str(ROOT / "examples"))
    import multi_exit_digits as ex

    data = ex.load_digits_split()
    sup = ex.build("ds", seed=0, width=16)
    train_s = ex.train(sup, data, epochs=epochs, seed=0, lr=3e-3)
    early = EarlyExit(sup).eval()
    calib = early.calibrate(ex.batches(data["val"], 128), max_drop=0.01, timing_runs=10)
    test = ex.batches(data["test"], 1)[:samples]
    measured = early.evaluate(test)
    model = sup.model

    def over(fn: Callable[[torch.Tensor], Any]) -> Callable[[], None]:
        def call() -> None:
            with torch.no_grad():
                for x, _ in test:
                    fn(x)

        return call

    variants = {"model": over(model), "early exit": over(early)}
    times = interleave(variants, rounds=rounds, warmup=warmup)
    ratio = paired(times, "model", "early exit")
    flops = measured.flops / measured.full_flops
    per = {k: Stats.of([t / len(test) for t in v]) for k, v in times.items()}
    body = (
        f"Trained {epochs} epochs with deep supervision ({train_s:.0f} s), calibrated on "
        f"{len(data['val'][1])} val samples (`max_drop=0.01`); {len(test)} test samples at "
        f"batch 1, {rounds} interleaved rounds over all of them.\n\n"
        "Calibration (val):\n\n"
        + str(calib)
        + "\n\nMeasured on test (`EarlyExit.evaluate`):\n\n"
        + str(measured)
        + "\n\n"
        + table(
            ["per sample", "model alone", "early exit", "ratio (median [IQR])"],
            [
                [
                    "wall time per sample",
                    fmt_time(per["model"]),
                    fmt_time(per["early exit"]),
                    f"**{ratio.fmt(digits=3)}**",
                ],
                [
                    "FLOPs per sample",
                    f"{measured.full_flops / 1e6:.3f} M",
                    f"{measured.flops / 1e6:.3f} M",
                    f"**{flops:.3f}x**",
                ],
                [
                    "test accuracy",
                    f"{100 * measured.full_accuracy:.2f}%",
                    f"{100 * measured.accuracy:.2f}%",
                    f"{100 * (measured.accuracy - measured.full_accuracy):+.2f} points",
                ],
            ],
        )
    )
    targets = [
        Target(
            "early exit FLOPs per sample (digits, max_drop 0.01)",
            f"{flops:.3f}x",
            "< 1.0x",
            flops < 1.0,
        ),
        Target(
            "early exit wall time per sample (digits, batch 1)",
            f"{ratio.median:.3f}x [{ratio.q1:.3f}, {ratio.q3:.3f}]",
            "< 1.0x",
            True if ratio.q3 < 1.0 else (False if ratio.q1 > 1.0 else None),
        ),
    ]
    return body, targets


def main(argv: Sequence[str] | None = None) -> str:
    p = parser(__doc__)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--size", type=int, default=None, help="resnet18 input side")
    p.add_argument("--epochs", type=int, default=None, help="digits training epochs")
    args = p.parse_args(argv)
    setup(args)
    started = time.perf_counter()
    rounds = pick(args, "rounds", 20, 3)
    warmup = pick(args, "warmup", 2, 1)
    size = pick(args, "size", 112, 32)
    row = exits_overhead(rounds=rounds, warmup=warmup, batch_size=args.batch_size, size=size)
    headers = [
        "model",
        "input",
        "model(x)",
        "sup.exits(x)",
        "time ratio (median [IQR])",
        "peak mem model(x)",
        "peak mem exits",
        "output torch.equal",
    ]
    early_body, targets = early_exit(
        rounds=pick(args, "rounds", 7, 2),
        warmup=1,
        epochs=pick(args, "epochs", 8, 1),
        samples=360 if not args.quick else 40,
    )
    body = (
        f"`sup.exits(x)` against `model(x)`: {rounds} interleaved rounds after {warmup} warm-up "
        f"calls, `torch.no_grad()`, {machine()['torch threads']} torch threads.\n\n"
        + table(headers, [row])
        + "\n\n### Early exit at calibrated thresholds, batch 1\n\n"
        + early_body
    )
    return emit(args, "Exits and early exit", body, started=started, targets=targets)


if __name__ == "__main__":
    main()
