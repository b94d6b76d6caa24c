"""ssd_keras's SSD300 HDF5 weights read into ssdlit (``ssdlit.zoo.ssd_keras``).

The files here are written the way Keras's ``model.save_weights`` lays them out (root
attribute ``layer_names``, per layer group ``weight_names``, datasets
``<layer>/<layer>/kernel:0``) or ``model.save`` (the same under ``model_weights``), with
the layer names and shapes of ssd_keras's ``models/keras_ssd300.py`` and random weights.
Every weight check compares an ssdlit computation with a reference written here on the Keras
arrays (numpy, channels last, float64), never with another ssdlit module.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

h5py = pytest.importorskip("h5py", reason="h5py is part of the dev extra")

from ssdlit.zoo.ssd_keras import VOC_CLASSES, from_ssd_keras  # noqa: E402
from tests.ssd_keras_reference import ssd_keras_anchors  # noqa: E402

# -- ssd_keras's SSD300, written down from keras_ssd300.py --------------------------------

# (layer, in channels, out channels, kernel, stride, padding, dilation) of every Conv2D
# before the predictors; padding is what 'same' (or ZeroPadding2D + 'valid') amounts to.
VGG_CONVS = [
    ("conv1_1", 3, 64, 3, 1, 1, 1),
    ("conv1_2", 64, 64, 3, 1, 1, 1),
    ("conv2_1", 64, 128, 3, 1, 1, 1),
    ("conv2_2", 128, 128, 3, 1, 1, 1),
    ("conv3_1", 128, 256, 3, 1, 1, 1),
    ("conv3_2", 256, 256, 3, 1, 1, 1),
    ("conv3_3", 256, 256, 3, 1, 1, 1),
    ("conv4_1", 256, 512, 3, 1, 1, 1),
    ("conv4_2", 512, 512, 3, 1, 1, 1),
    ("conv4_3", 512, 512, 3, 1, 1, 1),
    ("conv5_1", 512, 512, 3, 1, 1, 1),
    ("conv5_2", 512, 512, 3, 1, 1, 1),
    ("conv5_3", 512, 512, 3, 1, 1, 1),
    ("fc6", 512, 1024, 3, 1, 6, 6),  # dilation_rate 6, 'same'
    ("fc7", 1024, 1024, 1, 1, 0, 1),
    ("conv6_1", 1024, 256, 1, 1, 0, 1),
    ("conv6_2", 256, 512, 3, 2, 1, 1),  # ZeroPadding2D((1, 1)), then 'valid' stride 2
    ("conv7_1", 512, 128, 1, 1, 0, 1),
    ("conv7_2", 128, 256, 3, 2, 1, 1),
    ("conv8_1", 256, 128, 1, 1, 0, 1),
    ("conv8_2", 128, 256, 3, 1, 0, 1),  # 'valid'
    ("conv9_1", 256, 128, 1, 1, 0, 1),
    ("conv9_2", 128, 256, 3, 1, 0, 1),
]
# The predictors' sources, their channels, boxes per cell and feature-map side at 300x300.
SOURCES = [
    ("conv4_3_norm", 512, 4, 38),
    ("fc7", 1024, 6, 19),
    ("conv6_2", 512, 6, 10),
    ("conv7_2", 256, 6, 5),
    ("conv8_2", 256, 4, 3),
    ("conv9_2", 256, 4, 1),
]
# Layers without weights that a real file lists too (their groups hold nothing).
WEIGHTLESS = ["input_1", "identity_layer", "input_mean_normalization", "input_channel_swap"]
WEIGHTLESS_TAIL = ["pool1", "conv6_padding", "mbox_conf_softmax", "predictions"]

# Where ssdlit keeps each Keras conv (the architecture as docs and modules name it).
SSDLIT_MODULE = {
    **{name: f"backbone.features.{name}" for name, *_ in VGG_CONVS[:10]},
    **{name: f"backbone.fc.{name}" for name, *_ in VGG_CONVS[10:15]},
    **{name: f"backbone.extras.{int(name[4]) - 6}.{name}" for name, *_ in VGG_CONVS[15:]},
    **{f"{s}_mbox_conf": f"head.cls_predictors.{i}" for i, (s, *_) in enumerate(SOURCES)},
    **{f"{s}_mbox_loc": f"head.box_predictors.{i}" for i, (s, *_) in enumerate(SOURCES)},
}

Weights = dict[str, list[tuple[str, np.ndarray]]]


def conv_weights(rng: np.random.Generator, cin: int, cout: int, k: int) -> list:
    """A Keras Conv2D's ``[("kernel:0", [k, k, cin, cout]), ("bias:0", [cout])]``, random:
    He-scaled kernels (activations keep the input's size through the network), small biases."""
    kernel = rng.standard_normal((k, k, cin, cout), dtype=np.float32)
    kernel *= np.float32(np.sqrt(2.0 / (k * k * cin)))
    bias = rng.standard_normal(cout, dtype=np.float32) * np.float32(0.1)
    return [("kernel:0", kernel), ("bias:0", bias)]


def conf_layers(rng: np.random.Generator, n_classes: int) -> Weights:
    """The six ``*_mbox_conf`` layers for ``n_classes`` outputs per box (background included)."""
    return {f"{s}_mbox_conf": conv_weights(rng, c, n * n_classes, 3) for s, c, n, _ in SOURCES}


def keras_weights(n_classes: int, seed: int = 0) -> Weights:
    """Random weights of every weighted layer: name -> [(weight name, array)], Keras shapes;
    the L2Normalization's gamma around 20 (its ``gamma_init``)."""
    rng = np.random.default_rng(seed)
    out: Weights = {name: conv_weights(rng, cin, cout, k) for name, cin, cout, k, *_ in VGG_CONVS}
    out["conv4_3_norm"] = [("conv4_3_norm_gamma:0", rng.uniform(10, 30, 512).astype(np.float32))]
    out.update(conf_layers(rng, n_classes))
    for source, channels, n, _ in SOURCES:
        out[f"{source}_mbox_loc"] = conv_weights(rng, channels, n * 4, 3)
    return out


def write_keras_h5(
    path: Path, weights: Weights, *, model_save: bool = False, weight_names: bool = True
) -> Path:
    """Write ``weights`` as Keras 2 does: ``model.save_weights`` or, with ``model_save``,
    ``model.save`` (under ``model_weights``); ``weight_names=False`` leaves out every
    attribute, so that a reader must go by the datasets' names."""
    names = WEIGHTLESS + list(weights) + WEIGHTLESS_TAIL
    with h5py.File(path, "w") as f:
        root = f.create_group("model_weights") if model_save else f
        if weight_names:
            root.attrs["layer_names"] = np.array([n.encode("utf8") for n in names])
            root.attrs["backend"] = b"tensorflow"
        for name in names:
            group = root.create_group(name)
            layer = weights.get(name, [])
            # Keras names each weight "<layer>/<weight>" and stores it at that path
            paths = [f"{name}/{w}" for w, _ in layer]
            if weight_names:  # an empty list is stored as an empty float array, as Keras does
                group.attrs["weight_names"] = np.asarray([p.encode("utf8") for p in paths])
            for p, (_, array) in zip(paths, layer, strict=True):
                group.create_dataset(p, data=array)
    return path


def array(weights: Weights, layer: str, index: int) -> np.ndarray:
    """Weight ``index`` (0 kernel, 1 bias) of ``layer`` in float64."""
    return weights[layer][index][1].astype(np.float64)


def keras_conv2d(
    x: np.ndarray, kernel: np.ndarray, bias: np.ndarray, stride: int, padding: int, dilation: int
) -> np.ndarray:
    """Keras's Conv2D on one channels-last image ``[H, W, C]`` (a cross-correlation):
    zero padding, a window of ``(k - 1) * dilation + 1`` taps every ``stride`` pixels."""
    k = kernel.shape[0]
    span = (k - 1) * dilation + 1
    padded = np.pad(x, ((padding, padding), (padding, padding), (0, 0)))
    windows = sliding_window_view(padded, (span, span), axis=(0, 1))  # [H', W', C, span, span]
    windows = windows[::stride, ::stride, :, ::dilation, ::dilation]
    return np.einsum("hwcij,ijco->hwo", windows, kernel, optimize=True) + bias


def assert_close(actual: torch.Tensor, expected: np.ndarray) -> None:
    """float32 ssdlit vs the float64 reference, relative to the reference's magnitude."""
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(
        actual.detach().double().numpy(), expected, rtol=1e-4, atol=1e-5 * scale
    )


def chw(x: np.ndarray) -> torch.Tensor:
    """``[H, W, C]`` numpy -> ``[1, C, H, W]`` float32 torch."""
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))).float()[None]


def hwc(x: torch.Tensor) -> np.ndarray:
    """``[1, C, H, W]`` torch -> ``[H, W, C]`` float64 numpy (the same values)."""
    return x[0].permute(1, 2, 0).double().numpy()


@pytest.fixture(scope="module")
def voc_weights() -> Weights:
    return keras_weights(21)


@pytest.fixture(scope="module")
def voc_file(voc_weights, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ssd_keras") / "VGG_VOC0712_SSD_300x300_iter_120000.h5"
    return write_keras_h5(path, voc_weights)


@pytest.fixture(scope="module")
def det(voc_file):
    return from_ssd_keras(voc_file)


# -- each weight where the architecture expects it ------------------------------------------


@torch.no_grad()
def test_conv1_1_sees_the_mean_subtracted_bgr_image(det, voc_weights):
    """(a) ssd_keras: RGB 0..255 - [123, 117, 104], then BGR, then conv1_1."""
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)  # RGB, channels last
    bgr = (image.astype(np.float64) - np.array([123.0, 117.0, 104.0]))[..., ::-1]
    expected = keras_conv2d(
        bgr, array(voc_weights, "conv1_1", 0), array(voc_weights, "conv1_1", 1), 1, 1, 1
    )
    images = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]  # uint8
    actual = det.backbone.features.conv1_1(det.normalize(images))
    assert_close(actual[0].permute(1, 2, 0), expected)


@torch.no_grad()
@pytest.mark.parametrize("layer", [c[0] for c in VGG_CONVS])
def test_every_convolution(det, voc_weights, layer):
    """(b) fc6 (dilation 6), (d) conv6_2 (zero padding 1, stride 2) and every other conv:
    the ssdlit module on a random input against Keras's Conv2D with the Keras arrays.
    conv1_1 sees its input in reversed channel order (the swap folded into it)."""
    _, cin, _, _, stride, padding, dilation = next(c for c in VGG_CONVS if c[0] == layer)
    x = np.random.default_rng(2).standard_normal((7, 7, cin))
    keras_input = x[..., ::-1] if layer == "conv1_1" else x
    kernel, bias = array(voc_weights, layer, 0), array(voc_weights, layer, 1)
    expected = keras_conv2d(keras_input, kernel, bias, stride, padding, dilation)
    actual = det.get_submodule(SSDLIT_MODULE[layer])(chw(x))
    assert_close(actual[0].permute(1, 2, 0), expected)


@torch.no_grad()
def test_l2_normalization_gamma(det, voc_weights):
    """(c) conv4_3_norm: ``x / ||x||_2`` over channels times the file's gamma."""
    x = np.random.default_rng(3).standard_normal((5, 5, 512))
    gamma = array(voc_weights, "conv4_3_norm", 0)
    expected = x / np.sqrt((x**2).sum(axis=-1, keepdims=True)) * gamma
    assert_close(det.backbone.conv4_3_norm(chw(x))[0].permute(1, 2, 0), expected)


@torch.no_grad()
@pytest.mark.parametrize(("level", "kind"), [(0, "loc"), (3, "conf"), (5, "conf"), (1, "loc")])
def test_predictors_in_keras_reshape_order(det, voc_weights, level, kind):
    """(e) the head's rows of one level are Keras's conv output ``[H, W, n * K]`` reshaped
    to ``[H * W * n, K]`` (Reshape((-1, K))), at the level's offset in the anchors."""
    gen = torch.Generator().manual_seed(4)
    features = [torch.randn(1, c, s, s, generator=gen) for _, c, _, s in SOURCES]
    out = det.head(features)
    assert out["cls_logits"].shape == (1, 8732, 21) and out["box_deltas"].shape == (1, 8732, 4)
    source, _, n, side = SOURCES[level]
    layer = f"{source}_mbox_{kind}"
    kernel, bias = array(voc_weights, layer, 0), array(voc_weights, layer, 1)
    keras_out = keras_conv2d(hwc(features[level]), kernel, bias, 1, 1, 1)  # [H, W, n * K]
    values = 21 if kind == "conf" else 4
    expected = keras_out.reshape(side * side * n, values)
    start = sum(s * s * m for _, _, m, s in SOURCES[:level])
    rows = out["cls_logits" if kind == "conf" else "box_deltas"][0, start : start + side * side * n]
    assert_close(rows, expected)


@torch.no_grad()
def test_the_whole_detector(det):
    """(f) 8732 anchors, 20 classes, eval mode; an image runs and gives [k, 6]."""
    assert det.anchors.shape == (8732, 4)
    assert det.head.num_classes == len(VOC_CLASSES) == 20
    assert not det.training
    (detections,) = det(torch.randint(0, 256, (1, 3, 300, 300), dtype=torch.uint8))
    assert detections.ndim == 2 and detections.shape[1] == 6
    assert 0 < detections.shape[0] <= 200 and torch.isfinite(detections).all()


def test_anchors_and_decoding_are_ssd_keras(det):
    """ssd_keras's SSD300 VOC anchors (``SSDInputEncoder`` restated in numpy), its
    ``'centroids'`` decoding with variances 0.1, 0.1, 0.2, 0.2 and no clipping, softmax."""
    anchors = ssd_keras_anchors(
        300,
        300,
        [(s, s) for *_, s in SOURCES],
        [[1, 2, 0.5], *[[1, 2, 0.5, 3, 1 / 3]] * 3, [1, 2, 0.5], [1, 2, 0.5]],
        [0.1, 0.2, 0.37, 0.54, 0.71, 0.88, 1.05],
        two_boxes=True,
        steps=[8, 16, 32, 64, 100, 300],
        offsets=[0.5] * 6,
        clip=False,
    )  # [8732, 4] cxcywh normalised
    np.testing.assert_allclose(det.anchors.double().numpy(), anchors, rtol=0, atol=1e-6)

    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(1, 8732, 21, generator=gen) * 3
    deltas = torch.randn(1, 8732, 4, generator=gen) * 2  # boxes past the image's borders too
    scores, boxes = det.decode({"cls_logits": logits, "box_deltas": deltas})
    d, v = deltas[0].double().numpy(), np.array([0.1, 0.1, 0.2, 0.2])
    cxcy = d[:, :2] * v[:2] * anchors[:, 2:] + anchors[:, :2]
    wh = np.exp(d[:, 2:] * v[2:]) * anchors[:, 2:]
    expected = np.concatenate([cxcy - wh / 2, cxcy + wh / 2], axis=1)  # xyxy, not clipped
    assert (expected < 0).any() and (expected > 1).any()
    np.testing.assert_allclose(boxes[0].double().numpy(), expected, rtol=1e-5, atol=1e-6)
    z = logits[0].double().numpy()
    softmax = np.exp(z - z.max(1, keepdims=True))
    softmax /= softmax.sum(1, keepdims=True)
    np.testing.assert_allclose(scores[0].double().numpy(), softmax, rtol=1e-5, atol=1e-7)


# -- the file layouts ------------------------------------------------------------------------


def test_model_save_layout_without_attributes(det, voc_weights, tmp_path):
    """``model.save``'s layout (layers under ``model_weights``) without ``layer_names`` /
    ``weight_names`` attributes (each weight found by its dataset's name): the same detector."""
    path = write_keras_h5(tmp_path / "w.h5", voc_weights, model_save=True, weight_names=False)
    other = from_ssd_keras(path).state_dict()
    ours = det.state_dict()
    assert other.keys() == ours.keys()
    assert all(torch.equal(other[k], ours[k]) for k in ours)


@torch.no_grad()
def test_four_outputs_per_box_give_three_classes(voc_weights, tmp_path):
    """A file with ``n_classes=4`` (background + 3) gives a 3-class detector, rows of 4."""
    weights = {**voc_weights, **conf_layers(np.random.default_rng(5), 4)}
    det = from_ssd_keras(write_keras_h5(tmp_path / "w.h5", weights), num_classes=3)
    assert det.head.num_classes == 3
    x = np.random.default_rng(6).standard_normal((1, 1, 256))  # conv9_2's 1x1 map
    layer = "conv9_2_mbox_conf"
    expected = keras_conv2d(x, array(weights, layer, 0), array(weights, layer, 1), 1, 1, 1)
    assert_close(det.head.cls_predictors[5](chw(x))[0].permute(1, 2, 0), expected)


# -- errors ----------------------------------------------------------------------------------


def test_num_classes_mismatch(voc_file):
    with pytest.raises(ValueError, match="num_classes=80") as err:
        from_ssd_keras(voc_file, num_classes=80)
    assert str(voc_file) in str(err.value) and "20-class" in str(err.value)


def test_missing_layer_is_named(voc_weights, tmp_path):
    weights = {k: v for k, v in voc_weights.items() if k != "conv8_2"}
    path = write_keras_h5(tmp_path / "w.h5", weights)
    with pytest.raises(ValueError, match="missing layers \\['conv8_2'\\]") as err:
        from_ssd_keras(path)
    assert str(path) in str(err.value)


def test_unexpected_layer_with_weights(voc_weights, tmp_path):
    extra = {**voc_weights, "conv10_1": voc_weights["conv9_1"]}
    with pytest.raises(ValueError, match="unexpected layers with weights \\['conv10_1'\\]"):
        from_ssd_keras(write_keras_h5(tmp_path / "w.h5", extra))


def test_wrong_shape_names_layer_and_shapes(voc_weights, tmp_path):
    (_, kernel), bias = voc_weights["fc7"]
    weights = {**voc_weights, "fc7": [("kernel:0", kernel[..., :512]), bias]}
    path = write_keras_h5(tmp_path / "w.h5", weights)
    with pytest.raises(ValueError) as err:
        from_ssd_keras(path)
    message = str(err.value)
    assert "'fc7'" in message and str(path) in message
    assert "(1, 1, 1024, 512)" in message and "expected (1, 1, 1024, 1024)" in message


def test_without_h5py_says_what_to_install(monkeypatch, voc_file):
    monkeypatch.setitem(sys.modules, "h5py", None)  # makes `import h5py` raise ImportError
    with pytest.raises(ImportError, match='pip install "ssdlit\\[keras\\]"'):
        from_ssd_keras(voc_file)
