"""Resize modes: upsample the aux logits (resize="prediction") or downsample the target ("target").

The aux branch of PSPNet at 473x473, 21 classes, batch 2: a 1024-channel stride-8 feature
(60x60), the PSPNet head (conv3x3 1024->256, BN, ReLU, Dropout2d, conv1x1 -> 21), the resize and
the cross-entropy (ignore_index=255), forward + backward down to the feature. Run through the
public wrapper on a model that returns its input, so the numbers are the wrapper's own path.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from _common import (
    Stats,
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
)
from torch import nn

from deepsup import DeepSupervision, heads

MODES = ("prediction", "target")


def branch(head: nn.Module, resize: str) -> DeepSupervision:
    # The tapped module is an Identity: its output is the feature fed in.
    return DeepSupervision(
        nn.Sequential(nn.Identity()),
        {"0": 1.0},
        head=head,
        criterion=nn.CrossEntropyLoss(ignore_index=255),
        resize=resize,  # type: ignore[arg-type]
        align_corners=True,
    ).train()


def compare(
    label: str,
    feature: torch.Tensor,
    target: torch.Tensor,
    make_head: type[nn.Module] | object,
    *,
    rounds: int,
    warmup: int,
    inner: int,
    device: torch.device,
) -> list[list[object]]:
    torch.manual_seed(0)
    head = make_head() if callable(make_head) else make_head
    sups = {mode: branch(_copy(head), mode).to(device) for mode in MODES}

    def step(mode: str):
        sup = sups[mode]

        def f() -> None:
            feature.grad = None
            _, aux = sup(feature, target=target)
            aux["0"].backward()

        return f

    variants = {mode: step(mode) for mode in MODES}
    times = interleave(variants, rounds=rounds, warmup=warmup, inner=inner, device=device)
    peaks = {}
    for mode in MODES:
        feature.grad = None
        peaks[mode] = peak_memory(variants[mode], device)
    ratio = paired(times, "prediction", "target")
    rows: list[list[object]] = []
    for mode in MODES:
        rows.append(
            [
                label,
                f'`resize="{mode}"`',
                fmt_time(Stats.of(times[mode])),
                "1" if mode == "prediction" else f"**{ratio.fmt(digits=3)}**",
                fmt_bytes(peaks[mode]),
                "1" if mode == "prediction" else f"**{peaks[mode] / peaks['prediction']:.3f}**",
            ]
        )
    return rows


def _copy(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module)


def main(argv: Sequence[str] | None = None) -> str:
    p = parser(__doc__)
    p.add_argument("--size", type=int, default=473, help="crop side")
    p.add_argument("--batch-size", type=int, default=2)
    args = p.parse_args(argv)
    device = setup(args)
    started = time.perf_counter()
    rounds = pick(args, "rounds", 20, 3)
    warmup = pick(args, "warmup", 2, 1)
    size = args.size
    fsize = (size - 1) // 8 + 1  # stride 8 with the reference's 8k+1 crops: 473 -> 60
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 21, (args.batch_size, size, size), generator=g)
    target[:, :, :8] = 255
    target = target.to(device)
    feature = torch.randn(args.batch_size, 1024, fsize, fsize, generator=g).to(device)
    feature.requires_grad_(True)
    logits = torch.randn(args.batch_size, 21, fsize, fsize, generator=g).to(device)
    logits.requires_grad_(True)
    rows = compare(
        "head + resize + loss",
        feature,
        target,
        lambda: heads.seg(num_classes=21)(1024),
        rounds=rounds,
        warmup=warmup,
        inner=1,
        device=device,
    )
    rows += compare(
        "resize + loss only",
        logits,
        target,
        nn.Identity,
        rounds=rounds,
        warmup=warmup,
        inner=pick(args, "rounds", 10, 2),
        device=device,
    )
    headers = ["part", "mode", "fwd + bwd", "time ratio", "peak mem", "mem ratio"]
    body = (
        f"Feature {args.batch_size}x1024x{fsize}x{fsize}, target {args.batch_size}x{size}x{size} "
        f"(21 classes, a band of ignore pixels). {rounds} interleaved rounds after {warmup} "
        f"warm-up calls, device {device}, {machine(device)['torch threads']} torch threads. "
        '`"prediction"` upsamples the 21-channel logits bilinearly (`align_corners=True`) to '
        f'{size}x{size} and takes the loss there; `"target"` picks the nearest label of each '
        f"{fsize}x{fsize} cell by indexing and takes the loss at {fsize}x{fsize}. Ratios are "
        "target / prediction (median of per-round ratios [IQR]); peak memory as above (the "
        "second part's peak excludes the head's activations). The second part isolates the "
        "resize and the loss: the logits are fed in directly (`head=nn.Identity()`).\n\n"
        + table(headers, rows)
    )
    return emit(
        args,
        "Resize modes: upsample the prediction or downsample the target",
        body,
        started=started,
    )


if __name__ == "__main__":
    main()
