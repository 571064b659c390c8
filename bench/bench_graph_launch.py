"""Why does a CUDA graph holding SDPA launch slowly? Host and device time of replaying one graph of N
attention calls, per attention implementation.

In the H200 run of 2026-11-26 a captured sampling loop whose attention ran through
``F.scaled_dot_product_attention`` took 204 µs (DiT-XL/2) and 3116 µs (SD1.5) of host time per step in
``graph.replay()``. With fastdiff's Triton attention the same loop took 7 and 46 µs per step. This script
separates that effect from the rest of the model. It captures ``N`` calls of one attention problem (SD1.5
self-attention by default) for each of these:

- SDPA with its own backend choice;
- SDPA pinned to each backend the machine has (flash, efficient, cudnn);
- the Triton kernel.

For each it reports the backend SDPA picks, the host µs of ``graph.replay()`` per captured call, and the
device µs per call. It then profiles where the rest of a replayed ``generate`` call's host time goes (the
set-up around the replay: noise, labels, static copies).

Run 4 left a gap: 50 cuDNN attention calls in one graph cost 2.2 µs each to replay, but SD1.5's loop graph
(32 attention calls per step, 640 in a 20-step loop, among about 10,000 other kernels) cost 3116 µs per step,
about 97 µs per attention call. ``--calls 50,640`` measures the long graph too (a host cost per call that grows
with the graph's length means ``graph.replay()`` waits for the GPU to take in work, not a launch cost), and
``--between none,gemm`` puts a projection GEMM (the attention's output projection) between the calls, as in a
model (cuDNN nodes among cuBLAS nodes).

    python bench/bench_graph_launch.py [--calls 50[,640]] [--between none[,gemm]] [--shape 2,8,4096,40]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from sdpa_backends import chosen_backend, pinned_sdpa


def measure(fn, calls: int, reps: int = 10, busy_cycles: int = 0) -> tuple[float, float]:
    """(host µs of graph.replay() per captured call, device µs per call), medians over ``reps`` replays.
    ``busy_cycles``: a GPU sleep of that many clock cycles queued before each replay, so the replay is launched
    while the GPU is still busy (a launch that waits for the GPU to take in work then shows as host time)."""
    from kernel_timing import capture_graph

    def body():
        for _ in range(calls):
            fn()

    graph = capture_graph(body)
    graph.replay()
    torch.cuda.synchronize()
    host, device = [], []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if busy_cycles:
            torch.cuda._sleep(busy_cycles)
        start.record()
        t0 = time.perf_counter()
        graph.replay()
        host.append(time.perf_counter() - t0)
        end.record()
        end.synchronize()
        device.append(start.elapsed_time(end) * 1e-3)
    return statistics.median(host) / calls * 1e6, statistics.median(device) / calls * 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", default="50", help="attention calls captured in one graph (a comma list: each)")
    p.add_argument("--between", default="none", help="what runs between two attention calls: none, gemm (the "
                   "output projection, (B*N, H*D) x (H*D, H*D)); a comma list: each")
    p.add_argument("--shape", default="2,8,4096,40", help="B,H,N,D (default: SD1.5 self-attention)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    p.add_argument("--pipeline", default="arch:tiny-dit", metavar="MODEL",
                   help="also profile the host side of one loop-graphed generate call of MODEL ('' to skip)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps of the profiled call")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_graph_launch: needs a CUDA GPU (none found); nothing measured")
        return 0
    b, h, n, d = (int(s) for s in a.shape.split(","))
    dtype = getattr(torch, a.dtype)
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=dtype) for _ in range(3))
    tokens = torch.randn(b * n, h * d, device="cuda", dtype=dtype)
    proj = torch.randn(h * d, h * d, device="cuda", dtype=dtype) / (h * d) ** 0.5
    from fastdiff.kernels import attention

    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"shape {a.shape} {a.dtype}; SDPA's own choice: {chosen_backend(q, k, v)}")
    print(f"{'calls':>6} {'between':<8}{'implementation':<22}{'host us/call':>13}{'device us/call':>16}")
    variants = {"sdpa (own choice)": lambda: F.scaled_dot_product_attention(q, k, v), **pinned_sdpa(q, k, v),
                "triton": lambda: attention(q, k, v)}
    first = True
    for calls in (int(c) for c in a.calls.split(",")):
        for between in a.between.split(","):
            for name, fn in variants.items():
                if not first and name not in ("sdpa (own choice)", "triton"):
                    continue  # the long / mixed graphs: SDPA's own choice against the Triton kernel only
                body = fn if between == "none" else (lambda fn=fn: (fn(), tokens @ proj))
                try:
                    host, dev = measure(body, calls)
                    print(f"{calls:>6} {between:<8}{name:<22}{host:>13.1f}{dev:>16.1f}")
                except Exception as e:  # a backend this GPU / shape does not support
                    print(f"{calls:>6} {between:<8}{name:<22}  unavailable: {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:80]}")
            first = False
    # the longest graph again, launched behind 50 ms of queued GPU work: if its replay's host time grows by about
    # what the GPU had queued, graph.replay() waits for the GPU (a full launch queue), and the "host cost" of
    # the rows above is waiting, not launch work
    calls = max(int(c) for c in a.calls.split(","))
    cycles = _cycles_for(50e-3)
    for name in ("sdpa (own choice)", "triton"):
        try:
            host, dev = measure(variants[name], calls, busy_cycles=cycles)
            print(f"{calls:>6} {'busy50ms':<8}{name:<22}{host:>13.1f}{dev:>16.1f}")
        except Exception as e:  # as above: one implementation's failure is a row, not the step's end
            print(f"{calls:>6} {'busy50ms':<8}{name:<22}  unavailable: {type(e).__name__}: "
                  f"{str(e).splitlines()[0][:80]}")
    if a.pipeline:
        profile_generate(a.pipeline, a.steps)
    return 0


def _cycles_for(seconds: float) -> int:
    """GPU clock cycles that ``torch.cuda._sleep`` spins for about ``seconds`` (measured here, once)."""
    probe = 10_000_000
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(probe)
    end.record()
    end.synchronize()
    return int(probe * seconds / max(start.elapsed_time(end) * 1e-3, 1e-6))


def profile_generate(model: str, steps: int) -> None:
    """Where the host time of one replayed ``generate`` call goes (outside graph.replay()): the torch
    profiler's CPU view of one call of a loop-graphed pipeline, top rows by CPU time."""
    import fastdiff
    from fastdiff.runtime.config import OptimizeConfig

    pipe = fastdiff.load(model, device="cuda", dtype=torch.float16)
    pipe.optimize(OptimizeConfig(backend="triton", kernel_ops="all", cuda_graphs=True, graph_scope="loop",
                                 batch_buckets=(1,)))
    labels = torch.tensor([1], device="cuda") if pipe.spec.num_classes else None
    kw = dict(seeds=[0], steps=steps, sampler="dpmpp_2m", cfg_scale=4.0 if labels is not None else 1.0,
              class_labels=labels, progress=False)
    for _ in range(3):
        pipe.generate(**kw)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    pipe.generate(**kw)
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    print(f"{model}: one loop-graphed generate call ({steps} steps): host {host * 1e6:.0f} us, of which "
          f"graph.replay() {pipe.loop_graphs.last_replay_host_s * 1e6:.0f} us")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        pipe.generate(**kw)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=40))


if __name__ == "__main__":
    raise SystemExit(main())
