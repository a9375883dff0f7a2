"""U-Net deep supervision: deepsup on an unmodified DynUNet vs MONAI's built-in, 3D train step.

MONAI's way: ``DynUNet(deep_supervision=True, deep_supr_num=2)`` returns the main output and the
two super heads' outputs upsampled (nearest) and stacked, and ``DeepSupervisionLoss(DiceCELoss,
"exp")`` sums the weighted losses. deepsup's way: the same network built with
``deep_supervision=False``, wrapped on its decoder upsample blocks with copies of the same super
heads, the same loss and weights (``scale_weights(..., "monai-exp")``), either upsampling the heads'
outputs the same way (``interpolation="nearest"``: the identical computation) or downsampling the
target instead (``resize="target"``, ``"nearest-exact"``: MONAI's rule for smaller outputs). A
second table times the per-forward target pyramid: taps at the same scale share one downsampled
target.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

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
    time_target,
)
from deepsup._resize import reconcile
from torch import nn

from deepsup import DeepSupervision, Tap
from deepsup.multiscale import scale_weights

warnings.filterwarnings("ignore", module="monai")


def build(filters: list[int], supr: int) -> tuple[nn.Module, nn.Module, list[str]]:
    from monai.networks.nets import DynUNet

    kwargs: dict[str, Any] = {
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 3,
        "kernel_size": [3] * len(filters),
        "strides": [1] + [2] * (len(filters) - 1),
        "upsample_kernel_size": [2] * (len(filters) - 1),
        "filters": filters,
    }
    torch.manual_seed(0)
    twin = DynUNet(**kwargs, deep_supervision=True, deep_supr_num=supr).train()
    plain = DynUNet(**kwargs, deep_supervision=False).train()
    plain.load_state_dict(twin.state_dict(), strict=False)
    n_up = len(plain.upsamples)
    names = [f"upsamples.{n_up - 2 - i}" for i in range(supr)]
    return twin, plain, names


def train_steps(
    x: torch.Tensor, y: torch.Tensor, filters: list[int], supr: int
) -> dict[str, Callable[[], None]]:
    from monai.losses import DeepSupervisionLoss, DiceCELoss

    twin, plain, names = build(filters, supr)
    main, weights = scale_weights(names, "monai-exp")
    ds_loss = DeepSupervisionLoss(DiceCELoss(to_onehot_y=True, softmax=True), weight_mode="exp")
    criterion = DiceCELoss(to_onehot_y=True, softmax=True)

    def wrap(**kwargs: Any) -> DeepSupervision:
        taps = {
            n: Tap(weights[n], head=copy.deepcopy(twin.deep_supervision_heads[i]))
            for i, n in enumerate(names)
        }
        return DeepSupervision(copy.deepcopy(plain), taps, criterion=criterion, **kwargs)

    sup_pred = wrap(resize="prediction", interpolation="nearest")
    sup_target = wrap(resize="target", interpolation="nearest-exact")

    def monai() -> None:
        twin.zero_grad(set_to_none=True)
        ds_loss(list(torch.unbind(twin(x), 1)), y).backward()

    def deepsup(sup: DeepSupervision) -> Callable[[], None]:
        def step() -> None:
            sup.zero_grad(set_to_none=True)
            out, aux = sup(x, target=y)
            (main * criterion(out.float(), y) + sum(aux.values())).backward()

        return step

    return {
        "MONAI built-in": monai,
        'deepsup, "nearest" upsampling': deepsup(sup_pred),
        'deepsup, resize="target"': deepsup(sup_target),
    }


def pyramid_times(
    target: torch.Tensor, classes: int, mode: str, rounds: int, device: torch.device
) -> tuple[Stats, Stats, Stats]:
    """Six taps, two per scale (1/2, 1/4, 1/8): the targets resized per tap vs shared."""
    edge = target.shape[-1]
    preds = [
        torch.empty(target.shape[0], classes, *(edge // f,) * 3, device=device)
        for f in (2, 2, 4, 4, 8, 8)
    ]

    def resize(pyramid: dict[Any, torch.Tensor] | None) -> Callable[[], None]:
        def f() -> None:
            for i, p in enumerate(preds):
                reconcile(p, target, resize="target", align_corners=False, tap=str(i),
                          interpolation=mode, pyramid=pyramid)  # fmt: skip

        return f

    variants = {"per tap": resize(None), "pyramid": lambda: resize({})()}
    times = interleave(variants, rounds=rounds, warmup=1, device=device)
    return (
        Stats.of(times["per tap"]),
        Stats.of(times["pyramid"]),
        paired(times, "per tap", "pyramid"),
    )


def main(argv: Sequence[str] | None = None) -> str:
    p = parser(__doc__)
    p.add_argument("--size", type=int, default=None, help="volume edge (default 32, quick 16)")
    p.add_argument("--batch-size", type=int, default=2)
    args = p.parse_args(argv)
    device = setup(args)
    started = time.perf_counter()
    rounds = pick(args, "rounds", 10, 2)
    warmup = pick(args, "warmup", 2, 1)
    size = pick(args, "size", 32, 16)
    filters = [8, 16, 32, 64, 128] if not args.quick else [2, 4, 8, 16]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 1, size, size, size, generator=g).to(device)
    y = torch.randint(0, 3, (args.batch_size, 1, size, size, size), generator=g).float().to(device)

    steps = train_steps(x, y, filters, supr=2)
    for v in steps.values():
        v()
    times = interleave(steps, rounds=rounds, warmup=warmup, device=device)
    peaks = {k: peak_memory(v, device) for k, v in steps.items()}
    base = "MONAI built-in"
    rows: list[list[object]] = []
    targets = []
    for k in steps:
        ratio = paired(times, base, k)
        rows.append(
            [
                k,
                fmt_time(Stats.of(times[k])),
                "1" if k == base else f"**{ratio.fmt(digits=3)}**",
                fmt_bytes(peaks[k]),
                "1" if k == base else f"**{peaks[k] / peaks[base]:.3f}**",
            ]
        )
        if "nearest" in k:
            targets.append(time_target("3D DynUNet train step, deepsup / MONAI DS", ratio, 1.05))

    big = torch.randint(0, 4, (args.batch_size, size, size, size), generator=g)
    big = big.to(device)
    prow: list[list[object]] = []
    for mode in ("nearest", "soft", "max"):
        alone, shared, ratio = pyramid_times(big, 4, mode, pick(args, "rounds", 10, 2), device)
        prow.append([f'`"{mode}"`', fmt_time(alone), fmt_time(shared), f"{ratio.fmt(digits=3)}"])

    body = (
        f"3D DynUNet (filters {filters}, strides 1-2-2-2..., 3 classes, 2 super heads), input "
        f"{args.batch_size}x1x{size}^3, DiceCELoss, one train step = forward + loss + backward. "
        f"{rounds} interleaved rounds after {warmup} warm-up calls, device {device}, "
        f"{machine(device)['torch threads']} torch threads. Ratios are deepsup / MONAI (median "
        "of per-round ratios [IQR]); peak memory as above. The first two rows compute the same "
        "losses and gradients (tests/test_monai_parity.py checks it); the third takes the aux "
        "losses at the heads' own scales.\n\n"
        + table(["variant", "train step", "time ratio", "peak mem", "mem ratio"], rows)
        + f"\n\nTarget pyramid: a {args.batch_size}x{size}^3 label map (4 classes) resized "
        "for six taps, two at each of 1/2, 1/4, 1/8; per tap (each tap resizes on its own) vs "
        "one pyramid per forward (the wrapper's behaviour: taps at the same scale share one "
        "result). Ratio pyramid / per tap.\n\n"
        + table(["interpolation", "per tap", "pyramid", "ratio"], prow)
    )
    return emit(
        args,
        "U-Net deep supervision: deepsup on DynUNet vs MONAI's built-in (3D)",
        body,
        started=started,
        targets=targets,
    )


if __name__ == "__main__":
    main()
