"""CUDA-graph replay of the network, one graph per input signature (batch bucket, resolution, dtype).

``GraphedNetwork`` wraps a network callable with the native signature. A call pads the batch up to the
next bucket, copies the inputs into that signature's static buffers, replays the captured graph and
returns the un-padded slice of the static output (cloned, so a later replay cannot overwrite it).

Graphs are captured after warm-up on a side stream, share one memory pool, and live in a bounded LRU
cache. The capture itself goes through a ``graph_factory`` so the bucketing, padding and static-buffer
logic is testable on a CPU with a stand-in graph object.
"""

from __future__ import annotations

import collections
import threading
from typing import Callable, Optional, Sequence

import torch

from ..errors import BadArgumentError
from ..utils.cuda_streams import CAPTURE_LOCK, side_stream
from ..utils.trees import map_tensors, zip_tensors


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= n; n beyond the largest bucket is an error (the caller splits batches)."""
    for b in buckets:
        if b >= n:
            return b
    raise BadArgumentError(f"batch of {n} exceeds the largest batch bucket {max(buckets)}")


def network_buckets(request_buckets: Sequence[int]) -> tuple:
    """Batch sizes the network sees for request batches from ``request_buckets``: each b and, for
    classifier-free guidance (conditional and unconditional rows in one call), 2b. Without the doubled
    sizes a guided batch-1 request would run its network batch of 2 as two calls of 1."""
    return tuple(sorted({int(b) for b in request_buckets} | {2 * int(b) for b in request_buckets}))


def pad_to(t, n: int):
    """Pad dim 0 up to n by repeating the last row (real values: no NaN / inf paths in padded rows); a tuple of
    tensors (several IP-Adapters' features) tensor by tensor."""
    if t is None or not torch.is_tensor(t):
        return map_tensors(lambda u: pad_to(u, n), t)
    if t.shape[0] == n:
        return t
    extra = t[-1:].expand(n - t.shape[0], *t.shape[1:])
    return torch.cat([t, extra], dim=0)


class CudaGraph:
    """torch.cuda.CUDAGraph capture of ``fn(*static_inputs) -> static_output`` (the real factory)."""

    def __init__(self, fn: Callable, static_inputs: list, pool=None, warmup: int = 2):
        device = next((t.device for t in static_inputs if torch.is_tensor(t) and t.is_cuda), None)
        with CAPTURE_LOCK, torch.cuda.device(device):  # (the inputs' device, current for every call below)
            stream = side_stream()  # one per device: a fresh stream per capture kept a cuBLAS workspace each
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up outside the graph (allocator, cuDNN / Triton autotune)
                for _ in range(warmup):
                    fn(*static_inputs)
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: the capture must not fail because another thread allocates or syncs meanwhile (an
            # Engine client encoding its prompt, a second thread on a shared pipe); "global" (the default) would
            # turn their CUDA calls into capture errors
            with torch.cuda.graph(self.graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
                self.output = fn(*static_inputs)
        self.pool = self.graph.pool()

    def replay(self):
        self.graph.replay()
        return self.output


class BucketPadded:
    """Network callable that only ever sees batch sizes from ``buckets`` (padded up, result sliced back).

    What a static-shape runner needs: ``torch.compile(dynamic=False)`` compiles once per bucket instead of
    once per batch size, and CUDA graphs (``GraphedNetwork``) capture once per bucket.
    """

    def __init__(self, network: Callable, buckets: Sequence[int]):
        self.network = network
        self.buckets = tuple(sorted(buckets))

    def __call__(self, x, timestep, class_labels=None, encoder_hidden_states=None, **added):
        """The native signature; ``added``: more per-sample conditioning by name (an SDXL UNet's ``text_embeds`` /
        ``time_ids``), passed on as keywords, None ones left out."""
        n = x.shape[0]
        if n > self.buckets[-1]:  # larger than any bucket: run in bucket-sized chunks
            step = self.buckets[-1]
            parts = [self(x[i:i + step], _rows(timestep, i, step), _rows(class_labels, i, step),
                          _rows(encoder_hidden_states, i, step), **{k: _rows(v, i, step) for k, v in added.items()})
                     for i in range(0, n, step)]
            return torch.cat(parts, dim=0)
        bucket = bucket_for(n, self.buckets)
        timestep = _as_batch(timestep, n, x.device)
        added = {k: tuple(v) if isinstance(v, list) else v for k, v in added.items()}  # (hashable graph keys)
        names = tuple(sorted(k for k, v in added.items() if v is not None))
        inputs = [pad_to(t, bucket) for t in (x, timestep, class_labels, encoder_hidden_states)]
        inputs += [pad_to(added[k], bucket) for k in names]
        return self.run_bucket(bucket, inputs, names)[:n]

    def run_bucket(self, bucket: int, inputs: list, names: tuple = ()) -> torch.Tensor:
        return _invoke(self.network, inputs, names)


def _invoke(network: Callable, inputs: list, names: tuple):
    """network(x, timestep, class_labels, encoder_hidden_states, **{names: the remaining inputs})."""
    k = len(inputs) - len(names)
    return network(*inputs[:k], **dict(zip(names, inputs[k:])))


class GraphedNetwork(BucketPadded):
    """Network callable with per-signature captured graphs and padding to batch buckets."""

    def __init__(self, network: Callable, buckets: Sequence[int], max_graphs: int = 16,
                 graph_factory: Optional[Callable] = None):
        super().__init__(network, buckets)
        self.max_graphs = max_graphs
        self.graph_factory = graph_factory or CudaGraph
        self.graphs: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
        self.pool = None
        self.captures = 0
        # one call at a time from the copy into the static inputs to the clone of the output: two threads
        # sharing a pipe would otherwise overwrite each other's inputs between copy and replay
        self._lock = threading.RLock()

    @staticmethod
    def signature(bucket: int, x: torch.Tensor, timestep, class_labels, encoder_hidden_states, *added,
                  names: tuple = ()) -> tuple:
        def sig(t):
            return None if t is None else map_tensors(lambda u: (tuple(u.shape[1:]), u.dtype), t)
        return (bucket, tuple(x.shape[1:]), x.dtype, str(x.device), sig(timestep), sig(class_labels),
                sig(encoder_hidden_states)) + tuple((name, sig(t)) for name, t in zip(names, added))

    def run_bucket(self, bucket: int, inputs: list, names: tuple = ()) -> torch.Tensor:
        with self._lock:
            return self._run_bucket_locked(bucket, inputs, names)

    def _run_bucket_locked(self, bucket: int, inputs: list, names: tuple) -> torch.Tensor:
        key = self.signature(bucket, *inputs, names=names)
        entry = self.graphs.get(key)
        if entry is None:
            static = [map_tensors(torch.clone, t) for t in inputs]
            graph = self.graph_factory(lambda *a: _invoke(self.network, list(a), names), static, pool=self.pool)
            self.pool = getattr(graph, "pool", self.pool)
            self.captures += 1
            entry = (graph, static)
            self.graphs[key] = entry
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(key)
        graph, static = entry
        for buf, t in zip(static, inputs):
            zip_tensors(lambda b, u: b.copy_(u), buf, t)
        return graph.replay().clone()  # cloned: the next replay overwrites the static output


def _as_batch(timestep, n: int, device) -> torch.Tensor:
    if not torch.is_tensor(timestep):
        timestep = torch.tensor([timestep], device=device)
    if timestep.dim() == 0:
        timestep = timestep[None]
    return timestep.expand(n).contiguous() if timestep.shape[0] == 1 and n != 1 else timestep


def _rows(t, i: int, step: int):
    if t is not None and not torch.is_tensor(t):  # (a tuple of tensors)
        return map_tensors(lambda u: _rows(u, i, step), t)
    if t is None or t.dim() == 0 or t.shape[0] == 1:
        return t
    return t[i:i + step]
