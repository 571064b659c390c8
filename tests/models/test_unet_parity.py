"""Native UNet vs diffusers UNet2DModel / UNet2DConditionModel on small random models, float32."""

import math

import pytest
import torch

from fastdiff.checkpoints.common import strict_load
from fastdiff.checkpoints.diffusers_unet import convert_diffusers_unet, unet_config_from_diffusers
from fastdiff.models.unet import UNet
from helpers import perturb_, rel_err

diffusers = pytest.importorskip("diffusers", reason="diffusers is the reference implementation")

UNET2D_CONFIGS = {
    "attn-default": dict(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=16),
    "scale-shift-classes": dict(
        sample_size=16, in_channels=3, out_channels=6, block_out_channels=(16, 32, 48), layers_per_block=2,
        down_block_types=("AttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "AttnUpBlock2D"), norm_num_groups=8, attention_head_dim=8,
        resnet_time_scale_shift="scale_shift", num_class_embeds=10, downsample_padding=0, flip_sin_to_cos=False,
        freq_shift=1, norm_eps=1e-6, mid_block_scale_factor=math.sqrt(2)),
    "fourier-center-noattn": dict(
        sample_size=8, in_channels=2, out_channels=2, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=None, time_embedding_type="fourier", center_input_sample=True,
        add_attention=False, class_embed_type="timestep"),
    "adm-resnet-updown": dict(
        sample_size=16, in_channels=3, out_channels=6, block_out_channels=(32, 32, 64), layers_per_block=1,
        down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"), downsample_type="resnet",
        upsample_type="resnet", norm_num_groups=8, attention_head_dim=16, attn_norm_num_groups=8,
        resnet_time_scale_shift="scale_shift", num_class_embeds=10),
}

COND_CONFIGS = {
    "sd1-conv-proj": dict(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=4, norm_num_groups=8),
    "sd2-linear-headlist-upcast": dict(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
        attention_head_dim=[2, 4, 8], use_linear_projection=True, upcast_attention=True, norm_num_groups=16),
    "depth2-classes-scale-shift": dict(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
        attention_head_dim=2, transformer_layers_per_block=2, num_class_embeds=5, norm_num_groups=8,
        resnet_time_scale_shift="scale_shift", time_embedding_act_fn="silu", flip_sin_to_cos=False, freq_shift=1),
    # self-attention up blocks with per-block head widths: diffusers hands up block i the down-order width
    # attention_head_dim[i] (a reviewer's fuzzing found the reversed one taken: 2 heads against 8, 3.6e-2 off)
    "attn-up-head-dim-list": dict(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8, attention_head_dim=[16, 4], norm_num_groups=4),
    "attn-down-and-up-head-dim-list": dict(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32, 32), layers_per_block=1,
        down_block_types=("AttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "AttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=[4, 8, 16], norm_num_groups=4),
}


def _pair(cls, cfg, seed):
    torch.manual_seed(seed)
    ref = perturb_(cls(**cfg).eval(), seed)
    native_cfg = unet_config_from_diffusers(dict(ref.config, _class_name=cls.__name__))
    with torch.device("meta"):
        native = UNet(native_cfg)
    strict_load(native, convert_diffusers_unet(ref.state_dict()), "UNet")
    return ref, native.eval()


@pytest.mark.parametrize("name", sorted(UNET2D_CONFIGS))
def test_unet2d_matches_diffusers(name):
    cfg = UNET2D_CONFIGS[name]
    ref, native = _pair(diffusers.UNet2DModel, cfg, seed=1)
    g = torch.Generator().manual_seed(2)
    s = cfg["sample_size"]
    x = torch.randn(2, cfg["in_channels"], s, s, generator=g)
    fourier = cfg.get("time_embedding_type") == "fourier"
    t = torch.tensor([0.3, 7.0]) if fourier else torch.tensor([37, 842])
    labels = None
    if cfg.get("num_class_embeds"):
        labels = torch.tensor([3, 7])
    elif cfg.get("class_embed_type") == "timestep":
        labels = torch.tensor([1.5, 4.0])
    with torch.no_grad():
        want = ref(x, t, class_labels=labels).sample
        got = native(x, t, class_labels=labels)
    assert got.shape == want.shape
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("name", sorted(COND_CONFIGS))
def test_unet2d_condition_matches_diffusers(name):
    cfg = COND_CONFIGS[name]
    ref, native = _pair(diffusers.UNet2DConditionModel, cfg, seed=3)
    g = torch.Generator().manual_seed(4)
    s = cfg["sample_size"]
    x = torch.randn(2, cfg["in_channels"], s, s, generator=g)
    ctx = torch.randn(2, 7, cfg["cross_attention_dim"], generator=g)
    t = torch.tensor([37, 842])
    labels = torch.tensor([1, 4]) if cfg.get("num_class_embeds") else None
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=ctx, class_labels=labels).sample
        got = native(x, t, class_labels=labels, encoder_hidden_states=ctx)
    assert rel_err(got, want) <= 1e-5


def test_odd_resolution_matches_diffusers():
    """UNet2DConditionModel forwards the skip size to the upsamplers when H, W are not multiples of 2^n."""
    cfg = COND_CONFIGS["sd1-conv-proj"]
    ref, native = _pair(diffusers.UNet2DConditionModel, cfg, seed=5)
    x = torch.randn(1, 4, 7, 9)
    ctx = torch.randn(1, 3, 24)
    with torch.no_grad():
        want = ref(x, 500, encoder_hidden_states=ctx).sample
        got = native(x, 500, encoder_hidden_states=ctx)
    assert got.shape == (1, 4, 7, 9)
    assert rel_err(got, want) <= 1e-5


def test_scalar_and_float_timesteps_broadcast():
    ref, native = _pair(diffusers.UNet2DModel, UNET2D_CONFIGS["attn-default"], seed=6)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert rel_err(native(x, 10), ref(x, 10).sample) <= 1e-5
        assert rel_err(native(x, torch.tensor(10.5)), ref(x, torch.tensor(10.5)).sample) <= 1e-5


def test_learned_time_embedding_matches_and_accepts_fractional_timesteps():
    cfg = dict(UNET2D_CONFIGS["attn-default"], time_embedding_type="learned", num_train_timesteps=1000)
    ref, native = _pair(diffusers.UNet2DModel, cfg, seed=8)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert rel_err(native(x, torch.tensor([3, 999])), ref(x, torch.tensor([3, 999])).sample) <= 1e-5
        assert rel_err(native(x, torch.tensor([3.2, 998.7])), ref(x, torch.tensor([3, 999])).sample) <= 1e-5


TEXT_TIME_CONFIGS = {  # SDXL's micro-conditioning, small: (pooled width, time ids, config)
    "sdxl-base-like": (8, 6, dict(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=24,
        attention_head_dim=[1, 2, 4], transformer_layers_per_block=[1, 2, 3], use_linear_projection=True,
        norm_num_groups=8, addition_embed_type="text_time", addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=8 + 6 * 4)),
    "sdxl-refiner-like": (1280, 5, dict(  # the refiner's width: 1280 pooled + 5 ids
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=12, attention_head_dim=[2, 4], use_linear_projection=True, norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=1280 + 40,
        flip_sin_to_cos=False, freq_shift=1, time_embedding_act_fn="silu")),
}


@pytest.mark.parametrize("name", sorted(TEXT_TIME_CONFIGS))
def test_text_time_unet_matches_diffusers(name):
    """SDXL-style UNets: the pooled text embedding and the size / crop ids join the timestep embedding."""
    pooled, ids, cfg = TEXT_TIME_CONFIGS[name]
    ref, native = _pair(diffusers.UNet2DConditionModel, cfg, seed=9)
    assert native.config.text_time_dims == (pooled, ids)
    g = torch.Generator().manual_seed(10)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 5, cfg["cross_attention_dim"], generator=g)
    text = torch.randn(2, pooled, generator=g)
    time_ids = torch.tensor([[1024.0, 768, 0, 16, 1024, 768, 3, 2.5][:ids], [512.0, 512, 8, 0, 640, 384, 1, 6][:ids]])
    t = torch.tensor([37, 842])
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=ctx, added_cond_kwargs=dict(text_embeds=text, time_ids=time_ids)).sample
        got = native(x, t, encoder_hidden_states=ctx, text_embeds=text, time_ids=time_ids)
        other = native(x, t, encoder_hidden_states=ctx, text_embeds=text, time_ids=time_ids.flip(0))
    assert rel_err(got, want) <= 1e-5
    assert rel_err(other, want) > 1e-3  # the ids matter


def test_text_time_unet_refuses_missing_or_stray_micro_conditioning():
    from fastdiff.errors import BadArgumentError

    _, _, cfg = TEXT_TIME_CONFIGS["sdxl-base-like"]
    _, native = _pair(diffusers.UNet2DConditionModel, cfg, seed=11)
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 24)
    with pytest.raises(BadArgumentError, match="text_embeds and time_ids"):
        native(x, 10, encoder_hidden_states=ctx, text_embeds=torch.randn(1, 8))
    with pytest.raises(BadArgumentError, match=r"P \+ 4 \* N = 32"):  # 5 ids on a 6-id model
        native(x, 10, encoder_hidden_states=ctx, text_embeds=torch.randn(1, 8), time_ids=torch.zeros(1, 5))
    x2 = torch.randn(2, 4, 8, 8)  # a single row broadcasts over the batch, as in diffusers
    one = native(x2, 10, encoder_hidden_states=ctx.expand(2, -1, -1), text_embeds=torch.randn(1, 8),
                 time_ids=torch.full((1, 6), 64.0))
    assert one.shape == (2, 4, 8, 8)
    _, plain = _pair(diffusers.UNet2DConditionModel, COND_CONFIGS["sd1-conv-proj"], seed=12)
    with pytest.raises(BadArgumentError, match="no text_time"):
        plain(x, 10, encoder_hidden_states=ctx, time_ids=torch.zeros(1, 6))
