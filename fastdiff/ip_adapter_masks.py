"""IP-Adapter masks: each image prompt acts only where its mask is white (diffusers'
``cross_attention_kwargs={"ip_adapter_masks": masks}``, e.g. two faces, each in its half of the picture).

``ip_adapter_mask`` makes an adapter's masks from mask images as diffusers' ``IPAdapterMaskProcessor().preprocess``
does, in diffusers' per-adapter layout (1, N, H, W); ``generate(ip_adapter_masks=...)`` takes those tensors or the
images. With masks every image of the adapter gets its own attention, weighted per query by its mask downsampled to
the layer (``fastdiff.models.ip_adapter.add_image_attention``), and the adapter's scale may be one per image
(diffusers' ``set_ip_adapter_scale([[0.7, 0.5]])``): here that scale weights the image's mask, which the layers
scale linearly, so per-image scales need no change to the network.
"""

from __future__ import annotations

import warnings
from typing import Optional

import numpy as np
import torch

from .errors import BadArgumentError
from .models.ip_adapter import mask_cells

VAE_GRID = 8  # IPAdapterMaskProcessor's vae_scale_factor: sizes round down to it


def ip_adapter_mask(images, height: Optional[int] = None, width: Optional[int] = None) -> torch.Tensor:
    """(1, N, H, W) float masks, 0 or 1, of N mask images (PIL images of any mode): resized with Lanczos to
    ``height`` x ``width`` (default: the first image's size) rounded down to multiples of 8, then made grayscale,
    white from 0.5 up (diffusers' ``IPAdapterMaskProcessor().preprocess(images, height, width)`` reshaped to one
    adapter's (1, N, H, W)). Masks already as arrays: pass a (1, N, H, W) float tensor to ``generate``."""
    from PIL import Image

    images = list(images) if isinstance(images, (list, tuple)) else [images]
    if not images:
        raise BadArgumentError("ip_adapter_mask: expected a mask image or a list of them, found an empty list")
    for image in images:
        if not isinstance(image, Image.Image):
            raise BadArgumentError(f"ip_adapter_mask: expected PIL images (or, to generate, a (1, N, H, W) float "
                                   f"tensor of masks), found {type(image).__name__}")
    w, h = images[0].size
    w, h = (width or w) // VAE_GRID * VAE_GRID, (height or h) // VAE_GRID * VAE_GRID
    if h <= 0 or w <= 0:
        raise BadArgumentError(f"ip_adapter_mask: expected a size of at least {VAE_GRID} x {VAE_GRID}, found "
                               f"{height or images[0].size[1]} x {width or images[0].size[0]}")
    # resized in the image's own mode, then grayscale (the processor's order: RGB(A) resamples per channel)
    arrays = [np.asarray(i.resize((w, h), resample=Image.LANCZOS).convert("L"), dtype=np.float32) / 255.0
              for i in images]
    masks = torch.from_numpy(np.stack(arrays))[None]  # (1, N, H, W)
    return (masks >= 0.5).float()


def prepare_masks(masks, counts: list, b: int, size: tuple, grids: list, device,
                  image_scales: tuple) -> Optional[tuple]:
    """generate(ip_adapter_masks=) as one entry per adapter (None, or (b, N, H, W) float32 on ``device``, each image's
    mask times its per-image scale), or None. ``counts``: each adapter's number of images; ``size``: the output's
    (height, width) in pixels, for mask images; ``grids``: the (rows, cols) of the UNet's attention layers, where
    masks of another aspect ratio miss cells (a warning, as diffusers'); ``image_scales``: per adapter None or a
    tuple of per-image scales."""
    adapters = len(counts)
    if masks is None:
        wanting = [i for i, s in enumerate(image_scales) if s is not None]
        if wanting:
            raise BadArgumentError(f"ip_adapter_masks: IP-Adapter {wanting[0]} has one scale per image "
                                   f"(set_ip_adapter_scale), which weights masked images: expected its masks, found "
                                   f"none")
        return None
    if torch.is_tensor(masks) and masks.dim() == 4 and adapters > 1:
        masks = list(masks[:, None])  # diffusers' stacked form: (adapters, N, H, W), split per adapter
    elif torch.is_tensor(masks) or not isinstance(masks, (list, tuple)):
        masks = [masks]
    elif adapters == 1 and len(masks) > 1 and all(_is_image(m) for m in masks):
        masks = [list(masks)]  # one adapter's mask images, as ip_adapter_image takes its images
    if len(masks) != adapters:
        raise BadArgumentError(f"ip_adapter_masks: expected one entry (masks or None) per loaded IP-Adapter "
                               f"({adapters}), found {len(masks)}")
    out = []
    for i, (m, count, scales) in enumerate(zip(masks, counts, image_scales)):
        if m is None:
            if scales is not None:
                raise BadArgumentError(f"ip_adapter_masks: IP-Adapter {i} has one scale per image, which weights "
                                       f"masked images: expected its masks, found None")
            out.append(None)
            continue
        if not torch.is_tensor(m):
            m = ip_adapter_mask(m, *size)
        out.append(_adapter_masks(m, i, count, b, size, grids, scales, device))
    return tuple(out)


def _adapter_masks(m: torch.Tensor, adapter: int, count: int, b: int, size: tuple, grids: list, scales,
                   device) -> torch.Tensor:
    if m.dim() != 4 or m.shape[0] not in (1, b) or m.shape[1] != count or not m.is_floating_point():
        raise BadArgumentError(f"ip_adapter_masks: expected float masks (1, {count}, H, W) for IP-Adapter {adapter} "
                               f"(one per image; ip_adapter_mask makes them), found "
                               f"{tuple(m.shape)} {m.dtype}")
    if not torch.isfinite(m).all():
        raise BadArgumentError("ip_adapter_masks: expected finite values, found NaN or inf")
    if scales is not None and len(scales) != count:
        raise BadArgumentError(f"ip_adapter_masks: IP-Adapter {adapter} has {len(scales)} per-image scales and "
                               f"{count} images")
    if any(rows * cols != h * w for h, w in grids for rows, cols in [mask_cells(m.shape[2], m.shape[3], h * w)]):
        warnings.warn(f"ip_adapter_masks: the aspect ratio of the masks ({m.shape[3]} x {m.shape[2]}) does not match "
                      f"the output's ({size[1]} x {size[0]}): their downsampled cells are padded with zeros or cut, as "
                      f"diffusers does", UserWarning, stacklevel=4)
    m = m.to(device, torch.float32)
    if scales is not None:
        m = m * torch.tensor(scales, dtype=torch.float32, device=device)[None, :, None, None]
    return m.expand(b, *m.shape[1:])


def _is_image(value) -> bool:
    from PIL import Image

    return isinstance(value, Image.Image)
