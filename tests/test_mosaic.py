"""Mosaic (:mod:`ssdlit.datamodules.transforms.mosaic`): exact placements of pixels and
boxes, properties on random inputs, and the dataset / datamodule wiring (``mosaic_p``)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from ssdlit.datamodules import DetectionDataModule
from ssdlit.datamodules.datamodule import DetectionDataset
from ssdlit.datamodules.records import Record
from ssdlit.datamodules.transforms.mosaic import Mosaic, MosaicPart


def solid(h: int, w: int, value: int, boxes, labels) -> MosaicPart:
    """A ``value``-filled ``h x w`` image with ``boxes`` (xyxy pixels) and ``labels``."""
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    return MosaicPart(
        np.full((h, w, 3), value, np.uint8),
        b,
        np.asarray(labels, dtype=np.int64),
        np.arange(len(b)) % 2 == 1,
    )


def test_quadrants_show_the_tiles_and_boxes_follow_them_exactly() -> None:
    # output 40 (H) x 60 (W); the tiles meet at (cy, cx) = (10, 20), so the quadrants are
    # TL [0, 20) x [0, 10), TR [20, 60) x [0, 10), BL [0, 20) x [10, 40), BR [20, 60) x
    # [10, 40) (x ranges, y ranges) and the tiles' offsets (x, y): TL (-40, -30),
    # TR (20, -30), BL (-40, 10), BR (20, 10)
    parts = [
        # 30 x 20 image, scaled by 2: [22, 14, 30, 19] -> [44, 28, 60, 38] -> [4, -2, 20, 8]
        # (centre (12, 3): in TL) cut to [4, 0, 20, 8]; [0, 0, 4, 4] lands outside: dropped
        solid(20, 30, 10, [[22, 14, 30, 19], [0, 0, 4, 4]], [1, 2]),
        # 60 x 40, unscaled: [30, 0, 40, 30] -> centre (55, -15): dropped;
        # [0, 32, 20, 40] -> [20, 2, 40, 10], centre (30, 6) in TR: kept whole (difficult)
        solid(40, 60, 20, [[30, 0, 40, 30], [0, 32, 20, 40]], [4, 3]),
        # 120 x 80, halved: [70, 0, 100, 20] -> [35, 0, 50, 10] -> [-5, 10, 10, 20], centre
        # (2.5, 15) in BL: cut to [0, 10, 10, 20]
        solid(80, 120, 30, [[70, 0, 100, 20]], [5]),
        # 60 x 40, unscaled: [0, 0, 1, 10] -> [20, 10, 21, 20], one pixel wide: kept at
        # min_size 1; [0, 0, 0.5, 10] is half a pixel wide: dropped
        solid(40, 60, 40, [[0, 0, 1, 10], [0, 0, 0.5, 10]], [6, 7]),
    ]
    out = Mosaic((40, 60), min_size=1.0).compose(parts, (10, 20))
    assert out.image.shape == (40, 60, 3) and out.image.dtype == np.uint8
    assert (out.image[:10, :20] == 10).all() and (out.image[:10, 20:] == 20).all()
    assert (out.image[10:, :20] == 30).all() and (out.image[10:, 20:] == 40).all()
    expected = [[4, 0, 20, 8], [20, 2, 40, 10], [0, 10, 10, 20], [20, 10, 21, 20]]
    np.testing.assert_array_equal(out.boxes, np.array(expected, np.float32))
    np.testing.assert_array_equal(out.labels, [1, 3, 5, 6])
    np.testing.assert_array_equal(out.difficult, [False, True, False, False])


def test_a_box_centred_on_a_quadrant_edge_is_dropped() -> None:
    # tiles meet at (cy, cx) = (20, 30) of 40 x 60; TL's offset (x, y) is (-30, -20):
    # [10, 10, 50, 40] -> [-20, -10, 20, 20], centre (0, 5) on TL's left edge
    parts = [solid(40, 60, 1, [[10, 10, 50, 40]], [1])] + [solid(40, 60, 2, [], [])] * 3
    out = Mosaic((40, 60)).compose(parts, (20, 30))
    assert out.boxes.shape == (0, 4) and out.labels.shape == (0,)


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.tuples(st.integers(8, 64), st.integers(8, 64)), min_size=4, max_size=4),
    out_hw=st.tuples(st.integers(4, 48), st.integers(4, 48)),
    seed=st.integers(0, 2**16),
)
def test_kept_boxes_lie_in_their_quadrant_over_their_own_image(sizes, out_hw, seed) -> None:
    rng = np.random.default_rng(seed)
    parts = []
    for k, (h, w) in enumerate(sizes):
        n = int(rng.integers(0, 6))
        x = np.sort(rng.uniform(0, w, size=(n, 2)), axis=1)
        y = np.sort(rng.uniform(0, h, size=(n, 2)), axis=1)
        boxes = np.stack([x[:, 0], y[:, 0], x[:, 1] + 1e-3, y[:, 1] + 1e-3], 1)
        parts.append(solid(h, w, 50 * k + 10, boxes.clip(0, [w, h, w, h]), [k + 1] * n))
    mosaic = Mosaic(out_hw, p=1.0)
    out = mosaic(parts, rng)
    h, w = out_hw
    assert out.image.shape == (h, w, 3)
    assert len(out.boxes) == len(out.labels) == len(out.difficult)
    assert len(out.boxes) <= sum(len(p.boxes) for p in parts)
    if len(out.boxes):
        b = out.boxes
        assert (b[:, 0] >= 0).all() and (b[:, 2] <= w).all()
        assert (b[:, 1] >= 0).all() and (b[:, 3] <= h).all()
        assert ((b[:, 2] - b[:, 0]) >= 1).all() and ((b[:, 3] - b[:, 1]) >= 1).all()
        # the pixels under a kept box are its own image's (every box is inside its quadrant)
        for box, label in zip(b, out.labels, strict=True):
            x1, y1, x2, y2 = (
                np.floor(box[:2]).astype(int).tolist() + np.ceil(box[2:]).astype(int).tolist()
            )
            assert (out.image[y1:y2, x1:x2] == 50 * (label - 1) + 10).all()


def test_wrong_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="p must be"):
        Mosaic((32, 32), p=1.5)
    with pytest.raises(ValueError, match="center"):
        Mosaic((32, 32), center=(0.0, 0.5))
    with pytest.raises(ValueError, match="4 images"):
        Mosaic((32, 32)).compose([solid(8, 8, 0, [], [])] * 3, (16, 16))
    with pytest.raises(ValueError, match="not inside"):
        Mosaic((32, 32)).compose([solid(8, 8, 0, [], [])] * 4, (0, 16))


@pytest.fixture
def four_images(tmp_path) -> list[Record]:
    """Four 30x40 images of different colours, one box each, labelled 1..4."""
    records = []
    for i in range(4):
        path = tmp_path / f"im{i}.png"
        Image.new("RGB", (40, 30), (i * 60, 0, 0)).save(path)
        records.append(
            Record(
                path=path,
                width=40,
                height=30,
                boxes=np.array([[10, 8, 30, 22]], np.float32),
                labels=np.array([i + 1]),
                image_id=str(i),
            )
        )
    return records


def test_the_dataset_mixes_images_and_repeats_under_its_seed(four_images) -> None:
    def samples(seed: int) -> list[dict]:
        ds = DetectionDataset(four_images, mosaic=Mosaic((32, 32), p=1.0), seed=seed)
        return [ds[i % 4] for i in range(12)]

    first, again, other = samples(0), samples(0), samples(1)
    mixed = 0
    for a, b in zip(first, again, strict=True):
        assert a["image"].shape == (3, 32, 32)
        assert a["image"].equal(b["image"]) and a["boxes"].equal(b["boxes"])
        # four quadrants from four draws: more than one colour (image) in most samples
        mixed += len(np.unique(a["image"][0].numpy())) > 1
        assert ((a["boxes"] >= 0) & (a["boxes"] <= 1)).all()
    assert mixed >= 6
    assert any(not a["image"].equal(c["image"]) for a, c in zip(first, other, strict=True))
    # reseeding (what each DataLoader worker does) restarts the stream
    ds = DetectionDataset(four_images, mosaic=Mosaic((32, 32), p=1.0), seed=5)
    ds.reseed(0)
    assert ds[0]["image"].equal(first[0]["image"])


def test_mosaic_p_zero_is_the_plain_sample(four_images) -> None:
    plain = DetectionDataset(four_images)
    off = DetectionDataset(four_images, mosaic=Mosaic((32, 32), p=0.0))
    for i in range(4):
        assert plain[i]["image"].equal(off[i]["image"])
        assert plain[i]["boxes"].equal(off[i]["boxes"])


def test_mosaic_p_is_read_from_the_train_augmentation(four_images) -> None:
    dm = DetectionDataModule(
        train=(four_images, ["a", "b", "c", "d"]),
        image_size=(32, 32),
        batch_size=2,
        augment={"train": {"name": "ssd", "mosaic_p": 0.5}},
    )
    dm.setup("fit")
    ds = dm.dataset("train")
    assert ds.mosaic == Mosaic((32, 32), p=0.5)
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="train split only"):
        DetectionDataModule(
            train=(four_images, ["a", "b", "c", "d"]),
            image_size=(32, 32),
            augment={"val": {"name": "val", "mosaic_p": 0.5}},
        )
