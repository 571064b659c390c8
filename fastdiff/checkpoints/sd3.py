"""Stable Diffusion 3 / 3.5 single files (Stability's MMDiT layout) -> the native MMDiT (diffusers' names).

The transformer's keys live under ``model.diffusion_model.`` (``joint_blocks.N.x_block`` / ``context_block``,
fused ``qkv`` projections, ``adaLN_modulation.1``); text encoders and the VAE beside them are ignored. The
architecture is read from the tensor shapes: width, depth, patch size, position table, text widths, q / k norms
(SD3.5) and the dual-attention blocks (SD3.5 Medium). What the weights do not say: the head dim (64 in every
SD3 / 3.5 model) and the training resolution (1024 pixels, 128x128 latents).
"""

from __future__ import annotations

import math
import re

import torch

from ..errors import CheckpointError
from ..models.mmdit import MMDiTConfig
from .common import Renamer, RequiredKeys, swap_scale_shift

PREFIX = "model.diffusion_model."
MARKER = "joint_blocks.0.context_block.adaLN_modulation.1.bias"
SD3_HEAD_DIM = 64
SD3_SAMPLE_SIZE = 128


def is_sd3_state_dict(state: dict) -> bool:
    return MARKER in state or PREFIX + MARKER in state


# what Stability's all-in-one files hold beside the transformer: text encoders and the VAE
_OTHER_PARTS = ("text_encoders.", "first_stage_model.", "cond_stage_model.", "conditioner.")


def _keys(state: dict) -> RequiredKeys:
    if any(k.startswith(PREFIX) for k in state):
        return RequiredKeys({k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)},
                            "a Stable Diffusion 3 single file", PREFIX)
    return RequiredKeys({k: v for k, v in state.items() if not k.startswith(_OTHER_PARTS)},
                        "an SD3 MMDiT state dict")


def sd3_config(state: dict) -> MMDiTConfig:
    """The SD3Transformer2DModel config of a single file, from its tensor shapes."""
    sd = _keys(state)
    proj = sd["x_embedder.proj.weight"]  # (D, C, p, p)
    inner, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[-1]
    if inner % SD3_HEAD_DIM:
        raise CheckpointError(f"SD3 single file with width {inner}: not a multiple of SD3's head dim {SD3_HEAD_DIM}")
    blocks = sorted({int(m.group(1)) for k in sd if (m := re.match(r"joint_blocks\.(\d+)\.", k))})
    table = sd["pos_embed"].shape[1]
    side = math.isqrt(table)
    if side * side != table:
        raise CheckpointError(f"SD3 single file: pos_embed holds {table} positions, expected a square table")
    out = sd["final_layer.linear.weight"].shape[0] // (patch * patch)
    return MMDiTConfig(
        sample_size=min(SD3_SAMPLE_SIZE, side * patch), patch_size=patch, in_channels=in_channels,
        num_layers=len(blocks),
        attention_head_dim=SD3_HEAD_DIM, num_attention_heads=inner // SD3_HEAD_DIM,
        joint_attention_dim=sd["context_embedder.weight"].shape[1],
        caption_projection_dim=sd["context_embedder.weight"].shape[0],
        pooled_projection_dim=sd["y_embedder.mlp.0.weight"].shape[1], out_channels=out, pos_embed_max_size=side,
        dual_attention_layers=tuple(sorted({int(k.split(".")[1]) for k in sd if ".x_block.attn2." in k})),
        qk_norm="rms_norm" if any(".attn.ln_q." in k for k in sd) else None)


def convert_sd3(state: dict, config: MMDiTConfig) -> dict[str, torch.Tensor]:
    """Rename (and split the fused q / k / v of) an SD3 single file into the native MMDiT's state dict."""
    r = Renamer(_keys(state), "SD3 single file")
    inner = config.inner_dim
    r.out["pos_embed.pos_embed"] = r.take("pos_embed")
    r.linear("pos_embed.proj", "x_embedder.proj")
    r.linear("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0")
    r.linear("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2")
    r.linear("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0")
    r.linear("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2")
    r.linear("context_embedder", "context_embedder")
    for i in range(config.num_layers):
        src, dst = f"joint_blocks.{i}", f"transformer_blocks.{i}"
        last = i == config.num_layers - 1
        r.split([f"{dst}.attn.{n}" for n in ("to_q", "to_k", "to_v")], f"{src}.x_block.attn.qkv", [inner] * 3)
        r.split([f"{dst}.attn.{n}" for n in ("add_q_proj", "add_k_proj", "add_v_proj")],
                f"{src}.context_block.attn.qkv", [inner] * 3)
        r.linear(f"{dst}.attn.to_out.0", f"{src}.x_block.attn.proj")
        if not last:
            r.linear(f"{dst}.attn.to_add_out", f"{src}.context_block.attn.proj")
        if config.qk_norm:
            for name, stream, norm in (("norm_q", "x_block", "ln_q"), ("norm_k", "x_block", "ln_k"),
                                       ("norm_added_q", "context_block", "ln_q"),
                                       ("norm_added_k", "context_block", "ln_k")):
                r.out[f"{dst}.attn.{name}.weight"] = r.take(f"{src}.{stream}.attn.{norm}.weight")
        if i in config.dual_attention_layers:
            r.split([f"{dst}.attn2.{n}" for n in ("to_q", "to_k", "to_v")], f"{src}.x_block.attn2.qkv", [inner] * 3)
            r.linear(f"{dst}.attn2.to_out.0", f"{src}.x_block.attn2.proj")
            if config.qk_norm:
                r.out[f"{dst}.attn2.norm_q.weight"] = r.take(f"{src}.x_block.attn2.ln_q.weight")
                r.out[f"{dst}.attn2.norm_k.weight"] = r.take(f"{src}.x_block.attn2.ln_k.weight")
        r.linear(f"{dst}.norm1.linear", f"{src}.x_block.adaLN_modulation.1")
        r.linear(f"{dst}.norm1_context.linear", f"{src}.context_block.adaLN_modulation.1",
                 swap_scale_shift if last else None)
        r.linear(f"{dst}.ff.net.0.proj", f"{src}.x_block.mlp.fc1")
        r.linear(f"{dst}.ff.net.2", f"{src}.x_block.mlp.fc2")
        if not last:
            r.linear(f"{dst}.ff_context.net.0.proj", f"{src}.context_block.mlp.fc1")
            r.linear(f"{dst}.ff_context.net.2", f"{src}.context_block.mlp.fc2")
    r.linear("proj_out", "final_layer.linear")
    r.linear("norm_out.linear", "final_layer.adaLN_modulation.1", swap_scale_shift)
    return r.finish()


__all__ = ["is_sd3_state_dict", "sd3_config", "convert_sd3"]
