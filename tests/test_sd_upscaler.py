"""Stable Diffusion's x4 upscaler (diffusers' ``StableDiffusionUpscalePipeline`` folders): a UNet with
``only_cross_attention`` that reads its latents beside the low-resolution image, noised by the folder's
low_res_scheduler to a noise level that is also its class label; against diffusers' pipeline end to end (tiny random
components, the same generators)."""

import os

import pytest
import torch

import fastdiff
from fastdiff.errors import BadArgumentError
from helpers import diffusers_pipeline, perturb_, rel_err
from tiny_text import clip_encoder, write_clip_tokenizer

diffusers = pytest.importorskip("diffusers", reason="diffusers' pipeline is the reference")
pytest.importorskip("transformers", reason="the text encoder is transformers' CLIP")

PROMPTS = ["a photo of a red cat", "the dog and the cat"]


def _unet(only_cross=(True, True, False)):
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 32, 64), layers_per_block=2, sample_size=8, in_channels=7, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
        attention_head_dim=8, use_linear_projection=True, only_cross_attention=only_cross, num_class_embeds=100,
        norm_num_groups=8)
    return perturb_(unet.eval(), 0)


def _vae():
    torch.manual_seed(1)
    vae = diffusers.AutoencoderKL(block_out_channels=(16, 16, 32), in_channels=3, out_channels=3,
                                  down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                                  latent_channels=4, norm_num_groups=8)
    return perturb_(vae.eval(), 1)


@pytest.fixture(scope="module")
def upscaler(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("upscaler"))
    tok = write_clip_tokenizer(os.path.join(folder, "_tok"))
    import transformers

    ref = diffusers_pipeline("StableDiffusionUpscalePipeline")(
        vae=_vae(), text_encoder=clip_encoder(16), tokenizer=transformers.AutoTokenizer.from_pretrained(tok),
        unet=_unet(), low_res_scheduler=diffusers.DDPMScheduler(beta_schedule="scaled_linear"),
        scheduler=diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                          clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                          prediction_type="v_prediction"),
        max_noise_level=90)
    ref.set_progress_bar_config(disable=True)
    ref.save_pretrained(os.path.join(folder, "pipe"))
    return ref, fastdiff.load(os.path.join(folder, "pipe"))


def _images(k=2, size=8, seed=4):
    return torch.rand(k, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_only_cross_attention_unet_equals_diffusers():
    """The transformers' first attention reads the text states too (per block, or as one bool; diffusers'
    UNetMidBlock2DCrossAttn never reads it); the class embedding reads the noise level."""
    from fastdiff.models.unet import UNet
    from fastdiff.models.unet_config import UNetConfig

    for only_cross in ((True, True, False), True):
        ref = _unet(only_cross)
        ours = UNet(UNetConfig.from_diffusers(dict(ref.config), "UNet2DConditionModel"))
        ours.load_state_dict(ref.state_dict())
        x, t = torch.randn(2, 7, 8, 8), torch.tensor([10, 700])
        ctx, y = torch.randn(2, 5, 16), torch.tensor([20, 3])
        with torch.no_grad():
            want = ref(x, t, ctx, class_labels=y).sample
            assert rel_err(ours.eval()(x, t, class_labels=y, encoder_hidden_states=ctx), want) <= 1e-5


@pytest.mark.parametrize("cfg,level", [(1.0, 20), (4.0, 60)])
def test_upscaler_equals_diffusers(upscaler, cfg, level):
    """generate(prompt=, image=, noise_level=) equals StableDiffusionUpscalePipeline with one generator per sample:
    the image's noise drawn before the latents', the noise level both passes' class label, the VAE read at 0.08333."""
    ref, pipe = upscaler
    spec = pipe.spec
    assert (spec.in_channels, spec.low_res_channels, spec.low_res_noise["max_noise_level"]) == (4, 3, 90)
    assert pipe.vae.config.scaling_factor == 0.08333 == ref.vae.config.scaling_factor
    images, seeds = _images(), [5, 6]
    want = ref(PROMPTS, image=images, num_inference_steps=4, guidance_scale=cfg, noise_level=level,
               generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="latent").images
    got = pipe.generate(prompt=PROMPTS, image=images, steps=4, cfg_scale=cfg, noise_level=level, seeds=seeds,
                        progress=False)
    assert got.shape == (2, 4, 8, 8)
    assert rel_err(got, want) <= 1e-5
    decoded = ref(PROMPTS, image=images, num_inference_steps=4, guidance_scale=cfg, noise_level=level,
                  generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="pt").images
    ours = pipe.generate(prompt=PROMPTS, image=images, steps=4, cfg_scale=cfg, noise_level=level, seeds=seeds,
                         output_type="np", progress=False)
    assert decoded.shape[2:] == (32, 32) and ours.shape[1:3] == (32, 32)  # (4x: the VAE's three levels)
    assert abs(torch.from_numpy(ours).float().permute(0, 3, 1, 2) / 255 - decoded).max() <= 1 / 255 + 1e-4


def test_upscaler_noise_level_and_refusals(upscaler):
    _, pipe = upscaler
    kw = dict(prompt=PROMPTS[:1], image=_images(1), steps=2, seeds=[1], progress=False)
    low, high = pipe.generate(noise_level=0, **kw), pipe.generate(noise_level=90, **kw)
    assert rel_err(low, high) > 1e-3  # the level reaches the image's noise and the class label
    for bad in (91, -1, 2.5, True):
        with pytest.raises(BadArgumentError, match=r"noise_level: expected an integer in \[0, 90\]"):
            pipe.generate(noise_level=bad, **kw)
    with pytest.raises(BadArgumentError, match="class input is its noise level"):
        pipe.generate(class_labels=[3], **kw)
    with pytest.raises(BadArgumentError, match="latents are its image's size"):
        pipe.generate(height=16, width=16, **kw)
    with pytest.raises(BadArgumentError, match="noise_level: only an upscaler"):
        fastdiff.load("arch:tiny-sd-unet").generate(noise_level=20, encoder_hidden_states=torch.zeros(1, 4, 32),
                                                   progress=False)


def test_engine_batches_upscaler_requests(upscaler):
    _, pipe = upscaler
    images = _images(3)
    with fastdiff.Engine(pipe, max_batch=4, max_wait_ms=500) as engine:
        futures = [engine.submit(seed=i, prompt=PROMPTS[i % 2], image=images[i], steps=2, noise_level=30)
                   for i in range(3)]
        bad = engine.submit(seed=9, prompt=PROMPTS[0], image=images[0], steps=2, class_label=1)
        got = [f.result(timeout=120) for f in futures]
        with pytest.raises(BadArgumentError, match="class input is its noise level"):
            bad.result(timeout=60)
        assert max(engine.stats()["batch_size_hist"]) > 1  # (they shared a generate call)
    for i, out in enumerate(got):
        solo = pipe.generate(seeds=[i], prompt=PROMPTS[i % 2], image=images[i:i + 1], steps=2, noise_level=30,
                             progress=False)[0]
        assert rel_err(out, solo) <= 1e-5


def test_upscaler_survives_save_and_onnx_export(upscaler, tmp_path):
    _, pipe = upscaler
    kw = dict(prompt=PROMPTS, image=_images(), steps=2, cfg_scale=3.0, noise_level=40, seeds=[1, 2], progress=False)
    want = pipe.generate(**kw)
    saved = fastdiff.load(pipe.save(str(tmp_path / "saved")))
    assert saved.spec.low_res_noise == pipe.spec.low_res_noise and saved.vae.config.scaling_factor == 0.08333
    assert rel_err(saved.generate(**kw), want) <= 1e-6
    pytest.importorskip("onnxruntime", reason="the exported graph runs on ONNX Runtime")
    pytest.importorskip("onnx", reason="the exporter needs onnx")
    from fastdiff.export.onnx import export_onnx

    path = str(tmp_path / "upscaler.onnx")
    export_onnx(pipe, pipe.spec, path, progress=False)
    graph = fastdiff.load(path, vae=False)
    assert graph.spec.low_res_noise == pipe.spec.low_res_noise
    encoded = pipe.encode_prompt(PROMPTS, guided=True)
    states = dict(encoder_hidden_states=encoded["encoder_hidden_states"],
                  negative_encoder_hidden_states=encoded["negative_encoder_hidden_states"])
    kw.pop("prompt")
    assert rel_err(graph.generate(**states, **kw), want) <= 1e-4
    # CFG folded into the graph: both passes read the noise level (no null class)
    folded = str(tmp_path / "folded.onnx")
    result = export_onnx(pipe, pipe.spec, folded, cfg_folded=True, progress=False)
    assert result.max_abs_err is not None and result.max_abs_err < 1e-4  # (the exporter's own parity check)
    assert rel_err(fastdiff.load(folded, vae=False).generate(**states, **kw), want) <= 1e-4


def test_cli_and_bench_upscale(upscaler, tmp_path):
    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file

    from test_cli import fastdiff as run_cli

    ref, pipe = upscaler
    folder = str(tmp_path / "pipe")
    ref.save_pretrained(folder)
    pixels = (np.random.default_rng(1).random((8, 8, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "low.png")
    r = run_cli("generate", folder, "--prompt", "a red cat", "--image", "low.png", "--noise-level", "30", "--n", "1",
                "--steps", "2", "--cfg", "3", "--output-latents", "out.safetensors", "--separate", "-o", "up.png",
                "--no-progress",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    want = pipe.generate(prompt="a red cat", image=Image.open(tmp_path / "low.png"), noise_level=30, seed=0, steps=2,
                         cfg_scale=3.0, progress=False)
    assert rel_err(load_file(str(tmp_path / "out.safetensors"))["latents"], want) <= 1e-6
    assert Image.open(tmp_path / "up_0.png").size == (32, 32)  # (4x: the VAE's three levels)
    r = run_cli("bench", folder, "--steps", "2", "--batch", "1", "--compare", "diffusers", "--repeat", "2",
                cwd=tmp_path, timeout=300)
    assert r.returncode == 0 and "diffusers" in r.stdout, r.stderr


def test_upscaler_refusals_and_vae(upscaler, tmp_path):
    """Images that do not span whole VAE pixels, an IP-Adapter, a ControlNet and a CFG-folded export are refused
    with their reasons; a VAE given with vae= is read at 0.08333 too; a zero-terminal-SNR low_res_scheduler is
    diffusers'."""
    ref, pipe = upscaler
    with pytest.raises(BadArgumentError, match="multiples of 4"):
        pipe.generate(prompt="a cat", image=torch.rand(1, 3, 10, 10), steps=1, progress=False)
    with pytest.raises(BadArgumentError, match="takes no image prompt"):
        pipe.load_ip_adapter({})
    with pytest.raises(BadArgumentError, match="takes no ControlNet"):
        pipe.set_controlnet(str(tmp_path))
    folder = str(tmp_path / "pipe")
    ref.save_pretrained(folder)
    again = fastdiff.load(folder, vae=os.path.join(folder, "vae"))
    assert again.vae.config.scaling_factor == 0.08333
    zero = diffusers_pipeline("StableDiffusionUpscalePipeline")(
        **{**ref.components, "low_res_scheduler": diffusers.DDPMScheduler(beta_schedule="scaled_linear",
                                                                          rescale_betas_zero_snr=True)})
    zero.set_progress_bar_config(disable=True)
    zero.save_pretrained(str(tmp_path / "zero"))
    ours = fastdiff.load(str(tmp_path / "zero"))
    images, seeds = _images(), [5, 6]
    want = zero(PROMPTS, image=images, num_inference_steps=2, guidance_scale=1.0, noise_level=80,
                generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="latent").images
    got = ours.generate(prompt=PROMPTS, image=images, steps=2, noise_level=80, seeds=seeds, progress=False)
    assert rel_err(got, want) <= 1e-5


def test_noise_level_takes_integer_scalars(upscaler):
    import numpy as np

    _, pipe = upscaler
    kw = dict(prompt=PROMPTS[:1], image=_images(1), steps=1, seeds=[2], progress=False)
    want = pipe.generate(noise_level=30, **kw)
    for level in (np.int64(30), torch.tensor(30)):
        assert torch.equal(pipe.generate(noise_level=level, **kw), want)


def test_default_noise_level_above_the_maximum(upscaler):
    _, pipe = upscaler
    saved = pipe.spec.low_res_noise
    pipe.spec.low_res_noise = dict(saved, max_noise_level=10)
    try:
        with pytest.raises(BadArgumentError, match=r"found None \(the default, 20, is above it\)"):
            pipe.generate(prompt=PROMPTS[:1], image=_images(1), steps=1, progress=False)
    finally:
        pipe.spec.low_res_noise = saved
