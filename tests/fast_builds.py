"""Building networks for tests without the work those tests never look at.

- :func:`ssd300_vgg16`: torchvision's ``ssd300_vgg16`` builder, run on a VGG-16 made of its
  feature layers only. torchvision builds the whole ImageNet VGG-16 and then keeps
  ``.features`` (``_vgg_extractor``); its 120M-parameter classifier, drawn and dropped,
  is ~95% of the build time (~1.8 s here). The network torchvision returns is the same
  (same modules, same initialisation rules: VGG's Kaiming-normal convolutions with zero
  biases, then SSD's own); only the random numbers differ, as they do between seeds.
- :func:`no_weight_init`: modules built inside keep uninitialised weights (``nn.init`` does
  nothing): for tests of structure (a config composes and builds, shapes, counts) that
  never run the weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from unittest import mock

import torch
from torch import nn
from torchvision.models import vgg as tv_vgg
from torchvision.models.detection import ssd as tv_ssd

__all__ = ["no_weight_init", "ssd300_vgg16"]


def _vgg16_features(*, weights=None, progress: bool = True, **kwargs) -> nn.Module:
    """VGG-16 as ``ssd300_vgg16`` uses it: ``.features`` only, initialised as torchvision's
    ``VGG`` initialises its convolutions."""
    if weights is not None or kwargs:
        raise ValueError("the test VGG-16 is random and has no options")
    net = nn.Module()
    net.features = tv_vgg.make_layers(tv_vgg.cfgs["D"], batch_norm=False)
    for m in net.features.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.constant_(m.bias, 0)
    return net


def ssd300_vgg16(num_classes: int = 91) -> nn.Module:
    """torchvision's ``ssd300_vgg16(weights=None, weights_backbone=None, num_classes=...)``
    without building VGG-16's classifier (see the module docstring)."""
    with mock.patch.object(tv_ssd, "vgg16", _vgg16_features):
        return tv_ssd.ssd300_vgg16(weights=None, weights_backbone=None, num_classes=num_classes)


def _keep(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return tensor


_INIT = (
    "uniform_",
    "normal_",
    "trunc_normal_",
    "constant_",
    "ones_",
    "zeros_",
    "xavier_uniform_",
    "xavier_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "orthogonal_",
)


@contextlib.contextmanager
def no_weight_init() -> Iterator[None]:
    """Inside, every ``torch.nn.init`` initialiser leaves its tensor as it is (``torch.empty``
    memory): building a network costs its allocation only."""
    with mock.patch.multiple(torch.nn.init, **{name: _keep for name in _INIT}):
        yield
