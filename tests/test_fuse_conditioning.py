"""fuse_conditioning: a UNet's time-embedding projections and cross-attention keys / values, one matmul per
group (``fastdiff.models.linear_stack``), equal to the per-layer projections."""

import copy

import pytest
import torch

import fastdiff
from fastdiff.models import layers
from fastdiff.models.fuse import fuse_conditioning
from fastdiff.models.unet import ResnetBlock, TransformerBlock
from helpers import perturb_, rel_err

KW = dict(seeds=[4, 5], steps=3, sampler="dpmpp_2m", encoder_hidden_states=torch.randn(1, 6, 32),
          negative_encoder_hidden_states=torch.randn(1, 6, 32), cfg_scale=4.0, progress=False)


def _unet():
    pipe = fastdiff.load("arch:tiny-sd-unet")
    perturb_(pipe.model, seed=2, std=0.1)
    return pipe


def _inputs(model, b=2):
    c = model.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, c.in_channels, 16, 16, generator=g)
    return x, torch.tensor([900.0, 20.0][:b]), torch.randn(b, 6, c.cross_attention_dim, generator=g)


def _shares(model, name) -> bool:
    ptr = getattr(model, f"{name}_weight").untyped_storage().data_ptr()
    return all(lin.weight.untyped_storage().data_ptr() == ptr for lin in model.stack_layers(name))


@torch.no_grad()
def test_stacked_projections_equal_the_layers():
    pipe = _unet()
    model = pipe.model.eval()
    x, t, ctx = _inputs(model)
    want = model(x, t, encoder_hidden_states=ctx)
    keys = model.state_dict().keys()
    resnets = [m for m in model.modules() if isinstance(m, ResnetBlock)]
    attns = [m.attn2 for m in model.modules() if isinstance(m, TransformerBlock)]
    assert fuse_conditioning(model) == len(resnets) + 2 * len(attns)
    assert sorted(r.temb_index for r in resnets) == list(range(len(resnets)))
    assert [a.kv_index for a in attns] == list(range(len(attns)))
    assert model.cross_kv_bias is None and model.temb_bias is not None  # SD's to_k / to_v have no bias
    assert _shares(model, "temb") and _shares(model, "cross_kv")
    assert model.state_dict().keys() == keys  # checkpoints keep diffusers' layout
    calls = []
    for a in attns:  # the per-layer key / value projections no longer run
        a.to_k.register_forward_hook(lambda *_: calls.append(1))
    got = model(x, t, encoder_hidden_states=ctx)
    assert calls == [] and rel_err(got, want) <= 1e-6
    model.unstack("cross_kv")
    assert all(a.kv_index is None for a in attns)
    assert rel_err(model(x, t, encoder_hidden_states=ctx), want) <= 1e-6 and len(calls) == len(attns)


@pytest.mark.parametrize("change", ["to", "deepcopy", "assign"])
@torch.no_grad()
def test_stacks_follow_the_layers_weights(change):
    model = _unet().model.eval()
    fuse_conditioning(model)
    state = {k: v * 0.5 if ("to_k" in k or "time_emb_proj" in k) else v for k, v in model.state_dict().items()}
    if change == "to":
        model = model.to(torch.float64).to(torch.float32)
        model.load_state_dict(state)
    elif change == "deepcopy":
        model = copy.deepcopy(model)
        model.load_state_dict(state)
    else:
        model.load_state_dict({k: v.clone() for k, v in state.items()}, assign=True)
    assert _shares(model, "temb") and _shares(model, "cross_kv")
    plain = _unet().model.eval()
    plain.load_state_dict(state)
    x, t, ctx = _inputs(model)
    assert rel_err(model(x, t, encoder_hidden_states=ctx), plain(x, t, encoder_hidden_states=ctx)) <= 1e-6


def test_fuse_conditioning_keeps_samples_and_saves_the_original_layout(tmp_path):
    reference = _unet().generate(**KW)
    pipe = _unet().optimize(fuse_conditioning=True)
    assert pipe.model.temb_weight is not None and pipe.model.cross_kv_weight is not None
    assert rel_err(pipe.generate(**KW), reference) <= 1e-5
    pipe.save(str(tmp_path / "m"))
    loaded = fastdiff.load(str(tmp_path / "m"))
    assert loaded.model.temb_weight is None
    assert rel_err(loaded.generate(**KW), reference) <= 1e-5
    pipe.optimize()  # a later optimize without the switch undoes it
    assert pipe.model.temb_weight is None and pipe.model.cross_kv_weight is None
    assert all(m.temb_index is None for m in pipe.model.modules() if isinstance(m, ResnetBlock))


def test_fuse_conditioning_on_the_triton_backend():
    if not layers.triton_available()[0]:
        pytest.skip(layers.triton_available()[1])
    reference = _unet().generate(**KW)
    pipe = _unet().optimize(backend="triton", fuse_conditioning=True)
    assert rel_err(pipe.generate(**KW), reference) <= 1e-4


def test_fuse_conditioning_on_a_dit_says_so():
    pipe = fastdiff.load("arch:tiny-dit").optimize(fuse_conditioning=True)
    assert any(n.startswith("fuse_conditioning ignored") for n in pipe.notes), pipe.notes


def test_training_goes_through_the_layers():
    model = _unet().model
    fuse_conditioning(model)
    x, t, ctx = _inputs(model)
    model(x, t, encoder_hidden_states=ctx).square().mean().backward()
    assert model.down_blocks[0].resnets[0].time_emb_proj.weight.grad is not None
    attn = next(m.attn2 for m in model.modules() if isinstance(m, TransformerBlock))
    assert attn.to_k.weight.grad is not None
