"""Argument checks shared by the public entry points (Pipeline.generate, Engine.submit, the samplers)."""

from __future__ import annotations

import math
import numbers

from ..errors import BadArgumentError


def finite_number(name: str, value) -> float:
    """``value`` as a float when it is a finite real number (not a bool), else a BadArgumentError saying so: a NaN
    guidance scale would otherwise turn every sample into NaN without an error."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise BadArgumentError(f"{name}: expected a finite number, found {value!r}")
    return float(value)


def export_sizes(batch, height, width, where: str = "") -> None:
    """An export's traced batch (a positive int) and height / width (positive ints, or None: the model's own), else
    a BadArgumentError naming the argument (a bool is no size; 0 would fall back to the model's size unsaid)."""
    for name, value in (("batch", batch), ("height", height), ("width", width)):
        if value is None and name != "batch":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BadArgumentError(f"{where}{name} must be a positive int{'' if name == 'batch' else ' or None'}, "
                                   f"found {value!r}")


def finite_host_values(name: str, t) -> None:
    """A BadArgumentError when host tensor ``t`` holds NaN or inf (a NaN input makes an all-NaN sample, no error);
    a tensor already on a device is not read back (no sync)."""
    if t.is_floating_point() and t.device.type == "cpu" and not bool(t.isfinite().all()):
        raise BadArgumentError(f"{name}: expected finite values, found NaN or inf")


def one_or(b: int, noun: str) -> str:
    """"1 or 4 images" for a count that may be one, or one per sample of b; "1 image" where b is 1 (``noun``:
    the plural)."""
    return f"1 {noun[:-1]}" if b == 1 else f"1 or {b} {noun}"


def integer_labels(value, b: int, name: str = "class_labels") -> tuple:
    """(labels, lo, hi): ``value`` (a list, an array or a tensor of integers, or whole-number floats; one label for
    every sample, or ``b``) as a (b,) int64 tensor where it was (host labels stay on the CPU: checked before they move,
    no device read back then; labels already on a device cost one read per call, never inside the sampling loop), and
    its smallest and largest label; anything else a BadArgumentError."""
    import torch

    on_host = not (torch.is_tensor(value) and value.device.type != "cpu")
    try:
        raw = torch.as_tensor(value, device="cpu" if on_host else None)
    except (TypeError, ValueError, RuntimeError):
        raw = None
    # 1.5 or True would be truncated to a label silently; a float tensor of whole numbers is fine
    if raw is None or raw.dtype == torch.bool or raw.is_complex() or raw.numel() == 0 or (
            raw.is_floating_point() and not (torch.isfinite(raw).all() and torch.equal(raw, raw.round()))):
        raise BadArgumentError(f"{name}: expected integer labels (a list, an array or a tensor), found {value!r}")
    labels = raw.to(torch.long).reshape(-1)
    if labels.numel() == 1 and b > 1:
        labels = labels.expand(b)
    if labels.numel() != b:
        raise BadArgumentError(f"{name}: expected {b} labels (one per sample), found {labels.numel()}")
    lo, hi = torch.stack(torch.aminmax(labels)).tolist()
    return labels, lo, hi
