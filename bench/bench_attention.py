"""Attention forward: fastdiff's Triton flash kernel vs torch's ``F.scaled_dot_product_attention``.

Shapes: Stable Diffusion 1.5 at 512x512 (B=2, H=8, N=4096, D=40; self, and cross with 77 text tokens),
SD2's D=64, DiT-XL/2 (B=2, H=16, N=256, D=72); float16 and bfloat16. Reported: median and p90 latency
(CUDA events after warm-up), TFLOP/s counting 4*B*H*Nq*Nk*D, and the speed-ups over SDPA with its own
backend choice (cuDNN's kernel on Hopper with torch 2.11; the "sdpa" row names it) and over SDPA pinned to
its flash backend. SDPA pinned to each other backend is timed too. Goal on an H100 / H200 (issue 4): no
slower than SDPA (flash) at D = 40 / 64 / 72 in float16.

    python bench/bench_attention.py [--dtype float16 bfloat16]  (default float16) [--iters 100] [--split]
    pytest bench/bench_attention.py   # pytest-benchmark functions (GPU only)
"""

from __future__ import annotations

import argparse
import os
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from kernel_timing import benchmark_synchronized, kernel_bench_main, time_cuda
from sdpa_backends import chosen_backend, pinned_sdpa

CASES = [  # name, B, H, Nq, Nk, D
    ("sd15 self", 2, 8, 4096, 4096, 40),
    ("sd15 cross", 2, 8, 4096, 77, 40),
    ("sd2 self", 2, 5, 4096, 4096, 64),
    ("sd2 cross", 2, 5, 4096, 77, 64),
    ("dit-xl/2 self", 2, 16, 256, 256, 72),
]


def candidates(q, k, v, split: bool = False, pinned=("flash", "efficient", "cudnn")):
    """name -> fn for one problem. ``pinned``: the SDPA backends to time pinned (each a row of its own)."""
    import importlib

    from fastdiff.kernels import attention, attention_tma

    impls = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v), **pinned_sdpa(q, k, v, pinned),
             "triton": lambda: attention(q, k, v)}
    if split and q.shape[-1] & (q.shape[-1] - 1):  # off a power of two: the forced main + tail split
        impls["split"] = lambda: _with_split(attention, q, k, v)
    if importlib.import_module("fastdiff.kernels.attention_tma").supported(q, k, v)[0]:  # Hopper+: TMA descriptors
        impls["triton tma"] = lambda: attention_tma(q, k, v)
    return impls


def _with_split(attention, q, k, v):
    """attention(q, k, v) with FASTDIFF_ATTENTION_SPLIT=1 (read at launch, so a captured graph holds the split)."""
    with mock.patch.dict(os.environ, {"FASTDIFF_ATTENTION_SPLIT": "1"}):
        return attention(q, k, v)


def run(dtypes=(torch.float16, torch.bfloat16), iters: int = 100, split: bool = False) -> list[dict]:
    rows = []
    for name, B, H, NQ, NK, D in CASES:
        for dtype in dtypes:
            q = torch.randn(B, H, NQ, D, device="cuda", dtype=dtype)
            k = torch.randn(B, H, NK, D, device="cuda", dtype=dtype)
            v = torch.randn(B, H, NK, D, device="cuda", dtype=dtype)
            flops = 4 * B * H * NQ * NK * D
            row = dict(case=name, shape=f"B{B} H{H} Nq{NQ} Nk{NK} D{D}", dtype=str(dtype).split(".")[1])
            timed = {}
            for impl, fn in candidates(q, k, v, split).items():
                try:
                    timed[impl] = time_cuda(fn, iters=iters)
                except Exception as e:  # a pinned SDPA backend that cannot run this problem, a kernel that fails
                    # to compile: an "unavailable" row, and the other implementations still run
                    torch.cuda.synchronize()
                    rows.append(dict(row, impl=impl, unavailable=str(e).splitlines()[0][:80]))
            rows.extend(timed_rows(row, timed, flops, chosen_backend(q, k, v)))
    return rows


def timed_rows(row: dict, timed: dict, flops: int, chosen: str) -> list[dict]:
    """One row per implementation: its (median, p90) ms, TFLOP/s and speed-ups over SDPA's own choice and over
    SDPA pinned to flash (None where flash could not run)."""
    base, flash = timed["sdpa"][0], timed.get("sdpa flash", (None,))[0]
    return [dict(row, impl=f"sdpa ({chosen})" if impl == "sdpa" else impl, median_ms=med, p90_ms=p90,
                 tflops=flops / (med * 1e-3) / 1e12, speedup=base / med,
                 vs_flash=flash / med if flash else None)
            for impl, (med, p90) in timed.items()]


def print_rows(rows) -> None:
    print(f"{'case':<15}{'shape':<28}{'dtype':<10}{'impl':<16}{'median us':>10}{'p90 us':>9}{'TFLOP/s':>9}"
          f"{'vs sdpa':>9}{'vs flash':>10}")
    for r in rows:
        head = f"{r['case']:<15}{r['shape']:<28}{r['dtype']:<10}{r['impl']:<16}"
        if "unavailable" in r:
            print(f"{head}  unavailable: {r['unavailable']}")
            continue
        vs_flash = f"{r['vs_flash']:>9.2f}x" if r["vs_flash"] else f"{'-':>10}"
        print(f"{head}{r['median_ms'] * 1e3:>10.1f}{r['p90_ms'] * 1e3:>9.1f}{r['tflops']:>9.1f}"
              f"{r['speedup']:>8.2f}x{vs_flash}")


def main(argv=None) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--split", action="store_true",
                     help="also time the head-dim split (FASTDIFF_ATTENTION_SPLIT=1; experimental: it computed "
                          "wrong results on an H200 with tiles of 64+ rows and keys, so it tunes over the others)")
    known, rest = pre.parse_known_args(argv)
    return kernel_bench_main("bench_attention", __doc__.split("\n\n")[0],
                             lambda dtypes, iters: run(dtypes, iters, known.split), print_rows, rest, parents=[pre])


# ----------------------------------------------------------------------------------- pytest-benchmark
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu
@pytest.mark.parametrize("impl", ["sdpa", "sdpa flash", "triton"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_attention(benchmark, impl, case):
    _, B, H, NQ, NK, D = case
    q = torch.randn(B, H, NQ, D, device="cuda", dtype=torch.float16)
    k = torch.randn(B, H, NK, D, device="cuda", dtype=torch.float16)
    fn = candidates(q, k, k, pinned=("flash",))[impl]

    benchmark_synchronized(benchmark, fn)


if __name__ == "__main__":
    raise SystemExit(main())
