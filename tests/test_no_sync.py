"""The sampling loop never reads a device value back to the host.

The state is wrapped in a tensor subclass whose ``__torch_function__`` raises on every host read-back
(``bool()``, ``.item()``, ``.tolist()``, ``float()``, ``int()``, ``.numpy()``, ``.cpu()``). Everything
computed from the state (the denoiser, guidance, thresholding, noise added to it) inherits the subclass,
so any ``if tensor:`` or ``.item()`` in a sampler or an adapter fails the test. The host-side grid is a
plain tensor: reading it before the loop is allowed.
"""

import pytest
import torch

from fastdiff.denoiser import CFGDenoiser, DiscreteDenoiser, EDMDenoiser
from fastdiff.noise import NoiseSource
from fastdiff.samplers import SAMPLERS, invert_ddim
from helpers import sampler_test_options
from fastdiff.scheduler_config import plan_from_scheduler_config
from fastdiff.schedules import get_sigmas_karras, make_alphas_cumprod
from test_sampler_order import single_thread  # noqa: F401,E402  (autouse fixture)

_BANNED = {torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__float__,
           torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.numpy, torch.Tensor.cpu}


class NoSync(torch.Tensor):
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in _BANNED:
            raise AssertionError(f"host sync inside the sampling loop: Tensor.{func.__name__}")
        return super().__torch_function__(func, types, args, kwargs or {})


def guarded(x):
    return x.clone().as_subclass(NoSync)


class Net(torch.nn.Module):
    def __init__(self, out_channels=3):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, out_channels, 3, padding=1)

    def forward(self, x, t, class_labels=None, encoder_hidden_states=None):
        y = self.conv(x) + torch.sin(t.float() * 0.01)[:, None, None, None]
        if class_labels is not None:
            y = y + class_labels.float()[:, None, None, None] * 0.1
        return y


def _check(out):
    assert isinstance(out, NoSync)
    assert torch.isfinite(out.as_subclass(torch.Tensor)).all()


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_sampler_loop_never_syncs(name):
    torch.manual_seed(0)
    ac = make_alphas_cumprod("scaled_linear", 1000, 0.00085, 0.012)
    base = DiscreteDenoiser(Net(6), ac, "v_prediction", timestep_rounding="round", thresholding=True)
    cfg = CFGDenoiser(base, guidance_scale=3.0, guidance_rescale=0.7, guided_channels=2)
    sigmas = get_sigmas_karras(6, 0.03, 14.6)
    x = guarded(torch.randn(2, 3, 8, 8) * 14.6)
    extra = dict(class_labels=torch.tensor([1, 2]), uncond=dict(class_labels=torch.tensor([0, 0])))
    opts = dict(eta=0.5) if name == "ddim" else dict(s_churn=10.0) if name == "edm" else \
        sampler_test_options(name, ac, sigmas)
    _check(SAMPLERS[name](cfg, x, sigmas, extra_args=extra, noise=NoiseSource([3, 4]), **opts))
    if name == "tcd":  # lands on training timesteps: no EDM network
        return
    edm = EDMDenoiser(Net(), sigma_data=0.5, clip_sample=1.0)
    _check(SAMPLERS[name](edm, x, get_sigmas_karras(5), noise=NoiseSource([3, 4])))


@pytest.mark.parametrize("cls,cfg", [
    ("DDIMScheduler", dict(timestep_spacing="linspace")),   # clip_x0 + sigmas_to relabelling
    ("DDPMScheduler", dict(variance_type="fixed_large", timestep_spacing="trailing")),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++", solver_order=3)),
    ("DPMSolverSinglestepScheduler", dict(solver_order=3, algorithm_type="dpmsolver", final_sigmas_type="sigma_min")),
    ("UniPCMultistepScheduler", dict(solver_order=3, use_karras_sigmas=True)),
    ("EulerDiscreteScheduler", dict(timestep_spacing="linspace")),
])
def test_plans_never_sync(cls, cfg):
    plan = plan_from_scheduler_config({"_class_name": cls, **cfg}, 7)
    out = plan.sample(plan.make_denoiser(Net()), guarded(torch.randn(2, 3, 8, 8)), noise=NoiseSource([1, 2]))
    _check(out)


def test_inversion_never_syncs():
    den = EDMDenoiser(Net())
    _check(invert_ddim(den, guarded(torch.randn(2, 3, 8, 8)), get_sigmas_karras(5)))


def test_guard_catches_a_sync():
    with pytest.raises(AssertionError, match="host sync"):
        bool(guarded(torch.ones(1)) > 0)
