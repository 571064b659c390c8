"""FLUX.1 (dev: guidance-distilled; schnell: no guidance input): the native model against diffusers'
FluxTransformer2DModel (packed latents, rotary ids), and fastdiff.load(folder).generate against diffusers' own
FluxPipeline on the same prompt embeddings and latents."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

import fastdiff
from fastdiff.errors import BadArgumentError, UnsupportedConfigError
from fastdiff.models.flux import Flux, FluxConfig
from helpers import diffusers_pipeline, perturb_, rel_err

diffusers = pytest.importorskip("diffusers", reason="diffusers' Flux transformer and pipeline are the reference")


def _pack(x):
    """FluxPipeline._pack_latents: (B, C, H, W) -> (B, H/2 * W/2, 4C), each 2x2 patch's channels together."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def _unpack(t, h, w):
    """FluxPipeline._unpack_latents for an (h, w) latent."""
    b, _, c4 = t.shape
    return t.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def _image_ids(h, w):
    """FluxPipeline._prepare_latent_image_ids for an (h, w) latent: (h/2 * w/2, 3) rows (0, row, col)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3)

DEV = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
           num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10, guidance_embeds=True,
           axes_dims_rope=(4, 6, 6))
SCHNELL = dict(DEV, guidance_embeds=False)
DEV_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                     max_image_seq_len=4096)
SCHNELL_SCHEDULER = dict(shift=1.0)


def _reference(cfg, seed=0):
    torch.manual_seed(seed)
    return perturb_(diffusers.FluxTransformer2DModel(**cfg).eval(), seed)


def _diffusers_call(ref, x, t, ctx, pooled, guidance):
    """diffusers' transformer as FluxPipeline drives it: packed latents, position ids, timestep.to(dtype) / 1000."""
    h, w = x.shape[-2:]
    out = ref(hidden_states=_pack(x), encoder_hidden_states=ctx, pooled_projections=pooled,
              timestep=t.to(x.dtype) / 1000,
              img_ids=_image_ids(h, w), txt_ids=torch.zeros(ctx.shape[1], 3), guidance=guidance).sample
    return _unpack(out, h, w)


@pytest.mark.parametrize("cfg", [DEV, SCHNELL], ids=["dev", "schnell"])
@pytest.mark.parametrize("size", [(8, 8), (6, 10)])
def test_flux_matches_diffusers(cfg, size):
    ref = _reference(cfg)
    native = Flux(FluxConfig.from_diffusers(dict(ref.config)))
    native.load_state_dict(ref.state_dict(), strict=True)  # diffusers' names, no conversion
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, *size, generator=g)
    ctx, pooled = torch.randn(2, 5, 12, generator=g), torch.randn(2, 10, generator=g)
    t = torch.tensor([375.0, 842.0])
    guidance = torch.tensor([3.5, 5.0]) if cfg["guidance_embeds"] else None
    with torch.no_grad():
        want = _diffusers_call(ref, x, t, ctx, pooled, guidance)
        got = native(x, t, encoder_hidden_states=ctx, text_embeds=pooled, guidance=guidance)
    assert rel_err(got, want) <= 1e-5
    if guidance is not None:
        with torch.no_grad():
            other = native(x, t, encoder_hidden_states=ctx, text_embeds=pooled, guidance=guidance.flip(0))
        assert rel_err(other, want) > 1e-3  # the guidance strength reaches the output


def _pipeline(cfg, scheduler):
    parts = dict(vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    pipe = diffusers_pipeline("FluxPipeline")(transformer=_reference(cfg), **parts,
                                             scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**scheduler))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _save(pipe, folder) -> str:
    pipe.transformer.save_pretrained(os.path.join(folder, "transformer"))
    pipe.scheduler.save_pretrained(os.path.join(folder, "scheduler"))
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump({"_class_name": "FluxPipeline"}, f)
    return str(folder)


@pytest.mark.parametrize("kind,size,steps", [("dev", (8, 8), 5), ("dev", (6, 10), 3), ("schnell", (8, 8), 4)])
def test_generate_equals_diffusers_flux_pipeline(tmp_path, kind, size, steps):
    """FluxPipeline's own grid (sigmas = linspace(1, 1/n, n), shifted by the resolution's mu for dev) and
    guidance input; schnell: shift 1, no guidance input."""
    cfg, scheduler = (DEV, DEV_SCHEDULER) if kind == "dev" else (SCHNELL, SCHNELL_SCHEDULER)
    ref = _pipeline(cfg, scheduler)
    pipe = fastdiff.load(_save(ref, tmp_path))
    assert (pipe.spec.kind, pipe.spec.prediction_type, pipe.spec.in_channels, pipe.spec.guidance_input) == (
        "flux", "flow_prediction", 4, kind == "dev")
    g = torch.Generator().manual_seed(2)
    ctx, pooled = torch.randn(2, 5, 12, generator=g), torch.randn(2, 10, generator=g)
    lat = torch.randn(2, 4, *size, generator=g)
    h, w = size
    kw = dict(guidance_scale=4.0) if kind == "dev" else {}
    flux_pipeline = type(ref)  # the test's packing helpers are FluxPipeline's
    assert torch.equal(_pack(lat), flux_pipeline._pack_latents(lat, 2, 4, h, w))
    ids = flux_pipeline._prepare_latent_image_ids(2, h // 2, w // 2, "cpu", torch.float32)
    assert torch.equal(_image_ids(h, w), ids)
    out = ref(prompt_embeds=ctx, pooled_prompt_embeds=pooled, latents=_pack(lat), num_inference_steps=steps,
              height=8 * h, width=8 * w, output_type="latent", **kw).images
    want = _unpack(out, h, w)
    assert torch.equal(want, flux_pipeline._unpack_latents(out, 8 * h, 8 * w, 8))
    got = pipe.generate(latents=lat, steps=steps, encoder_hidden_states=ctx, text_embeds=pooled,
                        guidance=4.0 if kind == "dev" else None, progress=False)
    assert rel_err(got, want) <= 2e-5


def test_flux_dev_architecture_preset():
    from fastdiff.models import build_model
    from fastdiff.models.flux import flux_dev_config

    model = build_model("flux", flux_dev_config(), device="meta")
    assert sum(p.numel() for p in model.parameters()) == 11_901_408_320  # FLUX.1 dev's transformer


@pytest.mark.parametrize("kwargs,match", [
    (dict(height=7), "Flux takes even latent sizes"),
    (dict(guidance=float("nan")), "guidance"),
    (dict(text_embeds=None), "text_embeds: this model conditions on a pooled text embedding"),
])
def test_bad_flux_arguments_are_refused_by_name(kwargs, match):
    pipe = fastdiff.load("arch:tiny-flux")
    kw = dict(seeds=[1], steps=2, encoder_hidden_states=torch.randn(1, 5, 24), text_embeds=torch.randn(12),
              progress=False)
    kw.update(kwargs)
    with pytest.raises(BadArgumentError, match=match):
        pipe.generate(**kw)


def test_guidance_is_refused_where_the_model_has_no_guidance_input():
    with pytest.raises(BadArgumentError, match="takes no distilled-guidance strength"):
        fastdiff.load("arch:tiny-sd3").generate(seeds=[1], steps=1, encoder_hidden_states=torch.randn(1, 5, 24),
                                                text_embeds=torch.randn(16), guidance=3.5, progress=False)


def test_config_fields_flux_does_not_implement_are_refused():
    with pytest.raises(UnsupportedConfigError, match="in_channels"):  # extra channels of no known layout
        FluxConfig.from_diffusers(dict(DEV, in_channels=96, out_channels=64))
    with pytest.raises(UnsupportedConfigError, match="out_channels"):  # wider than its input
        FluxConfig.from_diffusers(dict(DEV, in_channels=64, out_channels=128))
    with pytest.raises(UnsupportedConfigError, match="axes_dims_rope"):
        FluxConfig.from_diffusers(dict(DEV, axes_dims_rope=(4, 6, 8)))


# --- the runtime ---------------------------------------------------------------------------------------------------

def _tiny_inputs(b, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(encoder_hidden_states=torch.randn(b, 5, 24, generator=g), text_embeds=torch.randn(b, 12, generator=g))


@pytest.mark.parametrize("scope", ["step", "loop"])
def test_graph_replay_equals_eager(scope):
    from test_graph_scopes import FakeGraph

    eager = fastdiff.load("arch:tiny-flux")
    graphed = fastdiff.load("arch:tiny-flux").optimize(cuda_graphs=True, graph_scope=scope, batch_buckets=(1, 4),
                                                       graph_factory=FakeGraph)
    kw = dict(steps=3, height=8, width=8, progress=False)
    for seeds, guidance in (([1, 2, 3], 3.5), ([4], 2.0), ([5, 6, 7], 5.0)):
        inputs = _tiny_inputs(len(seeds), seed=seeds[0])
        want = eager.generate(seeds=seeds, guidance=guidance, **inputs, **kw)
        assert rel_err(graphed.generate(seeds=seeds, guidance=guidance, **inputs, **kw), want) <= 1e-5


def test_engine_requests_equal_their_solo_runs():
    pipe = fastdiff.load("arch:tiny-flux")
    inputs = _tiny_inputs(3, seed=7)
    kw = dict(steps=2, height=8, width=8)
    with fastdiff.Engine(pipe, max_batch=4, max_wait_ms=50) as engine:
        futures = [engine.submit(seed=10 + i, guidance=2.5 + i, **{k: v[i] for k, v in inputs.items()}, **kw)
                   for i in range(3)]
        results = [f.result(timeout=60) for f in futures]
        batches = engine.stats()["batch_size_hist"]
    assert batches.get(3) == 1  # three strengths, one batch: guidance is a per-request row
    for i in range(3):
        solo = pipe.generate(seeds=[10 + i], guidance=2.5 + i, **{k: v[i:i + 1] for k, v in inputs.items()},
                             progress=False, **kw)
        assert rel_err(results[i], solo[0]) <= 1e-5


@pytest.mark.parametrize("cfg_folded", [False, True])
def test_onnx_export_and_onnxruntime_backend(tmp_path, cfg_folded):
    pytest.importorskip("onnxruntime", reason="ONNX Runtime runs the exported graph")
    from fastdiff.export.onnx import export_onnx

    pipe = fastdiff.load("arch:tiny-flux")
    res = export_onnx(pipe, None, str(tmp_path / "flux.onnx"), cfg_folded=cfg_folded, dynamic_hw=True, batch=2,
                      height=8, width=8, progress=False)
    names = [n for n, _ in res.io["inputs"]]
    assert names == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "guidance"] + (
        ["uncond_encoder_hidden_states", "uncond_text_embeds", "guidance_scale"] if cfg_folded else [])
    assert res.max_rel_err is not None and res.max_rel_err <= 1e-4
    if not cfg_folded:
        ort = fastdiff.load("arch:tiny-flux").optimize(backend="onnxruntime")
        kw = dict(seeds=[3, 4], steps=3, height=8, width=8, guidance=4.0, progress=False, **_tiny_inputs(2, seed=5))
        assert rel_err(ort.generate(**kw), pipe.generate(**kw)) <= 1e-4


def test_bench_drives_the_same_diffusers_network_as_flux_pipeline(tmp_path):
    """``fastdiff bench --compare diffusers`` on Flux: the rebuilt diffusers transformer, driven by the bench's loop
    (FluxPipeline's), samples what fastdiff samples from the same initial noise."""
    import json as json_lib
    from types import SimpleNamespace

    from fastdiff.commands.bench_diffusers import _diffusers_flow_sampler, _diffusers_generate, build_diffusers_model
    from fastdiff.commands.bench_inputs import _conditioning
    from test_cli import fastdiff as run_cli

    pipe = fastdiff.load("arch:tiny-flux")
    for p in pipe.model.parameters():
        p.data.normal_(0, 0.05)
    model, note = build_diffusers_model(pipe)
    scheduler, snote = _diffusers_flow_sampler(SimpleNamespace(sampler="euler"), pipe.spec)
    cond = _conditioning(pipe.spec, 1, 1.0, 0, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        packed = _diffusers_generate(model, scheduler, pipe.spec, 1, 4, 1.0, cond, torch.device("cpu"),
                                     torch.float32, seed=3)
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    want = pipe.generate(latents=noise, steps=4, encoder_hidden_states=cond["states"], text_embeds=cond["text_embeds"],
                         progress=False)
    assert note is None and snote is None and rel_err(_unpack(packed, 8, 8), want) <= 1e-5
    r = run_cli("bench", "arch:tiny-flux", "--backends", "eager", "--compare", "diffusers", "--steps", "2", "--repeat",
                "1", "--warmup", "1", "--json", "out.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    d = json_lib.loads((tmp_path / "out.json").read_text())
    assert [(row["impl"], row["status"]) for row in d["compare"]] == [("diffusers", "ok")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flux_matches_diffusers_in_half_precision(dtype):
    """q / k norms are torch.nn.RMSNorm in diffusers' Flux (one rounding, at the end): bit for bit here."""
    ref = _reference(DEV).to(dtype)
    native = Flux(FluxConfig.from_diffusers(dict(ref.config))).to(dtype)
    native.load_state_dict(ref.state_dict(), strict=True)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 8, 8, generator=g).to(dtype)
    ctx, pooled = torch.randn(2, 5, 12, generator=g).to(dtype), torch.randn(2, 10, generator=g).to(dtype)
    t, guidance = torch.tensor([375.0, 842.0]), torch.tensor([3.5, 5.0])
    with torch.no_grad():
        want = _diffusers_call(ref, x, t, ctx, pooled, guidance)
        got = native(x, t, encoder_hidden_states=ctx, text_embeds=pooled, guidance=guidance)
    # diffusers 0.42's Flux attention norms are torch.nn.RMSNorm (what fastdiff follows): bit for bit. Older
    # releases (0.33 checked) used their own RMSNorm (rounding before the weight): equal within half-precision rounding.
    current = isinstance(ref.transformer_blocks[0].attn.norm_q, torch.nn.RMSNorm)
    assert rel_err(got.float(), want.float()) <= (1e-6 if current else 1e-2)


def test_a_schnell_folder_without_a_scheduler_gets_schnells_schedule(tmp_path):
    """schnell (no guidance input) runs at shift 1 with no resolution shift, dev with both."""
    _reference(SCHNELL).save_pretrained(tmp_path / "schnell")
    _reference(DEV).save_pretrained(tmp_path / "dev")
    schnell, dev = fastdiff.load(str(tmp_path / "schnell")), fastdiff.load(str(tmp_path / "dev"))
    assert (schnell.spec.scheduler["shift"], schnell.spec.scheduler["use_dynamic_shifting"]) == (1.0, False)
    assert dev.spec.scheduler["use_dynamic_shifting"] is True
    assert any("schnell" in n for n in schnell.spec.notes)
    # FluxPipeline's own grid: sigmas linspace(1, 1/n, n), unshifted for schnell
    assert schnell.plan(4).sigmas.tolist() == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0], abs=1e-6)


def test_a_scheduler_given_at_load_keeps_flux_pipelines_grid(tmp_path):
    _reference(SCHNELL).save_pretrained(tmp_path)
    pipe = fastdiff.load(str(tmp_path), scheduler={"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 1.0})
    assert pipe.plan(4).sigmas.tolist() == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0], abs=1e-6)


def test_out_channels_equal_to_in_channels_is_the_default():
    ref = _reference(dict(DEV, out_channels=16))
    pipe_cfg = FluxConfig.from_diffusers(dict(ref.config))
    assert pipe_cfg.out_channels is None


def test_every_exported_graph_clamps_to_the_half_range(tmp_path):
    """diffusers clamps fp16 activations after each block; an fp32 graph a TensorRT fp16 engine is built from keeps
    the same clamps."""
    pytest.importorskip("onnxruntime", reason="ONNX Runtime runs the exported graph")
    import onnx

    from fastdiff.export.onnx import export_onnx

    path = str(tmp_path / "flux.onnx")
    export_onnx(fastdiff.load("arch:tiny-flux"), None, path, dtype="fp32", progress=False)
    clips = [n for n in onnx.load(path).graph.node if n.op_type == "Clip"]
    assert len(clips) == 4  # one per block: 2 double, 2 single


# --- Black Forest Labs' single files -------------------------------------------------------------------------------

SINGLE = dict(DEV, attention_head_dim=128, num_attention_heads=1, axes_dims_rope=(16, 56, 56))  # FLUX.1's head dim


def to_bfl_single_file(state: dict, cfg: dict) -> dict:
    """A diffusers Flux state dict in BFL's layout (fused qkv, linear1 = q | k | v | mlp, (shift, scale) out norm)."""
    out = {}

    def put(dst, src):
        for part in ("weight", "bias"):
            out[f"{dst}.{part}"] = state[f"{src}.{part}"]

    def fused(dst, srcs):
        for part in ("weight", "bias"):
            out[f"{dst}.{part}"] = torch.cat([state[f"{s}.{part}"] for s in srcs])

    put("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1")
    put("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2")
    put("vector_in.in_layer", "time_text_embed.text_embedder.linear_1")
    put("vector_in.out_layer", "time_text_embed.text_embedder.linear_2")
    if cfg["guidance_embeds"]:
        put("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1")
        put("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")
    put("txt_in", "context_embedder")
    put("img_in", "x_embedder")
    for i in range(cfg["num_layers"]):
        s, d = f"transformer_blocks.{i}", f"double_blocks.{i}"
        put(f"{d}.img_mod.lin", f"{s}.norm1.linear")
        put(f"{d}.txt_mod.lin", f"{s}.norm1_context.linear")
        fused(f"{d}.img_attn.qkv", [f"{s}.attn.to_q", f"{s}.attn.to_k", f"{s}.attn.to_v"])
        fused(f"{d}.txt_attn.qkv", [f"{s}.attn.add_q_proj", f"{s}.attn.add_k_proj", f"{s}.attn.add_v_proj"])
        for src, dst in (("norm_q", "img_attn.norm.query_norm"), ("norm_k", "img_attn.norm.key_norm"),
                         ("norm_added_q", "txt_attn.norm.query_norm"), ("norm_added_k", "txt_attn.norm.key_norm")):
            out[f"{d}.{dst}.scale"] = state[f"{s}.attn.{src}.weight"]
        put(f"{d}.img_mlp.0", f"{s}.ff.net.0.proj")
        put(f"{d}.img_mlp.2", f"{s}.ff.net.2")
        put(f"{d}.txt_mlp.0", f"{s}.ff_context.net.0.proj")
        put(f"{d}.txt_mlp.2", f"{s}.ff_context.net.2")
        put(f"{d}.img_attn.proj", f"{s}.attn.to_out.0")
        put(f"{d}.txt_attn.proj", f"{s}.attn.to_add_out")
    for i in range(cfg["num_single_layers"]):
        s, d = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        put(f"{d}.modulation.lin", f"{s}.norm.linear")
        fused(f"{d}.linear1", [f"{s}.attn.to_q", f"{s}.attn.to_k", f"{s}.attn.to_v", f"{s}.proj_mlp"])
        out[f"{d}.norm.query_norm.scale"] = state[f"{s}.attn.norm_q.weight"]
        out[f"{d}.norm.key_norm.scale"] = state[f"{s}.attn.norm_k.weight"]
        put(f"{d}.linear2", f"{s}.proj_out")
    put("final_layer.linear", "proj_out")
    for part in ("weight", "bias"):
        scale, shift = state[f"norm_out.linear.{part}"].chunk(2)
        out[f"final_layer.adaLN_modulation.1.{part}"] = torch.cat([shift, scale])
    return out


def _diffusers_bfl_converter(inner_dim: int):
    """diffusers' convert_flux_transformer_checkpoint_to_diffusers, at this width (it hard-codes FLUX.1's 3072)."""
    import inspect

    module = pytest.importorskip("diffusers.loaders.single_file_utils",
                                 reason="diffusers' single-file converter checks the renaming")
    src = inspect.getsource(module.convert_flux_transformer_checkpoint_to_diffusers)
    if "inner_dim = 3072" not in src:
        pytest.skip("this diffusers' Flux converter no longer hard-codes inner_dim = 3072")
    namespace = dict(vars(module))
    exec(src.replace("inner_dim = 3072", f"inner_dim = {inner_dim}"), namespace)
    return namespace["convert_flux_transformer_checkpoint_to_diffusers"]


@pytest.mark.parametrize("cfg", [SINGLE, dict(SINGLE, guidance_embeds=False),
                                 dict(SINGLE, in_channels=48, out_channels=16)], ids=["dev", "schnell", "fill"])
def test_bfl_single_file_matches_diffusers(tmp_path, cfg):
    """dev, schnell and Fill (its input: the latents, then the masked image's latents and the pixel mask)."""
    ref = _reference(cfg)
    single = to_bfl_single_file(ref.state_dict(), cfg)
    back = _diffusers_bfl_converter(128)({"model.diffusion_model." + k: v for k, v in single.items()})
    assert set(back) == set(ref.state_dict()) and all(torch.equal(back[k], v) for k, v in ref.state_dict().items())

    path = str(tmp_path / "flux.safetensors")
    save_file({k: v.contiguous() for k, v in single.items()}, path)
    pipe = fastdiff.load(path)
    fill = "out_channels" in cfg
    assert (pipe.spec.kind, pipe.spec.guidance_input, pipe.spec.scheduler["use_dynamic_shifting"],
            pipe.spec.inpainting) == ("flux", cfg["guidance_embeds"], cfg["guidance_embeds"], fill)
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 6, 8, generator=g), torch.randn(2, 5, 12, generator=g)
    pooled = torch.randn(2, 10, generator=g)
    t = torch.tensor([375.0, 842.0])
    guidance = torch.tensor([3.5, 5.0]) if cfg["guidance_embeds"] else None
    cond = torch.randn(2, 8, 6, 8, generator=g) if fill else None
    with torch.no_grad():
        want = _diffusers_call(ref, x if cond is None else torch.cat([x, cond], 1), t, ctx, pooled, guidance)
        got = pipe.model(x, t, encoder_hidden_states=ctx, text_embeds=pooled, guidance=guidance, image_latents=cond)
    assert rel_err(got, want) <= 1e-5
    # ComfyUI's all-in-one layout: the same keys under model.diffusion_model., a VAE beside them
    comfy = {"model.diffusion_model." + k: v.contiguous() for k, v in single.items()}
    comfy["vae.decoder.conv_in.weight"] = torch.zeros(1)
    save_file(comfy, str(tmp_path / "comfy.safetensors"))
    with torch.no_grad():
        again = fastdiff.load(str(tmp_path / "comfy.safetensors")).model(x, t, encoder_hidden_states=ctx,
                                                                        text_embeds=pooled, guidance=guidance,
                                                                        image_latents=cond)
    assert torch.equal(again, got)
