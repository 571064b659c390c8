"""Conditioning trees: the tensors of dicts, lists and tuples (several IP-Adapters' image features travel as a tuple
of tensors under one conditioning name), mapped leaf by leaf with torch's own pytree utilities (what torch.compile
and CUDA-graph wrappers use)."""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils import _pytree as pytree


def map_tensors(fn: Callable, tree):
    """``tree`` with ``fn`` applied to every tensor in it (other leaves, None included, as they are)."""
    return pytree.tree_map_only(torch.Tensor, fn, tree)


def zip_tensors(fn: Callable, tree, other):
    """``fn(a, b)`` on the tensors of two trees of one structure (``tree``'s other leaves kept)."""
    return pytree.tree_map(lambda a, b: fn(a, b) if torch.is_tensor(a) else a, tree, other)
