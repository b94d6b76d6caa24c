"""Benchmark: SSD training targets (anchor matching + box encoding) for one batch.

What is measured, per batch of ``--batch`` images (default 32) against the 8732
SSD300 anchors, each image holding 1 to 8 random (seeded) ground-truth boxes:

- **ssdlit**: ``SSDMatcher(matching="multi", pos_iou_threshold=0.5, neg_iou_limit=0.3)``
  on the padded batch ``[B, G, 4]`` at once (``match_positives``: ``matches [B, A]`` and
  the flat indices of its positives), then ``ssdlit.heads.positive_targets``:
  ``BoxCoder((0.1, 0.1, 0.2, 0.2))`` encoding of the
  positive anchors' regression targets ``[P, 4]`` (torchvision also encodes only its
  foreground anchors) and class targets ``[B, 8732]``; no Python loop over images.
- **torchvision**: the matching / target part of
  ``torchvision.models.detection.ssd.SSD`` (``forward`` in training mode and
  ``compute_loss``, the loss itself left out), image by image in a Python loop:
  ``box_iou`` -> ``_utils.SSDMatcher(0.5)`` -> ``BoxCoder((10, 10, 5, 5)).encode_single``
  on the foreground anchors, and the class targets stacked into ``[B, 8732]``.
  Anchors are precomputed in xyxy outside the timed region, as torchvision keeps them.

Both sides get the same boxes in the same normalised units. The two algorithms
differ (ssdlit: greedy bipartite then multi matching with an ignore band;
torchvision: thresholding then forcing each gt's best anchor), so the positives
are reported for a sanity check, not asserted equal.

Timing: threads pinned with ``torch.set_num_threads(--threads)``, a warm-up, then
``--repeats`` timed repetitions of each side (interleaved) with
``time.perf_counter`` (synchronising first on CUDA); the median per batch is
reported. A benchmark never asserts on speed. The last line of output is one JSON
object.

Run::

    python benchmarks/matching.py
    python benchmarks/matching.py --threads 2 --repeats 100
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
from torch import Tensor
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import box_iou as tv_box_iou

from ssdlit.anchors import SSDAnchorGenerator, SSDMatcher
from ssdlit.anchors.matchers import AnchorOverlaps
from ssdlit.boxes import BoxCoder, convert
from ssdlit.heads import positive_targets

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


def ssdlit_targets(
    matcher: SSDMatcher,
    coder: BoxCoder,
    gt_boxes: Tensor,
    gt_mask: Tensor,
    gt_labels: Tensor,
    anchors: Tensor,
    tables: AnchorOverlaps,
) -> tuple[Tensor, Tensor, Tensor]:
    """ssdlit, whole batch: ``matches [B, A]``, ``loc [P, 4]`` for the P positive
    anchors (like torchvision's foreground-only encoding) and ``cls [B, A]``
    (:func:`ssdlit.heads.positive_targets`). ``tables``: the anchors' overlap tables,
    built once with the anchors as a :class:`~ssdlit.Detector` builds them."""
    matches, positives = matcher.match_positives(gt_boxes, gt_mask, tables)  # [B, A], [P]
    _, _, loc, cls = positive_targets(matches, gt_boxes, gt_labels, anchors, coder, positives)
    return matches, loc, cls


def torchvision_targets(
    proposal_matcher: det_utils.SSDMatcher,
    box_coder: det_utils.BoxCoder,
    boxes: list[Tensor],
    labels: list[Tensor],
    anchors: list[Tensor],
) -> tuple[list[Tensor], list[Tensor], list[Tensor], Tensor]:
    """torchvision's SSD path, image by image, as in ``SSD.forward`` / ``SSD.compute_loss``.

    Returns matched idxs, foreground anchor indices and regression targets (per
    image, foreground anchors only) and the class targets ``[B, A]``.
    """
    # SSD.forward (training): one match per image
    matched_idxs: list[Tensor] = []
    for anchors_per_image, boxes_per_image in zip(anchors, boxes, strict=True):
        if boxes_per_image.numel() == 0:
            matched_idxs.append(
                torch.full(
                    (anchors_per_image.size(0),),
                    -1,
                    dtype=torch.int64,
                    device=anchors_per_image.device,
                )
            )
            continue
        match_quality_matrix = tv_box_iou(boxes_per_image, anchors_per_image)
        matched_idxs.append(proposal_matcher(match_quality_matrix))

    # SSD.compute_loss: targets only (no head outputs, no loss)
    foreground: list[Tensor] = []
    regression: list[Tensor] = []
    cls_targets: list[Tensor] = []
    for boxes_per_image, labels_per_image, anchors_per_image, matched_idxs_per_image in zip(
        boxes, labels, anchors, matched_idxs, strict=True
    ):
        foreground_idxs_per_image = torch.where(matched_idxs_per_image >= 0)[0]
        foreground_matched_idxs_per_image = matched_idxs_per_image[foreground_idxs_per_image]
        matched_gt_boxes_per_image = boxes_per_image[foreground_matched_idxs_per_image]
        fg_anchors_per_image = anchors_per_image[foreground_idxs_per_image, :]
        regression.append(box_coder.encode_single(matched_gt_boxes_per_image, fg_anchors_per_image))
        gt_classes_target = torch.zeros(
            (anchors_per_image.size(0),),
            dtype=labels_per_image.dtype,
            device=labels_per_image.device,
        )
        gt_classes_target[foreground_idxs_per_image] = labels_per_image[
            foreground_matched_idxs_per_image
        ]
        cls_targets.append(gt_classes_target)
        foreground.append(foreground_idxs_per_image)
    return matched_idxs, foreground, regression, torch.stack(cls_targets)


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
    parser.add_argument("--repeats", type=int, default=200, help="timed repetitions (200)")
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

    anchors = SSDAnchorGenerator.ssd300()(FEATURE_SIZES, device=device)  # [A, 4] cxcywh
    num_anchors = int(anchors.shape[0])
    tables = AnchorOverlaps(anchors)  # built once with the anchors (as a Detector does)
    boxes_cpu, labels_cpu = make_batch(args.batch, args.seed)
    gt_boxes, gt_mask, gt_labels = (t.to(device) for t in pad_batch(boxes_cpu, labels_cpu))
    boxes = [b.to(device) for b in boxes_cpu]
    labels = [lb.to(device) for lb in labels_cpu]
    # torchvision keeps xyxy anchors, one tensor per image (the same boxes for all)
    anchors_xyxy = convert(anchors, "cxcywh", "xyxy").contiguous()
    anchors_per_image = [anchors_xyxy] * args.batch

    matcher = SSDMatcher(matching="multi", pos_iou_threshold=0.5, neg_iou_limit=0.3)
    coder = BoxCoder((0.1, 0.1, 0.2, 0.2))
    proposal_matcher = det_utils.SSDMatcher(0.5)
    box_coder = det_utils.BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))

    def ours() -> object:
        return ssdlit_targets(matcher, coder, gt_boxes, gt_mask, gt_labels, anchors, tables)

    def peer() -> object:
        return torchvision_targets(proposal_matcher, box_coder, boxes, labels, anchors_per_image)

    # -- sanity (printed, never asserted: the two matching rules differ) --
    matches, loc_pos, cls = ssdlit_targets(
        matcher, coder, gt_boxes, gt_mask, gt_labels, anchors, tables
    )
    loc = torch.zeros(args.batch, num_anchors, 4, device=device)
    loc[matches >= 0] = loc_pos  # nonzero() order is row-major, as in ssdlit_targets
    tv_matched, tv_fg, tv_loc, tv_cls = torchvision_targets(
        proposal_matcher, box_coder, boxes, labels, anchors_per_image
    )
    tv_matches = torch.stack(tv_matched)  # [B, A]
    ours_pos = int((matches >= 0).sum())
    peer_pos = int((tv_matches >= 0).sum())
    both = (matches >= 0) & (matches == tv_matches)
    loc_diff = 0.0
    for i in range(args.batch):
        tv_full = torch.zeros(num_anchors, 4, device=device)
        tv_full[tv_fg[i]] = tv_loc[i]  # torchvision's foreground targets, spread to all anchors
        shared = both[i]
        if shared.any():
            loc_diff = max(loc_diff, float((loc[i][shared] - tv_full[shared]).abs().max()))
    cls_agree = float((cls[both] == tv_cls[both]).float().mean()) if both.any() else float("nan")
    n_boxes = int(gt_mask.sum())

    print(
        f"SSD matching + encoding: batch {args.batch}, {num_anchors} anchors, "
        f"{n_boxes} gt boxes (1-{MAX_BOXES} per image, seed {args.seed}), padded G = "
        f"{gt_boxes.shape[1]}"
    )
    print(
        f"device {device}, torch.set_num_threads({args.threads}), torch {torch.__version__}, "
        f"machine: {machine_name()}, load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"sanity: positive anchors ssdlit {ours_pos} (ignored {int((matches == -2).sum())}), "
        f"torchvision {peer_pos}; same anchor and gt in both: {int(both.sum())}; "
        f"on those, max |loc diff| {loc_diff:.2e}, class targets equal {cls_agree:.0%}"
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
                "benchmark": "matching",
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
