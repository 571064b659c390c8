"""FLUX.1 ControlNets (diffusers' FluxControlNetModel: InstantX / Shakker-Labs style, Union ones too): the native
network against diffusers' with the transformer it drives, and ``set_controlnet`` + ``generate(control_image=...)``
against FluxControlNetPipeline (one ControlNet, a Union one, several) on the same weights, embeddings, images and
generators; the same through captured loops, the Engine, a save and a diffusers folder; and what is refused."""

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff.errors import BadArgumentError, UnsupportedConfigError
from helpers import attach_controlnets, diffusers_pipeline, perturb_, rel_err
from test_flux import DEV, _diffusers_call, _image_ids, _pack
from test_img2img import SEEDS, _generators

diffusers = pytest.importorskip("diffusers", reason="diffusers' FLUX.1 ControlNet and pipeline are the reference")


def _controlnet(seed=5, **config):
    """A tiny FluxControlNetModel for test_flux's DEV transformer (fewer blocks: each output serves several), its
    zero-initialised layers perturbed so that it changes the result."""
    torch.manual_seed(seed)
    return perturb_(diffusers.FluxControlNetModel(**{**DEV, "num_layers": 1, "num_single_layers": 3, **config}).eval(),
                    seed)


def _pictures(n=2, seed=3):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(n)]


def _text():
    g = torch.Generator().manual_seed(2)
    return torch.randn(2, 5, 12, generator=g), torch.randn(2, 10, generator=g)


def _pair(tmp_path, nets):
    """(fastdiff's FLUX.1 dev pipeline driven by ``nets`` (saved as diffusers folders), diffusers'
    FluxControlNetPipeline on the same parts)."""
    from test_inpaint_blending import _flux_pair

    pipe, ref = _flux_pair(tmp_path / "pipe", "FluxPipeline")
    controlnet = attach_controlnets(pipe, nets, tmp_path, diffusers.FluxMultiControlNetModel)
    ref = diffusers_pipeline("FluxControlNetPipeline")(controlnet=controlnet, **ref.components)
    ref.set_progress_bar_config(disable=True)
    return pipe, ref


@pytest.mark.parametrize("layers, single, num_mode", [(1, 3, None), (2, 2, None), (1, 0, 4)])
def test_the_controlled_transformer_equals_diffusers(layers, single, num_mode):
    """FluxControlNetModel's outputs, each serving ceil(blocks / outputs) transformer blocks (none for the single
    blocks when it has no single blocks), a Union ControlNet's control type as one more text token."""
    from fastdiff.models.flux import Flux, FluxConfig
    from fastdiff.models.flux_controlnet import ControlledFlux, FluxControlNet
    from test_flux import _reference

    ref = _reference(DEV)
    cn = _controlnet(num_layers=layers, num_single_layers=single, num_mode=num_mode)
    flux = Flux(FluxConfig.from_diffusers(dict(ref.config)))
    flux.load_state_dict(ref.state_dict())
    net = FluxControlNet(FluxConfig.from_diffusers({**DEV, "num_layers": layers, "num_single_layers": single}),
                         num_mode=num_mode)
    net.load_state_dict(cn.state_dict())  # diffusers' names
    g = torch.Generator().manual_seed(1)
    x, control = torch.randn(2, 4, 8, 6, generator=g), torch.randn(2, 4, 8, 6, generator=g)
    ctx, pooled = torch.randn(2, 5, 12, generator=g), torch.randn(2, 10, generator=g)
    t, guidance, mode = torch.tensor([375.0, 842.0]), torch.tensor([3.5, 5.0]), torch.tensor([2, 1])
    with torch.no_grad():
        double, single_out = cn(hidden_states=_pack(x), controlnet_cond=_pack(control), conditioning_scale=0.7,
                                controlnet_mode=mode[:, None] if num_mode else None, encoder_hidden_states=ctx,
                                pooled_projections=pooled, timestep=t / 1000, img_ids=_image_ids(8, 6),
                                txt_ids=torch.zeros(5, 3), guidance=guidance, return_dict=False)
        want = ref(hidden_states=_pack(x), encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t / 1000,
                   img_ids=_image_ids(8, 6), txt_ids=torch.zeros(5, 3), guidance=guidance,
                   controlnet_block_samples=double, controlnet_single_block_samples=single_out).sample
        kw = dict(encoder_hidden_states=ctx, text_embeds=pooled, guidance=guidance, control_image=control,
                  control_scale=torch.tensor([0.7, 0.7]), control_mode=mode if num_mode else None)
        got = ControlledFlux(flux, net)(x, t, **kw)
        assert rel_err(_pack(got), want) <= 1e-5
        plain = _diffusers_call(ref, x, t, ctx, pooled, guidance)
        assert rel_err(got, plain) > 1e-3  # the ControlNet reaches the output
        assert rel_err(ControlledFlux(flux, net)(x, t, **{**kw, "control_scale": torch.tensor([0.0, 0.0])}),
                       plain) <= 1e-6  # scale 0: the transformer alone
        if num_mode:
            assert rel_err(ControlledFlux(flux, net)(x, t, **{**kw, "control_mode": mode.flip(0)}), got) > 1e-4


def test_generate_equals_flux_controlnet_pipeline(tmp_path):
    """One ControlNet: its images' posteriors drawn before the start noise; scale and step window; guidance 7 by
    default, as FluxControlNetPipeline's; one image for every sample."""
    pipe, ref = _pair(tmp_path, [_controlnet()])
    ctx, pooled = _text()
    images = _pictures()
    for options in (dict(), dict(controlnet_conditioning_scale=0.6, control_guidance_start=0.2,
                                 control_guidance_end=0.7, guidance=4.0)):
        ref_options = {("guidance_scale" if k == "guidance" else k): v for k, v in options.items()}
        want = ref(control_image=images, num_inference_steps=5, height=16, width=16, prompt_embeds=ctx,
                   pooled_prompt_embeds=pooled, generator=_generators(), output_type="latent", **ref_options).images
        got = pipe.generate(control_image=images, steps=5, seeds=SEEDS, encoder_hidden_states=ctx, text_embeds=pooled,
                            progress=False, **options)
        assert rel_err(_pack(got), want) <= 2e-5
    kw = dict(steps=3, seeds=SEEDS, encoder_hidden_states=ctx, text_embeds=pooled, progress=False)
    one = pipe.generate(control_image=images[0], **kw)
    assert rel_err(one[0], pipe.generate(control_image=images, **kw)[0]) <= 1e-6
    assert rel_err(one, pipe.generate(control_image=images[::-1], **kw)) > 1e-3


def test_true_cfg_gives_both_passes_the_conditional_controlnet_outputs(tmp_path):
    """FluxControlNetPipeline(true_cfg_scale=...): the ControlNet runs on the conditional text alone and both
    transformer passes add its outputs; one ControlNet and several."""
    import inspect

    if "has_neg_prompt" not in inspect.getsource(diffusers.FluxControlNetPipeline.__call__):
        pytest.skip(f"diffusers {diffusers.__version__}'s FluxControlNetPipeline runs true CFG for a negative prompt "
                    f"in text only, not for negative embeddings: no reference")
    ctx, pooled = _text()
    neg_ctx, neg_pooled = ctx.flip(0) * 0.5, pooled.flip(0) * 0.5
    for nets, images in (([_controlnet()], _pictures()), ([_controlnet(5), _controlnet(6)],
                                                          [_pictures(), _pictures(seed=4)])):
        pipe, ref = _pair(tmp_path / str(len(nets)), nets)
        scale = {} if len(nets) == 1 else dict(controlnet_conditioning_scale=[1.0, 0.6])
        want = ref(control_image=images, true_cfg_scale=3.0, num_inference_steps=4, height=16, width=16,
                   prompt_embeds=ctx, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg_ctx,
                   negative_pooled_prompt_embeds=neg_pooled, generator=_generators(), output_type="latent",
                   **scale).images
        got = pipe.generate(control_image=images, cfg_scale=3.0, steps=4, seeds=SEEDS, encoder_hidden_states=ctx,
                            text_embeds=pooled, negative_encoder_hidden_states=neg_ctx,
                            negative_text_embeds=neg_pooled, progress=False, **scale)
        assert rel_err(_pack(got), want) <= 2e-5


def test_a_union_controlnet_takes_its_control_mode_as_diffusers(tmp_path):
    pipe, ref = _pair(tmp_path, [_controlnet(num_mode=5)])
    ctx, pooled = _text()
    images = _pictures()
    want = ref(control_image=images, control_mode=3, num_inference_steps=4, height=16, width=16, prompt_embeds=ctx,
               pooled_prompt_embeds=pooled, generator=_generators(), output_type="latent").images
    kw = dict(control_image=images, steps=4, seeds=SEEDS, encoder_hidden_states=ctx, text_embeds=pooled,
              progress=False)
    got = pipe.generate(control_mode=3, **kw)
    assert rel_err(_pack(got), want) <= 2e-5
    assert rel_err(got, pipe.generate(control_mode=1, **kw)) > 1e-4
    for mode, match in ((None, "found None"), (5, "found 5"), (True, "found True")):
        with pytest.raises(BadArgumentError, match=r"control_mode: this Union ControlNet takes a control type, an "
                                                   r"int in \[0, 5\), " + match):
            pipe.generate(control_mode=mode, **kw)


def test_several_controlnets_equal_flux_multi_controlnet(tmp_path):
    """FluxMultiControlNetModel: each ControlNet's image encoded in turn (its posteriors, then the next's), its own
    scale and window; a Union one beside a plain one takes its mode, the other None."""
    nets = [_controlnet(5, num_mode=4), _controlnet(6)]
    pipe, ref = _pair(tmp_path, nets)
    ctx, pooled = _text()
    first, second = _pictures(), _pictures(seed=4)
    options = dict(controlnet_conditioning_scale=[0.8, 0.5], control_guidance_start=[0.0, 0.3],
                   control_guidance_end=[0.8, 1.0])
    want = ref(control_image=[first, second], control_mode=[2, None], num_inference_steps=5, height=16, width=16,
               prompt_embeds=ctx, pooled_prompt_embeds=pooled, generator=_generators(), output_type="latent",
               **options).images
    kw = dict(steps=5, seeds=SEEDS, encoder_hidden_states=ctx, text_embeds=pooled, progress=False, **options)
    got = pipe.generate(control_image=[first, second], control_mode=[2, None], **kw)
    assert rel_err(_pack(got), want) <= 2e-5
    assert rel_err(got, pipe.generate(control_image=[second, first], control_mode=[2, None], **kw)) > 1e-3
    with pytest.raises(BadArgumentError, match="control_mode: given \\(1\\) for a FLUX.1 ControlNet that is not a "
                                               "Union"):
        pipe.generate(control_image=[first, second], control_mode=[2, 1], **kw)
    # one type for every Union ControlNet, as diffusers broadcasts it (a plain one ignores it)
    assert rel_err(pipe.generate(control_image=[first, second], control_mode=2, **kw), got) <= 1e-6


def _edit_pair(tmp_path, task: str, nets):
    """(fastdiff's pipeline driven by ``nets``, diffusers' FluxControlNetImg2ImgPipeline or
    FluxControlNetInpaintPipeline on the same parts)."""
    pipe, ref = _pair(tmp_path, nets)
    edit = diffusers_pipeline("FluxControlNetImg2ImgPipeline" if task == "img2img" else
                              "FluxControlNetInpaintPipeline")(**{k: v for k, v in ref.components.items()
                                                                  if k not in ("image_encoder", "feature_extractor")})
    edit.set_progress_bar_config(disable=True)
    return pipe, edit


@pytest.mark.parametrize("task", ["img2img", "inpaint"])
@pytest.mark.parametrize("options", [{}, dict(strength=0.8, controlnet_conditioning_scale=0.7, guidance=4.0,
                                              control_guidance_end=0.6)])
def test_edits_and_inpainting_equal_the_flux_controlnet_pipelines(tmp_path, task, options):
    """FluxControlNetImg2ImgPipeline / FluxControlNetInpaintPipeline: the control images' posteriors, then the
    image's and the start noise (and the masked image's, drawn though unread), the known region pasted back after
    every step; their defaults: strength 0.6, scale 1.0, guidance 7."""
    from test_img2img import _images
    from test_inpaint import _masks

    pipe, ref = _edit_pair(tmp_path, task, [_controlnet()])
    ctx, pooled = _text()
    control, images = _pictures(), _images()
    edit = dict(image=images.clone()) if task == "img2img" else dict(image=images.clone(), mask_image=_masks())
    ref_options = {("guidance_scale" if k == "guidance" else k): v for k, v in options.items()}
    want = ref(control_image=control, num_inference_steps=5, height=16, width=16, prompt_embeds=ctx,
               pooled_prompt_embeds=pooled, generator=_generators(), output_type="latent", **edit,
               **ref_options).images
    kw = dict(steps=5, seeds=SEEDS, encoder_hidden_states=ctx, text_embeds=pooled, progress=False, **options)
    got = pipe.generate(control_image=control, **edit, **kw)
    assert rel_err(_pack(got), want) <= 2e-5
    assert rel_err(got, pipe.generate(control_image=control[::-1], **edit, **kw)) > 1e-3
    assert rel_err(got, pipe.generate(control_image=control, **{**edit, "image": 1 - images}, **kw)) > 1e-3


def test_captured_loops_and_the_engine_equal_eager(tmp_path):
    """The control latents, scales, windows and modes are tensor inputs: a captured loop replays them, and Engine
    requests (batched together) equal their solo runs."""
    from test_graph_scopes import FakeGraph

    pipe, _ = _pair(tmp_path, [_controlnet(num_mode=4)])
    ctx, pooled = _text()
    images = _pictures()
    kw = dict(steps=3, seeds=SEEDS, encoder_hidden_states=ctx, text_embeds=pooled, progress=False, control_mode=1,
              controlnet_conditioning_scale=0.8)
    want = pipe.generate(control_image=images, **kw)
    graphed = pipe.optimize(cuda_graphs=True, graph_scope="loop", batch_buckets=(2,), graph_factory=FakeGraph)
    assert rel_err(graphed.generate(control_image=images, **kw), want) <= 1e-5
    assert rel_err(graphed.generate(control_image=images, **{**kw, "control_mode": 3}), want) > 1e-4
    with fastdiff.Engine(pipe, max_batch=4, max_wait_ms=50) as engine:
        futures = [engine.submit(seed=s, control_image=images[i], steps=3, encoder_hidden_states=ctx[0],
                                 text_embeds=pooled[0], control_mode=1, controlnet_conditioning_scale=0.8)
                   for i, s in enumerate(SEEDS)]
        results = [f.result(timeout=120) for f in futures]
    for i, got in enumerate(results):
        solo = pipe.generate(control_image=images[i], **{**kw, "seeds": [SEEDS[i]], "encoder_hidden_states": ctx[:1],
                                                         "text_embeds": pooled[:1]})[0]
        assert rel_err(got, solo) <= 1e-5


def test_a_save_and_a_diffusers_folder_attach_their_controlnets(tmp_path):
    """``pipe.save`` writes the FLUX.1 ControlNet as a FluxControlNetModel folder beside the model, and
    ``fastdiff.load`` of that save (or of a diffusers FluxControlNetPipeline folder with controlnet/) attaches it."""
    pipe, ref = _pair(tmp_path, [_controlnet(num_mode=4)])
    ctx, pooled = _text()
    kw = dict(control_image=_pictures(), control_mode=2, steps=3, seeds=SEEDS, encoder_hidden_states=ctx,
              text_embeds=pooled, progress=False)
    want = pipe.generate(**kw)
    pipe.save(str(tmp_path / "saved"))
    assert rel_err(fastdiff.load(str(tmp_path / "saved")).generate(**kw), want) <= 1e-6
    ref.save_pretrained(str(tmp_path / "theirs"))
    assert rel_err(fastdiff.load(str(tmp_path / "theirs")).generate(**kw), want) <= 1e-6


def test_what_is_not_implemented_is_refused_by_name(tmp_path):
    pipe, _ = _pair(tmp_path, [_controlnet()])
    ctx, pooled = _text()
    kw = dict(control_image=_pictures(), steps=2, seeds=SEEDS, encoder_hidden_states=ctx, text_embeds=pooled,
              progress=False)
    for bad, error, match in (
            (dict(guess_mode=True), BadArgumentError, "guess_mode: the SD3 and FLUX.1 ControlNet pipelines have none"),
            (dict(control_mode=1), BadArgumentError, "not a Union one"),
            (dict(control_image=None), BadArgumentError, "control_image: this pipeline is driven by a ControlNet")):
        with pytest.raises(error, match=match):
            pipe.generate(**{**kw, **bad})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_scales_equal_diffusers(dtype):
    """A conditioning scale below 1 weights the outputs in float32, rounded once, as diffusers' ``sample * scale``
    (a Python float) does in half precision."""
    from fastdiff.models.flux import FluxConfig
    from fastdiff.models.flux_controlnet import FluxControlNet

    cn = _controlnet().to(dtype)
    net = FluxControlNet(FluxConfig.from_diffusers({**DEV, "num_layers": 1, "num_single_layers": 3})).to(dtype)
    net.load_state_dict(cn.state_dict())
    g = torch.Generator().manual_seed(1)
    x, control = torch.randn(2, 4, 8, 8, generator=g).to(dtype), torch.randn(2, 4, 8, 8, generator=g).to(dtype)
    ctx, pooled = torch.randn(2, 5, 12, generator=g).to(dtype), torch.randn(2, 10, generator=g).to(dtype)
    t, guidance = torch.tensor([375.0, 842.0]), torch.tensor([3.5, 3.5])
    with torch.no_grad():
        want, _ = cn(hidden_states=_pack(x), controlnet_cond=_pack(control), conditioning_scale=0.7,
                     encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t.to(dtype) / 1000,
                     img_ids=_image_ids(8, 8), txt_ids=torch.zeros(5, 3), guidance=guidance.to(dtype),
                     return_dict=False)
        got, _ = net(x, t, control, torch.tensor([0.7, 0.7]), encoder_hidden_states=ctx, text_embeds=pooled,
                     guidance=guidance)
        full, _ = net(x, t, control, torch.tensor([1.0, 1.0]), encoder_hidden_states=ctx, text_embeds=pooled,
                      guidance=guidance)
    # diffusers' formula exactly (the scale 1 outputs times 0.7 in float32, rounded once), and diffusers' result up
    # to the stacks' own half-precision rounding (torch / diffusers versions differ in a few ulps)
    assert all(torch.equal(a, (f.float() * 0.7).to(dtype)) for a, f in zip(got, full))
    assert max(rel_err(a.float(), b.float()) for a, b in zip(got, want)) <= 4e-3


def test_controlnets_for_another_model_are_refused_by_name(tmp_path):
    """A FLUX.1 ControlNet of other widths, XLabs ones whose hint does not pack into the latents' width, a UNet's
    ControlNet on FLUX.1 and FLUX.1's on a UNet, and a FLUX.1 ControlNet on a Fill or Depth transformer (which no
    diffusers pipeline drives so)."""
    from fastdiff.checkpoints.controlnet import load_controlnet
    from test_inpaint_blending import _flux_pair

    pipe, _ = _flux_pair(tmp_path / "pipe", "FluxPipeline")
    _controlnet(joint_attention_dim=8).save_pretrained(tmp_path / "narrow")
    with pytest.raises(BadArgumentError, match="made for another transformer; joint_attention_dim: 8"):
        pipe.set_controlnet(str(tmp_path / "narrow"))
    from test_inpaint_blending import _control_pair

    _controlnet().save_pretrained(tmp_path / "plain")
    with pytest.raises(BadArgumentError, match="reads 4 conditioning channels beside the latents"):
        _control_pair(tmp_path / "depth")[0].set_controlnet(str(tmp_path / "plain"))
    _controlnet(conditioning_embedding_channels=4).save_pretrained(tmp_path / "xlabs1")  # (diffusers packs by 1)
    with pytest.raises(UnsupportedConfigError, match="patch_size' = 1 is not supported; supported: \\[2\\]"):
        load_controlnet(str(tmp_path / "xlabs1"))
    _controlnet(conditioning_embedding_channels=16, patch_size=2).save_pretrained(tmp_path / "xlabs16")
    with pytest.raises(UnsupportedConfigError, match="conditioning_embedding_channels' = 16"):
        load_controlnet(str(tmp_path / "xlabs16"))
    from test_controlnet import _controlnet as unet_controlnet

    unet_controlnet(5, cross_attention_dim=12).save_pretrained(tmp_path / "unet_cn")
    with pytest.raises(BadArgumentError, match="a ControlNet cannot drive a Flux"):
        pipe.set_controlnet(str(tmp_path / "unet_cn"))
    from test_img2img import SD_SCHEDULER, sd_pair, sd_unet_vae_embeds

    unet_pipe, _ = sd_pair(sd_unet_vae_embeds(), tmp_path / "sd", diffusers.DDIMScheduler.from_config(SD_SCHEDULER))
    _controlnet().save_pretrained(tmp_path / "flux_cn")
    with pytest.raises(BadArgumentError, match="a FluxControlNet cannot drive a UNet"):
        unet_pipe.set_controlnet(str(tmp_path / "flux_cn"))


def test_cli_control_mode_needs_a_control_image(tmp_path):
    """``--control-mode`` (a FLUX.1 Union ControlNet's type) without ``--control-image`` is one line and exit 2."""
    from test_cli import fastdiff as run_cli

    for mode in ("2", "none"):  # ('none': a plain ControlNet beside a Union one)
        r = run_cli("generate", "digits", "--control-mode", mode, "--steps", "2", cwd=tmp_path)
        assert r.returncode == 2 and "--control-mode: given without --control-image" in r.stderr
        assert "Traceback" not in r.stderr
    r = run_cli("generate", "digits", "--control-mode", "canny", cwd=tmp_path)
    assert r.returncode == 2 and "expected an int or 'none', found 'canny'" in r.stderr


# --- XLabs' ControlNets: a pixel-space hint encoder, outputs repeated over the double blocks --------------------
XLABS = dict(num_layers=2, num_single_layers=0, conditioning_embedding_channels=4, patch_size=2)


def _xlabs(seed=5, **config):
    return _controlnet(seed, **{**XLABS, **config})


def _xlabs_pair(tmp_path, nets):
    """(fastdiff's FLUX.1 dev pipeline with 3 double blocks (2 XLabs outputs repeat 0, 1, 0; spread they would be
    0, 0, 1) and a VAE of 8 pixels per latent pixel, as the hint encoder's; diffusers' FluxControlNetPipeline on the
    same parts)."""
    from test_flux import DEV_SCHEDULER, _reference as flux_reference
    from test_img2img import _folder
    from test_vae import SD_VAE, _reference as vae_reference

    transformer = flux_reference(dict(DEV, num_layers=3))
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**DEV_SCHEDULER)
    vae = vae_reference(dict(SD_VAE, block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                             up_block_types=("UpDecoderBlock2D",) * 4), seed=2)
    pipe = fastdiff.load(_folder(tmp_path / "pipe", "transformer", transformer, scheduler, vae, "FluxPipeline"))
    controlnet = attach_controlnets(pipe, nets, tmp_path, diffusers.FluxMultiControlNetModel)
    ref = diffusers_pipeline("FluxControlNetPipeline")(transformer=transformer, scheduler=scheduler, vae=vae,
                                                       controlnet=controlnet, text_encoder=None, tokenizer=None,
                                                       text_encoder_2=None, tokenizer_2=None)
    ref.set_progress_bar_config(disable=True)
    return pipe, ref


def test_an_xlabs_controlled_transformer_equals_diffusers():
    """The hint encoder reads the image itself ((B, 3, 8H, 8W) in [-1, 1]), packed 2x2 like the latents; double block
    i of the transformer reads output i % outputs (controlnet_blocks_repeat)."""
    from fastdiff.models.flux import Flux, FluxConfig
    from fastdiff.models.flux_controlnet import ControlledFlux, FluxControlNet
    from test_flux import _reference

    ref = _reference(dict(DEV, num_layers=3))
    cn = _xlabs()
    flux = Flux(FluxConfig.from_diffusers(dict(ref.config)))
    flux.load_state_dict(ref.state_dict())
    net = FluxControlNet(FluxConfig.from_diffusers({**DEV, "num_layers": 2, "num_single_layers": 0}),
                         conditioning_embedding_channels=4)
    net.load_state_dict(cn.state_dict())  # diffusers' names
    g = torch.Generator().manual_seed(1)
    x, image = torch.randn(2, 4, 8, 6, generator=g), torch.rand(2, 3, 64, 48, generator=g) * 2 - 1
    ctx, pooled = torch.randn(2, 5, 12, generator=g), torch.randn(2, 10, generator=g)
    t, guidance = torch.tensor([375.0, 842.0]), torch.tensor([3.5, 5.0])
    with torch.no_grad():
        double, _ = cn(hidden_states=_pack(x), controlnet_cond=image, conditioning_scale=0.7, encoder_hidden_states=ctx,
                       pooled_projections=pooled, timestep=t / 1000, img_ids=_image_ids(8, 6),
                       txt_ids=torch.zeros(5, 3), guidance=guidance, return_dict=False)
        kw = dict(hidden_states=_pack(x), encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t / 1000,
                  img_ids=_image_ids(8, 6), txt_ids=torch.zeros(5, 3), guidance=guidance,
                  controlnet_block_samples=double)
        want = ref(**kw, controlnet_blocks_repeat=True).sample
        got = ControlledFlux(flux, net)(x, t, encoder_hidden_states=ctx, text_embeds=pooled, guidance=guidance,
                                        control_image=image, control_scale=torch.tensor([0.7, 0.7]))
        assert rel_err(_pack(got), want) <= 1e-5
        assert rel_err(_pack(got), ref(**kw).sample) > 1e-4  # spread instead of repeated: another result
        with pytest.raises(BadArgumentError, match=r"expected the control image \(2, 3, 64, 48\)"):
            ControlledFlux(flux, net)(x, t, encoder_hidden_states=ctx, text_embeds=pooled, guidance=guidance,
                                      control_image=image[..., :32], control_scale=torch.tensor([0.7, 0.7]))


def test_xlabs_controlnets_equal_flux_controlnet_pipeline(tmp_path):
    """FluxControlNetPipeline with XLabs' ControlNets: the image reaches the hint encoder in [-1, 1] (no VAE, no
    posterior drawn), with scale and window; one, and two summed; saved and loaded back (patch_size 2 written)."""
    ctx, pooled = _text()
    images = [_pictures(seed=s)[0].resize((32, 32)) for s in (3, 4)]
    kw = dict(steps=4, seeds=SEEDS, encoder_hidden_states=ctx, text_embeds=pooled, progress=False)
    for nets, control, options in (([_xlabs()], images, dict(controlnet_conditioning_scale=0.6,
                                                              control_guidance_end=0.7)),
                                   ([_xlabs(5), _xlabs(6)], [images, images[::-1]],
                                    dict(controlnet_conditioning_scale=[1.0, 0.5]))):
        pipe, ref = _xlabs_pair(tmp_path / str(len(nets)), nets)
        want = ref(control_image=control, num_inference_steps=4, height=32, width=32, prompt_embeds=ctx,
                   pooled_prompt_embeds=pooled, generator=_generators(), output_type="latent", **options).images
        got = pipe.generate(control_image=control, **options, **kw)
        assert rel_err(_pack(got), want) <= 2e-5
    pipe.save(str(tmp_path / "saved"))
    again = fastdiff.load(str(tmp_path / "saved"))
    assert rel_err(again.generate(control_image=control, **options, **kw), got) <= 1e-6
    from test_inpaint_blending import _flux_pair

    two, _ = _flux_pair(tmp_path / "vae2", "FluxPipeline")  # (its VAE: 2 pixels per latent pixel)
    with pytest.raises(BadArgumentError, match="reads 8 pixels per latent pixel, and this pipeline's VAE 2"):
        two.set_controlnet(str(tmp_path / "1" / "cn0"))
    with pytest.raises(BadArgumentError, match="all of XLabs' kind .* or none"):
        _controlnet(7, num_layers=2, num_single_layers=0).save_pretrained(tmp_path / "instantx")
        pipe.set_controlnet([str(tmp_path / "1" / "cn0"), str(tmp_path / "instantx")])


def test_an_xlabs_controlnet_through_loops_and_the_engine(tmp_path):
    from test_graph_scopes import FakeGraph

    pipe, _ = _xlabs_pair(tmp_path, [_xlabs()])
    ctx, pooled = _text()
    images = [_pictures(seed=s)[0].resize((32, 32)) for s in (3, 4)]
    kw = dict(steps=3, seeds=SEEDS, encoder_hidden_states=ctx, text_embeds=pooled, progress=False)
    want = pipe.generate(control_image=images, **kw)
    pipe.save(str(tmp_path / "saved"))
    graphed = fastdiff.load(str(tmp_path / "saved")).optimize(cuda_graphs=True, graph_scope="loop",
                                                              batch_buckets=(2,), graph_factory=FakeGraph)
    assert rel_err(graphed.generate(control_image=images, **kw), want) <= 1e-5
    with fastdiff.Engine(pipe, max_batch=4, max_wait_ms=50) as engine:
        futures = [engine.submit(seed=s, control_image=images[i], steps=3, encoder_hidden_states=ctx[i],
                                 text_embeds=pooled[i]) for i, s in enumerate(SEEDS)]
        results = [f.result(timeout=120) for f in futures]
    for i, got in enumerate(results):
        assert rel_err(got, want[i]) <= 1e-5


def test_one_union_controlnet_given_several_modes_runs_once_loaded(tmp_path):
    """A Union ControlNet named twice is loaded once (one module in both places) and runs once per image and mode,
    as diffusers' FluxMultiControlNetModel of that one ControlNet does. (With default windows diffusers applies only
    the first image there: its windows count ControlNets, not images; with a window per image given, as here, the
    two agree.)"""
    union = _controlnet(num_mode=5)
    pipe, one = _pair(tmp_path, [union])
    folder = str(tmp_path / "cn0")
    pipe.set_controlnet([folder, folder])
    assert pipe.controlnet.nets[0] is pipe.controlnet.nets[1]
    ref = diffusers_pipeline("FluxControlNetPipeline")(controlnet=diffusers.FluxMultiControlNetModel([union]),
                                                       **{k: v for k, v in one.components.items() if k != "controlnet"})
    ref.set_progress_bar_config(disable=True)
    ctx, pooled = _text()
    images = [_pictures(), _pictures(seed=4)]
    options = dict(controlnet_conditioning_scale=[0.8, 0.5], control_guidance_start=[0.0, 0.25],
                   control_guidance_end=[1.0, 1.0])
    want = ref(control_image=images, control_mode=[3, 1], num_inference_steps=4, height=16, width=16,
               prompt_embeds=ctx, pooled_prompt_embeds=pooled, generator=_generators(), output_type="latent",
               **options).images
    kw = dict(steps=4, seeds=SEEDS, encoder_hidden_states=ctx, text_embeds=pooled, progress=False, **options)
    got = pipe.generate(control_image=images, control_mode=[3, 1], **kw)
    assert rel_err(_pack(got), want) <= 2e-5
    # each run reads its own mode (a tiny test net's mode embedding moves the result by about 1.5e-4)
    assert rel_err(got, pipe.generate(control_image=images, control_mode=[1, 3], **kw)) > 5e-5
    # a save writes it once and loads it back as one module
    pipe.save(str(tmp_path / "saved"))
    assert not (tmp_path / "saved" / "controlnet_1").exists()
    back = fastdiff.load(str(tmp_path / "saved"))
    assert back.controlnet.nets[0] is back.controlnet.nets[1]
    assert rel_err(back.generate(control_image=images, control_mode=[3, 1], **kw), got) <= 1e-6



@pytest.mark.parametrize("cfg_folded", [False, True])
def test_exported_flux_controlnets_run_like_eager(tmp_path, cfg_folded):
    """export_onnx of a FLUX.1 pipeline with its ControlNet(s): one graph taking the control latents (XLabs': the
    image), scales, Union types and the text the ControlNet reads (the conditional text under true CFG); through the
    onnxruntime backend and loaded back from the file it equals eager: a Union ControlNet with true CFG, two, and
    XLabs'."""
    pytest.importorskip("onnxruntime", reason="the exported graph runs in ONNX Runtime")
    from fastdiff.export.onnx import export_onnx, read_onnx_io

    ctx, pooled = _text()
    text = dict(encoder_hidden_states=ctx, text_embeds=pooled)
    true_cfg = dict(cfg_scale=3.0, negative_encoder_hidden_states=ctx.flip(0) * 0.5,
                    negative_text_embeds=pooled.flip(0) * 0.5)
    xlabs_images = [_pictures(seed=s)[0].resize((32, 32)) for s in (3, 4)]
    cases = ((lambda d: _pair(d, [_controlnet(num_mode=5)]),
              dict(control_image=_pictures(), control_mode=3, **true_cfg)),
             (lambda d: _pair(d, [_controlnet(5), _controlnet(6, num_mode=4)]),
              dict(control_image=[_pictures(), _pictures(seed=4)], control_mode=[None, 2],
                   controlnet_conditioning_scale=[1.0, 0.6])),
             (lambda d: _xlabs_pair(d, [_xlabs()]), dict(control_image=xlabs_images, control_guidance_end=0.7)))
    for i, (make, inputs) in enumerate(cases):
        pipe, _ = make(tmp_path / str(i))
        kw = dict(steps=3, seeds=SEEDS, progress=False, **text, **inputs)
        want = pipe.generate(**kw)
        path = str(tmp_path / f"controlled{i}.onnx")
        dynamic_hw = i != 2  # (XLabs' image at 8x the latents: one size here)
        result = export_onnx(pipe, None, path, cfg_folded=cfg_folded, dynamic_hw=dynamic_hw, progress=False,
                             **({} if dynamic_hw else dict(height=4, width=4)))
        assert result.max_rel_err is not None and result.max_rel_err <= 1e-5, result.check_note
        control = read_onnx_io(path)["control"]
        assert control["latent"] == "flux" and control["reads_pixels"] == (i == 2)
        assert control["num_mode"] == ([5], [None, 4], None)[i]
        vae = tmp_path / str(i) / "pipe" / "vae"
        exported = fastdiff.load(path, vae=str(vae))
        assert rel_err(exported.generate(**kw), want) <= 1e-5
        optimized = pipe.optimize(backend="onnxruntime")
        assert rel_err(optimized.generate(**kw), want) <= 1e-5
