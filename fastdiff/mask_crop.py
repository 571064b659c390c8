"""``generate(padding_mask_crop=...)``: inpaint a crop around the mask at the model's resolution, then paste it back,
as diffusers' inpainting pipelines do with ``padding_mask_crop``.

A small mask on a large image repaints only a few latent pixels at the image's own size. With a padding the pipeline
instead:

1. finds the smallest box holding every nonzero mask pixel, widens it by the padding on each side (within the
   image), and grows its short side until the box has the output's aspect ratio (``crop_region``);
2. crops the image and the mask to that box and resizes both to the output size (Lanczos), keeping the aspect ratio
   and stretching the edge rows or columns into any gap (diffusers' ``resize_mode="fill"``: ``resize_fill``); a
   ControlNet's images are cropped and resized so too (``MaskCrop.control``);
3. inpaints that crop as usual;
4. resizes each result to the box (centre-cropping any excess: ``resize_mode="crop"``), pastes it on a transparent
   canvas at the box, and lays the original image over it wherever the original mask is not white (the mask's
   inverse is the original's alpha, so soft mask edges blend: ``overlay``).

The steps work on PIL images, as diffusers' do: the image and the mask must be one PIL image each, and the output
PIL images at the original image's size.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from .errors import BadArgumentError


def check_padding(pad, image, mask, output_type: str) -> int:
    """The padding in pixels, once the image, the mask and the output type allow a crop; or a clear error."""
    from PIL import Image

    if isinstance(pad, bool) or not isinstance(pad, numbers.Integral) or pad < 0:
        raise BadArgumentError(f"padding_mask_crop: expected a number of pixels (an int >= 0), found {pad!r}")
    for name, value in (("image", image), ("mask_image", mask)):
        if not isinstance(value, Image.Image):
            raise BadArgumentError(f"{name}: padding_mask_crop crops and pastes PIL images, as diffusers does: "
                                   f"expected one PIL image, found {type(value).__name__}")
    if image.size != mask.size:
        raise BadArgumentError(f"mask_image: expected the image's size {image.size[::-1]}, found {mask.size[::-1]}")
    if output_type != "pil":
        raise BadArgumentError(f"output_type: padding_mask_crop pastes the result into the original PIL image: "
                               f"expected 'pil', found {output_type!r}")
    if not np.asarray(mask.convert("L")).any():
        raise BadArgumentError("mask_image: padding_mask_crop crops around the mask, and this mask is all black "
                               "(nothing to repaint)")
    return int(pad)


def crop_region(mask, width: int, height: int, pad: int) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2): the box around the mask's nonzero pixels, ``pad`` wider on each side within the image, its
    short side then grown (centred, shifted back inside the image, clipped to it) to ``width / height``'s ratio."""
    m = np.asarray(mask.convert("L"))
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    h, w = m.shape
    x1, y1 = max(int(cols[0]) - pad, 0), max(int(rows[0]) - pad, 0)
    x2, y2 = min(int(cols[-1]) + 1 + pad, w), min(int(rows[-1]) + 1 + pad, h)
    ratio = width / height
    if (x2 - x1) / (y2 - y1) > ratio:  # too wide: grow the height
        y1, y2 = _grow(y1, y2, int((x2 - x1) / ratio - (y2 - y1)), h)
    else:
        x1, x2 = _grow(x1, x2, int((y2 - y1) * ratio - (x2 - x1)), w)
    return x1, y1, x2, y2


def _grow(lo: int, hi: int, extra: int, size: int) -> tuple[int, int]:
    """[lo, hi) widened by ``extra`` (half before, the rest after), moved back inside [0, size), clipped to it."""
    lo, hi = lo - extra // 2, hi + extra - extra // 2
    if hi >= size:
        lo, hi = lo - (hi - size), size
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, size)


def resize_fill(image, width: int, height: int):
    """``image`` resized into ``width`` x ``height`` at its own aspect ratio, centred, the gap on either side filled
    by stretching its first / last row (or column): an RGB image."""
    from PIL import Image

    wide = width / height < image.width / image.height
    src_w = width if wide else image.width * height // image.height
    src_h = height if not wide else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=Image.Resampling.LANCZOS)  # (diffusers' default resampling)
    out = Image.new("RGB", (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if wide:
        gap = height // 2 - src_h // 2
        if gap > 0:
            out.paste(resized.resize((width, gap), box=(0, 0, width, 0)), box=(0, 0))
            out.paste(resized.resize((width, gap), box=(0, resized.height, width, resized.height)),
                      box=(0, gap + src_h))
    elif width / height > image.width / image.height:
        gap = width // 2 - src_w // 2
        if gap > 0:
            out.paste(resized.resize((gap, height), box=(0, 0, 0, height)), box=(0, 0))
            out.paste(resized.resize((gap, height), box=(resized.width, 0, resized.width, height)),
                      box=(gap + src_w, 0))
    return out


def resize_crop(image, width: int, height: int):
    """``image`` resized to cover ``width`` x ``height`` at its own aspect ratio, centred, the excess cut: RGB."""
    from PIL import Image

    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio > src_ratio else image.width * height // image.height
    src_h = height if ratio <= src_ratio else image.height * width // image.width
    out = Image.new("RGB", (width, height))
    resized = image.resize((src_w, src_h), resample=Image.Resampling.LANCZOS)
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    return out


@dataclass
class MaskCrop:
    """One inpainting crop: ``image`` / ``mask`` are what the model inpaints (the output's size); ``overlay`` puts
    its results back into ``original``."""
    original: object  # PIL.Image: the image as given
    original_mask: object  # PIL.Image: the mask as given
    region: tuple  # (x1, y1, x2, y2) in the original's pixels
    image: object  # PIL.Image, RGB, the output's size
    mask: object  # PIL.Image, L, the output's size

    def control(self, control_image):
        """A ControlNet's image(s) (PIL, at the original's size; a list keeps its layout) cropped to the region and
        resized to the output's size as the image is (diffusers' ControlNet inpainting pipelines do so)."""
        from PIL import Image

        if isinstance(control_image, (list, tuple)):
            return [self.control(c) for c in control_image]
        if not isinstance(control_image, Image.Image) or control_image.size != self.original.size:
            found = (f"a PIL image of {control_image.size[::-1]}" if isinstance(control_image, Image.Image)
                     else type(control_image).__name__)
            raise BadArgumentError(f"control_image: padding_mask_crop crops it with the image: expected PIL images "
                                   f"of the image's size {self.original.size[::-1]}, found {found}")
        return resize_fill(control_image.crop(self.region), *self.image.size).convert("RGB")

    def overlay(self, results: list) -> list:
        """Each result (a PIL image at the output's size) resized into the region, with the original laid over it
        where the original mask is not white."""
        from PIL import Image, ImageOps

        w, h = self.original.size
        known = Image.new("RGBa", (w, h))  # the original, its alpha the inverted mask (premultiplied, as diffusers)
        known.paste(self.original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(self.original_mask.convert(
            "L")))
        known = known.convert("RGBA")
        x1, y1, x2, y2 = self.region
        out = []
        for result in results:
            canvas = Image.new("RGBA", (w, h))
            canvas.paste(resize_crop(result, x2 - x1, y2 - y1), (x1, y1))
            canvas = canvas.convert("RGB").convert("RGBA")
            canvas.alpha_composite(known)
            out.append(canvas.convert("RGB"))
        return out


def crop_to_mask(image, mask, pad, output_type: str, size: tuple, multiple: int = 1) -> MaskCrop:
    """The crop of ``image`` and ``mask`` (one PIL image each) around the mask, ``pad`` pixels wider, resized to
    ``size`` (height, width in pixels: the output's; a None is the image's own, rounded down to ``multiple``, as
    diffusers' ControlNet inpainting pipelines default it)."""
    pad = check_padding(pad, image, mask, output_type)
    height, width = (own - own % multiple if v is None else v for v, own in zip(size, (image.height, image.width)))
    region = crop_region(mask, width, height, pad)
    return MaskCrop(original=image, original_mask=mask, region=region,
                    image=resize_fill(image.crop(region), width, height).convert("RGB"),
                    mask=resize_fill(mask.crop(region), width, height).convert("L"))


__all__ = ["check_padding", "crop_region", "resize_fill", "resize_crop", "MaskCrop", "crop_to_mask"]
