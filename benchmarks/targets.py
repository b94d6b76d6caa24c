"""Benchmark: what SSD training runs for its targets and loss, for one batch.

Per batch of ``--batch`` images (default 32) against the 8732 SSD300 anchors, each
image holding 1 to 8 random (seeded) ground-truth boxes, with random class logits
``[B, 8732, 21]`` and box deltas ``[B, 8732, 4]``; timed: matching, targets and the
MultiBox loss forward **and backward** (``torch.autograd.grad`` on the logits and
deltas, so no gradient accumulates between repetitions):

- **ssdlit**: exactly what ``Detector.loss`` runs in a training step:
  ``SSDMatcher(matching="multi", pos_iou_threshold=0.5, neg_iou_limit=0.3)`` on the
  padded batch ``[B, G, 4]`` with the anchors' tables (built once from the
  ``AnchorGrid``, as a ``Detector`` does), then ``ssdlit.heads.multibox_loss``
  (targets for the positives only, hard negatives mined per image 3:1 with at least
  16, cross-entropy on the positives and mined negatives, smooth-L1 on the positives).
- **torchvision**: ``torchvision.models.detection.ssd.SSD``'s path for the same work,
  image by image as it runs it: ``box_iou`` -> ``_utils.SSDMatcher(0.5)`` (in
  ``SSD.forward``), then ``SSD.compute_loss``: ``BoxCoder((10, 10, 5, 5)).encode_single``
  on the foreground anchors, smooth-L1, cross-entropy over every anchor and its hard
  negative mining (3:1, two sorts). Anchors are precomputed in xyxy outside the timed
  region, as torchvision keeps them.

The two matching rules differ (ssdlit: greedy bipartite then multi matching with an
ignore band; torchvision: thresholding then forcing each gt's best anchor), so the
positives are printed for a sanity check, not asserted equal.

Timing: threads pinned with ``torch.set_num_threads(--threads)``, a warm-up, then
``--repeats`` timed repetitions of each side (interleaved) with
``time.perf_counter`` (synchronising first on CUDA); the median per batch is
reported. A benchmark never asserts on speed. The last line of output is one JSON
object.

Run::

    python benchmarks/targets.py
    python benchmarks/targets.py --threads 2 --repeats 50
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import box_iou as tv_box_iou

from ssdlit.anchors import SSDAnchorGenerator, SSDMatcher
from ssdlit.anchors.matching import AnchorOverlaps
from ssdlit.boxes import BoxCoder, convert
from ssdlit.heads import multibox_loss

FEATURE_SIZES = [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]
NUM_CLASSES = 20  # Pascal VOC: labels 1..20, 0 is background
MAX_BOXES = 8
GOAL = 5.0


# -- data ----------------------------------------------------------------------------


def make_batch(batch: int, seed: int) -> tuple[list[Tensor], list[Tensor]]:
    """Per-image gt boxes ``[n_i, 4]`` xyxy normalised and labels ``[n_i]``, 1 <= n_i <= 8."""
    gen = torch.Generator().manual_seed(seed)
    boxes: list[Tensor] = []
    labels: list[Tensor] = []
    for _ in range(batch):
        n = int(torch.randint(1, MAX_BOXES + 1, (1,), generator=gen))
        wh = 0.04 + 0.86 * torch.rand(n, 2, generator=gen)  # sides in [0.04, 0.9]
        x1y1 = torch.rand(n, 2, generator=gen) * (1.0 - wh)  # box inside the image
        boxes.append(torch.cat((x1y1, x1y1 + wh), dim=1))
        labels.append(torch.randint(1, NUM_CLASSES + 1, (n,), generator=gen))
    return boxes, labels


def pad_batch(boxes: list[Tensor], labels: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Pad per-image lists to ``gt_boxes [B, G, 4]``, ``gt_mask [B, G]``, ``labels [B, G]``."""
    b = len(boxes)
    g = max(int(x.shape[0]) for x in boxes)
    gt_boxes = torch.zeros(b, g, 4)
    gt_mask = torch.zeros(b, g, dtype=torch.bool)
    gt_labels = torch.zeros(b, g, dtype=torch.int64)
    for i, (bx, lb) in enumerate(zip(boxes, labels, strict=True)):
        n = bx.shape[0]
        gt_boxes[i, :n] = bx
        gt_mask[i, :n] = True
        gt_labels[i, :n] = lb
    return gt_boxes, gt_mask, gt_labels


# -- the two sides ---------------------------------------------------------------------


def ssdlit_step(
    matcher: SSDMatcher,
    coder: BoxCoder,
    logits: Tensor,
    deltas: Tensor,
    gt_boxes: Tensor,
    gt_mask: Tensor,
    gt_labels: Tensor,
    tables: AnchorOverlaps,
) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
    """ssdlit, whole batch, as ``Detector.loss``: ``matches [B, A]``, the loss and the
    gradients of ``logits`` and ``deltas``."""
    matches = matcher(gt_boxes, gt_mask, tables)  # [B, A]
    out = multibox_loss(logits, deltas, matches, gt_boxes, gt_labels, tables.anchors, coder)
    return matches, out["loss"], torch.autograd.grad(out["loss"], (logits, deltas))


def torchvision_step(
    proposal_matcher: det_utils.SSDMatcher,
    box_coder: det_utils.BoxCoder,
    logits: Tensor,
    deltas: Tensor,
    boxes: list[Tensor],
    labels: list[Tensor],
    anchors: list[Tensor],
) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
    """torchvision's SSD path, image by image, as in ``SSD.forward`` / ``SSD.compute_loss``:
    matched idxs ``[B, A]``, the loss and the gradients of ``logits`` and ``deltas``."""
    # SSD.forward (training): one match per image
    matched_idxs: list[Tensor] = []
    for anchors_per_image, boxes_per_image in zip(anchors, boxes, strict=True):
        match_quality_matrix = tv_box_iou(boxes_per_image, anchors_per_image)
        matched_idxs.append(proposal_matcher(match_quality_matrix))

    # SSD.compute_loss
    num_foreground = 0
    bbox_loss = []
    cls_targets = []
    for (
        boxes_per_image,
        labels_per_image,
        deltas_per_image,
        anchors_per_image,
        matched_idxs_per_image,
    ) in zip(boxes, labels, deltas, anchors, matched_idxs, strict=True):
        foreground_idxs_per_image = torch.where(matched_idxs_per_image >= 0)[0]
        foreground_matched_idxs_per_image = matched_idxs_per_image[foreground_idxs_per_image]
        num_foreground += foreground_matched_idxs_per_image.numel()
        matched_gt_boxes_per_image = boxes_per_image[foreground_matched_idxs_per_image]
        fg_deltas = deltas_per_image[foreground_idxs_per_image, :]
        fg_anchors = anchors_per_image[foreground_idxs_per_image, :]
        target_regression = box_coder.encode_single(matched_gt_boxes_per_image, fg_anchors)
        bbox_loss.append(F.smooth_l1_loss(fg_deltas, target_regression, reduction="sum"))
        gt_classes_target = torch.zeros(
            (anchors_per_image.size(0),),
            dtype=labels_per_image.dtype,
            device=labels_per_image.device,
        )
        gt_classes_target[foreground_idxs_per_image] = labels_per_image[
            foreground_matched_idxs_per_image
        ]
        cls_targets.append(gt_classes_target)
    bbox = torch.stack(bbox_loss)
    targets = torch.stack(cls_targets)
    num_classes = logits.size(-1)
    cls_loss = F.cross_entropy(
        logits.view(-1, num_classes), targets.view(-1), reduction="none"
    ).view(targets.size())
    foreground_idxs = targets > 0
    num_negative = 3 * foreground_idxs.sum(1, keepdim=True)
    negative_loss = cls_loss.clone()
    negative_loss[foreground_idxs] = -float("inf")
    _, idx = negative_loss.sort(1, descending=True)
    background_idxs = idx.sort(1)[1] < num_negative
    n = max(1, num_foreground)
    loss = bbox.sum() / n + (cls_loss[foreground_idxs].sum() + cls_loss[background_idxs].sum()) / n
    return torch.stack(matched_idxs), loss, torch.autograd.grad(loss, (logits, deltas))


# -- timing ----------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_sides(
    fns: dict[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int
) -> dict[str, list[float]]:
    """Seconds per call of each function; calls interleaved so drift hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def machine_name() -> str:
    cpu = platform.processor() or platform.machine() or "unknown cpu"
    return f"{cpu}, {os.cpu_count()} cpus, {platform.system()}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (1)")
    parser.add_argument("--repeats", type=int, default=30, help="timed repetitions (30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed repetitions first (5)")
    parser.add_argument("--batch", type=int, default=32, help="images per batch (32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random boxes (0)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but CUDA is not available")
    if args.threads < 1 or args.repeats < 1 or args.batch < 1 or args.warmup < 0:
        parser.error("--threads, --repeats and --batch must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    grid = SSDAnchorGenerator.ssd300().grid(FEATURE_SIZES)
    tables = AnchorOverlaps(grid.flat(device=device), grid.shapes)  # once, as a Detector does
    anchors = tables.anchors  # [A, 4] cxcywh
    num_anchors = int(anchors.shape[0])
    boxes_cpu, labels_cpu = make_batch(args.batch, args.seed)
    gt_boxes, gt_mask, gt_labels = (t.to(device) for t in pad_batch(boxes_cpu, labels_cpu))
    boxes = [b.to(device) for b in boxes_cpu]
    labels = [lb.to(device) for lb in labels_cpu]
    # torchvision keeps xyxy anchors, one tensor per image (the same boxes for all)
    anchors_xyxy = convert(anchors, "cxcywh", "xyxy").contiguous()
    anchors_per_image = [anchors_xyxy] * args.batch
    gen = torch.Generator().manual_seed(args.seed + 1)
    logits = torch.randn(args.batch, num_anchors, NUM_CLASSES + 1, generator=gen).to(device)
    deltas = torch.randn(args.batch, num_anchors, 4, generator=gen).to(device)
    logits.requires_grad_(True)
    deltas.requires_grad_(True)

    matcher = SSDMatcher(matching="multi", pos_iou_threshold=0.5, neg_iou_limit=0.3)
    coder = BoxCoder((0.1, 0.1, 0.2, 0.2))
    proposal_matcher = det_utils.SSDMatcher(0.5)
    box_coder = det_utils.BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))

    def ours() -> object:
        return ssdlit_step(matcher, coder, logits, deltas, gt_boxes, gt_mask, gt_labels, tables)

    def peer() -> object:
        return torchvision_step(
            proposal_matcher, box_coder, logits, deltas, boxes, labels, anchors_per_image
        )

    # -- sanity (printed, never asserted: the two matching rules differ) --
    matches, our_loss, _ = ours()
    tv_matches, tv_loss, _ = peer()
    ours_pos = int((matches >= 0).sum())
    peer_pos = int((tv_matches >= 0).sum())
    both = int(((matches >= 0) & (matches == tv_matches)).sum())
    n_boxes = int(gt_mask.sum())

    print(
        f"SSD targets + MultiBox loss forward and backward: batch {args.batch}, {num_anchors} anchors, "
        f"{n_boxes} gt boxes (1-{MAX_BOXES} per image, seed {args.seed}), padded G = "
        f"{gt_boxes.shape[1]}"
    )
    print(
        f"device {device}, torch.set_num_threads({args.threads}), torch {torch.__version__}, "
        f"machine: {machine_name()}, load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"sanity: positive anchors ssdlit {ours_pos} (ignored {int((matches == -2).sum())}), "
        f"torchvision {peer_pos}; same anchor and gt in both: {both}; loss ssdlit "
        f"{float(our_loss):.4f}, torchvision {float(tv_loss):.4f}"
    )

    times = time_sides({"ssdlit": ours, "torchvision": peer}, device, args.warmup, args.repeats)
    ours_s = statistics.median(times["ssdlit"])
    peer_s = statistics.median(times["torchvision"])

    print(f"\nmedian of {args.repeats} runs after {args.warmup} warm-up runs")
    print(f"{'side':<14}{'median ms/batch':>17}{'images/s':>12}")
    for name, sec in (("ssdlit", ours_s), ("torchvision", peer_s)):
        print(f"{name:<14}{sec * 1e3:>17.3f}{args.batch / sec:>12.0f}")
    ratio = round(peer_s / ours_s, 2)
    print(f"ratio torchvision / ssdlit: {ratio:.2f} (goal {GOAL})")
    print(
        json.dumps(
            {
                "benchmark": "targets",
                "ours_s": ours_s,
                "peer": "torchvision",
                "peer_s": peer_s,
                "ratio": ratio,
                "goal": GOAL,
                "threads": args.threads,
                "machine": machine_name(),
                "batch": args.batch,
                "anchors": num_anchors,
            }
        )
    )


if __name__ == "__main__":
    main()
