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

A layer given a new parameter (``layer.weight = nn.Parameter(...)``, an ``assign=True`` load into the layer
itself, ``torch.func.functional_call``) makes the owner run that group per layer until ``model._restack()``
or ``pipe.optimize(...)`` again. What it cannot see: code that swaps a parameter's storage in place
(``layer.weight.data = ...``, e.g. a LoRA merge) leaves the stack holding the old values; call
``model._restack()`` after such a change.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn as nn

from .layers import exporting


class LinearStacks:
    """Mixin for an ``nn.Module``: ``STACKS`` names its groups, ``stack_layers(name)`` returns a group's layers
    in output order (or None where it cannot be stacked). Call ``_init_stacks()`` in ``__init__``."""

    STACKS: tuple = ()

    def _init_stacks(self) -> None:
        for name in self.STACKS:
            self.register_buffer(f"{name}_weight", None, persistent=False)
            self.register_buffer(f"{name}_bias", None, persistent=False)
        # the parameter objects each stack was built from: a call whose layers hold other ones (an assign=True
        # load into a layer, torch.func.functional_call) runs per layer instead of reading a stale stack
        self._stack_params: dict = {}
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
        self._adopt(name, layers, weight, bias)
        return len(layers)

    def _adopt(self, name: str, layers: list, weight, bias) -> None:
        setattr(self, f"{name}_weight", weight)
        setattr(self, f"{name}_bias", bias)
        self._stack_params[name] = [(lin, lin.weight, lin.bias) for lin in layers]
        self.on_stack(name, layers)

    def unstack(self, name: str) -> None:
        """Drop group ``name``'s stack: each layer keeps its (equal) weights and runs on its own again."""
        setattr(self, f"{name}_weight", None)
        setattr(self, f"{name}_bias", None)
        self._stack_params.pop(name, None)
        self.on_stack(name, None)

    def on_stack(self, name: str, layers: Optional[list]) -> None:
        """Called after group ``name`` was stacked (its layers) or unstacked (None)."""

    def stack_current(self, name: str) -> bool:
        """Whether group ``name`` is stacked and its layers still hold the parameters it was built from (cheap:
        identity only; checked on every stacked call)."""
        params = self._stack_params.get(name)
        return bool(params) and all(lin.weight is w and lin.bias is b for lin, w, b in params)

    def _restack(self) -> None:
        """Rebuild every stack whose layers no longer all view it (after anything that may have given the layers
        storages of their own); a stack its layers still view keeps its memory."""
        for name in self.STACKS:
            if self.stacked(name) and not self._views(name, getattr(self, f"{name}_weight"),
                                                      getattr(self, f"{name}_bias")):
                self.unstack(name)
                self.stack(name)

    def _views(self, name: str, weight, bias) -> bool:
        """Whether every layer of group ``name`` has its weight and bias at its own rows of ``weight`` / ``bias``
        (same memory, offset, shape and strides; never on the meta device, where nothing has an address)."""
        layers = self.stack_layers(name) or []
        if not layers or weight is None or weight.device.type == "meta":
            return False
        row = 0
        for lin in layers:
            n = lin.out_features
            for t, stack, part in ((lin.weight, weight, (n, weight.shape[1])), (lin.bias, bias, (n,))):
                if (t is None) != (stack is None):
                    return False
                if t is None:
                    continue
                want = stack[row:row + n]
                if (t.data_ptr() != want.data_ptr() or tuple(t.shape) != part or t.stride() != want.stride()
                        or t.dtype != stack.dtype or t.device != stack.device):
                    return False
            row += n
        return row == weight.shape[0]

    def _apply(self, fn, *args, **kwargs):
        # .to() / .half() / .cuda() convert every layer on its own: drop the stacks first (never converted, no
        # transient third copy) and rebuild them from the converted layers, so they share one storage again. A
        # conversion that changes nothing (.to() of the current dtype and device) leaves the layers viewing the
        # old stacks: those are kept, so a CUDA graph captured before it still reads the weights.
        old = {name: (getattr(self, f"{name}_weight"), getattr(self, f"{name}_bias"))
               for name in self.STACKS if self.stacked(name)}
        for name in old:
            self.unstack(name)
        out = super()._apply(fn, *args, **kwargs)
        for name, (weight, bias) in old.items():
            layers = self.stack_layers(name) or []
            if self._views(name, weight, bias):
                self._adopt(name, layers, weight, bias)
                continue
            shared = any(lin.weight.is_shared() for lin in layers)  # share_memory(): keep the stack shared too
            self.stack(name)
            if shared:
                getattr(self, f"{name}_weight").share_memory_()
                new_bias = getattr(self, f"{name}_bias")
                if new_bias is not None:
                    new_bias.share_memory_()
        return out

    def __setstate__(self, state):
        super().__setstate__(state)  # copy.deepcopy / unpickling: rebuild if the copied layers stopped viewing it
        self.__dict__.setdefault("_stack_params", {})
        self._restack()


def _restack_after_load(module, _incompatible_keys) -> None:
    module._restack()


def stacked_output(model: nn.Module, name: str, x: torch.Tensor) -> Optional[torch.Tensor]:
    """``x @ stack^T + bias`` for group ``name`` of ``model``, or None (the layers then run one by one) when it is
    not stacked; when autograd is on (the stack is a buffer: training goes through the layers' own
    parameters); when the layers hold other parameters than the stack was built from (an ``assign=True`` load
    into a layer, ``torch.func.functional_call``); and while exporting (an exported graph keeps the checkpoint's
    per-layer projections, with no stacked copy among its weights)."""
    weight = getattr(model, f"{name}_weight", None)
    if weight is None or torch.is_grad_enabled() or exporting() or not model.stack_current(name):
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
