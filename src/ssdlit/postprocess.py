"""From scores and boxes to detections: confidence threshold, NMS and top-k.

Two post-processors (registry ``postprocess``), both batched over images and
classes at once (torchvision ``batched_nms`` with image-and-class groups):

- ``per_class`` (:class:`PerClassNMS`): the Caffe SSD / ssd_keras ``decode_detections``
  rule. For every class c >= 1, the boxes whose class-c score is strictly above
  ``confidence_thresh`` go through greedy NMS (a box is suppressed when its IoU with
  a kept box of the same class is strictly above ``iou_threshold``); at most
  ``nms_max_output_size`` survivors per class; then the ``top_k`` best of the image.
- ``global`` (:class:`GlobalNMS`): ssd_keras ``decode_detections_fast``. Each box
  takes its best class over all K (boxes whose best class is the background are
  dropped), keeps it when that score is at least ``confidence_thresh`` (``>=``, as
  ssd_keras's fast decoder; the per-class rule above is strict, as Caffe's), one
  class-agnostic NMS, then ``top_k``.

Early stop: only the ``top_k`` best survivors are kept, and a candidate's fate
depends only on the candidates scored above it, so NMS runs on the best-scored
candidates of each image in growing chunks until ``top_k`` survive (or the
candidates run out). The result is the same as NMS over all candidates; an
untrained model's 1e5 candidates per image then cost a few thousand.

Candidate search (``per_class``, eagerly): a trained model has a few hundred class
scores above the threshold per image out of 175k (8732 anchors x 20 classes), so
thresholding them all and searching the mask would cost more than NMS itself.
:meth:`PerClassNMS._passing_candidates` first takes one maximum over groups of
``FOLD`` anchors and reads again only the groups whose maximum passes; when they
are too many (an untrained model), the dense search above runs instead. On a CPU
the NMS itself runs in runs of whole image-and-class groups (:func:`grouped_nms`).
Both give exactly the candidates, survivors and order of the dense search.

Input: ``scores`` ``[B, A, K]`` probabilities (column 0 = background) and ``boxes``
``[B, A, 4]`` xyxy. Output: a list of B tensors ``[k, 6]`` = (label, score, x1, y1,
x2, y2), best first, in the units of ``boxes`` (or in pixels when ``image_size``
is given and the boxes are normalised).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import batched_nms, box_iou, nms

from ssdlit.registry import POSTPROCESS

__all__ = ["GlobalNMS", "PerClassNMS", "box_vote", "grouped_nms", "rank_within_groups"]


#: Score rows folded into one maximum by the candidate search of :class:`PerClassNMS`
#: (measured on a CPU, SSD300 batch of 8: 16 and 32 cost the same).
FOLD = 32

#: Boxes per NMS call of :func:`grouped_nms` on a CPU (whole groups of one or more
#: image-and-class pairs). Measured on a CPU, 1392 boxes of 160 groups, few suppressed:
#: one call 4.1 ms, runs of 128 or 192 boxes 1.0 ms, of 64 boxes 1.3 ms (a call costs
#: ~30 us plus ~3.5 ns per pair of a kept box and a later box).
NMS_RUN = 128


def rank_within_groups(groups: Tensor, num_groups: int | None = None) -> Tensor:
    """Rank ``[N]`` of each element among the earlier elements of its group.

    ``groups`` ``[N]`` holds group ids in priority order (e.g. by decreasing score);
    the result is 0 for the first element of each group, 1 for the second, ...
    While tracing (ONNX export) a one-hot cumulative sum over ``num_groups`` columns
    is used, which exports; eagerly a stable sort.
    """
    if groups.numel() == 0:
        return groups.clone()
    if num_groups is not None and (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()):
        one_hot = torch.nn.functional.one_hot(groups, num_groups)  # [N, num_groups]
        return (one_hot.cumsum(0) * one_hot).sum(1) - 1
    order = torch.argsort(groups, stable=True)
    _, counts = torch.unique_consecutive(groups[order], return_counts=True)
    starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)  # [N]
    ranks = torch.empty_like(groups)
    ranks[order] = torch.arange(groups.numel(), device=groups.device) - starts
    return ranks


def grouped_nms(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float) -> Tensor:
    """NMS within groups: indices of the kept boxes ``[M, 4]`` xyxy, by decreasing score.

    Few boxes: NMS on boxes shifted apart per group (no overlap across groups); many
    boxes: torchvision's ``batched_nms`` (one call per group). The crossover was
    measured on a CPU: the shifted boxes win up to a few thousand boxes. On a CPU, NMS
    costs (kept boxes) x (boxes) per call, so above ``2 * NMS_RUN`` boxes the shifted
    boxes go through NMS in runs of whole groups of about ``NMS_RUN`` boxes
    (:func:`_nms_in_runs`): the same indices in the same order as one call.
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    tracing = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
    if boxes.shape[0] > 3000 and not tracing:
        return batched_nms(boxes, scores, groups, iou_threshold)
    shift = groups.to(boxes.dtype) * (boxes.max() - boxes.min() + 1)
    shifted = boxes + shift[:, None]
    if tracing or boxes.device.type != "cpu" or boxes.shape[0] <= 2 * NMS_RUN:
        return nms(shifted, scores, iou_threshold)
    return _nms_in_runs(shifted, scores, groups, iou_threshold, NMS_RUN)


def _nms_in_runs(
    boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float, run_size: int
) -> Tensor:
    """``nms(boxes, scores)`` computed in runs of whole groups of about ``run_size`` boxes.

    ``boxes`` ``[N, 4]`` xyxy must not overlap across ``groups`` ``[N]`` (shifted apart),
    so each run's NMS is independent of the others. Returns the indices one ``nms`` call
    would return, in its order: by decreasing score, ties by increasing index (its sort
    is stable, and each run keeps the boxes of a group in their order).
    """
    order = torch.argsort(groups, stable=True)  # [N] grouped, each group in index order
    _, counts = torch.unique_consecutive(groups[order], return_counts=True)  # [G]
    run = (torch.cumsum(counts, 0) - counts) // run_size  # [G] the run of each group
    sizes = torch.zeros(int(run[-1]) + 1, dtype=counts.dtype, device=counts.device)
    sizes.index_add_(0, run, counts)
    boxes, scores_in_order = boxes[order], scores[order]
    starts, kept = [], []
    start = 0
    for size in sizes.tolist():
        if size:
            end = start + size
            kept.append(nms(boxes[start:end], scores_in_order[start:end], iou_threshold))
            starts.append(start)
            start = end
    lengths = torch.tensor([len(k) for k in kept])
    offsets = torch.repeat_interleave(torch.tensor(starts), lengths).to(order.device)
    kept_mask = torch.zeros(len(order), dtype=torch.bool, device=order.device)
    kept_mask[order[torch.cat(kept) + offsets]] = True
    keep = kept_mask.nonzero().flatten()  # by index
    return keep[torch.argsort(scores[keep], descending=True, stable=True)]


def _at_most_per_image(img: Tensor, b: int, k: int) -> bool:
    """True when no image of ``img`` ``[M]`` (ids < b) occurs more than ``k`` times.

    Only answered eagerly on a CPU (False otherwise: the caller ranks the candidates
    anyway), so that it adds no host-device synchronisation and nothing to a trace.
    """
    if img.device.type != "cpu" or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return False
    return img.numel() <= k or int(torch.bincount(img, minlength=b).max()) <= k


def box_vote(
    boxes: Tensor, scores: Tensor, groups: Tensor, keep: Tensor, iou_min: float, rows: int = 64
) -> Tensor:
    """Box voting (Gidaris & Komodakis, 2015): each kept box becomes the score-weighted
    mean of the candidates of its group (image and class) whose IoU with it is at least
    ``iou_min``, itself included. Scores are unchanged.

    Args:
        boxes: ``[M, 4]`` xyxy candidates; scores ``[M]`` (positive); groups ``[M]``.
        keep: ``[K]`` indices of the boxes NMS kept.
        iou_min: the least IoU of a voter.
        rows: kept boxes per block.
    Returns:
        ``[K, 4]`` the voted boxes, in ``boxes``' dtype.

    How: candidates and kept boxes are ordered by group, so that a block of ``rows``
    kept boxes compares with the candidates of its own groups only (a ``[rows, m]`` IoU
    matrix, m the candidates of those groups, not of the whole batch: an untrained
    network's thousands of candidates per image stay cheap). Traced for export: one
    ``[K, M]`` matrix, without the host reads that find the windows.
    """
    if keep.numel() == 0:
        return boxes[keep]
    work = boxes.float()
    weight = scores.float()
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return _vote_block(work, weight, groups, keep, iou_min).to(boxes.dtype)
    order = torch.argsort(groups, stable=True)  # candidates by group
    work, weight, groups = work[order], weight[order], groups[order]
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel(), device=order.device)
    kept = position[keep]  # the kept boxes' rows in the ordered candidates
    by_group = torch.argsort(kept)  # kept boxes by group (their rows ascend with it)
    kept = kept[by_group]
    # each kept box's group window [first, last) among the ordered candidates
    first = torch.searchsorted(groups, groups[kept], side="left")
    last = torch.searchsorted(groups, groups[kept], side="right")
    bounds = torch.stack((first, last), dim=1).tolist()
    voted = torch.empty(kept.shape[0], 4, dtype=work.dtype, device=work.device)
    for start in range(0, kept.shape[0], rows):
        stop = min(start + rows, kept.shape[0])
        lo, hi = bounds[start][0], bounds[stop - 1][1]
        voted[start:stop] = _vote_block(
            work[lo:hi], weight[lo:hi], groups[lo:hi], kept[start:stop] - lo, iou_min
        )
    out = torch.empty_like(voted)
    out[by_group] = voted
    return out.to(boxes.dtype)


def _vote_block(
    boxes: Tensor, weight: Tensor, groups: Tensor, keep: Tensor, iou_min: float
) -> Tensor:
    """:func:`box_vote` of the kept rows ``keep [r]`` against the candidates ``boxes
    [m, 4]`` (float), ``weight [m]``, ``groups [m]``: ``[r, 4]``."""
    iou = box_iou(boxes.index_select(0, keep), boxes)  # [r, m]
    mine = groups.index_select(0, keep)[:, None] == groups[None, :]
    itself = keep[:, None] == torch.arange(boxes.shape[0], device=keep.device)[None, :]
    w = torch.where((mine & (iou >= iou_min)) | itself, weight[None, :], 0.0)  # [r, m]
    return (w @ boxes) / w.sum(dim=1, keepdim=True)


class _NMSBase(ABC):
    """Shared chunked NMS over flattened candidates."""

    def __init__(
        self,
        confidence_thresh: float = 0.01,
        iou_threshold: float = 0.45,
        top_k: int | None = 200,
        nms_max_output_size: int | None = 400,
        initial_chunk: int = 256,
        vote_iou: float | None = None,
    ) -> None:
        if not 0 <= confidence_thresh < 1:
            raise ValueError(f"confidence_thresh must be in [0, 1), got {confidence_thresh}")
        if vote_iou is not None and not 0 < vote_iou <= 1:
            raise ValueError(f"vote_iou must be in (0, 1] or None, got {vote_iou}")
        self.vote_iou = None if vote_iou is None else float(vote_iou)
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be positive or None, got {top_k}")
        self.confidence_thresh = float(confidence_thresh)
        self.iou_threshold = float(iou_threshold)
        self.top_k = top_k
        self.nms_max_output_size = nms_max_output_size
        self.initial_chunk = int(initial_chunk)

    @abstractmethod
    def _candidates(self, scores: Tensor) -> tuple[Tensor, Tensor | None]:
        """Flat candidate scores ``[B, N]`` and what :meth:`_locate` needs (or None)."""

    def _passing_candidates(
        self, scores: Tensor, max_share: float = 1 / 8
    ) -> tuple[Tensor, Tensor, Tensor] | None:
        """Every candidate that passes, as :meth:`_run` finds them with ``k=None``, or None.

        Image ``[M]``, flat position ``[M]`` in :meth:`_candidates`' order and score
        ``[M]``, sorted by (image, position). None when this search would read more
        than ``max_share`` of the scores (many candidates: the dense search is cheaper)
        or is not implemented.
        """
        return None

    def _passes(self, cand_scores: Tensor) -> Tensor:
        """Which candidate scores pass the confidence threshold (bool, same shape)."""
        return cand_scores > self.confidence_thresh

    @abstractmethod
    def _locate(
        self, img: Tensor, pos: Tensor, extra: Tensor | None, num_labels: int
    ) -> tuple[Tensor, Tensor]:
        """Box index and label ``[M]`` of the candidates at flat positions ``pos [M]`` of ``img``."""

    def __call__(
        self, scores: Tensor, boxes: Tensor, image_size: Sequence[int] | None = None
    ) -> list[Tensor]:
        """Detections per image: list of B tensors ``[k, 6]`` (label, score, x1, y1, x2, y2).

        Args:
            scores: ``[B, A, K]`` class probabilities, column 0 = background.
            boxes: ``[B, A, 4]`` xyxy (normalised or pixels).
            image_size: ``(H, W)``: multiply normalised coordinates by it.
        """
        if scores.dim() != 3 or boxes.shape != (*scores.shape[:2], 4):
            raise ValueError(
                f"expected scores [B, A, K] and boxes [B, A, 4], got {tuple(scores.shape)} "
                f"and {tuple(boxes.shape)}"
            )
        if image_size is not None:
            h, w = image_size
            boxes = boxes * boxes.new_tensor([w, h, w, h])
        b, num_labels = scores.shape[0], scores.shape[2]
        chunk = max(self.initial_chunk, 4 * self.top_k) if self.top_k is not None else None
        found = self._passing_candidates(scores)
        passing: Tensor | None = None  # candidates above the threshold per image, [B] on the CPU
        if found is not None:
            img, pos, vals = found
            passing = torch.bincount(img, minlength=b).cpu()
            if b == 0 or chunk is None or int(passing.max()) <= chunk:
                # Every image's candidates fit in the first chunk: one NMS over all of them,
                # what the loop below does in its first round, without the dense search.
                if img.numel() == 0:
                    return [scores.new_zeros(0, 6) for _ in range(b)]
                img, out = self._nms(img, pos, vals, None, boxes, num_labels, b)
                return self._per_image(img, out, b)
        cand_scores, extra = self._candidates(scores)
        n = cand_scores.shape[1]
        want = self.top_k if self.top_k is not None else n
        if passing is None:
            passing = self._passes(cand_scores).sum(dim=1).cpu()  # [B]
        results: list[Tensor] = [cand_scores.new_zeros(0, 6)] * b
        todo = torch.arange(b)
        chunk = n if chunk is None else chunk
        while todo.numel():
            k = min(chunk, int(passing[todo].max()))
            if k == 0:
                break
            sub = todo.to(scores.device)
            part = None if extra is None else extra[sub]
            everything = k >= int(passing[todo].max())
            img, out = self._run(
                cand_scores[sub], part, boxes[sub], None if everything else k, num_labels
            )
            dets = self._per_image(img, out, len(todo))
            counts = torch.tensor([len(d) for d in dets])
            done = (counts >= want) | (passing[todo] <= k)
            for j in done.nonzero().flatten().tolist():
                results[int(todo[j])] = dets[j]
            todo = todo[~done]
            chunk *= 4
        return results

    @staticmethod
    def _per_image(img: Tensor, out: Tensor, b: int) -> list[Tensor]:
        """Split detections ``[M, 6]`` sorted by score into B tensors by image ``img [M]``."""
        order = torch.argsort(img, stable=True)  # per image, best first
        counts = torch.bincount(img, minlength=b)
        return list(out[order].split(counts.tolist()))

    def flat(self, scores: Tensor, boxes: Tensor) -> Tensor:
        """All detections of the batch as one tensor ``[N, 7]`` (image, label, score, box).

        Sorted by score, not grouped by image. Traceable: this is the path that ONNX
        export records (NMS on every candidate, no early stop; same result).
        """
        cand_scores, extra = self._candidates(scores)
        img, out = self._run(cand_scores, extra, boxes, None, scores.shape[2])
        return torch.cat((img[:, None].to(out.dtype), out), dim=1)

    def _run(
        self, cs: Tensor, extra: Tensor | None, boxes: Tensor, k: int | None, num_labels: int
    ) -> tuple[Tensor, Tensor]:
        """NMS over the ``k`` best candidates of each image (``None``: all that pass).

        Exact for the survivors. Returns the image index ``[M]`` and detections
        ``[M, 6]``, sorted by score.
        """
        b = cs.shape[0]
        if k is None:  # every candidate above the threshold
            img, pos = self._passes(cs).nonzero(as_tuple=True)  # [M] each
            vals = cs[img, pos]
        else:
            vals, pos = cs.topk(k, dim=1)  # [B, k] best first
            passing = self._passes(vals)  # [B, k]
            img = torch.arange(b, device=cs.device)[:, None].expand(b, k)[passing]
            vals, pos = vals[passing], pos[passing]
        return self._nms(img, pos, vals, extra, boxes, num_labels, b)

    def _nms(
        self,
        img: Tensor,
        pos: Tensor,
        vals: Tensor,
        extra: Tensor | None,
        boxes: Tensor,
        num_labels: int,
        b: int,
    ) -> tuple[Tensor, Tensor]:
        """NMS, per-class cap and ``top_k`` over candidates ``img, pos, vals`` ``[M]`` each.

        ``boxes`` ``[b, A, 4]`` xyxy. Returns the image index ``[M']`` and detections
        ``[M', 6]`` (label, score, box), sorted by score.
        """
        box_idx, labels = self._locate(img, pos, extra, num_labels)
        cand_boxes = boxes[img, box_idx]  # [M, 4]
        groups = img * num_labels + self._nms_group(labels)
        keep = grouped_nms(cand_boxes.float(), vals.float(), groups, self.iou_threshold)
        if self.vote_iou is not None:
            voted = box_vote(cand_boxes, vals, groups, keep, self.vote_iou)
        img, vals, labels, cand_boxes = img[keep], vals[keep], labels[keep], cand_boxes[keep]
        if self.vote_iou is not None:
            cand_boxes = voted
        # The per-class cap can only bite when top_k exceeds it: a survivor ranked past the
        # cap in its class has `cap` better survivors in the image already.
        cap = self.nms_max_output_size
        if cap is not None and (self.top_k is None or self.top_k > cap):
            ok = rank_within_groups(img * num_labels + labels, b * num_labels) < cap
            img, vals, labels, cand_boxes = img[ok], vals[ok], labels[ok], cand_boxes[ok]
        if self.top_k is not None and not _at_most_per_image(img, b, self.top_k):
            ok = rank_within_groups(img, b) < self.top_k
            img, vals, labels, cand_boxes = img[ok], vals[ok], labels[ok], cand_boxes[ok]
        out = torch.cat(
            (labels[:, None].to(vals.dtype), vals[:, None], cand_boxes.to(vals.dtype)), dim=1
        )
        return img, out

    def _nms_group(self, labels: Tensor) -> Tensor:
        return labels


@POSTPROCESS.register("per_class")
class PerClassNMS(_NMSBase):
    """Per-class NMS as Caffe SSD and ssd_keras's ``decode_detections``.

    Args:
        confidence_thresh: a class score must be strictly above it (0.01), as Caffe's
            ``DetectionOutput`` and ssd_keras's ``decode_detections``.
        iou_threshold: suppress when IoU with a kept box of the class is above it (0.45).
        top_k: best detections kept per image after NMS (200; None keeps all).
        nms_max_output_size: survivors kept per class and image (400; None: no cap).
        pre_nms_top_k: optional per-class cap before NMS (Caffe's ``top_k``); off by default.
        vote_iou: box voting (:func:`box_vote`): each kept box becomes the score-weighted
            mean of its class's candidates with IoU >= ``vote_iou`` with it; None (the
            default): off.
    """

    def __init__(
        self,
        confidence_thresh: float = 0.01,
        iou_threshold: float = 0.45,
        top_k: int | None = 200,
        nms_max_output_size: int | None = 400,
        pre_nms_top_k: int | None = None,
        initial_chunk: int = 256,
        vote_iou: float | None = None,
    ) -> None:
        super().__init__(
            confidence_thresh, iou_threshold, top_k, nms_max_output_size, initial_chunk, vote_iou
        )
        self.pre_nms_top_k = pre_nms_top_k

    def _candidates(self, scores: Tensor) -> tuple[Tensor, Tensor | None]:
        b, a, k = scores.shape
        s = scores[..., 1:]  # [B, A, C]
        if self.pre_nms_top_k is not None and self.pre_nms_top_k < a:
            top = s.topk(self.pre_nms_top_k, dim=1).indices  # [B, n, C]
            # scatter a tensor, not a Python scalar: what tracing (ONNX export) can record
            ones = torch.ones_like(top, dtype=torch.bool)
            in_top = torch.zeros_like(s, dtype=torch.bool).scatter(1, top, ones)
            s = s.masked_fill(~in_top, 0.0)
        return s.reshape(b, a * (k - 1)), None  # flat index = anchor * C + (label - 1)

    def _passing_candidates(
        self, scores: Tensor, max_share: float = 1 / 8
    ) -> tuple[Tensor, Tensor, Tensor] | None:
        """The class scores above the threshold without a ``[B, A, C]`` mask and ``nonzero``.

        The ``B * A`` score rows ``[K]`` are folded ``FOLD`` at a time: row r with rows
        r + R, r + 2R, ... (R = B * A // FOLD), and one maximum over the fold (a cheap
        elementwise reduction) gives each label's best score in each set of ``FOLD`` rows,
        ``[R, K]``. Only the (set, label) pairs whose best is above the threshold are
        read again, row by row. A trained model has a few hundred candidates per image:
        a few ten thousand scores are read again instead of thresholding 1.4M and
        searching a 1.4M mask. None when more than ``max_share`` of the scores would be
        read again (an untrained model: the dense search is cheaper), with
        ``pre_nms_top_k`` and while tracing.
        """
        b, a, k = scores.shape
        if (self.pre_nms_top_k is not None and self.pre_nms_top_k < a) or (
            torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
        ):
            return None
        flat = scores.reshape(-1)  # [B*A*K] (image, anchor, label) row-major
        thr = self.confidence_thresh
        dev = flat.device
        rows = b * a
        per = rows // FOLD  # R: rows per fold
        main = per * FOLD  # the folded rows; the other rows (< FOLD) are all read again
        parts = []
        if per:
            best = flat[: main * k].view(FOLD, per, k).amax(dim=0)  # [R, K]
            # A NaN best is not <= thr: its set is read again (a NaN score never passes).
            row, label = (~(best[:, 1:] <= thr)).nonzero(as_tuple=True)  # [H] each
            if row.numel() * FOLD > max_share * flat.numel():
                return None
            first = row * k + label + 1  # flat index of the (set, label) pair in fold row 0
            step = torch.arange(FOLD, device=dev) * (per * k)  # [FOLD]
            parts.append((first[:, None] + step).reshape(-1))
        if main < rows:
            tail = torch.arange(main, rows, device=dev)[:, None] * k
            parts.append((tail + torch.arange(1, k, device=dev)).reshape(-1))
        idx = torch.cat(parts) if parts else torch.empty(0, dtype=torch.long, device=dev)
        vals = flat.index_select(0, idx)
        ok = vals > thr
        ok = ok.nonzero().flatten()
        idx, vals = idx.index_select(0, ok), vals.index_select(0, ok)
        idx, order = idx.sort()  # (image, anchor, label) order, as nonzero gives it
        vals = vals[order]
        img, within = idx // (a * k), idx % (a * k)
        pos = (within // k) * (k - 1) + within % k - 1  # anchor * C + (label - 1)
        return img, pos, vals

    def _locate(
        self, img: Tensor, pos: Tensor, extra: Tensor | None, num_labels: int
    ) -> tuple[Tensor, Tensor]:
        c = num_labels - 1
        return pos // c, pos % c + 1


@POSTPROCESS.register("global")
class GlobalNMS(_NMSBase):
    """Class-agnostic NMS as ssd_keras's ``decode_detections_fast``.

    Each box keeps only its best class over all K; boxes whose best class is the
    background are dropped; the rest whose score is at least ``confidence_thresh``
    (``>=``, as ssd_keras) go through one NMS. No per-class cap by default
    (``nms_max_output_size=None``).
    """

    def __init__(
        self,
        confidence_thresh: float = 0.01,
        iou_threshold: float = 0.45,
        top_k: int | None = 200,
        nms_max_output_size: int | None = None,
        initial_chunk: int = 256,
        vote_iou: float | None = None,
    ) -> None:
        super().__init__(
            confidence_thresh, iou_threshold, top_k, nms_max_output_size, initial_chunk, vote_iou
        )

    def _candidates(self, scores: Tensor) -> tuple[Tensor, Tensor | None]:
        best, label = scores.max(dim=2)  # [B, A]
        best = best.masked_fill(label == 0, -1.0)  # background winners never pass (thresh >= 0)
        return best, label

    def _passes(self, cand_scores: Tensor) -> Tensor:
        return cand_scores >= self.confidence_thresh

    def _locate(
        self, img: Tensor, pos: Tensor, extra: Tensor | None, num_labels: int
    ) -> tuple[Tensor, Tensor]:
        assert extra is not None  # the best label of every box, [B, A]
        return pos, extra[img, pos]

    def _nms_group(self, labels: Tensor) -> Tensor:
        return torch.zeros_like(labels)
