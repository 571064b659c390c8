"""Linear multistep samplers: PLMS (PNDM) and LMS, in sigma units like every fastdiff sampler.

* ``sample_plms`` — Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds": DDIM's
  transfer x' = x + (sigma' - sigma) * eps driven by an Adams-Bashforth combination of the last noise
  predictions (orders 1-4). Its warm-up is either the pseudo improved Euler step that Stable Diffusion's
  ``PLMSSampler`` and diffusers' ``PNDMScheduler(skip_prk_steps=True)`` take (one extra network call), or
  the paper's pseudo Runge-Kutta (4 calls on each of the first 3 steps, diffusers' default PNDM).
* ``sample_lms`` — k-diffusion's / diffusers' ``LMSDiscreteScheduler``: Adams-Bashforth on the ODE
  dx/dsigma = (x - D) / sigma, with the Lagrange weights integrated exactly over each sigma step.

Both keep the last outputs and write each step as one linear combination (``state_update.combine``), with
the weights worked out on the host: a whole run can be captured in one CUDA graph.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Optional, Sequence

import numpy as np
import torch

from .errors import BadArgumentError
from .sampler_base import _after, _call, _cb, _setup, host_floats, multistep_order
from .state_update import combine

__all__ = ["sample_plms", "sample_lms", "sample_deis", "adams_bashforth_weights", "lms_weights", "deis_weights"]

# Adams-Bashforth weights, newest output first (what PNDM's "linear multistep" part uses)
_AB = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def adams_bashforth_weights(order: int) -> tuple:
    """The order-``order`` Adams-Bashforth weights on equal steps, newest output first."""
    return _AB[order]


def lms_weights(nodes: Sequence[float], lo: float, hi: float) -> list:
    """Integrals over [lo, hi] of the Lagrange basis polynomials of ``nodes`` (newest first): the weights
    of k-diffusion's ``linear_multistep_coeff`` (which integrates the same polynomials numerically). The
    polynomials are built in w = (tau - lo) / (hi - lo), where the nodes are O(1): in tau itself a high-order
    basis on a short step far from 0 loses every digit to cancellation."""
    width = hi - lo
    w_nodes = [(t - lo) / width for t in nodes]
    antiderivatives = [_lagrange_basis(w_nodes, j).integ() for j in range(len(nodes))]
    return [width * float(a(1.0) - a(0.0)) for a in antiderivatives]


def _lagrange_basis(nodes: Sequence[float], j: int) -> np.polynomial.Polynomial:
    others = [tk for k, tk in enumerate(nodes) if k != j]
    if not others:
        return np.polynomial.Polynomial([1.0])
    return np.polynomial.Polynomial.fromroots(others) / float(np.prod([nodes[j] - tk for tk in others]))


def deis_weights(sigma_nodes: Sequence[float], lo: float, hi: float) -> list:
    """DEIS's "log-rho" weights: integrals over sigma in [lo, hi] of the Lagrange basis polynomials in
    log sigma through ``sigma_nodes`` (newest first). With v = log(sigma / lo) the integrand is lo P(v) e^v,
    whose antiderivative is sigma (P - P' + P'' - ...)(v): exact, and 0 at sigma = 0."""
    logs = [math.log(v / lo) for v in sigma_nodes]
    out = []
    for j in range(len(logs)):
        p = _lagrange_basis(logs, j)

        def antiderivative(sigma, p=p):
            if sigma == 0:
                return 0.0
            v, total, sign, q = math.log(sigma / lo), 0.0, 1.0, p
            for _ in range(len(logs)):
                total += sign * q(v)
                q, sign = q.deriv(), -sign
            return sigma * total
        out.append(antiderivative(hi) - antiderivative(lo))
    return out


def _relabel(x: torch.Tensor, frm: float, to: float) -> torch.Tensor:
    """The same variance-preserving sample read at another sigma: x_sigma = x_vp * sqrt(1 + sigma^2).
    diffusers' PNDM sometimes lands a step at one timestep and evaluates the next at another."""
    return x if frm == to else x * math.sqrt((1 + to * to) / (1 + frm * frm))


def _eps(x: torch.Tensor, denoised: torch.Tensor, sigma: float) -> torch.Tensor:
    return combine([(1 / sigma, x), (-1 / sigma, denoised)])      # eps = (x - x0) / sigma


def _v(x: torch.Tensor, denoised: torch.Tensor, sigma: float) -> torch.Tensor:
    """The v-prediction (Salimans & Ho 2022) equivalent to x0 = ``denoised`` at (x, sigma):
    x0 = x_vp / sqrt(1 + s^2) - v s / sqrt(1 + s^2), x_vp = x / sqrt(1 + s^2)."""
    k = math.sqrt(1 + sigma * sigma) / sigma
    return combine([(k / (1 + sigma * sigma), x), (-k, denoised)])


def _transfer(x: torch.Tensor, frm: float, to: float, outputs: list, multistep_on: str) -> torch.Tensor:
    """DDIM's transfer of x (at sigma ``frm``) to sigma ``to`` with the noise prediction sum(w * o) for
    ``outputs`` [(w, o)]: x + (to - frm) * eps. With v outputs the sum is converted to eps at (x, frm), as
    diffusers' PNDM does: eps = v / sqrt(1 + f^2) + f x / (1 + f^2)."""
    dt = to - frm
    if multistep_on == "eps":
        return combine([(1.0, x)] + [(dt * w, o) for w, o in outputs])
    q = 1 + frm * frm
    return combine([(1 + dt * frm / q, x)] + [(dt * w / math.sqrt(q), o) for w, o in outputs])


@torch.no_grad()
def sample_plms(denoiser, x, sigmas, *, extra_args=None, noise=None, callback=None, after_step=None,
                warmup: str = "euler", sigmas_to: Optional[Sequence[float]] = None, warmup_from: Optional[float] = None,
                sigmas_mid: Optional[Sequence[float]] = None, sigmas_mid_to: Optional[Sequence[float]] = None,
                multistep_on: str = "eps"):
    """PLMS (pseudo linear multistep, PNDM's 4th-order method).

    Each step i takes x from sigmas[i] to sigmas[i+1] with DDIM's transfer and the Adams-Bashforth
    combination of the noise predictions eps_i, eps_{i-1}, ... (orders 2, 3, 4 as they become available).

    ``warmup``: "euler" — the first step is the pseudo improved Euler step (a DDIM step with eps_0, one call
    at its end, and the step again with the mean of both predictions: N + 1 calls for N steps); "rk4" — the
    first three steps are pseudo Runge-Kutta steps (4 calls each, midpoints at ``sigmas_mid``, by default the
    geometric means), so that the multistep part starts at full order.

    Options reproducing diffusers' ``PNDMScheduler`` (its timestep arithmetic lands some steps elsewhere than
    where the next call evaluates; the state is then relabelled in the variance-preserving frame, as its next
    call reads it): ``sigmas_to[i]`` where step i lands; ``warmup_from`` the start its Euler warm-up's second
    pass steps from; ``sigmas_mid_to[j]`` where the first Runge-Kutta stage of step j lands;
    ``multistep_on="v"``: combine the v-predictions of a v-prediction network and convert the sum to a noise
    prediction at the step's start (diffusers' PNDM with ``prediction_type="v_prediction"``; not the same
    method as combining noise predictions, since v -> eps depends on the state and sigma).
    """
    if warmup not in ("euler", "rk4"):
        raise BadArgumentError(f"warmup: expected 'euler' or 'rk4', found {warmup!r}")
    if multistep_on not in ("eps", "v"):
        raise BadArgumentError(f"multistep_on: expected 'eps' or 'v', found {multistep_on!r}")
    x, sig, extra, _ = _setup(x, sigmas, extra_args, noise)
    n = len(sig) - 1
    to = host_floats("sigmas_to", sigmas_to, n) if sigmas_to is not None else sig[1:]
    if warmup_from is not None:
        warmup_from = host_floats("warmup_from", [warmup_from], 1, positive=True)[0]
    n_rk = min(3, n) if warmup == "rk4" else 0
    if n_rk == 0 and (sigmas_mid is not None or sigmas_mid_to is not None):
        raise BadArgumentError("sigmas_mid / sigmas_mid_to: the Runge-Kutta warm-up's midpoints; expected "
                               "warmup='rk4' with them, found warmup='euler'")
    mid = host_floats("sigmas_mid", sigmas_mid, n_rk, positive=True) if sigmas_mid is not None else \
        [math.sqrt(sig[j] * sig[j + 1]) for j in range(n_rk)]
    mid_to = host_floats("sigmas_mid_to", sigmas_mid_to, n_rk, positive=True) if sigmas_mid_to is not None else mid
    as_output = _eps if multistep_on == "eps" else _v
    outs = []                                          # predictions at the start of each step, newest last

    def output_at(state, s):
        d = _call(denoiser, state, s, extra)
        return d, as_output(state, d, s)

    def transfer(state, frm, dest, outputs):
        return _transfer(state, frm, dest, outputs, multistep_on)

    for i in range(n):
        s, s_next = sig[i], sig[i + 1]
        denoised, e = output_at(x, s)
        _cb(callback, x, i, s, s, denoised)
        outs = (outs + [e])[-4:]
        if s == s_next:                                # a zero-length step (a grid ending at sigma_min)
            continue
        if i < n_rk and s_next > 0:                    # pseudo Runge-Kutta: predictions at s, mid, mid, s_next
            a, m = mid_to[i], mid[i]
            _, e2 = output_at(_relabel(transfer(x, s, a, [(1.0, e)]), a, m), m)
            _, e3 = output_at(transfer(x, s, m, [(1.0, e2)]), m)
            _, e4 = output_at(transfer(x, s, s_next, [(1.0, e3)]), s_next)
            # (after_step at the step's end only: diffusers' inpainting pipelines never run this warm-up)
            x = _after(after_step, transfer(x, s, s_next, [(1 / 6, e), (1 / 3, e2), (1 / 3, e3), (1 / 6, e4)]),
                       s_next, i == n - 1)
            continue
        if i == 0 and n_rk == 0 and n > 1 and s_next > 0:   # pseudo improved Euler: both ends, their mean
            _, e1 = output_at(_after(after_step, _relabel(transfer(x, s, to[0], [(1.0, e)]), to[0], s_next), s_next,
                                     False), s_next)
            frm = s if warmup_from is None else warmup_from  # (from the unchanged x, as diffusers' PNDM)
            x = _after(after_step, transfer(_relabel(x, s, frm), frm, s_next, [(0.5, e), (0.5, e1)]), s_next,
                       i == n - 1)
            continue
        w = adams_bashforth_weights(len(outs))
        x = _relabel(transfer(x, s, to[i], [(wj, outs[-1 - j]) for j, wj in enumerate(w)]), to[i], s_next)
        x = _after(after_step, x, s_next, i == n - 1)
    return x


def _integrate(denoised, s, s_next, history, k, weights, older_nodes=()):
    """x + sum_j c_j o_j over the newest ``k`` (sigma, output) pairs of ``history`` (newest last), the weights
    from ``weights(nodes newest first, s, s_next)``, where x = denoised + s o_0 (o_0 = (x - denoised) / s, the
    newest output). Written as denoised + (s + c_0) o_0 + sum_{j>0} c_j o_j: at a large sigma (a flow model's
    sigma frame starts at 3000) x and c_0 o_0 nearly cancel, which cost float32 three digits. (Zero-length
    steps never enter a history, so its sigmas are distinct interpolation nodes.)"""
    newest = history[::-1][:k]
    c = weights([sj for sj, _ in newest] + list(older_nodes), s, s_next)  # (zip below drops the extra nodes' weights)
    older = [(cj, oj) for cj, (_, oj) in zip(c[1:], newest[1:])]
    return combine([(1.0, denoised), (s + c[0], newest[0][1])] + older)


@torch.no_grad()
def sample_lms(denoiser, x, sigmas, *, extra_args=None, noise=None, callback=None, after_step=None, order: int = 4,
               nodes_before: Sequence[float] = ()):
    """Linear multistep (k-diffusion's ``sample_lms``, diffusers' ``LMSDiscreteScheduler``): x' = x +
    sum_j c_j d_{i-j}, d = (x - D) / sigma, with c_j the integral over [sigma_i, sigma_{i+1}] of the Lagrange
    polynomial through the last ``order`` sigmas (order 1 is Euler).

    ``nodes_before``: grid sigmas before the first step (newest last). diffusers started part-way (img2img) builds
    its first steps' polynomials through the grid's last min(step + 1, order) sigmas, visited or not, and weighs the
    derivatives it has with the first of their weights."""
    if not isinstance(order, int) or isinstance(order, bool) or order < 1:
        raise BadArgumentError(f"order: expected a positive integer, found {order!r}")
    x, sig, extra, _ = _setup(x, sigmas, extra_args, noise)
    ds = deque(maxlen=order)                           # (sigma, d = (x - D) / sigma), newest last
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        denoised = _call(denoiser, x, s, extra)
        _cb(callback, x, i, s, s, denoised)
        if s == s_next:                                # a zero-length step (x and D as at the last one; at 0: x0)
            x = _after(after_step, x, s_next, i == len(sig) - 2)
            continue
        ds.append((s, _eps(x, denoised, s)))
        older = list(nodes_before)[::-1][:order - len(ds)] if len(ds) < order else []
        x = _after(after_step, _integrate(denoised, s, s_next, list(ds), len(ds), lms_weights, older), s_next,
                   i == len(sig) - 2)
    return x


@torch.no_grad()
def sample_deis(denoiser, x, sigmas, *, extra_args=None, noise=None, callback=None, after_step=None, order: int = 2,
                lower_order_final: bool = True):
    """DEIS (Zhang & Chen 2023, "log-rho" multistep; diffusers' ``DEISMultistepScheduler``): the exponential
    integrator of the probability-flow ODE in the noise prediction, x' = x + sum_j c_j eps_{i-j}, with eps
    interpolated by a polynomial in log sigma through the last ``order`` (1-3) steps and integrated exactly
    over [sigma, sigma']. Order 1 is DDIM. Warm-up and ``lower_order_final`` (fewer than 15 steps: the last
    two steps at orders 1 and 2) follow diffusers' multistep schedulers."""
    if order not in (1, 2, 3):
        raise BadArgumentError(f"order: expected 1, 2 or 3, found {order!r}")
    x, sig, extra, _ = _setup(x, sigmas, extra_args, noise)
    n = len(sig) - 1
    eps = deque(maxlen=order)                          # (sigma, noise prediction), newest last
    for i in range(n):
        s, s_next = sig[i], sig[i + 1]
        denoised = _call(denoiser, x, s, extra)
        _cb(callback, x, i, s, s, denoised)
        if s_next == s:                                # a zero-length step (a grid ending at sigma_min, or at 0)
            x = _after(after_step, x, s_next, i == n - 1)
            continue
        eps.append((s, _eps(x, denoised, s)))
        x = _integrate(denoised, s, s_next, list(eps), multistep_order(i, n, order, lower_order_final), deis_weights)
        x = _after(after_step, x, s_next, i == n - 1)
    return x
