"""Benchmark: the SSD training input pipeline, images per second, ssdlit vs torchvision v2.

What is measured, per image of the raccoon training split (160 JPEGs of varied sizes,
boxes read from ``train_labels.csv`` by a few lines below): read + decode the JPEG,
run the SSD augmentation chain, produce a uint8 ``[3, 300, 300]`` tensor with its boxes
normalised to [0, 1], and batch (32 per batch).

- **ssdlit**: :class:`~ssdlit.datamodules.datamodule.DetectionDataset` with its default
  loader (``Record.load_image``: Pillow through ``ssdlit.datamodules.images.load_rgb``,
  EXIF applied) and ``build_transforms("ssd", (300, 300))``: photometric distortions
  (lookup tables), zoom-out 1-4x on the mean colour (p=0.5), min-IoU crop, horizontal flip,
  ``cv2.resize`` (bilinear), then ``collate_detection`` (padded targets).
- **torchvision.transforms.v2**, its SSD recipe on tensors: ``decode_jpeg`` (RGB),
  ``RandomPhotometricDistort(p=0.5)``, ``RandomZoomOut(fill=mean)``, ``RandomIoUCrop()``,
  ``RandomHorizontalFlip(0.5)``, ``Resize((300, 300))``, ``SanitizeBoundingBoxes()``,
  boxes divided by 300, images stacked, targets in a list. The headline peer uses
  ``antialias=False`` (bilinear without antialiasing, like ``cv2.resize``, so both do the
  same work); the default ``antialias=True`` is shown as an extra row.

Both run through a ``DataLoader`` with ``num_workers=0`` (the main process: one worker's
worth of CPU each), the same images in the same order, a warm-up pass, then ``--passes``
timed passes, interleaved; the median seconds per image is reported. Torch and OpenCV are
pinned to one thread (``torch.set_num_threads(1)``, ``cv2.setNumThreads(1)``,
``OMP_NUM_THREADS=1``). The profile rows split decode from augmentation (each timed alone
on the same images; "augment" starts from decoded arrays / tensors). A benchmark never
asserts: it reports. The last line of output is one JSON object.

Run::

    python benchmarks/data.py
    python benchmarks/data.py --passes 8 --root /path/to/raccoon
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import csv
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torchvision.transforms.v2 as T
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_jpeg, read_file

from ssdlit.datamodules.collate import collate_detection
from ssdlit.datamodules.datamodule import DetectionDataset
from ssdlit.datamodules.records import Record
from ssdlit.datamodules.transforms import (
    SSD_MEAN_RGB,
    apply_transform,
    build_transforms,
)

GOAL = 1.5
SIZE = (300, 300)
BATCH = 32
THREADS = 1


# -- data: raccoon train split, parsed here so that the benchmark stands alone ------------


def read_raccoon(root: Path) -> list[Record]:
    """One Record per image of ``train_labels.csv`` (boxes xyxy pixels, label 1)."""
    rows: dict[str, list[list[float]]] = {}
    sizes: dict[str, tuple[int, int]] = {}
    with open(root / "train_labels.csv", newline="") as f:
        for row in csv.DictReader(f):
            name = row["filename"]
            box = [float(row[k]) for k in ("xmin", "ymin", "xmax", "ymax")]
            rows.setdefault(name, []).append(box)
            sizes[name] = (int(row["width"]), int(row["height"]))
    return [
        Record(
            path=root / "images" / name,
            width=sizes[name][0],
            height=sizes[name][1],
            boxes=np.asarray(boxes, dtype=np.float32),
            labels=np.ones(len(boxes), dtype=np.int64),
            image_id=Path(name).stem,
        )
        for name, boxes in sorted(rows.items())
    ]


# -- peer: torchvision.transforms.v2 -------------------------------------------------------


def torchvision_ssd(antialias: bool) -> T.Compose:
    return T.Compose(
        [
            T.RandomPhotometricDistort(p=0.5),
            T.RandomZoomOut(fill={tv_tensors.Image: SSD_MEAN_RGB, "others": 0}),
            T.RandomIoUCrop(),
            T.RandomHorizontalFlip(p=0.5),
            T.Resize(SIZE, antialias=antialias),
            T.SanitizeBoundingBoxes(),
        ]
    )


def tv_decode(path: Path) -> torch.Tensor:
    return decode_jpeg(read_file(str(path)), mode=ImageReadMode.RGB)


def tv_augment(tf: T.Compose, image: torch.Tensor, rec: Record) -> dict[str, Any]:
    h, w = image.shape[-2:]
    boxes = tv_tensors.BoundingBoxes(
        torch.from_numpy(rec.boxes), format="XYXY", canvas_size=(int(h), int(w))
    )
    img, target = tf(
        tv_tensors.Image(image), {"boxes": boxes, "labels": torch.from_numpy(rec.labels)}
    )
    scale = torch.tensor([SIZE[1], SIZE[0], SIZE[1], SIZE[0]], dtype=torch.float32)
    return {
        "image": img.as_subclass(torch.Tensor),
        "boxes": target["boxes"].as_subclass(torch.Tensor) / scale,
        "labels": target["labels"],
    }


class TorchvisionSSDDataset(Dataset):
    def __init__(self, records: list[Record], antialias: bool) -> None:
        self.records = records
        self.tf = torchvision_ssd(antialias)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        rec = self.records[i]
        return tv_augment(self.tf, tv_decode(rec.path), rec)


def tv_collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "images": torch.stack([s["image"] for s in samples]),
        "targets": [{"boxes": s["boxes"], "labels": s["labels"]} for s in samples],
    }


# -- timing -------------------------------------------------------------------------------


def time_pass(fn: Callable[[], int]) -> float:
    """Seconds per image of one call of ``fn`` (which returns the number of images)."""
    t0 = time.perf_counter()
    n = fn()
    return (time.perf_counter() - t0) / n


def loader_pass(loader: DataLoader) -> Callable[[], int]:
    def run() -> int:
        n = 0
        for batch in loader:
            n += batch["images"].shape[0]
        return n

    return run


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    shared = Path(__file__).resolve().parents[2] / "shared"
    parser.add_argument("--root", type=Path, default=shared / "datasets" / "raccoon")
    parser.add_argument("--passes", type=int, default=7, help="timed passes over the images")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(THREADS)
    cv2.setNumThreads(THREADS)
    torch.manual_seed(args.seed)
    records = read_raccoon(args.root)
    n_boxes = sum(r.num_boxes for r in records)

    ours_ds = DetectionDataset(records, build_transforms("ssd", SIZE, seed=args.seed))
    sides: dict[str, DataLoader] = {
        "ssdlit": DataLoader(
            ours_ds, batch_size=BATCH, num_workers=0, collate_fn=collate_detection
        ),
        "torchvision.transforms.v2": DataLoader(
            TorchvisionSSDDataset(records, antialias=False),
            batch_size=BATCH,
            num_workers=0,
            collate_fn=tv_collate,
        ),
        "torchvision.transforms.v2 (antialias=True)": DataLoader(
            TorchvisionSSDDataset(records, antialias=True),
            batch_size=BATCH,
            num_workers=0,
            collate_fn=tv_collate,
        ),
    }
    # profile: decode alone, augmentation alone (from decoded images)
    ours_tf = build_transforms("ssd", SIZE, seed=args.seed)
    tv_tf = torchvision_ssd(antialias=False)
    decoded_np = [ours_ds.load_image(i) for i in range(len(records))]
    decoded_t = [tv_decode(r.path) for r in records]

    def ours_decode() -> int:
        for i in range(len(records)):
            ours_ds.load_image(i)
        return len(records)

    def ours_aug() -> int:
        for img, rec in zip(decoded_np, records, strict=True):
            out = apply_transform(ours_tf, img, rec.boxes, rec.labels, rec.difficult)
            torch.from_numpy(out.image).permute(2, 0, 1)
        return len(records)

    def peer_decode() -> int:
        for rec in records:
            tv_decode(rec.path)
        return len(records)

    def peer_aug() -> int:
        for img, rec in zip(decoded_t, records, strict=True):
            tv_augment(tv_tf, img, rec)
        return len(records)

    runs: dict[str, Callable[[], int]] = {k: loader_pass(v) for k, v in sides.items()}
    runs |= {
        "ours_decode": ours_decode,
        "ours_aug": ours_aug,
        "peer_decode": peer_decode,
        "peer_aug": peer_aug,
    }
    for fn in runs.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.passes):  # interleaved, so that a busy moment hits every side
        for name, fn in runs.items():
            times[name].append(time_pass(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    full = {k: med[k] for k in sides}
    prof = {k: med[k] for k in runs if k not in sides}

    peer = "torchvision.transforms.v2"
    ours_s, peer_s = full["ssdlit"], full[peer]
    ratio = peer_s / ours_s
    print(
        f"SSD training input pipeline, {len(records)} raccoon train images ({n_boxes} boxes), "
        f"-> uint8 [3, {SIZE[0]}, {SIZE[1]}], batch {BATCH}, DataLoader num_workers=0, "
        f"{args.passes} passes (median), torch/OpenCV threads = {THREADS}"
    )
    print(f"machine: {machine()}")
    print()
    print(f"{'pipeline':<46} {'ms / image':>11} {'images / s':>11}")
    print("-" * 70)
    for name, s in full.items():
        print(f"{name:<46} {s * 1e3:>11.2f} {1.0 / s:>11.1f}")
    print()
    print(f"{'profile (same images, each part alone)':<46} {'ms / image':>11}")
    print("-" * 70)
    print(f"{'ssdlit decode (Pillow, Record.load_image)':<46} {prof['ours_decode'] * 1e3:>11.2f}")
    print(f"{'ssdlit augment (ssd chain + to tensor)':<46} {prof['ours_aug'] * 1e3:>11.2f}")
    print(f"{'torchvision decode (io.decode_jpeg)':<46} {prof['peer_decode'] * 1e3:>11.2f}")
    print(f"{'torchvision augment (v2 SSD recipe)':<46} {prof['peer_aug'] * 1e3:>11.2f}")
    print()
    print(f"ratio (ssdlit images/s / {peer} images/s): {ratio:.2f}x (goal {GOAL}x)")
    print(
        json.dumps(
            {
                "benchmark": "data",
                "ours_s": round(ours_s, 6),
                "peer": peer,
                "peer_s": round(peer_s, 6),
                "ratio": round(ratio, 3),
                "goal": GOAL,
                "threads": THREADS,
                "machine": machine(),
            }
        )
    )


if __name__ == "__main__":
    main()
