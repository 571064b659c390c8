"""A latent model's VAE decoder -> ONNX, checked against PyTorch (the decode stage of TensorRT's and ONNX Runtime's
diffusion pipelines).

Graph interface::

    latents  (B, z, h, w)  float32: the sampler's latents, as ``generate(output_type="tensor")`` returns them
    -> image (B, 3, 8h, 8w) float32 in [-1, 1]

The latent scaling (``VAEDecoder.unscale``: ``latents / scaling_factor + shift_factor``, or SDXL's per-channel
statistics) and the final clamp are inside the graph, so a consumer feeds the sampler's output directly. Height and width are dynamic unless asked otherwise; the VAE config
is stored in the file's metadata (``fastdiff.vae``). Written atomically, like the network's export.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from typing import Optional

import torch
import torch.nn as nn

from fastdiff.errors import BadArgumentError
from fastdiff.utils.checks import export_sizes

from .onnx import DTYPES, OPSETS, ExportResult, _native_ops, _torch_export

META_VAE = "fastdiff.vae"


class _DecodeGraph(nn.Module):
    def __init__(self, vae, dtype: torch.dtype):
        super().__init__()
        self.vae, self.dtype = vae, dtype

    def forward(self, latents):
        z = self.vae.unscale(latents.float())  # (B, z, h, w)
        return self.vae(z.to(self.dtype)).float().clamp(-1, 1)  # (B, 3, 8h, 8w)


def export_vae_onnx(pipe_or_vae, path: str, *, opset: int = 17, dtype: str = "fp32", dynamic_batch: bool = True,
                    dynamic_hw: bool = True, batch: int = 1, height: Optional[int] = None, width: Optional[int] = None,
                    check: bool = True) -> ExportResult:
    """Export a ``Pipeline``'s VAE decoder (or a ``VAEDecoder``) to ONNX at ``path``; height / width: the latent
    size traced and checked (default: the pipeline's sample size, else 32)."""
    import onnx

    t0 = time.perf_counter()
    vae = getattr(pipe_or_vae, "vae", pipe_or_vae)
    if vae is None or not hasattr(vae, "decode"):
        raise BadArgumentError("export_vae_onnx: expected a pipeline with a VAE decoder (load(..., vae=...)) or a "
                               f"VAEDecoder, found {type(pipe_or_vae).__name__} without one")
    if opset not in OPSETS or dtype not in DTYPES:
        raise BadArgumentError(f"export_vae_onnx: opset in {OPSETS} and dtype in {tuple(DTYPES)}, found {opset!r} / "
                               f"{dtype!r}")
    if dtype == "fp16" and vae.config.force_upcast:
        raise BadArgumentError("export_vae_onnx: dtype 'fp16' for a VAE whose config sets force_upcast (its decoder "
                               "overflows in half precision; diffusers decodes it in float32): export fp32")
    export_sizes(batch, height, width, where="export_vae_onnx: ")
    spec = getattr(pipe_or_vae, "spec", None)
    h = int(height if height is not None else spec.sample_size[0] if spec is not None else 32)
    w = int(width if width is not None else spec.sample_size[1] if spec is not None else 32)
    path = os.fspath(path)
    from fastdiff.utils.atomic import check_file_path

    parent = check_file_path(path)
    compute = DTYPES[dtype]
    model = _DecodeGraph(vae if next(vae.parameters()).dtype == compute else _copy_as(vae, compute), compute).eval()
    device = next(vae.parameters()).device
    g = torch.Generator().manual_seed(0)
    example = torch.randn(max(batch, 2) if dynamic_batch else batch, vae.config.latent_channels, h, w,
                          generator=g).to(device)
    axes = {}
    if dynamic_batch or dynamic_hw:
        for name, pixels in (("latents", ""), ("image", "_px")):
            a = {0: "batch"} if dynamic_batch else {}
            if dynamic_hw:
                a.update({2: "height" + pixels, 3: "width" + pixels})
            axes[name] = a
    with tempfile.TemporaryDirectory(prefix=".fastdiff-export-", dir=parent) as tmp:
        raw = os.path.join(tmp, "raw.onnx")
        with _native_ops(vae), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _torch_export(model, (example,), raw, opset, ["latents"], axes, output_names=["image"])
        proto = onnx.load(raw)
        entry = proto.metadata_props.add()
        entry.key, entry.value = META_VAE, json.dumps(vae.config.to_dict(), sort_keys=True)
        onnx.checker.check_model(proto, full_check=True)
        staged = os.path.join(tmp, os.path.basename(path))
        onnx.save_model(proto, staged)
        max_abs = max_rel = None
        note = "skipped (check=False)"
        if check:
            import onnxruntime as ort

            x = torch.randn(batch, vae.config.latent_channels, h, w, generator=torch.Generator().manual_seed(1))
            got = torch.from_numpy(ort.InferenceSession(staged, providers=["CPUExecutionProvider"]).run(
                None, {"latents": x.numpy()})[0])
            with torch.no_grad(), _native_ops(vae):
                ref = vae.decode(x).cpu()
            if not torch.isfinite(got).all():
                raise BadArgumentError(f"export_vae_onnx: the exported decoder gives non-finite images ({dtype}); "
                                       f"export fp32")
            max_abs = (got.double() - ref.double()).abs().max().item()
            max_rel = max_abs / max(ref.abs().max().item(), 1e-30)
            note = f"ONNX Runtime (CPU) vs PyTorch, batch {batch}, latent {h}x{w}"
        os.replace(staged, path)
    return ExportResult(path=path, size_bytes=os.path.getsize(path), seconds=time.perf_counter() - t0,
                        max_abs_err=max_abs, max_rel_err=max_rel, check_note=note, files=[path],
                        io={"inputs": [["latents", "float32"]], "outputs": [["image", "float32"]]})


def _copy_as(vae, dtype):
    import copy

    return copy.deepcopy(vae).to(dtype)


__all__ = ["export_vae_onnx", "META_VAE"]
