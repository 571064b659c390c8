"""DPM++ SDE's Brownian increments: their joint law (what torchsde's tree gives), the intermediate point, bad options.
Against k-diffusion's own ``sample_dpmpp_2s_ancestral`` / ``sample_dpmpp_sde``: ``test_k_diffusion_parity.py``."""

import math

import pytest
import torch

from fastdiff.dpmpp_singlestep import joined_increment, sample_dpmpp_sde
from fastdiff.errors import BadArgumentError
from helpers import smooth_denoiser as denoiser

SIGMAS = [14.6, 7.0, 3.1, 1.4, 0.6, 0.25, 0.09, 0.029, 0.0]


def test_joined_increment_has_the_brownian_law():
    """Unit variance, and the correlation with the first part that Brownian motion gives:
    sqrt((sigma - sigma_mid) / (sigma - sigma_next))."""
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(2, 400_000, generator=g, dtype=torch.float64)
    n2 = joined_increment(z1, z2, 7.0, 4.0, 3.0)
    assert float(n2.var()) == pytest.approx(1.0, abs=0.01)
    assert float((z1 * n2).mean()) == pytest.approx(math.sqrt(3.0 / 4.0), abs=0.01)


@pytest.mark.parametrize("r", [1.0, 1e-17])
def test_extreme_r_stays_inside_the_step(r):
    """exp((1 - r) log s + r log s') can round just outside [s', s] (r = 1, tiny r): a math domain error."""
    torch.manual_seed(0)
    x = torch.randn(1, 1, 2, 2, dtype=torch.float64) * 14.6
    assert torch.isfinite(sample_dpmpp_sde(denoiser, x, [14.6, 7.0, 3.1, 0.0], r=r)).all()


@pytest.mark.parametrize("r", [0.0, 1.5])
def test_bad_r(r):
    with pytest.raises(BadArgumentError, match="r: expected"):
        sample_dpmpp_sde(denoiser, torch.ones(1, 1, 2, 2), SIGMAS, r=r)
