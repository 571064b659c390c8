"""DiT: Scalable Diffusion Models with Transformers (Peebles & Xie), as one file.

Reads top to bottom like facebookresearch/DiT ``models.py``: config and presets, embedders, the
transformer block, the final layer, the model, then the 2-D sin-cos table. Parameter names are the
official ones (``x_embedder.proj``, ``t_embedder.mlp.0``, ``blocks.3.attn.qkv``, ...), so an official
checkpoint loads with no renaming; diffusers' ``DiTTransformer2DModel`` is converted to this layout by
``fastdiff.checkpoints.dit``.

The hot ops (adaLN ``modulate``, the gated residual, attention) are the fused-op layers of
``fastdiff.models.layers``, so ``layers.set_backend(model, "triton")`` reaches them.

Two numerics differ between the official code and diffusers; both are config fields, never guesses:
``freq_shift`` (official 0, diffusers 1: frequencies exp(-ln(1e4) i / (128 - shift))) and
``mlp_norm_eps`` (official 1e-6, diffusers ``norm_eps``, 1e-5 by default). A diffusers model also gives
every block its own timestep / class embedder (``per_block_conditioning``); real converted checkpoints
hold identical copies, which the converter collapses to the official single embedder.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import BadArgumentError, UnsupportedConfigError
from ..utils.strict_dict import check_field_types, known_fields
from .layers import Attention, ModulatedLayerNorm, exporting, timestep_embedding
from .linear_stack import LinearStacks, stacked_output

MLP_ACTIVATIONS = ("gelu_tanh", "gelu")


# ---------------------------------------------------------------------------------------------------
# Config and presets
# ---------------------------------------------------------------------------------------------------

@dataclass
class DiTConfig:
    """Everything that decides the network's shape and numerics (defaults: official DiT-XL/2, 256px)."""

    input_size: int = 32                    # latent height = width
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1         # > 0: the label table has a null (CFG) row at index num_classes
    num_classes: int = 1000
    learn_sigma: bool = True                # output 2 * in_channels (eps, then the variance values)
    qkv_bias: bool = True                   # diffusers attention_bias
    mlp_act: str = "gelu_tanh"              # "gelu_tanh" (official, diffusers gelu-approximate) | "gelu"
    norm_eps: float = 1e-6                  # LayerNorm before attention and in the final layer
    mlp_norm_eps: float = 1e-6              # LayerNorm before the MLP (diffusers: config norm_eps)
    frequency_embedding_size: int = 256
    freq_shift: float = 0.0                 # timestep frequencies; diffusers' DiT uses 1
    pos_interpolation_scale: float = 1.0    # 2-D sin-cos grid = arange(grid) / scale (diffusers)
    per_block_conditioning: bool = False    # blocks 1.. have their own t / y embedders (diffusers random init)

    def __post_init__(self):
        def bad(field, why):
            raise UnsupportedConfigError(field, getattr(self, field), supported=why, model="DiT")

        check_field_types(self, "DiT")
        for f in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads",
                  "frequency_embedding_size"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                bad(f, "a positive int")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 0:
            bad("num_classes", "an int >= 0")
        if self.input_size % self.patch_size:
            bad("input_size", f"a multiple of patch_size={self.patch_size}")
        if self.hidden_size % self.num_heads:
            bad("num_heads", f"a divisor of hidden_size={self.hidden_size}")
        if self.hidden_size % 4:
            bad("hidden_size", "a multiple of 4 (the 2-D sin-cos position table)")
        if self.mlp_act not in MLP_ACTIVATIONS:
            bad("mlp_act", list(MLP_ACTIVATIONS))
        if not 0.0 <= self.class_dropout_prob < 1.0:
            bad("class_dropout_prob", "a value in [0, 1)")
        if self.mlp_ratio <= 0 or int(self.hidden_size * self.mlp_ratio) < 1:
            bad("mlp_ratio", "a positive ratio")
        if self.pos_interpolation_scale <= 0:
            bad("pos_interpolation_scale", "a positive value")

    # derived sizes
    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    @property
    def has_null_class(self) -> bool:
        return self.class_dropout_prob > 0

    @property
    def mlp_hidden_size(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DiTConfig":
        """Inverse of ``to_dict``; keys starting with ``_`` are metadata and skipped, any other unknown
        key raises UnsupportedConfigError naming it."""
        return cls(**known_fields(cls, d, model="DiT"))

    @classmethod
    def from_name(cls, name: str, **overrides) -> "DiTConfig":
        """A named preset, e.g. ``DiTConfig.from_name("DiT-XL/2", input_size=64)`` (512px)."""
        if name not in DIT_PRESETS:
            raise BadArgumentError(f"unknown DiT preset {name!r}; expected one of {list(DIT_PRESETS)}")
        return cls.from_dict({**DIT_PRESETS[name], **overrides})


# The official family (DiT models.py: DiT_models). Sizes: (depth, hidden_size, num_heads).
_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
DIT_PRESETS: dict[str, dict] = {
    f"DiT-{size}/{p}": dict(depth=d, hidden_size=h, num_heads=n, patch_size=p)
    for size, (d, h, n) in _SIZES.items() for p in (2, 4, 8)
}
# num_heads for a hidden size (the weights do not say; official presets do).
OFFICIAL_HEADS_BY_HIDDEN = {h: n for (_, h, n) in _SIZES.values()}


# ---------------------------------------------------------------------------------------------------
# Embedding layers for timesteps and class labels
# ---------------------------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    """(N, C, H, W) -> (N, T, D) tokens with a p x p stride-p convolution (timm PatchEmbed)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, D, h, w) -> (N, T, D)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> (N, D): sinusoidal [cos, sin] frequencies, then Linear, SiLU, Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, freq_shift: float = 0.0):
        super().__init__()
        self.frequency_embedding_size, self.freq_shift = frequency_embedding_size, freq_shift
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    def forward(self, t):
        t_freq = timestep_embedding(t, self.frequency_embedding_size, flip_sin_to_cos=True,
                                    freq_shift=self.freq_shift)  # (N, F) float32
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (N, D)


class LabelEmbedder(nn.Module):
    """Class labels -> (N, D). Row ``num_classes`` is the null class when dropout was used in training.

    Inference only: labels are never dropped at random here; ask for the null class explicitly.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def forward(self, labels):
        return self.embedding_table(labels)  # (N, D)


# ---------------------------------------------------------------------------------------------------
# Core DiT model
# ---------------------------------------------------------------------------------------------------

class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused qkv Linear (timm Attention layout: q | k | v, head-major)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.core = Attention()  # SDPA on (B, H, N, Dh): the fused-op layer
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)  # (B, N, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, Dh)
        x = self.core(q, k, v)  # (B, H, N, Dh)
        x = x.transpose(1, 2).reshape(B, N, C)  # (B, N, D)
        return self.proj(x)  # (B, N, D)


class Mlp(nn.Module):
    """fc1 -> GELU (tanh approximation by default) -> fc2."""

    def __init__(self, dim: int, hidden: int, act: str = "gelu_tanh"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.approximate = "tanh" if act == "gelu_tanh" else "none"
        self.fc2 = nn.Linear(hidden, dim)

    def fused_gelu(self, x) -> bool:
        """Whether fc1 + GELU run as one cuBLASLt GEMM with a bias + GELU(tanh) epilogue: on CUDA, where
        ``torch._addmm_activation`` is defined as ``gelu(addmm, approximate="tanh")`` (torch's decomposition;
        it falls back to exactly that where cuBLASLt does not apply). Its CPU kernel uses the exact GELU.
        Half precision only (the DiT inference dtypes; float32 stays on the reference path), not under
        autocast (the op is not on autocast's lists)."""
        return (self.approximate == "tanh" and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
                and self.fc1.bias is not None and self.fc1.weight.dtype == x.dtype
                and not torch.is_autocast_enabled() and not exporting() and not self.__dict__.get("_refused"))

    def forward(self, x):
        if self.fused_gelu(x):  # no separate GELU kernel over the (N*T, 4D) hidden activations
            try:
                h = torch._addmm_activation(self.fc1.bias, x.reshape(-1, x.shape[-1]), self.fc1.weight.t(),
                                            use_gelu=True)  # (N*T, 4D)
            except RuntimeError:  # a torch build that refuses it: the two-kernel path from now on
                if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                    raise
                self._refused = True
            else:
                return self.fc2(h.reshape(*x.shape[:-1], h.shape[-1]))  # (N, T, D)
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class DiTBlock(nn.Module):
    """A DiT block with adaptive layer norm zero (adaLN-Zero) conditioning.

    With ``own_conditioning`` the block carries its own timestep / class embedders (diffusers gives each
    block a copy; a random-initialised diffusers model has different ones).
    """

    def __init__(self, config: DiTConfig, own_conditioning: bool = False):
        super().__init__()
        D = config.hidden_size
        self.norm1 = ModulatedLayerNorm(D, eps=config.norm_eps)
        self.attn = SelfAttention(D, config.num_heads, qkv_bias=config.qkv_bias)
        self.norm2 = ModulatedLayerNorm(D, eps=config.mlp_norm_eps)
        self.mlp = Mlp(D, config.mlp_hidden_size, config.mlp_act)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D, bias=True))
        if own_conditioning:
            self.t_embedder = TimestepEmbedder(D, config.frequency_embedding_size, config.freq_shift)
            self.y_embedder = LabelEmbedder(config.num_classes, D, config.class_dropout_prob)
        else:
            self.t_embedder = self.y_embedder = None

    def forward(self, x, mod, pending=None):
        """x (N, T, D); mod (N, 6D) this block's modulation (``DiT._modulations``); ``pending`` = (gate, y): the
        previous block's last residual ``x + gate * y``, not yet added.

        Returns (x, (gate_mlp, mlp output)): this block's own last residual is left pending as well, because
        every residual is added by the adaLN norm that follows it (the next block's first, or the final
        layer's), in one pass on the fused path. ``x + gate * y`` of the returned pair is the block's output.
        """
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)  # 6 x (N, D)
        if pending is None:
            h = self.norm1(x, shift_msa, scale_msa)  # (N, T, D)
        else:
            x, h = self.norm1(x, shift_msa, scale_msa, residual=pending)
        x, h = self.norm2(x, shift_mlp, scale_mlp, residual=(gate_msa, self.attn(h)))  # (N, T, D) each
        return x, (gate_mlp, self.mlp(h))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a Linear to p * p * out_channels per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, eps: float = 1e-6):
        super().__init__()
        self.norm_final = ModulatedLayerNorm(hidden_size, eps=eps)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, mod, pending=None):
        """x (N, T, D); mod (N, 2D); ``pending`` = (gate, y): the last block's residual, added here first."""
        shift, scale = mod.chunk(2, dim=1)  # 2 x (N, D)
        h = self.norm_final(x, shift, scale) if pending is None else \
            self.norm_final(x, shift, scale, residual=pending)[1]  # (N, T, D)
        return self.linear(h)  # (N, T, p * p * C_out)


class DiT(LinearStacks, nn.Module):
    """Diffusion model with a Transformer backbone.

    ``model(x, timestep, class_labels=None)`` returns the official raw output: (N, C_out, H, W), with
    C_out = 2 * in_channels (eps, then the learned-range variance values) when ``learn_sigma``.
    """

    STACKS = ("adaln",)  # every adaLN projection: fastdiff.models.linear_stack

    def __init__(self, config: DiTConfig):
        super().__init__()
        if not isinstance(config, DiTConfig):
            raise BadArgumentError(f"DiT expects a DiTConfig, found {type(config).__name__}")
        self.config = config
        c = config
        self.in_channels, self.out_channels, self.patch_size = c.in_channels, c.out_channels, c.patch_size
        self.num_classes = c.num_classes

        self.x_embedder = PatchEmbed(c.patch_size, c.in_channels, c.hidden_size)
        self.t_embedder = TimestepEmbedder(c.hidden_size, c.frequency_embedding_size, c.freq_shift)
        self.y_embedder = LabelEmbedder(c.num_classes, c.hidden_size, c.class_dropout_prob)
        # The fixed 2-D sin-cos table, a frozen Parameter as in the official code (so it is in the state
        # dict and the parameter count). Built on `meta` it holds no values: load_state_dict(assign=True)
        # brings the checkpoint's table, or init_pos_embed() recomputes it.
        self.pos_embed = nn.Parameter(torch.empty(1, c.num_patches, c.hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            [DiTBlock(c, own_conditioning=c.per_block_conditioning and i > 0) for i in range(c.depth)])
        self.final_layer = FinalLayer(c.hidden_size, c.patch_size, c.out_channels, eps=c.norm_eps)
        # Every adaLN projection stacked, adaln_weight (depth * 6D + 2D, D) and adaln_bias: set by stack_adaln
        # (fastdiff.models.fuse.fuse_adaln) as non-persistent buffers (checkpoints keep the per-block layout).
        self._init_stacks()
        # set for the length of one sampling loop by fastdiff.models.modulation_schedule.scheduled
        self._modulation_schedule = None
        if self.pos_embed.device.type != "meta":
            self.init_pos_embed()

    @torch.no_grad()
    def init_pos_embed(self) -> None:
        """(Re)compute the fixed sin-cos table in place, on the parameter's device and dtype."""
        table = sincos_pos_embed_2d(self.config.hidden_size, self.config.grid_size,
                                    self.config.pos_interpolation_scale)  # (T, D) float32
        self.pos_embed.copy_(table.unsqueeze(0))

    def _labels(self, class_labels, batch: int, device) -> torch.Tensor:
        if class_labels is None:
            if not self.config.has_null_class:
                raise BadArgumentError("DiT: class_labels is required (this model has no null class: "
                                       "class_dropout_prob = 0)")
            return torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        y = torch.as_tensor(class_labels, device=device)
        if y.dim() == 0:
            y = y.expand(batch)
        return y.long()

    def unpatchify(self, x, h: int, w: int):
        """(N, T, p * p * C) -> (N, C, h * p, w * p); token t = row * w + col, feature (p_row, p_col, c)."""
        p, C = self.patch_size, self.out_channels
        x = x.reshape(x.shape[0], h, w, p, p, C)  # (N, h, w, p, p, C)
        x = x.permute(0, 5, 1, 3, 2, 4)  # (N, C, h, p, w, p)  == einsum('nhwpqc->nchpwq')
        return x.reshape(x.shape[0], C, h * p, w * p)  # (N, C, H, W)

    def forward(self, x, timestep, class_labels=None, encoder_hidden_states=None):
        """x (N, C, H, W); timestep (N,) or scalar, int or float; class_labels (N,) int64 or None (null)."""
        if encoder_hidden_states is not None:
            raise BadArgumentError("DiT is class-conditional: encoder_hidden_states must be None")
        N, _, H, W = x.shape
        if H != self.config.input_size or W != self.config.input_size:
            raise BadArgumentError(f"DiT: expected a {self.config.input_size}x{self.config.input_size} input "
                                   f"(config input_size), found {H}x{W}")
        t = torch.as_tensor(timestep, device=x.device)
        t = t.expand(N) if t.dim() == 0 else t  # (N,)
        y = self._labels(class_labels, N, x.device)  # (N,)
        h, w = H // self.patch_size, W // self.patch_size

        x = self.x_embedder(x) + self.pos_embed  # (N, T, D), T = h * w
        schedule = self.__dict__.get("_modulation_schedule")
        mods = None if schedule is None else schedule.take(self, timestep, y)  # every call's, computed at once
        if mods is None:
            mods = self._modulations(t, y)  # depth x (N, 6D) + (N, 2D)
        pending = None  # each block's last residual, added by the norm that follows it
        for i, block in enumerate(self.blocks):
            x, pending = block(x, mods[i], pending)  # (N, T, D), ((N, D), (N, T, D))
        x = self.final_layer(x, mods[-1], pending)  # (N, T, p * p * C_out)
        return self.unpatchify(x, h, w)  # (N, C_out, H, W)

    def _modulations(self, t, y) -> list:
        """Every block's adaLN modulation (N, 6D) and the final layer's (N, 2D) for timesteps ``t`` and labels
        ``y``: from the stacked projection in one matmul (``fuse_adaln``), or one matmul per layer."""
        c = self.t_embedder(t) + self.y_embedder(y)  # (N, D)
        c_act = F.silu(c)  # every adaLN starts with SiLU(c): computed once, not once per block
        mods = self.fused_modulation(c_act)
        if mods is not None:
            return list(mods)
        out = []
        for block in self.blocks:
            if block.t_embedder is None:
                out.append(block.adaLN_modulation[1](c_act))
            else:  # a block with its own embedders (diffusers' per-block copies)
                out.append(block.adaLN_modulation(block.t_embedder(t) + block.y_embedder(y)))
        return out + [self.final_layer.adaLN_modulation[1](c_act)]

    # --- every adaLN projection as one matmul (OptimizeConfig(fuse_adaln=True)) ---------------------------
    def _adaln_layers(self) -> Optional[list]:
        """The Linear layers behind every adaLN modulation, or None where they cannot be stacked (blocks with
        their own conditioning embedders project a different c each; biasless layers)."""
        if any(b.t_embedder is not None for b in self.blocks):
            return None
        layers = [b.adaLN_modulation[1] for b in self.blocks] + [self.final_layer.adaLN_modulation[1]]
        return None if any(lin.bias is None for lin in layers) else layers

    def stack_layers(self, name: str) -> Optional[list]:
        return self._adaln_layers() if name == "adaln" else None

    def stack_adaln(self) -> int:
        """Stack every adaLN projection into one (depth * 6D + 2D, D) weight whose views the layers' weights
        become (``LinearStacks.stack``). Returns how many layers were stacked (0: not possible for this model)."""
        return self.stack("adaln")

    def fused_modulation(self, c_act):
        """Every block's adaLN modulation and the final layer's from one (N, D) x (D, depth * 6D + 2D) matmul,
        split into per-layer views (rows strided by the whole width; the fused layers take strided rows).
        None (one matmul per layer) when not stacked, and with autograd on: the stack is a buffer, so training
        goes through the layers' own parameters."""
        out = stacked_output(self, "adaln", c_act)  # (N, depth * 6D + 2D)
        return None if out is None else self.split_modulation(out)

    def split_modulation(self, out):
        """(N, depth * 6D + 2D) -> depth x (N, 6D) + (N, 2D) views, the blocks' then the final layer's."""
        D = self.config.hidden_size
        return out.split([6 * D] * len(self.blocks) + [2 * D], dim=1)

    def modulation_width(self) -> Optional[int]:
        """depth * 6D + 2D when the projections are stacked and autograd is off (what ``modulation_for_calls``
        needs), else None."""
        if self.adaln_weight is None or torch.is_grad_enabled() or not self.stack_current("adaln"):
            return None
        return self.adaln_weight.shape[0]

    def modulation_for_calls(self, timesteps: list, labels: torch.Tensor) -> torch.Tensor:
        """(K, N, depth * 6D + 2D): the stacked modulation of K network calls, timestep ``timesteps[k]`` (N,)
        each and ``labels`` (N,) for all, in one matmul (``fastdiff.models.modulation_schedule``)."""
        K, N, D = len(timesteps), labels.shape[0], self.config.hidden_size
        t = torch.cat(timesteps)  # (K * N,)
        c = self.t_embedder(t).reshape(K, N, D) + self.y_embedder(labels)  # (K, N, D)
        out = F.linear(F.silu(c).reshape(K * N, D), self.adaln_weight, self.adaln_bias)  # (K * N, W)
        return out.reshape(K, N, -1)

    def forward_with_cfg(self, x, timestep, class_labels, cfg_scale: float, guided_channels: Optional[int] = 3):
        """Classifier-free guidance in ONE batched call, exactly as official DiT's ``forward_with_cfg``.

        The batch holds [cond; uncond] halves; only ``x[:N/2]`` is used (duplicated), the guided eps
        ``uncond + s * (cond - uncond)`` fills both halves. ``guided_channels=3`` is the official
        behaviour (the first 3 channels only; the rest pass through unguided); ``None`` guides all eps
        channels (``in_channels``).
        """
        half = x[: len(x) // 2]  # (N/2, C, H, W)
        combined = torch.cat([half, half], dim=0)  # (N, C, H, W)
        model_out = self.forward(combined, timestep, class_labels)  # (N, C_out, H, W)
        g = self.in_channels if guided_channels is None else guided_channels
        eps, rest = model_out[:, :g], model_out[:, g:]  # (N, g, H, W), (N, C_out - g, H, W)
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)  # 2 x (N/2, g, H, W)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)  # (N/2, g, H, W)
        eps = torch.cat([half_eps, half_eps], dim=0)  # (N, g, H, W)
        return torch.cat([eps, rest], dim=1)  # (N, C_out, H, W)


# ---------------------------------------------------------------------------------------------------
# Sine/cosine positional embedding (MAE / official DiT: computed in float64, stored as float32)
# ---------------------------------------------------------------------------------------------------

def sincos_pos_embed_2d(embed_dim: int, grid_size: int, interpolation_scale: float = 1.0,
                        device=None) -> torch.Tensor:
    """(grid_size**2, embed_dim) float32 table. Token t = row * grid + col; the first half of the
    features encodes the column, the second half the row (``np.meshgrid(grid_w, grid_h)``)."""
    pos = torch.arange(grid_size, dtype=torch.float32, device=device) / interpolation_scale  # (g,)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")  # (g, g) each
    emb_w = _sincos_1d(embed_dim // 2, cols.reshape(-1))  # (T, D/2)
    emb_h = _sincos_1d(embed_dim // 2, rows.reshape(-1))  # (T, D/2)
    return torch.cat([emb_w, emb_h], dim=1).float()  # (T, D)


def _sincos_1d(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = torch.arange(embed_dim // 2, dtype=torch.float64, device=pos.device) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega  # (D/2,)
    out = torch.outer(pos.to(torch.float64), omega)  # (M, D/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (M, D)


def count_params(config: DiTConfig) -> int:
    """Parameter count of the official layout (pos_embed included, as in the DiT paper's 675M)."""
    with torch.device("meta"):
        return sum(p.numel() for p in DiT(config).parameters())


__all__ = ["DiTConfig", "DIT_PRESETS", "OFFICIAL_HEADS_BY_HIDDEN", "DiT", "DiTBlock", "FinalLayer",
           "PatchEmbed", "TimestepEmbedder", "LabelEmbedder", "SelfAttention", "Mlp",
           "sincos_pos_embed_2d", "count_params"]
