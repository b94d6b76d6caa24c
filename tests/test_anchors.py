import math

import numpy as np
import pytest
import torch

from ssdlit.anchors import (
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
    anchors = gen(SSD300_MAPS)
    assert anchors.shape == (8732, 4)
    assert anchors.dtype == torch.float32
    assert gen.num_anchors_per_location() == [4, 6, 6, 6, 4, 4]
    assert 4 * 38 * 38 == 5776


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
    gen = ANCHORS.build("ssd", image_size=(300, 300), steps=SSD300_STEPS)
    a = gen(SSD300_MAPS, device="cpu", dtype=torch.float64)
    assert a.dtype == torch.float64 and a.device.type == "cpu"
    assert torch.equal(a.float(), SSDAnchorGenerator.ssd300()(SSD300_MAPS))


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
