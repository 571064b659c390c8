"""FLUX.1 single files (Black Forest Labs' layout: ``double_blocks.N.img_attn.qkv``, ``single_blocks.N.linear1``, ...;
also with ComfyUI's ``model.diffusion_model.`` prefix) -> the native Flux (diffusers' names).

The fused projections are split as diffusers' ``convert_flux_transformer_checkpoint_to_diffusers`` splits them
(q / k / v; a single block's ``linear1`` into q, k, v and the MLP's input) and the output norm's (shift, scale) rows
are swapped. The architecture comes from the shapes; what they do not say: the rotary axes, (16, 56, 56) as in
every FLUX.1 release (head dim 128), and the resolution (1024 px). BFL ships the VAE apart (``ae.safetensors``):
pass ``vae=`` a diffusers AutoencoderKL folder for images.
"""

from __future__ import annotations

import re

import torch

from ..errors import CheckpointError
from ..models.flux import FluxConfig
from .common import Renamer, RequiredKeys, swap_scale_shift

PREFIX = "model.diffusion_model."
MARKER = "double_blocks.0.img_attn.qkv.weight"
FLUX_AXES = (16, 56, 56)


def is_flux_state_dict(state: dict) -> bool:
    return MARKER in state or PREFIX + MARKER in state


def _keys(state: dict) -> RequiredKeys:
    if PREFIX + MARKER in state:
        return RequiredKeys({k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)},
                            "a FLUX.1 single file", PREFIX)
    return RequiredKeys({k: v for k, v in state.items() if not k.startswith(("vae.", "text_encoders."))},
                        "a FLUX.1 single file")


def _count(sd, pattern: str) -> int:
    return len({int(m.group(1)) for k in sd if (m := re.match(pattern, k))})


def flux_single_config(state: dict) -> FluxConfig:
    sd = _keys(state)
    inner, in_channels = sd["img_in.weight"].shape
    head_dim = sd["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
    if head_dim != sum(FLUX_AXES):
        raise CheckpointError(f"FLUX single file with head dim {head_dim}: its rotary axes are unknown (FLUX.1's "
                              f"{FLUX_AXES} sum to {sum(FLUX_AXES)})")
    out_channels = sd["final_layer.linear.weight"].shape[0]  # (FLUX.1 Fill: fewer than in_channels)
    return FluxConfig(in_channels=in_channels, out_channels=None if out_channels == in_channels else out_channels,
                      num_layers=_count(sd, r"double_blocks\.(\d+)\."),
                      num_single_layers=_count(sd, r"single_blocks\.(\d+)\."), attention_head_dim=head_dim,
                      num_attention_heads=inner // head_dim, joint_attention_dim=sd["txt_in.weight"].shape[1],
                      pooled_projection_dim=sd["vector_in.in_layer.weight"].shape[1],
                      guidance_embeds="guidance_in.in_layer.weight" in sd, axes_dims_rope=FLUX_AXES)


def convert_flux_single(state: dict, config: FluxConfig) -> dict[str, torch.Tensor]:
    r = Renamer(_keys(state), "FLUX single file (LoRA-merged extras are not supported)")
    inner = config.inner_dim
    r.linear("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer")
    r.linear("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer")
    r.linear("time_text_embed.text_embedder.linear_1", "vector_in.in_layer")
    r.linear("time_text_embed.text_embedder.linear_2", "vector_in.out_layer")
    if config.guidance_embeds:
        r.linear("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer")
        r.linear("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer")
    r.linear("context_embedder", "txt_in")
    r.linear("x_embedder", "img_in")
    for i in range(config.num_layers):
        s, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        r.linear(f"{d}.norm1.linear", f"{s}.img_mod.lin")
        r.linear(f"{d}.norm1_context.linear", f"{s}.txt_mod.lin")
        r.split([f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"], f"{s}.img_attn.qkv", [inner] * 3)
        r.split([f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"], f"{s}.txt_attn.qkv",
                [inner] * 3)
        for dst, src in (("norm_q", "img_attn.norm.query_norm"), ("norm_k", "img_attn.norm.key_norm"),
                         ("norm_added_q", "txt_attn.norm.query_norm"), ("norm_added_k", "txt_attn.norm.key_norm")):
            r.out[f"{d}.attn.{dst}.weight"] = r.take(f"{s}.{src}.scale")
        r.linear(f"{d}.ff.net.0.proj", f"{s}.img_mlp.0")
        r.linear(f"{d}.ff.net.2", f"{s}.img_mlp.2")
        r.linear(f"{d}.ff_context.net.0.proj", f"{s}.txt_mlp.0")
        r.linear(f"{d}.ff_context.net.2", f"{s}.txt_mlp.2")
        r.linear(f"{d}.attn.to_out.0", f"{s}.img_attn.proj")
        r.linear(f"{d}.attn.to_add_out", f"{s}.txt_attn.proj")
    for i in range(config.num_single_layers):
        s, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        r.linear(f"{d}.norm.linear", f"{s}.modulation.lin")
        r.split([f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp"], f"{s}.linear1",
                [inner, inner, inner, 4 * inner])
        r.out[f"{d}.attn.norm_q.weight"] = r.take(f"{s}.norm.query_norm.scale")
        r.out[f"{d}.attn.norm_k.weight"] = r.take(f"{s}.norm.key_norm.scale")
        r.linear(f"{d}.proj_out", f"{s}.linear2")
    r.linear("proj_out", "final_layer.linear")
    r.linear("norm_out.linear", "final_layer.adaLN_modulation.1", swap_scale_shift)
    return r.finish()


__all__ = ["is_flux_state_dict", "flux_single_config", "convert_flux_single"]
