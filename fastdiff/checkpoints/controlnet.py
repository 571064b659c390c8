"""diffusers ``ControlNetModel`` folders (config.json + diffusion_pytorch_model.safetensors) -> ``ControlNet``.

fastdiff's ControlNet keeps diffusers' parameter names (its UNet part is the native UNet's), so the weights load as
they are, after the same renaming of pre-0.14 attention keys as a UNet's.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from ..errors import BadArgumentError, UnsupportedConfigError
from ..models.controlnet import CONTROLNET_FIELDS, ControlNet
from ..models.unet import UNetConfig
from .common import strict_load
from .diffusers_folder import find_weights
from .diffusers_unet import convert_diffusers_unet
from .io import read_json

CLASS_NAME = "ControlNetModel"


def controlnet_config(config: dict) -> tuple[UNetConfig, dict]:
    """(the UNet part's config, ControlNet's own fields) from a ControlNetModel config.json dict."""
    if config.get("_class_name", CLASS_NAME) != CLASS_NAME:
        raise UnsupportedConfigError("_class_name", config.get("_class_name"), supported=[CLASS_NAME],
                                     model="a ControlNet folder")
    own = {k: config.get(k, v) for k, v in CONTROLNET_FIELDS.items()}
    unet = {k: v for k, v in config.items() if k not in CONTROLNET_FIELDS}
    n = len(unet.get("block_out_channels", (320, 640, 1280, 1280)))
    # (no up path: the UNet config needs one to validate, and the ControlNet builds none)
    unet.update(out_channels=unet.get("in_channels", 4), up_block_types=["UpBlock2D"] * n)
    return UNetConfig.from_diffusers(unet, "UNet2DConditionModel"), own


def load_controlnet(folder: str, variant: Optional[str] = None, dtype: Optional[torch.dtype] = None,
                    device="cpu") -> ControlNet:
    """A ControlNet from a diffusers ControlNetModel folder (its weights checked key by key)."""
    path = os.path.expanduser(str(folder))
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise BadArgumentError(f"controlnet: expected a diffusers ControlNetModel folder (config.json + weights), "
                               f"found {folder!r}")
    config = read_json(config_path)
    unet_config, own = controlnet_config(config)
    with torch.device("meta"):
        model = ControlNet(unet_config, **own)
    state = convert_diffusers_unet(find_weights(path, variant))
    return strict_load(model, state, f"ControlNet {path}", dtype=dtype, device=device).eval()


__all__ = ["load_controlnet", "controlnet_config"]
