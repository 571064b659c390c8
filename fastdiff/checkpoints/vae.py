"""VAEs from disk: a diffusers ``AutoencoderKL`` folder (a pipeline's ``vae/``, or one of its own such as
stabilityai/sd-vae-ft-ema), or the ``first_stage_model.*`` part of a Stable Diffusion single file.

The decoder half (``decoder.*``, ``post_quant_conv.*``) is required; the encoder half (``encoder.*``,
``quant_conv.*``, what img2img encodes images with) is read when the file carries it, whole or not at all.
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


_HALVES = ("decoder.", "post_quant_conv.", "encoder.", "quant_conv.")


def _vae_state(state: dict) -> dict:
    """The VAE's tensors; attention named as before diffusers 0.14 (query / key / value / proj_attn, as in
    sd-vae-ft-* and the SD 1.x / 2.x folders) renamed as diffusers renames them on load."""
    from .diffusers_unet import convert_diffusers_unet

    return convert_diffusers_unet({k: v for k, v in state.items() if k.startswith(_HALVES)})


def build_vae(config: VAEConfig, state: dict, name: str, device="cpu") -> VAEDecoder:
    """A float32 ``VAEDecoder`` holding ``state`` (checked key by key), with its encoder when ``state`` has
    ``encoder.*`` tensors."""
    with torch.device("meta"):
        vae = VAEDecoder(config, with_encoder=any(k.startswith("encoder.") for k in state))
    return strict_load(vae, state, name=name, dtype=torch.float32, device=device).eval()


def is_vae_folder(folder: str) -> bool:
    cfg = os.path.join(folder, "config.json")
    return os.path.isfile(cfg) and read_json(cfg).get("_class_name") == "AutoencoderKL"


def load_vae_folder(folder: str, device="cpu", variant: Optional[str] = None) -> VAEDecoder:
    """A diffusers ``AutoencoderKL`` folder's VAE (the decoder, and the encoder its weights carry)."""
    from .diffusers_folder import find_weights

    if not is_vae_folder(folder):
        raise CheckpointError(f"{folder}: expected a diffusers AutoencoderKL folder (config.json with _class_name "
                              f"'AutoencoderKL' and its weights)")
    config = VAEConfig.from_diffusers(read_json(os.path.join(folder, "config.json")))
    return build_vae(config, _vae_state(find_weights(folder, variant)), f"VAE from {folder}", device)


def has_ldm_vae(state: dict) -> bool:
    return LDM_PREFIX + "decoder.conv_in.weight" in state


def ldm_vae(state: dict, family: str, device="cpu") -> VAEDecoder:
    """The VAE of a single file's ``first_stage_model`` (ldm / sgm naming), its config read from the shapes;
    ``family`` ("sd", "sdxl", "sd3") gives the latent scaling, which the file does not store."""
    sd = RequiredKeys({k[len(LDM_PREFIX):]: v for k, v in state.items()
                       if k.startswith(tuple(LDM_PREFIX + h for h in _HALVES))},
                      "a single file's VAE", LDM_PREFIX)
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
        in_channels=sd["encoder.conv_in.weight"].shape[1] if "encoder.conv_in.weight" in sd else 3,
        use_post_quant_conv="post_quant_conv.weight" in sd,
        use_quant_conv=("quant_conv.weight" if "encoder.conv_in.weight" in sd else "post_quant_conv.weight") in sd,
        mid_block_add_attention="decoder.mid.attn_1.q.weight" in sd, scaling_factor=scaling, shift_factor=shift)
    return build_vae(config, {_diffusers_name(key, levels): _diffusers_shape(key, t) for key, t in sd.state.items()},
                     f"VAE of the single file's {LDM_PREFIX}*", device)


def _diffusers_name(key: str, levels: int) -> str:
    """An ldm VAE key (``decoder.up.3.block.0.nin_shortcut.weight``) -> diffusers' name
    (``decoder.up_blocks.0.resnets.0.conv_shortcut.weight``)."""
    new = re.sub(r"^(en|de)coder\.norm_out\.", r"\1coder.conv_norm_out.", key)
    new = re.sub(r"^(en|de)coder\.mid\.block_(\d)\.",
                 lambda m: f"{m.group(1)}coder.mid_block.resnets.{int(m.group(2)) - 1}.", new)
    m = re.match(r"(en|de)coder\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)", new)
    if m:
        return f"{m.group(1)}coder.mid_block.attentions.0.{_LDM_ATTENTION[m.group(2)]}.{m.group(3)}"
    m = re.match(r"(decoder\.up|encoder\.down)\.(\d+)\.(block|upsample|downsample)\.(.*)", new)
    if not m:
        return new
    decoding = m.group(1) == "decoder.up"
    # ldm counts levels from the full resolution; diffusers' up blocks count from the latent's, its down blocks
    # from the image's
    block, rest = (levels - 1 - int(m.group(2))) if decoding else int(m.group(2)), m.group(4)
    prefix = f"decoder.up_blocks.{block}" if decoding else f"encoder.down_blocks.{block}"
    if m.group(3) == "block":
        j, _, tail = rest.partition(".")
        head, _, param = tail.partition(".")
        return f"{prefix}.resnets.{j}.{_LDM_RESNET.get(head, head)}.{param}"
    return f"{prefix}.{'upsamplers' if decoding else 'downsamplers'}.0.{rest}"


def _diffusers_shape(key: str, t: torch.Tensor) -> torch.Tensor:
    """ldm's mid-block attention projections are 1x1 convolutions (2-d or 1-d); diffusers' are linear layers."""
    if re.match(r"(en|de)coder\.mid\.attn_1\.(q|k|v|proj_out)\.weight", key) and t.dim() > 2:
        return t.reshape(t.shape[0], t.shape[1])
    return t


__all__ = ["load_vae_folder", "is_vae_folder", "has_ldm_vae", "ldm_vae", "LATENT_SCALING"]
