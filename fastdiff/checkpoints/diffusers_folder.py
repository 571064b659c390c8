"""diffusers model folders (config.json + weights) and pipeline folders (unet/ or transformer/ + scheduler/)."""

from __future__ import annotations

import os
from typing import Optional

import torch

from ..errors import CheckpointError, UnsupportedConfigError
from ..spec import DEFAULT_SCHEDULER, FLOW_SCHEDULERS, ModelSpec
from .io import read_json, read_sharded, read_weights

UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
DIT_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")
MMDIT_CLASSES = ("SD3Transformer2DModel",)
FLUX_CLASSES = ("FluxTransformer2DModel",)
WEIGHT_NAMES = ("diffusion_pytorch_model", "model")


def is_model_folder(path: str) -> bool:
    """A diffusers model folder: a config.json naming its class (an unsupported class is refused by name on load)."""
    cfg = os.path.join(path, "config.json")
    return os.path.isfile(cfg) and isinstance(read_json(cfg).get("_class_name"), str)


def is_pipeline_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "model_index.json")) or any(
        is_model_folder(os.path.join(path, sub)) for sub in ("unet", "transformer"))


def find_weights(folder: str, variant: Optional[str] = None) -> dict[str, torch.Tensor]:
    """The state dict of a diffusers model folder: safetensors first, then .bin; sharded via the index."""
    tag = f".{variant}" if variant else ""
    for base in WEIGHT_NAMES:
        for ext in ("safetensors", "bin"):
            single = os.path.join(folder, f"{base}{tag}.{ext}")
            if os.path.isfile(single):
                return read_weights(single)
            # diffusers names a sharded variant's index <base>.<ext>.index.<variant>.json; the other spelling is
            # taken too
            for index in dict.fromkeys((f"{base}.{ext}.index{tag}.json", f"{base}{tag}.{ext}.index.json")):
                if os.path.isfile(os.path.join(folder, index)):
                    return read_sharded(folder, index)
    found = sorted(os.listdir(folder))
    variants = sorted(_variants(found))
    hint = f"; the folder has variant(s) {variants}: pass variant=" if variants and not variant else ""
    raise CheckpointError(
        f"{folder}: expected diffusion_pytorch_model{tag}.safetensors / .bin (or a sharded *.index.json), "
        f"found {found}{hint}")


def _variants(names) -> set:
    """The weight variants a folder's file names carry: <base>.<v>.<ext>, sharded <base>.<v>-0000N-of-0000M.<ext>
    and the index <base>.<ext>.index.<v>.json."""
    import re

    found, bases = set(), "|".join(WEIGHT_NAMES)
    for name in names:
        m = re.fullmatch(r"(?:%s)\.(.+?)(?:-\d+-of-\d+)?\.(?:safetensors|bin)" % bases, name) or \
            re.fullmatch(r"(?:%s)\.(?:safetensors|bin)\.index\.(.+)\.json" % bases, name) or \
            re.fullmatch(r"(?:%s)\.(.+)\.(?:safetensors|bin)\.index\.json" % bases, name)
        if m:
            found.add(m.group(1))
    return found


def load_model_folder(folder: str, variant: Optional[str] = None):
    """(kind, native config, native state dict, diffusers config dict) of a diffusers model folder."""
    config = read_json(os.path.join(folder, "config.json"))
    cls = config.get("_class_name")
    supported = UNET_CLASSES + DIT_CLASSES + MMDIT_CLASSES + FLUX_CLASSES
    if cls not in supported:  # (before reading gigabytes of weights)
        raise UnsupportedConfigError("_class_name", cls, model=folder, supported=list(supported))
    state = find_weights(folder, variant)
    if cls in UNET_CLASSES:
        from .diffusers_unet import convert_diffusers_unet, unet_config_from_diffusers

        return "unet", unet_config_from_diffusers(config), convert_diffusers_unet(state), config
    if cls in DIT_CLASSES:
        from .dit import convert_diffusers_dit, dit_config_from_diffusers

        cfg = dit_config_from_diffusers(config, state)
        return "dit", cfg, convert_diffusers_dit(state, cfg), config
    if cls in MMDIT_CLASSES:  # fastdiff's MMDiT keeps diffusers' parameter names: no conversion
        from ..models.mmdit import MMDiTConfig

        return "mmdit", MMDiTConfig.from_diffusers(config), state, config
    if cls in FLUX_CLASSES:  # the same for Flux
        from ..models.flux import FluxConfig

        return "flux", FluxConfig.from_diffusers(config), state, config
    raise AssertionError(cls)  # pragma: no cover - refused above


def spec_for(kind: str, cfg, scheduler: Optional[dict], source: str) -> ModelSpec:
    """The sampling facts of a native config (+ the scheduler config that came with it)."""
    if not scheduler and kind in ("mmdit", "flux"):  # a transformer folder alone: its family's own flow schedule
        from .presets import FLUX_SCHEDULER, FLUX_SCHNELL_SCHEDULER, SD3_SCHEDULER

        scheduler = SD3_SCHEDULER if kind == "mmdit" else FLUX_SCHEDULER if cfg.guidance_embeds else \
            FLUX_SCHNELL_SCHEDULER  # (schnell, no guidance input: shift 1, no resolution shift)
    scheduler = dict(scheduler) if scheduler else dict(DEFAULT_SCHEDULER)
    prediction = scheduler.get("prediction_type", "epsilon")
    if scheduler.get("_class_name") in FLOW_SCHEDULERS:
        prediction = "flow_prediction"
    if kind == "unet":
        size = cfg.sample_size or 32
        cross = cfg.cross_attention_dim
        cross = cross if isinstance(cross, int) or cross is None else list(cross)[0]
        text_dim, ids = cfg.text_time_dims or (None, None)
        # SD / SDXL inpainting UNets take C latents + the mask + the masked image's C latents (9 = 4 + 1 + 4)
        inpainting = cfg.in_channels == 2 * cfg.out_channels + 1
        channels = cfg.out_channels if inpainting else cfg.in_channels  # what the sampler runs on
        return ModelSpec(
            kind="unet", model_config=cfg.to_dict(), prediction_type=prediction, scheduler=scheduler,
            in_channels=channels, sample_size=size, learned_variance=cfg.out_channels == 2 * channels,
            inpainting=inpainting,
            num_classes=cfg.num_class_embeds, cross_attention_dim=cross if cfg.conditional else None,
            text_embeds_dim=text_dim, time_ids_dim=ids, source=source)
    if kind in ("mmdit", "flux") and prediction != "flow_prediction":
        raise UnsupportedConfigError("scheduler", scheduler.get("_class_name"), model=f"{kind} ({source})",
                                     supported="a flow-matching scheduler (FlowMatch*, or a solver with "
                                               "use_flow_sigmas): SD3 / Flux networks predict the flow velocity")
    if kind == "mmdit":  # SD3: text states and a pooled text embedding; a flow-matching network
        size = cfg.sample_size
        return ModelSpec(
            kind="mmdit", model_config=cfg.to_dict(), prediction_type=prediction, scheduler=scheduler,
            in_channels=cfg.in_channels, sample_size=size, cross_attention_dim=cfg.joint_attention_dim,
            text_embeds_dim=cfg.pooled_projection_dim, source=source)
    if kind == "flux":  # Flux: T5 states, a pooled CLIP embedding, dev's guidance strength; 1024 px by default
        if scheduler.get("_class_name") == "FlowMatchEulerDiscreteScheduler":
            scheduler.setdefault("flow_pipeline_sigmas", "linspace")  # what FluxPipeline hands set_timesteps
        return ModelSpec(
            kind="flux", model_config=cfg.to_dict(), prediction_type=prediction, scheduler=scheduler,
            in_channels=cfg.latent_channels, sample_size=128, cross_attention_dim=cfg.joint_attention_dim,
            text_embeds_dim=cfg.pooled_projection_dim, guidance_input=cfg.guidance_embeds,
            inpainting=cfg.condition_channels > cfg.latent_channels, source=source)  # (FLUX.1 Fill)
    num_classes = cfg.num_classes or None
    null = num_classes if (num_classes and cfg.class_dropout_prob > 0) else None
    return ModelSpec(
        kind="dit", model_config=cfg.to_dict(), prediction_type=prediction, scheduler=scheduler,
        in_channels=cfg.in_channels, sample_size=cfg.input_size, learned_variance=bool(cfg.learn_sigma),
        num_classes=num_classes, null_class=null, source=source)


# diffusers' SD 1.x / 2.x pipelines rewrite an outdated scheduler config in their constructors (with a deprecation
# warning): steps_offset -> 1, clip_sample -> False; the inpainting pipeline also PNDM's skip_prk_steps -> True
_SD_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline",
                 "OnnxStableDiffusionPipeline", "OnnxStableDiffusionImg2ImgPipeline",
                 "OnnxStableDiffusionInpaintPipeline", "StableDiffusionPAGPipeline",
                 "StableDiffusionPAGImg2ImgPipeline", "StableDiffusionPAGInpaintPipeline", "AltDiffusionPipeline",
                 "AltDiffusionImg2ImgPipeline")
_REWRITES = {"steps_offset": (lambda v: v != 1, 1), "clip_sample": (lambda v: v is True, False)}
_INPAINT_REWRITES = {"skip_prk_steps": (lambda v: v is False, True)}


def pipeline_scheduler_rewrites(pipeline_class: Optional[str], scheduler: Optional[dict]) -> tuple:
    """(the scheduler config as the folder's diffusers pipeline class runs it, a note per rewritten key)."""
    from ..scheduler_config import effective_config

    runs = None if scheduler is None or pipeline_class not in _SD_PIPELINES else effective_config(scheduler)
    if runs is None:
        return scheduler, []
    rules = {**_REWRITES, **(_INPAINT_REWRITES if pipeline_class == "StableDiffusionInpaintPipeline" else {})}
    changed = {key: new for key, (outdated, new) in rules.items() if key in runs and outdated(runs[key])}
    notes = [f"scheduler {key}={runs[key]!r} run as {new!r}, as diffusers' {pipeline_class} rewrites it"
             for key, new in changed.items()]
    return {**scheduler, **changed}, notes


# the latent scaling diffusers' StableDiffusionUpscalePipeline gives its VAE whatever vae/config.json says, and its
# default noise level
UPSCALER_SCALING_FACTOR = 0.08333
UPSCALER_NOISE_LEVEL = 20


def _upscaler_spec(folder: str, index: dict, cfg, spec) -> None:
    """Stable Diffusion's x4 upscaler (``StableDiffusionUpscalePipeline``): the UNet takes its latents and the
    low-resolution image at the latents' size, noised by the folder's ``low_res_scheduler`` to a noise level that is
    also its class label."""
    path = os.path.join(folder, "low_res_scheduler", "scheduler_config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder}: a StableDiffusionUpscalePipeline folder needs low_res_scheduler/"
                              f"scheduler_config.json (the schedule that noises the low-resolution image); not found")
    extra = cfg.in_channels - cfg.out_channels
    if extra <= 0 or not cfg.num_class_embeds:
        raise CheckpointError(f"{folder}: a StableDiffusionUpscalePipeline's UNet takes its latents and the image "
                              f"(in_channels > out_channels) and the noise level as a class label (num_class_embeds); "
                              f"found in_channels {cfg.in_channels}, out_channels {cfg.out_channels}, num_class_embeds "
                              f"{cfg.num_class_embeds}")
    spec.in_channels, spec.low_res_channels = cfg.out_channels, extra
    spec.learned_variance = False
    spec.low_res_noise = {"scheduler": read_json(path), "max_noise_level": int(index.get("max_noise_level", 350))}
    top = spec.low_res_noise["max_noise_level"]
    spec.notes.append(f"Stable Diffusion upscaler: generate(image=LOW_RES, prompt=..., noise_level=0..{top}, default "
                      f"{UPSCALER_NOISE_LEVEL}) samples latents of the image's size, which the VAE decodes to the "
                      f"upscaled image")


def load_pipeline_folder(folder: str, variant: Optional[str] = None):
    """(kind, config, state, spec) from a diffusers pipeline folder."""
    for sub in ("unet", "transformer"):
        if is_model_folder(os.path.join(folder, sub)):
            kind, cfg, state, _ = load_model_folder(os.path.join(folder, sub), variant)
            break
    else:
        raise CheckpointError(f"{folder}: a diffusers pipeline folder needs unet/ or transformer/ with a "
                              f"UNet / DiT config.json; found {sorted(os.listdir(folder))}")
    sched_path = os.path.join(folder, "scheduler", "scheduler_config.json")
    scheduler = read_json(sched_path) if os.path.isfile(sched_path) else None
    from ..scheduler_checks import check_scheduler_config

    scheduler_notes = check_scheduler_config(scheduler) if scheduler is not None else []
    index_path = os.path.join(folder, "model_index.json")
    index = read_json(index_path) if os.path.isfile(index_path) else {}
    scheduler, rewritten = pipeline_scheduler_rewrites(index.get("_class_name"), scheduler)
    spec = spec_for(kind, cfg, scheduler, source=f"diffusers pipeline {folder}")
    spec.notes.extend(scheduler_notes)
    spec.notes.extend(rewritten)
    if index.get("_class_name") == "StableDiffusionUpscalePipeline":
        _upscaler_spec(folder, index, cfg, spec)
    if spec.time_ids_dim is not None and index:
        # SDXL's refiner pipeline says it takes the aesthetic score: 5 time ids, whatever its widths suggest
        aesthetic = index.get("requires_aesthetics_score")
        ids = 5 if aesthetic else 6
        pooled = cfg.projection_class_embeddings_input_dim - ids * cfg.addition_time_embed_dim
        if isinstance(aesthetic, bool) and pooled > 0:
            spec.time_ids_dim, spec.text_embeds_dim = ids, pooled
    vae, vae_config = os.path.join(folder, "vae"), os.path.join(folder, "vae", "config.json")
    if os.path.isdir(vae) and not (os.path.isfile(vae_config) and
                                   read_json(vae_config).get("_class_name") == "AutoencoderKL"):
        spec.notes.append("vae/ present but not an AutoencoderKL: not loaded; output_type 'tensor' gives latents")
    if scheduler is None:
        spec.notes.append("no scheduler/scheduler_config.json; " + spec.default_scheduler_note())
    else:
        from ..scheduler_config import unsupported_scheduler_note

        note = unsupported_scheduler_note(scheduler)
        if note:
            spec.notes.append(note)
    return kind, cfg, state, spec
