"""Scaled dot-product attention forward through TMA tensor descriptors (Hopper and newer; opt-in).

The same online-softmax algorithm as ``fastdiff.kernels.attention``, with q, k, v read and the output written
through host-side tensor descriptors (``triton.tools.tensor_descriptor.TensorDescriptor``). On sm_90 Triton
lowers descriptor loads to TMA bulk copies into shared memory, which the wgmma tensor-core instructions read
directly, with mbarrier-based pipelining: no per-thread address arithmetic, no register staging. The
descriptor's out-of-bounds handling also does the padding: a head dim of 40 is read as a 64-wide tile whose
last 24 columns the copy engine fills with zeros, and rows past the sequence end come back as zeros, so no
load needs a mask; the output store is clipped the same way.

Each of q, k, v and the output is described as the 4-D (B, H, N, D) tensor it is (any strides), so the
projection views the models pass (heads interleaved in a (B, N, H * D) buffer) need no copy. TMA needs
16-byte aligned bases and strides (``supported``); the launcher falls back to the pointer kernel otherwise.

Not measured on a GPU yet: ``kernel_ops={"attention": "triton_tma"}`` selects it, bench ``+tma``.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from fastdiff.errors import BackendUnavailableError

_LOG2E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _descriptor_class():
    """Triton's host tensor descriptor (triton >= 3.4), or None."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        return None
    return TensorDescriptor


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# head dims up to 128 (a 128-wide tile): at 129-256 no tile of the autotuner fits in an H100's shared memory
MAX_HEAD_DIM = 128


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: Optional[torch.Tensor] = None) -> tuple:
    """(ok, reason): whether this kernel can run these tensors here: a Hopper-or-newer GPU (half precision; fp32
    stays on the pointer kernel's small tiles) or the interpreter, a triton with tensor descriptors, head dims
    up to ``MAX_HEAD_DIM``, and TMA's 16-byte aligned bases and non-zero strides with a unit head-dim stride."""
    if _descriptor_class() is None:
        return False, f"triton {triton.__version__} has no host tensor descriptors (needs >= 3.4)"
    on_gpu = q.is_cuda and not _interpreting()
    if on_gpu:
        major, _ = torch.cuda.get_device_capability(q.device)
        if major < 9:
            return False, f"TMA needs compute capability >= 9.0, found {major}.x"
    if q.shape[-1] > MAX_HEAD_DIM:
        return False, f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}: no tile fits in shared memory"
    for name, t in (("q", q), ("k", k), ("v", v), ("out", out)):
        if t is None:
            continue
        if t.dtype not in _DTYPES or (on_gpu and t.dtype == torch.float32):
            return False, f"{name}: dtype {t.dtype} has no TMA path here"
        strides = t.stride()[:3]
        if (t.stride(3) != 1 or t.data_ptr() % 16 or any((s * t.element_size()) % 16 for s in strides)
                or 0 in strides):
            return False, f"{name}: TMA needs a unit head-dim stride and 16-byte aligned base and non-zero " \
                          f"strides, found strides {t.stride()} ({t.element_size()}-byte elements)"
    if out is None and (q.shape[-1] * q.element_size()) % 16:  # (the (B, Nq, H, D) output it allocates itself)
        return False, f"out: the output's rows of {q.shape[-1]} {q.element_size()}-byte elements are not 16-byte " \
                      f"aligned, as TMA needs"
    return True, "ok"


@triton.jit
def _attention_tma_kernel(
    q_desc, k_desc, v_desc, o_desc,
    H, NQ, NK,  # NQ: only the autotuner's key (the descriptors know the bounds)
    DT,  # the dtype's code, only the autotuner's key: descriptors carry no dtype it could key on
    qk_scale,  # softmax scale * log2(e) >= 0: the softmax runs in base 2
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    start_m = pid_m * BLOCK_M
    # (BLOCK_M, BLOCK_D): rows past Nq and columns past D arrive as zeros (the descriptor's bounds)
    q = q_desc.load([b, h, start_m, 0]).reshape(BLOCK_M, BLOCK_D)
    out_dtype = q.dtype
    if DOT_FP32:  # the interpreter's bfloat16 dot (see fastdiff.kernels.attention)
        q = q.to(tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, NK, BLOCK_N):
        k = k_desc.load([b, h, start_n, 0]).reshape(BLOCK_N, BLOCK_D)  # (BLOCK_N, BLOCK_D), zeros past Nk
        if DOT_FP32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N), raw scores
        if not EVEN_N:  # keys past Nk were read as zeros: they must not take part in the softmax
            s = tl.where((start_n + offs_n < NK)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.where(m_i == float("-inf"), 0.0, tl.exp2((m_i - m_new) * qk_scale))
        p = tl.exp2(s * qk_scale - (m_new * qk_scale)[:, None])
        if not EVEN_N:
            p = tl.where((start_n + offs_n < NK)[None, :], p, 0.0)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = v_desc.load([b, h, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        if DOT_FP32:  # P rounded to the input dtype either way (as FlashAttention does)
            p_in = p.to(out_dtype).to(tl.float32)
            v = v.to(tl.float32)
        else:
            p_in = p.to(v.dtype)
        acc = tl.dot(p_in, v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    acc = acc / l_i[:, None]
    # rows past Nq and columns past D are clipped by the descriptor's bounds
    o_desc.store([b, h, start_m, 0], acc.to(out_dtype).reshape(1, 1, BLOCK_M, BLOCK_D))


# (BLOCK_M, BLOCK_N, num_warps, num_stages): FlashAttention-2 / Triton-tutorial tilings for Hopper, and a 64-row
# tile for DiT-XL/2's short sequences (256 tokens x 32 (batch, head) pairs: 64 programs at BLOCK_M=128)
_TUNED_TILES = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 4), (64, 128, 4, 3)]
_tuned = None


def _set_block_shapes(nargs) -> None:
    """Autotuner pre-hook: the descriptors' boxes follow the tile being tried."""
    bm, bn, bd = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_D"]
    nargs["q_desc"].block_shape = [1, 1, bm, bd]
    nargs["o_desc"].block_shape = [1, 1, bm, bd]
    nargs["k_desc"].block_shape = [1, 1, bn, bd]
    nargs["v_desc"].block_shape = [1, 1, bn, bd]


def _attention_tuned():
    """The autotuned kernel, built on first use (no GPU driver is asked for at import)."""
    global _tuned
    if _tuned is None:
        _tuned = triton.autotune(
            configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st,
                                   pre_hook=_set_block_shapes) for bm, bn, w, st in _TUNED_TILES],
            key=["NQ", "NK", "DT", "BLOCK_D"],
        )(triton.heuristics({"EVEN_N": lambda a: a["NK"] % a["BLOCK_N"] == 0})(_attention_tma_kernel))
    return _tuned


def launch_config(nq: int, nk: int, d: int, dtype: torch.dtype, device_type: str = "cuda") -> dict:
    """The fixed tiles (the interpreter, and the AOT check's default configuration); shared with
    ``fastdiff.kernels.aot``."""
    block_d = max(16, triton.next_power_of_2(d))
    if device_type == "cuda":
        block_m, block_n, num_warps, num_stages = (128 if block_d <= 64 else 64), 64, 4, 3
    else:
        block_m, block_n, num_warps, num_stages = 64, 64, 4, 1
    block_m = max(16, min(block_m, triton.next_power_of_2(nq)))
    block_n = max(16, min(block_n, triton.next_power_of_2(nk)))
    return dict(block_m=block_m, block_n=block_n, block_d=block_d, num_warps=num_warps, num_stages=num_stages,
                even_n=nk % block_n == 0, dot_precision="ieee" if dtype == torch.float32 else "tf32")


def _launches(q, k, v, out, scale, device_type, interpret: Optional[bool] = None):
    """[(grid, positional args, constexprs + launch options)] with the fixed tiles; also used by the AOT check
    (``interpret=False``: the compiled kernel; None: whether this process interprets, CUDA tensors included)."""
    desc = _descriptor_class()
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    sm_scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    cfg = launch_config(NQ, NK, D, q.dtype, device_type)
    bm, bn, bd = cfg["block_m"], cfg["block_n"], cfg["block_d"]
    descs = [desc(t, list(t.shape), list(t.stride()), [1, 1, n, bd])
             for t, n in ((q, bm), (k, bn), (v, bn), (out, bm))]
    grid = (triton.cdiv(NQ, bm), B * H)
    args = (*descs, H, NQ, NK, _DTYPES.index(q.dtype), sm_scale * _LOG2E)
    meta = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, EVEN_N=cfg["even_n"], DOT_PRECISION=cfg["dot_precision"],
                DOT_FP32=q.dtype == torch.bfloat16 and (_interpreting() if interpret is None else interpret),
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return [(grid, args, meta)]


def attention_tma(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None, *,
                  out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax(q k^T * scale) v through TMA descriptors; q (B, H, Nq, D), k / v (B, H, Nk, D).

    Same contract as ``fastdiff.kernels.attention`` (the output stored as (B, Nq, H, D), or ``out``). Raises
    ``BackendUnavailableError`` where ``supported`` says no: callers that want a fallback check it first.
    """
    from .attention import _AUTOTUNED, _check

    _check(q, k, v, out)
    if scale is not None and scale < 0:  # the running maximum assumes a non-negative scale (as attention.py)
        q, scale = -q, -scale
    if out is None:
        B, H, NQ, D = q.shape
        out = torch.empty((B, NQ, H, D), device=q.device, dtype=q.dtype).transpose(1, 2)
    ok, why = supported(q, k, v, out)
    if not ok:
        raise BackendUnavailableError(f"attention_tma: {why}")
    if out.numel() == 0:
        return out
    for grid, args, meta in _launches(q, k, v, out, scale, q.device.type):
        if q.is_cuda and not _interpreting():
            tuned = {name: val for name, val in meta.items() if name not in _AUTOTUNED}
            _attention_tuned()[lambda m: (triton.cdiv(q.shape[2], m["BLOCK_M"]), grid[1])](*args, **tuned)
        else:
            _attention_tma_kernel[grid](*args, **meta)
    return out
