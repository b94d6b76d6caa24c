"""CSV annotations: one row per box, columns found by header name.

The ``columns`` option maps the roles ``image, class, xmin, ymin, xmax, ymax`` (and the
optional ``width, height``) to header names, so any column order works::

    # filename,width,height,class,xmin,ymin,xmax,ymax   (the defaults; raccoon's CSVs)
    CSVSource(path="train_labels.csv", images_dir="images", one_based=True)

    # image_name,xmin,xmax,ymin,ymax,class_id            (ssd_keras)
    CSVSource(path="labels.csv", images_dir="images", class_format="id",
              class_names=["car", "truck", ...], columns=SSD_KERAS_COLUMNS)

Given ``columns`` are merged over :data:`DEFAULT_COLUMNS`; ``width``/``height`` are used
when the header has them (an explicitly given name must exist); set them to None to read
sizes from the image headers instead.

- Rows of one image are grouped, even when the file is unsorted; records come in the
  order of each image's first row. A row whose class and coordinate cells are all empty
  declares an image without boxes (keras-retinanet's convention).
- The image cell is a path relative to ``images_dir`` (default: the CSV's folder); the
  image id is that path without its extension (``raccoon-1.jpg`` -> ``raccoon-1``,
  the same id the flat VOC layout gives).
- Coordinates are 0-based continuous pixels by default. ``one_based=True`` reads them
  as VOC-style 1-based inclusive indices and converts them like VOC XML
  (``xmin - 1, ymin - 1, xmax, ymax``): raccoon's CSVs copy its XML files' numbers, so
  with ``one_based=True`` both give identical records.
- Classes: ``class_format="name"`` (matched case-sensitively after stripping; when
  ``class_names`` is None, the sorted set of names found in the files) or ``"id"``
  (integers, ``first_id`` being class 1; ``class_names`` required).
- Text is decoded with ``encoding`` (UTF-8 by default, a byte-order mark is allowed);
  a row with bytes that do not decode is an ``encoding`` problem naming its line.
- Messages name the CSV file and the 1-based line number (line 1 is the header).
  File-level problems (unreadable file, no header, a missing column) always raise,
  whatever ``on_bad`` says: nothing in the file could be read correctly.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from ssdlit.datamodules.images import IMAGE_EXTENSIONS
from ssdlit.datamodules.records import DataError, Source
from ssdlit.datamodules.validation import (
    CLASS_NAMES_KEY,
    CheckImages,
    OnBad,
    RawBox,
    RawImage,
    Validator,
    check_class_names,
)
from ssdlit.registry import DATASETS

__all__ = ["DEFAULT_COLUMNS", "SSD_KERAS_COLUMNS", "CSVSource"]

#: ``filename,width,height,class,xmin,ymin,xmax,ymax`` (TensorFlow object detection, raccoon).
DEFAULT_COLUMNS: dict[str, str | None] = {
    "image": "filename",
    "width": "width",
    "height": "height",
    "class": "class",
    "xmin": "xmin",
    "ymin": "ymin",
    "xmax": "xmax",
    "ymax": "ymax",
}
#: ssd_keras's ``image_name,xmin,xmax,ymin,ymax,class_id`` (use with ``class_format="id"``).
SSD_KERAS_COLUMNS: dict[str, str | None] = {
    "image": "image_name",
    "width": None,
    "height": None,
    "class": "class_id",
    "xmin": "xmin",
    "ymin": "ymin",
    "xmax": "xmax",
    "ymax": "ymax",
}
_REQUIRED = ("image", "class", "xmin", "ymin", "xmax", "ymax")
_COORDS = ("xmin", "ymin", "xmax", "ymax")
_BAD_BYTES = re.compile("[\udc80-\udcff]")  # undecodable bytes under surrogateescape
_IMAGE_SUFFIXES = {e.lower() for e in IMAGE_EXTENSIONS}


def _image_id(cell: str) -> str:
    suffix = Path(cell).suffix
    stem = cell[: -len(suffix)] if suffix.lower() in _IMAGE_SUFFIXES else cell
    return stem.replace("\\", "/")


class _CSVFile:
    """One CSV file read into grouped rows (``image cell -> [(line, cells)]``)."""

    def __init__(
        self, path: Path, columns: Mapping[str, str | None], explicit: set[str], **fmt: Any
    ) -> None:
        self.path = path
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DataError("parse_error", path, "", f"cannot read the CSV file: {exc}") from exc
        encoding = fmt["encoding"]
        if encoding.replace("-", "").replace("_", "").lower() == "utf8":
            encoding = "utf-8-sig"  # accept (and drop) a byte-order mark
        text = data.decode(encoding, errors="surrogateescape")
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=fmt["delimiter"])
        rows: list[tuple[int, list[str]]] = []
        last = 0
        for cells in reader:
            start, last = last + 1, reader.line_num
            if cells and any(c.strip() for c in cells):
                rows.append((start, cells))
        if not rows:
            raise DataError("parse_error", path, "", "empty CSV file (no header row)")
        header_line, header = rows[0]
        bad = _BAD_BYTES.search(",".join(header))
        if bad:
            raise DataError(
                "encoding",
                path,
                f"line {header_line}",
                f"the header is not valid {fmt['encoding']} text (byte 0x{ord(bad.group()) - 0xDC00:02x})",
            )
        names = [h.strip() for h in header]
        self.index: dict[str, int] = {}
        self.column_names: dict[str, str] = {}
        for role, col in columns.items():
            if col is None:
                continue
            if col in names:
                self.index[role] = names.index(col)
                self.column_names[role] = col
            elif role in _REQUIRED or role in explicit:
                raise DataError(
                    "parse_error",
                    path,
                    f"line {header_line}",
                    f"missing column {col!r} (the {role!r} column); the header has {names}",
                )
        self.width = len(names)
        self.groups: dict[str, list[tuple[int, list[str]]]] = {}
        self.orphans: list[DataError] = []
        img = self.index["image"]
        for line, cells in rows[1:]:
            key = cells[img].strip() if img < len(cells) else ""
            if not key:
                self.orphans.append(
                    DataError("parse_error", path, f"line {line}", "no image name in this row")
                )
                continue
            self.groups.setdefault(key, []).append((line, cells))


@DATASETS.register("csv")
class CSVSource(Source):
    """CSV box annotations (one row per box), validated into records.

    Args:
        path: the CSV file, or a list of them (read in order; an image listed in two
            files is a ``duplicate_id`` problem).
        images_dir: folder the image cells are relative to (default: each CSV's folder).
        columns: role -> header name, merged over :data:`DEFAULT_COLUMNS`.
        class_format: ``"name"`` or ``"id"``.
        class_names: the C class names (label i = ``class_names[i - 1]``); for names,
            default: the sorted set of names found.
        first_id: with ``class_format="id"``, the id of the first class (1: ssd_keras,
            where 0 is background; 0 for 0-based ids).
        one_based: coordinates are VOC-style 1-based pixel indices (see the module docstring).
        delimiter, encoding: CSV dialect and text encoding.
        on_bad, clip_tolerance, keep_images_without_gt, check_images: the validation
            policy (:class:`~ssdlit.datamodules.validation.Validator`).
        name: the source's name in the report.
    """

    def __init__(
        self,
        *,
        path: str | Path | Sequence[str | Path],
        images_dir: str | Path | None = None,
        columns: Mapping[str, str | None] | None = None,
        class_format: Literal["name", "id"] = "name",
        class_names: Sequence[str] | None = None,
        first_id: int = 1,
        one_based: bool = False,
        delimiter: str = ",",
        encoding: str = "utf-8",
        on_bad: OnBad = "error",
        clip_tolerance: float = 2.0,
        keep_images_without_gt: bool = True,
        check_images: CheckImages = "header",
        name: str = "csv",
    ) -> None:
        paths = [Path(path)] if isinstance(path, (str, Path)) else [Path(p) for p in path]
        if not paths:
            raise ValueError("path: no CSV file given")
        if class_format not in ("name", "id"):
            raise ValueError(f"class_format must be 'name' or 'id', got {class_format!r}")
        user = dict(columns or {})
        unknown = set(user) - set(DEFAULT_COLUMNS)
        if unknown:
            raise ValueError(
                f"columns: unknown roles {sorted(unknown)}; known {list(DEFAULT_COLUMNS)}"
            )
        cols = {**DEFAULT_COLUMNS, **user}
        explicit = {k for k, v in user.items() if v is not None}
        self.paths = paths
        self.one_based = one_based
        self.class_format = class_format
        self.first_id = first_id
        files = [_CSVFile(p, cols, explicit, delimiter=delimiter, encoding=encoding) for p in paths]
        if class_names is None:
            if class_format == "id":
                raise DataError(
                    "unknown_class",
                    paths[0],
                    "",
                    f"class_format='id' needs class_names (label i = class_names[i-1]); in the "
                    f"config: {CLASS_NAMES_KEY}=[...]",
                )
            found = {
                cells[f.index["class"]].strip()
                for f in files
                for rows in f.groups.values()
                for _, cells in rows
                if f.index["class"] < len(cells) and not _BAD_BYTES.search(cells[f.index["class"]])
            }
            class_names = sorted(n for n in found if n)
            if not class_names:
                raise DataError("parse_error", paths[0], "", "no class names found in the CSV")
        self.class_names = check_class_names(class_names)
        self.on_bad = on_bad
        self._validator = Validator(
            class_names=self.class_names,
            on_bad=on_bad,
            clip_tolerance=clip_tolerance,
            keep_images_without_gt=keep_images_without_gt,
            check_images=check_images,
            name=name,
        )
        self._encoding = encoding
        for f in files:
            base = Path(images_dir) if images_dir is not None else f.path.parent
            for err in f.orphans:
                self._validator.reject(err, count_image=False)
            for key, rows in f.groups.items():
                self._validator.process(
                    lambda f=f, key=key, rows=rows, base=base: self._parse_image(f, key, rows, base)
                )
        self.records = self._validator.finish()
        self.report = self._validator.report

    def _parse_image(
        self, f: _CSVFile, key: str, rows: list[tuple[int, list[str]]], images_dir: Path
    ) -> RawImage:
        image_id = _image_id(key)
        src = str(f.path)

        def fail(kind: str, where: str, detail: str) -> DataError:
            return DataError(kind, src, where, detail, image_id=image_id)

        path = Path(key) if Path(key).is_absolute() else images_dir / key
        raw = RawImage(image_id=image_id, path=path, source=src, where=f"line {rows[0][0]}")
        for line, cells in rows:
            bad = _BAD_BYTES.search("\x1f".join(cells))
            if bad:
                byte = ord(bad.group()) - 0xDC00
                raise fail(
                    "encoding",
                    f"line {line}",
                    f"not valid {self._encoding} text (byte 0x{byte:02x}); set encoding= "
                    "if the file uses another one",
                )
            if len(cells) < f.width:
                raise fail(
                    "parse_error",
                    f"line {line}",
                    f"the row has {len(cells)} cells, the header {f.width}",
                )

            def cell(role: str, cells: list[str] = cells) -> str:
                return cells[f.index[role]].strip()

            def col(role: str, line: int = line) -> str:
                return f"line {line}, column {f.column_names.get(role, role)!r}"

            if "width" in f.index and "height" in f.index:
                size = []
                for role in ("width", "height"):
                    text = cell(role)
                    try:
                        value = float(text)
                        if value != int(value) or value < 0:
                            raise ValueError
                    except ValueError:
                        raise fail(
                            "parse_error", col(role), f"not a pixel count: {text!r}"
                        ) from None
                    size.append(int(value))
                if raw.width is None:
                    raw.width, raw.height = size
                    raw.size_where = f"line {line}, columns 'width'/'height'"
                    raw.size_expected = True
                elif (raw.width, raw.height) != tuple(size):
                    raise fail(
                        "parse_error",
                        f"line {line}",
                        f"size {size[0]}x{size[1]} differs from {raw.width}x{raw.height} "
                        f"given for the same image at {raw.size_where}",
                    )

            texts = [cell(r) for r in _COORDS]
            cls_text = cell("class")
            if not cls_text and not any(texts):
                continue  # an image listed without boxes
            values = []
            for role, text in zip(_COORDS, texts, strict=True):
                try:
                    values.append(float(text))
                except ValueError:
                    what = "missing" if not text else f"not a number: {text!r}"
                    raise fail("parse_error", col(role), what) from None
            if not cls_text:
                raise fail("parse_error", col("class"), "missing class")
            cls: str | int = cls_text
            if self.class_format == "id":
                try:
                    cls = int(cls_text) - self.first_id + 1
                except ValueError:
                    raise fail(
                        "parse_error", col("class"), f"not an integer class id: {cls_text!r}"
                    ) from None
            xmin, ymin, xmax, ymax = values
            if self.one_based:
                xmin, ymin = xmin - 1.0, ymin - 1.0
            raw.boxes.append(
                RawBox(
                    xyxy=(xmin, ymin, xmax, ymax),
                    cls=cls,
                    difficult=False,
                    where=f"line {line}",
                    coord_where=tuple(col(r) for r in _COORDS),  # type: ignore[arg-type]
                    raw=tuple(texts),  # type: ignore[arg-type]
                    class_where=col("class"),
                )
            )
        return raw
