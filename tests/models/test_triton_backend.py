"""Model level: the fused Triton path (interpreter on CPU) equals the native path, chosen once at build."""

import pytest
import torch

import fastdiff
from fastdiff.errors import BackendUnavailableError
from fastdiff.models.layers import op_backends, set_backend
from helpers import rel_err

pytest.importorskip("triton", reason="the fused path needs triton (CPU interpreter here)")


@pytest.mark.parametrize("arch,kwargs", [
    ("tiny-unet", {}),
    ("tiny-sd-unet", {"encoder_hidden_states": torch.randn(2, 7, 32)}),
    ("tiny-dit", {"class_labels": torch.tensor([3, 10])}),
    ("tiny-sdxl-unet", {"encoder_hidden_states": torch.randn(2, 7, 32), "text_embeds": torch.randn(2, 16),
                        "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64], [96.0, 80, 8, 0, 64, 64]])}),
    ("tiny-sd3", {"encoder_hidden_states": torch.randn(2, 5, 24), "text_embeds": torch.randn(2, 16)}),
    ("tiny-flux", {"encoder_hidden_states": torch.randn(2, 5, 24), "text_embeds": torch.randn(2, 12),
                   "guidance": torch.tensor([3.5, 2.0])}),
])
def test_triton_backend_equals_native(arch, kwargs):
    pipe = fastdiff.load(f"arch:{arch}")
    model = pipe.model
    c, (h, w) = pipe.spec.in_channels, pipe.spec.sample_size
    x = torch.randn(2, c, h, w)
    t = torch.tensor([17, 900])
    with torch.no_grad():
        native = model(x, t, **kwargs)
        assert set_backend(model, "triton") == "triton"
        assert set(op_backends(model).values()) == {"triton"}
        fused = model(x, t, **kwargs)
    assert rel_err(fused, native) <= 1e-4


def test_explicit_triton_without_interpreter_or_cuda_fails_loudly(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = fastdiff.load("arch:tiny-unet").model
    if torch.cuda.is_available():
        pytest.skip("a CUDA device makes the triton backend available")
    with pytest.raises(BackendUnavailableError):
        set_backend(model, "triton")
    assert set_backend(model, "auto") == "native"  # automatic choice falls back quietly


def test_per_op_choices_route_each_op():
    """ops= puts chosen ops on torch (or the CUDA extension, Triton where it cannot run) and the rest on Triton."""
    pipe = fastdiff.load("arch:tiny-sd-unet")
    model = pipe.model
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([17, 900]), torch.randn(2, 7, 32)
    with torch.no_grad():
        native = model(x, t, encoder_hidden_states=ctx)
        set_backend(model, "triton", ops={"attention": "torch", "group_norm": "cuda_ext"})
        # no CUDA extension here: GroupNorm runs Triton, and says so
        assert op_backends(model) == {"GroupNorm": "cuda_ext (not built: triton)", "Attention": "native",
                                      "GEGLU": "triton", "LayerNorm": "triton"}
        routed = model(x, t, encoder_hidden_states=ctx)
    assert rel_err(routed, native) <= 1e-4
    with torch.no_grad():  # GroupNorm's rows strategy: its three launches, the same result
        set_backend(model, "triton", ops={"group_norm": "triton_rows"})
        assert op_backends(model) == {"GroupNorm": "triton_rows", "Attention": "triton", "GEGLU": "triton",
                                      "LayerNorm": "triton"}
        assert rel_err(model(x, t, encoder_hidden_states=ctx), native) <= 1e-4
    for op in ("attention", "adaln_modulate"):
        with pytest.raises(fastdiff.BadArgumentError, match=op):
            set_backend(model, "triton", ops={op: "cuda_ext"})
    with pytest.raises(fastdiff.BadArgumentError, match="attention takes one of"):
        set_backend(model, "triton", ops={"attention": "triton_rows"})
    with pytest.raises(fastdiff.BadArgumentError, match="softmax"):
        set_backend(model, "triton", ops={"softmax": "torch"})


def test_optimize_config_kernel_ops():
    from fastdiff.models.layers import GPU_DEFAULT_OPS
    from fastdiff.runtime.config import OptimizeConfig

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert OptimizeConfig().op_choices(cuda) == GPU_DEFAULT_OPS  # the measured per-op winners on a GPU
    assert OptimizeConfig().op_choices(cpu) == {}  # the interpreter: every op on Triton
    assert OptimizeConfig(kernel_ops="all").op_choices(cuda) is None
    assert OptimizeConfig(kernel_ops={"attention": "triton"}).op_choices(cuda) == {**GPU_DEFAULT_OPS,
                                                                                   "attention": "triton"}
    with pytest.raises(fastdiff.BadArgumentError, match="kernel_ops"):
        OptimizeConfig(kernel_ops="fastest")
    pipe = fastdiff.load("arch:tiny-dit").optimize(backend="triton", kernel_ops={"adaln_modulate": "triton_pair"})
    assert op_backends(pipe.model) == {"ModulatedLayerNorm": "triton_pair", "Attention": "triton"}


def test_measured_defaults_per_model_and_weight_fusions_by_device():
    """On a GPU a DiT takes its own measured attention (the TMA kernel, DiT-XL/2 run 4), other models the shared
    table; the auto weight fusions (None) turn on on CUDA where they apply, and stay off on the CPU."""
    from fastdiff.models.layers import GPU_DEFAULT_OPS, gpu_default_ops
    from fastdiff.runtime.config import OptimizeConfig
    from fastdiff.runtime.runners import weight_fusions

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    dit, unet = fastdiff.load("arch:tiny-dit").model, fastdiff.load("arch:tiny-sd-unet").model
    assert gpu_default_ops(dit) == {**GPU_DEFAULT_OPS, "attention": "triton_tma"}
    # a UNet: the Triton attention and fused state update, their graphs' host time (run 6)
    assert gpu_default_ops(unet) == {**GPU_DEFAULT_OPS, "attention": "triton", "sampler_update": "triton"}
    assert GPU_DEFAULT_OPS["attention"] == "torch" and GPU_DEFAULT_OPS["sampler_update"] == "torch"
    assert GPU_DEFAULT_OPS["adaln_modulate"] == "triton"  # the one-pass residual + norm (run 4)
    assert GPU_DEFAULT_OPS["layer_norm"] == "triton"  # SD's one-pass residual + LayerNorm (run 6)
    config = OptimizeConfig(backend="triton")
    assert config.op_choices(cuda, dit)["attention"] == "triton_tma"
    assert config.op_choices(cuda, unet)["attention"] == "triton"
    assert config.sampler_update_impl(cuda, unet) == "triton" and config.sampler_update_impl(cuda, dit) == "torch"
    from fastdiff.models.controlnet import ControlNet  # (a subclass: its UNet's table, captured with it)

    assert gpu_default_ops(ControlNet.from_unet(unet)) == gpu_default_ops(unet)
    assert OptimizeConfig(backend="triton", kernel_ops={"sampler_update": "torch"}).sampler_update_impl(cuda, unet) \
        == "torch"
    assert OptimizeConfig(backend="eager").sampler_update_impl(cuda, unet) == "torch"
    assert OptimizeConfig(backend="triton", kernel_ops={"attention": "torch"}).op_choices(cuda, dit)["attention"] \
        == "torch"  # an explicit choice wins over the model's table
    set_backend(dit, "triton", ops=config.op_choices(cuda, dit))
    assert op_backends(dit) == {"ModulatedLayerNorm": "triton", "Attention": "triton_tma"}

    default = OptimizeConfig()
    assert weight_fusions(unet, default, cuda) == dict(qkv=True, adaln=False, conditioning=True)
    assert weight_fusions(dit, default, cuda) == dict(qkv=False, adaln=True, conditioning=False)
    assert weight_fusions(unet, default, cpu) == dict(qkv=False, adaln=False, conditioning=False)
    assert weight_fusions(unet, OptimizeConfig(fuse_conditioning=False, fuse_qkv=False), cuda) == \
        dict(qkv=False, adaln=False, conditioning=False)
    assert weight_fusions(dit, OptimizeConfig(fuse_conditioning=True), cpu)["conditioning"]  # forced: a note later


@pytest.mark.parametrize("backend,want", [("native", torch.float32), ("triton", torch.float16),
                                          ("triton_tma", torch.float16)])
def test_upcast_attention_reaches_torch_only(backend, want):
    """SD 2.x's upcast_attention: torch's SDPA gets float32 inputs; the Triton kernels (scores and softmax in
    float32 already) the half-precision ones, which keeps their dots on the tensor cores."""
    from fastdiff.models.unet import MultiHeadAttention

    attn = MultiHeadAttention(16, heads=2, head_dim=8, upcast=True)
    attn.core.set_backend(backend)
    seen = []

    def record(q, k, v, scale=None):
        seen.append(q.dtype)
        return q.clone()

    for name in ("forward_native", "forward_triton", "forward_triton_tma"):
        setattr(attn.core, name, record)
    q = k = v = torch.randn(1, 2, 5, 8, dtype=torch.float16)
    out = attn._attend(1, q, k, v)
    assert seen == [want] and out.dtype == torch.float16 and out.shape == (1, 5, 16)
    attn.upcast = False
    seen.clear()
    attn._attend(1, q, k, v)
    assert seen == [torch.float16]


def test_upcast_holds_for_heads_too_wide_for_the_triton_kernel():
    """Heads wider than the Triton kernel holds run on torch's SDPA from the Triton backend: with SD 2.x's
    upcast_attention, on float32 copies as torch's path always is."""
    from fastdiff.kernels.attention import MAX_HEAD_DIM
    from fastdiff.models.unet import MultiHeadAttention

    d = MAX_HEAD_DIM + 8
    attn = MultiHeadAttention(d, heads=1, head_dim=d, upcast=True)
    attn.core.set_backend("triton")
    seen = []
    attn.core.forward_native = lambda q, k, v, scale=None: seen.append(q.dtype) or q.clone()
    q = torch.randn(1, 1, 3, d, dtype=torch.float16)
    assert attn._attend(1, q, q, q).dtype == torch.float16 and seen == [torch.float32]
