"""End-to-end sampling latency on the CPU: ``pipe.generate`` on small random-weight models.

    pytest bench/bench_e2e.py --benchmark-only            # pytest-benchmark table
    python bench/bench_e2e.py                             # plain timings, no pytest

The figure is one generate call (noise + the whole sampling loop, CFG when asked; no decoding). For
backend comparisons and diffusers ratios use ``fastdiff bench``; this file tracks regressions of the
eager path on a machine without a GPU.
"""

from __future__ import annotations

import time

import pytest
import torch

import fastdiff

STEPS = 4
CASES = [  # (source, batch, cfg, class label)
    ("arch:tiny-unet", 1, 1.0, None),
    ("arch:tiny-unet", 4, 1.0, None),
    ("arch:tiny-dit", 1, 1.0, 3),
    ("arch:tiny-dit", 4, 4.0, 3),
]

_PIPES: dict = {}


def _pipe(source):
    if source not in _PIPES:
        _PIPES[source] = fastdiff.load(source, device="cpu")
    return _PIPES[source]


def _call(source, batch, cfg, label):
    pipe = _pipe(source)
    labels = [label] * batch if label is not None else None
    return lambda: pipe.generate(n=batch, steps=STEPS, sampler="dpmpp_2m", cfg_scale=cfg, class_labels=labels,
                                 seed=0, progress=False)


@pytest.mark.parametrize("source, batch, cfg, label", CASES,
                         ids=[f"{s.split(':')[1]}-b{b}-cfg{c:g}" for s, b, c, _ in CASES])
def test_generate_e2e(benchmark, source, batch, cfg, label):
    fn = _call(source, batch, cfg, label)
    fn()  # warm-up (first-call allocations, lazy imports)
    benchmark.extra_info.update(steps=STEPS, batch=batch, cfg=cfg, threads=torch.get_num_threads())
    out = benchmark.pedantic(fn, rounds=5, iterations=1)
    assert out.shape[0] == batch and torch.isfinite(out).all()


if __name__ == "__main__":
    for case in CASES:
        fn = _call(*case)
        fn()
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        ts.sort()
        print(f"{case[0]:16s} batch {case[1]:2d} cfg {case[2]:g}: median {ts[2] * 1e3:8.1f} ms "
              f"({STEPS} steps, {torch.get_num_threads()} threads)")
