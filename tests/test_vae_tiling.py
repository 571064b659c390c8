"""Tiled and sliced VAE decoding / encoding (``enable_tiling`` / ``enable_slicing``) against diffusers' AutoencoderKL
with the same switches: odd sizes that leave partial tiles, several rows and columns of tiles, a batch."""

import pytest
import torch

from helpers import rel_err
from test_vae import CONFIGS, _reference
from test_vae_encoder import _native_with_encoder, _scaled

diffusers = pytest.importorskip("diffusers", reason="diffusers' AutoencoderKL is the reference")


def _pair(name: str, sample_size: int = 16):
    """A diffusers VAE and fastdiff's with its weights; tiles of ``sample_size`` pixels (8 latent pixels: the tiny
    VAE's scale is 2)."""
    ref = _reference(dict(CONFIGS[name], sample_size=sample_size))
    return ref, _native_with_encoder(ref)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("hw", [(13, 19), (8, 9), (24, 7)])
def test_tiled_decode_matches_diffusers(name, hw):
    ref, vae = _pair(name)
    ref.enable_tiling()
    vae.enable_tiling()
    z = torch.randn(2, ref.config.latent_channels, *hw, generator=torch.Generator().manual_seed(1))
    s, shift = ref.config.scaling_factor, ref.config.shift_factor or 0.0
    with torch.no_grad():
        want = ref.decode(z).sample.clamp(-1, 1)
        got = vae.decode(z * s - shift * s)
        ref.disable_tiling()
        whole = ref.decode(z).sample.clamp(-1, 1)
    assert got.shape == (2, 3, 2 * hw[0], 2 * hw[1])
    assert rel_err(got, want) <= 1e-5
    assert rel_err(got, whole) > 1e-4  # (the tiles' seams: tiling ran)


@pytest.mark.parametrize("name", ["sd", "sd3-flux"])
def test_tiled_encode_matches_diffusers(name):
    ref, vae = _pair(name)
    ref.enable_tiling()
    vae.enable_tiling()
    images = torch.rand(2, 3, 34, 22, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        want = _scaled(ref, ref.encode(images).latent_dist.mean)
        got = vae.encode(images)
        vae.disable_tiling()
        whole = vae.encode(images)
    assert got.shape == (2, ref.config.latent_channels, 17, 11)
    assert rel_err(got, want) <= 1e-5 and rel_err(got, whole) > 1e-4


def test_small_inputs_do_not_tile_and_slicing_changes_nothing():
    ref, vae = _pair("sd")
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(3))  # exactly one tile: decoded whole
    with torch.no_grad():
        whole = vae.decode(z)
        vae.enable_tiling()
        assert torch.equal(vae.decode(z), whole)
        vae.disable_tiling()
        vae.enable_slicing()
        calls = []
        vae.decoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
        sliced = vae.decode(z)
    assert calls == [1, 1, 1] and rel_err(sliced, whole) <= 1e-5  # (float kernels round by batch size)
    vae.tile_sample_min_size = 8  # (diffusers' attribute: 4 latent pixels a tile now)
    assert vae.tile_latent_min_size == 4 and vae.tile_sample_min_size == 8


def test_pipeline_decode_and_generate_output_use_the_vae_switches(tmp_path):
    """pipe.vae.enable_tiling() reaches every decode: generate(output_type=...) and pipe.decode."""
    from test_vae import _sdxl_folder

    import fastdiff

    _sdxl_folder(tmp_path)
    pipe = fastdiff.load(str(tmp_path))
    kw = dict(seeds=[1], steps=2, height=12, width=12, **_text(pipe), progress=False)
    latents = pipe.generate(**kw)
    whole = pipe.decode(latents)
    pipe.vae.tile_sample_min_size = 8
    pipe.vae.enable_tiling()
    tiled = pipe.decode(latents)
    assert tiled.shape == whole.shape and rel_err(tiled, whole) > 1e-4
    images = torch.from_numpy(pipe.generate(output_type="np", **kw)).permute(0, 3, 1, 2).float()  # (B, 3, H, W)
    assert (images - (tiled + 1) * 127.5).abs().max() <= 0.5 + 1e-3  # the tiled decode, rounded


def _text(pipe):
    spec = pipe.spec
    g = torch.Generator().manual_seed(0)
    return dict(encoder_hidden_states=torch.randn(1, 7, spec.cross_attention_dim, generator=g),
                text_embeds=torch.randn(1, spec.text_embeds_dim, generator=g))


def test_cli_vae_tiling(tmp_path):
    """``fastdiff generate --vae-tiling`` writes the tiled decode (the VAE's 8-pixel tiles: 4 latent pixels of the
    tiny DiT's 8); without a VAE it says so."""
    import numpy as np
    from PIL import Image

    import fastdiff
    from test_cli import fastdiff as run_cli
    from test_vae import SD_VAE

    _reference(dict(SD_VAE, sample_size=8)).save_pretrained(tmp_path / "vae")
    r = run_cli("generate", "arch:tiny-dit", "--vae", str(tmp_path / "vae"), "--vae-tiling", "--steps", "2", "--class",
                "3", "--separate", "-o", "out.png", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    pipe = fastdiff.load("arch:tiny-dit", vae=str(tmp_path / "vae"))
    kw = dict(seeds=[0], steps=2, class_labels=[3], output_type="np", progress=False)
    whole = pipe.generate(**kw)[0].astype(int)
    pipe.vae.enable_tiling()
    tiled = pipe.generate(**kw)[0].astype(int)
    got = np.asarray(Image.open(tmp_path / "out_0.png")).astype(int)
    assert np.abs(got - tiled).max() <= 1 and np.abs(got - whole).max() > 1
    r = run_cli("generate", "arch:tiny-dit", "--vae-tiling", "--steps", "1", "--class", "3", "--output-latents",
                "x.safetensors", cwd=tmp_path)
    assert r.returncode == 2 and "--vae-tiling" in r.stderr


def test_half_precision_tiles_blend_as_diffusers_rounds_them():
    """In float16 each blend product is rounded before the sum, as diffusers' per-row arithmetic rounds it: bit-equal
    (a single rounding after float32 math was one float16 step off); tile_latent_min_size is settable too."""
    ref, vae = _pair("sd")
    ref, vae = ref.half(), vae.half()
    ref.enable_tiling()
    vae.enable_tiling()
    # (a pair whose strides agree, 24 / 12 at the scale of 2: 12 / 6 would keep 9 pixels a tile for a stride of 8, a
    # larger image than the latents', in diffusers as here)
    ref.tile_sample_min_size, ref.tile_latent_min_size = 24, 12
    vae.tile_sample_min_size, vae.tile_latent_min_size = 24, 12
    z = torch.randn(1, 4, 29, 23, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = ref.decode(z.half()).sample.float().clamp(-1, 1)
        got = vae.decode(z * ref.config.scaling_factor)
    assert vae.tile_latent_min_size == 12 and got.shape == (1, 3, 58, 46) and torch.equal(got, want)
