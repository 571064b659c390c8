"""The Pipeline's image inputs: image-to-image, inpainting masks and SDXL's ensemble of experts, checked and turned
into what ``generate`` samples from (``fastdiff.img2img``, ``fastdiff.inpaint`` and ``fastdiff.experts`` hold the
pieces that need no Pipeline).

``Pipeline`` inherits these methods; they read its ``spec``, ``vae``, ``device`` and ControlNet format.
"""

from __future__ import annotations

from typing import Optional

import torch

from .errors import BadArgumentError
from .utils.checks import one_or


class ImageInputsMixin:
    """The ``_img2img*``, ``_inpaint_masks``, ``_clean_latents`` and ``_check_experts`` helpers of
    ``Pipeline.generate``."""

    def _low_res_images(self, image, strength, mask_image, **edits) -> torch.Tensor:
        """A super-resolution network's (``spec.low_res_channels``) low-resolution images: float32 (k, C, h, w) in
        [0, 1], any size (generate upsamples them to the output's). ``edits``: generate's other image-editing
        arguments (denoising_start, padding_mask_crop), refused."""
        from .img2img import unit_images

        if image is None:
            raise BadArgumentError("image: this is a super-resolution model (its network reads a low-resolution image "
                                   "beside the sample): expected image= (the image to upsample), found None")
        given = [k for k, v in dict(strength=strength, mask_image=mask_image, **edits).items() if v is not None]
        if given:
            raise BadArgumentError(f"{given[0]}: a super-resolution model's image is its conditioning, not a start to "
                                   f"edit; expected image= alone")
        return unit_images(image, self.spec.low_res_channels)

    def _low_res_input(self, low_res: torch.Tensor, b: int, size: tuple, noise, noise_level: int) -> torch.Tensor:
        """What the network reads beside its sample, (b, C, H, W) in the network's dtype, from the low-resolution
        images (one, or one per sample) in [0, 1]: guided-diffusion's upsamplers, the image in [-1, 1] upsampled
        bilinearly to the sample ``size`` (``SuperResModel.forward``); an upscaler that noises its image
        (``spec.low_res_noise``: StableDiffusionUpscalePipeline), the image in [-1, 1] at the latents' size, noised
        to ``noise_level`` by its low_res_scheduler with noise each sample draws from its generator (before its start
        noise, in diffusers' order)."""
        import torch.nn.functional as F

        from .schedules import EXACT_ZERO_SNR_FLOOR, alphas_cumprod_of

        if low_res.shape[0] not in (1, b):
            raise BadArgumentError(f"image: expected {one_or(b, 'low-resolution images')} (one per sample), found "
                                   f"{low_res.shape[0]}")
        x = low_res.to(self.device) * 2 - 1  # (k, C, h, w)
        if self.spec.low_res_noise is None:
            return F.interpolate(x, size=tuple(size), mode="bilinear").expand(b, -1, -1, -1).to(self._network_dtype())
        if tuple(x.shape[2:]) != tuple(size):
            raise BadArgumentError(f"height / width: an upscaler's latents are its image's size, {x.shape[2]}x"
                                   f"{x.shape[3]}; found {size[0]}x{size[1]}")
        if self.vae is not None:  # (diffusers shrinks the image to them; the upscaled image is the VAE's multiple)
            from .img2img import check_whole_pixels

            check_whole_pixels(x, self.vae.downscale, "image", "the VAE's")
        # (a DDPMScheduler: a zero terminal SNR keeps its 0)
        ac = alphas_cumprod_of(self.spec.low_res_noise["scheduler"], zero_snr_floor=EXACT_ZERO_SNR_FLOOR)
        a = ac[noise_level].to(self.device)  # (float32, as diffusers' add_noise)
        eps = noise.randn(tuple(x.shape[1:]))  # (b, C, h, w)
        return (a ** 0.5 * x.expand(b, -1, -1, -1) + (1 - a) ** 0.5 * eps).to(self._network_dtype())

    def _noise_level(self, noise_level, class_labels) -> Optional[int]:
        """An upscaler's noise level (``spec.low_res_noise``; default 20, diffusers'), checked; None for other
        models, which take none."""
        if self.spec.low_res_noise is None:
            if noise_level is not None:
                raise BadArgumentError("noise_level: only an upscaler that noises its low-resolution image takes one "
                                       "(Stable Diffusion's x4 upscaler)")
            return None
        if class_labels is not None:
            raise BadArgumentError("class_labels: an upscaler's class input is its noise level; pass noise_level=")
        import numbers

        from .checkpoints.diffusers_folder import UPSCALER_NOISE_LEVEL

        top = self.spec.low_res_noise["max_noise_level"]
        level = UPSCALER_NOISE_LEVEL if noise_level is None else noise_level
        if torch.is_tensor(level) and level.numel() == 1 and not level.is_floating_point():
            level = level.item()  # (diffusers takes a 0-d tensor or a NumPy integer too)
        if isinstance(level, numbers.Integral) and not isinstance(level, bool):
            level = int(level)
        if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= top:
            raise BadArgumentError(f"noise_level: expected an integer in [0, {top}] (the pipeline's max_noise_level), "
                                   f"found {noise_level!r}" + (f" (the default, {level}, is above it)"
                                                               if noise_level is None else ""))
        return level

    def _img2img_images(self, image, strength, latents) -> tuple:
        """generate(image=...)'s (images, given_latents): float32 (k, C, H, W) images in [0, 1], checked against what
        encodes them; or, as diffusers' img2img pipelines take a tensor with the latent channel count, a latent
        model's latents (an SDXL base's output for its refiner), used as they are (given_latents True)."""
        if image is None:
            if strength is not None:
                raise BadArgumentError(f"strength: given ({strength!r}) without image=; strength is image-to-image's")
            return None, False
        if latents is not None:
            raise BadArgumentError("image / latents: expected one of them, found both (img2img draws its own start "
                                   "noise from the seeds)")
        from .img2img import check_strength, unit_images

        if strength is not None:
            check_strength(strength)  # (before any image is read)
        channels = self.spec.in_channels
        if channels in (1, 3) and self.vae is None:  # a pixel model: the image is its sample
            return unit_images(image, channels), False
        if torch.is_tensor(image) and image.dim() in (3, 4) and image.shape[-3] == channels and (
                self.vae is None or channels != self.vae.config.in_channels):
            t = image.detach().float()
            if not bool(torch.isfinite(t).all()):
                raise BadArgumentError("image: latents (a tensor with the model's latent channels) with NaN or inf")
            return (t if t.dim() == 4 else t[None]), True
        if self.vae is None or self.vae.encoder is None:
            raise BadArgumentError("image: a latent model encodes its image with its VAE's encoder, and this pipeline "
                                   + ("has no VAE (fastdiff.load(..., vae='AutoencoderKL folder'))" if self.vae is None
                                      else "VAE's weights carry only the decoder")
                                   + f"; or pass latents as the image: a ({channels}, h, w) tensor")
        return unit_images(image, self.vae.config.in_channels), False

    def _check_experts(self, plan, end, start, images, strength, control, crop, masked: bool, given_latents: bool):
        """``fastdiff.experts`` once denoising_end / denoising_start are checked against the run (None without
        them)."""
        if end is None and start is None:
            return None
        from . import experts

        end = None if end is None else experts.check_fraction("denoising_end", end)
        start = None if start is None else experts.check_fraction("denoising_start", start)
        name = "denoising_start" if start is not None else "denoising_end"
        if start is not None and images is None:
            raise BadArgumentError("denoising_start: a refiner run starts from a base run's latents (or an image to "
                                   "encode): expected image=, found none")
        if start is not None and strength is not None:
            raise BadArgumentError("strength: not with denoising_start, which sets where the run starts")
        if start is not None and end is not None and start >= end:
            raise BadArgumentError(f"denoising_start / denoising_end: expected start < end, found {start} and {end}")
        if crop is not None:
            raise BadArgumentError(f"{name}: with padding_mask_crop is not implemented (the expert runs hand on "
                                   f"latents, which have no pixels to paste back)")
        if control is not None and images is not None and not masked:  # (SDXL's ControlNet img2img takes neither)
            raise BadArgumentError(f"{name}: with a control image and an image, no mask: diffusers' SDXL ControlNet "
                                   f"img2img pipeline takes no denoising_start / denoising_end (its text-to-image and "
                                   f"inpainting ControlNet pipelines do)")
        if control is not None and given_latents:  # (its mask and masked image are laid out in pixels)
            raise BadArgumentError(f"{name}: a ControlNet inpainting run takes the image in pixels, found latents "
                                   f"(diffusers' SDXL ControlNet inpainting pipeline cannot mask them either)")
        experts.check_plan(plan, name)
        return experts

    def _inpaint_masks(self, mask_image, images, given_latents: bool, refiner: bool = False):
        """generate(mask_image=...) as float32 (k, 1, H, W) masks of 0 / 1 (``fastdiff.inpaint.unit_masks``): an
        inpainting network needs one with its image; any other network takes one with an image in pixels (or a
        ``refiner`` run, ``denoising_start``, a base run's latents), and repaints by pasting the image back after
        every step (``fastdiff.inpaint.KnownRegion``)."""
        if not self.spec.inpainting:
            if mask_image is None:
                return None
            if images is None or (given_latents and not refiner):
                raise BadArgumentError("mask_image: inpainting repaints part of an image in pixels (image=): expected "
                                       "one, found " + ("latents" if given_latents else "none"))
            from .inpaint import unit_masks

            # (a refiner's latents: the mask in the base run's pixels, diffusers resizes it to the latents)
            upscale = self.vae.downscale if given_latents and self.vae is not None else 1
            return unit_masks(mask_image, images, upscale=upscale)
        if images is None or mask_image is None:
            raise BadArgumentError("image / mask_image: this is an inpainting network (latents + mask + masked image): "
                                   "expected both, found " + ("image only" if images is not None else
                                                              "mask_image only" if mask_image is not None else
                                                              "neither"))
        if given_latents:
            raise BadArgumentError("image: an inpainting network takes the image in pixels (its masked part is "
                                   "encoded), found latents")
        if self.vae is None or self.vae.encoder is None:
            raise BadArgumentError("mask_image: an inpainting network reads the masked image's VAE latents, and this "
                                   "pipeline " + ("has no VAE (fastdiff.load(..., vae='AutoencoderKL folder'))"
                                                  if self.vae is None else "VAE's weights carry only the decoder"))
        from .inpaint import unit_masks

        return unit_masks(mask_image, images)

    def _img2img_strength(self, strength, steps: int, inpaints: bool = False) -> tuple[float, int]:
        """(the strength, the model's diffusers default for None (``inpaints``: its inpainting pipeline's); the grid
        steps it skips, by that pipeline's rounding)."""
        from .img2img import default_strength, start_index
        from .inpaint import default_strength as default_inpaint_strength

        if strength is None:
            strength = default_inpaint_strength(self.spec) if inpaints else default_strength(self.spec)
            if self._control_format() is not None and not inpaints and not getattr(self._control_format(), "latent",
                                                                                   False):
                # (diffusers' ControlNet img2img pipelines, SDXL's too: 0.8; FLUX.1's control ones keep 0.6)
                strength = 0.8
        return float(strength), start_index(steps, strength, self.spec.prediction_type == "flow_prediction")

    def _clean_latents(self, images: torch.Tensor, given_latents: bool, noise):
        """img2img's clean start: (b, C, h, w) the images' VAE latents (each sample's posterior drawn from its own
        generator), the latents given as the image, or a pixel model's images in [-1, 1]."""
        if given_latents or self.vae is None:
            return images.to(self.device) if given_latents else (images * 2 - 1).to(self.device)
        return self.vae.encode(images * 2 - 1, noise=noise)  # pixels in [-1, 1] -> latents

    def _img2img_size(self, images: torch.Tensor, b: int, height, width, given_latents: bool = False):
        """The images repeated to the batch, and the latent size they fix."""
        if images.shape[0] not in (1, b):
            raise BadArgumentError(f"image: expected {one_or(b, 'images')} (one per sample), found {images.shape[0]}")
        from .img2img import check_whole_pixels

        f = 1 if self.vae is None or given_latents else self.vae.downscale
        check_whole_pixels(images, f, "image", "the VAE's")
        h, w = images.shape[2] // f, images.shape[3] // f
        if (height is not None and height != h) or (width is not None and width != w):
            raise BadArgumentError(f"height / width: the image fixes the latent size to {h}x{w}, found "
                                   f"{height}x{width}")
        return images.expand(b, -1, -1, -1), h, w
