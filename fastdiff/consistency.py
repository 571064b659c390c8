"""Multistep consistency sampling (Song et al. 2023, Algorithm 1; Luo et al. 2023, latent consistency models), and
TCD's strategic stochastic sampling (Zheng et al. 2024, trajectory consistency distillation) at the end.

A consistency model (an LCM, or a UNet with an LCM-LoRA merged in) maps any noisy sample straight to its
x0 estimate; few-step sampling alternates that jump with re-noising to the next, lower noise level:

    x0 = f(x, sigma_i);   x = x0 + sigma_{i+1} * z   (no re-noising after the last step)

``sample_lcm`` is k-diffusion's / ComfyUI's ``lcm`` sampler by default. diffusers' ``LCMScheduler`` also
applies the consistency boundary condition f = c_skip(t) x_vp + c_out(t) x0 with the model's discrete
timestep; its plan passes those two scalings per step (``c_skip`` / ``c_out``).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch

from .errors import BadArgumentError
from .sampler_base import _after, _call, _cb, _setup, host_floats
from .state_update import combine

__all__ = ["sample_lcm", "sample_tcd", "lcm_boundary_scalings"]


def lcm_boundary_scalings(timestep: float, timestep_scaling: float = 10.0, sigma_data: float = 0.5) -> tuple:
    """(c_skip, c_out) of LCM's boundary condition at a discrete timestep (diffusers' LCMScheduler)."""
    t = timestep * timestep_scaling
    return sigma_data ** 2 / (t * t + sigma_data ** 2), t / math.sqrt(t * t + sigma_data ** 2)


@torch.no_grad()
def sample_lcm(denoiser, x, sigmas, *, extra_args=None, noise=None, callback=None, after_step=None,
               c_skip: Optional[Sequence[float]] = None, c_out: Optional[Sequence[float]] = None,
               s_noise: float = 1.0, sigma_floor: float = 0.0):
    """Consistency sampling: jump to x0, re-noise to the next sigma with fresh noise (std sigma_{i+1}).

    ``c_skip`` / ``c_out`` (one per step, both or neither): the boundary-condition scalings of diffusers'
    ``LCMScheduler`` (x0 = c_skip * x_vp + c_out * D, x_vp = x / sqrt(1 + sigma^2)); without them x0 = D.
    ``sigma_floor``: the noise std is sqrt(sigma_{i+1}^2 - floor^2), as consistency models re-noise (their
    boundary eps, ``CMStochasticIterativeScheduler``'s sigma_min; its grid ends there, with no noise)."""
    if (c_skip is None) != (c_out is None):
        raise BadArgumentError("c_skip / c_out: expected both (one value per step) or neither")
    x, sig, extra, noise = _setup(x, sigmas, extra_args, noise)
    n = len(sig) - 1
    if c_skip is not None:
        c_skip, c_out = host_floats("c_skip", c_skip, n), host_floats("c_out", c_out, n)
    for i in range(n):
        s, s_next = sig[i], sig[i + 1]
        denoised = _call(denoiser, x, s, extra)
        if c_skip is not None:                         # the consistency function's boundary condition
            denoised = combine([(c_out[i], denoised), (c_skip[i] / math.sqrt(1 + s * s), x)])
        _cb(callback, x, i, s, s, denoised)
        x = denoised
        std = math.sqrt(max(s_next * s_next - sigma_floor * sigma_floor, 0.0))
        if std > 0:
            x = combine([(1.0, x), (std * s_noise, noise(i, x))])
        x = _after(after_step, x, s_next, i == n - 1)
    return x


@torch.no_grad()
def sample_tcd(denoiser, x, sigmas, *, extra_args=None, noise=None, callback=None, after_step=None, eta: float = 0.3,
               sigma_table: Optional[Sequence[float]] = None, timesteps: Optional[Sequence[float]] = None):
    """TCD (diffusers' ``TCDScheduler``, ComfyUI's ``tcd``): from (x, sigma_i) jump along the predicted trajectory
    to sigma_s, the training sigma at timestep floor((1 - eta) t_{i+1}), x_s = x0 + sigma_s * eps; then re-noise
    to sigma_{i+1} with fresh noise of std sqrt(sigma_{i+1}^2 - sigma_s^2). eta = 0 is DDIM. The last step
    ends at sigma_s = sigma(t = 0), as diffusers does (the grid's last sigma).

    Needs the model's training sigma table (``sigma_table``, index = timestep) and the grid's timesteps
    (``timesteps``, one per grid sigma; the last, 0): a TCDScheduler plan or the Pipeline passes both."""
    if sigma_table is None or timesteps is None:
        raise BadArgumentError("tcd: expected sigma_table= and timesteps= (a discrete-time model's training sigmas "
                               "and the grid's timesteps); a TCDScheduler plan or Pipeline.generate passes them")
    if not 0 <= eta <= 1:
        raise BadArgumentError(f"eta: expected a number in [0, 1] (TCD's gamma), found {eta!r}")
    x, sig, extra, noise = _setup(x, sigmas, extra_args, noise)
    n = len(sig) - 1
    ts = host_floats("timesteps", timesteps, n + 1)
    table = host_floats("sigma_table", sigma_table, len(sigma_table))
    # floor((1 - eta) t) in float32, as diffusers' and ComfyUI's torch.floor compute it (0.7 * 90 is 62.99... in
    # float64 but 63 in float32)
    t_s = [int(np.floor(np.float32(1 - eta) * np.float32(t))) for t in ts[1:]]
    bad = next((t for t in t_s if not 0 <= t < len(table)), None)
    if bad is not None:
        raise BadArgumentError(f"timesteps: expected timesteps inside sigma_table (0..{len(table) - 1}), found one "
                               f"landing on {bad}")
    for i in range(n):
        s, s_next = sig[i], sig[i + 1]
        denoised = _call(denoiser, x, s, extra)
        _cb(callback, x, i, s, s, denoised)
        s_s = table[t_s[i]]                            # eta = 0: s_next itself on integer timesteps
        x = torch.lerp(denoised, x, s_s / s)          # x0 + sigma_s * eps, eps = (x - x0) / sigma
        if i == n - 1:
            x = _after(after_step, x, s_next, True)
            break
        if eta > 0:
            x = torch.add(x, noise(i, x), alpha=math.sqrt(max(s_next * s_next - s_s * s_s, 0.0)))
        elif s_s != s_next:  # floor() of a fractional timestep: the variance-preserving sample read at s_next
            x = x * math.sqrt((1 + s_next * s_next) / (1 + s_s * s_s))
        x = _after(after_step, x, s_next, False)
    return x
