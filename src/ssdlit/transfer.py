"""Transfer learning between class lists: keep the rows of the classes two models share.

A head's class outputs come from convolutions whose output channels are arranged
anchor-major: channel ``a * V + j`` is value ``j`` of the ``a``-th anchor of a location
(:func:`ssdlit.heads.base.flatten_level`), and the ``V`` values of an anchor are ``F``
class-independent values followed by one value per class ``1..C``:

==========  ===================================  ==========================================
head        class-output parameters              per anchor (``F`` + ``C`` values)
==========  ===================================  ==========================================
ssd         ``cls_predictors.<level>``           background logit, then C (softmax)
ssdlite     last conv of ``cls_predictors.<l>``  background logit, then C (softmax)
retina      ``cls_predictor`` (shared)           C sigmoid logits (no background, ``F = 0``)
yolo        ``predictors.<level>``               tx, ty, tw, th, objectness, then C
==========  ===================================  ==========================================

- :func:`subsample_classes` is ssd_keras's weight sub-sampling: a model's state dict
  reduced to the classes ``keep`` (labels ``1..C``, in the new order); the
  class-independent values (background, box, objectness) are always kept. A
  :class:`~ssdlit.Detector` (or :class:`~ssdlit.module.DetectionModule`) built with
  ``len(keep)`` classes loads the result strictly, and its logits for the kept values
  equal the old model's exactly.
- :func:`transfer_classes` starts a new model from a checkpoint whose classes differ
  (``python -m ssdlit.train init_from=PATH``): the rows of the classes with the same name
  are copied, the new classes keep the new model's initialisation, everything else loads.

A third-party head tells its layout by a method ``class_outputs()`` returning
:class:`ClassOutput` entries (parameter names relative to the head).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

__all__ = [
    "ClassOutput",
    "class_outputs",
    "infer_class_outputs",
    "init_from_checkpoint",
    "select_class_rows",
    "subsample_classes",
    "transfer_classes",
]


@dataclass(frozen=True)
class ClassOutput:
    """A parameter whose first dimension holds per-anchor class values.

    Attributes:
        key: the parameter's name (relative to the head, or a full state-dict key).
        anchors: ``n``, anchors per location; the first dimension is ``n * (fixed + C)``.
        fixed: values per anchor before class 1 that do not belong to a class (ssd: 1,
            the background; retina: 0; yolo: 5, the box and the objectness).
    """

    key: str
    anchors: int
    fixed: int

    def num_classes(self, tensor: Tensor) -> int:
        """C of ``tensor`` (this parameter's value in some model)."""
        rows = int(tensor.shape[0])
        if rows % self.anchors or rows // self.anchors < self.fixed:
            raise ValueError(
                f"{self.key}: {rows} output rows are not {self.anchors} anchors of "
                f"{self.fixed} + C values"
            )
        return rows // self.anchors - self.fixed


def _last_conv(module: nn.Module) -> str:
    """The name (within ``module``) of its last ``Conv2d``; "" when it is one."""
    names = [name for name, m in module.named_modules() if isinstance(m, nn.Conv2d)]
    if not names:
        raise ValueError(f"no convolution in {module}")
    return names[-1]


def _params(prefix: str, module: nn.Module, anchors: int, fixed: int) -> list[ClassOutput]:
    return [
        ClassOutput(f"{prefix}.{name}" if prefix else name, anchors, fixed)
        for name, _ in module.named_parameters()
    ]


def class_outputs(head: nn.Module) -> list[ClassOutput]:
    """The class-output parameters of ``head`` (names relative to the head).

    The shipped heads' layouts are in the module docstring; any other head must define
    ``class_outputs()``.
    """
    custom = getattr(head, "class_outputs", None)
    if callable(custom):
        return list(custom())
    from ssdlit.heads.retina import RetinaHead
    from ssdlit.heads.ssd import SSDHead
    from ssdlit.heads.yolo import YoloHead

    out: list[ClassOutput] = []
    if isinstance(head, SSDHead):  # and SSDLiteHead: the last conv of each predictor
        for i, (pred, n) in enumerate(zip(head.cls_predictors, head.num_anchors, strict=True)):
            name = _last_conv(pred)
            conv = pred.get_submodule(name) if name else pred
            out += _params(f"cls_predictors.{i}" + (f".{name}" if name else ""), conv, n, 1)
    elif isinstance(head, RetinaHead):
        out += _params("cls_predictor", head.cls_predictor, head.num_anchors[0], 0)
    elif isinstance(head, YoloHead):
        for i, (pred, n) in enumerate(zip(head.predictors, head.num_anchors, strict=True)):
            out += _params(f"predictors.{i}", pred, n, 5)
    else:
        raise TypeError(
            f"{type(head).__name__} does not say which of its outputs are per class: give it "
            "a class_outputs() method (see ssdlit.transfer)"
        )
    return out


_SSD = re.compile(r"^(?P<head>(?:.*\.)?head\.)cls_predictors\.(?P<level>\d+)\.(?P<rest>.+)$")
_RETINA = re.compile(r"^(?P<head>(?:.*\.)?head\.)cls_predictor\.(?P<rest>weight|bias)$")
_YOLO = re.compile(r"^(?P<head>(?:.*\.)?head\.)predictors\.(?P<level>\d+)\.(?P<rest>weight|bias)$")


def infer_class_outputs(
    state_dict: Mapping[str, Tensor], num_classes: int | None = None
) -> list[ClassOutput]:
    """The class-output parameters of a shipped head, from a state dict's keys and shapes
    (full keys: ``detector.head.`` for a DetectionModule, ``head.`` for a Detector).

    The anchors per location come from the box predictor beside each class predictor
    (4 values per anchor); YOLO's predictors hold both, so they need ``num_classes``.
    """
    out: list[ClassOutput] = []
    ssd_levels: dict[str, list[str]] = {}
    for key, value in state_dict.items():
        if m := _SSD.match(key):
            ssd_levels.setdefault(f"{m['head']}cls_predictors.{m['level']}.", []).append(key)
        elif m := _RETINA.match(key):
            box = state_dict[f"{m['head']}box_predictor.weight"]
            out.append(ClassOutput(key, int(box.shape[0]) // 4, 0))
        elif m := _YOLO.match(key):
            if num_classes is None:
                raise ValueError(
                    "a YOLO head's predictors hold the box, objectness and class values "
                    "together: pass num_classes (C of the state dict) or head="
                )
            out.append(ClassOutput(key, int(value.shape[0]) // (5 + int(num_classes)), 5))
    for keys in ssd_levels.values():
        # The last convolution of the predictor (SSD: the predictor; SSDLite: its 1x1).
        convs = [k for k in keys if k.endswith(".weight") and state_dict[k].ndim == 4]
        if not convs:
            continue
        conv = convs[-1].removesuffix("weight")
        box_weight = state_dict[conv.replace("cls_predictors.", "box_predictors.", 1) + "weight"]
        n = int(box_weight.shape[0]) // 4
        out += [
            ClassOutput(k, n, 1)
            for k in keys
            if k.startswith(conv) and k[len(conv) :] in ("weight", "bias")
        ]
    if not out:
        raise ValueError(
            "no class-output parameters found in the state dict (the shipped heads: ssd, "
            "ssdlite, retina, yolo); pass head= for another head"
        )
    return out


def _rows(tensor: Tensor, out: ClassOutput) -> Tensor:
    """``tensor`` ``[n * (F + C), ...]`` as ``[n, F + C, ...]``."""
    return tensor.reshape(out.anchors, -1, *tensor.shape[1:])


def select_class_rows(
    tensor: Tensor,
    out: ClassOutput,
    columns: Sequence[int | None],
    fresh: Tensor | None = None,
) -> Tensor:
    """The rows of ``tensor`` for new classes ``columns``: ``columns[j]`` is the old label
    (``1..C``) whose rows new class ``j + 1`` takes, or None for a class that keeps the
    rows of ``fresh`` (the new model's own tensor; needed when a None is present). The
    class-independent values are the old ones. Returns ``[n * (F + len(columns)), ...]``.
    """
    old_c = out.num_classes(tensor)
    for label in columns:
        if label is not None and not 1 <= int(label) <= old_c:
            raise ValueError(f"{out.key}: label {label} is not in 1..{old_c}")
    old = _rows(tensor, out)
    if fresh is None:
        if any(label is None for label in columns):
            raise ValueError("new classes (None) need the new model's tensor: pass fresh=")
        index = list(range(out.fixed)) + [out.fixed + int(c) - 1 for c in columns]  # type: ignore[arg-type]
        new = old[:, index]
    else:
        new = _rows(fresh, out).clone()
        if new.shape[1] != out.fixed + len(columns) or new.shape[2:] != old.shape[2:]:
            raise ValueError(
                f"{out.key}: the new tensor {tuple(fresh.shape)} is not {out.anchors} anchors "
                f"of {out.fixed} + {len(columns)} values like {tuple(tensor.shape)}"
            )
        new[:, : out.fixed] = old[:, : out.fixed]
        for j, label in enumerate(columns):
            if label is not None:
                new[:, out.fixed + j] = old[:, out.fixed + int(label) - 1]
    return new.reshape(-1, *tensor.shape[1:]).contiguous()


def _full_keys(
    outputs: Sequence[ClassOutput], state_dict: Mapping[str, Tensor]
) -> list[ClassOutput]:
    """Head-relative :class:`ClassOutput` keys made full keys of ``state_dict``."""
    for prefix in ("", "head.", "detector.head."):
        if all(prefix + o.key in state_dict for o in outputs):
            return [ClassOutput(prefix + o.key, o.anchors, o.fixed) for o in outputs]
    raise KeyError(f"the state dict holds no {outputs[0].key} (nor head. / detector.head.)")


def subsample_classes(
    state_dict: Mapping[str, Tensor],
    keep: Sequence[int],
    *,
    head: nn.Module | None = None,
    num_classes: int | None = None,
) -> dict[str, Tensor]:
    """ssd_keras's weight sub-sampling: ``state_dict`` reduced to the classes ``keep``.

    Args:
        state_dict: a DetectionModule's, Detector's or head's state dict.
        keep: the labels (``1..C``) to keep, in the new order (new label ``j + 1`` is old
            label ``keep[j]``); background (and every other class-independent value) is
            always kept.
        head: the head the state dict belongs to (any C); None: inferred from the keys of
            the shipped heads (:func:`infer_class_outputs`).
        num_classes: C of ``state_dict``; only needed for a YOLO head without ``head``.

    Returns:
        a new state dict (the other tensors shared with ``state_dict``) that a model built
        with ``len(keep)`` classes loads strictly.
    """
    keep = [int(k) for k in keep]
    if not keep:
        raise ValueError("keep is empty: keep at least one class")
    if len(set(keep)) != len(keep):
        raise ValueError(f"keep lists a label twice: {keep}")
    outputs = (
        _full_keys(class_outputs(head), state_dict)
        if head is not None
        else infer_class_outputs(state_dict, num_classes)
    )
    result = dict(state_dict)
    for out in outputs:
        result[out.key] = select_class_rows(state_dict[out.key], out, keep)
    return result


def transfer_classes(
    module: nn.Module,
    state_dict: Mapping[str, Tensor],
    old_classes: Sequence[str],
    new_classes: Sequence[str],
    head: nn.Module,
    head_prefix: str = "detector.head.",
) -> dict[str, Any]:
    """Load ``state_dict`` (a model of ``old_classes``) into ``module`` (``new_classes``).

    The class rows of a new class named like an old one are the old class's; the other
    new classes keep ``module``'s own initialisation; every other tensor must match in
    name and shape and is loaded (strictly: a key missing on either side is an error).

    Returns ``{"kept": [names], "new": [names], "dropped": [names], "tensors": count}``.
    """
    own = module.state_dict()
    outputs = {
        head_prefix + o.key: ClassOutput(head_prefix + o.key, o.anchors, o.fixed)
        for o in class_outputs(head)
    }
    old_index = {name: i + 1 for i, name in enumerate(old_classes)}
    columns = [old_index.get(name) for name in new_classes]
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise ValueError(
            "the checkpoint's network differs from this one: "
            + (
                f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
                if missing
                else ""
            )
            + ("; " if missing and unexpected else "")
            + (
                f"unexpected {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}"
                if unexpected
                else ""
            )
        )
    loaded: dict[str, Tensor] = {}
    for key, value in own.items():
        old = state_dict[key]
        if key in outputs:
            out = outputs[key]
            if out.num_classes(old) != len(old_classes):
                raise ValueError(
                    f"{key} holds {out.num_classes(old)} classes, the checkpoint names "
                    f"{len(old_classes)}"
                )
            loaded[key] = select_class_rows(old, out, columns, fresh=value)
        elif old.shape != value.shape:
            raise ValueError(
                f"the checkpoint's network differs from this one: {key} is "
                f"{tuple(old.shape)} there, {tuple(value.shape)} here"
            )
        else:
            loaded[key] = old
    module.load_state_dict(loaded, strict=True)
    return {
        "kept": [n for n, c in zip(new_classes, columns, strict=True) if c is not None],
        "new": [n for n, c in zip(new_classes, columns, strict=True) if c is None],
        "dropped": [n for n in old_classes if n not in set(new_classes)],
        "tensors": len(loaded),
    }


def init_from_checkpoint(module: Any, path: str | Path) -> str:
    """Start ``module`` (a :class:`~ssdlit.module.DetectionModule`) from the ssdlit
    checkpoint ``path`` (read with ``weights_only=True``) by :func:`transfer_classes`;
    returns the one-line report."""
    from ssdlit.training.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    hparams = ckpt.get("hyper_parameters") or {}
    if "class_names" not in hparams or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not an ssdlit checkpoint (no class_names / state_dict)")
    old = [str(c) for c in hparams["class_names"]]
    new = list(module.class_names)
    done = transfer_classes(module, ckpt["state_dict"], old, new, module.detector.head)
    kept = f"kept {len(done['kept'])} of {len(old)} classes ({', '.join(done['kept']) or '-'})"
    return (
        f"init_from {path}: {kept}, new: {', '.join(done['new']) or '-'}"
        + (f", dropped: {', '.join(done['dropped'])}" if done["dropped"] else "")
        + f"; {done['tensors']} tensors loaded"
    )
