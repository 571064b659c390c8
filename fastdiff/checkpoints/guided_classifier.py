"""openai/guided-diffusion noisy-image classifiers (``EncoderUNetModel``: ``64x64_classifier.pt`` ... ``512x512_
classifier.pt``) -> ``fastdiff.models.adm_classifier.ADMClassifier``.

The input blocks are the UNet's (``guided_diffusion.ADMKeys``). What the keys do not say directly is the ResBlock
count per level: ADM's downsampling ResBlock (``resblock_updown``) has the keys of any other. The input blocks are
levels x (ResBlocks + 1) long; a split is kept when every level's downsampling block keeps its channels and holds
no attention, every later ResBlock of a level keeps its channels, and a level's blocks all have attention or none.
A strided conv (``op``, conv resampling) marks a downsampling block, and no other. The released classifiers (depth
4 at 64 px, 2 otherwise) split one way only; a file that splits several ways is refused, naming
``layers_per_block=``. The head count: 64 channels per head (``create_classifier``'s ``num_head_channels=64``).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..errors import CheckpointError
from ..models.adm_classifier import ADMClassifier, ClassifierConfig
from .common import RequiredKeys
from .guided_diffusion import ADMKeys, adm_config

WHAT = "guided-diffusion classifier"


def is_guided_classifier_state_dict(state: dict) -> bool:
    """ADM's EncoderUNetModel: a UNet's input and middle blocks with no output blocks, and a head at ``out.``."""
    return ("input_blocks.0.0.weight" in state and "time_embed.0.weight" in state and "out.0.weight" in state
            and "middle_block.0.in_layers.0.weight" in state and not any(k.startswith("output_blocks.") for k in state))


def _pool(sd) -> str:
    if "out.2.qkv_proj.weight" in sd:
        return "attention"
    if "out.3.weight" in sd and sd["out.0.weight"].dim() == 1 and "out.1.weight" not in sd:
        return "adaptive"
    if "out.0.weight" in sd and sd["out.0.weight"].dim() == 2:
        return "spatial_v2" if "out.1.weight" in sd else "spatial"
    raise CheckpointError(f"{WHAT}: a head at 'out.' of keys {sorted(k for k in sd if k.startswith('out.'))[:6]}: "
                          f"expected ADM's attention, adaptive or spatial pooling")


def _splits(sd, blocks: int) -> list:
    """The (levels, ResBlocks per level) of ``blocks`` input blocks (the input convolution included) that fit."""
    fits = []
    for per in range(1, blocks):
        if blocks % (per + 1):
            continue
        levels = blocks // (per + 1)
        ok = True
        for lvl in range(levels):
            first = 1 + lvl * (per + 1)
            has_attn = f"input_blocks.{first}.1.qkv.weight" in sd
            ok &= f"input_blocks.{first}.0.op.weight" not in sd  # (a strided conv: a downsampling block)
            for j in range(1, per):
                k = first + j
                ok &= f"input_blocks.{k}.0.skip_connection.weight" not in sd
                ok &= f"input_blocks.{k}.0.op.weight" not in sd
                ok &= (f"input_blocks.{k}.1.qkv.weight" in sd) == has_attn
            if lvl < levels - 1:  # the downsampling block: one ResBlock, channels kept
                down = first + per
                ok &= f"input_blocks.{down}.0.skip_connection.weight" not in sd
                ok &= not any(k.startswith(f"input_blocks.{down}.1.") for k in sd)
        if ok:
            fits.append((levels, per))
    return fits


def classifier_config(state: dict, head_channels: Optional[int] = None, num_heads: Optional[int] = None,
                      layers_per_block: Optional[int] = None) -> ClassifierConfig:
    sd = RequiredKeys(state, WHAT)
    blocks = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("input_blocks."))
    fits = _splits(sd, blocks)
    if layers_per_block is not None:
        fits = [f for f in fits if f[1] == layers_per_block]
    if len(fits) != 1:
        found = ", ".join(f"{lv} levels of {per}" for lv, per in fits) or "no split"
        raise CheckpointError(f"{WHAT}: {blocks} input blocks split into levels of ResBlocks as {found}; expected "
                              f"one split" + ("" if fits else " (is the file complete?)") +
                              ": pass layers_per_block= (ADM's classifier_depth)" * (len(fits) > 1))
    levels, per = fits[0]
    pool = _pool(sd)
    out = {"attention": "out.2.c_proj.weight", "adaptive": "out.3.weight", "spatial": "out.2.weight",
           "spatial_v2": "out.3.weight"}[pool]
    classes = sd[out].shape[0]
    encoder = adm_config(sd, levels, per, num_heads, head_channels, WHAT, out_channels=sd["input_blocks.0.0.weight"]
                         .shape[1])
    size, tokens = encoder.sample_size, 0
    if pool == "attention":  # (C, HW + 1) at the trained size: the size itself
        tokens = sd["out.2.positional_embedding"].shape[1] - 1
        side = round(tokens ** 0.5)
        if side * side != tokens:
            raise CheckpointError(f"{WHAT}: out.2.positional_embedding covers {tokens} + 1 tokens; expected a square "
                                  f"feature map's pixels + 1")
        size = side * 2 ** (levels - 1)
        encoder.sample_size = size
    ch = encoder.block_out_channels[-1]
    heads_of = head_channels or (ch // num_heads if num_heads else 64)
    if pool == "attention" and ch % heads_of:
        raise CheckpointError(f"{WHAT}: its attention pooling's {ch} channels do not split into heads of {heads_of}; "
                              f"pass head_channels= (ADM num_head_channels)")
    return ClassifierConfig(encoder, classes, pool, size, heads_of, tokens)


def convert_guided_classifier(state: dict, config: ClassifierConfig,
                              attention_order: str = "legacy") -> dict[str, torch.Tensor]:
    """ADM classifier keys -> ``ADMClassifier`` keys (attention_order: the input blocks', as ``ADMKeys``; the head's
    pooling is always QKVAttention's order, which ``AttentionPool`` reads)."""
    keys = ADMKeys(state, WHAT, attention_order, prefix="encoder.")
    keys.encoder(config.encoder)
    keys.prefix = ""
    squeeze = lambda k: keys.sd[k].reshape(keys.sd[k].shape[0], -1)  # noqa: E731  (conv 1x1 -> linear)
    if config.pool in ("attention", "adaptive"):
        keys.put("norm_out.weight", "out.0.weight")
        keys.put("norm_out.bias", "out.0.bias")
    if config.pool == "attention":
        keys.put("attention_pool.positional_embedding", "out.2.positional_embedding")
        for name in ("qkv_proj", "c_proj"):
            keys.put(f"attention_pool.{name}.weight", f"out.2.{name}.weight", squeeze(f"out.2.{name}.weight"))
            keys.put(f"attention_pool.{name}.bias", f"out.2.{name}.bias")
    elif config.pool == "adaptive":
        keys.put("proj_out.weight", "out.3.weight", squeeze("out.3.weight"))
        keys.put("proj_out.bias", "out.3.bias")
    else:
        last = "out.3" if config.pool == "spatial_v2" else "out.2"
        for new, old in (("head_in", "out.0"), ("head_out", last)):
            keys.put(f"{new}.weight", f"{old}.weight")
            keys.put(f"{new}.bias", f"{old}.bias")
        if config.pool == "spatial_v2":
            keys.put("head_norm.weight", "out.1.weight")
            keys.put("head_norm.bias", "out.1.bias")
    return keys.finish()


def build_classifier(state: dict, *, head_channels: Optional[int] = None, num_heads: Optional[int] = None,
                     layers_per_block: Optional[int] = None, attention_order: str = "legacy") -> ADMClassifier:
    """An ``ADMClassifier`` with a classifier checkpoint's weights (float32 unless the file's own dtype)."""
    from .common import strict_load

    config = classifier_config(state, head_channels, num_heads, layers_per_block)
    converted = convert_guided_classifier(state, config, attention_order)
    with torch.device("meta"):
        model = ADMClassifier(config)
    return strict_load(model, converted, WHAT).eval()
