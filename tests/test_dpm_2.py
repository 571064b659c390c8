"""DPM-Solver-2 (``dpm_2``) and its ancestral form against float64 transcriptions of k-diffusion's
``sample_dpm_2`` / ``sample_dpm_2_ancestral`` (crowsonkb/k-diffusion, sampling.py), fed the same noise.
diffusers' KDPM2 schedulers: ``test_scheduler_parity.py``."""

import math

import pytest
import torch

from fastdiff.errors import BadArgumentError
from fastdiff.samplers import sample_dpm_2, sample_dpm_2_ancestral
from helpers import denoise_at as D, smooth_denoiser as denoiser

SIGMAS = [14.6, 7.0, 3.1, 1.4, 0.6, 0.25, 0.09, 0.029, 0.0]


def setup():
    torch.manual_seed(2)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64) * SIGMAS[0]
    return x, [torch.randn(2, 3, 4, 4, dtype=torch.float64) for _ in SIGMAS]


def k_dpm_2(x, churn, draws):
    n = len(SIGMAS) - 1
    for i in range(n):
        gamma = min(churn["s_churn"] / n, 2 ** 0.5 - 1) if churn["s_tmin"] <= SIGMAS[i] <= churn["s_tmax"] else 0.0
        s_hat = SIGMAS[i] * (gamma + 1)
        if gamma > 0:
            x = x + draws[i] * churn["s_noise"] * math.sqrt(s_hat ** 2 - SIGMAS[i] ** 2)
        d = (x - D(x, s_hat)) / s_hat
        if SIGMAS[i + 1] == 0:
            x = x + d * (SIGMAS[i + 1] - s_hat)
        else:
            s_mid = math.exp((math.log(s_hat) + math.log(SIGMAS[i + 1])) / 2)
            x_2 = x + d * (s_mid - s_hat)
            d_2 = (x_2 - D(x_2, s_mid)) / s_mid
            x = x + d_2 * (SIGMAS[i + 1] - s_hat)
    return x


def k_dpm_2_ancestral(x, eta, draws):
    for i in range(len(SIGMAS) - 1):
        s, s_next = SIGMAS[i], SIGMAS[i + 1]
        up = min(s_next, eta * math.sqrt(s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2))
        down = math.sqrt(s_next ** 2 - up ** 2)
        d = (x - D(x, s)) / s
        if down == 0:
            x = x + d * (down - s)
        else:
            s_mid = math.exp((math.log(s) + math.log(down)) / 2)
            x_2 = x + d * (s_mid - s)
            d_2 = (x_2 - D(x_2, s_mid)) / s_mid
            x = x + d_2 * (down - s)
            x = x + draws[i] * up
    return x


@pytest.mark.parametrize("churn", [dict(s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0),
                                   dict(s_churn=5.0, s_tmin=0.1, s_tmax=5.0, s_noise=1.003)])
def test_dpm_2_equals_k_diffusion(churn):
    x, draws = setup()
    got = sample_dpm_2(denoiser, x.clone(), SIGMAS, noise=lambda i, like: draws[i], **churn)
    torch.testing.assert_close(got, k_dpm_2(x.clone(), churn, draws), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_dpm_2_ancestral_equals_k_diffusion(eta):
    x, draws = setup()
    got = sample_dpm_2_ancestral(denoiser, x.clone(), SIGMAS, eta=eta, noise=lambda i, like: draws[i])
    torch.testing.assert_close(got, k_dpm_2_ancestral(x.clone(), eta, draws), rtol=1e-12, atol=1e-12)


def test_explicit_midpoints_are_used():
    """A plan's midpoints replace the geometric means (diffusers' KDPM2 plans pass theirs)."""
    x, _ = setup()
    seen = []

    def recording(x, sigma, **_):
        seen.append(float(sigma[0]))
        return denoiser(x, sigma)

    mids = [math.sqrt(a * b) * 1.01 for a, b in zip(SIGMAS[:-2], SIGMAS[1:-1])] + [0.0]
    sample_dpm_2(recording, x, SIGMAS, sigmas_mid=mids)
    assert seen[1::2][:len(mids) - 1] == pytest.approx(mids[:-1], rel=1e-15)
    with pytest.raises(BadArgumentError, match="sigmas_mid"):
        sample_dpm_2(denoiser, x, SIGMAS, sigmas_mid=mids[:3])


def test_bad_midpoint_refused():
    x, _ = setup()
    mids = [0.0] * (len(SIGMAS) - 1)
    with pytest.raises(BadArgumentError, match="sigmas_mid: expected a midpoint"):
        sample_dpm_2(denoiser, x, SIGMAS, sigmas_mid=mids)


def test_plan_midpoints_hold_for_eta_1_only():
    """A KDPM2Ancestral plan's midpoints are the next grid sigmas (eta = 1); with eta overridden the sampler
    takes the geometric means of its own sigma_down, as the named sampler does (it kept the eta=1 points)."""
    from fastdiff.noise import NoiseSource
    from fastdiff.scheduler_config import plan_from_scheduler_config

    plan = plan_from_scheduler_config({"use_karras_sigmas": True}, 6, class_name="KDPM2AncestralDiscreteScheduler")
    x = NoiseSource([1]).randn((1, 4, 4), dtype=torch.float64) * float(plan.sigmas[0])
    for eta in (0.5, 0.0):
        got = sample_dpm_2_ancestral(denoiser, x.clone(), plan.sigmas, eta=eta, noise=NoiseSource([2]),
                                     sigmas_mid=plan.options["sigmas_mid"])
        want = sample_dpm_2_ancestral(denoiser, x.clone(), plan.sigmas, eta=eta, noise=NoiseSource([2]))
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_rising_ancestral_step_is_refused():
    with pytest.raises(BadArgumentError, match="ancestral step needs"):
        sample_dpm_2_ancestral(denoiser, torch.ones(1, 1, 2, 2), [1.0, 2.0, 0.0])
