"""DDPM with a learned variance (guided-diffusion / DiT ``learn_sigma`` networks; diffusers' ``variance_type``
"learned_range" / "learned"), and guided-diffusion's respacing ("N" and "ddimN") and DDIM.

The references: diffusers' ``DDPMScheduler`` (its "learned" reading; "learned_range" is in test_scheduler_parity),
and a float64 transcription of guided-diffusion's respaced ``p_sample`` (``SpacedDiffusion``: the kept timesteps'
betas, the clipped posterior log-variance, the learned-range interpolation), which is what official DiT's
``sample.py`` runs. Both draw the same noise as fastdiff (``NoiseSource``), step by step.
"""

import math

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff.denoiser import CFGDenoiser, DiscreteDenoiser, EDMDenoiser
from fastdiff.errors import BadArgumentError
from fastdiff.noise import NoiseSource
from fastdiff.samplers import sample_ddpm
from fastdiff.scheduler_config import plan_from_scheduler_config
from fastdiff.schedules import get_timesteps, make_alphas_cumprod, respaced_timesteps
from test_scheduler_parity import SEEDS, SHAPE, TinyNet, run_fastdiff
from test_sampler_order import single_thread  # noqa: F401  (autouse fixture)


def _official_space_timesteps(T: int, count: int) -> list:
    """guided-diffusion's ``space_timesteps(T, [count])``, one section: the kept timesteps as a sorted list."""
    stride = (T - 1) / (count - 1) if count > 1 else 1
    cur, taken = 0.0, set()
    for _ in range(count):
        taken.add(round(cur))
        cur += stride
    return sorted(taken)


@pytest.mark.parametrize("n", [1, 2, 10, 21, 23, 250, 999, 1000])
def test_respaced_timesteps_are_guided_diffusions(n):
    ts = respaced_timesteps(n, 1000)
    assert ts.tolist() == _official_space_timesteps(1000, n)[::-1]
    if n == 21:  # where diffusers' 'linspace' (np.linspace(...).round()) keeps another timestep
        assert ts.tolist() != get_timesteps("linspace", n, 1000).tolist()


def _official_ddim_stride_timesteps(T: int, count: int) -> list:
    """guided-diffusion's ``space_timesteps(T, "ddim<count>")``: the smallest stride giving exactly ``count``."""
    for i in range(1, T):
        if len(range(0, T, i)) == count:
            return list(range(0, T, i))
    raise ValueError(count)


@pytest.mark.parametrize("n", [2, 3, 7, 10, 30, 1000])
def test_ddim_respacing_is_guided_diffusions(n):
    assert respaced_timesteps(n, 1000, ddim=True).tolist() == _official_ddim_stride_timesteps(1000, n)[::-1]
    if n == 30:  # diffusers' 'leading' strides 1000 // 30 = 33; guided-diffusion needs 34 for exactly 30
        assert respaced_timesteps(n, 1000, ddim=True).tolist() != get_timesteps("leading", n, 1000).tolist()
    with pytest.raises(BadArgumentError, match="ddim999.*the 'N' respacing takes any"):
        respaced_timesteps(999, 1000, ddim=True)


def test_respacing_key_is_ddpms_and_ddims_only():
    with pytest.raises(fastdiff.errors.UnsupportedConfigError, match="timestep_respacing"):
        plan_from_scheduler_config({"_class_name": "EulerDiscreteScheduler", "timestep_respacing": "guided-diffusion"},
                                   10)
    with pytest.raises(fastdiff.errors.UnsupportedConfigError, match="timestep_respacing"):
        plan_from_scheduler_config({"_class_name": "DDPMScheduler", "timestep_respacing": "ddim"}, 10)


def _guided_diffusion_ddim_loop(model, timesteps: list, x: torch.Tensor, clip: bool, cond_fn=None):
    """A float64 transcription of guided-diffusion's ``ddim_sample_loop`` (eta 0) on the kept ``timesteps``
    (ascending): x0 from eps (clipped to [-1, 1] with ``clip_denoised``), eps recomputed from that x0, then
    x' = sqrt(a') x0 + sqrt(1 - a') eps; a' = 1 after the last step. ``cond_fn(x, t)``: classifier guidance's
    gradient, by ``condition_score`` (eps - sqrt(1 - a) g, x0 from that eps, not clipped again)."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    ac_full = np.cumprod(1.0 - betas)
    acp = ac_full[timesteps]
    x = x.double()
    for i in reversed(range(len(timesteps))):
        a, a_prev = acp[i], (acp[i - 1] if i > 0 else 1.0)
        with torch.no_grad():
            eps = model(x.float(), timesteps[i]).double()
        x0 = math.sqrt(1 / a) * x - math.sqrt(1 / a - 1) * eps
        if clip:
            x0 = x0.clamp(-1, 1)
        eps = (math.sqrt(1 / a) * x - x0) / math.sqrt(1 / a - 1)
        if cond_fn is not None:
            eps = eps - math.sqrt(1 - a) * cond_fn(x.float(), timesteps[i]).double()
            x0 = math.sqrt(1 / a) * x - math.sqrt(1 / a - 1) * eps
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    return x


@pytest.mark.parametrize("steps,clip", [(30, True), (7, False)])
def test_respaced_ddim_matches_guided_diffusion(steps, clip):
    """DDIMScheduler with timestep_respacing="guided-diffusion-ddim": guided-diffusion's ddim_sample_loop (what a
    guided-diffusion checkpoint runs by default), its clipped x0 giving the eps of the step."""
    net = TinyNet(3)
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(5))
    ref = _guided_diffusion_ddim_loop(lambda x, t: net(x, torch.tensor([float(t)])),
                                      _official_ddim_stride_timesteps(1000, steps), x, clip)
    plan = plan_from_scheduler_config({"_class_name": "DDIMScheduler", "clip_sample": clip,
                                       "timestep_respacing": "guided-diffusion-ddim"}, steps)
    got = plan.sample(plan.make_denoiser(net), x)  # (VP latents in and out, as a diffusers pipeline's)
    assert float((got - ref.float()).abs().max() / ref.abs().max()) <= 1e-4
    if clip:  # diffusers' DDIM keeps the network's eps after clipping x0: another run
        diffusers_like = plan_from_scheduler_config({"_class_name": "DDIMScheduler", "clip_sample": True,
                                                     "timestep_spacing": "leading"}, steps)
        other = diffusers_like.sample(diffusers_like.make_denoiser(net), x)
        assert float((other - ref.float()).abs().max() / ref.abs().max()) > 1e-3


class _PositiveVariance(torch.nn.Module):
    """TinyNet with its variance channels made positive (diffusers' "learned" takes their square root)."""

    def __init__(self):
        super().__init__()
        self.net = TinyNet(3, 6)

    def forward(self, x, t, **kw):
        out = self.net(x, t)
        return torch.cat([out[:, :3], 0.02 * torch.sigmoid(out[:, 3:])], dim=1)


def test_learned_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    from test_scheduler_parity import run_diffusers

    model = _PositiveVariance()
    sched = diffusers.DDPMScheduler(variance_type="learned")
    ref = run_diffusers(sched, model, 10)
    got = run_fastdiff(dict(sched.config), "DDPMScheduler", model, 10)
    assert torch.isfinite(ref).all()
    assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-5
    fixed = run_fastdiff(dict(sched.config, variance_type="fixed_small"), "DDPMScheduler", model, 10)
    assert float((fixed - ref).abs().max() / ref.abs().max()) > 1e-2  # the variance channels were read


def _cosine_betas(T: int) -> np.ndarray:
    """improved-diffusion's get_named_beta_schedule("cosine", T): betas_for_alpha_bar, max_beta 0.999, float64."""
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return np.array([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=np.float64)


def _guided_diffusion_p_sample_loop(model, steps: int, seeds, shape, timestep_map=None, clip=False, cond_fn=None,
                                    variance="learned_range", betas=None, timestep_scale=1.0):
    """A float64 transcription of guided-diffusion's respaced DDPM (x0 clipped with ``clip``): returns the sample and
    the timesteps the network was given. ``model(x_vp, t) -> (eps, v)`` (v unread by the fixed variances);
    ``cond_fn(x, t)``: classifier guidance's gradient, by ``condition_mean`` (mean + variance g, the last step's too);
    ``variance``: "learned_range", "fixed_small" (posterior_variance, its log clipped) or "fixed_large"
    (append(posterior_variance[1], betas[1:])); ``betas``: the training schedule (default the linear 1000 steps);
    ``timestep_scale``: the network reads t * scale (improved-diffusion's rescale_timesteps)."""
    if betas is None:
        betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)  # get_named_beta_schedule("linear", 1000)
    T = len(betas)
    alphas_cumprod = np.cumprod(1.0 - betas)
    use = _official_space_timesteps(T, steps) if timestep_map is None else timestep_map
    last, new_betas = 1.0, []
    for i, ac in enumerate(alphas_cumprod):
        if i in use:
            new_betas.append(1 - ac / last)
            last = ac
    b = np.array(new_betas)
    acp = np.cumprod(1 - b)
    acp_prev = np.append(1.0, acp[:-1])
    post_var = b * (1 - acp_prev) / (1 - acp)
    post_log_var = np.log(np.append(post_var[1], post_var[1:])) if len(b) > 1 else np.log(post_var)
    coef1 = b * np.sqrt(acp_prev) / (1 - acp)
    coef2 = (1 - acp_prev) * np.sqrt(1 - b) / (1 - acp)
    src = NoiseSource(seeds)
    x = src.randn(shape).double()
    fed = []
    for k, i in enumerate(reversed(range(len(b)))):
        fed.append(use[i])
        with torch.no_grad():
            eps, v = model(x.float(), use[i] * timestep_scale)
        eps, v = eps.double(), v.double()
        if variance == "learned_range":
            frac = (v + 1) / 2
            log_var = frac * math.log(b[i]) + (1 - frac) * post_log_var[i]
            var = torch.exp(log_var)
        elif variance == "fixed_small":
            var, log_var = post_var[i], post_log_var[i]
        else:
            var = post_var[1] if i == 0 else b[i]
            log_var = math.log(var)
        log_var = torch.as_tensor(log_var, dtype=torch.float64)
        x0 = math.sqrt(1 / acp[i]) * x - math.sqrt(1 / acp[i] - 1) * eps
        if clip:
            x0 = x0.clamp(-1, 1)
        mean = coef1[i] * x0 + coef2[i] * x
        if cond_fn is not None:
            mean = mean + var * cond_fn(x.float(), use[i]).double()
        if i > 0:
            x = mean + torch.exp(0.5 * log_var) * src(k, x.float()).double()
        else:
            x = mean
    return x, fed


class _Bounded(torch.nn.Module):
    """A stand-in whose samples stay bounded without clipping: eps close to the (unit) noisy input, the variance
    values in [-1, 1] as a learn_sigma network's."""

    def __init__(self):
        super().__init__()
        self.net = TinyNet(3, 6)

    def forward(self, x, t, **kw):
        out = self.net(x, t)
        return torch.cat([x + 0.2 * torch.tanh(out[:, :3]), torch.tanh(out[:, 3:])], dim=1)


@pytest.mark.parametrize("steps", [10, 21])
def test_matches_guided_diffusion_p_sample(steps):
    net = _Bounded()
    fed = []

    def recording(x, t, **kw):
        fed.append(float(t.reshape(-1)[0]))
        return net(x, t)

    def split(x, t):
        out = net(x, torch.tensor([float(t)]))
        return out[:, :3], out[:, 3:]

    ref, ref_fed = _guided_diffusion_p_sample_loop(split, steps, SEEDS, SHAPE)
    config = {"_class_name": "DDPMScheduler", "variance_type": "learned_range", "clip_sample": False,
              "timestep_respacing": "guided-diffusion"}
    got = run_fastdiff(config, "DDPMScheduler", recording, steps)
    assert fed == [float(t) for t in ref_fed]
    assert float((got - ref.float()).abs().max() / ref.abs().max()) <= 1e-4


def _class_net():
    """A DiT-shaped stand-in: (B, 4, H, W) -> (B, 8, H, W), every channel depending on the class label."""
    conv = TinyNet(4, 8)

    def net(x, t, class_labels=None):
        return conv(x, t) * (1 + 0.1 * class_labels.float().reshape(-1, 1, 1, 1))
    return net


@torch.no_grad()
def test_cfg_keeps_the_conditional_variance():
    """Guidance mixes x0; the variance comes from the conditional pass (official DiT's sample.py, diffusers'
    UnCLIP / Kandinsky)."""
    net = _class_net()
    ac = make_alphas_cumprod("linear", 1000, 1e-4, 0.02)
    inner = DiscreteDenoiser(net, ac)
    cfg = CFGDenoiser(inner, guidance_scale=3.0, guided_channels=3)
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    cond, uncond = torch.tensor([1, 2]), torch.tensor([9, 9])
    s = float(inner.sigmas[500])
    x0, v = cfg.predict_variance_at(x, s, class_labels=cond, uncond={"class_labels": uncond})
    torch.testing.assert_close(x0, cfg.predict_at(x, s, class_labels=cond, uncond={"class_labels": uncond}))
    _, v_cond = inner.predict_variance_at(x, s, class_labels=cond)
    _, v_uncond = inner.predict_variance_at(x, s, class_labels=uncond)
    torch.testing.assert_close(v, v_cond)
    assert float((v - v_uncond).abs().max()) > 1e-3


def test_learned_variance_refusals():
    ac = make_alphas_cumprod("linear", 1000, 1e-4, 0.02)
    x = torch.randn(1, 3, 4, 4)
    plain = DiscreteDenoiser(TinyNet(3), ac)  # eps only
    with pytest.raises(BadArgumentError, match="6 output channels"):
        sample_ddpm(plain, x, [10.0, 1.0, 0.0], variance="learned_range")
    with pytest.raises(BadArgumentError, match="learned variance"):
        sample_ddpm(EDMDenoiser(TinyNet(3, 6)), x, [10.0, 1.0, 0.0], variance="learned_range")
    with pytest.raises(BadArgumentError, match="Denoiser"):
        sample_ddpm(lambda x, s: x * 0, x, [10.0, 1.0, 0.0], variance="learned_range")
    with pytest.raises(BadArgumentError, match="variance"):
        sample_ddpm(plain, x, [10.0, 1.0, 0.0], variance="fixed_large_log")


def test_named_ddpm_reads_the_networks_learned_variance():
    """A network with learn_sigma: sampler='ddpm' draws from its learned range unless told otherwise (an option, or
    a scheduler config that names a fixed variance)."""
    pipe = fastdiff.load("arch:tiny-dit")
    assert pipe.spec.learned_variance and "variance_type" not in pipe.spec.scheduler
    assert pipe.plan(5, "ddpm").options == {"variance": "learned_range"}
    fixed = fastdiff.load("arch:tiny-dit", scheduler={"_class_name": "DDPMScheduler", "variance_type": "fixed_large"})
    assert fixed.plan(5, "ddpm").options == fixed.plan(5).options == {"variance": "fixed_large"}
    plain = fastdiff.load("arch:tiny-dit", scheduler={"_class_name": "DDPMScheduler"})  # diffusers' fixed_small
    assert plain.plan(5, "ddpm").options == {} and plain.plan(5).options == {"variance": "fixed_small"}
    assert pipe.plan(5, "ddpm", variance="fixed_small").options == {"variance": "fixed_small"}
    a = pipe.generate(seeds=[3], class_labels=[1], steps=5, sampler="ddpm", progress=False)
    b = pipe.generate(seeds=[3], class_labels=[1], steps=5, sampler="ddpm", variance="fixed_small", progress=False)
    assert torch.isfinite(a).all() and float((a - b).abs().max()) > 1e-4
    from fastdiff.controlnet import evaluations  # (what a ControlNet's step window and the bench count)
    assert evaluations(pipe.plan(5, "ddpm")) == 5


# --- the official DiT fixture --------------------------------------------------------------------------------------

def test_official_dit_default_is_its_sample_py():
    """An official DiT checkpoint's default run is sample.py's: DDPM on guided-diffusion's respaced timesteps,
    its learned variance (the conditional pass's), CFG on channels 0..2, no clipping."""
    from test_dit import fixture

    pipe = fastdiff.load(fixture("dit", "dit_tiny.pt"), num_heads=4)
    plan = pipe.plan(21)
    assert (plan.sampler, plan.options["variance"]) == ("ddpm", "learned_range")
    scale, labels, seed, null = 4.0, [3, 7], [11, 12], pipe.spec.null_class
    net = pipe.model

    def forward_with_cfg(x, t):  # official DiT's forward_with_cfg, then the conditional half
        b = x.shape[0]
        ts = torch.full((2 * b,), float(t))
        out = net(torch.cat([x, x]), ts, class_labels=torch.tensor(labels + [null] * b))
        cond, uncond = out[:b], out[b:]
        eps = torch.cat([uncond[:, :3] + scale * (cond[:, :3] - uncond[:, :3]), cond[:, 3:4]], dim=1)
        return eps, cond[:, 4:]

    with torch.no_grad():
        ref, _ = _guided_diffusion_p_sample_loop(forward_with_cfg, 21, seed, (4, 8, 8))
        got = pipe.generate(seeds=seed, class_labels=labels, cfg_scale=scale, steps=21, progress=False)
    assert float((got - ref.float()).abs().max() / ref.abs().max()) <= 1e-4


def test_guided_diffusion_default_is_its_ddim_sample_loop():
    """A guided-diffusion checkpoint with no sampler runs image_sample.py's DDIM ("ddimN", x0 clipped, eps from it):
    the fixture's linear-schedule run (clip_denoised=True)."""
    from conftest import fixture_path
    from safetensors.torch import load_file

    ref = load_file(fixture_path("guided_diffusion", "reference.safetensors"))
    pipe = fastdiff.load(fixture_path("guided_diffusion", "model.pt"), head_channels=16)
    out = pipe.generate(latents=ref["ddim_noise"], class_labels=ref["ddim_y"], steps=10, progress=False)
    torch.testing.assert_close(out, ref["ddim_linear_sample"], rtol=0, atol=3e-4)


def test_named_ddpm_on_official_checkpoints_is_their_p_sample():
    """sampler="ddpm" on an official DiT / guided-diffusion checkpoint: p_sample on guided-diffusion's respaced
    timesteps, x0 clipped where the official sampling clips it (guided-diffusion's clip_denoised=True; DiT's False)."""
    from conftest import fixture_path

    dit = fastdiff.load(fixture_path("dit", "dit_tiny.pt"), num_heads=4)
    assert dit.plan(10, "ddpm").sigmas.tolist() == dit.plan(10).sigmas.tolist()
    gd = fastdiff.load(fixture_path("guided_diffusion", "model.pt"), head_channels=16)
    plan = gd.plan(10, "ddpm")
    assert plan.options["variance"] == "learned_range" and plan.denoiser_options["clip_sample"] == 1.0
    fed = []
    net = _Bounded()

    def recording(x, t, **kw):
        fed.append(int(t.reshape(-1)[0]))
        return net(x, t)

    plan.sample(plan.make_denoiser(recording), torch.randn(1, *SHAPE), noise=NoiseSource([0]))
    assert fed == _official_space_timesteps(1000, 10)[::-1]


def test_ddim_respacing_without_a_stride_is_image_samples_n_respacing():
    """'ddimN' for a count no integer stride gives: guided-diffusion's "N" respacing, which its image_sample.py runs
    with DDIM too (--timestep_respacing 60 --use_ddim); the respaced run always ends at alpha 1 (set_alpha_to_one
    False does not leave a last step from sigma(0) to itself)."""
    for steps in (1, 37, 60):
        plan = plan_from_scheduler_config({"_class_name": "DDIMScheduler",
                                           "timestep_respacing": "guided-diffusion-ddim"}, steps)
        n = plan_from_scheduler_config({"_class_name": "DDPMScheduler", "timestep_respacing": "guided-diffusion"},
                                       steps)
        assert plan.sigmas.tolist() == n.sigmas.tolist() and plan.steps == steps
    plan = plan_from_scheduler_config({"_class_name": "DDIMScheduler", "set_alpha_to_one": False,
                                       "timestep_respacing": "guided-diffusion-ddim"}, 10)
    assert float(plan.sigmas[-1]) == 0.0 and "sigmas_to" not in plan.options


def test_guided_diffusion_named_samplers():
    """On a guided-diffusion checkpoint, sampler="ddim" is its default run (image_sample.py's DDIM, eta included);
    other named samplers run unclipped, as on any other model."""
    from conftest import fixture_path

    gd = fastdiff.load(fixture_path("guided_diffusion", "model.pt"), head_channels=16)
    for steps in (7, 30):
        assert gd.plan(steps, "ddim").sigmas.tolist() == gd.plan(steps).sigmas.tolist()
    assert gd.plan(7, "ddim", eta=0.5).options["eta"] == 0.5
    for name in ("euler", "dpmpp_2m", "heun"):
        assert gd.plan(10, name).denoiser_options.get("clip_sample") is None


def test_cosine_preset_is_the_fixtures_cosine_run():
    """scheduler=GUIDED_DIFFUSION_COSINE_SCHEDULER (what the load note names for the cosine-schedule models) gives
    image_sample.py's DDIM on the cosine betas: the fixture's main run (clip_denoised=True)."""
    from conftest import fixture_path
    from safetensors.torch import load_file

    from fastdiff.checkpoints.presets import GUIDED_DIFFUSION_COSINE_SCHEDULER

    ref = load_file(fixture_path("guided_diffusion", "reference.safetensors"))
    pipe = fastdiff.load(fixture_path("guided_diffusion", "model.pt"), head_channels=16,
                         scheduler=GUIDED_DIFFUSION_COSINE_SCHEDULER)
    assert any("GUIDED_DIFFUSION_COSINE_SCHEDULER" in n for n in pipe.spec.notes)
    out = pipe.generate(latents=ref["ddim_noise"], class_labels=ref["ddim_y"], steps=10, progress=False)
    torch.testing.assert_close(out, ref["ddim_sample"], rtol=0, atol=1e-4)
    # the preset names no variance: sampler="ddpm" is still p_sample's, from the learned range
    plan = pipe.plan(10, "ddpm")
    assert plan.options["variance"] == "learned_range" and plan.denoiser_options["clip_sample"] == 1.0


def test_cli_scheduler_presets():
    from types import SimpleNamespace

    from fastdiff.checkpoints.presets import GUIDED_DIFFUSION_COSINE_SCHEDULER, SIT_SCHEDULER
    from fastdiff.commands.generate import load_options

    assert load_options(SimpleNamespace(scheduler="guided-diffusion-cosine"))["scheduler"] == \
        GUIDED_DIFFUSION_COSINE_SCHEDULER
    assert load_options(SimpleNamespace(scheduler="sit"))["scheduler"] == SIT_SCHEDULER
    from fastdiff.checkpoints.presets import IMPROVED_DIFFUSION_SCHEDULER

    assert load_options(SimpleNamespace(scheduler="improved-diffusion"))["scheduler"] == IMPROVED_DIFFUSION_SCHEDULER
