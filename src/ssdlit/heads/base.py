"""The contract every detector head fulfils, and the reshape that puts outputs in anchor order.

A head is the plugin point of ssdlit: it owns its layers, its loss and the way its raw
outputs become class probabilities and boxes. The :class:`~ssdlit.Detector` and the
training module only ever talk to a head through the four methods of
:class:`DetectionHead`; anything a head needs between them travels in the outputs dict.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["DetectionHead", "flatten_level", "flatten_levels", "prior_bias"]


def prior_bias(prior: float) -> float:
    """Logit bias that makes ``sigmoid(bias) == prior`` (RetinaNet's ``-log((1 - p) / p)``)."""
    if not 0.0 < prior < 1.0:
        raise ValueError(f"prior probability must be in (0, 1), got {prior}")
    return -math.log((1.0 - prior) / prior)


def flatten_level(x: Tensor, values_per_anchor: int) -> Tensor:
    """One level's predictions ``[B, n * k, H, W]`` -> ``[B, H * W * n, k]`` in anchor order.

    Channel ``a * k + j`` of cell ``(y, x)`` becomes value ``j`` of anchor
    ``(y * W + x) * n + a``: rows are (y, x, anchor), the order of the anchor generators.
    """
    b, c, h, w = x.shape
    if c % values_per_anchor:
        raise ValueError(
            f"{c} channels are not a whole number of anchors of {values_per_anchor} values"
        )
    # [B, C, H, W] -> [B, H, W, C] -> [B, H * W * n, k]
    return x.permute(0, 2, 3, 1).reshape(b, h * w * (c // values_per_anchor), values_per_anchor)


def flatten_levels(xs: Sequence[Tensor], values_per_anchor: int) -> Tensor:
    """:func:`flatten_level` on every level, concatenated: ``[B, A, k]`` (level, y, x, anchor)."""
    parts = [flatten_level(x, values_per_anchor) for x in xs]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _check_levels(in_channels: Sequence[int], num_anchors: Sequence[int], num_classes: int) -> None:
    if len(in_channels) == 0:
        raise ValueError("a head needs at least one feature level (in_channels is empty)")
    if len(in_channels) != len(num_anchors):
        raise ValueError(
            f"in_channels and num_anchors need one entry per level: {list(in_channels)} vs "
            f"{list(num_anchors)}"
        )
    if any(int(c) <= 0 for c in in_channels) or any(int(n) <= 0 for n in num_anchors):
        raise ValueError(
            f"in_channels and num_anchors must be positive, got {list(in_channels)}, "
            f"{list(num_anchors)}"
        )
    if int(num_classes) <= 0:
        raise ValueError(
            f"num_classes (object classes, without background) must be >= 1, got {num_classes}"
        )


class DetectionHead(nn.Module, ABC):
    """Base class of the heads in :data:`ssdlit.registry.HEADS`.

    Constructor (keyword-only, as every registered component):

    Args:
        in_channels: channels of each feature level, finest first (the backbone's
            ``out_channels``).
        num_anchors: anchors per location of each level (the anchor generator's
            ``num_anchors_per_location()``).
        num_classes: C, the number of object classes **without** background; labels
            are 1..C and 0 means background.

    Shapes: B images, A anchors over all levels in the order (level, row y, column x,
    box), G padded ground-truth slots, K classifier columns (C + 1 for softmax heads,
    C or 1 + C for sigmoid heads).
    """

    def __init__(
        self, *, in_channels: Sequence[int], num_anchors: Sequence[int], num_classes: int
    ) -> None:
        super().__init__()
        _check_levels(in_channels, num_anchors, num_classes)
        self.in_channels = [int(c) for c in in_channels]
        self.num_anchors = [int(n) for n in num_anchors]
        self.num_classes = int(num_classes)

    @property
    def num_levels(self) -> int:
        """Number of feature levels the head was built for."""
        return len(self.in_channels)

    def _check_features(self, features: Sequence[Tensor]) -> None:
        if len(features) != self.num_levels:
            raise ValueError(
                f"{type(self).__name__} was built for {self.num_levels} levels, got "
                f"{len(features)} feature maps"
            )
        for level, (f, c) in enumerate(zip(features, self.in_channels, strict=True)):
            if f.dim() != 4 or f.shape[1] != c:
                raise ValueError(
                    f"level {level}: expected a [B, {c}, H, W] feature map, got {tuple(f.shape)}"
                )

    def bind_anchor_grid(self, cells: Tensor) -> None:
        """Receive each anchor's grid cell ``[A, 4]`` cxcywh normalised, in anchor order
        (:meth:`ssdlit.anchors.AnchorGenerator.cells`: centred on the anchor, one step of
        its level wide and high). The :class:`~ssdlit.Detector` calls it once with the
        anchors it builds. Heads whose boxes are relative to the grid (YOLO) keep it, as
        a non-persistent buffer; the others need nothing from it."""

    @abstractmethod
    def forward(self, features: list[Tensor]) -> dict[str, Tensor]:
        """Raw predictions for feature maps ``[B, C_l, H_l, W_l]`` (finest first).

        Returns a dict with at least ``cls_logits [B, A, K]`` and ``box_deltas [B, A, 4]``
        in anchor order (level, y, x, box); a head may add what its other methods need.
        """

    @abstractmethod
    def scores(self, outputs: dict[str, Tensor]) -> Tensor:
        """Class probabilities ``[B, A, C + 1]`` in [0, 1]; column 0 is background.

        Softmax heads return the softmax (rows sum to 1); sigmoid heads return their
        per-class probabilities in columns 1..C and say what column 0 holds.
        """

    @abstractmethod
    def decode_boxes(self, outputs: dict[str, Tensor], anchors: Tensor) -> Tensor:
        """Predicted boxes ``[B, A, 4]`` cxcywh normalised, from ``anchors [A, 4]`` cxcywh."""

    @abstractmethod
    def loss(
        self,
        outputs: dict[str, Tensor],
        matches: Tensor,
        gt_boxes: Tensor,
        gt_labels: Tensor,
        anchors: Tensor,
    ) -> dict[str, Tensor]:
        """Training loss of one batch.

        Args:
            outputs: what :meth:`forward` returned.
            matches: ``[B, A]`` long from a matcher: gt index (>= 0), ``-1`` background,
                ``-2`` ignored (enters no term).
            gt_boxes: ``[B, G, 4]`` xyxy normalised (padding anywhere matches never point).
            gt_labels: ``[B, G]`` int64 in 1..C (0 on padding).
            anchors: ``[A, 4]`` cxcywh normalised.

        Returns:
            ``{"loss": total, "loss_<term>": ...}``: scalar tensors, the total (what is
            back-propagated) under ``"loss"`` and every term under its own name.
        """

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, num_anchors={self.num_anchors}, "
            f"num_classes={self.num_classes}"
        )
