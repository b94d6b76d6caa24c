"""MobileNetV3-Large SSDLite backbone (torchvision's ``ssdlite320_mobilenet_v3_large``).

torchvision's ``mobilenet_v3_large`` trunk, split as in the MobileNetV3 paper
(section 6.3): the first output is the expansion (1x1 conv) of the last stride-2
block (C4, 672 channels at stride 16), the second the trunk's last layer (960
channels at stride 32); then four SSDLite extra blocks (1x1 conv to half the
channels, 3x3 depthwise stride 2, 1x1 conv; batch norm + ReLU6 each) with 512, 256,
256 and 128 channels. At 320x320: 20, 10, 5, 3, 2, 1.
"""

from __future__ import annotations

from functools import partial

from torch import Tensor, nn
from torchvision.models import MobileNet_V3_Large_Weights, mobilenet_v3_large
from torchvision.ops.misc import Conv2dNormActivation

from ssdlit.backbones.base import Backbone
from ssdlit.backbones.pretrained import load_state_dict
from ssdlit.registry import BACKBONES

__all__ = ["MobileNetV3SSDLite", "ssdlite_extra_block"]


def ssdlite_extra_block(
    in_channels: int, out_channels: int, norm_layer: type[nn.Module] | partial
) -> nn.Sequential:
    """1x1 to ``out // 2``, 3x3 depthwise stride 2 (pad 1), 1x1 to ``out``; norm + ReLU6 each.

    ``[B, in, H, W] -> [B, out, ceil(H / 2), ceil(W / 2)]``.
    """
    mid = out_channels // 2
    conv = partial(Conv2dNormActivation, norm_layer=norm_layer, activation_layer=nn.ReLU6)
    return nn.Sequential(
        conv(in_channels, mid, kernel_size=1),
        conv(mid, mid, kernel_size=3, stride=2, groups=mid),
        conv(mid, out_channels, kernel_size=1),
    )


def _normal_init(module: nn.Module, std: float = 0.03) -> None:
    """Convolutions ~ N(0, std), zero biases (torchvision's SSDLite initialisation)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


@BACKBONES.register("mobilenet_v3_large")
class MobileNetV3SSDLite(Backbone):
    """SSDLite320's MobileNetV3-Large feature extractor.

    Modules: ``c4`` (trunk up to and including the expansion conv of the C4 block),
    ``c5`` (rest of the trunk), ``extras`` (four SSDLite blocks).

    Args:
        pretrained: load torchvision's ``MobileNet_V3_Large_Weights.IMAGENET1K_V1`` into
            the trunk (downloads when not cached); needs ``width_mult=1`` and no reduced tail.
        progress: show a progress bar while downloading.
        width_mult: channel multiplier of the trunk and the extra blocks.
        reduced_tail: halve the channels of the last trunk stage (MobileNetV3 paper,
            Table 6; torchvision does this when training from scratch): 480 instead of 960.
        min_depth: smallest channel count of an extra block under ``width_mult``.
        normalization: the input normalisation (a name of
            :data:`~ssdlit.backbones.base.NORMALIZATIONS`): ``"imagenet"`` for the ImageNet
            trunk, ``"unit"`` ([-1, 1]) as torchvision's SSDLite320 and its COCO weights.
    """

    def __init__(
        self,
        *,
        pretrained: bool = False,
        progress: bool = True,
        width_mult: float = 1.0,
        reduced_tail: bool = False,
        min_depth: int = 16,
        normalization: str = "imagenet",
    ) -> None:
        super().__init__()
        self.set_normalization(normalization)
        if pretrained and (width_mult != 1.0 or reduced_tail):
            raise ValueError(
                "pretrained MobileNetV3-Large weights need width_mult=1.0 and reduced_tail=False"
            )
        norm_layer = partial(nn.BatchNorm2d, eps=1e-3, momentum=0.03)
        trunk = mobilenet_v3_large(
            weights=None, norm_layer=norm_layer, width_mult=width_mult, reduced_tail=reduced_tail
        )
        if pretrained:
            trunk.load_state_dict(
                load_state_dict(MobileNet_V3_Large_Weights.IMAGENET1K_V1, progress=progress)
            )
        else:
            _normal_init(trunk)
        layers = trunk.features
        # The last stride-2 inverted residual is C4 (torchvision marks them ``_is_cn``).
        c4 = [i for i, m in enumerate(layers) if getattr(m, "_is_cn", False)][-1]
        expand = layers[c4].block[0]  # 1x1 expansion conv + BN + Hardswish
        self.c4 = nn.Sequential(*layers[:c4], expand)
        self.c5 = nn.Sequential(layers[c4].block[1:], *layers[c4 + 1 :])

        def depth(d: int) -> int:
            return max(min_depth, int(d * width_mult))

        widths = [depth(512), depth(256), depth(256), depth(128)]
        blocks = []
        in_channels = layers[-1].out_channels
        for out in widths:
            blocks.append(ssdlite_extra_block(in_channels, out, norm_layer))
            in_channels = out
        self.extras = nn.ModuleList(blocks)
        _normal_init(self.extras)
        self.out_channels = [expand.out_channels, layers[-1].out_channels, *widths]

    def forward(self, x: Tensor) -> list[Tensor]:
        """``x [B, 3, H, W]`` -> C4 expansion ``[B, 672, H/16, W/16]``, C5 ``[B, 960, H/32, W/32]``,
        then the extras (each halving, ceil)."""
        x = self.c4(x)
        outputs = [x]
        x = self.c5(x)
        outputs.append(x)
        for block in self.extras:
            x = block(x)
            outputs.append(x)
        return outputs
