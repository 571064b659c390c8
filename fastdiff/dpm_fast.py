"""DPM-Solver-fast (Lu et al. 2022, section 3.4): k-diffusion's ``sample_dpm_fast``, AUTOMATIC1111's and ComfyUI's
"DPM fast".

It takes only the grid's ends and its length from ``sigmas``, as ComfyUI's wrapper does: sigma_max = sigmas[0],
sigma_min = the last nonzero sigma, NFE = len(sigmas) - 1 network evaluations. Those are spent on m = NFE // 3 + 1
steps evenly spaced in lambda = -log(sigma) (DPM-Solver's "time uniform" steps), of order 3 but for the last ones
(orders 3, ..., 3, 2, 1 where NFE divides by 3, else 3, ..., 3, NFE mod 3), in DPM-Solver's noise-prediction form
(its singlestep updates with r1 = 1/3, r2 = 2/3, or 1/2 at second order). The run ends at sigma_min, not at 0: its
result keeps sigma_min's noise, as in k-diffusion. ``eta`` > 0 makes each step ancestral (down to
max(sigma_min, sigma_down), then noise back up to the step's end), one draw per step.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .sampler_base import _after, _ancestral, _call, _cb, _setup

__all__ = ["sample_dpm_fast", "dpm_fast_orders"]


def dpm_fast_orders(nfe: int) -> list:
    """The order of each step of an ``nfe``-evaluation run (they sum to nfe)."""
    m = nfe // 3 + 1
    return [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]


def _eps(denoiser, x, sigma: float, extra):
    return (x - _call(denoiser, x, sigma, extra)) / sigma


def _step(denoiser, x, eps, t: float, t_to: float, order: int, extra):
    """One DPM-Solver update of ``order`` from lambda t to t_to (eps: the noise prediction at t)."""
    h = t_to - t
    s_to = math.exp(-t_to)
    x_1 = x - s_to * math.expm1(h) * eps  # (first order: DDIM in the eps form)
    if order == 1:
        return x_1
    r1 = 1 / 2 if order == 2 else 1 / 3
    s1 = t + r1 * h
    u1 = x - math.exp(-s1) * math.expm1(r1 * h) * eps
    eps_r1 = _eps(denoiser, u1, math.exp(-s1), extra)
    if order == 2:
        return x_1 - s_to / (2 * r1) * math.expm1(h) * (eps_r1 - eps)
    r2 = 2 / 3
    s2 = t + r2 * h
    u2 = (x - math.exp(-s2) * math.expm1(r2 * h) * eps
          - math.exp(-s2) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1) * (eps_r1 - eps))
    eps_r2 = _eps(denoiser, u2, math.exp(-s2), extra)
    return x_1 - s_to / r2 * (math.expm1(h) / h - 1) * (eps_r2 - eps)


@torch.no_grad()
def sample_dpm_fast(denoiser, x, sigmas, *, extra_args=None, noise=None, callback=None, after_step=None,
                    eta: float = 0.0, s_noise: float = 1.0):
    """DPM-Solver-fast over ``sigmas``' range with len(sigmas) - 1 network evaluations (see the module doc)."""
    x, sig, extra, noise = _setup(x, sigmas, extra_args, noise)
    nfe = len(sig) - 1
    sigma_max = sig[0]
    sigma_min = sig[-1] if sig[-1] > 0 else sig[-2]  # (a one-step grid to 0: both ends sigma_max, no step taken)
    t_start, t_end = -math.log(sigma_max), -math.log(sigma_min)
    orders = dpm_fast_orders(nfe)
    ts = np.linspace(t_start, t_end, len(orders) + 1)
    for i, order in enumerate(orders):
        t, t_next = float(ts[i]), float(ts[i + 1])
        s, s_next = math.exp(-t), math.exp(-t_next)
        t_to, up = t_next, 0.0
        if eta > 0:  # ancestral: down to sigma_down (not below sigma_min), noise back up to s_next
            down = max(sigma_min, _ancestral(s, s_next, eta)[0])
            t_to, up = -math.log(down), math.sqrt(max(s_next ** 2 - down ** 2, 0.0))
        denoised = _call(denoiser, x, s, extra)
        _cb(callback, x, i, s, s, denoised)
        x = _step(denoiser, x, (x - denoised) / s, t, t_to, order, extra)
        if up > 0:
            x = torch.add(x, noise(i, x), alpha=up * s_noise)
        x = _after(after_step, x, s_next, i == len(orders) - 1)
    return x
