"""ControlNet: the network against diffusers' ``ControlNetModel``, and ``generate(control_image=...)`` against
diffusers' ``StableDiffusionControlNetPipeline`` (tiny random models, the same latents, embeddings and image); its
options, captured graphs, and what is refused."""

import os

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff.errors import BadArgumentError, CorruptCheckpointError, StateDictMismatchError
from helpers import diffusers_pipeline, perturb_, rel_err
from test_graph_scopes import FakeGraph
from test_prompts import DDIM, _latents, _save, _unet

diffusers = pytest.importorskip("diffusers",
                                reason="diffusers' ControlNetModel and ControlNet pipelines are the reference")
Image = pytest.importorskip("PIL.Image", reason="the control images are PIL images, as users pass them")

CROSS = 16
CONTROLNET = dict(in_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), cross_attention_dim=CROSS,
                  attention_head_dim=4, norm_num_groups=8, conditioning_embedding_out_channels=(4, 8, 8, 16))


def _controlnet(seed=1, **extra):
    """A tiny diffusers ControlNet with no zero convolutions left, whose conditioning embedding is scaled up so that
    the control image moves the result well beyond rounding (a mixed-up image fails the comparisons)."""
    torch.manual_seed(seed)
    net = perturb_(diffusers.ControlNetModel(**{**CONTROLNET, **extra}).eval(), seed)
    with torch.no_grad():
        for p in net.controlnet_cond_embedding.parameters():
            p.mul_(8)
    return net


def sdxl_controlnet(seed, folder, **extra):
    """A tiny diffusers ControlNet for test_sdxl's UNet (its text, pooled text and ids), saved to ``folder``."""
    from test_sdxl import UNET

    fields = {k: UNET[k] for k in ("cross_attention_dim", "attention_head_dim", "transformer_layers_per_block",
                                   "use_linear_projection", "addition_embed_type", "addition_time_embed_dim",
                                   "projection_class_embeddings_input_dim")}
    net = _controlnet(seed, **fields, **extra)
    net.save_pretrained(folder)
    return net


def _image(seed=0, size=64) -> np.ndarray:
    """An 8-bit RGB control image (H, W, 3)."""
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _states(seed=5, b=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 7, CROSS, generator=g), torch.randn(b, 7, CROSS, generator=g)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """(SD pipeline folder, ControlNet folder, the diffusers UNet, the diffusers ControlNet)."""
    root = str(tmp_path_factory.mktemp("controlnet"))
    unet, controlnet = _unet(CROSS), _controlnet()
    sd = diffusers_pipeline("StableDiffusionPipeline")(
        vae=None, text_encoder=None, tokenizer=None, unet=unet, scheduler=diffusers.DDIMScheduler(**DDIM),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    folder = _save(sd, os.path.join(root, "pipe"))
    controlnet.save_pretrained(os.path.join(root, "controlnet"))
    return folder, os.path.join(root, "controlnet"), unet, controlnet


def _reference(parts, scheduler, controlnet=None):
    ref = diffusers_pipeline("StableDiffusionControlNetPipeline")(
        vae=None, text_encoder=None, tokenizer=None, unet=parts[2], controlnet=controlnet or parts[3],
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ref


def _two_controlnets(parts, tmp_path):
    """(fastdiff's pipeline driven by two ControlNets, diffusers' multi-ControlNet pipeline on the same ones)."""
    second = _controlnet(6)
    second.save_pretrained(tmp_path / "second")
    ref = _reference(parts, diffusers.DDIMScheduler(**DDIM), controlnet=[parts[3], second])
    return fastdiff.load(parts[0]).set_controlnet([parts[1], str(tmp_path / "second")]), ref


@pytest.mark.parametrize("extra", [{}, {"controlnet_conditioning_channel_order": "bgr"},
                                   {"global_pool_conditions": True}], ids=["rgb", "bgr", "pooled"])
@pytest.mark.parametrize("guess", [False, True])
def test_the_controlnet_equals_controlnetmodel(tmp_path, extra, guess):
    from fastdiff.checkpoints.controlnet import load_controlnet

    ref = _controlnet(2, **extra)
    ref.save_pretrained(tmp_path)
    mine = load_controlnet(str(tmp_path))
    g = torch.Generator().manual_seed(0)
    x, image, ctx = torch.randn(2, 4, 8, 16, generator=g), torch.rand(2, 3, 64, 128, generator=g), \
        torch.randn(2, 5, CROSS, generator=g)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        down, mid = ref(x, t, encoder_hidden_states=ctx, controlnet_cond=image, conditioning_scale=0.7,
                        guess_mode=guess, return_dict=False)
        got_down, got_mid = mine(x, t, image, torch.tensor([0.7, 0.7]), torch.full((2,), float(guess)),
                                 encoder_hidden_states=ctx)
    assert len(got_down) == len(down) == 4  # conv_in, level 0 (resnet, downsampler), level 1 (resnet)
    for a, b in zip(got_down + [got_mid], list(down) + [mid]):
        assert a.shape == b.shape and rel_err(a, b) <= 1e-6 and float(b.abs().max()) > 0


SCHEDULERS = {"ddim": lambda: diffusers.DDIMScheduler(**DDIM),
              "dpm": lambda: diffusers.DPMSolverMultistepScheduler(**{k: v for k, v in DDIM.items()
                                                                      if k in ("beta_start", "beta_end",
                                                                               "beta_schedule", "steps_offset")}),
              "euler": lambda: diffusers.EulerDiscreteScheduler(**{k: v for k, v in DDIM.items()
                                                                  if k in ("beta_start", "beta_end", "beta_schedule",
                                                                           "steps_offset")})}
CASES = {  # generate's options -> diffusers'
    "plain": {},
    "scaled": dict(controlnet_conditioning_scale=0.6),
    "window": dict(control_guidance_start=0.25, control_guidance_end=0.75),
    "guess": dict(guess_mode=True, controlnet_conditioning_scale=0.8),
}


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_generate_equals_the_controlnet_pipeline(parts, scheduler, case):
    ref = _reference(parts, SCHEDULERS[scheduler]())
    scheduler_config = {**ref.scheduler.config, "_class_name": type(ref.scheduler).__name__}
    pipe = fastdiff.load(parts[0], scheduler=scheduler_config).set_controlnet(parts[1])
    cond, uncond = _states()
    latents, image = _latents(), _image()
    options = CASES[case]
    want = ref(prompt_embeds=cond, negative_prompt_embeds=uncond, image=Image.fromarray(image), latents=latents.clone(),
               num_inference_steps=4, guidance_scale=3.0, output_type="latent", **options).images
    got = pipe.generate(encoder_hidden_states=cond, negative_encoder_hidden_states=uncond,
                        control_image=Image.fromarray(image), latents=latents, steps=4, cfg_scale=3.0, progress=False,
                        **options)
    assert rel_err(got, want) <= 1e-5
    plain = fastdiff.load(parts[0], scheduler=scheduler_config).generate(
        encoder_hidden_states=cond, negative_encoder_hidden_states=uncond, latents=latents, steps=4, cfg_scale=3.0,
        progress=False)
    assert rel_err(got, plain) > 1e-3  # the ControlNet changed the result


def test_the_window_and_guess_mode_without_guidance_equal_diffusers(parts):
    """Unguided: guess mode only reweights the outputs; a window that keeps no step gives the plain UNet."""
    ref = _reference(parts, SCHEDULERS["ddim"]())
    pipe = fastdiff.load(parts[0]).set_controlnet(parts[1])
    cond, _ = _states()
    latents, image = _latents(), torch.from_numpy(_image(1)).permute(2, 0, 1)[None].float() / 255
    for options in (dict(guess_mode=True), dict(control_guidance_start=0.5, control_guidance_end=0.6)):
        want = ref(prompt_embeds=cond, image=image, latents=latents.clone(), num_inference_steps=4, guidance_scale=1.0,
                   output_type="latent", **options).images
        got = pipe.generate(encoder_hidden_states=cond, control_image=image, latents=latents, steps=4, progress=False,
                            **options)
        assert rel_err(got, want) <= 1e-5
    plain = fastdiff.load(parts[0]).generate(encoder_hidden_states=cond, latents=latents, steps=4, progress=False)
    assert torch.equal(got, plain)  # (0.5 - 0.6 keeps none of 4 steps: every residual scaled by 0)


@pytest.mark.parametrize("scope", ["step", "loop"])
def test_captured_graphs_take_new_control_inputs_without_a_recapture(parts, scope):
    eager = fastdiff.load(parts[0]).set_controlnet(parts[1])
    graphed = fastdiff.load(parts[0]).optimize(cuda_graphs=True, graph_scope=scope, batch_buckets=(2,),
                                               graph_factory=FakeGraph).set_controlnet(parts[1])
    cond, uncond = _states()
    kw = dict(encoder_hidden_states=cond, negative_encoder_hidden_states=uncond, latents=_latents(), steps=3,
              cfg_scale=2.0, progress=False)
    for seed, options in ((0, {}), (1, dict(controlnet_conditioning_scale=0.5, control_guidance_end=0.7)),
                          (2, dict(guess_mode=True))):
        image = _image(seed)
        assert rel_err(graphed.generate(control_image=image, **options, **kw),
                       eager.generate(control_image=image, **options, **kw)) <= 1e-6
    captures = graphed.loop_graphs.captures if scope == "loop" else graphed.runner.captures
    assert captures == 1


def test_set_controlnet_after_optimize_and_back(parts):
    pipe = fastdiff.load(parts[0]).optimize(backend="eager", fuse_qkv=True)
    cond, _ = _states()
    kw = dict(encoder_hidden_states=cond, latents=_latents(), steps=2, progress=False)
    plain = pipe.generate(**kw)
    controlled = pipe.set_controlnet(parts[1]).generate(control_image=_image(), **kw)
    want = fastdiff.load(parts[0]).set_controlnet(parts[1]).generate(control_image=_image(), **kw)
    assert rel_err(controlled, want) <= 1e-5 and rel_err(controlled, plain) > 1e-3
    assert torch.equal(pipe.set_controlnet(None).generate(**kw), plain)


def test_what_controlnets_refuse(parts, tmp_path):
    from fastdiff.checkpoints.controlnet import load_controlnet

    pipe = fastdiff.load(parts[0])
    cond, _ = _states()
    kw = dict(encoder_hidden_states=cond, seeds=[1, 2], steps=2, progress=False)
    with pytest.raises(BadArgumentError, match="control_image, guess_mode: given, but this pipeline has no ControlNet"):
        pipe.generate(control_image=_image(), guess_mode=True, **kw)
    pipe.set_controlnet(parts[1])
    cases = [(dict(), "control_image: this pipeline is driven by a ControlNet"),
             (dict(control_image=_image(size=60)), "multiples of 8"),
             (dict(control_image=_image(), height=16), "fixes the latent size to 8x8"),
             (dict(control_image=_image(), control_guidance_start=0.8, control_guidance_end=0.2),
              "expected 0 <= start < end <= 1"),
             (dict(control_image=_image(), controlnet_conditioning_scale=float("nan")),
              "controlnet_conditioning_scale"),
             (dict(control_image=_image(), guess_mode=1), "guess_mode: expected True or False"),
             (dict(control_image=[_image(), _image(1), _image(2)]), "expected 1 or 2 images"),
             (dict(control_image=_image(), image=torch.randn(4, 16, 16)),  # (latents as the image)
              "the control image fixes the latent size to 8x8 and the image to 16x16")]
    for options, match in cases:
        with pytest.raises(BadArgumentError, match=match):
            pipe.generate(**{**kw, **options})
    other = _controlnet(block_out_channels=(8, 16), norm_num_groups=4)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(BadArgumentError, match="made for another UNet; block_out_channels"):
        pipe.set_controlnet(str(tmp_path / "other"))
    with pytest.raises(BadArgumentError, match="expected a diffusers ControlNetModel, SD3ControlNetModel or "
                                               "FluxControlNetModel folder"):
        pipe.set_controlnet(str(tmp_path / "missing"))
    broken = tmp_path / "broken"
    _controlnet().save_pretrained(broken)
    from safetensors.torch import load_file, save_file

    weights = broken / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state.pop("controlnet_mid_block.weight")
    save_file(state, weights)
    with pytest.raises(StateDictMismatchError, match="controlnet_mid_block.weight"):
        load_controlnet(str(broken))
    with pytest.raises(BadArgumentError, match="drives a text-conditioned UNet"):
        fastdiff.load("arch:tiny-dit").set_controlnet(parts[1])
    with pytest.raises(BadArgumentError,
                       match="controlnet_conditioning_scale: given, but this pipeline has no ControlNet"):
        fastdiff.load(parts[0]).generate(controlnet_conditioning_scale=0.5, **kw)


def test_the_engine_batches_control_images_each_equal_to_its_solo_run(parts):
    pipe = fastdiff.load(parts[0]).set_controlnet(parts[1])
    cond, uncond = _states()
    kw = dict(steps=3, cfg_scale=2.0, encoder_hidden_states=cond[0], negative_encoder_hidden_states=uncond[0])
    with fastdiff.Engine(pipe, max_batch=4, max_wait_ms=50) as engine:
        futures = [engine.submit(seed=i, control_image=_image(i), controlnet_conditioning_scale=0.7, **kw)
                   for i in range(3)]
        guessed = engine.submit(seed=3, control_image=_image(3), guess_mode=True, **kw)  # (another batch: its option)
        missing = engine.submit(seed=4, **kw)
        too_small = engine.submit(seed=5, control_image=_image(size=60), **kw)
        results = [f.result(timeout=120) for f in futures] + [guessed.result(timeout=120)]
        assert engine.stats()["batch_size_hist"] == {3: 1, 1: 1}
    for fut, match in ((missing, "control_image: this pipeline is driven by a ControlNet"),
                       (too_small, "multiples of 8")):
        with pytest.raises(BadArgumentError, match=match):
            fut.result(timeout=10)
    for i, got in enumerate(results):
        options = dict(guess_mode=True) if i == 3 else dict(controlnet_conditioning_scale=0.7)
        want = pipe.generate(seeds=[i], control_image=_image(i), steps=3, cfg_scale=2.0,
                             encoder_hidden_states=cond[:1], negative_encoder_hidden_states=uncond[:1], progress=False,
                             **options)[0]
        assert rel_err(got, want) <= 1e-5


def test_cli_generate_with_a_controlnet(parts, tmp_path):
    from safetensors.torch import load_file

    from test_cli import fastdiff as run_cli
    from test_prompts import diffusers_tokenizer
    from tiny_text import clip_encoder, write_clip_tokenizer

    pytest.importorskip("transformers", reason="the folder's text encoder is transformers' CLIP")
    ref = diffusers_pipeline("StableDiffusionPipeline")(
        vae=None, text_encoder=clip_encoder(CROSS), tokenizer=diffusers_tokenizer(write_clip_tokenizer(
            str(tmp_path / "tok"))), unet=parts[2], scheduler=diffusers.DDIMScheduler(**DDIM), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    folder = _save(ref, str(tmp_path / "pipe"))
    Image.fromarray(_image(4)).save(tmp_path / "edges.png")
    r = run_cli("generate", folder, "--prompt", "a red cat", "--controlnet", parts[1], "--control-image", "edges.png",
                "--controlnet-scale", "0.5", "--control-end", "0.5", "--cfg", "2", "--n", "1", "--steps", "2",
                "--seed", "3", "--output-latents", "lat.safetensors", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    pipe = fastdiff.load(folder).set_controlnet(parts[1])
    want = pipe.generate(1, prompt="a red cat", control_image=Image.open(tmp_path / "edges.png"),
                         controlnet_conditioning_scale=0.5, control_guidance_end=0.5, cfg_scale=2.0, steps=2, seed=3,
                         progress=False)
    assert torch.equal(load_file(str(tmp_path / "lat.safetensors"))["latents"], want)
    Image.fromarray(_image(6)).save(tmp_path / "depth.png")
    r = run_cli("generate", folder, "--prompt", "a red cat", "--controlnet", parts[1], "--control-image", "edges.png",
                "--controlnet", parts[1], "--control-image", "depth.png", "--n", "1", "--steps", "2", "--seed", "3",
                "--output-latents", "two.safetensors", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    pipe.set_controlnet([parts[1], parts[1]])
    want = pipe.generate(1, prompt="a red cat", control_image=[Image.open(tmp_path / name) for name in
                                                               ("edges.png", "depth.png")], steps=2, seed=3,
                         progress=False)
    assert torch.equal(load_file(str(tmp_path / "two.safetensors"))["latents"], want)
    controlled = _save(diffusers_pipeline("StableDiffusionControlNetPipeline")(
        vae=None, text_encoder=ref.text_encoder, tokenizer=ref.tokenizer, unet=ref.unet, controlnet=parts[3],
        scheduler=ref.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False),
        str(tmp_path / "controlled"))  # its controlnet/ is attached at load: --control-image alone
    r = run_cli("generate", controlled, "--prompt", "a red cat", "--control-image", "edges.png", "--n", "1",
                "--steps", "2", "--seed", "3", "--output-latents", "own.safetensors", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    want = fastdiff.load(controlled).generate(1, prompt="a red cat", control_image=Image.open(tmp_path / "edges.png"),
                                              steps=2, seed=3, progress=False)
    assert torch.equal(load_file(str(tmp_path / "own.safetensors"))["latents"], want)
    r = run_cli("generate", controlled, "--prompt", "a cat", "--output-latents", "x.safetensors", cwd=tmp_path)
    assert r.returncode == 2 and "driven by 1 ControlNet(s): expected one --control-image" in r.stderr, r.stderr
    for flags, message in ((["--control-image", "edges.png"], "has no ControlNet (pass --controlnet FOLDER)"),
                           (["--controlnet-scale", "0.5"], "--controlnet-scale: given without --control-image"),
                           (["--controlnet", parts[1]], "--controlnet: expected one --control-image COND.png per "
                                                        "ControlNet"),
                           (["--controlnet", parts[1], "--controlnet", parts[1], "--control-image", "edges.png"],
                            "found 2 ControlNet(s) and 1 image(s)"),
                           (["--controlnet", parts[1], "--control-image", "edges.png", "--height", "8"],
                            "the --control-image fixes the size")):
        r = run_cli("generate", folder, "--prompt", "a cat", *flags, "--output-latents", "x.safetensors", cwd=tmp_path)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("guess", [False, True])
def test_an_sdxl_controlnet_equals_the_sdxl_controlnet_pipeline(tmp_path, guess):
    """SDXL's ControlNets read the pooled text and the size / crop ids too (diffusers passes them its
    added_cond_kwargs)."""
    from test_sdxl import POOLED, SCHEDULER, _diffusers_pipe, _embeds, _fastdiff_kwargs
    from test_sdxl import _save as save_sdxl

    base = _diffusers_pipe()
    controlnet = sdxl_controlnet(3, tmp_path / "controlnet")
    ref = diffusers_pipeline("StableDiffusionXLControlNetPipeline")(
        vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=base.unet,
        controlnet=controlnet, scheduler=diffusers.EulerDiscreteScheduler(**SCHEDULER))
    ref.set_progress_bar_config(disable=True)
    pipe = fastdiff.load(save_sdxl(base, tmp_path / "sdxl")).set_controlnet(str(tmp_path / "controlnet"))
    assert pipe.spec.text_embeds_dim == POOLED
    e, image = _embeds(), Image.fromarray(_image(2))
    want = ref(**{k: v.clone() for k, v in e.items()}, image=image, num_inference_steps=4, guidance_scale=3.0,
               controlnet_conditioning_scale=0.8, guess_mode=guess, output_type="latent").images
    got = pipe.generate(steps=4, cfg_scale=3.0, control_image=image, controlnet_conditioning_scale=0.8,
                        guess_mode=guess, **_fastdiff_kwargs(e))
    assert rel_err(got, want) <= 2e-5


def test_a_controlnet_pipeline_folder_loads_with_its_controlnet(parts, tmp_path):
    """A StableDiffusionControlNetPipeline's save_pretrained folder: its controlnet/ drives the UNet, as diffusers'
    from_pretrained of that folder."""
    ref = _reference(parts, diffusers.DDIMScheduler(**DDIM))
    folder = _save(ref, str(tmp_path / "pipe"))
    pipe = fastdiff.load(folder)
    assert pipe.controlnet is not None and any("controlnet/" in note for note in pipe.notes)
    cond, uncond = _states()
    latents, image = _latents(), _image(5)
    want = ref(prompt_embeds=cond, negative_prompt_embeds=uncond, image=Image.fromarray(image),
               latents=latents.clone(), num_inference_steps=3, guidance_scale=2.0, output_type="latent").images
    got = pipe.generate(encoder_hidden_states=cond, negative_encoder_hidden_states=uncond, control_image=image,
                        latents=latents, steps=3, cfg_scale=2.0, progress=False)
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("options", [{}, dict(controlnet_conditioning_scale=1.2, control_guidance_start=0.3)],
                         ids=["defaults", "options"])
def test_img2img_with_a_controlnet_equals_the_controlnet_img2img_pipeline(tmp_path, options):
    """The grid's tail and its window as diffusers' ControlNet img2img pipeline (whose scale defaults to 0.8); the
    tiny VAE halves the size, so the ControlNet's embedding does too."""
    from test_img2img import SD_SCHEDULER, SEEDS, _generators, _images, sd_pair, sd_unet_vae_embeds

    unet, vae, e = parts = sd_unet_vae_embeds()
    controlnet = _controlnet(4, cross_attention_dim=12, conditioning_embedding_out_channels=(4, 16))
    controlnet.save_pretrained(tmp_path / "controlnet")
    scheduler = diffusers.DDIMScheduler.from_config(SD_SCHEDULER)
    pipe, _ = sd_pair(parts, tmp_path / "pipe", scheduler)
    pipe.set_controlnet(str(tmp_path / "controlnet"))
    ref = diffusers_pipeline("StableDiffusionControlNetImg2ImgPipeline")(
        vae=vae, unet=unet, controlnet=controlnet, scheduler=scheduler, text_encoder=None, tokenizer=None,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    images, control = _images(), _images(seed=9)
    want = ref(image=images.clone(), control_image=control.clone(), strength=0.7, num_inference_steps=6,
               guidance_scale=2.5, prompt_embeds=e["prompt_embeds"], negative_prompt_embeds=e["negative_prompt_embeds"],
               generator=_generators(), output_type="latent", **options).images
    got = pipe.generate(image=images, control_image=control, strength=0.7, steps=6, cfg_scale=2.5, seeds=SEEDS,
                        encoder_hidden_states=e["prompt_embeds"],
                        negative_encoder_hidden_states=e["negative_prompt_embeds"],
                        progress=False, **options)
    assert rel_err(got, want) <= 1e-5


def _controlnet_inpaint_pair(folder, scheduler_class: str, in_channels: int = 9):
    """(fastdiff's SD inpainting pipeline with a ControlNet, diffusers' ControlNet inpaint pipeline on the same
    parts, the embeddings): a tiny UNet (an inpainting one: 9 input channels; a regular one: 4), VAE (2 pixels per
    latent pixel) and ControlNet."""
    from test_img2img import SD_SCHEDULER, sd_pair, sd_unet_vae_embeds

    unet, vae, e = parts = sd_unet_vae_embeds(in_channels=in_channels)
    controlnet = _controlnet(5, cross_attention_dim=12, conditioning_embedding_out_channels=(4, 16))
    controlnet.save_pretrained(folder / "controlnet")
    scheduler = getattr(diffusers, scheduler_class).from_config(SD_SCHEDULER)
    pipe, _ = sd_pair(parts, folder / "pipe", scheduler, "StableDiffusionInpaintPipeline",
                      "StableDiffusionInpaintPipeline")
    pipe.set_controlnet(str(folder / "controlnet"))
    ref = diffusers_pipeline("StableDiffusionControlNetInpaintPipeline")(
        vae=vae, unet=unet, controlnet=controlnet, scheduler=scheduler, text_encoder=None, tokenizer=None,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return pipe, ref, e


def test_inpainting_with_a_controlnet_equals_the_controlnet_inpaint_pipeline(tmp_path):
    """An inpainting UNet's ControlNet reads the latents alone (4 channels); the UNet reads them with the mask and
    the masked image's latents."""
    from test_img2img import SEEDS, _generators, _images
    from test_inpaint import _masks

    pipe, ref, e = _controlnet_inpaint_pair(tmp_path, "EulerDiscreteScheduler")
    images, masks, control = _images(), _masks(), _images(seed=9)
    for strength in (1.0, 0.6):
        want = ref(image=images.clone(), mask_image=masks.clone(), control_image=control.clone(), strength=strength,
                   num_inference_steps=5, guidance_scale=3.0, prompt_embeds=e["prompt_embeds"],
                   negative_prompt_embeds=e["negative_prompt_embeds"], generator=_generators(), output_type="latent",
                   controlnet_conditioning_scale=0.9).images
        got = pipe.generate(image=images, mask_image=masks, control_image=control, strength=strength, steps=5,
                            cfg_scale=3.0, seeds=SEEDS, encoder_hidden_states=e["prompt_embeds"],
                            negative_encoder_hidden_states=e["negative_prompt_embeds"],
                            controlnet_conditioning_scale=0.9, progress=False)
        assert rel_err(got, want) <= 1e-5


def test_a_regular_unet_inpaints_with_a_controlnet_as_the_controlnet_inpaint_pipeline(tmp_path):
    """A 4-channel UNet under diffusers' ControlNet inpaint pipeline pastes the image back after every step, at the
    pipeline's defaults (strength 1.0, scale 0.5): so does fastdiff."""
    from test_img2img import SEEDS, _generators, _images
    from test_inpaint import _masks

    pipe, ref, e = _controlnet_inpaint_pair(tmp_path, "DPMSolverMultistepScheduler", in_channels=4)
    assert not pipe.spec.inpainting
    images, masks, control = _images(), _masks(), _images(seed=9)
    want = ref(image=images.clone(), mask_image=masks.clone(), control_image=control.clone(), num_inference_steps=6,
               guidance_scale=3.0, prompt_embeds=e["prompt_embeds"], negative_prompt_embeds=e["negative_prompt_embeds"],
               generator=_generators(), output_type="latent").images
    kw = dict(image=images, mask_image=masks, steps=6, cfg_scale=3.0, seeds=SEEDS,
              encoder_hidden_states=e["prompt_embeds"], negative_encoder_hidden_states=e["negative_prompt_embeds"],
              progress=False)
    got = pipe.generate(control_image=control, **kw)
    assert rel_err(got, want) <= 1e-5
    assert rel_err(got, pipe.generate(control_image=control.flip(0), **kw)) > 1e-3  # the control image reaches it


@pytest.mark.parametrize("cfg_folded", [False, True])
def test_an_exported_controlled_unet_runs_like_eager(parts, tmp_path, cfg_folded):
    """export_onnx of a pipeline with a ControlNet: one graph of both networks, taking the control inputs (the step
    window stays outside it, in the scale it is fed); through ONNX Runtime it equals the eager pipeline, loaded back
    from the file too. TensorRT's profiles scale the image's axes by the ControlNet's downscale."""
    pytest.importorskip("onnxruntime", reason="the exported graph runs in ONNX Runtime")
    from fastdiff.export.onnx import export_onnx, read_onnx_io
    from fastdiff.export.tensorrt import make_profiles

    pipe = fastdiff.load(parts[0]).set_controlnet(parts[1])
    path = str(tmp_path / "controlled.onnx")
    result = export_onnx(pipe, None, path, cfg_folded=cfg_folded, dynamic_hw=True, progress=False)
    assert result.max_rel_err is not None and result.max_rel_err <= 1e-5, result.check_note
    io = read_onnx_io(path)
    names = [n for n, _ in io["inputs"]]
    assert {"control_image", "control_scale", "control_guess"} <= set(names)
    assert ("uncond_control_scale" in names) == cfg_folded and "uncond_control_image" not in names
    assert io["control"] == {"conditioning_channels": 3, "image_downscale": 8, "global_pool_conditions": False}
    profiles = make_profiles(path, batch=(1, 2, 4), height=(8, 8, 16), width=(8, 12, 16))
    assert profiles["control_image"] == ((1, 3, 64, 64), (2, 3, 64, 96), (4, 3, 128, 128))

    cond, uncond = _states()
    kw = dict(encoder_hidden_states=cond, negative_encoder_hidden_states=uncond, latents=_latents(), steps=3,
              cfg_scale=2.5, progress=False)
    exported = fastdiff.load(path)
    for options in ({}, dict(controlnet_conditioning_scale=0.6, control_guidance_end=0.5), dict(guess_mode=True)):
        want = pipe.generate(control_image=_image(1), **options, **kw)
        assert rel_err(exported.generate(control_image=_image(1), **options, **kw), want) <= 1e-5
    with pytest.raises(BadArgumentError, match="control_image: this pipeline is driven by a ControlNet"):
        exported.generate(**kw)
    optimized = fastdiff.load(parts[0]).set_controlnet(parts[1]).optimize(backend="onnxruntime")
    want = pipe.generate(control_image=_image(1), **kw)
    assert rel_err(optimized.generate(control_image=_image(1), **kw), want) <= 1e-5


@pytest.mark.parametrize("cfg_folded", [False, True])
def test_two_exported_controlnets_run_like_eager(parts, tmp_path, cfg_folded):
    """export_onnx of a UNet driven by two ControlNets: one graph taking (B, 2, 3, 8H, 8W) images and (B, 2) scales;
    through ONNX Runtime, loaded back and as the onnxruntime backend, it equals eager (scales, windows, guess mode)."""
    pytest.importorskip("onnxruntime", reason="the exported graph runs in ONNX Runtime")
    from fastdiff.export.onnx import export_onnx, read_onnx_io
    from fastdiff.export.tensorrt import make_profiles

    pipe, _ = _two_controlnets(parts, tmp_path)
    path = str(tmp_path / "two.onnx")
    result = export_onnx(pipe, None, path, cfg_folded=cfg_folded, dynamic_hw=True, progress=False)
    assert result.max_rel_err is not None and result.max_rel_err <= 1e-5, result.check_note
    io = read_onnx_io(path)
    assert io["control"] == {"conditioning_channels": 3, "image_downscale": 8, "global_pool_conditions": False,
                             "count": 2}
    profiles = make_profiles(path, batch=(1, 2, 4), height=(8, 8, 16), width=(8, 12, 16))
    assert profiles["control_image"] == ((1, 2, 3, 64, 64), (2, 2, 3, 64, 96), (4, 2, 3, 128, 128))
    cond, uncond = _states()
    kw = dict(encoder_hidden_states=cond, negative_encoder_hidden_states=uncond, latents=_latents(), steps=3,
              cfg_scale=2.5, progress=False)
    exported = fastdiff.load(path)
    optimized = _two_controlnets(parts, tmp_path / "again")[0].optimize(backend="onnxruntime")
    for options in ({}, dict(controlnet_conditioning_scale=[0.6, 1.2], control_guidance_end=[0.5, 1.0]),
                    dict(guess_mode=True)):
        want = pipe.generate(control_image=[_image(1), _image(2)], **options, **kw)
        assert rel_err(want, pipe.generate(control_image=[_image(2), _image(1)], **options, **kw)) > 1e-4
        for other in (exported, optimized):
            assert rel_err(other.generate(control_image=[_image(1), _image(2)], **options, **kw), want) <= 1e-5


def test_cli_export_writes_the_controlled_graph(parts, tmp_path):
    pytest.importorskip("onnx", reason="the export writes ONNX")
    from fastdiff.export.onnx import read_onnx_io
    from test_cli import fastdiff as run_cli

    r = run_cli("export", parts[0], "--format", "onnx", "--controlnet", parts[1], "-o", "controlled.onnx",
                "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "parity check: max abs error" in r.stdout or "skipped" in r.stdout
    assert read_onnx_io(str(tmp_path / "controlled.onnx"))["control"]["image_downscale"] == 8
    r = run_cli("export", parts[0], "--format", "onnx", "--controlnet", parts[1], "--controlnet", parts[1], "-o",
                "two.onnx", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert read_onnx_io(str(tmp_path / "two.onnx"))["control"]["count"] == 2
    r = run_cli("export", parts[0], "--format", "onnx", "--controlnet", parts[1], "--component", "vae", "-o", "v.onnx",
                cwd=tmp_path)
    assert r.returncode == 2 and "--controlnet: given with --component vae" in r.stderr


def test_from_unet_equals_diffusers_from_unet_and_changes_nothing_untrained(parts):
    from fastdiff.models.controlnet import ControlNet

    pipe = fastdiff.load(parts[0])
    mine = ControlNet.from_unet(pipe.model, conditioning_embedding_out_channels=(4, 8, 8, 16))
    theirs = diffusers.ControlNetModel.from_unet(parts[2], conditioning_embedding_out_channels=(4, 8, 8, 16))
    want = theirs.state_dict()
    assert set(mine.state_dict()) == set(want)
    embedding = "controlnet_cond_embedding."  # (randomly initialised on both sides, save its zero conv_out)
    for k, v in mine.state_dict().items():
        if not k.startswith(embedding) or k.startswith(embedding + "conv_out"):
            assert torch.equal(v, want[k]), k
    cond, _ = _states()
    kw = dict(encoder_hidden_states=cond, latents=_latents(), steps=2, progress=False)
    assert torch.equal(pipe.set_controlnet(mine).generate(control_image=_image(), **kw),
                       fastdiff.load(parts[0]).generate(**kw))


@pytest.mark.parametrize("guess", [False, True])
def test_several_controlnets_equal_diffusers_multicontrolnet(parts, tmp_path, guess):
    """A list of ControlNets: one image, scale and window each, their outputs summed, as diffusers'
    MultiControlNetModel; in captured graphs too, and through the Engine."""
    pipe, ref = _two_controlnets(parts, tmp_path)
    cond, uncond = _states()
    latents, images = _latents(), [Image.fromarray(_image(7)), Image.fromarray(_image(8))]
    options = dict(controlnet_conditioning_scale=[0.5, 1.2], control_guidance_start=[0.0, 0.25],
                   control_guidance_end=[0.75, 1.0], guess_mode=guess)
    want = ref(prompt_embeds=cond, negative_prompt_embeds=uncond, image=images, latents=latents.clone(),
               num_inference_steps=4, guidance_scale=3.0, output_type="latent", **options).images
    kw = dict(encoder_hidden_states=cond, negative_encoder_hidden_states=uncond, steps=4, cfg_scale=3.0,
              progress=False)
    got = pipe.generate(control_image=images, latents=latents, **options, **kw)
    assert rel_err(got, want) <= 1e-5
    graphed = fastdiff.load(parts[0]).optimize(cuda_graphs=True, graph_scope="loop", batch_buckets=(2,),
                                               graph_factory=FakeGraph)
    graphed.set_controlnet([parts[1], str(tmp_path / "second")])
    assert rel_err(graphed.generate(control_image=images, latents=latents, **options, **kw), want) <= 1e-5
    with pytest.raises(BadArgumentError, match=r"expected a list of 2 image\(s\), one per ControlNet"):
        pipe.generate(control_image=images[0], latents=latents, **kw)
    with pytest.raises(BadArgumentError, match="expected one value or 2 \\(one per ControlNet\\), found 3"):
        pipe.generate(control_image=images, latents=latents, controlnet_conditioning_scale=[1, 1, 1], **kw)
    if guess:
        return
    engine_options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    with fastdiff.Engine(pipe, max_batch=2, max_wait_ms=50) as engine:
        futures = [engine.submit(seed=s, control_image=images, encoder_hidden_states=cond[0],
                                 negative_encoder_hidden_states=uncond[0], steps=4, cfg_scale=3.0, **engine_options)
                   for s in (1, 2)]
        results = [f.result(timeout=120) for f in futures]
    for s, result in zip((1, 2), results):
        solo = pipe.generate(seeds=[s], control_image=images, **{**kw, **options, "encoder_hidden_states": cond[:1],
                                                                  "negative_encoder_hidden_states": uncond[:1]})
        assert rel_err(result, solo[0]) <= 1e-5


def test_save_keeps_the_controlnets_and_load_attaches_them(parts, tmp_path):
    """save() writes each ControlNet as a diffusers ControlNetModel folder (diffusers reads it back to the same
    weights) beside the fastdiff files; load() drives the UNet with them again, one or several (one named twice is
    written once and loads back as one module)."""
    import json

    cond, _ = _states()
    kw = dict(encoder_hidden_states=cond, latents=_latents(), steps=2, progress=False)
    _controlnet(6).save_pretrained(tmp_path / "second")
    second = str(tmp_path / "second")
    for nets, image, folders in ((parts[1], _image(1), ["controlnet"]),
                                 ([parts[1], parts[1]], [_image(1), _image(2)], ["controlnet", "controlnet"]),
                                 ([parts[1], second], [_image(1), _image(2)], ["controlnet", "controlnet_1"])):
        pipe = fastdiff.load(parts[0]).optimize(backend="eager", fuse_qkv=True).set_controlnet(nets)
        want = pipe.generate(control_image=image, **kw)
        path = pipe.save(str(tmp_path / "saved"))  # (each save replaces the one before)
        assert json.loads((tmp_path / "saved" / "fastdiff.json").read_text())["controlnets"] == folders
        assert sorted(p.name for p in (tmp_path / "saved").glob("controlnet*")) == sorted(set(folders))
        back = fastdiff.load(path)
        assert type(back.controlnet) is type(pipe.controlnet)
        if len(folders) == 2:
            assert (back.controlnet.nets[0] is back.controlnet.nets[1]) == (folders[0] == folders[1])
        assert torch.equal(back.generate(control_image=image, **kw), want)
        theirs = diffusers.ControlNetModel.from_pretrained(str(tmp_path / "saved" / "controlnet"))
        assert all(torch.equal(v, parts[3].state_dict()[k]) for k, v in theirs.state_dict().items())
        assert dict(theirs.config)["conditioning_embedding_out_channels"] == [4, 8, 8, 16]
    header = json.loads((tmp_path / "saved" / "fastdiff.json").read_text())
    for bad, match in ((["controlnet", "controlnet_2"], "names the ControlNet folder.s. controlnet_2"),
                       (["../second"], "expected a list of folder names")):
        (tmp_path / "saved" / "fastdiff.json").write_text(json.dumps({**header, "controlnets": bad}))
        with pytest.raises(CorruptCheckpointError, match=match):
            fastdiff.load(path)


def test_info_names_the_control_image(parts, tmp_path):
    from fastdiff.commands.info import model_ops

    folder = _save(_reference(parts, diffusers.DDIMScheduler(**DDIM)), str(tmp_path / "pipe"))
    assert "(a ControlNet: control_image, 3 channels at 8 pixels per latent pixel)" in \
        model_ops(folder, "eager")["conditioning"]
    assert "ControlNet" not in model_ops(parts[0], "eager")["conditioning"]


# --- what a review found (each test fails without its fix) ---------------------------------------------------------

def _two_images_differ(pipe, kw, a, b):
    """The control image reaches the result: two images give results far apart (beyond rounding)."""
    return rel_err(pipe.generate(control_image=a, **kw), pipe.generate(control_image=b, **kw)) > 1e-3


@pytest.mark.parametrize("scheduler, start, end", [("PNDMScheduler", 0.25, 0.75), ("PNDMScheduler", 0.0, 0.5),
                                                   ("HeunDiscreteScheduler", 0.25, 0.75),
                                                   ("KDPM2DiscreteScheduler", 0.2, 0.9)])
def test_the_window_counts_network_evaluations_as_diffusers_timesteps(parts, scheduler, start, end):
    """diffusers' controlnet_keep runs over its timesteps, one per network evaluation: PNDM repeats one, Heun and
    KDPM2 evaluate twice per step."""
    config = {k: v for k, v in DDIM.items() if k in ("beta_start", "beta_end", "beta_schedule", "steps_offset")}
    sched = getattr(diffusers, scheduler)(**config, **({"skip_prk_steps": True} if scheduler == "PNDMScheduler"
                                                        else {}))
    ref = _reference(parts, sched)
    pipe = fastdiff.load(parts[0], scheduler={**sched.config, "_class_name": scheduler}).set_controlnet(parts[1])
    cond, uncond = _states()
    latents, image = _latents(), _image(3)
    options = dict(control_guidance_start=start, control_guidance_end=end)
    want = ref(prompt_embeds=cond, negative_prompt_embeds=uncond, image=Image.fromarray(image),
               latents=latents.clone(), num_inference_steps=5, guidance_scale=2.0, output_type="latent",
               **options).images
    got = pipe.generate(encoder_hidden_states=cond, negative_encoder_hidden_states=uncond, control_image=image,
                        latents=latents, steps=5, cfg_scale=2.0, progress=False, **options)
    assert rel_err(got, want) <= 1e-5


def test_a_pooling_controlnet_guides_the_conditional_pass_only(parts, tmp_path):
    """diffusers: guess_mode = guess_mode or global_pool_conditions."""
    pooled = _controlnet(7, global_pool_conditions=True)
    pooled.save_pretrained(tmp_path / "pooled")
    ref = diffusers_pipeline("StableDiffusionControlNetPipeline")(
        vae=None, text_encoder=None, tokenizer=None, unet=parts[2], controlnet=pooled,
        scheduler=diffusers.DDIMScheduler(**DDIM), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    pipe = fastdiff.load(parts[0]).set_controlnet(str(tmp_path / "pooled"))
    cond, uncond = _states()
    latents, image = _latents(), _image(4)
    want = ref(prompt_embeds=cond, negative_prompt_embeds=uncond, image=Image.fromarray(image),
               latents=latents.clone(), num_inference_steps=3, guidance_scale=3.0, output_type="latent").images
    kw = dict(encoder_hidden_states=cond, negative_encoder_hidden_states=uncond, latents=latents, steps=3,
              cfg_scale=3.0, progress=False)
    assert rel_err(pipe.generate(control_image=image, **kw), want) <= 1e-5
    exported = tmp_path / "pooled.onnx"
    pytest.importorskip("onnxruntime", reason="the exported graph runs in ONNX Runtime")
    from fastdiff.export.onnx import export_onnx

    assert export_onnx(pipe, None, str(exported), progress=False).max_rel_err <= 1e-5  # (its check feeds the
    # stored inputs)
    assert rel_err(fastdiff.load(str(exported)).generate(control_image=image, **kw), want) <= 1e-5
    # the stored interface is the graph's own: the exporter drops control_guess, which a pooling ControlNet never
    # reads (a runtime feeding the metadata's inputs got "Invalid input name")
    import onnx
    from fastdiff.export.onnx import read_onnx_io

    graph_inputs = [i.name for i in onnx.load(str(exported)).graph.input]
    assert [n for n, _ in read_onnx_io(str(exported))["inputs"]] == graph_inputs
    assert "control_guess" not in graph_inputs and "control_scale" in graph_inputs


def test_control_tensors_are_read_as_they_are_and_nested_lists_are_per_sample(parts, tmp_path):
    """diffusers' control image processor does not normalise: a tensor with negative values goes in as it is. With
    several ControlNets, nested lists are one list per sample, one image per ControlNet each (diffusers transposes
    them)."""
    pipe, ref = _two_controlnets(parts, tmp_path)
    cond, uncond = _states()
    g = torch.Generator().manual_seed(5)
    a0, a1, b0, b1 = (torch.rand(1, 3, 64, 64, generator=g) * 2 - 1 for _ in range(4))  # (values in [-1, 1])
    kw = dict(encoder_hidden_states=cond, negative_encoder_hidden_states=uncond, latents=_latents(), steps=3,
              cfg_scale=2.0, progress=False)
    nested = [[a0, b0], [a1, b1]]  # sample 0: a0 for the first ControlNet, b0 for the second
    want = ref(prompt_embeds=cond, negative_prompt_embeds=uncond, image=nested, latents=kw["latents"].clone(),
               num_inference_steps=3, guidance_scale=2.0, output_type="latent").images
    assert rel_err(pipe.generate(control_image=nested, **kw), want) <= 1e-5
    assert rel_err(pipe.generate(control_image=[[a0, a1], [b0, b1]], **kw), want) > 1e-3  # (the images matter)


def test_a_multi_controlnet_pipeline_folder_loads_both(parts, tmp_path):
    _, ref = _two_controlnets(parts, tmp_path)
    pipe = fastdiff.load(_save(ref, str(tmp_path / "pipe")))
    assert len(pipe.controlnet.nets) == 2
    cond, uncond = _states()
    images = [_image(1), _image(2)]
    latents = _latents()
    want = ref(prompt_embeds=cond, negative_prompt_embeds=uncond, image=[Image.fromarray(i) for i in images],
               latents=latents.clone(), num_inference_steps=3, guidance_scale=2.0, output_type="latent").images
    got = pipe.generate(encoder_hidden_states=cond, negative_encoder_hidden_states=uncond, control_image=images,
                        latents=latents, steps=3, cfg_scale=2.0, progress=False)
    assert rel_err(got, want) <= 1e-5


def test_a_lora_loads_on_a_unet_with_per_level_resnet_counts(tmp_path):
    """(the ldm-name table is for UNets with one resnet count: another UNet's LoRA must still load)"""
    from helpers import lora_state

    torch.manual_seed(0)
    diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=[1, 2],
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=CROSS, attention_head_dim=4, norm_num_groups=8).save_pretrained(tmp_path)
    pipe = fastdiff.load(str(tmp_path))
    before = {k: v.clone() for k, v in pipe.model.state_dict().items()}
    assert pipe.load_lora(lora_state(pipe.model), scale=0.5)["network"] > 0
    assert any(not torch.equal(v, before[k]) for k, v in pipe.model.state_dict().items())


def test_defaults_follow_each_controlnet_pipeline(tmp_path):
    """Left unset, the scale and strength are those of diffusers' pipeline for the task: SDXL ControlNet img2img's
    strength 0.8 (SDXL img2img's own is 0.3) and scale 0.8; SD ControlNet inpainting's scale 0.5."""
    from test_img2img import SEEDS, _generators, _images, _text_kwargs, sdxl_pair
    from test_inpaint import _masks
    from test_sdxl import _embeds

    pipe, base = sdxl_pair(tmp_path / "sdxl")
    controlnet = sdxl_controlnet(8, tmp_path / "sdxl_controlnet", conditioning_embedding_out_channels=(4, 16))
    pipe.set_controlnet(str(tmp_path / "sdxl_controlnet"))
    ref = diffusers_pipeline("StableDiffusionXLControlNetImg2ImgPipeline")(
        vae=base.vae, unet=base.unet, controlnet=controlnet, scheduler=base.scheduler, text_encoder=None,
        text_encoder_2=None, tokenizer=None, tokenizer_2=None, requires_aesthetics_score=False)
    ref.set_progress_bar_config(disable=True)
    e, images, control = {k: v for k, v in _embeds().items() if k != "latents"}, _images(), _images(seed=9)
    want = ref(image=images.clone(), control_image=control.clone(), num_inference_steps=5, guidance_scale=3.0,
               generator=_generators(), output_type="latent", **{k: v.clone() for k, v in e.items()}).images
    got = pipe.generate(image=images, control_image=control, steps=5, cfg_scale=3.0, seeds=SEEDS, progress=False,
                        time_ids=[16, 16, 0, 0, 16, 16], **_text_kwargs(e, True))
    assert rel_err(got, want) <= 1e-5

    pipe, ref, e = _controlnet_inpaint_pair(tmp_path / "sd", "DDIMScheduler")
    masks = _masks()
    want = ref(image=images.clone(), mask_image=masks.clone(), control_image=control.clone(), num_inference_steps=4,
               guidance_scale=3.0, prompt_embeds=e["prompt_embeds"], negative_prompt_embeds=e["negative_prompt_embeds"],
               generator=_generators(), output_type="latent").images
    got = pipe.generate(image=images, mask_image=masks, control_image=control, steps=4, cfg_scale=3.0, seeds=SEEDS,
                        encoder_hidden_states=e["prompt_embeds"],
                        negative_encoder_hidden_states=e["negative_prompt_embeds"],
                        progress=False)
    assert rel_err(got, want) <= 1e-5


def test_a_failed_set_controlnet_changes_nothing_and_a_callers_controlnet_is_not_touched(parts, monkeypatch):
    from fastdiff.checkpoints.controlnet import load_controlnet
    from fastdiff.runtime import runners

    pytest.importorskip("onnxruntime", reason="the exported backend is ONNX Runtime's")
    cond, _ = _states()
    kw = dict(encoder_hidden_states=cond, latents=_latents(), steps=2, progress=False)
    pipe = fastdiff.load(parts[0]).optimize(backend="onnxruntime")
    plain, runner = pipe.generate(**kw), pipe.runner

    def export_fails(*a, **k):  # (an export that fails while the runner is rebuilt around the ControlNet)
        raise fastdiff.errors.UnsupportedConfigError("opset", 99, model="ONNX exporter")

    monkeypatch.setattr(runners, "build_runner", export_fails)
    with pytest.raises(fastdiff.errors.UnsupportedConfigError, match="opset"):
        pipe.set_controlnet([parts[1], parts[1]])
    monkeypatch.undo()
    assert pipe.controlnet is None and pipe.runner is runner and torch.equal(pipe.generate(**kw), plain)

    net = load_controlnet(parts[1])
    a = fastdiff.load(parts[0]).set_controlnet(net)
    fastdiff.load(parts[0]).optimize(dtype="bf16", fuse_qkv=True).set_controlnet(net)
    assert next(net.parameters()).dtype == torch.float32 and not any("qkv" in k for k in net.state_dict())
    a.generate(control_image=_image(), **kw)  # (the first pipeline's copy is its own)


def test_a_controlnet_fastdiff_cannot_run_leaves_the_base_model_loading(parts, tmp_path):
    """A pipeline folder whose controlnet/ holds another class (SD3's, FLUX.1's, the union model) loads its base
    model with a note."""
    import json
    import shutil

    folder = str(tmp_path / "pipe")
    shutil.copytree(parts[0], folder)
    shutil.copytree(parts[1], os.path.join(folder, "controlnet"))
    config = os.path.join(folder, "controlnet", "config.json")
    with open(config) as f:
        data = json.load(f)
    with open(config, "w") as f:
        json.dump({**data, "_class_name": "ControlNetUnionModel"}, f)
    pipe = fastdiff.load(folder)
    assert pipe.controlnet is None and any("ControlNetUnionModel" in n and "not attached" in n for n in pipe.notes)


def test_control_image_errors_name_the_control_image(parts):
    pipe = fastdiff.load(parts[0]).set_controlnet(parts[1])
    cond, _ = _states(b=1)
    with pytest.raises(BadArgumentError, match="^control_image: expected a float tensor"):
        pipe.generate(encoder_hidden_states=cond, control_image=torch.zeros(1, 3, 64, 64, dtype=torch.uint8),
                      steps=2, progress=False)


def test_bench_runs_a_controlnet_pipeline_folder_and_checks_its_controlnet_first(parts, tmp_path):
    import json

    from test_cli import fastdiff as run_cli

    folder = _save(_reference(parts, diffusers.DDIMScheduler(**DDIM)), str(tmp_path / "pipe"))
    r = run_cli("bench", folder, "--steps", "2", "--repeat", "1", "--warmup", "1", "--compare", "diffusers",
                "--json", "out.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "out.json").read_text())
    assert [row["status"] for row in report["results"] + report["compare"]] == ["ok", "ok"]
    r = run_cli("bench", parts[0], "--controlnet", str(tmp_path / "missing"), cwd=tmp_path)
    assert r.returncode == 2 and "expected a diffusers ControlNetModel, SD3ControlNetModel" in r.stderr, r.stderr
