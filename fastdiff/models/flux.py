"""Flux.1 (Black Forest Labs): a rectified-flow transformer with double- and single-stream blocks, as one file.

Reads top to bottom like diffusers' ``FluxTransformer2DModel``: config, embedders, rotary positions, the double-
stream block (image and text with their own weights, one joint attention, as SD3's MMDiT), the single-stream
block (one sequence [text, image] through fused attention + MLP), the model. Parameter names are diffusers', so a
diffusers folder loads with no renaming.

Two pipeline steps live in the model here, so that it takes latents like every fastdiff network:
- packing: diffusers' FluxPipeline folds each 2x2 patch of the (B, 16, H, W) latents into 64 channels before the
  transformer (``_pack_latents``) and unfolds them after; ``MMDiT``-style ``forward(x (B, 16, H, W), ...)`` does it.
- the rotary position ids (text tokens 0, image token (0, row, col)) are built from the latent size.

Timesteps are diffusers' pipeline timesteps, in [0, 1000] (its transformer divides them by 1000 and multiplies
back). ``guidance`` (Flux dev's distilled guidance strength, diffusers' ``guidance_scale``, e.g. 3.5) is taken as
the pipeline gives it; ``text_embeds`` is the pooled CLIP embedding (diffusers' ``pooled_projections``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import BadArgumentError, UnsupportedConfigError
from ..utils.strict_dict import check_field_types, diffusers_fields, known_fields, plain_dict
from .layers import Attention, ModulatedLayerNorm, exporting
from .mmdit import AdaNormContinuous, AdaNormZero, FeedForward, check_text_inputs
from .unet import SinusoidalTimesteps, TimestepEmbedding

PACK = 2  # the pipeline's 2x2 latent patches


# ---------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------

@dataclass
class FluxConfig:
    """diffusers' ``FluxTransformer2DModel`` config (defaults: its constructor's, Flux.1 dev / schnell's sizes)."""

    patch_size: int = 1
    in_channels: int = 64                   # packed: 16 latent channels x 2 x 2
    out_channels: Optional[int] = None
    num_layers: int = 19                    # double-stream blocks
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096         # T5-XXL states
    pooled_projection_dim: int = 768        # CLIP-L pooled
    guidance_embeds: bool = False           # dev: a distilled-guidance input; schnell: none
    axes_dims_rope: tuple = (16, 56, 56)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.axes_dims_rope, list):
            self.axes_dims_rope = tuple(self.axes_dims_rope)
        if self.out_channels == self.in_channels:  # (diffusers' None means the same: one spelling)
            self.out_channels = None
        check_field_types(self, "Flux")

        def bad(name, why):
            raise UnsupportedConfigError(name, getattr(self, name), supported=why, model="FluxTransformer2DModel")

        for name in ("in_channels", "num_layers", "attention_head_dim", "num_attention_heads", "joint_attention_dim",
                     "pooled_projection_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                bad(name, "a positive int")
        if self.patch_size != 1:
            bad("patch_size", [1])
        if self.in_channels % (PACK * PACK):
            bad("in_channels", "a multiple of 4 (2x2 packed latent channels)")
        out = self.out_channels
        if out is not None and (isinstance(out, bool) or not isinstance(out, int) or out < 1 or out % (PACK * PACK)
                                or out > self.in_channels):
            bad("out_channels", f"None, or a multiple of 4 up to in_channels={self.in_channels} (a wider input "
                                f"carries conditioning channels after the latents': FLUX.1 Fill's)")
        if 0 < self.condition_channels < self.latent_channels:
            bad("in_channels", f"the latents' {self.latent_channels} channels alone, with FLUX.1 Depth / Canny's "
                               f"control image latents ({self.latent_channels} more), or with FLUX.1 Fill's masked "
                               f"image latents and pixel mask ({self.latent_channels} + f*f more)")
        if sum(self.axes_dims_rope) != self.attention_head_dim or any(d % 2 for d in self.axes_dims_rope) or \
                len(self.axes_dims_rope) != 3:
            bad("axes_dims_rope", f"three even dims summing to attention_head_dim={self.attention_head_dim}")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def latent_channels(self) -> int:
        """The latents' channels (unpacked): what the network outputs."""
        return (self.out_channels or self.in_channels) // (PACK * PACK)

    @property
    def condition_channels(self) -> int:
        """Unpacked input channels after the latents' (FLUX.1 Fill: the masked image's latents, then its mask
        unfolded into f x f channels per latent pixel; FLUX.1 Depth / Canny: the control image's latents); 0 for a
        text-to-image transformer."""
        return self.in_channels // (PACK * PACK) - self.latent_channels

    def to_dict(self) -> dict:
        return plain_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FluxConfig":
        return cls(**known_fields(cls, d, model="Flux", skip_private=False))

    @classmethod
    def from_diffusers(cls, d: dict) -> "FluxConfig":
        """A diffusers ``config.json`` dict; a field this model does not implement is refused by name."""
        return cls(**diffusers_fields(cls, d, "FluxTransformer2DModel"))


def flux_dev_config() -> FluxConfig:
    """black-forest-labs/FLUX.1-dev transformer/config.json."""
    return FluxConfig(guidance_embeds=True)


# ---------------------------------------------------------------------------------------------------
# Embedders and rotary positions
# ---------------------------------------------------------------------------------------------------

class TimeGuidanceTextEmbedding(nn.Module):
    """timestep (+ guidance) sinusoids -> MLPs, plus pooled text -> MLP (diffusers' CombinedTimestep(Guidance)
    TextProjEmbeddings)."""

    def __init__(self, dim: int, pooled_dim: int, guidance: bool):
        super().__init__()
        self.time_proj = SinusoidalTimesteps(256, flip_sin_to_cos=True, freq_shift=0)
        self.timestep_embedder = TimestepEmbedding(256, dim)
        self.guidance_embedder = TimestepEmbedding(256, dim) if guidance else None
        self.text_embedder = TimestepEmbedding(pooled_dim, dim)  # Linear -> SiLU -> Linear, the same keys

    def forward(self, timestep, guidance, pooled):
        emb = self.timestep_embedder(self.time_proj(timestep).to(pooled.dtype))  # (B, D)
        if self.guidance_embedder is not None:
            emb = emb + self.guidance_embedder(self.time_proj(guidance).to(pooled.dtype))
        return emb + self.text_embedder(pooled)  # (B, D)


def rotary_tables(ids: torch.Tensor, axes: tuple, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (S, head_dim) float32, for position ids (S, 3): per axis, frequencies in float64, each
    repeated for the pair of features it rotates (diffusers' get_1d_rotary_pos_embed, repeat_interleave_real).

    Traced for ONNX they are float32: TensorRT has no float64, and the ids of a graph with a dynamic size are not
    constants to fold (the angles' rounding, about 1e-5 at position 128, is far below a half-precision engine's)."""
    wide = torch.float32 if torch.onnx.is_in_onnx_export() else torch.float64
    cos, sin = [], []
    for i, dim in enumerate(axes):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=wide, device=ids.device) / dim)  # (dim/2,)
        angles = torch.outer(ids[:, i].to(wide), freqs)  # (S, dim/2)
        cos.append(angles.cos().repeat_interleave(2, dim=1).float())
        sin.append(angles.sin().repeat_interleave(2, dim=1).float())
    return torch.cat(cos, dim=-1), torch.cat(sin, dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate feature pairs (2i, 2i+1) of x (B, S, H, Dh) by the position angles (S, Dh); float32 arithmetic."""
    real, imag = x.unflatten(-1, (-1, 2)).unbind(-1)  # (B, S, H, Dh/2) each
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)  # (B, S, H, Dh)
    return (x.float() * cos[None, :, None] + rotated.float() * sin[None, :, None]).to(x.dtype)


def position_ids(text_tokens: int, h: int, w: int, device) -> torch.Tensor:
    """(text_tokens + h*w, 3): text tokens at 0, image token (0, row, col) on the packed (h, w) grid."""
    rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    image = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(h * w, 3)
    return torch.cat([torch.zeros(text_tokens, 3, dtype=image.dtype, device=device), image]).float()


# ---------------------------------------------------------------------------------------------------
# Attention and blocks
# ---------------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """``torch.nn.RMSNorm`` (what diffusers' Flux attention uses): the whole norm in float32, one rounding at the end
    (SD3's diffusers RMSNorm rounds before the weight; ``fastdiff.models.mmdit.RMSNorm``). Written out because
    ``torch.nn.RMSNorm`` is missing before torch 2.4 and does not export to ONNX at opset 17."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).to(x.dtype)


class FluxAttention(nn.Module):
    """q / k RMS-normed, rotated, then one attention over [text, image]; ``joint``: the text stream has its own
    projections (double blocks); ``out``: an output projection (single blocks project after their MLP instead)."""

    def __init__(self, dim: int, heads: int, head_dim: int, joint: bool, out: bool):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner) for _ in range(3))
        self.norm_q, self.norm_k = RMSNorm(head_dim), RMSNorm(head_dim)
        if joint:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, inner) for _ in range(3))
            self.norm_added_q, self.norm_added_k = RMSNorm(head_dim), RMSNorm(head_dim)
            self.to_add_out = nn.Linear(inner, dim)
        if out:
            self.to_out = nn.ModuleList([nn.Linear(inner, dim)])
        self.joint = joint
        self.core = Attention()

    def _split(self, t, norm=None):
        t = t.unflatten(-1, (self.heads, self.head_dim))  # (B, S, H, Dh)
        return norm(t) if norm is not None else t

    def forward(self, x, rope, ctx=None):
        """x (B, N, D) [and ctx (B, L, D)] -> the attention output(s), (B, L+N or N, H*Dh) before projections."""
        q, k = self._split(self.to_q(x), self.norm_q), self._split(self.to_k(x), self.norm_k)
        v = self._split(self.to_v(x))
        if ctx is not None:  # text first: [ctx, x]
            q = torch.cat([self._split(self.add_q_proj(ctx), self.norm_added_q), q], dim=1)
            k = torch.cat([self._split(self.add_k_proj(ctx), self.norm_added_k), k], dim=1)
            v = torch.cat([self._split(self.add_v_proj(ctx)), v], dim=1)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)  # (B, S, H, Dh)
        out = self.core(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, H, S, Dh)
        return out.transpose(1, 2).flatten(2)  # (B, S, H*Dh)


def _clip_half(t: torch.Tensor) -> torch.Tensor:
    """fp16 activations clamped to the finite range, as diffusers does after each Flux block. Also in every exported
    graph: a TensorRT engine built from the float32 graph may run it in fp16 (a no-op within that range)."""
    return t.clip(-65504, 65504) if t.dtype == torch.float16 or exporting() else t


class FluxTransformerBlock(nn.Module):
    """Double-stream block: adaLN-Zero on both streams, one joint attention, a feed-forward per stream."""

    def __init__(self, c: FluxConfig):
        super().__init__()
        dim = c.inner_dim
        self.norm1, self.norm1_context = AdaNormZero(dim, 6), AdaNormZero(dim, 6)
        self.attn = FluxAttention(dim, c.num_attention_heads, c.attention_head_dim, joint=True, out=True)
        self.norm2, self.norm2_context = ModulatedLayerNorm(dim, eps=1e-6), ModulatedLayerNorm(dim, eps=1e-6)
        self.ff, self.ff_context = FeedForward(dim), FeedForward(dim)

    def forward(self, x, ctx, temb_act, rope):
        h, (gate, shift_mlp, scale_mlp, gate_mlp) = self.norm1(x, temb_act)
        c, (c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp) = self.norm1_context(ctx, temb_act)
        out = self.attn(h, rope, c)  # (B, L+N, D)
        txt, img = out[:, :ctx.shape[1]], out[:, ctx.shape[1]:]
        x = x + gate[:, None] * self.attn.to_out[0](img.contiguous())
        x = x + gate_mlp[:, None] * self.ff(self.norm2(x, shift_mlp, scale_mlp))
        ctx = ctx + c_gate[:, None] * self.attn.to_add_out(txt.contiguous())
        ctx = ctx + c_gate_mlp[:, None] * self.ff_context(self.norm2_context(ctx, c_shift_mlp, c_scale_mlp))
        return _clip_half(ctx), x


class FluxSingleTransformerBlock(nn.Module):
    """Single-stream block on [text, image]: attention and an MLP side by side, one output projection."""

    def __init__(self, c: FluxConfig):
        super().__init__()
        dim = c.inner_dim
        self.norm = AdaNormZero(dim, 3)
        self.proj_mlp = nn.Linear(dim, 4 * dim)
        self.proj_out = nn.Linear(5 * dim, dim)
        self.attn = FluxAttention(dim, c.num_attention_heads, c.attention_head_dim, joint=False, out=False)

    def forward(self, x, ctx, temb_act, rope):
        n_txt = ctx.shape[1]
        s = torch.cat([ctx, x], dim=1)  # (B, L+N, D)
        h, (gate,) = self.norm(s, temb_act)
        mlp = F.gelu(self.proj_mlp(h), approximate="tanh")  # (B, L+N, 4D)
        s = s + gate[:, None] * self.proj_out(torch.cat([self.attn(h, rope), mlp], dim=2))
        s = _clip_half(s)
        return s[:, :n_txt], s[:, n_txt:]


class Flux(nn.Module):
    """forward(x (B, 16, H, W) latents, timestep (B,) in [0, 1000], encoder_hidden_states (B, L, 4096),
    text_embeds (B, 768) pooled CLIP, guidance (B,) distilled guidance strength (dev)) -> velocity (B, 16, H, W)."""

    def __init__(self, config: FluxConfig):
        super().__init__()
        self.config = c = config
        self.time_text_embed = TimeGuidanceTextEmbedding(c.inner_dim, c.pooled_projection_dim, c.guidance_embeds)
        self.context_embedder = nn.Linear(c.joint_attention_dim, c.inner_dim)
        self.x_embedder = nn.Linear(c.in_channels, c.inner_dim)
        self.transformer_blocks = nn.ModuleList([FluxTransformerBlock(c) for _ in range(c.num_layers)])
        self.single_transformer_blocks = nn.ModuleList([FluxSingleTransformerBlock(c)
                                                        for _ in range(c.num_single_layers)])
        self.norm_out = AdaNormContinuous(c.inner_dim)
        self.proj_out = nn.Linear(c.inner_dim, c.latent_channels * PACK * PACK)

    def forward(self, x, timestep, class_labels=None, encoder_hidden_states=None, text_embeds=None, time_ids=None,
                guidance=None, image_latents=None, block_residuals=None, single_residuals=None, residuals_repeat=False):
        """image_latents (B, K, H, W): FLUX.1 Fill's / Depth's / Canny's conditioning channels
        (``config.condition_channels``), packed after the latents' as FluxFillPipeline / FluxControlPipeline
        concatenate them. block_residuals / single_residuals: a FLUX.1 ControlNet's outputs, each (B, N, D) (N image
        tokens), added to the image tokens after the double / single blocks; with fewer outputs than blocks, each
        serves ceil(blocks / outputs) blocks in turn, as diffusers' transformer spreads them; residuals_repeat (XLabs'
        ControlNets, ``controlnet_blocks_repeat``): double block i reads output i % outputs instead."""
        c = self.config
        if class_labels is not None or time_ids is not None:
            raise BadArgumentError("Flux takes no class_labels / time_ids (it conditions on T5 states, a pooled "
                                   "CLIP embedding and, for dev, a guidance strength)")
        if encoder_hidden_states is None or text_embeds is None:
            raise BadArgumentError(f"Flux needs encoder_hidden_states (B, tokens, {c.joint_attention_dim}) and "
                                   f"text_embeds (B, {c.pooled_projection_dim}), the pooled CLIP embedding")
        if c.guidance_embeds and guidance is None:
            raise BadArgumentError("this Flux model is guidance-distilled (guidance_embeds): expected guidance (B,), "
                                   "the strength diffusers calls guidance_scale (3.5 by default), found None")
        if not c.guidance_embeds and guidance is not None:
            raise BadArgumentError("guidance: given, but this Flux model has no guidance input (guidance_embeds "
                                   "is false: schnell-style)")
        check_text_inputs(encoder_hidden_states, text_embeds, c.joint_attention_dim, c.pooled_projection_dim,
                          x.shape[0], "Flux")
        b, ch, hgt, wid = x.shape
        if ch != c.latent_channels or hgt % PACK or wid % PACK:
            raise BadArgumentError(f"latents: expected (B, {c.latent_channels}, H, W) with even H and W, found "
                                   f"{tuple(x.shape)}")
        if (image_latents is None) != (not c.condition_channels) or (
                image_latents is not None and tuple(image_latents.shape) != (b, c.condition_channels, hgt, wid)):
            raise BadArgumentError("image_latents: expected " + (
                f"({b}, {c.condition_channels}, {hgt}, {wid}) (FLUX.1 Fill's / Depth's / Canny's conditioning)"
                if c.condition_channels else "none (this transformer takes the latents alone)") + ", found "
                + ("none" if image_latents is None else str(tuple(image_latents.shape))))
        gh, gw = hgt // PACK, wid // PACK
        if image_latents is not None:  # packing is per channel: packing the concatenation concatenates the packings
            x = torch.cat([x, image_latents.to(x.dtype)], dim=1)  # (B, C + K, H, W)
        h = self.x_embedder(pack(x))  # (B, N, D)
        temb_act, ctx = embed_conditioning(self, timestep, guidance, text_embeds, encoder_hidden_states, h)
        rope = rotary_tables(position_ids(ctx.shape[1], gh, gw, x.device), c.axes_dims_rope)  # 2 x (L+N, Dh)
        for i, block in enumerate(self.transformer_blocks):
            ctx, h = block(h, ctx, temb_act, rope)
            h = _with_residual(h, block_residuals, i, len(self.transformer_blocks), residuals_repeat)
        for i, block in enumerate(self.single_transformer_blocks):
            ctx, h = block(h, ctx, temb_act, rope)
            h = _with_residual(h, single_residuals, i, len(self.single_transformer_blocks))
        h = self.proj_out(self.norm_out(h, temb_act))  # (B, N, 4C)
        return h.reshape(b, gh, gw, ch, PACK, PACK).permute(0, 3, 1, 4, 2, 5).reshape(b, ch, hgt, wid)


def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): each 2x2 patch one token, as FluxPipeline's ``_pack_latents``."""
    b, cin, hgt, wid = x.shape
    gh, gw = hgt // PACK, wid // PACK
    return x.reshape(b, cin, gh, PACK, gw, PACK).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, cin * PACK * PACK)


def embed_conditioning(net: nn.Module, timestep, guidance, text_embeds, encoder_hidden_states,
                       h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(SiLU of the time / guidance / pooled-text embedding (B, D), the text tokens (B, L, D)) of a Flux network
    (``net``: its ``time_text_embed`` and ``context_embedder``), in the dtype and on the device of the image tokens
    ``h`` (B, N, D); ``guidance`` is dropped by a network without a guidance embedder."""
    b, device = h.shape[0], h.device
    t = timestep if torch.is_tensor(timestep) else torch.tensor([float(timestep)], device=device)
    # FluxPipeline hands the transformer t.to(dtype) / 1000, which multiplies by 1000 again: the same roundings
    t = (t.to(device, h.dtype).reshape(-1).expand(b) / 1000) * 1000  # (B,)
    g = None
    if guidance is not None and net.time_text_embed.guidance_embedder is not None:
        g = torch.as_tensor(guidance, device=device).to(h.dtype).reshape(-1).expand(b) * 1000
    temb_act = F.silu(net.time_text_embed(t, g, text_embeds.to(h.dtype)))  # (B, D)
    return temb_act, net.context_embedder(encoder_hidden_states.to(h.dtype))  # (B, L, D)


def _with_residual(h: torch.Tensor, residuals, i: int, blocks: int, repeat: bool = False) -> torch.Tensor:
    """h plus the ControlNet output that block ``i`` (of ``blocks``) reads: output i // ceil(blocks / outputs), or
    (``repeat``) i % outputs."""
    if not residuals:
        return h
    return h + residuals[i % len(residuals) if repeat else i // -(-blocks // len(residuals))]


__all__ = ["Flux", "FluxConfig", "flux_dev_config", "rotary_tables", "apply_rotary", "pack", "embed_conditioning",
           "position_ids"]
