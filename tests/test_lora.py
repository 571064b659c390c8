"""LoRA (``pipe.load_lora``) against diffusers' ``load_lora_weights`` + ``fuse_lora`` on the same weights: the
diffusers / PEFT format (UNet and text encoder, alphas from the file's metadata or the rank), kohya's format, and
what is refused."""

import copy
import os
import re

import pytest
import torch

import fastdiff
from fastdiff.errors import BadArgumentError, CheckpointError, UnsupportedConfigError
from helpers import diffusers_pipeline, ldm_single_file, lora_state, perturb_, rel_err
from test_prompts import DDIM, PROMPTS, _latents, _save, _unet, diffusers_tokenizer
from tiny_text import clip_encoder, write_clip_tokenizer

diffusers = pytest.importorskip("diffusers", reason="diffusers' load_lora_weights is the reference")
peft = pytest.importorskip("peft", reason="diffusers loads LoRAs through PEFT (the reference only)")

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "time_emb_proj"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def _reference(folder, unet, text_encoder):
    ref = diffusers_pipeline("StableDiffusionPipeline")(
        vae=None, text_encoder=text_encoder, tokenizer=diffusers_tokenizer(write_clip_tokenizer(
            os.path.join(folder, "_tok"))), unet=unet, scheduler=diffusers.DDIMScheduler(**DDIM), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ref


def tiny_pipeline_folder(root: str) -> tuple:
    """A tiny SD pipeline saved in ``root``/pipe, with its diffusers UNet and text encoder (the references')."""
    unet, text_encoder = _unet(16), clip_encoder(16)
    return _save(_reference(root, unet, text_encoder), os.path.join(root, "pipe")), unet, text_encoder


def _adapter(model, targets, r, alpha, seed, **extra):
    """A LoRA state for ``model`` in PEFT's names (random up and down weights on every layer whose name ends in one
    of ``targets``: Linear, or Conv2d with a kxk down and a 1x1 up), and its PEFT config."""
    from peft import LoraConfig

    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, layer in model.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        w = layer.weight
        if w.dim() == 4:
            down, up = (r, w.shape[1], *w.shape[2:]), (w.shape[0], r, 1, 1)
        else:
            down, up = (r, w.shape[1]), (w.shape[0], r)
        state[f"{name}.lora_A.weight"] = torch.randn(down, generator=g) * 0.1
        state[f"{name}.lora_B.weight"] = torch.randn(up, generator=g) * 0.1
    return state, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, **extra)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """(folder of the base pipeline, its UNet, its text encoder, a LoRA folder in diffusers' format)."""
    import inspect

    saver = diffusers.StableDiffusionPipeline.save_lora_weights
    if "unet_lora_adapter_metadata" not in inspect.signature(saver).parameters:
        pytest.skip(f"diffusers {diffusers.__version__} writes no LoRA metadata (the alphas these files carry)")
    folder, unet, text_encoder = tiny_pipeline_folder(str(tmp_path_factory.mktemp("lora")))
    root = os.path.dirname(folder)
    unet_state, unet_config = _adapter(unet, UNET_TARGETS, r=4, alpha=8, seed=1)
    text_state, text_config = _adapter(text_encoder, TEXT_TARGETS, r=2, alpha=3, seed=2,
                                       alpha_pattern={"fc2": 5})
    lora = os.path.join(root, "lora")
    diffusers.StableDiffusionPipeline.save_lora_weights(
        lora, unet_lora_layers=unet_state, text_encoder_lora_layers=text_state,
        unet_lora_adapter_metadata=unet_config.to_dict(), text_encoder_lora_adapter_metadata=text_config.to_dict())
    return folder, unet, text_encoder, lora, unet_state, text_state


def _fused_reference(parts, lora, scale):
    folder, unet, text_encoder = parts[:3]
    ref = _reference(os.path.dirname(folder), copy.deepcopy(unet), copy.deepcopy(text_encoder))
    ref.load_lora_weights(lora)
    ref.fuse_lora(lora_scale=scale)
    return ref


GEN = dict(steps=3, cfg_scale=3.0, progress=False)


def _want(ref, latents):
    return ref(PROMPTS, latents=latents.clone(), num_inference_steps=3, guidance_scale=3.0, height=64, width=64,
               output_type="latent").images


@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_a_diffusers_lora_equals_load_lora_weights_and_fuse_lora(parts, scale):
    """UNet and text-encoder layers (convolutions, projections, the time projection), alphas from the file's PEFT
    metadata (an alpha_pattern entry too)."""
    folder, lora = parts[0], parts[3]
    latents = _latents()
    pipe = fastdiff.load(folder)
    plain = pipe.generate(prompt=PROMPTS, latents=latents, **GEN)
    report = pipe.load_lora(lora, scale=scale)
    assert report == {"network": len(parts[4]) // 2, "text_encoder": len(parts[5]) // 2}
    got = pipe.generate(prompt=PROMPTS, latents=latents, **GEN)
    ref = _fused_reference(parts, lora, scale)
    assert rel_err(got, _want(ref, latents)) <= 1e-5
    assert rel_err(got, plain) > 1e-3  # (the LoRA changed the result)
    # the merged weights themselves equal diffusers' fused ones (PEFT keeps them as <layer>.base_layer.weight)
    for mine, theirs in ((pipe.model, ref.unet), (pipe.prompt_encoder.parts["text_encoder"].encoder, ref.text_encoder)):
        fused = {k.replace(".base_layer.", "."): v for k, v in theirs.state_dict().items() if "lora_" not in k}
        shared = [k for k in mine.state_dict() if k in fused]
        assert len(shared) > 20
        for k in shared:
            assert rel_err(mine.state_dict()[k], fused[k]) <= 1e-6, k
    pipe.unload_lora()  # the weights as they were, bit for bit
    assert torch.equal(pipe.generate(prompt=PROMPTS, latents=latents, **GEN), plain)


@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_a_dora_lora_equals_diffusers_fused_weights(parts, tmp_path, scale):
    """DoRA (PEFT's use_dora: lora_magnitude_vector per output row; linear and conv layers): the merged weights and
    the latents of diffusers' load_lora_weights + fuse_lora(lora_scale=scale); unload puts the weights back."""
    folder, unet = parts[0], parts[1]
    state, config = _adapter(unet, ["to_q", "to_out.0", "conv1", "proj_in"], r=2, alpha=4, seed=3, use_dora=True)
    g = torch.Generator().manual_seed(5)
    for name, layer in unet.named_modules():
        if f"{name}.lora_A.weight" in state:  # magnitudes near each row's norm, so that the rescale shows
            w = layer.weight
            magnitude = w.flatten(1).norm(dim=1) * (1 + 0.3 * torch.randn(w.shape[0], generator=g))
            state[f"{name}.lora_magnitude_vector"] = magnitude if w.dim() == 2 else magnitude.view(1, -1, 1, 1)
    lora = str(tmp_path / "dora")
    diffusers.StableDiffusionPipeline.save_lora_weights(lora, unet_lora_layers=state,
                                                        unet_lora_adapter_metadata=config.to_dict())
    latents = _latents()
    pipe = fastdiff.load(folder)
    plain = pipe.generate(prompt=PROMPTS, latents=latents, **GEN)
    pipe.load_lora(lora, scale=scale)
    ref = _fused_reference(parts, lora, scale)
    fused = {k.replace(".base_layer.", "."): v for k, v in ref.unet.state_dict().items() if "lora_" not in k}
    changed = 0
    for k, v in pipe.model.state_dict().items():
        if k in fused:
            assert rel_err(v, fused[k]) <= 1e-6, k
            changed += not torch.equal(v, unet.state_dict()[k])
    assert changed == len(state) // 3  # (every DoRA layer, nothing else)
    assert rel_err(pipe.generate(prompt=PROMPTS, latents=latents, **GEN), _want(ref, latents)) <= 1e-5
    pipe.unload_lora()
    assert torch.equal(pipe.generate(prompt=PROMPTS, latents=latents, **GEN), plain)


def test_without_metadata_the_alpha_is_the_rank(parts, tmp_path):
    """A file with no lora_adapter_metadata (and no .alpha keys): scale 1 per layer, as diffusers reads it."""
    from safetensors.torch import save_file

    state = {"unet." + k: v.contiguous() for k, v in parts[4].items()}
    path = str(tmp_path / "plain.safetensors")
    save_file(state, path)
    latents = _latents()
    pipe = fastdiff.load(parts[0])
    pipe.load_lora(path)
    assert rel_err(pipe.generate(prompt=PROMPTS, latents=latents, **GEN),
                   _want(_fused_reference(parts, path, 1.0), latents)) <= 1e-5


def _kohya(state: dict, prefix: str, alpha: float) -> dict:
    """A PEFT state in kohya's names: lora_unet_<module with underscores>.lora_down / lora_up / alpha."""
    out = {}
    for key, value in state.items():
        module, which = key.rsplit(".", 2)[0], key.rsplit(".", 2)[1]
        name = f"{prefix}_{module.replace('.', '_')}"
        out[f"{name}.{'lora_down' if which == 'lora_A' else 'lora_up'}.weight"] = value
        out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


def test_a_kohya_lora_equals_the_same_layers_in_diffusers_format(parts):
    folder, lora, unet_state, text_state = parts[0], parts[3], parts[4], parts[5]
    kohya = {**_kohya(unet_state, "lora_unet", 8.0), **_kohya(text_state, "lora_te", 3.0)}
    latents = _latents()
    a, b = fastdiff.load(folder), fastdiff.load(folder)
    a.load_lora(kohya, scale=0.8)
    peft_state = {**{"unet." + k: v for k, v in unet_state.items()},
                  **{"text_encoder." + k: v for k, v in text_state.items()},
                  **{f"unet.{k.rsplit('.', 2)[0]}.alpha": torch.tensor(8.0) for k in unet_state},
                  **{f"text_encoder.{k.rsplit('.', 2)[0]}.alpha": torch.tensor(3.0) for k in text_state}}
    b.load_lora(peft_state, scale=0.8)
    assert torch.equal(a.generate(prompt=PROMPTS, latents=latents, **GEN),
                       b.generate(prompt=PROMPTS, latents=latents, **GEN))


def _peft_name(key: str) -> str:
    """A key of diffusers' converted kohya state in PEFT's names (its attention layers come in the old
    attention-processor names, which diffusers renames the same way when it loads them)."""
    key = re.sub(r"\.processor\.to_out_lora\.", ".to_out.0.lora.", key)
    key = re.sub(r"\.processor\.(to_[qkv])_lora\.", r".\1.lora.", key)
    key = key.replace(".lora.down.weight.alpha", ".alpha")  # (an attention layer's alpha)
    return key.replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B.")


SDXL_LIKE = {  # small UNets with SDXL's layouts: the base (no attention at the top level) and the refiner (4 levels)
    "base": dict(block_out_channels=(32, 64, 64), layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 attention_head_dim=[1, 1, 2], transformer_layers_per_block=[1, 1, 2],
                 projection_class_embeddings_input_dim=32 + 6 * 8),
    "refiner": dict(block_out_channels=(32, 64, 64, 32), layers_per_block=1,
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                    attention_head_dim=1, transformer_layers_per_block=2, mid_block_type="UNetMidBlock2DCrossAttn",
                    projection_class_embeddings_input_dim=32 + 5 * 8),
}


@pytest.mark.parametrize("name", sorted(SDXL_LIKE))
def test_a_kohya_sdxl_lora_in_ldm_names_merges_where_the_single_file_layout_puts_it(tmp_path, name):
    """kohya's SDXL files name the UNet's layers in the original ldm layout (``input_blocks_4_1_...``). Every layer's
    update must land on the layer the single-file layout names so (the tests' renaming, which
    ``test_ldm_sdxl`` checks against diffusers' single-file converter), with its own alpha; and where diffusers'
    kohya converter (``lora_state_dict`` with the UNet's config) maps the file, on the same layers."""
    cfg = dict(sample_size=8, in_channels=4, out_channels=4, cross_attention_dim=32, use_linear_projection=True,
               norm_num_groups=32, addition_embed_type="text_time", addition_time_embed_dim=8, **SDXL_LIKE[name])
    torch.manual_seed(0)
    unet = perturb_(diffusers.UNet2DConditionModel(**cfg).eval(), 0)
    unet.save_pretrained(tmp_path)
    state = unet.state_dict()
    native = {id(v): k for k, v in state.items()}
    g = torch.Generator().manual_seed(0)
    kohya, peft = {}, {}
    for key, w in ldm_single_file(state, cfg).items():  # every layer with a matrix or a kernel
        if key.endswith(".weight") and w.dim() >= 2:
            layer = "lora_unet_" + key[len("model.diffusion_model."):-len(".weight")].replace(".", "_")
            module = "unet." + native[id(w)][:-len(".weight")]
            down = torch.randn(2, *w.shape[1:], generator=g) * 0.1
            up = torch.randn(w.shape[0], 2, *[1] * (w.dim() - 2), generator=g) * 0.1
            alpha = torch.tensor(float(1 + len(kohya) % 3))  # alphas differ between layers
            kohya.update({f"{layer}.lora_down.weight": down, f"{layer}.lora_up.weight": up, f"{layer}.alpha": alpha})
            peft.update({f"{module}.lora_A.weight": down, f"{module}.lora_B.weight": up, f"{module}.alpha": alpha})
    a, b = fastdiff.load(str(tmp_path)), fastdiff.load(str(tmp_path))
    assert a.load_lora(kohya, scale=0.7) == b.load_lora(peft, scale=0.7) == {"network": len(kohya) // 3}
    mine, theirs = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in mine.items())
    changed = [k for k, v in mine.items() if k in state and not torch.equal(v, state[k])]
    assert len(changed) == len(kohya) // 3

    # (the blocks' layers only: before 0.35 diffusers' converter cannot parse input_blocks_0_0, time_embed_0, ...)
    in_blocks = re.compile(r"lora_unet_(input_blocks_(?!0_)|middle_block_|output_blocks_)")
    converted, alphas = diffusers_pipeline("StableDiffusionXLPipeline").lora_state_dict(
        {k: v for k, v in kohya.items() if in_blocks.match(k)}, unet_config=unet.config)
    converted = {_peft_name(k): v for k, v in converted.items()}
    converted.update({_peft_name(k): torch.tensor(v) for k, v in alphas.items()})
    # diffusers' converter takes an output block's second entry for attention, so the upsampler of a level without
    # attention (the refiner's lowest) lands on a missing layer there: those keys are left out of the comparison
    wrong = {k for k in converted if ".attentions." in k and ".conv." in k}
    assert bool(wrong) == (name == "refiner")
    expected = {k: v for k, v in peft.items() if not (name == "refiner" and "up_blocks.0.upsamplers." in k)
                and re.match(r"unet\.(down_blocks|mid_block|up_blocks)\.", k)}
    assert set(converted) - wrong == set(expected)
    assert all(torch.equal(converted[k], v) for k, v in expected.items())


def test_loras_add_up_and_survive_a_new_precision(parts):
    """Two loads at 0.5 are one at 1.0 (to float rounding); the text encoders, read again in another precision,
    keep the merged LoRA."""
    folder, lora = parts[0], parts[3]
    latents = _latents()
    once, twice = fastdiff.load(folder), fastdiff.load(folder)
    once.load_lora(lora)
    twice.load_lora(lora, scale=0.5)
    twice.load_lora(lora, scale=0.5)
    assert rel_err(twice.generate(prompt=PROMPTS, latents=latents, **GEN),
                   once.generate(prompt=PROMPTS, latents=latents, **GEN)) <= 1e-5
    states = once.encode_prompt(PROMPTS)["encoder_hidden_states"]
    once.optimize(dtype="bf16")
    assert rel_err(once.encode_prompt(PROMPTS)["encoder_hidden_states"].float(), states) <= 2e-2


@pytest.mark.parametrize("scope", ["step", "loop"])
def test_captured_graphs_run_the_merged_weights(parts, scope):
    """The merge writes in place: a graph captured before it replays with the LoRA, nothing recaptured."""
    from test_graph_scopes import FakeGraph

    folder, lora = parts[0], parts[3]
    eager = fastdiff.load(folder)
    graphed = fastdiff.load(folder).optimize(cuda_graphs=True, graph_scope=scope, batch_buckets=(2,),
                                             graph_factory=FakeGraph)
    kw = dict(prompt=PROMPTS, latents=_latents(), **GEN)
    graphed.generate(**kw)
    for pipe in (eager, graphed):
        pipe.load_lora(lora, scale=0.7)
    assert rel_err(graphed.generate(**kw), eager.generate(**kw)) <= 1e-6
    if scope == "loop":
        assert graphed.loop_graphs.captures == 1


def test_what_load_lora_refuses(parts, tmp_path):
    from safetensors.torch import save_file

    folder, lora, unet_state = parts[0], parts[3], parts[4]
    pipe = fastdiff.load(folder)
    before = {k: v.clone() for k, v in pipe.model.state_dict().items()}
    first = next(iter(unet_state))
    module = first.rsplit(".", 2)[0]
    bad = {"unet." + k: v for k, v in unet_state.items()}
    bad[f"unet.{module}.lora_B.weight"] = torch.zeros(3, 4)  # the wrong shape, after good layers
    with pytest.raises(CheckpointError, match="LoRA: an update of"):
        pipe.load_lora(bad)
    assert all(torch.equal(v, before[k]) for k, v in pipe.model.state_dict().items())  # nothing merged
    cases = [
        ({"unet.down_blocks.9.attn.to_q.lora_A.weight": torch.zeros(2, 4),
          "unet.down_blocks.9.attn.to_q.lora_B.weight": torch.zeros(4, 2)}, CheckpointError,
         "the network has no layer 'down_blocks.9.attn.to_q'"),
        ({"lora_unet_input_blocks_40_1_proj_in.lora_down.weight": torch.zeros(2, 4),
          "lora_unet_input_blocks_40_1_proj_in.lora_up.weight": torch.zeros(4, 2)}, CheckpointError,
         "the network has no layer 'input_blocks_40_1_proj_in'$"),
        ({f"unet.{module}.lora_A.weight": unet_state[first]}, CheckpointError, "lora_B.weight missing"),
        ({"vae.decoder.conv_in.lora_A.weight": torch.zeros(2, 4)}, UnsupportedConfigError, "LoRA key"),
        ({"lora_unet_x.hada_w1_a": torch.zeros(2, 4)}, CheckpointError, "a LoHa layer without hada_w1_b"),
        ({"lora_unet_x.lora_down.weight": torch.zeros(2, 4), "lora_unet_x.lora_up.weight": torch.zeros(4, 2),
          "lora_unet_x.lora_extra.weight": torch.zeros(1)}, UnsupportedConfigError, "lora_unet_x.lora_extra.weight"),
        ({"lora_unet_x.lora_down.weight": torch.zeros(2, 4)}, CheckpointError, "lora_up.weight missing"),
    ]
    for state, error, match in cases:
        with pytest.raises(error, match=match):
            pipe.load_lora(state)
    (tmp_path / "lora.bin").write_bytes(b"\x80\x04not safetensors")
    with pytest.raises(UnsupportedConfigError, match="safetensors"):
        pipe.load_lora(str(tmp_path / "lora.bin"))
    with pytest.raises(BadArgumentError, match="expected a .safetensors file or a folder"):
        pipe.load_lora(str(tmp_path / "missing"))
    dora_state, dora_config = _adapter(parts[1], ["to_q"], r=2, alpha=2, seed=3, use_dora=True)
    diffusers.StableDiffusionPipeline.save_lora_weights(str(tmp_path / "dora"), unet_lora_layers=dora_state,
                                                        unet_lora_adapter_metadata=dora_config.to_dict())
    with pytest.raises(CheckpointError, match="use_dora is set and its lora_magnitude_vector is missing"):
        pipe.load_lora(str(tmp_path / "dora"))
    kohya = "lora_unet_" + module.replace(".", "_")
    kohya_dora = {f"{kohya}.lora_down.weight": unet_state[f"{module}.lora_A.weight"],
                  f"{kohya}.lora_up.weight": unet_state[f"{module}.lora_B.weight"], f"{kohya}.dora_scale": torch.ones(3)}
    with pytest.raises(CheckpointError, match="dora_scale \\(3,\\) for a weight of"):  # (LyCORIS's DoRA: its shape)
        pipe.load_lora(kohya_dora)
    pipe.load_lora(lora)
    with pytest.raises(BadArgumentError, match="save\\(\\): the text encoders carry a merged LoRA"):
        pipe.save(str(tmp_path / "saved"))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(UnsupportedConfigError, match="LoRA key"):
        pipe.load_lora(str(tmp_path / "x.safetensors"))


def test_a_pipeline_without_text_encoders_merges_the_network_and_says_what_it_skipped(parts):
    folder, lora = parts[0], parts[3]
    pipe = fastdiff.load(folder, text_encoder=False)
    with pytest.warns(UserWarning, match="skipped: this pipeline encodes no prompts"):
        report = pipe.load_lora(lora)
    assert report == {"network": len(parts[4]) // 2, "skipped": ["text_encoder"]}


def test_cli_generate_merges_loras(parts, tmp_path):
    from safetensors.torch import load_file

    from test_cli import fastdiff as run_cli

    folder, lora = parts[0], parts[3]
    r = run_cli("generate", folder, "--prompt", "a red cat", "--lora", f"{lora}:0.6", "--n", "1", "--steps", "2",
                "--seed", "3", "--output-latents", "lat.safetensors", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    pipe = fastdiff.load(folder)
    pipe.load_lora(lora, scale=0.6)
    want = pipe.generate(1, prompt="a red cat", steps=2, seed=3, progress=False)
    assert torch.equal(load_file(str(tmp_path / "lat.safetensors"))["latents"], want)
    r = run_cli("generate", folder, "--prompt", "a cat", "--lora", "missing.safetensors", "--output-latents",
                "x.safetensors", cwd=tmp_path)
    assert r.returncode == 2 and "--lora: expected a LoRA file" in r.stderr and "Traceback" not in r.stderr


def test_a_flux_transformer_lora_equals_diffusers_fused_weights(tmp_path):
    """``transformer.`` keys reach FLUX.1's layers (fastdiff's Flux keeps diffusers' names), with per-layer alphas."""
    from helpers import perturb_

    flux = perturb_(diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=True, axes_dims_rope=(2, 2, 4)).eval(), 0)
    state, _ = _adapter(flux, ["to_q", "to_k", "to_v", "to_out.0", "proj_mlp", "ff.net.2", "norm1.linear"], r=2,
                        alpha=4, seed=5)
    alphas = {f"transformer.{k.rsplit('.', 2)[0]}": 4.0 for k in state}
    ref = copy.deepcopy(flux)
    ref.load_lora_adapter({"transformer." + k: v for k, v in state.items()}, prefix="transformer", adapter_name="a",
                          network_alphas=alphas)
    ref.fuse_lora(lora_scale=0.5)
    fused = {k.replace(".base_layer.", "."): v for k, v in ref.state_dict().items() if "lora_" not in k}
    flux.save_pretrained(tmp_path)
    pipe = fastdiff.load(str(tmp_path))
    report = pipe.load_lora({**{"transformer." + k: v for k, v in state.items()},
                             **{k + ".alpha": torch.tensor(v) for k, v in alphas.items()}}, scale=0.5)
    assert report == {"network": len(state) // 2}
    mine = pipe.model.state_dict()
    changed = [k for k in mine if k in fused and not torch.equal(fused[k], flux.state_dict()[k])]
    assert len(changed) == len(state) // 2
    for k in (k for k in mine if k in fused):
        assert rel_err(mine[k], fused[k]) <= 1e-6, k


def test_stacked_projections_take_the_merge():
    """With fuse_qkv / fuse_conditioning a layer's weight is a view of its group's stack: the in-place merge
    reaches the stacked matmul (equal to the unstacked model with the same LoRA), and an exported backend, which
    holds its own weights, is refused."""
    eager = fastdiff.load("arch:tiny-sd-unet")
    fused = fastdiff.load("arch:tiny-sd-unet").optimize(fuse_qkv=True, fuse_conditioning=True)
    assert any(name.endswith("qkv_weight") for name, _ in fused.model.named_buffers())
    g = torch.Generator().manual_seed(1)
    states = torch.randn(2, 2, 77, eager.spec.cross_attention_dim, generator=g)
    kw = dict(seeds=[1, 2], steps=3, cfg_scale=2.0, encoder_hidden_states=states[0],
              negative_encoder_hidden_states=states[1], progress=False)
    before = fused.generate(**kw)
    state = lora_state(eager.model)
    assert eager.load_lora(state, scale=0.8) == fused.load_lora(state, scale=0.8) == {"network": len(state) // 2}
    after = fused.generate(**kw)
    assert rel_err(after, eager.generate(**kw)) <= 1e-6 and rel_err(after, before) > 1e-3
    pytest.importorskip("onnxruntime", reason="the onnxruntime backend")
    exported = fastdiff.load("arch:tiny-sd-unet").optimize(backend="onnxruntime")
    with pytest.raises(BadArgumentError, match="exported onnxruntime graph, which holds its own copy"):
        exported.load_lora(state)


def test_malformed_loras_are_refused_by_name_and_merge_nothing(tmp_path):
    """From a review: a transposed update of the weight's element count was reshaped and merged; a NaN LoRA merged
    (and the save then did not load back); a 1-D matrix, two alphas or a header that is not an object were raw
    IndexError / ValueError / AttributeError."""
    import json

    from safetensors.torch import save_file

    pipe = fastdiff.load("arch:tiny-sd-unet")
    name = "time_embedding.linear_1"
    out_f, in_f = pipe.model.get_submodule(name).weight.shape  # (128, 32)
    before = {k: v.clone() for k, v in pipe.model.state_dict().items()}
    peft = {f"unet.{name}.lora_A.weight": torch.randn(2, in_f), f"unet.{name}.lora_B.weight": torch.randn(out_f, 2)}
    kohya = {"lora_unet_time_embedding_linear_1.lora_down.weight": peft[f"unet.{name}.lora_A.weight"],
             "lora_unet_time_embedding_linear_1.lora_up.weight": peft[f"unet.{name}.lora_B.weight"]}
    nan = peft[f"unet.{name}.lora_A.weight"].clone()
    nan[0, 0] = float("nan")
    cases = [
        ({f"unet.{name}.lora_A.weight": torch.randn(2, out_f), f"unet.{name}.lora_B.weight": torch.randn(in_f, 2)},
         r"an update of \(32, 128\) .* for a weight of \(128, 32\)"),
        ({**peft, f"unet.{name}.lora_B.weight": torch.randn(out_f)}, "expected up .out, rank. and down"),
        ({**peft, f"unet.{name}.lora_A.weight": nan}, "LoRA: expected finite weights"),
        ({**peft, f"unet.{name}.alpha": torch.tensor([1.0, 2.0])}, r"alpha: expected one number"),
        ({**peft, f"unet.{name}.alpha": torch.tensor(float("inf"))}, "LoRA: expected finite weights"),
        ({**kohya, "lora_unet_time_embedding_linear_1.alpha": torch.tensor([1.0, 2.0])}, "expected one number"),
    ]
    for state, match in cases:
        with pytest.raises(CheckpointError, match=match):
            pipe.load_lora(state)
    for metadata, match in (("[1, 2]", "expected a JSON object, found list"),
                            (json.dumps({"unet.lora_alpha": "two"}), "lora_alpha: expected one number")):
        save_file(peft, str(tmp_path / "lora.safetensors"), metadata={"lora_adapter_metadata": metadata})
        with pytest.raises(CheckpointError, match=match):
            pipe.load_lora(str(tmp_path / "lora.safetensors"))
    assert all(torch.equal(v, before[k]) for k, v in pipe.model.state_dict().items())  # nothing merged
    w0 = pipe.model.get_submodule(name).weight.detach().clone()
    assert pipe.load_lora(peft)["network"] == 1  # the well-formed one merges
    w1 = pipe.model.get_submodule(name).weight.detach().clone()
    # a 1x1-convolution-shaped LoRA on a linear weight (older sd-scripts files) merges as its linear form does
    assert pipe.load_lora({k: v[..., None, None] for k, v in peft.items()})["network"] == 1
    w2 = pipe.model.get_submodule(name).weight.detach()
    assert (w1 - w0).abs().max() > 1e-3 and torch.allclose(w2 - w1, w1 - w0, atol=1e-6)
