"""GroupNorm + SiLU: fastdiff's Triton kernel (and the CUDA extension, when built) vs torch.

Shapes: Stable Diffusion 1.5's UNet, 2x320x64x64 and 2x1280x8x8, 32 groups; NCHW and channels-last;
float16 and bfloat16. Reported: median and p90 latency (CUDA events, after warm-up, L2 flushed between
iterations), effective bandwidth counting one read and one write of x, and the speed-up over torch's
``F.silu(F.group_norm(x))``. Goal on an H100 / H200: >= 2x torch and >= 70% of the memory bandwidth.

    python bench/bench_group_norm.py [--dtype float16 bfloat16]  (default float16) [--iters 200]
    pytest bench/bench_group_norm.py   # pytest-benchmark functions (GPU only)
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from kernel_timing import benchmark_synchronized, kernel_bench_main, time_cuda

SHAPES = [((2, 320, 64, 64), 32), ((2, 1280, 8, 8), 32)]


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
    }
    if cuda_ext.HAS_CUDA_EXT and x.is_contiguous(memory_format=torch.channels_last):
        out["cuda_ext"] = lambda: cuda_ext.group_norm_nhwc(x, groups, w, b, 1e-5, silu=True)
    return out


def run(dtypes=(torch.float16, torch.bfloat16), iters: int = 100, flush: bool = True) -> list[dict]:
    rows = []
    for shape, groups in SHAPES:
        for dtype in dtypes:
            for layout in ("nchw", "channels_last"):
                x = torch.randn(shape, device="cuda", dtype=dtype) + 0.5
                if layout == "channels_last":
                    x = x.to(memory_format=torch.channels_last)
                w = torch.randn(shape[1], device="cuda", dtype=dtype)
                b = torch.randn(shape[1], device="cuda", dtype=dtype)
                nbytes = 2 * x.numel() * x.element_size()
                base = None
                for name, fn in candidates(x, groups, w, b).items():
                    med, p90 = time_cuda(fn, iters=iters, flush=flush)
                    base = med if name == "torch" else base
                    rows.append(dict(shape="x".join(map(str, shape)), groups=groups, dtype=str(dtype).split(".")[1],
                                     layout=layout, impl=name, median_ms=med, p90_ms=p90,
                                     gbps=nbytes / (med * 1e-3) / 1e9, speedup=base / med))
    return rows


def print_rows(rows) -> None:
    hdr = f"{'shape':<14}{'dtype':<10}{'layout':<15}{'impl':<10}{'median us':>10}{'p90 us':>9}{'GB/s':>8}{'vs torch':>9}"
    print(hdr)
    for r in rows:
        print(f"{r['shape']:<14}{r['dtype']:<10}{r['layout']:<15}{r['impl']:<10}{r['median_ms'] * 1e3:>10.1f}"
              f"{r['p90_ms'] * 1e3:>9.1f}{r['gbps']:>8.0f}{r['speedup']:>8.2f}x")


def main(argv=None) -> int:
    return kernel_bench_main("bench_group_norm", __doc__.split("\n\n")[0], run, print_rows, argv, flush_option=True)


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
