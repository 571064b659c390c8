"""LyCORIS files (LoCon with Tucker cores, LoHa, LoKr, full, (IA)^3, OFT / BOFT, GLoRA in kohya's names) merged by ``pipe.load_lora``, against LyCORIS's
own modules: the merged layer computes what LyCORIS's module computes around the original layer (its forward is
what the file was trained with), one layer at a time and end to end through a diffusers pipeline whose layers
LyCORIS wraps."""

import copy
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastdiff
import fastdiff.lora
from fastdiff.errors import CheckpointError, UnsupportedConfigError
from fastdiff.lora import read_lora
from helpers import rel_err

try:
    import lycoris  # noqa: E402
    import lycoris.modules  # noqa: E402,F401
except ImportError:
    pytest.skip("LyCORIS's modules are the reference (pip install lycoris-lora)", allow_module_level=True)
except Exception as e:  # pragma: no cover - lycoris-lora 4.1 registers custom ops torch < 2.6 cannot read
    pytest.skip(f"lycoris-lora does not import with torch {torch.__version__}: {type(e).__name__}: "
                f"{str(e).splitlines()[0][:120]}", allow_module_level=True)


def _module(algo: str, name: str, layer: nn.Module, rank: int, alpha: float, multiplier: float = 1.0,
            seed: int = 0, **options):
    """LyCORIS's ``algo`` module around ``layer`` (applied: ``layer`` now runs it), every parameter random (LyCORIS
    starts one factor at zero, which would test nothing)."""
    from lycoris.modules.boft import ButterflyOFTModule
    from lycoris.modules.diag_oft import DiagOFTModule
    from lycoris.modules.full import FullModule
    from lycoris.modules.glora import GLoRAModule
    from lycoris.modules.ia3 import IA3Module
    from lycoris.modules.locon import LoConModule
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule
    from lycoris.modules.norms import NormModule

    cls = {"locon": LoConModule, "loha": LohaModule, "lokr": LokrModule, "full": FullModule, "ia3": IA3Module,
           "oft": DiagOFTModule, "boft": ButterflyOFTModule, "glora": GLoRAModule,
           "norm": NormModule}[algo]
    options = dict(options)
    rank = options.pop("lora_dim", rank)  # (a case's own: OFT's blocks wider than 2)
    module = cls(name, layer, multiplier=multiplier, lora_dim=rank, alpha=alpha, **options)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    module.apply_to()
    return module


def _state(modules) -> dict:
    """The file LyCORIS writes for ``modules``: ``<lora name>.<tensor>`` (alpha included)."""
    return {f"{m.lora_name}.{k}": v.detach().clone() for m in modules for k, v in m.state_dict().items()
            if k != "scalar"}


LAYERS = {  # (layer, input)
    "linear": (lambda: nn.Linear(12, 20), (3, 12)),
    "conv3x3": (lambda: nn.Conv2d(8, 12, 3, padding=1), (2, 8, 6, 6)),
    "conv1x1": (lambda: nn.Conv2d(8, 12, 1), (2, 8, 5, 5)),
    # (wide enough for LoKr to decompose both halves at rank 2)
    "linear_wide": (lambda: nn.Linear(48, 64), (3, 48)),
    "conv_wide": (lambda: nn.Conv2d(32, 48, 3, padding=1), (2, 32, 5, 5)),
    "linear_odd": (lambda: nn.Linear(15, 21), (3, 15)),
    "conv_odd": (lambda: nn.Conv2d(9, 15, (1, 3), padding=(0, 1)), (2, 9, 4, 5)),
    "conv_32": (lambda: nn.Conv2d(6, 32, 3, padding=1), (2, 6, 4, 4)),  # (BOFT's butterfly: 2^k rows)
}
CASES = [  # (algo, layer, LyCORIS options)
    ("locon", "linear", {}), ("locon", "conv3x3", {}), ("locon", "conv3x3", dict(use_tucker=True)),
    ("loha", "linear", {}), ("loha", "conv3x3", {}), ("loha", "conv3x3", dict(use_tucker=True)),
    ("loha", "conv1x1", {}),
    ("lokr", "linear", dict(factor=4)), ("lokr", "linear_wide", dict(factor=8, decompose_both=True)),
    ("lokr", "linear", dict(factor=2, full_matrix=True)), ("lokr", "conv3x3", dict(factor=4)),
    ("lokr", "conv_wide", dict(factor=8, use_tucker=True, decompose_both=True)), ("lokr", "conv1x1", dict(factor=2)),
    # (w1 decomposed, w2 whole; rs_lora folded into the file's alpha; odd and prime channel counts)
    ("lokr", "linear_wide", dict(factor=8, decompose_both=True, unbalanced_factorization=True)),
    ("lokr", "linear_wide", dict(factor=8, rs_lora=True)), ("loha", "linear", dict(rs_lora=True)),
    ("locon", "conv3x3", dict(rs_lora=True)), ("lokr", "linear_odd", dict(factor=-1)), ("loha", "conv_odd", {}),
    ("lokr", "conv_odd", dict(factor=3)), ("locon", "conv_odd", dict(use_tucker=True)),
    # (full: the weight's and the bias's whole updates; (IA)^3: a factor per output or input channel)
    ("full", "linear", {}), ("full", "conv3x3", {}), ("full", "conv_odd", {}),
    ("ia3", "linear", {}), ("ia3", "linear_odd", dict(train_on_input=True)), ("ia3", "conv3x3", {}),
    ("ia3", "conv_odd", dict(train_on_input=True)),
    # (OFT: blocks of the output rows, constrained or not, rescaled or not; BOFT: butterfly stages of them)
    ("oft", "linear", {}), ("oft", "conv3x3", dict(rescaled=True)), ("oft", "linear_wide", dict(constraint=1e-3)),
    ("oft", "conv1x1", {}), ("boft", "linear_wide", {}), ("boft", "conv_32", dict(rescaled=True)),
    ("boft", "linear_wide", dict(constraint=1e-3)), ("oft", "linear_wide", dict(lora_dim=8)),
    ("boft", "linear_wide", dict(lora_dim=8)), ("boft", "conv_32", dict(lora_dim=4)),
    # (GLoRA: W a1 a2 + b1 b2)
    ("glora", "linear", {}), ("glora", "conv3x3", {}), ("glora", "conv_odd", {}), ("glora", "linear_odd", {}),
]


def _case_id(value) -> str:
    return str(value) if not isinstance(value, dict) else "-".join(f"{k}={x}" for k, x in value.items()) or "plain"


@pytest.mark.parametrize("algo,kind,options", CASES, ids=_case_id)
@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_each_layer_kind_merges_to_what_lycoris_computes(algo, kind, options, scale):
    make, shape = LAYERS[kind]
    torch.manual_seed(1)
    layer = make()
    original = copy.deepcopy(layer)
    module = _module(algo, "lora_unet_x", layer, rank=2, alpha=3.0, multiplier=scale, **options)
    x = torch.randn(shape)
    want = layer(x)  # (LyCORIS's forward: the original layer plus its update)
    (name, entry), = read_lora(_state([module])).items()
    assert name == ("network", "~x")
    merged = copy.deepcopy(original)
    fastdiff.lora.merge(fastdiff.lora.targets({"~x": entry}, nn.ModuleDict({"x": merged}), "test"), scale)
    with torch.no_grad():
        assert rel_err(merged(x), want) <= 1e-5
    assert rel_err(want, original(x)) > 1e-2  # (the update is not negligible)


DORA_CASES = [("locon", "linear", {}), ("locon", "conv3x3", dict(use_tucker=True)), ("loha", "conv3x3", {}),
              ("lokr", "linear_wide", dict(factor=8, decompose_both=True)), ("lokr", "conv3x3", dict(factor=4))]


@pytest.mark.parametrize("algo,kind,options", DORA_CASES, ids=_case_id)
@pytest.mark.parametrize("on_out", [True, False])
def test_lycoris_dora_merges_to_what_lycoris_computes(algo, kind, options, on_out):
    """LyCORIS's DoRA (``dora_scale``, a norm per output row or per input column): at a LoRA scale of 1 the merged
    layer computes LyCORIS's forward; at 0.6 it is 60% of the way from the original layer to it."""
    make, shape = LAYERS[kind]
    torch.manual_seed(3)
    layer = make()
    original = copy.deepcopy(layer)
    module = _module(algo, "lora_unet_x", layer, rank=2, alpha=3.0, weight_decompose=True, wd_on_out=on_out,
                     **options)
    state = _state([module])
    assert state["lora_unet_x.dora_scale"].shape[:2] == ((layer.weight.shape[0], 1) if on_out else
                                                         (1, layer.weight.shape[1]))
    x = torch.randn(shape)
    with torch.no_grad():
        want, before = layer(x), original(x)
    entry = read_lora(state)[("network", "~x")]
    for scale in (1.0, 0.6):
        merged = copy.deepcopy(original)
        fastdiff.lora.merge(fastdiff.lora.targets({"~x": entry}, nn.ModuleDict({"x": merged}), "test"), scale)
        with torch.no_grad():
            assert rel_err(merged(x), before + scale * (want - before)) <= 1e-5, scale
    assert rel_err(want, before) > 1e-2


def test_the_cases_cover_every_layout_lycoris_writes():
    """The test above covers LyCORIS's layouts: Tucker cores, LoKr's whole and decomposed halves."""
    torch.manual_seed(2)
    keys = {}
    for algo, kind, options in CASES:
        keys[(algo, kind, str(options))] = set(_module(algo, "lora_unet_x", LAYERS[kind][0](), 2, 3.0,
                                                       **options).state_dict())
    assert "lora_mid.weight" in keys[("locon", "conv3x3", str(dict(use_tucker=True)))]
    assert {"hada_t1", "hada_t2"} <= keys[("loha", "conv3x3", str(dict(use_tucker=True)))]
    assert "lokr_w1" in keys[("lokr", "linear", str(dict(factor=4)))]
    assert {"lokr_w1_a", "lokr_w2_a"} <= keys[("lokr", "linear_wide", str(dict(factor=8, decompose_both=True)))]
    assert {"lokr_w1", "lokr_w2"} <= keys[("lokr", "linear", str(dict(factor=2, full_matrix=True)))]
    assert "lokr_t2" in keys[("lokr", "conv_wide", str(dict(factor=8, use_tucker=True, decompose_both=True)))]
    assert keys[("full", "conv3x3", "{}")] == {"diff", "diff_b"}
    assert keys[("ia3", "linear", "{}")] == {"weight", "on_input"}
    assert keys[("oft", "conv3x3", str(dict(rescaled=True)))] == {"oft_blocks", "rescale", "alpha"}
    assert keys[("boft", "linear_wide", str(dict(lora_dim=8)))] == {"oft_blocks", "alpha"}
    assert keys[("glora", "conv3x3", "{}")] == {"a1.weight", "a2.weight", "b1.weight", "b2.weight", "alpha"}


UNET_LAYERS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1", "conv2", "time_emb_proj"]
TEXT_LAYERS = ["q_proj", "v_proj", "fc1"]
UNET_NORMS = ["norm1", "norm2", "norm3", "norm"]  # (resnets' GroupNorms, transformer blocks' LayerNorms)
TEXT_NORMS = ["layer_norm1", "layer_norm2"]


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    pytest.importorskip("diffusers", reason="a diffusers pipeline runs LyCORIS's modules (the reference)")
    from test_lora import tiny_pipeline_folder

    return tiny_pipeline_folder(str(tmp_path_factory.mktemp("lycoris")))


@pytest.mark.parametrize("algo,conv_options", [("loha", dict(use_tucker=True)), ("lokr", dict(factor=4)),
                                               ("locon", dict(use_tucker=True)), ("full", {}),
                                               ("ia3", dict(train_on_input=True)), ("oft", dict(rescaled=True)),
                                               ("glora", {}), ("norm", {})])
def test_a_lycoris_file_equals_diffusers_running_lycoris_modules(pipeline_folder, algo, conv_options):
    """Every UNet and text-encoder layer a file names (kohya's module names) takes its update: the latents equal a
    diffusers pipeline whose layers LyCORIS's modules wrap, at a LoRA scale of 0.7."""
    from test_lora import _reference, _want
    from test_prompts import PROMPTS, _latents

    folder, unet, text_encoder = pipeline_folder
    unet, text_encoder = copy.deepcopy(unet), copy.deepcopy(text_encoder)
    modules = []
    layers = (("lora_unet", unet, UNET_NORMS), ("lora_te", text_encoder, TEXT_NORMS)) if algo == "norm" else (
        ("lora_unet", unet, UNET_LAYERS), ("lora_te", text_encoder, TEXT_LAYERS))
    for prefix, model, targets in layers:
        for i, (name, layer) in enumerate(list(model.named_modules())):
            if any(name == t or name.endswith("." + t) for t in targets):
                options = conv_options if isinstance(layer, nn.Conv2d) else (
                    dict(factor=4) if algo == "lokr" else {})
                modules.append(_module(algo, f"{prefix}_{name.replace('.', '_')}", layer, rank=2, alpha=1.5,
                                       multiplier=0.7, seed=i, **options))
    assert len(modules) > 20
    latents = _latents()
    want = _want(_reference(os.path.dirname(folder), unet, text_encoder), latents)
    pipe = fastdiff.load(folder)
    pipe.load_lora(_state(modules), scale=0.7)
    got = pipe.generate(prompt=PROMPTS, latents=latents, steps=3, cfg_scale=3.0, progress=False)
    assert rel_err(got, want) <= 1e-4
    plain = fastdiff.load(folder).generate(prompt=PROMPTS, latents=latents, steps=3, cfg_scale=3.0, progress=False)
    assert rel_err(plain, want) > 1e-2


def test_what_is_refused_by_name():
    w = torch.randn(4, 2)
    cases = [
        ({"lora_unet_x.hada_w1_a": w}, CheckpointError, "without hada_w1_b"),
        ({"lora_unet_x.lokr_w1": torch.randn(2, 2)}, CheckpointError, "lokr_w2.*\\(lora_unet_x\\)"),
        ({"lora_unet_y.lora_down.weight": torch.randn(2, 4), "lora_unet_y.lora_up.weight": w,
          "lora_x.lokr_w1": torch.randn(2, 2)}, UnsupportedConfigError, "'lora_x'"),  # (the prefix first)
        ({"lora_unet_x.lokr_w1": torch.randn(2, 2), "lora_unet_x.lokr_t1": torch.randn(2, 2, 3, 3),
          "lora_unet_x.lokr_w2": torch.randn(2, 2)}, UnsupportedConfigError, "lokr_t1"),
        ({"lora_unet_x.a1.weight": torch.randn(2, 4), "lora_unet_x.a2.weight": torch.randn(4, 2),  # (GLoRA)
          "lora_unet_x.b1.weight": torch.randn(2, 4)}, CheckpointError, "a GLoRA layer without b2.weight"),
        ({"lora_unet_x.b_norm": torch.randn(4)}, CheckpointError, "a norm layer without w_norm"),
        ({"lora_unet_x.oft_blocks": torch.randn(2, 4, 4), "lora_unet_x.dora_scale": torch.randn(8, 1)},
         CheckpointError, "dora_scale beside an OFT layer"),
        ({"lora_unet_x.lora_down.weight": torch.randn(2, 4), "lora_unet_x.lora_up.weight": w,
          "lora_unet_x.hada_w1_a": w}, UnsupportedConfigError, "hada_w1_a"),
        ({"lora_unet_double_blocks_0_img_attn_qkv.hada_w1_a": w, "lora_unet_double_blocks_0_img_attn_qkv.hada_w1_b":
          w.T, "lora_unet_double_blocks_0_img_attn_qkv.hada_w2_a": w,
          "lora_unet_double_blocks_0_img_attn_qkv.hada_w2_b": w.T}, UnsupportedConfigError, "BFL"),
    ]
    for state, error, match in cases:
        with pytest.raises(error, match=match):
            read_lora(state)


def test_lycoris_own_wrapper_names_and_a_1x1_update_on_a_linear_layer():
    """``lycoris_<module>`` keys (LyCORIS's wrapper around one network) merge as ``lora_unet_<module>`` ones; a LoKr
    whose w2 is a 1x1 kernel merges into a linear layer (older SD 2.x files' proj_in / proj_out)."""
    torch.manual_seed(4)
    name, layer = next((n, m) for n, m in fastdiff.load("arch:tiny-sd-unet").model.named_modules()
                       if n.endswith("to_q"))
    out, inp = layer.weight.shape
    tensors = {"lokr_w1": torch.randn(2, 2), "lokr_w2": torch.randn(out // 2, inp // 2, 1, 1),
               "alpha": torch.tensor(2.0)}
    merged = []
    for prefix in ("lora_unet", "lycoris"):
        pipe = fastdiff.load("arch:tiny-sd-unet")
        pipe.load_lora({f"{prefix}_{name.replace('.', '_')}.{k}": v for k, v in tensors.items()}, scale=0.5)
        merged.append(dict(pipe.model.named_modules())[name].weight.detach().clone())
    want = layer.weight + 0.5 * torch.kron(tensors["lokr_w1"], tensors["lokr_w2"][..., 0, 0])
    assert torch.equal(merged[0], merged[1]) and rel_err(merged[0], want) <= 1e-6


def test_shapes_that_do_not_fit_are_refused_before_anything_merges():
    pipe = fastdiff.load("arch:tiny-sd-unet")
    before = {k: v.clone() for k, v in pipe.model.state_dict().items()}
    name = next(n for n, m in pipe.model.named_modules() if n.endswith("to_q"))
    width = dict(pipe.model.named_modules())[name].weight.shape
    good = {f"lora_unet_{name.replace('.', '_')}.hada_{k}": v for k, v in (
        ("w1_a", torch.randn(width[0], 2)), ("w1_b", torch.randn(2, width[1])), ("w2_a", torch.randn(width[0], 2)),
        ("w2_b", torch.randn(2, width[1])))}
    bad_kron = {"lora_unet_conv_in.lokr_w1": torch.randn(3, 3), "lora_unet_conv_in.lokr_w2": torch.randn(5, 5)}
    with pytest.raises(CheckpointError, match="the network's layer 'conv_in': LyCORIS: LoKr: an update of"):
        pipe.load_lora({**good, **bad_kron})
    halves = dict(good)
    halves[f"lora_unet_{name.replace('.', '_')}.hada_w2_b"] = torch.randn(2, width[1] + 1)
    with pytest.raises(CheckpointError, match="halves disagree"):
        pipe.load_lora(halves)
    assert all(torch.equal(v, before[k]) for k, v in pipe.model.state_dict().items())
    pipe.load_lora(good)
    assert not all(torch.equal(v, before[k]) for k, v in pipe.model.state_dict().items())


def test_a_full_update_of_the_bias_is_undone_by_unload_and_refused_without_a_bias():
    """LyCORIS's full layers update the bias too (``diff_b``): ``unload_lora`` puts weight and bias back; a
    ``diff_b`` for a layer without a bias, (IA)^3 factors of the wrong count, OFT blocks that do not tile the rows,
    GLoRA factors of the wrong width, a bad ``on_input`` or a ``dora_scale`` beside these kinds are refused, before
    anything merges."""
    pipe = fastdiff.load("arch:tiny-sd-unet")
    before = {k: v.clone() for k, v in pipe.model.state_dict().items()}
    layers = dict(pipe.model.named_modules())
    name = next(n for n, m in layers.items() if n.endswith("to_out.0"))  # (a linear layer with a bias)
    layer, key = layers[name], f"lora_unet_{name.replace('.', '_')}"
    diff, diff_b = torch.randn_like(layer.weight), torch.randn_like(layer.bias)
    pipe.load_lora({f"{key}.diff": diff, f"{key}.diff_b": diff_b}, scale=0.5)
    assert rel_err(layer.weight, before[name + ".weight"] + 0.5 * diff) <= 1e-6
    assert rel_err(layer.bias, before[name + ".bias"] + 0.5 * diff_b) <= 1e-6
    pipe.unload_lora()
    assert all(torch.equal(v, before[k]) for k, v in pipe.model.state_dict().items())

    no_bias = next(n for n, m in layers.items() if n.endswith("to_q"))
    q_key, q = f"lora_unet_{no_bias.replace('.', '_')}", layers[no_bias]
    assert q.bias is None
    with pytest.raises(CheckpointError, match="to_q.*diff_b .* for a layer without a bias"):
        pipe.load_lora({f"{key}.diff": diff, f"{key}.diff_b": diff_b, f"{q_key}.diff": torch.randn_like(q.weight),
                        f"{q_key}.diff_b": torch.randn(q.weight.shape[0])})
    with pytest.raises(CheckpointError, match=r"\(IA\)\^3: 3 factors for the output channels"):
        pipe.load_lora({f"{q_key}.weight": torch.randn(3), f"{q_key}.on_input": torch.tensor(0)})
    rows = q.weight.shape[0]
    for blocks, match in ((torch.randn(rows // 2 + 1, 2, 2), "OFT: blocks .*expected n \\* b"),
                          (torch.randn(5, rows // 4, 4, 4), "BOFT: blocks .*a multiple of 2\\^\\(m-1\\) \\* b"),
                          (torch.randn(2, rows, 1, 1), "BOFT: .*even block size"),  # (blocks of one row)
                          (torch.randn(rows, 2, 3), "expected oft_blocks")):
        with pytest.raises(CheckpointError, match=match):
            pipe.load_lora({f"{q_key}.oft_blocks": blocks})
    glora = {"a1.weight": torch.randn(rows, 2), "a2.weight": torch.randn(2, rows), "b1.weight": torch.randn(rows, 2),
             "b2.weight": torch.randn(2, rows + 1)}
    with pytest.raises(CheckpointError, match=r"GLoRA: b2.weight \(2, 33\) for a weight of \(32, 32\)"):
        pipe.load_lora({f"{q_key}.{k}": v for k, v in glora.items()})
    assert all(torch.equal(v, before[k]) for k, v in pipe.model.state_dict().items())
    for state, match in (({"lora_unet_x.weight": torch.randn(3), "lora_unet_x.on_input": torch.tensor(2)},
                          "on_input: expected 0 or 1"),
                         ({"lora_unet_x.diff": torch.randn(3, 3), "lora_unet_x.dora_scale": torch.randn(3, 1)},
                          "dora_scale beside a full or \\(IA\\)\\^3 layer"),
                         ({"lora_unet_x.diff_b": torch.randn(3)}, "diff_b without its diff")):
        with pytest.raises(CheckpointError, match=match):
            read_lora(state)
    with pytest.raises(UnsupportedConfigError, match="lora_unet_x"):  # (IA)^3's factors without on_input
        read_lora({"lora_unet_x.weight": torch.randn(3)})


@pytest.mark.parametrize("first,second", [("ia3", "ia3"), ("locon", "oft"), ("oft", "locon"), ("oft", "boft"),
                                          ("ia3", "loha"), ("glora", "ia3")])
def test_two_files_on_one_layer_add_up_as_lycoris_stacks_them(first, second):
    """Two files merged into one layer, in either order, equal LyCORIS's two modules stacked on it: each update of the
    original weight ((IA)^3's and OFT's read the weight, and read it before any merge, as LyCORIS and AUTOMATIC1111
    do); ``restore`` then gives the layer back exactly."""
    torch.manual_seed(0)
    layer = nn.Linear(12, 32)
    original = copy.deepcopy(layer)
    modules = [_module(algo, "lora_unet_x", layer, 2, 2.0, multiplier=0.8, seed=seed, lora_dim=4)
               for seed, algo in ((1, first), (2, second))]  # (the second wraps the first's forward)
    x = torch.randn(3, 12)
    with torch.no_grad():
        want = layer(x)
    for order in (modules, modules[::-1]):
        merged, saved = copy.deepcopy(original), {}
        for module in order:
            entry = read_lora(_state([module]))[("network", "~x")]
            fastdiff.lora.merge(fastdiff.lora.targets({"~x": entry}, nn.ModuleDict({"x": merged}), "test"), 0.8, saved)
        with torch.no_grad():
            assert rel_err(merged(x), want) <= 1e-5
        fastdiff.lora.restore(saved)
        assert torch.equal(merged.weight, original.weight) and torch.equal(merged.bias, original.bias)


@pytest.mark.parametrize("norm,shape", [(lambda: nn.GroupNorm(4, 12), (2, 12, 3, 3)),
                                        (lambda: nn.LayerNorm(10), (3, 5, 10))], ids=["group_norm", "layer_norm"])
@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_a_norm_layer_update_merges_to_what_lycoris_computes(norm, shape, scale):
    """LyCORIS's norm-layer updates (``w_norm`` / ``b_norm`` of a GroupNorm or LayerNorm) on weight and bias."""
    from lycoris.modules.norms import NormModule

    torch.manual_seed(5)
    layer = norm()
    with torch.no_grad():
        layer.weight.normal_(1, 0.1), layer.bias.normal_(0, 0.1)
    original = copy.deepcopy(layer)
    module = NormModule("lora_unet_x", layer, multiplier=scale)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape) * 0.3)
    module.apply_to()
    x = torch.randn(shape)
    with torch.no_grad():
        want = layer(x)
    state = _state([module])
    assert set(state) == {"lora_unet_x.w_norm", "lora_unet_x.b_norm"}
    merged, saved = copy.deepcopy(original), {}
    entry = read_lora(state)[("network", "~x")]
    fastdiff.lora.merge(fastdiff.lora.targets({"~x": entry}, nn.ModuleDict({"x": merged}), "test"), scale, saved)
    with torch.no_grad():
        assert rel_err(merged(x), want) <= 1e-5
        assert rel_err(want, original(x)) > 1e-2
    fastdiff.lora.restore(saved)
    assert torch.equal(merged.weight, original.weight) and torch.equal(merged.bias, original.bias)
