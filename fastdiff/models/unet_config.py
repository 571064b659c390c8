"""The native UNet's config: every diffusers UNet2DModel / UNet2DConditionModel field it implements, read from a
diffusers config.json (its constructor defaults for absent fields), checked (a field the UNet does not implement is
refused instead of silently building a different network), and the presets (SD1.5, SD2.1, SDXL, DDPM CIFAR-10).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

from ..errors import UnsupportedConfigError
from ..utils.strict_dict import check_field_types, known_fields

DOWN_TYPES = ("DownBlock2D", "AttnDownBlock2D", "CrossAttnDownBlock2D", "ResnetDownsampleBlock2D")
UP_TYPES = ("UpBlock2D", "AttnUpBlock2D", "CrossAttnUpBlock2D", "ResnetUpsampleBlock2D")
RESAMPLE_TYPES = ("conv", "resnet")
MID_TYPES = ("UNetMidBlock2D", "UNetMidBlock2DCrossAttn", None)
DIFFUSERS_CLASSES = ("UNet2DModel", "UNet2DConditionModel")

IntOrList = Union[int, Sequence[int]]


@dataclass
class UNetConfig:
    """Every diffusers UNet2DModel / UNet2DConditionModel field the native UNet implements.

    ``conditional`` selects the UNet2DConditionModel semantics (text cross-attention, its mid block,
    its Fourier embedding); field names and meanings are diffusers'.
    """

    conditional: bool = False
    sample_size: Optional[Union[int, Sequence[int]]] = None
    in_channels: int = 3
    out_channels: int = 3
    center_input_sample: bool = False
    time_embedding_type: str = "positional"
    time_embedding_dim: Optional[int] = None
    time_embedding_act_fn: Optional[str] = None
    freq_shift: float = 0
    flip_sin_to_cos: bool = True
    down_block_types: Sequence[str] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    mid_block_type: Optional[str] = "UNetMidBlock2D"
    up_block_types: Sequence[str] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    block_out_channels: Sequence[int] = (224, 448, 672, 896)
    layers_per_block: IntOrList = 2
    mid_block_scale_factor: float = 1.0
    downsample_padding: int = 1
    act_fn: str = "silu"
    attention_head_dim: Optional[IntOrList] = 8
    num_attention_heads: Optional[IntOrList] = None
    norm_num_groups: int = 32
    attn_norm_num_groups: Optional[int] = None
    norm_eps: float = 1e-5
    resnet_time_scale_shift: str = "default"
    add_attention: bool = True
    class_embed_type: Optional[str] = None
    num_class_embeds: Optional[int] = None
    projection_class_embeddings_input_dim: Optional[int] = None
    class_embeddings_concat: bool = False
    num_train_timesteps: Optional[int] = None
    # SDXL's micro-conditioning ("text_time"): the pooled text embedding and the size / crop numbers
    # (time_ids) join the timestep embedding; projection_class_embeddings_input_dim is their joint width
    addition_embed_type: Optional[str] = None
    addition_time_embed_dim: Optional[int] = None
    # UNet2DConditionModel only
    cross_attention_dim: Optional[IntOrList] = None
    transformer_layers_per_block: Union[int, Sequence] = 1
    reverse_transformer_layers_per_block: Optional[Sequence] = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    # the down / up blocks' transformers' first attention also attends to the text states (one bool or one per block):
    # SD's x4 upscaler. (mid_block_only_cross_attention: only UNetMidBlock2DSimpleCrossAttn, which fastdiff refuses,
    # reads it)
    only_cross_attention: Union[bool, Sequence[bool]] = False
    mid_block_only_cross_attention: Optional[bool] = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    downsample_type: str = "conv"  # "resnet": a ResnetBlock that average-pools (ADM resblock_updown)
    upsample_type: str = "conv"  # "resnet": a ResnetBlock that upsamples (nearest)
    # fastdiff's field: the sinusoid's width where it is not the first level's (guided-diffusion's timestep_embedding
    # is model_channels wide; OpenAI's 512 px model starts at half that width). None: block_out_channels[0]
    time_proj_dim: Optional[int] = None
    extra: dict = field(default_factory=dict)  # diffusers fields kept for round trips, no effect

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        cfg = cls(**known_fields(cls, d, model="UNet", skip_private=False))
        cfg.validate()
        return cfg

    @classmethod
    def from_diffusers(cls, d: dict, class_name: Optional[str] = None) -> "UNetConfig":
        """Map a diffusers config.json dict; a value the native UNet does not implement raises."""
        class_name = class_name or d.get("_class_name", "UNet2DModel")
        if class_name not in DIFFUSERS_CLASSES:
            raise UnsupportedConfigError("_class_name", class_name, supported=list(DIFFUSERS_CLASSES), model="UNet")
        conditional = class_name == "UNet2DConditionModel"
        defaults = _DIFFUSERS_DEFAULTS[class_name]
        values = dict(defaults)
        extra = {}
        for key, value in d.items():
            if key.startswith("_"):
                continue
            if key in _MUST_BE:
                allowed = _MUST_BE[key]
                # (diffusers takes only_cross_attention per block too: a list of allowed values is the same network)
                per_block = isinstance(value, (list, tuple)) and value and all(v in allowed for v in value)
                if value not in allowed and not per_block:
                    raise UnsupportedConfigError(key, value, supported=list(allowed), model=class_name)
                extra[key] = value
            elif key in _NO_EFFECT:
                extra[key] = value
            elif key in defaults:
                values[key] = value
            else:
                raise UnsupportedConfigError(key, value, supported="(not implemented by fastdiff's UNet)",
                                             model=class_name)
        resnet_blocks = {"ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D"} & set(
            list(values["down_block_types"]) + list(values["up_block_types"]))
        for key, default in (("resnet_skip_time_act", False), ("resnet_out_scale_factor", 1.0)):
            if resnet_blocks and extra.get(key, default) != default:
                raise UnsupportedConfigError(key, extra[key], supported=[default], model=f"{class_name} with "
                                             f"{sorted(resnet_blocks)}")
        if conditional and values.get("num_attention_heads") is None:
            # diffusers' historic naming: in UNet2DConditionModel `attention_head_dim` holds head COUNTS.
            values["num_attention_heads"] = values["attention_head_dim"]
        cfg = cls(conditional=conditional, extra=extra, **values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        check_field_types(self, "UNet")

        def positive(name, values):
            if any(v < 1 for v in (values if isinstance(values, (list, tuple)) else [values])):
                raise UnsupportedConfigError(name, getattr(self, name), supported="positive ints", model="UNet")

        for name in ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "norm_num_groups",
                     "conv_in_kernel", "conv_out_kernel"):
            positive(name, getattr(self, name))
        if self.num_class_embeds is not None:
            positive("num_class_embeds", self.num_class_embeds)
        if self.time_proj_dim is not None:
            positive("time_proj_dim", self.time_proj_dim)
            if self.time_embedding_type != "positional" or self.time_proj_dim % 2:
                raise UnsupportedConfigError("time_proj_dim", self.time_proj_dim, model="UNet",
                                             supported="an even width, with time_embedding_type='positional'")
        for name in ("transformer_layers_per_block", "reverse_transformer_layers_per_block"):
            value = getattr(self, name)
            flat = [] if value is None else [value] if not isinstance(value, (list, tuple)) else [
                w for v in value for w in (v if isinstance(v, (list, tuple)) else [v])]
            if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in flat):  # (0: SDXL's first level,
                raise UnsupportedConfigError(name, value, supported="ints >= 0 (one, one per block, or one list "  # the
                                             "per block)", model="UNet")  # small / mid SDXL ControlNets' blocks)
        if not self.block_out_channels:
            raise UnsupportedConfigError("block_out_channels", self.block_out_channels, supported="one or more ints")
        if self.norm_eps <= 0:
            raise UnsupportedConfigError("norm_eps", self.norm_eps, supported="a positive number")
        n = len(self.block_out_channels)
        for name, allowed in (("down_block_types", DOWN_TYPES), ("up_block_types", UP_TYPES)):
            seq = getattr(self, name)
            if len(seq) != n:
                raise UnsupportedConfigError(name, list(seq), supported=f"{n} entries (one per block_out_channels)")
            for t in seq:
                if t not in allowed:
                    raise UnsupportedConfigError(name, t, supported=list(allowed), model="UNet")
        if not self.conditional:
            for t in list(self.down_block_types) + list(self.up_block_types):
                if "CrossAttn" in t:
                    raise UnsupportedConfigError("down_block_types / up_block_types", t, model="UNet2DModel",
                                                 supported="DownBlock2D, AttnDownBlock2D, UpBlock2D, AttnUpBlock2D")
        elif self.mid_block_type not in MID_TYPES:
            raise UnsupportedConfigError("mid_block_type", self.mid_block_type, supported=list(MID_TYPES))
        if self.act_fn not in ("silu", "swish"):
            raise UnsupportedConfigError("act_fn", self.act_fn, supported=["silu", "swish"])
        if self.time_embedding_act_fn not in (None, "silu", "swish"):
            raise UnsupportedConfigError("time_embedding_act_fn", self.time_embedding_act_fn,
                                         supported=[None, "silu", "swish"])
        if self.resnet_time_scale_shift not in ("default", "scale_shift"):
            raise UnsupportedConfigError("resnet_time_scale_shift", self.resnet_time_scale_shift,
                                         supported=["default", "scale_shift"])
        allowed_t = ("positional", "fourier") + (() if self.conditional else ("learned",))
        if self.time_embedding_type not in allowed_t:
            raise UnsupportedConfigError("time_embedding_type", self.time_embedding_type, supported=list(allowed_t))
        allowed_c = (None, "timestep", "identity") + (("projection", "simple_projection") if self.conditional else ())
        if self.class_embed_type not in allowed_c:
            raise UnsupportedConfigError("class_embed_type", self.class_embed_type, supported=list(allowed_c))
        if self.class_embeddings_concat and self.class_embed_type is None and self.num_class_embeds is None:
            raise UnsupportedConfigError("class_embeddings_concat", True, model="UNet",
                                         supported="False without a class embedding (num_class_embeds / "
                                                   "class_embed_type): there is none to concatenate, and the resnets' "
                                                   "time projections would read twice the time embedding's width")
        if self.class_embeddings_concat and self.addition_embed_type is not None:
            raise UnsupportedConfigError("class_embeddings_concat", True, model="UNet",
                                         supported=f"False with addition_embed_type {self.addition_embed_type!r} "
                                                   f"(its embedding would be added to the twice-as-wide "
                                                   f"concatenation; diffusers cannot run it either)")
        if self.norm_num_groups is None:
            raise UnsupportedConfigError("norm_num_groups", None, supported="an integer group count")
        uses_cross = any("CrossAttn" in t for t in tuple(self.down_block_types) + tuple(self.up_block_types)) or (
            self.conditional and self.mid_block_type == "UNetMidBlock2DCrossAttn")
        if uses_cross and self.conditional and self.num_attention_heads is None:  # the transformers' head counts
            raise UnsupportedConfigError("attention_head_dim", None, supported="a head count (an int or one per block) "
                                         "in attention_head_dim or num_attention_heads", model="UNet2DConditionModel")
        for name in ("attention_head_dim", "num_attention_heads", "cross_attention_dim"):
            if getattr(self, name) is not None:
                positive(name, getattr(self, name))
        if uses_cross and self.cross_attention_dim is None:
            raise UnsupportedConfigError("cross_attention_dim", None, supported="an int (or one per block) for "
                                         "CrossAttn blocks")
        for name in ("downsample_type", "upsample_type"):
            if getattr(self, name) not in RESAMPLE_TYPES:
                raise UnsupportedConfigError(name, getattr(self, name), supported=list(RESAMPLE_TYPES))
        if self.downsample_padding not in (0, 1):
            raise UnsupportedConfigError("downsample_padding", self.downsample_padding, supported=[0, 1])
        self._validate_addition_embed()

    def _validate_addition_embed(self) -> None:
        allowed = (None, "text_time") if self.conditional else (None,)
        if self.addition_embed_type not in allowed:
            raise UnsupportedConfigError("addition_embed_type", self.addition_embed_type, supported=list(allowed),
                                         model="UNet2DConditionModel" if self.conditional else "UNet2DModel")
        if self.addition_embed_type is None:
            return
        width = self.projection_class_embeddings_input_dim
        if not self.addition_time_embed_dim or not width or width <= 6 * self.addition_time_embed_dim and \
                width != SDXL_POOLED_WIDTH + 5 * self.addition_time_embed_dim:
            raise UnsupportedConfigError(
                "addition_time_embed_dim / projection_class_embeddings_input_dim",
                (self.addition_time_embed_dim, width), model="UNet2DConditionModel",
                supported="positive ints with projection_class_embeddings_input_dim = pooled text width + "
                          "addition_time_embed_dim * number of time ids (SDXL: 256 and 1280 + 6 * 256 = 2816)")
        if self.class_embed_type in ("projection", "simple_projection"):
            raise UnsupportedConfigError("class_embed_type", self.class_embed_type, model="UNet2DConditionModel",
                                         supported="None with addition_embed_type='text_time' (both would read "
                                                   "projection_class_embeddings_input_dim)")

    @property
    def text_time_dims(self) -> Optional[tuple[int, int]]:
        """(pooled text width, number of time ids) of an SDXL-style UNet; None without text_time conditioning.

        The config fixes only their joint width, pooled + ids * addition_time_embed_dim. SDXL base takes 6 ids
        (original size, crop corner, target size); the refiner 5 (original size, crop corner, aesthetic score).
        A width that leaves SDXL's pooled width (1280) after 5 ids is read as a refiner, any other as 6 ids.
        """
        if self.addition_embed_type != "text_time":
            return None
        width, step = self.projection_class_embeddings_input_dim, self.addition_time_embed_dim
        ids = 5 if width - 5 * step == SDXL_POOLED_WIDTH else 6
        return width - ids * step, ids

    # -- per-block views --------------------------------------------------------------------------
    def per_block(self, value, name: str) -> list:
        n = len(self.block_out_channels)
        if value is None or isinstance(value, (int, float)):
            return [value] * n
        value = list(value)
        if len(value) != n:
            raise UnsupportedConfigError(name, value, supported=f"an int or {n} values (one per block)")
        return value

    @property
    def time_embed_dim(self) -> int:
        if self.time_embedding_dim:
            return self.time_embedding_dim
        return self.block_out_channels[0] * (2 if self.conditional and self.time_embedding_type == "fourier" else 4)

    @property
    def num_upsamplers(self) -> int:
        return len(self.block_out_channels) - 1


SDXL_POOLED_WIDTH = 1280  # OpenCLIP ViT-bigG's pooled text embedding, what SDXL base and refiner condition on

# diffusers' constructor defaults per class (what an absent config.json field means).
_COMMON_DEFAULTS = dict(
    sample_size=None, center_input_sample=False, time_embedding_type="positional", time_embedding_dim=None,
    freq_shift=0, flip_sin_to_cos=True, mid_block_scale_factor=1, downsample_padding=1, act_fn="silu",
    norm_num_groups=32, norm_eps=1e-5, resnet_time_scale_shift="default", class_embed_type=None,
    num_class_embeds=None,
)
_DIFFUSERS_DEFAULTS = {
    "UNet2DModel": dict(
        _COMMON_DEFAULTS, in_channels=3, out_channels=3,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        mid_block_type="UNetMidBlock2D",
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(224, 448, 672, 896), layers_per_block=2, attention_head_dim=8,
        attn_norm_num_groups=None, add_attention=True, num_train_timesteps=None, downsample_type="conv",
        upsample_type="conv",
    ),
    "UNet2DConditionModel": dict(
        _COMMON_DEFAULTS, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=1280,
        transformer_layers_per_block=1, reverse_transformer_layers_per_block=None, attention_head_dim=8,
        num_attention_heads=None, use_linear_projection=False, upcast_attention=False, only_cross_attention=False,
        mid_block_only_cross_attention=None,
        time_embedding_act_fn=None, projection_class_embeddings_input_dim=None, class_embeddings_concat=False,
        conv_in_kernel=3, conv_out_kernel=3, addition_embed_type=None, addition_time_embed_dim=None,
    ),
}
# Fields fastdiff only supports at one value (anything else would be a different network).
_MUST_BE = {
    "dual_cross_attention": (False,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "attention_type": ("default",),
}
# Fields diffusers accepts that change nothing for the block types above (or only training).
_NO_EFFECT = {"dropout", "resnet_skip_time_act", "resnet_out_scale_factor", "cross_attention_norm",
              "addition_embed_type_num_heads"}


def block_attention(block_type: str) -> Optional[str]:
    """The attention a diffusers block type holds: "cross" (a transformer with cross-attention), "self" (spatial
    self-attention) or None."""
    if block_type.startswith("CrossAttn"):
        return "cross"
    if block_type.startswith("Attn"):
        return "self"
    return None


def transformer_depths(value, layers: list[int], n: int) -> list[list[int]]:
    """transformer_layers_per_block: int, one int per block, or one list per block -> per layer depths."""
    if isinstance(value, int):
        return [[value] * layers[i] for i in range(n)]
    value = list(value)
    if len(value) != n:
        raise UnsupportedConfigError("transformer_layers_per_block", value, supported=f"an int or {n} entries")
    return [[v] * layers[i] if isinstance(v, int) else list(v) for i, v in enumerate(value)]


def mid_transformer_depth(value) -> int:
    """diffusers gives the mid block ``transformer_layers_per_block[-1]``; a per-layer list -> its first."""
    if isinstance(value, int):
        return value
    last = list(value)[-1]
    return last if isinstance(last, int) else list(last)[0]


def sd15_config() -> UNetConfig:
    """Stable Diffusion 1.5's UNet (runwayml config.json)."""
    return UNetConfig.from_diffusers(dict(
        sample_size=64, in_channels=4, out_channels=4, cross_attention_dim=768, attention_head_dim=8,
        block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
    ), "UNet2DConditionModel")


def sd21_config() -> UNetConfig:
    """Stable Diffusion 2.1's UNet (768-v: linear projections, head counts per block, upcast)."""
    return UNetConfig.from_diffusers(dict(
        sample_size=96, in_channels=4, out_channels=4, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
        block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, use_linear_projection=True,
        upcast_attention=True,
    ), "UNet2DConditionModel")


def sdxl_config() -> UNetConfig:
    """Stable Diffusion XL 1.0 base's UNet (stabilityai/stable-diffusion-xl-base-1.0 unet/config.json)."""
    return UNetConfig.from_diffusers(dict(
        sample_size=128, in_channels=4, out_channels=4, cross_attention_dim=2048, attention_head_dim=[5, 10, 20],
        block_out_channels=[320, 640, 1280], layers_per_block=2, use_linear_projection=True,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        transformer_layers_per_block=[1, 2, 10], addition_embed_type="text_time", addition_embed_type_num_heads=64,
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    ), "UNet2DConditionModel")


def ddpm_cifar10_config() -> UNetConfig:
    """google/ddpm-cifar10-32."""
    return UNetConfig.from_diffusers(dict(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=[128, 256, 256, 256], layers_per_block=2,
        down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], attention_head_dim=None,
        downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
    ), "UNet2DModel")
