"""SSD matching as a specification: dense IoU, greedy bipartite, multi, ignore.

This is ssd_keras's ``SSDInputEncoder`` rule, written to be read, on the dense IoU
``[B, G, A]`` of the whole batch (static shapes, no host synchronisation: it is also
the path on accelerators and for anchors without a grid). The sparse path of
:class:`~ssdlit.anchors.matching.ssd.SSDMatcher` is tested equal to it.

1. Greedy bipartite: repeatedly the highest remaining (gt, anchor) IoU of each image
   (ties: lowest gt, then lowest anchor) is matched and its gt and anchor removed:
   every real gt gets one anchor, even at IoU 0.
2. ``multi``: every other anchor goes to its highest-IoU gt (ties: lowest gt) when
   that IoU is ``>= pos_iou_threshold``.
3. Anchors still unmatched whose best IoU is ``>= neg_iou_limit`` are ignored.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ssdlit.anchors.matching.base import BACKGROUND, IGNORE

__all__ = ["greedy_bipartite", "ssd_match"]


def greedy_bipartite(iou: Tensor) -> Tensor:
    """ssd_keras's ``match_bipartite_greedy`` for a batch.

    Args:
        iou: ``[B, G, A]``, padded gts negative.
    Returns:
        ``[B, A]`` long: the gt matched to each anchor, or -1.
    """
    b, g, a = iou.shape
    work = iou.clone()
    matches = torch.full((b, a), BACKGROUND, dtype=torch.long, device=iou.device)
    # scatter_ with Python scalars, not indexed assignment: nothing here waits on the
    # device (an indexed `= -1.0` copies the scalar from the host on every step).
    for _ in range(g):  # one pair per image and step
        flat = work.view(b, g * a).argmax(dim=1, keepdim=True)  # [B, 1] the first maximum:
        live = work.view(b, g * a).gather(1, flat) >= 0  # lowest gt, then lowest anchor
        gt, anchor = flat // a, flat % a  # [B, 1] each
        matches.scatter_(1, anchor, torch.where(live, gt, matches.gather(1, anchor)))
        work.scatter_(1, gt[:, :, None].expand(b, 1, a), -1.0)  # the gt is taken
        work.scatter_(2, anchor[:, :, None].expand(b, g, 1), -1.0)  # and the anchor
    return matches


def ssd_match(
    iou: Tensor,
    matching: str = "multi",
    pos_iou_threshold: float = 0.5,
    neg_iou_limit: float | None = 0.3,
) -> Tensor:
    """``matches [B, A]`` from the IoU ``[B, G, A]`` of a batch (padded gts -1)."""
    matches = greedy_bipartite(iou)
    best_iou, best_gt = iou.max(dim=1)  # [B, A], ties: the lowest gt
    free = matches == BACKGROUND
    if matching == "multi":
        positive = free & (best_iou >= pos_iou_threshold)
        matches = torch.where(positive, best_gt, matches)
        free &= ~positive
    if neg_iou_limit is not None:
        matches = matches.masked_fill(free & (best_iou >= neg_iou_limit), IGNORE)
    return matches
