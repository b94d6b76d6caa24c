"""Loading torchvision's ImageNet weights, with an error that says what to do offline.

Nothing here runs unless a backbone is built with ``pretrained=True``. The file is
looked for in torch's hub cache (``torch.hub.get_dir()/checkpoints``, set by
``TORCH_HOME``) under the name the weights' URL ends with, and downloaded there
only when missing.
"""

from __future__ import annotations

import os
import re
from urllib.parse import urlparse

import torch
from torch import Tensor
from torchvision.models import WeightsEnum

__all__ = ["PretrainedWeightsError", "load_state_dict", "weights_cache_path"]


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights could not be downloaded or read."""


def weights_cache_path(weights: WeightsEnum) -> str:
    """Where torch's hub cache keeps (or would keep) the file of ``weights``."""
    filename = os.path.basename(urlparse(weights.url).path)
    return os.path.join(torch.hub.get_dir(), "checkpoints", filename)


def _hash_prefix(path: str) -> str | None:
    """The SHA-256 prefix torchvision puts in its file names (``name-<hex>.pth``), if any."""
    match = re.search(r"-([a-f0-9]{6,})\.", os.path.basename(path))
    return match.group(1) if match else None


#: How to go without downloaded weights, for a backbone's ImageNet weights.
WITHOUT = (
    "or run without pretrained weights: build the backbone with pretrained=false (in a Hydra "
    "config, set the backbone's pretrained option to false)."
)


def load_state_dict(
    weights: WeightsEnum, *, progress: bool = True, without: str = WITHOUT
) -> dict[str, Tensor]:
    """The state dict of torchvision ``weights`` (e.g. ``VGG16_Weights.IMAGENET1K_V1``), on CPU.

    Downloads the file into the hub cache when it is not there yet, checking the hash
    prefix in its name (``vgg16-397923af.pth``) as torchvision does; a file already in
    the cache (put there by hand, say) is used as is, as torchvision does too.

    ``without`` is the message's last clause: how to go without these weights.

    Raises:
        PretrainedWeightsError: (a ``RuntimeError``) naming the weights, the URL, the
            cache file where the weights can be placed by hand, and how to go without.
    """
    name = f"{type(weights).__name__}.{weights.name}"
    path = weights_cache_path(weights)
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            torch.hub.download_url_to_file(
                weights.url, path, hash_prefix=_hash_prefix(path), progress=progress
            )
        except Exception as exc:  # URLError, timeouts, HTTP errors, full disks...
            raise PretrainedWeightsError(
                f"could not download the pretrained weights {name} from {weights.url}: "
                f"{exc}. If this machine is offline, download that file elsewhere and place "
                f"it at {path} (the torch hub cache, torch.hub.get_dir()/checkpoints = "
                f"{os.path.dirname(path)}; TORCH_HOME moves it), {without}"
            ) from exc
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign file
        raise PretrainedWeightsError(
            f"could not read the pretrained weights {name} from {path}: {exc}. Delete the "
            f"file to download it again from {weights.url}, or build the backbone with "
            "pretrained=false."
        ) from exc
    if not isinstance(state, dict):
        raise PretrainedWeightsError(
            f"{path} does not hold a state dict for {name} (found {type(state).__name__})"
        )
    return state
