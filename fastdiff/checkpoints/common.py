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
