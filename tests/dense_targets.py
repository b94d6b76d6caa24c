"""Dense training targets (every anchor's ground truth): the plain form the tests
compare the losses' positives-only targets against."""

from __future__ import annotations

import torch
from torch import Tensor

from ssdlit.boxes import BoxCoder, convert


def gather_targets(matches: Tensor, gt_boxes: Tensor, gt_labels: Tensor) -> tuple[Tensor, Tensor]:
    """The ground truth of each anchor.

    Args:
        matches: ``[B, A]`` long (gt index, -1 background, -2 ignored).
        gt_boxes: ``[B, G, 4]`` xyxy normalised (G may be 0).
        gt_labels: ``[B, G]`` int64 in 1..C.
    Returns:
        ``labels [B, A]`` int64: the matched gt's label for positives, 0 (background)
        for every other anchor (ignored ones included: mask them yourself), and
        ``boxes [B, A, 4]`` xyxy: the matched gt box (for non-positives: gt slot 0 or zeros,
        meaningless).
    """
    b, a = matches.shape
    if gt_boxes.shape[1] == 0:  # no slot to gather from: nothing can be positive
        gt_boxes = gt_boxes.new_zeros(b, 1, 4)
        gt_labels = gt_labels.new_zeros(b, 1)
    idx = matches.clamp(min=0)  # [B, A]
    boxes = gt_boxes.gather(1, idx[..., None].expand(b, a, 4))  # [B, A, 4]
    labels = gt_labels.gather(1, idx)  # [B, A]
    labels = torch.where(matches >= 0, labels, torch.zeros_like(labels))
    return labels.long(), boxes


def encode_targets(
    coder: BoxCoder, matched_xyxy: Tensor, anchors: Tensor, positive: Tensor
) -> Tensor:
    """Regression targets ``[B, A, 4]``: ``coder.encode`` of each positive's gt against its anchor.

    Non-positive anchors get zeros (their gt is replaced by the anchor itself before
    encoding, so no ``log(0)`` reaches the graph). ``matched_xyxy [B, A, 4]``, ``anchors
    [A, 4]`` cxcywh, ``positive [B, A]`` bool.
    """
    anchors = anchors.to(matched_xyxy.dtype)
    gt = convert(matched_xyxy, "xyxy", "cxcywh")  # [B, A, 4]
    gt = torch.where(positive[..., None], gt, anchors.expand_as(gt))
    return coder.encode(gt, anchors)
