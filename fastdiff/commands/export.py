"""``fastdiff export``: a checkpoint -> an ONNX file or a TensorRT engine, checked against PyTorch.

    fastdiff export arch:tiny-unet --format onnx -o unet.onnx
    fastdiff export ./sd15 --format tensorrt --dtype fp16 --batch 1:2:4 -o unet.engine
    fastdiff export builtin:digits --format onnx --dtype fp16 --batch 1:4:8 --cfg-folded -o digits.onnx

Prints a progress display (stderr), then the artifact path, its size and the parity check (max
error vs the PyTorch model; ``--no-check`` skips it).
"""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Optional

from .generate import add_load_arguments, load_options

FORMATS = ("onnx", "tensorrt")


def register(sub) -> None:
    p = sub.add_parser(
        "export", help="export a model to ONNX or a TensorRT engine",
        description="Export MODEL (any fastdiff.load source: a diffusers / fastdiff folder, a DiT .pt, "
                    "builtin:NAME, arch:NAME) to an ONNX graph or a TensorRT engine, then check its output "
                    "against the PyTorch model.")
    p.add_argument("model", metavar="MODEL", help="checkpoint path, builtin:NAME or arch:NAME")
    p.add_argument("--format", required=True, choices=FORMATS, help="artifact type")
    p.add_argument("--component", choices=("network", "vae"), default="network",
                   help="what to export: the denoising network (default), or a latent model's VAE decoder (onnx; "
                        "the sampler's latents in, images in [-1, 1] out; dynamic height / width)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output file (.onnx / .engine)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                   help="weights / engine precision (default: fp32 for onnx, fp16 for tensorrt; bf16: "
                        "tensorrt only)")
    p.add_argument("--fp16-io", action="store_true", help="fp16 graph with float16 inputs / outputs "
                                                           "(default: float32 IO, casts inside)")
    p.add_argument("--opset", type=int, choices=(17, 18), default=17, help="ONNX opset (default 17)")
    p.add_argument("--batch", default="1", metavar="N|MIN:OPT:MAX",
                   help="batch size traced and checked (OPT); for tensorrt the profile's min:opt:max; a range needs "
                        "the dynamic batch (default 1)")
    p.add_argument("--static-batch", action="store_true", help="fix the batch axis (default: dynamic)")
    p.add_argument("--height", default=None, metavar="H|MIN:OPT:MAX", help="sample height (default: the model's)")
    p.add_argument("--width", default=None, metavar="W|MIN:OPT:MAX", help="sample width (default: the model's)")
    p.add_argument("--dynamic-hw", action="store_true",
                   help="dynamic height / width axes (not a DiT); needed for --height / --width ranges")
    p.add_argument("--sequence", default=None, metavar="N|MIN:OPT:MAX",
                   help="tensorrt: the text length profile (default: 1:77:308 for CLIP models, SD3's 1:333:589, "
                        "Flux's 512)")
    p.add_argument("--cfg-folded", action="store_true",
                   help="fold classifier-free guidance into the graph (inputs: cond, uncond, guidance_scale)")
    p.add_argument("--timing-cache", default=None, metavar="FILE", help="tensorrt: timing cache file (read + updated)")
    p.add_argument("--controlnet", action="append", default=None, metavar="FOLDER",
                   help="export the network with this ControlNet (a diffusers ControlNetModel folder for a UNet, "
                        "SD3ControlNetModel / FluxControlNetModel for SD3 / FLUX.1) as one graph taking its control "
                        "inputs (control_image / control_scale, and the UNet's control_guess; an SD3 / FLUX.1 "
                        "ControlNet's image as VAE latents); repeat for several (their outputs add up: one image and "
                        "scale each); a ControlNet pipeline folder's own controlnet/ is exported so without this flag")
    p.add_argument("--no-check", action="store_true", help="skip the parity check against PyTorch")
    p.add_argument("--no-progress", action="store_true", help="no progress display")
    add_load_arguments(p)
    p.set_defaults(func=run)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def export_model(model: str, output: str, *, format: str = "onnx", dtype=None, fp16_io=False, opset=17,
                 batch="1", static_batch=False, height=None, width=None, dynamic_hw=False, cfg_folded=False,
                 timing_cache=None, check=True, progress=True, load_options: Optional[dict] = None,
                 component: str = "network", sequence=None, controlnet=None) -> dict:
    """The command as a function: returns a report dict (path, size_bytes, seconds, max errors, ...);
    ``load_options`` go to ``fastdiff.load`` (num_heads, head_channels, attention_order, prediction_type)."""
    from ..errors import BadArgumentError

    if format not in FORMATS:
        raise BadArgumentError(f"unknown export format {format!r}; expected one of {FORMATS}")
    if component == "vae":  # (before any format-specific check: what applies to the decoder)
        network_only = [name for name, on in (("--format tensorrt", format != "onnx"), ("--fp16-io", fp16_io),
                                              ("--cfg-folded", cfg_folded), ("--dynamic-hw", dynamic_hw)) if on]
        if network_only:
            raise BadArgumentError(f"--component vae: {', '.join(network_only)} apply to the network export only (the "
                                   f"decoder exports to ONNX with float32 IO and dynamic height / width)")
    from fastdiff.export.tensorrt import parse_range

    b = parse_range(batch, "--batch")
    hr, wr = parse_range(height, "--height"), parse_range(width, "--width")
    seq = parse_range(sequence, "--sequence")
    if b[0] != b[2] and static_batch:
        raise BadArgumentError(f"--batch {batch}: a range needs the dynamic batch axis, found --static-batch; give "
                               f"one size")
    spans = [name for name, r in (("--height", hr), ("--width", wr)) if r and r[0] != r[2]]
    if spans and not dynamic_hw and component == "network":
        raise BadArgumentError(f"{' / '.join(spans)}: a MIN:OPT:MAX range needs dynamic height / width axes "
                               f"(--dynamic-hw), found fixed ones; give one size")
    if format == "tensorrt":
        from fastdiff.export.tensorrt import require_tensorrt

        require_tensorrt()  # before any work: one clear line where TensorRT cannot run
        dtype = dtype or "fp16"
    else:
        dtype = dtype or "fp32"
        if dtype == "bf16":
            raise BadArgumentError("--dtype bf16 is for --format tensorrt; ONNX export supports fp32 and fp16")
        tensorrt_only = [name for name, on in (("--timing-cache", timing_cache), ("--sequence", sequence)) if on]
        if tensorrt_only:  # (an ONNX graph's text length is always dynamic; a range's OPT is what it traces)
            raise BadArgumentError(f"{' and '.join(tensorrt_only)} {'is' if len(tensorrt_only) == 1 else 'are'} for "
                                   f"--format tensorrt (an ONNX export builds no engine)")
    from fastdiff.utils.atomic import check_file_path

    check_file_path(output)  # an unwritable / missing folder fails before loading the model
    suffix = ".engine" if format == "tensorrt" else ".onnx"
    if not str(output).lower().endswith(suffix):  # (fastdiff.load / info / generate tell artifacts by it)
        raise BadArgumentError(f"-o/--output: expected a {suffix} file name for --format {format}, found {output!r}")

    import fastdiff
    from fastdiff.export.onnx import export_onnx

    pipe = fastdiff.load(model, **(load_options or {}))
    if controlnet is not None:
        if component == "vae":
            raise BadArgumentError("--controlnet: given with --component vae; a ControlNet drives the network")
        several = isinstance(controlnet, (list, tuple))
        pipe.set_controlnet(controlnet[0] if several and len(controlnet) == 1 else controlnet)
    if component == "vae":
        return _export_vae(pipe, output, format, dtype, opset, b, hr, wr, static_batch, check)
    kw = dict(opset=opset, fp16_io=fp16_io, dynamic_batch=not static_batch, dynamic_hw=dynamic_hw,
              cfg_folded=cfg_folded, batch=b[1], height=hr[1] if hr else None, width=wr[1] if wr else None,
              progress=progress)
    if format == "onnx":
        res = export_onnx(pipe, None, output, dtype=dtype, check=check, **kw)
        return dict(format="onnx", path=res.path, files=res.files, size_bytes=res.size_bytes, seconds=res.seconds,
                    max_abs_err=res.max_abs_err, max_rel_err=res.max_rel_err, check_note=res.check_note,
                    notes=list(pipe.notes))

    from fastdiff.export.tensorrt import SIDECAR_SUFFIX, build_engine, text_sequence

    onnx_dtype = "fp16" if dtype == "fp16" else "fp32"  # bf16 engines are built from the fp32 graph
    seq = seq or text_sequence(pipe.spec)  # the length the pipeline feeds (None: no text input)
    with tempfile.TemporaryDirectory(prefix=".fastdiff-trt-", dir=os.path.dirname(os.path.abspath(output))) as tmp:
        onnx_path = os.path.join(tmp, "model.onnx")
        ores = export_onnx(pipe, None, onnx_path, dtype=onnx_dtype, check=False, **kw)
        staged = os.path.join(tmp, "model.engine")  # checked before it is placed at OUT
        eres = build_engine(onnx_path, staged, batch=b, height=hr, width=wr, sequence=seq, precision=dtype,
                            timing_cache=timing_cache, rebuild="always", progress=progress)
        report = dict(format="tensorrt", path=output, files=[output, output + SIDECAR_SUFFIX],
                      size_bytes=eres.size_bytes, seconds=ores.seconds + eres.seconds, max_abs_err=None,
                      max_rel_err=None, check_note="skipped (--no-check)", notes=list(pipe.notes))
        if check:
            report.update(_check_engine(pipe, staged, ores.io, b[1], kw, tokens=seq[1] if seq else 7))
        # engine first, sidecar last, as build_engine writes them: a crash in between leaves a pair whose
        # engine_sha256 disagrees, which engine_status reports as stale
        os.replace(staged, output)
        os.replace(staged + SIDECAR_SUFFIX, output + SIDECAR_SUFFIX)
    return report


def _export_vae(pipe, output, format, dtype, opset, b, hr, wr, static_batch, check) -> dict:
    from fastdiff.export.vae_onnx import export_vae_onnx

    res = export_vae_onnx(pipe, output, opset=opset, dtype=dtype, dynamic_batch=not static_batch, batch=b[1],
                          height=hr[1] if hr else None, width=wr[1] if wr else None, check=check)
    return dict(format="onnx", path=res.path, files=res.files, size_bytes=res.size_bytes, seconds=res.seconds,
                max_abs_err=res.max_abs_err, max_rel_err=res.max_rel_err, check_note=res.check_note,
                notes=list(pipe.notes))


def reference_network(pipe, device):
    """The float32 network on ``device`` an exported graph is checked against: the pipeline's, with its ControlNet
    (the graph holds both); a copy where it must move or cast, so the pipeline stays as it is."""
    import copy

    import torch

    model = pipe.model
    if pipe.controlnet is not None:
        from ..models.controlnet import controlled

        model = controlled(model, pipe.controlnet)
    param = next(model.parameters())
    if param.device.type != torch.device(device).type or param.dtype != torch.float32:
        model = copy.deepcopy(model).to(device=device, dtype=torch.float32)
    return model


def _check_engine(pipe, engine_path, io, batch, kw, tokens) -> dict:
    """TensorRT engine vs the PyTorch model (float32, on the GPU) at the profile's opt batch and text length."""
    import torch

    from fastdiff.export.onnx import _example_inputs, reference_output
    from fastdiff.runtime.tensorrt_runner import TensorRTRunner

    runner = TensorRTRunner(engine_path)
    h = kw["height"] or pipe.spec.sample_size[0]
    w = kw["width"] or pipe.spec.sample_size[1]
    feeds = _example_inputs(pipe.spec, io, batch, h, w, "cuda", seed=1, tokens=tokens)
    ref = reference_output(reference_network(pipe, torch.device("cuda")), pipe.spec, io,
                           {k: v.float() if v.is_floating_point() else v for k, v in feeds.items()})
    out = runner.run_feeds(feeds).float().cpu()
    torch.cuda.synchronize()
    err = (out.double() - ref.double()).abs().max().item()
    return dict(max_abs_err=err, max_rel_err=err / max(ref.double().abs().max().item(), 1e-30),
                check_note=f"TensorRT vs PyTorch float32, batch {batch}, {h}x{w}")


def run(args) -> int:
    try:
        report = export_model(args.model, args.output, format=args.format, dtype=args.dtype, fp16_io=args.fp16_io,
                              opset=args.opset, batch=args.batch, static_batch=args.static_batch, height=args.height,
                              width=args.width, dynamic_hw=args.dynamic_hw, cfg_folded=args.cfg_folded,
                              timing_cache=args.timing_cache, check=not args.no_check,
                              progress=not args.no_progress, load_options=load_options(args),
                              component=args.component, sequence=args.sequence, controlnet=args.controlnet)
    except OSError as e:  # a folder that refuses files (/proc), a full disk: one line, the target left as it was
        from ..errors import BadArgumentError

        raise BadArgumentError(f"export to {args.output} failed: {e}") from e
    for note in report.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {report['path']}")
    for extra in report["files"][1:]:
        print(f"  + {extra}")
    print(f"size: {_human(report['size_bytes'])} ({report['size_bytes']} bytes); export took {report['seconds']:.1f} s")
    if report["max_abs_err"] is None:
        print(f"parity check: {report['check_note']}")
    else:
        print(f"parity check: max abs error {report['max_abs_err']:.3g}, max rel error {report['max_rel_err']:.3g} "
              f"({report['check_note']})")
    return 0
