"""Per-layer kernel choice by measurement: ``OptimizeConfig(kernel_ops="tune")``.

The measured table (``GPU_DEFAULT_OPS``) holds one winner per op, measured on one GPU at a few shapes. A
fused layer set to ``"tune"`` instead times every implementation it can run here (torch, Triton and its
variants, the CUDA extension) on each new problem it meets, and runs the fastest. Attention at head dim 40
and at 64, or GroupNorm at 64x64 and at 8x8, may so end up on different kernels, and an H100 may choose
otherwise than an H200. ``op_backends`` reports the choices.

- A problem is the layer's settings (``FusedOp.tune_key``: groups, eps, activation, ...) with its inputs'
  shapes, dtypes and strides. Layers with the same problem share one measurement; a layer that meets a new
  one (another batch bucket) measures again. The lookup costs a few microseconds of Python per call, paid
  only outside CUDA graphs (a replayed graph runs no Python).
- Timing is device time inside a CUDA graph, after warm-up calls (Triton compiles and autotunes there):
  that is how the layers run under fastdiff's graphs, and timing eager calls would measure the launchers'
  host cost instead. Inputs stay in L2 between the timed calls, as a layer's input does after the layer
  that wrote it.
- The fallback (the measured table's choice) is kept unless another implementation is faster by more than
  ``MARGIN``: near-ties do not flip kernels from one process to the next.
- Nothing is measured where it cannot be: no CUDA input, inside a capture (the warm-up call before every
  capture is where tuning happens), under ``torch.compile``; the fallback runs there.
- Measurements are serialised (one lock) and captured with ``capture_error_mode="thread_local"`` on the
  input's device, so an Engine thread tuning does not disturb another thread's CUDA work.

The first call of each problem costs a few graph captures per candidate: tuning is for long-lived pipelines.
A timing cache (``OptimizeConfig(tune_cache="path.json")``, like TensorRT's) keeps the choices across
processes: it is read when the pipeline is optimised and rewritten, atomically, after each new measurement.
It holds this machine's fingerprint (GPU, torch, Triton, CUDA): a file from another machine or version is
ignored.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import threading
from typing import Callable, Optional

import torch

from ..utils.cuda_streams import CAPTURE_LOCK, side_stream

CALLS_PER_GRAPH = 5
REPLAYS = 10
MARGIN = 0.03  # a candidate must beat the fallback by more than 3%
_choices: dict = {}  # problem key -> (chosen backend, {backend: seconds})
_lock = threading.RLock()
_pool: list = []  # one graph memory pool for every measurement


def graph_device_time(fn: Callable[[], object]) -> float:
    """Median device seconds of one ``fn()`` call, replayed from a CUDA graph of ``CALLS_PER_GRAPH`` calls."""
    for _ in range(2):  # compile, autotune, allocate outside the graph
        fn()
    with CAPTURE_LOCK:
        side = side_stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        if not _pool:
            _pool.append(torch.cuda.graph_pool_handle())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=_pool[0], stream=side, capture_error_mode="thread_local"):
            for _ in range(CALLS_PER_GRAPH):
                fn()
    times = []
    for _ in range(REPLAYS):
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
        return ("T", tuple(value.shape), value.dtype, tuple(value.stride()), str(value.device))
    if isinstance(value, (list, tuple)):
        return tuple(_signature(v) for v in value)
    return value if isinstance(value, (int, float, str, bool, type(None))) else type(value).__name__


def candidates(module, args: tuple, kwargs: dict) -> list[str]:
    """The module's backends that can run this problem here (FusedOp names: "native" for torch), each a
    distinct implementation (``FusedOp.tune_candidates`` drops those that would run another's kernel)."""
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
    return module.tune_candidates(out, args, kwargs)


def _compiling() -> bool:
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(is_compiling is not None and is_compiling())


def _measurable(tensors) -> bool:
    if TIMER is not None:
        return True
    return bool(tensors) and tensors[0].is_cuda and not torch.cuda.is_current_stream_capturing()


def _measure(module, args, kwargs, device) -> tuple[str, dict]:
    timer, times = _timer(), {}
    for backend in candidates(module, args, kwargs):
        try:
            with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
                times[backend] = float(timer(lambda b=backend: module.run_backend(b, *args, **kwargs), backend,
                                             module))
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:  # this implementation cannot run this problem (or failed to compile)
            if device.type == "cuda":
                try:  # an error that broke the CUDA context must surface here, not as every later failure
                    torch.cuda.synchronize(device)
                except Exception:
                    raise e
            continue
    fallback = module.tune_fallback
    if not times:
        return fallback, times
    best = min(times, key=times.get)
    if fallback in times and times[best] >= times[fallback] * (1 - MARGIN):
        best = fallback
    return best, times


def choose(module, args: tuple, kwargs: dict) -> str:
    """The backend ``module`` runs for (args, kwargs): measured on the first call of each problem (shared by
    the layers with the same one), the fallback where nothing can be measured. Records the choice in
    ``module.tune_choices`` (problem -> backend) and its timings in ``module.tune_times``."""
    if _compiling():  # dynamo would trace this bookkeeping: the fixed choice
        return module.tune_fallback
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    key = repr((type(module).__name__, module.op, module.tune_key(), _signature(args),
                _signature(tuple(sorted(kwargs.items())))))  # a string: the timing cache stores it as JSON
    known = _choices.get(key)
    if known is None and not _measurable(tensors):  # e.g. inside a capture: a problem met for the first time
        module.__dict__["tune_untuned"] = True  # reported by op_backends
        return module.tune_fallback
    if known is None:
        # one measurement at a time (and once per problem); the capture lock first, as a graph capture whose warm-up
        # meets a new problem takes them, so that a measurement and a capture in two threads cannot wait on each other
        with CAPTURE_LOCK, _lock:
            known = _choices.get(key)
            if known is None:
                known = _choices[key] = _measure(module, args, kwargs, tensors[0].device)
                path = module.__dict__.get("tune_cache")
                if path:
                    _save_quietly(path)
    choices = module.__dict__.setdefault("tune_choices", {})
    if key not in choices:
        choices[key] = known[0]
        module.tune_times = dict(known[1])
    return known[0]


CACHE_FORMAT = 1
_fingerprint: list = []


def _kernel_sources_hash() -> str:
    """The Triton kernels' sources: a kernel edited since the measurements makes them stale."""
    import hashlib
    import pathlib

    from .. import kernels  # installed as fastdiff.kernels: found wherever the install put it

    h = hashlib.sha256()
    for path in sorted(pathlib.Path(kernels.__file__).resolve().parent.glob("*.py")):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()[:16]


def fingerprint() -> dict:
    """What a timing cache's measurements depend on: the GPU and the software that built and chose the
    kernels (torch, Triton, CUDA, fastdiff and its kernel sources, whether the CUDA extension is built)."""
    if not _fingerprint:
        try:
            import triton

            triton_version = triton.__version__
        except Exception:  # pragma: no cover - depends on the machine
            triton_version = None
        from .. import __version__, cuda_ext

        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        _fingerprint.append({"format": CACHE_FORMAT, "device": gpu, "torch": torch.__version__,
                             "triton": triton_version, "cuda": torch.version.cuda, "fastdiff": __version__,
                             "kernels": _kernel_sources_hash(), "cuda_ext": bool(cuda_ext.HAS_CUDA_EXT)})
    return dict(_fingerprint[0])


def load_cache(path: str) -> str:
    """Add the choices of a timing cache file made on this machine; returns a note saying what was read."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return f"tune cache {path}: not there yet (it is written after the first measurements)"
    except (OSError, ValueError) as e:
        return f"tune cache {path}: unreadable ({type(e).__name__}: {e}); measuring anew"
    if not isinstance(data, dict) or not isinstance(data.get("choices"), dict):
        return f"tune cache {path}: unreadable (not a fastdiff timing cache); measuring anew"
    if data.get("fingerprint") != fingerprint():
        return (f"tune cache {path}: made on another machine or version ({data.get('fingerprint')}); "
                f"measuring anew")
    read = 0
    with _lock:
        for key, entry in data["choices"].items():
            try:
                backend, times = entry
                _choices.setdefault(key, (str(backend), {str(b): float(t) for b, t in dict(times).items()}))
                read += 1
            except (TypeError, ValueError):  # a damaged entry: measured again when met
                continue
    return f"tune cache {path}: {read} measured problems read"


def save_cache(path: str) -> None:
    """Write every measurement of this process (and the file's own, from this machine) to ``path``."""
    from ..utils.atomic import atomic_path

    with _lock:
        choices = {k: [b, t] for k, (b, t) in _choices.items()}
    if os.path.exists(path):  # keep what another process measured on this machine (last writer wins a race)
        try:
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
            if old.get("fingerprint") == fingerprint() and isinstance(old.get("choices"), dict):
                choices = {**old["choices"], **choices}
        except (OSError, ValueError, AttributeError):
            pass  # replaced by a good file below
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump({"fingerprint": fingerprint(), "choices": choices}, f, indent=1, sort_keys=True)


_save_failed: list = []


def _save_quietly(path: str) -> None:
    """``save_cache`` from inside a forward pass: a cache that cannot be written costs a warning (once), never
    the generation."""
    import warnings

    from ..errors import FastdiffError

    try:
        save_cache(path)
    except (OSError, FastdiffError) as e:
        if path not in _save_failed:
            _save_failed.append(path)
            warnings.warn(f"fastdiff: the tune cache {path} cannot be written ({e}); its choices stay in memory")


def clear() -> None:
    """Forget every measurement (a new device, or tests)."""
    with _lock:
        _choices.clear()
        _pool.clear()  # (a pool of the device measured so far)
