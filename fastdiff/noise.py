"""Per-sample noise: sample i depends on seed i only, never on what else is in the batch.

EDM's ``StackedRandomGenerator`` idea: one ``torch.Generator`` per sample, and every draw is made per
sample and stacked. The initial latents and every noise draw of a stochastic sampler come from the same
per-sample stream, so a batch of 4 with seeds [a, b, c, d] equals four single runs with seeds a, b, c, d.

The draws are made exactly as diffusers' ``randn_tensor`` does with a list of generators
(``torch.randn((1, *shape[1:]), generator=g_i)``), so ``NoiseSource(seeds).randn(shape)`` equals
diffusers' initial latents for ``generator=[torch.Generator(device).manual_seed(s) for s in seeds]``.

Usage::

    src = NoiseSource([1, 2, 3, 4], device="cuda")
    x = src.randn((4, 64, 64)) * plan.init_noise_sigma     # initial latents, per-sample shape
    x = sample_euler_ancestral(denoiser, x, sigmas, noise=src)
"""

from __future__ import annotations

import numbers

from typing import Iterable, Sequence, Union

import torch

from .errors import BadArgumentError


class NoiseSource:
    """A stack of per-sample generators; also the ``noise(step_index, like)`` callable samplers take.

    Draws are sequential per generator (the order of calls matters, the batch does not). ``step_index``
    is accepted for the sampler protocol; this source does not need it.
    """

    def __init__(self, seeds: Union[int, Sequence[int]], device: Union[str, torch.device] = "cpu"):
        seeds = [seeds] if isinstance(seeds, numbers.Integral) else list(seeds)
        if not seeds or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and 0 <= s < 2**64
                                for s in seeds):
            raise BadArgumentError(f"seeds: expected an int in [0, 2**64) or a non-empty list of them, found {seeds!r}")
        seeds = [int(s) for s in seeds]
        self.seeds = seeds
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(s) for s in seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def subset(self, start: int, stop: int) -> "NoiseSource":
        """Samples [start, stop) as their own source, sharing (and advancing) the same generators."""
        sub = object.__new__(NoiseSource)
        sub.seeds, sub.device, sub.generators = self.seeds[start:stop], self.device, self.generators[start:stop]
        return sub

    def randn(self, shape: Iterable[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(len(seeds), *shape) standard normal; ``shape`` is the shape of ONE sample."""
        shape = tuple(shape)
        return torch.cat([torch.randn((1,) + shape, generator=g, device=self.device, dtype=dtype)
                          for g in self.generators])

    def __call__(self, step_index: int, like: torch.Tensor) -> torch.Tensor:
        if like.shape[0] != len(self):
            raise BadArgumentError(f"noise: expected a batch of {len(self)} (one per seed), found {like.shape[0]}")
        return self.randn(like.shape[1:], dtype=like.dtype).to(like.device)


def randn(seeds: Union[int, Sequence[int]], shape: Iterable[int], device="cpu") -> torch.Tensor:
    """Initial latents for the given seeds (a fresh ``NoiseSource``): shape (len(seeds), *shape)."""
    return NoiseSource(seeds, device).randn(shape)
