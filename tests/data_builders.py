"""Small builders of annotation files and images for the data-source tests.

Everything is written programmatically into a temporary folder: tiny images, VOC XML
strings, CSV and COCO files, and the bad inputs (truncated JPEG, XML bomb, ...).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

#: The raccoon dataset next to the checkout (``../shared/datasets/raccoon``), where
#: ``conf/data/raccoon.yaml`` looks for it too; ``SSDLIT_RACCOON_DIR`` overrides both.
RACCOON_DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "raccoon"


def require_dataset(path: str | Path, what: str) -> Path:
    """Return ``path`` if it exists; else fail when ``CI`` is set, skip otherwise."""
    path = Path(path)
    if path.exists():
        return path
    message = f"{what} not found at {path}"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set: the test data must be present)")
    pytest.skip(f"{message}; set SSDLIT_RACCOON_DIR or run where it is available")


def raccoon_dataset() -> Path:
    """The raccoon dataset folder (Pascal VOC XML + CSV); skip if missing, fail under CI.

    ``SSDLIT_RACCOON_DIR`` overrides the default location.
    """
    root = Path(os.environ.get("SSDLIT_RACCOON_DIR", RACCOON_DEFAULT))
    require_dataset(root / "annotations", "the raccoon dataset")
    return root


def write_image(
    path: Path,
    width: int = 32,
    height: int = 24,
    *,
    mode: str = "RGB",
    colour: Any = (120, 60, 30),
    exif_orientation: int | None = None,
    **save: Any,
) -> Path:
    """Write a plain image of ``mode`` and size ``width x height`` (stored pixels)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new(mode, (width, height), colour)
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        save["exif"] = exif
    im.save(path, **save)
    return path


def voc_xml(
    filename: str,
    width: int | None,
    height: int | None,
    objects: Sequence[dict[str, Any]] = (),
    *,
    prolog: str = "",
) -> str:
    """A VOC XML document. Each object: ``name``, ``box`` (xmin, ymin, xmax, ymax; any
    values, written as text), optional ``difficult``, ``truncated``."""
    parts = [prolog, "<annotation>", f"<filename>{filename}</filename>"]
    if width is not None and height is not None:
        parts.append(
            f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"
        )
    for obj in objects:
        parts.append("<object>")
        parts.append(f"<name>{obj['name']}</name>")
        for flag in ("difficult", "truncated"):
            if flag in obj:
                parts.append(f"<{flag}>{obj[flag]}</{flag}>")
        if obj.get("box") is not None:
            tags = ("xmin", "ymin", "xmax", "ymax")
            inner = "".join(f"<{t}>{v}</{t}>" for t, v in zip(tags, obj["box"], strict=True))
            parts.append(f"<bndbox>{inner}</bndbox>")
        parts.append("</object>")
    parts.append("</annotation>")
    return "\n".join(parts)


def add_flat_item(
    root: Path,
    stem: str,
    objects: Sequence[dict[str, Any]],
    *,
    width: int = 32,
    height: int = 24,
    xml_size: tuple[int, int] | None = None,
    image: bool = True,
    xml_text: str | None = None,
) -> None:
    """Add one image + XML to a flat layout (``root/images``, ``root/annotations``)."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(parents=True, exist_ok=True)
    if image:
        write_image(root / "images" / f"{stem}.jpg", width, height)
    w, h = xml_size if xml_size is not None else (width, height)
    text = xml_text if xml_text is not None else voc_xml(f"{stem}.jpg", w, h, objects)
    (root / "annotations" / f"{stem}.xml").write_text(text, encoding="utf-8")


#: Two clean images for every bad-input case, and the records they must give.
GOOD_ITEMS: dict[str, list[dict[str, Any]]] = {
    "good1": [{"name": "cat", "box": (1, 1, 10, 8)}],
    "good2": [{"name": "dog", "box": (5, 4, 32, 24)}, {"name": "cat", "box": (2, 2, 6, 6)}],
}
GOOD_EXPECTED: dict[str, tuple[list[list[float]], list[int]]] = {
    "good1": ([[0, 0, 10, 8]], [1]),
    "good2": ([[4, 3, 32, 24], [1, 1, 6, 6]], [2, 1]),
}
CLASSES = ["cat", "dog"]


def flat_dataset(root: Path) -> Path:
    """A flat VOC dataset with the two good items."""
    for stem, objects in GOOD_ITEMS.items():
        add_flat_item(root, stem, objects)
    return root


def csv_rows_good() -> list[list[Any]]:
    """Rows (filename,width,height,class,xmin,ymin,xmax,ymax) of the good items, 0-based."""
    rows = []
    for stem, (boxes, labels) in GOOD_EXPECTED.items():
        for box, label in zip(boxes, labels, strict=True):
            rows.append([f"{stem}.jpg", 32, 24, CLASSES[label - 1], *box])
    return rows


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    lines = [",".join(header)] + [",".join(str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_coco(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def truncated_jpeg(path: Path, size: int = 64, cut: int = 20) -> tuple[Path, np.ndarray]:
    """A JPEG missing its last ``cut`` bytes (header intact, the tail of the data gone), as
    web-scraped files often are. Returns the path and the intact file's decoded pixels
    (uint8 ``[size, size, 3]``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, quality=95)
    data = path.read_bytes()
    with Image.open(path) as im:
        intact = np.asarray(im.convert("RGB")).copy()
    path.write_bytes(data[: len(data) - cut])
    return path, intact


def corrupt_jpeg(path: Path, width: int = 32, height: int = 24) -> Path:
    """A JPEG whose header reads (size known) but whose data cannot be decoded, truncated-file
    tolerance or not: its scan refers to colour components the frame does not have, and
    garbage follows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (120, 60, 30)).save(path, quality=95)
    data = bytearray(path.read_bytes())
    sos = data.index(b"\xff\xda")  # start of scan: 2-byte length, count, (id, tables) each
    for k in range(data[sos + 4]):
        data[sos + 5 + 2 * k] = 200 + k  # component ids the frame header never declared
    garbage = np.random.default_rng(1).integers(0, 256, 600, dtype=np.uint8).tobytes()
    path.write_bytes(
        bytes(data[: sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")]) + garbage
    )
    return path


BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE annotation [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<annotation><filename>bad.jpg</filename><object><name>&lol9;</name></object></annotation>
"""

EXTERNAL_ENTITY = """<?xml version="1.0"?>
<!DOCTYPE annotation [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<annotation><filename>bad.jpg</filename>
<size><width>32</width><height>24</height></size>
<object><name>&xxe;</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object>
</annotation>
"""
