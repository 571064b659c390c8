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


def read_json(path: str) -> dict:
    """A JSON object (config, index) from ``path``; malformed JSON or another JSON type is a CorruptCheckpointError."""
    try:
        with open(path, encoding="utf-8") as f:  # JSON is UTF-8, whatever the locale
            obj = json.load(f)
    except json.JSONDecodeError as e:
        raise CorruptCheckpointError(f"{path}: expected JSON, found a parse error ({e})") from e
    except UnicodeDecodeError as e:
        raise CorruptCheckpointError(f"{path}: expected a JSON text file, found binary data") from e
    if not isinstance(obj, dict):
        raise CorruptCheckpointError(f"{path}: expected a JSON object, found a JSON {type(obj).__name__}")
    return obj


def read_safetensors(path: str, device: str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file; a truncated or malformed file raises CorruptCheckpointError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        why = _sniff(path) or (f"{e} (expected an 8-byte header length, a JSON header and tensor data of the sizes "
                               f"it lists; the file is {_size(path)} bytes: truncated or not safetensors?)")
        raise CorruptCheckpointError(f"cannot read safetensors file {path}: {why}") from e


def is_safetensors(path: str) -> bool:
    """Whether the file starts as safetensors does (an 8-byte little-endian header length, then a JSON object),
    whatever its name: a safetensors file saved as ``.pt`` / ``.bin`` is read as what it is."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= _size(path) - 8


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
    if is_safetensors(path):  # misnamed: read it as what it is (never through the unpickler)
        return read_safetensors(path, device=map_location)
    if not zipfile.is_zipfile(path):
        # Legacy (pre-1.6) torch files are still loadable with weights_only; anything shorter than a
        # zip header or a pickle protocol byte is truncated.
        with open(path, "rb") as f:
            head = f.read(2)
        if len(head) < 2:
            raise CorruptCheckpointError(f"{path} is {_size(path)} bytes: too short to be a torch checkpoint")
    else:
        _check_zip_records(path)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            # (read into memory, not mapped: a mapped file's pages stay the tensors' storage, so a model assigned
            # them would change when the file is saved over, a training run's checkpoint say, and fault if it shrank)
            return torch.load(path, map_location=map_location, weights_only=True, mmap=False)
    except pickle.UnpicklingError as e:
        # a real pickle naming a class or function the weights-only reader will not build ("Unsupported global:
        # GLOBAL x", "unsupported GLOBAL posix.system whose module posix is blocked"); any other refusal is a
        # file that is not a torch checkpoint at all
        if "GLOBAL" in str(e) and not _refused_global(e).endswith("."):  # (a name cut short: a truncated file)
            if any(name in str(e) for name in CALLBACK_GLOBALS):  # torch < 2.6: no stand-in can be named
                raise UnsafeCheckpointError(
                    f"{path} holds PyTorch Lightning's ModelCheckpoint callback beside its weights; fastdiff reads "
                    f"it as inert data with torch >= 2.6, and this torch ({torch.__version__}) cannot, so the file "
                    f"was refused unread") from e
            raise UnsafeCheckpointError(
                f"{path} holds Python objects that only an arbitrary pickle could rebuild ({_names(e)}), so "
                f"it was refused (fastdiff reads weights with torch.load(weights_only=True) and never executes a "
                f"pickle). Expected a state dict of tensors (optionally in 'model' / 'ema' / 'state_dict')"
            ) from e
        if _is_plain_pickle(path):
            raise UnsafeCheckpointError(
                f"{path} is a plain Python pickle, not a torch checkpoint, so it was refused unread (fastdiff never "
                f"executes a pickle); expected a torch file (torch.save of a state dict) or safetensors") from e
        raise _not_a_checkpoint(path, e) from e
    except OSError as e:
        raise CorruptCheckpointError(f"cannot read torch checkpoint {path} ({_size(path)} bytes): "
                                     f"{_own_words(e)}") from e
    except Exception as e:  # truncated archives, text, HTML, random bytes: whatever the unpickler trips on
        raise _not_a_checkpoint(path, e) from e


def _check_zip_records(path: str) -> None:
    """Every record of a torch zip archive against its CRC-32 (torch.load does not check them: a damaged download
    whose bytes changed, not its length, would load with altered weights)."""
    bad = None
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.CRC == 0 and info.file_size:  # (torch.serialization.set_crc32_options(False) writes none)
                    continue
                try:
                    with archive.open(info) as record:
                        while record.read(1 << 24):  # (zipfile checks the CRC-32 at the record's end)
                            pass
                except zipfile.BadZipFile:
                    bad = info.filename
                    break
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError) as e:  # (RuntimeError: an encrypted record)
        raise CorruptCheckpointError(f"cannot read torch checkpoint {path} ({_size(path)} bytes) as a zip archive: "
                                     f"{e}") from e
    if bad is not None:
        raise CorruptCheckpointError(f"{path}: the record {bad!r} does not match its CRC-32: the file is damaged "
                                     f"(download it again)")


def _sniff(path: str) -> Optional[str]:
    """Why a weights file cannot be one, when its first bytes tell (a git-lfs pointer, a text page); else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        return None
    if head.startswith(b"version https://git-lfs"):
        return "it is a git-lfs pointer, not the weights (fetch them with `git lfs pull`)"
    if head.lstrip()[:1] in (b"<", b"{", b"["):
        return "it looks like a text file (HTML / JSON), e.g. an error page saved in place of the download"
    return None


def _not_a_checkpoint(path: str, error: Exception) -> CorruptCheckpointError:
    why = _sniff(path) or f"{type(error).__name__}: {_own_words(error)}"
    return CorruptCheckpointError(f"cannot read torch checkpoint {path} ({_size(path)} bytes): expected a torch "
                                  f"file (zip archive or legacy pickle of tensors); {why}")


_SNIFF_OPCODES = 100_000


def _is_plain_pickle(path: str) -> bool:
    """A whole, well-formed pickle stream that is no torch file (torch's legacy format is pickles too, but its
    weights-only reader takes those): its opcodes are read, never run, to tell it from damaged bytes."""
    import pickletools

    if zipfile.is_zipfile(path):
        return False
    with open(path, "rb") as f:
        if f.read(1) != b"\x80":  # PROTO: protocol 2 and newer
            return False
        f.seek(0)
        try:
            for count, _ in enumerate(pickletools.genops(f)):
                if count >= _SNIFF_OPCODES:  # well-formed this far: a pickle (reading on costs minutes per GB)
                    return True
        except Exception:  # an opcode pickle does not know, a stream cut short: damaged, not a pickle
            return False
        return f.read(1) == b""  # one pickle, and nothing after it


def _refused_global(e: BaseException) -> str:
    """The class or function torch's weights-only reader refused, as its error names it."""
    import re

    m = re.search(r"(?:Unsupported global: GLOBAL|GLOBAL) ([\w.]+)", str(e))
    return m.group(1) if m else ""


def _names(e: BaseException) -> str:
    name = _refused_global(e)
    return f"it names {name}" if name else "a class or function no state dict holds"


def _own_words(e: BaseException) -> str:
    """torch's message, without its advice to re-run with weights_only=False (which would execute the pickle)."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip() and "weights_only" not in ln]
    return lines[0].strip() if lines else e.__class__.__name__


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """A flat state dict from a safetensors or torch file."""
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    obj = read_torch_file(path)
    if not isinstance(obj, dict):
        raise CorruptCheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return obj


def read_sharded(folder: str, index_file: str) -> dict[str, torch.Tensor]:
    """Load a sharded checkpoint from its ``*.index.json`` (weight_map: key -> shard file), as the index says: each
    key from the shard the index names, a shard that is missing, outside the folder, or holding a key the index
    places elsewhere refused by name."""
    index = read_json(os.path.join(folder, index_file))
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        found = type(weight_map).__name__ if not isinstance(weight_map, dict) else "other values"
        raise CorruptCheckpointError(f"{index_file}: expected a 'weight_map' object of key -> shard file name, found "
                                     f"{found}")
    keys_of: dict[str, set] = {}
    for key, shard in weight_map.items():
        keys_of.setdefault(shard, set()).add(key)
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(keys_of):
        if os.path.basename(shard) != shard or shard in ("", ".", ".."):
            raise CorruptCheckpointError(f"{index_file}: expected shard file names inside {folder}, found {shard!r}")
        path = os.path.join(folder, shard)
        if not os.path.isfile(path):
            raise CorruptCheckpointError(f"{index_file} lists shard {shard} ({len(keys_of[shard])} key(s)), not found "
                                         f"in {folder}")
        tensors = read_weights(path)
        elsewhere = sorted(set(tensors) - keys_of[shard])
        if elsewhere:
            raise CorruptCheckpointError(
                f"{shard} holds {len(elsewhere)} key(s) that {index_file} places in another shard or not at all: "
                f"{elsewhere[:5]} (expected only the keys the index assigns to it)")
        missing = sorted(keys_of[shard] - set(tensors))
        if missing:
            raise CorruptCheckpointError(f"{index_file} places {len(missing)} key(s) in {shard}, which does not hold "
                                         f"them: {missing[:5]}")
        state.update(tensors)
    return state


def pick_state_dict(obj, prefer: tuple[str, ...] = ("ema", "model", "state_dict"),
                    source: str = "the checkpoint", notes: Optional[list] = None) -> dict[str, torch.Tensor]:
    """The tensor dict inside a (training) checkpoint: a plain state dict, or the first of ``prefer`` present. A
    preferred entry that is there but holds something else is refused (never silently passed over for the next:
    ``ema`` falling back to ``model`` would load the training weights). ``notes`` gets a line naming the entry read
    and the other weights left (a train.py checkpoint's ``ema`` over its ``model``)."""
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return _string_keys(obj, source)
    if isinstance(obj, dict):
        for k in prefer:
            if k not in obj:
                continue
            v = obj[k]
            bad = _non_tensor_entry(v)
            if bad is not None:
                raise CorruptCheckpointError(f"{source}: expected {k!r} to hold a state dict of tensors, found {bad}")
            left = [o for o in obj if o != k and _non_tensor_entry(obj[o]) is None]
            if notes is not None and left:
                notes.append(f"the checkpoint's {k!r} weights were loaded (its {', '.join(map(repr, left))} not)")
            elif notes is not None and k == "model" and "ema" in prefer:
                notes.append("the checkpoint has no 'ema' weights: its 'model' (training) weights were loaded")
            return _string_keys(v, source)
        bad = _non_tensor_entry(obj)
        raise CorruptCheckpointError(f"{source}: expected a state dict of tensors or a checkpoint with one of "
                                     f"{prefer}, found {bad} among keys {list(obj)[:8]}")
    raise CorruptCheckpointError(f"{source}: expected a state dict of tensors or a checkpoint with one of {prefer}, "
                                 f"found a {type(obj).__name__}")


def _string_keys(state: dict, source: str) -> dict:
    """``state`` once every key is a string (a state dict's are parameter names)."""
    odd = next((k for k in state if not isinstance(k, str)), None)
    if odd is not None:
        raise CorruptCheckpointError(f"{source}: expected a state dict whose keys are parameter names (strings), "
                                     f"found the key {odd!r} ({type(odd).__name__})")
    return state


def _non_tensor_entry(obj) -> Optional[str]:
    """None for a non-empty dict of tensors, else what is wrong with it (its first non-tensor entry)."""
    if not isinstance(obj, dict):
        return f"a {type(obj).__name__}"
    if not obj:
        return "an empty dict"
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            return f"{k!r}: a {type(v).__name__}"
    return None


def _size(path: str) -> Optional[int]:
    try:
        return os.path.getsize(path)
    except OSError:
        return None
