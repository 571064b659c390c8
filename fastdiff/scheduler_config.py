"""A diffusers ``scheduler_config.json`` -> a fastdiff sampling plan (sampler + sigma grid + denoiser).

``plan_from_scheduler_config(config, num_inference_steps)`` reads the config the way the diffusers
scheduler class named in ``_class_name`` would, and returns a ``SamplingPlan`` that reproduces that
scheduler's run (same timesteps fed to the network, same updates) with a fastdiff sampler:

    plan = plan_from_scheduler_config(json.load(open(".../scheduler/scheduler_config.json")), 30)
    denoiser = plan.make_denoiser(model)                     # DiscreteDenoiser / EDMDenoiser
    x0 = plan.sample(denoiser, latents, noise=NoiseSource(seeds))

Frames: fastdiff samplers work in sigma units (x = x0 + sigma * eps). Diffusers' DDIM / DDPM / DPM-Solver
/ UniPC keep the variance-preserving sample x_vp = x / sqrt(1 + sigma^2); ``plan.init_noise_sigma`` (what
unit-normal latents are multiplied by) and ``plan.output_scale`` (what the final state is multiplied by)
carry the conversion, so ``plan.sample`` takes and returns exactly what a diffusers pipeline does.

Supported: DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler,
HeunDiscreteScheduler, DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler,
UniPCMultistepScheduler, EDMEulerScheduler, PNDMScheduler (Stable Diffusion 1.x's default), LMSDiscreteScheduler,
LCMScheduler (latent consistency models, LCM-LoRA), KDPM2DiscreteScheduler, KDPM2AncestralDiscreteScheduler,
DEISMultistepScheduler, DPMSolverSDEScheduler (its noise drawn from the samples' own generators, not torchsde),
EDMDPMSolverMultistepScheduler, CMStochasticIterativeScheduler (consistency models), TCDScheduler, and flow
matching (``fastdiff.flow_schedulers``): FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler,
FlowMatchLCMScheduler and the solvers' ``use_flow_sigmas`` variant. Karras, exponential and beta
(``use_beta_sigmas``, needs scipy) grids wherever diffusers offers them. Anything else raises
``UnsupportedConfigError``.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import numpy as np
import torch

from . import schedules
from .denoiser import make_x0_postprocess
from .spec import is_flow_scheduler
from .errors import BadArgumentError, UnsupportedConfigError
from .sampling_plan import SamplingPlan
from .scheduler_keys import ignored_keys
from .utils.checks import finite_number

_COMMON = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
               trained_betas=None, prediction_type="epsilon", rescale_betas_zero_snr=False, steps_offset=0,
               thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0, clip_sample=False,
               clip_sample_range=1.0, use_karras_sigmas=False, use_exponential_sigmas=False,
               use_beta_sigmas=False, use_lu_lambdas=False, use_flow_sigmas=False, use_dynamic_shifting=False,
               final_sigmas_type="zero", timestep_spacing="linspace", variance_type=None,
               lambda_min_clipped=-math.inf, sigma_min=None, sigma_max=None, flow_shift=1.0,
               time_shift_type="exponential", shift_terminal=None,
               flow_time_convention="diffusers",  # fastdiff's key: "sit" for SiT-convention flow networks
               # fastdiff's key: "linspace" where the pipeline hands FlowMatchEuler sigmas = linspace(1, 1/n, n)
               # (diffusers' FluxPipeline) instead of letting set_timesteps space them
               flow_pipeline_sigmas=None,
               # fastdiff's key: "guided-diffusion" / "guided-diffusion-ddim" space DDPM's / DDIM's timesteps as
               # guided-diffusion's space_timesteps with "N" / "ddimN" (what official DiT / ADM sampling runs;
               # diffusers' 'linspace' rounds differently at half-way ties, its 'leading' strides T // N)
               timestep_respacing=None,
               # fastdiff's key: the network reads timestep * timestep_scale (improved-diffusion's rescale_timesteps:
               # 1000 / num_train_timesteps, its 4000-step models' 0.25); discrete-time schedulers only
               timestep_scale=None)

# Per-class defaults that differ from _COMMON (diffusers 0.3x-0.4x signatures).
_DEFAULTS = {
    "DDIMScheduler": dict(clip_sample=True, set_alpha_to_one=True, timestep_spacing="leading"),
    "DDPMScheduler": dict(clip_sample=True, variance_type="fixed_small", timestep_spacing="leading"),
    "EulerDiscreteScheduler": dict(interpolation_type="linear", timestep_type="discrete"),
    "EulerAncestralDiscreteScheduler": dict(),
    "HeunDiscreteScheduler": dict(beta_start=0.00085, beta_end=0.012),
    "DPMSolverMultistepScheduler": dict(solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint",
                                        lower_order_final=True, euler_at_final=False),
    "DPMSolverSinglestepScheduler": dict(solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint",
                                         lower_order_final=False),
    "UniPCMultistepScheduler": dict(solver_order=2, predict_x0=True, solver_type="bh2", lower_order_final=True,
                                    disable_corrector=[], solver_p=None),
    "EDMEulerScheduler": dict(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, sigma_schedule="karras", rho=7.0),
    "EDMDPMSolverMultistepScheduler": dict(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, sigma_schedule="karras",
                                           rho=7.0, solver_order=2, algorithm_type="dpmsolver++",
                                           solver_type="midpoint", lower_order_final=True, euler_at_final=False),
    "PNDMScheduler": dict(skip_prk_steps=False, set_alpha_to_one=False, timestep_spacing="leading"),
    "LMSDiscreteScheduler": dict(),
    "CMStochasticIterativeScheduler": dict(num_train_timesteps=40, sigma_min=0.002, sigma_max=80.0, sigma_data=0.5,
                                           s_noise=1.0, rho=7.0, clip_denoised=True),
    "DPMSolverSDEScheduler": dict(beta_start=0.00085, beta_end=0.012, noise_sampler_seed=None),
    "DEISMultistepScheduler": dict(solver_order=2, algorithm_type="deis", solver_type="logrho", lower_order_final=True,
                                   final_sigmas_type="sigma_min"),
    "KDPM2DiscreteScheduler": dict(beta_start=0.00085, beta_end=0.012),
    "KDPM2AncestralDiscreteScheduler": dict(beta_start=0.00085, beta_end=0.012),
    "LCMScheduler": dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", original_inference_steps=50,
                         set_alpha_to_one=True, timestep_spacing="leading", timestep_scaling=10.0),
    "TCDScheduler": dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", original_inference_steps=50,
                         set_alpha_to_one=True, timestep_spacing="leading", timestep_scaling=10.0),
    "FlowMatchEulerDiscreteScheduler": dict(shift=1.0, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                            max_image_seq_len=4096, invert_sigmas=False, stochastic_sampling=False),
    "FlowMatchHeunDiscreteScheduler": dict(shift=1.0),
    "FlowMatchLCMScheduler": dict(shift=1.0, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                  max_image_seq_len=4096, invert_sigmas=False, scale_factors=None,
                                  upscale_mode="bicubic"),
}
SUPPORTED_SCHEDULERS = tuple(_DEFAULTS)
# the config keys fastdiff reads and diffusers does not know (a diffusers scheduler is built without them)
FASTDIFF_KEYS = ("flow_time_convention", "flow_pipeline_sigmas", "timestep_respacing", "timestep_scale")


# schedulers of networks with EDM preconditioning (continuous sigma in, no training-timestep table)
CONTINUOUS_SCHEDULERS = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler", "CMStochasticIterativeScheduler")
# schedulers whose own timesteps are those the network was distilled on: a named run of their sampler keeps them
DISTILLED_SAMPLERS = {"LCMScheduler": "lcm", "TCDScheduler": "tcd", "FlowMatchLCMScheduler": "lcm"}


def continuous_model_options(config: dict) -> Optional[dict]:
    """For the scheduler config of an EDM-preconditioned network (EDM, consistency models): the denoiser options
    its plans use and its sigma range, so named samplers wrap the network the same way; None for any other."""
    name = config.get("_class_name")
    if name not in CONTINUOUS_SCHEDULERS:
        return None
    c = _Config(_read_config(name, config), name)
    return dict(denoiser_options=_BUILDERS[name](c, 1).denoiser_options, sigma_min=float(c["sigma_min"]),
                sigma_max=float(c["sigma_max"]), rho=float(c["rho"]))


def unsupported_scheduler_note(config: dict) -> Optional[str]:
    """The load note for a scheduler config fastdiff has no counterpart of (None where it has one)."""
    name = config.get("_class_name")
    if name in SUPPORTED_SCHEDULERS:
        return None
    return (f"scheduler {name!r} has no fastdiff counterpart: generate() with no sampler runs DDIM on its schedule "
            f"(pass sampler= to choose)")


def load_scheduler_config(path: str) -> dict:
    """Read ``scheduler_config.json`` from a file, a scheduler folder or a pipeline folder."""
    for p in (path, os.path.join(path, "scheduler_config.json"), os.path.join(path, "scheduler", "scheduler_config.json")):
        if os.path.isfile(p):
            from .checkpoints.io import read_json

            return read_json(p)  # (a non-JSON or binary file: a CorruptCheckpointError naming it)
    raise BadArgumentError(f"scheduler config: expected a scheduler_config.json at or under {path!r}, found none")


def plan_from_scheduler_config(config: dict, num_inference_steps: int, class_name: Optional[str] = None, *,
                               mu: Optional[float] = None) -> SamplingPlan:
    """Map a diffusers scheduler config (dict; ``_class_name`` names the class, or pass ``class_name``)
    onto a ``SamplingPlan`` for ``num_inference_steps`` steps. ``mu``: the resolution's dynamic time shift
    (diffusers' ``set_timesteps(mu=...)``) for a flow-matching config with ``use_dynamic_shifting``."""
    name = class_name or config.get("_class_name")
    if name not in _DEFAULTS:
        raise UnsupportedConfigError("_class_name", name, supported=list(SUPPORTED_SCHEDULERS), model="scheduler")
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise BadArgumentError(f"num_inference_steps: expected a positive int, found {num_inference_steps!r}")
    c = _Config(_read_config(name, config), name)
    if c["flow_time_convention"] != "diffusers" and not is_flow_scheduler(dict(c, _class_name=name)):
        # (fastdiff's own key: a time convention means nothing to a beta-schedule scheduler)
        raise UnsupportedConfigError("flow_time_convention", c["flow_time_convention"], supported="'diffusers', or "
                                     "another with a flow-matching scheduler (FlowMatch*, use_flow_sigmas)", model=name)
    if c["flow_pipeline_sigmas"] is not None and name != "FlowMatchEulerDiscreteScheduler":
        raise UnsupportedConfigError("flow_pipeline_sigmas", c["flow_pipeline_sigmas"], model=name,
                                     supported="None (fastdiff's key for FlowMatchEulerDiscreteScheduler only)")
    timestep_scale_of(dict(c, _class_name=name))
    if c["timestep_respacing"] is not None and name not in ("DDPMScheduler", "DDIMScheduler"):
        raise UnsupportedConfigError("timestep_respacing", c["timestep_respacing"], model=name,
                                     supported="None (fastdiff's key for DDPMScheduler and DDIMScheduler only)")
    if mu is not None:
        if not c["use_dynamic_shifting"]:
            raise BadArgumentError(f"mu: {name} without use_dynamic_shifting takes no mu, found {mu!r}")
        c.mu = finite_number("mu", mu)
    return _BUILDERS[name](c, num_inference_steps)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------

# the keys only some classes take (beyond the shared ones): another class's are foreign to a config
_CLASS_KEYS = frozenset().union(*_DEFAULTS.values()) - frozenset(_COMMON)


def _read_config(name: str, config: dict) -> dict:
    """``config`` as diffusers' ``name.from_config`` reads it: the class's defaults, overridden by the keys its
    constructor takes; a key it lacks (another class's, left in the file) is dropped, as diffusers drops it."""
    foreign = ignored_keys(name) | (_CLASS_KEYS - frozenset(_DEFAULTS[name]))
    own = {k: v for k, v in dict(config).items() if not k.startswith("_") and k not in foreign}
    return {**_COMMON, **_DEFAULTS[name], **own}


def effective_config(config: dict) -> Optional[dict]:
    """The settings diffusers' scheduler class of ``config`` runs with (its defaults for keys the file lacks), only
    the keys it takes; None for a class fastdiff has no counterpart of."""
    name = config.get("_class_name")
    if name not in _DEFAULTS:
        return None
    return {k: v for k, v in _read_config(name, config).items() if k not in ignored_keys(name)}


class _Config(dict):
    def __init__(self, d, name):
        super().__init__(d)
        self.name = name
        self.mu = None  # the dynamic time shift of a flow-matching run

    def choice(self, key, allowed):
        v = self[key]
        if v not in allowed:
            raise UnsupportedConfigError(key, v, supported=list(allowed), model=self.name)
        return v

    def remap(self, key, allowed, rewrites: dict):
        """One of ``allowed``, after diffusers' constructor rewrites (``rewrites``: what a value from another
        scheduler's config becomes: DEIS takes DPM-Solver's solver types as "logrho", ...); else refused."""
        v = self[key]
        return rewrites[v] if isinstance(v, str) and v in rewrites else self.choice(key, allowed)

    def refuse_zero_final_unless_plus_plus(self):
        """diffusers refuses final_sigmas_type "zero" for an algorithm_type other than dpmsolver++ /
        sde-dpmsolver++, as given (before its rewrite of "deis")."""
        if self["algorithm_type"] not in ("dpmsolver++", "sde-dpmsolver++") and self["final_sigmas_type"] == "zero":
            raise UnsupportedConfigError("final_sigmas_type", "zero", supported=["sigma_min"],
                                         model=f"{self.name} ({self['algorithm_type']})")

    def refuse_true(self, *keys):
        for k in keys:
            if self.get(k):
                raise UnsupportedConfigError(k, self[k], supported=[False], model=self.name)


def _alphas_cumprod(c: _Config, exact_zero_snr: bool = False) -> torch.Tensor:
    """The training schedule; ``exact_zero_snr``: a scheduler (DDIM, DDPM) that keeps alphas_cumprod 0 at a zero
    terminal SNR, where the sigma-based ones clamp it to 2**-24."""
    # (of the classes here, only DDPM has the sigmoid schedule; the others raise NotImplementedError for it)
    allowed = [b for b in schedules.BETA_SCHEDULES if b != "sigmoid" or c.name == "DDPMScheduler"]
    c.choice("beta_schedule", allowed if c["trained_betas"] is None else [c["beta_schedule"]])
    floor = schedules.EXACT_ZERO_SNR_FLOOR if exact_zero_snr else schedules.ZERO_SNR_FLOOR
    zero_snr = bool(c["rescale_betas_zero_snr"])  # (_read_config dropped it for the classes that lack it)
    return schedules.make_alphas_cumprod(c["beta_schedule"], c["num_train_timesteps"], c["beta_start"], c["beta_end"],
                                         c["trained_betas"], zero_snr, zero_snr_floor=floor)


def _f32(a) -> np.ndarray:
    """Values as diffusers stores them (float32), held in float64."""
    return np.asarray(a, dtype=np.float64).astype(np.float32).astype(np.float64)


def _grid(sigmas, last) -> torch.Tensor:
    return torch.from_numpy(np.concatenate([_f32(sigmas), _f32([last])]))


def _table(ac) -> np.ndarray:
    return schedules.sigmas_from_alphas_cumprod(ac).numpy()


def _discrete(c: _Config, ac, **kw) -> dict:
    opts = dict(alphas_cumprod=ac, prediction_type=c.choice("prediction_type", ("epsilon", "v_prediction", "sample")))
    opts.update(kw)
    scale = timestep_scale_of(dict(c, _class_name=c.name))
    if scale is not None:
        opts["timestep_scale"] = scale
    return opts


def timestep_scale_of(config: dict) -> Optional[float]:
    """fastdiff's ``timestep_scale`` key of a scheduler config (the network reads timestep * scale): None for none or
    1; a positive number; refused on the schedulers that feed no training timestep (flow matching, EDM, consistency
    models), where it would be ignored."""
    scale = config.get("timestep_scale")
    if scale is None:
        return None
    name = config.get("_class_name")
    if name in CONTINUOUS_SCHEDULERS or is_flow_scheduler(config):
        raise UnsupportedConfigError("timestep_scale", scale, model=name or "scheduler",
                                     supported="None (fastdiff's key for discrete-time schedulers only)")
    scale = finite_number("timestep_scale", scale)
    if scale <= 0:
        raise BadArgumentError(f"timestep_scale: expected a positive number, found {scale}")
    return None if scale == 1.0 else scale


def _timestep_map(sigmas, timesteps) -> dict:
    """{float32 sigma: timestep} for a grid: the timesteps the diffusers scheduler feeds the network at those
    sigmas (``DiscreteDenoiser(timesteps=)``)."""
    return {float(s): float(t) for s, t in zip(_f32(sigmas), np.asarray(timesteps, dtype=np.float64))}


def _threshold_opts(c: _Config, clip: bool) -> dict:
    return dict(clip_sample=c["clip_sample_range"] if (clip and c["clip_sample"]) else None,
                thresholding=bool(c["thresholding"]), dynamic_thresholding_ratio=c["dynamic_thresholding_ratio"],
                sample_max_value=c["sample_max_value"])


def _vp_plan(name, sampler, sigmas: torch.Tensor, options, dopts) -> SamplingPlan:
    """A plan for a variance-preserving scheduler: latents are x_vp at sigmas[0]; output x_vp at sigmas[-1]."""
    s0, sl = float(sigmas[0]), float(sigmas[-1])
    return SamplingPlan(name, sampler, sigmas, options, "discrete", dopts, init_noise_sigma=math.sqrt(1 + s0 * s0),
                        output_scale=1 / math.sqrt(1 + sl * sl))


def sigma_conversion(c: _Config):
    """The grid conversion a config asks for: None, "karras", "exponential" or "beta" (at most one)."""
    keys = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas") if c.get(k)]
    if len(keys) > 1:
        raise UnsupportedConfigError(keys[1], True, supported=f"only one of {keys}", model=c.name)
    return keys[0][len("use_"):-len("_sigmas")] if keys else None


# solvers whose use_dynamic_shifting acts only with use_flow_sigmas: diffusers ignores it on a beta schedule (UniPC
# raises there instead, asking for mu)
_SHIFTING_NEEDS_FLOW = ("DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "DEISMultistepScheduler")


def _sigma_grid_kind(c: _Config):
    """None (the spacing's own sigmas), "karras", "exponential" or "beta", for a beta-schedule scheduler."""
    c.refuse_true("use_lu_lambdas", "use_flow_sigmas")
    if c.name not in _SHIFTING_NEEDS_FLOW:
        c.refuse_true("use_dynamic_shifting")
    return sigma_conversion(c)


def convert_sigmas(kind: str, n: int, lo: float, hi: float) -> np.ndarray:
    """diffusers' ``_convert_to_karras`` (rho 7) / ``_convert_to_exponential`` / ``_convert_to_beta`` (alpha =
    beta = 0.6, Lee et al. 2024) between ``lo`` and ``hi``: n values, decreasing."""
    if kind == "karras":
        return schedules.get_sigmas_karras(n, lo, hi, 7.0).numpy()[:-1]
    if kind == "exponential":
        return schedules.get_sigmas_exponential(n, lo, hi).numpy()[:-1]
    try:
        from scipy.stats import beta as beta_distribution
    except ImportError as e:  # diffusers needs scipy here too
        raise UnsupportedConfigError("use_beta_sigmas", True, supported="use_beta_sigmas with scipy installed "
                                     "(pip install scipy)") from e
    ppf = beta_distribution.ppf(1 - np.linspace(0, 1, n), 0.6, 0.6)
    return np.array([lo + p * (hi - lo) for p in ppf])


# --------------------------------------------------------------------------------------------------
# builders, one per diffusers class
# --------------------------------------------------------------------------------------------------

def _indexed_timesteps(c: _Config, n: int) -> np.ndarray:
    """Timesteps of a scheduler that indexes its table with them (DDIM, DDPM, PNDM). 'leading' spacing plus
    steps_offset can pass t = T - 1, where diffusers fails with an IndexError (the Euler family interpolates
    and clamps instead): refused with the reason."""
    T = c["num_train_timesteps"]
    ts = schedules.get_timesteps(c.choice("timestep_spacing", schedules.SPACINGS), n, T, c["steps_offset"])
    if ts.size and int(ts.max()) > T - 1:
        raise BadArgumentError(f"steps: {n} {c['timestep_spacing']!r} steps with steps_offset {c['steps_offset']} reach "
                               f"timestep {int(ts.max())}, past the {T} training timesteps of {c.name} (0..{T - 1}); "
                               f"expected fewer steps")
    if ts.size and int(ts.min()) < 0:  # (diffusers' arange(T, 0, -T / n) holds n + 1 entries for some n)
        raise BadArgumentError(f"steps: {n} {c['timestep_spacing']!r} steps of {T} training timesteps give diffusers' "
                               f"{c.name} {len(ts)} timesteps ending at {int(ts.min())}, where it indexes its table "
                               f"from the end (a last step back to the top noise level); expected another step count")
    return ts


RESPACINGS = ("guided-diffusion", "guided-diffusion-ddim")


def _respaced(c: _Config, n: int):
    """The timesteps of fastdiff's ``timestep_respacing`` key (guided-diffusion's ``space_timesteps`` with "N" or
    "ddimN"), or None where the config's own spacing applies. "ddimN" for a count no integer stride gives (1, 37,
    60, ... of 1000) is "N", which image_sample.py's DDIM runs as well (``--timestep_respacing 60 --use_ddim``)."""
    how = c.choice("timestep_respacing", (None,) + RESPACINGS)
    if how is None:
        return None
    T = c["num_train_timesteps"]
    ddim = how == "guided-diffusion-ddim" and schedules.ddim_stride(n, T) is not None
    return schedules.respaced_timesteps(n, T, ddim=ddim)


def _ddim(c: _Config, n: int) -> SamplingPlan:
    ac = _alphas_cumprod(c, exact_zero_snr=True)
    table = _table(ac)
    T = c["num_train_timesteps"]
    ts = _respaced(c, n)
    respaced = ts is not None
    if respaced:                                       # guided-diffusion steps to the next kept timestep
        prev = np.append(ts[1:], -1)
    else:
        ts = _indexed_timesteps(c, n)
        prev = ts - T // n                             # diffusers' DDIM always steps to t - T // N
    final = 0.0 if c["set_alpha_to_one"] or respaced else table[0]  # (guided-diffusion ends at alpha 1)
    to = _f32([table[p] if p >= 0 else final for p in prev])
    sigmas = _grid(table[ts], to[-1])
    options = dict(eta=0.0)
    if not np.array_equal(to, sigmas.numpy()[1:]):
        options["sigmas_to"] = to.tolist()
    if respaced:  # guided-diffusion's ddim_sample: x0 clipped in the denoiser, eps recomputed from it
        return _vp_plan(c.name, "ddim", sigmas, options,
                        _discrete(c, ac, timestep_rounding="round", **_threshold_opts(c, True)))
    clip = make_x0_postprocess(**_threshold_opts(c, True))
    if clip is not None:                               # clip x0, keep the network's eps (diffusers default)
        options["clip_x0"] = clip
    return _vp_plan(c.name, "ddim", sigmas, options, _discrete(c, ac, timestep_rounding="round"))


def _ddpm(c: _Config, n: int) -> SamplingPlan:
    ac = _alphas_cumprod(c, exact_zero_snr=True)
    table = _table(ac)
    ts = _respaced(c, n)
    if ts is None:
        ts = _indexed_timesteps(c, n)
    # (fixed_small_log and None draw what fixed_small draws; the learned ones read the network's variance channels)
    variance = c.choice("variance_type", ("fixed_small", "fixed_small_log", "fixed_large", "learned_range", "learned",
                                          None))
    sigmas = _grid(table[ts], 0.0)
    dopts = _discrete(c, ac, timestep_rounding="round", **_threshold_opts(c, True))
    options = dict(variance="fixed_small" if variance in ("fixed_small_log", None) else variance)
    if options["variance"] != "fixed_small" and ts[-1] > 0:  # diffusers adds noise whenever t > 0
        options["final_noise"] = True
    return _vp_plan(c.name, "ddpm", sigmas, options, dopts)


_KDPM2 = ("KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler")
# schedulers that also call the network between grid sigmas (a 2nd-order stage)
_MIDPOINT_FAMILY = _KDPM2 + ("DPMSolverSDEScheduler",)


def _euler_family(c: _Config, n: int, sampler: str) -> SamplingPlan:
    ac = _alphas_cumprod(c)
    table = _table(ac)
    spacing = c.choice("timestep_spacing", schedules.SPACINGS)
    ts = schedules.get_timesteps(spacing, n, c["num_train_timesteps"], c["steps_offset"], integer=False)
    sig = schedules.sigmas_at_timesteps(ac, ts)
    kind = _sigma_grid_kind(c) if c.name != "EulerAncestralDiscreteScheduler" else None
    if c.get("interpolation_type", "linear") != "linear":
        raise UnsupportedConfigError("interpolation_type", c["interpolation_type"], supported=["linear"], model=c.name)
    interp = "linear"
    if kind is not None:                               # Karras / exponential over the spaced range
        # (a config's sigma range bounds it; LMS's and DPMSolverSDE's Karras grids alone never read it)
        bounded = not (kind == "karras" and c.name in ("LMSDiscreteScheduler", "DPMSolverSDEScheduler"))
        lo = c["sigma_min"] if c["sigma_min"] is not None and bounded else sig[-1]
        hi = c["sigma_max"] if c["sigma_max"] is not None and bounded else sig[0]
        sig, interp = convert_sigmas(kind, n, lo, hi), "log"
        ts = schedules.sigma_to_timestep(sig, ac)       # diffusers: from the unrounded sigmas, not rounded
        if kind == "karras" and c.name in _KDPM2:        # ... except KDPM2's Karras timesteps, rounded
            ts = np.round(ts)
    if c.name in _MIDPOINT_FAMILY:
        c.choice("prediction_type", ("epsilon", "v_prediction"))
        interp = "log"                                 # its midpoints' timesteps: diffusers' log-sigma inverse
    final = c.choice("final_sigmas_type", schedules.FINAL_SIGMAS) if c.name == "EulerDiscreteScheduler" else "zero"
    sigmas = _grid(sig, table[0] if final == "sigma_min" else 0.0)
    smax = float(sigmas.max())
    init = smax if spacing in ("linspace", "trailing") else math.sqrt(smax * smax + 1)
    continuous = c.get("timestep_type") == "continuous" and c["prediction_type"] == "v_prediction"
    timesteps = None if continuous else _timestep_map(sig, _f32(ts))
    options = _kdpm2_midpoints(sigmas, ac, timesteps, sampler) if c.name in _KDPM2 else {}
    dopts = _discrete(c, ac, interpolation=interp, timestep_type="continuous" if continuous else "discrete",
                      timesteps=timesteps, **_threshold_opts(c, c.name == "HeunDiscreteScheduler"))
    return SamplingPlan(c.name, sampler, sigmas, options, "discrete", dopts, init_noise_sigma=init)


def _kdpm2_midpoints(sigmas: torch.Tensor, ac, timesteps: dict, sampler: str) -> dict:
    """KDPM2's midpoints with their timesteps added to ``timesteps``. diffusers feeds a midpoint the log-sigma
    inverse of its sigma; the ancestral one (sqrt(sigma * sigma_down)) IS the next grid sigma, whose own
    timestep is the spacing's (or a rounded Karras one), so such a midpoint moves up by a few ulps to a key of
    its own (a relative change of 1e-16)."""
    from .sampler_base import _ancestral
    from .samplers import midpoint_sigma

    sig = sigmas.tolist()
    mids = []
    for s, s_next in zip(sig[:-1], sig[1:]):
        s_to = _ancestral(s, s_next, 1.0)[0] if sampler == "dpm_2_ancestral" else s_next
        if s_to == 0:
            mids.append(0.0)
            continue
        m = midpoint_sigma(s, s_to)
        t = float(schedules.sigma_to_timestep([m], ac)[0])
        while m in timesteps and timesteps[m] != t:
            m = math.nextafter(m, math.inf)
        timesteps[m] = t
        mids.append(m)
    return dict(sigmas_mid=mids)


# multistep schedulers whose Karras / exponential grid ends at its own smallest sigma (a zero-length last step), and
# whose Karras timesteps are always rounded
_LAST_IS_GRID_MIN = ("UniPCMultistepScheduler", "DEISMultistepScheduler")


def _multistep_sigmas(c: _Config, n: int, ac, *, singlestep: bool):
    """Sigmas of diffusers' DPM-Solver / UniPC family, how it rounds timesteps, and its {sigma: timestep}."""
    table = _table(ac)
    T = c["num_train_timesteps"]
    lam = torch.log(ac.sqrt()) - torch.log((1 - ac).sqrt())
    clipped = int(torch.searchsorted(torch.flip(lam, [0]), torch.tensor(c["lambda_min_clipped"], dtype=lam.dtype)))
    last = T - clipped
    spacing = "linspace" if singlestep else c.choice("timestep_spacing", schedules.SPACINGS)
    ts = schedules.get_timesteps(spacing, n, T, c["steps_offset"] if not singlestep else 0, skip_last=True,
                                 last_timestep=last)
    kind = _sigma_grid_kind(c)
    final = c.choice("final_sigmas_type", schedules.FINAL_SIGMAS)
    if kind is None:  # (a timestep of -1, trailing spacing's extra entry at some counts: np.interp clamps it to t = 0)
        sig, rounding = table[np.maximum(ts, 0)], "round"
        last_sigma = table[0]
        steps_t = ts
    else:
        # (a config's sigma_min / sigma_max bound the grid; DEIS and DPM-Solver read them from the config too)
        lo = c["sigma_min"] if c["sigma_min"] is not None else table[0]
        hi = c["sigma_max"] if c["sigma_max"] is not None else table[-1]
        sig = convert_sigmas(kind, n, lo, hi)
        # karras timesteps are rounded (DPM multistep: not for the cosine schedule); other grids are cast
        # to int64 (truncated).
        rounds = kind == "karras" and (singlestep or c.name in _LAST_IS_GRID_MIN
                                       or c["beta_schedule"] != "squaredcos_cap_v2")
        rounding = "round" if rounds else "floor"
        last_sigma = sig[-1] if c.name in _LAST_IS_GRID_MIN else table[0]
        raw_t = schedules.sigma_to_timestep(sig, ac)  # diffusers: from the unrounded sigmas, then rounded / cast
        steps_t = np.round(raw_t) if rounds else np.floor(raw_t)
    return _grid(sig, last_sigma if final == "sigma_min" else 0.0), rounding, _timestep_map(sig, steps_t)


# what DPM-Solver's constructors rewrite a config from another solver to (diffusers' own swaps)
_DPM_ALGORITHM_REWRITES = {"deis": "dpmsolver++"}
_DPM_SOLVER_TYPE_REWRITES = dict.fromkeys(("logrho", "bh1", "bh2"), "midpoint")


def _dpm_multistep(c: _Config, n: int) -> SamplingPlan:
    ac = _alphas_cumprod(c)
    algo = c.remap("algorithm_type", ("dpmsolver++", "dpmsolver", "sde-dpmsolver++"), _DPM_ALGORITHM_REWRITES)
    order = c.choice("solver_order", (1, 2, 3))
    solver_type = c.remap("solver_type", ("midpoint", "heun"), _DPM_SOLVER_TYPE_REWRITES)
    c.refuse_zero_final_unless_plus_plus()
    if algo == "dpmsolver" and c["thresholding"]:
        raise UnsupportedConfigError("thresholding", True, supported=[False], model=c.name + " (dpmsolver)")
    c.choice("variance_type", (None, "learned", "learned_range"))
    options = dict(order=order, solver_type=solver_type, lower_order_final=bool(c["lower_order_final"]),
                   euler_at_final=bool(c["euler_at_final"]))
    if algo == "sde-dpmsolver++":
        sampler = "dpmpp_2m_sde"
        options.update(eta=1.0, diffusers_sde3_coefficient=True)
    else:
        sampler = "dpmpp_2m"
        options["predict_x0"] = algo == "dpmsolver++"
    if c["use_flow_sigmas"]:
        return _flow_solver(c, n, sampler, options, ("algorithm_type", algo) if algo == "dpmsolver" else None)
    sigmas, rounding, steps_t = _multistep_sigmas(c, n, ac, singlestep=False)
    dopts = _discrete(c, ac, timestep_rounding=rounding, timesteps=steps_t, **_threshold_opts(c, False))
    return _vp_plan(c.name, sampler, sigmas, options, dopts)


def _dpm_singlestep(c: _Config, n: int) -> SamplingPlan:
    ac = _alphas_cumprod(c)
    algo = c.remap("algorithm_type", ("dpmsolver++", "dpmsolver", "sde-dpmsolver++"), _DPM_ALGORITHM_REWRITES)
    order = c.choice("solver_order", (1, 2, 3))
    solver_type = c.remap("solver_type", ("midpoint", "heun"), _DPM_SOLVER_TYPE_REWRITES)
    c.refuse_zero_final_unless_plus_plus()
    if algo == "dpmsolver" and c["thresholding"]:
        raise UnsupportedConfigError("thresholding", True, supported=[False], model=c.name + " (dpmsolver)")
    c.choice("variance_type", (None, "learned", "learned_range"))
    options = dict(order=order, solver_type=solver_type, lower_order_final=bool(c["lower_order_final"]),
                   predict_x0=algo != "dpmsolver")
    if algo == "sde-dpmsolver++":
        options.update(eta=1.0, diffusers_sde3_coefficient=True)
    if c["use_flow_sigmas"]:
        return _flow_solver(c, n, "dpm_solver", options, ("algorithm_type", algo) if algo == "dpmsolver" else None)
    sigmas, rounding, steps_t = _multistep_sigmas(c, n, ac, singlestep=True)
    dopts = _discrete(c, ac, timestep_rounding=rounding, timesteps=steps_t, **_threshold_opts(c, False))
    return _vp_plan(c.name, "dpm_solver", sigmas, options, dopts)


def _unipc(c: _Config, n: int) -> SamplingPlan:
    ac = _alphas_cumprod(c)
    if c["solver_p"] is not None:
        raise UnsupportedConfigError("solver_p", c["solver_p"], supported=[None], model=c.name)
    order = c.choice("solver_order", (1, 2, 3))
    variant = c["solver_type"] if c["solver_type"] in ("bh1", "bh2") else "bh2"
    if c["solver_type"] not in ("bh1", "bh2", "midpoint", "heun", "logrho"):
        raise UnsupportedConfigError("solver_type", c["solver_type"], supported=["bh1", "bh2"], model=c.name)
    predict_x0 = bool(c["predict_x0"])
    options = dict(order=order, variant=variant, lower_order_final=bool(c["lower_order_final"]),
                   disable_corrector=list(c["disable_corrector"] or []), predict_x0=predict_x0)
    if c["use_flow_sigmas"]:
        return _flow_solver(c, n, "unipc", options, None if predict_x0 else ("predict_x0", False))
    sigmas, rounding, steps_t = _multistep_sigmas(c, n, ac, singlestep=False)
    thr = _threshold_opts(c, False)
    thr["thresholding"] = thr["thresholding"] and predict_x0   # diffusers thresholds only the x0 form
    return _vp_plan(c.name, "unipc", sigmas, options, _discrete(c, ac, timestep_rounding=rounding,
                                                                 timesteps=steps_t, **thr))


def _deis(c: _Config, n: int) -> SamplingPlan:
    """DEIS: the DPM-Solver multistep grid (its last sigma the table's first, or a Karras grid's own last)."""
    ac = _alphas_cumprod(c)
    c.remap("algorithm_type", ("deis",), dict.fromkeys(("dpmsolver", "dpmsolver++"), "deis"))
    c.remap("solver_type", ("logrho",), dict.fromkeys(("midpoint", "heun", "bh1", "bh2"), "logrho"))
    order = c.choice("solver_order", (1, 2, 3))
    c.choice("final_sigmas_type", ("sigma_min",))
    options = dict(order=order, lower_order_final=bool(c["lower_order_final"]))
    if c["use_flow_sigmas"]:
        return _flow_solver(c, n, "deis", options)
    sigmas, rounding, steps_t = _multistep_sigmas(c, n, ac, singlestep=False)
    dopts = _discrete(c, ac, timestep_rounding=rounding, timesteps=steps_t, **_threshold_opts(c, False))
    return _vp_plan(c.name, "deis", sigmas, options, dopts)


def _flow_solver(c: _Config, n: int, sampler: str, options: dict, refuse: Optional[tuple] = None) -> SamplingPlan:
    """A solver's ``use_flow_sigmas`` variant (``fastdiff.flow_schedulers``). ``refuse``: (key, value) of a
    noise-prediction form, which diffusers does not define for a flow network (it raises)."""
    if refuse is not None:
        raise UnsupportedConfigError(refuse[0], refuse[1], supported="the data-prediction form with "
                                     "use_flow_sigmas", model=c.name)
    from .flow_schedulers import solver_flow_plan
    return solver_flow_plan(c, n, sampler, options)


def _edm_plan(c: _Config, n: int, sampler: str, options: dict, last_is_config_min: bool = False) -> SamplingPlan:
    """diffusers' EDM schedulers: a Karras / exponential grid on [sigma_min, sigma_max], EDM preconditioning.
    ``final_sigmas_type="sigma_min"`` ends at the grid's last sigma (EDM Euler) or the config's sigma_min (EDM
    DPM-Solver; they differ on a 1-step grid, which is [sigma_max])."""
    kind = c.choice("sigma_schedule", ("karras", "exponential"))
    lo, hi = float(c["sigma_min"]), float(c["sigma_max"])
    if kind == "karras":
        sig = schedules.get_sigmas_karras(n, lo, hi, float(c["rho"])).numpy()[:-1]
    else:
        sig = torch.linspace(math.log(lo), math.log(hi), n).exp().flip(0).numpy()
    final = c.choice("final_sigmas_type", schedules.FINAL_SIGMAS)
    sigmas = _grid(sig, 0.0 if final == "zero" else lo if last_is_config_min else sig[-1])  # _grid: float32 values
    dopts = dict(sigma_data=float(c["sigma_data"]),
                 prediction_type=c.choice("prediction_type", ("epsilon", "v_prediction")))
    return SamplingPlan(c.name, sampler, sigmas, options, "edm", dopts, init_noise_sigma=math.sqrt(hi * hi + 1))


def _edm_euler(c: _Config, n: int) -> SamplingPlan:
    return _edm_plan(c, n, "euler", {})


def _edm_dpm_multistep(c: _Config, n: int) -> SamplingPlan:
    """EDM DPM-Solver++: the multistep solver in the sigma frame itself (its alpha_t is 1)."""
    algo = c.remap("algorithm_type", ("dpmsolver++", "sde-dpmsolver++"), _DPM_ALGORITHM_REWRITES)
    c.refuse_zero_final_unless_plus_plus()
    options = dict(order=c.choice("solver_order", (1, 2, 3)),
                   solver_type=c.remap("solver_type", ("midpoint", "heun"), _DPM_SOLVER_TYPE_REWRITES),
                   lower_order_final=bool(c["lower_order_final"]), euler_at_final=bool(c["euler_at_final"]))
    if c["thresholding"]:
        raise UnsupportedConfigError("thresholding", True, supported=[False], model=c.name)
    if algo == "sde-dpmsolver++":
        options.update(eta=1.0, diffusers_sde3_coefficient=True)
    return _edm_plan(c, n, "dpmpp_2m_sde" if algo == "sde-dpmsolver++" else "dpmpp_2m", options, last_is_config_min=True)


def _tcd(c: _Config, n: int) -> SamplingPlan:
    """TCD: LCM's timesteps; each step's sigma_s from the training table at floor((1 - eta) t_next); the last
    step ends at sigma(t = 0). eta (TCD's gamma) is an option of ``generate`` (diffusers' step default, 0.3)."""
    ac = _alphas_cumprod(c, exact_zero_snr=True)
    table = _table(ac)
    ts = _lcm_timesteps(c, n)
    dopts = _discrete(c, ac, timestep_rounding="round", timesteps=_timestep_map(table[ts], ts))
    return _tcd_plan(c.name, _grid(table[ts], table[0]), [float(t) for t in ts] + [0.0], table, dopts)


def _tcd_plan(name: str, sigmas: torch.Tensor, timesteps: list, table, dopts: dict) -> SamplingPlan:
    """A ``tcd`` plan: gamma 0.3 (diffusers' step default), the training sigma table and the grid's timesteps."""
    options = dict(eta=0.3, sigma_table=_f32(table).tolist(), timesteps=timesteps)
    return _vp_plan(name, "tcd", sigmas, options, dopts)


def tcd_named_plan(sigmas: torch.Tensor, ac: torch.Tensor, denoiser_options: dict) -> SamplingPlan:
    """``sampler="tcd"`` on any grid of a discrete-time model (the Pipeline's named path): the grid's timesteps
    by the table's inverse, and its end moved from 0 to sigma(t = 0), where TCD ends (diffusers and ComfyUI)."""
    table = _table(ac)
    sig = sigmas.tolist()
    if sig[-1] == 0:  # (a grid down to the table's sigma_min: a zero-length last step, not a rising one)
        sig[-1] = min(float(table[0]), sig[-2])
    ts = schedules.sigma_to_timestep(np.asarray(sig[:-1]), ac)
    ts = np.where(np.abs(ts - np.round(ts)) < 1e-3, np.round(ts), ts).tolist() + [0.0]  # float32 sigmas: 599.99999
    return _tcd_plan("named", torch.tensor(sig, dtype=torch.float64), ts, table, denoiser_options)


def _consistency_model(c: _Config, n: int) -> SamplingPlan:
    """Consistency models (CMStochasticIterativeScheduler): Karras sigmas at the 'leading' indices of its
    ``num_train_timesteps`` discretisation, ending at sigma_min; the boundary-shifted EDM preconditioning; x0
    clipped to [-1, 1]; re-noised to sqrt(sigma'^2 - sigma_min^2)."""
    T = c["num_train_timesteps"]
    if n > T:
        raise BadArgumentError(f"num_inference_steps: expected at most num_train_timesteps = {T} for {c.name}, found {n}")
    lo, hi, rho = float(c["sigma_min"]), float(c["sigma_max"]), float(c["rho"])
    ramp = (np.arange(0, n) * (T // n)).astype(np.float64) / (T - 1)
    sig = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    dopts = dict(sigma_data=float(c["sigma_data"]), sigma_offset=lo, noise_scale=250.0,
                 clip_sample=1.0 if c["clip_denoised"] else None)
    options = dict(sigma_floor=lo, s_noise=float(c["s_noise"]))
    return SamplingPlan(c.name, "lcm", _grid(sig, lo), options, "edm", dopts, init_noise_sigma=hi)


def _pndm(c: _Config, n: int) -> SamplingPlan:
    """PLMS with diffusers' timestep arithmetic: every step lands at t - T//N (the final alpha below 0),
    the Euler warm-up's second pass steps from t_1 + T//N, Runge-Kutta stages land at t -/+ T//N//2."""
    ac = _alphas_cumprod(c)
    prediction = c.choice("prediction_type", ("epsilon", "v_prediction"))
    table = _table(ac)
    T = c["num_train_timesteps"]
    ts = _indexed_timesteps(c, n)
    skip_prk = bool(c["skip_prk_steps"])
    if not skip_prk and n < 4:
        raise UnsupportedConfigError("num_inference_steps", n, supported="at least 4 with skip_prk_steps=False "
                                     "(its Runge-Kutta warm-up spans 4 timesteps)", model=c.name)
    r = T // n
    final = 0.0 if c["set_alpha_to_one"] else table[0]

    def sigma_of(t):
        return table[t] if t >= 0 else final

    to = [sigma_of(t - r) for t in ts]
    sigmas = _grid(table[ts], to[-1])
    options = dict(warmup="euler" if skip_prk else "rk4", sigmas_to=_f32(to).tolist())
    evals = {int(t) for t in ts}
    if skip_prk and n > 1:
        options["warmup_from"] = float(_f32([sigma_of(ts[1] + r)])[0])
    if not skip_prk:
        h = T // n // 2
        mids = [int(ts[j + 1]) + h for j in range(3)]
        options["sigmas_mid"] = _f32([table[t] for t in mids]).tolist()
        options["sigmas_mid_to"] = _f32([sigma_of(ts[j] - h) for j in range(3)]).tolist()
        evals.update(mids)
    evals = sorted(evals)
    dopts = _discrete(c, ac, timestep_rounding="round", timesteps=_timestep_map(table[evals], evals))
    if prediction == "v_prediction":
        options["multistep_on"] = "v"
    return _vp_plan(c.name, "plms", sigmas, options, dopts)


def _lms(c: _Config, n: int) -> SamplingPlan:
    return _euler_family(c, n, "lms")


def _lcm_timesteps(c: _Config, n: int) -> np.ndarray:
    """LCM / TCD: ``n`` timesteps taken evenly (by index) from the distillation schedule T // N_orig * k - 1."""
    T, orig = c["num_train_timesteps"], c["original_inference_steps"]
    if not isinstance(orig, int) or not 1 <= orig <= T:
        raise UnsupportedConfigError("original_inference_steps", orig, supported=f"an integer in [1, {T}]",
                                     model=c.name)
    if n > orig:
        raise BadArgumentError(f"num_inference_steps: expected at most original_inference_steps = {orig} for "
                               f"{c.name}, found {n}")
    origin = (np.arange(1, orig + 1) * (T // orig) - 1)[::-1]
    return origin[np.floor(np.linspace(0, orig, num=n, endpoint=False)).astype(np.int64)]


def _lcm(c: _Config, n: int) -> SamplingPlan:
    """LCM: ``n`` timesteps taken evenly (by index) from the distillation schedule of ``original_inference_steps``
    (T // N_orig * k - 1), the consistency boundary scalings at each, fresh noise between steps."""
    from .consistency import lcm_boundary_scalings

    ac = _alphas_cumprod(c, exact_zero_snr=True)       # LCM keeps alphas_cumprod 0 at a zero terminal SNR
    table = _table(ac)
    ts = _lcm_timesteps(c, n)
    scalings = [lcm_boundary_scalings(float(t), float(c["timestep_scaling"])) for t in ts]
    options = dict(c_skip=[a for a, _ in scalings], c_out=[b for _, b in scalings])
    dopts = _discrete(c, ac, timestep_rounding="round", timesteps=_timestep_map(table[ts], ts),
                      **_threshold_opts(c, True))
    return _vp_plan(c.name, "lcm", _grid(table[ts], 0.0), options, dopts)


def _flow_builder(name: str):
    """A builder of ``fastdiff.flow_schedulers``, imported when called (that module uses the helpers here)."""
    def build(c: _Config, n: int) -> SamplingPlan:
        from . import flow_schedulers
        return getattr(flow_schedulers, name)(c, n)
    return build


_BUILDERS = {
    "FlowMatchEulerDiscreteScheduler": _flow_builder("flow_match_euler"),
    "FlowMatchHeunDiscreteScheduler": _flow_builder("flow_match_heun"),
    "FlowMatchLCMScheduler": _flow_builder("flow_match_lcm"),
    "DDIMScheduler": _ddim,
    "DDPMScheduler": _ddpm,
    "EulerDiscreteScheduler": lambda c, n: _euler_family(c, n, "euler"),
    "EulerAncestralDiscreteScheduler": lambda c, n: _euler_family(c, n, "euler_ancestral"),
    "HeunDiscreteScheduler": lambda c, n: _euler_family(c, n, "heun"),
    "DPMSolverMultistepScheduler": _dpm_multistep,
    "DPMSolverSinglestepScheduler": _dpm_singlestep,
    "UniPCMultistepScheduler": _unipc,
    "EDMEulerScheduler": _edm_euler,
    "EDMDPMSolverMultistepScheduler": _edm_dpm_multistep,
    "PNDMScheduler": _pndm,
    "LMSDiscreteScheduler": _lms,
    "LCMScheduler": _lcm,
    "TCDScheduler": _tcd,
    "CMStochasticIterativeScheduler": _consistency_model,
    "DEISMultistepScheduler": _deis,
    # the same method as k-diffusion's dpmpp_sde; its Brownian-tree noise comes from the samples' own generators
    # (diffusers draws it from torchsde with noise_sampler_seed), so samples differ in their noise only
    "DPMSolverSDEScheduler": lambda c, n: _euler_family(c, n, "dpmpp_sde"),
    "KDPM2DiscreteScheduler": lambda c, n: _euler_family(c, n, "dpm_2"),
    "KDPM2AncestralDiscreteScheduler": lambda c, n: _euler_family(c, n, "dpm_2_ancestral"),
}

