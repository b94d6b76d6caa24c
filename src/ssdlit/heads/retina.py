"""The RetinaNet head (Lin et al. 2017): shared conv towers, sigmoid classes, focal loss."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from ssdlit.anchors.matching import IGNORE
from ssdlit.boxes import BoxCoder, convert
from ssdlit.heads.base import DetectionHead, flatten_levels, prior_bias
from ssdlit.heads.losses import gather_rows, positive_targets
from ssdlit.registry import HEADS

__all__ = ["RetinaHead"]

BOX_LOSSES = ("smooth_l1", "l1")


def _tower(in_channels: int, channels: int, num_convs: int, group_norm: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(num_convs):
        c_in = in_channels if i == 0 else channels
        layers.append(nn.Conv2d(c_in, channels, kernel_size=3, padding=1, bias=not group_norm))
        if group_norm:
            layers.append(nn.GroupNorm(group_norm, channels))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


@HEADS.register("retina")
class RetinaHead(DetectionHead):
    """RetinaNet's classification and regression subnets, shared by all levels.

    Each subnet is ``num_convs`` 3x3 convolutions of ``channels`` channels with ReLU
    (and GroupNorm when ``group_norm`` > 0, as torchvision's RetinaNet v2) followed by a
    3x3 predictor: ``n * C`` class logits (sigmoid, **no** background column) and ``n * 4``
    box deltas for the :class:`~ssdlit.boxes.BoxCoder`. Weights N(0, 0.01), zero bias,
    and the class predictor's bias at ``-log((1 - prior) / prior)``.

    Shared layers need the same number of anchors on every level. When the levels have
    different channel counts, a 1x1 convolution per level first projects each one to
    ``channels`` (with equal counts the towers read the features directly).

    Loss: sigmoid focal loss (torchvision's, ``focal_alpha``, ``focal_gamma``) over every
    class of the positive and background anchors (ignored anchors excluded), plus
    ``box_weight`` times smooth-L1 (``beta``) or L1 on the positives' deltas; both terms
    divided by max(1, positives in the batch) (Detectron's normalisation).

    Args:
        in_channels, num_anchors, num_classes: see :class:`~ssdlit.heads.base.DetectionHead`.
        channels: width of the towers (256 in the paper).
        num_convs: convolutions per tower (4).
        group_norm: number of GroupNorm groups after each tower convolution; 0 for none.
        prior: initial foreground probability of every class (0.01).
        variances: the box coder's variances (1, 1, 1, 1: plain Faster R-CNN deltas).
        focal_alpha, focal_gamma: focal loss options (0.25, 2).
        box_loss: ``"smooth_l1"`` (Detectron) or ``"l1"`` (torchvision).
        beta: smooth-L1 transition point (Detectron's 0.11).
        box_weight: weight of the box term in the total.
    """

    def __init__(
        self,
        *,
        in_channels: Sequence[int],
        num_anchors: Sequence[int],
        num_classes: int,
        channels: int = 256,
        num_convs: int = 4,
        group_norm: int = 0,
        prior: float = 0.01,
        variances: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        box_loss: str = "smooth_l1",
        beta: float = 0.11,
        box_weight: float = 1.0,
    ) -> None:
        super().__init__(in_channels=in_channels, num_anchors=num_anchors, num_classes=num_classes)
        if len(set(self.num_anchors)) != 1:
            raise ValueError(
                f"the retina head shares its predictors across levels and needs the same "
                f"number of anchors per location on every level, got {self.num_anchors}"
            )
        if box_loss not in BOX_LOSSES:
            raise ValueError(f"box_loss must be one of {BOX_LOSSES}, got {box_loss!r}")
        if group_norm and channels % group_norm:
            raise ValueError(
                f"channels ({channels}) must be divisible by group_norm ({group_norm})"
            )
        if num_convs < 0 or channels <= 0:
            raise ValueError("num_convs must be >= 0 and channels > 0")
        n = self.num_anchors[0]
        same = len(set(self.in_channels)) == 1
        tower_in = self.in_channels[0] if same else channels
        self.lateral = (
            None
            if same
            else nn.ModuleList(nn.Conv2d(c, channels, kernel_size=1) for c in self.in_channels)
        )
        self.cls_tower = _tower(tower_in, channels, num_convs, group_norm)
        self.box_tower = _tower(tower_in, channels, num_convs, group_norm)
        last = channels if num_convs else tower_in
        self.cls_predictor = nn.Conv2d(last, n * self.num_classes, kernel_size=3, padding=1)
        self.box_predictor = nn.Conv2d(last, n * 4, kernel_size=3, padding=1)
        self.prior = float(prior)
        self.coder = BoxCoder(variances)
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)
        self.box_loss = box_loss
        self.beta = float(beta)
        self.box_weight = float(box_weight)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, 0.01) convolutions with zero bias; the class bias at the prior's logit."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                m.reset_parameters()
        nn.init.constant_(self.cls_predictor.bias, prior_bias(self.prior))

    def forward(self, features: list[Tensor]) -> dict[str, Tensor]:
        """``cls_logits [B, A, C]`` (sigmoid logits, no background) and ``box_deltas [B, A, 4]``."""
        self._check_features(features)
        if self.lateral is not None:
            features = [proj(f) for proj, f in zip(self.lateral, features, strict=True)]
        cls = [self.cls_predictor(self.cls_tower(f)) for f in features]  # [B, n * C, H, W]
        box = [self.box_predictor(self.box_tower(f)) for f in features]  # [B, n * 4, H, W]
        return {
            "cls_logits": flatten_levels(cls, self.num_classes),
            "box_deltas": flatten_levels(box, 4),
        }

    def scores(self, outputs: dict[str, Tensor]) -> Tensor:
        """``[B, A, C + 1]``: 0 in column 0, the sigmoid of each class in columns 1..C."""
        probs = outputs["cls_logits"].sigmoid()  # [B, A, C]
        return torch.cat((torch.zeros_like(probs[..., :1]), probs), dim=-1)

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
        """``{"loss", "loss_cls" (focal), "loss_box"}``, each divided by max(1, positives).

        ``loss = loss_cls + box_weight * loss_box``.
        """
        logits = outputs["cls_logits"]
        dtype = torch.promote_types(logits.dtype, torch.float32)
        logits = logits.to(dtype)
        b, a = matches.shape
        positive = matches >= 0  # [B, A]
        valid = matches != IGNORE  # [B, A]
        p = int(positive.sum())  # the host read of the step: the positives' count
        pos, gt_xyxy, pos_labels = positive_targets(matches, gt_boxes, gt_labels, p, positive)
        # one-hot over 1..C: background rows (and ignored ones, masked below) are all 0
        onehot = torch.zeros_like(logits).view(b * a, -1)
        onehot.index_put_((pos, pos_labels - 1), onehot.new_ones(p))
        focal = sigmoid_focal_loss(
            logits,
            onehot.view_as(logits),
            alpha=self.focal_alpha,
            gamma=self.focal_gamma,
            reduction="none",
        ).sum(-1)  # [B, A]
        cls_sum = (focal * valid).sum()

        anchors = anchors.to(device=logits.device, dtype=dtype)
        matched = convert(gt_xyxy.to(dtype), "xyxy", "cxcywh")  # [P, 4]
        targets = self.coder.encode(matched, anchors.index_select(0, pos % a))  # [P, 4]
        deltas = gather_rows(outputs["box_deltas"].reshape(b * a, 4), pos).to(dtype)
        if self.box_loss == "l1":
            box_sum = F.l1_loss(deltas, targets, reduction="sum")
        else:
            box_sum = F.smooth_l1_loss(deltas, targets, beta=self.beta, reduction="sum")

        n = float(max(p, 1))
        loss_cls, loss_box = cls_sum / n, box_sum / n
        return {
            "loss": loss_cls + self.box_weight * loss_box,
            "loss_cls": loss_cls,
            "loss_box": loss_box,
        }

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, prior={self.prior}, focal=({self.focal_alpha}, "
            f"{self.focal_gamma}), box_loss={self.box_loss!r}, coder={self.coder}"
        )
