"""Image sets as the metrics take them: float pixels in [-1, 1] (what samplers return; overshoot is clamped) or
integers of any integer dtype in [0, 255] (what image files hold). Non-finite pixels and integers outside [0, 255]
are refused; float images that look like [0, 255] ones (all >= 0, reaching past 2), which would clamp to white, are
warned of."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ..errors import BadArgumentError

# generated samples overshoot [-1, 1] (at a few NFE the digits model's reach +-3.4) and are clamped, as pytorch-fid's
# uint8 conversion clips; float images all >= 0 reaching past this look like [0, 255] ones instead, and are warned of
ZERO_TO_255_HINT = 2.0


def as_tensor(images) -> torch.Tensor:
    return images if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))


def check_range(images: torch.Tensor, name: str) -> None:
    """Refuse pixel values outside both conventions, and non-finite ones, by name (one pass: their min and max)."""
    if images.numel() == 0:
        return
    if images.dtype == torch.bool or images.is_complex():
        raise BadArgumentError(f"{name}: expected float images in [-1, 1] or integers in [0, 255], found "
                               f"{images.dtype}")
    flat = images.detach().reshape(-1)
    if flat.dtype in (torch.uint16, torch.uint32, torch.uint64):  # (no min / max kernels for these on the CPU)
        flat = flat.to(torch.int64)
    low, high = (float(v) for v in torch.aminmax(flat))
    if images.is_floating_point():
        if not (np.isfinite(low) and np.isfinite(high)):
            raise BadArgumentError(f"{name}: expected finite pixel values, found NaN or inf")
        if low >= 0 and high > ZERO_TO_255_HINT:
            warnings.warn(f"{name}: float pixels in [{low:.4g}, {high:.4g}] are taken as [-1, 1] and clamped (nearly "
                          f"all white); images in [0, 255] go in as integers or as x / 127.5 - 1", stacklevel=3)
    elif low < 0 or high > 255:
        raise BadArgumentError(f"{name}: expected integer pixels in [0, 255], found [{low:.0f}, {high:.0f}]")


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """float32 in [-1, 1] from a ``check_range``-checked batch."""
    if images.is_floating_point():
        return images.float().clamp(-1, 1)
    return images.float() / 127.5 - 1
