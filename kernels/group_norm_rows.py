"""GroupNorm as three launches over the tensor's contiguous rows: statistics, per-channel coefficients, apply.

The ``rows`` strategy of ``fastdiff.kernels.group_norm`` (same math and arguments; chosen there). Each
sample is viewed as a 2-D (R, K) array whose K axis is the contiguous one:

- NCHW: R = channels, K = spatial positions (a channel is a contiguous row);
- channels-last: R = spatial positions, K = channels (a position's channels are a contiguous row).

Every load is then a contiguous, vectorisable run of a row, whatever the channels per group (10 and 40 for
SD's UNet: the one-program-per-group kernel loads them as padded, masked 16- and 64-row tiles, which a
channels-last input serves as 20- and 80-byte pieces of its rows). Channels-last rows are split into
power-of-two column blocks that divide C (320 as 5 x 64), so no lane is masked. The cost is a third, tiny
launch:

1. ``_stats_kernel``, grid (splits, channel blocks, B): per-channel (mean, M2) of one slice of the
   non-channel axis, tile-wise and merged with Chan's formula, into a float32 workspace (B, C, splits).
2. ``_coef_kernel``, grid (B * G,): merges a group's channel x split partials into its mean and rstd, and
   folds weight, bias, scale and shift into one (a, b) pair per (sample, channel).
3. ``_apply_kernel``, grid (row blocks, column blocks, B): ``y = act(x * a_c + b_c)``, element-wise.

Grid axes 1 and 2 are capped at 65535 by CUDA: they hold the channel blocks and the batch, the axis that
grows with the image (splits, row blocks) is axis 0.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .group_norm import chan_merge, fold_affine


@triton.jit
def _stats_kernel(
    x_ptr, ws_ptr,
    C, R, K, chunk, num_splits,
    stride_xb, stride_xr,
    CH_AXIS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    sp = tl.program_id(0)  # slice of the non-channel axis (grid axis 0: the only one not capped at 65535)
    blk = tl.program_id(1)  # block of channels
    b = tl.program_id(2)
    x_base = x_ptr + b.to(tl.int64) * stride_xb
    if CH_AXIS == 0:  # rows are channels: each program reduces BLOCK_R rows over K in [lo, hi)
        ch = blk * BLOCK_R + tl.arange(0, BLOCK_R)
        ch_ok = ch < R
        lo = sp * chunk
        hi = tl.minimum(lo + chunk, K)
        mean = tl.zeros([BLOCK_R], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_R], dtype=tl.float32)
        count = 0.0
        for k0 in range(lo, hi, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            mask = ch_ok[:, None] & (kk < hi)[None, :]
            x = tl.load(x_base + ch[:, None].to(tl.int64) * stride_xr + kk[None, :], mask=mask,
                        other=0.0).to(tl.float32)
            n_t = tl.minimum(hi - k0, BLOCK_K).to(tl.float32)
            mean_t = tl.sum(x, axis=1) / n_t
            d = tl.where(mask, x - mean_t[:, None], 0.0)
            m2_t = tl.sum(d * d, axis=1)
            mean, m2, count = chan_merge(mean, m2, count, mean_t, m2_t, n_t)
    else:  # columns are channels: each program reduces rows [lo, hi) for BLOCK_K channels
        ch = blk * BLOCK_K + tl.arange(0, BLOCK_K)
        ch_ok = ch < K
        lo = sp * chunk
        hi = tl.minimum(lo + chunk, R)
        mean = tl.zeros([BLOCK_K], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_K], dtype=tl.float32)
        count = 0.0
        for r0 in range(lo, hi, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            mask = (rr < hi)[:, None] & ch_ok[None, :]
            x = tl.load(x_base + rr[:, None].to(tl.int64) * stride_xr + ch[None, :], mask=mask,
                        other=0.0).to(tl.float32)
            n_t = tl.minimum(hi - r0, BLOCK_R).to(tl.float32)
            mean_t = tl.sum(x, axis=0) / n_t
            d = tl.where(mask, x - mean_t[None, :], 0.0)
            m2_t = tl.sum(d * d, axis=0)
            mean, m2, count = chan_merge(mean, m2, count, mean_t, m2_t, n_t)
    ws = ws_ptr + ((b * C + ch).to(tl.int64) * num_splits + sp) * 2
    tl.store(ws, mean, mask=ch_ok)
    tl.store(ws + 1, m2, mask=ch_ok)


@triton.jit
def _coef_kernel(
    ws_ptr, coef_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, pre_ptr,
    C, CPG, G, N_OTHER, chunk, num_splits,
    total, eps,  # total: elements per group (a host float: CPG * N_OTHER overflows int32 past 2^31)
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    HAS_PRE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_SP: tl.constexpr,
):
    pid = tl.program_id(0)  # (sample, group)
    b = pid // G
    g = pid % G
    cc = tl.arange(0, BLOCK_C)
    c_ok = cc < CPG
    ch = g * CPG + cc
    row = (b * C + ch).to(tl.int64) * num_splits
    # a pre-norm bias moves each channel's mean and leaves its M2: statistics of x + pre from those of x
    pre = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_PRE:
        pre = tl.load(pre_ptr + b * C + ch, mask=c_ok, other=0.0).to(tl.float32)
    # two passes over the group's (channel, split) partials: the mean, then M2 around it (Chan et al.)
    acc = tl.zeros([BLOCK_C, BLOCK_SP], dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_SP):
        sp = s0 + tl.arange(0, BLOCK_SP)
        ok = c_ok[:, None] & (sp < num_splits)[None, :]
        n_s = (tl.minimum(sp * chunk + chunk, N_OTHER) - sp * chunk).to(tl.float32)
        p_mean = tl.load(ws_ptr + (row[:, None] + sp[None, :]) * 2, mask=ok, other=0.0) + pre[:, None]
        acc += tl.where(ok, p_mean * n_s[None, :], 0.0)
    mean = tl.sum(tl.sum(acc, axis=1), axis=0) / total
    acc = tl.zeros([BLOCK_C, BLOCK_SP], dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_SP):
        sp = s0 + tl.arange(0, BLOCK_SP)
        ok = c_ok[:, None] & (sp < num_splits)[None, :]
        n_s = (tl.minimum(sp * chunk + chunk, N_OTHER) - sp * chunk).to(tl.float32)
        p_mean = tl.load(ws_ptr + (row[:, None] + sp[None, :]) * 2, mask=ok, other=0.0) + pre[:, None]
        p_m2 = tl.load(ws_ptr + (row[:, None] + sp[None, :]) * 2 + 1, mask=ok, other=0.0)
        dm = p_mean - mean
        acc += tl.where(ok, p_m2 + n_s[None, :] * dm * dm, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(acc, axis=1), axis=0) / total + eps)

    # y = x * a_c + b_c: affine and scale-shift folded per channel
    a, bb = fold_affine(mean, rstd, ch, c_ok, b, C, C, C, w_ptr, b_ptr, scale_ptr, shift_ptr, pre_ptr,
                        HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SHIFT, HAS_PRE, BLOCK_C)
    out = coef_ptr + (b * C + ch).to(tl.int64) * 2
    tl.store(out, a, mask=c_ok)
    tl.store(out + 1, bb, mask=c_ok)


@triton.jit
def _apply_kernel(
    x_ptr, y_ptr, coef_ptr,
    C, R, K,
    stride_xb, stride_xr, stride_yb, stride_yr, stride_yk,
    CH_AXIS: tl.constexpr, SILU: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rr = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # rows on grid axis 0: up to 2^31 - 1 blocks
    kk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    b = tl.program_id(2)
    r_ok = rr < R
    k_ok = kk < K
    mask = r_ok[:, None] & k_ok[None, :]
    x = tl.load(x_ptr + b.to(tl.int64) * stride_xb + rr[:, None].to(tl.int64) * stride_xr + kk[None, :], mask=mask,
                other=0.0).to(tl.float32)
    coef = coef_ptr + b.to(tl.int64) * C * 2
    if CH_AXIS == 0:
        a = tl.load(coef + rr * 2, mask=r_ok, other=0.0)
        c = tl.load(coef + rr * 2 + 1, mask=r_ok, other=0.0)
        y = x * a[:, None] + c[:, None]
    else:
        a = tl.load(coef + kk * 2, mask=k_ok, other=0.0)
        c = tl.load(coef + kk * 2 + 1, mask=k_ok, other=0.0)
        y = x * a[None, :] + c[None, :]
    if SILU:
        y = y / (1.0 + tl.exp(-y))
    out = (y_ptr + b.to(tl.int64) * stride_yb + rr[:, None].to(tl.int64) * stride_yr
           + kk[None, :].to(tl.int64) * stride_yk)
    tl.store(out, y.to(y_ptr.dtype.element_ty), mask=mask)


def rows_view(x: torch.Tensor, spatial_stride: int):
    """(channel axis, R, K, stride of R): how a (B, C, *spatial) tensor is read as contiguous K-rows, or None
    when neither the spatial dims (NCHW) nor the channels (channels-last) are the contiguous axis."""
    C = x.shape[1]
    HW = math.prod(x.shape[2:]) if x.dim() > 2 else 1
    if spatial_stride == 1 and (x.stride(1) == HW or C == 1):
        return 0, C, HW, HW
    if (x.stride(1) == 1 or C == 1) and (spatial_stride == C or HW == 1):
        return 1, HW, C, C
    return None


def _channel_tile(C: int, tile: int) -> int:
    """Channels per column block of a channels-last tile: the largest power of two dividing C (no masked
    lanes: SD's 320 / 640 / 1280 channels as 64 / 128 / 256), padded to C's next power of two where that
    divisor is under 32 (odd channel counts) or C fits one block anyway; never above the tile."""
    divisor = C & -C
    block = divisor if 32 <= divisor < C else triton.next_power_of_2(C)
    return min(block, tile)


def launch_config(shape, num_groups: int, ch_axis: int, num_splits=None, tile: int = 4096, num_warps: int = None,
                  device_type: str = "cuda") -> dict:
    """Tiles, splits and warps of the three launches (``tile`` / ``num_warps`` already checked by the caller);
    shared with ``fastdiff.kernels.aot``."""
    B, C = shape[0], shape[1]
    HW = math.prod(shape[2:]) if len(shape) > 2 else 1
    if ch_axis == 0:  # rows = channels, K = HW
        block_k = min(triton.next_power_of_2(HW), tile)
        block_r = max(1, min(tile // block_k, triton.next_power_of_2(C)))
        ch_blocks, other = triton.cdiv(C, block_r), HW
        step = block_k  # the stats loop walks K
    else:  # rows = positions, K = channels
        block_k = _channel_tile(C, tile)
        block_r = max(1, min(tile // block_k, triton.next_power_of_2(HW)))
        ch_blocks, other = triton.cdiv(C, block_k), HW
        step = block_r  # the stats loop walks the rows
    if num_splits is None:
        # ~512 statistics programs in all on a GPU, each slice at least one tile; one slice per channel
        # block on the interpreter, which pays per program
        target = 512 if device_type == "cuda" else 1
        num_splits = max(1, min(triton.cdiv(target, B * ch_blocks), triton.cdiv(other, step)))
    num_splits = max(1, min(int(num_splits), other, 2**31 - 1))
    chunk = triton.cdiv(other, num_splits)
    chunk = triton.cdiv(chunk, step) * step if chunk > step else chunk
    num_splits = triton.cdiv(other, chunk)
    cpg = C // num_groups
    if num_warps is None:
        num_warps = 8 if block_r * block_k >= 4096 else 4
    return dict(block_r=block_r, block_k=block_k, ch_blocks=ch_blocks, num_splits=num_splits, chunk=chunk,
                other=other, cpg=cpg, coef_block_c=triton.next_power_of_2(cpg),
                coef_block_sp=min(triton.next_power_of_2(num_splits), max(1, 4096 // triton.next_power_of_2(cpg))),
                num_warps=num_warps)


def launches(x, y, num_groups, w, bvec, sc, sh, eps, activation, spatial_stride_x, spatial_stride_y,
             num_splits=None, tile=4096, num_warps=None, device_type="cuda", pre=None):
    """[(kernel, grid, positional args, constexprs + options)] for x -> y; also used by the AOT check.

    x and y have the same (B, C, *spatial) shape; y may have other strides (read through its own)."""
    ch_axis, R, K, stride_xr = rows_view(x, spatial_stride_x)
    B, C = x.shape[0], x.shape[1]
    cfg = launch_config(tuple(x.shape), num_groups, ch_axis, num_splits, tile, num_warps, device_type)
    split = cfg["num_splits"]
    ws = torch.empty(B * C * split * 2, device=x.device, dtype=torch.float32)
    coef = torch.empty(B * C * 2, device=x.device, dtype=torch.float32)
    dummy = x  # bound to the pointers whose HAS_* flag is off; never read
    if ch_axis == 0:  # y's (R, K) strides: channel, spatial
        stride_yr, stride_yk = y.stride(1), spatial_stride_y
    else:
        stride_yr, stride_yk = spatial_stride_y, y.stride(1)
    stats = (_stats_kernel, (split, cfg["ch_blocks"], B),
             (x, ws, C, R, K, cfg["chunk"], split, x.stride(0), stride_xr),
             dict(CH_AXIS=ch_axis, BLOCK_R=cfg["block_r"], BLOCK_K=cfg["block_k"], num_warps=cfg["num_warps"]))
    coefs = (_coef_kernel, (B * num_groups,),
             (ws, coef, dummy if w is None else w, dummy if bvec is None else bvec, dummy if sc is None else sc,
              dummy if sh is None else sh, dummy if pre is None else pre, C, cfg["cpg"], num_groups, cfg["other"],
              cfg["chunk"], split, float(cfg["cpg"] * cfg["other"]), float(eps)),
             dict(HAS_WEIGHT=w is not None, HAS_BIAS=bvec is not None, HAS_SCALE=sc is not None,
                  HAS_SHIFT=sh is not None, HAS_PRE=pre is not None, BLOCK_C=cfg["coef_block_c"],
                  BLOCK_SP=cfg["coef_block_sp"], num_warps=4))
    apply = (_apply_kernel, (triton.cdiv(R, cfg["block_r"]), triton.cdiv(K, cfg["block_k"]), B),
             (x, y, coef, C, R, K, x.stride(0), stride_xr, y.stride(0), stride_yr, stride_yk),
             dict(CH_AXIS=ch_axis, SILU=activation == "silu", BLOCK_R=cfg["block_r"], BLOCK_K=cfg["block_k"],
                  num_warps=cfg["num_warps"]))
    return [stats, coefs, apply]
