import pytest
import torch

from ssdlit.anchors import SSDAnchorGenerator, anchor_coverage, kmeans_anchors, shape_iou


def test_kmeans_finds_planted_clusters_deterministically():
    g = torch.Generator().manual_seed(1)
    centres = torch.tensor([[0.05, 0.05], [0.2, 0.4], [0.6, 0.3]])
    wh = torch.cat([c * (1 + 0.03 * torch.randn(50, 2, generator=g)) for c in centres])
    found = kmeans_anchors(wh, 3, seed=7)
    torch.testing.assert_close(found, centres, atol=0.02, rtol=0.05)  # sorted by area
    assert torch.equal(found, kmeans_anchors(wh, 3, seed=7))
    assert found.dtype == torch.float32


def test_kmeans_validates():
    with pytest.raises(ValueError):
        kmeans_anchors(torch.rand(2, 2) + 0.1, 3)
    with pytest.raises(ValueError):
        kmeans_anchors(torch.tensor([[0.1, 0.0], [0.2, 0.2]]), 1)


def test_shape_iou():
    iou = shape_iou(torch.tensor([[2.0, 2.0]]), torch.tensor([[2.0, 2.0], [1.0, 4.0], [4.0, 4.0]]))
    torch.testing.assert_close(iou, torch.tensor([[1.0, 2 / 6, 0.25]]))


def test_anchor_coverage_reports_reachable_and_unreachable_boxes():
    anchors = SSDAnchorGenerator.ssd300()([(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)])
    good = torch.tensor([[0.1, 0.1, 0.4, 0.4], [0.0, 0.0, 1.0, 1.0]])
    cov = anchor_coverage(good, anchors)
    assert cov.recall == 1.0 and cov.num_boxes == 2 and cov.mean_best_iou > 0.7
    sliver = torch.tensor([[0.5, 0.1, 0.505, 0.9]])  # 1.5 px wide, 240 px tall: nothing fits
    bad = anchor_coverage(torch.cat([good, sliver]), anchors, chunk=1)
    assert bad.recall == pytest.approx(2 / 3)
    assert bad.best_iou[2] < 0.1
    assert "of 3 boxes" in str(bad)
    assert anchor_coverage(torch.zeros(0, 4), anchors).num_boxes == 0
