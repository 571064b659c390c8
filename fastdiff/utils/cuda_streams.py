"""One side stream per CUDA device for every warm-up and graph capture fastdiff does.

Why one and not a fresh ``torch.cuda.Stream()`` each time: torch gives every (cuBLAS handle, stream) pair that
runs a GEMM a workspace of its own (32 MiB for cuBLAS plus 1 MiB for cuBLASLt on Hopper) and keeps it for the
life of the process. A fresh stream per capture drew the next of torch's 32 pooled streams each time, so each
captured graph left 33 MiB more live memory behind (run 7 on an H200: each SD1.5 bench variant read 33 MiB more
peak memory than the one before), up to about 1 GiB. One stream keeps it to one workspace.
"""

from __future__ import annotations

import threading
from typing import Optional

import torch

_streams: dict = {}  # device index -> torch.cuda.Stream
_lock = threading.Lock()
# Held around each warm-up + capture on the side stream: another thread's warm-up kernels queued on that stream
# while it captures would land in its graph. Re-entrant: per-layer tuning captures its timing graphs from inside a
# model call that a graph capture is warming up. Taken before op_tuning's own lock (fastdiff.models.op_tuning.choose),
# never after it: two threads taking them in opposite orders would wait on each other for ever.
CAPTURE_LOCK = threading.RLock()


def side_stream(device: Optional[torch.device] = None) -> "torch.cuda.Stream":
    """fastdiff's side stream on ``device`` (a CUDA device; the current one when None), created on first use."""
    index = torch.device(device).index if device is not None else None
    if index is None:
        index = torch.cuda.current_device()
    with _lock:
        stream = _streams.get(index)
        if stream is None:
            stream = _streams[index] = torch.cuda.Stream(device=index)
        return stream
