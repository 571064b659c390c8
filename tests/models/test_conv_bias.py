"""fuse_conv_bias: a channels-last UNet's convolution biases moved out of separate kernels (GEMM epilogues, the time
embedding, the shortcut GEMM), with the same outputs (CPU; the kernels it saves exist only on a GPU)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastdiff
from fastdiff.models.conv_bias import set_conv_bias_fusion
from fastdiff.models.unet import Downsample, ResnetBlock, Upsample
from helpers import perturb_, rel_err


class Convolutions(TorchDispatchMode):
    """Records (kernel size, has bias) of every aten convolution, and counts addmm (GEMMs with a bias)."""

    def __init__(self):
        super().__init__()
        self.convs, self.addmm = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten.convolution:
            self.convs.append((tuple(args[1].shape[2:]), args[2] is not None))
        elif func.overloadpacket is torch.ops.aten.addmm:
            self.addmm += 1
        return func(*args, **(kwargs or {}))


def _model_and_inputs(arch):
    pipe = fastdiff.load(arch)
    perturb_(pipe.model, seed=1, std=0.1)  # no zero-initialised projections
    spec = pipe.spec
    x = torch.randn(2, spec.in_channels, *spec.sample_size)
    kw = {"encoder_hidden_states": torch.randn(2, 6, spec.cross_attention_dim)} if spec.cross_attention_dim else {}
    return pipe.model, x, torch.tensor([10.0, 700.0]), kw


def _biased_convs_left(model) -> int:
    """conv_in, conv_out, the resamplers and the conv2 of resnets without a shortcut keep their bias kernels."""
    resnets_without_shortcut = sum(isinstance(m, ResnetBlock) and m.conv_shortcut is None for m in model.modules())
    resamplers = sum(isinstance(m, (Downsample, Upsample)) for m in model.modules())
    return 2 + resamplers + resnets_without_shortcut


@pytest.mark.parametrize("arch", ["arch:tiny-sd-unet", "arch:tiny-unet"])
@torch.no_grad()
def test_fused_biases_equal_the_convolutions(arch):
    model, x, t, kw = _model_and_inputs(arch)
    want = model(x, t, **kw)
    assert set_conv_bias_fusion(model, True) > 0
    # an NCHW model takes the convolutions as they were: the rewrites apply to channels-last images only
    with Convolutions() as seen_nchw:
        assert rel_err(model(x, t, **kw), want) <= 1e-5
    assert any(k == (1, 1) for k, _ in seen_nchw.convs)
    model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    with Convolutions() as seen:
        got = model(x, t, **kw)
    assert rel_err(got, want) <= 1e-5 and got.is_contiguous(memory_format=torch.channels_last)
    assert all(k == (3, 3) for k, _ in seen.convs), "every 1x1 convolution runs as a GEMM"
    assert sum(biased for _, biased in seen.convs) == _biased_convs_left(model)
    assert len(seen.convs) - sum(biased for _, biased in seen.convs) > 0  # the conv1 / conv2 that lost their bias


@torch.no_grad()
def test_the_folds_do_not_wait_for_a_channels_last_norm_output(monkeypatch):
    """torch's CUDA GroupNorm returns NCHW for a channels-last input: the resnets' folds (conv1's bias into the
    time embedding, conv2's into the shortcut) must still apply; only the 1x1 GEMMs need the channels-last rows."""
    from fastdiff.models.layers import GroupNorm

    model, x, t, kw = _model_and_inputs("arch:tiny-sd-unet")
    want = model(x, t, **kw)
    native = GroupNorm.forward_native
    monkeypatch.setattr(GroupNorm, "forward_native", lambda self, *a, **k: native(self, *a, **k).contiguous())
    model.to(memory_format=torch.channels_last)
    set_conv_bias_fusion(model, True)
    with Convolutions() as seen:
        got = model(x.contiguous(memory_format=torch.channels_last), t, **kw)
    assert rel_err(got, want) <= 1e-5
    resnets = [m for m in model.modules() if isinstance(m, ResnetBlock)]
    with_shortcut = sum(m.conv_shortcut is not None for m in resnets)
    assert len(seen.convs) - sum(biased for _, biased in seen.convs) == len(resnets) + with_shortcut


def test_optimize_switch_on_a_unet_and_elsewhere():
    base = fastdiff.load("arch:tiny-sd-unet")
    perturb_(base.model, seed=2, std=0.1)
    ctx = torch.randn(1, 6, 32)
    kw = dict(seeds=[1, 2], steps=3, sampler="dpmpp_2m", encoder_hidden_states=ctx,
              negative_encoder_hidden_states=torch.zeros_like(ctx), cfg_scale=3.0, progress=False)
    want = base.generate(**kw)
    pipe = fastdiff.load("arch:tiny-sd-unet")
    pipe.model.load_state_dict(base.model.state_dict())
    pipe.optimize(channels_last=True, fuse_conv_bias=True, fuse_conditioning=True)
    assert all(m.fuse_conv_bias for m in pipe.model.modules() if isinstance(m, ResnetBlock))
    assert rel_err(pipe.generate(**kw), want) <= 1e-5
    pipe.optimize(channels_last=True)  # a later optimize without the switch takes it back
    assert not any(getattr(m, "fuse_conv_bias", False) for m in pipe.model.modules())
    pipe.optimize(fuse_conv_bias=True)  # NCHW: the folds into the time embedding and the shortcuts still apply
    assert all(m.fuse_conv_bias for m in pipe.model.modules() if isinstance(m, ResnetBlock))
    assert rel_err(pipe.generate(**kw), want) <= 1e-5 and not any("fuse_conv_bias" in n for n in pipe.notes)
    dit = fastdiff.load("arch:tiny-dit").optimize(channels_last=True, fuse_conv_bias=True)
    assert any("fuse_conv_bias ignored: only fastdiff's diffusers-style UNet" in n for n in dit.notes)
    with pytest.raises(fastdiff.BadArgumentError, match="fuse_conv_bias"):
        fastdiff.OptimizeConfig(fuse_conv_bias="yes")


def test_default_moves_the_biases_only_for_a_channels_last_model_on_cuda():
    """None (the default) is on where it was measured faster (a channels-last UNet on CUDA, run 5), off elsewhere;
    an explicit value is kept; on the CPU the default leaves every block's switch off."""
    from fastdiff.runtime.runners import conv_bias_fusion

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    auto = fastdiff.OptimizeConfig(channels_last=True)
    assert auto.fuse_conv_bias is None
    assert conv_bias_fusion(auto, cuda) and not conv_bias_fusion(auto, cpu)
    assert not conv_bias_fusion(fastdiff.OptimizeConfig(), cuda)  # NCHW: not measured, so off
    assert not conv_bias_fusion(fastdiff.OptimizeConfig(channels_last=True, fuse_conv_bias=False), cuda)
    assert conv_bias_fusion(fastdiff.OptimizeConfig(fuse_conv_bias=True), cpu)
    pipe = fastdiff.load("arch:tiny-sd-unet").optimize(channels_last=True)
    assert not any(getattr(m, "fuse_conv_bias", False) for m in pipe.model.modules())


def test_fused_biases_on_the_triton_backend():
    """The Triton GroupNorm adds conv1's bias with the time embedding (interpreter, tiny shapes)."""
    pytest.importorskip("triton", reason="the fused path needs triton (CPU interpreter here)")
    model, x, t, kw = _model_and_inputs("arch:tiny-sd-unet")
    with torch.no_grad():
        want = model(x, t, **kw)
    pipe = fastdiff.load("arch:tiny-sd-unet")
    pipe.model.load_state_dict(model.state_dict())
    pipe.optimize(backend="triton", channels_last=True, fuse_conv_bias=True, fuse_conditioning=True)
    with torch.no_grad():
        got = pipe.runner(x, t, **kw)
    assert rel_err(got, want) <= 1e-5
