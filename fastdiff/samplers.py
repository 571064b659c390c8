"""Samplers: one function per method, each the paper's steps, k-diffusion / EDM style.

Every sampler has the signature

    sample_<name>(denoiser, x, sigmas, *, extra_args=None, noise=None, callback=None, after_step=None,
                  **options) -> x0

* ``denoiser(x, sigma, **extra_args) -> x0`` (see ``fastdiff.denoiser``), sigma a (B,) float32 tensor.
* ``x``: the initial state at ``sigmas[0]`` (already scaled: ``x = latents * sigmas[0]`` or what the plan
  says); the state is kept in float32 whatever the network runs in (float64 if given float64).
* ``sigmas``: the decreasing grid, on the HOST (list or CPU tensor), converted to Python floats before the
  loop. The loop branches on Python floats only and never reads a device value back (no ``.item()``, no
  ``if tensor``), so a whole run can be captured in one CUDA graph.
* ``noise(step_index, like) -> Tensor``: the noise source of stochastic samplers (None -> randn_like).
  Pass ``fastdiff.noise.NoiseSource(seeds)`` so that sample i depends on seed i only.
* ``callback(dict(x=, i=, sigma=, sigma_hat=, denoised=))`` after each network evaluation.
* ``after_step(x, sigma, last) -> x``: the state each step hands on passes through it (``sampler_base._after``;
  inpainting with a regular model pastes the known region back there).

The math is written in sigma units (x = x0 + sigma * eps; lambda = -log sigma is DPM-Solver's
half-log-SNR). Diffusers' variance-preserving schedulers are the same methods in another frame; the
options named after diffusers' settings reproduce its schedulers exactly (see ``scheduler_config``).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .cfg_pp import (sample_dpmpp_2m_cfg_pp, sample_dpmpp_2s_ancestral_cfg_pp, sample_euler_ancestral_cfg_pp,
                     sample_euler_cfg_pp, sample_gradient_estimation_cfg_pp, sample_res_multistep_ancestral_cfg_pp,
                     sample_res_multistep_cfg_pp)
from .comfy_samplers import (sample_er_sde, sample_exp_heun_2_x0, sample_exp_heun_2_x0_sde, sample_gradient_estimation,
                             sample_heunpp2, sample_ipndm, sample_ipndm_v, sample_res_multistep,
                             sample_res_multistep_ancestral, sample_seeds_2, sample_seeds_3)
from .consistency import sample_lcm, sample_tcd
from .ddpm import sample_ddpm
from .dpm_fast import sample_dpm_fast
from .dpmpp_singlestep import sample_dpmpp_2s_ancestral, sample_dpmpp_sde
from .errors import BadArgumentError
from .linear_multistep import sample_deis, sample_lms, sample_plms
from .sampler_base import (_after, _ancestral, _call, _cb, _setup, host_floats,  # noqa: F401  (host_sigmas: API)
                           host_sigmas, multistep_order)
from .state_update import combine

__all__ = [
    "SAMPLERS", "sample_ddim", "sample_ddpm", "sample_euler", "sample_euler_ancestral", "sample_heun",
    "sample_dpmpp_2m", "sample_dpmpp_3m", "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde", "sample_dpm_solver",
    "sample_unipc", "sample_edm", "sample_plms", "sample_lms", "sample_lcm", "sample_dpm_2",
    "sample_dpm_2_ancestral", "sample_deis", "sample_dpmpp_sde", "sample_dpmpp_2s_ancestral", "sample_tcd",
    "sample_dpm_fast", "sample_ipndm", "sample_ipndm_v", "sample_gradient_estimation", "sample_res_multistep",
    "sample_res_multistep_ancestral", "sample_heunpp2", "sample_er_sde", "sample_seeds_2", "sample_seeds_3",
    "sample_exp_heun_2_x0", "sample_exp_heun_2_x0_sde", "sample_euler_cfg_pp", "sample_euler_ancestral_cfg_pp",
    "sample_dpmpp_2m_cfg_pp", "sample_dpmpp_2s_ancestral_cfg_pp", "sample_res_multistep_cfg_pp",
    "sample_res_multistep_ancestral_cfg_pp", "sample_gradient_estimation_cfg_pp",
    "invert_ddim",
]


# --------------------------------------------------------------------------------------------------
# Shared helpers (host floats only)
# --------------------------------------------------------------------------------------------------

def _churn(x, i, sigma, n, noise, s_churn, s_tmin, s_tmax, s_noise):
    """EDM's stochastic churn (Karras et al. 2022, Algorithm 2): (x raised to sigma_hat, sigma_hat), with
    gamma_i = min(s_churn / n, sqrt 2 - 1) inside [s_tmin, s_tmax], else x and sigma unchanged."""
    gamma = min(s_churn / n, 2 ** 0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    s_hat = sigma * (gamma + 1)
    if gamma > 0:  # raise the noise level to sigma_hat
        x = x + noise(i, x) * (s_noise * math.sqrt(s_hat ** 2 - sigma ** 2))
    return x, s_hat


# --------------------------------------------------------------------------------------------------
# DDIM / DDPM
# --------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample_ddim(denoiser, x, sigmas, *, extra_args=None, noise=None, callback=None, after_step=None, eta: float = 0.0,
                s_noise: float = 1.0, clip_x0: Optional[Callable] = None, sigmas_to: Optional[Sequence] = None):
    """DDIM (Song et al. 2021, eq. 12), in sigma units: x' = x0 + sigma_down * eps + sigma_up * z.

    eta=0 is the deterministic DDIM; eta=1 the DDPM posterior. Options reproducing diffusers' DDIM:
    ``clip_x0`` clips x0 while the direction keeps the network's own eps (``use_clipped_model_output=
    False``); ``sigmas_to[i]`` is where step i lands when that is not ``sigmas[i+1]`` (diffusers steps to
    t - T//N, which for 'linspace'/'trailing' spacing is not the next timestep): the state is then
    relabelled to sigmas[i+1] in the variance-preserving frame, as diffusers' next call reads it.
    """
    x, sig, extra, noise = _setup(x, sigmas, extra_args, noise)
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        s_to = s_next if sigmas_to is None else float(sigmas_to[i])
        denoised = _call(denoiser, x, s, extra)
        _cb(callback, x, i, s, s, denoised)
        down, up = _ancestral(s, s_to, eta)
        if clip_x0 is None:                           # x0 + sigma_down * eps, eps = (x - x0) / sigma
            x = torch.lerp(denoised, x, down / s)
        else:                                         # clipped x0, the network's own eps
            x = torch.add(clip_x0(denoised), x - denoised, alpha=down / s)
        if up > 0:
            x = torch.add(x, noise(i, x), alpha=up * s_noise)   # fresh noise, std sigma_t(eta)
        if s_to != s_next:
            x = x * math.sqrt((1 + s_next ** 2) / (1 + s_to ** 2))
        x = _after(after_step, x, s_next, i == len(sig) - 2)
    return x


# --------------------------------------------------------------------------------------------------
# Euler / Heun / EDM (Karras et al. 2022)
# --------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample_euler(denoiser, x, sigmas, *, extra_args=None, noise=None, callback=None, after_step=None,
                 s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0):
    """Euler on the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. 2022,
    Algorithm 2 without the 2nd-order correction), with optional churn."""
    x, sig, extra, noise = _setup(x, sigmas, extra_args, noise)
    n = len(sig) - 1
    for i in range(n):
        s, s_next = sig[i], sig[i + 1]
        x, s_hat = _churn(x, i, s, n, noise, s_churn, s_tmin, s_tmax, s_noise)
        denoised = _call(denoiser, x, s_hat, extra)
        _cb(callback, x, i, s, s_hat, denoised)
        # Euler step with d = (x - denoised) / sigma_hat: x + d (sigma' - sigma_hat), as one lerp
        x = _after(after_step, torch.lerp(denoised, x, s_next / s_hat), s_next, i == n - 1)
    return x


@torch.no_grad()
def sample_euler_ancestral(denoiser, x, sigmas, *, extra_args=None, noise=None, callback=None, after_step=None,
                           eta: float = 1.0, s_noise: float = 1.0):
    """Ancestral Euler: an Euler step down to sigma_down, then fresh noise of std sigma_up."""
    x, sig, extra, noise = _setup(x, sigmas, extra_args, noise)
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        denoised = _call(denoiser, x, s, extra)
        _cb(callback, x, i, s, s, denoised)
        down, up = _ancestral(s, s_next, eta)
        x = torch.lerp(denoised, x, down / s)         # Euler step to sigma_down
        if up > 0:
            x = torch.add(x, noise(i, x), alpha=up * s_noise)   # noise back up to sigma_next
        x = _after(after_step, x, s_next, i == len(sig) - 2)
    return x


@torch.no_grad()
def sample_edm(denoiser, x, sigmas, *, extra_args=None, noise=None, callback=None, after_step=None,
               s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
               stop_after_first_stage: bool = False):
    """EDM's stochastic sampler (Karras et al. 2022, Algorithm 2): churn, Euler step, 2nd-order
    (trapezoidal) correction except on the step to sigma = 0. With s_churn=0 it is deterministic Heun.
    ``stop_after_first_stage``: the last step is its Euler stage alone (diffusers' Heun cut mid-step by an SDXL
    base run's ``denoising_end``: ``fastdiff.experts``)."""
    x, sig, extra, noise = _setup(x, sigmas, extra_args, noise)
    n = len(sig) - 1
    for i in range(n):
        s, s_next = sig[i], sig[i + 1]
        x, s_hat = _churn(x, i, s, n, noise, s_churn, s_tmin, s_tmax, s_noise)
        denoised = _call(denoiser, x, s_hat, extra)
        _cb(callback, x, i, s, s_hat, denoised)
        # Euler step with d = (x - denoised) / sigma_hat (dx/dsigma at sigma_hat)
        x_next = torch.lerp(denoised, x, s_next / s_hat)
        if s_next != 0 and not (stop_after_first_stage and i == n - 1):  # apply 2nd-order correction
            x_next = _after(after_step, x_next, s_next, False)
            denoised_2 = _call(denoiser, x_next, s_next, extra)
            # trapezoid x + (d + d_2) / 2 * dt, with d_2 = (x_next - denoised_2) / sigma_next
            half_dt = 0.5 * (s_next - s_hat)
            x_next = torch.add(x, x - denoised, alpha=half_dt / s_hat).add_(x_next - denoised_2,
                                                                             alpha=half_dt / s_next)
        x = _after(after_step, x_next, s_next, i == n - 1)
    return x


@torch.no_grad()
def sample_heun(denoiser, x, sigmas, *, extra_args=None, noise=None, callback=None, after_step=None,
                stop_after_first_stage: bool = False):
    """Heun's 2nd-order method (EDM without churn); the step to sigma = 0 is a plain Euler step, and so is the last
    step with ``stop_after_first_stage`` (``sample_edm``)."""
    return sample_edm(denoiser, x, sigmas, extra_args=extra_args, noise=noise, callback=callback,
                      after_step=after_step, stop_after_first_stage=stop_after_first_stage)


@torch.no_grad()
def sample_dpm_2(denoiser, x, sigmas, *, extra_args=None, noise=None, callback=None, after_step=None,
                 s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
                 sigmas_mid: Optional[Sequence[float]] = None, stop_after_first_stage: bool = False):
    """DPM-Solver-2 as k-diffusion's ``sample_dpm_2`` (diffusers' ``KDPM2DiscreteScheduler``): a midpoint
    method on the probability-flow ODE, the midpoint at the geometric mean of sigma and sigma'; the step to
    sigma = 0 is a plain Euler step. Optional churn as in ``sample_euler``. ``sigmas_mid[i]``: step i's
    midpoint when given (a scheduler plan's exact values). ``stop_after_first_stage``: the last step is its Euler
    half step alone, to the grid's last sigma (there, the step's midpoint: diffusers' KDPM2 cut mid-step by an
    SDXL base run's ``denoising_end``, ``fastdiff.experts``)."""
    x, sig, extra, noise = _setup(x, sigmas, extra_args, noise)
    n = len(sig) - 1
    mids = _check_mids(sigmas_mid, n)
    for i in range(n):
        s, s_next = sig[i], sig[i + 1]
        x, s_hat = _churn(x, i, s, n, noise, s_churn, s_tmin, s_tmax, s_noise)
        denoised = _call(denoiser, x, s_hat, extra)
        _cb(callback, x, i, s, s_hat, denoised)
        if stop_after_first_stage and i == n - 1:  # Euler to the midpoint, which the grid ends at
            x = _after(after_step, torch.lerp(denoised, x, s_next / s_hat), s_next, True)
            continue
        x = _midpoint_step(denoiser, x, denoised, s_hat, s_next, extra, mids[i] if mids and s_hat == s else None,
                           after=(after_step, s_next))
        x = _after(after_step, x, s_next, i == n - 1)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(denoiser, x, sigmas, *, extra_args=None, noise=None, callback=None, after_step=None,
                           eta: float = 1.0, s_noise: float = 1.0, sigmas_mid: Optional[Sequence[float]] = None):
    """Ancestral DPM-Solver-2 (k-diffusion's ``sample_dpm_2_ancestral``, diffusers'
    ``KDPM2AncestralDiscreteScheduler``): the midpoint step down to sigma_down, then fresh noise of std
    sigma_up. With eta = 1 the midpoint sqrt(sigma * sigma_down) is sigma' itself; ``sigmas_mid`` (a diffusers
    plan's exact midpoints) holds for eta = 1 only, any other eta takes the geometric means. As in k-diffusion,
    a step whose sigma_down is 0 (eta > 1 can give that before the end) adds no noise."""
    x, sig, extra, noise = _setup(x, sigmas, extra_args, noise)
    mids = _check_mids(sigmas_mid, len(sig) - 1) if eta == 1 else None
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        denoised = _call(denoiser, x, s, extra)
        _cb(callback, x, i, s, s, denoised)
        down, up = _ancestral(s, s_next, eta)
        x = _midpoint_step(denoiser, x, denoised, s, down, extra, mids[i] if mids else None, after=(after_step, s_next))
        if up > 0 and down > 0:
            x = torch.add(x, noise(i, x), alpha=up * s_noise)
        x = _after(after_step, x, s_next, i == len(sig) - 2)
    return x


def _check_mids(sigmas_mid, n: int) -> Optional[list]:
    return None if sigmas_mid is None else host_floats("sigmas_mid", sigmas_mid, n)


def midpoint_sigma(s: float, s_to: float) -> float:
    """The log-midpoint of a DPM-Solver-2 step: sqrt(s * s_to)."""
    return math.exp(0.5 * (math.log(s) + math.log(s_to)))


def _midpoint_step(denoiser, x, denoised, s, s_to, extra, s_mid=None, after=(None, 0.0)):
    """x from sigma s to s_to with the slope at the log-midpoint (``s_mid``, by default sqrt(s * s_to)),
    reached by an Euler half step; to s_to = 0 a plain Euler step (x0). ``after``: (after_step, the step's end
    sigma), for the midpoint state."""
    if s_to == 0:
        return denoised
    if s_mid is not None and not s_to < s_mid <= s:
        raise BadArgumentError(f"sigmas_mid: expected a midpoint in ({s_to}, {s}] for the step from sigma {s}, "
                               f"found {s_mid}")
    s_mid = midpoint_sigma(s, s_to) if s_mid is None else s_mid
    x_mid = _after(after[0], torch.lerp(denoised, x, s_mid / s), after[1], False)  # Euler to sigma_mid
    denoised_mid = _call(denoiser, x_mid, s_mid, extra)
    # x + d_mid (s_to - s), d_mid = (x_mid - denoised_mid) / s_mid
    return torch.add(x, x_mid - denoised_mid, alpha=(s_to - s) / s_mid)


# --------------------------------------------------------------------------------------------------
# DPM-Solver++ multistep (Lu et al. 2022b), ODE and SDE, orders 1-3
# --------------------------------------------------------------------------------------------------

def _phi_coeffs(h: float, eta: float, diffusers_sde3: bool):
    """Exponential-integrator weights of the data-prediction (x0) update over lambda-step h.

    With H = h * (1 + eta) (eta=0: ODE, eta=1: SDE), x' = (s'/s) e^{-eta h} x + c0 D0 + c1 D1 + c2 D2 with
    c0 = 1 - e^{-H}, c1 = (e^{-H} - 1)/H + 1 (or the midpoint weight c1_mid = (1 - e^{-H})/2) and
    c2 = -((e^{-H} - 1 + H)/H^2 - 1/2).
    """
    H = h * (1 + eta)
    em = math.expm1(-H)                               # e^{-H} - 1
    c0 = -em
    c1 = em / H + 1                                   # h*phi_2 term for D1 (heun / 3rd order)
    c1_mid = -0.5 * em                                # midpoint variant for D1
    if diffusers_sde3 and eta > 0:
        c2 = (-em - H) / H ** 2 - 0.5                 # diffusers' sde-dpmsolver++ 3rd-order weight
    else:
        c2 = -((em + H) / H ** 2 - 0.5)               # -phi_3
    return c0, c1, c1_mid, c2


def _eps_coeffs(h: float, s_next: float):
    """Noise-prediction (DPM-Solver, Lu et al. 2022a) weights: x' = x + c0 D0 + c1 D1 + c2 D2."""
    e = math.expm1(h)                                 # e^h - 1
    return -s_next * e, -s_next * (e / h - 1), -0.5 * s_next * e, -s_next * ((e - h) / h ** 2 - 0.5)


@torch.no_grad()
def _dpm_multistep(denoiser, x, sigmas, *, extra_args, noise, callback, order: int, eta: float,
                   s_noise: float, solver_type: str, lower_order_final: bool, euler_at_final: bool, predict_x0: bool,
                   diffusers_sde3: bool, after_step=None):
    if order not in (1, 2, 3):
        raise BadArgumentError(f"order: expected 1, 2 or 3, found {order!r}")
    if solver_type not in ("midpoint", "heun"):
        raise BadArgumentError(f"solver_type: expected 'midpoint' or 'heun', found {solver_type!r}")
    if not predict_x0 and eta > 0:
        raise BadArgumentError("predict_x0=False (noise-prediction DPM-Solver) is deterministic: expected eta=0, "
                               f"found eta={eta}")
    x, sig, extra, noise = _setup(x, sigmas, extra_args, noise)
    n = len(sig) - 1
    ms = []                                           # last model outputs (x0 or eps), newest last
    for i in range(n):
        s, s_next = sig[i], sig[i + 1]
        denoised = _call(denoiser, x, s, extra)
        _cb(callback, x, i, s, s, denoised)
        ms = (ms + [denoised if predict_x0 else (x - denoised) / s])[-order:]
        if s_next == 0:                               # the limit of every order: x0
            x = _after(after_step, denoised, s_next, i == n - 1)
            continue
        if s_next == s:                               # a zero-length step (a grid ending at sigma_min)
            x = _after(after_step, x, s_next, i == n - 1)
            continue
        k = multistep_order(i, n, order, lower_order_final, euler_at_final)
        h = math.log(s / s_next)                      # lambda step, lambda = -log sigma
        if predict_x0:
            c0, c1, c1_mid, c2 = _phi_coeffs(h, eta, diffusers_sde3)
            a = s_next / s * math.exp(-eta * h)
        else:
            c0, c1, c1_mid, c2 = _eps_coeffs(h, s_next)
            a = 1.0
        # x' = a x + c0 m0 + (c1 D1 + c2 D2), the divided differences D of the last outputs m0, m1, m2 (newest
        # first) expanded into one weight per output, so the whole step is one linear combination
        if k == 1:
            w = [c0]
        elif k == 2:                                  # D1 = (m0 - m1) / r0
            r0 = math.log(sig[i - 1] / s) / h
            cw = (c1_mid if solver_type == "midpoint" else c1) / r0
            w = [c0 + cw, -cw]
        else:                                         # D1 = D1_0 + (D1_0 - D1_1) r0/(r0+r1), D2 = (D1_0 - D1_1)/(r0+r1)
            r0, r1 = math.log(sig[i - 1] / s) / h, math.log(sig[i - 2] / sig[i - 1]) / h
            u0 = c1 * (1 + r0 / (r0 + r1)) + c2 / (r0 + r1)     # weight of D1_0 = (m0 - m1) / r0
            u1 = -(c1 * r0 / (r0 + r1) + c2 / (r0 + r1))        # weight of D1_1 = (m1 - m2) / r1
            w = [c0 + u0 / r0, -u0 / r0 + u1 / r1, -u1 / r1]
        terms = [(a, x)] + [(wj, ms[-1 - j]) for j, wj in enumerate(w)]
        if eta > 0:                                   # SDE noise, std s' sqrt(1 - e^{-2 eta h})
            # (max: a step that rises by a rounding error, as diffusers' float32 EDM grids can end, adds no noise)
            terms.append((s_next * math.sqrt(max(0.0, -math.expm1(-2 * eta * h))) * s_noise, noise(i, x)))
        x = _after(after_step, combine(terms), s_next, i == n - 1)
    return x


def sample_dpmpp_2m(denoiser, x, sigmas, *, extra_args=None, noise=None, callback=None, after_step=None, order: int = 2,
                    solver_type: str = "midpoint", lower_order_final: bool = True, euler_at_final: bool = False,
                    predict_x0: bool = True):
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2): multistep exponential integrator in
    lambda = -log sigma on the data prediction. ``order`` 1-3; ``solver_type`` "midpoint" / "heun" (the D1
    weight); ``lower_order_final``: with fewer than 15 steps the last steps drop to 1st/2nd order;
    ``predict_x0=False`` is the original noise-prediction DPM-Solver (diffusers' "dpmsolver")."""
    return _dpm_multistep(denoiser, x, sigmas, extra_args=extra_args, noise=noise, callback=callback,
                          after_step=after_step,
                          order=order, eta=0.0, s_noise=1.0, solver_type=solver_type,
                          lower_order_final=lower_order_final, euler_at_final=euler_at_final,
                          predict_x0=predict_x0, diffusers_sde3=False)


# k-diffusion's 3M (sample_dpmpp_3m_sde, eta=0 for the ODE) takes its 2nd-order warm-up step with the phi_2 ("heun")
# weight and keeps order 3 to the end; diffusers' order-3 multistep schedulers use the midpoint weight and
# lower_order_final (their plans pass both explicitly, so these defaults only shape the named samplers)
_K_DIFFUSION_3M = dict(order=3, solver_type="heun", lower_order_final=False)


def sample_dpmpp_3m(denoiser, x, sigmas, **kw):
    """DPM-Solver++(3M): ``sample_dpmpp_2m`` with order=3, by default as k-diffusion's ``sample_dpmpp_3m_sde`` at
    eta=0 (phi_2 warm-up weight, order 3 to the end)."""
    return sample_dpmpp_2m(denoiser, x, sigmas, **{**_K_DIFFUSION_3M, **kw})


def sample_dpmpp_2m_sde(denoiser, x, sigmas, *, extra_args=None, noise=None, callback=None, after_step=None,
                        eta: float = 1.0, s_noise: float = 1.0, order: int = 2, solver_type: str = "midpoint",
                        lower_order_final: bool = True, euler_at_final: bool = False,
                        diffusers_sde3_coefficient: bool = False):
    """SDE-DPM-Solver++(2M) (Lu et al. 2022b, appendix; k-diffusion's dpmpp_2m_sde): the same multistep
    update with lambda-step h*(1+eta) on the data term and fresh noise of std s' sqrt(1-e^{-2 eta h}).
    eta=1 is diffusers' "sde-dpmsolver++". ``diffusers_sde3_coefficient`` reproduces diffusers' 3rd-order
    D2 weight (phi_3 with the opposite sign of 1/2); off, the weight is -phi_3 as in k-diffusion."""
    return _dpm_multistep(denoiser, x, sigmas, extra_args=extra_args, noise=noise, callback=callback,
                          after_step=after_step,
                          order=order, eta=eta, s_noise=s_noise, solver_type=solver_type,
                          lower_order_final=lower_order_final, euler_at_final=euler_at_final, predict_x0=True,
                          diffusers_sde3=diffusers_sde3_coefficient)


def sample_dpmpp_3m_sde(denoiser, x, sigmas, **kw):
    """SDE-DPM-Solver++(3M): ``sample_dpmpp_2m_sde`` with order=3, by default equal to k-diffusion's
    ``sample_dpmpp_3m_sde`` (given the same noise)."""
    return sample_dpmpp_2m_sde(denoiser, x, sigmas, **{**_K_DIFFUSION_3M, **kw})


# --------------------------------------------------------------------------------------------------
# DPM-Solver singlestep (Lu et al. 2022a), orders 1-3
# --------------------------------------------------------------------------------------------------

def singlestep_orders(steps: int, order: int, lower_order_final: bool = False, final_zero: bool = True) -> list:
    """Order of each step (diffusers' ``get_order_list``): the grid is cut into groups [1, 2, .., order];
    a group of k steps is one k-th order singlestep update whose intermediate points are grid points.
    An uneven split or a final sigma of 0 forces ``lower_order_final`` (as diffusers does)."""
    if order not in (1, 2, 3):
        raise BadArgumentError(f"order: expected 1, 2 or 3, found {order!r}")
    if steps % order != 0 or final_zero:
        lower_order_final = True
    if order == 1:
        orders = [1] * steps
    elif not lower_order_final:
        orders = list(range(1, order + 1)) * (steps // order)
    elif order == 3:
        q, r = divmod(steps, 3)
        orders = [1, 2, 3] * (q - 1) + [1, 2] + [1] if r == 0 else [1, 2, 3] * q + ([1] if r == 1 else [1, 2])
    else:
        orders = [1, 2] * (steps // 2 - 1) + [1, 1] if steps % 2 == 0 else [1, 2] * (steps // 2) + [1]
    if final_zero:
        orders[-1] = 1
    return orders


@torch.no_grad()
def sample_dpm_solver(denoiser, x, sigmas, *, extra_args=None, noise=None, callback=None, after_step=None,
                      order: int = 2, solver_type: str = "midpoint", lower_order_final: bool = False,
                      predict_x0: bool = True, eta: float = 0.0, s_noise: float = 1.0,
                      diffusers_sde3_coefficient: bool = False, orders: Optional[Sequence[int]] = None):
    """Singlestep DPM-Solver(++)-k (Lu et al. 2022a/b) with its intermediate points on the grid: within a
    group of k grid steps, step j (1-based) is a j-th order update from the group's start using the
    network outputs at the group's first j points (diffusers' DPMSolverSinglestepScheduler). With
    ``predict_x0`` the data-prediction (++) form; ``eta=1``: the SDE variant. ``orders``: each step's order
    instead of ``singlestep_orders`` (a run started part-way keeps its whole run's groups: img2img)."""
    if solver_type not in ("midpoint", "heun"):
        raise BadArgumentError(f"solver_type: expected 'midpoint' or 'heun', found {solver_type!r}")
    if not predict_x0 and eta > 0:
        raise BadArgumentError(f"predict_x0=False is deterministic: expected eta=0, found eta={eta}")
    x, sig, extra, noise = _setup(x, sigmas, extra_args, noise)
    n = len(sig) - 1
    if orders is None:
        orders = singlestep_orders(n, order, lower_order_final, sig[-1] == 0)
    elif len(orders) != n or any(k not in (1, (orders[i - 1] + 1) if i else 1) or k > 3 for i, k in enumerate(orders)):
        raise BadArgumentError(f"orders: expected {n} orders, each 1 (a group starts) or the step before's + 1, up to "
                               f"3, found {list(orders)!r}")
    x_start, j0, ms = x, 0, []
    for i in range(n):
        s, s_next = sig[i], sig[i + 1]
        k = orders[i]
        denoised = _call(denoiser, x, s, extra)
        _cb(callback, x, i, s, s, denoised)
        m = denoised if predict_x0 else (x - denoised) / s
        if k == 1:                                    # a new group starts here
            x_start, j0, ms = x, i, [m]
        else:
            ms.append(m)
        if s_next == 0:
            x = _after(after_step, denoised, s_next, i == n - 1)
            continue
        s0 = sig[j0]                                  # group start
        if s_next == s0:
            x = _after(after_step, x, s_next, i == n - 1)
            continue
        h = math.log(s0 / s_next)
        if predict_x0:
            c0, c1, c1_mid, c2 = _phi_coeffs(h, eta, diffusers_sde3_coefficient)
            x_new = x_start * (s_next / s0 * math.exp(-eta * h)) + ms[0] * c0
        else:
            c0, c1, c1_mid, c2 = _eps_coeffs(h, s_next)
            x_new = x_start + ms[0] * c0
        if k == 2:
            r0 = math.log(s0 / sig[j0 + 1]) / h
            d1 = (ms[1] - ms[0]) / r0
            x_new = x_new + d1 * (c1_mid if solver_type == "midpoint" else c1)
        elif k == 3:
            r1, r0 = math.log(s0 / sig[j0 + 1]) / h, math.log(s0 / sig[j0 + 2]) / h
            d1_0, d1_1 = (ms[1] - ms[0]) / r1, (ms[2] - ms[0]) / r0
            if solver_type == "midpoint":             # DPM-Solver-3: only the last intermediate point
                x_new = x_new + d1_1 * c1
            else:                                     # 3rd-order Taylor with D1, D2
                d1 = (d1_0 * r0 - d1_1 * r1) / (r0 - r1)
                d2 = (d1_1 - d1_0) * (2.0 / (r0 - r1))
                x_new = x_new + d1 * c1 + d2 * c2
        if eta > 0:
            x_new = x_new + noise(i, x) * (s_next * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise)
        x = _after(after_step, x_new, s_next, i == n - 1)
    return x


# --------------------------------------------------------------------------------------------------
# UniPC (Zhao et al. 2023): unified predictor-corrector, B(h) variants bh1 / bh2
# --------------------------------------------------------------------------------------------------

def _unipc_weights(rks: list, hh: float, variant: str, corrector: bool):
    """Host-side UniPC weights for one update of order p = len(rks) + 1.

    rks: the previous points' lambda offsets divided by h. Returns (h*phi_1(hh), B(h), rhos): solve
    sum_k rho_k r_k^(j-1) = j! phi_{j+1}(hh) / B(h) for j = 1..p (predictor: the first p-1 equations on
    the previous points only; corrector: all p, the last point being the new evaluation, r = 1).
    """
    p = len(rks) + 1
    h_phi_1 = math.expm1(hh)
    B_h = hh if variant == "bh1" else h_phi_1
    r_all = list(rks) + [1.0]
    R, b = [], []
    h_phi_k, fact = h_phi_1 / hh - 1, 1
    for j in range(1, p + 1):
        R.append([r ** (j - 1) for r in r_all])
        b.append(h_phi_k * fact / B_h)
        fact *= j + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    if corrector:
        rhos = [0.5] if p == 1 else list(np.linalg.solve(np.array(R), np.array(b)))
    elif p == 1:
        rhos = []
    elif p == 2:
        rhos = [0.5]
    else:
        rhos = list(np.linalg.solve(np.array(R)[:-1, :-1], np.array(b)[:-1]))
    return h_phi_1, B_h, [float(r) for r in rhos]


@torch.no_grad()
def sample_unipc(denoiser, x, sigmas, *, extra_args=None, noise=None, callback=None, after_step=None, order: int = 2,
                 variant: str = "bh2", lower_order_final: bool = True, disable_corrector: Sequence[int] = (),
                 predict_x0: bool = True):
    """UniPC (Zhao et al. 2023, Algorithms 1-2): a multistep predictor UniP-p, and after each network
    evaluation the corrector UniC that re-uses that evaluation to refine the state (no extra call).
    ``variant`` picks B(h): "bh1" (B = h) or "bh2" (B = e^h - 1). The step to sigma = 0 returns x0."""
    if variant not in ("bh1", "bh2"):
        raise BadArgumentError(f"variant: expected 'bh1' or 'bh2', found {variant!r}")
    if order not in (1, 2, 3):
        raise BadArgumentError(f"order: expected 1, 2 or 3, found {order!r}")
    x, sig, extra, noise = _setup(x, sigmas, extra_args, noise)
    n = len(sig) - 1
    lam = [(-math.log(s) if s > 0 else math.inf) for s in sig]
    ms, x_last, p_last = [], None, 0                  # outputs (newest last), state and order of last step

    def update(x0, i0, m_list, p, corrector, m_new=None):
        """UniP / UniC from grid point i0 to i0+1, with m_list[-1] the output at i0."""
        s, s_t = sig[i0], sig[i0 + 1]
        h = lam[i0 + 1] - lam[i0]
        rks = [(lam[i0 - k] - lam[i0]) / h for k in range(1, p)]
        hh = -h if predict_x0 else h
        h_phi_1, B_h, rhos = _unipc_weights(rks, hh, variant, corrector)
        m0 = m_list[-1]
        if predict_x0:
            out = x0 * (s_t / s) - m0 * h_phi_1
            scale = B_h
        else:
            out = x0 - m0 * (s_t * h_phi_1)
            scale = s_t * B_h
        res = None
        for k in range(1, p):
            term = (m_list[-(k + 1)] - m0) * (rhos[k - 1] / rks[k - 1])
            res = term if res is None else res + term
        if corrector:
            term = (m_new - m0) * rhos[-1]
            res = term if res is None else res + term
        return out if res is None else out - res * scale

    for i in range(n):
        s, s_next = sig[i], sig[i + 1]
        denoised = _call(denoiser, x, s, extra)
        _cb(callback, x, i, s, s, denoised)
        m = denoised if predict_x0 else (x - denoised) / s
        if x_last is not None and (i - 1) not in disable_corrector:
            x = update(x_last, i - 1, ms, p_last, True, m)     # UniC: correct x_i with the new output
        ms = (ms + [m])[-order:]
        p = min(order, n - i) if lower_order_final else order
        p = min(p, i + 1)                             # warm-up
        x_last, p_last = x, p
        if s_next == 0:
            x = _after(after_step, denoised, s_next, i == n - 1)
            continue
        if s_next == s:                               # a zero-length step (a grid ending at sigma_min)
            x = _after(after_step, x, s_next, i == n - 1)
            continue
        # UniP: predict x_{i+1} (the corrector later starts again from x_last, as diffusers' does: what
        # after_step changes reaches the next evaluation only)
        x = _after(after_step, update(x, i, ms, p, False), s_next, i == n - 1)
    return x


# --------------------------------------------------------------------------------------------------
# DDIM inversion
# --------------------------------------------------------------------------------------------------

@torch.no_grad()
def invert_ddim(denoiser, x, sigmas, *, extra_args=None, callback=None):
    """Deterministic DDIM inversion: run DDIM's ODE step backwards, from clean data up to sigmas[0].

    ``sigmas`` is the SAMPLING grid (decreasing, ending at its smallest value); the result is the latent
    at sigmas[0] that ``sample_ddim(..., sigmas)`` maps back to ``x``. Each step sigma -> sigma' (larger)
    is x' = D + sigma' * eps with D, eps evaluated at the current point (at sigma' when sigma = 0).
    """
    x, sig, extra, _ = _setup(x, sigmas, extra_args, None)
    for i in range(len(sig) - 1, 0, -1):
        s, s_up = sig[i], sig[i - 1]
        s_eval = s if s > 0 else s_up
        denoised = _call(denoiser, x, s_eval, extra)
        _cb(callback, x, i, s, s_eval, denoised)
        eps = (x - denoised) / s_eval
        x = denoised + eps * s_up
    return x


SAMPLERS = {
    "ddim": sample_ddim,
    "ddpm": sample_ddpm,
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_3m": sample_dpmpp_3m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "dpm_solver": sample_dpm_solver,
    "unipc": sample_unipc,
    "edm": sample_edm,
    "plms": sample_plms,
    "lms": sample_lms,
    "lcm": sample_lcm,
    "dpm_2": sample_dpm_2,
    "dpm_2_ancestral": sample_dpm_2_ancestral,
    "deis": sample_deis,
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
    "tcd": sample_tcd,
    "dpm_fast": sample_dpm_fast,
    # ComfyUI's own (fastdiff.comfy_samplers)
    "ipndm": sample_ipndm,
    "ipndm_v": sample_ipndm_v,
    "gradient_estimation": sample_gradient_estimation,
    "res_multistep": sample_res_multistep,
    "res_multistep_ancestral": sample_res_multistep_ancestral,
    "heunpp2": sample_heunpp2,
    "er_sde": sample_er_sde,
    "seeds_2": sample_seeds_2,
    "seeds_3": sample_seeds_3,
    "exp_heun_2_x0": sample_exp_heun_2_x0,
    "exp_heun_2_x0_sde": sample_exp_heun_2_x0_sde,
    # CFG++ (fastdiff.cfg_pp): they step with the unconditional prediction apart from the guided one
    "euler_cfg_pp": sample_euler_cfg_pp,
    "euler_ancestral_cfg_pp": sample_euler_ancestral_cfg_pp,
    "dpmpp_2m_cfg_pp": sample_dpmpp_2m_cfg_pp,
    "dpmpp_2s_ancestral_cfg_pp": sample_dpmpp_2s_ancestral_cfg_pp,
    "res_multistep_cfg_pp": sample_res_multistep_cfg_pp,
    "res_multistep_ancestral_cfg_pp": sample_res_multistep_ancestral_cfg_pp,
    "gradient_estimation_cfg_pp": sample_gradient_estimation_cfg_pp,
}

# Multistep solvers whose ``lower_order_final`` looks at the whole run's step count (diffusers' ``len(timesteps) <
# 15``): a run started part-way down its grid (img2img, ``SamplingPlan.from_step``) must keep the whole count's answer.
COUNTS_ALL_STEPS = frozenset({"dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "dpmpp_3m_sde", "deis"})

# Samplers that draw noise (the others are deterministic given x).
STOCHASTIC = frozenset({"ddpm", "euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde", "lcm", "dpm_2_ancestral",
                        "dpmpp_sde", "dpmpp_2s_ancestral", "tcd", "res_multistep_ancestral", "er_sde", "seeds_2",
                        "seeds_3", "exp_heun_2_x0_sde",
                        "euler_ancestral_cfg_pp", "dpmpp_2s_ancestral_cfg_pp", "res_multistep_ancestral_cfg_pp"})
