"""GroupNorm + SiLU: fastdiff's Triton kernel (and the CUDA extension, when built) vs torch.

Shapes: Stable Diffusion 1.5's UNet, 2x320x64x64 and 2x1280x8x8, 32 groups (the issue's), and SDXL's
2x320x128x128 (21 MB, where a bandwidth fraction means more than at 5 MB); NCHW and channels-last. Reported:
device time per call in a CUDA graph (median, p90) with L2 flushed before each call ("cold") and without
("hot": in a UNet the input was just written by the previous conv, and 5 MB stays in L2), effective bandwidth
(one read and one write of x) of the cold time, and the speed-up over torch's ``F.silu(F.group_norm(x))``.
Goal on an H100 / H200: >= 2x torch and >= 70% of the memory bandwidth. A ``copy`` row per shape times torch's
``copy_`` of x into a buffer of its layout (the same bytes moved, nothing computed), the bandwidth a single
kernel reaches at that size; ``of copy`` says how close each candidate comes to it.

``--sweep`` times the launcher's knobs (strategy x split count x tile x warps) at 2x320x64x64 in both
layouts and prints the fastest configuration per layout: the data for the launcher's defaults.

    python bench/bench_group_norm.py [--dtype float16 bfloat16]  (default float16) [--iters 200] [--sweep]
    pytest bench/bench_group_norm.py   # pytest-benchmark functions (GPU only)
"""

from __future__ import annotations


import argparse
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from kernel_timing import benchmark_synchronized, kernel_bench_main, time_cuda

SHAPES = [((2, 320, 64, 64), 32), ((2, 1280, 8, 8), 32), ((2, 320, 128, 128), 32)]
SWEEP_SHAPE = ((2, 320, 64, 64), 32)
# the launcher's knobs per strategy: "groups" (programs per group slice; the default) and "rows" (statistics,
# coefficients and apply over contiguous rows, group_norm_rows.py)
SWEEP = {
    "groups": dict(num_splits=(None, 1), tile=(2048, 4096), num_warps=(4, 8)),
    "rows": dict(num_splits=(None, 64), tile=(2048, 4096, 8192), num_warps=(4, 8)),
}


def candidates(x, groups, w, b):
    """name -> zero-argument callable computing SiLU(GroupNorm(x))."""
    from fastdiff import cuda_ext
    from fastdiff.kernels import group_norm

    out = {
        "torch": lambda: F.silu(F.group_norm(x, groups, w, b, 1e-5)),
        "triton": lambda: group_norm(x, groups, w, b, 1e-5, activation="silu"),
        # the split-count sweep that tunes the launcher's choice (auto: ~1024 programs, two launches):
        # one program per group in one launch, and 4 slices per group
        "triton/1": lambda: group_norm(x, groups, w, b, 1e-5, activation="silu", num_splits=1),
        "triton/4": lambda: group_norm(x, groups, w, b, 1e-5, activation="silu", num_splits=4),
        # three launches over contiguous rows (statistics, coefficients, apply)
        "triton rows": lambda: group_norm(x, groups, w, b, 1e-5, activation="silu", strategy="rows"),
    }
    if cuda_ext.HAS_CUDA_EXT and x.is_contiguous(memory_format=torch.channels_last):
        out["cuda_ext"] = lambda: cuda_ext.group_norm_nhwc(x, groups, w, b, 1e-5, silu=True)
    return out


def inputs(shape, dtype, layout):
    x = torch.randn(shape, device="cuda", dtype=dtype) + 0.5
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(shape[1], device="cuda", dtype=dtype)
    b = torch.randn(shape[1], device="cuda", dtype=dtype)
    return x, w, b


def copy_reference(x):
    """A zero-argument callable moving GroupNorm's bytes (one read and one write of x) and computing nothing."""
    out = torch.empty_like(x)  # keeps x's memory format
    return lambda: out.copy_(x)


def _row(shape, groups, dtype, layout, impl, fn, iters, flush, base=None) -> dict:
    """One timed candidate: cold (L2 flushed, when ``flush``) and hot device time, bandwidth of the cold time."""
    nbytes = 2 * math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
    med, p90 = time_cuda(fn, iters=iters, flush=flush)
    hot, _ = time_cuda(fn, iters=iters, flush=False) if flush else (med, p90)
    return dict(shape="x".join(map(str, shape)), groups=groups, dtype=str(dtype).split(".")[1], layout=layout,
                impl=impl, median_ms=med, p90_ms=p90, hot_ms=hot, gbps=nbytes / (med * 1e-3) / 1e9,
                speedup=(base if base is not None else med) / med)


def run(dtypes=(torch.float16, torch.bfloat16), iters: int = 100, flush: bool = True) -> list[dict]:
    rows = []
    for (shape, groups), dtype, layout in itertools.product(SHAPES, dtypes, ("nchw", "channels_last")):
        x, w, b = inputs(shape, dtype, layout)
        copy = _row(shape, groups, dtype, layout, "copy", copy_reference(x), iters, flush)
        base, timed = None, []
        for name, fn in candidates(x, groups, w, b).items():
            timed.append(_row(shape, groups, dtype, layout, name, fn, iters, flush, base))
            base = timed[-1]["median_ms"] if name == "torch" else base
        copy["speedup"] = base / copy["median_ms"]
        rows.extend(dict(r, of_copy=copy["median_ms"] / r["median_ms"]) for r in [*timed, copy])
    return rows


def sweep(dtype=torch.float16, iters: int = 50, flush: bool = True) -> list[dict]:
    """The launcher's knobs at SWEEP_SHAPE, both layouts; speed-up relative to the default launch."""
    from fastdiff.kernels import group_norm

    (shape, groups), rows = SWEEP_SHAPE, []
    for layout in ("nchw", "channels_last"):
        x, w, b = inputs(shape, dtype, layout)
        base = _row(shape, groups, dtype, layout, "default",
                    lambda: group_norm(x, groups, w, b, 1e-5, activation="silu"), iters, flush)
        rows.append(base)
        for strategy, knobs in SWEEP.items():
            for splits, tile, warps in itertools.product(*knobs.values()):
                kw = dict(num_splits=splits, tile=tile, num_warps=warps, strategy=strategy)
                name = f"{strategy} s{splits or 'auto'}/t{tile}/w{warps}"
                rows.append(_row(shape, groups, dtype, layout, name,
                                 lambda kw=kw: group_norm(x, groups, w, b, 1e-5, activation="silu", **kw), iters,
                                 flush, base["median_ms"]))
    return rows


def print_rows(rows, versus: str = "vs torch") -> None:
    hdr = (f"{'shape':<16}{'dtype':<10}{'layout':<15}{'impl':<26}{'cold us':>9}{'p90 us':>9}{'hot us':>9}"
           f"{'GB/s':>8}{versus:>11}{'of copy':>9}")
    print(hdr)
    for r in rows:
        of_copy = f"{r['of_copy']:>8.2f}x" if "of_copy" in r else f"{'-':>9}"
        print(f"{r['shape']:<16}{r['dtype']:<10}{r['layout']:<15}{r['impl']:<26}{r['median_ms'] * 1e3:>9.1f}"
              f"{r['p90_ms'] * 1e3:>9.1f}{r['hot_ms'] * 1e3:>9.1f}{r['gbps']:>8.0f}{r['speedup']:>10.2f}x{of_copy}")


def print_sweep(rows) -> None:
    print_rows(rows, versus="vs default")
    for layout in ("nchw", "channels_last"):
        best = min((r for r in rows if r["layout"] == layout), key=lambda r: r["median_ms"])
        print(f"fastest {layout}: {best['impl']} {best['median_ms'] * 1e3:.1f} us cold, {best['hot_ms'] * 1e3:.1f} us "
              f"hot, {best['gbps']:.0f} GB/s, {best['speedup']:.2f}x the default launch")


def main(argv=None) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--sweep", action="store_true")
    known, rest = pre.parse_known_args(argv)
    if not known.sweep:
        return kernel_bench_main("bench_group_norm", __doc__.split("\n\n")[0], run, print_rows, rest,
                                 flush_option=True)
    return kernel_bench_main("bench_group_norm --sweep", __doc__.split("\n\n")[0],
                             lambda dtypes, iters, flush: sweep(dtypes[0], iters, flush), print_sweep, rest,
                             flush_option=True)


# ----------------------------------------------------------------------------------- pytest-benchmark
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu
@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("shape,groups", SHAPES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_group_norm_silu(benchmark, impl, shape, groups):
    x = (torch.randn(shape, device="cuda", dtype=torch.float16) + 0.5).to(memory_format=torch.channels_last)
    w = torch.randn(shape[1], device="cuda", dtype=torch.float16)
    fn = candidates(x, groups, w, w)[impl]

    benchmark_synchronized(benchmark, fn)


if __name__ == "__main__":
    raise SystemExit(main())
