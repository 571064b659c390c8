"""What every sampler shares: the host grid, the float32 state, the denoiser call and the callback.

Kept apart from the samplers themselves so that sampler families in their own modules
(``fastdiff.linear_multistep``) use the same conventions without importing each other.
"""

from __future__ import annotations

import math
import numbers

import torch

from .errors import BadArgumentError


def host_sigmas(sigmas) -> list:
    """The grid as Python floats. A device tensor is refused: reading it would sync."""
    if torch.is_tensor(sigmas):
        if sigmas.device.type != "cpu":
            raise BadArgumentError(f"sigmas: expected a host (CPU) tensor or a list, found a tensor on "
                                   f"{sigmas.device}; build grids with fastdiff.schedules (they are host tensors)")
        sigmas = sigmas.tolist()
    out = [float(s) for s in sigmas]
    if len(out) < 2:
        raise BadArgumentError(f"sigmas: expected at least 2 values (start and end), found {len(out)}")
    bad = next((s for s in out if not (math.isfinite(s) and s >= 0)), None)
    if bad is not None:  # a NaN or negative noise level gives garbage samples without an error
        raise BadArgumentError(f"sigmas: expected finite noise levels >= 0, found {bad}")
    return out


def _ancestral(sigma: float, sigma_next: float, eta: float = 1.0):
    """Split a step sigma -> sigma_next into a deterministic part down to sigma_down and fresh noise of
    std sigma_up (sigma_down^2 + sigma_up^2 = sigma_next^2). eta=1 is the DDPM posterior."""
    if sigma_next > sigma:  # (a zero-terminal-SNR table's top can rise; only the ancestral split cannot take it)
        raise BadArgumentError(f"sigmas: an ancestral step needs sigma' <= sigma, found {sigma} then {sigma_next}")
    if sigma_next == 0 or eta == 0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * math.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2))
    return math.sqrt(sigma_next ** 2 - up ** 2), up


def _randn(i: int, like: torch.Tensor) -> torch.Tensor:
    return torch.randn_like(like)


def _setup(x, sigmas, extra_args, noise):
    """State in float32 at least (fp16/bf16 inputs are upcast; float64 is kept, for reference runs)."""
    if x.dtype != torch.float64:
        x = x.to(torch.float32)
    return x, host_sigmas(sigmas), (extra_args or {}), (noise or _randn)


def _call(denoiser, x, sigma: float, extra: dict) -> torch.Tensor:
    """The denoiser at a host sigma. fastdiff adapters take the host float directly (``denoise_at``:
    scalings worked out on the host); any other callable gets a (B,) sigma tensor filled on the device.
    Nothing is read back either way."""
    at = getattr(denoiser, "denoise_at", None)
    if at is not None:
        return at(x, sigma, **extra).to(x.dtype)
    s = torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device)
    return denoiser(x, s, **extra).to(x.dtype)


def _call_pair(denoiser, x, sigma: float, extra: dict) -> tuple:
    """(guided x0, the unconditional pass's x0) at a host sigma, for the CFG++ samplers: a guiding denoiser's
    ``denoise_pair_at`` (``fastdiff.denoiser.CFGDenoiser``); any other denoiser's x0 twice (no guidance: the
    conditional pass is the only one)."""
    at = getattr(denoiser, "denoise_pair_at", None)
    if at is None:
        d = _call(denoiser, x, sigma, extra)
        return d, d
    guided, uncond = at(x, sigma, **extra)
    return guided.to(x.dtype), uncond.to(x.dtype)


def _cb(callback, x, i, sigma, sigma_hat, denoised):
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})


def _after(after_step, x, sigma: float, last: bool):
    """The state a step hands on, through ``after_step(x, sigma, last)`` where one is given: a sampler calls it at
    the end of every step (``last`` on the run's final step) and on the state a two-stage step hands to its second
    network evaluation. ``sigma`` is the state's noise level, except on the first stage of the samplers that
    reproduce diffusers' two-stage schedulers (Heun, KDPM2 and its ancestral form, DPM-Solver SDE): the step's
    end sigma there, as those schedulers report it (their ``add_noise`` reads a sigma table that repeats each
    step's end), even where the stage lands on a midpoint. diffusers' inpainting pipelines paste the image's known
    region back at those points (``fastdiff.inpaint.KnownRegion``); a sampler keeps using what it returns."""
    return x if after_step is None else after_step(x, sigma, last)


def host_floats(name: str, values, n: int, *, positive: bool = False) -> list:
    """A per-step option (``sigmas_to``, ``c_skip``, ...) as ``n`` finite host floats, or a clear error."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise BadArgumentError(f"{name}: expected a sequence of {n} numbers, found {values!r}")
    if len(values) != n:
        raise BadArgumentError(f"{name}: expected {n} values (one per step), found {len(values)}")
    out = []
    for v in values:
        # numbers.Real takes numpy scalars too (a grid's float32 values); bool, a Real subclass, is no number here
        ok = isinstance(v, numbers.Real) and not isinstance(v, bool) or (torch.is_tensor(v) and v.numel() == 1)
        f = float(v) if ok else math.nan
        if not (math.isfinite(f) and (f > 0 or not positive)):
            raise BadArgumentError(f"{name}: expected finite numbers{' > 0' if positive else ''}, found {v!r}")
        out.append(f)
    return out


def multistep_order(i: int, n: int, order: int, lower_order_final: bool, euler_at_final: bool = False) -> int:
    """Order of step i of n in diffusers' multistep schedulers: rising 1, 2, .. to ``order`` as outputs
    accumulate; with ``lower_order_final`` and fewer than 15 steps the last two steps at orders 1 and 2 (they
    stabilise few-step runs); ``euler_at_final``: the last step at order 1 whatever the count."""
    k = min(order, i + 1)
    short = lower_order_final and n < 15
    if i == n - 1 and (euler_at_final or short):
        return 1
    if i == n - 2 and short:
        return min(k, 2)
    return k
