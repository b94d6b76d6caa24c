"""What every matcher shares: the labels of ``matches``, the checks and the call.

Every matcher takes

- ``gt_boxes`` ``[B, G, 4]`` xyxy normalised to [0, 1] (padded to the largest G),
- ``gt_mask``  ``[B, G]`` bool, True for real boxes and False for padding,
- ``anchors``  ``[A, 4]`` cxcywh normalised, or their
  :class:`~ssdlit.anchors.matching.overlaps.AnchorOverlaps` (built once by the owner
  of the anchors, with their grid),

and returns ``matches`` ``[B, A]`` long: the gt index (>= 0) an anchor regresses to,
:data:`BACKGROUND` (-1) or :data:`IGNORE` (-2, enters no loss).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from ssdlit.anchors.matching.overlaps import AnchorOverlaps

__all__ = ["BACKGROUND", "IGNORE", "Matcher"]

BACKGROUND = -1
IGNORE = -2


def _check(gt_boxes: Tensor, gt_mask: Tensor, anchors: Tensor) -> None:
    if gt_boxes.dim() != 3 or gt_boxes.shape[-1] != 4:
        raise ValueError(f"gt_boxes must be [B, G, 4], got {tuple(gt_boxes.shape)}")
    if gt_mask.shape != gt_boxes.shape[:2] or gt_mask.dtype != torch.bool:
        raise ValueError(f"gt_mask must be bool [B, G] = {tuple(gt_boxes.shape[:2])}")
    if anchors.dim() != 2 or anchors.shape[-1] != 4:
        raise ValueError(f"anchors must be [A, 4], got {tuple(anchors.shape)}")


class Matcher(ABC):
    """Base class: call with ``(gt_boxes, gt_mask, anchors)``, get ``matches [B, A]``.

    The call checks the inputs, answers a batch without gt slots (all background),
    moves the mask to the boxes' device and calls :meth:`match` with the anchors as a
    tensor on that device and ``overlaps``: their tables when the caller has them
    (else None; :func:`~ssdlit.anchors.matching.overlaps.overlaps_for` builds them).
    """

    def __call__(
        self, gt_boxes: Tensor, gt_mask: Tensor, anchors: Tensor | AnchorOverlaps
    ) -> Tensor:
        overlaps = anchors if isinstance(anchors, AnchorOverlaps) else None
        anchors = overlaps.anchors if overlaps is not None else anchors
        _check(gt_boxes, gt_mask, anchors)
        if gt_boxes.shape[1] == 0:  # nothing to match: every anchor is background
            b, a = gt_boxes.shape[0], anchors.shape[0]
            return gt_boxes.new_full((b, a), BACKGROUND, dtype=torch.long)
        dev = gt_boxes.device
        return self.match(gt_boxes, gt_mask.to(dev), anchors.to(dev), overlaps)

    @abstractmethod
    def match(
        self,
        gt_boxes: Tensor,
        gt_mask: Tensor,
        anchors: Tensor,
        overlaps: AnchorOverlaps | None = None,
    ) -> Tensor:
        """``matches [B, A]`` for a batch with at least one (maybe padded) gt slot."""
