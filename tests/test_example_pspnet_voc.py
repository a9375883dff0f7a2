"""examples/pspnet_voc.py and voc_data.py: data layout, transforms, metric, training runs."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_imports_tree, tree_env
from PIL import Image

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import pspnet_voc  # noqa: E402
import voc_data  # noqa: E402

SYNTHETIC = {"num_train": 8, "num_val": 2}
TINY = [
    "--synthetic-train", "8", "--synthetic-val", "2", "--backbone", "resnet18", "--crop-size", "33",
    "--batch-size", "2", "--steps-per-epoch", "2", "--workers", "0", "--overlays", "1",
    "--device", "cpu",
]  # fmt: skip


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder holding the synthetic set that the TINY runs use (generated once)."""
    cache = tmp_path_factory.mktemp("voc-cache")
    voc_data.generate_synthetic_voc(cache / "n8-2-seed0", **SYNTHETIC, seed=0)
    return cache


@pytest.fixture
def data_root(cache_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the synthetic set, for tests that break it."""
    return Path(shutil.copytree(cache_dir / "n8-2-seed0", tmp_path / "data"))


def voc(root: Path) -> Path:
    return root / "VOCdevkit" / "VOC2012"


# --------------------------------------------------------------------------- synthetic data


def test_synthetic_data_has_the_real_voc_layout(cache_dir: Path) -> None:
    from torchvision.datasets import VOCSegmentation

    root = cache_dir / "n8-2-seed0"
    for split, count in (("train", 8), ("val", 2), ("trainval", 10)):
        dataset = VOCSegmentation(str(root), year="2012", image_set=split)
        assert len(dataset) == count
    image, target = VOCSegmentation(str(root), year="2012", image_set="train")[0]
    assert image.mode == "RGB"
    assert target.mode == "P"
    assert target.getpalette()[: 3 * 256] == voc_data.voc_palette()
    assert Path(VOCSegmentation(str(root), image_set="val").images[0]).suffix == ".jpg"
    values = set()
    for path in sorted((voc(root) / "SegmentationClass").glob("*.png")):
        values |= set(np.unique(np.array(Image.open(path))).tolist())
    assert 255 in values  # object borders
    assert values <= {0, 255, *voc_data.SYNTHETIC_CLASSES}
    assert len(values - {0, 255}) >= 2


def test_synthetic_data_is_deterministic_in_the_seed(tmp_path: Path) -> None:
    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.*"))}

    a = voc_data.generate_synthetic_voc(tmp_path / "a", num_train=3, num_val=1, seed=5)
    b = voc_data.generate_synthetic_voc(tmp_path / "b", num_train=3, num_val=1, seed=5)
    c = voc_data.generate_synthetic_voc(tmp_path / "c", num_train=3, num_val=1, seed=6)
    assert files(a) == files(b)
    assert files(a) != files(c)
    assert not list(tmp_path.glob("*.tmp-*"))


# --------------------------------------------------------------------------- transforms, metric


def test_train_transform_crops_pads_with_ignore_and_follows_the_seed() -> None:
    image = Image.fromarray(np.full((20, 30, 3), 200, np.uint8))
    label = Image.fromarray(np.full((20, 30), 7, np.uint8))
    transform = voc_data.TrainTransform(65)
    torch.manual_seed(0)
    x, y = transform(image, label)
    assert x.shape == (3, 65, 65) and x.dtype == torch.float32
    assert y.shape == (65, 65) and y.dtype == torch.int64
    assert set(y.unique().tolist()) == {7, 255}  # at most 2x20x30 fits: the rest is padding
    torch.manual_seed(0)
    x2, y2 = transform(image, label)
    torch.testing.assert_close(x, x2)
    torch.testing.assert_close(y, y2)


def test_eval_transform_keeps_the_whole_image() -> None:
    image = Image.fromarray(np.zeros((21, 34, 3), np.uint8))
    x, y = voc_data.EvalTransform()(image, Image.fromarray(np.zeros((21, 34), np.uint8)))
    assert x.shape == (3, 21, 34) and y.shape == (21, 34)
    mean = torch.tensor(voc_data.IMAGENET_MEAN) / torch.tensor(voc_data.IMAGENET_STD)
    torch.testing.assert_close(x[:, 0, 0], -mean)


def test_miou_matches_a_hand_computation() -> None:
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 0]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    confusion = voc_data.confusion_matrix(pred, target, num_classes=4)
    # rows = truth, columns = prediction; the 255 pixel is not counted
    expected = torch.tensor([[2, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    torch.testing.assert_close(confusion, expected)
    iou = voc_data.iou_per_class(confusion)
    # class 0: TP 2, FN 1, FP 1 -> 2/4; class 1: 2/3; class 2: 1/2; class 3: absent (NaN)
    torch.testing.assert_close(iou[:3], torch.tensor([2 / 4, 2 / 3, 1 / 2], dtype=torch.float64))
    assert torch.isnan(iou[3])
    assert voc_data.mean_iou(confusion) == pytest.approx((2 / 4 + 2 / 3 + 1 / 2) / 3)


# --------------------------------------------------------------------------- bad data


@pytest.mark.filterwarnings("ignore:no --weights")
def test_missing_voc_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(voc(tmp_path)))):
        pspnet_voc.main(["--data-root", str(tmp_path), "--out", str(tmp_path / "out"), *TINY])


def test_missing_list_entry_is_named(data_root: Path) -> None:
    missing = voc(data_root) / "JPEGImages" / "2012_000003.jpg"
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(repr(str(missing)))):
        voc_data.VOCSegDataset(*voc_data.voc_split(data_root, "train"))


def test_missing_train_list_entry_is_named(data_root: Path) -> None:
    listing = data_root / "train_aug.txt"
    listing.write_text("JPEGImages/2012_000000.jpg SegmentationClassAug/2012_000000.png\n")
    images, labels = voc_data.read_list_file(listing, data_root)
    with pytest.raises(FileNotFoundError, match=re.escape("SegmentationClassAug/2012_000000.png")):
        voc_data.VOCSegDataset(images, labels, source=str(listing))


def test_list_file_reads_ids_and_pairs(data_root: Path) -> None:
    listing = data_root / "list.txt"
    listing.write_text(
        "2012_000001\n/JPEGImages/2012_000002.jpg /SegmentationClass/2012_000002.png\n"
    )
    images, labels = voc_data.read_list_file(listing, data_root)
    assert images == [str(voc(data_root) / "JPEGImages" / f"2012_00000{i}.jpg") for i in (1, 2)]
    assert labels == [
        str(voc(data_root) / "SegmentationClass" / f"2012_00000{i}.png") for i in (1, 2)
    ]


@pytest.mark.filterwarnings("ignore:no --weights")
def test_label_value_out_of_range_names_the_file(data_root: Path, tmp_path: Path) -> None:
    path = voc(data_root) / "SegmentationClass" / "2012_000002.png"
    label = Image.open(path)
    values = np.array(label)
    values[0, :5] = 30
    broken = Image.frombytes("P", label.size, values.tobytes())
    broken.putpalette(voc_data.voc_palette())
    broken.save(path)
    dataset = voc_data.VOCSegDataset(*voc_data.voc_split(data_root, "train"))
    with pytest.raises(ValueError, match=r"2012_000002\.png.*\[30\]"):
        dataset[2]
    args = ["--data-root", str(data_root), "--out", str(tmp_path / "out"), *TINY]
    args += ["--batch-size", "8", "--epochs", "1"]  # one batch: every training image
    with pytest.raises(ValueError, match=r"2012_000002\.png"):  # and through the training loop
        pspnet_voc.main(args)


def test_rgb_label_is_refused(data_root: Path) -> None:
    path = voc(data_root) / "SegmentationClass" / "2012_000000.png"
    Image.open(path).convert("RGB").save(path)
    dataset = voc_data.VOCSegDataset(*voc_data.voc_split(data_root, "train"))
    with pytest.raises(ValueError, match=r"2012_000000\.png' is a 'RGB' image"):
        dataset[0]


# --------------------------------------------------------------------------- training runs


def run(out: Path, cache: Path, *extra: str) -> dict:
    return pspnet_voc.main(["--out", str(out), "--cache-dir", str(cache), *TINY, *extra])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("aux_weight", "amp"), [("0.4", False), ("0", True)], ids=["deep-supervision", "plain-amp"]
)
def test_tiny_run_writes_every_output(
    cache_dir: Path, tmp_path: Path, aux_weight: str, amp: bool
) -> None:
    from deepsup.models import PSPNet

    out = tmp_path / "out"
    extra = ["--amp"] if amp else []  # bf16 autocast on CPU
    result = run(out, cache_dir, "--epochs", "2", "--aux-weight", aux_weight, *extra)
    assert 0.0 <= result["miou_pct"] <= 100.0
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert {"loss", "main_loss", "aux_loss", "val_miou_pct", "lr", "imgs_per_s"} <= set(rows[0])
    # percent, as the console prints it: the last row is the run's mIoU and its pixel accuracy
    assert float(rows[-1]["val_miou_pct"]) == pytest.approx(result["miou_pct"])
    assert 1.0 < float(rows[-1]["val_pixel_acc_pct"]) <= 100.0
    report = json.loads((out / "results.json").read_text())
    assert report["iou_pct"]["background"] is not None and report["iou_pct"]["cow"] is None
    assert report["miou_pct"] == pytest.approx(result["miou_pct"])
    assert (out / "curves.png").stat().st_size > 0
    assert len(list((out / "overlays").glob("*.png"))) == 1

    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and len(ckpt["history"]) == 2
    assert ckpt["scheduler"]["last_epoch"] == 4
    has_heads = any(k.startswith("heads.") for k in ckpt["model"])
    assert has_heads == (aux_weight != "0")
    plain = PSPNet(21, "resnet18")
    plain.load_state_dict(torch.load(out / "pspnet_final.pt", weights_only=True))


@pytest.mark.slow
def test_resume_continues_exactly(
    cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run(tmp_path / "straight", cache_dir, "--epochs", "2")

    calls = []
    train_one_epoch = pspnet_voc.train_one_epoch

    def preempted(*args: object, **kwargs: object) -> dict[str, float]:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the job is killed during epoch 2
        return train_one_epoch(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pspnet_voc, "train_one_epoch", preempted)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", cache_dir, "--epochs", "2")
    monkeypatch.setattr(pspnet_voc, "train_one_epoch", train_one_epoch)
    run(tmp_path / "resumed", cache_dir, "--epochs", "2", "--resume", "auto")

    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0, msg=key)
    for i, state in a["optimizer"]["state"].items():
        torch.testing.assert_close(state, b["optimizer"]["state"][i], rtol=0, atol=0)
    assert a["scheduler"] == b["scheduler"]
    assert a["history"][1]["loss"] == b["history"][1]["loss"]


def test_evaluation_never_runs_the_aux_head(cache_dir: Path) -> None:
    args = pspnet_voc.parse_args(["--cache-dir", str(cache_dir), *TINY])
    env = pspnet_voc.Dist("cpu")
    _, val = pspnet_voc.build_datasets(args, env)
    _, sup = pspnet_voc.build_model(args, env)
    head = sup.heads["backbone.layer3"]
    handle = head.register_forward_pre_hook(lambda *_: pytest.fail("the aux head ran"))
    with handle:
        confusion = pspnet_voc.evaluate(sup, val, args, env)
    torch.testing.assert_close(confusion, pspnet_voc.evaluate(sup.model, val, args, env))


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_two_cpu_processes(cache_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(EXAMPLES / "pspnet_voc.py"), "--out", str(out), "--cache-dir", str(cache_dir),
        *TINY, "--batch-size", "4", "--epochs", "2",
    ]  # fmt: skip
    env = tree_env(OMP_NUM_THREADS="1")
    assert_imports_tree(env)  # the ranks run this tree's deepsup, not an installed one
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "world_size=2" in done.stdout
    with open(out / "metrics.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert len(ckpt["rng"]) == 2  # one RNG state per rank
    assert ckpt["scheduler"]["last_epoch"] == 4
