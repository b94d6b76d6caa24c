"""SSD heads: one convolutional predictor per level for classes and one for box deltas.

``ssd`` uses plain 3x3 convolutions (Liu et al. 2016); ``ssdlite`` uses depthwise-separable
ones (MobileNetV2 paper, torchvision's ``SSDLiteHead``). Both predict softmax classes
(column 0 = background) and SSD centroid deltas, and train with the MultiBox loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ssdlit.boxes import BoxCoder
from ssdlit.heads.base import DetectionHead, flatten_levels
from ssdlit.heads.losses import MINING, N_NEG_MIN, NEG_POS_RATIO, MultiBoxLoss
from ssdlit.registry import HEADS

__all__ = ["SSDHead", "SSDLiteHead"]


@HEADS.register("ssd")
class SSDHead(DetectionHead):
    """The SSD head: per level a 3x3 convolution (padding 1) for the class logits
    (``n * (C + 1)`` channels) and one for the box deltas (``n * 4`` channels).

    Outputs: ``cls_logits [B, A, C + 1]`` (softmax, column 0 = background) and
    ``box_deltas [B, A, 4]`` decoded by ``BoxCoder(variances)``. Weights are Xavier
    uniform with zero bias, as in the Caffe SSD.

    Loss (:class:`~ssdlit.heads.losses.MultiBoxLoss`): ``{"loss", "loss_cls",
    "loss_box"}`` with ``loss = loss_cls + alpha * loss_box``. ``loss_box`` is, on the
    positives only, smooth-L1 between ``box_deltas`` and the encoded matched gt
    (``box_loss="smooth_l1"``, the paper), or an IoU loss of torchvision.ops between the
    decoded boxes and the matched gt, both ``[P, 4]`` xyxy normalised
    (``"giou"``, ``"diou"``, ``"ciou"``), or two summed (``"smooth_l1+giou"``).

    Args:
        in_channels, num_anchors, num_classes: see :class:`~ssdlit.heads.base.DetectionHead`.
        variances: the box coder's variances.
        neg_pos_ratio, n_neg_min, alpha, mining, beta, box_loss: the MultiBox loss
            options (see :class:`~ssdlit.heads.losses.MultiBoxLoss`); by default 3
            negatives per positive, mined per image, and at least
            :data:`~ssdlit.heads.losses.N_NEG_MIN` per image so that images without
            objects teach the background too; smooth-L1 box term weighted by ``alpha``
            1. An unknown ``box_loss`` is a ``ValueError`` at construction.
    """

    def __init__(
        self,
        *,
        in_channels: Sequence[int],
        num_anchors: Sequence[int],
        num_classes: int,
        variances: Sequence[float] = (0.1, 0.1, 0.2, 0.2),
        neg_pos_ratio: float = NEG_POS_RATIO,
        n_neg_min: int = N_NEG_MIN,
        alpha: float = 1.0,
        mining: str = MINING,
        beta: float = 1.0,
        box_loss: str = "smooth_l1",
    ) -> None:
        super().__init__(in_channels=in_channels, num_anchors=num_anchors, num_classes=num_classes)
        self.coder = BoxCoder(variances)
        self.criterion = MultiBoxLoss(
            neg_pos_ratio=neg_pos_ratio,
            n_neg_min=n_neg_min,
            alpha=alpha,
            mining=mining,
            coder=self.coder,
            beta=beta,
            box_loss=box_loss,
        )
        k = self.num_classes + 1
        self.cls_predictors = nn.ModuleList(
            self._predictor(c, n * k)
            for c, n in zip(self.in_channels, self.num_anchors, strict=True)
        )
        self.box_predictors = nn.ModuleList(
            self._predictor(c, n * 4)
            for c, n in zip(self.in_channels, self.num_anchors, strict=True)
        )
        self.reset_parameters()

    def _predictor(self, in_channels: int, out_channels: int) -> nn.Module:
        return nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)

    def reset_parameters(self) -> None:
        """Xavier-uniform weights and zero biases on every convolution."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, features: list[Tensor]) -> dict[str, Tensor]:
        """``cls_logits [B, A, C + 1]`` and ``box_deltas [B, A, 4]`` in anchor order."""
        self._check_features(features)
        pairs = list(zip(self.cls_predictors, self.box_predictors, features, strict=True))
        cls = [pc(f) for pc, _, f in pairs]  # [B, n * K, H, W] per level
        box = [pb(f) for _, pb, f in pairs]  # [B, n * 4, H, W] per level
        return {
            "cls_logits": flatten_levels(cls, self.num_classes + 1),
            "box_deltas": flatten_levels(box, 4),
        }

    def scores(self, outputs: dict[str, Tensor]) -> Tensor:
        """Softmax ``[B, A, C + 1]`` (rows sum to 1, column 0 = background)."""
        return outputs["cls_logits"].softmax(dim=-1)

    def decode_boxes(self, outputs: dict[str, Tensor], anchors: Tensor) -> Tensor:
        """``[B, A, 4]`` cxcywh: the deltas decoded against ``anchors [A, 4]`` by the coder."""
        deltas = outputs["box_deltas"]
        return self.coder.decode(deltas, anchors.to(device=deltas.device, dtype=deltas.dtype))

    def loss(
        self,
        outputs: dict[str, Tensor],
        matches: Tensor,
        gt_boxes: Tensor,
        gt_labels: Tensor,
        anchors: Tensor,
    ) -> dict[str, Tensor]:
        """The MultiBox loss: ``{"loss", "loss_cls", "loss_box"}``, normalised by the positives
        (``loss_box``: the configured ``box_loss``)."""
        return self.criterion(
            outputs["cls_logits"], outputs["box_deltas"], matches, gt_boxes, gt_labels, anchors
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, criterion={self.criterion}"


@HEADS.register("ssdlite")
class SSDLiteHead(SSDHead):
    """The SSDLite head: the :class:`SSDHead` with depthwise-separable predictors.

    Each predictor is a 3x3 depthwise convolution + BatchNorm + ReLU6 followed by a 1x1
    pointwise convolution (with bias), as torchvision's ``SSDLiteHead``; weights are
    initialised from N(0, 0.03) with zero bias, as torchvision does.

    Args:
        bn_eps, bn_momentum: the BatchNorm options (torchvision: 0.001 and 0.03).
        ssd_options: every option of :class:`SSDHead` (keyword-only, the same defaults).
    """

    def __init__(
        self, *, bn_eps: float = 0.001, bn_momentum: float = 0.03, **ssd_options: Any
    ) -> None:
        self._bn = {"eps": float(bn_eps), "momentum": float(bn_momentum)}
        super().__init__(**ssd_options)

    def _predictor(self, in_channels: int, out_channels: int) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(
                in_channels, in_channels, kernel_size=3, padding=1, groups=in_channels, bias=False
            ),
            nn.BatchNorm2d(in_channels, **self._bn),
            nn.ReLU6(inplace=True),
            nn.Conv2d(in_channels, out_channels, kernel_size=1),
        )

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, 0.03) convolution weights, zero biases; BatchNorm to identity."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, mean=0.0, std=0.03)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()
