"""GroupNorm forward, fused with the UNet scale-shift modulation and SiLU.

``y = act((x' - mean_g) * rstd_g * weight_c + bias_c) * (1 + scale_bc) + shift_bc)`` with ``x' = x +
pre_bias_bc`` (a UNet resnet's time embedding, added before its second norm: fused, it costs no pass of its
own), statistics of x' per (sample, group) in float32, for NCHW and channels-last (NHWC) inputs; the
output keeps the input's memory format and dtype.

One kernel, three modes chosen by the launcher (a constexpr, so each mode compiles to its own code):

- ``MODE_FUSED`` (one program per (sample, group)): statistics, then normalise, in one launch. Used when
  the grid of (sample, group) pairs already fills the device, and always on the CPU interpreter.
- ``MODE_STATS`` + ``MODE_APPLY`` (``num_splits`` programs per group): each program reduces a spatial
  slice of its group to (mean, M2) partials, then a second launch combines the partials of its group
  (Chan et al.) and normalises its slice. A SD1.5 group norm (2 x 32 groups) is only 64 programs, too few
  for an H100; split 16 ways it is 1024, and the second read of the input comes from L2.

Statistics are tile-wise mean and sum of squared deviations merged with Chan's formula, so a large mean
(|mean| >> std) loses no precision to ``E[x^2] - E[x]^2`` cancellation.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from fastdiff.errors import BadArgumentError

MODE_FUSED, MODE_STATS, MODE_APPLY = 0, 1, 2
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def chan_merge(mean, m2, count, mean_t, m2_t, n_t):
    """Merge a tile's (mean, M2) over ``n_t`` elements into the running (mean, M2, count) (Chan et al.).

    Shared with ``group_norm_rows``; works on scalars and on per-channel vectors alike."""
    n_new = count + n_t
    delta = mean_t - mean
    mean = mean + delta * (n_t / n_new)
    m2 = m2 + m2_t + delta * delta * (count * n_t / n_new)
    return mean, m2, n_new


@triton.jit
def fold_affine(mean, rstd, ch, mask_c, b, stride_sc, stride_sh, stride_pre, w_ptr, b_ptr, scale_ptr, shift_ptr, pre_ptr,
                HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
                HAS_SHIFT: tl.constexpr, HAS_PRE: tl.constexpr, BLOCK_C: tl.constexpr):
    """(a_c, b_c) with ``y = x * a_c + b_c`` for channels ``ch`` of sample ``b``: the pre-norm bias,
    normalisation, affine and the ``*(1 + scale) + shift`` modulation folded into one pair per channel
    (``mean`` is the group mean of x + pre). scale / shift / pre are (B, C) with unit channel stride and row
    strides ``stride_sc`` / ``stride_sh`` / ``stride_pre`` (views of a stacked projection need no copy). Shared
    with ``group_norm_rows``."""
    a = tl.zeros([BLOCK_C], dtype=tl.float32) + rstd
    if HAS_PRE:  # (pre - mean) first: no cancellation between two large products
        bb = (tl.load(pre_ptr + b * stride_pre + ch, mask=mask_c, other=0.0).to(tl.float32) - mean) * rstd
    else:
        bb = tl.zeros([BLOCK_C], dtype=tl.float32) - mean * rstd
    if HAS_WEIGHT:
        w = tl.load(w_ptr + ch, mask=mask_c, other=1.0).to(tl.float32)
        a = a * w
        bb = bb * w
    if HAS_BIAS:
        bb = bb + tl.load(b_ptr + ch, mask=mask_c, other=0.0).to(tl.float32)
    if HAS_SCALE:
        sc = 1.0 + tl.load(scale_ptr + b * stride_sc + ch, mask=mask_c, other=0.0).to(tl.float32)
        a = a * sc
        bb = bb * sc
    if HAS_SHIFT:
        bb = bb + tl.load(shift_ptr + b * stride_sh + ch, mask=mask_c, other=0.0).to(tl.float32)
    return a, bb


@triton.jit
def _group_norm_kernel(
    x_ptr, y_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, pre_ptr, ws_ptr,
    C, HW, G, chunk, num_splits,
    stride_xb, stride_xc, stride_xs,
    stride_yb, stride_yc, stride_ys,
    stride_sc, stride_sh, stride_pre,  # row strides of the (B, C) scale / shift / pre-norm bias
    eps,
    MODE: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr, HAS_PRE: tl.constexpr, SILU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, SPLIT_P: tl.constexpr, CPG: tl.constexpr,
):
    # CPG (channels per group) is a constexpr: channels-last groups start at channel g * CPG, so the compiler
    # then knows each group's channel run is aligned to CPG's largest power-of-two factor and can load
    # 4 / 8 / 16 bytes at a time (SD's 10 / 20 / 40 channels per group); with a runtime CPG every
    # channels-last access compiled to a 2-byte load or store.
    pid_bg = tl.program_id(0)  # (sample, group)
    pid_sp = tl.program_id(1)  # spatial slice of the group
    b = pid_bg // G
    g = pid_bg % G
    s_begin = pid_sp * chunk
    s_end = tl.minimum(s_begin + chunk, HW)
    x_base = x_ptr + b.to(tl.int64) * stride_xb + (g * CPG).to(tl.int64) * stride_xc
    y_base = y_ptr + b.to(tl.int64) * stride_yb + (g * CPG).to(tl.int64) * stride_yc
    offs_c = tl.arange(0, BLOCK_C)
    offs_s = tl.arange(0, BLOCK_S)

    # MODE: 0 = fused (statistics + normalise), 1 = partial statistics only, 2 = merge partials + normalise
    if MODE != 2:
        # Statistics of this slice: per tile (mean, M2), merged into the running pair (Chan et al.).
        mean = 0.0
        m2 = 0.0
        count = 0.0
        for c0 in range(0, CPG, BLOCK_C):
            cc = c0 + offs_c
            mask_c = cc < CPG
            if HAS_PRE:  # statistics of x + pre_c
                pre = tl.load(pre_ptr + b * stride_pre + g * CPG + cc, mask=mask_c, other=0.0).to(tl.float32)
            for s0 in range(s_begin, s_end, BLOCK_S):
                ss = s0 + offs_s
                mask = mask_c[:, None] & (ss < s_end)[None, :]
                ptrs = x_base + cc[:, None].to(tl.int64) * stride_xc + ss[None, :].to(tl.int64) * stride_xs
                x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
                if HAS_PRE:
                    x = tl.where(mask, x + pre[:, None], 0.0)
                # valid elements of this tile, counted on scalars (not one more block-wide reduction)
                n_t = (tl.minimum(CPG - c0, BLOCK_C) * tl.minimum(s_end - s0, BLOCK_S)).to(tl.float32)
                mean_t = tl.sum(tl.sum(x, axis=1), axis=0) / n_t
                d = tl.where(mask, x - mean_t, 0.0)
                m2_t = tl.sum(tl.sum(d * d, axis=1), axis=0)
                mean, m2, count = chan_merge(mean, m2, count, mean_t, m2_t, n_t)
    if MODE == 1:
        ws = ws_ptr + (pid_bg * num_splits + pid_sp) * 2
        tl.store(ws, mean)
        tl.store(ws + 1, m2)
    else:
        if MODE == 2:
            # Merge the partials of every slice of this group.
            sp = tl.arange(0, SPLIT_P)
            mask_sp = sp < num_splits
            ws = ws_ptr + (pid_bg * num_splits + sp) * 2
            p_mean = tl.load(ws, mask=mask_sp, other=0.0)
            p_m2 = tl.load(ws + 1, mask=mask_sp, other=0.0)
            p_n = (tl.minimum(sp * chunk + chunk, HW) - sp * chunk).to(tl.float32) * CPG
            p_n = tl.where(mask_sp, p_n, 0.0)
            total = tl.sum(p_n, axis=0)
            mean = tl.sum(p_n * p_mean, axis=0) / total
            dm = tl.where(mask_sp, p_mean - mean, 0.0)
            var = (tl.sum(p_m2, axis=0) + tl.sum(p_n * dm * dm, axis=0)) / total
        else:
            var = m2 / count
        rstd = 1.0 / tl.sqrt(var + eps)

        # y = x * a_c + b_c (+ SiLU): per-channel affine and modulation folded into (a_c, b_c).
        for c0 in range(0, CPG, BLOCK_C):
            cc = c0 + offs_c
            mask_c = cc < CPG
            ch = g * CPG + cc
            a, bb = fold_affine(mean, rstd, ch, mask_c, b, stride_sc, stride_sh, stride_pre,
                                w_ptr, b_ptr, scale_ptr, shift_ptr, pre_ptr,
                                HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SHIFT, HAS_PRE, BLOCK_C)
            for s0 in range(s_begin, s_end, BLOCK_S):
                ss = s0 + offs_s
                mask = mask_c[:, None] & (ss < s_end)[None, :]
                ptrs = x_base + cc[:, None].to(tl.int64) * stride_xc + ss[None, :].to(tl.int64) * stride_xs
                x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
                y = x * a[:, None] + bb[:, None]
                if SILU:
                    y = y / (1.0 + tl.exp(-y))
                out = y_base + cc[:, None].to(tl.int64) * stride_yc + ss[None, :].to(tl.int64) * stride_ys
                tl.store(out, y.to(y_ptr.dtype.element_ty), mask=mask)


def _flat_spatial_stride(t: torch.Tensor) -> Optional[int]:
    """Stride of the flattened spatial dims of (B, C, *spatial), or None if they do not flatten."""
    dims = [(n, st) for n, st in zip(t.shape[2:], t.stride()[2:]) if n > 1]
    if not dims:
        return 1
    for (n0, st0), (n1, st1) in zip(dims[:-1], dims[1:]):
        if st0 != st1 * n1:
            return None
    return dims[-1][1]


def check_tuning(tile: Optional[int], num_warps: Optional[int], device_type: str = "cuda") -> int:
    """The tile to use (the default when None) after checking the ``tile`` / ``num_warps`` overrides."""
    if num_warps is not None and num_warps not in (1, 2, 4, 8, 16, 32):
        raise BadArgumentError(f"group_norm: expected num_warps in (1, 2, 4, 8, 16, 32), found {num_warps!r}")
    if tile is None:
        return 4096 if device_type == "cuda" else 8192  # elements per tile (registers on a GPU)
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1 or tile & (tile - 1):
        raise BadArgumentError(f"group_norm: expected tile to be a power of two, found {tile!r}")
    return tile


def launch_config(shape, num_groups: int, device_type: str = "cuda", num_splits: Optional[int] = None,
                  tile: Optional[int] = None, num_warps: Optional[int] = None) -> dict:
    """Block sizes, warps and split count the launcher uses for ``shape`` (B, C, *spatial).

    ``num_splits``, ``tile`` (elements per register tile, a power of two) and ``num_warps`` override the
    defaults; ``bench/bench_group_norm.py --sweep`` tunes them on a GPU. Shared with
    ``fastdiff.kernels.aot`` so the ahead-of-time check compiles what runs.
    """
    B, C = shape[0], shape[1]
    HW = math.prod(shape[2:]) if len(shape) > 2 else 1
    cpg = C // num_groups
    block_c = min(triton.next_power_of_2(cpg), 1024)
    tile = check_tuning(tile, num_warps, device_type)
    block_s = max(1, min(triton.next_power_of_2(HW), tile // block_c))
    if num_warps is None:
        num_warps = 8 if block_c * block_s >= 4096 else 4
    if num_splits is None:
        if device_type == "cuda":
            # aim for ~1024 programs in all, each slice at least one tile
            num_splits = max(1, min(triton.cdiv(1024, B * num_groups), triton.cdiv(HW, block_s)))
        else:
            num_splits = 1  # the interpreter pays per program: one per group
    num_splits = max(1, min(int(num_splits), HW, 65535))  # grid axis 1 (CUDA caps it at 65535)
    chunk = triton.cdiv(HW, num_splits)
    if num_splits > 1:
        chunk = triton.cdiv(chunk, block_s) * block_s if chunk > block_s else chunk
    num_splits = triton.cdiv(HW, chunk)
    return dict(block_c=block_c, block_s=block_s, num_splits=num_splits, chunk=chunk, hw=HW, cpg=cpg,
                split_p=triton.next_power_of_2(num_splits), num_warps=num_warps)


STRATEGIES = ("groups", "rows")


def _vectors(x, weight, bias, scale, shift, pre_bias=None, contiguous=False):
    """weight, bias (C,) contiguous and scale, shift, pre_bias (B, C) with unit channel stride: a view of a wider
    row (a chunk of a (B, 2C) projection, a part of a stacked one) keeps its row stride unless ``contiguous``
    (None stays None)."""
    B, C = x.shape[0], x.shape[1]

    def per_sample(t):
        if t is None:
            return None
        t = t.reshape(B, C)  # a view where the layout allows
        return t.contiguous() if contiguous or t.stride(1) != 1 else t

    return (weight.contiguous() if weight is not None else None, bias.contiguous() if bias is not None else None,
            *(per_sample(t) for t in (scale, shift, pre_bias)))


def _row_stride(t: Optional[torch.Tensor], C: int) -> int:
    return C if t is None else t.stride(0)


def _launches(x, y, num_groups, weight, bias, eps, activation, scale, shift, num_splits, device_type,
              tile=None, num_warps=None, strategy=None, pre_bias=None):
    """The kernel launches for x -> y as [(kernel, grid, positional args, constexprs + launch options)].

    ``strategy``: "groups" (this file's kernel: programs per (sample, group) slice; the default) or "rows"
    (``group_norm_rows``: statistics, coefficients and apply over contiguous rows; NCHW and channels-last
    only, else "groups"). Also used by ``fastdiff.kernels.aot`` with meta tensors, so the AOT check compiles
    exactly what runs.
    """
    from . import group_norm_rows as rows

    B, C = x.shape[0], x.shape[1]
    if strategy not in (None,) + STRATEGIES:
        raise BadArgumentError(f"group_norm: expected strategy in {STRATEGIES}, found {strategy!r}")
    rows_apply = strategy == "rows" and rows.rows_view(x, _flat_spatial_stride(x)) is not None
    w, bvec, sc, sh, pre = _vectors(x, weight, bias, scale, shift, pre_bias, contiguous=rows_apply)
    if rows_apply:
        return rows.launches(x, y, num_groups, w, bvec, sc, sh, eps, activation, _flat_spatial_stride(x),
                             _flat_spatial_stride(y), num_splits, check_tuning(tile, num_warps, "cuda"), num_warps,
                             device_type, pre=pre)
    cfg = launch_config(tuple(x.shape), num_groups, device_type, num_splits, tile, num_warps)
    dummy = x  # bound to the pointers whose HAS_* flag is off; never read
    split = cfg["num_splits"]
    ws = dummy if split == 1 else torch.empty(B * num_groups * split * 2, device=x.device, dtype=torch.float32)
    args = (x, y, dummy if w is None else w, dummy if bvec is None else bvec, dummy if sc is None else sc,
            dummy if sh is None else sh, dummy if pre is None else pre, ws,
            C, cfg["hw"], num_groups, cfg["chunk"], split,
            x.stride(0), x.stride(1), _flat_spatial_stride(x), y.stride(0), y.stride(1), _flat_spatial_stride(y),
            _row_stride(sc, C), _row_stride(sh, C), _row_stride(pre, C), float(eps))
    meta = dict(HAS_WEIGHT=w is not None, HAS_BIAS=bvec is not None, HAS_SCALE=sc is not None,
                HAS_SHIFT=sh is not None, HAS_PRE=pre is not None, SILU=activation == "silu",
                BLOCK_C=cfg["block_c"], BLOCK_S=cfg["block_s"], SPLIT_P=cfg["split_p"], CPG=cfg["cpg"],
                num_warps=cfg["num_warps"])
    grid = (B * num_groups, split)
    k = _group_norm_kernel
    if split == 1:
        return [(k, grid, args, dict(meta, MODE=MODE_FUSED))]
    return [(k, grid, args, dict(meta, MODE=MODE_STATS)), (k, grid, args, dict(meta, MODE=MODE_APPLY))]


def _check(x, num_groups, weight, bias, activation, scale, shift, out, pre_bias=None):
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise BadArgumentError(f"group_norm: expected x of shape (B, C, *spatial), found "
                               f"{type(x).__name__ if not isinstance(x, torch.Tensor) else tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise BadArgumentError(f"group_norm: expected x dtype in {_DTYPES}, found {x.dtype}")
    B, C = x.shape[0], x.shape[1]
    if num_groups <= 0 or C % num_groups:
        raise BadArgumentError(f"group_norm: expected channels divisible by num_groups, found {C} channels "
                               f"and {num_groups} groups")
    if activation not in (None, "silu"):
        raise BadArgumentError(f"group_norm: expected activation None or 'silu', found {activation!r}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (C,):
            raise BadArgumentError(f"group_norm: expected {name} of shape ({C},), found {tuple(t.shape)}")
    for name, t in (("scale", scale), ("shift", shift), ("pre_bias", pre_bias)):
        if t is not None and t.numel() != B * C:
            raise BadArgumentError(f"group_norm: expected {name} of shape ({B}, {C}) (one value per sample and "
                                   f"channel), found {tuple(t.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("scale", scale), ("shift", shift), ("pre_bias", pre_bias),
                    ("out", out)):
        if t is not None and t.device != x.device:
            raise BadArgumentError(f"group_norm: expected {name} on {x.device}, found {t.device}")
    if out is not None and (out.shape != x.shape or out.dtype != x.dtype):
        raise BadArgumentError(f"group_norm: expected out of shape {tuple(x.shape)} and dtype {x.dtype}, found "
                               f"{tuple(out.shape)} {out.dtype}")


def group_norm(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None, eps: float = 1e-5, activation: Optional[str] = None,
               scale: Optional[torch.Tensor] = None, shift: Optional[torch.Tensor] = None, *,
               out: Optional[torch.Tensor] = None, num_splits: Optional[int] = None, tile: Optional[int] = None,
               num_warps: Optional[int] = None, strategy: Optional[str] = None,
               pre_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """GroupNorm of ``x + pre_bias`` (B, C, *spatial), then ``*(1 + scale) + shift`` per (sample, channel),
    then SiLU.

    x: NCHW-contiguous or channels-last (any layout whose spatial dims flatten to one stride),
    float32 / float16 / bfloat16. scale / shift / pre_bias: (B, C) (or anything with B*C elements, e.g.
    (B, C, 1, 1)).
    Returns a tensor in x's dtype and memory format (or writes ``out``). ``num_splits`` (programs per
    group), ``tile`` and ``num_warps`` override the launcher's choice (testing / tuning, see ``launch_config``);
    ``strategy`` picks the kernels: "groups" (default) or "rows" (see ``_launches``).
    """
    _check(x, num_groups, weight, bias, activation, scale, shift, out, pre_bias)
    if _flat_spatial_stride(x) is None or x.stride(1) == 0:
        x = x.contiguous()
    if out is None:
        out = torch.empty_like(x)  # keeps x's (dense) memory format
    y = out
    if _flat_spatial_stride(y) is None:
        y = torch.empty_like(x)
    if x.numel() == 0:
        return out
    for kernel, grid, args, meta in _launches(x, y, num_groups, weight, bias, eps, activation, scale, shift,
                                              num_splits, x.device.type, tile, num_warps, strategy, pre_bias):
        kernel[grid](*args, **meta)
    if y is not out:
        out.copy_(y)
    return out
