"""The Faster R-CNN sampler: counts, determinism, and its place after the matcher."""

from __future__ import annotations

import pytest
import torch

from ssdlit.anchors.matching import BACKGROUND, IGNORE, MatchSampler
from ssdlit.detector import Detector
from tests.spies import record_matches


def _matches(b: int = 3, a: int = 500, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.full((b, a), BACKGROUND)
    r = torch.rand(b, a, generator=g)
    m[r < 0.3] = IGNORE
    m[r > 0.9] = 0
    m[0, :] = torch.where(m[0] >= 0, BACKGROUND, m[0])  # image 0: no positive
    m[2, :400] = torch.where(m[2, :400] == IGNORE, 1, m[2, :400])  # image 2: many positives
    return m


@pytest.mark.parametrize(("size", "fraction"), [(256, 0.5), (64, 0.25), (1000, 1.0)])
def test_sampled_counts_follow_the_paper(size, fraction):
    m = _matches()
    torch.manual_seed(1)
    out = MatchSampler(size, fraction)(m)
    for i in range(m.shape[0]):
        pos, neg = int((m[i] >= 0).sum()), int((m[i] == BACKGROUND).sum())
        kept_pos, kept_neg = int((out[i] >= 0).sum()), int((out[i] == BACKGROUND).sum())
        assert kept_pos == min(pos, int(size * fraction))
        assert kept_neg == min(neg, size - kept_pos)
    # nothing changes label: kept entries keep theirs, the rest are ignored
    changed = out != m
    assert (out[changed] == IGNORE).all()
    assert (out[m == IGNORE] == IGNORE).all()


def test_sampling_is_random_and_deterministic_under_the_seed():
    m = _matches()
    sampler = MatchSampler(64, 0.5)
    torch.manual_seed(3)
    first = sampler(m)
    torch.manual_seed(3)
    assert torch.equal(sampler(m), first)
    assert not torch.equal(sampler(m), first)  # a later draw picks other anchors
    g = torch.Generator().manual_seed(5)
    assert torch.equal(sampler(m, g), sampler(m, torch.Generator().manual_seed(5)))


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="size"):
        MatchSampler(0)
    with pytest.raises(ValueError, match="positive_fraction"):
        MatchSampler(16, 1.5)


def test_the_detector_samples_after_its_matcher():
    det = Detector.build(
        num_classes=2,
        image_size=(64, 64),
        backbone={"name": "ssd7", "widths": [8, 8, 8, 8, 8, 8, 8]},
        anchors={"name": "ssd", "scales": [0.1, 0.2, 0.4, 0.7, 1.0], "aspect_ratios": [1.0, 2.0]},
        head={"name": "ssd"},
        matcher={"name": "faster_rcnn", "sampling": {"size": 32, "positive_fraction": 0.25}},
    )
    assert isinstance(det.sampler, MatchSampler) and det.sampler.size == 32
    boxes = torch.tensor([[[0.1, 0.1, 0.6, 0.6], [0.5, 0.4, 0.9, 0.9]]]).repeat(2, 1, 1)
    labels, mask = torch.tensor([[1, 2], [2, 1]]), torch.ones(2, 2, dtype=torch.bool)
    seen = record_matches(det)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    out = det.loss(det.raw(images), boxes, labels, mask)
    assert torch.isfinite(out["loss"])
    used = seen["matches"]
    assert ((used >= 0).sum(1) <= 8).all() and (used != IGNORE).sum(1).tolist() == [32, 32]
