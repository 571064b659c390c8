"""Shared by the kernel benchmarks: a CUDA-event timer and the common command line.

Each ``bench/bench_<op>.py`` supplies ``run(dtypes, iters, flush)`` and ``print_rows(rows)``; this module
times with CUDA events after warm-up (optionally flushing L2 before each call) and reports median / p90.
"""

from __future__ import annotations

import argparse
import statistics

import torch


def time_cuda(fn, warmup: int = 10, iters: int = 100, flush: bool = False) -> tuple[float, float]:
    """(median, p90) milliseconds of fn() with CUDA events; ``flush`` clears L2 before each timed call."""
    scratch = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda") if flush else None
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        if scratch is not None:
            scratch.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(0.9 * len(times)))]


def kernel_bench_main(name: str, description: str, run, print_rows, argv=None, flush_option: bool = False) -> int:
    """Parse --dtype / --iters (/ --no-flush), skip cleanly without a GPU, run and print the table."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--dtype", nargs="+", default=["float16"], choices=["float16", "bfloat16", "float32"])
    p.add_argument("--iters", type=int, default=100)
    if flush_option:
        p.add_argument("--no-flush", action="store_true", help="keep L2 warm between iterations")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"{name}: needs a CUDA GPU (none found); nothing measured")
        return 0
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    dtypes = tuple(getattr(torch, d) for d in a.dtype)
    rows = run(dtypes, a.iters, not a.no_flush) if flush_option else run(dtypes, a.iters)
    print_rows(rows)
    return 0


def benchmark_synchronized(benchmark, fn) -> None:
    """pytest-benchmark timing of fn() that waits for the GPU after each call (host timers)."""
    def step():
        fn()
        torch.cuda.synchronize()

    benchmark(step)
