"""SDXL's ensemble of expert denoisers: diffusers' ``denoising_end`` / ``denoising_start``.

A base model runs the noisy part of the grid and hands its state on; a refiner (an img2img run) starts from that
state, unnoised, and runs the rest::

    latents = base.generate(prompt=p, steps=40, denoising_end=0.8)             # noisy latents, not x0
    image = refiner.generate(prompt=p, steps=40, denoising_start=0.8, image=latents, output_type="pil")

As diffusers' SDXL pipelines: ``cutoff = round(T - fraction * T)`` training timesteps (T = 1000); the base runs
the steps whose timestep is >= cutoff, the refiner those below it. The state handed on is what the base
scheduler holds (``latents_scale``: the variance-preserving latents of DDIM / DPM-Solver / UniPC / DEIS / DDPM,
x0 + sigma eps for the Euler family and LMS), and the refiner reads it in its own scheduler's frame.

Samplers taking one network evaluation per step (diffusers' first-order schedulers), and the two-stage Heun and
KDPM2 (``heun``, ``dpm_2``), whose diffusers schedulers list each step's two stages as timesteps of their own
(``stage_entries``): a cutoff between a step's stages ends a base run after that step's first stage, an Euler step
(to the next sigma; KDPM2: to the step's midpoint), and its refiner takes that state as the state at the step's
start, running the step whole again (diffusers' img2img adds one timestep where the count below the cutoff is even).
The ancestral / SDE two-stage ones (KDPM2 ancestral, DPM-Solver SDE), PNDM, singlestep DPM-Solver, LCM and TCD
(which plan their steps from the run's end) are refused by name. A ControlNet's step window spans the whole grid,
and inpainting runs blend as diffusers' SDXL inpainting pipeline does (``fastdiff.pipeline``).
"""

from __future__ import annotations

import math
import numbers

import torch

from .errors import BadArgumentError

# fastdiff samplers that reproduce diffusers' schedulers a cut can stop: the first-order ones (one evaluation per
# step, no end-of-run plan beyond what SamplingPlan.to_step keeps) and the two-stage Heun / KDPM2
EXPERT_SAMPLERS = frozenset({"ddim", "ddpm", "euler", "euler_ancestral", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde",
                             "dpmpp_3m_sde", "unipc", "deis", "lms", "heun", "dpm_2"})
# samplers whose diffusers schedulers (Heun, KDPM2) take two timesteps per step: the step's start, then the next
# step's start (Heun) or the step's midpoint (KDPM2); a run's last step, to sigma 0, one
TWO_STAGE_SAMPLERS = frozenset({"heun", "dpm_2"})
# diffusers schedulers whose latents are x0 + sigma eps (the others hold the variance-preserving x / sqrt(1 + s^2))
VE_FRAME_SCHEDULERS = frozenset({"EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "LMSDiscreteScheduler",
                                 "HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
                                 "DPMSolverSDEScheduler"})


def check_fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < float(value) < 1:
        raise BadArgumentError(f"{name}: expected a fraction of the denoising in (0, 1), found {value!r}")
    return float(value)


def check_plan(plan, name: str) -> None:
    """A plan the ensemble of experts can cut: a discrete-time model's, with a one-evaluation-per-step sampler."""
    if plan.denoiser_kind != "discrete" or plan.denoiser_options.get("timestep_type") == "continuous":
        raise BadArgumentError(f"{name}: cuts a discrete-time model's grid at a training timestep (SDXL's ensemble "
                               f"of experts); this model's noise levels are continuous")
    if plan.sampler not in EXPERT_SAMPLERS:
        raise BadArgumentError(f"{name}: with sampler {plan.sampler!r} ({plan.scheduler}) is not implemented: "
                               f"expected one taking one network evaluation per step, among {sorted(EXPERT_SAMPLERS)}")


def latents_scale(plan, sigma: float) -> float:
    """diffusers' latents = the sampler state (x0 + sigma eps) * this, for the plan's scheduler at ``sigma``."""
    return 1.0 if plan.scheduler in VE_FRAME_SCHEDULERS else 1 / math.sqrt(1 + sigma * sigma)


def step_timesteps(plan) -> list:
    """The training timestep of each step's start, as the network is handed it (diffusers' ``scheduler.timesteps``)."""
    return _timesteps_at(plan, plan.sigmas[:-1])


def _timesteps_at(plan, sigmas) -> list:
    """The training timestep the plan's network is handed at each of ``sigmas``."""
    denoiser = plan.make_denoiser(None, dtype=torch.float32)
    scale = getattr(denoiser, "timestep_scale", 1.0)  # (in training steps: the cutoffs count those)
    return [denoiser._host_coeffs(float(s))[0] / scale for s in sigmas]


def stage_entries(plan) -> list:
    """diffusers' ``scheduler.timesteps`` of a plan as (timestep, step, first stage?): one entry per step, or for the
    two-stage samplers each step's first stage and its second (the next step's timestep for Heun, the midpoint's for
    KDPM2), but for a last step to sigma 0 (one stage)."""
    starts = step_timesteps(plan)
    if plan.sampler not in TWO_STAGE_SAMPLERS:
        return [(t, k, True) for k, t in enumerate(starts)]
    if plan.sampler == "dpm_2":
        from .samplers import midpoint_sigma

        given = plan.options.get("sigmas_mid")
        sig = [float(s) for s in plan.sigmas]
        seconds = _timesteps_at(plan, [float(given[k]) if given is not None else midpoint_sigma(sig[k], sig[k + 1])
                                       for k in range(plan.steps - 1)])
    else:
        seconds = starts[1:]
    entries = []
    for k, t in enumerate(starts):
        entries.append((t, k, True))
        if k < plan.steps - 1 or float(plan.sigmas[-1]) != 0:
            entries.append((seconds[k] if k < len(seconds) else 0.0, k, False))
    return entries


def cutoff(fraction: float, train_steps: int) -> int:
    return int(round(train_steps - fraction * train_steps))


def steps_until(plan, fraction: float, train_steps: int) -> tuple:
    """(whole steps, whether the next step's first stage runs too) of a base run with ``denoising_end=fraction``:
    diffusers runs the timesteps >= cutoff, which for a two-stage sampler may end between a step's stages."""
    c = cutoff(fraction, train_steps)
    entries = stage_entries(plan)
    count = sum(t >= c for t, _, _ in entries)
    if count == 0:
        raise BadArgumentError(f"denoising_end: {fraction} leaves no step to run (the first step's timestep is below "
                               f"the cutoff {c})")
    _, step, first = entries[count - 1]
    if first and plan.sampler in TWO_STAGE_SAMPLERS and count < len(entries):
        return step, True
    return step + 1, False


def start_index(plan, fraction: float, train_steps: int) -> int:
    """The step a refiner run with ``denoising_start=fraction`` starts at: the first timestep < cutoff; for a
    two-stage sampler (diffusers' order 2) one timestep earlier where the count below the cutoff is even, which
    lands on a step's first stage (the step the base run stopped in)."""
    c = cutoff(fraction, train_steps)
    entries = stage_entries(plan)
    left = sum(t < c for t, _, _ in entries)
    if left == 0 and plan.sampler not in TWO_STAGE_SAMPLERS:  # (a two-stage one runs its last timestep: the "+1")
        raise BadArgumentError(f"denoising_start: {fraction} leaves no step to run (no timestep below the cutoff "
                               f"{c})")
    if plan.sampler in TWO_STAGE_SAMPLERS and left % 2 == 0:
        left += 1
    return entries[max(len(entries) - left, 0)][1]


__all__ = ["EXPERT_SAMPLERS", "TWO_STAGE_SAMPLERS", "VE_FRAME_SCHEDULERS", "check_fraction", "check_plan",
           "latents_scale", "stage_entries", "step_timesteps", "steps_until", "start_index"]
