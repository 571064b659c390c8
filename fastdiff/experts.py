"""SDXL's ensemble of expert denoisers: diffusers' ``denoising_end`` / ``denoising_start``.

A base model runs the noisy part of the grid and hands its state on; a refiner (an img2img run) starts from that
state, unnoised, and runs the rest::

    latents = base.generate(prompt=p, steps=40, denoising_end=0.8)             # noisy latents, not x0
    image = refiner.generate(prompt=p, steps=40, denoising_start=0.8, image=latents, output_type="pil")

As diffusers' SDXL pipelines: ``cutoff = round(T - fraction * T)`` training timesteps (T = 1000); the base runs
the steps whose timestep is >= cutoff, the refiner those below it. The state handed on is what the base
scheduler holds (``latents_scale``: the variance-preserving latents of DDIM / DPM-Solver / UniPC / DEIS / DDPM,
x0 + sigma eps for the Euler family and LMS), and the refiner reads it in its own scheduler's frame.

Samplers taking one network evaluation per step only (diffusers' first-order schedulers): the two-stage ones
(Heun, KDPM2, DPM-Solver SDE) cut a step in two, and PNDM, singlestep DPM-Solver, LCM and TCD plan their steps
from the run's end; those are refused by name. A ControlNet's step window spans the whole grid, and inpainting runs
blend as diffusers' SDXL inpainting pipeline does (``fastdiff.pipeline``).
"""

from __future__ import annotations

import math
import numbers

import torch

from .errors import BadArgumentError

# fastdiff samplers that reproduce diffusers' first-order schedulers (one evaluation per step, no end-of-run plan
# beyond what SamplingPlan.to_step keeps)
EXPERT_SAMPLERS = frozenset({"ddim", "ddpm", "euler", "euler_ancestral", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde",
                             "dpmpp_3m_sde", "unipc", "deis", "lms"})
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
    denoiser = plan.make_denoiser(None, dtype=torch.float32)
    scale = getattr(denoiser, "timestep_scale", 1.0)  # (in training steps: the cutoffs count those)
    return [denoiser._host_coeffs(float(s))[0] / scale for s in plan.sigmas[:-1]]


def cutoff(fraction: float, train_steps: int) -> int:
    return int(round(train_steps - fraction * train_steps))


def steps_until(plan, fraction: float, train_steps: int) -> int:
    """How many of the plan's steps a base run with ``denoising_end=fraction`` takes (timestep >= cutoff)."""
    k = sum(t >= cutoff(fraction, train_steps) for t in step_timesteps(plan))
    if k == 0:
        raise BadArgumentError(f"denoising_end: {fraction} leaves no step to run (the first step's timestep is below "
                               f"the cutoff {cutoff(fraction, train_steps)})")
    return k


def start_index(plan, fraction: float, train_steps: int) -> int:
    """The step a refiner run with ``denoising_start=fraction`` starts at (the first timestep < cutoff)."""
    left = sum(t < cutoff(fraction, train_steps) for t in step_timesteps(plan))
    if left == 0:
        raise BadArgumentError(f"denoising_start: {fraction} leaves no step to run (no timestep below the cutoff "
                               f"{cutoff(fraction, train_steps)})")
    return plan.steps - left


__all__ = ["EXPERT_SAMPLERS", "VE_FRAME_SCHEDULERS", "check_fraction", "check_plan", "latents_scale",
           "step_timesteps", "steps_until", "start_index"]
