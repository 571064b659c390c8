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


def finite_host_values(name: str, t) -> None:
    """A BadArgumentError when host tensor ``t`` holds NaN or inf (a NaN input makes an all-NaN sample, no error);
    a tensor already on a device is not read back (no sync)."""
    if t.is_floating_point() and t.device.type == "cpu" and not bool(t.isfinite().all()):
        raise BadArgumentError(f"{name}: expected finite values, found NaN or inf")


def one_or(b: int, noun: str) -> str:
    """"1 or 4 images" for a count that may be one, or one per sample of b; "1 image" where b is 1 (``noun``:
    the plural)."""
    return f"1 {noun[:-1]}" if b == 1 else f"1 or {b} {noun}"
