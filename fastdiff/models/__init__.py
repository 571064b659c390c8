"""fastdiff native models: UNet (diffusers UNet2D / UNet2DCondition layouts), DiT, EDM's UNets and SD3's MMDiT.

``build_model(kind, config)`` is the one place that maps a model kind to its config and class, so
loaders and the fastdiff format never import model classes by hand.
"""

from __future__ import annotations

import importlib

import torch

from ..errors import UnsupportedConfigError

# kind -> (module, config class, model class)
MODEL_KINDS = {
    "unet": ("fastdiff.models.unet", "UNetConfig", "UNet"),
    "dit": ("fastdiff.models.dit", "DiTConfig", "DiT"),
    "edm": ("fastdiff.models.edm", "EDMUNetConfig", "EDMUNet"),
    "mmdit": ("fastdiff.models.mmdit", "MMDiTConfig", "MMDiT"),
    "flux": ("fastdiff.models.flux", "FluxConfig", "Flux"),
}


def model_classes(kind: str):
    if kind not in MODEL_KINDS:
        raise UnsupportedConfigError("model type", kind, supported=sorted(MODEL_KINDS))
    module, cfg_name, cls_name = MODEL_KINDS[kind]
    mod = importlib.import_module(module)
    return getattr(mod, cfg_name), getattr(mod, cls_name)


def build_model(kind: str, config, device="meta") -> torch.nn.Module:
    """Build a native model from a config object or dict; on ``meta`` by default (weights assigned later)."""
    cfg_cls, cls = model_classes(kind)
    if isinstance(config, dict):
        config = cfg_cls.from_dict(config)
    with torch.device(device):
        return cls(config)


def model_kind(model: torch.nn.Module) -> str:
    for kind in MODEL_KINDS:
        _, cls = model_classes(kind)
        if isinstance(model, cls):
            return kind
    return "custom"
