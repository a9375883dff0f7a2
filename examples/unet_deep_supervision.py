"""Multi-scale deep supervision of a 3D U-Net: which target downsampling keeps small lesions?

A plain 3D U-Net of this file (no deep supervision of its own) segments generated volumes that
hold a large organ and lesions a few voxels wide. deepsup taps the decoder stages at 1/2 and 1/4
resolution with a 1x1x1 conv head each (as nnU-Net's deep-supervision outputs), Dice +
cross-entropy at every scale, weights by :func:`deepsup.multiscale.scale_weights`. The targets
of the taps are downsampled with ``resize="target"`` and one of the ``interpolation=`` rules:

- ``nearest``: one voxel per cell (nnU-Net and MONAI do this): a lesion narrower than the cell
  disappears from the coarse targets, and the head there is taught "no lesion";
- ``soft``: the fraction of each class in each cell (a probability target);
- ``max``: the highest class in the cell (labels ordered background < organ < lesion).

It trains four variants from the same initialisation and data order: no deep supervision, and
deep supervision with each rule; then it reports Dice per class, lesion detection (the share of
lesions with any voxel predicted as lesion) and how many lesions each rule keeps in the coarse
targets. Runs on a laptop CPU in a few minutes::

    python examples/unet_deep_supervision.py                  # one seed
    python examples/unet_deep_supervision.py --seeds 0 1 2    # mean +- std over seeds
    # or in parallel processes (a seed or a variant each), then one table and the figures:
    python examples/unet_deep_supervision.py --seeds 1 --variants "DS max" --out runs/ds/max1
    python examples/unet_deep_supervision.py --combine runs/ds/* --out runs/ds

Writes into ``--out``: ``results.json`` (every number, the curves and the configuration),
``curves.png`` (training loss and validation lesion Dice per variant), ``overlay.png`` (one
slice: image, truth, predictions) and ``models/`` (the trained U-Nets' ``state_dict``).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _shared import about, format_mean_std, paired_table, parse_seeds, set_threads
from torch import nn
from tqdm import tqdm

from deepsup import DeepSupervision
from deepsup.multiscale import downsample, scale_weights

CLASSES = ("background", "organ", "lesion")
VARIANTS = ("no DS", "DS nearest", "DS soft", "DS max")
TAPS = ["dec2", "dec3"]  # decoder stages at 1/2 and 1/4 resolution, finest first
# Seconds per training step (with its share of validation) at --size 24, the cores free (the
# project's 2-core AMD EPYC, torch 2.14.1); the start-up line scales it by runs, steps, volume.
SECONDS_PER_STEP = 0.1


# data -------------------------------------------------------------------------------------


def make_volume(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One volume: (image, labels, lesion instance ids), each (size, size, size).

    An ellipsoid organ (radii 22% to 34% of the edge, label 1, intensity 1) and 5 to 10
    spherical lesions (radius 1.2 to 2.2: 2 to 4 voxels wide, label 2, intensity 3), most inside
    the organ, with Gaussian noise (sigma 0.5).
    """
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"), -1).astype(np.float32)
    labels = np.zeros((size,) * 3, np.int64)
    lesions = np.zeros((size,) * 3, np.int64)
    centre = rng.uniform(0.35 * size, 0.65 * size, 3)
    radii = rng.uniform(0.22 * size, 0.34 * size, 3)
    organ = (((grid - centre) / radii) ** 2).sum(-1) <= 1
    labels[organ] = 1
    organ_voxels = np.argwhere(organ)
    for k in range(int(rng.integers(5, 11))):
        if rng.random() < 0.75:
            c = organ_voxels[rng.integers(len(organ_voxels))] + rng.uniform(-0.5, 0.5, 3)
        else:
            c = rng.uniform(3, size - 3, 3)
        r = rng.uniform(1.2, 2.2)
        lo = np.clip(np.floor(c - r).astype(int), 0, size - 1)
        hi = np.clip(np.ceil(c + r).astype(int) + 1, 1, size)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))  # the ball's bounding box
        ball = ((grid[box] - c) ** 2).sum(-1) <= r * r
        if not ball.any():
            ball[tuple(np.clip(np.round(c).astype(int), lo, hi - 1) - lo)] = True
        labels[box][ball] = 2
        lesions[box][ball] = k + 1
    image = np.where(labels == 1, 1.0, 0.0) + np.where(labels == 2, 3.0, 0.0)
    image = image + rng.normal(0.0, 0.5, image.shape)
    return image.astype(np.float32), labels, lesions


def make_set(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    vols = [make_volume(rng, size) for _ in range(n)]
    image, labels, lesions = (np.stack(v) for v in zip(*vols))
    return torch.from_numpy(image)[:, None], torch.from_numpy(labels), torch.from_numpy(lesions)


# model and loss ---------------------------------------------------------------------------


class Block(nn.Sequential):
    """Two (conv3x3x3 - InstanceNorm - LeakyReLU), as nnU-Net's stages."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv3d(cin, cout, 3, padding=1),
            nn.InstanceNorm3d(cout, affine=True),
            nn.LeakyReLU(0.01),
            nn.Conv3d(cout, cout, 3, padding=1),
            nn.InstanceNorm3d(cout, affine=True),
            nn.LeakyReLU(0.01),
        )


class UNet3D(nn.Module):
    """A plain 4-level 3D U-Net; ``dec3``, ``dec2``, ``dec1`` are the decoder stages."""

    def __init__(self, in_channels: int = 1, num_classes: int = 3, width: int = 8) -> None:
        super().__init__()
        w = [width * 2**i for i in range(4)]
        self.enc1, self.enc2, self.enc3 = (
            Block(in_channels, w[0]),
            Block(w[0], w[1]),
            Block(w[1], w[2]),
        )
        self.bottleneck = Block(w[2], w[3])
        self.pool = nn.MaxPool3d(2)
        self.up3, self.dec3 = nn.ConvTranspose3d(w[3], w[2], 2, stride=2), Block(2 * w[2], w[2])
        self.up2, self.dec2 = nn.ConvTranspose3d(w[2], w[1], 2, stride=2), Block(2 * w[1], w[1])
        self.up1, self.dec1 = nn.ConvTranspose3d(w[1], w[0], 2, stride=2), Block(2 * w[0], w[0])
        self.out = nn.Conv3d(w[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        e3 = self.enc3(self.pool(e2))
        b = self.bottleneck(self.pool(e3))
        d3 = self.dec3(torch.cat([self.up3(b), e3], 1))
        d2 = self.dec2(torch.cat([self.up2(d3), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        out: torch.Tensor = self.out(d1)
        return out


class DiceCE(nn.Module):
    """Cross-entropy + (1 - batch soft Dice over the foreground classes), as nnU-Net's loss.

    Takes class indices (B, *S) or class probabilities (B, C, *S) (``"soft"`` targets).
    """

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.is_floating_point():
            onehot = target
        else:
            onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).to(logits.dtype)
        ce = F.cross_entropy(logits, target)
        prob = logits.softmax(1)
        dims = (0, *range(2, logits.dim()))
        inter = (prob * onehot).sum(dims)
        dice = (2 * inter + 1e-5) / (prob.sum(dims) + onehot.sum(dims) + 1e-5)
        return ce + 1 - dice[1:].mean()


# training and evaluation --------------------------------------------------------------------


def build(variant: str, seed: int, width: int) -> tuple[DeepSupervision, float]:
    """(the wrapped U-Net, the main loss weight) for a variant; ``no DS`` has no tap."""
    torch.manual_seed(seed)
    model = UNet3D(width=width)
    if variant == "no DS":  # the plain baseline: a training forward returns (output, {})
        return DeepSupervision(model, {}), 1.0
    main, weights = scale_weights(TAPS, "halving")  # main 1, dec2 0.5, dec3 0.25
    sup = DeepSupervision(
        model,
        weights,
        head=functools.partial(nn.Conv3d, out_channels=len(CLASSES), kernel_size=1),
        criterion=DiceCE(),
        resize="target",
        interpolation=variant.split()[1],
        example_input=torch.zeros(1, 1, 16, 16, 16),
    )
    return sup, main


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([model(images[i : i + 4]).argmax(1) for i in range(0, len(images), 4)])


def dice(pred: torch.Tensor, labels: torch.Tensor, cls: int) -> float:
    p, t = pred == cls, labels == cls
    denom = int(p.sum() + t.sum())
    return 1.0 if denom == 0 else 2 * int((p & t).sum()) / denom


def lesion_detection(pred: torch.Tensor, lesions: torch.Tensor) -> float:
    """The share of lesions with at least one voxel predicted as lesion."""
    hits = total = 0
    for i in range(len(lesions)):
        ids = lesions[i].unique()
        for k in ids[ids > 0].tolist():
            total += 1
            hits += bool((pred[i][lesions[i] == k] == 2).any())
    return hits / max(total, 1)


def evaluate(model: nn.Module, data: Sequence[torch.Tensor]) -> dict[str, float]:
    images, labels, lesions = data
    pred = predict(model, images)
    return {
        "dice_organ": dice(pred, labels, 1),
        "dice_lesion": dice(pred, labels, 2),
        "lesion_detection": lesion_detection(pred, lesions),
    }


def train(
    variant: str, seed: int, args: argparse.Namespace, train_set: Any, val_set: Any
) -> dict[str, Any]:
    net, main_weight = build(variant, seed, args.width)
    model = net.model
    criterion = DiceCE()
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / args.steps))
    )
    images, labels, _ = train_set
    g = torch.Generator().manual_seed(seed)
    losses, val_curve = [], []
    t0 = time.perf_counter()
    bar = tqdm(range(args.steps), desc=f"{variant:<10} seed {seed}", leave=False)
    for step in bar:
        net.train()
        idx = torch.randint(len(images), (args.batch_size,), generator=g)
        x, y = images[idx], labels[idx]
        flips = [d for d in (2, 3, 4) if torch.rand((), generator=g) < 0.5]
        if flips:
            x, y = x.flip(flips), y.flip([d - 1 for d in flips])
        out, aux = net(x, target=y)
        loss = main_weight * criterion(out, y) + sum(aux.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            val_curve.append((step + 1, evaluate(model, val_set)["dice_lesion"]))
            bar.set_postfix(loss=f"{loss.item():.3f}", val_lesion=f"{val_curve[-1][1]:.3f}")
    return {
        "model": model,
        "losses": losses,
        "val_curve": val_curve,
        "seconds": time.perf_counter() - t0,
    }


def target_survival(labels: torch.Tensor, lesions: torch.Tensor) -> dict[str, dict[str, float]]:
    """The share of lesions still present in the coarse targets, per rule and scale."""
    out: dict[str, dict[str, float]] = {}
    size = labels.shape[-1]
    for rule in ("nearest", "soft", "max"):
        out[rule] = {}
        for f in (2, 4):
            s = (size // f,) * 3
            small = downsample(labels, s, rule, num_classes=len(CLASSES))
            present = small[:, 2] > 0 if rule == "soft" else small == 2
            # a lesion survives if a cell covering one of its voxels is marked lesion
            up = present[:, :, None, :, None, :, None].expand(-1, -1, f, -1, f, -1, f)
            up = up.reshape(labels.shape)
            hits = total = 0
            for i in range(len(lesions)):
                ids = lesions[i].unique()
                for k in ids[ids > 0].tolist():
                    total += 1
                    hits += bool(up[i][lesions[i] == k].any())
            out[rule][f"1/{f}"] = hits / max(total, 1)
    return out


# reporting --------------------------------------------------------------------------------


def plot(runs: dict[str, list[dict[str, Any]]], test_set: Any, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    for variant, seeds in runs.items():
        losses = np.mean([r["losses"] for r in seeds], 0)
        k = max(len(losses) // 40, 1)
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax1.plot(smooth, label=variant)
        steps = [s for s, _ in seeds[0]["val_curve"]]
        val = np.mean([[v for _, v in r["val_curve"]] for r in seeds], 0)
        ax2.plot(steps, val, marker="o", ms=3, label=variant)
    count = len(next(iter(runs.values())))  # seeds per variant
    ax1.set(xlabel="step", ylabel="loss (main + weighted aux), log scale", yscale="log")
    ax1.set_title(f"training loss (moving mean, mean of {count} seed(s))", fontsize=10)
    ax2.set(xlabel="step", ylabel="lesion Dice", ylim=(0, 1))
    ax2.set_title(f"validation lesion Dice (mean of {count} seed(s))", fontsize=10)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=80)
    plt.close(fig)

    images, labels, _ = test_set
    i = int((labels == 2).flatten(1).sum(1).argmax())
    z = int((labels[i] == 2).sum((1, 2)).argmax())
    preds = {v: predict(runs[v][0]["model"], images[i : i + 1])[0] for v in runs}
    panels = [("image", None), ("truth", labels[i]), *((v, p) for v, p in preds.items())]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.1 * len(panels), 2.8))
    colours = [(0, 0, 0, 0), (0.2, 0.6, 1, 0.45), (1, 0.2, 0.1, 0.9)]
    cmap = matplotlib.colors.ListedColormap(colours)
    for ax, (title, lab) in zip(axes, panels):
        ax.imshow(images[i, 0, z].numpy(), cmap="gray")
        if lab is not None:
            ax.imshow(lab[z].numpy(), cmap=cmap, vmin=0, vmax=2, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    patches = [Patch(color=c, label=n) for c, n in zip(colours[1:], CLASSES[1:])]
    fig.legend(handles=patches, loc="lower center", ncol=2, fontsize=9, frameon=False)
    fig.suptitle(f"test volume {i}, slice {z}: truth and each variant's prediction", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(out / "overlay.png", dpi=80)
    plt.close(fig)


KEYS = ("dice_organ", "dice_lesion", "lesion_detection")


def print_summary(
    summary: dict[str, dict[str, Any]],
    survival: dict[str, dict[str, float]],
    seeds: Sequence[int],
    steps: int,
    test: int,
    seeds_of: dict[str, list[int]] | None = None,
) -> None:
    """The table of every variant (mean ± std over seeds), and with two or more seeds the paired
    differences of each metric against ``no DS`` on the seeds both ran (``seeds_of``: each
    variant's seeds in the order of its values; default ``seeds`` for all)."""
    print(f"\n{len(seeds)} seed(s) {list(seeds)}, {steps} steps each, {test} test volumes")
    print(
        f"{'variant':<12} {'Dice organ':>16} {'Dice lesion':>16} {'lesions found':>16} {'s/run':>7}"
    )
    for v, row in summary.items():
        cells = " ".join(f"{format_mean_std(row[k], 3, single_std=None):>16}" for k in KEYS)
        print(f"{v:<12} {cells} {statistics.fmean(row['seconds_per_run']):>7.1f}")
    print("\nlesions still present in the training targets at each tap's scale:")
    for rule, scales in survival.items():
        print(f"  {rule:<8} " + "  ".join(f"{s}: {x:.1%}" for s, x in scales.items()))
    baseline = VARIANTS[0]
    seeds_of = seeds_of or {v: list(seeds) for v in summary}
    common = sorted(set.intersection(*(set(seeds_of[v]) for v in summary)))
    if baseline not in summary or len(summary) < 2 or len(common) < 2:
        return
    for k in KEYS:
        by_seed = {v: dict(zip(seeds_of[v], summary[v][k])) for v in summary}
        table = {v: [by_seed[v][s] for s in common] for v in summary}
        print(f"\n{k}, per seed and paired against {baseline!r}:")
        print(paired_table(common, table, baseline, digits=3))


def combine(dirs: Sequence[Path], out: Path) -> dict[str, Any]:
    """One summary and one set of figures from earlier runs (other seeds or other variants).

    Each run's ``results.json`` holds its test metrics, losses and validation curves, and
    ``models/`` its trained U-Nets; the figures use the first seed of each variant.
    """
    results = [json.loads((d / "results.json").read_text()) for d in dirs]
    config = results[0]["config"]
    summary: dict[str, dict[str, Any]] = {}
    runs: dict[str, list[dict[str, Any]]] = {}
    for d, r in zip(dirs, results):
        for v, row in r["test"].items():
            merged = summary.setdefault(v, {k: [] for k in (*KEYS, "seconds_per_run")})
            for k in merged:
                merged[k] += row[k]
            for run in r["runs"][v]:
                model = UNet3D(width=config["width"])
                model.load_state_dict(torch.load(d / run["model"], weights_only=True))
                runs.setdefault(v, []).append({**run, "model": model})
    order = [v for v in VARIANTS if v in summary]
    summary = {v: summary[v] for v in order}
    seeds = sorted({run["seed"] for v in runs for run in runs[v]})
    seeds_of = {v: [run["seed"] for run in runs[v]] for v in order}
    out.mkdir(parents=True, exist_ok=True)
    plot({v: runs[v] for v in order}, make_set(config["test"], config["size"], seed=3000), out)
    print_summary(
        summary, results[0]["target_survival"], seeds, config["steps"], config["test"], seeds_of
    )
    print(f"\nwrote {out}/curves.png, overlay.png")
    return {"test": summary, "seeds": seeds, "target_survival": results[0]["target_survival"]}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--seeds", nargs="+", default=["0"], help="seeds: integers and ranges A-B (100-109)"
    )
    p.add_argument("--steps", type=int, default=200, help="training steps per variant and seed")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--size", type=int, default=24, help="volume edge (a multiple of 8)")
    p.add_argument("--width", type=int, default=8, help="channels of the first U-Net stage")
    p.add_argument("--lr", type=float, default=1e-2, help="Adam, cosine decay to 0")
    p.add_argument("--train", type=int, default=40, help="training volumes")
    p.add_argument("--val", type=int, default=4, help="validation volumes")
    p.add_argument("--test", type=int, default=12, help="test volumes")
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads; default: OMP_NUM_THREADS, else the CPUs free at start",
    )
    p.add_argument("--out", type=Path, default=Path("runs/unet_ds"))
    p.add_argument(
        "--combine", type=Path, nargs="+", metavar="DIR",
        help="one table and the figures (into --out) from earlier runs' folders, e.g. one per "
        "seed or per variant, instead of training",
    )  # fmt: skip
    args = p.parse_args(argv)
    try:
        args.seeds = parse_seeds(args.seeds)
    except ValueError as e:
        p.error(str(e))
    if args.size % 8 or args.size < 8:
        p.error(f"--size must be a positive multiple of 8 (got {args.size})")
    for name in ("steps", "batch_size", "width", "train", "val", "test", "eval_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.combine:
        return combine(args.combine, args.out)
    print(set_threads(args.threads), flush=True)
    runs_count = len(args.seeds) * len(args.variants)
    seconds = runs_count * args.steps * SECONDS_PER_STEP * (args.size / 24) ** 3
    print(
        f"expected: about {about(seconds)} for {runs_count} runs of {args.steps} steps with the "
        "cores free, more when other work shares them; --steps 25 for a quick run",
        flush=True,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train_set = make_set(args.train, args.size, seed=1000)
    val_set = make_set(args.val, args.size, seed=2000)
    test_set = make_set(args.test, args.size, seed=3000)
    survival = target_survival(train_set[1], train_set[2])

    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in args.variants}
    metrics: dict[str, list[dict[str, float]]] = {v: [] for v in args.variants}
    for seed in args.seeds:
        for variant in args.variants:
            run = train(variant, seed, args, train_set, val_set)
            runs[variant].append(run)
            metrics[variant].append(evaluate(run["model"], test_set))
    plot(runs, test_set, args.out)
    (args.out / "models").mkdir(exist_ok=True)
    saved: dict[str, list[dict[str, Any]]] = {}
    for v, seed_runs in runs.items():
        for seed, run in zip(args.seeds, seed_runs):
            path = f"models/{v.replace(' ', '_')}-seed{seed}.pt"
            torch.save(run["model"].state_dict(), args.out / path)
            keep = {k: run[k] for k in ("losses", "val_curve", "seconds")}
            saved.setdefault(v, []).append({"seed": seed, "model": path, **keep})
    elapsed = time.perf_counter() - t0

    summary: dict[str, dict[str, Any]] = {}
    for v in args.variants:
        summary[v] = {k: [m[k] for m in metrics[v]] for k in KEYS}
        summary[v]["seconds_per_run"] = [r["seconds"] for r in runs[v]]
    print_summary(summary, survival, args.seeds, args.steps, args.test)
    print(f"\ntotal {elapsed:.0f} s; wrote {args.out}/results.json, curves.png, overlay.png")
    result = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "test": summary,
        "target_survival": survival,
        "seconds": elapsed,
        "runs": saved,
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
