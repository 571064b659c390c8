"""Loading a converted state dict into a native model: strict, shape-checked, assign-in-place."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn

from ..errors import StateDictMismatchError


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], name: str = "model") -> None:
    """Raise StateDictMismatchError listing missing, unexpected and mis-shaped keys (first few + counts)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [(k, expected[k], tuple(state[k].shape)) for k in expected
                  if k in state and tuple(state[k].shape) != expected[k]]
    if missing or unexpected or mismatched:
        raise StateDictMismatchError(missing, unexpected, mismatched, model=name)


def strict_load(model: nn.Module, state: dict[str, torch.Tensor], name: str = "model",
                dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> nn.Module:
    """Check, cast, and assign ``state`` into ``model`` (which may live on the meta device)."""
    check_state_dict(model, state, name)
    if dtype is not None or device is not None:
        state = {k: v.to(device=device, dtype=dtype if (dtype is not None and v.is_floating_point()) else v.dtype)
                 for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model


class RequiredKeys(Mapping):
    """A read-only view of a converter's state dict whose missing key is a ``StateDictMismatchError`` naming it
    as the file spells it (``prefix`` + key), not a bare ``KeyError`` from the middle of a converter."""

    def __init__(self, state: dict, model: str, prefix: str = ""):
        self.state, self.model, self.prefix = state, model, prefix

    def __getitem__(self, key):
        try:
            return self.state[key]
        except KeyError:
            raise StateDictMismatchError(missing=[self.prefix + key], model=self.model) from None

    def __iter__(self):
        return iter(self.state)

    def __len__(self):
        return len(self.state)

    def __contains__(self, key):
        return key in self.state

    def get(self, key, default=None):  # Mapping.get would turn the missing-key error into a crash, not the default
        return self.state.get(key, default)


def swap_scale_shift(t: torch.Tensor) -> torch.Tensor:
    """(shift, scale) rows (Stability's and Black Forest Labs' continuous adaLN) -> diffusers' (scale, shift)."""
    shift, scale = t.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


class Renamer:
    """Builds a native state dict from a foreign one, tensor by tensor, remembering which it read: ``finish()``
    refuses whatever was left unread, so no tensor of the file is silently dropped."""

    def __init__(self, source: RequiredKeys, what: str):
        self.source, self.what = source, what
        self.out: dict[str, torch.Tensor] = {}
        self.used: set = set()

    def take(self, name: str) -> torch.Tensor:
        self.used.add(name)
        return self.source[name]

    def linear(self, dst: str, src: str, fn=None) -> None:
        """``src.weight`` / ``src.bias`` -> ``dst.*`` (through ``fn``)."""
        for part in ("weight", "bias"):
            t = self.take(f"{src}.{part}")
            self.out[f"{dst}.{part}"] = fn(t) if fn is not None else t

    def split(self, dsts, src: str, sizes) -> None:
        """A fused projection ``src`` split row-wise into the layers ``dsts`` (``sizes`` rows each)."""
        for part in ("weight", "bias"):
            for dst, t in zip(dsts, self.take(f"{src}.{part}").split(list(sizes), dim=0)):
                self.out[f"{dst}.{part}"] = t.contiguous()

    def finish(self) -> dict[str, torch.Tensor]:
        from ..errors import CheckpointError

        leftover = sorted(set(self.source) - self.used)
        if leftover:
            raise CheckpointError(f"{self.what}: {len(leftover)} tensor(s) with no native counterpart (not "
                                  f"supported): {leftover[:5]}")
        return self.out
