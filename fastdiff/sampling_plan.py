"""A sampling plan: a sampler, its sigma grid and options, and how to wrap the network (the denoiser), which
together reproduce one diffusers scheduler's run (``fastdiff.scheduler_config`` makes them from a
``scheduler_config.json``; ``Pipeline.plan`` from a sampler name). Plans slice for img2img starts
(``from_step``) and SDXL's expert runs (``to_step``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
import torch

from .denoiser import DiscreteDenoiser, EDMDenoiser
from .errors import BadArgumentError
from .flow import FlowDenoiser

@dataclass
class SamplingPlan:
    """Everything needed to sample like a given diffusers scheduler.

    sampler / options: a ``fastdiff.samplers.SAMPLERS`` name and its keyword options.
    sigmas: host float64 grid (len = steps + 1).
    denoiser_kind / denoiser_options: how to wrap the network (``make_denoiser``).
    init_noise_sigma: unit-normal latents are multiplied by this to get the sampler's initial state.
    output_scale: the sampler's final state is multiplied by this (the VP frame when the grid ends > 0).
    """

    scheduler: str
    sampler: str
    sigmas: torch.Tensor
    options: dict = field(default_factory=dict)
    denoiser_kind: str = "discrete"
    denoiser_options: dict = field(default_factory=dict)
    init_noise_sigma: float = 1.0
    output_scale: float = 1.0

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    def make_denoiser(self, model, **overrides):
        """Wrap ``model(x, timestep, **cond)`` as the plan's ``D(x, sigma, **cond) -> x0``."""
        opts = {**self.denoiser_options, **overrides}
        if self.denoiser_kind == "edm":
            return EDMDenoiser(model, **opts)
        if self.denoiser_kind == "flow":
            return FlowDenoiser(model, **opts)
        return DiscreteDenoiser(model, **opts)

    def from_step(self, t_start: int) -> "SamplingPlan":
        """The plan's last ``steps - t_start`` steps, sampled from a state given in the sampler's frame
        (``noised``): img2img's plan, as diffusers' pipelines slice ``scheduler.timesteps[t_start * order:]``.

        Multistep solvers whose last steps drop order with fewer than 15 steps count the whole run's steps in
        diffusers (``len(scheduler.timesteps)``), not the slice's: the slice keeps that decision."""
        from .samplers import COUNTS_ALL_STEPS

        if not 0 <= t_start < self.steps:
            raise BadArgumentError(f"t_start: expected 0 <= t_start < {self.steps}, found {t_start}")
        if t_start == 0:  # the whole grid, from a given state (PNDM's warm-up values too are its own)
            return dataclasses.replace(self, sigmas=self.sigmas.clone(), init_noise_sigma=1.0)
        options = dict(self.options)
        fixed = sorted(k for k in _WARMUP_FROM_THE_TOP if options.get(k) is not None)
        if fixed and t_start:  # PNDM's warm-up values are laid out for its first timesteps
            raise BadArgumentError(f"image: the {self.scheduler} plan's {self.sampler} sampler warms up from the top "
                                   f"of its grid ({', '.join(fixed)}) and cannot start part-way; pass another sampler "
                                   f"(sampler='ddim', 'dpmpp_2m', 'euler', ...)")
        for name in _PER_STEP_OPTIONS:  # one value per step (or per grid sigma): the slice's own
            value = options.get(name)
            if value is not None:
                if len(value) not in (self.steps, self.steps + 1):
                    raise BadArgumentError(f"{name}: expected one value per step ({self.steps}), found {len(value)}")
                options[name] = list(value)[t_start:]
        if self.sampler == "ddpm" and options.get("sigma_before") is None:  # (classifier guidance's last step reads
            options["sigma_before"] = float(self.sigmas[t_start - 1])  # the variance of the step before it)
        if options.get("disable_corrector"):  # UniPC's step indices, counted from the slice's first step
            options["disable_corrector"] = [i - t_start for i in options["disable_corrector"] if i >= t_start]
        # diffusers' singlestep DPM-Solver keeps the whole run's order of each step, lowered where outputs are missing
        if self.scheduler == "DPMSolverSinglestepScheduler" and self.sampler == "dpm_solver":
            from .samplers import singlestep_orders

            full = options.get("orders") or singlestep_orders(self.steps, options.get("order", 2),
                                                              options.get("lower_order_final", False),
                                                              float(self.sigmas[-1]) == 0)
            options["orders"] = [min(k, i + 1) for i, k in enumerate(full[t_start:])]
        # diffusers' LMS builds its first polynomials through the grid's sigmas before the slice too
        if self.scheduler == "LMSDiscreteScheduler" and self.sampler == "lms":
            k = options.get("order", 4)
            options["nodes_before"] = [float(v) for v in self.sigmas[max(0, t_start - (k - 1)):t_start]]
        if self.sampler in COUNTS_ALL_STEPS and options.get("lower_order_final", True) and self.steps >= 15:
            options["lower_order_final"] = False  # (the slice is shorter than 15, the run is not)
        return dataclasses.replace(self, sigmas=self.sigmas[t_start:].clone(), options=options, init_noise_sigma=1.0)

    def to_step(self, k: int) -> "SamplingPlan":
        """The plan's first ``k`` steps, returning the state at ``sigmas[k]`` (times ``output_scale``: diffusers'
        latents in its scheduler's frame, ``fastdiff.experts.latents_scale``), not x0: a base run of SDXL's ensemble
        of experts (``denoising_end``), as diffusers stops its loop early. The end-of-run decisions of the whole run
        (lower orders on its last steps) lie past the cut and are switched off; a third-order solver cut one step
        short of the end would take one, and is refused."""
        from .experts import latents_scale
        from .samplers import COUNTS_ALL_STEPS
        from .sampling import sampler_options

        if not 0 < k < self.steps:
            raise BadArgumentError(f"k: expected 0 < k < {self.steps}, found {k}")
        options = dict(self.options)
        for name in _PER_STEP_OPTIONS:
            value = options.get(name)
            if value is not None:
                options[name] = list(value)[:k + (len(value) > self.steps)]
        accepted = sampler_options(self.sampler)
        # (DPM-Solver++ / DEIS drop order near the end of runs under 15 steps only; UniPC in any run)
        drops = self.steps < 15 or self.sampler not in COUNTS_ALL_STEPS
        if options.get("order", 2) == 3 and k >= self.steps - 1 and options.get("lower_order_final", True) and (
                "lower_order_final" in accepted) and drops:
            raise BadArgumentError(f"denoising_end: a third-order {self.sampler} cut one step short of its end takes "
                                   f"that step at a lower order, which is not implemented; cut earlier")
        for name in ("lower_order_final", "euler_at_final"):
            if name in accepted:
                options[name] = False
        s = float(self.sigmas[k])
        return dataclasses.replace(self, sigmas=self.sigmas[:k + 1].clone(), options=options,
                                   output_scale=latents_scale(self, s))

    def to_first_stage(self, k: int) -> "SamplingPlan":
        """The plan's first ``k`` steps and step k's first stage, an Euler step (to sigmas[k + 1]; a KDPM2 plan's to
        the step's midpoint): a base run of SDXL's ensemble whose cutoff falls between the stages of a two-stage
        scheduler's step, as diffusers stops its loop there (``fastdiff.experts.steps_until``)."""
        from .samplers import midpoint_sigma

        if not 0 <= k < self.steps - 1:
            raise BadArgumentError(f"k: expected 0 <= k < {self.steps - 1}, found {k}")
        whole = self.to_step(k + 1)
        options = dict(whole.options, stop_after_first_stage=True)
        sigmas = whole.sigmas.clone()
        if self.sampler == "dpm_2":  # (the Euler stage ends at the step's midpoint)
            mids = options.get("sigmas_mid")
            sigmas[-1] = float(mids[k]) if mids is not None else midpoint_sigma(float(sigmas[-2]), float(sigmas[-1]))
        from .experts import latents_scale

        # (the refiner reruns step k from this state, reading it in its frame at sigmas[k]: a named plan's VP latents
        # are scaled there, so that the two factors cancel; diffusers' Heun / KDPM2 hand on x itself either way)
        return dataclasses.replace(whole, sigmas=sigmas, options=options,
                                   output_scale=latents_scale(self, float(self.sigmas[k])))

    @property
    def time_frame(self) -> bool:
        """The samplers run a flow model on its time grid (x_t = (1 - t) x0 + t eps), not in x = x0 + sigma eps."""
        return self.denoiser_kind == "flow" and self.denoiser_options.get("frame") == "t"

    def noised(self, clean: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The sampler's start state for clean latents ``clean`` and unit noise ``eps`` at ``sigmas[0]``: diffusers'
        ``scheduler.add_noise`` / ``scale_noise``, in this plan's frame (x = x0 + sigma eps; on a flow time grid,
        x_t = (1 - t) x0 + t eps)."""
        s = float(self.sigmas[0])
        if self.time_frame:
            return (1 - s) * clean.float() + s * eps.float()
        return clean.float() + s * eps.float()

    def sample(self, denoiser, latents: torch.Tensor, *, extra_args=None, noise=None, callback=None, known=None,
               **options) -> torch.Tensor:
        """Run the plan from unit-normal ``latents`` (what diffusers' ``prepare_latents`` draws). ``known``: a
        ``fastdiff.inpaint.KnownRegion`` pasted back after every step, and on the result once scaled (diffusers'
        inpainting pipelines blend their final latents with the image's, whatever frame the grid ends in)."""
        from .sampling import sample
        x = latents.to(torch.float32) * self.init_noise_sigma
        out = sample(denoiser, x, self.sampler, self.sigmas, extra_args=extra_args, noise=noise,
                     callback=callback, after_step=known, **{**self.options, **options})
        out = out * self.output_scale if self.output_scale != 1.0 else out
        return out if known is None else known.final(out)


# sampler options holding one value per step (or per grid sigma): SamplingPlan.from_step slices them with the grid
_PER_STEP_OPTIONS = ("sigmas_to", "sigmas_mid", "c_skip", "c_out", "timesteps")
# PNDM's warm-up values, laid out for its first timesteps: such a plan cannot start part-way
_WARMUP_FROM_THE_TOP = ("warmup_from", "sigmas_mid_to")
