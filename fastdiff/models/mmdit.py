"""MMDiT: Stable Diffusion 3 / 3.5's multimodal diffusion transformer (Esser et al. 2024), as one file.

Reads top to bottom like diffusers' ``SD3Transformer2DModel``: config, embedders, the adaptive norms, the
joint attention, the block, the model. Parameter names are diffusers' (``transformer_blocks.3.attn.add_q_proj``,
``norm1.linear``, ``ff.net.0.proj``, ...), so a diffusers folder loads with no renaming.

Image tokens and text tokens keep their own weights (two streams) but attend jointly: each block concatenates
[image tokens, text tokens] for one attention and splits the result again. The timestep and the pooled text
embedding (``text_embeds`` here, diffusers' ``pooled_projections``) condition every norm (adaLN-Zero). The last
block only updates the image stream (``context_pre_only``). SD3.5 adds RMS-normalised queries / keys
(``qk_norm="rms_norm"``) and, in SD3.5 Medium's first blocks, a second image-only attention
(``dual_attention_layers``).

The attention core and the adaLN ``norm * (1 + scale) + shift`` are fastdiff's fused-op layers (``layers.py``),
so ``set_backend(model, "triton")`` reaches them, as in the DiT.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import BadArgumentError, UnsupportedConfigError
from ..utils.strict_dict import check_field_types, diffusers_fields, known_fields, plain_dict
from .dit import sincos_pos_embed_2d
from .layers import Attention, ModulatedLayerNorm
from .unet import SinusoidalTimesteps, TimestepEmbedding

QK_NORMS = (None, "rms_norm")


# ---------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------

@dataclass
class MMDiTConfig:
    """diffusers' ``SD3Transformer2DModel`` config (defaults: its constructor's, i.e. SD3 Medium's sizes aside)."""

    sample_size: int = 128                  # the latent size the position table is centred for
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096         # text states' width (CLIP-L + CLIP-G padded, and T5-XXL)
    caption_projection_dim: int = 1152      # text stream width: must equal heads * head dim
    pooled_projection_dim: int = 2048       # pooled text width (CLIP-L + CLIP-G)
    out_channels: int = 16
    pos_embed_max_size: int = 96            # the position table's side, in patches; larger inputs are refused
    dual_attention_layers: tuple = ()       # SD3.5 Medium: blocks with a second, image-only attention
    qk_norm: Optional[str] = None           # SD3.5: "rms_norm" on every query / key
    extra: dict = field(default_factory=dict)  # diffusers fields kept for round trips, no effect

    def __post_init__(self):
        if isinstance(self.dual_attention_layers, list):
            self.dual_attention_layers = tuple(self.dual_attention_layers)
        check_field_types(self, "MMDiT")

        def bad(name, why):
            raise UnsupportedConfigError(name, getattr(self, name), supported=why, model="SD3Transformer2DModel")

        for name in ("sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim",
                     "num_attention_heads", "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim",
                     "out_channels", "pos_embed_max_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                bad(name, "a positive int")
        if self.caption_projection_dim != self.inner_dim:
            bad("caption_projection_dim", f"num_attention_heads * attention_head_dim = {self.inner_dim} (the text "
                                          f"stream's width: every block's text projections read that width)")
        if self.inner_dim % 4:
            bad("attention_head_dim", "heads * head dim a multiple of 4 (the 2-D sin-cos position table)")
        if self.qk_norm not in QK_NORMS:
            bad("qk_norm", list(QK_NORMS))
        if any(not isinstance(i, int) or not 0 <= i < self.num_layers for i in self.dual_attention_layers):
            bad("dual_attention_layers", f"block indices in [0, {self.num_layers})")
        if self.sample_size // self.patch_size > self.pos_embed_max_size:
            bad("sample_size", f"at most pos_embed_max_size * patch_size = {self.pos_embed_max_size * self.patch_size}")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def to_dict(self) -> dict:
        return plain_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MMDiTConfig":
        return cls(**known_fields(cls, d, model="MMDiT", skip_private=False))

    @classmethod
    def from_diffusers(cls, d: dict) -> "MMDiTConfig":
        """A diffusers ``config.json`` dict; a field this model does not implement is refused by name."""
        values = diffusers_fields(cls, d, "SD3Transformer2DModel")
        if values.get("out_channels") is None:
            values["out_channels"] = values.get("in_channels", 16)
        return cls(**values)


def sd3_medium_config() -> MMDiTConfig:
    """stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json."""
    return MMDiTConfig(sample_size=128, num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                       pos_embed_max_size=192)


# ---------------------------------------------------------------------------------------------------
# Embedders
# ---------------------------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, H/p * W/p, D) patches plus the centre crop of a (max x max) sin-cos table."""

    def __init__(self, config: MMDiTConfig):
        super().__init__()
        c = config
        self.patch_size, self.max_size = c.patch_size, c.pos_embed_max_size
        self.proj = nn.Conv2d(c.in_channels, c.inner_dim, c.patch_size, stride=c.patch_size)
        # diffusers' table: arange(max) scaled to the training grid (sample_size / patch), in the state dict
        table = sincos_pos_embed_2d(c.inner_dim, c.pos_embed_max_size,
                                    interpolation_scale=c.pos_embed_max_size / (c.sample_size // c.patch_size))
        self.register_buffer("pos_embed", table[None], persistent=True)  # (1, max*max, D)

    def forward(self, x):
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        if h > self.max_size or w > self.max_size:
            raise BadArgumentError(f"latent {x.shape[-2]}x{x.shape[-1]}: expected at most "
                                   f"{self.max_size * self.patch_size} per side (the position table's "
                                   f"{self.max_size} patches)")
        tokens = self.proj(x).flatten(2).transpose(1, 2)  # (B, h*w, D)
        top, left = (self.max_size - h) // 2, (self.max_size - w) // 2
        table = self.pos_embed.reshape(1, self.max_size, self.max_size, -1)[:, top:top + h, left:left + w]
        return tokens + table.reshape(1, h * w, -1).to(tokens.dtype)


class TimeTextEmbedding(nn.Module):
    """timestep sinusoids -> MLP, plus pooled text -> MLP (diffusers' CombinedTimestepTextProjEmbeddings)."""

    def __init__(self, dim: int, pooled_dim: int):
        super().__init__()
        self.time_proj = SinusoidalTimesteps(256, flip_sin_to_cos=True, freq_shift=0)
        self.timestep_embedder = TimestepEmbedding(256, dim)
        self.text_embedder = TimestepEmbedding(pooled_dim, dim)  # Linear -> SiLU -> Linear, the same keys

    def forward(self, timestep, pooled):
        t = self.timestep_embedder(self.time_proj(timestep).to(pooled.dtype))  # (B, D)
        return t + self.text_embedder(pooled)  # (B, D)


# ---------------------------------------------------------------------------------------------------
# Adaptive norms, attention, feed-forward
# ---------------------------------------------------------------------------------------------------

class AdaNormZero(nn.Module):
    """SiLU(temb) -> ``linear`` -> n chunks of (B, D); the first two modulate the norm (shift, scale)."""

    def __init__(self, dim: int, chunks: int):
        super().__init__()
        self.chunks = chunks
        self.linear = nn.Linear(dim, chunks * dim)
        self.norm = ModulatedLayerNorm(dim, eps=1e-6)

    def forward(self, x, temb_act):
        mods = self.linear(temb_act).chunk(self.chunks, dim=1)  # n x (B, D)
        return self.norm(x, mods[0], mods[1]), mods[2:]


class AdaNormContinuous(nn.Module):
    """SiLU(temb) -> ``linear`` -> (scale, shift): the last block's text norm and the output norm."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)
        self.norm = ModulatedLayerNorm(dim, eps=1e-6)

    def forward(self, x, temb_act):
        scale, shift = self.linear(temb_act.to(x.dtype)).chunk(2, dim=1)  # (scale, shift): diffusers' order here
        return self.norm(x, shift, scale)


class RMSNorm(nn.Module):
    """RMS norm over the head dim with a weight (diffusers' RMSNorm: statistics in float32)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return x * self.weight


class JointAttention(nn.Module):
    """Attention over [image tokens, text tokens] with each stream's own projections; ``joint=False`` is the
    image-only second attention of SD3.5 Medium's dual blocks."""

    def __init__(self, dim: int, heads: int, head_dim: int, qk_norm: Optional[str], joint: bool = True,
                 context_out: bool = True):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner) for _ in range(3))
        self.norm_q = RMSNorm(head_dim) if qk_norm else None
        self.norm_k = RMSNorm(head_dim) if qk_norm else None
        if joint:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, inner) for _ in range(3))
            self.norm_added_q = RMSNorm(head_dim) if qk_norm else None
            self.norm_added_k = RMSNorm(head_dim) if qk_norm else None
            self.to_add_out = nn.Linear(inner, dim) if context_out else None
        self.joint = joint
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])
        self.core = Attention()

    def _heads(self, t, norm):
        t = t.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)  # (B, H, N, Dh)
        return norm(t) if norm is not None else t

    def forward(self, x, ctx=None):
        """x (B, N, D), ctx (B, L, D) -> (B, N, D) and (B, L, D) (None when the text stream ends here)."""
        n = x.shape[1]
        q = self._heads(self.to_q(x), self.norm_q)
        k = self._heads(self.to_k(x), self.norm_k)
        v = self._heads(self.to_v(x), None)
        if ctx is not None:
            q = torch.cat([q, self._heads(self.add_q_proj(ctx), self.norm_added_q)], dim=2)  # (B, H, N+L, Dh)
            k = torch.cat([k, self._heads(self.add_k_proj(ctx), self.norm_added_k)], dim=2)
            v = torch.cat([v, self._heads(self.add_v_proj(ctx), None)], dim=2)
        out = self.core(q, k, v).transpose(1, 2).flatten(2)  # (B, N(+L), H*Dh)
        img = self.to_out[0](out[:, :n])
        if ctx is None:
            return img
        txt = self.to_add_out(out[:, n:]) if self.to_add_out is not None else None
        return img, txt


class _GELUProj(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden)

    def forward(self, x):
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """Linear -> GELU (tanh) -> Linear, with diffusers' keys (``net.0.proj``, ``net.2``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.ModuleList([_GELUProj(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


# ---------------------------------------------------------------------------------------------------
# The block and the model
# ---------------------------------------------------------------------------------------------------

class JointTransformerBlock(nn.Module):
    """adaLN-Zero on both streams, one joint attention, one feed-forward per stream (the last block: image only)."""

    def __init__(self, config: MMDiTConfig, index: int, context_pre_only: Optional[bool] = None):
        super().__init__()
        c = config
        dim = c.inner_dim
        # (the transformer's last block; an SD3 ControlNet's blocks all update both streams)
        self.context_pre_only = index == c.num_layers - 1 if context_pre_only is None else context_pre_only
        self.dual = index in c.dual_attention_layers
        self.norm1 = AdaNormZero(dim, 9 if self.dual else 6)
        self.norm1_context = AdaNormContinuous(dim) if self.context_pre_only else AdaNormZero(dim, 6)
        self.attn = JointAttention(dim, c.num_attention_heads, c.attention_head_dim, c.qk_norm,
                                   context_out=not self.context_pre_only)
        self.attn2 = JointAttention(dim, c.num_attention_heads, c.attention_head_dim, c.qk_norm, joint=False) \
            if self.dual else None
        self.norm2 = ModulatedLayerNorm(dim, eps=1e-6)
        self.ff = FeedForward(dim)
        if not self.context_pre_only:
            self.norm2_context = ModulatedLayerNorm(dim, eps=1e-6)
            self.ff_context = FeedForward(dim)

    def forward(self, x, ctx, temb_act):
        """x (B, N, D) image tokens, ctx (B, L, D) text tokens, temb_act SiLU(temb) (B, D)."""
        if self.dual:  # one norm of x, modulated twice: for the joint attention and for the image-only one
            mods = self.norm1.linear(temb_act).chunk(9, dim=1)
            h, (gate, shift_mlp, scale_mlp, gate_mlp) = self.norm1.norm(x, mods[0], mods[1]), mods[2:6]
            h2, gate2 = self.norm1.norm(x, mods[6], mods[7]), mods[8]
        else:
            h, (gate, shift_mlp, scale_mlp, gate_mlp) = self.norm1(x, temb_act)
        if self.context_pre_only:
            c = self.norm1_context(ctx, temb_act)
        else:
            c, (c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp) = self.norm1_context(ctx, temb_act)
        attn, ctx_attn = self.attn(h, c)
        x = x + gate[:, None] * attn  # (B, N, D)
        if self.dual:
            x = x + gate2[:, None] * self.attn2(h2)
        x = x + gate_mlp[:, None] * self.ff(self.norm2(x, shift_mlp, scale_mlp))
        if self.context_pre_only:
            return x, None
        ctx = ctx + c_gate[:, None] * ctx_attn  # (B, L, D)
        ctx = ctx + c_gate_mlp[:, None] * self.ff_context(self.norm2_context(ctx, c_shift_mlp, c_scale_mlp))
        return x, ctx


def check_text_inputs(ctx, pooled, width: int, pooled_width: int, batch: int, model: str) -> None:
    """(B, L, width) text states and a (B, pooled_width) pooled embedding, else a clear error naming both."""
    if ctx.dim() != 3 or ctx.shape[-1] != width or pooled.dim() != 2 or pooled.shape[-1] != pooled_width or \
            ctx.shape[0] != batch or pooled.shape[0] != batch:
        raise BadArgumentError(f"{model}: expected encoder_hidden_states ({batch}, tokens, {width}) and text_embeds "
                               f"({batch}, {pooled_width}), found {tuple(ctx.shape)} and {tuple(pooled.shape)}")


class MMDiT(nn.Module):
    """forward(x (B, C, H, W), timestep (B,) in diffusers' [0, 1000] flow time, encoder_hidden_states (B, L,
    joint_attention_dim), text_embeds (B, pooled_projection_dim)) -> the velocity (B, C_out, H, W).

    ``text_embeds`` is diffusers' ``pooled_projections``: fastdiff's one name for a pooled text embedding.
    """

    def __init__(self, config: MMDiTConfig):
        super().__init__()
        self.config = c = config
        self.pos_embed = PatchEmbed(c)
        self.time_text_embed = TimeTextEmbedding(c.inner_dim, c.pooled_projection_dim)
        self.context_embedder = nn.Linear(c.joint_attention_dim, c.caption_projection_dim)
        self.transformer_blocks = nn.ModuleList([JointTransformerBlock(c, i) for i in range(c.num_layers)])
        self.norm_out = AdaNormContinuous(c.inner_dim)
        self.proj_out = nn.Linear(c.inner_dim, c.patch_size ** 2 * c.out_channels)

    def forward(self, x, timestep, class_labels=None, encoder_hidden_states=None, text_embeds=None, time_ids=None,
                block_residuals=None):
        """block_residuals: an SD3 ControlNet's outputs, each (B, N, D), added to the image tokens after every block
        that updates both streams (not the last), block i reading output int(i / (blocks / outputs)), as diffusers'
        transformer spreads them."""
        if class_labels is not None or time_ids is not None:
            raise BadArgumentError("this MMDiT takes no class_labels / time_ids (it conditions on text states and "
                                   "a pooled text embedding)")
        if encoder_hidden_states is None or text_embeds is None:
            raise BadArgumentError(f"this MMDiT (SD3) needs encoder_hidden_states (B, tokens, "
                                   f"{self.config.joint_attention_dim}) and text_embeds (B, "
                                   f"{self.config.pooled_projection_dim}), the pooled text embedding")
        check_text_inputs(encoder_hidden_states, text_embeds, self.config.joint_attention_dim,
                          self.config.pooled_projection_dim, x.shape[0], "MMDiT")
        b, _, hgt, wid = x.shape
        p = self.config.patch_size
        if hgt % p or wid % p:
            raise BadArgumentError(f"latent {hgt}x{wid}: expected multiples of the patch size {p}")
        t = timestep if torch.is_tensor(timestep) else torch.tensor([float(timestep)], device=x.device)
        t = t.to(x.device).reshape(-1).expand(b)  # (B,)
        h = self.pos_embed(x)  # (B, N, D)
        temb_act = F.silu(self.time_text_embed(t, text_embeds.to(h.dtype)))  # (B, D): what every norm reads
        ctx = self.context_embedder(encoder_hidden_states.to(h.dtype))  # (B, L, D)
        for i, block in enumerate(self.transformer_blocks):
            h, ctx = block(h, ctx, temb_act)
            if block_residuals and not block.context_pre_only:
                h = h + block_residuals[int(i / (len(self.transformer_blocks) / len(block_residuals)))]
        h = self.proj_out(self.norm_out(h, temb_act))  # (B, N, p*p*C)
        gh, gw, c = hgt // p, wid // p, self.config.out_channels
        h = h.reshape(b, gh, gw, p, p, c).permute(0, 5, 1, 3, 2, 4)  # (B, C, gh, p, gw, p)
        return h.reshape(b, c, hgt, wid)


__all__ = ["MMDiT", "MMDiTConfig", "JointTransformerBlock", "check_text_inputs", "sd3_medium_config", "PatchEmbed",
           "TimeTextEmbedding"]
