import math

import numpy as np
import pytest
import torch

from ssdlit.metrics import VOCMeanAP, average_precision


def devkit_loop(dets, gts, cls, thr=0.5, use_07=True, inclusive=True):
    """VOCevaldet + VOCap for one class, written as the MATLAB loops (with a strict '>')."""
    one = 1.0 if inclusive else 0.0
    rows = [
        (i, s, b)
        for i, d in enumerate(dets)
        for b, s, lab in zip(d["boxes"], d["scores"], d["labels"], strict=False)
        if lab == cls
    ]
    order = sorted(range(len(rows)), key=lambda k: -rows[k][1])  # Python's sort is stable
    detected = {}
    npos = 0
    for i, g in enumerate(gts):
        diff = g.get("difficult", [False] * len(g["labels"]))
        for j, lab in enumerate(g["labels"]):
            if lab == cls:
                detected[(i, j)] = False
                npos += 0 if diff[j] else 1
    tp, fp = [], []
    for k in order:
        i, _, bb = rows[k]
        ovmax, jmax = -math.inf, None
        for j, (gb, lab) in enumerate(zip(gts[i]["boxes"], gts[i]["labels"], strict=False)):
            if lab != cls:
                continue
            iw = min(bb[2], gb[2]) - max(bb[0], gb[0]) + one
            ih = min(bb[3], gb[3]) - max(bb[1], gb[1]) + one
            if iw > 0 and ih > 0:
                ua = (
                    (bb[2] - bb[0] + one) * (bb[3] - bb[1] + one)
                    + (gb[2] - gb[0] + one) * (gb[3] - gb[1] + one)
                    - iw * ih
                )
                ov = iw * ih / ua
                if ov > ovmax:
                    ovmax, jmax = ov, j
        t = f = 0
        if ovmax > thr:
            if not gts[i].get("difficult", [False] * 99)[jmax]:
                if not detected[(i, jmax)]:
                    t = 1
                    detected[(i, jmax)] = True
                else:
                    f = 1
        else:
            f = 1
        tp.append(t)
        fp.append(f)
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    rec = tp / npos
    with np.errstate(invalid="ignore", divide="ignore"):
        prec = np.nan_to_num(tp / (tp + fp))
    if use_07:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            p = prec[rec >= t]
            ap += (p.max() if p.size else 0.0) / 11
        return ap
    mrec = np.concatenate([[0.0], rec, [1.0]])
    mpre = np.concatenate([[0.0], prec, [0.0]])
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    idx = np.nonzero(mrec[1:] != mrec[:-1])[0] + 1
    return float(np.sum((mrec[idx] - mrec[idx - 1]) * mpre[idx]))


def as_tensors(items):
    out = []
    for d in items:
        out.append({k: torch.tensor(v) for k, v in d.items()})
    return out


def test_hand_computed_single_class():
    # 3 gts in two images (one difficult); 4 detections ranked 0.9 > 0.8 > 0.7 > 0.6:
    # 0.9 hits gt A (TP), 0.8 hits A again (FP), 0.7 hits the difficult gt (ignored),
    # 0.6 hits gt B in image 1 (TP). npos = 2.
    gts = [
        {"boxes": [[0, 0, 9, 9], [50, 50, 59, 59]], "labels": [1, 1], "difficult": [False, True]},
        {"boxes": [[20, 20, 39, 39]], "labels": [1], "difficult": [False]},
    ]
    dets = [
        {
            "boxes": [[0, 0, 9, 9], [1, 1, 9, 9], [50, 50, 59, 59]],
            "scores": [0.9, 0.8, 0.7],
            "labels": [1, 1, 1],
        },
        {"boxes": [[20, 20, 39, 39]], "scores": [0.6], "labels": [1]},
    ]
    # rec after each: .5, .5, .5, 1 ; prec: 1, .5, .5, 2/3
    # 07: t=0..0.5 -> max prec 1 (6 points); t=0.6..1.0 -> 2/3 (5 points)
    expected_07 = (6 * 1.0 + 5 * (2 / 3)) / 11
    # all-point: envelope 1 up to rec .5, then 2/3 up to 1 -> .5 * 1 + .5 * 2/3
    expected_all = 0.5 + 0.5 * (2 / 3)
    for use_07, expected in ((True, expected_07), (False, expected_all)):
        m = VOCMeanAP(iou_threshold=0.5, use_07_metric=use_07)
        m.update(as_tensors(dets), as_tensors(gts))
        res = m.compute()
        assert res["ap_per_class"][1].item() == pytest.approx(expected, abs=1e-12)
        assert res["map"].item() == pytest.approx(expected, abs=1e-12)
        assert devkit_loop(dets, gts, 1, use_07=use_07) == pytest.approx(expected, abs=1e-12)


def test_iou_exactly_at_threshold_is_not_a_hit():
    # Inclusive widths: gt 10x10 px = [0,0,9,9]; det [0,0,9,19] -> 10x20, inter 100, union 200.
    gts = [{"boxes": torch.tensor([[0.0, 0, 9, 9]]), "labels": torch.tensor([1])}]
    dets = [
        {
            "boxes": torch.tensor([[0.0, 0, 9, 19]]),
            "scores": torch.tensor([0.9]),
            "labels": torch.tensor([1]),
        }
    ]
    m = VOCMeanAP(iou_threshold=0.5)
    m.update(dets, gts)
    assert m.compute()["map"].item() == 0.0
    m2 = VOCMeanAP(iou_threshold=0.49)
    m2.update(dets, gts)
    assert m2.compute()["map"].item() == pytest.approx(1.0)
    # Continuous IoU of the same boxes: 81 / 171 < 0.49.
    m3 = VOCMeanAP(iou_threshold=0.49, pixel_inclusive=False)
    m3.update(dets, gts)
    assert m3.compute()["map"].item() == 0.0


def random_case(rng, n_img, n_cls):
    gts, dets = [], []
    for _ in range(n_img):
        g = int(rng.integers(0, 5))
        xy = rng.uniform(0, 80, (g, 2)).round()
        wh = rng.uniform(5, 40, (g, 2)).round()
        gts.append(
            {
                "boxes": np.concatenate([xy, xy + wh], 1).tolist(),
                "labels": rng.integers(1, n_cls + 1, g).tolist(),
                "difficult": (rng.uniform(size=g) < 0.15).tolist(),
            }
        )
        d = int(rng.integers(0, 8))
        base = np.concatenate([xy, xy + wh], 1) if g else np.zeros((0, 4))
        boxes = []
        for _k in range(d):
            if g and rng.uniform() < 0.7:
                b = base[int(rng.integers(0, g))] + rng.normal(0, 3, 4).round()
            else:
                p = rng.uniform(0, 80, 2).round()
                b = np.concatenate([p, p + rng.uniform(5, 40, 2).round()])
            boxes.append([min(b[0], b[2]), min(b[1], b[3]), max(b[0], b[2]), max(b[1], b[3])])
        dets.append(
            {
                "boxes": boxes if boxes else np.zeros((0, 4)).tolist(),
                "scores": rng.choice([0.3, 0.5, 0.7, 0.9], d).tolist(),  # ties on purpose
                "labels": rng.integers(1, n_cls + 1, d).tolist(),
            }
        )
    return dets, gts


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("use_07", [True, False])
def test_equals_devkit_loop_on_random_cases(seed, use_07):
    rng = np.random.default_rng(seed)
    dets, gts = random_case(rng, 12, 3)
    m = VOCMeanAP(iou_threshold=0.5, use_07_metric=use_07)
    # in two updates, as validation batches would come
    m.update(as_tensors(dets[:5]), as_tensors(gts[:5]))
    m.update(as_tensors(dets[5:]), as_tensors(gts[5:]))
    res = m.compute()
    expected = []
    for c in (1, 2, 3):
        npos = sum(
            1
            for g in gts
            for lab, dif in zip(g["labels"], g["difficult"], strict=False)
            if lab == c and not dif
        )
        if npos == 0:
            assert math.isnan(res["ap_per_class"][c].item()) or c >= len(res["ap_per_class"])
            continue
        ap = devkit_loop(dets, gts, c, use_07=use_07)
        assert res["ap_per_class"][c].item() == pytest.approx(ap, abs=1e-12), c
        expected.append(ap)
    assert res["map"].item() == pytest.approx(float(np.mean(expected)), abs=1e-12)


def test_average_precision_helpers():
    rec = torch.tensor([0.5, 1.0], dtype=torch.float64)
    prec = torch.tensor([1.0, 0.5], dtype=torch.float64)
    assert average_precision(rec, prec, use_07_metric=False) == pytest.approx(0.75)
    assert average_precision(rec, prec, use_07_metric=True) == pytest.approx((6 + 5 * 0.5) / 11)


def test_empty_inputs():
    m = VOCMeanAP()
    m.update(
        [
            {
                "boxes": torch.zeros(0, 4),
                "scores": torch.zeros(0),
                "labels": torch.zeros(0, dtype=torch.long),
            }
        ],
        [{"boxes": torch.tensor([[0.0, 0, 5, 5]]), "labels": torch.tensor([2])}],
    )
    res = m.compute()
    assert res["map"].item() == 0.0 and torch.atleast_1d(
        torch.as_tensor(res["classes"])
    ).tolist() == [2]
