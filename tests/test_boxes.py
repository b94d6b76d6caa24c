import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssdlit.boxes import BoxCoder, box_iou, convert

coord = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, width=64)
size = st.floats(min_value=1e-3, max_value=1e3, allow_nan=False, width=64)


@st.composite
def xyxy_boxes(draw, max_n=8):
    count = draw(st.integers(1, max_n))
    rows = []
    for _ in range(count):
        x, y, w, h = draw(coord), draw(coord), draw(size), draw(size)
        rows.append([x, y, x + w, y + h])
    return torch.tensor(rows, dtype=torch.float64)


@given(xyxy_boxes())
def test_conversions_round_trip(boxes):
    for fmt in ("cxcywh", "xxyy"):
        back = convert(convert(boxes, "xyxy", fmt), fmt, "xyxy")
        torch.testing.assert_close(back, boxes, rtol=1e-12, atol=1e-9)
    via = convert(convert(boxes, "xyxy", "xxyy"), "xxyy", "cxcywh")
    torch.testing.assert_close(via, convert(boxes, "xyxy", "cxcywh"), rtol=1e-12, atol=1e-9)


@given(xyxy_boxes())
def test_conversion_meanings(boxes):
    c = convert(boxes, "xyxy", "cxcywh")
    torch.testing.assert_close(c[:, 2], boxes[:, 2] - boxes[:, 0])
    torch.testing.assert_close(c[:, 0], (boxes[:, 0] + boxes[:, 2]) / 2)
    m = convert(boxes, "xyxy", "xxyy")
    assert torch.equal(m, boxes[:, [0, 2, 1, 3]])


def test_conversion_keeps_leading_shape_and_rejects_bad_input():
    b = torch.rand(2, 3, 5, 4)
    assert convert(b, "cxcywh", "xxyy").shape == b.shape
    with pytest.raises(ValueError, match="format"):
        convert(b, "xyxy", "xywh")
    with pytest.raises(ValueError, match="4 numbers"):
        convert(torch.rand(3, 5), "xyxy", "cxcywh")


def naive_iou(a, b):
    out = torch.zeros(len(a), len(b), dtype=torch.float64)
    for i, p in enumerate(a.tolist()):
        for j, q in enumerate(b.tolist()):
            iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
            ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
            inter = iw * ih
            union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
            out[i, j] = inter / union if union > 0 else 0.0
    return out


@given(xyxy_boxes(), xyxy_boxes())
def test_iou_matches_naive_loop_and_batched_form(a, b):
    expected = naive_iou(a, b)
    torch.testing.assert_close(box_iou(a, b), expected, rtol=1e-9, atol=1e-9)
    batched = box_iou(torch.stack([a, a]), b)
    torch.testing.assert_close(batched, torch.stack([expected, expected]), rtol=1e-9, atol=1e-9)
    assert ((batched >= 0) & (batched <= 1 + 1e-12)).all()


def test_coder_exact_values():
    anchor = torch.tensor([[0.5, 0.5, 0.2, 0.1]], dtype=torch.float64)
    gt = torch.tensor([[0.52, 0.47, 0.4, 0.05]], dtype=torch.float64)
    d = BoxCoder((0.1, 0.1, 0.2, 0.2)).encode(gt, anchor)
    expected = [0.02 / (0.2 * 0.1), -0.03 / (0.1 * 0.1), math.log(2) / 0.2, math.log(0.5) / 0.2]
    torch.testing.assert_close(d[0], torch.tensor(expected, dtype=torch.float64))
    d2 = BoxCoder((1, 1, 1, 1)).encode(gt, anchor)
    torch.testing.assert_close(
        d2[0], torch.tensor([0.1, -0.3, math.log(2), math.log(0.5)], dtype=torch.float64)
    )


@settings(max_examples=200)
@given(
    st.floats(-50, 50),
    st.floats(-50, 50),
    st.floats(1e-6, 1e4),  # tiny to huge box sizes relative to the anchor ...
    st.floats(1e-6, 1e4),
    st.floats(1e-3, 1.0),  # ... and anchor sizes
    st.floats(1e-3, 1.0),
)
def test_encode_decode_round_trip(cx, cy, w, h, aw, ah):
    coder = BoxCoder(max_log_scale=math.log(1e5))
    anchors = torch.tensor([[0.5, 0.5, aw, ah]], dtype=torch.float64)
    gt = torch.tensor([[cx, cy, w * aw, h * ah]], dtype=torch.float64)
    back = coder.decode(coder.encode(gt, anchors), anchors)
    torch.testing.assert_close(back, gt, rtol=1e-9, atol=1e-12)


@given(xyxy_boxes(), st.data())
def test_round_trip_broadcasts_over_batch(boxes, data):
    coder = BoxCoder()
    gt = convert(boxes, "xyxy", "cxcywh")
    n = len(gt)
    # Anchors centred elsewhere (the boxes in reverse order), each side within a factor
    # e^4 of its gt's: log(gt / anchor) stays below the coder's clamp, log(1000 / 16).
    log_scale = data.draw(st.lists(st.floats(-4.0, 4.0), min_size=2 * n, max_size=2 * n))
    scale = torch.tensor(log_scale, dtype=torch.float64).reshape(n, 2).exp()
    anchors = torch.cat((gt.flip(0)[:, :2], gt[:, 2:] * scale), dim=1)
    assert (gt[:, 2:] / anchors[:, 2:]).log().max() < coder.max_log_scale
    gt_b = gt.expand(3, -1, -1)  # [3, N, 4] against [N, 4]
    torch.testing.assert_close(
        coder.decode(coder.encode(gt_b, anchors), anchors), gt_b, rtol=1e-9, atol=1e-9
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_decode_never_overflows(dtype):
    anchors = torch.tensor([[0.5, 0.5, 0.9, 0.9]], dtype=dtype)
    deltas = torch.tensor([[1e4, -1e4, 1e4, 1e4]], dtype=dtype)
    boxes = BoxCoder().decode(deltas, anchors)
    assert torch.isfinite(boxes).all()
    assert boxes[0, 2].item() == pytest.approx(0.9 * 1000 / 16, rel=1e-2)


def test_bad_variances():
    with pytest.raises(ValueError):
        BoxCoder((0.1, 0.1, 0.2))
    with pytest.raises(ValueError):
        BoxCoder((0.1, 0.0, 0.2, 0.2))


def test_coder_variances_are_made_once_per_dtype_and_device_and_not_pickled():
    """The variances tensor is cached (copying it from the host every step would be a
    host-device synchronisation on a GPU); one made while validating, in inference
    mode, can still be saved for backward while training."""
    import pickle

    coder = BoxCoder((0.1, 0.1, 0.2, 0.2))
    anchors = torch.tensor([[0.5, 0.5, 0.2, 0.4]])
    with torch.inference_mode():
        coder.decode(torch.zeros(1, 4), anchors)  # validation first: the cache is filled
    deltas = torch.tensor([[0.1, -0.2, 0.3, 0.1]], requires_grad=True)
    coder.decode(deltas, anchors).sum().backward()  # fails with an inference tensor
    assert deltas.grad is not None and torch.isfinite(deltas.grad).all()
    assert coder._var(deltas) is coder._var(torch.zeros(2))  # made once for float32 / cpu
    assert coder._var(deltas.double()).dtype == torch.float64
    copy = pickle.loads(pickle.dumps(coder))
    assert copy.variances == coder.variances and copy._vars == {}
