"""Denoisers: one contract, ``D(x, sigma, **cond) -> x0``, for every sampler.

``x`` is the sampler state in the k-diffusion / EDM convention (``x = x0 + sigma * eps``, float32),
``sigma`` one noise level per sample (shape (B,) or broadcastable). The adapters here turn a network into
that contract, so a sampler never sees a parameterisation:

* ``DiscreteDenoiser``: a network trained on a discrete DDPM schedule (eps / v / x0 prediction). sigma is
  mapped to the network's timestep (exactly onto the training grid, log-sigma interpolation between), x is
  scaled by ``c_in = 1/sqrt(sigma^2 + 1)`` (the variance-preserving input the network was trained on).
* ``EDMDenoiser``: EDM preconditioning (c_skip, c_out, c_in, c_noise = ln(sigma)/4, sigma_data).
* ``CFGDenoiser``: classifier-free guidance as ONE batched call (uncond + cond stacked on the batch).
* ``FoldedCFGDenoiser``: the same call for a network that guides inside (a CFG-folded exported graph).

Every adapter splits a call into ``predict`` (raw x0) and ``postprocess`` (clip_sample / dynamic
thresholding), so that guidance is applied before clipping as diffusers does, and DDIM can clip x0 while
keeping the network's own eps (diffusers' ``use_clipped_model_output=False``).

The network is any callable ``model(x, timestep, class_labels=None, encoder_hidden_states=None)``; it may
run in fp16: inputs are cast to its dtype and its output back to float32. Nothing here reads a device
value back to the host.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch

from .errors import BadArgumentError
from .utils.layout import is_dense, same_layout
from .utils.trees import zip_tensors

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


# --------------------------------------------------------------------------------------------------
# x0 post-processing
# --------------------------------------------------------------------------------------------------

def dynamic_threshold(x0: torch.Tensor, ratio: float = 0.995, max_value: float = 1.0) -> torch.Tensor:
    """Imagen's dynamic thresholding: per sample, s = clamp(quantile(|x0|, ratio), 1, max_value);
    x0 -> clamp(x0, -s, s) / s."""
    flat = x0.reshape(x0.shape[0], -1)
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (torch.maximum(torch.minimum(flat, s), -s) / s).reshape(x0.shape)


def make_x0_postprocess(clip_sample: Optional[float] = None, thresholding: bool = False,
                        dynamic_thresholding_ratio: float = 0.995,
                        sample_max_value: float = 1.0) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """The x0 post-processing diffusers applies (thresholding wins over clipping), or None."""
    if thresholding:
        return lambda x0: dynamic_threshold(x0, dynamic_thresholding_ratio, sample_max_value)
    if clip_sample is not None:
        r = float(clip_sample)
        return lambda x0: x0.clamp(-r, r)
    return None


class Denoiser:
    """Base: ``__call__ = postprocess(predict(...))``. Subclasses implement ``predict`` and ``c_skip``.

    ``denoise_at(x, sigma: float)`` is the same call for one host sigma shared by the batch (what every
    sampler step is): adapters override ``predict_at`` to work out their scalings on the host, once per
    sigma, leaving only the network and two or three tensor ops on the device.
    """

    postprocess_x0: Optional[Callable] = None

    def predict(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        raise NotImplementedError

    def predict_at(self, x: torch.Tensor, sigma: float, **cond) -> torch.Tensor:
        s = torch.full((x.shape[0],), float(sigma), dtype=torch.float32, device=x.device)
        return self.predict(x, s, **cond)

    def predict_variance_at(self, x: torch.Tensor, sigma: float, **cond):
        """(x0, v): ``predict_at``'s x0 and the network's learned-variance channels v (float32, x's shape; nominally in
        [-1, 1] for guided-diffusion / DiT networks): what DDPM with a learned variance (diffusers' ``variance_type``
        "learned_range") samples its noise from. Adapters of networks without such channels refuse."""
        raise BadArgumentError(f"variance: a learned variance needs a discrete-time network that predicts one "
                               f"(2 x the latent channels: eps, then the variance values); {type(self).__name__} "
                               f"has none")

    def c_skip(self, sigma):
        """x0 = c_skip * x + c_out * network_output (sigma a float or a tensor): lets guidance_rescale
        work in the network-output space."""
        raise NotImplementedError

    def postprocess(self, x0: torch.Tensor) -> torch.Tensor:
        return x0 if self.postprocess_x0 is None else self.postprocess_x0(x0)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        return self.postprocess(self.predict(x, sigma, **cond))

    def denoise_at(self, x: torch.Tensor, sigma: float, **cond) -> torch.Tensor:
        return self.postprocess(self.predict_at(x, sigma, **cond))

    def denoise_variance_at(self, x: torch.Tensor, sigma: float, **cond):
        """(postprocessed x0, learned-variance channels): ``predict_variance_at`` with x0 clipped as ``denoise_at``
        clips it."""
        x0, v = self.predict_variance_at(x, sigma, **cond)
        return self.postprocess(x0), v


def _model_dtype(model, dtype):
    if dtype is not None:
        return dtype
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            return p.dtype if p.is_floating_point() else torch.float32
    return torch.float32


def _split_learned_variance(out: torch.Tensor, channels: int) -> torch.Tensor:
    """Networks with learned variance (guided-diffusion, DiT) return 2*C channels: keep the first C."""
    if out.shape[1] == channels:
        return out
    if out.shape[1] == 2 * channels:
        return out[:, :channels]
    raise BadArgumentError(f"network output: expected {channels} (or {2 * channels} with learned variance) "
                           f"channels, found {out.shape[1]}")


def _to_state(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The network output in the sampler state's dtype and (contiguous) layout, in one cast-and-copy at most.

    A channels-last network, or a learned-variance slice, returns another layout than the state's: every later
    element-wise op would then run strided, and the fused state update (``fastdiff.state_update``) would fall
    back to torch. For a half-precision network this costs nothing: the cast to float32 copies anyway."""
    if out.dtype == x.dtype and same_layout(out, x):
        return out
    if is_dense(x):  # x's own layout (contiguous or channels-last), cast and copied in one kernel
        return torch.empty_like(x).copy_(out)
    return out.to(x.dtype)


def cached_timesteps(cache: dict, t: float, x: torch.Tensor) -> torch.Tensor:
    """The (B,) float32 timestep tensor for host timestep ``t`` at x's batch and device, built once and reused
    (one launch fewer per step). The same object on every run is what lets a captured loop's modulation
    schedule (``fastdiff.models.modulation_schedule``) recognise a call. The cache is bounded and never
    cleared: a captured CUDA graph may read a cached tensor's address."""
    key = (t, x.shape[0], x.device)
    ts = cache.get(key)
    if ts is None:
        ts = torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device)
        if len(cache) < 4096:
            cache[key] = ts
    return ts


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) or scalar -> shape broadcastable against x."""
    v = v.to(x.dtype)
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim)) if v.ndim == 1 else v


# --------------------------------------------------------------------------------------------------
# Discrete-time (DDPM-schedule) networks
# --------------------------------------------------------------------------------------------------

class DiscreteDenoiser(Denoiser):
    """A network trained on a discrete DDPM schedule, as a ``D(x, sigma) -> x0``.

    Args:
        model: ``model(x, timestep, **cond)``.
        alphas_cumprod: the training schedule (float32, one entry per training timestep).
        prediction_type: "epsilon", "v_prediction" or "sample".
        timestep_rounding: None (fractional timesteps), "round" (nearest training step, what diffusers'
            DDIM / DPM-Solver / UniPC feed the network) or "floor" (diffusers' int64 cast of a fractional
            timestep).
        interpolation: "log" (sigma -> t by linear interpolation of log sigma; exact on the training grid)
            or "linear" (linear in sigma: the inverse of diffusers' ``np.interp`` used by the Euler-family
            schedulers for fractional 'linspace' timesteps).
        timestep_type: "discrete" (the training index) or "continuous" (0.25 * ln(sigma), diffusers'
            Euler ``timestep_type="continuous"``).
        clip_sample / thresholding / dynamic_thresholding_ratio / sample_max_value: x0 post-processing.
        timesteps: {sigma: timestep} for the grid's sigmas, as the scheduler that made the grid feeds the network
            (its timesteps before the sigmas were rounded to float32); any other sigma is inverted from the table.
            A zero-terminal-SNR table is not monotonic, and a Karras grid's top sigma may sit a rounding error
            below the table's last entry: the inverse alone would not give diffusers' timesteps there.
        dtype: the network's dtype (default: its parameters' dtype, else float32).
        timestep_scale: the network reads timestep * timestep_scale (improved-diffusion's ``rescale_timesteps``:
            1000 / T).
    """

    def __init__(self, model, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon", *,
                 timestep_rounding: Optional[str] = None, interpolation: str = "log",
                 timestep_type: str = "discrete", clip_sample: Optional[float] = None, thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
                 timesteps: Optional[dict] = None, dtype: Optional[torch.dtype] = None, timestep_scale: float = 1.0):
        if prediction_type not in PREDICTION_TYPES:
            raise BadArgumentError(f"prediction_type: expected one of {PREDICTION_TYPES}, found {prediction_type!r}")
        if timestep_rounding not in (None, "round", "floor"):
            raise BadArgumentError(f"timestep_rounding: expected None, 'round' or 'floor', found {timestep_rounding!r}")
        if interpolation not in ("log", "linear"):
            raise BadArgumentError(f"interpolation: expected 'log' or 'linear', found {interpolation!r}")
        if timestep_type not in ("discrete", "continuous"):
            raise BadArgumentError(f"timestep_type: expected 'discrete' or 'continuous', found {timestep_type!r}")
        self.model = model
        self.prediction_type = prediction_type
        self.timestep_rounding = timestep_rounding
        self.interpolation = interpolation
        self.timestep_type = timestep_type
        self.timestep_scale = float(timestep_scale)
        self.timesteps = {float(k): float(v) for k, v in (timesteps or {}).items()}
        self.dtype = _model_dtype(model, dtype)
        self.postprocess_x0 = make_x0_postprocess(clip_sample, thresholding, dynamic_thresholding_ratio,
                                                  sample_max_value)
        ac = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float32)
        self.alphas_cumprod = ac
        # The float32 sigma table (what diffusers holds), kept in float64 for an exact inverse.
        self.sigmas = (((1 - ac) / ac) ** 0.5).to(torch.float64)
        self.log_sigmas = self.sigmas.log()
        self.sigma_min, self.sigma_max = float(self.sigmas[0]), float(self.sigmas[-1])
        self._tables, self._coeffs, self._timestep_tensors = {}, {}, {}

    def _table(self, device: torch.device):
        """Per-device copies of the lookup tables (float64 where the device has it)."""
        t = self._tables.get(device)
        if t is None:
            dt = torch.float32 if device.type == "mps" else torch.float64
            t = (self.log_sigmas.to(device, dt), self.sigmas.to(device, dt))
            self._tables[device] = t
        return t

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Training timestep for each sigma, on sigma's device, no host sync."""
        log_table, table = self._table(sigma.device)
        s = sigma.to(table.dtype)
        if self.timestep_type == "continuous":
            return 0.25 * s.log() * self.timestep_scale
        n = table.shape[0]
        if self.interpolation == "log":
            ref, key = log_table, s.clamp(min=1e-10).log()
        else:
            ref, key = table, s
        # the last table entry <= sigma (diffusers' _sigma_to_t): a sorted search would misplace sigmas on a
        # zero-terminal-SNR table, whose last entry (clamped to alphas_cumprod 2**-24) is below the one before it
        index = torch.arange(n, device=ref.device)
        low = torch.where(ref[None, :] <= key.reshape(-1, 1), index, 0).amax(dim=1).reshape(key.shape).clamp(0, n - 2)
        lo, hi = ref[low], ref[low + 1]
        w = ((key - lo) / (hi - lo)).clamp(0, 1)
        t = low.to(table.dtype) + w
        if self.timestep_rounding == "round":
            t = t.round()
        elif self.timestep_rounding == "floor":
            t = t.floor()
        if self.timesteps:  # the grid's own timesteps, as _host_coeffs takes them (an exact match, no host sync)
            keys, values = self._timestep_table(s.device, s.dtype)
            i = torch.searchsorted(keys, s.contiguous()).clamp(max=keys.numel() - 1)
            t = torch.where(keys[i] == s, values[i], t)
        return t * self.timestep_scale if self.timestep_scale != 1.0 else t

    def _timestep_table(self, device: torch.device, dtype: torch.dtype):
        """The ``timesteps`` map as sorted (sigma, timestep) tensors on ``device``."""
        key = ("timesteps", device, dtype)
        table = self._tables.get(key)
        if table is None:
            items = sorted(self.timesteps.items())
            table = self._tables[key] = (torch.tensor([k for k, _ in items], dtype=dtype, device=device),
                                         torch.tensor([v for _, v in items], dtype=dtype, device=device))
        return table

    def c_skip(self, sigma):
        if self.prediction_type == "epsilon":
            return sigma * 0 + 1
        if self.prediction_type == "v_prediction":
            return 1 / (sigma ** 2 + 1)
        return sigma * 0

    def _host_coeffs(self, sigma: float):
        """(timestep, c_in, c_skip, c_out) for one host sigma, cached: x0 = c_skip x + c_out F(c_in x, t)."""
        c = self._coeffs.get(sigma)
        if c is None:
            if len(self._coeffs) > 4096:  # bounded like the timestep tensors
                self._coeffs.clear()
            if sigma in self.timesteps:
                t = self.timesteps[sigma]
            elif self.timestep_type == "continuous":
                t = 0.25 * math.log(sigma)
            else:
                ref = self.log_sigmas.numpy() if self.interpolation == "log" else self.sigmas.numpy()
                key = math.log(max(sigma, 1e-10)) if self.interpolation == "log" else sigma
                below = np.nonzero(ref <= key)[0]  # the last entry <= sigma, as in sigma_to_t
                low = min(int(below[-1]) if below.size else 0, len(ref) - 2)
                w = min(max((key - ref[low]) / (ref[low + 1] - ref[low]), 0.0), 1.0)
                t = low + w
                t = float(np.round(t)) if self.timestep_rounding == "round" else \
                    float(math.floor(t)) if self.timestep_rounding == "floor" else t
            c_in = 1 / math.sqrt(sigma * sigma + 1)
            c_skip, c_out = {"epsilon": (1.0, -sigma), "v_prediction": (c_in * c_in, -sigma * c_in),
                             "sample": (0.0, 1.0)}[self.prediction_type]
            c = self._coeffs[sigma] = (t * self.timestep_scale, c_in, c_skip, c_out)
        return c

    def _network_at(self, x, sigma: float, **cond):
        """The network's raw output at one host sigma, and that sigma's (c_skip, c_out)."""
        t, c_in, c_skip, c_out = self._host_coeffs(float(sigma))
        ts = cached_timesteps(self._timestep_tensors, t, x)
        inp = x * c_in
        return self.model(inp if inp.dtype == self.dtype else inp.to(self.dtype), ts, **cond), c_skip, c_out

    def predict_at(self, x, sigma: float, **cond):
        out, c_skip, c_out = self._network_at(x, sigma, **cond)
        return self._x0(x, _to_state(_split_learned_variance(out, x.shape[1]), x), c_skip, c_out)

    def predict_variance_at(self, x, sigma: float, **cond):
        out, c_skip, c_out = self._network_at(x, sigma, **cond)
        c = x.shape[1]
        if out.shape[1] != 2 * c:
            raise BadArgumentError(f"variance: a learned variance needs a network of {2 * c} output channels (eps, "
                                   f"then the variance values), found {out.shape[1]}")
        return self._x0(x, _to_state(out[:, :c], x), c_skip, c_out), _to_state(out[:, c:], x)

    @staticmethod
    def _x0(x, out, c_skip: float, c_out: float):
        """x0 = c_skip x + c_out out, in as few launches as the coefficients allow."""
        if c_skip == 1.0:
            return torch.add(x, out, alpha=c_out)
        if c_skip == 0.0:
            return out * c_out if c_out != 1.0 else out
        return torch.add(x * c_skip, out, alpha=c_out)

    def predict(self, x, sigma, **cond):
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        t = self.sigma_to_t(sigma).to(torch.float32)
        s = _bcast(sigma, x)
        c_in = (s * s + 1).rsqrt()
        out = self.model((x * c_in).to(self.dtype), t, **cond)
        out = _split_learned_variance(out, x.shape[1]).to(torch.float32)
        if self.prediction_type == "epsilon":  # x = x0 + sigma * eps
            return x - s * out
        if self.prediction_type == "v_prediction":  # x0 = alpha * x_vp - sigma_vp * v, in sigma units
            return x * (c_in * c_in) - out * (s * c_in)
        return out


# --------------------------------------------------------------------------------------------------
# EDM preconditioning
# --------------------------------------------------------------------------------------------------

class EDMDenoiser(Denoiser):
    """Karras et al. 2022, Table 1: D(x, sigma) = c_skip x + c_out F(c_in x, c_noise).

    c_skip = sd^2/(sigma^2+sd^2), c_out = sigma*sd/sqrt(sigma^2+sd^2), c_in = 1/sqrt(sigma^2+sd^2),
    c_noise = ln(sigma)/4. ``prediction_type="v_prediction"`` flips the sign of c_out (diffusers' EDM
    schedulers); "sample" means the network returns x0 directly.

    Consistency models (Song et al. 2023, appendix C) shift the boundary to ``sigma_offset`` = eps: c_skip =
    sd^2/((sigma-eps)^2+sd^2), c_out = (sigma-eps)*sd/sqrt(sigma^2+sd^2), so D is the identity at sigma = eps;
    their networks take c_noise = ``noise_scale`` * ln(sigma) with noise_scale 250 (diffusers'
    ``CMStochasticIterativeScheduler``).
    """

    def __init__(self, model, sigma_data: float = 0.5, prediction_type: str = "epsilon", *,
                 clip_sample: Optional[float] = None, thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
                 dtype: Optional[torch.dtype] = None, sigma_offset: float = 0.0, noise_scale: float = 0.25):
        if prediction_type not in PREDICTION_TYPES:
            raise BadArgumentError(f"prediction_type: expected one of {PREDICTION_TYPES}, found {prediction_type!r}")
        self.model, self.sigma_data, self.prediction_type = model, float(sigma_data), prediction_type
        self.sigma_offset, self.noise_scale = float(sigma_offset), float(noise_scale)
        self.dtype = _model_dtype(model, dtype)
        self.postprocess_x0 = make_x0_postprocess(clip_sample, thresholding, dynamic_thresholding_ratio,
                                                  sample_max_value)

    def c_skip(self, sigma):
        if self.prediction_type == "sample":
            return sigma * 0
        return self.sigma_data ** 2 / ((sigma - self.sigma_offset) ** 2 + self.sigma_data ** 2)

    def _c_noise(self, sigma):
        if self.sigma_offset == 0 and self.noise_scale == 0.25:
            return 0.25 * (math.log(sigma) if isinstance(sigma, float) else sigma.log())
        # the consistency models' ln(sigma + 1e-44), as diffusers writes it
        return self.noise_scale * (math.log(sigma + 1e-44) if isinstance(sigma, float) else (sigma + 1e-44).log())

    def predict_at(self, x, sigma: float, **cond):
        sigma, sd = float(sigma), self.sigma_data
        c_in = 1 / math.sqrt(sigma * sigma + sd * sd)
        c_noise = torch.full((x.shape[0],), self._c_noise(sigma), dtype=torch.float32, device=x.device)
        out = self.model((x * c_in).to(self.dtype), c_noise, **cond)
        out = _to_state(_split_learned_variance(out, x.shape[1]), x)
        if self.prediction_type == "sample":
            return out
        c_out = (sigma - self.sigma_offset) * sd * c_in * (-1 if self.prediction_type == "v_prediction" else 1)
        return torch.add(x * self.c_skip(sigma), out, alpha=c_out)

    def predict(self, x, sigma, **cond):
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        sd = self.sigma_data
        s = _bcast(sigma, x)
        c_in = (s * s + sd * sd).rsqrt()
        out = self.model((x * c_in).to(self.dtype), self._c_noise(sigma), **cond)
        out = _split_learned_variance(out, x.shape[1]).to(torch.float32)
        if self.prediction_type == "sample":
            return out
        c_out = (s - self.sigma_offset) * sd * c_in
        if self.prediction_type == "v_prediction":
            c_out = -c_out
        return x * self.c_skip(s) + out * c_out


# --------------------------------------------------------------------------------------------------
# Classifier-free guidance
# --------------------------------------------------------------------------------------------------

class CFGDenoiser(Denoiser):
    """Classifier-free guidance around any ``Denoiser``, as ONE batched network call.

    ``cfg(x, sigma, uncond={...}, **cond)``: every conditioning tensor in ``cond`` is stacked with its
    counterpart in ``uncond`` along the batch ([uncond, cond], diffusers' order); keys absent from
    ``uncond`` are shared (repeated). Guidance is linear in x0 exactly as in the network's output, so it
    is applied to x0 and equals diffusers' guidance on eps / v.

    Args:
        guidance_scale: w in uncond + w * (cond - uncond). 1.0 skips the unconditional pass entirely. None: w
            comes with each call, ``guidance_scale=`` a (B,) tensor among the conditioning, one per sample (what
            ``Pipeline.generate`` passes: samples of different scales then share a batch, and a captured loop takes
            the scales as an input instead of baking one in).
        guidance_rescale: phi of Lin et al. 2023 (diffusers' ``rescale_noise_cfg``), computed in the
            network's output space (std ratio of cond vs guided prediction, per sample). A call may bring its
            own, ``guidance_rescale=`` a (B,) tensor among the conditioning (what ``Pipeline.generate`` passes: a
            captured loop then reads phi from its inputs, and a new value replays the same graph).
        guided_channels: guide only the first K channels (official DiT guides channels 0..2; the rest
            keep the conditional prediction).
    """

    def __init__(self, inner: Denoiser, guidance_scale: Optional[float] = 1.0, guidance_rescale: float = 0.0,
                 guided_channels: Optional[int] = None):
        self.inner = inner
        self.guidance_scale = None if guidance_scale is None else float(guidance_scale)
        self.guidance_rescale = float(guidance_rescale)
        self.guided_channels = guided_channels
        self.postprocess_x0 = getattr(inner, "postprocess_x0", None)

    def c_skip(self, sigma):
        return self.inner.c_skip(sigma)

    def predict(self, x, sigma, uncond: Optional[dict] = None, guidance_scale=None, guidance_rescale=None, **cond):
        w = self._scale(guidance_scale)
        if w is None:
            return self.inner.predict(x, sigma, **cond)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        both = self._stack(cond, uncond)
        x0_u, x0_c = self.inner.predict(torch.cat([x, x]), torch.cat([sigma, sigma]), **both).chunk(2)
        return self._guide(x, x0_u, x0_c, _bcast(self.c_skip(sigma), x), w, guidance_rescale)

    def predict_at(self, x, sigma: float, uncond: Optional[dict] = None, guidance_scale=None, guidance_rescale=None,
                   **cond):
        w = self._scale(guidance_scale)
        if w is None:
            return self.inner.predict_at(x, sigma, **cond)
        x0_u, x0_c = self.inner.predict_at(torch.cat([x, x]), sigma, **self._stack(cond, uncond)).chunk(2)
        return self._guide(x, x0_u, x0_c, float(self.c_skip(float(sigma))), w, guidance_rescale)

    def denoise_pair_at(self, x, sigma: float, uncond: Optional[dict] = None, guidance_scale=None,
                        guidance_rescale=None, **cond):
        """(the guided x0, the unconditional pass's x0), both post-processed: what the CFG++ samplers step with
        (``fastdiff.cfg_pp``). Unguided (a fixed scale of 1), the conditional x0 twice."""
        w = self._scale(guidance_scale)
        if w is None:
            x0 = self.denoise_at(x, sigma, **cond)
            return x0, x0
        x0_u, x0_c = self.inner.predict_at(torch.cat([x, x]), sigma, **self._stack(cond, uncond)).chunk(2)
        guided = self._guide(x, x0_u, x0_c, float(self.c_skip(float(sigma))), w, guidance_rescale)
        k = self.guided_channels
        if k is not None:  # (unguided channels keep the conditional x0 on both sides: their plain step)
            x0_u = torch.cat([x0_u[:, :k], x0_c[:, k:]], dim=1)
        return self.postprocess(guided), self.postprocess(x0_u)

    def predict_variance_at(self, x, sigma: float, uncond: Optional[dict] = None, guidance_scale=None,
                            guidance_rescale=None, **cond):
        """The guided x0, and the conditional pass's variance channels (as official DiT's sample.py keeps the
        conditional half's, and diffusers' UnCLIP / Kandinsky pipelines the text pass's)."""
        w = self._scale(guidance_scale)
        if w is None:
            return self.inner.predict_variance_at(x, sigma, **cond)
        x0, v = self.inner.predict_variance_at(torch.cat([x, x]), sigma, **self._stack(cond, uncond))
        x0_u, x0_c = x0.chunk(2)
        return self._guide(x, x0_u, x0_c, float(self.c_skip(float(sigma))), w, guidance_rescale), v.chunk(2)[1]

    def _scale(self, per_call):
        """This call's w: the per-sample (B,) tensor it was given, else the fixed scale; None for no guidance."""
        if per_call is not None:
            return per_call
        if self.guidance_scale is None:
            raise BadArgumentError("guidance_scale: this CFGDenoiser takes one per sample with each call (a (B,) "
                                   "tensor among the conditioning), found none")
        return None if self.guidance_scale == 1.0 else self.guidance_scale

    @staticmethod
    def _stack(cond, uncond):
        """[uncond, cond] along the batch for every tensor of the conditioning."""
        uncond = uncond or {}
        for k in uncond:
            if k not in cond:
                raise BadArgumentError(f"uncond: expected keys among the conditioning {sorted(cond)}, found {k!r}")
        def pair(c, u):  # a tensor, or a tuple / list of them (several IP-Adapters' features)
            if isinstance(c, (tuple, list)):
                return zip_tensors(lambda ci, ui: torch.cat([ui, ci]), c, u)
            return torch.cat([u, c]) if torch.is_tensor(c) else c

        return {k: pair(v, uncond.get(k, v)) for k, v in cond.items()}

    def _guide(self, x, x0_u, x0_c, c_skip, w, phi=None):
        k = self.guided_channels
        if torch.is_tensor(w):
            w = _bcast(w.to(x0_c.device), x0_c)  # (B,) -> (B, 1, ..., 1), in x0's precision
        if k is None:
            x0 = x0_u + w * (x0_c - x0_u)
        else:
            x0 = torch.cat([x0_u[:, :k] + w * (x0_c[:, :k] - x0_u[:, :k]), x0_c[:, k:]], dim=1)
        per_sample = phi is not None
        if per_sample:  # this call's (B,) phi
            phi = _bcast(phi.to(x0.device), x0)
        else:
            phi = self.guidance_rescale
            if phi <= 0:
                return x0
        # rescale_noise_cfg in the network-output space: out = (x0 - c_skip x) / c_out, and the per-sample std
        # ratio does not depend on c_out.
        base = c_skip * x
        g, c = x0 - base, x0_c - base
        dims = list(range(1, x.ndim))
        ratio = c.std(dim=dims, keepdim=True) / g.std(dim=dims, keepdim=True)
        rescaled = base + g * (phi * ratio + (1 - phi))
        # a row at phi <= 0 keeps its guided x0 exactly, as its own run without the rescale (diffusers: phi > 0)
        return torch.where(phi > 0, rescaled, x0) if per_sample else rescaled



# conditioning a CFG-folded graph has no uncond_ input for: the null class label is inside the graph; FLUX.1 dev's
# distilled guidance, an inpainting network's image latents and a ControlNet's image, guess-mode flags and step
# window (applied before the graph), a FLUX.1 Union ControlNet's types and the text a FLUX.1 ControlNet reads are
# shared by both passes
_FOLDED_INSIDE = ("class_labels", "guidance", "image_latents", "control_image", "control_guess", "control_keep",
                  "control_mode", "control_encoder_hidden_states", "control_text_embeds")


class FoldedCFGDenoiser(Denoiser):
    """Classifier-free guidance for a network that guides inside (a CFG-folded ONNX / TensorRT graph).

    Takes the same call as ``CFGDenoiser`` (``uncond={...}``, ``guidance_scale=`` (B,)) and hands both to the
    network as its ``uncond_<name>`` and ``guidance_scale`` inputs: one call at batch B, whose output is already
    ``uncond + w * (cond - uncond)``. x0 is linear in the network's output, so this equals ``CFGDenoiser``'s guidance
    on x0. A class model's unconditional label is the graph's own (its null class), so ``uncond`` class labels are
    not passed. With no ``uncond`` (an unguided run) the conditional inputs stand in, at scale 1.
    """

    def __init__(self, inner: Denoiser):
        self.inner = inner
        self.postprocess_x0 = getattr(inner, "postprocess_x0", None)

    def c_skip(self, sigma):
        return self.inner.c_skip(sigma)

    @staticmethod
    def _folded(x, cond, uncond, guidance_scale) -> dict:
        if guidance_scale is None:
            guidance_scale = torch.ones(x.shape[0], dtype=torch.float32, device=x.device)
        uncond = cond if uncond is None else uncond
        out = dict(cond, guidance_scale=guidance_scale)
        for k, v in uncond.items():
            if k not in cond:
                raise BadArgumentError(f"uncond: expected keys among the conditioning {sorted(cond)}, found {k!r}")
            if k not in _FOLDED_INSIDE and (torch.is_tensor(v) or isinstance(v, (list, tuple))):
                out["uncond_" + k] = v  # (a list: several IP-Adapters' image features)
        return out

    def predict(self, x, sigma, uncond: Optional[dict] = None, guidance_scale=None, **cond):
        return self.inner.predict(x, sigma, **self._folded(x, cond, uncond, guidance_scale))

    def predict_at(self, x, sigma: float, uncond: Optional[dict] = None, guidance_scale=None, **cond):
        return self.inner.predict_at(x, sigma, **self._folded(x, cond, uncond, guidance_scale))

    def predict_variance_at(self, x, sigma: float, uncond: Optional[dict] = None, guidance_scale=None, **cond):
        # (the folded graph's variance channels are its conditional pass's: export/onnx.py)
        return self.inner.predict_variance_at(x, sigma, **self._folded(x, cond, uncond, guidance_scale))
