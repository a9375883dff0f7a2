"""Train PSPNet on Pascal VOC 2012 with deep supervision, and evaluate its mIoU without it.

The model is :class:`deepsup.models.PSPNet`, a plain segmentation network with no aux head of its
own. One line adds the reference's auxiliary loss: an FCN head on ``backbone.layer3`` (resized to
the label, cross-entropy, weight 0.4). Validation runs the model in eval mode, where the wrapper
*is* the model and no head runs. ``--aux-weight 0`` trains the plain model (the wrapper without
a tap: the ablation without deep supervision).

Runs out of the box: without ``--data-root`` it writes a small synthetic data set in the real VOC
layout to a cache folder and trains a configuration sized for a laptop CPU (a few minutes)::

    python examples/pspnet_voc.py

``--synthetic hard`` writes a harder set instead (confusable classes, small objects, clutter),
on which ablations have room to differ; ``examples/aux_weight_sweep.py`` runs this script over
aux weights and seeds (see docs/evidence.md).

The reference recipe on real VOC 2012 + SBD (10,582 training images), 8 GPUs::

    torchrun --nproc_per_node 8 examples/pspnet_voc.py --data-root /data/voc \\
        --train-list /data/voc/VOCdevkit/VOC2012/ImageSets/Segmentation/train_aug.txt \\
        --weights resnet50-imagenet.pth --amp --out runs/pspnet50_voc

Writes into ``--out``: ``metrics.csv`` (one row per epoch), ``results.json`` (final per-class IoU
and the configuration), ``curves.png`` (main and aux loss, val mIoU), ``overlays/*.png``
(predictions), ``last.pt`` (a checkpoint every epoch; ``--resume auto`` continues from it) and
``pspnet_final.pt`` (the plain model's ``state_dict``, loadable into ``PSPNet``).
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import math
import os
import random
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from pickle import UnpicklingError
from typing import Any
from zipfile import BadZipFile

import numpy as np
import torch
import torch.distributed as dist
from _shared import about, set_threads
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm
from voc_data import (
    DIFFICULTIES,
    IGNORE_INDEX,
    NUM_CLASSES,
    VOC_CLASSES,
    EvalTransform,
    TrainTransform,
    VOCSegDataset,
    colorize,
    confusion_matrix,
    generate_synthetic_voc,
    iou_per_class,
    read_list_file,
    voc_palette,
    voc_split,
)

import deepsup
from deepsup import DeepSupervision, Tap, heads
from deepsup.models import PSPNet
from deepsup.models.pspnet import WeightsError

# Defaults that depend on the data. The reference recipe (hszhao/semseg, voc2012_pspnet50.yaml)
# for real VOC; for the synthetic set, a configuration a 2-core CPU trains in a few minutes.
RECIPE = {
    "backbone": "resnet50",
    "crop_size": 473,
    "batch_size": 16,
    "epochs": 50,
    "lr": 0.01,
    "workers": 4,
}
SYNTHETIC = {
    "backbone": "resnet18",
    "crop_size": 97,
    "batch_size": 8,
    "epochs": 6,
    "lr": 0.01,
    "workers": 1,
}
# Speed of the synthetic configuration's model (resnet18, crop 97, float32) on a CPU with the
# cores free, by torch threads: training images per second and seconds per validation image.
# Measured on the project's 2-core AMD EPYC with torch 2.14.1 (docs/pspnet_voc.md); the start-up
# line scales them to the run's epochs, steps and images.
CPU_SPEED = {1: (6.5, 0.09), 2: (10.5, 0.07)}
QUICK_RUN = "--epochs 1 --steps-per-epoch 5 --val-images 10"
# The columns of metrics.csv (mIoU and pixel accuracy in percent, as the console prints them).
HISTORY_KEYS = ("epoch", "lr", "loss", "main_loss", "aux_loss", "val_miou_pct",
                "val_pixel_acc_pct", "imgs_per_s", "train_time_s", "val_time_s")  # fmt: skip


# --------------------------------------------------------------------------- configuration


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="PSPNet on Pascal VOC 2012 with deep supervision (deepsup).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = p.add_argument_group("data")
    data.add_argument(
        "--data-root", help="folder holding VOCdevkit/VOC2012; omit for synthetic data"
    )
    data.add_argument("--train-list", help="list file of training pairs, e.g. SBD's train_aug.txt")
    data.add_argument(
        "--cache-dir",
        default=os.path.join(_cache_home(), "deepsup", "voc-synthetic"),
        help="where the synthetic data set is written",
    )
    data.add_argument(
        "--synthetic",
        choices=DIFFICULTIES,
        default="easy",
        help="synthetic set: 'hard' has confusable classes, small objects and clutter",
    )
    data.add_argument(
        "--synthetic-train", type=_positive, default=400, help="synthetic training images"
    )
    data.add_argument(
        "--synthetic-val", type=_positive, default=60, help="synthetic validation images"
    )
    data.add_argument(
        "--val-images", type=_positive, help="evaluate on the first N val images only"
    )
    data.add_argument("--workers", type=_non_negative, help="DataLoader workers per process")
    train = p.add_argument_group(
        "training (defaults: the reference recipe with --data-root, "
        "a small CPU configuration without)"
    )
    train.add_argument("--backbone", choices=("resnet18", "resnet34", "resnet50", "resnet101"))
    train.add_argument("--weights", help="ImageNet state_dict of the torchvision ResNet backbone")
    train.add_argument("--epochs", type=_positive)
    train.add_argument("--steps-per-epoch", type=_positive, help="cap the iterations per epoch")
    train.add_argument("--batch-size", type=_positive, help="total over all processes")
    train.add_argument("--crop-size", type=_positive)
    train.add_argument("--lr", type=float, help="backbone lr; new layers and the aux head get 10x")
    train.add_argument(
        "--aux-weight",
        type=float,
        default=0.4,
        help="weight of the aux loss on backbone.layer3; 0 trains the plain model",
    )
    train.add_argument("--amp", action="store_true", help="autocast: fp16 on CUDA, bf16 on CPU")
    train.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    train.add_argument(
        "--threads",
        type=_positive,
        help="torch threads per process; default: OMP_NUM_THREADS, else the CPUs that other "
        "work leaves free at start (more threads than free cores slow training down)",
    )
    train.add_argument("--seed", type=int, default=0)
    out = p.add_argument_group("output")
    out.add_argument("--out", default="runs/pspnet_voc", help="output folder")
    out.add_argument("--resume", help="checkpoint to continue from, or 'auto' for OUT/last.pt")
    out.add_argument("--overlays", type=_non_negative, default=4, help="prediction images to save")
    args = p.parse_args(argv)
    defaults = RECIPE if args.data_root else SYNTHETIC
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not math.isfinite(args.aux_weight) or args.aux_weight < 0:
        p.error(f"--aux-weight must be a finite number >= 0 (got {args.aux_weight})")
    # Everything that would otherwise fail after an epoch of training fails here, at once.
    for problem in (_device_problem(args.device), _missing_dependency(), _out_problem(args.out)):
        if problem:
            p.error(problem)
    if args.resume and args.resume != "auto" and not Path(args.resume).is_file():
        p.error(f"--resume {args.resume!r}: no such file")
    if args.weights and not Path(args.weights).is_file():
        p.error(f"--weights {args.weights!r}: no such file")
    return args


def expected_duration(args: argparse.Namespace, threads: int, world: int) -> str:
    """One line: the run's expected wall time where it was measured (CPU_SPEED), a quick run."""
    measured = (
        args.data_root is None
        and torch.device(args.device).type == "cpu"
        and (args.backbone, args.crop_size) == (SYNTHETIC["backbone"], SYNTHETIC["crop_size"])
        and not args.amp
        and world == 1
    )
    if not measured:
        return (
            "expected duration: not measured for this configuration (the progress bar shows "
            f"images/s and the time left); a quick check: {QUICK_RUN}"
        )
    steps = args.synthetic_train // args.batch_size
    if args.steps_per_epoch is not None:
        steps = min(steps, args.steps_per_epoch)
    val = min(args.synthetic_val, args.val_images or args.synthetic_val)
    images_per_s, val_s = CPU_SPEED[min(threads, max(CPU_SPEED))]
    seconds = args.epochs * (steps * args.batch_size / images_per_s + val * val_s)
    return (
        f"expected: about {about(seconds)} on {threads} thread(s) with the cores free, several "
        f"times longer when other work shares them; a quick check: {QUICK_RUN}"
    )


def _positive(text: str) -> int:
    value = _non_negative(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be a positive int (got 0)")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int (got {text!r})") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an int >= 0 (got {value})")
    return value


def _device_problem(device: str) -> str | None:
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        return f"--device {device!r} is not a device ({err})"
    if dev.type == "cuda" and not torch.cuda.is_available():
        return f"--device {device!r}: no CUDA GPU is available here; use --device cpu"
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        return f"--device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here"
    return None


def _missing_dependency() -> str | None:
    """The reports need matplotlib (curves.png) and Pillow (overlays): check before training."""
    for module, package in (("matplotlib", "matplotlib"), ("PIL", "pillow")):
        try:
            importlib.import_module(module)
        except ImportError:
            return (
                f"{package} is not installed, but the run writes its figures with it; "
                f"pip install {package} (or pip install 'deepsup[examples]')"
            )
    return None


def _out_problem(out: str) -> str | None:
    """``--out`` must be a folder this process can create and write into (nothing is created)."""
    path = Path(out).absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"--out {out!r} is not a writable folder ({str(existing)!r} is a file)"
    if existing != path:
        if os.access(existing, os.W_OK | os.X_OK):
            return None
        return f"--out {out!r} is not a writable folder (cannot create it in {str(existing)!r})"
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        return f"--out {out!r} is not a writable folder ({err.strerror or err})"
    return None


def _usage_error(message: str) -> SystemExit:
    """An error in the user's input found after parsing: one line on stderr, exit code 2."""
    print(f"{Path(sys.argv[0]).name or 'pspnet_voc.py'}: error: {message}", file=sys.stderr)
    return SystemExit(2)


def _cache_home() -> str:
    return os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")


# --------------------------------------------------------------------------- processes


class Dist:
    """Rank, world size and device of this process; ``torchrun`` sets the environment."""

    def __init__(self, device: str) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(device)
        if self.device.type == "cuda":
            self.device = torch.device(
                "cuda", local_rank if self.world > 1 else self.device.index or 0
            )
            torch.cuda.set_device(self.device)
        if self.world > 1:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over the processes (in place)."""
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.world > 1:
            dist.barrier()
            dist.destroy_process_group()


# --------------------------------------------------------------------------- data


def prepare_synthetic(args: argparse.Namespace, *, write: bool = True) -> Path:
    """The synthetic set's folder in ``--cache-dir`` (one per size, seed and difficulty).

    With ``write`` it is generated unless already there; run that in one process only (a
    sweep does it before starting its runs), since a rewrite replaces the folder.
    """
    name = f"n{args.synthetic_train}-{args.synthetic_val}-seed{args.seed}"
    if args.synthetic != "easy":
        name += f"-{args.synthetic}"
    root = Path(args.cache_dir) / name
    if write:
        generate_synthetic_voc(
            root,
            num_train=args.synthetic_train,
            num_val=args.synthetic_val,
            seed=args.seed,
            difficulty=args.synthetic,
        )
    return root


def build_datasets(args: argparse.Namespace, env: Dist) -> tuple[VOCSegDataset, VOCSegDataset]:
    data_root = args.data_root
    if data_root is None:
        data_root = prepare_synthetic(args, write=env.main)
        env.barrier()
    if args.train_list:
        images, labels = read_list_file(args.train_list, data_root)
        source = repr(str(args.train_list))
    else:
        images, labels = voc_split(data_root, "train")
        source = "ImageSets/Segmentation/train.txt"
    train = VOCSegDataset(images, labels, TrainTransform(args.crop_size), source=source)
    images, labels = voc_split(data_root, "val")
    if args.val_images is not None:
        images, labels = images[: args.val_images], labels[: args.val_images]
    val = VOCSegDataset(images, labels, EvalTransform(), source="ImageSets/Segmentation/val.txt")
    return train, val


def build_train_loader(
    dataset: VOCSegDataset, args: argparse.Namespace, env: Dist, generator: torch.Generator
) -> DataLoader:
    if args.batch_size % env.world:
        raise ValueError(
            f"--batch-size {args.batch_size} must be divisible by {env.world} processes"
        )
    per_process = args.batch_size // env.world
    sync_bn = env.device.type == "cuda" and env.world > 1
    if per_process < 2 and not sync_bn:
        raise ValueError(
            f"--batch-size {args.batch_size} gives {per_process} image per process; PSPNet's "
            "pyramid pooling (a 1x1 bin, then BatchNorm) needs at least 2 without SyncBatchNorm"
        )
    sampler = DistributedSampler(dataset, seed=args.seed, drop_last=True) if env.world > 1 else None
    return DataLoader(
        dataset,
        batch_size=per_process,
        shuffle=sampler is None,
        sampler=sampler,
        generator=generator,  # re-seeded every epoch: the order and worker seeds survive a resume
        num_workers=args.workers,
        pin_memory=env.device.type == "cuda",
        drop_last=True,
        persistent_workers=False,
    )


# --------------------------------------------------------------------------- model


def build_model(args: argparse.Namespace, env: Dist) -> tuple[nn.Module, nn.Module]:
    """The training module (wrapped in DDP when distributed) and the bare one (for eval, saving)."""
    try:
        model = PSPNet(NUM_CLASSES, args.backbone, weights=args.weights)
    except WeightsError as err:
        raise _usage_error(f"--weights: {err}") from None
    # The whole of deep supervision: PSPNet's aux head on layer3, its loss resized to the label
    # (--aux-weight 0: no tap, the plain model).
    net: nn.Module = DeepSupervision(
        model,
        taps={"backbone.layer3": Tap(weight=args.aux_weight)} if args.aux_weight > 0 else {},
        head=heads.seg(NUM_CLASSES),
        criterion=nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX),
        resize="prediction",
        align_corners=True,
    )
    if env.device.type == "cuda" and env.world > 1:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    net.to(env.device)
    train_net = net
    if env.world > 1:  # DDP wraps the wrapper, so the heads' gradients are averaged too
        train_net = DistributedDataParallel(
            net, device_ids=[env.device] if env.device.type == "cuda" else None
        )
    return train_net, net


def build_optimizer(
    net: nn.Module, args: argparse.Namespace, total_iters: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """SGD with the new layers (pyramid, classifier, aux head) at 10x, poly decay per iteration."""
    options = {"momentum": 0.9, "weight_decay": 1e-4}
    groups = deepsup.param_groups(
        net, lr=args.lr, head_lr_mult=10.0, new_modules=PSPNet.new_modules, **options
    )
    optimizer = torch.optim.SGD(groups, lr=args.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: (1 - min(it, total_iters) / total_iters) ** 0.9
    )
    return optimizer, scheduler


def autocast(args: argparse.Namespace, device: torch.device) -> AbstractContextManager[Any]:
    if not args.amp:
        return nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


# --------------------------------------------------------------------------- train and evaluate


def train_one_epoch(
    train_net: nn.Module,
    loader: DataLoader,
    steps: int,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    scaler: torch.amp.GradScaler,
    args: argparse.Namespace,
    env: Dist,
    epoch: int,
) -> dict[str, float]:
    criterion = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
    bare = train_net.module if isinstance(train_net, DistributedDataParallel) else train_net
    has_aux = bool(bare.taps)  # --aux-weight 0: no tap
    train_net.train()
    sums = torch.zeros(4, dtype=torch.float64)  # loss, main loss, raw aux loss, images
    bar = tqdm(
        total=steps,
        desc=f"epoch {epoch + 1}/{args.epochs}",
        disable=not env.main,
        dynamic_ncols=True,
        leave=True,
    )
    start = tick = time.perf_counter()
    speed = 0.0
    for step, (images, labels) in enumerate(loader):
        if step == steps:
            break
        images = images.to(env.device, non_blocking=True)
        labels = labels.to(env.device, non_blocking=True)
        with autocast(args, env.device):
            output, aux = train_net(images, target=labels)  # aux: {tap: weighted loss}
            main_loss = criterion(output.float(), labels)
        aux_loss = sum(aux.values()) if aux else torch.zeros((), device=env.device)
        aux_raw = sum(aux.raw.values()).detach() if aux else torch.zeros(())
        loss = main_loss + aux_loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch + 1}, step {step + 1}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()  # poly decay, per iteration
        bare.step()  # advances the aux weight's schedule (constant here; kept in checkpoints)

        n = images.shape[0]
        values = (loss.item(), main_loss.item(), aux_raw.item(), n)
        sums += torch.tensor([v * n for v in values[:3]] + [n], dtype=torch.float64)
        now = time.perf_counter()
        rate = n * env.world / max(now - tick, 1e-9)
        speed = rate if step == 0 else 0.9 * speed + 0.1 * rate
        tick = now
        bar.set_postfix(
            loss=f"{values[0]:.3f}",
            aux=f"{values[2]:.3f}",
            lr=f"{scheduler.get_last_lr()[0]:.2e}",
            imgs_s=f"{speed:.1f}",
        )
        bar.update()
    bar.close()
    elapsed = time.perf_counter() - start
    sums = env.sum(sums.to(env.device)).cpu()
    images_seen = max(sums[3].item(), 1)
    return {
        "loss": sums[0].item() / images_seen,
        "main_loss": sums[1].item() / images_seen,
        "aux_loss": sums[2].item() / images_seen if has_aux else float("nan"),
        "imgs_per_s": images_seen / elapsed,
        "train_time_s": elapsed,
    }


@torch.no_grad()
def evaluate(
    net: nn.Module, dataset: VOCSegDataset, args: argparse.Namespace, env: Dist
) -> torch.Tensor:
    """Whole-image evaluation; returns the confusion matrix summed over all processes.

    ``net.eval()`` makes a DeepSupervision wrapper call the bare model: the aux head never runs.
    """
    net.eval()
    shard = Subset(dataset, list(range(env.rank, len(dataset), env.world)))
    loader = DataLoader(shard, batch_size=1, num_workers=min(args.workers, 2))
    confusion = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64, device=env.device)
    for image, label in tqdm(
        loader, desc="val", disable=not env.main, leave=False, dynamic_ncols=True
    ):
        with autocast(args, env.device):
            logits = net(image.to(env.device))
        pred = logits.argmax(1)
        confusion += confusion_matrix(pred, label.to(env.device), NUM_CLASSES, IGNORE_INDEX)
    return env.sum(confusion).cpu()


# --------------------------------------------------------------------------- checkpoints


def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors, ints and lists: ``torch.load(weights_only=True)`` reads it."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically: a temporary file in the same folder, then a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        os.replace(tmp, path)  # never leaves a half-written checkpoint
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_CHECKPOINT_KEYS = ("epoch", "model", "optimizer", "scheduler", "scaler", "rng", "history")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint this script wrote, or a one-line error naming the file (exit code 2)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (
        OSError,
        RuntimeError,
        EOFError,
        ValueError,
        BadZipFile,
        UnpicklingError,
    ) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise _usage_error(
            f"cannot read checkpoint {str(path)!r}: truncated or not a torch.save file ({first})"
        ) from None
    except Exception as err:  # e.g. pickle errors of foreign objects under weights_only
        raise _usage_error(
            f"cannot read checkpoint {str(path)!r} ({type(err).__name__}); "
            "is it a last.pt written by this script?"
        ) from None
    missing = [k for k in _CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise _usage_error(
            f"checkpoint {str(path)!r} is not a last.pt written by this script (no "
            f"{', '.join(missing)}); pass --resume with one, or omit it"
        )
    return ckpt  # type: ignore[no-any-return]


def load_checkpoint(
    path: str | Path,
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    scaler: torch.amp.GradScaler,
    args: argparse.Namespace,
    env: Dist,
) -> tuple[int, list[dict[str, float]]]:
    """Restore everything ``main`` saved; returns the next epoch and the metrics so far."""
    ckpt = read_checkpoint(path)
    if ckpt.get("aux_weight") != args.aux_weight or ckpt.get("backbone") != args.backbone:
        raise _usage_error(
            f"checkpoint {str(path)!r} was trained with --backbone {ckpt['backbone']} "
            f"--aux-weight {ckpt['aux_weight']}; resume with the same flags"
        )
    try:
        net.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise _usage_error(
            f"checkpoint {str(path)!r} does not fit this model: {str(err).splitlines()[0]}"
        ) from None
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    states = ckpt["rng"]
    set_rng_state(states[env.rank] if len(states) == env.world else states[0])
    if env.main:
        print(f"resumed from {path} after epoch {ckpt['epoch'] + 1}", flush=True)
    return ckpt["epoch"] + 1, ckpt["history"]


# --------------------------------------------------------------------------- reports


def write_metrics(history: list[dict[str, float]], out: Path) -> None:
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


def plot_curves(history: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [h["main_loss"] for h in history], "o-", label="main loss")
    if not all(math.isnan(h["aux_loss"]) for h in history):
        left.plot(epochs, [h["aux_loss"] for h in history], "s--", label="aux loss (unweighted)")
    left.set(xlabel="epoch", ylabel="cross-entropy", title="training loss")
    left.legend()
    right.plot(epochs, [h["val_miou_pct"] for h in history], "o-", color="tab:green")
    right.set(xlabel="epoch", ylabel="mIoU (%)", title="validation mIoU (no aux head)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@torch.no_grad()
def save_overlays(
    net: nn.Module,
    dataset: VOCSegDataset,
    count: int,
    out: Path,
    args: argparse.Namespace,
    device: torch.device,
) -> None:
    """Image | ground truth | prediction; object classes in VOC colours over the image."""
    from PIL import Image

    net.eval()
    out.mkdir(exist_ok=True)
    for index in range(min(count, len(dataset))):
        image, label = dataset.load(index)
        x, _ = EvalTransform()(image, label)
        with autocast(args, device):
            pred = net(x[None].to(device)).argmax(1)[0].cpu().numpy()
        panels = [image]
        masks = (np.array(label), pred)
        for mask in masks:
            shown = Image.fromarray(((mask != 0) * 255).astype(np.uint8))
            panels.append(Image.composite(Image.blend(image, colorize(mask), 0.7), image, shown))
        gap = 4
        canvas = Image.new("RGB", (3 * image.width + 2 * gap, image.height), "white")
        for i, panel in enumerate(panels):
            canvas.paste(panel, (i * (image.width + gap), 0))
        if canvas.height < 240:  # small (synthetic) images: enlarge for viewing
            scale = 240 / canvas.height
            size = (round(canvas.width * scale), 240)
            canvas = canvas.resize(size, Image.Resampling.NEAREST)
        titles = ("image", "ground truth", "prediction (no aux head)")
        canvas = annotate(canvas, titles, legend_entries(masks))
        canvas.save(out / f"{Path(dataset.images[index]).stem}.png")


def legend_entries(masks: Sequence[np.ndarray]) -> list[tuple[str, tuple[int, int, int]]]:
    """``(name, VOC colour)`` of every class the masks show, background left out."""
    palette = voc_palette()
    names = {**dict(enumerate(VOC_CLASSES)), IGNORE_INDEX: "ignored (object borders)"}
    present = sorted(set(np.unique(np.concatenate([m.ravel() for m in masks])).tolist()) - {0})
    return [(names[c], (palette[3 * c], palette[3 * c + 1], palette[3 * c + 2])) for c in present]


def annotate(
    canvas: Any, titles: Sequence[str], entries: Sequence[tuple[str, tuple[int, int, int]]]
) -> Any:
    """The panels with a title above each and a colour legend below (rows as the width needs)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=14)
    line, swatch = 22, 14
    measure = ImageDraw.Draw(canvas)
    rows: list[list[tuple[str, tuple[int, int, int], float]]] = [[]]
    x = 4.0
    for name, colour in entries:
        width = swatch + 4 + measure.textlength(name, font=font) + 14
        if x + width > canvas.width and rows[-1]:
            rows.append([])
            x = 4.0
        rows[-1].append((name, colour, x))
        x += width
    out = Image.new("RGB", (canvas.width, canvas.height + line * (1 + len(rows))), "white")
    out.paste(canvas, (0, line))
    draw = ImageDraw.Draw(out)
    panel = canvas.width / len(titles)
    for i, title in enumerate(titles):
        draw.text(((i + 0.5) * panel, line / 2), title, fill="black", font=font, anchor="mm")
    for r, row in enumerate(rows):
        y = line + canvas.height + r * line + line / 2
        for name, colour, x in row:
            box = (x, y - swatch / 2, x + swatch, y + swatch / 2)
            draw.rectangle(box, fill=colour, outline="black")
            draw.text((x + swatch + 4, y), name, fill="black", font=font, anchor="lm")
    return out


def format_summary(iou: torch.Tensor, history: list[dict[str, float]], info: dict[str, Any]) -> str:
    lines = ["", f"{'class':<14}{'IoU %':>8}", "-" * 22]
    for name, value in zip(VOC_CLASSES, iou.tolist(), strict=True):
        lines.append(f"{name:<14}{'-' if math.isnan(value) else f'{100 * value:.2f}':>8}")
    present = int((~iou.isnan()).sum())
    last = history[-1]
    lines += [
        "-" * 22,
        f"{'mIoU':<14}{last['val_miou_pct']:>8.2f}   (mean over the {present} classes present)",
        f"{'pixel acc.':<14}{last['val_pixel_acc_pct']:>8.2f}",
        "",
        f"best mIoU {max(h['val_miou_pct'] for h in history):.2f} | epochs {info['epochs']} | "
        f"iterations {info['iterations']} | {info['imgs_per_s']:.1f} imgs/s | "
        f"wall time {info['wall_time_s']:.0f} s",
        f"outputs in {info['out']}",
    ]
    return "\n".join(lines)


def _no_nan(obj: Any) -> Any:
    """NaN (an absent class, no aux loss) as JSON null."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _no_nan(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_no_nan(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    wall_start = time.perf_counter()
    threads_line = set_threads(args.threads)
    env = Dist(args.device)
    out = Path(args.out)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)  # the same initial model on every rank (DDP also broadcasts it)
    if env.main:
        out.mkdir(parents=True, exist_ok=True)
        config = dict(vars(args))
        config.update(world_size=env.world, data="real VOC" if args.data_root else "synthetic VOC")
        print("pspnet_voc: " + ", ".join(f"{k}={v}" for k, v in config.items()), flush=True)
        print(threads_line, flush=True)
        print(expected_duration(args, torch.get_num_threads(), env.world), flush=True)
        if args.data_root and not args.weights:
            warnings.warn(
                "no --weights: the backbone starts from scratch, while the reference "
                "starts from ImageNet weights; expect a much lower mIoU",
                stacklevel=1,
            )

    train_set, val_set = build_datasets(args, env)
    train_net, net = build_model(args, env)
    generator = torch.Generator()
    loader = build_train_loader(train_set, args, env, generator)
    steps = len(loader) if args.steps_per_epoch is None else min(len(loader), args.steps_per_epoch)
    if steps == 0:
        raise ValueError(f"{len(train_set)} training images give no batch of {args.batch_size}")
    optimizer, scheduler = build_optimizer(net, args, total_iters=args.epochs * steps)
    scaler = torch.amp.GradScaler(env.device.type, enabled=args.amp and env.device.type == "cuda")
    torch.manual_seed(args.seed + env.rank)  # augmentation differs per rank

    start_epoch, history, confusion = 0, [], None
    resume = out / "last.pt" if args.resume == "auto" else args.resume
    if resume and (args.resume != "auto" or Path(resume).is_file()):
        start_epoch, history = load_checkpoint(resume, net, optimizer, scheduler, scaler, args, env)

    for epoch in range(start_epoch, args.epochs):
        generator.manual_seed(args.seed + epoch)
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(epoch)
        stats = train_one_epoch(
            train_net, loader, steps, optimizer, scheduler, scaler, args, env, epoch
        )
        tick = time.perf_counter()
        confusion = evaluate(net, val_set, args, env)
        iou = iou_per_class(confusion)
        pixel_acc = float(confusion.diagonal().sum() / confusion.sum().clamp(min=1))
        stats.update(
            val_time_s=time.perf_counter() - tick,
            epoch=epoch + 1,
            lr=scheduler.get_last_lr()[0],
            val_miou_pct=100 * float(iou.nanmean()),
            val_pixel_acc_pct=100 * pixel_acc,
        )
        history.append({key: stats[key] for key in HISTORY_KEYS})
        rng = env.gather(rng_state())
        if env.main:
            print(
                f"epoch {epoch + 1}: loss {stats['loss']:.4f}, main {stats['main_loss']:.4f}, "
                f"aux {stats['aux_loss']:.4f}, val mIoU {stats['val_miou_pct']:.2f}",
                flush=True,
            )
            checkpoint = {
                "epoch": epoch,
                "model": net.state_dict(),  # model, aux head, weight schedule progress
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": rng,  # one entry per process
                "history": history,
                "backbone": args.backbone,
                "aux_weight": args.aux_weight,
            }
            save_checkpoint(out / "last.pt", checkpoint)
            write_metrics(history, out)
            plot_curves(history, out / "curves.png")

    if confusion is None:  # resumed a finished run: evaluate once more
        confusion = evaluate(net, val_set, args, env)
    result: dict[str, Any] = {"history": history}
    if env.main and history:
        iou = iou_per_class(confusion)
        save_checkpoint(out / "pspnet_final.pt", deepsup.model_state_dict(net.state_dict()))
        save_overlays(net, val_set, args.overlays, out / "overlays", args, env.device)
        info = {
            "epochs": args.epochs,
            "iterations": scheduler.last_epoch,
            "out": str(out),
            "imgs_per_s": history[-1]["imgs_per_s"],
            "wall_time_s": time.perf_counter() - wall_start,
        }
        result.update(
            info,
            miou_pct=history[-1]["val_miou_pct"],
            iou_pct=dict(zip(VOC_CLASSES, (100 * iou).tolist(), strict=True)),
        )
        report = {**result, "config": vars(args)}
        (out / "results.json").write_text(json.dumps(_no_nan(report), indent=2))
        print(format_summary(iou, history, info), flush=True)
    env.close()
    return result


if __name__ == "__main__":
    main()
