"""CFG++ samplers (Chung et al. 2024, "CFG++: manifold-constrained classifier free guidance"), by ComfyUI's names
(``comfy/k_diffusion/sampling.py``): ``euler_cfg_pp``, ``euler_ancestral_cfg_pp``, ``dpmpp_2m_cfg_pp``,
``dpmpp_2s_ancestral_cfg_pp``, ``res_multistep_cfg_pp``, ``res_multistep_ancestral_cfg_pp`` and
``gradient_estimation_cfg_pp``.

Where classifier-free guidance steps from x toward the guided x0 along the guided noise, CFG++ lands on the guided
x0 and re-noises with the *unconditional* prediction's noise: Euler's step is x' = D_guided + sigma' (x - D_uncond) /
sigma. Every step needs both predictions apart, which ``CFGDenoiser.denoise_pair_at`` returns from its one batched
call (``sampler_base._call_pair``). As in ComfyUI, the unconditional pass runs at any scale, 1 included
(``Pipeline.guides``, which the Engine, the CLI and ``bench`` ask too); with no unconditional input at all (an
unconditional model), both predictions are the conditional one and the samplers are their plain forms. The guidance
scale is the usual one (CFG++'s lambda is ComfyUI's cfg: small values, 0.5-2, are typical).

The steps are written for the variance-exploding state (x = x0 + sigma eps); on a flow-matching model they run in
the sigma frame (``fastdiff.flow``), where ComfyUI's rectified-flow forms of the Euler ones are the same arithmetic.
"""

from __future__ import annotations

import math

import torch

from .comfy_samplers import gradient_estimation, res_multistep
from .sampler_base import _after, _ancestral, _call_pair, _cb, _setup

__all__ = ["CFG_PP_SAMPLERS", "guides", "sample_euler_cfg_pp", "sample_euler_ancestral_cfg_pp",
           "sample_dpmpp_2m_cfg_pp", "sample_dpmpp_2s_ancestral_cfg_pp", "sample_res_multistep_cfg_pp",
           "sample_res_multistep_ancestral_cfg_pp", "sample_gradient_estimation_cfg_pp"]


@torch.no_grad()
def sample_euler_ancestral_cfg_pp(denoiser, x, sigmas, *, extra_args=None, noise=None, callback=None,
                                  after_step=None, eta: float = 1.0, s_noise: float = 1.0):
    """x' = D_guided + sigma_down (x - D_uncond) / sigma, then fresh noise of std sigma_up (eta 0: no noise)."""
    x, sig, extra, noise = _setup(x, sigmas, extra_args, noise)
    n = len(sig) - 1
    for i in range(n):
        s, s_next = sig[i], sig[i + 1]
        denoised, uncond = _call_pair(denoiser, x, s, extra)
        _cb(callback, x, i, s, s, denoised)
        if s_next == 0:
            x = denoised
        else:
            down, up = _ancestral(s, s_next, eta)
            x = torch.add(denoised, (x - uncond) / s, alpha=down)
            if up > 0 and s_noise > 0:
                x = torch.add(x, noise(i, x), alpha=up * s_noise)
        x = _after(after_step, x, s_next, i == n - 1)
    return x


@torch.no_grad()
def sample_euler_cfg_pp(denoiser, x, sigmas, *, extra_args=None, noise=None, callback=None, after_step=None):
    """CFG++ Euler: ``sample_euler_ancestral_cfg_pp`` without noise."""
    return sample_euler_ancestral_cfg_pp(denoiser, x, sigmas, extra_args=extra_args, noise=noise, callback=callback,
                                         after_step=after_step, eta=0.0, s_noise=0.0)


@torch.no_grad()
def sample_dpmpp_2m_cfg_pp(denoiser, x, sigmas, *, extra_args=None, noise=None, callback=None, after_step=None):
    """DPM-Solver++(2M) in its CFG++ form: x' = D_guided + e^-h (x - D_uncond), with the multistep correction
    -(e^-h - 1) (D_guided - D_uncond_prev) / (2r) from the second step on (not on a step to sigma 0)."""
    x, sig, extra, _ = _setup(x, sigmas, extra_args, None)
    n, old_uncond = len(sig) - 1, None
    for i in range(n):
        s, s_next = sig[i], sig[i + 1]
        denoised, uncond = _call_pair(denoiser, x, s, extra)
        _cb(callback, x, i, s, s, denoised)
        if s_next == 0:  # (e^-h = 0)
            x = denoised
        elif s_next == s:  # (a zero-length step: nothing moves, as plain dpmpp_2m)
            pass
        else:
            h = math.log(s) - math.log(s_next)
            x = torch.add(denoised, x - uncond, alpha=math.exp(-h))
            if old_uncond is not None and sig[i - 1] != s:  # (after a zero-length step: first order)
                r = (math.log(sig[i - 1]) - math.log(s)) / h
                x = torch.add(x, denoised - old_uncond, alpha=-math.expm1(-h) / (2 * r))
        old_uncond = uncond
        x = _after(after_step, x, s_next, i == n - 1)
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral_cfg_pp(denoiser, x, sigmas, *, extra_args=None, noise=None, callback=None,
                                     after_step=None, eta: float = 1.0, s_noise: float = 1.0):
    """DPM-Solver++(2S) ancestral in ComfyUI's CFG++ form: the singlestep update on the unconditional x0s (the
    midpoint's), noise of std sigma_up, then the first evaluation's guidance D_guided - D_uncond added."""
    x, sig, extra, noise = _setup(x, sigmas, extra_args, noise)
    n = len(sig) - 1
    for i in range(n):
        s, s_next = sig[i], sig[i + 1]
        denoised, uncond = _call_pair(denoiser, x, s, extra)
        guidance = denoised - uncond
        down, up = _ancestral(s, s_next, eta)
        _cb(callback, x, i, s, s, denoised)
        if down == 0:  # Euler to 0: the unconditional x0
            x = uncond
        else:
            h = math.log(s) - math.log(down)
            s_mid = s * math.exp(-h / 2)
            x_mid = torch.add(x * (s_mid / s), uncond, alpha=-math.expm1(-h / 2))
            x_mid = _after(after_step, x_mid, s_mid, False)
            _, uncond_mid = _call_pair(denoiser, x_mid, s_mid, extra)
            x = torch.add(x * (down / s), uncond_mid, alpha=-math.expm1(-h))
        if s_next > 0 and up > 0:
            x = torch.add(x, noise(i, x), alpha=up * s_noise)
        x = x + guidance
        x = _after(after_step, x, s_next, i == n - 1)
    return x


@torch.no_grad()
def sample_res_multistep_cfg_pp(denoiser, x, sigmas, *, extra_args=None, noise=None, callback=None, after_step=None,
                                s_noise: float = 1.0):
    """RES multistep in its CFG++ form (``fastdiff.comfy_samplers.res_multistep``)."""
    return res_multistep(denoiser, x, sigmas, extra_args, noise, callback, after_step, 0.0, s_noise, cfg_pp=True)


@torch.no_grad()
def sample_res_multistep_ancestral_cfg_pp(denoiser, x, sigmas, *, extra_args=None, noise=None, callback=None,
                                          after_step=None, eta: float = 1.0, s_noise: float = 1.0):
    """Ancestral RES multistep in its CFG++ form."""
    return res_multistep(denoiser, x, sigmas, extra_args, noise, callback, after_step, eta, s_noise, cfg_pp=True)


@torch.no_grad()
def sample_gradient_estimation_cfg_pp(denoiser, x, sigmas, *, extra_args=None, noise=None, callback=None,
                                      after_step=None, ge_gamma: float = 2.0):
    """Gradient estimation in its CFG++ form (``fastdiff.comfy_samplers.gradient_estimation``)."""
    return gradient_estimation(denoiser, x, sigmas, extra_args, callback, after_step, ge_gamma, cfg_pp=True)


def guides(sampler, cfg_scale: float) -> bool:
    """Whether a run of ``sampler`` at ``cfg_scale`` makes the unconditional pass: at any scale but 1, and at 1 too for
    a CFG++ sampler (ComfyUI evaluates it there as well)."""
    return cfg_scale != 1.0 or (isinstance(sampler, str) and sampler in CFG_PP_SAMPLERS)


CFG_PP_SAMPLERS = frozenset({"euler_cfg_pp", "euler_ancestral_cfg_pp", "dpmpp_2m_cfg_pp", "dpmpp_2s_ancestral_cfg_pp",
                             "res_multistep_cfg_pp", "res_multistep_ancestral_cfg_pp", "gradient_estimation_cfg_pp"})
