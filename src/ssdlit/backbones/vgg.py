"""VGG-16 SSD300 / SSD512 backbones (the SSD paper's network, as in ssd_keras and torchvision).

VGG-16 ``conv1_1 .. conv5_3`` (pool3 in ceil mode so 300 -> 38 at conv4_3), pool5
3x3 stride 1, ``fc6`` as a 3x3 convolution with dilation 6 and ``fc7`` as a 1x1
convolution (1024 channels each), then the SSD extra layers; ``conv4_3`` is
L2-normalised with a learnable per-channel scale before it is returned.

============  ======================  ===============================
variant       feature maps            channels
============  ======================  ===============================
SSD300 @300   38, 19, 10, 5, 3, 1     512, 1024, 512, 256, 256, 256
SSD512 @512   64, 32, 16, 8, 4, 2, 1  512, 1024, 512, 256, 256, 256, 256
============  ======================  ===============================
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import VGG16_Weights

from ssdlit.backbones.base import Backbone, ExtraLayer
from ssdlit.backbones.pretrained import load_state_dict
from ssdlit.registry import BACKBONES

__all__ = [
    "SSD300_EXTRAS",
    "SSD512_EXTRAS",
    "VGG16SSD",
    "VGG16_STAGES",
    "L2Norm",
    "reduce_fc6",
    "reduce_fc7",
    "vgg16_ssd300",
    "vgg16_ssd512",
]

# Output channels of the convolutions of VGG-16's five stages (torchvision's configuration "D").
VGG16_STAGES: tuple[tuple[int, ...], ...] = (
    (64, 64),
    (128, 128),
    (256, 256, 256),
    (512, 512, 512),
    (512, 512, 512),
)


# conv6_1/6_2 .. conv9_2 of ssd_keras's keras_ssd300.py (conv8_2 .. conv11_2 in torchvision).
SSD300_EXTRAS: tuple[ExtraLayer, ...] = (
    ExtraLayer(256, 512, 3, 2, 1),  # 19 -> 10
    ExtraLayer(128, 256, 3, 2, 1),  # 10 -> 5
    ExtraLayer(128, 256, 3, 1, 0),  # 5 -> 3
    ExtraLayer(128, 256, 3, 1, 0),  # 3 -> 1
)
# conv6_1/6_2 .. conv10_2 of keras_ssd512.py: four stride-2 layers, then a 4x4 conv, padding 1.
SSD512_EXTRAS: tuple[ExtraLayer, ...] = (
    ExtraLayer(256, 512, 3, 2, 1),  # 32 -> 16
    ExtraLayer(128, 256, 3, 2, 1),  # 16 -> 8
    ExtraLayer(128, 256, 3, 2, 1),  # 8 -> 4
    ExtraLayer(128, 256, 3, 2, 1),  # 4 -> 2
    ExtraLayer(128, 256, 4, 1, 1),  # 2 -> 1
)


class L2Norm(nn.Module):
    """L2-normalise over channels, then scale each channel by a learnable weight.

    ``y[b, c, h, w] = weight[c] * x[b, c, h, w] / max(||x[b, :, h, w]||_2, eps)``
    (ParseNet; SSD uses it on conv4_3 with the weights initialised to 20).
    """

    def __init__(self, channels: int, *, scale: float = 20.0, eps: float = 1e-10) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.full((channels,), float(scale)))

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, C, H, W]`` -> ``[B, C, H, W]``."""
        return F.normalize(x, p=2.0, dim=1, eps=self.eps) * self.weight.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, eps={self.eps}"


def reduce_fc6(weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """VGG-16 ``fc6`` as SSD's dilated 3x3 ``fc6`` conv, by subsampling (SSD paper, sec. 3).

    Args:
        weight: ``[4096, 512 * 7 * 7]`` (the linear layer on the flattened 512x7x7 pool5).
        bias: ``[4096]``.

    Returns:
        ``[1024, 512, 3, 3]`` (every 4th output channel, every 3rd tap of the 7x7 window)
        and ``[1024]``.
    """
    w = weight.reshape(weight.shape[0], 512, 7, 7)  # [4096, 512, 7, 7]
    return w[::4, :, ::3, ::3].contiguous(), bias[::4].contiguous()


def reduce_fc7(weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """VGG-16 ``fc7`` ``[4096, 4096]`` as a 1x1 conv ``[1024, 1024, 1, 1]`` (every 4th in and out)."""
    w = weight[::4, ::4]  # [1024, 1024]
    return w.reshape(*w.shape, 1, 1).contiguous(), bias[::4].contiguous()


def _vgg_stage(index: int, in_channels: int, widths: Sequence[int]) -> list[tuple[str, nn.Module]]:
    """Named 3x3 conv + ReLU pairs ``conv{index}_1, relu{index}_1, ...`` of one VGG stage."""
    layers: list[tuple[str, nn.Module]] = []
    for j, out in enumerate(widths, start=1):
        layers.append((f"conv{index}_{j}", nn.Conv2d(in_channels, out, 3, padding=1)))
        layers.append((f"relu{index}_{j}", nn.ReLU(inplace=True)))
        in_channels = out
    return layers


def _extra_block(index: int, in_channels: int, spec: ExtraLayer) -> nn.Sequential:
    """``conv{index}_1`` (1x1 to ``spec.mid``) + ReLU, ``conv{index}_2`` + ReLU."""
    return nn.Sequential(
        OrderedDict(
            [
                (f"conv{index}_1", nn.Conv2d(in_channels, spec.mid, 1)),
                (f"relu{index}_1", nn.ReLU(inplace=True)),
                (
                    f"conv{index}_2",
                    nn.Conv2d(spec.mid, spec.out, spec.kernel, spec.stride, spec.padding),
                ),
                (f"relu{index}_2", nn.ReLU(inplace=True)),
            ]
        )
    )


class VGG16SSD(Backbone):
    """VGG-16 with SSD's fc6/fc7 convolutions, L2-normalised conv4_3 and ``extras``.

    Modules (named as in the SSD paper / ssd_keras): ``features`` = ``conv1_1 .. relu4_3``;
    ``conv4_3_norm`` (:class:`L2Norm`, scale 20); ``fc`` = ``pool4, conv5_1 .. relu5_3,
    pool5, fc6, relu6, fc7, relu7``; ``extras`` = one block per ``ExtraLayer``
    (``conv6_1, conv6_2, ...``).

    Args:
        extras: the extra layers after fc7 (:data:`SSD300_EXTRAS`, :data:`SSD512_EXTRAS`).
        pretrained: load torchvision's ``VGG16_Weights.IMAGENET1K_V1`` into conv1_1 ..
            conv5_3 and the subsampled classifier into fc6/fc7 (downloads when not cached).
        progress: show a progress bar while downloading.
        l2norm_scale: initial value of the conv4_3 L2Norm weights.
        normalization: the input normalisation the weights expect (a name of
            :data:`~ssdlit.backbones.base.NORMALIZATIONS`): ``"imagenet"`` for torchvision's
            ImageNet VGG-16, ``"caffe"`` for torchvision's SSD300 COCO weights,
            ``"ssd_keras"`` for ssd_keras's.
    """

    def __init__(
        self,
        *,
        extras: Sequence[ExtraLayer] = SSD300_EXTRAS,
        pretrained: bool = False,
        progress: bool = True,
        l2norm_scale: float = 20.0,
        normalization: str = "imagenet",
    ) -> None:
        super().__init__()
        self.set_normalization(normalization)
        layers: list[tuple[str, nn.Module]] = []
        in_channels = 3
        for i, widths in enumerate(VGG16_STAGES[:4], start=1):
            layers += _vgg_stage(i, in_channels, widths)
            in_channels = widths[-1]
            if i < 4:  # pool3 in ceil mode: 75 -> 38 at 300
                layers.append((f"pool{i}", nn.MaxPool2d(2, 2, ceil_mode=i == 3)))
        self.features = nn.Sequential(OrderedDict(layers))
        self.conv4_3_norm = L2Norm(in_channels, scale=l2norm_scale)

        layers = [("pool4", nn.MaxPool2d(2, 2))]
        layers += _vgg_stage(5, in_channels, VGG16_STAGES[4])
        layers += [
            ("pool5", nn.MaxPool2d(3, 1, padding=1)),
            ("fc6", nn.Conv2d(VGG16_STAGES[4][-1], 1024, 3, padding=6, dilation=6)),
            ("relu6", nn.ReLU(inplace=True)),
            ("fc7", nn.Conv2d(1024, 1024, 1)),
            ("relu7", nn.ReLU(inplace=True)),
        ]
        self.fc = nn.Sequential(OrderedDict(layers))

        blocks = []
        in_channels = 1024
        for i, spec in enumerate(extras, start=6):
            blocks.append(_extra_block(i, in_channels, spec))
            in_channels = spec.out
        self.extras = nn.ModuleList(blocks)
        self.out_channels = [VGG16_STAGES[3][-1], 1024] + [spec.out for spec in extras]

        self.reset_parameters()
        if pretrained:
            self.load_imagenet(progress=progress)

    def reset_parameters(self) -> None:
        """VGG convs: Kaiming normal (fan out, as torchvision's VGG); fc6, fc7, extras: Xavier."""
        for conv in self.vgg_convs():
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        for m in [
            self.fc.get_submodule("fc6"),
            self.fc.get_submodule("fc7"),
            *self.extras.modules(),
        ]:
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def vgg_convs(self) -> list[nn.Conv2d]:
        """``conv1_1 .. conv5_3`` in order (13 convolutions)."""
        convs = [m for m in self.features if isinstance(m, nn.Conv2d)]
        return convs + [self.fc.get_submodule(f"conv5_{j}") for j in (1, 2, 3)]

    @torch.no_grad()
    def load_imagenet(self, *, progress: bool = True) -> None:
        """Fill conv1_1 .. conv5_3, fc6 and fc7 from ``VGG16_Weights.IMAGENET1K_V1``."""
        state = load_state_dict(VGG16_Weights.IMAGENET1K_V1, progress=progress)
        # Index of each conv in torchvision's ``features``: conv + ReLU take two slots, a pool one.
        index = 0
        sources: list[int] = []
        for widths in VGG16_STAGES:
            for _ in widths:
                sources.append(index)
                index += 2
            index += 1
        for conv, i in zip(self.vgg_convs(), sources, strict=True):
            conv.weight.copy_(state[f"features.{i}.weight"])
            conv.bias.copy_(state[f"features.{i}.bias"])
        w6, b6 = reduce_fc6(state["classifier.0.weight"], state["classifier.0.bias"])
        w7, b7 = reduce_fc7(state["classifier.3.weight"], state["classifier.3.bias"])
        fc6, fc7 = self.fc.get_submodule("fc6"), self.fc.get_submodule("fc7")
        fc6.weight.copy_(w6)
        fc6.bias.copy_(b6)
        fc7.weight.copy_(w7)
        fc7.bias.copy_(b7)

    def forward(self, x: Tensor) -> list[Tensor]:
        """``x [B, 3, H, W]`` -> conv4_3 (normalised), fc7, extras: ``[B, C_l, H_l, W_l]``."""
        x = self.features(x)  # [B, 512, H/8, W/8] (ceil)
        outputs = [self.conv4_3_norm(x)]
        x = self.fc(x)  # [B, 1024, H/16, W/16]
        outputs.append(x)
        for block in self.extras:
            x = block(x)
            outputs.append(x)
        return outputs


@BACKBONES.register("vgg16_ssd300")
def vgg16_ssd300(
    *, pretrained: bool = False, progress: bool = True, normalization: str = "imagenet"
) -> VGG16SSD:
    """SSD300's VGG-16: 38, 19, 10, 5, 3, 1 maps at 300x300 (512, 1024, 512, 256, 256, 256 ch)."""
    return VGG16SSD(
        extras=SSD300_EXTRAS, pretrained=pretrained, progress=progress, normalization=normalization
    )


@BACKBONES.register("vgg16_ssd512")
def vgg16_ssd512(
    *, pretrained: bool = False, progress: bool = True, normalization: str = "imagenet"
) -> VGG16SSD:
    """SSD512's VGG-16: 64, 32, 16, 8, 4, 2, 1 maps at 512x512."""
    return VGG16SSD(
        extras=SSD512_EXTRAS, pretrained=pretrained, progress=progress, normalization=normalization
    )
