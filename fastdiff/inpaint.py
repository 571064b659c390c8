"""Inpainting: an inpainting network repaints the masked part of an image, as diffusers' inpainting pipelines do.

An inpainting UNet (SD 1.x / 2.x and SDXL inpainting checkpoints: ``ModelSpec.inpainting``) takes 2C + 1 input
channels: its C latents, the mask, and the masked image's C latents. ``StableDiffusionInpaintPipeline`` and
``StableDiffusionXLInpaintPipeline``, in fastdiff's terms:

1. the mask (white: repaint; PIL images are read in grayscale) is binarized at 0.5, at the image's own size; the
   masked image keeps the pixels where the mask is 0, and is 0 (mid grey in [-1, 1]) where it is 1;
2. the start state: pure noise at strength 1 (SD's default); below 1, the image's latents noised part-way down the
   grid as image-to-image does (``fastdiff.img2img``; SDXL's default strength is 0.9999, so it starts so);
3. the masked image is encoded by the VAE (each sample's posterior draw after its start noise), the mask is resized to
   the latents' size (nearest), and both go to the network beside the latents at every call (``image_latents``,
   (B, 1 + C, h, w), shared by both CFG passes).

Any other model (a regular SD / SDXL UNet, SD3's and FLUX.1's transformers, a pixel model) inpaints as diffusers'
pipelines make a 4-channel UNet (a 16-channel transformer) do: the image's latents are the known region (mask 0),
pasted back after every step noised to the new state's sigma with the run's own start noise, and pasted back clean
on the result (``KnownRegion``). The RNG draws follow those pipelines: the image's posterior, the start noise, then
the masked image's posterior (which only an inpainting network reads; diffusers draws it anyway). Default strengths
are theirs: 1.0 for SD, 0.9999 for SDXL, 0.6 for SD3 and FLUX.1.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .errors import BadArgumentError
from .img2img import unit_images

# diffusers' default strength: StableDiffusionInpaintPipeline 1.0 (pure noise), StableDiffusionXLInpaintPipeline
# 0.9999, StableDiffusion3InpaintPipeline and FluxInpaintPipeline 0.6, FluxFillPipeline 1.0
DEFAULT_STRENGTH = {"sd": 1.0, "sdxl": 0.9999, "flow": 0.6, "fill": 1.0}


def default_strength(spec) -> float:
    if spec.prediction_type == "flow_prediction":
        return DEFAULT_STRENGTH["fill" if spec.inpainting else "flow"]
    return DEFAULT_STRENGTH["sdxl" if spec.time_ids_dim else "sd"]


def unit_masks(mask, images: torch.Tensor, binarize_tensors: bool = True, upscale: int = 1) -> torch.Tensor:
    """``mask`` (one, or a list / batch of one per image) -> float32 (k, 1, H, W) of 0 / 1 at the size of ``images``
    (k, C, H, W), times ``upscale`` (latents given for a refiner run: the VAE's pixels per latent pixel). PIL images
    (read in grayscale) and uint8 arrays are pixels, 0-255; float arrays and tensors (the shapes diffusers' mask
    processor takes) are binarized at 0.5 as they are, as that processor (no normalisation) binarizes them.
    ``binarize_tensors=False``: tensors as they are (SD3's ControlNet inpainting pipeline hands them on
    unprocessed)."""
    masks = _raw_masks(mask)
    size = tuple(upscale * v for v in images.shape[2:])
    if tuple(masks.shape[2:]) != size:
        given = tuple(mask.shape) if isinstance(mask, (np.ndarray, torch.Tensor)) else None
        raise BadArgumentError(f"mask_image: expected the image's size {size}" + (
            f" (its latents' {tuple(images.shape[2:])} times {upscale} pixels)" if upscale != 1 else "")
            + f", found {tuple(masks.shape[2:])} (fastdiff does not resize)" + (
            f"; the {'array' if isinstance(mask, np.ndarray) else 'tensor'} of shape {given} reads as "
            f"{tuple(masks.shape)} (masks, 1, H, W), as diffusers' mask processor reads it"
            if given is not None and given != tuple(masks.shape) else ""))
    return masks if torch.is_tensor(mask) and not binarize_tensors else (masks >= 0.5).float()


def _raw_masks(mask) -> torch.Tensor:
    """(k, 1, H, W) float32 mask values, unbinarized."""
    if isinstance(mask, (list, tuple)) and mask:
        parts = [_raw_masks(m) for m in mask]
        if len({p.shape[1:] for p in parts}) > 1:
            sizes = [tuple(p.shape[2:]) for p in parts]
            raise BadArgumentError(f"mask_image: expected masks of one size, found {sizes}")
        return torch.cat(parts)
    floats = torch.is_tensor(mask) or (isinstance(mask, np.ndarray) and np.issubdtype(mask.dtype, np.floating))
    if not floats:  # PIL images, uint8 arrays: pixels, as image= reads them
        try:
            return unit_images(mask, 1)
        except BadArgumentError as e:
            raise BadArgumentError("mask_image" + str(e)[len("image"):]) from None
    given = tuple(mask.shape)
    if torch.is_tensor(mask):  # (H, W), (B, H, W) (the (1, H, W) of one mask too), (B, 1, H, W), as diffusers
        t = mask.detach().float().cpu()
        t = t[None, None] if t.dim() == 2 else t[:, None] if t.dim() == 3 else t
        layout = "(H, W), (B, H, W) or (B, 1, H, W) tensor"
    else:  # (H, W), (H, W, 1), (B, H, W), (B, H, W, 1)
        a = mask.astype(np.float32)
        a = a[None, :, :, None] if a.ndim == 2 else (a[None] if a.shape[-1] == 1 else a[..., None]) if a.ndim == 3 \
            else a
        t = torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))) if a.ndim == 4 else torch.from_numpy(a)
        layout = "(H, W), (H, W, 1), (B, H, W) or (B, H, W, 1) array"
    if t.dim() != 4 or t.shape[1] != 1:
        raise BadArgumentError(f"mask_image: expected a {layout}, found shape {given}")
    if 0 in (t.shape[0], t.shape[2], t.shape[3]):
        raise BadArgumentError(f"mask_image: expected at least one mask of at least one pixel, found shape {given}")
    if not bool(torch.isfinite(t).all()):
        raise BadArgumentError("mask_image: expected finite values, found NaN or inf")
    return t


def masked_images(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) images in [0, 1] -> the network's masked images in [-1, 1]: 0 where the mask repaints."""
    return (images * 2 - 1) * (masks < 0.5)


def image_latents(vae, images: torch.Tensor, masks: torch.Tensor, noise, size: tuple) -> torch.Tensor:
    """The inpainting network's extra input (B, 1 + C, h, w): the mask at the latents' ``size`` (nearest, as
    diffusers resizes it) and the masked images' latents (each sample's posterior from its own generator)."""
    masked = vae.encode(masked_images(images, masks), noise=noise)  # (B, C, h, w) float32
    small = latent_masks(masks, size)  # (B, 1, h, w)
    return torch.cat([small.to(masked.device), masked], dim=1)


class KnownRegion:
    """diffusers' inpainting with a regular model: the state keeps what the model made where the mask repaints
    (1), and elsewhere takes the image's latents noised to the state's sigma with the start noise.

    clean / noise: (B, C, h, w) float32, the image's latents and the run's unit start noise; mask: (B, 1, h, w) of
    0 / 1 at the latents' size. time_frame: the plan samples a flow model on its time grid (x_t = (1 - t) x0 + t
    eps, diffusers' ``scale_noise``), not in x = x0 + sigma eps (``add_noise``, in the samplers' frame).
    A sampler calls it after each step (``after_step``); the plan calls ``final`` on its scaled result."""

    def __init__(self, clean: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor, time_frame: bool = False):
        self.clean, self.noise, self.time_frame = clean, noise, time_frame
        self.repaint = mask >= 0.5  # (B, 1, h, w) bool: where the state is the model's

    def __call__(self, x: torch.Tensor, sigma: float, last: bool) -> torch.Tensor:
        if last:  # (the plan pastes the clean latents on its result, after any change of frame)
            return x
        if self.time_frame:
            known = torch.lerp(self.clean, self.noise, sigma)  # (1 - t) x0 + t eps
        else:
            known = torch.add(self.clean, self.noise, alpha=sigma)  # x0 + sigma eps
        return torch.where(self.repaint, x, known.to(x.dtype))

    def final(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(self.repaint, x, self.clean.to(x.dtype))


def fill_image_latents(vae, images: torch.Tensor, masks: torch.Tensor, noise, channels: int) -> torch.Tensor:
    """FLUX.1 Fill's extra input (B, C + f*f, h, w), as FluxFillPipeline builds it: the masked images' latents (each
    sample's posterior from its own generator), then the mask in pixels, each latent pixel's f x f block (f: the
    VAE's downscale) as channels dy * f + dx. ``channels``: what the transformer takes (C + f*f)."""
    f = vae.downscale
    masked = vae.encode(masked_images(images, masks), noise=noise)  # (B, C, h, w) float32
    if masked.shape[1] + f * f != channels:
        raise BadArgumentError(f"mask_image: this FLUX.1 Fill transformer takes {channels} conditioning channels, and "
                               f"this VAE gives {masked.shape[1]} latent channels + a {f}x{f} mask block per latent "
                               f"pixel = {masked.shape[1] + f * f}")
    return torch.cat([masked, F.pixel_unshuffle(masks, f).to(masked.device)], dim=1)


def latent_masks(masks: torch.Tensor, size: tuple) -> torch.Tensor:
    """(B, 1, H, W) 0 / 1 masks at the latents' ``size`` (h, w), as diffusers resizes them: nearest."""
    return F.interpolate(masks, size=tuple(size))


__all__ = ["unit_masks", "masked_images", "image_latents", "fill_image_latents", "default_strength",
           "DEFAULT_STRENGTH", "KnownRegion", "latent_masks"]
