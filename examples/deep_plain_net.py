"""Deep supervision where it matters most: a deep plain network, without residuals or normalization.

Deeply-Supervised Nets (Lee et al. 2015) and CNDS (Wang et al. 2015) added companion losses to
deep plain convolutional networks, whose early layers get little gradient from the top. This
example builds such a network on real data that ships with scikit-learn, the 1,797 handwritten
digits (8x8 scans, upscaled to ``--size``, fixed train/test split): ``--depth`` 3x3 conv layers
with ReLU, no BatchNorm, no shortcut, weights drawn with ``--init-gain`` 1 (Glorot-like: each ReLU
layer halves the signal's variance, so both signal and gradient shrink with depth, as in CNDS's
small Gaussian init), SGD with momentum. For each seed it trains three variants of the same
initial network, with the same batches:

- ``plain``: the network alone;
- ``ds``: deepsup with a classification head (global pool + linear) on ``--taps``, constant
  weight;
- ``ds-decay``: the same heads, the weight decaying linearly to 0 over training (CNDS's
  ``a (1 - t/N)``), so that the last steps train the plain objective alone.

``--variants`` also takes ``ds-bound``, ``ds-uncertainty`` and ``ds-pcgrad``: the ``ds`` heads with
one of ``deepsup.balance``'s remedies (``GradientBound`` at ``--bound``, ``UncertaintyWeighting``
starting at ``--aux-weight``, ``project_conflicts``). ``--seeds`` takes ranges (``100-109``: the
held-out seeds of docs/evidence.md; 0-2 tuned the configuration).

It reports test accuracy (mean +- std over seeds), each seed's accuracy paired against ``plain``
(mean difference, 95% t-interval, paired t, wins, collapsed runs below 20%), the convergence
curves, and the gradient flow of the initial network (``deepsup.diagnostics.gradient_flow``):
how much gradient each layer gets from the main loss and from each companion loss. The defaults
take about 75 s on 2 CPU cores::

    python examples/deep_plain_net.py

Writes into ``--out``: ``results.json`` (every run's curves and the summary), ``curves.png``
(test accuracy and training loss per epoch: mean and min-max over seeds), ``gradient_flow.png``
and ``gradient_flow.txt`` (the per-layer table).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from statistics import mean
from typing import Any

import torch
from _shared import (
    about,
    epochs_to,
    format_mean_std,
    paired_table,
    parse_seeds,
    permutation_split,
    upscaled_digits,
)
from torch import nn
from tqdm import tqdm

from deepsup import DeepSupervision, heads, schedules
from deepsup.balance import GradientBound, UncertaintyWeighting, project_conflicts
from deepsup.diagnostics import GradientMonitor, gradient_flow

VARIANTS = ("plain", "ds", "ds-decay", "ds-bound", "ds-uncertainty", "ds-pcgrad")
DEFAULT_VARIANTS = VARIANTS[:3]
# ds-bound: deepsup.balance.GradientBound at --bound (each aux gradient at most that times the
# rest where it enters the network); ds-uncertainty: UncertaintyWeighting over the main and aux
# losses, starting at --aux-weight; ds-pcgrad: project_conflicts on the model's parameters.
# Seconds per epoch of one run of the default 10-layer network on one thread, cores free (the
# project's 2-core AMD EPYC, torch 2.14.1); the start-up line scales it by runs, epochs, depth.
SECONDS_PER_EPOCH = 0.4


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="A deep plain conv net on scikit-learn's digits, with and without deepsup.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--depth", type=int, default=10, help="3x3 conv layers")
    p.add_argument("--width", type=int, default=16, help="channels of every conv layer")
    p.add_argument("--activation", choices=("relu", "tanh", "sigmoid"), default="relu")
    p.add_argument(
        "--init-gain",
        type=float,
        default=1.0,
        help="weights ~ N(0, gain^2/fan_in), zero biases (1: Glorot-like, halves the signal's "
        "variance per ReLU layer; 1.41: He); 0: PyTorch's own initialisation",
    )
    p.add_argument("--size", type=int, default=16, help="digits are upscaled to size x size")
    p.add_argument(
        "--taps",
        type=int,
        nargs="+",
        help="blocks that get a companion head (default: depth/4, depth/2, 3 depth/4)",
    )
    p.add_argument("--aux-weight", type=float, default=0.3, help="weight of each companion loss")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument(
        "--seeds",
        nargs="+",
        default=["0", "1", "2"],
        help="integers and ranges A-B; 0-2 tuned the configuration, 100-109 are held out",
    )
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(DEFAULT_VARIANTS))
    p.add_argument("--bound", type=float, default=1.0, help="ds-bound's max ratio")
    p.add_argument(
        "--monitor",
        action="store_true",
        help="record per epoch, at each tap, the aux gradient and the rest's (norms, cosine) with "
        "deepsup.diagnostics.GradientMonitor, and the heads' losses (in results.json)",
    )
    p.add_argument("--test-size", type=int, default=497, help="held-out digits (fixed split)")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: the numbers of docs/evidence.md)"
    )
    p.add_argument("--out", default="runs/deep_plain_net", help="output folder")
    args = p.parse_args(argv)
    try:
        args.seeds = parse_seeds(args.seeds)
    except ValueError as e:
        p.error(str(e))
    if args.depth < 4:
        p.error(f"--depth must be >= 4 (got {args.depth})")
    if args.epochs < 1:
        p.error(f"--epochs must be >= 1 (got {args.epochs})")
    if args.taps is None:
        args.taps = sorted({args.depth // 4, args.depth // 2, 3 * args.depth // 4})
    bad = [t for t in args.taps if not 0 <= t < args.depth - 1]
    if bad:
        p.error(f"--taps must be block indices in [0, {args.depth - 2}] (got {bad})")
    return args


# --------------------------------------------------------------------------- data and model


def load_digits(size: int, test_size: int) -> tuple[torch.Tensor, ...]:
    """scikit-learn's digits as (N, 1, size, size), standardised, split by a fixed permutation."""
    x, y = upscaled_digits(size)
    train, test = permutation_split(len(y), test_size)
    mu, sd = x[train].mean(), x[train].std()
    x = (x - mu) / sd
    return x[train], y[train], x[test], y[test]


ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


class PlainNet(nn.Module):
    """``depth`` blocks of conv3x3 + activation (max-pooling after the first and second third),
    global average pooling and a linear classifier: no normalisation, no shortcut.

    Example:
        >>> PlainNet(depth=6, width=4)(torch.randn(2, 1, 16, 16)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self, depth: int, width: int, activation: str = "relu", init_gain: float | None = None
    ) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        for i in range(depth):
            layers: list[nn.Module] = [nn.Conv2d(1 if i == 0 else width, width, 3, padding=1)]
            layers.append(ACTIVATIONS[activation]())
            if i in (depth // 3 - 1, 2 * depth // 3 - 1):
                layers.append(nn.MaxPool2d(2))
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(width, 10)
        if init_gain:  # weights ~ N(0, gain^2 / fan_in), zero biases
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    fan_in = m.weight[0].numel()
                    nn.init.normal_(m.weight, std=init_gain / math.sqrt(fan_in))
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(self.blocks(x).mean(dim=(2, 3)))
        return out


def wrap(
    model: PlainNet, variant: str, args: argparse.Namespace, total_steps: int
) -> DeepSupervision:
    """The model with companion heads on ``args.taps``, or with none (``plain``: the baseline)."""
    weight: float | schedules.Schedule = args.aux_weight
    if variant == "ds-uncertainty":  # the learned weights replace the taps'
        weight = 1.0
    if variant == "ds-decay":
        weight = schedules.LinearDecay(args.aux_weight, total=total_steps)
    return DeepSupervision(
        model,
        taps={} if variant == "plain" else {f"blocks.{t}": weight for t in args.taps},
        head=heads.classification(10),
        criterion=nn.CrossEntropyLoss(),
    )


# --------------------------------------------------------------------------- training


def train(
    variant: str, seed: int, data: tuple[torch.Tensor, ...], args: argparse.Namespace
) -> dict[str, Any]:
    """One run; test accuracy and mean training loss (main loss only) after every epoch."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)  # the same initial network in every variant
    model = PlainNet(args.depth, args.width, args.activation, args.init_gain)
    steps = math.ceil(len(y_train) / args.batch_size)
    net = wrap(model, variant, args, total_steps=args.epochs * steps)
    torch.manual_seed(seed)  # the same batch order in every variant
    params = list(net.parameters())
    weighting = None
    if variant == "ds-uncertainty":
        names = ["main", *net.taps]
        weighting = UncertaintyWeighting(names, dict.fromkeys(net.taps, args.aux_weight))
        params += list(weighting.parameters())
    if variant == "ds-bound":
        GradientBound(net, args.bound)
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum)
    criterion = nn.CrossEntropyLoss()
    monitor = GradientMonitor(net) if args.monitor and variant != "plain" else None
    monitored: list[dict[str, Any]] = []
    curve: list[float] = []
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(args.epochs), desc=f"{variant} seed {seed}", leave=False, dynamic_ncols=True)
    for _ in bar:
        net.train()
        total = 0.0
        for index in torch.randperm(len(y_train)).split(args.batch_size):
            x, y = x_train[index], y_train[index]
            output, aux = net(x, target=y)  # plain: aux is {}
            main = criterion(output, y)
            optimizer.zero_grad(set_to_none=True)
            if variant == "ds-pcgrad":
                project_conflicts(main, aux, list(model.parameters()), list(net.heads.parameters()))
            elif weighting is not None:
                weighting({"main": main, **aux}).backward()
            else:
                (main + sum(aux.values())).backward()
            if monitor is not None:
                monitor.record(main, aux)
            optimizer.step()
            net.step()
            total += main.item() * len(y)
        losses.append(total / len(y_train))
        if monitor is not None:
            monitored.append(epoch_mean(monitor.rows))
            monitor.rows.clear()
        curve.append(accuracy(model, x_test, y_test))
        bar.set_postfix(loss=f"{losses[-1]:.3f}", test_acc=f"{100 * curve[-1]:.1f}")
    return {
        "variant": variant,
        "seed": seed,
        "test_acc": curve,
        "train_loss": losses,
        "final_acc": curve[-1],
        "monitor": monitored,
        "time_s": time.perf_counter() - start,
    }


def epoch_mean(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The mean over an epoch's ``GradientMonitor`` rows of each loss and of each tap's split.

    >>> rows = [{"losses": {"main": 2.0}, "taps": {"b": {"aux": 1.0, "rest": 3.0, "cosine": 0.5}}},
    ...         {"losses": {"main": 1.0}, "taps": {"b": {"aux": 3.0, "rest": 1.0, "cosine": 0.0}}}]
    >>> epoch_mean(rows)
    {'losses': {'main': 1.5}, 'taps': {'b': {'aux': 2.0, 'rest': 2.0, 'cosine': 0.25}}}
    """
    losses = {k: mean(r["losses"][k] for r in rows) for k in rows[0]["losses"]}
    taps = {
        t: {k: mean(r["taps"][t][k] for r in rows) for k in rows[0]["taps"][t]}
        for t in rows[0]["taps"]
    }
    return {"losses": losses, "taps": taps}


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


# --------------------------------------------------------------------------- reports

# A run has collapsed when its final test accuracy is below twice chance (10 classes): in
# practice its training loss stays near ln(10) = 2.30 (docs/evidence.md, protocol).
COLLAPSED_BELOW = 20.0


def paired_report(runs: Sequence[dict[str, Any]], baseline: str = "plain") -> str:
    """Final test accuracy per seed for every variant, and each variant's paired difference to
    ``baseline`` on the seeds both ran, with collapsed runs (below 2x chance, marked ``*``).
    Empty without the baseline, another variant or two common seeds.

    >>> runs = [{"variant": v, "seed": s, "final_acc": a}
    ...         for v, s, a in [("plain", 0, 0.9), ("ds", 0, 0.95), ("plain", 1, 0.8),
    ...                         ("ds", 1, 0.1)]]
    >>> print(paired_report(runs).splitlines()[3])
    | 1 | 80.00 | 10.00* (-70.00) |
    """
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    acc = {(r["variant"], r["seed"]): 100 * r["final_acc"] for r in runs}
    seeds = [s for s in dict.fromkeys(r["seed"] for r in runs)
             if all((v, s) in acc for v in variants)]  # fmt: skip
    if baseline not in variants or len(variants) < 2 or len(seeds) < 2:
        return ""
    table = {v: [acc[v, s] for s in seeds] for v in variants}
    return paired_table(seeds, table, baseline, collapse_below=COLLAPSED_BELOW)


def summarize(runs: Sequence[dict[str, Any]], level: float = 0.9) -> str:
    """A Markdown table: test accuracy mean +- std over seeds, per variant.

    >>> runs = [{"variant": "plain", "final_acc": a, "test_acc": [0.5, a]} for a in (0.9, 0.92)]
    >>> print(summarize(runs).splitlines()[2])
    | plain | 2 | 91.00 ± 1.41 | 90.00 / 92.00 | 2.0 (2/2) |
    """
    lines = [
        f"| variant | seeds | test accuracy (%) | min / max | epochs to {100 * level:.0f}% "
        "(runs that got there) |",
        "|---|---:|---:|---:|---:|",
    ]
    for variant in dict.fromkeys(r["variant"] for r in runs):
        accs = [100 * r["final_acc"] for r in runs if r["variant"] == variant]
        reach = [epochs_to(r["test_acc"], level) for r in runs if r["variant"] == variant]
        hit = [e for e in reach if e is not None]
        lines.append(
            f"| {variant} | {len(accs)} | {format_mean_std(accs, single_std=math.nan)} "
            f"| {min(accs):.2f} / {max(accs):.2f} "
            f"| {f'{mean(hit):.1f}' if hit else '-'} ({len(hit)}/{len(reach)}) |"
        )
    return "\n".join(lines)


def plot_curves(runs: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for variant in dict.fromkeys(r["variant"] for r in runs):
        mine = [r for r in runs if r["variant"] == variant]
        for key, ax, scale in (("test_acc", left, 100.0), ("train_loss", right, 1.0)):
            curves = torch.tensor([r[key] for r in mine]) * scale
            epochs = range(1, curves.shape[1] + 1)
            (line,) = ax.plot(epochs, curves.mean(0), label=variant)
            if len(mine) > 1:
                low, high = curves.min(0).values, curves.max(0).values
                ax.fill_between(epochs, low, high, color=line.get_color(), alpha=0.2)
    left.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy (mean, min-max)")
    right.set(
        xlabel="epoch", ylabel="cross-entropy", title="training loss, main head", yscale="log"
    )
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def flow_report(data: tuple[torch.Tensor, ...], args: argparse.Namespace, out: Path) -> str:
    """Gradient flow of the initial network (seed 0) on one training batch, with the companions."""
    torch.manual_seed(args.seeds[0])
    model = PlainNet(args.depth, args.width, args.activation, args.init_gain)
    sup = wrap(model, "ds", args, total_steps=1)
    x, y = data[0][: args.batch_size], data[1][: args.batch_size]
    report = gradient_flow(sup, x, target=y, criterion=nn.CrossEntropyLoss())
    report.plot(
        out / "gradient_flow.png",
        title=f"{args.depth}-layer plain network at initialisation: gradient per layer",
    )
    text = str(report)
    (out / "gradient_flow.txt").write_text(text + "\n")
    return text


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data = load_digits(args.size, args.test_size)
    print(
        f"deep_plain_net: {len(data[1])} train / {len(data[3])} test digits at {args.size}px; "
        f"{args.depth} conv layers ({args.activation}, width {args.width}), taps "
        f"{args.taps} at weight {args.aux_weight}; SGD lr {args.lr}, {args.epochs} epochs",
        flush=True,
    )
    jobs = [(v, s) for s in args.seeds for v in args.variants]
    seconds = len(jobs) * args.epochs * SECONDS_PER_EPOCH * args.depth / 10
    print(
        f"expected: about {about(seconds)} for {len(jobs)} runs of {args.epochs} epochs on "
        f"{args.threads} thread(s) with the cores free, more when other work shares them; "
        "--epochs 2 --seeds 0 for a quick run",
        flush=True,
    )
    flow = flow_report(data, args, out)
    runs = []
    for variant, seed in tqdm(jobs, desc="runs", dynamic_ncols=True):
        runs.append(train(variant, seed, data, args))
        tqdm.write(f"{variant:>9} seed {seed}: test accuracy {100 * runs[-1]['final_acc']:.2f}%")
    table = summarize(runs)
    paired = paired_report(runs)
    plot_curves(runs, out / "curves.png")
    wall = time.perf_counter() - start
    result = {
        "config": vars(args),
        "runs": runs,
        "table": table,
        "paired": paired,
        "wall_time_s": wall,
    }
    (out / "results.json").write_text(json.dumps(result, indent=1))
    print(f"\ngradient flow at initialisation (seed {args.seeds[0]}):\n{flow}\n")
    print(table)
    if paired:
        print(f"\ntest accuracy (%) per seed, paired against plain (* collapsed):\n{paired}")
    print(
        f"\nwall time {wall:.0f} s; outputs in {out}: results.json, curves.png, gradient_flow.png"
    )
    return result


if __name__ == "__main__":
    main()
