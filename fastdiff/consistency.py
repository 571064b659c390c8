"""Multistep consistency sampling (Song et al. 2023, Algorithm 1; Luo et al. 2023, latent consistency models).

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

import torch

from .errors import BadArgumentError
from .sampler_base import _call, _cb, _setup, host_floats
from .state_update import combine

__all__ = ["sample_lcm", "lcm_boundary_scalings"]


def lcm_boundary_scalings(timestep: float, timestep_scaling: float = 10.0, sigma_data: float = 0.5) -> tuple:
    """(c_skip, c_out) of LCM's boundary condition at a discrete timestep (diffusers' LCMScheduler)."""
    t = timestep * timestep_scaling
    return sigma_data ** 2 / (t * t + sigma_data ** 2), t / math.sqrt(t * t + sigma_data ** 2)


@torch.no_grad()
def sample_lcm(denoiser, x, sigmas, *, extra_args=None, noise=None, callback=None,
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
    return x
