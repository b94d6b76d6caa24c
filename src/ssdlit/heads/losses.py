"""Loss pieces shared by the heads: target gathering and the SSD MultiBox loss.

Everything here works on the whole batch at once; there is no loop over images.
``matches [B, A]`` comes from a matcher: gt index (>= 0), ``BACKGROUND`` (-1) or
``IGNORE`` (-2, enters no term).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ssdlit.anchors.matchers import BACKGROUND, positive_indices
from ssdlit.boxes import BoxCoder, convert

__all__ = [
    "MINING",
    "MINING_MODES",
    "NEG_POS_RATIO",
    "N_NEG_MIN",
    "MultiBoxLoss",
    "encode_targets",
    "gather_targets",
    "hard_negative_mask",
    "multibox_loss",
    "positive_targets",
]

MINING_MODES = ("per_image", "per_batch")

#: The MultiBox defaults, used by every signature below and by the SSD heads (the
#: head configs conf/head/ssd.yaml and ssdlite.yaml state the same values; a test
#: keeps them equal). 3 negatives per positive, mined per image (the SSD paper), and
#: at least N_NEG_MIN negatives per image: an image without objects (a background
#: photo added to cut false positives) has no positive, so without the minimum its
#: budget, its loss and its gradient would be exactly 0. 16 is what an image with a
#: handful of positives gets from the ratio, so it seldom changes images with objects.
NEG_POS_RATIO = 3.0
N_NEG_MIN = 16
MINING = "per_image"


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


def positive_targets(
    matches: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    anchors: Tensor,
    coder: BoxCoder,
    positives: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Training targets touching only the positive anchors (the sparse counterpart of
    :func:`gather_targets` + :func:`encode_targets`; it needs ``nonzero``, so it runs
    on real devices only, not on the meta device the dense loss also supports).

    Args:
        matches: ``[B, A]`` long (gt index, -1 background, -2 ignored).
        gt_boxes: ``[B, G, 4]`` xyxy normalised.
        gt_labels: ``[B, G]`` int64 in 1..C.
        anchors: ``[A, 4]`` cxcywh normalised.
        coder: encodes each positive's gt against its anchor.
        positives: ``[P]`` long, the flat indices of ``matches >= 0`` ascending, when
            already known (:meth:`ssdlit.anchors.Matcher.match_positives`); else searched.
    Returns:
        ``image [P]`` and ``anchor [P]`` (long) of the P positives in row-major
        order, their regression targets ``[P, 4]`` (``coder.encode``, the dtype of
        ``gt_boxes``) and ``labels [B, A]`` int64: the matched gt's label for
        positives, 0 for every other anchor (ignored ones included).
    """
    b, a = matches.shape
    if positives is None:
        positives = positive_indices(matches)  # [P]
    image, anchor = positives // a, positives % a
    gt = image * gt_boxes.shape[1] + matches.reshape(-1).index_select(0, positives)
    matched = convert(gt_boxes.reshape(-1, 4).index_select(0, gt), "xyxy", "cxcywh")  # [P, 4]
    loc = coder.encode(matched, anchors.to(matched.dtype).index_select(0, anchor))
    labels = torch.zeros((b, a), dtype=torch.long, device=matches.device)
    labels.view(-1).index_put_((positives,), gt_labels.reshape(-1).index_select(0, gt).long())
    return image, anchor, loc, labels


def hard_negative_mask(
    cls_loss: Tensor,
    matches: Tensor,
    neg_pos_ratio: float = NEG_POS_RATIO,
    n_neg_min: int = N_NEG_MIN,
    mining: str = MINING,
) -> Tensor:
    """Which background anchors the classification loss keeps: the hardest ones.

    The budget is ``floor(neg_pos_ratio * positives)``, raised to at least ``n_neg_min``
    and capped by the number of background anchors (``matches == -1``) whose loss is
    non-zero; the budget's worth of highest-loss background anchors is kept (ties: lower
    anchor index first). Ignored anchors (-2) are never kept.

    - ``mining="per_image"`` (SSD paper, torchvision; the default): positives,
      ``n_neg_min`` and the budget are counted per image; each image keeps its own
      hardest negatives, so an image without objects keeps its ``n_neg_min`` hardest
      (with ``n_neg_min=0``, as the paper, it keeps none and teaches nothing).
    - ``mining="per_batch"`` (ssd_keras): positives, ``n_neg_min`` and the budget are
      counted over the whole batch; the hardest negatives of the whole batch are kept,
      so an image without objects gets negatives only where they are among the
      batch's hardest (a batch without any object keeps its ``n_neg_min`` hardest).

    Args:
        cls_loss: ``[B, A]`` per-anchor classification loss (detached here).
        matches: ``[B, A]`` long.
    Returns:
        ``[B, A]`` bool mask of the kept negatives.
    """
    if mining not in MINING_MODES:
        raise ValueError(f"mining must be one of {MINING_MODES}, got {mining!r}")
    shape = matches.shape
    loss = cls_loss.detach()
    if mining == "per_batch":  # the batch is one long image
        loss, matches = loss.reshape(1, -1), matches.reshape(1, -1)
    num_pos = (matches >= 0).sum(dim=1)  # [R]
    candidates = (matches == BACKGROUND) & (loss > 0)  # [R, N]
    budget = torch.floor(num_pos.to(loss.dtype) * neg_pos_ratio).long()
    budget = budget.clamp(min=int(n_neg_min)).minimum(candidates.sum(dim=1))  # [R]
    ranked = loss.masked_fill(~candidates, -1.0)  # losses are >= 0: non-candidates go last
    order = ranked.argsort(dim=1, descending=True, stable=True)  # [R, N]
    rank = torch.arange(ranked.shape[1], device=ranked.device)  # [N]
    keep_sorted = rank[None, :] < budget[:, None]  # [R, N], in sorted order
    keep = torch.zeros_like(candidates).scatter(1, order, keep_sorted)
    return keep.reshape(shape)


def multibox_loss(
    cls_logits: Tensor,
    box_deltas: Tensor,
    matches: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    anchors: Tensor,
    coder: BoxCoder,
    *,
    neg_pos_ratio: float = NEG_POS_RATIO,
    n_neg_min: int = N_NEG_MIN,
    alpha: float = 1.0,
    mining: str = MINING,
    beta: float = 1.0,
) -> dict[str, Tensor]:
    """The SSD MultiBox loss with hard negative mining.

    - classification: softmax cross-entropy over the K = C + 1 columns (0 = background)
      on the positives and on the negatives chosen by :func:`hard_negative_mask`;
    - localisation: smooth-L1 (``beta`` 1 as in the paper; smaller is closer to L1 and
      pushes harder on small errors), summed over the 4 numbers, between the
      positives' ``box_deltas`` and ``coder.encode(matched gt, anchor)``;
    - ignored anchors (-2) enter neither term.

    Both terms are divided by N = max(1, P, M / neg_pos_ratio) with P the positives
    and M the mined negatives of the batch (``neg_pos_ratio`` 0: N = max(1, P)); the
    total is ``loss_cls + alpha * loss_box``. While the ratio sets the budgets
    (M <= ratio * P) this is the paper's N = P; where ``n_neg_min`` adds negatives
    (images without objects, or with very few positives) each negative still weighs
    what it weighs beside a positive, instead of a batch of background photos summing
    its negatives over N = 1.

    Images without objects: under the defaults (``mining="per_image"``,
    ``n_neg_min`` = :data:`N_NEG_MIN`) each keeps its hardest ``n_neg_min``
    background anchors, so its class logits get a gradient (see
    :func:`hard_negative_mask`).

    Args:
        cls_logits: ``[B, A, K]``.
        box_deltas: ``[B, A, 4]``.
        matches: ``[B, A]`` long.
        gt_boxes: ``[B, G, 4]`` xyxy normalised.
        gt_labels: ``[B, G]`` int64 in 1..C.
        anchors: ``[A, 4]`` cxcywh normalised.
        coder: the head's :class:`~ssdlit.boxes.BoxCoder`.
    Returns:
        ``{"loss", "loss_cls", "loss_box"}`` scalars (float32 or wider).
    """
    b, a, k = cls_logits.shape
    if matches.shape != (b, a) or box_deltas.shape != (b, a, 4):
        raise ValueError(
            f"shapes disagree: cls_logits {tuple(cls_logits.shape)}, box_deltas "
            f"{tuple(box_deltas.shape)}, matches {tuple(matches.shape)}"
        )
    if anchors.shape != (a, 4):
        raise ValueError(f"anchors must be [{a}, 4], got {tuple(anchors.shape)}")
    dtype = torch.promote_types(cls_logits.dtype, torch.float32)
    positive = matches >= 0  # [B, A]
    labels, matched = gather_targets(matches, gt_boxes, gt_labels)

    ce = F.cross_entropy(
        cls_logits.to(dtype).reshape(b * a, k), labels.reshape(b * a), reduction="none"
    ).reshape(b, a)
    negative = hard_negative_mask(ce, matches, neg_pos_ratio, n_neg_min, mining)
    cls_sum = (ce * (positive | negative)).sum()

    anchors = anchors.to(device=cls_logits.device, dtype=dtype)
    targets = encode_targets(coder, matched.to(dtype), anchors, positive)
    loc = F.smooth_l1_loss(box_deltas.to(dtype), targets, beta=beta, reduction="none").sum(-1)
    loc_sum = (loc * positive).sum()

    n = positive.sum().to(dtype)
    if neg_pos_ratio > 0:
        n = torch.maximum(n, negative.sum().to(dtype) / neg_pos_ratio)
    n = n.clamp(min=1)
    loss_cls, loss_box = cls_sum / n, loc_sum / n
    return {"loss": loss_cls + alpha * loss_box, "loss_cls": loss_cls, "loss_box": loss_box}


class MultiBoxLoss:
    """:func:`multibox_loss` with its options fixed: ``criterion(cls_logits, box_deltas,
    matches, gt_boxes, gt_labels, anchors) -> {"loss", "loss_cls", "loss_box"}``.

    Args:
        variances: the :class:`~ssdlit.boxes.BoxCoder` variances (ignored when ``coder`` is given).
        neg_pos_ratio: negatives kept per positive (3 in the paper).
        n_neg_min: least number of negatives kept (per image or per batch, see ``mining``;
            default :data:`N_NEG_MIN`, which gives images without objects their hardest
            negatives).
        alpha: weight of the localisation term.
        mining: ``"per_image"`` (default) or ``"per_batch"`` (see :func:`hard_negative_mask`).
        beta: the smooth-L1 transition point of the localisation term (>= 0; 0 is L1).
        coder: a ready :class:`~ssdlit.boxes.BoxCoder` to share with the head.
    """

    def __init__(
        self,
        variances: Sequence[float] = (0.1, 0.1, 0.2, 0.2),
        neg_pos_ratio: float = NEG_POS_RATIO,
        n_neg_min: int = N_NEG_MIN,
        alpha: float = 1.0,
        mining: str = MINING,
        coder: BoxCoder | None = None,
        beta: float = 1.0,
    ) -> None:
        if mining not in MINING_MODES:
            raise ValueError(f"mining must be one of {MINING_MODES}, got {mining!r}")
        if neg_pos_ratio < 0 or n_neg_min < 0:
            raise ValueError("neg_pos_ratio and n_neg_min must be non-negative")
        self.coder = coder if coder is not None else BoxCoder(variances)
        self.neg_pos_ratio = float(neg_pos_ratio)
        self.n_neg_min = int(n_neg_min)
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.alpha = float(alpha)
        self.mining = mining
        self.beta = float(beta)

    def __call__(
        self,
        cls_logits: Tensor,
        box_deltas: Tensor,
        matches: Tensor,
        gt_boxes: Tensor,
        gt_labels: Tensor,
        anchors: Tensor,
    ) -> dict[str, Tensor]:
        return multibox_loss(
            cls_logits,
            box_deltas,
            matches,
            gt_boxes,
            gt_labels,
            anchors,
            self.coder,
            neg_pos_ratio=self.neg_pos_ratio,
            n_neg_min=self.n_neg_min,
            alpha=self.alpha,
            mining=self.mining,
            beta=self.beta,
        )

    def __repr__(self) -> str:
        return (
            f"MultiBoxLoss(neg_pos_ratio={self.neg_pos_ratio}, n_neg_min={self.n_neg_min}, "
            f"alpha={self.alpha}, beta={self.beta}, mining={self.mining!r}, coder={self.coder})"
        )
