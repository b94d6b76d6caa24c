"""ssd_keras's trained SSD300 (github.com/pierluigiferrari/ssd_keras) as an ssdlit detector.

ssd_keras publishes SSD300 weights trained on Pascal VOC07+12, converted from the original
Caffe model: ``VGG_VOC0712_SSD_300x300_iter_120000.h5``, reported at 77.5% mAP on VOC2007
test (ssd_keras's report, not a measurement of ssdlit's). :func:`from_ssd_keras` reads such
an HDF5 file and returns a :class:`~ssdlit.Detector` that computes what ssd_keras's
``ssd_300`` model computes.

What maps to what (Keras layer -> ssdlit parameters; kernels ``[kh, kw, in, out]`` become
``[out, in, kh, kw]``: TensorFlow convolutions are cross-correlations, as torch's):

================================  ==============================================
Keras layer                       ssdlit module
================================  ==============================================
``conv1_1 .. conv4_3``            ``backbone.features.conv1_1 .. conv4_3``
``conv4_3_norm`` (gamma)          ``backbone.conv4_3_norm`` (weight)
``conv5_1 .. conv5_3, fc6, fc7``  ``backbone.fc.conv5_1 .. fc7``
``conv6_1 .. conv9_2``            ``backbone.extras.{0..3}.conv{6..9}_{1,2}``
``<source>_mbox_conf``            ``head.cls_predictors.{level}``
``<source>_mbox_loc``             ``head.box_predictors.{level}``
================================  ==============================================

with the sources ``conv4_3_norm, fc7, conv6_2, conv7_2, conv8_2, conv9_2`` (levels 0..5).
No other change is needed: both lay a predictor's channels out anchor-major (channel
``a * K + k``, Keras's ``Reshape((-1, K))`` of ``[B, H, W, n * K]`` is ssdlit's
``flatten_level``), both encode boxes as SSD centroids ``(dx, dy, dw, dh)`` with
variances ``(0.1, 0.1, 0.2, 0.2)`` (ssd_keras's ``coords='centroids'`` is ssdlit's
:class:`~ssdlit.boxes.BoxCoder`) and both lay anchors out in the order (level, y, x, box).

The input: ssd_keras's model takes RGB 0..255, subtracts ``[123, 117, 104]`` and then
swaps the channels to BGR before ``conv1_1``. ssdlit's detector computes
``(x / 255 - mean) / std`` on RGB with the backbone's ``normalization="ssd_keras"`` (the same
subtraction, up to float32 rounding) and never reorders channels, so the swap is folded
into ``conv1_1``: its kernel's input-channel axis is reversed (its B, G, R input weights
become R, G, B), which is exactly the same convolution.

What remains different, none of it visible on real images: the input subtraction rounds
in float32 as ``(x / 255 - m / 255) * 255``; L2 normalisation divides by
``max(||x||, 1e-10)`` where Keras divides by ``sqrt(max(||x||^2, 1e-12))`` (they differ
only for ``||x|| < 1e-6``); the box decoder clamps ``dw * 0.2`` and ``dh * 0.2`` at
``log(62.5)`` before ``exp``. Detections are normalised to the input where ssd_keras's
``decode_detections`` gives pixels of the 300x300 input (multiply by 300).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssdlit.datamodules.voc import VOC_CLASSES as DEVKIT_CLASSES
from ssdlit.detector import Detector

__all__ = ["N_BOXES", "SOURCES", "VOC_CLASSES", "detector_spec", "from_ssd_keras"]

#: Pascal VOC's 20 object classes in ssd_keras's order, which is the devkit's (its class 0,
#: ``background``, is ssdlit's implicit column 0): ssdlit label ``i`` (1..20) is
#: ``VOC_CLASSES[i - 1]``.
VOC_CLASSES = DEVKIT_CLASSES

#: The Keras layers whose outputs the predictors read, one per feature level.
SOURCES: tuple[str, ...] = ("conv4_3_norm", "fc7", "conv6_2", "conv7_2", "conv8_2", "conv9_2")
#: Boxes per cell of each level (ssd_keras's ``n_boxes`` for SSD300 on VOC).
N_BOXES: tuple[int, ...] = (4, 6, 6, 6, 4, 4)


def _backbone_convs() -> list[tuple[str, str]]:
    """The backbone's convolutions: Keras layer -> ssdlit module (under ``backbone.``)."""
    pairs = [
        (f"conv{i}_{j}", f"features.conv{i}_{j}")
        for i, n in ((1, 2), (2, 2), (3, 3), (4, 3))
        for j in range(1, n + 1)
    ]
    pairs += [(f"conv5_{j}", f"fc.conv5_{j}") for j in (1, 2, 3)]
    pairs += [("fc6", "fc.fc6"), ("fc7", "fc.fc7")]
    # the extra blocks conv6 .. conv9 are extras.0 .. extras.3
    pairs += [(f"conv{i}_{j}", f"extras.{i - 6}.conv{i}_{j}") for i in (6, 7, 8, 9) for j in (1, 2)]
    return pairs


_L2_LAYER = "conv4_3_norm"
_L2_PARAM = "backbone.conv4_3_norm.weight"
# The first convolution sees BGR in Keras, RGB in ssdlit: its input axis is reversed.
_FIRST_CONV = "conv1_1"

_INSTALL_HINT = 'reading ssd_keras weights needs h5py: pip install "ssdlit[keras]"'


def detector_spec(num_classes: int = len(VOC_CLASSES)) -> dict[str, Any]:
    """The keyword arguments of :meth:`~ssdlit.Detector.build` for ssd_keras's SSD300.

    Anchors, head and decoding are ssd_keras's ``ssd_300`` for Pascal VOC (as in its
    ``ssd300_training`` / evaluation notebooks): scales 0.1, 0.2, 0.37 .. 1.05, ratios
    ``{1, 2, 1/2}`` on conv4_3, conv8_2, conv9_2 and ``{1, 2, 1/2, 3, 1/3}`` elsewhere, the
    extra ``sqrt(s_k s_k+1)`` square, steps 8..300, offsets 0.5, not clipped (8732 anchors);
    variances 0.1, 0.1, 0.2, 0.2; per-class NMS at IoU 0.45 over scores above 0.01, 400
    boxes per class, top 200; decoded boxes not clipped (ssd_keras's decoder does not clip);
    matching for fine-tuning as its training notebook (multi, IoU 0.5, no ignore band).
    """
    return {
        "num_classes": int(num_classes),
        "image_size": (300, 300),
        "backbone": {"name": "vgg16_ssd300", "normalization": "ssd_keras"},
        "anchors": {
            "name": "ssd",
            "scales": [0.1, 0.2, 0.37, 0.54, 0.71, 0.88, 1.05],
            "aspect_ratios": [  # 4 boxes (3 ratios + the extra square) or 6 (5 + 1) per cell
                [1.0, 2.0, 0.5],
                [1.0, 2.0, 0.5, 3.0, 1.0 / 3.0],
                [1.0, 2.0, 0.5, 3.0, 1.0 / 3.0],
                [1.0, 2.0, 0.5, 3.0, 1.0 / 3.0],
                [1.0, 2.0, 0.5],
                [1.0, 2.0, 0.5],
            ],
            "two_boxes_for_ar1": True,
            "steps": [8, 16, 32, 64, 100, 300],
            "offsets": [0.5] * len(N_BOXES),
            "clip": False,
        },
        "head": {"name": "ssd", "variances": [0.1, 0.1, 0.2, 0.2]},
        "postprocess": {
            "name": "per_class",
            "confidence_thresh": 0.01,
            "iou_threshold": 0.45,
            "top_k": 200,
            "nms_max_output_size": 400,
        },
        "matcher": {
            "name": "ssd",
            "matching": "multi",
            "pos_iou_threshold": 0.5,
            "neg_iou_limit": 0.5,
        },
        "clip_boxes": False,
    }


def from_ssd_keras(h5_path: str | os.PathLike[str], *, num_classes: int | None = None) -> Detector:
    """ssd_keras's SSD300 from its HDF5 weights, as an ssdlit :class:`~ssdlit.Detector`.

    Reads a file written by Keras's ``model.save_weights`` (one group per layer, the
    weights under ``<layer>/<layer>/kernel:0`` ...) or ``model.save`` (the same under
    ``model_weights``), in the order of each layer's ``weight_names`` attribute (kernel,
    bias; gamma for ``conv4_3_norm``), else by the datasets' names. Layers without weights
    (input, pooling, padding, reshape, softmax, anchors) are ignored. Every weighted layer
    of ssd_keras's ``keras_ssd300.py`` must be there with its shape, and no other: the
    strictness of ``load_state_dict(strict=True)``. See the module docstring for the map.

    Args:
        h5_path: the ``.h5`` file, e.g. ``VGG_VOC0712_SSD_300x300_iter_120000.h5``.
        num_classes: object classes without background, when the caller wants it checked;
            by default what the file's ``*_mbox_conf`` layers hold (``n_boxes * (C + 1)``
            outputs: 21 per box is VOC's 20, named by :data:`VOC_CLASSES`).

    Returns:
        The detector of :func:`detector_spec` with the file's weights, in eval mode:
        ``det(images)`` for ``images`` uint8 ``[B, 3, 300, 300]`` RGB gives per image
        ``[k, 6]`` (label 1..C, score, x1, y1, x2, y2) normalised to the input;
        ``det.raw(images)`` gives ``cls_logits [B, 8732, C + 1]`` (softmax, column 0 =
        background) and ``box_deltas [B, 8732, 4]`` (dx, dy, dw, dh, decoded by
        ``det.head.coder``) against ``det.anchors [8732, 4]`` cxcywh normalised.

    Raises:
        ImportError: h5py is not installed.
        FileNotFoundError: no file at ``h5_path``.
        ValueError: a layer missing or unexpected, a shape that differs (named with the
            expected and the found shape and the file), or ``num_classes`` not the file's.
    """
    try:
        import h5py
    except ImportError as err:
        raise ImportError(_INSTALL_HINT) from err
    path = Path(h5_path)
    if not path.is_file():
        raise FileNotFoundError(f"no ssd_keras weights file at {path}")
    with h5py.File(path, "r") as f:
        layers = _read_layers(f, path)
    _check_layer_names(layers, path)
    found = _num_classes(layers, path)
    if num_classes is not None and int(num_classes) != found:
        raise ValueError(
            f"{path} holds a {found}-class SSD300 ({found + 1} outputs per box with "
            f"background) but num_classes={num_classes} was asked for"
        )
    det = Detector.build(**detector_spec(found))
    det.load_state_dict(_state_dict(layers, det.state_dict(), path), strict=True)
    return det.eval()


def _expected_layers() -> list[str]:
    """Every weighted Keras layer of ssd_keras's SSD300, in the model's order."""
    names = [k for k, _ in _backbone_convs()] + [_L2_LAYER]
    return names + [f"{s}_mbox_{kind}" for kind in ("conf", "loc") for s in SOURCES]


def _decode(names: Any) -> list[str]:
    """An HDF5 attribute of names (bytes or str, possibly an empty float array) as strings."""
    return [n.decode("utf8") if isinstance(n, bytes) else str(n) for n in np.asarray(names).ravel()]


def _names_attr(obj: Any, name: str) -> list[str] | None:
    """The list attribute ``name`` of an HDF5 object, or None when it has none.

    Keras splits an attribute too large for the HDF5 header into ``name0``, ``name1``, ...
    (``save_attributes_to_hdf5_group``); those are joined back.
    """
    if name in obj.attrs:
        return _decode(obj.attrs[name])
    if f"{name}0" not in obj.attrs:
        return None
    out: list[str] = []
    chunk = 0
    while f"{name}{chunk}" in obj.attrs:
        out += _decode(obj.attrs[f"{name}{chunk}"])
        chunk += 1
    return out


def _weights_by_dataset_name(group: Any) -> list[np.ndarray]:
    """A layer group's weights without ``weight_names``: kernel, bias, then gamma, by name."""
    datasets: dict[str, Any] = {}

    def collect(key: str, obj: Any) -> None:  # visititems stops at a callback not returning None
        if hasattr(obj, "shape"):
            datasets.setdefault(key.rsplit("/", 1)[-1], obj)

    group.visititems(collect)
    order = ("kernel", "bias", "gamma")

    def role(name: str) -> int:
        hits = [i for i, r in enumerate(order) if r in name.split(":")[0]]
        return hits[0] if hits else len(order)

    return [np.asarray(datasets[n]) for n in sorted(datasets, key=lambda n: (role(n), n))]


def _read_layers(f: Any, path: Path) -> dict[str, list[np.ndarray]]:
    """Every layer with weights: name -> its arrays in Keras's order (kernel, bias / gamma)."""
    root = f.get("model_weights", f)  # model.save nests the layers there, save_weights not
    names = _names_attr(root, "layer_names")
    if names is None:
        names = [k for k in root if hasattr(root[k], "keys")]
    layers: dict[str, list[np.ndarray]] = {}
    for name in names:
        if name not in root:
            raise ValueError(f"{path}: layer {name!r} is listed in layer_names but has no group")
        group = root[name]
        weight_names = _names_attr(group, "weight_names")
        if weight_names is None:
            arrays = _weights_by_dataset_name(group)
        else:
            arrays = [np.asarray(group[w]) for w in weight_names]
        if arrays:  # input, pooling, padding, reshape, softmax and anchor layers hold none
            layers[name] = arrays
    if not layers:
        raise ValueError(
            f"{path} holds no layer weights: not a Keras model.save_weights / model.save file"
        )
    return layers


def _check_layer_names(layers: dict[str, list[np.ndarray]], path: Path) -> None:
    """Every weighted SSD300 layer present, none other (``strict=True``), else ValueError."""
    expected = _expected_layers()
    missing = [n for n in expected if n not in layers]
    unexpected = [n for n in layers if n not in set(expected)]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing layers {missing}")
        if unexpected:
            parts.append(f"unexpected layers with weights {unexpected}")
        raise ValueError(f"{path} is not ssd_keras's SSD300 (keras_ssd300.py): {'; '.join(parts)}")


def _num_classes(layers: dict[str, list[np.ndarray]], path: Path) -> int:
    """Object classes ``C`` from the first conf layer's ``n_boxes * (C + 1)`` outputs."""
    name = f"{SOURCES[0]}_mbox_conf"
    kernel = layers[name][0]
    outputs = int(kernel.shape[-1]) if kernel.ndim == 4 else -1
    if outputs % N_BOXES[0] or outputs // N_BOXES[0] < 2:
        raise ValueError(
            f"{path}: layer {name!r} kernel has shape {tuple(kernel.shape)}; expected "
            f"(3, 3, 512, {N_BOXES[0]} * (num_classes + 1)) with num_classes >= 1"
        )
    return outputs // N_BOXES[0] - 1


def _targets() -> list[tuple[str, list[str]]]:
    """Each Keras layer and the ssdlit parameters its weights fill, in its weights' order."""
    convs = [(k, f"backbone.{m}") for k, m in _backbone_convs()]
    for kind, module in (("conf", "cls_predictors"), ("loc", "box_predictors")):
        convs += [(f"{s}_mbox_{kind}", f"head.{module}.{i}") for i, s in enumerate(SOURCES)]
    out = [(k, [f"{m}.weight", f"{m}.bias"]) for k, m in convs]
    return [*out, (_L2_LAYER, [_L2_PARAM])]


def _keras_shape(torch_shape: Sequence[int]) -> tuple[int, ...]:
    """The Keras shape of an ssdlit parameter: conv ``[out, in, kh, kw]`` -> ``[kh, kw, in, out]``."""
    if len(torch_shape) == 4:
        out, cin, kh, kw = torch_shape
        return (kh, kw, cin, out)
    return tuple(torch_shape)


def _to_torch(layer: str, array: np.ndarray) -> np.ndarray:
    """A Keras array in ssdlit's layout: kernels ``[kh, kw, in, out] -> [out, in, kh, kw]``;
    ``conv1_1``'s input axis reversed, BGR -> RGB (ssd_keras swaps the channels first)."""
    if array.ndim != 4:
        return array
    weight = array.transpose(3, 2, 0, 1)
    if layer == _FIRST_CONV:
        weight = weight[:, ::-1]
    return np.ascontiguousarray(weight)


def _state_dict(
    layers: dict[str, list[np.ndarray]], reference: dict[str, torch.Tensor], path: Path
) -> dict[str, torch.Tensor]:
    """The detector's state dict from the Keras arrays, every shape checked against
    ``reference`` (the detector's own); each parameter filled exactly once."""
    state: dict[str, torch.Tensor] = {}
    for layer, params in _targets():
        arrays = layers[layer]
        if len(arrays) != len(params):
            raise ValueError(
                f"{path}: layer {layer!r} holds {len(arrays)} weights, expected {len(params)} "
                f"({', '.join(p.rsplit('.', 1)[-1] for p in params)})"
            )
        for key, array in zip(params, arrays, strict=True):
            target = reference[key]
            expected = _keras_shape(target.shape)
            if tuple(array.shape) != expected:
                raise ValueError(
                    f"{path}: layer {layer!r} weight {key.rsplit('.', 1)[-1]!r} has shape "
                    f"{tuple(array.shape)}, expected {expected}"
                )
            if key in state:
                raise AssertionError(f"{key} filled twice")  # a bug in the map above
            state[key] = torch.from_numpy(_to_torch(layer, array)).to(target.dtype)
    left = sorted(set(reference) - set(state))
    if left:  # a bug in the map above, or the architecture changed under it
        raise AssertionError(f"ssd_keras's SSD300 fills no value for {left}")
    return state
