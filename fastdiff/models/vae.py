"""The latent models' image decoder: the decoder half of diffusers' ``AutoencoderKL`` (Stable Diffusion 1 / 2 / XL,
SD3, Flux, and the sd-vae-ft-* VAEs DiT samples with).

Parameter names are diffusers' (``decoder.up_blocks.1.resnets.0.conv1``, ``post_quant_conv``), so the ``vae/``
folder of a pipeline loads with no renaming. The encoder half (``fastdiff.models.vae_encoder``) is kept when the
weights carry it: ``encode(images)`` is img2img's first step. Its blocks are the
UNet's (``ResnetBlock`` without a time embedding, the pixel ``SpatialSelfAttention``, ``Upsample``), so GroupNorm
and attention take the fused kernels too.

``decode(latents)`` undoes the sampler's latent scaling (``latents / scaling_factor + shift_factor``) and returns
images in [-1, 1], as ``AutoencoderKL.decode`` does after the pipelines' scaling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from ..errors import BadArgumentError, UnsupportedConfigError
from ..utils.strict_dict import check_field_types, diffusers_fields, known_fields, plain_dict
from .layers import GroupNorm
from .unet import ResnetBlock, Upsample
from .vae_encoder import VAE_EPS, Encoder, split_moments, vae_mid_block
from .vae_tiling import VAETiling


@dataclass
class VAEConfig:
    """diffusers' ``AutoencoderKL`` config (its constructor's defaults); the encoder fields are kept for round trips."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple = ("DownEncoderBlock2D",)
    up_block_types: tuple = ("UpDecoderBlock2D",)
    block_out_channels: tuple = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215
    shift_factor: Optional[float] = None
    latents_mean: Optional[tuple] = None
    latents_std: Optional[tuple] = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("down_block_types", "up_block_types", "block_out_channels"):
            if isinstance(getattr(self, name), list):
                setattr(self, name, tuple(getattr(self, name)))
        check_field_types(self, "AutoencoderKL")

        def bad(name, why):
            raise UnsupportedConfigError(name, getattr(self, name), supported=why, model="AutoencoderKL")

        for name in ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups"):
            if getattr(self, name) < 1:
                bad(name, "a positive int")
        if not self.block_out_channels or any(c < 1 for c in self.block_out_channels):
            bad("block_out_channels", "one or more positive ints")
        if any(t != "UpDecoderBlock2D" for t in self.up_block_types):
            bad("up_block_types", "UpDecoderBlock2D blocks")
        if len(self.up_block_types) != len(self.block_out_channels):
            bad("up_block_types", f"{len(self.block_out_channels)} entries (one per block_out_channels)")
        if self.act_fn not in ("silu", "swish"):
            bad("act_fn", ["silu"])
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            bad("norm_num_groups", "a divisor of every block_out_channels entry")
        for name in ("latents_mean", "latents_std"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, list):
                    value = tuple(value)
                    setattr(self, name, value)
                if not isinstance(value, tuple) or len(value) != self.latent_channels or not all(
                        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
                    bad(name, f"None or {self.latent_channels} finite numbers (one per latent channel)")
        if self.latents_std is not None and not all(self.latents_std):
            bad("latents_std", "non-zero numbers")
        if not self.scaling_factor:
            bad("scaling_factor", "a non-zero number")

    def to_dict(self) -> dict:
        return plain_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        return cls(**known_fields(cls, d, model="AutoencoderKL", skip_private=False))

    @classmethod
    def from_diffusers(cls, d: dict) -> "VAEConfig":
        if d.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise UnsupportedConfigError("_class_name", d.get("_class_name"), supported=["AutoencoderKL"], model="VAE")
        return cls(**diffusers_fields(cls, d, "AutoencoderKL"))


class UpDecoderBlock(nn.Module):
    """``layers_per_block + 1`` resnets, then (except the last block) nearest x2 + conv."""

    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(in_ch if i == 0 else out_ch, out_ch, None, groups, VAE_EPS)
                                      for i in range(layers)])
        self.upsamplers = nn.ModuleList([Upsample(out_ch)]) if upsample else None

    def forward(self, h):
        for resnet in self.resnets:
            h = resnet(h, None)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h)
        return h


class Decoder(nn.Module):
    """latent (B, z, h, w) -> image (B, out, h * 2^(n-1), w * 2^(n-1))."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        ch = list(c.block_out_channels)
        groups = c.norm_num_groups
        self.conv_in = nn.Conv2d(c.latent_channels, ch[-1], 3, padding=1)
        self.mid_block = vae_mid_block(ch[-1], groups, c.mid_block_add_attention)
        rev = ch[::-1]
        self.up_blocks = nn.ModuleList([
            UpDecoderBlock(rev[max(i - 1, 0)], rev[i], c.layers_per_block + 1, groups, upsample=i < len(rev) - 1)
            for i in range(len(rev))])
        self.conv_norm_out = GroupNorm(groups, ch[0], VAE_EPS, activation="silu")
        self.conv_out = nn.Conv2d(ch[0], c.out_channels, 3, padding=1)

    def forward(self, z):
        h = self.mid_block(self.conv_in(z), None)  # (B, C_last, h, w)
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(self.conv_norm_out(h))  # (B, out, H, W)


class VAEDecoder(VAETiling, nn.Module):
    """``post_quant_conv`` + ``decoder``: what turns a sampler's latents into images; and, when the weights carry
    it (``with_encoder``), diffusers' ``encoder`` + ``quant_conv``: what turns images into latents (img2img).
    ``enable_tiling()`` / ``enable_slicing()`` as diffusers' AutoencoderKL (``fastdiff.models.vae_tiling``)."""

    def __init__(self, config: VAEConfig, with_encoder: bool = False):
        super().__init__()
        self.config = c = config
        self.post_quant_conv = nn.Conv2d(c.latent_channels, c.latent_channels, 1) if c.use_post_quant_conv else None
        self.decoder = Decoder(c)
        self.encoder = self.quant_conv = None
        if with_encoder:
            if any(t != "DownEncoderBlock2D" for t in c.down_block_types) or \
                    len(c.down_block_types) != len(c.block_out_channels):
                raise UnsupportedConfigError("down_block_types", c.down_block_types, model="AutoencoderKL encoder",
                                             supported=f"{len(c.block_out_channels)} DownEncoderBlock2D blocks")
            self.encoder = Encoder(c)
            self.quant_conv = nn.Conv2d(2 * c.latent_channels, 2 * c.latent_channels, 1) if c.use_quant_conv else None

    @property
    def downscale(self) -> int:
        """Image pixels per latent pixel (8 for every Stable Diffusion / Flux VAE)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    def forward(self, z):
        """Unscaled latents (B, z, h, w) -> images in about [-1, 1] (AutoencoderKL._decode)."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def _statistics(self, like: torch.Tensor):
        """SDXL's per-channel (mean, std) as (1, z, 1, 1) tensors, or None: diffusers' SDXL pipelines read them when
        the config has both (Playground v2.5's VAE), in place of shift_factor."""
        c = self.config
        if c.latents_mean is None or c.latents_std is None:
            return None
        return tuple(torch.tensor(v, dtype=torch.float32, device=like.device).view(1, -1, 1, 1)
                     for v in (c.latents_mean, c.latents_std))

    def unscale(self, latents: torch.Tensor) -> torch.Tensor:
        """A sampler's float32 latents -> the decoder's input: ``latents / scaling_factor + shift_factor``, or with
        per-channel statistics ``latents * std / scaling_factor + mean`` (diffusers' pipelines)."""
        c = self.config
        stats = self._statistics(latents)
        if stats is not None:
            return latents * stats[1] / c.scaling_factor + stats[0]
        return latents / c.scaling_factor + (c.shift_factor or 0.0)

    def scale(self, z: torch.Tensor) -> torch.Tensor:
        """The encoder's float32 latents -> the sampler's: ``unscale`` undone."""
        c = self.config
        stats = self._statistics(z)
        if stats is not None:
            return (z - stats[0]) * c.scaling_factor / stats[1]
        return (z - (c.shift_factor or 0.0)) * c.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """A sampler's latents -> float32 images in [-1, 1] (the pipelines' latent scaling undone: ``unscale``,
        then the decoder in the VAE's own dtype)."""
        c = self.config
        if not torch.is_tensor(latents) or latents.dim() != 4 or latents.shape[1] != c.latent_channels or \
                0 in latents.shape:
            found = tuple(latents.shape) if torch.is_tensor(latents) else type(latents).__name__
            raise BadArgumentError(f"latents: expected a (B, {c.latent_channels}, h, w) tensor for this VAE, "
                                   f"found {found}")
        if not latents.is_floating_point() or not bool(torch.isfinite(latents).all()):
            raise BadArgumentError("latents: expected finite float values, found " + (
                str(latents.dtype) if not latents.is_floating_point() else
                "NaN or inf (a sampler that diverged, or a half-precision overflow); the images would be black"))
        p = next(self.parameters())
        z = self.unscale(latents.to(p.device, torch.float32))
        return self._sliced(z.to(p.dtype), self._decode_unscaled).float().clamp(-1, 1)

    def encode(self, images: torch.Tensor, noise=None) -> torch.Tensor:
        """Images (B, in, H, W) in [-1, 1] -> float32 latents in the sampler's scaling (the pipelines'
        ``(z - shift_factor) * scaling_factor``), z drawn from the posterior with ``noise`` (a ``NoiseSource``: one
        draw per sample from its own generator, as diffusers' ``latent_dist.sample(generator)``), or its mean
        when ``noise`` is None (diffusers' ``sample_mode="argmax"``). H and W: multiples of ``downscale``."""
        c = self.config
        if self.encoder is None:
            raise BadArgumentError("encode(): this VAE has no encoder (its weights carry only the decoder); load a "
                                   "VAE whose weights hold encoder.* (a diffusers AutoencoderKL folder does)")
        f = self.downscale
        if images.dim() != 4 or images.shape[1] != c.in_channels or images.shape[2] % f or images.shape[3] % f:
            raise BadArgumentError(f"images: expected (B, {c.in_channels}, H, W) with H and W multiples of {f} for "
                                   f"this VAE, found {tuple(images.shape)}")
        p = next(self.parameters())
        moments = self._sliced(images.to(p.device, p.dtype), self._moments)  # (B, 2z, H / f, W / f)
        mean, logvar = split_moments(moments.float())  # (B, z, H / f, W / f) each
        z = mean if noise is None else mean + torch.exp(0.5 * logvar) * noise.randn(mean.shape[1:]).to(mean.device)
        return self.scale(z)


__all__ = ["VAEConfig", "VAEDecoder", "Decoder"]
