"""Backbones: image ``[B, 3, H, W]`` (already normalised) -> feature maps, finest first.

Importing this package registers them in :data:`ssdlit.registry.BACKBONES`:

======================  ==============================================  =========
name                    what                                            input
======================  ==============================================  =========
``vgg16_ssd300``        VGG-16, L2Norm conv4_3, fc6/fc7, SSD300 extras  300x300
``vgg16_ssd512``        the same with SSD512's extras                   512x512
``ssd7``                ssd_keras's 7-block from-scratch network        any
``mobilenet_v3_large``  SSDLite320: MobileNetV3-Large + SSDLite extras  320x320
``resnet50``            NVIDIA SSD300 v1.1: ResNet-50 + extras          300x300
======================  ==============================================  =========

Every backbone is built with keyword arguments only; ``pretrained=True`` loads
torchvision's ImageNet weights (the only time anything reaches the network).
"""

from ssdlit.backbones.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    NORMALIZATIONS,
    Backbone,
    ExtraLayer,
)
from ssdlit.backbones.mobilenet import MobileNetV3SSDLite
from ssdlit.backbones.pretrained import PretrainedWeightsError, load_state_dict
from ssdlit.backbones.resnet import ResNet50SSD
from ssdlit.backbones.ssd7 import SSD7
from ssdlit.backbones.vgg import VGG16SSD, L2Norm, vgg16_ssd300, vgg16_ssd512

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NORMALIZATIONS",
    "SSD7",
    "VGG16SSD",
    "Backbone",
    "ExtraLayer",
    "L2Norm",
    "MobileNetV3SSDLite",
    "PretrainedWeightsError",
    "ResNet50SSD",
    "load_state_dict",
    "vgg16_ssd300",
    "vgg16_ssd512",
]
