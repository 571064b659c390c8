"""diffusers UNet2DModel / UNet2DConditionModel -> native UNet.

The native UNet keeps diffusers' parameter names, so the conversion only renames the attention keys
of checkpoints saved before diffusers 0.14 (``query`` / ``key`` / ``value`` / ``proj_attn``), as
diffusers itself does when it loads them.
"""

from __future__ import annotations

import torch

from ..errors import CheckpointError
from ..models.unet import UNetConfig

_DEPRECATED_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def unet_config_from_diffusers(config: dict) -> UNetConfig:
    return UNetConfig.from_diffusers(config, config.get("_class_name"))


def convert_diffusers_unet(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, renamed = {}, {}
    for key, value in state.items():
        parts = key.split(".")
        if len(parts) >= 3 and "attentions" in parts and parts[-2] in _DEPRECATED_ATTENTION:
            parts[-2] = _DEPRECATED_ATTENTION[parts[-2]]
            renamed[".".join(parts)] = key
            key = ".".join(parts)
        out[key] = value
    both = sorted(k for k, old in renamed.items() if k in state)
    if both:  # (one of the two would have been dropped unread)
        raise CheckpointError(f"the UNet's weights name {len(both)} attention tensor(s) twice, in diffusers' current "
                              f"and pre-0.14 names: {both[0]!r} and {renamed[both[0]]!r}; expected one of them")
    return out
