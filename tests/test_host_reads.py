"""The GPU path of matching, box coding and the IoU losses makes no host read.

On a GPU, ``.item()``, ``nonzero``, boolean-mask indexing and tensors made from Python
data (a host-to-device copy) each make the host wait for the device. The training step
may read the host once (the loss's gather sizes); ``benchmarks/gpu.py --check-syncs``
checks that on a CUDA machine. This CPU test guards the parts that run the same code on
every device (the dense matching path that accelerators take, the box coder, the IoU
losses) by the aten ops they dispatch: none of them may be one that reads the host on
a GPU (:func:`host_reads`).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ssdlit.anchors import SSDAnchorGenerator
from ssdlit.anchors.matching import FasterRCNNMatcher, YOLOv3Matcher
from ssdlit.anchors.matching.overlaps import AnchorOverlaps, masked_iou
from ssdlit.anchors.matching.reference import ssd_match
from ssdlit.boxes import BoxCoder, convert
from ssdlit.heads.iou_losses import IOU_LOSSES, iou_loss

#: Ops that read the host, or copy from it, whatever their arguments.
READS = {"_local_scalar_dense", "item", "nonzero", "masked_select", "lift_fresh", "unique"}


class HostReads(TorchDispatchMode):
    """Records the ops that would make the host wait on a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        indices = [i for a in args if isinstance(a, (list, tuple)) for i in a]
        if name in READS:
            self.found.append(str(func))
        elif name.startswith(("index", "index_put")) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices
        ):
            self.found.append(f"{func} with a boolean mask")  # a nonzero inside
        elif name.startswith("index_put") and len(tensors) > 1 and tensors[-1].dim() == 0:
            self.found.append(f"{func} of a scalar")  # `t[idx] = 1.0`: a copy from the host
        return func(*args, **(kwargs or {}))


def host_reads(fn) -> list[str]:
    with HostReads() as mode:
        fn()
    return mode.found


def batch(b: int = 3, g: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(b, g, 2, generator=gen) * 0.6
    boxes = torch.cat((xy, xy + torch.rand(b, g, 2, generator=gen) * 0.35 + 0.05), dim=-1)
    mask = torch.ones(b, g, dtype=torch.bool)
    mask[1, 2:] = False  # padding
    mask[2] = False  # an image without objects
    boxes[~mask] = 0.0
    return boxes, mask


def test_the_recorder_sees_what_reads_the_host():
    t = torch.rand(4, 3)
    assert host_reads(lambda: t[t > 0.5])  # a boolean mask
    assert host_reads(lambda: t.sum().item())
    assert host_reads(lambda: torch.tensor([0.1, 0.2]))
    idx = torch.tensor([0, 2])

    def assign():
        t[idx, :] = -1.0

    assert host_reads(assign)
    assert host_reads(lambda: t.scatter_(0, idx[:, None].expand(2, 3), -1.0)) == []


@pytest.fixture(scope="module")
def overlaps() -> AnchorOverlaps:
    gen = SSDAnchorGenerator(
        image_size=(64, 64), scales=[0.2, 0.45, 0.7, 0.9], aspect_ratios=[[1, 2]] * 3
    )
    grid = gen.grid([(8, 8), (4, 4), (2, 2)])
    tables = AnchorOverlaps(grid.flat(), grid.shapes)
    boxes, mask = batch()
    masked_iou(boxes, mask, tables)  # made once per detector: outside the step
    return tables


def test_dense_matching_reads_nothing(overlaps):
    boxes, mask = batch()
    for rule in ("multi", "bipartite"):
        assert host_reads(lambda r=rule: ssd_match(masked_iou(boxes, mask, overlaps), r)) == []
    assert (
        host_reads(lambda: FasterRCNNMatcher().match(boxes, mask, overlaps.anchors, overlaps)) == []
    )


def test_yolov3_matching_reads_nothing(overlaps):
    boxes, mask = batch()
    matcher = YOLOv3Matcher()
    matcher.match(boxes, mask, overlaps.anchors, overlaps)  # the priors' tables, once
    assert host_reads(lambda: matcher.match(boxes, mask, overlaps.anchors, overlaps)) == []


def test_box_coder_reads_nothing_after_its_first_call():
    coder = BoxCoder()
    anchors = torch.rand(10, 4) * 0.5 + 0.2
    coder.decode(torch.zeros(10, 4), anchors)  # the variances, once per dtype and device
    gt = convert(torch.tensor([[0.1, 0.1, 0.5, 0.6]]).expand(10, 4), "xyxy", "cxcywh")
    assert host_reads(lambda: coder.decode(coder.encode(gt, anchors), anchors)) == []


@pytest.mark.parametrize("kind", IOU_LOSSES)
def test_iou_losses_read_nothing_forward_or_backward(kind):
    pred = torch.rand(6, 2) * 0.5
    pred = torch.cat((pred, pred + 0.3), dim=1).requires_grad_()
    target = pred.detach().roll(1, dims=0)

    def step():
        iou_loss(kind, pred, target).sum().backward()

    assert host_reads(step) == []
