"""IP-Adapter (``pipe.load_ip_adapter``) against diffusers' ``load_ip_adapter`` on the same tiny SD pipeline, a
tiny CLIP vision encoder and random adapter weights; in captured loops; refused where it cannot run."""

import os

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff.errors import BadArgumentError, StateDictMismatchError
from helpers import rel_err
from test_graph_scopes import FakeGraph
from test_prompts import sd_pipelines

diffusers = pytest.importorskip("diffusers", reason="diffusers' load_ip_adapter is the reference")
transformers = pytest.importorskip("transformers", reason="the image encoder is transformers' CLIP vision model")

EMBED = 10  # the image encoder's projection width


def _adapter(folder: str, unet, seed: int = 7, image_encoder: bool = True) -> str:
    """An IP-Adapter folder as h94/IP-Adapter lays one out: ``ip.safetensors`` (image_proj.* / ip_adapter.* keys,
    random) and ``image_encoder/`` (a tiny CLIPVisionModelWithProjection)."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    weights = {"image_proj.proj.weight": torch.randn(4 * cross, EMBED, generator=g) * 0.3,
               "image_proj.proj.bias": torch.randn(4 * cross, generator=g) * 0.1,
               "image_proj.norm.weight": 1 + torch.randn(cross, generator=g) * 0.1,
               "image_proj.norm.bias": torch.randn(cross, generator=g) * 0.1}
    names = [n for n in unet.attn_processors if not n.endswith("attn1.processor")]  # diffusers' order
    for i, name in enumerate(names):
        block = name.split(".")
        inner = dict(unet.named_modules())[".".join(block[:-1])].to_k.out_features
        for kv in "kv":
            weights[f"ip_adapter.{2 * i + 1}.to_{kv}_ip.weight"] = torch.randn(inner, cross, generator=g) * 0.3
    save_file(weights, os.path.join(folder, "ip.safetensors"))
    if image_encoder:
        config = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                               num_attention_heads=2, image_size=32, patch_size=8,
                                               projection_dim=EMBED)
        torch.manual_seed(seed)
        transformers.CLIPVisionModelWithProjection(config).eval().save_pretrained(
            os.path.join(folder, "image_encoder"))
    return folder


def _plus_adapter(folder: str, unet, seed: int = 8, depth: int = 4, queries: int = 4) -> str:
    """An IP-Adapter Plus folder in h94's layout: the resampler (``image_proj.latents``, ``proj_in``, ``proj_out``,
    ``norm_out``, ``layers.i.0`` attention with a fused ``to_kv``, ``layers.i.1`` feed-forward; one 64-wide head,
    hidden width 16), the same cross-attention branches as the base adapter, its encoder's hidden width 16."""
    from safetensors.torch import load_file, save_file

    _adapter(folder, unet, seed)
    base = load_file(os.path.join(folder, "ip.safetensors"))
    g = torch.Generator().manual_seed(seed + 1)
    cross, hidden, inner = unet.config.cross_attention_dim, 16, 64

    def rand(*shape, scale=0.3):
        return torch.randn(*shape, generator=g) * scale

    weights = {k: v for k, v in base.items() if k.startswith("ip_adapter.")}
    weights.update({"image_proj.latents": rand(1, queries, hidden, scale=1.0), "image_proj.proj_in.weight": rand(
        hidden, 16), "image_proj.proj_in.bias": rand(hidden, scale=0.1), "image_proj.proj_out.weight": rand(
        cross, hidden), "image_proj.proj_out.bias": rand(cross, scale=0.1), "image_proj.norm_out.weight": 1 + rand(
        cross, scale=0.1), "image_proj.norm_out.bias": rand(cross, scale=0.1)})
    for i in range(depth):
        p = f"image_proj.layers.{i}."
        weights.update({p + "0.norm1.weight": 1 + rand(hidden, scale=0.1), p + "0.norm1.bias": rand(hidden, scale=0.1),
                        p + "0.norm2.weight": 1 + rand(hidden, scale=0.1), p + "0.norm2.bias": rand(hidden, scale=0.1),
                        p + "0.to_q.weight": rand(inner, hidden), p + "0.to_kv.weight": rand(2 * inner, hidden),
                        p + "0.to_out.weight": rand(hidden, inner), p + "1.0.weight": 1 + rand(hidden, scale=0.1),
                        p + "1.0.bias": rand(hidden, scale=0.1), p + "1.1.weight": rand(4 * hidden, hidden),
                        p + "1.3.weight": rand(hidden, 4 * hidden)})
    save_file(weights, os.path.join(folder, "plus.safetensors"))
    return folder


def _image(seed=5, size=40):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size + 8, 3), dtype=np.uint8))


def _latents(b=2, seed=3):
    return torch.randn(b, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("ip"))
    ref, pipe = sd_pipelines(folder)
    adapter = _adapter(os.path.join(folder, "adapter"), ref.unet)
    return ref, pipe, adapter


@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_ip_adapter_equals_diffusers(pair, cfg):
    """The image prompt through diffusers' own loader and pipeline, and through fastdiff's: the same latents, at two
    scales; the image reaches the result; unload restores the plain run."""
    ref, pipe, adapter = pair
    prompt, image = "a photo of a red cat", _image()
    kw = dict(num_inference_steps=3, guidance_scale=cfg, output_type="latent", num_images_per_prompt=2)
    plain = pipe.generate(prompt=prompt, latents=_latents(), steps=3, cfg_scale=cfg, progress=False)
    ref.load_ip_adapter(adapter, subfolder="", weight_name="ip.safetensors", image_encoder_folder="image_encoder")
    pipe.load_ip_adapter(adapter, weight_name="ip.safetensors")
    try:
        for scale in (1.0, 0.6):
            ref.set_ip_adapter_scale(scale)
            pipe.set_ip_adapter_scale(scale)
            want = ref(prompt, latents=_latents(), ip_adapter_image=image, **kw).images
            got = pipe.generate(prompt=prompt, latents=_latents(), steps=3, cfg_scale=cfg, ip_adapter_image=image,
                                progress=False)
            assert rel_err(got, want) <= 1e-5 and rel_err(got, plain) > 1e-3
        other = pipe.generate(prompt=prompt, latents=_latents(), steps=3, cfg_scale=cfg, progress=False,
                              ip_adapter_image=_image(seed=9))
        assert rel_err(other, got) > 1e-4
        # embeddings given directly, one per sample: the same as the image's for every sample
        embeds, _ = pipe._encode_ip_image(image)
        same = pipe.generate(prompt=prompt, latents=_latents(), steps=3, cfg_scale=cfg, progress=False,
                             ip_adapter_image_embeds=torch.cat([embeds, embeds])[:, None])
        assert rel_err(same, got) <= 1e-6
    finally:
        ref.unload_ip_adapter()
        pipe.unload_ip_adapter()
    assert torch.equal(pipe.generate(prompt=prompt, latents=_latents(), steps=3, cfg_scale=cfg, progress=False),
                       plain)


def test_sdxl_ip_adapter_equals_diffusers(tmp_path):
    """SDXL (ip-adapter_sdxl's layout): the same image branch on every cross-attention of its deeper blocks."""
    from test_prompts import _save, _sdxl_pipe

    ref = _sdxl_pipe(str(tmp_path))
    pipe = fastdiff.load(_save(ref, str(tmp_path / "pipe")))
    adapter = _adapter(str(tmp_path / "adapter"), ref.unet)
    ref.load_ip_adapter(adapter, subfolder="", weight_name="ip.safetensors", image_encoder_folder="image_encoder")
    pipe.load_ip_adapter(adapter, weight_name="ip.safetensors", scale=0.8)
    ref.set_ip_adapter_scale(0.8)
    want = ref("a red cat", latents=_latents(), num_inference_steps=3, guidance_scale=4.0, height=64, width=64,
               output_type="latent", num_images_per_prompt=2, ip_adapter_image=_image()).images
    got = pipe.generate(prompt="a red cat", latents=_latents(), steps=3, cfg_scale=4.0, ip_adapter_image=_image(),
                        progress=False)
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("scale", [{"up": {"block_0": [0.0, 1.0]}},  # InstantStyle's "style only" shape
                                   {"down": 0.7, "mid": [0.4], "up": {"block_0": [1.5]}},
                                   [{"down": {"block_1": [2.0]}, "up": 0.5}]])
def test_per_block_scales_equal_diffusers(pair, scale):
    """InstantStyle's per-block dicts (diffusers' grammar: parts and blocks left out get 0, a list of one fills a
    block): every layer's scale as diffusers sets its processor's, and the same latents as diffusers' pipeline."""
    from fastdiff.models import ip_adapter

    ref, pipe, adapter = pair
    prompt, image = "a photo of a red cat", _image()
    ref.load_ip_adapter(adapter, subfolder="", weight_name="ip.safetensors", image_encoder_folder="image_encoder")
    pipe.load_ip_adapter(adapter, weight_name="ip.safetensors")
    try:
        uniform = pipe.generate(prompt=prompt, latents=_latents(), steps=3, cfg_scale=4.0, ip_adapter_image=image,
                                progress=False)
        ref.set_ip_adapter_scale(scale)
        pipe.set_ip_adapter_scale(scale)
        want_scales = [p.scale[0] for n, p in ref.unet.attn_processors.items() if not n.endswith("attn1.processor")]
        assert ip_adapter.scales(pipe.model) == pytest.approx(want_scales) and len(set(want_scales)) > 1
        want = ref(prompt, latents=_latents(), ip_adapter_image=image, num_inference_steps=3, guidance_scale=4.0,
                   output_type="latent", num_images_per_prompt=2).images
        got = pipe.generate(prompt=prompt, latents=_latents(), steps=3, cfg_scale=4.0, ip_adapter_image=image,
                            progress=False)
        assert rel_err(got, want) <= 1e-5 and rel_err(got, uniform) > 1e-4
    finally:
        ref.unload_ip_adapter()
        pipe.unload_ip_adapter()


def test_per_block_scales_that_do_not_fit_are_refused_and_change_nothing(pair):
    """Blocks without attention layers (diffusers ignores them silently), unknown parts, wrong list lengths, nested
    lists and NaN: one clear error each, the scales as they were; at load, before the adapter is attached."""
    from fastdiff.models import ip_adapter

    ref, pipe, adapter = pair
    with pytest.raises(BadArgumentError, match=r"\['block_0'\] name no down block .*\['block_1'\]"):
        pipe.load_ip_adapter(adapter, weight_name="ip.safetensors", scale={"down": {"block_0": 1.0}})
    assert not ip_adapter.attached(pipe.model)
    pipe.load_ip_adapter(adapter, weight_name="ip.safetensors", scale=0.25)
    try:
        for bad, match in [({"up": {"block_1": 1.0}}, r"name no up block with attention layers"),
                           ({"middle": 1.0}, r"keys 'down', 'mid' and 'up'.*\['middle'\]"),
                           ({"up": {"block_0": [1.0, 0.0, 1.0]}}, r"a list of 2 \(one per attention layer"),
                           ({"mid": [1.0, 2.0]}, r"scale\['mid'\]: expected a number or a list of 1"),
                           ({"up": {"block_0": [[1.0], [0.0]]}}, r"expected numbers"),
                           ({"down": float("nan")}, r"expected a finite number"),
                           ([{"up": 1.0}, 0.5], r"one IP-Adapter is loaded")]:
            with pytest.raises(BadArgumentError, match=match):
                pipe.set_ip_adapter_scale(bad)
            assert ip_adapter.scales(pipe.model) == [0.25] * 4
    finally:
        pipe.unload_ip_adapter()


def test_ip_adapter_in_a_captured_loop_takes_a_new_scale_without_recapture(tmp_path):
    ref, eager = sd_pipelines(str(tmp_path))
    adapter = _adapter(str(tmp_path / "adapter"), ref.unet)
    graphed = fastdiff.load(str(tmp_path / "pipe")).optimize(cuda_graphs=True, graph_scope="loop",
                                                            batch_buckets=(2,), graph_factory=FakeGraph)
    for p in (eager, graphed):
        p.load_ip_adapter(adapter, weight_name="ip.safetensors")
    kw = dict(prompt="a red cat", seeds=[1, 2], steps=3, cfg_scale=3.0, ip_adapter_image=_image(), progress=False)
    first = graphed.generate(**kw)
    assert rel_err(first, eager.generate(**kw)) <= 1e-5
    captured = graphed.loop_graphs.captures
    for p in (eager, graphed):
        p.set_ip_adapter_scale(0.3)
    second = graphed.generate(**kw)
    assert graphed.loop_graphs.captures == captured == 1 and rel_err(second, first) > 1e-4
    assert rel_err(second, eager.generate(**kw)) <= 1e-5
    for p in (eager, graphed):  # InstantStyle's per-block scales: the same buffers, per layer
        p.set_ip_adapter_scale({"up": {"block_0": [0.0, 1.0]}})
    third = graphed.generate(**kw)
    assert graphed.loop_graphs.captures == 1 and rel_err(third, second) > 1e-4
    assert rel_err(third, eager.generate(**kw)) <= 1e-5


def test_ip_adapter_refusals(pair, tmp_path):
    ref, pipe, adapter = pair
    with pytest.raises(BadArgumentError, match="IP-Adapter drives a text UNet"):
        fastdiff.load("arch:tiny-dit").load_ip_adapter(adapter, weight_name="ip.safetensors")
    with pytest.raises(BadArgumentError, match="no IP-Adapter is loaded"):
        pipe.generate(prompt="a cat", steps=1, ip_adapter_image=_image(), progress=False)
    with pytest.raises(BadArgumentError, match="no IP-Adapter is loaded"):
        pipe.set_ip_adapter_scale(0.5)
    with pytest.raises(BadArgumentError, match="expected weight_name="):
        open(os.path.join(adapter, "other.bin"), "wb").close()
        try:
            pipe.load_ip_adapter(adapter)
        finally:
            os.remove(os.path.join(adapter, "other.bin"))
    with pytest.raises(BadArgumentError, match="expected the image encoder"):
        pipe.load_ip_adapter(adapter, weight_name="ip.safetensors", image_encoder_folder="missing")
    other = _adapter(str(tmp_path / "wide"), ref.unet)
    from safetensors.torch import load_file, save_file

    state = load_file(os.path.join(other, "ip.safetensors"))
    face = {k: v for k, v in state.items() if not k.startswith("image_proj.")}
    face.update({"image_proj.proj.0.weight": torch.zeros(8, 10), "image_proj.norm.weight": torch.ones(16)})
    save_file(face, os.path.join(other, "face.safetensors"))
    with pytest.raises(BadArgumentError, match=r"an IP-Adapter of another kind"):
        pipe.load_ip_adapter(other, weight_name="face.safetensors")
    state.pop("ip_adapter.3.to_k_ip.weight")
    save_file(state, os.path.join(other, "short.safetensors"))
    with pytest.raises(StateDictMismatchError, match="1 missing key.*3.to_k_ip.weight"):
        pipe.load_ip_adapter(other, weight_name="short.safetensors")
    assert pipe.model.ip_projection is None  # nothing attached by the refused loads

    pipe.load_ip_adapter(adapter, weight_name="ip.safetensors", image_encoder_folder=None)
    try:
        with pytest.raises(BadArgumentError, match="expected an image .* found none"):
            pipe.generate(prompt="a cat", steps=1, progress=False)
        with pytest.raises(BadArgumentError, match="without an image encoder"):
            pipe.generate(prompt="a cat", steps=1, ip_adapter_image=_image(), progress=False)
        with pytest.raises(BadArgumentError, match="expected \\(1 or 2 samples, N >= 1 images, \\.\\.\\., 10\\)"):
            pipe.generate(prompt="a cat", seeds=[1, 2], steps=1, progress=False,
                          ip_adapter_image_embeds=torch.zeros(3, 1, EMBED))
        with pytest.raises(BadArgumentError, match="found \\(1, 1, 7\\)"):
            pipe.generate(prompt="a cat", steps=1, progress=False, ip_adapter_image_embeds=torch.zeros(1, 1, 7))
        with pytest.raises(BadArgumentError, match="an IP-Adapter is loaded"):
            pipe.save(str(tmp_path / "saved"))
    finally:
        pipe.unload_ip_adapter()


def test_ip_adapter_with_a_controlnet_equals_diffusers(tmp_path):
    """With a ControlNet: the image prompt reaches the UNet, the ControlNet reads the text alone (diffusers'
    StableDiffusionControlNetPipeline with load_ip_adapter)."""
    from PIL import Image

    from test_controlnet import _controlnet, _image as control_image, _reference
    from test_prompts import DDIM, _save, _unet

    unet, controlnet = _unet(16), _controlnet()
    sd = diffusers.StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet,
                                           scheduler=diffusers.DDIMScheduler(**DDIM), safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)
    folder = _save(sd, str(tmp_path / "pipe"))
    controlnet.save_pretrained(str(tmp_path / "cn"))
    adapter = _adapter(str(tmp_path / "adapter"), unet)
    ref = _reference((folder, None, unet, controlnet), diffusers.DDIMScheduler(**DDIM))
    ref.load_ip_adapter(adapter, subfolder="", weight_name="ip.safetensors", image_encoder_folder="image_encoder")
    pipe = fastdiff.load(folder).set_controlnet(str(tmp_path / "cn"))
    pipe.load_ip_adapter(adapter, weight_name="ip.safetensors")
    g = torch.Generator().manual_seed(5)
    cond, uncond = torch.randn(1, 7, 16, generator=g), torch.randn(1, 7, 16, generator=g)
    control = Image.fromarray(control_image())
    want = ref(prompt_embeds=cond, negative_prompt_embeds=uncond, image=control, latents=_latents(),
               num_inference_steps=3, guidance_scale=3.0, output_type="latent", num_images_per_prompt=2,
               ip_adapter_image=_image()).images
    got = pipe.generate(encoder_hidden_states=cond.expand(2, -1, -1), negative_encoder_hidden_states=uncond.expand(
        2, -1, -1), control_image=control, latents=_latents(), steps=3, cfg_scale=3.0, ip_adapter_image=_image(),
        progress=False)
    assert rel_err(got, want) <= 1e-5


def test_cli_generate_with_an_ip_adapter(pair, tmp_path):
    from safetensors.torch import load_file

    from test_cli import fastdiff as run_cli

    ref, pipe, adapter = pair
    _image().save(tmp_path / "prompt.png")
    root = os.path.dirname(adapter)
    r = run_cli("generate", os.path.join(root, "pipe"), "--prompt", "a red cat", "--cfg", "3", "--steps", "2",
                "--n", "1", "--ip-adapter", os.path.join(adapter, "ip.safetensors"), "--ip-adapter-image",
                "prompt.png", "--ip-adapter-scale", "0.5", "--output-latents", "lat.safetensors", "--no-progress",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    api = fastdiff.load(os.path.join(root, "pipe"))
    api.load_ip_adapter(os.path.join(adapter, "ip.safetensors"), scale=0.5)
    from PIL import Image

    want = api.generate(prompt="a red cat", cfg_scale=3, steps=2, seeds=[0], progress=False,
                        ip_adapter_image=Image.open(tmp_path / "prompt.png"))
    assert torch.equal(load_file(str(tmp_path / "lat.safetensors"))["latents"], want)
    style = '{"up": {"block_0": [0.0, 1.0]}}'  # InstantStyle's per-block scales as JSON
    r = run_cli("generate", os.path.join(root, "pipe"), "--prompt", "a red cat", "--cfg", "3", "--steps", "2",
                "--n", "1", "--ip-adapter", os.path.join(adapter, "ip.safetensors"), "--ip-adapter-image",
                "prompt.png", "--ip-adapter-scale", style, "--output-latents", "style.safetensors", "--no-progress",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    api.set_ip_adapter_scale({"up": {"block_0": [0.0, 1.0]}})
    styled = api.generate(prompt="a red cat", cfg_scale=3, steps=2, seeds=[0], progress=False,
                          ip_adapter_image=Image.open(tmp_path / "prompt.png"))
    assert torch.equal(load_file(str(tmp_path / "style.safetensors"))["latents"], styled)
    assert rel_err(styled, want) > 1e-4
    r = run_cli("generate", os.path.join(root, "pipe"), "--prompt", "a red cat", "--steps", "1", "--ip-adapter-image",
                "prompt.png", "--output-latents", "x.safetensors", "--no-progress", cwd=tmp_path)
    assert r.returncode == 2 and "no --ip-adapter FILE" in r.stderr
    for flags, message in ((["--ip-adapter-scale", "0.3"], "--ip-adapter-scale: given, but no --ip-adapter FILE"),
                           (["--ip-adapter", os.path.join(adapter, "ip.safetensors")],
                            "--ip-adapter: expected --ip-adapter-image"),
                           (["--ip-adapter-scale", "{up: 1}"], "expected a number, or JSON"),
                           (["--ip-adapter", os.path.join(adapter, "ip.safetensors"), "--ip-adapter-image",
                             "prompt.png", "--ip-adapter-scale", '{"up": {"block_1": 1}}'],
                            "name no up block with attention layers")):
        r = run_cli("generate", os.path.join(root, "pipe"), "--prompt", "a red cat", "--steps", "1", *flags,
                    "--output-latents", "x.safetensors", "--no-progress", cwd=tmp_path)
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_the_image_encoder_follows_the_networks_precision(tmp_path):
    ref, pipe = sd_pipelines(str(tmp_path))
    pipe.load_ip_adapter(_adapter(str(tmp_path / "adapter"), ref.unet), weight_name="ip.safetensors")
    pipe.optimize(dtype="bf16")
    assert next(pipe.image_encoder.parameters()).dtype == torch.bfloat16
    got = pipe.generate(prompt="a red cat", steps=1, ip_adapter_image=_image(), progress=False)
    assert torch.isfinite(got).all()


def engine_equals_solo_runs(pipe, **image_prompt) -> dict:
    """Three Engine requests with one image prompt equal their solo runs; the Engine's stats."""
    with fastdiff.Engine(pipe, max_batch=4, max_wait_ms=50) as engine:
        futures = [engine.submit(seed=s, prompt="a red cat", steps=2, cfg_scale=3.0, **image_prompt)
                   for s in (4, 5, 6)]
        results = [f.result(timeout=120) for f in futures]
    for s, got in zip((4, 5, 6), results):
        want = pipe.generate(seeds=[s], prompt="a red cat", steps=2, cfg_scale=3.0, progress=False,
                             **image_prompt)[0]
        assert rel_err(got, want) <= 1e-5
    return engine.stats()


def test_the_engine_serves_an_image_prompt(pair):
    """Engine requests with an image prompt (one image object: one batch) equal their solo runs."""
    ref, pipe, adapter = pair
    pipe.load_ip_adapter(adapter, weight_name="ip.safetensors")
    try:
        engine_equals_solo_runs(pipe, ip_adapter_image=_image())
    finally:
        pipe.unload_ip_adapter()


def test_ip_adapter_review_fixes(pair, tmp_path):
    """diffusers' argument order and list forms (scale [s], embeddings [negative; positive] under guidance, a list of
    pixel tensors fed to the encoder as they are); the encoder's width checked at load; a state dict keeps the loaded
    encoder; palette images keyed by what they show."""
    from PIL import Image

    from fastdiff.utils.keys import freeze

    ref, pipe, adapter = pair
    root = os.path.dirname(adapter)
    pipe.load_ip_adapter(root, "adapter", "ip.safetensors")  # (path, subfolder, weight_name), as diffusers
    ref.load_ip_adapter(root, "adapter", "ip.safetensors")
    try:
        ref.set_ip_adapter_scale([0.7])
        pipe.set_ip_adapter_scale([0.7])
        g = torch.Generator().manual_seed(1)
        embeds = [torch.randn(2, 1, EMBED, generator=g)]  # diffusers' form: [negative, positive]
        kw = dict(num_inference_steps=2, guidance_scale=3.0, output_type="latent", num_images_per_prompt=2)
        want = ref("a red cat", latents=_latents(), ip_adapter_image_embeds=embeds, **kw).images
        got = pipe.generate(prompt="a red cat", latents=_latents(), steps=2, cfg_scale=3.0,
                            ip_adapter_image_embeds=embeds, progress=False)
        assert rel_err(got, want) <= 1e-5
        pixels = torch.rand(3, 32, 32, generator=g)
        want = ref("a red cat", latents=_latents(), ip_adapter_image=[pixels[None]], **kw).images
        got = pipe.generate(prompt="a red cat", latents=_latents(), steps=2, cfg_scale=3.0,
                            ip_adapter_image=[pixels], progress=False)
        assert rel_err(got, want) <= 1e-5
        with pytest.raises(BadArgumentError, match="found a list of both"):
            pipe.generate(prompt="a red cat", steps=1, ip_adapter_image=[pixels, _image()], progress=False)
        with pytest.raises(BadArgumentError, match="N >= 1 images"):
            pipe.generate(prompt="a red cat", steps=1, ip_adapter_image_embeds=torch.zeros(1, 0, EMBED),
                          progress=False)
        from safetensors.torch import load_file

        state = load_file(os.path.join(adapter, "ip.safetensors"))
        pipe.load_ip_adapter(state)  # a state dict: the encoder loaded before stays
        assert pipe.image_encoder is not None
    finally:
        ref.unload_ip_adapter()
        pipe.unload_ip_adapter()
    other = _adapter(str(tmp_path / "other"), ref.unet)
    config = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=8, projection_dim=12)
    transformers.CLIPVisionModelWithProjection(config).save_pretrained(os.path.join(other, "image_encoder"))
    with pytest.raises(BadArgumentError, match="makes 12-wide embeddings and the adapter projects 10-wide"):
        pipe.load_ip_adapter(other, weight_name="ip.safetensors")
    a = Image.new("P", (4, 4))
    b = a.copy()
    a.putpalette([255, 0, 0] * 256)
    b.putpalette([0, 0, 255] * 256)
    assert freeze(a) != freeze(b) and freeze(a) == freeze(a.copy())


@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_ip_adapter_plus_equals_diffusers(tmp_path, cfg):
    """IP-Adapter Plus: the resampler over the encoder's penultimate hidden states, the unconditional pass on a black
    image's (diffusers' encode_image with output_hidden_states)."""
    ref, pipe = sd_pipelines(str(tmp_path))
    adapter = _plus_adapter(str(tmp_path / "adapter"), ref.unet)
    ref.load_ip_adapter(adapter, subfolder="", weight_name="plus.safetensors", image_encoder_folder="image_encoder")
    pipe.load_ip_adapter(adapter, weight_name="plus.safetensors")
    kw = dict(num_inference_steps=3, guidance_scale=cfg, output_type="latent", num_images_per_prompt=2)
    want = ref("a red cat", latents=_latents(), ip_adapter_image=_image(), **kw).images
    got = pipe.generate(prompt="a red cat", latents=_latents(), steps=3, cfg_scale=cfg, ip_adapter_image=_image(),
                        progress=False)
    assert rel_err(got, want) <= 1e-5
    plain = fastdiff.load(str(tmp_path / "pipe")).generate(prompt="a red cat", latents=_latents(), steps=3,
                                                           cfg_scale=cfg, progress=False)
    assert rel_err(got, plain) > 1e-3


def test_ip_adapter_plus_features_and_malformed_files(tmp_path):
    """Plus given its hidden states directly: the unconditional pass reads a black image's, as the image's run does;
    malformed projection weights and a scale list of two are one clear line each."""
    from safetensors.torch import load_file, save_file

    from fastdiff.errors import CheckpointError

    ref, pipe = sd_pipelines(str(tmp_path))
    adapter = _plus_adapter(str(tmp_path / "adapter"), ref.unet)
    pipe.load_ip_adapter(adapter, weight_name="plus.safetensors")
    kw = dict(prompt="a red cat", latents=_latents(), steps=2, cfg_scale=4.0, progress=False)
    states, _ = pipe._encode_ip_image(_image())
    calls = []
    pipe.image_encoder.register_forward_hook(lambda module, args, out: calls.append(1))
    direct = pipe.generate(ip_adapter_image_embeds=states, **kw)
    assert len(calls) == 1  # the black image's states
    assert rel_err(direct, pipe.generate(ip_adapter_image=_image(), **kw)) <= 1e-6
    before = len(calls)
    assert torch.equal(pipe.generate(ip_adapter_image_embeds=states, **kw), direct)
    assert len(calls) == before  # cached: no encoder pass for the second run
    with pytest.raises(BadArgumentError, match="a per-block dict or a list of 1 \\(one per adapter\\), found 2 values"):
        pipe.set_ip_adapter_scale([0.4, 0.5])
    with pytest.raises(BadArgumentError, match=r"expected \(2B, N, S, E\)"):
        pipe.generate(ip_adapter_image_embeds=[states], **kw)
    state = load_file(os.path.join(adapter, "plus.safetensors"))
    for change in ({"image_proj.latents": torch.zeros(4, 16)}, {"image_proj.layers.0.1.1.weight": None},
                   {"image_proj.layers.a.0.to_q.weight": torch.zeros(64, 16)}):
        broken = {k: v for k, v in state.items() if change.get(k, 1) is not None}
        broken.update({k: v for k, v in change.items() if v is not None})
        save_file(broken, os.path.join(adapter, "broken.safetensors"))
        with pytest.raises(CheckpointError, match="IP-Adapter: malformed image_proj weights") as e:
            pipe.load_ip_adapter(adapter, weight_name="broken.safetensors")
        assert "\n" not in str(e.value)


def _full_face_adapter(folder: str, unet, seed: int = 12) -> str:
    """An IP-Adapter Full Face file (ip-adapter-full-face_sd15's layout: image_proj.proj.0 / .2 Linear layers and
    .3 LayerNorm over the encoder's 16-wide hidden states), beside the base adapter's folder and encoder."""
    from safetensors.torch import load_file, save_file

    _adapter(folder, unet, seed)
    g = torch.Generator().manual_seed(seed + 1)
    cross, hidden = unet.config.cross_attention_dim, 16
    weights = {k: v for k, v in load_file(os.path.join(folder, "ip.safetensors")).items()
               if k.startswith("ip_adapter.")}
    weights.update({"image_proj.proj.0.weight": torch.randn(hidden, hidden, generator=g) * 0.3,
                    "image_proj.proj.0.bias": torch.randn(hidden, generator=g) * 0.1,
                    "image_proj.proj.2.weight": torch.randn(cross, hidden, generator=g) * 0.3,
                    "image_proj.proj.2.bias": torch.randn(cross, generator=g) * 0.1,
                    "image_proj.proj.3.weight": 1 + torch.randn(cross, generator=g) * 0.1,
                    "image_proj.proj.3.bias": torch.randn(cross, generator=g) * 0.1})
    save_file(weights, os.path.join(folder, "full.safetensors"))
    return folder


@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_ip_adapter_full_face_equals_diffusers(tmp_path, cfg):
    """IP-Adapter Full Face: every hidden state of the image (17 tokens here) through its MLP; the unconditional
    pass on a black image's states, as diffusers' encode_image gives it."""
    ref, pipe = sd_pipelines(str(tmp_path))
    folder = _full_face_adapter(str(tmp_path / "full"), ref.unet)
    ref.load_ip_adapter(folder, subfolder="", weight_name="full.safetensors", image_encoder_folder="image_encoder")
    pipe.load_ip_adapter(folder, weight_name="full.safetensors", scale=0.7)
    ref.set_ip_adapter_scale(0.7)
    kw = dict(num_inference_steps=3, guidance_scale=cfg, output_type="latent", num_images_per_prompt=2)
    want = ref("a red cat", latents=_latents(), ip_adapter_image=_image(), **kw).images
    got = pipe.generate(prompt="a red cat", latents=_latents(), steps=3, cfg_scale=cfg, ip_adapter_image=_image(),
                        progress=False)
    assert rel_err(got, want) <= 1e-5
    pipe.set_ip_adapter_scale(0.0)  # (the image prompt's share is in the result)
    plain = pipe.generate(prompt="a red cat", latents=_latents(), steps=3, cfg_scale=cfg, ip_adapter_image=_image(),
                          progress=False)
    assert rel_err(plain, got) > 1e-4
