"""Augmentation: pixels and boxes stay together; the SSD crop, zoom-out and photometric
chain do what the paper's code does; pipelines are reproducible."""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import pytest

from ssdlit.datamodules.transforms import (
    SSD_MEAN_RGB,
    Letterbox,
    MinIoURandomCrop,
    SSDPhotometricDistort,
    ZoomOut,
    apply_transform,
    build_transforms,
    letterbox_geometry,
    make_compose,
    sample_min_iou_crop,
    ssd_photometric_distort,
    transform_from_spec,
)
from ssdlit.datamodules.transforms.geometric import box_iou_np, centres_inside

OUT_HW = (80, 96)  # network input (H, W), deliberately not square


def scene(rng: np.random.Generator, h: int = 96, w: int = 128, k: int = 3):
    """A plain image with ``k`` non-overlapping filled rectangles, one mask per rectangle.

    Returns image uint8 [h, w, 3], boxes float32 [k, 4] xyxy pixels, masks uint8 [k, h, w].
    """
    img = np.full((h, w, 3), 60, dtype=np.uint8)
    masks = np.zeros((k, h, w), dtype=np.uint8)
    boxes = []
    cols = w // k
    for i in range(k):  # one vertical band per rectangle: no overlaps
        bw = int(rng.integers(8, cols - 1))
        bh = int(rng.integers(8, h - 2))
        x1 = i * cols + int(rng.integers(0, cols - bw))
        y1 = int(rng.integers(0, h - bh))
        img[y1 : y1 + bh, x1 : x1 + bw] = (200, 30 + 60 * i, 90)
        masks[i, y1 : y1 + bh, x1 : x1 + bw] = 255
        boxes.append([x1, y1, x1 + bw, y1 + bh])
    return img, np.asarray(boxes, dtype=np.float32), masks


def mask_box(mask: np.ndarray) -> np.ndarray | None:
    """xyxy (continuous pixel edges) of the nonzero pixels of ``mask``, or None."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)


def run_with_masks(compose: A.Compose, img, boxes, masks):
    n = len(boxes)
    rows = np.concatenate([boxes, np.arange(n, dtype=np.float32)[:, None]], axis=1)
    out = compose(image=img, bboxes=rows, masks=masks)
    kept = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 5)
    return out, kept[:, :4], kept[:, 4].astype(int)


PIPELINES = [
    ("ssd", {}),
    ("ssd", {"photometric": False, "zoom_out_p": 1.0}),
    ("light", {}),
    ("val", {}),
    ("val", {"letterbox": True}),
    ("val", {"letterbox": True, "letterbox_center": False}),
]


@pytest.mark.parametrize(("name", "options"), PIPELINES)
def test_boxes_stay_on_their_pixels(name, options):
    """Over many seeds, every kept box matches its rectangle's mask within 1 px."""
    checked = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        img, boxes, masks = scene(rng)
        compose = build_transforms(name, OUT_HW, seed=seed, **options)
        out, kept, idx = run_with_masks(compose, img, boxes, masks)
        assert out["image"].shape == (*OUT_HW, 3)
        assert out["image"].dtype == np.uint8
        assert np.all(kept >= 0) and np.all(kept[:, [0, 2]] <= OUT_HW[1])
        assert np.all(kept[:, [1, 3]] <= OUT_HW[0])
        for box, i in zip(kept, idx, strict=True):
            found = mask_box(out["masks"][i])
            if found is None:  # a sliver that nearest-neighbour resizing lost
                assert min(box[2] - box[0], box[3] - box[1]) < 2.0
                continue
            np.testing.assert_allclose(box, found, atol=1.0)
            checked += 1
        if name == "val":  # nothing is ever dropped by the evaluation pipeline
            assert sorted(idx) == list(range(len(boxes)))
    assert checked > 40


def test_ssd_rectangle_colour_matches_box_without_photometric():
    """Find the rectangle by its colour (no mask) after zoom-out, crop, flip and resize."""
    checked = 0
    for seed in range(20):
        rng = np.random.default_rng(100 + seed)
        img, boxes, _ = scene(rng, k=1)
        compose = build_transforms("ssd", OUT_HW, seed=seed, photometric=False)
        out = apply_transform(compose, img, boxes, np.array([1]), np.array([False]))
        if len(out.boxes) == 0:
            continue
        # the rectangle's colour, away from blended edges: (200, 30, 90) vs 60/mean grey
        red = out.image[:, :, 0].astype(int) >= 130
        ys, xs = np.nonzero(red)
        if len(xs) == 0:
            continue
        found = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)
        np.testing.assert_allclose(out.boxes[0], found, atol=1.0)
        checked += 1
    assert checked >= 10


# -- min-IoU crop -------------------------------------------------------------------------


def test_crop_drops_boxes_with_centre_outside_and_clips_the_rest():
    crop = MinIoURandomCrop()
    h, w = 100, 200
    boxes_px = np.array(
        [
            [10, 10, 30, 30],  # centre (20, 20): outside the patch -> dropped
            [40, 40, 80, 90],  # centre (60, 65): inside, sticks out at the bottom -> clipped
            [55, 30, 65, 45],  # entirely inside -> shifted only
            [95, 20, 140, 60],  # centre (117.5, 40): outside on the right -> dropped
        ],
        dtype=np.float64,
    )
    extra = np.array([[7], [8], [9], [10]], dtype=np.float64)  # a label column rides along
    norm = np.concatenate([boxes_px / [w, h, w, h], extra], axis=1)
    coords = (50, 25, 100, 75)  # x0, y0, x1, y1
    out = crop.apply_to_bboxes(norm, crop_coords=coords, shape=(h, w, 3))
    assert out.shape == (2, 5)
    np.testing.assert_array_equal(out[:, 4], [8, 9])
    got = out[:, :4] * [50, 50, 50, 50]
    np.testing.assert_allclose(got, [[0, 15, 30, 50], [5, 5, 15, 20]], atol=1e-4)


def test_crop_image_and_mask_follow_crop_coords():
    crop = MinIoURandomCrop()
    img = np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3)
    out = crop.apply(img, crop_coords=(5, 2, 17, 11))
    np.testing.assert_array_equal(out, img[2:11, 5:17])


def test_sampled_crop_respects_min_iou_with_a_kept_box():
    rng = np.random.default_rng(0)
    successes = 0
    for _ in range(300):
        h, w = int(rng.integers(40, 200)), int(rng.integers(40, 200))
        n = int(rng.integers(1, 5))
        xy = rng.uniform(0, 0.4, size=(n, 2)) * [w, h]
        wh = rng.uniform(0.1, 0.6, size=(n, 2)) * [w, h]
        boxes = np.concatenate([xy, xy + wh], axis=1)
        min_iou = float(rng.choice([0.0, 0.1, 0.3, 0.5, 0.7, 0.9]))
        coords = sample_min_iou_crop(boxes, (h, w), min_iou, rng)
        if coords is None:
            continue
        successes += 1
        x0, y0, x1, y1 = coords
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        patch = np.array([coords], dtype=np.float64)
        kept = centres_inside(patch, boxes)[0]
        assert kept.any()
        assert box_iou_np(patch, boxes[kept]).max() >= min_iou
        sw, sh = (x1 - x0) / w, (y1 - y0) / h
        assert 0.3 - 0.02 <= np.sqrt(sw * sh) <= 1.0 + 1e-9  # scale ~ U(0.3, 1)
    assert successes > 150


def test_crop_returns_original_when_no_trial_succeeds():
    img = np.zeros((100, 100, 3), dtype=np.uint8)
    tiny = np.array([[50, 50, 52, 52, 0]], dtype=np.float32)  # IoU with any patch << 0.9
    compose = make_compose([MinIoURandomCrop(min_ious=(0.9,))], seed=0)
    for _ in range(5):
        out = compose(image=img, bboxes=tiny)
        assert out["image"].shape == (100, 100, 3)
        np.testing.assert_allclose(out["bboxes"], tiny, atol=1e-4)
    assert sample_min_iou_crop(tiny[:, :4], (100, 100), 0.9, np.random.default_rng(0)) is None


def test_crop_in_pipeline_keeps_exactly_centre_inside_boxes():
    """Through a Compose: kept rows == boxes whose centre is inside the sampled patch."""
    for seed in range(30):
        rng = np.random.default_rng(seed)
        img, boxes, _ = scene(rng)
        compose = A.Compose(
            [MinIoURandomCrop()],
            bbox_params=A.BboxParams(format="pascal_voc"),
            seed=seed,
            save_applied_params=True,
        )
        rows = np.concatenate([boxes, np.arange(3, dtype=np.float32)[:, None]], axis=1)
        out = compose(image=img, bboxes=rows)
        params = dict(out["applied_transforms"])["MinIoURandomCrop"]
        x0, y0, x1, y1 = params["crop_coords"]
        inside = centres_inside(np.array([[x0, y0, x1, y1]], dtype=np.float64), boxes)[0]
        kept = np.asarray(out["bboxes"]).reshape(-1, 5)
        assert sorted(kept[:, 4].astype(int)) == list(np.flatnonzero(inside))
        expected = boxes[inside] - [x0, y0, x0, y0]
        expected = np.clip(expected, 0, [x1 - x0, y1 - y0, x1 - x0, y1 - y0])
        np.testing.assert_allclose(kept[np.argsort(kept[:, 4]), :4], expected, atol=1e-3)
        if params["min_iou"] is not None and (x0, y0, x1, y1) != (0, 0, 128, 96):
            ious = box_iou_np(np.array([[x0, y0, x1, y1]]), boxes[inside])
            assert ious.max() >= params["min_iou"]


# -- zoom-out -----------------------------------------------------------------------------


def test_zoom_out_canvas_is_mean_colour_and_image_is_intact():
    img = np.full((30, 40, 3), (5, 250, 7), dtype=np.uint8)
    boxes = np.array([[0, 0, 40, 30, 0]], dtype=np.float32)  # the whole image
    compose = make_compose([ZoomOut(max_scale=4.0, p=1.0)], seed=3)
    sizes = set()
    for _ in range(20):
        out = compose(image=img, bboxes=boxes)
        canvas = out["image"]
        ch, cw = canvas.shape[:2]
        sizes.add((ch, cw))
        assert 30 <= ch <= 120 and 40 <= cw <= 160
        x1, y1, x2, y2 = np.rint(out["bboxes"][0, :4]).astype(int)
        assert (x2 - x1, y2 - y1) == (40, 30)
        np.testing.assert_array_equal(canvas[y1:y2, x1:x2], img)
        outside = np.ones((ch, cw), dtype=bool)
        outside[y1:y2, x1:x2] = False
        np.testing.assert_array_equal(
            canvas[outside], np.broadcast_to(SSD_MEAN_RGB, (outside.sum(), 3))
        )
    assert len(sizes) > 5


def test_zoom_out_mask_fill_and_custom_fill():
    t = ZoomOut(max_scale=2.0, fill=(1, 2, 3), fill_mask=0, p=1.0)
    img = np.full((10, 10, 3), 9, dtype=np.uint8)
    out = t.apply(img, canvas_hw=(20, 20), top=5, left=3)
    assert tuple(out[0, 0]) == (1, 2, 3)
    mask = np.full((10, 10), 255, dtype=np.uint8)
    m = t.apply_to_mask(mask, canvas_hw=(20, 20), top=5, left=3)
    assert m[0, 0] == 0 and m[5, 3] == 255 and m.sum() == 255 * 100


# -- letterbox ----------------------------------------------------------------------------


@pytest.mark.parametrize("center", [True, False])
def test_letterbox_geometry_and_padding(center):
    img = np.full((50, 100, 3), 200, dtype=np.uint8)
    t = Letterbox(80, 96, center=center)
    g = t.geometry((50, 100))
    assert (g.new_w, g.new_h) == (96, 48)
    assert (g.pad_x, g.pad_y) == ((0, 16) if center else (0, 0))
    out = t.apply(img, geometry=g)
    assert out.shape == (80, 96, 3)
    assert (out[g.pad_y : g.pad_y + 48] == 200).all()
    pad_rows = np.ones(80, dtype=bool)
    pad_rows[g.pad_y : g.pad_y + 48] = False
    assert (out[pad_rows] == SSD_MEAN_RGB).all()
    assert letterbox_geometry((80, 96), (80, 96)) == letterbox_geometry((80, 96), (80, 96), False)


# -- photometric --------------------------------------------------------------------------


def test_photometric_single_distortions_exact():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    as_f = img.astype(np.float64)
    out = ssd_photometric_distort(img, brightness=25.0)
    np.testing.assert_array_equal(out, np.clip(as_f + 25, 0, 255).astype(np.uint8))
    out = ssd_photometric_distort(img, brightness=-32.0)
    np.testing.assert_array_equal(out, np.clip(as_f - 32, 0, 255).astype(np.uint8))
    out = ssd_photometric_distort(img, contrast=1.4)
    want = np.rint(np.clip(127.5 + 1.4 * (as_f - 127.5), 0, 255)).astype(np.uint8)
    np.testing.assert_array_equal(out, want)
    out = ssd_photometric_distort(img, contrast=0.5, contrast_center=0.0)  # Caffe style
    np.testing.assert_array_equal(out, np.rint(as_f * 0.5).astype(np.uint8))
    # brightness then contrast: clipped after each step, rounded once
    out = ssd_photometric_distort(img, brightness=30.0, contrast=1.5)
    step = np.clip(as_f + 30, 0, 255)
    want = np.rint(np.clip(127.5 + 1.5 * (step - 127.5), 0, 255)).astype(np.uint8)
    np.testing.assert_array_equal(out, want)
    assert out.dtype == np.uint8 and out.shape == img.shape


def test_photometric_hue_and_saturation():
    red = np.zeros((4, 4, 3), dtype=np.uint8)
    red[..., 0] = 255
    out = ssd_photometric_distort(red, hue=120.0)  # red -> green
    assert out[0, 0, 1] > 240 and out[0, 0, 0] < 15 and out[0, 0, 2] < 15
    gray = np.full((4, 4, 3), 128, dtype=np.uint8)
    np.testing.assert_array_equal(ssd_photometric_distort(gray, saturation=1.5, hue=18.0), gray)
    pale = np.zeros((4, 4, 3), dtype=np.uint8)
    pale[:] = (200, 100, 100)
    desat = ssd_photometric_distort(pale, saturation=0.5)
    assert desat[0, 0, 0] == 200 and 140 <= desat[0, 0, 1] <= 160  # S halved, V kept
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    a = ssd_photometric_distort(img, contrast=1.5, saturation=1.3, contrast_first=True)
    b = ssd_photometric_distort(img, contrast=1.5, saturation=1.3, contrast_first=False)
    assert not np.array_equal(a, b)
    with pytest.raises(TypeError):
        ssd_photometric_distort(img.astype(np.float32), brightness=1.0)


def test_photometric_parameter_ranges_and_probabilities():
    t = SSDPhotometricDistort()
    t.set_random_seed(0)
    draws = [t.get_params() for _ in range(2000)]
    for key, lo, hi in (
        ("brightness", -32, 32),
        ("contrast_factor", 0.5, 1.5),
        ("saturation_factor", 0.5, 1.5),
        ("hue_shift", -18, 18),
    ):
        values = [d[key] for d in draws if d[key] is not None]
        assert 0.45 < len(values) / len(draws) < 0.55
        assert lo <= min(values) and max(values) <= hi
        assert min(values) < lo + 0.1 * (hi - lo) and max(values) > hi - 0.1 * (hi - lo)
    first = np.mean([d["contrast_first"] for d in draws])
    assert 0.45 < first < 0.55


# -- specs, seeds -------------------------------------------------------------------------


def test_transform_from_spec():
    t = transform_from_spec({"name": "GaussNoise", "p": 0.2})
    assert isinstance(t, A.GaussNoise) and t.p == 0.2
    z = transform_from_spec({"name": "ZoomOut", "max_scale": 2.0, "p": 1.0})
    assert isinstance(z, ZoomOut) and z.max_scale == 2.0
    one = transform_from_spec(
        {"name": "OneOf", "transforms": [{"name": "Blur"}, {"name": "GaussNoise"}], "p": 0.5}
    )
    assert isinstance(one, A.OneOf) and len(one.transforms) == 2
    for bad in ({"name": "Compose_"}, {"name": "os"}, {"name": "np"}, {"name": "_private"}, {}):
        with pytest.raises(ValueError):
            transform_from_spec(bad)
    with pytest.raises(ValueError):
        transform_from_spec({"name": "BboxParams"})  # in the namespace but not a transform


def test_extra_transforms_are_inserted():
    c = build_transforms(
        "ssd",
        OUT_HW,
        extra=[{"name": "RandomRotate90", "p": 1.0}],
        extra_after_resize=[{"name": "GaussNoise", "p": 1.0}],
    )
    names = [type(t).__name__ for t in c.transforms]
    assert names[-3:] == ["RandomRotate90", "Resize", "GaussNoise"]
    img, boxes, _ = scene(np.random.default_rng(0))
    out = apply_transform(c, img, boxes, np.array([1, 2, 3]), np.zeros(3, dtype=bool))
    assert out.image.shape == (*OUT_HW, 3)
    with pytest.raises(Exception, match="unknown augmentation pipeline"):
        build_transforms("nope", OUT_HW)


@pytest.mark.parametrize("name", ["ssd", "light"])
def test_same_seed_same_output_different_seed_different(name):
    img, boxes, _ = scene(np.random.default_rng(7))
    labels, diff = np.array([1, 2, 3]), np.zeros(3, dtype=bool)

    def stream(seed):
        c = build_transforms(name, OUT_HW, seed=seed)
        return [apply_transform(c, img, boxes, labels, diff) for _ in range(6)]

    a, b, c = stream(11), stream(11), stream(12)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.image, y.image)
        np.testing.assert_array_equal(x.boxes, y.boxes)
        np.testing.assert_array_equal(x.labels, y.labels)
    assert any(
        x.image.shape != z.image.shape or not np.array_equal(x.image, z.image)
        for x, z in zip(a, c, strict=True)
    )


def test_labels_and_difficult_follow_their_boxes():
    img, boxes, _ = scene(np.random.default_rng(3))
    labels = np.array([5, 6, 7])
    diff = np.array([False, True, False])
    c = build_transforms("ssd", OUT_HW, seed=0)
    for _ in range(30):
        out = apply_transform(c, img, boxes, labels, diff)
        assert out.labels.dtype == labels.dtype and out.difficult.dtype == bool
        assert set(out.labels.tolist()) <= {5, 6, 7}
        np.testing.assert_array_equal(out.difficult, out.labels == 6)
    empty = apply_transform(c, img, boxes[:0], labels[:0], diff[:0])
    assert empty.boxes.shape == (0, 4) and empty.labels.shape == (0,)


def test_grayscale_image_runs_through_ssd():
    img = cv2.cvtColor(scene(np.random.default_rng(0))[0], cv2.COLOR_RGB2GRAY)
    c = build_transforms("ssd", OUT_HW, seed=0)
    for _ in range(5):
        out = apply_transform(
            c, img, np.array([[10, 10, 50, 50]], np.float32), np.array([1]), np.array([False])
        )
        assert out.image.shape[:2] == OUT_HW


def test_out_of_image_and_invalid_boxes_are_clipped_or_dropped():
    img = np.zeros((50, 60, 3), dtype=np.uint8)
    boxes = np.array(
        [[-5, -3, 20, 20], [30, 30, 30, 40], [40, 10, 70, 55], [10, 10, 5, 20]], dtype=np.float32
    )  # partly outside, zero width, partly outside, x2 < x1
    labels = np.array([1, 2, 3, 4])
    out = apply_transform(build_transforms("val", (50, 60)), img, boxes, labels, labels == 3)
    np.testing.assert_array_equal(out.labels, [1, 3])
    np.testing.assert_array_equal(out.difficult, [False, True])
    np.testing.assert_allclose(out.boxes, [[0, 0, 20, 20], [40, 10, 60, 50]], atol=1e-4)


def test_hydra_style_configs_are_accepted():
    from omegaconf import OmegaConf

    spec = OmegaConf.create({"name": "OneOf", "transforms": [{"name": "Blur"}], "p": 0.3})
    assert isinstance(transform_from_spec(spec), A.OneOf)
    opts = OmegaConf.create(
        {"fill": [1, 2, 3], "min_ious": [None, 0.5], "extra": [{"name": "GaussNoise"}]}
    )
    c = build_transforms("ssd", OmegaConf.create([32, 48]), seed=0, **opts)
    img, boxes, _ = scene(np.random.default_rng(0))
    out = apply_transform(c, img, boxes, np.array([1, 2, 3]), np.zeros(3, dtype=bool))
    assert out.image.shape == (32, 48, 3)
