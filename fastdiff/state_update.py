"""The samplers' state update ``x' = c0*t0 + c1*t1 + ...`` and which implementation runs it.

Multistep samplers (DPM-Solver++ and its SDE / 3M variants) write each step as one linear combination of
the state, the newest model outputs and fresh noise, with coefficients worked out on the host. ``combine``
runs it with the implementation of the current context:

- ``torch`` (default): a multiply and one ``add_`` per further term (2-5 element-wise kernels);
- ``triton``: ``fastdiff.kernels.lincomb``, one kernel;
- ``cuda_ext``: the CUDA extension's ``sampler_update`` (one kernel for up to four terms; Triton where the
  extension is not built).

The choice is the ``sampler_update`` entry of the per-op kernel table (``OptimizeConfig.kernel_ops``); a
Pipeline enters ``update_impl(...)`` around its sampling, so a captured loop graph holds the chosen kernels.
A context variable (not a global) keeps two pipelines in two threads from seeing each other's choice.
float64 states (reference runs) always take the torch path.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Sequence

import torch

from .errors import BadArgumentError
from .utils.layout import dense_alike

UPDATE_IMPLS = ("torch", "triton", "cuda_ext")
_IMPL: contextvars.ContextVar = contextvars.ContextVar("fastdiff_state_update", default="torch")


@contextlib.contextmanager
def update_impl(impl: str) -> Iterator[None]:
    """Run the state updates inside the block with ``impl`` ("torch" | "triton" | "cuda_ext")."""
    if impl not in UPDATE_IMPLS:
        raise BadArgumentError(f"sampler_update: expected one of {UPDATE_IMPLS}, found {impl!r}")
    token = _IMPL.set(impl)
    try:
        yield
    finally:
        _IMPL.reset(token)


def current_impl() -> str:
    return _IMPL.get()


def combine_torch(terms: Sequence[tuple]) -> torch.Tensor:
    """The plain-torch update (also the oracle of the fused ones)."""
    (c0, t0), rest = terms[0], terms[1:]
    if rest and c0 == 1.0:
        out = torch.add(t0, rest[0][1], alpha=rest[0][0])
        rest = rest[1:]
    else:
        out = t0 * c0
    for c, t in rest:
        out.add_(t, alpha=c)
    return out


def combine(terms: Sequence[tuple]) -> torch.Tensor:
    """``sum(c * t for c, t in terms)`` for 1-5 ``(host float, tensor)`` terms of one shape and dtype, with
    the implementation of the current ``update_impl`` context. Returns a new tensor.

    Falls back to torch where a fused kernel would need copies first (terms in different layouts), for
    float64 and single terms; ``cuda_ext`` falls back to Triton where the extension is not built or the
    tensors are not on a GPU (as GroupNorm's ``cuda_ext`` choice does)."""
    impl = _IMPL.get()
    t0 = terms[0][1]
    if impl == "torch" or t0.dtype == torch.float64 or len(terms) < 2 or not dense_alike([t for _, t in terms]):
        return combine_torch(terms)
    if impl == "cuda_ext":
        from . import cuda_ext

        if t0.is_cuda and t0.is_contiguous() and cuda_ext.HAS_CUDA_EXT:  # it makes its inputs contiguous
            return _combine_cuda_ext(cuda_ext, terms)
    from .kernels import lincomb

    return lincomb(terms)


def _combine_cuda_ext(cuda_ext, terms) -> torch.Tensor:
    """The extension's ``sampler_update(x, x0, prev, noise, a, b, c, d)``; a fifth term is added after it."""
    (a, x), (b, x0) = terms[0], terms[1]
    prev, c = terms[2][1] if len(terms) > 2 else None, terms[2][0] if len(terms) > 2 else 0.0
    noise, d = terms[3][1] if len(terms) > 3 else None, terms[3][0] if len(terms) > 3 else 0.0
    out = cuda_ext.sampler_update(x, x0, prev, noise, a, b, c, d)
    for cf, t in terms[4:]:
        out.add_(t, alpha=cf)
    return out
