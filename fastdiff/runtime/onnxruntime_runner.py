"""Run an exported ONNX graph with ONNX Runtime, as a drop-in for the native model.

``runner = OnnxRuntimeRunner("unet.onnx")`` is called like the network it came from::

    runner(x, timestep, class_labels=None, encoder_hidden_states=None, text_embeds=None, time_ids=None) -> Tensor

(a CFG-folded graph also takes ``uncond_encoder_hidden_states=`` (``uncond_text_embeds=`` / ``uncond_time_ids=``)
and ``guidance_scale=``). Inputs are
cast to what the graph declares (an fp16 graph with fp32 IO takes float32; an fp16-IO graph gets
float16), timesteps are broadcast to one per sample, a missing class label becomes the null class, and
the output comes back in ``x``'s dtype on ``x``'s device.

Device: the CUDA execution provider with IO binding (torch tensors bound by pointer, no host copy)
when torch sees a GPU, the CPU provider otherwise. The GPU is detected with ``torch.cuda.is_available()``
and not with ONNX Runtime's provider list, which names CUDA whenever onnxruntime-gpu is installed, GPU
or not. Asking for ``device="cuda"`` without onnxruntime-gpu raises BackendUnavailableError.
"""

from __future__ import annotations

import os
import tempfile
from typing import Optional

import numpy as np
import torch

from ..errors import BackendUnavailableError, BadArgumentError

_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
       "tensor(int32)": np.int32, "tensor(double)": np.float64}
_TORCH = {np.float32: torch.float32, np.float16: torch.float16, np.int64: torch.int64, np.int32: torch.int32,
          np.float64: torch.float64}


def _import_ort():
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise BackendUnavailableError("backend 'onnxruntime' was requested but onnxruntime is not installed "
                                      "(pip install onnxruntime, or onnxruntime-gpu on a CUDA machine)") from e
    return ort


class OnnxRuntimeRunner:
    """An ONNX Runtime session that behaves like ``model(x, timestep, class_labels, encoder_hidden_states)``.

    path_or_bytes: an ``.onnx`` path (external data beside it is found) or the serialized model.
    device: "cpu", "cuda", "cuda:N" or None (CUDA when torch sees a GPU, else CPU).
    threads: intra-op threads for the CPU provider (None: ONNX Runtime's default, all cores).
    spinning: let idle ONNX Runtime threads spin (lowest latency; turn off when torch shares the cores).
    """

    def __init__(self, path_or_bytes, device=None, *, threads: Optional[int] = None, spinning: bool = True,
                 spec=None):
        ort = _import_ort()
        from fastdiff.export.onnx import read_onnx_io, read_onnx_spec

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise BadArgumentError(f"OnnxRuntimeRunner: expected device 'cpu' or 'cuda[:N]', found {device!r}")
        src = path_or_bytes if isinstance(path_or_bytes, (bytes, bytearray)) else os.fspath(path_or_bytes)
        if isinstance(src, str) and not os.path.isfile(src):
            raise BadArgumentError(f"OnnxRuntimeRunner: no such ONNX file: {src}")
        self.io = read_onnx_io(src)
        try:
            self.spec = spec if spec is not None else read_onnx_spec(src)
        except BadArgumentError:
            self.spec = None  # a foreign ONNX file: still runnable by input names
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            opts.intra_op_num_threads = int(threads)
        if not spinning:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        opts.log_severity_level = 3
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise BackendUnavailableError("OnnxRuntimeRunner: device 'cuda' was requested but torch sees no GPU")
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendUnavailableError(
                    "backend 'onnxruntime' on cuda needs onnxruntime-gpu (the installed onnxruntime offers "
                    f"{ort.get_available_providers()})")
            idx = self.device.index if self.device.index is not None else torch.cuda.current_device()
            self.device = torch.device("cuda", idx)
            providers = [("CUDAExecutionProvider", {"device_id": idx}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(bytes(src) if isinstance(src, (bytes, bytearray)) else src,
                                                sess_options=opts, providers=providers)
        except Exception as e:
            if "external data" in str(e).lower():  # the weights file beside a large graph is missing or damaged
                from ..errors import CorruptCheckpointError

                what = f"an ONNX graph of {len(src)} bytes in memory" if isinstance(src, (bytes, bytearray)) else src
                raise CorruptCheckpointError(f"{what}: expected its weights in the external data file beside it (a "
                                             f"graph with external data opens from its path), which ONNX Runtime "
                                             f"cannot read: {str(e).strip().splitlines()[0]}") from e
            raise
        self.inputs = {i.name: _NP.get(i.type, np.float32) for i in self.session.get_inputs()}
        # the fixed sizes of each input (None where the axis is symbolic), to refuse a feed the graph cannot take
        self.input_shapes = {i.name: tuple(d if isinstance(d, int) else None for d in i.shape)
                             for i in self.session.get_inputs()}
        self.outputs = [(o.name, _NP.get(o.type, np.float32)) for o in self.session.get_outputs()]
        self.cfg_folded = "guidance_scale" in self.inputs
        self._tmpdir = None  # set by from_pipeline: the temp folder holding the exported file

    # -----------------------------------------------------------------------------------------------
    @classmethod
    def from_pipeline(cls, pipe, device=None, *, threads: Optional[int] = None, **export_kwargs):
        """Export ``pipe`` to a temporary ONNX file (kept while the runner lives) and open it.

        export_kwargs go to ``fastdiff.export.onnx.export_onnx`` (dtype, opset, cfg_folded, ...);
        the parity check and progress bar are off unless asked for.
        """
        from fastdiff.export.onnx import export_onnx

        export_kwargs.setdefault("check", False)
        export_kwargs.setdefault("progress", False)
        tmp = tempfile.TemporaryDirectory(prefix="fastdiff-onnx-")
        try:
            res = export_onnx(pipe, None, os.path.join(tmp.name, "model.onnx"), **export_kwargs)
            runner = cls(res.path, device=device, threads=threads, spec=pipe.spec)
        except BaseException:
            tmp.cleanup()
            raise
        runner._tmpdir = tmp
        runner.export_result = res
        return runner

    def close(self) -> None:
        self.session = None
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None

    # -----------------------------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, timestep, class_labels=None, encoder_hidden_states=None, text_embeds=None,
                 time_ids=None, *, uncond_encoder_hidden_states=None, guidance_scale=None, **added) -> torch.Tensor:
        feeds = build_feeds(self.inputs, self.spec, x, timestep, class_labels, encoder_hidden_states,
                            uncond_encoder_hidden_states, guidance_scale, text_embeds=text_embeds, time_ids=time_ids,
                            **added)
        return self.run_feeds(feeds).to(x.device, x.dtype)

    def run_feeds(self, feeds: dict) -> torch.Tensor:
        """Run with inputs by graph name (torch tensors); returns the first output as a torch tensor."""
        missing = sorted(set(self.inputs) - set(feeds))
        if missing:
            raise BadArgumentError(f"ONNX graph inputs {sorted(self.inputs)} expected, missing {missing}")
        for name, fixed in self.input_shapes.items():
            found = tuple(feeds[name].shape)
            if len(found) != len(fixed) or any(f is not None and f != d for f, d in zip(fixed, found)):
                want = "x".join("N" if f is None else str(f) for f in fixed) or "a scalar"
                guided = bool(found and fixed and fixed[0] is not None and found[0] == 2 * fixed[0])
                raise BadArgumentError(f"ONNX graph input {name!r}: expected shape {want} (fixed when it was "
                                       f"exported), found {'x'.join(map(str, found)) or 'a scalar'}; export with "
                                       f"dynamic axes (or at this size) to run it" + (
                                           f" (a guided run feeds both passes as one batch, 2 x its samples: for "
                                           f"{fixed[0]} guided sample(s), export at batch {2 * fixed[0]}, with "
                                           f"cfg_folded, or with a dynamic batch)" if guided else ""))
        if self.session is None:
            raise BadArgumentError("this OnnxRuntimeRunner was closed")
        if self.device.type == "cuda":
            return self._run_cuda(feeds)
        # cast in torch, then hand to NumPy: NumPy has no bfloat16 (a bf16 pipeline feeds bf16 tensors)
        arrays = {n: cast_input(feeds[n], "cpu", _TORCH[dt]).numpy() for n, dt in self.inputs.items()}
        out = self.session.run([self.outputs[0][0]], arrays)[0]
        return torch.from_numpy(out)

    def _run_cuda(self, feeds: dict) -> torch.Tensor:
        """IO binding: ONNX Runtime reads the torch tensors in place and writes into a torch tensor."""
        dev = self.device
        binding = self.session.io_binding()
        keep = []
        for name, dt in self.inputs.items():
            t = cast_input(feeds[name], dev, _TORCH[dt]).contiguous()
            keep.append(t)
            binding.bind_input(name, "cuda", dev.index, dt, tuple(t.shape), t.data_ptr())
        name, dt = self.outputs[0]
        x = feeds["sample"]
        if self.io.get("out_channels"):
            # The output shape is known (B, C_out, H, W): ONNX Runtime writes straight into a torch tensor.
            out = torch.empty((x.shape[0], self.io["out_channels"], *x.shape[2:]), dtype=_TORCH[dt], device=dev)
            binding.bind_output(name, "cuda", dev.index, dt, tuple(out.shape), out.data_ptr())
        else:  # a foreign graph: let ONNX Runtime allocate, then copy
            out = None
            binding.bind_output(name, "cuda", dev.index)
        torch.cuda.current_stream(dev).synchronize()  # inputs written on torch's stream are ready
        self.session.run_with_iobinding(binding)  # synchronous for the CUDA provider
        if out is None:
            ort_out = binding.get_outputs()[0]
            view = torch.as_tensor(_CudaArray(ort_out.data_ptr(), tuple(ort_out.shape()), _TORCH[dt]), device=dev)
            out = view.clone()
        del keep
        return out

    def __repr__(self) -> str:
        kind = self.spec.kind if self.spec is not None else "onnx"
        return (f"OnnxRuntimeRunner({kind}, {self.device}, providers={self.session.get_providers()}, "
                f"dtype={self.io.get('dtype', '?')}, cfg_folded={self.cfg_folded})")


# the graph's tensor inputs a caller hands over as they are: text states and SDXL's micro-conditioning
_PASSED_INPUTS = ("encoder_hidden_states", "text_embeds", "time_ids", "guidance", "image_latents", "control_image",
                  "control_scale", "control_guess", "control_mode", "control_encoder_hidden_states",
                  "control_text_embeds")
_CONTROLLED = "exported with its ControlNet"
_INPUT_KINDS = {"control_image": (_CONTROLLED, "(B, 3, fH, fW), or an SD3 / FLUX.1 ControlNet's latents"),
                "control_scale": (_CONTROLLED, "(B,), or (B, K) for K ControlNets"),
                "control_mode": ("exported with a FLUX.1 Union ControlNet", "(B,) int64"),
                "control_encoder_hidden_states": ("exported with a FLUX.1 ControlNet", "(B, L, D)"),
                "control_text_embeds": ("exported with a FLUX.1 ControlNet", "(B, P)"),
                "control_guess": (_CONTROLLED, "(B,)"), "encoder_hidden_states": ("text-conditioned", "(B, L, D)"),
                "text_embeds": ("conditioned on a pooled text embedding", "(B, P)"),
                "time_ids": ("SDXL-style", "(B, N)"), "guidance": ("guidance-distilled (Flux dev)", "(B,)"),
                "image_latents": ("an inpainting network (FLUX.1 Depth / Canny: the control latents; a guided-diffusion "
                                  "upsampler: its low-resolution image, upsampled; Stable Diffusion's x4 upscaler: "
                                  "its noised image)", "(B, K, H, W)")}


def build_feeds(input_names, spec, x: torch.Tensor, timestep, class_labels=None, encoder_hidden_states=None,
                uncond_encoder_hidden_states=None, guidance_scale=None, **added) -> dict:
    """The native model's call arguments -> graph inputs by name (torch tensors on ``x``'s device).

    ``added``: ``text_embeds`` / ``time_ids`` of an SDXL-style graph (``text_embeds`` of SD3 / Flux, ``guidance`` of
    Flux dev), and their ``uncond_`` forms for a CFG-folded one. Shared by the ONNX Runtime and TensorRT runners. Timesteps become one per sample; a missing
    class label becomes the spec's null class; arguments the graph has no input for are refused, as the
    native model refuses them. Dtypes are left to the runner.
    """
    names = set(input_names)
    b = x.shape[0]
    feeds = {"sample": x}
    t = _per_sample("timestep", torch.as_tensor(timestep, device=x.device), b)
    feeds["timestep"] = t.expand(b)
    if "class_labels" in names:
        if class_labels is None:
            null = None if spec is None else spec.null_class
            if null is None:
                raise BadArgumentError("this graph is class-conditional: expected class_labels, found None "
                                       "(and the model has no null class)")
            class_labels = torch.full((b,), null, dtype=torch.long, device=x.device)
        feeds["class_labels"] = _per_sample("class_labels", torch.as_tensor(class_labels, device=x.device), b).expand(b)
    elif class_labels is not None:
        raise BadArgumentError("this graph has no class_labels input, but class_labels were given")
    added = _image_prompt_feeds(feeds, names, added)
    unknown = sorted(set(added) - {p + n for n in _PASSED_INPUTS[1:] for p in ("", "uncond_")})
    if unknown:
        raise BadArgumentError(f"unexpected graph argument(s) {unknown}; expected among class_labels, "
                               f"{', '.join(_PASSED_INPUTS)} and their uncond_ forms, guidance_scale")
    given = dict(added, encoder_hidden_states=encoder_hidden_states,
                 uncond_encoder_hidden_states=uncond_encoder_hidden_states)
    if "control_guess" not in names:  # (a pooling ControlNet ignores guess mode: the exporter drops the unused input)
        given.pop("control_guess", None)
    # (a FLUX.1 ControlNet reads its pass's own text unless true CFG hands it the conditional text)
    for name, own in (("control_encoder_hidden_states", encoder_hidden_states),
                      ("control_text_embeds", added.get("text_embeds"))):
        if name in names and given.get(name) is None:
            given[name] = own
    _pass(feeds, names, given, _PASSED_INPUTS, "")
    if "guidance_scale" in names:
        if guidance_scale is None:
            raise BadArgumentError("this is a CFG-folded graph: expected guidance_scale=, found None")
        feeds["guidance_scale"] = _per_sample(
            "guidance_scale", torch.as_tensor(guidance_scale, dtype=torch.float32, device=x.device), b)
        _pass(feeds, names, given, _PASSED_INPUTS, "uncond_")
    elif guidance_scale is not None or any(given.get("uncond_" + n) is not None for n in _PASSED_INPUTS):
        raise BadArgumentError("guidance_scale / uncond_* inputs given, but this graph is not CFG-folded (export "
                               "with cfg_folded=True)")
    return feeds


def _image_prompt_feeds(feeds: dict, names: set, added: dict) -> dict:
    """IP-Adapter inputs into ``feeds``: ``image_embeds`` (one tensor, or one per adapter) and its ``uncond_`` form
    as ``image_embeds_<k>``, ``ip_scales`` as given (``fastdiff.models.ip_adapter.scale_vector``); returns the other
    arguments. A graph exported without adapters refuses them, one with them needs them; masks are refused (the
    graph has no mask input)."""
    added = dict(added)
    if any(added.pop(k, None) is not None for k in ("image_masks", "uncond_image_masks")):
        raise BadArgumentError("image_masks: IP-Adapter masks under an exported (ONNX Runtime / TensorRT) graph are "
                               "not supported (the graph has no mask input); run the eager / triton / compile "
                               "backends")
    count = sum(1 for n in names if n.startswith("image_embeds_"))
    scales = added.pop("ip_scales", None)
    for prefix in ("", "uncond_"):
        embeds = added.pop(prefix + "image_embeds", None)
        if embeds is None:
            if count and (prefix == "" or "guidance_scale" in names):
                raise BadArgumentError(f"this graph was exported with {count} IP-Adapter(s): expected {prefix}"
                                       f"image_embeds (one (B, N, ...) tensor of image features per adapter), found "
                                       f"None")
            continue
        embeds = list(embeds) if isinstance(embeds, (list, tuple)) else [embeds]
        if len(embeds) != count:
            raise BadArgumentError(f"{prefix}image_embeds: this graph takes {count} IP-Adapter(s)' image features, "
                                   f"found {len(embeds)}" + (" (export it with the pipeline's IP-Adapters loaded)"
                                                             if not count else ""))
        feeds.update((f"{prefix}image_embeds_{k}", e) for k, e in enumerate(embeds))
    if count:
        if scales is None:
            raise BadArgumentError("this graph was exported with IP-Adapters: expected ip_scales (every layer's "
                                   "adapter scales, fastdiff.models.ip_adapter.scale_vector), found None")
        feeds["ip_scales"] = scales
    elif scales is not None:
        raise BadArgumentError("this graph has no ip_scales input (no IP-Adapter), but ip_scales was given")
    return added


def cast_input(value, device, dtype: torch.dtype) -> torch.Tensor:
    """A feed in the graph input's device and dtype. Floats bound for an integer input (a learned timestep table's
    int64 timestep) are rounded first, as the native UNet rounds them: a plain cast would truncate 499.7 to 499."""
    t = torch.as_tensor(value).detach()
    if t.is_floating_point() and not dtype.is_floating_point:
        t = t.round()
    return t.to(device, dtype)


def _per_sample(name: str, value: torch.Tensor, batch: int) -> torch.Tensor:
    """``value`` as a (1,) or (batch,) vector; any other count is refused by name (ONNX Runtime's own error would
    name an internal node)."""
    flat = value.reshape(-1)
    if flat.numel() not in (1, batch):
        raise BadArgumentError(f"{name}: expected one value or one per sample ({batch}), found "
                               f"{tuple(value.shape)}")
    return flat


def _pass(feeds: dict, names: set, given: dict, inputs: tuple, prefix: str) -> None:
    """Copy ``prefix + name`` from ``given`` into ``feeds`` for each of ``inputs`` the graph takes; a missing one, or
    one the graph lacks, is refused by name."""
    for name in (prefix + n for n in inputs):
        value = given.get(name)
        if name in names:
            if value is None:
                what = _INPUT_KINDS[name[len(prefix):]]
                raise BadArgumentError(f"this graph is {what[0]}: expected {name} {what[1]}, found None")
            feeds[name] = value
        elif value is not None:
            raise BadArgumentError(f"this graph has no {name} input, but {name} was given")


class _CudaArray:
    """A minimal ``__cuda_array_interface__`` so torch can view memory ONNX Runtime owns."""

    _TYPESTR = {torch.float32: "<f4", torch.float16: "<f2", torch.int64: "<i8", torch.int32: "<i4",
                torch.float64: "<f8"}

    def __init__(self, ptr: int, shape: tuple, dtype: torch.dtype):
        self.__cuda_array_interface__ = {"data": (ptr, False), "shape": shape,
                                         "typestr": self._TYPESTR[dtype], "version": 2, "strides": None}


__all__ = ["OnnxRuntimeRunner", "build_feeds", "cast_input"]
