"""Shared building blocks whose hot ops have a fused path.

Each fused op keeps a plain-torch ``forward_native`` (the CPU path and the test oracle) and picks its
implementation ONCE, when the layer is built or when ``set_backend`` walks the model: never per call,
never by patching module globals (vLLM's CustomOp idea).

Backends: ``"native"`` (plain torch) and ``"triton"`` (fastdiff.kernels). ``"auto"`` means triton on a
CUDA device when Triton imports, native otherwise; an explicit ``"triton"`` that cannot run fails loudly.
"""

from __future__ import annotations

import math
import sys
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import BackendUnavailableError, BadArgumentError

BACKENDS = ("native", "triton")

# Which implementation each fused op uses when the fused backend is chosen on a GPU without an explicit
# per-op choice (``backend="auto"`` on CUDA, ``OptimizeConfig(backend="triton")``): the op's Triton kernel
# where it beat torch on the GPU, torch where it did not. Measured on an NVIDIA H200, device time inside
# CUDA graphs (bench/RESULTS.md, runs 2-4): GroupNorm+SiLU Triton 3.0-5.1x torch (the CUDA extension
# 0.6-2.7x; the three-launch "rows" strategy faster at 64x64 NCHW but slower end to end, SD1.5 162.4 vs
# 154.4 ms); adaLN 3.6x, and each residual with the adaLN norm after it in one pass ("triton") 3.7-4.1x torch,
# end to end DiT-XL/2 39.7 against 41.4 ms for the two kernels ("triton_pair"; run 4); GEGLU 2.2-2.6x torch;
# attention: SDPA (cuDNN on Hopper) beat the Triton kernels at SD's D=40 (self 159.6 vs 173.6 us, cross 15.1
# vs 17.4 us) and SD2's self D=64, so SDPA here; DiT-XL/2's D=72 takes the TMA kernel, and an SD UNet the pointer
# kernel for its graphs' host time (their model tables, ``MODEL_GPU_OPS``). ``sampler_update`` is not a layer: it is the multistep samplers' state update
# (``fastdiff.state_update``): Triton 2.4-2.9x torch per update, but end to end within noise (DiT 42.9 vs
# 43.1 ms, SD1.5 146.2 vs 145.9 ms), so torch (a UNet's table takes it with its attention). Values: "triton", "torch", "cuda_ext" (GroupNorm: the optional
# CUDA C++ extension for channels-last inputs, Triton where it does not apply; sampler_update: its fused update
# kernel), or "triton_rows" (GroupNorm: the Triton kernels' "rows" strategy, three launches over contiguous
# rows).
GPU_DEFAULT_OPS = {
    "group_norm": "triton",
    "attention": "torch",
    "adaln_modulate": "triton",
    "sampler_update": "torch",
    "geglu": "triton",  # SD's feed-forward activation: 2.2-2.7x torch; SD1.5 end to end 147.6 vs 154.4 ms (run 3)
    # SD's transformer LayerNorms, each with the residual before it, in one pass: SD1.5 end to end 124.4 against
    # 128.9 ms for torch's add + layer_norm (H200, run 6, one process; ``+resln``)
    "layer_norm": "triton",
}
# Per model class: the ops whose measured winner on that model's shapes differs from the table above.
# DiT-XL/2 (attention over 256 tokens, head dim 72; H200, run 4): the TMA kernel 7.4 us against SDPA's 9.5
# (cuDNN) per call, and end to end 39.6 against 41.4 ms; per-layer tuning chose it too. Graphs without cuDNN's
# attention also replay for 7.5 instead of 246 us of host time per step. Where TMA cannot run (before Hopper,
# fp32) the layer takes the pointer kernel, which ran DiT-XL/2 as fast end to end (``+allk``, 37.5 ms).
# SD UNets (SD1.5 at 512 px, H200, run 6, one process): SDPA picks cuDNN's attention, whose graph nodes cost
# 2.4 ms of host time per replayed step (2487 us against 38 us with the Triton pointer kernel), for 1050
# against 1233 us of device time per network call. With every op on Triton (attention, the one-pass LayerNorm
# and the samplers' fused update: ``+allk``) SD1.5 ran 126.1 against 128.9 ms end to end and replayed a step
# for 29.7 us of host time, the launch goal of 30 us; the LayerNorm alone (``+resln``) ran 124.4 ms but kept
# cuDNN's 2410 us. So a UNet takes that measured set: the host stays free (an Engine's other requests, other
# GPUs) for 1.7 ms (1.4%) per image against the fastest single-stream set. ``+sdpa`` (``kernel_ops=
# {"attention": "torch"}``) takes the attention back. Not measured at SD2's, SDXL's or guided-diffusion's
# ADM's (the same class) head dim 64, where SDPA's kernel led by more (runs 2-3), nor the TMA kernel (``+tma``:
# 129.2 ms, 41.9 us) with the LayerNorm.
# (A subclass takes its parent's table: a ControlNet, captured in one graph with its UNet, the UNet's.)
MODEL_GPU_OPS = {
    "DiT": {"attention": "triton_tma"},
    "UNet": {"attention": "triton", "sampler_update": "triton"},
}


def gpu_default_ops(model: Optional[nn.Module] = None) -> dict:
    """The measured per-op table for ``model`` on a GPU: ``GPU_DEFAULT_OPS`` with the entries in ``MODEL_GPU_OPS``
    of its class, or of the nearest parent class that has some."""
    own = next((MODEL_GPU_OPS[c.__name__] for c in type(model).__mro__ if c.__name__ in MODEL_GPU_OPS), {})
    return {**GPU_DEFAULT_OPS, **own}


# what each op may run on (OptimizeConfig.kernel_ops values)
OP_IMPLS = {
    "group_norm": ("triton", "torch", "cuda_ext", "triton_rows"),
    # sdpa_*: torch's SDPA pinned to one of its kernels (with "torch", SDPA picks per call)
    # triton_tma: the TMA-descriptor kernel (Hopper+; the pointer kernel where TMA cannot read the layout)
    "attention": ("triton", "torch", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "triton_tma"),
    # triton: a residual and the norm after it in one pass; triton_pair: the residual kernel, then the norm's
    "adaln_modulate": ("triton", "torch", "triton_pair"),
    "sampler_update": ("triton", "torch", "cuda_ext"),
    "geglu": ("triton", "torch"),
    "layer_norm": ("triton", "torch"),
}
LAYER_OPS = ("group_norm", "attention", "adaln_modulate", "geglu", "layer_norm")  # layers (FusedOp)


def triton_available() -> tuple[bool, str]:
    """(usable, reason): Triton imports and either a CUDA device or the CPU interpreter is there."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the machine
        return False, f"triton not importable ({e.__class__.__name__}: {e})"
    import os

    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return True, "ok"
    return False, "no CUDA device (set TRITON_INTERPRET=1 to run Triton kernels on the CPU)"


def resolve_backend(backend: str, device: Optional[torch.device] = None) -> str:
    """Turn a requested backend into the one used: explicit requests fail loudly, ``auto`` falls back."""
    if backend == "auto":
        on_cuda = device is not None and torch.device(device).type == "cuda"
        return "triton" if on_cuda and triton_available()[0] else "native"
    if backend not in BACKENDS:
        raise BadArgumentError(f"unknown kernel backend {backend!r}; expected one of {BACKENDS + ('auto',)}")
    if backend == "triton":
        ok, why = triton_available()
        if not ok:
            raise BackendUnavailableError(f"backend 'triton' was requested but {why}")
    return backend


class FusedOp(nn.Module):
    """Base of layers with a native and a fused implementation; ``backend`` is set at build time.

    ``op`` names the fused op (the key of ``GPU_DEFAULT_OPS``); ``backend`` is "native", "triton" or, for
    GroupNorm, "cuda_ext" or "triton_rows" (``OP_IMPLS`` lists each op's).
    """

    backend: str = "native"
    op: str = ""
    tune_fallback: str = "native"  # with backend "tune": the backend to take where nothing can be measured

    def set_backend(self, backend: str, tune_fallback: str = "native") -> None:
        self.backend, self.tune_fallback = backend, tune_fallback
        self.__dict__.pop("tune_choices", None)

    def forward(self, *args, **kwargs):
        backend = self.backend
        if backend == "tune":  # kernel_ops="tune": the fastest measured for this problem (fastdiff.models.op_tuning)
            from .op_tuning import choose

            backend = choose(self, args, kwargs)
        return self.run_backend(backend, *args, **kwargs)

    def tune_key(self) -> tuple:
        """The layer's settings that make two calls with equal inputs different problems (for "tune")."""
        return ()

    def tune_candidates(self, backends: list, args: tuple, kwargs: dict) -> list:
        """The backends worth timing for these inputs (drops those that would run another's kernel)."""
        return backends

    def run_backend(self, backend: str, *args, **kwargs):
        """The op through one implementation: "native", "triton", "cuda_ext" or a Triton variant
        ("triton_rows" -> ``forward_triton_rows``)."""
        if backend == "triton":
            return self.forward_triton(*args, **kwargs)
        if backend.startswith("triton_"):
            return getattr(self, "forward_" + backend)(*args, **kwargs)
        if backend == "cuda_ext":
            return self.forward_cuda_ext(*args, **kwargs)
        return self.forward_native(*args, **kwargs)

    def forward_cuda_ext(self, *args, **kwargs):  # ops without a CUDA C++ kernel take their Triton one
        return self.forward_triton(*args, **kwargs)

    def forward_native(self, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_triton(self, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError


# torch's SDPA backends by the names OptimizeConfig(sdpa_backend=...) takes. On Hopper with cuDNN >= 9.15
# (torch 2.11's wheels) SDPA itself prefers cuDNN; pinning another backend changes kernels and graph nodes.
SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                 "math": "MATH"}


def sdpa_context(name: str):
    """``torch.nn.attention.sdpa_kernel`` restricted to backend ``name`` (a key of SDPA_BACKENDS)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError as e:  # pragma: no cover - torch < 2.3
        raise BackendUnavailableError(f"pinning an SDPA backend needs torch >= 2.3 ({e})") from e
    backend = getattr(SDPBackend, SDPA_BACKENDS[name], None)
    if backend is None:  # pragma: no cover - older torch without this backend
        raise BackendUnavailableError(f"this torch ({torch.__version__}) has no SDPA backend {name!r}")
    return sdpa_kernel([backend])


def set_sdpa_backend(model: nn.Module, name: Optional[str]) -> None:
    """Pin the SDPA backend of every native attention core in ``model`` (None: SDPA's own choice)."""
    if name is not None and name not in SDPA_BACKENDS:
        raise BadArgumentError(f"sdpa_backend: expected one of {sorted(SDPA_BACKENDS)} or None, found {name!r}")
    for m in model.modules():
        if isinstance(m, Attention):
            m.sdpa_backend = name


def check_kernel_ops(ops: dict) -> dict:
    """``ops`` (op name -> implementation) after checking every name and implementation."""
    known = set(GPU_DEFAULT_OPS)
    for op, impl in ops.items():
        if op not in known:
            raise BadArgumentError(f"kernel ops: expected op names from {sorted(known)}, found {op!r}")
        allowed = OP_IMPLS[op] + (("tune",) if op in LAYER_OPS else ())
        if impl not in allowed:
            raise BadArgumentError(f"kernel ops: {op} takes one of {allowed}, found {impl!r}")
    return ops


def set_backend(model: nn.Module, backend: str = "auto", ops: Optional[dict] = None,
                tune_cache: Optional[str] = None) -> str:
    """Choose the implementation of every fused op in ``model``; returns the backend used.

    ``backend="triton"`` puts every fused op on its Triton kernel unless ``ops`` (op name -> one of that op's
    ``OP_IMPLS``, or "tune": measured per layer on its first call, with ``tune_cache`` the timing-cache file
    new measurements are saved to) says otherwise per op; ``"auto"`` on a CUDA device uses the measured table
    (``gpu_default_ops(model)``).
    """
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = None
    chosen = resolve_backend(backend, device)
    measured = gpu_default_ops(model)
    if chosen == "triton" and ops is None and backend == "auto":
        ops = measured
    ops = check_kernel_ops(dict(ops or {}))
    on_cuda = device is not None and device.type == "cuda"
    for m in model.modules():
        if isinstance(m, FusedOp):
            impl = ops.get(m.op, "triton") if chosen == "triton" else "native"
            # "tune" (fastdiff.models.op_tuning) measures on the first call; where it cannot, the layer takes
            # the measured table's choice on a GPU, Triton elsewhere
            fallback = measured.get(m.op, "triton") if on_cuda else "triton"
            m.set_backend("native" if impl == "torch" else impl, "native" if fallback == "torch" else fallback)
            if impl == "tune":
                m.tune_cache = tune_cache  # where new measurements are saved (fastdiff.models.op_tuning)
    return chosen


def op_backends(model: nn.Module) -> dict[str, str]:
    """Which path each fused op type uses, for ``fastdiff info`` and logs: one backend name, or, where the
    layers of a type differ (``kernel_ops="tune"`` chooses per layer and problem), each with its count, e.g.
    ``"native x4, triton x12"``. A tuned layer shows what it chose ("native+triton" when its problems
    differ), "<fallback> (untuned)" where nothing could be measured, or "tune" before its first call."""
    seen: dict[str, dict[str, int]] = {}
    ext_missing = None
    for m in model.modules():
        if isinstance(m, FusedOp):
            counts = seen.setdefault(type(m).__name__, {})
            label = m.backend
            if label == "cuda_ext":  # without the extension the layer runs its Triton kernel: say so
                if ext_missing is None:
                    from .. import cuda_ext

                    ext_missing = not cuda_ext.HAS_CUDA_EXT
                label = "cuda_ext (not built: triton)" if ext_missing else label
            if label == "tune" and m.__dict__.get("tune_choices"):  # what it measured fastest (per problem)
                label = "+".join(sorted(set(m.tune_choices.values())))
            elif label == "tune" and m.__dict__.get("tune_untuned"):  # nothing could be measured (no GPU)
                label = f"{m.tune_fallback} (untuned)"
            counts[label] = counts.get(label, 0) + 1
    return {name: next(iter(c)) if len(c) == 1 else ", ".join(f"{b} x{n}" for b, n in sorted(c.items()))
            for name, c in seen.items()}


def exporting() -> bool:
    """True while torch.onnx exports, torch.jit traces or torch.export exports (the graph must keep float32
    statistics)."""
    onnx = sys.modules.get("torch.onnx")  # never imported: nothing exports (and no import on the hot path)
    compiler = getattr(torch, "compiler", None)
    exporting_fn = getattr(compiler, "is_exporting", None)  # torch >= 2.4
    return bool((onnx is not None and onnx.is_in_onnx_export()) or torch.jit.is_tracing()
                or (exporting_fn is not None and exporting_fn()))


class GroupNorm(FusedOp):
    """GroupNorm with statistics in float32, optional fused SiLU and scale-shift modulation.

    forward(x, scale=None, shift=None, pre_bias=None): x (B, C, *spatial); pre_bias (B, C) is added to x
    first (a resnet's time embedding: the fused kernels fold it in, no pass of its own); scale / shift
    (B, C) give ``norm(x) * (1 + scale) + shift`` (applied before the activation, as diffusers' scale_shift and
    guided-diffusion's use_scale_shift_norm do).
    """

    op = "group_norm"

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 activation: Optional[str] = None):
        super().__init__()
        if num_channels % num_groups:
            raise BadArgumentError(f"GroupNorm: {num_channels} channels not divisible by {num_groups} groups")
        if activation not in (None, "silu"):
            raise BadArgumentError(f"GroupNorm activation must be None or 'silu', found {activation!r}")
        self.num_groups, self.num_channels, self.eps, self.activation = num_groups, num_channels, eps, activation
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels))
            self.bias = nn.Parameter(torch.zeros(num_channels))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward_native(self, x, scale=None, shift=None, pre_bias=None):
        if pre_bias is not None:  # (B, C): added per (sample, channel) before the norm, in x's dtype as
            # diffusers does (the fused kernels add in float32: closer to exact where |pre| >> spread of x)
            x = x + pre_bias.reshape((x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)).to(x.dtype)
        if (scale is None and shift is None and (self.weight is None or self.weight.dtype == x.dtype)
                and not exporting()):
            # torch's kernel already keeps the statistics in float32 for half inputs: no fp32 copies of x
            # (in half precision the casts were 4 extra kernels per GroupNorm, 85 per SD-UNet call).
            # Not while exporting: an ONNX / TensorRT graph would then normalise in half precision.
            h = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
            return F.silu(h) if self.activation == "silu" else h
        h = F.group_norm(x.float(), self.num_groups,
                         None if self.weight is None else self.weight.float(),
                         None if self.bias is None else self.bias.float(), self.eps)
        if scale is not None or shift is not None:
            view = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
            if scale is not None:
                h = h * (1 + scale.float().reshape(view))
            if shift is not None:
                h = h + shift.float().reshape(view)
        if self.activation == "silu":
            h = F.silu(h)
        return h.to(x.dtype)

    def forward_triton(self, x, scale=None, shift=None, pre_bias=None, strategy=None):
        from fastdiff.kernels import group_norm

        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps, activation=self.activation,
                          scale=scale, shift=shift, pre_bias=pre_bias, strategy=strategy)

    def forward_triton_rows(self, x, scale=None, shift=None, pre_bias=None):
        """The Triton kernels' "rows" strategy (three launches over contiguous rows)."""
        return self.forward_triton(x, scale, shift, pre_bias, strategy="rows")

    def tune_key(self) -> tuple:
        w = self.weight
        return (self.num_groups, self.eps, self.activation, None if w is None else w.dtype)

    def tune_candidates(self, backends, args, kwargs):
        x = args[0]
        plain = len(args) < 2 and all(kwargs.get(k) is None for k in ("scale", "shift", "pre_bias"))
        ext_runs = plain and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        return [b for b in backends if b != "cuda_ext" or ext_runs]  # else cuda_ext runs the Triton kernel

    def forward_cuda_ext(self, x, scale=None, shift=None, pre_bias=None):
        """The CUDA C++ kernel for plain channels-last inputs (no scale / shift / pre-bias); Triton otherwise.
        ``op_backends`` reports the layer's choice ("cuda_ext"), or "cuda_ext (not built: triton)" without the
        extension; not each call's path."""
        from fastdiff import cuda_ext

        if (scale is None and shift is None and pre_bias is None and x.dim() == 4 and x.is_cuda
                and cuda_ext.HAS_CUDA_EXT and x.is_contiguous(memory_format=torch.channels_last)):
            return cuda_ext.group_norm_nhwc(x, self.num_groups, self.weight, self.bias, self.eps,
                                            silu=self.activation == "silu")
        return self.forward_triton(x, scale, shift, pre_bias)

    def extra_repr(self):
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, activation={self.activation}"


class Attention(FusedOp):
    """Scaled dot-product attention core on (B, H, N, D) tensors, softmax in float32 on the fused path."""

    op = "attention"
    # None: SDPA picks its backend; else one of SDPA_BACKENDS, pinned with torch.nn.attention.sdpa_kernel
    sdpa_backend: Optional[str] = None
    # SD 2.x's upcast_attention: torch's SDPA ("native", "sdpa_*") on float32 copies of half-precision inputs. Not
    # the Triton kernels: they hold the scores and the softmax in float32 already (what the upcast
    # is for), and float32 inputs would put their dots on the exact, slow path, off the tensor cores. Applied per
    # backend, so kernel_ops="tune" times each candidate as it would run. (diffusers' SDPA processor never upcasts.)
    upcast: bool = False

    def forward_native(self, q, k, v, scale: Optional[float] = None):
        if self.sdpa_backend is None:
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        return self.forward_sdpa(self.sdpa_backend, q, k, v, scale)

    def forward_sdpa(self, name: str, q, k, v, scale: Optional[float] = None):
        """SDPA pinned to its backend ``name`` (a key of SDPA_BACKENDS); a backend that cannot run the problem
        raises BackendUnavailableError."""
        try:
            with sdpa_context(name):
                return F.scaled_dot_product_attention(q, k, v, scale=scale)
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError as e:
            raise BackendUnavailableError(
                f"SDPA backend {name!r} cannot run attention of shape {tuple(q.shape)} x "
                f"{tuple(k.shape)} {q.dtype} on {q.device}: {str(e).strip().splitlines()[0]}") from e

    def run_backend(self, backend: str, q, k, v, scale: Optional[float] = None):
        torch_path = backend == "native" or backend.startswith("sdpa_")
        if self.upcast and torch_path and q.dtype in (torch.float16, torch.bfloat16):
            return self.run_backend(backend, q.float(), k.float(), v.float(), scale).to(q.dtype)
        if backend.startswith("sdpa_"):  # kernel_ops {"attention": "sdpa_flash"}, or a tuned choice
            return self.forward_sdpa(backend[len("sdpa_"):], q, k, v, scale)
        return super().run_backend(backend, q, k, v, scale)

    def tune_candidates(self, backends, args, kwargs):
        # SDPA's pinned kernels are worth timing on a GPU, where flash / memory-efficient / cuDNN differ and
        # SDPA's own pick is a heuristic; not where OptimizeConfig(sdpa_backend=...) already pinned one
        pinned_variants = args[0].device.type == "cuda" and self.sdpa_backend is None
        out = [b for b in backends if not b.startswith("sdpa_") or pinned_variants]
        if "triton_tma" in out and not (len(args) >= 3 and self._tma_runs(*args[:3])):
            out.remove("triton_tma")  # it would run the pointer kernel: "triton" already times that
        return out

    def forward_triton(self, q, k, v, scale: Optional[float] = None):
        """The Triton kernel; heads wider than it holds (a VAE's or a pixel UNet's one-head attention over 512
        channels) run on SDPA instead, as layers the kernel cannot serve."""
        from fastdiff.kernels import attention
        from fastdiff.kernels.attention import MAX_HEAD_DIM

        if q.shape[-1] > MAX_HEAD_DIM:
            return self.run_backend("native", q, k, v, scale)  # (torch's path: SD 2.x's upcast too)
        return attention(q, k, v, scale=scale)

    def forward_triton_tma(self, q, k, v, scale: Optional[float] = None):
        """The TMA-descriptor kernel where it can run (a Hopper-or-newer GPU, half precision, 16-byte aligned
        layouts, head dims up to 128), the pointer kernel elsewhere (``op_backends`` still reports the layer's
        choice, as for cuda_ext). A launch that fails (outside a capture) warns once and leaves this layer on the
        pointer kernel."""
        if self.__dict__.get("_tma_failed") or not self._tma_runs(q, k, v):
            return self.forward_triton(q, k, v, scale)
        from fastdiff.kernels import attention_tma

        try:
            return attention_tma(q, k, v, scale=scale)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise  # the capture is broken already: say so
            import warnings

            warnings.warn(f"fastdiff attention: the TMA kernel failed ({type(e).__name__}: {e}); this layer uses "
                          f"the pointer kernel from now on")
            self._tma_failed = True
            return self.forward_triton(q, k, v, scale)

    @staticmethod
    def _tma_runs(q, k, v) -> bool:
        from fastdiff.kernels import triton_importable

        if not triton_importable()[0]:
            return False
        from fastdiff.kernels.attention_tma import supported

        return supported(q, k, v)[0]

    def tune_key(self) -> tuple:
        # (with the upcast torch's candidates run in float32: another problem; without it the key of a cache written
        # before the upcast moved here)
        return (self.sdpa_backend, "upcast") if self.upcast else (self.sdpa_backend,)


class ModulatedLayerNorm(FusedOp):
    """LayerNorm without affine, then ``x * (1 + scale) + shift`` (DiT's adaLN ``modulate``), optionally after
    the residual that precedes it.

    forward(x (B, T, D), shift (B, D), scale (B, D)) -> (B, T, D)
    forward(x, shift, scale, residual=(gate (B, D), y (B, T, D))) -> (x', norm of x') with ``x' = x + gate * y``

    Every residual of a DiT is followed by one of its adaLN norms (the block's second, the next block's first,
    the final layer's), so each norm takes the residual before it: on the Triton path both run in one pass
    (``fastdiff.kernels.gated_residual_modulate``), or as the residual kernel and then the norm's
    (``"triton_pair"``, what runs 1-3 measured).
    """

    op = "adaln_modulate"

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.dim, self.eps = dim, eps

    def tune_key(self) -> tuple:
        return (self.dim, self.eps)

    def tune_candidates(self, backends, args, kwargs):
        residual = kwargs.get("residual", args[3] if len(args) > 3 else None)
        # without a residual "triton_pair" runs the same kernel as "triton": nothing to time twice
        return backends if residual is not None else [b for b in backends if b != "triton_pair"]

    def forward_native(self, x, shift, scale, residual=None):
        if residual is not None:
            gate, y = residual
            x = x + gate.unsqueeze(1) * y
        h = F.layer_norm(x, (self.dim,), eps=self.eps)
        h = h * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
        return h if residual is None else (x, h)

    def forward_triton(self, x, shift, scale, residual=None):
        from fastdiff.kernels import adaln_modulate, gated_residual_modulate

        if residual is None:
            return adaln_modulate(x, shift, scale, eps=self.eps)
        return gated_residual_modulate(x, residual[0], residual[1], shift, scale, eps=self.eps)

    def forward_triton_pair(self, x, shift, scale, residual=None):
        from fastdiff.kernels import adaln_modulate, gated_residual

        if residual is None:
            return adaln_modulate(x, shift, scale, eps=self.eps)
        x = gated_residual(x, residual[0], residual[1])
        return x, adaln_modulate(x, shift, scale, eps=self.eps)


class LayerNorm(FusedOp):
    """``nn.LayerNorm`` (same parameters and state-dict keys: ``weight``, ``bias``), optionally after the residual
    that precedes it.

    forward(x (..., D)) -> LayerNorm(x); forward(x, residual=y) -> (x + y, LayerNorm(x + y))

    A Stable Diffusion transformer block adds each attention's output to its input and normalises the sum for
    the next sublayer: on the Triton path both run in one pass (``fastdiff.kernels.residual_layer_norm``); a
    plain LayerNorm stays on torch's kernel either way.
    """

    op = "layer_norm"

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def tune_key(self) -> tuple:
        return (self.dim, self.eps)

    def tune_candidates(self, backends, args, kwargs):
        return backends if kwargs.get("residual", args[1] if len(args) > 1 else None) is not None else ["native"]

    def forward_native(self, x, residual=None):
        if residual is not None:
            x = x + residual
        h = F.layer_norm(x, (self.dim,), self.weight, self.bias, self.eps)
        return h if residual is None else (x, h)

    def forward_triton(self, x, residual=None):
        if residual is None or x.dim() != 3:  # a plain LayerNorm: torch's kernel
            return self.forward_native(x, residual)
        from fastdiff.kernels import residual_layer_norm

        return residual_layer_norm(x, residual, self.weight, self.bias, eps=self.eps)


class GEGLU(FusedOp):
    """``h * gelu(gate)`` for ``h, gate = x.chunk(2, dim=-1)`` (exact GELU): Stable Diffusion's feed-forward
    activation on its (B, N, 2 * inner) projection, giving (B, N, inner)."""

    op = "geglu"

    def forward_native(self, x):
        h, gate = x.chunk(2, dim=-1)  # (B, N, inner) each
        return h * F.gelu(gate)

    def forward_triton(self, x):
        from fastdiff.kernels import geglu

        return geglu(x)


def timestep_embedding(t: torch.Tensor, dim: int, *, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
                       max_period: float = 10000.0, scale: float = 1.0) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps -> (B, dim) float32.

    ``flip_sin_to_cos=True`` gives [cos, sin] (DiT, guided-diffusion, SD); ``freq_shift`` is diffusers'
    ``downscale_freq_shift`` (frequencies exp(-ln(max_period) * i / (half - freq_shift))).
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = scale * t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb

