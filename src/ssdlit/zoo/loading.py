"""torchvision weights into ssdlit's apps: ``init_from=`` for training, ``ckpt=`` for the rest.

What the apps accept besides an ssdlit checkpoint (:func:`is_torchvision_weights`):

- a name of :data:`~ssdlit.zoo.torchvision.NAMED_WEIGHTS` (``torchvision:ssd300_vgg16_coco``,
  ``torchvision:ssdlite320_coco``): downloaded once into the torch hub cache;
- a path to a ``.pth`` file of torchvision's ``ssd300_vgg16`` or
  ``ssdlite320_mobilenet_v3_large`` (a state dict, or a reference-training checkpoint).

Classes: a file with 91 class outputs is taken as COCO-trained and its classes are
torchvision's COCO names (:func:`~ssdlit.zoo.torchvision.coco_class_names`); for any other
count the names are unknown, so no class row is carried over.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from ssdlit.transfer import transfer_classes
from ssdlit.zoo.torchvision import (
    ARCHITECTURES,
    NAMED_WEIGHTS,
    coco_class_names,
    convert_state_dict,
    detector_spec,
    find_architecture,
    load_converted,
    load_named_weights,
    torchvision_state_dict,
)

__all__ = [
    "init_from_torchvision",
    "is_torchvision_weights",
    "module_from_torchvision",
    "read_torchvision_weights",
]

#: Class outputs of torchvision's COCO detectors (background + 90 category ids).
COCO_OUTPUTS = 91


def is_torchvision_weights(value: str | Path) -> bool:
    """True for a :data:`NAMED_WEIGHTS` name or a path ending in ``.pth``."""
    text = str(value)
    return text in NAMED_WEIGHTS or text.startswith("torchvision:") or text.endswith(".pth")


def read_torchvision_weights(value: str | Path) -> tuple[str, dict[str, Tensor], list[str]]:
    """(architecture, ssdlit detector state dict, class names) of a name or a ``.pth`` file.

    Raises:
        ValueError: an unknown name, or a file that is not one of the two architectures.
        FileNotFoundError: a path that does not exist.
        ssdlit.backbones.PretrainedWeightsError: a name that cannot be downloaded.
    """
    text = str(value)
    if text.startswith("torchvision:"):
        arch, state = load_named_weights(text)
    else:
        state = torchvision_state_dict(Path(text).expanduser())
        arch = find_architecture(state)
    converted = convert_state_dict(state, arch)
    names = _class_names(converted)
    return arch, converted, names


def _class_names(state: Mapping[str, Tensor]) -> list[str]:
    """COCO's names for a 91-output head; placeholders (never a real class name) otherwise."""
    weight = [k for k in state if k.startswith("head.cls_predictors.0.") and k.endswith("weight")]
    box = [k for k in state if k.startswith("head.box_predictors.0.") and k.endswith("weight")]
    per_location = int(state[box[-1]].shape[0]) // 4
    outputs = int(state[weight[-1]].shape[0]) // per_location
    if outputs == COCO_OUTPUTS:
        return coco_class_names()
    return [f"<class {i} of the file>" for i in range(1, outputs)]


def _backbone_options(arch: str, state: Mapping[str, Tensor]) -> dict[str, Any]:
    if arch.startswith("ssdlite"):  # 480 channels at the trunk's end: the reduced tail
        return {"reduced_tail": int(state["backbone.extras.0.0.0.weight"].shape[1]) == 480}
    return {}


def module_from_torchvision(
    value: str | Path, class_names: Sequence[str] | None = None, **module_options: Any
):
    """A :class:`~ssdlit.module.DetectionModule` of torchvision weights, in eval mode.

    Its detector is :func:`~ssdlit.zoo.torchvision.detector_spec`'s (torchvision's
    settings). Without ``class_names`` it keeps the file's classes (COCO: 90 names, the
    unused ids named ``N/A``); with them, each named class keeps its row of the file and a
    name the file lacks is an error (use ``init_from`` in training for new classes).
    ``module_options`` go to the module (``metrics``, ``postprocess``...).
    """
    from ssdlit.module import DetectionModule

    arch, state, names = read_torchvision_weights(value)
    wanted = list(class_names) if class_names is not None else names
    unknown = [n for n in wanted if n not in names]
    if unknown:
        raise ValueError(
            f"{value} has no class named {', '.join(unknown[:5])}"
            + (" ..." if len(unknown) > 5 else "")
            + f" (its classes: {', '.join(dict.fromkeys(names))})"
        )
    spec = detector_spec(arch, len(wanted), **_backbone_options(arch, state))
    spec.pop("num_classes")
    postprocess = module_options.pop("postprocess", None)
    if postprocess:
        spec["postprocess"] = {**spec["postprocess"], **postprocess}
    module = DetectionModule(class_names=wanted, **spec, **module_options)
    if class_names is None:  # the file's own classes, "N/A" rows included, as they are
        load_converted(module.detector, state, arch)
    else:
        transfer_classes(module, _prefixed(state), names, wanted, module.detector.head)
    return module.eval()


def _prefixed(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A detector's state dict as a :class:`~ssdlit.module.DetectionModule`'s."""
    return {f"detector.{k}": v for k, v in state.items()}


def init_from_torchvision(module: Any, value: str | Path) -> str:
    """Start ``module`` from torchvision weights (a name or a ``.pth``), keeping the rows of
    the classes it shares with them by name; returns the one-line report.

    The module's detector must be the weights' architecture with the input normalisation
    they expect (``+experiment=finetune_ssdlite`` for ``torchvision:ssdlite320_coco``);
    anything else is a ValueError that says which experiment fits.
    """
    arch, state, names = read_torchvision_weights(value)
    want = ARCHITECTURES[arch]
    backbone = dict(module.hparams.get("backbone") or {})
    fits = (
        "+experiment=finetune_ssdlite"
        if arch.startswith("ssdlite")
        else "+experiment=finetune_ssd300"
    )
    expected = {**want.backbone, **_backbone_options(arch, state)}
    defaults = _defaults(want.backbone["name"])
    differ = {
        key: (backbone.get(key, defaults.get(key)), value_)
        for key, value_ in expected.items()
        if key != "name" and backbone.get(key, defaults.get(key)) != value_
    }
    if backbone.get("name") != want.backbone["name"] or differ:
        found = ", ".join(f"{k}={v[0]!r} (needs {v[1]!r})" for k, v in differ.items())
        raise ValueError(
            f"{value} holds torchvision's {arch}: it needs backbone {want.backbone['name']!r}"
            + (f"; this config has {found}" if found else f", not {backbone.get('name')!r}")
            + f". Train it with {fits}, or set those backbone options"
        )
    try:
        done = transfer_classes(
            module, _prefixed(state), names, list(module.class_names), module.detector.head
        )
    except ValueError as exc:
        raise ValueError(f"{value} ({arch}) does not fit this detector: {exc}. Try {fits}") from exc
    known = [n for n in dict.fromkeys(names) if n != "N/A"]
    kept = f"kept {len(done['kept'])} of the file's {len(known)} classes ({', '.join(done['kept']) or '-'})"
    return (
        f"init_from {value} ({arch}): {kept}, new: {', '.join(done['new']) or '-'}; "
        f"{done['tensors']} tensors loaded"
    )


def _defaults(backbone: str) -> dict[str, Any]:
    """The keyword defaults of a registered backbone (for configs that leave them out)."""
    from ssdlit.registry import BACKBONES

    params = inspect.signature(BACKBONES.get(backbone)).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
