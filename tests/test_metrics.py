import math

import numpy as np
import pytest
import torch

from ssdlit.metrics import VOCMeanAP, average_precision, voc_iou


def devkit_loop(dets, gts, cls, thr=0.5, use_07=True, inclusive=True, strict=False):
    """VOCevaldet + VOCap for one class, written as the MATLAB loops.

    A detection is a hit when ``ovmax >= VOCopts.minoverlap`` (VOCevaldet.m); ``strict``
    uses py-faster-rcnn's ``ovmax > ovthresh`` instead.
    """
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
        if (ovmax > thr) if strict else (ovmax >= thr):
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


def one_box_case(det_box, gt_box):
    gts = [{"boxes": torch.tensor([gt_box], dtype=torch.float64), "labels": torch.tensor([1])}]
    dets = [
        {
            "boxes": torch.tensor([det_box], dtype=torch.float64),
            "scores": torch.tensor([0.9]),
            "labels": torch.tensor([1]),
        }
    ]
    return dets, gts


def voc_map(dets, gts, **options):
    m = VOCMeanAP(**options)
    m.update(dets, gts)
    return m.compute()["map"].item()


def test_iou_exactly_at_threshold_is_a_hit_as_in_the_devkit():
    # Pixel-inclusive (the devkit's +1): gt [0,0,9,9] is 10x10 px, det [0,0,9,19] 10x20 px,
    # intersection 100, union 200: IoU exactly 0.5 in floating point.
    dets, gts = one_box_case([0.0, 0, 9, 19], [0.0, 0, 9, 9])
    iou = voc_iou(dets[0]["boxes"], gts[0]["boxes"], pixel_inclusive=True)
    assert iou.item() == 0.5
    # VOCevaldet.m: ovmax >= minoverlap -> a true positive; AP 1.
    assert voc_map(dets, gts, iou_threshold=0.5) == pytest.approx(1.0, abs=1e-12)
    assert voc_map(dets, gts, iou_threshold=0.5, iou_rule="devkit") == pytest.approx(1.0, abs=1e-12)
    # py-faster-rcnn's voc_eval (ovmax > ovthresh): not a hit.
    assert voc_map(dets, gts, iou_threshold=0.5, iou_rule="strict") == 0.0
    # The loop restatement agrees both ways.
    plain = [{k: v.tolist() for k, v in d.items()} for d in dets]
    plain_gts = [{k: v.tolist() for k, v in g.items()} for g in gts]
    assert devkit_loop(plain, plain_gts, 1) == pytest.approx(1.0, abs=1e-12)
    assert devkit_loop(plain, plain_gts, 1, strict=True) == 0.0
    # Just above the IoU: no hit under either rule.
    assert voc_map(dets, gts, iou_threshold=0.51) == 0.0
    # Continuous IoU of the same boxes is 81 / 171 < 0.49; without the +1 the boxes
    # [0,0,10,10] and [0,0,10,20] have IoU exactly 0.5 again.
    assert voc_map(dets, gts, iou_threshold=0.49, pixel_inclusive=False) == 0.0
    dets, gts = one_box_case([0.0, 0, 10, 20], [0.0, 0, 10, 10])
    assert voc_iou(dets[0]["boxes"], gts[0]["boxes"], pixel_inclusive=False).item() == 0.5
    assert voc_map(dets, gts, pixel_inclusive=False) == pytest.approx(1.0, abs=1e-12)
    assert voc_map(dets, gts, pixel_inclusive=False, iou_rule="strict") == 0.0


def test_no_overlap_is_never_a_hit_even_at_threshold_zero():
    # The devkit's ovmax stays -inf without an overlapping gt, so even minoverlap 0 misses.
    dets, gts = one_box_case([50.0, 50, 60, 60], [0.0, 0, 9, 9])
    assert voc_map(dets, gts, iou_threshold=0.0) == 0.0
    dets, gts = one_box_case([5.0, 5, 60, 60], [0.0, 0, 9, 9])
    assert voc_map(dets, gts, iou_threshold=0.0) == pytest.approx(1.0, abs=1e-12)


def test_unknown_iou_rule_is_refused():
    with pytest.raises(ValueError, match="iou_rule"):
        VOCMeanAP(iou_rule=">=")


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
            u = rng.uniform()
            if g and u < 0.25:
                # IoU exactly 0.5 with a gt (pixel-inclusive): same box, twice the height.
                x1, y1, x2, y2 = base[int(rng.integers(0, g))]
                b = np.array([x1, y1, x2, y1 + 2 * (y2 - y1 + 1) - 1])
            elif g and u < 0.7:
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
@pytest.mark.parametrize("rule", ["devkit", "strict"])
def test_equals_devkit_loop_on_random_cases(seed, use_07, rule):
    rng = np.random.default_rng(seed)
    dets, gts = random_case(rng, 12, 3)
    m = VOCMeanAP(iou_threshold=0.5, use_07_metric=use_07, iou_rule=rule)
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
        ap = devkit_loop(dets, gts, c, use_07=use_07, strict=rule == "strict")
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


@pytest.mark.parametrize("config_name", ["train", "evaluate"])
def test_iou_rule_reaches_the_evaluators_from_the_config(config_name):
    from hydra import compose, initialize_config_module

    from ssdlit.config import plain
    from ssdlit.module import DetectionModule

    with initialize_config_module("ssdlit.conf", version_base="1.3"):
        cfg = compose(config_name, overrides=["metrics.iou_rule=strict"])
        default = compose(config_name)
    assert default.metrics.iou_rule == "devkit"
    module = DetectionModule(
        class_names=["a"],
        image_size=[96, 96],
        backbone={"name": "ssd7", "widths": [4] * 7, "num_outputs": 4},
        anchors={"name": "ssd", "scales": [0.1, 0.2, 0.4, 0.6, 0.9], "aspect_ratios": [1.0]},
        head={"name": "ssd"},
        matcher={"name": "ssd"},
        metrics=plain(cfg.metrics),
    )
    # Pixel-exact IoU 0.5 in the evaluator's continuous convention: a miss under "strict".
    dets, gts = one_box_case([0.0, 0, 10, 20], [0.0, 0, 10, 10])
    for evaluator in (module.val_evaluator, module.test_evaluator):
        assert evaluator.voc07.iou_rule == evaluator.voc.iou_rule == "strict"
        evaluator.update(dets, gts)
        assert evaluator.compute()["summary"]["voc_map50"] == 0.0
