"""ssdlit.transfer: class sub-sampling and init from a checkpoint with other classes.

Tiny detectors (SSD7 with narrow blocks at 64x64, 4 anchors per location) of every head
with class outputs: a model of 4 classes sub-sampled to ``keep`` loads strictly into a
model of ``len(keep)`` classes, whose logits for background / the class-independent
values and the kept classes equal the old model's exactly.
"""

from __future__ import annotations

import pytest
import torch

from ssdlit.detector import Detector
from ssdlit.transfer import (
    class_outputs,
    infer_class_outputs,
    subsample_classes,
    transfer_classes,
)

SIZE = (64, 64)
BACKBONE = {"name": "ssd7", "widths": [8, 8, 8, 8, 8, 8, 8], "num_outputs": 4}
ANCHORS = {
    "name": "ssd",
    "scales": [0.1, 0.2, 0.4, 0.6, 0.9],
    "aspect_ratios": [1.0, 2.0, 0.5],
    "two_boxes_for_ar1": True,
}
HEADS = {
    "ssd": {"name": "ssd"},
    "ssdlite": {"name": "ssdlite"},
    "retina": {"name": "retina", "channels": 8, "num_convs": 1},
    "yolo": {"name": "yolo", "hidden_channels": 8},
}
#: Columns of ``cls_logits`` per anchor before class 1 (see ssdlit.transfer).
FIXED = {"ssd": 1, "ssdlite": 1, "retina": 0, "yolo": 1}


def detector(head: str, num_classes: int, seed: int) -> Detector:
    torch.manual_seed(seed)
    det = Detector.build(
        num_classes=num_classes,
        image_size=SIZE,
        backbone=BACKBONE,
        anchors=ANCHORS,
        head=HEADS[head],
    ).eval()
    with torch.no_grad():  # biases off their constant init, so every row differs
        for p in det.head.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return det


def images() -> torch.Tensor:
    return torch.randint(0, 256, (2, 3, *SIZE), generator=torch.Generator().manual_seed(0))


def columns(head: str, labels: list[int]) -> list[int]:
    """``cls_logits`` columns of the class-independent values and of ``labels``."""
    fixed = FIXED[head]
    return list(range(fixed)) + [fixed + label - 1 for label in labels]


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("infer", [True, False], ids=["from_keys", "from_head"])
def test_subsample_keeps_the_logits_of_the_kept_classes(head: str, infer: bool) -> None:
    old = detector(head, 4, seed=0)
    keep = [3, 1]
    state = old.state_dict()
    if infer:
        sub = subsample_classes(state, keep, num_classes=4 if head == "yolo" else None)
    else:
        sub = subsample_classes(state, keep, head=old.head)
    new = detector(head, len(keep), seed=1)
    new.load_state_dict(sub, strict=True)
    x = images()
    with torch.no_grad():
        a, b = old.raw(x), new.raw(x)
    assert torch.equal(b["cls_logits"], a["cls_logits"][..., columns(head, keep)])
    assert torch.equal(b["box_deltas"], a["box_deltas"])
    # The scores: background (where the head has one) and the kept classes' logits are the
    # old ones; the softmax renormalises over fewer classes, the sigmoids do not.
    if head in ("retina", "yolo"):
        sa, sb = old.head.scores(a), new.head.scores(b)
        assert torch.allclose(sb[..., 1:], sa[..., keep], atol=0, rtol=1e-6)


def test_every_class_output_is_found_and_nothing_else() -> None:
    for head in HEADS:
        det = detector(head, 4, seed=0)
        found = {o.key for o in class_outputs(det.head)}
        # Exactly the parameters whose shape depends on the number of classes.
        other = detector(head, 2, seed=0)
        changed = {
            k
            for k, v in det.head.state_dict().items()
            if v.shape != other.head.state_dict()[k].shape
        }
        assert found == changed, head
        inferred = {
            o.key.removeprefix("head.")
            for o in infer_class_outputs(det.state_dict(), num_classes=4)
        }
        assert inferred == changed, head


def test_keep_is_checked() -> None:
    state = detector("ssd", 4, seed=0).state_dict()
    for bad in ([], [1, 1], [5], [0]):
        with pytest.raises(ValueError):
            subsample_classes(state, bad)


@pytest.mark.parametrize("head", list(HEADS))
def test_transfer_keeps_rows_by_name_and_new_classes_fresh(head: str) -> None:
    old = detector(head, 3, seed=0)  # cat, dog, cow
    new = detector(head, 3, seed=1)  # dog, bird, cat
    fresh = {k: v.clone() for k, v in new.state_dict().items()}
    done = transfer_classes(
        new, old.state_dict(), ["cat", "dog", "cow"], ["dog", "bird", "cat"], new.head, "head."
    )
    assert done["kept"] == ["dog", "cat"] and done["new"] == ["bird"]
    assert done["dropped"] == ["cow"]
    x = images()
    with torch.no_grad():
        a, b = old.raw(x)["cls_logits"], new.raw(x)["cls_logits"]
    # dog (new 1) = old 2, cat (new 3) = old 1, and the class-independent columns.
    assert torch.equal(b[..., columns(head, [1, 3])], a[..., columns(head, [2, 1])])
    # bird keeps the new model's own rows.
    for out in class_outputs(new.head):
        key = "head." + out.key
        rows = new.state_dict()[key].reshape(out.anchors, -1, *fresh[key].shape[1:])
        own = fresh[key].reshape(out.anchors, -1, *fresh[key].shape[1:])
        assert torch.equal(rows[:, out.fixed + 1], own[:, out.fixed + 1])


def test_transfer_refuses_another_network() -> None:
    old = detector("ssd", 3, seed=0)
    new = detector("ssdlite", 3, seed=0)
    with pytest.raises(ValueError, match="differs"):
        transfer_classes(new, old.state_dict(), ["a", "b", "c"], ["a", "b", "c"], new.head, "head.")
