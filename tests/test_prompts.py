"""generate(prompt=...): a pipeline folder's own tokenizers and text encoders, used as diffusers' SD, SDXL, SD3 and
FLUX.1 pipelines use them, checked against those pipelines end to end (tiny random models, same latents)."""

import json
import os

import pytest
import torch

import fastdiff
from fastdiff.errors import BackendUnavailableError, BadArgumentError, CheckpointError
from helpers import diffusers_pipeline, perturb_, rel_err
from tiny_text import clip_encoder, t5_encoder, write_clip_tokenizer, write_t5_tokenizer

diffusers = pytest.importorskip("diffusers", reason="diffusers' pipelines are the reference")
pytest.importorskip("transformers", reason="the text encoders are transformers' classes")

PROMPTS = ["a photo of a red cat", "the dog and the cat"]
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
DDIM = dict(SCHEDULER, clip_sample=False, set_alpha_to_one=False)


def _unet(cross, **extra):
    torch.manual_seed(0)
    config = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=cross,
                  attention_head_dim=4, norm_num_groups=8, **extra)
    return perturb_(diffusers.UNet2DConditionModel(**config).eval(), 0)


def _save(pipe, folder: str, **index) -> str:
    """The pipeline's folder as diffusers writes it (save_pretrained), plus model_index.json entries."""
    pipe.save_pretrained(folder)
    if index:
        path = os.path.join(folder, "model_index.json")
        with open(path) as f:
            config = json.load(f)
        with open(path, "w") as f:
            json.dump({**config, **index}, f)
    return folder


def _latents(b=2, channels=4, size=8, seed=3):
    return torch.randn(b, channels, size, size, generator=torch.Generator().manual_seed(seed))


# --- Stable Diffusion 1.x / 2.x --------------------------------------------------------------------------------
def sd_pipelines(folder: str):
    """(diffusers' StableDiffusionPipeline, fastdiff's pipeline of its saved folder, ``folder``/pipe): a tiny SD 1.x
    with its CLIP tokenizer and text encoder."""
    tok = write_clip_tokenizer(os.path.join(folder, "_tok"))
    ref = diffusers_pipeline("StableDiffusionPipeline")(
        vae=None, text_encoder=clip_encoder(16), tokenizer=diffusers_tokenizer(tok), unet=_unet(16),
        scheduler=diffusers.DDIMScheduler(**DDIM), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ref, fastdiff.load(_save(ref, os.path.join(folder, "pipe")))


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return sd_pipelines(str(tmp_path_factory.mktemp("sd")))


def diffusers_tokenizer(folder):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(folder)


def test_sd_prompt_embeddings_equal_diffusers(sd):
    ref, pipe = sd
    want, want_neg = ref.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=["dog", "red"])
    got = pipe.encode_prompt(PROMPTS, ["dog", "red"], guided=True)
    assert torch.equal(got["encoder_hidden_states"], want)
    assert torch.equal(got["negative_encoder_hidden_states"], want_neg)
    assert "text_embeds" not in got


def test_sd_clip_skip_reads_an_earlier_layer_through_the_final_norm(sd):
    """diffusers' StableDiffusionPipeline clip_skip, transcribed (its own line reads text_encoder.text_model, which
    transformers 5 removed, so the pipeline itself cannot run it there)."""
    ref, pipe = sd
    ids = ref.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    enc = ref.text_encoder
    hidden = enc(ids, output_hidden_states=True).hidden_states
    norm = getattr(enc, "text_model", enc).final_layer_norm
    got = pipe.encode_prompt(PROMPTS, clip_skip=1)["encoder_hidden_states"]
    assert torch.equal(got, norm(hidden[-2]))
    assert not torch.allclose(got, pipe.encode_prompt(PROMPTS)["encoder_hidden_states"])


@pytest.mark.parametrize("cfg, negative", [(1.0, None), (5.0, None), (5.0, "a dog")])
def test_sd_generate_from_prompts_equals_diffusers_pipeline(sd, cfg, negative):
    ref, pipe = sd
    latents = _latents()
    want = ref(PROMPTS, negative_prompt=negative and [negative] * 2, latents=latents.clone(), num_inference_steps=4,
               guidance_scale=cfg, output_type="latent").images
    got = pipe.generate(prompt=PROMPTS, negative_prompt=negative, latents=latents, steps=4, cfg_scale=cfg,
                        progress=False)
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("negative", [[], 0, ("a", 2)])
def test_encode_prompt_refuses_a_negative_prompt_generate_refuses(sd, negative):
    """([] or 0 read as the empty prompt; generate refused them, encode_prompt encoded "")"""
    _, pipe = sd
    with pytest.raises(BadArgumentError, match="negative_prompt: expected a string or a non-empty list of strings"):
        pipe.encode_prompt("a cat", negative, guided=True)


def test_one_prompt_serves_every_sample(sd):
    _, pipe = sd
    one = pipe.generate(2, prompt="a cat", seed=5, steps=3, cfg_scale=3.0, progress=False)
    both = pipe.generate(2, prompt=["a cat", "a cat"], seed=5, steps=3, cfg_scale=3.0, progress=False)
    other = pipe.generate(2, prompt=["a cat", "a dog"], seed=5, steps=3, cfg_scale=3.0, progress=False)
    assert torch.equal(one, both)
    assert torch.equal(one[0], other[0]) and not torch.allclose(one[1], other[1])
    per_prompt = pipe.generate(prompt=["a cat", "a dog"], seed=5, steps=3, cfg_scale=3.0, progress=False)
    assert torch.equal(per_prompt, other)  # a list of prompts, n left at 1: a sample per prompt (as diffusers)


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt="a cat", encoder_hidden_states=torch.zeros(1, 77, 16)), "not both"),
    (dict(negative_prompt="a dog", encoder_hidden_states=torch.zeros(1, 77, 16)), "not both"),
    (dict(prompt="a cat", negative_prompt="a dog"), "cfg_scale == 1"),
    (dict(prompt=["a", "b", "c"]), "1 or 2 prompts"),
    (dict(prompt=""), None),
    (dict(prompt=[]), "non-empty list"),
    (dict(prompt=3), "string"),
    (dict(prompt="a cat", clip_skip=-1), "clip_skip"),
    (dict(prompt="a cat\ud800"), r"prompt: expected text that UTF-8 can encode, found '\\ud800' .* at character 5"),
    (dict(prompt=["a cat", "\udc00"], cfg_scale=2.0), r"prompt\[1\]: expected text that UTF-8 can encode"),
    (dict(prompt="a cat", negative_prompt=["\udfff"], cfg_scale=2.0), r"negative_prompt\[0\]: expected text that UTF-8"),
])
def test_bad_prompt_arguments_are_refused_by_name(sd, kwargs, match):
    _, pipe = sd
    if match is None:  # the empty prompt is a prompt (diffusers' unconditional one)
        assert pipe.generate(2, steps=2, progress=False, **kwargs).shape == (2, 4, 8, 8)
        return
    with pytest.raises(BadArgumentError, match=match):
        pipe.generate(2, steps=2, progress=False, **kwargs)


def test_text_encoders_load_on_first_prompt_only(sd, tmp_path):
    ref, _ = sd
    folder = _save(ref, str(tmp_path / "pipe"))
    pipe = fastdiff.load(folder)
    assert pipe.prompt_encoder is not None and pipe.prompt_encoder._parts is None
    pipe.generate(prompt="a cat", steps=2, progress=False)
    assert set(pipe.prompt_encoder._parts) == {"text_encoder"}


def test_text_encoder_options_at_load(sd, tmp_path):
    ref, _ = sd
    folder = _save(ref, str(tmp_path / "pipe"))
    assert fastdiff.load(folder, text_encoder=False).prompt_encoder is None
    bare = str(tmp_path / "bare")
    ref.unet.save_pretrained(os.path.join(bare, "unet"))
    ref.scheduler.save_pretrained(os.path.join(bare, "scheduler"))
    pipe = fastdiff.load(bare)
    assert pipe.prompt_encoder is None and any("no text encoders" in n for n in pipe.notes)
    with pytest.raises(BadArgumentError, match="no text encoders"):
        pipe.generate(prompt="a cat", steps=2, progress=False)
    borrowed = fastdiff.load(bare, text_encoder=folder)  # (a single file would borrow them the same way)
    want = fastdiff.load(folder).generate(prompt="a cat", seed=1, steps=2, progress=False)
    assert torch.equal(borrowed.generate(prompt="a cat", seed=1, steps=2, progress=False), want)
    with pytest.raises(CheckpointError, match="lacks the text encoders"):
        fastdiff.load(folder, text_encoder=bare)
    with pytest.raises(BadArgumentError, match="takes no text"):
        fastdiff.load("arch:tiny-dit", text_encoder=folder)
    with pytest.raises(BadArgumentError, match="diffusers pipeline folder"):
        fastdiff.load(folder, text_encoder=str(tmp_path / "missing"))


def test_missing_transformers_is_one_clear_error(sd, tmp_path, monkeypatch):
    import sys

    ref, _ = sd
    pipe = fastdiff.load(_save(ref, str(tmp_path / "pipe")))
    monkeypatch.setitem(sys.modules, "transformers", None)  # "import transformers" raises ImportError
    with pytest.raises(BackendUnavailableError, match="pip install"):
        pipe.generate(prompt="a cat", steps=2, progress=False)


def test_long_prompts_are_truncated_with_a_warning(sd):
    _, pipe = sd
    with pytest.warns(UserWarning, match="truncated"):
        got = pipe.encode_prompt(" ".join(["cat"] * 100))
    assert got["encoder_hidden_states"].shape == (1, 77, 16)


# --- SDXL ------------------------------------------------------------------------------------------------------
POOLED = 10


def _sdxl_pipe(folder, refiner=False):
    tok = write_clip_tokenizer(os.path.join(folder, "_tok"))
    tok2 = write_clip_tokenizer(os.path.join(folder, "_tok2"), pad_token="!")  # (SDXL's second pads with "!")
    unet = _unet(12 if not refiner else 4, addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=POOLED + (5 if refiner else 6) * 8)
    parts = dict(vae=None, text_encoder=None if refiner else clip_encoder(8, seed=1), text_encoder_2=clip_encoder(
        4, projection=POOLED, seed=2), tokenizer=None if refiner else diffusers_tokenizer(tok),
        tokenizer_2=diffusers_tokenizer(tok2), unet=unet, scheduler=diffusers.EulerDiscreteScheduler(**SCHEDULER))
    if refiner:
        pipe = diffusers_pipeline("StableDiffusionXLImg2ImgPipeline")(**parts, requires_aesthetics_score=True,
                                                                      force_zeros_for_empty_prompt=False)
    else:
        pipe = diffusers_pipeline("StableDiffusionXLPipeline")(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("sdxl"))
    ref = _sdxl_pipe(folder)
    return ref, fastdiff.load(_save(ref, os.path.join(folder, "pipe")))


@pytest.mark.parametrize("cfg, negative", [(1.0, None), (4.0, None), (4.0, "a red dog")])
def test_sdxl_generate_from_prompts_equals_diffusers_pipeline(sdxl, cfg, negative):
    """No negative prompt: zero embeddings (force_zeros_for_empty_prompt); a negative prompt is encoded."""
    ref, pipe = sdxl
    latents = _latents()
    want = ref(PROMPTS, negative_prompt=negative and [negative] * 2, latents=latents.clone(), num_inference_steps=4,
               guidance_scale=cfg, height=64, width=64, output_type="latent").images
    got = pipe.generate(prompt=PROMPTS, negative_prompt=negative, latents=latents, steps=4, cfg_scale=cfg,
                        progress=False)
    assert rel_err(got, want) <= 1e-5


def test_sdxl_prompt_embeddings_equal_diffusers(sdxl):
    ref, pipe = sdxl
    want = ref.encode_prompt(PROMPTS, device="cpu", negative_prompt=["a dog"] * 2, clip_skip=1)
    got = pipe.encode_prompt(PROMPTS, "a dog", guided=True, clip_skip=1)
    names = ("encoder_hidden_states", "negative_encoder_hidden_states", "text_embeds", "negative_text_embeds")
    for name, w in zip(names, want):
        assert torch.equal(got[name].expand_as(w), w), name
    assert pipe.prompt_encoder.zero_negative
    zeros = pipe.encode_prompt("a cat", guided=True)
    assert not zeros["negative_encoder_hidden_states"].any() and not zeros["negative_text_embeds"].any()


def test_sdxl_refiner_prompts_use_its_one_encoder(tmp_path):
    ref = _sdxl_pipe(str(tmp_path), refiner=True)
    pipe = fastdiff.load(_save(ref, str(tmp_path / "pipe")))
    assert not pipe.prompt_encoder.zero_negative and pipe.prompt_encoder.parts_present == ["text_encoder_2"]
    want = ref.encode_prompt(PROMPTS, device="cpu")
    got = pipe.encode_prompt(PROMPTS, guided=True)
    names = ("encoder_hidden_states", "negative_encoder_hidden_states", "text_embeds", "negative_text_embeds")
    for name, w in zip(names, want):
        assert torch.equal(got[name].expand_as(w), w), name


# --- SD3 -------------------------------------------------------------------------------------------------------
def _sd3_pipe(folder, t5=True):
    transformer = perturb_(diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=12, out_channels=4,
        pos_embed_max_size=16).eval(), 0)
    toks = [diffusers_tokenizer(write_clip_tokenizer(os.path.join(folder, f"_tok{i}"))) for i in (1, 2)]
    parts = dict(transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None,
                 text_encoder=clip_encoder(4, projection=4, seed=1), tokenizer=toks[0],
                 text_encoder_2=clip_encoder(8, projection=8, seed=2), tokenizer_2=toks[1],
                 text_encoder_3=t5_encoder(16, seed=3) if t5 else None,
                 tokenizer_3=diffusers_tokenizer(write_t5_tokenizer(os.path.join(folder, "_tok3"))) if t5 else None)
    pipe = diffusers_pipeline("StableDiffusion3Pipeline")(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("t5", [True, False])
@pytest.mark.parametrize("cfg", [1.0, 4.5])
def test_sd3_generate_from_prompts_equals_diffusers_pipeline(tmp_path, t5, cfg):
    """Two CLIPs (penultimate layers + both projections) and T5's 256 tokens; without T5, zeros in its place."""
    ref = _sd3_pipe(str(tmp_path), t5=t5)
    if not t5 and ref._get_t5_prompt_embeds("a cat").shape[1] != 256:
        pytest.skip(f"diffusers {diffusers.__version__} puts 77 zero tokens in T5's place (newer versions, and "
                    f"fastdiff, max_sequence_length = 256)")
    pipe = fastdiff.load(_save(ref, str(tmp_path / "pipe")))
    latents = _latents()
    want = ref(PROMPTS, latents=latents.clone(), num_inference_steps=3, guidance_scale=cfg, height=64, width=64,
               output_type="latent").images
    got = pipe.generate(prompt=PROMPTS, latents=latents, steps=3, cfg_scale=cfg, progress=False)
    assert rel_err(got, want) <= 1e-5
    assert pipe.encode_prompt("a cat")["encoder_hidden_states"].shape == (1, 77 + 256, 16)


# --- FLUX.1 ----------------------------------------------------------------------------------------------------
def _flux_pipe(folder):
    transformer = perturb_(diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=True, axes_dims_rope=(2, 2, 4)).eval(), 0)
    tok = diffusers_tokenizer(write_clip_tokenizer(os.path.join(folder, "_tok")))
    tok2 = diffusers_tokenizer(write_t5_tokenizer(os.path.join(folder, "_tok2")))
    ref = diffusers_pipeline("FluxPipeline")(
        transformer=transformer, vae=None,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
        text_encoder=clip_encoder(8, seed=1), tokenizer=tok, text_encoder_2=t5_encoder(16, seed=2), tokenizer_2=tok2)
    ref.set_progress_bar_config(disable=True)
    return ref


def _packed(latents):
    """(B, 4, 8, 8) latents -> FluxPipeline's packed (B, 16, 16) tokens."""
    b = latents.shape[0]
    return latents.reshape(b, 4, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, 16, 16)


def test_flux_generate_from_prompts_equals_diffusers_pipeline(tmp_path):
    """CLIP's pooled output and T5's 512 tokens."""
    ref = _flux_pipe(str(tmp_path))
    pipe = fastdiff.load(_save(ref, str(tmp_path / "pipe")))
    latents = _latents(channels=4, size=8)
    want = ref(PROMPTS, latents=_packed(latents), num_inference_steps=3, guidance_scale=3.5, height=64, width=64,
               output_type="latent").images
    got = pipe.generate(prompt=PROMPTS, latents=latents, steps=3, progress=False)
    assert rel_err(_packed(got), want) <= 1e-5


# --- the CLI ---------------------------------------------------------------------------------------------------
def _cli(*args, cwd):
    import subprocess
    import sys

    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "fastdiff.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_cli_generates_from_a_prompt_as_the_api_does(sd, tmp_path):
    from safetensors.torch import load_file

    ref, _ = sd
    folder = _save(ref, str(tmp_path / "pipe"))
    r = _cli("generate", folder, "--prompt", "a red cat", "--negative-prompt", "a dog", "--cfg", "3", "--n", "2",
             "--steps", "3", "--seed", "7", "--output-latents", "lat.safetensors", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    got = load_file(str(tmp_path / "lat.safetensors"))["latents"]
    want = fastdiff.load(folder).generate(2, prompt="a red cat", negative_prompt="a dog", cfg_scale=3.0, steps=3,
                                          seed=7, progress=False)
    assert torch.equal(got, want)
    # a CFG++ sampler runs the unconditional pass at --cfg 1 too: the negative prompt counts there (and in bench)
    r = _cli("generate", folder, "--prompt", "a red cat", "--negative-prompt", "a dog", "--sampler", "euler_cfg_pp",
             "--n", "1", "--steps", "3", "--seed", "7", "--output-latents", "pp.safetensors", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    want = fastdiff.load(folder).generate(prompt="a red cat", negative_prompt="a dog", sampler="euler_cfg_pp", steps=3,
                                          seed=7, progress=False)
    assert torch.equal(load_file(str(tmp_path / "pp.safetensors"))["latents"], want)
    r = _cli("bench", folder, "--sampler", "euler_cfg_pp", "--steps", "2", "--batch", "1", "--backends", "eager",
             "--repeat", "1", "--warmup", "1", cwd=tmp_path)
    assert r.returncode == 0 and "failed" not in r.stdout + r.stderr, r.stdout + r.stderr


def test_cli_prompt_errors_are_one_line(sd, tmp_path):
    ref, _ = sd
    folder = _save(ref, str(tmp_path / "pipe"))
    out = ("--output-latents", "lat.safetensors")
    r = _cli("generate", folder, *out, cwd=tmp_path)
    assert r.returncode == 2 and "--prompt" in r.stderr and "Traceback" not in r.stderr
    r = _cli("generate", folder, "--text-encoder", "none", "--prompt", "a cat", *out, cwd=tmp_path)
    assert r.returncode == 2 and "--text-encoder FOLDER" in r.stderr
    r = _cli("generate", folder, "--prompt", "a cat", "--negative-prompt", "a dog", *out, cwd=tmp_path)
    assert r.returncode == 2 and "--cfg G" in r.stderr
    r = _cli("generate", "arch:tiny-unet", "--prompt", "a cat", "--steps", "1", cwd=tmp_path)
    assert r.returncode == 2 and "not text-conditioned" in r.stderr


def test_info_names_the_text_encoders(sd, tmp_path):
    ref, _ = sd
    folder = _save(ref, str(tmp_path / "pipe"))
    r = _cli("info", folder, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"{folder} text encoders: sd prompts: text_encoder (CLIPTextModel) (read on the first prompt)" in r.stdout
    r = _cli("info", folder, "--text-encoder", "none", cwd=tmp_path)
    assert "text encoders: none (encoded text only: pass --text-encoder FOLDER for prompts)" in r.stdout


def test_engine_requests_with_prompts_equal_their_solo_runs(sd):
    """Prompts encoded per request (in the submitting threads), batched together, each equal to its solo run."""
    import concurrent.futures

    _, pipe = sd
    requests = [dict(seed=i, prompt=p, negative_prompt=neg, cfg_scale=cfg)
                for i, (p, neg, cfg) in enumerate([("a cat", None, 3.0), ("a red dog", "a cat", 3.0),
                                                    ("the cat", None, 1.0), ("a photo of a dog", None, 3.0)])]
    with fastdiff.Engine(pipe, max_batch=4, max_wait_ms=50) as engine:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = list(pool.map(lambda r: engine.submit(steps=3, **r), requests))
        bad = engine.submit(seed=9, prompt="a cat", encoder_hidden_states=torch.zeros(77, 16), steps=3)
        results = [f.result(timeout=120) for f in futures]
    with pytest.raises(BadArgumentError, match="not both"):
        bad.result(timeout=10)
    for r, got in zip(requests, results):
        want = pipe.generate(seeds=[r["seed"]], prompt=r["prompt"], negative_prompt=r["negative_prompt"],
                             cfg_scale=r["cfg_scale"], steps=3, progress=False)[0]
        assert rel_err(got, want) <= 1e-5


def test_repeated_prompts_come_from_the_cache(sd, monkeypatch):
    """A repeated encode call (an Engine's negative prompt, a prompt resent with another seed) returns the same
    tensors without running CLIP again; other options miss; what a caller writes into its tensors stays its own."""
    from fastdiff.prompts import encoder as encoder_module

    _, pipe = sd
    enc = pipe.prompt_encoder
    enc.cache.clear()
    calls = []
    real = encoder_module.clip_outputs
    monkeypatch.setattr(encoder_module, "clip_outputs", lambda part, prompts, **k: calls.append(prompts) or
                        real(part, prompts, **k))
    first = pipe.encode_prompt("a cat", guided=True)
    assert calls == [["a cat"], [""]]
    again = pipe.encode_prompt("a cat", guided=True)
    other = pipe.encode_prompt("a red dog", guided=True)  # the empty negative prompt from the cache
    assert calls == [["a cat"], [""], ["a red dog"]]
    for name in first:
        assert torch.equal(first[name], again[name]) and first[name].data_ptr() != again[name].data_ptr()
    assert torch.equal(other["negative_encoder_hidden_states"], first["negative_encoder_hidden_states"])
    again["encoder_hidden_states"].fill_(7.0)  # the caller's copy, not the cache's
    assert torch.equal(pipe.encode_prompt("a cat")["encoder_hidden_states"], first["encoder_hidden_states"])
    pipe.encode_prompt("a cat", clip_skip=1)  # another option: encoded again
    assert calls[-1] == ["a cat"] and len(calls) == 4
    layer = enc.parts["text_encoder"].encoder.get_input_embeddings()
    with torch.no_grad():  # weights edited in place: earlier encodings are stale
        layer.weight.mul_(1.5)
        edited = pipe.encode_prompt("a cat")
        layer.weight.div_(1.5)
    assert len(calls) == 5 and not torch.equal(edited["encoder_hidden_states"], first["encoder_hidden_states"])
    # a write through .data bumps no version counter (PEFT's merge_and_unload merges so): the values tell
    weights = [p for p in enc.parts["text_encoder"].encoder.parameters() if p.dim() == 2][1:3]
    saved = [w.detach().clone() for w in weights]
    before = pipe.encode_prompt("a cat")  # (cached at these weights' version counters)
    for w in weights:
        w.data += 0.01 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0))
    merged = pipe.encode_prompt("a cat")
    for w, old in zip(weights, saved):
        w.data.copy_(old)
    assert len(calls) == 7 and not torch.equal(merged["encoder_hidden_states"], before["encoder_hidden_states"])
    long = " ".join(["cat"] * 100)
    for _ in range(2):  # a truncated prompt warns on every call, from the cache too
        with pytest.warns(UserWarning, match="were truncated"):
            pipe.encode_prompt(long)
    assert calls[-1] == [long] and len(calls) == 8  # encoded once: the second call is a hit
    enc.to(dtype=torch.float64)  # another precision: nothing kept from before
    assert len(enc.cache) == 0
    enc.to(dtype=torch.float32)


def test_the_prompt_cache_is_bounded_in_bytes():
    from fastdiff.prompts.cache import EncodingCache

    row = {"encoder_hidden_states": torch.zeros(1, 77, 16)}  # 4928 bytes
    cache = EncodingCache(max_bytes=3 * 4928)
    for i in range(4):
        cache.put(i, row, notes=(f"note {i}",))
    assert len(cache) == 3 and cache.get(0) is None and cache.get(3)[1] == ("note 3",)  # the oldest went first
    cache.get(1)  # now the most recent: 2 goes next
    cache.put(4, row)
    assert cache.get(2) is None and cache.get(1) is not None and cache.nbytes == 3 * 4928
    cache.put("big", {"x": torch.zeros(4 * 4928)})  # larger than the bound: not kept, nothing evicted
    assert cache.get("big") is None and len(cache) == 3
    cache.max_bytes = 4928  # lowered later: the least recently used go at once (1 was used last)
    assert cache.get(1) is not None and len(cache) == 1 and cache.nbytes == 4928
    cache.max_bytes = 0  # and off
    assert cache.get(1) is None and len(cache) == 0 and cache.nbytes == 0
    cache.put(5, row)
    assert len(cache) == 0


def test_a_fastdiff_save_keeps_the_text_encoders(sdxl, tmp_path):
    """pipe.save copies the tokenizer / encoder folders and SDXL's zero-negative flag; the saved pipeline prompts
    the same; one saved without them says so once."""
    _, pipe = sdxl
    saved = fastdiff.load(pipe.save(str(tmp_path / "saved")))
    assert sorted(os.listdir(tmp_path / "saved")) == ["fastdiff.json", "model.safetensors", "text_encoder",
                                                      "text_encoder_2", "tokenizer", "tokenizer_2"]
    assert saved.prompt_encoder.zero_negative and saved.prompt_encoder.family == "sdxl"
    kw = dict(prompt=PROMPTS, seed=2, steps=3, cfg_scale=4.0, progress=False)
    assert torch.equal(saved.generate(**kw), pipe.generate(**kw))
    pipe.save(str(tmp_path / "saved"))  # an earlier save (text folders included) may be replaced
    bare = fastdiff.load(str(tmp_path / "saved"), text_encoder=False)
    again = fastdiff.load(bare.save(str(tmp_path / "bare")))
    assert again.prompt_encoder is None
    assert sum("no text encoders" in n for n in again.notes) == 1


# --- what the review found: precision, variants, bounds, FLUX.1's true CFG, asyncio, wrong folders ----------------
def test_half_precision_encoders_load_as_diffusers_loads_them(tmp_path):
    """load(dtype=fp16) reads the encoders in fp16 as from_pretrained(torch_dtype=...) does: T5 keeps its float32
    ``wo`` layers (an all-fp16 T5 overflows), and the embeddings equal diffusers' fp16 pipeline's."""
    ref = _sd3_pipe(str(tmp_path))
    folder = _save(ref, str(tmp_path / "pipe"))
    pipe = fastdiff.load(folder, dtype=torch.float16)
    half = diffusers_pipeline("StableDiffusion3Pipeline").from_pretrained(folder, torch_dtype=torch.float16, vae=None)
    with torch.no_grad():
        want = half.encode_prompt(PROMPTS, None, None, device="cpu", negative_prompt="a dog")
    got = pipe.encode_prompt(PROMPTS, "a dog", guided=True)
    names = ("encoder_hidden_states", "negative_encoder_hidden_states", "text_embeds", "negative_text_embeds")
    for name, w in zip(names, want):
        assert got[name].dtype == torch.float16 and torch.equal(got[name].expand_as(w), w), name
    t5 = pipe.prompt_encoder.parts["text_encoder_3"].encoder
    assert {p.dtype for n, p in t5.named_parameters() if ".wo." in n} == {torch.float32}
    pipe.optimize(dtype="fp32")  # the encoders follow the network's precision (re-read on their next use)
    assert pipe.encode_prompt("a cat")["encoder_hidden_states"].dtype == torch.float32


def test_a_weight_variant_reaches_the_text_encoders(sd, tmp_path):
    ref, _ = sd
    folder = str(tmp_path / "pipe")
    ref.save_pretrained(folder, variant="fp16")  # (fp32 weights under the variant's file names)
    assert sorted(os.listdir(os.path.join(folder, "text_encoder"))) == ["config.json", "model.fp16.safetensors"]
    pipe = fastdiff.load(folder, variant="fp16")
    want = fastdiff.load(_save(ref, str(tmp_path / "plain"))).generate(prompt="a cat", seed=1, steps=2,
                                                                        progress=False)
    assert torch.equal(pipe.generate(prompt="a cat", seed=1, steps=2, progress=False), want)
    # its fastdiff save keeps the variant's file names, and says so in its header
    saved = fastdiff.load(pipe.save(str(tmp_path / "saved")))
    assert torch.equal(saved.generate(prompt="a cat", seed=1, steps=2, progress=False), want)


def test_text_encoders_borrowed_from_a_fastdiff_save_keep_its_empty_prompt_rule(tmp_path):
    """SDXL's refiner says force_zeros_for_empty_prompt=False; its fastdiff save records that, and so a network
    that borrows the save's encoders (text_encoder=SAVE) encodes no negative as diffusers' "" too, not as zeros."""
    ref = _sdxl_pipe(str(tmp_path), refiner=True)
    folder = _save(ref, str(tmp_path / "pipe"), force_zeros_for_empty_prompt=False)
    saved = fastdiff.load(folder).save(str(tmp_path / "saved"))
    borrowed = fastdiff.load(folder, text_encoder=saved)
    assert borrowed.prompt_encoder.zero_negative is False
    with torch.no_grad():
        want = ref.encode_prompt("a cat", device="cpu")[1]  # diffusers' negative for no negative prompt
    got = borrowed.encode_prompt("a cat", guided=True)["negative_encoder_hidden_states"]
    assert got.any() and torch.equal(got, want)


def test_damaged_text_encoder_weights_are_a_fastdiff_error(sd, tmp_path):
    from fastdiff.errors import CorruptCheckpointError

    ref, _ = sd
    for damage in ("truncated", "garbage"):
        folder = _save(ref, str(tmp_path / damage))
        weights = os.path.join(folder, "text_encoder", "model.safetensors")
        data = open(weights, "rb").read()
        with open(weights, "wb") as f:
            f.write(data[: len(data) // 2] if damage == "truncated" else b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
        with pytest.raises(CorruptCheckpointError, match="text_encoder/'s weights are damaged"):
            fastdiff.load(folder).generate(prompt="a cat", steps=1, progress=False)


def test_two_pipelines_encoding_at_once_leave_the_warning_filters_alone(sd):
    """Encoding collects its truncation warnings per thread. warnings.catch_warnings, which swaps the process's
    filters, left them broken when two pipelines' encodings overlapped: B saved the filters A had changed, A restored
    the originals, then B restored A's. The two encodings are made to overlap so, in that order."""
    import threading
    import warnings

    _, pipe = sd
    pipes = [pipe, fastdiff.load(pipe.prompt_encoder.folder)]
    b_inside, a_done = threading.Event(), threading.Event()
    real = [p.prompt_encoder._encode for p in pipes]

    def encode_a(*args):
        b_inside.wait(10)
        return real[0](*args)

    def encode_b(*args):
        b_inside.set()
        a_done.wait(10)
        return real[1](*args)

    pipes[0].prompt_encoder._encode, pipes[1].prompt_encoder._encode = encode_a, encode_b
    filters, show = list(warnings.filters), warnings.showwarning

    def run_a():
        pipes[0].encode_prompt("a cat, first thread")
        a_done.set()
    threads = [threading.Thread(target=run_a),
               threading.Thread(target=lambda: pipes[1].encode_prompt("a cat, second thread"))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        del pipes[0].prompt_encoder._encode
    assert a_done.is_set() and list(warnings.filters) == filters and warnings.showwarning is show
    with pytest.warns(UserWarning, match="were truncated"):  # and truncation still warns
        pipe.encode_prompt(" ".join(["dog"] * 100))


def test_engine_refuses_a_list_of_negatives_and_text_options_without_a_prompt(sd):
    _, pipe = sd
    with fastdiff.Engine(pipe, max_batch=2, max_wait_ms=5) as engine:
        listed = engine.submit(seed=0, prompt="a cat", negative_prompt=["a dog", "the red cat"], cfg_scale=3.0,
                               steps=2)
        alone = engine.submit(seed=0, encoder_hidden_states=torch.zeros(77, 16), clip_skip=1, steps=2)
        with pytest.raises(BadArgumentError, match="negative_prompt: expected one string per request"):
            listed.result(timeout=10)
        with pytest.raises(BadArgumentError, match="clip_skip: given without prompt="):
            alone.result(timeout=10)
        assert engine.stats()["rejected"] == 2


def test_clip_skip_beyond_the_encoders_depth_fails_its_own_request(sd):
    _, pipe = sd
    with pytest.raises(BadArgumentError, match=r"clip_skip: expected an int in \[0, 3\]"):
        pipe.generate(prompt="a cat", clip_skip=4, steps=2, progress=False)
    assert pipe.generate(prompt="a cat", clip_skip=3, steps=2, progress=False).shape == (1, 4, 8, 8)
    with fastdiff.Engine(pipe, max_batch=2, max_wait_ms=5) as engine:
        bad = engine.submit(seed=0, prompt="a cat", clip_skip=10, steps=2)
        good = engine.submit(seed=0, prompt="a cat", clip_skip=1, steps=2)
        with pytest.raises(BadArgumentError, match="clip_skip"):
            bad.result(timeout=60)
        assert torch.equal(good.result(timeout=60), pipe.generate(prompt="a cat", clip_skip=1, seeds=[0], steps=2,
                                                                  progress=False)[0])


def test_async_requests_encode_their_prompts_off_the_event_loop(sd):
    import asyncio
    import threading

    _, pipe = sd
    threads = []
    encode = pipe.encode_prompt

    def recording(*args, **kwargs):
        threads.append(threading.current_thread())
        return encode(*args, **kwargs)

    async def main(engine):
        return await asyncio.gather(engine.agenerate(seed=1, prompt="a cat", steps=2),
                                    engine.asubmit(seed=2, prompt="a dog", steps=2))
    pipe.encode_prompt = recording
    try:
        with fastdiff.Engine(pipe, max_batch=2, max_wait_ms=20) as engine:
            results = asyncio.run(main(engine))
    finally:
        del pipe.encode_prompt
    assert len(threads) == 2 and threading.main_thread() not in threads
    for seed, prompt, got in ((1, "a cat", results[0]), (2, "a dog", results[1])):
        want = pipe.generate(prompt=prompt, seeds=[seed], steps=2, progress=False)[0]
        assert rel_err(got, want) <= 1e-5


def test_folders_without_a_required_encoder_name_it(tmp_path):
    import shutil

    ref = _sd3_pipe(str(tmp_path))
    folder = _save(ref, str(tmp_path / "pipe"))
    shutil.rmtree(os.path.join(folder, "text_encoder_2"))
    pipe = fastdiff.load(folder)
    assert pipe.prompt_encoder is None
    assert any("missing text_encoder_2/" in n for n in pipe.notes)
    with pytest.raises(BadArgumentError, match="missing text_encoder_2/"):
        pipe.generate(prompt="a cat", steps=2, progress=False)
    with pytest.raises(CheckpointError, match="expected text_encoder_2/"):
        fastdiff.load(folder, text_encoder=folder)


def test_a_borrowed_folder_of_the_wrong_width_is_refused_at_load(sd, sdxl, tmp_path):
    sd_ref, _ = sd
    sdxl_ref, _ = sdxl
    sdxl_folder = _save(sdxl_ref, str(tmp_path / "sdxl"))
    with pytest.raises(CheckpointError, match=r"sd text encoders give text width 8 \(the network takes 16\)"):
        fastdiff.load(_save(sd_ref, str(tmp_path / "sd")), text_encoder=sdxl_folder)


def test_flux_true_cfg_takes_a_negative_prompt_as_flux_pipeline(tmp_path):
    """cfg_scale != 1 on FLUX.1 is FluxPipeline's true_cfg_scale, which runs only with a negative prompt."""
    ref = _flux_pipe(str(tmp_path))
    pipe = fastdiff.load(_save(ref, str(tmp_path / "pipe")))
    if "true_cfg_scale" not in __import__("inspect").signature(ref.__call__).parameters:
        pytest.skip(f"diffusers {diffusers.__version__}'s FluxPipeline has no true_cfg_scale")
    latents = _latents(b=1, channels=4, size=8)
    want = ref("a cat", negative_prompt="a dog", true_cfg_scale=2.0, latents=_packed(latents), num_inference_steps=3,
               height=64, width=64, max_sequence_length=64, output_type="latent").images
    got = pipe.generate(prompt="a cat", negative_prompt="a dog", cfg_scale=2.0, latents=latents, steps=3,
                        max_sequence_length=64, progress=False)
    assert rel_err(_packed(got), want) <= 1e-5
    with pytest.raises(BadArgumentError, match="true classifier-free guidance"):
        pipe.generate(prompt="a cat", cfg_scale=2.0, steps=2, progress=False)
    with pytest.raises(BadArgumentError, match="max_sequence_length: expected an int"):
        pipe.generate(prompt="a cat", max_sequence_length=0, steps=2, progress=False)


# --- prompt_2 / prompt_3: the second and third encoders' texts --------------------------------------------------
SECOND = ["the red dog", "a photo of a cat"]


def test_sdxl_second_prompts_equal_diffusers(sdxl):
    """prompt_2 / negative_prompt_2 reach text_encoder_2 (its states and the pooled projection); an empty prompt_2
    falls back to prompt, as diffusers' ``prompt_2 or prompt``."""
    ref, pipe = sdxl
    want = ref.encode_prompt(PROMPTS, prompt_2=SECOND, device="cpu", negative_prompt=["a dog"] * 2,
                             negative_prompt_2=["photo"] * 2)
    got = pipe.encode_prompt(PROMPTS, "a dog", guided=True, prompt_2=SECOND, negative_prompt_2="photo")
    names = ("encoder_hidden_states", "negative_encoder_hidden_states", "text_embeds", "negative_text_embeds")
    for name, w in zip(names, want):
        assert torch.equal(got[name], w), name
    plain = pipe.encode_prompt(PROMPTS, "a dog", guided=True)
    assert not torch.equal(plain["text_embeds"], got["text_embeds"])  # (the second prompt changed something)
    assert torch.equal(pipe.encode_prompt(PROMPTS, prompt_2="")["text_embeds"], plain["text_embeds"])
    latents = _latents()
    want = ref(PROMPTS, prompt_2=SECOND, negative_prompt=["a dog"] * 2, negative_prompt_2=["photo"] * 2,
               latents=latents.clone(), num_inference_steps=3, guidance_scale=4.0, height=64, width=64,
               output_type="latent").images
    got = pipe.generate(prompt=PROMPTS, prompt_2=SECOND, negative_prompt="a dog", negative_prompt_2="photo",
                        latents=latents, steps=3, cfg_scale=4.0, progress=False)
    assert rel_err(got, want) <= 1e-5


def test_sd3_second_and_third_prompts_equal_diffusers(tmp_path):
    """prompt_2: the second CLIP; prompt_3: T5; negative_prompt_3 alone, with negative_prompt defaulting the rest."""
    ref = _sd3_pipe(str(tmp_path))
    pipe = fastdiff.load(_save(ref, str(tmp_path / "pipe")))
    latents = _latents()
    want = ref(PROMPTS, prompt_2=SECOND, prompt_3=["a dog and a cat"] * 2, negative_prompt=["a red cat"] * 2,
               negative_prompt_3=["the photo"] * 2, latents=latents.clone(), num_inference_steps=3,
               guidance_scale=4.5, height=64, width=64, output_type="latent").images
    got = pipe.generate(prompt=PROMPTS, prompt_2=SECOND, prompt_3="a dog and a cat", negative_prompt="a red cat",
                        negative_prompt_3="the photo", latents=latents, steps=3, cfg_scale=4.5, progress=False)
    assert rel_err(got, want) <= 1e-5
    plain = pipe.generate(prompt=PROMPTS, negative_prompt="a red cat", latents=latents, steps=3, cfg_scale=4.5,
                          progress=False)
    assert rel_err(plain, want) > 5e-5  # (the second and third prompts reach the result)


def test_flux_second_prompt_reaches_t5(tmp_path):
    ref = _flux_pipe(str(tmp_path))
    pipe = fastdiff.load(_save(ref, str(tmp_path / "pipe")))
    latents = _latents(channels=4, size=8)
    want = ref(PROMPTS, prompt_2=SECOND, latents=_packed(latents), num_inference_steps=3, height=64, width=64,
               max_sequence_length=64, output_type="latent").images
    got = pipe.generate(prompt=PROMPTS, prompt_2=SECOND, latents=latents, steps=3, max_sequence_length=64,
                        progress=False)
    assert rel_err(_packed(got), want) <= 1e-5
    with pytest.raises(BadArgumentError, match="negative_prompt_2: given without negative_prompt"):
        pipe.encode_prompt("a cat", guided=True, negative_prompt_2="a dog")
    with pytest.raises(BadArgumentError, match="prompt_3: no text encoder of this flux model reads it"):
        pipe.generate(prompt="a cat", prompt_3="a dog", steps=2, progress=False)


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt_2="a dog"), r"prompt_2: no text encoder of this sd model reads it \(text_encoder reads prompt\)"),
    (dict(negative_prompt_3="a dog", cfg_scale=2.0), "negative_prompt_3: no text encoder"),
    (dict(prompt_2=["a dog"] * 3), "prompt_2: expected 1 or 2 prompts"),
    (dict(prompt_2=7), "prompt_2: expected a string or a non-empty list of strings"),
    (dict(prompt=None, prompt_2="a dog"), "not both and not negative_prompt / prompt_2"),
])
def test_extra_prompts_no_encoder_reads_are_refused(sd, kwargs, match):
    _, pipe = sd
    with pytest.raises(BadArgumentError, match=match):
        pipe.generate(**{"prompt": PROMPTS, **kwargs}, steps=2, progress=False)


def test_sdxl_extra_prompt_rules(sdxl, tmp_path):
    """A negative_prompt_2 where the pipeline zeroes the negative, or runs no unconditional pass, is refused rather
    than ignored; a list of the wrong length is named; a refiner's one encoder reads prompt, so prompt_2 is refused."""
    _, pipe = sdxl
    with pytest.raises(BadArgumentError, match=r"negative_prompt_2: given without negative_prompt, but this SDXL "
                                               r"pipeline zeroes"):
        pipe.encode_prompt(PROMPTS, guided=True, negative_prompt_2="a dog")
    with pytest.raises(BadArgumentError, match="negative_prompt_2: given, but cfg_scale == 1"):
        pipe.encode_prompt(PROMPTS, negative_prompt_2="a dog")
    with pytest.raises(BadArgumentError, match="the lists of the same length.*prompt: 3.*negative_prompt_2: 2"):
        pipe.encode_prompt(PROMPTS + ["a cat"], "a dog", guided=True,
                           negative_prompt_2=["a", "b"])
    with pytest.raises(BadArgumentError, match="encode_prompt\\(\\): unexpected arguments \\['prompt_4'\\]"):
        pipe.encode_prompt("a cat", prompt_4="a dog")
    refiner = fastdiff.load(_save(_sdxl_pipe(str(tmp_path), refiner=True), str(tmp_path / "pipe")))
    with pytest.raises(BadArgumentError, match=r"prompt_2: no text encoder of this sdxl model reads it "
                                               r"\(text_encoder_2 reads prompt\)"):
        refiner.encode_prompt("a cat", prompt_2="a dog")


def test_engine_requests_take_second_prompts(sdxl):
    _, pipe = sdxl
    requests = [dict(seed=0, prompt="a cat", prompt_2="a red dog", cfg_scale=3.0, negative_prompt="a dog",
                     negative_prompt_2="photo"),
                dict(seed=1, prompt="a cat", cfg_scale=3.0), dict(seed=2, prompt="the dog", prompt_2="a cat")]
    with fastdiff.Engine(pipe, max_batch=4, max_wait_ms=50) as engine:
        futures = [engine.submit(steps=2, **r) for r in requests]
        bad = engine.submit(seed=3, prompt="a cat", prompt_2=["a", "b"], steps=2)
        alone = engine.submit(seed=3, encoder_hidden_states=torch.zeros(77, 12), text_embeds=torch.zeros(POOLED),
                              prompt_2="a dog", steps=2)
        results = [f.result(timeout=120) for f in futures]
    with pytest.raises(BadArgumentError, match="prompt_2: expected one string per request"):
        bad.result(timeout=10)
    with pytest.raises(BadArgumentError, match="prompt_2: given without prompt="):
        alone.result(timeout=10)
    for r, got in zip(requests, results):
        want = pipe.generate(seeds=[r.pop("seed")], steps=2, progress=False, **r)[0]
        assert rel_err(got, want) <= 1e-5
    assert rel_err(results[0], pipe.generate(seeds=[0], prompt="a cat", cfg_scale=3.0, negative_prompt="a dog",
                                             steps=2, progress=False)[0]) > 1e-3


def test_cli_takes_second_prompts(sdxl, tmp_path):
    from safetensors.torch import load_file

    ref, pipe = sdxl
    folder = _save(ref, str(tmp_path / "pipe"))
    r = _cli("generate", folder, "--prompt", "a red cat", "--prompt-2", "a dog", "--cfg", "3",
             "--negative-prompt", "photo", "--negative-prompt-2", "the cat", "--n", "1", "--steps", "2",
             "--output-latents", "lat.safetensors", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    want = pipe.generate(1, prompt="a red cat", prompt_2="a dog", negative_prompt="photo",
                         negative_prompt_2="the cat", cfg_scale=3.0, steps=2, seed=0, progress=False)
    assert rel_err(load_file(str(tmp_path / "lat.safetensors"))["latents"], want) <= 1e-6
    r = _cli("generate", folder, "--prompt", "a cat", "--prompt-3", "a dog", "--output-latents", "x.safetensors",
             cwd=tmp_path)
    assert r.returncode == 2 and "prompt_3 (--prompt-3): no text encoder of this sdxl model reads it" in r.stderr
    assert "Traceback" not in r.stderr
