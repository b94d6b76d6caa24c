"""ResNet-50 SSD300 backbone (NVIDIA DeepLearningExamples SSD300 v1.1 style).

torchvision's ``resnet50`` ``conv1 .. layer3`` with the first block of ``layer3`` at
stride 1, so the first map is 38x38 at 300x300 with 1024 channels; then five extra
blocks (1x1 reduction + 3x3 conv, each with batch norm and ReLU) to 19, 10, 5, 3, 1
with 512, 512, 256, 256, 256 channels.
"""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models import ResNet50_Weights, resnet50

from ssdlit.backbones.base import Backbone, ExtraLayer
from ssdlit.backbones.pretrained import load_state_dict
from ssdlit.registry import BACKBONES

__all__ = ["RESNET50_EXTRAS", "ResNet50SSD"]

RESNET50_EXTRAS: tuple[ExtraLayer, ...] = (
    ExtraLayer(256, 512, 3, 2, 1),  # 38 -> 19
    ExtraLayer(256, 512, 3, 2, 1),  # 19 -> 10
    ExtraLayer(128, 256, 3, 2, 1),  # 10 -> 5
    ExtraLayer(128, 256, 3, 1, 0),  # 5 -> 3
    ExtraLayer(128, 256, 3, 1, 0),  # 3 -> 1
)


def _extra_block(in_channels: int, spec: ExtraLayer) -> nn.Sequential:
    """1x1 conv to ``spec.mid`` + BN + ReLU, ``spec.kernel`` conv to ``spec.out`` + BN + ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, spec.mid, 1, bias=False),
        nn.BatchNorm2d(spec.mid),
        nn.ReLU(inplace=True),
        nn.Conv2d(spec.mid, spec.out, spec.kernel, spec.stride, spec.padding, bias=False),
        nn.BatchNorm2d(spec.out),
        nn.ReLU(inplace=True),
    )


@BACKBONES.register("resnet50")
class ResNet50SSD(Backbone):
    """ResNet-50 ``conv1 .. layer3`` (layer3 at stride 1) plus SSD extra blocks.

    Modules: ``body`` (``conv1, bn1, relu, maxpool, layer1, layer2, layer3`` of torchvision's
    ``resnet50``), ``extras``.

    Args:
        pretrained: load torchvision's ``ResNet50_Weights.IMAGENET1K_V1`` into the body
            (downloads when not cached).
        progress: show a progress bar while downloading.
    """

    def __init__(self, *, pretrained: bool = False, progress: bool = True) -> None:
        super().__init__()
        trunk = resnet50(weights=None)
        if pretrained:
            trunk.load_state_dict(
                load_state_dict(ResNet50_Weights.IMAGENET1K_V1, progress=progress)
            )
        first = trunk.layer3[0]  # torchvision's Bottleneck strides in conv2 and downsample
        first.conv2.stride = (1, 1)
        first.downsample[0].stride = (1, 1)
        self.body = nn.Sequential(
            trunk.conv1,
            trunk.bn1,
            trunk.relu,
            trunk.maxpool,
            trunk.layer1,
            trunk.layer2,
            trunk.layer3,
        )
        blocks = []
        in_channels = 1024
        for spec in RESNET50_EXTRAS:
            blocks.append(_extra_block(in_channels, spec))
            in_channels = spec.out
        self.extras = nn.ModuleList(blocks)
        for m in self.extras.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
        self.out_channels = [1024] + [spec.out for spec in RESNET50_EXTRAS]

    def forward(self, x: Tensor) -> list[Tensor]:
        """``x [B, 3, H, W]`` -> layer3 ``[B, 1024, H/8, W/8]`` (ceil), then the five extras."""
        x = self.body(x)
        outputs = [x]
        for block in self.extras:
            x = block(x)
            outputs.append(x)
        return outputs
