"""torch SDPA with its backend pinned, for the benches: issue 4's attention goal names SDPA's *flash* backend,
and on Hopper with torch 2.11 SDPA's own choice is cuDNN's kernel, so both are timed."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdiff.errors import BackendUnavailableError
from fastdiff.models.layers import SDPA_BACKENDS, sdpa_context


def pinned_sdpa(q, k, v, names=("flash", "efficient", "cudnn")) -> dict:
    """``{"sdpa <name>": fn}``: SDPA restricted to each backend in ``names`` that this torch has. A backend that
    cannot run the problem raises from fn (torch's "No available kernel"); callers report it as unavailable."""
    out = {}
    for name in names:
        try:
            sdpa_context(name)  # only built here to learn whether this torch has the backend
        except BackendUnavailableError:
            continue

        def fn(name=name):
            with sdpa_context(name):
                return F.scaled_dot_product_attention(q, k, v)

        out[f"sdpa {name}"] = fn
    return out


def chosen_backend(q, k, v) -> str:
    """The backend SDPA picks by itself for (q, k, v), lower-case (``flash``, ``cudnn``, ...)."""
    try:
        from torch.nn.attention import SDPBackend

        name = SDPBackend(torch._fused_sdp_choice(q, k, v)).name
    except Exception as e:  # private API: report instead of failing
        return f"unknown ({type(e).__name__})"
    by_enum = {v: k for k, v in SDPA_BACKENDS.items()}
    return by_enum.get(name, name.lower())
