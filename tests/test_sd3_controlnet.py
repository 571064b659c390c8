"""SD3 ControlNets (diffusers' SD3ControlNetModel, InstantX's layout): the native network against diffusers' with
the transformer it drives, and ``set_controlnet`` + ``generate(control_image=...)`` against
StableDiffusion3ControlNetPipeline (one ControlNet, several; with and without CFG) on the same weights, embeddings,
images and generators. diffusers encodes the control image with a draw from torch's global RNG, which no seed
reproduces: fastdiff reads the posterior's mean, and the reference here is made to read it too."""

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff.errors import BadArgumentError, UnsupportedConfigError
from helpers import attach_controlnets, diffusers_pipeline, perturb_, rel_err
from test_img2img import SEEDS, _folder, _generators, _text_kwargs
from test_sd3 import CONFIGS, _embeds, _reference

diffusers = pytest.importorskip("diffusers", reason="diffusers' SD3 ControlNet and pipeline are the reference")

TRANSFORMER = dict(CONFIGS["sd3.5-large"], in_channels=16, out_channels=16, num_layers=4)


def _controlnet(seed=5, **config):
    """A tiny SD3ControlNetModel for TRANSFORMER (2 blocks: each output serves two), its zero layers perturbed."""
    torch.manual_seed(seed)
    return perturb_(diffusers.SD3ControlNetModel(**{**TRANSFORMER, "num_layers": 2, **config}).eval(), seed)


@pytest.fixture
def posterior_means(monkeypatch):
    """diffusers' VAE posteriors read as their means (what fastdiff encodes an SD3 control image to)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)


def _pictures(n=2, seed=3):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(n)]


def _pair(tmp_path, nets, reference="StableDiffusion3ControlNetPipeline"):
    """(fastdiff's SD3 pipeline (16-channel latents, the SD3 VAE layout) driven by ``nets``, diffusers'
    ``reference`` pipeline (StableDiffusion3ControlNetPipeline) on the same parts)."""
    from test_vae import CONFIGS as VAE_CONFIGS, _reference as vae_reference

    transformer = _reference(TRANSFORMER)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    vae = vae_reference(VAE_CONFIGS["sd3-flux"], seed=2)
    pipe = fastdiff.load(_folder(tmp_path / "pipe", "transformer", transformer, scheduler, vae,
                                 "StableDiffusion3Pipeline"))
    controlnet = attach_controlnets(pipe, nets, tmp_path, diffusers.SD3MultiControlNetModel)
    ref = diffusers_pipeline(reference)(
        transformer=transformer, scheduler=scheduler, vae=vae, controlnet=controlnet, text_encoder=None,
        tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    ref.set_progress_bar_config(disable=True)
    return pipe, ref


@pytest.mark.parametrize("layers, force_zeros", [(2, True), (3, False), (4, True)])
def test_the_controlled_transformer_equals_diffusers(layers, force_zeros):
    """SD3ControlNetModel's outputs, block i of the transformer reading output int(i / (blocks / outputs)) (none
    after the last block), its pooled input zeros for InstantX's (force_zeros_for_pooled_projection)."""
    from fastdiff.models.mmdit import MMDiT, MMDiTConfig
    from fastdiff.models.sd3_controlnet import ControlledMMDiT, SD3ControlNet

    ref = _reference(TRANSFORMER)
    cn = _controlnet(num_layers=layers, force_zeros_for_pooled_projection=force_zeros)
    mmdit = MMDiT(MMDiTConfig.from_diffusers(dict(ref.config)))
    mmdit.load_state_dict(ref.state_dict())
    net = SD3ControlNet(MMDiTConfig.from_diffusers({**TRANSFORMER, "num_layers": layers}),
                        force_zeros_for_pooled_projection=force_zeros)
    net.load_state_dict(cn.state_dict())  # diffusers' names
    g = torch.Generator().manual_seed(1)
    x, control = torch.randn(2, 16, 8, 6, generator=g), torch.randn(2, 16, 8, 6, generator=g)
    ctx, pooled = torch.randn(2, 5, 12, generator=g), torch.randn(2, 10, generator=g)
    t = torch.tensor([375.0, 842.0])
    with torch.no_grad():
        samples = cn(hidden_states=x, controlnet_cond=control, conditioning_scale=0.7, encoder_hidden_states=ctx,
                     pooled_projections=torch.zeros_like(pooled) if force_zeros else pooled, timestep=t,
                     return_dict=False)[0]
        want = ref(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t,
                   block_controlnet_hidden_states=samples).sample
        kw = dict(encoder_hidden_states=ctx, text_embeds=pooled, control_image=control,
                  control_scale=torch.tensor([0.7, 0.7]))
        got = ControlledMMDiT(mmdit, net)(x, t, **kw)
        assert rel_err(got, want) <= 1e-5
        plain = mmdit(x, t, encoder_hidden_states=ctx, text_embeds=pooled)
        assert rel_err(got, plain) > 1e-3  # the ControlNet reaches the output
        assert rel_err(ControlledMMDiT(mmdit, net)(x, t, **{**kw, "control_scale": torch.zeros(2)}), plain) <= 1e-6


@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_generate_equals_the_sd3_controlnet_pipeline(tmp_path, posterior_means, cfg):
    """One ControlNet, with and without CFG (both passes run it on their own text), its scale and step window;
    one image for every sample."""
    pipe, ref = _pair(tmp_path, [_controlnet()])
    e = {k: v for k, v in _embeds().items() if k != "latents" and (cfg != 1.0 or not k.startswith("negative"))}
    images = _pictures()
    for options in ({}, dict(controlnet_conditioning_scale=0.6, control_guidance_start=0.2,
                             control_guidance_end=0.7)):
        want = ref(control_image=images, num_inference_steps=5, guidance_scale=cfg, height=16, width=16,
                   generator=_generators(), output_type="latent", **options,
                   **{k: v.clone() for k, v in e.items()}).images
        got = pipe.generate(control_image=images, steps=5, cfg_scale=cfg, seeds=SEEDS, progress=False, **options,
                            **_text_kwargs(e, cfg != 1.0))
        assert rel_err(got, want) <= 2e-5
    kw = dict(steps=3, cfg_scale=cfg, seeds=SEEDS, progress=False, **_text_kwargs(e, cfg != 1.0))
    one = pipe.generate(control_image=images[0], **kw)
    assert rel_err(one[0], pipe.generate(control_image=images, **kw)[0]) <= 1e-6
    assert rel_err(one, pipe.generate(control_image=images[::-1], **kw)) > 1e-3


def test_several_controlnets_equal_the_multi_controlnet(tmp_path, posterior_means):
    """SD3MultiControlNetModel: one image, scale and window per ControlNet, their outputs summed; a ControlNet that
    reads its latents with the VAE's shift (force_zeros_for_pooled_projection off) beside another is refused."""
    pipe, ref = _pair(tmp_path, [_controlnet(5), _controlnet(6)])
    e = {k: v for k, v in _embeds().items() if k != "latents"}
    first, second = _pictures(), _pictures(seed=4)
    options = dict(controlnet_conditioning_scale=[0.8, 0.5], control_guidance_start=[0.0, 0.3],
                   control_guidance_end=[0.8, 1.0])
    want = ref(control_image=[first, second], num_inference_steps=5, guidance_scale=3.0, height=16, width=16,
               generator=_generators(), output_type="latent", **options, **{k: v.clone() for k, v in e.items()}).images
    kw = dict(steps=5, cfg_scale=3.0, seeds=SEEDS, progress=False, **options, **_text_kwargs(e, True))
    got = pipe.generate(control_image=[first, second], **kw)
    assert rel_err(got, want) <= 2e-5
    assert rel_err(got, pipe.generate(control_image=[second, first], **kw)) > 1e-3
    _controlnet(7, force_zeros_for_pooled_projection=False).save_pretrained(tmp_path / "shifted")
    with pytest.raises(BadArgumentError, match="with the VAE's shift, or all without"):
        pipe.set_controlnet([str(tmp_path / "cn0"), str(tmp_path / "shifted")])


def test_a_controlnet_reading_shifted_latents_equals_diffusers(tmp_path, posterior_means):
    """force_zeros_for_pooled_projection off: the pooled embedding reaches it, and its latents keep the VAE's
    shift."""
    pipe, ref = _pair(tmp_path, [_controlnet(force_zeros_for_pooled_projection=False)])
    e = {k: v for k, v in _embeds().items() if k != "latents" and not k.startswith("negative")}
    want = ref(control_image=_pictures(), num_inference_steps=4, guidance_scale=1.0, height=16, width=16,
               generator=_generators(), output_type="latent", **{k: v.clone() for k, v in e.items()}).images
    got = pipe.generate(control_image=_pictures(), steps=4, seeds=SEEDS, progress=False, **_text_kwargs(e, False))
    assert rel_err(got, want) <= 2e-5


def test_captured_loops_the_engine_and_a_save_equal_eager(tmp_path):
    from test_graph_scopes import FakeGraph

    pipe, ref = _pair(tmp_path, [_controlnet()])
    e = {k: v for k, v in _embeds().items() if k != "latents"}
    images = _pictures()
    kw = dict(steps=3, cfg_scale=3.0, seeds=SEEDS, progress=False, controlnet_conditioning_scale=0.8,
              **_text_kwargs(e, True))
    want = pipe.generate(control_image=images, **kw)
    pipe.save(str(tmp_path / "saved"))
    assert rel_err(fastdiff.load(str(tmp_path / "saved")).generate(control_image=images, **kw), want) <= 1e-6
    ref.save_pretrained(str(tmp_path / "theirs"))
    assert rel_err(fastdiff.load(str(tmp_path / "theirs")).generate(control_image=images, **kw), want) <= 1e-6
    graphed = fastdiff.load(str(tmp_path / "saved")).optimize(cuda_graphs=True, graph_scope="loop",
                                                              batch_buckets=(2,), graph_factory=FakeGraph)
    assert rel_err(graphed.generate(control_image=images, **kw), want) <= 1e-5
    with fastdiff.Engine(pipe, max_batch=4, max_wait_ms=50) as engine:
        futures = [engine.submit(seed=s, control_image=images[i], steps=3, cfg_scale=3.0,
                                 encoder_hidden_states=e["prompt_embeds"][i], text_embeds=e["pooled_prompt_embeds"][i],
                                 negative_encoder_hidden_states=e["negative_prompt_embeds"][i],
                                 negative_text_embeds=e["negative_pooled_prompt_embeds"][i],
                                 controlnet_conditioning_scale=0.8) for i, s in enumerate(SEEDS)]
        results = [f.result(timeout=120) for f in futures]
    for i, got in enumerate(results):
        assert rel_err(got, want[i]) <= 1e-5


SD35 = dict(joint_attention_dim=None, use_pos_embed=False, pos_embed_type=None, pos_embed_max_size=None,
            force_zeros_for_pooled_projection=False, qk_norm=None)  # SD3.5's official ControlNets' layout


def test_sd35_controlnets_equal_diffusers(tmp_path, posterior_means):
    """SD3.5's official layout: image-only blocks, no text input, the pooled embedding, latents with the VAE's
    shift, and the transformer's patch embedding (which diffusers' pipeline copies into the ControlNet); with CFG,
    two of them, and through a save (which writes no positions: they are the transformer's)."""
    pipe, ref = _pair(tmp_path, [_controlnet(**SD35)])
    assert pipe.controlnet.image_only and pipe.controlnet.pos_embed is not None
    e = {k: v for k, v in _embeds().items() if k != "latents"}
    images = _pictures()
    kw = dict(steps=4, cfg_scale=3.0, seeds=SEEDS, progress=False, **_text_kwargs(e, True))
    want = ref(control_image=images, num_inference_steps=4, guidance_scale=3.0, height=16, width=16,
               generator=_generators(), output_type="latent", **{k: v.clone() for k, v in e.items()}).images
    got = pipe.generate(control_image=images, **kw)
    assert rel_err(got, want) <= 2e-5
    assert rel_err(got, pipe.generate(control_image=images[::-1], **kw)) > 1e-3
    pipe.save(str(tmp_path / "saved"))
    from safetensors.torch import load_file

    assert not any(k.startswith("pos_embed.") for k in load_file(str(tmp_path / "saved" / "controlnet" /
                                                                    "diffusion_pytorch_model.safetensors")))
    assert rel_err(fastdiff.load(str(tmp_path / "saved")).generate(control_image=images, **kw), got) <= 1e-6
    # diffusers' own save of the pipeline writes the positions its pipeline copied into the ControlNet
    ref.save_pretrained(str(tmp_path / "theirs"))
    assert rel_err(fastdiff.load(str(tmp_path / "theirs")).generate(control_image=images, **kw), got) <= 1e-6
    two, ref_two = _pair(tmp_path / "two", [_controlnet(5, **SD35), _controlnet(6, **SD35)])
    options = dict(controlnet_conditioning_scale=[0.7, 0.4])
    want = ref_two(control_image=[images, images[::-1]], num_inference_steps=4, guidance_scale=3.0, height=16,
                   width=16, generator=_generators(), output_type="latent", **options,
                   **{k: v.clone() for k, v in e.items()}).images
    assert rel_err(two.generate(control_image=[images, images[::-1]], **options, **kw), want) <= 2e-5


def test_sd35_large_controlnet_configs_load():
    """SD3.5 Large's ControlNets keep caption_projection_dim 2048 beside a 38 x 64 width, and no position table size:
    fields their layout never reads."""
    from fastdiff.models.sd3_controlnet import SD3ControlNet, split_config

    config = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=19, attention_head_dim=64,
                  num_attention_heads=38, joint_attention_dim=None, caption_projection_dim=2048,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=None, pos_embed_type=None,
                  use_pos_embed=False, force_zeros_for_pooled_projection=False, qk_norm=None,
                  extra_conditioning_channels=0, _class_name="SD3ControlNetModel")
    mmdit_config, own = split_config(config)
    assert own == dict(force_zeros_for_pooled_projection=False, image_only=True, extra_conditioning_channels=0)
    with torch.device("meta"):
        net = SD3ControlNet(mmdit_config, **own)
    with torch.device("meta"):
        theirs = diffusers.SD3ControlNetModel(**{k: v for k, v in config.items() if k != "_class_name"})
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == {
        k: tuple(v.shape) for k, v in theirs.state_dict().items()}


def test_what_is_not_implemented_is_refused_by_name(tmp_path):
    from fastdiff.checkpoints.controlnet import load_controlnet

    pipe, _ = _pair(tmp_path, [_controlnet()])
    e = {k: v for k, v in _embeds().items() if k != "latents" and not k.startswith("negative")}
    kw = dict(control_image=_pictures(), steps=2, seeds=SEEDS, progress=False, **_text_kwargs(e, False))
    for bad, match in ((dict(image=_pictures()), "takes the image as control_image and the mask as control_mask"),
                       (dict(guess_mode=True), "guess_mode: the SD3 and FLUX.1 ControlNet pipelines have none"),
                       (dict(control_mode=1), "control_mode: a FLUX.1 Union ControlNet's control type")):
        with pytest.raises(BadArgumentError, match=match):
            pipe.generate(**{**kw, **bad})
    for extra, layout in ((2, {}), (1, SD35)):  # (the pipeline adds one mask channel; SD3.5's blocks need positions)
        _controlnet(extra_conditioning_channels=extra, **layout).save_pretrained(tmp_path / f"extra{extra}")
        with pytest.raises(UnsupportedConfigError, match=f"extra_conditioning_channels' = {extra}"):
            load_controlnet(str(tmp_path / f"extra{extra}"))
    with pytest.raises(BadArgumentError, match="control_mask: the mask of an SD3 inpainting ControlNet"):
        pipe.generate(**kw, control_mask=_masks()[0])
    _controlnet(use_pos_embed=False).save_pretrained(tmp_path / "mixed")  # (no positions, but a text stream)
    with pytest.raises(UnsupportedConfigError, match="InstantX's layout; .* SD3.5's"):
        load_controlnet(str(tmp_path / "mixed"))
    _controlnet(joint_attention_dim=8).save_pretrained(tmp_path / "narrow")
    with pytest.raises(BadArgumentError, match="made for another transformer; joint_attention_dim: 8"):
        pipe.set_controlnet(str(tmp_path / "narrow"))


def test_dual_attention_blocks_past_the_controlnets_depth_are_ignored_as_diffusers_does():
    """A ControlNet made from an SD3.5 Medium-style transformer keeps its dual-attention list, which may name blocks
    past the ControlNet's own depth: diffusers ignores those, and so does fastdiff."""
    from fastdiff.models.sd3_controlnet import split_config

    cn = _controlnet(num_layers=1, dual_attention_layers=(0, 1))
    config, _ = split_config(dict(cn.config))
    assert config.dual_attention_layers == (0,) and config.num_layers == 1


def test_a_pipeline_folder_with_a_controlnet_fastdiff_does_not_run_loads_its_base_alone(tmp_path):
    """A StableDiffusion3ControlNetPipeline folder whose controlnet/ mixes the two layouts (no positions of its own,
    but a text stream): the base model loads, and a note says why the ControlNet is not attached. A
    StableDiffusion3ControlNetInpaintingPipeline folder loads with its inpainting ControlNet."""
    pipe, ref = _pair(tmp_path, [_controlnet()])
    ref.controlnet = _controlnet(use_pos_embed=False)
    ref.save_pretrained(str(tmp_path / "theirs"))
    loaded = fastdiff.load(str(tmp_path / "theirs"))
    assert loaded.controlnet is None
    assert any("controlnet/ not attached" in n and "use_pos_embed" in n for n in loaded.notes)
    _, inpainting = _pair(tmp_path / "inp", [_controlnet(extra_conditioning_channels=1)], INPAINT_PIPELINE)
    inpainting.save_pretrained(str(tmp_path / "inpainting"))
    assert fastdiff.load(str(tmp_path / "inpainting")).controlnet.inpaints


def _masks(n=2, seed=8):
    """Masks (white: repaint) for _pictures, each a random box."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        m = np.zeros((16, 16), dtype=np.uint8)
        top, left = rng.integers(0, 8, 2)
        m[top:top + 8, left:left + 6] = 255
        out.append(Image.fromarray(m, "L"))
    return out


INPAINT_PIPELINE = "StableDiffusion3ControlNetInpaintingPipeline"


@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_an_inpainting_controlnet_equals_diffusers(tmp_path, posterior_means, cfg):
    """Alimama's layout (extra_conditioning_channels=1) as StableDiffusion3ControlNetInpaintingPipeline drives it:
    the control image with its masked pixels black, encoded with the VAE's shift, then the inverted mask; zeros for
    the pooled embedding; one image and mask per sample, or one for every sample; its scale and step window."""
    pipe, ref = _pair(tmp_path, [_controlnet(extra_conditioning_channels=1)], INPAINT_PIPELINE)
    e = {k: v for k, v in _embeds().items() if k != "latents" and (cfg != 1.0 or not k.startswith("negative"))}
    images, masks = _pictures(), _masks()
    for options in ({}, dict(controlnet_conditioning_scale=0.6, control_guidance_start=0.2,
                             control_guidance_end=0.7)):
        want = ref(control_image=images, control_mask=masks, num_inference_steps=5, guidance_scale=cfg, height=16,
                   width=16, generator=_generators(), output_type="latent", **options,
                   **{k: v.clone() for k, v in e.items()}).images
        got = pipe.generate(control_image=images, control_mask=masks, steps=5, cfg_scale=cfg, seeds=SEEDS,
                            progress=False, **options, **_text_kwargs(e, cfg != 1.0))
        assert rel_err(got, want) <= 2e-5
    kw = dict(steps=3, cfg_scale=cfg, seeds=SEEDS, progress=False, **_text_kwargs(e, cfg != 1.0))
    want = ref(control_image=images[0], control_mask=masks[0], num_inference_steps=3, guidance_scale=cfg, height=16,
               width=16, generator=_generators(), output_type="latent", **{k: v.clone() for k, v in e.items()}).images
    one = pipe.generate(control_image=images[0], control_mask=masks[0], **kw)
    assert rel_err(one, want) <= 2e-5
    # the mask reaches the output both ways: through the masked pixels and as the extra channel
    assert rel_err(pipe.generate(control_image=images[0], control_mask=masks[1], **kw), one) > 1e-3
    # a tensor mask goes unprocessed, as that pipeline hands it on: pixels above 0.5 masked, the soft mask read
    soft = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    want = ref(control_image=images, control_mask=soft.clone(), num_inference_steps=3, guidance_scale=cfg, height=16,
               width=16, generator=_generators(), output_type="latent", **{k: v.clone() for k, v in e.items()}).images
    assert rel_err(pipe.generate(control_image=images, control_mask=soft, **kw), want) <= 2e-5


def test_an_inpainting_controlnet_through_loops_the_engine_and_a_save(tmp_path):
    """Captured loops (the masked latents are the loop's input), the Engine (each request its own image and mask)
    and a save (extra_conditioning_channels written back) equal eager; a missing, surplus or misshapen mask and a
    ControlNet mixing the two kinds are refused by name."""
    from test_graph_scopes import FakeGraph

    pipe, _ = _pair(tmp_path, [_controlnet(extra_conditioning_channels=1)], INPAINT_PIPELINE)
    e = {k: v for k, v in _embeds().items() if k != "latents"}
    images, masks = _pictures(), _masks()
    kw = dict(steps=3, cfg_scale=3.0, seeds=SEEDS, progress=False, **_text_kwargs(e, True))
    want = pipe.generate(control_image=images, control_mask=masks, **kw)
    pipe.save(str(tmp_path / "saved"))
    again = fastdiff.load(str(tmp_path / "saved"))
    assert again.controlnet.extra_conditioning_channels == 1
    assert rel_err(again.generate(control_image=images, control_mask=masks, **kw), want) <= 1e-6
    graphed = again.optimize(cuda_graphs=True, graph_scope="loop", batch_buckets=(2,), graph_factory=FakeGraph)
    assert rel_err(graphed.generate(control_image=images, control_mask=masks, **kw), want) <= 1e-5
    with fastdiff.Engine(pipe, max_batch=4, max_wait_ms=50) as engine:
        futures = [engine.submit(seed=s, control_image=images[i], control_mask=masks[i], steps=3, cfg_scale=3.0,
                                 encoder_hidden_states=e["prompt_embeds"][i], text_embeds=e["pooled_prompt_embeds"][i],
                                 negative_encoder_hidden_states=e["negative_prompt_embeds"][i],
                                 negative_text_embeds=e["negative_pooled_prompt_embeds"][i])
                   for i, s in enumerate(SEEDS)]
        bad = engine.submit(seed=1, control_image=images[0], steps=3, encoder_hidden_states=e["prompt_embeds"][0],
                            text_embeds=e["pooled_prompt_embeds"][0])
        results = [f.result(timeout=120) for f in futures]
    for i, got in enumerate(results):
        assert rel_err(got, want[i]) <= 1e-5
    with pytest.raises(BadArgumentError, match="control_mask: this SD3 inpainting ControlNet .* found none"):
        bad.result(timeout=60)
    for bad_kw, match in ((dict(), "expected a mask"),
                          (dict(control_mask=masks + masks[:1]), "control_mask: expected 1 or 2 masks"),
                          (dict(control_mask=torch.ones(1, 1, 8, 8)), "control_mask: expected the image's size")):
        with pytest.raises(BadArgumentError, match=match):
            pipe.generate(control_image=images, **bad_kw, **kw)
    _controlnet(6).save_pretrained(tmp_path / "plain")
    with pytest.raises(BadArgumentError, match="all inpaint .* or none"):
        pipe.set_controlnet([str(tmp_path / "saved" / "controlnet"), str(tmp_path / "plain")])


def test_cli_control_mask_needs_a_control_image(tmp_path):
    """``--control-mask`` (an SD3 inpainting ControlNet's) without ``--control-image``, or naming no file, is one line
    and exit 2."""
    from test_cli import fastdiff as run_cli

    _masks()[0].save(tmp_path / "mask.png")
    r = run_cli("generate", "digits", "--control-mask", "mask.png", "--steps", "2", cwd=tmp_path)
    assert r.returncode == 2 and "--control-mask: given without --control-image" in r.stderr
    _pictures()[0].save(tmp_path / "edges.png")
    r = run_cli("generate", "digits", "--controlnet", "cn", "--control-image", "edges.png", "--control-mask",
                "missing.png", cwd=tmp_path)
    assert r.returncode == 2 and "--control-mask: expected an image file, found 'missing.png'" in r.stderr
    assert "Traceback" not in r.stderr



@pytest.mark.parametrize("cfg_folded", [False, True])
def test_exported_sd3_controlnets_run_like_eager(tmp_path, cfg_folded):
    """export_onnx of an SD3 pipeline with its ControlNet(s): one graph taking the control latents (B, [K,] C', H, W)
    and scales; through the onnxruntime backend and loaded back from the file (with the VAE that encodes the control
    image) it equals eager: one InstantX ControlNet, two, and the inpainting one with its mask."""
    pytest.importorskip("onnxruntime", reason="the exported graph runs in ONNX Runtime")
    from fastdiff.commands.export import reference_network
    from fastdiff.export.onnx import _example_inputs, export_onnx, read_onnx_io, reference_output
    from fastdiff.export.tensorrt import make_profiles

    e = {k: v for k, v in _embeds().items() if k != "latents"}
    kw = dict(steps=3, cfg_scale=3.0, seeds=SEEDS, progress=False, **_text_kwargs(e, True))
    images, masks = _pictures(), _masks()
    cases = (([_controlnet()], dict(control_image=images, controlnet_conditioning_scale=0.8, control_guidance_end=0.6)),
             ([_controlnet(5), _controlnet(6)], dict(control_image=[images, images[::-1]],
                                                      controlnet_conditioning_scale=[0.8, 0.5])),
             ([_controlnet(extra_conditioning_channels=1)], dict(control_image=images, control_mask=masks)))
    for i, (nets, inputs) in enumerate(cases):
        pipe, _ = _pair(tmp_path / str(i), nets)
        want = pipe.generate(**inputs, **kw)
        path = str(tmp_path / f"controlled{i}.onnx")
        result = export_onnx(pipe, None, path, cfg_folded=cfg_folded, dynamic_hw=True, progress=False)
        assert result.max_rel_err is not None and result.max_rel_err <= 1e-5, result.check_note
        io = read_onnx_io(path)
        assert io["control"]["latent"] == "sd3" and io["control"]["count"] == (2 if i == 1 else None)
        assert io["control"]["conditioning_channels"] == (17 if i == 2 else 16)
        assert io["control"]["image_downscale"] == 1
        shape = make_profiles(path, batch=(1, 2, 4), height=(2, 2, 4), width=(2, 2, 4))["control_image"][2]
        assert shape == ((4, 2) if i == 1 else (4,)) + ((17,) if i == 2 else (16,)) + (4, 4)
        exported = fastdiff.load(path, vae=str(tmp_path / str(i) / "pipe" / "vae"))
        assert rel_err(exported.generate(**inputs, **kw), want) <= 1e-5
        # what `fastdiff export --format tensorrt` checks its engine against: both networks (the graph holds both)
        feeds = _example_inputs(pipe.spec, io, 2, 2, 2, "cpu", seed=1)
        assert rel_err(exported.runner.run_feeds(feeds), reference_output(reference_network(pipe, "cpu"), pipe.spec,
                                                                          io, feeds)) <= 1e-5
        optimized = pipe.optimize(backend="onnxruntime")
        assert rel_err(optimized.generate(**inputs, **kw), want) <= 1e-5
    with pytest.raises(BadArgumentError, match="control_mask: this SD3 inpainting ControlNet .* found none"):
        exported.generate(control_image=images, **kw)
    plain = fastdiff.load(str(tmp_path / "controlled0.onnx"), vae=str(tmp_path / "0" / "pipe" / "vae"))
    with pytest.raises(BadArgumentError, match="control_mask: .* this pipeline has a ControlNet that reads none"):
        plain.generate(control_image=images, control_mask=masks, **kw)
    from fastdiff.commands.info import _control  # (what `fastdiff info` says it needs)

    assert "(an SD3 ControlNet: control_image, encoded by its VAE" in _control(plain)


def test_cli_export_writes_an_sd3_controlled_graph(tmp_path):
    pytest.importorskip("onnx", reason="the export writes ONNX")
    from fastdiff.export.onnx import read_onnx_io
    from test_cli import fastdiff as run_cli

    _pair(tmp_path, [_controlnet(extra_conditioning_channels=1)], INPAINT_PIPELINE)
    r = run_cli("export", str(tmp_path / "pipe"), "--format", "onnx", "--controlnet", str(tmp_path / "cn0"), "-o",
                "controlled.onnx", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    control = read_onnx_io(str(tmp_path / "controlled.onnx"))["control"]
    assert control["latent"] == "sd3" and control["inpaints"] and control["conditioning_channels"] == 17
