"""Multi-exit inference on real handwritten digits: plain vs deep supervision vs self-distillation.

A small ResNet (stem, three stages of one basic block each, 16/32/64 channels, pool + linear)
on scikit-learn's handwritten digits (1,797 real 8x8 scans that ship with scikit-learn, no
download), upscaled to 16x16, with a fixed stratified split (60% train, 20% val, 20% test).
Heads (global pool + linear) sit after ``layer1`` and ``layer2``; the model's own classifier
after ``layer3`` is the last exit. Three ways to train, each over several seeds:

- ``plain``: the model learns from its output alone; the heads train on detached features
  (``Tap(detach=True)``: linear probes that do not touch the model), so they show what the
  features of a plainly trained model offer an exit;
- ``ds``: deep supervision, cross-entropy at every head;
- ``sd``: self-distillation (``deepsup.losses.SelfDistillation``): the output teaches the heads.

For each run: the test accuracy of every exit and of the output (``sup.exits``), and the
early-exit curve: thresholds calibrated on val (``EarlyExit.calibrate``) for several allowed
accuracy drops, then measured on test one sample at a time (``EarlyExit.evaluate``):
accuracy, share of samples at each exit, FLOPs (``FlopCounterMode``) and wall time per sample.

    python examples/multi_exit_digits.py                      # 3 seeds: 2-5 min on one core
    python examples/multi_exit_digits.py --epochs 1 --seeds 0  # a smoke run

Writes ``results.json``, ``summary.md``, ``exits.png`` and ``curve.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _shared import about, mean_std, paired_table, parse_seeds, stratified_split, upscaled_digits
from torch import nn
from tqdm import tqdm

from deepsup import DeepSupervision, EarlyExit, Tap, heads
from deepsup.losses import SelfDistillation

EXITS = ("layer1", "layer2")
VARIANTS = ("plain", "ds", "sd")
LABELS = {"plain": "plain (detached probes)", "ds": "deep supervision", "sd": "self-distillation"}
MAX_DROPS = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1)
# One thread, cores free (the project's 2-core AMD EPYC, torch 2.14.1): seconds per training
# epoch and per run's evaluation (exits, calibration, early exit one sample at a time).
SECONDS_PER_EPOCH, SECONDS_PER_EVALUATION = 0.5, 3.0


# data -------------------------------------------------------------------------------------


def load_digits_split(
    size: int = 16, seed: int = 0
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """scikit-learn's digits, upscaled (bilinear) to ``size``, split 60/20/20 (stratified)."""
    x, y = upscaled_digits(size)
    x = (x - 0.3) / 0.35  # roughly zero mean, unit variance
    return {name: (x[i], y[i]) for name, i in stratified_split(y, seed=seed).items()}


def batches(
    data: tuple[torch.Tensor, torch.Tensor], size: int, *, shuffle: bool = False, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = data
    order = (
        torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
        if shuffle
        else torch.arange(len(y))
    )
    return [(x[order[i : i + size]], y[order[i : i + size]]) for i in range(0, len(y), size)]


# model ------------------------------------------------------------------------------------


class Block(nn.Module):
    """A ResNet basic block (two 3x3 convs, BN, shortcut); no in-place ops."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """stem -> layer1 (16) -> layer2 (32, /2) -> layer3 (64, /2) -> pool -> fc."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(
            nn.Conv2d(1, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()
        )
        self.layer1 = Block(w, w, 1)
        self.layer2 = Block(w, 2 * w, 2)
        self.layer3 = Block(2 * w, 4 * w, 2)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(x.mean((2, 3)))


def build(variant: str, seed: int, width: int) -> DeepSupervision:
    torch.manual_seed(seed)
    model = SmallResNet(width=width)
    ce = nn.CrossEntropyLoss()
    if variant == "plain":
        taps: dict[str, Any] = {e: Tap(1.0, detach=True) for e in EXITS}
        criterion: Any = ce
    elif variant == "ds":
        taps, criterion = dict.fromkeys(EXITS, 0.5), ce
    elif variant == "sd":
        taps, criterion = (
            dict.fromkeys(EXITS, 0.5),
            SelfDistillation(ce, temperature=3.0, alpha=0.5),
        )
    else:
        raise ValueError(f"variant must be one of {VARIANTS} (got {variant!r})")
    return DeepSupervision(model, taps, head=heads.classification(10), criterion=criterion)


# training and evaluation ------------------------------------------------------------------


def train(
    sup: DeepSupervision, data: dict[str, Any], *, epochs: int, seed: int, lr: float
) -> float:
    """Adam with cosine decay; returns the seconds it took."""
    started = time.perf_counter()
    opt = torch.optim.AdamW(sup.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(len(data["train"][1]) / 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    ce = nn.CrossEntropyLoss()
    sup.train()
    for epoch in range(epochs):
        for x, y in batches(data["train"], 64, shuffle=True, seed=seed * 1000 + epoch):
            out, aux = sup(x, target=y)
            loss = ce(out, y) + sum(aux.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    sup.eval()
    return time.perf_counter() - started


def exit_accuracies(
    sup: DeepSupervision, data: tuple[torch.Tensor, torch.Tensor]
) -> dict[str, float]:
    """Test accuracy of every exit and of the output, from one ``sup.exits`` forward per batch."""
    correct: dict[str, int] = {}
    for x, y in batches(data, 256):
        for name, pred in sup.exits(x).items():
            correct[name] = correct.get(name, 0) + int((pred.argmax(1) == y).sum())
    return {name: c / len(data[1]) for name, c in correct.items()}


def early_exit_curve(
    sup: DeepSupervision,
    data: dict[str, Any],
    max_drops: Sequence[float],
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Calibrate on val for each allowed drop, then measure on test one sample at a time."""
    early = EarlyExit(sup).eval()
    val = batches(data["val"], 128)
    test = batches(data["test"], 1)[:limit]
    points = []
    try:
        for drop in max_drops:
            calib = early.calibrate(val, max_drop=drop, timing_runs=10)
            table = early.evaluate(test)
            points.append(
                {
                    "max_drop": drop,
                    "thresholds": calib.thresholds,
                    "val_accuracy": calib.accuracy,
                    "accuracy": table.accuracy,
                    "flops": table.flops,
                    "time_s": table.time_s,
                    "full_accuracy": table.full_accuracy,
                    "full_flops": table.full_flops,
                    "full_time_s": table.full_time_s,
                    "rows": table.to_rows(),
                    "markdown": str(table),
                }
            )
    finally:
        early.remove()
    return points


# reporting --------------------------------------------------------------------------------


def paired_report(runs: list[dict[str, Any]], max_drops: Sequence[float]) -> str:
    """Per seed and paired: each exit's test accuracy against ``plain`` and self-distillation
    against deep supervision, and early exit's share of the full model's FLOPs at each allowed
    drop against ``plain`` (empty with fewer than two seeds or one variant)."""
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in runs)]
    run = {(r["variant"], r["seed"]): r for r in runs}
    seeds = [s for s in dict.fromkeys(r["seed"] for r in runs)
             if all((v, s) in run for v in variants)]  # fmt: skip
    if len(seeds) < 2 or len(variants) < 2:
        return ""
    parts = []
    for name in [*EXITS, "output"]:
        acc = {v: [100 * run[v, s]["exits"][name] for s in seeds] for v in variants}
        for baseline in ("plain", "ds"):
            compared = {v: acc[v] for v in variants if v != "plain" or baseline == "plain"}
            if baseline in compared and len(compared) > 1:
                parts += [f"## {name}: test accuracy (%), paired against {baseline}", ""]
                parts += [paired_table(seeds, compared, baseline), ""]
    for i, drop in enumerate(max_drops):
        share = {v: [run[v, s]["curve"][i]["flops"] / run[v, s]["curve"][i]["full_flops"]
                     for s in seeds] for v in variants}  # fmt: skip
        if "plain" in share:
            parts += [f"## early exit at max drop {drop:g}: share of the full model's FLOPs", ""]
            parts += [paired_table(seeds, share, "plain", digits=3), ""]
    return "\n".join(parts)


def summarize(runs: list[dict[str, Any]], max_drops: Sequence[float]) -> str:
    names = [*EXITS, "output"]
    lines = ["## Test accuracy per exit (mean ± std over seeds, %)", ""]
    lines += ["| variant | " + " | ".join(names) + " | train time (s) |"]
    lines += ["|---" * (len(names) + 2) + "|"]
    for v in VARIANTS:
        rs = [r for r in runs if r["variant"] == v]
        if not rs:
            continue
        cells = []
        for n in names:
            m, s = mean_std([100 * r["exits"][n] for r in rs])
            cells.append(f"{m:.2f} ± {s:.2f}")
        t, _ = mean_std([r["train_s"] for r in rs])
        lines.append(f"| {LABELS[v]} | " + " | ".join(cells) + f" | {t:.1f} |")
    lines += ["", "## Early exit on test, batch 1 (mean ± std over seeds)", ""]
    lines += [
        "| variant | max drop (val) | accuracy % | full model % | MFLOPs/sample | "
        "of full | ms/sample | full ms/sample | " + " | ".join(f"at {n}" for n in names) + " |"
    ]
    lines += ["|---" * (8 + len(names)) + "|"]
    for v in VARIANTS:
        rs = [r for r in runs if r["variant"] == v]
        for i, drop in enumerate(max_drops):
            pts = [r["curve"][i] for r in rs]
            if not pts:
                continue
            acc = mean_std([100 * p["accuracy"] for p in pts])
            full = mean_std([100 * p["full_accuracy"] for p in pts])
            fl = mean_std([p["flops"] / 1e6 for p in pts])
            rel = mean_std([p["flops"] / p["full_flops"] for p in pts])
            ms = mean_std([1e3 * p["time_s"] for p in pts])
            fms = mean_std([1e3 * p["full_time_s"] for p in pts])
            shares = [
                mean_std(
                    [next(row["share"] for row in p["rows"] if row["exit"] == n) * 100 for p in pts]
                )[0]
                for n in names
            ]
            lines.append(
                f"| {LABELS[v]} | {drop:g} | {acc[0]:.2f} ± {acc[1]:.2f} | {full[0]:.2f} | "
                f"{fl[0]:.3f} ± {fl[1]:.3f} | {rel[0]:.2f} | {ms[0]:.3f} ± {ms[1]:.3f} | "
                f"{fms[0]:.3f} | " + " | ".join(f"{s:.0f}%" for s in shares) + " |"
            )
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], max_drops: Sequence[float], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [*EXITS, "output"]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    width = 0.8 / len(VARIANTS)
    for j, v in enumerate(VARIANTS):
        rs = [r for r in runs if r["variant"] == v]
        if not rs:
            continue
        stats = [mean_std([100 * r["exits"][n] for r in rs]) for n in names]
        ax.bar(
            [i + (j - 1) * width for i in range(len(names))],
            [m for m, _ in stats],
            width,
            yerr=[s for _, s in stats],
            label=LABELS[v],
            capsize=3,
        )
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)  # the whole scale: a plain model's layer1 probe is near 30%
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(VARIANTS))
    seeds = len({r["seed"] for r in runs})
    ax.set_title(f"test accuracy of every exit (mean ± std over {seeds} seeds)")
    fig.tight_layout()
    fig.savefig(out / "exits.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for v in VARIANTS:
        rs = [r for r in runs if r["variant"] == v]
        if not rs:
            continue
        xs = [
            statistics.fmean(r["curve"][i]["flops"] / 1e6 for r in rs)
            for i in range(len(max_drops))
        ]
        ys = [
            statistics.fmean(100 * r["curve"][i]["accuracy"] for r in rs)
            for i in range(len(max_drops))
        ]
        (line,) = ax.plot(xs, ys, "o-", label=LABELS[v])
        for r in rs:  # every seed's exits taken alone, as the reference points
            ex = [100 * r["exits"][n] for n in names]
            cost = [r["costs"][n] / 1e6 for n in names]
            ax.plot(cost, ex, "x", color=line.get_color(), alpha=0.4)
    ax.set_ylim(top=100.5)  # the bottom follows the data: a plain layer1 probe is near 30%
    ax.grid(alpha=0.3)
    ax.set_xlabel("MFLOPs per sample (FlopCounterMode)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("early exit, thresholds calibrated on val (x: one exit for all)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curve.png", dpi=110)
    plt.close(fig)


def fixed_exit_costs(sup: DeepSupervision, x: torch.Tensor) -> dict[str, float]:
    """FLOPs of one sample leaving at each exit with no other head run (the 'x' markers)."""
    early = EarlyExit(sup).eval()
    try:
        costs = early.costs(x[:1])
    finally:
        early.remove()
    out = {e: float(costs.prefix[e] + costs.head[e]) for e in costs.order}
    out["output"] = float(costs.full)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument(
        "--seeds", nargs="+", default=["0", "1", "2"], help="integers and ranges A-B (100-109)"
    )
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--size", type=int, default=16, help="upscaled image side")
    p.add_argument("--width", type=int, default=16, help="channels of the first stage")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--max-drops", type=float, nargs="+", default=list(MAX_DROPS))
    p.add_argument("--eval-limit", type=int, default=None, help="test samples for early exit")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: the numbers of docs/exits.md)"
    )
    p.add_argument("--out", type=Path, default=Path("runs/multi_exit_digits"))
    args = p.parse_args(argv)
    try:
        args.seeds = parse_seeds(args.seeds)
    except ValueError as e:
        p.error(str(e))
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data = load_digits_split(args.size)
    print({k: len(v[1]) for k, v in data.items()})
    runs = []
    jobs = [(v, s) for s in args.seeds for v in args.variants]
    seconds = len(jobs) * (args.epochs * SECONDS_PER_EPOCH + SECONDS_PER_EVALUATION)
    print(
        f"expected: about {about(seconds)} for {len(jobs)} runs of {args.epochs} epochs on "
        f"{args.threads} thread(s) with the cores free, more when other work shares them; "
        "--epochs 1 --seeds 0 for a smoke run",
        flush=True,
    )
    for variant, seed in tqdm(jobs, desc="runs"):
        sup = build(variant, seed, args.width)
        train_s = train(sup, data, epochs=args.epochs, seed=seed, lr=args.lr)
        t0 = time.perf_counter()
        run = {
            "variant": variant,
            "seed": seed,
            "train_s": train_s,
            "exits": exit_accuracies(sup, data["test"]),
            "costs": fixed_exit_costs(sup, data["test"][0]),
            "curve": early_exit_curve(sup, data, args.max_drops, args.eval_limit),
        }
        run["eval_s"] = time.perf_counter() - t0
        runs.append(run)
        tqdm.write(
            f"{variant} seed {seed}: "
            + ", ".join(f"{k} {100 * a:.2f}%" for k, a in run["exits"].items())
            + f" (train {train_s:.0f} s, eval {run['eval_s']:.0f} s)"
        )
    total = time.perf_counter() - started
    meta = {
        "command": "python examples/multi_exit_digits.py " + " ".join(argv or []),
        "args": {k: str(v) for k, v in vars(args).items()},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "total_s": total,
        "split": {k: len(v[1]) for k, v in data.items()},
    }
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
    summary = summarize(runs, args.max_drops) + "\n\n" + paired_report(runs, args.max_drops)
    (args.out / "summary.md").write_text(summary + "\n")
    plot(runs, args.max_drops, args.out)
    print(summary)
    first = next(r for r in runs if r["variant"] == args.variants[-1])
    drop = args.max_drops[min(2, len(args.max_drops) - 1)]
    point = next(pt for pt in first["curve"] if pt["max_drop"] == drop)
    name = LABELS[first["variant"]]
    print(f"\nEarly exit on test, {name}, seed {first['seed']}, max drop {drop:g}:")
    print(point["markdown"])
    files = "results.json, summary.md, exits.png, curve.png"
    print(f"\ntotal {total / 60:.1f} min; wrote {files} to {args.out}")


if __name__ == "__main__":
    main()
