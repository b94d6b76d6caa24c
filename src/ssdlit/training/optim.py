"""Optimisers and learning-rate schedules from plain config dicts.

- :func:`parameter_groups`: weight decay on weights only; biases and the parameters of
  normalisation layers (BatchNorm, GroupNorm, LayerNorm, SSD's L2Norm: every parameter with
  at most one dimension) get none, as in the Caffe SSD's ``decay_mult: 0`` on biases and
  the usual practice for norms.
- :func:`build_optimizer`: ``sgd`` or ``adamw`` with the options the config gives (the
  recipes, such as the SSD paper's SGD, are the files of ``conf/optim``; no value of
  theirs is repeated here); :func:`configure_optimizer` builds the optimiser of a model
  with its schedule.
- :class:`WarmupSchedule`: linear warm-up, then ``multistep`` (the paper's decays at fixed
  iterations), ``cosine`` or ``constant``; a multiplier of the base learning rate per
  optimiser step, used through :class:`torch.optim.lr_scheduler.LambdaLR`. It is a small
  object of plain numbers, so that its state (saved in the checkpoint) loads with
  ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "WarmupSchedule",
    "build_optimizer",
    "build_scheduler",
    "configure_optimizer",
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
    model: nn.Module, weight_decay: float = 0.0, no_decay_norm_and_bias: bool = True
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


#: The optimisers a config can name, and the options each takes from the config (besides
#: ``lr``); an option the config leaves out keeps torch's default.
OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], tuple[str, ...]]] = {
    "sgd": (torch.optim.SGD, ("momentum", "dampening", "nesterov")),
    "adamw": (torch.optim.AdamW, ("betas", "eps", "amsgrad")),
}


def build_optimizer(params: Iterable[Any], cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """``torch.optim.SGD`` or ``AdamW`` from ``{name, lr, ...}`` (see conf/optim/*.yaml).

    ``params`` are parameter groups (:func:`parameter_groups`), which carry their own
    ``weight_decay``. Of the config, the optimiser takes ``lr`` and its own options
    (:data:`OPTIMIZERS`); the values of the recipes are in conf/optim, not here.
    """
    name = str(cfg["name"]).lower()
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimiser {name!r}; known: {', '.join(OPTIMIZERS)}")
    cls, own = OPTIMIZERS[name]
    options = {k: cfg[k] for k in own if cfg.get(k) is not None}
    if "betas" in options:
        options["betas"] = tuple(float(b) for b in options["betas"])
    return cls(params, lr=float(cfg["lr"]), **options)


def configure_optimizer(
    model: nn.Module, cfg: Mapping[str, Any], total_steps: int | None = None
) -> tuple[torch.optim.Optimizer, LambdaLR | None]:
    """The optimiser of ``model`` and its per-step schedule from an optimiser config
    (``conf/optim``): :func:`parameter_groups` with the config's ``weight_decay`` and
    ``no_decay_norm_and_bias``, :func:`build_optimizer`, and :func:`build_scheduler` of
    its ``scheduler`` (None: no schedule). ``total_steps``: the run's optimiser steps
    (the ``cosine`` schedule needs them)."""
    group_options = {
        k: cfg[k] for k in ("weight_decay", "no_decay_norm_and_bias") if cfg.get(k) is not None
    }
    optimizer = build_optimizer(parameter_groups(model, **group_options), cfg)
    return optimizer, build_scheduler(optimizer, cfg.get("scheduler"), total_steps)


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


#: The options of a scheduler config (``WarmupSchedule``'s keywords; ``total_steps`` comes
#: from the run).
_SCHEDULE_OPTIONS = tuple(
    name
    for name, p in inspect.signature(WarmupSchedule).parameters.items()
    if p.kind is p.KEYWORD_ONLY and name != "total_steps"
)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: Mapping[str, Any] | None, total_steps: int | None
) -> LambdaLR | None:
    """A per-step :class:`LambdaLR` of :class:`WarmupSchedule` (None when ``cfg`` is None).

    ``cfg``: ``{name: multistep|cosine|constant, warmup_steps, warmup_factor, milestones,
    gamma, min_factor}`` (:class:`WarmupSchedule`'s keywords; one left out keeps its
    default there); ``total_steps`` is the run's number of optimiser steps (needed by
    ``cosine``).
    """
    if cfg is None:
        return None
    options = dict(cfg)
    name = str(options.pop("name"))
    if options.get("milestones") is None:
        options.pop("milestones", None)
    unknown = sorted(set(options) - set(_SCHEDULE_OPTIONS))
    if unknown:
        raise ValueError(f"unknown scheduler option(s) {unknown}")
    schedule = WarmupSchedule(name, total_steps=total_steps, **options)
    return LambdaLR(optimizer, schedule)
