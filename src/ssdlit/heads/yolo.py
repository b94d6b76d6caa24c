"""The YOLOv3 head (Redmon and Farhadi 2018): objectness, sigmoid classes, grid-relative boxes."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssdlit.anchors.matching import IGNORE
from ssdlit.boxes import convert
from ssdlit.heads.base import DetectionHead, flatten_levels, prior_bias
from ssdlit.heads.losses import gather_rows, positive_targets
from ssdlit.registry import HEADS

__all__ = ["YoloHead"]

XY_LOSSES = ("mse", "bce")


@HEADS.register("yolo")
class YoloHead(DetectionHead):
    """The YOLOv3 detection layers: per level an optional 3x3 conv + BN + LeakyReLU(0.1)
    block (mmdetection's ``YOLOV3Head``) and a 1x1 predictor of ``n * (5 + C)`` channels,
    each anchor's channels in darknet order (tx, ty, tw, th, objectness, classes).

    Outputs: ``cls_logits [B, A, 1 + C]`` (objectness logit first, then the C class
    logits, all sigmoid) and ``box_deltas [B, A, 4]`` = (tx, ty, tw, th).

    Boxes are relative to each anchor's grid cell, :attr:`anchor_cells` ``[A, 4]``
    cxcywh normalised: the anchor generator's own cells
    (:meth:`~ssdlit.anchors.AnchorGenerator.cells`, centred on the anchor, one step of
    its level wide and high), which the :class:`~ssdlit.Detector` hands over with
    :meth:`bind_anchor_grid` when it builds its anchors (a non-persistent buffer that
    moves with the module). Decoding::

        cx = cx_cell + (sigmoid(tx) - 0.5) * w_cell      w = w_anchor * exp(tw)
        cy = cy_cell + (sigmoid(ty) - 0.5) * h_cell      h = h_anchor * exp(th)

    which is YOLOv3's ``(c_x + sigmoid(tx)) * stride``: the centre reaches exactly the
    cell whose anchor the YOLOv3 matcher makes responsible (the nearest centre), also
    where stride x feature size differs from the input size. ``tw, th`` are clamped to
    at most ``log(1000 / 16)`` before ``exp``.

    Loss (all sums **divided by the batch size**, as darknet and mmdetection do):

    - ``loss_obj``: BCE of the objectness, target 1 on positives, 0 on background,
      ignored anchors excluded;
    - ``loss_cls``: BCE of the C classes on positives against the one-hot label;
    - ``loss_xy``: on positives, MSE between ``sigmoid(tx, ty)`` and the gt centre's
      position in the cell (``xy_loss="mse"``, darknet's) or BCE with logits on it
      (``"bce"``; note its minimum is the targets' entropy, not 0);
    - ``loss_wh``: on positives, MSE between ``(tw, th)`` and ``log(w_gt / w_anchor)``,
      ``log(h_gt / h_anchor)``;
    - with ``box_scale`` the two box terms of each positive are weighted by
      ``2 - w_gt * h_gt`` (YOLOv3's emphasis on small boxes).

    ``loss = obj_weight * loss_obj + cls_weight * loss_cls + box_weight * (loss_xy + loss_wh)``.

    ``scores``: column c >= 1 is ``sigmoid(obj) * sigmoid(class c)``; column 0 is
    ``1 - sigmoid(obj)`` (the probability of "no object").

    Args:
        in_channels, num_anchors, num_classes: see :class:`~ssdlit.heads.base.DetectionHead`.
        hidden_channels: channels of the 3x3 block per level (one number or one per
            level); ``None`` doubles each level's input channels (YOLOv3), 0 removes the block.
        obj_prior, cls_prior: initial objectness and class probabilities (bias init).
        xy_loss: ``"mse"`` or ``"bce"``.
        box_scale: weight the box terms by ``2 - w * h``.
        obj_weight, cls_weight, box_weight: weights of the terms in the total.
    """

    def __init__(
        self,
        *,
        in_channels: Sequence[int],
        num_anchors: Sequence[int],
        num_classes: int,
        hidden_channels: int | Sequence[int] | None = None,
        obj_prior: float = 0.01,
        cls_prior: float = 0.01,
        xy_loss: str = "mse",
        box_scale: bool = True,
        obj_weight: float = 1.0,
        cls_weight: float = 1.0,
        box_weight: float = 1.0,
    ) -> None:
        super().__init__(in_channels=in_channels, num_anchors=num_anchors, num_classes=num_classes)
        if xy_loss not in XY_LOSSES:
            raise ValueError(f"xy_loss must be one of {XY_LOSSES}, got {xy_loss!r}")
        if hidden_channels is None:
            hidden = [2 * c for c in self.in_channels]
        elif isinstance(hidden_channels, int):
            hidden = [hidden_channels] * self.num_levels
        else:
            hidden = [int(h) for h in hidden_channels]
        if len(hidden) != self.num_levels or any(h < 0 for h in hidden):
            raise ValueError(
                f"hidden_channels needs one non-negative number per level, got {hidden_channels}"
            )
        self.hidden_channels = hidden
        self.values_per_anchor = 5 + self.num_classes
        self.blocks = nn.ModuleList(
            self._block(c, h) for c, h in zip(self.in_channels, self.hidden_channels, strict=True)
        )
        self.predictors = nn.ModuleList(
            nn.Conv2d(h or c, n * self.values_per_anchor, kernel_size=1)
            for c, h, n in zip(
                self.in_channels, self.hidden_channels, self.num_anchors, strict=True
            )
        )
        self.obj_prior = float(obj_prior)
        self.cls_prior = float(cls_prior)
        self.xy_loss = xy_loss
        self.box_scale = bool(box_scale)
        self.weights = {
            "obj": float(obj_weight),
            "cls": float(cls_weight),
            "box": float(box_weight),
        }
        self.max_log_scale = math.log(1000.0 / 16)
        self.register_buffer("anchor_cells", torch.empty(0, 4), persistent=False)
        self.reset_parameters()

    def bind_anchor_grid(self, cells: Tensor) -> None:
        """Keep each anchor's grid cell ``[A, 4]`` cxcywh normalised (the generator's
        :meth:`~ssdlit.anchors.AnchorGenerator.cells`) as the non-persistent buffer
        :attr:`anchor_cells`, which every decoding and encoding is relative to."""
        if cells.dim() != 2 or cells.shape[1] != 4:
            raise ValueError(f"cells must be [A, 4], got {tuple(cells.shape)}")
        self.anchor_cells = cells.detach().to(self.anchor_cells.device)

    def _cells(self, anchors: Tensor, like: Tensor) -> Tensor:
        """:attr:`anchor_cells` in the device and dtype of ``like``, checked against ``anchors``."""
        if self.anchor_cells.shape[0] != anchors.shape[0]:
            raise RuntimeError(
                f"the YOLO head decodes relative to each anchor's grid cell, but it holds "
                f"{self.anchor_cells.shape[0]} cells for {anchors.shape[0]} anchors: call "
                "head.bind_anchor_grid(generator.cells(feature_sizes)) (a Detector does)"
            )
        return self.anchor_cells.to(device=like.device, dtype=like.dtype)

    @staticmethod
    def _block(in_channels: int, hidden: int) -> nn.Module:
        if hidden == 0:
            return nn.Identity()
        return nn.Sequential(
            nn.Conv2d(in_channels, hidden, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.LeakyReLU(0.1, inplace=True),
        )

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Kaiming blocks; predictors N(0, 0.01) with the objectness and class biases at
        their priors' logits and zero box biases."""
        for block in self.blocks:
            for m in block.modules():
                if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
                    m.reset_parameters()
        v = self.values_per_anchor
        for pred in self.predictors:
            nn.init.normal_(pred.weight, std=0.01)
            bias = pred.bias.view(-1, v)  # [n, 5 + C]
            bias[:, :4] = 0.0
            bias[:, 4] = prior_bias(self.obj_prior)
            bias[:, 5:] = prior_bias(self.cls_prior)

    def forward(self, features: list[Tensor]) -> dict[str, Tensor]:
        """``cls_logits [B, A, 1 + C]`` and ``box_deltas [B, A, 4]``."""
        self._check_features(features)
        raw = [p(b(f)) for b, p, f in zip(self.blocks, self.predictors, features, strict=True)]
        out = flatten_levels(raw, self.values_per_anchor)  # [B, A, 5 + C]
        return {"cls_logits": out[..., 4:], "box_deltas": out[..., :4]}

    def scores(self, outputs: dict[str, Tensor]) -> Tensor:
        """``[B, A, C + 1]``: ``1 - sigmoid(obj)``, then ``sigmoid(obj) * sigmoid(class)``."""
        probs = outputs["cls_logits"].sigmoid()  # [B, A, 1 + C]
        obj = probs[..., :1]
        return torch.cat((1.0 - obj, obj * probs[..., 1:]), dim=-1)

    def decode_boxes(self, outputs: dict[str, Tensor], anchors: Tensor) -> Tensor:
        """``[B, A, 4]`` cxcywh: the grid-relative YOLOv3 decoding (see the class docstring)."""
        t = outputs["box_deltas"]  # [B, A, 4]
        anchors = anchors.to(device=t.device, dtype=t.dtype)
        cells = self._cells(anchors, t)  # [A, 4]
        centre = cells[:, :2] + (t[..., :2].sigmoid() - 0.5) * cells[:, 2:]
        size = anchors[:, 2:] * t[..., 2:].clamp(max=self.max_log_scale).exp()
        return torch.cat((centre, size), dim=-1)

    def encode_boxes(self, boxes_cxcywh: Tensor, anchors: Tensor) -> Tensor:
        """Targets ``[..., A, 4]``: the position (sx, sy) in [0, 1] of each box centre in
        its anchor's cell and (log(w / w_anchor), log(h / h_anchor)); the inverse of
        :meth:`decode_boxes` with ``sx = sigmoid(tx)``. ``boxes_cxcywh [..., A, 4]``,
        ``anchors [A, 4]`` (both cxcywh normalised). A centre outside the cell (which
        the YOLOv3 matcher never assigns) is clamped to its edge.
        """
        return self._encode(boxes_cxcywh, anchors, self._cells(anchors, boxes_cxcywh))

    @staticmethod
    def _encode(boxes_cxcywh: Tensor, anchors: Tensor, cells: Tensor) -> Tensor:
        """:meth:`encode_boxes` against given ``anchors`` and their ``cells`` (``[N, 4]``
        each, broadcast against ``boxes_cxcywh [..., N, 4]``)."""
        sxy = ((boxes_cxcywh[..., :2] - cells[:, :2]) / cells[:, 2:] + 0.5).clamp(0.0, 1.0)
        twh = torch.log(boxes_cxcywh[..., 2:] / anchors[:, 2:])
        return torch.cat((sxy, twh), dim=-1)

    def loss(
        self,
        outputs: dict[str, Tensor],
        matches: Tensor,
        gt_boxes: Tensor,
        gt_labels: Tensor,
        anchors: Tensor,
    ) -> dict[str, Tensor]:
        """``{"loss", "loss_obj", "loss_cls", "loss_xy", "loss_wh"}``, sums / batch size."""
        logits = outputs["cls_logits"]
        dtype = torch.promote_types(logits.dtype, torch.float32)
        logits = logits.to(dtype)
        anchors = anchors.to(device=logits.device, dtype=dtype)
        b, a = matches.shape
        positive = matches >= 0  # [B, A]
        valid = matches != IGNORE
        p = int(positive.sum())  # the host read of the step: the positives' count
        pos, gt_xyxy, labels = positive_targets(matches, gt_boxes, gt_labels, p, positive)

        obj = F.binary_cross_entropy_with_logits(
            logits[..., 0], positive.to(dtype), reduction="none"
        )
        loss_obj = (obj * valid).sum() / b

        rows = gather_rows(logits.reshape(b * a, -1), pos)  # [P, 1 + C]
        onehot = F.one_hot(labels, self.num_classes + 1)[:, 1:].to(dtype)  # [P, C]
        cls = F.binary_cross_entropy_with_logits(rows[:, 1:], onehot, reduction="sum")
        loss_cls = cls / b

        gt = convert(gt_xyxy.to(dtype), "xyxy", "cxcywh")  # [P, 4]
        anchor = pos % a
        cells = self._cells(anchors, gt).index_select(0, anchor)
        target = self._encode(gt, anchors.index_select(0, anchor), cells)  # [P, 4]
        weight = 2.0 - gt[:, 2] * gt[:, 3] if self.box_scale else gt.new_ones(p)  # [P]
        t = gather_rows(outputs["box_deltas"].reshape(b * a, 4), pos).to(dtype)
        if self.xy_loss == "mse":
            xy = F.mse_loss(t[:, :2].sigmoid(), target[:, :2], reduction="none")
        else:
            xy = F.binary_cross_entropy_with_logits(t[:, :2], target[:, :2], reduction="none")
        wh = F.mse_loss(t[:, 2:], target[:, 2:], reduction="none")
        loss_xy = (xy.sum(-1) * weight).sum() / b
        loss_wh = (wh.sum(-1) * weight).sum() / b

        w = self.weights
        total = w["obj"] * loss_obj + w["cls"] * loss_cls + w["box"] * (loss_xy + loss_wh)
        return {
            "loss": total,
            "loss_obj": loss_obj,
            "loss_cls": loss_cls,
            "loss_xy": loss_xy,
            "loss_wh": loss_wh,
        }

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, hidden_channels={self.hidden_channels}, "
            f"xy_loss={self.xy_loss!r}, box_scale={self.box_scale}, weights={self.weights}"
        )
