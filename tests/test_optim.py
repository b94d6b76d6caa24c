"""Optimiser parameter groups and learning-rate schedules (``ssdlit.training.optim``):
which parameters are decayed, what the optimisers receive, and the learning rate the
optimiser actually holds at chosen steps of warm-up + multistep, cosine and constant
schedules (tests/test_module.py covers the schedule function's own values)."""

from __future__ import annotations

import io
import itertools
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ssdlit.backbones import L2Norm
from ssdlit.module import DetectionModule
from ssdlit.registry import BACKBONES
from ssdlit.training.optim import (
    WarmupSchedule,
    build_optimizer,
    build_scheduler,
    parameter_groups,
)


def by_name(groups: list[dict]) -> dict[str, set[int]]:
    return {g["name"]: {id(p) for p in g["params"]} for g in groups}


def lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    return [g["lr"] for g in optimizer.param_groups]


def two_group_sgd(lr: float = 1e-3) -> torch.optim.SGD:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    return build_optimizer(parameter_groups(model, 5e-4), {"name": "sgd", "lr": lr})


def run(optimizer, scheduler, steps: int) -> list[list[float]]:
    """The learning rates of every group at optimiser steps 0 .. steps - 1 (what each
    ``optimizer.step()`` used), stepping the scheduler after each, as Lightning does with
    ``interval: step``."""
    seen = []
    for _ in range(steps):
        seen.append(lrs(optimizer))
        optimizer.step()
        scheduler.step()
    return seen


# -- parameter groups ------------------------------------------------------------------------


def test_ssd300_backbone_decays_conv_weights_only():
    # SSD's L2Norm (conv4_3) is a normalisation: its per-channel scale is not decayed.
    backbone = BACKBONES.build("vgg16_ssd300", pretrained=False)
    groups = by_name(parameter_groups(backbone, 5e-4))
    l2norms = [m for m in backbone.modules() if isinstance(m, L2Norm)]
    assert len(l2norms) == 1 and id(l2norms[0].weight) in groups["no_decay"]
    for name, p in backbone.named_parameters():
        expected = "decay" if name.endswith("weight") and p.ndim == 4 else "no_decay"
        assert id(p) in groups[expected], name
    assert len(groups["decay"]) + len(groups["no_decay"]) == len(list(backbone.parameters()))


class ScaleNorm(nn.Module):
    """A norm layer by its class name, with a 2-D parameter (not caught by the ndim rule)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4, 1))


class Block(nn.Module):
    def __init__(self, shared: nn.Linear) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1, bias=False)
        self.norm = ScaleNorm()
        self.gain = nn.Parameter(torch.ones(4))  # 1-D, neither bias nor norm: no decay
        self.shared = shared


def test_norms_by_name_vectors_and_shared_parameters():
    shared = nn.Linear(4, 4)
    model = nn.ModuleList([Block(shared), Block(shared)])
    groups = parameter_groups(model, 1e-2)
    named = by_name(groups)
    assert named["decay"] == {id(b.conv.weight) for b in model} | {id(shared.weight)}
    assert named["no_decay"] == (
        {id(b.norm.weight) for b in model} | {id(b.gain) for b in model} | {id(shared.bias)}
    )
    # A parameter shared by two modules is listed once (torch rejects duplicates).
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_no_empty_group_and_frozen_parameters_left_out():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.Conv2d(4, 4, 3, bias=False))
    assert [g["name"] for g in parameter_groups(model, 5e-4)] == ["decay"]
    model.requires_grad_(False)
    assert parameter_groups(model, 5e-4) == []
    bn = nn.BatchNorm2d(4)
    assert [(g["name"], g["weight_decay"]) for g in parameter_groups(bn, 5e-4)] == [
        ("no_decay", 0.0)
    ]


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_optimisers_keep_each_groups_weight_decay(name):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), L2Norm(4))
    cfg = {
        "name": name,
        "lr": 2e-3,
        "momentum": 0.8,
        "nesterov": True,
        "betas": [0.8, 0.99],
        "eps": 1e-6,
    }
    optimizer = build_optimizer(parameter_groups(model, 0.05), cfg)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]
    assert lrs(optimizer) == [2e-3, 2e-3]
    if name == "sgd":
        assert isinstance(optimizer, torch.optim.SGD)
        assert optimizer.defaults["momentum"] == 0.8 and optimizer.defaults["nesterov"] is True
    else:  # AdamW's own default decay (0.01) must not reach the no-decay group
        assert isinstance(optimizer, torch.optim.AdamW)
        assert optimizer.defaults["betas"] == (0.8, 0.99) and optimizer.defaults["eps"] == 1e-6
    with pytest.raises(ValueError, match="unknown optimiser"):
        build_optimizer(parameter_groups(model, 0.0), {"name": "lbfgs", "lr": 1.0})


# -- warm-up + multistep: the learning rate the optimiser holds -------------------------------


def test_warmup_then_multistep_in_the_optimizer():
    optimizer = two_group_sgd(lr=1e-3)
    cfg = {
        "name": "multistep",
        "warmup_steps": 10,
        "warmup_factor": 0.001,
        "milestones": [20, 30],
        "gamma": 0.1,
    }
    seen = run(optimizer, build_scheduler(optimizer, cfg, total_steps=None), 35)
    expected = {
        0: 1e-3 * 0.001,  # the first step: warmup_factor x lr
        5: 1e-3 * (0.001 + 0.999 * 5 / 10),  # mid-warm-up: linear
        9: 1e-3 * (0.001 + 0.999 * 9 / 10),  # the last warm-up step
        10: 1e-3,  # end of warm-up: the base rate
        19: 1e-3,  # just before the first milestone
        20: 1e-4,  # x0.1 at 20
        29: 1e-4,
        30: 1e-5,  # x0.01 at 30
        34: 1e-5,
    }
    for step, lr in expected.items():
        assert seen[step] == pytest.approx([lr, lr], rel=1e-9), step
    assert all(a[0] < b[0] for a, b in itertools.pairwise(seen[:11]))  # rising warm-up


@pytest.mark.parametrize(
    "step, factor",
    [
        (0, 0.001),
        (250, 0.001 + 0.999 * 0.5),
        (499, 0.001 + 0.999 * 499 / 500),
        (500, 1.0),
        (79_999, 1.0),
        (80_000, 0.1),
        (99_999, 0.1),
        (100_000, 0.01),
        (119_999, 0.01),
    ],
)
def test_the_papers_schedule_in_optimiser_steps(step, factor):
    # SSD300 on VOC07+12: 120k iterations, x0.1 at 80k and 100k, 500 warm-up steps.
    schedule = WarmupSchedule("multistep", warmup_steps=500, milestones=[80_000, 100_000])
    assert schedule(step) == pytest.approx(factor)


def test_no_warmup_and_a_milestone_inside_the_warmup():
    assert WarmupSchedule("multistep", warmup_steps=0, milestones=[3])(0) == 1.0
    s = WarmupSchedule("multistep", warmup_steps=10, warmup_factor=0.0, milestones=[5], gamma=0.5)
    assert s(4) == pytest.approx(0.4)
    assert s(5) == pytest.approx(0.5 * 0.5)  # warm-up factor times the decay
    assert s(10) == pytest.approx(0.5)
    assert WarmupSchedule("constant", warmup_steps=4, warmup_factor=0.5)(2) == pytest.approx(0.75)
    assert WarmupSchedule("constant", warmup_steps=4)(10**9) == 1.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"name": "multistep", "milestones": [100, 50]}, "increasing"),
        ({"name": "multistep", "warmup_factor": 1.5}, "warmup_factor"),
        ({"name": "multistep", "warmup_steps": -1}, "warmup_steps"),
        ({"name": "cosine", "total_steps": 0}, "total_steps"),
        ({"name": "step"}, "unknown schedule"),
    ],
)
def test_invalid_schedules(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WarmupSchedule(**kwargs)


# -- cosine ----------------------------------------------------------------------------------


def test_warmup_then_cosine_in_the_optimizer():
    optimizer = two_group_sgd(lr=0.01)
    cfg = {"name": "cosine", "warmup_steps": 10, "warmup_factor": 0.1, "min_factor": 0.01}
    seen = [lr[0] for lr in run(optimizer, build_scheduler(optimizer, cfg, total_steps=110), 130)]
    assert seen[0] == pytest.approx(0.01 * 0.1)
    assert seen[5] == pytest.approx(0.01 * (0.1 + 0.9 * 0.5))
    assert seen[10] == pytest.approx(0.01)  # the peak at the end of warm-up
    assert seen[35] == pytest.approx(0.01 * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi / 4))))
    assert seen[60] == pytest.approx(0.01 * (0.01 + 0.99 * 0.5))  # half-way
    assert seen[110] == pytest.approx(0.01 * 0.01)  # the floor at total_steps ...
    assert seen[129] == pytest.approx(0.01 * 0.01)  # ... and after it
    after = seen[10:111]
    assert all(a >= b for a, b in itertools.pairwise(after))
    # Without min_factor the rate decays to zero.
    assert WarmupSchedule("cosine", total_steps=100)(100) == pytest.approx(0.0)


def test_configure_optimizers_cosine_spans_the_trainers_step_estimate():
    module = DetectionModule(
        class_names=["a", "b"],
        image_size=[64, 64],
        backbone={"name": "ssd7", "widths": [4] * 7},
        anchors={"name": "ssd", "scales": [0.1, 0.2, 0.4, 0.7, 1.0], "aspect_ratios": [1.0]},
        head={"name": "ssd"},
        matcher={"name": "ssd"},
        optim={
            "name": "adamw",
            "lr": 1e-3,
            "weight_decay": 0.05,
            "scheduler": {"name": "cosine", "warmup_steps": 5, "min_factor": 0.1},
        },
        metrics={"coco": False},
    )
    module._trainer = SimpleNamespace(estimated_stepping_batches=50)  # no Trainer needed
    conf = module.configure_optimizers()
    optimizer, scheduler = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert conf["lr_scheduler"]["interval"] == "step"
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]
    assert scheduler.lr_lambdas[0].total_steps == 50
    assert 1e-3 * scheduler.lr_lambdas[0](50) == pytest.approx(1e-4)


# -- resuming: the schedule's state is plain numbers -------------------------------------------


def test_schedule_state_resumes_with_weights_only_load():
    cfg = {"name": "multistep", "warmup_steps": 4, "warmup_factor": 0.1, "milestones": [6, 9]}
    opt_a = two_group_sgd(lr=0.1)
    whole = run(opt_a, build_scheduler(opt_a, cfg, None), 12)

    opt_b = two_group_sgd(lr=0.1)
    sched_b = build_scheduler(opt_b, cfg, None)
    first = run(opt_b, sched_b, 5)
    buffer = io.BytesIO()
    torch.save({"optimizer": opt_b.state_dict(), "scheduler": sched_b.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    opt_c = two_group_sgd(lr=0.1)
    sched_c = build_scheduler(opt_c, cfg, None)
    opt_c.load_state_dict(state["optimizer"])
    sched_c.load_state_dict(state["scheduler"])
    resumed = first + run(opt_c, sched_c, 7)
    assert [lr for step in resumed for lr in step] == pytest.approx(
        [lr for step in whole for lr in step]
    )


def test_ema_decay_ramps_up_and_rejects_bad_values():
    import math

    from ssdlit.training.callbacks import EMAWeights

    ema = EMAWeights(decay=0.99, warmup_steps=10)
    assert ema.current_decay(10) == pytest.approx(0.99 * (1 - math.exp(-1)))
    assert ema.current_decay(1) < ema.current_decay(100) < 0.99
    assert EMAWeights(decay=0.9).current_decay(1) == 0.9
    avg = ema._average(torch.zeros(3), torch.ones(3), torch.tensor(10))
    assert torch.allclose(avg, torch.full((3,), 1 - ema.current_decay(10)))
    for bad in ({"decay": 1.0}, {"decay": -0.1}, {"warmup_steps": -1}):
        with pytest.raises(ValueError):
            EMAWeights(**bad)
