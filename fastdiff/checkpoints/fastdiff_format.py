"""fastdiff's own format: a folder with ``fastdiff.json`` (the ModelSpec) and ``model.safetensors`` (and, for a latent
model with a VAE decoder, ``vae.safetensors`` with its config in ``fastdiff.json``; for a text model with text
encoders, their diffusers folders copied as they were: ``tokenizer/``, ``text_encoder/``, ...).

Written atomically by ``Pipeline.save``; read back with no conversion and no pickle.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch
from safetensors.torch import save_file

from typing import Optional

from ..errors import BadArgumentError, CorruptCheckpointError, FastdiffError
from ..spec import ModelSpec
from ..utils.atomic import atomic_dir
from .io import read_json, read_safetensors

SPEC_FILE = "fastdiff.json"
WEIGHTS_FILE = "model.safetensors"
VAE_FILE = "vae.safetensors"
FORMAT_VERSION = 1
CONTROLNET_FOLDER = r"controlnet(_\d+)?"  # a save's ControlNets, as diffusers names them
# the text-encoder folders a save may hold (fastdiff.prompts.encoder.FAMILY_PARTS's names)
TEXT_FOLDERS = tuple(f"{name}{suffix}" for suffix in ("", "_2", "_3") for name in ("tokenizer", "text_encoder"))


def is_fastdiff_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, SPEC_FILE))


def _check_replaceable(path: str) -> None:
    """``path`` may be written: it does not exist, or it is an earlier save (only fastdiff's own files).
    Anything else there (a diffusers folder converted "in place", a folder of the user's files) is never
    replaced: the atomic write swaps whole folders."""
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path):
        raise BadArgumentError(f"save: {path} exists and is a file; expected a new path or a folder written by "
                               f"save()")
    extra = sorted(name for name in set(os.listdir(path)) - {SPEC_FILE, WEIGHTS_FILE, VAE_FILE} - set(TEXT_FOLDERS)
                   if not re.fullmatch(CONTROLNET_FOLDER, name))  # (a save's ControlNets)
    if extra or not is_fastdiff_folder(path):
        found = ", ".join(extra[:5]) + (" ..." if len(extra) > 5 else "") if extra else f"no {SPEC_FILE}"
        raise BadArgumentError(f"save: {path} exists and is not a fastdiff folder (found {found}); refusing to "
                               f"replace it. Expected a new path or a folder written by save()")


def _cpu_state(module: torch.nn.Module) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def save_fastdiff(path: str, model: torch.nn.Module, spec: ModelSpec, vae=None, prompt_encoder=None,
                  controlnet=None) -> str:
    """Write the fastdiff folder (atomically); a ControlNet (or several: ``controlnet.nets``) goes beside it as
    diffusers' ControlNetModel folders controlnet/, controlnet_1/, ..., which ``load`` attaches again."""
    from .. import __version__

    _check_replaceable(path)
    header = {"format": "fastdiff", "format_version": FORMAT_VERSION, "fastdiff_version": __version__,
              "spec": spec.to_dict()}
    if vae is not None:
        header["vae"] = vae.config.to_dict()
    if prompt_encoder is not None:
        header["text_encoders"] = {"family": prompt_encoder.family, "folders": prompt_encoder.folders(),
                                   "force_zeros_for_empty_prompt": prompt_encoder.zero_negative,
                                   "variant": prompt_encoder.variant}  # (the copies keep the variant's file names)
    with atomic_dir(path) as tmp:
        save_file(_cpu_state(model), os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
        if vae is not None:
            save_file(_cpu_state(vae), os.path.join(tmp, VAE_FILE), metadata={"format": "pt"})
        if prompt_encoder is not None:  # the folders as read (safetensors or weights-only .bin), not re-serialised
            for sub in prompt_encoder.folders():
                shutil.copytree(os.path.join(prompt_encoder.folder, sub), os.path.join(tmp, sub))
        if controlnet is not None:
            from .controlnet import save_controlnet

            nets = getattr(controlnet, "nets", None) or [controlnet]
            header["controlnets"] = _controlnet_names(nets)
            # (a ControlNet in several places, a Union one given several modes: one folder)
            for name, net in dict(zip(header["controlnets"], nets)).items():
                save_controlnet(net, os.path.join(tmp, name))
        with open(os.path.join(tmp, SPEC_FILE), "w") as f:
            json.dump(header, f, indent=2)
    return path


def _controlnet_names(nets: list) -> list:
    """The folder of each ControlNet in order: controlnet/, controlnet_1/, ... one per distinct module, so one module
    named twice (``set_controlnet([F, F])``) is saved once and loads back as one module again."""
    folders = {}
    for net in nets:
        folders.setdefault(id(net), "controlnet" + (f"_{len(folders)}" if folders else ""))
    return [folders[id(net)] for net in nets]


def fastdiff_controlnet_folders(path: str) -> Optional[list]:
    """The ControlNet folders a fastdiff save drives its network with, in order and repeated where one module was
    shared (``fastdiff.json``'s ``controlnets``), or None for a save that predates the entry."""
    names = read_json(os.path.join(path, SPEC_FILE)).get("controlnets")
    if names is None:
        return None
    if not isinstance(names, list) or not names or not all(
            isinstance(n, str) and re.fullmatch(CONTROLNET_FOLDER, n) for n in names):
        raise CorruptCheckpointError(f"{path}/{SPEC_FILE}: 'controlnets': expected a list of folder names "
                                     f"controlnet, controlnet_1, ..., found {names!r}")
    missing = sorted({n for n in names if not os.path.isfile(os.path.join(path, n, "config.json"))})
    if missing:
        raise CorruptCheckpointError(f"{path}: {SPEC_FILE} names the ControlNet folder(s) {', '.join(missing)}, "
                                     f"expected each with its config.json, found none")
    return [os.path.join(path, n) for n in names]


def load_fastdiff(path: str):
    """(spec, state dict) of a fastdiff folder."""
    header = read_json(os.path.join(path, SPEC_FILE))
    version = header.get("format_version", 0)
    if header.get("format") != "fastdiff" or not isinstance(version, int) or version > FORMAT_VERSION:
        raise CorruptCheckpointError(
            f"{path}/{SPEC_FILE}: expected format 'fastdiff' version <= {FORMAT_VERSION}, found "
            f"{header.get('format')!r} version {version!r}")
    if not isinstance(header.get("spec"), dict):
        raise CorruptCheckpointError(f"{path}/{SPEC_FILE}: expected a 'spec' object (the model spec), found "
                                     f"{type(header.get('spec')).__name__}")
    weights = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(weights):
        raise CorruptCheckpointError(f"{path}: expected {WEIGHTS_FILE} beside {SPEC_FILE}, found none")
    try:
        spec = ModelSpec.from_dict(header["spec"])
    except FastdiffError:  # a spec value the models refuse says so itself
        raise
    except (TypeError, KeyError, ValueError) as e:
        raise CorruptCheckpointError(f"{path}/{SPEC_FILE}: the model spec does not read back "
                                     f"({type(e).__name__}: {e})") from e
    return spec, read_safetensors(weights)


def load_fastdiff_vae(path: str, device="cpu"):
    """The VAE decoder saved beside the network (``vae.safetensors``), or None."""
    config = read_json(os.path.join(path, SPEC_FILE)).get("vae")
    if config is None:
        return None
    weights = os.path.join(path, VAE_FILE)
    if not isinstance(config, dict) or not os.path.isfile(weights):
        raise CorruptCheckpointError(f"{path}: {SPEC_FILE} names a VAE, expected its config object and {VAE_FILE}")
    from ..models.vae import VAEConfig
    from .vae import build_vae

    return build_vae(VAEConfig.from_dict(config), read_safetensors(weights), f"VAE from {path}", device)


def fastdiff_text_header(path: str) -> Optional[dict]:
    """The ``text_encoders`` entry of a fastdiff folder (None: saved without text encoders)."""
    entry = read_json(os.path.join(path, SPEC_FILE)).get("text_encoders")
    return entry if isinstance(entry, dict) else None
