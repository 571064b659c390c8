"""Runners: the network callable a Pipeline's sampler calls, built once from an ``OptimizeConfig``.

Every runner has the native signature ``runner(x, timestep, class_labels=None,
encoder_hidden_states=None) -> Tensor``, so samplers and denoisers never know which one they call.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch

from ..errors import BackendUnavailableError
from ..models.layers import set_backend
from .config import OptimizeConfig


def prepare_model(model: torch.nn.Module, config: OptimizeConfig, device: torch.device) -> torch.nn.Module:
    """dtype, memory format and fused-op backend applied to a copy-free model (in place)."""
    if config.torch_dtype is not None:
        model = model.to(config.torch_dtype)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    set_backend(model, "triton" if config.backend == "triton" else
                ("auto" if config.backend == "compile" and device.type == "cuda" else "native"))
    if config.fuse_qkv:
        from ..models.fuse import fuse_qkv

        fuse_qkv(model)
    return model


def build_runner(pipe, config: OptimizeConfig, graph_factory=None) -> tuple[Callable, list[str]]:
    """(network callable, notes) for ``config``; an explicitly requested backend that cannot run raises."""
    notes: list[str] = []
    device = pipe.device
    backend = config.backend
    if backend in ("eager", "triton", "compile"):
        model = prepare_model(pipe.model, config, device)
        pipe.model = model
        runner: Callable = model
        if backend == "compile":
            runner = torch.compile(model, fullgraph=True, dynamic=False, mode=config.compile_mode)
        if config.channels_last:
            inner = runner
            runner = lambda x, *a, **k: inner(x.contiguous(memory_format=torch.channels_last), *a, **k)  # noqa: E731
    elif backend == "onnxruntime":
        try:
            from .onnxruntime_runner import OnnxRuntimeRunner
        except ImportError as e:
            raise BackendUnavailableError(f"backend 'onnxruntime' was requested but {e}") from e
        dtype = config.dtype or "fp32"
        runner = OnnxRuntimeRunner.from_pipeline(pipe, dtype=dtype)
    elif backend == "tensorrt":
        try:
            from .tensorrt_runner import TensorRTRunner
        except ImportError as e:
            raise BackendUnavailableError(f"backend 'tensorrt' was requested but {e}") from e
        runner = TensorRTRunner.from_pipeline(pipe, dtype=config.dtype or "fp16", buckets=config.batch_buckets)
    else:  # pragma: no cover - OptimizeConfig validates
        raise BackendUnavailableError(backend)

    if config.cuda_graphs:
        if graph_factory is None and (device.type != "cuda" or not torch.cuda.is_available()):
            notes.append("cuda_graphs ignored: no CUDA device (graphs need one)")
        elif config.graph_scope == "step":
            from .graphs import GraphedNetwork

            runner = GraphedNetwork(runner, config.batch_buckets, config.max_graphs, graph_factory=graph_factory)
        # graph_scope="loop" is applied by the Pipeline around the whole sampling loop.
    return runner, notes


def clone_for_export(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model)
