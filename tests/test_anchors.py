import math

import numpy as np
import pytest
import torch

from ssdlit.anchors import (
    D2LAnchorGenerator,
    RetinaAnchorGenerator,
    SSDAnchorGenerator,
    SSDCaffeAnchorGenerator,
    YoloAnchorGenerator,
)
from ssdlit.registry import ANCHORS
from tests.ssd_keras_reference import ssd_keras_anchors

SSD300_MAPS = [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]
SSD300_SCALES = [0.1, 0.2, 0.37, 0.54, 0.71, 0.88, 1.05]
SSD300_RATIOS = [[1, 2, 0.5]] + [[1, 2, 0.5, 3, 1 / 3]] * 3 + [[1, 2, 0.5]] * 2
SSD300_STEPS = [8, 16, 32, 64, 100, 300]
SSD512_MAPS = [(64, 64), (32, 32), (16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]


def test_ssd300_count_and_first_level():
    gen = SSDAnchorGenerator(
        image_size=(300, 300),
        scales=SSD300_SCALES,
        aspect_ratios=SSD300_RATIOS,
        two_boxes_for_ar1=True,
        steps=SSD300_STEPS,
        offsets=[0.5] * 6,
        clip=False,
    )
    anchors = gen(SSD300_MAPS, dtype=torch.float64)
    assert anchors.shape == (8732, 4)
    assert gen(SSD300_MAPS).dtype == torch.float32
    per_location = gen.num_anchors_per_location()
    assert per_location == [4, 6, 6, 6, 4, 4]
    # Count the anchors of each level from the generator's output: level k's block holds
    # h * w cells of n boxes each, every box of a cell centred at ((x, y) + 0.5) * step.
    counts = [n * h * w for n, (h, w) in zip(per_location, SSD300_MAPS, strict=True)]
    assert counts == [5776, 2166, 600, 150, 36, 4]
    blocks = anchors.split(counts)
    for level, (block, (h, w), n) in enumerate(zip(blocks, SSD300_MAPS, per_location, strict=True)):
        cells = block.reshape(h, w, n, 4)
        step = SSD300_STEPS[level] / 300
        xs = (torch.arange(w, dtype=torch.float64) + 0.5) * step
        ys = (torch.arange(h, dtype=torch.float64) + 0.5) * step
        torch.testing.assert_close(cells[..., 0], xs[None, :, None].expand(h, w, n))
        torch.testing.assert_close(cells[..., 1], ys[:, None, None].expand(h, w, n))
        # The first box of every cell is the ratio-1 box of the level's scale.
        torch.testing.assert_close(
            cells[:, :, 0, 2:], torch.full((h, w, 2), SSD300_SCALES[level], dtype=torch.float64)
        )


def test_ssd512_count():
    anchors = SSDAnchorGenerator.ssd512()(SSD512_MAPS)
    assert anchors.shape == (24564, 4)


def test_ssd300_hand_checked_values():
    anchors = SSDAnchorGenerator.ssd300()(SSD300_MAPS).double()
    # Cell (0, 0) of level 0: centre (4, 4) px; scale 0.1 -> 30 px; extra sqrt(.1*.2)*300.
    c = 4 / 300
    s, big = 0.1, math.sqrt(0.1 * 0.2)
    expected = [
        [c, c, s, s],
        [c, c, big, big],
        [c, c, s * math.sqrt(2), s / math.sqrt(2)],
        [c, c, s / math.sqrt(2), s * math.sqrt(2)],
    ]
    torch.testing.assert_close(
        anchors[:4], torch.tensor(expected, dtype=torch.float64), atol=1e-7, rtol=0
    )
    # Next cell to the right: x moves by one step (8 px), y stays (order: level, y, x, box).
    torch.testing.assert_close(
        anchors[4, :2], torch.tensor([12 / 300, 4 / 300], dtype=torch.float64)
    )
    # First anchor of row 1: y moves by one step.
    torch.testing.assert_close(
        anchors[38 * 4, :2], torch.tensor([4 / 300, 12 / 300], dtype=torch.float64)
    )
    # The single cell of the last level: centre (150, 150), scale 0.88, extra sqrt(.88 * 1.05).
    last = anchors[-4:]
    torch.testing.assert_close(last[:, :2], torch.full((4, 2), 0.5, dtype=torch.float64))
    torch.testing.assert_close(
        last[1, 2], torch.tensor(math.sqrt(0.88 * 1.05), dtype=torch.float64)
    )


@pytest.mark.parametrize(
    "image_size, maps, ratios, scales, steps, offsets, clip, two",
    [
        ((300, 300), SSD300_MAPS, SSD300_RATIOS, SSD300_SCALES, SSD300_STEPS, None, False, True),
        ((300, 300), SSD300_MAPS, SSD300_RATIOS, SSD300_SCALES, SSD300_STEPS, None, True, True),
        (
            (300, 480),
            [(37, 60), (18, 30), (9, 15), (4, 8)],
            [[1, 2, 0.5]] * 4,
            [0.08, 0.16, 0.32, 0.64, 0.96],
            None,
            None,
            False,
            True,
        ),
        (
            (300, 480),
            [(37, 60), (18, 30), (9, 15), (4, 8)],
            [[0.5, 1.0, 2.0, 3.0]] * 4,
            [0.08, 0.16, 0.32, 0.64, 0.96],
            [(8, 8), (16, 16), (33, 32), (75, 60)],
            [(0.5, 0.4), 0.5, 0.25, (0.0, 1.0)],
            True,
            False,
        ),
        (
            (240, 320),
            [(30, 40), (15, 20), (8, 10), (4, 5)],
            [[1.0, 2.0, 0.5]] * 4,
            [0.08, 0.16, 0.32, 0.64, 0.96],
            [8, 16, 32, 64],
            None,
            False,
            True,
        ),
    ],
)
def test_agrees_with_ssd_keras_loop(image_size, maps, ratios, scales, steps, offsets, clip, two):
    ours = SSDAnchorGenerator(
        image_size=image_size,
        scales=scales,
        aspect_ratios=ratios,
        two_boxes_for_ar1=two,
        steps=steps,
        offsets=offsets,
        clip=clip,
    )(maps, dtype=torch.float64)
    ref = ssd_keras_anchors(*image_size, maps, ratios, scales, two, steps, offsets, clip)
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-9, rtol=0)


def test_min_max_scale_is_linspace_and_flat_ratios():
    a = SSDAnchorGenerator(
        image_size=(300, 300),
        scales=None,
        min_scale=0.2,
        max_scale=0.9,
        aspect_ratios=[1, 2, 0.5],
        num_levels=4,
    )
    assert a.scales == pytest.approx([0.2, 0.375, 0.55, 0.725, 0.9])
    assert a.num_anchors_per_location() == [4, 4, 4, 4]
    b = SSDAnchorGenerator(
        image_size=(300, 300), scales=[0.1, 0.2, 0.3], aspect_ratios=[1, 2], two_boxes_for_ar1=False
    )
    assert b.num_anchors_per_location() == [2, 2]


def test_device_dtype_and_registry():
    # The registry's default "ssd" and the ssd300() preset against ssd_keras's loop with
    # SSD300's parameters written out here.
    expected = ssd_keras_anchors(
        300, 300, SSD300_MAPS, SSD300_RATIOS, SSD300_SCALES, True, SSD300_STEPS
    )
    gen = ANCHORS.build("ssd", image_size=(300, 300), steps=SSD300_STEPS)
    a = gen(SSD300_MAPS, device="cpu", dtype=torch.float64)
    assert a.dtype == torch.float64 and a.device.type == "cpu"
    np.testing.assert_allclose(a.numpy(), expected, atol=1e-12, rtol=0)
    preset = SSDAnchorGenerator.ssd300()(SSD300_MAPS)
    assert preset.dtype == torch.float32
    np.testing.assert_allclose(preset.numpy(), expected, atol=1e-6, rtol=0)


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="one more entry than levels"):
        SSDAnchorGenerator(scales=[0.1, 0.2], aspect_ratios=[[1], [1]])
    with pytest.raises(ValueError, match="levels"):
        SSDAnchorGenerator.ssd300()([(38, 38)])
    with pytest.raises(ValueError, match="steps"):
        SSDAnchorGenerator(steps=[8, 16])(SSD300_MAPS)
    with pytest.raises(ValueError, match="clip"):
        SSDAnchorGenerator(clip="yes")


def test_unit_clip_keeps_boxes_inside():
    a = SSDAnchorGenerator.ssd300(clip="unit")(SSD300_MAPS)
    xyxy = torch.cat([a[:, :2] - a[:, 2:] / 2, a[:, :2] + a[:, 2:] / 2], 1)
    assert xyxy.min() >= -1e-6 and xyxy.max() <= 1 + 1e-6


def test_caffe_sizes_equal_scale_form():
    # Caffe SSD300 sizes 30..315 px are scales 0.1..1.05 of a 300 px side.
    sizes = [(30, 60), (60, 111), (111, 162), (162, 213), (213, 264), (264, 315)]
    caffe = SSDCaffeAnchorGenerator(sizes=sizes, steps=SSD300_STEPS)(SSD300_MAPS)
    scale = SSDAnchorGenerator(scales=[0.1, 0.2, 0.37, 0.54, 0.71, 0.88, 1.05], steps=SSD300_STEPS)(
        SSD300_MAPS
    )
    torch.testing.assert_close(caffe, scale, atol=1e-6, rtol=0)
    # SSD-Tensorflow's default sizes also give 8732 anchors; the first box is 21 px.
    tf = SSDCaffeAnchorGenerator()(SSD300_MAPS)
    assert tf.shape == (8732, 4)
    assert tf[0, 2].item() == pytest.approx(21 / 300) and tf[1, 2].item() == pytest.approx(
        math.sqrt(21 * 45) / 300
    )
    assert SSDCaffeAnchorGenerator(
        sizes=[(30,)], aspect_ratios=[[1, 2]]
    ).num_anchors_per_location() == [2]


def test_retina_anchors():
    gen = RetinaAnchorGenerator(image_size=(512, 512))
    maps = [(64, 64), (32, 32), (16, 16), (8, 8), (4, 4)]
    a = gen(maps)
    assert gen.num_anchors_per_location() == [9] * 5
    assert a.shape == (9 * sum(h * w for h, w in maps), 4)
    # First cell: ratio 0.5 with scales 1, 2^(1/3), 2^(2/3) of 32 px, centred at (4, 4).
    w0 = 32 * math.sqrt(0.5) / 512
    assert a[0].tolist() == pytest.approx([4 / 512, 4 / 512, w0, 32 / math.sqrt(0.5) / 512])
    assert a[1, 2].item() == pytest.approx(w0 * 2 ** (1 / 3))
    assert a[4, 2].item() == pytest.approx(2 ** (1 / 3) * 32 / 512)  # ratio 1, scale 2^(1/3)
    # Last level: stride 128, size 512.
    assert a[-9:, 2].max().item() == pytest.approx(512 * 2 ** (2 / 3) * math.sqrt(2) / 512)


def test_yolo_anchors():
    gen = YoloAnchorGenerator(image_size=(416, 416))
    a = gen([(52, 52), (26, 26), (13, 13)])
    assert a.shape == (3 * (52 * 52 + 26 * 26 + 13 * 13), 4) == (10647, 4)
    assert a[0].tolist() == pytest.approx([4 / 416, 4 / 416, 10 / 416, 13 / 416])
    assert a[-1].tolist() == pytest.approx(
        [(12.5 * 32) / 416, (12.5 * 32) / 416, 373 / 416, 326 / 416]
    )
    rescaled = YoloAnchorGenerator(image_size=(608, 608), prior_image_size=(416, 416))
    assert rescaled.priors[0][0] == pytest.approx((10 * 608 / 416, 13 * 608 / 416))
    # Every anchor of one prior has exactly the same size (the YOLO matcher relies on it).
    assert len(torch.unique(a[:, 2:], dim=0)) == 9


# SSD-Tensorflow's SSD300 (ssd_vgg_300.py): the ratio lists omit ratio 1 and the extra box.
SSD_TF_SIZES = [
    (21.0, 45.0),
    (45.0, 99.0),
    (99.0, 153.0),
    (153.0, 207.0),
    (207.0, 261.0),
    (261.0, 315.0),
]
SSD_TF_RATIOS = [
    [2, 0.5],
    [2, 0.5, 3, 1.0 / 3],
    [2, 0.5, 3, 1.0 / 3],
    [2, 0.5, 3, 1.0 / 3],
    [2, 0.5],
    [2, 0.5],
]


def ssd_tf_anchors(img_shape, feat_shapes, sizes, ratios, steps, offset=0.5):
    """SSD-Tensorflow's ``ssd_anchor_one_layer`` per layer, as loops, to cxcywh rows.

    Per location: ``len(sizes) + len(ratios)`` boxes: (sizes[0], ratio 1); with a second
    size the square of side sqrt(sizes[0] * sizes[1]); then one box per listed ratio r of
    width sizes[0] * sqrt(r) and height sizes[0] / sqrt(r). Centres (index + offset) * step.
    """
    img_h, img_w = img_shape
    rows = []
    for (fh, fw), size, ratio, step in zip(feat_shapes, sizes, ratios, steps, strict=True):
        hs = [size[0] / img_h]
        ws = [size[0] / img_w]
        if len(size) > 1:
            hs.append(math.sqrt(size[0] * size[1]) / img_h)
            ws.append(math.sqrt(size[0] * size[1]) / img_w)
        for r in ratio:
            hs.append(size[0] / img_h / math.sqrt(r))
            ws.append(size[0] / img_w * math.sqrt(r))
        for y in range(fh):
            for x in range(fw):
                cy = (y + offset) * step / img_h
                cx = (x + offset) * step / img_w
                for h, w in zip(hs, ws, strict=True):
                    rows.append([cx, cy, w, h])
    return np.array(rows)


def test_ssd_caffe_takes_ssd_tensorflow_ratio_lists_with_implicit_ar1():
    gen = ANCHORS.build(
        "ssd_caffe",
        image_size=(300, 300),
        sizes=SSD_TF_SIZES,
        aspect_ratios=SSD_TF_RATIOS,
        implicit_ar1=True,
        steps=SSD300_STEPS,
    )
    assert gen.num_anchors_per_location() == [4, 6, 6, 6, 4, 4]
    ours = gen(SSD300_MAPS, dtype=torch.float64)
    assert ours.shape == (8732, 4)
    ref = ssd_tf_anchors((300, 300), SSD300_MAPS, SSD_TF_SIZES, SSD_TF_RATIOS, SSD300_STEPS)
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-12, rtol=0)
    # The explicit convention with ratio 1 listed gives the same anchors.
    explicit = SSDCaffeAnchorGenerator(sizes=SSD_TF_SIZES, aspect_ratios=SSD300_RATIOS)
    torch.testing.assert_close(explicit(SSD300_MAPS, dtype=torch.float64), ours)
    # A rectangular input, levels without a second size (no extra square).
    sizes = [(20.0, 40.0), (40.0,), (80.0, 120.0)]
    ratios = [[2, 0.5], [3.0], [0.5, 2, 1 / 3]]
    maps, steps = [(12, 20), (6, 10), (3, 5)], [8, 16, 32]
    gen = SSDCaffeAnchorGenerator(
        image_size=(96, 160), sizes=sizes, aspect_ratios=ratios, implicit_ar1=True, steps=steps
    )
    assert gen.num_anchors_per_location() == [4, 2, 5]
    ref = ssd_tf_anchors((96, 160), maps, sizes, ratios, steps)
    np.testing.assert_allclose(gen(maps, dtype=torch.float64).numpy(), ref, atol=1e-12, rtol=0)


def test_ssd_caffe_refuses_ratio_lists_it_would_count_differently():
    # SSD-Tensorflow's lists without the option: a clear error, never 4852 anchors.
    with pytest.raises(ValueError, match="implicit_ar1"):
        SSDCaffeAnchorGenerator(sizes=SSD_TF_SIZES, aspect_ratios=SSD_TF_RATIOS)
    with pytest.raises(ValueError, match="implicit_ar1"):
        ANCHORS.build("ssd_caffe", aspect_ratios=[2.0, 0.5])
    # With the option, a listed 1 would be a second ratio-1 box: refused as well.
    with pytest.raises(ValueError, match="ratio 1"):
        SSDCaffeAnchorGenerator(aspect_ratios=SSD300_RATIOS, implicit_ar1=True)


def d2l_multibox_prior(fh, fw, sizes, ratios):
    """d2l's ``multibox_prior`` on an ``fh x fw`` feature map, as loops: xyxy rows.

    ``len(sizes) + len(ratios) - 1`` boxes per pixel: (s_i, r_1) for every size, then
    (s_1, r_j) for j > 1; width ``s * sqrt(r) * fh / fw``, height ``s / sqrt(r)``;
    centres ((x + 0.5) / fw, (y + 0.5) / fh).
    """
    shapes = [(s, ratios[0]) for s in sizes] + [(sizes[0], r) for r in ratios[1:]]
    rows = []
    for y in range(fh):
        for x in range(fw):
            cx, cy = (x + 0.5) / fw, (y + 0.5) / fh
            for s, r in shapes:
                w = s * math.sqrt(r) * fh / fw
                h = s / math.sqrt(r)
                rows.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    return np.array(rows)


D2L_SIZES = [[0.2, 0.272], [0.37, 0.447], [0.54, 0.619], [0.71, 0.79], [0.88, 0.961]]
D2L_RATIOS = [[1, 2, 0.5]] * 5


@pytest.mark.parametrize(
    "image_size, maps, sizes, ratios",
    [
        # d2l's TinySSD: 256x256 input, 32/16/8/4/1 maps.
        ((256, 256), [(32, 32), (16, 16), (8, 8), (4, 4), (1, 1)], D2L_SIZES, D2L_RATIOS),
        # Rectangular maps (d2l's factor fh / fw), uneven sizes/ratios per level, and maps
        # that are not proportional to the input (the factor is the feature map's).
        (
            (60, 100),
            [(6, 10), (3, 5), (2, 3)],
            [[0.1], [0.25, 0.3, 0.4], [0.5, 0.75]],
            [[1.0, 2.0, 0.5, 3.0], [2.0, 1.0], [0.5]],
        ),
    ],
)
def test_d2l_equals_multibox_prior_loop(image_size, maps, sizes, ratios):
    gen = ANCHORS.build("d2l", image_size=image_size, sizes=sizes, ratios=ratios)
    assert isinstance(gen, D2LAnchorGenerator) and gen.num_levels == len(maps)
    assert gen.num_anchors_per_location() == [
        len(s) + len(r) - 1 for s, r in zip(sizes, ratios, strict=True)
    ]
    ours = gen(maps, dtype=torch.float64)
    ref = np.concatenate(
        [
            d2l_multibox_prior(fh, fw, s, r)
            for (fh, fw), s, r in zip(maps, sizes, ratios, strict=True)
        ]
    )
    assert ours.shape == (len(ref), 4)
    xyxy = torch.cat([ours[:, :2] - ours[:, 2:] / 2, ours[:, :2] + ours[:, 2:] / 2], 1)
    np.testing.assert_allclose(xyxy.numpy(), ref, atol=1e-12, rtol=0)
    assert gen(maps).dtype == torch.float32


def test_d2l_flat_ratios_and_bad_configs():
    a = D2LAnchorGenerator(image_size=(64, 64), sizes=[[0.2, 0.3], [0.5]], ratios=[1, 2, 0.5])
    assert a.ratios == [[1.0, 2.0, 0.5], [1.0, 2.0, 0.5]]
    assert a.num_anchors_per_location() == [4, 3]
    # r = 1 is square in pixels on a map proportional to the input: s * H by s * H.
    square = a([(8, 16), (4, 8)], dtype=torch.float64)[0]
    assert square[2:].tolist() == pytest.approx([0.2 * 8 / 16, 0.2])
    with pytest.raises(ValueError, match="one entry per level"):
        D2LAnchorGenerator(image_size=(64, 64), sizes=[[0.2], [0.4]], ratios=[[1.0]])
    with pytest.raises(ValueError, match="positive"):
        D2LAnchorGenerator(image_size=(64, 64), sizes=[[0.0]], ratios=[[1.0]])
    with pytest.raises(ValueError, match="levels"):
        a([(8, 8)])
