"""The Engine's requests: what one ``submit`` holds, the cheap checks made on it at submit time, its own copies of
the caller's tensors and options, and the key that says which requests can share one ``generate`` call.
"""

from __future__ import annotations

import concurrent.futures
import operator
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from ..errors import BadArgumentError
from ..utils.keys import by_identity, freeze
from ..utils.checks import finite_host_values


@dataclass
class Request:
    seed: int
    class_label: Optional[int]
    encoder_hidden_states: Optional[torch.Tensor]
    negative_encoder_hidden_states: Optional[torch.Tensor]
    cfg_scale: float                # per sample: guided requests of different scales share a batch
    params: Dict[str, Any]          # steps, sampler, schedule, height, width, options: shared by a batch
    added: Dict[str, torch.Tensor]  # text_embeds / time_ids (and negatives), guidance given: one row each
    key: tuple
    future: concurrent.futures.Future
    guidance_rescale: Optional[float] = None  # per sample as cfg_scale (None: not given, 0 in a batch with others)
    classifier_scale: Optional[float] = None  # per sample as cfg_scale (None: the pipeline's)
    t_submit: float = field(default_factory=time.perf_counter)
    in_flight: bool = False         # taken by the worker and counted in Engine._in_flight


def as_int(name: str, value, *, minimum: Optional[int] = None, allow_none: bool = False) -> Optional[int]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or (torch.is_tensor(value) and value.numel() != 1):
        raise BadArgumentError(f"{name}: expected an integer, found {value!r}")
    try:
        v = operator.index(value.item() if torch.is_tensor(value) else value)
    except TypeError:
        raise BadArgumentError(f"{name}: expected an integer, found {type(value).__name__} {value!r}") from None
    if minimum is not None and v < minimum:
        raise BadArgumentError(f"{name}: expected an integer >= {minimum}, found {v}")
    return v


def _known_names(module: str, attr: str):
    """A registry of names (samplers, schedules) if that module is there; None means "don't check"."""
    try:
        import importlib

        names = getattr(importlib.import_module(module), attr)
    except Exception:  # the module may not exist yet, or fail to import: generate will judge then
        return None
    return tuple(names)


def check_name(name: str, value, module: str, attr: str):
    if value is None or callable(value):
        return value
    if not isinstance(value, str):
        raise BadArgumentError(f"{name}: expected a name (str), found {type(value).__name__} {value!r}")
    known = _known_names(module, attr)
    if known is not None and value not in known:
        raise BadArgumentError(f"{name}: expected one of {sorted(known)}, found {value!r}")
    return value


def check_states(name: str, states) -> Optional[torch.Tensor]:
    if states is None:
        return None
    if not torch.is_tensor(states):
        raise BadArgumentError(f"{name}: expected a (M, D) tensor for one request, found {type(states).__name__}")
    if states.dim() != 2:
        raise BadArgumentError(f"{name}: expected a (M, D) tensor for one request (the Engine stacks requests "
                               f"into (B, M, D)), found shape {tuple(states.shape)}")
    if not states.is_floating_point():
        raise BadArgumentError(f"{name}: expected a floating-point tensor, found {states.dtype}")
    finite_host_values(name, states)
    return states


def check_row(name: str, value) -> torch.Tensor:
    """One request's row of ``_ADDED_INPUTS``: a 1-d tensor of numbers (a list or an array accepted)."""
    try:
        t = value if torch.is_tensor(value) else torch.as_tensor(value, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError):
        raise BadArgumentError(f"{name}: expected a 1-d tensor or a list of numbers for one request, found "
                               f"{type(value).__name__} {value!r}") from None
    if t.dim() != 1 or not t.is_floating_point() and t.dtype not in (torch.int32, torch.int64):
        raise BadArgumentError(f"{name}: expected a 1-d tensor of numbers for one request (the Engine stacks "
                               f"requests into (B, ...)), found shape {tuple(t.shape)}, {t.dtype}")
    return t


def own_copy(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A request's own copy of a tensor it was given: the caller may reuse its buffer once ``submit`` returns,
    while the request waits for its batch (a copy on the tensor's device; text states are a few hundred KB)."""
    return None if t is None else t.detach().clone()


def _states_key(states: Optional[torch.Tensor]):
    # Stacking needs the same shape, dtype and device.
    return None if states is None else (tuple(states.shape), states.dtype, str(states.device))


def own_option(value):
    """A ``submit`` option as the request keeps it: tensors, arrays (DDIM's ``sigmas_to``, say) and PIL images (an
    image prompt, a mask: keyed by their pixels, so a caller that draws on its image after ``submit`` would change
    the request, and its batch-mates', which run the first request's options) copied, inside lists and tuples too."""
    from ..utils.keys import is_pil_image

    if torch.is_tensor(value):
        return value.detach().clone()
    if isinstance(value, np.ndarray):
        return value.copy()
    if is_pil_image(value):
        return value.copy()
    if isinstance(value, dict):
        return {k: own_option(v) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
        return type(value)(*(own_option(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(own_option(v) for v in value)
    return value


NO_KEY = object()  # option_key of a value no key can be made of (None is an option's value, and its own key)


def option_key(value):
    """A hashable key of one option by value (``utils.keys.freeze``); a callable whose closure holds something
    unhashable by identity, as before; ``NO_KEY`` for a value no key can be made of."""

    try:
        key = freeze(value)
        hash(key)
        return key
    except (TypeError, RuntimeError, ValueError):  # (an unhashable leaf; a sparse tensor's bytes)
        return ("callable", by_identity(value)) if callable(value) else NO_KEY


def group_key(r: Request) -> tuple:
    """Requests with equal keys can share one ``generate`` call without changing any sample."""
    p = r.params
    sampler = p["sampler"]
    sampler = ("callable", id(sampler)) if callable(sampler) else sampler
    schedule = p["schedule"]
    schedule = ("callable", id(schedule)) if callable(schedule) else schedule
    return (p["height"], p["width"], p["steps"], sampler, schedule, p.get("guided", r.cfg_scale != 1.0),
            r.class_label is None, _states_key(r.encoder_hidden_states),
            _states_key(r.negative_encoder_hidden_states), p["options_key"],
            tuple((k, _states_key(v)) for k, v in sorted(r.added.items())))


def rescales_of(reqs: List[Request]) -> dict:
    """generate's ``guidance_rescale``, one per sample, where a request of the batch gave one (0: none)."""
    given = [r.guidance_rescale for r in reqs]
    if all(v is None for v in given):
        return {}  # (a pipe of the Engine's protocol need not take it)
    return {"guidance_rescale": [0.0 if v is None else v for v in given]}


def classifier_scales_of(reqs: List[Request], pipe) -> dict:
    """generate's ``classifier_scale``, one per sample, where a request of the batch gave one (the pipeline's
    ``classifier_scale`` for the others)."""
    given = [r.classifier_scale for r in reqs]
    if all(v is None for v in given):
        return {}  # (a pipe of the Engine's protocol need not take it)
    default = getattr(pipe, "classifier_scale", 1.0)
    return {"classifier_scale": [default if v is None else v for v in given]}
