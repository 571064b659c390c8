"""Weight-level fusions applied by ``pipe.optimize`` (never saved: checkpoints keep the original layout)."""

from __future__ import annotations

import torch.nn as nn


def fuse_qkv(model: nn.Module) -> int:
    """Give every self-attention one (3*inner, dim) projection instead of three; returns how many.

    The three layers' weights become views of the stacked one (``LinearStacks``, stack "qkv" of each
    ``MultiHeadAttention``): no second copy, and ``state_dict`` / ``save`` keep the per-layer keys. DiT already
    stores qkv fused.
    """
    from .unet import MultiHeadAttention

    return sum(1 for m in model.modules() if isinstance(m, MultiHeadAttention) and m.stack("qkv"))


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


def fuse_conditioning(model: nn.Module) -> int:
    """Give a UNet one matmul for every resnet's time-embedding projection (all read SiLU(emb)) and one for every
    cross-attention layer's key and value projections (all read the text states); returns how many projections
    were stacked (0 for other models).

    SD1.5 runs 22 time projections and 32 key / value projections per call, each a small matmul in a launch of
    its own; stacked they are two. The layers' weights become views of the stacks (``UNet.stack``): no second
    copy, ``state_dict`` and ``save`` keep diffusers' layout.
    """
    from .unet import UNet

    if not isinstance(model, UNet):
        return 0
    return sum(model.stack(name) for name in UNet.STACKS)


def qkv_stackable(model: nn.Module) -> bool:
    """Whether ``fuse_qkv`` has a self-attention with separate q, k, v projections to stack in ``model``."""
    from .unet import MultiHeadAttention

    return any(isinstance(m, MultiHeadAttention) and m.stack_layers("qkv") for m in model.modules())


def conditioning_stackable(model: nn.Module) -> bool:
    """Whether ``fuse_conditioning`` has projections to stack in ``model`` (a UNet with resnets or
    cross-attention)."""
    from .unet import UNet

    return isinstance(model, UNet) and any(model.stack_layers(name) for name in UNet.STACKS)


def adaln_stackable(model: nn.Module) -> bool:
    """Whether ``fuse_adaln`` has projections to stack in ``model`` (a DiT whose blocks share one conditioning)."""
    from .dit import DiT

    return isinstance(model, DiT) and model._adaln_layers() is not None


def apply_fusions(model: nn.Module, qkv: bool, adaln: bool, conditioning: bool = False) -> list[str]:
    """Make ``model``'s weight fusions what a config asks for: fuse those requested, undo those not (a later
    ``optimize`` without the switch runs the per-layer projections again). Returns notes for a requested
    fusion that found nothing to fuse."""
    from .dit import DiT
    from .unet import MultiHeadAttention, UNet

    notes = []
    if qkv:
        if not fuse_qkv(model):
            notes.append("fuse_qkv ignored: the model has no self-attention with separate q, k, v projections")
    else:
        for m in model.modules():
            if isinstance(m, MultiHeadAttention):
                m.unstack("qkv")
    if adaln:
        if not fuse_adaln(model):
            notes.append("fuse_adaln ignored: only a DiT whose blocks share one conditioning has adaLN "
                         "projections to stack")
    elif isinstance(model, DiT):
        model.unstack("adaln")  # the layers keep their (equal) weights
    if conditioning:
        if not fuse_conditioning(model):
            notes.append("fuse_conditioning ignored: only a UNet has time-embedding or cross-attention projections "
                         "to stack")
    elif isinstance(model, UNet):
        for name in UNet.STACKS:
            model.unstack(name)
    return notes
