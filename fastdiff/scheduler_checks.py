"""A diffusers scheduler config checked when a model loads (a pipeline folder's ``scheduler_config.json``, or
``load(..., scheduler=)``), instead of at the first ``generate()``."""

from __future__ import annotations

import numbers

from .errors import FastdiffError, UnsupportedConfigError
from .scheduler_config import _CLASS_KEYS, _COMMON, _DEFAULTS, effective_config, plan_from_scheduler_config

# keys of diffusers 0.42's other scheduler classes (fastdiff runs none of those): a config may carry them
KNOWN_OTHER_KEYS = frozenset((
    "alpha_cum_end", "alpha_cum_start", "block_length", "correct_steps", "corrector_k", "corrector_order",
    "corrector_selection", "corrector_selection_tau", "corrector_steps", "editing_threshold", "entropy_bound", "eps",
    "eta", "final_step_size_scale", "gamma", "gamma_cum_end", "gamma_cum_start", "mask_token_id", "masking_schedule",
    "minimal_topk", "n_grid", "noise_mode", "num_inference_steps", "num_policy_substeps", "num_vec_classes",
    "predictor_order", "s", "s_churn", "s_max", "s_min", "sampling_eps", "scaler", "schedule_mode", "scheduler_type",
    "snr", "snr_shift_scale", "stage_range", "stages", "t_lim_ode", "t_lim_ode_below", "t_max", "t_min",
    "tail_step_multiplier", "tail_steps", "tau_func", "threshold", "tsr_k", "tsr_sigma"))

# the value types of config keys, checked at load (JSON written by hand: "1000" where a number goes fails at the first
# generate() with torch's TypeError otherwise, and "false" reads as True)
_INT_KEYS = ("num_train_timesteps", "steps_offset", "solver_order", "original_inference_steps",
             "base_image_seq_len", "max_image_seq_len")
_NUMBER_KEYS = ("beta_start", "beta_end", "dynamic_thresholding_ratio", "sample_max_value", "clip_sample_range",
                "sigma_min", "sigma_max", "sigma_data", "rho", "flow_shift", "shift", "shift_terminal",
                "timestep_scale", "s_noise", "base_shift", "max_shift")
_BOOL_KEYS = ("thresholding", "clip_sample", "rescale_betas_zero_snr", "use_karras_sigmas", "use_exponential_sigmas",
              "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas", "use_dynamic_shifting", "set_alpha_to_one",
              "skip_prk_steps", "lower_order_final", "euler_at_final", "predict_x0", "clip_denoised")


def check_scheduler_config(config: dict) -> list:
    """A scheduler config checked when it is loaded, not at the first ``generate()``: the value types of the keys
    fastdiff reads (refused), and the plan it makes (its choices: beta_schedule, solver_type, ...), for a class fastdiff
    runs. Returns notes: a plan refused, and keys no diffusers scheduler reads (a typo such as ``prediction_typ``
    samples as if it were absent, as diffusers ignores it)."""
    if not isinstance(config, dict):
        raise UnsupportedConfigError("scheduler config", type(config).__name__, supported="a JSON object")
    for key, value in config.items():
        if value is None or key.startswith("_"):
            continue
        if key in _INT_KEYS and (isinstance(value, bool) or not isinstance(value, int)):
            raise UnsupportedConfigError(key, value, supported="an integer", model="scheduler")
        if key in _NUMBER_KEYS and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
            raise UnsupportedConfigError(key, value, supported="a number", model="scheduler")
        if key in _BOOL_KEYS and not isinstance(value, bool):
            raise UnsupportedConfigError(key, value, supported="true or false", model="scheduler")
    notes = []
    if config.get("_class_name") in _DEFAULTS:
        # (a choice the plan refuses is a note, not an error: the model still samples with sampler= and a schedule)
        effective = effective_config(config) or {}
        # the identity shift where the class takes one (a resolution's own comes at generate()): exp(0), or 1 / 1
        mu = (1.0 if effective.get("time_shift_type") == "linear" else 0.0) if effective.get(
            "use_dynamic_shifting") else None
        steps = min(4, config.get("original_inference_steps") or 4)  # (LCM: no more steps than it was distilled at)
        try:
            plan_from_scheduler_config(config, max(1, steps), mu=mu)
        except FastdiffError as e:
            notes.append(f"the scheduler config cannot run as it is: {e}")
        except (TypeError, ValueError, ArithmeticError) as e:  # (a value of the right type the plan cannot use)
            raise UnsupportedConfigError("scheduler config", f"{type(e).__name__}: {e}"[:200],
                                         supported="values diffusers' scheduler accepts",
                                         model=config.get("_class_name")) from e
    known = frozenset(_COMMON) | _CLASS_KEYS | KNOWN_OTHER_KEYS
    unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
    if unknown:
        notes.append(f"scheduler config keys no scheduler reads (ignored, as diffusers ignores them): {unknown}")
    return notes
