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


def test_new_attention_order_checkpoint(ref, tmp_path):
    """A use_new_attention_order model stores qkv as (q|k|v, head, channel): attention_order="new" reads it."""
    state = torch.load(os.path.join(GD, "model.pt"), weights_only=True)
    heads_of = lambda c: c // 16  # noqa: E731  (config.json: num_head_channels=16)
    reordered = {}
    for k, v in state.items():
        if k.endswith(("qkv.weight", "qkv.bias")):
            c = v.shape[0] // 3
            rest = v.shape[1:]
            v = v.reshape(heads_of(c), 3, 16, *rest).transpose(0, 1).reshape(3 * c, *rest).contiguous()
        reordered[k] = v
    path = str(tmp_path / "new_order.pt")
    torch.save(reordered, path)
    new = fastdiff.load(path, head_channels=16, attention_order="new")
    with torch.no_grad():
        torch.testing.assert_close(new.model(ref["x"], ref["t"], class_labels=ref["y"]), ref["out"],
                                   rtol=1e-5, atol=2e-5)
        wrong = fastdiff.load(path, head_channels=16).model(ref["x"], ref["t"], class_labels=ref["y"])
    assert (wrong - ref["out"]).abs().max() > 1e-3  # the legacy reading of a new-order file is another network
    with pytest.raises(fastdiff.BadArgumentError, match="attention_order"):
        fastdiff.load(path, head_channels=16, attention_order="newest")


@pytest.mark.parametrize("source", [os.path.join(FIXTURES, "ldm", "ldm_sd1_style.safetensors"), "arch:tiny-unet",
                                    "builtin:digits", "model.onnx"])
def test_attention_order_refused_for_other_formats(source):
    if source.endswith(".safetensors") and not os.path.exists(source):
        pytest.skip(f"reference fixture {source} not present (set FASTDIFF_FIXTURES)")
    with pytest.raises(fastdiff.BadArgumentError, match="guided-diffusion"):
        fastdiff.load(source, attention_order="new")


@pytest.mark.parametrize("kwargs,setting", [({}, "head_channels=64 \\(the default\\)"),
                                            (dict(num_heads=3), "num_heads=3"),
                                            (dict(head_channels=12), "head_channels=12")])
def test_a_head_split_that_does_not_fit_is_refused(ref, kwargs, setting):
    """The weights cannot tell the head split; one that does not divide a level's channels is refused by name
    (it used to fail deep in the converter with a reshape error)."""
    from fastdiff.errors import UnsupportedConfigError

    with pytest.raises(UnsupportedConfigError, match=f"'{setting}'.*pass head_channels="):
        fastdiff.load(os.path.join(GD, "model.pt"), **kwargs)
