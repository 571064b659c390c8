"""Image-to-image (SDEdit): start sampling part-way down the grid from a noised image instead of from pure noise.

What diffusers' img2img pipelines (``StableDiffusionImg2ImgPipeline``, ``StableDiffusionXLImg2ImgPipeline``,
``StableDiffusion3Img2ImgPipeline``, ``FluxImg2ImgPipeline``) do, in fastdiff's terms:

1. the image, in [-1, 1], is encoded by the VAE (a pixel model takes it as it is); each sample's posterior draw comes
   from its own generator, before its start noise;
2. ``strength`` picks how much of the grid runs: ``t_start`` steps are skipped (``start_index``);
3. the sampler's start state is the clean latents noised to the first remaining sigma (``SamplingPlan.noised``):
   ``x = z0 + sigma * eps``, or ``(1 - t) z0 + t eps`` on a flow time grid.

Images come as diffusers' image processor takes them: PIL images, NumPy arrays (uint8 in [0, 255], or floats in
[0, 1], (H, W, C) or (B, H, W, C)), or torch tensors (B, C, H, W) / (C, H, W) in [0, 1] (a tensor with negative values
is taken as [-1, 1], as diffusers does, with its warning). Unlike diffusers, nothing is resized: a size that is not a
whole number of latent pixels is refused. A torch tensor with a latent model's latent channel count is its latents
(``Pipeline._img2img_images``), used unencoded, as diffusers' pipelines use them.
"""

from __future__ import annotations

import numbers
import warnings

import numpy as np
import torch

from .errors import BadArgumentError

# diffusers' default strength per pipeline: SD 1.x / 2.x img2img 0.8, SDXL img2img 0.3, SD3 / FLUX.1 img2img 0.6
DEFAULT_STRENGTH = {"unet": 0.8, "sdxl": 0.3, "flow": 0.6}


def default_strength(spec) -> float:
    if spec.prediction_type == "flow_prediction":
        return DEFAULT_STRENGTH["flow"]
    return DEFAULT_STRENGTH["sdxl" if spec.time_ids_dim else "unet"]


def check_strength(strength) -> float:
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0 < float(strength) <= 1:
        raise BadArgumentError(f"strength: expected a number in (0, 1] (the share of the steps that run), found "
                               f"{strength!r}")
    return float(strength)


def start_index(steps: int, strength, flow: bool) -> int:
    """How many of ``steps`` grid steps img2img skips, by the rounding of the model's diffusers pipeline: SD / SDXL
    truncate ``steps * strength`` to an int first; SD3 / FLUX.1 subtract the unrounded product, then truncate."""
    strength = check_strength(strength)
    t_start = int(max(steps - min(steps * strength, steps), 0)) if flow else max(steps - min(int(steps * strength),
                                                                                             steps), 0)
    if t_start >= steps:
        raise BadArgumentError(f"strength: {strength} of {steps} steps leaves no step to run; raise strength or steps "
                               f"(at least {int(np.ceil(1 / strength))} steps at this strength)")
    return t_start


def check_whole_pixels(images: torch.Tensor, f: int, name: str, whose: str) -> None:
    """BadArgumentError unless (k, C, H, W) ``images`` span whole latent pixels of ``f`` pixels each (``whose``
    downscale: "the VAE's", ...): fastdiff does not resize."""
    if images.shape[2] % f or images.shape[3] % f:
        raise BadArgumentError(f"{name}: expected a height and width that are multiples of {f} ({whose} downscale; "
                               f"fastdiff does not resize), found {images.shape[2]}x{images.shape[3]}")


def unit_images(image, channels: int, raw: bool = False) -> torch.Tensor:
    """``image`` (see the module docstring) -> float32 (B, channels, H, W) in [0, 1], the form generate() takes
    tensors in (the Engine stacks its requests' images so). ``raw``: float arrays and tensors are taken as they are
    (finite values, no range check or [-1, 1] remapping), as diffusers' control image processor takes them."""
    if isinstance(image, (list, tuple)):
        if not image:
            raise BadArgumentError("image: expected an image or a non-empty list of them, found an empty list")
        if not raw and all(isinstance(im, torch.Tensor) for im in image) and \
                all(im.dim() in (3, 4) for im in image) and len({im.shape[-3:] for im in image}) == 1:
            # (one batch, as diffusers concatenates the list first: one negative value anywhere makes every
            # tensor of it [-1, 1])
            return _from_torch(torch.cat([im if im.dim() == 4 else im[None] for im in image]), channels)
        parts = [unit_images(im, channels, raw) for im in image]
        if len({p.shape[1:] for p in parts}) > 1:
            raise BadArgumentError(f"image: expected images of one size, found {[tuple(p.shape[2:]) for p in parts]}")
        return torch.cat(parts)
    if _is_pil(image):
        if image.mode not in _PIL_8BIT_MODES:  # (convert() would clip 16-bit and float pixels to 255 silently)
            raise BadArgumentError(f"image: expected an 8-bit PIL image, found mode {image.mode!r} (16-bit or float "
                                   f"pixels); convert it to 8 bits first, or pass an array in [0, 1]")
        try:
            image = np.asarray(image.convert("RGB" if channels == 3 else "L"))
        except ValueError as e:  # (Pillow converts some modes to RGB only)
            raise BadArgumentError(f"image: a PIL image of mode {image.mode!r}, which Pillow cannot convert to "
                                   f"{'RGB' if channels == 3 else 'L (one channel)'} ({e}); convert it to RGB or L "
                                   f"first") from None
    if isinstance(image, np.ndarray):
        return _from_numpy(image, channels, raw)
    if isinstance(image, torch.Tensor):
        return _from_torch(image, channels, raw)
    raise BadArgumentError(f"image: expected a PIL image, a NumPy array or a torch tensor (or a list of them), found "
                           f"{type(image).__name__}")


# PIL modes of 8-bit channels (or 1-bit), which convert("RGB" / "L") reads faithfully
_PIL_8BIT_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
# (Pillow reads some of them to RGB only, or to neither: "La" -> "L" and "LAB" -> "L" raise ValueError)


def _is_pil(image) -> bool:
    try:
        from PIL import Image
    except ImportError:  # (Pillow is a dependency; a broken install just means no PIL input)
        return False
    return isinstance(image, Image.Image)


def _from_numpy(a: np.ndarray, channels: int, raw: bool = False) -> torch.Tensor:
    """(H, W), (H, W, C) or (B, H, W, C); uint8 in [0, 255] or floats in [0, 1]."""
    given = a.shape
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or a.shape[-1] != channels:
        raise BadArgumentError(f"image: expected a NumPy array (H, W, {channels}) or (B, H, W, {channels}), found "
                               f"shape {given}" + (" (channels first? NumPy images are channels last)"
                                                   if len(given) == 3 and given[0] == channels else ""))
    _check_not_empty(a.shape[:3])
    if a.dtype == np.uint8:
        unit = a.astype(np.float32) / 255.0
    elif np.issubdtype(a.dtype, np.floating):
        unit = a.astype(np.float32)
        _check_unit(unit.min(), unit.max(), "a float NumPy array", raw=raw)
    else:
        raise BadArgumentError(f"image: expected a uint8 or float NumPy array, found {a.dtype}")
    return torch.from_numpy(np.ascontiguousarray(unit.transpose(0, 3, 1, 2)))


def _from_torch(t: torch.Tensor, channels: int, raw: bool = False) -> torch.Tensor:
    """(C, H, W) or (B, C, H, W) floats in [0, 1] (or [-1, 1] when any value is negative, as diffusers reads it)."""
    if t.dim() == 3:
        t = t[None]
    if t.dim() != 4 or t.shape[1] != channels:
        raise BadArgumentError(f"image: expected a tensor ({channels}, H, W) or (B, {channels}, H, W), found "
                               f"{tuple(t.shape)}")
    if not t.is_floating_point():
        raise BadArgumentError(f"image: expected a float tensor in [0, 1], found {t.dtype}")
    _check_not_empty(tuple(t.shape[:1]) + tuple(t.shape[2:]))
    t = t.detach().float().cpu()
    low, high = (float(v) for v in torch.aminmax(t))
    if raw:
        _check_unit(low, high, "a float tensor", raw=True)
        return t
    if low < 0:
        warnings.warn("image: a tensor with negative values is taken as [-1, 1] (diffusers' deprecated convention); "
                      "pass tensors in [0, 1]", stacklevel=4)
        _check_unit(low, high, "a tensor in [-1, 1]", lowest=-1.0)
        return (t + 1) / 2
    _check_unit(low, high, "a float tensor")
    return t


def _check_not_empty(batch_height_width) -> None:
    if 0 in batch_height_width:
        raise BadArgumentError(f"image: expected at least one image of at least one pixel, found (batch, height, "
                               f"width) {tuple(int(n) for n in batch_height_width)}")


def _check_unit(low, high, what: str, lowest: float = 0.0, raw: bool = False) -> None:
    if raw:  # (any finite values)
        if not (np.isfinite(low) and np.isfinite(high)):
            raise BadArgumentError(f"image: expected {what} of finite values, found NaN or infinity")
        return
    if not (np.isfinite(low) and np.isfinite(high)) or low < lowest or high > 1:
        raise BadArgumentError(f"image: expected {what} with values in [{lowest:g}, 1], found [{low:.4g}, {high:.4g}]"
                               + (" (uint8 pixels go in as a uint8 array or a PIL image)" if high > 1 else ""))


__all__ = ["unit_images", "start_index", "check_strength", "default_strength", "DEFAULT_STRENGTH"]
