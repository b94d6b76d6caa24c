import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import ssdlit.heads  # noqa: F401  (registers the heads)
from ssdlit.anchors import (
    BACKGROUND,
    IGNORE,
    FasterRCNNMatcher,
    RetinaAnchorGenerator,
    SSDAnchorGenerator,
    SSDMatcher,
    YoloAnchorGenerator,
    YOLOv3Matcher,
)
from ssdlit.boxes import BoxCoder, convert
from ssdlit.heads import (
    DetectionHead,
    RetinaHead,
    SSDHead,
    SSDLiteHead,
    YoloHead,
    background_loss,
    mine_negatives,
    multibox_loss,
)
from ssdlit.heads.losses import MINING, N_NEG_MIN, NEG_POS_RATIO
from ssdlit.registry import HEADS
from tests.dense_targets import encode_targets, gather_targets

HEAD_NAMES = ["ssd", "ssdlite", "retina", "yolo"]
C = 3  # object classes
SIZES = [(4, 4), (2, 2)]
IN_CHANNELS = [8, 16]
# the shared retina predictors need one anchor count on every level
NUM_ANCHORS = {"ssd": [4, 6], "ssdlite": [4, 6], "retina": [6, 6], "yolo": [4, 6]}
SMALL = {"retina": {"channels": 16}, "yolo": {"hidden_channels": 8}}


def hard_negative_mask(
    loss, matches, neg_pos_ratio=NEG_POS_RATIO, n_neg_min=N_NEG_MIN, mining=MINING
) -> torch.Tensor:
    """The negatives :func:`mine_negatives` keeps, as a ``[B, A]`` mask."""
    index, kept, budget, _ = mine_negatives(loss, matches, neg_pos_ratio, n_neg_min, mining)
    mask = torch.zeros(matches.numel(), dtype=torch.bool)
    mask[index[kept]] = True
    assert kept.sum(1).tolist() == budget.tolist()
    return mask.view(matches.shape)


def build(name: str, num_anchors=None, in_channels=IN_CHANNELS, **kwargs) -> DetectionHead:
    """A small head; a yolo head gets the grid of a 32 x 32 input with SIZES maps (the
    cells a Detector would hand it)."""
    options = {**SMALL.get(name, {}), **kwargs}
    head = HEADS.build(
        name,
        in_channels=in_channels,
        num_anchors=num_anchors or NUM_ANCHORS[name],
        num_classes=C,
        **options,
    )
    if name == "yolo" and num_anchors is None:
        head.bind_anchor_grid(yolo_grid().cells(SIZES))
    return head


def yolo_grid(sizes=SIZES) -> YoloAnchorGenerator:
    """A yolo generator with NUM_ANCHORS["yolo"] priors per level, strides 8 and 16."""
    priors = [[(4 + i, 6 + i) for i in range(n)] for n in NUM_ANCHORS["yolo"]]
    return YoloAnchorGenerator(image_size=(32, 32), priors=priors, strides=(8, 16))


def features(
    batch: int = 2, sizes=SIZES, channels=IN_CHANNELS, seed: int = 0
) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, c, h, w, generator=g) for c, (h, w) in zip(channels, sizes, strict=True)
    ]


def num_anchors_total(name: str) -> int:
    return sum(n * h * w for n, (h, w) in zip(NUM_ANCHORS[name], SIZES, strict=True))


def random_anchors(a: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centre = torch.rand(a, 2, generator=g) * 0.8 + 0.1
    size = torch.rand(a, 2, generator=g) * 0.3 + 0.05
    return torch.cat((centre, size), dim=1)


def random_targets(b: int, a: int, g_max: int = 3, seed: int = 0):
    """Random padded gt (xyxy, labels 1..C, 0 on padding) and matches that use them."""
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(b, g_max, 2, generator=gen) * 0.5
    wh = torch.rand(b, g_max, 2, generator=gen) * 0.4 + 0.05
    boxes = torch.cat((xy, xy + wh), dim=-1)
    labels = torch.randint(1, C + 1, (b, g_max), generator=gen)
    counts = [g_max, 1, 0][:b] + [g_max] * max(0, b - 3)
    matches = torch.empty(b, a, dtype=torch.long)
    for i, n in enumerate(counts):
        labels[i, n:] = 0
        boxes[i, n:] = 0.0
        matches[i] = torch.randint(-2, n, (a,), generator=gen)  # -2, -1 or a real gt
    return boxes, labels, matches


# -- construction, shapes, scores ------------------------------------------------------


def test_registered_names():
    assert set(HEAD_NAMES) <= set(HEADS.names())
    assert HEADS.get("ssd") is SSDHead and HEADS.get("ssdlite") is SSDLiteHead
    assert HEADS.get("retina") is RetinaHead and HEADS.get("yolo") is YoloHead


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_output_shapes_scores_and_boxes(name):
    head = build(name)
    assert isinstance(head, DetectionHead)
    out = head(features())
    a = num_anchors_total(name)
    assert a == (4 * 16 + 6 * 4 if name != "retina" else 6 * 16 + 6 * 4)
    k = {"ssd": C + 1, "ssdlite": C + 1, "retina": C, "yolo": 1 + C}[name]
    assert out["cls_logits"].shape == (2, a, k)
    assert out["box_deltas"].shape == (2, a, 4)
    scores = head.scores(out)
    assert scores.shape == (2, a, C + 1)
    assert scores.min() >= 0 and scores.max() <= 1
    if name in ("ssd", "ssdlite"):
        torch.testing.assert_close(scores.sum(-1), torch.ones(2, a))
    if name == "retina":
        assert (scores[..., 0] == 0).all()
        torch.testing.assert_close(scores[..., 1:], out["cls_logits"].sigmoid())
    if name == "yolo":
        obj = out["cls_logits"][..., 0].sigmoid()
        torch.testing.assert_close(scores[..., 0], 1 - obj)
        torch.testing.assert_close(
            scores[..., 1:], obj[..., None] * out["cls_logits"][..., 1:].sigmoid()
        )
    boxes = head.decode_boxes(out, random_anchors(a))
    assert boxes.shape == (2, a, 4) and torch.isfinite(boxes).all()


def test_constructor_checks():
    with pytest.raises(ValueError, match="one entry per level"):
        build("ssd", num_anchors=[4])
    with pytest.raises(ValueError, match="same"):
        build("retina", num_anchors=[4, 6])
    with pytest.raises(ValueError, match="num_classes"):
        HEADS.build("ssd", in_channels=[8], num_anchors=[4], num_classes=0)
    with pytest.raises(ValueError, match="mining"):
        build("ssd", mining="per_epoch")
    head = build("ssd")
    with pytest.raises(ValueError, match="levels"):
        head(features()[:1])
    with pytest.raises(ValueError, match="level 1"):
        head([features()[0], torch.randn(2, 3, 2, 2)])


def test_anchor_count_matches_generators():
    image = (64, 64)
    gens = {
        "ssd": SSDAnchorGenerator(
            image_size=image,
            aspect_ratios=[[1, 2, 0.5], [1, 2, 0.5, 3, 1 / 3]],
            scales=[0.2, 0.4, 0.7],
        ),
        "retina": RetinaAnchorGenerator(image_size=image, sizes=(12, 24), strides=(16, 32)),
        "yolo": YoloAnchorGenerator(
            image_size=image,
            priors=(((8, 8), (12, 20)), ((24, 24), (40, 32), (32, 48))),
            strides=(16, 32),
        ),
    }
    gens["ssdlite"] = gens["ssd"]
    for name, gen in gens.items():
        head = build(name, num_anchors=gen.num_anchors_per_location())
        out = head(features())
        assert out["cls_logits"].shape[1] == gen(SIZES).shape[0], name


def test_ssdlite_is_depthwise_separable():
    head = build("ssdlite")
    block = head.cls_predictors[1]
    dw, bn, act, pw = block
    assert dw.groups == dw.in_channels == dw.out_channels == 16 and dw.kernel_size == (3, 3)
    assert isinstance(bn, nn.BatchNorm2d) and isinstance(act, nn.ReLU6)
    assert pw.kernel_size == (1, 1) and pw.out_channels == 6 * (C + 1)


def test_initialisation():
    ssd = build("ssd")
    for conv in [*ssd.cls_predictors, *ssd.box_predictors]:
        assert conv.kernel_size == (3, 3) and conv.padding == (1, 1)
        assert (conv.bias == 0).all()
    retina = build("retina")
    prior = -math.log((1 - 0.01) / 0.01)
    torch.testing.assert_close(retina.cls_predictor.bias, torch.full((6 * C,), prior))
    assert (retina.box_predictor.bias == 0).all()
    # a fresh retina head says "1 %" for every class
    scores = retina.scores(retina(features()))
    torch.testing.assert_close(scores[..., 1:].mean(), torch.tensor(0.01), atol=2e-3, rtol=0)
    yolo = build("yolo")
    bias = yolo.predictors[0].bias.view(4, 5 + C)
    assert (bias[:, :4] == 0).all()
    torch.testing.assert_close(bias[:, 4:], torch.full((4, 1 + C), prior))


# -- anchor order ----------------------------------------------------------------------


def test_ssd_reshape_order_encodes_cell_and_anchor():
    """Conv weights that write 1000 y + 100 x + 10 a + j into value j of anchor a of cell (y, x)."""
    head = build("ssd", num_anchors=[2, 3])
    feats = []
    for h, w in [(3, 4), (2, 5)]:  # non-square maps catch a swapped H and W
        ys = torch.arange(h, dtype=torch.float32)[:, None].expand(h, w)
        xs = torch.arange(w, dtype=torch.float32)[None, :].expand(h, w)
        f = torch.zeros(1, 16, h, w)
        f[0, 0], f[0, 1] = ys, xs
        feats.append(f)
    feats[0] = feats[0][:, :8]
    with torch.no_grad():
        for convs, k in ((head.cls_predictors, C + 1), (head.box_predictors, 4)):
            for conv in convs:
                conv.weight.zero_()
                conv.weight[:, 0, 1, 1] = 1000.0
                conv.weight[:, 1, 1, 1] = 100.0
                n = conv.out_channels // k
                conv.bias.copy_(torch.tensor([10.0 * a + j for a in range(n) for j in range(k)]))
    out = head(feats)
    for key, k in (("cls_logits", C + 1), ("box_deltas", 4)):
        rows = []
        for n, (h, w) in zip([2, 3], [(3, 4), (2, 5)], strict=True):
            for y in range(h):
                for x in range(w):
                    for a in range(n):
                        rows.append([1000.0 * y + 100 * x + 10 * a + j for j in range(k)])
        torch.testing.assert_close(out[key][0], torch.tensor(rows))


def _raw_maps(head: DetectionHead, feats) -> tuple[dict, dict[str, list[torch.Tensor]]]:
    """Capture the raw predictor maps [B, n * k, H, W] of each level with forward hooks."""
    maps: dict[str, list[torch.Tensor]] = {"cls": [], "box": []}
    if isinstance(head, SSDHead):
        modules = {"cls": list(head.cls_predictors), "box": list(head.box_predictors)}
    elif isinstance(head, RetinaHead):
        modules = {"cls": [head.cls_predictor], "box": [head.box_predictor]}
    else:
        modules = {"cls": list(head.predictors)}
    handles = [
        m.register_forward_hook(lambda _m, _i, o, key=key: maps[key].append(o))
        for key, ms in modules.items()
        for m in ms
    ]
    out = head(feats)
    for h in handles:
        h.remove()
    return out, maps


def _naive_flatten(maps: list[torch.Tensor], k: int) -> torch.Tensor:
    rows = []
    for m in maps:
        n = m.shape[1] // k
        for y in range(m.shape[2]):
            for x in range(m.shape[3]):
                for a in range(n):
                    rows.append(m[:, a * k : (a + 1) * k, y, x])
    return torch.stack(rows, dim=1)


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_outputs_follow_anchor_order_of_raw_maps(name):
    head = build(name).eval()
    feats = features(sizes=[(3, 4), (2, 3)])
    out, maps = _raw_maps(head, feats)
    if name == "yolo":
        raw = _naive_flatten(maps["cls"], 5 + C)  # darknet order: tx ty tw th obj classes
        torch.testing.assert_close(out["box_deltas"], raw[..., :4])
        torch.testing.assert_close(out["cls_logits"], raw[..., 4:])
        return
    k = C if name == "retina" else C + 1
    torch.testing.assert_close(out["cls_logits"], _naive_flatten(maps["cls"], k))
    torch.testing.assert_close(out["box_deltas"], _naive_flatten(maps["box"], 4))


# -- decoding ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_zero_deltas_give_the_anchors(name):
    head = build(name)
    out = head(features())
    a = out["box_deltas"].shape[1]
    # yolo boxes are relative to the grid cells: its anchors must be the grid's
    anchors = yolo_grid()(SIZES) if name == "yolo" else random_anchors(a)
    out["box_deltas"] = torch.zeros_like(out["box_deltas"])
    torch.testing.assert_close(head.decode_boxes(out, anchors), anchors.expand(2, a, 4))


def test_ssd_decode_inverts_encode():
    head = build("ssd", variances=(0.1, 0.1, 0.2, 0.2))
    out = head(features())
    a = out["box_deltas"].shape[1]
    anchors = random_anchors(a, seed=1)
    gt = random_anchors(a, seed=2).expand(2, a, 4)
    out["box_deltas"] = BoxCoder((0.1, 0.1, 0.2, 0.2)).encode(gt, anchors)
    torch.testing.assert_close(head.decode_boxes(out, anchors), gt)


def _yolo300():
    """The shipped yolo300 anchors (conf/anchors/yolo300.yaml) on the 6 maps of the
    300 x 300 SSD backbone it is configured for, and a yolo head with their grid."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from ssdlit.registry import ANCHORS

    spec = OmegaConf.to_container(
        OmegaConf.load(Path(__file__).parents[1] / "conf" / "anchors" / "yolo300.yaml")
    )
    name = spec.pop("name")
    gen = ANCHORS.build(name, image_size=(300, 300), **spec)
    maps = [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]
    head = HEADS.build(
        "yolo",
        in_channels=[4] * 6,
        num_anchors=gen.num_anchors_per_location(),
        num_classes=C,
        hidden_channels=0,
    )
    head.bind_anchor_grid(gen.cells(maps, dtype=torch.float64))
    return spec, gen(maps, dtype=torch.float64), maps, head


def test_yolo300_gt_on_every_cell_boundary_is_reached_by_its_anchor():
    """On every level of yolo300 (stride x map size != 300 on four of them: the cells
    step 8/300, 16/300, 32/300, 64/300, not 1/38, 1/19, 1/10, 1/5), a gt centred on any
    cell boundary or cell centre is given, by the YOLOv3 matcher, to an anchor whose
    cell holds that centre, and is encoded and decoded back exactly."""
    spec, anchors, maps, head = _yolo300()
    gt, level_of = [], []
    start = 0
    for level, ((fh, fw), stride) in enumerate(zip(maps, spec["strides"], strict=True)):
        step = stride / 300
        # cell centres (i + 0.5) * step and boundaries i * step, inside the image
        pos = torch.arange(0, 2 * max(fh, fw) + 1, dtype=torch.float64) * step / 2
        pos = pos[pos <= 1.0]
        w, h = spec["priors"][level][0]
        xs, ys = torch.meshgrid(pos, pos, indexing="ij")
        # every x with every y would be many; each x once and each y once suffices
        for x, y in zip(
            xs.diagonal().tolist() + xs[:, 0].tolist(),
            ys.diagonal().tolist() + pos.flip(0).tolist(),
            strict=True,
        ):
            gt.append([x - w / 600, y - h / 600, x + w / 600, y + h / 600])
            level_of.append(level)
        start += fh * fw * len(spec["priors"][level])
    gt_boxes = torch.tensor(gt, dtype=torch.float64)[:, None, :]  # [N, 1, 4] one gt per image
    matches = YOLOv3Matcher()(gt_boxes, torch.ones(len(gt), 1, dtype=torch.bool), anchors)
    assert ((matches >= 0).sum(dim=1) == 1).all()
    anchor = (matches >= 0).int().argmax(dim=1)  # [N] the responsible anchor
    centre = convert(gt_boxes[:, 0], "xyxy", "cxcywh")  # [N, 4]
    cells = head.anchor_cells[anchor]  # [N, 4] its cell
    tol = 1e-9
    inside = ((centre[:, :2] - cells[:, :2]).abs() <= cells[:, 2:] / 2 + tol).all(dim=1)
    assert inside.all(), centre[~inside][:5]
    # the head can reach the gt from that anchor: deltas of +-inf span the whole cell
    a = anchors.shape[0]
    reach = torch.zeros(2, a, 4, dtype=torch.float64)
    reach[0, :, :2], reach[1, :, :2] = -torch.inf, torch.inf
    lo, hi = head.decode_boxes({"box_deltas": reach}, anchors)[:, anchor, :2]
    assert ((lo <= centre[:, :2] + tol) & (centre[:, :2] <= hi + tol)).all()
    # encoded and decoded back exactly, at the responsible anchor
    boxes = anchors.expand(len(gt), a, 4).clone()
    rows = torch.arange(len(gt))
    boxes[rows, anchor] = centre
    target = head.encode_boxes(boxes, anchors)  # [N, A, 4]
    deltas = torch.cat((torch.logit(target[..., :2]), target[..., 2:]), dim=-1)
    decoded = head.decode_boxes({"box_deltas": deltas}, anchors)[rows, anchor]
    torch.testing.assert_close(decoded, centre, rtol=0, atol=1e-12)
    assert sorted(set(level_of)) == list(range(6))


def test_yolo_decoding_follows_yolov3_on_a_stride_grid():
    """YOLOv3's rule: cx = (c_x + sigmoid(tx)) * stride, with a stride (5 px on a 32 px
    input) that differs from input size / map size."""
    gen = YoloAnchorGenerator(image_size=(32, 32), priors=[[(6, 4)]], strides=[5])
    anchors = gen([(4, 6)])  # 4 rows, 6 columns of 5 px cells
    head = HEADS.build("yolo", in_channels=[4], num_anchors=[1], num_classes=C, hidden_channels=0)
    head.bind_anchor_grid(gen.cells([(4, 6)]))
    t = torch.zeros(1, 24, 4)
    t[0, 7] = torch.tensor([0.7, -0.4, 0.2, -0.1])  # cell (y=1, x=1)
    box = head.decode_boxes({"box_deltas": t}, anchors)[0, 7]
    sig = torch.sigmoid(torch.tensor([0.7, -0.4]))
    expected = torch.tensor(
        [
            (1 + sig[0]) * 5 / 32,
            (1 + sig[1]) * 5 / 32,
            6 / 32 * math.exp(0.2),
            4 / 32 * math.exp(-0.1),
        ]
    )
    torch.testing.assert_close(box, expected)


def test_yolo_head_without_its_grid_refuses_to_decode():
    head = HEADS.build("yolo", in_channels=[4], num_anchors=[1], num_classes=C, hidden_channels=0)
    with pytest.raises(RuntimeError, match="bind_anchor_grid"):
        head.decode_boxes({"box_deltas": torch.zeros(1, 4, 4)}, torch.rand(4, 4))


def test_huge_deltas_do_not_overflow():
    for name in ("ssd", "yolo"):
        head = build(name)
        out = head(features())
        out["box_deltas"] = torch.full_like(out["box_deltas"], 1e4)
        boxes = head.decode_boxes(out, random_anchors(out["box_deltas"].shape[1]))
        assert torch.isfinite(boxes).all()


# -- hard negative mining ----------------------------------------------------------------


def _mining_case():
    """Two images of 20 anchors; losses by hand.

    Image 0: 2 positives, 12 background anchors with loss > 0, 3 with loss 0, 3 ignored
    (with the largest losses of all). Image 1: 3 positives, 5 background with loss > 0,
    12 with loss 0.
    """
    loss = torch.zeros(2, 20)
    matches = torch.full((2, 20), BACKGROUND)
    matches[0, :2] = 0
    loss[0, 2:14] = torch.arange(1, 13, dtype=torch.float32)  # 1..12
    matches[0, 17:] = IGNORE
    loss[0, 17:] = 100.0
    matches[1, [0, 5, 9]] = torch.tensor([0, 1, 1])
    loss[1, [1, 2, 3, 4, 6]] = torch.tensor([0.5, 20.0, 7.5, 3.0, 11.5])
    return loss, matches


def test_mining_per_image_keeps_three_per_positive_or_all_nonzero():
    loss, matches = _mining_case()
    keep = hard_negative_mask(loss, matches, neg_pos_ratio=3, n_neg_min=0, mining="per_image")
    assert keep.sum(1).tolist() == [6, 5]  # min(3 * 2, 12) and min(3 * 3, 5)
    assert keep[0].nonzero().flatten().tolist() == [8, 9, 10, 11, 12, 13]  # losses 7..12
    assert keep[1].nonzero().flatten().tolist() == [1, 2, 3, 4, 6]
    assert not keep[matches != BACKGROUND].any()
    assert (loss[keep] > 0).all()


def test_mining_per_batch_uses_the_batch_budget_and_hardest_of_the_batch():
    loss, matches = _mining_case()
    keep = hard_negative_mask(loss, matches, neg_pos_ratio=3, n_neg_min=0, mining="per_batch")
    # 5 positives in the batch: budget 15, 17 candidates with loss > 0 -> the top 15
    assert keep.sum().item() == 15
    cand = loss[(matches == BACKGROUND) & (loss > 0)]
    assert loss[keep].min() == cand.sort(descending=True).values[14]
    assert keep.sum(1).tolist() == [11, 4]  # image 1 loses its 0.5, image 0 its 1.0
    keep2 = hard_negative_mask(loss, matches, neg_pos_ratio=1, n_neg_min=0, mining="per_batch")
    assert sorted(loss[keep2].tolist()) == [10.0, 11.0, 11.5, 12.0, 20.0]


def test_mining_ratio_floor_and_n_neg_min():
    loss, matches = _mining_case()
    keep = hard_negative_mask(loss, matches, neg_pos_ratio=2.5, n_neg_min=0, mining="per_image")
    assert keep.sum(1).tolist() == [5, 5]  # floor(2.5 * 2) = 5, floor(7.5) = 7 capped at 5
    # no positives at all: only n_neg_min negatives, never more than the non-zero ones
    no_pos = matches.masked_fill(matches >= 0, BACKGROUND)
    assert hard_negative_mask(loss, no_pos, n_neg_min=0, mining="per_image").sum() == 0
    keep = hard_negative_mask(loss, no_pos, n_neg_min=4, mining="per_image")
    assert keep.sum(1).tolist() == [4, 4]
    assert keep[0].nonzero().flatten().tolist() == [10, 11, 12, 13]
    keep = hard_negative_mask(loss, no_pos, n_neg_min=9, mining="per_image")
    assert keep.sum(1).tolist() == [9, 5]
    keep = hard_negative_mask(loss, no_pos, n_neg_min=9, mining="per_batch")
    assert keep.sum().item() == 9
    # n_neg_min only raises the budget
    keep = hard_negative_mask(loss, matches, n_neg_min=1, mining="per_image")
    assert keep.sum(1).tolist() == [6, 5]


def _reference_hardest(loss, matches, ratio, n_neg_min, mining):
    """The kept negatives by sorting: (image, anchor) pairs, highest loss first and the
    lower flat index among equals, within each row's budget."""
    loss, matches = loss.tolist(), matches.tolist()
    images = range(len(matches))
    rows = [list(images)] if mining == "per_batch" else [[i] for i in images]
    kept = set()
    for row in rows:
        cands = [
            (i, j) for i in row for j, m in enumerate(matches[i])
            if m == BACKGROUND and loss[i][j] > 0
        ]  # fmt: skip
        pos = sum(m >= 0 for i in row for m in matches[i])
        budget = min(max(math.floor(ratio * pos), n_neg_min), len(cands))
        cands.sort(key=lambda ij: (-loss[ij[0]][ij[1]], ij))
        kept.update(cands[:budget])
    return kept


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    b=st.integers(1, 6),
    a=st.integers(1, 700),
    levels=st.integers(1, 50),
    mining=st.sampled_from(["per_image", "per_batch"]),
    n_neg_min=st.sampled_from([0, 16, 40]),
)
def test_mining_equals_sorting_for_any_budgets(seed, b, a, levels, mining, n_neg_min):
    """Budgets spread over several of the CPU's topk groups (16, 32, ... 512), losses
    with ties (``levels`` distinct values) and zeros, ignored anchors: exactly the
    negatives a sort keeps."""
    g = torch.Generator().manual_seed(seed)
    loss = torch.randint(0, levels, (b, a), generator=g).float() / levels
    matches = torch.full((b, a), BACKGROUND)
    share = torch.rand(b, 1, generator=g) * 0.3  # up to 30% positives per image
    draw = torch.rand(b, a, generator=g)
    matches[draw < share] = 0
    matches[(draw >= share) & (draw < share + 0.05)] = IGNORE
    index, kept, budget, _ = mine_negatives(loss, matches, 3.0, n_neg_min, mining)
    flat = index[kept].tolist()
    got = {(i // a, i % a) for i in flat}
    assert len(got) == len(flat) == int(budget.sum())
    assert got == _reference_hardest(loss, matches, 3.0, n_neg_min, mining)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(0, 3000),
    share=st.sampled_from([0.0, 0.001, 0.01, 0.1, 0.5, 1.0]),
    offset=st.integers(0, 9),
)
def test_nonzero_of_known_size_equals_nonzero(seed, n, share, offset):
    """The word-at-a-time search of sparse masks on the CPU, and the others, equal
    ``nonzero`` (any length, density, and start within a larger mask)."""
    from ssdlit.heads.losses import _nonzero

    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(n + offset, generator=g) < share)[offset:]
    want = mask.nonzero().squeeze(1)
    assert torch.equal(_nonzero(mask, want.numel()), want)
    assert torch.equal(_nonzero(mask.clone(), want.numel()), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_gather_rows_has_index_selects_values_and_gradients(dtype):
    """Distinct indices in any order: the rows and the gradient of ``index_select``."""
    from ssdlit.heads.losses import gather_rows

    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 7, generator=g).to(dtype).requires_grad_()
    index = torch.randperm(50, generator=g)[:13]
    weight = torch.randn(13, 7, generator=g).to(dtype)
    got = gather_rows(x, index)
    want = x.index_select(0, index)
    assert torch.equal(got, want)
    (grad_got,) = torch.autograd.grad((got * weight).sum(), x)
    (grad_want,) = torch.autograd.grad((want * weight).sum(), x)
    assert grad_got.dtype == dtype and torch.equal(grad_got, grad_want)
    with torch.no_grad():
        assert not gather_rows(x, index).requires_grad


def test_mined_negatives_from_logits_and_their_gradients():
    """Logits by hand: the loss counts exactly the mined negatives, and only they get gradients."""
    a, k = 30, C + 1
    logits = torch.zeros(1, a, k)
    logits[0, :, 0] = 100.0  # confident background: CE exactly 0
    matches = torch.full((1, a), BACKGROUND)
    matches[0, :2] = 0  # 2 positives (label 2, CE = 100 each)
    hard = [5, 6, 7, 8, 9, 10, 11, 12]  # 8 negatives with a loss: graded, all > 0
    for i, idx in enumerate(hard):
        logits[0, idx, 0] = 0.0
        logits[0, idx, 1] = float(i)
    matches[0, 20:] = IGNORE
    logits[0, 20:, 0] = -50.0  # ignored anchors would be the hardest of all
    logits.requires_grad_(True)
    gt_boxes = torch.tensor([[[0.1, 0.1, 0.5, 0.5]]])
    gt_labels = torch.tensor([[2]])
    anchors = random_anchors(a)
    deltas = torch.zeros(1, a, 4)
    out = multibox_loss(
        logits, deltas, matches, gt_boxes, gt_labels, anchors, BoxCoder(), n_neg_min=0
    )
    out["loss"].backward()
    touched = (logits.grad.abs().sum(-1) > 0)[0].nonzero().flatten().tolist()
    assert touched == [0, 1, 7, 8, 9, 10, 11, 12]  # positives + the 6 hardest negatives
    ce = F.cross_entropy(logits[0].detach(), torch.zeros(a, dtype=torch.long), reduction="none")
    expected = (2 * F.cross_entropy(logits[0, :1].detach(), torch.tensor([2])) + ce[7:13].sum()) / 2
    torch.testing.assert_close(out["loss_cls"], expected)


# -- loss against a naive loop ----------------------------------------------------------------


def _smooth_l1(d: float) -> float:
    d = abs(d)
    return 0.5 * d * d if d < 1.0 else d - 0.5


def _reference_multibox(
    logits,
    deltas,
    matches,
    gt_boxes,
    gt_labels,
    anchors,
    variances,
    ratio,
    n_neg_min,
    alpha,
    mining,
):
    """Per-image (or per-batch) Python loop: CE, sort negatives, budget, smooth-L1."""
    b, a, _ = logits.shape
    ce = torch.zeros(b, a, dtype=torch.float64)
    label = torch.zeros(b, a, dtype=torch.long)
    for i in range(b):
        for j in range(a):
            m = int(matches[i, j])
            label[i, j] = int(gt_labels[i, m]) if m >= 0 else 0
            row = logits[i, j].double()
            ce[i, j] = torch.logsumexp(row, 0) - row[label[i, j]]
    groups = (
        [[(i, j) for j in range(a)] for i in range(b)]
        if mining == "per_image"
        else [[(i, j) for i in range(b) for j in range(a)]]
    )
    cls, loc, total_pos, total_neg = 0.0, 0.0, 0, 0
    for anchors_of_group in groups:
        pos = [(i, j) for i, j in anchors_of_group if matches[i, j] >= 0]
        negs = [(i, j) for i, j in anchors_of_group if matches[i, j] == -1 and ce[i, j] > 0]
        budget = min(max(math.floor(ratio * len(pos)), n_neg_min), len(negs))
        negs.sort(key=lambda ij: -float(ce[ij]))
        cls += sum(float(ce[ij]) for ij in pos) + sum(float(ce[ij]) for ij in negs[:budget])
        total_pos += len(pos)
        total_neg += budget
        for i, j in pos:
            x1, y1, x2, y2 = (float(v) for v in gt_boxes[i, int(matches[i, j])])
            gcx, gcy, gw, gh = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
            acx, acy, aw, ah = (float(v) for v in anchors[j])
            target = [
                (gcx - acx) / (aw * variances[0]),
                (gcy - acy) / (ah * variances[1]),
                math.log(gw / aw) / variances[2],
                math.log(gh / ah) / variances[3],
            ]
            loc += sum(_smooth_l1(float(deltas[i, j, c]) - target[c]) for c in range(4))
    n = max(1, total_pos, total_neg / ratio if ratio > 0 else 0)
    return (cls + alpha * loc) / n, cls / n, loc / n


@pytest.mark.parametrize(
    ("mining", "ratio", "n_neg_min", "alpha"),
    [
        ("per_image", 3.0, 0, 1.0),
        ("per_batch", 3.0, 0, 1.0),
        ("per_image", 2.5, 4, 0.7),
        ("per_batch", 1.0, 20, 2.0),
        ("per_image", 0.5, 20, 1.0),  # negatives / ratio > positives: they set N
        ("per_image", 0.0, 5, 1.0),
    ],
)
def test_multibox_equals_naive_loop(mining, ratio, n_neg_min, alpha):
    b, a, k = 3, 60, C + 1
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(b, a, k, generator=gen, dtype=torch.float64) * 2
    deltas = torch.randn(b, a, 4, generator=gen, dtype=torch.float64) * 2
    gt_boxes, gt_labels, matches = random_targets(b, a, seed=8)
    gt_boxes = gt_boxes.double()
    anchors = random_anchors(a, seed=9).double()
    variances = (0.1, 0.1, 0.2, 0.2)
    out = multibox_loss(
        logits, deltas, matches, gt_boxes, gt_labels, anchors, BoxCoder(variances),
        neg_pos_ratio=ratio, n_neg_min=n_neg_min, alpha=alpha, mining=mining,
    )  # fmt: skip
    ref = _reference_multibox(
        logits,
        deltas,
        matches,
        gt_boxes,
        gt_labels,
        anchors,
        variances,
        ratio,
        n_neg_min,
        alpha,
        mining,
    )
    got = (out["loss"].item(), out["loss_cls"].item(), out["loss_box"].item())
    assert got == pytest.approx(ref, rel=1e-5, abs=1e-5)


def test_ssd_head_loss_is_the_multibox_loss_in_float32():
    head = build("ssd", mining="per_batch", neg_pos_ratio=2.0)
    out = head(features(batch=3))
    a = out["cls_logits"].shape[1]
    gt_boxes, gt_labels, matches = random_targets(3, a, seed=4)
    anchors = random_anchors(a, seed=5)
    got = head.loss(out, matches, gt_boxes, gt_labels, anchors)
    ref = _reference_multibox(
        out["cls_logits"].detach(), out["box_deltas"].detach(), matches, gt_boxes, gt_labels,
        anchors, (0.1, 0.1, 0.2, 0.2), 2.0, 0, 1.0, "per_batch",
    )  # fmt: skip
    assert (got["loss"].item(), got["loss_cls"].item(), got["loss_box"].item()) == pytest.approx(
        ref, rel=1e-5, abs=1e-5
    )


# -- losses of every head: empty images, ignored anchors ---------------------------------------


BOX_TERMS = {
    "ssd": ["loss_box"],
    "ssdlite": ["loss_box"],
    "retina": ["loss_box"],
    "yolo": ["loss_xy", "loss_wh"],
}


def shipped(name: str) -> DetectionHead:
    """A head built with the options of its shipped config, conf/head/<name>.yaml (only
    the layer widths made small)."""
    from pathlib import Path

    from omegaconf import OmegaConf

    path = Path(__file__).parents[1] / "conf" / "head" / f"{name}.yaml"
    spec = OmegaConf.to_container(OmegaConf.load(path))
    assert spec.pop("name") == name
    return build(name, **{**spec, **SMALL.get(name, {})})


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_images_without_objects(name):
    """Under the shipped config an image without objects teaches the background: its
    class logits get a gradient, beside an image with objects and in a batch of empty
    images alone; it adds no localisation loss."""
    torch.manual_seed(0)
    head = shipped(name)
    with torch.no_grad():
        out = head(features())
    a = out["cls_logits"].shape[1]
    anchors = yolo_grid()(SIZES) if name == "yolo" else random_anchors(a)

    def loss_and_grad(matches, gt_boxes, gt_labels):
        logits = out["cls_logits"].detach().requires_grad_(True)
        losses = head.loss({**out, "cls_logits": logits}, matches, gt_boxes, gt_labels, anchors)
        assert all(torch.isfinite(v) for v in losses.values())
        losses["loss"].backward()
        return losses, logits.grad

    for g in (0, 2):  # no gt slot at all, or padding only
        gt_boxes = torch.zeros(2, g, 4)
        gt_labels = torch.zeros(2, g, dtype=torch.long)
        matches = SSDMatcher()(gt_boxes, torch.zeros(2, g, dtype=torch.bool), anchors)
        assert (matches == BACKGROUND).all()
        losses, grad = loss_and_grad(matches, gt_boxes, gt_labels)
        for term in BOX_TERMS[name]:
            assert losses[term] == 0
        assert (grad.abs().sum(dim=(1, 2)) > 0).all()  # every empty image teaches
    # one image with objects, one without
    gt_boxes, gt_labels, matches = random_targets(2, a, seed=1)  # image 1 has one gt
    gt_boxes[1], gt_labels[1] = 0.0, 0
    matches[1] = BACKGROUND
    both, grad = loss_and_grad(matches, gt_boxes, gt_labels)
    assert grad[1].abs().sum() > 0
    first = {k: v[:1] for k, v in out.items()}
    alone = head.loss(first, matches[:1], gt_boxes[:1], gt_labels[:1], anchors)
    for term in BOX_TERMS[name]:  # the empty image adds no localisation loss
        if name == "yolo":  # yolo divides by the batch size
            torch.testing.assert_close(both[term], alone[term] * 0.5)
        else:  # the others by N, which the empty image's negatives may raise
            assert both[term] <= alone[term] * (1 + 1e-6) and (both[term] > 0) == (alone[term] > 0)


@pytest.mark.parametrize("name", ["ssd", "ssdlite"])
def test_shipped_mining_defaults_are_the_losses_defaults(name):
    from ssdlit.heads.losses import MINING, N_NEG_MIN, NEG_POS_RATIO

    criterion = shipped(name).criterion
    assert (criterion.neg_pos_ratio, criterion.n_neg_min, criterion.mining) == (
        NEG_POS_RATIO,
        N_NEG_MIN,
        MINING,
    )
    default = build(name).criterion
    assert (default.neg_pos_ratio, default.n_neg_min, default.mining) == (
        NEG_POS_RATIO,
        N_NEG_MIN,
        MINING,
    )
    assert N_NEG_MIN > 0 and MINING == "per_image"


def test_empty_images_keep_their_hardest_negatives_at_the_scale_of_a_positive():
    """Two empty images under the defaults: each keeps its N_NEG_MIN hardest negatives,
    and the sum is divided by N = 2 * N_NEG_MIN / 3, not by 1."""
    from ssdlit.heads.losses import N_NEG_MIN

    head = shipped("ssd")
    out = head(features())
    a = out["cls_logits"].shape[1]
    matches = torch.full((2, a), BACKGROUND)
    empty = torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.long)
    losses = head.loss(out, matches, *empty, random_anchors(a))
    ce = F.cross_entropy(
        out["cls_logits"].detach().reshape(-1, C + 1), torch.zeros(2 * a, dtype=torch.long),
        reduction="none",
    ).reshape(2, a)  # fmt: skip
    top = ce.topk(N_NEG_MIN, dim=1).values.sum()
    torch.testing.assert_close(losses["loss_cls"], top / (2 * N_NEG_MIN / 3))


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_ignored_anchors_contribute_nothing(name):
    head = build(name)
    with torch.no_grad():
        out = head(features(batch=3))
    a = out["cls_logits"].shape[1]
    gt_boxes, gt_labels, matches = random_targets(3, a, seed=2)
    anchors = random_anchors(a, seed=3)
    assert (matches == IGNORE).sum() > 10
    base = head.loss(out, matches, gt_boxes, gt_labels, anchors)
    ignored = (matches == IGNORE)[..., None]
    g = torch.Generator().manual_seed(0)
    changed = dict(out)
    for key in ("cls_logits", "box_deltas"):
        noise = torch.randn(out[key].shape, generator=g) * 20
        changed[key] = torch.where(ignored, out[key] + noise, out[key])
    again = head.loss(changed, matches, gt_boxes, gt_labels, anchors)
    for key in base:
        torch.testing.assert_close(again[key], base[key], msg=key)
    # while the same change on background anchors does change the classification loss
    background = (matches == BACKGROUND)[..., None]
    changed["cls_logits"] = torch.where(background, out["cls_logits"] + 5.0, out["cls_logits"])
    changed["box_deltas"] = out["box_deltas"]
    cls_key = "loss_obj" if name == "yolo" else "loss_cls"
    if name != "yolo":
        changed["cls_logits"][..., 0] -= 5.0 * background[..., 0]
    assert head.loss(changed, matches, gt_boxes, gt_labels, anchors)[cls_key] != base[cls_key]


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_loss_dict_and_backward(name):
    head = build(name)
    out = head(features())
    a = out["cls_logits"].shape[1]
    gt_boxes, gt_labels, matches = random_targets(2, a, seed=5)
    losses = head.loss(out, matches, gt_boxes, gt_labels, anchors=random_anchors(a))
    expected = {"loss", "loss_cls", *BOX_TERMS[name]} | ({"loss_obj"} if name == "yolo" else set())
    assert set(losses) == expected
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    assert all(p.grad is not None for p in head.parameters() if p.requires_grad)


def test_retina_focal_loss_by_hand():
    head = build("retina")
    a = 4
    logits = torch.tensor([[[2.0, -1.0, 0.5], [0.0, 0.0, 0.0], [-3.0, 1.0, 2.0], [5.0, 5.0, 5.0]]])
    out = {"cls_logits": logits, "box_deltas": torch.zeros(1, a, 4)}
    matches = torch.tensor([[0, BACKGROUND, 1, IGNORE]])
    gt_boxes = torch.tensor([[[0.1, 0.1, 0.3, 0.4], [0.5, 0.5, 0.9, 0.8]]])
    gt_labels = torch.tensor([[2, 3]])
    anchors = convert(gt_boxes[0, [0, 0, 1, 1]], "xyxy", "cxcywh")
    losses = head.loss(out, matches, gt_boxes, gt_labels, anchors)

    def focal(x, t):
        p = 1 / (1 + math.exp(-x))
        pt = p if t else 1 - p
        at = 0.25 if t else 0.75
        return -at * (1 - pt) ** 2 * math.log(pt)

    targets = [[0, 1, 0], [0, 0, 0], [0, 0, 1]]
    expected = (
        sum(focal(float(logits[0, i, c]), targets[i][c]) for i in range(3) for c in range(3)) / 2
    )
    assert losses["loss_cls"].item() == pytest.approx(expected, rel=1e-5)
    assert losses["loss_box"].item() == pytest.approx(0.0, abs=1e-6)  # anchors are the gts


def test_yolo_loss_by_hand():
    head = build("yolo", box_scale=False)
    # one level 2x2 (cell 0.5), one anchor per cell; anchor 3 is cell (1, 1)
    anchors = torch.tensor(
        [
            [0.25, 0.25, 0.2, 0.2],
            [0.75, 0.25, 0.2, 0.2],
            [0.25, 0.75, 0.2, 0.2],
            [0.75, 0.75, 0.2, 0.2],
        ]
    )
    t = torch.tensor([[[0.0, 0.0, 0.0, 0.0]] * 4])
    logits = torch.zeros(1, 4, 1 + C)
    head.bind_anchor_grid(torch.cat((anchors[:, :2], torch.full((4, 2), 0.5)), dim=1))
    out = {"cls_logits": logits, "box_deltas": t}
    gt_boxes = torch.tensor([[[0.6, 0.6, 1.0, 1.0]]])  # centre (0.8, 0.8), 0.4 x 0.4
    gt_labels = torch.tensor([[1]])
    matches = torch.tensor([[BACKGROUND, IGNORE, BACKGROUND, 0]])
    losses = head.loss(out, matches, gt_boxes, gt_labels, anchors)
    ln2 = math.log(2.0)
    assert losses["loss_obj"].item() == pytest.approx(3 * ln2, rel=1e-6)  # 3 anchors at p = 0.5
    assert losses["loss_cls"].item() == pytest.approx(C * ln2, rel=1e-6)
    sx = (0.8 - 0.75) / 0.5 + 0.5  # 0.6
    assert losses["loss_xy"].item() == pytest.approx(2 * (0.5 - sx) ** 2, rel=1e-5)
    assert losses["loss_wh"].item() == pytest.approx(2 * math.log(2.0) ** 2, rel=1e-5)


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_device_agnostic_on_meta_tensors(name):
    """Forward, scores and decoding run on the device of the inputs (meta: any CPU tensor
    created inside would raise), with anchors still on the CPU as a caller may pass them."""
    head = build(name).to("meta")
    feats = [f.to("meta") for f in features()]
    out = head(feats)
    a = out["box_deltas"].shape[1]
    gt_boxes, gt_labels, matches = random_targets(2, a, seed=6)
    anchors = random_anchors(a)
    args = (out, matches.to("meta"), gt_boxes.to("meta"), gt_labels.to("meta"), anchors)
    # every loss reads its gather sizes on the host once: no data on meta
    with pytest.raises((NotImplementedError, RuntimeError), match="meta"):
        head.loss(*args)
    assert head.scores(out).device.type == "meta"
    assert head.decode_boxes(out, anchors).shape == (2, a, 4)


# -- one-image overfit ---------------------------------------------------------------------------


class TinyBackbone(nn.Module):
    """Three stride-2 conv blocks on a 64 x 64 image: levels 16 x 16 and 8 x 8, 32 channels."""

    out_channels = (32, 32)

    def __init__(self) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()
            )

        self.c1, self.c2, self.c3 = block(3, 16), block(16, 32), block(32, 32)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f1 = self.c2(self.c1(x))
        return [f1, self.c3(f1)]


def _overfit_setup(name: str):
    image = (64, 64)
    if name in ("ssd", "ssdlite"):
        gen = SSDAnchorGenerator(
            image_size=image, aspect_ratios=[[1, 2, 0.5]] * 2, scales=[0.2, 0.45, 0.8]
        )
        return gen, SSDMatcher(), {}, 1e-2
    if name == "retina":
        gen = RetinaAnchorGenerator(image_size=image, sizes=(12, 24), strides=(4, 8))
        # GroupNorm towers: without them the N(0, 0.01) towers train slowly under Adam
        return gen, FasterRCNNMatcher(0.5, 0.4), {"channels": 64, "group_norm": 16}, 1e-3
    priors = (((8, 8), (12, 20), (20, 12)), ((24, 24), (40, 32), (32, 48)))
    gen = YoloAnchorGenerator(image_size=image, priors=priors, strides=(4, 8))
    return gen, YOLOv3Matcher(), {"hidden_channels": 32}, 1e-2


def overfit(name: str, steps: int = 60, seed: int = 0) -> list[float]:
    torch.manual_seed(seed)
    gen, matcher, options, lr = _overfit_setup(name)
    backbone = TinyBackbone()
    head = HEADS.build(
        name,
        in_channels=list(backbone.out_channels),
        num_anchors=gen.num_anchors_per_location(),
        num_classes=C,
        **options,
    )
    image = torch.rand(1, 3, 64, 64)
    gt_boxes = torch.tensor([[[0.1, 0.1, 0.4, 0.5], [0.5, 0.4, 0.9, 0.9], [0.6, 0.05, 0.75, 0.3]]])
    gt_labels = torch.tensor([[1, 2, 3]])
    anchors = gen([(16, 16), (8, 8)])
    head.bind_anchor_grid(gen.cells([(16, 16), (8, 8)]))  # as a Detector does
    matches = matcher(gt_boxes, torch.ones(1, 3, dtype=torch.bool), anchors)
    assert (matches >= 0).any()
    params = [*backbone.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=lr)
    history = []
    for _ in range(steps):
        loss = head.loss(head(backbone(image)), matches, gt_boxes, gt_labels, anchors)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    return history


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_one_image_overfit(name):
    history = overfit(name)
    print(f"{name}: loss {history[0]:.4f} -> {history[-1]:.4f}")
    assert all(math.isfinite(v) for v in history)
    assert history[-1] < 0.1 * history[0]


def test_multibox_beta_zero_is_l1_on_the_positives():
    a = 40
    gt_boxes, gt_labels, matches = random_targets(3, a, seed=4)
    anchors = random_anchors(a, seed=4)
    coder = BoxCoder((0.1, 0.1, 0.2, 0.2))
    cls_logits = torch.randn(3, a, C + 1, generator=torch.Generator().manual_seed(1))
    box_deltas = torch.randn(3, a, 4, generator=torch.Generator().manual_seed(2))
    positive = matches >= 0
    _, matched = gather_targets(matches, gt_boxes, gt_labels)
    loc = encode_targets(coder, matched, anchors, positive)[positive]
    l1 = (box_deltas[positive] - loc).abs().sum() / positive.sum()
    out = multibox_loss(
        cls_logits, box_deltas, matches, gt_boxes, gt_labels, anchors, coder, beta=0.0
    )
    assert out["loss_box"].item() == pytest.approx(l1.item(), rel=1e-5)
    smooth = multibox_loss(cls_logits, box_deltas, matches, gt_boxes, gt_labels, anchors, coder)
    assert smooth["loss_box"] < out["loss_box"]  # beta 1 is quadratic below 1: smaller
    with pytest.raises(ValueError, match="beta"):
        SSDHead(in_channels=[8], num_anchors=[2], num_classes=C, beta=-1.0)


@pytest.mark.parametrize("box_loss", ["smooth_l1", "giou", "diou", "ciou", "smooth_l1+giou"])
def test_multibox_loss_never_materialises_dense_box_targets(box_loss):
    """Targets for the positives only: no op of the loss makes a new tensor of B * A * 4
    numbers; backward only makes the gradient of ``box_deltas`` itself. The IoU box
    losses decode the positives' deltas only ([P, 4])."""
    from torch.utils._python_dispatch import TorchDispatchMode

    b, a = 4, 600
    gt_boxes, gt_labels, matches = random_targets(b, a, seed=2)
    anchors = random_anchors(a, seed=2)
    logits = torch.randn(b, a, 7, requires_grad=True)  # K != 4: only box tensors are B * A * 4
    deltas = torch.randn(b, a, 4, requires_grad=True)
    made: list[tuple[str, tuple]] = []
    inputs = {t.untyped_storage().data_ptr() for t in (deltas, logits)}

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                new = isinstance(t, torch.Tensor) and t.numel() == b * a * 4
                if new and t.untyped_storage().data_ptr() not in inputs:
                    made.append((str(func), tuple(t.shape)))
            return out

    with Record():
        loss = multibox_loss(
            logits, deltas, matches, gt_boxes, gt_labels, anchors, BoxCoder(), box_loss=box_loss
        )
    assert made == []
    made.clear()
    with Record():
        loss["loss"].backward()
    # backward: only the gradient of box_deltas (zeros, the positives' rows written)
    ops = {op.split(".")[1] for op, _ in made}
    assert ops <= {"new_zeros", "zeros", "index_copy_", "view", "detach"}, made
    assert torch.isfinite(deltas.grad).all()
    positive = (matches >= 0)[..., None]
    assert (deltas.grad.abs() > 0).eq(positive & (deltas.grad.abs() > 0)).all()
    assert (deltas.grad[~positive.expand_as(deltas.grad)] == 0).all()


def test_background_loss_is_the_cross_entropy_of_class_zero():
    logits = torch.randn(3, 50, C + 1, dtype=torch.bfloat16)
    got = background_loss(logits)
    expected = F.cross_entropy(
        logits.float().reshape(-1, C + 1), torch.zeros(150, dtype=torch.long), reduction="none"
    )
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected.view(3, 50))


@pytest.mark.parametrize("scale", [1.0, 60.0, 200.0])
def test_background_loss_holds_for_extreme_logits(scale):
    """Logits beyond exp's float32 range (|l| > 88) take the shifted computation."""
    g = torch.Generator().manual_seed(int(scale))
    logits = torch.randn(2, 40, C + 1, generator=g) * scale
    logits[0, :5] = -150.0  # every class far below zero: exp underflows
    logits[1, :5, 2] = 120.0  # exp overflows
    got = background_loss(logits)
    expected = F.cross_entropy(
        logits.reshape(-1, C + 1), torch.zeros(80, dtype=torch.long), reduction="none"
    ).view(2, 40)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    # the path of other devices (and of the CPU's out-of-range blocks) alone
    from ssdlit.heads.losses import _shifted_background_loss

    alone = _shifted_background_loss(logits.reshape(-1, C + 1), torch.ones(C + 1, 1))
    torch.testing.assert_close(alone.view(2, 40), expected, rtol=1e-5, atol=1e-4)
