"""fastdiff's samplers, sigma grids and discrete-model wrapper against k-diffusion's own code (the pip package
``k-diffusion``, loaded by ``k_diffusion_ref``), which ComfyUI and AUTOMATIC1111 run: a k-diffusion user gets the
same samples from fastdiff by the same names (on grids ending at sigma 0; on one ending above it, dpmpp_2m /
dpmpp_2m_sde take diffusers' first-order last step unless ``lower_order_final=False``).

Every run is float64 on an analytic denoiser, both sides fed the same noise: k-diffusion's ``noise_sampler(sigma,
sigma_next)`` and ``torch.randn_like`` (the churn of euler / heun / dpm_2) give the draw fastdiff's
``noise(step, like)`` gives for that step. Deterministic steps agree to rounding (1e-12 asked, 1e-15 seen).
"""

from __future__ import annotations

import contextlib
import inspect
import math

import pytest
import torch

import k_diffusion_ref
from fastdiff.samplers import SAMPLERS

SIGMAS = [14.6, 7.0, 3.1, 1.4, 0.6, 0.25, 0.09, 0.029, 0.0]


@pytest.fixture(scope="module")
def kd():
    return k_diffusion_ref.load()


def analytic_denoiser(x, sigma, **_):
    """A smooth stand-in for a trained network's x0 (nonlinear in x, dependent on sigma)."""
    s = sigma.reshape(-1, *([1] * (x.dim() - 1)))
    return torch.tanh(x / (1 + s ** 2).sqrt()) * 0.9 + 0.05 * torch.sin(3 * x)


class StepNoise:
    """Per-step draws shared by both sides: fastdiff asks ``noise(i, like)``, k-diffusion ``noise_sampler(sigma,
    sigma_next)`` (mapped back to i by sigma) or ``torch.randn_like`` (in step order). A step asking twice (DPM++
    SDE) gets its second draw on the second call."""

    def __init__(self, sigmas, like, per_step=2):
        gen = torch.Generator().manual_seed(11)
        self.sigmas = [float(s) for s in sigmas]
        self.draws = [[torch.randn(like.shape, generator=gen, dtype=like.dtype) for _ in range(per_step)]
                      for _ in self.sigmas]
        self.calls: dict = {}

    def take(self, i):
        k = self.calls.get(i, 0)
        self.calls[i] = k + 1
        return self.draws[i][k]

    def fastdiff(self, i, like):
        return self.take(i)

    def k_diffusion(self, sigma, sigma_next):
        return self.take(self.step_of(sigma))

    def step_of(self, sigma):
        s = float(sigma)
        return min(range(len(self.sigmas)), key=lambda i: abs(self.sigmas[i] - s))


def run_both(kd_sampler, name, kd_opts, fd_opts, sigmas=SIGMAS, noise_cls=StepNoise):
    sig = torch.tensor(sigmas, dtype=torch.float64)
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * sig[0]
    noise_kd, noise_fd = noise_cls(sig, x), noise_cls(sig, x)
    if "noise_sampler" in inspect.signature(kd_sampler).parameters:
        kd_opts = dict(kd_opts, noise_sampler=noise_kd.k_diffusion)
    want = kd_sampler(analytic_denoiser, x.clone(), sig, disable=True, **kd_opts)
    got = SAMPLERS[name](analytic_denoiser, x.clone(), sig, noise=noise_fd.fastdiff, **fd_opts)
    return got, want, (noise_kd.calls, noise_fd.calls)


@pytest.mark.parametrize("name,kd_name,opts", [
    ("euler", "sample_euler", {}),
    ("heun", "sample_heun", {}),
    ("dpm_2", "sample_dpm_2", {}),
    ("dpmpp_2m", "sample_dpmpp_2m", {}),
    ("dpmpp_sde", "sample_dpmpp_sde", dict(eta=0.0)),
    ("dpmpp_2s_ancestral", "sample_dpmpp_2s_ancestral", dict(eta=0.0)),
    ("dpmpp_3m_sde", "sample_dpmpp_3m_sde", dict(eta=0.0)),
])
def test_deterministic_samplers_equal_k_diffusion(kd, name, kd_name, opts):
    got, want, _ = run_both(getattr(kd, kd_name), name, opts, opts)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,kd_name,opts", [("dpmpp_2m", "sample_dpmpp_2m", {}),
                                               ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", dict(eta=0.0)),
                                               ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", dict(solver_type="heun"))])
def test_multistep_samplers_on_a_grid_ending_above_zero(kd, name, kd_name, opts):
    """A grid that stops short of sigma 0 (ComfyUI's split sigmas, a refiner hand-over): k-diffusion keeps the
    second order to the end. fastdiff's dpmpp_2m / dpmpp_2m_sde by name take diffusers' last-step first order
    (``lower_order_final=True``, its default, which differs only where the grid does not end at 0); with
    ``lower_order_final=False`` they are k-diffusion's."""
    grid = [14.6, 7.0, 3.1, 1.4, 0.6, 0.03]
    got, want, (kd_calls, fd_calls) = run_both(getattr(kd, kd_name), name, opts, dict(opts, lower_order_final=False),
                                               sigmas=grid)
    assert kd_calls == fd_calls
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    default, _, _ = run_both(getattr(kd, kd_name), name, opts, opts, sigmas=grid)
    assert float((default - want).abs().max()) > 1e-3  # (the default's first-order last step: another result)


@pytest.mark.parametrize("name,kd_name,opts", [
    ("euler_ancestral", "sample_euler_ancestral", {}),
    ("euler_ancestral", "sample_euler_ancestral", dict(eta=0.5, s_noise=0.9)),
    ("dpm_2_ancestral", "sample_dpm_2_ancestral", {}),
    ("dpm_2_ancestral", "sample_dpm_2_ancestral", dict(eta=0.7, s_noise=1.1)),
    ("dpmpp_2s_ancestral", "sample_dpmpp_2s_ancestral", {}),
    ("dpmpp_2s_ancestral", "sample_dpmpp_2s_ancestral", dict(eta=0.6)),
    ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", {}),
    ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", dict(solver_type="heun", eta=0.7, s_noise=0.9)),
    ("dpmpp_3m_sde", "sample_dpmpp_3m_sde", {}),
    ("dpmpp_3m_sde", "sample_dpmpp_3m_sde", dict(eta=0.5, s_noise=0.8)),
])
def test_ancestral_and_sde_samplers_equal_k_diffusion_given_the_same_noise(kd, name, kd_name, opts):
    got, want, (kd_calls, fd_calls) = run_both(getattr(kd, kd_name), name, opts, opts)
    assert kd_calls == fd_calls  # the same draws taken, step by step
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # (the noise is really in the result: the same start with other draws lands elsewhere)
    sig = torch.tensor(SIGMAS, dtype=torch.float64)
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * sig[0]
    other = SAMPLERS[name](analytic_denoiser, x, sig, noise=lambda i, like: torch.randn_like(like), **opts)
    assert float((other - want).abs().max()) > 1e-2


def test_dpmpp_sde_equals_k_diffusion_given_its_brownian_increments(kd):
    """k-diffusion's DPM++ SDE takes two increments of one Brownian motion per step, over [sigma_s, sigma] and then
    [sigma', sigma] (its noise sampler's two calls); fastdiff draws z1, z2 per step and joins them. Fed k-diffusion
    those increments, joined here as Brownian motion has them, its run is fastdiff's."""

    class BrownianNoise(StepNoise):
        def k_diffusion(self, sigma, sigma_next):
            i = self.step_of(sigma)
            if i not in self.calls:  # the first call: the increment over [sigma_s, sigma], normalised
                self.s_mid = float(sigma_next)
                return self.take(i)
            self.calls[i] = 2
            a, mid, b = float(sigma), self.s_mid, float(sigma_next)
            z1, z2 = self.draws[i]
            return (math.sqrt(a - mid) * z1 + math.sqrt(mid - b) * z2) / math.sqrt(a - b)

    for opts in (dict(), dict(eta=0.5, s_noise=0.9), dict(r=0.3)):
        got, want, (kd_calls, fd_calls) = run_both(kd.sample_dpmpp_sde, "dpmpp_sde", opts, opts,
                                                   noise_cls=BrownianNoise)
        assert kd_calls == fd_calls
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


LMS_GRIDS = {
    "to_zero": SIGMAS,
    "to_sigma_min": [9.0, 5.5, 2.0, 1.2, 0.5, 0.2, 0.0292],  # SD's leading grid ends at alphas_cumprod[0]
    "two_steps": [6.0, 1.0, 0.0],
}


@pytest.mark.parametrize("order", [1, 2, 4, 5])
@pytest.mark.parametrize("grid", sorted(LMS_GRIDS))
def test_lms_equals_k_diffusion_on_grids(kd, grid, order):
    """(k-diffusion integrates its Lagrange weights with scipy's quad, epsrel 1e-4: exact for these polynomials.)"""
    got, want, _ = run_both(kd.sample_lms, "lms", dict(order=order), dict(order=order), sigmas=LMS_GRIDS[grid])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_lms_high_order_on_a_long_grid_stays_exact(kd):
    """Order 6 over 200 Karras steps from sigma 80: short steps far from 0 made monomial-basis weights lose every
    digit (an order-8, 1000-step run was off by 100%); fastdiff builds them in the step's own unit."""
    from fastdiff.schedules import get_sigmas_karras

    sigmas = get_sigmas_karras(200, 0.03, 80.0).tolist()
    got, want, _ = run_both(kd.sample_lms, "lms", dict(order=6), dict(order=6), sigmas=sigmas)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-8)


class RandnLikeFeed:
    """Stands in for the ``torch`` module k-diffusion's sampling.py calls: ``randn_like`` returns the draws given,
    in order; everything else is torch."""

    def __init__(self, draws):
        self._draws = list(draws)

    def randn_like(self, like, *args, **kwargs):
        return self._draws.pop(0).to(like)

    def __getattr__(self, name):
        return getattr(torch, name)


@pytest.mark.parametrize("name,kd_name", [("euler", "sample_euler"), ("dpm_2", "sample_dpm_2"),
                                          ("edm", "sample_heun")])
@pytest.mark.parametrize("churn", [dict(s_churn=1.0), dict(s_churn=4.0, s_tmin=0.05, s_tmax=5.0, s_noise=1.007)])
def test_churn_equals_k_diffusion(kd, monkeypatch, name, kd_name, churn):
    """Karras et al.'s churn (noise added to raise sigma before each step): euler, dpm_2 and edm (k-diffusion's
    heun with churn) take the same draws as k-diffusion's ``torch.randn_like`` on the steps that churn."""
    sig = torch.tensor(SIGMAS, dtype=torch.float64)
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * sig[0]
    noise = StepNoise(sig, x)
    fd_calls = []

    def fd_noise(i, like):
        fd_calls.append(i)
        return noise.draws[i][0]

    got = SAMPLERS[name](analytic_denoiser, x.clone(), sig, noise=fd_noise, **churn)
    assert fd_calls, "no step churned: the test would not see the noise"
    # k-diffusion draws on every step and uses the draws of the steps that churn
    steps = len(SIGMAS) - 1
    monkeypatch.setattr(kd, "torch", RandnLikeFeed(noise.draws[i][0] for i in range(steps)))
    want = getattr(kd, kd_name)(analytic_denoiser, x.clone(), sig, disable=True, **churn)
    assert not kd.torch._draws
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [1, 4, 17])
def test_sigma_grids_equal_k_diffusion(kd, n):
    """karras and exponential as k-diffusion builds them (it works in float32, fastdiff in float64: 5e-6 relative,
    float32's rounding raised to the power rho)."""
    from fastdiff.schedules import get_sigmas_exponential, get_sigmas_karras

    for rho in (7.0, 3.0):
        torch.testing.assert_close(get_sigmas_karras(n, 0.0292, 14.61, rho=rho).double(),
                                   kd.get_sigmas_karras(n, 0.0292, 14.61, rho=rho).double(), rtol=5e-6, atol=0)
    if n > 1:  # (k-diffusion's exponential of one step divides by zero in its linspace: nan)
        torch.testing.assert_close(get_sigmas_exponential(n, 0.0292, 14.61).double(),
                                   kd.get_sigmas_exponential(n, 0.0292, 14.61).double(), rtol=5e-6, atol=0)


def sd_alphas_cumprod():
    """Stable Diffusion's training schedule (scaled_linear, 0.00085 to 0.012, 1000 steps), float32."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


class TinyEpsNetwork(torch.nn.Module):
    """A ``model(x, t, **cond)`` whose output depends on the fractional timestep and a condition; CompVis's
    ``apply_model`` is the same call (what k-diffusion's wrappers invoke)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("alphas_cumprod", sd_alphas_cumprod().double())

    def forward(self, x, t, cond=None):
        t = t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        return torch.sin(x * 1.3 + t / 170.0) * 0.7 + (0 if cond is None else cond)

    apply_model = forward


@pytest.mark.parametrize("prediction,wrapper", [("epsilon", "CompVisDenoiser"), ("v_prediction", "CompVisVDenoiser")])
def test_discrete_model_wrapper_equals_k_diffusion(prediction, wrapper):
    """A discrete-time eps / v network as a D(x, sigma): fastdiff's DiscreteDenoiser is k-diffusion's CompVis
    wrapper, at sigmas on the training grid and between its entries (log-sigma interpolation of the timestep);
    with rounding, its quantized form."""
    from fastdiff.denoiser import DiscreteDenoiser

    external = k_diffusion_ref.load("external")
    net = TinyEpsNetwork()
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 3
    cond = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.1
    table = ((1 - sd_alphas_cumprod()) / sd_alphas_cumprod()).double().sqrt()
    sigma = torch.tensor([float(table[0]), 0.777, 9.5], dtype=torch.float64)  # on the grid, between entries
    for quantize, rounding in ((False, None), (True, "round")):
        ref = getattr(external, wrapper)(net, quantize=quantize)
        ours = DiscreteDenoiser(net, sd_alphas_cumprod(), prediction, timestep_rounding=rounding, dtype=torch.float64)
        torch.testing.assert_close(ours.sigma_to_t(sigma), ref.sigma_to_t(sigma).double(), rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(ours(x, sigma, cond=cond), ref(x, sigma, cond=cond), rtol=1e-6, atol=1e-6)


def test_a_comfyui_style_run_equals_k_diffusion_end_to_end(kd):
    """What ComfyUI / AUTOMATIC1111 run for SD ("DPM++ 2M Karras"; "Euler a normal"): k-diffusion's sampler over
    its wrapper's grid, against fastdiff's sampler, wrapper and grid of the same names."""
    from fastdiff.denoiser import DiscreteDenoiser
    from fastdiff.schedules import get_sigmas_karras, get_sigmas_uniform

    external = k_diffusion_ref.load("external")
    net = TinyEpsNetwork()
    ref = external.CompVisDenoiser(net)
    ours = DiscreteDenoiser(net, sd_alphas_cumprod(), "epsilon", dtype=torch.float64)  # (a network of no parameters)
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    smin, smax = float(ref.sigma_min), float(ref.sigma_max)
    # DPM++ 2M with the Karras grid
    kd_sig = kd.get_sigmas_karras(12, smin, smax).double()
    fd_sig = get_sigmas_karras(12, smin, smax).double()
    torch.testing.assert_close(fd_sig, kd_sig, rtol=1e-6, atol=0)
    want = kd.sample_dpmpp_2m(ref, x * kd_sig[0], kd_sig, disable=True)
    got = SAMPLERS["dpmpp_2m"](ours, x * kd_sig[0], kd_sig)
    # (fastdiff's sigma table is float32, diffusers' own; k-diffusion's here float64: timesteps 1e-5 apart)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=3e-6)
    # Euler ancestral on the wrapper's own grid (ComfyUI's "normal": evenly spaced training timesteps)
    kd_sig = ref.get_sigmas(10).double()
    torch.testing.assert_close(get_sigmas_uniform(10, alphas_cumprod=sd_alphas_cumprod()).double(), kd_sig,
                               rtol=1e-6, atol=0)
    noise = StepNoise(kd_sig, x, per_step=1)
    want = kd.sample_euler_ancestral(ref, x * kd_sig[0], kd_sig, disable=True,
                                     noise_sampler=lambda s, sn: noise.draws[noise.step_of(s)][0])
    got = SAMPLERS["euler_ancestral"](ours, x * kd_sig[0], kd_sig, noise=lambda i, like: noise.draws[i][0])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=3e-6)
    assert math.isfinite(float(got.abs().max()))


def test_a_guided_diffusion_network_wrapper_equals_k_diffusion():
    """An ADM network (guided-diffusion: eps and learned-variance channels) as k-diffusion's OpenAIDenoiser reads it
    (float32 schedule, the variance half dropped) and as fastdiff's DiscreteDenoiser does."""
    from types import SimpleNamespace

    from fastdiff.denoiser import DiscreteDenoiser
    from fastdiff.schedules import make_alphas_cumprod

    external = k_diffusion_ref.load("external")
    ac = make_alphas_cumprod("linear", 1000)  # (guided-diffusion's linear schedule)

    def adm(x, t, y=None):  # (B, 2C, H, W): eps, then the variance interpolation values
        t = t.reshape(-1, 1, 1, 1).to(x.dtype)
        eps = torch.cos(x * 0.9 - t / 300.0) * 0.8 + (0 if y is None else y.reshape(-1, 1, 1, 1) * 0.01)
        return torch.cat([eps, torch.tanh(x + t / 1000.0)], dim=1)

    ref = external.OpenAIDenoiser(adm, SimpleNamespace(alphas_cumprod=ac.double().numpy()))
    ours = DiscreteDenoiser(adm, ac, "epsilon", dtype=torch.float64)
    x = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 2
    y = torch.tensor([1, 5, 9])
    sigma = torch.tensor([0.3, 4.2, 80.0], dtype=torch.float64)
    got, want = ours(x, sigma, y=y), ref(x, sigma, y=y)
    assert got.shape == x.shape
    torch.testing.assert_close(got, want.double(), rtol=1e-5, atol=1e-5)


@contextlib.contextmanager
def float64_default():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


@pytest.mark.parametrize("nfe", [1, 2, 3, 4, 5, 6, 7, 10, 12])
@pytest.mark.parametrize("end", ["zero", "sigma_min"])
def test_dpm_fast_equals_k_diffusion(kd, nfe, end):
    """DPM-Solver-fast: k-diffusion's sample_dpm_fast over (sigma_min, sigma_max, nfe) as ComfyUI's wrapper reads a
    grid (sigma_min the last nonzero sigma), against fastdiff's over that grid (k-diffusion's step times made float64,
    the default dtype of its torch.tensor(sigma))."""
    from fastdiff.dpm_fast import dpm_fast_orders
    from fastdiff.schedules import get_sigmas_karras

    assert sum(dpm_fast_orders(nfe)) == nfe
    grid = get_sigmas_karras(nfe, 0.0292, 14.61, final=end)
    sigma_min = float(grid[-1]) if end == "sigma_min" else float(grid[-2])
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * float(grid[0])
    # (a one-step grid to 0 has equal ends: its one evaluation moves nothing, in k-diffusion too)
    with float64_default():
        want = kd.sample_dpm_fast(analytic_denoiser, x.clone(), sigma_min, float(grid[0]), nfe, disable=True)
    calls = []

    def counted(x, sigma, **kw):
        calls.append(1)
        return analytic_denoiser(x, sigma, **kw)

    got = SAMPLERS["dpm_fast"](counted, x.clone(), grid)
    assert len(calls) == nfe
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("opts", [dict(eta=1.0), dict(eta=0.5, s_noise=0.9)])
def test_dpm_fast_ancestral_equals_k_diffusion(kd, opts):
    from fastdiff.schedules import get_sigmas_karras

    grid = get_sigmas_karras(9, 0.0292, 14.61)
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * float(grid[0])
    steps = 4  # (9 evaluations: orders 3, 3, 2, 1)
    draws = [torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(20 + i), dtype=torch.float64)
             for i in range(steps)]
    taken = []

    def noise_sampler(sigma, sigma_next):
        taken.append(1)
        return draws[len(taken) - 1]

    with float64_default():
        want = kd.sample_dpm_fast(analytic_denoiser, x.clone(), float(grid[-2]), float(grid[0]), 9, disable=True,
                                  noise_sampler=noise_sampler, **opts)
    got = SAMPLERS["dpm_fast"](analytic_denoiser, x.clone(), grid, noise=lambda i, like: draws[i], **opts)
    assert len(taken) == steps
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert float((got - SAMPLERS["dpm_fast"](analytic_denoiser, x.clone(), grid)).abs().max()) > 1e-2
