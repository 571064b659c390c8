"""The sampling entry point: what the Pipeline calls.

Two ways in, both ending in ``sample(...)``:

1. From a diffusers ``scheduler_config.json`` (reproduces that scheduler)::

       from fastdiff.sampling import plan_from_scheduler_config, NoiseSource
       plan = plan_from_scheduler_config(config_dict, num_inference_steps=30)
       denoiser = plan.make_denoiser(model)                          # D(x, sigma, **cond) -> x0
       denoiser = CFGDenoiser(denoiser, guidance_scale=7.5)           # optional, fastdiff.denoiser
       src = NoiseSource(seeds, device)                               # one generator per sample
       latents = src.randn(latent_shape)                              # or the user's latents=
       images = plan.sample(denoiser, latents, noise=src, extra_args=dict(encoder_hidden_states=c,
                            uncond=dict(encoder_hidden_states=u)))

2. From names (k-diffusion / ComfyUI vocabulary)::

       sigmas = get_sigmas("karras", 20, alphas_cumprod=ac)            # host float64, ends in 0
       x = src.randn(latent_shape) * sigmas[0]                         # (or sqrt(1 + sigma0^2): VP start)
       x0 = sample(denoiser, x, "dpmpp_2m", sigmas, noise=src)

``sample`` validates the sampler name and its options (``BadArgumentError`` lists what is accepted) and
dispatches to ``fastdiff.samplers.SAMPLERS``.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers

from .errors import BadArgumentError
from .noise import NoiseSource  # noqa: F401  (re-exported for the Pipeline)
from .samplers import SAMPLERS, STOCHASTIC  # noqa: F401
from .scheduler_config import SamplingPlan, load_scheduler_config, plan_from_scheduler_config  # noqa: F401
from .schedules import SCHEDULES, get_sigmas  # noqa: F401

__all__ = ["sample", "sampler_options", "get_sigmas", "SCHEDULES", "SAMPLERS", "STOCHASTIC", "NoiseSource",
           "SamplingPlan", "plan_from_scheduler_config", "load_scheduler_config"]

_COMMON_ARGS = {"denoiser", "x", "sigmas", "extra_args", "noise", "callback", "after_step"}


def sampler_options(name: str) -> list:
    """The keyword options sampler ``name`` accepts (beyond the common ones)."""
    return list(_sampler_options(name))


@functools.lru_cache(maxsize=None)
def _parameters(name: str):
    """The keyword parameters of sampler ``name``, read from its signature once (thin aliases such as
    dpmpp_3m -> dpmpp_2m take their target's)."""
    fn = _lookup(name)
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        params = inspect.signature(_alias_target(fn)).parameters
    return params


def _sampler_options(name: str) -> tuple:
    return tuple(sorted(k for k in _parameters(name) if k not in _COMMON_ARGS))


def _scalar(v):
    """A one-element tensor as its Python number (options may come as 0-d tensors); anything else as is."""
    return v.item() if hasattr(v, "numel") and v.numel() == 1 and not v.is_complex() else v


# scalar option annotations and the values they accept (bool is an int to Python, never a number here)
_SCALAR_KINDS = {
    "float": ("a number", lambda v: isinstance(_scalar(v), numbers.Real) and not isinstance(_scalar(v), bool)),
    "int": ("an integer", lambda v: isinstance(_scalar(v), numbers.Integral) and not isinstance(_scalar(v), bool)),
    "bool": ("True or False", lambda v: type(v).__name__ in ("bool", "bool_") or (isinstance(v, int) and v in (0, 1))),
    "str": ("a string", lambda v: isinstance(v, str)),
    "Sequence[int]": ("a list of step indices", lambda v: isinstance(v, (list, tuple)) and all(
        isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in v)),
}
# noise amounts: a negative one has no meaning (sde samplers divide by 1 + eta: eta = -1 divided by zero)
_NON_NEGATIVE = ("eta", "s_noise", "s_churn")


def check_options(sampler: str, options: dict) -> None:
    """BadArgumentError for an option ``sampler`` does not take (listing those it does), a scalar option of
    the wrong type (``eta="x"``) or a NaN value."""
    unknown = sorted(set(options) - set(sampler_options(sampler)))
    if unknown:
        raise BadArgumentError(f"sampler {sampler!r}: unknown option(s) {unknown}; expected among "
                               f"{sampler_options(sampler)}")
    kinds = _option_annotations(sampler)
    for k, v in options.items():
        expected, accepts = _SCALAR_KINDS.get(kinds.get(k), (None, None))
        if accepts is not None and not accepts(v):
            raise BadArgumentError(f"sampler {sampler!r}: option {k!r}: expected {expected}, found {v!r}")
    nan = sorted(k for k, v in options.items() if isinstance(_scalar(v), numbers.Real) and math.isnan(_scalar(v)))
    if nan:  # a NaN eta / churn compares False everywhere and would silently pick one branch
        raise BadArgumentError(f"sampler {sampler!r}: option(s) {nan} are NaN; expected numbers")
    negative = sorted(k for k in _NON_NEGATIVE if isinstance(_scalar(options.get(k)), numbers.Real)
                      and _scalar(options[k]) < 0)
    if negative:
        raise BadArgumentError(f"sampler {sampler!r}: option(s) {negative} must be >= 0 (noise amounts), found "
                               f"{[options[k] for k in negative]}")


def _option_annotations(name: str) -> dict:
    """{option: its annotation as written} (a string: the samplers use postponed annotations)."""
    return {k: p.annotation for k, p in _parameters(name).items() if isinstance(p.annotation, str)}


def sample(denoiser, x, sampler: str, sigmas, *, extra_args=None, noise=None, callback=None, after_step=None,
           **options):
    """Run sampler ``sampler`` from state ``x`` at ``sigmas[0]`` down the host grid ``sigmas``. ``after_step(x,
    sigma, last) -> x`` sees every state a step hands on (``fastdiff.sampler_base._after``)."""
    fn = _lookup(sampler)
    check_options(sampler, options)
    return fn(denoiser, x, sigmas, extra_args=extra_args, noise=noise, callback=callback, after_step=after_step,
              **options)


def _lookup(name: str):
    fn = SAMPLERS.get(name)
    if fn is None:
        raise BadArgumentError(f"sampler: expected one of {sorted(SAMPLERS)}, found {name!r}")
    return fn


def _alias_target(fn):
    from . import samplers
    return {samplers.sample_dpmpp_3m: samplers.sample_dpmpp_2m,
            samplers.sample_dpmpp_3m_sde: samplers.sample_dpmpp_2m_sde}.get(fn, fn)
