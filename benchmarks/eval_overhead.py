"""Eval forward: the DeepSupervision wrapper in eval mode vs the bare model it wraps.

Targets: time <= 1.005x, no extra memory, outputs equal (torch.equal).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from _common import (
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
    time_target,
    tree_equal,
    verdict,
)
from _models import PAIRS, batch
from torch import nn

from deepsup import DeepSupervision, heads

TIME_TARGET = 1.005


def small_resnet() -> DeepSupervision:
    """torchvision resnet18 (10 classes), tap ``layer3``: a model small enough to expose µs."""
    from torchvision.models import resnet18

    torch.manual_seed(0)
    return DeepSupervision(
        resnet18(num_classes=10),
        {"layer3": 0.4},
        head=heads.classification(10),
        criterion=nn.CrossEntropyLoss(),
    )


def bench(
    name: str,
    sup: DeepSupervision,
    x: torch.Tensor,
    *,
    rounds: int,
    warmup: int,
    inner: int,
    device: torch.device,
) -> tuple[list[object], list[Target]]:
    sup.to(device).eval()
    model = sup.model
    x = x.to(device)

    def run(fn: Callable[[torch.Tensor], Any]) -> Callable[[], None]:
        def call() -> None:
            with torch.no_grad():
                fn(x)

        return call

    with torch.no_grad():
        equal = tree_equal(sup(x), model(x))
    variants = {"bare": run(model), "deepsup": run(sup)}
    times = interleave(variants, rounds=rounds, warmup=warmup, inner=inner, device=device)
    peaks = {k: peak_memory(v, device) for k, v in variants.items()}
    ratio = paired(times, "bare", "deepsup")
    diff = paired_diff(times, "bare", "deepsup")
    extra = peaks["deepsup"] - peaks["bare"]
    targets = [
        time_target(f"eval time, {name}", ratio, TIME_TARGET, digits=4),
        Target(f"eval extra peak memory, {name}", f"{extra:+d} B", "0 B", extra <= 0),
        Target(f"eval outputs torch.equal, {name}", str(equal), "True", equal),
    ]
    row = [
        name,
        "x".join(map(str, x.shape)),
        fmt_time(Stats.of(times["bare"])),
        fmt_time(Stats.of(times["deepsup"])),
        f"**{ratio.fmt(digits=4)}**",
        f"{ratio.lo:.4f}-{ratio.hi:.4f}",
        diff.fmt(1e6, 1, " µs"),
        verdict(targets[0].met),
        fmt_bytes(peaks["bare"]),
        f"{extra:+d} B",
        verdict(extra <= 0),
        "yes" if equal else "**no**",
    ]
    return row, targets


def main(argv: Sequence[str] | None = None) -> str:
    p = parser(__doc__)
    p.add_argument("--size", type=int, default=None, help="input side of the segmentation models")
    p.add_argument("--batch-size", type=int, default=2)
    args = p.parse_args(argv)
    device = setup(args)
    started = time.perf_counter()
    rounds = pick(args, "rounds", 30, 3)
    warmup = pick(args, "warmup", 3, 1)
    size = pick(args, "size", 129, 65)
    rows = []
    targets: list[Target] = []
    for key in ("deeplab", "pspnet"):
        pair = PAIRS[key]()
        del pair.reference
        x, _ = batch(size, batch_size=args.batch_size)
        row, checked = bench(
            pair.name, pair.sup, x, rounds=rounds, warmup=warmup, inner=1, device=device
        )
        rows.append(row)
        targets += checked
        del pair
    x = torch.randn(args.batch_size, 3, 64, 64)
    row, checked = bench(
        "resnet18 (classification)",
        small_resnet(),
        x,
        rounds=rounds,
        warmup=warmup,
        inner=50 if not args.quick else 5,
        device=device,
    )
    rows.append(row)
    targets += checked
    headers = [
        "model",
        "input",
        "bare model",
        "deepsup (eval)",
        "time ratio (median [IQR])",
        "ratio min-max",
        "overhead per call (median [IQR])",
        f"time <= {TIME_TARGET}x",
        "peak mem bare",
        "extra peak mem",
        "no extra mem",
        "outputs torch.equal",
    ]
    body = (
        f"{rounds} interleaved rounds after {warmup} warm-up calls per variant, under "
        f"`torch.no_grad()`, device {device}, {machine(device)['torch threads']} torch threads; "
        "the wrapper and the bare model share the same module (`sup.model`), so the only "
        "differences are the wrapper's `forward` call and the (closed-window) hook on the tapped "
        "module. The resnet18 row times 50 calls per sample to resolve microseconds. Peak memory "
        "as in the train-step table.\n\n" + split_table(headers, rows, at=8)
    )
    return emit(args, "Eval: wrapper vs bare model", body, started=started, targets=targets)


if __name__ == "__main__":
    main()
