"""``fastdiff info``: versions, devices, and which backends / fused ops are usable here."""

from __future__ import annotations

import importlib
import os
import platform

from .generate import add_load_arguments, load_options


def register(sub) -> None:
    p = sub.add_parser("info", help="show versions, devices and usable backends",
                       description="Print the versions of fastdiff's dependencies (or 'not installed'), the "
                                   "devices torch sees, which runtime backends can run on this machine and "
                                   "which implementation each fused op uses.")
    p.add_argument("model", metavar="MODEL", nargs="?", default=None,
                   help="also load MODEL (a path, arch:NAME or builtin:NAME) on the best device here and show the "
                        "path each of its fused layers takes with --backend")
    p.add_argument("--backend", choices=("triton", "eager"), default=None,
                   help="the backend MODEL's layers are set to, as optimize(OptimizeConfig(backend=...)) sets them "
                        "(default: triton where it can run here, else eager)")
    p.add_argument("--kernel-ops", choices=["measured", "all", "tune"], default=None,
                   help="with --backend triton, as for generate: the per-op table measured on a GPU (default), "
                        "every op on Triton, or 'tune'")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_load_arguments(p)
    p.set_defaults(func=run)


def _version(module: str) -> str:
    try:
        mod = importlib.import_module(module)
    except Exception:
        return "not installed"
    return str(getattr(mod, "__version__", "installed"))


def _cudnn_version(code: int) -> str:
    """cuDNN's version number as text: 9.x encodes major * 10000 + minor * 100 + patch, 8.x major * 1000 + ..."""
    major = code // 10000 if code >= 90000 else code // 1000
    return f"{major}.{code // 100 % 100 if code >= 90000 else code // 100 % 10}.{code % 100}"


def collect() -> dict:
    """The info report as a dict (also used by ``fastdiff bench --json``)."""
    import torch

    from .. import __version__
    from ..models.layers import triton_available

    report = {
        "fastdiff": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {m: _version(m) for m in ("torch", "triton", "onnx", "onnxruntime", "tensorrt", "diffusers",
                                               "safetensors", "numpy")},
    }
    cuda, cudnn = torch.version.cuda, torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    report["versions"]["cuda"] = cuda or "none (CPU build of torch)"
    report["versions"]["cudnn"] = _cudnn_version(cudnn) if cudnn else "not available"
    devices = [f"cpu ({os.cpu_count()} cores)"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            devices.append(f"cuda:{i} {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)")
    report["devices"] = devices
    tri_ok, tri_why = triton_available()
    backends = {"eager": "yes"}
    backends["triton"] = "yes" if tri_ok else f"no: {tri_why}"
    backends["compile"] = "yes" if hasattr(torch, "compile") else "no: torch.compile missing"
    backends["cuda_graphs"] = "yes" if torch.cuda.is_available() else "no: needs a CUDA GPU"
    ort = _version("onnxruntime")
    backends["onnxruntime"] = "yes" if ort != "not installed" else "no: onnxruntime not installed"
    if ort != "not installed" and _version("onnx") == "not installed":  # (the backend exports the model first)
        backends["onnxruntime"] = "no: onnx not installed (the backend exports the model with it)"
    elif ort != "not installed":
        import onnxruntime

        backends["onnxruntime"] += f" (providers: {', '.join(onnxruntime.get_available_providers())})"
    trt = _version("tensorrt")
    backends["tensorrt"] = ("no: tensorrt not installed" if trt == "not installed"
                            else "yes" if torch.cuda.is_available() else "no: needs a CUDA GPU")
    report["backends"] = backends
    try:
        from ..cuda_ext import HAS_CUDA_EXT
    except Exception:
        HAS_CUDA_EXT = False
    if HAS_CUDA_EXT:
        report["cuda_extension"] = "built"
    else:
        from ..cuda_ext import unavailable_reason

        report["cuda_extension"] = f"not built (optional; see csrc/): {unavailable_reason()}"
    # Which path each fused op takes under backend="auto" on the best device here: on a GPU the per-op
    # table measured there (GPU_DEFAULT_OPS), else the plain torch path.
    from ..models.layers import GPU_DEFAULT_OPS, MODEL_GPU_OPS

    auto = "triton" if (tri_ok and torch.cuda.is_available()) else "native"
    layer_ops = {"GroupNorm": "group_norm", "Attention": "attention", "ModulatedLayerNorm": "adaln_modulate",
                 "GEGLU": "geglu", "LayerNorm": "layer_norm"}
    # (not a layer: the multistep samplers' state update, fastdiff.state_update)
    layer_ops["sampler_update"] = "sampler_update"
    report["fused_ops"] = {cls: ("native" if auto == "native" or GPU_DEFAULT_OPS[op] == "torch"
                                 else GPU_DEFAULT_OPS[op]) for cls, op in layer_ops.items()}
    report["gpu_default_ops"] = dict(GPU_DEFAULT_OPS)
    report["model_gpu_ops"] = {cls: dict(ops) for cls, ops in MODEL_GPU_OPS.items()}  # a model class's own winners
    if auto == "native":
        report["fused_ops_note"] = "auto picks the plain torch path here (no CUDA device); backend='triton' " \
                                   "forces the Triton kernels" + ("" if tri_ok else f" (unavailable: {tri_why})")
    from ..sampling import SAMPLERS, SCHEDULES
    from ..scheduler_config import SUPPORTED_SCHEDULERS

    report["samplers"] = sorted(SAMPLERS)
    report["schedules"] = list(SCHEDULES)
    report["diffusers_schedulers"] = sorted(SUPPORTED_SCHEDULERS)  # scheduler_config.json classes followed exactly
    return report


def model_ops(model: str, backend: str, kernel_ops: str = "measured", **load_options) -> dict:
    """``{"model", "device", "backend", "ops"}``: the path each fused layer of ``model`` takes on the best device
    here after ``optimize(OptimizeConfig(backend=backend, kernel_ops=kernel_ops))`` (on a GPU: the per-op table)."""
    import torch

    from ..models.layers import op_backends, set_backend
    from ..runtime.config import OptimizeConfig
    from .generate import load_pipeline

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(model, device, **load_options)
    if pipe.model is None:  # an exported graph (.onnx): no PyTorch layers to set or list
        chosen = "none (an exported graph: no PyTorch layers)"
    elif backend == "triton":  # as runtime.runners.prepare_model sets the layers
        config = OptimizeConfig(backend="triton", kernel_ops=kernel_ops)
        chosen = set_backend(pipe.model, "triton", ops=config.op_choices(device, pipe.model))
    else:
        chosen = set_backend(pipe.model, "native")
    plan = pipe.plan(20)  # what generate() runs with no sampler named
    sampling = {"prediction_type": pipe.spec.prediction_type, "scheduler": pipe.spec.scheduler.get("_class_name"),
                "default_sampler": plan.sampler, "denoiser": plan.denoiser_kind}
    if plan.denoiser_kind == "flow":
        sampling["frame"] = plan.denoiser_options["frame"]
    # what the official scripts' runs add (fastdiff's scheduler keys, a learned or fixed DDPM variance)
    for key in ("timestep_respacing", "timestep_scale", "variance_type"):
        if pipe.spec.scheduler.get(key) is not None:
            sampling[key] = pipe.spec.scheduler[key]
    ops = {} if pipe.model is None else op_backends(pipe.model)
    report = {"model": model, "device": str(device), "backend": chosen, "ops": ops,
              "sampling": sampling, "conditioning": _conditioning(pipe.spec) + _control(pipe), "vae": _vae(pipe),
              "text_encoders": _text_encoders(pipe)}
    if getattr(pipe.runner, "input_shapes", None) is not None:  # an exported graph: its fixed axes, folded CFG
        report["graph"] = _graph(pipe.runner)
    return report


def _graph(runner) -> str:
    """What an exported graph fixed when it was written: its batch, its latent size, CFG folded in."""
    shape = runner.input_shapes.get("sample") or ()
    batch = "any batch" if not shape or shape[0] is None else f"a fixed network batch of {shape[0]} (guided " \
        f"sampling runs 2 x samples unless CFG is folded)"
    size = "any size" if len(shape) < 4 or None in shape[2:] else f"latents of {shape[2]}x{shape[3]} only"
    folded = "CFG folded in (one call per step returns the guided output; no guidance_rescale)" if \
        runner.io.get("cfg_folded") else "CFG not folded (both passes in one network batch)"
    return f"{batch}, {size}; {folded}"


def _control(pipe) -> str:
    """The control images a pipeline driven by ControlNets (its folder's, or an exported graph's) needs."""
    control = pipe._control_format()
    if control is None:
        return ""
    count = getattr(control, "count", None)
    latent = {"flux": "a FLUX.1 ControlNet", "sd3": "an SD3 ControlNet"}.get(pipe._latent_controlnet())
    what = f"{count} ControlNets: a list of {count} control images" if count else \
        "FLUX.1 Depth / Canny: control_image, encoded by its VAE" if pipe.spec.latent_control else \
        f"{latent}: control_image, encoded by its VAE" if latent else "a ControlNet: control_image"
    return (f", and ({what}, {control.conditioning_channels} channels at {control.image_downscale} pixels per latent "
            f"pixel)")


def _text_encoders(pipe) -> str:
    if pipe.prompt_encoder is not None:
        return pipe.prompt_encoder.describe() + " (read on the first prompt)"
    if pipe.spec.cross_attention_dim:
        return "none (encoded text only: pass --text-encoder FOLDER for prompts)"
    return "none (not text-conditioned)"


def _vae(pipe) -> str:
    if pipe.vae is None:
        return "none" if pipe.spec.in_channels in (1, 3) else "none (latents only: pass --vae FOLDER for images)"
    c = pipe.vae.config
    halves = "decoder and encoder (image-to-image)" if pipe.vae.encoder is not None else "decoder"
    return (f"AutoencoderKL {halves}, {c.latent_channels} latent channels, scaling {c.scaling_factor}"
            + (f", shift {c.shift_factor}" if c.shift_factor else ""))


def _conditioning(spec) -> str:
    """What generate() needs besides seeds, in its own argument names."""
    parts = []
    if spec.low_res_noise:  # (its class label is the noise level)
        from ..checkpoints.diffusers_folder import UPSCALER_NOISE_LEVEL

        parts.append(f"image (the low-resolution image, at the latents' size) and noise_level (0.."
                     f"{spec.low_res_noise['max_noise_level']}, default {UPSCALER_NOISE_LEVEL})")
    elif spec.num_classes:
        parts.append(f"class_labels ({spec.num_classes} classes"
                     + (f", {spec.null_class} = unconditional)" if spec.null_class is not None else ")"))
    if spec.cross_attention_dim:
        parts.append(f"encoder_hidden_states (B, tokens, {spec.cross_attention_dim})")
    if spec.text_embeds_dim and spec.time_ids_dim:
        parts.append(f"text_embeds (B, {spec.text_embeds_dim}) and time_ids ({spec.time_ids_dim} per sample; "
                     f"default: diffusers' SDXL ids)")
    elif spec.text_embeds_dim:  # SD3's / Flux's pooled projections
        parts.append(f"text_embeds (B, {spec.text_embeds_dim}), the pooled text embedding")
    if spec.guidance_input:
        parts.append("guidance (the distilled-guidance strength, default " + (
            "30)" if spec.inpainting else "3.5)" if spec.latent_control else
            "3.5; 7 with an image to edit or inpaint)"))
    if spec.inpainting:
        parts.append("image and mask_image (an inpainting network)")
    if spec.low_res_channels and not spec.low_res_noise:
        parts.append("image (the low-resolution image a super-resolution network upsamples)")
    return ", ".join(parts) or "nothing (unconditional)"


def run(args) -> int:
    from ..errors import BadArgumentError

    given = [f for f, v in (("--backend", args.backend), ("--kernel-ops", args.kernel_ops)) if v is not None]
    if given and not getattr(args, "model", None):
        raise BadArgumentError(f"{' and '.join(given)}: {'apply' if len(given) > 1 else 'applies'} to a loaded "
                               f"MODEL's layers, found no MODEL")
    report = collect()
    if getattr(args, "model", None):
        backend = args.backend or ("triton" if report["backends"]["triton"] == "yes" else "eager")
        if args.kernel_ops is not None and backend != "triton":
            raise BadArgumentError(f"--kernel-ops: expected --backend triton (the only backend with a kernel choice), "
                                   f"found {backend}")
        report["model_ops"] = model_ops(args.model, backend, args.kernel_ops or "measured", **load_options(args))
    if args.json:
        import json

        print(json.dumps(report, indent=2))
        return 0
    print(f"fastdiff {report['fastdiff']}  (Python {report['python']}, {report['platform']})")
    print("versions:")
    for k, v in report["versions"].items():
        print(f"  {k:12s} {v}")
    print("devices:")
    for d in report["devices"]:
        print(f"  {d}")
    print("backends:")
    for k, v in report["backends"].items():
        print(f"  {k:12s} {v}")
    print(f"cuda extension: {report['cuda_extension']}")
    print("fused ops (backend='auto'; on a GPU each op takes the per-op table, GPU_DEFAULT_OPS: measured winners, "
          "torch where not measured yet; kernel_ops='tune' measures per layer: "
          + ", ".join(f"{k}={v}" for k, v in report["gpu_default_ops"].items()) + "):")
    for k, v in report["fused_ops"].items():
        print(f"  {k:20s} {v}")
    for cls, ops in report["model_gpu_ops"].items():
        print(f"  {cls} models, on a GPU: " + ", ".join(f"{k}={v}" for k, v in ops.items()))
    if "fused_ops_note" in report:
        print(f"  note: {report['fused_ops_note']}")
    print("samplers:  " + " ".join(report["samplers"]))
    print("schedules: " + " ".join(report["schedules"]))
    print("diffusers scheduler configs followed: " + " ".join(report["diffusers_schedulers"]))
    if "model_ops" in report:
        m = report["model_ops"]
        s = m["sampling"]
        frame = f", {s['frame']} frame" if "frame" in s else ""
        extra = "".join(f", {k} {s[k]}" for k in ("timestep_respacing", "timestep_scale", "variance_type") if k in s)
        print(f"{m['model']}: predicts {s['prediction_type']}, scheduler {s['scheduler']}{extra}; generate() with no "
              f"sampler runs {s['default_sampler']} ({s['denoiser']} denoiser{frame})")
        print(f"{m['model']} takes: {m['conditioning']}")
        print(f"{m['model']} VAE: {m['vae']}")
        print(f"{m['model']} text encoders: {m['text_encoders']}")
        if "graph" in m:
            print(f"{m['model']} graph: {m['graph']}")
        if m["ops"]:
            print(f"{m['model']} on {m['device']}, backend {m['backend']}: each fused layer's path")
            for k, v in m["ops"].items():
                print(f"  {k:20s} {v}")
        else:
            print(f"{m['model']} on {m['device']}: backend {m['backend']}")
    return 0
