"""FreeU (Si et al. 2023), as diffusers' ``UNet2DConditionModel.enable_freeu`` applies it: in the first two up blocks,
before each skip is joined, the backbone's first half of channels is scaled by b1 / b2 and the skip's lowest spatial
frequencies (the centre 2 x 2 of its shifted spectrum) by s1 / s2. A training-free change of the network's output
(no weights change); diffusers' recommended values per model are in the FreeU repository (SD 1.5: s1=0.9, s2=0.2,
b1=1.5, b2=1.6).
"""

from __future__ import annotations

from typing import Optional

import torch


def fourier_filter(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` (B, C, H, W) with the centre 2 x 2 of its shifted 2-d spectrum times ``scale``; computed in float32, as
    diffusers' ``fourier_filter`` computes it (threshold 1), and returned in ``x``'s dtype."""
    freq = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    h, w = freq.shape[-2:]
    mask = torch.ones(freq.shape, device=x.device)
    mask[..., h // 2 - 1: h // 2 + 1, w // 2 - 1: w // 2 + 1] = scale  # (diffusers' slice, edge cases included)
    out = torch.fft.ifftn(torch.fft.ifftshift(freq * mask, dim=(-2, -1)), dim=(-2, -1)).real
    return out.to(x.dtype)


def freeu_join(h: torch.Tensor, skip: torch.Tensor, factors: Optional[tuple]) -> tuple:
    """(backbone, skip) of an up block before they are joined: unchanged with no ``factors``, else (b, s) applied."""
    if factors is None:
        return h, skip
    b, s = factors
    half = h.shape[1] // 2
    return torch.cat([h[:, :half] * b, h[:, half:]], dim=1), fourier_filter(skip, s)


def set_freeu(model, s1: float = 0.0, s2: float = 0.0, b1: float = 0.0, b2: float = 0.0) -> None:
    """Give the first two up blocks of ``model`` (a text UNet) their FreeU factors ((b1, s1), (b2, s2)); all four
    non-zero to enable, as diffusers reads them (any zero: off)."""
    on = all((s1, s2, b1, b2))
    for i, block in enumerate(model.up_blocks):
        block.freeu = ((b1, s1) if i == 0 else (b2, s2) if i == 1 else None) if on else None


__all__ = ["fourier_filter", "freeu_join", "set_freeu"]
