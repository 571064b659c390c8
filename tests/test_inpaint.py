"""Inpainting (``generate(image=..., mask_image=...)`` on an inpainting UNet) against diffusers'
StableDiffusionInpaintPipeline / StableDiffusionXLInpaintPipeline on the same weights, embeddings, images, masks and
generators; and its checks."""

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff.errors import BadArgumentError
from helpers import perturb_, rel_err
from test_img2img import SD_SCHEDULER, SEEDS, _folder, _generators, _images, sd_pair, sd_unet_vae_embeds
from test_vae import SD_VAE, _reference as vae_reference

diffusers = pytest.importorskip("diffusers", reason="diffusers' inpainting pipelines are the reference")

def _masks(b=2, size=16, seed=5):
    """Soft masks in [0, 1] (binarized at 0.5 by both sides), with values on both sides of the threshold."""
    return torch.rand(b, 1, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def sd_inpaint():
    return sd_unet_vae_embeds(in_channels=9)  # 4 latents + 1 mask + 4 masked-image latents


def _sd_pair(parts, folder, cls="DDIMScheduler"):
    return sd_pair(parts, folder, getattr(diffusers, cls).from_config(SD_SCHEDULER), "StableDiffusionInpaintPipeline",
                   "StableDiffusionInpaintPipeline")


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
    # float masks are binarized as they are, negative values too (they were read as [-1, 1] and rescaled)
    signed = torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1  # (B, H, W)
    want = ref(image=images.clone(), mask_image=signed.clone(), num_inference_steps=4, guidance_scale=1.0,
               prompt_embeds=e["prompt_embeds"], generator=_generators(), output_type="latent", height=16,
               width=16).images
    assert rel_err(pipe.generate(image=images, mask_image=signed, **kw), want) <= 1e-5
    assert rel_err(pipe.generate(image=images, mask_image=signed.numpy(), **kw), want) <= 1e-5  # (B, H, W) array


@pytest.mark.parametrize("kwargs, match", [
    (dict(mask_image=None), "image / mask_image: this is an inpainting network.*found image only"),
    (dict(image=None), "found mask_image only"),
    (dict(image=None, mask_image=None), "found neither"),
    (dict(mask_image=torch.rand(1, 1, 8, 8)), r"mask_image: expected the image's size \(16, 16\), found \(8, 8\)"),
    (dict(mask_image=torch.rand(3, 1, 16, 16)), "mask_image: expected 1 or 2 masks"),
    (dict(mask_image=torch.rand(1, 3, 16, 16)), r"mask_image: expected a \(H, W\), \(B, H, W\) or \(B, 1, H, W\) "
                                                r"tensor, found shape \(1, 3, 16, 16\)"),
    (dict(mask_image=torch.full((16, 16), float("nan"))), "mask_image: expected finite values"),
    (dict(mask_image=np.zeros((2, 16, 16, 3), np.float32)), r"mask_image: expected a \(H, W\), \(H, W, 1\)"),
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


def test_sdxl_inpainting_equals_diffusers(tmp_path):
    """SDXL's inpainting pipeline: its default strength 0.9999 (the image's latents noised, not pure noise)."""
    from test_img2img import _text_kwargs, sdxl_pair
    from test_sdxl import _embeds

    pipe, ref = sdxl_pair(tmp_path, "StableDiffusionXLInpaintPipeline", "StableDiffusionXLInpaintPipeline",
                          in_channels=9)
    e, images, masks = {k: v for k, v in _embeds().items() if k != "latents"}, _images(), _masks()
    want = ref(image=images.clone(), mask_image=masks.clone(), num_inference_steps=8, guidance_scale=5.0,
               generator=_generators(), output_type="latent", height=16, width=16,
               **{k: v.clone() for k, v in e.items()}).images
    # (the ids given: the same as the defaults, in the VAE's pixels)
    got = pipe.generate(image=images, mask_image=masks, steps=8, cfg_scale=5.0, seeds=SEEDS, progress=False,
                        time_ids=[16, 16, 0, 0, 16, 16], **_text_kwargs(e, True))
    assert rel_err(got, want) <= 1e-5
    from test_cli import fastdiff as run_cli  # the bench times it too, against its diffusers loop

    import json

    r = run_cli("bench", str(tmp_path), "--compare", "diffusers", "--steps", "2", "--repeat", "1", "--warmup", "1",
                "--cfg", "3", "--json", "out.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "out.json").read_text())
    assert [row["status"] for row in rows["results"] + rows["compare"]] == ["ok", "ok"], rows


@pytest.mark.parametrize("scope", ["step", "loop"])
def test_inpainting_in_captured_graphs_equals_eager(sd_inpaint, tmp_path, scope):
    """The mask and masked-image latents are graph inputs: a new mask replays the captured graph."""
    from test_graph_scopes import FakeGraph

    eager, _ = _sd_pair(sd_inpaint, tmp_path)
    graphed = fastdiff.load(str(tmp_path)).optimize(cuda_graphs=True, graph_scope=scope,
                                                                    batch_buckets=(1, 2, 4), graph_factory=FakeGraph)
    e = sd_inpaint[2]
    kw = dict(steps=4, cfg_scale=3.0, seeds=SEEDS, encoder_hidden_states=e["prompt_embeds"],
              negative_encoder_hidden_states=e["negative_prompt_embeds"], progress=False)
    for masks, strength in ((_masks(), None), (_masks(seed=9), None), (_masks(), 0.75)):
        got = graphed.generate(image=_images(), mask_image=masks, strength=strength, **kw)
        assert rel_err(got, eager.generate(image=_images(), mask_image=masks, strength=strength, **kw)) <= 1e-6
    if scope == "loop":
        assert graphed.loop_graphs.captures == 2  # one per strength; the second mask replayed the first capture


def test_engine_inpainting_requests_equal_their_solo_runs(sd_inpaint, tmp_path):
    pipe, _ = _sd_pair(sd_inpaint, tmp_path)
    e = sd_inpaint[2]
    images, masks = _images(3), _masks(3)
    with fastdiff.Engine(pipe, max_batch=4, max_wait_ms=50) as engine:
        futures = [engine.submit(seed=i, image=images[i], mask_image=masks[i], steps=3, cfg_scale=2.0,
                                 encoder_hidden_states=e["prompt_embeds"][0],
                                 negative_encoder_hidden_states=e["negative_prompt_embeds"][0]) for i in range(3)]
        no_mask = engine.submit(seed=5, image=images[0], steps=3, encoder_hidden_states=e["prompt_embeds"][0])
        nothing = engine.submit(seed=5, steps=3, encoder_hidden_states=e["prompt_embeds"][0])
        results = [f.result(timeout=120) for f in futures]
        assert engine.stats()["batch_size_hist"] == {3: 1}  # (the three masks in one batch)
    for fut, match in ((no_mask, "found image only"), (nothing, "found neither")):
        with pytest.raises(BadArgumentError, match=match):
            fut.result(timeout=10)
    for i, got in enumerate(results):
        want = pipe.generate(seeds=[i], image=images[i], mask_image=masks[i], steps=3, cfg_scale=2.0,
                             encoder_hidden_states=e["prompt_embeds"][:1],
                             negative_encoder_hidden_states=e["negative_prompt_embeds"][:1], progress=False)[0]
        assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("cfg_folded", [False, True])
def test_an_exported_inpainting_graph_inpaints_like_eager(sd_inpaint, tmp_path, cfg_folded):
    """The mask and masked-image latents are a graph input (``image_latents``, shared by a CFG-folded graph's two
    passes); the loaded graph, given the folder's VAE, inpaints as the PyTorch model does."""
    pytest.importorskip("onnxruntime", reason="the exported graph runs on ONNX Runtime")
    pytest.importorskip("onnx", reason="the exporter needs onnx")
    from fastdiff.export.onnx import export_onnx

    eager, _ = _sd_pair(sd_inpaint, tmp_path)
    path = str(tmp_path / "inpaint.onnx")
    res = export_onnx(eager, eager.spec, path, cfg_folded=cfg_folded, progress=False)
    assert res.max_abs_err is not None and res.max_abs_err < 1e-4  # (the exporter's own parity check)
    graph = fastdiff.load(path, vae=str(tmp_path / "vae"))
    assert graph.spec.inpainting
    e = sd_inpaint[2]
    kw = dict(image=_images(), mask_image=_masks(), steps=3, cfg_scale=[2.0, 4.0], seeds=SEEDS,
              encoder_hidden_states=e["prompt_embeds"], negative_encoder_hidden_states=e["negative_prompt_embeds"],
              progress=False)
    assert rel_err(graph.generate(**kw), eager.generate(**kw)) <= 1e-5
    if not cfg_folded:
        ort = fastdiff.load(str(tmp_path)).optimize(backend="onnxruntime")
        assert rel_err(ort.generate(**kw), eager.generate(**kw)) <= 1e-5


def unconditional_inpainting_folder(tmp_path, in_channels: int):
    """(a folder of a tiny unconditional UNet with ``in_channels`` (9: an inpainting one; 4: a regular one), a DDIM
    scheduler and a VAE; an image and a mask as uint8 arrays, also written to tmp_path / in.png and mask.png): what
    the CLI inpaints without text encoders."""
    from PIL import Image

    torch.manual_seed(0)
    unet = perturb_(diffusers.UNet2DModel(sample_size=8, in_channels=in_channels, out_channels=4,
                                          block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                                          down_block_types=("DownBlock2D", "DownBlock2D"),
                                          up_block_types=("UpBlock2D", "UpBlock2D")).eval(), 0)
    folder = _folder(tmp_path / "model", "unet", unet, diffusers.DDIMScheduler.from_config(SD_SCHEDULER),
                     vae_reference(SD_VAE, seed=2), "StableDiffusionInpaintPipeline")
    pixels = (np.random.default_rng(1).random((16, 16, 3)) * 255).astype(np.uint8)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 2:9] = 255
    Image.fromarray(pixels).save(tmp_path / "in.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    return folder, pixels, mask


def test_cli_generate_inpaints_an_image(tmp_path):
    """``fastdiff generate MODEL --image IN.png --mask MASK.png`` writes what generate(image=, mask_image=) returns
    (an unconditional inpainting UNet, so no text encoders are needed); its mistakes are one line and exit 2."""
    from safetensors.torch import load_file

    from test_cli import fastdiff as run_cli

    folder, pixels, mask = unconditional_inpainting_folder(tmp_path, 9)
    r = run_cli("generate", folder, "--image", "in.png", "--mask", "mask.png", "--steps", "3", "--n", "1", "--seed",
                "7", "--output-latents", "lat.safetensors", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    want = fastdiff.load(folder).generate(image=pixels, mask_image=mask, steps=3, seeds=[7], progress=False)
    assert torch.equal(load_file(str(tmp_path / "lat.safetensors"))["latents"], want)
    for args, message in [(("--mask", "mask.png"), "--mask: given without --image"),
                          (("--image", "in.png", "--mask", "missing.png"), "--mask: expected an image file"),
                          (("--image", "in.png"), "image / mask_image (--mask): this is an inpainting network")]:
        r = run_cli("generate", folder, *args, "--steps", "2", "--n", "1", "--output-latents", "x.safetensors",
                    cwd=tmp_path)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    r = run_cli("info", folder, cwd=tmp_path)
    assert "image and mask_image (an inpainting network)" in r.stdout, r.stdout


def test_sd_inpainting_runs_the_scheduler_config_as_its_pipeline_rewrites_it(sd_inpaint, tmp_path):
    """StableDiffusionInpaintPipeline runs PNDM without its Runge-Kutta warm-up (skip_prk_steps -> True) and any
    scheduler with steps_offset 1 and clip_sample False, whatever the folder says: fastdiff loads the folder so,
    with a note per rewrite."""
    config = dict(SD_SCHEDULER, steps_offset=0, skip_prk_steps=False)
    pipe, ref = sd_pair(sd_inpaint, tmp_path, diffusers.PNDMScheduler.from_config(config),
                        "StableDiffusionInpaintPipeline", "StableDiffusionInpaintPipeline")
    assert ref.scheduler.config.skip_prk_steps and ref.scheduler.config.steps_offset == 1
    assert {n.split()[1] for n in pipe.notes if "rewrites it" in n} == {"steps_offset=0", "skip_prk_steps=False"}
    e = sd_inpaint[2]
    want = ref(image=_images(), mask_image=_masks(), num_inference_steps=6, guidance_scale=3.0,
               prompt_embeds=e["prompt_embeds"], negative_prompt_embeds=e["negative_prompt_embeds"],
               generator=_generators(), output_type="latent", height=16, width=16).images
    got = pipe.generate(image=_images(), mask_image=_masks(), steps=6, cfg_scale=3.0, seeds=SEEDS,
                        encoder_hidden_states=e["prompt_embeds"],
                        negative_encoder_hidden_states=e["negative_prompt_embeds"], progress=False)
    assert rel_err(got, want) <= 1e-5


def test_a_pixel_inpainting_unet_without_a_vae_is_refused_by_name(tmp_path):
    """A pixel UNet with 2C + 1 input channels loads as an inpainting network, which needs a VAE's encoder."""
    diffusers.UNet2DModel(sample_size=8, in_channels=7, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                          norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "UpBlock2D")).save_pretrained(tmp_path)
    pipe = fastdiff.load(str(tmp_path))
    assert pipe.spec.inpainting
    with pytest.raises(BadArgumentError, match="reads the masked image's VAE latents, and this pipeline has no VAE"):
        pipe.generate(image=torch.rand(1, 3, 8, 8), mask_image=torch.rand(1, 8, 8), steps=2, progress=False)


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_bench_times_an_inpainting_unet_against_diffusers_loop(sd_inpaint, tmp_path, cfg):
    """``fastdiff bench`` of an inpainting UNet: a random image and a centred mask, the masked image encoded in each
    call on both sides; the bench's diffusers loop equals StableDiffusionInpaintPipeline at strength 1 (one
    generator: the start noise, then the masked image's posterior), and the bench runs both sides."""
    import json

    from fastdiff.commands.bench_diffusers import (_diffusers_generate, _diffusers_inpaint_inputs,
                                                   build_diffusers_model, diffusers_vae)
    from fastdiff.commands.bench_inputs import _conditioning
    from fastdiff.inpaint import image_latents
    from test_cli import fastdiff as run_cli

    pipe, ref = _sd_pair(sd_inpaint, tmp_path / "model")
    spec = pipe.spec
    cond = _conditioning(spec, 2, cfg, 0, "cpu", torch.float32, pixels=pipe.vae.downscale)
    assert cond["image"].shape == (2, 3, 16, 16) and 0 < float(cond["mask"].mean()) < 1
    theirs = diffusers_vae(pipe.vae)
    with torch.no_grad():  # the extra input at the posterior's mean: fastdiff's own
        assert rel_err(_diffusers_inpaint_inputs(theirs, cond["image"], cond["mask"], (8, 8), None),
                       image_latents(pipe.vae, cond["image"], cond["mask"], None, (8, 8))) <= 1e-5
        unet, _ = build_diffusers_model(pipe)
        scheduler = diffusers.DDIMScheduler.from_config(SD_SCHEDULER)
        got = _diffusers_generate(unet, scheduler, spec, 2, 4, cfg, cond, "cpu", torch.float32, 0, vae=theirs)
    want = ref(prompt_embeds=cond["states"], negative_prompt_embeds=cond["negative_states"] if cfg != 1 else None,
               image=cond["image"], mask_image=cond["mask"], strength=1.0, num_inference_steps=4,
               guidance_scale=cfg, generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert rel_err(got, want) <= 1e-5
    r = run_cli("bench", str(tmp_path / "model"), "--compare", "diffusers", "--steps", "2", "--repeat", "1",
                "--warmup", "1", "--cfg", str(cfg), "--sampler", "ddim", "--json", "out.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "out.json").read_text())
    assert [row["status"] for row in rows["results"] + rows["compare"]] == ["ok", "ok"], rows


def test_bench_refuses_an_inpainting_unet_without_a_vae_encoder(tmp_path):
    from test_cli import fastdiff as run_cli

    folder, _, _ = unconditional_inpainting_folder(tmp_path, 9)
    r = run_cli("bench", folder, "--vae", "none", "--steps", "1", cwd=tmp_path)
    assert r.returncode == 2 and "an inpainting network without a VAE encoder" in r.stderr, r.stderr
    r = run_cli("bench", folder, "--steps", "1", "--repeat", "1", "--warmup", "1", cwd=tmp_path)  # (with its VAE)
    assert r.returncode == 0, r.stderr
