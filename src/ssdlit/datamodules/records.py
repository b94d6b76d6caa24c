"""The parsed form of every annotation source: one :class:`Record` per image.

Also the two things every source shares: :class:`DataError`, the one exception a bad
input raises (it names the file and the line or element), and :class:`Source`, the
base of the parsed sources (``records``, ``class_names``, ``report``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ssdlit.datamodules.validation import DataReport

__all__ = ["DataError", "Record", "Source"]


class DataError(ValueError):
    """A bad input: a malformed annotation, a bad box, a missing or unreadable image.

    The message names the file and where in it: a CSV line number, an XML element
    path such as ``object[2]/bndbox/xmax`` (1-based, XPath style), a COCO JSON path
    such as ``annotations[17] (id 42)``.

    Attributes:
        kind: the problem kind (see :data:`ssdlit.datamodules.validation.PROBLEM_KINDS`).
        file: the file at fault (annotation file, or the image when the image is bad).
        where: the location inside ``file`` ("" when the whole file is at fault).
        detail: what is wrong, in words.
        image_id: the image the problem belongs to, when known.

    ``DataError(message)`` with the message alone is what a DataLoader does when it re-raises
    a worker's exception in the main process (the worker's traceback as text): the
    original one-line message is recovered from it, so the error reads the same from a
    worker as from the main process.
    """

    def __init__(
        self,
        kind: str,
        file: str | Path | None = None,
        where: str = "",
        detail: str = "",
        *,
        image_id: str = "",
    ) -> None:
        if file is None:
            kind, file, detail = _from_message(kind)
        self.kind = kind
        self.file = str(file)
        self.where = where
        self.detail = detail
        self.image_id = image_id
        super().__init__(self._format())

    def _format(self) -> str:
        loc = f"{self.file}, {self.where}" if self.where else self.file
        return f"{loc}: {self.detail} [{self.kind}]"

    def __reduce__(self):  # picklable across DataLoader worker processes
        return (_rebuild_data_error, (self.kind, self.file, self.where, self.detail, self.image_id))


_FORMATTED = re.compile(r"^(?:[\w.]+\.)?DataError: (?P<loc>.*?): (?P<detail>.*) \[(?P<kind>\w+)\]$")


def _from_message(message: str) -> tuple[str, str, str]:
    """``(kind, file, detail)`` of the last formatted DataError line in ``message`` (a
    worker's traceback as the DataLoader re-raises it); the location stays in ``file``."""
    for line in reversed(message.splitlines()):
        found = _FORMATTED.match(line.strip())
        if found:
            return found["kind"], found["loc"], found["detail"]
    return "data_error", "", message.strip().splitlines()[-1] if message.strip() else ""


def _rebuild_data_error(kind: str, file: str, where: str, detail: str, image_id: str) -> DataError:
    return DataError(kind, file, where, detail, image_id=image_id)


@dataclass
class Record:
    """One image and its ground truth, as parsed (before any augmentation).

    Attributes:
        path: the image file.
        width, height: image size in pixels, as the annotation states (validated
            against the file); this is the size of the image as :meth:`load_image`
            returns it.
        boxes: float32 ``[N, 4]`` xyxy in absolute pixels of the original image,
            continuous coordinates: ``0 <= x1 < x2 <= width``, ``0 <= y1 < y2 <= height``
            (a box covering pixel columns 0..9 has ``x1 = 0, x2 = 10``).
        labels: int64 ``[N]`` in 1..C (0 is background and never a label).
        difficult: bool ``[N]``; difficult boxes are kept for evaluation, where the
            VOC metric ignores them (COCO ``iscrowd`` boxes are marked difficult too).
        image_id: unique id of the image within its dataset.
        source: where the record came from (annotation file, CSV path), for messages.
        apply_exif: whether the image is loaded with its EXIF orientation applied
            (True: the annotation matches the displayed image, the usual case; False:
            the annotation's size matched the stored pixels of a rotated JPEG, so the
            boxes refer to the stored pixels).
    """

    path: Path
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    image_id: str
    difficult: np.ndarray = field(default=None)  # type: ignore[assignment]
    source: str = ""
    apply_exif: bool = True

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if self.difficult is None:
            self.difficult = np.zeros(len(self.labels), dtype=bool)
        self.difficult = np.asarray(self.difficult, dtype=bool).reshape(-1)
        if not (len(self.boxes) == len(self.labels) == len(self.difficult)):
            raise ValueError(
                f"{self.source or self.path}: boxes, labels and difficult differ in length "
                f"({len(self.boxes)}, {len(self.labels)}, {len(self.difficult)})"
            )

    @property
    def num_boxes(self) -> int:
        return len(self.labels)

    def load_image(self) -> np.ndarray:
        """The image as uint8 ``[H, W, 3]`` RGB, oriented as the boxes expect.

        Raises :class:`DataError` when the file is missing or cannot be decoded (a
        tail-truncated JPEG decodes as far as its data goes).
        """
        return self.decode()[0]

    def decode(self) -> tuple[np.ndarray, bool]:
        """``(image, truncated)``: :meth:`load_image` and whether the file is a tail-truncated
        JPEG, decoded as far as its data goes (:func:`ssdlit.datamodules.images.decode_image`).

        Raises :class:`DataError` when the file is missing or cannot be decoded.
        """
        from ssdlit.datamodules.images import decode_image

        return decode_image(self.path, apply_exif=self.apply_exif)

    def same_annotation(self, other: Record) -> bool:
        """True when both records hold the same image, size and ground truth.

        ``source`` (where the record was parsed from) is not compared.
        """
        return (
            self.path == other.path
            and self.width == other.width
            and self.height == other.height
            and self.image_id == other.image_id
            and self.apply_exif == other.apply_exif
            and np.array_equal(self.boxes, other.boxes)
            and np.array_equal(self.labels, other.labels)
            and np.array_equal(self.difficult, other.difficult)
        )


class Source:
    """Base of the parsed annotation sources.

    Attributes:
        records: one :class:`Record` per kept image, in the source's order.
        class_names: the C class names; label ``i`` is ``class_names[i - 1]``.
        report: the problems found while parsing
            (:class:`~ssdlit.datamodules.validation.DataReport`), to which
            :class:`~ssdlit.datamodules.datamodule.DetectionDataModule` adds those found
            when the images are loaded.
        on_bad: the policy (``"error"`` or ``"skip"``), for the images that fail later,
            when loaded.
    """

    records: list[Record]
    class_names: list[str]
    report: DataReport
    #: the validation policy, also applied to the images that fail when loaded
    on_bad: str = "error"

    @property
    def num_classes(self) -> int:
        """C, the number of object classes (background not counted)."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Record:
        return self.records[index]

    def __repr__(self) -> str:
        boxes = sum(r.num_boxes for r in self.records)
        return (
            f"{type(self).__name__}({len(self.records)} images, {boxes} boxes, "
            f"{self.num_classes} classes)"
        )
