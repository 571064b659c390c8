"""diffusers ``ControlNetModel`` folders (config.json + diffusion_pytorch_model.safetensors) -> ``ControlNet``.

fastdiff's ControlNet keeps diffusers' parameter names (its UNet part is the native UNet's), so the weights load as
they are, after the same renaming of pre-0.14 attention keys as a UNet's.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from ..errors import BadArgumentError, UnsupportedConfigError
from ..models.controlnet import CONTROLNET_FIELDS, ControlNet
from ..models.unet import UNetConfig
from .common import strict_load
from .diffusers_folder import find_weights
from .diffusers_unet import convert_diffusers_unet
from .fastdiff_format import fastdiff_controlnet_folders, is_fastdiff_folder
from .io import read_json

CLASS_NAME = "ControlNetModel"
FLUX_CLASS_NAME = "FluxControlNetModel"
SD3_CLASS_NAME = "SD3ControlNetModel"


def controlnet_config(config: dict) -> tuple[UNetConfig, dict]:
    """(the UNet part's config, ControlNet's own fields) from a ControlNetModel config.json dict."""
    if config.get("_class_name", CLASS_NAME) != CLASS_NAME:
        raise UnsupportedConfigError("_class_name", config.get("_class_name"), supported=[CLASS_NAME],
                                     model="a ControlNet folder")
    own = {k: config.get(k, v) for k, v in CONTROLNET_FIELDS.items()}
    if not isinstance(own["global_pool_conditions"], bool):  # (a string "false" would read as True)
        raise UnsupportedConfigError("global_pool_conditions", own["global_pool_conditions"],
                                     supported="true or false", model="a ControlNet folder")
    if config.get("class_embed_type") == "simple_projection":  # (diffusers' ControlNetModel has no branch for it and
        # silently builds no class embedding; a folder saying so was hardly meant that way)
        raise UnsupportedConfigError("class_embed_type", "simple_projection", model="a ControlNet folder",
                                     supported="None, 'timestep', 'identity' or 'projection' (diffusers' "
                                               "ControlNetModel builds no class embedding for 'simple_projection')")
    unet = {k: v for k, v in config.items() if k not in CONTROLNET_FIELDS}
    n = len(unet.get("block_out_channels", (320, 640, 1280, 1280)))
    # (no up path: the UNet config needs one to validate, and the ControlNet builds none)
    unet.update(out_channels=unet.get("in_channels", 4), up_block_types=["UpBlock2D"] * n)
    return UNetConfig.from_diffusers(unet, "UNet2DConditionModel"), own


def load_controlnet(folder: str, variant: Optional[str] = None, dtype: Optional[torch.dtype] = None,
                    device="cpu"):
    """A ControlNet from a diffusers ControlNetModel folder, an SD3 one from an SD3ControlNetModel folder, a FLUX.1
    one from a FluxControlNetModel folder (its weights checked key by key)."""
    path = os.path.expanduser(str(folder))
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise BadArgumentError(f"controlnet: expected a diffusers ControlNetModel, SD3ControlNetModel or "
                               f"FluxControlNetModel folder (config.json + weights), found {folder!r}")
    config = read_json(config_path)
    if config.get("_class_name") == FLUX_CLASS_NAME:
        return _load_flux_controlnet(path, config, variant, dtype, device)
    if config.get("_class_name") == SD3_CLASS_NAME:
        return _load_sd3_controlnet(path, config, variant, dtype, device)
    unet_config, own = controlnet_config(config)
    with torch.device("meta"):
        model = ControlNet(unet_config, **own)
    state = convert_diffusers_unet(find_weights(path, variant))
    return strict_load(model, state, f"ControlNet {path}", dtype=dtype, device=device).eval()


def _load_flux_controlnet(path: str, config: dict, variant, dtype, device):
    from ..models.flux import FluxConfig
    from ..models.flux_controlnet import FluxControlNet

    config = dict(config)
    num_mode = config.pop("num_mode", None)
    hint = config.pop("conditioning_embedding_channels", None)
    if hint is not None:  # (XLabs' configs name patch_size 2, the hint's 2x2 packing: the transformer's is 1)
        if config.get("patch_size", 1) != 2:
            raise UnsupportedConfigError("patch_size", config.get("patch_size", 1), supported=[2],
                                         model="FluxControlNetModel with a hint encoder (XLabs')")
        config["patch_size"] = 1
    with torch.device("meta"):
        model = FluxControlNet(FluxConfig.from_diffusers({**config, "_class_name": "FluxTransformer2DModel"}),
                               num_mode=num_mode, conditioning_embedding_channels=hint)
    return strict_load(model, find_weights(path, variant), f"FLUX.1 ControlNet {path}", dtype=dtype,
                       device=device).eval()


def _load_sd3_controlnet(path: str, config: dict, variant, dtype, device):
    from ..models.sd3_controlnet import SD3ControlNet, split_config

    mmdit_config, own = split_config(config)
    with torch.device("meta"):
        model = SD3ControlNet(mmdit_config, **own)
    state = find_weights(path, variant)
    if own["image_only"]:  # (diffusers' pipeline save writes the transformer's positions it copied in: not its own)
        state = {k: v for k, v in state.items() if not k.startswith("pos_embed.")}
    return strict_load(model, state, f"SD3 ControlNet {path}", dtype=dtype, device=device).eval()


def _transformer_diffusers_config(net) -> dict:
    """An SD3 / FLUX.1 ControlNet's config.json: its transformer fields and its own."""
    from ..models.flux_controlnet import FluxControlNet

    flux = isinstance(net, FluxControlNet)
    out = {"_class_name": FLUX_CLASS_NAME if flux else SD3_CLASS_NAME}
    out.update({k: v for k, v in net.config.to_dict().items() if k not in ("extra",) + (("out_channels",) if flux
                                                                                        else ())})
    if flux:
        out.update(num_mode=net.num_mode, conditioning_embedding_channels=net.conditioning_embedding_channels)
        if net.reads_pixels:
            out["patch_size"] = 2  # (XLabs': diffusers packs the hint by it)
        return out
    from ..models.sd3_controlnet import OWN_FIELDS

    out = {**out, **OWN_FIELDS, "force_zeros_for_pooled_projection": net.force_zeros_for_pooled_projection,
           "extra_conditioning_channels": net.extra_conditioning_channels}
    if net.image_only:  # (SD3.5's official layout: the transformer's positions, no text input)
        out.update(joint_attention_dim=None, use_pos_embed=False, pos_embed_type=None, pos_embed_max_size=None)
    return out


def diffusers_config(net) -> dict:
    """``net``'s config.json as diffusers' ControlNetModel reads it: its own fields, and every UNet field it takes or
    that differs from UNet2DConditionModel's default (what fastdiff needs to read the network back)."""
    from ..models.unet_config import _DIFFUSERS_DEFAULTS

    if not isinstance(net, ControlNet):  # an SD3 / FLUX.1 ControlNet
        return _transformer_diffusers_config(net)
    c, defaults = net.config, _DIFFUSERS_DEFAULTS["UNet2DConditionModel"]
    out = {"_class_name": CLASS_NAME}
    for key, default in defaults.items():
        value = getattr(c, key)
        if key not in ("out_channels", "up_block_types", "sample_size") and (
                key in _CONTROLNET_MODEL_FIELDS or value != default):
            out[key] = list(value) if isinstance(value, tuple) else value
    out.update(c.extra)
    out.update(net.controlnet_config)
    return out


# the UNet fields diffusers' ControlNetModel takes (always written)
_CONTROLNET_MODEL_FIELDS = ("in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "mid_block_type",
                            "block_out_channels", "layers_per_block", "cross_attention_dim", "attention_head_dim",
                            "num_attention_heads", "transformer_layers_per_block", "use_linear_projection",
                            "addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim")


def save_controlnet(net: ControlNet, folder: str) -> None:
    """A diffusers ControlNetModel folder (config.json + diffusion_pytorch_model.safetensors) of ``net``."""
    import json

    from safetensors.torch import save_file

    with torch.device("meta"):
        fresh = ControlNet(net.config, **net.controlnet_config) if isinstance(net, ControlNet) else type(net)(
            net.config, **net.own_config)
    keys = set(fresh.state_dict())  # (the weights alone: no stacked copies of optimised projections)
    os.makedirs(folder, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items() if k in keys}
    save_file(state, os.path.join(folder, "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(diffusers_config(net), f, indent=2)


def controlnet_folders(path: str) -> list:
    """A pipeline folder's ControlNet folders, as diffusers saves one or several: controlnet/, controlnet_1/, ...
    (a fastdiff save lists them, repeating a shared one)."""
    listed = fastdiff_controlnet_folders(path) if is_fastdiff_folder(path) else None
    if listed is not None:
        return listed
    folders = []
    while True:
        folder = os.path.join(path, "controlnet" + (f"_{len(folders)}" if folders else ""))
        if not os.path.isfile(os.path.join(folder, "config.json")):
            return folders
        folders.append(folder)


def unattachable(folders: list, pipe) -> Optional[str]:
    """Why a pipeline folder's ControlNet folders cannot drive ``pipe`` (another class than ControlNetModel, such as
    SD3's or FLUX.1's, or a base model that is not a text UNet), or None."""
    if not folders:
        return None
    unet = getattr(pipe.model, "config", None) is not None and getattr(pipe.model.config, "conditional", False) \
        and pipe.spec.kind == "unet"
    runs = CLASS_NAME if unet else {"flux": FLUX_CLASS_NAME, "mmdit": SD3_CLASS_NAME}.get(pipe.spec.kind)
    classes = sorted({read_json(os.path.join(f, "config.json")).get("_class_name") for f in folders} - {runs})
    if classes or runs is None:
        what = f"{', '.join(str(c) for c in classes)} (fastdiff runs ControlNetModel for text UNets, " \
               f"SD3ControlNetModel for SD3 and FluxControlNetModel for FLUX.1)" if classes else \
            f"a ControlNet for a {pipe.spec.kind} (fastdiff's drive text UNets, SD3 and FLUX.1)"
        return (f"the folder's {', '.join(os.path.basename(f) + '/' for f in folders)} holds {what}: not attached; the "
                f"base model loads alone")
    return None


__all__ = ["load_controlnet", "controlnet_config", "save_controlnet", "diffusers_config", "controlnet_folders",
           "unattachable"]
