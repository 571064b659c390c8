"""Inpainting with a model that is not an inpainting network (``generate(image=..., mask_image=...)`` on a
4-channel UNet, SD3's and FLUX.1's transformers, a pixel model): the image's known region pasted back after every
step, against diffusers' inpainting pipelines run with such a network, on the same weights, embeddings, images, masks
and generators, for every scheduler family; the same through captured graphs, the Engine and the CLI; and FLUX.1
Fill, an inpainting transformer, against FluxFillPipeline."""

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff.errors import BadArgumentError
from fastdiff.inpaint import KnownRegion
from fastdiff.samplers import SAMPLERS
from helpers import rel_err
from test_img2img import SD_SCHEDULER, SEEDS, _generators, _images, sd_pair, sd_unet_vae_embeds
from test_inpaint import _masks

diffusers = pytest.importorskip("diffusers", reason="diffusers' inpainting pipelines are the reference")


@pytest.fixture(scope="module")
def sd_parts():
    return sd_unet_vae_embeds()  # a regular UNet: 4 input channels


def _sd_pair(parts, folder, cls="DDIMScheduler", **config):
    return sd_pair(parts, folder, getattr(diffusers, cls).from_config({**SD_SCHEDULER, **config}),
                   "StableDiffusionInpaintPipeline", "StableDiffusionInpaintPipeline")


def _kwargs(e: dict, steps: int, cfg: float) -> dict:
    return dict(steps=steps, cfg_scale=cfg, seeds=SEEDS, encoder_hidden_states=e["prompt_embeds"],
                negative_encoder_hidden_states=e["negative_prompt_embeds"], progress=False)


def _reference(ref, e, images, masks, steps, cfg, strength=1.0, generators=None, **kw):
    return ref(image=images.clone(), mask_image=masks.clone(), strength=strength, num_inference_steps=steps,
               guidance_scale=cfg, prompt_embeds=e["prompt_embeds"], negative_prompt_embeds=e["negative_prompt_embeds"],
               generator=generators or _generators(), output_type="latent", height=16, width=16, **kw).images


# (scheduler class, steps, strength, its config): one per sampler family, the two-stage ones (Heun, KDPM2, DPM-Solver
# SDE: their midpoint states are pasted at the step's end sigma, as diffusers' add_noise reads it), the stochastic ones
# (the masked image's posterior draw sits between the start noise and the samplers' draws), PNDM's warm-up (its second
# pass steps from the unpasted start) and the grids whose steps land off the next timestep (DDIM 'linspace', TCD)
SCHEDULERS = {
    "ddim": ("DDIMScheduler", 6, 1.0, {}),
    "ddim_linspace": ("DDIMScheduler", 7, 0.6, dict(timestep_spacing="linspace")),
    "ddpm": ("DDPMScheduler", 5, 1.0, {}),
    "euler": ("EulerDiscreteScheduler", 8, 0.6, {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", 5, 1.0, {}),
    "heun": ("HeunDiscreteScheduler", 5, 0.8, {}),
    "kdpm2": ("KDPM2DiscreteScheduler", 5, 1.0, {}),
    "kdpm2_ancestral": ("KDPM2AncestralDiscreteScheduler", 5, 1.0, {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", 10, 0.7, {}),
    "dpmpp_3m_sde": ("DPMSolverMultistepScheduler", 8, 1.0, dict(solver_order=3, algorithm_type="sde-dpmsolver++")),
    "dpm_singlestep": ("DPMSolverSinglestepScheduler", 9, 1.0, dict(solver_order=3)),
    "unipc": ("UniPCMultistepScheduler", 8, 1.0, dict(disable_corrector=[2])),
    "deis": ("DEISMultistepScheduler", 7, 0.8, {}),
    "pndm": ("PNDMScheduler", 6, 1.0, {}),
    "lms": ("LMSDiscreteScheduler", 8, 0.7, {}),
    "lcm": ("LCMScheduler", 4, 1.0, {}),
    "tcd": ("TCDScheduler", 4, 0.8, {}),
    "dpmpp_sde": ("DPMSolverSDEScheduler", 4, 1.0, {}),
}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_a_regular_unet_inpaints_as_diffusers(sd_parts, tmp_path, name, monkeypatch):
    cls, steps, strength, config = SCHEDULERS[name]
    generators = _generators()
    if cls == "DPMSolverSDEScheduler":
        pytest.importorskip("torchsde", reason="diffusers' DPMSolverSDEScheduler draws its noise with torchsde")
        _same_sde_noise(monkeypatch, generators)
    pipe, ref = _sd_pair(sd_parts, tmp_path, cls, **config)
    e = sd_parts[2]
    assert not pipe.spec.inpainting and pipe.spec.in_channels == 4
    images, masks = _images(), _masks()
    # (TCD at fastdiff's gamma, TCDScheduler's own 0.3: diffusers' pipelines pass eta=0 unless told)
    want = _reference(ref, e, images, masks, steps, 3.0, strength, generators, eta=0.3 if name == "tcd" else 0.0)
    got = pipe.generate(image=images, mask_image=masks, strength=None if strength == 1.0 else strength,
                        **_kwargs(e, steps, 3.0))
    assert got.shape == (2, 4, 8, 8)
    assert rel_err(got, want) <= 1e-5


def _same_sde_noise(monkeypatch, generators):
    """DPMSolverSDEScheduler's Brownian tree replaced by the increments fastdiff draws from each sample's generator
    (as test_scheduler_parity does), drawn from the generators the pipeline runs with, after its own draws."""
    import diffusers.schedulers.scheduling_dpmsolver_sde as sde

    from fastdiff.dpmpp_singlestep import joined_increment

    class SameNoise:  # per step: z1 for [sigma_mid, sigma], then the increment over [sigma_next, sigma] holding it
        def __init__(self, x, *args, **kwargs):
            self.shape, self.pending = tuple(x.shape[1:]), None

        def __call__(self, sigma, sigma_next):
            if self.pending is None:
                z1, z2 = (torch.cat([torch.randn((1,) + self.shape, generator=g) for g in generators])
                          for _ in range(2))
                self.pending = (z1, z2, float(sigma_next))
                return z1
            (z1, z2, mid), self.pending = self.pending, None
            return joined_increment(z1, z2, float(sigma), mid, float(sigma_next))

    monkeypatch.setattr(sde, "BrownianTreeNoiseSampler", SameNoise)


def test_the_known_region_is_the_images_and_the_rest_the_models(sd_parts, tmp_path):
    """What a wrong paste would break: the result is the image's latents exactly where the latent-size mask keeps, and
    the model's work where it repaints, which the pasting along the way steers."""
    pipe, ref = _sd_pair(sd_parts, tmp_path)
    e = sd_parts[2]
    images, masks = _images(), _masks()
    got = pipe.generate(image=images, mask_image=masks, **_kwargs(e, 4, 1.0))
    keep = torch.nn.functional.interpolate(masks, size=(8, 8)) < 0.5  # (2, 1, 8, 8)
    assert 0 < int(keep.sum()) < keep.numel()
    # the known region: the image's latents as the run drew them (the posterior comes first from each generator)
    noise = fastdiff.noise.NoiseSource(SEEDS, "cpu")
    clean = pipe.vae.encode(images * 2 - 1, noise=noise)
    assert torch.equal(torch.where(keep, got, 0), torch.where(keep, clean, 0))
    # where the mask repaints, the model's work: another mask, or none pasted (img2img at strength 1), differs
    repainted = ~keep.expand_as(got)
    assert rel_err(got[repainted], pipe.generate(image=images, mask_image=1 - masks,
                                                   **_kwargs(e, 4, 1.0))[repainted]) > 1e-3
    assert rel_err(got, pipe.generate(image=images, strength=1.0, **_kwargs(e, 4, 1.0))) > 1e-2
    # an all-repaint mask is text-to-image's run from the same start noise, the image's posterior drawn first
    everywhere = pipe.generate(image=images, mask_image=torch.ones(2, 16, 16), **_kwargs(e, 4, 1.0))
    assert rel_err(everywhere, _reference(ref, e, images, torch.ones(2, 1, 16, 16), 4, 1.0)) <= 1e-5


@pytest.mark.parametrize("name", sorted(set(SAMPLERS) - {"dpm_fast"}))  # (dpm_fast spaces its own steps: below)
def test_every_sampler_hands_each_steps_state_through_after_step(name):
    """Each sampler calls after_step once per step at least, at the grid's sigmas, the last call alone ``last`` (on
    the final state, at the grid's end); and what after_step returns is what the next network evaluation sees."""
    from fastdiff.noise import NoiseSource
    from fastdiff.schedules import get_sigmas, make_alphas_cumprod
    from helpers import sampler_test_options, smooth_denoiser

    ac = make_alphas_cumprod("linear")
    sigmas = get_sigmas("karras", 5, alphas_cumprod=ac)
    grid = [float(v) for v in sigmas]
    calls, handed, seen = [], [], []

    def after_step(x, sigma, last):
        calls.append((sigma, last))
        handed.append(x.clone())  # a new tensor: only the sampler using it can hand it to the network
        return handed[-1]

    def denoiser(x, sigma, **kw):
        seen.append(x)
        return smooth_denoiser(x, sigma, **kw)

    src = NoiseSource([1, 2])
    x = src.randn((2, 4, 4)) * grid[0]
    SAMPLERS[name](denoiser, x, sigmas, noise=src, after_step=after_step, **sampler_test_options(name, ac, sigmas))
    assert len([c for c in calls if not c[1]]) >= len(grid) - 2 and calls[-1] == (grid[-1], True)
    assert [c for c in calls if c[1]] == [calls[-1]]
    # (diffusers' two-stage schedulers' midpoints at the step's end sigma; dpmpp_2s_ancestral's at its own, which at
    # eta = 1 is the step's end too; SEEDS' stages, which no diffusers scheduler has, at their own noise levels, where
    # the known region is pasted as ComfyUI blends it at every network call: inside the step)
    on_grid = [any(abs(sigma - g) <= 1e-9 * g for g in grid) for sigma, _ in calls]
    if name in ("seeds_2", "seeds_3"):
        assert all(grid[-1] <= sigma <= grid[0] for sigma, _ in calls) and sum(on_grid) >= len(grid) - 1
    else:
        assert all(on_grid)
    # every state handed on before the end is what the next network evaluation reads
    assert all(any(t is h for t in seen) for h in handed[:-1])


def test_dpm_fast_hands_each_of_its_steps_state_through_after_step():
    """DPM-Solver-fast takes only the grid's ends: after_step sees each of its own steps' end, evenly spaced in
    log sigma from the grid's top to its last nonzero sigma, the last one ``last``, and what it returns is what the
    next step's network evaluation reads."""
    import math

    from fastdiff.dpm_fast import dpm_fast_orders
    from fastdiff.noise import NoiseSource
    from fastdiff.schedules import get_sigmas, make_alphas_cumprod
    from helpers import smooth_denoiser

    sigmas = get_sigmas("karras", 10, alphas_cumprod=make_alphas_cumprod("linear"))
    top, low = float(sigmas[0]), float(sigmas[-2])
    calls, handed, seen = [], [], []

    def after_step(x, sigma, last):
        calls.append((sigma, last))
        handed.append(x.clone())
        return handed[-1]

    def denoiser(x, sigma, **kw):
        seen.append(x)
        return smooth_denoiser(x, sigma, **kw)

    src = NoiseSource([1, 2])
    SAMPLERS["dpm_fast"](denoiser, src.randn((2, 4, 4)) * top, sigmas, noise=src, after_step=after_step)
    m = len(dpm_fast_orders(10))
    want = [math.exp(math.log(top) + (k + 1) / m * (math.log(low) - math.log(top))) for k in range(m)]
    assert [c[0] for c in calls] == pytest.approx(want, rel=1e-12)
    assert [c[1] for c in calls] == [False] * (m - 1) + [True]
    assert all(any(t is h for t in seen) for h in handed[:-1])


def test_known_region_pastes_in_each_frame():
    clean, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    mask = (torch.rand(2, 1, 4, 4) > 0.5).float()
    x = torch.randn(2, 3, 4, 4)
    region = KnownRegion(clean, noise, mask)
    keep = mask.expand_as(x) == 0
    assert torch.equal(region(x, 0.7, False)[~keep], x[~keep])
    assert torch.allclose(region(x, 0.7, False)[keep], (clean + 0.7 * noise)[keep])
    assert torch.equal(region(x, 0.7, True), x)  # the last step: the plan pastes the clean latents after scaling
    assert torch.equal(region.final(x)[keep], clean[keep])
    flow = KnownRegion(clean, noise, mask, time_frame=True)  # x_t = (1 - t) x0 + t eps
    assert torch.allclose(flow(x, 0.3, False)[keep], (0.7 * clean + 0.3 * noise)[keep], atol=1e-6)


@pytest.mark.parametrize("cfg", [1.0, 5.0])
def test_sdxl_with_a_regular_unet_inpaints_as_diffusers(tmp_path, cfg):
    """SDXL's inpainting pipeline with its base UNet: default strength 0.9999, the image's latents noised."""
    from test_img2img import _text_kwargs, sdxl_pair
    from test_sdxl import _embeds

    pipe, ref = sdxl_pair(tmp_path, "StableDiffusionXLInpaintPipeline", "StableDiffusionXLInpaintPipeline")
    assert not pipe.spec.inpainting
    e, images, masks = {k: v for k, v in _embeds().items() if k != "latents"}, _images(), _masks()
    if cfg == 1.0:
        e = {k: v for k, v in e.items() if not k.startswith("negative")}
    want = ref(image=images.clone(), mask_image=masks.clone(), num_inference_steps=6, guidance_scale=cfg,
               generator=_generators(), output_type="latent", height=16, width=16,
               **{k: v.clone() for k, v in e.items()}).images
    got = pipe.generate(image=images, mask_image=masks, steps=6, cfg_scale=cfg, seeds=SEEDS, progress=False,
                        time_ids=[16, 16, 0, 0, 16, 16], **_text_kwargs(e, cfg != 1.0))
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("scope", ["step", "loop"])
def test_captured_graphs_inpaint_as_eager(sd_parts, tmp_path, scope):
    """The known region's latents, noise and mask are loop inputs: a new mask or image replays the capture."""
    from test_graph_scopes import FakeGraph

    eager, _ = _sd_pair(sd_parts, tmp_path, "EulerAncestralDiscreteScheduler")
    graphed = fastdiff.load(str(tmp_path)).optimize(cuda_graphs=True, graph_scope=scope, batch_buckets=(1, 4),
                                                    graph_factory=FakeGraph)
    kw = _kwargs(sd_parts[2], 4, 3.0)
    for images, masks, strength in ((_images(), _masks(), None), (_images(seed=8), _masks(seed=9), None),
                                    (_images(), _masks(), 0.75)):
        got = graphed.generate(image=images, mask_image=masks, strength=strength, **kw)
        assert rel_err(got, eager.generate(image=images, mask_image=masks, strength=strength, **kw)) <= 1e-5
    if scope == "loop":
        assert graphed.loop_graphs.captures == 2  # one per strength; the second image and mask replayed the first


def test_engine_inpainting_requests_equal_their_solo_runs(sd_parts, tmp_path):
    """Requests with masks batch together (at the inpainting default strength, 1.0), apart from img2img ones."""
    pipe, _ = _sd_pair(sd_parts, tmp_path)
    e = sd_parts[2]
    images, masks = _images(3), _masks(3)
    one = dict(steps=3, cfg_scale=2.0, encoder_hidden_states=e["prompt_embeds"][0],
               negative_encoder_hidden_states=e["negative_prompt_embeds"][0])
    with fastdiff.Engine(pipe, max_batch=4, max_wait_ms=50) as engine:
        futures = [engine.submit(seed=i, image=images[i], mask_image=masks[i], **one) for i in range(3)]
        edit = engine.submit(seed=7, image=images[0], **one)  # img2img: strength 0.8, another batch
        latents = engine.submit(seed=5, image=torch.randn(4, 8, 8), mask_image=masks[0], **one)
        results = [f.result(timeout=120) for f in futures]
        edited = edit.result(timeout=120)
        assert sorted(engine.stats()["batch_size_hist"].items()) == [(1, 1), (3, 1)]
    with pytest.raises(BadArgumentError, match="expected one, found latents"):
        latents.result(timeout=10)
    batched = dict(steps=3, cfg_scale=2.0, encoder_hidden_states=e["prompt_embeds"][:1],
                   negative_encoder_hidden_states=e["negative_prompt_embeds"][:1], progress=False)
    for i, got in enumerate(results):
        want = pipe.generate(seeds=[i], image=images[i], mask_image=masks[i], **batched)[0]
        assert rel_err(got, want) <= 1e-5
    assert rel_err(edited, pipe.generate(seeds=[7], image=images[0], **batched)[0]) <= 1e-5


def test_a_pixel_model_inpaints_its_pixels():
    """No VAE: the known pixels are the image's (in [-1, 1]) on the result, whatever the sampler made there."""
    pipe = fastdiff.load("arch:tiny-unet")
    c, (h, w) = pipe.spec.in_channels, pipe.spec.sample_size
    images = torch.rand(2, c, h, w, generator=torch.Generator().manual_seed(1))
    masks = torch.zeros(2, 1, h, w)
    masks[:, :, h // 4: 3 * h // 4, : w // 2] = 1
    got = pipe.generate(image=images, mask_image=masks, steps=3, seeds=SEEDS, progress=False)
    keep = (masks < 0.5).expand_as(got)
    assert torch.equal(got[keep], (images * 2 - 1)[keep])
    plain = pipe.generate(image=images, strength=1.0, steps=3, seeds=SEEDS, progress=False)
    assert rel_err(got[~keep], plain[~keep]) > 1e-3  # the pasting reached the repainted pixels too


@pytest.mark.parametrize("kwargs, match", [
    (dict(image=None), "mask_image: inpainting repaints part of an image in pixels .image=.: expected one, found none"),
    (dict(image=torch.randn(2, 4, 8, 8)), "expected one, found latents"),
    (dict(mask_image=torch.rand(1, 1, 8, 8)), r"mask_image: expected the image's size \(16, 16\), found \(8, 8\)"),
    (dict(mask_image=torch.rand(3, 1, 16, 16)), "mask_image: expected 1 or 2 masks"),
    (dict(strength=0.1), "leaves no step to run"),
])
def test_bad_arguments_are_refused_by_name(sd_parts, tmp_path, kwargs, match):
    pipe, _ = _sd_pair(sd_parts, tmp_path)
    kw = dict(image=_images(), mask_image=_masks(b=1), **_kwargs(sd_parts[2], 4, 1.0))
    with pytest.raises(BadArgumentError, match=match):
        pipe.generate(**{**kw, **kwargs})


@pytest.mark.parametrize("strength, cfg", [(None, 1.0), (1.0, 4.5)])
def test_sd3_inpaints_as_diffusers(tmp_path, strength, cfg):
    """SD3's inpainting pipeline with its 16-channel transformer: the known region noised on the flow's time grid
    ((1 - t) x0 + t eps, diffusers' scale_noise); default strength 0.6."""
    from test_img2img import _folder, _text_kwargs
    from test_sd3 import CONFIGS, _embeds, _reference as sd3_reference
    from test_vae import CONFIGS as VAE_CONFIGS, _reference as vae_reference

    from helpers import diffusers_pipeline

    # (the pipeline blends for a 16-channel transformer only: SD3's own VAE layout)
    transformer = sd3_reference(dict(CONFIGS["sd3.5-large"], in_channels=16, out_channels=16))
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    vae = vae_reference(VAE_CONFIGS["sd3-flux"], seed=2)
    pipe = fastdiff.load(_folder(tmp_path, "transformer", transformer, scheduler, vae, "StableDiffusion3Pipeline"))
    ref = diffusers_pipeline("StableDiffusion3InpaintPipeline")(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    ref.set_progress_bar_config(disable=True)
    e = {k: v for k, v in _embeds().items() if k != "latents" and (cfg != 1.0 or not k.startswith("negative"))}
    images, masks = _images(), _masks()
    want = ref(image=images.clone(), mask_image=masks.clone(), num_inference_steps=10, guidance_scale=cfg,
               generator=_generators(), output_type="latent", height=16, width=16,
               **({} if strength is None else dict(strength=strength)), **{k: v.clone() for k, v in e.items()}).images
    got = pipe.generate(image=images, mask_image=masks, strength=strength, steps=10, cfg_scale=cfg, seeds=SEEDS,
                        progress=False, **_text_kwargs(e, cfg != 1.0))
    assert rel_err(got, want) <= 2e-5


def test_flux_inpaints_as_diffusers(tmp_path):
    """FLUX.1's inpainting pipeline: packed latents (the paste is element-wise: packing changes nothing), the
    resolution's shift, distilled guidance, default strength 0.6."""
    from test_flux import _pack

    pipe, ref = _flux_pair(tmp_path, "FluxInpaintPipeline", "FluxPipeline")
    g = torch.Generator().manual_seed(2)
    ctx, pooled = torch.randn(2, 5, 12, generator=g), torch.randn(2, 10, generator=g)
    images, masks = _images(), _masks()
    want = ref(image=images.clone(), mask_image=masks.clone(), num_inference_steps=10, guidance_scale=4.0, height=16,
               width=16, prompt_embeds=ctx, pooled_prompt_embeds=pooled, generator=_generators(),
               output_type="latent").images
    got = pipe.generate(image=images, mask_image=masks, steps=10, guidance=4.0, seeds=SEEDS, encoder_hidden_states=ctx,
                        text_embeds=pooled, progress=False)  # (B, 4, 8, 8), unpacked
    assert rel_err(_pack(got), want) <= 2e-5


def test_cli_generate_inpaints_with_a_regular_model(tmp_path):
    """``fastdiff generate MODEL --image IN.png --mask MASK.png`` on a regular model writes generate()'s result."""
    from safetensors.torch import load_file

    from test_cli import fastdiff as run_cli
    from test_inpaint import unconditional_inpainting_folder

    folder, pixels, mask = unconditional_inpainting_folder(tmp_path, 4)
    r = run_cli("generate", folder, "--image", "in.png", "--mask", "mask.png", "--steps", "3", "--n", "1", "--seed",
                "7", "--output-latents", "lat.safetensors", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    want = fastdiff.load(folder).generate(image=pixels, mask_image=mask, steps=3, seeds=[7], progress=False)
    assert torch.equal(load_file(str(tmp_path / "lat.safetensors"))["latents"], want)


def _flux_pair(tmp_path, pipeline: str, index: str = None, **config):
    """(fastdiff's pipeline of a tiny FLUX.1 dev transformer (test_flux's DEV with ``config``), diffusers'
    ``pipeline`` on the same parts); the folder's model index names ``index`` (default: ``pipeline``)."""
    from test_flux import DEV, DEV_SCHEDULER, _reference as flux_reference
    from test_img2img import _folder
    from test_vae import SD_VAE, _reference as vae_reference

    from helpers import diffusers_pipeline

    transformer = flux_reference(dict(DEV, **config))
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**DEV_SCHEDULER)
    vae = vae_reference(dict(SD_VAE, scaling_factor=0.3611, shift_factor=0.1159), seed=2)
    pipe = fastdiff.load(_folder(tmp_path, "transformer", transformer, scheduler, vae, index or pipeline))
    ref = diffusers_pipeline(pipeline)(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=None,
                                       tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    ref.set_progress_bar_config(disable=True)
    return pipe, ref


def _fill_pair(tmp_path):
    """FLUX.1 Fill: the transformer takes the latents' 16 packed channels, the masked image's 16 and the mask's 16 (a
    VAE with 2 pixels per latent pixel: a 2x2 mask block per latent pixel, packed 2x2)."""
    return _flux_pair(tmp_path, "FluxFillPipeline", in_channels=48, out_channels=16)


@pytest.mark.parametrize("strength, guidance", [(None, None), (0.7, 12.0)])
def test_flux_fill_inpaints_as_diffusers(tmp_path, strength, guidance):
    """FLUX.1 Fill: an inpainting transformer (the masked image's latents and the pixel mask packed after the
    latents); its pipeline's defaults: strength 1.0 (the image still encoded first), guidance 30."""
    from test_flux import _pack

    pipe, ref = _fill_pair(tmp_path)
    assert pipe.spec.inpainting and pipe.spec.in_channels == 4 and pipe.spec.image_latents_channels == 8
    g = torch.Generator().manual_seed(2)
    ctx, pooled = torch.randn(2, 5, 12, generator=g), torch.randn(2, 10, generator=g)
    images, masks = _images(), _masks()
    options = {k: v for k, v in dict(strength=strength, guidance_scale=guidance).items() if v is not None}
    want = ref(image=images.clone(), mask_image=masks.clone(), num_inference_steps=6, height=16, width=16,
               prompt_embeds=ctx, pooled_prompt_embeds=pooled, generator=_generators(), output_type="latent",
               **options).images
    kw = dict(steps=6, seeds=SEEDS, encoder_hidden_states=ctx, text_embeds=pooled, strength=strength,
              guidance=guidance, progress=False)
    got = pipe.generate(image=images, mask_image=masks, **kw)
    assert rel_err(_pack(got), want) <= 2e-5
    # the mask and the image reach the result
    assert rel_err(got, pipe.generate(image=images, mask_image=1 - masks, **kw)) > 1e-3
    assert rel_err(got, pipe.generate(image=images.flip(0), mask_image=masks, **kw)) > 1e-3


@pytest.mark.parametrize("kind", ["fill", "depth"])
def test_bench_times_flux_fill_and_depth_against_their_pipelines_loops(tmp_path, kind):
    """``fastdiff bench`` of FLUX.1 Fill (a random image and a centred mask) and Depth / Canny (a random control
    image): the bench's diffusers loop equals FluxFillPipeline at strength 1 (one generator: the image's posterior,
    which prepare_latents draws even though the noise replaces it, the start noise, then the masked image's posterior;
    guidance 30) / FluxControlPipeline (the control image's posterior, then the noise; guidance 3.5), and both sides
    run."""
    import json

    from fastdiff.commands.bench_diffusers import _diffusers_generate, build_diffusers_model, diffusers_vae
    from fastdiff.commands.bench_inputs import _conditioning, image_pixels
    from test_cli import fastdiff as run_cli

    pipe, ref = (_fill_pair if kind == "fill" else _control_pair)(tmp_path / "model")
    spec = pipe.spec
    spec.sample_size = (8, 8)  # (the loop's check at 16 x 16 pixels; the bench below runs the folder's size)
    cond = _conditioning(spec, 2, 1.0, 0, "cpu", torch.float32, pixels=image_pixels(pipe),
                         control=pipe._control_format())
    with torch.no_grad():
        transformer, _ = build_diffusers_model(pipe)
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(ref.scheduler.config)
        got = _diffusers_generate(transformer, scheduler, spec, 2, 4, 1.0, cond, "cpu", torch.float32, 0,
                                  vae=diffusers_vae(pipe.vae))
    kw = dict(prompt_embeds=cond["states"], pooled_prompt_embeds=cond["text_embeds"], num_inference_steps=4,
              height=16, width=16, generator=torch.Generator().manual_seed(0), output_type="latent")
    if kind == "fill":
        assert cond["image"].shape == (2, 3, 16, 16) and 0 < float(cond["mask"].mean()) < 1
        want = ref(image=cond["image"], mask_image=cond["mask"], **kw).images
    else:
        assert cond["control_image"].shape == (2, 3, 16, 16) and cond["image"] is None
        want = ref(control_image=cond["control_image"], **kw).images
    assert rel_err(got, want) <= 1e-5
    r = run_cli("bench", str(tmp_path / "model"), "--compare", "diffusers", "--steps", "2", "--repeat", "1",
                "--warmup", "1", "--json", "out.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "out.json").read_text())
    assert [row["status"] for row in rows["results"] + rows["compare"]] == ["ok", "ok"], rows


def test_flux_transformers_with_unknown_extra_channels_are_refused_by_name():
    """Fewer extra channels than the latents' (neither Fill's nor Depth / Canny's layout)."""
    from fastdiff.errors import UnsupportedConfigError
    from fastdiff.models.flux import FluxConfig

    with pytest.raises(UnsupportedConfigError, match="Depth / Canny's control image latents"):
        FluxConfig(in_channels=96, out_channels=64)
    assert FluxConfig(in_channels=384, out_channels=64).condition_channels == 80  # FLUX.1 Fill dev
    assert FluxConfig(in_channels=128, out_channels=64).condition_channels == 16  # FLUX.1 Depth / Canny dev


@pytest.mark.parametrize("kind", ["fill", "control", "control_inpaint"])
def test_flux_fill_and_control_through_onnx_runtime_and_a_captured_loop_equal_eager(tmp_path, kind):
    """The Fill / Depth conditioning is one more graph input (``image_latents``, C + f*f or C channels) for the
    exporter, and a loop input for a captured loop (Depth's with a known region pasted back too)."""
    pytest.importorskip("onnxruntime", reason="the exported graph runs on ONNX Runtime")
    pytest.importorskip("onnx", reason="the exporter needs onnx")
    from test_graph_scopes import FakeGraph

    eager, _ = (_fill_pair if kind == "fill" else _control_pair)(tmp_path)
    g = torch.Generator().manual_seed(2)
    kw = dict(steps=3, seeds=SEEDS, encoder_hidden_states=torch.randn(2, 5, 12, generator=g),
              text_embeds=torch.randn(2, 10, generator=g), progress=False)
    kw.update(dict(image=_images(), mask_image=_masks()) if kind != "control" else {})
    kw.update(dict(control_image=_images(seed=5)) if kind != "fill" else {})
    want = eager.generate(**kw)
    ort = fastdiff.load(str(tmp_path)).optimize(backend="onnxruntime")
    assert rel_err(ort.generate(**kw), want) <= 1e-5
    # the output is the unpacked latents (the config's out_channels counts packed ones): the stored interface and
    # the declared output say so (ONNX Runtime's CUDA IO binding allocates the output by them)
    channels = eager.spec.in_channels
    assert ort.runner.io["out_channels"] == channels == ort.runner.session.get_outputs()[0].shape[1] == 4
    graphed = fastdiff.load(str(tmp_path)).optimize(cuda_graphs=True, graph_scope="loop", batch_buckets=(2,),
                                                    graph_factory=FakeGraph)
    assert rel_err(graphed.generate(**kw), want) <= 1e-5


def _control_pair(tmp_path):
    """FLUX.1 Depth / Canny: the transformer takes the latents' 16 packed channels and the control image latents'."""
    return _flux_pair(tmp_path, "FluxControlPipeline", in_channels=32, out_channels=16)


def test_flux_depth_and_canny_equal_flux_control_pipeline(tmp_path):
    """FLUX.1 Depth / Canny: the control image's VAE latents (its posterior drawn before the start noise) packed
    after the latents; guidance 3.5 by default, as FluxControlPipeline."""
    from PIL import Image

    from test_flux import _pack

    pipe, ref = _control_pair(tmp_path)
    assert pipe.spec.latent_control and not pipe.spec.inpainting
    g = torch.Generator().manual_seed(2)
    ctx, pooled = torch.randn(2, 5, 12, generator=g), torch.randn(2, 10, generator=g)
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(2)]
    for guidance in (None, 10.0):
        want = ref(control_image=images, num_inference_steps=5, height=16, width=16, prompt_embeds=ctx,
                   pooled_prompt_embeds=pooled, generator=_generators(), output_type="latent",
                   **({} if guidance is None else dict(guidance_scale=guidance))).images
        got = pipe.generate(control_image=images, steps=5, seeds=SEEDS, encoder_hidden_states=ctx, text_embeds=pooled,
                            guidance=guidance, progress=False)
        assert rel_err(_pack(got), want) <= 2e-5
    # one image for every sample; the image reaches the result
    kw = dict(steps=3, seeds=SEEDS, encoder_hidden_states=ctx, text_embeds=pooled, progress=False)
    one = pipe.generate(control_image=images[0], **kw)
    assert rel_err(one[0], pipe.generate(control_image=images, **kw)[0]) <= 1e-6
    assert rel_err(one, pipe.generate(control_image=images[::-1], **kw)) > 1e-3
    for bad, match in ((dict(control_image=None), "expected one, found none"),
                       (dict(control_image=images, controlnet_conditioning_scale=0.5), "a ControlNet's options"),
                       (dict(control_image=images, image=_images(), denoising_end=0.5), "with a control image")):
        with pytest.raises(BadArgumentError, match=match):
            pipe.generate(**{**kw, **bad})


@pytest.mark.parametrize("task, strength, guidance", [("img2img", None, None), ("img2img", 0.8, 5.0),
                                                       ("inpaint", None, None), ("inpaint", 1.0, 5.0)])
def test_flux_depth_and_canny_edit_and_inpaint_as_diffusers(tmp_path, task, strength, guidance):
    """FluxControlImg2ImgPipeline / FluxControlInpaintPipeline: the control image's posterior is drawn before the
    image's (and after the masked image's, which inpainting encodes first and never reads); defaults strength 0.6
    and guidance 7."""
    from PIL import Image

    from helpers import diffusers_pipeline
    from test_flux import _pack

    pipe, control_ref = _control_pair(tmp_path)
    ref = diffusers_pipeline("FluxControlImg2ImgPipeline" if task == "img2img" else "FluxControlInpaintPipeline")(
        **control_ref.components)
    ref.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(2)
    ctx, pooled = torch.randn(2, 5, 12, generator=g), torch.randn(2, 10, generator=g)
    rng = np.random.default_rng(3)  # (PIL: diffusers hands a control tensor to the VAE as it is, unshifted)
    control = [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(2)]
    images, masks = _images(), _masks()
    edit = dict(image=images.clone()) if task == "img2img" else dict(image=images.clone(), mask_image=masks.clone())
    options = {k: v for k, v in dict(strength=strength, guidance_scale=guidance).items() if v is not None}
    want = ref(control_image=control, num_inference_steps=6, height=16, width=16, prompt_embeds=ctx,
               pooled_prompt_embeds=pooled, generator=_generators(), output_type="latent", **edit, **options).images
    kw = dict(steps=6, seeds=SEEDS, encoder_hidden_states=ctx, text_embeds=pooled, strength=strength,
              guidance=guidance, progress=False)
    got = pipe.generate(control_image=control, **edit, **kw)
    assert rel_err(_pack(got), want) <= 2e-5
    # the control image, the image and the mask each reach the result
    assert rel_err(got, pipe.generate(control_image=control[::-1], **edit, **kw)) > 1e-3
    assert rel_err(got, pipe.generate(control_image=control, **{**edit, "image": 1 - images}, **kw)) > 1e-3
    if task == "inpaint":
        assert rel_err(got, pipe.generate(control_image=control, **{**edit, "mask_image": 1 - masks}, **kw)) > 1e-3
    # one image (and mask) for both seeds: each sample encodes its own copy (diffusers given it once per sample)
    one = {k: v[:1].clone() for k, v in edit.items()}
    want = ref(control_image=control, num_inference_steps=6, height=16, width=16, prompt_embeds=ctx,
               pooled_prompt_embeds=pooled, generator=_generators(), output_type="latent",
               **{k: v.repeat(2, 1, 1, 1) for k, v in one.items()}, **options).images
    assert rel_err(_pack(pipe.generate(control_image=control, **one, **kw)), want) <= 2e-5


def test_engine_flux_control_requests_equal_their_solo_runs(tmp_path):
    pipe, _ = _control_pair(tmp_path)
    g = torch.Generator().manual_seed(2)
    ctx, pooled = torch.randn(1, 5, 12, generator=g), torch.randn(1, 10, generator=g)
    images = _images(3)
    with fastdiff.Engine(pipe, max_batch=4, max_wait_ms=50) as engine:
        futures = [engine.submit(seed=i, control_image=images[i], steps=3, encoder_hidden_states=ctx[0],
                                 text_embeds=pooled[0]) for i in range(3)]
        results = [f.result(timeout=120) for f in futures]
        assert engine.stats()["batch_size_hist"] == {3: 1}
        # a FluxControlInpaint request: its own solo run
        inpaint = dict(image=_images(1)[0], mask_image=_masks(1)[0])
        results.append(engine.submit(seed=3, control_image=images[0], steps=3, encoder_hidden_states=ctx[0],
                                     text_embeds=pooled[0], **inpaint).result(timeout=120))
    for i, got in enumerate(results):
        want = pipe.generate(seeds=[i], control_image=images[i % 3], steps=3, encoder_hidden_states=ctx,
                             text_embeds=pooled, progress=False, **(inpaint if i == 3 else {}))[0]
        assert rel_err(got, want) <= 1e-5
    assert rel_err(results[3], pipe.generate(seeds=[3], control_image=images[0], steps=3, encoder_hidden_states=ctx,
                                             text_embeds=pooled, progress=False)[0]) > 1e-3


@pytest.mark.parametrize("in_channels", [4, 9])
@pytest.mark.parametrize("strength, image_rows, mask_rows", [(1.0, 1, 1), (0.7, 1, 2), (1.0, 2, 1)])
def test_one_image_for_several_samples_is_encoded_per_sample(tmp_path, in_channels, strength, image_rows, mask_rows):
    """One image (or mask) for two seeds: each sample encodes its own copy from its own generator, so a sample depends
    on its own seed only: it equals diffusers given the image once per sample, and its solo run. (diffusers' inpainting
    pipelines, given it once, draw its posterior from the first generator alone and repeat it.)"""
    from test_img2img import SD_SCHEDULER, sd_pair

    parts = sd_unet_vae_embeds(in_channels=in_channels)
    pipe, ref = sd_pair(parts, tmp_path, diffusers.EulerAncestralDiscreteScheduler.from_config(SD_SCHEDULER),
                        "StableDiffusionInpaintPipeline", "StableDiffusionInpaintPipeline")
    e = parts[2]
    images, masks = _images(image_rows), _masks(mask_rows)
    want = _reference(ref, e, images.repeat(2 // image_rows, 1, 1, 1), masks.repeat(2 // mask_rows, 1, 1, 1), 4, 3.0,
                      strength)
    got = pipe.generate(image=images, mask_image=masks, strength=strength, **_kwargs(e, 4, 3.0))
    assert rel_err(got, want) <= 1e-5
    second = {**_kwargs({k: v[1:] for k, v in e.items()}, 4, 3.0), "seeds": SEEDS[1:]}  # the second seed alone
    assert rel_err(got[1:], pipe.generate(image=images[-1:], mask_image=masks[-1:], strength=strength, **second)) <= 1e-5


@pytest.mark.parametrize("model", ["fill", "flux"])
def test_flux_inpainting_one_image_for_two_seeds_equals_diffusers(tmp_path, model):
    """One image for two seeds with FLUX.1 Fill and FLUX.1 inpainting: each sample encodes its own copy, as
    FluxFillPipeline / FluxInpaintPipeline given it once per sample (given it once, they draw from the first
    generator alone)."""
    from test_flux import _pack

    pipe, ref = _fill_pair(tmp_path) if model == "fill" else _flux_pair(tmp_path, "FluxInpaintPipeline", "FluxPipeline")
    g = torch.Generator().manual_seed(2)
    ctx, pooled = torch.randn(2, 5, 12, generator=g), torch.randn(2, 10, generator=g)
    images, masks = _images(1), _masks(1)
    want = ref(image=images.repeat(2, 1, 1, 1), mask_image=masks.repeat(2, 1, 1, 1), num_inference_steps=4,
               height=16, width=16, prompt_embeds=ctx, pooled_prompt_embeds=pooled, generator=_generators(),
               output_type="latent").images
    got = pipe.generate(image=images, mask_image=masks, steps=4, seeds=SEEDS, encoder_hidden_states=ctx,
                        text_embeds=pooled, progress=False)
    assert rel_err(_pack(got), want) <= 2e-5
    assert rel_err(got[1:], pipe.generate(image=images, mask_image=masks, steps=4, seeds=SEEDS[1:],
                                          encoder_hidden_states=ctx[1:], text_embeds=pooled[1:], progress=False)) <= 1e-5


def test_flux_control_reads_tensors_as_images_in_either_range(tmp_path):
    """A [0, 1] tensor, its [-1, 1] form and the PIL image give one result (the VAE encodes [-1, 1]); sizes that are
    not whole latent pixels are refused by name."""
    pipe, _ = _control_pair(tmp_path)
    g = torch.Generator().manual_seed(2)
    kw = dict(steps=2, seeds=SEEDS, encoder_hidden_states=torch.randn(2, 5, 12, generator=g),
              text_embeds=torch.randn(2, 10, generator=g), progress=False)
    pixels = np.random.default_rng(3).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    unit = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    want = pipe.generate(control_image=pixels, **kw)  # (uint8 arrays: pixels, as PIL images)
    assert rel_err(pipe.generate(control_image=unit, **kw), want) <= 1e-6
    assert rel_err(pipe.generate(control_image=unit * 2 - 1, **kw), want) <= 1e-6
    with pytest.raises(BadArgumentError, match="control_image: expected a height and width that are multiples of 2"):
        pipe.generate(control_image=torch.rand(2, 3, 15, 16), **kw)
