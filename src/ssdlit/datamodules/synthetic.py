"""A deterministic synthetic detection dataset of coloured shapes, in VOC format.

:func:`write_synthetic_voc` draws shapes (circle, square, triangle, diamond, star,
cross, ring, hexagon: one class each) on noisy, textured backgrounds and writes them as
one VOC year folder::

    root/
      JPEGImages/train_000000.jpg ...
      Annotations/train_000000.xml ...
      ImageSets/Main/{train,val,test}.txt
      synthetic.json            # the parameters (the marker that the folder is ours)

so that :class:`~ssdlit.datamodules.voc.VOCSource` reads it (``splits=["train"]``);
:class:`SyntheticSource` does both: write if needed, then parse.

The data is meant to be learnable quickly by a small SSD but not trivial: every class
has its own shape *and* a base colour, but colours are jittered and 20 % of the objects
get a random colour (so the shape matters); sizes vary from 12 % to 45 % of the image
side with aspect ratios 3:4..4:3 and small rotations; objects may overlap (IoU at most
0.35, every object at least 60 % visible) and some are cut by the image border
(``truncated=1``, box = the visible extent). Backgrounds are smooth random colour
fields with noise, lines and dots as distractors; images are JPEG-compressed.

Boxes are exact: the box of an object is the extent of its drawn pixel mask inside the
image, in 0-based continuous xyxy (``x2 = last column + 1``), written as VOC 1-based
indices ``(x1 + 1, y1 + 1, x2, y2)`` so that the VOC source reads back the same numbers.

Determinism: image ``i`` of split ``s`` is drawn from ``numpy.random.default_rng([seed,
crc32(s), i])``: the same parameters always give the same files, and changing the number
of images of a split does not change the first ones. The folder is written only when
``synthetic.json`` is absent or holds other parameters (then it is rewritten); a folder
with other content and no marker is never overwritten.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import cv2
import numpy as np
from PIL import Image

from ssdlit.datamodules.validation import CheckImages, OnBad
from ssdlit.datamodules.voc import VOCSource
from ssdlit.registry import DATASETS

__all__ = [
    "DEFAULT_CLASSES",
    "DEFAULT_NUM_IMAGES",
    "SHAPES",
    "SPLITS",
    "SyntheticObject",
    "SyntheticSource",
    "draw_image",
    "synthetic_samples",
    "write_synthetic_voc",
]

#: Every shape that can be a class, with its base colour (RGB).
SHAPES: dict[str, tuple[int, int, int]] = {
    "circle": (220, 40, 40),
    "square": (40, 170, 60),
    "triangle": (40, 80, 220),
    "diamond": (230, 200, 30),
    "star": (200, 50, 200),
    "cross": (30, 200, 210),
    "ring": (240, 130, 20),
    "hexagon": (140, 90, 40),
}
DEFAULT_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")
SPLITS: tuple[str, ...] = ("train", "val", "test")
DEFAULT_NUM_IMAGES: dict[str, int] = {"train": 512, "val": 128, "test": 128}
MANIFEST = "synthetic.json"
_FORMAT = "ssdlit-synthetic-voc"
_VERSION = 1

_MIN_SIZE, _MAX_SIZE = 0.12, 0.45  # object size as a fraction of the shorter image side
_MAX_IOU = 0.35
_MIN_VISIBLE = 0.6
_RANDOM_COLOUR = 0.2
_BORDER = 0.15  # probability that an object is placed across the image border


@dataclass(frozen=True)
class SyntheticObject:
    """One drawn object: class name, label (1..C), box xyxy 0-based continuous pixels."""

    name: str
    label: int
    box: tuple[int, int, int, int]
    truncated: bool


def _polygon(shape: str) -> np.ndarray:
    """Outline of ``shape`` centred at 0 with radius about 1: [P, 2] (x, y)."""
    if shape == "square":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64)
    if shape == "diamond":
        return np.array([[0, -1], [1, 0], [0, 1], [-1, 0]], dtype=np.float64)
    if shape == "triangle":
        angles = np.deg2rad([-90, 30, 150])
        pts = np.stack([np.cos(angles), np.sin(angles)], axis=1)
        pts[:, 1] += 0.25  # centre the triangle's extent vertically
        return pts
    if shape == "star":
        angles = np.deg2rad(np.arange(10) * 36 - 90)
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        return np.stack([np.cos(angles) * radii, np.sin(angles) * radii], axis=1)
    if shape == "cross":
        a = 0.33
        quarter = [[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a]]
        quarter += [[a, 1], [-a, 1], [-a, a], [-1, a], [-1, -a], [-a, -a]]
        return np.array(quarter, dtype=np.float64)
    if shape == "hexagon":
        angles = np.deg2rad(np.arange(6) * 60)
        return np.stack([np.cos(angles), np.sin(angles)], axis=1)
    raise ValueError(f"no polygon for shape {shape!r}")


def _shape_mask(
    shape: str,
    height: int,
    width: int,
    centre: tuple[float, float],
    radii: tuple[float, float],
    angle: float,
) -> tuple[np.ndarray, bool]:
    """Draw ``shape`` into a bool mask [H, W]; returns (mask, cut by the image border).

    The shape is drawn on a canvas padded on every side, so that the part outside the
    image is known exactly: the object is cut when some of its pixels fall outside.
    """
    pad = math.ceil(max(radii) * 1.5) + 2
    cx, cy = centre[0] + pad, centre[1] + pad
    rx, ry = radii
    canvas = np.zeros((height + 2 * pad, width + 2 * pad), dtype=np.uint8)
    shift = 4  # cv2 sub-pixel precision bits
    scale = 1 << shift
    if shape in ("circle", "ring"):
        c = (round(cx * scale), round(cy * scale))
        axes = (max(1, round(rx * scale)), max(1, round(ry * scale)))
        cv2.ellipse(canvas, c, axes, angle, 0, 360, 1, -1, cv2.LINE_8, shift)
        if shape == "ring":
            inner = (max(1, round(axes[0] * 0.55)), max(1, round(axes[1] * 0.55)))
            cv2.ellipse(canvas, c, inner, angle, 0, 360, 0, -1, cv2.LINE_8, shift)
    else:
        rot = np.deg2rad(angle)
        rmat = np.array([[math.cos(rot), -math.sin(rot)], [math.sin(rot), math.cos(rot)]])
        pts = (_polygon(shape) * np.array([rx, ry])) @ rmat.T + np.array([cx, cy])
        cv2.fillPoly(canvas, [np.round(pts * scale).astype(np.int32)], 1, cv2.LINE_8, shift)
    mask = canvas[pad : pad + height, pad : pad + width].astype(bool)
    cut = int(mask.sum()) != int(canvas.sum())
    return mask, cut


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth random colour field, desaturated, with lines and dots: float32 [H, W, 3]."""
    grid = rng.uniform(40, 215, size=(rng.integers(2, 6), rng.integers(2, 6), 3))
    field = cv2.resize(grid.astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC)
    gray = field.mean(axis=2, keepdims=True)
    img = gray + (field - gray) * rng.uniform(0.2, 0.6)
    fine = rng.normal(0, rng.uniform(4, 14), size=(height // 4 + 1, width // 4 + 1, 1))
    img = img + cv2.resize(fine.astype(np.float32), (width, height))[:, :, None]
    canvas = np.ascontiguousarray(np.clip(img, 0, 255).astype(np.uint8))
    for _ in range(rng.integers(0, 5)):  # distractor lines
        p1 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        p2 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        cv2.line(canvas, p1, p2, colour, int(rng.integers(1, 3)), cv2.LINE_AA)
    for _ in range(rng.integers(0, 8)):  # distractor dots (too small to be objects)
        c = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        cv2.circle(canvas, c, int(rng.integers(1, 3)), colour, -1, cv2.LINE_AA)
    return canvas.astype(np.float32)


def _iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def draw_image(
    rng: np.random.Generator,
    *,
    height: int,
    width: int,
    classes: Sequence[str],
    min_objects: int = 1,
    max_objects: int = 4,
) -> tuple[np.ndarray, list[SyntheticObject]]:
    """Draw one image: uint8 [H, W, 3] RGB and its objects (boxes 0-based continuous xyxy)."""
    img = _background(rng, height, width)
    side = min(height, width)
    owner = np.full((height, width), -1, dtype=np.int32)  # index of the top object per pixel
    areas: list[int] = []
    objects: list[SyntheticObject] = []
    colours: list[np.ndarray] = []
    target = int(rng.integers(min_objects, max_objects + 1))
    for _ in range(target):
        for _attempt in range(30):
            k = int(rng.integers(len(classes)))
            shape = classes[k]
            size = side * math.exp(rng.uniform(math.log(_MIN_SIZE), math.log(_MAX_SIZE)))
            aspect = math.exp(rng.uniform(math.log(0.75), math.log(4 / 3)))
            rx, ry = size / 2 * math.sqrt(aspect), size / 2 / math.sqrt(aspect)
            angle = rng.uniform(-12, 12)
            if rng.random() < _BORDER:  # centre inside, shape across the border
                cx = rng.choice([rng.uniform(0, rx * 0.6), rng.uniform(width - rx * 0.6, width)])
                cy = rng.uniform(ry, height - ry) if height > 2 * ry else height / 2
            else:
                cx = rng.uniform(rx, width - rx) if width > 2 * rx else width / 2
                cy = rng.uniform(ry, height - ry) if height > 2 * ry else height / 2
            mask, cut = _shape_mask(shape, height, width, (cx, cy), (rx, ry), angle)
            ys, xs = np.nonzero(mask)
            if len(xs) == 0:
                continue
            box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
            if box[2] - box[0] < 6 or box[3] - box[1] < 6:
                continue
            if any(_iou(box, o.box) > _MAX_IOU for o in objects):
                continue
            new_owner = np.where(mask, len(objects), owner)
            if any((new_owner == j).sum() < _MIN_VISIBLE * areas[j] for j in range(len(objects))):
                continue
            owner = new_owner
            areas.append(int(mask.sum()))
            if rng.random() < _RANDOM_COLOUR:
                colour = rng.integers(0, 256, 3).astype(np.float32)
            else:
                base = np.asarray(SHAPES[shape], dtype=np.float32)
                colour = np.clip(base + rng.uniform(-30, 30, 3), 0, 255).astype(np.float32)
            colours.append(colour)
            objects.append(SyntheticObject(shape, k + 1, box, cut))
            break
    texture = 1.0 + 0.04 * rng.standard_normal((height, width, 1), dtype=np.float32)
    for j, colour in enumerate(colours):
        sel = owner == j
        img[sel] = (colour * rng.uniform(0.85, 1.0) * texture)[sel]
    img += rng.uniform(3, 9) * rng.standard_normal(img.shape, dtype=np.float32)
    out = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    if rng.random() < 0.3:
        out = cv2.GaussianBlur(out, (3, 3), 0)
    return out, objects


def _image_size(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = (int(v) for v in image_size)
    return h, w


def _num_images(num_images: int | Mapping[str, int] | None) -> dict[str, int]:
    if num_images is None:
        return dict(DEFAULT_NUM_IMAGES)
    if isinstance(num_images, int):
        return dict.fromkeys(SPLITS, num_images)
    out = {str(k): int(v) for k, v in num_images.items()}
    if any(v < 0 for v in out.values()):
        raise ValueError(f"num_images must be >= 0, got {out}")
    return out


def synthetic_samples(
    *,
    split: str,
    num_images: int,
    image_size: int | Sequence[int] = 128,
    classes: Sequence[str] = DEFAULT_CLASSES,
    seed: int = 0,
    min_objects: int = 1,
    max_objects: int = 4,
) -> Iterator[tuple[str, np.ndarray, list[SyntheticObject]]]:
    """Yield ``(image_id, image uint8 [H, W, 3] RGB, objects)`` for one split, deterministically."""
    height, width = _image_size(image_size)
    split_key = zlib.crc32(split.encode("utf-8"))
    for i in range(num_images):
        rng = np.random.default_rng([seed, split_key, i])
        img, objects = draw_image(
            rng,
            height=height,
            width=width,
            classes=classes,
            min_objects=min_objects,
            max_objects=max_objects,
        )
        yield f"{split}_{i:06d}", img, objects


def _xml(image_id: str, height: int, width: int, objects: list[SyntheticObject]) -> bytes:
    ann = ET.Element("annotation")
    ET.SubElement(ann, "folder").text = "JPEGImages"
    ET.SubElement(ann, "filename").text = f"{image_id}.jpg"
    src = ET.SubElement(ann, "source")
    ET.SubElement(src, "database").text = "ssdlit synthetic shapes"
    size = ET.SubElement(ann, "size")
    ET.SubElement(size, "width").text = str(width)
    ET.SubElement(size, "height").text = str(height)
    ET.SubElement(size, "depth").text = "3"
    ET.SubElement(ann, "segmented").text = "0"
    for o in objects:
        obj = ET.SubElement(ann, "object")
        ET.SubElement(obj, "name").text = o.name
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = str(int(o.truncated))
        ET.SubElement(obj, "difficult").text = "0"
        bnd = ET.SubElement(obj, "bndbox")
        x1, y1, x2, y2 = o.box
        for tag, v in (("xmin", x1 + 1), ("ymin", y1 + 1), ("xmax", x2), ("ymax", y2)):
            ET.SubElement(bnd, tag).text = str(v)  # VOC 1-based inclusive indices
    ET.indent(ann)
    return ET.tostring(ann, encoding="utf-8")


def _params(**kwargs: Any) -> dict[str, Any]:
    return {"format": _FORMAT, "version": _VERSION, **kwargs}


def _read_manifest(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_synthetic_voc(
    root: str | Path,
    *,
    num_images: int | Mapping[str, int] | None = None,
    image_size: int | Sequence[int] = 128,
    classes: Sequence[str] | None = None,
    seed: int = 0,
    min_objects: int = 1,
    max_objects: int = 4,
    jpeg_quality: int = 90,
) -> bool:
    """Write the synthetic dataset as a VOC year folder at ``root`` unless already there.

    Args:
        root: the folder to write (created; replaced only if it holds an older
            synthetic dataset with other parameters).
        num_images: images per split (a mapping such as ``{"train": 512, "val": 128}``,
            or one int for train, val and test); default :data:`DEFAULT_NUM_IMAGES`.
        image_size: ``H`` or ``(H, W)`` in pixels.
        classes: shape names (keys of :data:`SHAPES`); default :data:`DEFAULT_CLASSES`.
        seed: the random seed.
        min_objects, max_objects: objects per image (fewer when they do not fit).
        jpeg_quality: JPEG quality of the written images.

    Returns:
        True when the files were written, False when they were already there.
    """
    root = Path(root)
    classes = list(DEFAULT_CLASSES if classes is None else classes)
    unknown = [c for c in classes if c not in SHAPES]
    if unknown or not classes or len(set(classes)) != len(classes):
        raise ValueError(f"classes must be distinct shape names from {list(SHAPES)}, got {classes}")
    if not 0 <= min_objects <= max_objects:
        raise ValueError(f"need 0 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    height, width = _image_size(image_size)
    if min(height, width) < 16:
        raise ValueError(f"image_size must be at least 16 pixels, got {image_size}")
    counts = _num_images(num_images)
    params = _params(
        num_images=counts,
        image_size=[height, width],
        classes=classes,
        seed=int(seed),
        min_objects=int(min_objects),
        max_objects=int(max_objects),
        jpeg_quality=int(jpeg_quality),
    )
    root.parent.mkdir(parents=True, exist_ok=True)
    # One writer at a time per root: processes that start together (DDP ranks, sweep jobs)
    # wait for the first one and then find its dataset in place.
    with open(root.parent / f".lock-{root.name}", "w") as lock:
        _lock(lock)
        return _write_locked(
            root,
            params,
            counts,
            classes,
            (height, width),
            seed,
            min_objects,
            max_objects,
            jpeg_quality,
        )


def _lock(handle: IO[str]) -> None:
    """Exclusive advisory lock on ``handle`` (released when it is closed)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no advisory locks, single writer assumed
        return
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX)


def _write_locked(
    root: Path,
    params: dict,
    counts: Mapping[str, int],
    classes: list[str],
    size: tuple[int, int],
    seed: int,
    min_objects: int,
    max_objects: int,
    jpeg_quality: int,
) -> bool:
    """The body of :func:`write_synthetic_voc`, run while holding the root's lock."""
    height, width = size
    if root.exists():
        existing = _read_manifest(root)
        if existing == params:
            return False
        if existing is None and any(root.iterdir()):
            raise FileExistsError(
                f"{root} exists, is not empty and holds no {MANIFEST}: not a synthetic "
                "dataset folder, refusing to overwrite it"
            )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
            (tmp / sub).mkdir(parents=True)
        for split, n in counts.items():
            ids = []
            for image_id, img, objects in synthetic_samples(
                split=split,
                num_images=n,
                image_size=(height, width),
                classes=classes,
                seed=seed,
                min_objects=min_objects,
                max_objects=max_objects,
            ):
                Image.fromarray(img).save(
                    tmp / "JPEGImages" / f"{image_id}.jpg", quality=jpeg_quality
                )
                (tmp / "Annotations" / f"{image_id}.xml").write_bytes(
                    _xml(image_id, height, width, objects)
                )
                ids.append(image_id)
            (tmp / "ImageSets" / "Main" / f"{split}.txt").write_text(
                "".join(f"{i}\n" for i in ids), encoding="utf-8"
            )
        (tmp / MANIFEST).write_text(json.dumps(params, indent=2) + "\n", encoding="utf-8")
        if root.exists():  # an older synthetic dataset (checked above): replace it
            old = root.with_name(f".{root.name}.old-{os.getpid()}")
            root.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            tmp.rename(root)
        except OSError:  # another process wrote it at the same time
            if _read_manifest(root) != params:
                raise
            return False
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return True


@DATASETS.register("synthetic")
class SyntheticSource(VOCSource):
    """The synthetic shapes dataset: written at ``root`` if needed, then read as VOC.

    Args:
        root: where the dataset lives (see :func:`write_synthetic_voc`).
        split: the split(s) to read: ``"train"``, ``"val"``, ``"test"`` or a list.
        num_images, image_size, classes, seed, min_objects, max_objects: the generator's
            parameters (:func:`write_synthetic_voc`); ``classes`` are also the class names.
        on_bad, clip_tolerance, keep_images_without_gt, check_images, name: as for
            :class:`~ssdlit.datamodules.voc.VOCSource`.
    """

    def __init__(
        self,
        *,
        root: str | Path = "data/synthetic",
        split: str | Sequence[str] = "train",
        num_images: int | Mapping[str, int] | None = None,
        image_size: int | Sequence[int] = 128,
        classes: Sequence[str] | None = None,
        seed: int = 0,
        min_objects: int = 1,
        max_objects: int = 4,
        on_bad: OnBad = "error",
        clip_tolerance: float = 2.0,
        keep_images_without_gt: bool = True,
        check_images: CheckImages = "header",
        name: str = "synthetic",
    ) -> None:
        classes = list(DEFAULT_CLASSES if classes is None else classes)
        self.written = write_synthetic_voc(
            root,
            num_images=num_images,
            image_size=image_size,
            classes=classes,
            seed=seed,
            min_objects=min_objects,
            max_objects=max_objects,
        )
        splits = [split] if isinstance(split, str) else [str(s) for s in split]
        super().__init__(
            root=root,
            splits=splits,
            layout="devkit",
            classes=classes,
            on_bad=on_bad,
            clip_tolerance=clip_tolerance,
            keep_images_without_gt=keep_images_without_gt,
            check_images=check_images,
            name=name,
        )
