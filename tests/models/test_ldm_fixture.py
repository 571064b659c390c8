"""Stable Diffusion single files (ldm UNetModel, SD1 conv and SD2 linear projections) vs the official outputs."""

import os

import pytest
import torch
from safetensors.torch import load_file

import fastdiff

FIXTURES = os.environ.get("FASTDIFF_FIXTURES",
                          os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "fixtures"))
LDM = os.path.join(FIXTURES, "ldm")


@pytest.fixture(scope="module")
def ref():
    if not os.path.isdir(LDM):
        pytest.skip(f"reference fixture {LDM} not present")
    return load_file(os.path.join(LDM, "reference.safetensors"))


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_ldm_single_file_matches_official(ref, style):
    pipe = fastdiff.load(os.path.join(LDM, f"ldm_{style}_style.safetensors"), num_heads=4)  # config.json: 4 x 8
    assert pipe.model.config.use_linear_projection == (style == "sd2")
    with torch.no_grad():
        out = pipe.model(ref["x"], ref["timesteps"], encoder_hidden_states=ref["context"])
    torch.testing.assert_close(out, ref[f"{style}_style_eps"], rtol=1e-5, atol=2e-5)


def test_ldm_default_heads_follow_sd_conventions(ref):
    cfg = fastdiff.load(os.path.join(LDM, "ldm_sd1_style.safetensors")).model.config
    assert cfg.num_attention_heads == [8, 8]  # SD 1.x: 8 heads whatever the width
    cfg2 = fastdiff.load(os.path.join(LDM, "ldm_sd2_style.safetensors")).model.config
    assert cfg2.num_attention_heads == [1, 1]  # SD 2.x: 64 channels per head (32 channels -> 1 head)


def test_bare_ldm_unet_state_dict_is_recognised(ref, tmp_path):
    """A UNet saved without the model.diffusion_model. prefix is still an SD UNet (not guided-diffusion)."""
    from safetensors.torch import save_file

    state = load_file(os.path.join(LDM, "ldm_sd1_style.safetensors"))
    bare = {k[len("model.diffusion_model."):]: v for k, v in state.items()}
    save_file(bare, str(tmp_path / "unet.safetensors"))
    pipe = fastdiff.load(str(tmp_path / "unet.safetensors"), num_heads=4)
    with torch.no_grad():
        out = pipe.model(ref["x"], ref["timesteps"], encoder_hidden_states=ref["context"])
    torch.testing.assert_close(out, ref["sd1_style_eps"], rtol=1e-5, atol=2e-5)
