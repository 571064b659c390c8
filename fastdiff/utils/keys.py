"""Hashable keys by value: what the caches of plans, captured graphs and the Engine's batches are keyed by."""

from __future__ import annotations

import functools
import hashlib
import inspect

import numpy as np
import torch


def freeze(value):
    """A hashable, value-based key: dicts and sequences by content, tensors by shape / dtype and a digest of
    their bytes (NumPy arrays too), functions by code, defaults and closure (a fresh lambda with the same code and
    bound values is the same key), partials by function and arguments, bound methods by function and object, other
    callables by identity (the key holds them).
    A function whose result depends on module globals it reads is keyed by its code alone."""
    if isinstance(value, dict):
        return tuple(sorted((k, freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    if isinstance(value, np.ndarray):  # (an option such as DDIM's sigmas_to may be one)
        digest = hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()
        return ("ndarray", value.shape, str(value.dtype), digest)
    if torch.is_tensor(value):
        flat = value.detach().reshape(-1).cpu().contiguous()
        digest = hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()
        return ("tensor", tuple(value.shape), str(value.dtype), str(value.device), digest)
    if is_pil_image(value):  # (an Engine request's image prompt: equal pictures are one key; a palette is part)
        palette = value.getpalette()
        return ("pil", value.mode, value.size, hashlib.sha256(value.tobytes()).hexdigest(),
                None if palette is None else hashlib.sha256(bytes(palette)).hexdigest(),
                freeze(value.info.get("transparency")))
    if isinstance(value, functools.partial):  # an equal partial made afresh is the same key
        return ("partial", freeze(value.func), freeze(value.args), freeze(value.keywords))
    if inspect.ismethod(value):
        return ("method", freeze(value.__func__), by_identity(value.__self__))
    if inspect.isfunction(value):
        cells = tuple(freeze(c.cell_contents) for c in (value.__closure__ or ()))
        return ("fn", value.__qualname__, value.__code__, freeze(value.__defaults__ or ()),
                freeze(value.__kwdefaults__ or {}), cells)
    if callable(value):
        return ("callable", by_identity(value))
    if isinstance(value, (bool, np.bool_)):  # (True == 1 and hashes alike: a bool option is no number)
        return ("bool", bool(value))
    return value


def by_identity(obj):
    """``obj`` itself where it hashes (objects hash by identity unless they define otherwise), else its id."""
    try:
        hash(obj)
    except TypeError:
        return ("id", id(obj))
    return obj


def is_pil_image(value) -> bool:
    """A PIL image, without importing Pillow for a value that cannot be one."""
    return type(value).__module__.startswith("PIL.") and hasattr(value, "tobytes") and hasattr(value, "mode")
