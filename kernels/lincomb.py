"""The sampler state update as one fused linear combination: ``out = c0*t0 + c1*t1 + ... + c4*t4``.

A multistep sampler's step is such a combination of the state, the newest model outputs and fresh noise
(DPM-Solver++(2M): ``a*x + b*x0 + c*x0_prev (+ d*noise)``). Written with torch ops it is 3-7 element-wise
kernels per step; this is one, reading each input once. Arithmetic in float32, in the terms' order.

Inputs: 1 to 5 tensors of one shape, dtype (float32 / float16 / bfloat16) and device. Dense tensors with one
set of strides (all contiguous, or all channels-last) are read as flat buffers and the result has their
layout; otherwise every term is made contiguous first (copies) and so is the result.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from fastdiff.errors import BadArgumentError
from fastdiff.utils.layout import dense_alike, same_layout

MAX_TERMS = 5
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK = 1024


@triton.jit
def _lincomb_kernel(
    out_ptr, t0_ptr, t1_ptr, t2_ptr, t3_ptr, t4_ptr,
    c0, c1, c2, c3, c4,
    N,
    N_TERMS: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    acc = tl.load(t0_ptr + offs, mask=mask, other=0.0).to(tl.float32) * c0
    if N_TERMS > 1:
        acc += tl.load(t1_ptr + offs, mask=mask, other=0.0).to(tl.float32) * c1
    if N_TERMS > 2:
        acc += tl.load(t2_ptr + offs, mask=mask, other=0.0).to(tl.float32) * c2
    if N_TERMS > 3:
        acc += tl.load(t3_ptr + offs, mask=mask, other=0.0).to(tl.float32) * c3
    if N_TERMS > 4:
        acc += tl.load(t4_ptr + offs, mask=mask, other=0.0).to(tl.float32) * c4
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def launch_config(numel: int) -> dict:
    """Block size and warps; shared with ``fastdiff.kernels.aot``."""
    return dict(block=BLOCK, num_warps=4, grid=(triton.cdiv(numel, BLOCK),))


def _launches(tensors, coefs, out):
    """[(grid, positional args, constexprs + options)]; also used by the AOT check with meta tensors."""
    n = len(tensors)
    cfg = launch_config(out.numel())
    ptrs = list(tensors) + [tensors[0]] * (MAX_TERMS - n)  # unused pointers are never read
    cs = [float(c) for c in coefs] + [0.0] * (MAX_TERMS - n)
    args = (out, *ptrs, *cs, out.numel())
    return [(cfg["grid"], args, dict(N_TERMS=n, BLOCK=cfg["block"], num_warps=cfg["num_warps"]))]


def _check(terms, out) -> tuple[list, list]:
    if not 1 <= len(terms) <= MAX_TERMS:
        raise BadArgumentError(f"lincomb: expected 1 to {MAX_TERMS} (coefficient, tensor) terms, found {len(terms)}")
    coefs, tensors = [], []
    for i, term in enumerate(terms):
        if not (isinstance(term, (tuple, list)) and len(term) == 2 and isinstance(term[1], torch.Tensor)):
            raise BadArgumentError(f"lincomb: expected term {i} as (float, tensor), found {term!r:.80}")
        coefs.append(float(term[0]))
        tensors.append(term[1])
    t0 = tensors[0]
    if t0.dtype not in _DTYPES:
        raise BadArgumentError(f"lincomb: expected dtype in {_DTYPES}, found {t0.dtype}")
    for i, t in enumerate(tensors[1:], 1):
        if t.shape != t0.shape or t.dtype != t0.dtype or t.device != t0.device:
            raise BadArgumentError(f"lincomb: expected term {i} of shape {tuple(t0.shape)}, {t0.dtype} on {t0.device} "
                                   f"(as term 0), found {tuple(t.shape)}, {t.dtype} on {t.device}")
    if out is not None and (out.shape != t0.shape or out.dtype != t0.dtype or out.device != t0.device):
        raise BadArgumentError(f"lincomb: expected out of shape {tuple(t0.shape)}, {t0.dtype} on {t0.device}, found "
                               f"{tuple(out.shape)}, {out.dtype} on {out.device}")
    if not dense_alike(tensors):
        tensors = [t.contiguous() for t in tensors]
    return coefs, tensors


def lincomb(terms: Sequence[tuple], *, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``sum(c * t for c, t in terms)`` in one kernel; terms: 1-5 ``(float, tensor)`` pairs.

    Returns a new tensor in the terms' layout (see the module docstring), or writes ``out``; ``out`` may be
    one of the inputs: each element is read before it is written.
    """
    coefs, tensors = _check(terms, out)
    fits = out is not None and same_layout(out, tensors[0])
    target = out if fits else torch.empty_like(tensors[0])  # a dense tensor's layout is kept
    if target.numel():
        for grid, args, meta in _launches(tensors, coefs, target):
            _lincomb_kernel[grid](*args, **meta)
    if out is not None and target is not out:
        out.copy_(target)
        return out
    return target
