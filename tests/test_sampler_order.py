"""Convergence order of the deterministic samplers on a problem with an exact answer.

Data from a 2-D Gaussian mixture has a closed-form denoiser D(x, sigma) = E[x0 | x_sigma]; the
probability-flow ODE dx/dlog(sigma) = x - D(x, sigma) is integrated to ~1e-9 with RK4 on a fine grid.
Each sampler's error at 5, 10, 20, 40 steps gives its empirical order (slope of log err vs log steps).
A wrong coefficient in a 2nd-order method drops it to order ~1, which these bounds catch.
"""

import math

import numpy as np
import pytest
import torch

from fastdiff import samplers as S
from fastdiff.schedules import get_sigmas_exponential, get_sigmas_karras

SIGMA_MIN, SIGMA_MAX = 0.02, 20.0
STEPS = (5, 10, 20, 40)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny tensors: intra-op threads only add contention (20-50x slower on a loaded 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class GaussianMixture:
    """p0 = sum_k w_k N(mu_k, s_k^2 I); at noise sigma each component is N(mu_k, (s_k^2 + sigma^2) I), so
    D(x, sigma) = sum_k gamma_k(x) (mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k))."""

    def __init__(self):
        self.mu = torch.tensor([[-1.5, 0.5], [1.0, 1.0], [0.5, -1.5]], dtype=torch.float64)
        self.s2 = torch.tensor([0.25, 0.16, 0.36], dtype=torch.float64)
        self.logw = torch.tensor([0.3, 0.5, 0.2], dtype=torch.float64).log()

    def __call__(self, x, sigma, **cond):
        x64, sig = x.to(torch.float64), sigma.to(torch.float64).reshape(-1, 1, 1)
        var = self.s2[None, :, None] + sig ** 2                               # (B, K, 1)
        diff = x64[:, None, :] - self.mu[None]                                 # (B, K, 2)
        logp = self.logw[None] - 0.5 * (diff ** 2).sum(-1) / var[..., 0] - torch.log(var[..., 0])
        gamma = torch.softmax(logp, dim=1)[..., None]                          # (B, K, 1)
        return (gamma * (self.mu[None] + self.s2[None, :, None] / var * diff)).sum(1).to(x.dtype)


def ode_reference(denoiser, x, sigma_max, sigma_min, n=600):
    """RK4 in u = log(sigma) from sigma_max to sigma_min, then the final denoising step (to sigma = 0)."""
    def f(x, u):
        return x - denoiser(x, torch.full((x.shape[0],), math.exp(u), dtype=x.dtype))
    us = np.linspace(math.log(sigma_max), math.log(sigma_min), n + 1)
    for a, b in zip(us[:-1], us[1:]):
        h = b - a
        k1 = f(x, a)
        k2 = f(x + 0.5 * h * k1, a + 0.5 * h)
        k3 = f(x + 0.5 * h * k2, a + 0.5 * h)
        k4 = f(x + h * k3, b)
        x = x + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
    return denoiser(x, torch.full((x.shape[0],), sigma_min, dtype=x.dtype))


@pytest.fixture(scope="module")
def problem():
    gm = GaussianMixture()
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * SIGMA_MAX
    return gm, x, ode_reference(gm, x.clone(), SIGMA_MAX, SIGMA_MIN)


def empirical_order(fn, problem, grid="karras", **options):
    gm, x, ref = problem
    errs = []
    for n in STEPS:
        sig = (get_sigmas_karras if grid == "karras" else get_sigmas_exponential)(n, SIGMA_MIN, SIGMA_MAX)
        out = fn(gm, x.clone(), sig, **options)
        errs.append(float((out - ref).pow(2).mean().sqrt()))
    return -np.polyfit(np.log(STEPS), np.log(errs), 1)[0], errs


# (sampler, options, lowest acceptable order, highest acceptable order)
CASES = {
    "euler": (S.sample_euler, {}, 0.8, 1.3),
    "ddim": (S.sample_ddim, {}, 0.8, 1.3),
    "heun": (S.sample_heun, {}, 1.8, 3.0),
    "edm": (S.sample_edm, {}, 1.8, 3.0),
    "dpmpp_2m": (S.sample_dpmpp_2m, {}, 1.7, 3.0),
    "dpmpp_2m_heun": (S.sample_dpmpp_2m, dict(solver_type="heun"), 1.7, 3.0),
    "dpmsolver_2m_eps": (S.sample_dpmpp_2m, dict(predict_x0=False), 1.6, 3.0),
    "dpmpp_3m": (S.sample_dpmpp_3m, {}, 2.5, 4.5),
    "dpm_solver_2": (S.sample_dpm_solver, {}, 1.6, 3.0),
    "dpm_solver_3": (S.sample_dpm_solver, dict(order=3), 1.8, 4.0),
    "dpm_solver_3_heun": (S.sample_dpm_solver, dict(order=3, solver_type="heun"), 2.2, 4.0),
    "unipc_1": (S.sample_unipc, dict(order=1), 1.6, 3.0),          # UniC raises the order by one
    "unipc_2": (S.sample_unipc, {}, 2.4, 4.0),
    "unipc_2_bh1": (S.sample_unipc, dict(variant="bh1"), 2.4, 4.5),
    "unipc_3": (S.sample_unipc, dict(order=3), 3.2, 5.5),
    # PLMS's Adams-Bashforth weights assume equal steps: about 2nd order on these uneven grids
    "plms": (S.sample_plms, {}, 1.8, 3.5),
    "plms_rk4": (S.sample_plms, dict(warmup="rk4"), 2.0, 4.0),
    "lms": (S.sample_lms, {}, 2.2, 4.5),          # order 4, still pre-asymptotic at 5-40 steps
    "lms_2": (S.sample_lms, dict(order=2), 1.4, 2.5),
    "dpm_2": (S.sample_dpm_2, {}, 1.7, 3.0),
    "deis_2": (S.sample_deis, {}, 1.7, 3.0),
    "dpmpp_2s": (S.sample_dpmpp_sde, dict(eta=0.0), 1.7, 3.0),    # dpmpp_sde without noise: DPM-Solver++(2S)
    "dpmpp_2s_a_eta0": (S.sample_dpmpp_2s_ancestral, dict(eta=0.0), 1.7, 3.0),
    "deis_3": (S.sample_deis, dict(order=3), 2.3, 4.5),     # 2.5 on Karras, 2.75 between 20 and 40 steps
}


@pytest.mark.parametrize("grid", ["karras", "exponential"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_empirical_order(problem, name, grid):
    fn, options, lo, hi = CASES[name]
    order, errs = empirical_order(fn, problem, grid, **options)
    assert lo <= order <= hi, f"{name} on {grid}: order {order:.2f} not in [{lo}, {hi}] (errors {errs})"
    assert errs[-1] < errs[0]


def test_wrong_coefficient_is_caught(problem, monkeypatch):
    """The midpoint D1 weight of DPM-Solver++(2M) off by 20% makes the method first order: caught."""
    real = S._phi_coeffs

    def wrong(h, eta, sde3):
        c0, c1, c1_mid, c2 = real(h, eta, sde3)
        return c0, c1, 0.8 * c1_mid, c2

    monkeypatch.setattr(S, "_phi_coeffs", wrong)
    order, _ = empirical_order(S.sample_dpmpp_2m, problem)
    assert order < CASES["dpmpp_2m"][2], f"a wrong coefficient still gave order {order:.2f}"


def test_state_is_float32_for_low_precision_input(problem):
    gm, x, _ = problem
    out = S.sample_euler(gm, x[:4].to(torch.float16), get_sigmas_karras(4, SIGMA_MIN, SIGMA_MAX))
    assert out.dtype == torch.float32


def test_one_heun_type_step_starts_from_noise():
    """Heun-type samplers default to "leading" spacing on a discrete model (their correction breaks on a first step
    from t=999 of a cosine schedule), but one step has no correction and "leading" would start it at t=0: it takes
    the checkpoint's spacing and equals one Euler step."""
    import fastdiff

    pipe = fastdiff.load("builtin:digits")
    euler = pipe.plan(1, "euler").sigmas
    for sampler in ("heun", "edm", "plms"):
        assert torch.equal(pipe.plan(1, sampler).sigmas, euler), sampler
        assert float(pipe.plan(3, sampler).sigmas[0]) < float(pipe.plan(3, "euler").sigmas[0])  # leading for more
    kw = dict(seeds=[0, 1], class_labels=[3, 5], cfg_scale=3.0, steps=1, progress=False)
    torch.testing.assert_close(pipe.generate(sampler="heun", **kw), pipe.generate(sampler="euler", **kw))
