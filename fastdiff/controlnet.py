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
    comparisons only: nothing is copied from the host inside a captured graph)."""
    if window is None:
        return cond
    if torch.is_tensor(sigma):
        sigma = sigma.to(window.device, torch.float32)
    keep = (window[:, 0] <= sigma) & (sigma <= window[:, 1])  # (B,)
    # (a CFG-folded graph takes the unconditional pass's scale as its own input)
    return {**cond, **{k: cond[k] * keep for k in ("control_scale", "uncond_control_scale") if k in cond}}


def sigma_window(sigmas, steps: int, start: float, end: float) -> tuple[float, float]:
    """(lowest, highest) sigma of the steps diffusers' ``controlnet_keep`` keeps, widened by a hair; (inf, -inf) when
    it keeps none."""
    kept = [float(sigmas[i]) for i in range(steps) if not (i / steps < start or (i + 1) / steps > end)]
    if not kept:
        return math.inf, -math.inf
    return min(kept) * (1 - _MARGIN), max(kept) * (1 + _MARGIN)


def check_control_options(scale, start, end, guess_mode) -> tuple:
    """The options as numbers (a scale of None stays None: the task's default), or a clear error."""
    scale = None if scale is None else finite_number("controlnet_conditioning_scale", scale)
    start = finite_number("control_guidance_start", start)
    end = finite_number("control_guidance_end", end)
    if not 0.0 <= start < end <= 1.0:
        raise BadArgumentError(f"control_guidance_start / _end: expected 0 <= start < end <= 1, found {start} and "
                               f"{end}")
    if not isinstance(guess_mode, bool):
        raise BadArgumentError(f"guess_mode: expected True or False, found {guess_mode!r}")
    return scale, start, end, guess_mode


def control_images(controlnet, control_image) -> torch.Tensor:
    """float32 (k, C, H, W) control images in [0, 1] for ``controlnet`` (C its conditioning channels)."""
    from .img2img import unit_images

    images = unit_images(control_image, controlnet.conditioning_channels)
    if images.shape[2] % controlnet.image_downscale or images.shape[3] % controlnet.image_downscale:
        raise BadArgumentError(f"control_image: expected a height and width that are multiples of "
                               f"{controlnet.image_downscale} (the ControlNet's downscale; fastdiff does not resize), "
                               f"found {images.shape[2]}x{images.shape[3]}")
    return images


def control_inputs(images: torch.Tensor, b: int, plan, scale: float, start: float, end: float, guess_mode: bool,
                   guided: bool, device, dtype) -> tuple[dict, dict]:
    """(the conditional pass's control inputs, the unconditional pass's) for ``b`` samples."""
    if images.shape[0] not in (1, b):
        raise BadArgumentError(f"control_image: expected 1 or {b} images (one per sample), found {images.shape[0]}")
    lo, hi = sigma_window(plan.sigmas, plan.steps, start, end)
    cond = {"control_image": images.expand(b, -1, -1, -1).to(device=device, dtype=dtype),
            "control_scale": torch.full((b,), scale, dtype=torch.float32, device=device),
            "control_guess": torch.full((b,), float(guess_mode), dtype=torch.float32, device=device),
            "control_window": torch.tensor([[lo, hi]], dtype=torch.float32, device=device).expand(b, 2)}
    uncond = {}
    if guided:  # (always its own input: a captured loop then serves guess mode and the rest alike)
        # diffusers runs guess mode's ControlNet on the conditional pass only: zeros for the other
        uncond["control_scale"] = torch.zeros_like(cond["control_scale"]) if guess_mode else cond["control_scale"]
    return cond, uncond


__all__ = ["ControlWindow", "sigma_window", "check_control_options", "control_images", "control_inputs"]
