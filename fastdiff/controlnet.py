"""``generate(control_image=...)``: a ControlNet's inputs, as diffusers' ``StableDiffusionControlNetPipeline`` and its
img2img / inpainting / SDXL siblings prepare them.

* The control image is read as img2img reads an image (PIL, NumPy, tensor; ``fastdiff.img2img.unit_images``), PIL
  and uint8 pixels into [0, 1] and float arrays and tensors as they are (diffusers' control image processor does not
  normalise), and is not resized: its size fixes the output's, as a control image does in diffusers when no height
  or width is given. Both CFG passes read it.
* ``controlnet_conditioning_scale`` weights the ControlNet's outputs; in ``guess_mode`` (forced on by a ControlNet
  with ``global_pool_conditions``, as diffusers does) the unconditional pass gets none of them (scale 0, which is
  diffusers' zeros) and the conditional pass's are weighted from 0.1 to 1.
* ``control_guidance_start`` / ``_end`` keep the ControlNet for the network evaluations ``i`` (of ``M``) with
  ``start <= i / M`` and ``(i + 1) / M <= end``: diffusers' ``controlnet_keep`` over its ``timesteps``, which hold
  one entry per evaluation (two per step for Heun / KDPM2, PNDM's repeated one). ``M`` is counted by running the
  sampler once on a 1x1 state; each sample's keep factors (B, M) are an input (``control_keep``), read by
  ``ControlWindow`` at its evaluation's index, so a captured loop takes new windows without a recapture.
* Several ControlNets (diffusers' MultiControlNetModel): one image, scale and window each, on a second axis.
"""

from __future__ import annotations

from typing import Optional

import torch

from .denoiser import Denoiser
from .errors import BadArgumentError
from .utils.checks import finite_number


class ControlWindow(Denoiser):
    """Multiplies each sample's ``control_scale`` by its keep factor for this network evaluation (``control_keep``
    (B, M) or (B, M, K): evaluation ``i`` of the ``M`` the sampler makes reads column ``i``), around any ``Denoiser``
    (inside CFG, which stacks both passes' inputs). It counts the evaluations of one sampling run, from 0 again
    after ``M``: one instance per ``generate`` call (a captured loop runs the Python once, baking each index in)."""

    def __init__(self, inner: Denoiser):
        self.inner = inner
        self.postprocess_x0 = getattr(inner, "postprocess_x0", None)
        self.calls = 0

    def c_skip(self, sigma):
        return self.inner.c_skip(sigma)

    def predict(self, x, sigma, control_keep=None, **cond):
        return self.inner.predict(x, sigma, **self._kept(control_keep, cond))

    def predict_at(self, x, sigma: float, control_keep=None, **cond):
        return self.inner.predict_at(x, sigma, **self._kept(control_keep, cond))

    def predict_variance_at(self, x, sigma: float, control_keep=None, **cond):
        return self.inner.predict_variance_at(x, sigma, **self._kept(control_keep, cond))

    def _kept(self, keep, cond: dict) -> dict:
        if keep is None:
            return cond
        i = self.calls % keep.shape[1]
        self.calls += 1
        column = keep[:, i]  # (B,) or (B, K): a view, no copy from the host
        # (a CFG-folded graph takes the unconditional pass's scale as its own input)
        return {**cond, **{k: cond[k] * column for k in ("control_scale", "uncond_control_scale") if k in cond}}


_EVALUATIONS: dict = {}  # (sampler, grid, options) -> evaluations: a serving loop asks for the same few plans


def evaluations(plan) -> int:
    """How many network evaluations ``plan`` makes: its sampler run once on a 1x1 state with a network of zeros
    (a few ms of host time: counted once per sampler, grid and options)."""
    from .noise import NoiseSource
    from .utils.keys import freeze

    key = (plan.sampler, tuple(plan.sigmas.tolist()), freeze(plan.options))
    if key not in _EVALUATIONS:
        if len(_EVALUATIONS) >= 256:
            _EVALUATIONS.clear()
        _EVALUATIONS[key] = _count_evaluations(plan, NoiseSource)
    return _EVALUATIONS[key]


def _count_evaluations(plan, noise_source) -> int:
    count = [0]

    def zeros(x, t, **kw):  # (twice the channels: a learned-variance sampler reads the second half; others drop it)
        count[0] += 1
        return x.new_zeros((x.shape[0], 2 * x.shape[1]) + tuple(x.shape[2:]))

    x = torch.zeros(1, 1, 1, 1)
    plan.sample(plan.make_denoiser(zeros, dtype=torch.float32), x, extra_args={}, noise=noise_source([0], "cpu"))
    return count[0]


def keep_factors(m: int, start: float, end: float) -> list:
    """diffusers' ``controlnet_keep`` for ``m`` evaluations: 1.0 where evaluation i's share of the run lies in
    [start, end], else 0.0."""
    return [1.0 - float(i / m < start or (i + 1) / m > end) for i in range(m)]


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


def control_images(control, control_image, count: Optional[int] = None, raw: bool = True,
                   rows_first: bool = True) -> torch.Tensor:
    """float32 control images in [0, 1] for ``control`` (what drives the network: ``conditioning_channels``,
    ``image_downscale``): (k, C, H, W) for one ControlNet; for ``count`` of them (diffusers' MultiControlNetModel)
    one entry per ControlNet (each an image or a batch of them; or a (k, count, C, H, W) tensor, how the Engine
    stacks its requests' rows), as (k, count, C, H, W). ``raw``: float arrays and tensors as they are (a UNet
    ControlNet's processor does not normalise); else read as img2img reads images ([-1, 1] ones shifted).
    ``rows_first``: nested lists are one list per sample (SD's ControlNet pipelines transpose them); else one list
    per ControlNet, as FluxControlNetPipeline reads them."""
    if count is not None:
        if torch.is_tensor(control_image) and control_image.dim() == 5:
            control_image = list(control_image.unbind(1))
        elif rows_first and isinstance(control_image, (list, tuple)) and control_image and isinstance(
                control_image[0], (list, tuple)):
            # nested lists are one list per sample, one image per ControlNet each: transposed, as diffusers does
            if len({len(row) for row in control_image}) > 1:
                raise BadArgumentError(f"control_image: expected one image per ControlNet for every sample, found "
                                       f"rows of {[len(row) for row in control_image]}")
            control_image = [list(column) for column in zip(*control_image)]
        if not isinstance(control_image, (list, tuple)) or len(control_image) != count:
            raise BadArgumentError(f"control_image: expected a list of {count} image(s), one per ControlNet (each "
                                   f"an image or one per sample), found {type(control_image).__name__}"
                                   + (f" of {len(control_image)}" if isinstance(control_image, (list, tuple)) else ""))
        parts = [control_images(control, image, raw=raw) for image in control_image]
        if len({p.shape[1:] for p in parts}) > 1:
            raise BadArgumentError(f"control_image: expected the ControlNets' images at one size, found "
                                   f"{[tuple(p.shape[2:]) for p in parts]}")
        n = max(p.shape[0] for p in parts)
        if any(p.shape[0] not in (1, n) for p in parts):
            raise BadArgumentError(f"control_image: expected 1 or {n} images per ControlNet, found "
                                   f"{[p.shape[0] for p in parts]}")
        return torch.stack([p.expand(n, -1, -1, -1) for p in parts], dim=1)
    from .img2img import check_whole_pixels, unit_images

    try:
        images = unit_images(control_image, control.conditioning_channels, raw=raw)
    except BadArgumentError as e:  # (its messages name img2img's argument)
        message = str(e)
        raise BadArgumentError("control_image:" + message[len("image:"):] if message.startswith("image:")
                               else message) from None
    check_whole_pixels(images, control.image_downscale, "control_image", "the ControlNet's")
    return images


def control_inputs(images: torch.Tensor, b: int, plan, scales: list, starts: list, ends: list, guess_mode: bool,
                   guided: bool, device, dtype, window_plan=None) -> tuple[dict, dict]:
    """(the conditional pass's control inputs, the unconditional pass's) for ``b`` samples; ``images`` (k, C, H, W)
    for one ControlNet, (k, K, C, H, W) for K of them, whose scales and keep factors then take a K axis too.
    The windows are shares of ``window_plan``'s evaluations (default ``plan``): a base run of SDXL's experts
    (``denoising_end``) keeps the first ones of its whole grid's, as diffusers' SDXL ControlNet pipeline does."""
    if images.shape[0] not in (1, b):
        raise BadArgumentError(f"control_image: expected 1 or {b} images (one per sample), found {images.shape[0]}")
    several = images.dim() == 5
    m, whole = evaluations(plan), evaluations(window_plan or plan)
    keep = torch.tensor([keep_factors(whole, s, e)[:m] for s, e in zip(starts, ends)], dtype=torch.float32,
                        device=device).T  # (M, K)
    scale = torch.tensor(scales, dtype=torch.float32, device=device)  # (K,)
    cond = {"control_image": images.expand(b, *images.shape[1:]).to(device=device, dtype=dtype),
            "control_scale": scale[None].expand(b, -1) if several else scale[0].expand(b),  # (B, K) or (B,)
            "control_guess": torch.full((b,), float(guess_mode), dtype=torch.float32, device=device),
            "control_keep": keep[None].expand(b, -1, -1) if several else keep[:, 0][None].expand(b, -1)}
    uncond = {}
    if guided:  # (always its own input: a captured loop then serves guess mode and the rest alike)
        # diffusers runs guess mode's ControlNet on the conditional pass only: zeros for the other
        uncond["control_scale"] = torch.zeros_like(cond["control_scale"]) if guess_mode else cond["control_scale"]
    return cond, uncond


__all__ = ["ControlWindow", "evaluations", "keep_factors", "check_control_options", "control_images",
           "control_inputs"]
