import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssdlit.anchors import (
    BACKGROUND,
    IGNORE,
    FasterRCNNMatcher,
    SSDAnchorGenerator,
    SSDMatcher,
    YoloAnchorGenerator,
    YOLOv3Matcher,
    greedy_bipartite,
)
from ssdlit.anchors.matching import AnchorOverlaps, masked_iou, ssd_match
from ssdlit.registry import MATCHERS
from tests.ssd_keras_reference import ssd_keras_match

SSD300_MAPS = [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]


def ssd300_tables(dtype=torch.float32, **options) -> AnchorOverlaps:
    """The SSD300 anchors' tables with their grid, as a Detector builds them."""
    grid = SSDAnchorGenerator.ssd300(**options).grid(SSD300_MAPS)
    return AnchorOverlaps(grid.flat(dtype=dtype), grid.shapes)


def cxcywh(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def batch(*images):
    """Pad per-image lists of xyxy boxes to gt_boxes [B, G, 4] and gt_mask [B, G]."""
    g = max(1, max(len(b) for b in images))
    boxes = torch.zeros(len(images), g, 4)
    mask = torch.zeros(len(images), g, dtype=torch.bool)
    for i, b in enumerate(images):
        if b:
            boxes[i, : len(b)] = torch.tensor(b, dtype=torch.float32)
            mask[i, : len(b)] = True
    return boxes, mask


# Four anchors side by side, each 0.25 wide and 1 tall (xyxy: [0.25 i, 0, 0.25 (i+1), 1]).
STRIP = cxcywh(*[(0.125 + 0.25 * i, 0.5, 0.25, 1.0) for i in range(4)])


def test_bipartite_matches_gt_below_threshold():
    # The gt covers half of anchor 1 only: IoU 0.5 * 0.25 / 0.25 ... = 0.5/1.5? Compute: gt [0.25, 0, 0.375, 1]
    # has area 0.125, anchor 1 area 0.25, intersection 0.125 -> IoU 0.5; make it smaller:
    boxes, mask = batch([[0.25, 0.0, 0.30, 0.5]])  # IoU with anchor 1 = 0.025 / 0.25 = 0.1
    m = SSDMatcher(pos_iou_threshold=0.5, neg_iou_limit=0.3)(boxes, mask, STRIP)
    assert m.tolist() == [[BACKGROUND, 0, BACKGROUND, BACKGROUND]]


def test_two_gts_competing_for_one_anchor():
    # Both gts overlap anchor 1 most; gt 1 overlaps it more, so gt 1 takes anchor 1 and
    # gt 0 falls back to its second best (anchor 0) even though that IoU is lower.
    boxes, mask = batch([[0.20, 0.0, 0.45, 1.0], [0.25, 0.0, 0.50, 0.9]])
    m = SSDMatcher(matching="bipartite", neg_iou_limit=None)(boxes, mask, STRIP)
    assert m.tolist() == [[0, 1, BACKGROUND, BACKGROUND]]


def test_multi_adds_threshold_matches_and_neutral():
    # gt spans anchors 1 and 2 (IoU 0.5 with each, tie -> bipartite takes the lower index);
    # multi then gives anchor 2 to it too; anchor 3 overlaps a little -> neutral.
    boxes, mask = batch([[0.25, 0.0, 0.75, 1.0], [0.8, 0.0, 0.95, 1.0]])
    m = SSDMatcher(pos_iou_threshold=0.5, neg_iou_limit=0.1)(boxes, mask, STRIP)
    assert m.tolist() == [[BACKGROUND, 0, 0, 1]]
    only_bip = SSDMatcher(matching="bipartite", neg_iou_limit=0.3)(boxes, mask, STRIP)
    assert only_bip.tolist() == [[BACKGROUND, 0, IGNORE, 1]]


def test_padding_and_empty_images():
    boxes, mask = batch([[0.0, 0.0, 0.25, 1.0]], [])
    boxes[1, 0] = torch.tensor([0.0, 0.0, 0.25, 1.0])  # padding slot holding a real-looking box
    m = SSDMatcher()(boxes, mask, STRIP)
    assert m[0].tolist() == [0, BACKGROUND, BACKGROUND, BACKGROUND]
    assert m[1].tolist() == [BACKGROUND] * 4  # padded gts never match
    empty = SSDMatcher()(torch.zeros(3, 0, 4), torch.zeros(3, 0, dtype=torch.bool), STRIP)
    assert empty.shape == (3, 4) and (empty == BACKGROUND).all()


def test_greedy_bipartite_each_gt_one_anchor_each_anchor_once():
    torch.manual_seed(0)
    iou = torch.rand(5, 7, 30)
    iou[0, 3:] = -1  # padded gts of image 0
    m = greedy_bipartite(iou)
    for b in range(5):
        matched = m[b][m[b] >= 0]
        n_real = 3 if b == 0 else 7
        assert sorted(matched.tolist()) == list(range(n_real))


def _random_batch(rng, b, max_g):
    images = []
    for _ in range(b):
        n = int(rng.integers(0, max_g + 1))
        xy = rng.uniform(0, 0.8, size=(n, 2))
        wh = rng.uniform(0.02, 0.6, size=(n, 2))
        images.append(np.concatenate([xy, np.minimum(xy + wh, 1.0)], 1).tolist())
    return images


@pytest.mark.parametrize("matching, neg", [("multi", 0.3), ("bipartite", 0.4), ("multi", None)])
def test_agrees_with_ssd_keras_loop_on_random_batches(matching, neg):
    rng = np.random.default_rng(42)
    anchors = SSDAnchorGenerator.ssd300()(SSD300_MAPS, dtype=torch.float64)
    images = _random_batch(rng, 16, 8)
    boxes, mask = batch(*images)
    boxes = boxes.double()
    ours = SSDMatcher(matching=matching, pos_iou_threshold=0.5, neg_iou_limit=neg)(
        boxes, mask, anchors
    )
    for i, img in enumerate(images):
        real = boxes[i, : len(img)].numpy()  # the very same numbers as ours got
        ref = ssd_keras_match(real, anchors.numpy(), matching, 0.5, neg)
        np.testing.assert_array_equal(ours[i].numpy(), ref, err_msg=f"image {i}")


def test_ties_break_like_ssd_keras():
    # Identical gts and a gt exactly between two anchors: ties go to the lowest index.
    images = [[[0.25, 0.0, 0.75, 1.0], [0.25, 0.0, 0.75, 1.0], [0.0, 0.0, 0.5, 1.0]]]
    boxes, mask = batch(*images)
    ours = SSDMatcher(neg_iou_limit=0.3)(boxes.double(), mask, STRIP.double())
    ref = ssd_keras_match(np.array(images[0]), STRIP.double().numpy(), "multi", 0.5, 0.3)
    assert ours[0].tolist() == ref.tolist()


def test_faster_rcnn_rule():
    # anchors 0..3 of the strip; gt A equals anchor 0 (IoU 1); gt B overlaps anchor 2 with
    # IoU 0.4 (between thresholds) and anchor 3 with IoU 0.2 -> B's best anchor (2) is
    # forced positive; anchor 1 touches nothing -> background; anchor 3 -> background.
    boxes, mask = batch([[0.0, 0.0, 0.25, 1.0], [0.5, 0.0, 0.6, 1.0]])
    m = FasterRCNNMatcher(pos_iou_threshold=0.7, neg_iou_threshold=0.3)(boxes, mask, STRIP)
    assert m.tolist() == [[0, BACKGROUND, 1, BACKGROUND]]
    no_low = FasterRCNNMatcher(allow_low_quality_matches=False)(boxes, mask, STRIP)
    assert no_low.tolist() == [[0, BACKGROUND, IGNORE, BACKGROUND]]
    # Ties: a gt straddling anchors 1 and 2 equally gets both.
    boxes, mask = batch([[0.375, 0.0, 0.625, 1.0]])
    assert FasterRCNNMatcher()(boxes, mask, STRIP).tolist() == [[BACKGROUND, 0, 0, BACKGROUND]]


def test_yolov3_rule():
    # Two levels on a 64 x 64 input: stride 32 (2 x 2 cells) with priors 16x16 and 48x24,
    # stride 64 (1 cell) with prior 64x64.
    gen = YoloAnchorGenerator(
        image_size=(64, 64), priors=[[(16, 16), (48, 24)], [(64, 64)]], strides=[32, 64]
    )
    anchors = gen(
        [(2, 2), (1, 1)]
    )  # order: cell (0,0) p0 p1, (0,1) p0 p1, (1,0) .., (1,1) .., level 1
    # gt 0: 14x14 px centred at (48, 16) -> prior 16x16, cell (row 0, col 1) -> anchor 2.
    # gt 1: 40x24 px centred at (20, 44) -> prior 48x24, cell (row 1, col 0) -> anchor 5.
    # gt 2: 60x60 centred in the image -> prior 64x64 on level 1 -> anchor 8.
    gts = [
        [41 / 64, 9 / 64, 55 / 64, 23 / 64],
        [0 / 64, 32 / 64, 40 / 64, 56 / 64],
        [2 / 64, 2 / 64, 62 / 64, 62 / 64],
    ]
    boxes, mask = batch(gts)
    m = YOLOv3Matcher(ignore_threshold=0.5)(boxes, mask, anchors)
    expected = [BACKGROUND] * 9
    expected[2], expected[5], expected[8] = 0, 1, 2
    # anchor 4 (48x24 at cell (1,0)) vs gt 1: IoU = (40*24)/(48*24) = 0.83 but anchor 5 is it;
    # anchor 4 is prior 16x16 at (16, 48): IoU with gt 1 = 256 / (960 + 256 - 256) < 0.5.
    assert m[0].tolist() == expected
    lower = YOLOv3Matcher(ignore_threshold=0.2)(boxes, mask, anchors)
    assert (lower[0] == IGNORE).any() and lower[0, 2] == 0 and lower[0, 5] == 1 and lower[0, 8] == 2


def test_yolov3_collision_higher_gt_wins_and_padding():
    gen = YoloAnchorGenerator(image_size=(64, 64), priors=[[(32, 32)]], strides=[32])
    anchors = gen([(2, 2)])
    boxes, mask = batch([[0.0, 0.0, 0.4, 0.4], [0.05, 0.05, 0.45, 0.45]], [])
    m = YOLOv3Matcher(ignore_threshold=0.99)(boxes, mask, anchors)
    assert m[0].tolist() == [1, BACKGROUND, BACKGROUND, BACKGROUND]
    assert m[1].tolist() == [BACKGROUND] * 4


def test_registry_builds_matchers():
    assert isinstance(MATCHERS.build("ssd", matching="bipartite"), SSDMatcher)
    assert set(MATCHERS.names()) >= {"ssd", "faster_rcnn", "yolov3"}
    with pytest.raises(ValueError):
        SSDMatcher(matching="hungarian")
    with pytest.raises(ValueError, match="gt_mask"):
        SSDMatcher()(torch.zeros(1, 2, 4), torch.ones(1, 3, dtype=torch.bool), STRIP)


def _grids():
    yolo = YoloAnchorGenerator(
        image_size=(64, 96), priors=[[(8, 8), (20, 12)], [(40, 40)]], strides=[16, 32]
    )
    return [
        SSDAnchorGenerator.ssd300().grid(SSD300_MAPS),
        yolo.grid([(4, 6), (2, 3)]),
        None,  # arbitrary anchors: dense only
    ]


@pytest.mark.parametrize("grid", _grids(), ids=["ssd300", "yolo", "arbitrary"])
def test_fast_overlaps_equal_plain_iou(grid):
    from ssdlit.boxes import box_iou, convert

    if grid is None:
        fast = AnchorOverlaps(torch.rand(40, 4) * 0.5 + 0.05)
        assert not fast.sparse
    else:
        fast = AnchorOverlaps(grid.flat(), grid.shapes)
        assert fast.sparse
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(3, 5, 2, generator=g) * 0.7
    boxes = torch.cat([xy, xy + torch.rand(3, 5, 2, generator=g) * 0.3 + 0.01], -1)
    boxes[0, 0] = 0.0  # a degenerate (zero-area) gt gives IoU 0, not NaN
    expected = box_iou(boxes, convert(fast.anchors, "cxcywh", "xyxy"))
    assert torch.equal(fast(boxes), expected)
    assert torch.equal(fast(boxes, reuse=True), expected)


def test_grid_shapes_must_hold_the_anchors():
    grid = SSDAnchorGenerator.ssd300().grid(SSD300_MAPS)
    assert grid.num_anchors == 8732 and grid.shapes[0] == (38, 38, 4)
    with pytest.raises(ValueError, match="do not hold"):
        AnchorOverlaps(grid.flat()[:-1], grid.shapes)


# -- the sparse path (pairs above a threshold) against the dense one -------------------------


def _hard_batch(rng, b, max_g, snapped):
    """Boxes that stress the sparse path: grid-snapped (many exact ties), duplicates,
    whole-image, zero-area, thin and tiny boxes, besides ordinary ones."""
    images = []
    for _ in range(b):
        boxes = []
        for j in range(int(rng.integers(0, max_g + 1))):
            r = rng.random()
            if snapped:
                x1, y1 = rng.integers(0, 8, 2) / 8
                w, h = rng.integers(1, 5, 2) / 8
                box = [x1, y1, min(x1 + w, 1.0), min(y1 + h, 1.0)]
            elif r < 0.1:
                box = [0.0, 0.0, 1.0, 1.0]
            elif r < 0.2:
                x, y = rng.random(2) * 0.9
                box = [x, y, x, y + 0.1]  # zero area
            elif r < 0.35:
                x, y = rng.random(2) * 0.9
                box = [x, y, x + 0.9 * rng.random() * (1 - x) + 1e-3, y + 0.02]  # thin
            elif r < 0.5 and j > 0:
                box = list(boxes[-1])  # duplicate
            else:
                x, y = rng.random(2) * 0.95
                w, h = rng.uniform(0.005, 1.0, 2)
                box = [x, y, min(x + w, 1.0), min(y + h, 1.0)]
            boxes.append(box)
        images.append(boxes)
    return batch(*images)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize(
    "matching, pos, neg",
    [("multi", 0.5, 0.3), ("bipartite", 0.5, 0.4), ("multi", 0.5, None), ("bipartite", 0.5, None)],
)
def test_sparse_path_equals_the_reference(dtype, matching, pos, neg):
    tables = ssd300_tables(dtype)
    assert tables.sparse
    rng = np.random.default_rng(7)
    matcher = SSDMatcher(matching=matching, pos_iou_threshold=pos, neg_iou_limit=neg)
    for trial in range(8):
        boxes, mask = _hard_batch(rng, 6, 10, snapped=trial % 2 == 0)
        boxes = boxes.to(dtype)
        sparse = matcher(boxes, mask, tables)
        reference = ssd_match(masked_iou(boxes, mask, tables.anchors), matching, pos, neg)
        assert torch.equal(sparse, reference), f"trial {trial}"
        assert (sparse >= 0).sum() >= mask.sum()  # every real gt has its anchor
        # anchors without their grid take the reference path: the same matches
        assert torch.equal(matcher(boxes, mask, tables.anchors), reference)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(*[st.floats(0.0, 1.0, allow_nan=False)] * 4), min_size=1, max_size=6),
    st.sampled_from([0.1, 0.3, 0.5, 0.7]),
)
def test_pairs_above_threshold_are_exactly_the_dense_ones(raw, threshold):
    anchors = SSDAnchorGenerator.ssd300()(SSD300_MAPS)
    boxes = torch.tensor(
        [[min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)] for x1, y1, x2, y2 in raw]
    )
    overlaps = ssd300_tables()
    rows, anchor, iou = overlaps.above(boxes, threshold)
    dense = overlaps(boxes[None])[0]
    expected = (dense >= threshold).nonzero()
    got = torch.stack((rows, anchor), 1)
    assert torch.equal(got[torch.argsort(rows * anchors.shape[0] + anchor)], expected)
    assert torch.equal(iou, dense[rows, anchor])  # the very same numbers


def _sequential_greedy(iou):
    """One pair per step: the highest IoU, then the lowest gt, then the lowest anchor."""
    iou = iou.clone()
    g = iou.shape[0]
    matches = np.full(iou.shape[1], BACKGROUND)
    for _ in range(g):
        best = iou.max()
        if best < 0:
            break
        gt, anchor = [int(v) for v in (iou == best).nonzero()[0]]  # row-major first
        matches[anchor] = gt
        iou[gt] = -1.0
        iou[:, anchor] = -1.0
    return matches


@pytest.mark.parametrize("g", [5, 40])  # 40 x 40 candidates: one pair per step
def test_greedy_rounds_equal_one_pair_per_step(g):
    gen = torch.Generator().manual_seed(g)
    iou = torch.ceil(torch.rand(3, g, 60, generator=gen) * 5) / 5  # few values: many ties
    iou[1, g // 2 :] = -1.0  # padded gts
    ours = greedy_bipartite(iou)
    for i in range(3):
        assert ours[i].tolist() == _sequential_greedy(iou[i]).tolist(), f"image {i}"


@pytest.mark.parametrize("matcher", [SSDMatcher(), FasterRCNNMatcher(), YOLOv3Matcher()], ids=repr)
def test_matchers_take_the_anchors_tables_or_the_anchors(matcher):
    tables = ssd300_tables()
    boxes, mask = _hard_batch(np.random.default_rng(3), 4, 6, snapped=False)
    expected = matcher(boxes, mask, tables.anchors)
    assert torch.equal(matcher(boxes, mask, tables), expected)
    # tables of another dtype are rebuilt from their anchors and grid, not used as they are
    assert torch.equal(matcher(boxes, mask, ssd300_tables(torch.float64)), expected)


@pytest.mark.parametrize("g", [5, 40])
def test_the_sparse_paths_greedy_equals_the_references(g):
    """The CPU path's greedy (best anchors kept per gt, recomputed when taken) gives the
    pairs of the reference's one-pair-per-step procedure, ties included."""
    from ssdlit.anchors.matching.ssd import _greedy_pairs

    gen = torch.Generator().manual_seed(g + 1)
    iou = torch.ceil(torch.rand(4, g, 60, generator=gen) * 5) / 5  # few values: many ties
    iou[1, g // 2 :] = -1.0  # padded gts
    iou[2] = -1.0  # no real gt
    image, anchor, gt = _greedy_pairs(iou)
    got = torch.full((4, 60), BACKGROUND)
    got[image, anchor] = gt
    assert torch.equal(got, greedy_bipartite(iou))


def test_yolo_priors_are_found_once_per_anchor_set():
    """The distinct anchor sizes come from one ``torch.unique`` kept with the tables (a
    host synchronisation per step on a GPU otherwise), and give the same matches."""
    tables = ssd300_tables()
    boxes, mask = _hard_batch(np.random.default_rng(5), 3, 5, snapped=False)
    matcher = YOLOv3Matcher()
    first = matcher(boxes, mask, tables)
    kept = tables.priors()
    assert tables.priors() is kept
    assert torch.equal(matcher(boxes, mask, tables), first)
    assert torch.equal(matcher(boxes, mask, tables.anchors), first)  # plain anchors: the same
    shapes, prior_of = kept
    assert torch.equal(shapes[prior_of], tables.anchors[:, 2:])
