"""SSD7: the small from-scratch network of ssd_keras (``keras_ssd7.py``), any input size.

Seven blocks of conv (5x5 in the first, 3x3 after, "same" padding) + batch norm + ELU
with 32, 48, 64, 64, 48, 48, 32 filters; a 2x2 max-pool (floor) follows blocks 1-6.
The outputs of blocks 4-7 (strides 8, 16, 32, 64) are the feature maps: at 120x160
they are 15x20, 7x10, 3x5 and 1x2, with 64, 48, 48, 32 channels.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import Tensor, nn

from ssdlit.backbones.base import Backbone
from ssdlit.registry import BACKBONES

__all__ = ["SSD7"]


ACTIVATIONS = {"elu": nn.ELU, "relu": nn.ReLU}


def _block(in_channels: int, out_channels: int, kernel: int, activation: str) -> nn.Sequential:
    """Conv ("same" padding, no bias: batch norm follows) + batch norm + activation."""
    return nn.Sequential(
        OrderedDict(
            [
                (
                    "conv",
                    nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False),
                ),
                # Keras BatchNormalization defaults: momentum 0.99 (0.01 here), epsilon 1e-3.
                ("bn", nn.BatchNorm2d(out_channels, eps=1e-3, momentum=0.01)),
                ("act", ACTIVATIONS[activation](inplace=True)),
            ]
        )
    )


@BACKBONES.register("ssd7")
class SSD7(Backbone):
    """ssd_keras's SSD7 body; predictors attach to the last ``num_outputs`` blocks.

    Args:
        pretrained: must be False (there are no pretrained weights for SSD7).
        widths: filters of the seven blocks.
        num_outputs: how many of the last blocks are returned (4 in ssd_keras).
        activation: ``"elu"`` (ssd_keras) or ``"relu"`` (about 4x cheaper on a CPU, where
            the full-resolution first block dominates the cost).

    The input is expected scaled to [-1, 1] (ssd_keras's ``intensity_mean=127.5``,
    ``intensity_range=127.5``): ``mean = std = (0.5, 0.5, 0.5)``.
    """

    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)

    def __init__(
        self,
        *,
        pretrained: bool = False,
        widths: Sequence[int] = (32, 48, 64, 64, 48, 48, 32),
        num_outputs: int = 4,
        activation: str = "elu",
    ) -> None:
        super().__init__()
        if pretrained:
            raise ValueError("ssd7 is trained from scratch: there are no pretrained weights")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if not 1 <= num_outputs <= len(widths):
            raise ValueError(f"num_outputs must be in 1..{len(widths)}, got {num_outputs}")
        blocks = []
        in_channels = 3
        for i, out in enumerate(widths):
            blocks.append(_block(in_channels, out, 5 if i == 0 else 3, activation))
            in_channels = out
        self.blocks = nn.ModuleList(blocks)
        self.pool = nn.MaxPool2d(2, 2)
        self.first_output = len(widths) - num_outputs
        self.out_channels = [int(w) for w in widths[self.first_output :]]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")  # Keras "he_normal"

    def forward(self, x: Tensor) -> list[Tensor]:
        """``x [B, 3, H, W]`` -> blocks 4..7 ``[B, C_l, H / 2**(l + 3), W / 2**(l + 3)]`` (floor)."""
        outputs = []
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i >= self.first_output:
                outputs.append(x)
            if i < last:
                x = self.pool(x)
        return outputs
