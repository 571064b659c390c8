"""DPM-Solver-2 (``dpm_2``) and its ancestral form: the plan's midpoints and refusals. Against k-diffusion's own
``sample_dpm_2`` / ``sample_dpm_2_ancestral``: ``test_k_diffusion_parity.py``; diffusers' KDPM2 schedulers:
``test_scheduler_parity.py``."""

import math

import pytest
import torch

from fastdiff.errors import BadArgumentError
from fastdiff.samplers import sample_dpm_2, sample_dpm_2_ancestral
from helpers import smooth_denoiser as denoiser

SIGMAS = [14.6, 7.0, 3.1, 1.4, 0.6, 0.25, 0.09, 0.029, 0.0]


def setup():
    torch.manual_seed(2)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64) * SIGMAS[0]
    return x, [torch.randn(2, 3, 4, 4, dtype=torch.float64) for _ in SIGMAS]


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
