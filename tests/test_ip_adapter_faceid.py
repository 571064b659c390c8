"""IP-Adapter Face ID (a face embedding projected by an MLP, and a LoRA on every attention) against diffusers'
``load_ip_adapter`` (which loads the LoRA through PEFT) on a tiny SD pipeline; the LoRA's life as diffusers keeps
it; refusals."""

import os

import pytest
import torch

from fastdiff.errors import BadArgumentError, StateDictMismatchError
from helpers import rel_err
from test_ip_adapter import _image, _latents, diffusers  # noqa: F401 (diffusers: the reference, its skip)
from test_prompts import sd_pipelines

pytest.importorskip("peft", reason="diffusers loads Face ID's LoRA through PEFT")

FACE = 12  # the face embedding's width (insightface's is 512)


def _face_id_adapter(folder: str, unet, seed: int = 21, rank: int = 2) -> str:
    """ip-adapter-faceid's layout: image_proj.proj.0 / proj.2 / norm, and per attention processor i (diffusers'
    order) the LoRA ``ip_adapter.i.to_{q,k,v,out}_lora.{down,up}.weight``, the image branch at odd i."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim

    def rand(*shape, scale=0.3):
        return torch.randn(*shape, generator=g) * scale

    weights = {"image_proj.proj.0.weight": rand(2 * FACE, FACE), "image_proj.proj.0.bias": rand(2 * FACE, scale=0.1),
               "image_proj.proj.2.weight": rand(4 * cross, 2 * FACE), "image_proj.proj.2.bias": rand(4 * cross),
               "image_proj.norm.weight": 1 + rand(cross, scale=0.1), "image_proj.norm.bias": rand(cross, scale=0.1)}
    modules = dict(unet.named_modules())
    for i, name in enumerate(unet.attn_processors):
        attn = modules[name[:-len(".processor")]]
        for key, layer in (("to_q", attn.to_q), ("to_k", attn.to_k), ("to_v", attn.to_v), ("to_out", attn.to_out[0])):
            weights[f"ip_adapter.{i}.{key}_lora.down.weight"] = rand(rank, layer.in_features)
            weights[f"ip_adapter.{i}.{key}_lora.up.weight"] = rand(layer.out_features, rank, scale=0.2)
        if i % 2:
            for kv in "kv":
                weights[f"ip_adapter.{i}.to_{kv}_ip.weight"] = rand(attn.to_k.out_features, cross)
    save_file(weights, os.path.join(folder, "faceid.safetensors"))
    return folder


@pytest.fixture(scope="module")
def face(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("faceid"))
    ref, pipe = sd_pipelines(folder)
    return ref, pipe, _face_id_adapter(os.path.join(folder, "adapter"), ref.unet)


def _embeds(seed=4):
    return torch.nn.functional.normalize(torch.randn(1, 1, FACE, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_face_id_equals_diffusers(face, cfg):
    """The face embedding (negative: zeros, as diffusers' Face ID examples stack them) and the merged LoRA: diffusers'
    latents; the LoRA counts (scale 0 leaves it, and still differs from the plain run)."""
    ref, pipe, folder = face
    plain = pipe.generate(prompt="a red cat", latents=_latents(), steps=3, cfg_scale=cfg, progress=False)
    e = _embeds()
    ref.load_ip_adapter(folder, subfolder="", weight_name="faceid.safetensors", image_encoder_folder=None)
    pipe.load_ip_adapter(folder, weight_name="faceid.safetensors", scale=0.8)  # (no encoder read: none there)
    ref.set_ip_adapter_scale(0.8)
    try:
        listed = [torch.cat([torch.zeros_like(e), e])] if cfg > 1 else [e]
        want = ref("a red cat", latents=_latents(), ip_adapter_image_embeds=listed, num_inference_steps=3,
                   guidance_scale=cfg, output_type="latent", num_images_per_prompt=2).images
        got = pipe.generate(prompt="a red cat", latents=_latents(), steps=3, cfg_scale=cfg, progress=False,
                            ip_adapter_image_embeds=e)
        assert rel_err(got, want) <= 1e-5
        assert rel_err(pipe.generate(prompt="a red cat", latents=_latents(), steps=3, cfg_scale=cfg, progress=False,
                                     ip_adapter_image_embeds=listed), got) <= 1e-6
        pipe.set_ip_adapter_scale(0.0)  # the image branch off: the LoRA alone still changes the run
        assert rel_err(pipe.generate(prompt="a red cat", latents=_latents(), steps=3, cfg_scale=cfg,
                                     progress=False, ip_adapter_image_embeds=e), plain) > 1e-4
    finally:
        ref.unload_ip_adapter()
        ref.unload_lora_weights()
        pipe.unload_ip_adapter()
        pipe.unload_lora()
    assert torch.equal(pipe.generate(prompt="a red cat", latents=_latents(), steps=3, cfg_scale=cfg, progress=False),
                       plain)


def test_face_id_lora_merges_once_and_stays_until_unload_lora(face):
    """Loading the same Face ID adapter again does not merge its LoRA twice (diffusers loads ``faceid_0`` once);
    unload_ip_adapter keeps the LoRA (as diffusers keeps its PEFT adapter), unload_lora removes it."""
    ref, pipe, folder = face
    kw = dict(prompt="a red cat", latents=_latents(), steps=2, cfg_scale=3.0, progress=False)
    plain = pipe.generate(**kw)
    pipe.load_ip_adapter(folder, weight_name="faceid.safetensors")
    try:
        once = pipe.generate(ip_adapter_image_embeds=_embeds(), **kw)
        pipe.load_ip_adapter(folder, weight_name="faceid.safetensors")
        assert torch.equal(pipe.generate(ip_adapter_image_embeds=_embeds(), **kw), once)
        pipe.unload_lora()
        pipe.load_ip_adapter([folder, folder], weight_name="faceid.safetensors", scale=[1.0, 0.0])  # (listed twice)
        assert torch.equal(pipe.generate(ip_adapter_image_embeds=[torch.cat([torch.zeros_like(_embeds()), _embeds()])]
                                         * 2, **kw), once)  # (its LoRA merged once)
        pipe.load_ip_adapter(folder, weight_name="faceid.safetensors")
        pipe.unload_ip_adapter()
        lora_only = pipe.generate(**kw)
        assert rel_err(lora_only, plain) > 1e-4
        pipe.unload_lora()
        assert torch.equal(pipe.generate(**kw), plain)
        pipe.load_ip_adapter(folder, weight_name="faceid.safetensors")  # (merged again after unload_lora)
        assert torch.equal(pipe.generate(ip_adapter_image_embeds=_embeds(), **kw), once)
        # unload_lora, another LoRA, then Face ID again: its LoRA merges anew (on top of the other)
        pipe.unload_ip_adapter()
        pipe.unload_lora()
        other = _face_id_adapter(os.path.join(os.path.dirname(folder), "other"), ref.unet, seed=30)
        from safetensors.torch import load_file
        from fastdiff.models.ip_faceid import is_lora_key

        lora = {f"unet.{k}": v for k, v in _peft_lora(load_file(os.path.join(other, "faceid.safetensors")),
                                                       ref.unet).items()}
        pipe.load_lora(lora)
        with_other = pipe.generate(**kw)
        pipe.load_ip_adapter(folder, weight_name="faceid.safetensors")
        both = pipe.generate(ip_adapter_image_embeds=_embeds(), **kw)
        assert rel_err(both, once) > 1e-4 and rel_err(both, with_other) > 1e-4
        # another Face ID adapter while this one's LoRA is merged: refused, nothing changed
        with pytest.raises(BadArgumentError, match="another IP-Adapter Face ID's LoRA is merged"):
            pipe.load_ip_adapter(other, weight_name="faceid.safetensors")
        assert torch.equal(pipe.generate(ip_adapter_image_embeds=_embeds(), **kw), both)
        assert is_lora_key("0.to_q_lora.down.weight") and not is_lora_key("1.to_k_ip.weight")
    finally:
        pipe.unload_ip_adapter()
        pipe.unload_lora()


def _peft_lora(face_id_state: dict, unet) -> dict:
    """A Face ID file's LoRA as a plain LoRA in PEFT names (lora_A / lora_B per attention projection)."""
    names = [n[:-len(".processor")] for n in unet.attn_processors]
    out = {}
    for key, value in face_id_state.items():
        parts = key.split(".")
        if len(parts) == 5 and parts[2].endswith("_lora"):
            layer = parts[2][:-len("_lora")]
            layer = "to_out.0" if layer == "to_out" else layer
            out[f"{names[int(parts[1])]}.{layer}.lora_{'A' if parts[3] == 'down' else 'B'}.weight"] = value
    return out


def test_face_id_refusals(face, tmp_path):
    from safetensors.torch import load_file, save_file

    ref, pipe, folder = face
    pipe.load_ip_adapter(folder, weight_name="faceid.safetensors")
    try:
        with pytest.raises(BadArgumentError, match="Face ID reads a face-recognition embedding"):
            pipe.generate(prompt="a red cat", steps=1, progress=False, ip_adapter_image=_image())
    finally:
        pipe.unload_ip_adapter()
        pipe.unload_lora()
    state = load_file(os.path.join(folder, "faceid.safetensors"))
    state.pop("ip_adapter.0.to_q_lora.up.weight")
    save_file(state, str(tmp_path / "short.safetensors"))
    with pytest.raises(StateDictMismatchError, match=r"1 missing key.*0\.to_q_lora\.up\.weight"):
        pipe.load_ip_adapter(str(tmp_path / "short.safetensors"))
    other = {k: v for k, v in state.items() if not k.startswith("image_proj.")}
    other["image_proj.mapping.weight"] = torch.zeros(4, 4)  # (Face ID Plus: tests/test_ip_adapter_faceid_plus.py)
    save_file(other, str(tmp_path / "other.safetensors"))
    with pytest.raises(BadArgumentError, match="an IP-Adapter of another kind"):
        pipe.load_ip_adapter(str(tmp_path / "other.safetensors"))
    assert pipe.model.ip_projection is None and not pipe._lora_saved  # (nothing attached or merged)


def test_cli_face_id_with_embeds(face, tmp_path):
    """`fastdiff generate --ip-adapter FACEID --ip-adapter-embeds FACE.safetensors`: the API's result."""
    from safetensors.torch import load_file, save_file

    import fastdiff
    from test_cli import fastdiff as run_cli

    ref, pipe, folder = face
    save_file({"embeds": _embeds()[0]}, str(tmp_path / "face.safetensors"))
    root = os.path.dirname(folder)
    r = run_cli("generate", os.path.join(root, "pipe"), "--prompt", "a red cat", "--cfg", "3", "--steps", "2", "--n",
                "1", "--ip-adapter", os.path.join(folder, "faceid.safetensors"), "--ip-adapter-embeds",
                "face.safetensors", "--output-latents", "lat.safetensors", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    api = fastdiff.load(os.path.join(root, "pipe"))
    api.load_ip_adapter(os.path.join(folder, "faceid.safetensors"))
    want = api.generate(prompt="a red cat", cfg_scale=3, steps=2, seeds=[0], progress=False,
                        ip_adapter_image_embeds=_embeds()[0])
    assert torch.equal(load_file(str(tmp_path / "lat.safetensors"))["latents"], want)
