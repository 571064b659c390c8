"""Stable Diffusion single-file checkpoints (CompVis / Stability ``ldm`` UNetModel) -> native UNet.

The UNet keys live under ``model.diffusion_model.``; the native UNet uses diffusers' layout, so this is
the one place that renames ``input_blocks.K.J`` / ``middle_block`` / ``output_blocks`` into
``down_blocks`` / ``mid_block`` / ``up_blocks`` and infers the architecture from the tensor shapes.

What the weights do not say: the attention head count (SD 1.x uses 8 heads, SD 2.x and SDXL 64 channels per
head: that is the default guess, from conv vs linear projections), and the prediction type and resolution
(SD 2.x 768 models predict v: ``single_file_sampling`` guesses as diffusers does). Both can be given to
``fastdiff.load(..., num_heads=, prediction_type=)``. SDXL files (base and refiner) are recognised by their
``label_emb`` (the pooled-text and size / crop conditioning) and their per-level transformer depths.
"""

from __future__ import annotations

import re
from typing import Optional

import torch

from ..errors import CheckpointError
from ..models.unet import UNetConfig
from .common import RequiredKeys

PREFIX = "model.diffusion_model."
RESNET_PARTS = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def is_ldm_state_dict(state: dict) -> bool:
    """An ldm UNet: prefixed single-file keys, or bare UNet keys with spatial transformers."""
    if any(k.startswith(PREFIX + "input_blocks.0.0.") for k in state):
        return True
    return "input_blocks.0.0.weight" in state and any(".transformer_blocks." in k for k in state)


def _unet_keys(state: dict) -> RequiredKeys:
    """The UNet's tensors by their ldm names (the prefix removed); a missing one is named with its prefix."""
    if not any(k.startswith(PREFIX) for k in state):
        return RequiredKeys(dict(state), "an ldm UNet")  # a bare UNet state dict
    return RequiredKeys({k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)},
                        "a Stable Diffusion single-file UNet", PREFIX)


# What a Stable Diffusion single file holds beside its UNet: the VAE, the text encoders (ldm's cond_stage_model, sgm's
# conditioner), the EMA copy, sgm's denoiser sigmas, old textual-inversion managers, and LatentDiffusion's schedule
# buffers (its betas and what it derives from them)
SINGLE_FILE_PARTS = ("first_stage_model", "cond_stage_model", "conditioner", "model_ema", "denoiser",
                     "embedding_manager")
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "lvlb_weights", "scale_factor")


def single_file_notes(state: dict) -> list[str]:
    """Notes on what a single file holds that the load did not use: its EMA weights (diffusers' from_single_file
    reads the non-EMA UNet too, and warns), and keys of no part a single file has (a ControlNet's, say)."""
    if not any(k.startswith(PREFIX) for k in state):
        return []  # (a bare UNet state dict)
    notes = []
    if any(k.startswith("model_ema.") for k in state):
        notes.append("the file holds EMA weights too (model_ema.*): its non-EMA UNet (model.diffusion_model.*) was "
                     "loaded, as diffusers' from_single_file does")
    other: dict = {}
    for k in state:
        head = k.split(".", 1)[0]
        if k.startswith(PREFIX) or head in SINGLE_FILE_PARTS or k in SCHEDULE_BUFFERS:
            continue
        group = head + (".*" if "." in k else "")
        other[group] = other.get(group, 0) + 1
    if other:
        shown = ", ".join(f"{g} ({n})" for g, n in sorted(other.items())[:6])
        notes.append(f"keys of no Stable Diffusion part were not read: {shown}"
                     + (f" and {len(other) - 6} more groups" if len(other) > 6 else ""))
    return notes


def ldm_unet_config(state: dict, num_heads: Optional[int] = None) -> UNetConfig:
    """Infer the UNet2DConditionModel config of an ldm UNet from its tensors."""
    sd = _unet_keys(state)
    if "input_blocks.0.0.weight" not in sd:
        raise CheckpointError("not an ldm UNet: expected model.diffusion_model.input_blocks.0.0.weight")
    in_ch = sd["input_blocks.0.0.weight"].shape[1]
    out_ch = sd["out.2.weight"].shape[0]
    n_in = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("input_blocks."))
    downs = sorted({int(k.split(".")[1]) for k in sd if re.match(r"input_blocks\.\d+\.0\.op\.weight", k)})
    levels = len(downs) + 1
    per_level = (n_in - 1 - len(downs)) // levels  # num_res_blocks
    channels, attn, depth = [], [], []
    for lvl in range(levels):
        first = 1 + lvl * (per_level + 1)
        channels.append(sd[f"input_blocks.{first}.0.out_layers.3.weight"].shape[0])
        has_attn = f"input_blocks.{first}.1.proj_in.weight" in sd
        attn.append(has_attn)
        depth.append(len({k.split(".")[4] for k in sd if k.startswith(f"input_blocks.{first}.1.transformer_blocks.")})
                     if has_attn else 1)
    any_attn = next((k for k in sd if k.endswith("attn2.to_k.weight")), None)
    if any_attn is None:
        raise CheckpointError("ldm UNet without cross-attention (no attn2.to_k weights): not a Stable Diffusion UNet")
    context_dim = sd[any_attn].shape[1]
    linear = sd[any_attn.split("transformer_blocks")[0] + "proj_in.weight"].dim() == 2
    if num_heads is not None:
        heads = [num_heads] * levels
    elif linear:  # SD 2.x: num_head_channels = 64
        heads = [max(c // 64, 1) for c in channels]
    else:  # SD 1.x: num_heads = 8
        heads = [8] * levels
    mid_depth = len({k.split(".")[3] for k in sd if k.startswith("middle_block.1.transformer_blocks.")})
    if mid_depth and attn[-1] and mid_depth != depth[-1]:  # diffusers gives the mid block the last level's depth
        raise CheckpointError(f"ldm UNet with a mid-block transformer depth {mid_depth} other than its last level's "
                              f"({depth[-1]}): not supported")
    if mid_depth and not attn[-1]:
        depth[-1] = mid_depth  # (a level without attention has no depth of its own; the mid block reads this one)
    if len({d for d, a in zip(depth, attn) if a} | ({mid_depth} if mid_depth else set())) == 1:
        depth = [max(depth)] * levels  # one depth everywhere (SD 1.x / 2.x, the SDXL refiner): an int
    up_depth = _output_depths(sd, levels, per_level, depth)
    return UNetConfig.from_diffusers(dict(
        sample_size=64, in_channels=in_ch, out_channels=out_ch, block_out_channels=channels,
        layers_per_block=per_level, cross_attention_dim=context_dim, attention_head_dim=heads,
        use_linear_projection=linear, transformer_layers_per_block=depth[0] if len(set(depth)) == 1 else depth,
        reverse_transformer_layers_per_block=up_depth,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        mid_block_type="UNetMidBlock2DCrossAttn" if mid_depth else "UNetMidBlock2D",
        **_label_embedding(sd, context_dim),
    ), "UNet2DConditionModel")


def _output_depths(sd: RequiredKeys, levels: int, per_level: int, down: list) -> Optional[list[list[int]]]:
    """Transformer depth of every up-path layer (up block i = level levels-1-i) where it differs from the down
    path's depth of that level (diffusers' reverse_transformer_layers_per_block); None where none does."""
    def depth(k, default):
        found = {key.split(".")[4] for key in sd if key.startswith(f"output_blocks.{k}.1.transformer_blocks.")}
        return len(found) or default
    up = [[depth(i * (per_level + 1) + j, down[levels - 1 - i]) for j in range(per_level + 1)] for i in range(levels)]
    return None if up == [[d] * (per_level + 1) for d in down[::-1]] else up


# SDXL's size / crop / aesthetic-score embedder (sgm ConcatTimestepEmbedderND): 256 sinusoids per id
SDXL_TIME_EMBED_DIM = 256


# text-state widths of SDXL base (CLIP-L + OpenCLIP-bigG) and refiner (bigG alone): diffusers' single-file test too
SDXL_CONTEXT_DIMS = (2048, 1280)


def _label_embedding(sd: RequiredKeys, context_dim: int) -> dict:
    """The config of an SDXL-style ``label_emb`` (sgm's "sequential" adm: Linear -> SiLU -> Linear on the pooled
    text and the embedded size / crop ids), or {} without one."""
    if "label_emb.0.0.weight" not in sd:
        if any(k.startswith("label_emb.") for k in sd):
            raise CheckpointError("ldm UNet with a class-label table (label_emb as an embedding): not supported; "
                                  "SDXL's sequential label_emb.0.0 / label_emb.0.2 is")
        return {}
    if context_dim not in SDXL_CONTEXT_DIMS:  # SD 2.x unCLIP: the same layout, but an image-embedding input
        raise CheckpointError(f"ldm UNet with a label_emb and {context_dim}-wide text states: an SD 2.x unCLIP "
                              f"(image-variation) UNet, not supported (SDXL's label_emb comes with "
                              f"{' or '.join(map(str, SDXL_CONTEXT_DIMS))}-wide text states)")
    return dict(addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
                projection_class_embeddings_input_dim=int(sd["label_emb.0.0.weight"].shape[1]))


# SD 2.x's 512 "base" model was saved at this global step; every other SD 2.x file is taken as the 768 v-model
SD2_BASE_GLOBAL_STEP = 875000


def single_file_sampling(config: UNetConfig, checkpoint) -> tuple[str, int, str]:
    """(prediction type, latent size, note) for a Stable Diffusion single file, guessed as diffusers'
    ``from_single_file`` does when no config comes with it: an SD 1.x UNet (768-wide text states) is
    epsilon at 512x512; an SD 2.x UNet (1024-wide OpenCLIP states) is v-prediction at 768x768 unless the
    file's ``global_step`` is the 512 base model's."""
    if config.addition_embed_type == "text_time":
        return "epsilon", 128, ("SDXL-style single file: epsilon prediction at 1024x1024 (128x128 latents), as "
                                "SDXL base and refiner are; pass prediction_type= for a v-prediction fine-tune")
    if config.cross_attention_dim != 1024:
        return "epsilon", 64, "SD 1.x-style single file: epsilon prediction at 512x512 (64x64 latents)"
    if config.in_channels == 2 * config.out_channels + 1:  # diffusers checks for an inpainting conv_in first
        return "epsilon", 64, ("SD 2.x inpainting single file: epsilon prediction at 512x512 (64x64 latents), as "
                               "stable-diffusion-2-inpainting is")
    step = checkpoint.get("global_step") if isinstance(checkpoint, dict) else None
    step = int(step) if isinstance(step, (int, torch.Tensor)) and not isinstance(step, bool) else None
    if step == SD2_BASE_GLOBAL_STEP:
        return "epsilon", 64, (f"SD 2.x single file at global_step {step} (the 512 base model): epsilon prediction "
                               f"at 512x512")
    return "v_prediction", 96, ("SD 2.x single file: v-prediction at 768x768 (96x96 latents), as diffusers guesses "
                                f"for SD 2.x files other than the 512 base model (global_step "
                                f"{SD2_BASE_GLOBAL_STEP}; this file: {step if step is not None else 'none'}); "
                                f"pass prediction_type= to override")


def convert_ldm_unet(state: dict, config: UNetConfig) -> dict[str, torch.Tensor]:
    """Rename an ldm UNet state dict into the native (diffusers) layout."""
    sd = _unet_keys(state)
    levels = len(config.block_out_channels)
    per = config.layers_per_block
    out: dict[str, torch.Tensor] = {}

    def put(new, old):
        out[new] = sd[old]

    def block(src: str, dst: str, kind: str):
        """Copy every tensor under ``src.`` to ``dst.``, renaming resnet sub-layers."""
        for k in [k for k in sd if k.startswith(src + ".")]:
            rest = k[len(src) + 1:]
            if kind == "resnet":
                for old, new in RESNET_PARTS.items():
                    if rest.startswith(old + "."):
                        rest = new + rest[len(old):]
                        break
            put(f"{dst}.{rest}", k)

    output_attention = {k for k in range(levels * (per + 1)) if f"output_blocks.{k}.1.proj_in.weight" in sd}
    for src, dst, kind in ldm_unet_blocks(config, output_attention):
        if kind == "layer":  # one required layer: a missing weight or bias is named
            put(f"{dst}.weight", f"{src}.weight")
            put(f"{dst}.bias", f"{src}.bias")
        else:
            block(src, dst, kind)
    leftover = sorted(set(sd) - _used(sd, out))
    if leftover:
        raise CheckpointError(f"ldm UNet: {len(leftover)} tensor(s) with no native counterpart (not supported): "
                              f"{leftover[:5]}")
    return out


def ldm_unet_blocks(config: UNetConfig, output_attention: set) -> list[tuple[str, str, str]]:
    """``(ldm prefix, native prefix, kind)`` for every part of a UNet of ``config``: ``kind`` "layer" (one layer),
    "resnet" (its sub-layers renamed by ``RESNET_PARTS``) or "block" (the same names below the prefix).
    ``output_attention``: the ldm ``output_blocks`` indices holding a spatial transformer (an upsampler follows it
    at sub-index 2 there, else at 1). Shared by the single-file reader and LoRA files in ldm names (kohya's SDXL)."""
    levels, per = len(config.block_out_channels), config.layers_per_block
    out = [("input_blocks.0.0", "conv_in", "layer"), ("time_embed.0", "time_embedding.linear_1", "layer"),
           ("time_embed.2", "time_embedding.linear_2", "layer")]
    if config.addition_embed_type == "text_time":  # SDXL: pooled text + size / crop ids
        out += [("label_emb.0.0", "add_embedding.linear_1", "layer"), ("label_emb.0.2", "add_embedding.linear_2",
                                                                          "layer")]
    for lvl in range(levels):
        for j in range(per):
            k = 1 + lvl * (per + 1) + j
            out += [(f"input_blocks.{k}.0", f"down_blocks.{lvl}.resnets.{j}", "resnet"),
                    (f"input_blocks.{k}.1", f"down_blocks.{lvl}.attentions.{j}", "block")]
        if lvl < levels - 1:
            out.append((f"input_blocks.{1 + lvl * (per + 1) + per}.0.op", f"down_blocks.{lvl}.downsamplers.0.conv",
                        "block"))
    out += [("middle_block.0", "mid_block.resnets.0", "resnet"), ("middle_block.1", "mid_block.attentions.0", "block"),
            ("middle_block.2", "mid_block.resnets.1", "resnet")]
    for lvl in range(levels):
        for j in range(per + 1):
            k = lvl * (per + 1) + j
            out.append((f"output_blocks.{k}.0", f"up_blocks.{lvl}.resnets.{j}", "resnet"))
            if k in output_attention:
                out.append((f"output_blocks.{k}.1", f"up_blocks.{lvl}.attentions.{j}", "block"))
            if lvl < levels - 1 and j == per:
                out.append((f"output_blocks.{k}.{2 if k in output_attention else 1}.conv",
                            f"up_blocks.{lvl}.upsamplers.0.conv", "block"))
    return out + [("out.0", "conv_norm_out", "layer"), ("out.2", "conv_out", "layer")]


def _used(sd: dict, out: dict) -> set:
    ids = {id(v) for v in out.values()}
    return {k for k, v in sd.items() if id(v) in ids}
