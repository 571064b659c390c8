"""Safe readers for weight files: safetensors, and torch pickles with ``weights_only=True`` only.

No arbitrary pickle is ever executed. Training checkpoints that hold an ``argparse.Namespace`` (official
DiT's train.py) are read with that one class allow-listed, since a Namespace carries data only; PyTorch
Lightning's ``ModelCheckpoint`` callback (in Stable Diffusion ``.ckpt`` files) is read as a data-only stand-in.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import zipfile
from typing import Optional

import torch

from ..errors import CorruptCheckpointError, UnsafeCheckpointError


class TrainingCallbackState:
    """Stands in for a training framework's callback object pickled beside the weights (PyTorch Lightning's
    ``ModelCheckpoint``, which Lightning training runs such as the latent-diffusion code and its fine-tunes save
    in their ``.ckpt`` files): the unpickler builds this class instead of the framework's, so none of the
    framework's code runs and it need not be installed. Its pickled state is kept as data; fastdiff never reads it."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state):
        self.state = state


# Names of such objects, read as TrainingCallbackState (torch >= 2.6 maps a checkpoint's global name to a stand-in).
CALLBACK_GLOBALS = ("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
                    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint")
# Classes a weights file may hold besides tensors / containers: data only, no code on unpickling.
SAFE_GLOBALS = [argparse.Namespace]
if tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 6):
    SAFE_GLOBALS += [(TrainingCallbackState, name) for name in CALLBACK_GLOBALS]


def read_safetensors(path: str, device: str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file; a truncated or malformed file raises CorruptCheckpointError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CorruptCheckpointError(
            f"cannot read safetensors file {path}: {e} (expected an 8-byte header length, a JSON header and "
            f"tensor data of the sizes it lists; the file is {_size(path)} bytes: truncated or not safetensors?)"
        ) from e


def safetensors_metadata(path: str) -> dict[str, str]:
    """The ``__metadata__`` block of a safetensors header (empty dict when none)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise CorruptCheckpointError(f"cannot read the safetensors header of {path}: {e}") from e


def read_torch_file(path: str, map_location: str = "cpu") -> object:
    """``torch.load(weights_only=True)`` with a clear refusal for pickles of arbitrary objects."""
    if not zipfile.is_zipfile(path):
        # Legacy (pre-1.6) torch files are still loadable with weights_only; anything shorter than a
        # zip header or a pickle protocol byte is truncated.
        with open(path, "rb") as f:
            head = f.read(2)
        if len(head) < 2:
            raise CorruptCheckpointError(f"{path} is {_size(path)} bytes: too short to be a torch checkpoint")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=_mmap_ok(path))
    except pickle.UnpicklingError as e:
        # a real pickle naming a class or function the weights-only reader will not build ("Unsupported global:
        # GLOBAL x", "unsupported GLOBAL posix.system whose module posix is blocked"); any other refusal is a
        # file that is not a torch checkpoint at all
        if "GLOBAL" in str(e):
            if any(name in str(e) for name in CALLBACK_GLOBALS):  # torch < 2.6: no stand-in can be named
                raise UnsafeCheckpointError(
                    f"{path} holds PyTorch Lightning's ModelCheckpoint callback beside its weights; fastdiff reads "
                    f"it as inert data with torch >= 2.6, and this torch ({torch.__version__}) cannot, so the file "
                    f"was refused unread. Details: {_first_line(e)}") from e
            raise UnsafeCheckpointError(
                f"{path} holds Python objects that only an arbitrary pickle could rebuild, so it was refused "
                f"(fastdiff reads weights with torch.load(weights_only=True) and never executes a pickle). "
                f"Expected a state dict of tensors (optionally in 'model' / 'ema' / 'state_dict'). Details: "
                f"{_first_line(e)}"
            ) from e
        raise _not_a_checkpoint(path, e) from e
    except OSError as e:
        raise CorruptCheckpointError(f"cannot read torch checkpoint {path} ({_size(path)} bytes): "
                                     f"{_first_line(e)}") from e
    except Exception as e:  # truncated archives, text, HTML, random bytes: whatever the unpickler trips on
        raise _not_a_checkpoint(path, e) from e


def _not_a_checkpoint(path: str, error: Exception) -> CorruptCheckpointError:
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"version https://git-lfs"):
        why = "it is a git-lfs pointer, not the weights (fetch them with `git lfs pull`)"
    elif head.lstrip()[:1] in (b"<", b"{", b"["):
        why = "it looks like a text file (HTML / JSON), e.g. an error page saved in place of the download"
    else:
        why = f"{type(error).__name__}: {_first_line(error)}"
    return CorruptCheckpointError(f"cannot read torch checkpoint {path} ({_size(path)} bytes): expected a torch "
                                  f"file (zip archive or legacy pickle of tensors); {why}")


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """A flat state dict from a safetensors or torch file."""
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    obj = read_torch_file(path)
    if not isinstance(obj, dict):
        raise CorruptCheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return obj


def read_sharded(folder: str, index_file: str) -> dict[str, torch.Tensor]:
    """Load a sharded checkpoint from its ``*.index.json`` (weight_map: key -> shard file)."""
    with open(os.path.join(folder, index_file)) as f:
        index = json.load(f)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise CorruptCheckpointError(f"{index_file}: expected a 'weight_map' object, found {type(weight_map).__name__}")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        state.update(read_weights(os.path.join(folder, shard)))
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise CorruptCheckpointError(f"{index_file} lists {len(missing)} key(s) no shard holds: {missing[:5]}")
    return state


def pick_state_dict(obj, prefer: tuple[str, ...] = ("ema", "model", "state_dict")) -> dict[str, torch.Tensor]:
    """The tensor dict inside a (training) checkpoint: a plain state dict, or the first of ``prefer``."""
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    if isinstance(obj, dict):
        for k in prefer:
            v = obj.get(k)
            if isinstance(v, dict) and v and all(isinstance(t, torch.Tensor) for t in v.values()):
                return v
    found = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
    raise CorruptCheckpointError(f"expected a state dict of tensors or a checkpoint with one of {prefer}, found {found}")


def _mmap_ok(path: str) -> bool:
    return zipfile.is_zipfile(path)


def _size(path: str) -> Optional[int]:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
