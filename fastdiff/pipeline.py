"""The Pipeline: a native network + its ModelSpec, and everything a user does with them.

``fastdiff.load`` returns one. ``generate`` samples; ``optimize`` picks the runner (eager, fused
kernels, torch.compile, CUDA graphs, ONNX Runtime); ``save`` writes the fastdiff format.
"""

from __future__ import annotations

from typing import Optional

import torch

from .spec import ModelSpec


class Pipeline:
    def __init__(self, model: torch.nn.Module, spec: ModelSpec, device="cpu"):
        self.model = model
        self.spec = spec
        self.device = torch.device(device)

    @property
    def dtype(self) -> torch.dtype:
        try:
            return next(self.model.parameters()).dtype
        except StopIteration:
            return torch.float32

    def save(self, path: str) -> str:
        """Write the fastdiff format (folder: fastdiff.json + model.safetensors), atomically."""
        from .checkpoints.fastdiff_format import save_fastdiff

        return save_fastdiff(path, self.model, self.spec)

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.model.parameters())
        return (f"Pipeline({self.spec.kind}, {n / 1e6:.2f}M params, {self.dtype}, {self.device}, "
                f"prediction={self.spec.prediction_type}, source={self.spec.source!r})")
