"""Box formats, IoU and the SSD centroid box coder.

Formats are named, never guessed (the last dimension holds the 4 numbers):

- ``xyxy``   (x1, y1, x2, y2): corners, the format of datasets and outputs.
- ``cxcywh`` (cx, cy, w, h):   centroids, the format of anchors and of the coder.
- ``xxyy``   (x1, x2, y1, y2): ssd_keras's "minmax".

Every function works on any leading shape ``[..., 4]`` and keeps dtype and device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import box_iou as _tv_box_iou

__all__ = ["FORMATS", "BoxCoder", "box_area", "box_iou", "convert"]

FORMATS = ("xyxy", "cxcywh", "xxyy")


def _to_xyxy(boxes: Tensor, fmt: str) -> Tensor:
    if fmt == "xyxy":
        return boxes
    if fmt == "cxcywh":
        cx, cy, w, h = boxes.unbind(-1)
        return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)
    # xxyy
    x1, x2, y1, y2 = boxes.unbind(-1)
    return torch.stack((x1, y1, x2, y2), dim=-1)


def _from_xyxy(boxes: Tensor, fmt: str) -> Tensor:
    if fmt == "xyxy":
        return boxes
    x1, y1, x2, y2 = boxes.unbind(-1)
    if fmt == "cxcywh":
        return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), dim=-1)
    return torch.stack((x1, x2, y1, y2), dim=-1)  # xxyy


def convert(boxes: Tensor, in_fmt: str, out_fmt: str) -> Tensor:
    """Convert boxes ``[..., 4]`` from ``in_fmt`` to ``out_fmt``.

    Formats: ``"xyxy"``, ``"cxcywh"``, ``"xxyy"`` (see the module docstring).
    Returns a new tensor of the same shape, dtype and device (the input itself
    when the formats are equal).
    """
    for fmt in (in_fmt, out_fmt):
        if fmt not in FORMATS:
            raise ValueError(f"unknown box format {fmt!r}; expected one of {FORMATS}")
    if boxes.shape[-1] != 4:
        raise ValueError(
            f"boxes must have 4 numbers in the last dimension, got {tuple(boxes.shape)}"
        )
    if in_fmt == out_fmt:
        return boxes
    if {in_fmt, out_fmt} == {"xyxy", "xxyy"}:  # a pure permutation either way
        return boxes[..., [0, 2, 1, 3]]
    return _from_xyxy(_to_xyxy(boxes, in_fmt), out_fmt)


def box_area(boxes_xyxy: Tensor) -> Tensor:
    """Area of boxes ``[..., 4]`` in xyxy; returns ``[...]`` (negative extents count as 0)."""
    wh = (boxes_xyxy[..., 2:] - boxes_xyxy[..., :2]).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def box_iou(boxes1_xyxy: Tensor, boxes2_xyxy: Tensor) -> Tensor:
    """Pairwise IoU of ``[N, 4]`` and ``[M, 4]`` xyxy boxes -> ``[N, M]``.

    Batched inputs ``[B, N, 4]`` and ``[B, M, 4]`` (or ``[M, 4]`` shared by the
    batch) give ``[B, N, M]``. Uses torchvision.ops.box_iou for the unbatched case
    (continuous coordinates: width = x2 - x1). Pairs with a zero union get IoU 0.
    """
    if boxes1_xyxy.dim() == 2 and boxes2_xyxy.dim() == 2:
        return _tv_box_iou(boxes1_xyxy, boxes2_xyxy).nan_to_num_(0.0)
    if boxes1_xyxy.dim() != 3:
        raise ValueError(f"boxes1 must be [N, 4] or [B, N, 4], got {tuple(boxes1_xyxy.shape)}")
    b2 = boxes2_xyxy if boxes2_xyxy.dim() == 3 else boxes2_xyxy.unsqueeze(0)
    area1 = box_area(boxes1_xyxy)  # [B, N]
    area2 = box_area(b2)  # [B or 1, M]
    lt = torch.maximum(boxes1_xyxy[:, :, None, :2], b2[:, None, :, :2])  # [B, N, M, 2]
    rb = torch.minimum(boxes1_xyxy[:, :, None, 2:], b2[:, None, :, 2:])  # [B, N, M, 2]
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]  # [B, N, M]
    union = area1[:, :, None] + area2[:, None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(inter.dtype).tiny), 0.0)


class BoxCoder:
    """SSD centroid encoding with variances (ssd_keras's ``coords='centroids'``).

    For a ground-truth box g and an anchor a, both cxcywh::

        dx = (cx_g - cx_a) / (w_a * v0)        dw = log(w_g / w_a) / v2
        dy = (cy_g - cy_a) / (h_a * v1)        dh = log(h_g / h_a) / v3

    :meth:`decode` is the exact inverse, except that ``dw * v2`` and ``dh * v3``
    are clamped to at most ``max_log_scale`` (default log(1000/16), torchvision's
    value: a box 62.5 times its anchor) before ``exp``, so that decoding raw
    network outputs never overflows to inf, in float16 included.
    """

    def __init__(
        self,
        variances: Sequence[float] = (0.1, 0.1, 0.2, 0.2),
        max_log_scale: float = math.log(1000.0 / 16),
    ) -> None:
        if len(variances) != 4 or any(v <= 0 for v in variances):
            raise ValueError(f"variances must be 4 positive numbers, got {variances}")
        self.variances = tuple(float(v) for v in variances)
        self.max_log_scale = float(max_log_scale)
        self._vars: dict[tuple[torch.dtype, torch.device], Tensor] = {}

    def __repr__(self) -> str:
        return f"BoxCoder(variances={self.variances}, max_log_scale={self.max_log_scale:.4g})"

    def _var(self, ref: Tensor) -> Tensor:
        """The variances ``[4]`` in ``ref``'s dtype and device, made once per pair:
        copying them from the host in every step would be a host synchronisation on a
        GPU. Made outside inference mode, so that a tensor first asked for while
        validating can still be saved for backward while training."""
        key = (ref.dtype, ref.device)
        var = self._vars.get(key)
        if var is None:
            with torch.inference_mode(False):
                var = torch.tensor(self.variances, dtype=ref.dtype, device=ref.device)
            self._vars[key] = var
        return var

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_vars": {}}  # the cached tensors are not state

    def encode(self, gt_cxcywh: Tensor, anchors_cxcywh: Tensor) -> Tensor:
        """Regression targets ``[..., 4]`` (dx, dy, dw, dh) of boxes against anchors.

        ``gt_cxcywh`` and ``anchors_cxcywh`` are ``[..., 4]`` cxcywh and broadcast
        against each other (e.g. ``[B, A, 4]`` against ``[A, 4]``). Boxes must have
        positive width and height.
        """
        var = self._var(gt_cxcywh)
        centre = (gt_cxcywh[..., :2] - anchors_cxcywh[..., :2]) / (
            anchors_cxcywh[..., 2:] * var[:2]
        )
        size = torch.log(gt_cxcywh[..., 2:] / anchors_cxcywh[..., 2:]) / var[2:]
        return torch.cat((centre, size), dim=-1)

    def decode(self, deltas: Tensor, anchors_cxcywh: Tensor) -> Tensor:
        """Boxes ``[..., 4]`` cxcywh from deltas ``[..., 4]`` and anchors ``[..., 4]`` cxcywh."""
        var = self._var(deltas)
        centre = deltas[..., :2] * var[:2] * anchors_cxcywh[..., 2:] + anchors_cxcywh[..., :2]
        log_scale = (deltas[..., 2:] * var[2:]).clamp(max=self.max_log_scale)
        size = torch.exp(log_scale) * anchors_cxcywh[..., 2:]
        return torch.cat((centre, size), dim=-1)
