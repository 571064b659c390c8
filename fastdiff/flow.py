"""Flow-matching (rectified-flow) networks as a ``D(x, sigma) -> x0``, and their time grids.

A flow-matching network (diffusers' ``FlowMatchEulerDiscreteScheduler`` family, ``prediction_type=
"flow_prediction"``) is trained on the straight path x_t = (1 - t) x0 + t noise, t in [0, 1], and predicts the
velocity v = noise - x0 at timestep t * num_train_timesteps. The same state in the k-diffusion convention
(x = x0 + sigma noise) is x = x_t / (1 - t) at sigma = t / (1 - t). Samplers see it in one of two frames:

* the **sigma frame** (x = x_t / (1 - t), sigma = t / (1 - t)): every sampler's own math is exact there. The
  exponential integrators (DPM-Solver, UniPC, DEIS) are diffusers' flow variants (their alpha_t = 1 - t,
  sigma_t = t), and an ancestral step re-noises along the flow path. t = 1 (pure noise) is sigma = infinity,
  represented by ``INFINITE_SIGMA`` (the stand-in the zero-terminal-SNR tables use too, 1e10): DDIM-form steps
  (x0 + (sigma' / sigma)(x - x0)) lose nothing to it.
* the **t frame** (x = x_t, sigma = t): a sampler's d = (x - D) / sigma is then the velocity itself, so Euler,
  Heun, DPM-2 and the linear multistep methods integrate dx_t/dt = v, as diffusers' ``FlowMatchEulerDiscrete
  Scheduler`` / ``FlowMatchHeunDiscreteScheduler`` and ComfyUI do. (Euler is the same method in both frames;
  Heun is not, and from t = 1 it exists only in the t frame: its trapezoid in sigma spans an infinite step.)

``frame_for`` says which frame each sampler runs in; ``REFUSED`` the samplers that have no meaning here.

Two time conventions are read (``TIME_CONVENTIONS``): diffusers' (t = 1 is noise, timestep 1000 t, v = noise - x0)
and SiT's / the stochastic-interpolant and torchcfm codebases' ("sit": t = 0 is noise, t = 1 data, the network
takes t itself and predicts data - noise). Samplers always see diffusers' t; the denoiser translates.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from .denoiser import Denoiser, _model_dtype, _split_learned_variance, _to_state, cached_timesteps, \
    make_x0_postprocess
from .errors import BadArgumentError

INFINITE_SIGMA = 1e10  # t = 1 in the sigma frame (t = 1 - 1e-10 to float64; 1.0 in float32)
TIME_CONVENTIONS = ("diffusers", "sit")

# samplers that integrate a polynomial in sigma: the t frame (where d is the velocity); every other one: sigma frame
T_FRAME_SAMPLERS = ("euler", "heun", "edm", "dpm_2", "lms", "plms", "ipndm", "ipndm_v", "gradient_estimation",
                    "heunpp2")
# (dpm_2_ancestral runs in the sigma frame: its ancestral noise needs it. Its midpoint step, a polynomial in sigma,
# diverges from t = 1 (sigma = infinity), which the named sigma-frame grid never starts at.)
REFUSED = {
    "tcd": "its steps land on a discrete model's training timesteps; a flow-matching network has no such table",
}


def frame_for(sampler: str) -> str:
    """"t" or "sigma": the frame ``sampler`` runs in on a flow-matching network (see the module docstring)."""
    if sampler in REFUSED:
        raise BadArgumentError(f"sampler {sampler!r} on a flow-matching model: {REFUSED[sampler]}")
    return "t" if sampler in T_FRAME_SAMPLERS else "sigma"


def t_to_sigma(t: float) -> float:
    """The sigma-frame noise level of flow time t (t = 1: ``INFINITE_SIGMA``)."""
    t = float(t)
    return INFINITE_SIGMA if t >= 1.0 else t / (1.0 - t)


# --------------------------------------------------------------------------------------------------
# time grids (diffusers' FlowMatchEulerDiscreteScheduler arithmetic), t values in float64 arrays
# --------------------------------------------------------------------------------------------------

def shift_times(t, shift: float) -> np.ndarray:
    """SD3's resolution shift: t -> shift t / (1 + (shift - 1) t) (more steps at high noise for shift > 1)."""
    t = np.asarray(t, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):  # a degenerate setting: NaN, which the plan refuses
        return shift * t / (1 + (shift - 1) * t)


def time_shift(t, mu: float, kind: str = "exponential") -> np.ndarray:
    """Flux's dynamic shift for a resolution's ``mu``: e^mu / (e^mu + (1/t - 1)) ("exponential", the shift
    above with shift = e^mu) or mu / (mu + (1/t - 1)) ("linear")."""
    t = np.asarray(t, dtype=np.float64)
    if kind == "exponential":
        if abs(mu) > 100:  # e^mu overflows past 709; beyond 100 every time is 0 or 1 anyway
            raise BadArgumentError(f"mu: expected a dynamic shift in [-100, 100] (Flux's are 0.5 .. 1.15), found {mu}")
        with np.errstate(divide="ignore", invalid="ignore"):
            return math.exp(mu) / (math.exp(mu) + (1 / t - 1))
    if kind == "linear":
        with np.errstate(divide="ignore", invalid="ignore"):
            return mu / (mu + (1 / t - 1))
    raise BadArgumentError(f"time_shift_type: expected 'exponential' or 'linear', found {kind!r}")


def stretch_to_terminal(t, terminal: float) -> np.ndarray:
    """LTX-Video's ``shift_terminal``: rescale 1 - t so that the last time is ``terminal``."""
    if not 0 < terminal < 1:  # (at 1 every time but the last is 1: one step and wasted network calls)
        raise BadArgumentError(f"shift_terminal: expected a final time in (0, 1), found {terminal}")
    t = np.asarray(t, dtype=np.float64)
    one_minus = 1 - t
    with np.errstate(divide="ignore", invalid="ignore"):
        return 1 - one_minus / (one_minus[-1] / (1 - terminal))


def dynamic_shift_mu(seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                     max_shift: float = 1.15) -> float:
    """The ``mu`` diffusers' Flux / SD3 pipelines pass for ``seq_len`` image tokens: linear in the token count,
    base_shift at base_seq_len, max_shift at max_seq_len (their ``calculate_shift``)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return seq_len * m + (base_shift - m * base_seq_len)


# --------------------------------------------------------------------------------------------------
# the denoiser
# --------------------------------------------------------------------------------------------------

class FlowDenoiser(Denoiser):
    """A velocity-predicting flow-matching network as ``D(x, sigma) -> x0``, in the sigma or the t frame.

    Args:
        model: ``model(x_t, timestep, **cond) -> v`` (v = noise - x0; learned-variance channels are split off).
        frame: "sigma" (x = x_t / (1 - t), sigma = t / (1 - t)) or "t" (x = x_t, sigma = t).
        num_train_timesteps: the network's timestep is t * num_train_timesteps.
        timesteps: {sigma: timestep} for the grid's sigmas, as the scheduler that made the grid feeds them (its
            float32 products, or diffusers' int64 truncation in the DPM-Solver / UniPC flow variants).
        clip_sample / thresholding / dynamic_thresholding_ratio / sample_max_value: x0 post-processing.
        time_convention: "diffusers" or "sit" (the network takes 1 - t, unscaled, and predicts x0 - noise).
        dtype: the network's dtype (default: its parameters' dtype).
    """

    def __init__(self, model, frame: str = "sigma", *, num_train_timesteps: int = 1000,
                 timesteps: Optional[dict] = None, clip_sample: Optional[float] = None, thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
                 time_convention: str = "diffusers", dtype: Optional[torch.dtype] = None):
        if frame not in ("sigma", "t"):
            raise BadArgumentError(f"frame: expected 'sigma' or 't', found {frame!r}")
        if time_convention not in TIME_CONVENTIONS:
            raise BadArgumentError(f"time_convention: expected one of {TIME_CONVENTIONS}, found {time_convention!r}")
        self.model, self.frame = model, frame
        self.sit = time_convention == "sit"
        self.num_train_timesteps = int(num_train_timesteps)
        self.timesteps = {float(k): float(v) for k, v in (timesteps or {}).items()}
        self.dtype = _model_dtype(model, dtype)
        self.postprocess_x0 = make_x0_postprocess(clip_sample, thresholding, dynamic_thresholding_ratio,
                                                  sample_max_value)
        self._timestep_tensors = {}

    def flow_time(self, sigma):
        """t for a noise level of this frame (a float or a tensor)."""
        return sigma if self.frame == "t" else sigma / (1 + sigma)

    def c_skip(self, sigma):
        """x0 = c_skip x + c_out v: x_t = x / (1 + sigma) in the sigma frame, x itself in the t frame."""
        return sigma * 0 + 1 if self.frame == "t" else 1 / (1 + sigma)

    def network_timestep(self, t):
        """What the network is fed at flow time t (diffusers' t)."""
        return 1 - t if self.sit else t * self.num_train_timesteps

    def predict_at(self, x, sigma: float, **cond):
        sigma = float(sigma)
        t = self.flow_time(sigma)
        timestep = self.timesteps.get(sigma, self.network_timestep(t))
        ts = cached_timesteps(self._timestep_tensors, timestep, x)
        c_in = self.c_skip(sigma)                              # the network sees x_t
        inp = x if c_in == 1 else x * c_in
        out = self.model(inp if inp.dtype == self.dtype else inp.to(self.dtype), ts, **cond)
        out = _to_state(_split_learned_variance(out, x.shape[1]), x)
        return torch.add(inp, out, alpha=t if self.sit else -t)   # x0 = x_t - t v (SiT's v has the other sign)

    def predict(self, x, sigma, **cond):
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        sigma64 = sigma.to(torch.float64)
        t = self.flow_time(sigma64).to(torch.float32)
        s = t.reshape(-1, *([1] * (x.ndim - 1)))
        # 1 / (1 + sigma) from float64: at the t = 1 stand-in, 1 - t rounds to 0 in float32 where 1e-10 does not
        x_t = x if self.frame == "t" else x * (1 / (1 + sigma64)).to(x.dtype).reshape(s.shape)
        out = self.model(x_t.to(self.dtype), self.network_timestep(t), **cond)
        v = _split_learned_variance(out, x.shape[1]).to(torch.float32)
        return x_t + s * v if self.sit else x_t - s * v
