"""Run a TensorRT engine built by ``fastdiff.export.tensorrt`` as a drop-in for the native model.

``runner = TensorRTRunner("unet.engine")`` is called like the network::

    runner(x, timestep, class_labels=None, encoder_hidden_states=None, text_embeds=None, time_ids=None) -> Tensor

Bindings are torch tensors (``set_tensor_address`` with their data pointers) and the engine runs with
``execute_async_v3`` on torch's current CUDA stream, so it orders with the surrounding torch work and
nothing synchronises the host.

CUDA graphs: the call does no host sync and no host-to-device copy when every argument is already a
CUDA tensor of the engine's dtype (a Python-number timestep is copied from the host: pass a CUDA
tensor inside a capture). Run it once outside the capture (TensorRT initialises lazily), then::

    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = runner(static_x, static_t, encoder_hidden_states=static_ctx)
    g.replay()   # re-runs the engine on whatever static_x / static_t / static_ctx now hold

Temporaries allocated inside the capture come from the graph's private pool, so their addresses (and
those handed to TensorRT) stay valid for every replay.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from ..errors import BackendUnavailableError, BadArgumentError


def _torch_dtype(trt, dt):
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
             trt.int64: torch.int64, trt.bool: torch.bool}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    if dt not in table:
        raise BackendUnavailableError(f"TensorRT tensor dtype {dt} has no torch equivalent here")
    return table[dt]


class TensorRTRunner:
    """A deserialized engine + execution context, callable like the native model.

    engine_path: the engine file; its sidecar JSON (``<engine>.json``) is checked against this machine
        (TensorRT version, GPU, and the ONNX file's hash when ``onnx_path`` is given): a stale engine is
        refused with what differs (``from_onnx`` rebuilds instead).
    device: a CUDA device (default: the current one).
    """

    def __init__(self, engine_path: str, device=None, *, onnx_path: Optional[str] = None, check: bool = True):
        from fastdiff.export.tensorrt import engine_status, read_sidecar, require_tensorrt

        trt = require_tensorrt()
        engine_path = os.fspath(engine_path)
        if not os.path.isfile(engine_path):
            raise BadArgumentError(f"no such TensorRT engine: {engine_path}")
        if check:
            fresh, why = engine_status(engine_path, onnx_path)
            if not fresh:
                raise BadArgumentError(f"TensorRT engine {engine_path} cannot be used here: {why}; rebuild it "
                                       f"(TensorRTRunner.from_onnx or fastdiff export --format tensorrt)")
        self.device = torch.device(device if device is not None else "cuda", )
        if self.device.type != "cuda":
            raise BadArgumentError(f"TensorRTRunner: expected a CUDA device, found {device!r}")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        sidecar = read_sidecar(engine_path) or {}
        self.sidecar = sidecar
        self.io = sidecar.get("io") or {}
        self.spec = None
        if sidecar.get("spec"):
            from fastdiff.spec import ModelSpec

            self.spec = ModelSpec.from_dict(sidecar["spec"])
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with open(engine_path, "rb") as f, torch.cuda.device(self.device):
            self.engine = self._runtime.deserialize_cuda_engine(f.read())
            if self.engine is None:
                raise BadArgumentError(f"{engine_path}: TensorRT could not deserialize the engine (built by "
                                       f"another TensorRT version or for another GPU?)")
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_in = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.inputs = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names if is_in[n]}
        self.outputs = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names if not is_in[n]}
        if "out_sample" not in self.outputs:
            raise BadArgumentError(f"{engine_path}: expected an output named 'out_sample', found {list(self.outputs)}")
        self.cfg_folded = "guidance_scale" in self.inputs

    @classmethod
    def from_onnx(cls, onnx_path: str, engine_path: Optional[str] = None, device=None, **build_kwargs):
        """Build the engine if it is missing or stale (``build_engine(rebuild="auto")``), then open it."""
        from fastdiff.export.tensorrt import build_engine

        engine_path = engine_path or os.path.splitext(os.fspath(onnx_path))[0] + ".engine"
        build_engine(onnx_path, engine_path, **build_kwargs)
        return cls(engine_path, device=device, onnx_path=onnx_path)

    def __call__(self, x: torch.Tensor, timestep, class_labels=None, encoder_hidden_states=None, text_embeds=None,
                 time_ids=None, *, uncond_encoder_hidden_states=None, guidance_scale=None,
                 out: Optional[torch.Tensor] = None, **added):
        from .onnxruntime_runner import build_feeds

        feeds = build_feeds(self.inputs, self.spec, x, timestep, class_labels, encoder_hidden_states,
                            uncond_encoder_hidden_states, guidance_scale, text_embeds=text_embeds, time_ids=time_ids,
                            **added)
        result = self.run_feeds(feeds, out=out)
        return result if result.dtype == x.dtype else result.to(x.dtype)

    def run_feeds(self, feeds: dict, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Inputs by name (torch tensors) -> ``out_sample`` (a new tensor, or written into ``out``)."""
        from .onnxruntime_runner import cast_input

        ctx = self.context
        bound = []  # keep the (possibly converted) inputs alive until the work is enqueued
        for name, dt in self.inputs.items():
            if name not in feeds:
                raise BadArgumentError(f"engine inputs {sorted(self.inputs)} expected, missing {name!r}")
            t = feeds[name]
            if t.device != self.device or t.dtype != dt or not t.is_contiguous():
                t = cast_input(t, self.device, dt).contiguous()  # (rounds floats bound for an integer input)
            bound.append(t)
            if not ctx.set_input_shape(name, tuple(t.shape)):
                raise BadArgumentError(f"input {name!r} shape {tuple(t.shape)} is outside the engine's "
                                       f"optimisation profile {self.sidecar.get('profiles', {}).get(name)}")
            ctx.set_tensor_address(name, t.data_ptr())
        shape = tuple(ctx.get_tensor_shape("out_sample"))
        if out is None:
            out = torch.empty(shape, dtype=self.outputs["out_sample"], device=self.device)
        elif tuple(out.shape) != shape or out.dtype != self.outputs["out_sample"] or not out.is_contiguous():
            raise BadArgumentError(f"out: expected a contiguous {self.outputs['out_sample']} tensor of shape "
                                   f"{shape}, found {out.dtype} {tuple(out.shape)}")
        ctx.set_tensor_address("out_sample", out.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise BackendUnavailableError("TensorRT execute_async_v3 failed (see the TensorRT log)")
        for t in bound:  # the caching allocator must not hand these blocks out before the engine ran
            t.record_stream(stream)
        return out

    def __repr__(self) -> str:
        return (f"TensorRTRunner({self.sidecar.get('gpu', '?')}, TensorRT {self.sidecar.get('tensorrt', '?')}, "
                f"{self.sidecar.get('precision', '?')}, cfg_folded={self.cfg_folded})")


__all__ = ["TensorRTRunner"]
