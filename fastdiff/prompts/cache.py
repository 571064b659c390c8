"""A bounded cache of encoded prompts (least recently used first out).

Serving repeats prompts: every guided request of an Engine encodes its negative prompt (usually the empty one),
and clients resend the same prompts with other seeds. Encoding is deterministic, so a repeated call can return
what the first one computed: bit for bit the same tensors, without running CLIP / T5 again (T5-XXL costs tens of
milliseconds per call on a GPU). The bound is in bytes, as one FLUX.1 prompt's T5 states (512 x 4096 in half
precision) weigh 4 MiB and an SD 1.x prompt's 0.1 MiB.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable, Optional

DEFAULT_MAX_BYTES = 64 * 2**20


class EncodingCache:
    """key -> ({name: tensor}, notes), at most ``max_bytes`` of tensors (0 turns it off, also later); ``get``
    hands out copies, so a caller that writes into its tensors cannot change what the next caller gets. ``notes``:
    the warnings the encoding gave (a truncated prompt), for the caller to give again on a hit."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        self.max_bytes = max_bytes
        self._entries: OrderedDict = OrderedDict()
        self._bytes = 0

    @staticmethod
    def _size(tensors: dict) -> int:
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def _evict(self) -> None:
        """Drop the least recently used entries until the bound holds (``max_bytes`` may have been lowered)."""
        while self._entries and self._bytes > max(self.max_bytes, 0):
            _, (dropped, _) = self._entries.popitem(last=False)
            self._bytes -= self._size(dropped)

    def get(self, key: Hashable) -> Optional[tuple[dict, tuple]]:
        self._evict()
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        tensors, notes = entry
        return {name: t.clone() for name, t in tensors.items()}, notes

    def put(self, key: Hashable, tensors: dict, notes: tuple = ()) -> None:
        """Keep copies of ``tensors`` (an entry larger than the whole bound is not kept)."""
        size = self._size(tensors)
        if size <= self.max_bytes and key not in self._entries:
            self._entries[key] = ({name: t.detach().clone() for name, t in tensors.items()}, tuple(notes))
            self._bytes += size
        self._evict()

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes
