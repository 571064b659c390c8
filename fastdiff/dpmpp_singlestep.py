"""Singlestep DPM-Solver++ samplers of k-diffusion: ``sample_dpmpp_2s_ancestral`` ("DPM++ 2S a") and
``sample_dpmpp_sde`` ("DPM++ SDE"); 2 network calls per step, 1 on the step to sigma = 0.

``dpmpp_2s_ancestral``: DPM-Solver++(2S) (Lu et al. 2022b, Algorithm 1, r = 1/2) down to sigma_down, then fresh
noise of std sigma_up (the ancestral split of sigma -> sigma').

``dpmpp_sde``: each step takes an ancestral DPM-Solver++(1) half step to sigma_s = sigma^(1-r) sigma'^r, evaluates the
network there, and takes the ancestral step to sigma' with the blend (1 - 1/2r) D + 1/2r D_s (2 calls per
step; the step to sigma = 0 is one Euler call).

Its two noise injections in a step are increments of ONE Brownian motion in sigma, over [sigma_s, sigma] and
[sigma', sigma]: the second contains the first. k-diffusion draws them from torchsde's Brownian tree; here
they come from the sample's own generator (two standard normal draws z1, z2 per step) joined as the Brownian
bridge has them: n1 = z1, n2 = (sqrt(sigma - sigma_s) z1 + sqrt(sigma_s - sigma') z2) / sqrt(sigma - sigma'),
the same joint distribution. Steps cover disjoint intervals, so their noises are independent, as in the tree.
"""

from __future__ import annotations

import math

import torch

from .errors import BadArgumentError
from .sampler_base import _after, _ancestral, _call, _cb, _setup

__all__ = ["sample_dpmpp_2s_ancestral", "sample_dpmpp_sde", "joined_increment"]


def joined_increment(z1: torch.Tensor, z2: torch.Tensor, sigma: float, sigma_mid: float, sigma_next: float):
    """The normalised Brownian increment over [sigma_next, sigma] whose part over [sigma_mid, sigma] has the
    normalised increment z1 (z2 independent): (sqrt(sigma - sigma_mid) z1 + sqrt(sigma_mid - sigma_next) z2)
    / sqrt(sigma - sigma_next). Unit variance; correlation sqrt((sigma - sigma_mid) / (sigma - sigma_next))."""
    a, b = math.sqrt(sigma - sigma_mid), math.sqrt(sigma_mid - sigma_next)
    return torch.add(z1 * (a / math.hypot(a, b)), z2, alpha=b / math.hypot(a, b))


@torch.no_grad()
def sample_dpmpp_sde(denoiser, x, sigmas, *, extra_args=None, noise=None, callback=None, after_step=None,
                     eta: float = 1.0, s_noise: float = 1.0, r: float = 0.5):
    """DPM-Solver++ SDE (see the module doc). ``eta`` scales the injected noise (0: the deterministic
    DPM-Solver++(2S)); ``r`` places the intermediate point (1/2: the geometric mean of sigma and sigma').
    ``noise`` is called twice per step with the same step index: it must return fresh draws on each call (as
    ``NoiseSource`` does), not one draw per index."""
    if not 0 < r <= 1:
        raise BadArgumentError(f"r: expected a number in (0, 1], found {r!r}")
    x, sig, extra, noise = _setup(x, sigmas, extra_args, noise)
    fac = 1 / (2 * r)
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        denoised = _call(denoiser, x, s, extra)
        _cb(callback, x, i, s, s, denoised)
        if s_next == 0 or s_next == s:               # the end (x0), or a zero-length step
            x = _after(after_step, denoised if s_next == 0 else x, s_next, i == len(sig) - 2)
            continue
        # clamped: for r = 1 (or a tiny r) the rounding of exp(log) can land just outside [sigma', sigma]
        s_mid = min(max(math.exp((1 - r) * math.log(s) + r * math.log(s_next)), s_next), s)
        down, up = _ancestral(s, s_mid, eta)
        x_2 = torch.lerp(denoised, x, down / s)       # DPM-Solver++(1) = DDIM to sigma_down
        if eta > 0:
            z1, z2 = noise(i, x), noise(i, x)
            x_2 = torch.add(x_2, z1, alpha=up * s_noise)
        denoised_2 = _call(denoiser, _after(after_step, x_2, s_next, False), s_mid, extra)
        down, up = _ancestral(s, s_next, eta)
        denoised_d = torch.lerp(denoised, denoised_2, fac)   # (1 - fac) D + fac D_s
        x = torch.lerp(denoised_d, x, down / s)
        if eta > 0:
            x = torch.add(x, joined_increment(z1, z2, s, s_mid, s_next), alpha=up * s_noise)
        x = _after(after_step, x, s_next, i == len(sig) - 2)
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(denoiser, x, sigmas, *, extra_args=None, noise=None, callback=None, after_step=None,
                              eta: float = 1.0, s_noise: float = 1.0):
    """DPM-Solver++(2S) ancestral (see the module doc); ``eta=0`` is the deterministic DPM-Solver++(2S)."""
    x, sig, extra, noise = _setup(x, sigmas, extra_args, noise)
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        denoised = _call(denoiser, x, s, extra)
        _cb(callback, x, i, s, s, denoised)
        if s == s_next:                               # a zero-length step
            x = _after(after_step, x, s_next, i == len(sig) - 2)
            continue
        down, up = _ancestral(s, s_next, eta)
        if down == 0:
            x = denoised
        else:                                         # the half step in lambda: sigma_mid = sqrt(sigma sigma_down)
            s_mid = math.sqrt(s * down)
            x_2 = _after(after_step, torch.lerp(denoised, x, s_mid / s), s_mid, False)  # (no diffusers counterpart)
            x = torch.lerp(_call(denoiser, x_2, s_mid, extra), x, down / s)
        if up > 0:
            x = torch.add(x, noise(i, x), alpha=up * s_noise)
        x = _after(after_step, x, s_next, i == len(sig) - 2)
    return x
