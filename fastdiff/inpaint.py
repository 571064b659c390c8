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

A regular (C-channel) model is refused: diffusers' legacy blending for it (the known region pasted back, noised,
after every step) is not implemented.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import BadArgumentError
from .img2img import unit_images

# diffusers' default strength: StableDiffusionInpaintPipeline 1.0 (pure noise), StableDiffusionXLInpaintPipeline 0.9999
DEFAULT_STRENGTH = {"sd": 1.0, "sdxl": 0.9999}


def default_strength(spec) -> float:
    return DEFAULT_STRENGTH["sdxl" if spec.time_ids_dim else "sd"]


def unit_masks(mask, images: torch.Tensor) -> torch.Tensor:
    """``mask`` (what ``image=`` takes, with one channel, or an (H, W) tensor; one, or one per image) -> float32
    (k, 1, H, W) of 0 / 1 at the size of ``images`` (k, C, H, W), as diffusers' mask processor binarizes it."""
    if torch.is_tensor(mask) and mask.dim() == 2:
        mask = mask[None]  # (H, W) -> (1, H, W)
    try:
        masks = unit_images(mask, 1)
    except BadArgumentError as e:
        raise BadArgumentError("mask_image" + str(e)[len("image"):]) from None
    if masks.shape[2:] != images.shape[2:]:
        raise BadArgumentError(f"mask_image: expected the image's size {tuple(images.shape[2:])}, found "
                               f"{tuple(masks.shape[2:])} (fastdiff does not resize)")
    return (masks >= 0.5).float()


def masked_images(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) images in [0, 1] -> the network's masked images in [-1, 1]: 0 where the mask repaints."""
    return (images * 2 - 1) * (masks < 0.5)


def image_latents(vae, images: torch.Tensor, masks: torch.Tensor, noise, size: tuple) -> torch.Tensor:
    """The inpainting network's extra input (B, 1 + C, h, w): the mask at the latents' ``size`` (nearest, as
    diffusers resizes it) and the masked images' latents, each sample's posterior drawn from its own generator."""
    masked = vae.encode(masked_images(images, masks), noise=noise)  # (B, C, h, w) float32
    small = F.interpolate(masks, size=tuple(size))  # (B, 1, h, w)
    return torch.cat([small.to(masked.device), masked], dim=1)


__all__ = ["unit_masks", "masked_images", "image_latents", "default_strength", "DEFAULT_STRENGTH"]
