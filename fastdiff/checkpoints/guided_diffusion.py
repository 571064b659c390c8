"""openai/guided-diffusion (ADM) UNet checkpoints -> native UNet.

ADM maps exactly onto the native UNet with diffusers' ResNet resampling (``resblock_updown``):
ResnetDownsampleBlock2D / AttnDownBlock2D(downsample_type="resnet") going down, the mirror going up,
scale-shift norms, GroupNorm32 everywhere (also in the mid attention), a class embedding table, and
[cos, sin] timestep features. The legacy attention stores q, k, v in one Conv1d whose output channels
are ordered (head, q|k|v, channel); they are split into to_q / to_k / to_v here. ADM scales q and k by
ch^-1/4 each, which is SDPA's 1/sqrt(ch).

What the weights do not say: ``num_head_channels`` / ``num_heads`` (default: 64 channels per head, as
ADM's released ImageNet models; pass ``num_heads=`` or ``head_channels=`` otherwise) and
``use_new_attention_order`` (the legacy order is assumed; ``fastdiff.load(..., attention_order="new")`` for
models trained with it, such as ADM's ImageNet 64x64: its qkv channels are ordered (q|k|v, head, channel)).
"""

from __future__ import annotations

import re
from typing import Optional

import torch

from ..errors import BadArgumentError, CheckpointError, FastdiffError, UnsupportedConfigError
from ..models.unet import UNetConfig
from .common import RequiredKeys

_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
           "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def is_guided_diffusion_state_dict(state: dict) -> bool:
    """openai UNetModel keys without spatial transformers (those are ldm / Stable Diffusion UNets); output blocks (a
    noisy-image classifier, whose spatial head also stores ``out.2.weight``, has none)."""
    return ("input_blocks.0.0.weight" in state and "time_embed.0.weight" in state and "out.2.weight" in state
            and any(k.startswith("output_blocks.") for k in state)
            and not any(".transformer_blocks." in k for k in state))


# ADM's create_model picks channel_mult by image_size: its level count tells the size a checkpoint was trained at
# (4 levels: 64, also improved-diffusion's 32; a default only: generate takes any height / width)
ADM_IMAGE_SIZES = {4: 64, 5: 128, 6: 256, 7: 512}


# OpenAI's released checkpoints trained with a head count (num_heads=4, num_head_channels=-1), which the weights
# cannot tell from 64 channels per head (both split their channels): the levels' channels, the input channels and
# the levels with attention identify each file (128_512_upsampler.pt has 64_256's widths, attention at 32 and 16 only,
# and 64 channels per head)
_RELEASED_NUM_HEADS = {
    ((256, 256, 512, 768, 1024), 3, (False, False, True, True, True)): (4, "128x128_diffusion.pt"),
    ((192, 192, 384, 384, 768, 768), 6, (False, False, False, True, True, True)): (4, "64_256_upsampler.pt"),
}


def conv_resampling(state: dict) -> bool:
    """Whether an ADM state dict resamples with convolutions (``resblock_updown=False``: script_util's default, and
    improved-diffusion's only way)."""
    return any(re.match(r"input_blocks\.\d+\.0\.op\.weight", k) for k in state)


def released_num_heads(state: dict) -> Optional[tuple]:
    """(num_heads, file name) when ``state`` has the layout of a released guided-diffusion checkpoint trained with a
    head count, else None."""
    if "input_blocks.0.0.weight" not in state:
        return None
    try:
        cfg = guided_diffusion_config(state, head_channels=1)  # (any split: only the levels' channels are read)
    except FastdiffError:  # (what the loader itself then reports)
        return None
    attention = tuple(t.startswith("Attn") for t in cfg.down_block_types)
    return _RELEASED_NUM_HEADS.get((tuple(cfg.block_out_channels), cfg.in_channels, attention))


def guided_diffusion_config(state: dict, num_heads: Optional[int] = None,
                            head_channels: Optional[int] = None) -> UNetConfig:
    sd = RequiredKeys(state, "a guided-diffusion UNet")
    n_in = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("input_blocks."))
    weightless = sorted(set(range(n_in)) - {int(k.split(".")[1]) for k in sd if k.startswith("input_blocks.")})
    if weightless:  # (an average-pooling Downsample: conv_resample=False)
        raise CheckpointError(f"guided-diffusion UNet: input block(s) {weightless} hold no weights: average-pool "
                              f"resampling (conv_resample=False) is not supported; strided convs and ResBlocks are")
    # a downsampling input block holds one ResBlock and nothing else, with no skip / resample weights of
    # its own: find them as the blocks whose ResBlock keeps the channel count and that close a level.
    # Output blocks = levels * (num_res_blocks + 1), and every level but the last ends in an upsampling
    # ResBlock stored beside the block's ResBlock (output_blocks.K.1 or .2 with in_layers): count them.
    out_blocks = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("output_blocks."))
    upsamplers = {int(k.split(".")[1]) for k in sd  # (an upsampling ResBlock, or with resblock_updown=False a conv)
                  if re.match(r"output_blocks\.\d+\.[12]\.(in_layers\.0|conv)\.weight", k)}
    levels = len(upsamplers) + 1
    if out_blocks % levels:
        raise CheckpointError(f"guided-diffusion UNet: {out_blocks} output blocks do not split into {levels} levels")
    res_per_level = out_blocks // levels - 1
    if n_in - 1 != levels * res_per_level + levels - 1 or res_per_level < 1:
        raise CheckpointError(f"guided-diffusion UNet: cannot infer levels from {n_in} input / {out_blocks} output "
                              f"blocks")
    return adm_config(sd, levels, res_per_level, num_heads, head_channels, "guided-diffusion UNet",
                      out_channels=sd["out.2.weight"].shape[0])


def adm_config(sd: RequiredKeys, levels: int, res_per_level: int, num_heads: Optional[int],
               head_channels: Optional[int], what: str, out_channels: int) -> UNetConfig:
    """The native UNet config of ADM's input blocks, middle block (and their mirror) once the level count and the
    ResBlocks per level are known: channels and attention per level, scale-shift norms, heads, embeddings."""
    channels, attn = [], []
    for lvl in range(levels):
        first = 1 + lvl * (res_per_level + 1)
        channels.append(sd[f"input_blocks.{first}.0.out_layers.3.weight"].shape[0])
        attn.append(f"input_blocks.{first}.1.qkv.weight" in sd)
    # resblock_updown=False (script_util's default): strided 3x3 convs down, nearest x2 + a 3x3 conv up, diffusers'
    # Downsample2D / Upsample2D; resblock_updown=True: the ResBlocks of diffusers' "resnet" resampling
    conv_down = [re.match(r"input_blocks\.\d+\.0\.op\.weight", k) is not None for k in sd]
    conv_up = [re.match(r"output_blocks\.\d+\.[12]\.conv\.weight", k) is not None for k in sd]
    conv = any(conv_down) or any(conv_up)
    if conv and sum(conv_down) != levels - 1:
        raise CheckpointError(f"{what}: {sum(conv_down)} strided-conv downsamplers (input_blocks.K.0.op) for "
                              f"{levels} levels; expected {levels - 1} (conv_resample=False, average pooling, is not "
                              f"supported)")
    if "middle_block.1.qkv.weight" not in sd:
        raise CheckpointError(f"{what} without a middle attention block: not supported")
    scale_shift = sd["input_blocks.1.0.emb_layers.1.weight"].shape[0] == 2 * channels[0]
    if num_heads is not None and head_channels is None:  # ADM num_head_channels=-1: a fixed head count
        heads_dim = [c // num_heads for c in channels]
    else:
        heads_dim = head_channels or 64
    by_count = num_heads is not None and head_channels is None
    for c, a in zip(channels, attn):
        # the weights cannot tell the head split: a setting that does not divide a level's channels is refused
        if a and (c % num_heads if by_count else c % heads_dim):
            setting = f"num_heads={num_heads}" if by_count else \
                f"head_channels={heads_dim}" + (" (the default)" if head_channels is None else "")
            raise UnsupportedConfigError(
                "heads", setting, model=what,
                supported=f"heads that divide every attention level's channels {sorted(set(channels))}: pass "
                          f"head_channels= (ADM num_head_channels) or num_heads= (ADM num_heads) as trained")
    width = sd["input_blocks.0.0.weight"].shape[0]  # ADM's input conv: int(channel_mult[0] * model_channels)
    if width != channels[0]:
        raise CheckpointError(f"{what}: the input conv makes {width} channels and the first level "
                              f"takes {channels[0]}; ADM builds them equal")
    # the timestep sinusoid is model_channels wide: the first level's width unless channel_mult[0] != 1 (OpenAI's
    # 512 px model: 0.5)
    model_channels = sd["time_embed.0.weight"].shape[1]
    classes = sd["label_emb.weight"].shape[0] if "label_emb.weight" in sd else None
    size = ADM_IMAGE_SIZES.get(levels, 64)
    if levels == 4 and [c // channels[0] for c in channels] == [1, 2, 2, 2] and channels[0] * 2 == channels[1]:
        size = 32  # (improved-diffusion's create_model pairs channel_mult (1, 2, 2, 2) with 32 px: its CIFAR-10 models)
    cfg = UNetConfig.from_diffusers(dict(
        sample_size=size, in_channels=sd["input_blocks.0.0.weight"].shape[1],
        out_channels=out_channels,
        block_out_channels=channels, layers_per_block=res_per_level,
        down_block_types=["AttnDownBlock2D" if a else "DownBlock2D" if conv else "ResnetDownsampleBlock2D"
                          for a in attn],
        up_block_types=["AttnUpBlock2D" if a else "UpBlock2D" if conv else "ResnetUpsampleBlock2D"
                        for a in reversed(attn)],
        downsample_type="conv" if conv else "resnet", upsample_type="conv" if conv else "resnet",
        norm_num_groups=32, attn_norm_num_groups=32,
        attention_head_dim=heads_dim, resnet_time_scale_shift="scale_shift" if scale_shift else "default",
        num_class_embeds=classes, time_embedding_dim=sd["time_embed.0.weight"].shape[0],
        flip_sin_to_cos=True, freq_shift=0,
    ), "UNet2DModel")
    if model_channels != channels[0]:
        cfg.time_proj_dim = model_channels
        cfg.validate()
    return cfg


ATTENTION_ORDERS = ("legacy", "new")


class ADMKeys:
    """ADM keys -> native keys, a block at a time (the UNet's and the classifier's converters share it); ``finish``
    refuses what no block read. attention_order: "legacy" (QKVAttentionLegacy: qkv output channels ordered (head,
    q|k|v, channel)) or "new" (QKVAttention, ``use_new_attention_order``: (q|k|v, head, channel))."""

    def __init__(self, state: dict, what: str, attention_order: str = "legacy", prefix: str = ""):
        if attention_order not in ATTENTION_ORDERS:
            raise BadArgumentError(f"attention_order: expected one of {ATTENTION_ORDERS}, found {attention_order!r}")
        self.sd = RequiredKeys(state, what)
        self.what, self.order, self.prefix = what, attention_order, prefix
        self.out: dict[str, torch.Tensor] = {}
        self.used: set[str] = set()

    def put(self, new: str, old: str, value=None) -> None:
        self.out[self.prefix + new] = self.sd[old] if value is None else value
        self.used.add(old)

    def resnet(self, src: str, dst: str) -> None:
        for k in [k for k in self.sd if k.startswith(src + ".")]:
            rest = k[len(src) + 1:]
            for old, new in _RESNET.items():
                if rest.startswith(old + "."):
                    rest = new + rest[len(old):]
                    break
            self.put(f"{dst}.{rest}", k)

    def resample(self, src: str, dst: str) -> None:
        """A resampling layer: a ResBlock (resblock_updown) or a conv (``op`` going down, ``conv`` going up)."""
        for name in ("op", "conv"):
            if f"{src}.{name}.weight" in self.sd:
                self.put(f"{dst}.conv.weight", f"{src}.{name}.weight")
                self.put(f"{dst}.conv.bias", f"{src}.{name}.bias")
                return
        self.resnet(src, dst)

    def attention(self, src: str, dst: str, head_dim: int) -> None:
        sd = self.sd
        w, b = sd[f"{src}.qkv.weight"][..., 0], sd[f"{src}.qkv.bias"]  # (3C, C), (3C,)
        c = w.shape[1]
        heads = c // head_dim
        if not heads or c % head_dim or w.shape[0] != 3 * c:  # the levels inferred from the keys do not fit
            shape = tuple(sd[f"{src}.qkv.weight"].shape)
            raise CheckpointError(f"{self.what}: {src}.qkv.weight of shape {shape} does not split into q, k, v of "
                                  f"heads of {head_dim} channels (expected (3C, C, 1) with C a multiple of "
                                  f"{head_dim}): a block is missing, head_channels= / num_heads= are not the "
                                  f"trained ones, or the file is not an ADM network")
        if self.order == "new":  # (3, heads, head_dim): bring to the legacy (heads, 3, head_dim) layout
            w = w.reshape(3, heads, head_dim, c).transpose(0, 1)
            b = b.reshape(3, heads, head_dim).transpose(0, 1)
        w = w.reshape(heads, 3, head_dim, c)
        b = b.reshape(heads, 3, head_dim)
        for i, name in enumerate(("to_q", "to_k", "to_v")):
            self.put(f"{dst}.{name}.weight", f"{src}.qkv.weight", w[:, i].reshape(heads * head_dim, c).contiguous())
            self.put(f"{dst}.{name}.bias", f"{src}.qkv.bias", b[:, i].reshape(heads * head_dim).contiguous())
        self.put(f"{dst}.to_out.0.weight", f"{src}.proj_out.weight", sd[f"{src}.proj_out.weight"][..., 0].contiguous())
        self.put(f"{dst}.to_out.0.bias", f"{src}.proj_out.bias")
        self.put(f"{dst}.group_norm.weight", f"{src}.norm.weight")
        self.put(f"{dst}.group_norm.bias", f"{src}.norm.bias")

    def encoder(self, config: UNetConfig) -> None:
        """The input convolution, the time (and class) embedding, the input blocks and the middle block: ADM's
        ``UNetModel`` down to its middle, and its ``EncoderUNetModel`` (the noisy-image classifier) but the head."""
        sd, n, per = self.sd, len(config.block_out_channels), config.layers_per_block
        head_dims = config.per_block(config.attention_head_dim, "attention_head_dim")
        self.put("conv_in.weight", "input_blocks.0.0.weight")
        self.put("conv_in.bias", "input_blocks.0.0.bias")
        for i, name in ((0, "linear_1"), (2, "linear_2")):
            self.put(f"time_embedding.{name}.weight", f"time_embed.{i}.weight")
            self.put(f"time_embedding.{name}.bias", f"time_embed.{i}.bias")
        if "label_emb.weight" in sd:
            self.put("class_embedding.weight", "label_emb.weight")
        for lvl in range(n):
            for j in range(per):
                k = 1 + lvl * (per + 1) + j
                self.resnet(f"input_blocks.{k}.0", f"down_blocks.{lvl}.resnets.{j}")
                if f"input_blocks.{k}.1.qkv.weight" in sd:
                    self.attention(f"input_blocks.{k}.1", f"down_blocks.{lvl}.attentions.{j}", head_dims[lvl])
            if lvl < n - 1:
                self.resample(f"input_blocks.{1 + lvl * (per + 1) + per}.0", f"down_blocks.{lvl}.downsamplers.0")
        self.resnet("middle_block.0", "mid_block.resnets.0")
        self.attention("middle_block.1", "mid_block.attentions.0", head_dims[-1])
        self.resnet("middle_block.2", "mid_block.resnets.1")

    def finish(self) -> dict[str, torch.Tensor]:
        leftover = sorted(set(self.sd) - self.used)
        if leftover:
            raise CheckpointError(f"{self.what}: {len(leftover)} tensor(s) with no native counterpart: {leftover[:5]}")
        return self.out


def convert_guided_diffusion(state: dict, config: UNetConfig, attention_order: str = "legacy") -> dict[str, torch.Tensor]:
    """ADM keys -> native keys (attention_order: ``ADMKeys``')."""
    keys = ADMKeys(state, "guided-diffusion UNet", attention_order)
    sd, n, per = keys.sd, len(config.block_out_channels), config.layers_per_block
    head_dims = config.per_block(config.attention_head_dim, "attention_head_dim")
    keys.encoder(config)
    for lvl in range(n):
        for j in range(per + 1):
            k = lvl * (per + 1) + j
            keys.resnet(f"output_blocks.{k}.0", f"up_blocks.{lvl}.resnets.{j}")
            has_attn = f"output_blocks.{k}.1.qkv.weight" in sd
            if has_attn:
                keys.attention(f"output_blocks.{k}.1", f"up_blocks.{lvl}.attentions.{j}", head_dims[n - 1 - lvl])
            if j == per and lvl < n - 1:
                keys.resample(f"output_blocks.{k}.{2 if has_attn else 1}", f"up_blocks.{lvl}.upsamplers.0")
    for i, name in ((0, "conv_norm_out"), (2, "conv_out")):
        keys.put(f"{name}.weight", f"out.{i}.weight")
        keys.put(f"{name}.bias", f"out.{i}.bias")
    return keys.finish()
