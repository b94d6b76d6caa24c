"""Settings derived from the training data (:mod:`ssdlit.fitting`) and the step-time
measurement behind the epochs of a time budget (:mod:`ssdlit.training.calibration`)."""

from __future__ import annotations

import math

import pytest
import torch

from ssdlit.anchors.kmeans import anchor_coverage
from ssdlit.detector import build_component
from ssdlit.fitting import (
    MARGIN,
    box_sizes_and_ratios,
    feature_sizes,
    fit_anchors,
    fit_epochs,
    fit_max_zoom,
    fit_to_data,
)
from ssdlit.registry import ANCHORS

BACKBONE = {"name": "ssd7", "widths": [8, 8, 8, 8, 8, 8, 8]}
ANCHORS_SPEC = {
    "name": "ssd",
    "scales": [0.08, 0.16, 0.32, 0.64, 0.96],
    "aspect_ratios": [1.0, 2.0, 0.5],
    "two_boxes_for_ar1": True,
}
SIZE = (128, 128)


def boxes_of(sizes, ratios, seed=0):
    """xyxy normalised boxes of side ``sqrt(w h) = size`` and ``w / h = ratio``, placed at
    random centres (inside the image)."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.as_tensor(sizes, dtype=torch.float64)
    r = torch.as_tensor(ratios, dtype=torch.float64)
    w, h = s * r.sqrt(), s / r.sqrt()
    cx = w / 2 + torch.rand(len(s), generator=gen, dtype=torch.float64) * (1 - w).clamp(min=0)
    cy = h / 2 + torch.rand(len(s), generator=gen, dtype=torch.float64) * (1 - h).clamp(min=0)
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=1).float()


def test_sizes_and_ratios_are_in_the_units_of_the_ssd_scales():
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.25], [0.1, 0.1, 0.3, 0.3]])
    sizes, ratios = box_sizes_and_ratios(boxes, (100, 200))  # H 100, W 200
    # 100 x 25 px and 40 x 20 px, over the shorter side 100
    torch.testing.assert_close(
        sizes, torch.tensor([50.0, math.sqrt(800)], dtype=torch.float64) / 100
    )
    torch.testing.assert_close(ratios, torch.tensor([4.0, 2.0], dtype=torch.float64))


def test_feature_sizes_come_from_the_backbone_without_computing():
    assert feature_sizes(BACKBONE, SIZE) == [(16, 16), (8, 8), (4, 4), (2, 2)]


def test_fitted_anchors_follow_the_boxes_and_reach_them():
    """Large, wide boxes: the fitted scales sit within their sizes, the ratio near theirs, and
    the fitted anchors cover them better than the configured ones."""
    gen = torch.Generator().manual_seed(1)
    sizes = 0.45 + 0.4 * torch.rand(200, generator=gen)
    ratios = 1.6 * torch.exp(0.1 * torch.randn(200, generator=gen))
    boxes = boxes_of(sizes, ratios)
    fit = fit_anchors(boxes, ANCHORS_SPEC, BACKBONE, SIZE)
    assert len(fit.scales) == 5 and fit.scales == sorted(fit.scales)
    assert 0.4 <= fit.scales[0] <= 0.6 and fit.scales[3] <= 0.9
    assert [len(level) for level in fit.aspect_ratios] == [3] * 4  # anchors per cell kept
    assert all(level[0] == 1.0 for level in fit.aspect_ratios)
    assert 1.25 <= max(fit.aspect_ratios[0]) <= 2.0
    assert fit.mean_best_iou > fit.configured["mean_best_iou"]
    assert fit.recall >= fit.configured["recall"] - 0.02
    # the reported numbers are the coverage of the fitted spec's anchors on the real grid
    spec = {**ANCHORS_SPEC, "scales": fit.scales, "aspect_ratios": fit.aspect_ratios}
    anchors = build_component(ANCHORS, spec, image_size=SIZE)(feature_sizes(BACKBONE, SIZE))
    cov = anchor_coverage(boxes, anchors)
    assert cov.mean_best_iou == pytest.approx(fit.mean_best_iou)
    assert cov.recall == pytest.approx(fit.recall)
    assert "anchors fitted to the training boxes" in fit.summary()


def test_a_few_outliers_do_not_stretch_the_scales():
    sizes = torch.cat((torch.full((196,), 0.6), torch.tensor([0.05, 0.05, 0.06, 0.06])))
    fit = fit_anchors(boxes_of(sizes, torch.ones(200)), ANCHORS_SPEC, BACKBONE, SIZE)
    assert fit.scales[0] > 0.3  # not pulled down to the 2% of tiny boxes


def test_fitting_refuses_what_it_cannot_fit():
    with pytest.raises(ValueError, match="'ssd' anchor generator"):
        fit_anchors(torch.rand(3, 4), {"name": "retina"}, BACKBONE, SIZE)
    with pytest.raises(ValueError, match="no training boxes"):
        fit_anchors(torch.zeros(0, 4), ANCHORS_SPEC, BACKBONE, SIZE)


def test_max_zoom_brings_the_median_box_to_the_smallest_anchor():
    boxes = boxes_of(torch.full((9,), 0.6), torch.ones(9))
    assert fit_max_zoom(boxes, SIZE, 0.3) == pytest.approx(2.0)
    assert fit_max_zoom(boxes, SIZE, 0.05) == 4.0  # the paper's range at most
    assert fit_max_zoom(boxes, SIZE, 0.9) == 1.0  # never a zoom in


def test_epochs_fit_the_budget():
    # 10 steps of 1 s and a 5 s validation every 2 epochs: 12.5 s an epoch; 80% of 1000 s
    assert fit_epochs(1000, 10, 1.0, 5.0, 2, margin=0.8) == 64
    assert fit_epochs(1000, 10, 1.0, 5.0, 2) == math.floor(MARGIN * 1000 / 12.5)
    assert fit_epochs(1, 10, 1.0) == 1
    assert fit_epochs(1e9, 10, 1.0, max_epochs=300) == 300


def test_fit_to_data_gives_config_updates_and_lines():
    boxes = boxes_of(torch.full((50,), 0.5), torch.ones(50))
    updates, lines = fit_to_data(
        {"anchors": True, "max_zoom": True},
        boxes,
        anchors=ANCHORS_SPEC,
        backbone=BACKBONE,
        image_size=SIZE,
    )
    assert set(updates) == {"anchors", "anchor_fit", "augment"}
    zoom = updates["augment"]["train"]["max_zoom"]
    assert zoom == fit_max_zoom(boxes, SIZE, updates["anchors"]["scales"][0])
    assert len(lines) == 2 and "zoom out up to" in lines[1]
    only_zoom, _ = fit_to_data(
        {"max_zoom": True}, boxes, anchors=ANCHORS_SPEC, backbone=BACKBONE, image_size=SIZE
    )
    assert only_zoom == {"augment": {"train": {"max_zoom": fit_max_zoom(boxes, SIZE, 0.08)}}}


def _timing_module_and_batch():
    from ssdlit.module import DetectionModule

    module = DetectionModule(
        class_names=["a"],
        image_size=[64, 64],
        backbone=BACKBONE,
        anchors=ANCHORS_SPEC,
        head={"name": "ssd"},
        matcher={"name": "ssd"},
    )
    gen = torch.Generator().manual_seed(0)
    batch = {
        "images": torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=gen),
        "boxes": torch.tensor([[[0.1, 0.1, 0.6, 0.7]], [[0.2, 0.3, 0.9, 0.8]]]),
        "labels": torch.ones(2, 1, dtype=torch.long),
        "mask": torch.ones(2, 1, dtype=torch.bool),
    }
    return module, batch


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_measuring_step_times_leaves_the_module_as_it_was(precision):
    from ssdlit.training.calibration import measure_step_times

    module, batch = _timing_module_and_batch()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    dtypes = []
    raw = module.detector.raw
    module.detector.raw = lambda images: (
        dtypes.append(raw(images)["cls_logits"].dtype) or raw(images)
    )
    times = measure_step_times(
        module, [batch, batch, batch], [batch], steps=3, warmup=1, precision=precision
    )
    assert times.train_step > 0 and times.val_batch > 0
    assert (times.train_batches, times.val_batches) == (3, 1)
    assert times.validation() == pytest.approx(times.val_batch)
    # the steps ran in the precision asked for
    want = torch.bfloat16 if precision == "bf16-mixed" else torch.float32
    assert dtypes and set(dtypes) == {want}
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), key  # BatchNorm statistics included
    assert all(p.grad is None for p in module.parameters())


@pytest.mark.parametrize(("speedup", "chosen"), [(0.0, "bf16-mixed"), (1e9, "32-true")])
def test_choosing_the_precision_compares_measured_steps(monkeypatch, speedup, chosen):
    """bf16-mixed only where float32 takes at least MIXED_SPEEDUP times as long (0: always;
    a billion: never), from a measurement of each on the run's loader."""
    from ssdlit.training import calibration

    module, batch = _timing_module_and_batch()
    monkeypatch.setattr(calibration, "MIXED_SPEEDUP", speedup)
    precision, seconds = calibration.choose_precision(module, [batch] * 3, steps=2, warmup=1)
    assert precision == chosen
    assert set(seconds) == {"32-true", "bf16-mixed"} and min(seconds.values()) > 0


def test_unknown_fit_options_are_refused():
    from ssdlit.apps.common import UsageError
    from ssdlit.apps.train import check_fit_options

    check_fit_options({"anchors": True, "max_zoom": True, "precision": True, "minutes": 25})
    with pytest.raises(UsageError, match=r"unknown key\(s\) precison; fit takes anchors"):
        check_fit_options({"anchors": True, "precison": True})
