"""Plot every weight schedule of `deepsup.schedules` for the docs (docs/assets/schedules/*.png).

python tools/plot_schedules.py [--out docs/assets/schedules]

Each schedule is evaluated through a real `DeepSupervision` wrapper: `sup.step()` advances the
progress and `sup.weights` is read back, so the plots show the weight the aux loss gets. A new
`Schedule` subclass in `deepsup.schedules` must get an entry in `EXAMPLES` (the script stops
otherwise), and tests/test_docs.py checks that docs/schedules.md shows its plot.
"""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from torch import nn

from deepsup import DeepSupervision, heads, schedules

TOTAL = 1000  # steps on the x axis
EXAMPLES: dict[str, tuple[schedules.Schedule, ...]] = {
    "Constant": (schedules.Constant(0.4),),
    "LinearDecay": (
        schedules.LinearDecay(0.4, total=800),
        schedules.LinearDecay(0.4, total=800, end=0.1),
    ),
    "CosineDecay": (
        schedules.CosineDecay(0.4, total=800),
        schedules.CosineDecay(0.4, total=800, end=0.1),
    ),
    "Cutoff": (schedules.Cutoff(0.4, at=600),),
    "Rotational": (schedules.Rotational(0, 4, 0.4, every=100),),
    "Gradual": (
        schedules.Gradual(0, 4, 0.4, total=1000),
        schedules.Gradual(2, 4, 0.3, total=1000),
    ),
}
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "assets" / "schedules"


def schedule_classes() -> list[str]:
    """Names of the concrete `Schedule` subclasses that `deepsup.schedules` exports."""
    return [
        name
        for name in schedules.__all__
        if inspect.isclass(cls := getattr(schedules, name))
        and issubclass(cls, schedules.Schedule)
        and not inspect.isabstract(cls)
    ]


def weights_over_training(schedule: schedules.Schedule, total: int = TOTAL) -> list[float]:
    """The weight a wrapper applies at progress 0 .. total, read from `sup.weights`."""
    sup = DeepSupervision(
        nn.Sequential(nn.Linear(2, 2), nn.ReLU()),
        {"0": schedule},
        head=heads.classification(2),
        criterion=nn.CrossEntropyLoss(),
    )
    values = []
    for _ in range(total + 1):
        values.append(sup.weights["0"])
        sup.step()
    return values


def plot_all(out: Path) -> list[Path]:
    """Write one PNG per schedule class into `out`; returns the paths."""
    missing = [name for name in schedule_classes() if name not in EXAMPLES]
    if missing:
        raise SystemExit(f"no example for {missing}: add them to EXAMPLES in {__file__}")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in schedule_classes():
        fig, ax = plt.subplots(figsize=(5.0, 2.4), dpi=100)
        for schedule in EXAMPLES[name]:
            ax.plot(weights_over_training(schedule), label=repr(schedule), linewidth=2)
        ax.set(xlabel="progress (sup.step() calls)", ylabel="weight", ylim=(-0.02, 0.45))
        ax.set_title(f"schedules.{name}", fontsize=11)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left", frameon=False)
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the PNGs")
    args = parser.parse_args()
    for path in plot_all(args.out):
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
