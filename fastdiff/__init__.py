"""fastdiff: a high-performance inference engine for diffusion models.

Public API: ``load``, ``Pipeline``, ``Engine``, the samplers and the schedules. Heavy submodules are
imported lazily so ``import fastdiff`` stays cheap and never touches a device.
"""

from __future__ import annotations

import importlib

from .errors import (  # noqa: F401
    BackendUnavailableError,
    BadArgumentError,
    CheckpointError,
    CorruptCheckpointError,
    FastdiffError,
    StateDictMismatchError,
    UnknownFormatError,
    UnsafeCheckpointError,
    UnsupportedConfigError,
)

__version__ = "0.1.0"

# name -> (module, attribute): resolved on first access (PEP 562).
_LAZY = {
    "load": ("fastdiff.checkpoints", "load"),
    "Pipeline": ("fastdiff.pipeline", "Pipeline"),
    "OptimizeConfig": ("fastdiff.runtime.config", "OptimizeConfig"),
    "Engine": ("fastdiff.runtime.engine", "Engine"),
    "samplers": ("fastdiff.samplers", None),
    "schedules": ("fastdiff.schedules", None),
    "UNet": ("fastdiff.models.unet", "UNet"),
    "DiT": ("fastdiff.models.dit", "DiT"),
    "ip_adapter_mask": ("fastdiff.ip_adapter_masks", "ip_adapter_mask"),
}


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        mod = importlib.import_module(module)
        value = mod if attr is None else getattr(mod, attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastdiff' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
