"""Scaled dot-product attention forward (flash attention: online softmax, never materialising N x N).

q (B, H, Nq, D), k / v (B, H, Nk, D) like ``F.scaled_dot_product_attention`` (non-causal, no mask);
self and cross attention (Nk = 77 text tokens), any strides. A head dim that is not a power of two runs
either padded to one power-of-two tile (CUDA's default) or as a power-of-two main part plus a masked
power-of-two tail (D = 40 / 72 / 80 as 32+16 / 64+16 / 64+16 instead of 64 / 128 / 128: the padding costs
SD1.5's D=40 and DiT's D=72 37-44% of the tensor-core work). The split is the default off CUDA only: compiled
by triton 3.6 for an H200 it computed wrong results with tiles of 64+ query rows and 64+ keys
(``split_head_dim``).
Scores and the softmax are float32, the ``P @ V`` product takes P in the input dtype (as FlashAttention
does), the accumulators are float32.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from fastdiff.errors import BadArgumentError

MAX_HEAD_DIM = 256  # one program holds a (BLOCK_M, D) accumulator; wider heads go to SDPA (Attention.forward_triton)

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634


@triton.jit
def _load_tile(ptrs, row_ok, col_ok, UNMASKED: tl.constexpr, UPCAST: tl.constexpr):
    """A (rows, cols) K or V tile: unmasked when it cannot run past Nk or the head dim; zeros where masked;
    float32 when the dot runs in float32 (the interpreter's bfloat16 path)."""
    if UNMASKED:
        t = tl.load(ptrs)
    else:
        t = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    if UPCAST:
        t = t.to(tl.float32)
    return t


@triton.jit
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr,
    H, NQ, NK,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    qk_scale,  # softmax scale * log2(e) >= 0: the softmax runs in base 2
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, MAIN_EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, D: tl.constexpr, ALIGN: tl.constexpr,
):
    # The head dim is covered by a main part of BLOCK_D columns (a power of two <= D, never masked) and,
    # when BLOCK_D2 > 0, a tail of BLOCK_D2 columns (masked past D): D = 40 runs as 32 + 16, D = 72 as
    # 64 + 16, instead of padding to 64 / 128. Each part has its own dots and accumulator. MAIN_EVEN_D:
    # the main part needs no head-dim mask (false only for a single padded block, D < BLOCK_D).
    # D is a constexpr and ALIGN (elements) divides every (batch, head, row) offset: a head-dim mask like
    # `offs_d < 40` is then known constant over aligned runs of 8 halves, and rows start 16-byte aligned, so the
    # loads vectorise to 16 bytes (with a runtime D not divisible by 16 they compiled to 2-byte loads).
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    q_base = q_ptr + tl.multiple_of(b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh, ALIGN)
    k_base = k_ptr + tl.multiple_of(b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh, ALIGN)
    v_base = v_ptr + tl.multiple_of(b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh, ALIGN)
    o_base = o_ptr + tl.multiple_of(b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh, ALIGN)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < NQ
    # (BLOCK_M,) element offsets of the query / output rows; int64: a strided view's rows may span more than
    # 2**31 elements
    q_rows = tl.multiple_of(offs_m.to(tl.int64) * stride_qn, ALIGN)
    o_rows = tl.multiple_of(offs_m.to(tl.int64) * stride_on, ALIGN)

    mask_d = offs_d < D
    if MAIN_EVEN_D:
        q = tl.load(q_base + q_rows[:, None] + offs_d[None, :] * stride_qd, mask=mask_m[:, None],
                    other=0.0)
    else:
        q = tl.load(q_base + q_rows[:, None] + offs_d[None, :] * stride_qd,
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    if BLOCK_D2 > 0:
        offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        mask_d2 = offs_d2 < D
        q2 = tl.load(q_base + q_rows[:, None] + offs_d2[None, :] * stride_qd,
                     mask=mask_m[:, None] & mask_d2[None, :], other=0.0)
        if DOT_FP32:
            q2 = q2.to(tl.float32)
        acc2 = tl.zeros([BLOCK_M, BLOCK_D2], dtype=tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, NK, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < NK
        # (BLOCK_N,) element offsets of the key / value rows
        k_rows = tl.multiple_of(cols.to(tl.int64) * stride_kn, ALIGN)
        v_rows = tl.multiple_of(cols.to(tl.int64) * stride_vn, ALIGN)
        # K and V tiles are (BLOCK_N, BLOCK_D) with the head dim contiguous (coalesced rows); K is
        # transposed for the dot. Unmasked loads when the tile cannot run past Nk.
        k_ptrs = k_base + k_rows[:, None] + offs_d[None, :] * stride_kd
        v_ptrs = v_base + v_rows[:, None] + offs_d[None, :] * stride_vd
        k = _load_tile(k_ptrs, mask_n, mask_d, EVEN_N and MAIN_EVEN_D, DOT_FP32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if BLOCK_D2 > 0:
            k2 = _load_tile(k_base + k_rows[:, None] + offs_d2[None, :] * stride_kd, mask_n, mask_d2,
                            EVEN_N and EVEN_D, DOT_FP32)
            s += tl.dot(q2, tl.trans(k2), input_precision=DOT_PRECISION)
        # online softmax: rescale what was accumulated so far to the new running maximum. The maximum is kept
        # in raw score units and the scale (>= 0, softmax scale * log2 e) folded into one FMA per score.
        if not EVEN_N:
            s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # (BLOCK_M,), raw units
        alpha = tl.where(m_i == float("-inf"), 0.0, tl.exp2((m_i - m_new) * qk_scale))  # 0 on the first tile
        p = tl.exp2(s * qk_scale - (m_new * qk_scale)[:, None])
        if not EVEN_N:
            p = tl.where(mask_n[None, :], p, 0.0)  # -inf * a zero scale is NaN, not 0
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _load_tile(v_ptrs, mask_n, mask_d, EVEN_N and MAIN_EVEN_D, DOT_FP32)
        if DOT_FP32:  # P is rounded to the input dtype either way (as FlashAttention does)
            p_in = p.to(v_ptr.dtype.element_ty).to(tl.float32)
        else:
            p_in = p.to(v.dtype)
        # the dots accumulate into the rescaled accumulators (no separate add over them)
        acc = tl.dot(p_in, v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        if BLOCK_D2 > 0:
            v2 = _load_tile(v_base + v_rows[:, None] + offs_d2[None, :] * stride_vd, mask_n, mask_d2,
                            EVEN_N and EVEN_D, DOT_FP32)
            acc2 = tl.dot(p_in, v2, acc2 * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(o_base + o_rows[:, None] + offs_d[None, :] * stride_od,
             acc.to(o_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    if BLOCK_D2 > 0:
        acc2 = acc2 / l_i[:, None]
        tl.store(o_base + o_rows[:, None] + offs_d2[None, :] * stride_od,
                 acc2.to(o_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d2[None, :])


# Half-precision problems on a GPU pick their tiles by autotuning (once per (Nq, Nk, D), on the first call,
# which is a warm-up call before any CUDA-graph capture). These few configurations cover the usual
# FlashAttention-2 tilings for Hopper / Ampere without minutes of tuning per shape.
_TUNED_TILES = [  # (BLOCK_M, BLOCK_N, num_warps, num_stages)
    (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 4), (128, 32, 4, 4), (64, 128, 4, 3),
    # short sequences: DiT-XL/2's 256 tokens x 32 (batch, head) pairs are 64 programs at BLOCK_M=128, half an
    # H100; 32-row tiles give 256
    (32, 64, 4, 3),
]
# The head-dim split (main + tail tiles) computed wrong results on an H200 (triton 3.6) with every tile of at
# least 64 rows and 64 keys; tiles of 32 rows or 32 keys were right at D = 40 / 72 / 80
# (bench/check_attention_tiles.py, run 3c). A forced split (FASTDIFF_ATTENTION_SPLIT=1) tunes over those only.
_SPLIT_SAFE_TILES = [t for t in _TUNED_TILES if t[0] == 32 or t[1] == 32]
_tuned: dict = {}


def _attention_tuned(split: bool = False):
    """The autotuned kernel (over the split-safe tiles for a split head dim), built on first use: triton 3.2's
    Autotuner asks for the active GPU driver when it is constructed, so building it at import would break
    importing this module on a machine without one."""
    if split not in _tuned:
        _tuned[split] = triton.autotune(
            configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
                     for bm, bn, w, st in (_SPLIT_SAFE_TILES if split else _TUNED_TILES)],
            key=["NQ", "NK", "D"],
        )(triton.heuristics({"EVEN_N": lambda a: a["NK"] % a["BLOCK_N"] == 0})(_attention_kernel))
    return _tuned[split]


# what the autotuner (its configs and the EVEN_N heuristic) sets itself; the launch passes the rest of meta
_AUTOTUNED = ("BLOCK_M", "BLOCK_N", "EVEN_N", "num_warps", "num_stages")
_TUNING_BROKEN = False


def _disable_tuning(error: Exception) -> None:
    global _TUNING_BROKEN
    import warnings

    _TUNING_BROKEN = True
    warnings.warn(f"fastdiff attention: autotuned launch failed ({type(error).__name__}: {error}); "
                  f"using the fixed tiles from now on")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def head_tiles(d: int) -> tuple[int, int]:
    """(main, tail) column blocks covering head dim ``d``: a power of two <= d plus a masked power-of-two
    tail (>= 16, tl.dot's minimum), or one padded block where splitting saves nothing."""
    padded = max(16, triton.next_power_of_2(d))
    main = max(16, 1 << (d.bit_length() - 1))
    rest = d - main
    if rest <= 0:
        return padded, 0
    tail = max(16, triton.next_power_of_2(rest))
    return (main, tail) if main + tail < padded else (padded, 0)


def split_head_dim(device_type: str) -> bool:
    """Whether a head dim that is not a power of two runs as main + tail tiles (else one padded tile).

    Off on CUDA: on an H200 with triton 3.6 the split kernel (D=40 as 32+16, D=72 as 64+16) made illegal memory
    accesses under the autotuner and, run tile by tile (``bench/check_attention_tiles.py``), wrong results with
    every tile of 64+ rows and 64+ keys (2026-11-26 run 3). Those failures were at D = 40 / 72, which then
    compiled to 2-byte loads (a runtime head dim); whether the split is right now that every tile vectorises
    is not measured. Forced on, CUDA tunes over the other tiles only.
    ``FASTDIFF_ATTENTION_SPLIT=1`` / ``0`` forces it on / off everywhere (experiments, tests).
    """
    forced = os.environ.get("FASTDIFF_ATTENTION_SPLIT")
    if forced in ("0", "1"):
        return forced == "1"
    return device_type != "cuda"


def launch_config(nq: int, nk: int, d: int, dtype: torch.dtype, device_type: str = "cuda",
                  split: Optional[bool] = None) -> dict:
    """Block sizes and warps for one attention problem; shared with ``fastdiff.kernels.aot``. ``split``:
    whether to split the head dim (None: ``split_head_dim``)."""
    split = split_head_dim(device_type) if split is None else split
    block_d, block_d2 = head_tiles(d) if split else (max(16, triton.next_power_of_2(d)), 0)
    if device_type == "cuda" and dtype == torch.float32:
        # the accuracy path (IEEE fp32 dots run on FMA units, not tensor cores): small tiles
        block_m, block_n, num_warps, num_stages = 64, 32, 4, 2
    elif device_type == "cuda":
        # wide heads: 64-row tiles on one warpgroup of 4 warps (8 warps would split a 64-row wgmma tile
        # across two warpgroups: triton 3.1, torch 2.5's pin, aborts compiling that for sm_90)
        block_m = 128 if block_d <= 64 else 64
        block_n = 32 if block_d2 else 64  # a split head dim: 32 keys per tile (see _SPLIT_SAFE_TILES)
        num_warps = 4
        num_stages = 3 if block_d <= 64 else 2
    else:  # the interpreter: few, large programs
        block_m, block_n, num_warps, num_stages = 64, 64, 4, 1
    # no wider than the problem (tl.dot needs >= 16)
    block_m = max(16, min(block_m, triton.next_power_of_2(nq)))
    block_n = max(16, min(block_n, triton.next_power_of_2(nk)))
    return dict(block_m=block_m, block_n=block_n, block_d=block_d, block_d2=block_d2, num_warps=num_warps,
                num_stages=num_stages, even_n=nk % block_n == 0, even_d=block_d + block_d2 == d,
                dot_precision="ieee" if dtype == torch.float32 else "tf32")


def row_alignment(*tensors: torch.Tensor) -> int:
    """How many elements every (batch, head, row) start of ``tensors`` is a multiple of: 16 bytes' worth when
    each has a unit head-dim stride, a 16-byte aligned start and 16-byte multiples as its other strides (the
    kernel's loads then vectorise), else 1."""
    elems = 16 // tensors[0].element_size()
    for t in tensors:
        if t.stride(3) != 1 or t.data_ptr() % 16 or any(s % elems for s in t.stride()[:3]):
            return 1
    return elems


def _launches(q, k, v, out, scale, device_type, split: Optional[bool] = None, interpret: Optional[bool] = None):
    """The launch for (q, k, v) -> out as [(grid, positional args, constexprs + launch options)].

    Also used by ``fastdiff.kernels.aot`` with meta tensors, so the AOT check compiles exactly what runs
    (``interpret=False``: the compiled kernel; None: whether this process interprets, CUDA tensors included).
    """
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    sm_scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if sm_scale < 0:  # the kernel folds a non-negative scale into its running maximum: move the sign into q
        q, sm_scale = -q, -sm_scale
    cfg = launch_config(NQ, NK, D, q.dtype, device_type, split)
    grid = (triton.cdiv(NQ, cfg["block_m"]), B * H)
    args = (q, k, v, out, H, NQ, NK, *q.stride(), *k.stride(), *v.stride(), *out.stride(), sm_scale * _LOG2E)
    meta = dict(D=D, ALIGN=row_alignment(q, k, v, out),
                BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], BLOCK_D=cfg["block_d"], BLOCK_D2=cfg["block_d2"],
                EVEN_N=cfg["even_n"], EVEN_D=cfg["even_d"], MAIN_EVEN_D=cfg["even_d"] or cfg["block_d2"] > 0,
                DOT_PRECISION=cfg["dot_precision"],
                # Triton 3.9's interpreter multiplies bfloat16 tl.dot operands as raw bits: upcast there, CUDA
                # tensors too (the P -> bfloat16 rounding is kept, so the numerics match the compiled kernel's).
                DOT_FP32=q.dtype == torch.bfloat16 and (_interpreting() if interpret is None else interpret),
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return [(grid, args, meta)]


def _check(q, k, v, out):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            found = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise BadArgumentError(f"attention: expected {name} of shape (B, H, N, D), found {found}")
        if t.dtype not in _DTYPES:
            raise BadArgumentError(f"attention: expected {name} dtype in {_DTYPES}, found {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise BadArgumentError(f"attention: expected q, k, v of one dtype, found {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise BadArgumentError(f"attention: expected q, k, v on one device, found {q.device}, {k.device}, {v.device}")
    B, H, NQ, D = q.shape
    if tuple(k.shape[:2]) != (B, H) or k.shape[3] != D:
        raise BadArgumentError(f"attention: expected k of shape ({B}, {H}, Nk, {D}), found {tuple(k.shape)}")
    if tuple(v.shape) != tuple(k.shape):
        raise BadArgumentError(f"attention: expected v of shape {tuple(k.shape)} (as k), found {tuple(v.shape)}")
    if D > MAX_HEAD_DIM:
        raise BadArgumentError(f"attention: expected head dim <= {MAX_HEAD_DIM}, found {D}")
    if k.shape[2] == 0:
        raise BadArgumentError("attention: expected at least one key/value token, found Nk = 0")
    if out is not None and (tuple(out.shape) != tuple(q.shape) or out.dtype != q.dtype or out.device != q.device):
        raise BadArgumentError(f"attention: expected out of shape {tuple(q.shape)}, dtype {q.dtype} on {q.device}, "
                               f"found {tuple(out.shape)} {out.dtype} on {out.device}")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None, *,
              out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax(q k^T * scale) v for q (B, H, Nq, D), k / v (B, H, Nk, D); scale defaults to 1/sqrt(D).

    Inputs may be non-contiguous (they are read through their strides); one whose head dim is not its unit
    stride is copied first, as SDPA does: each key / value tile is read once per query block, and a strided
    head dim makes every such read 2-byte loads (EDM's interleaved qkv, for one). Returns (B, H, Nq, D) in
    q's dtype, stored as (B, Nq, H, D) like FlashAttention's SDPA output: the ``.transpose(1, 2).reshape(B,
    Nq, H * D)`` that the models apply next is then a view, not a copy. Or writes ``out`` (any strides).
    """
    _check(q, k, v, out)
    q, k, v = (t if t.stride(3) == 1 or t.shape[3] == 1 else t.contiguous() for t in (q, k, v))
    if out is None:
        B, H, NQ, D = q.shape
        out = torch.empty((B, NQ, H, D), device=q.device, dtype=q.dtype).transpose(1, 2)
    if out.numel() == 0:
        return out
    for grid, args, meta in _launches(q, k, v, out, scale, q.device.type):
        if q.is_cuda and q.dtype != torch.float32 and not _interpreting() and not _TUNING_BROKEN:
            tuned = {k: v for k, v in meta.items() if k not in _AUTOTUNED}
            try:
                _attention_tuned(meta["BLOCK_D2"] > 0)[lambda m: (triton.cdiv(args[5], m["BLOCK_M"]), grid[1])](
                    *args, **tuned)
                continue
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as e:  # a Triton version whose autotuner rejects this: the fixed tiles still work
                if torch.cuda.is_current_stream_capturing():  # the capture is broken already: say so
                    raise
                _disable_tuning(e)
        _attention_kernel[grid](*args, **meta)
    return out
