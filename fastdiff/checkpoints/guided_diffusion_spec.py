"""A guided-diffusion (or improved-diffusion) UNet checkpoint -> (native config, native state dict, ModelSpec): the
facts the weights cannot say, settled here (heads, super-resolution, the sampling each file's official script runs),
each with a note naming the load option that says otherwise."""

from __future__ import annotations

from typing import Optional

from ..errors import BadArgumentError
from .diffusers_folder import spec_for
from .guided_diffusion import conv_resampling, convert_guided_diffusion, guided_diffusion_config, released_num_heads
from .presets import GUIDED_DIFFUSION_SCHEDULER, GUIDED_DIFFUSION_SUPER_RES_SCHEDULER


def read_guided_diffusion(state: dict, path: str, *, num_heads: Optional[int] = None,
                          head_channels: Optional[int] = None, attention_order: Optional[str] = None,
                          super_res: Optional[bool] = None) -> tuple:
    """(UNetConfig, converted state dict, ModelSpec) of an ADM ``UNetModel`` / ``SuperResModel`` state dict."""
    released = released_num_heads(state) if num_heads is None and head_channels is None else None
    # conv resampling: a model of script_util's defaults (guided-diffusion's, improved-diffusion's), whose
    # num_heads=4 is a better guess than the released resblock_updown models' 64 channels per head
    by_default = num_heads is None and head_channels is None and not released and conv_resampling(state)
    cfg = guided_diffusion_config(state, num_heads=num_heads or (released and released[0]) or
                                  (4 if by_default else None), head_channels=head_channels)
    sr = cfg.in_channels == 6 and cfg.out_channels in (3, 6) and super_res is not False  # a SuperResModel
    # image_sample.py's DDIM; sampler="ddpm": its p_sample, from the learned range of learn_sigma (else
    # FIXED_LARGE); an upsampler: super_res_sample.py's p_sample_loop
    spec = spec_for("unet", cfg, GUIDED_DIFFUSION_SUPER_RES_SCHEDULER if sr else GUIDED_DIFFUSION_SCHEDULER,
                    source=f"guided-diffusion checkpoint {path}")
    if by_default:
        spec.notes.append("conv resampling (resblock_updown=False): script_util's default num_heads=4 assumed "
                          "(num_heads= / head_channels= for another split)")
    if released:
        spec.notes.append(f"taken as OpenAI's {released[1]} (its layout): num_heads={released[0]}, as trained "
                          f"(head_channels= / num_heads= for another split)")
    if sr:  # RGB + the low-resolution image upsampled to the sample size
        spec.in_channels, spec.low_res_channels = 3, 3
        spec.learned_variance = cfg.out_channels == 6
        spec.notes.append("guided-diffusion super-resolution model (6 input channels: the sample and its "
                          "low-resolution image, upsampled bilinearly; super_res=False for a plain 6-channel "
                          "model): generate(image=LOW_RES), --image; the output defaults to 4x the image "
                          "(both released upsamplers'); sampled as super_res_sample.py (DDPM on the respaced "
                          "timesteps, x0 clipped; its README runs 250 steps)")
    elif super_res:
        raise BadArgumentError(f"super_res=True: {path} takes {cfg.in_channels} input channels and returns "
                               f"{cfg.out_channels}; a guided-diffusion upsampler takes 6 (RGB and the "
                               f"low-resolution image) and returns 3, or 6 with learn_sigma")
    spec.scheduler["variance_type"] = "learned_range" if spec.learned_variance else "fixed_large"
    order = attention_order or "legacy"
    heads = ("" if by_default or released or num_heads or head_channels else
             "64 channels per head unless num_heads= / head_channels= is given; ")
    spec.notes.append(f"guided-diffusion: {heads}linear betas unless scheduler= says otherwise (cosine-schedule "
                      f"models: scheduler=fastdiff.checkpoints.presets.GUIDED_DIFFUSION_COSINE_SCHEDULER, --scheduler "
                      f"guided-diffusion-cosine); {order} attention order (attention_order='new' for "
                      f"use_new_attention_order models); default size {cfg.sample_size} px from its "
                      f"{len(cfg.block_out_channels)} levels, as ADM's create_model pairs them (height= / width= for "
                      f"another)")
    return cfg, convert_guided_diffusion(state, cfg, order), spec
