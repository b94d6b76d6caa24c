"""The data config to data: sources and a :class:`DetectionDataModule` from ``data`` and
``augment`` nodes (what every app reads; see ``conf/data`` and ``conf/augment``).

- ``data.source``: the options every split shares, with the ``DATASETS`` registry ``name``;
- ``data.train`` / ``data.val`` / ``data.test``: per-split options merged over ``source``
  (null: no such split);
- ``data.class_names``: the one key for the class names, handed to every split's source
  (null: the first split's source decides, e.g. the names in its files, and the other
  splits get the same);
- ``data.val_fraction`` (null, or a fraction in (0, 1)): validate on a ``data.seed``-ed
  share of the *training* images (:func:`~ssdlit.datamodules.splitting.split_off_val`), so
  that no test image chooses the checkpoint; a configured ``data.val`` then becomes the test
  split when ``data.test`` is null (both set: a :class:`~ssdlit.registry.ConfigError`);
- the loader options (:data:`DATAMODULE_OPTIONS`: ``batch_size``, ``eval_batch_size``,
  ``num_workers``, ...); any other key (``root``...) is a free variable for interpolation;
- ``augment.train`` and ``augment.eval``: pipeline specs (``{name: ssd|light|val, ...}``).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from ssdlit.config import plain
from ssdlit.datamodules.datamodule import DetectionDataModule
from ssdlit.datamodules.splitting import VAL_FRACTION_KEY, ValSplit, carve, check_val_fraction
from ssdlit.registry import DATASETS, ConfigError

__all__ = [
    "CLASS_NAMES_KEY",
    "DATAMODULE_OPTIONS",
    "SPLITS",
    "build_datamodule",
    "build_source",
    "build_sources",
    "split_roles",
    "split_specs",
]

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")

#: ``data.*`` keys handed to :class:`~ssdlit.datamodules.DetectionDataModule`
#: (``data.class_names`` goes to the sources, see :func:`build_sources`).
DATAMODULE_OPTIONS = (
    "batch_size",
    "eval_batch_size",
    "num_workers",
    "persistent_workers",
    "pin_memory",
    "drop_last",
    "seed",
    "cache_images",
)


def split_specs(data: Mapping[str, Any]) -> dict[str, dict[str, Any] | None]:
    """``{split: source spec or None}``: each split's options merged over ``data.source``."""
    data = plain(data)
    shared = dict(data.get("source") or {})
    out: dict[str, dict[str, Any] | None] = {}
    for split in SPLITS:
        own = data.get(split)
        out[split] = None if own is None else {**shared, **dict(own)}
    return out


#: The keyword arguments by which a source takes its class names, tried in this order.
_CLASS_NAME_ARGUMENTS = ("class_names", "classes")
CLASS_NAMES_KEY = "data.class_names"


def _class_names_argument(name: str) -> str | None:
    """The keyword by which the registered source ``name`` takes its class names."""
    try:
        params = inspect.signature(DATASETS.get(name)).parameters
    except (TypeError, ValueError):
        return None
    return next((a for a in _CLASS_NAME_ARGUMENTS if a in params), None)


def build_source(spec: Mapping[str, Any], class_names: Sequence[str] | None = None) -> Any:
    """A data source from ``{name: <DATASETS name>, **kwargs}``.

    ``class_names`` (the config's ``data.class_names``) is handed to the source under its
    own keyword (``classes`` for VOC and synthetic data, ``class_names`` for CSV and COCO).
    The spec itself may not set that keyword: the class names have one key
    (:class:`~ssdlit.registry.ConfigError` otherwise).
    """
    kwargs = dict(spec)
    name = kwargs.pop("name", None)
    if name is None:
        raise ConfigError(f"a data source needs a 'name' (one of {DATASETS.names()}), got {spec}")
    arg = _class_names_argument(str(name))
    if arg is not None and kwargs.get(arg) is not None:
        raise ConfigError(
            f"data.source.{arg}: the class names are set with {CLASS_NAMES_KEY}=[...] (one key "
            "for every source and split), not in the source's options"
        )
    if class_names is not None:
        if arg is None:
            raise ConfigError(
                f"the {name!r} source takes no class names: leave {CLASS_NAMES_KEY} null"
            )
        kwargs[arg] = list(class_names)
    return DATASETS.build(name, **kwargs)


def build_sources(
    data: Mapping[str, Any],
    splits: Sequence[str] = SPLITS,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """``{split: source}`` for the splits of ``data`` that exist, built in ``splits`` order.

    Every source gets ``data.class_names``; when it is null, ``class_names`` (e.g. a
    checkpoint's), else the first source built decides (the 20 VOC classes of a devkit, the
    names in a flat VOC folder's or a CSV's files, COCO's categories) and the others get
    the same names, so that a label means one class in every split.
    """
    data = plain(data)
    specs = split_specs(data)
    names = data.get("class_names")
    names = list(names) if names is not None else class_names
    sources: dict[str, Any] = {}
    for split in splits:
        spec = specs.get(split)
        if spec is None:
            continue
        sources[split] = build_source(spec, class_names=names)
        if names is None and _class_names_argument(str(spec.get("name"))) is not None:
            # the names the source accepts (VOC with include_classes: the superset)
            names = list(
                getattr(sources[split], "known_classes", None) or sources[split].class_names
            )
        report = getattr(sources[split], "report", None)
        if report is not None and hasattr(report, "summary"):
            log.info("data %s: %s", split, report.summary())
    return sources


def split_roles(data: Mapping[str, Any]) -> dict[str, str | None]:
    """``{role: the data split it is read from}``: which configured split (``data.train``,
    ``data.val``, ``data.test``) the datamodule serves as its train, val and test split.

    Without ``data.val_fraction`` each split is itself. With it, ``val`` is carved from
    ``train`` (the role ``val`` reads ``"train"``) and ``test`` is ``data.test``, or the
    configured ``data.val`` when ``data.test`` is null; None: no such split. A config with
    ``data.val``, ``data.test`` and ``data.val_fraction`` all set is a
    :class:`~ssdlit.registry.ConfigError` (there is no place left for ``data.val``).
    """
    data = plain(data)
    specs = split_specs(data)
    fraction = check_val_fraction(data.get("val_fraction"))
    if fraction is None:
        return {s: (s if specs[s] is not None else None) for s in SPLITS}
    if specs["val"] is not None and specs["test"] is not None:
        raise ConfigError(
            f"{VAL_FRACTION_KEY}={fraction:g} validates on a share of the training images, "
            "but data.val and data.test are both set, and data.val would be neither "
            f"validation nor test: set data.val=null, or {VAL_FRACTION_KEY}=null to validate "
            "on data.val"
        )
    train = "train" if specs["train"] is not None else None
    test = "test" if specs["test"] is not None else ("val" if specs["val"] is not None else None)
    return {"train": train, "val": train, "test": test}


def _carved_sources(
    data: dict[str, Any],
    splits: Sequence[str],
    class_names: Sequence[str] | None,
    fraction: float,
) -> tuple[dict[str, Any], ValSplit | None]:
    """``({role: source}, ValSplit)`` of the roles in ``splits`` with ``data.val_fraction``:
    the ``train`` and ``val`` roles are the two parts of ``data.train`` (carved the same way
    whichever of them is asked for), ``test`` is :func:`split_roles`'s."""
    roles = split_roles(data)
    wanted = [r for r in SPLITS if r in splits]
    if any(r in ("train", "val") for r in wanted) and roles["train"] is None:
        raise ConfigError(
            f"{VAL_FRACTION_KEY}={fraction:g} carves the val split from the training images, "
            "but data.train is null"
        )
    needed = {roles[r] for r in wanted if roles[r] is not None}
    built = build_sources(data, [s for s in SPLITS if s in needed], class_names)
    out: dict[str, Any] = {}
    info: ValSplit | None = None
    if "train" in built and any(r in ("train", "val") for r in wanted):
        source = built["train"]
        report = getattr(source, "report", None)
        seed = data.get("seed")
        train_part, val_part, info = carve(
            list(source.records),
            getattr(source, "class_names", None),
            fraction,
            0 if seed is None else int(seed),
            report=report if hasattr(report, "count_records") else None,
            on_bad=getattr(source, "on_bad", None),
        )
        out.update({r: p for r, p in (("train", train_part), ("val", val_part)) if r in wanted})
    parts = [info.describe()] if info is not None else []
    if "test" in wanted and roles["test"] in built:
        out["test"] = built[roles["test"]]
        if roles["test"] == "val":
            n = len(out["test"].records)
            if not parts:
                parts.append(f"{VAL_FRACTION_KEY}={fraction:g}")
            parts.append(f"the configured val split ({n} images) is the test split")
    if parts:
        log.info("%s", "; ".join(parts))
    return out, info


def build_datamodule(
    data: Mapping[str, Any],
    augment: Mapping[str, Any] | None,
    image_size: int | Sequence[int],
    splits: Sequence[str] = SPLITS,
    rename: Mapping[str, str] | None = None,
    predict: Any = None,
    class_names: Sequence[str] | None = None,
) -> DetectionDataModule:
    """The datamodule of ``data`` with the ``augment`` pipelines at ``image_size``.

    Args:
        data, augment: the ``data`` and ``augment`` config nodes.
        image_size: the network input ``(H, W)``.
        splits: the splits to build (the sources of the others are never parsed).
        rename: serve a split under another role, e.g. ``{"val": "test"}`` makes the
            ``val`` source the datamodule's test split (``evaluate`` does this).
        predict: images for the predict split (files, folders, globs).
        class_names: the class names when ``data.class_names`` is null (e.g. those of the
            checkpoint being evaluated); see :func:`build_sources`.

    With ``data.val_fraction`` the splits are roles (:func:`split_roles`): ``"val"`` is
    the seeded share of ``data.train``'s images (the same images whether or not
    ``"train"`` is built too: ``evaluate split=val`` sees those the run validated on),
    ``"train"`` the rest, ``"test"`` ``data.test`` or else the configured ``data.val``.
    The datamodule's :attr:`~DetectionDataModule.val_split` says which images went where.
    """
    data = plain(data)
    aug = plain(augment) or {}
    rename = dict(rename or {})
    fraction = check_val_fraction(data.get("val_fraction"))
    val_split: ValSplit | None = None
    if fraction is None:
        built = build_sources(data, splits, class_names)
    else:
        built, val_split = _carved_sources(data, splits, class_names, fraction)
    sources = {rename.get(split, split): source for split, source in built.items()}
    eval_aug = aug.get("eval", "val")
    options = {k: data[k] for k in DATAMODULE_OPTIONS if k in data and data[k] is not None}
    names = data.get("class_names") or class_names
    return DetectionDataModule(
        train=sources.get("train"),
        val=sources.get("val"),
        test=sources.get("test"),
        predict=predict,
        class_names=None if sources or names is None else list(names),
        image_size=image_size,
        augment={
            "train": aug.get("train", "ssd"),
            "val": eval_aug,
            "test": eval_aug,
            "predict": eval_aug,
        },
        val_split=val_split,
        **options,
    )
