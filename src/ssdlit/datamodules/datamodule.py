"""Records -> augmented tensors -> padded batches: :class:`DetectionDataset`,
:class:`DetectionDataModule`.

Data flow per sample (in a DataLoader worker): decode the image to RGB uint8 ``[H0, W0, 3]``
(the record's own loader by default, i.e. :func:`ssdlit.datamodules.images.load_rgb` with the
record's EXIF policy; or a decoded copy kept in memory with ``cache``), for a training
split with ``mosaic_p`` make it, with that probability, the
:class:`~.transforms.mosaic.Mosaic` of itself and three other images drawn from the
dataset's own seeded generator, run the albumentations pipeline on it and its xyxy pixel boxes (:func:`~.transforms.apply_transform`),
and return a uint8 ``[3, H, W]`` tensor, boxes normalised to [0, 1] of the network input,
labels, difficult flags and ``meta`` (see :mod:`ssdlit.datamodules.collate`). Batches come
from :func:`~ssdlit.datamodules.collate.collate_detection`.

Reproducibility. Augmentation draws only from the Compose's own generators (albumentations
2.x) and the dataset's mosaic generator, seeded with ``seed``. With ``num_workers > 0`` every worker gets a copy of the dataset
and so of the same seeded Compose; :func:`seed_worker` (the loaders' ``worker_init_fn``)
reseeds each copy with the worker's torch seed, ``base_seed + worker_id``, where
``base_seed`` is drawn from the loader's generator (seeded with ``seed``) each time an epoch's
iterator starts (once, with persistent workers). So: the same ``seed`` and the same
``num_workers`` give the same batches, epoch after epoch; a different ``num_workers`` gives
a different (equally valid) random stream.

Images that cannot be decoded when loaded (the sources check headers only, unless
``check_images="decode"``) follow the source's ``on_bad`` policy. ``"error"``: a
:class:`~ssdlit.datamodules.records.DataError` naming the file, the same one-line error
from a worker process as from the main process. ``"skip"``: the sample is replaced by the
next index whose image decodes (deterministic), the image is marked in a table shared with
the worker processes so that it is tried no more, a warning is logged once, and the
split's :class:`~ssdlit.datamodules.validation.DataReport` counts it (brought up to date by
:meth:`DetectionDataModule.sync_reports`, which ``teardown`` calls at the end of every
fit, validate or test). A tail-truncated JPEG decodes as far as its data goes, with a
warning logged once and the note ``truncated_image`` in the report.
"""

from __future__ import annotations

import glob as globlib
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from ssdlit.config import plain
from ssdlit.datamodules.collate import collate_detection, make_meta
from ssdlit.datamodules.records import DataError, Record
from ssdlit.datamodules.splitting import ValSplit, carve
from ssdlit.datamodules.transforms import (
    Mosaic,
    MosaicPart,
    apply_transform,
    as_hw,
    build_transforms,
    find_letterbox,
)
from ssdlit.datamodules.validation import DataReport, Problem

__all__ = [
    "DEFAULT_AUGMENT",
    "DetectionDataModule",
    "DetectionDataset",
    "predict_records",
    "seed_worker",
]

#: ``loader(path) -> uint8 [H, W, 3] RGB``.
ImageLoader = Callable[[Path], np.ndarray]

#: The pipeline each split uses unless ``augment`` says otherwise.
DEFAULT_AUGMENT: dict[str, str] = {"train": "ssd", "val": "val", "test": "val", "predict": "val"}

_SPLITS = ("train", "val", "test", "predict")

log = logging.getLogger(__name__)

# What loading found out about each image, in a table shared with the worker processes.
_FINE, _TRUNCATED, _UNREADABLE, _MISSING = 0, 1, 2, 3
_KIND_OF_STATE = {_UNREADABLE: "unreadable_image", _MISSING: "missing_image"}
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def _as_rgb(img: np.ndarray) -> np.ndarray:
    """uint8 ``[H, W, 3]`` from what a loader returned (gray ``[H, W]``/``[H, W, 1]`` too)."""
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.ndim == 3 and img.shape[2] == 1:
        return cv2.cvtColor(img[:, :, 0], cv2.COLOR_GRAY2RGB)
    if img.ndim == 3 and img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_RGBA2RGB)
    return img


class DetectionDataset(Dataset):
    """One augmented sample per record (see :mod:`ssdlit.datamodules.collate` for the dict).

    Args:
        records: the parsed images and boxes (boxes xyxy absolute pixels).
        transform: an albumentations pipeline (e.g. :func:`~.transforms.build_transforms`),
            or None to return the decoded image as is (then all images must share a size
            to be batched).
        loader: ``loader(path) -> uint8 [H, W, 3]`` RGB; None uses ``record.decode()``
            (:func:`ssdlit.datamodules.images.decode_image` with the record's EXIF policy).
        cache: decode every image once, now, and keep the uint8 arrays in memory (for
            small datasets; DataLoader workers forked later share them copy-on-write).
        on_bad: what an image that cannot be decoded does: ``"error"`` raises its
            :class:`~ssdlit.datamodules.records.DataError`; ``"skip"`` replaces the sample by
            the next one that decodes, and counts it (see the module docstring).
        report: where :meth:`sync_report` adds what loading found (default: a new one).
        mosaic: with probability ``mosaic.p`` a sample is the
            :class:`~.transforms.mosaic.Mosaic` of its image and three others drawn at
            random from the records (then ``transform`` runs on it); None: never.
        seed: seed of the generator that draws the mosaics (reseeded per worker by
            :meth:`reseed`, like the augmentation's).
    """

    def __init__(
        self,
        records: Sequence[Record],
        transform: Callable[..., dict[str, Any]] | None = None,
        loader: ImageLoader | None = None,
        cache: bool = False,
        on_bad: str = "error",
        report: DataReport | None = None,
        mosaic: Mosaic | None = None,
        seed: int = 0,
    ) -> None:
        if on_bad not in ("error", "skip"):
            raise ValueError(f"on_bad must be 'error' or 'skip', got {on_bad!r}")
        self.records = list(records)
        self.transform = transform
        self.loader = loader
        self.on_bad = on_bad
        self.report = report if report is not None else DataReport("data")
        self._letterbox = find_letterbox(transform)
        self.mosaic = mosaic if mosaic is not None and mosaic.p > 0 else None
        self._rng = np.random.default_rng(seed)
        # [N] uint8, one of _FINE, _TRUNCATED, _UNREADABLE, _MISSING; in shared memory, so
        # what one worker finds, the others and the main process see.
        self._state = torch.zeros(len(self.records), dtype=torch.uint8).share_memory_()
        self._cache: list[np.ndarray | None] | None = None
        if cache:
            self._cache = [self._load_or_mark(i) for i in range(len(self.records))]

    def __len__(self) -> int:
        return len(self.records)

    @property
    def cached_bytes(self) -> int:
        """Memory held by the image cache (0 without one)."""
        return sum(a.nbytes for a in self._cache if a is not None) if self._cache else 0

    @property
    def skipped(self) -> list[int]:
        """Indices of the records whose image could not be decoded (``on_bad="skip"``)."""
        return torch.nonzero(self._state >= _UNREADABLE).flatten().tolist()

    def _decode(self, index: int) -> np.ndarray:
        rec = self.records[index]
        if self.loader is None:
            img, truncated = rec.decode()
            if truncated and int(self._state[index]) == _FINE:
                self._state[index] = _TRUNCATED
                log.warning(
                    "%s is missing the end of its data: decoded as far as it goes", rec.path
                )
            return img
        try:
            return self.loader(rec.path)
        except DataError:
            raise
        except Exception as exc:  # a user's loader: its failure is this file's
            raise DataError(
                "unreadable_image", rec.path, "", f"cannot read the image: {exc}"
            ) from exc

    def _load_or_mark(self, index: int) -> np.ndarray | None:
        """The image of record ``index``; None, marked, when it cannot be decoded under
        ``on_bad="skip"`` (its DataError is raised under ``"error"``)."""
        try:
            return _as_rgb(np.asarray(self._decode(index)))
        except DataError as err:
            if self.on_bad == "error":
                raise
            if int(self._state[index]) < _UNREADABLE:
                self._state[index] = _MISSING if err.kind == "missing_image" else _UNREADABLE
                log.warning("%s; skipped: replaced by another sample (on_bad=skip)", err)
            return None

    def load_image(self, index: int) -> np.ndarray:
        """The decoded image of record ``index``, uint8 ``[H0, W0, 3]`` RGB.

        Raises :class:`~ssdlit.datamodules.records.DataError` when it cannot be decoded
        (whatever ``on_bad`` says; :meth:`__getitem__` applies the policy).
        """
        if self._cache is not None and self._cache[index] is not None:
            return self._cache[index]  # type: ignore[return-value]
        return _as_rgb(np.asarray(self._decode(index)))

    def reseed(self, seed: int) -> None:
        """Reseed the augmentation's generators (called in each worker by :func:`seed_worker`)."""
        set_seed = getattr(self.transform, "set_random_seed", None)
        if callable(set_seed):
            set_seed(seed)
        self._rng = np.random.default_rng(seed)

    def sync_report(self) -> int:
        """Add what loading found to :attr:`report` (the images skipped, counted once
        however many datasets share the report, and the truncated ones as notes) and
        recount the kept images; returns the number of problems added."""
        added = 0
        state = self._state.tolist()
        for i, s in enumerate(state):
            if s == _FINE:
                continue
            rec = self.records[i]
            if s == _TRUNCATED:
                problem = Problem(
                    "note",
                    "truncated_image",
                    str(rec.path),
                    "",
                    "missing the end of its data: decoded as far as it goes",
                    rec.image_id,
                )
            else:
                problem = Problem(
                    "error",
                    _KIND_OF_STATE[s],
                    str(rec.path),
                    "",
                    "cannot be decoded when loaded: skipped, replaced by another sample",
                    rec.image_id,
                )
            if self.report.add_once(problem):
                added += 1
                if problem.severity == "error":
                    self.report.skipped_images += 1
        if added:
            self.report.count_records(
                [r for r, s in zip(self.records, state, strict=True) if s < _UNREADABLE]
            )
        return added

    def __getitem__(self, index: int) -> dict[str, Any]:
        i, img = self._decodable(index)
        return self._sample(i, img)

    def _decodable(self, index: int) -> tuple[int, np.ndarray]:
        """Record ``index`` and its image, or under ``on_bad="skip"`` the next record whose
        image decodes (an undecodable one is marked and skipped from then on)."""
        n = len(self.records)
        for step in range(n):
            i = (index + step) % n
            if int(self._state[i]) >= _UNREADABLE:
                continue  # known bad: the next one stands in for it
            img = self._load_or_mark(i) if self._cache is None else self._cached(i)
            if img is not None:
                return i, img
        raise DataError(
            "unreadable_image",
            self.records[index].path,
            "",
            "no image of this split can be decoded (on_bad=skip skipped every one)",
        )

    def _cached(self, index: int) -> np.ndarray | None:
        assert self._cache is not None
        return self._cache[index]

    def _sample(self, index: int, img: np.ndarray) -> dict[str, Any]:
        rec = self.records[index]
        part = MosaicPart(img, rec.boxes, rec.labels, rec.difficult)
        if self.mosaic is not None and self._rng.random() < self.mosaic.p:
            donors = [self._decodable(int(j)) for j in self._rng.integers(len(self), size=3)]
            part = self.mosaic(
                [part, *(MosaicPart(im, *self._annotations(j)) for j, im in donors)], self._rng
            )
        img = part.image
        h0, w0 = img.shape[:2]
        out = apply_transform(self.transform, img, part.boxes, part.labels, part.difficult)
        h, w = out.image.shape[:2]
        boxes = out.boxes * np.array([1.0 / w, 1.0 / h, 1.0 / w, 1.0 / h], dtype=np.float32)
        if self._letterbox is not None:
            g = self._letterbox.geometry((h0, w0))
            scale, offset = (g.scale_x, g.scale_y), (float(g.pad_x), float(g.pad_y))
        else:
            scale, offset = (w / w0, h / h0), (0.0, 0.0)
        image = out.image if out.image.ndim == 3 else out.image[:, :, None]
        if not image.flags.writeable:  # the cached decode itself (no transform copied it)
            image = image.copy()
        return {
            "image": torch.from_numpy(image).permute(2, 0, 1),  # [3, H, W] view; collate copies
            "boxes": torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32)),
            "labels": torch.from_numpy(np.asarray(out.labels, dtype=np.int64)),
            "difficult": torch.from_numpy(np.asarray(out.difficult, dtype=bool)),
            "meta": make_meta(
                image_id=str(rec.image_id),
                path=str(rec.path),
                orig_size=(h0, w0),
                input_size=(h, w),
                scale=scale,
                offset=offset,
            ),
        }

    def _annotations(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rec = self.records[index]
        return rec.boxes, rec.labels, rec.difficult


def _reseed(dataset: Any, seed: int) -> None:
    if hasattr(dataset, "reseed"):
        dataset.reseed(seed)
    inner = getattr(dataset, "dataset", None)  # Subset
    if inner is not None:
        _reseed(inner, seed)
    for d in getattr(dataset, "datasets", ()) or ():  # ConcatDataset
        _reseed(d, seed)


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: seed Python, NumPy and the dataset's augmentation per worker.

    The seed is the worker's torch seed (``base_seed + worker_id``, see the module
    docstring), so workers differ from each other and runs with the same loader seed repeat.
    OpenCV is limited to one thread per worker (as torch already is), so that W workers use
    W cores rather than W times all of them.
    """
    cv2.setNumThreads(1)
    seed = torch.initial_seed()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    info = get_worker_info()
    if info is not None:
        _reseed(info.dataset, seed)


def predict_records(inputs: str | Path | Sequence[str | Path]) -> list[Record]:
    """Records without boxes for images given as files, folders and/or glob patterns.

    A folder contributes its image files (by suffix, sorted, not recursive); a pattern
    with ``*``, ``?`` or ``[`` is expanded (``**`` recursive), sorted. ``image_id`` is the
    file stem, or the path when stems repeat. Width and height are left 0 (the decoded
    image's size is used).
    """
    items = [inputs] if isinstance(inputs, (str, Path)) else list(plain(inputs))
    paths: list[Path] = []
    for item in items:
        text = str(item)
        p = Path(text)
        if any(c in text for c in "*?["):
            found = sorted(globlib.glob(text, recursive=True))
            paths += [Path(f) for f in found if Path(f).suffix.lower() in _IMAGE_SUFFIXES]
        elif p.is_dir():
            paths += sorted(f for f in p.iterdir() if f.suffix.lower() in _IMAGE_SUFFIXES)
        elif p.is_file():
            paths.append(p)
        else:
            raise FileNotFoundError(f"predict input {text!r}: no such file, folder or match")
    stems = [p.stem for p in paths]
    unique = len(set(stems)) == len(stems)
    empty = np.zeros((0, 4), dtype=np.float32)
    return [
        Record(
            path=p,
            width=0,
            height=0,
            boxes=empty,
            labels=np.zeros(0, dtype=np.int64),
            image_id=p.stem if unique else str(p),
        )
        for p in paths
    ]


def _split_source(source: Any) -> tuple[list[Record], list[str] | None]:
    """``(records, class_names)`` from a source object, a ``(records, names)`` pair or records."""
    if hasattr(source, "records"):
        names = getattr(source, "class_names", None)
        return list(source.records), (list(names) if names is not None else None)
    if (
        isinstance(source, tuple)
        and len(source) == 2
        and not isinstance(source[0], Record)
        and all(isinstance(n, str) for n in source[1])
    ):
        return list(source[0]), list(source[1])
    records = list(source)
    if records and not all(isinstance(r, Record) for r in records):
        raise TypeError(
            "a split source must have .records and .class_names, be (records, class_names), "
            "or be a list of Record"
        )
    return records, None


class DetectionDataModule(pl.LightningDataModule):
    """Train/val/test/predict loaders of augmented, padded detection batches.

    Args:
        train, val, test: a source per split: an object with ``.records`` and
            ``.class_names`` (the annotation sources), a ``(records, class_names)`` pair, or a
            list of :class:`~ssdlit.datamodules.records.Record`. Any may be None.
        predict: images without boxes: a file, a folder, a glob pattern, or a list of them
            (see :func:`predict_records`), or a source as above.
        class_names: the C class names when no source carries them (else taken from
            ``train``, then ``val``, then ``test``).
        image_size: network input ``(H, W)`` or one int.
        augment: per split, a pipeline name (``"ssd"``, ``"light"``, ``"val"``), a dict
            ``{"name": ..., **options}`` for :func:`~.transforms.build_transforms`, or a
            ready albumentations Compose; merged over :data:`DEFAULT_AUGMENT`. The train
            dict may also hold ``mosaic_p``: the probability of a
            :class:`~.transforms.mosaic.Mosaic` of four images before the pipeline.
        batch_size: training batch size; ``eval_batch_size`` (default: the same) for the rest.
        num_workers, persistent_workers, pin_memory: DataLoader options (persistent workers
            only with ``num_workers > 0``).
        drop_last: drop the last incomplete training batch.
        seed: seeds the augmentation and the loaders' generators (shuffling, worker seeds).
        cache_images: decode images once at ``setup`` and keep them in memory: True for
            train/val/test, or a list of split names.
        loader: ``loader(path) -> uint8 [H, W, 3] RGB`` replacing ``record.load_image()``.
        on_bad: the policy for images that cannot be decoded when loaded, for the splits
            whose source has none of its own (a source's ``on_bad`` wins): ``"error"`` or
            ``"skip"`` (see the module docstring).
        val_fraction: validate on this fraction of the ``train`` images instead of a
            ``val`` source (which must then be None): a ``seed``-ed split of the training
            records, ``round(val_fraction * N)`` images and at least 1 (see
            :func:`~ssdlit.datamodules.splitting.split_off_val`). The validation images get
            the ``val`` pipeline, the others the ``train`` one.
        val_split: how the given ``train`` / ``val`` sources were carved, when the caller
            did it (:func:`~ssdlit.datamodules.build_datamodule` for ``data.val_fraction``);
            kept as :attr:`val_split`.

    Attributes:
        reports: ``{split: DataReport}``, the source's report (a new one for plain
            records), to which :meth:`sync_reports` adds what loading found. With a
            carved validation split, each part has its own (counting its own images).
        val_split: :class:`~ssdlit.datamodules.splitting.ValSplit` (which images went to
            validation, which to training, the fraction and the seed) when the validation
            split was carved from the training images, else None.
    """

    def __init__(
        self,
        train: Any = None,
        val: Any = None,
        test: Any = None,
        predict: Any = None,
        *,
        class_names: Sequence[str] | None = None,
        image_size: int | Sequence[int] = (300, 300),
        augment: Mapping[str, Any] | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        persistent_workers: bool = False,
        pin_memory: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        cache_images: bool | Sequence[str] = False,
        loader: ImageLoader | None = None,
        on_bad: str = "error",
        val_fraction: float | None = None,
        val_split: ValSplit | None = None,
    ) -> None:
        super().__init__()
        self.image_size = as_hw(image_size)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.persistent_workers = bool(persistent_workers) and self.num_workers > 0
        self.pin_memory = bool(pin_memory)
        self.drop_last = bool(drop_last)
        self.seed = int(seed)
        self.loader = loader
        self.augment: dict[str, Any] = {**DEFAULT_AUGMENT, **dict(plain(augment) or {})}
        unknown = set(self.augment) - set(_SPLITS)
        if unknown:
            raise ValueError(f"augment: unknown split(s) {sorted(unknown)}; splits: {_SPLITS}")
        for split in self.augment:
            self.mosaic(split)  # a wrong mosaic_p fails here, not in a worker
        if isinstance(cache_images, bool):
            self.cache_splits = {"train", "val", "test"} if cache_images else set()
        else:
            self.cache_splits = set(plain(cache_images))

        if on_bad not in ("error", "skip"):
            raise ValueError(f"on_bad must be 'error' or 'skip', got {on_bad!r}")
        self.val_split: ValSplit | None = val_split
        if val_fraction is not None:
            if train is None:
                raise ValueError(
                    "val_fraction carves the val split from train: give a train source"
                )
            if val is not None:
                raise ValueError(
                    "val_fraction carves the val split from train: give no val source too"
                )
            records, source_names = _split_source(train)
            report = getattr(train, "report", None)
            train, val, self.val_split = carve(
                records,
                source_names,
                val_fraction,
                self.seed,
                report=report if isinstance(report, DataReport) else None,
                on_bad=getattr(train, "on_bad", None),
            )
        self._records: dict[str, list[Record] | None] = {}
        self._on_bad: dict[str, str] = dict.fromkeys(_SPLITS, on_bad)
        self.reports: dict[str, DataReport] = {}
        names: list[str] | None = None
        named: list[tuple[str, list[str]]] = []
        for split, source in (("train", train), ("val", val), ("test", test)):
            if source is None:
                self._records[split] = None
                continue
            records, source_names = _split_source(source)
            self._records[split] = records
            self._on_bad[split] = str(getattr(source, "on_bad", None) or on_bad)
            report = getattr(source, "report", None)
            self.reports[split] = report if isinstance(report, DataReport) else DataReport(split)
            names = names or source_names
            if source_names is not None:
                named.append((split, source_names))
        if class_names is None:
            for split, other in named[1:]:
                if other != named[0][1]:
                    raise ValueError(
                        f"the {split} split's classes {other} differ from the {named[0][0]} "
                        f"split's {named[0][1]}: labels would mean other classes; give every "
                        "split the same class names (data.class_names)"
                    )
        if predict is None:
            self._records["predict"] = None
        elif hasattr(predict, "records") or (
            isinstance(predict, (list, tuple)) and predict and isinstance(predict[0], Record)
        ):
            self._records["predict"] = _split_source(predict)[0]
        else:
            self._records["predict"] = predict_records(predict)
        if self._records["predict"] is not None:
            self.reports["predict"] = getattr(predict, "report", None) or DataReport("predict")
        self._class_names = list(class_names) if class_names is not None else names
        self.datasets: dict[str, DetectionDataset] = {}

    # -- classes ------------------------------------------------------------------------

    @property
    def class_names(self) -> list[str]:
        """The C class names (label ``i`` is ``class_names[i - 1]``)."""
        if self._class_names is None:
            raise AttributeError(
                "no class names: give a source with .class_names or pass class_names=..."
            )
        return self._class_names

    @property
    def num_classes(self) -> int:
        """C, the number of object classes (background not counted)."""
        return len(self.class_names)

    def records(self, split: str) -> list[Record]:
        """The parsed records of ``split`` (``[]`` when it has none): with ``val_fraction``,
        ``train`` is the training part only."""
        return list(self._records.get(split) or [])

    @property
    def split_sizes(self) -> dict[str, int]:
        """``{split: number of images}`` of the splits there are (nothing is loaded)."""
        return {s: len(r) for s, r in self._records.items() if r is not None}

    # -- datasets -----------------------------------------------------------------------

    def build_transform(self, split: str) -> Any:
        """The augmentation pipeline of ``split`` (built from :attr:`augment`)."""
        spec = plain(self.augment[split])
        if spec is None:
            return None
        if callable(spec):
            return spec
        if isinstance(spec, str):
            return build_transforms(spec, self.image_size, seed=self.seed)
        options = dict(spec)
        name = options.pop("name", DEFAULT_AUGMENT[split])
        options.pop("mosaic_p", None)  # the dataset's (:meth:`mosaic`)
        return build_transforms(name, self.image_size, seed=self.seed, **options)

    def mosaic(self, split: str) -> Mosaic | None:
        """The split's :class:`~.transforms.mosaic.Mosaic` when ``augment[split]`` sets
        ``mosaic_p`` above 0 (training only), else None."""
        spec = plain(self.augment[split])
        p = float(spec.get("mosaic_p") or 0.0) if isinstance(spec, Mapping) else 0.0
        if p <= 0:
            return None
        if split != "train":
            raise ValueError(f"augment.{split}.mosaic_p: mosaic is for the train split only")
        return Mosaic(self.image_size, p=p)

    def dataset(self, split: str) -> DetectionDataset | None:
        """The split's dataset, built (and its images cached) on first use."""
        if split not in self.datasets:
            records = self._records.get(split)
            if records is None:
                return None
            self.datasets[split] = DetectionDataset(
                records,
                self.build_transform(split),
                loader=self.loader,
                cache=split in self.cache_splits,
                on_bad=self._on_bad[split],
                report=self.reports.get(split),
                mosaic=self.mosaic(split),
                seed=self.seed,
            )
        return self.datasets[split]

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets the stage needs (``fit``, ``validate``, ``test``, ``predict``)."""
        wanted = {
            "fit": ("train", "val"),
            "validate": ("val",),
            "test": ("test",),
            "predict": ("predict",),
        }.get(stage or "", _SPLITS)
        for split in wanted:
            self.dataset(split)

    def sync_reports(self) -> dict[str, int]:
        """Bring :attr:`reports` up to date with what loading found (images skipped because
        they cannot be decoded, truncated JPEGs), logging a line per split with news;
        returns ``{split: problems added}``."""
        added: dict[str, int] = {}
        for split, ds in self.datasets.items():
            n = ds.sync_report()
            if n:
                added[split] = n
                found = ", ".join(f"{k} {v}" for k, v in sorted(ds.report.counts().items()))
                log.warning(
                    "data %s, found when loading: %s (%d images skipped in all)",
                    split,
                    found,
                    ds.report.skipped_images,
                )
        return added

    def teardown(self, stage: str | None = None) -> None:
        """End of a fit, validate, test or predict: report what loading found."""
        self.sync_reports()

    # -- loaders ------------------------------------------------------------------------

    def _loader(self, split: str, shuffle: bool) -> DataLoader | list:
        ds = self.dataset(split)
        if ds is None:
            return []
        train = split == "train"
        if train and self.drop_last and len(ds) < self.batch_size:
            raise ValueError(
                f"the training split has {len(ds)} images, fewer than one batch "
                f"(data.batch_size={self.batch_size}) with data.drop_last=true: no batch would "
                "be trained on; lower data.batch_size or set data.drop_last=false"
            )
        if self.num_workers > 0:
            # One OpenCV thread here before the workers fork: a worker inherits this
            # process's OpenCV thread pool without its threads, and seed_worker's
            # cv2.setNumThreads(1) on such a pool blocks forever (pthread_cond_destroy).
            cv2.setNumThreads(1)
        return DataLoader(
            ds,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.persistent_workers,
            pin_memory=self.pin_memory,
            drop_last=self.drop_last and train,
            collate_fn=collate_detection,
            worker_init_fn=seed_worker,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader | list:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader | list:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader | list:
        return self._loader("predict", shuffle=False)
