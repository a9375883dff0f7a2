"""Train step (zero_grad, forward, losses, backward, SGD step): DeepSupervision vs hand-written aux.

Targets: time <= 1.01x, peak memory <= 1.00x of the hand-written aux branch on the same weights.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

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
    parser,
    peak_memory,
    pick,
    setup,
    split_table,
    time_target,
    verdict,
)
from _models import PAIRS, Pair, batch

TIME_TARGET = 1.01
MEMORY_TARGET = 1.00


def same_computation(pair: Pair, x: torch.Tensor, y: torch.Tensor) -> str:
    """Run one step of each side from the same RNG state; compare losses and model gradients."""
    ref_params = dict(pair.reference.named_parameters())
    for model in (pair.reference, pair.sup):
        model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    ref_loss = pair.reference_loss(x, y)
    ref_loss.backward()
    torch.manual_seed(1)
    sup_loss = pair.sup_loss(x, y)
    sup_loss.backward()
    grads_equal = all(
        torch.equal(p.grad, ref_params[name].grad)  # type: ignore[arg-type]
        for name, p in pair.bare.named_parameters()
    )
    for model in (pair.reference, pair.sup):
        model.zero_grad(set_to_none=True)
    if torch.equal(ref_loss, sup_loss) and grads_equal:
        return "bitwise"
    diff = (ref_loss - sup_loss).abs().item()
    return f"loss diff {diff:.2e}, grads {'equal' if grads_equal else 'differ'}"


def bench_pair(
    pair: Pair, size: int, batch_size: int, rounds: int, warmup: int, device: torch.device
) -> tuple[list[object], list[Target]]:
    pair.reference.to(device).train()
    pair.sup.to(device).train()
    x, y = (t.to(device) for t in batch(size, batch_size=batch_size))
    same = same_computation(pair, x, y)
    optimizers = {
        "hand-written": (
            torch.optim.SGD(pair.reference.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4),
            pair.reference_loss,
        ),
        "deepsup": (
            torch.optim.SGD(pair.sup.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4),
            pair.sup_loss,
        ),
    }

    def make_step(name: str, zero: bool = True):
        optimizer, loss_fn = optimizers[name]

        def step() -> None:
            if zero:
                optimizer.zero_grad(set_to_none=True)
            loss_fn(x, y).backward()
            optimizer.step()

        return step

    times = interleave(
        {name: make_step(name) for name in optimizers}, rounds=rounds, warmup=warmup, device=device
    )
    peaks = {}
    for name, (optimizer, _) in optimizers.items():
        values = []
        for _ in range(2):
            optimizer.zero_grad(set_to_none=True)  # grads are re-allocated inside the measurement
            values.append(peak_memory(make_step(name, zero=False), device))
        peaks[name] = max(values)
        if len(set(values)) > 1:
            print(f"note: {pair.name} {name}: peak memory varied between runs: {values}")
    ratio = paired(times, "hand-written", "deepsup")
    mem_ratio = peaks["deepsup"] / peaks["hand-written"]
    targets = [
        time_target(f"train step time, {pair.name}", ratio, TIME_TARGET),
        Target(
            f"train step peak memory, {pair.name}",
            f"{mem_ratio:.4f}x",
            f"<= {MEMORY_TARGET:.2f}x",
            mem_ratio <= MEMORY_TARGET,
        ),
    ]
    row = [
        pair.name,
        f"{batch_size}x3x{size}x{size}",
        fmt_time(Stats.of(times["hand-written"])),
        fmt_time(Stats.of(times["deepsup"])),
        f"**{ratio.fmt(digits=3)}**",
        f"{ratio.lo:.3f}-{ratio.hi:.3f}",
        verdict(targets[0].met),
        fmt_bytes(peaks["hand-written"]),
        fmt_bytes(peaks["deepsup"]),
        f"**{mem_ratio:.4f}**",
        verdict(mem_ratio <= MEMORY_TARGET),
        same,
    ]
    return row, targets


def main(argv: Sequence[str] | None = None) -> str:
    p = parser(__doc__)
    p.add_argument("--models", default="deeplab,pspnet", help="comma-separated: deeplab, pspnet")
    p.add_argument("--size", type=int, default=None, help="input side (8k+1 for the seed PSPNet)")
    p.add_argument("--batch-size", type=int, default=2)
    args = p.parse_args(argv)
    device = setup(args)
    started = time.perf_counter()
    rounds = pick(args, "rounds", 30, 3)
    warmup = pick(args, "warmup", 2, 1)
    size = pick(args, "size", 129, 65)
    rows = []
    targets: list[Target] = []
    for key in args.models.split(","):
        pair = PAIRS[key.strip()]()
        row, checked = bench_pair(pair, size, args.batch_size, rounds, warmup, device)
        rows.append(row)
        targets += checked
        del pair
    headers = [
        "model",
        "input",
        "hand-written step",
        "deepsup step",
        "time ratio (median [IQR])",
        "ratio min-max",
        f"time <= {TIME_TARGET:.2f}x",
        "peak mem hand-written",
        "peak mem deepsup",
        "mem ratio",
        f"mem <= {MEMORY_TARGET:.2f}x",
        "same losses & grads",
    ]
    body = (
        f"{rounds} interleaved rounds (A B B A ...) after {warmup} warm-up steps per variant, "
        f"device {device}, {machine(device)['torch threads']} torch threads. A step is "
        "`zero_grad(set_to_none=True)`, forward, main + weighted aux cross-entropy "
        "(ignore_index=255), backward, SGD (momentum 0.9, weight decay 1e-4). Times are per "
        "step, median [IQR]; the ratio is the median of per-round ratios deepsup / hand-written. "
        "Peak memory is the tensor memory allocated during one step (activations, gradients, "
        "temporaries) above what was live before it (weights, optimizer state), allocator-exact "
        "(see the method above). 'same losses & grads' compares one step of each side from the "
        "same RNG state.\n\n"
        "- deeplabv3_resnet50: torchvision's model with `aux_loss=True` (FCNHead on `layer3`, "
        "weight 0.5 as in torchvision's reference script) vs `aux_loss=False` wrapped on "
        "`backbone.layer3` with a deep copy of that FCNHead, `resize='prediction'`, "
        "`align_corners=False`.\n"
        "- PSPNet resnet50: the seed's PSPNet (`tests/_seed_pspnet.py`, aux head coded in, weight "
        "0.4; its training forward also takes an argmax of the logits) vs "
        "`deepsup.models.PSPNet` wrapped on `backbone.layer3` with a copy of the seed's aux head, "
        "`align_corners=True`.\n\n" + split_table(headers, rows, at=7)
    )
    title = "Train step: wrapper vs hand-written aux branch"
    return emit(args, title, body, started=started, targets=targets)


if __name__ == "__main__":
    main()
