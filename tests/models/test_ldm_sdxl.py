"""SDXL single files (Stability's sgm UNetModel: label_emb, per-level transformer depths) vs diffusers.

No official SDXL-made fixture is small enough to ship, so the test writes one: a small diffusers UNet with
SDXL's conditioning widths (1280 pooled + 256 per id) is renamed into the single-file layout, and diffusers'
own single-file converter must map that file back to the same weights (which checks the renaming). fastdiff
then loads the file, and its UNet must equal the diffusers one.
"""

import pytest
import torch
from safetensors.torch import save_file

import fastdiff
from helpers import ldm_single_file as to_single_file, perturb_, rel_err

diffusers = pytest.importorskip("diffusers", reason="diffusers is the reference implementation")
single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils",
                                        reason="diffusers' single-file converter checks the renaming")

CONFIGS = {
    "sdxl-base-like": dict(  # SDXL base: no attention at level 0, depths 2 / 3 (SDXL: 2 / 10), 6 ids, its widths
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 128), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=2048,
        attention_head_dim=[1, 1, 2], transformer_layers_per_block=[1, 2, 3], use_linear_projection=True,
        norm_num_groups=32, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816),
    "sdxl-refiner-like": dict(  # the refiner: 4 levels, attention in the middle two, one depth, 5 ids
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=1280, attention_head_dim=[1, 1, 1, 1], transformer_layers_per_block=2,
        use_linear_projection=True, norm_num_groups=32, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2560, mid_block_type="UNetMidBlock2DCrossAttn"),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_sdxl_single_file_matches_diffusers(tmp_path, name):
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    ref = perturb_(diffusers.UNet2DConditionModel(**cfg).eval(), 0)
    single = to_single_file(ref.state_dict(), cfg)
    back = single_file_utils.convert_ldm_unet_checkpoint(single, dict(ref.config))
    assert set(back) == set(ref.state_dict()) and all(torch.equal(back[k], v) for k, v in ref.state_dict().items())

    path = str(tmp_path / "sdxl.safetensors")
    save_file({k: v.contiguous() for k, v in single.items()}, path)
    pipe = fastdiff.load(path, num_heads=None)
    c = pipe.model.config
    assert c.addition_embed_type == "text_time" and c.projection_class_embeddings_input_dim == \
        cfg["projection_class_embeddings_input_dim"]
    pooled, ids = (1280, 6) if name == "sdxl-base-like" else (1280, 5)
    assert (pipe.spec.text_embeds_dim, pipe.spec.time_ids_dim) == (pooled, ids)
    assert pipe.spec.sample_size == (128, 128) and pipe.spec.prediction_type == "epsilon"
    assert pipe.spec.scheduler["_class_name"] == "EulerDiscreteScheduler"

    g = torch.Generator().manual_seed(1)
    # 16x16: at 8x8 the refiner-like net's deepest GroupNorms see 2 values per group (1x1 pixels, 2 channels),
    # where float32 rounding anywhere upstream is amplified (3.5e-5 from float64, diffusers 1.2e-6: chance)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 5, cfg["cross_attention_dim"], generator=g)
    text = torch.randn(2, pooled, generator=g)
    time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024][:ids], [768.0, 1344, 64, 0, 1024, 1024][:ids]])
    t = torch.tensor([37, 842])
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=ctx, added_cond_kwargs=dict(text_embeds=text, time_ids=time_ids)).sample
        got = pipe.model(x, t, encoder_hidden_states=ctx, text_embeds=text, time_ids=time_ids)
    assert rel_err(got, want) <= 1e-5


def test_per_level_depths_are_read_from_the_file():
    """SDXL's depths differ per level ([0, 2, 10] in sgm's terms): the config keeps one per block."""
    from fastdiff.checkpoints.ldm import ldm_unet_config

    cfg = CONFIGS["sdxl-base-like"]
    torch.manual_seed(0)
    single = to_single_file(diffusers.UNet2DConditionModel(**cfg).state_dict(), cfg)
    native = ldm_unet_config(single)
    assert list(native.transformer_layers_per_block) == [1, 2, 3]
    assert native.reverse_transformer_layers_per_block is None  # the up path repeats the down path's depths
    assert list(native.num_attention_heads) == [1, 1, 2]  # 64 channels per head (at least one), as SDXL


def test_an_unclip_single_file_is_refused_not_read_as_sdxl(tmp_path):
    """SD 2.x unCLIP files carry the same sequential label_emb (an image embedding's input), with 1024-wide text
    states: diffusers reads them as a projection class embedding, not SDXL's micro-conditioning."""
    from fastdiff.errors import CheckpointError

    cfg = dict(CONFIGS["sdxl-base-like"], cross_attention_dim=1024)
    torch.manual_seed(0)
    single = to_single_file(diffusers.UNet2DConditionModel(**cfg).state_dict(), cfg)
    path = str(tmp_path / "unclip.safetensors")
    save_file({k: v.contiguous() for k, v in single.items()}, path)
    with pytest.raises(CheckpointError, match="unCLIP"):
        fastdiff.load(path)


_SD1_INPAINTING = dict(sample_size=8, in_channels=9, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                       down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                       attention_head_dim=8, norm_num_groups=32)
_SD2_INPAINTING = dict(_SD1_INPAINTING, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                       up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(64, 128),
                       cross_attention_dim=1024, attention_head_dim=[1, 2], use_linear_projection=True,
                       layers_per_block=2)


@pytest.mark.parametrize("cfg, model_type", [(_SD1_INPAINTING, "inpainting"), (_SD2_INPAINTING, "inpainting_v2")])
def test_an_inpainting_single_file_samples_as_diffusers_infers(tmp_path, cfg, model_type):
    """A single file whose conv_in takes 9 channels is an inpainting UNet; SD 2's (1024-wide text states) is
    epsilon at 512 px like stable-diffusion-2-inpainting (it was taken for the 768 v-model), as diffusers'
    infer_diffusers_model_type says."""
    torch.manual_seed(0)
    single = to_single_file(diffusers.UNet2DConditionModel(**cfg).state_dict(), cfg)
    assert single_file_utils.infer_diffusers_model_type(single) == model_type
    path = str(tmp_path / "inpainting.safetensors")
    save_file({k: v.contiguous() for k, v in single.items()}, path)
    spec = fastdiff.load(path).spec
    assert (spec.inpainting, spec.in_channels, spec.prediction_type, spec.sample_size) == (True, 4, "epsilon", (64, 64))
