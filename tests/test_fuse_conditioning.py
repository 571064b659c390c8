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


@pytest.mark.parametrize("change", ["to", "deepcopy", "pickle", "share_memory"])
@torch.no_grad()
def test_stacks_are_rebuilt_by_whatever_gives_the_layers_new_storage(change):
    """Straight after the change (no load to hide a missing rebuild): the layers view the stack again, and an
    in-place edit of one layer's weight reaches the stacked projection."""
    import pickle

    model = _unet().model.eval()
    fuse_conditioning(model)
    model = {"to": lambda m: m.to(torch.float64).to(torch.float32), "deepcopy": copy.deepcopy,
             "pickle": lambda m: pickle.loads(pickle.dumps(m)), "share_memory": lambda m: m.share_memory()}[change](model)
    assert _shares(model, "temb") and _shares(model, "cross_kv")
    if change == "share_memory":
        assert model.temb_weight.is_shared() and model.cross_kv_weight.is_shared()
    attn = next(m.attn2 for m in model.modules() if isinstance(m, TransformerBlock))
    attn.to_v.weight.mul_(3.0)
    model.down_blocks[0].resnets[0].time_emb_proj.bias.add_(1.0)
    x, t, ctx = _inputs(model)
    stacked = model(x, t, encoder_hidden_states=ctx)
    for name in ("temb", "cross_kv"):
        model.unstack(name)
    assert rel_err(stacked, model(x, t, encoder_hidden_states=ctx)) <= 1e-6


@torch.no_grad()
def test_a_plain_load_keeps_the_stacks_memory():
    """load_state_dict copies into the views: the stacks keep their memory (a graph captured before the load
    reads the new weights); assign=True gives the layers new tensors and the stacks are rebuilt from them."""
    model = _unet().model.eval()
    fuse_conditioning(model)
    ptrs = [model.temb_weight.data_ptr(), model.cross_kv_weight.data_ptr()]
    state = {k: v * 0.5 for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    assert [model.temb_weight.data_ptr(), model.cross_kv_weight.data_ptr()] == ptrs
    torch.testing.assert_close(model.temb_weight[:4], state["down_blocks.0.resnets.0.time_emb_proj.weight"][:4])


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


@pytest.mark.parametrize("kind", ["scale_shift", "class_conditional"])
@torch.no_grad()
def test_scale_shift_and_class_conditional_unets(kind):
    """A scale-shift resnet's projection (two halves read by GroupNorm in place) and a class embedding added to
    the time embedding: stacked equals per layer, native and Triton."""
    from fastdiff.models.unet import UNet, UNetConfig

    extra = dict(resnet_time_scale_shift="scale_shift") if kind == "scale_shift" else dict(num_class_embeds=5)
    cfg = UNetConfig.from_diffusers(dict(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=[32, 64], layers_per_block=1,
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8, **extra), "UNet2DConditionModel")
    model = perturb_(UNet(cfg), seed=4, std=0.1).eval()
    x, t, ctx = _inputs(model)
    kw = dict(encoder_hidden_states=ctx, class_labels=torch.tensor([1, 4]) if kind != "scale_shift" else None)
    want = model(x, t, **kw)
    assert fuse_conditioning(model) > 0
    assert rel_err(model(x, t, **kw), want) <= 1e-6
    if layers.triton_available()[0]:
        layers.set_backend(model, "triton")
        assert rel_err(model(x, t, **kw), want) <= 1e-4


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


@torch.no_grad()
def test_layers_given_other_parameters_run_per_layer():
    """An assign=True load into one layer (not through the model), torch.func.functional_call, or two layers'
    parameters swapped: the stacked matmul would read stale weights, so those calls run layer by layer."""
    model = _unet().model.eval()
    fuse_conditioning(model)
    x, t, ctx = _inputs(model)
    attn = next(m.attn2 for m in model.modules() if isinstance(m, TransformerBlock))

    params = {k: v * 1.5 for k, v in model.named_parameters()}
    plain = _unet().model.eval()
    plain.load_state_dict(model.state_dict())
    want = torch.func.functional_call(plain, params, (x, t), dict(encoder_hidden_states=ctx))
    got = torch.func.functional_call(model, params, (x, t), dict(encoder_hidden_states=ctx))
    assert rel_err(got, want) <= 1e-6
    assert model.stack_current("cross_kv")  # functional_call put the model's own parameters back

    attn.to_v.load_state_dict({"weight": attn.to_v.weight * 2.0}, assign=True)
    plain.load_state_dict(model.state_dict())
    assert not model.stack_current("cross_kv")
    assert rel_err(model(x, t, encoder_hidden_states=ctx), plain(x, t, encoder_hidden_states=ctx)) <= 1e-6
    model._restack()  # what optimize() does again: back to one matmul, with the new weight
    assert model.stack_current("cross_kv") and _shares(model, "cross_kv")
    assert rel_err(model(x, t, encoder_hidden_states=ctx), plain(x, t, encoder_hidden_states=ctx)) <= 1e-6

    attn.to_k.weight, attn.to_v.weight = attn.to_v.weight, attn.to_k.weight  # same memory, other rows
    assert not model._views("cross_kv", model.cross_kv_weight, model.cross_kv_bias)
    plain.load_state_dict(model.state_dict())
    assert rel_err(model(x, t, encoder_hidden_states=ctx), plain(x, t, encoder_hidden_states=ctx)) <= 1e-6


@torch.no_grad()
def test_a_conversion_that_changes_nothing_keeps_the_stacks():
    model = _unet().model.eval()
    fuse_conditioning(model)
    ptrs = [model.temb_weight.data_ptr(), model.cross_kv_weight.data_ptr()]
    model.to(torch.float32).float().cpu()
    assert [model.temb_weight.data_ptr(), model.cross_kv_weight.data_ptr()] == ptrs
    assert model.stack_current("temb") and _shares(model, "temb")
