"""fastdiff.kernels: fused Triton kernels, one op per file.

``group_norm``, ``attention``, ``adaln_modulate`` and ``gated_residual`` are the launchers the layers in
``fastdiff.models.layers`` call from their ``forward_triton`` paths; ``lincomb`` is the samplers' fused
state update (``fastdiff.lincomb``). Importing this package never
imports Triton: the kernel module is loaded on the first call, and a machine without Triton gets a
``BackendUnavailableError`` then, not an ``ImportError`` at import time.
"""

from __future__ import annotations

import importlib
import sys
import types

from fastdiff.errors import BackendUnavailableError  # absolute: this folder may also be seen as top-level "kernels"

__all__ = ["group_norm", "attention", "attention_tma", "adaln_modulate", "gated_residual", "gated_residual_modulate",
           "residual_layer_norm", "geglu", "lincomb", "triton_importable"]

# launcher name -> module (relative to this package) that defines it
_LAUNCHERS = {
    "group_norm": ".group_norm",
    "attention": ".attention",
    "attention_tma": ".attention_tma",
    "adaln_modulate": ".adaln",
    "gated_residual": ".adaln",
    "gated_residual_modulate": ".adaln",
    "residual_layer_norm": ".adaln",
    "geglu": ".geglu",
    "lincomb": ".lincomb",
}


def triton_importable() -> tuple[bool, str]:
    """(ok, reason): whether ``import triton`` works here."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the machine
        return False, f"{e.__class__.__name__}: {e}"
    return True, "ok"


_resolved: dict = {}


def _load(name: str):
    fn = _resolved.get(name)
    if fn is not None:
        return fn
    ok, why = triton_importable()
    if not ok:
        raise BackendUnavailableError(
            f"fastdiff.kernels.{name} needs Triton (pip install 'triton>=3.2'), but triton is not importable: {why}")
    fn = _on_input_device(getattr(importlib.import_module(_LAUNCHERS[name], __name__), name))
    _resolved[name] = fn
    return fn


def _first_tensor(args):
    """The tensor whose device a launch runs on: the first argument, or the first term's tensor (lincomb)."""
    import torch

    first = args[0] if args else None
    if isinstance(first, (list, tuple)) and first and isinstance(first[0], (list, tuple)) and len(first[0]) == 2:
        first = first[0][1]
    return first if isinstance(first, torch.Tensor) else None


def _on_input_device(fn):
    """``fn`` launched on its input's GPU: Triton launches on the *current* device, so a model on cuda:1
    while cuda:0 is current would otherwise run its kernels on the wrong GPU."""
    import functools

    import torch

    @functools.wraps(fn)
    def call(*args, **kw):
        t = _first_tensor(args)
        if t is not None and t.is_cuda and t.get_device() != torch.cuda.current_device():
            with torch.cuda.device(t.device):
                return fn(*args, **kw)
        return fn(*args, **kw)

    return call


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, activation=None, scale=None, shift=None, **kw):
    """GroupNorm (+ scale-shift, + SiLU) fused; see ``fastdiff.kernels.group_norm.group_norm``."""
    return _load("group_norm")(x, num_groups, weight, bias, eps, activation=activation, scale=scale,
                               shift=shift, **kw)


def attention(q, k, v, scale=None, **kw):
    """Flash attention forward on (B, H, N, D); see ``fastdiff.kernels.attention.attention``."""
    return _load("attention")(q, k, v, scale=scale, **kw)


def attention_tma(q, k, v, scale=None, **kw):
    """Attention forward through TMA tensor descriptors (Hopper+); see ``fastdiff.kernels.attention_tma``."""
    return _load("attention_tma")(q, k, v, scale=scale, **kw)


def adaln_modulate(x, shift, scale, eps=1e-6, **kw):
    """LayerNorm (no affine) then ``*(1+scale)+shift``; see ``fastdiff.kernels.adaln.adaln_modulate``."""
    return _load("adaln_modulate")(x, shift, scale, eps=eps, **kw)


def gated_residual(x, gate, y, **kw):
    """``x + gate[:, None] * y``; see ``fastdiff.kernels.adaln.gated_residual``."""
    return _load("gated_residual")(x, gate, y, **kw)


def gated_residual_modulate(x, gate, y, shift, scale, eps=1e-6, **kw):
    """``x' = x + gate * y`` and ``adaln_modulate(x', shift, scale)`` in one pass; see
    ``fastdiff.kernels.adaln.gated_residual_modulate``."""
    return _load("gated_residual_modulate")(x, gate, y, shift, scale, eps=eps, **kw)


def residual_layer_norm(x, y, weight, bias, eps=1e-5, **kw):
    """``x' = x + y`` and ``LayerNorm(x') * weight + bias`` in one pass; see
    ``fastdiff.kernels.adaln.residual_layer_norm``."""
    return _load("residual_layer_norm")(x, y, weight, bias, eps=eps, **kw)


def geglu(x, **kw):
    """``h * gelu(gate)`` for ``h, gate = x.chunk(2, -1)``; see ``fastdiff.kernels.geglu.geglu``."""
    return _load("geglu")(x, **kw)


def lincomb(terms, **kw):
    """``sum(c * t for c, t in terms)`` in one kernel; see ``fastdiff.kernels.lincomb.lincomb``."""
    return _load("lincomb")(terms, **kw)



class _Package(types.ModuleType):
    """This package, keeping its public launchers bound.

    The issue's API puts the launcher ``fastdiff.kernels.group_norm(...)`` next to its module
    ``kernels/group_norm.py``. Importing a submodule binds the package attribute of its name to the module:
    any import of ``fastdiff.kernels.group_norm`` (the launcher's own loading, the AOT check, a test) would
    replace the function with the module. The launcher names ignore such bindings. Reach the modules with
    ``from fastdiff.kernels.group_norm import name`` or ``importlib.import_module``: attribute access
    (``fastdiff.kernels.group_norm.launch_config``, ``import fastdiff.kernels.group_norm as m``, dotted
    monkeypatch targets) finds the launcher, not the module."""

    def __setattr__(self, name, value):
        if name in _LAUNCHERS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
