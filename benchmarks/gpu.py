"""GPU throughput of SSD300-VGG16: training and inference images/s, ssdlit against torchvision.

One run measures both libraries side by side on one CUDA device, on the same random
uint8 images (300 x 300) with the same random targets (1 to 8 boxes per image, labels
1..20), both models with random weights and 21 classes (VOC + background):

- **ssdlit**: the ``ssd300_voc`` experiment's detector, built from its composed config
  (``conf/experiment/ssd300_voc.yaml`` on ``experiment/base/voc.yaml``: backbone,
  anchors, head, matcher, post-processing) with ``backbone.pretrained=false`` (nothing
  is downloaded). Training: ``det.raw(images)`` -> ``det.loss(outputs, gt_boxes,
  gt_labels, gt_mask)`` (boxes ``[B, G, 4]`` xyxy normalised, padded; ``gt_mask``
  ``[B, G]``); inference: ``det(images)`` on the uint8 images (normalisation, network,
  decoding, per-class NMS).
- **torchvision**: ``torchvision.models.detection.ssd300_vgg16(weights=None,
  weights_backbone=None, num_classes=21)``. Training: ``model(images, targets)`` with
  the images as a list of float ``[3, 300, 300]`` in [0, 1] and the boxes in pixels;
  inference: ``model.eval(); model(images)`` (its transform, network, decoding, NMS).
  The uint8 -> float conversion is inside the timed region, so both start from the
  same uint8 batch on the GPU.

Training step (batch ``--batch``, 32): the Lightning ``16-mixed`` recipe, i.e.
``torch.autocast("cuda", torch.float16)`` around forward and loss, a ``GradScaler``
around backward and ``SGD(lr=1e-3, momentum=0.9)``; both models in channels-last memory
format (``--no-channels-last`` to compare; torchvision's transform hands its network
NCHW images, and cuDNN runs a convolution with channels-last weights in channels-last),
``cudnn.benchmark`` on (as ``conf/trainer/gpu.yaml``). Inference: eval mode, ``torch.inference_mode()``, fp16
autocast, batch 1 and batch ``--batch``, decoding and NMS included.

Timing: warm-up iterations first, then the two sides alternately, each call between
``torch.cuda.synchronize()`` and ``time.perf_counter``; images/s from the median
call. A benchmark never asserts on speed.

``--check-syncs``: one ssdlit training step (forward, ``det.loss``, backward) run under
``torch.cuda.set_sync_debug_mode("warn")`` after a warm-up step outside it: every
host-device synchronisation in the matching, the loss or the network is listed; the
check passes when the only one is the loss's documented read of its gather sizes
(:data:`ALLOWED_SYNCS`: MultiBox, focal or YOLO loss). Prints
them; exits 1 when the check fails. The default run does the same check once at the
end and reports it in the JSON line (``syncs``) without failing.

Without CUDA the script says so and exits 0. ``--device cpu`` is a debug mode that
runs one tiny iteration of each measurement on the CPU (bfloat16 autocast, the closest
the CPU has to the fp16 path) to check the code; its numbers are CPU numbers, not a
GPU measurement, and are labelled so.

The last line of output is one JSON object (``ssdlit_train_ips``,
``torchvision_train_ips``, ``training_ratio``, ``ssdlit_infer_ips_b1``, ...,
``inference_ratio`` at batch ``--batch``, ``inference_ratio_b1``, ``syncs``).

Run::

    python benchmarks/gpu.py                 # sized for a few minutes on one H100
    python benchmarks/gpu.py --quick         # fewer iterations
    python benchmarks/gpu.py --check-syncs   # only the synchronisation check
    python benchmarks/gpu.py --check-syncs --experiment retina_voc   # another detector
    python benchmarks/gpu.py --check-syncs head.box_loss=giou        # with Hydra overrides
    python benchmarks/gpu.py --device cpu --quick --batch 2   # debug the code on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

NUM_CLASSES = 20  # Pascal VOC object classes; label 0 is the background
IMAGE_SIZE = 300
MAX_BOXES = 8
EXPERIMENT = "ssd300_voc"
LR, MOMENTUM = 1e-3, 0.9
NEEDS_CUDA = "benchmarks/gpu.py needs CUDA: torch.cuda.is_available() is False, nothing measured"


# -- data --------------------------------------------------------------------------------


@dataclass
class Batch:
    """One batch on the device, in both libraries' formats.

    ``images`` ``[B, 3, 300, 300]`` uint8; ``gt_boxes`` ``[B, G, 4]`` xyxy normalised to
    [0, 1] (zeros on padding), ``gt_labels`` ``[B, G]`` (1..20, 0 on padding), ``gt_mask``
    ``[B, G]`` bool; ``targets``: torchvision's list of B dicts (``boxes`` ``[n, 4]`` xyxy
    in pixels, ``labels`` ``[n]``).
    """

    images: Tensor
    gt_boxes: Tensor
    gt_labels: Tensor
    gt_mask: Tensor
    targets: list[dict[str, Tensor]]


def make_batch(
    batch: int, seed: int, device: torch.device, size: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE)
) -> Batch:
    """Random uint8 images ``[batch, 3, H, W]`` (``size``) with 1 to ``MAX_BOXES`` random
    boxes each (seeded, made on the CPU; torchvision's targets in pixels of a square
    ``IMAGE_SIZE`` image)."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3, *size), dtype=torch.uint8, generator=gen)
    gt_boxes = torch.zeros(batch, MAX_BOXES, 4)
    gt_labels = torch.zeros(batch, MAX_BOXES, dtype=torch.long)
    for i in range(batch):
        n = int(torch.randint(1, MAX_BOXES + 1, (1,), generator=gen))
        xy = torch.rand(n, 2, generator=gen) * 0.7
        wh = torch.rand(n, 2, generator=gen) * 0.25 + 0.05
        gt_boxes[i, :n] = torch.cat([xy, xy + wh], 1)
        gt_labels[i, :n] = torch.randint(1, NUM_CLASSES + 1, (n,), generator=gen)
    gt_mask = gt_labels > 0
    targets = [
        {
            "boxes": (gt_boxes[i, gt_mask[i]] * IMAGE_SIZE).to(device),
            "labels": gt_labels[i, gt_mask[i]].to(device),
        }
        for i in range(batch)
    ]
    return Batch(
        images.to(device), gt_boxes.to(device), gt_labels.to(device), gt_mask.to(device), targets
    )


def as_float_list(images: Tensor) -> list[Tensor]:
    """uint8 ``[B, 3, H, W]`` -> torchvision's input: a list of B float ``[3, H, W]`` in [0, 1]."""
    return list((images.float() / 255.0).unbind(0))


# -- models ------------------------------------------------------------------------------


def experiment_spec(name: str = EXPERIMENT, overrides: list[str] | None = None) -> dict[str, Any]:
    """The ``Detector.build`` keywords of experiment ``name`` (with Hydra ``overrides``),
    from its composed config.

    The backbone is built with ``pretrained=False`` (random weights, no download).
    """
    from hydra import compose, initialize_config_module

    from ssdlit.config import plain
    from ssdlit.module import DETECTOR_KEYS

    with initialize_config_module("ssdlit.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"+experiment={name}", *(overrides or [])])
    spec = plain({key: cfg[key] for key in DETECTOR_KEYS if key in cfg})
    spec["backbone"]["pretrained"] = False
    return spec


def build_ssdlit(spec: dict[str, Any], device: torch.device, channels_last: bool) -> nn.Module:
    """ssdlit's ``Detector`` of ``spec`` (:func:`experiment_spec`) on ``device``."""
    from ssdlit import Detector

    det = Detector.build(num_classes=NUM_CLASSES, **spec).to(device)
    return det.to(memory_format=torch.channels_last) if channels_last else det


def build_torchvision(device: torch.device, channels_last: bool) -> nn.Module:
    """torchvision's ``ssd300_vgg16`` with random weights and 21 classes on ``device``."""
    from torchvision.models.detection import ssd300_vgg16

    model = ssd300_vgg16(weights=None, weights_backbone=None, num_classes=NUM_CLASSES + 1)
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


# -- one step of each side ---------------------------------------------------------------


@dataclass
class Amp:
    """Autocast settings: ``dtype`` on ``device_type``, and the gradient scaler."""

    device_type: str
    dtype: torch.dtype
    scaler: torch.amp.GradScaler

    @classmethod
    def for_device(cls, device: torch.device) -> Amp:
        # CUDA: Lightning's 16-mixed. CPU (debug only): bfloat16, CPU autocast's dtype.
        dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
        return cls(device.type, dtype, torch.amp.GradScaler(device.type))

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device_type, dtype=self.dtype)


def ssdlit_loss(det: nn.Module, batch: Batch, amp: Amp, channels_last: bool) -> Tensor:
    """Forward and ``det.loss`` under autocast: the total loss (a scalar)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    with amp.autocast():
        outputs = det.raw(batch.images.contiguous(memory_format=fmt))
        losses = det.loss(outputs, batch.gt_boxes, batch.gt_labels, batch.gt_mask)
    return losses["loss"]


def ssdlit_train_step(
    det: nn.Module, opt: torch.optim.Optimizer, batch: Batch, amp: Amp, channels_last: bool
) -> None:
    """One training step of ssdlit: forward, loss, scaled backward, SGD step."""
    opt.zero_grad(set_to_none=True)
    amp.scaler.scale(ssdlit_loss(det, batch, amp, channels_last)).backward()
    amp.scaler.step(opt)
    amp.scaler.update()


def torchvision_train_step(
    model: nn.Module, opt: torch.optim.Optimizer, batch: Batch, amp: Amp
) -> None:
    """One training step of torchvision's SSD: forward with its loss, backward, SGD step."""
    opt.zero_grad(set_to_none=True)
    with amp.autocast():
        losses = model(as_float_list(batch.images), batch.targets)
        loss = sum(losses.values())
    amp.scaler.scale(loss).backward()
    amp.scaler.step(opt)
    amp.scaler.update()


def ssdlit_infer(det: nn.Module, images: Tensor, amp: Amp, channels_last: bool) -> list[Tensor]:
    """Detections of ``images`` uint8 ``[B, 3, H, W]``: list of B ``[k, 6]``."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    with torch.inference_mode(), amp.autocast():
        return det(images.contiguous(memory_format=fmt))


def torchvision_infer(model: nn.Module, images: Tensor, amp: Amp) -> list[dict[str, Tensor]]:
    """torchvision's detections of ``images`` uint8 ``[B, 3, H, W]`` (converted inside)."""
    with torch.inference_mode(), amp.autocast():
        return model(as_float_list(images))


# -- timing and the synchronisation check -----------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_sides(
    fns: dict[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int
) -> dict[str, float]:
    """Median seconds per call of each function; warm-up first, then calls alternate."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


#: The host reads a training step is allowed, by design and documented: the MultiBox
#: loss reads the sizes of its gathers (positives, largest negative budget) once.
ALLOWED_SYNCS = (
    ("ssdlit/heads/losses.py", "multibox_loss"),  # the SSD heads' MultiBox loss
    ("ssdlit/heads/retina.py", "loss"),  # the RetinaNet head's focal loss
    ("ssdlit/heads/yolo.py", "loss"),  # the YOLOv3 head's loss
)


def check_syncs(det: nn.Module, batch: Batch, amp: Amp, channels_last: bool) -> dict[str, Any]:
    """Run one ssdlit step (forward, loss, backward) with CUDA sync debug mode "warn" and
    list every host-device synchronisation it makes (file, line, function).

    A warm-up step runs first, outside the check (lazy initialisation, the anchors'
    tables, cuDNN's algorithm search). Returns ``{"syncs": [...], "unexpected": [...],
    "ok": bool}``: ``ok`` when every synchronisation is one of :data:`ALLOWED_SYNCS`,
    each at most once.
    """
    det.train()
    amp.scaler.scale(ssdlit_loss(det, batch, amp, channels_last)).backward()
    det.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    found: list[str] = []

    def record(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if "synchroniz" in text and "prototype feature" not in text:  # not torch's notice
            stack = [f for f in traceback.extract_stack()[:-1] if "/ssdlit/" in f.filename]
            where = stack[-1] if stack else None
            found.append(
                f"{where.filename}:{where.lineno} in {where.name}" if where else str(message)
            )

    previous = warnings.showwarning
    warnings.showwarning = record
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            amp.scaler.scale(ssdlit_loss(det, batch, amp, channels_last)).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning = previous
        det.zero_grad(set_to_none=True)
    allowed = [s for s in found if any(f in s and n in s for f, n in ALLOWED_SYNCS)]
    unexpected = [s for s in found if s not in allowed]
    return {"syncs": found, "unexpected": unexpected, "ok": not unexpected and len(allowed) <= 1}


def report_syncs(result: dict[str, Any]) -> None:
    print(f"sync check: {len(result['syncs'])} host-device synchronisation(s) in a training step")
    for where in result["syncs"]:
        print(f"  {where}")
    allowed = ", ".join(f"{f} ({n})" for f, n in ALLOWED_SYNCS)
    print(f"allowed by design, one of them at most once: {allowed}")
    print("sync check: " + ("ok" if result["ok"] else "FAILED"))


# -- the run -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=None, help="batch (32; --device cpu: 2)")
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    parser.add_argument("--warmup", type=int, default=None, help="untimed iterations first")
    parser.add_argument("--repeats", type=int, default=None, help="timed iterations")
    parser.add_argument("--check-syncs", action="store_true", help="only the sync check")
    parser.add_argument(
        "--experiment",
        default=EXPERIMENT,
        help=f"with --check-syncs: the experiment whose detector is checked ({EXPERIMENT})",
    )
    parser.add_argument(
        "overrides", nargs="*", help="with --check-syncs: Hydra overrides, e.g. head.box_loss=giou"
    )
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (debug)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cpu = args.device == "cpu"
    if args.batch is None:
        args.batch = 2 if cpu else 32
    if args.warmup is None:
        args.warmup = 0 if cpu else (2 if args.quick else 5)
    if args.repeats is None:
        args.repeats = 1 if cpu else (5 if args.quick else 20)
    if args.batch < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--batch and --repeats must be >= 1, --warmup >= 0")
    if not args.check_syncs and (args.experiment != EXPERIMENT or args.overrides):
        parser.error(
            f"the comparison with torchvision is {EXPERIMENT} as it is; "
            "--experiment and overrides go with --check-syncs"
        )
    return args


def iterations(args: argparse.Namespace, kind: str) -> tuple[int, int]:
    """Warm-up and timed iterations of a measurement (batch-1 inference gets more)."""
    if kind == "infer_b1" and args.device != "cpu":
        return args.warmup * 2, args.repeats * 3
    return args.warmup, args.repeats


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine() or "cpu"
    return f"cpu ({cpu}, {os.cpu_count()} cpus; debug run, not a GPU measurement)"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device != "cpu" and not torch.cuda.is_available():
        print(NEEDS_CUDA)
        return 0
    device = torch.device(args.device)
    if args.check_syncs and device.type != "cuda":
        print("--check-syncs needs CUDA (torch.cuda.set_sync_debug_mode); nothing checked")
        return 0
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(args.seed)
    cl = args.channels_last
    det = build_ssdlit(experiment_spec(args.experiment, args.overrides), device, cl)
    batch = make_batch(args.batch, args.seed, device, det.image_size)

    if args.check_syncs:
        result = check_syncs(det, batch, Amp.for_device(device), cl)
        report_syncs(result)
        checked = " ".join([args.experiment, *args.overrides])
        print(
            json.dumps(
                {
                    "benchmark": "gpu",
                    "device": device_name(device),
                    "checked": checked,
                    "syncs": result,
                }
            )
        )
        return 0 if result["ok"] else 1

    theirs = build_torchvision(device, cl)
    amp_ours, amp_theirs = Amp.for_device(device), Amp.for_device(device)
    opt_ours = torch.optim.SGD(det.parameters(), lr=LR, momentum=MOMENTUM)
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=LR, momentum=MOMENTUM)
    b = args.batch

    # -- training ---------------------------------------------------------------------
    det.train()
    theirs.train()
    train = time_sides(
        {
            "ssdlit": lambda: ssdlit_train_step(det, opt_ours, batch, amp_ours, cl),
            "torchvision": lambda: torchvision_train_step(theirs, opt_theirs, batch, amp_theirs),
        },
        device,
        *iterations(args, "train"),
    )

    # -- inference, batch 1 and batch b -----------------------------------------------
    det.eval()
    theirs.eval()
    infer = {}
    for size in sorted({1, b}):
        images = batch.images[:size]
        infer[f"b{size}"] = time_sides(
            {
                "ssdlit": lambda x=images: ssdlit_infer(det, x, amp_ours, cl),
                "torchvision": lambda x=images: torchvision_infer(theirs, x, amp_theirs),
            },
            device,
            *iterations(args, "infer_b1" if size == 1 else "infer"),
        )

    syncs: dict[str, Any] | None = None
    if device.type == "cuda":
        syncs = check_syncs(det, batch, amp_ours, cl)
        report_syncs(syncs)

    ips = {
        "ssdlit_train_ips": b / train["ssdlit"],
        "torchvision_train_ips": b / train["torchvision"],
        "ssdlit_infer_ips_b1": 1 / infer["b1"]["ssdlit"],
        "torchvision_infer_ips_b1": 1 / infer["b1"]["torchvision"],
        f"ssdlit_infer_ips_b{b}": b / infer[f"b{b}"]["ssdlit"],
        f"torchvision_infer_ips_b{b}": b / infer[f"b{b}"]["torchvision"],
    }
    training_ratio = ips["ssdlit_train_ips"] / ips["torchvision_train_ips"]
    inference_ratio = ips[f"ssdlit_infer_ips_b{b}"] / ips[f"torchvision_infer_ips_b{b}"]
    inference_ratio_b1 = ips["ssdlit_infer_ips_b1"] / ips["torchvision_infer_ips_b1"]

    name = device_name(device)
    print(f"SSD300-VGG16, random weights, 21 classes, on {name}")
    amp_name = "fp16 + GradScaler" if device.type == "cuda" else "bf16 (cpu debug)"
    print(f"autocast {amp_name}, channels_last={cl}, images/s (median of {args.repeats})")
    print(f"{'':24} {'ssdlit':>10} {'torchvision':>12} {'ratio':>7}")
    rows = (
        (f"training b={b}", "train_ips", training_ratio),
        ("inference b=1", "infer_ips_b1", inference_ratio_b1),
        (f"inference b={b}", f"infer_ips_b{b}", inference_ratio),
    )
    for label, key, ratio in rows:
        ours_ips, their_ips = ips[f"ssdlit_{key}"], ips[f"torchvision_{key}"]
        print(f"{label:24} {ours_ips:>10.2f} {their_ips:>12.2f} {ratio:>7.2f}")
    print(
        json.dumps(
            {
                "benchmark": "gpu",
                "device": name,
                **{key: round(value, 2) for key, value in ips.items()},
                "training_ratio": round(training_ratio, 3),
                "inference_ratio": round(inference_ratio, 3),
                "inference_ratio_b1": round(inference_ratio_b1, 3),
                "batch": b,
                "syncs": syncs,
                "amp": amp_name,
                "channels_last": cl,
                "warmup": args.warmup,
                "repeats": args.repeats,
                "torch": torch.__version__,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
