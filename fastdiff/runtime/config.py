"""``OptimizeConfig``: every optimisation switch in one documented dataclass.

``pipe.optimize(OptimizeConfig(...))`` applies it once. Device-dependent defaults ("auto") are worked out
when the config is applied, never at import. Each switch states what it costs.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import operator
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from ..errors import BadArgumentError

BACKENDS = ("eager", "triton", "compile", "onnxruntime", "tensorrt")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GRAPH_SCOPES = ("step", "loop")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Modes whose Inductor CUDA graphs would nest inside fastdiff's own capture (cuda_graphs=True): the same
# kernel choices without Inductor's graphs. fastdiff's graphs then hold the whole network (or loop).
COMPILE_MODES_WITHOUT_GRAPHS = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}


@dataclass
class OptimizeConfig:
    """How the network runs. Defaults are safe everywhere (eager, the model's own dtype, no graphs).

    backend:
        ``eager`` plain PyTorch ops (the reference; no start-up cost).
        ``triton`` fastdiff's fused Triton kernels for GroupNorm(+SiLU), attention and adaLN.
            Cost: first call JIT-compiles each kernel (seconds); needs CUDA (or TRITON_INTERPRET=1).
        ``compile`` ``torch.compile(fullgraph=True, dynamic=False)``, one static shape per batch bucket.
            Cost: tens of seconds to minutes of compile time per bucket and resolution. Up to 32 shapes
            (resolutions x conditionings) per bucket compile (``runners.SIGNATURES_PER_BUCKET``: Dynamo's
            recompile limit is raised to match); one more fails (``FailOnRecompileLimitHit``).
        ``onnxruntime`` export to ONNX and run an ONNX Runtime session (CUDA EP with IO binding on a
            GPU, CPU otherwise). Cost: an export (seconds), and a second copy of the weights in memory.
        ``tensorrt`` build a TensorRT engine (minutes; cached on disk next to the ONNX).
    dtype: ``fp32`` | ``fp16`` | ``bf16`` (or the torch dtype) | None (keep). Half precision halves weight memory and is
        ~2x faster on tensor cores; quality change is usually invisible (sampler state stays fp32).
    channels_last: NHWC memory format for convolutions. Free on GPUs with tensor cores; slower on CPU.
    cuda_graphs: capture the network (``graph_scope="step"``) or the whole sampling loop
        (``"loop"``) in CUDA graphs. Cost: one capture per (bucket, resolution, dtype, sampler, steps)
        and static buffers per graph (activations of one forward, shared through one memory pool).
        Ignored with a note on machines without CUDA.
    batch_buckets: batch sizes graphs / compiled shapes exist for; a request batch is padded up to the
        next bucket (padding wastes compute on the padded rows; a sample's result stays its solo run's to float
        rounding: a GEMM may sum in another order at another batch size, about 1e-6 relative in float32).
    graph_scope: ``step`` (one captured network call per bucket; sampler arithmetic stays in Python) or
        ``loop`` (the fixed-length loop, CFG and sampler arithmetic included: lowest launch overhead,
        but one graph per sampler/steps combination).
    max_graphs: the graph cache bound (least recently used graphs are dropped).
    fuse_qkv: one matmul for q, k, v in self-attention (``fastdiff.models.fuse.fuse_qkv``). Cost: none in memory
        (the three layers' weights become views of the stacked one). None (default): on for a model with such
        self-attention on a CUDA device, where it measured 1.6% faster end to end (SD1.5, H200, run 3:
        151.9 against 154.4 ms; then with a second copy of the weights, now views), off elsewhere; True / False
        force it (True on a model without such projections leaves a note).
    fuse_adaln: DiT only: one matmul for every block's adaLN modulation and the final layer's, instead of
        depth + 1 small ones per network call (``fastdiff.models.fuse.fuse_adaln``). Cost: none in memory (the
        layers' weights become views of the fused one); no effect on other models. None (default): on for a
        DiT on a CUDA device, where it measured 6% faster end to end (DiT-XL/2, H200, bench/RESULTS.md run 3),
        off elsewhere; True / False force it (True on a model without such projections leaves a note).
    fuse_conditioning: UNet only: one matmul for every resnet's time-embedding projection and one for every
        cross-attention layer's key and value projections of the text states, instead of one per layer (SD1.5:
        22 and 32 small matmuls per network call become 2; ``fastdiff.models.fuse.fuse_conditioning``). Cost: none
        in memory (the layers' weights become views of the stacks). None (default): on for a UNet on a CUDA
        device, where it measured 3.1% faster end to end (SD1.5, H200, bench/RESULTS.md run 4: 141.4 against
        145.9 ms), off elsewhere; True / False force it (True on another model leaves a note).
    fuse_conv_bias: UNet: the convolution biases that a GPU adds in separate element-wise kernels (cuDNN does not
        add them; 98 per SD1.5 call) move into work that runs anyway: each resnet's ``conv1`` bias joins the time
        embedding its GroupNorm adds, ``conv2``'s joins the shortcut's, and with ``channels_last`` the 1x1
        convolutions become GEMMs with the bias in the epilogue (``fastdiff.models.conv_bias``; 82 of SD1.5's 98
        go, 36 without channels-last). Cost: none in memory; results change in the last bits (the same sums,
        another order). None (default): on for a channels-last model on a CUDA device, where it measured 3.7%
        faster end to end (SD1.5, H100, bench/RESULTS.md run 5: 133.7 against 138.8 ms), off elsewhere (not
        measured without channels-last); True / False force it (True on a model without UNet blocks leaves a
        note).
    precompute_adaln: DiT with ``fuse_adaln``, ``graph_scope="loop"`` and backend ``eager`` / ``triton``: every
        network call's adaLN modulation of a sampling loop from one matmul at the loop's start, instead of one
        per call (``fastdiff.models.modulation_schedule``): the 451 MB of DiT-XL/2's modulation weights are
        read once per loop, not once per step. Cost: every call's modulation is held during the loop (DiT-XL/2
        at 20 steps: 7.8 MB per network-batch row in fp16; beyond 256 MiB per loop the per-call matmul runs).
        None (default): on where it applies on a CUDA device, where it measured 6.3% faster end to end
        (DiT-XL/2, H200, bench/RESULTS.md run 4: 39.0 against 41.6 ms), off elsewhere; True forces it (with a
        note where it cannot apply: no loop graph, no stacked projections), False turns it off.
    compile_mode: ``torch.compile`` mode with ``backend="compile"`` (``default`` | ``reduce-overhead`` |
        ``max-autotune`` | ``max-autotune-no-cudagraphs``). ``max-autotune`` times Triton GEMM templates
        against cuBLAS for every matmul shape. Cost: minutes of compile time per bucket. With
        ``cuda_graphs=True`` fastdiff's graphs replace Inductor's own (``reduce-overhead`` runs as
        ``default``, ``max-autotune`` as ``max-autotune-no-cudagraphs``, with a note).
    kernel_ops: with ``backend="triton"``, which implementation each fused op uses: ``"measured"``
        (default: on a GPU, ``fastdiff.models.layers.gpu_default_ops``, the per-op winners measured on an
        H200, with a model's own where they differ; elsewhere every op on Triton), ``"all"`` (every op on its
        Triton kernel), or a dict of
        op -> ``"triton"`` | ``"torch"`` | ``"cuda_ext"`` (GroupNorm and the sampler update only) |
        ``"triton_rows"`` (GroupNorm's three-launch strategy) | ``"sdpa_flash"`` / ``"sdpa_efficient"`` /
        ``"sdpa_cudnn"`` (attention: torch's SDPA pinned to one kernel) | ``"triton_tma"`` (attention through TMA
        descriptors on Hopper and newer; the pointer kernel elsewhere) overriding the measured table
        (``fastdiff.models.layers.OP_IMPLS``). ``"tune"`` (for all layers, or per op in the dict) times every
        implementation each layer can run on each new problem (its settings, input shapes and dtypes) inside
        a CUDA graph, and runs the fastest (``fastdiff.models.op_tuning``). Cost: seconds of extra warm-up
        on the first call of each new shape, a few microseconds of host time per layer call outside graphs.
        ``sampler_update`` is the multistep samplers' state update (one fused kernel, or torch's 2-5
        element-wise ones; ``fastdiff.state_update``); with any other backend it runs on torch.
    tune_cache: with ``kernel_ops="tune"``, a JSON timing cache (like TensorRT's): read at ``optimize``,
        rewritten atomically after each new measurement, ignored when made on another GPU or software
        version. Cost: none beyond the file.
    cudnn_benchmark: let cuDNN time its algorithms for each new convolution problem and keep the fastest
        (``torch.backends.cudnn.benchmark``, as stable-fast sets it), set only while fastdiff's network runs
        (warm-up and capture included), so the process-wide setting stays the user's. Backends ``eager`` /
        ``triton`` / ``compile``. Cost: the first call of each new shape (bucket x resolution) takes longer
        while cuDNN tries its algorithms; another algorithm may change results in the last bits. The flag is
        process-wide while a call runs: another thread's convolutions in that time are timed too. A convolution
        problem this process already ran without the flag keeps the plan it got then (cuDNN's plan cache ignores
        the flag): set it in the first ``optimize`` of a process. Off by default until measured on a GPU.
    sdpa_backend: pin torch's SDPA (the attention ops that run on torch) to ``flash`` | ``efficient`` |
        ``cudnn`` | ``math``; None lets SDPA choose (cuDNN on Hopper with torch 2.11). A backend that cannot
        run a problem raises ``BackendUnavailableError`` on the first call.
    """

    backend: str = "eager"
    dtype: Optional[str] = None
    channels_last: bool = False
    cuda_graphs: bool = False
    batch_buckets: Sequence[int] = (1, 2, 4, 8, 16)
    graph_scope: str = "step"
    max_graphs: int = 16
    fuse_qkv: Optional[bool] = None
    fuse_adaln: Optional[bool] = None
    precompute_adaln: Optional[bool] = None
    fuse_conditioning: Optional[bool] = None
    fuse_conv_bias: Optional[bool] = None
    compile_mode: str = "default"
    kernel_ops: Union[str, dict] = "measured"
    sdpa_backend: Optional[str] = None
    tune_cache: Optional[str] = None
    cudnn_benchmark: bool = False

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise BadArgumentError(f"backend must be one of {BACKENDS}, found {self.backend!r}")
        if isinstance(self.dtype, torch.dtype):  # torch.float16 as diffusers users write it: the same as "fp16"
            self.dtype = next((name for name, d in DTYPES.items() if d == self.dtype), self.dtype)
        if self.dtype is not None and self.dtype not in DTYPES:
            raise BadArgumentError(f"dtype must be one of {tuple(DTYPES)} or None, found {self.dtype!r}")
        if self.graph_scope not in GRAPH_SCOPES:
            raise BadArgumentError(f"graph_scope must be one of {GRAPH_SCOPES}, found {self.graph_scope!r}")
        for name in ("channels_last", "cuda_graphs", "cudnn_benchmark"):
            _check_bool(name, getattr(self, name))
        for name in ("fuse_qkv", "fuse_adaln", "precompute_adaln", "fuse_conditioning", "fuse_conv_bias"):
            _check_bool(name, getattr(self, name), allow_none=True)
        self.batch_buckets = _check_buckets(self.batch_buckets)
        if isinstance(self.kernel_ops, dict):
            from ..models.layers import check_kernel_ops

            self.kernel_ops = check_kernel_ops(dict(self.kernel_ops))
        elif self.kernel_ops not in ("measured", "all", "tune"):
            raise BadArgumentError(f"kernel_ops must be 'measured', 'all', 'tune' or a dict of op -> impl, found "
                                   f"{self.kernel_ops!r}")
        if self.sdpa_backend is not None:
            from ..models.layers import SDPA_BACKENDS

            if self.sdpa_backend not in SDPA_BACKENDS:
                raise BadArgumentError(f"sdpa_backend must be one of {sorted(SDPA_BACKENDS)} or None, found "
                                       f"{self.sdpa_backend!r}")
        tuning = self.kernel_ops == "tune" or (isinstance(self.kernel_ops, dict) and "tune" in self.kernel_ops.values())
        if self.tune_cache is not None and not (tuning and self.backend == "triton"):
            raise BadArgumentError(f"tune_cache needs backend='triton' with kernel_ops='tune' (or an op set to "
                                   f"'tune'), found backend={self.backend!r}, kernel_ops={self.kernel_ops!r}")
        if self.tune_cache is not None:
            import os

            folder = os.path.dirname(os.path.abspath(self.tune_cache))
            if not os.path.isdir(folder):
                raise BadArgumentError(f"tune_cache: expected a file in an existing folder, found no folder {folder}")
        if self.compile_mode not in COMPILE_MODES:
            raise BadArgumentError(f"compile_mode must be one of {COMPILE_MODES}, found {self.compile_mode!r}")
        if self.compile_mode != "default" and self.backend != "compile":
            raise BadArgumentError(f"compile_mode={self.compile_mode!r} needs backend='compile', found "
                                   f"backend={self.backend!r}")
        if not _is_int(self.max_graphs) or self.max_graphs < 1:
            raise BadArgumentError(f"max_graphs must be an int >= 1, found {self.max_graphs!r}")

    def op_choices(self, device: torch.device, model: Optional[torch.nn.Module] = None) -> Optional[dict]:
        """The per-op implementations for ``set_backend`` (None: every op on Triton); on a GPU the measured table
        for ``model``'s class (``fastdiff.models.layers.gpu_default_ops``)."""
        from ..models.layers import gpu_default_ops

        if self.kernel_ops == "all":
            return None
        measured = gpu_default_ops(model) if torch.device(device).type == "cuda" else {}
        if self.kernel_ops == "tune":  # every layer measured on its first call; the sampler update as measured
            from ..models.layers import LAYER_OPS

            return {**measured, **{op: "tune" for op in LAYER_OPS}}
        return measured if self.kernel_ops == "measured" else {**measured, **self.kernel_ops}

    def sampler_update_impl(self, device: torch.device, model: Optional[torch.nn.Module] = None) -> str:
        """How the samplers' state update runs: the kernel table's choice (``model``'s class's on a GPU) with
        backend="triton", else torch."""
        if self.backend != "triton":
            return "torch"
        ops = self.op_choices(device, model)
        return "triton" if ops is None else ops.get("sampler_update", "triton")

    @property
    def torch_dtype(self) -> Optional[torch.dtype]:
        return DTYPES.get(self.dtype) if self.dtype else None

    def replace(self, **kw) -> "OptimizeConfig":
        return dataclasses.replace(self, **kw)


def _is_int(v) -> bool:
    """An integer (Python or NumPy), not a bool: what a count or a batch size may be."""
    if isinstance(v, bool):
        return False
    try:
        operator.index(v)
    except TypeError:
        return False
    return True


def _check_bool(name: str, value, allow_none: bool = False) -> None:
    # a truthy string such as "no" would otherwise switch the feature on
    if not (isinstance(value, bool) or (allow_none and value is None)):
        raise BadArgumentError(f"{name} must be True or False{' or None' if allow_none else ''}, found {value!r}")


def _check_buckets(buckets) -> tuple:
    """A sorted tuple of distinct positive ints from a tuple / list (1.7 is refused, never truncated)."""
    if isinstance(buckets, (str, bytes)) or not isinstance(buckets, collections.abc.Sequence):
        raise BadArgumentError(f"batch_buckets must be a tuple or list of positive ints, found {buckets!r}")
    bad = [b for b in buckets if not _is_int(b) or b < 1]
    if not buckets or bad:
        raise BadArgumentError(f"batch_buckets must be positive ints, found {list(buckets)}"
                               + (f" ({bad[0]!r} is not)" if bad else ""))
    out = sorted(operator.index(b) for b in buckets)
    if len(set(out)) < len(out):
        raise BadArgumentError(f"batch_buckets must be distinct, found {list(buckets)}")
    return tuple(out)
