"""Native DiT: official fixture parity, diffusers parity, presets, meta loading, and refusals."""

import dataclasses
import os

import pytest
import torch

import fastdiff

from fastdiff.checkpoints.dit import (
    build_dit,
    convert_diffusers_dit,
    dit_config_from_diffusers,
    is_diffusers_dit_config,
    is_official_dit_state_dict,
    load_dit,
    load_diffusers_dit,
    load_into,
    load_official_dit,
    official_dit_config_from_state_dict,
)
from fastdiff.checkpoints.io import read_torch_file
from fastdiff.errors import BadArgumentError, CheckpointError, StateDictMismatchError, UnsupportedConfigError
from fastdiff.models import layers
from fastdiff.models.dit import DIT_PRESETS, DiT, DiTConfig, count_params, sincos_pos_embed_2d

FIXTURES = os.path.abspath(os.environ.get(
    "FASTDIFF_FIXTURES", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "fixtures")))


def fixture(*parts):
    p = os.path.join(FIXTURES, *parts)
    if not os.path.exists(p):
        pytest.skip(f"reference fixture {p} not present (set FASTDIFF_FIXTURES)")
    return p


@pytest.fixture(scope="module")
def ref():
    from safetensors.torch import load_file

    return load_file(fixture("dit", "reference.safetensors"))


@pytest.fixture(scope="module")
def official():
    """(config, state dict, model) of dit_tiny.pt; the fixture was built with num_heads=4."""
    config, sd, notes = load_official_dit(fixture("dit", "dit_tiny.pt"), num_heads=4)
    assert notes == []  # the head count was given: nothing guessed
    return config, sd, build_dit(config, sd)


def _close(a, b, rtol=1e-5, atol=2e-5):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# --- official facebookresearch/DiT fixture ---------------------------------------------------------

def test_official_config_inferred_from_weights(official):
    import json

    config, sd, _ = official
    with open(fixture("dit", "config.json")) as f:
        args = json.load(f)["constructor_args"]
    for k, v in args.items():
        assert getattr(config, k) == v, k
    assert is_official_dit_state_dict(sd)
    # without an override: no official preset has hidden 64, so hidden // 64 = 1 head
    assert official_dit_config_from_state_dict(sd).num_heads == 1
    assert official_dit_config_from_state_dict(sd, num_heads=8).num_heads == 8


def test_official_forward_parity(official, ref):
    _, _, model = official
    with torch.no_grad():
        _close(model(ref["x"], ref["t"], ref["y"]), ref["out"])


def test_official_forward_with_cfg_parity(official, ref):
    _, _, model = official
    with torch.no_grad():
        out = model.forward_with_cfg(ref["x_cfg"], ref["t_cfg"], ref["y_cfg"], cfg_scale=4.0)
    _close(out, ref["out_cfg"])
    # official guides channels 0..2 only: channel 3 passes through, cond rows != uncond rows
    assert not torch.allclose(out[:2, 3], out[2:, 3])
    torch.testing.assert_close(out[:2, :3], out[2:, :3], rtol=0, atol=0)


def test_forward_with_cfg_all_eps_channels(official, ref):
    _, _, model = official
    with torch.no_grad():
        raw = model(ref["x_cfg"][:2].repeat(2, 1, 1, 1), ref["t_cfg"], ref["y_cfg"])
        out = model.forward_with_cfg(ref["x_cfg"], ref["t_cfg"], ref["y_cfg"], 4.0, guided_channels=None)
    guided = raw[2:, :4] + 4.0 * (raw[:2, :4] - raw[2:, :4])
    _close(out[:, :4], torch.cat([guided, guided]))
    _close(out[:, 4:], raw[:, 4:])


def test_train_checkpoint_uses_ema(ref):
    path = fixture("dit", "dit_tiny_train_ckpt.pt")
    with torch.no_grad():
        _close(load_dit(path, num_heads=4)(ref["x"], ref["t"], ref["y"]), ref["out"])
        # the 'model' weights are readable too, and are what the fixture says they are: different
        obj = read_torch_file(path)
        config = official_dit_config_from_state_dict(obj["model"], num_heads=4)
        out_model = build_dit(config, obj["model"])(ref["x"], ref["t"], ref["y"])
    _close(out_model, ref["out_with_train_ckpt_model_weights"])
    assert not torch.allclose(out_model, ref["out"], rtol=1e-5, atol=2e-5)


def test_pos_embed_table_is_the_official_one(official):
    _, sd, _ = official
    torch.testing.assert_close(sincos_pos_embed_2d(64, 4)[None], sd["pos_embed"], rtol=0, atol=0)
    torch.testing.assert_close(DiT(official[0]).pos_embed.detach(), sd["pos_embed"], rtol=0, atol=0)


def test_meta_build_and_assign(official, ref):
    config, sd, _ = official
    with torch.device("meta"):
        model = DiT(config)
    assert model.pos_embed.is_meta
    load_into(model, sd)  # assign chosen automatically for a meta model
    assert not any(t.is_meta for t in model.state_dict().values())
    assert model.pos_embed.requires_grad is False
    assert model.x_embedder.proj.weight.data_ptr() == sd["x_embedder.proj.weight"].data_ptr()  # no copy
    # a state dict without the (derived) pos_embed: recomputed, not lost on meta
    with torch.device("meta"):
        model2 = DiT(config)
    load_into(model2, {k: v for k, v in sd.items() if k != "pos_embed"})
    torch.testing.assert_close(model2.pos_embed.detach(), sd["pos_embed"], rtol=0, atol=0)
    with torch.no_grad():
        _close(model2.eval()(ref["x"], ref["t"], ref["y"]), ref["out"])


def test_timestep_and_label_forms(official, ref):
    _, _, model = official
    x = ref["x"]
    with torch.no_grad():
        base = model(x, ref["t"], ref["y"])
        torch.testing.assert_close(model(x, ref["t"].float(), ref["y"]), base, rtol=0, atol=0)
        scalar = model(x, torch.tensor(37), ref["y"])
        torch.testing.assert_close(scalar[0], base[0], rtol=0, atol=0)
        torch.testing.assert_close(model(x, 37, ref["y"])[0], base[0], rtol=0, atol=0)
        null = torch.full((2,), model.config.num_classes)
        torch.testing.assert_close(model(x, ref["t"]), model(x, ref["t"], null), rtol=0, atol=0)


def test_bad_forward_inputs(official, ref):
    _, _, model = official
    with pytest.raises(BadArgumentError, match="encoder_hidden_states"):
        model(ref["x"], ref["t"], ref["y"], encoder_hidden_states=torch.zeros(2, 3, 4))
    with pytest.raises(BadArgumentError, match="8x8"):
        model(torch.zeros(1, 4, 6, 6), ref["t"][:1], ref["y"][:1])
    no_null = DiT(dataclasses.replace(model.config, class_dropout_prob=0.0))
    with pytest.raises(BadArgumentError, match="class_labels"):
        no_null(ref["x"], ref["t"])


def test_fused_ops_follow_backend_switch(official):
    _, _, model = official
    assert layers.set_backend(model, "native") == "native"
    assert layers.op_backends(model) == {"ModulatedLayerNorm": "native", "Attention": "native"}
    n = sum(isinstance(m, layers.FusedOp) for m in model.modules())
    assert n == 3 * model.config.depth + 1  # per block: 2 norms (each adds the residual before it), attention core;
    # the final norm


def test_triton_backend_matches_native(official, ref):
    kernels = pytest.importorskip("fastdiff.kernels")
    if not all(hasattr(kernels, k) for k in ("adaln_modulate", "gated_residual", "attention")):
        pytest.skip("fastdiff.kernels does not provide adaln_modulate / gated_residual / attention yet")
    if not layers.triton_available()[0]:
        pytest.skip(layers.triton_available()[1])
    config, sd, _ = official
    model = build_dit(config, sd)
    layers.set_backend(model, "triton")
    try:
        with torch.no_grad():
            out = model(ref["x"], ref["t"], ref["y"])
    finally:
        layers.set_backend(model, "native")
    assert _rel(out, ref["out"]) <= 1e-4


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_fused_adaln_matches_official(official, ref, backend):
    """fuse_adaln: one matmul for every adaLN projection, still equal to the official DiT's output; the layers'
    weights become views of the fused one (no second copy) and the state dict keeps the official layout."""
    from fastdiff.models.fuse import fuse_adaln

    if backend == "triton" and not layers.triton_available()[0]:
        pytest.skip(layers.triton_available()[1])
    config, sd, _ = official
    model = build_dit(config, sd)
    assert fuse_adaln(model) == config.depth + 1
    assert model.adaln_weight.shape == (config.depth * 6 * config.hidden_size + 2 * config.hidden_size,
                                         config.hidden_size)
    lin = model.blocks[1].adaLN_modulation[1]
    assert lin.weight.untyped_storage().data_ptr() == model.adaln_weight.untyped_storage().data_ptr()
    layers.set_backend(model, backend)
    try:
        with torch.no_grad():
            out = model(ref["x"], ref["t"], ref["y"])
    finally:
        layers.set_backend(model, "native")
    if backend == "native":
        _close(out, ref["out"])
    else:
        assert _rel(out, ref["out"]) <= 1e-4
    state = model.state_dict()
    assert state.keys() == sd.keys()  # the fused buffers are not part of the checkpoint
    for k in ("blocks.1.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias"):
        torch.testing.assert_close(state[k], sd[k], rtol=0, atol=0)


def _shares_stack(model) -> bool:
    ptr = model.adaln_weight.untyped_storage().data_ptr()
    return all(b.adaLN_modulation[1].weight.untyped_storage().data_ptr() == ptr for b in model.blocks)


@pytest.mark.parametrize("change", ["to", "assign", "deepcopy"])
def test_fused_adaln_follows_the_layers_weights(official, ref, change):
    """The stack is always the layers' current weights: after .to(), a load with assign=True or a deepcopy
    (each gives the layers storages of their own) it is rebuilt, shared again, and a later load reaches it."""
    import copy

    from fastdiff.models.fuse import fuse_adaln

    config, sd, _ = official
    model = build_dit(config, sd)
    fuse_adaln(model)
    changed = {k: (v * 0.5 if "adaLN_modulation" in k else v) for k, v in sd.items()}
    if change == "to":
        model = model.to(torch.float64).to(torch.float32)
        model.load_state_dict(changed)
    elif change == "assign":
        model.load_state_dict({k: v.clone() for k, v in changed.items()}, assign=True)
    else:
        model = copy.deepcopy(model)
        model.load_state_dict(changed)
    assert model.adaln_weight is not None and _shares_stack(model)
    with torch.no_grad():
        _close(model(ref["x"], ref["t"], ref["y"]), build_dit(config, changed)(ref["x"], ref["t"], ref["y"]))


def test_fused_adaln_trains_through_the_layers(official, ref):
    """With autograd on, the per-layer projections run (the stack is a buffer): their weights get gradients."""
    from fastdiff.models.fuse import fuse_adaln

    config, sd, _ = official
    model = build_dit(config, sd)
    fuse_adaln(model)
    model(ref["x"], ref["t"], ref["y"]).square().mean().backward()
    assert model.blocks[0].adaLN_modulation[1].weight.grad is not None


def test_fused_adaln_leaves_per_block_conditioning_alone():
    """diffusers' random-init DiT gives every block its own embedders: there is no shared conditioning to
    project once, so nothing is fused."""
    from fastdiff.models.fuse import fuse_adaln

    model = DiT(DiTConfig(input_size=4, hidden_size=16, depth=2, num_heads=2, num_classes=3,
                          per_block_conditioning=True))
    assert fuse_adaln(model) == 0 and model.adaln_weight is None


# --- diffusers DiTTransformer2DModel / Transformer2DModel --------------------------------------------

DIFFUSERS_CASES = {
    # learned sigma (out 2C), patch 2, per-block embedders differ (random init)
    "sigma_p2": ("DiTTransformer2DModel", dict(
        num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=7), False),
    # out C, patch 4 on a 3x3 grid, odd channel / head counts, no qkv bias, exact GELU, large norm3 eps
    "eps_p4_odd": ("DiTTransformer2DModel", dict(
        num_attention_heads=3, attention_head_dim=8, in_channels=3, out_channels=3, num_layers=3,
        sample_size=12, patch_size=4, num_embeds_ada_norm=5, attention_bias=False, activation_fn="gelu",
        norm_eps=1e-2), False),
    # identical embedder copies (as in converted checkpoints): collapses to the official layout
    "shared_embedders": ("DiTTransformer2DModel", dict(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=3,
        sample_size=10, patch_size=2, num_embeds_ada_norm=7), True),
    # the older class (its folders load as DiTTransformer2DModel: test_a_large_legacy_folder_loads_as_diffusers...)
    "legacy_transformer2d": ("Transformer2DModel", dict(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        sample_size=10, patch_size=2, num_embeds_ada_norm=7, norm_type="ada_norm_zero",
        norm_elementwise_affine=False, activation_fn="gelu-approximate", attention_bias=True), False),
}


def _diffusers_model(cls_name, kwargs, shared):
    import warnings

    import diffusers

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = getattr(diffusers, cls_name)(**kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():  # no zero-initialised layer survives
            p.add_(torch.randn_like(p) * 0.05)
        if shared:
            emb0 = model.transformer_blocks[0].norm1.emb.state_dict()
            for block in model.transformer_blocks[1:]:
                block.norm1.emb.load_state_dict(emb0)
    return model, {**dict(model.config), "_class_name": cls_name}


@pytest.mark.parametrize("case", list(DIFFUSERS_CASES))
def test_diffusers_parity(case):
    cls_name, kwargs, shared = DIFFUSERS_CASES[case]
    ref_model, config_dict = _diffusers_model(cls_name, kwargs, shared)
    assert is_diffusers_dit_config(config_dict)
    config, sd = load_diffusers_dit(config_dict, ref_model.state_dict())
    assert config.per_block_conditioning is (not shared)
    model = build_dit(config, sd)
    if shared:
        assert set(model.state_dict()) == set(_official_keys(config.depth))
    g = torch.Generator().manual_seed(1)
    C, S, K = kwargs["in_channels"], kwargs["sample_size"], kwargs["num_embeds_ada_norm"]
    x = torch.randn(3, C, S, S, generator=g)
    t, y = torch.tensor([3, 500, 999]), torch.tensor([0, K - 1, K])  # K: the null class
    with torch.no_grad():
        want = ref_model(x, timestep=t, class_labels=y).sample
        got = model(x, t, y)
    assert got.shape == want.shape == (3, kwargs["out_channels"], S, S)
    assert _rel(got, want) <= 1e-5


def test_diffusers_config_without_weights_is_per_block():
    _, config_dict = _diffusers_model(*DIFFUSERS_CASES["shared_embedders"])
    assert dit_config_from_diffusers(config_dict).per_block_conditioning is True


def test_diffusers_collapse_refuses_different_embedders():
    ref_model, config_dict = _diffusers_model(*DIFFUSERS_CASES["sigma_p2"])
    config = dataclasses.replace(dit_config_from_diffusers(config_dict), per_block_conditioning=False)
    with pytest.raises(CheckpointError, match="per_block_conditioning"):
        convert_diffusers_dit(ref_model.state_dict(), config)


@pytest.mark.parametrize("field,value", [
    ("norm_type", "ada_norm"),
    ("activation_fn", "geglu"),
    ("norm_elementwise_affine", True),
    ("out_channels", 5),
    ("cross_attention_dim", 16),
    ("sample_size", 9),
    ("some_future_field", 1),
    ("_class_name", "UNet2DModel"),
])
def test_diffusers_unsupported_config_value(field, value):
    _, config_dict = _diffusers_model(*DIFFUSERS_CASES["sigma_p2"])
    with pytest.raises(UnsupportedConfigError) as e:
        dit_config_from_diffusers({**config_dict, field: value})
    assert e.value.field == field and e.value.value == value
    assert repr(field) in str(e.value) and repr(value) in str(e.value)


# --- presets, config, strict loading ----------------------------------------------------------------

def _official_keys(depth):
    keys = ["pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias", "y_embedder.embedding_table.weight",
            "final_layer.linear.weight", "final_layer.linear.bias", "final_layer.adaLN_modulation.1.weight",
            "final_layer.adaLN_modulation.1.bias"]
    keys += [f"t_embedder.mlp.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")]
    for b in range(depth):
        for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"):
            keys += [f"blocks.{b}.{m}.weight", f"blocks.{b}.{m}.bias"]
    return keys


def _official_param_count(depth, D, p, heads, C=4, latent=32, classes=1000, learn_sigma=True):
    """Parameters of official DiT (models.py) written out layer by layer, pos_embed included."""
    out = 2 * C if learn_sigma else C
    T = (latent // p) ** 2
    x_emb = C * D * p * p + D
    t_emb = 256 * D + D + D * D + D
    y_emb = (classes + 1) * D
    block = (3 * D * D + 3 * D) + (D * D + D) + (4 * D * D + 4 * D) + (4 * D * D + D) + (6 * D * D + 6 * D)
    final = (2 * D * D + 2 * D) + (D * p * p * out + p * p * out)
    return x_emb + t_emb + y_emb + depth * block + final + T * D


@pytest.mark.parametrize("name", list(DIT_PRESETS))
def test_presets_param_count(name):
    config = DiTConfig.from_name(name, input_size=32)
    preset = DIT_PRESETS[name]
    with torch.device("meta"):
        model = DiT(config)
    n = sum(p.numel() for p in model.parameters())
    assert n == count_params(config) == _official_param_count(
        preset["depth"], preset["hidden_size"], preset["patch_size"], preset["num_heads"])
    assert set(model.state_dict()) == set(_official_keys(preset["depth"]))
    if name == "DiT-XL/2":
        assert n == 675_129_632  # the paper's 675M


def test_config_dict_round_trip_and_refusals():
    config = DiTConfig.from_name("DiT-B/4", input_size=16, num_classes=10, learn_sigma=False)
    assert (config.hidden_size, config.depth, config.num_heads, config.patch_size) == (768, 12, 12, 4)
    assert DiTConfig.from_dict(config.to_dict()) == config
    assert DiTConfig.from_dict({**config.to_dict(), "_format": "fastdiff"}) == config
    with pytest.raises(UnsupportedConfigError) as e:
        DiTConfig.from_dict({**config.to_dict(), "use_rope": True})
    assert (e.value.field, e.value.value) == ("use_rope", True)
    with pytest.raises(UnsupportedConfigError, match="num_heads"):
        DiTConfig(hidden_size=64, num_heads=5)
    with pytest.raises(UnsupportedConfigError, match="mlp_act"):
        DiTConfig(mlp_act="swiglu")
    with pytest.raises(BadArgumentError, match="DiT-XL/2"):
        DiTConfig.from_name("DiT-XXL/2")


def test_state_dict_mismatch_names_keys(official):
    config, sd, _ = official
    bad = dict(sd)
    del bad["blocks.1.mlp.fc2.bias"]
    bad["blocks.7.attn.qkv.weight"] = torch.zeros(3)
    bad["final_layer.linear.weight"] = torch.zeros(16, 64)
    with torch.device("meta"):
        model = DiT(config)
    with pytest.raises(StateDictMismatchError) as e:
        load_into(model, bad)
    err = e.value
    assert err.missing == ["blocks.1.mlp.fc2.bias"]
    assert err.unexpected == ["blocks.7.attn.qkv.weight"]
    assert err.mismatched == [("final_layer.linear.weight", (32, 64), (16, 64))]
    for s in ("blocks.1.mlp.fc2.bias", "blocks.7.attn.qkv.weight", "expected (32, 64), found (16, 64)"):
        assert s in str(err)
    # a config that does not fit the checkpoint (depth 3 vs 2 blocks)
    with pytest.raises(StateDictMismatchError, match="blocks.2"):
        build_dit(dataclasses.replace(config, depth=3), sd)


def test_mlp_fused_gelu_path_reshapes_like_the_plain_one(monkeypatch):
    """The CUDA-only fc1 + GELU(tanh) GEMM path (cuBLASLt epilogue), run here with torch's definition of the op."""
    from fastdiff.models.dit import Mlp

    mlp = Mlp(12, 20)
    x = torch.randn(2, 5, 12)
    want = mlp(x)
    assert not mlp.fused_gelu(x)  # a CPU tensor: torch's CPU kernel of the op uses the exact GELU
    calls = []

    def addmm_gelu(bias, mat1, mat2, use_gelu=False):  # torch's decomposition of _addmm_activation on CUDA
        calls.append(tuple(mat1.shape))
        return torch.nn.functional.gelu(torch.addmm(bias, mat1, mat2), approximate="tanh")

    monkeypatch.setattr(torch, "_addmm_activation", addmm_gelu)
    monkeypatch.setattr(Mlp, "fused_gelu", lambda self, x: True)
    torch.testing.assert_close(mlp(x), want)
    assert calls == [(10, 12)]


def test_mlp_falls_back_when_the_fused_gemm_is_refused(monkeypatch):
    from fastdiff.models.dit import Mlp

    mlp = Mlp(12, 20)
    x = torch.randn(2, 5, 12)
    want = mlp(x)

    def refuse(*a, **k):
        raise RuntimeError("CUBLAS_STATUS_NOT_SUPPORTED")

    monkeypatch.setattr(torch, "_addmm_activation", refuse)
    monkeypatch.setattr(Mlp, "fused_gelu", lambda self, x: not self.__dict__.get("_refused"))
    torch.testing.assert_close(mlp(x), want)
    assert mlp._refused and not mlp.fused_gelu(x)


def test_a_large_legacy_folder_loads_as_diffusers_loads_it(tmp_path):
    """A Transformer2DModel DiT folder of sample_size >= 128, or with an interpolation_scale: diffusers'
    from_pretrained builds it as DiTTransformer2DModel, whose position table has no interpolation scale (the legacy
    class built directly would use 2)."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers' DiT loading is the reference")
    from helpers import perturb_

    cfg = dict(num_attention_heads=1, attention_head_dim=8, in_channels=4, num_layers=1, sample_size=128,
               patch_size=16, num_embeds_ada_norm=10, norm_type="ada_norm_zero", norm_elementwise_affine=False,
               attention_bias=True, activation_fn="gelu-approximate")
    for folder, extra in ((tmp_path / "default", {}), (tmp_path / "explicit", dict(interpolation_scale=2.0))):
        torch.manual_seed(0)
        perturb_(diffusers.Transformer2DModel(**cfg, **extra).eval(), 0).save_pretrained(folder)
        _check_loads_as_diffusers(diffusers, folder)


def _check_loads_as_diffusers(diffusers, folder):
    from helpers import rel_err

    ref = diffusers.Transformer2DModel.from_pretrained(str(folder)).eval()
    pipe = fastdiff.load(str(folder))
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(2, 4, 128, 128, generator=g), torch.tensor([10, 900]), torch.tensor([1, 7])
    with torch.no_grad():
        assert rel_err(pipe.model(x, t, class_labels=y), ref(x, timestep=t, class_labels=y).sample) <= 1e-5


def test_official_dit_samples_without_clipping_as_its_sample_py():
    """An official DiT checkpoint loaded with no scheduler= ran diffusers' DDPM default, clip_sample=True: its latents
    were clamped to [-1, 1] (official sample.py: clip_denoised=False); CFG guides channels 0..2 whatever learn_sigma
    (official forward_with_cfg); the arch: presets' DDIM does not clip either."""
    pipe = fastdiff.load(fixture("dit", "dit_tiny.pt"), num_heads=4)
    assert pipe.spec.scheduler["clip_sample"] is False and pipe.spec.guided_channels == 3
    out = pipe.generate(seeds=[0], class_labels=[1], steps=4, progress=False)
    assert float(out.abs().max()) > 1.5
    assert fastdiff.load("arch:tiny-dit").spec.scheduler["clip_sample"] is False
