"""Shared by the kernel benchmarks: a CUDA-event timer and the common command line.

Each ``bench/bench_<op>.py`` supplies ``run(dtypes, iters, flush)`` and ``print_rows(rows)``.

Timing is the DEVICE time of one call, measured inside a CUDA graph: ``PER_GRAPH`` calls (each after an
optional L2 flush) are captured once and replayed between CUDA events, and the same graph without the calls
(flushes only) is subtracted. That is how the kernels run under fastdiff's CUDA graphs, and it keeps the
host's launch cost out: timing single eager calls of microsecond kernels measures Python launch overhead
instead (Triton's launcher costs tens of microseconds per call, torch's less). ``--eager-timing`` times
single eager calls between events instead (what an un-graphed model pays). A callable that cannot be
captured falls back to eager timing.

The L2 flush READS a 256 MiB buffer (a sum). A flush that writes it (``zero_()``) leaves L2 full of dirty
lines, whose write-back then lands inside the timed kernel: for a kernel of a few MB that adds up to one
more write of its input's size.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from fastdiff.utils.cuda_streams import side_stream

PER_GRAPH = 10  # calls per captured graph


MIN_MS = 1e-6  # a flush-subtracted time that noise pushed to or below zero: never a division by zero


def _percentiles(values) -> tuple[float, float]:
    """(median, p90), p90 interpolated as numpy's (the highest rank only at 10 values or fewer was the worst)."""
    from fastdiff.runtime.timing import percentile

    values = sorted(max(v, MIN_MS) for v in values)
    return statistics.median(values), percentile(values, 90)


def _event_time(run) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def capture_graph(body) -> torch.cuda.CUDAGraph:
    stream = side_stream()  # fastdiff's one side stream: a fresh one per capture kept a cuBLAS workspace each
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph (allocator, autotuning)
        body()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        body()
    return graph


def l2_flusher(flush: bool):
    """None, or a callable that evicts L2 by reading 256 MiB (leaving only clean lines behind)."""
    if not flush:
        return None
    scratch = torch.zeros(64 * 2**20, dtype=torch.float32, device="cuda")
    sink = torch.zeros((), dtype=torch.float32, device="cuda")
    return lambda: torch.sum(scratch, dim=0, out=sink)  # out= needs dim= (torch >= 2.11)


def time_in_graph(fn, iters: int = 100, flush: bool = False) -> tuple[float, float]:
    """(median, p90) device milliseconds of one fn() call, from graph replays (see the module docstring)."""
    flusher = l2_flusher(flush)

    def body(with_fn: bool):
        def run():
            for _ in range(PER_GRAPH):
                if flusher is not None:
                    flusher()
                if with_fn:
                    fn()
        return run

    work = capture_graph(body(True))
    base = capture_graph(body(False)) if flusher is not None else None  # flushes only (nothing to subtract else)
    reps = max(5, iters // PER_GRAPH)
    for g in (work, base):
        if g is not None:
            g.replay()
    torch.cuda.synchronize()
    base_ms = statistics.median(_event_time(base.replay) for _ in range(reps)) if base is not None else 0.0
    per_call = [(_event_time(work.replay) - base_ms) / PER_GRAPH for _ in range(reps)]
    return _percentiles(per_call)


def time_eager(fn, iters: int = 100, flush: bool = False) -> tuple[float, float]:
    """(median, p90) milliseconds of single eager calls between CUDA events (launch overhead included)."""
    flusher = l2_flusher(flush)
    times = []
    for _ in range(iters):
        if flusher is not None:
            flusher()
        times.append(_event_time(fn))
    return _percentiles(times)


_MODE = {"graph": True}


def time_cuda(fn, warmup: int = 10, iters: int = 100, flush: bool = False) -> tuple[float, float]:
    """(median, p90) milliseconds of fn(): in a CUDA graph (default) or eager (``--eager-timing``)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    if _MODE["graph"]:
        try:
            return time_in_graph(fn, iters, flush)
        except RuntimeError as e:  # not capturable: eager timing, which includes the host's launch cost
            torch.cuda.synchronize()
            print(f"warning: {getattr(fn, '__qualname__', fn)} could not be timed in a CUDA graph "
                  f"({type(e).__name__}: {str(e).splitlines()[0][:120]}); its row is EAGER timing (launch cost "
                  f"included)", file=sys.stderr, flush=True)
    return time_eager(fn, iters, flush)


def kernel_bench_main(name: str, description: str, run, print_rows, argv=None, flush_option: bool = False,
                      parents=()) -> int:
    """Parse --dtype / --iters (/ --no-flush) / --eager-timing, skip cleanly without a GPU, run and print.
    ``parents``: parsers of a bench's own options (already parsed by it), so that ``--help`` lists them."""
    p = argparse.ArgumentParser(description=description, parents=list(parents))
    p.add_argument("--dtype", nargs="+", default=["float16"], choices=["float16", "bfloat16", "float32"])
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--eager-timing", action="store_true",
                   help="time single eager calls (host launch overhead included) instead of graph replays")
    if flush_option:
        p.add_argument("--no-flush", action="store_true", help="keep L2 warm between iterations")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"{name}: needs a CUDA GPU (none found); nothing measured")
        return 0
    _MODE["graph"] = not a.eager_timing
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  timing: "
          f"{'eager calls' if a.eager_timing else 'device time per call in a CUDA graph'}")
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
