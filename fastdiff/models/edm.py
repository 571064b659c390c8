"""EDM's UNets (Karras et al. 2022, NVlabs/edm ``training/networks.py``) as one file.

Reads top to bottom: config, low-level layers (Conv2d with a resampling filter, the noise embeddings),
the shared ``UNetBlock``, then the two networks:

* ``SongUNet``: DDPM++ / NCSN++ (Song et al. 2021), EDM's ``ddpmpp`` and ``ncsnpp`` architectures.
* ``DhariwalUNet``: ADM (Dhariwal & Nichol 2021), EDM's ``adm`` architecture.

Parameter and buffer names are EDM's, minus the ``model.`` prefix of ``EDMPrecond``, so a plain
``EDMPrecond.state_dict()`` loads with no renaming once that prefix is stripped
(``fastdiff.checkpoints.edm``). The ``resample_filter`` tensors of the up/down convolutions are
persistent buffers, exactly as in EDM's checkpoints.

Forward: ``model(x, timestep, class_labels=None, encoder_hidden_states=None)`` where ``timestep`` is the
network's ``noise_labels`` (EDM's c_noise = ln(sigma)/4: the preconditioning lives in
``fastdiff.denoiser.EDMDenoiser``, never here). ``class_labels`` are int labels (one-hot encoded here) or
one-hot / soft float vectors (B, label_dim); None means the zero vector, as ``EDMPrecond`` does.

Inference only: ``dropout`` and ``label_dropout`` are kept in the config (they are constructor args of
the official networks) but never applied.

``EDMUNet(config)`` builds the network named by ``config.model_type`` (it returns a ``SongUNet`` or
``DhariwalUNet``, both subclasses of ``EDMUNet``), so ``MODEL_KINDS`` needs one class.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import BadArgumentError, UnsupportedConfigError
from ..utils.strict_dict import check_field_types, known_fields
from .layers import Attention, GroupNorm

MODEL_TYPES = ("SongUNet", "DhariwalUNet")
EMBEDDING_TYPES = ("positional", "fourier")
ENCODER_TYPES = ("standard", "skip", "residual")
DECODER_TYPES = ("standard", "skip")
# Arguments DhariwalUNet does not take: they must keep SongUNet's defaults when model_type="DhariwalUNet".
_SONG_ONLY = {"embedding_type": "positional", "channel_mult_noise": 1, "encoder_type": "standard",
              "decoder_type": "standard", "resample_filter": (1, 1)}


# ---------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------

@dataclass
class EDMUNetConfig:
    """The inner network's constructor arguments (names as in EDM); defaults are SongUNet's.

    ``model_type`` picks the class; ``img_resolution`` / ``in_channels`` / ``out_channels`` are what
    ``EDMPrecond`` passes (img_resolution, img_channels, img_channels). The last five fields are
    SongUNet-only. Lists are stored as tuples; ``to_dict`` gives lists (JSON).
    """

    model_type: str = "SongUNet"
    img_resolution: int = 32
    in_channels: int = 3
    out_channels: int = 3
    label_dim: int = 0                       # 0: unconditional
    augment_dim: int = 0                     # augmentation labels (training-time; unused at inference)
    model_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    channel_mult_emb: int = 4
    num_blocks: int = 4
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.10                    # inference: not applied
    label_dropout: float = 0.0               # inference: not applied
    embedding_type: str = "positional"       # SongUNet: "positional" (DDPM++) | "fourier" (NCSN++)
    channel_mult_noise: int = 1              # SongUNet: noise embedding width = model_channels * this
    encoder_type: str = "standard"           # SongUNet: "standard" | "skip" | "residual" (NCSN++)
    decoder_type: str = "standard"           # SongUNet: "standard" | "skip"
    resample_filter: tuple[float, ...] = (1, 1)  # SongUNet: 1-D taps of the up/down filter ([1,3,3,1] NCSN++)

    def __post_init__(self):
        def bad(field, why):
            raise UnsupportedConfigError(field, getattr(self, field), supported=why, model="EDM UNet")

        for f in ("channel_mult", "attn_resolutions", "resample_filter"):
            v = getattr(self, f)
            if isinstance(v, (list, tuple)):
                setattr(self, f, tuple(v))
            else:
                bad(f, "a list")
        check_field_types(self, "EDM UNet")
        if self.model_type not in MODEL_TYPES:
            bad("model_type", list(MODEL_TYPES))
        for f in ("img_resolution", "in_channels", "out_channels", "model_channels", "channel_mult_emb",
                  "channel_mult_noise"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                bad(f, "a positive int")
        for f in ("label_dim", "augment_dim", "num_blocks"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                bad(f, "an int >= 0")
        if not self.channel_mult or any(isinstance(m, bool) or not isinstance(m, int) or m < 1
                                        for m in self.channel_mult):
            bad("channel_mult", "a non-empty list of positive ints")
        if self.img_resolution % (1 << (len(self.channel_mult) - 1)):
            bad("img_resolution", f"divisible by 2^{len(self.channel_mult) - 1} (one halving per level)")
        if self.embedding_type not in EMBEDDING_TYPES:
            bad("embedding_type", list(EMBEDDING_TYPES))
        if self.encoder_type not in ENCODER_TYPES:
            bad("encoder_type", list(ENCODER_TYPES))
        if self.decoder_type not in DECODER_TYPES:
            bad("decoder_type", list(DECODER_TYPES))
        if not self.resample_filter or sum(self.resample_filter) == 0:
            bad("resample_filter", "a non-empty list of taps with a non-zero sum")
        if self.model_type == "DhariwalUNet":
            for f, default in _SONG_ONLY.items():
                if getattr(self, f) != default:
                    bad(f, f"{default!r} (DhariwalUNet has no {f} argument)")

    @property
    def emb_channels(self) -> int:
        return self.model_channels * self.channel_mult_emb

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for f in ("channel_mult", "attn_resolutions", "resample_filter"):
            d[f] = list(d[f])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "EDMUNetConfig":
        """Inverse of ``to_dict``; keys starting with ``_`` are metadata and skipped, any other unknown
        key raises UnsupportedConfigError naming it."""
        return cls(**known_fields(cls, d, model="EDM UNet"))


def _groups(channels: int) -> int:
    """EDM's GroupNorm: 32 groups, but at least 4 channels per group."""
    return min(32, channels // 4)


# ---------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------

class Conv2d(nn.Module):
    """EDM's Conv2d: optional weight (``kernel=0``: resampling only), optional 2x up/down by a separable
    FIR filter held in the persistent ``resample_filter`` buffer (outer(f, f) / sum(f)^2, (1, 1, k, k)).

    With f = [1, 1], down is a 2x2 average pool and up is nearest-neighbour. ``fused_resample`` (NCSN++'s
    residual encoder) convolves first and filters after (down), or filters first with no padding (up).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True, up: bool = False,
                 down: bool = False, resample_filter=(1, 1), fused_resample: bool = False):
        super().__init__()
        if up and down:
            raise BadArgumentError("Conv2d: up and down are exclusive")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        if kernel:
            self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel, kernel)
                                       / math.sqrt(in_channels * kernel * kernel))
            self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if up or down:
            f = torch.as_tensor(resample_filter, dtype=torch.float32)
            self.register_buffer("resample_filter", f.outer(f)[None, None] / f.sum().square())  # (1, 1, k, k)
        else:
            self.register_buffer("resample_filter", None)

    def forward(self, x):
        w, b, f = self.weight, self.bias, self.resample_filter
        w = None if w is None else w.to(x.dtype)
        b = None if b is None else b.to(x.dtype)
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        if self.fused_resample and self.up and w is not None:
            f = f.to(x.dtype)
            x = F.conv_transpose2d(x, f.mul(4).tile(self.in_channels, 1, 1, 1), groups=self.in_channels,
                                   stride=2, padding=max(f_pad - w_pad, 0))  # (B, Cin, 2H, 2W)
            return F.conv2d(x, w, b, padding=max(w_pad - f_pad, 0))  # (B, Cout, 2H, 2W)
        if self.fused_resample and self.down and w is not None:
            f = f.to(x.dtype)
            x = F.conv2d(x, w, padding=w_pad + f_pad)  # (B, Cout, H + .., W + ..)
            x = F.conv2d(x, f.tile(self.out_channels, 1, 1, 1), groups=self.out_channels, stride=2)
            return x if b is None else x + b.reshape(1, -1, 1, 1)  # (B, Cout, H/2, W/2)
        if self.up:
            f = f.to(x.dtype)
            x = F.conv_transpose2d(x, f.mul(4).tile(self.in_channels, 1, 1, 1), groups=self.in_channels,
                                   stride=2, padding=f_pad)  # (B, Cin, 2H, 2W)
        if self.down:
            f = f.to(x.dtype)
            x = F.conv2d(x, f.tile(self.in_channels, 1, 1, 1), groups=self.in_channels, stride=2,
                         padding=f_pad)  # (B, Cin, H/2, W/2)
        if w is not None:
            x = F.conv2d(x, w, b, padding=w_pad)  # (B, Cout, H', W')
        return x


class PositionalEmbedding(nn.Module):
    """Transformer sinusoids of the noise label, [cos, sin]: frequencies (1/max_positions)^(i/(half - e)),
    e = 1 with ``endpoint`` (SongUNet), 0 without (DhariwalUNet)."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x):
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device)
        freqs = (1 / self.max_positions) ** (freqs / (half - (1 if self.endpoint else 0)))  # (half,)
        x = x.to(torch.float32).outer(freqs)  # (B, half)
        return torch.cat([x.cos(), x.sin()], dim=1)  # (B, C)


class FourierEmbedding(nn.Module):
    """Random Fourier features (NCSN++): [cos, sin](2 pi x freqs); ``freqs`` is a persistent buffer."""

    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        x = x.to(torch.float32).outer(2 * math.pi * self.freqs.to(torch.float32))  # (B, C/2)
        return torch.cat([x.cos(), x.sin()], dim=1)  # (B, C)


# ---------------------------------------------------------------------------------------------------
# UNet block
# ---------------------------------------------------------------------------------------------------

class UNetBlock(nn.Module):
    """Pre-activation residual block with the noise embedding, optional 2x up/down and self-attention.

    ``adaptive_scale`` (ADM): norm1(h) * (1 + scale) + shift from the embedding; otherwise (DDPM++) the
    embedding is added before norm1. Attention (when ``num_heads``) follows the residual, both scaled by
    ``skip_scale``. qkv channels are interleaved per channel: (head * D + c) * 3 + {q, k, v}.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False,
                 down: bool = False, attention: bool = False, num_heads: Optional[int] = None,
                 channels_per_head: int = 64, skip_scale: float = 1.0, eps: float = 1e-5,
                 resample_filter=(1, 1), resample_proj: bool = False, adaptive_scale: bool = True):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.num_heads = 0 if not attention else num_heads if num_heads is not None \
            else out_channels // channels_per_head
        self.skip_scale, self.adaptive_scale = skip_scale, adaptive_scale

        self.norm0 = GroupNorm(_groups(in_channels), in_channels, eps=eps, activation="silu")
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter)
        self.affine = nn.Linear(emb_channels, out_channels * (2 if adaptive_scale else 1))
        self.norm1 = GroupNorm(_groups(out_channels), out_channels, eps=eps, activation="silu")
        self.conv1 = Conv2d(out_channels, out_channels, 3)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel, up=up, down=down, resample_filter=resample_filter)
        if self.num_heads:
            self.norm2 = GroupNorm(_groups(out_channels), out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1)
            self.proj = Conv2d(out_channels, out_channels, 1)
            self.core = Attention()  # SDPA on (B, H, N, D): the fused-op layer

    def forward(self, x, emb):
        orig = x  # (B, Cin, H, W)
        x = self.conv0(self.norm0(x))  # (B, Cout, H', W')
        params = self.affine(emb).to(x.dtype)  # (B, Cout * (2 | 1))
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)  # 2 x (B, Cout)
            x = self.norm1(x, scale=scale, shift=shift)  # silu(norm1(x) * (1 + scale) + shift)
        else:
            x = self.norm1(x + params[:, :, None, None])  # silu(norm1(x + emb))
        x = self.conv1(x)  # (B, Cout, H', W')
        x = x + (self.skip(orig) if self.skip is not None else orig)
        if self.skip_scale != 1:
            x = x * self.skip_scale

        if self.num_heads:
            B, C, H, W = x.shape
            heads = self.num_heads
            qkv = self.qkv(self.norm2(x)).reshape(B, heads, C // heads, 3, H * W)  # (B, h, D, 3, N)
            q, k, v = qkv.permute(3, 0, 1, 4, 2).unbind(0)  # 3 x (B, h, N, D)
            a = self.core(q, k, v, scale=1 / math.sqrt(C // heads))  # (B, h, N, D)
            a = a.transpose(2, 3).reshape(B, C, H, W)  # (B, C, H, W), channel = head * D + c
            x = self.proj(a) + x
            if self.skip_scale != 1:
                x = x * self.skip_scale
        return x


# ---------------------------------------------------------------------------------------------------
# The networks
# ---------------------------------------------------------------------------------------------------

class EDMUNet(nn.Module):
    """Base of SongUNet and DhariwalUNet. ``EDMUNet(config)`` returns the class ``config.model_type``
    names; both share the input handling (noise labels, class labels) below."""

    config: EDMUNetConfig

    def __new__(cls, config: EDMUNetConfig, *args, **kwargs):
        if cls is EDMUNet:
            if isinstance(config, dict):
                config = EDMUNetConfig.from_dict(config)
            cls = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}[config.model_type]
        return super().__new__(cls)

    def _setup(self, config):
        if isinstance(config, dict):
            config = EDMUNetConfig.from_dict(config)
        expected = type(self).__name__
        if config.model_type != expected:
            raise BadArgumentError(f"{expected}: expected config.model_type={expected!r}, found "
                                   f"{config.model_type!r}")
        self.config = config
        return config

    def _noise_labels(self, timestep, x: torch.Tensor) -> torch.Tensor:
        """c_noise as (B,) float32: a scalar or (1,) timestep is shared by the batch."""
        t = torch.as_tensor(timestep, device=x.device).to(torch.float32).reshape(-1)
        return t.expand(x.shape[0]) if t.shape[0] == 1 else t

    def _class_vectors(self, class_labels, x: torch.Tensor) -> Optional[torch.Tensor]:
        """(B, label_dim) label vectors in the map_label dtype, or None for an unconditional network.

        Int labels are one-hot encoded without a host sync (an out-of-range label gives the zero vector);
        None gives the zero vector, as EDMPrecond does."""
        if self.map_label is None:
            return None
        dim, dtype = self.config.label_dim, self.map_label.weight.dtype
        if class_labels is None:
            return torch.zeros(x.shape[0], dim, device=x.device, dtype=dtype)
        labels = torch.as_tensor(class_labels, device=x.device)
        if not labels.is_floating_point():
            labels = labels.reshape(-1, 1) == torch.arange(dim, device=x.device)  # (B, label_dim)
        labels = labels.to(dtype).reshape(-1, dim)
        return labels.expand(x.shape[0], dim) if labels.shape[0] == 1 else labels

    @staticmethod
    def _check_cond(encoder_hidden_states):
        if encoder_hidden_states is not None:
            raise BadArgumentError("EDM UNets take no encoder_hidden_states (no cross-attention); found a tensor "
                                   f"of shape {tuple(encoder_hidden_states.shape)}")


class SongUNet(EDMUNet):
    """DDPM++ / NCSN++: positional (or Fourier) noise embedding swapped to [sin, cos], label term
    map_label(labels * sqrt(label_dim)) added before map_layer0, one attention head, skip_scale sqrt(0.5),
    GroupNorm eps 1e-6, output = sum of the decoder's aux convolutions."""

    def __init__(self, config: EDMUNetConfig):
        super().__init__()
        c = self._setup(config)
        emb_channels = c.model_channels * c.channel_mult_emb
        noise_channels = c.model_channels * c.channel_mult_noise
        block_kwargs = dict(emb_channels=emb_channels, num_heads=1, skip_scale=math.sqrt(0.5), eps=1e-6,
                            resample_filter=c.resample_filter, resample_proj=True, adaptive_scale=False)

        # Mapping.
        self.map_noise = PositionalEmbedding(noise_channels, endpoint=True) if c.embedding_type == "positional" \
            else FourierEmbedding(noise_channels)
        self.map_label = nn.Linear(c.label_dim, noise_channels) if c.label_dim else None
        self.map_augment = nn.Linear(c.augment_dim, noise_channels, bias=False) if c.augment_dim else None
        self.map_layer0 = nn.Linear(noise_channels, emb_channels)
        self.map_layer1 = nn.Linear(emb_channels, emb_channels)

        # Encoder.
        self.enc = nn.ModuleDict()
        cout = caux = c.in_channels
        for level, mult in enumerate(c.channel_mult):
            res = c.img_resolution >> level
            if level == 0:
                cin, cout = cout, c.model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
                if c.encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(caux, caux, 0, down=True,
                                                               resample_filter=c.resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, 1)
                if c.encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(caux, cout, 3, down=True,
                                                                   resample_filter=c.resample_filter,
                                                                   fused_resample=True)
                    caux = cout
            for idx in range(c.num_blocks):
                cin, cout = cout, c.model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in c.attn_resolutions,
                                                                **block_kwargs)
        skips = [block.out_channels for name, block in self.enc.items() if "aux" not in name]

        # Decoder.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            res = c.img_resolution >> level
            if level == len(c.channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(c.num_blocks + 1):
                cin, cout = cout + skips.pop(), c.model_channels * mult
                attn = idx == c.num_blocks and res in c.attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block_kwargs)
            if c.decoder_type == "skip" or level == 0:
                if c.decoder_type == "skip" and level < len(c.channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(c.out_channels, c.out_channels, 0, up=True,
                                                             resample_filter=c.resample_filter)
                # aux_norm is always followed by SiLU: one fused op
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(_groups(cout), cout, eps=1e-6, activation="silu")
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, c.out_channels, 3)

    def forward(self, x, timestep, class_labels=None, encoder_hidden_states=None, augment_labels=None):
        self._check_cond(encoder_hidden_states)
        # Mapping.
        emb = self.map_noise(self._noise_labels(timestep, x))  # (B, Cn) [cos, sin]
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(emb.shape)  # (B, Cn) [sin, cos]
        emb = emb.to(self.map_layer0.weight.dtype)
        labels = self._class_vectors(class_labels, x)  # (B, L) | None
        if labels is not None:
            emb = emb + self.map_label(labels * math.sqrt(self.config.label_dim))  # (B, Cn)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))  # (B, Cn)
        emb = F.silu(self.map_layer0(emb))  # (B, E)
        emb = F.silu(self.map_layer1(emb))  # (B, E)

        # Encoder.
        skips = []
        aux = x  # (B, Cin, H, W)
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)  # (B, Cin, H/2, W/2)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)  # (B, C, h, w)
                skips.append(x)

        # Decoder.
        aux = tmp = None
        for name, block in self.dec.items():
            if "aux_up" in name:
                aux = block(aux)  # (B, Cout, 2h, 2w)
            elif "aux_norm" in name:
                tmp = block(x)  # silu(norm(x))
            elif "aux_conv" in name:
                tmp = block(tmp)  # (B, Cout, h, w)
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)  # (B, C + Cskip, h, w)
                x = block(x, emb)  # (B, C', h', w')
        return aux  # (B, Cout, H, W)


class DhariwalUNet(EDMUNet):
    """ADM: positional noise embedding [cos, sin] (no endpoint), map_label (no bias) added after
    map_layer1 then SiLU, adaptive-scale blocks, 64 channels per attention head, GroupNorm eps 1e-5."""

    def __init__(self, config: EDMUNetConfig):
        super().__init__()
        c = self._setup(config)
        emb_channels = c.model_channels * c.channel_mult_emb
        block_kwargs = dict(emb_channels=emb_channels, channels_per_head=64)

        # Mapping.
        self.map_noise = PositionalEmbedding(c.model_channels)
        self.map_augment = nn.Linear(c.augment_dim, c.model_channels, bias=False) if c.augment_dim else None
        self.map_layer0 = nn.Linear(c.model_channels, emb_channels)
        self.map_layer1 = nn.Linear(emb_channels, emb_channels)
        self.map_label = nn.Linear(c.label_dim, emb_channels, bias=False) if c.label_dim else None

        # Encoder.
        self.enc = nn.ModuleDict()
        cout = c.in_channels
        for level, mult in enumerate(c.channel_mult):
            res = c.img_resolution >> level
            if level == 0:
                cin, cout = cout, c.model_channels * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
            for idx in range(c.num_blocks):
                cin, cout = cout, c.model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in c.attn_resolutions,
                                                                **block_kwargs)
        skips = [block.out_channels for block in self.enc.values()]

        # Decoder.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            res = c.img_resolution >> level
            if level == len(c.channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(c.num_blocks + 1):
                cin, cout = cout + skips.pop(), c.model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in c.attn_resolutions,
                                                                **block_kwargs)
        self.out_norm = GroupNorm(_groups(cout), cout, eps=1e-5, activation="silu")  # always followed by SiLU
        self.out_conv = Conv2d(cout, c.out_channels, 3)

    def forward(self, x, timestep, class_labels=None, encoder_hidden_states=None, augment_labels=None):
        self._check_cond(encoder_hidden_states)
        # Mapping.
        emb = self.map_noise(self._noise_labels(timestep, x)).to(self.map_layer0.weight.dtype)  # (B, C)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))  # (B, C)
        emb = F.silu(self.map_layer0(emb))  # (B, E)
        emb = self.map_layer1(emb)  # (B, E)
        labels = self._class_vectors(class_labels, x)  # (B, L) | None
        if labels is not None:
            emb = emb + self.map_label(labels)  # (B, E)
        emb = F.silu(emb)  # (B, E)

        # Encoder.
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)  # (B, C, h, w)
            skips.append(x)

        # Decoder.
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)  # (B, C + Cskip, h, w)
            x = block(x, emb)  # (B, C', h', w')
        return self.out_conv(self.out_norm(x))  # (B, Cout, H, W)
