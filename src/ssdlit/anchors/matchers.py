"""Batched anchor matchers: which ground-truth box (if any) each anchor learns from.

Every matcher takes

- ``gt_boxes`` ``[B, G, 4]`` xyxy normalised to [0, 1] (padded to the largest G),
- ``gt_mask``  ``[B, G]`` bool, True for real boxes and False for padding,
- ``anchors``  ``[A, 4]`` cxcywh normalised,

and returns ``matches`` ``[B, A]`` long: the gt index (>= 0) an anchor regresses
to, :data:`BACKGROUND` (-1) or :data:`IGNORE` (-2, enters no loss). The whole
batch is matched at once; the only Python loop is over G in the greedy bipartite
step, which is sequential by nature.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from ssdlit.boxes import convert
from ssdlit.registry import MATCHERS

__all__ = [
    "BACKGROUND",
    "IGNORE",
    "AnchorOverlaps",
    "FasterRCNNMatcher",
    "Matcher",
    "SSDMatcher",
    "YOLOv3Matcher",
    "anchor_overlaps",
    "bipartite",
    "masked_iou",
]

BACKGROUND = -1
IGNORE = -2


def _grid_levels(anchors_cxcywh: Tensor) -> list[tuple[int, int, int, int]] | None:
    """Split anchors into product grids ``(start, fh, fw, n)``, or None if they are not.

    A level is a product grid when, in the order (row y, column x, box k), the centre x
    depends only on x, the centre y only on y and the size only on k: what every
    unclipped generator of ssdlit gives. Anything else returns None.
    """
    a = anchors_cxcywh.detach().cpu()
    total, start, levels = a.shape[0], 0, []
    while start < total:
        centre = a[start, :2]
        n = 1  # boxes in the first cell
        while start + n < total and torch.equal(a[start + n, :2], centre):
            n += 1
        fw = 1  # cells in the first row
        while start + (fw + 1) * n <= total and a[start + fw * n, 1] == centre[1]:
            fw += 1
        row0 = a[start : start + fw * n].view(fw, n, 4)
        fh = 1
        while start + (fh + 1) * fw * n <= total:
            row = a[start + fh * fw * n : start + (fh + 1) * fw * n].view(fw, n, 4)
            if not (
                torch.equal(row[..., 0], row0[..., 0])
                and torch.equal(row[..., 2:], row0[..., 2:])
                and bool((row[..., 1] == row[0, 0, 1]).all())
                and row[0, 0, 1] != a[start + (fh - 1) * fw * n, 1]
            ):
                break
            fh += 1
        block = a[start : start + fh * fw * n].view(fh, fw, n, 4)
        if not (
            bool((block[..., 0] == block[:1, :, :1, 0]).all())
            and bool((block[..., 1] == block[:, :1, :1, 1]).all())
            and bool((block[..., 2:] == block[:1, :1, :, 2:]).all())
        ):
            return None
        levels.append((start, fh, fw, n))
        start += fh * fw * n
    return levels if len(levels) <= 32 else None


class AnchorOverlaps:
    """IoU of batched gt boxes against one fixed anchor set, built for speed.

    Anchors from a generator form product grids: on a level the x-interval of an
    anchor depends only on its column and box, the y-interval only on its row and box.
    The intersection of a gt with a whole level is then the outer product of its
    widths ``[fw, n]`` and heights ``[fh, n]``, written in one operation; the IoU
    equals the direct formula (same operations on the same numbers). Anchors that
    are not product grids (clipped, hand-made) take the direct path.
    """

    def __init__(self, anchors_cxcywh: Tensor) -> None:
        xyxy = convert(anchors_cxcywh, "cxcywh", "xyxy")
        self.xyxy = xyxy
        self.area = (xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1])  # [A]
        self.levels = _grid_levels(anchors_cxcywh)
        # With positive anchor areas the union is never 0 (it is at least the anchor's).
        self._may_divide_by_zero = bool((self.area <= 0).any())
        self._work: dict[tuple, tuple[Tensor, Tensor]] = {}
        self.parts: list[tuple[int, int, int, int, Tensor, Tensor]] = []
        for start, fh, fw, n in self.levels or []:
            block = xyxy[start : start + fh * fw * n].view(fh, fw, n, 4)
            x_int = block[0, :, :, 0::2].contiguous()  # [fw, n, 2] (x1, x2)
            y_int = block[:, 0, :, 1::2].contiguous()  # [fh, n, 2] (y1, y2)
            self.parts.append((start, fh, fw, n, x_int, y_int))

    def __call__(self, gt_boxes: Tensor, reuse: bool = False) -> Tensor:
        """IoU ``[B, G, A]`` of ``gt_boxes [B, G, 4]`` xyxy with the anchors.

        With ``reuse`` the result lives in a workspace that the next call with the
        same shape overwrites (no fresh allocation: large fresh tensors cost page
        faults on every call); use it for values consumed at once.
        """
        g = gt_boxes.to(self.area.dtype)
        b, m = g.shape[:2]
        flat = g.reshape(b * m, 4)
        x1, y1, x2, y2 = (c[:, None, None] for c in flat.unbind(-1))  # [BG, 1, 1]
        shape = (b * m, self.area.shape[0])
        if reuse:
            key = (shape, flat.dtype, flat.device)
            if key not in self._work:
                self._work.clear()
                self._work[key] = (flat.new_empty(shape), flat.new_empty(shape))
            inter, union = self._work[key]
        else:
            inter, union = flat.new_empty(shape), flat.new_empty(shape)  # [BG, A] each
        if self.parts:
            for start, fh, fw, n, xi, yi in self.parts:
                iw = (torch.minimum(x2, xi[..., 1]) - torch.maximum(x1, xi[..., 0])).clamp_(min=0)
                ih = (torch.minimum(y2, yi[..., 1]) - torch.maximum(y1, yi[..., 0])).clamp_(min=0)
                out = inter[:, start : start + fh * fw * n].view(b * m, fh, fw, n)
                torch.mul(ih[:, :, None, :], iw[:, None, :, :], out=out)  # [BG, fh, fw, n]
        else:
            ax = self.xyxy
            iw = (
                torch.minimum(x2[:, :, 0], ax[:, 2]) - torch.maximum(x1[:, :, 0], ax[:, 0])
            ).clamp_(min=0)
            ih = (
                torch.minimum(y2[:, :, 0], ax[:, 3]) - torch.maximum(y1[:, :, 0], ax[:, 1])
            ).clamp_(min=0)
            torch.mul(iw, ih, out=inter)
        torch.add(
            ((flat[:, 2] - flat[:, 0]) * (flat[:, 3] - flat[:, 1]))[:, None], self.area, out=union
        )
        union.sub_(inter)
        iou = inter.div_(union)
        if self._may_divide_by_zero:
            iou.nan_to_num_(0.0)  # a zero union (degenerate pair) gives IoU 0
        return iou.view(b, m, -1)


_OVERLAPS_CACHE: dict[tuple, AnchorOverlaps] = {}


def anchor_overlaps(anchors_cxcywh: Tensor) -> AnchorOverlaps:
    """The :class:`AnchorOverlaps` of ``anchors``, cached while the tensor is unchanged."""
    key = (
        anchors_cxcywh.data_ptr(),
        anchors_cxcywh._version,
        tuple(anchors_cxcywh.shape),
        anchors_cxcywh.dtype,
        anchors_cxcywh.device,
    )
    found = _OVERLAPS_CACHE.get(key)
    if found is None:
        if len(_OVERLAPS_CACHE) >= 8:
            _OVERLAPS_CACHE.clear()
        found = _OVERLAPS_CACHE[key] = AnchorOverlaps(anchors_cxcywh.detach())
    return found


def masked_iou(gt_boxes: Tensor, gt_mask: Tensor, anchors: Tensor) -> Tensor:
    """IoU ``[B, G, A]`` of gt boxes (xyxy) and anchors (cxcywh); padded rows are -1."""
    iou = anchor_overlaps(anchors.to(gt_boxes.dtype))(gt_boxes)
    return iou.masked_fill_(~gt_mask[:, :, None], -1.0)


def _check(gt_boxes: Tensor, gt_mask: Tensor, anchors: Tensor) -> None:
    if gt_boxes.dim() != 3 or gt_boxes.shape[-1] != 4:
        raise ValueError(f"gt_boxes must be [B, G, 4], got {tuple(gt_boxes.shape)}")
    if gt_mask.shape != gt_boxes.shape[:2] or gt_mask.dtype != torch.bool:
        raise ValueError(f"gt_mask must be bool [B, G] = {tuple(gt_boxes.shape[:2])}")
    if anchors.dim() != 2 or anchors.shape[-1] != 4:
        raise ValueError(f"anchors must be [A, 4], got {tuple(anchors.shape)}")


class Matcher(ABC):
    """Base class: call with ``(gt_boxes, gt_mask, anchors)``, get ``matches [B, A]``."""

    def __call__(self, gt_boxes: Tensor, gt_mask: Tensor, anchors: Tensor) -> Tensor:
        _check(gt_boxes, gt_mask, anchors)
        if gt_boxes.shape[1] == 0:  # nothing to match: every anchor is background
            return gt_boxes.new_full(
                (gt_boxes.shape[0], anchors.shape[0]), BACKGROUND, dtype=torch.long
            )
        return self.match(gt_boxes, gt_mask.to(gt_boxes.device), anchors.to(gt_boxes.device))

    @abstractmethod
    def match(self, gt_boxes: Tensor, gt_mask: Tensor, anchors: Tensor) -> Tensor:
        """``matches [B, A]`` for a batch with at least one (maybe padded) gt slot."""


def greedy_bipartite(iou: Tensor) -> Tensor:
    """ssd_keras's ``match_bipartite_greedy`` for a whole batch.

    Repeatedly takes the highest remaining (gt, anchor) IoU of each image (ties:
    lowest gt index, then lowest anchor index), matches that pair, and removes the
    gt and the anchor. Every real gt gets exactly one anchor, even at IoU 0.

    Args:
        iou: ``[B, G, A]`` with padded gts set to a negative value.
    Returns:
        ``[B, A]`` long: the gt matched to each anchor, or -1.
    """
    b, g, a = iou.shape
    k = min(g, a)
    # A gt picked at step t has lost at most t - 1 < G anchors to earlier picks, so its
    # pick is among its k best anchors: the loop runs on [B, G, k] candidates only.
    # Exact ordering (IoU desc, anchor index asc) through an integer key: the bits of a
    # non-negative float32 sort like the float.
    bits = iou.float().clamp(min=0).view(torch.int32).long()  # [B, G, A]
    anchor_ids = torch.arange(a, device=iou.device)
    keys = (bits << 32) | (a - 1 - anchor_ids)  # larger key: higher IoU, then lower index
    keys = keys.masked_fill(iou < 0, -1)
    top_keys, _ = keys.topk(k, dim=2)  # [B, G, k], sorted descending
    padded = top_keys < 0
    cand_anchor = ((a - 1) - (top_keys & 0xFFFFFFFF)).masked_fill(padded, 0)  # [B, G, k]
    cand_iou = torch.gather(iou, 2, cand_anchor).masked_fill(padded, -1.0)
    matches = torch.full((b, a), BACKGROUND, dtype=torch.long, device=iou.device)
    rows = torch.arange(b, device=iou.device)
    for _ in range(g):
        best, flat = cand_iou.reshape(b, -1).max(dim=1)  # first maximum: lowest gt, then anchor
        gt = flat // k
        anchor = cand_anchor.reshape(b, -1).gather(1, flat[:, None]).squeeze(1)  # [B]
        valid = best >= 0
        current = matches[rows, anchor]
        matches[rows, anchor] = torch.where(valid, gt, current)
        taken = (cand_anchor == anchor[:, None, None]) & valid[:, None, None]  # [B, G, k]
        # (a padded slot may alias anchor 0, but its IoU is already -1)
        taken[rows, gt] |= valid[:, None]
        cand_iou = cand_iou.masked_fill(taken, -1.0)
    return matches


def bipartite(iou: Tensor, gt_mask: Tensor) -> Tensor:
    """Greedy bipartite matching (:func:`greedy_bipartite`) with a fast common case.

    When the best anchors of an image's gts are all different, the greedy procedure
    gives every gt its own best anchor (lowest index on ties), so only images where
    two gts share a best anchor run the sequential procedure.

    Args:
        iou: ``[B, G, A]``, padded rows negative; gt_mask: ``[B, G]``.
    Returns:
        ``[B, A]`` long: the gt matched to each anchor, or -1.
    """
    b, g, a = iou.shape
    best_anchor = iou.argmax(dim=2)  # [B, G], first maximum
    # Padded slots get distinct negative ids so that they never look like a clash.
    ids = torch.where(gt_mask, best_anchor, -1 - torch.arange(g, device=iou.device))
    ordered = ids.sort(dim=1).values
    clash = (
        (ordered[:, 1:] == ordered[:, :-1]).any(dim=1)
        if g > 1
        else ids.new_zeros(b, dtype=torch.bool)
    )
    matches = torch.full((b, a), BACKGROUND, dtype=torch.long, device=iou.device)
    gt_ids = torch.arange(g, device=iou.device).expand(b, g)
    src = torch.where(gt_mask & ~clash[:, None], gt_ids, BACKGROUND)
    matches.scatter_reduce_(1, best_anchor, src, reduce="amax")
    if bool(clash.any()):
        rows = clash.nonzero().flatten()
        matches[rows] = greedy_bipartite(iou[rows])
    return matches


@MATCHERS.register("ssd")
class SSDMatcher(Matcher):
    """SSD matching as ssd_keras's ``SSDInputEncoder`` does it.

    1. Greedy bipartite: each real gt gets its own best anchor, even below the threshold.
    2. With ``matching="multi"``: every other anchor goes to its highest-IoU gt when
       that IoU is ``>= pos_iou_threshold`` (ties: lowest gt index).
    3. Anchors still unmatched whose best IoU is ``>= neg_iou_limit`` are ignored (-2);
       ``neg_iou_limit=None`` leaves them all background.
    """

    def __init__(
        self,
        matching: str = "multi",
        pos_iou_threshold: float = 0.5,
        neg_iou_limit: float | None = 0.3,
    ) -> None:
        if matching not in ("multi", "bipartite"):
            raise ValueError(f"matching must be 'multi' or 'bipartite', got {matching!r}")
        if neg_iou_limit is not None and neg_iou_limit > pos_iou_threshold:
            raise ValueError(
                f"neg_iou_limit ({neg_iou_limit}) must not exceed pos_iou_threshold "
                f"({pos_iou_threshold})"
            )
        self.matching = matching
        self.pos_iou_threshold = float(pos_iou_threshold)
        self.neg_iou_limit = None if neg_iou_limit is None else float(neg_iou_limit)

    def match(self, gt_boxes: Tensor, gt_mask: Tensor, anchors: Tensor) -> Tensor:
        b, g = gt_mask.shape
        a = anchors.shape[0]
        dev = gt_boxes.device
        matches = torch.full((b, a), BACKGROUND, dtype=torch.long, device=dev)
        # Only the real gts, packed: rows grouped by image, in slot order.
        img, slot = gt_mask.nonzero(as_tuple=True)  # [M] each
        m = img.shape[0]
        if m == 0:
            return matches
        overlaps = anchor_overlaps(anchors.to(gt_boxes.dtype))
        iou = overlaps(gt_boxes[img, slot][None], reuse=True)[0]  # [M, A]

        # 1. Greedy bipartite; common case: the best anchors of an image's gts all differ.
        best_anchor = iou.argmax(dim=1)  # [M], first maximum
        key, order = (img * a + best_anchor).sort()
        dup = key[1:] == key[:-1]
        clash_img = torch.zeros(b, dtype=torch.bool, device=dev)
        clash_img[img[order[1:][dup]]] = True
        easy = ~clash_img[img]
        matches[img[easy], best_anchor[easy]] = slot[easy]
        if bool(clash_img.any()):
            rows = clash_img.nonzero().flatten()
            padded = iou.new_full((rows.shape[0], g, a), -1.0)  # [R, G, A]
            pos_in_rows = torch.full((b,), -1, dtype=torch.long, device=dev)
            pos_in_rows[rows] = torch.arange(rows.shape[0], device=dev)
            sel = clash_img[img]
            padded[pos_in_rows[img[sel]], slot[sel]] = iou[sel]
            matches[rows] = greedy_bipartite(padded)

        # 2. Best IoU of every anchor over the gts of its image.
        best_iou = iou.new_full((b, a), -1.0)
        best_iou.scatter_reduce_(0, img[:, None].expand(m, a), iou, reduce="amax")
        free = matches == BACKGROUND
        if self.matching == "multi":
            positive = free & (best_iou >= self.pos_iou_threshold)
            pb, pa = positive.nonzero(as_tuple=True)  # [P]
            if pb.numel():
                # The best gt of each positive anchor, lowest slot on ties.
                counts = torch.bincount(img, minlength=b)
                first = torch.cumsum(counts, 0) - counts  # first packed row of each image
                j = torch.arange(int(counts.max()), device=dev)  # [Gmax]
                valid = j[None, :] < counts[pb, None]  # [P, Gmax]
                rows_pj = (first[pb, None] + j[None, :]).clamp(max=m - 1)
                cand = iou[rows_pj, pa[:, None]].masked_fill(~valid, -1.0)  # [P, Gmax]
                matches[pb, pa] = slot[first[pb] + cand.argmax(dim=1)]
            free = free & ~positive
        if self.neg_iou_limit is not None:
            matches.masked_fill_(free & (best_iou >= self.neg_iou_limit), IGNORE)
        return matches

    def __repr__(self) -> str:
        return (
            f"SSDMatcher(matching={self.matching!r}, pos_iou_threshold={self.pos_iou_threshold}, "
            f"neg_iou_limit={self.neg_iou_limit})"
        )


@MATCHERS.register("faster_rcnn")
class FasterRCNNMatcher(Matcher):
    """The Faster R-CNN RPN rule.

    IoU ``>= pos_iou_threshold`` (0.7): positive, to the anchor's best gt; ``<
    neg_iou_threshold`` (0.3): background; in between: ignored. With
    ``allow_low_quality_matches`` the anchors that reach a gt's highest IoU (ties
    included, IoU > 0) are positive too, assigned to their own best gt as in
    torchvision's ``Matcher``.
    """

    def __init__(
        self,
        pos_iou_threshold: float = 0.7,
        neg_iou_threshold: float = 0.3,
        allow_low_quality_matches: bool = True,
    ) -> None:
        if neg_iou_threshold > pos_iou_threshold:
            raise ValueError("neg_iou_threshold must not exceed pos_iou_threshold")
        self.pos_iou_threshold = float(pos_iou_threshold)
        self.neg_iou_threshold = float(neg_iou_threshold)
        self.allow_low_quality_matches = bool(allow_low_quality_matches)

    def match(self, gt_boxes: Tensor, gt_mask: Tensor, anchors: Tensor) -> Tensor:
        iou = masked_iou(gt_boxes, gt_mask, anchors)  # [B, G, A]
        best_iou, best_gt = iou.max(dim=1)  # [B, A]
        matches = torch.full_like(best_gt, IGNORE)
        matches = torch.where(best_iou < self.neg_iou_threshold, BACKGROUND, matches)
        matches = torch.where(best_iou >= self.pos_iou_threshold, best_gt, matches)
        if self.allow_low_quality_matches:
            gt_best = iou.max(dim=2, keepdim=True).values  # [B, G, 1]
            is_best = (iou == gt_best) & (gt_best > 0) & gt_mask[:, :, None]  # [B, G, A]
            matches = torch.where(is_best.any(dim=1), best_gt, matches)
        return matches


@MATCHERS.register("yolov3")
class YOLOv3Matcher(Matcher):
    """YOLOv3 assignment: one anchor per gt, chosen by shape then by grid cell.

    Each gt goes to the prior (distinct anchor width and height, across all levels)
    with the best shape-only IoU (centres aligned), at the grid cell that holds the
    gt centre: among that prior's anchors, the one whose centre is nearest in x and
    in y. When two gts land on one anchor, the higher gt index wins. Anchors left
    over whose IoU with any gt exceeds ``ignore_threshold`` are ignored; the rest are
    background. Priors are found by exact equality of anchor sizes, so the anchors
    must not be clipped.
    """

    def __init__(self, ignore_threshold: float = 0.5) -> None:
        self.ignore_threshold = float(ignore_threshold)

    def match(self, gt_boxes: Tensor, gt_mask: Tensor, anchors: Tensor) -> Tensor:
        b, g, _ = gt_boxes.shape
        anchors = anchors.to(gt_boxes.dtype)
        shapes, prior_of = torch.unique(anchors[:, 2:], dim=0, return_inverse=True)  # [U, 2], [A]
        gt = convert(gt_boxes, "xyxy", "cxcywh")  # [B, G, 4]
        inter = torch.minimum(gt[..., None, 2], shapes[:, 0]) * torch.minimum(
            gt[..., None, 3], shapes[:, 1]
        )  # [B, G, U]
        union = gt[..., None, 2] * gt[..., None, 3] + shapes[:, 0] * shapes[:, 1] - inter
        best_prior = (inter / union.clamp(min=torch.finfo(union.dtype).tiny)).argmax(
            dim=2
        )  # [B, G]
        same_prior = prior_of[None, None, :] == best_prior[:, :, None]  # [B, G, A]
        far = torch.finfo(gt.dtype).max
        dx = (anchors[:, 0] - gt[..., None, 0]).abs().masked_fill(~same_prior, far)  # [B, G, A]
        dy = (anchors[:, 1] - gt[..., None, 1]).abs().masked_fill(~same_prior, far)
        in_cell = (dx == dx.min(dim=2, keepdim=True).values) & (
            dy == dy.min(dim=2, keepdim=True).values
        )
        chosen = in_cell.int().argmax(dim=2)  # [B, G] first anchor of the cell
        gt_ids = torch.arange(g, device=gt.device).expand(b, g)
        src = torch.where(gt_mask, gt_ids, BACKGROUND)
        matches = torch.full((b, anchors.shape[0]), BACKGROUND, dtype=torch.long, device=gt.device)
        matches.scatter_reduce_(1, chosen, src, reduce="amax")
        iou = masked_iou(gt_boxes, gt_mask, anchors)  # [B, G, A]
        ignore = (matches == BACKGROUND) & (iou.max(dim=1).values > self.ignore_threshold)
        return matches.masked_fill(ignore, IGNORE)
