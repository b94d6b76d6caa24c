"""The synthetic shapes dataset: written once, deterministic, read back through VOC."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from ssdlit.datamodules import SyntheticSource, VOCSource, write_synthetic_voc
from ssdlit.datamodules.synthetic import DEFAULT_CLASSES, MANIFEST, synthetic_samples
from ssdlit.registry import DATASETS

SMALL = {"num_images": {"train": 6, "val": 3, "test": 2}, "image_size": (48, 64), "seed": 3}


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_round_trip_through_voc_source(tmp_path: Path):
    src = SyntheticSource(root=tmp_path / "syn", split="train", **SMALL)
    assert src.written and src.class_names == list(DEFAULT_CLASSES)
    assert src.report.ok and not src.report.problems
    truth = list(synthetic_samples(split="train", num_images=6, image_size=(48, 64), seed=3))
    assert [r.image_id for r in src.records] == [t[0] for t in truth]
    for rec, (_, image, objects) in zip(src.records, truth, strict=True):
        assert (rec.width, rec.height) == (64, 48)
        np.testing.assert_array_equal(rec.boxes, np.array([o.box for o in objects], np.float32))
        np.testing.assert_array_equal(rec.labels, [o.label for o in objects])
        assert not rec.difficult.any()
        loaded = rec.load_image()
        assert loaded.shape == image.shape == (48, 64, 3)
        assert np.abs(loaded.astype(int) - image.astype(int)).mean() < 12  # JPEG loss only
    # the plain voc source reads the same folder
    voc = VOCSource(root=tmp_path / "syn", splits=["val", "test"], classes=DEFAULT_CLASSES)
    assert [r.image_id for r in voc.records] == [f"val_{i:06d}" for i in range(3)] + [
        f"test_{i:06d}" for i in range(2)
    ]


def test_deterministic_for_a_seed(tmp_path: Path):
    write_synthetic_voc(tmp_path / "a", **SMALL)
    write_synthetic_voc(tmp_path / "b", **SMALL)
    write_synthetic_voc(tmp_path / "c", **{**SMALL, "seed": 4})
    a, b, c = (_digest(tmp_path / n) for n in "abc")
    assert a == b
    assert a.keys() == c.keys() and a != c
    # more images keep the first ones unchanged
    more = list(synthetic_samples(split="val", num_images=5, image_size=(48, 64), seed=3))
    less = list(synthetic_samples(split="val", num_images=3, image_size=(48, 64), seed=3))
    for (_, im1, o1), (_, im2, o2) in zip(more, less, strict=False):
        assert o1 == o2 and np.array_equal(im1, im2)


def test_written_once_rewritten_when_parameters_change(tmp_path: Path):
    root = tmp_path / "syn"
    assert write_synthetic_voc(root, **SMALL)
    stamp = (root / MANIFEST).stat().st_mtime_ns
    assert not write_synthetic_voc(root, **SMALL)
    assert (root / MANIFEST).stat().st_mtime_ns == stamp
    assert not SyntheticSource(root=root, split="val", **SMALL).written
    assert write_synthetic_voc(root, **{**SMALL, "num_images": {"train": 2}})
    manifest = json.loads((root / MANIFEST).read_text())
    assert manifest["num_images"] == {"train": 2}
    assert sorted(p.name for p in (root / "ImageSets" / "Main").iterdir()) == ["train.txt"]
    assert len(list((root / "JPEGImages").iterdir())) == 2
    assert not list(tmp_path.glob(".syn*"))  # no temporary folders left behind


def test_refuses_to_overwrite_a_foreign_folder(tmp_path: Path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing"):
        write_synthetic_voc(tmp_path / "mine", **SMALL)
    assert (tmp_path / "mine" / "precious.txt").read_text() == "keep me"


def test_objects_are_varied(tmp_path: Path):
    """Over a few dozen images: every class, several sizes, overlaps, border contact."""
    samples = list(synthetic_samples(split="train", num_images=40, image_size=96, seed=0))
    objects = [o for _, _, objs in samples for o in objs]
    assert {o.name for o in objects} == set(DEFAULT_CLASSES)
    sides = np.array([max(o.box[2] - o.box[0], o.box[3] - o.box[1]) for o in objects])
    assert sides.min() < 20 and sides.max() > 35
    assert any(o.truncated for o in objects)
    assert any(o.box[0] == 0 or o.box[2] == 96 for o in objects if o.truncated)
    overlapping = 0
    for _, _, objs in samples:
        for i, a in enumerate(objs):
            for b in objs[i + 1 :]:
                if min(a.box[2], b.box[2]) > max(a.box[0], b.box[0]) and min(
                    a.box[3], b.box[3]
                ) > max(a.box[1], b.box[1]):
                    overlapping += 1
    assert overlapping > 0
    counts = [len(objs) for _, _, objs in samples]
    assert min(counts) >= 1 and max(counts) <= 4


def test_registry_and_options(tmp_path: Path):
    src = DATASETS.build(
        "synthetic",
        root=tmp_path / "s",
        split=["train", "val"],
        num_images=2,
        image_size=32,
        classes=["ring", "hexagon"],
        max_objects=2,
    )
    assert src.class_names == ["ring", "hexagon"] and len(src) == 4
    assert all(r.width == r.height == 32 for r in src.records)
    with pytest.raises(ValueError, match="shape names"):
        write_synthetic_voc(tmp_path / "x", classes=["blob"])
