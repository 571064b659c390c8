import os
import re

import pytest

import fastdiff
from fastdiff.errors import StateDictMismatchError, UnsupportedConfigError


def test_mismatch_message_counts_and_names_first_keys():
    e = StateDictMismatchError(missing=[f"a{i}" for i in range(7)], unexpected=["zz"],
                               mismatched=[("w", (4, 3), (4, 2))])
    msg = str(e)
    assert "7 missing" in msg and "a0" in msg and "+2 more" in msg and "a6" not in msg
    assert "1 unexpected" in msg and "zz" in msg
    assert "expected (4, 3), found (4, 2)" in msg


def test_unsupported_config_names_field_and_value():
    msg = str(UnsupportedConfigError("act_fn", "gelu", supported=["silu"], model="UNet"))
    assert "act_fn" in msg and "'gelu'" in msg and "silu" in msg


@pytest.mark.parametrize("content,why", [
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:4d7a\nsize 3417600\n", "git-lfs pointer"),
    (b"<!DOCTYPE html><html><body>Access denied</body></html>", "looks like a text file"),
    (b"hello world, this is not a checkpoint\n" * 10, "expected a torch file"),
    (bytes(range(256)) * 16, "expected a torch file"),
])
def test_a_file_that_is_not_a_checkpoint_is_corrupt_not_unsafe(tmp_path, content, why):
    """Only a real pickle of Python objects is 'unsafe'; text, HTML, git-lfs pointers and random bytes are
    files that are not checkpoints, and say so."""
    from fastdiff.errors import CorruptCheckpointError

    path = tmp_path / "model.ckpt"
    path.write_bytes(content)
    with pytest.raises(CorruptCheckpointError, match=why):
        fastdiff.load(str(path))


@pytest.mark.parametrize("source,key,error", [
    # read while the architecture is inferred from the shapes, and while the keys are renamed
    (("ldm", "ldm_sd1_style.safetensors"), "model.diffusion_model.out.2.weight", "StateDictMismatchError"),
    (("ldm", "ldm_sd2_style.safetensors"), "model.diffusion_model.time_embed.0.bias", "StateDictMismatchError"),
    (("ldm", "ldm_sd1_style.safetensors"), "model.diffusion_model.input_blocks.0.0.bias", "StateDictMismatchError"),
    (("dit", "dit_tiny.pt"), "blocks.0.mlp.fc1.weight", "StateDictMismatchError"),
    (("guided_diffusion", "model.pt"), "input_blocks.1.0.emb_layers.1.weight", "StateDictMismatchError"),
    # the level count inferred from the remaining keys no longer fits the attention widths (was a reshape error)
    (("guided_diffusion", "model.pt"), "output_blocks.1.2.in_layers.0.weight", "CheckpointError"),
])
def test_a_checkpoint_missing_a_tensor_names_it(tmp_path, source, key, error):
    """A tensor missing from a real checkpoint is a CheckpointError naming it as the file spells it, wherever the
    converter first reads it (these were bare KeyErrors)."""
    import torch
    from safetensors.torch import load_file, save_file

    from conftest import fixture_path
    from fastdiff.errors import CheckpointError

    path = fixture_path(*source)
    state = load_file(path) if path.endswith(".safetensors") else torch.load(path, weights_only=True)
    del state[key]
    out = tmp_path / os.path.basename(path)
    save_file(state, str(out)) if path.endswith(".safetensors") else torch.save(state, str(out))
    with pytest.raises(CheckpointError, match=re.escape(key) if error != "CheckpointError" else "missing") as e:
        fastdiff.load(str(out))
    assert type(e.value).__name__ == error


UNET_CONFIG = {"_class_name": "UNet2DConditionModel", "block_out_channels": [32, 64], "layers_per_block": 1,
               "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "norm_num_groups": 8,
               "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 32, "attention_head_dim": 4}


@pytest.mark.parametrize("field,value,needle", [
    ("upcast_attention", "yes", "true / false"),      # was taken as True
    ("flip_sin_to_cos", "no", "true / false"),        # was taken as True
    ("norm_eps", "small", "a number"),                # was a TypeError inside the first forward pass
    ("freq_shift", None, "a number"),                 # ... likewise
    ("sample_size", [8, "a"], "an int or"),           # was a ValueError from int()
    ("block_out_channels", "320", "a list of ints"),
    ("layers_per_block", 0, "positive"),              # was an IndexError while building
    ("in_channels", -1, "positive"),                  # was a RuntimeError (negative dimension)
    ("attention_head_dim", None, "head count"),       # was a TypeError while building
    ("norm_eps", 0, "positive"),
    # (a model-fuzzing reviewer: it loaded, then every call was a shape error, in diffusers too)
    ("class_embeddings_concat", True, "without a class embedding"),
])
def test_a_malformed_unet_config_names_the_field(field, value, needle):
    from fastdiff.models.unet import UNet, UNetConfig

    assert UNet(UNetConfig.from_diffusers(dict(UNET_CONFIG)))  # the unmodified config builds
    with pytest.raises(UnsupportedConfigError, match=f"'{field}'") as e:
        UNetConfig.from_diffusers({**UNET_CONFIG, field: value})
    assert needle in str(e.value)


def test_class_embeddings_concat_with_an_addition_embedding_is_refused():
    from fastdiff.models.unet import UNetConfig

    sdxl_like = {**UNET_CONFIG, "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
                 "projection_class_embeddings_input_dim": 48 + 6 * 8, "num_class_embeds": 3}
    assert UNetConfig.from_diffusers(dict(sdxl_like))
    with pytest.raises(UnsupportedConfigError, match="'class_embeddings_concat'.*addition_embed_type 'text_time'"):
        UNetConfig.from_diffusers({**sdxl_like, "class_embeddings_concat": True})


def test_a_controlnet_with_simple_projection_is_refused_by_name():
    """diffusers' ControlNetModel builds no class embedding for it (no branch): refused by name, not a key mismatch."""
    from fastdiff.checkpoints.controlnet import controlnet_config

    config = {**UNET_CONFIG, "_class_name": "ControlNetModel", "class_embed_type": "simple_projection",
              "projection_class_embeddings_input_dim": 5}
    config.pop("up_block_types")
    with pytest.raises(UnsupportedConfigError, match="'class_embed_type' = 'simple_projection'.*builds no class"):
        controlnet_config(config)
    assert controlnet_config({**config, "class_embed_type": "projection"})


@pytest.mark.parametrize("make,field,value", [
    ("dit", "learn_sigma", "yes"), ("dit", "norm_eps", "1e-6"), ("dit", "mlp_ratio", None),
    ("edm", "dropout", "0.1"), ("edm", "channel_mult", [1, "2"]),
])
def test_a_malformed_dit_or_edm_config_names_the_field(make, field, value):
    from fastdiff.models.dit import DiTConfig
    from fastdiff.models.edm import EDMUNetConfig

    cls = DiTConfig if make == "dit" else EDMUNetConfig
    base = cls().to_dict()
    assert cls.from_dict(base)
    with pytest.raises(UnsupportedConfigError, match=f"'{field}'"):
        cls.from_dict({**base, field: value})


@pytest.mark.parametrize("padding,down_type,side", [(0, "conv", 4), (1, "resnet", 3)])
def test_latents_too_small_for_a_unets_levels_are_named(tmp_path, padding, down_type, side):
    """An unpadded strided conv or a ResBlock's average pool needs a 2x2 grid: below it generate() names the smallest
    latent size the network takes (torch's own error names a padded convolution or a pool); at it, it runs."""
    import torch
    from diffusers import UNet2DModel

    from fastdiff.errors import BadArgumentError

    UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=[8, 16, 16], layers_per_block=1,
                down_block_types=["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
                up_block_types=["AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"], norm_num_groups=4,
                attention_head_dim=8, downsample_padding=padding, downsample_type=down_type).save_pretrained(tmp_path)
    pipe = fastdiff.load(str(tmp_path), scheduler={"_class_name": "DDIMScheduler"})
    with pytest.raises(BadArgumentError, match=f"at least {side} latent pixels per side, found {side - 1}x{side + 2}"):
        pipe.generate(seed=1, steps=1, height=side - 1, width=side + 2, progress=False)
    with pytest.raises(RuntimeError):  # the rule is torch's: one pixel less fails inside the network itself
        pipe.model(torch.randn(1, 3, side - 1, side - 1), 10)
    assert pipe.generate(seed=1, steps=1, height=side, width=side, progress=False).shape == (1, 3, side, side)
