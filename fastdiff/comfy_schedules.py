"""ComfyUI's sigma schedules, by the names its KSampler lists them (``comfy/samplers.py``), for users matching
ComfyUI's images:

* ``simple``: every (T / steps)-th entry of the model's sigma table, from the top (truncated indices).
* ``sgm_uniform``: ``steps + 1`` evenly spaced timesteps from T - 1 to 0, the last dropped (SGM / SDXL-Turbo's
  "trailing" in continuous time), sigma interpolated in log space.
* ``ddim_uniform``: the table entries 1, 1 + s, 1 + 2s, ... (s = T // steps), from the top: as ComfyUI, this can
  give a step more than asked (T = 1000, 7 steps: s = 142, 8 entries).
* ``beta``: timesteps at the quantiles of a Beta(0.6, 0.6) distribution (Lee et al. 2024, "Beta sampling is all
  you need"), rounded to the table, repeats dropped (fewer steps, where two land on one timestep). Needs scipy.
* ``kl_optimal``: evenly spaced in arctan(sigma) between the range's ends (AUTOMATIC1111's "KL Optimal", Align Your
  Steps' KL-optimal grid); any model with a sigma range.

ComfyUI's ``normal`` is fastdiff's ``uniform``, and ``karras`` / ``exponential`` are k-diffusion's, as in fastdiff.
The table-based four need a discrete-time model's training table (``alphas_cumprod``). Each returns the decreasing
sigmas WITHOUT the final entry (``schedules._finish`` appends it), as float64 values of ComfyUI's float32 table.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .errors import BackendUnavailableError

TABLE_SCHEDULES = ("simple", "sgm_uniform", "ddim_uniform", "beta")
RANGE_SCHEDULES = ("kl_optimal",)
BETA_ALPHA = BETA_BETA = 0.6  # ComfyUI's defaults for its "beta" scheduler


def _table(alphas_cumprod: torch.Tensor) -> np.ndarray:
    """The model's sigma per training timestep (increasing), float32 values as ComfyUI's buffer holds them."""
    from .schedules import sigmas_from_alphas_cumprod

    return sigmas_from_alphas_cumprod(alphas_cumprod).to(torch.float32).numpy().astype(np.float64)


def table_sigmas(schedule: str, n: int, alphas_cumprod: torch.Tensor) -> np.ndarray:
    table = _table(alphas_cumprod)
    T = len(table)
    if schedule == "simple":
        stride = T / n
        return np.array([table[-(1 + int(x * stride))] for x in range(n)])
    if schedule == "sgm_uniform":
        t = np.linspace(T - 1, 0, n + 1)[:-1]
        return np.exp(np.interp(t, np.arange(T), np.log(table)))
    if schedule == "ddim_uniform":
        stride = max(T // n, 1)
        return table[1::stride][::-1].copy()
    if schedule == "beta":
        return _beta_sigmas(n, table)
    raise ValueError(schedule)


def _beta_sigmas(n: int, table: np.ndarray) -> np.ndarray:
    try:
        from scipy import stats
    except ImportError as e:  # (scipy is no dependency of fastdiff's own)
        raise BackendUnavailableError("schedule 'beta' needs scipy for the Beta distribution's quantiles (pip "
                                      "install scipy)") from e
    quantiles = 1 - np.linspace(0, 1, n, endpoint=False)
    timesteps = np.rint(stats.beta.ppf(quantiles, BETA_ALPHA, BETA_BETA) * (len(table) - 1)).astype(np.int64)
    keep = np.concatenate([[True], timesteps[1:] != timesteps[:-1]])  # (a repeat would be a zero-length step)
    return table[timesteps[keep]]


def kl_optimal_sigmas(n: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    ramp = np.arange(n) / (n - 1) if n > 1 else np.zeros(1)  # (ComfyUI divides by zero at one step: nan)
    return np.tan(ramp * math.atan(sigma_min) + (1 - ramp) * math.atan(sigma_max))
