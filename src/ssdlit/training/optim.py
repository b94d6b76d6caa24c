"""Optimisers and learning-rate schedules from plain config dicts.

- :func:`parameter_groups`: weight decay on weights only; biases and the parameters of
  normalisation layers (BatchNorm, GroupNorm, LayerNorm, SSD's L2Norm: every parameter with
  at most one dimension) get none, as in the Caffe SSD's ``decay_mult: 0`` on biases and
  the usual practice for norms.
- :func:`build_optimizer`: ``sgd`` (momentum 0.9, weight decay 5e-4: the paper) or ``adamw``.
- :class:`WarmupSchedule`: linear warm-up, then ``multistep`` (the paper's decays at fixed
  iterations), ``cosine`` or ``constant``; a multiplier of the base learning rate per
  optimiser step, used through :class:`torch.optim.lr_scheduler.LambdaLR`. It is a small
  object of plain numbers, so that its state (saved in the checkpoint) loads with
  ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

__all__ = [
    "SCHEDULES",
    "WarmupSchedule",
    "build_optimizer",
    "build_scheduler",
    "parameter_groups",
]

SCHEDULES = ("multistep", "cosine", "constant")

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES) or type(module).__name__.endswith("Norm")


def parameter_groups(
    model: nn.Module, weight_decay: float, no_decay_norm_and_bias: bool = True
) -> list[dict[str, Any]]:
    """Two optimiser groups: ``decay`` (weights) and ``no_decay`` (biases and norm parameters).

    A parameter goes to ``no_decay`` when it is a bias, belongs to a normalisation module
    (any class whose name ends in ``Norm``, e.g. SSD's ``L2Norm``) or has at most one
    dimension. Frozen parameters (``requires_grad=False``) are left out. With
    ``no_decay_norm_and_bias=False`` every parameter is decayed (one group).
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        norm = _is_norm(module)
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if no_decay_norm_and_bias and (norm or name == "bias" or p.ndim <= 1):
                no_decay.append(p)
            else:
                decay.append(p)
    groups = [{"name": "decay", "params": decay, "weight_decay": float(weight_decay)}]
    if no_decay:
        groups.append({"name": "no_decay", "params": no_decay, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def build_optimizer(params: Iterable[Any], cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """``torch.optim.SGD`` or ``AdamW`` from ``{name, lr, ...}`` (see conf/optim/*.yaml).

    ``params`` are parameter groups (:func:`parameter_groups`), which carry their own
    ``weight_decay``.
    """
    name = str(cfg.get("name", "sgd")).lower()
    lr = float(cfg["lr"])
    if name == "sgd":
        return torch.optim.SGD(
            params,
            lr=lr,
            momentum=float(cfg.get("momentum", 0.9)),
            nesterov=bool(cfg.get("nesterov", False)),
        )
    if name == "adamw":
        betas = cfg.get("betas", (0.9, 0.999))
        return torch.optim.AdamW(
            params, lr=lr, betas=(float(betas[0]), float(betas[1])), eps=float(cfg.get("eps", 1e-8))
        )
    raise ValueError(f"unknown optimiser {name!r}; known: sgd, adamw")


class WarmupSchedule:
    """Learning-rate multiplier at optimiser step ``s`` (0-based).

    - warm-up: for ``s < warmup_steps`` the factor rises linearly from ``warmup_factor``
      to 1 (``warmup_factor + (1 - warmup_factor) * s / warmup_steps``);
    - ``multistep``: afterwards ``gamma ** (number of milestones <= s)``;
    - ``cosine``: afterwards ``min_factor + (1 - min_factor) * (1 + cos(pi * t)) / 2`` with
      ``t = (s - warmup_steps) / (total_steps - warmup_steps)`` clamped to [0, 1];
    - ``constant``: 1.

    Milestones count optimiser steps from the start of training (warm-up included), as
    Caffe's ``stepvalue`` does: SSD300 on VOC07+12 decays at 80k and 100k of 120k iterations.
    """

    def __init__(
        self,
        name: str = "multistep",
        *,
        warmup_steps: int = 0,
        warmup_factor: float = 0.001,
        milestones: Sequence[int] = (),
        gamma: float = 0.1,
        total_steps: int | None = None,
        min_factor: float = 0.0,
    ) -> None:
        if name not in SCHEDULES:
            raise ValueError(f"unknown schedule {name!r}; known: {', '.join(SCHEDULES)}")
        if name == "cosine" and (total_steps is None or total_steps <= 0):
            raise ValueError("the cosine schedule needs total_steps > 0")
        if warmup_steps < 0 or not 0.0 <= warmup_factor <= 1.0:
            raise ValueError("need warmup_steps >= 0 and 0 <= warmup_factor <= 1")
        steps = [int(m) for m in milestones]
        if steps != sorted(steps):
            raise ValueError(f"milestones must be increasing, got {steps}")
        self.name = name
        self.warmup_steps = int(warmup_steps)
        self.warmup_factor = float(warmup_factor)
        self.milestones = steps
        self.gamma = float(gamma)
        self.total_steps = int(total_steps) if total_steps is not None else None
        self.min_factor = float(min_factor)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            alpha = step / self.warmup_steps
            warm = self.warmup_factor + (1.0 - self.warmup_factor) * alpha
        else:
            warm = 1.0
        if self.name == "multistep":
            decays = sum(1 for m in self.milestones if step >= m)
            return warm * self.gamma**decays
        if self.name == "cosine":
            assert self.total_steps is not None
            span = max(1, self.total_steps - self.warmup_steps)
            t = min(1.0, max(0.0, (step - self.warmup_steps) / span))
            cos = self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * t))
            return warm * cos
        return warm

    def __repr__(self) -> str:
        return f"WarmupSchedule({self.__dict__})"


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: Mapping[str, Any] | None, total_steps: int | None
) -> LambdaLR | None:
    """A per-step :class:`LambdaLR` of :class:`WarmupSchedule` (None when ``cfg`` is None).

    ``cfg``: ``{name: multistep|cosine|constant, warmup_steps, warmup_factor, milestones,
    gamma, min_factor}``; ``total_steps`` is the run's number of optimiser steps (needed
    by ``cosine``).
    """
    if cfg is None:
        return None
    options = dict(cfg)
    name = str(options.pop("name", "multistep"))
    schedule = WarmupSchedule(
        name,
        warmup_steps=int(options.pop("warmup_steps", 0)),
        warmup_factor=float(options.pop("warmup_factor", 0.001)),
        milestones=list(options.pop("milestones", None) or ()),
        gamma=float(options.pop("gamma", 0.1)),
        total_steps=total_steps,
        min_factor=float(options.pop("min_factor", 0.0)),
    )
    if options:
        raise ValueError(f"unknown scheduler option(s) {sorted(options)}")
    return LambdaLR(optimizer, schedule)
