"""``graph_scope="loop"``: the whole fixed-length sampling loop (CFG and sampler arithmetic included) in
one captured graph.

What makes a loop capturable: sigmas are host floats (samplers never read the device), and every
random draw a stochastic sampler makes is known in advance. ``RecordedNoise`` learns the sequence of
draws on a warm-up run; each replay refills static noise buffers from the request's per-sample
generators in that same order, so a replayed sample equals the eager one for its seed.

The capture goes through a ``graph_factory`` (``CudaGraph`` on a GPU), so the logic is tested on a CPU
with a stand-in graph.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Callable, Optional

import torch

from ..utils.trees import map_tensors, zip_tensors


class RecordedNoise:
    """A sampler ``noise(step_index, like)`` source that serves pre-filled static buffers in order."""

    def __init__(self):
        self.shapes: list[tuple] = []  # one per draw, learned on the warm-up run
        self.buffers: list[torch.Tensor] = []
        self.recording = True
        self.cursor = 0

    def __call__(self, step_index: int, like: torch.Tensor) -> torch.Tensor:
        if self.recording:
            self.shapes.append((tuple(like.shape), like.dtype, like.device))
            buf = torch.zeros_like(like)
            self.buffers.append(buf)
            return buf
        buf = self.buffers[self.cursor]
        self.cursor += 1
        return buf

    def freeze(self) -> None:
        self.recording = False

    def rewind(self) -> None:
        self.cursor = 0

    def refill(self, source) -> None:
        """Draw this request's noise from ``source`` (a NoiseSource) in the recorded order."""
        for buf in self.buffers:
            buf.copy_(source(0, buf))


class LoopGraphCache:
    """Captured sampling loops keyed by everything that fixes the loop's shape and arithmetic."""

    def __init__(self, max_graphs: int = 16, graph_factory: Optional[Callable] = None):
        from .graphs import CudaGraph

        self.max_graphs = max_graphs
        self.graph_factory = graph_factory or CudaGraph
        self.entries: "collections.OrderedDict[tuple, dict]" = collections.OrderedDict()
        self.pool = None
        self.captures = 0
        # host seconds of the last graph.replay() call alone (the launch of the whole loop), for benchmarks
        self.last_replay_host_s: Optional[float] = None
        # one run at a time from the copies into the static buffers (latents, conditioning, recorded noise)
        # to the clone of the output: threads sharing a pipe would otherwise mix their inputs
        self._lock = threading.RLock()

    def run(self, key: tuple, run_loop: Callable, latents: torch.Tensor, cond: dict, noise_source) -> torch.Tensor:
        """``run_loop(x, cond, noise) -> x0`` replayed from a captured graph for ``key``.

        cond: the tensors the loop reads (class labels, text states, uncond ...), copied into static
        buffers; the key must pin their shapes and every host-side setting (sampler, steps, cfg scale).
        """
        with self._lock:
            return self._run_locked(key, run_loop, latents, cond, noise_source)

    def _run_locked(self, key, run_loop, latents, cond, noise_source) -> torch.Tensor:
        entry = self.entries.get(key)
        if entry is None:
            static_x = latents.clone()
            static_cond = _clone_tree(cond)
            noise = RecordedNoise()
            run_loop(static_x, static_cond, noise)  # warm-up: learns the noise draws
            noise.freeze()

            def loop(x, _cond=static_cond, _noise=noise):
                _noise.rewind()
                return run_loop(x, _cond, _noise)

            graph = self.graph_factory(loop, [static_x], pool=self.pool)
            self.pool = getattr(graph, "pool", self.pool)
            self.captures += 1
            # the entry keeps ``loop`` (and through it the denoiser and every tensor the capture read,
            # e.g. cached timestep tensors) alive as long as the graph: a replay reads those addresses
            entry = dict(graph=graph, x=static_x, cond=static_cond, noise=noise, loop=loop)
            self.entries[key] = entry
            while len(self.entries) > self.max_graphs:
                self.entries.popitem(last=False)
        else:
            self.entries.move_to_end(key)
        entry["x"].copy_(latents)
        _copy_tree(entry["cond"], cond)
        entry["noise"].refill(noise_source)
        entry["noise"].rewind()
        t0 = time.perf_counter()
        out = entry["graph"].replay()
        self.last_replay_host_s = time.perf_counter() - t0
        return out.clone()


def _clone_tree(d):
    return map_tensors(torch.clone, d)


def _copy_tree(dst, src):
    zip_tensors(lambda b, u: b.copy_(u), dst, src)
