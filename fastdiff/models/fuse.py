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
