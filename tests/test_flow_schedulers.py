"""Flow-matching schedulers, and beta sigma grids: fastdiff's plans vs the diffusers schedulers themselves.

The harness is ``test_scheduler_parity``'s: the same tiny network and latents on both sides, diffusers 0.3x-0.4x,
max|diff| / max|ref| <= 1e-4 in float32 (observed 6e-8 .. 2e-5; DEIS's 2e-5 is diffusers' float32 arithmetic, see
test_deis_flow_equals_diffusers_in_float64).
"""

import inspect
import logging
import warnings

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

from fastdiff.errors import BadArgumentError  # noqa: E402
from fastdiff.noise import NoiseSource  # noqa: E402
from fastdiff.scheduler_config import plan_from_scheduler_config  # noqa: E402
from test_sampler_order import single_thread  # noqa: F401,E402  (autouse fixture)
from helpers import skip_unless_diffusers_has  # noqa: E402
from test_scheduler_parity import SEEDS, SHAPE, TinyNet  # noqa: E402

FLOW = dict(use_flow_sigmas=True, prediction_type="flow_prediction")
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction")


@torch.no_grad()
def run_diffusers(sched, model, steps, mu=None):
    sched.set_timesteps(steps, **({} if mu is None else {"mu": mu}))
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    x = randn_tensor((len(SEEDS),) + SHAPE, generator=gens) * getattr(sched, "init_noise_sigma", 1.0)
    kw = {"generator": gens} if "generator" in inspect.signature(sched.step).parameters else {}
    for t in sched.timesteps:
        inp = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
        x = sched.step(model(inp, t), t, x, **kw).prev_sample
    return x


def relative_error(cls, steps, config, mu=None):
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    model = TinyNet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = getattr(diffusers, cls)(**config)
        ref = run_diffusers(sched, model, steps, mu)
    plan = plan_from_scheduler_config(dict(sched.config), steps, class_name=cls, mu=mu)
    src = NoiseSource(SEEDS)
    got = plan.sample(plan.make_denoiser(model), src.randn(SHAPE), noise=src)
    return float((got - ref).abs().max() / ref.abs().max()), plan


FLOW_CASES = [
    ("FlowMatchEulerDiscreteScheduler", 10, {}, None),
    ("FlowMatchEulerDiscreteScheduler", 10, dict(shift=3.0), None),          # SD3's shift
    ("FlowMatchEulerDiscreteScheduler", 1, dict(shift=3.0), None),
    ("FlowMatchEulerDiscreteScheduler", 8, dict(use_dynamic_shifting=True), 1.1),   # Flux's resolution shift
    ("FlowMatchEulerDiscreteScheduler", 8, dict(use_dynamic_shifting=True, time_shift_type="linear"), 1.1),
    ("FlowMatchEulerDiscreteScheduler", 8, dict(shift=2.0, shift_terminal=0.1), None),   # LTX-Video
    ("FlowMatchEulerDiscreteScheduler", 8, dict(shift=3.0, use_karras_sigmas=True), None),
    ("FlowMatchEulerDiscreteScheduler", 8, dict(shift=3.0, use_exponential_sigmas=True), None),
    ("FlowMatchEulerDiscreteScheduler", 8, dict(shift=3.0, use_beta_sigmas=True), None),
    ("FlowMatchEulerDiscreteScheduler", 8, dict(shift=3.0, stochastic_sampling=True), None),
    ("FlowMatchLCMScheduler", 4, dict(shift=3.0), None),
    ("FlowMatchLCMScheduler", 2, dict(use_dynamic_shifting=True), 0.9),
    ("FlowMatchHeunDiscreteScheduler", 10, dict(shift=3.0), None),
    ("FlowMatchHeunDiscreteScheduler", 1, {}, None),
    ("DPMSolverMultistepScheduler", 10, dict(FLOW, flow_shift=3.0), None),   # Sana
    ("DPMSolverMultistepScheduler", 10, dict(FLOW, flow_shift=3.0, solver_order=3), None),
    ("DPMSolverMultistepScheduler", 10, dict(FLOW, flow_shift=3.0, algorithm_type="sde-dpmsolver++"), None),
    ("DPMSolverMultistepScheduler", 10, dict(FLOW, final_sigmas_type="sigma_min", use_dynamic_shifting=True), 0.8),
    ("DPMSolverSinglestepScheduler", 10, dict(FLOW, flow_shift=3.0, solver_order=3), None),
    ("DPMSolverSinglestepScheduler", 9, dict(FLOW, flow_shift=2.0), None),
    ("DEISMultistepScheduler", 10, dict(FLOW, flow_shift=3.0), None),
    ("DEISMultistepScheduler", 10, dict(FLOW, flow_shift=3.0, solver_order=3), None),
    ("UniPCMultistepScheduler", 10, dict(FLOW, flow_shift=3.0), None),      # Wan
    ("UniPCMultistepScheduler", 10, dict(FLOW, solver_order=3, final_sigmas_type="sigma_min"), None),
    ("UniPCMultistepScheduler", 10, dict(FLOW, use_dynamic_shifting=True, shift_terminal=0.05), 0.7),
]


@pytest.mark.parametrize("cls,steps,config,mu", FLOW_CASES)
def test_flow_scheduler_parity(cls, steps, config, mu):
    skip_unless_diffusers_has(cls, config)
    err, plan = relative_error(cls, steps, config, mu)
    assert err <= 1e-4, f"{cls} {config}: relative error {err:.2e}"
    assert plan.denoiser_kind == "flow"


BETA_CLASSES = ["EulerDiscreteScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler",
                "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler",
                "LMSDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler"]


@pytest.mark.parametrize("cls", BETA_CLASSES)
@pytest.mark.parametrize("steps,config", [(8, {}), (5, SD)])
def test_beta_sigmas_parity(cls, steps, config):
    """use_beta_sigmas (Lee et al. 2024's Beta(0.6, 0.6) grid): before, refused everywhere."""
    pytest.importorskip("scipy", reason="diffusers' beta sigmas need scipy")
    err, _ = relative_error(cls, steps, dict(use_beta_sigmas=True, **config))
    assert err <= 1e-4, f"{cls} {config}: relative error {err:.2e}"


@pytest.mark.parametrize("config,mu,match", [
    (dict(_class_name="FlowMatchEulerDiscreteScheduler", use_dynamic_shifting=True), None, "needs the resolution"),
    (dict(_class_name="UniPCMultistepScheduler", use_dynamic_shifting=True, **FLOW), None, "needs the resolution"),
    (dict(_class_name="FlowMatchEulerDiscreteScheduler", shift=3.0), 1.0, "takes no mu"),
    (dict(_class_name="DDIMScheduler"), 0.5, "takes no mu"),
    (dict(_class_name="FlowMatchEulerDiscreteScheduler", use_dynamic_shifting=True), float("nan"), "finite"),
])
def test_mu_is_checked(config, mu, match):
    with pytest.raises(BadArgumentError, match=match):
        plan_from_scheduler_config(config, 4, mu=mu)


def test_flow_plan_frames():
    """FlowMatchEuler runs Euler in the t frame from pure noise (t = 1, latents as they are); its stochastic
    variant and the solvers run in the sigma frame, whose t = 1 is the 1e10 stand-in for infinity."""
    euler = plan_from_scheduler_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}, 4)
    assert euler.sampler == "euler" and euler.denoiser_options["frame"] == "t"
    assert float(euler.sigmas[0]) == 1.0 and float(euler.sigmas[-1]) == 0.0 and euler.init_noise_sigma == 1.0
    lcm = plan_from_scheduler_config({"_class_name": "FlowMatchEulerDiscreteScheduler",
                                      "stochastic_sampling": True}, 4)
    assert lcm.sampler == "lcm" and lcm.denoiser_options["frame"] == "sigma"
    assert float(lcm.sigmas[0]) == 1e10 and lcm.init_noise_sigma == 1 + 1e10
    dpm = plan_from_scheduler_config({"_class_name": "DPMSolverMultistepScheduler", **FLOW}, 4)
    assert dpm.sampler == "dpmpp_2m" and float(dpm.sigmas[0]) < 1e4   # its grid starts below t = 1
    # diffusers feeds the solvers int64 timesteps: t * 1000 truncated
    assert all(t == int(t) for t in dpm.denoiser_options["timesteps"].values())


@pytest.mark.parametrize("cls,config,steps,mu", [
    ("FlowMatchEulerDiscreteScheduler", dict(shift=2.0, shift_terminal=0.1), 1, None),     # 0 / 0
    ("FlowMatchEulerDiscreteScheduler", dict(shift_terminal=1.0), 6, None),                # every time 1
    ("FlowMatchEulerDiscreteScheduler", dict(use_dynamic_shifting=True, time_shift_type="linear"), 4, 0.0),
    ("FlowMatchEulerDiscreteScheduler", dict(use_dynamic_shifting=True), 4, 800.0),       # e^800 overflows
    ("FlowMatchEulerDiscreteScheduler", dict(shift=-1.0), 4, None),
    ("UniPCMultistepScheduler", dict(FLOW, shift_terminal=0.1), 1, None),
    ("UniPCMultistepScheduler", dict(FLOW, flow_shift=-2.0), 4, None),
])
def test_degenerate_flow_grids_are_refused(cls, config, steps, mu):
    """Shift settings that give NaN, rising or flat flow times were a NaN grid (a sample-time error about NaN
    sigmas), a raw OverflowError or five wasted network calls: now a BadArgumentError naming the settings."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")                    # and no numpy warning on the way
        with pytest.raises(BadArgumentError, match="shift|mu"):
            plan_from_scheduler_config({"_class_name": cls, **config}, steps, mu=mu)


@pytest.mark.parametrize("steps,train_steps", [(4, 1000), (5, 4000)])
def test_deis_flow_equals_diffusers_in_float64(steps, train_steps):
    """DEIS with flow sigmas at few steps is 1.2e-4 (T = 1000) to 5e-4 (T = 4000) off diffusers' float32 run. That
    is diffusers' own float32 error: its run in float64 (network and sigmas) is as far from its float32 run, and
    fastdiff in float32 is 1.5e-7 from that float64 run."""
    import numpy as np

    config = dict(FLOW, flow_shift=3.0, num_train_timesteps=train_steps)
    sched = diffusers.DEISMultistepScheduler(**config)
    sched.set_timesteps(steps)
    ramp = 1 - np.linspace(1, 1 / train_steps, steps + 1)
    t = np.flip(3.0 * ramp / (1 + 2.0 * ramp))[:-1].copy()
    sched.sigmas = torch.from_numpy(np.concatenate([t, t[-1:]]))          # the exact grid, in float64
    model = TinyNet()
    model64 = TinyNet().double()
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    x = randn_tensor((len(SEEDS),) + SHAPE, generator=gens).double()
    with torch.no_grad():
        for ts in sched.timesteps:
            x = sched.step(model64(x, ts), ts, x).prev_sample
    plan = plan_from_scheduler_config(config, steps, class_name="DEISMultistepScheduler")
    src = NoiseSource(SEEDS)
    got = plan.sample(plan.make_denoiser(model), src.randn(SHAPE), noise=src).double()
    assert float((got - x).abs().max() / x.abs().max()) < 1e-6
