"""Per-layer kernel choice by measurement: ``OptimizeConfig(kernel_ops="tune")``.

The measured table (``GPU_DEFAULT_OPS``) holds one winner per op, measured on one GPU at a few shapes. A
fused layer set to ``"tune"`` instead times every implementation it can run here (torch, Triton and its
variants, the CUDA extension) on its own first inputs, keeps the fastest for good, and from then on runs
like any other layer (``op_backends`` reports the choice). Attention at head dim 40 and at 64, or GroupNorm
at 64x64 and at 8x8, may so end up on different kernels, and an H100 may choose otherwise than an H200.

Timing is device time inside a CUDA graph, after warm-up calls (Triton compiles and autotunes there): that
is how the layers run under fastdiff's graphs, and timing eager calls would measure the launchers' host
cost instead. Layers with the same problem (op, input shapes, dtypes and strides) share one measurement.
The first call of each problem therefore costs a few captures: tuning is for long-lived pipelines, done in
the warm-up call that precedes any graph capture. Where it cannot measure (no CUDA input, or inside a
capture) a layer takes its fallback, the measured table's choice.
"""

from __future__ import annotations

import statistics
import threading
from typing import Callable, Optional

import torch

from ..errors import BackendUnavailableError

TUNE = "tune"
CALLS_PER_GRAPH = 5
_choices: dict = {}  # problem key -> (chosen backend, {backend: seconds})
_lock = threading.Lock()


def graph_device_time(fn: Callable[[], object]) -> float:
    """Median device seconds of one ``fn()`` call, replayed from a CUDA graph of ``CALLS_PER_GRAPH`` calls."""
    for _ in range(2):  # compile, autotune, allocate outside the graph
        fn()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS_PER_GRAPH):
            fn()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / CALLS_PER_GRAPH)
    del graph
    return statistics.median(times)


# timer(fn, backend, module) -> seconds; replaceable (tests measure with a stand-in on the CPU)
TIMER: Optional[Callable] = None


def _timer():
    return TIMER if TIMER is not None else (lambda fn, backend, module: graph_device_time(fn))


def _signature(value):
    if isinstance(value, torch.Tensor):
        return ("T", tuple(value.shape), value.dtype, tuple(value.stride()), value.device.type)
    if isinstance(value, (list, tuple)):
        return tuple(_signature(v) for v in value)
    return value if isinstance(value, (int, float, str, bool, type(None))) else type(value).__name__


def candidates(module) -> list[str]:
    """The module's backends that can run on this machine (FusedOp backend names: "native" for torch)."""
    from .layers import OP_IMPLS, triton_available

    out = []
    for impl in OP_IMPLS[module.op]:
        if impl.startswith("triton") and not triton_available()[0]:
            continue
        if impl == "cuda_ext":
            from .. import cuda_ext

            if not cuda_ext.HAS_CUDA_EXT:
                continue
        out.append("native" if impl == "torch" else impl)
    return out


def choose(module, args: tuple, kwargs: dict) -> str:
    """The backend ``module`` keeps, measured on (args, kwargs) unless a layer with the same problem already was.

    Sets ``module.backend`` (and ``module.tune_times``: seconds per backend, empty for a fallback)."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    measurable = TIMER is not None or (tensors and tensors[0].is_cuda and not torch.cuda.is_current_stream_capturing())
    if not measurable:
        module.backend, module.tune_times = module.tune_fallback, {}
        return module.backend
    key = (type(module).__name__, module.op, getattr(module, "sdpa_backend", None), _signature(args),
           _signature(tuple(sorted(kwargs.items()))))
    with _lock:
        known = _choices.get(key)
    if known is None:
        timer, times = _timer(), {}
        for backend in candidates(module):
            try:
                times[backend] = float(timer(lambda b=backend: module.run_backend(b, *args, **kwargs), backend, module))
            except torch.cuda.OutOfMemoryError:
                raise
            except (BackendUnavailableError, RuntimeError, ValueError):  # this implementation cannot run it
                continue
        chosen = min(times, key=times.get) if times else module.tune_fallback
        known = (chosen, times)
        with _lock:
            _choices.setdefault(key, known)
    module.backend, module.tune_times = known[0], dict(known[1])
    return module.backend


def clear() -> None:
    """Forget every measurement (a new device, or tests)."""
    with _lock:
        _choices.clear()
