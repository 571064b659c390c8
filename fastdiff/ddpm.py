"""Ancestral DDPM sampling (Ho et al. 2020, eq. 6-7), with a fixed or a learned variance.

Each step samples the posterior q(x_{t'} | x_t, x0 = D(x_t)) on any grid, in sigma units (x = x0 + sigma * eps).
Its mean is the same for every variance; the noise's std is diffusers' ``DDPMScheduler._get_variance``:

* ``fixed_small``: the posterior variance beta~ = (1 - a') / (1 - a) * beta (a, a' the alphas_cumprod of t, t';
  beta = 1 - a / a', the step's own beta on a respaced grid);
* ``fixed_large``: beta;
* ``learned_range`` (Nichol & Dhariwal 2021, eq. 15; guided-diffusion and DiT networks with ``learn_sigma``): the
  network's variance channels v in [-1, 1] interpolate log-linearly, log var = f log beta + (1 - f) log beta~ with
  f = (v + 1) / 2, beta~ clamped to 1e-20 as diffusers does (the step to t' = 0 has beta~ = 0). guided-diffusion's
  ``p_sample`` is the same draw (its table in float64; here the float32 alphas_cumprod of diffusers, each step's
  arithmetic in float64 on the host: the two agree to about 1e-6);
* ``learned``: v is the variance itself (diffusers' reading; its std is sqrt(v)).

The variances are variance-preserving ones; the state is x_vp * sqrt(1 + sigma'^2), so each std is scaled by that.

Classifier guidance (``fastdiff.classifier_guidance``: a denoiser with ``guidance``) moves the posterior mean by
the variance times the classifier's gradient, guided-diffusion's ``condition_mean``: var_vp g, in the state's frame
var_vp sqrt(1 + sigma'^2) g = std^2 / sqrt(1 + sigma'^2) g.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .errors import BadArgumentError
from .sampler_base import _after, _ancestral, _call, _cb, _setup

VARIANCES = ("fixed_small", "fixed_large", "learned_range", "learned")


def _log_variances(s: float, s_next: float):
    """(log beta~, log beta) of the step s -> s_next, in the variance-preserving frame (float64 on the host)."""
    beta = (s * s - s_next * s_next) / (1 + s * s)                      # 1 - a / a'
    posterior = s_next * s_next / (1 + s_next * s_next) / (s * s / (1 + s * s)) * beta  # (1 - a') / (1 - a) beta
    return math.log(max(posterior, 1e-20)), math.log(beta)


def learned_std(v: torch.Tensor, variance: str, s: float, s_next: float) -> torch.Tensor:
    """The noise's std (sigma units) for the network's variance channels ``v`` on the step s -> s_next."""
    frame = math.sqrt(1 + s_next * s_next)
    if variance == "learned":
        return v.sqrt() * frame
    return _range_std(v, *_log_variances(s, s_next), frame)


def _range_std(v: torch.Tensor, lo: float, hi: float, frame: float) -> torch.Tensor:
    """The learned range's std times ``frame``: exp(0.5 (lo + (v + 1) / 2 (hi - lo))) * frame, as one multiply-add and
    an exp (log variances lo, hi: beta~'s and beta's)."""
    a = 0.25 * (hi - lo)
    return torch.exp(v * a + (0.5 * lo + a + math.log(frame)))


def _last_step_variance(variance: str, lo_prev: Optional[float], s: float, v=None):
    """guided-diffusion's variance at its last step (t = 0), which classifier guidance's ``condition_mean``
    multiplies the gradient by: its clipped posterior log-variance there is the step before's
    (``posterior_log_variance_clipped[0] = log(posterior_variance[1])``), its FIXED_LARGE variance the same, its
    FIXED_SMALL one 0. ``lo_prev``: that log posterior variance (None for a one-step run, which has no step before:
    the clamp of 1e-20 stands in)."""
    lo = math.log(1e-20) if lo_prev is None else lo_prev
    if variance == "fixed_small":
        return 0.0
    if variance == "fixed_large":
        return math.exp(lo)
    if variance == "learned":
        return v
    return _range_std(v, lo, _log_variances(s, 0.0)[1], 1.0) ** 2  # learned_range: exp(f log beta + (1 - f) lo)


def _call_variance(denoiser, x, sigma: float, extra: dict):
    at = getattr(denoiser, "denoise_variance_at", None)
    if at is None:
        raise BadArgumentError(f"variance: a learned variance needs a fastdiff Denoiser (its denoise_variance_at), "
                               f"found {type(denoiser).__name__}")
    x0, v = at(x, sigma, **extra)
    return x0.to(x.dtype), v.to(x.dtype)


@torch.no_grad()
def sample_ddpm(denoiser, x, sigmas, *, extra_args=None, noise=None, callback=None, after_step=None,
                variance: str = "fixed_small", s_noise: float = 1.0, final_noise: bool = False,
                sigma_before: Optional[float] = None):
    """Ancestral DDPM sampling. ``variance``: "fixed_small", "fixed_large", "learned_range" or "learned" (diffusers'
    ``variance_type``; the learned ones read the network's variance channels). ``final_noise``: also add noise on
    the step to sigma = 0 (beta = 1 - a there, beta~ = 0), as diffusers does when the last timestep is > 0 (a
    fixed_small step adds none). ``sigma_before``: the grid's sigma before ``sigmas[0]`` when this is the tail of a
    longer grid (``SamplingPlan.from_step``): classifier guidance's last step reads the variance of the step before
    it, as guided-diffusion's ``posterior_variance[1]``."""
    if variance not in VARIANCES:
        raise BadArgumentError(f"variance: expected one of {VARIANCES}, found {variance!r}")
    learned = variance.startswith("learned")
    guidance = getattr(denoiser, "guidance", None)  # classifier guidance, on the posterior mean
    if guidance is not None:
        denoiser = denoiser.inner
    x, sig, extra, noise = _setup(x, sigmas, extra_args, noise)
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        if learned:
            denoised, v = _call_variance(denoiser, x, s, extra)
        else:
            v = None
            denoised = _call(denoiser, x, s, extra)
        _cb(callback, x, i, s, s, denoised)
        grad = None if guidance is None else guidance.gradient(x, s)  # at x_t, before the step
        last = i == len(sig) - 2
        if s_next == 0:
            x = denoised
            if grad is not None:  # (the mean moves on the last step too, by guided-diffusion's variance at t = 0)
                before = sig[i - 1] if i > 0 else sigma_before
                lo_prev = None if before is None else _log_variances(before, s)[0]
                x = x + grad * _last_step_variance(variance, lo_prev, s, v)
            if final_noise and variance != "fixed_small":
                std = learned_std(v, variance, s, 0.0) if learned else s / math.sqrt(1 + s ** 2)
                x = x + noise(i, x) * (std * s_noise)
            x = _after(after_step, x, s_next, last)
            continue
        down, up = _ancestral(s, s_next, 1.0)
        x = torch.lerp(denoised, x, down / s)  # posterior mean: x0 + sigma_down * eps
        if learned:
            std = learned_std(v, variance, s, s_next)
        else:
            if variance == "fixed_large":             # std sqrt(beta_t), in sigma units
                up = math.sqrt((s ** 2 - s_next ** 2) * (1 + s_next ** 2) / (1 + s ** 2))
            std = up
        if grad is not None:                          # mean + var_vp g, in the state's frame
            x = x + grad * (std * std / math.sqrt(1 + s_next ** 2))
        if learned:
            x = torch.addcmul(x, noise(i, x), std, value=s_noise)
        else:
            x = torch.add(x, noise(i, x), alpha=std * s_noise)
        x = _after(after_step, x, s_next, last)
    return x
