"""Loading a converted state dict into a native model: strict, shape-checked, assign-in-place."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn

from ..errors import CorruptCheckpointError, StateDictMismatchError


# the float dtypes a network computes in, most precise first: what a mixed file loads as (``load_dtype``; float8
# becomes bfloat16), and what ``check_finite`` reads (float8 lacks min / max kernels on some builds)
_PRECISION_ORDER = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], name: str = "model") -> None:
    """Raise StateDictMismatchError listing missing, unexpected, mis-shaped and non-float (where the model has a float
    parameter) keys (first few + counts)."""
    odd = [k for k in state if not isinstance(k, str)]
    if odd:
        raise CorruptCheckpointError(f"{name}: expected parameter names (strings) as state dict keys, found "
                                     f"{odd[:5]}")
    reference = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in reference.items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [(k, expected[k], tuple(state[k].shape)) for k in expected
                  if k in state and tuple(state[k].shape) != expected[k]]
    wrong_kind = [(k, state[k].dtype) for k in expected if k in state and reference[k].is_floating_point()
                  and not state[k].is_floating_point()]
    if missing or unexpected or mismatched or wrong_kind:
        raise StateDictMismatchError(missing, unexpected, mismatched, model=name, wrong_dtype=wrong_kind)


def load_dtype(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype the floating-point tensors load as: ``dtype`` when given; else the file's own when it has one
    (None: no cast); else, for mixed files (fp16 weights with a float32 layer, an fp8 checkpoint with bf16 norms),
    the one that holds most of the values, so the network computes in one dtype without growing (float8, which
    nothing computes in, becomes bfloat16); a wider one where a value would overflow it."""
    if dtype is not None:
        return dtype
    counts: dict = {}
    for v in state.values():
        if v.is_floating_point():
            counts[v.dtype] = counts.get(v.dtype, 0) + v.numel()
    if len(counts) <= 1 and not (set(counts) - set(_PRECISION_ORDER)):
        return None
    widened = {}
    for d, n in counts.items():
        d = d if d in _PRECISION_ORDER else torch.bfloat16
        widened[d] = widened.get(d, 0) + n
    # (float8 values, at most 57344, fit every candidate)
    largest = max((float(v.detach().abs().amax()) for v in state.values()
                   if v.dtype in _PRECISION_ORDER and v.numel()), default=0.0)
    # the most common dtype, unless a value of the file overflows it (an fp32 tensor past fp16's 65504)
    for d in sorted(widened, key=lambda d: (-widened[d], _PRECISION_ORDER.index(d))):
        if largest <= torch.finfo(d).max:
            return d
    return torch.float64  # pragma: no cover - every value fits float64


def check_finite(state: dict[str, torch.Tensor], name: str = "model") -> None:
    """A weight that is NaN or infinite is a damaged file (real checkpoints hold none): refused by name, instead of
    a model whose every output is NaN. A NaN or infinity anywhere shows in a tensor's minimum or maximum, and
    ``aminmax`` is one fast pass (about 40x ``isfinite(...).all()`` on the CPU)."""
    bad = []
    for k, v in state.items():
        if v.dtype in _PRECISION_ORDER and v.numel():
            low, high = torch.aminmax(v)
            if not (bool(torch.isfinite(low)) and bool(torch.isfinite(high))):
                bad.append(k)
    if bad:
        raise CorruptCheckpointError(f"{name}: expected finite weights, found NaN or infinite values in {len(bad)} "
                                     f"tensor(s): {bad[:5]} (a damaged or truncated download?)")


def strict_load(model: nn.Module, state: dict[str, torch.Tensor], name: str = "model",
                dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                notes: list | None = None) -> nn.Module:
    """Check, cast, and assign ``state`` into ``model`` (which may live on the meta device); ``notes`` gets a line
    when a file of mixed float dtypes is loaded in one."""
    check_state_dict(model, state, name)
    check_finite(state, name)
    asked = dtype
    dtype = load_dtype(state, dtype)
    if asked is None and dtype is not None and notes is not None:
        found = sorted({str(v.dtype).replace("torch.", "") for v in state.values() if v.is_floating_point()})
        notes.append(f"the weights mix {', '.join(found)}: loaded as {str(dtype).replace('torch.', '')} (the dtype "
                     f"of most of them; dtype= chooses another)")
    if dtype is not None or device is not None:
        state = {k: v.to(device=device, dtype=dtype if (dtype is not None and v.is_floating_point()) else v.dtype)
                 for k, v in state.items()}
    if asked is not None and asked != torch.float32:  # (a weight beyond a narrower dtype's range casts to inf)
        _check_cast_range(state, asked, name)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def _check_cast_range(state: dict, dtype: torch.dtype, name: str) -> None:
    """The weights cast to ``dtype`` (the caller's choice) all finite: a value beyond its range became infinite."""
    from ..errors import BadArgumentError

    over = [k for k, v in state.items() if v.dtype == dtype and v.numel() and not bool(torch.isfinite(
        torch.stack(torch.aminmax(v))).all())]
    if over:
        raise BadArgumentError(f"dtype={dtype}: {name} has weights beyond its range ({len(over)} tensor(s): "
                               f"{over[:3]}), which the cast made infinite; load in float32 (or bfloat16)")


class RequiredKeys(Mapping):
    """A read-only view of a converter's state dict whose missing key is a ``StateDictMismatchError`` naming it
    as the file spells it (``prefix`` + key), not a bare ``KeyError`` from the middle of a converter."""

    def __init__(self, state: dict, model: str, prefix: str = ""):
        self.state, self.model, self.prefix = state, model, prefix

    def __getitem__(self, key):
        try:
            return self.state[key]
        except KeyError:
            raise StateDictMismatchError(missing=[self.prefix + key], model=self.model) from None

    def __iter__(self):
        return iter(self.state)

    def __len__(self):
        return len(self.state)

    def __contains__(self, key):
        return key in self.state

    def get(self, key, default=None):  # Mapping.get would turn the missing-key error into a crash, not the default
        return self.state.get(key, default)


def swap_scale_shift(t: torch.Tensor) -> torch.Tensor:
    """(shift, scale) rows (Stability's and Black Forest Labs' continuous adaLN) -> diffusers' (scale, shift)."""
    shift, scale = t.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


class Renamer:
    """Builds a native state dict from a foreign one, tensor by tensor, remembering which it read: ``finish()``
    refuses whatever was left unread, so no tensor of the file is silently dropped."""

    def __init__(self, source: RequiredKeys, what: str):
        self.source, self.what = source, what
        self.out: dict[str, torch.Tensor] = {}
        self.used: set = set()

    def take(self, name: str) -> torch.Tensor:
        self.used.add(name)
        return self.source[name]

    def linear(self, dst: str, src: str, fn=None) -> None:
        """``src.weight`` / ``src.bias`` -> ``dst.*`` (through ``fn``)."""
        for part in ("weight", "bias"):
            t = self.take(f"{src}.{part}")
            self.out[f"{dst}.{part}"] = fn(t) if fn is not None else t

    def split(self, dsts, src: str, sizes) -> None:
        """A fused projection ``src`` split row-wise into the layers ``dsts`` (``sizes`` rows each)."""
        for part in ("weight", "bias"):
            fused = self.take(f"{src}.{part}")
            if fused.dim() == 0 or fused.shape[0] != sum(sizes):
                raise StateDictMismatchError(mismatched=[(f"{src}.{part}", (sum(sizes),) + tuple(fused.shape[1:]),
                                                          tuple(fused.shape))], model=self.what)
            for dst, t in zip(dsts, fused.split(list(sizes), dim=0)):
                self.out[f"{dst}.{part}"] = t.contiguous()

    def finish(self) -> dict[str, torch.Tensor]:
        from ..errors import CheckpointError

        leftover = sorted(set(self.source) - self.used)
        if leftover:
            raise CheckpointError(f"{self.what}: {len(leftover)} tensor(s) with no native counterpart (not "
                                  f"supported): {leftover[:5]}")
        return self.out
