"""GIoU, DIoU and CIoU losses of box pairs without data-dependent shapes.

The same values as ``torchvision.ops.generalized_box_iou_loss``,
``distance_box_iou_loss`` and ``complete_box_iou_loss`` (tested equal, gradients
included), computed without boolean-mask indexing: torchvision finds the overlapping
pairs with ``intersection[mask] = ...``, a ``nonzero`` whose size the host must read,
i.e. a host-device synchronisation in every training step on a GPU (five forward, five
backward, found by ``benchmarks/gpu.py --check-syncs``). Here the overlap's width and
height are clamped at 0 instead, which gives the same intersection.

Boxes are ``[..., 4]`` xyxy with ``x1 < x2`` and ``y1 < y2``; each loss is ``[...]``
per pair, in ``[0, 2)`` (CIoU may slightly exceed it), 0 for identical boxes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["IOU_LOSSES", "iou_loss"]

#: The IoU losses by name.
IOU_LOSSES = ("giou", "diou", "ciou")


def iou_loss(kind: str, pred: Tensor, target: Tensor, eps: float = 1e-7) -> Tensor:
    """The ``kind`` loss (:data:`IOU_LOSSES`) of each pair of ``pred`` and ``target``.

    Args:
        kind: ``"giou"`` (1 - IoU + empty share of the enclosing box), ``"diou"``
            (1 - IoU + squared centre distance over the enclosing box's squared
            diagonal) or ``"ciou"`` (DIoU + the aspect-ratio term, its weight taken
            without gradient).
        pred, target: ``[..., 4]`` xyxy, the same shape.
        eps: torchvision's guard against division by zero.
    Returns:
        ``[...]`` the loss of each pair, in the boxes' dtype.
    """
    if kind not in IOU_LOSSES:
        raise ValueError(f"unknown IoU loss {kind!r}; expected one of {IOU_LOSSES}")
    x1, y1, x2, y2 = pred.unbind(dim=-1)
    gx1, gy1, gx2, gy2 = target.unbind(dim=-1)
    w, h, gw, gh = x2 - x1, y2 - y1, gx2 - gx1, gy2 - gy1
    overlap_w = (torch.min(x2, gx2) - torch.max(x1, gx1)).clamp(min=0)
    overlap_h = (torch.min(y2, gy2) - torch.max(y1, gy1)).clamp(min=0)
    inter = overlap_w * overlap_h
    union = w * h + gw * gh - inter
    iou = inter / (union + eps)
    # the smallest box enclosing both
    cw = torch.max(x2, gx2) - torch.min(x1, gx1)
    ch = torch.max(y2, gy2) - torch.min(y1, gy1)
    if kind == "giou":
        enclosing = cw * ch
        return 1 - iou + (enclosing - union) / (enclosing + eps)
    centres = ((x1 + x2 - gx1 - gx2) ** 2 + (y1 + y2 - gy1 - gy2) ** 2) / 4
    diou = 1 - iou + centres / (cw**2 + ch**2 + eps)
    if kind == "diou":
        return diou
    v = (4 / math.pi**2) * (torch.atan(gw / gh) - torch.atan(w / h)) ** 2
    with torch.no_grad():
        alpha = v / (1 - iou + v + eps)
    return diou + alpha * v
