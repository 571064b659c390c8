"""Native UNet / DiT / MMDiT / FLUX.1 -> ONNX, checked against PyTorch, with the ModelSpec in the file's metadata.

``export_onnx(pipe_or_model, spec, path, ...)`` traces the network with torch's TorchScript-based
exporter (``torch.onnx.export(..., dynamo=False)``), validates the graph with ``onnx.checker``, writes
``metadata_props`` and runs the result once in ONNX Runtime against the PyTorch output.

Why the TorchScript exporter: it runs on torch 2.5 through 2.13 with nothing beyond ``onnx`` (the
``dynamo=True`` path needs ``onnxscript``, is ~10x slower on the tiny UNet and produced the same ops).
Neither exporter writes ``GroupNormalization``: both lower ``F.group_norm`` to Reshape ->
InstanceNormalization -> Reshape -> Mul/Add, at opset 17 and 18 alike. That is deliberate upstream:
``GroupNormalization``-18 takes its scale / bias per *group* (a spec bug fixed in opset 21) and
``onnx.checker`` rejects it as deprecated, so the InstanceNormalization form is the valid one at 17/18
(TensorRT and ONNX Runtime both fuse it). fastdiff's ``GroupNorm.forward_native`` (float32 statistics,
then a cast back) traces to Cast -> that pattern -> Cast, also in an fp16 graph.

Graph interface (what ONNX diffusion pipelines expect)::

    sample                (B, C, H, W)  float32 (float16 with fp16_io)
    timestep              (B,) or (1,)  float32 (int64 for a learned timestep table)
    encoder_hidden_states (B, L, D)     text-conditioned UNet          | class_labels (B,) int64: DiT,
    text_embeds           (B, P)        SDXL-style UNets and SD3 only     class-conditional UNet
    time_ids              (B, N)        float32, SDXL-style UNets only
    image_latents         (B, K, H, W) inpainting networks only: the mask and the masked image's latents (K = 1 + C,
                          FLUX.1 Fill's C + f*f: ModelSpec.image_latents_channels); a guided-diffusion upsampler's
                          low-resolution image, upsampled (K = 3); Stable Diffusion's x4 upscaler's noised image
    control_image         (B, 3, fH, fW) a UNet exported with its ControlNet (``pipe.set_controlnet``): the image
    control_scale         (B,) float32   in [0, 1] (f: the ControlNet's downscale, 8 for SD), each sample's scale
    control_guess         (B,) float32   (0 outside the step window) and 1 for guess mode's weighting
    -> out_sample         (B, C_out, H, W)

K ControlNets (``set_controlnet([A, B])``, metadata ``control.count``): control_image (B, K, 3, fH, fW) and
control_scale (B, K), one per ControlNet; control_guess stays (B,).

An SD3 / FLUX.1 transformer exported with its ControlNet(s) takes instead (metadata ``control``: ``latent``,
``count``, ``num_mode``, ``vae_shift``, ``inpaints``, ``reads_pixels``, what a pipeline loading the graph reads)::

    control_image         (B, [K,] C', H, W) the control image's VAE latents as the pipeline makes them (C' = C, or
                          C + 1 for SD3's inpainting ControlNet: the masked image's and the inverted mask; XLabs'
                          FLUX.1 ControlNets: the image itself, (B, [K,] 3, 8H, 8W) in [-1, 1]); K: several
    control_scale         (B, [K]) float32   each sample's scale, 0 outside its step window
    control_mode          (B, [K]) int64     a FLUX.1 Union ControlNet's types
    control_encoder_hidden_states, control_text_embeds   FLUX.1: the text its ControlNet reads (the pass's own, or
                          the conditional text under true CFG)

A UNet exported with IP-Adapters loaded (metadata ``ip_adapters``: count, feature ranks and widths, layers) takes::

    image_embeds_<k>      (B, N, D) or (B, N, S, E)  adapter k's features of N images (Plus / Full Face: hidden
                          states; Face ID Plus: (B, N, D + S * E) packed), N (and S) symbolic
    ip_scales             (K * L,) float32  every adapter's scale in each of the L cross-attention layers, adapter by
                          adapter (``fastdiff.models.ip_adapter.scale_vector``): both CFG passes'

CFG-folded graph (``cfg_folded=True``): the same inputs plus ``uncond_encoder_hidden_states`` (and, for
SDXL-style UNets, ``uncond_text_embeds`` / ``uncond_time_ids``; class models use the spec's null class
inside) and ``guidance_scale`` ((1,) or (B,) float32); ``guidance``, ``image_latents``, ``control_image``,
``control_guess``, ``control_mode``, ``ip_scales`` and a FLUX.1 ControlNet's text serve both passes
(``uncond_control_scale`` is guess mode's 0; ``uncond_image_embeds_<k>``: the negative image features);
cond and uncond run as ONE batch of 2B inside and ``out_sample`` is the guided output: channels
``[:g]`` are ``uncond + s * (cond - uncond)`` (g = spec.guided_channels, or the eps channels of a
learned-variance model), the remaining (variance) channels are the conditional pass's.

Files over ~2 GB (SD 1.5 in fp32) are written with their weights in ``<name>.onnx.data`` beside the
graph; ``onnx.checker`` then gets the path (the in-memory checker stops at protobuf's 2 GB).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from fastdiff.errors import (BackendUnavailableError, BadArgumentError, CorruptCheckpointError, FastdiffError,
                             UnsupportedConfigError)
from fastdiff.spec import ModelSpec

OPSETS = (17, 18)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # bytes of weights; protobuf's hard limit is 2 GiB for the whole file
META_SPEC = "fastdiff.spec"
META_IO = "fastdiff.io"
META_VERSION = "fastdiff.version"


@dataclass
class ExportResult:
    """What ``export_onnx`` wrote and how close it is to PyTorch.

    max_abs_err / max_rel_err: ONNX Runtime (CPU) vs the PyTorch float32 model on the same inputs
    (rel = max|ort - torch| / max|torch|); None when the check was skipped (``check_note`` says why).
    """

    path: str
    size_bytes: int
    seconds: float
    max_abs_err: Optional[float] = None
    max_rel_err: Optional[float] = None
    check_note: str = ""
    files: list = field(default_factory=list)
    io: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------
# What the graph looks like
# ---------------------------------------------------------------------------------------------------

def conditioning(model: nn.Module, spec: ModelSpec) -> Optional[str]:
    """"text" (encoder_hidden_states), "class" (class_labels) or None (unconditional)."""
    if spec.kind == "dit":
        return "class"
    cfg = getattr(model, "config", None)
    cet = getattr(cfg, "class_embed_type", None)
    if cet is not None:  # (a text UNet's too: generate() feeds it no class labels either)
        raise UnsupportedConfigError("class_embed_type", cet, supported="None (an nn.Embedding class table)",
                                     model="ONNX export of the UNet")
    if spec.cross_attention_dim is not None:
        return "text"
    if spec.num_classes:
        return "class"
    return None


def cond_inputs(cond: Optional[str], spec: ModelSpec, control=None, ip=None) -> list[str]:
    """The graph's conditional inputs after sample and timestep, in order (a CFG-folded text graph repeats each
    text input as ``uncond_<name>``; the unconditional class label is the graph's own null class). A UNet with
    both text and a class table takes both; one exported with its ControlNet (``control``: ``control_format``'s
    dict) the control inputs; one with IP-Adapters (``ip``: ``ip_adapter_format``'s dict) each adapter's image
    features and the adapters' scales."""
    image = (["image_latents"] if spec.inpainting or spec.latent_control or spec.low_res_channels else []) + \
        control_inputs(control) + ip_inputs(ip)
    if cond == "class":
        return ["class_labels"] + image
    if cond == "text":
        return (["encoder_hidden_states"] + (["text_embeds"] if spec.text_embeds_dim else [])
                + (["time_ids"] if spec.time_ids_dim else []) + (["guidance"] if spec.guidance_input else [])
                + (["class_labels"] if spec.num_classes else []) + image)
    return image


def ip_inputs(ip) -> list[str]:
    """The inputs of a UNet exported with its IP-Adapters (``ip_adapter_format``'s dict, or None): ``image_embeds_<k>``
    per adapter, then ``ip_scales``."""
    return [] if not ip else [f"image_embeds_{k}" for k in range(ip["count"])] + ["ip_scales"]


def ip_adapter_format(model: nn.Module) -> Optional[dict]:
    """A UNet's loaded IP-Adapters as a graph reads them (None without any): their ``count``, each one's feature
    ``ranks`` (1: (B, N, D) embeddings, 2: (B, N, S, E) hidden states), its ``widths`` (D, or E; Face ID Plus: its
    face embedding's, the packed hidden states following) and the cross-attention ``layers`` each scale covers."""
    from fastdiff.models import ip_adapter as ipa

    if not ipa.attached(model):
        return None
    count = ipa.adapter_count(model)
    widths = []
    for k in range(count):
        projection = model.ip_projection[k]
        widths.append(projection.id_dim if ipa.is_face_id_plus(projection) else
                      ipa.image_width(model, k) if ipa.image_rank(model, k) == 1 else projection_in_width(projection))
    return {"count": count, "ranks": [ipa.image_rank(model, k) for k in range(count)], "widths": widths,
            "packed": [ipa.is_face_id_plus(model.ip_projection[k]) for k in range(count)],
            "clip_widths": [getattr(model.ip_projection[k], "clip_dim", None) for k in range(count)],
            "layers": len(ipa.cross_attentions(model))}


def projection_in_width(projection: nn.Module) -> int:
    """E, the width of each hidden state a Plus / Full Face projection reads."""
    from fastdiff.models.ip_adapter import projection_sizes

    return projection_sizes(projection)[0]


def control_inputs(control) -> list[str]:
    """The control inputs of a graph exported with ``control`` (``control_format``'s dict, or None): a UNet
    ControlNet's image, scale and guess-mode flags; an SD3 / FLUX.1 ControlNet's latents (XLabs': the image) and scale,
    a FLUX.1 Union ControlNet's types, and the text a FLUX.1 ControlNet reads (the conditional text under true CFG)."""
    if not control:
        return []
    if not control.get("latent"):
        return list(CONTROL_INPUTS)
    names = ["control_image", "control_scale"] + (["control_mode"] if control.get("num_mode") else [])
    return names + (["control_encoder_hidden_states", "control_text_embeds"] if control["latent"] == "flux" else [])


def _own_uncond(names: list) -> list:
    """The inputs a CFG-folded graph takes an ``uncond_`` counterpart of: not the shared ones, not the class label
    (its unconditional value is the null class, inside)."""
    return [n for n in names if n not in SHARED_INPUTS and n != "class_labels"]


# inputs both CFG passes share (no uncond_ counterpart): Flux dev's distilled-guidance strength, an inpainting
# network's mask and masked-image latents, a ControlNet's image and guess-mode flags
SHARED_INPUTS = ("guidance", "image_latents", "control_image", "control_guess", "control_mode",
                 "control_encoder_hidden_states", "control_text_embeds", "ip_scales")
CONTROL_INPUTS = ("control_image", "control_scale", "control_guess")  # a UNet exported with its ControlNet


# float inputs that run in the network's dtype (the rest: class labels int64, SDXL's time ids float32)
_NETWORK_DTYPE_INPUTS = ("encoder_hidden_states", "text_embeds", "image_latents", "control_image",
                         "control_encoder_hidden_states", "control_text_embeds")


def control_format(model: nn.Module) -> Optional[dict]:
    """The control input of a network exported with its ControlNet (None for any other network): a UNet
    ControlNet's image; an SD3 / FLUX.1 ControlNet's ``latent`` kind, its input's channels and size per latent pixel
    (1: the control image's VAE latents; XLabs': the image itself), its count, Union types and how the pipeline
    makes its latents (``vae_shift``, ``inpaints``, ``reads_pixels``): what a pipeline loading the graph needs."""
    from fastdiff.models.controlnet import ControlledUNet
    from fastdiff.models.flux_controlnet import ControlledFlux
    from fastdiff.models.sd3_controlnet import ControlledMMDiT

    if isinstance(model, (ControlledFlux, ControlledMMDiT)):
        net, flux = model.controlnet, isinstance(model, ControlledFlux)
        nets = list(getattr(net, "nets", [net]))
        pixels = bool(getattr(net, "reads_pixels", False))
        latent_channels = model.config.latent_channels if flux else model.config.in_channels
        modes = [n.num_mode for n in nets] if flux and any(n.num_mode for n in nets) else None
        return {"latent": "flux" if flux else "sd3",
                "conditioning_channels": 3 if pixels else latent_channels + getattr(net, "extra_conditioning_channels",
                                                                                   0),
                "image_downscale": net.image_downscale if pixels else 1, "global_pool_conditions": False,
                "count": len(nets) if hasattr(net, "nets") else None, "num_mode": modes, "reads_pixels": pixels,
                "inpaints": bool(getattr(net, "inpaints", False)), "vae_shift": bool(getattr(net, "vae_shift", True))}
    if not isinstance(model, ControlledUNet):
        return None
    nets = getattr(model.controlnet, "nets", None)
    out = {"conditioning_channels": model.controlnet.conditioning_channels,
           "image_downscale": model.controlnet.image_downscale,
           "global_pool_conditions": (nets[0] if nets else model.controlnet).global_pool_conditions}
    return out if nets is None else dict(out, count=len(nets))  # (several: images (B, K, ...), scales (B, K))


def _timestep_dtype(model: nn.Module, spec: ModelSpec) -> torch.dtype:
    cfg = getattr(model, "config", None)
    learned = spec.kind == "unet" and getattr(cfg, "time_embedding_type", None) == "learned"
    return torch.int64 if learned else torch.float32


def _guided_channels(spec: ModelSpec, out_channels: int) -> int:
    if spec.guided_channels is not None:
        return int(spec.guided_channels)
    return spec.in_channels if spec.learned_variance else out_channels


def call_network(model: nn.Module, x, t, conds: dict, dtype: torch.dtype):
    """``model(x, t, **conds)`` with the graph's inputs as the native model takes them: the float inputs in
    ``dtype``; ``image_embeds_<k>`` as the ``image_embeds`` list (one tensor for one adapter) and ``ip_scales`` as
    every layer's adapter scales (``fastdiff.models.ip_adapter.scales_from``)."""
    kw = {k: v.to(dtype) if k in _NETWORK_DTYPE_INPUTS else v for k, v in conds.items()
          if not k.startswith("image_embeds_") and k != "ip_scales"}
    embeds = [conds[k].to(dtype) for k in sorted((k for k in conds if k.startswith("image_embeds_")),
                                                  key=lambda k: int(k.rsplit("_", 1)[1]))]
    if not embeds:
        return model(x, t, **kw)
    from fastdiff.models.ip_adapter import scales_from

    with scales_from(model, conds["ip_scales"].float()):
        return model(x, t, image_embeds=embeds[0] if len(embeds) == 1 else embeds, **kw)


class _GraphModule(nn.Module):
    """The traced function: IO casts around the native model (its own forward, unchanged)."""

    def __init__(self, model: nn.Module, names: list, compute_dtype: torch.dtype, io_dtype: torch.dtype):
        super().__init__()
        self.model, self.names = model, list(names)  # the conditional inputs, in graph order
        self.compute_dtype, self.io_dtype = compute_dtype, io_dtype

    def _run(self, x, t, conds: dict):
        return call_network(self.model, x, t, conds, self.compute_dtype)

    def forward(self, sample, timestep, *conds):
        b = sample.shape[0]
        x = sample.to(self.compute_dtype)  # (B, C, H, W)
        t = timestep.reshape(-1).expand(b)  # (B,)
        out = self._run(x, t, dict(zip(self.names, conds)))  # (B, C_out, H, W)
        return out.to(self.io_dtype)


class _CFGGraphModule(_GraphModule):
    """Classifier-free guidance folded into the graph: cond + uncond as one batch of 2B."""

    def __init__(self, model, names, compute_dtype, io_dtype, guided: int, null_class: Optional[int]):
        super().__init__(model, names, compute_dtype, io_dtype)
        self.guided, self.null_class = guided, null_class

    def forward(self, sample, timestep, *rest):
        n = len(self.names)
        cond, guidance_scale = dict(zip(self.names, rest[:n])), rest[-1]
        b = sample.shape[0]
        x = sample.to(self.compute_dtype)
        x2 = torch.cat([x, x], dim=0)  # (2B, C, H, W)
        t = timestep.reshape(-1).expand(b)
        t2 = torch.cat([t, t], dim=0)  # (2B,)
        own = _own_uncond(self.names)  # their uncond_ counterparts follow, in the same order
        uncond = dict(zip(own, rest[n:n + len(own)]))
        if "class_labels" in self.names and self.null_class is not None:  # the unconditional pass's: the null class
            uncond["class_labels"] = torch.full_like(cond["class_labels"], self.null_class)  # (None: both passes')
        # (2B, ...); shared: twice (the adapters' scales, one per layer, not per sample: once)
        both = {k: cond[k] if k == "ip_scales" else torch.cat([cond[k], uncond.get(k, cond[k])], dim=0)
                for k in self.names}
        out = self._run(x2, t2, both).float()  # (2B, C_out, H, W)
        c, u = out[:b], out[b:]  # 2 x (B, C_out, H, W)
        g = self.guided
        s = guidance_scale.float().reshape(-1, 1, 1, 1)  # (B or 1, 1, 1, 1)
        guided = u[:, :g] + s * (c[:, :g] - u[:, :g])  # (B, g, H, W)
        if g < out.shape[1]:
            guided = torch.cat([guided, c[:, g:]], dim=1)  # variance channels: the conditional pass's
        return guided.to(self.io_dtype)


def graph_io(model: nn.Module, spec: ModelSpec, *, cfg_folded: bool, fp16_io: bool, dtype: str,
             dynamic_batch: bool, dynamic_hw: bool, out_channels: int) -> dict:
    """The graph's interface as stored in metadata (and read by the runners)."""
    cond = conditioning(model, spec)
    io_dtype = "float16" if (dtype == "fp16" and fp16_io) else "float32"
    inputs = [["sample", io_dtype], ["timestep", "int64" if _timestep_dtype(model, spec) == torch.int64 else "float32"]]
    kinds = {"encoder_hidden_states": io_dtype, "text_embeds": io_dtype, "time_ids": "float32",
             "class_labels": "int64", "guidance": "float32", "image_latents": io_dtype, "control_image": io_dtype,
             "control_scale": "float32", "control_guess": "float32", "control_mode": "int64",
             "control_encoder_hidden_states": io_dtype, "control_text_embeds": io_dtype}
    control, ip = control_format(model), ip_adapter_format(model)
    names = cond_inputs(cond, spec, control, ip)
    kinds.update({n: io_dtype for n in ip_inputs(ip)}, ip_scales="float32")
    inputs += [[n, kinds[n]] for n in names]
    if cfg_folded:
        inputs += [["uncond_" + n, kinds[n]] for n in _own_uncond(names)]
        inputs.append(["guidance_scale", "float32"])
    return {
        "inputs": inputs, "outputs": [["out_sample", io_dtype]], "conditioning": cond, "dtype": dtype,
        "fp16_io": bool(fp16_io), "cfg_folded": bool(cfg_folded), "dynamic_batch": bool(dynamic_batch),
        "dynamic_hw": bool(dynamic_hw), "out_channels": int(out_channels),
        "guided_channels": _guided_channels(spec, out_channels) if cfg_folded else None,
        "null_class": spec.null_class, "control": control, "ip_adapters": ip,
    }


# ---------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------

def _unpack(pipe_or_model, spec):
    model = getattr(pipe_or_model, "model", None)
    if isinstance(model, nn.Module) and hasattr(pipe_or_model, "spec"):
        controlnet = getattr(pipe_or_model, "controlnet", None)
        if controlnet is not None:  # one graph of both networks, with the control inputs
            from fastdiff.models.controlnet import controlled

            model = controlled(model, controlnet)
        return model, spec if spec is not None else pipe_or_model.spec
    if isinstance(pipe_or_model, nn.Module):
        if spec is None:
            raise BadArgumentError(
                f"export_onnx: expected a fastdiff Pipeline or a native model with its ModelSpec, found a "
                f"{type(pipe_or_model).__name__} and spec=None (the spec gives the input shapes and the "
                f"metadata a consumer needs; fastdiff.load(...) returns both)")
        return pipe_or_model, spec
    if hasattr(pipe_or_model, "spec") and model is None:  # fastdiff.load("x.onnx"): a graph, no PyTorch weights
        raise BadArgumentError("export_onnx: expected a checkpoint with PyTorch weights, found a pipeline of an "
                               "exported graph (no PyTorch model); export from the checkpoint it came from")
    raise BadArgumentError(f"export_onnx: expected a fastdiff Pipeline or an nn.Module, found "
                           f"{type(pipe_or_model).__name__}")


def _out_channels(model, spec) -> int:
    cfg = getattr(model, "config", None)
    if spec.kind == "flux":  # (its config counts packed channels; the graph returns the unpacked latents)
        return int(cfg.latent_channels)
    oc = getattr(cfg, "out_channels", None)
    if isinstance(oc, int):
        return oc
    return spec.in_channels * (2 if spec.learned_variance else 1)


@contextlib.contextmanager
def _native_ops(model: nn.Module):
    """Trace the plain-torch path of every fused op (Triton kernels do not trace), then restore."""
    from fastdiff.models.layers import FusedOp

    saved = [(m, m.backend) for m in model.modules() if isinstance(m, FusedOp)]
    for m, _ in saved:
        m.set_backend("native")
    try:
        yield
    finally:
        for m, b in saved:
            m.set_backend(b)


def _example_inputs(spec, io, batch, h, w, device, seed=0, tokens=7):
    """Seeded inputs for the graph in its input order, as torch tensors (float32 / int64 on ``device``); text states
    of ``tokens`` tokens (7 by default: no size of the model's own, so nothing is fixed to it)."""
    g = torch.Generator().manual_seed(seed)
    feeds = {}
    for name, dt in io["inputs"]:
        if name == "sample":
            v = torch.randn(batch, spec.in_channels, h, w, generator=g)
        elif name == "timestep":  # (a learned table's: within its rows, which may be fewer than 1000)
            top = int((spec.model_config or {}).get("num_train_timesteps") or 1000) - 1 if dt == "int64" else 999
            v = torch.linspace(top, 1, batch)
            v = v.round().long() if dt == "int64" else v + 0.25
        elif name in ("encoder_hidden_states", "uncond_encoder_hidden_states"):
            v = torch.randn(batch, tokens, spec.cross_attention_dim, generator=g)
        elif name in ("text_embeds", "uncond_text_embeds"):
            v = torch.randn(batch, spec.text_embeds_dim, generator=g)
        elif name in ("time_ids", "uncond_time_ids"):  # sizes and crops in pixels, varied per row
            v = 8.0 * torch.randint(4, 160, (batch, spec.time_ids_dim), generator=g)
        elif name == "guidance":  # Flux dev's strengths, varied per row
            v = torch.linspace(1.5, 4.5, batch)
        elif name == "image_latents" and spec.low_res_channels:  # an upscaler's image in [-1, 1]
            v = torch.rand(batch, spec.low_res_channels, h, w, generator=g) * 2 - 1
        elif name == "image_latents":  # a 0 / 1 mask and latents (FLUX.1 Fill: latents, then the mask's channels)
            mask = (torch.rand(batch, spec.image_latents_channels - spec.in_channels, h, w, generator=g) > 0.5).float()
            latents = torch.randn(batch, spec.in_channels, h, w, generator=g)
            v = torch.cat([latents, mask] if spec.kind == "flux" else [mask, latents], dim=1)
        elif name == "control_image":  # in [0, 1], at the ControlNet's pixels per latent pixel (latents: randn)
            control = io["control"]
            f, c, k = control["image_downscale"], control["conditioning_channels"], control.get("count")
            shape = (batch,) + ((k,) if k else ()) + (c, h * f, w * f)
            latents = control.get("latent") and f == 1
            v = torch.randn(*shape, generator=g) if latents else torch.rand(*shape, generator=g)
        elif name in ("control_scale", "uncond_control_scale"):  # varied per row, one row off (outside its window)
            v = torch.linspace(1.3, 0.4, batch) * (torch.arange(batch) != 1)
            k = io["control"].get("count")
            v = v if not k else v[:, None] * torch.linspace(1.0, 0.5, k)  # (B, K): one per ControlNet
        elif name == "control_mode":  # a Union ControlNet's types, one per row (and ControlNet)
            top = min(m for m in io["control"]["num_mode"] if m)
            k = io["control"].get("count")
            v = torch.randint(0, top, (batch,) + ((k,) if k else ()), generator=g)
        elif name == "control_encoder_hidden_states":
            v = torch.randn(batch, tokens, spec.cross_attention_dim, generator=g)
        elif name == "control_text_embeds":
            v = torch.randn(batch, spec.text_embeds_dim, generator=g)
        elif name == "control_guess":  # guess mode's weighting on every other row
            v = (torch.arange(batch) % 2).float()
        elif name == "class_labels":
            v = torch.randint(0, max(int(spec.num_classes or 1), 1), (batch,), generator=g)
        elif name == "guidance_scale":
            v = torch.full((1,), 4.0)
        elif name.startswith(("image_embeds_", "uncond_image_embeds_")):  # two images each (no N = 1 baked in)
            k = int(name.rsplit("_", 1)[1])
            v = torch.randn(batch, 2, *_ip_feature_shape(io["ip_adapters"], k), generator=g)
        elif name == "ip_scales":  # every layer's its own
            v = torch.linspace(1.2, 0.3, io["ip_adapters"]["count"] * io["ip_adapters"]["layers"])
        else:  # pragma: no cover - graph_io names only the above
            raise AssertionError(name)
        if dt == "float16":
            v = v.half()
        feeds[name] = v.to(device)
    return feeds


def _ip_feature_shape(ip: dict, k: int) -> tuple:
    """One example image's features for adapter k: (D,), (S, E) hidden states (3 of them: no S baked in), or Face ID
    Plus's packed face embedding and 3 hidden states."""
    if ip["packed"][k]:
        return (ip["widths"][k] + 3 * ip["clip_widths"][k],)
    return (3, ip["widths"][k]) if ip["ranks"][k] == 2 else (ip["widths"][k],)


def _dynamic_axes(io, dynamic_batch, dynamic_hw):
    axes = {}
    for name, _ in io["inputs"] + io["outputs"]:
        a = {}
        if name.startswith(("image_embeds_", "uncond_image_embeds_")):  # (B, N, ...): any count of images
            k = int(name.rsplit("_", 1)[1])
            a = ({0: "batch"} if dynamic_batch else {}) | {1: f"images_{k}"}
            if io["ip_adapters"]["ranks"][k] == 2 or io["ip_adapters"]["packed"][k]:
                a[2] = f"image_states_{k}"  # (the hidden states' count; Face ID Plus: its packed width)
            axes[name] = a
            continue
        if name == "ip_scales":
            continue
        if name in ("sample", "out_sample", "image_latents", "control_image"):
            if dynamic_batch:
                a[0] = "batch"
            if dynamic_hw:  # (the control image: its own axes, f times the latents'; several ControlNets': (B, K, ...))
                several = name == "control_image" and io["control"].get("count")
                hw = (3, 4) if several else (2, 3)
                a[hw[0]], a[hw[1]] = ("control_height", "control_width") if name == "control_image" else ("height",
                                                                                                        "width")
        elif name in ("timestep", "guidance_scale"):
            a[0] = f"{name}_batch"  # (1,) or (B,)
        elif name in ("class_labels", "text_embeds", "time_ids", "uncond_text_embeds", "uncond_time_ids", "guidance",
                      "control_scale", "uncond_control_scale", "control_guess", "control_mode", "control_text_embeds"):
            if dynamic_batch:
                a[0] = "batch"
        else:  # (uncond_)encoder_hidden_states
            if dynamic_batch:
                a[0] = "batch"
            a[1] = "sequence"
        if a:
            axes[name] = a
    return axes


def export_onnx(pipe_or_model, spec: Optional[ModelSpec], path: str, *, opset: int = 17, dtype: str = "fp32",
                fp16_io: bool = False, dynamic_batch: bool = True, dynamic_hw: bool = False,
                cfg_folded: bool = False, batch: int = 1, height: Optional[int] = None,
                width: Optional[int] = None, external_data: Optional[bool] = None, check: bool = True,
                progress: bool = True) -> ExportResult:
    """Export a native UNet / DiT (a ``Pipeline``, or a model plus its ``ModelSpec``) to ONNX at ``path``.

    opset: 17 or 18. dtype: "fp32" | "fp16" (fp16 weights and activations; GroupNorm statistics stay
    float32). fp16_io: with dtype="fp16", float16 inputs / outputs instead of float32 ones (casts inside).
    dynamic_batch / dynamic_hw: symbolic batch / height-width axes (DiT: fixed resolution).
    cfg_folded: the classifier-free-guidance graph described in the module docstring.
    batch, height, width: the example shape traced and checked (default: the spec's sample size).
    external_data: weights in ``<path>.data`` (None: when the weights exceed ~1.8 GB).
    check: run ONNX Runtime (CPU) against PyTorch float32 and report the max error.
    The file appears at ``path`` only when everything succeeded (written atomically).
    """
    import onnx

    t_start = time.perf_counter()
    model, spec = _unpack(pipe_or_model, spec)
    if opset not in OPSETS:
        raise BadArgumentError(f"opset must be one of {OPSETS}, found {opset!r}")
    if dtype not in DTYPES:
        raise BadArgumentError(f"dtype must be one of {tuple(DTYPES)}, found {dtype!r}")
    if fp16_io and dtype != "fp16":
        raise BadArgumentError("fp16_io=True (--fp16-io) needs dtype='fp16' (--dtype fp16): an fp32 graph has fp32 "
                               "inputs / outputs")
    from fastdiff.utils.checks import export_sizes

    export_sizes(batch, height, width)
    if spec.kind not in ("unet", "dit", "mmdit", "flux"):
        raise UnsupportedConfigError("kind", spec.kind, supported=["unet", "dit", "mmdit", "flux"], model="ONNX exporter")
    from fastdiff.utils.atomic import check_file_path, usual_permissions

    path = os.fspath(path)
    parent = check_file_path(path)  # a folder, a missing or unwritable one: refused before any work
    h = int(spec.sample_size[0] if height is None else height)
    w = int(spec.sample_size[1] if width is None else width)
    if spec.kind == "dit":
        if dynamic_hw:
            raise BadArgumentError("dynamic_hw=True (--dynamic-hw) is not possible for a DiT: its position table "
                                   f"fixes the resolution ({spec.sample_size[0]}x{spec.sample_size[1]})")
        if (h, w) != tuple(spec.sample_size):
            raise BadArgumentError(f"a DiT exports at its own resolution {spec.sample_size[0]}x{spec.sample_size[1]}, "
                                   f"found height={h} width={w} (--height / --width)")
    cond = conditioning(model, spec)
    if cfg_folded:
        if cond is None:
            raise BadArgumentError("cfg_folded=True (--cfg-folded) needs a conditional model (text or class "
                                   "labels); this one is unconditional")
        if spec.num_classes and spec.null_class is None and not spec.low_res_noise:  # (an upscaler's class label,
            # the noise level, is both passes')
            raise BadArgumentError("cfg_folded=True (--cfg-folded) for a class-conditional model needs "
                                   "spec.null_class (the unconditional label); this model has none")
    out_ch = _out_channels(model, spec)
    io = graph_io(model, spec, cfg_folded=cfg_folded, fp16_io=fp16_io, dtype=dtype,
                  dynamic_batch=dynamic_batch, dynamic_hw=dynamic_hw, out_channels=out_ch)

    bar = _Progress(progress, total=4, desc=f"export {os.path.basename(path)}")
    modes: dict = {}  # (each module's train / eval mode, put back after: the traced model may be the caller's)
    try:
        compute = DTYPES[dtype]
        device = next(iter(model.parameters()), torch.empty(0)).device
        ref_model = model
        if next(iter(model.parameters()), torch.empty(0)).dtype != compute:
            ref_model = copy.deepcopy(model).to(compute)  # never change the caller's model
        io_dtype = torch.float16 if io["inputs"][0][1] == "float16" else torch.float32
        names = cond_inputs(cond, spec, io["control"], io["ip_adapters"])
        if cfg_folded:
            wrapper = _CFGGraphModule(ref_model, names, compute, io_dtype, io["guided_channels"], spec.null_class)
        else:
            wrapper = _GraphModule(ref_model, names, compute, io_dtype)
        modes.update((m, m.training) for m in ref_model.modules())
        wrapper.eval()
        # Trace at batch >= 2 so that nothing batch-1 specific (an expand of a size-1 axis) is baked in.
        trace_b = max(batch, 2) if dynamic_batch else batch
        example = _example_inputs(spec, io, trace_b, h, w, device)
        names = [n for n, _ in io["inputs"]]

        with tempfile.TemporaryDirectory(prefix=".fastdiff-export-", dir=parent) as tmp:
            raw = os.path.join(tmp, "raw.onnx")
            bar.set("trace + export")
            with _native_ops(ref_model), torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    _torch_export(wrapper, tuple(example[n] for n in names), raw, opset, names,
                                  _dynamic_axes(io, dynamic_batch, dynamic_hw))
                except FastdiffError:
                    raise
                except Exception as e:
                    raise UnsupportedConfigError(
                        "model", type(model).__name__,
                        supported=f"a traceable native UNet / DiT; torch.onnx.export failed: "
                                  f"{e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                        model="ONNX exporter") from e
            bar.update()

            bar.set("validate")
            proto = onnx.load(raw)  # pulls in any external data torch wrote
            # the exporter drops an input the graph never reads (a pooling ControlNet's control_guess): the stored
            # interface lists the graph's own
            kept = {i.name for i in proto.graph.input}
            io["inputs"] = [entry for entry in io["inputs"] if entry[0] in kept]
            # a graph traced at a fixed height / width other than the spec's runs at that size only: its stored
            # spec says so, so a pipeline loaded from it samples at the size the graph takes
            stored = spec if dynamic_hw or (h, w) == tuple(spec.sample_size) else \
                dataclasses.replace(spec, sample_size=(h, w))
            _set_metadata(proto, stored, io, opset)
            weight_bytes = sum(_tensor_nbytes(t) for t in proto.graph.initializer)
            use_ext = weight_bytes > EXTERNAL_DATA_THRESHOLD if external_data is None else bool(external_data)
            staged = os.path.join(tmp, os.path.basename(path))
            data_name = os.path.basename(path) + ".data"
            if use_ext:
                onnx.save_model(proto, staged, save_as_external_data=True, all_tensors_to_one_file=True,
                                location=data_name, size_threshold=1024)
                onnx.checker.check_model(staged, full_check=True)  # path form: no 2 GB limit
            else:
                onnx.checker.check_model(proto, full_check=True)
                onnx.save_model(proto, staged)
            del proto
            bar.update()

            max_abs = max_rel = None
            note = "skipped (check=False)"
            if check:
                bar.set("parity vs PyTorch")
                max_abs, max_rel, note = _parity(staged, model, spec, io, batch=batch, h=h, w=w)
            bar.update()

            bar.set("write")
            files = [path] + ([path + ".data"] if use_ext else [])
            if use_ext:
                _install_with_data(staged, os.path.join(tmp, data_name), path, os.path.join(tmp, "previous"))
            else:
                usual_permissions(staged, 0o666)
                os.replace(staged, path)
            if not use_ext and os.path.exists(path + ".data"):
                with contextlib.suppress(OSError):  # a stale data file of an earlier large export, once no graph
                    os.remove(path + ".data")       # at the path needs it
            bar.update()
    finally:
        bar.close()
        for m, training in modes.items():
            m.training = training
    size = sum(os.path.getsize(f) for f in files)
    return ExportResult(path=path, size_bytes=size, seconds=time.perf_counter() - t_start, max_abs_err=max_abs,
                        max_rel_err=max_rel, check_note=note, files=files, io=io)


def _install_with_data(staged: str, staged_data: str, path: str, aside_dir: str) -> None:
    """A graph and its external-data file into place. Two renames cannot be one atomic step, so the previous export
    (graph and data) is first set aside, in a folder of its own (a graph named previous.onnx must not land on the
    staged one): an interruption at any point puts both of its files back, and neither the previous graph beside
    the new weights nor a lone data file is ever left."""
    from fastdiff.utils.atomic import usual_permissions

    os.makedirs(aside_dir, exist_ok=True)
    old_graph, old_data = os.path.join(aside_dir, "graph"), os.path.join(aside_dir, "data")
    new_data_in = False
    try:
        if os.path.exists(path):
            os.replace(path, old_graph)
        if os.path.exists(path + ".data"):
            os.replace(path + ".data", old_data)
        usual_permissions(staged_data, 0o666)  # (onnx writes it owner-only)
        os.replace(staged_data, path + ".data")
        new_data_in = True
        usual_permissions(staged, 0o666)
        os.replace(staged, path)
    except BaseException:
        if os.path.exists(old_data):  # (over the new weights, if they moved in)
            os.replace(old_data, path + ".data")
        elif new_data_in:  # the new weights, without their graph
            os.remove(path + ".data")
        if os.path.exists(old_graph):
            os.replace(old_graph, path)
        raise


def _torch_export(module, args, f, opset, names, dynamic_axes, output_names=("out_sample",)):
    kw = dict(opset_version=opset, input_names=names, output_names=list(output_names),
              dynamic_axes=dynamic_axes or None, do_constant_folding=True)
    try:
        torch.onnx.export(module, args, f, dynamo=False, **kw)
    except TypeError as e:  # torch < 2.5 has no dynamo= keyword; its default is the TorchScript exporter
        if "dynamo" not in str(e):
            raise
        torch.onnx.export(module, args, f, **kw)


def _tensor_nbytes(t) -> int:
    import numpy as np
    from onnx import helper

    if t.data_location == 1:  # EXTERNAL: length is in the external_data entries
        for kv in t.external_data:
            if kv.key == "length":
                return int(kv.value)
    n = 1
    for d in t.dims:
        n *= d
    return n * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize


def _set_metadata(proto, spec: ModelSpec, io: dict, opset: int) -> None:
    from fastdiff import __version__

    proto.producer_name = "fastdiff"
    proto.producer_version = __version__
    proto.doc_string = f"fastdiff {spec.kind} exported at opset {opset} ({io['dtype']})"
    meta = {
        META_VERSION: __version__,
        META_SPEC: json.dumps(spec.to_dict(), sort_keys=True),
        META_IO: json.dumps(dict(io, opset=opset), sort_keys=True),
        "prediction_type": spec.prediction_type,
        "scheduler": json.dumps(spec.scheduler, sort_keys=True),
        "model_kind": spec.kind,
    }
    del proto.metadata_props[:]
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    # the output's channels (and height / width unless dynamic) are fixed; torch's exporter can leave them symbols
    # (after the CFG-folded graph's concatenation), which consumers would take for dynamic axes
    fixed = {1: int(io["out_channels"])}
    fixed.update({2: "height", 3: "width"} if io["dynamic_hw"] else dict(zip((2, 3), map(int, spec.sample_size))))
    for out in proto.graph.output:
        dims = out.type.tensor_type.shape.dim
        if out.name == "out_sample" and len(dims) == 4:
            for axis, size in fixed.items():
                if isinstance(size, int):
                    dims[axis].dim_value = size
                else:
                    dims[axis].dim_param = size


def _read_metadata(path_or_bytes) -> dict:
    import onnx

    if isinstance(path_or_bytes, (bytes, bytearray)):
        try:
            proto = onnx.load_from_string(bytes(path_or_bytes))
        except Exception as e:
            raise CorruptCheckpointError(f"expected an ONNX model, found {len(path_or_bytes)} bytes in memory onnx "
                                         f"cannot parse ({e.__class__.__name__}): damaged, or not ONNX") from e
        if not proto.graph.node and not proto.metadata_props:
            raise CorruptCheckpointError(f"expected an ONNX model, found {len(path_or_bytes)} bytes in memory holding "
                                         f"no graph: empty or truncated")
    else:
        path = os.fspath(path_or_bytes)
        if not os.path.isfile(path):
            raise BadArgumentError(f"no such ONNX file: {path}")
        try:
            proto = onnx.load(path, load_external_data=False)
        except Exception as e:
            raise CorruptCheckpointError(f"{path}: expected an ONNX model, found {os.path.getsize(path)} bytes onnx "
                                         f"cannot parse ({e.__class__.__name__}): damaged, or not ONNX") from e
        if not proto.graph.node and not proto.metadata_props:  # protobuf parses an empty file as an empty model
            raise CorruptCheckpointError(f"{path}: expected an ONNX model, found {os.path.getsize(path)} bytes "
                                         f"holding no graph: empty or truncated")
    return {p.key: p.value for p in proto.metadata_props}


def read_onnx_spec(path_or_bytes) -> ModelSpec:
    """The ModelSpec stored by ``export_onnx`` (BadArgumentError for an ONNX file fastdiff did not write)."""
    meta = _read_metadata(path_or_bytes)
    if META_SPEC not in meta:
        raise BadArgumentError("expected an ONNX model exported by fastdiff (metadata_props "
                               f"'{META_SPEC}'), found metadata keys {sorted(meta)}")
    stored = _metadata_json(meta, META_SPEC)
    try:
        return ModelSpec.from_dict(stored)
    except (TypeError, KeyError, ValueError) as e:
        raise CorruptCheckpointError(f"ONNX metadata {META_SPEC!r}: expected the model spec fastdiff wrote, found "
                                     f"one that does not read ({e.__class__.__name__}: {e})") from e


def read_onnx_io(path_or_bytes) -> dict:
    """The graph interface stored by ``export_onnx`` (inputs, dtypes, cfg_folded, ...), or {}."""
    meta = _read_metadata(path_or_bytes)
    return _metadata_json(meta, META_IO) if META_IO in meta else {}


def _metadata_json(meta: dict, key: str) -> dict:
    try:
        value = json.loads(meta[key])
    except json.JSONDecodeError as e:
        raise CorruptCheckpointError(f"ONNX metadata {key!r}: expected the JSON object fastdiff wrote, found text "
                                     f"that does not parse ({e})") from e
    if not isinstance(value, dict):
        raise CorruptCheckpointError(f"ONNX metadata {key!r}: expected a JSON object, found {type(value).__name__}")
    return value


# ---------------------------------------------------------------------------------------------------
# Parity check
# ---------------------------------------------------------------------------------------------------

def reference_output(model: nn.Module, spec: ModelSpec, io: dict, feeds: dict) -> torch.Tensor:
    """What the exported graph should return for ``feeds``, computed by the PyTorch model (two passes
    for a CFG-folded graph). Runs in the model's own dtype and device; returns float32 on the CPU."""
    p = next(iter(model.parameters()), torch.empty(0))
    dev, dt = p.device, p.dtype
    names = [n for n, _ in io["inputs"] if n not in ("sample", "timestep", "guidance_scale")
             and not n.startswith("uncond_")]  # the conditional inputs, as the graph names them

    def run(conds: dict):
        x = feeds["sample"].to(dev, dt)
        t = feeds["timestep"].reshape(-1).expand(x.shape[0]).to(dev)
        return call_network(model, x, t, {k: v.to(dev) for k, v in conds.items()}, dt).float().cpu()

    with torch.no_grad(), _native_ops(model):
        c = run({k: feeds[k] for k in names})
        if not io["cfg_folded"]:
            return c
        u = run({k: torch.full_like(feeds[k], io["null_class"]) if k == "class_labels" and io["null_class"] is not None
                 else feeds[k if k in SHARED_INPUTS or k == "class_labels" else "uncond_" + k] for k in names})
        g = io["guided_channels"]
        s = feeds["guidance_scale"].float().reshape(-1, 1, 1, 1)
        return torch.cat([u[:, :g] + s * (c[:, :g] - u[:, :g]), c[:, g:]], dim=1)


def _parity(onnx_path, model, spec, io, batch, h, w):
    """(max_abs, max_rel, note): ONNX Runtime CPU vs the PyTorch model in float32."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return None, None, "skipped: onnxruntime not installed"
    from fastdiff.runtime.onnxruntime_runner import OnnxRuntimeRunner

    try:
        # no spinning: the PyTorch reference runs on the same cores right after
        runner = OnnxRuntimeRunner(onnx_path, device="cpu", spinning=False)
    except BackendUnavailableError as e:
        return None, None, f"skipped: {e}"
    feeds = _example_inputs(spec, io, batch, h, w, "cpu", seed=1)
    # The oracle is the float32 model whatever the graph's precision: the error includes fp16 rounding.
    ref_model = model
    if next(iter(model.parameters()), torch.empty(0)).dtype != torch.float32:
        ref_model = copy.deepcopy(model).float()
    ref = reference_output(ref_model, spec, io, {k: v.float() if v.is_floating_point() else v
                                                 for k, v in feeds.items()})
    try:
        out = runner.run_feeds(feeds).float().cpu()
    except BackendUnavailableError as e:
        return None, None, f"skipped: {e}"
    if not torch.isfinite(out).all():  # (an fp16 graph whose activations overflow): refused, nothing written
        where = "the PyTorch float32 model too" if not torch.isfinite(ref).all() else "PyTorch float32 does not"
        raise BadArgumentError(f"the exported graph gives non-finite outputs ({io['dtype']}; {where}): expected "
                               f"finite values; export fp32, or check the weights")
    err = (out.double() - ref.double()).abs().max().item()
    rel = err / max(ref.double().abs().max().item(), 1e-30)
    return err, rel, f"ONNX Runtime CPU vs PyTorch float32, batch {batch}, {h}x{w}"


# ---------------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------------

class _Progress:
    """A tqdm bar over the export stages (stderr); silent when disabled or tqdm is missing."""

    def __init__(self, enabled: bool, total: int, desc: str):
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc=desc, unit="step", leave=False,
                                bar_format="{desc}: {n_fmt}/{total_fmt} [{elapsed}] {postfix}")
            except ImportError:  # pragma: no cover
                self.bar = None

    def set(self, stage: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(stage)

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


__all__ = ["ExportResult", "export_onnx", "read_onnx_spec", "read_onnx_io", "reference_output", "graph_io",
           "OPSETS", "DTYPES"]
