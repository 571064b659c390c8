"""guided-diffusion's noisy-image classifier (ADM's ``EncoderUNetModel``, Dhariwal & Nichol 2021, section 4).

The classifier is the UNet's first half (input convolution, time embedding, input blocks, middle block: the native
UNet built without its up path) and a head that pools the last feature map into class logits. ADM's four heads:

* ``attention`` (the released 64 / 128 / 256 / 512 px classifiers): GroupNorm + SiLU, then CLIP's attention pooling,
  one query (the mean token) attending over the HW tokens and itself with a learned positional embedding; the
  embedding fixes the image size the classifier takes;
* ``adaptive``: GroupNorm + SiLU, a global average, a 1x1 convolution;
* ``spatial`` / ``spatial_v2``: the spatial mean of every input block's output and of the middle block's, one
  vector, through an MLP (ReLU; or GroupNorm + SiLU).

``forward(x, timestep)`` takes the variance-preserving noisy image x_t (B, C, H, W) and the training timestep t (B,),
as ADM's ``cond_fn`` hands them over, and returns the logits (B, classes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import BadArgumentError
from .layers import GroupNorm
from .unet import UNet
from .unet_config import UNetConfig

POOLS = ("attention", "adaptive", "spatial", "spatial_v2")


@dataclass
class ClassifierConfig:
    """The encoder's UNet config (its up path unused), the class count and the head. ``tokens``: the attention
    head's HW, the bottom feature map's pixel count at the trained size (``image_size``)."""

    encoder: UNetConfig
    num_classes: int
    pool: str = "attention"
    image_size: int = 64
    head_channels: int = 64
    tokens: int = 0

    def __post_init__(self):
        if self.pool not in POOLS:
            raise BadArgumentError(f"pool: expected one of {POOLS}, found {self.pool!r}")

    @property
    def feature_size(self) -> int:
        """Width of the spatial heads' input: every input block's channels, and the middle block's."""
        c = self.encoder
        ch = list(c.block_out_channels)
        per = c.layers_per_block
        widths = [ch[0]] + [w for i, w in enumerate(ch) for _ in range(per + (i < len(ch) - 1))]
        return sum(widths) + ch[-1]


class AttentionPool(nn.Module):
    """ADM's ``AttentionPool2d`` (CLIP's): the mean token queries [mean, pixels] + a positional embedding, heads of
    ``head_channels`` (QKVAttention: q, k, v each (head, channel) ordered), then a projection to ``out_dim``. Only
    the mean token's output is read, so only its query is computed."""

    def __init__(self, channels: int, tokens: int, head_channels: int, out_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.zeros(channels, tokens + 1))  # (C, HW + 1)
        self.qkv_proj = nn.Linear(channels, 3 * channels)
        self.c_proj = nn.Linear(channels, out_dim)
        self.heads = channels // head_channels

    def forward(self, h):
        b, c = h.shape[:2]
        seq = h.flatten(2)  # (B, C, HW)
        seq = torch.cat([seq.mean(-1, keepdim=True), seq], dim=-1) + self.positional_embedding.to(seq.dtype)
        q, k, v = self.qkv_proj(seq.transpose(1, 2)).chunk(3, dim=-1)  # each (B, HW + 1, C)
        heads = lambda t: t.reshape(b, t.shape[1], self.heads, c // self.heads).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(heads(q[:, :1]), heads(k), heads(v))  # (B, heads, 1, C / heads)
        return self.c_proj(out.transpose(1, 2).reshape(b, c))  # (B, out)


class ADMClassifier(nn.Module):
    """ADM's ``EncoderUNetModel``: ``forward(x, timestep) -> logits (B, classes)``."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = c = config
        self.encoder = UNet(c.encoder, up_path=False)
        ch = c.encoder.block_out_channels[-1]
        if c.pool in ("attention", "adaptive"):
            self.norm_out = GroupNorm(c.encoder.norm_num_groups, ch, c.encoder.norm_eps, activation="silu")
        if c.pool == "attention":
            self.attention_pool = AttentionPool(ch, c.tokens, c.head_channels, c.num_classes)
        elif c.pool == "adaptive":
            self.proj_out = nn.Linear(ch, c.num_classes)
        else:
            width = 2048
            self.head_in = nn.Linear(c.feature_size, width)
            # spatial_v2: GroupNorm32 + SiLU on the (B, 2048) features; spatial: ReLU
            self.head_norm = GroupNorm(32, width, 1e-5, activation="silu") if c.pool == "spatial_v2" else None
            self.head_out = nn.Linear(width, c.num_classes)

    def forward(self, x, timestep):
        enc, pool, size = self.encoder, self.config.pool, self.config.image_size
        if pool == "attention" and tuple(x.shape[2:]) != (size, size):  # (its positional embedding's pixels)
            raise BadArgumentError(f"classifier input: expected {size}x{size} images (the size its attention pooling "
                                   f"was trained at), found {x.shape[2]}x{x.shape[3]}; generate at that size "
                                   f"(height= / width=)")
        _, emb, _ = enc._conditioning(x, timestep, None, None, None, None)
        h, skips = enc._down_and_middle(enc.conv_in(x), emb, None)  # (B, C_last, h, w), every input block's output
        if pool == "attention":
            return self.attention_pool(self.norm_out(h))  # (B, classes)
        if pool == "adaptive":
            return self.proj_out(self.norm_out(h).mean(dim=(2, 3)))  # (B, classes)
        features = torch.cat([s.mean(dim=(2, 3)) for s in skips + [h]], dim=-1)  # (B, feature_size)
        hidden = self.head_in(features)  # (B, 2048)
        if self.head_norm is None:
            hidden = F.relu(hidden)
        else:
            hidden = self.head_norm(hidden[:, :, None, None])[:, :, 0, 0]
        return self.head_out(hidden)  # (B, classes)
