"""diffusers' flow-matching schedulers as fastdiff plans (``plan_from_scheduler_config``'s flow builders).

* ``FlowMatchEulerDiscreteScheduler`` (SD3, Flux, Sana, ...): Euler in the t frame; with
  ``stochastic_sampling`` x' = (1 - t') x0 + t' noise, which is ``lcm`` in the sigma frame.
* ``FlowMatchHeunDiscreteScheduler``: Heun in the t frame (churn as diffusers applies it there).
* ``FlowMatchLCMScheduler``: FlowMatchEuler's grid with its stochastic step (``lcm`` in the sigma frame).
* ``use_flow_sigmas=True`` with ``prediction_type="flow_prediction"`` in DPMSolverMultistep / DPMSolverSinglestep /
  DEISMultistep / UniPCMultistep (Sana, Wan): the same solvers in the sigma frame, where their alpha_t = 1 - t and
  sigma_t = t are the k-diffusion state's.

Every grid here is computed as diffusers computes it (float32 where it keeps float32, its int64 truncation of
the solvers' timesteps), so the timesteps fed to the network are diffusers' own. ``mu`` is the resolution's
dynamic shift (``fastdiff.flow.dynamic_shift_mu``), required where the config has ``use_dynamic_shifting``.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from . import schedules
from .comfy_schedules import FLOW_SCHEDULES, flow_sigmas
from .errors import BadArgumentError, UnsupportedConfigError
from .flow import TIME_CONVENTIONS, frame_for, shift_times, stretch_to_terminal, t_to_sigma, time_shift
from .scheduler_config import (_COMMON, _DEFAULTS, SamplingPlan, _alphas_cumprod, _Config, _f32, _table,
                               _threshold_opts, convert_sigmas, sigma_conversion)


def flow_plan(name: str, sampler: str, times, frame: str, options: dict, timesteps, *,
              num_train_timesteps: int, start_scale: Optional[float] = None, **denoiser_options) -> SamplingPlan:
    """A plan on flow time grid ``times`` (float32 values, the last one where sampling ends) in ``frame``.

    The latents are x_t at times[0] (diffusers starts from pure noise whatever times[0] is; ``start_scale``: x_t is
    that times the latents instead, ComfyUI's empty-latent start); the output is x_t at times[-1]. ``timesteps``: what
    the network is fed at each time but the last."""
    times = [float(t) for t in times]
    if denoiser_options.get("time_convention", "diffusers") == "sit":  # the network's own time: 1 - t, unscaled
        timesteps = [1 - t for t in times[:-1]]
    if not all(0 <= t <= 1 for t in times) or any(b > a for a, b in zip(times, times[1:])) or times[0] == times[-1]:
        # (a shift <= 0, a linear time shift with mu <= 0, shift_terminal at 1 step or >= 1: NaN, rising or flat)
        raise BadArgumentError(f"{name}: its shift settings give the flow times {[round(t, 4) for t in times]}; "
                               f"expected times falling from at most 1 to at least 0; check shift / flow_shift, "
                               f"mu, time_shift_type and shift_terminal")
    sigmas = times if frame == "t" else [t_to_sigma(t) for t in times]
    dopts = dict(frame=frame, num_train_timesteps=num_train_timesteps,
                 timesteps={s: float(ts) for s, ts in zip(sigmas, timesteps)}, **denoiser_options)
    init, out = (1.0, 1.0) if frame == "t" else (1 + sigmas[0], 1 / (1 + sigmas[-1]))
    if start_scale is not None:  # (x_t = start_scale * latents; in the sigma frame over 1 - t0 = 1 / (1 + sigma0))
        init = start_scale * init
    return SamplingPlan(name, sampler, torch.tensor(sigmas, dtype=torch.float64), options, "flow", dopts,
                        init_noise_sigma=init, output_scale=out)


# --------------------------------------------------------------------------------------------------
# FlowMatchEuler / FlowMatchHeun
# --------------------------------------------------------------------------------------------------

def _convention(c: _Config) -> dict:
    """The network's time convention (fastdiff's ``flow_time_convention`` key; diffusers' configs lack it)."""
    return dict(time_convention=c.choice("flow_time_convention", TIME_CONVENTIONS))


def _check_mu(c: _Config) -> None:
    """FlowMatchEuler and UniPC refuse to shift dynamically without a mu (diffusers raises too)."""
    if c.get("use_dynamic_shifting") and c.mu is None:
        raise BadArgumentError(f"mu: {c.name} with use_dynamic_shifting needs the resolution's mu "
                               f"(fastdiff.flow.dynamic_shift_mu), found None")


def flow_match_times(c: _Config, n: int) -> tuple:
    """FlowMatchEuler's set_timesteps: (float32 times, float32 network timesteps), the times ending at 0."""
    T = int(c["num_train_timesteps"])
    _check_mu(c)
    c.refuse_true("invert_sigmas")                     # Mochi's inverted schedule
    shift = float(c["shift"])
    # the constructor's table (float32, shifted unless the shift is dynamic) fixes the range
    train = torch.from_numpy(np.linspace(1, T, T, dtype=np.float32)[::-1].copy()) / T
    if not c.get("use_dynamic_shifting"):
        train = shift * train / (1 + (shift - 1) * train)
    hi, lo = train[0].item(), train[-1].item()
    pipeline_sigmas = c.choice("flow_pipeline_sigmas", (None, "linspace"))
    if c.get("flow_time_convention") == "sit":        # SiT's own Euler grid: n even steps from 1 down to 0
        t = np.linspace(1, 0, n + 1)[:-1]
    elif pipeline_sigmas == "linspace":               # FluxPipeline: set_timesteps(sigmas=linspace(1, 1/n, n))
        t = np.linspace(1.0, 1 / n, n).astype(np.float32).astype(np.float64)
    else:
        t = np.linspace(hi * T, lo * T, n) / T
    t = time_shift(t, c.mu, c["time_shift_type"]) if c.get("use_dynamic_shifting") else shift_times(t, shift)
    if c.get("shift_terminal"):
        t = stretch_to_terminal(t, float(c["shift_terminal"]))
    kind = sigma_conversion(c)
    if kind is not None:  # (over the config's sigma_min / sigma_max where it has them, as diffusers reads them)
        lo = float(t[-1]) if c.get("sigma_min") is None else float(c["sigma_min"])
        hi = float(t[0]) if c.get("sigma_max") is None else float(c["sigma_max"])
        t = convert_sigmas(kind, n, lo, hi)
    t32 = torch.from_numpy(np.asarray(t)).to(torch.float32)
    timesteps = (t32 * T).double().numpy()
    return np.concatenate([t32.double().numpy(), [0.0]]), timesteps


def flow_match_euler(c: _Config, n: int) -> SamplingPlan:
    times, timesteps = flow_match_times(c, n)
    T = int(c["num_train_timesteps"])
    if c["stochastic_sampling"]:                       # x' = (1 - t') x0 + t' noise: lcm in the sigma frame
        return flow_plan(c.name, "lcm", times, "sigma", {}, timesteps, num_train_timesteps=T, **_convention(c))
    return flow_plan(c.name, "euler", times, "t", {}, timesteps, num_train_timesteps=T, **_convention(c))


def flow_match_lcm(c: _Config, n: int) -> SamplingPlan:
    """FlowMatchLCM (few-step flow consistency models): FlowMatchEuler's grid, every step x' = (1 - t') x0 + t'
    noise. Its ``scale_factors`` (a resolution change between steps) are refused."""
    if c["scale_factors"]:
        raise UnsupportedConfigError("scale_factors", c["scale_factors"], supported=[None, []], model=c.name)
    c["stochastic_sampling"] = True
    return flow_match_euler(c, n)


def flow_match_heun(c: _Config, n: int) -> SamplingPlan:
    times, timesteps = flow_match_times(c, n)
    return flow_plan(c.name, "heun", times, "t", {}, timesteps, num_train_timesteps=int(c["num_train_timesteps"]),
                     **_convention(c))


# --------------------------------------------------------------------------------------------------
# the solvers' use_flow_sigmas variant
# --------------------------------------------------------------------------------------------------

def solver_flow_plan(c: _Config, n: int, sampler: str, options: dict) -> SamplingPlan:
    """DPM-Solver (multistep, singlestep), DEIS or UniPC with ``use_flow_sigmas``: their flow time grid, the
    solver in the sigma frame."""
    c.choice("prediction_type", ("flow_prediction",))
    for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas"):
        c.refuse_true(k)                               # diffusers mixes their VP sigmas with the flow alphas
    if c["use_dynamic_shifting"]:  # (diffusers reads time_shift_type for the dynamic shift only)
        c.choice("time_shift_type", ("exponential",) if c.name != "UniPCMultistepScheduler" else
                 ("exponential", "linear"))
    T = int(c["num_train_timesteps"])
    if c.name == "UniPCMultistepScheduler":
        _check_mu(c)
        t = np.linspace(1, 1 / T, n + 1)[:-1]
        t = time_shift(t, c.mu, c["time_shift_type"]) if c["use_dynamic_shifting"] else \
            shift_times(t, float(c["flow_shift"]))
        if c["shift_terminal"]:
            t = stretch_to_terminal(t, float(c["shift_terminal"]))
        if abs(t[0] - 1) < 1e-6:                       # diffusers keeps log(alpha) finite
            t[0] -= 1e-6
        last = {"zero": 0.0, "sigma_min": float(t[-1])}[c.choice("final_sigmas_type", schedules.FINAL_SIGMAS)]
    else:
        if c["shift_terminal"]:
            raise UnsupportedConfigError("shift_terminal", c["shift_terminal"], supported=[None], model=c.name)
        shift = math.exp(c.mu) if c.mu is not None else float(c["flow_shift"])
        t = np.flip(shift_times(1.0 - np.linspace(1, 1 / T, n + 1), shift))[:-1].copy()
        if c.name == "DEISMultistepScheduler":         # a zero-length last step, as its other grids
            last = float(t[-1])
        else:
            final = c.choice("final_sigmas_type", schedules.FINAL_SIGMAS)
            last = 0.0 if final == "zero" else float(_table(_alphas_cumprod(c))[0])  # (the beta table's, as diffusers)
    timesteps = np.floor(t * T)                        # diffusers' int64 cast of t * T
    dopts = _threshold_opts(c, False)
    return flow_plan(c.name, sampler, _f32(np.append(t, last)), "sigma", options, timesteps, num_train_timesteps=T,
                     **dopts, **_convention(c))


# --------------------------------------------------------------------------------------------------
# named samplers on a flow-matching model (the Pipeline's sampler= / schedule= path)
# --------------------------------------------------------------------------------------------------

TABLE_PICKS = ("simple", "ddim_uniform", "beta")  # (entries of the table: at most one step per entry)
NAMED_SCHEDULES = (None, "uniform", "karras", "exponential") + FLOW_SCHEDULES


def named_flow_plan(config: dict, steps: int, sampler: str, schedule: Optional[str] = None,
                    mu: Optional[float] = None, table_size: int = 1000) -> SamplingPlan:
    """``sampler`` on a flow-matching model, in its frame (``fastdiff.flow.frame_for``), with the model's own shift
    (``shift``, or the solvers' ``flow_shift``), dynamic shifting and ``shift_terminal``, on the grid that suits
    the frame ("uniform", the default; "karras" / "exponential" respace its range in the frame's own units):

    * t frame (Euler, Heun, DPM-2, the linear multistep ones): ``steps`` even steps in t from 1 to 0 (SiT's
      Euler grid). FlowMatchEuler's own grid ends at 1 / T, so its last step spends a network call on t 0.001
      -> 0: on builtin:digits_flow (cfg 3) Heun at 2 / 3 steps scored digits-FD 32 / 4.4 there, 0.88 / 0.67 here.
    * sigma frame (the exponential integrators, the ancestral and SDE samplers): the DPM-Solver / UniPC flow
      grid, which starts one training step below t = 1 (from pure noise, as diffusers does) and ends at
      shift(1 / T). From t = 1 the first step would be infinite in lambda; on FlowMatchEuler's grid dpmpp_2m
      scored 1.6 at 4 steps on builtin:digits_flow, 0.86 here (and 2x the error on Gaussian data).

    ComfyUI's schedules (``simple``, ``normal``, ``sgm_uniform``, ``ddim_uniform``, ``beta``, ``kl_optimal``) take the
    model's shift over ComfyUI's table of ``table_size`` times (``fastdiff.comfy_schedules.flow_sigmas``; FLUX.1
    dev: 10000) in either frame, the latents starting as ComfyUI's empty latent (x_t = t0 * noise); in the sigma
    frame a grid from t = 1 starts at the shifted 1 - 1e-4 instead (ComfyUI's ``offset_first_sigma_for_snr``).

    ``generate()`` with no sampler follows the model's scheduler config instead, exactly as diffusers does.
    """
    frame = frame_for(sampler)
    if schedule not in NAMED_SCHEDULES:
        raise BadArgumentError(f"schedule {schedule!r} on a flow-matching model: expected one of "
                               f"{[s for s in NAMED_SCHEDULES if s]} (in flow time; leading / trailing / linspace "
                               f"space a discrete-time model's training timesteps)")
    name = "FlowMatchEulerDiscreteScheduler"
    keys = ("num_train_timesteps", "use_dynamic_shifting", "time_shift_type", "shift_terminal", "flow_time_convention")
    own = {k: config[k] for k in keys if config.get(k) is not None}
    own["shift"] = next((config[k] for k in ("shift", "flow_shift") if config.get(k) is not None), 1.0)
    c = _Config({**_COMMON, **_DEFAULTS[name], **own}, name)
    c.mu = mu
    _check_mu(c)
    T = int(c["num_train_timesteps"])
    if schedule in FLOW_SCHEDULES:
        return _comfy_flow_plan(c, steps, sampler, frame, schedule, table_size)
    if frame == "t":
        t = np.linspace(1, 0, steps + 1)[:-1]
    else:
        t = np.flip((1.0 - np.linspace(1, 1 / T, steps + 1))[1:]).copy()
    t = time_shift(t, mu, c["time_shift_type"]) if c["use_dynamic_shifting"] else shift_times(t, float(c["shift"]))
    if c["shift_terminal"]:
        t = stretch_to_terminal(t, float(c["shift_terminal"]))
    if schedule in ("karras", "exponential") and frame == "t":
        t = convert_sigmas(schedule, steps, float(t[-1]), float(t[0]))
    elif schedule in ("karras", "exponential"):
        s = convert_sigmas(schedule, steps, t_to_sigma(t[-1]), t_to_sigma(t[0]))
        t = s / (1 + s)
    t32 = torch.from_numpy(np.asarray(t, dtype=np.float64)).to(torch.float32)
    times, timesteps = np.append(t32.double().numpy(), 0.0), (t32 * T).double().numpy()
    return flow_plan("named", sampler, times, frame, {}, timesteps, num_train_timesteps=T, **_convention(c))


def _comfy_flow_plan(c: _Config, steps: int, sampler: str, frame: str, schedule: str, size: int) -> SamplingPlan:
    """``named_flow_plan`` on one of ComfyUI's schedules: the model's own shift (its ``shift`` / ``flow_shift``, or
    the resolution's ``mu``, as ComfyUI's ModelSamplingSD3 / ModelSamplingFlux nodes set it) over ComfyUI's table."""
    if c["shift_terminal"]:  # (it rescales a whole grid by its last time: no table of ComfyUI's has it)
        raise UnsupportedConfigError("shift_terminal", c["shift_terminal"], supported=[None],
                                     model=f"schedule {schedule!r} (ComfyUI's, over its table of shifted times)")
    if steps > size and schedule in TABLE_PICKS:
        raise BadArgumentError(f"steps: schedule {schedule!r} picks from ComfyUI's {size} flow times: expected at "
                               f"most {size} steps, found {steps}")
    if c["use_dynamic_shifting"]:
        kind = c["time_shift_type"]

        def shift(u):
            return time_shift(u, c.mu, kind)
    else:
        def shift(u):
            return shift_times(u, float(c["shift"]))
    t = flow_sigmas(schedule, steps, shift, size)
    # ComfyUI starts an empty latent at x_t = t0 * noise (pure noise only where the grid starts at t = 1: ddim_uniform's
    # starts below)
    start = float(np.float32(t[0]))
    if frame == "sigma" and start >= 1:  # (ComfyUI's offset_first_sigma_for_snr: t = 1 is sigma = infinity, where
        # the exponential integrators' and DPM fast's eps forms lose every digit in float32)
        t = t.copy()
        t[0] = float(shift(np.float64(1 - FIRST_TIME_OFFSET)))
    T = int(c["num_train_timesteps"])
    t32 = torch.from_numpy(t).to(torch.float32)
    times, timesteps = np.append(t32.double().numpy(), 0.0), (t32 * T).double().numpy()
    return flow_plan("named", sampler, times, frame, {}, timesteps, num_train_timesteps=T, start_scale=start,
                     **_convention(c))


FIRST_TIME_OFFSET = 1e-4  # ComfyUI's percent_offset: a sigma-frame grid from t = 1 starts at the shifted 1 - 1e-4
