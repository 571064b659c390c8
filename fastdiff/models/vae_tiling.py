"""Tiled VAE decoding and encoding, as diffusers' ``AutoencoderKL.enable_tiling()`` runs them.

A 1024 x 1024 SDXL image decoded whole holds activations of (B, 128..512, 1024, 1024): gigabytes. Tiled, the decoder
sees overlapping latent tiles of ``tile_latent`` pixels (the VAE config's ``sample_size`` / 8: 64 for SD 1.x's
512, 128 for SDXL's 1024), every ``tile_latent * (1 - overlap)`` pixels; each decoded tile is blended linearly
into the tiles above and to its left over ``tile_sample * overlap`` pixels and cropped, so memory stays that of
one tile whatever the image's size. Encoding tiles the image the same way, in pixels.

The result differs from whole-image decoding near the seams (each tile's GroupNorm sees its own statistics); it
equals diffusers' tiled result, whose order of blends this keeps: a tile is blended into after it was blended
itself (the tile above it, and the one to its left, as already blended), in place.
"""

from __future__ import annotations

from typing import Callable

import torch


def _blend(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """``b``'s first ``extent`` rows (dim 2) or columns (dim 3) faded in from ``a``'s last, in place (diffusers'
    blend_v / blend_h: weight y / extent on ``b`` for the y-th)."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    if extent <= 0:
        return b
    # the weights as diffusers' Python floats reach a kernel: in float32
    shape = [1, 1, 1, 1]
    shape[dim] = extent
    keep = torch.tensor([y / extent for y in range(extent)], dtype=torch.float32, device=b.device).reshape(shape)
    fade = torch.tensor([1 - y / extent for y in range(extent)], dtype=torch.float32, device=b.device).reshape(shape)
    head = b.narrow(dim, 0, extent)
    # each product rounded to the tile's precision before the sum, as diffusers' half-precision arithmetic rounds
    head.copy_((a.narrow(dim, a.shape[dim] - extent, extent) * fade).to(b.dtype) + (head * keep).to(b.dtype))
    return b


def tiled(x: torch.Tensor, run: Callable[[torch.Tensor], torch.Tensor], tile_in: int, tile_out: int,
          overlap: float) -> torch.Tensor:
    """``run`` over overlapping ``tile_in`` x ``tile_in`` tiles of ``x`` (B, C, H, W), each giving a tile of up to
    ``tile_out`` pixels, blended and stitched: ``tile_out / tile_in`` is the VAE's scale (8, or 1/8 encoding)."""
    stride = int(tile_in * (1 - overlap))
    extent = int(tile_out * overlap)
    keep = tile_out - extent
    rows = [[run(x[:, :, i:i + tile_in, j:j + tile_in]) for j in range(0, x.shape[3], stride)]
            for i in range(0, x.shape[2], stride)]
    out_rows = []
    for i, row in enumerate(rows):
        kept = []
        for j, tile in enumerate(row):
            if i > 0:
                tile = _blend(rows[i - 1][j], tile, extent, dim=2)
            if j > 0:
                tile = _blend(row[j - 1], tile, extent, dim=3)
            kept.append(tile[:, :, :keep, :keep])
        out_rows.append(torch.cat(kept, dim=3))
    return torch.cat(out_rows, dim=2)


class VAETiling:
    """``enable_tiling`` / ``enable_slicing`` for ``VAEDecoder``, with diffusers' AutoencoderKL names and defaults:
    ``tile_sample_min_size`` (the config's ``sample_size``), ``tile_latent_min_size`` (that / the VAE's scale) and
    ``tile_overlap_factor`` (0.25). Slicing runs a batch one sample at a time (the same result, less memory)."""

    use_tiling = False
    use_slicing = False
    tile_overlap_factor = 0.25

    @property
    def tile_sample_min_size(self) -> int:
        return getattr(self, "_tile_sample", None) or self.config.sample_size

    @tile_sample_min_size.setter
    def tile_sample_min_size(self, value: int) -> None:
        self._tile_sample = int(value)

    @property
    def tile_latent_min_size(self) -> int:
        return getattr(self, "_tile_latent", None) or int(self.tile_sample_min_size / self.downscale)

    @tile_latent_min_size.setter
    def tile_latent_min_size(self, value: int) -> None:  # (diffusers' attributes are set one by one)
        self._tile_latent = int(value)

    def enable_tiling(self, use_tiling: bool = True) -> None:
        self.use_tiling = use_tiling

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def enable_slicing(self) -> None:
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def _sliced(self, x: torch.Tensor, run: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if self.use_slicing and x.shape[0] > 1:
            return torch.cat([run(part) for part in x.split(1)])
        return run(x)

    def _decode_unscaled(self, z: torch.Tensor) -> torch.Tensor:
        """post_quant_conv + decoder, tiled where tiling is on and the latents exceed one tile."""
        t = self.tile_latent_min_size
        if self.use_tiling and (z.shape[-1] > t or z.shape[-2] > t):
            return tiled(z, self.forward, t, self.tile_sample_min_size, self.tile_overlap_factor)
        return self.forward(z)

    def _moments(self, x: torch.Tensor) -> torch.Tensor:
        """encoder + quant_conv: the posterior's (mean, logvar) stacked on channels, tiled likewise."""
        def run(part):
            moments = self.encoder(part)
            return moments if self.quant_conv is None else self.quant_conv(moments)

        s = self.tile_sample_min_size
        if self.use_tiling and (x.shape[-1] > s or x.shape[-2] > s):
            return tiled(x, run, s, self.tile_latent_min_size, self.tile_overlap_factor)
        return run(x)


__all__ = ["VAETiling", "tiled"]
