"""kohya / sd-scripts FLUX.1 LoRAs named after Black Forest Labs' layers: merged where diffusers' own converter
(``_convert_kohya_flux_lora_to_diffusers``) puts them, fused layers split by rows (the converter's hard-coded
FLUX.1 widths replaced by the tiny model's)."""

import inspect

import pytest
import torch

import fastdiff
from helpers import perturb_, rel_err

diffusers = pytest.importorskip("diffusers", reason="diffusers' kohya FLUX.1 converter is the reference")

# a tiny FLUX.1 dev: inner width 16 (2 heads x 8), MLP 64; a single block's linear1 is 3 x 16 + 64 = 112 rows
CONFIG = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
              num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=True,
              axes_dims_rope=(2, 2, 4))
# BFL layer -> the weight shapes (out, in) its update covers (rows of the fused ones added up)
LAYERS = {"double_blocks_0_img_attn_qkv": (48, 16), "double_blocks_0_img_attn_proj": (16, 16),
          "double_blocks_0_img_mlp_0": (64, 16), "double_blocks_0_img_mlp_2": (16, 64),
          "double_blocks_0_img_mod_lin": (96, 16), "double_blocks_0_txt_attn_qkv": (48, 16),
          "double_blocks_0_txt_attn_proj": (16, 16), "double_blocks_0_txt_mlp_0": (64, 16),
          "double_blocks_0_txt_mlp_2": (16, 64), "double_blocks_0_txt_mod_lin": (96, 16),
          "single_blocks_0_linear1": (112, 16), "single_blocks_0_linear2": (16, 80),
          "single_blocks_0_modulation_lin": (48, 16), "img_in": (16, 16), "txt_in": (16, 16),
          "time_in_in_layer": (16, 256), "time_in_out_layer": (16, 16), "vector_in_in_layer": (16, 8),
          "vector_in_out_layer": (16, 16), "guidance_in_in_layer": (16, 256), "guidance_in_out_layer": (16, 16),
          "final_layer_linear": (16, 16), "final_layer_adaLN_modulation_1": (32, 16)}


def _kohya_flux(rank=2, seed=3) -> dict:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, (out, inp) in LAYERS.items():
        state[f"lora_unet_{name}.lora_down.weight"] = torch.randn(rank, inp, generator=g) * 0.1
        state[f"lora_unet_{name}.lora_up.weight"] = torch.randn(out, rank, generator=g) * 0.1
        # (diffusers' converter drops the final layer's alphas: there the alpha is the rank, which both read alike)
        alpha = float(rank) if name.startswith("final_layer") else 1.0 + torch.rand((), generator=g).item() * 4
        state[f"lora_unet_{name}.alpha"] = torch.tensor(alpha)
    return state


def _diffusers_converter():
    """diffusers' kohya FLUX.1 converter, at the tiny model's widths (it hard-codes FLUX.1's 3072 / 12288)."""
    module = pytest.importorskip("diffusers.loaders.lora_conversion_utils",
                                 reason="diffusers' kohya FLUX.1 converter is the reference")
    src = inspect.getsource(module._convert_kohya_flux_lora_to_diffusers)
    fixed = "dims=[3072, 3072, 3072, 12288]"
    if fixed not in src:
        pytest.skip("this diffusers' kohya FLUX.1 converter no longer hard-codes FLUX.1's widths")
    namespace = dict(vars(module))
    exec(src.replace(fixed, "dims=[16, 16, 16, 64]"), namespace)
    return namespace["_convert_kohya_flux_lora_to_diffusers"]


def test_a_kohya_flux_lora_merges_where_diffusers_converter_puts_it(tmp_path):
    flux = perturb_(diffusers.FluxTransformer2DModel(**CONFIG).eval(), 0)
    flux.save_pretrained(tmp_path)
    kohya = _kohya_flux()
    try:
        converted = _diffusers_converter()({k: v.clone() for k, v in kohya.items()})
    except ValueError as e:  # (diffusers 0.33's converter reads no alphas on the embedders and the final layer)
        if "Incompatible keys" not in str(e):
            raise
        pytest.skip(f"diffusers {diffusers.__version__}'s kohya FLUX.1 converter refuses alphas on the embedders and "
                    f"the final layer")
    # (the converter leaves some top-level layers without the transformer. prefix its loader adds)
    converted = {k if k.startswith("transformer.") else "transformer." + k: v for k, v in converted.items()}

    mine, theirs = fastdiff.load(str(tmp_path)), fastdiff.load(str(tmp_path))
    before = {k: v.clone() for k, v in mine.model.state_dict().items()}
    report = mine.load_lora(kohya, scale=0.7)
    assert report == {"network": len(converted) // 2}  # (fused layers count once per part)
    theirs.load_lora(converted, scale=0.7)
    a, b = mine.model.state_dict(), theirs.model.state_dict()
    changed = [k for k in a if not torch.equal(a[k], before[k])]
    assert len(changed) == len(converted) // 2 and "norm_out.linear.weight" in changed
    for k in a:
        assert rel_err(a[k], b[k]) <= 1e-6, k


def test_an_unknown_bfl_layer_is_refused_by_name(tmp_path):
    from fastdiff.errors import UnsupportedConfigError

    perturb_(diffusers.FluxTransformer2DModel(**CONFIG).eval(), 0).save_pretrained(tmp_path)
    pipe = fastdiff.load(str(tmp_path))
    state = {"lora_unet_double_blocks_0_img_norm.lora_down.weight": torch.zeros(2, 16),
             "lora_unet_double_blocks_0_img_norm.lora_up.weight": torch.zeros(16, 2)}
    with pytest.raises(UnsupportedConfigError, match="double_blocks_N_img_attn_qkv"):
        pipe.load_lora(state)
