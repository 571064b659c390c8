"""openai/guided-diffusion (ADM, resblock_updown, legacy attention) vs the official outputs."""

import os

import pytest
import torch
from safetensors.torch import load_file

import fastdiff

FIXTURES = os.environ.get("FASTDIFF_FIXTURES",
                          os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "fixtures"))
GD = os.path.join(FIXTURES, "guided_diffusion")


def ddim10(schedule):
    """create_gaussian_diffusion(timestep_respacing="ddim10"): DDIM on t = 900 ... 0, clip_denoised=True."""
    return {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": schedule,
            "beta_start": 0.0001, "beta_end": 0.02, "clip_sample": True, "set_alpha_to_one": True,
            "steps_offset": 0, "timestep_spacing": "leading", "prediction_type": "epsilon"}


@pytest.fixture(scope="module")
def ref():
    if not os.path.isdir(GD):
        pytest.skip(f"reference fixture {GD} not present")
    return load_file(os.path.join(GD, "reference.safetensors"))


def load(schedule="squaredcos_cap_v2"):
    # config.json: num_head_channels=16
    return fastdiff.load(os.path.join(GD, "model.pt"), head_channels=16, scheduler=ddim10(schedule))


def test_forward_matches_official(ref):
    pipe = load()
    assert pipe.spec.learned_variance and pipe.model.config.resnet_time_scale_shift == "scale_shift"
    with torch.no_grad():
        out = pipe.model(ref["x"], ref["t"], class_labels=ref["y"])
    torch.testing.assert_close(out, ref["out"], rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("schedule,prefix,atol", [("squaredcos_cap_v2", "ddim", 1e-4),
                                                  ("linear", "ddim_linear", 3e-4)])
def test_ddim_sampling_matches_official(ref, schedule, prefix, atol):
    pipe = load(schedule)
    out = pipe.generate(latents=ref["ddim_noise"], class_labels=ref["ddim_y"], sampler="ddim", steps=10,
                        progress=False)
    torch.testing.assert_close(out, ref[f"{prefix}_sample"], rtol=0, atol=atol)
