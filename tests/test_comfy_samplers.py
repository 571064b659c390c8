"""ComfyUI's own samplers (``fastdiff.comfy_samplers``: ipndm, ipndm_v, gradient_estimation, res_multistep and its
ancestral form, er_sde) against a float64 transcription of ComfyUI's code (``comfy_samplers_ref``), on the analytic
denoiser and per-step draws of the k-diffusion parity tests; then on a pipeline, a flow model and in the sampler
option checks."""

from __future__ import annotations

import pytest
import torch

import comfy_samplers_ref as ref
from fastdiff.errors import BadArgumentError
from fastdiff.samplers import SAMPLERS, STOCHASTIC
from helpers import rel_err
from test_k_diffusion_parity import SIGMAS, StepNoise, analytic_denoiser

UNEVEN = [80.0, 31.0, 9.5, 4.0, 1.1, 0.52, 0.2, 0.07, 0.01]  # (ends above 0: no final denoising step)


def start(sigmas):
    return torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * sigmas[0]


def run_both(name, reference, sigmas, fd_opts=None, ref_opts=None, noisy=False):
    sig = torch.tensor(sigmas, dtype=torch.float64)
    x = start(sig)
    noise_ref, noise_fd = StepNoise(sig, x), StepNoise(sig, x)
    extra = dict(noise_sampler=noise_ref.k_diffusion) if noisy else {}
    want = reference(analytic_denoiser, x.clone(), sig, **extra, **(ref_opts or {}))
    got = SAMPLERS[name](analytic_denoiser, x.clone(), sig, noise=noise_fd.fastdiff, **(fd_opts or {}))
    return got, want, x


@pytest.mark.parametrize("sigmas", [SIGMAS, UNEVEN, SIGMAS[:3] + [0.0], [14.6, 0.0]])
@pytest.mark.parametrize("name,reference,opts", [
    ("ipndm", ref.ipndm, {}),
    ("ipndm", ref.ipndm, dict(max_order=2)),
    ("ipndm_v", ref.ipndm_v, {}),
    ("ipndm_v", ref.ipndm_v, dict(max_order=3)),
    ("gradient_estimation", ref.gradient_estimation, {}),
    ("gradient_estimation", ref.gradient_estimation, dict(ge_gamma=1.5)),
    ("res_multistep", ref.res_multistep, {}),
])
def test_deterministic_samplers_equal_comfyui(name, reference, opts, sigmas):
    noisy = reference is ref.res_multistep
    got, want, x = run_both(name, reference, sigmas, opts, opts, noisy=noisy)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert float((got - x).abs().max()) > 0.1  # (it moved)


@pytest.mark.parametrize("sigmas", [SIGMAS, UNEVEN])
@pytest.mark.parametrize("name,reference,fd_opts,ref_opts", [
    ("res_multistep_ancestral", ref.res_multistep, {}, dict(eta=1.0)),
    ("res_multistep_ancestral", ref.res_multistep, dict(eta=0.5, s_noise=0.8), dict(eta=0.5, s_noise=0.8)),
    # (eta > 1: a step's sigma_down is 0 before the last; the next step's second-order weight vanishes, as ComfyUI's)
    ("res_multistep_ancestral", ref.res_multistep, dict(eta=1.2), dict(eta=1.2)),
    ("er_sde", ref.er_sde, {}, {}),
    ("er_sde", ref.er_sde, dict(max_stage=2, s_noise=0.7), dict(max_stage=2, s_noise=0.7)),
    ("er_sde", ref.er_sde, dict(max_stage=1), dict(max_stage=1)),
    ("er_sde", ref.er_sde, dict(s_noise=0.0), dict(s_noise=0.0)),
])
def test_stochastic_samplers_equal_comfyui(name, reference, fd_opts, ref_opts, sigmas):
    """Both fed the same draw per step; the draws count (another set moves the sample) but where s_noise is 0."""
    got, want, x = run_both(name, reference, sigmas, fd_opts, ref_opts, noisy=True)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    sig = torch.tensor(sigmas, dtype=torch.float64)
    other = SAMPLERS[name](analytic_denoiser, x.clone(), sig, noise=lambda i, like: torch.randn(
        like.shape, generator=torch.Generator().manual_seed(90 + i), dtype=like.dtype), **fd_opts)
    moved = float((other - got).abs().max())
    assert moved == 0 if fd_opts.get("s_noise", 1) == 0 else moved > 1e-3


@pytest.mark.parametrize("name,opts", [("res_multistep", {}), ("res_multistep_ancestral", {}),
                                       ("res_multistep_cfg_pp", {}), ("er_sde", {}), ("seeds_2", {}), ("seeds_3", {})])
def test_float32_from_a_huge_first_sigma_keeps_its_digits(name, opts):
    """From sigma 1e10 (a flow model's t = 1 in the sigma frame) the float32 run stays with the float64 one: the
    first step is written as D + (sigma' / sigma)(x - D), which does not cancel."""
    def scaled(x, sigma, **_):  # (the analytic x0 of its input scaled to unit variance: no sin(3e10) in float32)
        s = sigma.reshape(-1, *([1] * (x.dim() - 1)))
        return analytic_denoiser(x / (1 + s ** 2).sqrt(), torch.zeros_like(sigma))

    sig = torch.tensor([1e10, 9.0, 3.0, 1.0, 0.3, 0.0], dtype=torch.float64)
    x = start(sig)
    draws = [torch.randn(x.shape, generator=torch.Generator().manual_seed(40 + i), dtype=torch.float64)
             for i in range(len(sig))]
    if name == "res_multistep_cfg_pp":
        pair = PairDenoiser()
        pair.pair = lambda x, s: (scaled(x, s), 0.9 * scaled(x, s))
        denoiser = pair
    else:
        denoiser = scaled
    outs = [SAMPLERS[name](denoiser, x.to(dtype), sig, noise=lambda i, like: draws[i].to(like.dtype), **opts)
            for dtype in (torch.float64, torch.float32)]
    assert float((outs[1].double() - outs[0]).abs().max()) < 1e-4


def test_the_orders_are_what_they_claim():
    """With D = 0 the ODE's path is linear in sigma (dx/dsigma = x / sigma): every consistent method lands on
    x * sigma_end / sigma_start exactly (ipndm_v up to order 3: see below). On a curved path (x0 = sin(sigma)) the
    multistep ones beat Euler at 40 Karras steps."""
    sig = torch.tensor([10.0, 6.0, 3.5, 2.0, 1.2, 0.7, 0.4], dtype=torch.float64)
    x = start(sig)
    for name, opts in [("ipndm", {}), ("ipndm_v", dict(max_order=3)), ("gradient_estimation", {}),
                       ("res_multistep", {})]:
        out = SAMPLERS[name](lambda x, s: torch.zeros_like(x), x.clone(), sig, **opts)
        torch.testing.assert_close(out, x * 0.04, rtol=1e-10, atol=1e-10)
    # ComfyUI's (zju-pi's) order-4 variable-step weights do not sum to 1 on an uneven grid (on an even one they are
    # 57/24, -65/24, 43/24, -11/24, not Adams-Bashforth's 55/24, -59/24, 37/24, -9/24): reproduced, as ComfyUI runs it
    from fastdiff.comfy_samplers import _variable_weights

    assert sum(_variable_weights(sig.tolist(), 3, 4)) == pytest.approx(1.00079, abs=1e-5)
    even = torch.tensor(_variable_weights([7.0, 6.0, 5.0, 4.0, 3.0], 3, 4), dtype=torch.float64)
    torch.testing.assert_close(even * 24, torch.tensor([57.0, -65.0, 43.0, -11.0], dtype=torch.float64))

    def curved(x, s):  # x0 = sin(sigma): the path of dx/dsigma = (x - sin(sigma)) / sigma
        return torch.sin(s).reshape(-1, 1, 1, 1).expand_as(x)

    from fastdiff.schedules import get_sigmas_karras

    def error(name, steps, **opts):
        grid = get_sigmas_karras(steps, 0.4, 10.0, final="sigma_min")
        return float((SAMPLERS[name](curved, x[:1].clone(), grid, **opts) - exact).abs().max())

    exact = SAMPLERS["euler"](curved, x[:1].clone(), get_sigmas_karras(8000, 0.4, 10.0, final="sigma_min"))
    euler = error("euler", 40)  # (observed 8e-3 at 40 steps, halving with twice the steps)
    assert error("euler", 20) / euler == pytest.approx(2.0, rel=0.1)
    assert error("res_multistep", 40) < euler / 5 and error("ipndm_v", 40, max_order=3) < euler / 5
    assert error("ipndm_v", 40) < euler / 4 and error("ipndm", 40) < euler / 4


def test_registered_stochastic_and_in_the_flow_frames():
    from fastdiff.flow import frame_for

    assert {"res_multistep_ancestral", "er_sde", "seeds_2", "seeds_3", "exp_heun_2_x0_sde"} <= STOCHASTIC
    assert not {"res_multistep", "exp_heun_2_x0", "heunpp2"} & STOCHASTIC
    assert [frame_for(s) for s in ("ipndm", "ipndm_v", "gradient_estimation")] == ["t"] * 3  # (as ComfyUI runs them)
    assert [frame_for(s) for s in ("res_multistep", "res_multistep_ancestral", "er_sde")] == ["sigma"] * 3


@pytest.mark.parametrize("name", ["ipndm", "ipndm_v", "gradient_estimation", "res_multistep",
                                  "res_multistep_ancestral", "er_sde", "heunpp2", "seeds_2", "seeds_3",
                                  "exp_heun_2_x0"])
def test_pipelines_run_them_and_a_batch_equals_single_runs(name):
    """On a UNet and a flow model (from t = 1: sigma infinity in the sigma frame): finite, and a sample depends on
    its own seed only."""
    import fastdiff

    for arch in ("arch:tiny-unet", "arch:tiny-sd3"):
        pipe = fastdiff.load(arch)
        kw = {}
        if pipe.spec.cross_attention_dim:
            kw = dict(encoder_hidden_states=torch.randn(1, 4, pipe.spec.cross_attention_dim,
                                                        generator=torch.Generator().manual_seed(0)),
                      text_embeds=torch.zeros(1, pipe.spec.text_embeds_dim))
        both = pipe.generate(seeds=[3, 4], steps=5, sampler=name, progress=False, **kw)
        one = pipe.generate(seeds=[4], steps=5, sampler=name, progress=False, **kw)
        assert torch.isfinite(both).all(), (arch, name)
        assert rel_err(both[1:], one) <= 1e-5, (arch, name)


def test_bad_options_are_refused():
    import fastdiff

    pipe = fastdiff.load("arch:tiny-unet")
    with pytest.raises(BadArgumentError, match="max_order: expected 1, 2, 3 or 4"):
        pipe.generate(seed=1, steps=3, sampler="ipndm", max_order=5, progress=False)
    with pytest.raises(BadArgumentError, match="max_stage: expected 1, 2 or 3"):
        pipe.generate(seed=1, steps=3, sampler="er_sde", max_stage=0, progress=False)
    with pytest.raises(BadArgumentError, match="must be >= 0"):
        pipe.generate(seed=1, steps=3, sampler="res_multistep_ancestral", eta=-1.0, progress=False)
    with pytest.raises(BadArgumentError, match="unknown option"):
        pipe.generate(seed=1, steps=3, sampler="gradient_estimation", eta=1.0, progress=False)
    with pytest.raises(BadArgumentError, match="solver_type: expected 'phi_1' or 'phi_2'"):
        pipe.generate(seed=1, steps=3, sampler="seeds_2", solver_type="midpoint", progress=False)
    with pytest.raises(BadArgumentError, match="expected 0 < r_1 < r_2 <= 1"):
        pipe.generate(seed=1, steps=3, sampler="seeds_3", r_1=0.7, r_2=0.5, progress=False)


# --------------------------------------------------------------------------------------------------
# CFG++ (fastdiff.cfg_pp)
# --------------------------------------------------------------------------------------------------

def uncond_denoiser(x, sigma, **_):
    """A second analytic x0, the unconditional pass's stand-in."""
    s = sigma.reshape(-1, *([1] * (x.dim() - 1)))
    return torch.tanh(0.7 * x / (1 + s ** 2).sqrt()) * 0.8 - 0.1


class PairDenoiser:
    """What CFGDenoiser.denoise_pair_at gives the CFG++ samplers: (uncond + w (cond - uncond), uncond)."""

    def __init__(self, w=1.7):
        self.w = w

    def pair(self, x, sigma):
        c, u = analytic_denoiser(x, sigma), uncond_denoiser(x, sigma)
        return u + self.w * (c - u), u

    def denoise_pair_at(self, x, sigma: float, **_):
        return self.pair(x, torch.full((x.shape[0],), sigma, dtype=x.dtype))


@pytest.mark.parametrize("sigmas", [SIGMAS, UNEVEN])
@pytest.mark.parametrize("name,reference,fd_opts,ref_opts", [
    ("euler_cfg_pp", ref.euler_ancestral_cfg_pp, {}, dict(eta=0.0, s_noise=0.0)),
    ("euler_ancestral_cfg_pp", ref.euler_ancestral_cfg_pp, {}, {}),
    ("euler_ancestral_cfg_pp", ref.euler_ancestral_cfg_pp, dict(eta=0.6, s_noise=0.9), dict(eta=0.6, s_noise=0.9)),
    ("dpmpp_2m_cfg_pp", ref.dpmpp_2m_cfg_pp, {}, None),
    ("dpmpp_2s_ancestral_cfg_pp", ref.dpmpp_2s_ancestral_cfg_pp, {}, {}),
    ("dpmpp_2s_ancestral_cfg_pp", ref.dpmpp_2s_ancestral_cfg_pp, dict(eta=0.0), dict(eta=0.0)),
    ("res_multistep_cfg_pp", ref.res_multistep_cfg_pp, {}, {}),
    ("res_multistep_ancestral_cfg_pp", ref.res_multistep_cfg_pp, {}, dict(eta=1.0)),
    ("gradient_estimation_cfg_pp", ref.gradient_estimation_cfg_pp, {}, None),
])
def test_cfg_pp_samplers_equal_comfyui(name, reference, fd_opts, ref_opts, sigmas):
    """Fed ComfyUI's pair (the guided x0 and the unconditional one) and the same draws; the unconditional x0 counts
    (with it equal to the guided one, a CFG++ sampler is its plain form, and the results differ)."""
    sig = torch.tensor(sigmas, dtype=torch.float64)
    x = start(sig)
    pair = PairDenoiser()
    noise_ref, noise_fd = StepNoise(sig, x), StepNoise(sig, x)
    extra = {} if ref_opts is None else dict(noise_sampler=noise_ref.k_diffusion, **ref_opts)
    want = reference(pair.pair, x.clone(), sig, **extra)
    got = SAMPLERS[name](pair, x.clone(), sig, noise=noise_fd.fastdiff, **fd_opts)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    plain = SAMPLERS[name](analytic_denoiser, x.clone(), sig, noise=StepNoise(sig, x).fastdiff, **fd_opts)
    assert float((plain - got).abs().max()) > 1e-3


def test_cfg_pp_on_plain_denoisers_is_the_plain_sampler():
    """With no unconditional prediction apart (an unguided run), euler_cfg_pp is Euler, and the others their plain
    samplers where ComfyUI's have one."""
    sig = torch.tensor(SIGMAS, dtype=torch.float64)
    x = start(sig)
    for name, plain, opts in [("euler_cfg_pp", "euler", {}), ("dpmpp_2m_cfg_pp", "dpmpp_2m", {}),
                              ("res_multistep_cfg_pp", "res_multistep", {}),
                              ("gradient_estimation_cfg_pp", "gradient_estimation", {})]:
        torch.testing.assert_close(SAMPLERS[name](analytic_denoiser, x.clone(), sig, **opts),
                                   SAMPLERS[plain](analytic_denoiser, x.clone(), sig, **opts), rtol=1e-10,
                                   atol=1e-10)


def test_pipelines_run_cfg_pp_with_the_unconditional_pass_at_any_scale(tmp_path):
    """On a class model the unconditional pass runs at cfg 1 too (ComfyUI's), so euler_cfg_pp at 1 is not Euler; a
    batch equals its single runs; the Engine serves it; a CFG-folded graph and an unconditional model behave."""
    import fastdiff

    dit = fastdiff.load("arch:tiny-dit")
    kw = dict(seeds=[3, 4], class_labels=[1, 2], steps=4, progress=False)
    at_one = dit.generate(sampler="euler_cfg_pp", cfg_scale=1.0, **kw)
    assert rel_err(at_one, dit.generate(sampler="euler", cfg_scale=1.0, **kw)) > 1e-3
    both = dit.generate(sampler="dpmpp_2m_cfg_pp", cfg_scale=[1.5, 0.8], **kw)
    one = dit.generate(seeds=[4], class_labels=[2], steps=4, sampler="dpmpp_2m_cfg_pp", cfg_scale=0.8,
                       progress=False)
    assert rel_err(both[1:], one) <= 1e-5
    with fastdiff.Engine(dit, max_batch=4, max_wait_ms=50) as engine:
        futures = [engine.submit(seed=s, class_label=c, steps=4, sampler="euler_cfg_pp", cfg_scale=g)
                   for s, c, g in [(3, 1, 1.0), (4, 2, 1.0), (5, 2, 2.0)]]
        got = [f.result(timeout=120) for f in futures]
    assert rel_err(got[1][None], dit.generate(seeds=[4], class_labels=[2], steps=4, sampler="euler_cfg_pp",
                                              progress=False)) <= 1e-5
    unet = fastdiff.load("arch:tiny-unet")  # (no unconditional input: the plain sampler)
    plain = dict(seeds=[3], steps=4, progress=False)
    # (the same step, arranged otherwise: x0 + sigma' d against x + (sigma' - sigma) d)
    assert rel_err(unet.generate(sampler="euler_cfg_pp", **plain), unet.generate(sampler="euler", **plain)) <= 1e-6
    pytest.importorskip("onnxruntime", reason="a CFG-folded graph runs on ONNX Runtime")
    from fastdiff.export.onnx import export_onnx

    export_onnx(dit, None, str(tmp_path / "dit.onnx"), cfg_folded=True, progress=False)
    folded = fastdiff.load(str(tmp_path / "dit.onnx"))
    with pytest.raises(BadArgumentError, match="CFG\\+\\+.*CFG-folded graph"):
        folded.generate(sampler="euler_cfg_pp", cfg_scale=1.5, **kw)


def test_one_guidance_rule_for_generate_the_engine_and_the_cli():
    """``pipe.guides``: the unconditional pass at cfg != 1, and at 1 for a CFG++ sampler where the model has an
    unconditional input; the Engine groups requests by it (a model without one never batches cfg 1 with cfg 2)."""
    import fastdiff

    dit, unet = fastdiff.load("arch:tiny-dit"), fastdiff.load("arch:tiny-unet")
    assert dit.guides("euler_cfg_pp", 1.0) and not dit.guides("euler", 1.0) and dit.guides("euler", 2.0)
    assert not unet.guides("euler_cfg_pp", 1.0) and unet.guides("euler_cfg_pp", 2.0)
    for pipe, label, same in ((dit, 1, True), (unet, None, False)):
        with fastdiff.Engine(pipe) as engine:
            keys = [engine._make_request(None, 1, label, None, None, 4, "euler_cfg_pp", g, None, None, None, {},
                                         {}).key for g in (1.0, 2.0)]
        assert (keys[0] == keys[1]) == same


def test_unguided_channels_keep_the_conditional_x0_on_both_sides():
    """With guided_channels (official DiT: the variance channels are the conditional pass's), the unconditional x0
    handed to a CFG++ step holds the conditional one beyond them: their step is the plain one."""
    from fastdiff.denoiser import CFGDenoiser, Denoiser

    class Scaled(Denoiser):  # x0 = x * c, c per row: the conditional rows 2, the unconditional 0.5
        def c_skip(self, sigma):
            return 0.0

        def predict_at(self, x, sigma, c=None):
            return x * c.reshape(-1, 1, 1, 1)

    cfg = CFGDenoiser(Scaled(), None, guided_channels=2)
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    guided, uncond = cfg.denoise_pair_at(x, 1.0, c=torch.full((2,), 2.0), uncond=dict(c=torch.full((2,), 0.5)),
                                         guidance_scale=torch.full((2,), 3.0))
    torch.testing.assert_close(uncond[:, :2], 0.5 * x[:, :2])
    torch.testing.assert_close(uncond[:, 2:], 2.0 * x[:, 2:])
    torch.testing.assert_close(guided[:, :2], (0.5 + 3 * 1.5) * x[:, :2])
    torch.testing.assert_close(guided[:, 2:], 2.0 * x[:, 2:])


@pytest.mark.parametrize("sigmas", [SIGMAS, UNEVEN, SIGMAS[:3] + [0.0], [14.6, 0.0]])
@pytest.mark.parametrize("opts", [{}, dict(s_churn=2.0, s_noise=0.9), dict(s_churn=5.0, s_tmin=0.5, s_tmax=8.0)])
def test_heunpp2_equals_comfyui(sigmas, opts):
    """Heun++ against ComfyUI's code, churn included (the same draw per step on both sides)."""
    sig = torch.tensor(sigmas, dtype=torch.float64)
    x = start(sig)
    draws = [torch.randn(x.shape, generator=torch.Generator().manual_seed(70 + i), dtype=torch.float64)
             for i in range(len(sig))]
    want = ref.heunpp2(analytic_denoiser, x.clone(), sig, draws=lambda i: draws[i], **opts)
    got = SAMPLERS["heunpp2"](analytic_denoiser, x.clone(), sig, noise=lambda i, like: draws[i], **opts)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if len(sig) > 3 and not opts:  # (not Heun's: the third evaluation and the weights count)
        assert float((got - SAMPLERS["heun"](analytic_denoiser, x.clone(), sig)).abs().max()) > 1e-3


class InOrder:
    """Draws taken in call order on both sides (SEEDS draws at every stage: up to three a step)."""

    def __init__(self, like, count=40):
        self.draws = [torch.randn(like.shape, generator=torch.Generator().manual_seed(80 + k), dtype=like.dtype)
                      for k in range(count)]
        self.taken = 0

    def __call__(self, *_):
        self.taken += 1
        return self.draws[self.taken - 1]


@pytest.mark.parametrize("sigmas", [SIGMAS, UNEVEN])
@pytest.mark.parametrize("name,reference,fd_opts,ref_opts", [
    ("seeds_2", ref.seeds_2, {}, {}),
    ("seeds_2", ref.seeds_2, dict(solver_type="phi_2", r=0.4, eta=0.7, s_noise=0.9),
     dict(solver_type="phi_2", r=0.4, eta=0.7, s_noise=0.9)),
    ("seeds_2", ref.seeds_2, dict(eta=0.0), dict(eta=0.0)),
    ("seeds_3", ref.seeds_3, {}, {}),
    ("seeds_3", ref.seeds_3, dict(r_1=0.25, r_2=0.6, eta=0.5), dict(r_1=0.25, r_2=0.6, eta=0.5)),
    ("exp_heun_2_x0", ref.seeds_2, {}, dict(eta=0.0, s_noise=0.0, r=1.0, solver_type="phi_2")),
    ("exp_heun_2_x0_sde", ref.seeds_2, {}, dict(r=1.0, solver_type="phi_2")),
])
def test_seeds_equal_comfyui(name, reference, fd_opts, ref_opts, sigmas):
    sig = torch.tensor(sigmas, dtype=torch.float64)
    x = start(sig)
    noise_ref, noise_fd = InOrder(x), InOrder(x)
    want = reference(analytic_denoiser, x.clone(), sig, noise_ref, **ref_opts)
    got = SAMPLERS[name](analytic_denoiser, x.clone(), sig, noise=noise_fd, **fd_opts)
    assert noise_fd.taken == noise_ref.taken
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert float((got - x).abs().max()) > 0.1
