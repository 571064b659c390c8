"""VAE decoders (the decoder half of diffusers' AutoencoderKL): the native decoder against diffusers' decode, a
pipeline folder's vae/ and a single file's first_stage_model loaded with the network, and generate() decoding
latents for "np" / "pil" as diffusers' pipelines do."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import fastdiff
from fastdiff.errors import BadArgumentError, CheckpointError
from fastdiff.models.vae import VAEConfig, VAEDecoder
from helpers import diffusers_pipeline, perturb_, rel_err

diffusers = pytest.importorskip("diffusers", reason="diffusers' AutoencoderKL is the reference")

SD_VAE = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
              up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8)
CONFIGS = {
    "sd": SD_VAE,  # 4 latent channels, quant convs, mid-block attention
    "sd3-flux": dict(SD_VAE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                     scaling_factor=1.5305, shift_factor=0.0609),
    "no-mid-attention": dict(SD_VAE, mid_block_add_attention=False, layers_per_block=2),
}


def _reference(cfg, seed=0):
    torch.manual_seed(seed)
    return perturb_(diffusers.AutoencoderKL(**cfg).eval(), seed)


def _decoder_half(ref) -> dict:
    return {k: v for k, v in ref.state_dict().items() if k.startswith(("decoder.", "post_quant_conv."))}


def _native(ref) -> VAEDecoder:
    vae = VAEDecoder(VAEConfig.from_diffusers(dict(ref.config, _class_name="AutoencoderKL")))
    vae.load_state_dict(_decoder_half(ref), strict=True)
    return vae.eval()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_decoder_matches_diffusers(name):
    ref = _reference(CONFIGS[name])
    vae = _native(ref)
    z = torch.randn(2, ref.config.latent_channels, 5, 7)  # odd latent sizes
    with torch.no_grad():
        want = ref.decode(z).sample
        got = vae(z)
        s, shift = ref.config.scaling_factor, ref.config.shift_factor or 0.0
        scaled = vae.decode(z * s - shift * s)
    assert got.shape == (2, 3, 10, 14) and rel_err(got, want) <= 1e-5
    assert rel_err(scaled, want.clamp(-1, 1)) <= 1e-5  # decode() undoes the pipelines' latent scaling


def _sdxl_folder(tmp_path, vae_cfg=SD_VAE):
    """An SDXL-style pipeline folder (tests/test_sdxl.py's tiny UNet) with a real vae/."""
    from test_sdxl import UNET

    torch.manual_seed(0)
    unet = perturb_(diffusers.UNet2DConditionModel(**UNET).eval(), 0)
    vae = _reference(dict(vae_cfg, scaling_factor=0.13025))
    sched = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                             steps_offset=1, timestep_spacing="leading")
    unet.save_pretrained(tmp_path / "unet")
    vae.save_pretrained(tmp_path / "vae")
    sched.save_pretrained(tmp_path / "scheduler")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    return unet, vae, sched


@pytest.mark.parametrize("stats", [False, True])
def test_a_pipeline_folder_decodes_like_diffusers_sdxl_pipeline(tmp_path, stats):
    """(stats: a VAE with per-channel latents_mean / latents_std, as Playground v2.5's, which SDXL's pipelines read)"""
    vae_cfg = dict(SD_VAE, latents_mean=[0.3, -0.2, 0.1, 0.5], latents_std=[0.8, 1.3, 0.6, 1.1]) if stats else SD_VAE
    unet, vae, sched = _sdxl_folder(tmp_path, vae_cfg)
    pipe = fastdiff.load(str(tmp_path))
    assert pipe.vae is not None and pipe.vae.config.scaling_factor == 0.13025
    parts = dict(text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None)
    ref = diffusers_pipeline("StableDiffusionXLPipeline")(vae=vae, unet=unet, scheduler=sched, **parts)
    ref.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(1)
    e = dict(prompt_embeds=torch.randn(2, 5, 12, generator=g), pooled_prompt_embeds=torch.randn(2, 10, generator=g),
             latents=torch.randn(2, 4, 8, 8, generator=g))
    # (the image's size: 8 latent pixels of this tiny VAE's 2; the default time ids read it)
    want = ref(**{k: v.clone() for k, v in e.items()}, num_inference_steps=3, guidance_scale=1.0, height=16, width=16,
               output_type="pt").images  # decoded, in [0, 1]
    got = pipe.generate(latents=e["latents"], steps=3, encoder_hidden_states=e["prompt_embeds"],
                        text_embeds=e["pooled_prompt_embeds"], output_type="np", progress=False)
    assert got.shape == (2, 16, 16, 3) and got.dtype == np.uint8
    ref_u8 = (want * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.abs(got.astype(int) - ref_u8.astype(int)).max() <= 1  # the same image, up to rounding
    images = pipe.generate(latents=e["latents"], steps=3, encoder_hidden_states=e["prompt_embeds"],
                           text_embeds=e["pooled_prompt_embeds"], output_type="pil", progress=False)
    assert [im.size for im in images] == [(16, 16)] * 2
    latents = pipe.generate(latents=e["latents"], steps=3, encoder_hidden_states=e["prompt_embeds"],
                            text_embeds=e["pooled_prompt_embeds"], progress=False)
    assert latents.shape == (2, 4, 8, 8)  # "tensor" keeps the latents, as diffusers' output_type="latent"
    assert rel_err((pipe.decode(latents) + 1) / 2, want) <= 1e-4


def test_vae_false_and_a_separate_vae_folder(tmp_path):
    _sdxl_folder(tmp_path / "pipe")
    assert fastdiff.load(str(tmp_path / "pipe"), vae=False).vae is None
    other = _reference(dict(SD_VAE, scaling_factor=0.18215), seed=3)
    other.save_pretrained(tmp_path / "sd-vae")
    dit = fastdiff.load("arch:tiny-dit", vae=str(tmp_path / "sd-vae"))  # DiT + an sd-vae-ft-* decoder
    images = dit.generate(seeds=[1, 2], steps=2, class_labels=[1, 2], output_type="pil", progress=False)
    assert [im.size for im in images] == [(16, 16)] * 2 and images[0].mode == "RGB"
    with pytest.raises(CheckpointError, match="AutoencoderKL folder"):
        fastdiff.load("arch:tiny-dit", vae=str(tmp_path / "pipe"))
    with pytest.raises(BadArgumentError, match="no VAE decoder"):
        fastdiff.load("arch:tiny-dit").decode(torch.zeros(1, 4, 8, 8))


def vae_to_single_file(state: dict, levels: int) -> dict:
    """A diffusers AutoencoderKL (both halves, or the decoder alone) in the ldm single-file layout
    (first_stage_model.*)."""
    out = {}
    res = {"conv_shortcut": "nin_shortcut"}
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for key, t in state.items():
        half = key.split(".")[0]
        new = key.replace(f"{half}.conv_norm_out.", f"{half}.norm_out.")
        if ".mid_block.resnets." in key:
            i = int(key.split(".")[3])
            new = key.replace(f"{half}.mid_block.resnets.{i}.", f"{half}.mid.block_{i + 1}.")
        elif ".mid_block.attentions.0." in key:
            rest = key[len(f"{half}.mid_block.attentions.0."):]
            name, param = rest.rsplit(".", 1)
            new = f"{half}.mid.attn_1.{attn[name]}.{param}"
            if t.dim() == 2:
                t = t[:, :, None, None]
        elif key.startswith(("decoder.up_blocks.", "encoder.down_blocks.")):
            parts = key.split(".")
            level = levels - 1 - int(parts[2]) if half == "decoder" else int(parts[2])
            blocks = "up" if half == "decoder" else "down"
            if parts[3] == "resnets":
                new = f"{half}.{blocks}.{level}.block.{parts[4]}.{res.get(parts[5], parts[5])}.{parts[6]}"
            else:
                new = f"{half}.{blocks}.{level}.{blocks}sample.conv.{parts[-1]}"
        out["first_stage_model." + new] = t
    return out


def test_a_single_files_first_stage_model_is_its_vae(tmp_path):
    from fastdiff.checkpoints.vae import ldm_vae

    single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils",
                                            reason="diffusers' single-file converter checks the renaming")
    ref = _reference(dict(SD_VAE, norm_num_groups=32))  # (single files always use 32 groups)
    single = vae_to_single_file(_decoder_half(ref), 2)
    back = single_file_utils.convert_ldm_vae_checkpoint(dict(single), dict(ref.config))
    # the renaming is diffusers'
    assert all(torch.equal(back[k].reshape(v.shape), v) for k, v in _decoder_half(ref).items())
    vae = ldm_vae(single, "sd")
    assert (vae.config.scaling_factor, vae.config.block_out_channels, vae.config.layers_per_block) == (0.18215,
                                                                                                       (32, 64), 1)
    z = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        assert rel_err(vae(z), ref.decode(z).sample) <= 1e-5
    # with the UNet of the ldm fixture: fastdiff.load attaches it
    from conftest import fixture_path
    from safetensors.torch import load_file

    state = dict(load_file(fixture_path("ldm", "ldm_sd1_style.safetensors")), **single)
    save_file(state, str(tmp_path / "sd.safetensors"))
    pipe = fastdiff.load(str(tmp_path / "sd.safetensors"), num_heads=4)
    assert pipe.vae is not None and any("first_stage_model" in n for n in pipe.spec.notes)
    # its sample_size (enable_tiling's tiles) is the model's image size, as diffusers' single-file loader sets it
    assert pipe.vae.config.sample_size == pipe.spec.sample_size[0] * pipe.vae.downscale
    with torch.no_grad():
        assert rel_err(pipe.vae(z), ref.decode(z).sample) <= 1e-5


def test_cli_generate_writes_images_of_a_latent_model_with_a_vae(tmp_path):
    """``fastdiff generate arch:tiny-dit --vae FOLDER`` decodes to PNGs equal to the Python API's; without a VAE
    the command says what to pass."""
    from PIL import Image

    from test_cli import fastdiff as run_cli

    _reference(dict(SD_VAE, scaling_factor=0.18215), seed=3).save_pretrained(tmp_path / "vae")
    r = run_cli("generate", "arch:tiny-dit", "--vae", str(tmp_path / "vae"), "--steps", "2", "--n", "2", "--class",
                "3", "--separate", "-o", "out.png", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    got = np.asarray(Image.open(tmp_path / "out_1.png"))
    want = fastdiff.load("arch:tiny-dit", vae=str(tmp_path / "vae")).generate(
        seeds=[0, 1], steps=2, class_labels=[3, 3], output_type="np", progress=False)[1]
    assert got.shape == (16, 16, 3) and np.abs(got.astype(int) - want.astype(int)).max() <= 1
    r = run_cli("generate", "arch:tiny-dit", "--steps", "1", "--class", "3", "-o", "x.png", cwd=tmp_path)
    assert r.returncode == 2 and "--vae FOLDER" in r.stderr


def test_save_keeps_the_vae(tmp_path):
    _reference(dict(SD_VAE, scaling_factor=0.18215), seed=3).save_pretrained(tmp_path / "vae")
    pipe = fastdiff.load("arch:tiny-dit", vae=str(tmp_path / "vae"))
    pipe.save(str(tmp_path / "saved"))
    assert sorted(os.listdir(tmp_path / "saved")) == ["fastdiff.json", "model.safetensors", "vae.safetensors"]
    again = fastdiff.load(str(tmp_path / "saved"))
    kw = dict(seeds=[1], steps=2, class_labels=[4], output_type="np", progress=False)
    assert again.vae.config.scaling_factor == 0.18215
    assert np.array_equal(again.generate(**kw), pipe.generate(**kw))
    pipe.save(str(tmp_path / "saved"))  # an earlier save (with its VAE) may be replaced


@pytest.mark.parametrize("dynamic_hw", [True, False])
def test_the_decoder_exports_to_onnx(tmp_path, dynamic_hw):
    """The decode stage as an ONNX graph: the sampler's latents in (scaling inside), images in [-1, 1] out."""
    ort = pytest.importorskip("onnxruntime", reason="ONNX Runtime runs the exported graph")
    from fastdiff.export.vae_onnx import export_vae_onnx

    # (FLUX.1's scaling and shift; the tiny transformer's 4 latent channels)
    _reference(dict(CONFIGS["sd3-flux"], latent_channels=4), seed=5).save_pretrained(tmp_path / "vae")
    pipe = fastdiff.load("arch:tiny-flux", vae=str(tmp_path / "vae"))
    res = export_vae_onnx(pipe, str(tmp_path / "vae.onnx"), dynamic_hw=dynamic_hw, height=6, width=8)
    assert res.max_rel_err is not None and res.max_rel_err <= 1e-5
    session = ort.InferenceSession(res.path, providers=["CPUExecutionProvider"])
    z = torch.randn(3, 4, 6, 8)
    got = session.run(None, {"latents": z.numpy()})[0]
    assert got.shape == (3, 3, 12, 16) and rel_err(torch.from_numpy(got), pipe.decode(z)) <= 1e-5
    if dynamic_hw:
        z = torch.randn(1, 4, 10, 4)  # another latent size
        assert rel_err(torch.from_numpy(session.run(None, {"latents": z.numpy()})[0]), pipe.decode(z)) <= 1e-5
    with pytest.raises(BadArgumentError, match="VAE decoder"):
        export_vae_onnx(fastdiff.load("arch:tiny-flux"), str(tmp_path / "x.onnx"))


def test_cli_exports_the_vae_decoder(tmp_path):
    pytest.importorskip("onnxruntime", reason="the export's parity check runs ONNX Runtime")
    from test_cli import fastdiff as run_cli

    _reference(dict(SD_VAE, scaling_factor=0.18215), seed=3).save_pretrained(tmp_path / "vae")
    r = run_cli("export", "arch:tiny-dit", "--vae", str(tmp_path / "vae"), "--component", "vae", "--format", "onnx",
                "-o", "vae.onnx", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "vae.onnx").is_file() and "parity check: max abs error" in r.stdout
    r = run_cli("export", "arch:tiny-dit", "--component", "vae", "--format", "onnx", "-o", "x.onnx", cwd=tmp_path)
    assert r.returncode == 2 and "VAE decoder" in r.stderr and not (tmp_path / "x.onnx").exists()
    r = run_cli("export", "arch:tiny-dit", "--vae", str(tmp_path / "vae"), "--component", "vae", "--format",
                "tensorrt", "--fp16-io", "-o", "x.engine", cwd=tmp_path)
    assert r.returncode == 2 and "--format tensorrt, --fp16-io apply to the network export only" in r.stderr


def test_old_attention_names_and_opting_out_of_a_broken_vae(tmp_path):
    """VAE folders saved before diffusers 0.14 name the mid attention query / key / value / proj_attn (sd-vae-ft-*,
    SD 1.x / 2.x folders): loaded as diffusers loads them. A checkpoint's own VAE that cannot be read is a note, and
    vae=False / vae=PATH never read it."""
    from safetensors.torch import load_file

    ref = _reference(dict(SD_VAE, scaling_factor=0.18215), seed=3)
    ref.save_pretrained(tmp_path / "vae")
    weights = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    old = {k.replace("attentions.0.to_q.", "attentions.0.query.").replace("attentions.0.to_k.", "attentions.0.key.")
           .replace("attentions.0.to_v.", "attentions.0.value.").replace("attentions.0.to_out.0.",
                                                                       "attentions.0.proj_attn."): v
           for k, v in load_file(str(weights)).items()}
    assert any(".query." in k for k in old)
    save_file(old, str(weights))
    pipe = fastdiff.load("arch:tiny-dit", vae=str(tmp_path / "vae"))
    z = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        assert rel_err(pipe.vae(z), ref.decode(z).sample) <= 1e-5
    # a pipeline folder whose vae/ fastdiff cannot read (an activation it does not implement): the network still
    # loads
    _sdxl_folder(tmp_path / "pipe")
    cfg_path = tmp_path / "pipe" / "vae" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["act_fn"] = "gelu"
    cfg_path.write_text(json.dumps(cfg))
    auto = fastdiff.load(str(tmp_path / "pipe"))
    assert auto.vae is None and any("VAE decoder not loaded" in n for n in auto.spec.notes)
    assert fastdiff.load(str(tmp_path / "pipe"), vae=str(tmp_path / "vae")).vae is not None
    assert not any("VAE" in n for n in fastdiff.load(str(tmp_path / "pipe"), vae=False).spec.notes)


def test_fp16_export_of_a_vae_that_needs_float32_is_refused(tmp_path):
    pytest.importorskip("onnxruntime", reason="the export's parity check runs ONNX Runtime")
    from fastdiff.export.vae_onnx import export_vae_onnx

    _reference(dict(SD_VAE, force_upcast=True), seed=3).save_pretrained(tmp_path / "vae")
    pipe = fastdiff.load("arch:tiny-dit", vae=str(tmp_path / "vae"))
    with pytest.raises(BadArgumentError, match="force_upcast"):
        export_vae_onnx(pipe, str(tmp_path / "x.onnx"), dtype="fp16")
    for name, value in (("batch", 0), ("batch", -1), ("batch", True), ("height", 0), ("width", 2.5)):
        with pytest.raises(BadArgumentError, match=f"{name} must be a positive int"):
            export_vae_onnx(pipe, str(tmp_path / "x.onnx"), **{name: value})
    assert not (tmp_path / "x.onnx").exists()


def test_engine_can_resolve_requests_to_images(tmp_path):
    _reference(dict(SD_VAE, scaling_factor=0.18215), seed=3).save_pretrained(tmp_path / "vae")
    pipe = fastdiff.load("arch:tiny-dit", vae=str(tmp_path / "vae"))
    with fastdiff.Engine(pipe, max_batch=4, max_wait_ms=50, decode=True) as engine:
        futures = [engine.submit(seed=s, class_label=s, steps=2) for s in (1, 2, 3)]
        images = [f.result(timeout=60) for f in futures]
    for s, image in zip((1, 2, 3), images):
        want = pipe.decode(pipe.generate(seeds=[s], class_labels=[s], steps=2, progress=False))[0]
        assert image.shape == (3, 16, 16) and rel_err(image, want) <= 1e-5
    with pytest.raises(BadArgumentError, match="no VAE decoder"):
        fastdiff.Engine(fastdiff.load("arch:tiny-dit"), decode=True)


def test_info_names_the_vae(tmp_path):
    from test_cli import fastdiff as run_cli

    _reference(dict(SD_VAE, scaling_factor=0.18215), seed=3).save_pretrained(tmp_path / "vae")
    r = run_cli("info", "arch:tiny-dit", "--vae", str(tmp_path / "vae"), cwd=tmp_path)
    want = "arch:tiny-dit VAE: AutoencoderKL decoder and encoder (image-to-image), 4 latent channels, scaling 0.18215"
    assert r.returncode == 0 and want in r.stdout, r.stderr
    r = run_cli("info", "arch:tiny-dit", cwd=tmp_path)
    assert "VAE: none (latents only: pass --vae FOLDER for images)" in r.stdout


def test_decode_refuses_what_would_be_a_raw_error_or_a_black_image(tmp_path):
    """decode() of a NumPy array, an empty batch, or NaN latents (one NaN blackens the whole image, silently) is
    refused by name; a latent model without a VAE refuses output_type='np' before sampling, as it refuses 'pil'; a
    VAE whose latent channels are not the network's is refused at load."""
    _reference(SD_VAE).save_pretrained(tmp_path / "vae")
    _reference(dict(SD_VAE, latent_channels=8, norm_num_groups=8)).save_pretrained(tmp_path / "vae8")
    pipe = fastdiff.load("arch:tiny-dit", vae=str(tmp_path / "vae"))
    z = torch.randn(1, 4, 4, 4)
    for bad, match in ((z.numpy(), "found ndarray"), (z[:0], r"found \(0, 4, 4, 4\)"),
                       (torch.zeros(1, 4, 0, 0), r"found \(1, 4, 0, 0\)"),
                       (z.index_put((torch.tensor([0]),) * 4, torch.tensor(float("nan"))), "NaN or inf")):
        with pytest.raises(BadArgumentError, match=match):
            pipe.decode(bad)
    bare = fastdiff.load("arch:tiny-dit")
    for output_type in ("np", "pil"):
        with pytest.raises(BadArgumentError, match=f"output_type='{output_type}': images of a latent model"):
            bare.generate(class_labels=[1], steps=1, output_type=output_type, progress=False)
    with pytest.raises(BadArgumentError, match="vae: its latents have 8 channels and this dit network samples 4"):
        fastdiff.load("arch:tiny-dit", vae=str(tmp_path / "vae8"))
    with pytest.raises(BadArgumentError, match=r"a pixel model: it takes no VAE"):
        fastdiff.load("arch:tiny-unet", vae=str(tmp_path / "vae"))


def test_a_network_with_conditioning_channels_keeps_its_vae(tmp_path):
    """InstructPix2Pix's UNet takes 8 channels (4 latents + 4 image latents) and samples 4: its 4-channel VAE is its
    own (the latent-channel check read the 8 and refused the folder)."""
    from test_img2img import _folder

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(sample_size=8, in_channels=8, out_channels=4, block_out_channels=(16, 32),
                                          layers_per_block=1, cross_attention_dim=8, attention_head_dim=4,
                                          down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8)
    folder = _folder(tmp_path, "unet", unet, diffusers.DDIMScheduler(), _reference(SD_VAE),
                     "StableDiffusionInstructPix2PixPipeline")
    pipe = fastdiff.load(folder)
    assert pipe.spec.in_channels == 8 and pipe.vae is not None
