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
def ldm():
    """The fixture folder (the test skips, naming it, where it is not present)."""
    if not os.path.isdir(LDM):
        pytest.skip(f"reference fixture {LDM} not present (set FASTDIFF_FIXTURES)")
    return LDM


@pytest.fixture(scope="module")
def ref(ldm):
    return load_file(os.path.join(ldm, "reference.safetensors"))


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


def _sd2_wide_state(tmp_path):
    """The SD2-style fixture with 1024-wide text-state projections (OpenCLIP's width), as a real SD 2.x has."""
    state = load_file(os.path.join(LDM, "ldm_sd2_style.safetensors"))
    g = torch.Generator().manual_seed(0)
    for k in list(state):
        if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")):
            state[k] = torch.randn(state[k].shape[0], 1024, generator=g) * 0.02
    return state


@pytest.mark.parametrize("global_step, prediction, latent", [
    (875000, "epsilon", 64),  # the SD 2.x 512 base model
    (110000, "v_prediction", 96),  # any other SD 2.x file: the 768 v-model
    (None, "v_prediction", 96),
])
def test_sd2_single_file_sampling_defaults_follow_diffusers(ldm, tmp_path, global_step, prediction, latent):
    ckpt = {"state_dict": _sd2_wide_state(tmp_path)}
    if global_step is not None:
        ckpt["global_step"] = global_step
    path = tmp_path / "sd2.ckpt"
    torch.save(ckpt, str(path))
    pipe = fastdiff.load(str(path))
    assert pipe.spec.prediction_type == prediction and pipe.spec.scheduler["prediction_type"] == prediction
    assert tuple(pipe.spec.sample_size) == (latent, latent)
    assert any("SD 2.x single file" in n for n in pipe.notes)
    forced = fastdiff.load(str(path), prediction_type="epsilon")
    assert forced.spec.prediction_type == "epsilon" and forced.spec.scheduler["prediction_type"] == "epsilon"


def test_sd1_single_file_is_epsilon_at_512(ldm):
    pipe = fastdiff.load(os.path.join(LDM, "ldm_sd1_style.safetensors"))
    assert pipe.spec.prediction_type == "epsilon" and tuple(pipe.spec.sample_size) == (64, 64)


def test_sd2_single_file_with_a_scheduler_keeps_one_prediction_type(ldm, tmp_path):
    """scheduler= without a prediction_type field: every plan uses the type the checkpoint implies."""
    path = tmp_path / "sd2.ckpt"
    torch.save({"state_dict": _sd2_wide_state(tmp_path)}, str(path))
    sched = {"_class_name": "DPMSolverMultistepScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
             "beta_end": 0.012, "num_train_timesteps": 1000}
    pipe = fastdiff.load(str(path), scheduler=sched)
    assert pipe.spec.prediction_type == pipe.spec.scheduler["prediction_type"] == "v_prediction"
    assert pipe.plan(4).make_denoiser(pipe.runner).prediction_type == "v_prediction"  # scheduler-config plan
    assert pipe.plan(4, "dpmpp_2m").make_denoiser(pipe.runner).prediction_type == "v_prediction"
    eps = fastdiff.load(str(path), scheduler=dict(sched, prediction_type="epsilon"))  # the scheduler says so
    assert eps.spec.prediction_type == "epsilon"
