"""Honest timing for benchmarks: device-synchronised wall clocks, percentiles, peak memory.

On a CUDA device each call is bracketed by CUDA events recorded on the current stream and the host waits
for the end event, so the figure is the device time of the whole call including any host work that
delays the launches. On the CPU it is ``time.perf_counter``.

Peak memory: ``torch.cuda.max_memory_allocated`` (the caching allocator's peak of live tensors) on a
GPU; on the CPU the growth of the process's peak resident set size (``ru_maxrss``) during the
measurement, which reads 0 when an earlier phase of the process already peaked higher.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch


def percentile(values, q: float) -> float:
    """Linear-interpolated percentile (numpy's default method), q in [0, 100]."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(times) -> dict:
    """median / p90 / p99 / mean / min / max of a list of seconds."""
    times = list(times)
    return {"median_s": percentile(times, 50), "p90_s": percentile(times, 90), "p99_s": percentile(times, 99),
            "mean_s": sum(times) / len(times) if times else float("nan"),
            "min_s": min(times) if times else float("nan"), "max_s": max(times) if times else float("nan")}


def timed_call(fn: Callable, device: torch.device, host: Optional[list] = None):
    """(result, seconds) of one call, synchronised with ``device``.

    host: if given, the host-side seconds of the call (from its start until ``fn`` returns, before waiting
    for the device) are appended to it. On a GPU that is the CPU time spent issuing the work (launch
    overhead) as long as ``fn`` itself never waits for the device; on the CPU it equals the call's time.
    """
    device = torch.device(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        t0 = time.perf_counter()
        out = fn()
        t1 = time.perf_counter()
        end.record()
        end.synchronize()
        if host is not None:
            host.append(t1 - t0)
        return out, start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    out = fn()
    t1 = time.perf_counter()
    if host is not None:
        host.append(t1 - t0)
    return out, t1 - t0


def memory_method(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated (peak of live tensors during the timed calls)"
    return "CPU: growth of the process's peak RSS (ru_maxrss) during the timed calls; 0 if an earlier phase peaked higher"


def _peak_rss_bytes() -> Optional[int]:
    try:
        import resource
        import sys

        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(r if sys.platform == "darwin" else r * 1024)
    except Exception:  # pragma: no cover - Windows
        return None


class PeakMemory:
    """``with PeakMemory(device) as m: ...``; then ``m.bytes`` (see ``memory_method``)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.bytes: Optional[int] = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = 0
        else:
            self._base = _peak_rss_bytes()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = int(torch.cuda.max_memory_allocated(self.device))
        else:
            now = _peak_rss_bytes()
            self.bytes = None if now is None or self._base is None else max(0, now - self._base)
        return False


@dataclass
class Measurement:
    """One (thing, batch) measured: the first call (compile / capture / JIT included), steady calls."""

    first_s: float
    times_s: list = field(default_factory=list)
    peak_memory_bytes: Optional[int] = None
    host_times_s: list = field(default_factory=list)  # host-side seconds of each timed call (see timed_call)

    def stats(self) -> dict:
        s = summarize(self.times_s)
        s["first_call_s"] = self.first_s
        # what the first call costs beyond a steady one: compilation, graph capture, kernel JIT, autotuning
        s["warmup_overhead_s"] = max(0.0, self.first_s - s["median_s"])
        s["peak_memory_bytes"] = self.peak_memory_bytes
        s["times_s"] = list(self.times_s)
        s["host_median_s"] = percentile(self.host_times_s, 50) if self.host_times_s else None
        return s


def measure(fn: Callable, device, *, warmup: int = 1, repeat: int = 5,
            first: Optional[Callable] = None) -> Measurement:
    """Time ``fn``: one first call (timed on its own), ``warmup - 1`` more untimed, ``repeat`` timed.

    ``warmup`` counts the first call, so ``warmup=1`` means the first call is the only warm-up.
    ``first``: a callable used for the first call instead of ``fn`` (e.g. one that also counts network calls).
    """
    device = torch.device(device)
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, found {repeat}")
    _, first_s = timed_call(first or fn, device)
    for _ in range(max(0, warmup - 1)):
        timed_call(fn, device)
    times, host = [], []
    with PeakMemory(device) as mem:
        for _ in range(repeat):
            _, t = timed_call(fn, device, host)
            times.append(t)
    return Measurement(first_s, times, mem.bytes, host)
