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
