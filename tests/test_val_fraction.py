"""``data.val_fraction``: a seeded validation split carved from the training images, so
that no test image chooses the checkpoint (``ssdlit.datamodules.splitting``, through
``build_datamodule`` for every source)."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ssdlit.datamodules import (
    DetectionDataModule,
    DetectionDataset,
    Record,
    build_datamodule,
    build_transforms,
    split_off_val,
    split_roles,
)
from ssdlit.registry import ConfigError
from tests.data_builders import add_flat_item, write_coco, write_csv, write_image

CONF_DATA = Path(__file__).resolve().parents[1] / "conf" / "data"
SIZE = (48, 48)


def fake_records(n: int, prefix: str = "img") -> list[Record]:
    """``n`` records with distinct ids (never loaded)."""
    return [
        Record(
            path=Path(f"/nowhere/{prefix}{i:03d}.jpg"),
            width=32,
            height=24,
            boxes=np.asarray([[1, 1, 10, 10]], dtype=np.float32),
            labels=np.asarray([1], dtype=np.int64),
            image_id=f"{prefix}{i:03d}",
        )
        for i in range(n)
    ]


def ids(records) -> list[str]:
    return [r.image_id for r in records]


# -- the split itself ---------------------------------------------------------------------


def test_split_is_deterministic_for_a_seed_and_changes_with_it():
    records = fake_records(40)
    train, val, info = split_off_val(records, 0.25, seed=0)
    again = split_off_val(records, 0.25, seed=0)
    assert (ids(again[0]), ids(again[1])) == (ids(train), ids(val))
    assert info.val_ids == tuple(ids(val)) and info.train_ids == tuple(ids(train))
    assert (info.fraction, info.seed, info.num_images) == (0.25, 0, 40)
    others = {split_off_val(records, 0.25, seed=s)[2].val_ids for s in range(1, 6)}
    assert info.val_ids not in others and len(others) > 1


def test_parts_are_disjoint_and_cover_the_training_images():
    records = fake_records(37)
    train, val, info = split_off_val(records, 0.3, seed=7)
    assert not set(ids(train)) & set(ids(val))
    assert sorted(ids(train) + ids(val)) == sorted(ids(records))
    assert ids(val) == sorted(ids(val)) and ids(train) == sorted(ids(train))  # by id
    assert info.to_dict() == {
        "val_fraction": 0.3,
        "seed": 7,
        "train_images": 26,
        "val_images": 11,
        "val_ids": ids(val),
    }
    json.dumps(info.to_dict())  # a run can record it as it is


@pytest.mark.parametrize(
    ("n", "fraction", "n_val"),
    [(160, 0.15, 24), (200, 0.1, 20), (10, 0.01, 1), (3, 0.1, 1), (2, 0.5, 1), (9, 0.5, 4)],
)
def test_sizes_are_round_f_n_and_at_least_one(n, fraction, n_val):
    train, val, _ = split_off_val(fake_records(n), fraction, seed=0)
    assert n_val == max(1, round(fraction * n))
    assert (len(val), len(train)) == (n_val, n - n_val)


@pytest.mark.parametrize(("n", "fraction"), [(1, 0.5), (1, 0.01), (10, 0.96)])
def test_no_image_left_to_train_on_is_a_clear_error(n, fraction):
    with pytest.raises(ConfigError, match=r"data\.val_fraction=.*leaves no image to train on"):
        split_off_val(fake_records(n), fraction, seed=0)


@pytest.mark.parametrize("bad", [0, 1, 0.0, 1.0, -0.1, 1.5, float("nan"), "0.1", True])
def test_a_fraction_outside_0_1_is_a_config_error(bad):
    with pytest.raises(ConfigError, match=r"data\.val_fraction"):
        split_off_val(fake_records(10), bad, seed=0)


def test_the_order_of_the_records_does_not_change_the_split():
    records = fake_records(50)
    train, val, info = split_off_val(records, 0.2, seed=3)
    for k in range(3):
        shuffled = list(records)
        random.Random(k).shuffle(shuffled)
        t, v, i = split_off_val(shuffled, 0.2, seed=3)
        assert (ids(t), ids(v), i) == (ids(train), ids(val), info)


def test_a_larger_fraction_keeps_the_smaller_ones_images():
    records = fake_records(60)
    small = set(split_off_val(records, 0.1, seed=0)[2].val_ids)
    large = set(split_off_val(records, 0.3, seed=0)[2].val_ids)
    assert small < large


# -- through the config, for every source -------------------------------------------------


def _images(root: Path, n: int) -> list[str]:
    names = [f"im{i:02d}.jpg" for i in range(n)]
    for name in names:
        write_image(root / name, 32, 24)
    return names


def _csv_data(tmp_path: Path, n: int = 20, order_seed: int | None = None) -> dict:
    """A CSV dataset of ``n`` training images (two rows for some) and a val CSV of 4."""
    img = tmp_path / "images"
    names = _images(img, n + 4)
    header = ["filename", "width", "height", "class", "xmin", "ymin", "xmax", "ymax"]
    rows = [[f, 32, 24, "cat" if i % 2 else "dog", 1, 1, 20, 15] for i, f in enumerate(names[:n])]
    rows += [[f, 32, 24, "cat", 2, 2, 12, 12] for f in names[:n:3]]
    if order_seed is not None:
        random.Random(order_seed).shuffle(rows)
    train = write_csv(tmp_path / f"train{order_seed}.csv", header, rows)
    val = write_csv(
        tmp_path / "val.csv", header, [[f, 32, 24, "cat", 1, 1, 20, 15] for f in names[n:]]
    )
    return {
        "source": {"name": "csv", "images_dir": str(img)},
        "train": {"path": str(train)},
        "val": {"path": str(val)},
        "test": None,
        "val_fraction": 0.25,
        "class_names": None,
        "batch_size": 4,
        "num_workers": 0,
        "seed": 0,
    }


def test_csv_source_configured_val_becomes_test_and_the_log_says_so(tmp_path, caplog):
    data = _csv_data(tmp_path)
    with caplog.at_level(logging.INFO, logger="ssdlit.datamodules.from_config"):
        dm = build_datamodule(data, None, SIZE)
    assert dm.split_sizes == {"train": 15, "val": 5, "test": 4}
    info = dm.val_split
    assert info is not None and len(info.val_ids) == 5 and len(info.train_ids) == 15
    assert set(info.val_ids) | set(info.train_ids) == {f"im{i:02d}" for i in range(20)}
    assert ids(dm.dataset("val").records) == list(info.val_ids)
    assert ids(dm.dataset("train").records) == list(info.train_ids)
    assert ids(dm.dataset("test").records) == ["im20", "im21", "im22", "im23"]
    assert dm.class_names == ["cat", "dog"]
    line = (
        "data.val_fraction=0.25: validating on 5 of the 20 training images (seed 0), "
        "training on the other 15; the configured val split (4 images) is the test split"
    )
    assert line in caplog.messages
    # The datamodule's reports count each part.
    assert (dm.reports["train"].images, dm.reports["val"].images) == (15, 5)
    assert "5 images kept" in dm.reports["val"].summary()


def test_csv_row_order_does_not_change_the_split(tmp_path):
    a = build_datamodule(_csv_data(tmp_path / "a"), None, SIZE).val_split
    b = build_datamodule(_csv_data(tmp_path / "b", order_seed=1), None, SIZE).val_split
    assert a == b
    other_seed = build_datamodule({**_csv_data(tmp_path / "c"), "seed": 1}, None, SIZE)
    assert other_seed.val_split.val_ids != a.val_ids


def test_val_and_test_and_val_fraction_is_a_clear_error(tmp_path):
    from ssdlit.apps.common import user_error_message

    data = _csv_data(tmp_path)
    data["test"] = dict(data["val"])
    with pytest.raises(ConfigError, match=r"data\.val=null") as info:
        build_datamodule(data, None, SIZE)
    message = user_error_message(info.value)  # what the apps print, exit status 2
    assert message is not None and "\n" not in message and "data.val_fraction" in message
    with pytest.raises(ConfigError):
        split_roles(data)
    del data["val_fraction"]  # without it: val and test as configured
    assert build_datamodule(data, None, SIZE).split_sizes == {"train": 20, "val": 4, "test": 4}


def test_split_roles():
    data = {"source": {"name": "csv"}, "train": {}, "val": {}, "test": None}
    assert split_roles(data) == {"train": "train", "val": "val", "test": None}
    carved = {**data, "val_fraction": 0.2}
    assert split_roles(carved) == {"train": "train", "val": "train", "test": "val"}
    assert split_roles({**carved, "val": None, "test": {}}) == {
        "train": "train",
        "val": "train",
        "test": "test",
    }
    assert split_roles({**carved, "val": None})["test"] is None


def test_evaluate_splits_give_the_same_images_as_the_full_build(tmp_path):
    # evaluate builds one split and serves it as test: split=val must be the carved images
    # the run validated on, split=test the configured val that was moved, split=train the rest.
    data = _csv_data(tmp_path)
    full = build_datamodule(data, None, SIZE)
    for split, expected in (
        ("val", full.val_split.val_ids),
        ("train", full.val_split.train_ids),
        ("test", tuple(ids(full.dataset("test").records))),
    ):
        dm = build_datamodule(data, None, SIZE, splits=[split], rename={split: "test"})
        assert dm.split_sizes == {"test": len(expected)}, split
        assert tuple(ids(dm.dataset("test").records)) == expected, split
        if split != "test":  # the configured val alone names only its own classes
            assert dm.class_names == full.class_names
    only_val = build_datamodule(data, None, SIZE, splits=["val"])
    assert only_val.val_split == full.val_split and set(only_val.split_sizes) == {"val"}


def test_train_images_are_augmented_and_val_images_are_not(tmp_path):
    data = {**_csv_data(tmp_path), "val": None}
    dm = build_datamodule(data, {"train": {"name": "ssd"}, "eval": {"name": "val"}}, SIZE)
    assert dm.split_sizes == {"train": 15, "val": 5}
    val = dm.dataset("val")
    reference = DetectionDataset(val.records, build_transforms("val", SIZE))
    for i in range(len(val)):
        a, b = val[i], val[i]
        assert torch.equal(a["image"], b["image"])  # no randomness
        assert torch.equal(a["image"], reference[i]["image"])  # the eval pipeline
        assert torch.equal(a["boxes"], reference[i]["boxes"])
    train = dm.dataset("train")
    draws = [train[0] for _ in range(6)]
    assert any(
        d["image"].shape != draws[0]["image"].shape
        or not torch.equal(d["image"], draws[0]["image"])
        or not torch.equal(d["boxes"], draws[0]["boxes"])
        for d in draws[1:]
    )


def test_voc_folder(tmp_path):
    root = tmp_path / "mine"
    for i in range(12):
        add_flat_item(
            root, f"p{i:02d}", [{"name": "cat" if i % 3 else "dog", "box": (2, 2, 20, 16)}]
        )
    data = {
        "source": {"name": "voc", "root": str(root), "layout": "flat"},
        "train": {"split_file": None},
        "val": None,
        "test": None,
        "val_fraction": 0.25,
        "class_names": None,
        "num_workers": 0,
        "seed": 5,
    }
    dm = build_datamodule(data, None, SIZE)
    assert dm.split_sizes == {"train": 9, "val": 3}
    assert sorted(dm.val_split.val_ids + dm.val_split.train_ids) == [f"p{i:02d}" for i in range(12)]
    assert dm.val_split.seed == 5 and dm.class_names == ["cat", "dog"]
    assert (
        dm.val_split
        == split_off_val(dm.dataset("train").records + dm.dataset("val").records, 0.25, 5)[2]
    )


def test_coco_json_and_its_image_order(tmp_path):
    names = _images(tmp_path / "img", 10)
    images = [
        {"id": 100 + i, "file_name": f, "width": 32, "height": 24} for i, f in enumerate(names)
    ]
    annotations = [
        {"id": i + 1, "image_id": 100 + i, "category_id": 1 + i % 2, "bbox": [1, 1, 10, 8]}
        for i in range(10)
    ]
    categories = [{"id": 1, "name": "car"}, {"id": 2, "name": "person"}]
    splits = {}
    for order in (0, 1):
        listed = list(images)
        random.Random(order).shuffle(listed)
        path = write_coco(
            tmp_path / f"ann{order}.json",
            {"images": listed, "annotations": annotations, "categories": categories},
        )
        data = {
            "source": {"name": "coco", "images_dir": str(tmp_path / "img")},
            "train": {"annotation_file": str(path)},
            "val": None,
            "val_fraction": 0.2,
            "num_workers": 0,
            "seed": 0,
        }
        dm = build_datamodule(data, None, SIZE)
        assert dm.split_sizes == {"train": 8, "val": 2}
        splits[order] = dm.val_split
    assert splits[0] == splits[1]
    assert set(splits[0].val_ids) <= {str(100 + i) for i in range(10)}


def test_synthetic_data(tmp_path):
    data = {
        "source": {
            "name": "synthetic",
            "root": str(tmp_path / "synthetic"),
            "num_images": {"train": 12, "val": 2, "test": 3},
            "image_size": 32,
        },
        "train": {"split": "train"},
        "val": None,  # the conf/data/synthetic.yaml way: data.val=null data.val_fraction=...
        "test": {"split": "test"},
        "val_fraction": 0.25,
        "num_workers": 0,
        "seed": 0,
    }
    dm = build_datamodule(data, None, SIZE)
    assert dm.split_sizes == {"train": 9, "val": 3, "test": 3}
    assert all(i.startswith("train_") for i in dm.val_split.val_ids)
    assert all(r.image_id.startswith("test_") for r in dm.dataset("test").records)


def test_the_datamodule_carves_too():
    records = fake_records(20)
    dm = DetectionDataModule(train=(records, ["cat"]), val_fraction=0.2, seed=4, image_size=SIZE)
    assert dm.val_split == split_off_val(records, 0.2, 4)[2]
    assert dm.split_sizes == {"train": 16, "val": 4}
    assert dm.class_names == ["cat"]
    with pytest.raises(ValueError, match="no val source"):
        DetectionDataModule(train=records, val=records, val_fraction=0.2)
    with pytest.raises(ValueError, match="train source"):
        DetectionDataModule(val=records, val_fraction=0.2)
    assert DetectionDataModule(train=records).val_split is None


# -- the shipped configs ------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(CONF_DATA.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_data_config_has_val_fraction_null(path):
    cfg = OmegaConf.load(path)
    assert "val_fraction" in cfg and cfg.val_fraction is None


def test_composed_csv_config_with_one_csv(tmp_path):
    # The command conf/data/csv.yaml documents: one CSV, data.val=null data.val_fraction=0.15.
    from hydra import compose, initialize_config_module

    data = _csv_data(tmp_path)
    with initialize_config_module("ssdlit.conf", version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "data=csv",
                f"data.train_csv={data['train']['path']}",
                f"data.images_dir={data['source']['images_dir']}",
                "data.val=null",
                "data.val_fraction=0.15",
                "data.num_workers=0",
                "seed=3",
            ],
        )
    dm = build_datamodule(cfg.data, cfg.augment, cfg.image_size)
    assert dm.split_sizes == {"train": 17, "val": 3}
    assert dm.val_split.seed == 3 and dm.val_split.fraction == 0.15
