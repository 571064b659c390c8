"""The VAE's encoder half (diffusers' AutoencoderKL encoder + quant_conv): images -> the latents img2img starts from,
against diffusers' ``encode`` and ``latent_dist``; kept by every VAE source that carries it, refused where none is."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import fastdiff
from fastdiff.errors import BadArgumentError, UnsupportedConfigError
from fastdiff.models.vae import VAEConfig, VAEDecoder
from fastdiff.noise import NoiseSource
from helpers import rel_err
from test_vae import CONFIGS, SD_VAE, _reference, vae_to_single_file

diffusers = pytest.importorskip("diffusers", reason="diffusers' AutoencoderKL is the reference")


def _native_with_encoder(ref) -> VAEDecoder:
    vae = VAEDecoder(VAEConfig.from_diffusers(dict(ref.config, _class_name="AutoencoderKL")), with_encoder=True)
    vae.load_state_dict(ref.state_dict(), strict=True)  # diffusers' names, both halves
    return vae.eval()


def _scaled(ref, z):
    return (z - (ref.config.shift_factor or 0.0)) * ref.config.scaling_factor


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_encoder_matches_diffusers(name):
    ref = _reference(CONFIGS[name])
    vae = _native_with_encoder(ref)
    images = torch.rand(2, 3, 10, 14) * 2 - 1  # sizes a multiple of the downscale (2) but not of 4
    seeds = [5, 9]
    with torch.no_grad():
        dist = ref.encode(images).latent_dist
        mean = vae.encode(images)  # noise=None: the posterior's mean (diffusers' sample_mode="argmax")
        sampled = vae.encode(images, noise=NoiseSource(seeds))
        # diffusers' img2img pipelines draw each sample's posterior from its own generator
        want = torch.cat([ref.encode(images[i:i + 1]).latent_dist.sample(torch.Generator().manual_seed(s))
                          for i, s in enumerate(seeds)])
    assert mean.shape == (2, ref.config.latent_channels, 5, 7)
    assert rel_err(mean, _scaled(ref, dist.mean)) <= 1e-5
    assert rel_err(sampled, _scaled(ref, want)) <= 1e-5
    assert rel_err(sampled, mean) > 1e-3  # the draw is not the mean


def test_a_folder_keeps_its_encoder_and_a_decoder_only_file_refuses_to_encode(tmp_path):
    ref = _reference(SD_VAE)
    ref.save_pretrained(tmp_path / "full")
    full = fastdiff.load("arch:tiny-dit", vae=str(tmp_path / "full")).vae
    images = torch.rand(1, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        assert rel_err(full.encode(images), _scaled(ref, ref.encode(images).latent_dist.mean)) <= 1e-5
    # decoder-only weights (what fastdiff wrote before it kept encoders): loads, decodes, refuses to encode
    ref.save_pretrained(tmp_path / "decoder-only")
    weights = tmp_path / "decoder-only" / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items() if k.startswith(("decoder.", "post_quant"))},
              str(weights))
    half = fastdiff.load("arch:tiny-dit", vae=str(tmp_path / "decoder-only")).vae
    assert half.encoder is None and half.quant_conv is None
    with pytest.raises(BadArgumentError, match="no encoder"):
        half.encode(images)


def test_bad_images_are_refused_by_shape():
    vae = _native_with_encoder(_reference(SD_VAE))
    for bad in (torch.zeros(3, 8, 8), torch.zeros(1, 4, 8, 8), torch.zeros(1, 3, 9, 8)):
        with pytest.raises(BadArgumentError, match=r"expected \(B, 3, H, W\) with H and W multiples of 2"):
            vae.encode(bad)


def test_an_encoder_of_other_block_types_is_refused():
    config = VAEConfig(**dict(SD_VAE, down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D")))
    VAEDecoder(config)  # the decoder alone does not read them
    with pytest.raises(UnsupportedConfigError, match="down_block_types"):
        VAEDecoder(config, with_encoder=True)


def test_a_single_files_first_stage_model_carries_its_encoder():
    from fastdiff.checkpoints.vae import ldm_vae

    single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils",
                                            reason="diffusers' single-file converter checks the renaming")
    ref = _reference(dict(SD_VAE, norm_num_groups=32, layers_per_block=2))
    single = vae_to_single_file(ref.state_dict(), 2)
    back = single_file_utils.convert_ldm_vae_checkpoint(dict(single), dict(ref.config))
    # the encoder's renaming is diffusers' own
    assert all(torch.equal(back[k].reshape(v.shape), v) for k, v in ref.state_dict().items())
    vae = ldm_vae(single, "sd")
    assert vae.encoder is not None and vae.config.use_quant_conv
    images = torch.rand(2, 3, 6, 10) * 2 - 1
    with torch.no_grad():
        assert rel_err(vae.encode(images), _scaled(ref, ref.encode(images).latent_dist.mean)) <= 1e-5


def test_save_keeps_the_encoder(tmp_path):
    _reference(SD_VAE, seed=2).save_pretrained(tmp_path / "vae")
    pipe = fastdiff.load("arch:tiny-dit", vae=str(tmp_path / "vae"))
    pipe.save(str(tmp_path / "saved"))
    again = fastdiff.load(str(tmp_path / "saved")).vae
    images = torch.rand(1, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        assert np.array_equal(again.encode(images).numpy(), pipe.vae.encode(images).numpy())
