"""Python overhead per sampler step: fastdiff vs diffusers' ``scheduler.step``, CPU, tiny tensor.

The network is trivial (one multiply), so what is timed is the sampler's own per-step cost: for
diffusers ``scale_model_input`` + ``step``; for fastdiff the sampler loop with (a) a trivial x0
denoiser (sampler only) and (b) the same trivial network behind ``DiscreteDenoiser`` (the fair
comparison: diffusers' step also converts the network output to x0). Times are per network evaluation
(Heun makes two per step). Goal: fastdiff (b) <= 1/3 of diffusers.

    python bench/bench_sampler_overhead.py [--steps 20] [--repeats 40]
    pytest bench/bench_sampler_overhead.py --benchmark-only        # with pytest-benchmark
"""

from __future__ import annotations

import argparse
import inspect
import logging
import statistics
import time
import warnings

import torch

from fastdiff.denoiser import DiscreteDenoiser, EDMDenoiser
from fastdiff.noise import NoiseSource
from fastdiff.scheduler_config import plan_from_scheduler_config

SHAPE = (1, 4, 8, 8)

# fastdiff sampler  <-  diffusers scheduler (class, config)
PAIRS = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++")),
    "dpmpp_3m": ("DPMSolverMultistepScheduler", dict(solver_order=3)),
    "dpm_solver": ("DPMSolverSinglestepScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", dict(solver_order=3)),
    "edm(euler)": ("EDMEulerScheduler", {}),
}


def trivial_model(x, t, **cond):
    return x * 0.1


def _diffusers_scheduler(cls, cfg):
    import diffusers
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(diffusers, cls)(**cfg)


def diffusers_loop(sched, steps):
    """One diffusers run; returns (seconds, network evaluations)."""
    sched.set_timesteps(steps)
    x = torch.randn(SHAPE) * sched.init_noise_sigma
    gen = torch.Generator().manual_seed(0)
    kw = {"generator": gen} if "generator" in inspect.signature(sched.step).parameters else {}
    t0 = time.perf_counter()
    for t in sched.timesteps:
        out = trivial_model(sched.scale_model_input(x, t), t)
        x = sched.step(out, t, x, **kw).prev_sample
    return time.perf_counter() - t0, len(sched.timesteps)


def fastdiff_loop(plan, denoiser, evals):
    src = NoiseSource([0])
    x = torch.randn(SHAPE)
    t0 = time.perf_counter()
    plan.sample(denoiser, x, noise=src)
    return time.perf_counter() - t0, evals


def _plan(name, steps):
    cls, cfg = PAIRS[name]
    plan = plan_from_scheduler_config({"_class_name": cls, **cfg}, steps)
    evals = 2 * steps - 1 if plan.sampler == "heun" else steps
    adapter = (EDMDenoiser if plan.denoiser_kind == "edm" else DiscreteDenoiser)
    full = adapter(trivial_model, **plan.denoiser_options)
    return plan, full, evals


def measure(name, steps=20, repeats=40):
    """Per-evaluation microseconds (median, p90) for diffusers, fastdiff sampler-only, fastdiff + adapter."""
    cls, cfg = PAIRS[name]
    plan, full, evals = _plan(name, steps)
    bare = lambda x, sigma, **k: x * 0.5  # noqa: E731  (an x0 denoiser: sampler cost only)
    sched = _diffusers_scheduler(cls, cfg)
    runs = {"diffusers": lambda: diffusers_loop(sched, steps),
            "fastdiff": lambda: fastdiff_loop(plan, bare, evals),
            "fastdiff+adapter": lambda: fastdiff_loop(plan, full, evals)}
    out = {}
    for key, run in runs.items():
        for _ in range(3):                         # warm-up
            run()
        per = sorted(1e6 * s / n for s, n in (run() for _ in range(repeats)))
        out[key] = (statistics.median(per), per[int(0.9 * (len(per) - 1))])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"per network evaluation, microseconds (median / p90), tensor {SHAPE}, {args.steps} steps, "
          f"torch {torch.__version__}, {args.threads} thread(s)")
    head = (f"{'sampler':16s} {'diffusers':>15s} {'fastdiff':>15s} {'fastdiff+adapter':>17s} "
            f"{'ratio':>6s} {'ratio+ad':>8s}")
    print(head)
    print("-" * len(head))
    ratios = []
    for name in PAIRS:
        r = measure(name, args.steps, args.repeats)
        ratio, ratio_ad = (r[k][0] / r["diffusers"][0] for k in ("fastdiff", "fastdiff+adapter"))
        ratios.append((ratio, ratio_ad))
        cells = " ".join(f"{r[k][0]:7.1f}/{r[k][1]:<7.1f}" for k in ("diffusers", "fastdiff", "fastdiff+adapter"))
        print(f"{name:16s} {cells}  {ratio:5.2f} {ratio_ad:8.2f}")
    print(f"ratio = fastdiff (trivial x0 denoiser) median / diffusers median: worst {max(r[0] for r in ratios):.2f} "
          f"(goal <= 0.33); with the DiscreteDenoiser/EDMDenoiser adapter: worst {max(r[1] for r in ratios):.2f}")
    return ratios


try:  # pytest-benchmark entry points (the bench stays out of tests/)
    import pytest

    @pytest.mark.parametrize("name", list(PAIRS))
    def test_fastdiff_sampler_overhead(benchmark, name):
        plan, full, evals = _plan(name, 20)
        benchmark(fastdiff_loop, plan, full, evals)

    @pytest.mark.parametrize("name", list(PAIRS))
    def test_diffusers_scheduler_overhead(benchmark, name):
        sched = _diffusers_scheduler(*PAIRS[name])
        benchmark(diffusers_loop, sched, 20)
except ImportError:  # pragma: no cover
    pass


if __name__ == "__main__":
    main()
