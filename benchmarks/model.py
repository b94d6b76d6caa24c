"""SSD300-VGG16: inference latency and training throughput, ssdlit against torchvision.

Both models have random weights, 21 classes (VOC + background) and 300 x 300 input.

- Inference: batch 1, from a uint8 image to final detections (normalisation, network,
  box decoding, per-class NMS at IoU 0.45, top 200). torchvision: ``ssd300_vgg16`` in
  eval mode on a float image (its transform resizes to 300 and normalises).
- Training step: batch 8, forward, loss with matching (ssdlit: batched multi-match and
  MultiBox with hard negative mining; torchvision: its own per-image matching and
  loss), backward and an SGD step (lr 1e-4, momentum 0.9).

ssdlit runs in channels-last memory format when ``--channels-last`` (the default;
``--no-channels-last`` to compare), which is how the training app runs it on a CPU.
Prints a table and one JSON line with ``inference_ratio`` (torchvision's time / ours)
and ``training_ratio`` (our images/s / torchvision's). Run: ``python benchmarks/model.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
import torchvision

from ssdlit import Detector

ANCHORS = {
    "name": "ssd",
    "scales": [0.1, 0.2, 0.37, 0.54, 0.71, 0.88, 1.05],
    "aspect_ratios": [[1, 2, 0.5]] + [[1, 2, 0.5, 3, 1 / 3]] * 3 + [[1, 2, 0.5]] * 2,
    "steps": [8, 16, 32, 64, 100, 300],
}


def make_targets(batch: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """1 to 4 boxes per image: padded [B, G, 4] xyxy normalised and labels [B, G] (0 = pad)."""
    g = 4
    boxes = torch.zeros(batch, g, 4)
    labels = torch.zeros(batch, g, dtype=torch.long)
    for b in range(batch):
        n = int(torch.randint(1, g + 1, (1,), generator=gen))
        xy = torch.rand(n, 2, generator=gen) * 0.6
        wh = torch.rand(n, 2, generator=gen) * 0.35 + 0.05
        boxes[b, :n] = torch.cat([xy, xy + wh], 1)
        labels[b, :n] = torch.randint(1, 21, (n,), generator=gen)
    return boxes, labels


def timed(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)

    ours = Detector.build(
        num_classes=20,
        image_size=(300, 300),
        backbone={"name": "vgg16_ssd300"},
        anchors=ANCHORS,
        head={"name": "ssd"},
        matcher={"name": "ssd"},
        postprocess={"name": "per_class"},
    )
    theirs = torchvision.models.detection.ssd300_vgg16(
        weights=None, weights_backbone=None, num_classes=21
    )
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    ours = ours.to(memory_format=fmt)

    # -- inference, batch 1 --------------------------------------------------------------
    image_u8 = torch.randint(0, 256, (1, 3, 300, 300), dtype=torch.uint8, generator=gen)
    image_f = image_u8.float() / 255.0
    ours.eval()
    theirs.eval()

    def infer_ours() -> None:
        with torch.inference_mode():
            ours(image_u8.contiguous(memory_format=fmt))

    def infer_theirs() -> None:
        with torch.inference_mode():
            theirs([image_f[0]])

    t_inf_ours = timed(infer_ours, args.repeats)
    t_inf_theirs = timed(infer_theirs, args.repeats)

    # -- training step, batch 8 ----------------------------------------------------------
    b = args.train_batch
    images_u8 = torch.randint(0, 256, (b, 3, 300, 300), dtype=torch.uint8, generator=gen)
    gt_boxes, gt_labels = make_targets(b, gen)
    gt_mask = gt_labels > 0
    tv_images = [img.float() / 255.0 for img in images_u8]
    tv_targets = [
        {"boxes": gt_boxes[i, gt_mask[i]] * 300.0, "labels": gt_labels[i, gt_mask[i]]}
        for i in range(b)
    ]
    ours.train()
    theirs.train()
    opt_ours = torch.optim.SGD(ours.parameters(), lr=1e-4, momentum=0.9)
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=1e-4, momentum=0.9)

    def train_ours() -> None:
        opt_ours.zero_grad(set_to_none=True)
        outputs = ours.raw(images_u8.contiguous(memory_format=fmt))
        ours.loss(outputs, gt_boxes, gt_labels, gt_mask)["loss"].backward()
        opt_ours.step()

    def train_theirs() -> None:
        opt_theirs.zero_grad(set_to_none=True)
        losses = theirs(tv_images, tv_targets)
        sum(losses.values()).backward()
        opt_theirs.step()

    t_train_ours = timed(train_ours, max(2, args.repeats // 2))
    t_train_theirs = timed(train_theirs, max(2, args.repeats // 2))

    inference_ratio = t_inf_theirs / t_inf_ours
    training_ratio = (b / t_train_ours) / (b / t_train_theirs)
    print(
        f"SSD300-VGG16, random weights, 21 classes, {args.threads} thread(s), "
        f"channels_last={args.channels_last}"
    )
    print(f"{'':28} {'ssdlit':>10} {'torchvision':>12} {'ratio':>7}")
    print(
        f"{'inference b=1, s/image':28} {t_inf_ours:>10.3f} {t_inf_theirs:>12.3f} "
        f"{inference_ratio:>7.2f}"
    )
    print(
        f"{f'training b={b}, images/s':28} {b / t_train_ours:>10.2f} {b / t_train_theirs:>12.2f} "
        f"{training_ratio:>7.2f}"
    )
    machine = f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus"
    print(
        json.dumps(
            {
                "benchmark": "model",
                "ours_s": round(t_inf_ours, 4),
                "peer": "torchvision ssd300_vgg16",
                "peer_s": round(t_inf_theirs, 4),
                "ratio": round(inference_ratio, 2),
                "inference_ratio": round(inference_ratio, 2),
                "training_ratio": round(training_ratio, 2),
                "ours_train_img_s": round(b / t_train_ours, 3),
                "peer_train_img_s": round(b / t_train_theirs, 3),
                "goal": {"inference_ratio": 1 / 0.9, "training_ratio": 1.1},
                "threads": args.threads,
                "machine": " ".join(machine.split()),
                "torch": torch.__version__,
                "torchvision": torchvision.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
