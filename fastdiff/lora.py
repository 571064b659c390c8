"""LoRA weights merged into a loaded pipeline: what diffusers' ``load_lora_weights`` + ``fuse_lora`` compute,
without PEFT at run time.

A LoRA adds ``scale * (alpha / rank) * up @ down`` to a layer's weight (``down``: rank x in, ``up``: out x rank; a
convolution's through its flattened kernels). Merged into the weights, it costs nothing per step: captured graphs,
compiled models and stacked projections (``LinearStacks``: the layers' weights are views of the stack) read the
merged values, as the merge writes in place.

Files (safetensors only; a folder means its ``pytorch_lora_weights.safetensors``):

* diffusers / PEFT (``save_lora_weights``): ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` (``transformer.``
  for SD3 / FLUX.1, ``text_encoder.`` / ``text_encoder_2.`` for the text encoders). Alphas from the file's
  ``lora_adapter_metadata`` header (``lora_alpha``, ``alpha_pattern``, ``use_rslora``), else a module's ``.alpha``
  key, else the rank (scale 1), as diffusers reads them.
* kohya (sd-scripts): ``lora_unet_<module, dots as underscores>.lora_down.weight`` / ``lora_up.weight`` / ``.alpha``;
  ``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` for the text encoders. Module names in diffusers' layout (SD 1.x /
  2.x), or in the original LDM layout (SDXL's ``input_blocks_...`` / ``middle_block_...`` / ``output_blocks_...``,
  mapped through the single-file reader's renaming); FLUX.1 files in BFL's layout (``lora_unet_double_blocks_...``,
  ``fastdiff.lora_flux``). kohya's own OFT (``networks.oft``): ``oft_unet_<module>.oft_blocks`` / ``.alpha``.

* LyCORIS in kohya's names (or ``lycoris_<module>``, LyCORIS's own wrapper around the network): LoCon (kohya's keys,
  a convolution's Tucker core in ``lora_mid.weight``), LoHa (``hada_*``), LoKr (``lokr_*``), full (``diff`` /
  ``diff_b``: the bias is updated too), (IA)^3 (``weight`` / ``on_input``: a factor per channel that scales the
  weight), OFT / BOFT (``oft_blocks``: rotations of the weight's output rows), GLoRA (``a1`` / ``a2`` / ``b1`` /
  ``b2``) and norm layers' (``w_norm`` / ``b_norm``) (``fastdiff.lora_lycoris``), as LyCORIS's modules compute them.

DoRA (PEFT's ``use_dora``: ``lora_magnitude_vector`` keys) merges as PEFT's merge does: W + scale * update, each
output row rescaled to its magnitude over the norm of (the weight before any merge + the update); LyCORIS's DoRA
(``dora_scale``, kohya's names) as LyCORIS computes it (``fastdiff.lora_lycoris.dora_merged``). Not read: LyCORIS
layers of FLUX.1 in BFL's layout, and ``.bin`` pickles.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Optional

import torch

from .errors import BadArgumentError, CheckpointError, UnsupportedConfigError
from .lora_flux import bfl_layers, is_bfl_name

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes
# diffusers' component prefixes -> fastdiff's parts: the network, or a text encoder by its folder name
NETWORK_PREFIXES = ("unet", "transformer")
TEXT_PREFIXES = ("text_encoder", "text_encoder_2", "text_encoder_3")
KOHYA_PREFIXES = {"lora_unet": "network", "lora_te": "text_encoder", "lora_te1": "text_encoder",
                  "lora_te2": "text_encoder_2",
                  "lycoris": "network",  # (LyCORIS's own wrapper around one network: SD3 / FLUX.1 trainers write it)
                  "oft_unet": "network"}  # (kohya's own OFT, sd-scripts' networks.oft: UNet layers only)


@dataclass
class LoraLayer:
    """One layer's low-rank update: ``up @ down`` times ``alpha / rank`` (``alpha`` None: the rank)."""
    down: torch.Tensor  # (rank, in) or (rank, in, k, k)
    up: torch.Tensor  # (out, rank) or (out, rank, 1, 1)
    alpha: Optional[float] = None
    rslora: bool = False  # PEFT's rank-stabilized scaling: alpha / sqrt(rank)
    magnitude: Optional[torch.Tensor] = None  # DoRA's per-output-row magnitudes ((out,), or (1, out, 1, 1) for a conv)
    mid: Optional[torch.Tensor] = None  # LyCORIS LoCon's Tucker core (rank, rank, k, k): down (rank, in), up (out, rank)
    dora_scale: Optional[torch.Tensor] = None  # LyCORIS's DoRA (fastdiff.lora_lycoris.dora_merged)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def check(self, shape: torch.Size) -> None:
        """Refuse an update that cannot be added to a weight of ``shape`` (from the shapes alone): its output rows
        must be the weight's, and its inputs the weight's per row (in * k * k: a linear LoRA fits a 1x1
        convolution, as diffusers merges one)."""
        if self.up.dim() < 2 or self.down.dim() < 2:
            raise CheckpointError(f"LoRA: expected up (out, rank) and down (rank, in) matrices, found up "
                                  f"{tuple(self.up.shape)} and down {tuple(self.down.shape)}")
        if self.dora_scale is not None:
            from .lora_lycoris import dora_axis

            dora_axis(self.dora_scale, shape)
        if self.mid is not None:
            self._check_mid(shape)
            return
        if self.up.shape[1] != self.rank or math.prod(self.up.shape[2:]) != 1:
            raise CheckpointError(f"LoRA: up {tuple(self.up.shape)} and down {tuple(self.down.shape)} disagree on the "
                                  f"rank")
        update = (int(self.up.shape[0]), math.prod(self.down.shape[1:]))  # (out, in * k * k)
        # (a 1x1-convolution-shaped LoRA on a linear weight, older sd-scripts files of SD 2.x's proj_in / proj_out,
        # merges as A1111 and ComfyUI merge it)
        if len(shape) < 2 or update != (int(shape[0]), math.prod(shape[1:])) or (
                self.down.dim() > 2 and len(shape) > 2 and tuple(self.down.shape[1:]) != tuple(shape[1:])):
            raise CheckpointError(f"LoRA: an update of {update} (up {tuple(self.up.shape)}, down "
                                  f"{tuple(self.down.shape)}) for a weight of {tuple(shape)}")
        if self.magnitude is not None and self.magnitude.numel() != int(shape[0]):
            raise CheckpointError(f"LoRA: DoRA magnitudes {tuple(self.magnitude.shape)} for a weight of "
                                  f"{tuple(shape)}: expected one per output row ({int(shape[0])})")

    def _check_mid(self, shape: torch.Size) -> None:
        mid = self.mid
        if mid.dim() < 3 or math.prod(self.up.shape[1:]) != mid.shape[0] or self.rank != mid.shape[1]:
            raise CheckpointError(f"LoRA: lora_mid {tuple(mid.shape)} (a Tucker core (rank, rank, k, k)) does not fit "
                                  f"up {tuple(self.up.shape)} and down {tuple(self.down.shape)}")
        update = (int(self.up.shape[0]), math.prod(self.down.shape[1:]), *mid.shape[2:])  # (out, in, k, k)
        if tuple(update) != tuple(shape):
            raise CheckpointError(f"LoRA: an update of {update} (up {tuple(self.up.shape)}, lora_mid "
                                  f"{tuple(mid.shape)}, down {tuple(self.down.shape)}) for a weight of {tuple(shape)}")
        if self.magnitude is not None:
            raise CheckpointError("LoRA: DoRA magnitudes with a Tucker core (lora_mid)")

    def delta(self, shape: torch.Size) -> torch.Tensor:
        """The float32 update of a weight of ``shape``."""
        self.check(shape)
        alpha = float(self.rank if self.alpha is None else self.alpha)
        factor = alpha / (math.sqrt(self.rank) if self.rslora else self.rank)
        up, down = self.up.float().flatten(1), self.down.float().flatten(1)  # (out, r), (r, in * k * k)
        if self.mid is not None:  # (the core's kernels between the two 1x1 factors)
            return torch.einsum("n m ..., i n, m j -> i j ...", self.mid.float(), up, down) * factor
        return ((up @ down) * factor).reshape(shape)


def read_lora(source) -> dict:
    """``{(part, module): LoraLayer}`` from a safetensors file, a folder holding diffusers' file, or a state dict
    (``part``: "network" or a text encoder's folder name). Refuses what it cannot read, by name."""
    metadata = {}
    if isinstance(source, dict):
        state = source
    else:
        path = os.path.expanduser(str(source))
        if os.path.isdir(path):
            path = os.path.join(path, WEIGHT_NAME)
        if not os.path.isfile(path):
            raise BadArgumentError(f"lora: expected a .safetensors file or a folder with {WEIGHT_NAME}, found "
                                   f"{source!r}")
        from .checkpoints.io import is_safetensors, read_safetensors

        if not is_safetensors(path):
            raise UnsupportedConfigError("LoRA file", os.path.basename(path), supported="safetensors (a pickled "
                                         ".bin / .pt is never executed: convert it to safetensors)")
        state = read_safetensors(path)
        metadata = _header_metadata(path)
    from .checkpoints.common import check_finite

    check_finite({k: v for k, v in state.items() if torch.is_tensor(v)}, "LoRA")  # (merged, NaN breaks every weight)
    if any(k.startswith(tuple(p + "_" for p in KOHYA_PREFIXES)) for k in state):
        return _read_kohya(state)
    return _read_peft(state, metadata)


def _header_metadata(path: str) -> dict:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    try:
        metadata = json.loads(raw) if raw else {}
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: lora_adapter_metadata is not JSON ({e})") from e
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: lora_adapter_metadata: expected a JSON object, found "
                              f"{type(metadata).__name__}")
    return metadata


def _read_peft(state: dict, metadata: dict) -> dict:
    layers, seen = {}, set()
    for key in state:
        m = re.fullmatch(r"(.+?)\.(.+)\.(lora_A|lora_B|alpha|lora_magnitude_vector)(\.weight)?", key)
        if m is None or m.group(1) not in NETWORK_PREFIXES + TEXT_PREFIXES:
            raise UnsupportedConfigError("LoRA key", key, supported="diffusers / PEFT keys (unet. / transformer. / "
                                         "text_encoder*. + <module>.lora_A.weight / lora_B.weight) or kohya keys "
                                         "(lora_unet_ / lora_te*_ ... lora_down.weight / lora_up.weight)")
        seen.add((m.group(1), m.group(2)))
    configs = {prefix: {k[len(prefix) + 1:]: v for k, v in metadata.items() if k.startswith(prefix + ".")}
               for prefix in {prefix for prefix, _ in seen}}  # the PEFT config of each part (diffusers' header)
    for prefix, module in sorted(seen):
        down, up = state.get(f"{prefix}.{module}.lora_A.weight"), state.get(f"{prefix}.{module}.lora_B.weight")
        if down is None or up is None:
            raise CheckpointError(f"LoRA: {prefix}.{module} has lora_{'A' if down is None else 'B'}.weight missing")
        config = configs[prefix]
        magnitude = _dora_magnitude(state, f"{prefix}.{module}")
        if config.get("use_dora") and magnitude is None:
            raise CheckpointError(f"LoRA: {prefix}.{module}: use_dora is set and its lora_magnitude_vector is "
                                  f"missing (DoRA's magnitudes; PEFT would start them from the base weight's norms)")
        alpha = state.get(f"{prefix}.{module}.alpha")
        alpha = _alpha(alpha, f"{prefix}.{module}.alpha") if alpha is not None else _metadata_alpha(config, module)
        part = "network" if prefix in NETWORK_PREFIXES else prefix
        layers[(part, module)] = LoraLayer(down, up, alpha, rslora=bool(config.get("use_rslora")),
                                           magnitude=magnitude)
    return layers


def _dora_magnitude(state: dict, name: str) -> Optional[torch.Tensor]:
    """A module's DoRA magnitudes (PEFT's ``lora_magnitude_vector``, with or without ``.weight``), or None."""
    for key in (f"{name}.lora_magnitude_vector", f"{name}.lora_magnitude_vector.weight"):
        if key in state:
            return state[key]
    return None


def _metadata_alpha(config: dict, module: str) -> Optional[float]:
    """PEFT's alpha for ``module``: its ``alpha_pattern`` entry (a name suffix or regex), else ``lora_alpha``."""
    patterns = config.get("alpha_pattern") or {}
    if not isinstance(patterns, dict):
        raise CheckpointError(f"LoRA: lora_adapter_metadata's alpha_pattern: expected an object, found {patterns!r}")
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return _alpha(value, f"alpha_pattern {pattern!r}")
    alpha = config.get("lora_alpha")
    return None if alpha is None else _alpha(alpha, "lora_alpha")


def _alpha(value, name: str) -> float:
    """One finite number (a scalar tensor, or a number from the header's JSON), or a clear error."""
    try:
        if torch.is_tensor(value) and value.numel() != 1:
            raise ValueError(f"{value.numel()} values")
        alpha = float(value)
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"LoRA: {name}: expected one number, found {value!r}"[:300] + f" ({e})") from None
    if not math.isfinite(alpha):
        raise CheckpointError(f"LoRA: {name}: expected a finite number, found {alpha}")
    return alpha


def _read_kohya(state: dict) -> dict:
    grouped: dict = {}  # {kohya module name: {key suffix: tensor}} (the names hold no dots)
    for key, value in state.items():
        name, _, suffix = key.partition(".")
        grouped.setdefault(name, {})[suffix] = value
    layers = {}
    for name in sorted(grouped):
        prefix = next((p for p in sorted(KOHYA_PREFIXES, key=len, reverse=True) if name.startswith(p + "_")), None)
        if prefix is None:
            raise UnsupportedConfigError("LoRA key", name, supported=KOHYA_KINDS)
        keys = dict(grouped[name])
        alpha, dora_scale = keys.pop("alpha", None), keys.pop("dora_scale", None)
        alpha = None if alpha is None else _alpha(alpha, f"{name}.alpha")
        layer = _kohya_oft_layer(name, keys, alpha, dora_scale) if prefix == "oft_unet" else \
            _kohya_layer(name, keys, alpha, dora_scale)
        if layer is None:
            raise UnsupportedConfigError("LoRA key", name, supported=KOHYA_KINDS)
        module, part = name[len(prefix) + 1:], KOHYA_PREFIXES[prefix]
        if part == "network" and is_bfl_name(module):  # FLUX.1 in BFL's layout: diffusers' layers, fused ones split
            if not isinstance(layer, LoraLayer) or layer.mid is not None or layer.dora_scale is not None:
                raise UnsupportedConfigError("LoRA key", name, supported="lora_down / lora_up for FLUX.1 layers in "
                                             "BFL's layout (LyCORIS's LoHa / LoKr / Tucker cores / DoRA are not split)")
            layers.update({(part, target): sub for target, sub in bfl_layers(module, layer)})
        else:  # the module, dots as underscores: resolved against the part's own module names when merged
            layers[(part, "~" + module)] = layer
    return layers


KOHYA_KINDS = ("kohya keys lora_unet_* / lora_te*_* / lycoris_* with lora_down.weight, lora_up.weight "
               "(lora_mid.weight), alpha (and dora_scale), or LyCORIS's LoHa (hada_*) / LoKr (lokr_*) / full "
               "(diff, diff_b) / (IA)^3 (weight, on_input) / OFT, BOFT (oft_blocks, rescale) / GLoRA (a1.weight, "
               "a2.weight, b1.weight, b2.weight) / norm (w_norm, b_norm); kohya's OFT: oft_unet_* with oft_blocks, "
               "alpha")
LORA_SUFFIXES = ("lora_down.weight", "lora_up.weight", "lora_mid.weight")


def _kohya_layer(name: str, keys: dict, alpha: Optional[float], dora_scale: Optional[torch.Tensor] = None):
    """One kohya module's layer from its tensors ({key suffix: tensor}, alpha taken out): a LoRA (LoCon), a LoHa or a
    LoKr; None for none of them. A key that none of them reads is refused by name (it would be lost)."""
    from .lora_lycoris import lycoris_layer

    if "lora_down.weight" in keys or "lora_up.weight" in keys:
        down, up = keys.get("lora_down.weight"), keys.get("lora_up.weight")
        if down is None or up is None:
            raise CheckpointError(f"LoRA: {name} has lora_{'down' if down is None else 'up'}.weight missing")
        layer = LoraLayer(down, up, alpha, mid=keys.get("lora_mid.weight"), dora_scale=dora_scale)
        known = LORA_SUFFIXES
    else:
        layer = lycoris_layer(name, keys, alpha, dora_scale)
        known = layer.KEYS if layer is not None else ()
    unread = sorted(set(keys) - set(known))
    if layer is not None and unread:
        raise UnsupportedConfigError("LoRA key", f"{name}.{unread[0]}", supported=KOHYA_KINDS + ", one kind per "
                                     "module")
    return layer


def _kohya_oft_layer(name: str, keys: dict, alpha: Optional[float], dora_scale: Optional[torch.Tensor]):
    """kohya's own OFT layer (``oft_unet_<module>.oft_blocks`` (n, b, b) and ``.alpha``, the constraint): its
    output rows turned by the blocks' rotations, the bias untouched, as sd-scripts' ``OFTModule`` computes it."""
    from .lora_lycoris import OFTLayer

    unread = sorted(set(keys) - {"oft_blocks"}) + (["dora_scale"] if dora_scale is not None else [])
    if unread or "oft_blocks" not in keys:
        raise UnsupportedConfigError("LoRA key", f"{name}.{unread[0] if unread else '(no oft_blocks)'}",
                                     supported="kohya's OFT (oft_unet_*): oft_blocks and alpha")
    if keys["oft_blocks"].dim() != 3:
        raise CheckpointError(f"LoRA: {name}.oft_blocks: kohya's OFT has blocks (n, b, b), found "
                              f"{tuple(keys['oft_blocks'].shape)}")
    if alpha is None:  # (sd-scripts writes it and cannot load a file without it)
        raise CheckpointError(f"LoRA: {name}: kohya's OFT without its alpha (the constraint)")
    return OFTLayer(keys["oft_blocks"], alpha, always_constrained=True)


def layer_names(module: torch.nn.Module) -> dict:
    """Every name a LoRA entry may give a layer of ``module``: dotted, and ("~" + name) kohya's underscores; for a
    UNet also kohya's names in the original ldm layout (``~input_blocks_4_1_...``, SDXL's files)."""
    table = {}
    for full, sub in module.named_modules():
        for alias in (full, "text_model." + full):  # (transformers 5's CLIP has no text_model. level; the keys do)
            table[alias] = sub
            table["~" + alias.replace(".", "_")] = sub
    table.update(_ldm_names(module))
    return table


def _ldm_names(module: torch.nn.Module) -> dict:
    """{"~" + ldm name with underscores: layer} for a UNet's layers (the single-file reader's renaming, reversed)."""
    from .models.unet import UNet

    if not isinstance(module, UNet) or not isinstance(module.config.layers_per_block, int):
        return {}  # (the ldm layout has one resnet count for every level)
    from .checkpoints.ldm import RESNET_PARTS, ldm_unet_blocks

    modules = dict(module.named_modules())
    per = module.config.layers_per_block
    output_attention = {lvl * (per + 1) + j for lvl in range(len(module.config.block_out_channels))
                        for j in range(per + 1) if f"up_blocks.{lvl}.attentions.{j}" in modules}
    to_ldm = {new: old for old, new in RESNET_PARTS.items()}
    table = {}
    for src, dst, kind in ldm_unet_blocks(module.config, output_attention):
        for name, sub in modules.items():
            if name != dst and not name.startswith(dst + "."):
                continue
            rest = name[len(dst) + 1:]
            if kind == "resnet":
                head, dot, tail = rest.partition(".")
                rest = to_ldm.get(head, head) + dot + tail
            table["~" + (f"{src}.{rest}" if rest else src).replace(".", "_")] = sub
    return table


def resolve(table: dict, name: str, part: str) -> torch.nn.Module:
    """The layer a LoRA entry names, from ``layer_names``' table."""
    found = table.get(name)
    if found is None or not hasattr(found, "weight"):
        shown = name[1:] if name.startswith("~") else name
        hint = (" (an ldm-layout name: read for UNets only)" if "~input_blocks_0_0" not in table and
                re.match(r"(input_blocks|output_blocks|middle_block)", shown) else "")
        raise CheckpointError(f"LoRA: {part} has no layer {shown!r}{hint}")
    return found


def targets(layers: dict, module: torch.nn.Module, part: str) -> list:
    """[(layer module, LoraLayer)] for ``layers`` (one part's entries), every name resolved and every shape checked
    before anything is merged: a file that does not fit changes nothing."""
    table = layer_names(module) if layers else {}
    out = []
    for name, layer in layers.items():
        target = resolve(table, name, part)
        try:
            layer.check(target.weight.shape)
            if hasattr(layer, "check_bias"):  # (LyCORIS's full: an update of the bias too)
                layer.check_bias(getattr(target, "bias", None))
        except CheckpointError as e:  # (which of a file's hundreds of layers)
            shown = name[1:] if name.startswith("~") else name
            raise CheckpointError(f"{part}'s layer {shown!r}: {e}") from None
        out.append((target, layer))
    return out


@torch.no_grad()
def merge(pairs: list, scale: float, saved: Optional[dict] = None) -> None:
    """Add each LoRA's ``scale``-d update to its layer's weight, in place (in float32, then the weight's dtype). The
    first merge into a weight keeps a CPU copy of it in ``saved`` (``restore`` puts it back; None: keep none)."""
    for target, layer in pairs:
        w = target.weight
        if saved is not None and id(w) not in saved:
            saved[id(w)] = (w, w.detach().to("cpu", copy=True))
        bias_delta = layer.bias_delta() if hasattr(layer, "bias_delta") else None
        if bias_delta is not None:  # (LyCORIS's full)
            b = target.bias
            if saved is not None and id(b) not in saved:
                saved[id(b)] = (b, b.detach().to("cpu", copy=True))
            b.add_((bias_delta * scale).to(b.device, b.dtype).reshape(b.shape))
        if layer.dora_scale is not None:  # LyCORIS's DoRA: the whole update, then the rescale
            from .lora_lycoris import dora_merged

            w.copy_(dora_merged(w.float(), layer.delta(w.shape).to(w.device), layer.dora_scale, scale).to(w.dtype))
            continue
        if hasattr(layer, "update_of"):  # ((IA)^3, OFT, GLoRA: an update that reads the weight)
            # of the weight before any LoRA merged into it (the copy kept): several files then add up in any order, as
            # LyCORIS's modules stacked on one layer and AUTOMATIC1111 compute them
            base = saved[id(w)][1].to(w.device) if saved is not None else w.detach()
            delta = layer.update_of(base, scale)
        else:
            delta = layer.delta(w.shape) * scale
        if layer.magnitude is None:
            w.add_(delta.to(w.device, w.dtype))
            continue
        # DoRA (PEFT's merge): each output row of W + delta rescaled to its magnitude, the norms taken of the
        # weight before any LoRA merged into it (PEFT's unmerged base weight) plus this update
        base = (saved[id(w)][1] if saved is not None else w.detach()).to(w.device, torch.float32)
        norms = (base + delta.to(w.device)).flatten(1).norm(dim=1)  # (out,)
        factor = layer.magnitude.to(w.device, torch.float32).reshape(-1) / norms
        w.copy_((factor.view(-1, *[1] * (w.dim() - 1)) * (w.float() + delta.to(w.device))).to(w.dtype))


@torch.no_grad()
def restore(saved: dict) -> None:
    """Put back the weights ``merge`` kept, in place (captured graphs keep reading the same storage)."""
    for w, original in saved.values():
        w.copy_(original)
    saved.clear()


def by_part(layers: dict) -> dict:
    """{(part, module): layer} -> {part: {module: layer}}."""
    out: dict = {}
    for (part, name), layer in layers.items():
        out.setdefault(part, {})[name] = layer
    return out


__all__ = ["LoraLayer", "read_lora", "layer_names", "resolve", "targets", "merge", "restore", "by_part", "WEIGHT_NAME"]
