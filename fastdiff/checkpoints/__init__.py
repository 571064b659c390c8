"""Checkpoint formats: detection, safe reading and one converter per foreign layout.

``fastdiff.load(path)`` is the single entry point. It detects the format, converts the weights to
the native layout, builds the native model on the meta device and assigns the weights (no second
copy, no random init), and returns a ``Pipeline``.

Supported sources:
- a fastdiff folder (``fastdiff.json`` + ``model.safetensors``, written by ``Pipeline.save``);
- a diffusers model folder (``config.json`` + safetensors / .bin, sharded with an index) of a
  UNet2DModel, UNet2DConditionModel or DiTTransformer2DModel;
- a diffusers pipeline folder (``unet/`` or ``transformer/``, ``scheduler/``);
- an official DiT ``.pt`` / ``.pth`` (a plain state dict, or a train.py checkpoint: its ``ema``);
- ``builtin:NAME`` (weights shipped in the package) and ``arch:NAME`` (random weights of a
  well-known architecture, for benchmarks).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from ..errors import (BadArgumentError, CheckpointError, FastdiffError, UnknownFormatError, UnsafeCheckpointError,
                      UnsupportedConfigError)

SUPPORTED_FORMATS = (
    "fastdiff folder (fastdiff.json + model.safetensors)",
    "diffusers model folder (config.json + diffusion_pytorch_model.safetensors/.bin, optionally sharded)",
    "diffusers pipeline folder (model_index.json, unet/ or transformer/, scheduler/)",
    "official DiT checkpoint (.pt/.pth: state dict or train.py checkpoint with 'ema')",
    "openai/guided-diffusion checkpoint (.pt, resblock_updown models)",
    "NVlabs/edm EDMPrecond state dict (.pt: SongUNet / DhariwalUNet)",
    "Stable Diffusion single file (.safetensors / .ckpt with model.diffusion_model.* UNet keys)",
    "Stable Diffusion 3 / 3.5 single file (.safetensors with model.diffusion_model.joint_blocks.*)",
    "FLUX.1 single file (Black Forest Labs' .safetensors: double_blocks.* / single_blocks.*)",
    "ONNX model exported by fastdiff (.onnx)",
    "builtin:NAME, arch:NAME",
)


def load(path: str, device="cpu", dtype: Optional[torch.dtype] = None, *, variant: Optional[str] = None,
         num_heads: Optional[int] = None, head_channels: Optional[int] = None,
         prediction_type: Optional[str] = None, scheduler: Optional[dict] = None,
         attention_order: Optional[str] = None, vae=None, text_encoder=None, super_res: Optional[bool] = None):
    """Load a checkpoint into fastdiff's native model and return a ``Pipeline``.

    device / dtype: where and in which precision the network lives (sampler state stays float32).
    variant: diffusers weight variant (``"fp16"`` reads ``diffusion_pytorch_model.fp16.safetensors``).
    num_heads: attention heads where the weights cannot say (official DiT, Stable Diffusion single files,
        guided-diffusion). head_channels: channels per head instead (guided-diffusion's num_head_channels).
    prediction_type / scheduler: override what the checkpoint says (or the DDPM default it assumes).
    attention_order: guided-diffusion checkpoints only: ``"legacy"`` (default) or ``"new"`` for models
        trained with ``use_new_attention_order`` (the weights cannot tell the two apart).
    super_res: guided-diffusion checkpoints only: whether a 6-input-channel UNet is a super-resolution model (RGB and
        the low-resolution image, its ``SuperResModel``); None (default): it is (the released upsamplers'; ADM samples
        RGB); False: a plain 6-channel model.
    vae: the latent model's image decoder: None takes the one the checkpoint carries (a pipeline folder's
        ``vae/``, a single file's ``first_stage_model``); a path to a diffusers AutoencoderKL folder (e.g.
        stabilityai/sd-vae-ft-ema for DiT) takes that one; False loads none.
    text_encoder: where ``generate(prompt=...)`` finds its tokenizers and text encoders (read with transformers on
        first use): None, a diffusers pipeline folder's own; a path, that diffusers pipeline folder's (e.g. for a
        single file); False, none.
    """
    from ..pipeline import Pipeline
    from .common import strict_load
    from ..models import build_model

    if not isinstance(path, (str, os.PathLike)):
        raise BadArgumentError(f"load() expects a path or 'builtin:NAME' / 'arch:NAME', found {type(path).__name__}")
    path = os.path.expanduser(os.fspath(path))
    device, dtype = check_load_args(device, dtype, num_heads, head_channels, scheduler)
    if super_res is not None and not isinstance(super_res, bool):
        raise BadArgumentError(f"super_res: expected True, False or None, found {super_res!r}")
    source_options = dict(variant=variant, num_heads=num_heads, head_channels=head_channels,
                          attention_order=attention_order, super_res=super_res)
    if path.startswith(("arch:", "builtin:")) or path.lower().endswith(".onnx"):
        _refuse_options(source_options, (), path)
    if path.startswith("arch:"):
        from .presets import build_arch

        model, spec = build_arch(path[len("arch:"):], device=device, dtype=dtype)
        _override_sampling(spec, scheduler, prediction_type)
        return Pipeline(model, spec, device=device, vae=_pick_vae(vae, None, device),
                        prompt_encoder=_pick_prompt_encoder(text_encoder, None, spec, device, dtype))
    if path.startswith("builtin:"):
        from .presets import builtin_path

        path = builtin_path(path[len("builtin:"):])
    if not os.path.exists(path):
        raise CheckpointError(f"no such file or folder: {path}")
    if path.lower().endswith(".onnx"):
        from ..runtime.onnxruntime_runner import OnnxRuntimeRunner
        from ..export.onnx import read_onnx_spec

        spec = read_onnx_spec(path)
        _check_graph_dtype(path, dtype)
        _override_sampling(spec, scheduler, prediction_type)
        return Pipeline(None, spec, device=device, runner=OnnxRuntimeRunner(path, device=device, spec=spec),
                        vae=_upscaler_vae(_pick_vae(vae, None, device), spec),
                        prompt_encoder=_pick_prompt_encoder(text_encoder, None, spec, device, dtype))

    kind, cfg, state, spec, found_vae = _read_any(path, variant=variant, num_heads=num_heads,
                                                  head_channels=head_channels, attention_order=attention_order,
                                                  read_vae=vae is None, super_res=super_res)
    from .fastdiff_format import is_fastdiff_folder

    source = str(spec.source)
    if os.path.isdir(path) and is_fastdiff_folder(path):  # its spec keeps the original source's name
        _refuse_options(source_options, (), path, "a fastdiff folder")
    else:
        kind_name = source[:-len(path)].strip() if source.endswith(path) else source
        _refuse_options(source_options, _SOURCE_OPTIONS.get(kind_name.split(" ")[0], ()), path, kind_name)
    _override_sampling(spec, scheduler, prediction_type)
    model = build_model(kind, cfg)
    strict_load(model, state, name=f"{kind.upper()} from {path}", dtype=dtype, device=device, notes=spec.notes)
    own_folder = path if os.path.isdir(path) else None
    pipe = Pipeline(model.eval(), spec, device=device, vae=_upscaler_vae(_pick_vae(vae, found_vae, device), spec),
                    prompt_encoder=_pick_prompt_encoder(text_encoder, own_folder, spec, device, dtype, variant))
    from .controlnet import controlnet_folders, unattachable

    controlnets = controlnet_folders(path) if os.path.isdir(path) else []
    why_not = unattachable(controlnets, pipe)
    if why_not:  # (the base model loads: a ControlNet fastdiff does not run is noted, not an error)
        pipe.notes.append(why_not)
    elif controlnets:  # a ControlNet pipeline's folder (diffusers' or a fastdiff save) drives its network
        names = ", ".join(dict.fromkeys(os.path.basename(c) + "/" for c in controlnets))
        try:
            pipe.set_controlnet(controlnets[0] if len(controlnets) == 1 else controlnets, variant=variant)
        except UnsupportedConfigError as e:  # (a layout fastdiff does not run, such as SD3.5's official ones)
            pipe.notes.append(f"the folder's {names} not attached ({e}); the base model loads alone")
            return pipe
        pipe.notes.append(f"the folder's {names} drive{'s' if len(controlnets) == 1 else ''} the network: "
                          f"generate() needs control_image= (pipe.set_controlnet(None) takes "
                          f"{'it' if len(controlnets) == 1 else 'them'} away)")
    return pipe


# the loading options each source reads (by the first word of ModelSpec.source); any other given option is
# refused rather than silently ignored
_SOURCE_OPTIONS = {
    "guided-diffusion": ("num_heads", "head_channels", "attention_order", "super_res"),
    "Stable": ("num_heads",),  # Stable Diffusion single file
    "official": ("num_heads",),  # official DiT checkpoint
    "diffusers": ("variant",),
}


def _upscaler_vae(vae, spec):
    """An upscaler's VAE (``spec.low_res_noise``) at 0.08333, whatever its config says: diffusers'
    StableDiffusionUpscalePipeline sets every VAE it is given so."""
    from .diffusers_folder import UPSCALER_SCALING_FACTOR

    if vae is not None and spec.low_res_noise and vae.config.scaling_factor != UPSCALER_SCALING_FACTOR:
        spec.notes.append(f"vae: scaling_factor {vae.config.scaling_factor} read as {UPSCALER_SCALING_FACTOR}, as "
                          f"diffusers' StableDiffusionUpscalePipeline does")
        vae.config.scaling_factor = UPSCALER_SCALING_FACTOR
    return vae


def _pick_vae(requested, found, device):
    """The VAE decoder to attach: the caller's folder, the checkpoint's own, or none (``vae=False``)."""
    if requested is None:
        return None if found is None else found.to(device)
    if requested is False:
        return None
    if not isinstance(requested, (str, os.PathLike)):
        raise BadArgumentError(f"vae: expected None, False or a path to a diffusers AutoencoderKL folder, found "
                               f"{requested!r}")
    from .vae import load_vae_folder

    return load_vae_folder(os.fspath(requested), device=device)


def _pick_prompt_encoder(requested, own_folder, spec, device, dtype, variant=None):
    """The PromptEncoder to attach: the checkpoint folder's own text encoders, the caller's folder's, or none."""
    from ..prompts import find_prompt_encoder, missing_parts, prompt_family

    family = prompt_family(spec)
    if requested is False:
        return None
    if requested is None:
        found = None
        if own_folder and family is not None:
            from .fastdiff_format import fastdiff_text_header, is_fastdiff_folder

            header = fastdiff_text_header(own_folder) if is_fastdiff_folder(own_folder) else {}
            try:  # (a fastdiff save holds them only if it kept them: its header says so)
                found = None if header is None else find_prompt_encoder(own_folder, spec, **_saved_text_options(
                    header, variant))
            except CheckpointError as e:  # encoders that cannot feed the network: the network still loads
                spec.notes.append(f"text encoders not used: {e}")
                return None
            if found is None:
                missing = missing_parts(own_folder, family)
                note = ("no text encoders in the folder" + (f" (missing {', '.join(m + '/' for m in missing)})"
                                                            if header is not None and missing else "")
                        + ": generate() takes encoded text (encoder_hidden_states"
                        + (", text_embeds" if spec.text_embeds_dim else "") + "), not prompts")
                if not any(n.startswith("no text encoders in the folder") for n in spec.notes):
                    spec.notes.append(note)  # (a fastdiff save keeps its notes: said once)
    else:
        if not isinstance(requested, (str, os.PathLike)) or not os.path.isdir(requested):
            raise BadArgumentError(f"text_encoder: expected None, False or a diffusers pipeline folder (with "
                                   f"tokenizer/ and text_encoder/), found {requested!r}")
        if family is None:
            raise BadArgumentError(f"text_encoder: given, but this model ({spec.kind}) takes no text")
        folder = os.fspath(requested)
        from .fastdiff_format import fastdiff_text_header, is_fastdiff_folder

        header = (fastdiff_text_header(folder) or {}) if is_fastdiff_folder(folder) else {}  # (a fastdiff save's)
        found = find_prompt_encoder(folder, spec, **_saved_text_options(header, variant))
        if found is None:
            raise CheckpointError(f"text_encoder: {folder} lacks the text encoders a {family} model needs: expected "
                                  f"{', '.join(m + '/' for m in missing_parts(folder, family))} (each with its "
                                  f"tokenizer folder), found none")
    return None if found is None else found.to(device, dtype or torch.float32)


def _check_graph_dtype(path: str, dtype) -> None:
    """An exported graph runs in the precision it was exported in: ``dtype=`` (which also sets the text encoders')
    may name that one, not another."""
    if dtype is None:
        return
    from ..export.onnx import read_onnx_io
    from ..runtime.config import DTYPES

    exported = read_onnx_io(path).get("dtype", "fp32")
    if DTYPES.get(exported) != dtype:
        raise BadArgumentError(f"dtype={dtype}: {path} is a graph exported in {exported}, which it runs in; expected "
                               f"dtype=None or {DTYPES.get(exported)} (export again for another precision)")


def _refuse_options(given: dict, accepted, path: str, kind: Optional[str] = None) -> None:
    refused = [k for k, v in given.items() if v is not None and k not in accepted]
    if refused:
        where = {"num_heads": "official DiT, Stable Diffusion single files and guided-diffusion",
                 "head_channels": "guided-diffusion", "attention_order": "guided-diffusion",
                 "super_res": "guided-diffusion",
                 "variant": "diffusers folders"}
        raise BadArgumentError(f"{refused[0]}= does not apply to {path} ({kind or 'no checkpoint to read it'}); it "
                               f"applies to {where[refused[0]]} checkpoints")


def check_load_args(device, dtype, num_heads, head_channels, scheduler):
    """(device, dtype) as torch objects, after checking every loading argument's type and value."""
    for name, v in (("num_heads", num_heads), ("head_channels", head_channels)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise BadArgumentError(f"{name}: expected a positive int, found {v!r}")
    if scheduler is not None and not isinstance(scheduler, dict):
        raise BadArgumentError(f"scheduler: expected a dict (a diffusers scheduler config), found "
                               f"{type(scheduler).__name__} {scheduler!r}")
    from ..runtime.config import DTYPES

    if isinstance(dtype, str) and dtype in DTYPES:
        dtype = DTYPES[dtype]
    if dtype is not None and dtype not in DTYPES.values():  # a network runs in a floating-point dtype
        raise BadArgumentError(f"dtype: expected torch.float32 / float16 / bfloat16 or one of {list(DTYPES)}, found "
                               f"{dtype!r}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise BadArgumentError(f"device: expected a torch device such as 'cpu' or 'cuda:0', found {device!r}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        from ..errors import BackendUnavailableError

        raise BackendUnavailableError(f"device {device} was requested but this torch ({torch.__version__}) sees no "
                                      f"CUDA device")
    return device, dtype


def _override_sampling(spec, scheduler: Optional[dict], prediction_type: Optional[str]) -> None:
    """The caller's scheduler config / prediction type in place of what the checkpoint said."""
    from ..spec import FLOW_SCHEDULERS, is_flow_scheduler

    if spec.prediction_type == "edm" and prediction_type is not None:
        raise BadArgumentError(f"prediction_type={prediction_type!r} does not apply to an EDM network: it is "
                               f"preconditioned (it returns the denoised sample D(x))")
    if scheduler is not None:
        from ..scheduler_config import unsupported_scheduler_note

        # a respaced scheduler (guided-diffusion's family: fastdiff's timestep_respacing key) that names no variance
        # keeps the checkpoint's (a learn_sigma network's learned range)
        from ..scheduler_config import timestep_scale_of

        from ..scheduler_checks import check_scheduler_config

        own_variance = (spec.scheduler or {}).get("variance_type")
        spec.notes.extend(check_scheduler_config(scheduler))  # (bad values refused at load, not at the first generate)
        timestep_scale_of(scheduler)
        spec.scheduler = dict(scheduler)
        if own_variance and spec.scheduler.get("timestep_respacing") and "variance_type" not in spec.scheduler:
            spec.scheduler["variance_type"] = own_variance
        note = unsupported_scheduler_note(spec.scheduler)
        if note:  # (as a folder's own scheduler config says it)
            spec.notes.append(note)
        if spec.scheduler.get("_class_name") in FLOW_SCHEDULERS:  # a flow-matching scheduler: velocity, always
            spec.prediction_type = "flow_prediction"
        elif spec.prediction_type != "edm":
            # one prediction type for every plan: the given scheduler's field, else what the checkpoint said
            spec.prediction_type = spec.scheduler.setdefault("prediction_type", spec.prediction_type)
    if prediction_type is not None:
        if prediction_type not in ("epsilon", "v_prediction", "sample", "flow_prediction"):
            raise BadArgumentError(f"prediction_type: expected 'epsilon', 'v_prediction', 'sample' or "
                                   f"'flow_prediction', found {prediction_type!r}")
        if prediction_type != "flow_prediction" and is_flow_scheduler(spec.scheduler):
            raise BadArgumentError(f"prediction_type={prediction_type!r} with the flow-matching scheduler "
                                   f"{spec.scheduler.get('_class_name')}: a flow network predicts the velocity; pass "
                                   f"scheduler= with a beta schedule for a network that predicts {prediction_type}")
        spec.prediction_type = prediction_type
        # scheduler-config plans read the scheduler's own field: keep the two in agreement
        spec.scheduler = {**(spec.scheduler or {}), "prediction_type": prediction_type}
        if prediction_type == "flow_prediction" and not is_flow_scheduler(spec.scheduler):
            # a beta schedule means nothing to a flow network: diffusers' flow-matching Euler on its time range
            spec.scheduler = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 1.0,
                              "num_train_timesteps": int(spec.scheduler.get("num_train_timesteps", 1000))}
    if spec.kind == "flux" and spec.scheduler.get("_class_name") == "FlowMatchEulerDiscreteScheduler":
        spec.scheduler.setdefault("flow_pipeline_sigmas", "linspace")  # FluxPipeline's grid, whatever config came
    if spec.kind in ("mmdit", "flux") and spec.prediction_type != "flow_prediction":
        raise UnsupportedConfigError("scheduler / prediction_type", (spec.scheduler.get("_class_name"),
                                     spec.prediction_type), model=spec.kind,
                                     supported="a flow-matching scheduler (FlowMatch*, or a solver with "
                                               "use_flow_sigmas): SD3 / Flux networks predict the flow velocity")


def _read_any(path: str, *, variant=None, num_heads=None, head_channels=None, attention_order=None,
              read_vae: bool = True, super_res: Optional[bool] = None):
    """(kind, native config, native state dict, ModelSpec, the VAE decoder it carries or None) for any supported
    source; ``read_vae=False`` (the caller brings its own, or none) reads no VAE."""
    vae_of = _own_vae if read_vae else (lambda spec, read: None)
    from .diffusers_folder import (is_model_folder, is_pipeline_folder, load_model_folder,
                                   load_pipeline_folder, spec_for)
    from .fastdiff_format import is_fastdiff_folder, load_fastdiff

    if os.path.isdir(path):
        if is_fastdiff_folder(path):
            spec, state = load_fastdiff(path)
            from .fastdiff_format import load_fastdiff_vae

            return spec.kind, spec.model_config, state, spec, vae_of(spec, lambda: load_fastdiff_vae(path))
        if is_model_folder(path):
            kind, cfg, state, _ = load_model_folder(path, variant)
            spec = spec_for(kind, cfg, None, source=f"diffusers model folder {path}")
            spec.notes.append("model folder without a scheduler; " + spec.default_scheduler_note())
            return kind, cfg, state, spec, None
        if is_pipeline_folder(path):
            kind, cfg, state, spec = load_pipeline_folder(path, variant)
            from .vae import is_vae_folder

            vae_dir = os.path.join(path, "vae")
            vae = vae_of(spec, lambda: _vae_folder_any_variant(vae_dir, variant)) if is_vae_folder(vae_dir) else None
            return kind, cfg, state, spec, vae
        raise UnknownFormatError(_unknown(path, f"a folder holding {sorted(os.listdir(path))[:10]}"))

    ext = os.path.splitext(path)[1].lower()
    if ext in (".pt", ".pth", ".ckpt", ".bin", ".safetensors"):
        from .dit import is_official_dit_state_dict, load_official_dit
        from .io import pick_state_dict, read_safetensors, read_torch_file
        from .ldm import convert_ldm_unet, is_ldm_state_dict, ldm_unet_config, single_file_notes

        obj = read_safetensors(path) if ext == ".safetensors" else read_torch_file(path)
        picked: list = []  # (which entry of a training checkpoint was read: a note of the spec)
        state = pick_state_dict(obj, prefer=("ema", "model", "state_dict"), source=path, notes=picked)
        if is_ldm_state_dict(state):
            from .diffusers_folder import spec_for
            from .presets import SD_SCHEDULER, SD_V_SCHEDULER, SDXL_SCHEDULER

            from .ldm import single_file_sampling

            cfg = ldm_unet_config(state, num_heads=num_heads)
            prediction, latent, why = single_file_sampling(cfg, obj)
            cfg.sample_size = latent
            scheduler = SD_V_SCHEDULER if prediction == "v_prediction" else dict(SD_SCHEDULER, prediction_type=prediction)
            if cfg.addition_embed_type == "text_time":
                scheduler = SDXL_SCHEDULER  # what SDXL's diffusers folders ship
            spec = spec_for("unet", cfg, scheduler,
                            source=f"Stable Diffusion single file {path}")
            spec.notes.append("single-file UNet: heads inferred (SD1: 8, SD2 / SDXL: 64 per head) unless num_heads= is "
                              "given; " + why)
            spec.notes.extend(picked + single_file_notes(state))
            return "unet", cfg, convert_ldm_unet(state, cfg), spec, vae_of(spec, lambda: _single_file_vae(state, spec))
        from .flux_single import convert_flux_single, flux_single_config, is_flux_state_dict
        from .sd3 import convert_sd3, is_sd3_state_dict, sd3_config

        if is_flux_state_dict(state):
            from .diffusers_folder import spec_for
            from .presets import FLUX_SCHEDULER, FLUX_SCHNELL_SCHEDULER

            cfg = flux_single_config(state)
            spec = spec_for("flux", cfg, FLUX_SCHEDULER if cfg.guidance_embeds else FLUX_SCHNELL_SCHEDULER,
                            source=f"FLUX.1 single file {path}")
            spec.notes.append("FLUX.1 single file: rotary axes (16, 56, 56) and 1024 px assumed; "
                              + ("dev (guidance input): FlowMatchEuler with dynamic shifting" if cfg.guidance_embeds
                                 else "schnell (no guidance input): FlowMatchEuler, shift 1")
                              + "; its VAE ships apart: pass vae=")
            spec.notes.extend(picked)
            return "flux", cfg, convert_flux_single(state, cfg), spec, None

        if is_sd3_state_dict(state):
            from .diffusers_folder import spec_for
            from .presets import SD3_SCHEDULER

            cfg = sd3_config(state)
            spec = spec_for("mmdit", cfg, SD3_SCHEDULER, source=f"Stable Diffusion 3 single file {path}")
            spec.notes.append("SD3 single file: 64 channels per head and 1024x1024 (128x128 latents) assumed, as in "
                              "every SD3 / 3.5 release; FlowMatchEuler with shift 3")
            spec.notes.extend(picked)
            return "mmdit", cfg, convert_sd3(state, cfg), spec, vae_of(spec, lambda: _single_file_vae(state, spec))
        from .guided_diffusion import is_guided_diffusion_state_dict

        if is_guided_diffusion_state_dict(state):
            from .guided_diffusion_spec import read_guided_diffusion

            cfg, native, spec = read_guided_diffusion(state, path, num_heads=num_heads, head_channels=head_channels,
                                                      attention_order=attention_order, super_res=super_res)
            spec.notes.extend(picked)
            return "unet", cfg, native, spec, None
        from .edm import edm_config_from_state_dict, edm_spec, is_edm_state_dict

        if is_edm_state_dict(state):
            cfg = edm_config_from_state_dict(state)
            native = {k[len("model."):] if k.startswith("model.") else k: v for k, v in state.items()}
            spec = edm_spec(cfg, source=f"EDM checkpoint {path}")
            spec.notes.extend(picked)
            return "edm", cfg, native, spec, None
        if is_official_dit_state_dict(state):
            from ..spec import DEFAULT_SCHEDULER

            cfg, state, notes = load_official_dit(path, num_heads=num_heads)
            # the official diffusion as sample.py runs it: DDPM betas without clipping (DiT's latents are not in
            # [-1, 1]: clip_denoised=False), guided-diffusion's respacing, and the learned variance of learn_sigma
            official = dict(DEFAULT_SCHEDULER, clip_sample=False, timestep_respacing="guided-diffusion",
                            variance_type="learned_range" if cfg.learn_sigma else "fixed_large")  # (create_diffusion)
            spec = spec_for("dit", cfg, official, source=f"official DiT checkpoint {path}")
            spec.notes.extend(notes)
            spec.guided_channels = 3  # official forward_with_cfg guides channels 0..2, whatever learn_sigma
            return "dit", cfg, state, spec, None
        from .guided_classifier import is_guided_classifier_state_dict

        if is_guided_classifier_state_dict(state):
            raise UnknownFormatError(f"{path}: a guided-diffusion noisy-image classifier (EncoderUNetModel), not a "
                                     f"denoising network: load the diffusion model, then pipe.load_classifier({path!r}) "
                                     f"(--classifier on the command line) for classifier guidance")
        raise UnknownFormatError(_unknown(path, f"a torch file whose keys start {sorted(state)[:6]}"))
    if ext == ".pkl":  # NVlabs/edm (and StyleGAN-family) networks ship as pickles of their own code
        raise UnsafeCheckpointError(
            f"{path}: a .pkl network (NVlabs/edm releases its models so) is a pickle that rebuilds Python classes "
            f"from code stored inside it, and fastdiff never executes a pickle. Convert it once, with EDM's code, "
            f"where you trust the file: `net = pickle.load(open(path, 'rb'))['ema']; torch.save(net.state_dict(), "
            f"'edm.pt')`, then load edm.pt (an EDMPrecond state dict).")
    raise UnknownFormatError(_unknown(path, f"a file with extension {ext or '(none)'!r}"))


def _saved_text_options(header: dict, variant):
    """find_prompt_encoder's options for a folder: what a fastdiff save's header recorded (its SDXL empty-prompt
    rule, the weight variant its copied encoder files are named for), else the caller's variant."""
    return dict(zero_negative=header.get("force_zeros_for_empty_prompt"),
                variant=header.get("variant") or variant)


def _own_vae(spec, read):
    """The checkpoint's own VAE decoder from ``read()``; one that cannot be read is a note, not a failed load (the
    network is what was asked for; ``vae=`` can bring another)."""
    try:
        return read()
    except FastdiffError as e:
        spec.notes.append(f"VAE decoder not loaded ({type(e).__name__}: {e}); pass vae= to bring one")
        return None


def _vae_folder_any_variant(folder: str, variant):
    """A pipeline's vae/ in the weight variant asked for, else its plain weights (diffusers falls back so too)."""
    from .vae import load_vae_folder

    try:
        return load_vae_folder(folder, variant=variant)
    except CheckpointError:
        if variant is None:
            raise
        return load_vae_folder(folder)


def _single_file_vae(state: dict, spec):
    """The VAE decoder a Stable Diffusion single file carries (``first_stage_model.*``), or None."""
    from .vae import has_ldm_vae, ldm_vae

    if not has_ldm_vae(state):
        return None
    family = "sd3" if spec.kind == "mmdit" else "sdxl" if spec.time_ids_dim else "sd"
    spec.notes.append(f"VAE decoder from the single file's first_stage_model ({family} latent scaling)")
    vae = ldm_vae(state, family)
    vae.config.sample_size = spec.sample_size[0] * vae.downscale  # (the image size: enable_tiling's tiles)
    return vae


def _unknown(path: str, found: str) -> str:
    return (f"{path}: unknown checkpoint format (found {found}). Supported: " + "; ".join(SUPPORTED_FORMATS))
