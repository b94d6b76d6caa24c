"""torchvision's SSD300 and SSDLite320 inside ssdlit (:mod:`ssdlit.zoo`): the same detections.

The models are torchvision's own builders with random weights (no network; ssd300_vgg16
without the VGG classifier it drops, :mod:`tests.fast_builds`), saved to disk and read back
by :func:`ssdlit.zoo.from_torchvision`. SSDLite's default initialisation
(N(0, 0.03) convolutions, identity batch norms) gives the same score to every class of
every anchor, so its detections would be ties in any order: :func:`randomise` draws weights
and batch-norm statistics with more spread, so that every score differs.

What "the same" means, measured: labels, scores and order are identical (the logits are
bit-identical: the same convolutions on the bit-identical normalised input); boxes agree
to 2.5e-4 px. The boxes' residual is torchvision's: its anchors are float32 pixel
corners, whose rounding (up to 3e-5 px at 300 px) its decoding multiplies by the predicted
scale, while ssdlit decodes from normalised centres and sizes. Against the float64 decoding
of the exact anchors, ssdlit's boxes are within two float32 steps of the largest
coordinate (~1e-4 px) and torchvision's are not closer
(:func:`test_decoded_boxes_are_as_exact_as_float32_allows`).
"""

from __future__ import annotations

import copy
import functools
import math
import urllib.error

import pytest
import torch
from torch import nn
from torchvision.models.detection import ssdlite320_mobilenet_v3_large

from ssdlit.boxes import convert
from ssdlit.zoo import from_torchvision
from ssdlit.zoo.torchvision import (
    NAMED_WEIGHTS,
    coco_class_names,
    convert_state_dict,
    load_named_weights,
    torchvision_state_dict,
)
from tests.fast_builds import ssd300_vgg16

pytestmark = pytest.mark.slow  # full-size networks, a few seconds each

SIZES = {"ssd300_vgg16": 300, "ssdlite320_mobilenet_v3_large": 320}


@torch.no_grad()
def randomise(model: nn.Module, seed: int) -> nn.Module:
    """Convolutions ~ N(0, 1 / fan_in), batch norms with spread-out scales and statistics."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.weight[0].numel()
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / math.sqrt(fan_in))
            if m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model


@functools.cache
def torchvision_model(arch: str, num_classes: int = 91):
    """torchvision's model, random (seeded), in eval mode; built once per arguments (the
    tests read it and copy its state dict, never change it)."""
    torch.manual_seed(0)
    if arch == "ssd300_vgg16":
        return ssd300_vgg16(num_classes=num_classes).eval()  # without VGG's classifier
    model = ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=num_classes
    )
    return randomise(model, seed=1).eval()


@pytest.fixture(scope="module", params=sorted(SIZES))
def saved(request, tmp_path_factory):
    """(arch, torchvision model, path of its state dict, ssdlit detector read from that file)."""
    arch = request.param
    model = torchvision_model(arch)
    path = tmp_path_factory.mktemp("zoo") / f"{arch}.pth"
    torch.save(model.state_dict(), path)
    return arch, model, path, from_torchvision(path)


def images(batch: int, size: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=gen)


# One image through both networks, a batch of two through the small one (batching is the
# same code for either network: two images of SSD300-VGG16 would add seconds, not cases).
@pytest.mark.parametrize(
    ("saved", "batch"),
    [
        ("ssd300_vgg16", 1),
        ("ssdlite320_mobilenet_v3_large", 1),
        ("ssdlite320_mobilenet_v3_large", 2),
    ],
    indirect=["saved"],
)
def test_detections_equal_torchvisions(saved, batch):
    arch, model, _, detector = saved
    size = SIZES[arch]
    x = images(batch, size, seed=batch)
    with torch.no_grad():
        theirs = model([img.float() / 255 for img in x])
        ours = detector(x)
    assert len(ours) == batch
    for t, o in zip(theirs, ours, strict=True):
        assert len(o) == len(t["labels"]) > 100  # many detections: the order is tested
        assert torch.equal(o[:, 0].long(), t["labels"])
        torch.testing.assert_close(o[:, 1], t["scores"], atol=1e-5, rtol=0)
        torch.testing.assert_close(o[:, 2:] * size, t["boxes"], atol=2.5e-4, rtol=0)


def test_decoded_boxes_are_as_exact_as_float32_allows(saved):
    """Every anchor's decoded box, ssdlit's and torchvision's, against float64 arithmetic on
    the exact anchors (torchvision's generator in float64) and the same float32 deltas."""
    arch, model, _, detector = saved
    size = SIZES[arch]
    x = images(1, size, seed=7)
    with torch.no_grad():
        batch, _ = model.transform([img.float() / 255 for img in x])
        features = list(model.backbone(batch.tensors).values())
        head = model.head(features)
        outputs = detector.raw(x)
    assert torch.equal(outputs["cls_logits"], head["cls_logits"])
    assert torch.equal(outputs["box_deltas"], head["bbox_regression"])

    gen = copy.deepcopy(model.anchor_generator)  # the cached model stays as it is
    grid = [list(f.shape[-2:]) for f in features]
    gen._wh_pairs = gen._generate_wh_pairs(len(grid), dtype=torch.float64)
    exact_anchors = gen._grid_default_boxes(grid, [size, size], dtype=torch.float64)  # cxcywh
    tv_anchors = model.anchor_generator(batch, features)[0]  # float32 xyxy pixels
    deltas = outputs["box_deltas"][0]
    exact = convert(detector.head.coder.decode(deltas.double(), exact_anchors), "cxcywh", "xyxy")
    exact = exact * size
    ours = convert(detector.head.decode_boxes(outputs, detector.anchors)[0], "cxcywh", "xyxy")
    ours = ours.double() * size
    theirs = model.box_coder.decode_single(deltas, tv_anchors).double()
    inside = ((exact > -size) & (exact < 2 * size)).all(dim=1)  # what clipping can leave
    our_error = (ours - exact)[inside].abs().max().item()
    their_error = (theirs - exact)[inside].abs().max().item()
    # two float32 steps of the largest coordinate (1.4e-4 px at 600 px)
    assert our_error <= 2 * torch.finfo(torch.float32).eps * exact[inside].abs().max(), our_error
    assert our_error <= their_error, (our_error, their_error)


def test_the_source_can_be_a_model_a_state_dict_or_a_reference_checkpoint(saved, tmp_path):
    """Every source gives the model's tensors (``from_torchvision`` reads its source with
    ``torchvision_state_dict``); a reference checkpoint goes the whole way (the fixture's
    detector came from a plain state-dict file)."""
    arch, model, _, detector = saved
    reference = tmp_path / "checkpoint.pth"
    torch.save({"model": model.state_dict(), "epoch": 3}, reference)
    want = model.state_dict()
    for source in (model, want, reference):
        got = torchvision_state_dict(source)
        assert list(got) == list(want)
        assert all(torch.equal(got[k], v) for k, v in want.items())
    other = from_torchvision(reference, arch).state_dict()
    for key, value in detector.state_dict().items():
        assert torch.equal(other[key], value), key
    assert not detector.training
    assert detector.head.num_classes == 90


def test_the_test_ssd300_vgg16_is_torchvisions_network():
    """tests.fast_builds.ssd300_vgg16 (VGG-16 without its classifier) is the network that
    torchvision's builder returns: the same modules, tensor names and shapes."""
    from torchvision.models.detection import ssd300_vgg16 as torchvisions

    with torch.device("meta"):  # structure only
        theirs = torchvisions(weights=None, weights_backbone=None, num_classes=5)
    ours = ssd300_vgg16(num_classes=5)
    assert repr(ours) == repr(theirs)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }


def test_every_torchvision_tensor_lands_once(saved):
    arch, model, _, detector = saved
    converted = convert_state_dict(model.state_dict(), arch)
    assert len(converted) == len(model.state_dict())
    assert set(converted) == set(detector.state_dict())
    assert detector.head.num_classes == 90


def test_the_class_count_is_read_from_the_weights():
    # (the head's layout is the same code for either network: the small one)
    model = torchvision_model("ssdlite320_mobilenet_v3_large", num_classes=5)
    assert from_torchvision(model).head.num_classes == 4


def test_ssdlites_tail_is_read_from_the_weights(monkeypatch):
    from torchvision.models.detection import ssdlite

    # torchvision reduces the tail whenever no ImageNet trunk is loaded (its COCO weights
    # included); the full tail is what an ImageNet start gives
    trunk = ssdlite.mobilenet_v3_large
    monkeypatch.setattr(
        ssdlite, "mobilenet_v3_large", lambda **kw: trunk(**{**kw, "reduced_tail": False})
    )
    full = torchvision_model.__wrapped__("ssdlite320_mobilenet_v3_large", num_classes=3)
    monkeypatch.undo()
    detector = from_torchvision(full)
    assert detector.backbone.out_channels[1] == 960
    reduced = from_torchvision(torchvision_model("ssdlite320_mobilenet_v3_large"))
    assert reduced.backbone.out_channels[1] == 480


def test_wrong_weights_are_refused(tmp_path):
    model = torchvision_model("ssd300_vgg16")
    with pytest.raises(ValueError, match="not ssdlite320_mobilenet_v3_large"):
        from_torchvision(model, "ssdlite320_mobilenet_v3_large")
    state = model.state_dict()
    state["backbone.extra.9.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unexpected key 'backbone\.extra\.9\.weight'"):
        from_torchvision(state)
    state = model.state_dict()
    state["backbone.features.0.weight"] = torch.zeros(64, 3, 5, 5)
    with pytest.raises(ValueError, match=r"features\.conv1_1\.weight: \(64, 3, 5, 5\)"):
        from_torchvision(state)
    with pytest.raises(ValueError, match="not a state dict of torchvision"):
        from_torchvision({"fc.weight": torch.zeros(2, 2)})
    with pytest.raises(FileNotFoundError, match="no such file"):
        from_torchvision(tmp_path / "missing.pth")


def test_coco_class_names_are_torchvisions_labels():
    names = coco_class_names()
    assert len(names) == 90
    assert names[0] == "person" and names[17] == "dog" and names[89] == "toothbrush"
    assert names.count("N/A") == 10


def test_named_weights_say_what_to_do_offline(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    from ssdlit.apps.common import user_error_message
    from ssdlit.backbones import PretrainedWeightsError

    for name in NAMED_WEIGHTS:
        with pytest.raises(PretrainedWeightsError, match=str(tmp_path / "checkpoints")) as info:
            load_named_weights(name)
        assert "init_from=null" in str(info.value) and "pretrained=false" not in str(info.value)
        assert user_error_message(info.value)  # the apps end with this one line, status 2
    with pytest.raises(ValueError, match="unknown weights"):
        load_named_weights("torchvision:yolo")
