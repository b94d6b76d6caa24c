"""Pascal VOC XML annotations: the devkit layout and a flat folder layout.

Layouts:

- **devkit**: ``root/VOC2007/{JPEGImages,Annotations,ImageSets/Main/<set>.txt}``. Give
  ``splits`` as (year, set) pairs, e.g. ``[["2007", "trainval"], ["2012", "trainval"]]``
  with ``root`` the ``VOCdevkit`` folder (image ids are then ``"VOC2007/000005"``), or as
  set names, e.g. ``["trainval"]`` or ``"trainval"``, with ``root`` one year's folder (ids
  ``"000005"``). A flat list of strings is always set names, never one pair.
- **flat**: ``root/images/`` and ``root/annotations/*.xml`` (folder names configurable),
  every XML file in natural order (``a-2`` before ``a-10``), or only the ids listed in
  ``split_file`` (one id or file name per line). Image ids are the XML file stems.

Coordinates: VOC XML stores 1-based inclusive pixel indices (a box over the whole
W x H image is ``xmin=1, ymin=1, xmax=W, ymax=H``). They become 0-based continuous xyxy
by ``(xmin - 1, ymin - 1, xmax, ymax)``, as detectron2 does (the whole image is then
``(0, 0, W, H)`` and width = ``xmax - xmin + 1``). Writers of VOC XML (the synthetic
source) do the inverse. A file that uses 0 for the first pixel gives ``-1``, which the
validator clips (within ``clip_tolerance``) and notes. Non-integer coordinates are
accepted and converted the same way.

Classes: ``classes`` lists the known class names (label i = ``classes[i - 1]``; from the
config: ``data.class_names``). When it is None, the devkit layout knows the 20 VOC classes
(:data:`VOC_CLASSES`) and the flat layout, a folder of your own, the sorted set of names
found in its XML files (as :class:`~ssdlit.datamodules.csv_source.CSVSource` does).
Class names are matched case-sensitively after stripping surrounding whitespace
(``" Dog "`` is ``"Dog"``, which is not ``"dog"``). ``include_classes`` keeps only those
classes, relabelled 1..len(include_classes) in the order given; objects of the other
known classes are dropped silently; unknown names are ``unknown_class`` problems.
``difficult`` and ``truncated`` default to 0 when absent; ``exclude_difficult`` /
``exclude_truncated`` drop those objects, otherwise difficult boxes are kept with
``difficult=True``.

XML is parsed with ``defusedxml``: a file declaring entities (billion laughs, external
entities) is refused with an ``unsafe_xml`` problem, never expanded. Element locators in
messages are XPath-like and 1-based: ``object[2]/bndbox/xmax`` is the ``xmax`` of the
second ``<object>``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal
from xml.etree.ElementTree import Element, ParseError

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException

from ssdlit.datamodules.images import IMAGE_EXTENSIONS
from ssdlit.datamodules.records import DataError, Source
from ssdlit.datamodules.validation import (
    CLASS_NAMES_KEY,
    CheckImages,
    OnBad,
    Problem,
    RawBox,
    RawImage,
    Validator,
    check_class_names,
)
from ssdlit.registry import DATASETS

__all__ = [
    "VOC_CLASSES",
    "VOCSource",
    "find_image",
    "natural_key",
    "parse_voc_xml",
    "read_id_list",
]

#: The 20 Pascal VOC classes in the devkit's order (labels 1..20).
VOC_CLASSES: tuple[str, ...] = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)

_COORDS = ("xmin", "ymin", "xmax", "ymax")
_KNOWN_SUFFIXES = {e.lower() for e in IMAGE_EXTENSIONS} | {".xml"}


def natural_key(text: str) -> list[Any]:
    """Sort key that orders embedded numbers numerically (``img-2`` < ``img-10``)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def read_id_list(path: Path) -> list[tuple[int, str]]:
    """Read an id list (VOC ``ImageSets`` file): ``(line number, id)`` per non-blank line.

    The first whitespace-separated token of each line is the id (VOC's per-class files
    add a flag after it); ``#`` starts a comment; a known file extension is dropped.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError("encoding", path, "", f"not UTF-8 text: {exc}") from exc
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        token = line.split("#", 1)[0].strip().split()
        if not token:
            continue
        name = token[0]
        suffix = Path(name).suffix
        if suffix.lower() in _KNOWN_SUFFIXES:
            name = name[: -len(suffix)]
        out.append((n, name))
    return out


def find_image(images_dir: Path, stem: str, filename: str | None) -> tuple[Path, bool]:
    """Locate the image of annotation ``stem`` in ``images_dir``.

    Tried in order: ``stem`` with the extension of ``filename`` (the XML's
    ``<filename>``), ``stem`` with each of :data:`IMAGE_EXTENSIONS`, then ``filename``
    itself. Returns ``(path, by_filename)``; when nothing exists, the first candidate
    (the validator then reports it missing).
    """
    hint_suffix = Path(filename).suffix if filename else ""
    first = images_dir / f"{stem}{hint_suffix or '.jpg'}"
    for ext in dict.fromkeys(([hint_suffix] if hint_suffix else []) + list(IMAGE_EXTENSIONS)):
        candidate = images_dir / f"{stem}{ext}"
        if candidate.is_file():
            return candidate, False
    if filename:
        candidate = images_dir / filename
        if candidate.is_file():
            return candidate, True
    return first, False


def _parse_error(xml: Path, where: str, detail: str, image_id: str) -> DataError:
    return DataError("parse_error", xml, where, detail, image_id=image_id)


def _number(elem: Element | None, where: str, xml: Path, image_id: str) -> tuple[float, str]:
    if elem is None or elem.text is None or not elem.text.strip():
        raise _parse_error(xml, where, "missing value", image_id)
    text = elem.text.strip()
    try:
        return float(text), text
    except ValueError:
        raise _parse_error(xml, where, f"not a number: {text!r}", image_id) from None


def _flag(obj: Element, tag: str, where: str, xml: Path, image_id: str) -> bool:
    text = obj.findtext(tag)
    if text is None or not text.strip():
        return False
    t = text.strip().lower()
    if t in ("0", "false", "no"):
        return False
    if t in ("1", "true", "yes"):
        return True
    try:
        return bool(int(float(t)))
    except ValueError:
        raise _parse_error(xml, f"{where}/{tag}", f"not a 0/1 flag: {text!r}", image_id) from None


def _unsafe_detail(exc: DefusedXmlException) -> str:
    name = getattr(exc, "name", None)
    system_id = getattr(exc, "system_id", None)
    if name is not None:
        what = f"the entity {name!r}" + (f" (external: {system_id})" if system_id else "")
    else:
        what = f"a forbidden construct ({type(exc).__name__})"
    return (
        f"refused: the XML declares {what}; entity declarations (XML bombs such as "
        "'billion laughs', external entities) are never expanded"
    )


def _load_xml(xml: Path, image_id: str) -> Element:
    try:
        data = xml.read_bytes()
    except FileNotFoundError:
        raise _parse_error(xml, "", "annotation file not found", image_id) from None
    except OSError as exc:
        raise _parse_error(xml, "", f"cannot read the annotation: {exc}", image_id) from exc
    try:
        root = SafeET.fromstring(data, forbid_dtd=False, forbid_entities=True, forbid_external=True)
    except DefusedXmlException as exc:
        raise DataError("unsafe_xml", xml, "", _unsafe_detail(exc), image_id=image_id) from exc
    except ParseError as exc:
        line, col = getattr(exc, "position", (0, 0))
        where = f"line {line}, column {col + 1}"
        raise _parse_error(xml, where, f"malformed XML: {exc}", image_id) from None
    if root.tag != "annotation":
        raise _parse_error(xml, root.tag, "the root element is not <annotation>", image_id)
    return root


def parse_voc_xml(
    xml: str | Path,
    *,
    image_id: str,
    images_dir: str | Path,
    stem: str | None = None,
    exclude_difficult: bool = False,
    exclude_truncated: bool = False,
) -> RawImage:
    """Parse one VOC XML file into an unchecked :class:`RawImage`.

    Boxes are converted to 0-based continuous xyxy pixels (see the module docstring);
    class names are kept as written (the validator strips and matches them).

    Args:
        xml: the annotation file.
        image_id: the id to give the image.
        images_dir: the folder holding the image (see :func:`find_image`).
        stem: the image file's stem (default: the XML file's stem).
        exclude_difficult, exclude_truncated: leave those objects out.

    Raises:
        DataError: ``parse_error`` (malformed XML, missing or non-numeric element, with
            its path) or ``unsafe_xml``.
    """
    xml = Path(xml)
    root = _load_xml(xml, image_id)
    filename = (root.findtext("filename") or "").strip() or None
    path, by_filename = find_image(Path(images_dir), stem or xml.stem, filename)

    width = height = None
    size = root.find("size")
    if size is not None:
        w, _ = _number(size.find("width"), "size/width", xml, image_id)
        h, _ = _number(size.find("height"), "size/height", xml, image_id)
        for value, tag in ((w, "width"), (h, "height")):
            if value != int(value) or value < 0:
                raise _parse_error(xml, f"size/{tag}", f"not a pixel count: {value:g}", image_id)
        width, height = int(w), int(h)

    raw = RawImage(
        image_id=image_id,
        path=path,
        source=str(xml),
        where="",
        width=width,
        height=height,
        size_where="size",
        size_expected=True,
    )
    if by_filename:
        raw.notes.append(
            Problem(
                "note",
                "image_by_filename",
                str(xml),
                "filename",
                f"no image named after the id {stem or xml.stem!r}; using <filename> {path}",
                image_id,
            )
        )
    for i, obj in enumerate(root.findall("object"), 1):
        base = f"object[{i}]"
        name = obj.findtext("name")
        if name is None or not name.strip():
            raise _parse_error(xml, f"{base}/name", "missing class name", image_id)
        difficult = _flag(obj, "difficult", base, xml, image_id)
        truncated = _flag(obj, "truncated", base, xml, image_id)
        if (exclude_difficult and difficult) or (exclude_truncated and truncated):
            continue
        bnd = obj.find("bndbox")
        if bnd is None:
            raise _parse_error(xml, f"{base}/bndbox", "missing <bndbox>", image_id)
        values, texts = [], []
        for tag in _COORDS:
            v, t = _number(bnd.find(tag), f"{base}/bndbox/{tag}", xml, image_id)
            values.append(v)
            texts.append(t)
        xmin, ymin, xmax, ymax = values
        raw.boxes.append(
            RawBox(
                xyxy=(xmin - 1.0, ymin - 1.0, xmax, ymax),
                cls=name,
                difficult=difficult,
                where=f"{base}/bndbox",
                coord_where=tuple(f"{base}/bndbox/{t}" for t in _COORDS),  # type: ignore[arg-type]
                raw=tuple(texts),  # type: ignore[arg-type]
                class_where=f"{base}/name",
            )
        )
    return raw


def _normalise_splits(splits: Any) -> list[tuple[str | None, str]]:
    if isinstance(splits, str):
        return [(None, splits)]
    out: list[tuple[str | None, str]] = []
    for item in splits:
        if isinstance(item, str):
            out.append((None, item))
        else:
            pair = list(item)
            if len(pair) != 2:
                raise ValueError(f"splits: expected (year, set) pairs or set names, got {pair!r}")
            out.append((str(pair[0]), str(pair[1])))
    if not out:
        raise ValueError("splits is empty")
    return out


@DATASETS.register("voc")
class VOCSource(Source):
    """Pascal VOC XML annotations (devkit or flat layout), validated into records.

    Args:
        root: the ``VOCdevkit`` folder (splits as (year, set) pairs), one year's folder
            (splits as set names) or the flat layout's folder.
        splits: see the module docstring; None selects the flat layout.
        layout: ``"auto"`` (devkit when ``splits`` is given, else flat), ``"devkit"``, ``"flat"``.
        classes: the known class names (default: the 20 VOC classes for the devkit layout,
            the sorted names found in the XML files for the flat layout).
        include_classes: keep only these (a subset of ``classes``), relabelled 1..K in
            this order.
        exclude_difficult, exclude_truncated: drop those objects (default: keep them;
            difficult boxes are marked ``difficult=True``).
        images_dir, annotations_dir: the flat layout's folders, relative to ``root``.
        split_file: flat layout: a file of ids (or file names) to use, relative to
            ``root`` unless absolute; default all XML files.
        on_bad, clip_tolerance, keep_images_without_gt, check_images: the validation
            policy (:class:`~ssdlit.datamodules.validation.Validator`).
        name: the source's name in the report.

    Attributes:
        records, class_names, report: see :class:`~ssdlit.datamodules.records.Source`.
        known_classes: the classes the files may name (``classes``, or their default);
            ``class_names`` unless ``include_classes`` keeps fewer.
    """

    def __init__(
        self,
        *,
        root: str | Path,
        splits: Any = None,
        layout: Literal["auto", "devkit", "flat"] = "auto",
        classes: Sequence[str] | None = None,
        include_classes: Sequence[str] | None = None,
        exclude_difficult: bool = False,
        exclude_truncated: bool = False,
        images_dir: str = "images",
        annotations_dir: str = "annotations",
        split_file: str | Path | None = None,
        on_bad: OnBad = "error",
        clip_tolerance: float = 2.0,
        keep_images_without_gt: bool = True,
        check_images: CheckImages = "header",
        name: str = "voc",
    ) -> None:
        self.root = Path(root)
        if layout == "auto":
            layout = "devkit" if splits is not None else "flat"
        if layout not in ("devkit", "flat"):
            raise ValueError(f"layout must be 'auto', 'devkit' or 'flat', got {layout!r}")
        if not self.root.is_dir():
            raise FileNotFoundError(f"VOC root folder not found: {self.root}")
        self.layout = layout
        self._exclude = {
            "exclude_difficult": exclude_difficult,
            "exclude_truncated": exclude_truncated,
        }
        # Parse every XML file first (a DataError stands in for a file that fails), so that
        # a flat folder's classes can be the names its files use; validate afterwards.
        if layout == "devkit":
            if splits is None:
                raise ValueError("the devkit layout needs splits, e.g. [['2007', 'trainval']]")
            parsed = [p for year, s in _normalise_splits(splits) for p in self._devkit(year, s)]
        else:
            if splits is not None:
                raise ValueError(
                    f"the flat layout reads every XML file of {self.root / annotations_dir} "
                    "(or the ids listed in split_file) and takes no devkit splits "
                    f"{splits!r}; for a folder of your own use data=voc_folder"
                )
            parsed = self._flat(images_dir, annotations_dir, split_file)

        if classes is None:
            classes = VOC_CLASSES if layout == "devkit" else _found_classes(parsed, self.root)
        known = check_class_names(classes, "classes")
        if include_classes is not None:
            keep = check_class_names(include_classes, "include_classes")
            missing = [c for c in keep if c not in known]
            if missing:
                raise ValueError(f"include_classes {missing} are not in classes {known}")
            self.class_names = keep
            ignore = [c for c in known if c not in keep]
        else:
            self.class_names = known
            ignore = []
        self.known_classes = known
        self.on_bad = on_bad
        self._validator = Validator(
            class_names=self.class_names,
            ignore_classes=ignore,
            on_bad=on_bad,
            clip_tolerance=clip_tolerance,
            keep_images_without_gt=keep_images_without_gt,
            check_images=check_images,
            name=name,
        )
        for item in parsed:
            self._validator.process(lambda item=item: _raise_or_return(item))
        self.records = self._validator.finish()
        self.report = self._validator.report

    def _year_dir(self, year: str | None) -> Path:
        if year is None:
            return self.root
        candidate = self.root / f"VOC{year}"
        if candidate.is_dir():
            return candidate
        if self.root.name == f"VOC{year}":
            return self.root
        hint = (
            "data.root is the VOCdevkit folder holding VOC2007/ and VOC2012/ (or one year's "
            "folder with splits given as set names)"
        )
        if any(self.root.glob("*/*.xml")):
            hint += (
                f"; {self.root} holds XML files in a folder of its own: read it with "
                "data=voc_folder (images/ + annotations/)"
            )
        raise FileNotFoundError(f"VOC year folder not found: {candidate}; {hint}")

    def _parse(self, xml: Path, **kwargs: Any) -> RawImage | DataError:
        try:
            return parse_voc_xml(xml, **kwargs, **self._exclude)
        except DataError as err:
            return err

    def _devkit(self, year: str | None, set_name: str) -> list[RawImage | DataError]:
        base = self._year_dir(year)
        split_path = base / "ImageSets" / "Main" / f"{set_name}.txt"
        if not split_path.is_file():
            raise FileNotFoundError(f"VOC split file not found: {split_path}")
        prefix = f"VOC{year}/" if year is not None else ""
        return [
            self._parse(
                base / "Annotations" / f"{stem}.xml",
                image_id=prefix + stem,
                images_dir=base / "JPEGImages",
                stem=stem,
            )
            for _line, stem in read_id_list(split_path)
        ]

    def _flat(
        self, images_dir: str, annotations_dir: str, split_file: Any
    ) -> list[RawImage | DataError]:
        ann_dir = self.root / annotations_dir
        img_dir = self.root / images_dir
        if not ann_dir.is_dir():
            raise FileNotFoundError(
                f"annotations folder not found: {ann_dir} (the flat VOC layout reads "
                f"{self.root}/<annotations_dir>/*.xml and <images_dir>/; set "
                "+data.source.annotations_dir=... and +data.source.images_dir=... for other "
                "folder names)"
            )
        if split_file is not None:
            split_path = Path(split_file)
            if not split_path.is_absolute():
                split_path = self.root / split_path
            if not split_path.is_file():
                raise FileNotFoundError(f"split file not found: {split_path}")
            stems = [stem for _line, stem in read_id_list(split_path)]
        else:
            stems = sorted((p.stem for p in ann_dir.glob("*.xml")), key=natural_key)
        return [
            self._parse(ann_dir / f"{stem}.xml", image_id=stem, images_dir=img_dir, stem=stem)
            for stem in stems
        ]


def _raise_or_return(item: RawImage | DataError) -> RawImage:
    if isinstance(item, DataError):
        raise item
    return item


def _found_classes(parsed: Sequence[RawImage | DataError], root: Path) -> list[str]:
    """The sorted class names the parsed XML files use (stripped, as the validator matches)."""
    found = {
        str(box.cls).strip()
        for item in parsed
        if isinstance(item, RawImage)
        for box in item.boxes
        if str(box.cls).strip()
    }
    if not found:
        raise DataError(
            "parse_error",
            root,
            "",
            f"no object class found in the XML files; set {CLASS_NAMES_KEY}=[...]",
        )
    return sorted(found)
