"""Draw samples of the hard synthetic VOC set for the docs (docs/img/voc_hard_samples.png).

    python tools/plot_voc_samples.py [--out docs/img/voc_hard_samples.png] [--count 5]

Writes a few training images of ``examples/pspnet_voc.py --synthetic hard`` (seed 0, as the
aux-weight sweep of docs/evidence.md uses) into a temporary folder with the example's own
generator, then draws each image above its label, the labels in VOC's colours, with a legend
of the classes. Deterministic in the seed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from voc_data import (  # noqa: E402  (examples/ is not a package)
    HARD_CLASSES,
    IGNORE_INDEX,
    VOC_CLASSES,
    generate_synthetic_voc,
    voc_palette,
    voc_split,
)


def plot_samples(out: Path, count: int = 5, seed: int = 0) -> Path:
    """Generate ``count`` hard training images and draw them with their labels into ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    palette = np.array(voc_palette(), dtype=float).reshape(-1, 3) / 255
    with tempfile.TemporaryDirectory() as tmp:
        root = generate_synthetic_voc(tmp, num_train=count, num_val=1, seed=seed, difficulty="hard")
        images, labels = voc_split(root, "train")
        pairs = [
            (np.array(Image.open(i).convert("RGB")), np.array(Image.open(lab)))
            for i, lab in zip(images[:count], labels[:count])
        ]
    fig, axes = plt.subplots(2, count, figsize=(1.9 * count, 4.6), squeeze=False)
    for column, (image, label) in enumerate(pairs):
        axes[0, column].imshow(image)
        axes[1, column].imshow(palette[label], interpolation="nearest")
        axes[0, column].set_title(f"{image.shape[1]}x{image.shape[0]} px", fontsize=8)
    for row, name in enumerate(("image", "label")):
        axes[row, 0].set_ylabel(name, fontsize=10)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    classes = [0, *HARD_CLASSES, IGNORE_INDEX]
    names = {**dict(enumerate(VOC_CLASSES)), IGNORE_INDEX: "ignored (borders)"}
    handles = [Patch(facecolor=palette[c], edgecolor="grey", label=names[c]) for c in classes]
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.suptitle(
        f"--synthetic hard, seed {seed}: training images and their labels (VOC colours)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "voc_hard_samples.png")
    p.add_argument("--count", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(plot_samples(args.out, args.count, args.seed))


if __name__ == "__main__":
    main()
