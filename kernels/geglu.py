"""GEGLU: ``h * gelu(gate)`` for ``[h | gate] = x`` split on the last dim (Stable Diffusion's feed-forward).

torch runs it as two element-wise kernels over the (tokens, inner) halves: a GELU of the gate, then the
product, reading the projection's output and writing it back 2.5 times over. This reads it once and writes
the (tokens, inner) result once. Exact (erf) GELU, as diffusers' GEGLU; arithmetic in float32.

x: (..., 2 * inner) with a unit-stride last dim and rows of 2 * inner (a non-contiguous x is copied first);
float32 / float16 / bfloat16. Returns (..., inner) in x's dtype, contiguous.
"""

from __future__ import annotations

from typing import Optional

import math

import torch
import triton
import triton.language as tl

from fastdiff.errors import BadArgumentError

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _geglu_kernel(x_ptr, out_ptr, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) token rows
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) of the inner dim
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    base = x_ptr + rows[:, None].to(tl.int64) * (2 * N) + cols[None, :]
    h = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(base + N, mask=mask, other=0.0).to(tl.float32)
    y = h * (0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476)))
    tl.store(out_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


def launch_config(m: int, n: int) -> dict:
    """Tiles and warps; shared with ``fastdiff.kernels.aot``."""
    block_n = min(triton.next_power_of_2(n), 1024)
    block_m = max(1, min(triton.next_power_of_2(m), 4096 // block_n))
    return dict(block_m=block_m, block_n=block_n, num_warps=8 if block_m * block_n >= 4096 else 4)


def _launches(x2d, out2d):
    """[(grid, positional args, constexprs + options)] for (M, 2N) -> (M, N); also used by the AOT check."""
    M, N = out2d.shape
    cfg = launch_config(M, N)
    grid = (triton.cdiv(M, cfg["block_m"]), triton.cdiv(N, cfg["block_n"]))
    return [(grid, (x2d, out2d, M, N), dict(BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"],
                                            num_warps=cfg["num_warps"]))]


def geglu(x: torch.Tensor, *, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``h * gelu(gate)`` with ``h, gate = x.chunk(2, dim=-1)``, in one kernel."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] % 2:
        found = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise BadArgumentError(f"geglu: expected x of shape (..., 2 * inner), found {found}")
    if x.dtype not in _DTYPES:
        raise BadArgumentError(f"geglu: expected x dtype in {_DTYPES}, found {x.dtype}")
    shape = x.shape[:-1] + (x.shape[-1] // 2,)
    if out is not None and (tuple(out.shape) != tuple(shape) or out.dtype != x.dtype or out.device != x.device):
        raise BadArgumentError(f"geglu: expected out of shape {tuple(shape)}, {x.dtype} on {x.device}, found "
                               f"{tuple(out.shape)}, {out.dtype} on {out.device}")
    x2d = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # (not -1: a zero-width x has no inferable rows)
    if x2d.stride(-1) != 1 or (x2d.shape[0] > 1 and x2d.stride(0) != x2d.shape[1]):
        x2d = x2d.contiguous()
    target = out if out is not None and out.is_contiguous() else torch.empty(shape, device=x.device, dtype=x.dtype)
    if target.numel():
        for grid, args, meta in _launches(x2d, target.view(-1, shape[-1])):
            _geglu_kernel[grid](*args, **meta)
    if out is not None and target is not out:
        out.copy_(target)
        return out
    return target
