"""Shared test helpers (importable as ``tests.helpers`` or ``helpers``)."""

from __future__ import annotations

import torch


def perturb_(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Overwrite every parameter with random values (norm weights around 1) so no layer is trivial.

    Random-init diffusers models zero some output layers; testing on those would hide whole paths.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            is_norm_weight = name.endswith("weight") and p.dim() == 1 and "norm" in name
            p.copy_(1.0 + noise if is_norm_weight else noise)
    return module


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max|a - ref| / max|ref|."""
    return ((a.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def smooth_denoiser(x: torch.Tensor, sigma: torch.Tensor, **_) -> torch.Tensor:
    """A smooth stand-in network D(x; sigma) for sampler tests: neither linear nor the identity."""
    s = sigma.reshape(-1, *[1] * (x.ndim - 1))
    return torch.tanh(x / (1 + s ** 2).sqrt()) * 0.9 + 0.05 * torch.sin(3 * x)


def denoise_at(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """``smooth_denoiser`` at one host sigma, in x's dtype (what transcriptions of reference loops call)."""
    return smooth_denoiser(x, torch.full((x.shape[0],), sigma, dtype=x.dtype))


def sampler_test_options(name: str, alphas_cumprod, sigmas) -> dict:
    """What sampler ``name`` needs beyond the common arguments in the generic sampler tests: TCD lands on
    training timesteps, so it takes the model's sigma table and the grid's timesteps."""
    if name != "tcd":
        return {}
    from fastdiff.schedules import sigma_to_timestep, sigmas_from_alphas_cumprod

    grid = [float(s) for s in sigmas]
    return dict(sigma_table=sigmas_from_alphas_cumprod(alphas_cumprod).tolist(),
                timesteps=sigma_to_timestep(grid[:-1], alphas_cumprod).tolist() + [0.0])
