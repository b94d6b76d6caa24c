"""COCO instances JSON (``instances_*.json``): images, categories, box annotations.

- Boxes: COCO's ``bbox`` is ``[x, y, width, height]`` in 0-based continuous pixels;
  it becomes xyxy ``(x, y, x + width, y + height)``; no other shift.
- Classes: category ids are mapped to contiguous labels 1..C in sorted id order
  (COCO's 80 ids run 1..90 with gaps); ``class_names`` holds the names in that order and
  ``category_ids`` the original ids (label ``i`` is category ``category_ids[i - 1]``).
  Given ``class_names`` (the config's ``data.class_names``) must be the categories' names,
  in any order: the labels then follow that order.
- Crowd regions (``iscrowd=1``) are kept and marked ``difficult=True``, so that the VOC
  metric ignores them (matched detections are neither true nor false positives); pass
  them as ``iscrowd`` to a COCO evaluator. ``include_crowd=False`` drops them.
- Image ids become strings (``str(id)``); images are found at ``images_dir/file_name``
  (default: the JSON file's folder).
- Locators in messages are JSON paths: ``images[3] (id 42)``,
  ``annotations[17] (id 900)/bbox``. A file that is not valid JSON, or without a valid
  ``categories`` list, always raises; problems of one image or annotation follow ``on_bad``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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

__all__ = ["COCOSource"]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _text(v: float) -> str:
    return f"{v:g}" if math.isfinite(v) else str(v)


@DATASETS.register("coco")
class COCOSource(Source):
    """COCO instances annotations, validated into records.

    Args:
        annotation_file: the instances JSON file.
        images_dir: the folder ``file_name`` is relative to (default: the JSON's folder).
        include_crowd: keep ``iscrowd=1`` boxes (as ``difficult=True``).
        class_names: the categories' names in the order of the labels 1..C (default: in
            sorted category id order); every category must be named once.
        on_bad, clip_tolerance, keep_images_without_gt, check_images: the validation
            policy (:class:`~ssdlit.datamodules.validation.Validator`).
        name: the source's name in the report.

    Attributes:
        category_ids: COCO category id of each label (label i -> ``category_ids[i - 1]``).
    """

    def __init__(
        self,
        *,
        annotation_file: str | Path,
        images_dir: str | Path | None = None,
        include_crowd: bool = True,
        class_names: Sequence[str] | None = None,
        on_bad: OnBad = "error",
        clip_tolerance: float = 2.0,
        keep_images_without_gt: bool = True,
        check_images: CheckImages = "header",
        name: str = "coco",
    ) -> None:
        self.annotation_file = Path(annotation_file)
        self.images_dir = (
            Path(images_dir) if images_dir is not None else self.annotation_file.parent
        )
        self.include_crowd = include_crowd
        data = self._load()
        self.category_ids, self.class_names = self._categories(data)
        if class_names is not None:
            wanted = check_class_names(class_names, CLASS_NAMES_KEY)
            if sorted(wanted) != sorted(self.class_names):
                raise DataError(
                    "unknown_class",
                    self.annotation_file,
                    "categories",
                    f"{CLASS_NAMES_KEY} {wanted} must name these categories: "
                    f"{self.class_names} (in any order)",
                )
            id_of = dict(zip(self.class_names, self.category_ids, strict=True))
            self.category_ids = [id_of[n] for n in wanted]
            self.class_names = wanted
        self.on_bad = on_bad
        self._label_of = {cid: i + 1 for i, cid in enumerate(self.category_ids)}
        self._validator = Validator(
            class_names=self.class_names,
            on_bad=on_bad,
            clip_tolerance=clip_tolerance,
            keep_images_without_gt=keep_images_without_gt,
            check_images=check_images,
            name=name,
        )
        src = str(self.annotation_file)
        images = data.get("images")
        annotations = data.get("annotations", [])
        if not isinstance(images, list) or not isinstance(annotations, list):
            raise DataError("parse_error", src, "", "'images' and 'annotations' must be lists")

        listed = {img.get("id") for img in images if isinstance(img, dict)}
        by_image: dict[Any, list[tuple[int, dict[str, Any]]]] = {}
        for j, ann in enumerate(annotations):
            if not isinstance(ann, dict):
                self._validator.reject(
                    DataError("parse_error", src, f"annotations[{j}]", "not an object"),
                    count_image=False,
                )
                continue
            image_id = ann.get("image_id")
            if image_id not in listed:
                self._validator.reject(
                    DataError(
                        "unknown_image",
                        src,
                        f"annotations[{j}] (id {ann.get('id')})/image_id",
                        f"image id {image_id!r} is not in 'images'",
                    ),
                    count_image=False,
                )
                continue
            by_image.setdefault(image_id, []).append((j, ann))

        for i, img in enumerate(images):
            self._validator.process(lambda i=i, img=img: self._parse_image(i, img, by_image))
        self.records = self._validator.finish()
        self.report = self._validator.report

    def _load(self) -> dict[str, Any]:
        src = self.annotation_file
        try:
            text = src.read_bytes().decode("utf-8-sig")
        except OSError as exc:
            raise DataError("parse_error", src, "", f"cannot read the file: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise DataError("encoding", src, f"byte {exc.start}", f"not UTF-8: {exc}") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(
                "parse_error", src, f"line {exc.lineno}, column {exc.colno}", f"bad JSON: {exc.msg}"
            ) from exc
        if not isinstance(data, dict):
            raise DataError("parse_error", src, "", "the top level is not a JSON object")
        return data

    def _categories(self, data: dict[str, Any]) -> tuple[list[int], list[str]]:
        src = self.annotation_file
        cats = data.get("categories")
        if not isinstance(cats, list) or not cats:
            raise DataError("parse_error", src, "categories", "missing or empty 'categories' list")
        by_id: dict[int, str] = {}
        for k, cat in enumerate(cats):
            cid = cat.get("id") if isinstance(cat, dict) else None
            cname = cat.get("name") if isinstance(cat, dict) else None
            if not isinstance(cid, int) or isinstance(cid, bool) or not isinstance(cname, str):
                raise DataError(
                    "parse_error", src, f"categories[{k}]", "needs an integer 'id' and a 'name'"
                )
            if cid in by_id:
                raise DataError("parse_error", src, f"categories[{k}]", f"duplicate id {cid}")
            by_id[cid] = cname.strip()
        ids = sorted(by_id)
        try:
            names = check_class_names([by_id[c] for c in ids], "category names")
        except ValueError as exc:
            raise DataError("parse_error", src, "categories", str(exc)) from exc
        return ids, names

    def _parse_image(
        self, i: int, img: Any, by_image: dict[Any, list[tuple[int, dict[str, Any]]]]
    ) -> RawImage:
        src = str(self.annotation_file)
        if not isinstance(img, dict):
            raise DataError("parse_error", src, f"images[{i}]", "not an object")
        cid = img.get("id")
        where = f"images[{i}] (id {cid})"
        image_id = str(cid)

        def fail(kind: str, loc: str, detail: str) -> DataError:
            return DataError(kind, src, loc, detail, image_id=image_id)

        if not isinstance(cid, (int, str)) or isinstance(cid, bool):
            raise fail("parse_error", f"images[{i}]/id", f"bad image id {cid!r}")
        file_name = img.get("file_name")
        if not isinstance(file_name, str) or not file_name:
            raise fail("parse_error", f"{where}/file_name", "missing file_name")
        width, height = img.get("width"), img.get("height")
        for key, value in (("width", width), ("height", height)):
            if value is not None and not (isinstance(value, int) and not isinstance(value, bool)):
                raise fail("parse_error", f"{where}/{key}", f"not a pixel count: {value!r}")
        path = Path(file_name) if Path(file_name).is_absolute() else self.images_dir / file_name
        raw = RawImage(
            image_id=image_id,
            path=path,
            source=src,
            where=where,
            width=width,
            height=height,
            size_where=f"{where}/width,height",
            size_expected=True,
        )
        for j, ann in by_image.get(cid, []):
            base = f"annotations[{j}] (id {ann.get('id')})"
            crowd = bool(ann.get("iscrowd", 0))
            if crowd and not self.include_crowd:
                continue
            bbox = ann.get("bbox")
            if (
                not isinstance(bbox, list)
                or len(bbox) != 4
                or not all(_is_number(v) or v is None for v in bbox)
            ):
                raise fail("parse_error", f"{base}/bbox", f"not [x, y, width, height]: {bbox!r}")
            x, y, w, h = (float("nan") if v is None else float(v) for v in bbox)
            cat = ann.get("category_id")
            label = self._label_of.get(cat) if isinstance(cat, int) else None
            if label is None:
                raise fail(
                    "unknown_class",
                    f"{base}/category_id",
                    f"category id {cat!r} is not in 'categories' {self.category_ids}",
                )
            raw.boxes.append(
                RawBox(
                    xyxy=(x, y, x + w, y + h),
                    cls=label,
                    difficult=crowd,
                    where=f"{base}/bbox",
                    coord_where=(
                        f"{base}/bbox[0]",
                        f"{base}/bbox[1]",
                        f"{base}/bbox[2]",
                        f"{base}/bbox[3]",
                    ),
                    raw=(
                        f"x={_text(x)}",
                        f"y={_text(y)}",
                        f"x+width={_text(x + w)}",
                        f"y+height={_text(y + h)}",
                    ),
                    class_where=f"{base}/category_id",
                )
            )
        return raw
