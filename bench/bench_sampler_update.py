"""The samplers' state update (one DPM-Solver++(2M) step): torch vs the fused Triton / CUDA-extension kernels.

Shapes: the float32 sampler state of SD1.5 (1x4x64x64), DiT-XL/2 (1x4x32x32) and a batch of 16 SD1.5
latents. Updates: 2M (``a*x + b*m0 + c*m1``, 3 terms) and 2M SDE (+ noise, 4 terms). Candidates:

- ``torch (chain)``: the step as k-diffusion / diffusers write it, ``x*a + m0*c0 + ((m0 - m1)/r0)*c1``
  (7 element-wise kernels);
- ``torch``: ``fastdiff.state_update.combine_torch``, the same step as one linear combination (a multiply
  and an ``add_`` per further term: 3-4 kernels);
- ``triton``: ``fastdiff.kernels.lincomb`` (one kernel); ``cuda_ext``: the extension's ``sampler_update``
  (one kernel), when it is built.

Reported: device time per update inside a CUDA graph (how the ``loop`` graph scope runs it), and the speed-up
over ``torch``. The winner becomes ``GPU_DEFAULT_OPS["sampler_update"]``.

    python bench/bench_sampler_update.py [--iters 100]    (the state is float32: --dtype is ignored)
"""

from __future__ import annotations

import torch
from kernel_timing import kernel_bench_main, time_cuda

SHAPES = [(1, 4, 64, 64), (1, 4, 32, 32), (16, 4, 64, 64)]
A, C0, C1, R0 = 0.62, 0.41, -0.17, 0.93  # a 2M step's coefficients (any values time the same)


def candidates(x, m0, m1, noise, sde: bool) -> dict:
    """impl -> zero-argument callable computing one update."""
    from fastdiff import cuda_ext
    from fastdiff.kernels import lincomb
    from fastdiff.state_update import combine_torch

    terms = [(A, x), (C0 + C1 / R0, m0), (-C1 / R0, m1)] + ([(0.3, noise)] if sde else [])

    def chain():
        out = x * A + m0 * C0 + ((m0 - m1) / R0) * C1
        return out + noise * 0.3 if sde else out

    out = {"torch (chain)": chain, "torch": lambda: combine_torch(terms), "triton": lambda: lincomb(terms)}
    if cuda_ext.HAS_CUDA_EXT:
        out["cuda_ext"] = lambda: cuda_ext.sampler_update(x, m0, m1, noise if sde else None, *[c for c, _ in terms])
    return out


def run(dtypes=None, iters: int = 100) -> list[dict]:
    rows = []
    for shape in SHAPES:
        x, m0, m1, noise = (torch.randn(shape, device="cuda") for _ in range(4))
        for sde in (False, True):
            impls = candidates(x, m0, m1, noise, sde)
            times = {impl: time_cuda(fn, iters=iters) for impl, fn in impls.items()}
            base = times["torch"][0]
            for impl, (med, p90) in times.items():
                rows.append(dict(shape="x".join(map(str, shape)), update="2M SDE" if sde else "2M", impl=impl,
                                 median_ms=med, p90_ms=p90, speedup=base / med))
    return rows


def print_rows(rows) -> None:
    print(f"{'shape':<14}{'update':<9}{'impl':<16}{'median us':>10}{'p90 us':>9}{'vs torch':>10}")
    for r in rows:
        print(f"{r['shape']:<14}{r['update']:<9}{r['impl']:<16}{r['median_ms'] * 1e3:>10.2f}{r['p90_ms'] * 1e3:>9.2f}"
              f"{r['speedup']:>9.2f}x")


def main(argv=None) -> int:
    return kernel_bench_main("bench_sampler_update", __doc__.split("\n\n")[0], run, print_rows, argv)


if __name__ == "__main__":
    raise SystemExit(main())
