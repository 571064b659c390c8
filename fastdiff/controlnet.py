"""``generate(control_image=...)``: a ControlNet's inputs, as diffusers' ``StableDiffusionControlNetPipeline`` and its
img2img / inpainting / SDXL siblings prepare them.

* The control image is read as img2img reads an image (PIL, NumPy, tensor; ``fastdiff.img2img.unit_images``) into
  [0, 1], and is not resized: its size fixes the output's, as a control image does in diffusers when no height or
  width is given. Both CFG passes read it.
* ``controlnet_conditioning_scale`` weights the ControlNet's outputs; in ``guess_mode`` the unconditional pass gets
  none of them (scale 0, which is diffusers' zeros) and the conditional pass's are weighted from 0.1 to 1.
* ``control_guidance_start`` / ``_end`` keep the ControlNet for the steps ``i`` (of ``N``) with ``start <= i / N``
  and ``(i + 1) / N <= end``, diffusers' ``controlnet_keep``. The window is handed to the network as the range of
  sigmas of those steps (``ControlWindow``), a tensor, so a captured loop takes new windows without a recapture.
  For samplers that evaluate the network twice per step (Heun, DPM2) diffusers counts each evaluation as a step;
  fastdiff counts steps, and evaluations between two kept steps' sigmas are kept.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .denoiser import Denoiser
from .errors import BadArgumentError
from .utils.checks import finite_number

_MARGIN = 1e-5  # relative: a step's sigma, rounded to the window's float32, still falls inside it


class ControlWindow(Denoiser):
    """Sets each sample's ``control_scale`` to 0 at the sigmas outside its ``control_window`` (B, 2) = (lowest,
    highest kept sigma), around any ``Denoiser`` (inside CFG, which stacks both passes' inputs)."""

    def __init__(self, inner: Denoiser):
        self.inner = inner
        self.postprocess_x0 = getattr(inner, "postprocess_x0", None)

    def c_skip(self, sigma):
        return self.inner.c_skip(sigma)

    def predict(self, x, sigma, control_window=None, **cond):
        return self.inner.predict(x, sigma, **_windowed(sigma, control_window, cond))

    def predict_at(self, x, sigma: float, control_window=None, **cond):
        return self.inner.predict_at(x, sigma, **_windowed(sigma, control_window, cond))


def _windowed(sigma, window, cond: dict) -> dict:
    """``cond`` with control_scale zeroed where sigma (a host float, or one per sample) is outside the window (tensor
    comparisons only: nothing is copied from the host inside a captured graph). One ControlNet: window (B, 2) and
    scale (B,); several: (B, K, 2) and (B, K)."""
    if window is None:
        return cond
    if torch.is_tensor(sigma):
        sigma = sigma.to(window.device, torch.float32)
        sigma = sigma.reshape(-1, *([1] * (window.dim() - 2)))  # (B,) or (B, 1)
    keep = (window[..., 0] <= sigma) & (sigma <= window[..., 1])  # (B,) or (B, K)
    # (a CFG-folded graph takes the unconditional pass's scale as its own input)
    return {**cond, **{k: cond[k] * keep for k in ("control_scale", "uncond_control_scale") if k in cond}}


def sigma_window(sigmas, steps: int, start: float, end: float) -> tuple[float, float]:
    """(lowest, highest) sigma of the steps diffusers' ``controlnet_keep`` keeps, widened by a hair; (inf, -inf) when
    it keeps none."""
    kept = [float(sigmas[i]) for i in range(steps) if not (i / steps < start or (i + 1) / steps > end)]
    if not kept:
        return math.inf, -math.inf
    return min(kept) * (1 - _MARGIN), max(kept) * (1 + _MARGIN)


def check_control_options(scale, start, end, guess_mode, count: int = 1) -> tuple:
    """(scales, starts, ends, guess_mode): one value per ControlNet each (a number is every ControlNet's, as
    diffusers broadcasts it); a scale of None stays None (the task's default); or a clear error."""
    def per_net(name, value):
        values = list(value) if isinstance(value, (list, tuple)) else [value] * count
        if len(values) != count:
            raise BadArgumentError(f"{name}: expected one value or {count} (one per ControlNet), found {len(values)}")
        return [finite_number(name, v) for v in values]

    scales = None if scale is None else per_net("controlnet_conditioning_scale", scale)
    starts, ends = per_net("control_guidance_start", start), per_net("control_guidance_end", end)
    for s, e in zip(starts, ends):
        if not 0.0 <= s < e <= 1.0:
            raise BadArgumentError(f"control_guidance_start / _end: expected 0 <= start < end <= 1, found {s} and {e}")
    if not isinstance(guess_mode, bool):
        raise BadArgumentError(f"guess_mode: expected True or False, found {guess_mode!r}")
    return scales, starts, ends, guess_mode


def control_images(control, control_image, count: Optional[int] = None) -> torch.Tensor:
    """float32 control images in [0, 1] for ``control`` (what drives the network: ``conditioning_channels``,
    ``image_downscale``): (k, C, H, W) for one ControlNet; for ``count`` of them (diffusers' MultiControlNetModel)
    one entry per ControlNet (each an image or a batch of them; or a (k, count, C, H, W) tensor, how the Engine
    stacks its requests' rows), as (k, count, C, H, W)."""
    if count is not None:
        if torch.is_tensor(control_image) and control_image.dim() == 5:
            control_image = list(control_image.unbind(1))
        if not isinstance(control_image, (list, tuple)) or len(control_image) != count:
            raise BadArgumentError(f"control_image: expected a list of {count} images, one per ControlNet (each an image "
                                   f"or one per sample), found {type(control_image).__name__}"
                                   + (f" of {len(control_image)}" if isinstance(control_image, (list, tuple)) else ""))
        parts = [control_images(control, image) for image in control_image]
        if len({p.shape[1:] for p in parts}) > 1:
            raise BadArgumentError(f"control_image: expected the ControlNets' images at one size, found "
                                   f"{[tuple(p.shape[2:]) for p in parts]}")
        n = max(p.shape[0] for p in parts)
        if any(p.shape[0] not in (1, n) for p in parts):
            raise BadArgumentError(f"control_image: expected 1 or {n} images per ControlNet, found "
                                   f"{[p.shape[0] for p in parts]}")
        return torch.stack([p.expand(n, -1, -1, -1) for p in parts], dim=1)
    from .img2img import unit_images

    images = unit_images(control_image, control.conditioning_channels)
    f = control.image_downscale
    if images.shape[2] % f or images.shape[3] % f:
        raise BadArgumentError(f"control_image: expected a height and width that are multiples of {f} (the "
                               f"ControlNet's downscale; fastdiff does not resize), found "
                               f"{images.shape[2]}x{images.shape[3]}")
    return images


def control_inputs(images: torch.Tensor, b: int, plan, scales: list, starts: list, ends: list, guess_mode: bool,
                   guided: bool, device, dtype) -> tuple[dict, dict]:
    """(the conditional pass's control inputs, the unconditional pass's) for ``b`` samples; ``images`` (k, C, H, W)
    for one ControlNet, (k, K, C, H, W) for K of them, whose scales and windows then take a K axis too."""
    if images.shape[0] not in (1, b):
        raise BadArgumentError(f"control_image: expected 1 or {b} images (one per sample), found {images.shape[0]}")
    several = images.dim() == 5
    windows = torch.tensor([sigma_window(plan.sigmas, plan.steps, s, e) for s, e in zip(starts, ends)],
                           dtype=torch.float32, device=device)  # (K, 2)
    scale = torch.tensor(scales, dtype=torch.float32, device=device)  # (K,)
    cond = {"control_image": images.expand(b, *images.shape[1:]).to(device=device, dtype=dtype),
            "control_scale": scale[None].expand(b, -1) if several else scale[0].expand(b),  # (B, K) or (B,)
            "control_guess": torch.full((b,), float(guess_mode), dtype=torch.float32, device=device),
            "control_window": windows[None].expand(b, -1, 2) if several else windows[0][None].expand(b, 2)}
    uncond = {}
    if guided:  # (always its own input: a captured loop then serves guess mode and the rest alike)
        # diffusers runs guess mode's ControlNet on the conditional pass only: zeros for the other
        uncond["control_scale"] = torch.zeros_like(cond["control_scale"]) if guess_mode else cond["control_scale"]
    return cond, uncond


__all__ = ["ControlWindow", "sigma_window", "check_control_options", "control_images", "control_inputs"]
