"""Schedules: training tables bit-identical to diffusers, diffusers' timestep spacings, sigma grids."""

import math

import numpy as np
import pytest
import torch

from fastdiff import schedules as sch
from fastdiff.errors import BadArgumentError
from test_sampler_order import single_thread  # noqa: F401,E402  (autouse fixture)

diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_alphas_cumprod_match_diffusers(beta_schedule, zero_snr):
    ref = diffusers.DDPMScheduler(beta_schedule=beta_schedule, beta_start=0.00085, beta_end=0.012,
                                  rescale_betas_zero_snr=zero_snr)
    betas = sch.make_betas(beta_schedule, 1000, 0.00085, 0.012)
    if zero_snr:
        betas = sch.rescale_zero_terminal_snr(betas)
    assert torch.equal(betas, ref.betas)
    ac = sch.make_alphas_cumprod(beta_schedule, 1000, 0.00085, 0.012, rescale_betas_zero_snr=zero_snr)
    expect = ref.alphas_cumprod.clone()
    if zero_snr:
        expect[-1] = 2.0 ** -24                       # what diffusers' sigma-based schedulers hold
        assert abs(float(sch.sigmas_from_alphas_cumprod(ac)[-1]) - 4096) < 1
    assert torch.equal(ac, expect)


def test_trained_betas():
    assert torch.equal(sch.make_betas(num_train_timesteps=2, trained_betas=[0.1, 0.2]), torch.tensor([0.1, 0.2]))
    with pytest.raises(BadArgumentError, match=r"trained_betas: expected num_train_timesteps=1000 values, found "
                                                r"shape \(500,\)"):
        sch.make_betas(trained_betas=[0.01] * 500)  # (the grids would space 1000 timesteps over 500 betas)


@pytest.mark.parametrize("schedule,kwargs,match", [
    ("exponential", dict(sigma_min=0.0, sigma_max=10.0), r"expected 0 < sigma_min < sigma_max"),
    ("exponential", dict(sigma_min=-1.0, sigma_max=10.0), r"expected 0 < sigma_min < sigma_max"),
    ("karras", dict(sigma_min=10.0, sigma_max=0.5), r"expected 0 <= sigma_min < sigma_max"),
    ("uniform", dict(sigma_min=10.0, sigma_max=0.5), r"expected 0 <= sigma_min < sigma_max"),
    ("karras", dict(sigma_min=0.1, sigma_max=float("inf")), "finite"),
    ("karras", dict(sigma_min=0.1, sigma_max=10.0, rho=0.0), r"expected rho > 0"),
])
def test_a_grid_that_cannot_fall_is_refused(schedule, kwargs, match):
    with pytest.raises(BadArgumentError, match=match):
        sch.get_sigmas(schedule, 5, **kwargs)
    assert float(sch.get_sigmas("karras", 5, sigma_min=0.0, sigma_max=10.0)[0]) == pytest.approx(10.0)  # (0: allowed)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 10, 50])
def test_timesteps_match_diffusers(spacing, steps):
    ddim = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    ddim.set_timesteps(steps)
    ours = sch.get_timesteps(spacing, steps, 1000, ddim.config.steps_offset)
    assert np.array_equal(ours, ddim.timesteps.numpy())
    euler = diffusers.EulerDiscreteScheduler(timestep_spacing=spacing)
    euler.set_timesteps(steps)
    assert np.array_equal(sch.get_timesteps(spacing, steps, integer=False), euler.timesteps.numpy())
    if steps > 1:
        unipc = diffusers.UniPCMultistepScheduler(timestep_spacing=spacing)
        unipc.set_timesteps(steps)
        assert np.array_equal(sch.get_timesteps(spacing, steps, skip_last=True), unipc.timesteps.numpy())


def test_sigmas_at_timesteps_match_euler():
    euler = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    euler.set_timesteps(13)
    ac = sch.make_alphas_cumprod("scaled_linear", 1000, 0.00085, 0.012)
    ours = sch.sigmas_at_timesteps(ac, sch.get_timesteps("linspace", 13, integer=False))
    assert np.array_equal(ours.astype(np.float32), euler.sigmas.numpy()[:-1])


def test_karras_grid():
    s = sch.get_sigmas_karras(10)
    assert s.dtype == torch.float64 and s.device.type == "cpu" and len(s) == 11
    assert math.isclose(float(s[0]), sch.EDM_SIGMA_MAX) and math.isclose(float(s[-2]), sch.EDM_SIGMA_MIN)
    assert float(s[-1]) == 0 and bool((s[:-1] > s[1:]).all())
    # evenly spaced in sigma^(1/rho)
    r = s[:-1] ** (1 / 7)
    assert torch.allclose(r[1:] - r[:-1], (r[1] - r[0]).expand(9))
    assert float(sch.get_sigmas_karras(4, 0.1, 10, final="sigma_min")[-1]) == pytest.approx(0.1)


def test_exponential_and_uniform_grids():
    s = sch.get_sigmas_exponential(8, 0.01, 10)
    d = s[:-1].log().diff()
    assert torch.allclose(d, d[:1].expand_as(d))
    u = sch.get_sigmas_uniform(5, 1.0, 5.0)
    assert u.tolist() == [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]
    ac = sch.make_alphas_cumprod("linear")
    ug = sch.get_sigmas_uniform(5, alphas_cumprod=ac)
    table = sch.sigmas_from_alphas_cumprod(ac)
    assert math.isclose(float(ug[0]), float(table[-1]), rel_tol=1e-9)
    assert math.isclose(float(ug[-2]), float(table[0]), rel_tol=1e-9)


def test_get_sigmas_by_name():
    ac = sch.make_alphas_cumprod("scaled_linear", 1000, 0.00085, 0.012)
    table = sch.sigmas_from_alphas_cumprod(ac)
    k = sch.get_sigmas("karras", 12, alphas_cumprod=ac)
    assert math.isclose(float(k[0]), float(table[-1])) and math.isclose(float(k[-2]), float(table[0]))
    lead = sch.get_sigmas("leading", 10, alphas_cumprod=ac, steps_offset=1)
    assert math.isclose(float(lead[0]), float(table[901]), rel_tol=1e-6)
    edm = sch.get_sigmas("karras", 5)
    assert math.isclose(float(edm[0]), 80.0)
    for bad in [dict(schedule="cosine"), dict(schedule="leading")]:
        with pytest.raises(BadArgumentError):
            sch.get_sigmas(bad["schedule"], 5)
    with pytest.raises(BadArgumentError, match="positive integer"):
        sch.get_sigmas_karras(0)


def test_sigma_to_timestep_inverse_on_grid():
    ac = sch.make_alphas_cumprod("linear")
    table = sch.sigmas_from_alphas_cumprod(ac).numpy()
    t = sch.sigma_to_timestep(table[[0, 17, 500, 999]], ac)
    np.testing.assert_allclose(t, [0, 17, 500, 999], rtol=0, atol=1e-5)  # float32 logs, as diffusers keeps them
    between = sch.sigma_to_timestep(np.sqrt(table[10] * table[11]), ac)
    assert 10 < float(between) < 11


def test_sigma_to_timestep_on_a_zero_terminal_snr_table():
    """Zero terminal SNR clamps the last alphas_cumprod to 2**-24: sigma 4096 at t=999, below t=998's 15406.
    The inverse is diffusers' _sigma_to_t: the last entry <= sigma over float32 logs. Its float32 log of 4096
    lies above the float64 one, so 4096 (and the top of a Karras grid, a float64 rounding error lower) maps to
    995.26, what diffusers' Karras grids feed the network; grids of training timesteps pass 999 itself
    (DiscreteDenoiser(timesteps=), tested in test_scheduler_parity)."""
    ac = sch.make_alphas_cumprod("linear", rescale_betas_zero_snr=True)
    table = sch.sigmas_from_alphas_cumprod(ac).numpy()
    assert table[999] == 4096.0 and table[998] > table[999]
    for sigma in (4096.0, (4096.0 ** (1 / 7)) ** 7):  # the second: 4095.9999999999973
        assert abs(float(sch.sigma_to_timestep(sigma, ac)) - 995.2574) < 1e-3
    assert abs(float(sch.sigma_to_timestep(table[500], ac)) - 500) < 1e-5
    assert 998 < float(sch.sigma_to_timestep((table[998] + table[999]) / 2, ac)) < 999  # on the clamped segment

