"""DiT block element-wise ops: adaLN modulation and the gated residual.

- ``adaln_modulate(x, shift, scale)`` = ``LayerNorm(x) * (1 + scale[:, None]) + shift[:, None]``: LayerNorm
  over the last dim without affine, statistics in float32 (two passes over the row held in registers).
- ``gated_residual(x, gate, y)`` = ``x + gate[:, None] * y``.
- ``residual_layer_norm(x, y, weight, bias)`` = ``(x + y, LayerNorm(x + y) * weight + bias)`` in one pass: a
  Stable Diffusion transformer block's residual and the (affine) LayerNorm after it, the same kernel with a
  plain residual and per-column weight / bias in place of per-sample scale / shift.
- ``gated_residual_modulate(x, gate, y, shift, scale)`` = both in one pass: the residual ``x' = x + gate * y``
  (written out: the next residual adds to it) and ``adaln_modulate(x', shift, scale)``, the input of the next
  sublayer. In a DiT every residual is followed by the next adaLN norm (the block's second, the next block's
  first, the final layer's), so this saves one launch and one read and write of the row per residual.

x / y (B, T, D) read through their strides (the last dim must be unit-stride, else a copy is made);
shift / scale / gate (B, D). These two small ops live in one file because they are the two halves of a
DiT block's adaLN-Zero and are always used together.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastdiff.errors import BadArgumentError

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _adaln_modulate_kernel(
    x_ptr, shift_ptr, scale_ptr, y_ptr,
    r_ptr, gate_ptr, xo_ptr,  # RESIDUAL: the branch output, its gate, where x + gate * r goes
    T, D,
    stride_xb, stride_xt, stride_shb, stride_scb, stride_yb, stride_yt,
    stride_rb, stride_rt, stride_gb, stride_ob, stride_ot,
    eps,
    BLOCK_D: tl.constexpr, RESIDUAL: tl.constexpr, GATED: tl.constexpr, ONE_PLUS: tl.constexpr,
):
    # ONE_PLUS: y = norm * (1 + scale) + shift (adaLN modulate, per-sample vectors); else norm * scale + shift
    # (LayerNorm's affine weight and bias: per-column vectors, passed with a sample stride of 0)
    row = tl.program_id(0)  # one (sample, token) row per program, held in registers
    b = row // T
    t = row % T
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(x_ptr + b.to(tl.int64) * stride_xb + t.to(tl.int64) * stride_xt + cols, mask=mask,
                other=0.0).to(tl.float32)
    if RESIDUAL:  # x' = x + gate * r, stored in xo's dtype; the norm reads that rounded x' (as an unfused pair)
        r = tl.load(r_ptr + b.to(tl.int64) * stride_rb + t.to(tl.int64) * stride_rt + cols, mask=mask,
                    other=0.0).to(tl.float32)
        if GATED:
            g = tl.load(gate_ptr + b.to(tl.int64) * stride_gb + cols, mask=mask, other=0.0).to(tl.float32)
            xo = (x + g * r).to(xo_ptr.dtype.element_ty)
        else:
            xo = (x + r).to(xo_ptr.dtype.element_ty)
        tl.store(xo_ptr + b.to(tl.int64) * stride_ob + t.to(tl.int64) * stride_ot + cols, xo, mask=mask)
        x = tl.where(mask, xo.to(tl.float32), 0.0)
    mean = tl.sum(x, axis=0) / D
    xc = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / D + eps)
    sh = tl.load(shift_ptr + b.to(tl.int64) * stride_shb + cols, mask=mask, other=0.0).to(tl.float32)
    sc = tl.load(scale_ptr + b.to(tl.int64) * stride_scb + cols, mask=mask, other=0.0).to(tl.float32)
    if ONE_PLUS:
        y = xc * rstd * (1.0 + sc) + sh
    else:
        y = xc * rstd * sc + sh
    tl.store(y_ptr + b.to(tl.int64) * stride_yb + t.to(tl.int64) * stride_yt + cols, y.to(y_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _gated_residual_kernel(
    x_ptr, gate_ptr, y_ptr, o_ptr,
    T, D,
    stride_xb, stride_xt, stride_gb, stride_yb, stride_yt, stride_ob, stride_ot,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    b = row // T
    t = row % T
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(x_ptr + b.to(tl.int64) * stride_xb + t.to(tl.int64) * stride_xt + cols, mask=mask, other=0.0)
    y = tl.load(y_ptr + b.to(tl.int64) * stride_yb + t.to(tl.int64) * stride_yt + cols, mask=mask, other=0.0)
    g = tl.load(gate_ptr + b.to(tl.int64) * stride_gb + cols, mask=mask, other=0.0)
    o = x.to(tl.float32) + g.to(tl.float32) * y.to(tl.float32)
    tl.store(o_ptr + b.to(tl.int64) * stride_ob + t.to(tl.int64) * stride_ot + cols, o.to(o_ptr.dtype.element_ty),
             mask=mask)


def adaln_launch_config(d: int) -> dict:
    """Block size and warps of ``adaln_modulate`` for rows of ``d``; shared with ``fastdiff.kernels.aot``."""
    block_d = triton.next_power_of_2(d)
    return dict(block_d=block_d, num_warps=max(1, min(16, block_d // 256)))


def gated_residual_launch_config(d: int) -> dict:
    """Block size and warps of ``gated_residual``; shared with ``fastdiff.kernels.aot``."""
    block_d = min(triton.next_power_of_2(d), 2048)
    return dict(block_d=block_d, num_warps=max(1, min(8, block_d // 256)))


def _adaln_launches(x, shift, scale, out, eps, residual=None, one_plus=True):
    """[(grid, positional args, constexprs + options)] of adaln_modulate, or with ``residual`` = (gate, y, x_out)
    of gated_residual_modulate (gate None: residual_layer_norm's plain ``x + y``); ``one_plus=False``: ``scale`` /
    ``shift`` are a LayerNorm's weight / bias, expanded to (B, D) with a sample stride of 0. Also used by the
    AOT check."""
    B, T, D = x.shape
    cfg = adaln_launch_config(D)
    gate, r, xo = residual if residual is not None else (x, x, x)  # unread without RESIDUAL
    gated = gate is not None
    gate = x if gate is None else gate
    args = (x, shift, scale, out, r, gate, xo, T, D, x.stride(0), x.stride(1), shift.stride(0), scale.stride(0),
            out.stride(0), out.stride(1), r.stride(0), r.stride(1), gate.stride(0), xo.stride(0), xo.stride(1),
            float(eps))
    return [((B * T,), args, dict(BLOCK_D=cfg["block_d"], RESIDUAL=residual is not None, GATED=gated,
                                  ONE_PLUS=one_plus, num_warps=cfg["num_warps"]))]


def _gated_residual_launches(x, gate, y, out):
    """[(grid, positional args, constexprs + options)] of gated_residual; also used by the AOT check."""
    B, T, D = x.shape
    cfg = gated_residual_launch_config(D)
    args = (x, gate, y, out, T, D, x.stride(0), x.stride(1), gate.stride(0), y.stride(0), y.stride(1),
            out.stride(0), out.stride(1))
    return [((B * T, triton.cdiv(D, cfg["block_d"])), args, dict(BLOCK_D=cfg["block_d"], num_warps=cfg["num_warps"]))]


def _rows(name: str, t, like=None) -> torch.Tensor:
    """Validate a (B, T, D) tensor; make its last dim unit-stride."""
    if not isinstance(t, torch.Tensor) or t.dim() != 3:
        found = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise BadArgumentError(f"expected {name} of shape (B, T, D), found {found}")
    if t.dtype not in _DTYPES:
        raise BadArgumentError(f"expected {name} dtype in {_DTYPES}, found {t.dtype}")
    if like is not None and (t.shape != like.shape or t.device != like.device):
        raise BadArgumentError(f"expected {name} of shape {tuple(like.shape)} on {like.device}, found "
                               f"{tuple(t.shape)} on {t.device}")
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _per_sample(name: str, t, x) -> torch.Tensor:
    """Validate a (B, D) modulation tensor for x (B, T, D); make its last dim unit-stride."""
    B, _, D = x.shape
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != (B, D):
        found = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise BadArgumentError(f"expected {name} of shape ({B}, {D}) (one vector per sample), found {found}")
    if t.dtype not in _DTYPES or t.device != x.device:
        raise BadArgumentError(f"expected {name} as a float tensor on {x.device}, found {t.dtype} on {t.device}")
    return t if t.stride(-1) == 1 or D == 1 else t.contiguous()


def _out(out, shape, dtype, device, op):
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device:
        raise BadArgumentError(f"{op}: expected out of shape {tuple(shape)}, dtype {dtype} on {device}, found "
                               f"{tuple(out.shape)} {out.dtype} on {out.device}")
    if out.stride(-1) != 1 and shape[-1] != 1:
        raise BadArgumentError(f"{op}: expected out with a unit-stride last dim, found strides {out.stride()}")
    return out


def adaln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6, *,
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``LayerNorm(x) * (1 + scale[:, None]) + shift[:, None]`` for x (B, T, D), shift / scale (B, D).

    LayerNorm over D without affine, statistics in float32. The result has the dtype torch's type
    promotion gives ``x``, ``shift`` and ``scale`` (as the native path); written to ``out`` if given.
    """
    x = _rows("adaln_modulate: x", x)
    shift = _per_sample("adaln_modulate: shift", shift, x)
    scale = _per_sample("adaln_modulate: scale", scale, x)
    dtype = torch.promote_types(torch.promote_types(x.dtype, shift.dtype), scale.dtype)
    out = _out(out, x.shape, dtype, x.device, "adaln_modulate")
    if out.numel() == 0:
        return out
    for grid, args, meta in _adaln_launches(x, shift, scale, out, eps):
        _adaln_modulate_kernel[grid](*args, **meta)
    return out


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, *,
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x + gate[:, None] * y`` for x / y (B, T, D), gate (B, D), computed in float32.

    Result dtype: torch's promotion of the three (as the native path); ``out=x`` updates x in place.
    """
    x = _rows("gated_residual: x", x)
    y = _rows("gated_residual: y", y, like=x)
    gate = _per_sample("gated_residual: gate", gate, x)
    dtype = torch.promote_types(torch.promote_types(x.dtype, gate.dtype), y.dtype)
    out = _out(out, x.shape, dtype, x.device, "gated_residual")
    if out.numel() == 0:
        return out
    for grid, args, meta in _gated_residual_launches(x, gate, y, out):
        _gated_residual_kernel[grid](*args, **meta)
    return out


def gated_residual_modulate(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor,
                            scale: torch.Tensor, eps: float = 1e-6, *, out: Optional[torch.Tensor] = None,
                            x_out: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x', adaln_modulate(x', shift, scale))`` with ``x' = x + gate[:, None] * y``, in one pass.

    x / y (B, T, D), gate / shift / scale (B, D). x' has the dtype ``gated_residual`` gives (torch's promotion of
    x, gate, y) and the norm reads x' rounded to it, so the pair equals the two ops run one after the other;
    the normalised output has ``adaln_modulate``'s dtype for x', shift and scale. ``x_out`` / ``out`` receive them
    if given (``x_out=x`` updates x in place: each row is read before it is written).
    """
    x = _rows("gated_residual_modulate: x", x)
    y = _rows("gated_residual_modulate: y", y, like=x)
    gate = _per_sample("gated_residual_modulate: gate", gate, x)
    shift = _per_sample("gated_residual_modulate: shift", shift, x)
    scale = _per_sample("gated_residual_modulate: scale", scale, x)
    x_dtype = torch.promote_types(torch.promote_types(x.dtype, gate.dtype), y.dtype)
    x_out = _out(x_out, x.shape, x_dtype, x.device, "gated_residual_modulate")
    dtype = torch.promote_types(torch.promote_types(x_dtype, shift.dtype), scale.dtype)
    out = _out(out, x.shape, dtype, x.device, "gated_residual_modulate")
    if out.numel() == 0:
        return x_out, out
    for grid, args, meta in _adaln_launches(x, shift, scale, out, eps, residual=(gate, y, x_out)):
        _adaln_modulate_kernel[grid](*args, **meta)
    return x_out, out


def residual_layer_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                        eps: float = 1e-5, *, out: Optional[torch.Tensor] = None,
                        x_out: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x', LayerNorm(x') * weight + bias)`` with ``x' = x + y``, in one pass: x / y (B, T, D), weight / bias (D,).

    x' has torch's promotion of x and y, rounded before the norm reads it (as ``x + y`` then ``F.layer_norm``);
    the normalised output has x''s dtype. ``x_out`` / ``out`` receive them if given (``x_out=x`` in place).
    """
    x = _rows("residual_layer_norm: x", x)
    y = _rows("residual_layer_norm: y", y, like=x)
    D = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (D,) or t.device != x.device:
            found = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise BadArgumentError(f"residual_layer_norm: expected {name} of shape ({D},) on {x.device}, found {found}")
    x_dtype = torch.promote_types(x.dtype, y.dtype)
    x_out = _out(x_out, x.shape, x_dtype, x.device, "residual_layer_norm")
    out = _out(out, x.shape, x_dtype, x.device, "residual_layer_norm")
    if out.numel() == 0:
        return x_out, out
    B = x.shape[0]
    w, b = weight.contiguous().expand(B, D), bias.contiguous().expand(B, D)  # sample stride 0
    for grid, args, meta in _adaln_launches(x, b, w, out, eps, residual=(None, y, x_out), one_plus=False):
        _adaln_modulate_kernel[grid](*args, **meta)
    return x_out, out
