"""One exception family for everything fastdiff refuses.

Every message says what was expected and what was found, so a user can act on it without reading
fastdiff's source.
"""

from __future__ import annotations


class FastdiffError(Exception):
    """Base class of every error fastdiff raises on purpose."""


class BadArgumentError(FastdiffError, ValueError):
    """A function or CLI argument has a value fastdiff does not accept."""


class UnsupportedConfigError(FastdiffError, ValueError):
    """A model config field holds a value the native model does not implement."""

    def __init__(self, field: str, value, supported=None, model: str = "model"):
        self.field, self.value = field, value
        msg = f"{model} config field {field!r} = {value!r} is not supported"
        if supported is not None:
            msg += f"; supported: {supported}"
        super().__init__(msg)


class CheckpointError(FastdiffError):
    """A checkpoint cannot be read or does not fit the model."""


class UnknownFormatError(CheckpointError):
    """The path is not any checkpoint format fastdiff knows."""


class UnsafeCheckpointError(CheckpointError):
    """The file would need arbitrary code (a pickle of objects) to load: refused."""


class CorruptCheckpointError(CheckpointError):
    """The file is truncated or malformed."""


class StateDictMismatchError(CheckpointError):
    """The state dict's keys or shapes do not match the model built from the config."""

    def __init__(self, missing=(), unexpected=(), mismatched=(), model: str = "model", show: int = 5,
                 wrong_dtype=()):
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)
        self.wrong_dtype = list(wrong_dtype)
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing key(s) (expected by {model}, not in the checkpoint): "
                         + _first(self.missing, show))
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected key(s) (in the checkpoint, not in {model}): "
                         + _first(self.unexpected, show))
        if self.mismatched:
            parts.append(f"{len(self.mismatched)} shape mismatch(es): " + _first(
                [f"{k}: expected {tuple(e)}, found {tuple(f)}" for k, e, f in self.mismatched], show))
        if self.wrong_dtype:
            parts.append(f"{len(self.wrong_dtype)} non-float tensor(s) where {model} has float parameters: " + _first(
                [f"{k}: expected a floating-point dtype, found {d}" for k, d in self.wrong_dtype], show))
        super().__init__("; ".join(parts) or "state dict mismatch")


class BackendUnavailableError(FastdiffError, RuntimeError):
    """A backend the user asked for explicitly cannot run on this machine."""


def _first(names, n: int) -> str:
    names = list(names)
    head = ", ".join(names[:n])
    return head + (f", ... (+{len(names) - n} more)" if len(names) > n else "")
