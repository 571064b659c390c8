"""fastdiff's plan from a diffusers scheduler config vs the diffusers scheduler itself.

Both drive the same tiny deterministic network (a fixed random conv + a timestep embedding) from the same
latents; stochastic schedulers get the same noise because fastdiff's NoiseSource draws exactly what
diffusers' ``randn_tensor`` draws for a list of per-sample generators. Agreement: max|diff| / max|ref|
<= 1e-4 in float32 (observed ~1e-7..5e-6).
"""

import inspect
import logging
import warnings

import pytest
import torch
from torch import nn

diffusers = pytest.importorskip("diffusers")
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

from fastdiff.errors import BadArgumentError, UnsupportedConfigError  # noqa: E402
from fastdiff.noise import NoiseSource  # noqa: E402
from fastdiff.scheduler_config import plan_from_scheduler_config  # noqa: E402
from test_sampler_order import single_thread  # noqa: F401,E402  (autouse fixture)

SEEDS = [1, 2]
SHAPE = (3, 6, 6)
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


class TinyNet(nn.Module):
    """Deterministic stand-in for a UNet: neither zero nor identity, smooth in x and the timestep."""

    def __init__(self, c=3, out=None):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        out = out or c
        self.w = nn.Parameter(torch.randn(out, c, 3, 3, generator=g) * 0.2)
        self.b = nn.Parameter(torch.randn(out, generator=g) * 0.1)
        self.register_buffer("freq", torch.randn(out, generator=g))

    def forward(self, x, t, class_labels=None, encoder_hidden_states=None):
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device).reshape(-1)
        t = t.expand(x.shape[0]) if t.numel() == 1 else t
        y = nn.functional.conv2d(x, self.w, self.b, padding=1)
        emb = torch.sin(t[:, None] * 0.003 * (1 + self.freq)[None] + self.freq[None])[:, :, None, None]
        return 0.6 * torch.tanh(y) + 0.4 * x[:, :1] * emb + 0.2 * emb


@torch.no_grad()
def run_diffusers(sched, model, steps):
    sched.set_timesteps(steps)
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    x = randn_tensor((len(SEEDS),) + SHAPE, generator=gens) * sched.init_noise_sigma
    kw = {"generator": gens} if "generator" in inspect.signature(sched.step).parameters else {}
    for t in sched.timesteps:
        x = sched.step(model(sched.scale_model_input(x, t), t), t, x, **kw).prev_sample
    return x


def run_fastdiff(config, cls, model, steps):
    plan = plan_from_scheduler_config(config, steps, class_name=cls)
    src = NoiseSource(SEEDS)
    return plan.sample(plan.make_denoiser(model), src.randn(SHAPE), noise=src)


CASES = [
    ("DDIMScheduler", 10, {}),
    ("DDIMScheduler", 7, dict(timestep_spacing="trailing", prediction_type="v_prediction", clip_sample=False)),
    ("DDIMScheduler", 10, dict(timestep_spacing="linspace", set_alpha_to_one=False, steps_offset=1, **SD)),
    ("DDIMScheduler", 10, dict(steps_offset=1, thresholding=True, prediction_type="sample")),
    ("DDPMScheduler", 12, {}),
    ("DDPMScheduler", 12, dict(variance_type="fixed_large", timestep_spacing="trailing")),
    # a learned variance (guided-diffusion / DiT's learn_sigma): the network's second half of channels; 'trailing'
    # ends at t > 0, where diffusers still adds noise (beta~ clamped to 1e-20)
    ("DDPMScheduler", 12, dict(variance_type="learned_range")),
    ("DDPMScheduler", 9, dict(variance_type="learned_range", timestep_spacing="trailing")),
    ("EulerDiscreteScheduler", 10, {}),
    ("EulerDiscreteScheduler", 10, dict(use_karras_sigmas=True, prediction_type="v_prediction", **SD)),
    ("EulerDiscreteScheduler", 9, dict(timestep_spacing="leading", steps_offset=1, final_sigmas_type="sigma_min")),
    ("EulerDiscreteScheduler", 10, dict(use_exponential_sigmas=True, timestep_spacing="trailing")),
    ("EulerDiscreteScheduler", 10, dict(timestep_type="continuous", prediction_type="v_prediction")),
    ("EulerAncestralDiscreteScheduler", 10, {}),
    ("EulerAncestralDiscreteScheduler", 10, dict(timestep_spacing="trailing", prediction_type="v_prediction")),
    ("HeunDiscreteScheduler", 10, {}),
    ("HeunDiscreteScheduler", 10, dict(use_karras_sigmas=True, clip_sample=True, timestep_spacing="leading",
                                       steps_offset=1)),
    *[("DPMSolverMultistepScheduler", 12, dict(algorithm_type=a, solver_order=o))
      for a in ("dpmsolver++", "sde-dpmsolver++") for o in (1, 2, 3)],
    ("DPMSolverMultistepScheduler", 10, dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min")),
    ("DPMSolverMultistepScheduler", 16, dict(algorithm_type="dpmsolver", solver_order=3, solver_type="heun",
                                             final_sigmas_type="sigma_min")),
    ("DPMSolverMultistepScheduler", 10, dict(use_karras_sigmas=True, **SD)),
    ("DPMSolverMultistepScheduler", 8, dict(solver_order=3, use_karras_sigmas=True, lower_order_final=False)),
    ("DPMSolverMultistepScheduler", 20, dict(solver_order=3, final_sigmas_type="sigma_min")),
    ("DPMSolverMultistepScheduler", 10, dict(solver_type="heun", timestep_spacing="trailing",
                                             prediction_type="v_prediction", euler_at_final=True)),
    ("DPMSolverMultistepScheduler", 20, dict(timestep_spacing="leading", steps_offset=1, thresholding=True)),
    ("DPMSolverMultistepScheduler", 10, dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1,
                                             timestep_spacing="trailing")),
    ("DPMSolverMultistepScheduler", 10, dict(use_exponential_sigmas=True, variance_type="learned_range")),
    *[("DPMSolverSinglestepScheduler", 12, dict(solver_order=o, algorithm_type=a,
                                                final_sigmas_type="sigma_min" if a == "dpmsolver" else "zero"))
      for o in (1, 2, 3) for a in ("dpmsolver++", "dpmsolver", "sde-dpmsolver++")],
    ("DPMSolverSinglestepScheduler", 9, dict(solver_order=3, solver_type="heun", final_sigmas_type="sigma_min")),
    ("DPMSolverSinglestepScheduler", 10, dict(use_karras_sigmas=True)),
    ("DPMSolverSinglestepScheduler", 11, dict(solver_order=3)),
    *[("UniPCMultistepScheduler", 10, dict(solver_order=o)) for o in (1, 2, 3)],
    ("UniPCMultistepScheduler", 10, dict(solver_order=3, solver_type="bh1", final_sigmas_type="sigma_min")),
    ("UniPCMultistepScheduler", 8, dict(use_karras_sigmas=True, timestep_spacing="trailing")),
    ("UniPCMultistepScheduler", 10, dict(predict_x0=False, prediction_type="v_prediction", disable_corrector=[0, 3],
                                         final_sigmas_type="sigma_min")),
    ("UniPCMultistepScheduler", 12, dict(solver_order=3, lower_order_final=False, final_sigmas_type="sigma_min",
                                         timestep_spacing="leading", steps_offset=1)),
    # zero terminal SNR (Lin et al. 2023): diffusers' sigma-based schedulers clamp alphas_cumprod[-1] to 2**-24, which
    # leaves the sigma table unsorted at its top (4096 below t=998's 15406); DDIM / DDPM keep it at 0. Karras grids
    # feed the network diffusers' inverse of their (unrounded) top sigma, 995.26, not 999.
    # (epsilon shows a wrong timestep most; DDIM / DDPM need v: their epsilon x0 is infinite at SNR 0)
    *[(cls, n, dict(rescale_betas_zero_snr=True, timestep_spacing="trailing", **kw))
      for cls, n, kw in (("DDIMScheduler", 10, dict(clip_sample=False, prediction_type="v_prediction")),
                         ("DDPMScheduler", 25, dict(prediction_type="v_prediction")),
                         ("EulerDiscreteScheduler", 10, {}), ("EulerAncestralDiscreteScheduler", 10, {}),
                         ("DPMSolverMultistepScheduler", 10, {}), ("UniPCMultistepScheduler", 8, {}),
                         ("EulerDiscreteScheduler", 5, dict(use_karras_sigmas=True)),
                         ("DPMSolverMultistepScheduler", 8, dict(use_karras_sigmas=True, final_sigmas_type="sigma_min")),
                         ("UniPCMultistepScheduler", 8, dict(use_karras_sigmas=True)),
                         ("EulerDiscreteScheduler", 6, dict(use_exponential_sigmas=True)))],
    ("EulerDiscreteScheduler", 8, dict(rescale_betas_zero_snr=True)),  # linspace: t = 999 at the top
    ("EDMEulerScheduler", 10, {}),
    ("EDMEulerScheduler", 10, dict(sigma_schedule="exponential", prediction_type="v_prediction",
                                   final_sigmas_type="sigma_min")),
    ("EDMEulerScheduler", 1, dict(final_sigmas_type="sigma_min")),   # ends at its grid's last sigma: 80
    # EDM DPM-Solver++: the multistep solver with alpha_t = 1; "sigma_min" is the config's (a 1-step grid is
    # [80, 0.002]); its float32 exponential grid ends rising by 1e-10 (diffusers' float32 logs make that h = 0)
    *[("EDMDPMSolverMultistepScheduler", 10, dict(solver_order=o, algorithm_type=a))   # (diffusers has no 3rd-order SDE)
      for o, a in ((2, "dpmsolver++"), (3, "dpmsolver++"), (2, "sde-dpmsolver++"))],
    ("EDMDPMSolverMultistepScheduler", 1, dict(final_sigmas_type="sigma_min", prediction_type="v_prediction")),
    ("EDMDPMSolverMultistepScheduler", 25, dict(sigma_schedule="exponential", final_sigmas_type="sigma_min",
                                                algorithm_type="sde-dpmsolver++", solver_type="heun",
                                                euler_at_final=True)),
    # PNDM: Stable Diffusion 1.x's own config (PLMS with the pseudo improved Euler warm-up), and the paper's
    # Runge-Kutta warm-up. 'linspace' / 'trailing' land steps at t - T//N, not at the next timestep; with 30
    # steps T//N//2 = 16 puts the Runge-Kutta stages' landing (t - 16) apart from their midpoint (t' + 16);
    # v-prediction combines raw v-predictions (diffusers converts the sum to eps at the step's start)
    ("PNDMScheduler", 10, dict(skip_prk_steps=True, steps_offset=1, **SD)),
    ("PNDMScheduler", 2, dict(skip_prk_steps=True, set_alpha_to_one=True)),
    ("PNDMScheduler", 7, dict(skip_prk_steps=True, timestep_spacing="trailing", prediction_type="v_prediction")),
    ("PNDMScheduler", 9, dict(skip_prk_steps=True, timestep_spacing="linspace")),
    ("PNDMScheduler", 4, {}),
    ("PNDMScheduler", 30, dict(steps_offset=1, **SD)),
    ("PNDMScheduler", 11, dict(timestep_spacing="linspace", prediction_type="v_prediction", set_alpha_to_one=True)),
    ("LMSDiscreteScheduler", 10, {}),
    ("LMSDiscreteScheduler", 10, dict(use_karras_sigmas=True, timestep_spacing="leading", steps_offset=1, **SD)),
    ("LMSDiscreteScheduler", 6, dict(use_exponential_sigmas=True, prediction_type="v_prediction",
                                     timestep_spacing="trailing")),
    ("LMSDiscreteScheduler", 3, dict(prediction_type="sample")),
    # KDPM2 (k-diffusion's DPM-Solver-2): the midpoint's timestep is the log-sigma inverse of its sigma; the ancestral
    # midpoint is the next grid sigma, whose own timestep (rounded on a Karras grid) it must not take
    ("KDPM2DiscreteScheduler", 8, {}),
    ("KDPM2DiscreteScheduler", 10, dict(use_karras_sigmas=True, prediction_type="v_prediction", **SD)),
    ("KDPM2AncestralDiscreteScheduler", 10, dict(timestep_spacing="leading", steps_offset=1)),
    ("KDPM2AncestralDiscreteScheduler", 7, dict(use_karras_sigmas=True, **SD)),
    ("KDPM2AncestralDiscreteScheduler", 7, dict(use_karras_sigmas=True)),
    ("KDPM2AncestralDiscreteScheduler", 6, dict(use_exponential_sigmas=True, timestep_spacing="trailing",
                                                prediction_type="v_prediction")),
    # DEIS ("log-rho"): the multistep grid ends at the table's first sigma, or a Karras grid's own last one
    *[("DEISMultistepScheduler", 10, dict(solver_order=o)) for o in (1, 2, 3)],
    ("DEISMultistepScheduler", 8, dict(solver_order=3, use_karras_sigmas=True, prediction_type="v_prediction", **SD)),
    ("DEISMultistepScheduler", 20, dict(timestep_spacing="leading", steps_offset=1, thresholding=True,
                                        lower_order_final=False, use_exponential_sigmas=True)),
    # consistency models: Karras sigmas at 'leading' indices of a 40-point discretisation, the boundary-shifted EDM
    # preconditioning (c_noise = 250 ln sigma), x0 clipped, re-noised to sqrt(sigma'^2 - sigma_min^2)
    ("CMStochasticIterativeScheduler", 1, {}),
    ("CMStochasticIterativeScheduler", 4, dict(clip_denoised=False, s_noise=0.7, sigma_min=0.01, rho=5.0)),
    ("CMStochasticIterativeScheduler", 7, dict(num_train_timesteps=151, sigma_data=0.3)),
    # TCD (strategic stochastic sampling; diffusers' step default gamma = eta = 0.3): LCM's timesteps, a jump to
    # sigma(floor(0.7 t')), re-noised to t'; the run ends at sigma(t = 0)
    ("TCDScheduler", 4, {}),
    ("TCDScheduler", 8, dict(prediction_type="v_prediction", rescale_betas_zero_snr=True)),
    # LCM (a consistency model's few-step sampler): boundary scalings per timestep, fresh noise between steps
    ("LCMScheduler", 4, {}),
    ("LCMScheduler", 6, dict(prediction_type="v_prediction", rescale_betas_zero_snr=True, original_inference_steps=100)),
    ("LCMScheduler", 3, dict(timestep_scaling=1.0, clip_sample=True, beta_schedule="linear", beta_start=1e-4,
                             beta_end=0.02)),
    # options these classes take and ignore where they do not apply (fastdiff refused them: a fuzzing review)
    ("DPMSolverMultistepScheduler", 7, dict(use_dynamic_shifting=True, beta_schedule="scaled_linear")),
    ("DPMSolverSinglestepScheduler", 7, dict(use_dynamic_shifting=True)),
    ("DEISMultistepScheduler", 7, dict(use_dynamic_shifting=True)),
    ("DPMSolverMultistepScheduler", 7, dict(use_flow_sigmas=True, prediction_type="flow_prediction",
                                            time_shift_type="linear", flow_shift=3.0)),
    ("DEISMultistepScheduler", 7, dict(use_flow_sigmas=True, prediction_type="flow_prediction",
                                       time_shift_type="linear", flow_shift=3.0)),
    # trailing spacing where diffusers' arange holds n + 1 timesteps, the last -1 (np.interp clamps its sigma to
    # t = 0's; fastdiff's table lookup wrapped to the top noise level: a fuzzing review)
    ("DPMSolverMultistepScheduler", 61, dict(timestep_spacing="trailing")),
    ("DPMSolverMultistepScheduler", 7, dict(timestep_spacing="trailing", num_train_timesteps=1200)),
    ("UniPCMultistepScheduler", 61, dict(timestep_spacing="trailing")),
    ("DEISMultistepScheduler", 61, dict(timestep_spacing="trailing")),
]


@pytest.mark.parametrize("cls,steps,cfg", CASES, ids=[f"{c}-{s}-{'-'.join(f'{k}={v}' for k, v in d.items())}"
                                                      for c, s, d in CASES])
def test_matches_diffusers(cls, steps, cfg):
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    out = 6 if cfg.get("variance_type") == "learned_range" else None
    model = TinyNet(3, out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        missing = sorted(set(cfg) - set(inspect.signature(getattr(diffusers, cls).__init__).parameters))
        if missing:
            pytest.skip(f"diffusers {diffusers.__version__}'s {cls} takes no {missing}")
        sched = getattr(diffusers, cls)(**cfg)
        config = dict(sched.config)                   # what a scheduler_config.json holds
        ref = run_diffusers(sched, model, steps)
    got = run_fastdiff(config, cls, model, steps)
    assert torch.isfinite(ref).all()
    rel = float((got - ref).abs().max() / ref.abs().max())
    assert rel <= 1e-4, f"{cls} {cfg}: max rel diff {rel:.2e}"


def test_class_name_from_config_json_key():
    plan = plan_from_scheduler_config({"_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.8"}, 5)
    assert plan.sampler == "euler" and plan.steps == 5


@pytest.mark.parametrize("config,field", [
    ({"_class_name": "FlowMatchLCMScheduler", "scale_factors": [1.5]}, "scale_factors"),
    ({"_class_name": "SASolverScheduler"}, "_class_name"),
    ({"_class_name": "DDIMScheduler", "flow_time_convention": "sit"}, "flow_time_convention"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "flow_time_convention": "rf"}, "flow_time_convention"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "invert_sigmas": True}, "invert_sigmas"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_karras_sigmas": True, "use_beta_sigmas": True},
     "use_beta_sigmas"),
    ({"_class_name": "DPMSolverMultistepScheduler", "use_flow_sigmas": True}, "prediction_type"),
    ({"_class_name": "DPMSolverMultistepScheduler", "use_flow_sigmas": True, "prediction_type": "flow_prediction",
      "use_karras_sigmas": True}, "use_karras_sigmas"),
    ({"_class_name": "DPMSolverMultistepScheduler", "use_flow_sigmas": True, "prediction_type": "flow_prediction",
      "algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}, "algorithm_type"),
    ({"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": True, "prediction_type": "flow_prediction",
      "predict_x0": False}, "predict_x0"),
    ({"_class_name": "EDMDPMSolverMultistepScheduler", "thresholding": True}, "thresholding"),
    ({"_class_name": "DEISMultistepScheduler", "solver_type": "foo"}, "solver_type"),
    ({"_class_name": "DPMSolverMultistepScheduler", "solver_type": "Heun"}, "solver_type"),  # (ran as midpoint)
    ({"_class_name": "EDMDPMSolverMultistepScheduler", "solver_type": "heun "}, "solver_type"),
    ({"_class_name": "DPMSolverSinglestepScheduler", "algorithm_type": "deis"}, "final_sigmas_type"),
    ({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "deis"}, "final_sigmas_type"),
    ({"_class_name": "KDPM2DiscreteScheduler", "prediction_type": "sample"}, "prediction_type"),
    ({"_class_name": "PNDMScheduler", "prediction_type": "sample"}, "prediction_type"),
    ({"_class_name": "LCMScheduler", "original_inference_steps": 2000}, "original_inference_steps"),
    ({"_class_name": "DPMSolverMultistepScheduler", "use_lu_lambdas": True}, "use_lu_lambdas"),
    ({"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True, "use_beta_sigmas": True}, "use_beta_sigmas"),
    ({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver"}, "algorithm_type"),
    ({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver"}, "final_sigmas_type"),
    ({"_class_name": "DDPMScheduler", "variance_type": "fixed_large_log"}, "variance_type"),  # (diffusers: NaN)
    ({"_class_name": "EulerDiscreteScheduler", "beta_schedule": "sigmoid"}, "beta_schedule"),  # (DDPM's only)
    ({"_class_name": "UniPCMultistepScheduler", "solver_p": {"x": 1}}, "solver_p"),
    ({"_class_name": "EulerDiscreteScheduler", "timestep_spacing": "middle"}, "timestep_spacing"),
    ({"_class_name": "EulerDiscreteScheduler", "prediction_type": "flow_prediction"}, "prediction_type"),
])
def test_unsupported_config(config, field):
    with pytest.raises(UnsupportedConfigError) as e:
        plan_from_scheduler_config(config, 10)
    assert e.value.field == field
    assert "supported" in str(e.value)


@pytest.mark.parametrize("source, target", [("DPMSolverMultistepScheduler", "DEISMultistepScheduler"),
                                            ("UniPCMultistepScheduler", "DEISMultistepScheduler"),
                                            ("UniPCMultistepScheduler", "DPMSolverSinglestepScheduler"),
                                            ("DEISMultistepScheduler", "DPMSolverMultistepScheduler")])
def test_another_solvers_config_runs_as_diffusers_rewrites_it(source, target):
    """diffusers' scheduler swap ``Target.from_config(source.config)``: the target's constructor rewrites the
    algorithm / solver types it does not have (DEIS takes "dpmsolver++" as "deis" and "bh2" as "logrho", ...);
    fastdiff refused those configs (a review)."""
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    model = TinyNet(3)
    config = dict(getattr(diffusers, source)().config)
    if source == "DEISMultistepScheduler":  # (its "deis" with DPM-Solver's default final "zero": refused by both)
        config["final_sigmas_type"] = "sigma_min"
    sched = getattr(diffusers, target).from_config(config)
    ref = run_diffusers(sched, model, 9)
    got = run_fastdiff(config, target, model, 9)
    assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-5


@pytest.mark.parametrize("cls", ["HeunDiscreteScheduler", "DPMSolverSinglestepScheduler"])
def test_zero_snr_key_is_ignored_where_diffusers_ignores_it(cls):
    """These two diffusers classes take no rescale_betas_zero_snr (from_config drops the key): a config carrying it,
    e.g. switched over from a zero-SNR DDIM config, samples as without it (fastdiff applied it: off by 24x)."""
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    model = TinyNet(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = getattr(diffusers, cls).from_config({**getattr(diffusers, cls)().config, "rescale_betas_zero_snr": True})
        ref = run_diffusers(sched, model, 9)
    got = run_fastdiff({**dict(sched.config), "rescale_betas_zero_snr": True}, cls, model, 9)
    assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-4


@pytest.mark.parametrize("cls", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
def test_the_device_path_feeds_the_grids_own_timesteps(cls):
    """D(x, sigma_tensor) (the documented denoiser form) and the samplers' host path feed the network the same
    timestep at every grid sigma, also at a zero-SNR Karras grid's top, where the inverse alone differs (995 / 999)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = dict(getattr(diffusers, cls)(rescale_betas_zero_snr=True, use_karras_sigmas=True,
                                              timestep_spacing="trailing").config)
    plan = plan_from_scheduler_config(config, 6, class_name=cls)
    seen = []
    den = plan.make_denoiser(lambda x, t, **k: (seen.append(t.clone()), x)[1])
    for s in plan.sigmas[:-1].tolist():
        if s == 0:
            continue
        den.denoise_at(torch.zeros(2, 3, 4, 4), s)
        den(torch.zeros(2, 3, 4, 4), torch.full((2,), s))
    pairs = list(zip(seen[0::2], seen[1::2]))
    assert pairs and all(torch.equal(host, device) for host, device in pairs), pairs


@pytest.mark.parametrize("steps,cfg", [(10, {}), (8, dict(use_karras_sigmas=True, beta_schedule="scaled_linear")),
                                       (6, dict(prediction_type="v_prediction", timestep_spacing="leading",
                                                steps_offset=1, use_exponential_sigmas=True))])
def test_dpm_solver_sde_matches_diffusers_given_the_same_noise(steps, cfg, monkeypatch):
    """DPMSolverSDEScheduler draws its noise from torchsde's Brownian tree; fastdiff draws the same Brownian
    increments from each sample's generator. With diffusers' noise sampler drawing fastdiff's, the runs agree."""
    pytest.importorskip("torchsde", reason="diffusers' DPMSolverSDEScheduler needs torchsde")
    import diffusers.schedulers.scheduling_dpmsolver_sde as sde

    from fastdiff.dpmpp_singlestep import joined_increment

    gens = [torch.Generator().manual_seed(s) for s in SEEDS]

    class SameNoise:  # per step: z1 for [sigma_mid, sigma], then the increment over [sigma_next, sigma] containing it
        def __init__(self, *args, **kwargs):
            self.pending = None

        def __call__(self, sigma, sigma_next):
            if self.pending is None:
                z1, z2 = (torch.cat([torch.randn((1,) + SHAPE, generator=g) for g in gens]) for _ in range(2))
                self.pending = (z1, z2, float(sigma_next))
                return z1
            (z1, z2, mid), self.pending = self.pending, None
            return joined_increment(z1, z2, float(sigma), mid, float(sigma_next))

    monkeypatch.setattr(sde, "BrownianTreeNoiseSampler", SameNoise)
    model = TinyNet()
    sched = diffusers.DPMSolverSDEScheduler.from_config(cfg)
    sched.set_timesteps(steps)
    x = randn_tensor((len(SEEDS),) + SHAPE, generator=gens) * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(model(sched.scale_model_input(x, t), t), t, x).prev_sample
    got = run_fastdiff(cfg, "DPMSolverSDEScheduler", model, steps)
    assert float((got - x).abs().max() / x.abs().max()) <= 1e-4


@pytest.mark.parametrize("cls", ["DDIMScheduler", "DDPMScheduler", "PNDMScheduler"])
def test_leading_steps_past_the_table_are_refused_where_diffusers_indexes_it(cls):
    """'leading' + steps_offset reaching t = 1000: diffusers' table-indexing schedulers fail with an IndexError
    (fastdiff raised one too); the Euler family interpolates and clamps, and still runs."""
    cfg = dict(timestep_spacing="leading", steps_offset=1, skip_prk_steps=True)
    with pytest.raises(BadArgumentError, match="past the 1000 training timesteps"):
        plan_from_scheduler_config(cfg, 1000, class_name=cls)
    assert plan_from_scheduler_config(cfg, 999, class_name=cls).steps == 999
    assert plan_from_scheduler_config(cfg, 1000, class_name="EulerDiscreteScheduler").steps == 1000
    # trailing spacing at 61 of 1000: diffusers' timesteps end at -1, which these index from the end (a last step
    # back to the top noise level): refused by name
    with pytest.raises(BadArgumentError, match="62 timesteps ending at -1"):
        plan_from_scheduler_config(dict(timestep_spacing="trailing", skip_prk_steps=True), 61, class_name=cls)


@pytest.mark.parametrize("eta,steps,cfg", [(0.0, 6, {}), (1.0, 6, {}),
                                           (0.32, 8, dict(original_inference_steps=500))])
def test_tcd_gamma_passed_at_generation(eta, steps, cfg):
    """TCD's gamma is a step() argument in diffusers (``pipe(..., eta=)``); fastdiff takes it as the plan's eta.
    floor((1 - eta) t) is taken in float32 as diffusers does: 0.68 * 625 is 425 there, 424.99.. in float64."""
    model = TinyNet()
    sched = diffusers.TCDScheduler(**cfg)
    sched.set_timesteps(steps)
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    x = randn_tensor((len(SEEDS),) + SHAPE, generator=gens)
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(model(x, t), t, x, eta=eta, generator=gens).prev_sample
    plan = plan_from_scheduler_config(cfg, steps, class_name="TCDScheduler")
    src = NoiseSource(SEEDS)
    got = plan.sample(plan.make_denoiser(model), src.randn(SHAPE), noise=src, eta=eta)
    assert float((got - x).abs().max() / x.abs().max()) <= 1e-4


# keys a class's constructor lacks (left over from another class's config, or a _class_name swapped by hand):
# diffusers' from_config drops them, so they change nothing (fastdiff applied them: 0.92-0.999 relative off)
FOREIGN = [
    ("EulerDiscreteScheduler", dict(thresholding=True)),  # DeepFloyd IF's DDPM config carries it
    ("EulerAncestralDiscreteScheduler", dict(thresholding=True, use_karras_sigmas=True)),
    ("HeunDiscreteScheduler", dict(thresholding=True)),
    ("LMSDiscreteScheduler", dict(thresholding=True, interpolation_type="log_linear")),
    ("KDPM2DiscreteScheduler", dict(thresholding=True)),
    ("KDPM2AncestralDiscreteScheduler", dict(thresholding=True)),
    ("UniPCMultistepScheduler", dict(lambda_min_clipped=-3.0)),  # SD-style DPM-Solver configs carry it
    ("DEISMultistepScheduler", dict(lambda_min_clipped=-3.0)),
    ("FlowMatchHeunDiscreteScheduler", dict(use_karras_sigmas=True, shift_terminal=0.1, invert_sigmas=True)),
    ("FlowMatchHeunDiscreteScheduler", dict(use_exponential_sigmas=True)),
    ("DPMSolverSinglestepScheduler", dict(shift_terminal=0.1)),
]


@pytest.mark.parametrize("cls,extra", FOREIGN)
def test_keys_a_class_does_not_take_change_nothing(cls, extra):
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    C = getattr(diffusers, cls)
    assert not set(extra) & set(inspect.signature(C.__init__).parameters)  # (the premise: diffusers drops them)
    base = dict(C().config)
    plain = plan_from_scheduler_config(base, 6, class_name=cls)
    foreign = plan_from_scheduler_config({**base, **extra}, 6, class_name=cls)
    assert torch.equal(foreign.sigmas, plain.sigmas) and foreign.options == plain.options
    assert foreign.denoiser_options.keys() == plain.denoiser_options.keys()
    assert all(str(foreign.denoiser_options[k]) == str(v) for k, v in plain.denoiser_options.items())
    if not cls.startswith("FlowMatch"):  # and the run equals diffusers' on the config with them
        model = TinyNet(3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = run_diffusers(C.from_config({**base, **extra}), model, 6)
        got = run_fastdiff({**base, **extra}, cls, model, 6)
        assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-4


@pytest.mark.parametrize("cls", ["EulerDiscreteScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler",
                                 "KDPM2AncestralDiscreteScheduler", "LMSDiscreteScheduler", "DPMSolverSDEScheduler",
                                 "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
                                 "DEISMultistepScheduler", "UniPCMultistepScheduler"])
@pytest.mark.parametrize("grid", ["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"])
def test_a_configs_sigma_range_bounds_the_grid_as_in_diffusers(cls, grid):
    """sigma_min / sigma_max: read by most of these classes from their config (kept there by from_config even where
    the constructor lacks them), ignored by LMS and DPMSolverSDE; fastdiff reads them where diffusers does."""
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    C = getattr(diffusers, cls)
    config = {k: v for k, v in dict(C().config).items() if k != "_use_default_values"}  # (or from_config drops them)
    config.update({grid: True, "sigma_min": 0.1, "sigma_max": 10.0})
    model = TinyNet(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = C.from_config(config)
        ref = run_diffusers(sched, model, 6)
    plan = plan_from_scheduler_config(config, 6, class_name=cls)
    want = sched.sigmas[sched.sigmas > 0]
    got = plan.sigmas[plan.sigmas > 0]
    assert abs(float(got.max()) - float(want.max())) <= 1e-4 * float(want.max())
    if cls != "DPMSolverSDEScheduler":  # (its noise is torchsde's Brownian tree in diffusers)
        out = run_fastdiff(config, cls, model, 6)
        assert float((out - ref).abs().max() / ref.abs().max()) <= 1e-4


def test_use_flow_sigmas_makes_a_flow_model_only_where_the_class_takes_it():
    """An Euler config carrying use_flow_sigmas (diffusers' Euler ignores it, and saves it back) is not a flow model;
    a solver's is."""
    from fastdiff.spec import is_flow_scheduler

    assert not is_flow_scheduler({"_class_name": "EulerDiscreteScheduler", "use_flow_sigmas": True})
    assert is_flow_scheduler({"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": True})
    assert is_flow_scheduler({"_class_name": "FlowMatchEulerDiscreteScheduler"})


@pytest.mark.parametrize("grid", ["use_karras_sigmas", "use_exponential_sigmas"])
def test_a_flow_configs_sigma_range_bounds_its_grid_as_in_diffusers(grid):
    """FlowMatchEuler reads sigma_min / sigma_max from its config for Karras / exponential grids too."""
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    C = diffusers.FlowMatchEulerDiscreteScheduler
    config = {k: v for k, v in dict(C().config).items() if k != "_use_default_values"}
    config.update({grid: True, "sigma_min": 0.05, "sigma_max": 0.9, "shift": 3.0})
    sched = C.from_config(config)
    sched.set_timesteps(6)
    plan = plan_from_scheduler_config(config, 6, class_name="FlowMatchEulerDiscreteScheduler")
    torch.testing.assert_close(plan.sigmas.float(), sched.sigmas.float(), rtol=1e-5, atol=1e-6)
