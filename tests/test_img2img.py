"""Image-to-image (``generate(image=..., strength=...)``) against diffusers' img2img pipelines on the same weights,
embeddings, images and generators: Stable Diffusion (each scheduler family), SDXL and SD3; and its checks."""

import json
import os

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff.errors import BadArgumentError
from fastdiff.img2img import image_tensor, start_index
from helpers import diffusers_pipeline, perturb_, rel_err
from test_vae import SD_VAE, _reference as vae_reference

diffusers = pytest.importorskip("diffusers", reason="diffusers' img2img pipelines are the reference")

SD_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
               down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
               up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=12, attention_head_dim=4,
               norm_num_groups=8)
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                    clip_sample=False, set_alpha_to_one=False, timestep_spacing="leading")
SEEDS = [3, 11]


def _folder(folder, model_dir, model, scheduler, vae, class_name) -> str:
    model.save_pretrained(os.path.join(folder, model_dir))
    scheduler.save_pretrained(os.path.join(folder, "scheduler"))
    vae.save_pretrained(os.path.join(folder, "vae"))
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump({"_class_name": class_name}, f)
    return str(folder)


def _images(b=2, size=16, seed=4):
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed))  # [0, 1], diffusers' range


def _generators():
    return [torch.Generator().manual_seed(s) for s in SEEDS]


@pytest.fixture(scope="module")
def sd_parts():
    torch.manual_seed(0)
    unet = perturb_(diffusers.UNet2DConditionModel(**SD_UNET).eval(), 0)
    g = torch.Generator().manual_seed(1)
    embeds = dict(prompt_embeds=torch.randn(2, 5, 12, generator=g), negative_prompt_embeds=torch.randn(2, 5, 12, generator=g))
    return unet, vae_reference(SD_VAE, seed=2), embeds


# (class, steps, strength, config): third-order DPM-Solver's 20 steps at 0.5 run 10, at full order to the end (its
# "fewer than 15 steps" rule counts the 20); at 8 steps its last two drop order
SCHEDULERS = {
    "ddim": ("DDIMScheduler", 10, 0.65, {}),
    "euler": ("EulerDiscreteScheduler", 10, 0.8, {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", 6, 0.5, {}),
    "dpmpp_3m": ("DPMSolverMultistepScheduler", 20, 0.5, dict(solver_order=3, final_sigmas_type="sigma_min")),
    "dpmpp_3m_short": ("DPMSolverMultistepScheduler", 8, 0.75, dict(solver_order=3, final_sigmas_type="sigma_min")),
    "unipc": ("UniPCMultistepScheduler", 9, 0.7, {}),
    "heun": ("HeunDiscreteScheduler", 5, 0.6, {}),
}


@pytest.mark.parametrize("cfg", [1.0, 4.0])
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_sd_img2img_equals_diffusers(sd_parts, tmp_path, name, cfg):
    unet, vae, e = sd_parts
    cls, steps, strength, config = SCHEDULERS[name]
    scheduler = getattr(diffusers, cls).from_config({**SD_SCHEDULER, **config})
    pipe = fastdiff.load(_folder(tmp_path, "unet", unet, scheduler, vae, "StableDiffusionPipeline"))
    ref = diffusers_pipeline("StableDiffusionImg2ImgPipeline")(
        vae=vae, unet=unet, scheduler=scheduler, text_encoder=None, tokenizer=None, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    images = _images()
    want = ref(image=images.clone(), strength=strength, num_inference_steps=steps, guidance_scale=cfg,
               prompt_embeds=e["prompt_embeds"], negative_prompt_embeds=e["negative_prompt_embeds"],
               generator=_generators(), output_type="latent").images
    got = pipe.generate(image=images, strength=strength, steps=steps, cfg_scale=cfg, seeds=SEEDS,
                        encoder_hidden_states=e["prompt_embeds"],
                        negative_encoder_hidden_states=e["negative_prompt_embeds"], progress=False)
    assert got.shape == (2, 4, 8, 8)
    assert rel_err(got, want) <= 1e-5
    assert rel_err(got, pipe.generate(image=images.flip(0), strength=strength, steps=steps, cfg_scale=cfg, seeds=SEEDS,
                                      encoder_hidden_states=e["prompt_embeds"],
                                      negative_encoder_hidden_states=e["negative_prompt_embeds"],
                                      progress=False)) > 1e-3  # the image reaches the result


def _text_kwargs(e: dict, guided: bool) -> dict:
    """diffusers' embedding arguments as generate()'s (the negatives only when guided)."""
    kw = dict(encoder_hidden_states=e["prompt_embeds"], text_embeds=e["pooled_prompt_embeds"])
    if guided:
        kw.update(negative_encoder_hidden_states=e["negative_prompt_embeds"],
                  negative_text_embeds=e["negative_pooled_prompt_embeds"])
    return kw


@pytest.mark.parametrize("cfg", [1.0, 5.0])
def test_sdxl_img2img_equals_diffusers(tmp_path, cfg):
    """SDXL's img2img: its default strength 0.3, micro-conditioning of the image's own size."""
    from test_sdxl import SCHEDULER, UNET

    torch.manual_seed(0)
    unet = perturb_(diffusers.UNet2DConditionModel(**UNET).eval(), 0)
    scheduler = diffusers.EulerDiscreteScheduler(**SCHEDULER)
    vae = vae_reference(dict(SD_VAE, scaling_factor=0.13025), seed=2)
    pipe = fastdiff.load(_folder(tmp_path, "unet", unet, scheduler, vae, "StableDiffusionXLPipeline"))
    ref = diffusers_pipeline("StableDiffusionXLImg2ImgPipeline")(
        vae=vae, unet=unet, scheduler=scheduler, text_encoder=None, text_encoder_2=None, tokenizer=None,
        tokenizer_2=None, requires_aesthetics_score=False)
    ref.set_progress_bar_config(disable=True)
    from test_sdxl import _embeds

    e, images = {k: v for k, v in _embeds().items() if k != "latents"}, _images()
    want = ref(image=images.clone(), num_inference_steps=10, guidance_scale=cfg, generator=_generators(),
               output_type="latent", **{k: v.clone() for k, v in e.items()}).images
    # (fastdiff's default ids take every SDXL VAE's 8 pixels per latent pixel; this tiny VAE has 2)
    got = pipe.generate(image=images, steps=10, cfg_scale=cfg, seeds=SEEDS, progress=False,
                        time_ids=[16, 16, 0, 0, 16, 16], **_text_kwargs(e, cfg != 1.0))  # strength: SDXL's default, 0.3
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("cfg", [1.0, 4.5])
def test_sd3_img2img_equals_diffusers(tmp_path, cfg):
    """SD3's img2img: flow matching (x_t = (1 - t) x0 + t eps), a VAE shift factor, and its own step rounding
    (10 steps at 0.65 run 7 where SD's rounding runs 6)."""
    from test_sd3 import CONFIGS, _embeds, _reference

    transformer = _reference(CONFIGS["sd3.5-large"])
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    vae = vae_reference(dict(SD_VAE, scaling_factor=1.5305, shift_factor=0.0609), seed=2)
    pipe = fastdiff.load(_folder(tmp_path, "transformer", transformer, scheduler, vae, "StableDiffusion3Pipeline"))
    ref = diffusers_pipeline("StableDiffusion3Img2ImgPipeline")(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    ref.set_progress_bar_config(disable=True)
    e = {k: v for k, v in _embeds().items() if k != "latents" and (cfg != 1.0 or not k.startswith("negative"))}
    images = _images()
    want = ref(image=images.clone(), strength=0.65, num_inference_steps=10, guidance_scale=cfg,
               generator=_generators(), output_type="latent", **{k: v.clone() for k, v in e.items()}).images
    steps_run = []
    got = pipe.generate(image=images, strength=0.65, steps=10, cfg_scale=cfg, seeds=SEEDS, progress=False,
                        callback=steps_run.append, **_text_kwargs(e, cfg != 1.0))
    assert rel_err(got, want) <= 2e-5
    assert len(steps_run) == 7
