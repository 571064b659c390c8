"""Flow-matching networks: the FlowDenoiser's two frames, every sampler on an exact flow, and a diffusers folder
with a flow-matching scheduler through ``fastdiff.load(...).generate()`` against diffusers' own loop."""

import math

import numpy as np
import pytest
import torch

from fastdiff.errors import BadArgumentError
from fastdiff.flow import REFUSED, FlowDenoiser, dynamic_shift_mu, frame_for, t_to_sigma
from fastdiff.flow_schedulers import named_flow_plan
from fastdiff.noise import NoiseSource
from fastdiff.samplers import SAMPLERS, STOCHASTIC
from test_sampler_order import single_thread  # noqa: F401  (autouse fixture)
from helpers import perturb_, skip_unless_diffusers_has

DATA_STD = 0.5


def gaussian_velocity(x_t, timestep, **_):
    """The exact velocity of the flow from N(0, DATA_STD^2) data: v = (x_t - E[x0 | x_t]) / t."""
    t = (timestep.to(torch.float64) / 1000).reshape(-1, *([1] * (x_t.ndim - 1))).to(x_t.dtype)
    x0 = (1 - t) * DATA_STD ** 2 / ((1 - t) ** 2 * DATA_STD ** 2 + t ** 2) * x_t
    return (x_t - x0) / t


def conv_velocity():
    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 3, 3, padding=1)

    def model(x, timestep, **_):
        return torch.tanh(net(x)) + 1e-3 * timestep.reshape(-1, 1, 1, 1)
    return model


# --------------------------------------------------------------------------------------------------
# the denoiser
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("t", [0.03, 0.5, 0.97])
def test_frames_give_the_same_x0(t):
    """The same flow state in the t frame (x_t at sigma = t) and the sigma frame (x_t / (1 - t) at t / (1 - t))
    has one x0 = x_t - t v; the tensor path (``predict``) equals the host path (``denoise_at``)."""
    model = conv_velocity()
    x_t = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    s = t / (1 - t)
    in_t = FlowDenoiser(model, "t").denoise_at(x_t, t)
    in_sigma = FlowDenoiser(model, "sigma").denoise_at(x_t * (1 + s), s)
    want = x_t - t * model(x_t, torch.full((2,), t * 1000))
    torch.testing.assert_close(in_t, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(in_sigma, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(FlowDenoiser(model, "sigma")(x_t * (1 + s), torch.tensor([s, s])), want,
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(FlowDenoiser(model, "t")(x_t, torch.tensor(t)), want, rtol=0, atol=1e-6)


def test_c_skip_and_learned_variance():
    """x0 = c_skip x + c_out v (what guidance_rescale reads); a 2C-channel output keeps its first C channels."""
    model = conv_velocity()

    def with_variance(x, ts, **_):
        return torch.cat([model(x, ts), torch.full_like(x, 7.0)], dim=1)
    x = torch.randn(1, 3, 4, 4)
    for frame, sigma in (("t", 0.4), ("sigma", 2.0)):
        d = FlowDenoiser(with_variance, frame)
        t = d.flow_time(sigma)
        v = model(x * d.c_skip(sigma), torch.full((1,), t * 1000))
        torch.testing.assert_close(d.denoise_at(x, sigma), d.c_skip(sigma) * x - t * v, rtol=0, atol=1e-6)


def test_timesteps_map_and_infinite_sigma():
    """A plan's {sigma: timestep} is what the network is fed; t = 1 is the 1e10 stand-in, fed timestep 1000."""
    seen = []

    def model(x, ts, **_):
        seen.append(float(ts[0]))
        return torch.zeros_like(x)
    d = FlowDenoiser(model, "sigma", timesteps={3.0: 749.0})
    d.denoise_at(torch.ones(1, 1, 2, 2), 3.0)
    d.denoise_at(torch.ones(1, 1, 2, 2), t_to_sigma(1.0))
    assert seen == [749.0, 1000.0]
    with pytest.raises(BadArgumentError, match="frame"):
        FlowDenoiser(model, "vp")


@pytest.mark.parametrize("sampler", sorted(REFUSED))
def test_refused_samplers_say_why(sampler):
    with pytest.raises(BadArgumentError, match="flow-matching"):
        frame_for(sampler)


def test_dynamic_shift_mu_is_diffusers_calculate_shift():
    """The Flux / SD3 pipelines' calculate_shift: 0.5 at 256 tokens, 1.15 at 4096, linear between."""
    assert dynamic_shift_mu(256) == pytest.approx(0.5) and dynamic_shift_mu(4096) == pytest.approx(1.15)
    assert dynamic_shift_mu(1024) == pytest.approx(0.63)


# --------------------------------------------------------------------------------------------------
# every sampler on the exact flow of Gaussian data
# --------------------------------------------------------------------------------------------------

FLOW_SAMPLERS = sorted(set(SAMPLERS) - set(REFUSED))
DETERMINISTIC = [s for s in FLOW_SAMPLERS if s not in STOCHASTIC]


def run_named(sampler, steps, noise, shift=3.0, **options):
    plan = named_flow_plan({"shift": shift}, steps, sampler)
    from fastdiff.sampling import sample
    x = sample(plan.make_denoiser(gaussian_velocity, dtype=torch.float64), noise * plan.init_noise_sigma,
               plan.sampler, plan.sigmas, noise=NoiseSource(list(range(noise.shape[0]))), **options)
    return x * plan.output_scale


@pytest.mark.parametrize("sampler", DETERMINISTIC)
def test_deterministic_samplers_follow_the_flow(sampler):
    """The probability-flow ODE maps noise n to DATA_STD * n exactly for Gaussian data: every deterministic
    sampler, in its frame and on its grid, gets there, and closer with more steps. A wrong frame, start scaling
    or output scaling misses by O(1)."""
    noise = torch.randn(4, 1, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    errors = [float((run_named(sampler, n, noise) - DATA_STD * noise).abs().max()) for n in (10, 40)]
    assert errors[1] < 0.1 and errors[1] < errors[0] / 2, errors   # (observed 7e-4 .. 0.08 at 40 steps)


@pytest.mark.parametrize("sampler", ["ddpm", "euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde", "dpmpp_sde",
                                     "dpmpp_2s_ancestral"])
def test_stochastic_samplers_draw_the_data_distribution(sampler):
    """Ancestral / SDE samplers in the sigma frame re-noise along the flow path: on Gaussian data their samples
    get the data's std at 100 steps (observed 0.475 .. 0.511 for 0.5; at 10 steps 0.32 .. 0.44, the few-step
    under-dispersion of ancestral sampling). (lcm, a consistency sampler, under-disperses whatever the steps.)"""
    noise = torch.randn(4000, 1, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x = run_named(sampler, 100, noise)
    assert float(x.std()) == pytest.approx(DATA_STD, rel=0.06)


def test_named_grids():
    """Named t-frame samplers run even steps in t from 1 to 0 (shifted); sigma-frame ones the solvers' flow grid
    (equal to diffusers' UniPC / DPM-Solver flow grid); leading / trailing spacings are refused (no training
    table). generate() with no sampler keeps the scheduler's own grid."""
    from fastdiff.flow import shift_times
    from fastdiff.scheduler_config import plan_from_scheduler_config

    got = named_flow_plan({"flow_shift": 3.0}, 7, "euler")
    want = np.append(shift_times(np.linspace(1, 0, 8)[:-1], 3.0).astype(np.float32), 0.0)
    torch.testing.assert_close(got.sigmas, torch.from_numpy(want))
    assert got.denoiser_options["timesteps"][float(got.sigmas[1])] == pytest.approx(1000 * float(got.sigmas[1]))
    # the solvers' flow grid: from one training step below t = 1 (sigma = 2997 at shift 3), in sigma units
    for schedule in (None, "karras"):
        solver = named_flow_plan({"shift": 3.0}, 7, "dpmpp_2m", schedule)
        assert solver.denoiser_options["frame"] == "sigma" and float(solver.sigmas[0]) == pytest.approx(2997, rel=1e-3)
    dpm = plan_from_scheduler_config({"_class_name": "DPMSolverMultistepScheduler", "use_flow_sigmas": True,
                                      "prediction_type": "flow_prediction", "flow_shift": 3.0}, 7)
    torch.testing.assert_close(named_flow_plan({"flow_shift": 3.0}, 7, "unipc").sigmas, dpm.sigmas)
    karras = named_flow_plan({"shift": 3.0}, 7, "heun", "karras")
    assert float(karras.sigmas[0]) == 1.0 and float(karras.sigmas[-2]) == pytest.approx(float(got.sigmas[-2]))
    with pytest.raises(BadArgumentError, match="leading / trailing / linspace space a discrete-time"):
        named_flow_plan({}, 7, "euler", "trailing")


# --------------------------------------------------------------------------------------------------
# a diffusers folder with a flow-matching scheduler, end to end
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def flow_unet(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                                 layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=32)
    perturb_(unet)
    return unet


def make_folder(tmp_path, unet, scheduler):
    unet.save_pretrained(tmp_path / "unet")
    scheduler.save_pretrained(tmp_path / "scheduler")
    return str(tmp_path)


@torch.no_grad()
def diffusers_loop(unet, scheduler, steps, seeds, mu=None, sigmas=None):
    from diffusers.utils.torch_utils import randn_tensor

    if sigmas is not None:  # a grid of flow times given as it is (the scheduler's shift 1)
        scheduler.set_timesteps(sigmas=sigmas)
    else:
        scheduler.set_timesteps(steps, **({} if mu is None else {"mu": mu}))
    x = randn_tensor((len(seeds), 3, 8, 8), generator=[torch.Generator().manual_seed(s) for s in seeds])
    for t in scheduler.timesteps:
        x = scheduler.step(unet(x, t).sample, t, x).prev_sample
    return x


FOLDER_CASES = [
    ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0), 1),
    ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0), 6),
    ("FlowMatchEulerDiscreteScheduler", dict(use_dynamic_shifting=True, base_image_seq_len=16,
                                             max_image_seq_len=256), 5),
    ("FlowMatchHeunDiscreteScheduler", dict(shift=2.0), 4),
    ("DPMSolverMultistepScheduler", dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0), 6),
    ("UniPCMultistepScheduler", dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0), 6),
]


@pytest.mark.parametrize("cls,config,steps", FOLDER_CASES)
def test_flow_folder_equals_diffusers(flow_unet, tmp_path, cls, config, steps):
    """fastdiff.load(folder).generate(seeds=...) equals diffusers' scheduler loop on the same UNet, seed for seed.
    With use_dynamic_shifting the Pipeline computes mu from the latent's token count (8 x 8 = 64 here), as the
    Flux / SD3 pipelines do."""
    import diffusers

    import fastdiff

    skip_unless_diffusers_has(cls, config)
    scheduler = getattr(diffusers, cls)(**config)
    pipe = fastdiff.load(make_folder(tmp_path, flow_unet, scheduler))
    assert pipe.spec.prediction_type == "flow_prediction"
    mu = dynamic_shift_mu(64, 16, 256) if config.get("use_dynamic_shifting") else None
    want = diffusers_loop(flow_unet, scheduler, steps, [5, 6], mu)
    got = pipe.generate(seeds=[5, 6], steps=steps, progress=False)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


def test_named_samplers_on_a_flow_folder(flow_unet, tmp_path):
    """Every sampler but the refused ones runs on a flow-matching folder (finite, and the 2nd-order ones near
    the 40-step Euler result); a refused one says why."""
    import diffusers

    import fastdiff

    pipe = fastdiff.load(make_folder(tmp_path, flow_unet, diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)))
    ref = pipe.generate(seeds=[1], steps=40, sampler="euler", progress=False)
    for sampler in FLOW_SAMPLERS:
        out = pipe.generate(seeds=[1], steps=12, sampler=sampler, progress=False)
        assert torch.isfinite(out).all(), sampler
        if sampler in ("heun", "dpmpp_2m", "unipc", "dpm_solver", "deis"):
            assert float((out - ref).abs().max()) < 0.1 * float(ref.abs().max()), sampler
    with pytest.raises(BadArgumentError, match="tcd"):
        pipe.generate(seeds=[1], steps=4, sampler="tcd", progress=False)


@pytest.mark.parametrize("schedule", ["simple", "normal", "beta"])
def test_euler_on_comfyuis_schedules_is_flowmatch_euler_on_that_grid(flow_unet, tmp_path, schedule):
    """ComfyUI's "euler" + a schedule on a flow model (shift 3): diffusers' FlowMatchEuler stepping the same flow
    times (its set_timesteps(sigmas=...) at shift 1) gives the same samples; ComfyUI's Euler on a CONST model is
    that step. The grid itself is checked against ComfyUI's code in tests/test_comfy_schedules.py."""
    import diffusers

    import fastdiff

    if schedule == "beta":
        pytest.importorskip("scipy", reason="schedule 'beta' takes the Beta distribution's quantiles from scipy")
    pipe = fastdiff.load(make_folder(tmp_path, flow_unet, diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)))
    grid = pipe.plan(6, "euler", schedule).sigmas
    assert float(grid[0]) == 1.0 and float(grid[-1]) == 0.0
    want = diffusers_loop(flow_unet, diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0), None, [5, 6],
                          sigmas=grid[:-1].float().numpy())
    got = pipe.generate(seeds=[5, 6], steps=6, sampler="euler", schedule=schedule, progress=False)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    other = pipe.generate(seeds=[5, 6], steps=6, sampler="euler", progress=False)  # (the grids differ: so do these)
    assert float((other - got).abs().max()) > 1e-3
    for sampler in ("dpmpp_2m", "euler_ancestral", "heun"):  # from t = 1 in either frame: finite
        assert torch.isfinite(pipe.generate(seeds=[5], steps=6, sampler=sampler, schedule=schedule,
                                            progress=False)).all(), sampler


def test_prediction_type_override_gives_a_flow_scheduler():
    """load(..., prediction_type="flow_prediction") on a checkpoint with a beta schedule: the schedule becomes
    FlowMatchEuler's (a beta table means nothing to a flow network), and generate() runs its Euler."""
    import fastdiff

    pipe = fastdiff.load("arch:tiny-sd-unet", prediction_type="flow_prediction")
    assert pipe.spec.scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    plan = pipe.plan(4)
    assert plan.sampler == "euler" and plan.denoiser_kind == "flow" and math.isclose(float(plan.sigmas[0]), 1.0)


def test_prediction_type_must_agree_with_a_flow_scheduler(flow_unet, tmp_path):
    """A flow folder loaded with prediction_type="epsilon" ran the default plan as a velocity model and named
    samplers as epsilon on a beta table it does not have: refused. So is a solver config with use_flow_sigmas
    whose prediction type is not flow_prediction."""
    import diffusers

    import fastdiff

    folder = make_folder(tmp_path, flow_unet, diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
    with pytest.raises(BadArgumentError, match="flow-matching scheduler"):
        fastdiff.load(folder, prediction_type="epsilon")
    pipe = fastdiff.load(folder, scheduler={"_class_name": "DPMSolverMultistepScheduler", "use_flow_sigmas": True,
                                            "prediction_type": "epsilon"})
    with pytest.raises(Exception, match="prediction_type"):
        pipe.generate(seeds=[1], steps=4, sampler="euler", progress=False)


def test_named_solver_grid_keeps_shift_terminal_and_none_settings():
    """The sigma-frame grid of a named sampler ends at shift_terminal as the t-frame one does (it was dropped);
    None settings, which diffusers' signature allows, fall back to the defaults."""
    for sampler in ("euler", "dpmpp_2m"):
        plan = named_flow_plan({"shift": 2.0, "shift_terminal": 0.1}, 6, sampler)
        assert plan.denoiser_options["frame"] == frame_for(sampler)
        assert plan.denoiser_kind == "flow"
        last = float(plan.sigmas[-2])
        assert (last if frame_for(sampler) == "t" else last / (1 + last)) == pytest.approx(0.1, rel=1e-5)
    torch.testing.assert_close(named_flow_plan({"shift": None, "flow_shift": 3.0}, 5, "euler").sigmas,
                               named_flow_plan({"shift": 3.0}, 5, "euler").sigmas)


# --------------------------------------------------------------------------------------------------
# SiT checkpoints: official-DiT files with SiT's time convention
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_sit_checkpoint_follows_sits_euler_ode(cfg_scale):
    """An official-DiT file loaded with SIT_SCHEDULER samples as SiT's own ODE sampler does. SiT (willisma/SiT,
    transport/): x_t = t data + (1 - t) noise, the network takes t itself and predicts data - noise, Euler from
    t = 0 to 1 on linspace(0, 1, N + 1); forward_with_cfg guides the first 3 channels. The reference loop below is
    that sampler, transcribed, on the same network (fastdiff's DiT equals the official one: test_dit.py);
    generate(steps=N) with no sampler runs it, timesteps included."""
    import fastdiff
    from conftest import fixture_path
    from fastdiff.checkpoints.presets import SIT_SCHEDULER

    pipe = fastdiff.load(fixture_path("dit", "dit_tiny.pt"), num_heads=4, scheduler=SIT_SCHEDULER)
    assert pipe.spec.prediction_type == "flow_prediction" and pipe.spec.guided_channels == 3
    steps, seeds, labels = 6, [3, 4], [1, 7]
    noise = NoiseSource(seeds).randn((4, 8, 8))
    y = torch.tensor(labels)
    x = noise.clone()
    ts = torch.linspace(0, 1, steps + 1)
    with torch.no_grad():
        for i in range(steps):
            t = ts[i].expand(2)
            if cfg_scale == 1.0:
                v = pipe.model(x, t, class_labels=y)[:, :4]
            else:
                null = torch.full_like(y, 10)
                out = pipe.model(torch.cat([x, x]), torch.cat([t, t]), class_labels=torch.cat([y, null]))
                cond, uncond = out[:2, :4], out[2:, :4]
                v = torch.cat([uncond[:, :3] + cfg_scale * (cond[:, :3] - uncond[:, :3]), cond[:, 3:]], dim=1)
            x = x + (ts[i + 1] - ts[i]) * v
    plan = pipe.plan(steps)                        # generate()'s default: SiT's own Euler grid, in diffusers' t
    torch.testing.assert_close(plan.sigmas, torch.linspace(1, 0, steps + 1, dtype=torch.float64))
    assert list(plan.denoiser_options["timesteps"].values()) == pytest.approx(ts[:-1].tolist())   # SiT's t itself
    got = pipe.generate(seeds=seeds, class_labels=labels, cfg_scale=cfg_scale, steps=steps, progress=False)
    torch.testing.assert_close(got, x, rtol=0, atol=2e-5)


# --------------------------------------------------------------------------------------------------
# the runtime: captured loops, the Engine, ONNX
# --------------------------------------------------------------------------------------------------

FLOW_DIT = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}


@pytest.mark.parametrize("scope", ["step", "loop"])
@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m", "euler_ancestral"])
def test_flow_dit_in_captured_graphs_equals_eager(scope, sampler):
    """A flow DiT under cuda_graphs (a stand-in graph on the CPU) equals eager in both frames. In a captured loop
    with precompute_adaln every call's modulation comes from the one matmul: the FlowDenoiser hands the network
    the same cached timestep tensors on every run, which is how the schedule recognises its calls."""
    import fastdiff
    from test_graph_scopes import FakeGraph
    from test_modulation_schedule import _count

    eager = fastdiff.load("arch:tiny-dit", scheduler=FLOW_DIT)
    perturb_(eager.model, seed=3, std=0.2)
    graphed = fastdiff.load("arch:tiny-dit", scheduler=FLOW_DIT)
    graphed.model.load_state_dict(eager.model.state_dict())
    graphed.optimize(cuda_graphs=True, graph_scope=scope, fuse_adaln=True, precompute_adaln=scope == "loop",
                     batch_buckets=(1, 2, 4), graph_factory=FakeGraph)
    per_call = _count(graphed.model, "fused_modulation")
    kw = dict(steps=4, sampler=sampler, cfg_scale=3.0, progress=False)
    for seeds, labels in (([1, 2, 3], [0, 4, 9]), ([5, 6, 7], [1, 2, 3])):
        per_call.clear()
        want = eager.generate(seeds=seeds, class_labels=labels, **kw)
        got = graphed.generate(seeds=seeds, class_labels=labels, **kw)
        torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    if scope == "loop":
        assert graphed.precompute_adaln and per_call == []   # the second batch: a replay through the schedule


def test_engine_and_onnx_on_a_flow_model(flow_unet, tmp_path):
    """The Engine's sample for a seed equals generate(seeds=[seed]) on a dynamically shifted flow folder (mu
    from the request's size), and an exported model.onnx samples as the PyTorch network does."""
    import diffusers

    import fastdiff

    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=16,
                                                          max_image_seq_len=256)
    pipe = fastdiff.load(make_folder(tmp_path / "f", flow_unet, scheduler))
    solo = [pipe.generate(seeds=[s], steps=3, height=h, width=h, progress=False)[0] for s, h in ((1, 8), (2, 16))]
    assert pipe.plan(3, size=(8, 8)).sigmas.tolist() != pipe.plan(3, size=(16, 16)).sigmas.tolist()
    with fastdiff.Engine(pipe, max_batch=4, max_wait_ms=5) as engine:
        futures = [engine.submit(seed=s, steps=3, height=h, width=h) for s, h in ((1, 8), (2, 16))]
        for future, want in zip(futures, solo):
            torch.testing.assert_close(future.result(timeout=60), want, rtol=0, atol=1e-5)
    pytest.importorskip("onnxruntime", reason="the ONNX path needs onnxruntime")
    from fastdiff.export.onnx import export_onnx

    result = export_onnx(pipe, None, str(tmp_path / "unet.onnx"), progress=False)
    onnx_pipe = fastdiff.load(result.path)
    assert onnx_pipe.spec.prediction_type == "flow_prediction"
    torch.testing.assert_close(onnx_pipe.generate(seeds=[1], steps=3, progress=False)[0], solo[0], rtol=0, atol=1e-4)


def test_tensor_path_at_t_equal_1():
    """``predict`` (the path of callers without denoise_at) at the t = 1 stand-in: 1 - t rounds to 0 in float32,
    which zeroed x_t (2.2 off ``denoise_at`` on a test network); 1 / (1 + sigma) is taken from float64 now."""
    model = conv_velocity()
    d = FlowDenoiser(model, "sigma")
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2)) * (1 + t_to_sigma(1.0))
    torch.testing.assert_close(d(x, torch.full((2,), t_to_sigma(1.0))), d.denoise_at(x, t_to_sigma(1.0)),
                               rtol=0, atol=1e-5)


def test_flow_lcm_checkpoint_keeps_its_grid_for_lcm():
    """A FlowMatchLCM checkpoint is a flow model; sampler="lcm" on it runs the scheduler's own grid (the one it was
    distilled on), as generate() with no sampler does; another sampler gets the named grid."""
    import fastdiff
    from fastdiff.scheduler_config import plan_from_scheduler_config

    scheduler = {"_class_name": "FlowMatchLCMScheduler", "shift": 3.0}
    pipe = fastdiff.load("arch:tiny-dit", scheduler=scheduler)
    assert pipe.spec.prediction_type == "flow_prediction"
    want = plan_from_scheduler_config(scheduler, 4)
    for sampler in (None, "lcm"):
        plan = pipe.plan(4, sampler)
        assert plan.sampler == "lcm" and plan.scheduler == "FlowMatchLCMScheduler"
        torch.testing.assert_close(plan.sigmas, want.sigmas)
    assert pipe.plan(4, "euler").scheduler == "named"


def test_every_deterministic_sampler_on_comfyuis_simple_schedule_lands_near_the_flow():
    """On tiny-sd3 at 8 steps of ComfyUI's "simple" grid, each deterministic sampler ends within 0.3 of a 200-step
    Euler run (outputs up to ~4.5; observed 0.04 .. 0.22), in either frame: the sigma frame starts one offset below
    t = 1, not at sigma infinity. DPM fast spends its even-in-lambda steps over the grid's ends, most of them at high
    noise: it is left out (1.8 off)."""
    import fastdiff
    from fastdiff.cfg_pp import CFG_PP_SAMPLERS
    from fastdiff.sampling import SAMPLERS, STOCHASTIC

    pipe = fastdiff.load("arch:tiny-sd3")
    g = torch.Generator().manual_seed(0)
    kw = dict(encoder_hidden_states=torch.randn(1, 4, pipe.spec.cross_attention_dim, generator=g),
              text_embeds=torch.randn(1, pipe.spec.text_embeds_dim, generator=g), seeds=[1], progress=False)
    ref = pipe.generate(steps=200, sampler="euler", **kw)
    skipped = set(STOCHASTIC) | set(REFUSED) | set(CFG_PP_SAMPLERS) | {"dpm_fast"}
    errors = {s: float((pipe.generate(steps=8, sampler=s, schedule="simple", **kw) - ref).abs().max())
              for s in sorted(set(SAMPLERS) - skipped)}
    assert max(errors.values()) < 0.3, errors
