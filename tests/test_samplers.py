"""Sampler API, denoiser adapters, CFG, and DDIM inversion."""

import math

import numpy as np
import pytest
import torch

from fastdiff.denoiser import CFGDenoiser, DiscreteDenoiser, EDMDenoiser, dynamic_threshold
from fastdiff.errors import BadArgumentError
from fastdiff.sampling import get_sigmas, sample, sampler_options
from fastdiff.samplers import SAMPLERS, invert_ddim, sample_ddim, singlestep_orders
from fastdiff.schedules import make_alphas_cumprod, sigmas_from_alphas_cumprod
from test_sampler_order import GaussianMixture, single_thread  # noqa: F401


class Recorder(torch.nn.Module):
    """Records every call; output depends on x, t and the class label."""

    def __init__(self, out_channels=None):
        super().__init__()
        self.calls = []
        self.out_channels = out_channels

    def forward(self, x, t, class_labels=None, encoder_hidden_states=None):
        self.calls.append((x.shape[0], x.dtype, t.clone(), None if class_labels is None else class_labels.clone()))
        y = torch.tanh(x) * 0.5 + 0.01 * t.float()[:, None, None, None]
        if class_labels is not None:
            y = y + 0.3 * class_labels.float()[:, None, None, None]
        if self.out_channels:
            y = torch.cat([y, torch.full_like(y, 7.0)], dim=1)[:, : self.out_channels]
        return y.to(x.dtype)


# --------------------------------------------------------------------------------------------------
# the entry point
# --------------------------------------------------------------------------------------------------

def test_registry_names():
    expected = {"ddim", "ddpm", "euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde",
                "dpm_solver", "unipc", "edm", "plms", "lms"}
    assert expected <= set(SAMPLERS)


def test_unknown_sampler_lists_known_ones():
    with pytest.raises(BadArgumentError, match="dpmpp_2m") as e:
        sample(lambda x, s: x, torch.zeros(1, 2), "dpm_adaptive", [1.0, 0.0])
    assert "'dpm_adaptive'" in str(e.value)


def test_unknown_option_lists_accepted_ones():
    with pytest.raises(BadArgumentError, match="solver_type"):
        sample(lambda x, s: x, torch.zeros(1, 2), "dpmpp_3m", [1.0, 0.0], eta=1.0)
    assert "eta" in sampler_options("dpmpp_2m_sde") and "order" in sampler_options("dpmpp_3m_sde")


@pytest.mark.parametrize("sampler,options", [("euler_ancestral", dict(eta="x")), ("euler", dict(s_noise="x")),
                                             ("euler_ancestral", dict(eta=True)), ("dpmpp_2m", dict(order=2.5)),
                                             ("plms", dict(warmup=4))])
def test_scalar_options_of_the_wrong_type(sampler, options):
    """A string eta or a float order raised a raw TypeError deep in the loop (or ran with a bool as 1.0)."""
    with pytest.raises(BadArgumentError, match=f"option '{next(iter(options))}': expected"):
        sample(lambda x, s: x * 0.5, torch.ones(1, 1, 2, 2), sampler, [1.0, 0.5, 0.0], **options)


@pytest.mark.parametrize("sampler,options", [("dpmpp_2m_sde", dict(eta=-1.0)), ("dpmpp_3m_sde", dict(eta=-0.5)),
                                             ("euler_ancestral", dict(eta=-1)), ("euler", dict(s_noise=-1.0)),
                                             ("euler", dict(s_churn=-0.1)), ("ddim", dict(eta=torch.tensor(-0.3)))])
def test_negative_noise_amounts_are_refused(sampler, options):
    """eta = -1 divided by zero in the SDE samplers (a raw ZeroDivisionError); other negatives ran as nonsense."""
    with pytest.raises(BadArgumentError, match=r"must be >= 0 \(noise amounts\)"):
        sample(lambda x, s: x * 0.5, torch.ones(1, 1, 2, 2), sampler, [1.0, 0.5, 0.0], **options)


def test_disable_corrector_takes_step_indices():
    with pytest.raises(BadArgumentError, match="option 'disable_corrector': expected a list of step indices"):
        sample(lambda x, s: x * 0.5, torch.ones(1, 1, 2, 2), "unipc", [1.0, 0.5, 0.0], disable_corrector="abc")
    out = sample(lambda x, s: x * 0.5, torch.ones(1, 1, 2, 2), "unipc", [1.0, 0.5, 0.0], disable_corrector=[0])
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("sampler,options", [("dpmpp_2m", dict(lower_order_final=np.bool_(True))),
                                             ("dpmpp_2m", dict(lower_order_final=1)),
                                             ("euler_ancestral", dict(eta=torch.tensor(0.5))),
                                             ("euler_ancestral", dict(eta=np.float32(0.5))), ("euler", dict(s_churn=2))])
def test_scalar_options_numpy_tensors_and_ints_pass(sampler, options):
    out = sample(lambda x, s: x * 0.5, torch.ones(1, 1, 2, 2), sampler, [1.0, 0.5, 0.0], **options)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("bad", [float("nan"), -0.5, float("inf")])
def test_sigmas_must_be_finite_and_non_negative(bad):
    """A NaN or negative sigma ran and returned NaN / wrong samples without an error."""
    with pytest.raises(BadArgumentError, match="finite noise levels >= 0"):
        sample(lambda x, s: x * 0.5, torch.ones(1, 1, 2, 2), "euler", [1.0, bad, 0.0])


def test_device_sigmas_refused():
    sig = torch.tensor([1.0, 0.0], device="meta")
    with pytest.raises(BadArgumentError, match="host"):
        sample(lambda x, s: x, torch.zeros(1, 2), "euler", sig)


def test_callback_sees_every_step():
    seen = []
    gm = GaussianMixture()
    sample(gm, torch.randn(3, 2) * 10, "heun", get_sigmas("karras", 4, sigma_min=0.1, sigma_max=10),
           callback=lambda d: seen.append((d["i"], d["sigma"])))
    assert [i for i, _ in seen] == [0, 1, 2, 3] and seen[0][1] == pytest.approx(10)


def test_singlestep_orders_match_diffusers_rules():
    assert singlestep_orders(6, 3, final_zero=False) == [1, 2, 3, 1, 2, 3]
    assert singlestep_orders(6, 3, final_zero=True) == [1, 2, 3, 1, 2, 1]
    assert singlestep_orders(7, 2, final_zero=False) == [1, 2, 1, 2, 1, 2, 1]


# --------------------------------------------------------------------------------------------------
# DDIM inversion
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["edm", "euler"])
def test_churn_follows_edm_algorithm_2(name):
    """EDM's stochastic sampler with churn (and Euler with churn: the same without the 2nd-order correction)
    equals a float64 transcription of Karras et al. 2022, Algorithm 2 (NVlabs/edm ``edm_sampler``), fed the
    same noise: gamma only inside [s_tmin, s_tmax], x raised to sigma_hat, the step taken from sigma_hat."""
    from fastdiff.samplers import SAMPLERS

    torch.manual_seed(3)
    sigmas = torch.tensor([80.0, 20.0, 6.0, 1.5, 0.4, 0.06, 0.0], dtype=torch.float64)
    x0 = torch.randn(2, 3, 4, 4, dtype=torch.float64) * 80
    draws = [torch.randn(2, 3, 4, 4, dtype=torch.float64) for _ in range(len(sigmas) - 1)]
    opts = dict(s_churn=30.0, s_tmin=0.1, s_tmax=10.0, s_noise=1.007)  # churn at 6, 1.5, 0.4; not 80, 20, 0.06

    def denoiser(x, sigma, **_):  # a smooth stand-in network D(x; sigma)
        return torch.tanh(x / (1 + sigma[:, None, None, None] ** 2) ** 0.5) * 0.8

    got = SAMPLERS[name](denoiser, x0.clone(), sigmas, noise=lambda i, like: draws[i], **opts)

    n, x = len(sigmas) - 1, x0.clone()
    for i in range(n):
        t_cur, t_next = float(sigmas[i]), float(sigmas[i + 1])
        gamma = min(opts["s_churn"] / n, math.sqrt(2) - 1) if opts["s_tmin"] <= t_cur <= opts["s_tmax"] else 0.0
        t_hat = t_cur + gamma * t_cur
        x_hat = x + math.sqrt(t_hat ** 2 - t_cur ** 2) * opts["s_noise"] * draws[i]
        d_cur = (x_hat - denoiser(x_hat, torch.full((2,), t_hat, dtype=torch.float64))) / t_hat
        x = x_hat + (t_next - t_hat) * d_cur
        if name == "edm" and i < n - 1:
            d_prime = (x - denoiser(x, torch.full((2,), t_next, dtype=torch.float64))) / t_next
            x = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    torch.testing.assert_close(got, x, rtol=1e-10, atol=1e-10)


def test_invert_ddim_round_trip():
    """Invert then sample back with DDIM: the round trip returns the start, with the first-order error
    of the two discretisations (4x the steps -> ~4x smaller)."""
    gm = GaussianMixture()
    x0 = gm(torch.randn(32, 2, dtype=torch.float64) * 0.3, torch.full((32,), 0.3, dtype=torch.float64))
    errs = []
    for n in (400, 1600):
        sigmas = get_sigmas("exponential", n, sigma_min=0.02, sigma_max=10)[:-1]   # data taken at sigma 0.02
        latent = invert_ddim(gm, x0, sigmas)
        assert float((latent - x0).abs().mean()) > 1   # really noised up
        errs.append(float((sample_ddim(gm, latent, sigmas) - x0).abs().max()))
    assert errs[1] < 1e-2, f"round trip error {errs[1]:.2e} at 1600 steps"
    assert errs[0] / errs[1] > 3, f"round trip error does not shrink with steps: {errs}"


# --------------------------------------------------------------------------------------------------
# Denoiser adapters
# --------------------------------------------------------------------------------------------------

def test_discrete_denoiser_timesteps_exact_on_grid():
    ac = make_alphas_cumprod("scaled_linear", 1000, 0.00085, 0.012)
    table = sigmas_from_alphas_cumprod(ac)
    net = Recorder()
    den = DiscreteDenoiser(net, ac)
    idx = torch.tensor([0, 1, 250, 999])
    den(torch.zeros(4, 1, 2, 2), table[idx].float())
    assert torch.equal(net.calls[-1][2], idx.float())
    between = torch.tensor([math.sqrt(float(table[10] * table[11]))], dtype=torch.float32)
    den(torch.zeros(1, 1, 2, 2), between)
    assert 10 < float(net.calls[-1][2]) < 11
    DiscreteDenoiser(net, ac, timestep_rounding="round")(torch.zeros(1, 1, 2, 2), between)
    assert float(net.calls[-1][2]) in (10.0, 11.0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_discrete_denoiser_parameterisations(prediction_type):
    ac = make_alphas_cumprod("linear")
    t = 600
    a = float(ac[t])
    sigma = math.sqrt((1 - a) / a)
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    x_vp = math.sqrt(a) * x0 + math.sqrt(1 - a) * eps
    target = {"epsilon": eps, "v_prediction": math.sqrt(a) * eps - math.sqrt(1 - a) * x0, "sample": x0}[prediction_type]
    den = DiscreteDenoiser(lambda x, ts, **k: target, ac, prediction_type)
    out = den(x_vp * math.sqrt(1 + sigma ** 2), torch.full((2,), sigma))
    torch.testing.assert_close(out, x0, rtol=1e-4, atol=1e-4)


def test_learned_variance_channels_split_off():
    ac = make_alphas_cumprod("linear")
    den = DiscreteDenoiser(Recorder(out_channels=6), ac)
    assert den(torch.zeros(1, 3, 2, 2), torch.ones(1)).shape == (1, 3, 2, 2)
    with pytest.raises(BadArgumentError, match="expected 3"):
        DiscreteDenoiser(Recorder(out_channels=5), ac)(torch.zeros(1, 3, 2, 2), torch.ones(1))


def test_fp16_network_gets_fp16_and_state_stays_fp32():
    ac = make_alphas_cumprod("linear")
    net = Recorder()
    den = DiscreteDenoiser(net, ac, dtype=torch.float16)
    out = sample(den, torch.randn(2, 1, 4, 4), "euler", get_sigmas("karras", 3, alphas_cumprod=ac))
    assert out.dtype == torch.float32 and all(c[1] == torch.float16 for c in net.calls)


def test_edm_preconditioning():
    sd, sigma = 0.5, 2.0
    seen = {}

    def F(x, c_noise, **k):
        seen["x"], seen["c_noise"] = x, c_noise
        return torch.ones_like(x)

    x = torch.randn(1, 2, 3, 3)
    out = EDMDenoiser(F, sigma_data=sd)(x, torch.tensor([sigma]))
    c_skip, c_out, c_in = sd ** 2 / (sigma ** 2 + sd ** 2), sigma * sd / math.sqrt(sigma ** 2 + sd ** 2), 1 / math.sqrt(sigma ** 2 + sd ** 2)
    torch.testing.assert_close(out, c_skip * x + c_out)
    torch.testing.assert_close(seen["x"], x * c_in)
    torch.testing.assert_close(seen["c_noise"], torch.tensor([math.log(sigma) / 4]))


def test_clip_and_dynamic_thresholding():
    ac = make_alphas_cumprod("linear")
    big = lambda x, t, **k: torch.full_like(x, 3.0)  # noqa: E731
    assert float(DiscreteDenoiser(big, ac, "sample", clip_sample=1.5)(torch.zeros(1, 1, 2, 2), torch.ones(1)).max()) == 1.5
    x0 = torch.cat([torch.linspace(-4, 4, 100).reshape(1, 1, 10, 10), torch.linspace(-0.5, 0.5, 100).reshape(1, 1, 10, 10)])
    thr = dynamic_threshold(x0, 0.9, 3.0)
    assert float(thr[0].abs().max()) == pytest.approx(1.0) and torch.equal(thr[1], x0[1])


# --------------------------------------------------------------------------------------------------
# Classifier-free guidance
# --------------------------------------------------------------------------------------------------

def _cfg_setup(**kw):
    ac = make_alphas_cumprod("linear")
    net = Recorder()
    return net, CFGDenoiser(DiscreteDenoiser(net, ac, "v_prediction"), **kw), ac


def test_cfg_is_one_batched_call():
    net, cfg, _ = _cfg_setup(guidance_scale=4.0)
    x, sigma = torch.randn(2, 3, 4, 4), torch.tensor([3.0, 3.0])
    y, y0 = torch.tensor([5, 6]), torch.tensor([0, 0])
    out = cfg(x, sigma, class_labels=y, uncond={"class_labels": y0})
    assert len(net.calls) == 1 and net.calls[0][0] == 4
    assert torch.equal(net.calls[0][3], torch.tensor([0, 0, 5, 6]))   # [uncond, cond]
    c = cfg.inner(x, sigma, class_labels=y)
    u = cfg.inner(x, sigma, class_labels=y0)
    torch.testing.assert_close(out, u + 4.0 * (c - u))


def test_cfg_scale_one_skips_uncond():
    net, cfg, _ = _cfg_setup(guidance_scale=1.0)
    cfg(torch.randn(2, 3, 4, 4), torch.ones(2), class_labels=torch.tensor([1, 2]), uncond={"class_labels": torch.zeros(2)})
    assert len(net.calls) == 1 and net.calls[0][0] == 2


def test_cfg_guided_channels():
    net, cfg, _ = _cfg_setup(guidance_scale=4.0, guided_channels=2)
    x, sigma, y, y0 = torch.randn(2, 3, 4, 4), torch.ones(2), torch.tensor([5, 6]), torch.tensor([0, 0])
    out = cfg(x, sigma, class_labels=y, uncond={"class_labels": y0})
    c, u = cfg.inner(x, sigma, class_labels=y), cfg.inner(x, sigma, class_labels=y0)
    torch.testing.assert_close(out[:, :2], (u + 4 * (c - u))[:, :2])
    torch.testing.assert_close(out[:, 2:], c[:, 2:])


def test_cfg_guidance_rescale_matches_diffusers():
    # diffusers' rescale_noise_cfg (Lin et al. 2023, eq. 15-16), restated: importing the SD pipeline module
    # here would pick up the repo's top-level kernels/ folder as the `kernels` hub package.
    def rescale_noise_cfg(noise_cfg, noise_pred_text, guidance_rescale):
        std_text = noise_pred_text.std(dim=list(range(1, noise_pred_text.ndim)), keepdim=True)
        std_cfg = noise_cfg.std(dim=list(range(1, noise_cfg.ndim)), keepdim=True)
        rescaled = noise_cfg * (std_text / std_cfg)
        return guidance_rescale * rescaled + (1 - guidance_rescale) * noise_cfg

    ac = make_alphas_cumprod("linear")
    t = 400
    a = float(ac[t])
    sigma = math.sqrt((1 - a) / a)
    x_vp = torch.randn(2, 3, 4, 4)
    v_c, v_u = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4) * 0.5
    outs = lambda x, ts, class_labels=None, **k: torch.where(class_labels[:, None, None, None] > 0, v_c.repeat(2, 1, 1, 1), v_u.repeat(2, 1, 1, 1))  # noqa: E731
    cfg = CFGDenoiser(DiscreteDenoiser(outs, ac, "v_prediction"), guidance_scale=5.0, guidance_rescale=0.7)
    got = cfg(x_vp * math.sqrt(1 + sigma ** 2), torch.full((2,), sigma), class_labels=torch.ones(2), uncond={"class_labels": torch.zeros(2)})
    v = rescale_noise_cfg(v_u + 5.0 * (v_c - v_u), v_c, guidance_rescale=0.7)
    expect = math.sqrt(a) * x_vp - math.sqrt(1 - a) * v                        # diffusers' x0 from v
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-4)
    # phi one per sample with the call (what generate passes): row 0 rescaled at 0.7, row 1 not at all
    per_call = CFGDenoiser(DiscreteDenoiser(outs, ac, "v_prediction"), guidance_scale=5.0)
    got = per_call(x_vp * math.sqrt(1 + sigma ** 2), torch.full((2,), sigma), class_labels=torch.ones(2),
                   uncond={"class_labels": torch.zeros(2)}, guidance_rescale=torch.tensor([0.7, 0.0]))
    torch.testing.assert_close(got[0], expect[0], rtol=1e-4, atol=1e-4)
    plain = math.sqrt(a) * x_vp - math.sqrt(1 - a) * (v_u + 5.0 * (v_c - v_u))
    torch.testing.assert_close(got[1], plain[1], rtol=1e-4, atol=1e-4)


def test_cfg_uncond_unknown_key():
    _, cfg, _ = _cfg_setup(guidance_scale=2.0)
    with pytest.raises(BadArgumentError, match="uncond"):
        cfg(torch.randn(1, 3, 2, 2), torch.ones(1), class_labels=torch.ones(1), uncond={"encoder_hidden_states": torch.ones(1)})
