"""A validation split carved from the training images (``data.val_fraction``).

On a small dataset the images a run validates on choose its best checkpoint, so they must
not be the images it then reports as test. :func:`split_off_val` takes a seeded fraction of
the *training* records as the validation split instead:

- at the record (image) level, after the source is parsed and validated, before any
  augmentation (the validation part then gets the eval pipeline, the training part the
  training pipeline, as a configured val split would);
- ``round(fraction * N)`` images, at least 1, and at least 1 left to train on (else a
  :class:`~ssdlit.registry.ConfigError`);
- deterministic for a seed, and independent of the order the source lists its images
  in: the records are ranked by ``sha256(f"{seed}:{image_id}")`` (ties, i.e. repeated ids,
  by path) and the first ``round(fraction * N)`` are the validation part. This is a seeded
  permutation that depends only on the image ids, not on any random number generator's
  version: the same config gives the same images on any machine (what ``evaluate
  split=val`` relies on to find the validation images of a run from its config alone).
  A larger fraction takes a superset of a smaller one's images, and adding images to the
  dataset leaves the others where they were.

Both parts are sorted by image id, so the batches do not depend on the source's order
either. :class:`ValSplit` says which images went where (``val_ids``, ``train_ids``), for
the run to record.
"""

from __future__ import annotations

import copy
import hashlib
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ssdlit.datamodules.records import Record
from ssdlit.datamodules.validation import DataReport
from ssdlit.registry import ConfigError

__all__ = [
    "VAL_FRACTION_KEY",
    "SplitPart",
    "ValSplit",
    "carve",
    "check_val_fraction",
    "split_off_val",
]

#: The config key (named in messages).
VAL_FRACTION_KEY = "data.val_fraction"


def check_val_fraction(value: Any) -> float | None:
    """``value`` as a fraction in (0, 1), or None for None; anything else is a
    :class:`~ssdlit.registry.ConfigError`."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(
            f"{VAL_FRACTION_KEY} must be a number in (0, 1), e.g. 0.15, or null; got {value!r}"
        )
    fraction = float(value)
    if not (0.0 < fraction < 1.0) or not math.isfinite(fraction):
        raise ConfigError(
            f"{VAL_FRACTION_KEY} must be in (0, 1), e.g. 0.15 (the share of the training "
            f"images to validate on), or null; got {value!r}"
        )
    return fraction


@dataclass(frozen=True)
class ValSplit:
    """Which training images became the validation split.

    Attributes:
        fraction: ``data.val_fraction``.
        seed: the seed that ranked the images (``data.seed``).
        val_ids: the image ids of the validation part, sorted.
        train_ids: the image ids left to train on, sorted.
    """

    fraction: float
    seed: int
    val_ids: tuple[str, ...]
    train_ids: tuple[str, ...]

    @property
    def num_images(self) -> int:
        """N, the training source's images before the split."""
        return len(self.val_ids) + len(self.train_ids)

    def describe(self) -> str:
        """One line: ``data.val_fraction=0.15: validating on 24 of the 160 training images
        (seed 0), training on the other 136``."""
        return (
            f"{VAL_FRACTION_KEY}={self.fraction:g}: validating on {len(self.val_ids)} of the "
            f"{self.num_images} training images (seed {self.seed}), training on the other "
            f"{len(self.train_ids)}"
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain values, for a run's JSON record."""
        return {
            "val_fraction": self.fraction,
            "seed": self.seed,
            "train_images": len(self.train_ids),
            "val_images": len(self.val_ids),
            "val_ids": list(self.val_ids),
        }


def _rank(seed: int, record: Record) -> tuple[bytes, str, str]:
    key = f"{seed}:{record.image_id}".encode()
    return hashlib.sha256(key).digest(), str(record.image_id), str(record.path)


def _by_id(record: Record) -> tuple[str, str]:
    return str(record.image_id), str(record.path)


def split_off_val(
    records: Sequence[Record], fraction: float, seed: int = 0
) -> tuple[list[Record], list[Record], ValSplit]:
    """``(train part, val part, what went where)`` of ``records`` (see the module docstring).

    Raises :class:`~ssdlit.registry.ConfigError` when ``fraction`` is not in (0, 1) or
    leaves no image to train on.
    """
    checked = check_val_fraction(fraction)
    if checked is None:
        raise ConfigError(f"{VAL_FRACTION_KEY}: a fraction in (0, 1) is needed, got None")
    records = list(records)
    n = len(records)
    n_val = max(1, round(checked * n))
    if n - n_val < 1:
        raise ConfigError(
            f"{VAL_FRACTION_KEY}={checked:g} leaves no image to train on: the training split "
            f"has {n} image{'s' if n != 1 else ''} and validation would take {n_val}; lower "
            f"{VAL_FRACTION_KEY}, add training images, or give a val split (data.val) instead"
        )
    ranked = sorted(records, key=lambda r: _rank(int(seed), r))
    val = sorted(ranked[:n_val], key=_by_id)
    train = sorted(ranked[n_val:], key=_by_id)
    info = ValSplit(
        fraction=checked,
        seed=int(seed),
        val_ids=tuple(str(r.image_id) for r in val),
        train_ids=tuple(str(r.image_id) for r in train),
    )
    return train, val, info


@dataclass
class SplitPart:
    """One part of a carved source, itself a source (``records``, ``class_names``,
    ``report``, ``on_bad``) for :class:`~ssdlit.datamodules.DetectionDataModule`."""

    records: list[Record]
    class_names: list[str] | None
    report: DataReport
    on_bad: str | None = None


def carve(
    records: Sequence[Record],
    class_names: Sequence[str] | None,
    fraction: float,
    seed: int = 0,
    *,
    report: DataReport | None = None,
    on_bad: str | None = None,
) -> tuple[SplitPart, SplitPart, ValSplit]:
    """The training source's records as two sources, ``(train part, val part, ValSplit)``.

    The train part's report is a copy of the source's ``report`` (what parsing found) with
    its kept-image counts for the train part; the val part's is a new one with its own
    counts. Both parts keep ``class_names`` and ``on_bad``.
    """
    train, val, info = split_off_val(records, fraction, seed)
    names = list(class_names) if class_names is not None else None
    if report is not None:
        train_report = copy.copy(report)
        train_report.problems = list(report.problems)
    else:
        train_report = DataReport("train")
    train_report.count_records(train)
    base = report.name if report is not None else "train"
    val_report = DataReport(f"{base}, the {VAL_FRACTION_KEY} part")
    val_report.count_records(val)
    return (
        SplitPart(train, names, train_report, on_bad),
        SplitPart(val, names, val_report, on_bad),
        info,
    )
