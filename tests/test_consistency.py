"""The consistency sampler (``lcm``) against a transcription of k-diffusion's ``sample_lcm``, and its diffusers
form (boundary scalings) against the scalings' definition. diffusers' LCMScheduler: ``test_scheduler_parity.py``."""

import math

import pytest
import torch

from fastdiff.consistency import lcm_boundary_scalings, sample_lcm, sample_tcd
from fastdiff.errors import BadArgumentError
from helpers import smooth_denoiser as denoiser

SIGMAS = [14.6, 3.1, 0.6, 0.09, 0.0]


def setup():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64) * SIGMAS[0]
    draws = [torch.randn(2, 3, 4, 4, dtype=torch.float64) for _ in SIGMAS]
    return x, draws


def test_lcm_equals_k_diffusion():
    """k-diffusion: x = D(x, sigma_i); if sigma_{i+1} > 0: x += sigma_{i+1} * noise (eps models' noise_scaling)."""
    x, draws = setup()
    got = sample_lcm(denoiser, x.clone(), SIGMAS, noise=lambda i, like: draws[i])
    want = x.clone()
    for i in range(len(SIGMAS) - 1):
        want = denoiser(want, torch.full((2,), SIGMAS[i], dtype=torch.float64))
        if SIGMAS[i + 1] > 0:
            want = want + SIGMAS[i + 1] * draws[i]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_boundary_scalings_enter_as_diffusers_writes_them():
    """With the scalings, x0 = c_skip * x_vp + c_out * D (x_vp the variance-preserving sample)."""
    x, draws = setup()
    ts = [999, 759, 499, 259]
    c = [lcm_boundary_scalings(t, timestep_scaling=0.001) for t in ts]   # small scaling: c_skip matters
    got = sample_lcm(denoiser, x.clone(), SIGMAS, noise=lambda i, like: draws[i], c_skip=[a for a, _ in c],
                     c_out=[b for _, b in c])
    want = x.clone()
    for i, (cs, co) in enumerate(c):
        s = SIGMAS[i]
        want = co * denoiser(want, torch.full((2,), s, dtype=torch.float64)) + cs * want / math.sqrt(1 + s * s)
        if SIGMAS[i + 1] > 0:
            want = want + SIGMAS[i + 1] * draws[i]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert c[-1][0] > 0.1 and c[0][1] < 0.99        # the test's scalings are far from (0, 1)


def test_boundary_scalings_values():
    c_skip, c_out = lcm_boundary_scalings(499)          # diffusers' defaults: scaling 10, sigma_data 0.5
    assert c_skip == pytest.approx(0.25 / (4990 ** 2 + 0.25)) and c_out == pytest.approx(4990 / math.sqrt(4990 ** 2 + 0.25))
    assert lcm_boundary_scalings(0) == (1.0, 0.0)       # at t = 0 the consistency function is the identity


def test_callback_sees_the_boundary_corrected_x0():
    x, draws = setup()
    seen = []
    c = [lcm_boundary_scalings(t, timestep_scaling=0.001) for t in (999, 759, 499, 259)]
    out = sample_lcm(denoiser, x.clone(), SIGMAS, noise=lambda i, like: draws[i], c_skip=[a for a, _ in c],
                     c_out=[b for _, b in c], callback=lambda d: seen.append(d["denoised"]))
    torch.testing.assert_close(seen[-1], out)   # the last step returns its x0


@pytest.mark.parametrize("options", [dict(c_skip=[0.0] * 4), dict(c_skip=[0.0] * 3, c_out=[1.0] * 3),
                                     dict(c_skip=1.0, c_out=1.0), dict(c_skip=[0.0] * 4, c_out=["a"] * 4),
                                     dict(c_skip=[math.nan] * 4, c_out=[1.0] * 4)])
def test_bad_scalings(options):
    x, _ = setup()
    with pytest.raises(BadArgumentError, match="c_skip|c_out"):
        sample_lcm(denoiser, x, SIGMAS, **options)


@pytest.fixture(scope="module")
def consistency_model_folder(tmp_path_factory):
    """A diffusers consistency-model folder: UNet2DModel (resnet up/down blocks, scale-shift norm, classes) and
    CMStochasticIterativeScheduler, as openai's CD / CT checkpoints ship."""
    diffusers = pytest.importorskip("diffusers")
    folder = tmp_path_factory.mktemp("cm")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                                 layers_per_block=1, down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "ResnetUpsampleBlock2D"), num_class_embeds=10,
                                 resnet_time_scale_shift="scale_shift", attention_head_dim=32)
    with torch.no_grad():
        for p in unet.parameters():  # off diffusers' zero-initialised output layers
            p.add_(torch.randn_like(p) * 0.05)
    scheduler = diffusers.CMStochasticIterativeScheduler()
    unet.save_pretrained(folder / "unet")
    scheduler.save_pretrained(folder / "scheduler")
    reference = diffusers.ConsistencyModelPipeline(unet=unet, scheduler=scheduler)
    reference.set_progress_bar_config(disable=True)
    return folder, reference


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_consistency_model_folder_equals_diffusers_pipeline(consistency_model_folder, steps):
    """fastdiff.load(folder).generate() equals diffusers' ConsistencyModelPipeline, seed for seed."""
    import fastdiff

    folder, reference = consistency_model_folder
    generators = [torch.Generator().manual_seed(s) for s in (3, 4)]
    want = reference(batch_size=2, class_labels=[1, 7], num_inference_steps=steps, generator=generators,
                     output_type="pt").images                       # in [0, 1]
    got = fastdiff.load(str(folder)).generate(seeds=[3, 4], class_labels=[1, 7], steps=steps, progress=False)
    torch.testing.assert_close((got / 2 + 0.5).clamp(0, 1), want, rtol=0, atol=1e-5)


def test_named_samplers_on_a_consistency_model_keep_its_preconditioning(consistency_model_folder):
    """A named sampler on an EDM-preconditioned folder wrapped the network as a discrete epsilon model on a
    default beta table (sigmas 0.52 -> 0.01, a wrong time input): it now keeps the scheduler's preconditioning
    and sigma range; TCD, which lands on training timesteps, is refused."""
    import fastdiff

    pipe = fastdiff.load(str(consistency_model_folder[0]))
    plan = pipe.plan(4, "euler")
    assert plan.denoiser_kind == "edm" and plan.denoiser_options["sigma_offset"] == pytest.approx(0.002)
    assert float(plan.sigmas[0]) == pytest.approx(80.0) and float(plan.sigmas[-2]) == pytest.approx(0.002)
    assert torch.isfinite(pipe.generate(seeds=[1], class_labels=[2], steps=3, sampler="euler", progress=False)).all()
    with pytest.raises(BadArgumentError, match="discrete-time model"):
        pipe.plan(4, "tcd")


@pytest.mark.parametrize("cls,sampler", [("LCMScheduler", "lcm"), ("TCDScheduler", "tcd")])
def test_a_distilled_checkpoints_own_sampler_keeps_its_timesteps(cls, sampler):
    """sampler="lcm" on an LCM checkpoint (or "tcd" on a TCD one) ran on the config's 'leading' spacing (750, 500,
    ...); it now runs at the timesteps the network was distilled on (999, 759, ...), as with no sampler given."""
    import fastdiff
    from fastdiff.scheduler_config import plan_from_scheduler_config

    pipe = fastdiff.load("arch:tiny-sd-unet", scheduler={"_class_name": cls})
    torch.testing.assert_close(pipe.plan(4, sampler).sigmas,
                               plan_from_scheduler_config({"_class_name": cls}, 4).sigmas)


def test_tcd_with_gamma_0_is_ddim_ending_at_sigma_of_t0():
    """Through the Pipeline's named path on a grid of training timesteps: eta (gamma) = 0 makes every jump land on
    the next sigma, i.e. DDIM; the run ends at sigma(t = 0) in the variance-preserving frame, where diffusers ends
    TCD."""
    import fastdiff
    from fastdiff.samplers import sample_ddim

    pipe = fastdiff.load("arch:tiny-unet")
    plan = pipe.plan(5, "tcd", schedule="leading")
    table0 = float(((1 - pipe.alphas_cumprod()[0]) / pipe.alphas_cumprod()[0]) ** 0.5)
    assert float(plan.sigmas[-1]) == pytest.approx(table0, rel=1e-6) and plan.options["timesteps"][-1] == 0
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    got = sample_tcd(denoiser, x.clone(), plan.sigmas, eta=0.0, sigma_table=plan.options["sigma_table"],
                     timesteps=plan.options["timesteps"])
    torch.testing.assert_close(got, sample_ddim(denoiser, x.clone(), plan.sigmas), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("options,match", [({}, "sigma_table"), (dict(eta=1.5), "eta"),
                                           (dict(eta=0.3, timesteps=[2, 900, 1, 0, 0]), "inside sigma_table")])
def test_tcd_bad_arguments(options, match):
    x, _ = setup()
    tables = dict(sigma_table=[0.03, 1.0, 20.0], timesteps=[2, 1, 0, 0, 0]) if "eta" in options else {}
    tables.update({k: options.pop(k) for k in ("timesteps",) if k in options})
    with pytest.raises(BadArgumentError, match=match):
        sample_tcd(denoiser, x, SIGMAS, **options, **tables)


def test_tcd_needs_a_discrete_time_model():
    import fastdiff
    from conftest import fixture_path

    pipe = fastdiff.load(fixture_path("edm", "edm_song.pt"))
    with pytest.raises(BadArgumentError, match="discrete-time model"):
        pipe.plan(4, "tcd")
