"""Image-to-image (``generate(image=..., strength=...)``) against diffusers' img2img pipelines on the same weights,
embeddings, images and generators: Stable Diffusion (each scheduler family), SDXL and SD3; and its checks."""

import json
import os

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff.errors import BadArgumentError
from fastdiff.img2img import start_index
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


def sd_unet_vae_embeds(**unet_config):
    """(a tiny SD UNet (SD_UNET with ``unet_config``), a VAE, prompt and negative embeddings)."""
    torch.manual_seed(0)
    unet = perturb_(diffusers.UNet2DConditionModel(**{**SD_UNET, **unet_config}).eval(), 0)
    g = torch.Generator().manual_seed(1)
    embeds = dict(prompt_embeds=torch.randn(2, 5, 12, generator=g),
                  negative_prompt_embeds=torch.randn(2, 5, 12, generator=g))
    return unet, vae_reference(SD_VAE, seed=2), embeds


@pytest.fixture(scope="module")
def sd_parts():
    return sd_unet_vae_embeds()


def sd_pair(parts, folder, scheduler, pipeline="StableDiffusionImg2ImgPipeline", index="StableDiffusionPipeline"):
    """(fastdiff's pipeline from a folder of ``parts``' UNet and VAE, diffusers' ``pipeline`` on the same parts)."""
    unet, vae, _ = parts
    pipe = fastdiff.load(_folder(folder, "unet", unet, scheduler, vae, index))
    ref = diffusers_pipeline(pipeline)(
        vae=vae, unet=unet, scheduler=scheduler, text_encoder=None, tokenizer=None, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return pipe, ref


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
    # options that hold one value per step, sliced with the grid: DDIM's own "to" sigmas off the grid (linspace
    # spacing), KDPM2's midpoints, TCD's timesteps; and UniPC's corrector-free step indices, shifted
    "ddim_linspace": ("DDIMScheduler", 7, 0.6, dict(timestep_spacing="linspace")),
    "kdpm2": ("KDPM2DiscreteScheduler", 6, 0.7, {}),
    "tcd": ("TCDScheduler", 4, 0.8, {}),  # (at fastdiff's gamma, TCD's own 0.3: diffusers' pipelines pass eta=0)
    "unipc_no_corrector": ("UniPCMultistepScheduler", 10, 0.8, dict(disable_corrector=[2, 4])),
    # diffusers' singlestep DPM-Solver keeps the whole run's groups (lowering a first step's order); its LMS builds
    # the first polynomials through grid sigmas it never visited
    "dpm_singlestep_2": ("DPMSolverSinglestepScheduler", 10, 0.7, {}),
    "dpm_singlestep_3": ("DPMSolverSinglestepScheduler", 9, 0.6, dict(solver_order=3)),
    "lms": ("LMSDiscreteScheduler", 10, 0.7, {}),
    "lms_karras": ("LMSDiscreteScheduler", 10, 0.7, dict(use_karras_sigmas=True)),
}


@pytest.mark.parametrize("cfg", [1.0, 4.0])
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_sd_img2img_equals_diffusers(sd_parts, tmp_path, name, cfg):
    e = sd_parts[2]
    cls, steps, strength, config = SCHEDULERS[name]
    pipe, ref = sd_pair(sd_parts, tmp_path, getattr(diffusers, cls).from_config({**SD_SCHEDULER, **config}))
    images = _images()
    want = ref(image=images.clone(), strength=strength, num_inference_steps=steps, guidance_scale=cfg,
               prompt_embeds=e["prompt_embeds"], negative_prompt_embeds=e["negative_prompt_embeds"],
               generator=_generators(), output_type="latent", eta=0.3 if name == "tcd" else 0.0).images
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


def sdxl_pair(folder, pipeline="StableDiffusionXLImg2ImgPipeline", index="StableDiffusionXLPipeline", vae_config=None,
              **unet_config):
    """(fastdiff's pipeline, diffusers' ``pipeline``) on one tiny SDXL UNet (with ``unet_config``) and VAE (with
    ``vae_config``)."""
    from test_sdxl import SCHEDULER, UNET

    torch.manual_seed(0)
    unet = perturb_(diffusers.UNet2DConditionModel(**{**UNET, **unet_config}).eval(), 0)
    scheduler = diffusers.EulerDiscreteScheduler(**SCHEDULER)
    vae = vae_reference(dict(SD_VAE, scaling_factor=0.13025, **(vae_config or {})), seed=2)
    pipe = fastdiff.load(_folder(folder, "unet", unet, scheduler, vae, index))
    ref = diffusers_pipeline(pipeline)(
        vae=vae, unet=unet, scheduler=scheduler, text_encoder=None, text_encoder_2=None, tokenizer=None,
        tokenizer_2=None, requires_aesthetics_score=False)
    ref.set_progress_bar_config(disable=True)
    return pipe, ref


@pytest.mark.parametrize("cfg, stats", [(1.0, False), (5.0, False), (5.0, True)])
def test_sdxl_img2img_equals_diffusers(tmp_path, cfg, stats):
    """SDXL's img2img: its default strength 0.3, micro-conditioning of the image's own size (stats: a VAE with
    per-channel latents_mean / latents_std, which the pipeline encodes with)."""
    from test_sdxl import _embeds

    pipe, ref = sdxl_pair(tmp_path, vae_config=dict(latents_mean=[0.3, -0.2, 0.1, 0.5],
                                                    latents_std=[0.8, 1.3, 0.6, 1.1]) if stats else None)

    e, images = {k: v for k, v in _embeds().items() if k != "latents"}, _images()
    want = ref(image=images.clone(), num_inference_steps=10, guidance_scale=cfg, generator=_generators(),
               output_type="latent", **{k: v.clone() for k, v in e.items()}).images
    # (the default ids in the pipeline's VAE's pixels, as diffusers' vae_scale_factor: this tiny VAE has 2)
    got = pipe.generate(image=images, steps=10, cfg_scale=cfg, seeds=SEEDS, progress=False,
                        **_text_kwargs(e, cfg != 1.0))  # strength: SDXL's default, 0.3
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


def test_pndm_cannot_start_part_way(sd_parts, tmp_path):
    """PNDM's (SD 1.x's default) warm-up values are laid out for the top of its grid: refused with what to pass."""
    unet, vae, e = sd_parts
    pipe = fastdiff.load(_folder(tmp_path, "unet", unet, diffusers.PNDMScheduler.from_config(
        dict(SD_SCHEDULER, skip_prk_steps=True)), vae, "StableDiffusionPipeline"))
    kw = dict(image=_images(1), encoder_hidden_states=e["prompt_embeds"][:1], steps=6, progress=False)
    with pytest.raises(BadArgumentError, match="cannot start part-way; pass another sampler"):
        pipe.generate(**kw)
    assert pipe.generate(sampler="ddim", **kw).shape == (1, 4, 8, 8)
    assert pipe.generate(strength=1.0, **kw).shape == (1, 4, 8, 8)  # (from the top, its warm-up is its own)


def test_pndm_with_its_runge_kutta_warm_up_runs_at_strength_one(sd_parts, tmp_path):
    """PNDM's class default (skip_prk_steps=False) holds 3 warm-up midpoints, not one per step: at strength 1 its
    whole plan runs (it was refused: "sigmas_mid: expected one value per step"), equal to diffusers."""
    e = sd_parts[2]
    pipe, ref = sd_pair(sd_parts, tmp_path, diffusers.PNDMScheduler.from_config(SD_SCHEDULER))
    images = _images()
    want = ref(image=images.clone(), strength=1.0, num_inference_steps=6, guidance_scale=1.0,
               prompt_embeds=e["prompt_embeds"], generator=_generators(), output_type="latent").images
    got = pipe.generate(image=images, strength=1.0, steps=6, seeds=SEEDS, encoder_hidden_states=e["prompt_embeds"],
                        progress=False)
    assert rel_err(got, want) <= 1e-5


def test_an_outdated_scheduler_config_runs_as_the_sd_pipelines_rewrite_it(sd_parts, tmp_path):
    """diffusers' SD pipelines run DDIM with steps_offset 1 and clip_sample False whatever the folder says (the
    class defaults, 0 and True, here): so does a folder of theirs (it was 1.0 off with clipping)."""
    e = sd_parts[2]
    config = {k: v for k, v in SD_SCHEDULER.items() if k not in ("steps_offset", "clip_sample")}
    pipe, ref = sd_pair(sd_parts, tmp_path, diffusers.DDIMScheduler.from_config(config))
    assert ref.scheduler.config.steps_offset == 1 and not ref.scheduler.config.clip_sample
    assert sum("rewrites it" in n for n in pipe.notes) == 2
    want = ref(image=_images(), strength=0.7, num_inference_steps=8, guidance_scale=1.0,
               prompt_embeds=e["prompt_embeds"], generator=_generators(), output_type="latent").images
    got = pipe.generate(image=_images(), strength=0.7, steps=8, seeds=SEEDS, encoder_hidden_states=e["prompt_embeds"],
                        progress=False)
    assert rel_err(got, want) <= 1e-5


def test_a_flow_model_takes_any_strength_that_leaves_a_step():
    """The early strength check no longer works out SD's steps at 1000 steps: a flow model's 0.0005 of 10 steps
    runs one step by its own rounding (it was refused, quoting 2000 steps)."""
    pipe = fastdiff.load("arch:tiny-unet", prediction_type="flow_prediction")
    ran = []
    pipe.generate(image=torch.rand(1, 3, 16, 16), strength=0.0005, steps=10, seeds=[1], callback=ran.append,
                  progress=False)
    assert len(ran) == 1 and start_index(10, 0.0005, flow=True) == 9


def test_bad_arguments_are_refused_before_the_image_is_encoded(sd_parts, tmp_path, monkeypatch):
    unet, vae, e = sd_parts
    pipe = fastdiff.load(_folder(tmp_path, "unet", unet, diffusers.PNDMScheduler.from_config(
        dict(SD_SCHEDULER, skip_prk_steps=True)), vae, "StableDiffusionPipeline"))
    monkeypatch.setattr(type(pipe.vae), "encode", lambda *a, **k: pytest.fail("the image was encoded first"))
    kw = dict(image=_images(1), encoder_hidden_states=e["prompt_embeds"][:1], progress=False)
    for extra, match in [(dict(steps=6), "cannot start part-way"),
                         (dict(steps=2, strength=0.3, sampler="ddim"), "leaves no step to run"),
                         (dict(steps=4, sampler="ddim", encoder_hidden_states=e["prompt_embeds"]), "encoder_hidden"),
                         (dict(steps=4, sampler="ddim", cfg_scale=3.0), "negative_encoder_hidden_states")]:
        with pytest.raises(BadArgumentError, match=match):
            pipe.generate(**{**kw, **extra})


# --- a pixel model, the image formats, and what is refused ---------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    return fastdiff.load("builtin:digits")


def test_a_pixel_model_keeps_what_a_light_strength_leaves(digits):
    """SDEdit on the digits model: a few of 20 steps from a noised sample stay near it; the formats agree."""
    a, b = digits.generate(seeds=[0, 1], class_labels=[3, 8], steps=20, progress=False).clamp(-1, 1)
    unit = (a + 1) / 2  # (1, 16, 16) in [0, 1]
    kw = dict(seeds=[5], class_labels=[3], steps=20, strength=0.3, progress=False)
    edited = digits.generate(image=unit, **kw)[0].clamp(-1, 1)
    assert rel_err(edited, a) < 0.5 * rel_err(edited, b)  # close to its image, not to another digit
    assert rel_err(edited, digits.generate(image=unit, **dict(kw, strength=1.0))[0]) > 1e-3  # strength counts
    pixels = (unit[0] * 255).round().to(torch.uint8).numpy()  # (16, 16) uint8
    from PIL import Image

    as_array = digits.generate(image=pixels, **kw)
    assert torch.equal(as_array, digits.generate(image=Image.fromarray(pixels), **kw))
    assert torch.equal(as_array, digits.generate(image=pixels[:, :, None].astype(np.float32) / 255, **kw))


def test_one_image_per_sample_or_one_for_all(digits):
    images = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    both = digits.generate(image=images, seeds=[4, 6], class_labels=[1, 2], steps=4, strength=0.5, progress=False)
    one = digits.generate(image=images[1:], seeds=[6], class_labels=[2], steps=4, strength=0.5, progress=False)
    assert rel_err(both[1:], one) <= 1e-6  # a sample depends on its own image and seed
    assert digits.generate(image=images, class_labels=[1, 2], steps=2, strength=0.5, progress=False).shape[0] == 2
    shared = digits.generate(image=images[:1], seeds=[4, 6], class_labels=[1, 1], steps=4, strength=0.5,
                             progress=False)
    assert shared.shape[0] == 2 and rel_err(shared[0], shared[1]) > 1e-3  # one image, two seeds


def test_start_index_follows_each_pipelines_rounding():
    assert [start_index(10, s, flow=False) for s in (1.0, 0.8, 0.65, 0.15)] == [0, 2, 4, 9]
    assert [start_index(10, s, flow=True) for s in (1.0, 0.8, 0.65, 0.15)] == [0, 2, 3, 8]
    with pytest.raises(BadArgumentError, match="leaves no step to run"):
        start_index(4, 0.2, flow=False)


@pytest.mark.parametrize("kwargs,match", [
    (dict(strength=0.5), "without image="),
    (dict(image=torch.rand(1, 16, 16), latents=torch.randn(1, 1, 16, 16)), "expected one of them, found both"),
    (dict(image=torch.rand(1, 16, 16), strength=0.0), r"strength: expected a number in \(0, 1\]"),
    (dict(image=torch.rand(1, 16, 16), strength=1.5), r"strength: expected a number in \(0, 1\]"),
    (dict(image=torch.rand(1, 16, 16), strength=True), r"strength: expected a number in \(0, 1\]"),
    (dict(image=torch.rand(1, 16, 16), steps=2, strength=0.3), "leaves no step to run"),
    (dict(image=torch.rand(3, 1, 16, 16), seeds=[1, 2]), r"image: expected 1 or 2 images"),
    (dict(image=torch.rand(1, 16, 16), height=8), "the image fixes the latent size to 16x16"),
    (dict(image=torch.rand(3, 16, 16)), r"expected a tensor \(1, H, W\)"),
    (dict(image=torch.rand(1, 16, 16) * 3), r"values in \[0, 1\], found"),
    (dict(image=torch.full((1, 16, 16), float("nan"))), r"values in \[0, 1\]"),
    (dict(image=np.zeros((16, 16), np.uint16)), "expected a uint8 or float NumPy array"),
    (dict(image=np.zeros((16, 16, 3), np.uint8)), r"expected a NumPy array \(H, W, 1\)"),
    (dict(image="photo.png"), "expected a PIL image, a NumPy array or a torch tensor"),
    (dict(image=[]), "non-empty list"),
    (dict(image=__import__("PIL.Image").Image.new("I;16", (16, 16), 40000)), "expected an 8-bit PIL image, found mode"),
    (dict(image=__import__("PIL.Image").Image.new("F", (16, 16), 0.5)), "expected an 8-bit PIL image, found mode 'F'"),
    (dict(image=torch.rand(1, 0, 16)), r"at least one pixel, found \(batch, height, width\) \(1, 0, 16\)"),
    (dict(image=torch.rand(0, 1, 16, 16)), r"at least one image"),
    (dict(image=np.zeros((16, 0, 1), np.uint8)), r"at least one pixel, found \(batch, height, width\) \(1, 16, 0\)"),
    # (Pillow converts these modes to RGB but not to L: a raw ValueError before)
    (dict(image=__import__("PIL.Image").Image.new("RGB", (16, 16)).convert("La")), "mode 'La', which Pillow cannot"),
    (dict(image=__import__("PIL.Image").Image.new("RGB", (16, 16)).convert("LAB")), "mode 'LAB', which Pillow cannot"),
    (dict(image=np.zeros((1, 16, 16), np.float32), seeds=[1, 2]), r"found shape \(1, 16, 16\) \(channels first\?"),
    (dict(image=np.zeros((3, 16, 16), np.float32)), r"found shape \(3, 16, 16\)$"),
    (dict(latents=torch.full((1, 1, 16, 16), float("nan"))), "latents: expected finite float values, found NaN"),
    (dict(latents=torch.zeros((1, 1, 16, 16), dtype=torch.int64)), "latents: expected finite float values, found "
                                                                   "torch.int64"),
])
def test_bad_img2img_arguments_are_refused_by_name(digits, kwargs, match):
    with pytest.raises(BadArgumentError, match=match):
        digits.generate(**{"steps": 4, "progress": False, **kwargs})


def test_a_list_of_tensors_is_one_batch_for_the_range(digits):
    """diffusers concatenates a list of tensors before it looks for negative values: one image of the list in
    [-1, 1] makes all of them [-1, 1] (a bright one without negatives was read as [0, 1] on its own)."""
    from fastdiff.img2img import unit_images

    dark, bright = torch.rand(1, 16, 16) * 2 - 1, torch.rand(1, 16, 16) * 0.5 + 0.5
    with pytest.warns(UserWarning, match=r"taken as \[-1, 1\]"):
        both = unit_images([dark, bright], 1)
    assert torch.allclose(both[1], (bright + 1) / 2) and torch.allclose(both[0], (dark + 1) / 2)
    assert torch.equal(unit_images([bright, bright], 1)[0], bright)  # no negatives anywhere: [0, 1]


def test_a_latent_model_needs_a_vae_with_an_encoder(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(BadArgumentError, match="has no VAE"):
        fastdiff.load("arch:tiny-dit").generate(image=torch.rand(1, 3, 16, 16), class_labels=[1], steps=2,
                                                progress=False)
    ref = vae_reference(SD_VAE)
    ref.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items() if k.startswith(("decoder.", "post_quant"))},
              str(tmp_path / "diffusion_pytorch_model.safetensors"))
    pipe = fastdiff.load("arch:tiny-dit", vae=str(tmp_path))
    with pytest.raises(BadArgumentError, match="carry only the decoder"):
        pipe.generate(image=torch.rand(1, 3, 16, 16), class_labels=[1], steps=2, progress=False)


def test_image_sizes_must_be_whole_latent_pixels(sd_parts, tmp_path):
    unet, vae, e = sd_parts
    pipe = fastdiff.load(_folder(tmp_path, "unet", unet, diffusers.DDIMScheduler(**SD_SCHEDULER), vae,
                                 "StableDiffusionPipeline"))
    with pytest.raises(BadArgumentError, match="multiples of 2 .*found 15x16"):
        pipe.generate(image=torch.rand(1, 3, 15, 16), encoder_hidden_states=e["prompt_embeds"][:1], steps=2,
                      progress=False)
    rgba = np.zeros((12, 20, 4), np.uint8)
    from PIL import Image

    out = pipe.generate(image=Image.fromarray(rgba), encoder_hidden_states=e["prompt_embeds"][:1], steps=2,
                        strength=1.0, progress=False, output_type="np")
    assert out.shape == (1, 12, 20, 3)  # the image's own size; RGBA taken as RGB


def test_cli_generate_edits_an_image(digits, tmp_path):
    """``fastdiff generate --image IN.png --strength S`` writes what generate(image=...) returns; its mistakes are
    one line and exit 2."""
    from PIL import Image

    from test_cli import fastdiff as run_cli

    pixels = (np.arange(256).reshape(16, 16) % 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "in.png")
    r = run_cli("generate", "--image", "in.png", "--strength", "0.5", "--steps", "4", "--n", "1", "--class", "2",
                "--seed", "7", "--separate", "-o", "out.png", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    want = digits.generate(image=pixels, strength=0.5, steps=4, seeds=[7], class_labels=[2], output_type="np",
                           progress=False)[0, :, :, 0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out_0.png")), want)
    sideways = Image.new("L", (32, 16), 0)  # stored 32 wide; EXIF orientation 6: shown 16 wide, 32 high
    exif = sideways.getexif()
    exif[0x0112] = 6
    sideways.save(tmp_path / "sideways.png", exif=exif)
    r = run_cli("generate", "--image", "sideways.png", "--strength", "0.5", "--steps", "2", "--n", "1",
                "--separate", "-o", "upright.png", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "upright_0.png").size == (16, 32)  # upright, as viewers and load_image show it
    (tmp_path / "not-an-image.png").write_text("hello")
    for args, message in [(("--strength", "0.5"), "--strength: given without --image"),
                          (("--image", "missing.png"), "no such file"),
                          (("--image", "not-an-image.png"), "could not read"),
                          (("--image", "in.png", "--height", "16"), "the --image fixes the size"),
                          (("--image", "in.png", "--strength", "2"), r"strength: expected a number in (0, 1]")]:
        r = run_cli("generate", *args, "--steps", "2", "--n", "1", "-o", "x.png", cwd=tmp_path)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


@pytest.mark.parametrize("scope", ["step", "loop"])
def test_captured_graphs_edit_images_as_eager(digits, scope):
    """img2img through graph_scope "step" / "loop" (the stand-in graph of test_graph_scopes): equal to eager; a loop
    captures once per strength (its grid is shorter), and a new image replays it."""
    from test_graph_scopes import FakeGraph

    graphed = fastdiff.load("builtin:digits").optimize(cuda_graphs=True, graph_scope=scope, batch_buckets=(1, 2),
                                                       graph_factory=FakeGraph)
    images = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    kw = dict(seeds=[1, 2], class_labels=[4, 5], steps=6, cfg_scale=2.0, progress=False)
    for image, strength in ((images, 0.5), (images.flip(0), 0.5), (images, 0.8)):
        want = digits.generate(image=image, strength=strength, **kw)
        assert rel_err(graphed.generate(image=image, strength=strength, **kw), want) <= 1e-5
    if scope == "loop":
        assert graphed.loop_graphs.captures == 2


def test_flux_img2img_equals_diffusers(tmp_path):
    """FLUX.1 dev's img2img: packed latents, the resolution's shift, distilled guidance, flow rounding."""
    from test_flux import DEV, DEV_SCHEDULER, _reference

    transformer = _reference(DEV)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**DEV_SCHEDULER)
    vae = vae_reference(dict(SD_VAE, scaling_factor=0.3611, shift_factor=0.1159), seed=2)
    pipe = fastdiff.load(_folder(tmp_path, "transformer", transformer, scheduler, vae, "FluxPipeline"))
    ref = diffusers_pipeline("FluxImg2ImgPipeline")(transformer=transformer, scheduler=scheduler, vae=vae,
                                                    text_encoder=None, tokenizer=None, text_encoder_2=None,
                                                    tokenizer_2=None)
    ref.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(2)
    ctx, pooled = torch.randn(2, 5, 12, generator=g), torch.randn(2, 10, generator=g)
    images = _images()
    want = ref(image=images.clone(), strength=0.65, num_inference_steps=10, guidance_scale=4.0, height=16, width=16,
               prompt_embeds=ctx, pooled_prompt_embeds=pooled, generator=_generators(), output_type="latent").images
    got = pipe.generate(image=images, strength=0.65, steps=10, guidance=4.0, seeds=SEEDS,
                        encoder_hidden_states=ctx, text_embeds=pooled, progress=False)  # (B, 4, 8, 8), unpacked
    from test_flux import _pack

    assert rel_err(_pack(got), want) <= 2e-5
    # the pipeline's defaults: strength 0.6, guidance 7 (FluxPipeline's is 3.5)
    want = ref(image=images.clone(), num_inference_steps=5, height=16, width=16, prompt_embeds=ctx,
               pooled_prompt_embeds=pooled, generator=_generators(), output_type="latent").images
    got = pipe.generate(image=images, steps=5, seeds=SEEDS, encoder_hidden_states=ctx, text_embeds=pooled,
                        progress=False)
    assert rel_err(_pack(got), want) <= 2e-5
    # one image for both seeds: each sample encodes its own copy, as FluxImg2ImgPipeline given it once per sample
    # (given it once, it draws the posterior from the first generator alone and repeats it)
    want = ref(image=images[:1].repeat(2, 1, 1, 1), num_inference_steps=5, height=16, width=16, prompt_embeds=ctx,
               pooled_prompt_embeds=pooled, generator=_generators(), output_type="latent").images
    got = pipe.generate(image=images[:1], steps=5, seeds=SEEDS, encoder_hidden_states=ctx, text_embeds=pooled,
                        progress=False)
    assert rel_err(_pack(got), want) <= 2e-5


def test_engine_requests_with_images_equal_their_solo_runs(digits):
    """Engine.submit(image=..., strength=...): each request's own image, batched with others of its strength and
    size, equals generate(image=..., seeds=[seed]); a bad image fails its own request only, at submit."""
    import concurrent.futures

    g = torch.Generator().manual_seed(9)
    pictures = [(torch.rand(16, 16, generator=g) * 255).to(torch.uint8).numpy() for _ in range(5)]
    requests = [dict(seed=i, class_label=i, image=pictures[i], strength=0.5 if i % 3 else 0.75, cfg_scale=2.0)
                for i in range(5)]
    requests.append(dict(seed=7, class_label=1, image=pictures[0], cfg_scale=2.0))  # the model's default strength
    with fastdiff.Engine(digits, max_batch=4, max_wait_ms=50) as engine:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            futures = list(pool.map(lambda r: engine.submit(steps=6, **r), requests))
        bad = [engine.submit(seed=0, image=np.zeros((16, 16, 3), np.uint8), steps=6),
               engine.submit(seed=0, strength=0.5, steps=6),
               engine.submit(seed=0, image=pictures[0], strength=0.1, steps=6),
               engine.submit(seed=0, image=[pictures[0], pictures[1]], steps=6)]
        results = [f.result(timeout=120) for f in futures]
        stats = engine.stats()
    for r, got in zip(requests, results):
        want = digits.generate(seeds=[r["seed"]], class_labels=[r["class_label"]], image=r["image"],
                               strength=r.get("strength"), cfg_scale=2.0, steps=6, progress=False)[0]
        assert rel_err(got, want) <= 1e-5
    for f, match in zip(bad, [r"expected a NumPy array \(H, W, 1\)", "without image=", "leaves no step to run",
                              "one image per request"]):
        with pytest.raises(BadArgumentError, match=match):
            f.result(timeout=10)
    assert stats["rejected"] == 4 and max(stats["batch_size_hist"]) >= 2  # (requests did share batches)


@pytest.mark.parametrize("cfg", [1.0, 5.0])
def test_latents_as_the_image_equal_diffusers(tmp_path, cfg):
    """A tensor with the latent channel count is taken as latents, unencoded, as diffusers' img2img pipelines take
    it: an SDXL base's output refined by img2img (here the SDXL pipeline on its own base latents)."""
    from test_sdxl import _embeds

    pipe, ref = sdxl_pair(tmp_path)
    e = {k: v for k, v in _embeds().items() if k != "latents"}
    base = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5)) * 2  # (what a base run returns)
    want = ref(image=base.clone(), strength=0.5, num_inference_steps=10, guidance_scale=cfg, generator=_generators(),
               output_type="latent", **{k: v.clone() for k, v in e.items()}).images
    got = pipe.generate(image=base, strength=0.5, steps=10, cfg_scale=cfg, seeds=SEEDS, progress=False,
                        time_ids=[16, 16, 0, 0, 16, 16], **_text_kwargs(e, cfg != 1.0))
    assert rel_err(got, want) <= 1e-5
    with fastdiff.Engine(pipe, max_batch=2, max_wait_ms=20) as engine:  # the Engine takes latents rows too
        futures = [engine.submit(seed=s, image=base[i], strength=0.5, steps=10, cfg_scale=cfg,
                                 time_ids=[16, 16, 0, 0, 16, 16],
                                 **{k: v[i] for k, v in _text_kwargs(e, cfg != 1.0).items()})
                   for i, s in enumerate(SEEDS)]
        assert rel_err(torch.stack([f.result(timeout=60) for f in futures]), want) <= 1e-5
    with pytest.raises(BadArgumentError, match="NaN or inf"):
        pipe.generate(image=torch.full((1, 4, 8, 8), float("nan")), steps=4, progress=False,
                      **{k: v[:1] for k, v in _text_kwargs(e, False).items()})
