import pytest
import torch
import torchvision

from ssdlit import Detector
from ssdlit.exporting import (
    VerificationError,
    export_onnx,
    export_torchscript,
    load_torchscript,
    verify_onnx,
)
from ssdlit.heads import MultiBoxLoss

SSD300_ANCHORS = {
    "name": "ssd",
    "scales": [0.1, 0.2, 0.37, 0.54, 0.71, 0.88, 1.05],
    "aspect_ratios": [[1, 2, 0.5]] + [[1, 2, 0.5, 3, 1 / 3]] * 3 + [[1, 2, 0.5]] * 2,
    "steps": [8, 16, 32, 64, 100, 300],
}
SSD512_ANCHORS = {
    "name": "ssd",
    "scales": [0.07, 0.15, 0.3, 0.45, 0.6, 0.75, 0.9, 1.05],
    "aspect_ratios": [[1, 2, 0.5]] + [[1, 2, 0.5, 3, 1 / 3]] * 4 + [[1, 2, 0.5]] * 2,
    "steps": [8, 16, 32, 64, 128, 256, 512],
}
SSDLITE_ANCHORS = {
    "name": "ssd",
    "scales": [0.2, 0.35, 0.5, 0.65, 0.8, 0.95, 1.0],
    "aspect_ratios": [[1, 2, 0.5, 3, 1 / 3]] * 6,
}


def tiny(num_classes=3, head="ssd", postprocess=None):
    """SSD7 on 96 x 128 images: small enough for many tests."""
    return Detector.build(
        num_classes=num_classes,
        image_size=(96, 128),
        backbone={"name": "ssd7"},
        anchors={
            "name": "ssd",
            "scales": [0.08, 0.16, 0.32, 0.64, 0.96],
            "aspect_ratios": [1, 2, 0.5],
        },
        head={"name": head},
        matcher={"name": "ssd"},
        postprocess=postprocess or {"name": "per_class", "top_k": 50},
    )


@pytest.mark.parametrize(
    "backbone, anchors, head, size, expected",
    [
        ("vgg16_ssd300", SSD300_ANCHORS, "ssd", 300, 8732),
        ("vgg16_ssd512", SSD512_ANCHORS, "ssd", 512, 24564),
        ("mobilenet_v3_large", SSDLITE_ANCHORS, "ssdlite", 320, 3234),
        ("resnet50", SSD300_ANCHORS, "ssd", 300, 8732),
    ],
)
def test_anchor_count_equals_head_outputs(backbone, anchors, head, size, expected):
    with torch.device("meta"):  # shapes only: no weights, no arithmetic
        det = Detector.build(
            num_classes=20,
            image_size=(size, size),
            backbone={"name": backbone},
            anchors=anchors,
            head={"name": head},
        ).eval()
        images = torch.zeros(1, 3, size, size, dtype=torch.uint8)
    assert det.anchors.shape == (expected, 4)
    with torch.no_grad():
        out = det.raw(images)
    assert out["cls_logits"].shape == (1, expected, 21)
    assert out["box_deltas"].shape == (1, expected, 4)


def test_ssd300_vgg16_parameter_count_matches_torchvision():
    with torch.device("meta"):  # counts only: no weights
        ours = Detector.build(
            num_classes=20,
            image_size=(300, 300),
            backbone={"name": "vgg16_ssd300"},
            anchors=SSD300_ANCHORS,
            head={"name": "ssd"},
        )
        theirs = torchvision.models.detection.ssd300_vgg16(
            weights=None, weights_backbone=None, num_classes=21
        )
    n_ours = sum(p.numel() for p in ours.parameters())
    n_theirs = sum(p.numel() for p in theirs.parameters())
    assert abs(n_ours - n_theirs) / n_theirs < 0.01, (n_ours, n_theirs)


def test_forward_loss_and_backward():
    torch.manual_seed(0)
    det = tiny()
    images = torch.randint(0, 256, (2, 3, 96, 128), dtype=torch.uint8)
    outputs = det.raw(images)
    gt_boxes = torch.tensor(
        [[[0.1, 0.1, 0.5, 0.6], [0.5, 0.5, 0.9, 0.8]], [[0.2, 0.3, 0.4, 0.9], [0, 0, 0, 0]]]
    )
    gt_labels = torch.tensor([[1, 3], [2, 0]])
    gt_mask = gt_labels > 0
    losses = det.loss(outputs, gt_boxes, gt_labels, gt_mask)
    assert {"loss", "loss_cls", "loss_box"} <= set(losses)
    losses["loss"].backward()
    assert all(p.grad is not None for p in det.head.parameters())
    det.eval()
    with torch.no_grad():
        dets = det(images)
    assert len(dets) == 2 and all(d.shape[1] == 6 and len(d) <= 50 for d in dets)
    assert all(((d[:, 2:] >= 0) & (d[:, 2:] <= 1)).all() for d in dets)


def test_derived_values_are_not_configured_twice():
    with pytest.raises(ValueError, match="derived"):
        Detector.build(
            num_classes=3,
            image_size=(96, 128),
            backbone={"name": "ssd7"},
            anchors={
                "name": "ssd",
                "image_size": [96, 128],
                "scales": [0.1, 0.2, 0.4, 0.6, 0.9],
                "aspect_ratios": [1],
            },
            head={"name": "ssd"},
        )
    with pytest.raises(ValueError, match="levels"):
        Detector.build(
            num_classes=3,
            image_size=(96, 128),
            backbone={"name": "ssd7"},
            anchors={"name": "ssd", "scales": [0.1, 0.2, 0.4], "aspect_ratios": [1]},
            head={"name": "ssd"},
        )


def test_wrong_input_size_is_refused():
    det = tiny()
    with pytest.raises(ValueError, match="resize"):
        det.raw(torch.zeros(1, 3, 100, 100, dtype=torch.uint8))


@pytest.mark.parametrize(
    "postprocess", [{"name": "per_class", "top_k": 50}, {"name": "global", "top_k": 30}]
)
def test_onnx_round_trip(tmp_path, postprocess):
    pytest.importorskip("onnxruntime", reason="onnxruntime is part of the dev extra")
    torch.manual_seed(0)
    det = tiny(postprocess=postprocess).eval()
    path = export_onnx(det, tmp_path / "model.onnx")
    g = torch.Generator().manual_seed(1)
    for batch in (1, 3):
        images = torch.randint(0, 256, (batch, 3, 96, 128), dtype=torch.uint8, generator=g)
        report = verify_onnx(det, path, images)
        assert report["detections"] > 0


def test_torchscript_matches_eager(tmp_path):
    torch.manual_seed(0)
    det = tiny().eval()
    images = torch.randint(0, 256, (1, 3, 96, 128), dtype=torch.uint8)
    path = export_torchscript(det, tmp_path / "model.pt", example=images)
    loaded = load_torchscript(path)
    with torch.no_grad():
        flat = loaded(images)
        eager = det(images)[0]
    eager[:, 2:] *= torch.tensor([128.0, 96.0, 128.0, 96.0])  # the exported graph speaks pixels
    assert torch.allclose(flat[:, 1:], eager, atol=1e-4)


def test_onnx_verification_catches_a_different_model(tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime is part of the dev extra")
    torch.manual_seed(0)
    exported = tiny().eval()
    path = export_onnx(exported, tmp_path / "model.onnx")
    torch.manual_seed(1)
    other = tiny().eval()
    images = torch.randint(0, 256, (1, 3, 96, 128), dtype=torch.uint8)
    with pytest.raises(VerificationError, match="disagree"):
        verify_onnx(other, path, images)


def _ssd7(scales, image_size=(64, 96)):
    return Detector.build(
        num_classes=3,
        image_size=image_size,
        backbone={"name": "ssd7"},
        anchors={"name": "ssd", "scales": scales, "aspect_ratios": [1, 2, 0.5]},
        head={"name": "ssd"},
        matcher={"name": "ssd"},
    )


def test_detectors_built_one_after_another_match_their_own_anchors():
    """A sweep builds and frees detectors in one process; each one's anchors (same count,
    other values, often at the address of the freed one's) must be matched exactly as a
    fresh process matches them: as ssd_keras's loop matches those very anchors."""
    import gc
    import weakref

    import numpy as np

    from tests.ssd_keras_reference import ssd_keras_match

    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 0.7, size=(4, 5, 2))
    # [4, 5, 4] float64: matched in float64, as exactly as the float64 reference
    gt_boxes = torch.tensor(np.concatenate([xy, xy + rng.uniform(0.05, 0.3, (4, 5, 2))], 2))
    gt_labels = torch.ones(4, 5, dtype=torch.long)
    gt_mask = torch.ones(4, 5, dtype=torch.bool)
    images = torch.zeros(4, 3, 64, 96)
    runs = []
    for i in range(6):  # as a sweep runs: build, train (match), free; nothing else kept
        det = _ssd7([(0.05 + 0.02 * i) * 2**k for k in range(5)]).double()
        with torch.no_grad():
            outputs = det.raw(images)
            loss = det.loss(outputs, gt_boxes, gt_labels, gt_mask)["loss"].item()
            matches = det.matcher(gt_boxes, gt_mask, det.anchors).tolist()  # a plain tensor
        outputs = {k: v.tolist() for k, v in outputs.items()}
        runs.append((det.anchors.tolist(), matches, loss, outputs))
        freed = weakref.ref(det)
        del det
        if freed() is not None:  # freed by reference counting, else by the collector
            gc.collect()
    assert len({len(anchors) for anchors, *_ in runs}) == 1  # one count, other values
    criterion = MultiBoxLoss()  # the ssd head's, as configured above
    stale = []
    for i, (anchors, matches, loss, outputs) in enumerate(runs):
        anchors = torch.tensor(anchors, dtype=torch.float64)
        expected = torch.stack(
            [
                torch.from_numpy(ssd_keras_match(gt_boxes[b].numpy(), anchors.numpy()))
                for b in range(4)
            ]
        )
        out = {k: torch.tensor(v, dtype=torch.float64) for k, v in outputs.items()}
        reference = criterion(
            out["cls_logits"], out["box_deltas"], expected, gt_boxes, gt_labels, anchors
        )["loss"].item()
        if not torch.equal(torch.tensor(matches), expected) or loss != reference:
            stale.append(i)
    assert not stale, f"detectors {stale} of 6 matched against other anchors"


def test_anchor_tables_belong_to_the_detector_and_follow_its_anchors():
    det = _ssd7([0.08, 0.16, 0.32, 0.64, 0.96])
    tables = det.anchor_overlaps()
    assert torch.equal(tables.anchors, det.anchors) and det.anchor_overlaps() is tables  # once
    # built from the generator's grid, not guessed from the floats: the sparse path
    assert tables.sparse and tables.shapes == det.anchor_grid.shapes
    det.double()  # a new anchors buffer: new tables from it
    assert det.anchor_overlaps().dtype == torch.float64 and det.anchor_overlaps().sparse
    assert torch.equal(det.anchor_overlaps().anchors, det.anchors)
    with torch.no_grad():
        det.anchors[:, 2:] *= 0.5  # changed in place: rebuilt, no longer the grid's
    assert torch.equal(det.anchor_overlaps().anchors, det.anchors)
    assert not det.anchor_overlaps().sparse  # the dense (reference) path
    gt_boxes = torch.tensor([[[0.1, 0.1, 0.3, 0.4]]], dtype=torch.float64)
    mask = torch.ones(1, 1, dtype=torch.bool)
    assert torch.equal(
        det.matcher(gt_boxes, mask, det.anchor_overlaps()),
        det.matcher(gt_boxes, mask, det.anchors.clone()),
    )


def test_clipped_anchors_take_the_dense_path():
    det = Detector.build(
        num_classes=2,
        image_size=(64, 64),
        backbone={"name": "ssd7", "widths": [8, 8, 8, 8, 8, 8, 8]},
        anchors={
            "name": "ssd",
            "scales": [0.1, 0.3, 0.5, 0.7, 0.9],
            "aspect_ratios": [1.0, 2.0],
            "clip": True,
        },
        head={"name": "ssd"},
        matcher={"name": "ssd"},
    )
    assert det.anchor_grid.clip and torch.equal(det.anchor_grid.flat(), det.anchors)
    assert not det.anchor_overlaps().sparse


def test_yolo_detector_hands_its_head_the_generators_grid():
    anchors = {"name": "yolo", "priors": [[[8, 8]]] * 4, "strides": [6, 12, 24, 48]}
    det = Detector.build(
        num_classes=2,
        image_size=(64, 96),
        backbone={"name": "ssd7"},
        anchors=anchors,
        head={"name": "yolo", "hidden_channels": 0},
        matcher={"name": "yolov3"},
    )
    cells = det.anchor_generator.cells(det.feature_sizes)
    assert torch.equal(det.head.anchor_cells, cells)
    assert torch.equal(cells[:, :2], det.anchors[:, :2])  # centred on the anchors
    assert torch.equal(cells[0, 2:], torch.tensor([6 / 96, 6 / 64]))  # the stride, not 1 / W
    outputs = det.eval().raw(torch.zeros(1, 3, 64, 96, dtype=torch.uint8))
    outputs["box_deltas"] = torch.zeros_like(outputs["box_deltas"])
    torch.testing.assert_close(det.head.decode_boxes(outputs, det.anchors)[0], det.anchors)


def test_test_flip_merges_the_mirrored_images_candidates_before_nms():
    """candidates() with test_flip: the anchors' candidates, then the mirrored images'
    with their boxes mirrored back (x -> 1 - x); forward post-processes all of them."""
    torch.manual_seed(0)
    det = tiny().eval()
    assert det.test_flip is False
    images = torch.randint(0, 256, (2, 3, 96, 128), dtype=torch.uint8)
    with torch.no_grad():
        scores, boxes = det.candidates(images)
        mirror_scores, mirror_boxes = det.candidates(images.flip(-1))
        det.test_flip = True
        both_scores, both_boxes = det.candidates(images)
        detections = det(images)
    a = scores.shape[1]
    assert both_scores.shape == (2, 2 * a, scores.shape[2])
    torch.testing.assert_close(both_scores, torch.cat((scores, mirror_scores), dim=1))
    x1, y1, x2, y2 = mirror_boxes.unbind(-1)
    mirrored = torch.stack((1 - x2, y1, 1 - x1, y2), dim=-1)
    torch.testing.assert_close(both_boxes, torch.cat((boxes, mirrored), dim=1))
    expected = det.postprocess(both_scores, both_boxes)
    assert all(torch.equal(d, e) for d, e in zip(detections, expected, strict=True))
