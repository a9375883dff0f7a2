"""The example's input pipeline: DataLoader images/s vs train-step images/s (is it data-bound?).

Builds the data set, loader, model and optimizer with ``examples/pspnet_voc.py``'s own functions
and defaults (synthetic VOC in the real on-disk layout, which it generates), with 2 workers, and
measures (1) the loader alone, over whole epochs as the example iterates them (its workers
restart every epoch), (2) the train step alone on a cached batch, (3) the example's loop with the
loader vs the same loop on a cached batch, interleaved in chunks of steps. With ``--recipe`` it
also measures the loader of the reference recipe (crop 473, VOC-sized images) against a
resnet50 PSPNet step at that crop.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from _common import ROOT, Stats, Target, emit, interleave, machine, paired, parser, setup, table


def import_example() -> tuple[Any, Any]:
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import pspnet_voc
        import voc_data
    except ImportError as e:  # pragma: no cover - the example ships with the repository
        raise SystemExit(f"cannot import examples/pspnet_voc.py ({e})") from e
    return pspnet_voc, voc_data


def loader_alone(loader: Any, epochs: int) -> tuple[float, float, float]:
    """Images/s over whole epochs (worker start included), images/s once running, start time."""
    images = 0
    total = 0.0
    steady_images = 0
    steady_time = 0.0
    starts = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        it = iter(loader)
        first = next(it)
        t1 = time.perf_counter()
        starts.append(t1 - t0)
        n = first[0].shape[0]
        for batch in it:
            n += batch[0].shape[0]
            steady_images += batch[0].shape[0]
        t2 = time.perf_counter()
        images += n
        total += t2 - t0
        steady_time += t2 - t1
    return images / total, steady_images / steady_time, sorted(starts)[len(starts) // 2]


def cycle(loader: Any) -> Iterator[Any]:
    while True:
        yield from loader


def make_step(net: torch.nn.Module, optimizer: torch.optim.Optimizer, wrapped: bool) -> Any:
    criterion = torch.nn.CrossEntropyLoss(ignore_index=255)

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        # the example's loop body (no AMP, one process)
        if wrapped:
            output, aux = net(images, target=labels)
            loss = criterion(output.float(), labels) + sum(aux.values())
        else:
            loss = criterion(net(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()  # the example logs the loss every step

    return step


def build(example: Any, argv: list[str]) -> tuple[argparse.Namespace, Any, Any, Any]:
    args = example.parse_args(argv)
    env = example.Dist("cpu")
    torch.manual_seed(args.seed)
    train_set, _ = example.build_datasets(args, env)
    loader = example.build_train_loader(train_set, args, env, torch.Generator().manual_seed(0))
    train_net, net = example.build_model(args, env)
    optimizer, _ = example.build_optimizer(net, args, total_iters=1000)
    net.train()
    step = make_step(train_net, optimizer, wrapped=args.aux_weight > 0)
    return args, loader, step, train_set


def default_config(
    example: Any, workers: int, cache_dir: str | None, epochs: int, rounds: int, chunk: int
) -> tuple[list[object], list[object], Target]:
    argv = ["--workers", str(workers), "--device", "cpu"]
    if cache_dir:
        argv += ["--cache-dir", cache_dir]
    args, loader, step, train_set = build(example, argv)
    whole, steady, start = loader_alone(loader, epochs)
    images, labels = next(iter(loader))
    bs = images.shape[0]
    times = interleave(
        {"step": lambda: step(images, labels)}, rounds=rounds, warmup=2, clock="wall"
    )
    model_rate = bs / Stats.of(times["step"]).median
    stream = cycle(loader)

    def with_loader() -> None:
        for _ in range(chunk):
            step(*next(stream))

    def cached() -> None:
        for _ in range(chunk):
            step(images, labels)

    loop = interleave(
        {"cached": cached, "loader": with_loader},
        rounds=max(2, rounds // 2),
        warmup=1,
        clock="wall",  # the workers' time is what this measures
    )
    ratio = paired(loop, "cached", "loader")
    config = (
        f"{args.backbone} PSPNet, crop {args.crop_size}, batch {args.batch_size}, "
        f"{len(train_set)} synthetic images ({len(loader)} steps per epoch)"
    )
    row = [
        "example default (synthetic)",
        config,
        workers,
        f"{whole:.1f}",
        f"{steady:.1f}",
        f"{start:.2f} s",
        f"{model_rate:.1f}",
        f"**{whole / model_rate:.1f}x**",
    ]
    loop_row = [
        "example default (synthetic)",
        workers,
        chunk,
        f"{chunk * bs / Stats.of(loop['cached']).median:.1f}",
        f"{chunk * bs / Stats.of(loop['loader']).median:.1f}",
        f"**{ratio.fmt(digits=3)}**",
    ]
    target = Target(
        f"example default not data-bound ({workers} workers)",
        f"loader {whole:.1f} img/s vs step {model_rate:.1f} img/s; loop with loader / cached "
        f"{ratio.median:.3f}x",
        "loader > step",
        whole > model_rate,
    )
    return row, loop_row, target


def recipe_config(
    example: Any, voc_data: Any, workers: int, epochs: int, batch_size: int
) -> list[object]:
    with tempfile.TemporaryDirectory() as tmp:
        root = voc_data.generate_synthetic_voc(
            Path(tmp) / "voc", num_train=48, num_val=1, size=(375, 500), seed=0
        )
        argv = ["--data-root", str(root), "--workers", str(workers), "--device", "cpu"]
        args, loader, _, train_set = build(example, [*argv, "--batch-size", "8"])
        whole, steady, start = loader_alone(loader, epochs)
        _, _, step, _ = build(example, [*argv, "--batch-size", str(batch_size)])
        images, labels = next(iter(loader))
        images, labels = images[:batch_size], labels[:batch_size]
        times = interleave({"step": lambda: step(images, labels)}, rounds=2, warmup=1, clock="wall")
        model_rate = batch_size / Stats.of(times["step"]).median
    return [
        "reference recipe (VOC-sized synthetic)",
        f"{args.backbone} PSPNet, crop {args.crop_size}; loader batch 8, step batch "
        f"{batch_size}; {len(train_set)} images of 375-500 px",
        workers,
        f"{whole:.1f}",
        f"{steady:.1f}",
        f"{start:.2f} s",
        f"{model_rate:.2f}",
        f"**{whole / model_rate:.0f}x**",
    ]


def main(argv: Sequence[str] | None = None) -> str:
    p = parser(__doc__)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--epochs", type=int, default=None, help="loader epochs timed")
    p.add_argument("--chunk", type=int, default=None, help="steps per interleaved loop sample")
    p.add_argument("--cache-dir", default=None, help="synthetic data (default: the example's)")
    p.add_argument("--recipe", action="store_true", help="also the reference recipe at crop 473")
    p.add_argument("--recipe-batch-size", type=int, default=2)
    args = p.parse_args(argv)
    args.clock = "wall"  # the loader's workers run in other processes: only wall time counts
    setup(args)
    started = time.perf_counter()
    quick = args.quick
    rounds = args.rounds or (3 if quick else 10)
    epochs = args.epochs or (1 if quick else 3)
    chunk = args.chunk or (3 if quick else 10)
    example, voc_data = import_example()
    row, loop_row, target = default_config(
        example, args.workers, args.cache_dir, epochs, rounds, chunk
    )
    rows = [row]
    if args.recipe:
        rows.append(recipe_config(example, voc_data, args.workers, epochs, args.recipe_batch_size))
    headers = [
        "configuration",
        "details",
        "workers",
        "loader img/s (epochs, worker start incl.)",
        "loader img/s (running)",
        "worker start",
        "train step img/s (cached batch)",
        "loader / step",
    ]
    loop_headers = [
        "configuration",
        "workers",
        "steps per sample",
        "loop img/s, cached batch",
        "loop img/s, with the loader",
        "time ratio loader / cached (median [IQR])",
    ]
    body = (
        "Built with `examples/pspnet_voc.py`'s own `parse_args`, `build_datasets`, "
        "`build_train_loader`, `build_model` and `build_optimizer` (the wrapper on "
        "`backbone.layer3`, SGD with 10x heads), on CPU, "
        f"{machine()['torch threads']} torch threads in the main process. The loader is "
        "iterated alone over whole epochs (its workers have the cores to themselves) and the "
        "step is timed alone on one cached batch; 'loader / step' above 1 means the workers "
        "supply images faster than the step consumes them. The second table runs the example's "
        "loop body with batches from the loader (workers prefetching while the step runs, both "
        "sharing the cores) against the same loop on a cached batch, interleaved in chunks of "
        "steps; a ratio near 1 means the loop is not data-bound.\n\n"
        + table(headers, rows)
        + "\n\n"
        + table(loop_headers, [loop_row])
    )
    title = "Input pipeline of the example"
    return emit(args, title, body, started=started, targets=[target])


if __name__ == "__main__":
    main()
