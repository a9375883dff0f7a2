"""Does the aux loss help, and how much? Sweep ``pspnet_voc.py`` over aux weights and seeds.

Runs ``examples/pspnet_voc.py`` once per (aux weight, seed), several runs at once, and reports the
final validation mIoU per weight as mean +- std over the seeds, and how fast each run got there
(the first epoch at which it reached 90% of its final mIoU). Every flag this script does not know
is passed through to ``pspnet_voc.py``. A run whose ``results.json`` exists is not rerun, and an
interrupted run continues from its ``last.pt``, so the sweep can be stopped and restarted::

    python examples/aux_weight_sweep.py --out runs/sweep -- --synthetic hard \\
        --synthetic-train 128 --synthetic-val 40 --epochs 6

Writes into ``--out``: ``w{weight}-s{seed}/`` (each run's own outputs and ``log.txt``),
``sweep.csv`` (one row per run), ``sweep.md`` (the table, beside the PSPNet paper's ablation)
and ``sweep.png`` (mIoU against weight with error bars; mean learning curves per weight).

With one seed per weight, differences of a point or two are noise: compare the spread.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import mean, stdev
from typing import Any

from _shared import epochs_to, format_mean_std, free_cpus
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# PSPNet (Zhao et al., CVPR 2017), Table 2: ResNet-50 on ADE20K val, aux weight against mIoU (%).
PAPER_ADE20K = {0.0: 35.82, 0.3: 37.01, 0.4: 37.23, 0.6: 37.09, 0.9: 36.99}
FIELDS = ("weight", "seed", "final_miou", "best_miou", "epoch_90", "epochs", "wall_time_s", "curve")


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        description="Aux-weight ablation of examples/pspnet_voc.py: weights x seeds.",
        epilog="Other flags (after --) go to pspnet_voc.py unchanged.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--weights", type=float, nargs="+", default=[0.0, 0.2, 0.4, 0.6, 1.0], help="aux weights"
    )
    p.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (data, init, batch order)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument(
        "--jobs", type=int, help="runs at once; default: the CPUs free at start / --threads"
    )
    p.add_argument("--out", default="runs/aux_weight_sweep", help="output folder")
    args, rest = p.parse_known_args(argv)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    for flag in ("--aux-weight", "--seed", "--out", "--resume"):
        if any(r == flag or r.startswith(flag + "=") for r in rest):
            p.error(f"{flag} is set by the sweep for each run; remove it")
    if any(w < 0 for w in args.weights):
        p.error(f"--weights must be >= 0 (got {args.weights})")
    if args.threads < 1:
        p.error(f"--threads must be >= 1 (got {args.threads})")
    if args.jobs is None:  # no more threads in all than the cores other work leaves free
        args.jobs = max(1, free_cpus() // args.threads)
    return args, rest


def run_dir(out: Path, weight: float, seed: int) -> Path:
    return out / f"w{weight:g}-s{seed}"


def prepare_data(rest: list[str], seeds: Sequence[int]) -> None:
    """Write each seed's synthetic set once, before any run starts (runs then only read it)."""
    import pspnet_voc

    for seed in seeds:
        args = pspnet_voc.parse_args([*rest, "--seed", str(seed)])
        if args.data_root is None:
            pspnet_voc.prepare_synthetic(args)


def launch(weight: float, seed: int, rest: list[str], out: Path, threads: int) -> int:
    """One pspnet_voc.py run in a subprocess (continuing its last.pt); returns its exit status."""
    folder = run_dir(out, weight, seed)
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(HERE / "pspnet_voc.py"), *rest]
    command += ["--aux-weight", f"{weight:g}", "--seed", str(seed), "--out", str(folder)]
    command += ["--resume", "auto"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with open(folder / "log.txt", "a") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode


def collect(out: Path, weights: Sequence[float], seeds: Sequence[int]) -> list[dict[str, Any]]:
    """One row per finished run, from its metrics.csv and results.json."""
    rows = []
    for weight in weights:
        for seed in seeds:
            folder = run_dir(out, weight, seed)
            if not (folder / "results.json").is_file():
                continue
            result = json.loads((folder / "results.json").read_text())
            with open(folder / "metrics.csv") as f:
                curve = [float(r["val_miou_pct"]) for r in csv.DictReader(f)]
            rows.append(
                {
                    "weight": weight,
                    "seed": seed,
                    "final_miou": curve[-1],
                    "best_miou": max(curve),
                    "epoch_90": epochs_to(curve, 0.9 * curve[-1]),
                    "epochs": len(curve),
                    "wall_time_s": round(result["wall_time_s"], 1),
                    "curve": " ".join(f"{v:.2f}" for v in curve),
                }
            )
    return rows


def _mean_std(values: Sequence[float]) -> str:
    """A table cell; a single run shows ``± nan`` (no spread measured)."""
    return format_mean_std(values, single_std=math.nan)


def summarize(rows: Sequence[dict[str, Any]]) -> str:
    """The Markdown table: per weight, mean ± std (sample std over seeds) and paired gains.

    The gain is each seed's mIoU minus the same seed's mIoU without aux loss (weight 0), which
    removes the spread that comes from the data and the initialisation (both set by the seed).

    >>> rows = [{"weight": w, "seed": s, "final_miou": 10 + w + s, "epoch_90": 3}
    ...         for w in (0.0, 0.4) for s in (0, 1)]
    >>> print(summarize(rows).splitlines()[3])
    | 0.4 | 2 | 10.90 ± 0.71 | 0.40 ± 0.00 | 3.00 ± 0.00 | 37.23 |
    """
    weights = sorted({r["weight"] for r in rows})
    base = {r["seed"]: r["final_miou"] for r in rows if r["weight"] == 0}
    lines = [
        "| aux weight | runs | final mIoU (%) | gain vs. no aux (paired) | epoch to 90% "
        "| PSPNet paper, ADE20K (%) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for weight in weights:
        runs = [r for r in rows if r["weight"] == weight]
        gains = [r["final_miou"] - base[r["seed"]] for r in runs if r["seed"] in base]
        paper = PAPER_ADE20K.get(weight)
        lines.append(
            f"| {weight:g} | {len(runs)} | {_mean_std([r['final_miou'] for r in runs])} "
            f"| {_mean_std(gains) if weight != 0 else '-'} "
            f"| {_mean_std([r['epoch_90'] for r in runs])} "
            f"| {'-' if paper is None else f'{paper:.2f}'} |"
        )
    return "\n".join(lines)


def write_report(rows: list[dict[str, Any]], out: Path, command: str, wall_s: float) -> str:
    with open(out / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    paper = ", ".join(f"{w:g}: {v:.2f}" for w, v in PAPER_ADE20K.items())
    text = "\n".join(
        [
            "# Aux-weight sweep",
            "",
            f"`{command}`",
            "",
            f"{len(rows)} runs; sweep wall time {wall_s / 60:.1f} min. Final = last epoch's val "
            "mIoU; ± is the sample std over seeds. Epoch to 90%: the first epoch that reached 90% "
            "of the run's final mIoU.",
            "",
            summarize(rows),
            "",
            f"PSPNet paper (Zhao et al. 2017, Table 2; ResNet-50, ADE20K val, mIoU %): {paper}.",
            "",
        ]
    )
    (out / "sweep.md").write_text(text)
    plot(rows, out / "sweep.png")
    return text


def plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    weights = sorted({r["weight"] for r in rows})
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    means, stds = [], []
    for w in weights:
        values = [r["final_miou"] for r in rows if r["weight"] == w]
        means.append(mean(values))
        stds.append(stdev(values) if len(values) > 1 else 0.0)
        left.plot([w] * len(values), values, ".", color="grey", alpha=0.6)
    left.errorbar(weights, means, yerr=stds, fmt="o-", capsize=4, label="mean ± std over seeds")
    left.set(xlabel="aux weight", ylabel="final val mIoU (%)", title="mIoU against aux weight")
    left.legend()
    colours = plt.get_cmap("viridis")
    for i, w in enumerate(weights):
        curves = [[float(v) for v in r["curve"].split()] for r in rows if r["weight"] == w]
        length = min(len(c) for c in curves)
        avg = [mean(c[e] for c in curves) for e in range(length)]
        right.plot(range(1, length + 1), avg, "o-", ms=3, label=f"weight {w:g}",
                   color=colours(i / max(1, len(weights) - 1)))  # fmt: skip
    right.set(xlabel="epoch", ylabel="val mIoU (%)", title="learning curves (mean over seeds)")
    right.legend()
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> str:
    args, rest = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    prepare_data(rest, args.seeds)
    todo = [
        (w, s)
        for s in args.seeds
        for w in args.weights
        if not (run_dir(out, w, s) / "results.json").is_file()
    ]
    total = len(args.weights) * len(args.seeds)
    print(f"aux_weight_sweep: {total} runs, {total - len(todo)} done, {args.jobs} at once, "
          f"{args.threads} thread(s) each; pspnet_voc.py {' '.join(rest)}", flush=True)  # fmt: skip
    print(f"expected: {len(todo)} runs / {args.jobs} at once x one pspnet_voc.py run each (each "
          "run's log.txt starts with its own estimate); the sweep of docs/evidence.md took 60 "
          "min at load 5-17. A quick sweep: --weights 0 0.4 --seeds 0 -- --epochs 1",
          flush=True)  # fmt: skip
    failed = []
    with ThreadPoolExecutor(args.jobs) as pool, tqdm(total=len(todo), desc="runs") as bar:
        futures = {pool.submit(launch, w, s, rest, out, args.threads): (w, s) for w, s in todo}
        for future, (w, s) in futures.items():
            if future.result() != 0:
                failed.append(f"{run_dir(out, w, s)}/log.txt")
            bar.update()
    rows = collect(out, args.weights, args.seeds)
    if not rows:
        raise SystemExit(f"no run finished; see {', '.join(failed)}")
    command = "python examples/aux_weight_sweep.py " + " ".join(argv or sys.argv[1:])
    text = write_report(rows, out, command, time.perf_counter() - start)
    print("\n" + text)
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}", flush=True)
    print(f"outputs in {out}: sweep.csv, sweep.md, sweep.png", flush=True)
    return text


if __name__ == "__main__":
    main()
