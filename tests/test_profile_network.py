"""bench/profile_network.py: the kernel families and the per-call arithmetic (the GPU run relies on them), and
a CPU smoke run on a tiny model."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))

import profile_network as pn  # noqa: E402


@pytest.mark.parametrize("name, fam", [
    # Hopper library kernels (cuDNN SDPA and convolution, cuBLAS, FlashAttention) and fastdiff's Triton kernels
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64_4x1x1_kernel0_0", "attention"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 64, 4, false>>", "attention"),
    ("_attention_kernel", "attention"),
    ("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x128x64", "convolution"),
    ("void cudnn::ops::nchwToNhwcKernel<__half, __half, float, false, true>", "convolution"),
    ("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1", "gemm"),
    ("nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_TNT", "gemm"),  # cuBLAS on Hopper with CUDA 12.8+
    ("_group_norm_kernel", "group_norm"),
    ("_adaln_modulate_kernel", "layer_norm / adaLN"),
    ("_geglu_kernel", "geglu / gelu"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::Half>>", "elementwise"),
    ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<...>", "copy / cast / cat"),
    ("void at::native::convert_kernel<float>", "other"),  # "convert" is not a convolution
    ("aten::mkldnn_convolution", "convolution"),
    ("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64_gelu_aux", "gemm"),  # cuBLASLt GELU epilogue
    ("void at::native::_scatter_gather_elementwise_kernel<...>", "elementwise"),  # "scatter" is not a cat
    ("aten::cat", "copy / cast / cat"),
    ("triton_poi_fused_cat_0", "copy / cast / cat"),  # an Inductor concatenation
    ("aten::addmm", "gemm"),
])
def test_kernel_families(name, fam):
    assert pn.family(name) == fam


def test_aggregate_divides_by_calls_and_shares_sum_to_one():
    events = [("sm90_xmma_gemm_a", 300.0, 6), ("_group_norm_kernel", 100.0, 4), ("sm90_xmma_gemm_a", 100.0, 2),
              ("flash_fwd_kernel", 0.0, 2)]  # a zero-time entry is dropped
    r = pn.aggregate(events, calls=2)
    assert r["total_us"] == pytest.approx(250.0)
    assert r["kernels"][0] == ("sm90_xmma_gemm_a", "gemm", 200.0, 4.0)
    assert [(f, round(us, 6), round(s, 6)) for f, us, s in r["families"]] == [("gemm", 200.0, 0.8),
                                                                              ("group_norm", 50.0, 0.2)]
    assert pn.aggregate([], calls=3)["families"] == []


def test_cpu_smoke_run_reports_the_models_op_families():
    r = pn.profile("arch:tiny-unet", calls=1, warmup=1)
    families = {f for f, _, _ in r["families"]}
    assert {"convolution", "group_norm", "attention"} <= families
    assert abs(sum(s for _, _, s in r["families"]) - 1) < 1e-6
    text = pn.format_report(r, top=5)
    behind = r["ops_behind_generic_kernels"]
    assert "convolution" in text and len(text.splitlines()) == 2 + len(r["families"]) + 1 + 5 + 1 + len(behind)
    # the element-wise time attributed to the aten ops that launched it, with their input shapes: the UNet's
    # residual adds are there (tiny-unet: 2x32x16x16 at its first level)
    assert any(op == "aten::add" and shapes.startswith("[[2, ") for op, shapes, _, _ in behind), behind
    assert all(pn.family(op) in pn.ATTRIBUTED and us > 0 for op, _, us, _ in behind)


@pytest.mark.parametrize("arch,names", [
    ("tiny-sdxl-unet", {"encoder_hidden_states", "text_embeds", "time_ids"}),
    ("tiny-sd3", {"encoder_hidden_states", "text_embeds"}),
    ("tiny-dit", {"class_labels"}),
])
def test_network_inputs_cover_each_models_conditioning(arch, names):
    """The profile's inputs are what the network takes: an SDXL UNet's pooled text and ids, SD3's pooled text."""
    import fastdiff

    pipe = fastdiff.load(f"arch:{arch}")
    x, t, cond = pn._network_inputs(pipe, 2)
    assert set(cond) == names
    with torch.no_grad():
        assert pipe.model(x, t, **cond).shape[0] == 2


def test_switches_reach_the_profiled_model():
    """--switches applies fastdiff bench's '+'-switches: with the convolution biases moved (fuse_conv_bias) the
    channels-last UNet runs its 1x1 convolutions as GEMMs, so fewer convolutions show up."""
    def convolutions(r):
        return sum(count for _, fam, _, count in r["kernels"] if fam == "convolution")

    moved = pn.profile("arch:tiny-sd-unet", calls=1, warmup=1, switches="convbias+cl")
    assert 0 < convolutions(moved) < convolutions(pn.profile("arch:tiny-sd-unet", calls=1, warmup=1, switches="cl"))
    with pytest.raises(SystemExit, match="--switches"):
        pn.profile("arch:tiny-sd-unet", calls=1, warmup=1, switches="loop")
    with pytest.raises(SystemExit, match="flash"):  # a clash fastdiff bench refuses too
        pn.profile("arch:tiny-sd-unet", calls=1, warmup=1, switches="flash+efficient")


def test_generic_kernels_count_for_the_op_that_launched_them():
    """On a GPU the element-wise / copy kernels are grouped by their launching aten op and its input shapes (a
    convolution's bias add is an aten::add_), whatever the op's own name; other kernels are left out."""
    from types import SimpleNamespace as NS

    bias_add = "void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<CUDAFunctor_add>>"
    conv = "sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc"
    events = [NS(name="aten::add_", input_shapes=[[2, 320, 64, 64], [1, 320, 1, 1]],
                 kernels=[NS(name=bias_add, duration=6.0)]) for _ in range(4)]
    events += [NS(name="aten::cudnn_convolution", input_shapes=[[2, 320, 64, 64]],
                  kernels=[NS(name=conv, duration=40.0)]),
               NS(name="aten::arange", input_shapes=[[]],
                  kernels=[NS(name="vectorized_elementwise_kernel", duration=1.0)]),
               NS(name="ProfilerStep", input_shapes=[], kernels=[NS(name=bias_add, duration=9.0)])]
    rows = pn._kernels_by_launching_op(NS(events=lambda: events), calls=2, top=5)
    assert rows == [("aten::add_", "[[2, 320, 64, 64], [1, 320, 1, 1]]", 12.0, 2.0), ("aten::arange", "[[]]", 0.5, 0.5)]
