"""A corpus of bad inputs: each gives a clear error (file + line/element) under
``on_bad="error"`` and a counted skip under ``on_bad="skip"``, with the good records intact.
Also: clipping within tolerance, EXIF rotation, odd image modes, truncated files."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from PIL import Image

from ssdlit.datamodules import (
    COCOSource,
    CSVSource,
    DataError,
    VOCSource,
    decode_image,
    load_rgb,
    read_header,
)
from ssdlit.datamodules.records import Source
from tests.data_builders import (
    BILLION_LAUGHS,
    CLASSES,
    EXTERNAL_ENTITY,
    GOOD_EXPECTED,
    add_flat_item,
    corrupt_jpeg,
    csv_rows_good,
    flat_dataset,
    truncated_jpeg,
    voc_xml,
    write_coco,
    write_csv,
    write_image,
)

CSV_HEADER = ["filename", "width", "height", "class", "xmin", "ymin", "xmax", "ymax"]

# ---------------------------------------------------------------------------------------
# The corpus. A case builds its files under tmp_path and returns a factory
# ``on_bad -> source``; the bad entry must be named in the message.


@dataclass
class Case:
    id: str
    build: Callable[[Path], Callable[[str], Source]]
    kind: str
    file: str  # a name the message must contain (the file at fault)
    where: str  # the line / element the message must name
    expected: dict[str, tuple[list[list[float]], list[int]]] = field(
        default_factory=lambda: dict(GOOD_EXPECTED)
    )
    skipped_images: int = 1


def voc_case(objects: list[dict[str, Any]] | None = None, **item_kw: Any) -> Callable:
    def build(tmp: Path) -> Callable[[str], Source]:
        root = flat_dataset(tmp / "voc")
        add_flat_item(root, "bad", objects or [], **item_kw)
        return lambda on_bad: VOCSource(root=root, classes=CLASSES, on_bad=on_bad)

    return build


def voc_bad_image(writer: Callable[[Path], Any], **source_kw: Any):
    def build(tmp: Path) -> Callable[[str], Source]:
        root = flat_dataset(tmp / "voc")
        add_flat_item(root, "bad", [{"name": "cat", "box": (1, 1, 5, 5)}], image=False)
        writer(root / "images" / "bad.jpg")
        return lambda on_bad: VOCSource(root=root, classes=CLASSES, on_bad=on_bad, **source_kw)

    return build


def voc_duplicate(tmp: Path) -> Callable[[str], Source]:
    root = tmp / "VOC2007"
    for stem, objects in (
        ("good1", [{"name": "cat", "box": (1, 1, 10, 8)}]),
        ("good2", [{"name": "dog", "box": (5, 4, 32, 24)}, {"name": "cat", "box": (2, 2, 6, 6)}]),
    ):
        write_image(root / "JPEGImages" / f"{stem}.jpg")
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"{stem}.xml").write_text(voc_xml(f"{stem}.jpg", 32, 24, objects))
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text("good1\ngood2\ngood1\n")
    return lambda on_bad: VOCSource(root=root, splits=["train"], classes=CLASSES, on_bad=on_bad)


def csv_case(bad_rows: list[list[Any]] | bytes, *, files: int = 1, **source_kw: Any):
    def build(tmp: Path) -> Callable[[str], Source]:
        for stem in ("good1", "good2", "bad"):
            write_image(tmp / "images" / f"{stem}.jpg")
        path = write_csv(tmp / "labels.csv", CSV_HEADER, csv_rows_good())
        if isinstance(bad_rows, bytes):
            with path.open("ab") as f:
                f.write(bad_rows)
        else:
            with path.open("a", encoding="utf-8") as f:
                f.writelines(",".join(str(v) for v in row) + "\n" for row in bad_rows)
        paths = [path]
        if files == 2:
            paths.append(write_csv(tmp / "more.csv", CSV_HEADER, csv_rows_good()[:1]))
        return lambda on_bad: CSVSource(
            path=paths, images_dir=tmp / "images", on_bad=on_bad, **source_kw
        )

    return build


COCO_GOOD_EXPECTED = {"1": GOOD_EXPECTED["good1"], "2": GOOD_EXPECTED["good2"]}


def coco_case(mutate: Callable[[dict[str, Any]], None]):
    def build(tmp: Path) -> Callable[[str], Source]:
        images, annotations = [], []
        for n, stem in enumerate(("good1", "good2"), 1):
            write_image(tmp / f"{stem}.jpg")
            images.append({"id": n, "file_name": f"{stem}.jpg", "width": 32, "height": 24})
            for box, label in zip(*GOOD_EXPECTED[stem], strict=True):
                x1, y1, x2, y2 = box
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": n,
                        "category_id": label,
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "iscrowd": 0,
                    }
                )
        write_image(tmp / "bad.jpg")
        images.append({"id": 3, "file_name": "bad.jpg", "width": 32, "height": 24})
        annotations.append(
            {"id": 4, "image_id": 3, "category_id": 1, "bbox": [1, 1, 5, 5], "iscrowd": 0}
        )
        data = {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
        }
        mutate(data)
        path = write_coco(tmp / "instances.json", data)
        return lambda on_bad: COCOSource(annotation_file=path, on_bad=on_bad)

    return build


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """Mutator for the COCO document: ``_set("annotations.3.bbox", [..])``."""

    def mutate(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = data
        for key in parents:
            node = node[int(key)] if key.isdigit() else node[key]
        node[int(last) if last.isdigit() else last] = value

    return mutate


def _duplicate_image(data: dict[str, Any]) -> None:
    data["images"][2]["id"] = 1  # the third image reuses the first one's id
    del data["annotations"][3]


CAT = {"name": "cat", "box": (1, 1, 5, 5)}

CASES = [
    # --- VOC XML -----------------------------------------------------------------------
    Case("degenerate_x", voc_case([{"name": "cat", "box": (10, 1, 5, 8)}]),
         "degenerate_box", "bad.xml", "object[1]/bndbox"),
    Case("degenerate_y", voc_case([CAT, {"name": "cat", "box": (1, 8, 10, 3)}]),
         "degenerate_box", "bad.xml", "object[2]/bndbox"),
    Case("nan_coordinate", voc_case([{"name": "cat", "box": ("nan", 1, 10, 8)}]),
         "non_finite", "bad.xml", "object[1]/bndbox/xmin"),
    Case("inf_coordinate", voc_case([{"name": "cat", "box": (1, 1, "inf", 8)}]),
         "non_finite", "bad.xml", "object[1]/bndbox/xmax"),
    Case("outside_right", voc_case([CAT, {"name": "dog", "box": (1, 1, 40, 8)}]),
         "out_of_image", "bad.xml", "object[2]/bndbox/xmax"),
    Case("outside_top", voc_case([{"name": "dog", "box": (1, -5, 10, 8)}]),
         "out_of_image", "bad.xml", "object[1]/bndbox/ymin"),
    Case("empty_after_clipping", voc_case([{"name": "cat", "box": (33, 1, 34, 8)}]),
         "degenerate_box", "bad.xml", "object[1]/bndbox"),
    Case("unknown_class", voc_case([CAT, {"name": "bird", "box": (1, 1, 5, 5)}]),
         "unknown_class", "bad.xml", "object[2]/name"),
    Case("class_case_sensitive", voc_case([{"name": "Cat", "box": (1, 1, 5, 5)}]),
         "unknown_class", "bad.xml", "object[1]/name"),
    Case("missing_image", voc_case([CAT], image=False),
         "missing_image", "bad.jpg", "bad.xml"),
    Case("unreadable_image", voc_bad_image(lambda p: p.write_bytes(b"not an image at all")),
         "unreadable_image", "bad.jpg", "bad.xml"),
    Case("corrupt_jpeg_decoded", voc_bad_image(corrupt_jpeg, check_images="decode"),
         "unreadable_image", "bad.jpg", "bad.xml"),
    Case("zero_byte_image", voc_bad_image(lambda p: p.write_bytes(b"")),
         "unreadable_image", "bad.jpg", "bad.xml"),
    Case("size_mismatch", voc_case([CAT], xml_size=(40, 24)),
         "size_mismatch", "bad.xml", "size"),
    Case("xml_bomb", voc_case(xml_text=BILLION_LAUGHS), "unsafe_xml", "bad.xml", "entit"),
    Case("external_entity", voc_case(xml_text=EXTERNAL_ENTITY),
         "unsafe_xml", "bad.xml", "entit"),
    Case("malformed_xml", voc_case(xml_text="<annotation><object></annotation>"),
         "parse_error", "bad.xml", "line 1, column"),
    Case("non_numeric_xml", voc_case([{"name": "cat", "box": (1, 1, 10, "8px")}]),
         "parse_error", "bad.xml", "object[1]/bndbox/ymax"),
    Case("missing_bndbox", voc_case([CAT, {"name": "cat", "box": None}]),
         "parse_error", "bad.xml", "object[2]/bndbox"),
    Case("bad_difficult_flag", voc_case([{**CAT, "difficult": "maybe"}]),
         "parse_error", "bad.xml", "object[1]/difficult"),
    Case("duplicate_id", voc_duplicate, "duplicate_id", "good1.xml", "good1"),
    # --- CSV ---------------------------------------------------------------------------
    Case("csv_non_numeric", csv_case([["bad.jpg", 32, 24, "cat", 1, 1, "x9", 8]]),
         "parse_error", "labels.csv", "line 5, column 'xmax'"),
    Case("csv_non_utf8", csv_case(b"bad.jpg,32,24,caf\xe9,1,1,9,8\n"),
         "encoding", "labels.csv", "line 5"),
    Case("csv_unknown_class", csv_case([["bad.jpg", 32, 24, "bird", 1, 1, 9, 8]],
                                       class_names=CLASSES),
         "unknown_class", "labels.csv", "line 5, column 'class'"),
    Case("csv_short_row", csv_case([["bad.jpg", 32, 24, "cat", 1]]),
         "parse_error", "labels.csv", "line 5"),
    Case("csv_outside", csv_case([["bad.jpg", 32, 24, "cat", 1, 1, 50, 8]]),
         "out_of_image", "labels.csv", "line 5, column 'xmax'"),
    Case("csv_nan", csv_case([["bad.jpg", 32, 24, "cat", 1, "nan", 9, 8]]),
         "non_finite", "labels.csv", "line 5, column 'ymin'"),
    Case("csv_degenerate", csv_case([["bad.jpg", 32, 24, "cat", 9, 1, 9, 8]]),
         "degenerate_box", "labels.csv", "line 5"),
    Case("csv_size_conflict", csv_case([["bad.jpg", 32, 24, "cat", 1, 1, 9, 8],
                                        ["bad.jpg", 30, 24, "cat", 1, 1, 9, 8]]),
         "parse_error", "labels.csv", "line 6"),
    Case("csv_missing_image", csv_case([["nothere.jpg", 32, 24, "cat", 1, 1, 9, 8]]),
         "missing_image", "nothere.jpg", "line 5"),
    Case("csv_duplicate_across_files", csv_case([], files=2),
         "duplicate_id", "more.csv", "line 2"),
    # --- COCO --------------------------------------------------------------------------
    Case("coco_unknown_category", coco_case(_set("annotations.3.category_id", 9)),
         "unknown_class", "instances.json", "annotations[3] (id 4)/category_id",
         expected=COCO_GOOD_EXPECTED),
    Case("coco_unknown_image", coco_case(_set("annotations.3.image_id", 99)),
         "unknown_image", "instances.json", "annotations[3] (id 4)/image_id",
         expected={**COCO_GOOD_EXPECTED, "3": ([], [])}, skipped_images=0),
    Case("coco_negative_width", coco_case(_set("annotations.3.bbox", [5, 1, -2, 4])),
         "degenerate_box", "instances.json", "annotations[3] (id 4)/bbox",
         expected=COCO_GOOD_EXPECTED),
    Case("coco_bad_bbox", coco_case(_set("annotations.3.bbox", [1, 2, 3])),
         "parse_error", "instances.json", "annotations[3] (id 4)/bbox",
         expected=COCO_GOOD_EXPECTED),
    Case("coco_duplicate_image", coco_case(_duplicate_image),
         "duplicate_id", "instances.json", "images[2] (id 1)",
         expected=COCO_GOOD_EXPECTED),
]  # fmt: skip


def test_corpus_is_large_enough():
    assert len(CASES) >= 20
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_error_and_skip(case: Case, tmp_path: Path):
    make = case.build(tmp_path)

    with pytest.raises(DataError) as info:
        make("error")
    err = info.value
    msg = str(err)
    assert err.kind == case.kind, msg
    assert case.file in msg, msg
    assert case.where in msg, msg
    assert isinstance(err, ValueError)

    source = make("skip")
    report = source.report
    assert report.counts("error") == {case.kind: 1}, report.summary()
    assert report.skipped_images == case.skipped_images
    got = {r.image_id: r for r in source.records}
    assert set(got) == set(case.expected), report.summary()
    for image_id, (boxes, labels) in case.expected.items():
        np.testing.assert_array_equal(
            got[image_id].boxes, np.asarray(boxes, np.float32).reshape(-1, 4)
        )
        np.testing.assert_array_equal(got[image_id].labels, labels)
    example = report.errors[0]
    assert case.file in example.message() and case.where in example.message()
    assert case.kind in report.summary()


# ---------------------------------------------------------------------------------------
# File-level problems: nothing can be read, so they raise whatever on_bad says.


@pytest.mark.parametrize("on_bad", ["error", "skip"])
def test_csv_missing_column_always_raises(tmp_path: Path, on_bad: str):
    path = write_csv(tmp_path / "l.csv", ["filename", "class", "xmin", "ymin", "xmax"], [])
    with pytest.raises(DataError, match=r"l\.csv, line 1: missing column 'ymax'") as info:
        CSVSource(path=path, on_bad=on_bad)
    assert info.value.kind == "parse_error"


@pytest.mark.parametrize("on_bad", ["error", "skip"])
def test_coco_malformed_json_always_raises(tmp_path: Path, on_bad: str):
    path = tmp_path / "bad.json"
    path.write_text('{"images": [\n  {"id": 1,,}\n]}')
    with pytest.raises(DataError, match=r"bad\.json, line 2, column \d+: bad JSON"):
        COCOSource(annotation_file=path, on_bad=on_bad)


def test_csv_header_not_utf8_and_empty_file(tmp_path: Path):
    path = tmp_path / "h.csv"
    path.write_bytes(b"file\xffname,class\n")
    with pytest.raises(DataError, match=r"h\.csv, line 1: the header is not valid"):
        CSVSource(path=path, on_bad="skip")
    empty = tmp_path / "e.csv"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="empty CSV"):
        CSVSource(path=empty)


def test_csv_other_encoding_accepted(tmp_path: Path):
    write_image(tmp_path / "a.jpg")
    path = tmp_path / "l.csv"
    path.write_bytes("filename,class,xmin,ymin,xmax,ymax\na.jpg,café,1,1,5,5\n".encode("latin-1"))
    src = CSVSource(path=path, encoding="latin-1")
    assert src.class_names == ["café"]


# ---------------------------------------------------------------------------------------
# Fixes (notes): never raised, the image is kept.


@pytest.mark.parametrize("on_bad", ["error", "skip"])
def test_within_tolerance_is_clipped(tmp_path: Path, on_bad: str):
    root = flat_dataset(tmp_path)
    add_flat_item(root, "edge", [{"name": "cat", "box": (0, -1, 34, 25)}])  # 1..2 px out
    src = VOCSource(root=root, classes=CLASSES, on_bad=on_bad)
    rec = {r.image_id: r for r in src.records}["edge"]
    np.testing.assert_array_equal(rec.boxes, [[0, 0, 32, 24]])
    assert src.report.counts("note") == {"clipped": 1}
    assert src.report.ok and src.report.skipped_images == 0
    note = src.report.notes[0]
    assert "edge.xml" in note.file and note.where == "object[1]/bndbox"
    # a smaller tolerance makes it an error
    with pytest.raises(DataError, match="object\\[1\\]/bndbox/ymin"):
        VOCSource(root=root, classes=CLASSES, clip_tolerance=1.5)


def test_empty_annotations_kept_or_dropped(tmp_path: Path):
    root = flat_dataset(tmp_path)
    add_flat_item(root, "empty", [])
    add_flat_item(root, "onlydifficult", [{"name": "cat", "box": (1, 1, 5, 5), "difficult": 1}])
    kept = VOCSource(root=root, classes=CLASSES)
    assert {r.image_id for r in kept.records} == {"good1", "good2", "empty", "onlydifficult"}
    assert kept.report.images_without_gt == 1 and kept.report.difficult == 1
    dropped = VOCSource(
        root=root, classes=CLASSES, keep_images_without_gt=False, exclude_difficult=True
    )
    assert {r.image_id for r in dropped.records} == {"good1", "good2"}
    assert dropped.report.counts("note") == {"empty_dropped": 2}
    assert dropped.report.ok


def test_missing_size_read_from_image(tmp_path: Path):
    root = flat_dataset(tmp_path)
    add_flat_item(root, "nosize", [], xml_text=voc_xml("nosize.jpg", None, None, [CAT]))
    write_image(root / "images" / "nosize.jpg", 40, 30)
    src = VOCSource(root=root, classes=CLASSES)
    rec = {r.image_id: r for r in src.records}["nosize"]
    assert (rec.width, rec.height) == (40, 30)
    assert src.report.counts("note") == {"size_from_image": 1}


def test_report_summary_and_write(tmp_path: Path):
    root = flat_dataset(tmp_path / "d")
    add_flat_item(root, "bad1", [{"name": "bird", "box": (1, 1, 5, 5)}])
    add_flat_item(root, "bad2", [{"name": "cat", "box": (9, 1, 5, 5)}])
    add_flat_item(root, "edge", [{"name": "cat", "box": (0, 1, 5, 5)}])
    src = VOCSource(root=root, classes=CLASSES, on_bad="skip")
    report = src.report
    assert report.counts("error") == {"unknown_class": 1, "degenerate_box": 1}
    assert report.skipped_images == 2 and report.images == 3
    text = report.summary()
    assert "3 images kept" in text and "2 images skipped" in text
    assert "degenerate_box 1" in text and "unknown_class 1" in text and "clipped 1" in text
    assert "bad1.xml, object[1]/name" in text
    lines = report.write(tmp_path / "run" / "data_problems.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == 3
    assert {r["kind"] for r in rows} == {"unknown_class", "degenerate_box", "clipped"}
    assert all(set(r) == {"severity", "kind", "file", "where", "detail", "image_id"} for r in rows)
    txt = report.write(tmp_path / "run" / "problems.txt").read_text()
    assert "bad2.xml, object[1]/bndbox" in txt


# ---------------------------------------------------------------------------------------
# Images: EXIF rotation, odd modes, truncated files.


def _rotated_jpeg(path: Path) -> Path:
    """Stored 20 wide x 10 high, red left half; EXIF 6 = rotate 90 degrees clockwise."""
    arr = np.zeros((10, 20, 3), np.uint8)
    arr[:, :10] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(path, exif=exif, quality=95)
    return path


def test_exif_rotated_size_accepted_and_loaded_transposed(tmp_path: Path):
    root = tmp_path
    add_flat_item(root, "rot", [{"name": "cat", "box": (1, 1, 10, 20)}], image=False,
                  xml_size=(10, 20))  # fmt: skip
    _rotated_jpeg(root / "images" / "rot.jpg")
    header = read_header(root / "images" / "rot.jpg")
    assert (header.width, header.height, header.stored_width, header.orientation) == (10, 20, 20, 6)
    src = VOCSource(root=root, classes=CLASSES)
    (rec,) = src.records
    assert rec.apply_exif and (rec.width, rec.height) == (10, 20)
    assert src.report.counts("note") == {"exif_transposed": 1}
    img = rec.load_image()
    assert img.shape == (20, 10, 3) and img.dtype == np.uint8
    # rotated clockwise: the stored left half (red) is now the top half
    assert img[:8, :, 0].mean() > 200 and img[12:, :, 0].mean() < 50


def test_exif_annotation_on_stored_pixels_loaded_unrotated(tmp_path: Path):
    add_flat_item(tmp_path, "rot", [CAT], image=False, xml_size=(20, 10))
    _rotated_jpeg(tmp_path / "images" / "rot.jpg")
    src = VOCSource(root=tmp_path, classes=CLASSES)
    (rec,) = src.records
    assert not rec.apply_exif and rec.load_image().shape == (10, 20, 3)
    assert src.report.counts("note") == {"exif_ignored": 1}


def test_exif_rotated_wrong_size_still_mismatch(tmp_path: Path):
    add_flat_item(tmp_path, "rot", [CAT], image=False, xml_size=(20, 20))
    _rotated_jpeg(tmp_path / "images" / "rot.jpg")
    with pytest.raises(
        DataError, match=r"rot\.xml, size: .*10x20 \(stored 20x10, EXIF orientation 6\)"
    ):
        VOCSource(root=tmp_path, classes=CLASSES)


def test_undecodable_image_load_raises_naming_file(tmp_path: Path):
    path = corrupt_jpeg(tmp_path / "cut.jpg")
    assert read_header(path).width == 32  # the header alone is fine
    with pytest.raises(DataError, match=r"cut\.jpg: cannot read the image") as info:
        load_rgb(path)
    assert info.value.kind == "unreadable_image"
    with pytest.raises(DataError, match=r"nothere\.jpg: image file not found"):
        load_rgb(tmp_path / "nothere.jpg")
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match=r"junk\.png"):
        load_rgb(tmp_path / "junk.png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.jpg"):
        load_rgb(tmp_path / "empty.jpg")
    png = tmp_path / "half.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)).save(png)
    png.write_bytes(png.read_bytes()[:-2000])  # a PNG cut in its pixel data: beyond repair
    with pytest.raises(DataError, match=r"half\.png"):
        load_rgb(png)


def test_tail_truncated_jpeg_loads_as_opencv_does_with_a_note(tmp_path: Path):
    from PIL import ImageFile

    path, intact = truncated_jpeg(tmp_path / "images" / "cut.jpg", cut=20)
    arr, truncated = decode_image(path)
    assert truncated and arr.shape == intact.shape and arr.dtype == np.uint8
    np.testing.assert_array_equal(arr[:32], intact[:32])  # the part still in the file
    np.testing.assert_array_equal(load_rgb(path), arr)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # tolerance scoped to the one load
    assert not decode_image(write_image(tmp_path / "whole.jpg"))[1]

    # Parsed with check_images="decode": kept, with a note naming the file.
    add_flat_item(tmp_path, "cut", [CAT], image=False, width=64, height=64)
    src = VOCSource(root=tmp_path, classes=CLASSES, check_images="decode", on_bad="error")
    assert [r.image_id for r in src.records] == ["cut"] and src.report.skipped_images == 0
    assert src.report.counts("note") == {"truncated_image": 1}
    assert "cut.jpg" in src.report.notes[0].message()
    assert "truncated_image" in src.report.summary()


def _check_rgb(arr: np.ndarray, shape: tuple[int, int]) -> None:
    assert arr.dtype == np.uint8 and arr.shape == (*shape, 3) and arr.flags["C_CONTIGUOUS"]


def test_grayscale_and_bilevel(tmp_path: Path):
    arr = load_rgb(write_image(tmp_path / "g.png", 6, 4, mode="L", colour=77))
    _check_rgb(arr, (4, 6))
    assert (arr == 77).all()
    arr = load_rgb(write_image(tmp_path / "g.jpg", 6, 4, mode="L", colour=77))
    assert abs(int(arr[0, 0, 0]) - 77) <= 2 and (arr[..., 0] == arr[..., 2]).all()
    arr = load_rgb(write_image(tmp_path / "b.png", 6, 4, mode="1", colour=1))
    assert (arr == 255).all()


def test_rgba_and_la_composited_over_white(tmp_path: Path):
    arr = load_rgb(write_image(tmp_path / "a.png", 5, 3, mode="RGBA", colour=(255, 0, 0, 128)))
    _check_rgb(arr, (3, 5))
    np.testing.assert_array_equal(arr[0, 0], [255, 127, 127])
    transparent = load_rgb(
        write_image(tmp_path / "t.png", 5, 3, mode="RGBA", colour=(0, 0, 255, 0))
    )
    assert (transparent == 255).all()  # hidden colour never shows
    arr = load_rgb(write_image(tmp_path / "la.png", 5, 3, mode="LA", colour=(0, 255)))
    assert (arr == 0).all()
    black_bg = load_rgb(tmp_path / "a.png", background=(0, 0, 0))
    np.testing.assert_array_equal(black_bg[0, 0], [128, 0, 0])


def test_palette_with_and_without_transparency(tmp_path: Path):
    im = Image.new("P", (4, 4), 1)
    im.putpalette([0, 0, 0, 10, 200, 30] + [0, 0, 0] * 254)
    im.save(tmp_path / "p.png")
    arr = load_rgb(tmp_path / "p.png")
    _check_rgb(arr, (4, 4))
    assert (arr == [10, 200, 30]).all()
    im.save(tmp_path / "pt.png", transparency=1)
    assert (load_rgb(tmp_path / "pt.png") == 255).all()
    im.save(tmp_path / "p.gif")
    assert (load_rgb(tmp_path / "p.gif") == [10, 200, 30]).all()


def test_cmyk(tmp_path: Path):
    tif = write_image(tmp_path / "c.tif", 4, 4, mode="CMYK", colour=(0, 255, 255, 0))
    np.testing.assert_array_equal(load_rgb(tif)[0, 0], [255, 0, 0])
    jpg = write_image(tmp_path / "c.jpg", 8, 8, mode="CMYK", colour=(0, 255, 255, 0), quality=100)
    assert Image.open(jpg).mode == "CMYK"
    r, g, b = load_rgb(jpg)[4, 4].astype(int)
    assert r > 240 and g < 15 and b < 15


def test_16bit_png_scaled_not_clipped(tmp_path: Path):
    gray = np.array([[0, 257 * 100, 65535, 1000]], dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "g16.png"), gray)
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    arr = load_rgb(tmp_path / "g16.png")
    _check_rgb(arr, (1, 4))
    np.testing.assert_array_equal(arr[0, :, 0], [0, 100, 255, 4])
    rgb16 = np.array([[[65535, 0, 257 * 50], [1000, 30000, 60000]]], dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "c16.png"), rgb16[:, :, ::-1])  # cv2 writes BGR
    arr = load_rgb(tmp_path / "c16.png")
    _check_rgb(arr, (1, 2))
    np.testing.assert_allclose(arr.astype(int), (rgb16 / 257.0).round(), atol=1)


def test_32bit_int_and_float_modes(tmp_path: Path):
    im = Image.fromarray(np.array([[0, 65535]], dtype=np.int32), mode="I")
    im.save(tmp_path / "i.tif")
    np.testing.assert_array_equal(load_rgb(tmp_path / "i.tif")[0, :, 1], [0, 255])
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F").save(
        tmp_path / "f.tif"
    )
    np.testing.assert_array_equal(load_rgb(tmp_path / "f.tif")[0, :, 0], [0, 128, 255])


def test_check_images_modes(tmp_path: Path):
    root = flat_dataset(tmp_path)
    add_flat_item(root, "bigger", [CAT], xml_size=(40, 24))  # annotation disagrees with file
    fast = VOCSource(root=root, classes=CLASSES, check_images="exists")  # sizes trusted
    assert {r.image_id: r.width for r in fast.records}["bigger"] == 40
    with pytest.raises(DataError, match="size_mismatch"):
        VOCSource(root=root, classes=CLASSES, check_images="header")
    (root / "images" / "good1.jpg").unlink()
    with pytest.raises(DataError, match=r"good1\.jpg") as info:
        VOCSource(root=root, classes=CLASSES, check_images="exists")
    assert info.value.kind == "missing_image"
    with pytest.raises(ValueError, match="check_images"):
        VOCSource(root=root, classes=CLASSES, check_images="never")


def test_image_found_by_filename_field(tmp_path: Path):
    add_flat_item(
        tmp_path, "ann7", [CAT], image=False, xml_text=voc_xml("photo.jpg", 32, 24, [CAT])
    )
    write_image(tmp_path / "images" / "photo.jpg")
    src = VOCSource(root=tmp_path, classes=CLASSES)
    assert src.records[0].path.name == "photo.jpg" and src.records[0].image_id == "ann7"
    assert src.report.counts("note") == {"image_by_filename": 1}
