"""Several IP-Adapters at once (diffusers' ``load_ip_adapter`` with lists): against diffusers' pipeline with the same
two adapters (an IP-Adapter Plus and a base adapter of other weights), their images one entry per adapter, a scale
per adapter (InstantStyle's dicts too); in captured step and loop graphs and the Engine; refused where it cannot
run."""

import os

import pytest
import torch

import fastdiff
from fastdiff.errors import BadArgumentError
from helpers import rel_err
from test_graph_scopes import FakeGraph
from test_ip_adapter import diffusers  # noqa: F401 (its skip: diffusers is the reference)
from test_ip_adapter import _adapter, _image, _latents, _plus_adapter, engine_equals_solo_runs
from test_prompts import sd_pipelines

WEIGHTS = ["plus.safetensors", "ip.safetensors"]


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """(diffusers' pipeline, fastdiff's, [the Plus folder (with the shared image encoder), the base folder])."""
    folder = str(tmp_path_factory.mktemp("ip2"))
    ref, pipe = sd_pipelines(folder)
    plus = _plus_adapter(os.path.join(folder, "plus"), ref.unet)
    base = _adapter(os.path.join(folder, "base"), ref.unet, seed=11, image_encoder=False)  # (other weights)
    return ref, pipe, [plus, base]


def _load(p, folders, **kw):
    p.load_ip_adapter(folders, subfolder="", weight_name=WEIGHTS, **kw)


@pytest.mark.parametrize("scale", [[1.0, 0.6], [{"up": {"block_0": [0.0, 1.0]}}, 0.8]])
def test_two_adapters_equal_diffusers(two, scale):
    """Plus on one image and the base adapter on two images: the same latents as diffusers' pipeline; each adapter
    changes the result; embeddings in diffusers' list form equal the images' run."""
    ref, pipe, folders = two
    images = [_image(seed=5), [_image(seed=6), _image(seed=7, size=48)]]
    kw = dict(num_inference_steps=3, guidance_scale=4.0, output_type="latent", num_images_per_prompt=2)
    _load(ref, folders, image_encoder_folder="image_encoder")
    _load(pipe, folders)
    try:
        ref.set_ip_adapter_scale(scale)
        pipe.set_ip_adapter_scale(scale)
        want = ref("a red cat", latents=_latents(), ip_adapter_image=images, **kw).images
        got = pipe.generate(prompt="a red cat", latents=_latents(), steps=3, cfg_scale=4.0, ip_adapter_image=images,
                            progress=False)
        assert rel_err(got, want) <= 1e-5
        for muted in ([0.0, scale[1]], [scale[0], 0.0]):  # each adapter's share is in the result
            pipe.set_ip_adapter_scale(muted)
            alone = pipe.generate(prompt="a red cat", latents=_latents(), steps=3, cfg_scale=4.0,
                                  ip_adapter_image=images, progress=False)
            assert rel_err(alone, got) > 1e-4
        pipe.set_ip_adapter_scale(scale)
        listed = []
        for i, one in enumerate(images):  # diffusers' form: [negative; positive] per adapter
            positive, negative = pipe._encode_ip_image(one, i)
            listed.append(torch.stack([negative, positive]))
        same = pipe.generate(prompt="a red cat", latents=_latents(), steps=3, cfg_scale=4.0,
                             ip_adapter_image_embeds=listed, progress=False)
        assert rel_err(same, got) <= 1e-6
    finally:
        ref.unload_ip_adapter()
        pipe.unload_ip_adapter()


@pytest.mark.parametrize("scope", ["step", "loop"])
def test_two_adapters_in_captured_graphs(two, scope):
    """Step graphs pad every adapter's features to the bucket (3 requests in a bucket of 4) and loop graphs copy
    them into their static buffers: a second image replays the same graph and equals the eager run."""
    ref, eager, folders = two
    graphed = fastdiff.load(os.path.join(os.path.dirname(folders[0]), "pipe"))
    graphed.optimize(cuda_graphs=True, graph_scope=scope, batch_buckets=(4,), graph_factory=FakeGraph)
    for p in (eager, graphed):
        _load(p, folders, scale=[0.9, 0.7])
    try:
        graphs = graphed.loop_graphs if scope == "loop" else graphed.runner
        for seed in (5, 8):
            kw = dict(prompt="a red cat", seeds=[1, 2, 3], steps=2, cfg_scale=3.0, progress=False,
                      ip_adapter_image=[_image(seed=seed), _image(seed=seed + 1)])
            assert rel_err(graphed.generate(**kw), eager.generate(**kw)) <= 1e-5
        captured = graphs.captures
        assert captured == 1  # (one bucket, one resolution: the second image replayed it)
        graphed.generate(**kw)
        assert graphs.captures == captured
    finally:
        eager.unload_ip_adapter()


def test_the_engine_batches_two_adapters_requests(two):
    ref, pipe, folders = two
    _load(pipe, folders)
    try:
        stats = engine_equals_solo_runs(pipe, ip_adapter_image=[_image(seed=5), _image(seed=6)])
        assert max(stats["batch_size_hist"]) > 1  # (batched: the image lists are equal)
    finally:
        pipe.unload_ip_adapter()


def test_two_adapters_refusals(two, tmp_path):
    """Images, embeddings and scales that are not one per adapter; adapter lists of other lengths; an adapter whose
    features the shared encoder does not make; each one line, nothing loaded by a refused load."""
    from fastdiff.models import ip_adapter

    ref, pipe, folders = two
    with pytest.raises(BadArgumentError, match=r"lists of one length .* found lengths"):
        pipe.load_ip_adapter(folders, subfolder=["", "", ""], weight_name=WEIGHTS)
    with pytest.raises(BadArgumentError, match=r"expected a number, a per-block dict or a list of 2"):
        _load(pipe, folders, scale=[1.0])
    assert not ip_adapter.attached(pipe.model)
    _load(pipe, folders)
    try:
        kw = dict(prompt="a red cat", steps=1, progress=False)
        with pytest.raises(BadArgumentError, match=r"2 IP-Adapters are loaded: .* found one image"):
            pipe.generate(ip_adapter_image=_image(), **kw)
        with pytest.raises(BadArgumentError, match=r"expected a list of 2 .* found a list of 3"):
            pipe.generate(ip_adapter_image=[_image()] * 3, **kw)
        with pytest.raises(BadArgumentError, match=r"expected a list of 2 tensors \(diffusers' form\), found one"):
            pipe.generate(ip_adapter_image_embeds=torch.randn(1, 10), **kw)
        with pytest.raises(BadArgumentError, match=r"for IP-Adapter 1, found \(1, 1, 7\)"):
            pipe.generate(ip_adapter_image_embeds=[torch.randn(1, 1, 50, 16), torch.randn(1, 1, 7)], **kw)
        with pytest.raises(BadArgumentError, match=r"list of 2 \(one per adapter\), found 3 values"):
            pipe.set_ip_adapter_scale([1.0, 1.0, 1.0])
        pipe.set_ip_adapter_scale(0.5)  # one value: every adapter
        assert ip_adapter.scales(pipe.model, 0) == ip_adapter.scales(pipe.model, 1) == [0.5] * 4
    finally:
        pipe.unload_ip_adapter()
    # the base adapter first: the encoder from its folder (none there) -> an encoder given by path, whose 10-wide
    # projection the Plus adapter (16-wide hidden states) reads as well: fine; an encoder of another width is not
    other = _adapter(str(tmp_path / "other"), ref.unet, seed=3)
    import transformers

    config = transformers.CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=8, projection_dim=10)
    transformers.CLIPVisionModelWithProjection(config).save_pretrained(str(tmp_path / "other" / "narrow"))
    with pytest.raises(BadArgumentError, match=r"makes 8-wide hidden states and adapter 1 projects 16-wide"):
        pipe.load_ip_adapter([other, folders[0]], weight_name=["ip.safetensors", "plus.safetensors"],
                             image_encoder_folder="narrow")
    assert not ip_adapter.attached(pipe.model)


def test_a_loaded_encoder_that_serves_the_new_adapters_stays(two):
    """As diffusers keeps its registered encoder: reloading with image_encoder_folder=None, or from a folder without
    an encoder, keeps the one loaded (it makes what both adapters read), and images still run."""
    ref, pipe, folders = two
    kw = dict(prompt="a red cat", steps=1, progress=False)
    _load(pipe, folders)
    try:
        encoder = pipe.image_encoder
        pipe.load_ip_adapter(folders[1], weight_name="ip.safetensors", image_encoder_folder=None)
        assert pipe.image_encoder is encoder
        assert torch.isfinite(pipe.generate(ip_adapter_image=_image(), **kw)).all()
        pipe.load_ip_adapter(folders[1], weight_name="ip.safetensors")  # (no image_encoder/ there)
        assert pipe.image_encoder is encoder
    finally:
        pipe.unload_ip_adapter()
    assert pipe.image_encoder is None
    with pytest.raises(BadArgumentError, match="expected the image encoder"):  # none loaded, none there
        pipe.load_ip_adapter(folders[1], weight_name="ip.safetensors")
