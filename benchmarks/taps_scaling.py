"""Taps scaling: the wrapper's own cost per tap, heads excluded, in eval and training forwards.

A stack of 16 identical blocks (Linear 64->64, Tanh) on a (8, 64) batch; the wrapper taps the
first k blocks with ``head=nn.Identity()`` and ``criterion=None`` (no loss), for k = 1, 2, 4, 8,
16. Every wrapper wraps its own copy of the model; the bare copy has no hooks.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence

import torch
from _common import Stats, emit, interleave, machine, paired_diff, parser, pick, setup, table
from torch import nn

from deepsup import DeepSupervision

TAP_COUNTS = (1, 2, 4, 8, 16)
BLOCKS = 16


def stack() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Sequential(nn.Linear(64, 64), nn.Tanh()) for _ in range(BLOCKS)))


def fit(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares line ``y = a + b k``; returns ``(a, b)``."""
    n = len(points)
    mk = sum(k for k, _ in points) / n
    my = sum(y for _, y in points) / n
    b = sum((k - mk) * (y - my) for k, y in points) / sum((k - mk) ** 2 for k, _ in points)
    return my - b * mk, b


def run_mode(
    mode: str, base: nn.Module, x: torch.Tensor, *, rounds: int, warmup: int, inner: int
) -> tuple[list[list[object]], tuple[float, float], Stats]:
    bare = copy.deepcopy(base).train(mode == "train")
    sups = {
        k: DeepSupervision(
            copy.deepcopy(base), [str(i) for i in range(k)], head=nn.Identity(), criterion=None
        ).train(mode == "train")
        for k in TAP_COUNTS
    }
    grad = mode == "train"

    def call(m: nn.Module):
        def f() -> None:
            with torch.set_grad_enabled(grad):
                m(x)

        return f

    variants = {"bare": call(bare)} | {f"k={k}": call(s) for k, s in sups.items()}
    times = interleave(variants, rounds=rounds, warmup=warmup, inner=inner)
    bare_stats = Stats.of(times["bare"])
    rows: list[list[object]] = []
    points = []
    for k in TAP_COUNTS:
        d = paired_diff(times, "bare", f"k={k}")
        points.append((float(k), d.median))
        rows.append(
            [
                mode,
                k,
                d.fmt(1e6, 1, " µs"),
                f"{d.median * 1e6 / k:.2f} µs",
                f"{Stats.of(times[f'k={k}']).median / bare_stats.median:.3f}",
            ]
        )
    return rows, fit(points), bare_stats


def identity_call_cost(x: torch.Tensor, n: int = 20000) -> float:
    ident = nn.Identity()
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            ident(x)
        samples.append((time.perf_counter() - t0) / n)
    return sorted(samples)[2]


def main(argv: Sequence[str] | None = None) -> str:
    p = parser(__doc__)
    p.add_argument("--inner", type=int, default=None, help="forwards per timed sample")
    args = p.parse_args(argv)
    if args.threads is None:  # ops this small run on one thread; a second only adds jitter
        args.threads = 1
    setup(args)
    started = time.perf_counter()
    rounds = pick(args, "rounds", 40, 4)
    warmup = pick(args, "warmup", 20, 5)
    inner = pick(args, "inner", 200, 20)
    base = stack()
    x = torch.randn(8, 64)
    rows: list[list[object]] = []
    fits = []
    for mode in ("eval", "train"):
        r, (a, b), bare = run_mode(mode, base, x, rounds=rounds, warmup=warmup, inner=inner)
        rows += r
        fits.append(
            f"- {mode}: bare forward {bare.fmt(1e6, 1, ' µs')}; least-squares fit over k: "
            f"**{b * 1e6:.2f} µs per tap** + {a * 1e6:.1f} µs fixed per forward, so a one-tap "
            f"wrapper (PSPNet's) costs about {(a + b) * 1e6:.0f} µs per {mode} forward of its "
            "own, whatever the model"
        )
    ident = identity_call_cost(x)
    headers = [
        "mode",
        "taps",
        "overhead per forward (median [IQR])",
        "overhead per tap",
        "time ratio vs bare",
    ]
    body = (
        f"{rounds} interleaved rounds of {inner} forwards each (bare and the five wrappers "
        f"rotated), after {warmup} warm-up forwards, {machine()['torch threads']} torch threads. "
        "Overhead = wrapper forward - bare forward, per round (paired). Eval: `torch.no_grad()`, "
        "the hooks return at once (window closed). Train: autograd on, the hooks capture, the "
        "wrapper checks each capture and runs the Identity head (one `nn.Identity` call costs "
        f"{ident * 1e6:.2f} µs here, included), `criterion=None`. A 16-block stack (Linear "
        "64->64 + Tanh on a 8x64 batch) keeps the model's own time small, so the overhead "
        "shows.\n\n" + table(headers, rows) + "\n\n" + "\n".join(fits)
    )
    return emit(args, "Taps scaling: overhead per tap", body, started=started)


if __name__ == "__main__":
    main()
