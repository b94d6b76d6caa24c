"""The detector as a plain ``nn.Module``: backbone, anchors, head, post-processing.

Usable without Lightning::

    det = Detector.build(num_classes=20, image_size=(300, 300),
                         backbone={"name": "vgg16_ssd300"}, anchors={"name": "ssd", ...},
                         head={"name": "ssd"}, matcher={"name": "ssd"},
                         postprocess={"name": "per_class"})
    detections = det(images)        # list of [k, 6] (label, score, x1, y1, x2, y2), normalised
    outputs = det.raw(images)       # the head's raw outputs (cls_logits, box_deltas, ...)
    losses = det.loss(outputs, gt_boxes, gt_labels, gt_mask)

Everything derivable is derived once: the feature sizes from one dry run of the
backbone, the anchors from them (a non-persistent buffer), the head's input
channels from the backbone and its anchors per location from the generator. What
the matcher derives from the anchors (:class:`~ssdlit.anchors.matching.AnchorOverlaps`,
built from the generator's :class:`~ssdlit.anchors.grid.AnchorGrid`) belongs to the
detector too: built with its anchors, rebuilt when the detector moves (``.to()``,
``.double()``) or its anchors change; never shared through a global cache.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from ssdlit.anchors.matching import AnchorOverlaps, Matcher, MatchSampler
from ssdlit.backbones.base import IMAGENET_MEAN, IMAGENET_STD
from ssdlit.boxes import convert
from ssdlit.registry import ANCHORS, BACKBONES, HEADS, MATCHERS, POSTPROCESS, ConfigError

__all__ = ["Detector", "build_component"]


def _widened(value: Any) -> Any:
    """A floating-point tensor narrower than float32 (autocast's bfloat16 / float16) as
    float32; anything else unchanged."""
    if isinstance(value, Tensor) and value.is_floating_point() and value.element_size() < 4:
        return value.float()
    return value


def build_component(registry, spec: Mapping[str, Any] | None, **derived: Any) -> Any:
    """Build ``{name: ..., **kwargs}`` from ``registry``, adding the derived keywords.

    A derived keyword that the config also sets is an error: nothing is configured twice.
    """
    if spec is None:
        raise ConfigError(f"a {registry.kind} needs a config with a 'name'")
    kwargs = dict(spec)
    name = kwargs.pop("name", None)
    if name is None:
        raise ConfigError(f"{registry.kind} config {dict(spec)} has no 'name'")
    twice = sorted(set(kwargs) & set(derived))
    if twice:
        raise ConfigError(
            f"{registry.kind} {name!r}: {', '.join(twice)} are derived from the other parts "
            "and must not be set in its config"
        )
    try:
        return registry.build(name, **kwargs, **derived)
    except ConfigError as exc:
        group = CONFIG_GROUPS.get(registry.kind)
        unknown = _keys_not_taken(registry.get(name), kwargs) if group else []
        if not unknown or "unexpected keyword argument" not in str(exc.__cause__):
            raise
        paths = [f"{group}.{key}" for key in unknown]
        raise ConfigError(
            f"{exc}. {registry.kind} {name!r} does not take {', '.join(paths)}: settings for "
            f"another {registry.kind} (an experiment's, kept after {group}={name} on the "
            f"command line?); drop them with {' '.join('~' + p for p in paths)}"
        ) from exc.__cause__


#: The config group of each component registry (the key path of its settings).
CONFIG_GROUPS = {
    "backbone": "backbone",
    "anchor generator": "anchors",
    "matcher": "matcher",
    "head": "head",
    "post-processor": "postprocess",
}


def _keys_not_taken(factory: Any, kwargs: Mapping[str, Any]) -> list[str]:
    """The keys of ``kwargs`` that ``factory``'s signature has no parameter for (none
    when it takes ``**kwargs`` or has no readable signature)."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return []
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return []
    names = {p.name for p in params}
    return [key for key in kwargs if key not in names]


class Detector(nn.Module):
    """Backbone + anchors + head + post-processing (+ matcher for the loss).

    Args:
        backbone: a backbone module (``out_channels``, optional ``mean``/``std``).
        anchor_generator: an :class:`~ssdlit.anchors.AnchorGenerator` for ``image_size``.
        head: a head module following the contract in docs/ARCHITECTURE.md.
        postprocess: a post-processor (``scores [B,A,K], boxes [B,A,4] -> list[[k, 6]]``).
        image_size: network input ``(H, W)``.
        matcher: optional matcher; needed by :meth:`loss`.
        clip_boxes: clamp decoded boxes to the image before NMS.
        sampler: optional :class:`~ssdlit.anchors.matching.MatchSampler` applied to the
            matches before the head's loss (Faster R-CNN's 256 anchors per image).
        test_flip: at inference (:meth:`forward`, :meth:`candidates`), also run the
            horizontally mirrored images and add their boxes, mirrored back, to the
            candidates before post-processing (test-time augmentation; twice the network
            work). Training and the loss are unchanged.
    """

    anchors: Tensor
    pixel_mean: Tensor
    pixel_std: Tensor

    def __init__(
        self,
        backbone: nn.Module,
        anchor_generator: Any,
        head: nn.Module,
        postprocess: Any,
        image_size: Sequence[int],
        matcher: Any = None,
        clip_boxes: bool = True,
        sampler: MatchSampler | None = None,
        test_flip: bool = False,
    ) -> None:
        super().__init__()
        self.sampler = sampler
        self.test_flip = bool(test_flip)
        self.backbone = backbone
        self.anchor_generator = anchor_generator
        self.head = head
        self.postprocess = postprocess
        self.matcher = matcher
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.clip_boxes = clip_boxes
        mean = getattr(backbone, "mean", IMAGENET_MEAN)
        std = getattr(backbone, "std", IMAGENET_STD)
        # in 0..1 units: the input is divided by 255 first, as torchvision's detectors do
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.feature_sizes = self._probe_feature_sizes()
        grid = getattr(anchor_generator, "grid", None)
        self.anchor_grid = grid(self.feature_sizes) if grid is not None else None
        anchors = (
            self.anchor_grid.flat()
            if self.anchor_grid is not None
            else anchor_generator(self.feature_sizes)
        )
        self.register_buffer("anchors", anchors, persistent=False)
        bind = getattr(head, "bind_anchor_grid", None)
        if bind is not None:  # each anchor's grid cell, from the generator that laid them out
            bind(anchor_generator.cells(self.feature_sizes, anchors.device, anchors.dtype))
        # The matcher's tables of these anchors, per dtype, and the tensor (kept alive)
        # and version they were built from.
        self._overlaps: dict[torch.dtype, AnchorOverlaps] = {}
        self._overlaps_source: tuple[Tensor, int] | None = None
        if matcher is not None and self.anchors.device.type != "meta":  # meta: shapes only
            self.anchor_overlaps()

    @classmethod
    def build(
        cls,
        num_classes: int,
        image_size: Sequence[int],
        backbone: Mapping[str, Any],
        anchors: Mapping[str, Any],
        head: Mapping[str, Any],
        postprocess: Mapping[str, Any] | None = None,
        matcher: Mapping[str, Any] | None = None,
        clip_boxes: bool = True,
        test_flip: bool = False,
    ) -> Detector:
        """Build every part from ``{name: ..., **kwargs}`` specs, deriving the rest.

        ``image_size`` goes to the anchor generator, ``out_channels`` of the backbone
        and ``num_anchors_per_location()`` of the generator go to the head together
        with ``num_classes`` (object classes, without background).
        """
        size = (int(image_size[0]), int(image_size[1]))
        bb = build_component(BACKBONES, backbone)
        gen = build_component(ANCHORS, anchors, image_size=size)
        if len(bb.out_channels) != gen.num_levels:
            raise ConfigError(
                f"backbone {backbone.get('name')!r} gives {len(bb.out_channels)} feature levels "
                f"but the anchor generator is configured for {gen.num_levels} levels"
            )
        hd = build_component(
            HEADS,
            head,
            in_channels=list(bb.out_channels),
            num_anchors=gen.num_anchors_per_location(),
            num_classes=int(num_classes),
        )
        pp = build_component(POSTPROCESS, postprocess or {"name": "per_class"})
        spec = dict(matcher or {})
        sampling = spec.pop("sampling", None)
        mt = build_component(MATCHERS, spec) if matcher is not None else None
        sampler = MatchSampler(**sampling) if sampling else None
        return cls(
            bb,
            gen,
            hd,
            pp,
            size,
            matcher=mt,
            clip_boxes=clip_boxes,
            sampler=sampler,
            test_flip=test_flip,
        )

    @torch.no_grad()
    def _probe_feature_sizes(self) -> list[tuple[int, int]]:
        """The backbone's feature-map sizes for one input: computed on the meta device
        (shapes only, no arithmetic), or by a real forward pass for a backbone whose ops
        the meta device cannot run."""
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            try:
                tensors = {
                    **dict(self.backbone.named_parameters()),
                    **dict(self.backbone.named_buffers()),
                }
                meta = {k: torch.empty_like(v, device="meta") for k, v in tensors.items()}
                x = torch.zeros(1, 3, *self.image_size, device="meta")
                feats = torch.func.functional_call(self.backbone, meta, (x,))
            except (NotImplementedError, RuntimeError, TypeError, ValueError):
                feats = self.backbone(torch.zeros(1, 3, *self.image_size))
        finally:
            self.backbone.train(was_training)
        sizes = [(int(f.shape[-2]), int(f.shape[-1])) for f in feats]
        expected = self.anchor_generator.num_levels
        if len(sizes) != expected:
            raise ConfigError(
                f"the backbone gives {len(sizes)} feature maps {sizes} but the anchor generator "
                f"is configured for {expected} levels"
            )
        return sizes

    def anchor_overlaps(self, dtype: torch.dtype | None = None) -> AnchorOverlaps:
        """The matcher's tables of :attr:`anchors` (in ``dtype``, default theirs).

        Built from this detector's own anchors the first time they are asked for in a
        dtype, and rebuilt whenever the anchors buffer is another tensor (after
        ``.to()``, ``.double()``, an assignment) or was changed in place.
        """
        dtype = self.anchors.dtype if dtype is None else dtype
        source = (self.anchors, self.anchors._version)
        if (
            self._overlaps_source is None
            or self._overlaps_source[0] is not source[0]
            or self._overlaps_source[1] != source[1]
        ):
            self._overlaps, self._overlaps_source = {}, source
        found = self._overlaps.get(dtype)
        if found is None:
            # The grid's block structure holds while the anchors are the grid's own.
            shapes = self.anchor_grid.shapes if self._anchors_are_the_grids() else None
            found = self._overlaps[dtype] = AnchorOverlaps(self.anchors.detach().to(dtype), shapes)
        return found

    def _anchors_are_the_grids(self) -> bool:
        # corners clipped: centres no longer evenly spaced, the dense path
        if self.anchor_grid is None or self.anchor_grid.clip not in (False, "size"):
            return False
        if self.anchors.shape[0] != self.anchor_grid.num_anchors:
            return False
        # the buffer as built (float32), then moved or cast with the module
        flat = self.anchor_grid.flat().to(device=self.anchors.device, dtype=self.anchors.dtype)
        return bool(torch.equal(flat, self.anchors))

    def _apply(self, fn, recurse: bool = True):
        """Moves or casts the module; the anchors' tables are rebuilt for the new anchors."""
        out = super()._apply(fn, recurse)
        self._overlaps, self._overlaps_source = {}, None
        return out

    def normalize(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` uint8 or float in 0..255 -> the backbone's normalised float input,
        ``(images / 255 - mean) / std`` (in the order torchvision computes it, so that
        converted torchvision models see bit-identical inputs)."""
        if images.shape[-2:] != self.image_size:
            raise ValueError(
                f"images are {tuple(images.shape[-2:])} but the detector was built for "
                f"{self.image_size}; resize them (the data pipeline does)"
            )
        x = images.to(self.pixel_mean.dtype) / 255.0
        return (x - self.pixel_mean) / self.pixel_std

    def raw(self, images: Tensor) -> dict[str, Tensor]:
        """The head's raw outputs for ``images`` ``[B, 3, H, W]`` (``cls_logits``, ``box_deltas``, ...)."""
        return self.head(self.backbone(self.normalize(images)))

    def decode(self, outputs: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``scores [B, A, C+1]`` and boxes ``[B, A, 4]`` xyxy normalised from raw outputs.

        In float32 (or wider) with autocast off, whatever precision the network ran in:
        bfloat16 holds 8 bits of mantissa, about 1/256 of the image at a box edge near the
        right or bottom side, and ties the scores that average precision ranks.
        """
        exact = {k: _widened(v) for k, v in outputs.items()}
        device = next(iter(exact.values())).device if exact else self.anchors.device
        off = torch.autocast(device.type, enabled=False) if device.type != "meta" else nullcontext()
        with off:
            scores = self.head.scores(exact)
            boxes = convert(self.head.decode_boxes(exact, self.anchors), "cxcywh", "xyxy")
            if self.clip_boxes:
                boxes = boxes.clamp(0.0, 1.0)
        return scores, boxes

    def candidates(
        self, images: Tensor, outputs: Mapping[str, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        """What post-processing chooses from: ``scores [B, N, C+1]`` and boxes ``[B, N, 4]``
        xyxy normalised, N = A, or 2A with :attr:`test_flip` (the anchors' candidates of
        ``images``, then those of the mirrored images with their boxes mirrored back).

        ``outputs``: :meth:`raw` of ``images`` when the caller has it already.
        """
        scores, boxes = self.decode(self.raw(images) if outputs is None else outputs)
        if not self.test_flip:
            return scores, boxes
        flip_scores, flip_boxes = self.decode(self.raw(images.flip(-1)))
        x1, y1, x2, y2 = flip_boxes.unbind(-1)
        mirrored = torch.stack((1 - x2, y1, 1 - x1, y2), dim=-1)
        return torch.cat((scores, flip_scores), dim=1), torch.cat((boxes, mirrored), dim=1)

    def forward(self, images: Tensor) -> list[Tensor]:
        """Detections per image: list of ``[k, 6]`` (label, score, x1, y1, x2, y2) normalised."""
        return self.postprocess(*self.candidates(images))

    def loss(
        self, outputs: Mapping[str, Tensor], gt_boxes: Tensor, gt_labels: Tensor, gt_mask: Tensor
    ) -> dict[str, Tensor]:
        """Match the batch to the anchors and return the head's named losses (total in ``loss``).

        Args:
            outputs: from :meth:`raw`.
            gt_boxes: ``[B, G, 4]`` xyxy normalised; gt_labels ``[B, G]`` (1..C);
            gt_mask: ``[B, G]`` bool (False on padding).
        """
        if self.matcher is None:
            raise RuntimeError("this Detector was built without a matcher; pass matcher=...")
        anchors: Tensor | AnchorOverlaps = self.anchors
        if isinstance(self.matcher, Matcher):  # the tables this detector owns
            anchors = self.anchor_overlaps(gt_boxes.dtype)
        matches = self.matcher(gt_boxes, gt_mask, anchors)
        if self.sampler is not None:
            matches = self.sampler(matches)
        return self.head.loss(outputs, matches, gt_boxes, gt_labels, self.anchors)
