"""Pooled text conditioning: SDXL's micro-conditioning (the pooled text embedding and the time ids a
``text_time`` UNet reads) and SD3's pooled projections (``text_embeds`` alone).

diffusers' SDXL pipelines hand the UNet ``added_cond_kwargs={"text_embeds": (B, 1280), "time_ids": (B, N)}``.
fastdiff's UNet takes them as ``text_embeds=`` / ``time_ids=`` and ``Pipeline.generate`` checks and defaults
them here, as ``StableDiffusionXLPipeline._get_add_time_ids`` does:

- SDXL base, 6 ids: original size (h, w), crop top-left (top, left), target size (h, w), in image pixels.
  Default: no crop and both sizes the image's own. The negative ids default to the positive ones.
- SDXL refiner, 5 ids: original size, crop top-left, aesthetic score. Default: the image's size, no crop, an
  aesthetic score of 6.0 (positive) and 2.5 (negative), diffusers' img2img defaults. The negative ids default to
  the positive original size, no crop and the score 2.5, as diffusers' defaults make them.

Image pixels are latent pixels times the VAE's scale factor (8 for every SDXL VAE; the pipeline's own VAE's when it
has one, as diffusers' ``vae_scale_factor``).
"""

from __future__ import annotations

import torch

from .errors import BadArgumentError
from .spec import ModelSpec
from .utils.checks import finite_host_values

VAE_SCALE_FACTOR = 8
AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5  # diffusers' StableDiffusionXLImg2ImgPipeline defaults


def default_time_ids(ids: int, height: int, width: int, negative: bool = False,
                     scale: int = VAE_SCALE_FACTOR) -> list[float]:
    """The ids diffusers' SDXL pipelines build for a (height, width) *latent* with no size / crop arguments
    (``scale``: image pixels per latent pixel)."""
    h, w = height * scale, width * scale
    if ids == 6:
        return [h, w, 0, 0, h, w]
    if ids == 5:
        return [h, w, 0, 0, NEGATIVE_AESTHETIC_SCORE if negative else AESTHETIC_SCORE]
    raise BadArgumentError(f"time_ids: this model takes {ids} time ids; fastdiff knows the defaults of SDXL's 6 "
                           f"(base) and 5 (refiner) only: pass time_ids= explicitly")


def text_time_conditioning(spec: ModelSpec, b: int, size: tuple[int, int], guided: bool, device, dtype, *,
                           text_embeds=None, negative_text_embeds=None, time_ids=None,
                           negative_time_ids=None, scale: int = VAE_SCALE_FACTOR) -> tuple[dict, dict]:
    """(cond, uncond) keyword tensors for a model with a pooled text input (SDXL-style UNets, SD3); both empty for
    any other model (which then must not be given any of these arguments). Time ids only where the model takes them
    (``scale``: the VAE's image pixels per latent pixel, for the default ids).
    """
    given = {k: v for k, v in dict(text_embeds=text_embeds, negative_text_embeds=negative_text_embeds,
                                   time_ids=time_ids, negative_time_ids=negative_time_ids).items() if v is not None}
    if spec.text_embeds_dim is None:
        if given:
            raise BadArgumentError(f"{', '.join(sorted(given))}: given, but this model has no pooled text input "
                                   f"(SDXL's micro-conditioning, SD3's pooled projections)")
        return {}, {}
    stray = sorted(k for k in ("time_ids", "negative_time_ids") if k in given and spec.time_ids_dim is None)
    if stray:
        raise BadArgumentError(f"{', '.join(stray)}: given, but this model takes no time ids (only SDXL-style UNets "
                               f"do)")
    if text_embeds is None:
        raise BadArgumentError(f"text_embeds: this model conditions on a pooled text embedding: expected a "
                               f"({b}, {spec.text_embeds_dim}) tensor, found None")
    cond = {"text_embeds": _pooled(text_embeds, spec, b, "text_embeds", device, dtype)}
    uncond = {}
    if guided:
        if negative_text_embeds is None:
            raise BadArgumentError("cfg_scale != 1 (or a CFG++ sampler) on a model with a pooled text input needs "
                                   "negative_text_embeds "
                                   "(the pooled embedding of the empty / negative prompt; zeros where diffusers' "
                                   "force_zeros_for_empty_prompt applies)")
        uncond["text_embeds"] = _pooled(negative_text_embeds, spec, b, "negative_text_embeds", device, dtype)
    elif negative_text_embeds is not None or negative_time_ids is not None:
        raise BadArgumentError("negative_text_embeds / negative_time_ids: given, but cfg_scale == 1 runs no "
                               "unconditional pass")
    if spec.time_ids_dim is None:
        return cond, uncond
    explicit_ids = time_ids is not None
    if time_ids is None:
        time_ids = default_time_ids(spec.time_ids_dim, *size, scale=scale)
    cond["time_ids"] = _ids(time_ids, spec, b, "time_ids", device, dtype)
    if guided:
        if negative_time_ids is None:  # as diffusers: the same sizes and crop; the refiner's negative score
            if not explicit_ids:
                negative_time_ids = default_time_ids(spec.time_ids_dim, *size, negative=True, scale=scale)
            elif spec.time_ids_dim == 5:  # diffusers' img2img: its negative crop corner defaults to (0, 0) too
                negative_time_ids = cond["time_ids"].clone()
                negative_time_ids[:, 2:4] = 0
                negative_time_ids[:, 4] = NEGATIVE_AESTHETIC_SCORE
            else:
                negative_time_ids = cond["time_ids"]
        uncond["time_ids"] = _ids(negative_time_ids, spec, b, "negative_time_ids", device, dtype)
    return cond, uncond


FLUX_GUIDANCE = 3.5  # diffusers' FluxPipeline default guidance_scale (FluxControlPipeline's too)
FLUX_EDIT_GUIDANCE = 7.0  # FluxImg2ImgPipeline's and FluxInpaintPipeline's
FLUX_FILL_GUIDANCE = 30.0  # FluxFillPipeline's


def guidance_conditioning(spec: ModelSpec, b: int, guidance, device, edits: bool = False) -> dict:
    """{"guidance": (B,) float32} for a guidance-distilled network (Flux dev), shared by both CFG passes; {} for
    any other model, which must not be given one. ``guidance``: one strength, or one per sample; None: the default
    of diffusers' pipeline for the task (``edits``: an image to edit or inpaint)."""
    if not spec.guidance_input:
        if guidance is not None:
            raise BadArgumentError(f"guidance: given ({guidance!r}), but this model takes no distilled-guidance "
                                   f"strength (only guidance-distilled models such as FLUX.1 dev do; cfg_scale is "
                                   f"classifier-free guidance)")
        return {}
    if guidance is None:  # (FLUX.1 Fill, the one inpainting network with a guidance input, defaults to its own)
        guidance = FLUX_FILL_GUIDANCE if spec.inpainting else FLUX_EDIT_GUIDANCE if edits else FLUX_GUIDANCE
    g = _floats(guidance, "guidance", device).reshape(-1)
    if g.numel() not in (1, b):
        raise BadArgumentError(f"guidance: expected one strength or {b} (one per sample), found {g.numel()}")
    return {"guidance": g.float().expand(b).contiguous()}


def _pooled(t, spec: ModelSpec, b: int, name: str, device, dtype) -> torch.Tensor:
    t = _floats(t, name, device)
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2 or t.shape[1] != spec.text_embeds_dim or t.shape[0] not in (1, b):
        raise BadArgumentError(f"{name}: expected shape ({b}, {spec.text_embeds_dim}) (the pooled text embedding), "
                               f"found {tuple(t.shape)}")
    return t.to(dtype).expand(b, -1)


def _ids(t, spec: ModelSpec, b: int, name: str, device, dtype) -> torch.Tensor:
    t = _floats(t, name, device)
    n = spec.time_ids_dim
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2 or t.shape[1] != n or t.shape[0] not in (1, b):
        raise BadArgumentError(f"{name}: expected {n} numbers, or a ({b}, {n}) tensor (one row per sample), found "
                               f"shape {tuple(t.shape)}")
    return t.to(dtype).expand(b, -1)


def _floats(t, name: str, device) -> torch.Tensor:
    """``t`` as a float tensor on ``device``; host values (lists, arrays, CPU tensors) are checked for NaN / inf
    before they move (a tensor already on the device is not read back)."""
    try:
        t = torch.as_tensor(t)
    except (TypeError, ValueError, RuntimeError) as e:
        raise BadArgumentError(f"{name}: expected numbers (a list, an array or a tensor), found {t!r}") from e
    if t.dtype == torch.bool or t.is_complex():
        raise BadArgumentError(f"{name}: expected real numbers, found {t.dtype}")
    t = t.float() if not t.is_floating_point() else t
    finite_host_values(name, t)
    return t.to(device)


__all__ = ["FLUX_GUIDANCE", "FLUX_EDIT_GUIDANCE", "FLUX_FILL_GUIDANCE", "guidance_conditioning", "AESTHETIC_SCORE",
           "NEGATIVE_AESTHETIC_SCORE", "VAE_SCALE_FACTOR", "default_time_ids", "text_time_conditioning"]
