"""ComfyUI's named schedules (``simple``, ``sgm_uniform``, ``ddim_uniform``, ``beta``, ``kl_optimal``) against a
transcription of ComfyUI's ``comfy/samplers.py`` scheduler functions over its ``ModelSamplingDiscrete`` (ComfyUI is
no pip package): the grids, the step counts they give, and the pipeline running them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastdiff.errors import BadArgumentError
from fastdiff.schedules import get_sigmas, make_alphas_cumprod


class ComfyModelSampling:
    """ComfyUI's ModelSamplingDiscrete for SD (ldm's "linear" betas 0.00085..0.012, computed in float64; the sigma
    buffers kept in float32): ``sigma(t)`` interpolates log sigma, ``timestep(sigma)`` is the nearest entry."""

    def __init__(self):
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        ac = torch.cumprod(1 - betas, 0)
        sigmas = ((1 - ac) / ac) ** 0.5
        self.sigmas, self.log_sigmas = sigmas.float(), sigmas.log().float()
        self.sigma_min, self.sigma_max = self.sigmas[0], self.sigmas[-1]

    def timestep(self, sigma):
        return (sigma.log() - self.log_sigmas[:, None]).abs().argmin(dim=0).view(sigma.shape)

    def sigma(self, t):
        t = torch.clamp(t.float(), min=0, max=len(self.sigmas) - 1)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()


class ComfyFlowSampling:
    """ComfyUI's ModelSamplingDiscreteFlow (SD3 and most flow models: 1000 times shifted by time_snr_shift, the
    timestep t * 1000) or, with ``flux=True``, ModelSamplingFlux (10000 times through flux_time_shift at ``shift``
    = mu, the timestep t itself), float32 as ComfyUI holds them."""

    def __init__(self, shift: float, flux: bool = False):
        self.shift, self.flux = shift, flux
        self.multiplier = 1.0 if flux else 1000.0
        size = 10000 if flux else 1000
        self.sigmas = self.sigma(torch.arange(1, size + 1, 1) / size * self.multiplier)
        self.sigma_min, self.sigma_max = self.sigmas[0], self.sigmas[-1]

    def timestep(self, sigma):
        return sigma * self.multiplier

    def sigma(self, timestep):
        t = timestep / self.multiplier
        if self.flux:  # flux_time_shift(mu, 1.0, t)
            return math.exp(self.shift) / (math.exp(self.shift) + (1 / t - 1) ** 1.0)
        return t if self.shift == 1.0 else self.shift * t / (1 + (self.shift - 1) * t)  # time_snr_shift


class ComfyEDMSampling:
    """ComfyUI's ModelSamplingContinuousEDM: 1000 log-even sigmas, the timestep 0.25 log sigma."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        self.sigmas = torch.linspace(math.log(sigma_min), math.log(sigma_max), 1000).exp()
        self.sigma_min, self.sigma_max = self.sigmas[0], self.sigmas[-1]

    def timestep(self, sigma):
        return 0.25 * sigma.log()

    def sigma(self, timestep):
        return (timestep / 0.25).exp()


def comfy_grid(name: str, steps: int, s) -> torch.Tensor:
    """comfy/samplers.py's simple_scheduler, normal_scheduler (sgm=False / True), ddim_scheduler, beta_scheduler and
    kl_optimal_scheduler over a model sampling ``s``, as ComfyUI computes them (float32)."""
    if name == "normal":
        start, end = s.timestep(s.sigma_max), s.timestep(s.sigma_min)
        if math.isclose(float(s.sigma(end)), 0, abs_tol=0.00001):
            raise NotImplementedError("a table ending at sigma 0 (ComfyUI takes a step more, no zero appended)")
        return torch.FloatTensor([float(s.sigma(t)) for t in torch.linspace(start, end, steps)] + [0.0])
    if name == "simple":
        stride = len(s.sigmas) / steps
        return torch.FloatTensor([float(s.sigmas[-(1 + int(x * stride))]) for x in range(steps)] + [0.0])
    if name == "sgm_uniform":
        timesteps = torch.linspace(s.timestep(s.sigma_max), s.timestep(s.sigma_min), steps + 1)[:-1]
        return torch.FloatTensor([float(s.sigma(t)) for t in timesteps] + [0.0])
    if name == "ddim_uniform":
        sigs, x, stride = [0.0], 1, max(len(s.sigmas) // steps, 1)
        while x < len(s.sigmas):
            sigs.append(float(s.sigmas[x]))
            x += stride
        return torch.FloatTensor(sigs[::-1])
    if name == "beta":
        from scipy import stats

        ts = np.rint(stats.beta.ppf(1 - np.linspace(0, 1, steps, endpoint=False), 0.6, 0.6) * (len(s.sigmas) - 1))
        sigs, last = [], -1
        for t in ts:
            if t != last:
                sigs.append(float(s.sigmas[int(t)]))
            last = t
        return torch.FloatTensor(sigs + [0.0])
    if name == "kl_optimal":
        ramp = torch.arange(steps, dtype=torch.float).div_(steps - 1)
        sigmas = ramp.new_zeros(steps + 1)
        sigmas[:-1] = (ramp * math.atan(float(s.sigma_min)) + (1 - ramp) * math.atan(float(s.sigma_max))).tan_()
        return sigmas
    raise ValueError(name)


SD_AC = make_alphas_cumprod("scaled_linear", 1000, 0.00085, 0.012)


@pytest.mark.parametrize("steps", [2, 4, 7, 20, 33, 50])
@pytest.mark.parametrize("name", ["simple", "sgm_uniform", "ddim_uniform", "beta", "kl_optimal"])
def test_grids_equal_comfyui(name, steps):
    if name == "beta":
        pytest.importorskip("scipy", reason="schedule 'beta' takes the Beta distribution's quantiles from scipy")
    want = comfy_grid(name, steps, ComfyModelSampling()).double()
    got = get_sigmas(name, steps, alphas_cumprod=SD_AC)
    assert got.dtype == torch.float64 and len(got) == len(want)  # (ddim_uniform at 7 steps: 8, as ComfyUI)
    # (2e-5: the tables themselves differ by up to 1.3e-5 at their low end, fastdiff's alphas_cumprod being diffusers'
    # float32 product where ComfyUI's is float64)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=0)
    assert bool((got[:-1] > got[1:]).all())  # decreasing, no zero-length step


def test_the_step_counts_comfyui_gives():
    """ddim_uniform can take a step more than asked, beta fewer (two quantiles on one timestep): as ComfyUI."""
    assert len(get_sigmas("ddim_uniform", 7, alphas_cumprod=SD_AC)) - 1 == 8
    pytest.importorskip("scipy", reason="schedule 'beta' takes the Beta distribution's quantiles from scipy")
    got = get_sigmas("beta", 400, alphas_cumprod=SD_AC)
    assert len(got) - 1 < 400
    torch.testing.assert_close(got, comfy_grid("beta", 400, ComfyModelSampling()).double(), rtol=2e-5, atol=0)


def test_kl_optimal_at_one_step_and_on_a_given_range():
    """One step is sigma_max then 0 (ComfyUI's formula divides by zero there); an EDM range is taken as given."""
    torch.testing.assert_close(get_sigmas("kl_optimal", 1, sigma_min=0.002, sigma_max=80.0),
                               torch.tensor([80.0, 0.0], dtype=torch.float64))
    grid = get_sigmas("kl_optimal", 5, sigma_min=0.002, sigma_max=80.0)
    angles = torch.atan(grid[:-1])
    torch.testing.assert_close(angles[:-1] - angles[1:], (angles[:1] - angles[1:2]).expand(4))  # even in arctan
    assert float(grid[0]) == pytest.approx(80.0) and float(grid[-2]) == pytest.approx(0.002)


@pytest.mark.parametrize("name", ["simple", "sgm_uniform", "ddim_uniform", "beta"])
def test_table_schedules_need_a_training_table(name):
    with pytest.raises(BadArgumentError, match=f"schedule '{name}' picks from the training sigma table"):
        get_sigmas(name, 4, sigma_min=0.002, sigma_max=80.0)


@pytest.mark.parametrize("name", ["simple", "sgm_uniform", "ddim_uniform", "beta", "kl_optimal"])
def test_a_pipeline_runs_the_named_grid(name):
    """generate(schedule=...) walks exactly that grid (the callback sees each step's sigma)."""
    import fastdiff

    if name == "beta":
        pytest.importorskip("scipy", reason="schedule 'beta' takes the Beta distribution's quantiles from scipy")
    pipe = fastdiff.load("arch:tiny-unet")
    seen = []
    pipe.generate(n=1, steps=5, schedule=name, sampler="euler", seed=0, progress=False,
                  callback=lambda info: seen.append(float(info["sigma"])))
    want = get_sigmas(name, 5, alphas_cumprod=pipe.alphas_cumprod())
    if name == "kl_optimal":  # (a range schedule: SD-like tables top out below the pipeline's cap of 80)
        want = get_sigmas(name, 5, alphas_cumprod=pipe.alphas_cumprod(), sigma_max=min(80.0, float(want[0])))
    torch.testing.assert_close(torch.tensor(seen, dtype=torch.float64), want[:-1], rtol=1e-6, atol=0)


def test_refused_where_they_cannot_apply():
    import fastdiff

    pipe = fastdiff.load("arch:tiny-unet")
    with pytest.raises(BadArgumentError, match="expected at most 1000 steps"):
        pipe.generate(n=1, steps=1001, schedule="simple", progress=False)


def test_the_engine_checks_strength_against_the_grids_steps():
    """ComfyUI's beta grid holds fewer steps than asked (400 -> 387): a strength that leaves none of them fails its
    own request at submit, as generate() would refuse it, not its batch later."""
    import fastdiff

    pytest.importorskip("scipy", reason="schedule 'beta' takes the Beta distribution's quantiles from scipy")
    pipe = fastdiff.load("arch:tiny-unet")
    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    with pytest.raises(BadArgumentError, match="strength"):
        pipe.generate(n=1, steps=400, schedule="beta", image=image, strength=1 / 399, progress=False)
    with fastdiff.Engine(pipe, max_batch=2, max_wait_ms=1) as engine:
        refused = engine.submit(seed=0, steps=400, schedule="beta", image=image, strength=1 / 399)
        assert refused.done() and isinstance(refused.exception(), BadArgumentError)
        kept = engine.submit(seed=0, steps=400, schedule="uniform", image=image, strength=1 / 399)
        assert kept.result(timeout=300).shape == (3, 16, 16)


@pytest.mark.parametrize("steps", [2, 5, 20])
def test_normal_is_uniform_on_a_table_and_exponential_on_an_edm_range(steps):
    """ComfyUI's normal: fastdiff's uniform over a discrete model's table, the exponential grid over an EDM
    model's sigma range (ComfyUI spaces its timestep 0.25 log sigma evenly)."""
    torch.testing.assert_close(get_sigmas("normal", steps, alphas_cumprod=SD_AC),
                               get_sigmas("uniform", steps, alphas_cumprod=SD_AC))
    torch.testing.assert_close(get_sigmas("normal", steps, alphas_cumprod=SD_AC),
                               comfy_grid("normal", steps, ComfyModelSampling()).double(), rtol=2e-5, atol=0)
    torch.testing.assert_close(get_sigmas("normal", steps, sigma_min=0.002, sigma_max=80.0),
                               comfy_grid("normal", steps, ComfyEDMSampling()).double(), rtol=2e-6, atol=0)


FLOW_NAMES = ["simple", "normal", "sgm_uniform", "ddim_uniform", "beta", "kl_optimal"]


@pytest.mark.parametrize("steps", [1, 4, 7, 28])
@pytest.mark.parametrize("name", FLOW_NAMES)
@pytest.mark.parametrize("arch", ["tiny-sd3", "tiny-flux", "tiny-flux-schnell"])
def test_flow_grids_equal_comfyui(arch, name, steps):
    """On a flow model the grids are ComfyUI's over its table of the model's shifted times: SD3 (shift 3, 1000
    times, ModelSamplingDiscreteFlow), FLUX.1 dev (the resolution's mu, 10000 times, ModelSamplingFlux as its
    ModelSamplingFlux node sets it from the image size) and schnell (1000 unshifted times: ComfyUI's FluxSchnell
    is a plain flow model), as the t-frame samplers walk them and, in t / (1 - t), the sigma-frame ones."""
    import fastdiff
    from fastdiff.flow import INFINITE_SIGMA

    if name == "beta":
        pytest.importorskip("scipy", reason="schedule 'beta' takes the Beta distribution's quantiles from scipy")
    if arch == "tiny-flux-schnell":  # (FLUX.1 schnell's scheduler config)
        pipe = fastdiff.load("arch:tiny-flux", scheduler={"_class_name": "FlowMatchEulerDiscreteScheduler",
                                                          "num_train_timesteps": 1000, "shift": 1.0,
                                                          "use_dynamic_shifting": False})
    else:
        pipe = fastdiff.load(f"arch:{arch}")
    size = (16, 24)
    if arch == "tiny-flux":
        model = ComfyFlowSampling(pipe._dynamic_shift_mu(size), flux=True)
    elif arch == "tiny-flux-schnell":
        model = ComfyFlowSampling(1.0)
    else:
        model = ComfyFlowSampling(float(pipe.spec.scheduler["shift"]))
    want = comfy_grid(name, steps, model).double()
    if name == "kl_optimal" and steps == 1:  # (ComfyUI's formula divides by zero: NaN; fastdiff's is [t_max, 0])
        want = torch.tensor([1.0, 0.0], dtype=torch.float64)
    got = pipe.plan(steps, "euler", name, size=size).sigmas
    assert len(got) == len(want)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    plan = pipe.plan(steps, "dpmpp_2m", name, size=size)
    sigma = plan.sigmas
    if float(want[0]) == 1.0:  # (t = 1 is sigma infinity: the sigma frame starts at ComfyUI's percent_to_sigma(1e-4))
        want = want.clone()
        want[0] = float(model.sigma(torch.tensor((1 - 1e-4) * model.multiplier, dtype=torch.float64)))
    assert float(sigma[0]) < INFINITE_SIGMA
    torch.testing.assert_close(sigma / (1 + sigma), want, rtol=1e-6, atol=1e-7)
    # the latents start as ComfyUI's empty latent does: x_t = t0 * noise at the grid's own first time
    t0 = float(pipe.plan(steps, "euler", name, size=size).sigmas[0])
    assert plan.init_noise_sigma == pytest.approx(t0 * (1 + float(sigma[0])), rel=1e-6)


def test_flow_schedules_refuse_what_comfyui_has_no_table_for():
    from fastdiff.errors import UnsupportedConfigError
    from fastdiff.flow_schedulers import named_flow_plan

    with pytest.raises(UnsupportedConfigError, match="shift_terminal"):
        named_flow_plan({"shift": 3.0, "shift_terminal": 0.1}, 6, "euler", "simple")
    with pytest.raises(BadArgumentError, match="expected at most 1000 steps"):
        named_flow_plan({"shift": 3.0}, 1001, "euler", "simple")
    assert len(named_flow_plan({"shift": 3.0}, 1001, "euler", "normal").sigmas) == 1002


def comfy_ays(model_type: str, steps: int) -> torch.Tensor:
    """ComfyUI's AlignYourStepsScheduler.get_sigmas (comfy_extras/nodes_align_your_steps.py) at denoise 1."""
    levels = {"SD1": [14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092,
                      0.9642583904, 0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582],
              "SDXL": [14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141,
                       0.5550693289, 0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582]}[model_type][:]
    if steps + 1 != len(levels):
        xs, ys = np.linspace(0, 1, len(levels)), np.log(levels[::-1])
        levels = np.exp(np.interp(np.linspace(0, 1, steps + 1), xs, ys))[::-1].copy()
    levels = levels[-(steps + 1):]
    levels[-1] = 0
    return torch.FloatTensor(levels)


@pytest.mark.parametrize("steps", [1, 2, 5, 10, 11, 25, 40])
@pytest.mark.parametrize("name,model_type", [("ays", "SD1"), ("ays_sd1", "SD1"), ("ays_sdxl", "SDXL")])
def test_align_your_steps_equals_comfyui(name, model_type, steps):
    torch.testing.assert_close(get_sigmas(name, steps), comfy_ays(model_type, steps).double(), rtol=1e-6, atol=0)


def test_align_your_steps_on_pipelines():
    """``ays`` takes SDXL's list on an SDXL-style UNet and SD 1.x's on another; refused on a model of another sigma
    range (a DDPM table, an EDM network, a flow model)."""
    import fastdiff

    for arch, model_type in (("tiny-sd-unet", "SD1"), ("tiny-sdxl-unet", "SDXL")):
        plan = fastdiff.load(f"arch:{arch}").plan(12, "euler", "ays")
        torch.testing.assert_close(plan.sigmas, comfy_ays(model_type, 12).double(), rtol=1e-6, atol=0)
    assert not torch.equal(comfy_ays("SD1", 12), comfy_ays("SDXL", 12))
    for arch, match in (("tiny-unet", "this model's training table spans 0.0100 .. 157.4073"),
                        ("tiny-sd3", "schedule 'ays' on a flow-matching model")):
        with pytest.raises(BadArgumentError, match=match):
            fastdiff.load(f"arch:{arch}").plan(8, "euler", "ays")
    edm = fastdiff.load("arch:tiny-unet", scheduler={"_class_name": "EDMEulerScheduler", "sigma_min": 0.002,
                                                     "sigma_max": 80.0, "sigma_data": 0.5})
    with pytest.raises(BadArgumentError, match="this network takes EDM's continuous noise levels"):
        edm.plan(8, "euler", "ays")
    # (ComfyUI's normal on an EDM model: even in its timestep 0.25 log sigma, the exponential grid)
    torch.testing.assert_close(edm.plan(8, "euler", "normal").sigmas, get_sigmas("exponential", 8, sigma_min=0.002,
                                                                                 sigma_max=80.0))


def comfy_linear_quadratic(steps: int, sigma_max: float, threshold_noise=0.025) -> torch.Tensor:
    """comfy/samplers.py's linear_quadratic_schedule (from genmoai's Mochi infer.py)."""
    if steps == 1:
        schedule = [1.0, 0.0]
    else:
        linear_steps = steps // 2
        linear = [i * threshold_noise / linear_steps for i in range(linear_steps)]
        diff = linear_steps - threshold_noise * steps
        quadratic_steps = steps - linear_steps
        quadratic_coef = diff / (linear_steps * quadratic_steps ** 2)
        linear_coef = threshold_noise / linear_steps - 2 * diff / (quadratic_steps ** 2)
        const = quadratic_coef * (linear_steps ** 2)
        quadratic = [quadratic_coef * (i ** 2) + linear_coef * i + const for i in range(linear_steps, steps)]
        schedule = [1.0 - x for x in linear + quadratic + [1.0]]
    return torch.FloatTensor(schedule) * torch.tensor(sigma_max, dtype=torch.float32)


@pytest.mark.parametrize("steps", [1, 2, 3, 8, 25])
def test_linear_quadratic_equals_comfyui(steps):
    """On a discrete model (times its top sigma), an EDM range and a flow model (times t = 1)."""
    import fastdiff

    sd_top = float(ComfyModelSampling().sigma_max)
    torch.testing.assert_close(get_sigmas("linear_quadratic", steps, alphas_cumprod=SD_AC),
                               comfy_linear_quadratic(steps, sd_top).double(), rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(get_sigmas("linear_quadratic", steps, sigma_min=0.002, sigma_max=80.0),
                               comfy_linear_quadratic(steps, 80.0).double(), rtol=1e-6, atol=1e-7)
    plan = fastdiff.load("arch:tiny-sd3").plan(steps, "euler", "linear_quadratic")
    torch.testing.assert_close(plan.sigmas, comfy_linear_quadratic(steps, 1.0).double(), rtol=1e-6, atol=1e-7)
