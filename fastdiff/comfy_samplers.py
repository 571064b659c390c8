"""Samplers ComfyUI's KSampler lists beyond k-diffusion's own, by its names (``comfy/k_diffusion/sampling.py``):

* ``ipndm``: improved PNDM (Zhang & Chen 2023, DEIS paper; zju-pi's diff-solvers): Adams-Bashforth of orders 1-4 on
  the slope d = (x - D) / sigma with the fixed (equal-step) coefficients, whatever the grid's spacing.
* ``ipndm_v``: the same with the variable-step Adams-Bashforth coefficients of the grid's own spacing.
* ``gradient_estimation``: Euler plus a gradient-estimation correction (Permenter & Yuan 2024, "Interpreting and
  improving diffusion models from an optimization perspective"): the step's slope d + (gamma - 1)(d - d_prev),
  gamma = ``ge_gamma`` (2).
* ``res_multistep``: the second-order multistep RES solver (Zhang et al. 2023, "Improved order analysis and design
  of exponential integrator for diffusion models sampling", arXiv 2308.02157) on the data prediction, in
  lambda = -log(sigma); ``res_multistep_ancestral``: the same down to each step's ancestral sigma_down, then fresh
  noise of std sigma_up (``eta``, 1).
* ``heunpp2``: Heun++ (Carzit's sd-webui-samplers-scheduler): each step's slope a weighted mean of the slopes at
  its start and at the next one or two grid points (reached by Euler predictions), the weights the next sigmas over
  2 or 3 times the grid's first; Heun's at the second-to-last step, Euler's at the last; EDM's churn as ``euler``'s.
* ``seeds_2`` / ``seeds_3``: SEEDS (Gonzalez et al. 2023, "SEEDS: exponential SDE solvers for fast high-quality
  sampling from diffusion models", arXiv 2305.14267), stochastic exponential Runge-Kutta of 2 and 3 stages on the
  data prediction in lambda (``eta``, ``s_noise``; seeds_2's ``r`` and ``solver_type`` "phi_1" / "phi_2", seeds_3's
  ``r_1`` / ``r_2``), fresh noise at every stage carried through the step; ``exp_heun_2_x0`` (seeds_2 at r = 1,
  eta 0, "phi_2": the exponential Heun method) and ``exp_heun_2_x0_sde`` (the same with noise).
* ``er_sde``: the extended reverse-time SDE solver (Cui et al. 2023, "Elucidating the solution space of extended
  reverse-time SDE for diffusion models", arXiv 2309.06169; VP ER-SDE-Solver-3), with its default noise scale
  function lambda (e^(lambda^0.3) + 10) and 200-point integrals of it.

Each ends with x = D at a step to sigma 0 (RES's and Heun++'s Euler steps land there too). Every coefficient is a host
float worked out from the grid before the network runs; the loops never read the device. ComfyUI's CFG++ variants
(``*_cfg_pp``) are in ``fastdiff.cfg_pp``: ``res_multistep`` and ``gradient_estimation`` here take their ``cfg_pp``
flag, as ComfyUI's own functions do.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .sampler_base import _after, _ancestral, _call, _call_pair, _cb, _setup

__all__ = ["sample_ipndm", "sample_ipndm_v", "sample_gradient_estimation", "sample_res_multistep",
           "sample_res_multistep_ancestral", "sample_heunpp2", "sample_er_sde", "sample_seeds_2", "sample_seeds_3",
           "sample_exp_heun_2_x0", "sample_exp_heun_2_x0_sde"]

# the equal-step Adams-Bashforth weights of the current slope and the past ones, newest first
_ADAMS_BASHFORTH = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12),
                    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def _check_order(max_order: int) -> None:
    from .errors import BadArgumentError

    if max_order not in _ADAMS_BASHFORTH:
        raise BadArgumentError(f"max_order: expected 1, 2, 3 or 4, found {max_order!r}")


def _variable_weights(sig: list, i: int, order: int) -> tuple:
    """iPNDM-v's weights at step i (of the slopes at sigma_i, sigma_(i-1), ...): the variable-step Adams-Bashforth
    coefficients for the grid's spacings h_n = sigma_(i+1) - sigma_i, h_(n-1) = sigma_i - sigma_(i-1), ..."""
    if order == 1:
        return (1.0,)
    h = sig[i + 1] - sig[i]
    h1 = sig[i] - sig[i - 1]
    c1, c2 = (2 + h / h1) / 2, -(h / h1) / 2
    if order == 2:
        return c1, c2
    h2 = sig[i - 1] - sig[i - 2]
    temp = (1 - h / (3 * (h + h1)) * (h * (h + h1)) / (h1 * (h1 + h2))) / 2
    if order == 3:
        return c1 + temp, c2 - (1 + h1 / h2) * temp, temp * h1 / h2
    h3 = sig[i - 2] - sig[i - 3]
    ratio = h1 * (h1 + h2) / (h2 * (h2 + h3))
    temp2 = ((1 - h / (3 * (h + h1))) / 2 + (1 - h / (2 * (h + h1))) * h / (6 * (h + h1 + h2))) \
        * (h * (h + h1) * (h + h1 + h2)) / (h1 * (h1 + h2) * (h1 + h2 + h3))
    return (c1 + temp + temp2,
            c2 - (1 + h1 / h2) * temp - (1 + h1 / h2 + ratio) * temp2,
            temp * h1 / h2 + (h1 / h2 + ratio * (1 + h2 / h3)) * temp2,
            -temp2 * ratio * h1 / h2)


def _adams(denoiser, x, sigmas, extra_args, callback, after_step, max_order: int, variable: bool):
    _check_order(max_order)
    x, sig, extra, _ = _setup(x, sigmas, extra_args, None)
    slopes: list = []  # the past slopes, newest last (at most max_order - 1)
    n = len(sig) - 1
    for i in range(n):
        s, s_next = sig[i], sig[i + 1]
        denoised = _call(denoiser, x, s, extra)
        _cb(callback, x, i, s, s, denoised)
        d = (x - denoised) / s  # (B, ...)
        order = min(max_order, i + 1)
        if s_next == 0:
            x = denoised
        else:
            weights = _variable_weights(sig, i, order) if variable else _ADAMS_BASHFORTH[order]
            slope = d * weights[0]
            for w, past in zip(weights[1:], reversed(slopes)):
                slope = torch.add(slope, past, alpha=w)
            x = torch.add(x, slope, alpha=s_next - s)
        slopes = (slopes + [d])[-(max_order - 1):] if max_order > 1 else []
        x = _after(after_step, x, s_next, i == n - 1)
    return x


@torch.no_grad()
def sample_ipndm(denoiser, x, sigmas, *, extra_args=None, noise=None, callback=None, after_step=None,
                 max_order: int = 4):
    """iPNDM: Adams-Bashforth on the slope with equal-step weights, of order min(max_order, step + 1)."""
    return _adams(denoiser, x, sigmas, extra_args, callback, after_step, max_order, variable=False)


@torch.no_grad()
def sample_ipndm_v(denoiser, x, sigmas, *, extra_args=None, noise=None, callback=None, after_step=None,
                   max_order: int = 4):
    """iPNDM-v: Adams-Bashforth on the slope with the grid's variable-step weights."""
    return _adams(denoiser, x, sigmas, extra_args, callback, after_step, max_order, variable=True)


@torch.no_grad()
def sample_gradient_estimation(denoiser, x, sigmas, *, extra_args=None, noise=None, callback=None, after_step=None,
                               ge_gamma: float = 2.0):
    """Euler with the gradient estimate d + (ge_gamma - 1)(d - d_prev) from the second step on."""
    return gradient_estimation(denoiser, x, sigmas, extra_args, callback, after_step, ge_gamma, cfg_pp=False)


def gradient_estimation(denoiser, x, sigmas, extra_args, callback, after_step, ge_gamma: float, cfg_pp: bool):
    """``sample_gradient_estimation``; with ``cfg_pp`` its CFG++ form (``fastdiff.cfg_pp``): the slope toward the
    unconditional x0, the step from the guided one."""
    x, sig, extra, _ = _setup(x, sigmas, extra_args, None)
    n, old_d = len(sig) - 1, None
    for i in range(n):
        s, s_next = sig[i], sig[i + 1]
        denoised, uncond = _call_pair(denoiser, x, s, extra) if cfg_pp else (_call(denoiser, x, s, extra),) * 2
        _cb(callback, x, i, s, s, denoised)
        d = (x - uncond) / s
        if s_next == 0:
            x = denoised
        else:
            x = torch.add(denoised, d, alpha=s_next) if cfg_pp else torch.add(x, d, alpha=s_next - s)
            if old_d is not None:
                x = torch.add(x, d - old_d, alpha=(ge_gamma - 1) * (s_next - s))
        old_d = d
        x = _after(after_step, x, s_next, i == n - 1)
    return x


def _phi_weights(h: float, c2: float) -> tuple:
    """RES's second-order weights (b1, b2) of the current and the previous data prediction over lambda-step h, the
    previous point at c2 * h: phi_1(-h) - phi_2(-h) / c2 and phi_2(-h) / c2 (phi_1(z) = (e^z - 1) / z, phi_2(z) =
    (phi_1(z) - 1) / z); a zero c2 (a zero-length step) or h gives the first-order weights."""
    if h == 0:
        return 0.0, 0.0
    phi1 = math.expm1(-h) / -h
    phi2 = (phi1 - 1) / -h
    if c2 == 0 or math.isinf(c2):
        return phi1, 0.0
    return phi1 - phi2 / c2, phi2 / c2


@torch.no_grad()
def sample_res_multistep(denoiser, x, sigmas, *, extra_args=None, noise=None, callback=None, after_step=None,
                         eta: float = 0.0, s_noise: float = 1.0):
    """Second-order multistep RES (see the module doc); ``eta`` > 0 is ``res_multistep_ancestral``'s step."""
    return res_multistep(denoiser, x, sigmas, extra_args, noise, callback, after_step, eta, s_noise, cfg_pp=False)


def res_multistep(denoiser, x, sigmas, extra_args, noise, callback, after_step, eta: float, s_noise: float,
                  cfg_pp: bool):
    """``sample_res_multistep``; with ``cfg_pp`` its CFG++ form (``fastdiff.cfg_pp``): the state moved by the
    guidance (guided - unconditional x0) first, the multistep update on the unconditional x0s."""
    x, sig, extra, noise = _setup(x, sigmas, extra_args, noise)
    n, old_denoised, old_down = len(sig) - 1, None, None
    for i in range(n):
        s, s_next = sig[i], sig[i + 1]
        denoised, uncond = _call_pair(denoiser, x, s, extra) if cfg_pp else (_call(denoiser, x, s, extra),) * 2
        down, up = _ancestral(s, s_next, eta)
        _cb(callback, x, i, s, s, denoised)
        if down == 0 or old_denoised is None:  # Euler to sigma_down, as D + (sigma_down / sigma)(x - D): exact from
            # a flow model's t = 1 (sigma 1e10), where x + (x - D)(sigma_down - sigma) / sigma cancels to noise
            x = torch.add(denoised, x - uncond, alpha=down / s)
        else:
            t, t_next = -math.log(s), -math.log(down)
            h = t_next - t
            # (a previous step down to sigma 0 (eta > 1, or from sigma 1e10): its lambda is infinite, c2 too, and the
            # second-order weight vanishes, as in ComfyUI's tensor arithmetic)
            c2 = -math.inf if old_down == 0 else (math.log(old_down) - math.log(sig[i - 1])) / h if h else 0.0
            b1, b2 = _phi_weights(h, c2)
            if cfg_pp:
                x = x + (denoised - uncond)
            x = torch.add(x * math.exp(-h), uncond, alpha=h * b1)
            x = torch.add(x, old_denoised, alpha=h * b2)
        if up > 0:
            x = torch.add(x, noise(i, x), alpha=up * s_noise)
        old_denoised, old_down = uncond, down
        x = _after(after_step, x, s_next, i == n - 1)
    return x


@torch.no_grad()
def sample_res_multistep_ancestral(denoiser, x, sigmas, *, extra_args=None, noise=None, callback=None,
                                   after_step=None, eta: float = 1.0, s_noise: float = 1.0):
    """Ancestral RES: ``sample_res_multistep`` with eta = 1 by default."""
    return res_multistep(denoiser, x, sigmas, extra_args, noise, callback, after_step, eta, s_noise, cfg_pp=False)


@torch.no_grad()
def sample_heunpp2(denoiser, x, sigmas, *, extra_args=None, noise=None, callback=None, after_step=None,
                   s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0):
    """Heun++ (see the module doc): up to three network evaluations a step."""
    from .samplers import _churn

    x, sig, extra, noise = _setup(x, sigmas, extra_args, noise)
    n, end = len(sig) - 1, sig[-1]
    for i in range(n):
        s, s_next = sig[i], sig[i + 1]
        x, s_hat = _churn(x, i, s, n, noise, s_churn, s_tmin, s_tmax, s_noise)
        denoised = _call(denoiser, x, s_hat, extra)
        _cb(callback, x, i, s, s_hat, denoised)
        d = (x - denoised) / s_hat
        dt = s_next - s_hat
        if s_next == end:  # Euler
            x = torch.add(x, d, alpha=dt)
        else:
            x_2 = _after(after_step, torch.add(x, d, alpha=dt), s_next, False)
            d_2 = (x_2 - _call(denoiser, x_2, s_next, extra)) / s_next
            if sig[i + 2] == end:  # Heun, weighted by sigma' / (2 sigma_0)
                w2 = s_next / (2 * sig[0])
                slope = d * (1 - w2) + d_2 * w2
            else:  # Heun++: one more Euler prediction, to the grid point after
                s_3 = sig[i + 2]
                x_3 = _after(after_step, torch.add(x_2, d_2, alpha=s_3 - s_next), s_3, False)
                d_3 = (x_3 - _call(denoiser, x_3, s_3, extra)) / s_3
                w2, w3 = s_next / (3 * sig[0]), s_3 / (3 * sig[0])
                slope = d * (1 - w2 - w3) + d_2 * w2 + d_3 * w3
            x = torch.add(x, slope, alpha=dt)
        x = _after(after_step, x, s_next, i == n - 1)
    return x


_ER_POINTS = 200  # the integrals' sample count (ER-SDE-Solver's reference code and ComfyUI's)


def _er_noise_scale(lam):
    """ER-SDE's default noise scale function lambda (e^(lambda^0.3) + 10) (float or array; infinite where
    e^(lambda^0.3) overflows: a grid from pure noise)."""
    with np.errstate(over="ignore"):
        return lam * (np.exp(np.power(lam, 0.3)) + 10.0)


def _er_integrals(lam_s: float, lam_t: float) -> tuple:
    """ER-SDE-Solver-3's integrals of 1 / scale and (lambda - lambda_s) / scale over [lambda_t, lambda_s], as its
    reference code sums them (200 left points from lambda_t up)."""
    step = -(lam_t - lam_s) / _ER_POINTS
    pos = lam_t + np.arange(_ER_POINTS, dtype=np.float64) * step
    scaled = _er_noise_scale(pos)
    return float(np.sum(1 / scaled) * step), float(np.sum((pos - lam_s) / scaled) * step)


@torch.no_grad()
def sample_er_sde(denoiser, x, sigmas, *, extra_args=None, noise=None, callback=None, after_step=None,
                  s_noise: float = 1.0, max_stage: int = 3):
    """ER-SDE-Solver of stage min(max_stage, step + 1) (1-3), its noise from ``noise`` (see the module doc)."""
    from .errors import BadArgumentError

    if max_stage not in (1, 2, 3):
        raise BadArgumentError(f"max_stage: expected 1, 2 or 3, found {max_stage!r}")
    x, sig, extra, noise = _setup(x, sigmas, extra_args, noise)
    n = len(sig) - 1
    old_denoised = old_dd = None
    for i in range(n):
        lam_s, lam_t = sig[i], sig[i + 1]  # (the variance-exploding frame: ER-SDE's lambda is sigma itself)
        denoised = _call(denoiser, x, lam_s, extra)
        _cb(callback, x, i, lam_s, lam_s, denoised)
        stage = min(max_stage, i + 1)
        if lam_t == 0:
            x = denoised
        else:
            r = float(_er_noise_scale(lam_t) / _er_noise_scale(lam_s))  # (0 from pure noise)
            x = torch.add(x * r, denoised, alpha=1 - r)
            if stage >= 2:
                dt = lam_t - lam_s
                s1, s_u = _er_integrals(lam_s, lam_t)
                scale_t = float(_er_noise_scale(lam_t))
                dd = (denoised - old_denoised) / (lam_s - sig[i - 1])
                x = torch.add(x, dd, alpha=dt + s1 * scale_t)
                if stage >= 3:
                    du = (dd - old_dd) / ((lam_s - sig[i - 2]) / 2)
                    x = torch.add(x, du, alpha=dt ** 2 / 2 + s_u * scale_t)
                old_dd = dd
            spread = lam_t ** 2 - lam_s ** 2 * r ** 2
            if s_noise > 0 and spread > 0:
                x = torch.add(x, noise(i, x), alpha=s_noise * math.sqrt(spread))
        old_denoised = denoised
        x = _after(after_step, x, lam_t, i == n - 1)
    return x


# --------------------------------------------------------------------------------------------------
# SEEDS (stochastic exponential Runge-Kutta on the data prediction; lambda = -log sigma)
# --------------------------------------------------------------------------------------------------

def _phi_1(h: float) -> float:
    """h phi_1(h) = e^h - 1."""
    return math.expm1(h)


def _phi_2(h: float) -> float:
    """h phi_2(h) = (e^h - 1 - h) / h."""
    return (math.expm1(h) - h) / h


def _seeds_stage(x, s, s_to, h_frac: float, eta: float, weighted):
    """x carried from sigma s to s_to over lambda-step h_frac: (s_to / s) e^(-h_frac eta) x plus the data prediction
    ``weighted`` (a combination of x0s) times 1 - e^(-h_frac (1 + eta))."""
    return torch.add(x * (s_to / s * math.exp(-h_frac * eta)), weighted, alpha=-_phi_1(-h_frac * (eta + 1)))


class _StageNoise:
    """SEEDS' noise through a step's stages: each stage's draw joins the earlier ones decayed (one Brownian path),
    added to x scaled by the stage's sigma."""

    def __init__(self, noise, i: int, eta: float, s_noise: float):
        self.noise, self.i, self.eta, self.s_noise = noise, i, eta, s_noise
        self.carried = None
        self.on = eta > 0 and s_noise > 0

    def add(self, x, sigma: float, segment: float):
        """``segment``: the stage's lambda-span times -1 (the decay exponent of what came before)."""
        if not self.on:
            return x
        factor = segment * self.eta
        fresh = self.noise(self.i, x) * math.sqrt(-math.expm1(2 * factor))
        self.carried = fresh if self.carried is None else torch.add(fresh, self.carried, alpha=math.exp(factor))
        return torch.add(x, self.carried, alpha=sigma * self.s_noise)


def _seeds_run(denoiser, x, sigmas, extra_args, noise, callback, after_step, eta: float, s_noise: float, stages):
    """The SEEDS loop: each step from sigma s to s' > 0 runs ``stages(call, x, s, s', h, D, noise)`` (h: the step in
    lambda, D the x0 at s; ``call(x, sigma)``: the network on a stage's state, handed through ``after_step`` first);
    a step to 0 lands on D, a zero-length one moves nothing."""
    x, sig, extra, noise = _setup(x, sigmas, extra_args, noise)
    n = len(sig) - 1
    for i in range(n):
        s, s_next = sig[i], sig[i + 1]
        denoised = _call(denoiser, x, s, extra)
        _cb(callback, x, i, s, s, denoised)
        if s_next != 0 and s_next != s:
            def call(state, sigma):
                return _call(denoiser, _after(after_step, state, sigma, False), sigma, extra)

            h = math.log(s) - math.log(s_next)
            x = stages(call, x, s, s_next, h, denoised, _StageNoise(noise, i, eta, s_noise))
        elif s_next == 0:
            x = denoised
        x = _after(after_step, x, s_next, i == n - 1)
    return x


@torch.no_grad()
def sample_seeds_2(denoiser, x, sigmas, *, extra_args=None, noise=None, callback=None, after_step=None,
                   eta: float = 1.0, s_noise: float = 1.0, r: float = 0.5, solver_type: str = "phi_1"):
    """SEEDS-2 (see the module doc)."""
    from .errors import BadArgumentError

    if solver_type not in ("phi_1", "phi_2"):
        raise BadArgumentError(f"solver_type: expected 'phi_1' or 'phi_2', found {solver_type!r}")
    if not 0 < r <= 1:
        raise BadArgumentError(f"r: expected the intermediate point's fraction of the step in (0, 1], found {r!r}")

    def stages(call, x, s, s_next, h, denoised, noise):
        h_eta, s_1 = h * (eta + 1), s * math.exp(-r * h)
        denoised_2 = call(noise.add(_seeds_stage(x, s, s_1, r * h, eta, denoised), s_1, -r * h), s_1)
        if solver_type == "phi_1":
            x = _seeds_stage(x, s, s_next, h, eta, torch.lerp(denoised, denoised_2, 1 / (2 * r)))
        else:
            b2 = _phi_2(-h_eta) / r
            b1 = _phi_1(-h_eta) - b2
            x = torch.add(x * (s_next / s * math.exp(-h * eta)), denoised, alpha=-b1)
            x = torch.add(x, denoised_2, alpha=-b2)
        return noise.add(x, s_next, (r - 1) * h)

    return _seeds_run(denoiser, x, sigmas, extra_args, noise, callback, after_step, eta, s_noise, stages)


@torch.no_grad()
def sample_seeds_3(denoiser, x, sigmas, *, extra_args=None, noise=None, callback=None, after_step=None,
                   eta: float = 1.0, s_noise: float = 1.0, r_1: float = 1 / 3, r_2: float = 2 / 3):
    """SEEDS-3 (see the module doc)."""
    from .errors import BadArgumentError

    if not 0 < r_1 < r_2 <= 1:
        raise BadArgumentError(f"r_1 / r_2: expected 0 < r_1 < r_2 <= 1 (the stages' fractions of the step), found "
                               f"{r_1!r} / {r_2!r}")

    def stages(call, x, s, s_next, h, denoised, noise):
        h_eta = h * (eta + 1)
        s_1, s_2 = s * math.exp(-r_1 * h), s * math.exp(-r_2 * h)
        denoised_2 = call(noise.add(_seeds_stage(x, s, s_1, r_1 * h, eta, denoised), s_1, -r_1 * h), s_1)
        a3_2 = r_2 / r_1 * _phi_2(-r_2 * h_eta)
        a3_1 = _phi_1(-r_2 * h_eta) - a3_2
        x_3 = torch.add(x * (s_2 / s * math.exp(-r_2 * h * eta)), denoised, alpha=-a3_1)
        denoised_3 = call(noise.add(torch.add(x_3, denoised_2, alpha=-a3_2), s_2, (r_1 - r_2) * h), s_2)
        b3 = _phi_2(-h_eta) / r_2
        b1 = _phi_1(-h_eta) - b3
        x = torch.add(x * (s_next / s * math.exp(-h * eta)), denoised, alpha=-b1)
        return noise.add(torch.add(x, denoised_3, alpha=-b3), s_next, (r_2 - 1) * h)

    return _seeds_run(denoiser, x, sigmas, extra_args, noise, callback, after_step, eta, s_noise, stages)


@torch.no_grad()
def sample_exp_heun_2_x0(denoiser, x, sigmas, *, extra_args=None, noise=None, callback=None, after_step=None,
                         solver_type: str = "phi_2"):
    """The exponential Heun method on the data prediction: ``sample_seeds_2`` at r = 1 without noise."""
    return sample_seeds_2(denoiser, x, sigmas, extra_args=extra_args, noise=noise, callback=callback,
                          after_step=after_step, eta=0.0, s_noise=0.0, r=1.0, solver_type=solver_type)


@torch.no_grad()
def sample_exp_heun_2_x0_sde(denoiser, x, sigmas, *, extra_args=None, noise=None, callback=None, after_step=None,
                             eta: float = 1.0, s_noise: float = 1.0, solver_type: str = "phi_2"):
    """The stochastic exponential Heun method: ``sample_seeds_2`` at r = 1."""
    return sample_seeds_2(denoiser, x, sigmas, extra_args=extra_args, noise=noise, callback=callback,
                          after_step=after_step, eta=eta, s_noise=s_noise, r=1.0, solver_type=solver_type)
