"""IP-Adapter masks (diffusers' ``cross_attention_kwargs={"ip_adapter_masks": ...}``) and per-image scales, against
diffusers' pipeline and ``IPAdapterMaskProcessor``; in captured graphs; refused where they do not fit."""

import os

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff.errors import BadArgumentError
from helpers import rel_err
from test_graph_scopes import FakeGraph
from test_ip_adapter import _adapter, _image, _plus_adapter, diffusers
from test_prompts import sd_pipelines


def _mask_images(width=96, height=64, seed=0):
    """Two mask images (left and right, soft edges near 0.5 so that the binarization is tested) of another size than
    the output."""
    from PIL import Image

    x = np.linspace(0, 1, width)[None, :].repeat(height, 0)
    noise = np.random.default_rng(seed).normal(0, 0.05, (height, width))
    left = np.clip(1.2 - 1.6 * x + noise, 0, 1)
    return [Image.fromarray((left * 255).astype(np.uint8)), Image.fromarray(((1 - left) * 255).astype(np.uint8))]


def _latents(b=2, seed=3, size=(8, 12)):
    return torch.randn(b, 4, *size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def masked(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("ipmask"))
    ref, pipe = sd_pipelines(folder)
    plus = _plus_adapter(os.path.join(folder, "plus"), ref.unet)
    base = _adapter(os.path.join(folder, "base"), ref.unet, seed=11, image_encoder=False)
    return ref, pipe, plus, base


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "1", "P"])
@pytest.mark.parametrize("size", [(None, None), (40, 60), (33, 71)])
def test_ip_adapter_mask_equals_diffusers_processor(size, mode):
    """Every image mode resized in its own mode, then grayscale (the processor's order: RGB channels and RGBA's
    premultiplied alpha resample apart, "1" / "P" with PIL's nearest), then binarized."""
    from diffusers.image_processor import IPAdapterMaskProcessor
    from PIL import Image

    images = _mask_images(width=90, height=70)
    if mode == "RGBA":  # (a transparent band: the alpha weighs the resampling)
        images = [Image.merge("RGBA", (i, i.transpose(Image.FLIP_LEFT_RIGHT), i, i.transpose(Image.FLIP_TOP_BOTTOM)))
                  for i in images]
    elif mode == "RGB":
        images = [Image.merge("RGB", (i, i.transpose(Image.FLIP_LEFT_RIGHT), i)) for i in images]
    else:
        images = [i.convert(mode) for i in images]
    want = IPAdapterMaskProcessor().preprocess(images, height=size[0], width=size[1])
    got = fastdiff.ip_adapter_mask(images, *size)
    assert got.shape == (1, 2) + tuple(want.shape[2:]) and torch.equal(got[0], want[:, 0])
    assert 0 < float(got.mean()) < 1  # (both values occur)


@pytest.mark.parametrize("down", [dict(downsample_padding=1), dict(downsample_padding=0),
                                  dict(down_block_types=("ResnetDownsampleBlock2D", "CrossAttnDownBlock2D"))])
def test_attention_sizes_are_the_layers_query_counts(down):
    """The grids the aspect check reads are the ones the cross-attention layers see, on odd latents (7 x 9): a padded
    conv rounds up, an unpadded one and a ResBlock's pooling round down."""
    from fastdiff.models.ip_adapter import attention_sizes
    from fastdiff.models.unet import UNet
    from fastdiff.models.unet_config import UNetConfig

    config = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8, attention_head_dim=4,
                  norm_num_groups=8)
    config.update(down)
    unet = UNet(UNetConfig.from_diffusers(config, "UNet2DConditionModel")).eval()
    queries = []
    for layer in fastdiff.models.ip_adapter.cross_attentions(unet):
        layer.register_forward_hook(lambda module, args, out: queries.append(out.shape[1]))
    with torch.no_grad():
        unet(torch.randn(1, 4, 7, 9), torch.tensor([10]), encoder_hidden_states=torch.randn(1, 5, 8))
    assert {h * w for h, w in attention_sizes(unet, 7, 9)} == set(queries)


@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_masked_images_with_per_image_scales_equal_diffusers(masked, cfg):
    """One adapter, two images, each in its half (per-image scales, diffusers' [[0.7, 0.4]]); non-square latents
    whose aspect the masks share. Then two adapters: Plus masked, the base adapter unmasked (None)."""
    ref, pipe, plus, base = masked
    masks = fastdiff.ip_adapter_mask(_mask_images(), 64, 96)
    images = [[_image(seed=5), _image(seed=6)]]
    kw = dict(num_inference_steps=3, guidance_scale=cfg, output_type="latent", num_images_per_prompt=2, height=64,
              width=96)
    ref.load_ip_adapter(plus, subfolder="", weight_name="plus.safetensors", image_encoder_folder="image_encoder")
    pipe.load_ip_adapter(plus, weight_name="plus.safetensors")
    try:
        for scale in ([[0.7, 0.4]], 0.8):
            ref.set_ip_adapter_scale(scale)
            pipe.set_ip_adapter_scale(scale)
            want = ref("a red cat", latents=_latents(), ip_adapter_image=images,
                       cross_attention_kwargs={"ip_adapter_masks": [masks]}, **kw).images
            got = pipe.generate(prompt="a red cat", latents=_latents(), steps=3, cfg_scale=cfg, progress=False,
                                ip_adapter_image=images, ip_adapter_masks=[masks])
            assert rel_err(got, want) <= 1e-5
        unmasked = pipe.generate(prompt="a red cat", latents=_latents(), steps=3, cfg_scale=cfg, progress=False,
                                 ip_adapter_image=images)
        assert rel_err(unmasked, got) > 1e-4
        # mask images straight to generate: made at the output's size, as the processor makes them; for one
        # adapter its list of mask images as they are too (as ip_adapter_image takes its images)
        for images_given in ([_mask_images()], _mask_images()):
            assert torch.equal(pipe.generate(prompt="a red cat", latents=_latents(), steps=3, cfg_scale=cfg,
                                             progress=False, ip_adapter_image=images,
                                             ip_adapter_masks=images_given), got)
    finally:
        ref.unload_ip_adapter()
        pipe.unload_ip_adapter()
    weights = ["plus.safetensors", "ip.safetensors"]
    ref.load_ip_adapter([plus, base], subfolder="", weight_name=weights, image_encoder_folder="image_encoder")
    pipe.load_ip_adapter([plus, base], weight_name=weights)
    try:
        scale = [[0.6, 0.9], 0.5]
        ref.set_ip_adapter_scale(scale)
        pipe.set_ip_adapter_scale(scale)
        images = [[_image(seed=5), _image(seed=6)], _image(seed=7)]
        want = ref("a red cat", latents=_latents(), ip_adapter_image=images,
                   cross_attention_kwargs={"ip_adapter_masks": [masks, None]}, **kw).images
        got = pipe.generate(prompt="a red cat", latents=_latents(), steps=3, cfg_scale=cfg, progress=False,
                            ip_adapter_image=images, ip_adapter_masks=[masks, None])
        assert rel_err(got, want) <= 1e-5
        # diffusers' stacked form (adapters, N, H, W): both adapters masked, the second's image with the first mask
        images[1] = [_image(seed=7), _image(seed=8)]
        want = ref("a red cat", latents=_latents(), ip_adapter_image=images,
                   cross_attention_kwargs={"ip_adapter_masks": torch.cat([masks, masks])}, **kw).images
        pipe.set_ip_adapter_scale([[0.6, 0.9], [0.5, 0.3]])
        got = pipe.generate(prompt="a red cat", latents=_latents(), steps=3, cfg_scale=cfg, progress=False,
                            ip_adapter_image=images, ip_adapter_masks=torch.cat([masks, masks]))
        ref.set_ip_adapter_scale([[0.6, 0.9], [0.5, 0.3]])
    finally:
        ref.unload_ip_adapter()
        pipe.unload_ip_adapter()


def test_masks_of_another_aspect_are_padded_as_diffusers_pads_them(masked):
    """Tall masks (16 x 80) on 8 x 12 latents: the downsampled cells (11 x 2) do not cover the attention layers' 4 x 6
    queries; diffusers pads them with zeros (and warns), fastdiff too. Square masks there map to 4 x 6 cells: no
    warning."""
    import warnings

    ref, pipe, plus, base = masked
    masks = fastdiff.ip_adapter_mask(_mask_images(width=64), 80, 16)
    kw = dict(num_inference_steps=2, guidance_scale=3.0, output_type="latent", num_images_per_prompt=2, height=64,
              width=96)
    ref.load_ip_adapter(base, subfolder="", weight_name="ip.safetensors", image_encoder_folder=None)
    pipe.load_ip_adapter(base, weight_name="ip.safetensors", image_encoder_folder=None)
    try:
        embeds = torch.randn(1, 2, 10, generator=torch.Generator().manual_seed(4))
        with pytest.warns(UserWarning, match="aspect ratio"):
            want = ref("a red cat", latents=_latents(), ip_adapter_image_embeds=[torch.cat([embeds * 0, embeds])],
                       cross_attention_kwargs={"ip_adapter_masks": [masks]}, **kw).images
        with pytest.warns(UserWarning, match="aspect ratio"):
            got = pipe.generate(prompt="a red cat", latents=_latents(), steps=2, cfg_scale=3.0, progress=False,
                                ip_adapter_image_embeds=embeds, ip_adapter_masks=masks)
        assert rel_err(got, want) <= 1e-5
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            pipe.generate(prompt="a red cat", latents=_latents(), steps=1, progress=False,
                          ip_adapter_image_embeds=embeds,
                          ip_adapter_masks=fastdiff.ip_adapter_mask(_mask_images(width=64), 64, 64))
    finally:
        ref.unload_ip_adapter()
        pipe.unload_ip_adapter()


@pytest.mark.parametrize("scope", ["step", "loop"])
def test_masks_in_captured_graphs(masked, scope):
    """Masks are conditioning tensors: padded to the bucket, copied into the static buffers; other masks and other
    per-image scales replay the same graph and equal the eager run."""
    ref, eager, plus, base = masked
    graphed = fastdiff.load(os.path.join(os.path.dirname(plus), "pipe"))
    graphed.optimize(cuda_graphs=True, graph_scope=scope, batch_buckets=(4,), graph_factory=FakeGraph)
    for p in (eager, graphed):
        p.load_ip_adapter(plus, weight_name="plus.safetensors")
    try:
        graphs = graphed.loop_graphs if scope == "loop" else graphed.runner
        left, right = fastdiff.ip_adapter_mask(_mask_images(), 64, 96)[0]
        for masks, scale in (((left, right), [[0.7, 0.4]]), ((right, left), [[0.2, 1.1]])):
            for p in (eager, graphed):
                p.set_ip_adapter_scale(scale)
            kw = dict(prompt="a red cat", seeds=[1, 2, 3], steps=2, cfg_scale=3.0, progress=False, height=64,
                      width=96, ip_adapter_image=[[_image(seed=5), _image(seed=6)]],
                      ip_adapter_masks=torch.stack(masks)[None])
            assert rel_err(graphed.generate(**kw), eager.generate(**kw)) <= 1e-5
        assert graphs.captures == 1
    finally:
        eager.unload_ip_adapter()


def test_mask_refusals(masked):
    ref, pipe, plus, base = masked
    masks = fastdiff.ip_adapter_mask(_mask_images(), 64, 96)
    kw = dict(prompt="a red cat", steps=1, progress=False, height=64, width=96, seeds=[0])
    with pytest.raises(BadArgumentError, match="ip_adapter_masks: given, but no image prompt"):
        pipe.generate(ip_adapter_masks=masks, **kw)
    pipe.load_ip_adapter(plus, weight_name="plus.safetensors", scale=[[0.5, 0.5]])
    try:
        two = [[_image(seed=5), _image(seed=6)]]
        with pytest.raises(BadArgumentError, match=r"one scale per image .* expected its masks, found none"):
            pipe.generate(ip_adapter_image=two, **kw)
        with pytest.raises(BadArgumentError, match=r"expected float masks \(1, 1, H, W\) for IP-Adapter 0"):
            pipe.generate(ip_adapter_image=_image(), ip_adapter_masks=masks, **kw)
        with pytest.raises(BadArgumentError, match=r"one entry \(masks or None\) per loaded IP-Adapter \(1\), found 2"):
            pipe.generate(ip_adapter_image=two, ip_adapter_masks=[masks, masks], **kw)
        with pytest.raises(BadArgumentError, match="expected finite values"):
            pipe.generate(ip_adapter_image=two, ip_adapter_masks=masks * float("nan"), **kw)
        before = pipe.generate(ip_adapter_image=two, ip_adapter_masks=masks, **kw)
        with pytest.raises(BadArgumentError, match="name no up block"):  # refused: the per-image scales stay
            pipe.set_ip_adapter_scale({"up": {"block_1": 1.0}})
        assert torch.equal(pipe.generate(ip_adapter_image=two, ip_adapter_masks=masks, **kw), before)
        pipe.set_ip_adapter_scale([[0.5, 0.5, 0.5]])
        with pytest.raises(BadArgumentError, match="3 per-image scales and 2 images"):
            pipe.generate(ip_adapter_image=two, ip_adapter_masks=masks, **kw)
        with pytest.raises(BadArgumentError, match="one scale per masked image, found an empty list"):
            pipe.set_ip_adapter_scale([[]])
    finally:
        pipe.unload_ip_adapter()
    for array in (torch.ones(8, 8), np.ones((1, 2, 8, 8), np.float32)):
        with pytest.raises(BadArgumentError, match=r"expected PIL images \(or, to generate, a \(1, N, H, W\) float"):
            fastdiff.ip_adapter_mask([array])
    assert diffusers is not None


def test_cli_two_adapters_with_masks(masked, tmp_path):
    """`fastdiff generate` with two --ip-adapter files: one --ip-adapter-image per adapter (the first's two images
    comma-separated), per-adapter scales (JSON per-image scales for the masked one), --ip-adapter-mask per adapter
    ('none' for the second): the API's result."""
    from PIL import Image
    from safetensors.torch import load_file

    from test_cli import fastdiff as run_cli

    ref, pipe, plus, base = masked
    for i, image in enumerate([_image(seed=5), _image(seed=6), _image(seed=7)]):
        image.save(tmp_path / f"i{i}.png")
    for i, mask in enumerate(_mask_images()):
        mask.convert("RGB").save(tmp_path / f"m{i}.png")
    root = os.path.dirname(plus)
    r = run_cli("generate", os.path.join(root, "pipe"), "--prompt", "a red cat", "--cfg", "3", "--steps", "2", "--n",
                "1", "--height", "64", "--width", "96",
                "--ip-adapter", os.path.join(plus, "plus.safetensors"), "--ip-adapter", os.path.join(base,
                                                                                                     "ip.safetensors"),
                "--ip-adapter-encoder", os.path.join(plus, "image_encoder"),
                "--ip-adapter-image", "i0.png,i1.png", "--ip-adapter-image", "i2.png",
                "--ip-adapter-scale", "[0.7, 0.4]", "--ip-adapter-scale", "0.5",
                "--ip-adapter-mask", "m0.png,m1.png", "--ip-adapter-mask", "none",
                "--output-latents", "lat.safetensors", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    api = fastdiff.load(os.path.join(root, "pipe"))
    api.load_ip_adapter([os.path.join(plus, "plus.safetensors"), os.path.join(base, "ip.safetensors")],
                        scale=[[0.7, 0.4], 0.5])
    opened = [Image.open(tmp_path / f"i{i}.png").convert("RGB") for i in range(3)]
    masks = [Image.open(tmp_path / f"m{i}.png").convert("RGB") for i in range(2)]
    want = api.generate(prompt="a red cat", cfg_scale=3, steps=2, seeds=[0], height=64, width=96, progress=False,
                        ip_adapter_image=[opened[:2], opened[2]], ip_adapter_masks=[masks, None])
    assert torch.equal(load_file(str(tmp_path / "lat.safetensors"))["latents"], want)
    # one adapter: repeated flags (paths as they are), a JSON list once: that adapter's per-image scales
    r = run_cli("generate", os.path.join(root, "pipe"), "--prompt", "a red cat", "--cfg", "3", "--steps", "2", "--n",
                "1", "--height", "64", "--width", "96", "--ip-adapter", os.path.join(plus, "plus.safetensors"),
                "--ip-adapter-image", "i0.png", "--ip-adapter-image", "i1.png", "--ip-adapter-scale", "[0.7, 0.4]",
                "--ip-adapter-mask", "m0.png", "--ip-adapter-mask", "m1.png", "--output-latents", "one.safetensors",
                "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    api.load_ip_adapter(os.path.join(plus, "plus.safetensors"), scale=[[0.7, 0.4]])
    want = api.generate(prompt="a red cat", cfg_scale=3, steps=2, seeds=[0], height=64, width=96, progress=False,
                        ip_adapter_image=opened[:2], ip_adapter_masks=[masks])
    assert torch.equal(load_file(str(tmp_path / "one.safetensors"))["latents"], want)
    # the base adapter's features from a file, no image encoder beside it (none needed: zeros for the negative)
    from safetensors.torch import save_file

    embeds = torch.randn(1, 2, 10, generator=torch.Generator().manual_seed(9))
    save_file({"embeds": embeds}, str(tmp_path / "e.safetensors"))
    r = run_cli("generate", os.path.join(root, "pipe"), "--prompt", "a red cat", "--cfg", "3", "--steps", "2", "--n",
                "1", "--ip-adapter", os.path.join(base, "ip.safetensors"), "--ip-adapter-embeds", "e.safetensors",
                "--output-latents", "e_out.safetensors", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    api.load_ip_adapter(os.path.join(base, "ip.safetensors"), image_encoder_folder=None)
    want = api.generate(prompt="a red cat", cfg_scale=3, steps=2, seeds=[0], progress=False,
                        ip_adapter_image_embeds=embeds)
    assert torch.equal(load_file(str(tmp_path / "e_out.safetensors"))["latents"], want)
    # two adapters' features, one file each in the adapters' order: the API's list, their negatives zeros as for images
    other = torch.randn(1, 2, 10, generator=torch.Generator().manual_seed(10))
    save_file({"embeds": other}, str(tmp_path / "e2.safetensors"))
    r = run_cli("generate", os.path.join(root, "pipe"), "--prompt", "a red cat", "--cfg", "3", "--steps", "2", "--n",
                "1", "--ip-adapter", os.path.join(base, "ip.safetensors"), "--ip-adapter", os.path.join(base,
                                                                                                   "ip.safetensors"),
                "--ip-adapter-embeds", "e.safetensors", "--ip-adapter-embeds", "e2.safetensors",
                "--ip-adapter-scale", "0.5", "--ip-adapter-scale", "0.8",
                "--output-latents", "e_two.safetensors", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    api.load_ip_adapter([os.path.join(base, "ip.safetensors")] * 2, scale=[0.5, 0.8], image_encoder_folder=None)
    want = api.generate(prompt="a red cat", cfg_scale=3, steps=2, seeds=[0], progress=False,
                        ip_adapter_image_embeds=[torch.cat([torch.zeros_like(embeds), embeds]),
                                                 torch.cat([torch.zeros_like(other), other])])
    assert torch.equal(load_file(str(tmp_path / "e_two.safetensors"))["latents"], want)
    swapped = api.generate(prompt="a red cat", cfg_scale=3, steps=2, seeds=[0], progress=False,
                           ip_adapter_image_embeds=[torch.cat([torch.zeros_like(other), other]),
                                                    torch.cat([torch.zeros_like(embeds), embeds])])
    assert not torch.equal(swapped, want)  # (each file reaches its own adapter)
    two = ["--ip-adapter", os.path.join(plus, "plus.safetensors"), "--ip-adapter", os.path.join(base, "ip.safetensors")]
    for flags, message in ((two + ["--ip-adapter-image", "i0.png"], "expected one --ip-adapter-image each"),
                           (["--ip-adapter", os.path.join(plus, "plus.safetensors"), "--ip-adapter-image", "i0.png",
                             "--ip-adapter-mask", "none"], "'none' marks an adapter without masks"),
                           (two + ["--ip-adapter-image", "i0.png", "--ip-adapter-image", "i1.png",
                                   "--ip-adapter-mask", "m0.png,none", "--ip-adapter-mask", "none"],
                            "'none' stands for a whole adapter's masks"),
                           (two + ["--ip-adapter-embeds", "e.safetensors"], "expected one --ip-adapter-embeds each"),
                           (two + ["--ip-adapter-embeds", "e.safetensors", "--ip-adapter-embeds", "e.safetensors",
                                   "--ip-adapter-image", "i0.png,none", "--ip-adapter-image", "none"],
                            "'none' stands for a whole adapter's images"),
                           (two + ["--ip-adapter-embeds", "e.safetensors", "--ip-adapter-embeds", "e.safetensors",
                                   "--ip-adapter-image", "i0.png", "--ip-adapter-image", "i1.png"],
                            "ip_adapter_image (--ip-adapter-image) and ip_adapter_image_embeds (--ip-adapter-embeds): "
                            "expected one of them, found both")):
        r = run_cli("generate", os.path.join(root, "pipe"), "--prompt", "a red cat", "--steps", "1", *flags,
                    "--output-latents", "x.safetensors", "--no-progress", cwd=tmp_path)
        errors = [line for line in r.stderr.splitlines() if line.startswith("fastdiff")]  # (not transformers' notes)
        assert r.returncode == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in r.stderr, \
            r.stderr


def test_the_list_form_from_features_alone_equals_the_images(masked):
    """``ip_adapter_embeds_list``: each adapter's features alone, completed with the unconditional pass generate()
    makes for images (Plus: a black image's hidden states; the base adapter: zeros), give the images' samples; without
    guidance the features as they are."""
    ref, pipe, plus, base = masked
    root = os.path.dirname(plus)
    api = fastdiff.load(os.path.join(root, "pipe"))
    api.load_ip_adapter([os.path.join(plus, "plus.safetensors"), os.path.join(base, "ip.safetensors")],
                        image_encoder_folder=os.path.join(plus, "image_encoder"), scale=[0.7, 0.6])
    images = [_image(seed=5), _image(seed=7)]
    positives = [api._encode_ip_image(image, i)[0][None] for i, image in enumerate(images)]
    kw = dict(prompt="a red cat", steps=2, seeds=[0], progress=False)
    for cfg in (3.0, 1.0):
        want = api.generate(cfg_scale=cfg, ip_adapter_image=images, **kw)
        listed = api.ip_adapter_embeds_list(positives, guided=cfg != 1.0)
        assert [e.shape[0] for e in listed] == [2 if cfg != 1.0 else 1] * 2
        got = api.generate(cfg_scale=cfg, ip_adapter_image_embeds=listed, **kw)
        assert rel_err(got, want) <= 1e-6
    with pytest.raises(BadArgumentError, match="2 IP-Adapter"):
        api.ip_adapter_embeds_list(positives[:1], guided=True)
    # without an image encoder, Plus's negative cannot be made: the error names the way to load one
    bare = fastdiff.load(os.path.join(root, "pipe"))
    bare.load_ip_adapter([os.path.join(plus, "plus.safetensors"), os.path.join(base, "ip.safetensors")],
                         image_encoder_folder=None)
    with pytest.raises(BadArgumentError, match="for IP-Adapter 0: the unconditional pass .* --ip-adapter-encoder"):
        bare.ip_adapter_embeds_list(positives, guided=True)
    assert [e.shape[0] for e in bare.ip_adapter_embeds_list(positives, guided=False)] == [1, 1]
