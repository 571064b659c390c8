"""fastdiff's native UNet: the diffusers ``UNet2DModel`` and ``UNet2DConditionModel`` families.

Read top to bottom: embeddings, the residual block, resampling, the two attention flavours (the
spatial self-attention of pixel UNets, the transformer with cross-attention of Stable Diffusion),
the down / mid / up blocks, then the model (its config: ``unet_config.py``).

Parameter names follow diffusers exactly (``down_blocks.0.resnets.1.norm1.weight``), so a diffusers
checkpoint loads with no renaming, and every config field the model does not implement is refused by
``UNetConfig`` instead of silently building a different network. GroupNorm(+SiLU, +scale-shift) and the
attention core go through the fused-op layers of ``layers.py``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import BadArgumentError
from .conv_bias import conv_without_bias, is_pointwise, pixel_rows, pointwise_conv, pointwise_linear
from .freeu import freeu_join
from .ip_adapter import ImageTokens, add_image_attention, image_context
from .layers import Attention as AttentionCore
from .layers import GEGLU, GroupNorm, LayerNorm, timestep_embedding
from .linear_stack import LinearStacks, Projected, project, stacked_output
from .unet_config import UNetConfig, block_attention, mid_transformer_depth, transformer_depths

# --------------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------------


class SinusoidalTimesteps(nn.Module):
    """diffusers ``Timesteps``: (B,) timesteps -> (B, dim) sin/cos features (no parameters)."""

    def __init__(self, dim: int, flip_sin_to_cos: bool, freq_shift: float):
        super().__init__()
        self.dim, self.flip_sin_to_cos, self.freq_shift = dim, flip_sin_to_cos, freq_shift

    def forward(self, t):
        return timestep_embedding(t, self.dim, flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift)


class FourierTimesteps(nn.Module):
    """diffusers ``GaussianFourierProjection``: fixed random frequencies ``weight`` (a checkpoint tensor).

    UNet2DModel (score-SDE / NCSN++ style) feeds log(sigma) and orders [sin, cos]; UNet2DConditionModel
    feeds t itself and honours ``flip_sin_to_cos``.
    """

    def __init__(self, size: int, log: bool, flip_sin_to_cos: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size), requires_grad=False)
        self.log, self.flip_sin_to_cos = log, flip_sin_to_cos

    def forward(self, t):
        t = t.float()
        if self.log:
            t = torch.log(t)
        proj = t[:, None] * self.weight[None, :] * 2 * math.pi  # (B, size)
        parts = (torch.cos(proj), torch.sin(proj)) if self.flip_sin_to_cos else (torch.sin(proj), torch.cos(proj))
        return torch.cat(parts, dim=-1)  # (B, 2*size)


class TimestepEmbedding(nn.Module):
    """Linear -> SiLU -> Linear (diffusers' ``TimestepEmbedding`` key names)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


# --------------------------------------------------------------------------------------------------
# Residual block and resampling
# --------------------------------------------------------------------------------------------------


class ResnetBlock(nn.Module):
    """diffusers ``ResnetBlock2D`` with SiLU: GN+SiLU -> conv -> (+temb | scale-shift GN) -> SiLU -> conv.

    ``time_embedding_norm="scale_shift"`` modulates the second norm: norm(h) * (1 + scale) + shift.
    """

    def __init__(self, in_ch: int, out_ch: int, temb_ch: Optional[int], groups: int, eps: float,
                 time_embedding_norm: str = "default", output_scale_factor: float = 1.0, resample: Optional[str] = None):
        super().__init__()
        self.resample = resample  # None | "up" (nearest x2) | "down" (2x2 average): ADM's resblock_updown
        self.time_embedding_norm = time_embedding_norm
        self.output_scale_factor = output_scale_factor
        self.norm1 = GroupNorm(groups, in_ch, eps, activation="silu")
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = None
        if temb_ch is not None:
            self.time_emb_proj = nn.Linear(temb_ch, out_ch * (2 if time_embedding_norm == "scale_shift" else 1))
        self.norm2 = GroupNorm(groups, out_ch, eps, activation="silu")
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None
        self.temb_index = None  # this block's part of the stacked time projections (UNet "temb" stack)
        self.fuse_conv_bias = False  # OptimizeConfig.fuse_conv_bias (fastdiff.models.conv_bias)

    def forward(self, x, temb_act, size=None):
        """x (B, in, H, W); ``temb_act`` = SiLU(time embedding) (B, temb), computed once per UNet call, or that
        with every resnet's projection of it (``Projected``)."""
        h = self.norm1(x)  # (B, in, H, W)
        if self.resample == "up":
            h, x = _nearest_up(h, size), _nearest_up(x, size)  # (B, in, 2H, 2W)
        elif self.resample == "down":
            h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)  # (B, in, H/2, W/2)
        t = None if self.time_emb_proj is None else project(self.time_emb_proj, self.temb_index, temb_act)  # (B, out)
        # fuse_conv_bias: the convolutions' biases join the time embedding and the shortcut (a GEMM on a
        # channels-last image; torch's CUDA GroupNorm returns NCHW, so the folds do not wait for that layout)
        fold = self.fuse_conv_bias
        if fold and t is not None and self.time_embedding_norm != "scale_shift" and self.conv1.bias is not None:
            h, t = conv_without_bias(self.conv1, h), t + self.conv1.bias  # (B, out, H, W), (B, out)
        else:
            h = self.conv1(h)  # (B, out, H, W)
        if self.time_embedding_norm == "scale_shift":
            scale, shift = t.chunk(2, dim=1)  # (B, out) each
            h = self.norm2(h, scale=scale, shift=shift)
        else:  # h + t, then the norm: one fused op on the Triton path
            h = self.norm2(h, pre_bias=t)
        shortcut = self.conv_shortcut
        if fold and shortcut is not None and is_pointwise(shortcut) and None not in (shortcut.bias, self.conv2.bias):
            h = conv_without_bias(self.conv2, h)  # (B, out, H, W)
            x = pointwise_conv(shortcut, x, bias=shortcut.bias + self.conv2.bias)  # (B, out, H, W)
        else:
            h = self.conv2(h)  # (B, out, H, W)
            if shortcut is not None:
                x = shortcut(x)
        out = x + h
        return out if self.output_scale_factor == 1.0 else out / self.output_scale_factor


class Downsample(nn.Module):
    """Strided 3x3 conv; ``padding=0`` pads right/bottom by one first (diffusers ``Downsample2D``)."""

    def __init__(self, ch: int, padding: int):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=padding)

    def forward(self, x, temb=None):
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Nearest x2 (or to the skip connection's size for odd inputs), then a 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, temb=None, size=None):
        return self.conv(_nearest_up(x, size))  # (B, C, 2H, 2W)


def _nearest_up(x, size=None):
    if size is None:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    return F.interpolate(x, size=size, mode="nearest")


# --------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------


class MultiHeadAttention(LinearStacks, nn.Module):
    """diffusers ``Attention`` on token sequences: to_q / to_k / to_v / to_out.0, SDPA core.

    forward(x (B, N, query_dim), context (B, M, context_dim) or None) -> (B, N, query_dim).
    ``upcast`` computes the attention in float32 when the inputs are half precision (SD 2.x
    ``upcast_attention``) on torch's path only (the core's ``upcast``: see ``fastdiff.models.layers.Attention``).
    """

    STACKS = ("qkv",)

    def __init__(self, query_dim: int, heads: int, head_dim: int, context_dim: Optional[int] = None,
                 qkv_bias: bool = False, upcast: bool = False):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.is_cross = context_dim is not None  # keys / values from the text states (the UNet's "cross_kv" stack)
        self.to_q = nn.Linear(query_dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=qkv_bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim)])
        self.core = AttentionCore()
        self.upcast = upcast
        # Self-attention's q | k | v projections as one (stack "qkv": qkv_weight / qkv_bias, which the three
        # layers' weights then view; fastdiff.models.fuse.fuse_qkv).
        self._init_stacks()
        self.kv_index = None  # this layer's part of the stacked key / value projections (UNet "cross_kv" stack)
        self.ip = None  # IP-Adapters' image branches (ModuleList of fastdiff.models.ip_adapter.IPAttention), if loaded

    def forward(self, x, context=None):
        b = x.shape[0]
        kv = image = None
        if isinstance(context, ImageTokens):  # an image prompt's tokens beside the text states
            image, context = context, context.states
        if isinstance(context, Projected):  # the text states, with every cross-attention's k | v from one matmul
            kv = None if self.kv_index is None else context.parts[self.kv_index]  # (B, M, 2 * inner), strided rows
            context = context.states
        if kv is not None:
            inner = self.heads * self.head_dim
            q, k, v = self._heads(self.to_q(x)), self._heads(kv[..., :inner]), self._heads(kv[..., inner:])
        elif context is None and (qkv := stacked_output(self, "qkv", x)) is not None:  # one q | k | v matmul
            q, k, v = qkv.view(b, -1, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, d)
        else:
            ctx = x if context is None else context
            q, k, v = self._heads(self.to_q(x)), self._heads(self.to_k(ctx)), self._heads(self.to_v(ctx))
        o = self._attend(b, q, k, v)  # (B, N, inner)
        if image is not None and self.ip is not None:  # + scale * attention to each adapter's tokens (IP-Adapter)
            o = add_image_attention(self, o, q, image)
        return self.to_out[0](o)  # (B, N, query_dim)

    def stack_layers(self, name: str):
        """q, k, v of a self-attention (one input; cross-attention's k / v read the text states instead)."""
        if name != "qkv" or self.is_cross:
            return None
        return [self.to_q, self.to_k, self.to_v]

    def _heads(self, t):
        """(B, N, inner) -> (B, H, N, d) view."""
        return t.view(t.shape[0], -1, self.heads, self.head_dim).transpose(1, 2)

    @property
    def upcast(self) -> bool:
        return self.core.upcast

    @upcast.setter
    def upcast(self, value: bool) -> None:
        self.core.upcast = bool(value)

    def _attend(self, b, q, k, v):
        """(B, H, N, d) q and (B, H, M, d) k / v -> (B, N, inner), before the output projection."""
        o = self.core(q, k, v)  # (B, H, N, d)
        return o.transpose(1, 2).reshape(b, -1, self.heads * self.head_dim)  # (B, N, inner)


class SpatialSelfAttention(MultiHeadAttention):
    """The pixel-UNet attention block (diffusers ``Attention`` with ``residual_connection=True``).

    forward(x (B, C, H, W)) -> (B, C, H, W): optional GroupNorm, self-attention over H*W tokens,
    residual, divided by ``rescale_output_factor``.
    """

    def __init__(self, ch: int, heads: int, head_dim: int, norm_groups: Optional[int], eps: float,
                 rescale_output_factor: float = 1.0):
        super().__init__(ch, heads, head_dim, qkv_bias=True)
        self.group_norm = GroupNorm(norm_groups, ch, eps) if norm_groups is not None else None
        self.rescale_output_factor = rescale_output_factor

    def forward(self, x, context=None):
        b, c, h, w = x.shape
        tokens = x.view(b, c, h * w).transpose(1, 2)  # (B, HW, C)
        if self.group_norm is not None:
            tokens = self.group_norm(tokens.transpose(1, 2)).transpose(1, 2)
        out = super().forward(tokens)  # (B, HW, C)
        out = out.transpose(1, 2).reshape(b, c, h, w) + x
        return out if self.rescale_output_factor == 1.0 else out / self.rescale_output_factor


class GEGLUFeedForward(nn.Module):
    """diffusers ``FeedForward(activation_fn="geglu")``: net.0.proj (2*inner) -> x * gelu(gate) -> net.2."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner = dim * mult
        self.net = nn.ModuleList([_GEGLU(dim, inner), nn.Identity(), nn.Linear(inner, dim)])

    def forward(self, x):
        return self.net[2](self.net[0](x))


class _GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)
        self.act = GEGLU()  # no weights: the checkpoint keys stay diffusers' net.0.proj

    def forward(self, x):
        return self.act(self.proj(x))  # (B, N, 2 * inner) -> (B, N, inner)


class TransformerBlock(nn.Module):
    """diffusers ``BasicTransformerBlock`` (layer_norm): self-attn, cross-attn, GEGLU feed-forward. ``only_cross``:
    the first attention attends to the text states too (diffusers' ``only_cross_attention``)."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, upcast: bool, only_cross: bool = False):
        super().__init__()
        self.only_cross = only_cross
        self.norm1 = LayerNorm(dim)
        self.attn1 = MultiHeadAttention(dim, heads, head_dim, context_dim=context_dim if only_cross else None,
                                        upcast=upcast)
        self.norm2 = LayerNorm(dim)
        self.attn2 = MultiHeadAttention(dim, heads, head_dim, context_dim=context_dim, upcast=upcast)
        self.norm3 = LayerNorm(dim)
        self.ff = GEGLUFeedForward(dim)

    def forward(self, x, context):
        # each attention's residual is added by the LayerNorm after it (one pass on the Triton path)
        # (an only_cross first attention reads the text states: not the second's stacked k / v, nor image tokens)
        first = self.attn1(self.norm1(x), context if self.only_cross else None)  # (B, N, D)
        x, h = self.norm2(x, residual=first)  # (B, N, D) each
        x, h = self.norm3(x, residual=self.attn2(h, context))  # (B, N, D) each
        return x + self.ff(h)  # (B, N, D)


class SpatialTransformer(nn.Module):
    """diffusers ``Transformer2DModel`` for continuous inputs (Stable Diffusion's attention block).

    GroupNorm(eps 1e-6) -> proj_in (1x1 conv, or Linear with ``use_linear_projection``) -> blocks ->
    proj_out -> residual. forward(x (B, C, H, W), context (B, M, context_dim)) -> (B, C, H, W).
    """

    def __init__(self, ch: int, heads: int, head_dim: int, depth: int, context_dim: int, groups: int,
                 linear_projection: bool, upcast: bool, only_cross: bool = False):
        super().__init__()
        inner = heads * head_dim
        self.linear_projection = linear_projection
        self.norm = GroupNorm(groups, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, inner) if linear_projection else nn.Conv2d(ch, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(inner, heads, head_dim, context_dim, upcast, only_cross) for _ in range(depth)])
        self.proj_out = nn.Linear(inner, ch) if linear_projection else nn.Conv2d(inner, ch, 1)
        self.fuse_conv_bias = False  # OptimizeConfig.fuse_conv_bias: 1x1 projections as GEMMs (channels-last)

    def forward(self, x, context):
        b, c, h, w = x.shape
        t = self.norm(x)  # (B, C, H, W)
        rows = pixel_rows(t) if self.fuse_conv_bias and not self.linear_projection else None  # (BHW, C) or None
        if self.linear_projection:
            t = self.proj_in(t.permute(0, 2, 3, 1).reshape(b, h * w, c))  # (B, HW, inner)
        elif rows is not None:  # the 1x1 conv as a GEMM with its bias in the epilogue
            t = pointwise_linear(self.proj_in, rows).view(b, h * w, -1)  # (B, HW, inner)
        else:
            t = self.proj_in(t)
            t = t.permute(0, 2, 3, 1).reshape(b, h * w, t.shape[1])  # (B, HW, inner)
        for block in self.transformer_blocks:
            t = block(t, context)
        if self.linear_projection:
            t = self.proj_out(t).reshape(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, H, W)
        elif rows is not None:
            t = pointwise_linear(self.proj_out, t.reshape(b * h * w, -1)).view(b, h, w, c).permute(0, 3, 1, 2)
        else:
            # the tokens (B, HW, inner) are already a channels-last image: keep the input's layout, so a
            # channels-last UNet (optimize(channels_last=True)) makes no NCHW copy here (16 per SD1.5 call)
            layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else None
            t = t.reshape(b, h, w, -1).permute(0, 3, 1, 2)  # (B, inner, H, W)
            t = self.proj_out(t.contiguous(memory_format=layout or torch.contiguous_format))
        return t + x


# --------------------------------------------------------------------------------------------------
# Down / mid / up blocks
# --------------------------------------------------------------------------------------------------


class DownBlock(nn.Module):
    """DownBlock2D / AttnDownBlock2D / CrossAttnDownBlock2D: resnets (+ attention each) (+ downsample).

    Returns (h, skips): every resnet(+attn) output and the downsampled output are skip connections.
    """

    def __init__(self, resnets: Sequence[nn.Module], attentions: Optional[Sequence[nn.Module]],
                 downsample: Optional[nn.Module]):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions) if attentions is not None else None
        self.downsamplers = nn.ModuleList([downsample]) if downsample is not None else None

    def forward(self, h, temb, context=None):
        skips = []
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, temb)
            if self.attentions is not None:
                h = self.attentions[i](h, context)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h, temb)
            skips.append(h)
        return h, skips


class MidBlock(nn.Module):
    """UNetMidBlock2D / UNetMidBlock2DCrossAttn: resnet, then (attention, resnet) pairs."""

    def __init__(self, resnets: Sequence[nn.Module], attentions: Optional[Sequence[nn.Module]]):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions) if attentions else None

    def forward(self, h, temb, context=None):
        h = self.resnets[0](h, temb)
        for i, resnet in enumerate(self.resnets[1:]):
            if self.attentions is not None:
                h = self.attentions[i](h, context)
            h = resnet(h, temb)
        return h


class UpBlock(nn.Module):
    """UpBlock2D / AttnUpBlock2D / CrossAttnUpBlock2D: concat a skip, resnet (+ attention), upsample."""

    def __init__(self, resnets: Sequence[nn.Module], attentions: Optional[Sequence[nn.Module]],
                 upsample: Optional[nn.Module]):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions) if attentions is not None else None
        self.upsamplers = nn.ModuleList([upsample]) if upsample is not None else None
        self.freeu: Optional[tuple] = None  # (b, s): FreeU's factors of this block (fastdiff.models.freeu)

    def forward(self, h, skips, temb, context=None, upsample_size=None):
        for i, resnet in enumerate(self.resnets):
            h, skip = freeu_join(h, skips.pop(), self.freeu)
            h = resnet(torch.cat([h, skip], dim=1), temb)  # (B, C_out, H, W)
            if self.attentions is not None:
                h = self.attentions[i](h, context)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h, temb, upsample_size)
        return h


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


class UNet(LinearStacks, nn.Module):
    """The native UNet. forward(x, timestep, class_labels=None, encoder_hidden_states=None) -> Tensor.

    Returns the same raw tensor as the diffusers model the config came from (eps, v or x0 by the
    checkpoint's training; this class does not know which).

    Two groups of projections read one input per call and can each run as one matmul
    (``fastdiff.models.fuse.fuse_conditioning``): ``temb``, every resnet's time-embedding projection (all read
    SiLU(emb)), and ``cross_kv``, every cross-attention layer's key and value projections (all read the text
    states). SD1.5: 22 and 32 small matmuls per call.
    """

    STACKS = ("temb", "cross_kv")

    def __init__(self, config: UNetConfig, up_path: bool = True):
        super().__init__()
        config.validate()
        self.config = c = config
        ch = list(c.block_out_channels)
        n = len(ch)
        temb_dim = c.time_embed_dim
        groups, eps, cond = c.norm_num_groups, c.norm_eps, c.conditional

        # Embeddings --------------------------------------------------------------------------
        self.ip_projection = None  # IP-Adapters' image projections (ModuleList: fastdiff.models.ip_adapter), if loaded
        self.conv_in = nn.Conv2d(c.in_channels, ch[0], c.conv_in_kernel, padding=(c.conv_in_kernel - 1) // 2)
        if c.time_embedding_type == "fourier":
            size = temb_dim // 2 if cond else ch[0]
            self.time_proj = FourierTimesteps(size, log=not cond, flip_sin_to_cos=c.flip_sin_to_cos and cond)
            t_in = 2 * size
        elif c.time_embedding_type == "learned":
            self.time_proj = nn.Embedding(c.num_train_timesteps, ch[0])
            t_in = ch[0]
        else:
            t_in = c.time_proj_dim or ch[0]
            self.time_proj = SinusoidalTimesteps(t_in, c.flip_sin_to_cos, c.freq_shift)
        self.time_embedding = TimestepEmbedding(t_in, temb_dim)
        self.class_embedding = None
        if c.class_embed_type is None and c.num_class_embeds is not None:
            self.class_embedding = nn.Embedding(c.num_class_embeds, temb_dim)
        elif c.class_embed_type == "timestep":
            self.class_embedding = TimestepEmbedding(t_in, temb_dim)
        elif c.class_embed_type == "identity":
            self.class_embedding = nn.Identity()
        elif c.class_embed_type == "projection":
            self.class_embedding = TimestepEmbedding(c.projection_class_embeddings_input_dim, temb_dim)
        elif c.class_embed_type == "simple_projection":
            self.class_embedding = nn.Linear(c.projection_class_embeddings_input_dim, temb_dim)
        block_temb = temb_dim * 2 if c.class_embeddings_concat else temb_dim
        if c.addition_embed_type == "text_time":  # SDXL: pooled text + sinusoidal size / crop ids
            self.add_time_proj = SinusoidalTimesteps(c.addition_time_embed_dim, c.flip_sin_to_cos, c.freq_shift)
            self.add_embedding = TimestepEmbedding(c.projection_class_embeddings_input_dim, block_temb)

        # Per-block settings --------------------------------------------------------------------
        layers = c.per_block(c.layers_per_block, "layers_per_block")
        head_dims = c.per_block(c.attention_head_dim, "attention_head_dim")
        heads = c.per_block(c.num_attention_heads, "num_attention_heads") if cond else [None] * n
        ctx_dims = c.per_block(c.cross_attention_dim, "cross_attention_dim")
        depth = transformer_depths(c.transformer_layers_per_block, layers, n)
        up_depth = ([list(d) if not isinstance(d, int) else [d] * (layers[n - 1 - i] + 1)
                     for i, d in enumerate(c.reverse_transformer_layers_per_block)]
                    if c.reverse_transformer_layers_per_block is not None else None)

        def resnet(i_ch, o_ch, scale=1.0):
            return ResnetBlock(i_ch, o_ch, block_temb, groups, eps, c.resnet_time_scale_shift, scale)

        # (diffusers' UNetMidBlock2DCrossAttn never reads only_cross_attention: its transformers self-attend first)
        only_cross = c.per_block(c.only_cross_attention, "only_cross_attention")

        def attention(kind, o_ch, i, depth_i=1, norm_groups=groups, rescale=1.0, head_i=None):
            if kind == "cross":
                return SpatialTransformer(o_ch, heads[i], o_ch // heads[i], depth_i, ctx_dims[i], groups,
                                          c.use_linear_projection, c.upcast_attention, bool(only_cross[i]))
            head_i = i if head_i is None else head_i
            hd = head_dims[head_i] if head_dims[head_i] is not None else o_ch
            return SpatialSelfAttention(o_ch, o_ch // hd, hd, norm_groups, eps, rescale)

        # Down path ---------------------------------------------------------------------------
        self.down_blocks = nn.ModuleList()
        out_ch = ch[0]
        for i, kind in enumerate(c.down_block_types):
            in_ch, out_ch = out_ch, ch[i]
            attn_kind = block_attention(kind)
            resnets = [resnet(in_ch if j == 0 else out_ch, out_ch) for j in range(layers[i])]
            attns = None if attn_kind is None else [attention(attn_kind, out_ch, i, depth[i][j])
                                                    for j in range(layers[i])]
            down = None
            if i < n - 1:
                resnet_down = kind == "ResnetDownsampleBlock2D" or (c.downsample_type == "resnet" and attn_kind == "self")
                down = ResnetBlock(out_ch, out_ch, block_temb, groups, eps, c.resnet_time_scale_shift,
                                   resample="down") if resnet_down else Downsample(out_ch, c.downsample_padding)
            self.down_blocks.append(DownBlock(resnets, attns, down))

        # Middle -------------------------------------------------------------------------------
        self.mid_block = None
        mid_ch, mscale = ch[-1], c.mid_block_scale_factor
        if c.mid_block_type == "UNetMidBlock2DCrossAttn":
            mid_depth = mid_transformer_depth(c.transformer_layers_per_block)
            self.mid_block = MidBlock(
                [resnet(mid_ch, mid_ch, mscale), resnet(mid_ch, mid_ch, mscale)],
                [SpatialTransformer(mid_ch, heads[-1], mid_ch // heads[-1], mid_depth, ctx_dims[-1], groups,
                                    c.use_linear_projection, c.upcast_attention)])
        elif c.mid_block_type is not None:  # UNet2DModel builds UNetMidBlock2D for any non-None type
            if cond:  # UNet2DConditionModel's plain mid block: one resnet, no attention
                self.mid_block = MidBlock([resnet(mid_ch, mid_ch, mscale)], None)
            else:
                attn_groups = c.attn_norm_num_groups
                if attn_groups is None:
                    attn_groups = groups if c.resnet_time_scale_shift == "default" else None
                attns = [attention("self", mid_ch, n - 1, norm_groups=attn_groups, rescale=mscale)] \
                    if c.add_attention else None
                self.mid_block = MidBlock([resnet(mid_ch, mid_ch, mscale), resnet(mid_ch, mid_ch, mscale)], attns)

        if up_path:  # (a ControlNet stops after the middle: fastdiff.models.controlnet)
            # Up path ------------------------------------------------------------------------------
            self.up_blocks = nn.ModuleList()
            rch = ch[::-1]
            out_ch = rch[0]
            for i, kind in enumerate(c.up_block_types):
                prev_ch, out_ch = out_ch, rch[i]
                skip_in = rch[min(i + 1, n - 1)]
                nl = layers[n - 1 - i] + 1
                attn_kind = block_attention(kind)
                resnets = []
                for j in range(nl):
                    res_skip = skip_in if j == nl - 1 else out_ch
                    resnets.append(resnet((prev_ch if j == 0 else out_ch) + res_skip, out_ch))
                attns = None
                if attn_kind is not None:
                    bi = n - 1 - i
                    d_up = up_depth[i] if up_depth is not None else [depth[bi][0]] * nl
                    if attn_kind == "cross" and len(d_up) != nl:
                        d_up = [d_up[0]] * nl
                    # (UNet2DConditionModel's up loop reverses the heads, context widths and depths, but hands
                    # AttnUpBlock2D the down-order attention_head_dim[i]; a UNet2DModel's one width is every level's,
                    # and the per-level widths of guided-diffusion's networks go by level)
                    attns = [attention(attn_kind, out_ch, bi, d_up[j], head_i=i if c.conditional else bi)
                             for j in range(nl)]
                up = None
                if i < n - 1:
                    resnet_up = kind == "ResnetUpsampleBlock2D" or (c.upsample_type == "resnet" and attn_kind == "self")
                    up = ResnetBlock(out_ch, out_ch, block_temb, groups, eps, c.resnet_time_scale_shift,
                                     resample="up") if resnet_up else Upsample(out_ch)
                self.up_blocks.append(UpBlock(resnets, attns, up))

            # Output -------------------------------------------------------------------------------
            self.conv_norm_out = GroupNorm(groups, ch[0], eps, activation="silu")
            self.conv_out = nn.Conv2d(ch[0], c.out_channels, c.conv_out_kernel, padding=(c.conv_out_kernel - 1) // 2)
        self._stack_sizes: dict = {}  # stack name -> each consumer's output width (how the stacked output splits)
        self._init_stacks()

    # --- conditioning projections as one matmul per group (LinearStacks) ----------------------------------
    def _stack_consumers(self, name: str) -> list:
        """The modules taking parts of stack ``name``, in forward order: resnets, or cross-attention layers."""
        if name == "temb":
            return [m for m in self.modules() if isinstance(m, ResnetBlock) and m.time_emb_proj is not None]
        return [m.attn2 for m in self.modules() if isinstance(m, TransformerBlock)]

    def stack_layers(self, name: str) -> Optional[list]:
        consumers = self._stack_consumers(name)
        layers = ([m.time_emb_proj for m in consumers] if name == "temb"
                  else [lin for m in consumers for lin in (m.to_k, m.to_v)])
        same_input = len({(lin.in_features, lin.weight.dtype, lin.weight.device) for lin in layers}) == 1
        return layers if layers and same_input else None

    def on_stack(self, name: str, layers: Optional[list]) -> None:
        consumers = self._stack_consumers(name)
        for i, m in enumerate(consumers):
            setattr(m, "temb_index" if name == "temb" else "kv_index", None if layers is None else i)
        self._stack_sizes[name] = None if layers is None else (
            [m.time_emb_proj.out_features for m in consumers] if name == "temb"
            else [m.to_k.out_features + m.to_v.out_features for m in consumers])

    def _projected(self, name: str, x: torch.Tensor):
        """``x`` with every layer's projection of it from stack ``name`` (``Projected``), or ``x`` unstacked."""
        out = stacked_output(self, name, x)  # (..., sum of widths)
        return x if out is None else Projected(x, out.split(self._stack_sizes[name], dim=-1))

    # ----------------------------------------------------------------------------------------------
    def forward(self, x, timestep, class_labels=None, encoder_hidden_states=None, text_embeds=None, time_ids=None,
                image_latents=None, down_residuals=None, mid_residual=None, image_embeds=None, image_masks=None):
        """x (B, C, H, W); timestep scalar / (B,); class_labels (B,); encoder_hidden_states (B, L, D);
        text_embeds (B, P) and time_ids (B, N): SDXL's pooled text and micro-conditioning (diffusers passes
        them as ``added_cond_kwargs``); image_latents (B, K, H, W): input channels after x's (an inpainting UNet's
        mask and masked-image latents, which diffusers' pipelines concatenate to the latents); down_residuals (one
        per skip connection, each its shape) and mid_residual (the middle block's output shape): a ControlNet's
        outputs, added to the skips and the middle (diffusers' ``down_block_additional_residuals`` /
        ``mid_block_additional_residual``); image_embeds (B, D) or (B, N, D): an image prompt's CLIP embeddings for
        a loaded IP-Adapter ((B, N, S, E) hidden states for Plus), or a list of one such tensor per loaded adapter
        (diffusers' ``added_cond_kwargs["image_embeds"]``); image_masks: None, or per adapter None or (B, N, H, W)
        masks of its N images (diffusers' ``cross_attention_kwargs["ip_adapter_masks"]``)."""
        c = self.config
        if image_latents is not None:
            x = torch.cat([x, image_latents.to(x.dtype)], dim=1)  # (B, C + K, H, W)
        t, emb, ctx = self._conditioning(x, timestep, class_labels, encoder_hidden_states, text_embeds, time_ids)
        if image_embeds is not None:  # each IP-Adapter's image tokens (B, N * T, D) travel with the text states
            ctx = image_context(self, ctx, image_embeds, image_masks, x.dtype)
        h, skips = self._down_and_middle(self.conv_in(self._centered(x)), emb, ctx)
        if down_residuals is not None:
            if len(down_residuals) != len(skips):
                raise BadArgumentError(f"down_residuals: expected {len(skips)} (one per skip connection), found "
                                       f"{len(down_residuals)}")
            skips = [s + r for s, r in zip(skips, down_residuals)]
        if mid_residual is not None:
            h = h + mid_residual
        for block in self.up_blocks:
            nres = len(block.resnets)
            block_skips, skips = skips[-nres:], skips[:-nres]
            size = tuple(skips[-1].shape[2:]) if skips and block.upsamplers is not None else None
            h = block(h, block_skips, emb, ctx, size)
        h = self.conv_out(self.conv_norm_out(h))  # (B, out, H, W)
        if c.time_embedding_type == "fourier" and not c.conditional:
            h = h / t.reshape(x.shape[0], *([1] * (h.dim() - 1)))  # NCSN++: the output is scaled by 1/sigma
        return h

    def _centered(self, x):
        return 2 * x - 1.0 if self.config.center_input_sample else x

    def _conditioning(self, x, timestep, class_labels, encoder_hidden_states, text_embeds, time_ids):
        """(t (B,), SiLU of the embedding every resnet reads, the text states), each with its stacked projections
        where the conditioning projections are stacked (``Projected``)."""
        c = self.config
        t = _timesteps(timestep, x.shape[0], x.device)  # (B,)
        if c.time_embedding_type == "learned" and t.is_floating_point():
            t = t.round().long()  # an embedding table: samplers may hand over fractional timesteps
        emb = self.time_embedding(self.time_proj(t).to(x.dtype))  # (B, temb)
        if self.class_embedding is not None:
            if class_labels is None:
                raise BadArgumentError("this UNet is class-conditional: expected class_labels, found None")
            if c.class_embed_type == "timestep":
                class_labels = self.time_proj(class_labels).to(x.dtype)
            class_emb = self.class_embedding(class_labels).to(x.dtype)  # (B, temb)
            emb = torch.cat([emb, class_emb], dim=-1) if c.class_embeddings_concat else emb + class_emb
        elif class_labels is not None:
            raise BadArgumentError("this UNet has no class embedding, but class_labels were given")
        emb = self._add_text_time(emb, text_embeds, time_ids)
        if c.time_embedding_act_fn is not None:
            emb = F.silu(emb)
        emb = F.silu(emb)  # what every resnet's time projection reads: computed once, not once per resnet
        emb = self._projected("temb", emb)  # with every resnet's projection, when stacked
        ctx = encoder_hidden_states
        if ctx is not None:
            ctx = self._projected("cross_kv", ctx)  # with every cross-attention's keys and values, when stacked
        return t, emb, ctx

    def _down_and_middle(self, h, emb, ctx) -> tuple:
        """(the middle block's output, the skip connections) from the input convolution's output h (B, C0, H, W)."""
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, emb, ctx)
            skips.extend(block_skips)
        if self.mid_block is not None:
            h = self.mid_block(h, emb, ctx)  # (B, C_last, H/2^(n-1), W/2^(n-1))
        return h, skips

    def _add_text_time(self, emb, text_embeds, time_ids):
        """emb + add_embedding([pooled text, sinusoids of each time id]) for SDXL-style UNets."""
        if self.config.addition_embed_type != "text_time":
            if text_embeds is not None or time_ids is not None:
                raise BadArgumentError("text_embeds / time_ids were given, but this UNet has no text_time "
                                       "(SDXL) conditioning")
            return emb
        if text_embeds is None or time_ids is None:
            raise BadArgumentError(f"this UNet is SDXL-style (addition_embed_type='text_time'): expected "
                                   f"text_embeds and time_ids, found text_embeds={_shape(text_embeds)}, "
                                   f"time_ids={_shape(time_ids)}")
        b = emb.shape[0]
        width, step = self.config.projection_class_embeddings_input_dim, self.config.addition_time_embed_dim
        if text_embeds.dim() != 2 or time_ids.dim() != 2 or text_embeds.shape[0] not in (1, b) or \
                time_ids.shape[0] not in (1, b) or text_embeds.shape[1] + step * time_ids.shape[1] != width:
            raise BadArgumentError(
                f"text_embeds / time_ids: expected (B, P) and (B, N) with P + {step} * N = {width} "
                f"(projection_class_embeddings_input_dim; SDXL base: 1280 + 6 ids), found "
                f"{tuple(text_embeds.shape)} and {tuple(time_ids.shape)}")
        text_embeds, time_ids = text_embeds.expand(b, -1), time_ids.expand(b, -1)  # one row: every sample's
        time_embeds = self.add_time_proj(time_ids.reshape(-1)).reshape(b, -1)  # (B, N * addition_time_embed_dim)
        # float32 like diffusers' promotion of (text, float32 sinusoids), then the embedding's dtype
        added = torch.cat([text_embeds.float(), time_embeds.float()], dim=-1)  # (B, projection width)
        return emb + self.add_embedding(added.to(emb.dtype))


def level_sizes(unet, height: int, width: int) -> list:
    """The (rows, cols) of the latent grid entering each of ``unet``'s down blocks, then its middle block, for latents
    of ``height`` x ``width`` (a padded strided conv halves rounding up; an unpadded one, or a ResBlock's average pool,
    rounding down). BadArgumentError where a level is too small for its downsampling (torch's own error would name
    a padded convolution or a pool, not the latent size)."""
    sizes, failed = _walk_levels(unet, height, width)
    if failed is not None:
        side = next(s for s in range(2, 2 ** len(unet.down_blocks) + 2) if _walk_levels(unet, s, s)[1] is None)
        down = unet.down_blocks[failed].downsamplers[0]
        how = "an unpadded strided convolution" if isinstance(down, Downsample) else "average pooling"
        raise BadArgumentError(f"height/width: this UNet's down block {failed} halves the latent grid by {how}, which "
                               f"needs at least 2x2 there: at least {side} latent pixels per side, found "
                               f"{height}x{width}")
    return sizes


def _walk_levels(unet, h: int, w: int) -> tuple:
    """(the grid sizes ``level_sizes`` returns, the index of the first down block whose downsampling the grid is too
    small for, or None)."""
    sizes = []
    for i, block in enumerate(unet.down_blocks):
        sizes.append((h, w))
        if block.downsamplers is None:
            continue
        down = block.downsamplers[0]
        if isinstance(down, Downsample) and down.padding == 1:  # (h + 2 - 3) // 2 + 1
            h, w = (h + 1) // 2, (w + 1) // 2
        elif min(h, w) < 2:  # a 3x3 kernel over the grid padded right / bottom by one, or a 2x2 pool
            return sizes, i
        else:
            h, w = h // 2, w // 2
    return sizes + [(h, w)], None


def _shape(t) -> Optional[tuple]:
    return None if t is None else tuple(t.shape)


def _timesteps(timestep, batch: int, device) -> torch.Tensor:
    """Any scalar / (1,) / (B,) timestep -> a (B,) tensor on ``device``, dtype kept (int or float)."""
    if not torch.is_tensor(timestep):
        dtype = torch.float32 if isinstance(timestep, float) else torch.int64
        timestep = torch.tensor([timestep], dtype=dtype, device=device)
    timestep = timestep.to(device)
    if timestep.dim() == 0:
        timestep = timestep[None]
    return timestep.expand(batch) if timestep.shape[0] == 1 else timestep


# --------------------------------------------------------------------------------------------------
# Presets (random-weight architectures for benchmarks and tests)
