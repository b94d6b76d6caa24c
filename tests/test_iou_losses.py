"""IoU-aware box terms of the MultiBox loss (``box_loss`` giou / diou / ciou on the
positives' decoded boxes): values against torchvision.ops by hand, finite gradients
for degenerate and disjoint boxes, autocast, construction errors, training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import (
    box_iou,
    complete_box_iou_loss,
    distance_box_iou_loss,
    generalized_box_iou_loss,
)

import ssdlit.heads  # noqa: F401  (registers the heads)
from ssdlit.anchors import SSDAnchorGenerator, SSDMatcher
from ssdlit.anchors.matching import BACKGROUND, IGNORE
from ssdlit.boxes import BoxCoder, convert
from ssdlit.detector import Detector
from ssdlit.heads import MultiBoxLoss, SSDHead, SSDLiteHead, multibox_loss
from ssdlit.heads.losses import BOX_LOSSES, MIN_BOX_SIZE, box_loss_terms
from ssdlit.registry import ConfigError

C = 3
IOU_KINDS = {
    "giou": generalized_box_iou_loss,
    "diou": distance_box_iou_loss,
    "ciou": complete_box_iou_loss,
}
VARIANCES = (0.1, 0.1, 0.2, 0.2)


def hand_batch(dtype=torch.float32):
    """Two images, 6 anchors each: image 0 with two gt (3 positives, 2 background, 1
    ignored), image 1 with one gt (1 positive, 5 background). Deltas near a good box."""
    anchors = torch.tensor(
        [
            [0.30, 0.35, 0.40, 0.50],
            [0.32, 0.30, 0.30, 0.40],
            [0.70, 0.65, 0.40, 0.30],
            [0.50, 0.50, 0.20, 0.20],
            [0.10, 0.90, 0.10, 0.10],
            [0.85, 0.15, 0.20, 0.25],
        ],
        dtype=dtype,
    )
    gt_boxes = torch.tensor(
        [
            [[0.10, 0.10, 0.50, 0.60], [0.50, 0.50, 0.90, 0.80]],
            [[0.70, 0.00, 1.00, 0.30], [0.00, 0.00, 0.00, 0.00]],  # slot 1: padding
        ],
        dtype=dtype,
    )
    gt_labels = torch.tensor([[1, 3], [2, 0]])
    matches = torch.tensor(
        [
            [0, 0, 1, BACKGROUND, IGNORE, BACKGROUND],
            [BACKGROUND, BACKGROUND, BACKGROUND, BACKGROUND, BACKGROUND, 0],
        ]
    )
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 6, C + 1, generator=g, dtype=dtype)
    deltas = (torch.randn(2, 6, 4, generator=g) * 0.7).to(dtype)
    return logits, deltas, matches, gt_boxes, gt_labels, anchors


def positives_by_hand(deltas, matches, gt_boxes, anchors, coder):
    """Decoded predictions xyxy and matched gt xyxy of the positives ``[P, 4]``, by masks."""
    positive = matches >= 0  # [B, A]
    b, a = matches.shape
    anchor_rows = anchors.expand(b, a, 4)[positive]
    gt_rows = torch.cat([gt_boxes[i, matches[i, positive[i]]] for i in range(b)])
    pred = convert(coder.decode(deltas[positive], anchor_rows), "cxcywh", "xyxy")
    return pred, gt_rows


def normaliser(matches, neg_pos_ratio):
    """N of the hand batch: every background anchor is mined (each image's budget, at least
    N_NEG_MIN = 16, exceeds its 5 or fewer background anchors), so N = max(1, P, M / ratio)."""
    p = int((matches >= 0).sum())
    m = int((matches == BACKGROUND).sum())
    return max(1.0, p, m / neg_pos_ratio) if neg_pos_ratio > 0 else max(1.0, p)


# -- values --------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [3.0, 0.0])
@pytest.mark.parametrize("kind", ["giou", "diou", "ciou"])
def test_iou_box_loss_is_torchvision_on_the_decoded_positives(kind, ratio):
    logits, deltas, matches, gt_boxes, gt_labels, anchors = hand_batch()
    coder = BoxCoder(VARIANCES)
    args = (logits, deltas, matches, gt_boxes, gt_labels, anchors, coder)
    out = multibox_loss(*args, neg_pos_ratio=ratio, alpha=0.5, box_loss=kind)
    pred, gt = positives_by_hand(deltas, matches, gt_boxes, anchors, coder)
    assert pred.shape == (4, 4)
    expected = IOU_KINDS[kind](pred, gt, reduction="sum") / normaliser(matches, ratio)
    torch.testing.assert_close(out["loss_box"], expected, rtol=1e-6, atol=1e-7)
    # the classification term is the smooth-L1 run's; alpha weighs the chosen box term
    ref = multibox_loss(*args, neg_pos_ratio=ratio, alpha=0.5)
    assert torch.equal(out["loss_cls"], ref["loss_cls"])
    torch.testing.assert_close(out["loss"], out["loss_cls"] + 0.5 * out["loss_box"])
    assert set(out) == {"loss", "loss_cls", "loss_box"}


def test_iou_box_loss_in_float64_stays_float64():
    args = hand_batch(torch.float64)
    coder = BoxCoder(VARIANCES)
    out = multibox_loss(*args, coder, box_loss="giou")
    pred, gt = positives_by_hand(args[1], args[2], args[3], args[5], coder)
    assert out["loss_box"].dtype == torch.float64
    expected = generalized_box_iou_loss(pred, gt, reduction="sum") / normaliser(args[2], 3.0)
    torch.testing.assert_close(out["loss_box"], expected)


def test_perfect_boxes_have_zero_iou_loss():
    logits, _, matches, gt_boxes, gt_labels, anchors = hand_batch(torch.float64)
    coder = BoxCoder(VARIANCES)
    positive = matches >= 0
    deltas = torch.zeros(2, 6, 4, dtype=torch.float64)
    _, gt = positives_by_hand(deltas, matches, gt_boxes, anchors, coder)
    deltas[positive] = coder.encode(
        convert(gt, "xyxy", "cxcywh"), anchors.expand(2, 6, 4)[positive]
    )
    for kind in IOU_KINDS:
        out = multibox_loss(
            logits, deltas, matches, gt_boxes, gt_labels, anchors, coder, box_loss=kind
        )
        assert out["loss_box"].item() == pytest.approx(0.0, abs=1e-6), kind


def test_smooth_l1_default_is_unchanged():
    """The default is the smooth-L1 term exactly as before the option existed (the same
    operations, bit for bit), and a direct smooth-L1 of the positives' encoded targets."""
    logits, deltas, matches, gt_boxes, gt_labels, anchors = hand_batch()
    coder = BoxCoder(VARIANCES)
    args = (logits, deltas, matches, gt_boxes, gt_labels, anchors, coder)
    default = multibox_loss(*args, beta=0.5)
    named = multibox_loss(*args, beta=0.5, box_loss="smooth_l1")
    for key in default:
        assert torch.equal(default[key], named[key]), key
    # the computation of the loss before box_loss existed, op for op
    positive = matches >= 0
    flat = positive.reshape(-1).nonzero().squeeze(1)
    a = matches.shape[1]
    _, gt = positives_by_hand(deltas, matches, gt_boxes, anchors, coder)
    matched = convert(gt, "xyxy", "cxcywh")
    targets = coder.encode(matched, anchors.index_select(0, flat % a))
    rows = deltas.reshape(-1, 4).index_select(0, flat)
    before = F.smooth_l1_loss(rows, targets, beta=0.5, reduction="sum") / normaliser(matches, 3.0)
    assert torch.equal(default["loss_box"], before)
    assert torch.equal(default["loss"], default["loss_cls"] + 1.0 * before)


def test_smooth_l1_plus_giou_sums_the_two_terms():
    args = (*hand_batch(), BoxCoder(VARIANCES))
    both = multibox_loss(*args, box_loss="smooth_l1+giou")
    sl1 = multibox_loss(*args, box_loss="smooth_l1")
    giou = multibox_loss(*args, box_loss="giou")
    torch.testing.assert_close(both["loss_box"], sl1["loss_box"] + giou["loss_box"])
    torch.testing.assert_close(both["loss"], both["loss_cls"] + both["loss_box"])


def test_no_positives_give_a_zero_box_term_with_a_gradient():
    logits, deltas, _, gt_boxes, gt_labels, anchors = hand_batch()
    matches = torch.full((2, 6), BACKGROUND)
    for kind in IOU_KINDS:
        d = deltas.clone().requires_grad_(True)
        out = multibox_loss(
            logits, d, matches, gt_boxes, gt_labels, anchors, BoxCoder(), box_loss=kind
        )
        assert out["loss_box"].item() == 0.0
        out["loss"].backward()
        assert d.grad is not None and (d.grad == 0).all()


# -- degenerate and disjoint boxes, precision -------------------------------------------------


def _loss_and_grad(kind, deltas, dtype=None):
    logits, _, matches, gt_boxes, gt_labels, anchors = hand_batch()
    d = (deltas if dtype is None else deltas.to(dtype)).detach().requires_grad_(True)
    out = multibox_loss(
        logits, d, matches, gt_boxes, gt_labels, anchors, BoxCoder(VARIANCES), box_loss=kind
    )
    out["loss"].backward()
    return out, d.grad, matches >= 0


DEGENERATE = {
    "w_h_minus_50": (-50.0, -50.0),
    "w_h_minus_1000": (-1000.0, -1000.0),  # exp underflows: width and height exactly 0
    "w_only": (-1000.0, 0.0),
    "h_only": (0.0, -1000.0),
}


@pytest.mark.parametrize("sizes", list(DEGENERATE), ids=list(DEGENERATE))
@pytest.mark.parametrize("kind", ["giou", "diou", "ciou", "smooth_l1+giou"])
def test_degenerate_predicted_boxes_have_finite_loss_and_gradients(kind, sizes):
    dw, dh = DEGENERATE[sizes]
    deltas = hand_batch()[1].clone()
    deltas[..., 2], deltas[..., 3] = dw, dh
    out, grad, positive = _loss_and_grad(kind, deltas)
    assert all(torch.isfinite(v) for v in out.values()), out
    assert torch.isfinite(grad).all()
    assert (grad[~positive] == 0).all()
    # DIoU / CIoU (centre distance) and smooth-L1 still move the centres; GIoU does not
    # for a point-sized box inside its gt (the enclosing box is the gt wherever it is)
    if kind != "giou":
        assert (grad[positive][:, :2].abs().sum(1) > 0).all()


def test_ciou_of_zero_height_boxes_is_nan_in_torchvision_and_finite_here():
    """Why decoded sizes are raised to MIN_BOX_SIZE: torchvision's CIoU divides w / h."""
    gt = torch.tensor([[0.1, 0.1, 0.5, 0.6]])
    pred = torch.tensor([[0.2, 0.3, 0.4, 0.3]], requires_grad=True)  # h = 0
    complete_box_iou_loss(pred, gt, reduction="sum").backward()
    assert not torch.isfinite(pred.grad).all()
    deltas = hand_batch()[1].clone()
    deltas[..., 3] = -1000.0
    _, grad, _ = _loss_and_grad("ciou", deltas)
    assert torch.isfinite(grad).all()
    assert 0 < MIN_BOX_SIZE <= 1e-5


@pytest.mark.parametrize("kind", ["giou", "diou", "ciou"])
def test_disjoint_boxes_have_finite_gradients_that_pull_them_in(kind):
    """Boxes moved far from their gt (IoU 0): the IoU terms still give a finite gradient
    that moves each centre towards its gt (what GIoU / DIoU add to plain IoU)."""
    _, deltas, matches, gt_boxes, _, anchors = hand_batch()
    deltas = torch.zeros_like(deltas)
    deltas[..., 0] = 40.0  # centre 4 anchor widths to the right of the anchor
    out, grad, positive = _loss_and_grad(kind, deltas)
    coder = BoxCoder(VARIANCES)
    pred, gt = positives_by_hand(deltas, matches, gt_boxes, anchors, coder)
    assert (box_iou(pred, gt).diagonal() == 0).all()  # disjoint indeed
    assert all(torch.isfinite(v) for v in out.values())
    assert torch.isfinite(grad).all()
    assert (grad[positive][:, 0] > 0).all()  # descent lowers dx: towards the gt


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["giou", "diou", "ciou"])
def test_half_precision_deltas_compute_in_float32(kind, dtype):
    """Deltas in bfloat16 / float16 (as autocast gives them), degenerate ones included:
    the IoU term is float32, finite, and equals the float32 computation on the same
    (rounded) numbers."""
    deltas = hand_batch()[1].clone()
    deltas[0, 0, 2:] = -50.0
    deltas[0, 2, 0] = 40.0
    out, grad, _ = _loss_and_grad(kind, deltas, dtype)
    assert out["loss_box"].dtype == torch.float32 and torch.isfinite(out["loss_box"])
    assert grad.dtype == dtype and torch.isfinite(grad).all()
    ref, _, _ = _loss_and_grad(kind, deltas.to(dtype).float())
    torch.testing.assert_close(out["loss_box"], ref["loss_box"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["giou", "ciou"])
def test_iou_terms_under_cpu_autocast(kind, dtype):
    """A head run under autocast: its outputs are half precision, the loss float32 and
    finite, and the box term what the same outputs give without autocast."""
    torch.manual_seed(0)
    head = SSDHead(in_channels=[8], num_anchors=[6], num_classes=C, box_loss=kind)
    feats = [torch.randn(2, 8, 1, 1)]
    _, _, matches, gt_boxes, gt_labels, anchors = hand_batch()
    with torch.autocast("cpu", dtype=dtype):  # both dtypes on the CPU since torch 2.3
        out = head(feats)
        losses = head.loss(out, matches, gt_boxes, gt_labels, anchors)
    assert out["box_deltas"].dtype == dtype  # autocast did run
    assert losses["loss_box"].dtype == torch.float32
    assert all(torch.isfinite(v) for v in losses.values())
    again = head.loss(out, matches, gt_boxes, gt_labels, anchors)
    torch.testing.assert_close(again["loss_box"], losses["loss_box"])
    losses["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters())


# -- construction ----------------------------------------------------------------------------


def test_box_loss_terms():
    assert BOX_LOSSES == ("smooth_l1", "giou", "diou", "ciou")
    assert box_loss_terms("giou") == ("giou",)
    assert box_loss_terms("smooth_l1+ciou") == ("smooth_l1", "ciou")
    for bad in ("iou", "l1", "", "giou+giou", "smooth_l1+", "GIoU", None):
        with pytest.raises(ValueError, match="box_loss must be one of"):
            box_loss_terms(bad)


@pytest.mark.parametrize("bad", ["iou", "giou+giou", "focal"])
def test_unknown_box_loss_is_refused_at_construction(bad):
    with pytest.raises(ValueError, match=r"box_loss must be one of .*smooth_l1.*giou"):
        MultiBoxLoss(box_loss=bad)
    for cls in (SSDHead, SSDLiteHead):
        with pytest.raises(ValueError, match="box_loss"):
            cls(in_channels=[8], num_anchors=[2], num_classes=C, box_loss=bad)
    with pytest.raises(ConfigError, match=r"(?s)ssd.*box_loss"):
        tiny_detector("ssd", bad)
    with pytest.raises(ValueError, match="box_loss"):
        multibox_loss(*hand_batch(), BoxCoder(), box_loss=bad)


def tiny_detector(head: str = "ssd", box_loss: str | None = "giou") -> Detector:
    spec = {"name": head} if box_loss is None else {"name": head, "box_loss": box_loss}
    return Detector.build(
        num_classes=C,
        image_size=(64, 64),
        backbone={"name": "ssd7", "widths": [8, 8, 8, 8, 8, 8, 8]},
        anchors={"name": "ssd", "scales": [0.1, 0.2, 0.4, 0.7, 1.0], "aspect_ratios": [1, 2, 0.5]},
        head=spec,
        matcher={"name": "ssd"},
    )


def tiny_targets():
    boxes = torch.tensor(
        [[[0.1, 0.1, 0.5, 0.6], [0.5, 0.5, 0.9, 0.8]], [[0.2, 0.3, 0.4, 0.9], [0.0, 0.0, 0.0, 0.0]]]
    )
    labels = torch.tensor([[1, 3], [2, 0]])
    return boxes, labels, labels > 0


@pytest.mark.parametrize("head", ["ssd", "ssdlite"])
def test_detector_build_takes_the_box_loss_of_ssd_heads(head):
    assert tiny_detector(head, None).head.criterion.box_loss == "smooth_l1"
    for box_loss in ("giou", "diou", "ciou", "smooth_l1+giou"):
        det = tiny_detector(head, box_loss)
        assert det.head.criterion.box_loss == box_loss
        assert f"box_loss={box_loss!r}" in repr(det.head)
    torch.manual_seed(0)
    det = tiny_detector(head, "giou")
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    losses = det.loss(det.raw(images), *tiny_targets())
    assert set(losses) == {"loss", "loss_cls", "loss_box"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    assert 0 < losses["loss_box"] < 2
    losses["loss"].backward()


@pytest.mark.parametrize("head", [SSDHead, SSDLiteHead])
def test_giou_training_reduces_the_box_loss(head):
    """Adam steps on one tiny batch (fixed features, anchors and matches of a 64 x 64
    input) with box_loss=giou: the GIoU term falls, every step finite."""
    torch.manual_seed(0)
    gen = SSDAnchorGenerator(
        image_size=(64, 64), aspect_ratios=[[1, 2, 0.5]] * 2, scales=[0.2, 0.45, 0.8]
    )
    sizes = [(4, 4), (2, 2)]
    anchors = gen(sizes)
    gt_boxes, gt_labels, mask = tiny_targets()
    matches = SSDMatcher()(gt_boxes, mask, anchors)
    assert (matches >= 0).sum() >= 3
    net = head(
        in_channels=[16, 16],
        num_anchors=gen.num_anchors_per_location(),
        num_classes=C,
        box_loss="giou",
    )
    feats = [torch.randn(2, 16, h, w) for h, w in sizes]
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    history = []
    for _ in range(30):
        losses = net.loss(net(feats), matches, gt_boxes, gt_labels, anchors)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        history.append(losses["loss_box"].item())
    print(f"{head.__name__} giou loss_box {history[0]:.4f} -> {history[-1]:.4f}")
    assert all(math.isfinite(v) for v in history)
    assert history[-1] < 0.3 * history[0]
