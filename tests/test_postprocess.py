import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.ops import nms

from ssdlit.postprocess import (
    GlobalNMS,
    PerClassNMS,
    _nms_in_runs,
    grouped_nms,
    rank_within_groups,
)
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


# -- the sparse candidate search and NMS in runs (a trained model's few candidates) ----------


def trained_outputs(b, a, k, seed, hits=6, dtype=torch.float64):
    """Background almost everywhere, ``hits`` confident (anchor, class) pairs per image."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, a, k, generator=g, dtype=torch.float64)
    logits[..., 0] += 9.0
    for i in range(b):
        anchors = torch.randint(0, a, (hits,), generator=g)
        labels = torch.randint(1, k, (hits,), generator=g)
        logits[i, anchors, labels] += 14.0
    scores = logits.softmax(-1).to(dtype)
    # Boxes in a few clusters, so that NMS suppresses some of them.
    centres = torch.rand(b, 4, 2, generator=g, dtype=torch.float64) * 0.6 + 0.2
    pick = torch.randint(0, 4, (b, a), generator=g)
    xy = centres.gather(1, pick[..., None].expand(b, a, 2))
    xy = xy + 0.02 * torch.randn(b, a, 2, generator=g, dtype=torch.float64)
    wh = torch.rand(b, a, 2, generator=g, dtype=torch.float64) * 0.1 + 0.1
    boxes = torch.cat([xy - wh / 2, xy + wh / 2], -1).to(dtype)
    return scores, boxes


def dense_candidates(pp, scores):
    """What the dense search finds: image, flat position and score of every passing score."""
    cand, _ = pp._candidates(scores)
    img, pos = pp._passes(cand).nonzero(as_tuple=True)
    return img, pos, cand[img, pos]


def dense_only(pp):
    """The same post-processor with the sparse candidate search switched off."""
    pp._passing_candidates = lambda scores, max_share=None: None
    return pp


def assert_same_candidates(pp, scores):
    found = pp._passing_candidates(scores, max_share=1.0)  # the search even when not cheaper
    assert found is not None
    for ours, dense in zip(found, dense_candidates(pp, scores), strict=True):
        assert ours.dtype == dense.dtype
        assert torch.equal(ours, dense)


@pytest.mark.parametrize(
    "b, a, k, dtype",
    [
        (8, 8732, 21, torch.float32),  # SSD300 VOC, no remainder (69856 rows = 32 x 2183)
        (3, 700, 6, torch.float64),  # 2100 rows: 20 rows left over the fold
        (1, 31, 4, torch.float32),  # fewer rows than FOLD: every row is read
        (2, 16, 3, torch.float16),  # exactly FOLD rows
        (5, 97, 2, torch.float32),  # one object class
    ],
)
def test_sparse_candidates_equal_the_dense_search(b, a, k, dtype):
    scores, _ = trained_outputs(b, a, k, seed=b * a + k, dtype=dtype)
    assert_same_candidates(PerClassNMS(), scores)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_sparse_candidates_ties_at_the_threshold(dtype):
    # Scores exactly at the threshold (in the tensor's dtype) never pass, the next
    # representable score above passes; at every fold position and in the remainder rows.
    thr = 0.01
    at = torch.tensor(thr, dtype=dtype)
    above = torch.nextafter(at, torch.tensor(1.0, dtype=dtype))
    scores, _ = trained_outputs(2, 1000, 5, seed=4, hits=0, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    flat = scores.view(-1, 5)
    rows = torch.randperm(flat.shape[0], generator=g)[:300]
    labels = torch.randint(0, 5, (300,), generator=g)
    flat[rows[:200], labels[:200]] = at
    flat[rows[200:], labels[200:]] = above
    flat[-3:, 1:] = at  # remainder rows (2000 = 32 x 62 + 16)
    flat[-1, 2] = above
    pp = PerClassNMS(confidence_thresh=thr)
    assert_same_candidates(pp, scores)
    found = pp._passing_candidates(scores, max_share=1.0)
    assert (found[2] > at).all()
    assert (found[2] == above).sum() >= 1


def test_sparse_candidates_all_background_empty_and_nan():
    pp = PerClassNMS()
    background = torch.zeros(3, 100, 4)
    background[..., 0] = 1.0
    assert all(t.numel() == 0 for t in pp._passing_candidates(background, max_share=1.0))
    assert [d.shape for d in pp(background, torch.rand(3, 100, 4))] == [(0, 6)] * 3
    for shape in [(0, 100, 4), (2, 0, 4), (2, 100, 1)]:  # no images, no anchors, no classes
        empty = torch.zeros(shape)
        assert_same_candidates(pp, empty)
        assert [d.shape for d in pp(empty, torch.zeros(*shape[:2], 4))] == [(0, 6)] * shape[0]
    # A NaN score never passes, and does not hide a passing score folded with it.
    scores, _ = trained_outputs(2, 640, 4, seed=9)
    scores[0, 5, 2] = float("nan")
    scores[0, 5 + 40, 2] = 0.5  # the same fold set (1280 rows: R = 40)
    assert_same_candidates(pp, scores)
    img, pos, _ = pp._passing_candidates(scores, max_share=1.0)
    assert ((img == 0) & (pos == 45 * 3 + 1)).any()


def test_sparse_candidates_non_contiguous_scores():
    scores, _ = trained_outputs(4, 300, 5, seed=2)
    transposed = scores.transpose(0, 1).contiguous().transpose(0, 1)  # same values, strided
    assert not transposed.is_contiguous()
    assert_same_candidates(PerClassNMS(), transposed)


def test_sparse_search_gives_way_to_the_dense_one():
    noisy, _ = random_outputs(2, 2000, 6, seed=1)  # most scores pass
    pp = PerClassNMS()
    assert pp._passing_candidates(noisy) is None
    assert PerClassNMS(pre_nms_top_k=10)._passing_candidates(noisy) is None
    trained, _ = trained_outputs(2, 2000, 6, seed=1)
    assert PerClassNMS(pre_nms_top_k=10)._passing_candidates(trained) is None
    assert GlobalNMS()._passing_candidates(trained) is None  # global: always dense


@pytest.mark.parametrize(
    "top_k, cap, chunk",
    [
        (200, 400, 256),  # the VOC recipe: every image in one round
        (None, 3, 256),  # no top_k: the per-class cap bites
        (5, None, 8),  # more candidates than the first chunk: the chunked rounds
        (50, 7, 16),
    ],
)
def test_sparse_path_equals_dense_path_and_reference(top_k, cap, chunk):
    scores, boxes = trained_outputs(4, 2000, 6, seed=7, hits=40)
    kwargs = {"top_k": top_k, "nms_max_output_size": cap, "initial_chunk": chunk}
    assert PerClassNMS(**kwargs)._passing_candidates(scores) is not None  # the sparse path
    fast = PerClassNMS(**kwargs)(scores, boxes)
    dense = dense_only(PerClassNMS(**kwargs))(scores, boxes)
    assert sum(len(d) for d in fast) > 0
    for i in range(4):
        assert torch.equal(fast[i], dense[i])
        ref = decode_detections(scores[i].numpy(), boxes[i].numpy(), 0.01, 0.45, top_k, cap)
        assert_same(fast[i], ref)
    in_pixels = PerClassNMS(**kwargs)(scores, boxes, image_size=(300, 200))
    for f, p in zip(fast, in_pixels, strict=True):
        torch.testing.assert_close(p[:, 2:], f[:, 2:] * torch.tensor([200, 300, 200, 300.0]))


def test_sparse_path_on_ssd300_sized_float32_batch():
    scores, boxes = trained_outputs(8, 8732, 21, seed=3, hits=30, dtype=torch.float32)
    pp = PerClassNMS()
    assert pp._passing_candidates(scores) is not None
    fast, dense = pp(scores, boxes), dense_only(PerClassNMS())(scores, boxes)
    assert all(torch.equal(f, d) for f, d in zip(fast, dense, strict=True))


def shifted_apart(boxes, groups):
    return boxes + (groups.to(boxes.dtype) * (boxes.max() - boxes.min() + 1))[:, None]


@pytest.mark.parametrize("n, num_groups", [(1500, 160), (2999, 3), (600, 600), (900, 1)])
def test_nms_in_runs_equals_one_nms_call(n, num_groups):
    g = torch.Generator().manual_seed(n)
    xy = torch.rand(n, 2, generator=g) * 0.5
    boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 0.3 + 0.05], 1)
    scores = torch.randint(0, 20, (n,), generator=g).float() / 20  # many ties
    groups = torch.randint(0, num_groups, (n,), generator=g)
    one_call = nms(shifted_apart(boxes, groups), scores, 0.45)
    for run in (1, 64, 128, 5000):
        assert torch.equal(
            _nms_in_runs(shifted_apart(boxes, groups), scores, groups, 0.45, run), one_call
        )
    assert torch.equal(grouped_nms(boxes, scores, groups, 0.45), one_call)


# -- box voting ----------------------------------------------------------------------------


def test_box_vote_exact_case():
    """Kept box 0 votes with box 1 (same group, IoU 2/3 >= 0.5) but not with box 2 (IoU
    1/4) nor box 3 (another group): (0.8 * b0 + 0.2 * b1) / 1.0."""
    from ssdlit.postprocess import box_vote

    boxes = torch.tensor(
        [[0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 4.0, 6.0], [0.0, 0.0, 4.0, 1.0], [0.0, 0.0, 4.0, 4.0]]
    )
    scores = torch.tensor([0.8, 0.2, 0.5, 0.9])
    groups = torch.tensor([0, 0, 0, 1])
    keep = torch.tensor([0, 3])
    voted = box_vote(boxes, scores, groups, keep, iou_min=0.5, rows=1)
    torch.testing.assert_close(voted[0], torch.tensor([0.0, 0.0, 4.0, 4.4]))
    torch.testing.assert_close(voted[1], boxes[3])  # alone in its group
    assert box_vote(boxes, scores, groups, keep[:0], 0.5).shape == (0, 4)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 60),
    num_groups=st.integers(1, 6),
    rows=st.sampled_from([1, 3, 64]),
    iou_min=st.sampled_from([0.3, 0.5, 0.8]),
    seed=st.integers(0, 2**16),
)
def test_box_vote_within_group_windows_equals_the_whole_matrix(n, num_groups, rows, iou_min, seed):
    """Voting block by block against each block's own groups' candidates gives what one
    [K, M] matrix against every candidate gives (the formula, group mask included), for
    kept boxes in any order; the traced path is that matrix."""
    from ssdlit.postprocess import _vote_block, box_vote

    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=gen) * 8
    boxes = torch.cat((xy, xy + 0.5 + torch.rand(n, 2, generator=gen) * 4), dim=1)
    # few distinct positions: many overlapping voters
    boxes = torch.round(boxes * 2) / 2
    scores = torch.rand(n, generator=gen) + 0.01
    groups = torch.randint(0, num_groups, (n,), generator=gen)
    keep = torch.randperm(n, generator=gen)[: max(1, n // 3)]
    want = _vote_block(boxes, scores, groups, keep, iou_min)
    got = box_vote(boxes, scores, groups, keep, iou_min, rows=rows)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)


def test_voting_moves_kept_boxes_and_keeps_scores_and_labels():
    scores = torch.zeros(1, 3, 2)
    scores[0, :, 1] = torch.tensor([0.9, 0.6, 0.3])
    scores[0, :, 0] = 1 - scores[0, :, 1]
    boxes = torch.tensor([[[0.1, 0.1, 0.5, 0.5], [0.1, 0.1, 0.5, 0.6], [0.6, 0.6, 0.9, 0.9]]])
    plain = PerClassNMS()(scores, boxes)[0]
    voted = PerClassNMS(vote_iou=0.5)(scores, boxes)[0]
    assert torch.equal(plain[:, :2], voted[:, :2])  # the same detections, labels, scores
    expected = (0.9 * boxes[0, 0] + 0.6 * boxes[0, 1]) / 1.5
    torch.testing.assert_close(voted[0, 2:], expected)
    torch.testing.assert_close(voted[1, 2:], boxes[0, 2])  # no voter but itself
    with pytest.raises(ValueError, match="vote_iou"):
        PerClassNMS(vote_iou=0.0)
