"""A plain numpy, loop-by-loop restatement of ssd_keras's anchor and matching code paths.

Written from the published algorithm (SSDInputEncoder.generate_anchor_boxes_for_layer,
match_bipartite_greedy, match_multi and the neutral-box step) so the vectorised torch
code can be compared with something that has no cleverness in it.
"""

from __future__ import annotations

import numpy as np


def anchors_for_layer(
    img_h, img_w, fmap, ratios, this_scale, next_scale, two_boxes, step, offset, clip
):
    size = min(img_h, img_w)
    wh = []
    for ar in ratios:
        if ar == 1:
            wh.append((this_scale * size, this_scale * size))
            if two_boxes:
                s = np.sqrt(this_scale * next_scale) * size
                wh.append((s, s))
        else:
            wh.append((this_scale * size * np.sqrt(ar), this_scale * size / np.sqrt(ar)))
    if step is None:
        step_h, step_w = img_h / fmap[0], img_w / fmap[1]
    elif isinstance(step, (list, tuple)):
        step_h, step_w = step
    else:
        step_h = step_w = step
    if offset is None:
        off_h = off_w = 0.5
    elif isinstance(offset, (list, tuple)):
        off_h, off_w = offset
    else:
        off_h = off_w = offset
    cy = np.linspace(off_h * step_h, (off_h + fmap[0] - 1) * step_h, fmap[0])
    cx = np.linspace(off_w * step_w, (off_w + fmap[1] - 1) * step_w, fmap[1])
    out = np.zeros((fmap[0], fmap[1], len(wh), 4))
    for i in range(fmap[0]):
        for j in range(fmap[1]):
            for k, (w, h) in enumerate(wh):
                x1, y1, x2, y2 = cx[j] - w / 2, cy[i] - h / 2, cx[j] + w / 2, cy[i] + h / 2
                if clip:
                    x1, x2 = [img_w - 1 if v >= img_w else max(v, 0) for v in (x1, x2)]
                    y1, y2 = [img_h - 1 if v >= img_h else max(v, 0) for v in (y1, y2)]
                x1, x2, y1, y2 = x1 / img_w, x2 / img_w, y1 / img_h, y2 / img_h
                out[i, j, k] = ((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1)
    return out.reshape(-1, 4)


def ssd_keras_anchors(
    img_h, img_w, fmaps, ratios, scales, two_boxes=True, steps=None, offsets=None, clip=False
):
    steps = steps or [None] * len(fmaps)
    offsets = offsets or [None] * len(fmaps)
    return np.concatenate(
        [
            anchors_for_layer(
                img_h, img_w, f, r, scales[i], scales[i + 1], two_boxes, steps[i], offsets[i], clip
            )
            for i, (f, r) in enumerate(zip(fmaps, ratios, strict=True))
        ]
    )


def iou_matrix(gt_xyxy, anchors_cxcywh):
    a = np.concatenate(
        [
            anchors_cxcywh[:, :2] - anchors_cxcywh[:, 2:] / 2,
            anchors_cxcywh[:, :2] + anchors_cxcywh[:, 2:] / 2,
        ],
        1,
    )
    out = np.zeros((len(gt_xyxy), len(a)))
    for g, b in enumerate(gt_xyxy):
        iw = np.maximum(0, np.minimum(b[2], a[:, 2]) - np.maximum(b[0], a[:, 0]))
        ih = np.maximum(0, np.minimum(b[3], a[:, 3]) - np.maximum(b[1], a[:, 1]))
        inter = iw * ih
        union = (b[2] - b[0]) * (b[3] - b[1]) + (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) - inter
        out[g] = inter / union
    return out


def ssd_keras_match(gt_xyxy, anchors_cxcywh, matching="multi", pos=0.5, neg=0.3):
    """matches [A]: gt index, -1 background, -2 neutral; one image, real gts only."""
    n_anchors = len(anchors_cxcywh)
    matches = -np.ones(n_anchors, dtype=np.int64)
    if len(gt_xyxy) == 0:
        return matches
    sim = iou_matrix(np.asarray(gt_xyxy, dtype=np.float64), anchors_cxcywh)
    w = sim.copy()
    for _ in range(len(gt_xyxy)):  # match_bipartite_greedy
        anchor_idx = np.argmax(w, axis=1)
        overlaps = w[np.arange(len(gt_xyxy)), anchor_idx]
        g = int(np.argmax(overlaps))
        matches[anchor_idx[g]] = g
        w[g] = 0
        w[:, anchor_idx[g]] = 0
    sim[:, matches >= 0] = 0
    if matching == "multi":  # match_multi
        best_g = np.argmax(sim, axis=0)
        best = sim[best_g, np.arange(n_anchors)]
        hit = np.nonzero(best >= pos)[0]
        matches[hit] = best_g[hit]
        sim[:, hit] = 0
    if neg is not None:
        neutral = (np.max(sim, axis=0) >= neg) & (matches < 0)
        matches[neutral] = -2
    return matches


def _greedy_nms(score_boxes, iou_threshold):
    """score_boxes [n, 5] = (score, x1, y1, x2, y2); repeatedly keep the best, drop IoU > thr."""
    left = np.array(score_boxes, dtype=np.float64)
    kept = []
    while len(left):
        i = int(np.argmax(left[:, 0]))
        best = left[i].copy()
        kept.append(best)
        left = np.delete(left, i, axis=0)
        if not len(left):
            break
        iw = np.maximum(0, np.minimum(left[:, 3], best[3]) - np.maximum(left[:, 1], best[1]))
        ih = np.maximum(0, np.minimum(left[:, 4], best[4]) - np.maximum(left[:, 2], best[2]))
        inter = iw * ih
        union = (
            (left[:, 3] - left[:, 1]) * (left[:, 4] - left[:, 2])
            + (best[3] - best[1]) * (best[4] - best[2])
            - inter
        )
        left = left[inter / union <= iou_threshold]
    return np.array(kept).reshape(-1, 5)


def decode_detections(scores, boxes, conf=0.01, iou=0.45, top_k=200, max_per_class=None):
    """One image: scores [A, K] (column 0 background), boxes [A, 4] xyxy -> [k, 6] best first."""
    out = []
    for c in range(1, scores.shape[1]):
        hit = scores[:, c] > conf
        if hit.any():
            kept = _greedy_nms(np.concatenate([scores[hit, c][:, None], boxes[hit]], 1), iou)
            if max_per_class is not None:
                kept = kept[:max_per_class]
            out.append(np.concatenate([np.full((len(kept), 1), c), kept], 1))
    if not out:
        return np.zeros((0, 6))
    out = np.concatenate(out)
    out = out[np.argsort(-out[:, 1], kind="stable")]
    return out[:top_k] if top_k is not None else out


def decode_detections_fast(scores, boxes, conf=0.01, iou=0.45, top_k=200):
    """One image, ssd_keras's fast variant: best class per box, class-agnostic NMS.

    Keeps a box whose best class is not the background and whose score is at least
    ``conf`` (``>=``, as ssd_keras's ``decode_detections_fast``; ``decode_detections``
    above keeps scores strictly above it, as Caffe's ``DetectionOutput``).
    """
    label = np.argmax(scores, axis=1)
    best = scores.max(axis=1)
    hit = (label != 0) & (best >= conf)
    kept_rows = []
    left = np.concatenate([label[hit][:, None], best[hit][:, None], boxes[hit]], 1)
    kept = _greedy_nms(left[:, 1:], iou)
    for row in kept:  # recover labels by matching score and box
        match = np.nonzero(np.all(left[:, 1:] == row, axis=1))[0][0]
        kept_rows.append(left[match])
    out = np.array(kept_rows).reshape(-1, 6)
    out = out[np.argsort(-out[:, 1], kind="stable")]
    return out[:top_k] if top_k is not None else out
