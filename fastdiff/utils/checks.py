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
