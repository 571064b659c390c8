"""SDXL's ensemble of expert denoisers (``generate(denoising_end=...)`` on a base, ``generate(denoising_start=...,
image=latents)`` on a refiner) against diffusers' StableDiffusionXLPipeline / StableDiffusionXLImg2ImgPipeline with
the same options, weights, embeddings and generators: the base's noisy latents, and the refiner's result from them,
for each first-order scheduler family (the variance-preserving ones hand on x / sqrt(1 + sigma^2), the Euler family
and LMS x itself)."""

import pytest
import torch
from PIL import Image

import fastdiff
from fastdiff.errors import BadArgumentError
from helpers import diffusers_pipeline, perturb_, rel_err
from test_img2img import SEEDS, _folder, _generators, _images, _text_kwargs

diffusers = pytest.importorskip("diffusers", reason="diffusers' SDXL pipelines are the reference")

IDS = [16, 16, 0, 0, 16, 16]  # (the tiny VAE's 2 pixels per latent pixel: 8x8 latents are 16x16 pixels)


def _experts(tmp_path, cls: str, **config):
    """(fastdiff's pipeline, diffusers' SDXL base and refiner pipelines) on one tiny SDXL UNet, VAE and scheduler
    (the refiner is the same UNet here: what is checked is the hand-over, not a second network)."""
    from test_sdxl import SCHEDULER, UNET
    from test_vae import SD_VAE, _reference as vae_reference

    torch.manual_seed(0)
    unet = perturb_(diffusers.UNet2DConditionModel(**UNET).eval(), 0)
    scheduler = getattr(diffusers, cls).from_config({**SCHEDULER, **config})
    vae = vae_reference(dict(SD_VAE, scaling_factor=0.13025), seed=2)
    pipe = fastdiff.load(_folder(tmp_path, "unet", unet, scheduler, vae, "StableDiffusionXLPipeline"))
    parts = dict(vae=vae, unet=unet, scheduler=scheduler, text_encoder=None, text_encoder_2=None, tokenizer=None,
                 tokenizer_2=None)
    base = diffusers_pipeline("StableDiffusionXLPipeline")(**parts)
    refiner = diffusers_pipeline("StableDiffusionXLImg2ImgPipeline")(**parts, requires_aesthetics_score=False)
    base.set_progress_bar_config(disable=True)
    refiner.set_progress_bar_config(disable=True)
    return pipe, base, refiner


def _embeddings():
    from test_sdxl import _embeds

    return {k: v for k, v in _embeds().items() if k != "latents"}


# (class, its config, steps, denoising_end): DDIM without clip_sample (clipping a tiny random UNet's x0 makes a run
# amplify float32 rounding: diffusers against itself, started 1e-7 apart, ends 3.5e-5 apart)
CASES = {
    "euler": ("EulerDiscreteScheduler", {}, 10, 0.7),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}, 10, 0.8),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}, 10, 0.7),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True), 12, 0.6),
    "dpmpp_3m": ("DPMSolverMultistepScheduler", dict(solver_order=3), 10, 0.5),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++"), 8, 0.7),
    "ddim": ("DDIMScheduler", dict(clip_sample=False), 10, 0.7),
    "unipc": ("UniPCMultistepScheduler", {}, 9, 0.75),
    "lms": ("LMSDiscreteScheduler", {}, 10, 0.7),
    # two-stage: Heun's cut always falls between a step's stages (its timesteps repeat); KDPM2's between them (0.7:
    # after the first stage, to the midpoint) or after a whole step (0.6), as the midpoint's timestep lies
    "heun": ("HeunDiscreteScheduler", {}, 6, 0.7),
    "kdpm2_mid_step": ("KDPM2DiscreteScheduler", {}, 6, 0.7),
    "kdpm2_whole_step": ("KDPM2DiscreteScheduler", {}, 6, 0.6),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_base_and_refiner_hand_over_as_diffusers(tmp_path, name):
    cls, config, steps, cut = CASES[name]
    pipe, base, refiner = _experts(tmp_path, cls, **config)
    e = _embeddings()
    want = base(num_inference_steps=steps, guidance_scale=5.0, generator=_generators(), output_type="latent",
                height=16, width=16, denoising_end=cut, **{k: v.clone() for k, v in e.items()}).images
    kw = dict(steps=steps, cfg_scale=5.0, seeds=SEEDS, progress=False, time_ids=IDS, **_text_kwargs(e, True))
    got = pipe.generate(denoising_end=cut, **kw)
    assert rel_err(got, want) <= 1e-5
    # the base hands on noisy latents, not x0: they differ from its whole run's result
    assert rel_err(got, pipe.generate(**kw)) > 1e-2
    want = refiner(image=want.clone(), num_inference_steps=steps, guidance_scale=5.0, generator=_generators(),
                   output_type="latent", denoising_start=cut, **{k: v.clone() for k, v in e.items()}).images
    assert rel_err(pipe.generate(image=got, denoising_start=cut, **kw), want) <= 1e-5


@pytest.mark.parametrize("sampler,cls,cut", [("heun", "HeunDiscreteScheduler", 0.7),
                                             ("dpm_2", "KDPM2DiscreteScheduler", 0.7)])
def test_a_named_two_stage_sampler_hands_over_as_its_scheduler_does(tmp_path, sampler, cls, cut):
    """sampler="heun" / "dpm_2" by name on an Euler-config pipeline, cut mid-step: the base hands on the state in the
    named plan's frame at the rerun step's start, and the pair's result is that of the same pair on the scheduler's
    own config (a reviewer found the named pair's state handed on 1.23x too large)."""
    pipe, _, _ = _experts(tmp_path / "euler", "EulerDiscreteScheduler")
    own, _, _ = _experts(tmp_path / "own", cls)
    kw = dict(steps=6, cfg_scale=5.0, seeds=SEEDS, progress=False, time_ids=IDS, **_text_kwargs(_embeddings(), True))
    assert experts_first_stage(own, cut)  # (the cut falls between a step's stages)
    named = pipe.generate(image=pipe.generate(denoising_end=cut, sampler=sampler, **kw), denoising_start=cut,
                          sampler=sampler, **kw)
    reference = own.generate(image=own.generate(denoising_end=cut, **kw), denoising_start=cut, **kw)
    assert rel_err(named, reference) <= 1e-5


def experts_first_stage(pipe, cut) -> bool:
    from fastdiff import experts

    return experts.steps_until(pipe.plan(6), cut, 1000)[1]


@pytest.mark.parametrize("cls", ["HeunDiscreteScheduler", "KDPM2DiscreteScheduler"])
def test_a_two_stage_refiner_at_the_very_end_runs_the_last_timestep_as_diffusers(tmp_path, cls):
    """denoising_start=0.999 leaves no timestep below the cutoff; diffusers' order-2 rule adds one: the last step."""
    pipe, base, refiner = _experts(tmp_path, cls)
    e = _embeddings()
    start = base(num_inference_steps=6, guidance_scale=5.0, generator=_generators(), output_type="latent", height=16,
                 width=16, denoising_end=0.6, **{k: v.clone() for k, v in e.items()}).images
    want = refiner(image=start.clone(), num_inference_steps=6, guidance_scale=5.0, generator=_generators(),
                   output_type="latent", denoising_start=0.999, **{k: v.clone() for k, v in e.items()}).images
    got = pipe.generate(image=start, denoising_start=0.999, steps=6, cfg_scale=5.0, seeds=SEEDS, progress=False,
                        time_ids=IDS, **_text_kwargs(e, True))
    assert rel_err(got, want) <= 1e-5 and rel_err(got, start) > 1e-3


def test_a_middle_expert_takes_both_ends_as_diffusers(tmp_path):
    """SDXL img2img with denoising_start and denoising_end: the steps between both cutoffs, from the latents given."""
    pipe, base, refiner = _experts(tmp_path, "DPMSolverMultistepScheduler")
    e = _embeddings()
    first = base(num_inference_steps=12, guidance_scale=5.0, generator=_generators(), output_type="latent",
                 height=16, width=16, denoising_end=0.4, **{k: v.clone() for k, v in e.items()}).images
    want = refiner(image=first.clone(), num_inference_steps=12, guidance_scale=5.0, generator=_generators(),
                   output_type="latent", denoising_start=0.4, denoising_end=0.8,
                   **{k: v.clone() for k, v in e.items()}).images
    got = pipe.generate(image=first, steps=12, cfg_scale=5.0, seeds=SEEDS, progress=False, time_ids=IDS,
                        denoising_start=0.4, denoising_end=0.8, **_text_kwargs(e, True))
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("cls", ["EulerAncestralDiscreteScheduler", "KDPM2DiscreteScheduler"])
def test_a_cut_run_in_a_captured_loop_equals_eager(tmp_path, cls):
    """(KDPM2 at 8 steps: 0.7 stops after a whole step, 0.5 after a step's first stage: two loops, each its own
    grid.)"""
    from test_graph_scopes import FakeGraph

    pipe, _, _ = _experts(tmp_path, cls)
    graphed = fastdiff.load(str(tmp_path)).optimize(cuda_graphs=True, graph_scope="loop", batch_buckets=(2,),
                                                    graph_factory=FakeGraph)
    kw = dict(steps=8, cfg_scale=5.0, seeds=SEEDS, progress=False, time_ids=IDS, **_text_kwargs(_embeddings(), True))
    for cut in (0.7, 0.5):
        assert rel_err(graphed.generate(denoising_end=cut, **kw), pipe.generate(denoising_end=cut, **kw)) <= 1e-6
    assert graphed.loop_graphs.captures == 2  # (each cut is its own grid)


@pytest.mark.parametrize("window", [dict(control_guidance_end=0.5), dict(control_guidance_start=0.4)])
def test_a_controlnet_base_run_equals_the_sdxl_controlnet_pipeline(tmp_path, window):
    """StableDiffusionXLControlNetPipeline with denoising_end: the ControlNet's window is a share of the whole grid
    (diffusers' controlnet_keep is laid out before the cut), and the run stops at the cutoff."""
    from test_controlnet import sdxl_controlnet
    from test_img2img import _images

    pipe, base, _ = _experts(tmp_path, "EulerDiscreteScheduler")
    controlnet = sdxl_controlnet(8, tmp_path / "controlnet", conditioning_embedding_out_channels=(4, 16))
    pipe.set_controlnet(str(tmp_path / "controlnet"))
    ref = diffusers_pipeline("StableDiffusionXLControlNetPipeline")(**{**base.components, "controlnet": controlnet})
    ref.set_progress_bar_config(disable=True)
    e, control = _embeddings(), _images(seed=9)
    want = ref(image=control.clone(), num_inference_steps=10, guidance_scale=5.0, generator=_generators(),
               output_type="latent", height=16, width=16, denoising_end=0.7, **window,
               **{k: v.clone() for k, v in e.items()}).images
    kw = dict(control_image=control, steps=10, cfg_scale=5.0, seeds=SEEDS, progress=False, time_ids=IDS,
              **_text_kwargs(e, True))
    got = pipe.generate(denoising_end=0.7, **window, **kw)
    assert rel_err(got, want) <= 1e-5
    # a window laid out over the 7 steps run instead of the 10 of the grid is another result
    from fastdiff.controlnet import keep_factors

    assert keep_factors(10, window.get("control_guidance_start", 0.0), window.get("control_guidance_end", 1.0))[:7] \
        != keep_factors(7, window.get("control_guidance_start", 0.0), window.get("control_guidance_end", 1.0))
    with pytest.raises(BadArgumentError, match="with a control image and an image, no mask: diffusers' SDXL"):
        pipe.generate(image=_images(), denoising_start=0.7, **kw)
    with pytest.raises(BadArgumentError, match="ControlNet inpainting run takes the image in pixels, found latents"):
        pipe.generate(image=got, mask_image=torch.ones(2, 1, 16, 16), denoising_start=0.7, **kw)


@pytest.mark.parametrize("expert", [dict(denoising_end=0.7), dict(denoising_start=0.7),
                                    dict(denoising_start=0.3, denoising_end=0.8)])
def test_controlnet_inpainting_experts_equal_the_sdxl_controlnet_inpaint_pipeline(tmp_path, expert):
    """StableDiffusionXLControlNetInpaintPipeline with denoising_end / denoising_start, the image in pixels: the
    ControlNet's window spans the steps left after the start, before the end's cut."""
    from test_controlnet import sdxl_controlnet
    from test_img2img import _images
    from test_inpaint import _masks

    pipe, base, _ = _experts(tmp_path, "EulerDiscreteScheduler")
    controlnet = sdxl_controlnet(8, tmp_path / "controlnet", conditioning_embedding_out_channels=(4, 16))
    pipe.set_controlnet(str(tmp_path / "controlnet"))
    ref = diffusers_pipeline("StableDiffusionXLControlNetInpaintPipeline")(
        **{**base.components, "controlnet": controlnet}, requires_aesthetics_score=False)
    ref.set_progress_bar_config(disable=True)
    e, images, masks, control = _embeddings(), _images(), _masks(), _images(seed=9)
    want = ref(image=images.clone(), mask_image=masks.clone(), control_image=control.clone(), num_inference_steps=10,
               guidance_scale=5.0, generator=_generators(), output_type="latent", height=16, width=16,
               control_guidance_end=0.5, **expert, **{k: v.clone() for k, v in e.items()}).images
    got = pipe.generate(image=images, mask_image=masks, control_image=control, control_guidance_end=0.5, steps=10,
                        cfg_scale=5.0, seeds=SEEDS, progress=False, time_ids=IDS, **expert, **_text_kwargs(e, True))
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("name", ["euler", "euler_ancestral", "dpmpp_2m", "ddim", "heun", "kdpm2_mid_step"])
def test_inpainting_base_and_refiner_hand_over_as_diffusers(tmp_path, name):
    """StableDiffusionXLInpaintPipeline with denoising_end, then with denoising_start from the base's latents and
    the same mask (in pixels): the base's last blend pastes the image's clean latents on its noisy state, and the
    refiner blends the latents it was given, noised with noise it draws for that, as diffusers does."""
    from test_inpaint import _masks

    cls, config, steps, cut = CASES[name]
    pipe, base, _ = _experts(tmp_path, cls, **config)
    ref = diffusers_pipeline("StableDiffusionXLInpaintPipeline")(**base.components, requires_aesthetics_score=False)
    ref.set_progress_bar_config(disable=True)
    e, images, masks = _embeddings(), _images(), _masks()
    common = dict(num_inference_steps=steps, guidance_scale=5.0, output_type="latent", height=16, width=16)
    want = ref(image=images.clone(), mask_image=masks.clone(), generator=_generators(), denoising_end=cut, **common,
               **{k: v.clone() for k, v in e.items()}).images
    kw = dict(steps=steps, cfg_scale=5.0, seeds=SEEDS, progress=False, time_ids=IDS, **_text_kwargs(e, True))
    got = pipe.generate(image=images, mask_image=masks, denoising_end=cut, **kw)
    assert rel_err(got, want) <= 1e-5
    want = ref(image=want.clone(), mask_image=masks.clone(), generator=_generators(), denoising_start=cut, **common,
               **{k: v.clone() for k, v in e.items()}).images
    refined = pipe.generate(image=got, mask_image=masks, denoising_start=cut, **kw)
    assert rel_err(refined, want) <= 1e-5
    # the mask reaches the refiner: without it the run is another
    assert rel_err(refined, pipe.generate(image=got, denoising_start=cut, **kw)) > 1e-3
    with pytest.raises(BadArgumentError, match=r"expected the image's size \(16, 16\) \(its latents' \(8, 8\)"):
        pipe.generate(image=got, mask_image=masks[..., :8, :8], denoising_start=cut, **kw)


def test_an_inpainting_unet_base_run_equals_diffusers(tmp_path):
    """An inpainting UNet (9 input channels) cut at denoising_end; as a refiner it needs the image in pixels (its
    masked part is encoded), as diffusers' pipeline does without masked_image_latents."""
    from test_img2img import sdxl_pair
    from test_inpaint import _masks

    pipe, ref = sdxl_pair(tmp_path, "StableDiffusionXLInpaintPipeline", "StableDiffusionXLInpaintPipeline",
                          in_channels=9)
    e, images, masks = _embeddings(), _images(), _masks()
    want = ref(image=images.clone(), mask_image=masks.clone(), num_inference_steps=8, guidance_scale=5.0,
               generator=_generators(), output_type="latent", height=16, width=16, denoising_end=0.6,
               **{k: v.clone() for k, v in e.items()}).images
    kw = dict(steps=8, cfg_scale=5.0, seeds=SEEDS, progress=False, time_ids=IDS, **_text_kwargs(e, True))
    got = pipe.generate(image=images, mask_image=masks, denoising_end=0.6, **kw)
    assert rel_err(got, want) <= 1e-5
    want = ref(image=images.clone(), mask_image=masks.clone(), num_inference_steps=8, guidance_scale=5.0,
               generator=_generators(), output_type="latent", height=16, width=16, denoising_start=0.6,
               **{k: v.clone() for k, v in e.items()}).images
    assert rel_err(pipe.generate(image=images, mask_image=masks, denoising_start=0.6, **kw), want) <= 1e-5
    with pytest.raises(BadArgumentError, match="an inpainting network takes the image in pixels"):
        pipe.generate(image=got, mask_image=masks, denoising_start=0.6, **kw)


@pytest.mark.parametrize("kwargs, match", [
    (dict(denoising_end=1.0), r"denoising_end: expected a fraction of the denoising in \(0, 1\), found 1.0"),
    (dict(denoising_start=0.5), "denoising_start: a refiner run starts from a base run's latents"),
    (dict(denoising_start=0.5, image=torch.randn(2, 4, 8, 8), strength=0.3), "strength: not with denoising_start"),
    (dict(denoising_start=0.8, denoising_end=0.5, image=torch.randn(2, 4, 8, 8)), "expected start < end"),
    (dict(denoising_end=0.5, image=Image.new("RGB", (16, 16), "gray"), mask_image=Image.new("L", (16, 16), 255),
          padding_mask_crop=2, output_type="pil"),
     "denoising_end: with padding_mask_crop is not implemented"),
    (dict(denoising_end=0.5, sampler="dpm_2_ancestral"), "sampler 'dpm_2_ancestral' .* is not implemented"),
    (dict(denoising_end=0.95, sampler="dpmpp_2m", order=3, lower_order_final=True, steps=10),
     "third-order dpmpp_2m cut one step short"),
    (dict(denoising_end=0.01), "leaves no step to run"),
])
def test_bad_expert_arguments_are_refused_by_name(tmp_path, kwargs, match):
    pipe, _, _ = _experts(tmp_path, "EulerDiscreteScheduler")
    kw = dict(steps=6, seeds=SEEDS, progress=False, time_ids=IDS, **_text_kwargs(_embeddings(), False))
    with pytest.raises(BadArgumentError, match=match):
        pipe.generate(**{**kw, **kwargs})


def test_cli_hands_a_base_runs_latents_to_a_refiner_run(tmp_path):
    """``fastdiff generate BASE --denoising-end F --output-latents L`` then ``fastdiff generate REFINER
    --denoising-start F --image L``: what the Python API gives (an unconditional UNet: no text encoders needed)."""
    from safetensors.torch import load_file

    from test_cli import fastdiff as run_cli
    from test_img2img import SD_SCHEDULER
    from test_vae import SD_VAE, _reference as vae_reference

    torch.manual_seed(0)
    unet = perturb_(diffusers.UNet2DModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                          layers_per_block=1, norm_num_groups=8,
                                          down_block_types=("DownBlock2D", "DownBlock2D"),
                                          up_block_types=("UpBlock2D", "UpBlock2D")).eval(), 0)
    folder = _folder(tmp_path / "model", "unet", unet, diffusers.EulerDiscreteScheduler.from_config(SD_SCHEDULER),
                     vae_reference(SD_VAE, seed=2), "StableDiffusionPipeline")
    common = ("--steps", "6", "--n", "2", "--seed", "7", "--no-progress")
    r = run_cli("generate", folder, "--denoising-end", "0.6", "--output-latents", "base.safetensors", *common,
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_cli("generate", folder, "--denoising-start", "0.6", "--image", "base.safetensors", "--output-latents",
                "refined.safetensors", *common, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    pipe = fastdiff.load(folder)
    base = pipe.generate(steps=6, seeds=[7, 8], denoising_end=0.6, progress=False)
    assert torch.equal(load_file(str(tmp_path / "base.safetensors"))["latents"], base)
    refined = pipe.generate(steps=6, seeds=[7, 8], denoising_start=0.6, image=base, progress=False)
    assert torch.equal(load_file(str(tmp_path / "refined.safetensors"))["latents"], refined)
    r = run_cli("generate", folder, "--denoising-start", "0.6", "--output-latents", "x.safetensors", *common,
                cwd=tmp_path)
    assert r.returncode == 2 and "--denoising-start: given without --image" in r.stderr, r.stderr


def test_a_third_order_cut_one_step_short_runs_where_diffusers_keeps_the_order(tmp_path):
    """DPM-Solver++ drops order at a run's end under 15 steps only: a 16-step run cut at its 15th step is exact."""
    pipe, base, _ = _experts(tmp_path, "DPMSolverMultistepScheduler", solver_order=3)
    e = _embeddings()
    want = base(num_inference_steps=16, guidance_scale=5.0, generator=_generators(), output_type="latent",
                height=16, width=16, denoising_end=0.9, **{k: v.clone() for k, v in e.items()}).images
    got = pipe.generate(steps=16, cfg_scale=5.0, seeds=SEEDS, progress=False, time_ids=IDS, denoising_end=0.9,
                        **_text_kwargs(e, True))
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("inpaint", [False, True], ids=["plain", "mask"])
def test_engine_base_and_refiner_requests_equal_their_solo_runs(tmp_path, inpaint):
    """Base and refiner requests through the Engine, with a mask too (the Engine refused a refiner's latents with a
    mask before: a review)."""
    from test_inpaint import _masks

    pipe, _, _ = _experts(tmp_path, "EulerAncestralDiscreteScheduler")
    e, images, masks = _embeddings(), _images(), _masks()
    one = dict(steps=6, cfg_scale=5.0, time_ids=IDS, encoder_hidden_states=e["prompt_embeds"][0],
               negative_encoder_hidden_states=e["negative_prompt_embeds"][0], text_embeds=e["pooled_prompt_embeds"][0],
               negative_text_embeds=e["negative_pooled_prompt_embeds"][0])
    solo = dict(steps=6, cfg_scale=5.0, time_ids=IDS, progress=False, **_text_kwargs({k: v[:1] for k, v in e.items()},
                                                                                     True))
    mask = lambda i, one_row: dict(mask_image=masks[i] if one_row else masks[i:i + 1]) if inpaint else {}  # noqa: E731
    image = lambda i, one_row: dict(image=images[i] if one_row else images[i:i + 1]) if inpaint else {}  # noqa: E731
    with fastdiff.Engine(pipe, max_batch=4, max_wait_ms=50) as engine:
        bases = [engine.submit(seed=i, denoising_end=0.6, **image(i, True), **mask(i, True), **one) for i in range(2)]
        latents = [f.result(timeout=120) for f in bases]
        refined = [engine.submit(seed=i, image=latents[i], denoising_start=0.6, **mask(i, True), **one)
                   for i in range(2)]
        refined = [f.result(timeout=120) for f in refined]
    for i in range(2):
        base = pipe.generate(seeds=[i], denoising_end=0.6, **image(i, False), **mask(i, False), **solo)
        assert rel_err(latents[i], base[0]) <= 1e-5
        assert rel_err(refined[i], pipe.generate(seeds=[i], image=base, denoising_start=0.6, **mask(i, False),
                                                 **solo)[0]) <= 1e-5
