"""Inpainting (``generate(image=..., mask_image=...)`` on an inpainting UNet) against diffusers'
StableDiffusionInpaintPipeline / StableDiffusionXLInpaintPipeline on the same weights, embeddings, images, masks and
generators; and its checks."""

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff.errors import BadArgumentError
from helpers import diffusers_pipeline, perturb_, rel_err
from test_img2img import SD_SCHEDULER, SD_UNET, SEEDS, _folder, _generators, _images
from test_vae import SD_VAE, _reference as vae_reference

diffusers = pytest.importorskip("diffusers", reason="diffusers' inpainting pipelines are the reference")

INPAINT_UNET = dict(SD_UNET, in_channels=9)  # 4 latents + 1 mask + 4 masked-image latents


def _masks(b=2, size=16, seed=5):
    """Soft masks in [0, 1] (binarized at 0.5 by both sides), with values on both sides of the threshold."""
    return torch.rand(b, 1, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def sd_inpaint():
    torch.manual_seed(0)
    unet = perturb_(diffusers.UNet2DConditionModel(**INPAINT_UNET).eval(), 0)
    g = torch.Generator().manual_seed(1)
    embeds = dict(prompt_embeds=torch.randn(2, 5, 12, generator=g),
                  negative_prompt_embeds=torch.randn(2, 5, 12, generator=g))
    return unet, vae_reference(SD_VAE, seed=2), embeds


def _sd_pair(parts, folder, cls="DDIMScheduler", **config):
    unet, vae, _ = parts
    scheduler = getattr(diffusers, cls).from_config({**SD_SCHEDULER, **config})
    pipe = fastdiff.load(_folder(folder, "unet", unet, scheduler, vae, "StableDiffusionInpaintPipeline"))
    ref = diffusers_pipeline("StableDiffusionInpaintPipeline")(
        vae=vae, unet=unet, scheduler=scheduler, text_encoder=None, tokenizer=None, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return pipe, ref


@pytest.mark.parametrize("cls, steps, strength, cfg", [
    ("DDIMScheduler", 6, 1.0, 1.0),  # the pipeline's default strength: pure noise, the image not encoded
    ("DDIMScheduler", 6, 1.0, 4.0),
    ("EulerDiscreteScheduler", 8, 0.6, 4.0),  # part-way: the image's latents noised, as img2img
    ("DPMSolverMultistepScheduler", 10, 0.7, 3.0),
    ("EulerAncestralDiscreteScheduler", 5, 1.0, 3.0),
])
def test_sd_inpainting_equals_diffusers(sd_inpaint, tmp_path, cls, steps, strength, cfg):
    pipe, ref = _sd_pair(sd_inpaint, tmp_path, cls)
    e = sd_inpaint[2]
    assert pipe.spec.inpainting and pipe.spec.in_channels == 4
    images, masks = _images(), _masks()
    want = ref(image=images.clone(), mask_image=masks.clone(), strength=strength, num_inference_steps=steps,
               guidance_scale=cfg, prompt_embeds=e["prompt_embeds"], negative_prompt_embeds=e["negative_prompt_embeds"],
               generator=_generators(), output_type="latent", height=16, width=16).images
    kw = dict(steps=steps, cfg_scale=cfg, seeds=SEEDS, encoder_hidden_states=e["prompt_embeds"],
              negative_encoder_hidden_states=e["negative_prompt_embeds"], progress=False)
    got = pipe.generate(image=images, mask_image=masks, strength=strength if strength != 1.0 else None, **kw)
    assert got.shape == (2, 4, 8, 8)
    assert rel_err(got, want) <= 1e-5
    # the mask and the image reach the result
    assert rel_err(got, pipe.generate(image=images, mask_image=1 - masks, strength=strength, **kw)) > 1e-3
    assert rel_err(got, pipe.generate(image=images.flip(0), mask_image=masks, strength=strength, **kw)) > 1e-3


def test_pil_and_numpy_masks_and_one_mask_for_every_image(sd_inpaint, tmp_path):
    """A PIL mask is read in grayscale (an RGB one too), a uint8 array as pixels; one mask serves every image."""
    from PIL import Image

    pipe, ref = _sd_pair(sd_inpaint, tmp_path)
    e = sd_inpaint[2]
    images = _images()
    pixels = (np.random.default_rng(0).random((16, 16)) * 255).astype(np.uint8)
    mask = Image.fromarray(pixels).convert("RGB")
    want = ref(image=images.clone(), mask_image=mask, num_inference_steps=4, guidance_scale=1.0,
               prompt_embeds=e["prompt_embeds"], generator=_generators(), output_type="latent", height=16,
               width=16).images
    kw = dict(steps=4, seeds=SEEDS, encoder_hidden_states=e["prompt_embeds"], progress=False)
    assert rel_err(pipe.generate(image=images, mask_image=mask, **kw), want) <= 1e-5
    assert rel_err(pipe.generate(image=images, mask_image=pixels, **kw), want) <= 1e-5
    assert rel_err(pipe.generate(image=images, mask_image=torch.from_numpy(pixels / 255.0).float(), **kw),
                   want) <= 1e-5  # an (H, W) tensor


@pytest.mark.parametrize("kwargs, match", [
    (dict(mask_image=None), "image / mask_image: this is an inpainting network.*found image only"),
    (dict(image=None), "found mask_image only"),
    (dict(image=None, mask_image=None), "found neither"),
    (dict(mask_image=torch.rand(1, 1, 8, 8)), r"mask_image: expected the image's size \(16, 16\), found \(8, 8\)"),
    (dict(mask_image=torch.rand(3, 1, 16, 16)), "mask_image: expected 1 or 2 masks"),
    (dict(mask_image=torch.rand(1, 3, 16, 16)), r"mask_image: expected a tensor \(1, H, W\)"),
    (dict(mask_image=torch.rand(1, 16, 16) * 3), r"mask_image: expected a float tensor with values in \[0, 1\]"),
    (dict(image=torch.randn(2, 4, 2, 2)), "an inpainting network takes the image in pixels"),
    (dict(strength=0.1), "leaves no step to run"),
])
def test_bad_inpainting_arguments_are_refused_by_name(sd_inpaint, tmp_path, kwargs, match):
    pipe, _ = _sd_pair(sd_inpaint, tmp_path)
    e = sd_inpaint[2]
    kw = dict(image=_images(), mask_image=_masks(b=1), steps=4, seeds=SEEDS, encoder_hidden_states=e["prompt_embeds"],
              progress=False)
    with pytest.raises(BadArgumentError, match=match):
        pipe.generate(**{**kw, **kwargs})


def test_a_regular_model_refuses_a_mask():
    pipe = fastdiff.load("arch:tiny-unet")
    with pytest.raises(BadArgumentError, match="mask_image: inpainting needs an inpainting network"):
        pipe.generate(image=torch.rand(1, pipe.spec.in_channels, 16, 16), mask_image=torch.rand(1, 16, 16), steps=2,
                      progress=False)
