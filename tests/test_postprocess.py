import numpy as np
import pytest
import torch

from ssdlit.postprocess import GlobalNMS, PerClassNMS, rank_within_groups
from ssdlit.registry import POSTPROCESS
from tests.ssd_keras_reference import decode_detections, decode_detections_fast


def random_outputs(b, a, k, seed, peaky=False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, a, k, generator=g, dtype=torch.float64) * (4.0 if peaky else 1.0)
    scores = logits.softmax(-1)
    xy = torch.rand(b, a, 2, generator=g, dtype=torch.float64) * 0.8
    wh = torch.rand(b, a, 2, generator=g, dtype=torch.float64) * 0.3 + 0.02
    boxes = torch.cat([xy, xy + wh], -1)
    return scores, boxes


def assert_same(ours, ref):
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "b, a, k, top_k, cap, peaky",
    [
        (3, 300, 5, 200, None, False),
        (2, 500, 4, 20, None, True),
        (2, 400, 3, 50, 7, False),
        (1, 50, 2, None, None, True),
    ],
)
def test_per_class_equals_naive_loop(b, a, k, top_k, cap, peaky):
    scores, boxes = random_outputs(b, a, k, seed=a + k, peaky=peaky)
    pp = PerClassNMS(
        confidence_thresh=0.01,
        iou_threshold=0.45,
        top_k=top_k,
        nms_max_output_size=cap,
        initial_chunk=16,
    )
    dets = pp(scores, boxes)
    assert len(dets) == b
    for i in range(b):
        ref = decode_detections(scores[i].numpy(), boxes[i].numpy(), 0.01, 0.45, top_k, cap)
        assert_same(dets[i], ref)


def test_chunking_does_not_change_the_result():
    scores, boxes = random_outputs(2, 2000, 6, seed=3)
    full = PerClassNMS(top_k=100, initial_chunk=10**9)(scores, boxes)
    small = PerClassNMS(top_k=100, initial_chunk=8)(scores, boxes)
    for f, s in zip(full, small, strict=True):
        assert torch.equal(f, s)


@pytest.mark.parametrize("top_k", [200, 5, None])
def test_global_equals_naive_loop(top_k):
    scores, boxes = random_outputs(3, 400, 4, seed=11, peaky=True)
    dets = GlobalNMS(confidence_thresh=0.3, iou_threshold=0.45, top_k=top_k)(scores, boxes)
    for i in range(3):
        assert_same(
            dets[i], decode_detections_fast(scores[i].numpy(), boxes[i].numpy(), 0.3, 0.45, top_k)
        )


def test_threshold_is_strict_and_suppression_is_strict():
    # Two boxes with IoU exactly 0.5: suppressed at threshold 0.45, both kept at 0.5.
    boxes = torch.tensor(
        [[[0.0, 0.0, 3.0, 1.0], [1.0, 0.0, 4.0, 1.0], [7.0, 7.0, 9.0, 9.0]]], dtype=torch.float64
    )
    scores = torch.tensor([[[0.1, 0.9], [0.2, 0.8], [0.99, 0.01]]], dtype=torch.float64)
    kept_045 = PerClassNMS(iou_threshold=0.45)(scores, boxes)[0]
    assert kept_045[:, 1].tolist() == [0.9]  # 0.01 is not strictly above 0.01
    kept_05 = PerClassNMS(iou_threshold=0.5)(scores, boxes)[0]
    assert kept_05[:, 1].tolist() == [0.9, 0.8]
    assert kept_05[0].tolist() == [1.0, 0.9, 0.0, 0.0, 3.0, 1.0]


def test_score_equal_to_the_threshold():
    # ssd_keras: decode_detections_fast keeps best-class scores >= confidence_thresh;
    # decode_detections (Caffe's DetectionOutput) keeps class scores > confidence_thresh.
    boxes = torch.tensor(
        [[[0.0, 0.0, 0.2, 0.2], [0.5, 0.5, 0.7, 0.7], [0.1, 0.6, 0.3, 0.9]]], dtype=torch.float64
    )
    scores = torch.tensor(
        [[[0.25, 0.75, 0.0], [0.25, 0.5, 0.25], [0.5, 0.25, 0.25]]], dtype=torch.float64
    )
    fast = GlobalNMS(confidence_thresh=0.5)(scores, boxes)[0]
    assert fast[:, :2].tolist() == [[1.0, 0.75], [1.0, 0.5]]  # 0.5 == thresh is kept
    assert (
        fast.tolist() == decode_detections_fast(scores[0].numpy(), boxes[0].numpy(), 0.5).tolist()
    )
    # The box whose best class is the background never passes, even at threshold 0.
    zero = GlobalNMS(confidence_thresh=0.0)(scores, boxes)[0]
    assert zero[:, 1].tolist() == [0.75, 0.5]
    # The traced (export) path keeps the same boxes.
    assert GlobalNMS(confidence_thresh=0.5).flat(scores, boxes)[:, 2].tolist() == [0.75, 0.5]
    per_class = PerClassNMS(confidence_thresh=0.5)(scores, boxes)[0]
    assert per_class[:, :2].tolist() == [[1.0, 0.75]]  # 0.5 is not strictly above 0.5
    assert (
        per_class.tolist() == decode_detections(scores[0].numpy(), boxes[0].numpy(), 0.5).tolist()
    )


def test_pixels_empty_and_registry():
    scores = torch.zeros(2, 10, 3)
    scores[..., 0] = 1.0
    boxes = torch.rand(2, 10, 4)
    dets = POSTPROCESS.build("per_class")(scores, boxes)
    assert [d.shape for d in dets] == [(0, 6), (0, 6)]
    scores[1, 3] = torch.tensor([0.1, 0.9, 0.0])
    boxes[1, 3] = torch.tensor([0.1, 0.2, 0.5, 0.6])
    d = POSTPROCESS.build("global")(scores, boxes, image_size=(100, 200))[1]
    torch.testing.assert_close(d, torch.tensor([[1.0, 0.9, 20.0, 20.0, 100.0, 60.0]]))


def test_pre_nms_top_k_caps_each_class_before_nms():
    scores, boxes = random_outputs(1, 300, 3, seed=5)
    dets = PerClassNMS(pre_nms_top_k=4, top_k=None, iou_threshold=1.0)(scores, boxes)[0]
    for c in (1, 2):
        assert (dets[:, 0] == c).sum() == 4


def test_rank_within_groups():
    g = torch.tensor([3, 1, 3, 3, 1, 0])
    assert rank_within_groups(g).tolist() == [0, 0, 1, 2, 1, 0]
