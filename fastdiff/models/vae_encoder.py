"""The encoder half of diffusers' ``AutoencoderKL``: images -> the latent distribution img2img starts from.

Parameter names are diffusers' (``encoder.down_blocks.0.resnets.1.conv2``, ``quant_conv``), so a pipeline's ``vae/``
folder loads with no renaming. ``VAEDecoder`` (``fastdiff.models.vae``) holds one as ``encoder`` when its weights
carry it (with ``quant_conv``); a decoder-only file leaves both None and ``encode`` refuses.

Sampling the posterior follows diffusers' ``DiagonalGaussianDistribution``: the log-variance is clamped to
[-30, 20] and ``mean + std * eps``, with eps drawn from each sample's own generator (``NoiseSource``), in the order
diffusers' img2img pipelines draw it (the posterior first, then the start noise).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .layers import GroupNorm
from .unet import Downsample, MidBlock, ResnetBlock, SpatialSelfAttention

VAE_EPS = 1e-6  # every norm of diffusers' VAE
LOGVAR_RANGE = (-30.0, 20.0)  # DiagonalGaussianDistribution's clamp


def vae_mid_block(ch: int, groups: int, attention: bool) -> MidBlock:
    """diffusers' ``UNetMidBlock2D`` as both VAE halves build it: resnet, one-head attention over the pixels, resnet."""
    attn = [SpatialSelfAttention(ch, 1, ch, groups, VAE_EPS)] if attention else None
    return MidBlock([ResnetBlock(ch, ch, None, groups, VAE_EPS), ResnetBlock(ch, ch, None, groups, VAE_EPS)], attn)


class DownEncoderBlock(nn.Module):
    """diffusers ``DownEncoderBlock2D``: ``layers_per_block`` resnets, then (except the last block) a stride-2 conv
    after padding right / bottom by one."""

    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(in_ch if i == 0 else out_ch, out_ch, None, groups, VAE_EPS)
                                      for i in range(layers)])
        self.downsamplers = nn.ModuleList([Downsample(out_ch, padding=0)]) if downsample else None

    def forward(self, h):
        for resnet in self.resnets:
            h = resnet(h, None)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
        return h


class Encoder(nn.Module):
    """image (B, in, H, W) -> moments (B, 2z, H / 2^(n-1), W / 2^(n-1)): the mean and log-variance, stacked."""

    def __init__(self, c):
        super().__init__()
        ch = list(c.block_out_channels)
        groups = c.norm_num_groups
        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            DownEncoderBlock(ch[max(i - 1, 0)], ch[i], c.layers_per_block, groups, downsample=i < len(ch) - 1)
            for i in range(len(ch))])
        self.mid_block = vae_mid_block(ch[-1], groups, c.mid_block_add_attention)
        self.conv_norm_out = GroupNorm(groups, ch[-1], VAE_EPS, activation="silu")
        self.conv_out = nn.Conv2d(ch[-1], 2 * c.latent_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)  # (B, C0, H, W)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h, None)  # (B, C_last, h, w)
        return self.conv_out(self.conv_norm_out(h))  # (B, 2z, h, w)


def split_moments(moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``quant_conv``'s output (B, 2z, h, w) -> (mean, logvar), each (B, z, h, w), the log-variance clamped as
    diffusers' ``DiagonalGaussianDistribution`` clamps it."""
    mean, logvar = moments.chunk(2, dim=1)
    return mean, logvar.clamp(*LOGVAR_RANGE)


__all__ = ["vae_mid_block", "VAE_EPS", "Encoder", "DownEncoderBlock", "split_moments", "LOGVAR_RANGE"]
