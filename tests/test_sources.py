"""Annotation sources: raccoon from VOC XML and CSV, the VOC devkit layout, CSV column
mappings, COCO JSON, the registry."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from ssdlit.datamodules import (
    SSD_KERAS_COLUMNS,
    VOC_CLASSES,
    COCOSource,
    CSVSource,
    DataError,
    Record,
    VOCSource,
)
from ssdlit.registry import DATASETS
from tests.data_builders import (
    raccoon_dataset,
    require_dataset,
    voc_xml,
    write_coco,
    write_csv,
    write_image,
)

# ---------------------------------------------------------------------------------------
# Raccoon: the same annotations as VOC XML and as CSV give identical records.


@pytest.fixture(scope="module")
def raccoon_root() -> Path:
    """The raccoon dataset (tests/data_builders.py: next to the checkout, or
    ``SSDLIT_RACCOON_DIR``); the tests skip without it, and fail when CI is set."""
    return raccoon_dataset()


def test_raccoon_voc_and_csv_give_identical_records(raccoon_root: Path):
    voc = VOCSource(root=raccoon_root, classes=["raccoon"])
    csv = CSVSource(
        path=[raccoon_root / "train_labels.csv", raccoon_root / "test_labels.csv"],
        images_dir=raccoon_root / "images",
        one_based=True,  # raccoon's CSVs copy the XML's 1-based pixel indices
    )
    assert voc.class_names == csv.class_names == ["raccoon"]
    assert len(voc) == len(csv) == 200
    assert voc.report.boxes == csv.report.boxes == 217
    assert voc.report.ok and csv.report.ok and not voc.report.problems
    by_id = {r.image_id: r for r in voc.records}
    for rec in csv.records:
        assert rec.same_annotation(by_id[rec.image_id]), rec.image_id
    first = by_id["raccoon-1"]  # <xmin>81</xmin><ymin>88</ymin><xmax>522</xmax><ymax>408</ymax>
    np.testing.assert_array_equal(first.boxes, [[80, 87, 522, 408]])
    assert (first.width, first.height) == (650, 417)
    assert [r.image_id for r in voc.records[:3]] == ["raccoon-1", "raccoon-2", "raccoon-3"]


def test_raccoon_csv_split_and_base(raccoon_root: Path):
    train = CSVSource(
        path=raccoon_root / "train_labels.csv", images_dir=raccoon_root / "images", one_based=True
    )
    test = CSVSource(
        path=raccoon_root / "test_labels.csv", images_dir=raccoon_root / "images", one_based=True
    )
    assert len(train) == 160 and len(test) == 40
    assert not {r.image_id for r in train.records} & {r.image_id for r in test.records}
    raw = CSVSource(path=raccoon_root / "train_labels.csv", images_dir=raccoon_root / "images")
    diff = raw.records[0].boxes - train.records[0].boxes
    np.testing.assert_array_equal(diff[:, :2], 1)  # 1-based xmin, ymin shifted by one
    np.testing.assert_array_equal(diff[:, 2:], 0)


def test_raccoon_grayscale_images_load_as_rgb(raccoon_root: Path):
    voc = VOCSource(root=raccoon_root, classes=["raccoon"])
    by_id = {r.image_id: r for r in voc.records}
    for image_id in ("raccoon-150", "raccoon-152", "raccoon-161"):  # the 3 grayscale ones
        rec = by_id[image_id]
        img = rec.load_image()
        assert img.dtype == np.uint8 and img.shape == (rec.height, rec.width, 3)
        assert (img[..., 0] == img[..., 1]).all()


def test_require_dataset_fails_under_ci_else_skips(tmp_path: Path, monkeypatch):
    missing = tmp_path / "nothere"
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        require_dataset(missing, "the raccoon dataset")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="not found"):
        require_dataset(missing, "the raccoon dataset")
    assert require_dataset(tmp_path, "x") == tmp_path


# ---------------------------------------------------------------------------------------
# VOC devkit layout.


def _devkit_year(root: Path, year: str, items: dict[str, list[dict]], sets: dict[str, list[str]]):
    base = root / f"VOC{year}"
    (base / "Annotations").mkdir(parents=True)
    (base / "ImageSets" / "Main").mkdir(parents=True)
    for stem, objects in items.items():
        write_image(base / "JPEGImages" / f"{stem}.jpg", 40, 30)
        (base / "Annotations" / f"{stem}.xml").write_text(voc_xml(f"{stem}.jpg", 40, 30, objects))
    for name, ids in sets.items():
        (base / "ImageSets" / "Main" / f"{name}.txt").write_text("\n".join(ids) + "\n")
    return base


@pytest.fixture
def devkit(tmp_path: Path) -> Path:
    root = tmp_path / "VOCdevkit"
    _devkit_year(
        root,
        "2007",
        {
            "000001": [
                {"name": "dog", "box": (1, 1, 20, 20)},
                {"name": " person ", "box": (5, 5, 40, 30), "difficult": 1},
            ],
            "000002": [{"name": "cat", "box": (2, 3, 12, 13), "truncated": 1}],
        },
        {"trainval": ["000001", "000002"], "test": ["000002"]},
    )
    _devkit_year(
        root,
        "2012",
        {"2008_000001": [{"name": "person", "box": (10.5, 1, 30, 29.5)}]},
        {"trainval": ["2008_000001  1", "# a comment", ""]},
    )
    return root


def test_devkit_several_years(devkit: Path):
    src = VOCSource(root=devkit, splits=[["2007", "trainval"], ["2012", "trainval"]])
    assert src.class_names == list(VOC_CLASSES) and src.num_classes == 20
    ids = [r.image_id for r in src.records]
    assert ids == ["VOC2007/000001", "VOC2007/000002", "VOC2012/2008_000001"]
    r1, r2, r3 = src.records
    dog, person, cat = (VOC_CLASSES.index(n) + 1 for n in ("dog", "person", "cat"))
    np.testing.assert_array_equal(r1.boxes, [[0, 0, 20, 20], [4, 4, 40, 30]])
    np.testing.assert_array_equal(r1.labels, [dog, person])  # " person " stripped
    np.testing.assert_array_equal(r1.difficult, [False, True])
    np.testing.assert_array_equal(r2.labels, [cat])
    np.testing.assert_allclose(r3.boxes, [[9.5, 0, 30, 29.5]])
    assert r1.path == devkit / "VOC2007" / "JPEGImages" / "000001.jpg"
    assert src.report.difficult == 1 and src.report.ok


def test_devkit_filters_and_relabels(devkit: Path):
    splits = [["2007", "trainval"], ["2012", "trainval"]]
    src = VOCSource(root=devkit, splits=splits, include_classes=["person", "dog"])
    assert src.class_names == ["person", "dog"]
    np.testing.assert_array_equal(src.records[0].labels, [2, 1])
    assert src.records[1].num_boxes == 0  # the cat is filtered, the image kept
    src = VOCSource(
        root=devkit,
        splits=splits,
        include_classes=["person", "dog"],
        exclude_difficult=True,
        keep_images_without_gt=False,
    )
    assert [r.image_id for r in src.records] == ["VOC2007/000001", "VOC2012/2008_000001"]
    np.testing.assert_array_equal(src.records[0].labels, [2])
    src = VOCSource(root=devkit, splits=[["2007", "trainval"]], exclude_truncated=True)
    assert src.records[1].num_boxes == 0
    with pytest.raises(ValueError, match="not in classes"):
        VOCSource(root=devkit, splits=splits, include_classes=["unicorn"])


def test_devkit_year_folder_with_set_names(devkit: Path):
    year = devkit / "VOC2007"
    a = VOCSource(root=year, splits="test")
    b = VOCSource(root=year, splits=["test"])
    c = VOCSource(root=year, splits=[["2007", "test"]])  # root is the year folder itself
    assert [r.image_id for r in a.records] == [r.image_id for r in b.records] == ["000002"]
    assert [r.image_id for r in c.records] == ["VOC2007/000002"]
    with pytest.raises(FileNotFoundError, match=r"val\.txt"):
        VOCSource(root=year, splits="val")
    with pytest.raises(FileNotFoundError, match="VOC2010"):
        VOCSource(root=devkit, splits=[["2010", "trainval"]])


def test_devkit_overlapping_sets_are_duplicates(devkit: Path):
    with pytest.raises(DataError, match="already used") as info:
        VOCSource(root=devkit, splits=[["2007", "trainval"], ["2007", "test"]])
    assert info.value.kind == "duplicate_id"


def test_flat_layout_split_file_and_png(tmp_path: Path):
    (tmp_path / "annotations").mkdir()
    for stem in ("b", "a"):
        write_image(tmp_path / "images" / f"{stem}.png", 16, 12)
        xml = voc_xml(f"{stem}.png", 16, 12, [{"name": "cat", "box": (1, 1, 4, 4)}])
        (tmp_path / "annotations" / f"{stem}.xml").write_text(xml)
    (tmp_path / "val.txt").write_text("b.png\n")
    src = VOCSource(root=tmp_path, classes=["cat"], split_file="val.txt")
    assert [r.image_id for r in src.records] == ["b"]
    assert src.records[0].path.name == "b.png"
    assert [r.image_id for r in VOCSource(root=tmp_path, classes=["cat"]).records] == ["a", "b"]


# ---------------------------------------------------------------------------------------
# CSV.


def test_csv_ssd_keras_columns_unsorted_ids_and_sizes_from_images(tmp_path: Path):
    write_image(tmp_path / "imgs" / "a.jpg", 40, 30)
    write_image(tmp_path / "imgs" / "b.png", 20, 10)
    write_image(tmp_path / "imgs" / "c.jpg", 20, 10)
    rows = [
        ["a.jpg", 1, 11, 2, 12, 2],
        ["b.png", 0, 5, 0, 5, 1],
        ["a.jpg", 20, 40, 10, 30, 1],
        ["c.jpg", "", "", "", "", ""],  # an image without boxes
    ]
    path = write_csv(
        tmp_path / "labels.csv", ["image_name", "xmin", "xmax", "ymin", "ymax", "class_id"], rows
    )
    src = CSVSource(
        path=path,
        images_dir=tmp_path / "imgs",
        columns=SSD_KERAS_COLUMNS,
        class_format="id",
        class_names=["car", "truck"],
    )
    a, b, c = src.records
    assert (a.image_id, b.image_id, c.image_id) == ("a", "b", "c")
    np.testing.assert_array_equal(a.boxes, [[1, 2, 11, 12], [20, 10, 40, 30]])
    np.testing.assert_array_equal(a.labels, [2, 1])
    assert (a.width, a.height, b.width, b.height) == (40, 30, 20, 10)
    assert c.num_boxes == 0 and src.report.images_without_gt == 1
    with pytest.raises(ValueError, match="needs class_names"):
        CSVSource(path=path, columns=SSD_KERAS_COLUMNS, class_format="id")
    zero_based = CSVSource(
        path=path,
        images_dir=tmp_path / "imgs",
        columns={"image": "image_name", "class": "class_id", "width": None, "height": None},
        class_format="id",
        first_id=0,
        class_names=["bg_like", "car", "truck"],
    )
    np.testing.assert_array_equal(zero_based.records[0].labels, [3, 2])


def test_csv_explicit_size_column_must_exist(tmp_path: Path):
    path = write_csv(tmp_path / "l.csv", ["filename", "class", "xmin", "ymin", "xmax", "ymax"], [])
    with pytest.raises(DataError, match="missing column 'w'"):
        CSVSource(path=path, columns={"width": "w"})
    with pytest.raises(ValueError, match="unknown roles"):
        CSVSource(path=path, columns={"label": "class"})


# ---------------------------------------------------------------------------------------
# COCO.


def test_coco_small_json(tmp_path: Path):
    write_image(tmp_path / "img" / "x.jpg", 50, 40)
    write_image(tmp_path / "img" / "y.jpg", 30, 20)
    data = {
        "images": [
            {"id": 10, "file_name": "x.jpg", "width": 50, "height": 40},
            {"id": 11, "file_name": "y.jpg", "width": 30, "height": 20},
        ],
        "categories": [
            {"id": 7, "name": "zebra"},
            {"id": 1, "name": "person"},
            {"id": 3, "name": "car"},
        ],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 3, "bbox": [1.5, 2, 10, 5.5], "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 7, "bbox": [0, 0, 50, 40], "iscrowd": 1},
            {"id": 3, "image_id": 10, "category_id": 1, "bbox": [20, 10, 5, 5]},
        ],
    }
    path = write_coco(tmp_path / "ann" / "instances.json", data)
    src = COCOSource(annotation_file=path, images_dir=tmp_path / "img")
    assert src.class_names == ["person", "car", "zebra"] and src.category_ids == [1, 3, 7]
    x, y = src.records
    assert (x.image_id, y.image_id) == ("10", "11")
    np.testing.assert_allclose(x.boxes, [[1.5, 2, 11.5, 7.5], [0, 0, 50, 40], [20, 10, 25, 15]])
    np.testing.assert_array_equal(x.labels, [2, 3, 1])
    np.testing.assert_array_equal(x.difficult, [False, True, False])  # iscrowd -> difficult
    assert y.num_boxes == 0 and x.path == tmp_path / "img" / "x.jpg"
    no_crowd = COCOSource(annotation_file=path, images_dir=tmp_path / "img", include_crowd=False)
    np.testing.assert_array_equal(no_crowd.records[0].labels, [2, 1])
    only_gt = COCOSource(
        annotation_file=path, images_dir=tmp_path / "img", keep_images_without_gt=False
    )
    assert [r.image_id for r in only_gt.records] == ["10"]
    # data.class_names reaches COCO too: the categories' names, in the label order wanted.
    ordered = COCOSource(
        annotation_file=path, images_dir=tmp_path / "img", class_names=["zebra", "car", "person"]
    )
    assert ordered.class_names == ["zebra", "car", "person"] and ordered.category_ids == [7, 3, 1]
    np.testing.assert_array_equal(ordered.records[0].labels, [2, 1, 3])
    with pytest.raises(DataError, match=r"data\.class_names .*zebra") as info:
        COCOSource(annotation_file=path, images_dir=tmp_path / "img", class_names=["car"])
    assert "instances.json" in str(info.value)


def test_coco_bad_categories_raise(tmp_path: Path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    with pytest.raises(DataError, match="categories"):
        COCOSource(annotation_file=path, on_bad="skip")


# ---------------------------------------------------------------------------------------
# Registry, records, errors.


def test_registry_builds_every_source(tmp_path: Path):
    assert {"voc", "csv", "coco", "synthetic"} <= set(DATASETS.names())
    write_image(tmp_path / "a.jpg")
    path = write_csv(tmp_path / "l.csv", ["filename", "class", "xmin", "ymin", "xmax", "ymax"],
                     [["a.jpg", "cat", 1, 1, 5, 5]])  # fmt: skip
    src = DATASETS.build("csv", path=path)
    assert src.class_names == ["cat"] and len(src) == 1 and src[0].image_id == "a"
    with pytest.raises(TypeError):
        DATASETS.get("csv")(path)  # keyword-only
    assert "1 images" in repr(src)


def test_data_error_pickles_and_is_value_error():
    err = DataError("parse_error", "/x/a.xml", "object[2]/bndbox/xmax", "not a number: 'x'")
    again = pickle.loads(pickle.dumps(err))
    assert isinstance(again, ValueError)
    assert (
        str(again)
        == str(err)
        == ("/x/a.xml, object[2]/bndbox/xmax: not a number: 'x' [parse_error]")
    )
    assert (again.kind, again.file, again.where) == ("parse_error", "/x/a.xml", err.where)


def test_record_contract():
    rec = Record(path="a.jpg", width=4, height=3, boxes=[[0, 0, 1, 1]], labels=[1], image_id="a")
    assert rec.boxes.dtype == np.float32 and rec.labels.dtype == np.int64
    assert rec.difficult.dtype == bool and rec.apply_exif
    other = Record(path="a.jpg", width=4, height=3, boxes=[[0, 0, 1, 1]], labels=[1],
                   image_id="a", source="elsewhere")  # fmt: skip
    assert rec.same_annotation(other)
    with pytest.raises(ValueError, match="differ in length"):
        Record(path="a.jpg", width=4, height=3, boxes=[[0, 0, 1, 1]], labels=[], image_id="a")


# ---------------------------------------------------------------------------------------
# A VOC folder of your own; one key for the class names of every source (data.class_names).


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_module

    with initialize_config_module("ssdlit.conf", version_base="1.3"):
        return compose("train", overrides=overrides)


def _own_voc_folder(root: Path, images: str = "JPEGs", annotations: str = "xml") -> Path:
    for stem, name in (("p1", "dog"), ("p2", "cat"), ("p3", "dog")):
        write_image(root / images / f"{stem}.jpg", 40, 30)
        (root / annotations).mkdir(parents=True, exist_ok=True)
        xml = voc_xml(f"{stem}.jpg", 40, 30, [{"name": f" {name}", "box": (2, 2, 20, 20)}])
        (root / annotations / f"{stem}.xml").write_text(xml)
    return root


def test_flat_voc_folder_takes_its_classes_from_the_xml_files(tmp_path: Path):
    root = _own_voc_folder(tmp_path / "mine")
    src = VOCSource(root=root, images_dir="JPEGs", annotations_dir="xml")
    assert src.class_names == ["cat", "dog"]
    np.testing.assert_array_equal([r.labels[0] for r in src.records], [2, 1, 2])
    # Through the config the app composes, with no class configured anywhere.
    from ssdlit.datamodules import build_datamodule

    cfg = _compose(
        [
            "data=voc_folder",
            f"data.root={root}",
            "data.source.images_dir=JPEGs",
            "data.source.annotations_dir=xml",
            "data.num_workers=0",
        ]
    )
    assert cfg.data.class_names is None
    dm = build_datamodule(cfg.data, cfg.augment, cfg.image_size)
    assert dm.class_names == ["cat", "dog"]


def test_devkit_keeps_the_twenty_classes_and_unknown_class_names_the_key(devkit: Path):
    from ssdlit.datamodules import build_datamodule

    cfg = _compose(["data=voc", f"data.root={devkit}", "data.num_workers=0"])
    cfg.data.train.splits = [["2007", "trainval"]]
    cfg.data.val.splits = [["2007", "test"]]
    dm = build_datamodule(cfg.data, cfg.augment, cfg.image_size)
    assert dm.class_names == list(VOC_CLASSES)
    (devkit / "VOC2007" / "Annotations" / "000002.xml").write_text(
        voc_xml("000002.jpg", 40, 30, [{"name": "raccoon", "box": (2, 3, 12, 13)}])
    )
    with pytest.raises(DataError, match="raccoon") as info:
        build_datamodule(cfg.data, cfg.augment, cfg.image_size)
    assert "data.class_names" in str(info.value)
    cfg.data.class_names = ["raccoon", "dog", "cat", "person"]  # the key the message names
    dm = build_datamodule(cfg.data, cfg.augment, cfg.image_size)
    assert dm.class_names == ["raccoon", "dog", "cat", "person"]
    assert [list(r.labels) for r in dm.dataset("val").records] == [[1]]


def test_ssd7_csv_documented_override_for_ssd_keras_csvs(tmp_path: Path):
    # The command conf/experiment/ssd7_csv.yaml documents for ssd_keras's CSVs.
    from ssdlit.datamodules import build_datamodule

    write_image(tmp_path / "images" / "a.jpg", 40, 30)
    write_image(tmp_path / "images" / "b.jpg", 40, 30)
    header = ["image_name", "xmin", "xmax", "ymin", "ymax", "class_id"]
    train = write_csv(tmp_path / "train.csv", header, [["a.jpg", 1, 11, 2, 12, 5]])
    val = write_csv(tmp_path / "val.csv", header, [["b.jpg", 1, 11, 2, 12, 2]])
    experiment = (Path(__file__).parents[1] / "conf/experiment/ssd7_csv.yaml").read_text()
    assert "'data.class_names=[car,truck,pedestrian,bicyclist,light]'" in experiment
    cfg = _compose(
        [
            "+experiment=ssd7_csv",
            f"data.train_csv={train}",
            f"data.val_csv={val}",
            f"data.images_dir={tmp_path / 'images'}",
            "data.source.columns.image=image_name",
            "data.source.columns.class=class_id",
            "data.source.columns.width=null",
            "data.source.columns.height=null",
            "data.source.class_format=id",
            "data.class_names=[car,truck,pedestrian,bicyclist,light]",
            "data.num_workers=0",
        ]
    )
    dm = build_datamodule(cfg.data, cfg.augment, cfg.image_size)
    assert dm.class_names == ["car", "truck", "pedestrian", "bicyclist", "light"]
    assert [int(r.labels[0]) for r in dm.dataset("train").records] == [5]
    assert [int(r.labels[0]) for r in dm.dataset("val").records] == [2]


def test_class_names_have_one_key(tmp_path: Path):
    from ssdlit.datamodules import build_datamodule
    from ssdlit.registry import ConfigError

    root = _own_voc_folder(tmp_path / "mine", "images", "annotations")
    data = {"source": {"name": "voc", "root": str(root)}, "train": {}, "num_workers": 0}
    dm = build_datamodule({**data, "class_names": ["dog", "cat"]}, None, 32)
    assert dm.class_names == ["dog", "cat"]  # passed into the source: labels follow it
    assert [int(r.labels[0]) for r in dm.dataset("train").records] == [1, 2, 1]
    with pytest.raises(ConfigError, match=r"data\.class_names"):
        build_datamodule({**data, "source": {**data["source"], "classes": ["dog"]}}, None, 32)


def test_splits_share_the_training_classes(tmp_path: Path):
    # A val split without one of the classes still uses the training split's labels.
    from ssdlit.datamodules import build_datamodule

    write_image(tmp_path / "a.jpg", 40, 30)
    header = ["filename", "class", "xmin", "ymin", "xmax", "ymax"]
    train = write_csv(tmp_path / "t.csv", header, [["a.jpg", "cat", 1, 1, 9, 9],
                                                   ["a.jpg", "dog", 2, 2, 9, 9]])  # fmt: skip
    val = write_csv(tmp_path / "v.csv", header, [["a.jpg", "dog", 1, 1, 9, 9]])
    data = {"source": {"name": "csv"}, "train": {"path": str(train)}, "val": {"path": str(val)}}
    dm = build_datamodule(data, None, 32)
    assert dm.class_names == ["cat", "dog"]
    assert [int(r.labels[0]) for r in dm.dataset("val").records] == [2]


def test_flat_layout_refuses_devkit_splits(tmp_path):
    # A flat folder has no devkit split lists: asked for them, it refuses and says how to
    # read the folder, rather than serve every training image as the val split.
    from ssdlit.registry import ConfigError
    from tests.data_builders import add_flat_item

    root = tmp_path / "mine"
    add_flat_item(root, "a", [{"name": "cat", "box": (2, 2, 20, 16)}])
    with pytest.raises(ConfigError, match="data=voc_folder"):
        DATASETS.build("voc", root=str(root), layout="flat", splits=[["2007", "test"]])
    assert [r.image_id for r in VOCSource(root=root, layout="flat").records] == ["a"]
