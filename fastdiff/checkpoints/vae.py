"""VAE decoders from disk: a diffusers ``AutoencoderKL`` folder (a pipeline's ``vae/``, or one of its own such as
stabilityai/sd-vae-ft-ema), or the ``first_stage_model.*`` part of a Stable Diffusion single file.

Only the decoder half is read (``decoder.*``, ``post_quant_conv.*``); the encoder's tensors are skipped.
"""

from __future__ import annotations

import os
import re
from typing import Optional

import torch

from ..errors import CheckpointError
from ..models.vae import VAEConfig, VAEDecoder
from .common import RequiredKeys, strict_load
from .diffusers_folder import read_json

LDM_PREFIX = "first_stage_model."
_LDM_RESNET = {"nin_shortcut": "conv_shortcut"}
_LDM_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# the latent scaling a single file does not store: SD 1.x / 2.x, SDXL, SD3 (diffusers' VAE configs)
LATENT_SCALING = {"sd": (0.18215, None), "sdxl": (0.13025, None), "sd3": (1.5305, 0.0609)}


def _decoder_state(state: dict) -> dict:
    """The decoder's tensors; attention named as before diffusers 0.14 (query / key / value / proj_attn, as in
    sd-vae-ft-* and the SD 1.x / 2.x folders) renamed as diffusers renames them on load."""
    from .diffusers_unet import convert_diffusers_unet

    return convert_diffusers_unet({k: v for k, v in state.items() if k.startswith(("decoder.", "post_quant_conv."))})


def build_vae(config: VAEConfig, state: dict, name: str, device="cpu") -> VAEDecoder:
    """A float32 ``VAEDecoder`` holding ``state`` (checked key by key)."""
    with torch.device("meta"):
        vae = VAEDecoder(config)
    return strict_load(vae, state, name=name, dtype=torch.float32, device=device).eval()


def is_vae_folder(folder: str) -> bool:
    cfg = os.path.join(folder, "config.json")
    return os.path.isfile(cfg) and read_json(cfg).get("_class_name") == "AutoencoderKL"


def load_vae_folder(folder: str, device="cpu", variant: Optional[str] = None) -> VAEDecoder:
    """The decoder of a diffusers ``AutoencoderKL`` folder."""
    from .diffusers_folder import find_weights

    if not is_vae_folder(folder):
        raise CheckpointError(f"{folder}: expected a diffusers AutoencoderKL folder (config.json with _class_name "
                              f"'AutoencoderKL' and its weights)")
    config = VAEConfig.from_diffusers(read_json(os.path.join(folder, "config.json")))
    return build_vae(config, _decoder_state(find_weights(folder, variant)), f"VAE decoder from {folder}", device)


def has_ldm_vae(state: dict) -> bool:
    return LDM_PREFIX + "decoder.conv_in.weight" in state


def ldm_vae(state: dict, family: str, device="cpu") -> VAEDecoder:
    """The decoder of a single file's ``first_stage_model`` (ldm / sgm naming), its config read from the shapes;
    ``family`` ("sd", "sdxl", "sd3") gives the latent scaling, which the file does not store."""
    sd = RequiredKeys({k[len(LDM_PREFIX):]: v for k, v in state.items()
                       if k.startswith((LDM_PREFIX + "decoder.", LDM_PREFIX + "post_quant_conv."))},
                      "a single file's VAE decoder", LDM_PREFIX)
    ups = {int(m.group(1)) for k in sd if (m := re.match(r"decoder\.up\.(\d+)\.", k))}
    if not ups:
        raise CheckpointError(f"{LDM_PREFIX}decoder: expected its up blocks ({LDM_PREFIX}decoder.up.N.*), found none")
    levels = 1 + max(ups)
    channels = [sd[f"decoder.up.{i}.block.0.conv2.weight"].shape[0] for i in range(levels)]
    per_level = len({k.split(".")[4] for k in sd if k.startswith("decoder.up.0.block.")})
    scaling, shift = LATENT_SCALING[family]
    config = VAEConfig(
        block_out_channels=tuple(channels), layers_per_block=per_level - 1,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        latent_channels=sd["decoder.conv_in.weight"].shape[1], out_channels=sd["decoder.conv_out.weight"].shape[0],
        use_post_quant_conv="post_quant_conv.weight" in sd, use_quant_conv="post_quant_conv.weight" in sd,
        mid_block_add_attention="decoder.mid.attn_1.q.weight" in sd, scaling_factor=scaling, shift_factor=shift)
    out = {}
    for key, t in sd.state.items():
        new = key.replace("decoder.norm_out.", "decoder.conv_norm_out.")
        new = re.sub(r"decoder\.mid\.block_(\d)\.", lambda m: f"decoder.mid_block.resnets.{int(m.group(1)) - 1}.", new)
        m = re.match(r"decoder\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)", new)
        if m:
            new = f"decoder.mid_block.attentions.0.{_LDM_ATTENTION[m.group(1)]}.{m.group(2)}"
            if t.dim() > 2:  # 1x1 convolutions (2-d or 1-d) in ldm, linear layers in diffusers
                t = t.reshape(t.shape[0], t.shape[1])
        m = re.match(r"decoder\.up\.(\d+)\.(block|upsample)\.(.*)", new)
        if m:  # ldm counts levels from the full resolution, diffusers' up blocks from the latent's
            block = levels - 1 - int(m.group(1))
            rest = m.group(3)
            if m.group(2) == "block":
                j, _, tail = rest.partition(".")
                head, _, param = tail.partition(".")
                new = f"decoder.up_blocks.{block}.resnets.{j}.{_LDM_RESNET.get(head, head)}.{param}"
            else:
                new = f"decoder.up_blocks.{block}.upsamplers.0.{rest}"
        out[new] = t
    return build_vae(config, out, f"VAE decoder of the single file's {LDM_PREFIX}*", device)


__all__ = ["load_vae_folder", "is_vae_folder", "has_ldm_vae", "ldm_vae", "LATENT_SCALING"]
