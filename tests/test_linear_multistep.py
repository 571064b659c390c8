"""PLMS against a float64 transcription of Stable Diffusion's ``PLMSSampler`` (CompVis/latent-diffusion, in the
variance-preserving frame), the LMS / DEIS weights, and their edge cases. LMS against k-diffusion's own
``sample_lms``: ``test_k_diffusion_parity.py``; diffusers' PNDM and LMS schedulers: ``test_scheduler_parity.py``."""

import math

import numpy as np
import pytest
import torch

from fastdiff.errors import BadArgumentError
from fastdiff.linear_multistep import deis_weights, lms_weights, sample_deis, sample_lms, sample_plms
from helpers import smooth_denoiser as denoiser

GRIDS = {
    "to_zero": [14.6, 7.0, 3.1, 1.4, 0.6, 0.25, 0.09, 0.029, 0.0],
    "to_sigma_min": [9.0, 5.5, 2.0, 1.2, 0.5, 0.2, 0.0292],     # SD's leading grid ends at alphas_cumprod[0]
    "two_steps": [6.0, 1.0, 0.0],
}


def start(sigma0):
    torch.manual_seed(0)
    return torch.randn(2, 3, 5, 5, dtype=torch.float64) * sigma0


def ldm_plms(x_sigma, sigmas):
    """CompVis ``PLMSSampler.p_sample_plms`` (eta=0), with alphas_cumprod 1 / (1 + sigma^2) of the grid."""
    alphas = [1 / (1 + s * s) for s in sigmas]
    x = x_sigma / math.sqrt(1 + sigmas[0] ** 2)       # the VP sample

    def eps_model(x_vp, idx):
        s = sigmas[idx]
        d = denoiser(x_vp * math.sqrt(1 + s * s), torch.full((x_vp.shape[0],), s, dtype=torch.float64))
        return (x_vp * math.sqrt(1 + s * s) - d) / s

    def x_prev(x_vp, e, idx):
        a_t, a_prev = alphas[idx], alphas[idx + 1]
        pred_x0 = (x_vp - math.sqrt(1 - a_t) * e) / math.sqrt(a_t)
        return math.sqrt(a_prev) * pred_x0 + math.sqrt(1 - a_prev) * e

    old_eps = []
    for i in range(len(sigmas) - 1):
        e_t = eps_model(x, i)
        if not old_eps:
            e_next = eps_model(x_prev(x, e_t, i), i + 1) if sigmas[i + 1] > 0 else e_t
            e_prime = (e_t + e_next) / 2
        elif len(old_eps) == 1:
            e_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x = x_prev(x, e_prime, i)
        old_eps = (old_eps + [e_t])[-3:]
    return x * math.sqrt(1 + sigmas[-1] ** 2)       # back to the sigma frame


@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_plms_equals_stable_diffusions_plms_sampler(grid):
    sigmas = GRIDS[grid]
    x = start(sigmas[0])
    got = sample_plms(denoiser, x.clone(), torch.tensor(sigmas, dtype=torch.float64))
    torch.testing.assert_close(got, ldm_plms(x.clone(), sigmas), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("grid", [[10.0, 0.0, 0.0], [10.0, 3.0, 0.0, 0.0]])
@pytest.mark.parametrize("sampler", [sample_lms, sample_deis])
def test_repeated_final_zero(sampler, grid):
    """A zero-length step at sigma = 0 divided by 0 forming the noise prediction."""
    out = sampler(denoiser, start(10.0), grid)
    assert torch.isfinite(out).all()
    if sampler is sample_lms:  # (DEIS's final-order rule counts the steps: one more changes it)
        torch.testing.assert_close(out, sampler(denoiser, start(10.0), grid[:-1]))


@pytest.mark.parametrize("sampler", [sample_lms, sample_deis])
def test_repeated_interior_sigma_is_a_zero_length_step(sampler):
    """A repeated sigma re-evaluates the same state: the interpolation keeps distinct nodes (it divided by 0)."""
    x = start(10.0)
    got = sampler(denoiser, x.clone(), [10.0, 5.0, 5.0, 1.0, 0.2, 0.0])
    assert torch.isfinite(got).all()
    if sampler is sample_lms:  # LMS has no step-count rules: the same as without the repeat
        torch.testing.assert_close(got, sampler(denoiser, x.clone(), [10.0, 5.0, 1.0, 0.2, 0.0]))


def test_lms_weights_integrate_polynomials_exactly():
    """The weights reproduce the integral of any polynomial of degree < len(nodes) from its node values."""
    nodes, lo, hi = [0.7, 1.3, 2.2, 4.0], 0.7, 0.31
    w = lms_weights(nodes, lo, hi)
    p = np.polynomial.Polynomial([0.3, -1.2, 0.5, 0.25])
    exact = p.integ()(hi) - p.integ()(lo)
    assert sum(wj * p(t) for wj, t in zip(w, nodes)) == pytest.approx(exact, rel=1e-12)


def diffusers_deis_coefficients(rho_t, rhos):
    """diffusers' closed forms (``multistep_deis_second/third_order_update``) of the log-rho weights."""
    log = np.log
    if len(rhos) == 1:
        return [rho_t - rhos[0]]
    if len(rhos) == 2:
        def ind(t, b, c):
            return t * (-log(c) + log(t) - 1) / (log(b) - log(c))
        r0, r1 = rhos
        return [ind(rho_t, r0, r1) - ind(r0, r0, r1), ind(rho_t, r1, r0) - ind(r0, r1, r0)]

    def ind(t, b, c, d):
        num = t * (log(c) * (log(d) - log(t) + 1) - log(d) * log(t) + log(d) + log(t) ** 2 - 2 * log(t) + 2)
        return num / ((log(b) - log(c)) * (log(b) - log(d)))
    r0, r1, r2 = rhos
    return [ind(rho_t, r0, r1, r2) - ind(r0, r0, r1, r2), ind(rho_t, r1, r2, r0) - ind(r0, r1, r2, r0),
            ind(rho_t, r2, r0, r1) - ind(r0, r2, r0, r1)]


@pytest.mark.parametrize("nodes", [[1.9], [1.9, 4.2], [1.9, 4.2, 9.5], [0.03, 0.09, 0.25]])
def test_deis_weights_equal_diffusers_closed_forms(nodes):
    for rho_t in (0.7 * nodes[0], 0.2 * nodes[0]):
        assert deis_weights(nodes, nodes[0], rho_t) == pytest.approx(diffusers_deis_coefficients(rho_t, nodes),
                                                                   rel=1e-12, abs=1e-14)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_deis_equals_its_multistep_update(order):
    """x' = x + sum_j c_j eps_{i-j}, orders rising 1, 2, .. up to ``order``; fewer than 15 steps: the last two
    steps at orders 1 and 2 (diffusers' lower_order_final); the step to sigma = 0 is DDIM's, to x0."""
    sigmas = GRIDS["to_zero"]
    x = start(sigmas[0])
    got = sample_deis(denoiser, x.clone(), sigmas, order=order)
    n, eps, want = len(sigmas) - 1, [], x.clone()
    for i in range(n):
        s = sigmas[i]
        eps.append((want - denoiser(want, torch.full((2,), s, dtype=torch.float64))) / s)
        k = min(order, i + 1, 1 if i == n - 1 else 2 if i == n - 2 else order)
        if sigmas[i + 1] == 0:
            want = want - s * eps[-1]
            continue
        c = diffusers_deis_coefficients(sigmas[i + 1], [sigmas[i - j] for j in range(k)])
        want = want + sum(cj * eps[-1 - j] for j, cj in enumerate(c))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def count_calls(warmup, steps):
    calls = []

    def counting(x, sigma, **_):
        calls.append(float(sigma[0]))
        return denoiser(x, sigma)

    sigmas = np.geomspace(10, 0.05, steps).tolist() + [0.0]
    sample_plms(counting, start(10.0), sigmas, warmup=warmup)
    return calls, sigmas


def test_plms_network_calls():
    """Euler warm-up: one extra call, at the end of the first step; Runge-Kutta: 4 calls on each of the first 3
    steps (the midpoints are the geometric means by default); then one call per step."""
    calls, sigmas = count_calls("euler", 6)
    assert calls == [sigmas[0], sigmas[1]] + sigmas[1:6]
    calls, sigmas = count_calls("rk4", 6)
    assert len(calls) == 3 * 4 + 3
    assert calls[1] == pytest.approx(math.sqrt(sigmas[0] * sigmas[1])) and calls[3] == sigmas[1]


@pytest.mark.parametrize("options,match", [
    (dict(warmup="prk"), "warmup"),
    (dict(multistep_on="x0"), "multistep_on"),
    (dict(sigmas_to=[1.0]), "sigmas_to"),
    (dict(sigmas_to=5), "sigmas_to"),
    (dict(sigmas_to=["a"] * 6), "sigmas_to"),
    (dict(sigmas_to=[math.nan] * 6), "sigmas_to"),
    (dict(warmup_from="abc"), "warmup_from"),
    (dict(warmup_from=math.inf), "warmup_from"),
    (dict(warmup="rk4", sigmas_mid=[1.0]), "sigmas_mid"),
    (dict(warmup="rk4", sigmas_mid=[0.0, 0.0, 0.0]), "sigmas_mid"),
    (dict(warmup="rk4", sigmas_mid=[1.0] * 4), "sigmas_mid"),
    (dict(sigmas_mid=[1.0, 1.0, 1.0]), "warmup='rk4'"),
])
def test_plms_bad_options(options, match):
    with pytest.raises(BadArgumentError, match=match):
        sample_plms(denoiser, start(9.0), GRIDS["to_sigma_min"], **options)


@pytest.mark.parametrize("order", [0, 2.5, True])
def test_lms_bad_order(order):
    with pytest.raises(BadArgumentError, match="order"):
        sample_lms(denoiser, start(9.0), GRIDS["two_steps"], order=order)


def test_per_step_options_take_numpy_values():
    """A per-step list built from a NumPy grid (float32 elements) was refused as 'not a number'; bools still are."""
    import numpy as np

    grid = GRIDS["to_sigma_min"]
    to = [float(s) for s in grid[1:]]
    want = sample_plms(denoiser, start(9.0), grid, sigmas_to=to)
    got = sample_plms(denoiser, start(9.0), grid, sigmas_to=list(np.asarray(to, dtype=np.float64)))
    torch.testing.assert_close(got, want)
    assert torch.isfinite(sample_plms(denoiser, start(9.0), grid, sigmas_to=list(np.asarray(to, dtype=np.float32)))).all()
    with pytest.raises(BadArgumentError, match="sigmas_to"):
        sample_plms(denoiser, start(9.0), grid, sigmas_to=[True] * len(to))
