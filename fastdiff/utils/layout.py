"""Memory-layout predicates shared by the fused kernels' launchers."""

from __future__ import annotations

from typing import Sequence

import torch


def is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: its numel elements fill one block of memory from its data pointer, in any
    dimension order (contiguous, channels-last, a permuted view of either)."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """One shape and the same strides wherever a dim has more than one element (a size-1 dim's stride is
    arbitrary: a batch-1 slice ``out[:, :C]`` has the layout of a contiguous tensor)."""
    return a.shape == b.shape and all(sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()) if n > 1)


def dense_alike(tensors: Sequence[torch.Tensor]) -> bool:
    """All dense with one layout: element i of each is at the same flat offset, so a kernel can read them as
    flat buffers and write a result of the same layout (``torch.empty_like`` keeps it)."""
    t0 = tensors[0]
    return is_dense(t0) and all(same_layout(t, t0) for t in tensors[1:])
