"""Ahead-of-time compile check: every kernel, at the configurations the models use, to PTX (and cubin).

No GPU is needed: ``triton.compile`` runs the whole NVIDIA pipeline (TTIR -> TTGIR -> LLVM -> PTX ->
ptxas) for a ``GPUTarget("cuda", arch, 32)``. Each configuration is produced by the launcher's own
``_launches`` helper, called with ``meta`` tensors, so the signature, the integer specialisations (== 1 ->
constexpr, % 16 -> divisibility hint), the constexprs and the warps are those a real launch on that shape
would use. Two sources: listed shapes per kernel (below; SD1.5 / DiT-XL/2 sizes, the split head dims, unaligned
rows, every TMA tile), and ``models``: every distinct launch the shipped models make, recorded from their
forward passes on the meta device (``aot_models``).

Under ``TRITON_INTERPRET=1`` the compile cannot run in-process (the interpreter patches
``triton.language`` for good once a kernel has run), so ``compile_all`` then runs itself in a subprocess
with the variable removed and reads its JSON.

    python -m fastdiff.kernels.aot [--arch 80 90] [--dtype float16 ...] [--kernel attention ...]
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

ARCHS = (80, 90)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TY = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin): A100 163 KiB, H100 227 KiB
MAX_SHARED = {80: 166912, 86: 101376, 89: 101376, 90: 232448}

# GroupNorm (shape, groups) of SD1.5's UNet: the largest and the smallest resolution
GROUP_NORM_SHAPES = (((2, 320, 64, 64), 32), ((2, 1280, 8, 8), 32),
                     ((2, 32, 1, 1), 32))  # one channel per group, one position: ints of 1 become constexprs
# attention (B, H, Nq, Nk, D): SD1.5 self (64x64 latents) / cross (77 text tokens) at its head dims, SD2's
# D=64, D=128, and DiT-XL/2 (256 tokens, 16 heads of 72)
ATTENTION_SHAPES = (
    (2, 8, 4096, 4096, 40), (2, 8, 4096, 77, 40),
    (2, 8, 1024, 1024, 80), (2, 8, 1024, 77, 80),
    (2, 8, 256, 256, 160), (2, 8, 256, 77, 160),
    (2, 5, 4096, 4096, 64), (2, 5, 4096, 77, 64),
    (2, 16, 256, 256, 72),
    (2, 8, 1024, 1024, 128),
)
# ... of which these also compile with query rows off a 16-byte multiple (the kernel then gets no alignment
# hint): the variant EDM's layouts, odd offsets and head dims not a multiple of 8 run
ATTENTION_UNALIGNED = ((2, 8, 4096, 77, 40), (2, 16, 256, 256, 72))
ADALN_SHAPES = ((2, 256, 1152),)  # DiT-XL/2: (B, T, D)
LAYER_NORM_SHAPES = ((2, 4096, 320), (2, 64, 1280))  # SD1.5's transformer blocks at 64x64 and 8x8 latents
# GEGLU (tokens, 2 * inner): SD1.5's feed-forward at 64x64 and 8x8 latents, with CFG
GEGLU_SHAPES = ((2, 4096, 2560), (2, 64, 10240))
# sampler state updates: SD1.5's 64x64 latents (batch 1) and DiT-XL/2's 32x32 (batch 4), 2 to 5 terms
LINCOMB_SHAPES = ((1, 4, 64, 64), (4, 4, 32, 32))


@dataclass
class Config:
    """One kernel specialisation to compile."""

    kernel: str  # the op's name, e.g. "group_norm"
    label: str  # what makes it distinct: shape, layout, mode
    dtype: torch.dtype
    fn: object  # the @triton.jit object
    args: tuple
    meta: dict
    tuned: bool = False  # one of the autotuner's candidate tiles (it prunes those that do not fit)
    min_arch: int = 0  # compiled only for this compute capability and newer (the TMA kernel: 90)


@dataclass
class Result:
    kernel: str
    label: str
    dtype: str
    arch: int
    ok: bool
    seconds: float
    ptx_bytes: int = 0
    cubin_bytes: int = 0
    shared_bytes: int = 0
    num_warps: int = 0
    error: str = ""
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- configs
def _group_norm_configs(dtypes) -> list[Config]:
    from fastdiff.kernels.group_norm import _launches

    out = []
    for shape, groups in GROUP_NORM_SHAPES:
        C = shape[1]
        for dtype in dtypes:
            for layout in ("nchw", "nhwc"):
                x = torch.empty(shape, dtype=dtype, device="meta")
                if layout == "nhwc":
                    x = x.to(memory_format=torch.channels_last)
                y = torch.empty_like(x)
                w = torch.empty(C, dtype=dtype, device="meta")
                pre = torch.empty(shape[0], C, dtype=dtype, device="meta")
                for variant in ("affine", "affine+silu", "affine+silu+pre"):  # pre: a resnet's time embedding
                    for strategy in ("groups", "rows"):
                        launches = _launches(x, y, groups, w, w, 1e-5, "silu" if "silu" in variant else None,
                                             None, None, None, "cuda", strategy=strategy,
                                             pre_bias=pre if variant.endswith("+pre") else None)
                        for kernel, grid, args, meta in launches:
                            part = f"mode{meta['MODE']}" if "MODE" in meta else f"rows {kernel.__name__.strip('_')}"
                            label = f"{'x'.join(map(str, shape))} g{groups} {layout} {variant} {part}"
                            out.append(Config("group_norm", label, dtype, kernel, args, meta))
    return out


def _attention_with_tiles(label, dtype, args, meta) -> list[Config]:
    """One pointer-attention launch and, in half precision (which a GPU runs autotuned), every tile the runtime
    tunes over (the split-safe ones whenever a tail tile runs)."""
    from fastdiff.kernels.attention import _SPLIT_SAFE_TILES, _TUNED_TILES, _attention_kernel

    out = [Config("attention", label, dtype, _attention_kernel, args, meta)]
    if dtype == torch.float32:
        return out
    nk = args[6]  # (q, k, v, out, H, NQ, NK, ...)
    for bm, bn, warps, stages in _SPLIT_SAFE_TILES if meta["BLOCK_D2"] else _TUNED_TILES:
        tuned = dict(meta, BLOCK_M=bm, BLOCK_N=bn, EVEN_N=nk % bn == 0, num_warps=warps, num_stages=stages)
        out.append(Config("attention", f"{label} tile{bm}x{bn}w{warps}s{stages}", dtype, _attention_kernel, args,
                          tuned, tuned=True))
    return out


def _attention_configs(dtypes) -> list[Config]:
    from fastdiff.kernels.attention import _launches

    out = []
    for shape in ATTENTION_SHAPES:
        B, H, NQ, NK, D = shape
        variants = [(d, u) for d in dtypes for u in (False, True) if not u or shape in ATTENTION_UNALIGNED]
        for dtype, unaligned in variants:
            # unaligned: query rows D + 1 elements apart, off every 16-byte multiple (the kernel gets ALIGN=1)
            q = torch.empty(B, H, NQ, D + unaligned, dtype=dtype, device="meta")[..., :D]
            kv = torch.empty(B, H, NK, D, dtype=dtype, device="meta")
            # CUDA's default (a padded head dim) and, off a power of two, the forced main + tail split
            out_t = torch.empty(B, H, NQ, D, dtype=dtype, device="meta")
            for split in (False, True) if D & (D - 1) else (False,):
                for grid, args, meta in _launches(q, kv, kv, out_t, None, "cuda", split, interpret=False):
                    label = (f"B{B} H{H} Nq{NQ} Nk{NK} D{D}{' split' if split else ''}"
                             f"{' unaligned' if unaligned else ''}")
                    out += _attention_with_tiles(label, dtype, args, meta)
    return out


# the TMA attention (Hopper+, opt-in): SD1.5's D=40 self / cross and DiT-XL/2's D=72, as the descriptors see them
ATTENTION_TMA_SHAPES = ((2, 8, 4096, 4096, 40), (2, 8, 4096, 77, 40), (2, 16, 256, 256, 72), (2, 5, 4096, 4096, 64),
                        (2, 8, 1024, 1024, 80), (2, 8, 1024, 1024, 128))  # (D > 128: the pointer kernel)


def _attention_tma_with_tiles(label, dtype, args, meta) -> list[Config]:
    """One TMA-attention launch and every tile its autotuner times (descriptors rebuilt with each tile's box)."""
    import importlib

    tma = importlib.import_module("fastdiff.kernels.attention_tma")
    out = [Config("attention_tma", label, dtype, tma._attention_tma_kernel, args, meta, min_arch=90)]
    q, k, v, o = (d.base for d in args[:4])
    nk, bd = args[6], meta["BLOCK_D"]  # (q, k, v, out descriptors, H, NQ, NK, ...)
    for bm, bn, warps, stages in tma._TUNED_TILES:
        descs = [tma._descriptor_class()(t, list(t.shape), list(t.stride()), [1, 1, n, bd])
                 for t, n in ((q, bm), (k, bn), (v, bn), (o, bm))]
        tuned = dict(meta, BLOCK_M=bm, BLOCK_N=bn, EVEN_N=nk % bn == 0, num_warps=warps, num_stages=stages)
        out.append(Config("attention_tma", f"{label} tile{bm}x{bn}w{warps}s{stages}", dtype,
                          tma._attention_tma_kernel, (*descs, *args[4:]), tuned, tuned=True, min_arch=90))
    return out


def _attention_tma_configs(dtypes) -> list[Config]:
    from fastdiff.kernels import attention_tma as _launcher  # noqa: F401  (binds the package's launchers first)
    import importlib

    tma = importlib.import_module("fastdiff.kernels.attention_tma")
    if tma._descriptor_class() is None:  # triton < 3.4: no tensor descriptors to compile
        return []
    out = []
    for B, H, NQ, NK, D in ATTENTION_TMA_SHAPES:
        for dtype in dtypes:
            if dtype == torch.float32:  # a GPU runs fp32 on the pointer kernel (``supported``)
                continue
            # (B, N, H, D) projections viewed as (B, H, N, D), as the models pass them
            q = torch.empty(B, NQ, H, D, dtype=dtype, device="meta").transpose(1, 2)
            kv = torch.empty(B, NK, H, D, dtype=dtype, device="meta").transpose(1, 2)
            o = torch.empty(B, NQ, H, D, dtype=dtype, device="meta").transpose(1, 2)
            for grid, args, meta in tma._launches(q, kv, kv, o, None, "cuda", interpret=False):
                out += _attention_tma_with_tiles(f"B{B} H{H} Nq{NQ} Nk{NK} D{D} tma", dtype, args, meta)
    return out


def _adaln_configs(dtypes) -> list[Config]:
    from fastdiff.kernels.adaln import (_adaln_launches, _adaln_modulate_kernel, _gated_residual_kernel,
                                        _gated_residual_launches)

    out = []
    for B, T, D in ADALN_SHAPES:
        for dtype in dtypes:
            x = torch.empty(B, T, D, dtype=dtype, device="meta")
            m = torch.empty(B, D, dtype=dtype, device="meta")
            for grid, args, meta in _adaln_launches(x, m, m, torch.empty_like(x), 1e-6):
                out.append(Config("adaln_modulate", f"B{B} T{T} D{D}", dtype, _adaln_modulate_kernel, args, meta))
            for grid, args, meta in _gated_residual_launches(x, m, x, torch.empty_like(x)):
                out.append(Config("gated_residual", f"B{B} T{T} D{D}", dtype, _gated_residual_kernel, args, meta))
            residual = (m, torch.empty_like(x), torch.empty_like(x))  # gate, branch output, x'
            for grid, args, meta in _adaln_launches(x, m, m, torch.empty_like(x), 1e-6, residual=residual):
                out.append(Config("gated_residual_modulate", f"B{B} T{T} D{D}", dtype, _adaln_modulate_kernel, args,
                                  meta))
    for B, T, D in LAYER_NORM_SHAPES:  # SD's transformer LayerNorm with the residual before it
        for dtype in dtypes:
            x = torch.empty(B, T, D, dtype=dtype, device="meta")
            wb = torch.empty(D, dtype=dtype, device="meta").expand(B, D)  # weight / bias: sample stride 0
            residual = (None, torch.empty_like(x), torch.empty_like(x))
            for grid, args, meta in _adaln_launches(x, wb, wb, torch.empty_like(x), 1e-5, residual=residual,
                                                    one_plus=False):
                out.append(Config("residual_layer_norm", f"B{B} T{T} D{D}", dtype, _adaln_modulate_kernel, args,
                                  meta))
    return out


def _lincomb_configs(dtypes) -> list[Config]:
    from fastdiff.kernels.lincomb import MAX_TERMS, _launches, _lincomb_kernel

    out = []
    for shape in LINCOMB_SHAPES:
        for dtype in dtypes:
            x = torch.empty(shape, dtype=dtype, device="meta")
            for n in range(2, MAX_TERMS + 1):
                for grid, args, meta in _launches([x] * n, [0.5] * n, torch.empty_like(x)):
                    out.append(Config("lincomb", f"{'x'.join(map(str, shape))} terms{n}", dtype, _lincomb_kernel,
                                      args, meta))
    return out


def _geglu_configs(dtypes) -> list[Config]:
    from fastdiff.kernels.geglu import _geglu_kernel, _launches

    out = []
    for B, N, two_inner in GEGLU_SHAPES:
        for dtype in dtypes:
            x = torch.empty(B * N, two_inner, dtype=dtype, device="meta")
            y = torch.empty(B * N, two_inner // 2, dtype=dtype, device="meta")
            for grid, args, meta in _launches(x, y):
                out.append(Config("geglu", f"{B}x{N}x{two_inner} geglu", dtype, _geglu_kernel, args, meta))
    return out


def _model_configs(dtypes) -> list[Config]:
    """What the shipped models launch (``aot_models``): their own channels per group, scale / shift norms, head
    dims, view strides and batch sizes, with every attention tile the autotuner would time."""
    from .aot_models import model_launches

    out = []
    for label, op, kernel, args, meta, dtype in model_launches(dtypes=dtypes):
        if op == "attention":
            out += _attention_with_tiles(label, dtype, args, meta)
        elif op == "attention_tma":
            if dtype != torch.float32:  # a GPU runs fp32 on the pointer kernel (``attention_tma.supported``)
                out += _attention_tma_with_tiles(label, dtype, args, meta)
        else:
            out.append(Config(op, label, dtype, kernel, args, meta))
    return out


KERNELS: dict[str, Callable[..., list]] = {
    "group_norm": _group_norm_configs,
    "attention": _attention_configs,
    "attention_tma": _attention_tma_configs,
    "adaln": _adaln_configs,
    "lincomb": _lincomb_configs,
    "geglu": _geglu_configs,
    "models": _model_configs,  # each Config names its own kernel (group_norm, attention, ...)
}


# A subset that still covers every kernel, mode and dtype, and attention with Nk off the block size at two
# split head dims (40 = 32 + 16, 80 = 64 + 16) plus DiT's 72, with every autotuner tile in half precision:
# what a quick check compiles (D = 160, the most shared memory, is in the full set).
QUICK = (
    "2x320x64x64 g32 nhwc affine+silu",  # split statistics: mode 1 and mode 2
    "2x1280x8x8 g32 nchw affine+silu",  # fused: mode 0
    "2x32x1x1 g32 nchw affine+silu",  # degenerate sizes specialised to constexprs
    "Nk77 D40", "Nk77 D80", "Nk256 D72",  # (the TMA attention's labels end in "tma": D40 and D72 both)
    "T256 D1152", "T4096 D320",
    "1x4x64x64 terms",
    "2x64x10240 geglu",
)


def in_quick(cfg: Config) -> bool:
    """Whether the quick check compiles ``cfg``: the QUICK subset, and every launch of the float16 models at the
    launcher's own tile (their autotuner tiles and the other dtypes' models are in the full set)."""
    if cfg.label.startswith("model "):  # (recorded from float16 models; SD2.1's upcast attention is float32)
        return not cfg.tuned
    return any(q in cfg.label for q in QUICK)


def configs(kernels=None, dtypes=DTYPES, quick: bool = False) -> list[Config]:
    """Every configuration of the chosen sources (all by default) at the chosen dtypes, each distinct compile
    once: a model launch equal to a listed shape's is kept under the listed shape's label."""
    from .aot_models import compile_key

    out, seen = [], set()
    for name in kernels or KERNELS:
        # the quick check takes the models' float16 launches only: record no others
        source_dtypes = tuple(d for d in dtypes if d == torch.float16) if quick and name == "models" else dtypes
        for cfg in KERNELS[name](source_dtypes):
            key = (compile_key(cfg.fn, cfg.args, cfg.meta, cfg.dtype), cfg.min_arch)
            if key not in seen and (not quick or in_quick(cfg)):
                seen.add(key)
                out.append(cfg)
    return out


# ---------------------------------------------------------------------------------------------- compile
_OPTIONS = ("num_warps", "num_stages", "num_ctas")


def _jit_function(fn):
    """The JITFunction of a kernel, also when TRITON_INTERPRET=1 gave an interpreter wrapper."""
    from triton.runtime.jit import JITFunction

    if isinstance(fn, JITFunction):
        return fn
    return JITFunction(getattr(fn, "fn", fn))


def _source(cfg: Config):
    """(ASTSource, options) for one configuration, specialised as the JIT would specialise it."""
    import triton
    import triton.compiler

    jit = _jit_function(cfg.fn)
    names = list(jit.arg_names)
    constexpr_names = [p.name for p in jit.params if p.is_constexpr]
    values = dict(zip([n for n in names if n not in constexpr_names], cfg.args))
    if len(values) != len(cfg.args):
        raise RuntimeError(f"{cfg.kernel}: {len(cfg.args)} positional args for "
                           f"{len(names) - len(constexpr_names)} runtime parameters")
    constants = {k: v for k, v in cfg.meta.items() if k not in _OPTIONS}
    options = {k: v for k, v in cfg.meta.items() if k in _OPTIONS}
    signature, hints = {}, {}
    for i, name in enumerate(names):
        if name in constants:
            signature[name] = "constexpr"
            continue
        v = values[name]
        if isinstance(v, torch.Tensor):
            signature[name] = "*" + _TY[v.dtype]
            hints[i] = 16  # torch allocations are 16-byte aligned, as the JIT sees them
        elif isinstance(v, bool):
            signature[name] = "i1"
        elif isinstance(v, int):
            if v == 1:  # the JIT turns an int equal to 1 into a constexpr
                signature[name] = "constexpr"
                constants[name] = 1
            else:
                signature[name] = "i32" if -2**31 <= v < 2**31 else "i64"
                if v % 16 == 0:
                    hints[i] = 16
        elif isinstance(v, float):
            signature[name] = "fp32"
        elif type(v).__name__ == "TensorDescriptor":  # a host TMA descriptor: its dtype and box
            signature[name] = f"tensordesc<{_TY[v.base.dtype]}[{', '.join(str(n) for n in v.block_shape)}]>"
        else:
            raise TypeError(f"{cfg.kernel}: cannot type argument {name}={v!r}")
    params = inspect.signature(triton.compiler.ASTSource.__init__).parameters
    if "constexprs" in params:  # triton >= 3.3: constexprs and attrs keyed by (arg index,)
        attrs = {(i,): [["tt.divisibility", 16]] for i in hints}
        src = triton.compiler.ASTSource(fn=jit, signature=signature, constexprs=constants, attrs=attrs)
    else:  # triton 3.2: constants=, attrs as an AttrsDescriptor
        try:
            from triton.backends.compiler import AttrsDescriptor

            attrs = AttrsDescriptor.from_hints(hints)
        except Exception:  # pragma: no cover - older layouts: compile without the hints
            attrs = None
        src = triton.compiler.ASTSource(fn=jit, signature=signature, constants=constants, attrs=attrs)
    return src, options


_NARROW_HALF = re.compile(r"\b(?:ld|st)\.global(?:\.[\w:]+)*\.(?:b16|u16|s16|f16|bf16)\b")


def compile_config(cfg: Config, arch: int) -> Result:
    """Compile one configuration for ``sm_<arch>``; failures are returned, not raised."""
    import triton
    from triton.backends.compiler import GPUTarget

    t0 = time.perf_counter()
    res = Result(cfg.kernel, cfg.label, _TY[cfg.dtype], arch, False, 0.0, extra={"tuned": cfg.tuned})
    try:
        src, options = _source(cfg)
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        ptx = k.asm.get("ptx", "")
        if f".target sm_{arch}" not in ptx:
            raise RuntimeError(f"PTX does not target sm_{arch}")
        res.shared_bytes = int(getattr(k.metadata, "shared", 0))
        limit = MAX_SHARED.get(arch)
        if limit is not None and res.shared_bytes > limit:
            raise RuntimeError(f"needs {res.shared_bytes} B of shared memory, sm_{arch} has {limit} B")
        res.ok = True
        res.ptx_bytes = len(ptx)
        res.cubin_bytes = len(k.asm.get("cubin", b""))
        res.num_warps = int(getattr(k.metadata, "num_warps", 0))
        # 16-bit global loads / stores (scalar or 2-4 element vectors): a half-precision tile whose accesses did
        # not vectorise (a mask or an offset whose alignment the compiler cannot see); a tile should compile
        # to 16-byte accesses and async copies
        res.extra["narrow_half_accesses"] = len(_NARROW_HALF.findall(ptx))
        res.extra["tma_copies"] = ptx.count("cp.async.bulk.tensor")  # TMA loads / stores (sm_90+)
        res.extra["wgmma"] = ptx.count("wgmma.mma_async")
        res.extra["block_m"] = cfg.meta.get("BLOCK_M")  # wgmma needs 64-row tiles: tiny problems run mma.sync
    except Exception as e:  # noqa: BLE001 - reported per configuration
        res.error = f"{e.__class__.__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    res.seconds = time.perf_counter() - t0
    return res


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def compile_all(arch: int = 90, kernels=None, dtypes=DTYPES, quick: bool = False) -> list[Result]:
    """Compile every configuration of the chosen kernels for ``sm_<arch>`` (``quick``: the QUICK subset).

    Under TRITON_INTERPRET=1 this runs in a subprocess without it (see the module docstring).
    """
    if _interpreting():
        return _compile_in_subprocess(arch, kernels, dtypes, quick)
    return [compile_config(cfg, arch) for cfg in configs(kernels, dtypes, quick) if arch >= cfg.min_arch]


def _subprocess_cmd(arch, kernels=None, dtypes=DTYPES, quick=False) -> list[str]:
    cmd = [sys.executable, "-m", "fastdiff.kernels.aot", "--json", "--arch", str(arch),
           "--dtype", *[str(d).split(".")[1] for d in dtypes]]
    if kernels:
        cmd += ["--kernel", *kernels]
    if quick:
        cmd.append("--quick")
    return cmd


def start_subprocess(arch, kernels=None, dtypes=DTYPES, quick=False) -> subprocess.Popen:
    """Start a compile of one arch in a subprocess without TRITON_INTERPRET; finish it with ``collect``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.Popen(_subprocess_cmd(arch, kernels, dtypes, quick), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def collect(proc: subprocess.Popen, timeout: Optional[float] = None) -> list[Result]:
    out, err = proc.communicate(timeout=timeout)
    lines = [ln for ln in out.splitlines() if ln.startswith("[")]
    if not lines:
        raise RuntimeError(f"AOT subprocess exited with {proc.returncode} and no results:\n{err[-3000:]}")
    return [Result(**r) for r in json.loads(lines[-1])]


def _compile_in_subprocess(arch, kernels, dtypes, quick) -> list[Result]:
    return collect(start_subprocess(arch, kernels, dtypes, quick))


def format_table(results: list[Result]) -> str:
    rows = [("kernel", "config", "dtype", "arch", "ok", "ptx KiB", "cubin KiB", "smem KiB", "warps", "s")]
    for r in results:
        rows.append((r.kernel, r.label, r.dtype, f"sm_{r.arch}", "yes" if r.ok else "NO: " + r.error,
                     f"{r.ptx_bytes / 1024:.0f}", f"{r.cubin_bytes / 1024:.0f}", f"{r.shared_bytes / 1024:.1f}",
                     str(r.num_warps), f"{r.seconds:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastdiff.kernels.aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="compute capabilities (80 90)")
    p.add_argument("--dtype", nargs="+", choices=[str(d).split(".")[1] for d in DTYPES], help="default: all")
    p.add_argument("--kernel", nargs="+", choices=list(KERNELS),
                   help="configuration sources, default: all ('models': what the shipped models launch)")
    p.add_argument("--quick", action="store_true", help="only the QUICK subset of configurations")
    p.add_argument("--json", action="store_true", help="print the results as one JSON line")
    a = p.parse_args(argv)
    dtypes = tuple(getattr(torch, d) for d in a.dtype) if a.dtype else DTYPES
    results = []
    for arch in a.arch:
        results += compile_all(arch, a.kernel, dtypes, a.quick)
    if a.json:
        print(json.dumps([asdict(r) for r in results]))
        return 0
    print(format_table(results))
    bad = [r for r in results if not r.ok]
    print(f"\n{len(results) - len(bad)}/{len(results)} compiled")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
