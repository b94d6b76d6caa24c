"""torchvision's SSD detectors as ssdlit :class:`~ssdlit.Detector` objects.

:func:`from_torchvision` takes torchvision's ``ssd300_vgg16`` or
``ssdlite320_mobilenet_v3_large`` (the model, its state dict, or a ``.pth`` file holding
either the state dict or a torchvision reference-training checkpoint ``{"model": ...}``)
and returns an ssdlit detector with the same network, anchors, input normalisation, box
coder and post-processing. The contract, checked in ``tests/test_zoo_torchvision.py``: for
the same uint8 images of the model's input size, in eval mode, ssdlit's detections equal
torchvision's (the same labels and order, the same scores, the same boxes to float32
rounding).

How each part corresponds (``ARCHITECTURES`` holds the ssdlit side):

=================  =========================================  ===================================
part               torchvision                                ssdlit
=================  =========================================  ===================================
input              ``(x / 255 - image_mean) / image_std``     backbone ``normalization``
                   (after a resize that is the identity for    (``caffe`` for SSD300, ``unit``
                   images of the input size)                   for SSDLite), same order of ops
anchors            ``DefaultBoxGenerator(clip=True)``, xyxy    ``ssd`` generator, ratio lists
                   pixels                                      ``[1, 2, .5(, 3, 1/3)]``, ``clip:
                                                               size``, cxcywh normalised
box coder          ``BoxCoder(weights=(10, 10, 5, 5))``,       ``BoxCoder(variances=(.1, .1, .2,
                   ``dw, dh`` clamped at log(1000 / 16)        .2))``, the same clamp
decoding           softmax; per class score > thresh, top-k    ``per_class`` with ``pre_nms_top_k``
                   before NMS; ``batched_nms``; best N         and no per-class cap after NMS
=================  =========================================  ===================================

COCO weights by name (:data:`NAMED_WEIGHTS`) download through torchvision's weight enums
into the torch hub cache (:func:`ssdlit.backbones.pretrained.load_state_dict`, with its
offline error). Their 91 classes are torchvision's COCO categories: index = COCO category
id, 0 = background, unused ids named ``"N/A"`` (:func:`coco_class_names`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ssdlit.backbones.vgg import VGG16_STAGES
from ssdlit.detector import Detector

__all__ = [
    "ARCHITECTURES",
    "NAMED_WEIGHTS",
    "Architecture",
    "coco_class_names",
    "convert_state_dict",
    "detector_spec",
    "find_architecture",
    "from_torchvision",
    "load_converted",
    "load_named_weights",
    "torchvision_state_dict",
]

_RATIOS_2 = [1.0, 2.0, 0.5]
_RATIOS_3 = [1.0, 2.0, 0.5, 3.0, 1.0 / 3.0]
# torchvision's SSDMatcher(0.5): each gt's best anchor, then every anchor with IoU >= 0.5;
# no ignore band. Its loss keeps exactly 3 negatives per positive (positive_fraction 0.25).
_MATCHER = {"name": "ssd", "matching": "multi", "pos_iou_threshold": 0.5, "neg_iou_limit": 0.5}


@dataclass(frozen=True)
class Architecture:
    """The ssdlit settings of one torchvision architecture (what :func:`detector_spec` builds).

    Attributes:
        name: torchvision's builder in ``torchvision.models.detection``.
        image_size: the fixed input ``(H, W)``.
        backbone, anchors, head, postprocess: ssdlit component specs (``{name: ..., ...}``).
        weights: the torchvision weights enum member of its COCO weights, as
            ``"EnumClass.MEMBER"``.
    """

    name: str
    image_size: tuple[int, int]
    backbone: dict[str, Any]
    anchors: dict[str, Any]
    head: dict[str, Any]
    postprocess: dict[str, Any]
    weights: str
    convert_key: Callable[[str], str] = field(repr=False)


# -- state-dict keys: torchvision -> ssdlit ------------------------------------------------


def _vgg_feature_names() -> dict[int, str]:
    """Index in torchvision's ``vgg16().features`` of each conv up to conv4_3 -> its name.

    A conv and its ReLU take two slots, a pooling layer one (torchvision's configuration D).
    """
    names, index = {}, 0
    for stage, widths in enumerate(VGG16_STAGES[:4], start=1):
        for j in range(1, len(widths) + 1):
            names[index] = f"conv{stage}_{j}"
            index += 2
        index += 1
    return names


_VGG_FEATURES = _vgg_feature_names()
# torchvision's extra.0 is pool4, conv5_1, relu, conv5_2, relu, conv5_3, relu, then the
# fc block (pool5, fc6, relu, fc7, relu) at index 7.
_VGG_FC = {"1": "conv5_1", "3": "conv5_2", "5": "conv5_3", "7.1": "fc6", "7.3": "fc7"}
_HEADS = {"classification_head": "cls_predictors", "regression_head": "box_predictors"}


def _head_key(key: str, block: Mapping[str, str] | None = None) -> str | None:
    """``head.<x>_head.module_list.<l>.<rest>`` -> ``head.<ssdlit list>.<l>.<rest>``, with
    ``rest`` renamed by ``block`` (a prefix map) when given; None for other keys."""
    m = re.fullmatch(r"head\.(classification_head|regression_head)\.module_list\.(\d+)\.(.+)", key)
    if m is None:
        return None
    rest = m.group(3)
    for old, new in (block or {}).items():
        if rest.startswith(old + "."):
            rest = new + rest[len(old) :]
            break
    return f"head.{_HEADS[m.group(1)]}.{m.group(2)}.{rest}"


def _ssd300_key(key: str) -> str:
    """A key of torchvision's ``ssd300_vgg16`` -> the key of ssdlit's detector."""
    head = _head_key(key)
    if head is not None:
        return head
    if key == "backbone.scale_weight":
        return "backbone.conv4_3_norm.weight"
    m = re.fullmatch(r"backbone\.features\.(\d+)\.(weight|bias)", key)
    if m and int(m.group(1)) in _VGG_FEATURES:
        return f"backbone.features.{_VGG_FEATURES[int(m.group(1))]}.{m.group(2)}"
    m = re.fullmatch(r"backbone\.extra\.0\.(\d+(?:\.\d+)?)\.(weight|bias)", key)
    if m and m.group(1) in _VGG_FC:
        return f"backbone.fc.{_VGG_FC[m.group(1)]}.{m.group(2)}"
    m = re.fullmatch(r"backbone\.extra\.(\d+)\.([02])\.(weight|bias)", key)
    if m and int(m.group(1)) >= 1:
        k = int(m.group(1))  # conv(k+5)_1 at 0, conv(k+5)_2 at 2: ssdlit's conv6 .. conv9
        return f"backbone.extras.{k - 1}.conv{k + 5}_{int(m.group(2)) // 2 + 1}.{m.group(3)}"
    raise KeyError(key)


# torchvision's SSDLite predictor: Sequential(Conv2dNormActivation(dw conv, BN, ReLU6), conv);
# ssdlit's: Sequential(dw conv, BN, ReLU6, conv).
_SSDLITE_PREDICTOR = {"0.0": "0", "0.1": "1", "1": "3"}


def _ssdlite_key(key: str) -> str:
    """A key of torchvision's ``ssdlite320_mobilenet_v3_large`` -> ssdlit's detector key."""
    head = _head_key(key, _SSDLITE_PREDICTOR)
    if head is not None:
        return head
    for old, new in (
        ("backbone.features.0.", "backbone.c4."),
        ("backbone.features.1.", "backbone.c5."),
        ("backbone.extra.", "backbone.extras."),
    ):
        if key.startswith(old):
            return new + key[len(old) :]
    raise KeyError(key)


ARCHITECTURES: dict[str, Architecture] = {
    "ssd300_vgg16": Architecture(
        name="ssd300_vgg16",
        image_size=(300, 300),
        backbone={"name": "vgg16_ssd300", "normalization": "caffe"},
        anchors={
            "name": "ssd",
            "scales": [0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05],
            "aspect_ratios": [_RATIOS_2, _RATIOS_3, _RATIOS_3, _RATIOS_3, _RATIOS_2, _RATIOS_2],
            "two_boxes_for_ar1": True,
            "steps": [8, 16, 32, 64, 100, 300],
            "clip": "size",
        },
        head={"name": "ssd", "variances": [0.1, 0.1, 0.2, 0.2], "n_neg_min": 0},
        postprocess={
            "name": "per_class",
            "confidence_thresh": 0.01,
            "iou_threshold": 0.45,
            "top_k": 200,
            "pre_nms_top_k": 400,
            "nms_max_output_size": None,
        },
        weights="SSD300_VGG16_Weights.COCO_V1",
        convert_key=_ssd300_key,
    ),
    "ssdlite320_mobilenet_v3_large": Architecture(
        name="ssdlite320_mobilenet_v3_large",
        image_size=(320, 320),
        backbone={"name": "mobilenet_v3_large", "normalization": "unit", "reduced_tail": True},
        anchors={
            "name": "ssd",
            "scales": [0.2, 0.35, 0.5, 0.65, 0.8, 0.95, 1.0],
            "aspect_ratios": [_RATIOS_3] * 6,
            "two_boxes_for_ar1": True,
            "clip": "size",
        },
        head={"name": "ssdlite", "variances": [0.1, 0.1, 0.2, 0.2], "n_neg_min": 0},
        postprocess={
            "name": "per_class",
            "confidence_thresh": 0.001,
            "iou_threshold": 0.55,
            "top_k": 300,
            "pre_nms_top_k": 300,
            "nms_max_output_size": None,
        },
        weights="SSDLite320_MobileNet_V3_Large_Weights.COCO_V1",
        convert_key=_ssdlite_key,
    ),
}

#: Weights by name: ``init_from=`` / ``ckpt=`` values -> the architecture they belong to.
NAMED_WEIGHTS: dict[str, str] = {
    "torchvision:ssd300_vgg16_coco": "ssd300_vgg16",
    "torchvision:ssdlite320_coco": "ssdlite320_mobilenet_v3_large",
}


# -- reading torchvision models -----------------------------------------------------------


def torchvision_state_dict(source: nn.Module | Mapping[str, Tensor] | str | Path) -> dict:
    """The state dict of ``source``: a torchvision model, its state dict, or a ``.pth`` path
    holding either a state dict or a torchvision reference checkpoint (``{"model": ...}``).
    Files are read with ``weights_only=True``."""
    if isinstance(source, nn.Module):
        return dict(source.state_dict())
    if isinstance(source, (str, Path)):
        try:
            source = torch.load(str(source), map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"no such file: {source}") from None
    if isinstance(source, Mapping) and "model" in source and isinstance(source["model"], Mapping):
        source = source["model"]  # references/detection/train.py's checkpoints
    if not isinstance(source, Mapping) or not all(isinstance(v, Tensor) for v in source.values()):
        raise ValueError("expected a torchvision detection model, its state dict or a .pth file")
    return dict(source)


def find_architecture(state: Mapping[str, Tensor]) -> str:
    """Which torchvision architecture a state dict belongs to (a key of :data:`ARCHITECTURES`)."""
    if "backbone.scale_weight" in state:
        return "ssd300_vgg16"
    if any(k.startswith("backbone.features.1.") for k in state) and any(
        k.startswith("backbone.extra.") for k in state
    ):
        return "ssdlite320_mobilenet_v3_large"
    raise ValueError(
        "not a state dict of torchvision's ssd300_vgg16 or ssdlite320_mobilenet_v3_large "
        f"(first keys: {', '.join(list(state)[:3])})"
    )


def _num_classes(state: Mapping[str, Tensor], per_location: int) -> int:
    """Object classes (without background) of a state dict: rows of level 0's class output."""
    key = next(
        k
        for k in reversed(list(state))
        if k.startswith("head.classification_head.module_list.0.") and k.endswith("weight")
    )
    rows = int(state[key].shape[0])
    if rows % per_location:
        raise ValueError(f"{key} has {rows} rows, not a multiple of {per_location} anchors")
    return rows // per_location - 1


def detector_spec(arch: str, num_classes: int, **backbone: Any) -> dict[str, Any]:
    """``Detector.build`` keywords of ``arch`` for ``num_classes`` object classes, with
    torchvision's settings (its matcher included) and ``backbone`` options added."""
    a = _architecture(arch)
    return {
        "num_classes": int(num_classes),
        "image_size": a.image_size,
        "backbone": {**a.backbone, **backbone},
        "anchors": dict(a.anchors),
        "head": dict(a.head),
        "postprocess": dict(a.postprocess),
        "matcher": dict(_MATCHER),
        "clip_boxes": True,
    }


def _architecture(arch: str) -> Architecture:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch]


def convert_state_dict(state: Mapping[str, Tensor], arch: str) -> dict[str, Tensor]:
    """torchvision keys -> the keys of ssdlit's detector of ``arch`` (tensors shared)."""
    a = _architecture(arch)
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith("anchor_generator.") or key.startswith("transform."):
            continue  # torchvision keeps no tensors there; nothing of the network
        try:
            new = a.convert_key(key)
        except KeyError:
            raise ValueError(
                f"{arch}: unexpected key {key!r} in the torchvision state dict"
            ) from None
        out[new] = value
    return out


def _reduced_tail(state: Mapping[str, Tensor]) -> bool:
    """True when the MobileNetV3 trunk ends with 480 channels (torchvision's reduced tail,
    used whenever no ImageNet trunk was loaded, its COCO weights included)."""
    return int(state["backbone.extra.0.0.0.weight"].shape[1]) == 480


def from_torchvision(
    source: nn.Module | Mapping[str, Tensor] | str | Path, arch: str | None = None
) -> Detector:
    """An ssdlit :class:`~ssdlit.Detector` computing what torchvision's model computes.

    Args:
        source: torchvision's ``ssd300_vgg16`` or ``ssdlite320_mobilenet_v3_large`` model, its
            state dict, or a path to a ``.pth`` file of either (see :func:`torchvision_state_dict`).
        arch: ``"ssd300_vgg16"`` or ``"ssdlite320_mobilenet_v3_large"``; found from the
            state dict's keys when None (and checked against them when given).

    Returns:
        A detector in eval mode, with as many classes as the source (91 outputs -> 90
        object classes: label ``i`` is torchvision's label ``i``). ``det(images)`` takes
        ``[B, 3, H, W]`` uint8 images of the input size and returns per image ``[k, 6]``
        (label, score, x1, y1, x2, y2) with the box normalised to [0, 1]: torchvision's
        boxes divided by the input size.

    Raises:
        ValueError: the state dict is not of a supported architecture, or does not fill
            ssdlit's network exactly (a missing, extra or differently shaped tensor).
    """
    state = torchvision_state_dict(source)
    found = find_architecture(state)
    if arch is not None and _architecture(arch).name != found:
        raise ValueError(f"the weights are torchvision's {found}, not {arch}")
    options = {"reduced_tail": _reduced_tail(state)} if found.startswith("ssdlite") else {}
    spec = detector_spec(found, 1, **options)
    # level 0's anchors per location: its ratios and the extra square
    per_location = len(spec["anchors"]["aspect_ratios"][0]) + 1
    spec["num_classes"] = _num_classes(state, per_location)
    detector = Detector.build(**spec)
    load_converted(detector, convert_state_dict(state, found), found)
    return detector.eval()


def load_converted(detector: nn.Module, state: Mapping[str, Tensor], arch: str) -> None:
    """Load a converted state dict strictly, with a message that names what differs."""
    own = detector.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    shapes = [
        f"{k}: {tuple(state[k].shape)} in the file, {tuple(v.shape)} here"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:4])}" + (" ..." if len(missing) > 4 else ""))
        if extra:
            parts.append(f"unexpected {', '.join(extra[:4])}" + (" ..." if len(extra) > 4 else ""))
        parts += shapes[:4]
        raise ValueError(
            f"torchvision {arch} weights do not fit ssdlit's network: " + "; ".join(parts)
        )
    detector.load_state_dict(state, strict=True)


# -- COCO weights by name ----------------------------------------------------------------


def _weights_enum(arch: str):
    from torchvision.models import detection

    cls_name, member = _architecture(arch).weights.split(".")
    return getattr(getattr(detection, cls_name), member)


def coco_class_names() -> list[str]:
    """torchvision's 90 COCO class names in label order 1..90 (label = COCO category id;
    the ten unused ids are named ``"N/A"``)."""
    return list(_weights_enum("ssd300_vgg16").meta["categories"][1:])


def load_named_weights(name: str, *, progress: bool = True) -> tuple[str, dict[str, Tensor]]:
    """``torchvision:ssd300_vgg16_coco`` / ``torchvision:ssdlite320_coco`` -> (architecture,
    torchvision state dict), downloaded once into the torch hub cache.

    Raises:
        ValueError: an unknown name.
        ssdlit.backbones.PretrainedWeightsError: the file cannot be downloaded (offline:
            the message says where to put it by hand) or read.
    """
    from ssdlit.backbones.pretrained import load_state_dict

    if name not in NAMED_WEIGHTS:
        raise ValueError(f"unknown weights {name!r}; expected one of {sorted(NAMED_WEIGHTS)}")
    arch = NAMED_WEIGHTS[name]
    without = (
        "or go without them: train from random weights (init_from=null, e.g. "
        "+experiment=small_data), or give a torchvision .pth file you have "
        "(init_from=PATH.pth, ckpt=PATH.pth)."
    )
    return arch, load_state_dict(_weights_enum(arch), progress=progress, without=without)
