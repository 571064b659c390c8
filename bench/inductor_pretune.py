"""Autotune torch.compile of a bench's diffusers model ahead of the timed run: nothing of fastdiff runs.

    python bench/inductor_pretune.py arch:sd15-unet --cfg 7.5 --dtype fp16 --steps 20 --sampler dpmpp_2m

Takes ``fastdiff bench``'s flags and builds the same diffusers model, compiled the same way
(``torch.compile(model, mode=--compile-mode or "max-autotune" on a GPU, dynamic=False)``), and runs its
sampling loop once per ``--batch``: Inductor's first call autotunes every GEMM / convolution problem and keeps
the timings in its cache folder (``TORCHINDUCTOR_CACHE_DIR``). A later ``fastdiff bench --compare
diffusers,compile`` with the same flags and cache finds them there and goes straight to timing.

Why: max-autotune of the diffusers SD1.5 UNet takes longer than one GPU call (about 55 problems, 6-49 s each;
``bench/gpu_check.sh``). In the timed stage fastdiff's rows come first (77 s of Triton compiling on a fresh
machine), so every second of a call given to this script instead goes to autotuning. Its rows (the first call's
seconds, then one repeat) are not figures to report.
"""

from __future__ import annotations

import argparse
import sys


def parse(argv: list[str]) -> argparse.Namespace:
    from fastdiff.commands import bench

    parser = argparse.ArgumentParser(prog="inductor_pretune.py")
    bench.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", *argv])
    if args.compare:
        parser.error("--compare: this script always compiles the diffusers model (diffusers,compile)")
    # one call compiles and autotunes; one more shows the compiled model runs
    args.warmup, args.repeat = 1, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)

    import torch

    from fastdiff.commands import bench, bench_diffusers
    from fastdiff.commands.generate import default_device

    device = default_device(args.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    rows = bench_diffusers._bench_diffusers(args, args.model, ["diffusers", "compile"],
                                            bench._parse_batches(args.batch), device, log)
    for row in rows:
        first = row.get("first_call_s")
        print(f"{row['impl']:18s} batch {row['batch']}: {row['status']}"
              + (f", first call {first:.1f} s" if first is not None else "")
              + (f" ({row['reason']})" if row.get("reason") else ""))
    compiled = [r for r in rows if r["impl"] == "diffusers+compile"]
    return 0 if compiled and all(r["status"] == "ok" for r in compiled) else 1


if __name__ == "__main__":
    sys.exit(main())
