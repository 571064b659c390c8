"""kohya / sd-scripts LoRAs for FLUX.1, named after Black Forest Labs' layers
(``lora_unet_double_blocks_0_img_attn_qkv``, ``lora_unet_single_blocks_3_linear1``, ...): each update mapped onto
fastdiff's layers (diffusers' names), as diffusers' ``_convert_kohya_flux_lora_to_diffusers`` maps them.

BFL fuses layers diffusers keeps apart: a double block's ``qkv`` (q, k, v: equal thirds) and a single block's
``linear1`` (q, k, v and the MLP's input: 3 x inner + 4 x inner rows). A fused update ``up @ down`` splits by rows
exactly: each part keeps ``down`` and takes its rows of ``up``. The final layer's modulation stores (shift, scale)
where diffusers' stores (scale, shift): its rows are swapped. Alphas apply to every layer (diffusers' converter
drops the final layer's: a file whose final-layer alpha is not its rank merges differently there).
"""

from __future__ import annotations

import re

import torch

from .errors import UnsupportedConfigError

_DOUBLE = {"img_attn_proj": ("attn.to_out.0",), "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
           "img_mlp_0": ("ff.net.0.proj",), "img_mlp_2": ("ff.net.2",), "img_mod_lin": ("norm1.linear",),
           "txt_attn_proj": ("attn.to_add_out",),
           "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
           "txt_mlp_0": ("ff_context.net.0.proj",), "txt_mlp_2": ("ff_context.net.2",),
           "txt_mod_lin": ("norm1_context.linear",)}
_SINGLE = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear2": ("proj_out",),
           "modulation_lin": ("norm.linear",)}
_TOP = {"img_in": "x_embedder", "txt_in": "context_embedder",
        "time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
        "time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
        "vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
        "vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
        "guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
        "guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2",
        "final_layer_linear": "proj_out", "final_layer_adaLN_modulation_1": "norm_out.linear"}
_BFL = re.compile(r"(double_blocks|single_blocks)_(\d+)_(.+)|(" + "|".join(_TOP) + ")")


def is_bfl_name(name: str) -> bool:
    """A kohya network layer name (after ``lora_unet_``) in BFL's FLUX.1 layout."""
    return _BFL.fullmatch(name) is not None


def bfl_layers(name: str, layer) -> list:
    """[(fastdiff's dotted layer name, its LoraLayer)] for the kohya FLUX.1 layer ``name`` (after ``lora_unet_``)."""
    from .lora import LoraLayer

    m = _BFL.fullmatch(name)
    if m is None:
        raise UnsupportedConfigError("LoRA key", "lora_unet_" + name, supported="BFL FLUX.1 layers")
    if m.group(4) is not None:
        targets = (_TOP[m.group(4)],)
    else:
        table, block = (_DOUBLE, "transformer_blocks") if m.group(1) == "double_blocks" else \
            (_SINGLE, "single_transformer_blocks")
        parts = table.get(m.group(3))
        if parts is None:
            raise UnsupportedConfigError("LoRA key", "lora_unet_" + name, supported=[
                f"{m.group(1)}_N_{k}" for k in table])
        targets = tuple(f"{block}.{m.group(2)}.{p}" for p in parts)
    up = layer.up
    if name == "final_layer_adaLN_modulation_1":  # BFL's (shift, scale) rows -> diffusers' (scale, shift)
        shift, scale = up.chunk(2, dim=0)
        up = torch.cat([scale, shift], dim=0)
    if len(targets) == 1:
        return [(targets[0], LoraLayer(layer.down, up, layer.alpha, layer.rslora))]
    rows = up.shape[0]
    if len(targets) == 3:  # q, k, v
        sizes = [rows // 3] * 3
    else:  # q, k, v, then the MLP's 4x wider input
        sizes = [rows // 7] * 3 + [rows - 3 * (rows // 7)]
    return [(t, LoraLayer(layer.down, part, layer.alpha, layer.rslora))
            for t, part in zip(targets, torch.split(up, sizes, dim=0))]


__all__ = ["is_bfl_name", "bfl_layers"]
