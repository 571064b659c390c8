"""Convolution biases out of separate kernels, for a UNet on a GPU (``OptimizeConfig.fuse_conv_bias``).

cuDNN convolutions do not add a bias: PyTorch adds it afterwards in a broadcast element-wise kernel that reads
and writes the whole output once more (98 such kernels per SD1.5 call, 6.5% of its device time on an H200, run
4). Three rewrites remove most of them without changing a weight:

- a 1x1 convolution of a channels-last input is a GEMM over its (B*H*W, C) rows: ``F.linear`` runs it with
  the bias in cuBLAS's epilogue (the attention blocks' ``proj_in`` / ``proj_out``, the resnets' shortcuts);
- a resnet's ``conv1`` bias joins the time embedding its GroupNorm adds before normalising (one (B, C) add);
- a resnet's ``conv2`` bias joins its shortcut's bias (one (C,) add), as both land in the same sum.

The last two hold in any layout; the first needs the channels-last image (torch's CUDA GroupNorm returns NCHW,
fastdiff's Triton one keeps the input's layout).

What is left: ``conv_in``, ``conv_out``, the resamplers and the ``conv2`` of resnets without a shortcut.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def is_pointwise(conv: nn.Module) -> bool:
    """Whether ``conv`` is a 1x1, stride-1, unpadded, ungrouped 2-D convolution (a GEMM over pixels)."""
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.padding in ((0, 0), "valid") and conv.dilation == (1, 1) and conv.groups == 1)


def pixel_rows(x: torch.Tensor) -> Optional[torch.Tensor]:
    """The (B*H*W, C) rows of a channels-last (B, C, H, W) image, as a view; None for another layout."""
    if x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last):
        return None
    b, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(b * h * w, c)


def pointwise_linear(conv: nn.Conv2d, rows: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``conv`` on pixel rows (N, C_in) -> (N, C_out): one GEMM with the bias in its epilogue (``bias``
    replaces the conv's own, e.g. summed with another's)."""
    weight = conv.weight.reshape(conv.out_channels, conv.in_channels)  # (out, in): a view of the 1x1 kernel
    return F.linear(rows, weight, conv.bias if bias is None else bias)


def pointwise_conv(conv: nn.Conv2d, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``conv(x)`` for a pointwise ``conv``: a GEMM on a channels-last ``x`` (output channels-last, as cuDNN's
    would be), the convolution with ``bias`` otherwise."""
    rows = pixel_rows(x)
    if rows is None:
        return F.conv2d(x, conv.weight, conv.bias if bias is None else bias)
    b, _, h, w = x.shape
    return pointwise_linear(conv, rows, bias).view(b, h, w, conv.out_channels).permute(0, 3, 1, 2)


def conv_without_bias(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` minus its bias (which the caller adds elsewhere)."""
    return conv._conv_forward(x, conv.weight, None)


def set_conv_bias_fusion(model: nn.Module, enabled: bool) -> int:
    """Turn the rewrites on or off in every UNet resnet and attention block of ``model``; returns how many
    blocks take them."""
    from .unet import ResnetBlock, SpatialTransformer

    count = 0
    for m in model.modules():
        if isinstance(m, (ResnetBlock, SpatialTransformer)):
            m.fuse_conv_bias = enabled
            count += 1
    return count
