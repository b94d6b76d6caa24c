import os
import socket
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import VGG16_Weights

import ssdlit.backbones  # noqa: F401  (registers the backbones)
from ssdlit.backbones import (
    SSD7,
    VGG16SSD,
    L2Norm,
    MobileNetV3SSDLite,
    PretrainedWeightsError,
    vgg16_ssd300,
)
from ssdlit.registry import BACKBONES

NAMES = ["mobilenet_v3_large", "resnet50", "ssd7", "vgg16_ssd300", "vgg16_ssd512"]
REAL_DOWNLOAD = torch.hub.download_url_to_file


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch):
    """Nothing may reach the network unless a test puts the real downloader back."""

    def refuse(url, *args, **kwargs):
        raise AssertionError(f"unexpected download of {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


@pytest.fixture
def empty_hub(monkeypatch):
    """TORCH_HOME and the hub folder pointed at an empty tmp dir; short socket timeout.

    The dir is in memory (/dev/shm) where there is one: the offline-load test writes and
    reads a 550 MB checkpoint.
    """
    shm = "/dev/shm"
    fast = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None
    with tempfile.TemporaryDirectory(dir=fast, prefix="ssdlit-hub-") as tmp:
        monkeypatch.setenv("TORCH_HOME", tmp)
        monkeypatch.setattr(torch.hub, "_hub_dir", None)  # restored after the test
        torch.hub.set_dir(os.path.join(tmp, "hub"))
        timeout = socket.getdefaulttimeout()
        socket.setdefaulttimeout(3.0)
        try:
            yield Path(tmp) / "hub"
        finally:
            socket.setdefaulttimeout(timeout)


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _shapes(module: nn.Module) -> Counter:
    return Counter(tuple(p.shape) for p in module.parameters())


# (name, input (H, W), expected (H_l, W_l) per level, expected channels per level).
CASES = [
    ("vgg16_ssd300", (300, 300), [38, 19, 10, 5, 3, 1], [512, 1024, 512, 256, 256, 256]),
    ("mobilenet_v3_large", (320, 320), [20, 10, 5, 3, 2, 1], [672, 960, 512, 256, 256, 128]),
    ("resnet50", (300, 300), [38, 19, 10, 5, 3, 1], [1024, 512, 512, 256, 256, 256]),
    ("ssd7", (120, 160), [(15, 20), (7, 10), (3, 5), (1, 2)], [64, 48, 48, 32]),
]


def _check_maps(features, batch, maps, channels):
    assert isinstance(features, list)
    expected = [(m, m) if isinstance(m, int) else m for m in maps]
    assert [tuple(f.shape[-2:]) for f in features] == expected
    assert [f.shape[1] for f in features] == channels
    assert all(f.shape[0] == batch and f.dtype == torch.float32 for f in features)


@pytest.mark.parametrize(("name", "size", "maps", "channels"), CASES, ids=[c[0] for c in CASES])
def test_feature_maps(name, size, maps, channels):
    # The shapes alone, on the meta device (no arithmetic); the numbers: the next test.
    with torch.device("meta"):
        model = BACKBONES.build(name).eval()
        _check_maps(model(torch.empty(2, 3, *size)), 2, maps, channels)
    assert model.out_channels == channels


#: The full-size networks cost seconds per image on a CPU: ``slow``. (VGG-16's numbers:
#: the next test but one, on smaller inputs.)
BATCH_CASES = [
    pytest.param(*case, id=case[0], marks=[pytest.mark.slow] if case[0] != "ssd7" else [])
    for case in CASES
    if not case[0].startswith("vgg16")
]


@pytest.mark.parametrize(("name", "size", "maps", "channels"), BATCH_CASES)
def test_feature_maps_and_batch_independence(name, size, maps, channels):
    torch.manual_seed(0)
    model = BACKBONES.build(name).eval()
    assert model.out_channels == channels
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        features = model(x)
        alone = model(x[1:])
    _check_maps(features, 2, maps, channels)
    assert all(torch.isfinite(f).all() for f in features)
    for level, (f, g) in enumerate(zip(features, alone, strict=True)):
        torch.testing.assert_close(f[1:], g, rtol=1e-4, atol=1e-5, msg=f"level {level}")


def _batch_independent(blocks, x: torch.Tensor) -> list[torch.Tensor]:
    """Run ``x [2, ...]`` and ``x[1:]`` through ``blocks`` in turn: every output of the
    pair's second item equals its output alone; returns the pair's outputs."""
    batch, y, z = [], x, x[1:]
    with torch.no_grad():
        for block in blocks:
            y, z = block(y), block(z)
            batch.append(y)
            assert torch.isfinite(y).all()
            torch.testing.assert_close(y[1:], z, rtol=1e-4, atol=1e-5)
    return batch


def test_vgg16_ssd300_numbers_and_batch_independence():
    """The numbers of every level of vgg16_ssd300 (its shapes at 300x300: on the meta
    device above): conv4_3 (L2-normalised) and fc7 from a 64x64 image, the extras from
    fc7-sized features (19x19), which cost a 300x300 image's seconds otherwise."""
    torch.manual_seed(0)
    model = BACKBONES.build("vgg16_ssd300").eval()
    (conv4_3,) = _batch_independent([model.features], torch.randn(2, 3, 64, 64))
    (normed,) = _batch_independent([model.conv4_3_norm], conv4_3)
    (fc7,) = _batch_independent([model.fc], conv4_3)
    _check_maps([normed, fc7], 2, [8, 4], [512, 1024])
    extras = _batch_independent(model.extras, torch.randn(2, 1024, 19, 19).relu())
    _check_maps(extras, 2, [10, 5, 3, 1], [512, 256, 256, 256])


def test_vgg16_ssd512_feature_maps():
    # A 512x512 image costs ~2.5 s on one thread: the shapes are checked on the meta device,
    # real numbers for the SSD512-only layers (the extras; the rest is vgg16_ssd300's).
    maps, channels = [64, 32, 16, 8, 4, 2, 1], [512, 1024, 512, 256, 256, 256, 256]
    with torch.device("meta"):
        model = BACKBONES.build("vgg16_ssd512").eval()
        _check_maps(model(torch.empty(1, 3, 512, 512)), 1, maps, channels)
    assert model.out_channels == channels

    torch.manual_seed(0)
    model = BACKBONES.build("vgg16_ssd512").eval()
    x = torch.randn(2, 1024, 32, 32).relu()  # fc7 at 512x512
    _check_maps(_batch_independent(model.extras, x), 2, maps[2:], channels[2:])


def test_ssd7_any_input_size():
    model = SSD7().eval()
    with torch.no_grad():
        features = model(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape[-2:]) for f in features] == [(8, 12), (4, 6), (2, 3), (1, 1)]


@pytest.mark.parametrize("highres", [False, True], ids=["ssd300", "ssd512"])
def test_vgg_parameters_match_torchvision(highres):
    from torchvision.models.detection.ssd import _vgg_extractor  # what ssd300_vgg16 uses

    with torch.device("meta"):  # no memory, no initialisation cost
        theirs = _vgg_extractor(torchvision.models.vgg16(weights=None), highres, 5)
        ours = BACKBONES.build("vgg16_ssd512" if highres else "vgg16_ssd300")
    n_ours, n_theirs = _num_params(ours), _num_params(theirs)
    assert abs(n_ours - n_theirs) <= 0.01 * n_theirs, (n_ours, n_theirs)
    # Same layers, not only the same total (the padding of SSD512's last conv differs).
    assert _shapes(ours) == _shapes(theirs)


def test_mobilenet_matches_torchvision_ssdlite_extractor():
    from torchvision.models.detection.ssdlite import _mobilenet_extractor

    norm = torch.nn.BatchNorm2d
    with torch.device("meta"):
        trunk = torchvision.models.mobilenet_v3_large(weights=None, norm_layer=norm)
        theirs = _mobilenet_extractor(trunk, 6, norm)
        ours = MobileNetV3SSDLite()
        ours_reduced = MobileNetV3SSDLite(reduced_tail=True)
    assert [tuple(p.shape) for p in ours.parameters()] == [
        tuple(p.shape) for p in theirs.parameters()
    ]
    assert ours_reduced.out_channels == [672, 480, 512, 256, 256, 128]


def test_l2norm_initialised_to_20_and_learnable():
    model = vgg16_ssd300()
    norm = model.conv4_3_norm
    assert isinstance(norm, L2Norm)
    assert norm.weight.shape == (512,)
    assert torch.equal(norm.weight.detach(), torch.full((512,), 20.0))
    assert norm.weight.requires_grad
    assert any(p is norm.weight for p in model.parameters())

    x = torch.randn(2, 512, 3, 4)
    y = norm(x)
    torch.testing.assert_close(y.norm(dim=1), torch.full((2, 3, 4), 20.0))
    y.sum().backward()
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0


def test_registry_names_and_contract():
    assert set(NAMES) <= set(BACKBONES.names())
    for name in NAMES:
        factory = BACKBONES.get(name)
        with torch.device("meta"):
            model = factory(pretrained=False)
            with pytest.raises(TypeError):
                factory(False)  # keyword-only
        assert isinstance(model, nn.Module)
        assert all(isinstance(c, int) for c in model.out_channels)
        for values in (model.mean, model.std):
            assert isinstance(values, tuple) and len(values) == 3
            assert all(0.0 < v < 1.0 for v in values)
        assert model.input_scale == 255.0
    imagenet = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    for name in ["mobilenet_v3_large", "resnet50", "vgg16_ssd300", "vgg16_ssd512"]:
        model_cls = BACKBONES.get(name)
        with torch.device("meta"):
            model = model_cls()
        assert (model.mean, model.std) == imagenet
    assert (SSD7.mean, SSD7.std) == ((0.5,) * 3, (0.5,) * 3)


def test_pretrained_misuse_is_refused():
    with pytest.raises(ValueError, match="from scratch"):
        SSD7(pretrained=True)
    with pytest.raises(ValueError, match="width_mult"):
        MobileNetV3SSDLite(pretrained=True, width_mult=0.5)


def test_pretrained_download_failure_explains_what_to_do(empty_hub, monkeypatch):
    monkeypatch.setattr(torch.hub, "download_url_to_file", REAL_DOWNLOAD)  # the real one

    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known (test: offline)")

    # Offline here the real download fails by itself; this makes sure of it where a network
    # is reachable (no 550 MB download in a test), failing at the same place: name lookup.
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(RuntimeError) as info:
        VGG16SSD(pretrained=True)
    assert isinstance(info.value, PretrainedWeightsError)
    message = str(info.value)
    weights = VGG16_Weights.IMAGENET1K_V1
    expected_file = empty_hub / "checkpoints" / os.path.basename(weights.url)
    assert "VGG16_Weights.IMAGENET1K_V1" in message
    assert weights.url in message
    assert str(expected_file) in message
    assert str(empty_hub / "checkpoints") in message
    assert "pretrained=false" in message
    assert not expected_file.exists()


def test_unreadable_weights_file_is_reported(empty_hub):
    path = empty_hub / "checkpoints" / os.path.basename(VGG16_Weights.IMAGENET1K_V1.url)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(PretrainedWeightsError, match="could not read"):
        vgg16_ssd300(pretrained=True)


def _distinct_values(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """``[rows, cols]`` random values, distinct along every row and column, on a storage
    of ``7 * (rows - 1) + cols`` values: ``t[r, c] = s[7 r + c]``. Enough to tell a wrong
    row or column of the classifier from the right one, without drawing, writing and
    reading its 120M weights."""
    storage = torch.randn(7 * (rows - 1) + cols, generator=gen)
    return storage.as_strided((rows, cols), (7, 1))


@pytest.mark.slow  # torchvision's VGG-16 state dict (138M values) written and read back
def test_pretrained_vgg_loads_from_cache_offline(empty_hub):
    gen = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        shapes = {
            k: v.shape for k, v in torchvision.models.vgg16(weights=None).state_dict().items()
        }
    state = {
        k: _distinct_values(*shape, gen) if len(shape) == 2 else torch.randn(shape, generator=gen)
        for k, shape in shapes.items()
    }
    checkpoints = empty_hub / "checkpoints"
    checkpoints.mkdir(parents=True)
    # The legacy (non-zip) format, like torchvision's 2017 file; also the faster one to write.
    path = checkpoints / VGG16_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    torch.save(state, path, _use_new_zipfile_serialization=False)

    model = vgg16_ssd300(pretrained=True)  # the autouse fixture refuses any download

    torch.testing.assert_close(model.features.conv1_1.weight, state["features.0.weight"])
    torch.testing.assert_close(model.features.conv1_1.bias, state["features.0.bias"])
    # Every VGG conv: torchvision's features indices of conv1_1 .. conv5_3.
    tv_index = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    names = ["1_1", "1_2", "2_1", "2_2", "3_1", "3_2", "3_3", "4_1", "4_2", "4_3"]
    convs = [model.features.get_submodule(f"conv{n}") for n in names]
    convs += [model.fc.get_submodule(f"conv5_{k}") for k in (1, 2, 3)]
    for conv, i in zip(convs, tv_index, strict=True):
        torch.testing.assert_close(conv.weight, state[f"features.{i}.weight"])
        torch.testing.assert_close(conv.bias, state[f"features.{i}.bias"])

    # fc6: linear row 4*o over the flattened pool5 [512, 7, 7]; tap (i, j) of the dilated
    # 3x3 is pixel (3i, 3j) of the 7x7 window: column c*49 + 3i*7 + 3j.
    fc6 = state["classifier.0.weight"]  # [4096, 25088]
    rows = torch.arange(1024) * 4
    c, i, j = torch.meshgrid(torch.arange(512), torch.arange(3), torch.arange(3), indexing="ij")
    cols = (c * 49 + 3 * i * 7 + 3 * j).reshape(-1)  # [512 * 9] in (c, i, j) order
    expected6 = fc6[rows][:, cols].reshape(1024, 512, 3, 3)
    torch.testing.assert_close(model.fc.fc6.weight, expected6)
    torch.testing.assert_close(model.fc.fc6.bias, state["classifier.0.bias"][rows])
    assert model.fc.fc6.dilation == (6, 6) and model.fc.fc6.padding == (6, 6)

    fc7 = state["classifier.3.weight"]  # [4096, 4096]
    expected7 = torch.stack([fc7[4 * o, 0::4] for o in range(1024)])[:, :, None, None]
    torch.testing.assert_close(model.fc.fc7.weight, expected7)
    torch.testing.assert_close(model.fc.fc7.bias, state["classifier.3.bias"][rows])
    # The SSD parts stay as initialised: L2Norm at 20.
    assert torch.equal(model.conv4_3_norm.weight.detach(), torch.full((512,), 20.0))


@pytest.mark.parametrize("name", ["mobilenet_v3_large", "resnet50"])
def test_pretrained_trunk_loads_from_cache_offline(name, empty_hub):
    models = torchvision.models
    weights, build = {
        "mobilenet_v3_large": (
            models.MobileNet_V3_Large_Weights.IMAGENET1K_V1,
            models.mobilenet_v3_large,
        ),
        "resnet50": (models.ResNet50_Weights.IMAGENET1K_V1, models.resnet50),
    }[name]
    torch.manual_seed(0)
    state = build(weights=None).state_dict()
    for key in state:  # BN statistics away from their (0, 1) defaults, to see them load
        if key.endswith(("running_mean", "running_var")):
            state[key] = torch.rand_like(state[key]) + 0.5
    checkpoints = empty_hub / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(state, checkpoints / os.path.basename(weights.url))

    model = BACKBONES.build(name, pretrained=True)  # the autouse fixture refuses any download

    if name == "mobilenet_v3_large":
        pairs = {
            "c4.0.0.weight": "features.0.0.weight",  # stem conv
            "c4.0.1.running_var": "features.0.1.running_var",
            "c4.13.0.weight": "features.13.block.0.0.weight",  # C4 expansion conv
            "c5.0.1.0.weight": "features.13.block.1.0.weight",  # C4 depthwise conv
            "c5.3.0.weight": "features.16.0.weight",  # last 1x1 conv (960)
            "c5.3.1.running_mean": "features.16.1.running_mean",
        }
    else:
        pairs = {
            "body.0.weight": "conv1.weight",
            "body.1.running_mean": "bn1.running_mean",
            "body.6.0.conv2.weight": "layer3.0.conv2.weight",
            "body.6.0.downsample.0.weight": "layer3.0.downsample.0.weight",
            "body.6.5.bn3.running_var": "layer3.5.bn3.running_var",
        }
        assert model.body[6][0].conv2.stride == (1, 1)
        assert model.body[6][0].downsample[0].stride == (1, 1)
    ours = model.state_dict()
    for our_key, their_key in pairs.items():
        torch.testing.assert_close(ours[our_key], state[their_key], msg=our_key)


def test_ssd7_activation_option():
    relu = BACKBONES.build("ssd7", activation="relu").eval()
    assert any(isinstance(m, torch.nn.ReLU) for m in relu.modules())
    assert not any(isinstance(m, torch.nn.ELU) for m in relu.modules())
    with torch.no_grad():
        sizes = [tuple(f.shape[-2:]) for f in relu(torch.zeros(1, 3, 64, 64))]
    assert sizes == [(8, 8), (4, 4), (2, 2), (1, 1)]
    with pytest.raises(ValueError, match="activation"):
        BACKBONES.build("ssd7", activation="gelu")
