"""ONNX export cost and ONNX Runtime (CPU) vs PyTorch eager (CPU) latency, in one run.

    python bench/bench_onnxruntime.py                      # tiny-unet b1, b4; ddpm-cifar10 b1
    python bench/bench_onnxruntime.py --cases tiny-dit:1 --runs 30 --json

For each case: export time and file size, then the median latency of one network call (after warm-up)
for PyTorch eager and for the ONNX Runtime session, same inputs, same thread count; ratio = ort / torch
(< 1: ONNX Runtime is faster). Both run in float32 on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch


def _median_ms(fns, warmup: int, runs: int) -> list:
    """Median ms per call of each function; runs are interleaved (a, b, a, b, ...) so that both see the
    same machine load (a shared CI box is never quiet)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(runs):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[i].append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(t) for t in times]


def bench_case(arch: str, batch: int, warmup: int, runs: int, threads: int, folder: str) -> dict:
    import fastdiff
    from fastdiff.export.onnx import export_onnx
    from fastdiff.runtime.onnxruntime_runner import OnnxRuntimeRunner

    pipe = fastdiff.load(f"arch:{arch}")
    spec = pipe.spec
    path = os.path.join(folder, f"{arch}.onnx")
    res = export_onnx(pipe, None, path, batch=batch, progress=False)
    runner = OnnxRuntimeRunner(path, device="cpu", threads=threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, spec.in_channels, *spec.sample_size, generator=g)
    t = torch.full((batch,), 500.0)
    kw = spec.example_conditioning(batch, g)

    def eager():
        with torch.inference_mode():
            return pipe.model(x, t, **kw)

    def ort():
        return runner(x, t, **kw)

    torch_ms, ort_ms = _median_ms([eager, ort], warmup, runs)
    err = ((ort() - eager()).abs().max() / eager().abs().max()).item()
    return {"model": f"arch:{arch}", "batch": batch, "params_M": round(sum(p.numel() for p in pipe.model.parameters()) / 1e6, 2),
            "export_s": round(res.seconds, 2), "onnx_MiB": round(res.size_bytes / 2**20, 2),
            "torch_ms": round(torch_ms, 2), "ort_ms": round(ort_ms, 2), "ort_over_torch": round(ort_ms / torch_ms, 3),
            "max_rel_err": float(f"{err:.3g}")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=["tiny-unet:1", "tiny-unet:4", "ddpm-cifar10:1"],
                    help="ARCH:BATCH (arch:NAME presets)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads for both backends")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for case in args.cases:
            arch, _, b = case.partition(":")
            rows.append(bench_case(arch, int(b or 1), args.warmup, args.runs, args.threads, d))
            if not args.json:
                r = rows[-1]
                print(f"{r['model']:22s} b={r['batch']:<2d} {r['params_M']:6.2f}M params  export {r['export_s']:5.2f}s "
                      f"{r['onnx_MiB']:7.2f} MiB | torch {r['torch_ms']:8.2f} ms  ort {r['ort_ms']:8.2f} ms  "
                      f"ort/torch {r['ort_over_torch']:.2f}  (rel err {r['max_rel_err']:.1e})", flush=True)
    import onnxruntime

    meta = {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "threads": args.threads,
            "cpus": os.cpu_count(), "runs": args.runs, "warmup": args.warmup}
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows}, indent=2))
    else:
        print(f"({', '.join(f'{k}={v}' for k, v in meta.items())}; median of runs after warm-up)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
