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

* ``linear_quadratic``: Mochi's schedule (genmoai's ``infer.py``): the first half of the steps linear in 1 - sigma /
  sigma_max up to 0.025, the rest quadratic to 1, times the model's sigma_max (ComfyUI's, on any model).
* ``normal``: evenly spaced model timesteps, the end one included: on a discrete-time model fastdiff's ``uniform``
  (an alias), on a sigma-range (EDM) model the exponential grid (ComfyUI's ``ModelSamplingContinuousEDM`` spaces
  0.25 log sigma).

* ``ays`` / ``ays_sd1`` / ``ays_sdxl``: Align Your Steps (Sabour et al. 2024), NVIDIA's optimised 10-step sigma lists
  for SD 1.x and SDXL, log-linearly interpolated to other step counts, the last level replaced by 0 (ComfyUI's
  ``AlignYourStepsScheduler``); ``ays`` takes SDXL's for an SDXL-style UNet, SD 1.x's otherwise. Their sigmas are
  SD's own range (0.0292 .. 14.6146): the Pipeline refuses them on a model of another range.

``karras`` / ``exponential`` are k-diffusion's, as in fastdiff. The table-based four need a discrete-time model's
training table (``alphas_cumprod``), or a flow-matching model's table of times (``flow_sigmas``). Each returns the
decreasing sigmas WITHOUT the final entry (``schedules._finish`` appends it), as float64 values of ComfyUI's float32
table.

On a flow-matching model ComfyUI's "sigma" is the flow time t, and its table holds the model's shifted times at
u = 1/N, 2/N, ..., 1 (``ModelSamplingDiscreteFlow``: SD3 and most flow models, N = 1000; ``ModelSamplingFlux``:
FLUX.1 dev and its variants, N = 10000; schnell is a plain unshifted flow there, N = 1000). ``normal`` and
``sgm_uniform`` space the table's range evenly and shift those times once more, as ComfyUI's ``normal_scheduler``
does (its timestep is the shifted time, times a multiplier).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from .errors import BackendUnavailableError

TABLE_SCHEDULES = ("simple", "sgm_uniform", "ddim_uniform", "beta")
RANGE_SCHEDULES = ("kl_optimal", "normal", "linear_quadratic")
AYS_SCHEDULES = ("ays", "ays_sd1", "ays_sdxl")
# NVIDIA's published 10-step lists (research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto.html), as ComfyUI
# holds them
AYS_NOISE_LEVELS = {
    "ays_sd1": (14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092, 0.9642583904,
                0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582),
    "ays_sdxl": (14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141, 0.5550693289,
                 0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582),
}
FLOW_SCHEDULES = TABLE_SCHEDULES + RANGE_SCHEDULES  # (all of them on a flow model's table of times)
FLUX_TABLE_SIZE = 10000  # ComfyUI's ModelSamplingFlux; its ModelSamplingDiscreteFlow holds 1000 times
BETA_ALPHA = BETA_BETA = 0.6  # ComfyUI's defaults for its "beta" scheduler


def _table(alphas_cumprod: torch.Tensor) -> np.ndarray:
    """The model's sigma per training timestep (increasing), float32 values as ComfyUI's buffer holds them."""
    from .schedules import sigmas_from_alphas_cumprod

    return sigmas_from_alphas_cumprod(alphas_cumprod).to(torch.float32).numpy().astype(np.float64)


def table_sigmas(schedule: str, n: int, alphas_cumprod: torch.Tensor) -> np.ndarray:
    table = _table(alphas_cumprod)
    T = len(table)
    if schedule == "sgm_uniform":
        t = np.linspace(T - 1, 0, n + 1)[:-1]
        return np.exp(np.interp(t, np.arange(T), np.log(table)))
    return _pick(schedule, n, table)


def flow_sigmas(schedule: str, n: int, shift: Callable[[np.ndarray], np.ndarray], size: int) -> np.ndarray:
    """ComfyUI's ``schedule`` over a flow-matching model's table of ``size`` times (``shift`` maps the even times
    u in (0, 1] to the model's): decreasing flow times, without the final 0."""
    table = _float32(shift(np.arange(1, size + 1) / size))
    if schedule in ("normal", "sgm_uniform"):  # even in the shifted time between the table's ends, shifted again
        u = np.linspace(table[-1], table[0], n + 1)[:-1] if schedule == "sgm_uniform" else \
            np.linspace(table[-1], table[0], n)
        return _float32(shift(u))
    if schedule == "kl_optimal":
        return kl_optimal_sigmas(n, float(table[0]), float(table[-1]))
    if schedule == "linear_quadratic":
        return linear_quadratic_sigmas(n, float(table[-1]))
    return _pick(schedule, n, table)


def _float32(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).astype(np.float32).astype(np.float64)


def _pick(schedule: str, n: int, table: np.ndarray) -> np.ndarray:
    """``simple``, ``ddim_uniform`` or ``beta``: entries of an increasing ``table``, from the top."""
    if schedule == "simple":
        stride = len(table) / n
        return np.array([table[-(1 + int(x * stride))] for x in range(n)])
    if schedule == "ddim_uniform":
        stride = max(len(table) // n, 1)
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


def ays_sigmas(schedule: str, n: int) -> np.ndarray:
    """Align Your Steps' list for ``schedule`` ("ays" is SD 1.x's) at ``n`` steps: the 11 levels log-linearly
    interpolated to n + 1 where n is not 10 (even in the list's index), the last one dropped (ComfyUI sets it to 0:
    ``schedules._finish`` appends the final sigma)."""
    levels = np.asarray(AYS_NOISE_LEVELS["ays_sd1" if schedule == "ays" else schedule], dtype=np.float64)
    if n + 1 != len(levels):
        grid = np.linspace(0, 1, len(levels))
        levels = np.exp(np.interp(np.linspace(0, 1, n + 1), grid, np.log(levels[::-1])))[::-1]
    return _float32(levels[:n])  # (ComfyUI's FloatTensor)


def linear_quadratic_sigmas(n: int, sigma_max: float, threshold_noise: float = 0.025) -> np.ndarray:
    """Mochi's linear-quadratic grid times ``sigma_max``, without its final 0: n // 2 steps linear in the "noise done"
    1 - sigma / sigma_max from 0 to ``threshold_noise``, then a quadratic through 1 at step n that joins it with the
    same slope (one step: sigma_max alone)."""
    if n == 1:
        return np.array([sigma_max])
    lin = n // 2
    quad = n - lin
    diff = lin - threshold_noise * n
    a = diff / (lin * quad ** 2)
    b = threshold_noise / lin - 2 * diff / quad ** 2
    c = a * lin ** 2
    done = [i * threshold_noise / lin for i in range(lin)] + [a * i * i + b * i + c for i in range(lin, n)]
    return (1.0 - np.asarray(done, dtype=np.float64)) * sigma_max


def kl_optimal_sigmas(n: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    ramp = np.arange(n) / (n - 1) if n > 1 else np.zeros(1)  # (ComfyUI divides by zero at one step: nan)
    return np.tan(ramp * math.atan(sigma_min) + (1 - ramp) * math.atan(sigma_max))
