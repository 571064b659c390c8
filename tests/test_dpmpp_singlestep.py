"""DPM++ 2S a (``dpmpp_2s_ancestral``) and DPM++ SDE (``dpmpp_sde``) against float64 transcriptions of
k-diffusion's ``sample_dpmpp_2s_ancestral`` / ``sample_dpmpp_sde`` (the latter's noise sampler fed the same
Brownian increments); and those increments' joint law (what torchsde's tree gives)."""

import math

import pytest
import torch

from fastdiff.dpmpp_singlestep import joined_increment, sample_dpmpp_2s_ancestral, sample_dpmpp_sde
from fastdiff.errors import BadArgumentError
from helpers import denoise_at as D, smooth_denoiser as denoiser

SIGMAS = [14.6, 7.0, 3.1, 1.4, 0.6, 0.25, 0.09, 0.029, 0.0]


def ancestral(s, s_next, eta):
    up = min(s_next, eta * math.sqrt(s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2))
    return math.sqrt(s_next ** 2 - up ** 2), up


def k_dpmpp_sde(x, eta, r, noise_sampler):
    """k-diffusion's loop in sigma form: t = -log sigma, s = t + r h."""
    for i in range(len(SIGMAS) - 1):
        s, s_next = SIGMAS[i], SIGMAS[i + 1]
        den = D(x, s)
        if s_next == 0:
            x = x + (x - den) / s * (s_next - s)
            continue
        t, t_next = -math.log(s), -math.log(s_next)
        s_mid = math.exp(-(t + (t_next - t) * r))
        sd, su = ancestral(s, s_mid, eta)
        x_2 = (sd / s) * x - math.expm1(t + math.log(sd)) * den
        x_2 = x_2 + noise_sampler(s, s_mid) * su
        den_2 = D(x_2, s_mid)
        sd, su = ancestral(s, s_next, eta)
        fac = 1 / (2 * r)
        den_d = (1 - fac) * den + fac * den_2
        x = (sd / s) * x - math.expm1(t + math.log(sd)) * den_d
        x = x + noise_sampler(s, s_next) * su
    return x


@pytest.mark.parametrize("eta,r", [(1.0, 0.5), (0.5, 0.5), (0.0, 0.5), (1.0, 0.3)])
def test_dpmpp_sde_equals_k_diffusion(eta, r):
    torch.manual_seed(4)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64) * SIGMAS[0]
    draws = [torch.randn(2, 3, 4, 4, dtype=torch.float64) for _ in range(2 * len(SIGMAS))]
    it = iter(draws)
    got = sample_dpmpp_sde(denoiser, x.clone(), SIGMAS, eta=eta, r=r, noise=lambda i, like: next(it))
    it2, pending = iter(draws), {}

    def brownian(a, b):  # the first call of a step opens [b, a]; the second extends it to the step's end
        if not pending:
            pending.update(z1=next(it2), z2=next(it2), mid=b)
            return pending["z1"]
        z1, z2, mid = pending.pop("z1"), pending.pop("z2"), pending.pop("mid")
        return (math.sqrt(a - mid) * z1 + math.sqrt(mid - b) * z2) / math.sqrt(a - b)

    want = k_dpmpp_sde(x.clone(), eta, r, brownian if eta > 0 else (lambda a, b: torch.zeros_like(x)))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("eta", [1.0, 0.5, 0.0])
def test_dpmpp_2s_ancestral_equals_k_diffusion(eta):
    torch.manual_seed(6)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64) * SIGMAS[0]
    draws = [torch.randn(2, 3, 4, 4, dtype=torch.float64) for _ in SIGMAS]
    got = sample_dpmpp_2s_ancestral(denoiser, x.clone(), SIGMAS, eta=eta, noise=lambda i, like: draws[i])
    want = x.clone()
    for i in range(len(SIGMAS) - 1):
        s, s_next = SIGMAS[i], SIGMAS[i + 1]
        den = D(want, s)
        sd, su = ancestral(s, s_next, eta)
        if sd == 0:
            want = want + (want - den) / s * (sd - s)
        else:  # t = -log sigma, h = t_next - t, s = t + h / 2
            t, t_next = -math.log(s), -math.log(sd)
            h = t_next - t
            s_mid = math.exp(-(t + h / 2))
            x_2 = (s_mid / s) * want - math.expm1(-h / 2) * den
            want = (sd / s) * want - math.expm1(-h) * D(x_2, s_mid)
        if s_next > 0:
            want = want + draws[i] * su
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


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
