"""Stable Diffusion 3 / 3.5 (MMDiT, flow matching): the native model against diffusers' SD3Transformer2DModel, and
fastdiff.load(folder).generate against diffusers' own StableDiffusion3Pipeline on the same prompt embeddings."""

import json
import os

import pytest
import torch

import fastdiff
from fastdiff.errors import BadArgumentError, UnsupportedConfigError
from fastdiff.models.mmdit import MMDiT, MMDiTConfig
from helpers import diffusers_pipeline, perturb_, rel_err

diffusers = pytest.importorskip("diffusers", reason="diffusers' SD3 transformer and pipeline are the reference")

BASE = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=10, out_channels=4,
            pos_embed_max_size=8)
CONFIGS = {
    "sd3": BASE,  # SD3 Medium's layout: no q / k norm
    "sd3.5-large": dict(BASE, qk_norm="rms_norm"),
    "sd3.5-medium": dict(BASE, qk_norm="rms_norm", dual_attention_layers=(0, 1)),  # a second image-only attention
}


def _reference(cfg, seed=0):
    torch.manual_seed(seed)
    return perturb_(diffusers.SD3Transformer2DModel(**cfg).eval(), seed)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("size", [(8, 8), (6, 10), (4, 8)])
def test_mmdit_matches_diffusers(name, size):
    """Square, non-square and smaller-than-trained latents (the position table's centre crop)."""
    ref = _reference(CONFIGS[name])
    native = MMDiT(MMDiTConfig.from_diffusers(dict(ref.config)))
    native.load_state_dict(ref.state_dict(), strict=True)  # diffusers' names, no conversion
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, *size, generator=g)
    ctx, pooled = torch.randn(2, 5, 12, generator=g), torch.randn(2, 10, generator=g)
    t = torch.tensor([37.5, 842.0])
    with torch.no_grad():
        want = ref(x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t).sample
        got = native(x, t, encoder_hidden_states=ctx, text_embeds=pooled)
        other = native(x, t, encoder_hidden_states=ctx, text_embeds=pooled.flip(0))
    assert rel_err(got, want) <= 1e-5
    assert rel_err(other, want) > 1e-3  # the pooled text reaches the output


def _pipeline(cfg=CONFIGS["sd3.5-large"]):
    parts = dict(vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                 text_encoder_3=None, tokenizer_3=None)
    pipe = diffusers_pipeline("StableDiffusion3Pipeline")(transformer=_reference(cfg), **parts,
                                              scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _save(pipe, folder) -> str:
    pipe.transformer.save_pretrained(os.path.join(folder, "transformer"))
    pipe.scheduler.save_pretrained(os.path.join(folder, "scheduler"))
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusion3Pipeline"}, f)
    return str(folder)


def _embeds(b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(prompt_embeds=torch.randn(b, 5, 12, generator=g),
                negative_prompt_embeds=torch.randn(b, 5, 12, generator=g),
                pooled_prompt_embeds=torch.randn(b, 10, generator=g),
                negative_pooled_prompt_embeds=torch.randn(b, 10, generator=g),
                latents=torch.randn(b, 4, 8, 8, generator=g))


def _fastdiff_kwargs(e, guided=True):
    kw = dict(latents=e["latents"], encoder_hidden_states=e["prompt_embeds"], text_embeds=e["pooled_prompt_embeds"],
              progress=False)
    if guided:
        kw.update(negative_encoder_hidden_states=e["negative_prompt_embeds"],
                  negative_text_embeds=e["negative_pooled_prompt_embeds"])
    return kw


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    ref = _pipeline()
    return ref, fastdiff.load(_save(ref, tmp_path_factory.mktemp("sd3")))


def test_sd3_folder_loads_as_a_flow_model(sd3):
    _, pipe = sd3
    s = pipe.spec
    assert (s.kind, s.prediction_type, s.cross_attention_dim, s.text_embeds_dim, s.time_ids_dim) == (
        "mmdit", "flow_prediction", 12, 10, None)
    assert s.scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler" and s.scheduler["shift"] == 3.0


@pytest.mark.parametrize("cfg", [1.0, 4.5])
def test_generate_equals_diffusers_sd3_pipeline(sd3, cfg):
    ref, pipe = sd3
    e = _embeds()
    kw = {k: v.clone() for k, v in e.items() if cfg != 1.0 or not k.startswith("negative")}
    want = ref(**kw, num_inference_steps=5, guidance_scale=cfg, height=64, width=64, output_type="latent").images
    got = pipe.generate(steps=5, cfg_scale=cfg, **_fastdiff_kwargs(e, guided=cfg != 1.0))
    assert rel_err(got, want) <= 2e-5


def test_named_samplers_run_on_sd3(sd3):
    """Every flow sampler drives the MMDiT; Euler on the named t grid equals diffusers' FlowMatchEuler only up to
    the grid, so this checks the samplers converge to one another at many steps, not a reference number."""
    _, pipe = sd3
    e = _embeds(seed=2)
    ref = pipe.generate(steps=60, sampler="euler", cfg_scale=2.0, **_fastdiff_kwargs(e))
    for sampler in ("dpmpp_2m", "unipc", "heun"):
        got = pipe.generate(steps=30, sampler=sampler, cfg_scale=2.0, **_fastdiff_kwargs(e))
        assert rel_err(got, ref) <= 0.05, sampler


def test_sd3_folder_without_a_scheduler_gets_sd3_schedule(tmp_path):
    ref = _pipeline(CONFIGS["sd3"])
    ref.transformer.save_pretrained(tmp_path)  # a model folder alone
    pipe = fastdiff.load(str(tmp_path))
    assert pipe.spec.prediction_type == "flow_prediction" and pipe.spec.scheduler["shift"] == 3.0


def test_sd3_medium_architecture_preset():
    from fastdiff.models import build_model
    from fastdiff.models.mmdit import sd3_medium_config

    model = build_model("mmdit", sd3_medium_config(), device="meta")
    assert sum(p.numel() for p in model.parameters()) == 2_028_328_000  # SD3 Medium's transformer


@pytest.mark.parametrize("kwargs,match", [
    (dict(height=9, width=8), "multiples of its patch size 2 up to 16"),
    (dict(height=18, width=8), "multiples of its patch size 2 up to 16"),
    (dict(text_embeds=None), "text_embeds: this model conditions on a pooled text embedding"),
    (dict(time_ids=[8] * 6), "time_ids: given, but this model takes no time ids"),
])
def test_bad_sd3_arguments_are_refused_by_name(kwargs, match):
    pipe = fastdiff.load("arch:tiny-sd3")
    kw = dict(seeds=[1], steps=2, encoder_hidden_states=torch.randn(1, 5, 24), text_embeds=torch.randn(16),
              progress=False)
    kw.update(kwargs)
    with pytest.raises(BadArgumentError, match=match):
        pipe.generate(**kw)


def test_config_fields_mmdit_does_not_implement_are_refused():
    with pytest.raises(UnsupportedConfigError, match="caption_projection_dim"):
        MMDiTConfig.from_diffusers(dict(BASE, caption_projection_dim=24))
    with pytest.raises(UnsupportedConfigError, match="qk_norm"):
        MMDiTConfig.from_diffusers(dict(BASE, qk_norm="layer_norm"))
    with pytest.raises(UnsupportedConfigError, match="use_pos_embed"):
        MMDiTConfig.from_diffusers(dict(BASE, use_pos_embed=False))


# --- the runtime ---------------------------------------------------------------------------------------------------

def _tiny_inputs(b, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(encoder_hidden_states=torch.randn(b, 5, 24, generator=g),
                negative_encoder_hidden_states=torch.randn(b, 5, 24, generator=g),
                text_embeds=torch.randn(b, 16, generator=g), negative_text_embeds=torch.randn(b, 16, generator=g))


@pytest.mark.parametrize("scope", ["step", "loop"])
def test_graph_replay_equals_eager(scope):
    from test_graph_scopes import FakeGraph

    eager = fastdiff.load("arch:tiny-sd3")
    graphed = fastdiff.load("arch:tiny-sd3").optimize(cuda_graphs=True, graph_scope=scope, batch_buckets=(1, 4),
                                                      graph_factory=FakeGraph)
    kw = dict(steps=3, sampler="dpmpp_2m", cfg_scale=3.0, progress=False)
    for seeds in ([1, 2, 3], [4]):
        inputs = _tiny_inputs(len(seeds), seed=seeds[0])
        assert rel_err(graphed.generate(seeds=seeds, **inputs, **kw), eager.generate(seeds=seeds, **inputs, **kw)) \
            <= 1e-5


def test_engine_requests_equal_their_solo_runs():
    pipe = fastdiff.load("arch:tiny-sd3")
    inputs = _tiny_inputs(3, seed=7)
    kw = dict(steps=2, cfg_scale=2.0)
    with fastdiff.Engine(pipe, max_batch=4, max_wait_ms=50) as engine:
        futures = [engine.submit(seed=10 + i, **{k: v[i] for k, v in inputs.items()}, **kw) for i in range(3)]
        results = [f.result(timeout=60) for f in futures]
    for i in range(3):
        solo = pipe.generate(seeds=[10 + i], **{k: v[i:i + 1] for k, v in inputs.items()}, progress=False, **kw)
        assert rel_err(results[i], solo[0]) <= 1e-5


@pytest.mark.parametrize("cfg_folded", [False, True])
def test_onnx_export_and_onnxruntime_backend(tmp_path, cfg_folded):
    pytest.importorskip("onnxruntime", reason="ONNX Runtime runs the exported graph")
    from fastdiff.export.onnx import export_onnx

    pipe = fastdiff.load("arch:tiny-sd3")
    res = export_onnx(pipe, None, str(tmp_path / "sd3.onnx"), cfg_folded=cfg_folded, dynamic_hw=True, batch=2,
                      progress=False)
    names = [n for n, _ in res.io["inputs"]]
    assert names == ["sample", "timestep", "encoder_hidden_states", "text_embeds"] + (
        ["uncond_encoder_hidden_states", "uncond_text_embeds", "guidance_scale"] if cfg_folded else [])
    assert res.max_rel_err is not None and res.max_rel_err <= 1e-4
    if not cfg_folded:
        ort = fastdiff.load("arch:tiny-sd3").optimize(backend="onnxruntime")
        kw = dict(seeds=[3, 4], steps=3, cfg_scale=2.5, progress=False, **_tiny_inputs(2, seed=5))
        assert rel_err(ort.generate(**kw), pipe.generate(**kw)) <= 1e-4


def test_bench_compares_with_the_same_diffusers_network(tmp_path):
    """``fastdiff bench --compare diffusers`` rebuilds the same SD3 transformer and drives it as SD3's pipeline."""
    import json as json_lib

    from fastdiff.commands.bench_diffusers import build_diffusers_model
    from test_cli import fastdiff as run_cli

    pipe = fastdiff.load("arch:tiny-sd3")
    for p in pipe.model.parameters():
        p.data.normal_(0, 0.05)
    model, note = build_diffusers_model(pipe)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0])
    ctx, pooled = torch.randn(2, 5, 24), torch.randn(2, 16)
    with torch.no_grad():
        want = pipe.model(x, t, encoder_hidden_states=ctx, text_embeds=pooled)
        got = model(hidden_states=x, timestep=t, encoder_hidden_states=ctx, pooled_projections=pooled).sample
    assert note is None and rel_err(got, want) <= 1e-5
    r = run_cli("bench", "arch:tiny-sd3", "--backends", "eager", "--compare", "diffusers", "--steps", "2", "--repeat",
                "1", "--warmup", "1", "--cfg", "3", "--sampler", "dpmpp_2m", "--json", "out.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    d = json_lib.loads((tmp_path / "out.json").read_text())
    assert [(row["backend"], row["status"]) for row in d["results"]] == [("eager", "ok")]
    assert [(row["impl"], row["status"], row["scheduler"]) for row in d["compare"]] == [
        ("diffusers", "ok", "DPMSolverMultistepScheduler")]


def test_info_names_the_pooled_text_input(tmp_path):
    from test_cli import fastdiff as run_cli

    r = run_cli("info", "arch:tiny-sd3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert ("arch:tiny-sd3 takes: encoder_hidden_states (B, tokens, 24), text_embeds (B, 16), the pooled text "
            "embedding") in r.stdout
    assert "predicts flow_prediction" in r.stdout


# --- Stability's single files --------------------------------------------------------------------------------------

def to_single_file(state: dict, num_layers: int) -> dict:
    """A diffusers SD3 transformer state dict in Stability's single-file layout (the inverse of diffusers'
    convert_sd3_transformer_checkpoint_to_diffusers: fused qkv, (shift, scale) rows in the continuous norms)."""
    out = {}

    def put(dst, src):
        for part in ("weight", "bias"):
            if f"{src}.{part}" in state:
                out[f"model.diffusion_model.{dst}.{part}"] = state[f"{src}.{part}"]

    def swapped(dst, src):
        for part in ("weight", "bias"):
            scale, shift = state[f"{src}.{part}"].chunk(2, dim=0)
            out[f"model.diffusion_model.{dst}.{part}"] = torch.cat([shift, scale])

    def fused(dst, src, names):
        for part in ("weight", "bias"):
            out[f"model.diffusion_model.{dst}.qkv.{part}"] = torch.cat([state[f"{src}.{n}.{part}"] for n in names])

    out["model.diffusion_model.pos_embed"] = state["pos_embed.pos_embed"]
    put("x_embedder.proj", "pos_embed.proj")
    put("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1")
    put("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2")
    put("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1")
    put("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2")
    put("context_embedder", "context_embedder")
    for i in range(num_layers):
        s, d = f"transformer_blocks.{i}", f"joint_blocks.{i}"
        fused(f"{d}.x_block.attn", f"{s}.attn", ("to_q", "to_k", "to_v"))
        fused(f"{d}.context_block.attn", f"{s}.attn", ("add_q_proj", "add_k_proj", "add_v_proj"))
        put(f"{d}.x_block.attn.proj", f"{s}.attn.to_out.0")
        put(f"{d}.context_block.attn.proj", f"{s}.attn.to_add_out")
        for src, dst in (("norm_q", "x_block.attn.ln_q"), ("norm_k", "x_block.attn.ln_k"),
                         ("norm_added_q", "context_block.attn.ln_q"), ("norm_added_k", "context_block.attn.ln_k")):
            put(f"{d}.{dst}", f"{s}.attn.{src}")
        if f"{s}.attn2.to_q.weight" in state:
            fused(f"{d}.x_block.attn2", f"{s}.attn2", ("to_q", "to_k", "to_v"))
            put(f"{d}.x_block.attn2.proj", f"{s}.attn2.to_out.0")
            put(f"{d}.x_block.attn2.ln_q", f"{s}.attn2.norm_q")
            put(f"{d}.x_block.attn2.ln_k", f"{s}.attn2.norm_k")
        put(f"{d}.x_block.adaLN_modulation.1", f"{s}.norm1.linear")
        (swapped if i == num_layers - 1 else put)(f"{d}.context_block.adaLN_modulation.1", f"{s}.norm1_context.linear")
        put(f"{d}.x_block.mlp.fc1", f"{s}.ff.net.0.proj")
        put(f"{d}.x_block.mlp.fc2", f"{s}.ff.net.2")
        put(f"{d}.context_block.mlp.fc1", f"{s}.ff_context.net.0.proj")
        put(f"{d}.context_block.mlp.fc2", f"{s}.ff_context.net.2")
    put("final_layer.linear", "proj_out")
    swapped("final_layer.adaLN_modulation.1", "norm_out.linear")
    return out


SINGLE_FILE = dict(BASE, attention_head_dim=64, num_attention_heads=1, caption_projection_dim=64)  # SD3's head dim


@pytest.mark.parametrize("extra", [{}, dict(qk_norm="rms_norm", dual_attention_layers=(0, 1))],
                         ids=["sd3", "sd3.5-medium"])
def test_sd3_single_file_matches_diffusers(tmp_path, extra):
    from safetensors.torch import save_file

    single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils",
                                            reason="diffusers' single-file converter checks the renaming")
    cfg = dict(SINGLE_FILE, **extra)
    ref = _reference(cfg)
    single = to_single_file(ref.state_dict(), cfg["num_layers"])
    back = single_file_utils.convert_sd3_transformer_checkpoint_to_diffusers(dict(single))
    assert set(back) == set(ref.state_dict()) and all(torch.equal(back[k], v) for k, v in ref.state_dict().items())

    single["first_stage_model.decoder.conv_in.weight"] = torch.zeros(1)  # the VAE beside it: ignored
    path = str(tmp_path / "sd3.safetensors")
    save_file({k: v.contiguous() for k, v in single.items()}, path)
    pipe = fastdiff.load(path)
    s = pipe.spec
    # SD3's 128x128 latents, capped here by the tiny position table (8 patches of 2)
    assert (s.kind, s.prediction_type, s.sample_size, s.scheduler["shift"]) == ("mmdit", "flow_prediction",
                                                                                (16, 16), 3.0)
    c = pipe.model.config
    assert (c.num_layers, c.qk_norm, c.dual_attention_layers, c.pos_embed_max_size) == (
        3, extra.get("qk_norm"), extra.get("dual_attention_layers", ()), 8)
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 8, 6, generator=g), torch.randn(2, 5, 12, generator=g)
    pooled = torch.randn(2, 10, generator=g)
    t = torch.tensor([37.5, 842.0])
    with torch.no_grad():
        want = ref(x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t).sample
        got = pipe.model(x, t, encoder_hidden_states=ctx, text_embeds=pooled)
    assert rel_err(got, want) <= 1e-5
    # the same transformer with unprefixed keys, beside a text encoder's: the other parts are ignored too
    bare = {k[len("model.diffusion_model."):]: v for k, v in single.items() if k.startswith("model.diffusion_model.")}
    bare["text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"] = torch.ones(1)
    save_file({k: v.contiguous() for k, v in bare.items()}, str(tmp_path / "bare.safetensors"))
    with torch.no_grad():
        again = fastdiff.load(str(tmp_path / "bare.safetensors")).model(x, t, encoder_hidden_states=ctx,
                                                                       text_embeds=pooled)
    assert torch.equal(again, got)


def test_direct_calls_with_wrong_text_widths_are_clear_errors():
    model = fastdiff.load("arch:tiny-sd3").model
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(BadArgumentError, match=r"expected encoder_hidden_states \(2, tokens, 24\) and text_embeds "
                                               r"\(2, 16\), found \(2, 5, 24\) and \(2, 15\)"):
        model(x, 10.0, encoder_hidden_states=torch.randn(2, 5, 24), text_embeds=torch.randn(2, 15))


def test_a_transformer_folder_with_a_beta_scheduler_is_refused(tmp_path):
    """An SD3 network predicts the flow velocity: read with a beta schedule it would run as an epsilon model."""
    from fastdiff.checkpoints.presets import SD_SCHEDULER

    with pytest.raises(UnsupportedConfigError, match="flow-matching scheduler"):
        fastdiff.load("arch:tiny-sd3", scheduler=SD_SCHEDULER).generate(
            seeds=[1], steps=1, encoder_hidden_states=torch.randn(1, 5, 24), text_embeds=torch.randn(16),
            progress=False)
    ref = _reference(CONFIGS["sd3"])
    ref.save_pretrained(tmp_path / "transformer")
    diffusers.PNDMScheduler().save_pretrained(tmp_path / "scheduler")
    with pytest.raises(UnsupportedConfigError, match="flow-matching scheduler"):
        fastdiff.load(str(tmp_path))
