"""SDXL-style UNets (text_time micro-conditioning) through fastdiff.load and Pipeline.generate, against diffusers'
own StableDiffusionXLPipeline run on the same tiny UNet, prompt embeddings and latents."""

import json
import os

import pytest
import torch

import fastdiff
from fastdiff.errors import BadArgumentError
from fastdiff.text_time import default_time_ids
from helpers import diffusers_pipeline, perturb_, rel_err

diffusers = pytest.importorskip("diffusers", reason="diffusers' SDXL pipelines are the reference")

POOLED = 10
UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=12, attention_head_dim=[2, 4],
            transformer_layers_per_block=[1, 2], use_linear_projection=True, norm_num_groups=8,
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=POOLED + 6 * 8)
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                 timestep_spacing="leading")


def _diffusers_pipe(unet_config=UNET, refiner=False):
    torch.manual_seed(0)
    unet = perturb_(diffusers.UNet2DConditionModel(**unet_config).eval(), 0)
    parts = dict(vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=unet,
                 scheduler=diffusers.EulerDiscreteScheduler(**SCHEDULER))
    if refiner:
        pipe = diffusers_pipeline("StableDiffusionXLImg2ImgPipeline")(**parts, requires_aesthetics_score=True)
    else:
        pipe = diffusers_pipeline("StableDiffusionXLPipeline")(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _save(pipe, folder, **index) -> str:
    """A diffusers pipeline folder holding only what fastdiff reads: unet/, scheduler/, model_index.json."""
    pipe.unet.save_pretrained(os.path.join(folder, "unet"))
    pipe.scheduler.save_pretrained(os.path.join(folder, "scheduler"))
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump({"_class_name": type(pipe).__name__, **index}, f)
    return str(folder)


def _embeds(b=2, tokens=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(prompt_embeds=torch.randn(b, tokens, 12, generator=g),
                negative_prompt_embeds=torch.randn(b, tokens, 12, generator=g),
                pooled_prompt_embeds=torch.randn(b, POOLED, generator=g),
                negative_pooled_prompt_embeds=torch.randn(b, POOLED, generator=g),
                latents=torch.randn(b, 4, 8, 8, generator=g))


def _fastdiff_kwargs(e):
    return dict(latents=e["latents"], encoder_hidden_states=e["prompt_embeds"],
                negative_encoder_hidden_states=e["negative_prompt_embeds"], text_embeds=e["pooled_prompt_embeds"],
                negative_text_embeds=e["negative_pooled_prompt_embeds"], progress=False)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    ref = _diffusers_pipe()
    return ref, fastdiff.load(_save(ref, tmp_path_factory.mktemp("sdxl")))


def test_sdxl_folder_loads_with_its_micro_conditioning(sdxl):
    _, pipe = sdxl
    assert (pipe.spec.text_embeds_dim, pipe.spec.time_ids_dim) == (POOLED, 6)
    assert pipe.spec.scheduler["_class_name"] == "EulerDiscreteScheduler"


@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_generate_equals_diffusers_sdxl_pipeline(sdxl, cfg):
    """Default ids: the image's own size (latent x 8), no crop, the negative ids the same."""
    ref, pipe = sdxl
    e = _embeds()
    kw = {k: v for k, v in e.items() if cfg != 1.0 or not k.startswith("negative")}
    want = ref(**{k: v.clone() for k, v in kw.items()}, num_inference_steps=5, guidance_scale=cfg, height=64,
               width=64, output_type="latent").images
    fd = _fastdiff_kwargs(e)
    if cfg == 1.0:
        fd = {k: v for k, v in fd.items() if not k.startswith("negative")}
    got = pipe.generate(steps=5, cfg_scale=cfg, **fd)
    assert rel_err(got, want) <= 2e-5


def test_explicit_time_ids_equal_diffusers_size_and_crop_arguments(sdxl):
    """time_ids / negative_time_ids are diffusers' original_size + crops_coords_top_left + target_size (its negative
    crop corner defaults to (0, 0))."""
    ref, pipe = sdxl
    # one sample: with B > 1 diffusers repeats [negative ids, ids] B times after stacking them, which pairs sample
    # 0's unconditional pass with the negative ids but sample 1's with the positive ones
    e = _embeds(b=1, seed=3)
    want = ref(**{k: v.clone() for k, v in e.items()}, num_inference_steps=4, guidance_scale=3.0, height=64,
               width=64, original_size=(96, 80), crops_coords_top_left=(8, 4), target_size=(64, 72),
               negative_original_size=(32, 32), negative_target_size=(48, 40), output_type="latent").images
    got = pipe.generate(steps=4, cfg_scale=3.0, time_ids=[96, 80, 8, 4, 64, 72],
                        negative_time_ids=torch.tensor([32.0, 32, 0, 0, 48, 40]), **_fastdiff_kwargs(e))
    assert rel_err(got, want) <= 2e-5
    default = pipe.generate(steps=4, cfg_scale=3.0, **_fastdiff_kwargs(e))
    assert rel_err(default, want) > 1e-3  # the ids reach the network


def test_per_sample_time_ids_are_rows(sdxl):
    """A (B, N) tensor gives each sample its own ids: each row equals that sample run alone."""
    _, pipe = sdxl
    e = _embeds(seed=4)
    ids = torch.tensor([[64.0, 64, 0, 0, 64, 64], [128.0, 96, 16, 0, 64, 64]])
    both = pipe.generate(steps=3, cfg_scale=2.0, time_ids=ids, **_fastdiff_kwargs(e))
    for i in range(2):
        one = {k: (v[i:i + 1] if torch.is_tensor(v) else v) for k, v in _fastdiff_kwargs(e).items()}
        alone = pipe.generate(steps=3, cfg_scale=2.0, time_ids=ids[i], **one)
        assert rel_err(both[i:i + 1], alone) <= 1e-5


def test_refiner_default_ids_are_diffusers_img2img_ids(tmp_path):
    """The refiner (requires_aesthetics_score): 5 ids, aesthetic score 6.0 and 2.5 for the negative pass."""
    ref = _diffusers_pipe(dict(UNET, projection_class_embeddings_input_dim=POOLED + 5 * 8), refiner=True)
    pipe = fastdiff.load(_save(ref, tmp_path, requires_aesthetics_score=True))
    assert (pipe.spec.text_embeds_dim, pipe.spec.time_ids_dim) == (POOLED, 5)
    ids, neg = ref._get_add_time_ids((64, 48), (0, 0), (64, 48), 6.0, 2.5, (64, 48), (0, 0), (64, 48), torch.float32,
                                     text_encoder_projection_dim=POOLED)
    assert default_time_ids(5, 8, 6) == ids.reshape(-1).tolist()
    assert default_time_ids(5, 8, 6, negative=True) == neg.reshape(-1).tolist()
    ids, neg = ref._get_add_time_ids((64, 64), (0, 0), (64, 64), 6.0, 2.5, (64, 64), (0, 0), (64, 64), torch.float32,
                                     text_encoder_projection_dim=POOLED)  # the 8x8 latents' image size
    e = _embeds(seed=5)
    kw = _fastdiff_kwargs(e)
    explicit = pipe.generate(steps=3, cfg_scale=2.0, time_ids=ids, negative_time_ids=neg, **kw)
    assert torch.equal(pipe.generate(steps=3, cfg_scale=2.0, **kw), explicit)
    # explicit ids alone: the negative pass keeps their sizes, with no crop and the negative score, as in diffusers
    assert torch.equal(pipe.generate(steps=3, cfg_scale=2.0, time_ids=ids, **kw), explicit)
    cropped, neg_cropped = ref._get_add_time_ids((96, 80), (8, 4), (64, 64), 6.0, 2.5, (96, 80), (0, 0), (64, 64),
                                                 torch.float32, text_encoder_projection_dim=POOLED)
    assert not torch.equal(cropped, neg_cropped)  # diffusers drops the crop from the negative ids
    assert torch.equal(pipe.generate(steps=3, cfg_scale=2.0, time_ids=cropped, **kw),
                       pipe.generate(steps=3, cfg_scale=2.0, time_ids=cropped, negative_time_ids=neg_cropped, **kw))


def test_refiner_widths_are_recognised_without_a_pipeline_folder():
    from fastdiff.models.unet import UNetConfig

    cfg = UNetConfig.from_diffusers(dict(UNET, addition_time_embed_dim=256, projection_class_embeddings_input_dim=2560),
                                    "UNet2DConditionModel")
    assert cfg.text_time_dims == (1280, 5)  # SDXL refiner: 1280 pooled + 5 x 256
    cfg = UNetConfig.from_diffusers(dict(UNET, addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
                                    "UNet2DConditionModel")
    assert cfg.text_time_dims == (1280, 6)  # SDXL base


def test_sdxl_architecture_preset_is_sdxl_base():
    from fastdiff.models.unet_config import sdxl_config
    from fastdiff.models import build_model

    with torch.device("meta"):
        model = build_model("unet", sdxl_config(), device="meta")
    assert sum(p.numel() for p in model.parameters()) == 2_567_463_684  # SDXL 1.0 base's UNet
    assert sdxl_config().text_time_dims == (1280, 6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(text_embeds=None), "text_embeds: this model conditions on a pooled text embedding"),
    (dict(text_embeds=torch.randn(2, POOLED + 1)), r"text_embeds: expected shape \(2, 10\)"),
    (dict(negative_text_embeds=None), "needs negative_text_embeds"),
    (dict(time_ids=[64, 64, 0, 0, 64]), r"time_ids: expected 6 numbers, or a \(2, 6\) tensor"),
    (dict(time_ids=[64, 64, 0, 0, 64, float("nan")]), "time_ids: expected finite values"),
    (dict(negative_time_ids=torch.zeros(3, 6)), r"negative_time_ids: expected 6 numbers, or a \(2, 6\)"),
    (dict(time_ids=["a"] * 6), "time_ids: expected numbers"),
])
def test_bad_micro_conditioning_is_refused_by_name(sdxl, kwargs, match):
    _, pipe = sdxl
    kw = dict(_fastdiff_kwargs(_embeds()), **kwargs)
    with pytest.raises(BadArgumentError, match=match):
        pipe.generate(steps=2, cfg_scale=2.0, **kw)


def test_micro_conditioning_on_other_models_is_refused():
    pipe = fastdiff.load("arch:tiny-sd-unet")
    with pytest.raises(BadArgumentError, match="time_ids: given, but this model has no pooled text input"):
        pipe.generate(steps=2, encoder_hidden_states=torch.randn(1, 3, 32), time_ids=[8] * 6, progress=False)
    sdxl = fastdiff.load("arch:tiny-sdxl-unet")
    with pytest.raises(BadArgumentError, match="cfg_scale == 1 runs no unconditional pass"):
        sdxl.generate(steps=2, encoder_hidden_states=torch.randn(1, 3, 32), text_embeds=torch.randn(16),
                      negative_text_embeds=torch.randn(16), progress=False)


# --- the runtime: captured graphs (a stand-in graph on the CPU), bucket padding, the Engine --------------------

def _tiny_sdxl_inputs(b, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(encoder_hidden_states=torch.randn(b, 3, 32, generator=g),
                negative_encoder_hidden_states=torch.randn(b, 3, 32, generator=g),
                text_embeds=torch.randn(b, 16, generator=g), negative_text_embeds=torch.randn(b, 16, generator=g),
                time_ids=torch.tensor([[64.0, 64, 0, 0, 64, 64], [96, 64, 8, 0, 64, 64], [64, 80, 0, 8, 32, 64]][:b]))


@pytest.mark.parametrize("scope", ["step", "loop"])
def test_graph_replay_equals_eager_with_micro_conditioning(scope):
    from test_graph_scopes import FakeGraph

    eager = fastdiff.load("arch:tiny-sdxl-unet")
    graphed = fastdiff.load("arch:tiny-sdxl-unet").optimize(cuda_graphs=True, graph_scope=scope,
                                                            batch_buckets=(1, 4), graph_factory=FakeGraph)
    kw = dict(steps=3, sampler="dpmpp_2m", cfg_scale=3.0, progress=False)
    for seeds in ([1, 2, 3], [4]):  # 3 pads to bucket 4: the padded rows repeat the last ids
        inputs = _tiny_sdxl_inputs(len(seeds), seed=seeds[0])
        want = eager.generate(seeds=seeds, **inputs, **kw)
        assert rel_err(graphed.generate(seeds=seeds, **inputs, **kw), want) <= 1e-5
        other = dict(inputs, time_ids=inputs["time_ids"] + 16)  # new values, same shapes: a replay, not stale
        assert rel_err(graphed.generate(seeds=seeds, **other, **kw), eager.generate(seeds=seeds, **other, **kw)) <= 1e-5
    captures = graphed.loop_graphs.captures if scope == "loop" else graphed.runner.captures
    assert captures == 2


def test_bucket_padding_passes_micro_conditioning_by_name():
    from fastdiff.runtime.graphs import BucketPadded

    pipe = fastdiff.load("arch:tiny-sdxl-unet")
    padded = BucketPadded(pipe.model, (2,))
    i = _tiny_sdxl_inputs(3)
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([10.0, 500.0, 900.0])
    want = pipe.model(x, t, encoder_hidden_states=i["encoder_hidden_states"], text_embeds=i["text_embeds"],
                      time_ids=i["time_ids"])
    got = padded(x, t, None, i["encoder_hidden_states"], text_embeds=i["text_embeds"], time_ids=i["time_ids"])
    assert rel_err(got, want) <= 1e-5  # 3 rows over bucket 2: two chunks, the second padded


def test_engine_requests_equal_their_solo_runs():
    pipe = fastdiff.load("arch:tiny-sdxl-unet")
    inputs = _tiny_sdxl_inputs(3, seed=7)
    kw = dict(steps=2, sampler="euler", cfg_scale=2.0)
    with fastdiff.Engine(pipe, max_batch=4, max_wait_ms=50) as engine:
        futures = [engine.submit(seed=10 + i, **{k: v[i] for k, v in inputs.items()}, **kw) for i in range(3)]
        default_ids = {k: v[0] for k, v in inputs.items() if k != "time_ids"}
        futures.append(engine.submit(seed=13, **default_ids, **kw))
        bad = engine.submit(seed=14, **dict(default_ids, text_embeds=torch.randn(15)), **kw)
        results = [f.result(timeout=60) for f in futures]
        with pytest.raises(BadArgumentError, match="text_embeds: expected shape"):
            bad.result(timeout=60)
    for i in range(3):
        solo = pipe.generate(seeds=[10 + i], **{k: v[i:i + 1] for k, v in inputs.items()}, progress=False, **kw)
        assert rel_err(results[i], solo[0]) <= 1e-5
    solo = pipe.generate(seeds=[13], **{k: v[None] for k, v in default_ids.items()}, progress=False, **kw)
    assert rel_err(results[3], solo[0]) <= 1e-5


# --- ONNX export, ONNX Runtime, TensorRT profiles ---------------------------------------------------------------

@pytest.mark.parametrize("cfg_folded", [False, True])
def test_onnx_export_takes_micro_conditioning_inputs(tmp_path, cfg_folded):
    pytest.importorskip("onnxruntime", reason="ONNX Runtime runs the exported graph")
    from fastdiff.export.onnx import export_onnx, read_onnx_spec
    from fastdiff.export.tensorrt import make_profiles
    from fastdiff.runtime.onnxruntime_runner import OnnxRuntimeRunner

    pipe = fastdiff.load("arch:tiny-sdxl-unet")
    path = str(tmp_path / "sdxl.onnx")
    res = export_onnx(pipe, None, path, cfg_folded=cfg_folded, batch=2, progress=False)
    names = [n for n, _ in res.io["inputs"]]
    want = ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    if cfg_folded:
        want += ["uncond_encoder_hidden_states", "uncond_text_embeds", "uncond_time_ids", "guidance_scale"]
    assert names == want
    assert res.max_rel_err is not None and res.max_rel_err <= 1e-4  # the exporter's own check, per-row ids
    assert (read_onnx_spec(path).text_embeds_dim, read_onnx_spec(path).time_ids_dim) == (16, 6)
    runner = OnnxRuntimeRunner(path, spec=pipe.spec)
    i = _tiny_sdxl_inputs(3)
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([10.0, 500.0, 900.0])

    def native(ctx, text, ids):
        return pipe.model(x, t, encoder_hidden_states=ctx, text_embeds=text, time_ids=ids)
    with torch.no_grad():
        c = native(i["encoder_hidden_states"], i["text_embeds"], i["time_ids"])
        if cfg_folded:
            u = native(i["negative_encoder_hidden_states"], i["negative_text_embeds"], i["time_ids"] * 0.5)
            got = runner(x, t, None, i["encoder_hidden_states"], i["text_embeds"], i["time_ids"],
                         uncond_encoder_hidden_states=i["negative_encoder_hidden_states"],
                         uncond_text_embeds=i["negative_text_embeds"], uncond_time_ids=i["time_ids"] * 0.5,
                         guidance_scale=3.0)
            want_out = u + 3.0 * (c - u)
        else:
            got = runner(x, t, None, i["encoder_hidden_states"], i["text_embeds"], i["time_ids"])
            want_out = c
    assert rel_err(got, want_out) <= 1e-4
    with pytest.raises(BadArgumentError, match=r"this graph is SDXL-style: expected time_ids \(B, N\), found None"):
        runner(x, t, None, i["encoder_hidden_states"], i["text_embeds"])
    profiles = make_profiles(path, batch="1:2:4", sequence=77)
    assert profiles["text_embeds"] == ((1, 16), (2, 16), (4, 16))
    assert profiles["time_ids"] == ((1, 6), (2, 6), (4, 6))


def test_onnxruntime_backend_samples_as_eager():
    pytest.importorskip("onnxruntime", reason="ONNX Runtime runs the exported graph")
    eager = fastdiff.load("arch:tiny-sdxl-unet")
    ort = fastdiff.load("arch:tiny-sdxl-unet").optimize(backend="onnxruntime")
    inputs = _tiny_sdxl_inputs(2, seed=5)
    kw = dict(seeds=[3, 4], steps=3, sampler="dpmpp_2m", cfg_scale=2.5, progress=False, **inputs)
    assert rel_err(ort.generate(**kw), eager.generate(**kw)) <= 1e-4


def test_bench_runs_an_sdxl_model_against_diffusers(tmp_path):
    """fastdiff bench on an SDXL-style architecture: random pooled embeddings and default ids on both sides."""
    import json

    from test_cli import fastdiff as run_cli

    r = run_cli("bench", "arch:tiny-sdxl-unet", "--backends", "eager", "--compare", "diffusers", "--steps", "2",
                "--repeat", "1", "--warmup", "1", "--cfg", "3", "--sampler", "euler", "--json", "out.json",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    d = json.loads((tmp_path / "out.json").read_text())
    rows = [(row["backend"], row["status"]) for row in d["results"]] + [(row["impl"], row["status"])
                                                                       for row in d["compare"]]
    assert rows == [("eager", "ok"), ("diffusers", "ok")], d


def test_info_names_the_micro_conditioning(tmp_path):
    from test_cli import fastdiff as run_cli

    r = run_cli("info", "arch:tiny-sdxl-unet", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    import json

    got = json.loads(r.stdout)["model_ops"]["conditioning"]
    assert got == ("encoder_hidden_states (B, tokens, 32), text_embeds (B, 16) and time_ids (6 per sample; default: "
                   "diffusers' SDXL ids)")
    r = run_cli("info", "arch:tiny-dit", cwd=tmp_path)
    assert "arch:tiny-dit takes: class_labels (10 classes, 10 = unconditional)" in r.stdout


@pytest.mark.parametrize("switches,tol", [
    (dict(fuse_qkv=True, fuse_conditioning=True), 1e-5),
    (dict(channels_last=True), 1e-5),
    (dict(dtype="bf16"), 5e-2),
])
def test_optimize_switches_keep_sdxl_samples(switches, tol):
    """The stacked conditioning projections read SiLU(emb) after the pooled-text / ids embedding was added."""
    kw = dict(seeds=[1, 2], steps=3, sampler="dpmpp_2m", cfg_scale=3.0, progress=False, **_tiny_sdxl_inputs(2))
    want = fastdiff.load("arch:tiny-sdxl-unet").generate(**kw)
    pipe = fastdiff.load("arch:tiny-sdxl-unet").optimize(**switches)
    got = pipe.generate(**kw)
    assert got.dtype == torch.float32 and rel_err(got, want) <= tol
