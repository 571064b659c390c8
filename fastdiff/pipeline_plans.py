"""``Pipeline.plan``: the sampling plan of a run, from the checkpoint's scheduler config or a named sampler and
sigma grid (a mixin of ``fastdiff.pipeline.Pipeline``; plans are cached per pipeline)."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from .errors import BadArgumentError, UnsupportedConfigError
from .spec import is_flow_scheduler
from .utils.keys import freeze

_LEADING_DEFAULT = ("heun", "edm", "plms")  # samplers whose default grid on discrete-time models is "leading"
# named samplers that run an official DiT / guided-diffusion checkpoint's own sampling: (scheduler, respacing)
_RESPACED = {"ddpm": ("DDPMScheduler", "guided-diffusion"), "ddim": ("DDIMScheduler", "guided-diffusion-ddim")}
_SIGMA_MAX_CAP = 80.0  # EDM's sigma_max: the top of continuous (karras / exponential / uniform) grids


class PlansMixin:
    """What ``Pipeline`` plans with: its ``spec`` (scheduler config, prediction type, sizes) and a ``_plans``
    cache."""

    def plan(self, steps: int, sampler: Optional[str] = None, schedule: Optional[str] = None, *,
             size: Optional[tuple] = None, **options):
        """The SamplingPlan for these settings: the checkpoint's scheduler config, or a named sampler.

        ``options`` are the sampler's keyword options (``eta``, ``order``, ``s_churn``, ...), checked
        against what the chosen sampler accepts. ``size``: the latent (height, width), default the model's
        sample size; it matters only to a flow-matching scheduler with ``use_dynamic_shifting``.
        """
        from .sampling import SAMPLERS, SCHEDULES, check_options

        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise BadArgumentError(f"steps: expected a positive integer, found {steps!r}")
        if sampler is not None and sampler not in SAMPLERS:
            raise BadArgumentError(f"sampler: expected one of {sorted(SAMPLERS)}, found {sampler!r}")
        if schedule is not None and schedule not in SCHEDULES:
            raise BadArgumentError(f"schedule: expected one of {list(SCHEDULES)}, found {schedule!r}")
        mu = self._dynamic_shift_mu(size)
        key = (steps, sampler, schedule, mu, self.spec.prediction_type, freeze(dict(self.spec.scheduler or {})))
        plan = self._plans.get(key)
        if plan is None:
            plan = self._base_plan(steps, sampler, schedule, mu)
            if len(self._plans) >= 64:
                self._plans.clear()
            self._plans[key] = plan
        check_options(plan.sampler, options)
        # a copy that owns its mutable parts: callers may edit it without touching the cached plan
        return dataclasses.replace(plan, options={**plan.options, **options}, sigmas=plan.sigmas.clone(),
                                   denoiser_options={k: dict(v) if isinstance(v, dict) else v
                                                     for k, v in plan.denoiser_options.items()})

    def _dynamic_shift_mu(self, size: Optional[tuple]) -> Optional[float]:
        """A flow-matching scheduler's resolution shift (``use_dynamic_shifting``): the ``mu`` diffusers' Flux / SD3
        pipelines compute from the image's token count ((height / patch) * (width / patch)); None otherwise."""
        from .flow import dynamic_shift_mu

        s = self.spec.scheduler or {}
        if self.spec.prediction_type != "flow_prediction" or not s.get("use_dynamic_shifting"):
            return None
        h, w = self.spec.sample_size if size is None else size
        # (Flux packs 2x2 latent patches into tokens before its patch-size-1 embedder)
        patch = 2 if self.spec.kind == "flux" else int(self.spec.model_config.get("patch_size") or 1)

        def setting(key, default):  # (diffusers' signature allows None for these)
            return default if s.get(key) is None else s[key]
        return dynamic_shift_mu((h // patch) * (w // patch), int(setting("base_image_seq_len", 256)),
                                int(setting("max_image_seq_len", 4096)), float(setting("base_shift", 0.5)),
                                float(setting("max_shift", 1.15)))

    def _base_plan(self, steps: int, sampler: Optional[str], schedule: Optional[str], mu: Optional[float] = None):
        from .sampling import get_sigmas, plan_from_scheduler_config
        from .scheduler_config import DISTILLED_SAMPLERS, SUPPORTED_SCHEDULERS, SamplingPlan
        from .schedules import SPACINGS

        flow = self.spec.prediction_type == "flow_prediction"
        if flow != is_flow_scheduler(self.spec.scheduler) and self.spec.prediction_type != "edm":
            raise UnsupportedConfigError("prediction_type", self.spec.prediction_type,
                                         supported="flow_prediction with a flow-matching scheduler (FlowMatch*, "
                                         "use_flow_sigmas), and only with one", model="ModelSpec")
        if sampler is None and self.spec.prediction_type == "edm":
            sampler = "edm"  # EDM's own 2nd-order Heun sampler on the Karras grid (its published setting)
        train_steps = int(self.spec.scheduler.get("num_train_timesteps", 1000))
        cls = self.spec.scheduler.get("_class_name")
        if sampler is not None and sampler == DISTILLED_SAMPLERS.get(cls) and schedule is None:
            sampler = None  # an LCM / TCD checkpoint's own sampler: at the timesteps it was distilled on
        if sampler in _RESPACED and schedule is None and self.spec.scheduler.get("timestep_respacing"):
            # an official DiT / guided-diffusion checkpoint: its p_sample / ddim_sample on guided-diffusion's
            # respaced timesteps ("N" / "ddimN")
            cls, respacing = _RESPACED[sampler]
            config = dict(self.spec.scheduler, _class_name=cls, timestep_respacing=respacing)
            if sampler == "ddpm" and config.get("variance_type") is None:  # (a scheduler= preset names none)
                # guided-diffusion's: LEARNED_RANGE with learn_sigma, else FIXED_LARGE (sigma_small=False)
                config["variance_type"] = "learned_range" if self.spec.learned_variance else "fixed_large"
            return plan_from_scheduler_config(config, steps)
        if sampler is None and schedule is None and cls in SUPPORTED_SCHEDULERS:
            if steps > train_steps:
                raise BadArgumentError(f"steps: expected at most {train_steps} (the training timesteps), found {steps}")
            plan = plan_from_scheduler_config(self.spec.scheduler, steps, mu=mu)
        elif flow:  # named samplers on the model's own flow time grid, each in its frame
            from .flow_schedulers import named_flow_plan
            from .comfy_schedules import FLUX_TABLE_SIZE

            # (ComfyUI's schedules: FLUX.1 dev's and its variants' table of 10000 times, ModelSamplingFlux; every
            # other flow model's 1000, schnell's included: ComfyUI runs it as a plain unshifted flow)
            flux_dev = self.spec.kind == "flux" and bool(self.spec.scheduler.get("use_dynamic_shifting"))
            plan = named_flow_plan(self.spec.scheduler, steps, sampler or "euler", schedule, mu,
                                   table_size=FLUX_TABLE_SIZE if flux_dev else 1000)
        else:
            # no supported scheduler class (SASolver, ...): DDIM on the same schedule and spacing
            sampler = sampler or ("ddim" if sampler is None and schedule is None else "dpmpp_2m")
            plan = self._named_plan(steps, sampler, schedule, train_steps, get_sigmas, SamplingPlan, SPACINGS)
        return plan

    def _ays_schedule(self, schedule: str, ac) -> str:
        """Align Your Steps' list for this model (``ays``: SDXL's for an SDXL-style UNet), refused where the model's
        sigma range is not SD's (the lists are absolute sigmas: elsewhere they would not start from noise)."""
        from .comfy_schedules import AYS_NOISE_LEVELS

        lo, hi = (float(((1 - a) / a) ** 0.5) for a in (ac[0], ac[-1]))
        top, bottom = AYS_NOISE_LEVELS["ays_sd1"][0], AYS_NOISE_LEVELS["ays_sd1"][-1]
        if abs(hi / top - 1) > 0.01 or abs(lo / bottom - 1) > 0.01:
            raise BadArgumentError(f"schedule {schedule!r}: Align Your Steps' lists are SD 1.x / SDXL's sigmas "
                                   f"({bottom:.4f} .. {top:.4f}); this model's training table spans {lo:.4f} .. "
                                   f"{hi:.4f}")
        if schedule == "ays":
            return "ays_sdxl" if self.spec.time_ids_dim else "ays_sd1"
        return schedule

    def _named_plan(self, steps, sampler, schedule, train_steps, get_sigmas, SamplingPlan, spacings):
        from .comfy_schedules import AYS_SCHEDULES
        from .scheduler_config import continuous_model_options, timestep_scale_of

        timestep_scale_of(self.spec.scheduler)  # (refused where no training timestep is fed)

        # EDM-preconditioned networks: an EDM checkpoint, or a diffusers folder whose scheduler is EDM's or a
        # consistency model's (its sigma range and preconditioning, not a beta table)
        continuous = continuous_model_options(self.spec.scheduler)
        if self.spec.prediction_type == "edm" or continuous is not None:
            if sampler == "tcd":
                raise BadArgumentError("sampler 'tcd' needs a discrete-time model (its steps land on training "
                                       "timesteps); this network takes continuous noise levels (EDM preconditioning)")
            grid = {} if continuous is None else {k: continuous[k] for k in ("sigma_min", "sigma_max", "rho")}
            if schedule in AYS_SCHEDULES:
                raise BadArgumentError(f"schedule {schedule!r}: Align Your Steps' lists are SD 1.x / SDXL's sigmas "
                                       f"(0.0292 .. 14.6146); this network takes EDM's continuous noise levels")
            sigmas = get_sigmas(schedule or "karras", steps, **grid)
            dopts = {} if continuous is None else continuous["denoiser_options"]
            return SamplingPlan("named", sampler, sigmas, {}, "edm", dopts, init_noise_sigma=float(sigmas[0]))
        # Default grid: the training timesteps with the checkpoint's spacing. Heun-type samplers take
        # "leading" spacing (starting one stride below T): their trapezoidal correction breaks on a first
        # step spanning orders of magnitude, as from t=999 of a cosine schedule (sigma ~ 2e4) to t=749. So
        # does PLMS (its warm-up is such a trapezoid; its Adams-Bashforth weights assume even steps). One step
        # has no correction (the step to sigma = 0 is Euler's) and would start "leading" at t=0, not from noise:
        # it takes the checkpoint's spacing (digits, 1 step: digits-FD 7.5 instead of 54).
        leading = sampler in _LEADING_DEFAULT and steps > 1
        schedule = schedule or ("leading" if leading else self.spec.scheduler.get("timestep_spacing", "leading"))
        from .comfy_schedules import TABLE_SCHEDULES

        if (schedule in spacings or schedule in TABLE_SCHEDULES) and steps > train_steps:
            raise BadArgumentError(f"steps: schedule {schedule!r} spaces the {train_steps} training timesteps: "
                                   f"expected at most {train_steps} steps, found {steps}")
        ac = self.alphas_cumprod()
        table_max = float(((1 - ac[-1]) / ac[-1]) ** 0.5)
        if schedule in AYS_SCHEDULES:
            schedule = self._ays_schedule(schedule, ac)
        # Continuous grids start no higher than EDM's sigma_max = 80 (SNR 1.6e-4: pure noise already);
        # above it a cosine schedule's tail would only spend steps on noise.
        sigma_max = min(table_max, _SIGMA_MAX_CAP) if schedule not in spacings else None
        sigmas = get_sigmas(schedule, steps, alphas_cumprod=ac, sigma_max=sigma_max,
                            steps_offset=int(self.spec.scheduler.get("steps_offset", 0)))
        s0 = float(sigmas[0])
        denoiser_options = dict(alphas_cumprod=ac, prediction_type=self.spec.prediction_type)
        scale = timestep_scale_of(self.spec.scheduler)  # (improved-diffusion's rescale_timesteps: every sampler's)
        if scale is not None:
            denoiser_options["timestep_scale"] = scale
        if self.spec.scheduler.get("clip_sample"):  # data lives in [-clip, clip]: clip the denoised x0
            denoiser_options["clip_sample"] = float(self.spec.scheduler.get("clip_sample_range", 1.0))
        if sampler == "tcd":
            from .scheduler_config import tcd_named_plan
            return tcd_named_plan(sigmas, ac, denoiser_options)
        options = {}
        if sampler == "ddpm":
            options = self._named_ddpm_variance()
        return SamplingPlan("named", sampler, sigmas, options, "discrete", denoiser_options,
                            init_noise_sigma=math.sqrt(1 + s0 * s0))

    def _named_ddpm_variance(self) -> dict:
        """A named ddpm's variance: the one the scheduler config names (a DDPMScheduler's absent one is diffusers'
        fixed_small), else a learn_sigma network's learned range."""
        s = self.spec.scheduler
        variance = s.get("variance_type")
        if variance is None and s.get("_class_name") == "DDPMScheduler":
            variance = "fixed_small"
        if variance is None and self.spec.learned_variance:
            variance = "learned_range"
        return {"variance": variance} if variance in ("learned_range", "learned", "fixed_large") else {}

    def alphas_cumprod(self) -> torch.Tensor:
        from .schedules import alphas_cumprod_of

        return alphas_cumprod_of(self.spec.scheduler)

    def _train_steps(self) -> int:
        return int(self.spec.scheduler.get("num_train_timesteps", 1000))
