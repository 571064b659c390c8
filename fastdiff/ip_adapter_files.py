"""Where ``Pipeline.load_ip_adapter`` finds its adapters and their image encoder, as diffusers' ``load_ip_adapter``
reads its arguments: one adapter or several (lists), each a folder + subfolder + weight name, a file, or a state dict.
"""

from __future__ import annotations

import os
from typing import Optional

from .errors import BadArgumentError
from .utils.checks import finite_number


def adapter_sources(path, subfolder, weight_name) -> list:
    """[(path, subfolder, weight_name)] of every adapter: each argument one value or a list, a list of one repeated
    to the others' length (diffusers' rule: ``load_ip_adapter("h94/IP-Adapter", "models", [a, b])``)."""
    given = {"path": path, "subfolder": subfolder, "weight_name": weight_name}
    lists = {k: list(v) if isinstance(v, (list, tuple)) else [v] for k, v in given.items()}
    if any(not v for v in lists.values()):
        empty = next(k for k, v in lists.items() if not v)
        raise BadArgumentError(f"load_ip_adapter(): {empty}: expected a value or a non-empty list, found an empty list")
    lengths = {k: len(v) for k, v in lists.items()}
    count = max(lengths.values())
    if any(n not in (1, count) for n in lengths.values()):
        raise BadArgumentError(f"load_ip_adapter(): expected lists of one length (one entry per adapter) or of one, "
                               f"found lengths {lengths}")
    return [tuple(v[i] if len(v) > 1 else v[0] for v in lists.values()) for i in range(count)]


def scales_per_adapter(scale, count: int) -> tuple:
    """(layer scales, image scales): one scale per adapter (a list of ``count``, diffusers' form, or one value for all
    of them), each a number or InstantStyle's per-block dict (checked against the UNet later) for its layers, or a
    list of numbers, one per masked image (diffusers' ``[[0.7, 0.5]]``: ``fastdiff.ip_adapter_masks``), whose layers
    then read 1; image scales: per adapter that tuple or None."""
    if isinstance(scale, (list, tuple)):
        if len(scale) != count:
            loaded = "one IP-Adapter is" if count == 1 else f"{count} IP-Adapters are"
            raise BadArgumentError(f"scale: {loaded} loaded: expected a number, a per-block dict or a list of "
                                   f"{count} (one per adapter), found {len(scale)} values")
        scales = list(scale)
    else:
        scales = [scale] * count
    layers, images = [], []
    for s in scales:
        if isinstance(s, (list, tuple)):  # one per masked image
            if not s:
                raise BadArgumentError("scale: expected one scale per masked image, found an empty list")
            images.append(tuple(finite_number("scale", v) for v in s))
            layers.append(1.0)
        else:
            images.append(None)
            layers.append(s if isinstance(s, dict) else finite_number("scale", s))
    return layers, tuple(images)


def read_adapter_weights(path, subfolder: str, weight_name: Optional[str]) -> dict:
    """The adapter's state dict from a state dict, a file or a folder (safetensors read first; .bin files with
    ``torch.load(weights_only=True)``: no pickle code runs)."""
    from .checkpoints.io import read_weights

    if isinstance(path, dict):
        return path
    if not isinstance(path, (str, os.PathLike)):
        raise BadArgumentError(f"load_ip_adapter(): expected a path or a state dict, found {type(path).__name__}")
    return read_weights(adapter_file(path, subfolder, weight_name))


def adapter_file(path, subfolder: str, weight_name: Optional[str]) -> str:
    """The adapter file a path names: the file itself, or a folder's ``subfolder/weight_name`` (its one weight file
    without a ``weight_name``)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        folder = os.path.join(path, subfolder)
        if weight_name is None:
            names = sorted(f for f in os.listdir(folder) if f.endswith((".safetensors", ".bin"))) \
                if os.path.isdir(folder) else []
            if len(names) != 1:
                raise BadArgumentError(f"load_ip_adapter(): expected weight_name= (the adapter file in {folder}), "
                                       f"found {names or 'no weight files'}")
            weight_name = names[0]
        path = os.path.join(folder, weight_name)
    if not os.path.isfile(path):
        raise BadArgumentError(f"load_ip_adapter(): expected an IP-Adapter file, found no file at {path!r}")
    return path


def image_encoder(path, subfolder: str, folder: str, device, dtype):
    """(transformers' CLIPVisionModelWithProjection, a CLIPImageProcessor at its image size), from diffusers'
    place for them: ``<path>/<subfolder>/<folder>``, or ``<path>/<folder>`` for a folder name with a "/"."""
    try:
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection
    except ImportError as e:  # pragma: no cover - transformers comes with the text extra
        raise BadArgumentError("load_ip_adapter(): the image encoder needs transformers (pip install "
                               "'fastdiff[text]')") from e
    base = os.path.dirname(path) if os.path.isfile(path) else path
    where = os.path.join(base, subfolder, folder) if "/" not in folder else os.path.join(base, folder)
    if not os.path.isdir(where):
        raise BadArgumentError(f"load_ip_adapter(): expected the image encoder (a CLIPVisionModelWithProjection "
                               f"folder) at {where!r}, found none; pass image_encoder_folder= (or None, then "
                               f"ip_adapter_image_embeds=)")
    encoder = CLIPVisionModelWithProjection.from_pretrained(where, use_safetensors=None).to(device, dtype).eval()
    size = encoder.config.image_size
    return encoder, CLIPImageProcessor(size=size, crop_size=size)
