"""What every backbone shares: the contract with the detector and the normalisation constants."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "NORMALIZATIONS", "Backbone", "ExtraLayer"]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

Triple = tuple[float, float, float]

#: The input normalisations that weights expect, by name: ``(mean, std)`` in 0..1 units, RGB.
NORMALIZATIONS: dict[str, tuple[Triple, Triple]] = {
    # torchvision's ImageNet classifiers (IMAGENET1K_V1 and most others)
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    # Caffe-style mean subtraction on 0..255 values: torchvision's VGG16 IMAGENET1K_FEATURES
    # and the ssd300_vgg16 COCO weights trained from them
    "caffe": ((0.48235, 0.45882, 0.40784), (1.0 / 255.0,) * 3),
    # ssd_keras's SSD300/512: subtract_mean=[123, 117, 104] on 0..255 values
    "ssd_keras": ((123.0 / 255.0, 117.0 / 255.0, 104.0 / 255.0), (1.0 / 255.0,) * 3),
    # scaled to [-1, 1]: torchvision's SSDLite320 (COCO weights), ssd_keras's SSD7
    "unit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


class Backbone(nn.Module):
    """Base class of the registered backbones (see ``docs/ARCHITECTURE.md``, Backbones).

    A backbone turns an already normalised batch ``[B, 3, H, W]`` into a list of
    feature maps, finest first, whose channel counts are ``out_channels``. It never
    normalises its input: the detector computes ``(images / input_scale - mean) / std``
    with the constants below (``mean`` and ``std`` in 0..1 units, RGB order).

    Attributes:
        out_channels: channels of each returned feature map, one per level.
        mean, std: per-channel normalisation constants the weights expect (0..1 units).
        input_scale: what the 0..255 input is divided by before ``mean``/``std`` apply.
    """

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_scale: float = 255.0
    out_channels: list[int]

    def set_normalization(self, name: str) -> None:
        """Use the named input normalisation of :data:`NORMALIZATIONS` (``"imagenet"``,
        ``"caffe"``, ``"ssd_keras"``, ``"unit"``): the one the loaded weights expect."""
        if name not in NORMALIZATIONS:
            raise ValueError(
                f"unknown normalization {name!r}; expected one of {sorted(NORMALIZATIONS)}"
            )
        self.mean, self.std = NORMALIZATIONS[name]

    def forward(self, x: Tensor) -> list[Tensor]:  # pragma: no cover - abstract
        """``x [B, 3, H, W]`` normalised -> feature maps ``[B, C_l, H_l, W_l]``, finest first."""
        raise NotImplementedError


class ExtraLayer(NamedTuple):
    """One SSD extra layer: a 1x1 reduction to ``mid`` channels, then a ``kernel`` conv to ``out``.

    ``[B, C, H, W] -> [B, out, (H + 2 * padding - kernel) // stride + 1, ...]``.
    """

    mid: int
    out: int
    kernel: int
    stride: int
    padding: int
