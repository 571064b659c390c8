"""Named sources: ``arch:NAME`` (random weights of a well-known architecture) and ``builtin:NAME``."""

from __future__ import annotations

import os

import torch

from ..errors import BadArgumentError

PRESET_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "presets")

# What Stable Diffusion's diffusers folders ship: SD 1.x (and SD 2 base, epsilon) PNDM in its PLMS form, the
# 768-pixel v-prediction SD 2.x models DDIM.
SD_SCHEDULER = {"_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
                "steps_offset": 1, "set_alpha_to_one": False, "skip_prk_steps": True, "clip_sample": False,
                "timestep_spacing": "leading"}
SD_V_SCHEDULER = dict(SD_SCHEDULER, _class_name="DDIMScheduler", prediction_type="v_prediction")
# SDXL base / refiner folders: Euler on the same betas and spacing
SDXL_SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                  "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
                  "steps_offset": 1, "timestep_spacing": "leading", "interpolation_type": "linear",
                  "use_karras_sigmas": False}
# SD3 / SD3.5 pipeline folders: FlowMatchEuler with a fixed shift of 3
SD3_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
# FLUX.1 dev / schnell folders: FlowMatchEuler with resolution-dependent shifting (schnell: shift 1, static)
FLUX_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                  "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                  "max_image_seq_len": 4096}
FLUX_SCHNELL_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0,
                          "use_dynamic_shifting": False, "base_shift": 0.5, "max_shift": 1.15,
                          "base_image_seq_len": 256, "max_image_seq_len": 4096}
# SiT (Ma et al. 2024) checkpoints are official-DiT files with the linear-interpolant velocity objective: t = 0 is
# noise, the network takes t in [0, 1] and predicts data - noise. load(path, scheduler=SIT_SCHEDULER) reads them.
SIT_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0,
                 "flow_time_convention": "sit"}
# guided-diffusion's pixel models: the same betas, x0 clipped to [-1, 1] by DDIMScheduler's default clip_sample
# (its samplers' clip_denoised=True); samplers named in generate() run unclipped, as diffusers' other schedulers
ADM_SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001,
                 "beta_end": 0.02, "beta_schedule": "linear", "prediction_type": "epsilon"}
# what a guided-diffusion checkpoint samples with by default: image_sample.py's DDIM ("ddimN" respacing, or "N" where
# no stride gives N; x0 clipped by DDIMScheduler's default and eps recomputed from it), linear betas; and the same for
# the 1000-step cosine-schedule models (ADM's ImageNet 64): load(path, scheduler=GUIDED_DIFFUSION_COSINE_SCHEDULER)
GUIDED_DIFFUSION_SCHEDULER = dict(ADM_SCHEDULER, timestep_respacing="guided-diffusion-ddim")
GUIDED_DIFFUSION_COSINE_SCHEDULER = dict(GUIDED_DIFFUSION_SCHEDULER, beta_schedule="squaredcos_cap_v2")
# openai/improved-diffusion's 4000-step cosine models trained with rescale_timesteps (cifar10_uncond*,
# imagenet64_uncond*): image_sample.py's p_sample_loop (DDPM on the respaced timesteps, x0 clipped), the network
# reading t * 1000 / 4000; the checkpoint's learned range or fixed variance is kept. imagenet64_cond_270M_250K.pt was
# trained without rescaling: dict(IMPROVED_DIFFUSION_SCHEDULER, timestep_scale=None); upsample_cond_500K.pt on
# 4000 linear steps with improved-diffusion's betas scaled by 1000 / T: dict(IMPROVED_DIFFUSION_SCHEDULER,
# beta_schedule="linear", beta_start=2.5e-5, beta_end=0.005, timestep_scale=None). Its 1000-step models:
# GUIDED_DIFFUSION_SCHEDULER with sampler="ddpm" (image_sample.py's p_sample). Its image_sample.py runs every
# training step unless --timestep_respacing says otherwise: steps=4000 for that run.
IMPROVED_DIFFUSION_SCHEDULER = dict(ADM_SCHEDULER, _class_name="DDPMScheduler", num_train_timesteps=4000,
                                    beta_schedule="squaredcos_cap_v2", timestep_respacing="guided-diffusion",
                                    timestep_scale=0.25)
# guided-diffusion's upsamplers: super_res_sample.py's p_sample_loop (DDPM on the respaced "N" timesteps; x0 clipped by
# DDPMScheduler's default clip_sample), whatever its --use_ddim says
GUIDED_DIFFUSION_SUPER_RES_SCHEDULER = dict(ADM_SCHEDULER, _class_name="DDPMScheduler",
                                            timestep_respacing="guided-diffusion")
# (DiT's latents are not in [-1, 1]: no clipping, as the official sample.py (clip_denoised=False) and the DiT-XL-2
# folders' scheduler_config.json)
DIT_SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001,
                 "beta_end": 0.02, "beta_schedule": "linear", "prediction_type": "epsilon", "clip_sample": False}


def _unet_arch(make_config, scheduler, **spec_kw):
    def build():
        from .diffusers_folder import spec_for

        cfg = make_config()
        spec = spec_for("unet", cfg, scheduler, source="random weights")
        for k, v in spec_kw.items():
            setattr(spec, k, v)
        return cfg, spec
    return build


def _dit_arch(name: str, image_size: int, **overrides):
    def build():
        from ..models.dit import DiTConfig
        from .diffusers_folder import spec_for

        cfg = DiTConfig.from_name(name, input_size=image_size // 8, **overrides)
        spec = spec_for("dit", cfg, DIT_SCHEDULER, source="random weights")
        spec.guided_channels = 3  # official DiT guides the first 3 channels
        return cfg, spec
    return build


def _mmdit_arch(make_config):
    def build():
        from .diffusers_folder import spec_for

        cfg = make_config()
        return cfg, spec_for("mmdit", cfg, SD3_SCHEDULER, source="random weights")
    return build


def _flux_arch(make_config, sample_size=128):
    def build():
        from .diffusers_folder import spec_for

        cfg = make_config()
        spec = spec_for("flux", cfg, FLUX_SCHEDULER, source="random weights")
        spec.sample_size = (sample_size, sample_size)  # (Flux configs carry no size: 1024 px by default)
        return cfg, spec
    return build


def _arch_table():
    from ..models import flux, mmdit, unet, unet_config

    tiny_unet = lambda: unet.UNetConfig.from_diffusers(dict(  # noqa: E731
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=[32, 64], layers_per_block=1,
        down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"],
        norm_num_groups=8, attention_head_dim=16), "UNet2DModel")
    tiny_sd = lambda: unet.UNetConfig.from_diffusers(dict(  # noqa: E731
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=[32, 64], layers_per_block=1,
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8), "UNet2DConditionModel")
    tiny_sdxl = lambda: unet.UNetConfig.from_diffusers(dict(  # noqa: E731
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=[32, 64], layers_per_block=1,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
        cross_attention_dim=32, attention_head_dim=[2, 4], transformer_layers_per_block=[1, 2],
        use_linear_projection=True, norm_num_groups=8, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16 + 6 * 8), "UNet2DConditionModel")
    return {
        "sd3-medium": _mmdit_arch(lambda: mmdit.sd3_medium_config()),
        "tiny-sd3": _mmdit_arch(lambda: mmdit.MMDiTConfig(
            sample_size=8, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=4,
            joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=16, pos_embed_max_size=8,
            qk_norm="rms_norm", dual_attention_layers=(0,))),
        "flux-dev": _flux_arch(flux.flux_dev_config),
        "tiny-flux": _flux_arch(lambda: flux.FluxConfig(
            in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=24, pooled_projection_dim=12, guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
            sample_size=8),
        "sd15-unet": _unet_arch(unet_config.sd15_config, SD_SCHEDULER),
        "sdxl-unet": _unet_arch(unet_config.sdxl_config, SDXL_SCHEDULER),
        "sd21-unet": _unet_arch(unet_config.sd21_config, SD_V_SCHEDULER),
        "ddpm-cifar10": _unet_arch(unet_config.ddpm_cifar10_config, ADM_SCHEDULER),
        "dit-xl-2-256": _dit_arch("DiT-XL/2", 256),
        "dit-xl-2-512": _dit_arch("DiT-XL/2", 512),
        "tiny-unet": _unet_arch(tiny_unet, ADM_SCHEDULER),
        "tiny-sd-unet": _unet_arch(tiny_sd, SD_SCHEDULER),
        "tiny-sdxl-unet": _unet_arch(tiny_sdxl, SDXL_SCHEDULER),
        "tiny-dit": _dit_arch("DiT-S/2", 64, hidden_size=64, depth=2, num_heads=4, num_classes=10),
    }


ARCH_NAMES = ("sd15-unet", "sd21-unet", "sdxl-unet", "sd3-medium", "flux-dev", "ddpm-cifar10", "dit-xl-2-256",
              "dit-xl-2-512", "tiny-unet", "tiny-sd-unet", "tiny-sdxl-unet", "tiny-sd3", "tiny-flux", "tiny-dit")


def build_arch(name: str, device="cpu", dtype=None, seed: int = 0):
    """(model, spec): a well-known architecture with seeded random weights (for latency, not images)."""
    table = _arch_table()
    if name not in table:
        raise BadArgumentError(f"unknown architecture 'arch:{name}'; expected one of {sorted(table)}")
    from ..models import build_model

    cfg, spec = table[name]()
    torch.manual_seed(seed)
    model = build_model(spec.kind, cfg, device=device)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval(), spec


def builtin_names() -> list[str]:
    if not os.path.isdir(PRESET_DIR):
        return []
    return sorted(n for n in os.listdir(PRESET_DIR) if os.path.isfile(os.path.join(PRESET_DIR, n, "fastdiff.json")))


def builtin_path(name: str) -> str:
    path = os.path.join(PRESET_DIR, name)
    if name not in builtin_names():
        raise BadArgumentError(f"unknown preset 'builtin:{name}'; shipped presets: {builtin_names() or 'none'}")
    return path
