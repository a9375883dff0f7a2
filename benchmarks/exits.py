"""Exits: ``sup.exits(x)`` vs a plain forward, and early exit at calibrated thresholds vs the model.

``--part`` picks one part (default: ``exits`` and ``early-exit``, the first two):

Part 1: torchvision resnet18 (10 classes) with classification heads on ``layer1``..``layer3``;
``sup.exits(x)`` (the model and every head, one forward) against ``model(x)``, eval, no_grad.

Part 2: the small ResNet of ``examples/multi_exit_digits.py`` trained with deep supervision on
the digits (a few epochs, in this run), thresholds calibrated on val at ``max_drop=0.01``, then
the test set one sample at a time through ``EarlyExit`` and through the model alone,
interleaved: wall time per sample, FLOPs per sample (``FlopCounterMode``) and accuracy.

Part ``tap-overhead``: ``EarlyExit``'s own cost per tap, on the 16-block stack of
``taps_scaling.py`` (Linear 64->64 + Tanh, a 8x64 batch), ``head=nn.Identity()``: taps that
cannot exit (threshold ``inf``: the hook returns at once), and taps tested where no row leaves
(threshold 2: the head, the confidence and one host synchronisation per tap), whole-batch and
``per_sample=True``; least-squares slope over k = 1, 4, 16 taps.
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
    paired_diff,
    parser,
    peak_memory,
    pick,
    setup,
    split_table,
    table,
    tree_equal,
)
from torch import nn

from deepsup import DeepSupervision, EarlyExit, heads

PARTS = ("exits", "early-exit", "tap-overhead", "per-sample")


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


def tap_overhead(*, rounds: int, warmup: int, inner: int) -> str:
    import copy

    from taps_scaling import fit, stack

    base = stack().eval()
    x = torch.randn(8, 64)
    counts = (1, 4, 16)
    kinds = {
        "cannot exit (inf)": {"threshold": float("inf")},
        "tested, none leaves": {"threshold": 2.0},
        "tested, per_sample=True": {"threshold": 2.0, "per_sample": True, "example_input": x},
    }
    variants: dict[str, Callable[[], None]] = {}

    def call(m: nn.Module) -> Callable[[], None]:
        def f() -> None:
            with torch.no_grad():
                m(x)

        return f

    variants["bare"] = call(base)
    for kind, kw in kinds.items():
        for k in counts:
            sup = DeepSupervision(
                copy.deepcopy(base), [str(i) for i in range(k)], head=nn.Identity()
            )
            variants[f"{kind} k={k}"] = call(EarlyExit(sup, **kw))  # type: ignore[arg-type]
    times = interleave(variants, rounds=rounds, warmup=warmup, inner=inner)
    rows: list[list[object]] = []
    fits = []
    for kind in kinds:
        points = []
        for k in counts:
            d = paired_diff(times, "bare", f"{kind} k={k}")
            points.append((float(k), d.median))
            rows.append([kind, k, d.fmt(1e6, 1, " µs"), f"{d.median * 1e6 / k:.2f} µs"])
        a, b = fit(points)
        fits.append(f"- {kind}: **{b * 1e6:.2f} µs per tap** + {a * 1e6:.1f} µs fixed per forward")
    bare = Stats.of(times["bare"])
    return (
        f"{rounds} interleaved rounds of {inner} forwards each (bare model and the nine early "
        f"exits rotated), after {warmup} warm-up forwards, {machine()['torch threads']} torch "
        f"threads; bare forward {fmt_time(bare)}. Overhead = early-exit forward - bare forward, "
        "per round (paired); the heads are `nn.Identity()` and the confidence is the max softmax "
        "over the 64 features.\n\n"
        + table(["exits", "taps", "overhead per forward (median [IQR])", "per tap"], rows)
        + "\n\nLeast-squares fit over k:\n\n"
        + "\n".join(fits)
    )


def _resnet18_digits(seed: int) -> DeepSupervision:
    """torchvision's resnet18 (10 classes, a 1-channel stem) with heads on layer1-3."""
    from torchvision.models import resnet18

    torch.manual_seed(seed)
    model = resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    return DeepSupervision(
        model,
        dict.fromkeys(["layer1", "layer2", "layer3"], 0.5),
        head=heads.classification(10),
        criterion=nn.CrossEntropyLoss(),
    )


def _flops_per_sample(fn: Callable[[torch.Tensor], Any], batches: list[Any]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        for x, _ in batches:
            fn(x)
    return counter.get_total_flops() / sum(len(y) for _, y in batches)


def _accuracy(fn: Callable[[torch.Tensor], Any], batches: list[Any]) -> float:
    hits = 0
    with torch.no_grad():
        for x, y in batches:
            out = fn(x)
            hits += int((out.argmax(1) == y).sum())
    return hits / sum(len(y) for _, y in batches)


def per_sample_exits(
    *, network: str, rounds: int, warmup: int, epochs: int, samples: int, max_drop: float
) -> tuple[list[list[object]], str, list[Target]]:
    """Train, calibrate on val, then the test split at batch 1 and 64 through
    ``EarlyExit(per_sample=True)`` and through the model alone, interleaved."""
    sys.path.insert(0, str(ROOT / "examples"))
    import multi_exit_digits as ex

    if network == "digits":
        data = ex.load_digits_split()
        sup = ex.build("ds", seed=0, width=16)
        lr = 3e-3
    else:
        data = ex.load_digits_split(size=64)
        sup = _resnet18_digits(seed=0)
        lr = 2e-3
    train_s = ex.train(sup, data, epochs=epochs, seed=0, lr=lr)
    val = ex.batches(data["val"], 128)
    probe = EarlyExit(sup)
    calib = probe.calibrate(val, max_drop=max_drop, timing_runs=3)
    thresholds = probe.thresholds
    probe.remove()
    early = EarlyExit(sup, thresholds, per_sample=True, example_input=val[0][0][:8])
    model = sup.model
    rows: list[list[object]] = []
    targets: list[Target] = []
    for bs in (1, 64):
        test = ex.batches(data["test"], bs)
        if bs == 1:
            test = test[:samples]

        def over(fn: Callable[[torch.Tensor], Any], test: list[Any] = test) -> Callable[[], None]:
            def call() -> None:
                with torch.no_grad():
                    for x, _ in test:
                        fn(x)

            return call

        times = interleave(
            {"model": over(model), "early exit": over(early)}, rounds=rounds, warmup=warmup
        )
        ratio = paired(times, "model", "early exit")
        n = sum(len(y) for _, y in test)
        per = {k: Stats.of([t / n for t in v]) for k, v in times.items()}
        flops = _flops_per_sample(early, test) / _flops_per_sample(model, test)
        acc_model = _accuracy(model, test)
        acc_early = _accuracy(lambda x: early(x)[0], test)
        shares: dict[str, int] = {}
        with torch.no_grad():
            for x, _ in test:
                for name in early(x)[1]:
                    shares[name] = shares.get(name, 0) + 1
        share = ", ".join(f"{k} {100 * v / n:.0f}%" for k, v in shares.items())
        rows.append(
            [
                network,
                bs,
                n,
                fmt_time(per["model"]),
                fmt_time(per["early exit"]),
                f"**{ratio.fmt(digits=3)}**",
                f"{flops:.3f}x",
                f"{100 * acc_model:.2f}%",
                f"{100 * acc_early:.2f}%",
                f"{100 * (acc_early - acc_model):+.2f}",
                share,
            ]
        )
        targets.append(
            Target(
                f"per-sample early exit wall time ({network}, batch {bs}) at <= 1 point lost",
                f"{ratio.median:.3f}x [{ratio.q1:.3f}, {ratio.q3:.3f}], "
                f"{100 * (acc_early - acc_model):+.2f} points",
                "<= 0.75x, >= -1 point",
                ratio.median <= 0.75 and acc_early - acc_model >= -0.01,
            )
        )
    note = (
        f"- {network}: trained {epochs} epochs with deep supervision ({train_s:.0f} s, seed 0), "
        f"thresholds calibrated on {len(data['val'][1])} val samples at `max_drop={max_drop}` "
        f"({', '.join(f'{k} {v:.3g}' for k, v in thresholds.items())}; calibration: "
        f"{100 * calib.accuracy:.2f}% vs {100 * calib.full_accuracy:.2f}% on val)"
    )
    return rows, note, targets


def main(argv: Sequence[str] | None = None) -> str:
    p = parser(__doc__)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--size", type=int, default=None, help="resnet18 input side")
    p.add_argument("--epochs", type=int, default=None, help="digits training epochs")
    p.add_argument("--part", choices=PARTS, default=None, help="one part (default: the first two)")
    p.add_argument(
        "--network", choices=["digits", "resnet18"], default=None, help="per-sample: one"
    )
    p.add_argument("--max-drop", type=float, default=0.01, help="per-sample: calibration drop")
    args = p.parse_args(argv)
    setup(args)
    started = time.perf_counter()
    if args.part == "tap-overhead":
        body = tap_overhead(
            rounds=pick(args, "rounds", 30, 4),
            warmup=pick(args, "warmup", 20, 5),
            inner=100 if not args.quick else 10,
        )
        return emit(args, "Early exit: overhead per tap", body, started=started)
    if args.part == "per-sample":
        rows, notes, targets = [], [], []
        nets = [args.network] if args.network else ["digits", "resnet18"]
        for net in nets:
            r, note, t = per_sample_exits(
                network=net,
                rounds=pick(args, "rounds", 7, 2),
                warmup=1,
                epochs=args.epochs or (8 if net == "digits" else 3) if not args.quick else 1,
                samples=360 if not args.quick else 20,
                max_drop=args.max_drop,
            )
            rows += r
            notes.append(note)
            targets += t
        headers = [
            "network",
            "batch",
            "test samples",
            "model / sample",
            "early exit / sample",
            "wall ratio (median [IQR])",
            "FLOPs ratio",
            "accuracy model",
            "accuracy early exit",
            "points",
            "exits taken",
        ]
        body = (
            "`EarlyExit(sup, thresholds, per_sample=True)` against the model alone on the test "
            "split, interleaved (A B B A ...), `torch.no_grad()`, "
            f"{machine()['torch threads']} torch threads; FLOPs by `FlopCounterMode` over the "
            "whole test pass (the rows that left early are not computed further).\n\n"
            + "\n".join(notes)
            + "\n\n"
            + split_table(headers, rows, at=7, keys=2)
        )
        return emit(
            args, "Early exit per sample inside a batch", body, started=started, targets=targets
        )
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
