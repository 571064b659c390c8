"""Groups of Linear layers that read one input, run as one matmul per group (weights stacked, no second copy).

Several of a network's projections read the same tensor in every call: a DiT's adaLN projections all read
SiLU(c); a text UNet's cross-attention keys and values all read the text states. One at a time, each is a
small matmul that streams its weights in a launch too small to fill a GPU. Stacked, one matmul streams them
all, and each layer takes its columns of the output.

``LinearStacks`` is a mixin for the model that owns such groups. ``stack(name)`` concatenates a group's
weights into the buffers ``<name>_weight`` / ``<name>_bias`` (non-persistent: checkpoints keep the layers' own
keys) and makes each layer's weight and bias a view of them, so the stack is never a second copy. It follows
the layers: ``.to()``, ``load_state_dict(assign=True)``, copies and unpickling give the layers storages of
their own, and the stack is then rebuilt from them (a plain ``load_state_dict`` copies into the views, and the
stack keeps its memory: a CUDA graph captured before the load reads the new weights).

What it cannot see: code that replaces a layer's weight tensor itself (``layer.weight = nn.Parameter(...)``,
``layer.weight.data = ...``, e.g. a LoRA merge) leaves the stack holding the old values. Call
``model._restack()`` after such a change, or ``pipe.optimize(...)`` again.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn as nn


class LinearStacks:
    """Mixin for an ``nn.Module``: ``STACKS`` names its groups, ``stack_layers(name)`` returns a group's layers
    in output order (or None where it cannot be stacked). Call ``_init_stacks()`` in ``__init__``."""

    STACKS: tuple = ()

    def _init_stacks(self) -> None:
        for name in self.STACKS:
            self.register_buffer(f"{name}_weight", None, persistent=False)
            self.register_buffer(f"{name}_bias", None, persistent=False)
        self.register_load_state_dict_post_hook(_restack_after_load)  # a module-level function: picklable

    def stack_layers(self, name: str) -> Optional[list]:
        raise NotImplementedError

    def stacked(self, name: str) -> bool:
        return getattr(self, f"{name}_weight") is not None

    def stack(self, name: str) -> int:
        """Stack group ``name``; returns how many layers it holds (0: not stackable, nothing changes)."""
        layers = self.stack_layers(name)
        if not layers or len({lin.bias is None for lin in layers}) > 1:
            return 0
        with torch.no_grad():
            weight = torch.cat([lin.weight for lin in layers], dim=0)  # (sum of outputs, in)
            bias = None if layers[0].bias is None else torch.cat([lin.bias for lin in layers], dim=0)
            row = 0
            for lin in layers:
                n = lin.out_features
                lin.weight.data = weight[row:row + n]
                if bias is not None:
                    lin.bias.data = bias[row:row + n]
                row += n
        setattr(self, f"{name}_weight", weight)
        setattr(self, f"{name}_bias", bias)
        self.on_stack(name, layers)
        return len(layers)

    def unstack(self, name: str) -> None:
        """Drop group ``name``'s stack: each layer keeps its (equal) weights and runs on its own again."""
        setattr(self, f"{name}_weight", None)
        setattr(self, f"{name}_bias", None)
        self.on_stack(name, None)

    def on_stack(self, name: str, layers: Optional[list]) -> None:
        """Called after group ``name`` was stacked (its layers) or unstacked (None)."""

    def _restack(self) -> None:
        """Rebuild every stack whose layers no longer all view it (after anything that may have given the layers
        storages of their own); a stack its layers still view keeps its memory."""
        for name in self.STACKS:
            if self.stacked(name) and not self._views_stack(name):
                self.unstack(name)
                self.stack(name)

    def _views_stack(self, name: str) -> bool:
        """Whether every layer of group ``name`` still has its weight and bias inside the group's stack."""
        layers = self.stack_layers(name) or []
        stacks = [getattr(self, f"{name}_weight"), getattr(self, f"{name}_bias")]
        for lin in layers:
            for t, stack in zip((lin.weight, lin.bias), stacks):
                if (t is None) != (stack is None):
                    return False
                if t is not None and t.untyped_storage().data_ptr() != stack.untyped_storage().data_ptr():
                    return False
        return bool(layers)

    def _apply(self, fn, *args, **kwargs):
        # .to() / .half() / .cuda() convert every layer on its own: drop the stacks first (never converted, no
        # transient third copy) and rebuild them from the converted layers, so they share one storage again
        stacked = [name for name in self.STACKS if self.stacked(name)]
        for name in stacked:
            self.unstack(name)
        out = super()._apply(fn, *args, **kwargs)
        for name in stacked:
            layers = self.stack_layers(name) or []
            shared = any(lin.weight.is_shared() for lin in layers)  # share_memory(): keep the stack shared too
            self.stack(name)
            if shared:
                getattr(self, f"{name}_weight").share_memory_()
                bias = getattr(self, f"{name}_bias")
                if bias is not None:
                    bias.share_memory_()
        return out

    def __setstate__(self, state):
        super().__setstate__(state)  # copy.deepcopy / unpickling: the copied layers no longer share the stack
        self._restack()


def _restack_after_load(module, _incompatible_keys) -> None:
    module._restack()


def stacked_output(model: nn.Module, name: str, x: torch.Tensor) -> Optional[torch.Tensor]:
    """``x @ stack^T + bias`` for group ``name`` of ``model``, or None when it is not stacked, when autograd is on
    (the stack is a buffer: training goes through the layers' own parameters), and while exporting (an exported
    graph keeps the checkpoint's per-layer projections, with no stacked copy among its weights)."""
    from .layers import exporting

    weight = getattr(model, f"{name}_weight", None)
    if weight is None or torch.is_grad_enabled() or exporting():
        return None
    return nn.functional.linear(x, weight, getattr(model, f"{name}_bias"))


class Projected(NamedTuple):
    """A network call's shared input (``states``) with every stacked layer's output of it (``parts``, in the
    group's order, from one matmul): a layer with an index into ``parts`` takes its part instead of running."""

    states: torch.Tensor
    parts: tuple


def project(layer: nn.Module, index: Optional[int], inp):
    """``layer(inp)``, or its precomputed part when ``inp`` is ``Projected`` and ``index`` is the layer's place."""
    if isinstance(inp, Projected):
        if index is not None:
            return inp.parts[index]
        inp = inp.states
    return layer(inp)


def states(inp):
    """The plain tensor behind ``inp`` (``Projected`` or a tensor)."""
    return inp.states if isinstance(inp, Projected) else inp
