"""Runners: the network callable a Pipeline's sampler calls, built once from an ``OptimizeConfig``.

Every runner has the native signature ``runner(x, timestep, class_labels=None,
encoder_hidden_states=None) -> Tensor``, so samplers and denoisers never know which one they call.
"""

from __future__ import annotations

import threading
import warnings
from typing import Callable, Optional

import torch

from ..errors import BackendUnavailableError, BadArgumentError
from ..models.layers import set_backend, set_sdpa_backend
from .config import COMPILE_MODES_WITHOUT_GRAPHS, OptimizeConfig


def prepare_model(model: torch.nn.Module, config: OptimizeConfig, device: torch.device,
                  notes: Optional[list] = None) -> torch.nn.Module:
    """dtype, memory format, fused-op backend and weight fusions applied to a copy-free model (in place); a
    weight fusion that finds nothing to fuse says so in ``notes``."""
    notes = [] if notes is None else notes
    if config.torch_dtype is not None:
        now = next(model.parameters()).dtype
        if now.is_floating_point and torch.finfo(config.torch_dtype).bits > torch.finfo(now).bits:
            notes.append(f"dtype {config.dtype}: the weights are {str(now).replace('torch.', '')}, and a cast up keeps "
                         f"their rounding (load the checkpoint again in {config.dtype} for any precision it has "
                         f"beyond that)")
        model = model.to(config.torch_dtype)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # compile traces the native ops: Inductor fuses GroupNorm + SiLU and the elementwise epilogues itself,
    # and fastdiff's Python kernel launchers would only add graph breaks under fullgraph=True
    if config.backend == "triton":
        set_backend(model, "triton", ops=config.op_choices(device, model), tune_cache=config.tune_cache)
    else:
        set_backend(model, "native")
    set_sdpa_backend(model, config.sdpa_backend)
    from ..models.conv_bias import set_conv_bias_fusion
    from ..models.fuse import apply_fusions

    notes.extend(apply_fusions(model, **weight_fusions(model, config, device)))
    if set_conv_bias_fusion(model, conv_bias_fusion(config, device)) == 0 and config.fuse_conv_bias:
        notes.append("fuse_conv_bias ignored: only fastdiff's diffusers-style UNet (its resnets and attention "
                     "blocks) has biases to move")
    return model


def conv_bias_fusion(config: OptimizeConfig, device) -> bool:
    """Whether ``config`` moves a UNet's convolution biases (``OptimizeConfig.fuse_conv_bias``): an explicit True /
    False as given; None (auto) on for a channels-last model on CUDA, the one setting measured (run 5, H100)."""
    if config.fuse_conv_bias is not None:
        return config.fuse_conv_bias
    return torch.device(device).type == "cuda" and config.channels_last


def weight_fusions(model: torch.nn.Module, config: OptimizeConfig, device) -> dict[str, bool]:
    """Which weight fusions ``config`` applies to ``model`` on ``device`` (``apply_fusions``' arguments): an
    explicit True / False as given; None (auto) on where it measured faster on a GPU (CUDA only), silently off
    where it cannot apply."""
    from ..models.fuse import adaln_stackable, conditioning_stackable, qkv_stackable

    on_cuda = torch.device(device).type == "cuda"

    def auto(value: Optional[bool], applies) -> bool:
        return value if value is not None else on_cuda and applies(model)

    return dict(qkv=auto(config.fuse_qkv, qkv_stackable), adaln=auto(config.fuse_adaln, adaln_stackable),
                conditioning=auto(config.fuse_conditioning, conditioning_stackable))


def check_backend(backend: str, device) -> None:
    """Raise BackendUnavailableError (one clear line) if ``backend`` cannot run on ``device`` here.

    Checked before any work, so an explicit request fails fast and the same way for every backend.
    """
    import importlib.util
    import os

    if backend in ("eager", "compile"):
        return
    if backend == "triton":
        from ..models.layers import triton_available

        ok, why = triton_available()
        if not ok:
            raise BackendUnavailableError(f"backend 'triton' was requested but {why}")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise BackendUnavailableError("backend 'triton' was requested but the device is "
                                          f"{device.type}: Triton kernels need a CUDA device (or TRITON_INTERPRET=1)")
        return
    if backend == "onnxruntime":
        if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
            raise BackendUnavailableError("backend 'onnxruntime' was requested but onnx / onnxruntime is not "
                                          "installed (pip install onnx onnxruntime)")
        return
    if backend == "tensorrt":
        if importlib.util.find_spec("tensorrt") is None:
            raise BackendUnavailableError("backend 'tensorrt' was requested but tensorrt is not installed")
        if device.type != "cuda":
            raise BackendUnavailableError(f"backend 'tensorrt' was requested but the device is {device.type}: "
                                          f"TensorRT needs a CUDA GPU")
        return


def build_runner(pipe, config: OptimizeConfig, graph_factory=None) -> tuple[Callable, list[str]]:
    """(network callable, notes) for ``config``; an explicitly requested backend that cannot run raises, before
    anything of the pipe changes."""
    notes: list[str] = []
    device = pipe.device
    backend = config.backend
    check_backend(backend, device)
    if backend == "tensorrt" and getattr(pipe.model, "ip_projection", None) is not None:
        raise BadArgumentError("backend 'tensorrt': an IP-Adapter is loaded, and fastdiff's TensorRT engines have "
                               "no image prompt profile yet; use the onnxruntime / eager / triton / compile backends")
    # whether CUDA graphs will really capture (they pad to buckets themselves); else static-shape runners
    # need BucketPadded
    graphs_apply = config.cuda_graphs and backend != "onnxruntime" and (
        graph_factory is not None or (device.type == "cuda" and torch.cuda.is_available()))
    if backend in ("eager", "triton", "compile"):
        if backend == "triton" and config.tune_cache:
            from ..models.op_tuning import load_cache

            notes.append(load_cache(config.tune_cache))
        model = prepare_model(pipe.model, config, device, notes)
        pipe.model = model
        runner: Callable = model
        if getattr(pipe, "controlnet", None) is not None:  # one network of both: graphs and compile take them together
            from ..models.controlnet import controlled

            for net in getattr(pipe.controlnet, "nets", [pipe.controlnet]):  # (each its base's kind: fusions apply)
                prepare_model(net, config, device, notes)
                if config.torch_dtype is None:  # (the network's precision: an export backend's may have cast it)
                    net.to(next(model.parameters()).dtype)
            runner = controlled(model, pipe.controlnet)
        if backend == "compile":
            runner = compile_network(runner, config, device, notes)
            if not graphs_apply:  # one static shape per bucket (graphs pad to buckets themselves)
                from .graphs import BucketPadded, network_buckets

                runner = BucketPadded(runner, network_buckets(config.batch_buckets))
        if config.channels_last:
            inner = runner
            runner = lambda x, *a, **k: inner(x.contiguous(memory_format=torch.channels_last), *a, **k)  # noqa: E731
        if config.cudnn_benchmark:
            runner = CudnnBenchmark(runner)
    elif any(getattr(b, "freeu", None) for b in getattr(pipe.model, "up_blocks", ())):  # (export backends below)
        raise BadArgumentError(f"backend {backend!r}: the network runs FreeU (FFTs an exported graph does not hold); "
                               f"pipe.disable_freeu() first, or keep an eager / triton / compile backend")
    elif backend == "onnxruntime":
        try:
            from .onnxruntime_runner import OnnxRuntimeRunner
        except ImportError as e:
            raise BackendUnavailableError(f"backend 'onnxruntime' was requested but {e}") from e
        if config.dtype == "bf16":
            raise BadArgumentError("backend 'onnxruntime': dtype 'bf16' is not available (fastdiff exports fp32 or "
                                   "fp16 graphs); ask for dtype='fp16' or 'fp32', or none (a bf16 model runs as fp32)")
        # the model's own precision when none is asked for (ONNX has no bfloat16 graphs here: bf16 runs as fp32)
        dtype = config.dtype or ("fp16" if pipe._network_dtype() == torch.float16 else "fp32")
        # on the CPU, ONNX Runtime gets the same thread budget as torch (no oversubscription)
        threads = torch.get_num_threads() if device.type == "cpu" else None
        # every size the eager model takes (a DiT's position table fixes its own)
        runner = OnnxRuntimeRunner.from_pipeline(pipe, device=device, dtype=dtype, threads=threads,
                                                 dynamic_hw=pipe.spec.kind != "dit")
        if getattr(pipe.model, "ip_projection", None) is not None:  # (the graph takes the adapters' features)
            runner = ImagePromptScales(runner, pipe.model)
    elif backend == "tensorrt":
        runner = _tensorrt_runner(pipe, config)
        if not graphs_apply:  # the engine's profile covers network batches up to twice the largest bucket
            from .graphs import BucketPadded, network_buckets

            runner = BucketPadded(runner, network_buckets(config.batch_buckets))
    else:  # pragma: no cover - OptimizeConfig validates
        raise BackendUnavailableError(backend)

    ignored = [name for name in ("fuse_qkv", "fuse_adaln", "fuse_conditioning", "fuse_conv_bias", "cudnn_benchmark")
               if getattr(config, name)]
    if ignored and backend in ("onnxruntime", "tensorrt"):  # exported from the model as loaded
        notes.append(f"{', '.join(ignored)} ignored: the {backend} backend runs its own exported graph")
    if config.cuda_graphs and backend == "onnxruntime":
        # ONNX Runtime launches on its own stream and synchronises: nothing of it can be captured
        notes.append("cuda_graphs ignored: the onnxruntime backend runs outside torch's CUDA streams")
    elif config.cuda_graphs:
        if graph_factory is None and (device.type != "cuda" or not torch.cuda.is_available()):
            notes.append("cuda_graphs ignored: no CUDA device (graphs need one)")
        elif config.graph_scope == "step":
            from .graphs import GraphedNetwork, network_buckets

            runner = GraphedNetwork(runner, network_buckets(config.batch_buckets), config.max_graphs,
                                    graph_factory=graph_factory)
        # graph_scope="loop" is applied by the Pipeline around the whole sampling loop.
    return runner, notes


class ImagePromptScales:
    """An exported graph with IP-Adapter inputs, fed the pipeline's current adapter scales at every call
    (``fastdiff.models.ip_adapter.scale_vector``: the model's buffers, stacked where they live), so that
    ``set_ip_adapter_scale`` after ``optimize`` needs no new export. Anything else is the wrapped runner's."""

    def __init__(self, runner, model):
        self.runner, self.model = runner, model

    def __call__(self, x, timestep, *args, **kwargs):
        from ..models.ip_adapter import scale_vector

        if kwargs.get("image_embeds") is not None:
            kwargs["ip_scales"] = scale_vector(self.model).to(x.device)
        return self.runner(x, timestep, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.runner, name)


class CudnnBenchmark:
    """Runs the network with ``torch.backends.cudnn.benchmark`` on, giving the caller's setting back afterwards.

    cuDNN reads the flag when a convolution is dispatched: the warm-up calls before a graph capture time the
    algorithms and fill cuDNN's cache, the capture then finds each problem there, and replays dispatch nothing.
    The flag is process-wide, so calls that overlap (two Engines, threads) share one count: the first to enter
    saves the caller's value and the last to leave restores it.
    """

    _lock = threading.Lock()
    _active = 0
    _saved = False

    def __init__(self, network: Callable):
        self.network = network

    def __call__(self, *args, **kwargs):
        cls = CudnnBenchmark
        with cls._lock:
            if cls._active == 0:
                cls._saved = torch.backends.cudnn.benchmark
            cls._active += 1
            torch.backends.cudnn.benchmark = True
        try:
            return self.network(*args, **kwargs)
        finally:
            with cls._lock:
                cls._active -= 1
                if cls._active == 0:
                    torch.backends.cudnn.benchmark = cls._saved


# torch.compile(dynamic=False) compiles the network once per input signature: network batch bucket x resolution x
# conditioning (labels or not, text length, dtype). Dynamo's recompile limit (8 per function by default) is there
# to stop runaway recompiles, but each of these is a static shape fastdiff asks for on purpose, and under
# fullgraph=True the ninth would fail hard (FailOnRecompileLimitHit), e.g. the default buckets at two resolutions.
SIGNATURES_PER_BUCKET = 32  # resolutions x conditionings allowed for each network batch bucket


def compile_network(model: torch.nn.Module, config: OptimizeConfig, device: torch.device, notes: list[str]):
    """``torch.compile(fullgraph=True, dynamic=False)`` allowed one compile per signature fastdiff produces:
    ``SIGNATURES_PER_BUCKET`` per network batch bucket (``fullgraph=False`` for a model Dynamo cannot trace
    whole: ``FullgraphWhereTraceable``).

    Where ``torch.compile`` takes ``recompile_limit`` (newer torch; 2.13 does) the limit is this model's alone, with
    ``isolate_recompiles=True``: without it the compiled entries of every model of one class share a single
    count (one ``forward``), so a second model of the class would fail after the first one's shapes.
    Before that (torch 2.5 on) there is only Dynamo's process-wide limit (``cache_size_limit`` before its rename to
    ``recompile_limit``), which is then raised, never lowered. The cap over all compiles of one function (every
    model of a class together: ``accumulated_recompile_limit``, formerly ``accumulated_cache_size_limit``) is
    process-wide in every version and is raised the same way.
    """
    import inspect

    from torch._dynamo import config as dynamo

    from .graphs import network_buckets

    budget = SIGNATURES_PER_BUCKET * len(network_buckets(config.batch_buckets))
    kw = dict(fullgraph=True, dynamic=False, mode=compile_mode(config, device, notes))
    _raise_limit(dynamo, ("accumulated_recompile_limit", "accumulated_cache_size_limit"), budget)
    params = inspect.signature(torch.compile).parameters
    if "recompile_limit" in params:
        if "isolate_recompiles" in params:
            kw["isolate_recompiles"] = True
        kw["recompile_limit"] = budget
    else:
        _raise_limit(dynamo, ("recompile_limit", "cache_size_limit"), budget)
    return FullgraphWhereTraceable(model, kw)


class FullgraphWhereTraceable:
    """``torch.compile(model, fullgraph=True)``, and where Dynamo cannot trace the model whole (a graph break: a
    data-dependent branch, an unsupported call in a user's custom layer), ``fullgraph=False`` instead: the model
    still compiles, in pieces, and a ``RuntimeWarning`` names the break. fastdiff's own models trace whole (tested).

    Under ``fullgraph=True`` Dynamo reports an exception the model raises while traced (a bad input its forward
    refuses) as ``Unsupported`` too; so before giving up the whole graph the call runs eagerly: an error there is
    the input's, raised as it is, and the compiled model stays whole."""

    def __init__(self, model: torch.nn.Module, compile_kwargs: dict):
        self.model, self.kwargs = model, dict(compile_kwargs)
        self.fullgraph = True
        self.compiled = torch.compile(model, **self.kwargs)
        self._lock = threading.Lock()

    def __call__(self, *args, **kwargs):
        compiled = self.compiled
        if not self.fullgraph:
            return compiled(*args, **kwargs)
        from torch._dynamo.exc import Unsupported

        try:
            return compiled(*args, **kwargs)
        except Unsupported as e:
            out = self.model(*args, **kwargs)  # raises the model's own error for a bad input
            with self._lock:
                if self.fullgraph:  # once, whichever thread gets here first
                    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    warnings.warn(f"torch.compile: {type(self.model).__name__} cannot be traced as one graph "
                                  f"(fullgraph=True): {reason[:300]}; compiled with graph breaks instead (slower, "
                                  f"and a CUDA graph around it captures the pieces)", RuntimeWarning, stacklevel=2)
                    self.compiled = torch.compile(self.model, **{**self.kwargs, "fullgraph": False})
                    self.fullgraph = False
            return out


def _raise_limit(dynamo_config, names: tuple, at_least: int) -> None:
    """Raise the first of ``names`` that this torch's Dynamo config has (a newer name first) to ``at_least``."""
    name = next((n for n in names if hasattr(dynamo_config, n)), None)
    if name is None:  # a torch that renamed it again: its default stands (the compile may then stop at its limit)
        return
    if getattr(dynamo_config, name) < at_least:
        setattr(dynamo_config, name, at_least)


def compile_mode(config: OptimizeConfig, device: torch.device, notes: list[str]) -> str:
    """``config.compile_mode``, less Inductor's CUDA graphs where fastdiff's own graphs capture the network:
    a graph tree replayed inside another capture is not something Inductor supports."""
    mode = config.compile_mode
    if config.cuda_graphs and torch.device(device).type == "cuda" and mode in COMPILE_MODES_WITHOUT_GRAPHS:
        mode = COMPILE_MODES_WITHOUT_GRAPHS[mode]
        notes.append(f"compile_mode {config.compile_mode!r} runs as {mode!r}: fastdiff's CUDA graphs capture "
                     f"the network, not Inductor's")
    return mode


def _tensorrt_runner(pipe, config: OptimizeConfig):
    """Export to ONNX, build (or reuse, when its sidecar still matches) a TensorRT engine, open it.

    Engines are cached in ``$FASTDIFF_CACHE`` (default ~/.cache/fastdiff/tensorrt) under a name derived
    from the model spec; the sidecar JSON detects a stale engine (other GPU, TensorRT, ONNX or profile).
    """
    import hashlib
    import json
    import os

    from fastdiff.export.onnx import export_onnx
    from fastdiff.export.tensorrt import require_tensorrt, text_sequence

    from .tensorrt_runner import TensorRTRunner

    require_tensorrt()  # BackendUnavailableError with the reason, before any export work
    cache = os.path.join(os.environ.get("FASTDIFF_CACHE", os.path.expanduser("~/.cache/fastdiff")), "tensorrt")
    os.makedirs(cache, exist_ok=True)
    tag = hashlib.sha256(json.dumps(pipe.spec.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
    onnx_path = os.path.join(cache, f"{pipe.spec.kind}-{tag}.onnx")
    h, w = pipe.spec.sample_size
    buckets = config.batch_buckets
    export_onnx(pipe, pipe.spec, onnx_path, dtype="fp32", dynamic_batch=True, progress=False)
    precision = config.dtype or "fp16"
    # the network batch doubles under CFG: the profile covers up to twice the largest bucket
    opt = min(2 * buckets[0], 2 * buckets[-1])
    return TensorRTRunner.from_onnx(onnx_path, device=pipe.device, batch=(1, opt, 2 * buckets[-1]),
                                    height=h, width=w, sequence=text_sequence(pipe.spec), precision=precision)
