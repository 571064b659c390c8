"""Weight-level fusions applied by ``pipe.optimize`` (never saved: checkpoints keep the original layout)."""

from __future__ import annotations

import torch
import torch.nn as nn


def fuse_qkv(model: nn.Module) -> int:
    """Give every self-attention one (3*inner, dim) projection instead of three; returns how many.

    The fused weight is a non-persistent buffer, so ``state_dict`` / ``save`` are unchanged; it costs a
    second copy of the q/k/v weights. DiT already stores qkv fused.
    """
    from .unet import MultiHeadAttention

    count = 0
    for m in model.modules():
        if not isinstance(m, MultiHeadAttention) or m.to_k.in_features != m.to_q.in_features:
            continue
        with torch.no_grad():
            w = torch.cat([m.to_q.weight, m.to_k.weight, m.to_v.weight], dim=0)
            b = None if m.to_q.bias is None else torch.cat([m.to_q.bias, m.to_k.bias, m.to_v.bias], dim=0)
        m.qkv_weight, m.qkv_bias = w, b  # registered (non-persistent) buffers: follow .to(), never saved
        count += 1
    return count


def fuse_adaln(model: nn.Module) -> int:
    """Give a DiT one (depth * 6D + 2D, D) projection for every adaLN modulation (the blocks' and the final
    layer's); returns how many projections it replaced (0 for other models, and for DiT models whose blocks
    carry their own conditioning embedders).

    At batch 2 each block's projection is a (2, D) x (D, 6D) matmul that streams 16 MB of DiT-XL/2 weights
    (fp16) in a launch too small to fill the GPU; one matmul streams all 451 MB in one launch. No second copy:
    the layers' weights become views of the stacked one (``DiT.stack_adaln``), and stay so through ``.to()``,
    ``load_state_dict`` and copies; ``state_dict`` and ``save`` keep the per-block layout.
    """
    from .dit import DiT

    return model.stack_adaln() if isinstance(model, DiT) else 0


def adaln_stackable(model: nn.Module) -> bool:
    """Whether ``fuse_adaln`` has projections to stack in ``model`` (a DiT whose blocks share one conditioning)."""
    from .dit import DiT

    return isinstance(model, DiT) and model._adaln_layers() is not None


def apply_fusions(model: nn.Module, qkv: bool, adaln: bool) -> list[str]:
    """Make ``model``'s weight fusions what a config asks for: fuse those requested, undo those not (a later
    ``optimize`` without the switch runs the per-layer projections again). Returns notes for a requested
    fusion that found nothing to fuse."""
    from .dit import DiT
    from .unet import MultiHeadAttention

    notes = []
    if qkv:
        if not fuse_qkv(model):
            notes.append("fuse_qkv ignored: the model has no self-attention with separate q, k, v projections")
    else:
        for m in model.modules():
            if isinstance(m, MultiHeadAttention):
                m.qkv_weight = m.qkv_bias = None
    if adaln:
        if not fuse_adaln(model):
            notes.append("fuse_adaln ignored: only a DiT whose blocks share one conditioning has adaLN "
                         "projections to stack")
    elif isinstance(model, DiT):
        model.unstack("adaln")  # the layers keep their (equal) weights
    return notes
