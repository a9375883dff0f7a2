"""Pascal VOC 2012 data for ``pspnet_voc.py``: dataset, transforms, mIoU and a synthetic stand-in.

Everything here is plain PyTorch / torchvision / Pillow and can be copied on its own:

- :func:`voc_split` and :func:`read_list_file` find images and labels in the real VOC layout
  (``VOCdevkit/VOC2012``, read through :class:`torchvision.datasets.VOCSegmentation`) or in an
  SBD-augmented list file (``train_aug.txt``, 10,582 images);
- :class:`VOCSegDataset` loads them, checks every label, and applies a joint transform;
- :class:`TrainTransform` is the PSPNet reference augmentation (random scale 0.5-2.0, rotation
  ±10°, Gaussian blur, horizontal flip, random crop padded with the ignore label) and
  :class:`EvalTransform` the whole-image evaluation input;
- :func:`confusion_matrix`, :func:`iou_per_class` and :func:`mean_iou` compute the metric;
- :func:`generate_synthetic_voc` writes a small synthetic data set in the real on-disk layout, so
  the example runs without downloading anything.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import Dataset

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip
NUM_CLASSES = len(VOC_CLASSES)
IGNORE_INDEX = 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Sample = tuple[torch.Tensor, torch.Tensor]


def voc_palette() -> list[int]:
    """VOC's 256-colour map as a flat ``[r0, g0, b0, r1, ...]`` list (255: the border colour)."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette += [r, g, b]
    return palette


def colorize(label: np.ndarray) -> Image.Image:
    """A class-index map as an RGB image in VOC colours."""
    image = Image.frombytes("P", (label.shape[1], label.shape[0]), label.astype(np.uint8).tobytes())
    image.putpalette(voc_palette())
    return image.convert("RGB")


# --------------------------------------------------------------------------- finding the files


def voc_root_of(data_root: str | os.PathLike[str]) -> Path:
    """``DATA_ROOT/VOCdevkit/VOC2012``, checked: a missing folder is an error naming it."""
    voc = Path(data_root) / "VOCdevkit" / "VOC2012"
    for folder in (voc, voc / "JPEGImages", voc / "ImageSets" / "Segmentation"):
        if not folder.is_dir():
            raise FileNotFoundError(
                f"VOC folder {str(folder)!r} does not exist; --data-root must be the folder that "
                "holds VOCdevkit/VOC2012 (the layout of VOCtrainval_11-May-2012.tar)."
            )
    return voc


def voc_split(data_root: str | os.PathLike[str], split: str) -> tuple[list[str], list[str]]:
    """Image and label paths of VOC 2012 ``split`` ("train", "val" or "trainval")."""
    from torchvision.datasets import VOCSegmentation

    voc = voc_root_of(data_root)
    for path in (voc / "SegmentationClass", voc / "ImageSets" / "Segmentation" / f"{split}.txt"):
        if not path.exists():
            raise FileNotFoundError(f"VOC path {str(path)!r} does not exist.")
    dataset = VOCSegmentation(str(data_root), year="2012", image_set=split)
    return list(dataset.images), list(dataset.masks)


def read_list_file(
    list_file: str | os.PathLike[str], data_root: str | os.PathLike[str]
) -> tuple[list[str], list[str]]:
    """Image and label paths from a list file such as SBD's ``train_aug.txt``.

    Each line is either ``IMAGE LABEL`` (paths relative to ``VOCdevkit/VOC2012``; a leading "/"
    is ignored, as in DeepLab's ``train_aug.txt``) or a bare image id, whose label is read from
    ``SegmentationClassAug/ID.png`` when that folder exists, else ``SegmentationClass/ID.png``.
    """
    voc = voc_root_of(data_root)
    list_file = Path(list_file)
    if not list_file.is_file():
        raise FileNotFoundError(f"train list {str(list_file)!r} does not exist.")
    label_dir = voc / "SegmentationClassAug"
    if not label_dir.is_dir():
        label_dir = voc / "SegmentationClass"
    images, labels = [], []
    for number, line in enumerate(list_file.read_text().splitlines(), start=1):
        fields = line.split()
        if len(fields) == 1:
            images.append(str(voc / "JPEGImages" / f"{fields[0]}.jpg"))
            labels.append(str(label_dir / f"{fields[0]}.png"))
        elif len(fields) == 2:
            images.append(str(voc / fields[0].lstrip("/")))
            labels.append(str(voc / fields[1].lstrip("/")))
        elif fields:
            raise ValueError(
                f"line {number} of {str(list_file)!r} has {len(fields)} fields ({line!r}); "
                "expected 'IMAGE LABEL' or an image id."
            )
    if not images:
        raise ValueError(f"train list {str(list_file)!r} is empty.")
    return images, labels


# --------------------------------------------------------------------------- dataset


class VOCSegDataset(Dataset[Sample]):
    """Image/label pairs and a joint transform; paths are checked up front, labels on load.

    Args:
        images: image paths (JPEG or any RGB image).
        labels: label paths: palette ('P') or grayscale ('L') PNGs of class indices, 255 = ignore.
        transform: called as ``transform(image, label)`` on two PIL images.
        num_classes: labels must lie in ``[0, num_classes)`` or equal ``ignore_index``.
        source: where the list came from, for error messages.
    """

    def __init__(
        self,
        images: Sequence[str],
        labels: Sequence[str],
        transform: Callable[[Image.Image, Image.Image], Sample] | None = None,
        *,
        num_classes: int = NUM_CLASSES,
        ignore_index: int = IGNORE_INDEX,
        source: str = "the data set",
    ) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels in {source}.")
        for kind, paths in (("image", images), ("label", labels)):
            missing = [p for p in paths if not os.path.isfile(p)]
            if missing:
                raise FileNotFoundError(
                    f"{kind} {missing[0]!r} listed in {source} does not exist "
                    f"({len(missing)} of {len(paths)} {kind}s are missing)."
                )
        self.images, self.labels = list(images), list(labels)
        self.transform = transform
        self.num_classes, self.ignore_index = num_classes, ignore_index

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> tuple[Image.Image, Image.Image]:
        """The untransformed image (RGB) and label ('L', class indices), label values checked."""
        image = Image.open(self.images[index]).convert("RGB")
        path = self.labels[index]
        raw = Image.open(path)
        if raw.mode not in ("P", "L"):
            raise ValueError(
                f"label {path!r} is a {raw.mode!r} image; expected a palette ('P') or grayscale "
                "('L') PNG of class indices, 255 = ignore."
            )
        label = np.array(raw)
        bad = np.unique(label[(label >= self.num_classes) & (label != self.ignore_index)])
        if bad.size:
            raise ValueError(
                f"label {path!r} holds value(s) {bad.tolist()[:8]} outside [0, {self.num_classes}) "
                f"that are not the ignore index {self.ignore_index}; fix or drop this file."
            )
        if raw.size != image.size:
            raise ValueError(
                f"label {path!r} is {raw.size[0]}x{raw.size[1]} but its image "
                f"{self.images[index]!r} is {image.size[0]}x{image.size[1]}."
            )
        return image, Image.fromarray(label)

    def __getitem__(self, index: int) -> Sample:
        image, label = self.load(index)
        if self.transform is None:
            return to_tensor(image), torch.from_numpy(np.array(label)).long()
        return self.transform(image, label)


# --------------------------------------------------------------------------- transforms


def to_tensor(
    image: Image.Image, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """RGB PIL image -> normalised float tensor (3, H, W)."""
    x = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1).div_(255.0)
    return x.sub_(torch.tensor(mean).view(3, 1, 1)).div_(torch.tensor(std).view(3, 1, 1))


def _uniform(low: float, high: float) -> float:
    # torch's RNG (not `random`): DataLoader seeds it per worker, checkpoints save it
    return low + (high - low) * torch.rand(()).item()


class TrainTransform:
    """The PSPNet reference training augmentation, on PIL images; randomness from torch's RNG.

    In order: random scale in ``scale`` (bilinear image, nearest label); with probability 0.5 a
    rotation in ±``rotate`` degrees (padding: mean colour / ignore label); with probability 0.5 a
    Gaussian blur (5x5 kernel); with probability 0.5 a horizontal flip; a random ``crop_size``
    crop, padded first (evenly, mean colour / ignore label) when the image is smaller; ImageNet
    normalisation.
    """

    def __init__(
        self,
        crop_size: int,
        *,
        scale: tuple[float, float] = (0.5, 2.0),
        rotate: float = 10.0,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        self.crop_size, self.scale, self.rotate = crop_size, scale, rotate
        self.ignore_index = ignore_index
        self.fill = tuple(round(255 * m) for m in IMAGENET_MEAN)

    def __call__(self, image: Image.Image, label: Image.Image) -> Sample:
        s = _uniform(*self.scale)
        size = (max(1, round(image.width * s)), max(1, round(image.height * s)))
        image = image.resize(size, Image.Resampling.BILINEAR)
        label = label.resize(size, Image.Resampling.NEAREST)
        if torch.rand(()).item() < 0.5:
            angle = _uniform(-self.rotate, self.rotate)
            image = image.rotate(angle, Image.Resampling.BILINEAR, fillcolor=self.fill)
            label = label.rotate(angle, Image.Resampling.NEAREST, fillcolor=self.ignore_index)
        if torch.rand(()).item() < 0.5:
            image = image.filter(ImageFilter.GaussianBlur(radius=1.1))  # ~ cv2's 5x5 kernel
        if torch.rand(()).item() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            label = label.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        image, label = self._pad(image, label)
        c = self.crop_size
        x = int(torch.randint(image.width - c + 1, ()).item())
        y = int(torch.randint(image.height - c + 1, ()).item())
        image, label = image.crop((x, y, x + c, y + c)), label.crop((x, y, x + c, y + c))
        return to_tensor(image), torch.from_numpy(np.array(label)).long()

    def _pad(self, image: Image.Image, label: Image.Image) -> tuple[Image.Image, Image.Image]:
        w, h = max(image.width, self.crop_size), max(image.height, self.crop_size)
        if (w, h) == image.size:
            return image, label
        offset = ((w - image.width) // 2, (h - image.height) // 2)
        padded_image = Image.new("RGB", (w, h), self.fill)
        padded_label = Image.new("L", (w, h), self.ignore_index)
        padded_image.paste(image, offset)
        padded_label.paste(label, offset)
        return padded_image, padded_label


class EvalTransform:
    """Whole-image evaluation: the full image, normalised; the label as it is."""

    def __call__(self, image: Image.Image, label: Image.Image) -> Sample:
        return to_tensor(image), torch.from_numpy(np.array(label)).long()


# --------------------------------------------------------------------------- metric


def confusion_matrix(
    pred: torch.Tensor,
    target: torch.Tensor,
    num_classes: int = NUM_CLASSES,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """``(num_classes, num_classes)`` int64 counts; row = ground-truth class, column = prediction.

    Pixels whose target is ``ignore_index`` are not counted.

    >>> confusion_matrix(torch.tensor([0, 1, 1, 1]), torch.tensor([0, 1, 0, 255]), num_classes=2)
    tensor([[1, 1],
            [0, 1]])
    """
    keep = target != ignore_index
    index = target[keep].long() * num_classes + pred[keep].long()
    counts = torch.bincount(index.flatten(), minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def iou_per_class(confusion: torch.Tensor) -> torch.Tensor:
    """IoU = TP / (TP + FP + FN) per class (float64); NaN for a class absent from both sides."""
    confusion = confusion.double()
    tp = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))


def mean_iou(confusion: torch.Tensor) -> float:
    """Mean IoU over the classes that occur (in the labels or the predictions).

    On VOC val all 21 classes occur, so this is the standard 21-class mIoU.

    >>> mean_iou(torch.tensor([[3, 1, 0], [0, 4, 0], [0, 0, 0]]))
    0.775
    """
    return float(iou_per_class(confusion).nanmean())


# --------------------------------------------------------------------------- synthetic VOC

# VOC class index -> (RGB colour, shape, texture). Colours are distinct and saturated, the
# background is a greyish, slowly varying field, so a small network learns it in CPU minutes.
SYNTHETIC_CLASSES = {
    1: ((60, 120, 235), "triangle", "solid"),  # aeroplane
    6: ((245, 205, 30), "rectangle", "stripes"),  # bus
    8: ((235, 110, 35), "ellipse", "spots"),  # cat
    12: ((130, 70, 30), "ellipse", "solid"),  # dog
    15: ((215, 50, 150), "tall", "checker"),  # person
}


def _texture(kind: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    period = rng.uniform(6, 12)
    if kind == "stripes":
        return 0.7 + 0.3 * (np.sin((xx + yy) * np.pi / period) > 0)
    if kind == "checker":
        return 0.7 + 0.3 * (((xx // period).astype(int) + (yy // period).astype(int)) % 2)
    if kind == "spots":
        return 1.0 - 0.35 * ((np.sin(xx * np.pi / period) * np.sin(yy * np.pi / period)) > 0.6)
    return np.ones((h, w))


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], **kw: int
) -> None:
    x0, y0, x1, y1 = box
    if shape == "ellipse":
        draw.ellipse(box, **kw)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], **kw)
    else:
        draw.rectangle(box, **kw)


# The "hard" preset: eight classes in confusable pairs (the same colour and shape, told apart only
# by texture: aeroplane/bicycle, bus/car, cat/dog, person/sheep), small objects, a textured
# background with unlabelled clutter in the object colours, and uneven lighting. A network has to
# use texture and context rather than colour, which a few CPU epochs learn only in part.
HARD_CLASSES = {
    1: ((60, 120, 235), "triangle", "solid"),  # aeroplane
    2: ((60, 120, 235), "triangle", "stripes"),  # bicycle
    6: ((245, 205, 30), "rectangle", "stripes"),  # bus
    7: ((245, 205, 30), "rectangle", "checker"),  # car
    8: ((235, 110, 35), "ellipse", "spots"),  # cat
    12: ((235, 110, 35), "ellipse", "stripes"),  # dog
    15: ((215, 50, 150), "tall", "checker"),  # person
    17: ((215, 50, 150), "tall", "spots"),  # sheep
}
DIFFICULTIES = ("easy", "hard")


def _hard_background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A grey-ish field with a fine random texture and unlabelled clutter in object colours."""
    grid = rng.uniform(60, 180, (6, 6, 1)) + rng.uniform(-30, 30, (6, 6, 3))
    small = Image.fromarray(grid.clip(0, 255).astype(np.uint8))
    image = np.array(small.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float64)
    yy, xx = np.mgrid[0:h, 0:w]
    angle, period = rng.uniform(0, np.pi), rng.uniform(4, 9)
    waves = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    image *= (1 + 0.12 * waves)[..., None]
    clutter = Image.fromarray(image.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(clutter)
    colours = [c for c, _, _ in HARD_CLASSES.values()]
    for _ in range(int(rng.integers(2, 6))):  # lines and rings in object colours: background
        colour = np.array(colours[int(rng.integers(len(colours)))]) + rng.uniform(-30, 30, 3)
        fill = tuple(int(v) for v in colour.clip(0, 255))
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        x1, y1 = x0 + rng.uniform(-0.5, 0.5) * w, y0 + rng.uniform(-0.5, 0.5) * h
        if rng.uniform() < 0.5:
            draw.line([(x0, y0), (x1, y1)], fill=fill, width=int(rng.integers(2, 5)))
        else:
            r = rng.uniform(4, 0.2 * min(h, w))
            draw.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), outline=fill, width=2)
    return np.array(clutter, dtype=np.float64)


def _synthetic_sample(
    rng: np.random.Generator, size: tuple[int, int], difficulty: str = "easy"
) -> tuple[np.ndarray, np.ndarray]:
    hard = difficulty == "hard"
    h = int(rng.integers(size[0], size[1] + 1))
    w = int(rng.integers(size[0], size[1] + 1))
    if hard:
        image = _hard_background(rng, h, w)
    else:  # background: a coarse random grey-ish grid, smoothly upsampled
        grid = rng.uniform(70, 170, (4, 4, 1)) + rng.uniform(-20, 20, (4, 4, 3))
        small = Image.fromarray(grid.clip(0, 255).astype(np.uint8))
        image = np.array(small.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float64)
    label = np.zeros((h, w), dtype=np.uint8)
    table = HARD_CLASSES if hard else SYNTHETIC_CLASSES
    classes = list(table)
    for _ in range(int(rng.integers(2, 6) if hard else rng.integers(1, 4))):
        cls = classes[int(rng.integers(len(classes)))]
        colour, shape, texture = table[cls]
        side = rng.uniform(*((0.12, 0.45) if hard else (0.3, 0.65))) * min(h, w)
        bw, bh = (
            (side * 0.6, side * 1.3) if shape == "tall" else (side, side * rng.uniform(0.7, 1.1))
        )
        x0, y0 = rng.uniform(-0.2 * bw, w - 0.8 * bw), rng.uniform(-0.2 * bh, h - 0.8 * bh)
        box = (int(x0), int(y0), int(x0 + bw), int(y0 + bh))
        fill_mask, edge_mask = Image.new("L", (w, h), 0), Image.new("L", (w, h), 0)
        _draw_shape(ImageDraw.Draw(fill_mask), shape, box, fill=1)
        _draw_shape(ImageDraw.Draw(edge_mask), shape, box, outline=1, width=3)
        inside, edge = np.array(fill_mask, dtype=bool), np.array(edge_mask, dtype=bool)
        rgb = np.array(colour) + rng.uniform(*((-35, 35) if hard else (-20, 20)), 3)
        image[inside] = (_texture(texture, h, w, rng)[..., None] * rgb)[inside]
        label[inside] = cls
        label[edge] = IGNORE_INDEX  # VOC marks object borders with 255
    if hard:  # uneven lighting: a left-to-right or top-to-bottom gain ramp
        ramp = np.linspace(
            rng.uniform(0.6, 1.0), rng.uniform(1.0, 1.3), w if rng.uniform() < 0.5 else h
        )
        image *= (ramp[None, :] if ramp.size == w else ramp[:, None])[..., None]
    image += rng.normal(0, 12 if hard else 8, image.shape)
    return image.clip(0, 255).astype(np.uint8), label


def generate_synthetic_voc(
    root: str | os.PathLike[str],
    *,
    num_train: int = 400,
    num_val: int = 60,
    size: tuple[int, int] = (96, 144),
    seed: int = 0,
    difficulty: str = "easy",
) -> Path:
    """Write a synthetic data set in the real VOC 2012 layout under ``root``; returns ``root``.

    ``root/VOCdevkit/VOC2012`` gets ``JPEGImages/*.jpg``, ``SegmentationClass/*.png`` (palette
    PNGs with VOC's colour map, class indices of five VOC classes, 255 on object borders) and
    ``ImageSets/Segmentation/{train,val,trainval}.txt``, so :func:`voc_split` and
    ``torchvision.datasets.VOCSegmentation`` read it like the real thing. Image sides are drawn
    from ``size``. Deterministic in its arguments; an existing complete set with the same
    arguments is reused. Written to a temporary folder and renamed, so concurrent callers are safe.

    ``difficulty="hard"`` draws eight classes in pairs that share colour and shape and differ only
    in texture (:data:`HARD_CLASSES`), two to five smaller objects per image, a textured
    background with unlabelled clutter in the object colours, uneven lighting and more noise: a
    set on which a small network trained for a few CPU minutes stays well below its ceiling, so
    that ablations (``examples/aux_weight_sweep.py``) have room to differ.
    """
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty {difficulty!r} is not one of {DIFFICULTIES}.")
    root = Path(root)
    params = {"num_train": num_train, "num_val": num_val, "size": list(size), "seed": seed}
    if difficulty != "easy":  # the easy set's marker stays as it was: existing caches stay valid
        params["difficulty"] = difficulty
    done = root / "synthetic.json"
    if done.is_file() and json.loads(done.read_text()) == params:
        return root
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    voc = tmp / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    rng = np.random.default_rng(seed)
    palette = voc_palette()
    ids = [f"2012_{i:06d}" for i in range(num_train + num_val)]
    for image_id in ids:
        image, label = _synthetic_sample(rng, size, difficulty)
        Image.fromarray(image).save(voc / "JPEGImages" / f"{image_id}.jpg", quality=90)
        png = Image.frombytes("P", (label.shape[1], label.shape[0]), label.tobytes())
        png.putpalette(palette)
        png.save(voc / "SegmentationClass" / f"{image_id}.png")
    lists = {"train": ids[:num_train], "val": ids[num_train:], "trainval": ids}
    for split, split_ids in lists.items():
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text(
            "\n".join(split_ids) + "\n"
        )
    (tmp / "synthetic.json").write_text(json.dumps(params))
    shutil.rmtree(root, ignore_errors=True)
    try:
        tmp.rename(root)
    except OSError:  # another process finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return root
