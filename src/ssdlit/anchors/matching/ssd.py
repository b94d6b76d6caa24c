"""The SSD matcher: the reference rule, computed sparsely on anchor grids on the CPU.

:class:`SSDMatcher` gives exactly :func:`~ssdlit.anchors.matching.reference.ssd_match`.
Two ways to compute it:

- **sparse** (CPU, anchors with a grid): every decision after the bipartite step
  compares an IoU with a threshold, so only the (gt, anchor) pairs whose IoU reaches
  the lowest threshold in use are computed (:meth:`AnchorOverlaps.above`). Each gt's
  best anchor, each anchor's best gt and the ignore band come from those pairs with
  one ``scatter_reduce`` on packed keys (:mod:`~ssdlit.anchors.matching.keys`); the
  images where two gts want the same best anchor (rare) run the reference greedy
  step on their dense IoU. Sizes depend on the data, which costs nothing on a CPU.
- **dense** (other devices, or anchors without a grid): the reference itself, whose
  shapes are static: no host synchronisation in the training step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ssdlit.anchors.matching import keys
from ssdlit.anchors.matching.base import BACKGROUND, IGNORE, Matcher
from ssdlit.anchors.matching.overlaps import AnchorOverlaps, masked_iou, overlaps_for
from ssdlit.anchors.matching.reference import ssd_match
from ssdlit.registry import MATCHERS

__all__ = ["SSDMatcher"]


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

    def _low_threshold(self) -> float | None:
        """The lowest IoU that decides anything beyond the bipartite step: the pairs the
        sparse path computes. None: too low for skipping anchors to pay off."""
        used = [self.neg_iou_limit] + ([self.pos_iou_threshold] if self.matching == "multi" else [])
        used = [x for x in used if x is not None]
        low = min(used) if used else 0.5  # bipartite alone: the pairs only guide the search
        return low if low >= 0.05 else None

    def match(
        self,
        gt_boxes: Tensor,
        gt_mask: Tensor,
        anchors: Tensor,
        overlaps: AnchorOverlaps | None = None,
    ) -> Tensor:
        overlaps = overlaps_for(anchors if overlaps is None else overlaps, gt_boxes)
        low = self._low_threshold()
        if overlaps.sparse and low is not None and gt_boxes.device.type == "cpu":
            return self._match_sparse(gt_boxes, gt_mask, overlaps, low)
        iou = masked_iou(gt_boxes, gt_mask, overlaps)
        return ssd_match(iou, self.matching, self.pos_iou_threshold, self.neg_iou_limit)

    def _match_sparse(
        self, gt_boxes: Tensor, gt_mask: Tensor, overlaps: AnchorOverlaps, low: float
    ) -> Tensor:
        """The reference's result from the (gt, anchor) pairs with IoU ``>= low`` only."""
        b, a = gt_mask.shape[0], overlaps.anchors.shape[0]
        matches = torch.full((b, a), BACKGROUND, dtype=torch.long, device=gt_boxes.device)
        img, slot = gt_mask.nonzero(as_tuple=True)  # [M] the real gts, packed
        if img.shape[0] == 0:
            return matches
        boxes = gt_boxes[img, slot]  # [M, 4]
        rows, anchor, iou = overlaps.above(boxes, low)  # [N] each, rows ascending
        m = img.shape[0]
        # 1. Each gt's first best anchor (gts without a pair: from their dense row).
        if iou.dtype == torch.float64:  # no room beside 64 bits: the best IoU, then the anchor
            best = iou.new_full((m,), -1.0).scatter_reduce_(0, rows, iou, reduce="amax")
            top = (iou == best.index_select(0, rows)).nonzero().squeeze(1)
            best_anchor = torch.full((m,), a, dtype=torch.long, device=iou.device)
            best_anchor.scatter_reduce_(0, rows[top], anchor[top], reduce="amin")
            bits = None
        else:
            bits = keys.value_bits(iou)
            key = torch.full((m,), -1, dtype=torch.long, device=iou.device)
            key.scatter_reduce_(0, rows, keys.pack(iou, anchor, a, bits), reduce="amax")
            best_anchor = torch.where(key < 0, a, keys.index_of(key, a))
        lonely = (best_anchor == a).nonzero().squeeze(1)
        if lonely.numel():
            best_anchor[lonely] = overlaps(boxes[lonely][None])[0].argmax(dim=1)
        # 2. Multi and ignore: every pair is >= low, the lower of the thresholds in use.
        out = matches.view(-1)
        if iou.numel() and (self.matching == "multi" or self.neg_iou_limit is not None):
            flat = img.index_select(0, rows) * a + anchor  # [N] into matches.view(-1)
            if self.matching == "bipartite":
                out.index_fill_(0, flat, IGNORE)
            else:
                self._multi(out, flat, rows, iou, slot, bits)
        # 3. Bipartite, overwriting: each gt's best anchor where an image's gts agree
        # on none; the images where they clash run the reference greedy step.
        flat = img * a + best_anchor  # [M]
        ordered = flat.sort().values
        shared = ordered[1:][ordered[1:] == ordered[:-1]]
        if shared.numel() == 0:
            out.index_put_((flat,), slot)
            return matches
        clash = torch.zeros(b, dtype=torch.bool, device=flat.device)
        clash[shared // a] = True
        easy = ~clash.index_select(0, img)
        out.index_put_((flat[easy],), slot[easy])
        images = clash.nonzero().squeeze(1)  # [R]
        iou_r = masked_iou(gt_boxes[images], gt_mask[images], overlaps)  # [R, G, A]
        image, anchor, gt = _greedy_pairs(iou_r)
        matches[images[image], anchor] = gt
        return matches

    def _multi(
        self,
        out: Tensor,
        flat: Tensor,
        rows: Tensor,
        iou: Tensor,
        slot: Tensor,
        bits: Tensor | None,
    ) -> None:
        """Each anchor of the pairs to its best gt (ties: the lowest slot, which is the
        lowest packed row): the gt's slot where that IoU is ``>= pos_iou_threshold``,
        else IGNORE (the pairs are all ``>= neg_iou_limit`` then). ``out`` is
        ``matches.view(-1)``, still BACKGROUND at ``flat``; the pairs' ``rows`` ascend;
        ``bits``: :func:`~ssdlit.anchors.matching.keys.value_bits` of the IoU (None:
        float64, exact two passes)."""
        m = slot.shape[0]
        if bits is not None:
            # The best key of each anchor lands in `out` itself (every key is >= 0 >
            # BACKGROUND), and every pair of an anchor then writes the same value.
            out.scatter_reduce_(0, flat, keys.pack(iou, rows, m, bits), reduce="amax")
            won = out.index_select(0, flat)
            value = slot.index_select(0, keys.index_of(won, m))
            if self.neg_iou_limit is not None:
                pos = torch.tensor(self.pos_iou_threshold, dtype=iou.dtype)
                value = torch.where(won >= keys.value_bits(pos), value, IGNORE)
        else:  # highest IoU first, rows ascending among equals; then grouped by anchor
            order = iou.sort(descending=True, stable=True).indices
            order = order[flat[order].sort(stable=True).indices]
            grouped = flat[order]
            first = torch.ones_like(grouped, dtype=torch.bool)
            first[1:] = grouped[1:] != grouped[:-1]
            win = order[first]
            flat, iou = flat[win], iou[win]
            value = slot[rows[win]]
            if self.neg_iou_limit is not None:
                value = torch.where(iou >= self.pos_iou_threshold, value, IGNORE)
        out.index_put_((flat,), value)

    def __repr__(self) -> str:
        return (
            f"SSDMatcher(matching={self.matching!r}, pos_iou_threshold={self.pos_iou_threshold}, "
            f"neg_iou_limit={self.neg_iou_limit})"
        )


def _greedy_pairs(iou: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`~ssdlit.anchors.matching.reference.greedy_bipartite` as the matched
    ``(image, anchor, gt)`` triples, on the host's terms: each gt's best remaining
    anchor is kept (first maximum of its row) and recomputed only for the gts whose best
    anchor was just taken, instead of a pass over all ``[G, A]`` pairs per step.
    ``iou [R, G, A]``, padded gts negative."""
    r, g, _ = iou.shape
    work = iou.clone()
    best, best_anchor = work.max(dim=2)  # [R, G] each (ties: the lowest anchor)
    rows = torch.arange(r, device=iou.device)
    found: list[tuple[Tensor, Tensor, Tensor]] = []
    for _ in range(g):
        gt = best.argmax(dim=1)  # [R] the highest pair of each image (ties: lowest gt)
        live = best[rows, gt] >= 0
        if not bool(live.any()):
            break
        anchor = best_anchor[rows, gt]
        found.append((rows[live], anchor[live], gt[live]))
        work[rows, gt, :] = -1.0
        work[rows, :, anchor] = -1.0
        best[rows, gt] = -1.0
        stale = (best_anchor == anchor[:, None]) & (best >= 0)  # lost their best anchor
        if bool(stale.any()):
            ri, gi = stale.nonzero(as_tuple=True)
            best[ri, gi], best_anchor[ri, gi] = work[ri, gi].max(dim=1)
    if not found:
        empty = rows[:0]
        return empty, empty, empty
    image, anchor, gt = (torch.cat(x) for x in zip(*found, strict=True))
    return image, anchor, gt
