"""Noise schedules: DDPM betas -> alphas_cumprod, and the sigma grids a sampler walks.

Two halves:

* **Training schedules** (`make_betas`, `make_alphas_cumprod`): the discrete DDPM schedule a network was
  trained on, computed exactly as diffusers does (float32, same formulas) so that timestep lookups land on
  the same numbers.
* **Sampling grids** (`get_sigmas_karras`, `get_sigmas_exponential`, `get_sigmas_uniform`,
  `get_timesteps` + `sigmas_at_timesteps`): the decreasing noise levels a sampler steps through.

Sigma is the k-diffusion / EDM noise level: ``x_t = x_0 + sigma * eps``; for a DDPM schedule
``sigma_t = sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t])``. Every grid is a HOST tensor (float64,
CPU), decreasing, with one more entry than there are steps; the last entry is 0 unless
``final="sigma_min"`` (diffusers' ``final_sigmas_type``) asks to stop at the smallest noise level.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch

from .comfy_schedules import (AYS_SCHEDULES, RANGE_SCHEDULES, TABLE_SCHEDULES, ays_sigmas, kl_optimal_sigmas,
                              linear_quadratic_sigmas, table_sigmas)
from .errors import BadArgumentError

# EDM (Karras et al. 2022) defaults.
EDM_SIGMA_MIN = 0.002
EDM_SIGMA_MAX = 80.0
EDM_RHO = 7.0
EDM_SIGMA_DATA = 0.5

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
SPACINGS = ("leading", "trailing", "linspace")
FINAL_SIGMAS = ("zero", "sigma_min")


# --------------------------------------------------------------------------------------------------
# Training schedules
# --------------------------------------------------------------------------------------------------

def _cosine_betas(n: int, max_beta: float = 0.999) -> torch.Tensor:
    """GLIDE / improved-DDPM cosine schedule, discretised as diffusers' ``betas_for_alpha_bar``."""
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float32)


def make_betas(beta_schedule: str = "linear", num_train_timesteps: int = 1000, beta_start: float = 1e-4,
               beta_end: float = 0.02, trained_betas: Optional[Sequence[float]] = None) -> torch.Tensor:
    """The DDPM betas (float32, length ``num_train_timesteps``), bit-identical to diffusers."""
    if trained_betas is not None:
        betas = torch.tensor(trained_betas, dtype=torch.float32)
        if betas.dim() != 1 or len(betas) != num_train_timesteps:  # (the timestep grids count num_train_timesteps)
            raise BadArgumentError(f"trained_betas: expected num_train_timesteps={num_train_timesteps} values, found "
                                   f"shape {tuple(betas.shape)}")
        return betas
    n = num_train_timesteps
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
    if beta_schedule == "scaled_linear":  # latent diffusion: linear in sqrt(beta)
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return _cosine_betas(n)
    if beta_schedule == "sigmoid":  # GeoDiff
        return torch.sigmoid(torch.linspace(-6, 6, n)) * (beta_end - beta_start) + beta_start
    raise BadArgumentError(f"beta_schedule: expected one of {BETA_SCHEDULES}, found {beta_schedule!r}")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023 (Algorithm 1): shift/scale sqrt(alphas_cumprod) so the last timestep has SNR 0."""
    abar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * (first / (first - last))
    abar = abar_sqrt ** 2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


ZERO_SNR_FLOOR = 2.0 ** -24  # diffusers' sigma-based schedulers: the top sigma is 4096
EXACT_ZERO_SNR_FLOOR = 1e-20  # DDIM / DDPM keep 0 there; sigma 1e10 stands for infinity in the sigma frame


def make_alphas_cumprod(beta_schedule: str = "linear", num_train_timesteps: int = 1000, beta_start: float = 1e-4,
                        beta_end: float = 0.02, trained_betas: Optional[Sequence[float]] = None,
                        rescale_betas_zero_snr: bool = False, zero_snr_floor: float = ZERO_SNR_FLOOR) -> torch.Tensor:
    """alphas_cumprod (float32). With zero-terminal-SNR the last entry, 0, is set to ``zero_snr_floor`` so that
    the largest sigma is finite: 2**-24 as diffusers' sigma-based schedulers do (sigma ~4096), or
    ``EXACT_ZERO_SNR_FLOOR`` for DDIM / DDPM, which keep the 0 (sigma 1e10: the network sees x_vp and predicts
    x0 = -v, and eps = (x - x0) / sigma equals x_vp to float32 precision, as at a true zero SNR)."""
    betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end, trained_betas)
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    ac = torch.cumprod(1.0 - betas, dim=0)
    if rescale_betas_zero_snr:
        ac[-1] = zero_snr_floor
    return ac



def alphas_cumprod_of(config: dict, zero_snr_floor: float = ZERO_SNR_FLOOR) -> torch.Tensor:
    """``make_alphas_cumprod`` of a diffusers scheduler config's training schedule (its absent keys diffusers'
    defaults: 1000 linear betas from 1e-4 to 0.02)."""
    return make_alphas_cumprod(config.get("beta_schedule", "linear"), int(config.get("num_train_timesteps", 1000)),
                               float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02)),
                               config.get("trained_betas"), bool(config.get("rescale_betas_zero_snr", False)),
                               zero_snr_floor=zero_snr_floor)

def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sigma_t for every training timestep t (increasing in t), float64 copies of diffusers' float32 values."""
    ac = alphas_cumprod.detach().to("cpu", torch.float32)
    return (((1 - ac) / ac) ** 0.5).to(torch.float64)


# --------------------------------------------------------------------------------------------------
# Sampling grids
# --------------------------------------------------------------------------------------------------

def _finish(sigmas, final: str, sigma_min: Optional[float] = None) -> torch.Tensor:
    """Append the final sigma (0, or sigma_min) and return a float64 CPU tensor."""
    sigmas = torch.as_tensor(np.asarray(sigmas, dtype=np.float64))
    if final == "zero":
        last = 0.0
    elif final == "sigma_min":
        last = float(sigmas[-1]) if sigma_min is None else float(sigma_min)
    else:
        raise BadArgumentError(f"final: expected one of {FINAL_SIGMAS}, found {final!r}")
    return torch.cat([sigmas, sigmas.new_tensor([last])])


def get_sigmas_karras(n: int, sigma_min: float = EDM_SIGMA_MIN, sigma_max: float = EDM_SIGMA_MAX,
                      rho: float = EDM_RHO, final: str = "zero") -> torch.Tensor:
    """Karras et al. 2022 eq. 5: n sigmas evenly spaced in sigma**(1/rho), then the final sigma."""
    _check_steps(n)
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _finish((hi + ramp * (lo - hi)) ** rho, final)


def get_sigmas_exponential(n: int, sigma_min: float = EDM_SIGMA_MIN, sigma_max: float = EDM_SIGMA_MAX,
                           final: str = "zero") -> torch.Tensor:
    """n sigmas evenly spaced in log(sigma) (uniform steps in DPM-Solver's lambda), then the final sigma."""
    _check_steps(n)
    return _finish(np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n)), final)


def get_sigmas_uniform(n: int, sigma_min: float = EDM_SIGMA_MIN, sigma_max: float = EDM_SIGMA_MAX,
                       alphas_cumprod: Optional[torch.Tensor] = None, final: str = "zero") -> torch.Tensor:
    """Evenly spaced in the model's time. With a discrete schedule (``alphas_cumprod``) that is evenly
    spaced (fractional) timesteps from the last to the first training step, sigma interpolated in log
    space (ComfyUI's "normal"); without one, evenly spaced in sigma between sigma_max and sigma_min."""
    _check_steps(n)
    if alphas_cumprod is None:
        return _finish(np.linspace(sigma_max, sigma_min, n), final)
    log_s = sigmas_from_alphas_cumprod(alphas_cumprod).log().numpy()
    t = np.linspace(len(log_s) - 1, 0, n)
    return _finish(np.exp(np.interp(t, np.arange(len(log_s)), log_s)), final)


def get_timesteps(spacing: str, steps: int, num_train_timesteps: int = 1000, steps_offset: int = 0, *,
                  integer: bool = True, skip_last: bool = False, last_timestep: Optional[int] = None) -> np.ndarray:
    """Decreasing timesteps with diffusers' spacings (Lin et al. 2023, Table 2).

    ``skip_last=True`` is the variant of diffusers' multistep solvers (DPM-Solver, UniPC): space
    ``steps + 1`` points and drop the final one (t=0), so no network call happens at t=0.
    ``integer=False`` keeps 'linspace' fractional (Euler-family schedulers). ``last_timestep`` caps the
    range (DPM-Solver's ``lambda_min_clipped``).
    """
    _check_steps(steps)
    T = num_train_timesteps
    last = T if last_timestep is None else last_timestep
    k = steps + 1 if skip_last else steps
    if spacing == "linspace":
        ts = np.linspace(0, last - 1, k, dtype=np.float64 if skip_last or integer else np.float32)
        ts = ts.round() if integer else ts
    elif spacing == "leading":
        ratio = last // k
        ts = (np.arange(0, k) * ratio).round().astype(np.float64) + steps_offset
    elif spacing == "trailing":
        ts = np.round(np.arange(last, 0, -T / steps)) - 1
        return ts.astype(np.int64 if integer else np.float32)
    else:
        raise BadArgumentError(f"timestep spacing: expected one of {SPACINGS}, found {spacing!r}")
    ts = ts[::-1]
    if skip_last:
        ts = ts[:-1]
    return ts.copy().astype(np.int64 if integer else np.float32)


def ddim_stride(steps: int, num_train_timesteps: int = 1000) -> Optional[int]:
    """The smallest integer stride whose ``range(0, T, stride)`` holds exactly ``steps`` timesteps (guided-diffusion's
    "ddimN"), or None where none does (1, 37, 60, ... of 1000)."""
    return next((i for i in range(1, num_train_timesteps) if len(range(0, num_train_timesteps, i)) == steps), None)


def respaced_timesteps(steps: int, num_train_timesteps: int = 1000, *, ddim: bool = False) -> np.ndarray:
    """Decreasing timesteps of guided-diffusion's ``space_timesteps(T, [steps])`` (official DiT's ``sample.py`` and
    ADM's ``image_sample.py`` respace so): a stride of (T - 1) / (steps - 1) accumulated in floating point and
    rounded half to even at each step. diffusers' 'linspace' multiplies instead and differs at some half-way ties
    (21 steps of 1000: 499 here, 500 there).

    ``ddim``: ``space_timesteps(T, "ddim<steps>")``, ``range(0, T, stride)`` with the smallest integer stride that
    gives exactly ``steps`` timesteps (diffusers' 'leading' strides T // steps: 30 of 1000 is stride 34 here, 33
    there); refused, as guided-diffusion refuses it, where no stride does."""
    _check_steps(steps)
    T = num_train_timesteps
    if steps > T:
        raise BadArgumentError(f"steps: guided-diffusion's respacing takes at most {T} steps (the training "
                               f"timesteps), found {steps}")
    if ddim:
        stride = ddim_stride(steps, T)
        if stride is None:
            raise BadArgumentError(f"steps: guided-diffusion's 'ddim{steps}' respacing needs an integer stride "
                                   f"giving exactly {steps} of the {T} timesteps, and none does; expected another "
                                   f"count (the 'N' respacing takes any)")
        return np.arange(0, T, stride, dtype=np.int64)[::-1].copy()
    stride = (num_train_timesteps - 1) / (steps - 1) if steps > 1 else 1
    taken, at = [], 0.0
    for _ in range(steps):
        taken.append(round(at))
        at += stride
    return np.array(taken[::-1], dtype=np.int64)


def sigmas_at_timesteps(alphas_cumprod: torch.Tensor, timesteps) -> np.ndarray:
    """sigma at (possibly fractional) timesteps: linear interpolation of the float32 sigma table, as
    diffusers' ``np.interp``; returned as float32 values (what diffusers stores) in a float64 array."""
    table = sigmas_from_alphas_cumprod(alphas_cumprod).to(torch.float32).numpy()
    s = np.interp(np.asarray(timesteps), np.arange(len(table)), table)
    return s.astype(np.float32).astype(np.float64)


def sigma_to_timestep(sigma, alphas_cumprod: torch.Tensor) -> np.ndarray:
    """Host-side inverse of the training table: timestep for each sigma by interpolation in log sigma
    (diffusers' ``_sigma_to_t``). The device-side twin lives in ``DiscreteDenoiser``."""
    # float32 logs of the float32 table, as diffusers' np.log(sigmas) keeps them: the top of a Karras grid lies a
    # float64 rounding error below the table's last sigma, which only the float32 log tells apart
    log_table = np.log(sigmas_from_alphas_cumprod(alphas_cumprod).to(torch.float32).numpy()).astype(np.float64)
    log_s = np.log(np.maximum(np.asarray(sigma, dtype=np.float64), 1e-10))
    # the last table entry <= sigma, as diffusers finds it: a zero-terminal-SNR table is not sorted (its last
    # entry, clamped to alphas_cumprod 2**-24, lies below the one before it), so no binary search
    below = log_table[:, None] <= log_s.reshape(1, -1)
    last = np.where(below.any(axis=0), len(log_table) - 1 - np.argmax(below[::-1], axis=0), 0)
    low = np.clip(last, 0, len(log_table) - 2).reshape(log_s.shape)
    w = np.clip((log_table[low] - log_s) / (log_table[low] - log_table[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def get_sigmas(schedule: str, steps: int, *, sigma_min: Optional[float] = None, sigma_max: Optional[float] = None,
               rho: float = EDM_RHO, alphas_cumprod: Optional[torch.Tensor] = None, steps_offset: int = 0,
               final: str = "zero") -> torch.Tensor:
    """A sigma grid by name (k-diffusion / ComfyUI / diffusers vocabulary).

    ``karras | exponential | uniform | kl_optimal | linear_quadratic`` need a sigma range: ``sigma_min``/``sigma_max``, else the range
    of ``alphas_cumprod``, else EDM's 0.002..80. ``leading | trailing | linspace`` need ``alphas_cumprod``
    (discrete-time models): sigma at diffusers' integer timesteps; so do ComfyUI's ``simple | sgm_uniform |
    ddim_uniform | beta`` (``fastdiff.comfy_schedules``), which pick from or interpolate the training table.
    ComfyUI's ``normal`` is ``uniform`` with a training table, else (an EDM model) ``exponential``; ``ays`` /
    ``ays_sd1`` / ``ays_sdxl`` are Align Your Steps' fixed lists (SD's sigma range).
    """
    if schedule == "normal":
        schedule = "uniform" if alphas_cumprod is not None else "exponential"
    if schedule in AYS_SCHEDULES:  # (fixed lists: SD's sigma range, whatever the model's)
        _check_steps(steps)
        return _finish(ays_sigmas(schedule, steps), final)
    if schedule in TABLE_SCHEDULES:
        if alphas_cumprod is None:
            raise BadArgumentError(f"schedule {schedule!r} picks from the training sigma table: expected "
                                   f"alphas_cumprod (a discrete-time model), found None")
        _check_steps(steps)
        return _finish(table_sigmas(schedule, steps, alphas_cumprod), final)
    if schedule in SPACINGS:
        if alphas_cumprod is None:
            raise BadArgumentError(f"schedule {schedule!r} spaces training timesteps: expected alphas_cumprod, "
                                   "found None")
        ts = get_timesteps(schedule, steps, len(alphas_cumprod), steps_offset)
        return _finish(sigmas_at_timesteps(alphas_cumprod, ts), final)
    if alphas_cumprod is not None:
        table = sigmas_from_alphas_cumprod(alphas_cumprod)
        sigma_min = float(table[0]) if sigma_min is None else sigma_min
        sigma_max = float(table[-1]) if sigma_max is None else sigma_max
    sigma_min = EDM_SIGMA_MIN if sigma_min is None else sigma_min
    sigma_max = EDM_SIGMA_MAX if sigma_max is None else sigma_max
    _check_range(schedule, sigma_min, sigma_max, rho)
    if schedule == "karras":
        return get_sigmas_karras(steps, sigma_min, sigma_max, rho, final)
    if schedule == "exponential":
        return get_sigmas_exponential(steps, sigma_min, sigma_max, final)
    if schedule == "uniform":
        return get_sigmas_uniform(steps, sigma_min, sigma_max, alphas_cumprod, final)
    if schedule == "kl_optimal":
        _check_steps(steps)
        return _finish(kl_optimal_sigmas(steps, sigma_min, sigma_max), final)
    if schedule == "linear_quadratic":
        _check_steps(steps)
        return _finish(linear_quadratic_sigmas(steps, sigma_max), final)
    raise BadArgumentError(f"schedule: expected one of {SCHEDULES}, found {schedule!r}")


# (the ComfyUI names after diffusers' spacings: fastdiff.comfy_schedules)
SCHEDULES = ("karras", "exponential", "uniform") + SPACINGS + TABLE_SCHEDULES + RANGE_SCHEDULES + AYS_SCHEDULES


def _check_range(schedule: str, sigma_min, sigma_max, rho) -> None:
    """A falling grid needs 0 <= sigma_min < sigma_max (> 0 for the exponential grid's logarithm) and rho > 0."""
    lo_ok = sigma_min > 0 if schedule == "exponential" else sigma_min >= 0
    if not (math.isfinite(sigma_min) and math.isfinite(sigma_max) and lo_ok and sigma_min < sigma_max):
        raise BadArgumentError(f"schedule {schedule!r}: expected {'0 <' if schedule == 'exponential' else '0 <='} "
                               f"sigma_min < sigma_max, finite, found sigma_min={sigma_min}, sigma_max={sigma_max}")
    if schedule == "karras" and not (math.isfinite(rho) and rho > 0):
        raise BadArgumentError(f"schedule 'karras': expected rho > 0, found {rho}")


def _check_steps(n) -> None:
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise BadArgumentError(f"steps: expected a positive integer, found {n!r}")
