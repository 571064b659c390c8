"""IP-Adapter Face ID Plus / Plus v2 (a perceiver over the face crop's CLIP hidden states, the face embedding's
tokens its queries, and Face ID's LoRA) against diffusers' ``IPAdapterFaceIDPlusImageProjection`` (loaded through
diffusers' own converter) and diffusers' ``load_ip_adapter`` on a tiny SD pipeline; refusals."""

import os

import pytest
import torch

from fastdiff.errors import BadArgumentError, CheckpointError, StateDictMismatchError
from helpers import rel_err
from test_ip_adapter import _adapter, _image, _latents, diffusers  # noqa: F401 (diffusers: the reference, its skip)
from test_ip_adapter_faceid import FACE, _face_id_adapter
from test_prompts import _unet, sd_pipelines

pytest.importorskip("peft", reason="diffusers loads Face ID's LoRA through PEFT")

CLIP = 16  # the tiny image encoder's hidden width (test_ip_adapter's)
NAME = "ip-adapter-faceid-plusv2_sd15.safetensors"  # (h94's name: load_ip_adapter turns the shortcut on)


def _plus_image_proj(width: int, out: int, seed: int = 40, depth: int = 4, heads: int = 1) -> dict:
    """image_proj.* of ip-adapter-faceid-plus in the original layout: the face MLP ``proj.0`` / ``proj.2`` (4 tokens,
    hidden 2 x the embedding, as diffusers builds it) and ``norm``, then ``perceiver_resampler.*`` (proj_in over the
    CLIP states, ``layers.i.0`` attention with a fused to_kv, ``layers.i.1`` feed-forward, proj_out, norm_out)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.3):
        return torch.randn(*shape, generator=g) * scale

    inner, p = 64 * heads, "image_proj.perceiver_resampler."
    w = {"image_proj.proj.0.weight": rand(2 * FACE, FACE), "image_proj.proj.0.bias": rand(2 * FACE, scale=0.1),
         "image_proj.proj.2.weight": rand(4 * width, 2 * FACE), "image_proj.proj.2.bias": rand(4 * width),
         "image_proj.norm.weight": 1 + rand(width, scale=0.1), "image_proj.norm.bias": rand(width, scale=0.1),
         p + "proj_in.weight": rand(width, CLIP), p + "proj_in.bias": rand(width, scale=0.1),
         p + "proj_out.weight": rand(out, width), p + "proj_out.bias": rand(out, scale=0.1),
         p + "norm_out.weight": 1 + rand(out, scale=0.1), p + "norm_out.bias": rand(out, scale=0.1)}
    for i in range(depth):
        q = f"{p}layers.{i}."
        for norm in ("0.norm1", "0.norm2", "1.0"):
            w.update({f"{q}{norm}.weight": 1 + rand(width, scale=0.1), f"{q}{norm}.bias": rand(width, scale=0.1)})
        w.update({q + "0.to_q.weight": rand(inner, width), q + "0.to_kv.weight": rand(2 * inner, width),
                  q + "0.to_out.weight": rand(width, inner), q + "1.1.weight": rand(4 * width, width),
                  q + "1.3.weight": rand(width, 4 * width)})
    return w


def _plus_adapter(folder: str, unet) -> str:
    """A Face ID Plus v2 file (Face ID's LoRA and image branches, the perceiver's projection) beside a tiny image
    encoder (``image_encoder/``)."""
    from safetensors.torch import load_file, save_file

    _adapter(folder, unet)  # (its image_encoder/)
    _face_id_adapter(folder, unet, seed=33)
    state = {k: v for k, v in load_file(os.path.join(folder, "faceid.safetensors")).items()
             if not k.startswith("image_proj.")}
    cross = unet.config.cross_attention_dim
    state.update(_plus_image_proj(cross, cross))
    save_file(state, os.path.join(folder, NAME))
    return folder


def _reference_projection(proj: dict, shortcut: bool, scale: float):
    """diffusers' IPAdapterFaceIDPlusImageProjection from its own converter
    (``_convert_ip_adapter_image_proj_to_diffusers``, strict loading)."""
    net = _unet(16)._convert_ip_adapter_image_proj_to_diffusers(proj, low_cpu_mem_usage=False).eval()
    assert type(net).__name__ == "IPAdapterFaceIDPlusImageProjection"
    net.shortcut, net.shortcut_scale = shortcut, scale
    return net


@pytest.mark.parametrize("shortcut,scale", [(False, 1.0), (True, 1.0), (True, 0.6)])
@pytest.mark.parametrize("batch", [1, 3])
def test_projection_equals_diffusers(shortcut, scale, batch):
    from fastdiff.models.ip_adapter import build_projection
    from fastdiff.models.ip_faceid_plus import pack

    proj = {k[len("image_proj."):]: v for k, v in _plus_image_proj(32, 32, heads=2).items()}
    ref = _reference_projection(proj, shortcut, scale)
    ours = build_projection(proj).eval()
    ours.set_shortcut(shortcut, scale)
    g = torch.Generator().manual_seed(batch)
    ids, states = torch.randn(batch, FACE, generator=g), torch.randn(batch, 1, 7, CLIP, generator=g)
    with torch.no_grad():
        ref.clip_embeds = states
        want = ref(ids)  # (batch, 4, 32)
        got = ours(pack(ids, states[:, 0]))
    assert got.shape == want.shape == (batch, 4, 32)
    assert (got - want).abs().max() <= 1e-5
    with torch.no_grad():  # the CLIP states and the shortcut count
        assert (ours(pack(ids, states[:, 0] + 1)) - want).abs().max() > 1e-3
        ours.set_shortcut(not shortcut, scale)
        assert (ours(pack(ids, states[:, 0])) - want).abs().max() > 1e-3


@pytest.fixture(scope="module")
def plus(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("faceid_plus"))
    ref, pipe = sd_pipelines(folder)
    return ref, pipe, _plus_adapter(os.path.join(folder, "adapter"), ref.unet)


def _embeds(seed=4, n=1):
    return torch.nn.functional.normalize(torch.randn(1, n, FACE, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_face_id_plus_equals_diffusers(plus, cfg):
    """diffusers' documented Face ID Plus v2 run (face embeddings with zeros as the negative, clip_embeds from
    prepare_ip_adapter_image_embeds of the face crop, shortcut on) against fastdiff's: the face crop as
    ip_adapter_image, and the precomputed states as ip_adapter_clip_embeds."""
    ref, pipe, folder = plus
    e, face = _embeds(), _image(seed=6)
    ref.load_ip_adapter(folder, subfolder="", weight_name=NAME, image_encoder_folder="image_encoder")
    pipe.load_ip_adapter(folder, weight_name=NAME, scale=0.7)
    ref.set_ip_adapter_scale(0.7)
    layer = ref.unet.encoder_hid_proj.image_projection_layers[0]
    try:
        guided = cfg > 1
        listed = [torch.cat([torch.zeros_like(e), e])] if guided else [e]
        layer.clip_embeds = ref.prepare_ip_adapter_image_embeds([[face]], None, "cpu", 2, guided)[0]
        kw = dict(latents=_latents(), num_inference_steps=3, guidance_scale=cfg, output_type="latent")
        for shortcut in (True, False):
            layer.shortcut = shortcut
            if not shortcut:
                pipe.load_ip_adapter(folder, weight_name=NAME, scale=0.7, faceid_shortcut=False)
            want = ref("a red cat", ip_adapter_image_embeds=listed, num_images_per_prompt=2, **kw).images
            run = dict(prompt="a red cat", latents=_latents(), steps=3, cfg_scale=cfg, progress=False)
            got = pipe.generate(ip_adapter_image_embeds=e, ip_adapter_image=face, **run)
            assert rel_err(got, want) <= 1e-4
            one = ref.prepare_ip_adapter_image_embeds([[face]], None, "cpu", 1, guided)[0]  # ([negative;] positive)
            given = pipe.generate(ip_adapter_image_embeds=listed, ip_adapter_clip_embeds=one, **run)
            assert rel_err(given, got) <= 1e-5
            states = one.chunk(2)[1] if guided else one  # (1, 1, S, E) positive: the negative a black image's
            assert rel_err(pipe.generate(ip_adapter_image_embeds=e, ip_adapter_clip_embeds=states, **run),
                           got) <= 1e-5
            if shortcut:
                with_shortcut = got
        assert rel_err(got, with_shortcut) > 1e-4  # (the shortcut counts)
        other = pipe.generate(ip_adapter_image_embeds=e, ip_adapter_image=_image(seed=9), **run)
        assert rel_err(other, got) > 1e-4  # (the face crop counts)
    finally:
        ref.unload_ip_adapter()
        ref.unload_lora_weights()
        pipe.unload_ip_adapter()
        pipe.unload_lora()


def test_face_id_plus_refusals(plus, tmp_path):
    from safetensors.torch import load_file, save_file

    ref, pipe, folder = plus
    run = dict(prompt="a red cat", latents=_latents(), steps=1, cfg_scale=3.0, progress=False)
    pipe.load_ip_adapter(folder, weight_name=NAME)
    try:
        assert pipe.model.ip_projection[0].shortcut  # (h94's "plusv2" name)
        with pytest.raises(BadArgumentError, match="expected ip_adapter_image_embeds.*found no ip_adapter_image_"):
            pipe.generate(ip_adapter_image=_image(), **run)
        with pytest.raises(BadArgumentError, match="expected one of them .*found neither"):
            pipe.generate(ip_adapter_image_embeds=_embeds(), **run)
        with pytest.raises(BadArgumentError, match=r"expected the face crop's CLIP hidden states as \(1 or 2 "
                                                   r"samples, 2 images .*found \(1, 1, 5, 16\)"):
            pipe.generate(ip_adapter_image_embeds=_embeds(n=2), ip_adapter_clip_embeds=torch.zeros(1, 1, 5, CLIP),
                          **run)
        with pytest.raises(BadArgumentError, match=r"expected the face crop's CLIP hidden states .*S, 16\), found "
                                                   r"\(1, 1, 5, 8\)"):
            pipe.generate(ip_adapter_image_embeds=_embeds(), ip_adapter_clip_embeds=torch.zeros(5, 8), **run)
        with pytest.raises(BadArgumentError, match=r"expected \(2B, N, S, E\)"):
            pipe.generate(ip_adapter_image_embeds=[torch.cat([_embeds(), _embeds()])],
                          ip_adapter_clip_embeds=torch.zeros(5, CLIP), **run)
    finally:
        pipe.unload_ip_adapter()
        pipe.unload_lora()
    with pytest.raises(BadArgumentError, match="ip_adapter_clip_embeds: .*no Face ID Plus adapter is loaded"):
        pipe.generate(ip_adapter_clip_embeds=torch.zeros(5, CLIP), **run)
    state = load_file(os.path.join(folder, NAME))
    for change, error, match in (
            ({"image_proj.perceiver_resampler.layers.1.0.to_out.weight": None}, StateDictMismatchError,
             r"1 missing key.*perceiver_resampler\.layers\.1\.0\.to_out\.weight"),
            ({"image_proj.perceiver_resampler.latents": torch.zeros(1, 4, 16)}, StateDictMismatchError,
             r"1 unexpected key.*perceiver_resampler\.latents"),
            ({"image_proj.extra.weight": torch.zeros(3)}, StateDictMismatchError, r"1 unexpected key.*: extra\.weight"),
            ({"image_proj.perceiver_resampler.proj_out.weight": torch.zeros(16, 5)}, CheckpointError,
             r"Face ID Plus.*proj_out\.weight"),
            ({"image_proj.proj.0.weight": None}, CheckpointError, "malformed image_proj weights.*proj.0.weight")):
        broken = {k: v for k, v in state.items() if change.get(k, 1) is not None}
        broken.update({k: v for k, v in change.items() if v is not None})
        save_file(broken, str(tmp_path / "broken.safetensors"))
        with pytest.raises(error, match=match) as e:
            pipe.load_ip_adapter(str(tmp_path / "broken.safetensors"))
        assert "\n" not in str(e.value)
    assert pipe.model.ip_projection is None and not pipe._lora_saved  # (nothing attached or merged)
    with pytest.raises(BadArgumentError, match="faceid_shortcut.*none of these adapters is IP-Adapter Face ID Plus"):
        pipe.load_ip_adapter(os.path.join(folder, "faceid.safetensors"), faceid_shortcut=True)


def test_the_engine_serves_face_id_plus(plus):
    """Engine requests with a Face ID Plus prompt (the face embedding and the face crop) equal their solo runs."""
    from test_ip_adapter import engine_equals_solo_runs

    ref, pipe, folder = plus
    pipe.load_ip_adapter(folder, weight_name=NAME)
    try:
        engine_equals_solo_runs(pipe, ip_adapter_image_embeds=_embeds(), ip_adapter_image=_image(seed=6))
    finally:
        pipe.unload_ip_adapter()
        pipe.unload_lora()


def test_sdxl_face_id_plus_v2_equals_diffusers(tmp_path):
    """SDXL (ip-adapter-faceid-plusv2_sdxl's layout: the perceiver at the UNet's text width, the LoRA on every
    attention of its deeper blocks), guided, shortcut on."""
    import fastdiff
    from test_prompts import _save, _sdxl_pipe

    ref = _sdxl_pipe(str(tmp_path))
    pipe = fastdiff.load(_save(ref, str(tmp_path / "pipe")))
    folder = _plus_adapter(str(tmp_path / "adapter"), ref.unet)
    e, face = _embeds(), _image(seed=6)
    ref.load_ip_adapter(folder, subfolder="", weight_name=NAME, image_encoder_folder="image_encoder")
    pipe.load_ip_adapter(folder, weight_name=NAME, scale=0.8)
    ref.set_ip_adapter_scale(0.8)
    layer = ref.unet.encoder_hid_proj.image_projection_layers[0]
    layer.clip_embeds, layer.shortcut = ref.prepare_ip_adapter_image_embeds([[face]], None, "cpu", 2, True)[0], True
    want = ref("a red cat", latents=_latents(), num_inference_steps=3, guidance_scale=4.0, height=64, width=64,
               output_type="latent", num_images_per_prompt=2,
               ip_adapter_image_embeds=[torch.cat([torch.zeros_like(e), e])]).images
    got = pipe.generate(prompt="a red cat", latents=_latents(), steps=3, cfg_scale=4.0, progress=False,
                        ip_adapter_image_embeds=e, ip_adapter_image=face)
    assert rel_err(got, want) <= 1e-4


def test_the_v2_shortcut_follows_the_file_name_a_folder_holds(plus, tmp_path):
    """A folder with one adapter file and no weight_name: the file's own name decides the shortcut ("plusv2": on)."""
    import shutil

    ref, pipe, folder = plus
    for i, (name, want) in enumerate(((NAME, True), ("ip-adapter-faceid-plus_sd15.safetensors", False))):
        alone = tmp_path / f"adapter{i}"  # (a folder name that says nothing)
        alone.mkdir()
        shutil.copy(os.path.join(folder, NAME), alone / name)
        pipe.load_ip_adapter(str(alone), image_encoder_folder=None)
        try:
            assert pipe.model.ip_projection[0].shortcut is want, name
        finally:
            pipe.unload_ip_adapter()
            pipe.unload_lora()
    with pytest.raises(BadArgumentError, match="faceid_shortcut_scale=0.5 with the shortcut off"):
        pipe.load_ip_adapter(str(alone), image_encoder_folder=None, faceid_shortcut_scale=0.5)
    assert pipe.model.ip_projection is None


def test_cli_face_id_plus_takes_the_embeddings_and_the_crop(plus, tmp_path):
    """`fastdiff generate --ip-adapter PLUSV2 --ip-adapter-embeds FACE.safetensors --ip-adapter-image CROP.png`: the
    API's result; the two flags together are refused for another kind by the pipeline, naming them."""
    from safetensors.torch import load_file, save_file

    import fastdiff
    from test_cli import fastdiff as run_cli

    ref, pipe, folder = plus
    save_file({"embeds": _embeds()[0]}, str(tmp_path / "face.safetensors"))
    _image(seed=6).save(tmp_path / "crop.png")
    root = os.path.dirname(folder)
    common = ("generate", os.path.join(root, "pipe"), "--prompt", "a red cat", "--cfg", "3", "--steps", "2", "--n",
              "1", "--ip-adapter-embeds", "face.safetensors", "--ip-adapter-image", "crop.png", "--no-progress",
              "--output-latents", "lat.safetensors")
    r = run_cli(*common, "--ip-adapter", os.path.join(folder, NAME), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    from PIL import Image

    api = fastdiff.load(os.path.join(root, "pipe"))
    api.load_ip_adapter(os.path.join(folder, NAME))
    want = api.generate(prompt="a red cat", cfg_scale=3, steps=2, seeds=[0], progress=False,
                        ip_adapter_image_embeds=_embeds()[0], ip_adapter_image=Image.open(tmp_path / "crop.png"))
    assert rel_err(load_file(str(tmp_path / "lat.safetensors"))["latents"], want) <= 1e-6
    r = run_cli(*common, "--ip-adapter", os.path.join(folder, "faceid.safetensors"), cwd=tmp_path)
    assert r.returncode != 0 and "expected one of them, found both" in r.stderr


def test_face_id_plus_beside_a_base_adapter_equals_diffusers(plus):
    """Two adapters, a base IP-Adapter and Face ID Plus v2, guided: per-adapter lists (the base adapter's features,
    the face embeddings; the crop as an image or as CLIP states for the second only) equal diffusers' run."""
    ref, pipe, folder = plus
    e, face, img = _embeds(), _image(seed=6), _image(seed=11)
    ref.load_ip_adapter(folder, subfolder="", weight_name=["ip.safetensors", NAME], image_encoder_folder="image_encoder")
    pipe.load_ip_adapter(folder, weight_name=["ip.safetensors", NAME], scale=[0.6, 0.7])
    try:
        ref.set_ip_adapter_scale([0.6, 0.7])
        base2, states2 = ref.prepare_ip_adapter_image_embeds([img, face], None, "cpu", 2, True)
        layer = ref.unet.encoder_hid_proj.image_projection_layers[1]
        layer.clip_embeds, layer.shortcut = states2, True
        faces = torch.cat([torch.zeros_like(e), e])  # (diffusers' list form: the negative first)
        want = ref("a red cat", ip_adapter_image_embeds=[base2, faces], latents=_latents(), num_inference_steps=3,
                   guidance_scale=4.0, output_type="latent", num_images_per_prompt=2).images
        base1, states1 = ref.prepare_ip_adapter_image_embeds([img, face], None, "cpu", 1, True)
        run = dict(prompt="a red cat", latents=_latents(), steps=3, cfg_scale=4.0, progress=False,
                   ip_adapter_image_embeds=[base1, faces])
        got = pipe.generate(ip_adapter_image=[None, face], **run)
        assert rel_err(got, want) <= 1e-4
        assert rel_err(pipe.generate(ip_adapter_clip_embeds=[None, states1], **run), got) <= 1e-5
        other = pipe.generate(ip_adapter_image=[None, _image(seed=9)], **run)
        assert rel_err(other, got) > 1e-4  # (the second adapter's crop counts)
    finally:
        ref.unload_ip_adapter()
        ref.unload_lora_weights()
        pipe.unload_ip_adapter()
        pipe.unload_lora()


def test_cli_face_id_plus_beside_a_base_adapter(plus, tmp_path):
    """`--ip-adapter BASE --ip-adapter PLUSV2 --ip-adapter-embeds B --ip-adapter-embeds FACE --ip-adapter-image none
    --ip-adapter-image CROP`: the API's run with the list form (the base adapter's negative zeros, Face ID Plus's
    face embeddings' zeros) and the crop for the second adapter only."""
    from PIL import Image
    from safetensors.torch import load_file, save_file

    import fastdiff
    from test_cli import fastdiff as run_cli

    ref, pipe, folder = plus
    root = os.path.dirname(folder)
    api = fastdiff.load(os.path.join(root, "pipe"))
    api.load_ip_adapter(folder, weight_name=["ip.safetensors", NAME])
    base = api._encode_ip_image(_image(seed=11), 0)[0][None].contiguous()  # (1, 1, D): the base adapter's features
    save_file({"embeds": base}, str(tmp_path / "base.safetensors"))
    save_file({"embeds": _embeds()[0]}, str(tmp_path / "face.safetensors"))
    _image(seed=6).save(tmp_path / "crop.png")
    two = ["--ip-adapter", os.path.join(folder, "ip.safetensors"), "--ip-adapter", os.path.join(folder, NAME),
           "--ip-adapter-embeds", "base.safetensors", "--ip-adapter-embeds", "face.safetensors"]
    r = run_cli("generate", os.path.join(root, "pipe"), "--prompt", "a red cat", "--cfg", "3", "--steps", "2", "--n",
                "1", *two, "--ip-adapter-image", "none", "--ip-adapter-image", "crop.png", "--no-progress",
                "--output-latents", "lat.safetensors", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    faces = _embeds()[0].reshape(1, 1, -1)
    want = api.generate(prompt="a red cat", cfg_scale=3, steps=2, seeds=[0], progress=False,
                        ip_adapter_image_embeds=[torch.cat([torch.zeros_like(base), base]),
                                                 torch.cat([torch.zeros_like(faces), faces])],
                        ip_adapter_image=[None, Image.open(tmp_path / "crop.png")])
    assert rel_err(load_file(str(tmp_path / "lat.safetensors"))["latents"], want) <= 1e-6
    r = run_cli("generate", os.path.join(root, "pipe"), "--prompt", "a red cat", "--steps", "1",
                "--ip-adapter", os.path.join(folder, NAME), "--ip-adapter-image", "none",
                "--output-latents", "x.safetensors", "--no-progress", cwd=tmp_path)
    assert r.returncode == 2 and "'none' marks an adapter that takes its features alone" in r.stderr
