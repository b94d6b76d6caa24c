"""Validate parsed annotations into :class:`Record` s, and report what was wrong.

Every source (VOC XML, CSV, COCO JSON, synthetic) parses its files into
:class:`RawImage` s (boxes already converted to 0-based continuous xyxy pixels, but not
yet checked) and hands them to one :class:`Validator`, which applies the same rules to
all of them:

========================  =================================================================
problem kind              rule
========================  =================================================================
``duplicate_id``          an image id seen before (the first one is kept)
``missing_image``         the image file does not exist
``unreadable_image``      the image cannot be opened (``check_images="decode"``: decoded)
``size_mismatch``         the annotation's width x height differs from the image's; a
                          rotated JPEG whose EXIF-transposed size matches is accepted and
                          loaded transposed (note ``exif_transposed``); one whose *stored*
                          size matches is loaded unrotated (note ``exif_ignored``)
``unknown_class``         a class name (or id) not in the class list
``non_finite``            a NaN or infinite coordinate
``degenerate_box``        ``x2 <= x1`` or ``y2 <= y1`` (also after clipping)
``out_of_image``          a coordinate outside the image by more than ``clip_tolerance``
                          pixels; within the tolerance the box is clipped (note ``clipped``)
``parse_error``           malformed file or value (reported by the parsers)
``unsafe_xml``            XML with entity declarations / external references (parsers)
``encoding``              text not valid in the file's encoding (parsers)
``unknown_image``         a COCO annotation whose ``image_id`` is not listed (parsers)
========================  =================================================================

Policy ``on_bad``: ``"error"`` raises :class:`DataError` at the first problem (its message
names the file and the line or element); ``"skip"`` drops the whole image the problem
belongs to (a partially annotated image would teach the detector that an object is
background), counts it in :class:`DataReport` and goes on. Notes (``clipped``,
``exif_transposed``, ``exif_ignored``, ``size_from_image``, ``empty_dropped``,
``image_by_filename``, ``truncated_image``) are fixes or policy decisions: recorded, never raised.

Image checks (``check_images``): ``"header"`` (default) opens every image header for its
size and EXIF orientation without decoding; an image whose data cannot be decoded passes
and is handled when first loaded, under the same policy (``DetectionDataset``: ``skip``
replaces it by the next sample and counts it, ``error`` raises a ``DataError`` naming the
file). ``"decode"`` decodes every image at parse time (catches them all now; slow on
large sets); ``"exists"`` only checks that the files exist and trusts the annotated sizes
(fastest, e.g. for COCO's 118k images). A tail-truncated JPEG is no error: it decodes as
far as its data goes (as OpenCV does), with the note ``truncated_image``.

Images without ground truth (no boxes, or none left after class / difficult filtering)
are kept by default (``keep_images_without_gt=True``): they are valid negatives for
training and belong in evaluation sets; ``False`` drops them (note ``empty_dropped``).
"""

from __future__ import annotations

import difflib
import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from ssdlit.datamodules.images import read_header
from ssdlit.datamodules.records import DataError, Record

__all__ = [
    "CLASS_NAMES_KEY",
    "ERROR_KINDS",
    "NOTE_KINDS",
    "PROBLEM_KINDS",
    "CheckImages",
    "DataError",
    "DataReport",
    "OnBad",
    "Problem",
    "RawBox",
    "RawImage",
    "Validator",
    "check_class_names",
]

OnBad = Literal["error", "skip"]
CheckImages = Literal["exists", "header", "decode"]

ERROR_KINDS: dict[str, str] = {
    "parse_error": "malformed annotation (bad XML, a missing element or cell, not a number)",
    "unsafe_xml": "XML with entity declarations or external references (refused)",
    "encoding": "text not valid in the file's encoding",
    "non_finite": "NaN or infinite coordinate",
    "degenerate_box": "box with x2 <= x1 or y2 <= y1",
    "out_of_image": "box outside the image beyond the clipping tolerance",
    "unknown_class": "class name or id not in the class list",
    "missing_image": "image file not found",
    "unreadable_image": "image file cannot be decoded",
    "size_mismatch": "image size differs from the annotation",
    "duplicate_id": "image id seen before (first kept)",
    "unknown_image": "annotation refers to an image id that is not listed",
}
NOTE_KINDS: dict[str, str] = {
    "clipped": "box outside the image within the tolerance, clipped to it",
    "exif_transposed": "EXIF-rotated image whose displayed size matches: loaded rotated",
    "exif_ignored": "EXIF-rotated image whose stored size matches: loaded unrotated",
    "size_from_image": "annotation gave no image size: read from the image file",
    "empty_dropped": "image without ground truth dropped (keep_images_without_gt=False)",
    "image_by_filename": "no image named by the annotation id: found by its filename field",
    "truncated_image": "JPEG missing the end of its data: decoded as far as it goes (as OpenCV)",
}

#: The config key that sets the class names of every source (named in the messages).
CLASS_NAMES_KEY = "data.class_names"
PROBLEM_KINDS: dict[str, str] = {**ERROR_KINDS, **NOTE_KINDS}


@dataclass(frozen=True)
class Problem:
    """One problem found while parsing.

    ``severity`` is ``"error"`` (the image was skipped, or the error raised) or ``"note"``
    (a fix or a policy decision; the image was kept unless the note says otherwise).
    """

    severity: str
    kind: str
    file: str
    where: str
    detail: str
    image_id: str = ""

    @classmethod
    def from_error(cls, err: DataError) -> Problem:
        return cls("error", err.kind, err.file, err.where, err.detail, err.image_id)

    def message(self) -> str:
        loc = f"{self.file}, {self.where}" if self.where else self.file
        return f"[{self.kind}] {loc}: {self.detail}"


class DataReport:
    """The problems a source found, with counts per kind and the full list.

    Attributes:
        name: the source's name, for the summary.
        problems: every problem, in the order found.
        images, boxes, difficult, images_without_gt: what was kept.
        skipped_images: images dropped because of an error.
    """

    def __init__(self, name: str = "data", *, max_examples: int = 5) -> None:
        self.name = name
        self.max_examples = max_examples
        self.problems: list[Problem] = []
        self.images = 0
        self.boxes = 0
        self.difficult = 0
        self.images_without_gt = 0
        self.skipped_images = 0

    def add(self, problem: Problem) -> None:
        self.problems.append(problem)

    def add_once(self, problem: Problem) -> bool:
        """Add ``problem`` unless the same one (severity, kind, file, image) is listed
        already; returns whether it was added. For problems found when images are loaded,
        which several datasets sharing a source may each report."""
        key = (problem.severity, problem.kind, problem.file, problem.image_id)
        if any((p.severity, p.kind, p.file, p.image_id) == key for p in self.problems):
            return False
        self.problems.append(problem)
        return True

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def notes(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "note"]

    @property
    def ok(self) -> bool:
        """True when nothing had to be skipped."""
        return not self.errors

    def counts(self, severity: str | None = None) -> dict[str, int]:
        """Number of problems per kind (``severity``: ``"error"``, ``"note"`` or both)."""
        return dict(
            Counter(p.kind for p in self.problems if severity is None or p.severity == severity)
        )

    def count_records(self, records: Sequence[Record]) -> None:
        """Set the kept-data statistics from the final records."""
        self.images = len(records)
        self.boxes = sum(r.num_boxes for r in records)
        self.difficult = sum(int(r.difficult.sum()) for r in records)
        self.images_without_gt = sum(1 for r in records if r.num_boxes == 0)

    def summary(self, max_examples: int | None = None) -> str:
        """A few readable lines: what was kept, counts per problem kind, first examples."""
        n_ex = self.max_examples if max_examples is None else max_examples
        lines = [
            f"{self.name}: {self.images} images kept ({self.boxes} boxes, {self.difficult} "
            f"difficult, {self.images_without_gt} without ground truth); "
            f"{self.skipped_images} images skipped"
        ]
        for severity, title in (("error", "skipped for"), ("note", "notes")):
            counts = self.counts(severity)
            if counts:
                items = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
                lines.append(f"  {title}: {items}")
        shown = self.errors[:n_ex] + self.notes[: max(0, n_ex - len(self.errors))]
        if shown:
            lines.append("  first examples:")
            lines.extend(f"    {p.message()}" for p in shown)
        if len(self.problems) > len(shown):
            lines.append(f"  ... {len(self.problems) - len(shown)} more (see the full list)")
        return "\n".join(lines)

    def to_dicts(self) -> list[dict[str, str]]:
        return [asdict(p) for p in self.problems]

    def write(self, path: str | Path) -> Path:
        """Write the full list of problems: JSON lines, or text lines for a ``.txt`` path.

        Each JSON line holds ``severity, kind, file, where, detail, image_id``.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as f:
            if path.suffix == ".txt":
                f.write(self.summary(max_examples=0) + "\n")
                for p in self.problems:
                    f.write(p.message() + "\n")
            else:
                for d in self.to_dicts():
                    f.write(json.dumps(d, ensure_ascii=False) + "\n")
        return path

    def __repr__(self) -> str:
        return f"DataReport({self.name!r}, images={self.images}, errors={self.counts('error')})"


@dataclass
class RawBox:
    """One parsed but unchecked box.

    Attributes:
        xyxy: (x1, y1, x2, y2) in 0-based continuous pixels (format conversions, such as
            VOC's 1-based indices, already applied by the parser).
        cls: class name (matched after stripping whitespace, case-sensitively) or label
            id in 1..C.
        difficult: the difficult flag (COCO: iscrowd).
        where: locator of the box in its file (``object[2]/bndbox``, ``line 14``).
        coord_where: locators of x1, y1, x2, y2 (``object[2]/bndbox/xmax``, ...).
        raw: the four coordinates as written in the file, for messages.
        class_where: locator of the class field.
    """

    xyxy: tuple[float, float, float, float]
    cls: str | int
    difficult: bool
    where: str
    coord_where: tuple[str, str, str, str]
    raw: tuple[str, str, str, str]
    class_where: str = ""


@dataclass
class RawImage:
    """One parsed but unchecked image entry.

    Attributes:
        image_id: the id (unique within the source).
        path: the image file.
        source: the annotation file (for messages).
        where: locator of the image entry in ``source`` ("" for a one-image XML file).
        width, height: size the annotation states, or None when it states none.
        size_where: locator of the size in ``source``.
        boxes: the boxes.
        notes: notes the parser made (kept only if the image is kept).
        size_expected: whether the format should state the size (a note is made when it
            does not).
    """

    image_id: str
    path: Path
    source: str
    where: str = ""
    width: int | None = None
    height: int | None = None
    size_where: str = ""
    boxes: list[RawBox] = field(default_factory=list)
    notes: list[Problem] = field(default_factory=list)
    size_expected: bool = False


def check_class_names(names: Sequence[str], what: str = "class_names") -> list[str]:
    """Validate a class list (non-empty unique strings, no surrounding blanks)."""
    if isinstance(names, str):
        raise ValueError(f"{what} must be a list of names, not the string {names!r}")
    out = [str(n) for n in names]
    if not out:
        raise ValueError(f"{what} is empty")
    for n in out:
        if not n or n != n.strip():
            raise ValueError(f"{what}: names must be non-empty without surrounding blanks: {n!r}")
    dup = [n for n, c in Counter(out).items() if c > 1]
    if dup:
        raise ValueError(f"{what}: duplicate names {dup}")
    return out


_COORD_NAMES = ("xmin", "ymin", "xmax", "ymax")


def _fmt(v: float) -> str:
    return f"{v:g}"


class Validator:
    """Turns :class:`RawImage` s into validated :class:`Record` s under one policy.

    Args:
        class_names: the C class names; label ``i`` is ``class_names[i - 1]``.
        ignore_classes: names that are known but dropped silently (e.g. the VOC classes
            left out by ``include_classes``).
        on_bad: ``"error"`` (raise at the first problem) or ``"skip"`` (drop the image,
            count it in ``report``).
        clip_tolerance: boxes outside the image by at most this many pixels are clipped.
        keep_images_without_gt: keep images that end up without boxes.
        check_images: ``"exists"`` (the file exists; sizes trusted from the annotation),
            ``"header"`` (read the header: size and EXIF orientation; default) or
            ``"decode"`` (decode every image, catches undecodable files now, notes
            tail-truncated JPEGs; slow).
        name: the source's name for the report.
    """

    def __init__(
        self,
        *,
        class_names: Sequence[str],
        ignore_classes: Sequence[str] = (),
        on_bad: OnBad = "error",
        clip_tolerance: float = 2.0,
        keep_images_without_gt: bool = True,
        check_images: CheckImages = "header",
        name: str = "data",
    ) -> None:
        if on_bad not in ("error", "skip"):
            raise ValueError(f"on_bad must be 'error' or 'skip', got {on_bad!r}")
        if check_images not in ("exists", "header", "decode"):
            raise ValueError(
                f"check_images must be 'exists', 'header' or 'decode', got {check_images!r}"
            )
        if not (clip_tolerance >= 0 and math.isfinite(clip_tolerance)):
            raise ValueError(f"clip_tolerance must be >= 0 pixels, got {clip_tolerance!r}")
        self.class_names = check_class_names(class_names)
        self._index = {n: i + 1 for i, n in enumerate(self.class_names)}
        self._ignore = set(ignore_classes) - set(self._index)
        self.on_bad = on_bad
        self.clip_tolerance = float(clip_tolerance)
        self.keep_images_without_gt = keep_images_without_gt
        self.check_images = check_images
        self.report = DataReport(name)
        self.records: list[Record] = []
        self._seen: dict[str, str] = {}

    # -- policy -------------------------------------------------------------------------

    def reject(self, err: DataError, *, count_image: bool = True) -> None:
        """Apply ``on_bad`` to a problem: raise it, or record it and count the image as
        skipped (``count_image=False`` when what is dropped is not an image, e.g. a COCO
        annotation of an unlisted image)."""
        if self.on_bad == "error":
            raise err
        self.report.add(Problem.from_error(err))
        if count_image:
            self.report.skipped_images += 1

    def process(self, parse: Callable[[], RawImage | None]) -> Record | None:
        """Run a parser for one image and validate its result under the policy.

        ``parse`` raises :class:`DataError` for malformed input, or returns None for an
        entry to leave out silently. Returns the kept record, or None.
        """
        try:
            raw = parse()
            if raw is None:
                return None
            return self.add(raw)
        except DataError as err:
            self.reject(err)
            return None

    def add(self, raw: RawImage) -> Record | None:
        """Validate one image; append and return its record (None when dropped).

        Raises:
            DataError: the first problem found (the caller applies the policy, see
                :meth:`process`).
        """
        notes = list(raw.notes)
        record = self._build(raw, notes)
        for n in notes:
            self.report.add(n)
        if record is not None:
            self.records.append(record)
        return record

    def finish(self) -> list[Record]:
        """The kept records; fills in the report's statistics."""
        self.report.count_records(self.records)
        return self.records

    # -- checks -------------------------------------------------------------------------

    def _error(self, kind: str, raw: RawImage, where: str, detail: str) -> DataError:
        return DataError(kind, raw.source, where, detail, image_id=raw.image_id)

    def _note(self, kind: str, raw: RawImage, where: str, detail: str) -> Problem:
        return Problem("note", kind, raw.source, where, detail, raw.image_id)

    def _build(self, raw: RawImage, notes: list[Problem]) -> Record | None:
        first = self._seen.get(raw.image_id)
        if first is not None:
            raise self._error(
                "duplicate_id", raw, raw.where, f"image id {raw.image_id!r} already used by {first}"
            )
        self._seen[raw.image_id] = f"{raw.source}{', ' + raw.where if raw.where else ''}"

        width, height, apply_exif = self._check_image(raw, notes)
        boxes, labels, difficult = self._check_boxes(raw, width, height, notes)
        if not len(labels) and not self.keep_images_without_gt:
            notes.append(self._note("empty_dropped", raw, raw.where, "no ground truth: dropped"))
            return None
        return Record(
            path=raw.path,
            width=width,
            height=height,
            boxes=boxes,
            labels=labels,
            difficult=difficult,
            image_id=raw.image_id,
            source=f"{raw.source}{', ' + raw.where if raw.where else ''}",
            apply_exif=apply_exif,
        )

    def _check_image(self, raw: RawImage, notes: list[Problem]) -> tuple[int, int, bool]:
        declared = (
            raw.width is not None and raw.height is not None and raw.width > 0 and raw.height > 0
        )
        if self.check_images == "exists" and declared:
            if not raw.path.is_file():
                raise self._error(
                    "missing_image", raw, raw.where, f"image file not found: {raw.path}"
                )
            return int(raw.width), int(raw.height), True  # type: ignore[arg-type]
        try:
            header = read_header(raw.path, decode=self.check_images == "decode")
        except DataError as err:
            detail = err.detail if str(raw.path) in err.detail else f"{err.detail}: {raw.path}"
            raise self._error(err.kind, raw, raw.where, detail) from err
        if header.truncated:
            notes.append(
                self._note(
                    "truncated_image",
                    raw,
                    raw.where,
                    f"{raw.path} is missing the end of its data: decoded as far as it goes",
                )
            )
        if not declared:
            if raw.size_expected:
                notes.append(
                    self._note(
                        "size_from_image",
                        raw,
                        raw.size_where,
                        f"no valid size given ({raw.width}x{raw.height}); using the image's "
                        f"{header.width}x{header.height}",
                    )
                )
            return header.width, header.height, True
        w, h = int(raw.width), int(raw.height)  # type: ignore[arg-type]
        if (w, h) == (header.width, header.height):
            if header.orientation != 1:
                notes.append(
                    self._note(
                        "exif_transposed",
                        raw,
                        raw.size_where,
                        f"{raw.path} has EXIF orientation {header.orientation}; the annotated "
                        f"size {w}x{h} is the displayed one: loaded rotated",
                    )
                )
            return w, h, True
        if header.transposed and (w, h) == (header.stored_width, header.stored_height):
            notes.append(
                self._note(
                    "exif_ignored",
                    raw,
                    raw.size_where,
                    f"{raw.path} has EXIF orientation {header.orientation} but the annotated "
                    f"size {w}x{h} is the stored one: loaded without rotation",
                )
            )
            return w, h, False
        stored = (
            f" (stored {header.stored_width}x{header.stored_height}, "
            f"EXIF orientation {header.orientation})"
            if header.orientation != 1
            else ""
        )
        raise self._error(
            "size_mismatch",
            raw,
            raw.size_where,
            f"annotation says {w}x{h} (width x height) but the image {raw.path} is "
            f"{header.width}x{header.height}{stored}",
        )

    def _label(self, raw: RawImage, box: RawBox) -> int | None:
        cls = box.cls
        where = box.class_where or box.where
        if isinstance(cls, str):
            name = cls.strip()
            if name in self._index:
                return self._index[name]
            if name in self._ignore:
                return None
            known = ", ".join(self.class_names[:10]) + (
                ", ..." if len(self.class_names) > 10 else ""
            )
            close = difflib.get_close_matches(name, self.class_names, n=1, cutoff=0.6)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise self._error(
                "unknown_class",
                raw,
                where,
                f"unknown class {name!r} (known: {known}; case-sensitive).{hint} To use "
                f"other classes, set {CLASS_NAMES_KEY}=[...]",
            )
        if isinstance(cls, (int, np.integer)) and not isinstance(cls, bool):
            if 1 <= cls <= len(self.class_names):
                return int(cls)
            raise self._error(
                "unknown_class",
                raw,
                where,
                f"class id {cls} is not in 1..{len(self.class_names)} (0 is background); "
                f"{CLASS_NAMES_KEY}=[...] names the classes of ids 1..C",
            )
        raise self._error("unknown_class", raw, where, f"class {cls!r} is neither a name nor an id")

    def _check_boxes(
        self, raw: RawImage, width: int, height: int, notes: list[Problem]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        tol = self.clip_tolerance
        boxes: list[tuple[float, float, float, float]] = []
        labels: list[int] = []
        difficult: list[bool] = []
        for box in raw.boxes:
            label = self._label(raw, box)
            if label is None:
                continue
            x1, y1, x2, y2 = (float(v) for v in box.xyxy)
            for i, v in enumerate((x1, y1, x2, y2)):
                if not math.isfinite(v):
                    raise self._error(
                        "non_finite", raw, box.coord_where[i], f"coordinate {box.raw[i]!r}"
                    )
            for lo, hi, axis in ((0, 2, "x"), (1, 3, "y")):
                if box.xyxy[hi] <= box.xyxy[lo]:
                    lo_name, hi_name = _COORD_NAMES[lo], _COORD_NAMES[hi]
                    raise self._error(
                        "degenerate_box",
                        raw,
                        box.where,
                        f"empty box: {lo_name} {box.raw[lo]}, {hi_name} {box.raw[hi]} give "
                        f"{axis}2 <= {axis}1 in 0-based xyxy ({_fmt(box.xyxy[hi])} <= "
                        f"{_fmt(box.xyxy[lo])})",
                    )
            limits = ((x1, 0.0, -1), (y1, 0.0, -1), (x2, float(width), 1), (y2, float(height), 1))
            for i, (v, edge, sign) in enumerate(limits):
                excess = (v - edge) * sign
                if excess > tol:
                    side = ("left of", "above", "right of", "below")[i]
                    size = f"width {width}" if i % 2 == 0 else f"height {height}"
                    raise self._error(
                        "out_of_image",
                        raw,
                        box.coord_where[i],
                        f"{box.raw[i]} is {_fmt(excess)} px {side} the image ({size}; "
                        f"clipping tolerance {_fmt(tol)} px)",
                    )
            cx1, cy1 = max(x1, 0.0), max(y1, 0.0)
            cx2, cy2 = min(x2, float(width)), min(y2, float(height))
            if cx2 <= cx1 or cy2 <= cy1:
                raise self._error(
                    "degenerate_box",
                    raw,
                    box.where,
                    f"box ({', '.join(box.raw)}) is empty once clipped to the image "
                    f"{width}x{height}",
                )
            if (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2):
                notes.append(
                    self._note(
                        "clipped",
                        raw,
                        box.where,
                        f"box ({', '.join(box.raw)}) clipped to the image {width}x{height}: "
                        f"xyxy ({_fmt(cx1)}, {_fmt(cy1)}, {_fmt(cx2)}, {_fmt(cy2)})",
                    )
                )
            boxes.append((cx1, cy1, cx2, cy2))
            labels.append(label)
            difficult.append(bool(box.difficult))
        return (
            np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            np.asarray(labels, dtype=np.int64),
            np.asarray(difficult, dtype=bool),
        )
