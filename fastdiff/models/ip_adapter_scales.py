"""Per-block IP-Adapter scales (InstantStyle), as diffusers' ``set_ip_adapter_scale`` reads a dict.

InstantStyle (Wang et al. 2024) found that some transformer blocks carry an image's style and others its layout, and
injects the image prompt into those alone: ``{"up": {"block_0": [0.0, 1.0, 0.0]}}`` (style only) or
``{"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}}`` (style and layout, on SDXL).

The dict's grammar is diffusers' (``_maybe_expand_lora_scales_for_one_adapter`` with ``default_scale=0.0``):

- keys ``"down"``, ``"mid"``, ``"up"``; a part left out gets 0;
- ``"down"`` / ``"up"``: a number (every block of the part that has attention layers), or a dict
  ``{"block_<i>": value}`` whose blocks left out get 0; a block's value is a number (all its attention layers), a
  list of one, or a list of one number per attention layer of the block (``Transformer2DModel`` in diffusers);
- ``"mid"``: a number or a list of one.

An attention layer's scale applies to every transformer in it (SDXL's deep blocks hold 2 or 10).

Stricter than diffusers where it would ignore a value silently: a block that does not exist or has no attention
layers (SD1.5's ``up.block_0``, SDXL's ``down.block_0``) and an unknown part name are errors that list the blocks
there are. Where diffusers leaves a middle block's second attention layer (none of the released UNets has one) at
its previous scale, here ``"mid"`` scales them all.
"""

from __future__ import annotations

import numbers

from ..errors import BadArgumentError
from ..utils.checks import finite_number


def layer_scales(unet, scale, layers: list) -> list:
    """One float per cross-attention layer of ``layers`` ((name, module) pairs: ``ip_adapter.named_cross_attentions``'
    order and names) for ``scale``: a number (every layer) or an InstantStyle dict."""
    if not isinstance(scale, dict):
        return [finite_number("scale", scale)] * len(layers)
    per_attention = _expand(unet, scale)  # {"down_blocks.1.attentions.0": 0.0, ...}
    return [next(s for prefix, s in per_attention.items() if name.startswith(prefix + ".")) for name, _ in layers]


def check(unet, scale) -> None:
    """A BadArgumentError when ``scale`` does not fit the UNet (before an adapter is attached to it)."""
    from .ip_adapter import named_cross_attentions

    layer_scales(unet, scale, named_cross_attentions(unet))


def _expand(unet, scale: dict) -> dict:
    """{"<part>_blocks.<i>.attentions.<j>": float} for every attention layer of the UNet from an InstantStyle dict."""
    unknown = sorted(map(str, set(scale) - {"down", "mid", "up"}))
    if unknown:
        raise BadArgumentError(f"scale: per-block scales take the keys 'down', 'mid' and 'up' (InstantStyle's dicts, "
                               f"as diffusers' set_ip_adapter_scale), found {unknown}")
    out = {}
    for part in ("down", "up"):
        blocks = getattr(unet, f"{part}_blocks")
        with_attention = [i for i, block in enumerate(blocks) if block.attentions is not None]
        value = scale.get(part, 0.0)
        if not isinstance(value, dict):
            value = {f"block_{i}": value for i in with_attention}
        names = {f"block_{i}" for i in with_attention}
        wrong = sorted(map(str, set(value) - names))
        if wrong:
            raise BadArgumentError(f"scale[{part!r}]: {wrong} name no {part} block with attention layers in this "
                                   f"UNet; expected some of {sorted(names)}")
        for i in with_attention:
            count = len(blocks[i].attentions)
            values = _per_layer(f"scale[{part!r}]['block_{i}']", value.get(f"block_{i}", 0.0), count)
            out.update({f"{part}_blocks.{i}.attentions.{j}": s for j, s in enumerate(values)})
    mid_attentions = getattr(unet.mid_block, "attentions", None) if unet.mid_block is not None else None
    if mid_attentions is not None:
        mid = _per_layer("scale['mid']", scale.get("mid", 0.0), 1)[0]
        out.update({f"mid_block.attentions.{j}": mid for j in range(len(mid_attentions))})
    elif "mid" in scale:
        raise BadArgumentError("scale['mid']: this UNet's middle block has no attention layers")
    return out


def _per_layer(name: str, value, count: int) -> list:
    """A block's value (a number, a list of one, or a list of ``count``) as ``count`` floats."""
    if isinstance(value, (list, tuple)):
        if len(value) == 1:
            value = list(value) * count
        elif len(value) != count:
            raise BadArgumentError(f"{name}: expected a number or a list of {count} (one per attention layer of the "
                                   f"block), found a list of {len(value)}")
        if any(not isinstance(v, numbers.Real) for v in value):  # (diffusers' per-masked-image lists: not read)
            raise BadArgumentError(f"{name}: expected numbers, found {value!r}")
        return [finite_number(name, v) for v in value]
    return [finite_number(name, value)] * count
