"""Pipeline.generate: per-sample seeds, official DiT sampling fixtures, conditioning errors, outputs."""

import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import fastdiff
from fastdiff.errors import BadArgumentError
from helpers import rel_err

FIXTURES = os.environ.get("FASTDIFF_FIXTURES",
                          os.path.join(os.path.dirname(__file__), "..", "..", "shared", "fixtures"))

# official DiT's create_diffusion(timestep_respacing="ddim10"): DDIM on t = 900, 800, ..., 0, alpha_prev = 1
DIT_DDIM10 = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
              "beta_start": 0.0001, "beta_end": 0.02, "prediction_type": "epsilon", "clip_sample": False,
              "set_alpha_to_one": True, "steps_offset": 0, "timestep_spacing": "leading"}


@pytest.fixture(scope="module")
def tiny_unet():
    return fastdiff.load("arch:tiny-unet")


@pytest.fixture(scope="module")
def dit_fixture():
    path = os.path.join(FIXTURES, "dit", "dit_tiny.pt")
    if not os.path.exists(path):
        pytest.skip(f"reference fixture {path} not present")
    pipe = fastdiff.load(path, scheduler=DIT_DDIM10, num_heads=4)  # config.json: num_heads=4
    return pipe, load_file(os.path.join(FIXTURES, "dit", "reference.safetensors"))


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "unipc", "euler_ancestral", "dpmpp_2m_sde", "ddpm"])
def test_batch_equals_single_runs(tiny_unet, sampler):
    seeds = [11, 22, 33, 44]
    batch = tiny_unet.generate(seeds=seeds, steps=4, sampler=sampler, progress=False)
    for i, s in enumerate(seeds):
        solo = tiny_unet.generate(seeds=[s], steps=4, sampler=sampler, progress=False)
        assert rel_err(batch[i:i + 1], solo) <= 1e-5


def test_seed_means_consecutive_seeds_and_latents_override(tiny_unet):
    a = tiny_unet.generate(n=2, seed=5, steps=3, sampler="euler", progress=False)
    b = tiny_unet.generate(seeds=[5, 6], steps=3, sampler="euler", progress=False)
    assert torch.equal(a, b)
    z = torch.randn(2, 3, 16, 16)
    c = tiny_unet.generate(latents=z, steps=3, sampler="euler", progress=False)
    d = tiny_unet.generate(latents=z, steps=3, sampler="euler", progress=False)
    assert torch.equal(c, d) and not torch.equal(c, a)


def test_official_dit_ddim_fixture(dit_fixture):
    pipe, ref = dit_fixture
    out = pipe.generate(latents=ref["ddim_noise"], class_labels=ref["ddim_y"], steps=10, progress=False)
    want = ref["ddim_sample"]
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_official_dit_ddim_cfg_fixture(dit_fixture):
    """Official sample.py doubles the batch; its rows 0-1 are the guided samples (3-channel CFG)."""
    pipe, ref = dit_fixture
    z = ref["ddim_cfg_noise"][:2]
    out = pipe.generate(latents=z, class_labels=ref["ddim_cfg_y"][:2], cfg_scale=4.0, steps=10, progress=False)
    want = ref["ddim_cfg_sample"][:2]
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_output_types(tiny_unet):
    arr = tiny_unet.generate(seeds=[1, 2], steps=2, sampler="euler", output_type="np", progress=False)
    assert arr.shape == (2, 16, 16, 3) and arr.dtype == np.uint8
    imgs = tiny_unet.generate(seeds=[1], steps=2, sampler="euler", output_type="pil", progress=False)
    assert imgs[0].size == (16, 16) and imgs[0].mode == "RGB"


@pytest.mark.parametrize("kwargs,needle", [
    (dict(steps=0), "steps"),
    (dict(sampler="nope"), "sampler"),
    (dict(schedule="nope", sampler="euler"), "schedule"),
    (dict(output_type="gif"), "output_type"),
    (dict(class_labels=[1]), "not class-conditional"),
    (dict(cfg_scale=3.0), "conditional"),
    (dict(latents=torch.zeros(1, 4, 16, 16)), "latents"),
])
def test_bad_arguments(tiny_unet, kwargs, needle):
    with pytest.raises(BadArgumentError) as e:
        tiny_unet.generate(**{"steps": 2, "progress": False, **kwargs})
    assert needle in str(e.value)


def test_text_model_requires_states_and_negative_for_cfg():
    pipe = fastdiff.load("arch:tiny-sd-unet")
    with pytest.raises(BadArgumentError, match="encoder_hidden_states"):
        pipe.generate(steps=2, progress=False)
    ctx = torch.randn(1, 5, 32)
    with pytest.raises(BadArgumentError, match="negative_encoder_hidden_states"):
        pipe.generate(steps=2, encoder_hidden_states=ctx, cfg_scale=5.0, progress=False)
    out = pipe.generate(seeds=[1, 2], steps=2, encoder_hidden_states=ctx, negative_encoder_hidden_states=ctx * 0,
                        cfg_scale=5.0, progress=False)
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()


def test_half_precision_network_keeps_float32_state(tiny_unet):
    pipe = fastdiff.load("arch:tiny-unet", dtype=torch.bfloat16)
    out = pipe.generate(seeds=[3], steps=3, sampler="dpmpp_2m", progress=False)
    ref = tiny_unet.generate(seeds=[3], steps=3, sampler="dpmpp_2m", progress=False)
    assert out.dtype == torch.float32
    assert rel_err(out, ref) < 0.1


@pytest.mark.parametrize("kwargs,needle", [
    (dict(seeds=[1, 2], n=3), "n=3"),
    (dict(seed=2**63), "seed"),
    (dict(seeds=[-1]), "seed"),
    (dict(height=0), "height"),
    (dict(steps=1001, sampler="ddim"), "steps"),
    (dict(eta=1.0, sampler="dpmpp_2m"), "unknown option"),
])
def test_more_bad_arguments(tiny_unet, kwargs, needle):
    with pytest.raises(BadArgumentError) as e:
        tiny_unet.generate(**{"steps": 2, "progress": False, **kwargs})
    assert needle in str(e.value)


def test_class_labels_out_of_range_are_refused_on_the_host():
    pipe = fastdiff.load("arch:tiny-dit")  # 10 classes, null label 10
    for bad in ([11], [-1]):
        with pytest.raises(BadArgumentError, match="class_labels"):
            pipe.generate(seeds=[1], class_labels=bad, steps=1, progress=False)
    pipe.generate(seeds=[1], class_labels=[10], steps=1, progress=False)  # the null label is allowed


def test_sampler_options_reach_the_scheduler_config_plan(tiny_unet):
    assert tiny_unet.plan(4).sampler == "ddim"  # arch:tiny-unet ships a DDIMScheduler config
    assert tiny_unet.plan(4, eta=0.5).options["eta"] == 0.5
    a = tiny_unet.generate(seeds=[1], steps=4, progress=False)
    b = tiny_unet.generate(seeds=[1], steps=4, progress=False, eta=0.5)
    assert not torch.equal(a, b)


def test_cached_plans_are_not_shared_with_callers():
    """plan() caches its work, but each call returns a plan whose mutable parts are its own."""
    pipe = fastdiff.load("arch:tiny-unet")
    first = pipe.plan(5, "dpmpp_2m")
    first.sigmas *= 2
    first.denoiser_options["clip_sample"] = 0.01
    first.options["eta"] = 3.0
    again = pipe.plan(5, "dpmpp_2m")
    assert float(again.sigmas[0]) * 2 == pytest.approx(float(first.sigmas[0]))
    assert "clip_sample" not in again.denoiser_options and "eta" not in again.options
    pipe.spec.scheduler["beta_schedule"] = "scaled_linear"  # editing the spec afterwards: a fresh plan
    assert not torch.equal(pipe.plan(5, "dpmpp_2m").sigmas, again.sigmas)


def test_an_edited_scheduler_list_is_a_new_plan():
    """The plan cache keys list entries of the scheduler config by their values, not their length."""
    pipe = fastdiff.load("arch:tiny-unet")
    kw = dict(seeds=[1], steps=4, sampler="ddim", progress=False)
    pipe.spec.scheduler["trained_betas"] = torch.linspace(1e-4, 0.02, 1000).tolist()
    first = pipe.generate(**kw)
    pipe.spec.scheduler["trained_betas"] = torch.linspace(1e-4, 0.04, 1000).tolist()  # same length
    assert not torch.equal(pipe.generate(**kw), first)


def test_save_never_replaces_a_folder_it_did_not_write(tmp_path):
    """save() swaps whole folders atomically: it replaces an earlier save, never a folder with other files."""
    pipe = fastdiff.load("arch:tiny-unet")
    pipe.save(str(tmp_path / "m"))
    pipe.save(str(tmp_path / "m"))  # an earlier save is replaced
    assert sorted(os.listdir(tmp_path / "m")) == ["fastdiff.json", "model.safetensors"]
    mine = tmp_path / "outputs"
    mine.mkdir()
    (mine / "notes.txt").write_text("irreplaceable")
    (tmp_path / "m" / "extra.png").write_bytes(b"png")
    for target, found in ((mine, "notes.txt"), (tmp_path / "m", "extra.png")):
        with pytest.raises(BadArgumentError, match=f"not a fastdiff folder \\(found {found}\\)"):
            pipe.save(str(target))
    assert (mine / "notes.txt").read_text() == "irreplaceable" and (tmp_path / "m" / "extra.png").exists()
