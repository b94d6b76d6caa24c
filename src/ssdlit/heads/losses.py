"""Loss pieces shared by the heads: target gathering, the SSD MultiBox loss and its
IoU-aware box terms (GIoU, DIoU, CIoU on decoded boxes).

Everything here works on the whole batch at once; there is no loop over images.
``matches [B, A]`` comes from a matcher: gt index (>= 0), ``BACKGROUND`` (-1) or
``IGNORE`` (-2, enters no term).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor

from ssdlit.anchors.matching import BACKGROUND, keys
from ssdlit.boxes import BoxCoder, convert
from ssdlit.heads.iou_losses import IOU_LOSSES, iou_loss

__all__ = [
    "BOX_LOSSES",
    "MINING",
    "MINING_MODES",
    "NEG_POS_RATIO",
    "N_NEG_MIN",
    "MultiBoxLoss",
    "background_loss",
    "box_loss_terms",
    "gather_rows",
    "iou_loss_sum",
    "mine_negatives",
    "multibox_loss",
    "positive_targets",
]

MINING_MODES = ("per_image", "per_batch")

#: The box terms of the MultiBox loss: smooth-L1 on the encoded deltas (the paper), or
#: the generalized / distance / complete IoU loss on the decoded boxes
#: (:mod:`ssdlit.heads.iou_losses`: torchvision.ops' values without its host reads).
#: Two of them joined by "+" (``"smooth_l1+giou"``) are summed.
BOX_LOSSES = ("smooth_l1", *IOU_LOSSES)
#: The least width and height (normalised) of a decoded box in the IoU terms: a box
#: decoded from very negative dw / dh (exp underflows to 0, or x2 - x1 rounds to 0)
#: would give CIoU's aspect term 0 / 0 and NaN gradients. 1e-6 of the image is far
#: below any box a detector predicts on purpose, so only degenerate boxes are changed.
MIN_BOX_SIZE = 1e-6

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


def _nonzero(mask: Tensor, size: int) -> Tensor:
    """The indices ``[size]`` of the True entries of the 1-d bool ``mask``, ascending,
    knowing their number (no second host read on accelerators where ``nonzero_static``
    exists).

    On the CPU, where sizes cost no synchronisation, a sparse mask (at most one True in
    8 entries) is searched a word at a time: its bytes read as int64 words, the words
    that are not 0, then the 8 entries of those words only. ``nonzero`` over every entry
    costs ~4x more for the few positives of a batch of anchors.
    """
    n = mask.shape[0]
    words = mask.is_contiguous() and n % 8 == 0 and mask.storage_offset() % 8 == 0
    if mask.device.type == "cpu" and words and size * 8 <= n:
        bytes_ = mask.view(-1, 8)
        hit = bytes_.view(torch.uint8).view(torch.int64).nonzero()[:, 0]  # [H] words
        row, col = bytes_.index_select(0, hit).nonzero(as_tuple=True)
        return hit.index_select(0, row) * 8 + col
    if hasattr(torch, "nonzero_static"):
        try:
            return torch.nonzero_static(mask, size=size).squeeze(1)
        except NotImplementedError:  # not on this device in older releases
            pass
    return mask.nonzero().squeeze(1)


class _GatherRows(torch.autograd.Function):
    """``x.index_select(0, index)`` whose backward writes the rows (``index_copy_``)."""

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(index)
        ctx.shape = x.shape
        return x.index_select(0, index)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (index,) = ctx.saved_tensors
        return grad.new_zeros(ctx.shape).index_copy_(0, index, grad), None


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """``x.index_select(0, index)`` (``[N, ...]`` -> ``[len(index), ...]``) for
    **distinct** indices, as the losses gather their positives and mined negatives.

    The gradient is the same; it is written row by row into zeros (``index_copy_``)
    where ``index_select``'s backward accumulates (``index_add_``), which costs ~2x
    more on the CPU for the few thousand rows of a batch of anchors. Repeated indices
    would keep one row's gradient only: pass each index once.
    """
    if not (x.requires_grad and torch.is_grad_enabled()):
        return x.index_select(0, index)
    return _GatherRows.apply(x, index)


def positive_targets(
    matches: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    count: int,
    positive: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The positives of ``matches [B, A]`` and their ground truth, without a dense target.

    Args:
        matches: ``[B, A]`` long (gt index, -1 background, -2 ignored).
        gt_boxes: ``[B, G, 4]`` xyxy normalised; gt_labels: ``[B, G]`` int64.
        count: the number of positives, ``int((matches >= 0).sum())`` (read by the
            caller together with whatever else it needs on the host).
        positive: ``matches >= 0`` when the caller has it already.
    Returns:
        ``positives [P]`` long, flat indices into ``matches.view(-1)`` ascending (anchor
        ``positives % A``, image ``positives // A``), their gt boxes ``[P, 4]`` xyxy and
        labels ``[P]`` int64.
    """
    a = matches.shape[1]
    positive = matches >= 0 if positive is None else positive
    positives = _nonzero(positive.reshape(-1), count)  # [P]
    gt = (positives // a) * gt_boxes.shape[1] + matches.reshape(-1).index_select(0, positives)
    boxes = gt_boxes.reshape(-1, 4).index_select(0, gt)
    return positives, boxes, gt_labels.reshape(-1).index_select(0, gt).long()


def box_loss_terms(box_loss: str) -> tuple[str, ...]:
    """The terms of a ``box_loss`` option: ``"giou"`` -> ``("giou",)``, ``"smooth_l1+giou"``
    -> ``("smooth_l1", "giou")``; a ``ValueError`` naming the choices for anything else
    (an unknown name, an empty or repeated term)."""
    terms = tuple(t.strip() for t in str(box_loss).split("+"))
    if not all(t in BOX_LOSSES for t in terms) or len(set(terms)) != len(terms):
        raise ValueError(
            f"box_loss must be one of {BOX_LOSSES} or two of them joined by '+' "
            f"(e.g. 'smooth_l1+giou'), got {box_loss!r}"
        )
    return terms


def iou_loss_sum(
    kind: str, deltas: Tensor, anchors: Tensor, gt_xyxy: Tensor, coder: BoxCoder
) -> Tensor:
    """The IoU loss ``kind`` (``"giou"``, ``"diou"`` or ``"ciou"``: the values of
    torchvision.ops' ``generalized_box_iou_loss``, ``distance_box_iou_loss``,
    ``complete_box_iou_loss``, by :func:`~ssdlit.heads.iou_losses.iou_loss`, which
    makes no host read) summed over the rows, between the decoded predictions and their
    ground truth.

    Args:
        deltas: ``[P, 4]`` predicted (dx, dy, dw, dh) of the positives.
        anchors: ``[P, 4]`` cxcywh normalised, the anchor of each row.
        gt_xyxy: ``[P, 4]`` xyxy normalised, the matched gt box of each row.
        coder: the head's :class:`~ssdlit.boxes.BoxCoder` (its ``max_log_scale`` bounds
            the decoded sizes from above).
    Returns:
        a scalar in float32 (float64 for float64 inputs), computed with autocast off:
        ``deltas`` are decoded, their width and height raised to at least
        :data:`MIN_BOX_SIZE` (finite values and gradients for degenerate boxes), and
        converted to xyxy. Rows are independent: no ``[B, A, 4]`` tensor is made.
    """
    if kind not in IOU_LOSSES:
        raise ValueError(f"unknown IoU loss {kind!r}; expected one of {IOU_LOSSES}")
    device = deltas.device
    dtype = torch.promote_types(deltas.dtype, torch.float32)
    exact = torch.autocast(device.type, enabled=False) if device.type != "meta" else nullcontext()
    with exact:
        boxes = coder.decode(deltas.to(dtype), anchors.to(device=device, dtype=dtype))
        boxes = torch.cat((boxes[:, :2], boxes[:, 2:].clamp(min=MIN_BOX_SIZE)), dim=1)
        pred = convert(boxes, "cxcywh", "xyxy")  # [P, 4]
        return iou_loss(kind, pred, gt_xyxy.to(dtype)).sum()


def background_loss(cls_logits: Tensor) -> Tensor:
    """The cross-entropy of the background class for every anchor, ``[B, A]`` float32
    (or wider), without gradient: what hard negative mining ranks (it equals the
    classification loss of every anchor that is not positive).

    ``cls_logits [B, A, K]`` (column 0 = background): ``log(sum_k exp(l_k - l_0))``,
    the sum over K as a matrix product (several times faster than a reduction over a
    short last dimension). On the CPU, in blocks of rows that stay in cache, as
    ``log(sum_k exp(l_k) / exp(l_0))``: one product with ``[K, 2]`` gives both the sum
    and ``exp(l_0)`` (no strided read of column 0); a block whose logits leave the range
    of ``exp`` (|l| > ~87: a sum or an ``exp(l_0)`` that overflows or underflows) is
    computed shifted by each row's largest logit instead, as on other devices (there
    without host reads).
    """
    b, a, k = cls_logits.shape
    dtype = torch.promote_types(cls_logits.dtype, torch.float32)
    device = cls_logits.device
    # float32 even under autocast (its matmul would run in bfloat16 / float16)
    exact = torch.autocast(device.type, enabled=False) if device.type != "meta" else nullcontext()
    rows = cls_logits.detach().reshape(b * a, k)
    with torch.no_grad(), exact:
        ones = torch.ones(k, 1, dtype=dtype, device=device)
        if device.type != "cpu":
            return _shifted_background_loss(rows.to(dtype), ones).view(b, a)
        both = torch.zeros(k, 2, dtype=dtype, device=device)
        both[:, 0] = 1.0  # column 0: the sum of exp over the K logits
        both[0, 1] = 1.0  # column 1: exp(l_0)
        sums = torch.empty(b * a, 2, dtype=dtype, device=device)
        step = max(1, _BLOCK // k)
        work = torch.empty(min(step, b * a), k, dtype=dtype, device=device)
        for start in range(0, b * a, step):
            block = rows[start : start + step].to(dtype)
            e = torch.exp(block, out=work[: block.shape[0]])
            torch.mm(e, both, out=sums[start : start + step])
        out = torch.div(sums[:, 0], sums[:, 1]).log_()
        # A sum or exp(l_0) outside exp's range gives inf or NaN: then the total is not
        # finite either (one reduction; an elementwise isfinite costs ~50x more here).
        if not bool(torch.isfinite(out.sum())):
            index = (~torch.isfinite(out)).nonzero().squeeze(1)
            out[index] = _shifted_background_loss(rows.index_select(0, index).to(dtype), ones)
    return out.view(b, a)


def _shifted_background_loss(rows: Tensor, ones: Tensor) -> Tensor:
    """``logsumexp(rows) - rows[:, 0]`` for ``rows [N, K]``, shifted by each row's
    maximum as a cross-entropy is (finite for any finite logits); ``ones [K, 1]``."""
    top = rows.amax(dim=1, keepdim=True)
    total = torch.mm((rows - top).exp_(), ones).log_()  # [N, 1]
    return (total + top).squeeze(1) - rows[:, 0]


_BLOCK = 1 << 17  # logits per block of background_loss on the CPU (512 KiB of float32)


def mine_negatives(
    bg_loss: Tensor,
    matches: Tensor,
    neg_pos_ratio: float = NEG_POS_RATIO,
    n_neg_min: int = N_NEG_MIN,
    mining: str = MINING,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The hard negatives: the background anchors whose loss is highest.

    The budget is ``floor(neg_pos_ratio * positives)``, raised to at least ``n_neg_min``
    and capped by the number of background anchors (``matches == -1``) whose loss is
    non-zero; the budget's worth of highest-loss background anchors is kept (ties: lower
    anchor index first; ranked on the float32 value of the loss). Ignored anchors (-2)
    are never kept.

    - ``mining="per_image"`` (SSD paper, torchvision; the default): positives,
      ``n_neg_min`` and the budget are counted per image; each image keeps its own
      hardest negatives, so an image without objects keeps its ``n_neg_min`` hardest
      (with ``n_neg_min=0``, as the paper, it keeps none and teaches nothing).
    - ``mining="per_batch"`` (ssd_keras): positives, ``n_neg_min`` and the budget are
      counted over the whole batch; the hardest negatives of the whole batch are kept,
      so an image without objects gets negatives only where they are among the
      batch's hardest (a batch without any object keeps its ``n_neg_min`` hardest).

    Works on R rows (B images, or 1 for the batch) with ``torch.topk`` (on the CPU one per
    group of rows with similar budgets): the one host read of the training step
    (:func:`multibox_loss`) brings the budgets to the host together with the number of
    positives.

    Args:
        bg_loss: ``[B, A]`` the background loss of each anchor (:func:`background_loss`).
        matches: ``[B, A]`` long.
    Returns:
        ``flat [R, k]`` long: indices into ``matches.view(-1)`` of the kept negatives,
        hardest first (entries past a row's budget are 0 and not kept);
        ``kept [R, k]`` bool: which entries are kept; ``budget [R]`` long: the
        negatives kept per row; ``num_pos [B]`` long: the positives of each image.
    """
    num_pos = (matches >= 0).sum(dim=1)  # [B]
    key, budget = _negative_keys(bg_loss, matches, num_pos, neg_pos_ratio, n_neg_min, mining)
    index, kept = _hardest(key, budget, budget.tolist(), matches.shape, mining)
    return index, kept, budget, num_pos


def _negative_keys(
    bg_loss: Tensor,
    matches: Tensor,
    num_pos: Tensor,
    neg_pos_ratio: float,
    n_neg_min: int,
    mining: str,
) -> tuple[Tensor, Tensor]:
    """:func:`mine_negatives` up to the host read, given the positives of each image
    ``num_pos [B]``: ``key [R, N]`` int64 (the float32 bits of the loss << 32 | N - 1 -
    index; the loss taken as 0 for non-candidates) and ``budget [R]``."""
    if mining not in MINING_MODES:
        raise ValueError(f"mining must be one of {MINING_MODES}, got {mining!r}")
    # The candidates' losses, 0 elsewhere: a multiply, where masked_fill_ / where over
    # [B, A] would cost several times more on the CPU. Every candidate (loss > 0) then
    # has a key >= 2**32 and every other anchor one below: never kept, as the budget is
    # capped by the number of candidates.
    loss = bg_loss.clamp(min=0).mul_(matches == BACKGROUND)
    if mining == "per_batch":  # the batch is one long image
        loss, rows_pos = loss.view(1, -1), num_pos.sum(0, True)
    else:
        rows_pos = num_pos
    n = loss.shape[1]
    # one int64 key per anchor: the highest loss first, the lower index among equals
    key = keys.pack(loss, torch.arange(n, device=loss.device), n)
    budget = torch.floor(rows_pos.double() * float(neg_pos_ratio)).long()
    candidates = loss.sign().sum(dim=1).long()  # loss > 0 (a float sum: ~4x count_nonzero)
    budget = budget.clamp(min=int(n_neg_min)).minimum(candidates)  # [R]
    return key, budget


def _hardest(
    key: Tensor, budget: Tensor, budgets: list[int], shape: torch.Size, mining: str
) -> tuple[Tensor, Tensor]:
    """The ``k = max(budgets)`` highest keys of each row as flat indices ``[R, k]`` into
    the ``[B, A]`` matches, and which of them are within their row's budget.

    ``budgets`` is ``budget`` on the host. On the CPU the rows are taken in groups of
    similar budgets (up to 16, 32, 64, ... negatives), each group's ``topk`` asking only
    for its own largest budget: a ``topk`` costs with ``k`` (more than 2x from 64 to 200
    of 8732), so no image pays for the largest budget of the batch.
    """
    b, a = shape
    r, n = key.shape
    k = max(budgets, default=0)
    if k == 0:
        top = key[:, :0]
    elif key.device.type != "cpu":
        top = key.topk(k, dim=1).values  # [R, k] descending
    else:
        groups: dict[int, list[int]] = {}
        for row, size in enumerate(budgets):
            groups.setdefault(max(16, 1 << (size - 1).bit_length()), []).append(row)
        if len(groups) == 1:
            top = key.topk(k, dim=1).values
        else:
            top = key.new_zeros(r, k)
            for size, rows in groups.items():
                kg = min(k, size, n)
                index = torch.tensor(rows)
                top[index, :kg] = key.index_select(0, index).topk(kg, dim=1).values
    kept = torch.arange(k, device=key.device) < budget[:, None]  # [R, k]
    index = torch.where(kept, keys.index_of(top, n), 0)  # within the row
    if mining == "per_image":
        index = index + torch.arange(b, device=key.device)[:, None] * a
    return index, kept


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
    box_loss: str = "smooth_l1",
) -> dict[str, Tensor]:
    """The SSD MultiBox loss with hard negative mining, on the anchors that count only.

    - classification: softmax cross-entropy over the K = C + 1 columns (0 = background)
      on the positives and on the negatives chosen by :func:`mine_negatives`;
    - localisation (``box_loss``, on the positives only):

      - ``"smooth_l1"`` (the paper, the default): smooth-L1 (``beta`` 1 as in the paper;
        smaller is closer to L1 and pushes harder on small errors), summed over the 4
        numbers, between the positives' ``box_deltas`` and ``coder.encode(matched gt,
        anchor)``;
      - ``"giou"``, ``"diou"``, ``"ciou"``: torchvision.ops' generalized / distance /
        complete IoU loss (in [0, 2) per box; 0 for a perfect box) between the
        positives' boxes decoded by ``coder`` (``[P, 4]``, cxcywh -> xyxy) and their
        matched gt boxes (xyxy), in float32 with autocast off (:func:`iou_loss_sum`);
        ``beta`` plays no part;
      - two joined by ``"+"`` (``"smooth_l1+giou"``): their sums added;
    - ignored anchors (-2) enter neither term.

    Both terms (whichever the box loss) are divided by N = max(1, P, M / neg_pos_ratio) with P the positives
    and M the mined negatives of the batch (``neg_pos_ratio`` 0: N = max(1, P)); the
    total is ``loss_cls + alpha * loss_box``. While the ratio sets the budgets
    (M <= ratio * P) this is the paper's N = P; where ``n_neg_min`` adds negatives
    (images without objects, or with very few positives) each negative still weighs
    what it weighs beside a positive, instead of a batch of background photos summing
    its negatives over N = 1.

    How: the background loss of every anchor is computed once without gradient (what
    mining ranks); the positives and the mined negatives are then gathered (``[P, K]``
    and ``[M, K]`` rows, each anchor once: :func:`gather_rows`) and only they enter the
    graph: the regression targets
    (and, for the IoU terms, the decoded boxes) exist for the P positives only
    (``[P, 4]``), never as a dense ``[B, A, 4]``. The
    step reads on the host once: the number of positives and the R negative budgets
    (the sizes of those gathers).

    Args:
        cls_logits: ``[B, A, K]``.
        box_deltas: ``[B, A, 4]``.
        matches: ``[B, A]`` long.
        gt_boxes: ``[B, G, 4]`` xyxy normalised.
        gt_labels: ``[B, G]`` int64 in 1..C.
        anchors: ``[A, 4]`` cxcywh normalised.
        coder: the head's :class:`~ssdlit.boxes.BoxCoder`.
        box_loss: the box term (see above; :data:`BOX_LOSSES`).
    Returns:
        ``{"loss", "loss_cls", "loss_box"}`` scalars (float32 or wider); ``loss_box``
        is the chosen box term.
    """
    terms = box_loss_terms(box_loss)
    b, a, k = cls_logits.shape
    if matches.shape != (b, a) or box_deltas.shape != (b, a, 4):
        raise ValueError(
            f"shapes disagree: cls_logits {tuple(cls_logits.shape)}, box_deltas "
            f"{tuple(box_deltas.shape)}, matches {tuple(matches.shape)}"
        )
    if anchors.shape != (a, 4):
        raise ValueError(f"anchors must be [{a}, 4], got {tuple(anchors.shape)}")
    dtype = torch.promote_types(cls_logits.dtype, torch.float32)
    bg = background_loss(cls_logits)  # [B, A], no gradient
    positive = matches >= 0  # [B, A]
    num_pos = positive.sum(dim=1)  # [B]
    key, budget = _negative_keys(bg, matches, num_pos, neg_pos_ratio, n_neg_min, mining)
    # The one host read of the step: the sizes of the gathers below.
    p, *budgets = torch.cat((num_pos.sum()[None], budget)).tolist()
    negatives, kept = _hardest(key, budget, budgets, matches.shape, mining)
    positives, gt_xyxy, labels = positive_targets(matches, gt_boxes, gt_labels, p, positive)

    # The positives and the kept negatives (each anchor once), gathered ([P + M, K] rows).
    negatives = negatives.reshape(-1).index_select(0, _nonzero(kept.reshape(-1), sum(budgets)))
    rows = torch.cat((positives, negatives))
    target = torch.cat((labels, negatives.new_zeros(negatives.numel())))
    logits = gather_rows(cls_logits.reshape(b * a, k), rows).to(dtype)
    cls_sum = F.cross_entropy(logits, target, reduction="sum")

    anchors = anchors.to(device=cls_logits.device, dtype=dtype)
    pos_anchors = anchors.index_select(0, positives % a)  # [P, 4]
    deltas = gather_rows(box_deltas.reshape(b * a, 4), positives).to(dtype)
    sums = []
    for term in terms:
        if term == "smooth_l1":
            matched = convert(gt_xyxy.to(dtype), "xyxy", "cxcywh")  # [P, 4]
            targets = coder.encode(matched, pos_anchors)  # [P, 4]
            sums.append(F.smooth_l1_loss(deltas, targets, beta=beta, reduction="sum"))
        else:
            sums.append(iou_loss_sum(term, deltas, pos_anchors, gt_xyxy, coder))
    loc_sum = sums[0] if len(sums) == 1 else torch.stack(sums).sum()

    n: Tensor | float = float(max(p, 1))
    if neg_pos_ratio > 0:
        n = (budget.sum().to(dtype) / neg_pos_ratio).clamp(min=n)
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
        alpha: weight of the localisation term (whichever ``box_loss``): the total is
            ``loss_cls + alpha * loss_box``.
        mining: ``"per_image"`` (default) or ``"per_batch"`` (see :func:`mine_negatives`).
        beta: the smooth-L1 transition point of the localisation term (>= 0; 0 is L1).
        coder: a ready :class:`~ssdlit.boxes.BoxCoder` to share with the head.
        box_loss: the localisation term: ``"smooth_l1"`` (default, the paper) on the
            encoded deltas, or ``"giou"`` / ``"diou"`` / ``"ciou"`` on the decoded boxes
            (torchvision.ops), or two joined by ``"+"`` (``"smooth_l1+giou"``, summed);
            see :func:`multibox_loss`. Anything else is a ``ValueError`` here.
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
        box_loss: str = "smooth_l1",
    ) -> None:
        box_loss_terms(box_loss)  # refuse an unknown box loss now, not at the first step
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
        self.box_loss = str(box_loss)

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
            box_loss=self.box_loss,
        )

    def __repr__(self) -> str:
        return (
            f"MultiBoxLoss(neg_pos_ratio={self.neg_pos_ratio}, n_neg_min={self.n_neg_min}, "
            f"alpha={self.alpha}, beta={self.beta}, mining={self.mining!r}, "
            f"box_loss={self.box_loss!r}, coder={self.coder})"
        )
