"""ONNX artifacts as pipelines: fastdiff.load("model.onnx") and optimize(backend="onnxruntime") sample like eager."""

import pytest

import fastdiff
from fastdiff.errors import BadArgumentError
from helpers import rel_err

pytest.importorskip("onnxruntime", reason="the ONNX Runtime backend needs onnxruntime")
pytest.importorskip("onnx", reason="the exporter needs onnx")

KW = dict(seeds=[1, 2], class_labels=[3, 4], cfg_scale=2.0, steps=3, sampler="dpmpp_2m", progress=False)


def test_load_onnx_and_sample(tmp_path):
    from fastdiff.export.onnx import export_onnx

    pipe = fastdiff.load("arch:tiny-dit")
    path = str(tmp_path / "dit.onnx")
    export_onnx(pipe, pipe.spec, path, progress=False)
    onnx_pipe = fastdiff.load(path)
    assert onnx_pipe.spec == pipe.spec
    assert rel_err(onnx_pipe.generate(**KW), pipe.generate(**KW)) <= 1e-5
    with pytest.raises(BadArgumentError, match="exported artifact"):
        onnx_pipe.save(str(tmp_path / "again"))


def test_load_onnx_takes_the_sampling_overrides(tmp_path):
    """prediction_type= and scheduler= apply to a loaded graph as to any checkpoint (a review: they were silently
    ignored); dtype= may name the graph's own precision only."""
    import torch

    from fastdiff.export.onnx import export_onnx

    pipe = fastdiff.load("arch:tiny-sd-unet")
    path = str(tmp_path / "sd.onnx")
    export_onnx(pipe, pipe.spec, path, check=False, progress=False)
    states = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(0))
    kw = dict(seeds=[1], steps=3, progress=False, encoder_hidden_states=states)
    v = fastdiff.load(path, prediction_type="v_prediction")
    assert v.spec.prediction_type == "v_prediction"
    assert rel_err(v.generate(**kw), fastdiff.load("arch:tiny-sd-unet", prediction_type="v_prediction").generate(
        **kw)) <= 1e-5
    ddim = dict(_class_name="DDIMScheduler", beta_schedule="linear", beta_start=0.001, beta_end=0.02,
                num_train_timesteps=1000)
    assert rel_err(fastdiff.load(path, scheduler=ddim).generate(**kw),
                   fastdiff.load("arch:tiny-sd-unet", scheduler=ddim).generate(**kw)) <= 1e-5
    with pytest.raises(BadArgumentError, match="prediction_type: expected"):
        fastdiff.load(path, prediction_type="bogus")
    with pytest.raises(BadArgumentError, match="exported in fp32"):
        fastdiff.load(path, dtype="fp16")
    assert fastdiff.load(path, dtype=torch.float32).spec == pipe.spec


def test_optimize_onnxruntime_backend_equals_eager():
    eager = fastdiff.load("arch:tiny-dit")
    ort = fastdiff.load("arch:tiny-dit").optimize(backend="onnxruntime")
    assert type(ort.runner).__name__ == "OnnxRuntimeRunner"
    assert rel_err(ort.generate(**KW), eager.generate(**KW)) <= 1e-5


def test_a_graph_fixed_at_another_size_samples_at_that_size(tmp_path):
    """Exported at 32x32 with a fixed height / width: the stored spec says 32x32, so the loaded pipeline samples
    at the size the graph takes, and equals the PyTorch model there."""
    from fastdiff.export.onnx import export_onnx

    pipe = fastdiff.load("arch:tiny-unet")
    path = str(tmp_path / "u32.onnx")
    export_onnx(pipe, pipe.spec, path, height=32, width=32, progress=False)
    onnx_pipe = fastdiff.load(path)
    assert tuple(onnx_pipe.spec.sample_size) == (32, 32)
    kw = dict(seeds=[1], steps=2, sampler="ddim", progress=False)
    assert rel_err(onnx_pipe.generate(**kw), pipe.generate(height=32, width=32, **kw)) <= 1e-5


def test_a_feed_the_graph_cannot_take_is_a_clear_error(tmp_path):
    from fastdiff.export.onnx import export_onnx

    pipe = fastdiff.load("arch:tiny-unet")
    path = str(tmp_path / "b1.onnx")
    export_onnx(pipe, pipe.spec, path, dynamic_batch=False, progress=False)
    with pytest.raises(BadArgumentError, match="input 'sample': expected shape 1x3x16x16 .* found 2x3x16x16.*a "
                                               "guided run feeds both passes as one batch"):
        fastdiff.load(path).generate(seeds=[1, 2], steps=2, sampler="ddim", progress=False)


@pytest.mark.parametrize("arch", ["tiny-dit", "tiny-sd-unet"])
def test_a_cfg_folded_graph_generates_like_eager(arch, tmp_path):
    """A CFG-folded export guides inside the graph: the loaded pipeline makes one call of batch B per step, with the
    negative conditioning and one scale per sample as graph inputs, and equals eager CFG (and eager without
    guidance at scale 1)."""
    import torch

    from fastdiff.export.onnx import export_onnx

    pipe = fastdiff.load(f"arch:{arch}")
    path = str(tmp_path / "folded.onnx")
    export_onnx(pipe, pipe.spec, path, cfg_folded=True, progress=False)
    folded = fastdiff.load(path)
    assert folded.runner.cfg_folded
    kw = dict(seeds=[1, 2, 3], steps=3, sampler="dpmpp_2m", progress=False)
    if pipe.spec.cross_attention_dim:  # text: a prompt and a negative of its own per sample
        g = torch.Generator().manual_seed(0)
        shape = (3, pipe.spec.text_tokens, pipe.spec.cross_attention_dim)
        kw.update(encoder_hidden_states=torch.randn(shape, generator=g),
                  negative_encoder_hidden_states=torch.randn(shape, generator=g))
    else:
        kw.update(class_labels=[3, 1, 4])
    for cfg in (2.5, [1.0, 2.0, 5.0], 1.0):
        assert rel_err(folded.generate(cfg_scale=cfg, **kw), pipe.generate(cfg_scale=cfg, **kw)) <= 1e-5, cfg
    with pytest.raises(BadArgumentError, match="guidance_rescale: this CFG-folded graph"):
        folded.generate(cfg_scale=2.0, guidance_rescale=0.7, **kw)
    # unguided, the rescale is a no-op there as in eager (it was refused: a review)
    assert rel_err(folded.generate(cfg_scale=1.0, guidance_rescale=0.7, **kw),
                   pipe.generate(cfg_scale=1.0, guidance_rescale=0.7, **kw)) <= 1e-5


def test_the_onnxruntime_backend_samples_at_every_size_eager_does():
    """optimize(backend="onnxruntime") exports a UNet with dynamic height / width, so sizes other than the model's
    default still run (and equal eager)."""
    eager = fastdiff.load("arch:tiny-unet")
    ort = fastdiff.load("arch:tiny-unet").optimize(backend="onnxruntime")
    kw = dict(seeds=[1], steps=2, sampler="ddim", height=24, width=8, progress=False)
    assert rel_err(ort.generate(**kw), eager.generate(**kw)) <= 1e-5


def test_the_onnxruntime_backend_keeps_the_pipelines_precision():
    """With no dtype asked for, a bf16 pipeline runs (ONNX has no bf16 graph here: fp32, from the bf16 weights) and
    an fp16 one exports an fp16 graph."""
    import torch

    rounded = fastdiff.load("arch:tiny-dit")
    rounded.model.to(torch.bfloat16).to(torch.float32)  # the bf16 pipeline's weights, in float32
    bf16 = fastdiff.load("arch:tiny-dit", dtype="bf16").optimize(backend="onnxruntime")
    assert bf16.runner.io["dtype"] == "fp32"
    # the denoiser still casts the network's inputs to bf16 (the pipeline's dtype): bf16 rounding, no more
    assert rel_err(bf16.generate(**KW), rounded.generate(**KW)) <= 1e-2
    fp16 = fastdiff.load("arch:tiny-dit", dtype="fp16").optimize(backend="onnxruntime")
    assert fp16.runner.io["dtype"] == "fp16"


def test_a_learned_timestep_table_rounds_fractional_timesteps_as_eager():
    """A learned timestep table's graph takes an int64 timestep: a Karras grid's fractional timesteps are rounded,
    as the native UNet rounds them (a plain cast truncated 499.7 to 499: 1.5e-3 off eager)."""
    import copy

    import torch

    from fastdiff.checkpoints.diffusers_folder import spec_for
    from fastdiff.checkpoints.presets import DIT_SCHEDULER
    from fastdiff.models import build_model, unet
    from fastdiff.pipeline import Pipeline
    from helpers import perturb_

    cfg = unet.UNetConfig.from_diffusers(dict(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=[16, 32], layers_per_block=1,
        down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"],
        norm_num_groups=8, attention_head_dim=8, time_embedding_type="learned", num_train_timesteps=1000),
        "UNet2DModel")
    spec = spec_for("unet", cfg, DIT_SCHEDULER, source="a learned timestep table")
    torch.manual_seed(0)
    model = perturb_(build_model("unet", cfg, device="cpu").eval())
    eager = Pipeline(copy.deepcopy(model), spec)
    ort = Pipeline(copy.deepcopy(model), spec).optimize(backend="onnxruntime")
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([499.7, 10.6])
    with torch.no_grad():
        assert rel_err(ort.runner(x, t), eager.model(x, t)) <= 1e-5
    kw = dict(seeds=[1, 2], steps=4, sampler="euler", schedule="karras", progress=False)
    assert rel_err(ort.generate(**kw), eager.generate(**kw)) <= 1e-5


@pytest.mark.parametrize("null_class", [None, 9])
def test_a_unet_with_text_and_a_class_table_exports_both_inputs(tmp_path, null_class):
    """A UNet conditioned on text and on a class table exports both inputs (export said "expected class_labels,
    found None"); a CFG-folded graph takes the null class inside, as a class-only graph does."""
    import copy
    import dataclasses

    import torch

    from fastdiff.checkpoints.diffusers_folder import spec_for
    from fastdiff.checkpoints.presets import SD_SCHEDULER
    from fastdiff.export.onnx import export_onnx
    from fastdiff.models import build_model, unet
    from fastdiff.pipeline import Pipeline
    from helpers import perturb_

    cfg = unet.UNetConfig.from_diffusers(dict(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=[16, 32], layers_per_block=1,
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8, num_class_embeds=10), "UNet2DConditionModel")
    spec = dataclasses.replace(spec_for("unet", cfg, SD_SCHEDULER, source="text and classes"), null_class=null_class)
    torch.manual_seed(0)
    model = perturb_(build_model("unet", cfg, device="cpu").eval())
    eager = Pipeline(copy.deepcopy(model), spec)
    g = torch.Generator().manual_seed(0)
    kw = dict(seeds=[1, 2], steps=2, sampler="ddim", class_labels=[1, 2], progress=False,
              encoder_hidden_states=torch.randn(2, 7, 16, generator=g))
    path = str(tmp_path / "plain.onnx")
    export_onnx(eager, spec, path, progress=False)
    assert rel_err(fastdiff.load(path).generate(**kw), eager.generate(**kw)) <= 1e-5
    if null_class is None:
        with pytest.raises(BadArgumentError, match="needs spec.null_class"):
            export_onnx(eager, spec, str(tmp_path / "folded.onnx"), cfg_folded=True, progress=False)
        return
    kw.update(cfg_scale=[2.0, 3.0], negative_encoder_hidden_states=torch.randn(2, 7, 16, generator=g))
    res = export_onnx(eager, spec, str(tmp_path / "folded.onnx"), cfg_folded=True, progress=False)
    assert [n for n, _ in res.io["inputs"]] == ["sample", "timestep", "encoder_hidden_states", "class_labels",
                                                 "uncond_encoder_hidden_states", "guidance_scale"]
    assert res.max_abs_err < 1e-4
    assert rel_err(fastdiff.load(res.path).generate(**kw), eager.generate(**kw)) <= 1e-5


@pytest.mark.parametrize("cfg_folded", [False, True])
def test_learned_variance_ddpm_through_a_graph(cfg_folded, tmp_path):
    """DDPM with the learned variance reads the graph's variance channels (a CFG-folded graph's are its conditional
    pass's, as eager CFG keeps them): equal to eager."""
    from fastdiff.export.onnx import export_onnx

    pipe = fastdiff.load("arch:tiny-dit")
    path = str(tmp_path / "dit.onnx")
    export_onnx(pipe, pipe.spec, path, cfg_folded=cfg_folded, progress=False)
    graph = fastdiff.load(path)
    kw = dict(KW, sampler="ddpm", variance="learned_range", steps=4)
    ref = pipe.generate(**kw)
    assert rel_err(graph.generate(**kw), ref) <= 1e-5
    assert rel_err(pipe.generate(**dict(kw, variance="fixed_small")), ref) > 1e-3
