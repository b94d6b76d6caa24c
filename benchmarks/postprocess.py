"""Decode + per-class NMS for a batch of SSD300 outputs: ssdlit against torchvision.

Two batches of 8 images, 8732 anchors, 21 classes (VOC + background):

- ``noisy``: what an untrained model emits: near-uniform class scores, so about 1e5
  class scores per image clear the 0.01 threshold and enter NMS;
- ``trained``: a trained-looking model: background almost everywhere, a few
  confident objects per image.

Both sides decode the same deltas against the same anchors and apply the same
rule (score > 0.01, per-class NMS at IoU 0.45, the 200 best per image).
ssdlit: ``PerClassNMS`` on the whole batch (batched NMS with early stop).
Peer: torchvision's ``batched_nms`` applied per image (classes as groups), as a
torchvision user would write it. The script checks that both give the same
detections, then times them: a warm-up, then the two sides alternately (so that a load
from other jobs on the machine hits both alike), ``--repeats`` times on the noisy batch
(torchvision takes seconds there) and ``--trained-repeats`` times on the trained one;
the median of each. Goals: >= 4x on the noisy batch, >= 1.5x on the trained one (the
case every trained model's inference runs). A benchmark never asserts on speed.

The last line is one JSON object: ``noisy_ratio`` and ``trained_ratio`` (torchvision's
time / ssdlit's), their ``goals``, and the times (``ours_s``, ``peer_s`` and ``ratio``
are the noisy batch's, as before). Run: ``python benchmarks/postprocess.py``.
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
from torchvision.ops import batched_nms

from ssdlit.anchors import SSDAnchorGenerator
from ssdlit.boxes import BoxCoder, convert
from ssdlit.postprocess import PerClassNMS

SSD300_MAPS = [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]
CONF, IOU, TOP_K = 0.01, 0.45, 200
GOALS = {"noisy": 4.0, "trained": 1.5}  # torchvision's time / ssdlit's


def make_batch(kind: str, batch: int, classes: int, seed: int) -> tuple[Tensor, Tensor]:
    """Scores ``[B, A, K]`` and decoded boxes ``[B, A, 4]`` xyxy normalised."""
    g = torch.Generator().manual_seed(seed)
    anchors = SSDAnchorGenerator.ssd300()(SSD300_MAPS)
    a = anchors.shape[0]
    deltas = torch.randn(batch, a, 4, generator=g)
    if kind == "noisy":
        # Untrained head: background not dominant; the noisiest images have ~1e5
        # class scores above 0.01, the calmest about half as many.
        spread = torch.linspace(1.4, 3.0, batch).view(batch, 1, 1)
        logits = spread * torch.randn(batch, a, classes, generator=g)
    else:
        logits = torch.randn(batch, a, classes, generator=g)
        logits[..., 0] += 9.0  # background wins almost everywhere
        for b in range(batch):
            hits = torch.randint(0, a, (30,), generator=g)
            labels = torch.randint(1, classes, (30,), generator=g)
            logits[b, hits, labels] += 14.0
    scores = logits.softmax(-1)
    boxes = convert(BoxCoder().decode(deltas, anchors), "cxcywh", "xyxy").clamp(0, 1)
    return scores, boxes


def torchvision_per_image(scores: Tensor, boxes: Tensor) -> list[Tensor]:
    out = []
    for s_img, b_img in zip(scores, boxes, strict=True):
        s = s_img[:, 1:]
        anchor_idx, cls_idx = (s > CONF).nonzero(as_tuple=True)
        cand_scores = s[anchor_idx, cls_idx]
        keep = batched_nms(b_img[anchor_idx], cand_scores, cls_idx, IOU)[:TOP_K]
        out.append(
            torch.cat(
                (
                    (cls_idx[keep] + 1)[:, None].float(),
                    cand_scores[keep, None],
                    b_img[anchor_idx[keep]],
                ),
                dim=1,
            )
        )
    return out


def timed_pair(
    ours: Callable[[], object], peer: Callable[[], object], repeats: int
) -> tuple[float, float]:
    """Median seconds of ``ours`` and of ``peer``, called alternately after a warm-up."""
    ours()
    peer()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out in ((ours, times[0]), (peer, times[1])):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return statistics.median(times[0]), statistics.median(times[1])


def same(a: list[Tensor], b: list[Tensor]) -> bool:
    return all(
        x.shape == y.shape and torch.allclose(x, y, atol=1e-6) for x, y in zip(a, b, strict=True)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs, noisy batch")
    parser.add_argument(
        "--trained-repeats", type=int, default=200, help="timed runs, trained batch"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    ours = PerClassNMS(confidence_thresh=CONF, iou_threshold=IOU, top_k=TOP_K)
    rows = {}
    for kind in ("noisy", "trained"):
        scores, boxes = make_batch(kind, args.batch, 21, args.seed)
        candidates = (scores[..., 1:] > CONF).sum(dim=(1, 2))
        agree = same(ours(scores, boxes), torchvision_per_image(scores, boxes))
        t_ours, t_peer = timed_pair(
            lambda s=scores, b=boxes: ours(s, b),
            lambda s=scores, b=boxes: torchvision_per_image(s, b),
            args.repeats if kind == "noisy" else args.trained_repeats,
        )
        rows[kind] = (t_ours, t_peer, int(candidates.max()), int(candidates.min()), agree)

    print(
        f"decode + per-class NMS, batch {args.batch}, SSD300 (8732 anchors, 21 classes), "
        f"{args.threads} thread(s)"
    )
    print(
        f"{'batch':8} {'candidates/img':>16} {'ssdlit s':>10} {'torchvision s':>14} "
        f"{'ratio':>7} {'goal':>5} same"
    )
    for kind, (t_o, t_p, c_max, c_min, agree) in rows.items():
        print(
            f"{kind:8} {c_min:>7}-{c_max:<8} {t_o:>10.4f} {t_p:>14.4f} {t_p / t_o:>7.2f} "
            f"{GOALS[kind]:>5} {agree}"
        )
    t_o, t_p, *_ = rows["noisy"]
    t_to, t_tp, *_ = rows["trained"]
    machine = f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus".replace(
        "  ", " "
    )
    print(
        json.dumps(
            {
                "benchmark": "postprocess",
                "noisy_ratio": round(t_p / t_o, 2),
                "trained_ratio": round(t_tp / t_to, 2),
                "goals": {f"{kind}_ratio": goal for kind, goal in GOALS.items()},
                "same": all(row[4] for row in rows.values()),
                "ours_s": round(t_o, 5),
                "peer": "torchvision batched_nms per image",
                "peer_s": round(t_p, 5),
                "ratio": round(t_p / t_o, 2),
                "goal": GOALS["noisy"],
                "trained_ours_s": round(t_to, 5),
                "trained_peer_s": round(t_tp, 5),
                "repeats": {"noisy": args.repeats, "trained": args.trained_repeats},
                "threads": args.threads,
                "machine": machine,
            }
        )
    )


if __name__ == "__main__":
    main()
