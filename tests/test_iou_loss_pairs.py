"""ssdlit.heads.iou_losses against torchvision.ops, pair by pair: the same values and
gradients for overlapping, nested, touching, disjoint and identical boxes (torchvision
finds the overlap with a boolean mask, a host read on a GPU; ssdlit clamps)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.ops import complete_box_iou_loss, distance_box_iou_loss, generalized_box_iou_loss

from ssdlit.heads.iou_losses import IOU_LOSSES, iou_loss

TORCHVISION = {
    "giou": generalized_box_iou_loss,
    "diou": distance_box_iou_loss,
    "ciou": complete_box_iou_loss,
}


def boxes_from(values: list[float]) -> torch.Tensor:
    """``[N, 4]`` float64 xyxy from groups of (x, y, w, h), sizes kept positive."""
    t = torch.tensor(values, dtype=torch.float64).view(-1, 4)
    return torch.cat((t[:, :2], t[:, :2] + t[:, 2:].clamp(min=1e-3)), dim=1)


def compare(kind: str, pred: torch.Tensor, target: torch.Tensor, dtype=torch.float64) -> None:
    ours_in = pred.to(dtype).clone().requires_grad_()
    theirs_in = pred.to(dtype).clone().requires_grad_()
    ours = iou_loss(kind, ours_in, target.to(dtype))
    theirs = TORCHVISION[kind](theirs_in, target.to(dtype), reduction="none")
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {}
    torch.testing.assert_close(ours, theirs, **tol)
    ours.sum().backward()
    theirs.sum().backward()
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, **tol)


coords = st.floats(0.0, 1.0, allow_nan=False)
sizes = st.floats(1e-3, 1.0, allow_nan=False)
box = st.tuples(coords, coords, sizes, sizes)


@pytest.mark.parametrize("kind", IOU_LOSSES)
@settings(max_examples=60, deadline=None)
@given(pairs=st.lists(st.tuples(box, box), min_size=1, max_size=12))
def test_values_and_gradients_equal_torchvision(kind, pairs):
    pred = boxes_from([v for p, _ in pairs for v in p])
    target = boxes_from([v for _, t in pairs for v in t])
    compare(kind, pred, target)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", IOU_LOSSES)
def test_hand_cases_equal_torchvision(kind, dtype):
    target = torch.tensor([[0.2, 0.2, 0.6, 0.6]] * 5, dtype=torch.float64)
    pred = torch.tensor(
        [
            [0.2, 0.2, 0.6, 0.6],  # identical: 0
            [0.3, 0.3, 0.5, 0.5],  # nested
            [0.4, 0.1, 0.9, 0.5],  # overlapping
            [0.6, 0.2, 0.9, 0.6],  # touching along x = 0.6: no overlap
            [0.7, 0.7, 0.9, 0.95],  # disjoint
        ],
        dtype=torch.float64,
    )
    compare(kind, pred, target, dtype)
    loss = iou_loss(kind, pred, target)
    assert loss[0].item() == pytest.approx(0.0, abs=1e-6)
    assert (loss[3:] >= 1.0).all()  # no overlap: 1 - 0 + a non-negative penalty


def test_shapes_follow_the_boxes_and_unknown_kinds_are_refused():
    pred = torch.rand(2, 3, 2) * 0.5
    pred = torch.cat((pred, pred + 0.3), dim=-1)  # [2, 3, 4]
    assert iou_loss("giou", pred, pred.flip(0)).shape == (2, 3)
    with pytest.raises(ValueError, match="unknown IoU loss 'iou'"):
        iou_loss("iou", pred, pred)
